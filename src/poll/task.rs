//! The bus owner: one task per bus, the only one that touches its
//! transport. It polls the devices that are due and runs the jobs sent to
//! it, sharing the bus fairly: a job goes ahead of the next poll
//! transaction (never inside one), but at most one job runs between two
//! poll transactions, so a flood of writes cannot stop polling. Every
//! record it produces — readings, events, job outcomes — is appended to the
//! outbox in the order that matches what happened on the wire.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};

use super::device::DeviceState;
use super::job::Job;
use super::{plan, PollResult};
use crate::bus::tap::{BusStats, ModbusMetrics};
use crate::bus::{Bus, Liveness};
use crate::config::Device;
use crate::outbox::Outbox;
use crate::record::Record;

/// Jobs waiting for one bus; past this the router answers "bus busy".
const JOB_QUEUE: usize = 64;
/// An idle bus owner still wakes this often, to renew its liveness promise.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// How long a stop waits for the transaction on the wire: its reply is a
/// reading the slave already gave, and one left on the line would meet the
/// next owner of the port.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Why a bus owner stops, as told in the outcome of every job it did not
/// run: "the daemon is stopping", "the config was reloaded".
pub type StopReason = &'static str;

/// A device as its bus owner last saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    pub name: String,
    /// Whether its last poll got any answer; `None` before the first poll.
    pub online: Option<bool>,
    /// When it last answered (ms since the epoch).
    pub last_ok_ms: Option<u64>,
    /// Consecutive polls without any answer.
    pub failures: u32,
    /// The last good read of each point, in config order.
    pub values: Vec<super::PointRead>,
}

/// What the rest of the daemon holds of a running bus owner.
#[derive(Clone)]
pub struct BusHandle {
    pub jobs: mpsc::Sender<Job>,
    pub alive: Liveness,
    pub devices: watch::Receiver<Vec<DeviceStatus>>,
    pub stats: Arc<BusStats>,
}

/// The task that owns one bus.
pub struct BusTask {
    bus: Bus,
    devices: Vec<DeviceState>,
    jobs: mpsc::Receiver<Job>,
    outbox: Outbox,
    alive: Liveness,
    status: watch::Sender<Vec<DeviceStatus>>,
}

impl BusTask {
    /// The owner of `bus`, polling `devices` and appending to `outbox`,
    /// counting its transactions in `metrics`; returns it with the handle
    /// that sends it jobs.
    pub fn new(
        mut bus: Bus,
        devices: Vec<Device>,
        outbox: Outbox,
        metrics: &ModbusMetrics,
    ) -> (Self, BusHandle) {
        let units: Vec<_> = devices.iter().map(|d| (d.unit, d.name.clone())).collect();
        let config = bus.config();
        let stats = Arc::new(BusStats::new(
            &config.name,
            config.transport.name(),
            &units,
            metrics,
        ));
        bus.observed_by(stats.clone());
        let (job_tx, jobs) = mpsc::channel(JOB_QUEUE);
        let start = Instant::now();
        let devices: Vec<DeviceState> = devices
            .into_iter()
            .map(|d| {
                let schedule = plan::schedule(&d, bus.config());
                DeviceState::new(d, schedule, start)
            })
            .collect();
        let (status, status_rx) = watch::channel(devices.iter().map(DeviceState::status).collect());
        let alive = bus.liveness();
        let handle = BusHandle {
            jobs: job_tx,
            alive: alive.clone(),
            devices: status_rx,
            stats,
        };
        let task = Self {
            bus,
            devices,
            jobs,
            outbox,
            alive,
            status,
        };
        (task, handle)
    }

