//! ThingsCloud's answers to our reports, on `attributes/response` and
//! `gateway/attributes/response`: `{"result": 1}` when a report was taken,
//! otherwise `{"result": 0, "errcode": …, "message": "…"}`. A refusal is
//! logged once per change of that state, never once per message: a platform
//! that refuses every report would otherwise flood the journal.

use serde_json::Value;

use crate::text::clip;

/// What the platform last said on one response topic.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Taken,
    /// Refused, with the error code as text.
    Refused(String),
}

/// The last state per response topic.
#[derive(Default)]
pub(super) struct Responses {
    last: Vec<(String, State)>,
}

impl Responses {
    /// Takes an answer on `topic` (one of
    /// [`super::profile::RESPONSE_TOPICS`]) and logs a change.
    pub(super) fn handle(&mut self, topic: &str, payload: &[u8]) {
        let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(payload) else {
            log::debug!(target: "platform", "{topic}: not a JSON object ({} bytes), ignored", payload.len());
            return;
        };
        // Network text, bounded and escaped: a string as it is, anything
        // else as its JSON.
        let text = |key| match answer.get(key) {
            Some(Value::String(s)) => clip(s),
            Some(Value::Null) | None => String::new(),
            Some(other) => clip(&other.to_string()),
        };
        let state = match answer.get("result").and_then(Value::as_i64) {
            Some(1) => State::Taken,
            _ => State::Refused(text("errcode")),
        };
        let previous = match self.last.iter_mut().find(|(t, _)| t == topic) {
            Some((_, last)) => Some(std::mem::replace(last, state.clone())),
            None => {
                self.last.push((topic.to_string(), state.clone()));
                None
            }
        };
        if previous.as_ref() == Some(&state) {
            return;
        }
        match &state {
            State::Taken if previous.is_some() => {
                log::info!(target: "platform", "{topic}: the platform takes reports again")
            }
            State::Taken => {}
            State::Refused(code) => {
                let hint = if code == "413" {
                    ": the message was too large for the platform; fewer points per device or fewer sub-devices polled at the same moment make smaller reports"
                } else {
                    ""
                };
                log::warn!(
                    target: "platform",
                    "{topic}: the platform refused a report (result {}, errcode {}, message \"{}\"){hint}; logged again only when this changes",
                    text("result"),
                    if code.is_empty() { "none" } else { code },
                    text("message"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_a_state_change_not_a_log_line_per_message() {
        let mut r = Responses::default();
        let topic = "gateway/attributes/response";
        r.handle(topic, br#"{"result": 1}"#);
        assert!(r.last[0].1 == State::Taken);
        r.handle(
            topic,
            br#"{"result": 0, "errcode": 413, "message": "too large"}"#,
        );
        assert_eq!(r.last[0].1, State::Refused("413".into()));
        r.handle(topic, br#"{"result": 0, "errcode": "413"}"#);
        assert_eq!(r.last.len(), 1);
        r.handle("attributes/response", b"not json");
        assert_eq!(r.last.len(), 1, "garbage changes nothing");
        r.handle("attributes/response", br#"{"result": 0}"#);
        assert_eq!(r.last[1].1, State::Refused(String::new()));
    }
}
