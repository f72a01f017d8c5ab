//! The router: downlink messages from the platform → typed jobs for the
//! right bus owner.
//!
//! Each message is parsed ([`downlink`]) and checked against the config
//! before anything is queued: a push as a whole ([`write`]), a command by
//! its method, a raw frame by its CRC, length and unit. Only then does a
//! [`Job`] go to the bus owner, which runs it between two poll transactions
//! and reports its outcome. Rejections are told to the platform within a
//! budget ([`gate`]). Nothing from the network reaches a bus unchecked,
//! nothing of it is echoed unbounded, and nothing panics.

pub mod downlink;
mod gate;
pub mod write;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::bus::RAW_REPLY_MAX;
use crate::config::{BusMode, Config};
use crate::modbus::rtu;
use crate::outbox::Outbox;
use crate::poll::job::{CommandReply, Job, StreamReply};
use crate::record::Record;
use crate::text::{clip, from_hex, quote};
use downlink::{Downlink, Target};
use gate::Gate;

/// One MQTT message from the platform.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Routes downlink messages; one per daemon.
pub struct Router {
    config: Arc<Config>,
    /// Job queue of each bus's owner, by bus name.
    buses: HashMap<String, mpsc::Sender<Job>>,
    outbox: Outbox,
    gate: Gate,
}

impl Router {
    pub fn new(
        config: Arc<Config>,
        buses: HashMap<String, mpsc::Sender<Job>>,
        outbox: Outbox,
    ) -> Self {
        let rate = config.platform.as_ref().and_then(|p| p.max_publish_rate);
        Self {
            config,
            buses,
            outbox,
            gate: Gate::new(rate),
        }
    }

    /// Routes to the bus owners of a new config (after a reload); the
    /// budget carries over.
    pub fn reconfigure(&mut self, config: Arc<Config>, buses: HashMap<String, mpsc::Sender<Job>>) {
        self.config = config;
        self.buses = buses;
    }

    /// Handles one message; malformed ones are logged and dropped.
    pub fn handle(&mut self, message: &Incoming) {
        let Some(platform) = &self.config.platform else {
            return;
        };
        match downlink::parse(&platform.profile, &message.topic, &message.payload) {
            Ok(Downlink::Push(pushes)) => self.push(&pushes),
            Ok(Downlink::Command { target, id, method }) => self.command(&target, id, &method),
            Ok(Downlink::Frame { stream, payload }) => self.frame(&stream, &payload),
            Err(e) => {
                log::warn!(target: "router", "dropped a message on {}: {e}", quote(&message.topic))
            }
        }
    }

    /// Publishes the merged counts of rejections held back by the budget.
    pub fn tick(&mut self) {
        for record in self.gate.summaries() {
            self.outbox.append(record);
        }
    }

    /// Tells the platform of a rejection, within the budget.
    fn reject(&mut self, record: Record) {
        if let Some(record) = self.gate.reject(record) {
            self.outbox.append(record);
        }
    }

    fn push(&mut self, pushes: &[(Target, Map<String, Value>)]) {
        let plans = match write::plan(&self.config, pushes) {
            Ok(plans) => plans,
            Err(rejection) => {
                log::warn!(target: "router", "write rejected, nothing written: {}: {}", quote(&rejection.attribute), rejection.reason);
                let mut params =
                    json!({ "attribute": rejection.attribute, "reason": rejection.reason });
                if let Some(target) = rejection.target {
                    params["target"] = target.into();
                }
                return self.reject(Record::event("write_rejected", params));
            }
        };
        if plans.is_empty() {
            return;
        }
        if !self.gate.admit() {
            log::warn!(target: "router", "write not accepted: too many downlink requests");
            return self.reject(Record::event(
                "write_rejected",
                json!({ "attribute": "", "reason": "too many downlink requests; nothing written" }),
            ));
        }
        for plan in plans {
            let bus = plan.device.bus.clone();
            self.submit(&bus, Job::Write { plan, reply: None });
        }
    }

