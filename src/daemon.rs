//! `fieldgate run`: wires config → one poller per bus → outbox → platform,
//! and platform → router → the pollers' job queues. The outbox lives as
//! long as the process; SIGHUP swaps the pollers and the router for a newly
//! loaded config (and the MQTT connection only if `[platform]` changed).
//! Tells systemd when it is ready, what it is doing, and that it is alive.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::bus::Bus;
use crate::commands::Usage;
use crate::config::{self, Config, Platform};
use crate::outbox::{Body, Outbox, Record};
use crate::platform;
use crate::poll::{Job, Poller};
use crate::router::{Incoming, Router};

/// Readings and events on their way to the outbox (a few ms each).
const UPLINK_QUEUE: usize = 1024;
/// Downlink messages waiting for the router.
const DOWNLINK_QUEUE: usize = 256;
/// How often STATUS= is updated and the pollers are probed for the watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The pollers of one config and the router that feeds them jobs.
struct Field {
    stop: watch::Sender<bool>,
    pollers: Vec<JoinHandle<()>>,
    jobs: HashMap<String, mpsc::Sender<Job>>,
    router: Router,
}

impl Field {
    /// Opens the buses of `config` and starts a poller on each one that has
    /// devices or a stream.
    fn start(config: &Config, uplink: &mpsc::Sender<Record>, outbox: &Arc<Outbox>) -> Self {
        let (stop, stopped) = watch::channel(false);
        let mut pollers = Vec::new();
        let mut jobs = HashMap::new();
        for bus_config in &config.buses {
            let devices: Vec<_> = config.devices_on(&bus_config.name).cloned().collect();
            let streamed = config.streams.iter().any(|s| s.bus == bus_config.name);
            if devices.is_empty() && !streamed {
                continue;
            }
            let mut bus = Bus::new(bus_config.clone());
            // A missing adapter is not fatal: the bus keeps trying to reopen it.
            let _ = bus.ensure_open();
            let (poller, job_tx) = Poller::new(bus, devices, uplink.clone());
            jobs.insert(bus_config.name.clone(), job_tx);
            pollers.push(tokio::spawn(poller.run(stopped.clone())));
        }
        let router = Router::new(Arc::new(config.clone()), jobs.clone(), outbox.clone());
        Self {
            stop,
            pollers,
            jobs,
            router,
        }
    }

    /// Stops polling (a transaction in progress is cut short) and waits for
    /// the pollers, which closes their ports.
    async fn stop(self) {
        self.stop.send_replace(true);
        for poller in self.pollers {
            let _ = poller.await;
        }
    }

    /// Asks every poller to run a no-op job; the receivers resolve once each
    /// has done so, which proves its task is not stuck.
    fn probe(&self) -> Vec<(String, oneshot::Receiver<()>)> {
        self.jobs
            .iter()
            .map(|(name, jobs)| {
                let (tx, rx) = oneshot::channel();
                let job: Job = Box::new(move |_| {
                    Box::pin(async move {
                        let _ = tx.send(());
                    })
                });
                // A full queue leaves `rx` unanswered: reported as stuck.
                let _ = jobs.try_send(job);
                (name.clone(), rx)
            })
            .collect()
    }
}

