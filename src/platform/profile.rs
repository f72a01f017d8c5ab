//! Platform profiles: how readings become MQTT topics and payloads
//! (ThingsCloud, SPEC §5; any broker, SPEC §6).

use serde_json::json;

use crate::config::Profile;
use crate::record::{Body, Record};

/// One MQTT publication.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Payload limit of one combined `gateway/attributes` message.
pub const COMBINED_MAX_BYTES: usize = 64 * 1024;

/// The sub-device key of a record that may share a message with others
/// (ThingsCloud sub-device attributes only).
fn combinable<'a>(
    profile: &Profile,
    record: &'a Record,
) -> Option<(&'a str, &'a serde_json::Map<String, serde_json::Value>)> {
    match (profile, &record.body) {
        (
            Profile::ThingsCloud { .. },
            Body::Attributes {
                key: Some(key),
                values,
                ..
            },
        ) => Some((key, values)),
        _ => None,
    }
}

/// How many of `records` (oldest first, at least one) go into the next
/// message: consecutive sub-device reports of distinct keys, up to
/// [`COMBINED_MAX_BYTES`]. Two samples of one device are never merged.
pub fn batch_len<'a>(profile: &Profile, records: impl IntoIterator<Item = &'a Record>) -> usize {
    let mut keys = std::collections::HashSet::new();
    let mut bytes = 2;
    let mut n = 0;
    for record in records {
        let Some((key, values)) = combinable(profile, record) else {
            return n.max(1);
        };
        let size = key.len() + 4 + serde_json::to_vec(values).map_or(0, |v| v.len());
        if !keys.insert(key) || (n > 0 && bytes + size > COMBINED_MAX_BYTES) {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

/// The message for `records`, which [`batch_len`] chose to go together.
pub fn message(profile: &Profile, records: &[Record]) -> Message {
    let Some(first) = records.first() else {
        return Message {
            topic: String::new(),
            payload: Vec::new(),
            retain: false,
        };
    };
    let generic = match profile {
        Profile::Generic { topic_prefix, .. } => Some(topic_prefix.as_str()),
        Profile::ThingsCloud { .. } => None,
    };
    let (topic, payload) = match (&first.body, generic) {
        (Body::Attributes { values, key, .. }, None) => match key {
            None => ("attributes".to_string(), json!(values)),
            Some(_) => {
                let combined: serde_json::Map<String, serde_json::Value> = records
                    .iter()
                    .filter_map(|r| combinable(profile, r))
                    .map(|(key, values)| (key.to_string(), json!(values)))
                    .collect();
                ("gateway/attributes".to_string(), json!(combined))
            }
        },
        (Body::Attributes { device, values, .. }, Some(prefix)) => (
            format!("{prefix}/{device}/attributes"),
            json!({ "ts": first.taken_ms, "values": values }),
        ),
        (Body::Event { id, method, params }, None) => (
            format!("event/report/{id}"),
            json!({ "method": method, "params": params }),
        ),
        (Body::Event { method, params, .. }, Some(prefix)) => (
            format!("{prefix}/event"),
            json!({ "ts": first.taken_ms, "method": method, "params": params }),
        ),
        (
            Body::Reply {
                key: Some(key),
                id,
                method,
                params,
            },
            None,
        ) => (
            "gateway/command/reply".to_string(),
            json!({ "device": key, "command": { "id": id, "method": method, "params": params } }),
        ),
        (
            Body::Reply {
                id, method, params, ..
            },
            prefix,
        ) => (
            match prefix {
                None => format!("command/reply/{}", id_text(id)),
                Some(prefix) => format!("{prefix}/command/{}/reply", id_text(id)),
            },
            json!({ "method": method, "params": params }),
        ),
        (Body::Stream { name, payload }, prefix) => {
            let topic = match prefix {
                None => format!("data/{name}"),
                Some(prefix) => format!("{prefix}/stream/{name}"),
            };
            return Message {
                topic,
                payload: payload.clone(),
                retain: false,
            };
        }
    };
    Message {
        topic,
        payload: payload.to_string().into_bytes(),
        retain: false,
    }
}

/// A command id as it appears in a topic: strings bare, numbers as written.
fn id_text(id: &serde_json::Value) -> String {
    match id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The topics the gateway subscribes to for downlink (SPEC §5, §6).
pub fn downlink_topics(profile: &Profile) -> Vec<String> {
    match profile {
        Profile::ThingsCloud { .. } => [
            "attributes/push",
            "gateway/attributes/push",
            "command/send/+",
            "gateway/command/send",
            "data/+/set",
        ]
        .map(String::from)
        .to_vec(),
        Profile::Generic { topic_prefix, .. } => ["+/set", "command/+", "stream/+/set"]
            .map(|t| format!("{topic_prefix}/{t}"))
            .to_vec(),
    }
}

/// The retained presence topic of the generic profile (`online`/`offline`,
/// with `offline` as the last will). ThingsCloud tracks presence itself.
pub fn status_topic(profile: &Profile) -> Option<String> {
    match profile {
        Profile::ThingsCloud { .. } => None,
        Profile::Generic { topic_prefix, .. } => Some(format!("{topic_prefix}/status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: Option<&str>, v: f64) -> Record {
        let mut values = serde_json::Map::new();
        values.insert("voltage".into(), json!(v));
        values.insert("relay1".into(), json!(true));
        Record {
            taken_ms: 1_700_000_000_123,
            body: Body::Attributes {
                device: "meter-a".into(),
                key: key.map(Into::into),
                values,
            },
        }
    }

    fn tc() -> Profile {
        Profile::ThingsCloud {
            access_token: "t".into(),
            project_key: "k".into(),
        }
    }

    #[test]
    fn thingscloud_topics_and_payloads() {
        let m = message(&tc(), &[record(None, 229.6)]);
        assert_eq!(m.topic, "attributes");
        assert_eq!(m.payload, br#"{"voltage":229.6,"relay1":true}"#);
        let m = message(&tc(), &[record(Some("meter-a-001"), 229.6)]);
        assert_eq!(m.topic, "gateway/attributes");
        assert_eq!(
            m.payload,
            br#"{"meter-a-001":{"voltage":229.6,"relay1":true}}"#
        );
        assert_eq!(status_topic(&tc()), None);
    }

    #[test]
    fn sub_devices_waiting_together_share_one_message() {
        let records = [
            record(Some("a"), 1.0),
            record(Some("b"), 2.0),
            record(Some("a"), 3.0), // a second sample of "a": next message
            record(Some("c"), 4.0),
        ];
        assert_eq!(batch_len(&tc(), &records), 2);
        let m = message(&tc(), &records[..2]);
        assert_eq!(
            m.payload,
            br#"{"a":{"voltage":1.0,"relay1":true},"b":{"voltage":2.0,"relay1":true}}"#
        );
        assert_eq!(batch_len(&tc(), &records[2..]), 2);
        // The gateway's own report is never merged with sub-devices.
        assert_eq!(
            batch_len(&tc(), &[record(None, 1.0), record(Some("a"), 1.0)]),
            1
        );
        assert_eq!(
            batch_len(&tc(), &[record(Some("a"), 1.0), record(None, 1.0)]),
            1
        );
    }

    #[test]
    fn combined_messages_stay_under_the_payload_limit() {
        let big: Vec<Record> = (0..2000)
            .map(|i| record(Some(&format!("sub-device-{i}")), f64::from(i)))
            .collect();
        let n = batch_len(&tc(), &big);
        assert!(n > 100 && n < 2000, "{n}");
        assert!(message(&tc(), &big[..n]).payload.len() <= COMBINED_MAX_BYTES);
    }

    #[test]
    fn generic_topics_carry_the_sample_time() {
        let p = Profile::Generic {
            username: None,
            password: None,
            topic_prefix: "fieldgate/gw".into(),
        };
        let records = [record(Some("ignored"), 229.6), record(Some("other"), 1.0)];
        assert_eq!(batch_len(&p, &records), 1);
        let m = message(&p, &records[..1]);
        assert_eq!(m.topic, "fieldgate/gw/meter-a/attributes");
        assert_eq!(
            m.payload,
            br#"{"ts":1700000000123,"values":{"voltage":229.6,"relay1":true}}"#
        );
        assert_eq!(status_topic(&p).as_deref(), Some("fieldgate/gw/status"));
    }
}
