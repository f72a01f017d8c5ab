//! What a bus owner remembers about each of its devices between polls: the
//! read plan, failures and the offline state (logged and reported once per
//! change), and the report policy (`always`, or `change` with deadband and
//! heartbeat).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::alarm;
use super::plan::{self, Block};
use super::task::DeviceStatus;
use super::{backoff_interval, PointRead, PollResult};
use crate::codec::Value;
use crate::config::{Device, Report};
use crate::modbus::{ExceptionCode, TxError};
use crate::record::{ms_since_epoch, Body, Reading, Record};

/// What the poller remembers about one device between polls.
pub(super) struct DeviceState {
    pub(super) device: Device,
    /// The blocks of every poll interval.
    pub(super) blocks: Vec<Block>,
    /// The interval (index into `intervals`) each block belongs to.
    block_interval: Vec<usize>,
    /// Each poll interval and when it is next due.
    intervals: Vec<(Duration, Instant)>,
    /// Whether adjoining blocks due together are read as one request;
    /// off once the slave refused such a request.
    join: bool,
    /// The earliest of `intervals`.
    pub(super) next_due: Instant,
    /// Consecutive polls in which no block could be read.
    failures: u32,
    /// Last logged state per block, so errors are logged once per change.
    block_state: Vec<Option<String>>,
    pub(super) offline: Option<String>,
    /// Whether any poll was made yet, and when the device last answered.
    polled: bool,
    last_ok: Option<SystemTime>,
    /// Last value reported per point (report = "change").
    reported: HashMap<usize, Value>,
    last_full: Option<Instant>,
    /// The last good read of each point, by point index.
    last: Vec<Option<PointRead>>,
    /// Alarm state by point index (points without `alarm` stay normal).
    alarms: Vec<alarm::State>,
}

impl DeviceState {
    pub(super) fn new(device: Device, schedule: Vec<plan::Interval>, start: Instant) -> Self {
        let mut blocks = Vec::new();
        let mut block_interval = Vec::new();
        let mut intervals = Vec::new();
        for (i, interval) in schedule.into_iter().enumerate() {
            block_interval.extend(std::iter::repeat_n(i, interval.blocks.len()));
            blocks.extend(interval.blocks);
            intervals.push((interval.every, start));
        }
        Self {
            last: vec![None; device.points.len()],
            alarms: vec![alarm::State::default(); device.points.len()],
            block_state: vec![None; blocks.len()],
            device,
            blocks,
            block_interval,
            intervals,
            join: true,
            next_due: start,
            failures: 0,
            offline: None,
            polled: false,
            last_ok: None,
            reported: HashMap::new(),
            last_full: None,
        }
    }

    /// What a poll starting `now` reads: the blocks of the intervals due,
    /// adjoining ones joined into one request.
    pub(super) fn due(&self, now: Instant) -> Due {
        let intervals: Vec<usize> = (0..self.intervals.len())
            .filter(|&i| self.intervals[i].1 <= now)
            .collect();
        let index: Vec<usize> = (0..self.blocks.len())
            .filter(|&b| {
                self.block_interval
                    .get(b)
                    .is_some_and(|i| intervals.contains(i))
            })
            .collect();
        let (parts, blocks): (Vec<Vec<usize>>, Vec<Block>) = if self.join {
            plan::join_adjoining(&self.blocks, &index)
                .into_iter()
                .unzip()
        } else {
            index
                .iter()
                .filter_map(|&b| Some((vec![b], self.blocks.get(b)?.clone())))
                .unzip()
        };
        let mut points = vec![false; self.device.points.len()];
        for &p in blocks.iter().flat_map(|b| &b.points) {
            if let Some(slot) = points.get_mut(p) {
                *slot = true;
            }
        }
        Due {
            parts,
            blocks,
            points,
            intervals,
        }
    }

    fn block_label(&self, b: usize) -> String {
        let block = &self.blocks[b];
        let names: Vec<&str> = block
            .points
            .iter()
            .map(|&i| self.device.points[i].name.as_str())
            .collect();
        format!(
            "{} {}..{} ({})",
            block.area,
            block.start,
            u32::from(block.start) + u32::from(block.count) - 1,
            names.join(", ")
        )
    }

    /// An offline/online event for the platform.
    fn event(&self, method: &str, reason: Option<&str>) -> Record {
        let mut params = serde_json::json!({ "device": self.device.name });
        if let Some(key) = &self.device.key {
            params["key"] = key.as_str().into();
        }
        if let Some(reason) = reason {
            params["reason"] = reason.into();
        }
        Record::event(method, params)
    }

    /// A sub-device's presence for the platform (`None` for the gateway's
    /// own devices).
    fn presence(&self, online: bool) -> Option<Record> {
        let key = self.device.key.clone()?;
        Some(Record::now(Body::Presence { key, online }))
    }

