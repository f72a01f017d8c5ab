//! `fieldgate scan BUS [--units A-B] [--identify]`: which unit ids answer
//! on a bus, and with `--identify` which device profiles each matches,
//! through the running daemon's bus owner when it runs, else on the bus
//! directly.

use std::ops::RangeInclusive;

use crate::api::client::Daemon;
use crate::bus::Bus;
use crate::commands::{hex_words, human};
use crate::config::{self, Config, DeviceProfile, Library, Parity, UnitId};
use crate::poll::job::probe;
use crate::poll::scan::{Answer, Identifier, Probe};
use crate::Usage;

pub async fn run(
    config: &Config,
    bus_name: &str,
    units: RangeInclusive<u8>,
    identify: bool,
) -> anyhow::Result<()> {
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
    // The profiles, for their names and line settings (the daemon reads the
    // same search path for its matching).
    let profiles: Vec<DeviceProfile> = if identify {
        Library::new(config.gateway.profile_dir.as_deref()).usable()
    } else {
        Vec::new()
    };
    let found = match Daemon::find(config).await {
        Some(daemon) => {
            let probes = daemon.scan(bus_name, &units, identify).await?;
            for probe in &probes {
                show(probe, &profiles)?;
            }
            probes.iter().filter(|p| p.answers()).count()
        }
        None => {
            let identifier = identify.then(|| Identifier::new(&profiles));
            let mut bus = Bus::new(bus_config.clone());
            bus.ensure_open().await.map_err(anyhow::Error::from)?;
            let mut found = 0;
            for unit in units.filter_map(UnitId::new) {
                let probe = probe(&mut bus, unit, identifier.as_ref()).await;
                show(&probe, &profiles)?;
                found += usize::from(probe.answers());
            }
            found
        }
    };
    println!("{found} of {count} unit ids answered");
    if identify && found == 0 {
        print!("{}", line_hint(bus_config, &profiles));
    }
    Ok(())
}

/// When nothing answers: the profiles' factory line settings that differ
/// from the bus's, the likeliest reason a new device is silent.
fn line_hint(bus: &config::Bus, profiles: &[DeviceProfile]) -> String {
    let mut settings: Vec<(u32, Parity, Vec<&str>)> = Vec::new();
    for p in profiles {
        let (Some(baud), parity) = (p.baud, p.parity.unwrap_or(Parity::None)) else {
            continue;
        };
        if (baud, parity) == (bus.baud, bus.parity) {
            continue;
        }
        match settings
            .iter_mut()
            .find(|(b, q, _)| (*b, *q) == (baud, parity))
        {
            Some((_, _, names)) => names.push(&p.name),
            None => settings.push((baud, parity, vec![&p.name])),
        }
    }
    let mut out = String::new();
    for (baud, parity, names) in settings {
        out.push_str(&format!(
            "hint: {} leave the factory at {baud} baud, parity {}\n",
            names.join(", "),
            format!("{parity:?}").to_lowercase()
        ));
    }
    out
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
fn show(probe: &Probe, profiles: &[DeviceProfile]) -> anyhow::Result<()> {
    let id = probe.unit;
    let matched = match &probe.matches {
        None => String::new(),
        Some(names) if names.is_empty() => "; matches no profile".into(),
        Some(names) => {
            let described: Vec<String> = names
                .iter()
                .map(|name| match profiles.iter().find(|p| &p.name == name) {
                    Some(p) => format!("{name} ({} {})", p.vendor, p.model),
                    None => name.clone(),
                })
                .collect();
            format!("; matches profile {}", described.join(", "))
        }
    };
    match &probe.answer {
        Answer::Registers { registers } => {
            println!(
                "unit {id}: answers (holding 0 = {}){matched}",
                hex_words(registers)
            )
        }
        Answer::Exception { code } => {
            println!(
                "unit {id}: answers with exception {code:#04x} (holding 0 not readable){matched}"
            )
        }
        Answer::Garbled { error } => {
            println!("unit {id}: garbled answer ({error}); check baud/parity")
        }
        Answer::Silent => {}
        Answer::Disconnected { error } => anyhow::bail!("{error}"),
    }
    Ok(())
}
