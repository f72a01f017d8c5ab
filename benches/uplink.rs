//! Uplink latency: from the last read of a poll to the platform's
//! subscriber receiving that poll's report, through the real `fieldgate
//! run` binary, the simulator and a broker (mosquitto when installed, else
//! the embedded one). The map is config/bench-2x10.toml (2 devices × 10
//! registers every second, generic profile); register 0 of each device
//! counts the reads, so each report names the read it came from, and the
//! simulator's log says when that read arrived. Run: `cargo bench --bench
//! uplink [SECONDS]` (results in BENCHMARKS.md).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldgate::config::{self, Area};
use fieldgate::modbus::Request;
use fieldgate::sim::Slaves;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

mod common;

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let work = tempfile::tempdir().unwrap();
    let (mut broker, port, broker_name) = match common::mosquitto(work.path(), "") {
        Some((child, port)) => (Some(child), port, "mosquitto"),
        None => {
            let port = fieldgate::broker::free_port().unwrap();
            fieldgate::broker::start(port).unwrap();
            (None, port, "embedded rumqttd")
        }
    };
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bench-2x10.toml");
    let text = std::fs::read_to_string(&map).unwrap();
    let draft = config::parse(&map, &text).unwrap();
    // A logging simulator: its log says when each read arrived.
    let slaves = Slaves::new().with_wire_time(&draft.buses[0]);
    for device in &draft.devices {
        slaves.unit(device.unit.get(), |u| {
            u.read_counters.push((Area::Holding, 0))
        });
    }
    let pty = slaves.serve().unwrap();
    let config_path = work.path().join("uplink.toml");
    std::fs::write(
        &config_path,
        text.replace("/dev/ttyUSB0", &pty.path.display().to_string())
            .replace("port = 1883", &format!("port = {port}"))
            .replace(
                "/tmp/fieldgate-bench",
                &work.path().join("data").display().to_string(),
            ),
    )
    .unwrap();

    let mut options = MqttOptions::new("bench-platform", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 64);
    client
        .subscribe("fieldgate/bench/+/attributes", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((Instant::now(), p.topic, p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    // `FIELDGATE_BIN` measures another build (e.g. the previous release).
    let bin = std::env::var("FIELDGATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fieldgate").to_string());
    let mut daemon = Command::new(bin)
        .args(["--config", config_path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let _ = daemon.kill();
    let _ = daemon.wait();

    // The n-th read of register 0 of a unit answered count n; the report
    // carrying d<unit>r0 = n came from it. The simulator answers after the
    // frames' wire time, so the read ended at `at` + that.
    let bus = &draft.buses[0];
    let (req, resp) = Request::ReadHolding(0, 10).frame_sizes();
    let wire = bus.char_time(req + resp) + bus.frame_gap();
    let mut reads: HashMap<(u8, u16), Instant> = HashMap::new();
    let mut counts: HashMap<u8, u16> = HashMap::new();
    for r in slaves.received() {
        if let Request::ReadHolding(0, _) = r.request {
            let n = counts.entry(r.unit).or_default();
            *n += 1;
            reads.insert((r.unit, *n), r.at + wire);
        }
    }
    let mut latencies = Vec::new();
    while let Ok((at, topic, payload)) = arrivals.try_recv() {
        let unit: u8 = if topic.contains("/dev1/") { 1 } else { 2 };
        let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let Some(n) = json["values"][format!("d{unit}r0")].as_u64() else {
            continue;
        };
        if let Some(read) = reads.get(&(unit, n as u16)) {
            latencies.push(at.saturating_duration_since(*read));
        }
    }
    if let Some(b) = broker.as_mut() {
        let _ = b.kill();
        let _ = b.wait();
    }
    let n = latencies.len();
    println!(
        "| {broker_name} | {n} | {:.2} | {:.2} | {:.2} | {:.2} |",
        ms(percentile(&mut latencies, 0.5)),
        ms(percentile(&mut latencies, 0.9)),
        ms(percentile(&mut latencies, 0.99)),
        ms(percentile(&mut latencies, 1.0)),
    );
}
