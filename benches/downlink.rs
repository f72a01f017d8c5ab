//! Downlink latency: time from publishing an attribute write on the broker
//! to the write frame arriving at the slave, through the real `fieldgate
//! run` binary, an embedded broker and the simulator with wire-time
//! emulation at 9600 baud. Two cases: an idle bus, and a bus kept busy by the
//! 4 x 50-point map of config/bench-4x50.toml polled back to back.
//! Run: `cargo bench --bench downlink` (results in BENCHMARKS.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldgate::config;
use fieldgate::modbus::Request;
use fieldgate::poll::plan;
use fieldgate::sim::Slaves;
use rumqttc::{AsyncClient, MqttOptions, QoS};

mod common;

const WRITES: u16 = 300;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The config: the target device (unit 100, one writable register, polled
/// once a minute), plus the 4 x 50 map polled continuously when `busy`.
fn config_text(busy: bool, broker: u16, port: &Path, data_dir: &Path) -> String {
    let map = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bench-4x50.toml"),
    )
    .expect("bench map");
    let (head, devices) = map.split_once("[[device]]").expect("devices");
    let mut text = head
        .replace("port = 1883", &format!("port = {broker}"))
        .replace(
            "profile = \"generic\"",
            "profile = \"generic\"\ntopic_prefix = \"bench\"",
        )
        .replace("/dev/ttyUSB0", &port.display().to_string())
        .replace("/tmp/fieldgate-bench", &data_dir.display().to_string());
    if busy {
        text += "[[device]]";
        text += &devices.replace("poll = \"5s\"", "poll = \"100ms\"");
    }
    text + "\n[[device]]\nname = \"target\"\nbus = \"rs485-1\"\nunit = 100\npoll = \"60s\"\n\n[[device.point]]\nname = \"sp\"\narea = \"holding\"\naddress = 0\ntype = \"u16\"\nwritable = true\n"
}

async fn run(busy: bool) {
    let work = tempfile::tempdir().unwrap();
    // mosquitto when installed (the broker of a real site), else the
    // embedded one.
    let (mut mosquitto, broker) = match common::mosquitto(work.path(), "") {
        Some((child, port)) => (Some(child), port),
        None => {
            let port = fieldgate::broker::free_port().unwrap();
            fieldgate::broker::start(port).unwrap();
            (None, port)
        }
    };
    let config_path = work.path().join("fieldgate.toml");
    // The simulator needs the config's devices; the pty path is filled in after.
    let draft = config::parse(
        &config_path,
        &config_text(busy, broker, Path::new("/dev/null"), work.path()),
    )
    .unwrap();
    // A logging simulator: its log says when each write arrived.
    let slaves = Slaves::new().with_wire_time(&draft.buses[0]);
    slaves.animate(&draft.devices.iter().collect::<Vec<_>>(), 0.0);
    let pty = slaves.serve().unwrap();
    std::fs::write(
        &config_path,
        config_text(busy, broker, &pty.path, work.path()),
    )
    .unwrap();
    let longest = draft
        .devices
        .iter()
        .flat_map(|d| plan::plan(&d.points, &draft.buses[0]))
        .map(|b| plan::transaction_time(&draft.buses[0], &b.request()))
        .max()
        .unwrap_or_default();

    // `FIELDGATE_BIN` measures another build (e.g. the previous release).
    let bin = std::env::var("FIELDGATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fieldgate").to_string());
    let mut gateway = Command::new(bin)
        .args(["--config", config_path.to_str().unwrap(), "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (client, mut events) =
        AsyncClient::new(MqttOptions::new("bench-platform", "127.0.0.1", broker), 16);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let write_at = |value: u16| {
        slaves
            .received()
            .iter()
            .find(|r| r.unit == 100 && r.request == Request::WriteRegister(0, value))
            .map(|r| r.at)
    };
    // Warm up until the gateway is subscribed and writing.
    let start = Instant::now();
    loop {
        client
            .publish(
                "bench/target/set",
                QoS::AtLeastOnce,
                false,
                r#"{"sp": 60000}"#,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        if write_at(60000).is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gateway never wrote"
        );
    }
    let mut latencies = Vec::new();
    for value in 1..=WRITES {
        // Apart enough that a write's own read-back has finished (an idle
        // bus stays idle), irregular so writes land at every phase of the
        // busy bus's poll cycle.
        tokio::time::sleep(Duration::from_millis(150 + u64::from(value % 7) * 13)).await;
        let sent = Instant::now();
        client
            .publish(
                "bench/target/set",
                QoS::AtLeastOnce,
                false,
                format!("{{\"sp\": {value}}}"),
            )
            .await
            .unwrap();
        let arrived = loop {
            if let Some(at) = write_at(value) {
                break at;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "write {value} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        latencies.push(arrived.saturating_duration_since(sent));
    }
    let _ = gateway.kill();
    let _ = gateway.wait();
    if let Some(m) = mosquitto.as_mut() {
        let _ = m.kill();
        let _ = m.wait();
    }
    let (p50, p99, max) = (
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
        percentile(&mut latencies, 1.0),
    );
    println!(
        "{} bus, 9600 baud, {}: {WRITES} writes, publish -> write frame at the slave: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; longest poll transaction {:.1} ms; goal p99 <= {:.1} ms",
        if busy { "busy" } else { "idle" },
        if mosquitto.is_some() { "mosquitto" } else { "embedded rumqttd" },
        ms(p50),
        ms(p99),
        ms(max),
        ms(longest),
        ms(longest + Duration::from_millis(20)),
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(false));
    runtime.block_on(run(true));
}
