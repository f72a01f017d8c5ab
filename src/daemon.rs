//! `fieldgate run`: starts the tasks and holds only their handles.
//!
//! | task | owns | talks to |
//! |---|---|---|
//! | outbox owner (a thread) | the sled store | — (everyone sends it messages) |
//! | one bus owner per bus | the port, its devices' state | outbox (appends) |
//! | the MQTT task | the connection, the publisher | outbox (reads, acks), this task (downlink) |
//! | the local API | its connections | [`Live`] (reads), bus owners (jobs) |
//! | this task | the router, reload, watchdog, stats | bus owners (jobs) |
//!
//! SIGHUP swaps the bus owners (and the MQTT connection if `[platform]`
//! changed) for a newly loaded config; the outbox lives as long as the
//! process. systemd hears when the daemon is ready, what it is doing, and
//! that every bus owner is alive.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api;
use crate::bus::dialin::Listener;
use crate::bus::tap::ModbusMetrics;
use crate::bus::Bus;
use crate::config::{self, Config, Platform};
use crate::live::{FieldView, Live, UplinkStats};
use crate::outbox::Outbox;
use crate::platform;
use crate::platform::budget::Budget;
use crate::poll::job::Job;
use crate::poll::{BusHandle, BusTask, StopReason};
use crate::record::{Body, Reading, Record};
use crate::router::{Incoming, Router};
use crate::Usage;

/// Downlink messages waiting for the router.
const DOWNLINK_QUEUE: usize = 256;
/// How often STATUS= is updated, the watchdog pinged and the router's
/// budget summaries published.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The bus owners of one config.
struct Field {
    stop: watch::Sender<Option<StopReason>>,
    tasks: Vec<JoinHandle<()>>,
    /// One per `listen` address of dial-in buses.
    listeners: Vec<JoinHandle<()>>,
    buses: Vec<(String, BusHandle)>,
}

impl Field {
    /// Starts an owner on each bus that has devices or a stream, and a
    /// listener on each address dial-in buses share.
    fn start(config: &Config, outbox: &Outbox, metrics: &ModbusMetrics) -> Self {
        let (stop, stopped) = watch::channel(None);
        let mut tasks = Vec::new();
        let mut buses = Vec::new();
        let used: Vec<&config::Bus> = config
            .buses
            .iter()
            .filter(|b| {
                config.devices_on(&b.name).next().is_some()
                    || config.streams.iter().any(|s| s.bus == b.name)
            })
            .collect();
        let (mut incoming, listeners) = dial_in_listeners(&used);
        for bus_config in used {
            let devices: Vec<_> = config.devices_on(&bus_config.name).cloned().collect();
            let mut bus = match bus_config.transport {
                config::Transport::DialIn { .. } => {
                    Bus::dial_in(bus_config.clone(), incoming.remove(&bus_config.name))
                }
                _ => Bus::new(bus_config.clone()),
            };
            bus.open_now();
            let (task, handle) = BusTask::new(bus, devices, outbox.clone(), metrics);
            buses.push((bus_config.name.clone(), handle));
            tasks.push(tokio::spawn(task.run(stopped.clone())));
        }
        Self {
            stop,
            tasks,
            listeners,
            buses,
        }
    }

    /// What the local API sees of these bus owners.
    fn view(&self, config: &Config) -> Arc<FieldView> {
        Arc::new(FieldView {
            config: Arc::new(config.clone()),
            buses: self.buses.iter().map(|(_, h)| h.clone()).collect(),
        })
    }

    fn jobs(&self) -> HashMap<String, mpsc::Sender<Job>> {
        self.buses
            .iter()
            .map(|(name, handle)| (name.clone(), handle.jobs.clone()))
            .collect()
    }

