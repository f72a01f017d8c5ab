//! The router: downlink messages from the platform → jobs on the right bus.
//!
//! Each message is parsed ([`downlink`]) and checked against the config
//! before anything is queued: a push as a whole ([`write`]), a command by
//! its method, a raw frame by its CRC, length and unit. Only then does a job
//! go to the bus owner, which runs it between two poll transactions. Replies,
//! events and read-back reports go to the outbox like every uplink message.
//! Nothing from the network reaches a bus unchecked, and nothing panics.

pub mod downlink;
pub mod write;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, watch};

use crate::bus::{frame, Bus};
use crate::config::{BusMode, Config, Encoding};
use crate::outbox::{Body, Outbox, Record};
use crate::poll::Job;
use downlink::{Downlink, Target};

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
    outbox: Arc<Outbox>,
}

impl Router {
    pub fn new(
        config: Arc<Config>,
        buses: HashMap<String, mpsc::Sender<Job>>,
        outbox: Arc<Outbox>,
    ) -> Self {
        Self {
            config,
            buses,
            outbox,
        }
    }

    /// Handles downlink messages until `shutdown` or the platform side ends.
    pub async fn run(
        self,
        mut incoming: mpsc::Receiver<Incoming>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                () = crate::stopped(&mut shutdown) => return,
                message = incoming.recv() => match message {
                    Some(message) => self.handle(&message),
                    None => return,
                },
            }
        }
    }

    /// Handles one message; malformed ones are logged and dropped.
    pub fn handle(&self, message: &Incoming) {
        let Some(platform) = &self.config.platform else {
            return;
        };
        match downlink::parse(&platform.profile, &message.topic, &message.payload) {
            Ok(Downlink::Push(pushes)) => self.push(&pushes),
            Ok(Downlink::Command { target, id, method }) => self.command(&target, id, &method),
            Ok(Downlink::Frame { stream, payload }) => self.frame(&stream, &payload),
            Err(e) => {
                log::warn!(target: "router", "dropped a message on {:?}: {e}", truncate(&message.topic))
            }
        }
    }

    fn push(&self, pushes: &[(Target, Map<String, Value>)]) {
        let plans = match write::plan(&self.config, pushes) {
            Ok(plans) => plans,
            Err(rejection) => {
                log::warn!(target: "router", "write rejected, nothing written: {}: {}", truncate(&rejection.attribute), rejection.reason);
                let mut params =
                    json!({ "attribute": rejection.attribute, "reason": rejection.reason });
                if let Some(target) = rejection.target {
                    params["target"] = target.into();
                }
                self.outbox.push(&Record::event("write_rejected", params));
                return;
            }
        };
        for plan in plans {
            let outbox = self.outbox.clone();
            let (bus, device) = (plan.device.bus.clone(), plan.device.name.clone());
            self.submit(&bus, move |bus| {
                Box::pin(async move {
                    match write::execute(bus, &plan).await {
                        Ok(reading) => {
                            log::info!(target: "router", device = plan.device.name.as_str(); "device {}: wrote {}", plan.device.name, names(&plan));
                            if let Some(reading) = reading {
                                outbox.push(&reading.into());
                            }
                        }
                        Err(e) => {
                            log::warn!(target: "router", device = plan.device.name.as_str(); "device {}: {e}", plan.device.name);
                            outbox.push(&Record::event(
                                "write_failed",
                                json!({ "device": plan.device.name, "error": e.to_string() }),
                            ));
                        }
                    }
                })
            })
            .unwrap_or_else(|reason| {
                self.outbox.push(&Record::event(
                    "write_failed",
                    json!({ "device": device, "error": reason }),
                ));
            });
        }
    }

    fn command(&self, target: &Target, id: Value, method: &str) {
        let key = match target {
            Target::Key(key) => Some(key.clone()),
            _ => None,
        };
        let reply = {
            let (key, id, method) = (key.clone(), id.clone(), method.to_string());
            move |result: Result<(), String>| {
                let params = match result {
                    Ok(()) => json!({ "ok": true }),
                    Err(error) => json!({ "ok": false, "error": error }),
                };
                Record::now(Body::Reply {
                    key,
                    id,
                    method,
                    params: params.as_object().cloned().unwrap_or_default(),
                })
            }
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
            log::warn!(target: "router", "unknown command method {:?}", truncate(method));
            self.outbox
                .push(&reply(Err(format!("unknown method {method:?}"))));
            return;
        };
        // Checked when the config was loaded; checked again, never trusted.
        let mut plans = Vec::new();
        for (i, step) in command.writes.iter().enumerate() {
            let target = Target::Device(device.name.clone());
            let values = Map::from_iter([(step.point.clone(), step.value.clone())]);
            match write::plan(&self.config, &[(target, values)]) {
                Ok(mut plan) if plan.len() == 1 => plans.push(plan.remove(0)),
                Ok(_) => {
                    return self
                        .outbox
                        .push(&reply(Err(format!("write {} has no point", i + 1))))
                }
                Err(r) => {
                    let error = format!(
                        "write {} of {} ({}): {}",
                        i + 1,
                        command.writes.len(),
                        r.attribute,
                        r.reason
                    );
                    return self.outbox.push(&reply(Err(error)));
                }
            }
        }
        let outbox = self.outbox.clone();
        let name = command.name.clone();
        let reply_to = reply.clone();
        let submitted = self.submit(&device.bus, move |bus| {
            Box::pin(async move {
                let total = plans.len();
                let mut result = Ok(());
                for (i, plan) in plans.iter().enumerate() {
                    if let Err(e) = write::execute(bus, plan).await {
                        result = Err(format!(
                            "write {} of {total} ({}): {}",
                            i + 1,
                            e.points,
                            e.error
                        ));
                        break;
                    }
                }
                match &result {
                    Ok(()) => log::info!(target: "router", "command {name}: done"),
                    Err(e) => log::warn!(target: "router", "command {name}: {e}"),
                }
                outbox.push(&reply_to(result));
            })
        });
        if let Err(reason) = submitted {
            self.outbox.push(&reply(Err(reason)));
        }
    }

    fn frame(&self, stream_name: &str, payload: &[u8]) {
        let Some(stream) = self.config.streams.iter().find(|s| s.name == stream_name) else {
            log::warn!(target: "router", "dropped a frame for unknown stream {:?}", truncate(stream_name));
            return;
        };
        let rejected = |reason: String| {
            log::warn!(target: "router", "stream {}: frame not sent: {reason}", stream.name);
            self.outbox.push(&Record::event(
                "frame_rejected",
                json!({ "stream": stream.name, "reason": reason }),
            ));
        };
        let bytes = match stream.encoding {
            Encoding::Binary => payload.to_vec(),
            Encoding::Hex => match std::str::from_utf8(payload)
                .map_err(|e| e.to_string())
                .and_then(frame::from_hex)
            {
                Ok(bytes) => bytes,
                Err(e) => return rejected(format!("not hex text: {e}")),
            },
        };
        let Some(bus_config) = self.config.bus(&stream.bus) else {
            return rejected(format!("bus {} is not configured", stream.bus));
        };
        let encoding = stream.encoding;
        let name = stream.name.clone();
        let outbox = self.outbox.clone();
        let respond = move |result: Result<Vec<u8>, String>| match result {
            Ok(reply) => {
                let payload = match encoding {
                    Encoding::Binary => reply,
                    Encoding::Hex => frame::to_hex(&reply).into_bytes(),
                };
                outbox.push(&Record::now(Body::Stream { name, payload }));
            }
            Err(error) => {
                log::warn!(target: "router", "stream {name}: {error}");
                outbox.push(&Record::event(
                    "frame_timeout",
                    json!({ "stream": name, "error": error }),
                ));
            }
        };
        let submitted = match bus_config.mode {
            BusMode::Transparent => {
                if bytes.is_empty() || bytes.len() > crate::bus::RAW_REPLY_MAX {
                    return rejected(format!(
                        "{} bytes; 1 to {} allowed",
                        bytes.len(),
                        crate::bus::RAW_REPLY_MAX
                    ));
                }
                self.submit(&stream.bus, move |bus| {
                    Box::pin(async move {
                        respond(bus.exchange(&bytes).await.map_err(|e| e.to_string()));
                    })
                })
            }
            BusMode::Rtu => {
                let (unit, request) = match frame::parse_request(&bytes) {
                    Ok(parsed) => parsed,
                    Err(e) => return rejected(e.to_string()),
                };
                let Some(device) = self.config.devices_on(&stream.bus).find(|d| d.unit == unit)
                else {
                    return rejected(format!(
                        "unit {unit} is not configured on bus {}",
                        stream.bus
                    ));
                };
                let timeout = device.timeout.unwrap_or(bus_config.timeout);
                self.submit(&stream.bus, move |bus| {
                    Box::pin(async move {
                        let outcome = bus.attempt(unit, &request, timeout).await;
                        respond(match frame::response_frame(unit, &request, &outcome) {
                            Some(reply) => Ok(reply),
                            None => Err(outcome.err().map_or_else(String::new, |e| e.to_string())),
                        });
                    })
                })
            }
        };
        if let Err(reason) = submitted {
            rejected(reason);
        }
    }

    /// Queues `job` for the owner of `bus`, ahead of its next transaction.
    fn submit(
        &self,
        bus: &str,
        job: impl for<'a> FnOnce(&'a mut Bus) -> futures::future::BoxFuture<'a, ()> + Send + 'static,
    ) -> Result<(), String> {
        let Some(jobs) = self.buses.get(bus) else {
            return Err(format!("bus {bus} is not running"));
        };
        jobs.try_send(Box::new(job)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                format!("bus {bus} is busy: too many queued downlink jobs")
            }
            mpsc::error::TrySendError::Closed(_) => format!("bus {bus} has stopped"),
        })
    }
}

fn names(plan: &write::WritePlan) -> String {
    plan.writes
        .iter()
        .map(|(p, _)| p.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// At most 64 characters of something from the network, for a log line.
fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}
