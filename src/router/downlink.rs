//! Downlink messages as the platform sends them (SPEC §5, §6), parsed into
//! what they ask for. Everything here is untrusted input: size-limited,
//! parsed by serde_json (whose recursion limit bounds nesting), never
//! panicking.

use serde_json::{Map, Value};

use crate::config::Profile;

/// Largest JSON downlink payload accepted.
pub const MAX_JSON: usize = 64 * 1024;
/// Largest raw-frame payload accepted (hex text of a 4 KiB transparent frame).
pub const MAX_FRAME_TEXT: usize = 3 * 4096;

/// Which platform device a push or command addresses.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The gateway's own attributes: devices without `key`.
    Own,
    /// A ThingsCloud sub-device, by `key`.
    Key(String),
    /// A device by name (generic profile).
    Device(String),
    /// Any device (generic commands are named globally).
    Any,
}

impl Target {
    /// Whether `device` is one this target addresses.
    pub fn addresses(&self, device: &crate::config::Device) -> bool {
        match self {
            Target::Own => device.key.is_none(),
            Target::Key(k) => device.key.as_ref() == Some(k),
            Target::Device(name) => &device.name == name,
            Target::Any => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Downlink {
    /// Attribute writes, one object per addressed device.
    Push(Vec<(Target, Map<String, Value>)>),
    /// A named command; `id` is echoed in the reply.
    Command {
        target: Target,
        id: Value,
        method: String,
    },
    /// A raw frame for a stream's bus, as carried over MQTT.
    Frame { stream: String, payload: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DownlinkError {
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("not a downlink topic")]
    UnknownTopic,
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("unexpected shape: {0}")]
    Shape(&'static str),
}

/// What `topic` + `payload` ask for under `profile`.
pub fn parse(profile: &Profile, topic: &str, payload: &[u8]) -> Result<Downlink, DownlinkError> {
    match profile {
        Profile::ThingsCloud { .. } => thingscloud(topic, payload),
        Profile::Generic { topic_prefix, .. } => {
            let rest = topic
                .strip_prefix(topic_prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .ok_or(DownlinkError::UnknownTopic)?;
            generic(rest, payload)
        }
    }
}

fn thingscloud(topic: &str, payload: &[u8]) -> Result<Downlink, DownlinkError> {
    let parts: Vec<&str> = topic.split('/').collect();
    match parts.as_slice() {
        ["attributes", "push"] => Ok(Downlink::Push(vec![(Target::Own, object(payload)?)])),
        ["gateway", "attributes", "push"] => {
            let body = object(payload)?;
            // `{"device": "<key>", "attributes": {…}}`, as third-party
            // gateways and firmware send it: a string under "device" is never
            // a sub-device's attributes, which are an object.
            if let Some(Value::String(key)) = body.get("device") {
                let (Some(Value::Object(values)), 2) = (body.get("attributes"), body.len()) else {
                    return Err(DownlinkError::Shape(
                        "{\"device\": \"<key>\", \"attributes\": {…}} and nothing else",
                    ));
                };
                return Ok(Downlink::Push(vec![(
                    Target::Key(key.clone()),
                    values.clone(),
                )]));
            }
            let mut pushes = Vec::new();
            for (key, values) in body {
                let Value::Object(values) = values else {
                    return Err(DownlinkError::Shape(
                        "each sub-device key maps to an object",
                    ));
                };
                pushes.push((Target::Key(key), values));
            }
            Ok(Downlink::Push(pushes))
        }
        ["command", "send", id] if !id.is_empty() => Ok(Downlink::Command {
            target: Target::Own,
            id: command_id(Value::String((*id).to_string()))?,
            method: method(&object(payload)?)?,
        }),
        ["gateway", "command", "send"] => {
            let body = object(payload)?;
            let Some(Value::String(key)) = body.get("device") else {
                return Err(DownlinkError::Shape("\"device\" must be a string"));
            };
            let Some(Value::Object(command)) = body.get("command") else {
                return Err(DownlinkError::Shape("\"command\" must be an object"));
            };
            Ok(Downlink::Command {
                target: Target::Key(key.clone()),
                id: command_id(command.get("id").cloned().unwrap_or(Value::Null))?,
                method: method(command)?,
            })
        }
        ["data", stream, "set"] if !stream.is_empty() => frame(stream, payload),
        _ => Err(DownlinkError::UnknownTopic),
    }
}

fn generic(rest: &str, payload: &[u8]) -> Result<Downlink, DownlinkError> {
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["stream", stream, "set"] if !stream.is_empty() => frame(stream, payload),
        ["command", id] if !id.is_empty() => Ok(Downlink::Command {
            target: Target::Any,
            id: command_id(Value::String((*id).to_string()))?,
            method: method(&object(payload)?)?,
        }),
        [device, "set"] if !device.is_empty() => Ok(Downlink::Push(vec![(
            Target::Device((*device).to_string()),
            object(payload)?,
        )])),
        _ => Err(DownlinkError::UnknownTopic),
    }
}

fn object(payload: &[u8]) -> Result<Map<String, Value>, DownlinkError> {
    if payload.len() > MAX_JSON {
        return Err(DownlinkError::TooLarge(payload.len()));
    }
    match serde_json::from_slice(payload) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(DownlinkError::Shape("the payload must be a JSON object")),
        Err(e) => Err(DownlinkError::Json(e.to_string())),
    }
}

/// Longest command id accepted: it is echoed in the reply's topic.
const MAX_ID: usize = 64;

/// A command id is echoed in the reply (and its topic): a number, or a
/// short string without wildcards or separators.
fn command_id(id: Value) -> Result<Value, DownlinkError> {
    match &id {
        Value::Null | Value::Number(_) => Ok(id),
        Value::String(s)
            if s.len() <= MAX_ID
                && !s.contains(['/', '+', '#'])
                && !s.chars().any(char::is_control) =>
        {
            Ok(id)
        }
        _ => Err(DownlinkError::Shape(
            "\"id\" must be a number or a short string",
        )),
    }
}

fn method(command: &Map<String, Value>) -> Result<String, DownlinkError> {
    match command.get("method") {
        Some(Value::String(m)) => Ok(m.clone()),
        _ => Err(DownlinkError::Shape("\"method\" must be a string")),
    }
}

fn frame(stream: &str, payload: &[u8]) -> Result<Downlink, DownlinkError> {
    if payload.len() > MAX_FRAME_TEXT {
        return Err(DownlinkError::TooLarge(payload.len()));
    }
    Ok(Downlink::Frame {
        stream: stream.to_string(),
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tc() -> Profile {
        Profile::ThingsCloud {
            access_token: String::new(),
            project_key: String::new(),
        }
    }

    fn generic_profile() -> Profile {
        Profile::Generic {
            username: None,
            password: None,
            topic_prefix: "fg/gw".into(),
        }
    }

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn thingscloud_topics() {
        let push = parse(&tc(), "attributes/push", br#"{"setpoint": 21.5}"#).unwrap();
        assert_eq!(
            push,
            Downlink::Push(vec![(Target::Own, map(json!({"setpoint": 21.5})))])
        );
        let sub = parse(
            &tc(),
            "gateway/attributes/push",
            br#"{"m-1": {"relay": true}}"#,
        )
        .unwrap();
        assert_eq!(
            sub,
            Downlink::Push(vec![(
                Target::Key("m-1".into()),
                map(json!({"relay": true}))
            )])
        );
        let second_shape = parse(
            &tc(),
            "gateway/attributes/push",
            br#"{"device": "m-1", "attributes": {"relay": true}}"#,
        )
        .unwrap();
        assert_eq!(second_shape, sub, "both shapes ask for the same");
        let cmd = parse(
            &tc(),
            "command/send/77",
            br#"{"method": "reset", "params": {}, "id": 77}"#,
        )
        .unwrap();
        assert_eq!(
            cmd,
            Downlink::Command {
                target: Target::Own,
                id: json!("77"),
                method: "reset".into()
            }
        );
        let gw = parse(
            &tc(),
            "gateway/command/send",
            br#"{"device": "m-1", "command": {"id": 5, "method": "reset", "params": {}}}"#,
        )
        .unwrap();
        assert_eq!(
            gw,
            Downlink::Command {
                target: Target::Key("m-1".into()),
                id: json!(5),
                method: "reset".into()
            }
        );
        let frame = parse(&tc(), "data/s1/set", &[1, 3]).unwrap();
        assert_eq!(
            frame,
            Downlink::Frame {
                stream: "s1".into(),
                payload: vec![1, 3]
            }
        );
    }

    #[test]
    fn generic_topics() {
        let p = generic_profile();
        assert_eq!(
            parse(&p, "fg/gw/meter/set", br#"{"a": 1}"#).unwrap(),
            Downlink::Push(vec![(Target::Device("meter".into()), map(json!({"a": 1})))])
        );
        assert_eq!(
            parse(&p, "fg/gw/command/9", br#"{"method": "go"}"#).unwrap(),
            Downlink::Command {
                target: Target::Any,
                id: json!("9"),
                method: "go".into()
            }
        );
        assert_eq!(
            parse(&p, "fg/gw/stream/s/set", b"01").unwrap(),
            Downlink::Frame {
                stream: "s".into(),
                payload: b"01".to_vec()
            }
        );
        assert_eq!(
            parse(&p, "other/meter/set", b"{}"),
            Err(DownlinkError::UnknownTopic)
        );
        assert_eq!(
            parse(&p, "fg/gw/command/9/reply", b"{}"),
            Err(DownlinkError::UnknownTopic)
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let long_id = format!("command/send/{}", "9".repeat(65));
        assert!(parse(&tc(), &long_id, br#"{"method": "m"}"#).is_err());
        assert!(parse(
            &tc(),
            "gateway/command/send",
            br#"{"device": "k", "command": {"id": {"a": [1,2,3]}, "method": "m"}}"#
        )
        .is_err());
        let bad: [(&str, &[u8]); 12] = [
            (
                "gateway/attributes/push",
                br#"{"device": "k", "attributes": 1}"#,
            ),
            ("gateway/attributes/push", br#"{"device": "k"}"#),
            (
                "gateway/attributes/push",
                br#"{"device": "k", "attributes": {}, "m-2": {"relay": true}}"#,
            ),
            ("attributes/push", b"{"),
            ("attributes/push", b"[1,2]"),
            ("attributes/push", b"\xff\xfe"),
            ("gateway/attributes/push", br#"{"k": 1}"#),
            ("command/send/1", br#"{"method": 5}"#),
            ("gateway/command/send", br#"{"device": 1, "command": {}}"#),
            ("gateway/command/send", br#"{"device": "k", "command": []}"#),
            ("command/send/", b"{}"),
            ("data//set", b"01"),
        ];
        for (topic, payload) in bad {
            assert!(parse(&tc(), topic, payload).is_err(), "{topic} {payload:?}");
        }
        let deep = "[".repeat(100_000);
        assert!(parse(&tc(), "attributes/push", deep.as_bytes()).is_err());
        let nested = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
        assert!(matches!(
            parse(&tc(), "attributes/push", nested.as_bytes()),
            Err(DownlinkError::Json(_))
        ));
        let huge = vec![b' '; MAX_JSON + 1];
        assert_eq!(
            parse(&tc(), "attributes/push", &huge),
            Err(DownlinkError::TooLarge(MAX_JSON + 1))
        );
    }
}
