//! Shared by the benchmarks: a local mosquitto (Debian package) on a free
//! loopback port.
#![allow(dead_code)] // each bench uses part of it

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts mosquitto with `extra` config lines; `None` if it is not
/// installed or does not come up.
pub fn mosquitto(dir: &Path, extra: &str) -> Option<(Child, u16)> {
    let port = fieldgate::broker::free_port().ok()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
    )
    .ok()?;
    let mut child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}
