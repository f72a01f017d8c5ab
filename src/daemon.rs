//! `fieldgate run`: wires config → one poller per bus → outbox → platform,
//! and platform → router → the pollers' job queues; stops them all on
//! shutdown with the outbox flushed.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use crate::bus::Bus;
use crate::commands::Usage;
use crate::config::Config;
use crate::outbox::{Outbox, Record};
use crate::platform;
use crate::poll::Poller;
use crate::router::Router;

/// Readings and events on their way to the outbox (a few ms each).
const UPLINK_QUEUE: usize = 1024;
/// Downlink messages waiting for the router.
const DOWNLINK_QUEUE: usize = 256;

/// Runs the daemon until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let Some(platform) = config.platform.clone() else {
        return Err(Usage("the config has no [platform] section; `run` needs one".into()).into());
    };
    let outbox = Arc::new(Outbox::open(
        &config.gateway.data_dir,
        config.buffer.max_bytes,
    )?);
    let (uplink_tx, mut uplink_rx) = mpsc::channel::<Record>(UPLINK_QUEUE);
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
        let (poller, job_tx) = Poller::new(bus, devices, uplink_tx.clone());
        jobs.insert(bus_config.name.clone(), job_tx);
        pollers.push(tokio::spawn(poller.run(shutdown.clone())));
    }
    drop(uplink_tx);
    log::info!(
        target: "daemon",
        "gateway {} started: {} buses, {} devices, platform {}:{}",
        config.gateway.id,
        pollers.len(),
        config.devices.len(),
        platform.host,
        platform.port
    );
    // Every reading is in the outbox before anything tries to send it.
    let store = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            while let Some(record) = uplink_rx.recv().await {
                outbox.push(&record);
            }
        })
    };
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_QUEUE);
    let router = Router::new(Arc::new(config.clone()), jobs, outbox.clone());
    let router = tokio::spawn(router.run(downlink_rx, shutdown.clone()));
    let status = {
        let outbox = outbox.clone();
        tokio::spawn(async move { outbox.maintain().await })
    };
    let uplink = platform::run(
        &config.gateway.id,
        &platform,
        outbox.clone(),
        Some(downlink_tx),
        shutdown,
    );
    uplink.await.context("platform connection")?;
    let _ = router.await;
    for poller in pollers {
        let _ = poller.await;
    }
    let _ = store.await;
    status.abort();
    outbox.flush()?;
    log::info!(target: "daemon", "stopped");
    Ok(())
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
