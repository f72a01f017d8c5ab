//! Platform profiles: how readings become MQTT topics and payloads
//! (ThingsCloud, SPEC §5; any broker, SPEC §6).

use std::time::UNIX_EPOCH;

use serde_json::json;

use crate::config::Profile;
use crate::poll::Reading;

/// One MQTT publication.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Milliseconds since the Unix epoch of a reading's sample time.
pub fn epoch_ms(reading: &Reading) -> u64 {
    reading
        .taken
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The uplink message for one reading.
pub fn attributes(profile: &Profile, reading: &Reading) -> Message {
    let (topic, payload) = match (profile, &reading.key) {
        (Profile::ThingsCloud { .. }, None) => ("attributes".to_string(), json!(reading.values)),
        (Profile::ThingsCloud { .. }, Some(key)) => (
            "gateway/attributes".to_string(),
            json!({ key.as_str(): reading.values }),
        ),
        (Profile::Generic { topic_prefix, .. }, _) => (
            format!("{topic_prefix}/{}/attributes", reading.device),
            json!({ "ts": epoch_ms(reading), "values": reading.values }),
        ),
    };
    Message {
        topic,
        payload: payload.to_string().into_bytes(),
        retain: false,
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
    use std::time::{Duration, SystemTime};

    fn reading(key: Option<&str>) -> Reading {
        let mut values = serde_json::Map::new();
        values.insert("voltage".into(), json!(229.6));
        values.insert("relay1".into(), json!(true));
        Reading {
            device: "meter-a".into(),
            key: key.map(Into::into),
            taken: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            values,
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
        let m = attributes(&tc(), &reading(None));
        assert_eq!(m.topic, "attributes");
        assert_eq!(m.payload, br#"{"voltage":229.6,"relay1":true}"#);
        let m = attributes(&tc(), &reading(Some("meter-a-001")));
        assert_eq!(m.topic, "gateway/attributes");
        assert_eq!(
            m.payload,
            br#"{"meter-a-001":{"voltage":229.6,"relay1":true}}"#
        );
        assert_eq!(status_topic(&tc()), None);
    }

    #[test]
    fn generic_topics_carry_the_sample_time() {
        let p = Profile::Generic {
            username: None,
            password: None,
            topic_prefix: "fieldgate/gw".into(),
        };
        let m = attributes(&p, &reading(Some("ignored")));
        assert_eq!(m.topic, "fieldgate/gw/meter-a/attributes");
        assert_eq!(
            m.payload,
            br#"{"ts":1700000000123,"values":{"voltage":229.6,"relay1":true}}"#
        );
        assert_eq!(status_topic(&p).as_deref(), Some("fieldgate/gw/status"));
    }
}
