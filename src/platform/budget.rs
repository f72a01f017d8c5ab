//! The platform budget (SPEC §4): how many messages per second the
//! configured polls produce once reports are combined the way the profile
//! combines them, against `max_publish_rate`. `check` prints it; the MQTT
//! task warns when, while connected, the backlog grows anyway.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::profile::COMBINED_MAX_BYTES;
use crate::config::{Config, Device, Profile};
use crate::text::count;

/// Messages per second needed against messages per second allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// Report messages per second the polls produce (at most: with
    /// `report = "change"` an unchanged device sends less).
    pub needed: f64,
    /// `max_publish_rate`; `None` = no cap.
    pub cap: Option<f64>,
    /// How `needed` was reached, for people: a line per kind of message.
    pub why: Vec<String>,
}

/// A device's reports per second.
fn rate(device: &Device) -> f64 {
    1.0 / device.poll.as_secs_f64().max(1e-3)
}

/// The fastest of `devices`, and how many of them there are.
fn fastest<'a>(devices: impl Iterator<Item = &'a Device>) -> (f64, usize) {
    devices.fold((0.0, 0), |(r, n), d| (r.max(rate(d)), n + 1))
}

/// Rough bytes of one report of `device` in a combined message.
fn report_bytes(device: &Device) -> usize {
    device
        .points
        .iter()
        .map(|p| p.name.len() + 16)
        .sum::<usize>()
        + 8
}

impl Budget {
    /// The budget of `config`; `None` without a `[platform]`.
    pub fn of(config: &Config) -> Option<Self> {
        let platform = config.platform.as_ref()?;
        let cap = platform.max_publish_rate.filter(|r| *r > 0.0);
        let (needed, why) = match platform.profile {
            Profile::ThingsCloud { .. } => {
                // One message per group can carry one report of every device
                // in it, so each group needs as many messages as its fastest
                // device polls (more when its reports overflow one message).
                let (own, owners) = fastest(config.devices.iter().filter(|d| d.key.is_none()));
                let (sub, subs) = fastest(config.devices.iter().filter(|d| d.key.is_some()));
                let sub_bytes: usize = config
                    .devices
                    .iter()
                    .filter(|d| d.key.is_some())
                    .map(report_bytes)
                    .sum();
                let split = sub_bytes.div_ceil(COMBINED_MAX_BYTES).max(1) as f64;
                let mut parts = Vec::new();
                if owners > 0 {
                    parts.push(format!(
                        "{} in one `attributes` message: {own:.2}/s, the fastest poll",
                        count(owners, "gateway device"),
                    ));
                }
                if subs > 0 {
                    parts.push(format!(
                        "{} in `gateway/attributes`: {:.2}/s, {}",
                        count(subs, "sub-device"),
                        sub * split,
                        if split > 1.0 {
                            format!("{split} messages per round of the fastest poll (64 KiB each)")
                        } else {
                            "the fastest poll".into()
                        }
                    ));
                }
                (own + sub * split, parts)
            }
            Profile::Generic { .. } => (
                config.devices.iter().map(rate).sum(),
                vec![format!(
                    "{}: one message per report",
                    count(config.devices.len(), "device")
                )],
            ),
        };
        Some(Self { needed, cap, why })
    }

    pub fn over(&self) -> bool {
        self.cap.is_some_and(|cap| self.needed > cap + 1e-9)
    }

    fn cap_text(&self) -> String {
        self.cap
            .map_or("no cap (max_publish_rate = 0)".into(), |c| {
                format!("max_publish_rate = {c}/s")
            })
    }

    /// The lines `check` prints.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "platform budget: up to {:.2} messages/s against {}\n",
            self.needed,
            self.cap_text()
        );
        for line in &self.why {
            out += &format!("  {line}\n");
        }
        out
    }

    /// What to change when [`Budget::over`].
    pub fn advice(&self) -> String {
        format!(
            "over budget: {:.2} messages/s against {}; the backlog would grow without end and readings arrive later and later. Poll less often, use report = \"change\", or raise max_publish_rate if the platform plan allows it",
            self.needed,
            self.cap_text()
        )
    }
}

/// How often the MQTT task looks at the backlog.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Growth over this long while connected is a backlog that cannot drain.
const GROWING_FOR: Duration = Duration::from_secs(20);
/// At most one warning this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Watches the backlog while connected (see [`Budget`]).
#[derive(Default)]
pub(super) struct BacklogWatch {
    /// (when, messages held, messages published so far), while connected.
    samples: VecDeque<(Instant, u64, u64)>,
    warned: Option<Instant>,
}

impl BacklogWatch {
    /// One sample; returns the warning to log when the backlog has grown
    /// at every sample for [`GROWING_FOR`] while connected.
    pub(super) fn sample(
        &mut self,
        now: Instant,
        connected: bool,
        held: u64,
        published: u64,
        budget: Option<&Budget>,
    ) -> Option<String> {
        if !connected {
            self.samples.clear();
            return None;
        }
        self.samples.push_back((now, held, published));
        while self
            .samples
            .get(1)
            .is_some_and(|(t, ..)| now.duration_since(*t) >= GROWING_FOR)
        {
            self.samples.pop_front();
        }
        let (since, first, first_published) = *self.samples.front()?;
        let span = now.duration_since(since);
        let growing = self
            .samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .all(|(a, b)| b.1 > a.1);
        if span < GROWING_FOR
            || !growing
            || self
                .warned
                .is_some_and(|w| now.duration_since(w) < WARN_EVERY)
        {
            return None;
        }
        self.warned = Some(now);
        let secs = span.as_secs_f64();
        let sent = published.saturating_sub(first_published) as f64 / secs;
        let grew = held.saturating_sub(first) as f64 / secs;
        let planned = budget.map_or(String::new(), |b| {
            format!(
                "; the configured polls produce up to {:.2} messages/s against {}",
                b.needed,
                b.cap_text()
            )
        });
        Some(format!(
            "the outbox grows while the platform is connected: {first} -> {held} messages in {secs:.0}s, about {:.2} readings/s produced and {sent:.2} messages/s published{planned}. It cannot catch up: poll less often, use report = \"change\", or raise max_publish_rate if the platform plan allows it (see `fieldgate check`)",
            grew + sent,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_backlog_growing_while_connected_is_reported_once_a_minute() {
        let mut watch = BacklogWatch::default();
        let mut warnings = Vec::new();
        let (mut held, mut published) = (0, 0);
        for step in 0..40 {
            let connected = step != 3;
            held += 20;
            published += 5;
            if let Some(w) = watch.sample(Instant::now(), connected, held, published, None) {
                warnings.push((step, w));
            }
            tokio::time::advance(SAMPLE_EVERY).await;
        }
        let steps: Vec<i32> = warnings.iter().map(|(s, _)| *s).collect();
        // Disconnected at step 3: growth counts again from step 4.
        assert_eq!(steps, [8, 20, 32], "{warnings:?}");
        assert!(
            warnings[0]
                .1
                .contains("about 5.00 readings/s produced and 1.00 messages/s published"),
            "{}",
            warnings[0].1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_or_steady_backlog_is_not() {
        let mut watch = BacklogWatch::default();
        for step in 0u64..40 {
            // Grows and shrinks: a burst the platform absorbs.
            let held = 100 + (step % 2) * 10;
            assert_eq!(watch.sample(Instant::now(), true, held, step, None), None);
            tokio::time::advance(SAMPLE_EVERY).await;
        }
    }
}
