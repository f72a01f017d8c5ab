//! `fieldgate buffer`: what the outbox holds. sled allows one process per
//! store, so while the daemon runs the figures come from the status file it
//! rewrites every 2 s.

use std::time::Duration;

use crate::config::Config;
use crate::outbox::{self, OutboxError, Stats, Store};
use crate::record::format_ms;

fn print(stats: &Stats, source: &str) {
    let now = stats.at_ms;
    println!("{source}");
    println!("messages held:  {}", stats.messages);
    println!(
        "bytes:          {} of {} ({:.1}%)",
        stats.bytes,
        stats.max_bytes,
        100.0 * stats.bytes as f64 / stats.max_bytes.max(1) as f64
    );
    match stats.oldest_ms {
        Some(ms) => println!(
            "oldest sample:  {} ({} old)",
            format_ms(ms),
            humantime::format_duration(Duration::from_secs(now.saturating_sub(ms) / 1000))
        ),
        None => println!("oldest sample:  -"),
    }
    println!("dropped so far: {}", stats.dropped);
}

pub fn run(config: &Config) -> anyhow::Result<()> {
    let dir = &config.gateway.data_dir;
    match Store::open(dir, config.buffer.max_bytes) {
        Ok(outbox) => {
            print(
                &outbox.stats(),
                &format!("outbox {}", outbox.path().display()),
            );
            Ok(())
        }
        Err(OutboxError::Open { error, .. }) if is_locked(&error) => {
            let Some(stats) = outbox::read_status(dir) else {
                anyhow::bail!(
                    "the outbox in {} is open in another process (the daemon?) and it has written no status file yet; try again in a few seconds",
                    dir.display()
                );
            };
            print(
                &stats,
                &format!(
                    "outbox {} is in use by the running daemon; figures from its status file, written at {}",
                    dir.join("outbox").display(),
                    format_ms(stats.at_ms)
                ),
            );
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// sled's file lock is taken by another process.
fn is_locked(e: &sled::Error) -> bool {
    match e {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock")
        }
        _ => false,
    }
}
