//! Poll-cycle benchmark: the 4 x 50-point map of config/bench-4x50.toml read
//! from the simulator with wire-time emulation, at 9600 and 115200 baud.
//! Reports the measured time of one round of all four devices against the
//! planner's computed bound, and requests per round against one request per
//! point; once more at 9600 over RTU-over-TCP (the simulator as a serial
//! server on loopback, wire time emulated behind it). Run: `cargo bench
//! --bench poll_cycle` (results in BENCHMARKS.md).

use std::path::Path;
use std::time::{Duration, Instant};

use fieldgate::bus::Bus;
use fieldgate::config;
use fieldgate::poll::{plan, read_device};
use fieldgate::sim::{Slaves, TcpFraming};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn bench(baud: u32, rounds: usize, over_tcp: bool) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bench-4x50.toml");
    let mut config = config::load(&path).expect("bench config");
    config.buses[0].baud = baud;
    let bus_config = config.buses[0].clone();
    let devices = config.devices.clone();
    let slaves = Slaves::for_devices(&devices).with_wire_time(&bus_config);
    let mut line = bus_config.clone();
    let (_pty, _server);
    if over_tcp {
        let server = slaves
            .serve_tcp(TcpFraming::Rtu, "127.0.0.1:0")
            .await
            .expect("server");
        line.transport = config::Transport::RtuOverTcp {
            address: server.addr.to_string(),
            heartbeat: None,
        };
        _server = Some(server);
        _pty = None;
    } else {
        let pty = slaves.serve().expect("pty");
        line.port = pty.path.display().to_string();
        _pty = Some(pty);
        _server = None;
    }
    let mut bus = Bus::new(line);

    let plans: Vec<_> = devices
        .iter()
        .map(|d| plan::plan(&d.points, &bus_config))
        .collect();
    let requests: usize = plans.iter().map(Vec::len).sum();
    let points: usize = devices.iter().map(|d| d.points.len()).sum();
    let bound: Duration = plans.iter().map(|b| plan::cycle_time(&bus_config, b)).sum();
    let wire_only = bound - plan::TURNAROUND * requests as u32;
    let per_point: Duration = devices
        .iter()
        .flat_map(|d| d.points.iter())
        .map(|p| {
            let block = plan::Block {
                area: p.area,
                start: p.address,
                count: p.kind.width(),
                points: vec![],
            };
            plan::transaction_time(&bus_config, &block.request())
        })
        .sum();

    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds + 2 {
        let start = Instant::now();
        for (device, blocks) in devices.iter().zip(&plans) {
            let result = read_device(&mut bus, device, blocks).await;
            assert!(result.replies.iter().all(Result::is_ok), "a read failed");
        }
        if round >= 2 {
            times.push(start.elapsed()); // the first two rounds warm up
        }
    }
    let med = median(times.clone());
    println!(
        "| {baud}{} | {points} | {requests} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} | {:.1} |",
        if over_tcp { " (rtu_over_tcp)" } else { "" },
        points as f64, // one request per point
        ms(wire_only),
        ms(bound),
        ms(med),
        ms(percentile(times, 0.9)),
        med.as_secs_f64() / bound.as_secs_f64(),
        med.as_secs_f64() / wire_only.as_secs_f64(),
        ms(per_point),
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(30);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    println!("| baud | points | requests/round | requests if one per point | wire time (ms) | computed bound (ms) | measured median (ms) | measured p90 (ms) | median / bound | median / wire time | one-request-per-point bound (ms) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    runtime.block_on(async {
        bench(9600, rounds, false).await;
        bench(115_200, rounds * 3, false).await;
        bench(9600, rounds, true).await;
    });
}
