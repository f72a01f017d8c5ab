//! Many Modbus TCP buses: 100 `transport = "tcp"` buses, one device of 50
//! points each, every device polled every second, from simulated servers on
//! loopback (in this process) through the real `fieldgate run` into a
//! broker (mosquitto when installed). Measures the daemon's CPU time per
//! second of polling and its RSS from /proc, and the poll-interval jitter
//! from the servers' request logs (time between the first requests of
//! consecutive polls, against 1 s). Run: `cargo bench --bench tcp_buses
//! [SECONDS]` (results in BENCHMARKS.md).

use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use fieldgate::config::Area;
use fieldgate::sim::{Slaves, TcpFraming};

mod common;

const BUSES: usize = 100;

/// 50 points on 2 blocks: 40 u16 holding registers, 10 f32 input pairs.
fn device_points(b: usize) -> String {
    let mut out = String::new();
    for i in 0..40 {
        let _ = write!(
            out,
            "\n[[device.point]]\nname = \"b{b}h{i}\"\narea = \"holding\"\naddress = {i}\ntype = \"u16\"\n"
        );
    }
    for i in 0..10 {
        let _ = write!(
            out,
            "\n[[device.point]]\nname = \"b{b}f{i}\"\narea = \"input\"\naddress = {}\ntype = \"f32\"\n",
            2 * i
        );
    }
    out
}

/// (utime + stime) in clock ticks, and VmRSS in KiB, of `pid`.
fn proc_figures(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    // utime and stime are fields 14 and 15: 11 and 12 after the ')'.
    (ticks(11) + ticks(12), rss)
}

#[tokio::main]
async fn main() {
    let seconds: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(60);
    let work = tempfile::tempdir().unwrap();
    let (mut broker, port) = match common::mosquitto(work.path(), "") {
        Some((child, port)) => (Some(child), port),
        None => {
            let port = fieldgate::broker::free_port().unwrap();
            fieldgate::broker::start(port).unwrap();
            (None, port)
        }
    };
    let mut config = format!(
        "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n\n[platform]\nprofile = \"generic\"\nhost = \"127.0.0.1\"\nport = {port}\nmax_publish_rate = 0\n",
        work.path().join("data").display()
    );
    let mut servers = Vec::new();
    for b in 0..BUSES {
        let slaves = Slaves::new();
        slaves.unit(1, |u| {
            u.set_registers(Area::Holding, 0, &[7; 40]);
            u.set_registers(Area::Input, 0, &[0x4365, 0x999A].repeat(10));
        });
        let server = slaves
            .serve_tcp(TcpFraming::Mbap, "127.0.0.1:0")
            .await
            .unwrap();
        let _ = write!(
            config,
            "\n[[bus]]\nname = \"tcp{b}\"\ntransport = \"tcp\"\naddress = \"{}\"\n\n[[device]]\nname = \"plc{b}\"\nbus = \"tcp{b}\"\nunit = 1\npoll = \"1s\"\n{}",
            server.addr,
            device_points(b)
        );
        servers.push((server, slaves));
    }
    let path = work.path().join("tcp.toml");
    std::fs::write(&path, config).unwrap();
    let bin = std::env::var("FIELDGATE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fieldgate").to_string());
    let mut daemon = Command::new(bin)
        .args(["--config", path.to_str().unwrap(), "run"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    // Warm up (connections, first polls), then measure.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ticks_start, _) = proc_figures(daemon.id());
    let start = std::time::Instant::now();
    // RSS every 10 s: growth would show here.
    let mut series = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(10).min(Duration::from_secs(seconds))).await;
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", daemon.id())).unwrap_or_default();
        let anon = status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
        let io = std::fs::read_to_string(format!("/proc/{}/io", daemon.id())).unwrap_or_default();
        let written = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        series.push((
            proc_figures(daemon.id()).1 / 1024,
            anon / 1024,
            written / 1024,
        ));
    }
    let (ticks_end, rss) = proc_figures(daemon.id());
    if let Ok(Some(status)) = daemon.try_wait() {
        let log = std::fs::read_to_string(work.path().join("log")).unwrap_or_default();
        panic!("fieldgate exited ({status}):\n{log}");
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = daemon.kill();
    let _ = daemon.wait();
    if let Some(b) = broker.as_mut() {
        let _ = b.kill();
        let _ = b.wait();
    }
    // /proc counts in USER_HZ, which Linux fixes at 100 for user space.
    let tick = 100.0;
    let cpu = (ticks_end - ticks_start) as f64 / tick / elapsed;

    // Poll starts: the FC03 read (first of each poll) on each server.
    let mut jitter = Vec::new();
    let mut polls = 0;
    for (_, slaves) in &servers {
        let mut starts: Vec<std::time::Instant> = slaves
            .received()
            .iter()
            .filter(|r| r.request.function_code().value() == 3)
            .map(|r| r.at)
            .collect();
        starts.sort();
        starts.retain(|t| t.duration_since(start) < Duration::from_secs(seconds) && *t >= start);
        polls += starts.len();
        for w in starts.windows(2) {
            let gap = w[1].duration_since(w[0]).as_secs_f64();
            jitter.push((gap - 1.0).abs());
        }
    }
    jitter.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        jitter
            .get(((jitter.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    println!(
        "| {BUSES} tcp buses x 50 points, 1 s | {seconds} s | {polls} polls ({:.1}/s) | CPU {:.2} % of one core | RSS {:.1} MiB | jitter p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        polls as f64 / elapsed,
        cpu * 100.0,
        rss as f64 / 1024.0,
        pick(0.5),
        pick(0.99),
        pick(1.0),
    );
    println!("every 10 s: RSS MiB, anonymous RSS MiB, KiB written to disk: {series:?}");
}
