//! Alarms (SPEC §3 `alarm`, §5 `alarm_raised` / `alarm_cleared`): evaluated
//! on every poll of a point, whether or not the reading is reported. A
//! number outside its band, or a bool equal to `when`, must stay so for
//! `after` before the alarm is raised, so a short spike raises nothing; a
//! raised number alarm clears only once the value is back inside the band
//! by `hysteresis`, so a value hovering at the limit does not chatter. A
//! failed read changes nothing.

use serde_json::{json, Value as Json};
use tokio::time::Instant;

use crate::codec::Value;
use crate::config::Alarm;

/// Which side of the band a number alarm is on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Side {
    Above,
    Below,
    /// A bool alarm.
    When,
}

/// One point's alarm state between polls.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) enum State {
    #[default]
    Normal,
    /// Outside since then, not yet for `after`.
    Pending(Side, Instant),
    Raised(Side),
}

/// What an evaluation changed.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Transition {
    /// `alarm_raised`, with the limit crossed (none for a bool).
    Raised(Option<f64>),
    /// `alarm_cleared`, with the limit it had crossed.
    Cleared(Option<f64>),
}

impl Transition {
    /// The event's method and params (`device`/`key` are added by the caller).
    pub(super) fn event(&self, point: &str, value: Json) -> (&'static str, Json) {
        let (method, limit) = match self {
            Transition::Raised(limit) => ("alarm_raised", limit),
            Transition::Cleared(limit) => ("alarm_cleared", limit),
        };
        let mut params = json!({ "point": point, "value": value });
        if let Some(limit) = limit {
            params["limit"] = json!(limit);
        }
        (method, params)
    }
}

impl State {
    /// Takes the value read at `now`.
    pub(super) fn evaluate(
        &mut self,
        alarm: &Alarm,
        value: &Value,
        now: Instant,
    ) -> Option<Transition> {
        let (outside, after) = match alarm {
            Alarm::Range {
                above,
                below,
                after,
                ..
            } => {
                let v = value.as_f64()?;
                let side = if above.is_some_and(|a| v > a) {
                    Some(Side::Above)
                } else if below.is_some_and(|b| v < b) {
                    Some(Side::Below)
                } else {
                    None
                };
                (side, *after)
            }
            Alarm::When { when, after } => match value {
                Value::Bool(b) => ((b == when).then_some(Side::When), *after),
                _ => return None,
            },
        };
        match (self.clone(), outside) {
            (State::Raised(side), _) => {
                if cleared(alarm, side, value) {
                    *self = State::Normal;
                    return Some(Transition::Cleared(limit(alarm, side)));
                }
                None
            }
            (_, None) => {
                *self = State::Normal;
                None
            }
            (State::Pending(side, since), Some(now_side)) if side == now_side => {
                if now.duration_since(since) >= after {
                    *self = State::Raised(side);
                    return Some(Transition::Raised(limit(alarm, side)));
                }
                None
            }
            (_, Some(side)) => {
                if after.is_zero() {
                    *self = State::Raised(side);
                    return Some(Transition::Raised(limit(alarm, side)));
                }
                *self = State::Pending(side, now);
                None
            }
        }
    }
}

/// The threshold of `side`.
fn limit(alarm: &Alarm, side: Side) -> Option<f64> {
    match (alarm, side) {
        (Alarm::Range { above, .. }, Side::Above) => *above,
        (Alarm::Range { below, .. }, Side::Below) => *below,
        _ => None,
    }
}

/// Whether a raised alarm on `side` clears with `value`.
fn cleared(alarm: &Alarm, side: Side, value: &Value) -> bool {
    match alarm {
        Alarm::Range {
            above,
            below,
            hysteresis,
            ..
        } => {
            let Some(v) = value.as_f64() else {
                return false;
            };
            match side {
                Side::Above => above.is_some_and(|a| v <= a - hysteresis),
                Side::Below => below.is_some_and(|b| v >= b + hysteresis),
                Side::When => false,
            }
        }
        Alarm::When { when, .. } => matches!(value, Value::Bool(b) if b != when),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn band(after: u64) -> Alarm {
        Alarm::Range {
            above: Some(250.0),
            below: Some(190.0),
            hysteresis: 2.0,
            after: Duration::from_secs(after),
        }
    }

    /// Feeds `values` one second apart; the transitions, by index.
    fn run(alarm: &Alarm, values: &[Value]) -> Vec<(usize, Transition)> {
        let start = Instant::now();
        let mut state = State::default();
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let at = start + Duration::from_secs(i as u64);
                state.evaluate(alarm, v, at).map(|t| (i, t))
            })
            .collect()
    }

    fn f(values: &[f64]) -> Vec<Value> {
        values.iter().map(|v| Value::Float(*v)).collect()
    }

    #[test]
    fn a_short_spike_raises_nothing() {
        assert_eq!(
            run(&band(10), &f(&[230.0, 260.0, 230.0, 260.0, 230.0])),
            vec![]
        );
    }

    #[test]
    fn outside_for_after_raises_once_and_hysteresis_clears() {
        let values = f(&[
            230.0, 251.0, 255.0, 252.0, 251.0, 249.0, 248.5, 247.9, 260.0,
        ]);
        assert_eq!(
            run(&band(2), &values),
            vec![
                (3, Transition::Raised(Some(250.0))),
                // 249 and 248.5 are inside, but not by the 2.0 hysteresis.
                (7, Transition::Cleared(Some(250.0))),
            ]
        );
    }

    #[test]
    fn below_and_zero_after() {
        let values = f(&[200.0, 180.0, 191.0, 192.0]);
        assert_eq!(
            run(&band(0), &values),
            vec![
                (1, Transition::Raised(Some(190.0))),
                (3, Transition::Cleared(Some(190.0))),
            ]
        );
    }

    #[test]
    fn a_bool_alarm_follows_when() {
        let alarm = Alarm::When {
            when: true,
            after: Duration::ZERO,
        };
        let values: Vec<Value> = [false, true, true, false].map(Value::Bool).to_vec();
        assert_eq!(
            run(&alarm, &values),
            vec![
                (1, Transition::Raised(None)),
                (3, Transition::Cleared(None))
            ]
        );
    }
}
