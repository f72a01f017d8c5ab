//! Polling: the task that owns one bus and reads its devices on schedule.
//!
//! Each bus gets one [`Poller`]. It decides which device is due, reads its
//! coalesced blocks one transaction at a time, decodes the points, applies
//! the report policy and hands [`Reading`]s to the uplink queue, with an
//! event when a device goes offline or comes back. Downlink
//! [`Job`]s sent to the poller run before its next transaction, never inside
//! one. A device that keeps failing is backed off so that its timeouts do not
//! starve the devices that answer.

pub mod codec;
pub mod plan;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use tokio_modbus::ExceptionCode;

use crate::bus::{Bus, Reply, TxError};
use crate::config::{Device, Point, Report};
use crate::outbox::Record;
use codec::Value;
use plan::Block;

/// One device's successful reads from one poll, ready for the uplink.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub device: String,
    /// Platform sub-device key; `None` = the gateway's own attributes.
    pub key: Option<String>,
    /// When the sample was taken.
    pub taken: SystemTime,
    pub values: serde_json::Map<String, serde_json::Value>,
}

/// Work from the downlink, run by the bus owner between two transactions.
pub type Job = Box<dyn for<'a> FnOnce(&'a mut Bus) -> BoxFuture<'a, ()> + Send>;

/// Longest interval a failing device is backed off to (unless its own poll
/// interval is longer).
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The poll interval after `failures` consecutive failed polls: normal for
/// the first three, then one more interval per failure, capped at a minute.
pub fn backoff_interval(poll: Duration, failures: u32) -> Duration {
    let factor = failures.saturating_sub(2).max(1);
    (poll * factor).min(MAX_BACKOFF.max(poll))
}

/// The outcome of reading every block of a device once: per block, the
/// reply or why there is none.
pub struct PollResult {
    pub replies: Vec<Result<Reply, TxError>>,
}

impl PollResult {
    pub fn all_failed(&self) -> bool {
        self.replies.iter().all(Result::is_err)
    }

    /// No block got any answer at all: the slave is silent or unreachable.
    /// (An exception reply proves the slave is alive.)
    pub fn unreachable(&self) -> bool {
        self.replies
            .iter()
            .all(|r| matches!(r, Err(e) if !matches!(e, TxError::Exception(_))))
    }

    /// Decoded values by point index; `None` where the block failed.
    pub fn values(&self, points: &[Point], blocks: &[Block]) -> Vec<Option<Value>> {
        let mut out = vec![None; points.len()];
        for (block, reply) in blocks.iter().zip(&self.replies) {
            if let Ok(reply) = reply {
                for &i in &block.points {
                    out[i] = raw_of(&points[i], block, reply).map(|raw| match raw {
                        Raw::Bit(b) => Value::Bool(b),
                        Raw::Registers(regs) => codec::decode_registers(&points[i], regs),
                    });
                }
            }
        }
        out
    }
}

/// The part of a block's reply that belongs to one point.
pub enum Raw<'a> {
    Bit(bool),
    Registers(&'a [u16]),
}

/// Cuts `point`'s bit or registers out of its block's reply.
pub fn raw_of<'a>(point: &Point, block: &Block, reply: &'a Reply) -> Option<Raw<'a>> {
    let at = usize::from(point.address.checked_sub(block.start)?);
    match reply {
        Reply::Bits(bits) => bits.get(at).map(|b| Raw::Bit(*b)),
        Reply::Registers(regs) => regs
            .get(at..at + usize::from(point.kind.width()))
            .map(Raw::Registers),
        Reply::Written => None,
    }
}

/// Reads every block of `device` once. Pending downlink `jobs` run before
/// each transaction, so they never wait for a whole poll cycle.
pub async fn read_device(
    bus: &mut Bus,
    device: &Device,
    blocks: &[Block],
    mut jobs: Option<&mut mpsc::Receiver<Job>>,
) -> PollResult {
    let mut replies = Vec::with_capacity(blocks.len());
    for block in blocks {
        if let Some(jobs) = jobs.as_deref_mut() {
            while let Ok(job) = jobs.try_recv() {
                job(bus).await;
            }
        }
        replies.push(
            bus.transact(device.unit, &block.request(), device.timeout)
                .await,
        );
    }
    PollResult { replies }
}

