//! `fieldgate write DEVICE POINT VALUE`: one validated write of one
//! writable point, checked exactly like a platform push, then read back and
//! printed like `read`. Through the running daemon when it runs.

use serde_json::{Map, Value};

use crate::api::client::{Daemon, Refused};
use crate::bus::Bus;
use crate::commands::read;
use crate::config::Config;
use crate::poll::job::execute_write;
use crate::router::downlink::Target;
use crate::router::write;
use crate::Usage;

/// VALUE as typed: a JSON literal (`true`, `21.5`, `-3`), else text.
fn parse_value(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

pub async fn run(config: &Config, device: &str, point: &str, value: &str) -> anyhow::Result<()> {
    let target = read::select(config, device, &[point.to_string()])?;
    let values = Map::from_iter([(point.to_string(), parse_value(value))]);
    let refused = |reason: String| Usage(format!("{reason}; nothing written"));
    if let Some(daemon) = Daemon::find(config).await {
        daemon
            .write(&target.name, &values)
            .await
            .map_err(|e| match e.downcast::<Refused>() {
                Ok(Refused(reason)) => refused(reason).into(),
                Err(e) => e,
            })?;
    } else {
        let plans = write::plan(config, &[(Target::Device(target.name.clone()), values)])
            .map_err(|r| refused(format!("{} of {}: {}", r.attribute, target.name, r.reason)))?;
        let Some(bus_config) = config.bus(&target.bus) else {
            return Err(Usage(format!("bus {} is not configured", target.bus)).into());
        };
        let mut bus = Bus::new(bus_config.clone());
        for plan in &plans {
            execute_write(&mut bus, plan).await?;
        }
    }
    println!("wrote {point} = {value} to {}; read back:", target.name);
    let reads = read::read(config, &target).await?;
    read::show(config, &target, &reads)
}
