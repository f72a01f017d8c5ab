//! Attribute writes, checked: a push is validated as a whole against the
//! register map before anything is written. The result is one
//! [`WritePlan`] per device, which the bus owner runs
//! ([`crate::poll::job::execute_write`]).

use serde_json::{Map, Value as Json};

use super::downlink::Target;
use crate::codec::{self, Value};
use crate::config::{Area, Config, Device, Kind, Point};
use crate::poll::job::WritePlan;
use crate::text::clip;

/// Why a push is refused; nothing of it is written. Every text in it is
/// bounded ([`clip`]), whatever the network sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The sub-device key or device name the push addressed, if any.
    pub target: Option<String>,
    pub attribute: String,
    pub reason: String,
}

/// Checks every attribute of `pushes` and groups them per device. Any
/// problem rejects the whole push.
pub fn plan(
    config: &Config,
    pushes: &[(Target, Map<String, Json>)],
) -> Result<Vec<WritePlan>, Rejection> {
    let mut plans: Vec<WritePlan> = Vec::new();
    for (target, values) in pushes {
        let reject = |attribute: &str, reason: String| Rejection {
            target: match target {
                Target::Key(k) | Target::Device(k) => Some(clip(k)),
                Target::Own | Target::Any => None,
            },
            attribute: clip(attribute),
            reason,
        };
        let devices: Vec<&Device> = config
            .devices
            .iter()
            .filter(|d| target.addresses(d))
            .collect();
        if devices.is_empty() {
            let what = match target {
                Target::Key(_) => "no device has this sub-device key",
                _ => "no such device",
            };
            return Err(reject("", what.to_string()));
        }
        for (attribute, json) in values {
            let Some((device, point)) = devices
                .iter()
                .find_map(|d| d.point(attribute).map(|p| (*d, p)))
            else {
                return Err(reject(attribute, "unknown attribute".into()));
            };
            let value = value_for(point, json).map_err(|reason| reject(attribute, reason))?;
            let write = (point.clone(), value);
            match plans.iter_mut().find(|p| p.device.name == device.name) {
                Some(plan) => plan.writes.push(write),
                None => plans.push(WritePlan {
                    device: device.clone(),
                    writes: vec![write],
                }),
            }
        }
    }
    Ok(plans)
}

/// The point's value for `json`, if the point is writable and the value has
/// the right type and fits both `min`/`max` and the register type. Integers
/// stay integers (64-bit values exactly).
pub fn value_for(point: &Point, json: &Json) -> Result<Value, String> {
    if !point.writable {
        return Err("read-only point".into());
    }
    let shown = || clip(&json.to_string());
    let value = match (point.kind, json) {
        (kind, Json::Bool(b)) if kind.is_bool() => Value::Bool(*b),
        (kind, _) if kind.is_bool() => {
            return Err(format!("expected true or false, got {}", shown()))
        }
        (Kind::String { len }, Json::String(s)) => {
            if !s.is_ascii() || s.len() > usize::from(len) * 2 {
                return Err(format!(
                    "expected ASCII text of at most {} characters",
                    u32::from(len) * 2
                ));
            }
            return Ok(Value::Text(s.clone()));
        }
        (Kind::String { .. }, _) => return Err(format!("expected text, got {}", shown())),
        (_, Json::String(label)) if !point.labels.is_empty() => {
            match codec::label_number(point, label) {
                Some(n) => Value::Int(n),
                None => {
                    let known: Vec<&str> = point.labels.iter().map(|(_, l)| l.as_str()).collect();
                    return Err(format!(
                        "{} is not one of its labels ({}) or a number",
                        shown(),
                        known.join(", ")
                    ));
                }
            }
        }
        (_, Json::Number(n)) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), ..) => Value::Int(i),
            (None, Some(u), _) => Value::UInt(u),
            (None, None, Some(f)) => Value::Float(f),
            _ => return Err(format!("{} is not a usable number", shown())),
        },
        _ => return Err(format!("expected a number, got {}", shown())),
    };
    if point.area == Area::Holding {
        codec::encode_registers(point, &value, 0).map_err(|e| e.to_string())?;
    }
    Ok(value)
}