    fn command(&mut self, target: &Target, id: Value, method: &str) {
        let reply = CommandReply {
            key: match target {
                Target::Key(key) => Some(clip(key)),
                _ => None,
            },
            id,
            method: clip(method),
        };
        let found = self.config.commands.iter().find(|c| {
            c.name == method
                && self
                    .config
                    .device(&c.device)
                    .is_some_and(|d| target.addresses(d))
        });
        let (Some(command), Some(device)) =
            (found, found.and_then(|c| self.config.device(&c.device)))
        else {
            log::warn!(target: "router", "unknown command method {}", quote(method));
            let error = format!("unknown method \"{}\"", clip(method));
            return self.reject(reply.record(Err(error)));
        };
        // Checked when the config was loaded; checked again, never trusted.
        let mut plans = Vec::new();
        for (i, step) in command.writes.iter().enumerate() {
            let target = Target::Device(device.name.clone());
            let values = Map::from_iter([(step.point.clone(), step.value.clone())]);
            match write::plan(&self.config, &[(target, values)]) {
                Ok(plan) => plans.extend(plan),
                Err(r) => {
                    let error = format!(
                        "write {} of {} ({}): {}",
                        i + 1,
                        command.writes.len(),
                        r.attribute,
                        r.reason
                    );
                    return self.reject(reply.record(Err(error)));
                }
            }
        }
        if !self.gate.admit() {
            log::warn!(target: "router", "command {} not accepted: too many downlink requests", command.name);
            return self.reject(reply.record(Err("too many downlink requests; not run".into())));
        }
        let (bus, name) = (device.bus.clone(), command.name.clone());
        self.submit(&bus, Job::Command { name, plans, reply });
    }

    fn frame(&mut self, stream_name: &str, payload: &[u8]) {
        let Some(stream) = self.config.streams.iter().find(|s| s.name == stream_name) else {
            log::warn!(target: "router", "dropped a frame for unknown stream {}", quote(stream_name));
            return;
        };
        let (name, bus) = (stream.name.clone(), stream.bus.clone());
        let reply = StreamReply {
            name: stream.name.clone(),
            encoding: stream.encoding,
        };
        let bytes = match stream.encoding {
            crate::config::Encoding::Binary => payload.to_vec(),
            crate::config::Encoding::Hex => match std::str::from_utf8(payload)
                .map_err(|e| e.to_string())
                .and_then(from_hex)
            {
                Ok(bytes) => bytes,
                Err(e) => return self.frame_rejected(&name, format!("not hex text: {e}")),
            },
        };
        let Some(bus_config) = self.config.bus(&bus) else {
            return self.frame_rejected(&name, format!("bus {bus} is not configured"));
        };
        let job = match bus_config.mode {
            BusMode::Transparent => {
                if bytes.is_empty() || bytes.len() > RAW_REPLY_MAX {
                    let reason = format!("{} bytes; 1 to {RAW_REPLY_MAX} allowed", bytes.len());
                    return self.frame_rejected(&name, reason);
                }
                Job::Exchange {
                    bytes,
                    stream: reply,
                }
            }
            BusMode::Rtu => {
                let (unit, request) = match rtu::parse_request(&bytes) {
                    Ok(parsed) => parsed,
                    Err(e) => return self.frame_rejected(&name, e.to_string()),
                };
                let Some(device) = self.config.devices_on(&bus).find(|d| d.unit == unit) else {
                    return self.frame_rejected(
                        &name,
                        format!("unit {unit} is not configured on bus {bus}"),
                    );
                };
                Job::Frame {
                    unit,
                    request,
                    timeout: device.timeout.unwrap_or(bus_config.timeout),
                    stream: reply,
                }
            }
        };
        if !self.gate.admit() {
            return self.frame_rejected(&name, "too many downlink requests; not sent".into());
        }
        self.submit(&bus, job);
    }

    fn frame_rejected(&mut self, stream: &str, reason: String) {
        log::warn!(target: "router", "stream {stream}: frame not sent: {reason}");
        self.reject(Record::event(
            "frame_rejected",
            json!({ "stream": stream, "reason": reason }),
        ));
    }

    /// Queues `job` for the owner of `bus`, ahead of its next poll
    /// transaction; a job that cannot be queued is answered at once.
    fn submit(&mut self, bus: &str, job: Job) {
        let (job, reason) = match self.buses.get(bus) {
            None => (job, format!("bus {bus} is not running")),
            Some(jobs) => match jobs.try_send(job) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(job)) => (
                    job,
                    format!("bus {bus} is busy: too many queued downlink jobs"),
                ),
                Err(mpsc::error::TrySendError::Closed(job)) => {
                    (job, format!("bus {bus} has stopped"))
                }
            },
        };
        log::warn!(target: "router", "{reason}");
        for record in job.refuse(&reason) {
            self.reject(record);
        }
    }
}