    /// Stops every bus owner: polls in progress are cut short, jobs in
    /// progress finish, queued jobs are answered with `reason`.
    async fn stop(self, reason: StopReason) {
        self.stop.send_replace(Some(reason));
        for listener in self.listeners {
            listener.abort();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }

    /// Buses whose owner broke its liveness promise.
    fn stuck(&self) -> Vec<&str> {
        self.buses
            .iter()
            .filter(|(_, handle)| handle.alive.overdue())
            .map(|(name, _)| name.as_str())
            .collect()
    }

    /// (devices online, devices polled so far).
    fn online(&self) -> (usize, usize) {
        let mut counts = (0, 0);
        for (_, handle) in &self.buses {
            for device in handle.devices.borrow().iter() {
                if device.online != Some(false) {
                    counts.0 += 1;
                }
                counts.1 += 1;
            }
        }
        counts
    }
}

/// One listener per `listen` address among `buses`, and each dial-in bus's
/// end of its handover channel, by bus name.
fn dial_in_listeners(
    buses: &[&config::Bus],
) -> (
    HashMap<String, mpsc::Receiver<tokio::net::TcpStream>>,
    Vec<JoinHandle<()>>,
) {
    let mut by_listen: HashMap<std::net::SocketAddr, Vec<&config::Bus>> = HashMap::new();
    for bus in buses {
        if let config::Transport::DialIn { listen, .. } = bus.transport {
            by_listen.entry(listen).or_default().push(bus);
        }
    }
    let mut incoming = HashMap::new();
    let mut tasks = Vec::new();
    for group in by_listen.into_values() {
        let (receivers, listener) = Listener::for_buses(group);
        incoming.extend(receivers);
        tasks.push(tokio::spawn(listener.run()));
    }
    (incoming, tasks)
}

/// The MQTT connection task and its own stop switch.
struct Uplink {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Uplink {
    fn start(
        gateway_id: &str,
        platform: &Platform,
        outbox: &Outbox,
        downlink: &mpsc::Sender<Incoming>,
        uplink: &Arc<UplinkStats>,
        budget: &watch::Receiver<Option<Budget>>,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let (id, platform, outbox, downlink, uplink, budget) = (
            gateway_id.to_string(),
            platform.clone(),
            outbox.clone(),
            downlink.clone(),
            uplink.clone(),
            budget.clone(),
        );
        let task = tokio::spawn(async move {
            platform::run(
                &id,
                &platform,
                outbox,
                Some(downlink),
                uplink,
                budget,
                stopped,
            )
            .await;
        });
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// The local API task and its own stop switch.
struct ApiTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ApiTask {
    fn start(api: &config::Api, live: &Arc<Live>) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(api::serve(api.clone(), live.clone(), stopped));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
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
    let outbox = Outbox::start(&config.gateway.data_dir, config.buffer.max_bytes)?;
    let (downlink_tx, mut downlink_rx) = mpsc::channel(DOWNLINK_QUEUE);
    let uplink_stats = Arc::new(UplinkStats::default());
    let (budget_tx, budget) = watch::channel(platform_budget(&config));
    let metrics = ModbusMetrics::default();

    let mut field = Field::start(&config, &outbox, &metrics);
    let (view_tx, view) = watch::channel(field.view(&config));
    let live = Arc::new(Live::new(
        &config,
        view,
        outbox.clone(),
        uplink_stats.clone(),
        metrics.clone(),
    ));
    let mut api_task = ApiTask::start(&config.api, &live);
    let mut router = Router::new(Arc::new(config.clone()), field.jobs(), outbox.clone());
    let mut uplink = Uplink::start(
        &config.gateway.id,
        &platform,
        &outbox,
        &downlink_tx,
        &uplink_stats,
        &budget,
    );
    log::info!(
        target: "daemon",
        "gateway {} started: {} buses, {} devices, platform {}:{}",
        config.gateway.id,
        field.buses.len(),
        config.devices.len(),
        platform.host,
        platform.port
    );
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
    let mut config = config;
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut stats = stats_timer(&platform);
    loop {
        tokio::select! {
            () = crate::stopped(&mut shutdown) => break,
            _ = hangup.recv() => {
                let _ = sd_notify::notify(false, &[NotifyState::Reloading]);
                match reload(config_path, &config) {
                    Ok(new) => {
                        field.stop("the config was reloaded").await;
                        field = Field::start(&new, &outbox, &metrics);
                        view_tx.send_replace(field.view(&new));
                        router.reconfigure(Arc::new(new.clone()), field.jobs());
                        if new.api != config.api {
                            api_task.stop().await;
                            api_task = ApiTask::start(&new.api, &live);
                        }
                        budget_tx.send_replace(platform_budget(&new));
                        if new.platform != config.platform {
                            if let Some(platform) = &new.platform {
                                uplink.stop().await;
                                uplink = Uplink::start(&new.gateway.id, platform, &outbox, &downlink_tx, &uplink_stats, &budget);
                                stats = stats_timer(platform);
                            }
                        }
                        log::info!(target: "daemon", "reloaded the config: {} buses, {} devices", field.buses.len(), new.devices.len());
                        config = new;
                    }
                    Err(e) => log::error!(target: "daemon", "reload failed, the running config stays: {e:#}"),
                }
                let _ = sd_notify::notify(false, &[NotifyState::Ready]);
            }
            Some(message) = downlink_rx.recv() => router.handle(&message),
            _ = async { match stats.as_mut() { Some(t) => t.tick().await, None => std::future::pending().await } } => {
                if let Some(record) = stats_record(&live, config.platform.as_ref()) {
                    outbox.append(record);
                }
            }
            _ = status.tick() => {
                router.tick();
                let line = status_line(&field, &outbox, uplink_stats.connected());
                let mut states = vec![NotifyState::Status(&line)];
                let stuck = field.stuck();
                if stuck.is_empty() {
                    states.push(NotifyState::Watchdog);
                } else {
                    log::error!(target: "daemon", "bus {} is stuck (its owner missed its liveness deadline); not pinging the watchdog", stuck.join(", "));
                }
                let _ = sd_notify::notify(false, &states);
            }
        }
    }
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    api_task.stop().await;
    field.stop("the daemon is stopping").await;
    uplink.stop().await;
    outbox.close().await?;
    log::info!(target: "daemon", "stopped");
    Ok(())
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

/// The `[platform] stats` interval, first due one interval from now.
fn stats_timer(platform: &Platform) -> Option<tokio::time::Interval> {
    let every = platform.stats?;
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Some(timer)
}

/// The gateway's health for the platform (SPEC §10): gateway attributes
/// on ThingsCloud, `<prefix>/stats` on the generic profile. Health is
/// about now: while the uplink is down none is queued.
fn stats_record(live: &Live, platform: Option<&Platform>) -> Option<Record> {
    if !live.uplink.connected() {
        return None;
    }
    Some(match &platform?.profile {
        config::Profile::ThingsCloud { .. } => Record::from(Reading {
            device: live.gateway.clone(),
            key: None,
            taken: std::time::SystemTime::now(),
            values: live.stats_attributes(),
        }),
        config::Profile::Generic { .. } => Record::now(Body::Stats {
            status: match live.status(false) {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
        }),
    })
}

/// The budget of `config`, with a warning when it cannot keep up.
fn platform_budget(config: &Config) -> Option<Budget> {
    let budget = Budget::of(config)?;
    if budget.over() {
        log::warn!(target: "daemon", "{}", budget.advice());
    }
    Some(budget)
}

/// One line for `systemctl status`: devices online, outbox depth, uplink.
fn status_line(field: &Field, outbox: &Outbox, connected: bool) -> String {
    let (online, total) = field.online();
    let stats = outbox.stats();
    format!(
        "{online}/{total} devices online, outbox {} messages ({} dropped), uplink {}",
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