    /// Polls and runs jobs until `stop` names a reason. A poll in progress is
    /// cut short; a job in progress is finished; queued jobs are answered
    /// with the reason, so every accepted job has an outcome.
    pub async fn run(mut self, mut stop: watch::Receiver<Option<StopReason>>) {
        let mut jobs_open = true;
        loop {
            self.alive.promise(2 * IDLE_CHECK);
            if stop.borrow().is_some() {
                break;
            }
            let next = self
                .devices
                .iter()
                .enumerate()
                .map(|(i, d)| (i, d.next_due))
                .min_by_key(|&(_, due)| due);
            if let Some((index, due)) = next {
                if due <= Instant::now() {
                    self.poll(index, &mut stop).await;
                    continue;
                }
            }
            let wake = next.map_or_else(|| Instant::now() + IDLE_CHECK, |(_, due)| due);
            tokio::select! {
                biased;
                changed = stop.changed() => if changed.is_err() { break },
                job = self.jobs.recv(), if jobs_open => match job {
                    Some(job) => self.run_job(job).await,
                    None => jobs_open = false,
                },
                () = sleep_until(wake.min(Instant::now() + IDLE_CHECK)) => {}
            }
        }
        let reason = stop.borrow().unwrap_or("the bus stopped");
        self.jobs.close();
        while let Ok(job) = self.jobs.try_recv() {
            for record in job.refuse(reason) {
                self.outbox.append(record);
            }
        }
    }

    /// Runs one job and appends its records.
    async fn run_job(&mut self, job: Job) {
        let devices = &self.devices;
        let offline = |name: &str| {
            devices
                .iter()
                .find(|d| d.device.name == name)
                .and_then(|d| d.offline.clone())
        };
        for record in job.run(&mut self.bus, offline).await {
            self.outbox.append(record);
        }
    }

    /// Reads every block of device `index`, with at most one queued job
    /// before each transaction, then reports. A point that a job wrote after
    /// this poll had read it is left out of the report: its value is older
    /// than the job's read-back, which is already on its way, and must not
    /// follow it. A stop starts no further transaction and reports what was
    /// read by then, the transaction on the wire included if it ends within
    /// [`STOP_GRACE`].
    async fn poll(&mut self, index: usize, stop: &mut watch::Receiver<Option<StopReason>>) {
        let taken = SystemTime::now();
        let Some(state) = self.devices.get(index) else {
            return;
        };
        let (unit, timeout) = (state.device.unit, state.device.timeout);
        let due = state.due(Instant::now());
        let requests: Vec<_> = due.blocks.iter().map(plan::Block::request).collect();
        let mut replies = Vec::with_capacity(requests.len());
        // Points written by jobs, with how many blocks had been read before.
        let mut overtaken: Vec<(String, usize)> = Vec::new();
        for request in &requests {
            if let Ok(job) = self.jobs.try_recv() {
                if let Some((device, points)) = job.writes() {
                    if device == state_name(&self.devices, index) {
                        overtaken.extend(points.into_iter().map(|p| (p, replies.len())));
                    }
                }
                self.run_job(job).await;
            }
            if stop.borrow().is_some() {
                break;
            }
            let reply = tokio::select! {
                biased;
                reply = self.bus.transact(unit, request, timeout) => reply,
                () = stop_grace_over(stop) => break,
            };
            replies.push(reply);
        }
        if !replies.is_empty() {
            if let Some(state) = self.devices.get_mut(index) {
                let now = Instant::now();
                let result = PollResult { replies };
                let mut values = result.values(&state.device.points, &due.blocks);
                let alarms = state.alarms(&values, now);
                for (name, read_before) in &overtaken {
                    for block in due.blocks.iter().take(*read_before) {
                        for &i in &block.points {
                            if state.device.points.get(i).is_some_and(|p| &p.name == name) {
                                if let Some(value) = values.get_mut(i) {
                                    *value = None;
                                }
                            }
                        }
                    }
                }
                let events = state.record(&result, &due);
                state.remember(&result, &due, taken);
                state.replan(&result, &due);
                let reading = state.report(values, &due, taken, now);
                state.schedule_next(&due, now);
                let status = state.status();
                self.status.send_modify(|all| {
                    if let Some(slot) = all.get_mut(index) {
                        *slot = status;
                    }
                });
                for record in events
                    .into_iter()
                    .chain(alarms)
                    .chain(reading.map(Record::from))
                {
                    self.outbox.append(record);
                }
            }
        }
    }
}

/// Resolves [`STOP_GRACE`] after a stop was asked for.
async fn stop_grace_over(stop: &mut watch::Receiver<Option<StopReason>>) {
    if stop.wait_for(Option::is_some).await.is_ok() {
        tokio::time::sleep(STOP_GRACE).await;
    }
}

/// The name of device `index`.
fn state_name(devices: &[DeviceState], index: usize) -> &str {
    devices.get(index).map_or("", |d| d.device.name.as_str())
}
