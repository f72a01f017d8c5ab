//! `fieldgate demo`: the no-hardware quick start. Simulated slaves on a
//! pseudo-terminal, an embedded MQTT broker, and the real daemon pipeline
//! between them; prints what the platform side receives until Ctrl-C.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::commands::simulate;
use crate::{broker, config, daemon};

/// The built-in demo config (also in the repository as config/demo.toml).
pub const DEMO_CONFIG: &str = include_str!("../../config/demo.toml");

pub async fn run() -> anyhow::Result<()> {
    let mut config = config::parse(Path::new("config/demo.toml"), DEMO_CONFIG)?;
    // A fresh, private outbox per run (mode 0700, an unpredictable name):
    // a demo never replays an earlier one's backlog, and no other user can
    // plant or read it. Removed when the demo ends.
    let data_dir = tempfile::Builder::new()
        .prefix("fieldgate-demo-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .context("creating the demo's data directory")?;
    config.gateway.data_dir = data_dir.path().to_path_buf();
    let lines = simulate::start(&config, true).await?;
    for line in &lines {
        if let Some(bus) = config.buses.iter_mut().find(|b| b.name == line.bus) {
            line.apply(bus);
        }
    }
    let port = broker::free_port()?;
    let listen = broker::start(port).context("starting the embedded broker")?;
    let platform = config
        .platform
        .as_mut()
        .context("demo config has a platform")?;
    platform.host = listen.ip().to_string();
    platform.port = listen.port();

    println!("fieldgate demo: simulated slaves + embedded MQTT broker on {listen} + the daemon");
    for line in &lines {
        println!("  bus {} simulated on {}", line.bus, line.describe());
    }
    println!("  what the platform receives (Ctrl-C stops):");

    let mut options = MqttOptions::new("demo-platform", listen.ip().to_string(), listen.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    client.subscribe("#", QoS::AtLeastOnce).await?;
    let printer = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => println!(
                    "  [{:>6.1}s] {}  {}",
                    start.elapsed().as_secs_f64(),
                    p.topic,
                    String::from_utf8_lossy(&p.payload)
                ),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });

    let shutdown = daemon::shutdown_on_signals()?;
    let daemon_config = config.clone();
    tokio::select! {
        result = daemon::run(None, daemon_config, shutdown) => result?,
        () = simulate::animate(&config, &lines) => {}
    }
    printer.abort();
    drop(data_dir);
    Ok(())
}