/// What the poller remembers about one device between polls.
struct DeviceState {
    device: Device,
    blocks: Vec<Block>,
    next_due: Instant,
    /// Consecutive polls in which no block could be read.
    failures: u32,
    /// Last logged state per block, so errors are logged once per change.
    block_state: Vec<Option<String>>,
    offline: Option<String>,
    /// Last value reported per point (report = "change").
    reported: HashMap<usize, Value>,
    last_full: Option<Instant>,
}

impl DeviceState {
    fn new(device: Device, blocks: Vec<Block>, start: Instant) -> Self {
        Self {
            block_state: vec![None; blocks.len()],
            device,
            blocks,
            next_due: start,
            failures: 0,
            offline: None,
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

    /// Updates failure counters and logs transitions (never every cycle);
    /// returns the event of a device going offline or coming back.
    fn record(&mut self, result: &PollResult) -> Option<Record> {
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
                return Some(event);
            }
            return None;
        }
        let mut event = None;
        if self.offline.take().is_some() {
            log::info!(target: "poll", device = name.as_str(), bus = self.device.bus.as_str(), unit = self.device.unit.get(); "device {name}: responding again after {} failed polls", self.failures);
            event = Some(self.event("device_online", None));
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
        event
    }

    /// Applies the report policy to one poll's values.
    fn report(
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
            let Some(json) = value.to_json() else {
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
    fn replan(&mut self, result: &PollResult) {
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

    fn schedule_next(&mut self, now: Instant) {
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

/// The task that owns one bus: polls its devices and runs downlink jobs.
pub struct Poller {
    bus: Bus,
    devices: Vec<DeviceState>,
    uplink: mpsc::Sender<Record>,
    jobs: mpsc::Receiver<Job>,
    dropped: u64,
}

impl Poller {
    /// A poller for `devices` on `bus` that sends readings and events to
    /// `uplink`; returns it with the sender for downlink jobs.
    pub fn new(
        bus: Bus,
        devices: Vec<Device>,
        uplink: mpsc::Sender<Record>,
    ) -> (Self, mpsc::Sender<Job>) {
        let (job_tx, jobs) = mpsc::channel(64);
        let start = Instant::now();
        let devices = devices
            .into_iter()
            .map(|d| {
                let blocks = plan::plan(&d.points, bus.config());
                DeviceState::new(d, blocks, start)
            })
            .collect();
        let poller = Self {
            bus,
            devices,
            uplink,
            jobs,
            dropped: 0,
        };
        (poller, job_tx)
    }

    /// Polls (and runs downlink jobs) until `shutdown` turns true. A bus
    /// without devices (a stream's, or a transparent one) only runs jobs.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = self
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| (i, d.next_due))
                .min_by_key(|&(_, due)| due);
            let (index, due) = next.unwrap_or((0, Instant::now()));
            tokio::select! {
                biased;
                () = crate::stopped(&mut shutdown) => return,
                Some(job) = self.jobs.recv() => job(&mut self.bus).await,
                // A poll full of timeouts can take seconds: shutdown cuts it short.
                () = sleep_until(due), if next.is_some() => tokio::select! {
                    biased;
                    () = crate::stopped(&mut shutdown) => return,
                    () = self.poll(index) => {}
                },
            }
        }
    }

    async fn poll(&mut self, index: usize) {
        let taken = SystemTime::now();
        let state = &mut self.devices[index];
        let result = read_device(
            &mut self.bus,
            &state.device,
            &state.blocks,
            Some(&mut self.jobs),
        )
        .await;
        let now = Instant::now();
        let values = result.values(&state.device.points, &state.blocks);
        let event = state.record(&result);
        state.replan(&result);
        let reading = state.report(values, taken, now);
        state.schedule_next(now);
        let device = state.device.name.clone();
        for record in event.into_iter().chain(reading.map(Record::from)) {
            if self.uplink.try_send(record).is_err() {
                self.dropped += 1;
                log::warn!(target: "poll", "uplink queue full: a record of {device} dropped ({} so far)", self.dropped);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_follows_the_spec() {
        let poll = Duration::from_secs(5);
        let got: Vec<u64> = (0..20)
            .map(|f| backoff_interval(poll, f).as_secs())
            .collect();
        assert_eq!(
            got,
            [5, 5, 5, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 60, 60, 60, 60, 60]
        );
        // A device polled less often than the cap keeps its own interval.
        assert_eq!(backoff_interval(Duration::from_secs(120), 9).as_secs(), 120);
    }

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
