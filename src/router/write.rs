//! Attribute writes: a push is checked as a whole against the register map
//! before anything is written ([`plan`]), then run on the device's bus as
//! the fewest well-formed requests ([`execute`]) and read back.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::{Map, Value as Json};

use super::downlink::Target;
use crate::bus::{Bus, Request, TxError};
use crate::config::{Address, Area, Config, Device, Kind, Point};
use crate::poll::codec::{self, Value};
use crate::poll::{plan, read_device, Reading};

/// Registers in one FC16 and coils in one FC15 (Modbus application protocol).
const MAX_REGISTERS_PER_WRITE: usize = 123;
const MAX_COILS_PER_WRITE: usize = 1968;

/// Why a push is refused; nothing of it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The sub-device key or device name the push addressed, if any.
    pub target: Option<String>,
    pub attribute: String,
    pub reason: String,
}

/// The validated writes for one device.
#[derive(Debug, Clone)]
pub struct WritePlan {
    pub device: Device,
    pub writes: Vec<(Point, Value)>,
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
                Target::Key(k) | Target::Device(k) => Some(k.clone()),
                Target::Own | Target::Any => None,
            },
            attribute: attribute.to_string(),
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
/// the right type and fits both `min`/`max` and the register type.
pub fn value_for(point: &Point, json: &Json) -> Result<Value, String> {
    if !point.writable {
        return Err("read-only point".into());
    }
    let value = match (point.kind, json) {
        (kind, Json::Bool(b)) if kind.is_bool() => Value::Bool(*b),
        (kind, _) if kind.is_bool() => return Err(format!("expected true or false, got {json}")),
        (Kind::String { len }, Json::String(s)) => {
            if !s.is_ascii() || s.len() > usize::from(len) * 2 {
                return Err(format!(
                    "expected ASCII text of at most {} characters",
                    len * 2
                ));
            }
            return Ok(Value::Text(s.clone()));
        }
        (Kind::String { .. }, _) => return Err(format!("expected text, got {json}")),
        (_, Json::Number(n)) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), ..) => Value::Int(i),
            (None, Some(u), _) => Value::UInt(u),
            (None, None, Some(f)) => Value::Float(f),
            _ => return Err(format!("{n} is not a usable number")),
        },
        _ => return Err(format!("expected a number, got {json}")),
    };
    if point.area == Area::Holding {
        codec::encode_registers(point, &value, 0).map_err(|e| e.to_string())?;
    }
    Ok(value)
}

/// Why an accepted write did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("writing {points}: {error}")]
pub struct WriteError {
    pub points: String,
    pub error: TxError,
}

/// Runs `plan` on `bus`: adjacent coils as one FC05/FC15, adjacent registers
/// as one FC06/FC16; a bit inside a register is read first and written back
/// with only that bit changed. Then the written points are read back; the
/// reading is returned when the read succeeds.
pub async fn execute(bus: &mut Bus, plan: &WritePlan) -> Result<Option<Reading>, WriteError> {
    let device = &plan.device;
    let mut coils: BTreeMap<Address, (bool, &str)> = BTreeMap::new();
    let mut words: BTreeMap<Address, (u16, &str)> = BTreeMap::new();
    for (point, value) in &plan.writes {
        let name = point.name.as_str();
        let failed = |error| WriteError {
            points: name.to_string(),
            error,
        };
        match (point.area, value) {
            (Area::Coil, Value::Bool(on)) => {
                coils.insert(point.address, (*on, name));
            }
            _ => {
                let current = match (point.kind, words.get(&point.address)) {
                    (Kind::RegisterBit(_), Some((word, _))) => *word,
                    (Kind::RegisterBit(_), None) => {
                        let read = Request::ReadHolding(point.address, 1);
                        match bus.transact(device.unit, &read, device.timeout).await {
                            Ok(crate::bus::Reply::Registers(regs)) if regs.len() == 1 => regs[0],
                            Ok(_) => return Err(failed(TxError::Mismatch("no register".into()))),
                            Err(e) => return Err(failed(e)),
                        }
                    }
                    _ => 0,
                };
                let encoded = codec::encode_registers(point, value, current)
                    .map_err(|e| failed(TxError::Mismatch(e.to_string())))?;
                for (i, word) in encoded.into_iter().enumerate() {
                    words.insert(point.address + i as u16, (word, name));
                }
            }
        }
    }
    let mut requests = requests_for(
        &coils,
        MAX_COILS_PER_WRITE,
        Request::WriteCoil,
        Request::WriteCoils,
    );
    requests.extend(requests_for(
        &words,
        MAX_REGISTERS_PER_WRITE,
        Request::WriteRegister,
        Request::WriteRegisters,
    ));
    for (request, names) in requests {
        if let Err(error) = bus.transact(device.unit, &request, device.timeout).await {
            return Err(WriteError {
                points: names.join(", "),
                error,
            });
        }
    }
    Ok(read_back(bus, plan).await)
}

/// One request per run of consecutive addresses (at most `max` long):
/// `one` for a single item, `many` for several. Each comes with the names
/// of the points it writes.
fn requests_for<'a, T: Copy>(
    items: &BTreeMap<Address, (T, &'a str)>,
    max: usize,
    one: fn(Address, T) -> Request,
    many: fn(Address, Vec<T>) -> Request,
) -> Vec<(Request, Vec<&'a str>)> {
    let mut runs: Vec<Vec<(Address, (T, &str))>> = Vec::new();
    for (&address, &item) in items {
        match runs.last_mut() {
            Some(run)
                if run.len() < max
                    && run
                        .last()
                        .is_some_and(|(a, _)| u32::from(*a) + 1 == u32::from(address)) =>
            {
                run.push((address, item));
            }
            _ => runs.push(vec![(address, item)]),
        }
    }
    runs.into_iter()
        .map(|run| {
            let mut names: Vec<&str> = run.iter().map(|(_, (_, n))| *n).collect();
            names.dedup();
            let start = run[0].0;
            let request = match run.as_slice() {
                [(_, (value, _))] => one(start, *value),
                _ => many(start, run.iter().map(|(_, (v, _))| *v).collect()),
            };
            (request, names)
        })
        .collect()
}

/// Reads the written points again, for an immediate report.
async fn read_back(bus: &mut Bus, plan: &WritePlan) -> Option<Reading> {
    let mut device = plan.device.clone();
    device.points = plan.writes.iter().map(|(p, _)| p.clone()).collect();
    let blocks = plan::plan(&device.points, bus.config());
    let taken = SystemTime::now();
    let result = read_device(bus, &device, &blocks, None).await;
    let mut values = Map::new();
    for (point, value) in device
        .points
        .iter()
        .zip(result.values(&device.points, &blocks))
    {
        if let Some(json) = value.and_then(|v| v.to_json()) {
            values.insert(point.name.clone(), json);
        }
    }
    if values.is_empty() {
        log::warn!(target: "router", "device {}: written, but the read-back failed", device.name);
        return None;
    }
    Some(Reading {
        device: device.name,
        key: device.key,
        taken,
        values,
    })
}
