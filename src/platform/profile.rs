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

/// Which ThingsCloud message a report can share.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    /// The gateway's own devices: `attributes`.
    Own,
    /// Sub-devices: `gateway/attributes`.
    Sub,
}

/// A report that may share a message with others (ThingsCloud attributes):
/// its group, the platform device it belongs to (device name or key) and
/// its values.
fn combinable<'a>(
    profile: &Profile,
    record: &'a Record,
) -> Option<(
    Group,
    &'a str,
    &'a serde_json::Map<String, serde_json::Value>,
)> {
    match (profile, &record.body) {
        (
            Profile::ThingsCloud { .. },
            Body::Attributes {
                device,
                key,
                values,
            },
        ) => Some(match key {
            Some(key) => (Group::Sub, key.as_str(), values),
            None => (Group::Own, device.as_str(), values),
        }),
        _ => None,
    }
}

/// How many of `records` (oldest first, at least one) go into the next
/// message: consecutive reports of one group (the gateway's own devices,
/// or sub-devices), each of a different device, up to
/// [`COMBINED_MAX_BYTES`]. Two samples of one device are never merged.
pub fn batch_len<'a>(profile: &Profile, records: impl IntoIterator<Item = &'a Record>) -> usize {
    let mut devices = std::collections::HashSet::new();
    let mut group = None;
    let mut bytes = 2;
    let mut n = 0;
    for record in records {
        let Some((g, device, values)) = combinable(profile, record) else {
            return n.max(1);
        };
        let size = device.len() + 4 + serde_json::to_vec(values).map_or(0, |v| v.len());
        if *group.get_or_insert(g) != g
            || !devices.insert(device)
            || (n > 0 && bytes + size > COMBINED_MAX_BYTES)
        {
            break;
        }
        bytes += size;
        n += 1;
    }
    n
}

/// The message for `records`, which [`batch_len`] chose to go together;
/// `None` when the profile has no message for them (presence on the
/// generic profile, which has `device_offline`/`device_online` events).
pub fn message(profile: &Profile, records: &[Record]) -> Option<Message> {
    let first = records.first()?;
    let generic = match profile {
        Profile::Generic { topic_prefix, .. } => Some(topic_prefix.as_str()),
        Profile::ThingsCloud { .. } => None,
    };
    let (topic, payload) = match (&first.body, generic) {
        (Body::Attributes { key, .. }, None) => {
            let reports = records.iter().filter_map(|r| combinable(profile, r));
            match key {
                // Attribute names are unique across the gateway's own
                // devices (a config rule), so their values merge.
                None => (
                    "attributes".to_string(),
                    json!(reports
                        .flat_map(|(_, _, values)| values.clone())
                        .collect::<serde_json::Map<_, _>>()),
                ),
                Some(_) => (
                    "gateway/attributes".to_string(),
                    json!(reports
                        .map(|(_, key, values)| (key.to_string(), json!(values)))
                        .collect::<serde_json::Map<_, _>>()),
                ),
            }
        }
        (Body::Attributes { device, values, .. }, Some(prefix)) => (
            format!("{prefix}/{device}/attributes"),
            json!({ "ts": first.taken_ms, "values": values }),
        ),
        (Body::Presence { key, online }, None) => return Some(presence(key, *online)),
        (Body::Presence { .. }, Some(_)) | (Body::Stats { .. }, None) => return None,
        (Body::Stats { status }, Some(prefix)) => (format!("{prefix}/stats"), json!(status)),
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
            return Some(Message {
                topic,
                payload: payload.clone(),
                retain: false,
            });
        }
    };
    Some(Message {
        topic,
        payload: payload.to_string().into_bytes(),
        retain: false,
    })
}

