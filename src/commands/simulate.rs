//! `fieldgate simulate`: the configured devices as RTU slaves on
//! pseudo-terminals, with changing values, until Ctrl-C.

use std::time::Duration;

use crate::config::{BusMode, Config};
use crate::sim::{self, Pty, Slaves};

/// Starts one simulated line per rtu bus that has devices.
pub fn start(config: &Config, wire_time: bool) -> anyhow::Result<Vec<(String, Pty, Slaves)>> {
    let mut lines = Vec::new();
    for bus in config.buses.iter().filter(|b| b.mode == BusMode::Rtu) {
        let devices: Vec<_> = config.devices_on(&bus.name).collect();
        if devices.is_empty() {
            continue;
        }
        let mut slaves = Slaves::for_devices(devices.iter().copied());
        if wire_time {
            slaves = slaves.with_wire_time(bus);
        }
        let pty = slaves.serve()?;
        lines.push((bus.name.clone(), pty, slaves));
    }
    Ok(lines)
}

/// Keeps the synthetic values moving (once a second) until cancelled.
pub async fn animate(config: &Config, lines: &[(String, Pty, Slaves)]) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = sim::now_seconds();
        for (bus, _, slaves) in lines {
            let devices: Vec<_> = config.devices_on(bus).collect();
            slaves.animate(&devices, t);
        }
    }
}

pub async fn run(config: &Config, wire_time: bool) -> anyhow::Result<()> {
    let lines = start(config, wire_time)?;
    if lines.is_empty() {
        anyhow::bail!("no rtu bus with devices to simulate");
    }
    for (bus, pty, _) in &lines {
        let units: Vec<String> = config
            .devices_on(bus)
            .map(|d| format!("{} (unit {})", d.name, d.unit))
            .collect();
        println!(
            "bus {bus}: {}  serving {}",
            pty.path.display(),
            units.join(", ")
        );
    }
    println!(
        "set each bus's port to the path above and run fieldgate against it{}; Ctrl-C stops",
        if wire_time {
            " (answers take real wire time at the configured baud)"
        } else {
            ""
        }
    );
    tokio::select! {
        () = animate(config, &lines) => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
