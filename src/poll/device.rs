//! What a bus owner remembers about each of its devices between polls: the
//! read plan, failures and the offline state (logged and reported once per
//! change), and the report policy (`always`, or `change` with deadband and
//! heartbeat).

use std::collections::HashMap;
use std::time::SystemTime;

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
    pub(super) blocks: Vec<Block>,
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
    pub(super) fn new(device: Device, blocks: Vec<Block>, start: Instant) -> Self {
        Self {
            last: vec![None; device.points.len()],
            alarms: vec![alarm::State::default(); device.points.len()],
            block_state: vec![None; blocks.len()],
            device,
            blocks,
            next_due: start,
            failures: 0,
            offline: None,
            polled: false,
            last_ok: None,
            reported: HashMap::new(),
            last_full: None,
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
    pub(super) fn record(&mut self, result: &PollResult) -> Vec<Record> {
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
        for (b, reply) in result.replies.iter().enumerate() {
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
                complete = false;
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

    /// A slave that rejects a bridged read with "illegal data address"
    /// probably has unmapped registers in the gap: from now on that block is
    /// read as gapless pieces. Other errors leave the plan alone.
    pub(super) fn replan(&mut self, result: &PollResult) {
        let mut changed = false;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (block, reply) in self.blocks.iter().zip(&result.replies) {
            let split = match reply {
                Err(TxError::Exception(ExceptionCode::IllegalDataAddress)) => {
                    plan::without_gaps(block, &self.device.points)
                }
                _ => vec![block.clone()],
            };
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
    pub(super) fn remember(&mut self, result: &PollResult, taken: SystemTime) {
        let reads = result.points(&self.device.points, &self.blocks, ms_since_epoch(taken));
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

    pub(super) fn schedule_next(&mut self, now: Instant) {
        let interval = backoff_interval(self.device.poll, self.failures);
        // Fixed rate while on time; no burst of catch-up polls when late.
        self.next_due = (self.next_due + interval).max(now);
    }
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
