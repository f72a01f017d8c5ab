//! `fieldgate read DEVICE [POINT…]`: one read of a device's points,
//! printed as a table. Through the running daemon's bus owner when it runs
//! (nothing interleaves on the wire), else on the bus directly. For
//! commissioning; needs no MQTT.

use crate::api::client::Daemon;
use crate::bus::Bus;
use crate::commands::{hex_words, table};
use crate::config::{Config, Device};
use crate::poll::job::read_points;
use crate::poll::{plan, PointRead};
use crate::Usage;

/// The device `name` with only the points `names` (all if empty).
pub fn select(config: &Config, name: &str, names: &[String]) -> Result<Device, Usage> {
    config.select(name, names).map_err(Usage)
}

/// Reads the named points (all if none) and prints them. Fails when no
/// point could be read.
pub async fn run(config: &Config, device: &str, names: &[String]) -> anyhow::Result<()> {
    let device = select(config, device, names)?;
    let reads = read(config, &device).await?;
    show(config, &device, &reads)
}

/// Reads `device` through the daemon, or on its bus.
pub async fn read(config: &Config, device: &Device) -> anyhow::Result<Vec<PointRead>> {
    if let Some(daemon) = Daemon::find(config).await {
        return daemon.read(device).await;
    }
    let Some(bus_config) = config.bus(&device.bus) else {
        return Err(Usage(format!("bus {} is not configured", device.bus)).into());
    };
    let mut bus = Bus::new(bus_config.clone());
    Ok(read_points(&mut bus, device).await)
}

/// Prints name, raw registers, value and unit of each point.
pub fn show(config: &Config, device: &Device, reads: &[PointRead]) -> anyhow::Result<()> {
    let mut rows = vec![[
        "name".to_string(),
        "raw".into(),
        "value".into(),
        "unit".into(),
    ]];
    for read in reads {
        let raw = match &read.raw {
            Some(serde_json::Value::Array(items)) => {
                let words: Vec<u16> = items
                    .iter()
                    .filter_map(|v| v.as_u64().and_then(|w| u16::try_from(w).ok()))
                    .collect();
                match items.first() {
                    Some(serde_json::Value::Bool(b)) => u8::from(*b).to_string(),
                    _ => hex_words(&words),
                }
            }
            _ => "-".into(),
        };
        let value = match (&read.value, &read.error) {
            (_, Some(error)) => format!("error: {error}"),
            (Some(serde_json::Value::String(text)), None) => format!("{text:?}"),
            (Some(value), None) => value.to_string(),
            (None, None) => String::new(),
        };
        rows.push([
            read.name.clone(),
            raw,
            value,
            read.unit.clone().unwrap_or_default(),
        ]);
    }
    let (port, requests) = config.bus(&device.bus).map_or((String::new(), 0), |bus| {
        (bus.port.clone(), plan::plan(&device.points, bus).len())
    });
    println!(
        "device {} (unit {} on bus {}, {port}): {requests} requests",
        device.name, device.unit, device.bus,
    );
    print!("{}", table(&rows));
    if reads.iter().all(|r| r.value.is_none()) {
        anyhow::bail!("no point of {} could be read", device.name);
    }
    Ok(())
}
