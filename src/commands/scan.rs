//! `fieldgate scan BUS [--units A-B]`: which unit ids answer on a bus,
//! through the running daemon's bus owner when it runs, else on the bus
//! directly.

use std::ops::RangeInclusive;

use crate::api::client::Daemon;
use crate::bus::Bus;
use crate::commands::{hex_words, human};
use crate::config::{self, Config, UnitId};
use crate::poll::job::probe;
use crate::poll::scan::{Answer, Probe};
use crate::Usage;

pub async fn run(config: &Config, bus_name: &str, units: RangeInclusive<u8>) -> anyhow::Result<()> {
    let Some(bus_config) = config.bus(bus_name) else {
        let known: Vec<&str> = config.buses.iter().map(|b| b.name.as_str()).collect();
        return Err(Usage(format!(
            "no bus {} in the config (buses: {})",
            crate::text::quote(bus_name),
            known.join(", ")
        ))
        .into());
    };
    let count = units.clone().count();
    print_header(bus_config, &units);
    let found = match Daemon::find(config).await {
        Some(daemon) => {
            let probes = daemon.scan(bus_name, &units).await?;
            for probe in &probes {
                show(probe)?;
            }
            probes.iter().filter(|p| p.answers()).count()
        }
        None => {
            let mut bus = Bus::new(bus_config.clone());
            bus.ensure_open().await.map_err(anyhow::Error::from)?;
            let mut found = 0;
            for unit in units.filter_map(UnitId::new) {
                let probe = probe(&mut bus, unit).await;
                show(&probe)?;
                found += usize::from(probe.answers());
            }
            found
        }
    };
    println!("{found} of {count} unit ids answered");
    Ok(())
}

fn print_header(bus: &config::Bus, units: &RangeInclusive<u8>) {
    println!(
        "scanning units {}-{} on {} ({}), up to {} each",
        units.start(),
        units.end(),
        bus.name,
        bus.port,
        human(bus.timeout)
    );
}

/// Prints what one probe found; a failed bus ends the scan.
fn show(probe: &Probe) -> anyhow::Result<()> {
    let id = probe.unit;
    match &probe.answer {
        Answer::Registers { registers } => {
            println!("unit {id}: answers (holding 0 = {})", hex_words(registers))
        }
        Answer::Exception { code } => {
            println!("unit {id}: answers with exception {code:#04x} (holding 0 not readable)")
        }
        Answer::Garbled { error } => {
            println!("unit {id}: garbled answer ({error}); check baud/parity")
        }
        Answer::Silent => {}
        Answer::Disconnected { error } => anyhow::bail!("{error}"),
    }
    Ok(())
}
