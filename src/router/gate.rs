//! Keeps what the downlink costs the uplink to a small share of the publish
//! budget. A platform that meters messages (ThingsCloud drains about one a
//! second) must not see its live readings delayed behind answers to a flood
//! of bad requests. Two token buckets, both sized from `max_publish_rate`:
//!
//! - rejections (`write_rejected`, `frame_rejected`, "bus busy", replies to
//!   unknown methods) get at most 10 % of it: past that they are counted per
//!   event method, and the next one that goes out (or a summary on the
//!   router's timer) carries `"repeated": <count>`;
//! - accepted downlink work (writes, commands, frames), whose outcomes and
//!   read-backs are always published, is admitted at up to 20 % of it.
//!
//! Both allow a burst of ten seconds' worth of the publish rate (at least
//! one, at most [`BURST`]), so a person trying things never notices.

use std::collections::BTreeMap;

use serde_json::Value;
use tokio::time::Instant;

use crate::record::{Body, Record};

/// The most requests (or rejections) allowed at once before the rate applies.
pub(super) const BURST: f64 = 10.0;
/// Shares of the publish rate.
const REJECTION_SHARE: f64 = 0.1;
const ADMISSION_SHARE: f64 = 0.2;
/// Without a publish cap: rejections per second.
const UNCAPPED_REJECTIONS: f64 = 10.0;

struct Bucket {
    tokens: f64,
    burst: f64,
    /// Tokens per second; `None`: unlimited.
    rate: Option<f64>,
    at: Instant,
}

impl Bucket {
    fn new(rate: Option<f64>, burst: f64) -> Self {
        Self {
            tokens: burst,
            burst,
            rate,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The router's budget for downlink feedback.
pub(super) struct Gate {
    rejections: Bucket,
    admissions: Bucket,
    /// Suppressed rejection events by method: how many, and the latest.
    suppressed: BTreeMap<String, (u64, Record)>,
    /// Suppressed replies (unknown methods …): counted and logged only,
    /// since a reply belongs to one command id.
    replies_suppressed: u64,
}

impl Gate {
    /// A gate for a platform that accepts `max_publish_rate` messages per
    /// second (`None`: no cap).
    pub(super) fn new(max_publish_rate: Option<f64>) -> Self {
        let burst = max_publish_rate.map_or(BURST, |r| (r * 10.0).clamp(1.0, BURST));
        Self {
            rejections: Bucket::new(
                Some(max_publish_rate.map_or(UNCAPPED_REJECTIONS, |r| r * REJECTION_SHARE)),
                burst,
            ),
            admissions: Bucket::new(max_publish_rate.map(|r| r * ADMISSION_SHARE), burst),
            suppressed: BTreeMap::new(),
            replies_suppressed: 0,
        }
    }

    /// Whether one more piece of downlink work may be accepted now.
    pub(super) fn admit(&mut self) -> bool {
        self.admissions.take()
    }

    /// A rejection to tell the platform: the record to publish now, or
    /// `None` when over budget (it is counted and merged).
    pub(super) fn reject(&mut self, record: Record) -> Option<Record> {
        let method = match &record.body {
            Body::Event { method, .. } => Some(method.clone()),
            _ => None,
        };
        if self.rejections.take() {
            return Some(match method {
                Some(method) => match self.suppressed.remove(&method) {
                    Some((count, _)) => with_repeated(record, count),
                    None => record,
                },
                None => record,
            });
        }
        match method {
            Some(method) => {
                let entry = self.suppressed.entry(method).or_insert((0, record.clone()));
                entry.0 += 1;
                entry.1 = record;
            }
            None => {
                self.replies_suppressed += 1;
                if self.replies_suppressed.is_power_of_two() {
                    log::warn!(target: "router", "too many rejected commands: {} replies not sent so far (rate-limited)", self.replies_suppressed);
                }
            }
        }
        None
    }

    /// Merged records for suppressed rejections, as the budget allows.
    pub(super) fn summaries(&mut self) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some((method, _)) = self.suppressed.first_key_value() {
            let method = method.clone();
            if !self.rejections.take() {
                break;
            }
            if let Some((count, record)) = self.suppressed.remove(&method) {
                // The latest of them is the one shown; it counts itself.
                out.push(with_repeated(record, count.saturating_sub(1)));
            }
        }
        out
    }
}

/// `record` with `"repeated": count` (rejections like it not sent on their own).
fn with_repeated(mut record: Record, count: u64) -> Record {
    if let Body::Event { params, .. } = &mut record.body {
        if count > 0 {
            params.insert("repeated".into(), Value::from(count));
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn rejected(n: u64) -> Record {
        Record::event(
            "write_rejected",
            json!({ "attribute": format!("a{n}"), "reason": "unknown attribute" }),
        )
    }

    fn repeated(record: &Record) -> Option<u64> {
        match &record.body {
            Body::Event { params, .. } => params.get("repeated").and_then(Value::as_u64),
            _ => None,
        }
    }

    /// Defect 10: two bad pushes a second for an hour against ThingsCloud's
    /// one message a second cost at most a tenth of the budget, and nothing
    /// of them is lost from view: the count is carried.
    #[tokio::test(start_paused = true)]
    async fn a_flood_of_rejections_takes_a_tenth_of_the_budget() {
        let mut gate = Gate::new(Some(1.0));
        let mut published = Vec::new();
        let hour = 3600;
        for i in 0..2 * hour {
            published.extend(gate.reject(rejected(i)));
            if i % 20 == 0 {
                published.extend(gate.summaries());
            }
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        published.extend(gate.summaries());
        let n = published.len() as u64;
        assert!(n <= 10 + hour / 10 + 1, "{n} records in an hour");
        let told: u64 = published.iter().map(|r| 1 + repeated(r).unwrap_or(0)).sum();
        assert!(
            told >= 2 * hour - 20,
            "{told} of {} rejections accounted for",
            2 * hour
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_few_rejections_go_out_at_once_and_work_is_admitted_in_bursts() {
        let mut gate = Gate::new(Some(1.0));
        for i in 0..10 {
            assert!(gate.reject(rejected(i)).is_some());
        }
        assert!(gate.reject(rejected(11)).is_none());
        tokio::time::advance(Duration::from_secs(10)).await;
        let next = gate.reject(rejected(12)).unwrap();
        assert_eq!(repeated(&next), Some(1));
        let admitted = (0..30).filter(|_| gate.admit()).count();
        assert_eq!(admitted, 10);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(gate.admit(), "one more after 5 s at 0.2/s");
        let mut uncapped = Gate::new(None);
        assert!((0..1000).all(|_| uncapped.admit()));
    }
}