/// The MQTT connection task and its own stop switch.
struct Uplink {
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Uplink {
    fn start(
        gateway_id: &str,
        platform: &Platform,
        outbox: &Arc<Outbox>,
        downlink: &mpsc::Sender<Incoming>,
        connected: &Arc<AtomicBool>,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (id, platform, outbox, downlink, connected) = (
            gateway_id.to_string(),
            platform.clone(),
            outbox.clone(),
            downlink.clone(),
            connected.clone(),
        );
        let task = tokio::spawn(async move {
            platform::run(&id, &platform, outbox, Some(downlink), connected, stopped).await
        });
        Self { stop, task }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        self.task.await.context("platform task")?
    }
}

/// Runs the daemon until `shutdown` turns true. `config_path` is read again
/// on SIGHUP (`None`: the built-in demo config, nothing to reload).
pub async fn run(
    config_path: Option<&Path>,
    config: Config,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let Some(platform) = config.platform.clone() else {
        return Err(Usage("the config has no [platform] section; `run` needs one".into()).into());
    };
    let mut hangup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    let outbox = Arc::new(Outbox::open(
        &config.gateway.data_dir,
        config.buffer.max_bytes,
    )?);
    let maintain = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.maintain().await })
    };
    let offline = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let (uplink_tx, uplink_rx) = mpsc::channel::<Record>(UPLINK_QUEUE);
    let store = tokio::spawn(store(uplink_rx, outbox.clone(), offline.clone()));
    let (downlink_tx, mut downlink_rx) = mpsc::channel(DOWNLINK_QUEUE);
    let connected = Arc::new(AtomicBool::new(false));

    let mut field = Field::start(&config, &uplink_tx, &outbox);
    let mut uplink = Uplink::start(
        &config.gateway.id,
        &platform,
        &outbox,
        &downlink_tx,
        &connected,
    );
    log::info!(
        target: "daemon",
        "gateway {} started: {} buses, {} devices, platform {}:{}",
        config.gateway.id,
        field.pollers.len(),
        config.devices.len(),
        platform.host,
        platform.port
    );
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    let mut config = config;
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut probes = Vec::new();
    let result = loop {
        tokio::select! {
            () = crate::stopped(&mut shutdown) => break Ok(()),
            _ = hangup.recv() => {
                let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
                match reload(config_path, &config) {
                    Ok(new) => {
                        field.stop().await;
                        field = Field::start(&new, &uplink_tx, &outbox);
                        // Probes sent to the old pollers will never be answered.
                        probes.clear();
                        if new.platform != config.platform {
                            if let Some(platform) = &new.platform {
                                if let Err(e) = uplink.stop().await {
                                    log::warn!(target: "daemon", "{e:#}");
                                }
                                uplink = Uplink::start(&new.gateway.id, platform, &outbox, &downlink_tx, &connected);
                            }
                        }
                        log::info!(target: "daemon", "reloaded the config: {} buses, {} devices", field.pollers.len(), new.devices.len());
                        config = new;
                    }
                    Err(e) => log::error!(target: "daemon", "reload failed, the running config stays: {e:#}"),
                }
                let _ = sd_notify::notify(false, &[NotifyState::Ready]);
            }
            Some(message) = downlink_rx.recv() => field.router.handle(&message),
            ended = &mut uplink.task => break ended.context("platform task").and_then(|r| r),
            _ = status.tick() => {
                let stuck: Vec<String> = probes
                    .drain(..)
                    .filter_map(|(name, mut rx): (String, oneshot::Receiver<()>)| rx.try_recv().is_err().then_some(name))
                    .collect();
                let line = status_line(&config, &offline, &outbox, connected.load(Ordering::Relaxed));
                let mut states = vec![NotifyState::Status(&line)];
                if stuck.is_empty() {
                    states.push(NotifyState::Watchdog);
                } else {
                    log::error!(target: "daemon", "bus {} did not run a watchdog probe within {}s; not pinging the watchdog", stuck.join(", "), STATUS_EVERY.as_secs());
                }
                let _ = sd_notify::notify(false, &states);
                probes = field.probe();
            }
        }
    };
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    field.stop().await;
    if !uplink.task.is_finished() {
        uplink.stop().await.ok();
    }
    drop(uplink_tx);
    let _ = store.await;
    maintain.abort();
    outbox.flush()?;
    log::info!(target: "daemon", "stopped");
    result
}

/// Loads `path` for a reload. Settings that only a restart can apply are
/// kept as they run, with a warning.
fn reload(path: Option<&Path>, running: &Config) -> anyhow::Result<Config> {
    let Some(path) = path else {
        anyhow::bail!("the demo runs on a built-in config; there is no file to reload");
    };
    let mut new = config::load(path)?;
    if new.platform.is_none() {
        anyhow::bail!("the new config has no [platform] section");
    }
    if new.gateway != running.gateway || new.buffer.max_bytes != running.buffer.max_bytes {
        log::warn!(target: "daemon", "[gateway] and [buffer] changes take effect at the next restart");
        new.gateway = running.gateway.clone();
        new.buffer = running.buffer.clone();
    }
    Ok(new)
}

/// Appends every uplink record to the outbox, and keeps the set of devices
/// whose last event said offline (for STATUS=).
async fn store(
    mut records: mpsc::Receiver<Record>,
    outbox: Arc<Outbox>,
    offline: Arc<std::sync::Mutex<HashSet<String>>>,
) {
    while let Some(record) = records.recv().await {
        if let Body::Event { method, params, .. } = &record.body {
            if let Some(device) = params.get("device").and_then(|d| d.as_str()) {
                let mut offline = offline.lock().unwrap_or_else(|e| e.into_inner());
                match method.as_str() {
                    "device_offline" => offline.insert(device.to_string()),
                    "device_online" => offline.remove(device),
                    _ => false,
                };
            }
        }
        outbox.push(&record);
    }
}

/// One line for `systemctl status`: devices online, outbox depth, uplink.
fn status_line(
    config: &Config,
    offline: &std::sync::Mutex<HashSet<String>>,
    outbox: &Outbox,
    connected: bool,
) -> String {
    let offline = offline.lock().unwrap_or_else(|e| e.into_inner());
    let down = config
        .devices
        .iter()
        .filter(|d| offline.contains(&d.name))
        .count();
    let stats = outbox.stats();
    format!(
        "{}/{} devices online, outbox {} messages ({} dropped), uplink {}",
        config.devices.len() - down,
        config.devices.len(),
        stats.messages,
        stats.dropped,
        if connected { "connected" } else { "down" }
    )
}

/// A shutdown signal that turns true on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => log::info!(target: "daemon", "SIGTERM: stopping"),
            _ = int.recv() => log::info!(target: "daemon", "SIGINT: stopping"),
        }
        tx.send_replace(true);
    });
    Ok(rx)
}
