//! Outbox benchmark against a local mosquitto (Debian package): append +
//! publish + PUBACK + delete throughput with the rate cap off, replay time of
//! a day's backlog (86,400 records), bytes written to disk per record, and
//! the RSS of `fieldgate run` holding a 64 MiB backlog.
//! Run: `cargo bench --bench outbox` (results in BENCHMARKS.md).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldgate::config;
use fieldgate::outbox::{Outbox, Store};
use fieldgate::platform;
use fieldgate::record::{Body, Record};
use tokio::sync::watch;

mod common;

fn record(i: u64) -> Record {
    let mut values = serde_json::Map::new();
    values.insert("counter".into(), i.into());
    values.insert("voltage".into(), serde_json::json!(229.6));
    values.insert("current".into(), serde_json::json!(12.25));
    values.insert("relay1".into(), true.into());
    Record {
        taken_ms: 1_700_000_000_000 + i * 1000,
        body: Body::Attributes {
            device: "meter-a".into(),
            key: None,
            values,
        },
    }
}

fn free_port() -> u16 {
    fieldgate::broker::free_port().expect("port")
}

fn platform_config(port: u16, data_dir: &Path) -> config::Config {
    let text = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[platform]\nprofile = \"generic\"\nhost = \"127.0.0.1\"\nport = {port}\nmax_publish_rate = 0\n[buffer]\nmax_bytes = \"256MiB\"\n",
        data_dir.display()
    );
    config::parse(Path::new("bench.toml"), &text).expect("config")
}

/// Bytes this process has caused to be written to storage so far.
fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("write_bytes: ")
                    .and_then(|n| n.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// Publishes until the outbox is empty; returns the time it took.
async fn drain(outbox: Outbox, config: &config::Config, producer: Option<u64>) -> Duration {
    let (stop_tx, stop) = watch::channel(false);
    let platform = config.platform.clone().unwrap();
    let publisher = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            platform::run(
                "bench",
                &platform,
                outbox,
                None,
                Default::default(),
                tokio::sync::watch::channel(None).1,
                stop,
            )
            .await
        })
    };
    let start = Instant::now();
    if let Some(n) = producer {
        for i in 0..n {
            outbox.append(record(i));
            if i % 256 == 0 {
                tokio::task::yield_now().await;
            }
        }
    }
    while outbox.counts().await.0 > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    stop_tx.send_replace(true);
    let _ = publisher.await;
    outbox.close().await.unwrap();
    took
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (mut broker, port) = common::mosquitto(
        work.path(),
        "max_inflight_messages 0\nmax_queued_messages 0\n",
    )
    .expect("mosquitto (apt-get install mosquitto)");

    // 1. Append + publish + PUBACK + delete, concurrently, rate cap off.
    let n = 100_000;
    for run in 0..3 {
        let dir = work.path().join(format!("through-{run}"));
        let config = platform_config(port, &dir);
        let took = runtime.block_on(async {
            let outbox = Outbox::start(&dir, config.buffer.max_bytes).unwrap();
            drain(outbox, &config, Some(n)).await
        });
        println!("throughput run {run}: {n} records appended, published, acknowledged and deleted in {:.2} s = {:.0} msg/s", took.as_secs_f64(), n as f64 / took.as_secs_f64());
    }

    // 2. Write amplification and replay. The daemon seals and flushes the
    // records of each 500 ms window as one segment, so the figures depend on
    // how many records a window holds: 1 (one reading/s or less, the worst
    // case) and 16 (a busy gateway). `flush` is that seal + flush.
    for per_window in [1, 16] {
        let dir = work.path().join(format!("replay-{per_window}"));
        let config = platform_config(port, &dir);
        let mut store = Store::open(&dir, config.buffer.max_bytes).unwrap();
        let before = write_bytes();
        let start = Instant::now();
        for i in 0..86_400 {
            store.push(&record(i));
            if (i + 1) % per_window == 0 {
                store.seal_and_flush();
            }
        }
        store.close().unwrap();
        let appended = start.elapsed();
        let written = write_bytes() - before;
        let held = store.stats();
        drop(store);
        let record_bytes = serde_json::to_vec(&record(50_000)).unwrap().len();
        println!("append, {per_window} record(s) per window: 86400 records of {record_bytes} bytes in {:.2} s; {} bytes written to disk = {:.0} bytes per record ({:.2}x the record)", appended.as_secs_f64(), written, written as f64 / 86_400.0, written as f64 / 86_400.0 / record_bytes as f64);
        assert_eq!(held.messages, 86_400);
        let before = write_bytes();
        let took = runtime.block_on(async {
            let outbox = Outbox::start(&dir, config.buffer.max_bytes).unwrap();
            drain(outbox, &config, None).await
        });
        let written_replay = write_bytes() - before;
        println!("replay, {per_window} record(s) per window: 86400-record backlog delivered and deleted in {:.2} s = {:.0} msg/s; {} bytes written while deleting = {:.0} per record", took.as_secs_f64(), 86_400.0 / took.as_secs_f64(), written_replay, written_replay as f64 / 86_400.0);
    }

    // 3. RSS of the daemon holding a 64 MiB backlog (broker unreachable),
    // built at 4 records per window (8 readings/s, a full day's worth).
    let dir = work.path().join("backlog");
    let mut store = Store::open(&dir, 64 << 20).unwrap();
    let mut i = 0;
    // `stats` reads the oldest record from disk: checked every 1000 appends.
    while i % 1000 != 0 || store.stats().bytes < (64 << 20) - 80_000 {
        store.push(&record(i));
        i += 1;
        if i % 4 == 0 {
            store.seal_and_flush();
        }
    }
    store.close().unwrap();
    let held = store.stats();
    drop(store);
    let dead_port = free_port();
    let config_path = work.path().join("daemon.toml");
    std::fs::write(&config_path, format!("[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[platform]\nprofile = \"generic\"\nhost = \"127.0.0.1\"\nport = {dead_port}\n[buffer]\nmax_bytes = \"64MiB\"\n", dir.display())).unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(["--config", config_path.to_str().unwrap(), "run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(15));
    let rss = rss_kib(daemon.id());
    println!(
        "daemon holding {} records / {} bytes: RSS {} KiB after {:.0} s",
        held.messages,
        held.bytes,
        rss,
        start.elapsed().as_secs_f64()
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = broker.kill();
    let _ = broker.wait();
}