/// A sub-device's `gateway/connect` or `gateway/disconnect`.
pub fn presence(key: &str, online: bool) -> Message {
    let topic = if online {
        "gateway/connect"
    } else {
        "gateway/disconnect"
    };
    Message {
        topic: topic.into(),
        payload: json!({ "device": key }).to_string().into_bytes(),
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

/// ThingsCloud's acknowledgements of `attributes` and `gateway/attributes`.
pub const RESPONSE_TOPICS: [&str; 2] = ["attributes/response", "gateway/attributes/response"];

/// The topics the gateway subscribes to for downlink (SPEC §5, §6).
pub fn downlink_topics(profile: &Profile) -> Vec<String> {
    match profile {
        Profile::ThingsCloud { .. } => [
            "attributes/push",
            "gateway/attributes/push",
            "command/send/+",
            "gateway/command/send",
            "data/+/set",
            RESPONSE_TOPICS[0],
            RESPONSE_TOPICS[1],
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
        own("meter-a", "voltage", key, v)
    }

    fn own(device: &str, point: &str, key: Option<&str>, v: f64) -> Record {
        let mut values = serde_json::Map::new();
        values.insert(point.into(), json!(v));
        if point == "voltage" {
            values.insert("relay1".into(), json!(true));
        }
        Record {
            taken_ms: 1_700_000_000_123,
            body: Body::Attributes {
                device: device.into(),
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
        let m = message(&tc(), &[record(None, 229.6)]).expect("a message");
        assert_eq!(m.topic, "attributes");
        assert_eq!(m.payload, br#"{"voltage":229.6,"relay1":true}"#);
        let m = message(&tc(), &[record(Some("meter-a-001"), 229.6)]).expect("a message");
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
        let m = message(&tc(), &records[..2]).expect("a message");
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
    fn own_devices_waiting_together_share_one_attributes_message() {
        let records = [
            own("meter", "kwh", None, 1.0),
            own("pump", "rpm", None, 2.0),
            own("meter", "kwh", None, 3.0), // a second sample of "meter"
            own("sensor", "temp", Some("s-1"), 4.0),
        ];
        assert_eq!(batch_len(&tc(), &records), 2);
        let m = message(&tc(), &records[..2]).expect("a message");
        assert_eq!(m.topic, "attributes");
        assert_eq!(m.payload, br#"{"kwh":1.0,"rpm":2.0}"#);
        // The gateway's own and a sub-device's reports use different topics.
        assert_eq!(batch_len(&tc(), &records[2..]), 1);
    }

    #[test]
    fn presence_is_a_thingscloud_message_only() {
        let up = Record::now(Body::Presence {
            key: "s-1".into(),
            online: true,
        });
        let down = Record::now(Body::Presence {
            key: "s-1".into(),
            online: false,
        });
        assert_eq!(batch_len(&tc(), [&up, &down]), 1);
        let m = message(&tc(), std::slice::from_ref(&up)).expect("a message");
        assert_eq!(
            (m.topic.as_str(), m.payload),
            ("gateway/connect", br#"{"device":"s-1"}"#.to_vec())
        );
        let m = message(&tc(), &[down]).expect("a message");
        assert_eq!(m.topic, "gateway/disconnect");
        let generic = Profile::Generic {
            username: None,
            password: None,
            topic_prefix: "p".into(),
        };
        assert_eq!(message(&generic, &[up]), None);
    }

    #[test]
    fn combined_messages_stay_under_the_payload_limit() {
        let big: Vec<Record> = (0..2000)
            .map(|i| record(Some(&format!("sub-device-{i}")), f64::from(i)))
            .collect();
        let n = batch_len(&tc(), &big);
        assert!(n > 100 && n < 2000, "{n}");
        assert!(message(&tc(), &big[..n]).expect("a message").payload.len() <= COMBINED_MAX_BYTES);
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
        let m = message(&p, &records[..1]).expect("a message");
        assert_eq!(m.topic, "fieldgate/gw/meter-a/attributes");
        assert_eq!(
            m.payload,
            br#"{"ts":1700000000123,"values":{"voltage":229.6,"relay1":true}}"#
        );
        assert_eq!(status_topic(&p).as_deref(), Some("fieldgate/gw/status"));
    }
}