    /// Updates failure counters and logs transitions (never every cycle);
    /// returns the events of a device going offline or coming back, and a
    /// sub-device's presence: online at its first answer and whenever it
    /// comes back, offline when it goes.
    pub(super) fn record(&mut self, result: &PollResult, due: &Due) -> Vec<Record> {
        self.polled = true;
        let first_answer = self.last_ok.is_none();
        if !result.unreachable() {
            self.last_ok = Some(SystemTime::now());
        }
        let name = &self.device.name;
        if result.unreachable() {
            self.failures += 1;
            let reason = result
                .replies
                .iter()
                .find_map(|r| r.as_ref().err())
                .map(ToString::to_string);
            if self.offline.is_none() {
                log::warn!(
                    target: "poll",
                    device = name.as_str(), bus = self.device.bus.as_str(), unit = self.device.unit.get();
                    "device {name} (unit {}): not responding: {}",
                    self.device.unit,
                    reason.as_deref().unwrap_or("no blocks")
                );
                let event = self.event("device_offline", reason.as_deref());
                self.offline = reason;
                return std::iter::once(event).chain(self.presence(false)).collect();
            }
            return Vec::new();
        }
        let mut events = Vec::new();
        if self.offline.take().is_some() {
            log::info!(target: "poll", device = name.as_str(), bus = self.device.bus.as_str(), unit = self.device.unit.get(); "device {name}: responding again after {} failed polls", self.failures);
            events.push(self.event("device_online", None));
            events.extend(self.presence(true));
        } else if first_answer {
            events.extend(self.presence(true));
        }
        self.failures = 0;
        // A request's outcome is that of each block it read.
        let outcomes = due
            .parts
            .iter()
            .zip(&result.replies)
            .flat_map(|(parts, reply)| parts.iter().map(move |&b| (b, reply)));
        for (b, reply) in outcomes {
            let err = reply.as_ref().err();
            let state = err.map(|e| e.kind().to_string());
            if self.block_state.get(b) != Some(&state) {
                match err {
                    Some(e) => {
                        log::warn!(target: "poll", device = name.as_str(), bus = self.device.bus.as_str(); "device {name}: cannot read {}: {e}", self.block_label(b))
                    }
                    None => {
                        log::info!(target: "poll", "device {name}: {} readable again", self.block_label(b))
                    }
                }
                if let Some(slot) = self.block_state.get_mut(b) {
                    *slot = state;
                }
            }
        }
        events
    }

    /// Applies the report policy to one poll's values.
    pub(super) fn report(
        &mut self,
        values: Vec<Option<Value>>,
        due: &Due,
        taken: SystemTime,
        now: Instant,
    ) -> Option<Reading> {
        let full = match self.device.report {
            Report::Always => true,
            Report::Change { heartbeat } => self
                .last_full
                .is_none_or(|t| now.duration_since(t) >= heartbeat),
        };
        let mut out = serde_json::Map::new();
        let mut complete = true;
        for (i, value) in values.into_iter().enumerate() {
            let Some(value) = value else {
                // A point of another interval was not due: not missing.
                complete &= !due.points.get(i).copied().unwrap_or(false);
                continue;
            };
            let point = &self.device.points[i];
            if !full && !changed(self.reported.get(&i), &value, point.deadband) {
                continue;
            }
            let Some(json) = crate::codec::present(point, &value) else {
                log::debug!(target: "poll", "device {}: {} = {value} has no JSON form; not reported", self.device.name, point.name);
                continue;
            };
            out.insert(point.name.clone(), json);
            self.reported.insert(i, value);
        }
        if full && complete {
            self.last_full = Some(now);
        }
        (!out.is_empty()).then(|| Reading {
            device: self.device.name.clone(),
            key: self.device.key.clone(),
            taken,
            values: out,
        })
    }

