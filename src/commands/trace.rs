//! `fieldgate trace [BUS]`: every Modbus transaction the running daemon
//! makes, live, one line each. It needs the daemon (there is nothing to
//! watch otherwise); Ctrl-C ends it.

use anyhow::anyhow;

use crate::api::client::Daemon;
use crate::bus::tap::TraceEvent;
use crate::config::Config;
use crate::Usage;

pub async fn run(config: &Config, bus: Option<&str>) -> anyhow::Result<()> {
    if let Some(bus) = bus {
        if config.bus(bus).is_none() {
            return Err(Usage(format!("no bus {} in the config", crate::text::quote(bus))).into());
        }
    }
    let Some(daemon) = Daemon::find(config).await else {
        return Err(anyhow!(
            "trace needs the running daemon, reached through [api] listen ({}); is `fieldgate run` (the service) running?",
            config
                .api
                .listen
                .map_or_else(|| "turned off".to_string(), |a| a.to_string())
        ));
    };
    println!("time          bus  unit  fc  request → response  ms  outcome");
    daemon
        .trace(bus, |event| println!("{}", line(&event)))
        .await?;
    Err(anyhow!("the daemon closed the trace (stopped or reloaded)"))
}

/// `12:03:04.567  rs485-1  u1  fc03  01 03 … → 01 03 …  12.3 ms  ok`
fn line(event: &TraceEvent) -> String {
    let ms_of_day = event.ts_ms % 86_400_000;
    let (h, m, s, ms) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    format!(
        "{h:02}:{m:02}:{s:02}.{ms:03}Z  {}  u{}  fc{:02}  {} → {}  {:.1} ms  {}",
        event.bus,
        event.unit,
        event.fc,
        event.request,
        if event.response.is_empty() {
            "-"
        } else {
            &event.response
        },
        event.ms,
        event.outcome
    )
}
