//! `fieldgate read DEVICE [POINT…]`: one poll of a device over its bus,
//! printed as a table. For commissioning; needs no MQTT.

use crate::bus::Bus;
use crate::commands::hex_words;
use crate::config::{Config, Device};
use crate::poll::{self, plan, Raw};
use crate::Usage;

/// The device `name` with only the points `names` (all if empty).
pub fn select(config: &Config, name: &str, names: &[String]) -> Result<Device, Usage> {
    let Some(device) = config.device(name) else {
        let known: Vec<&str> = config.devices.iter().map(|d| d.name.as_str()).collect();
        return Err(Usage(format!(
            "no device {} in the config (devices: {})",
            crate::text::quote(name),
            known.join(", ")
        )));
    };
    let mut device = device.clone();
    if !names.is_empty() {
        for name in names {
            if device.point(name).is_none() {
                return Err(Usage(format!(
                    "device {} has no point {}",
                    device.name,
                    crate::text::quote(name)
                )));
            }
        }
        device.points.retain(|p| names.contains(&p.name));
    }
    Ok(device)
}

/// Reads the named points (all if none) and prints them. Fails when no
/// block could be read.
pub async fn run(config: &Config, device: &str, names: &[String]) -> anyhow::Result<()> {
    let device = select(config, device, names)?;
    let Some(bus_config) = config.bus(&device.bus) else {
        return Err(Usage(format!("bus {} is not configured", device.bus)).into());
    };
    let mut bus = Bus::new(bus_config.clone());
    show(&mut bus, &device).await
}

/// Reads `device` once on `bus` and prints name, raw registers, value and
/// unit of each point.
pub async fn show(bus: &mut Bus, device: &Device) -> anyhow::Result<()> {
    let blocks = plan::plan(&device.points, bus.config());
    let result = poll::read_device(bus, device, &blocks).await;
    let values = result.values(&device.points, &blocks);
    let mut rows = vec![[
        "name".to_string(),
        "raw".into(),
        "value".into(),
        "unit".into(),
    ]];
    for (block, reply) in blocks.iter().zip(&result.replies) {
        for &i in &block.points {
            let Some(p) = device.points.get(i) else {
                continue;
            };
            let (raw, value) = match reply {
                Ok(reply) => (
                    match poll::raw_of(p, block, reply) {
                        Some(Raw::Bit(b)) => u8::from(b).to_string(),
                        Some(Raw::Registers(regs)) => hex_words(regs),
                        None => String::new(),
                    },
                    values
                        .get(i)
                        .and_then(Option::as_ref)
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                ),
                Err(e) => ("-".into(), format!("error: {e}")),
            };
            rows.push([
                p.name.clone(),
                raw,
                value,
                p.unit.clone().unwrap_or_default(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..4)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let config = bus.config();
    println!(
        "device {} (unit {} on bus {}, {}): {} requests",
        device.name,
        device.unit,
        config.name,
        config.port,
        blocks.len()
    );
    for row in &rows {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            row[0],
            row[1],
            row[2],
            row[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    if result.all_failed() {
        anyhow::bail!("no point of {} could be read", device.name);
    }
    Ok(())
}
