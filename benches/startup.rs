//! Start-up time to READY: from spawning `fieldgate run` to systemd's
//! READY=1 arriving on NOTIFY_SOCKET (a datagram socket standing in for
//! systemd), with the 4 x 50-point map on a simulator pty and an outbox on
//! disk. Run: `cargo bench --bench startup` (results in BENCHMARKS.md).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldgate::config;
use fieldgate::sim::Slaves;

const RUNS: usize = 20;

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let work = tempfile::tempdir().unwrap();
    let map = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/bench-4x50.toml");
    let draft = config::load(&map).unwrap();
    let slaves = Slaves::for_devices(&draft.devices);
    let pty = runtime.block_on(async { slaves.serve() }).unwrap();
    let text = std::fs::read_to_string(&map)
        .unwrap()
        .replace("/dev/ttyUSB0", &pty.path.display().to_string())
        .replace(
            "/tmp/fieldgate-bench",
            &work.path().join("data").display().to_string(),
        )
        .replace(
            "port = 1883",
            &format!("port = {}", fieldgate::broker::free_port().unwrap()),
        );
    let config_path = work.path().join("fieldgate.toml");
    std::fs::write(&config_path, text).unwrap();
    let socket_path = work.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut times = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fieldgate"))
            .args(["--config", config_path.to_str().unwrap(), "run"])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("RUST_LOG", "off")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.recv(&mut buf).expect("READY=1 within 10 s");
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                break;
            }
        }
        times.push(start.elapsed());
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait().unwrap();
        // Drain STOPPING=1 and any STATUS= lines of this run.
        socket.set_nonblocking(true).unwrap();
        while socket.recv(&mut buf).is_ok() {}
        socket.set_nonblocking(false).unwrap();
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "start-up to READY=1, {RUNS} runs (4 x 50 map, outbox on disk): median {:.1} ms, min {:.1} ms, max {:.1} ms",
        ms(times[RUNS / 2]),
        ms(times[0]),
        ms(times[RUNS - 1])
    );
}
