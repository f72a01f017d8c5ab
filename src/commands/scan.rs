//! `fieldgate scan BUS [--units A-B]`: which unit ids answer on a bus.

use std::ops::RangeInclusive;

use crate::bus::Bus;
use crate::commands::{hex_words, human};
use crate::config::{Config, UnitId};
use crate::modbus::{Reply, Request, TxError};
use crate::Usage;

/// Parses `A-B` (or a single id) within 1..247.
pub fn parse_units(text: &str) -> Result<RangeInclusive<u8>, String> {
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let parse = |s: &str| {
        s.trim()
            .parse::<u8>()
            .ok()
            .filter(|u| UnitId::new(*u).is_some())
            .ok_or_else(|| format!("{} is not a unit id (1..247)", crate::text::quote(s)))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a > b {
        return Err(format!("empty range {a}-{b}"));
    }
    Ok(a..=b)
}

/// Probes each unit with one read of holding register 0, without retries and
/// bounded by the bus timeout. An exception reply also proves a slave is there.
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
    let mut bus = Bus::new(bus_config.clone());
    bus.ensure_open().await.map_err(anyhow::Error::from)?;
    let count = units.clone().count();
    println!(
        "scanning units {}-{} on {} ({}), up to {} each",
        units.start(),
        units.end(),
        bus_config.name,
        bus_config.port,
        human(bus_config.timeout)
    );
    let mut found = 0;
    for id in units {
        let Some(unit) = UnitId::new(id) else {
            continue;
        };
        let probe = Request::ReadHolding(0, 1);
        match bus.attempt(unit, &probe, bus_config.timeout).await.outcome {
            Ok(Reply::Registers(regs)) => {
                found += 1;
                println!("unit {id}: answers (holding 0 = {})", hex_words(&regs));
            }
            Ok(_) => found += 1,
            Err(TxError::Exception(code)) => {
                found += 1;
                println!(
                    "unit {id}: answers with exception {:#04x} (holding 0 not readable)",
                    u8::from(code)
                );
            }
            Err(TxError::Port(e)) => anyhow::bail!("{e}"),
            Err(e @ (TxError::Garbled(_) | TxError::Crc)) => {
                println!("unit {id}: garbled answer ({e}); check baud/parity")
            }
            Err(TxError::Timeout(_)) => {}
        }
    }
    println!("{found} of {count} unit ids answered");
    Ok(())
}
