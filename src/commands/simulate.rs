//! `fieldgate simulate`: the configured devices as Modbus slaves with
//! changing values, until Ctrl-C: serial buses on pseudo-terminals, TCP
//! buses on loopback ports, dial-in buses as a DTU that dials in to the
//! gateway's `listen` address.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{self, BusMode, Config, Transport};
use crate::sim::{self, Pty, Served, Slaves, TcpFraming};

/// How often a simulated DTU sends its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// Where one bus's slaves are served.
pub enum Place {
    Pty(Pty),
    /// A loopback port the bus's `address` should name.
    Port(Served),
    /// A DTU dialling in to this address.
    DialIn(Served),
}

/// One simulated bus.
pub struct Line {
    pub bus: String,
    pub place: Place,
    pub slaves: Slaves,
}

impl Line {
    /// Points `bus` at this simulator (the port path, or the address).
    pub fn apply(&self, bus: &mut config::Bus) {
        match (&self.place, &mut bus.transport) {
            (Place::Pty(pty), Transport::Serial) => bus.port = pty.path.display().to_string(),
            (Place::Port(served), Transport::Tcp { address })
            | (Place::Port(served), Transport::RtuOverTcp { address, .. }) => {
                *address = served.addr.to_string();
                bus.port = served.addr.to_string();
            }
            _ => {}
        }
    }

    pub fn describe(&self) -> String {
        match &self.place {
            Place::Pty(pty) => pty.path.display().to_string(),
            Place::Port(served) => format!("{} (set the bus's address to it)", served.addr),
            Place::DialIn(served) => format!("a DTU dialling in to {}", served.addr),
        }
    }
}

/// The address a local DTU dials to reach `listen` (an unspecified address
/// means this machine).
fn loopback(listen: SocketAddr) -> SocketAddr {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

/// Starts one simulated line per rtu bus that has devices.
pub async fn start(config: &Config, wire_time: bool) -> anyhow::Result<Vec<Line>> {
    let mut lines = Vec::new();
    for bus in config.buses.iter().filter(|b| b.mode == BusMode::Rtu) {
        let devices: Vec<_> = config.devices_on(&bus.name).collect();
        if devices.is_empty() {
            continue;
        }
        let mut slaves = Slaves::for_devices(devices.iter().copied());
        if wire_time && bus.transport.has_wire_time() {
            slaves = slaves.with_wire_time(bus);
        }
        let place = match &bus.transport {
            Transport::Serial => Place::Pty(slaves.serve()?),
            Transport::Tcp { .. } => {
                Place::Port(slaves.serve_tcp(TcpFraming::Mbap, "127.0.0.1:0").await?)
            }
            Transport::RtuOverTcp { .. } => {
                Place::Port(slaves.serve_tcp(TcpFraming::Rtu, "127.0.0.1:0").await?)
            }
            Transport::DialIn {
                listen,
                registration,
                heartbeat,
            } => Place::DialIn(
                slaves
                    .dial_in(
                        loopback(*listen),
                        registration.clone(),
                        heartbeat.clone().map(|h| (h, HEARTBEAT_EVERY)),
                    )
                    .await?,
            ),
        };
        lines.push(Line {
            bus: bus.name.clone(),
            place,
            slaves,
        });
    }
    Ok(lines)
}

/// Keeps the synthetic values moving (once a second) until cancelled.
pub async fn animate(config: &Config, lines: &[Line]) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = sim::now_seconds();
        for line in lines {
            let devices: Vec<_> = config.devices_on(&line.bus).collect();
            line.slaves.animate(&devices, t);
        }
    }
}

pub async fn run(config: &Config, wire_time: bool) -> anyhow::Result<()> {
    let lines = start(config, wire_time).await?;
    if lines.is_empty() {
        anyhow::bail!("no rtu bus with devices to simulate");
    }
    for line in &lines {
        let units: Vec<String> = config
            .devices_on(&line.bus)
            .map(|d| format!("{} (unit {})", d.name, d.unit))
            .collect();
        println!(
            "bus {}: {}  serving {}",
            line.bus,
            line.describe(),
            units.join(", ")
        );
    }
    println!(
        "set each serial bus's port (each TCP bus's address) to what is shown above and run fieldgate against it{}; Ctrl-C stops",
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
