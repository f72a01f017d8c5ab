//! fieldgate: an edge gateway from Modbus on RS-485 to MQTT.
//!
//! Data flows config → [`bus`] (one owner per transport, RTU framing) →
//! [`poll`] (plan, decode, report policy, typed jobs) → [`outbox`] (one
//! owner of the durable store) → [`platform`] (MQTT, the publisher state
//! machine, profiles), and back: [`platform`] → [`router`] → jobs for the
//! bus owners. Beside them, [`live`] gathers what the running daemon knows
//! of itself and [`api`] serves it (the local API and console), handing
//! reads, writes and scans to the bus owners as jobs. Below them all:
//! [`modbus`] (protocol knowledge), [`codec`] (registers ⇄ values),
//! [`record`] (the uplink message) and [`text`] (bounded network text).
//! [`commands`] holds the CLI subcommands; with the
//! `sim` feature, [`sim`] and [`broker`] serve simulated slaves and an
//! embedded broker for `simulate`, `demo` and the tests.
#![warn(unreachable_pub)]

pub mod api;
#[cfg(feature = "sim")]
pub mod broker;
pub mod bus;
pub mod codec;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod live;
pub mod modbus;
pub mod outbox;
pub mod platform;
pub mod poll;
pub mod record;
pub mod router;
#[cfg(feature = "sim")]
pub mod sim;
pub mod text;

/// Bad usage (an unknown device, bus or point named on the command line, a
/// config without what the command needs): exit code 2, like a bad config.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Resolves once the shutdown flag turns true (or its sender is gone).
pub async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
