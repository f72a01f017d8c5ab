//! Typed work for a bus owner: what the router (and later the local API)
//! asks a bus to do between two poll transactions, and how each outcome is
//! told — as uplink records for the platform, or back to a local caller.
//! A job is data, not a closure: the bus owner runs it with its own bus, so
//! nothing else ever holds the bus or the outbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value as Json};
use tokio::sync::oneshot;

use super::scan::{Identifier, Probe};
use super::{plan, read_device, PointRead};
use crate::bus::Bus;
use crate::codec::{self, Value};
use crate::config::{Address, Area, Device, Encoding, Kind, Point, UnitId};
use crate::modbus::{rtu, Reply, Request, TxError, MAX_WRITE_COILS, MAX_WRITE_REGISTERS};
use crate::record::{Body, Reading, Record};
use crate::text::to_hex;

/// The validated writes for one device: every value has been checked
/// against its point (writable, type, `min`/`max`, register range).
#[derive(Debug, Clone)]
pub struct WritePlan {
    pub device: Device,
    pub writes: Vec<(Point, Value)>,
}

impl WritePlan {
    /// The names of the points written, for logs.
    pub fn names(&self) -> String {
        self.writes
            .iter()
            .map(|(p, _)| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Where a command's reply goes on the platform.
#[derive(Debug, Clone)]
pub struct CommandReply {
    /// The sub-device the command was sent to.
    pub key: Option<String>,
    /// The command id as the platform gave it.
    pub id: Json,
    pub method: String,
}

impl CommandReply {
    /// The reply record: `{"ok": true}` or `{"ok": false, "error": …}`.
    pub fn record(&self, result: Result<(), String>) -> Record {
        let params = match result {
            Ok(()) => json!({ "ok": true }),
            Err(error) => json!({ "ok": false, "error": error }),
        };
        Record::now(Body::Reply {
            key: self.key.clone(),
            id: self.id.clone(),
            method: self.method.clone(),
            params: match params {
                Json::Object(map) => map,
                _ => Map::new(),
            },
        })
    }
}

/// Where a raw frame's reply goes: `data/<stream>` in its encoding.
#[derive(Debug, Clone)]
pub struct StreamReply {
    pub name: String,
    pub encoding: Encoding,
}

impl StreamReply {
    fn record(&self, result: Result<Vec<u8>, String>) -> Record {
        match result {
            Ok(reply) => Record::now(Body::Stream {
                name: self.name.clone(),
                payload: match self.encoding {
                    Encoding::Binary => reply,
                    Encoding::Hex => to_hex(&reply).into_bytes(),
                },
            }),
            Err(error) => {
                log::warn!(target: "router", "stream {}: {error}", self.name);
                Record::event(
                    "frame_timeout",
                    json!({ "stream": self.name, "error": error }),
                )
            }
        }
    }
}

/// The outcome of a write for a local caller: the read-back, if it worked.
pub type WriteOutcome = Result<Option<Reading>, String>;

/// The outcome of a read for a local caller: every point as read, in
/// config order, or why the read was not made.
pub type ReadOutcome = Result<Vec<PointRead>, String>;

/// One piece of work for a bus owner.
#[derive(Debug)]
pub enum Job {
    /// Attribute writes for one device. With `reply`, the outcome goes back
    /// to a local caller; without, a failure is a `write_failed` event. The
    /// read-back is reported either way.
    Write {
        plan: WritePlan,
        reply: Option<oneshot::Sender<WriteOutcome>>,
    },
    /// A named command: its writes in order, then the reply.
    Command {
        name: String,
        plans: Vec<WritePlan>,
        reply: CommandReply,
    },
    /// One raw RTU request from a stream, run as exactly one transaction.
    Frame {
        unit: UnitId,
        request: Request,
        timeout: Duration,
        stream: StreamReply,
    },
    /// Raw bytes for a transparent bus.
    Exchange { bytes: Vec<u8>, stream: StreamReply },
    /// A local read of `device`'s points (the API, the CLI through it).
    Read {
        device: Device,
        reply: oneshot::Sender<ReadOutcome>,
    },
    /// One scan probe: a read of holding register 0 of `unit`, one attempt;
    /// with an identifier, its reads too when the unit answers.
    Probe {
        unit: UnitId,
        identify: Option<Arc<Identifier>>,
        reply: oneshot::Sender<Probe>,
    },
}

impl Job {
    /// The device a job writes, if any (for the offline check).
    fn device(&self) -> Option<&str> {
        match self {
            Job::Write { plan, .. } => Some(&plan.device.name),
            Job::Command { plans, .. } => plans.first().map(|p| p.device.name.as_str()),
            // A read is how a technician finds out whether it is back.
            Job::Frame { .. } | Job::Exchange { .. } | Job::Read { .. } | Job::Probe { .. } => None,
        }
    }

    /// The device this job writes and the names of the points it writes.
    pub fn writes(&self) -> Option<(String, Vec<String>)> {
        let plans: &[WritePlan] = match self {
            Job::Write { plan, .. } => std::slice::from_ref(plan),
            Job::Command { plans, .. } => plans,
            Job::Frame { .. } | Job::Exchange { .. } | Job::Read { .. } | Job::Probe { .. } => {
                return None
            }
        };
        let device = plans.first()?.device.name.clone();
        let points = plans
            .iter()
            .flat_map(|p| p.writes.iter().map(|(point, _)| point.name.clone()))
            .collect();
        Some((device, points))
    }

    /// The job is not run (`reason`); the records that say so. Every
    /// accepted job gets an outcome, whatever happens to the daemon.
    pub fn refuse(self, reason: &str) -> Vec<Record> {
        match self {
            Job::Write { plan, reply } => {
                let error = format!("not written: {reason}");
                match reply {
                    Some(reply) => {
                        let _ = reply.send(Err(error));
                        Vec::new()
                    }
                    None => vec![write_failed(&plan.device.name, &error)],
                }
            }
            Job::Command { reply, .. } => vec![reply.record(Err(format!("not run: {reason}")))],
            Job::Frame { stream, .. } | Job::Exchange { stream, .. } => {
                vec![stream.record(Err(format!("not sent: {reason}")))]
            }
            Job::Read { reply, .. } => {
                let _ = reply.send(Err(format!("not read: {reason}")));
                Vec::new()
            }
            Job::Probe { unit, reply, .. } => {
                let failed = Err(TxError::Port(format!("not probed: {reason}")));
                let _ = reply.send(Probe::new(unit, failed));
                Vec::new()
            }
        }
    }

    /// Runs the job on `bus`. `offline` names why a device is offline (a
    /// write to it fails at once instead of waiting out its timeouts).
    /// Returns the records for the platform.
    pub async fn run(self, bus: &mut Bus, offline: impl Fn(&str) -> Option<String>) -> Vec<Record> {
        if let Some(reason) = self.device().and_then(&offline) {
            let device = self.device().unwrap_or_default().to_string();
            return self.refuse(&format!("device {device} is offline ({reason})"));
        }
        match self {
            Job::Write { plan, reply } => {
                let device = plan.device.name.clone();
                let result = execute_write(bus, &plan).await;
                match &result {
                    Ok(_) => {
                        log::info!(target: "router", device = device.as_str(); "device {device}: wrote {}", plan.names())
                    }
                    Err(e) => {
                        log::warn!(target: "router", device = device.as_str(); "device {device}: {e}")
                    }
                }
                let mut records = Vec::new();
                match (result, reply) {
                    (Ok(reading), reply) => {
                        records.extend(reading.clone().map(Record::from));
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(reading));
                        }
                    }
                    (Err(e), Some(reply)) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                    (Err(e), None) => records.push(write_failed(&device, &e.to_string())),
                }
                records
            }
            Job::Command { name, plans, reply } => {
                let total = plans.len();
                let mut result = Ok(());
                let mut records = Vec::new();
                for (i, plan) in plans.iter().enumerate() {
                    match execute_write(bus, plan).await {
                        Ok(reading) => records.extend(reading.map(Record::from)),
                        Err(e) => {
                            result = Err(format!(
                                "write {} of {total} ({}): {}",
                                i + 1,
                                e.points,
                                e.error
                            ));
                            break;
                        }
                    }
                }
                match &result {
                    Ok(()) => log::info!(target: "router", "command {name}: done"),
                    Err(e) => log::warn!(target: "router", "command {name}: {e}"),
                }
                records.push(reply.record(result));
                records
            }
            Job::Frame {
                unit,
                request,
                timeout,
                stream,
            } => {
                let attempt = bus.attempt(unit, &request, timeout).await;
                let result = match (attempt.pdu, attempt.outcome) {
                    (Some(pdu), _) => Ok(rtu::adu(unit.get(), &pdu)),
                    (None, Err(e)) => Err(e.to_string()),
                    (None, Ok(_)) => Err("no reply frame".into()),
                };
                vec![stream.record(result)]
            }
            Job::Exchange { bytes, stream } => {
                vec![stream.record(bus.exchange(&bytes).await.map_err(|e| e.to_string()))]
            }
            Job::Read { device, reply } => {
                let _ = reply.send(Ok(read_points(bus, &device).await));
                Vec::new()
            }
            Job::Probe {
                unit,
                identify,
                reply,
            } => {
                let _ = reply.send(probe(bus, unit, identify.as_deref()).await);
                Vec::new()
            }
        }
    }
}

/// One scan probe of `unit`: holding register 0, one attempt within the bus
/// timeout; then, if it answered and `identify` is given, each of the
/// identifier's reads, one attempt each.
pub async fn probe(bus: &mut Bus, unit: UnitId, identify: Option<&Identifier>) -> Probe {
    let limit = bus.config().timeout;
    let request = Request::ReadHolding(0, 1);
    let mut probe = Probe::new(unit, bus.attempt(unit, &request, limit).await.outcome);
    if let (Some(identifier), true) = (identify, probe.answers()) {
        let mut matches = Vec::new();
        for (index, request) in identifier.requests().enumerate() {
            if let Ok(Reply::Registers(registers)) =
                bus.attempt(unit, &request, limit).await.outcome
            {
                matches.extend(identifier.matches(index, &registers));
            }
        }
        probe.matches = Some(matches);
    }
    probe
}

/// Reads every point of `device` once: each as read, or why not.
pub async fn read_points(bus: &mut Bus, device: &Device) -> Vec<PointRead> {
    let blocks = plan::plan(&device.points, bus.config());
    let taken = SystemTime::now();
    let result = read_device(bus, device, &blocks).await;
    result
        .points(
            &device.points,
            &blocks,
            crate::record::ms_since_epoch(taken),
        )
        .into_iter()
        .flatten()
        .collect()
}

fn write_failed(device: &str, error: &str) -> Record {
    Record::event("write_failed", json!({ "device": device, "error": error }))
}

/// Why an accepted write did not complete.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("writing {points}: {error}")]
pub struct WriteError {
    pub points: String,
    pub error: TxError,
}

/// Runs `plan` on `bus`: adjacent coils as one FC05/FC15, adjacent registers
/// as one FC06/FC16; a bit inside a register is read first and written back
/// with only that bit changed. Then the written points are read back; the
/// reading is returned when the read succeeds.
pub async fn execute_write(bus: &mut Bus, plan: &WritePlan) -> Result<Option<Reading>, WriteError> {
    let device = &plan.device;
    let mut coils: BTreeMap<Address, (bool, &str)> = BTreeMap::new();
    let mut words: BTreeMap<Address, (u16, &str)> = BTreeMap::new();
    for (point, value) in &plan.writes {
        let name = point.name.as_str();
        let failed = |error| WriteError {
            points: name.to_string(),
            error,
        };
        match (point.area, value) {
            (Area::Coil, Value::Bool(on)) => {
                coils.insert(point.address, (*on, name));
            }
            _ => {
                let current = match (point.kind, words.get(&point.address)) {
                    (Kind::RegisterBit(_), Some((word, _))) => *word,
                    (Kind::RegisterBit(_), None) => {
                        let read = Request::ReadHolding(point.address, 1);
                        match bus.transact(device.unit, &read, device.timeout).await {
                            Ok(Reply::Registers(regs)) if regs.len() == 1 => regs[0],
                            Ok(_) => return Err(failed(TxError::Garbled("no register".into()))),
                            Err(e) => return Err(failed(e)),
                        }
                    }
                    _ => 0,
                };
                let encoded = codec::encode_registers(point, value, current)
                    .map_err(|e| failed(TxError::Garbled(e.to_string())))?;
                for (i, word) in encoded.into_iter().enumerate() {
                    let Some(address) = u16::try_from(i)
                        .ok()
                        .and_then(|i| point.address.checked_add(i))
                    else {
                        return Err(failed(TxError::Garbled("past the address space".into())));
                    };
                    words.insert(address, (word, name));
                }
            }
        }
    }
    let mut requests = requests_for(
        &coils,
        MAX_WRITE_COILS,
        Request::WriteCoil,
        Request::WriteCoils,
    );
    requests.extend(requests_for(
        &words,
        MAX_WRITE_REGISTERS,
        Request::WriteRegister,
        Request::WriteRegisters,
    ));
    for (request, names) in requests {
        if let Err(error) = bus.transact(device.unit, &request, device.timeout).await {
            return Err(WriteError {
                points: names.join(", "),
                error,
            });
        }
    }
    Ok(read_back(bus, plan).await)
}

/// One request per run of consecutive addresses (at most `max` long):
/// `one` for a single item, `many` for several. Each comes with the names
/// of the points it writes.
fn requests_for<'a, T: Copy>(
    items: &BTreeMap<Address, (T, &'a str)>,
    max: u16,
    one: fn(Address, T) -> Request,
    many: fn(Address, Vec<T>) -> Request,
) -> Vec<(Request, Vec<&'a str>)> {
    let mut runs: Vec<Vec<(Address, (T, &str))>> = Vec::new();
    for (&address, &item) in items {
        match runs.last_mut() {
            Some(run)
                if run.len() < usize::from(max)
                    && run
                        .last()
                        .is_some_and(|(a, _)| u32::from(*a) + 1 == u32::from(address)) =>
            {
                run.push((address, item));
            }
            _ => runs.push(vec![(address, item)]),
        }
    }
    runs.into_iter()
        .filter_map(|run| {
            let mut names: Vec<&str> = run.iter().map(|(_, (_, n))| *n).collect();
            names.dedup();
            let request = match run.as_slice() {
                [] => return None,
                [(start, (value, _))] => one(*start, *value),
                [(start, _), ..] => many(*start, run.iter().map(|(_, (v, _))| *v).collect()),
            };
            Some((request, names))
        })
        .collect()
}

/// Reads the written points again, for an immediate report.
async fn read_back(bus: &mut Bus, plan: &WritePlan) -> Option<Reading> {
    let mut device = plan.device.clone();
    device.points = plan.writes.iter().map(|(p, _)| p.clone()).collect();
    let blocks = plan::plan(&device.points, bus.config());
    let taken = SystemTime::now();
    let result = read_device(bus, &device, &blocks).await;
    let mut values = Map::new();
    for (point, value) in device
        .points
        .iter()
        .zip(result.values(&device.points, &blocks))
    {
        if let Some(json) = value.and_then(|v| codec::present(point, &v)) {
            values.insert(point.name.clone(), json);
        }
    }
    if values.is_empty() {
        log::warn!(target: "router", "device {}: written, but the read-back failed", device.name);
        return None;
    }
    Some(Reading {
        device: device.name,
        key: device.key,
        taken,
        values,
    })
}
