//! fieldgate: an edge gateway from Modbus RTU on RS-485 to MQTT.
//!
//! Data flows config → [`bus`] (one owner per serial port) → [`poll`]
//! (plan, decode, report policy) → [`outbox`] → [`platform`] (MQTT
//! profiles), and back: [`platform`] → [`router`] → [`bus`]. The
//! [`sim`] module serves configs as simulated slaves; [`commands`] holds
//! the CLI subcommands.

pub mod broker;
pub mod bus;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod outbox;
pub mod platform;
pub mod poll;
pub mod router;
pub mod sim;

/// Resolves once the shutdown flag turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