    /// A slave that refuses a request joining blocks due together gets
    /// each block on its own from then on. A slave that rejects a bridged
    /// read with "illegal data address" probably has unmapped registers in
    /// the gap: from now on that block is read as gapless pieces. Other
    /// errors leave the plan alone.
    pub(super) fn replan(&mut self, result: &PollResult, due: &Due) {
        let refused_join =
            due.parts.iter().zip(&result.replies).any(|(parts, reply)| {
                parts.len() > 1 && matches!(reply, Err(TxError::Exception(_)))
            });
        if refused_join && self.join {
            self.join = false;
            log::info!(
                target: "poll",
                "device {}: a request joining blocks due together was refused; reading each block on its own from now on",
                self.device.name
            );
            // The blocks are judged on their own from the next poll.
            return;
        }
        let mut changed = false;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut block_interval = Vec::with_capacity(self.blocks.len());
        for (b, block) in self.blocks.iter().enumerate() {
            let reply = due
                .parts
                .iter()
                .position(|parts| parts.contains(&b))
                .and_then(|at| result.replies.get(at));
            let split = match reply {
                Some(Err(TxError::Exception(ExceptionCode::IllegalDataAddress))) => {
                    plan::without_gaps(block, &self.device.points)
                }
                _ => vec![block.clone()],
            };
            let interval = self.block_interval.get(b).copied().unwrap_or_default();
            block_interval.extend(std::iter::repeat_n(interval, split.len()));
            if split.len() > 1 {
                changed = true;
                log::info!(
                    target: "poll",
                    "device {}: {} {}..{} rejected as a whole; reading it as {} gapless requests from now on",
                    self.device.name,
                    block.area,
                    block.start,
                    u32::from(block.start) + u32::from(block.count) - 1,
                    split.len()
                );
            }
            blocks.extend(split);
        }
        if changed {
            self.block_state = vec![None; blocks.len()];
            self.blocks = blocks;
            self.block_interval = block_interval;
        }
    }

    /// Evaluates the alarms of the points read at `now` (reported or not);
    /// the `alarm_raised` / `alarm_cleared` events.
    pub(super) fn alarms(&mut self, values: &[Option<Value>], now: Instant) -> Vec<Record> {
        let mut events = Vec::new();
        for ((point, value), state) in self.device.points.iter().zip(values).zip(&mut self.alarms) {
            let (Some(alarm), Some(value)) = (&point.alarm, value) else {
                continue;
            };
            let Some(change) = state.evaluate(alarm, value, now) else {
                continue;
            };
            let shown = crate::codec::present(point, value).unwrap_or_default();
            let (method, mut params) = change.event(&point.name, shown);
            params["device"] = self.device.name.as_str().into();
            if let Some(key) = &self.device.key {
                params["key"] = key.as_str().into();
            }
            log::warn!(target: "poll", device = self.device.name.as_str(); "device {}: {method} on {} = {value}", self.device.name, point.name);
            events.push(Record::event(method, params));
        }
        events
    }

    /// Keeps the points that `result` read as the device's last values.
    pub(super) fn remember(&mut self, result: &PollResult, due: &Due, taken: SystemTime) {
        let reads = result.points(&self.device.points, &due.blocks, ms_since_epoch(taken));
        for (slot, read) in self.last.iter_mut().zip(reads) {
            if let Some(read) = read.filter(|r| r.error.is_none()) {
                *slot = Some(read);
            }
        }
    }

    /// What the rest of the daemon may know of this device.
    pub(super) fn status(&self) -> DeviceStatus {
        DeviceStatus {
            name: self.device.name.clone(),
            online: self.polled.then_some(self.offline.is_none()),
            last_ok_ms: self.last_ok.map(ms_since_epoch),
            failures: self.failures,
            values: self.last.iter().flatten().cloned().collect(),
        }
    }

    /// Schedules the intervals that were due; each keeps a fixed rate while
    /// on time, with no burst of catch-up polls when late.
    pub(super) fn schedule_next(&mut self, due: &Due, now: Instant) {
        for &i in &due.intervals {
            if let Some((every, next)) = self.intervals.get_mut(i) {
                *next = (*next + backoff_interval(*every, self.failures)).max(now);
            }
        }
        self.next_due = self
            .intervals
            .iter()
            .map(|(_, next)| *next)
            .min()
            .unwrap_or(now);
    }
}

/// What one poll reads.
pub(super) struct Due {
    /// Per request, the device's blocks it reads (indices).
    parts: Vec<Vec<usize>>,
    /// The requests, as blocks (the replies follow their order).
    pub(super) blocks: Vec<Block>,
    /// By point index: whether the poll reads it.
    points: Vec<bool>,
    /// The intervals due.
    intervals: Vec<usize>,
}

/// Whether `new` differs from the last reported value by more than `deadband`.
fn changed(last: Option<&Value>, new: &Value, deadband: f64) -> bool {
    match (last, last.and_then(Value::as_f64), new.as_f64()) {
        (None, ..) => true,
        (_, Some(a), Some(b)) if deadband > 0.0 => (a - b).abs() > deadband,
        (Some(last), ..) => last != new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadband_compares_with_last_reported() {
        assert!(changed(None, &Value::Float(1.0), 0.5));
        assert!(!changed(Some(&Value::Float(1.0)), &Value::Float(1.4), 0.5));
        assert!(changed(Some(&Value::Float(1.0)), &Value::Float(1.6), 0.5));
        assert!(!changed(Some(&Value::Int(3)), &Value::Int(3), 0.0));
        assert!(changed(Some(&Value::Bool(true)), &Value::Bool(false), 0.0));
        assert!(changed(
            Some(&Value::Text("a".into())),
            &Value::Text("b".into()),
            1.0
        ));
    }
}
