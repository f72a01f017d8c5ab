//! Shared harness: a real broker (embedded rumqttd), a subscriber that
//! records what the platform receives, simulated slaves on a real pty, and
//! the real `fieldgate` binary running against them.
#![allow(dead_code)] // each test binary uses part of the harness

pub mod faulty;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::Value;

pub use fieldgate::sim::{Pty, Slaves};

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    fieldgate::broker::free_port().expect("free port")
}

/// One message as the platform side saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub topic: String,
    pub payload: Value,
    pub raw: Vec<u8>,
}

/// A broker on a free loopback port.
pub fn broker() -> u16 {
    let port = fieldgate::broker::free_port().expect("free port");
    fieldgate::broker::start(port).expect("broker starts");
    port
}

/// Records every message on `#` at `port`, and publishes as the platform.
pub struct Subscriber {
    seen: Arc<Mutex<Vec<Seen>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    pub async fn connect(port: u16) -> Self {
        Self::connect_with(port, None).await
    }

    pub async fn connect_with(port: u16, transport: Option<Transport>) -> Self {
        let id = format!("platform-{port}-{}", std::process::id());
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        // The platform side sends and takes large messages (hostile tests).
        options.set_max_packet_size(4 << 20, 4 << 20);
        if let Some(t) = transport {
            options.set_transport(t);
        }
        let (client, mut events) = AsyncClient::new(options, 64);
        client
            .subscribe("#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let payload = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&p.payload).into())
                        });
                        sink.lock().unwrap().push(Seen {
                            at: Instant::now(),
                            topic: p.topic,
                            payload,
                            raw: p.payload.to_vec(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), ready_rx)
            .await
            .expect("subscribed within 5 s")
            .expect("subscriber alive");
        Self { seen, client, task }
    }

    /// Publishes as the platform would (QoS 1).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Publishes a retained message (QoS 1).
    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload.into())
            .await
            .expect("publish");
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|s| s.topic == topic)
            .collect()
    }

    /// Waits until `done` holds for the messages so far, or panics after `limit`.
    pub async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[Seen]) -> bool,
    ) -> Vec<Seen> {
        let start = Instant::now();
        loop {
            let all = self.all();
            if done(&all) {
                return all;
            }
            if start.elapsed() > limit {
                panic!("timed out after {limit:?} waiting for {what}; got {all:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The binary under test: this build's, or `$FIELDGATE_BIN` (to run the
/// same tests against another build, e.g. the last release, and see which
/// of them it fails).
pub fn bin() -> PathBuf {
    std::env::var_os("FIELDGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fieldgate")))
}

/// The real `fieldgate run` process, with its stderr log in a file.
pub struct Gateway {
    child: Child,
    pub dir: tempfile::TempDir,
    log: PathBuf,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Writes `config` (with `{data_dir}` filled in) and starts `fieldgate run`.
    pub fn start(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    /// The same, with extra environment variables (`NOTIFY_SOCKET` …).
    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config.replace("{data_dir}", &dir.path().join("data").display().to_string());
        std::fs::write(dir.path().join("fieldgate.toml"), config).expect("write config");
        let log = dir.path().join("fieldgate.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::spawn(dir.path(), &log, &env);
        Self {
            child,
            dir,
            log,
            env,
        }
    }

    fn spawn(dir: &Path, log: &Path, env: &[(String, String)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        Command::new(bin())
            .args([
                "--config",
                dir.join("fieldgate.toml").to_str().unwrap(),
                "run",
            ])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("fieldgate starts")
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9`, as a crash or power cut would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (SIGHUP, SIGTERM …) to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

    /// Waits up to `limit` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Starts the same config and data directory again.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.dir.path(), &self.log, &self.env);
    }

    /// Runs another subcommand on the same config; returns its stdout.
    pub fn command(&self, args: &[&str]) -> String {
        let out = Command::new(bin())
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .output()
            .expect("fieldgate runs");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("fieldgate.toml")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `[gateway]`, `[platform]`, `[api]` (off: tests that want the API
/// replace [`API_OFF`]) and `[[bus]]` sections for a test.
pub const API_OFF: &str = "[api]\nlisten = \"\"\n";

pub fn header(broker_port: u16, pty: &Path, bus_extra: &str) -> String {
    let timeout = if bus_extra.contains("timeout") {
        ""
    } else {
        "timeout = \"300ms\""
    };
    format!(
        r#"
[gateway]
id = "test-gw"
data_dir = "{{data_dir}}"

[platform]
host = "127.0.0.1"
port = {broker_port}
access_token = "token"
project_key = "key"
max_publish_rate = 0

[api]
listen = ""

[[bus]]
name = "line"
port = "{}"
baud = 115200
{timeout}
{bus_extra}
"#,
        pty.display()
    )
}

/// ThingsCloud event params of `method`, in arrival order.
pub fn events(seen: &[Seen], method: &str) -> Vec<Value> {
    seen.iter()
        .filter(|s| s.topic.starts_with("event/report/"))
        .filter(|s| s.payload["method"] == method)
        .map(|s| s.payload["params"].clone())
        .collect()
}

/// Payloads on `topic`, in arrival order.
pub fn payloads(seen: &[Seen], topic: &str) -> Vec<Value> {
    seen.iter()
        .filter(|s| s.topic == topic)
        .map(|s| s.payload.clone())
        .collect()
}

/// A `[[device]]` on bus "line" with its points (name, TOML body).
pub fn device(name: &str, unit: u8, poll: &str, extra: &str, points: &[(&str, &str)]) -> String {
    let mut out = format!(
        "\n[[device]]\nname = \"{name}\"\nbus = \"line\"\nunit = {unit}\npoll = \"{poll}\"\n{extra}\n"
    );
    for (name, spec) in points {
        out += &format!("\n[[device.point]]\nname = \"{name}\"\n{spec}\n");
    }
    out
}

/// The usual setup: `slaves` on a pty, a broker, a subscriber, and
/// `fieldgate run` polling `devices` on bus "line".
pub struct Rig {
    pub platform: Subscriber,
    pub gw: Gateway,
    pub pty: Pty,
}

impl Rig {
    pub async fn start(slaves: &Slaves, bus_extra: &str, devices: &str) -> Self {
        Self::start_with_api(slaves, bus_extra, devices, API_OFF).await
    }

    /// The same with `api` as the `[api]` section.
    pub async fn start_with_api(
        slaves: &Slaves,
        bus_extra: &str,
        devices: &str,
        api: &str,
    ) -> Self {
        let pty = slaves.serve().expect("pty");
        let port = broker();
        let platform = Subscriber::connect(port).await;
        let config = header(port, &pty.path, bus_extra).replace(API_OFF, api) + devices;
        let gw = Gateway::start(&config);
        Self { platform, gw, pty }
    }

    /// Waits for `n` messages on `topic`; returns everything seen so far.
    pub async fn wait_for(&self, topic: &str, n: usize, limit: Duration) -> Vec<Seen> {
        self.platform
            .wait_until(limit, &format!("{n} messages on {topic}"), |s| {
                payloads(s, topic).len() >= n
            })
            .await
    }
}

/// A TCP relay in front of the broker that can go down and come back on the
/// same port: an outage as the gateway sees it, while the broker and the
/// test's subscriber stay up.
pub struct Relay {
    pub port: u16,
    target: u16,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    pub async fn start(target: u16) -> Self {
        let port = fieldgate::broker::free_port().expect("free port");
        let relay = Self {
            port,
            target,
            tasks: Arc::default(),
        };
        relay.up().await;
        relay
    }

    /// Accepts and relays connections again.
    pub async fn up(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("relay binds");
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(relay);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// The counter values in `topic` payloads under `field` (sub-device key
/// `key`, or the gateway's own attributes), in arrival order.
pub fn counter_values(seen: &[Seen], topic: &str, key: Option<&str>, field: &str) -> Vec<u64> {
    seen.iter()
        .filter(|s| s.topic == topic)
        .filter_map(|s| match key {
            Some(k) => s.payload.get(k)?.get(field)?.as_u64(),
            None => s.payload.get(field)?.as_u64(),
        })
        .collect()
}

/// Checks at-least-once, in-order delivery: every value from `first` to
/// `last` arrived, and the first arrivals are in increasing order
/// (redelivered duplicates are allowed).
pub fn assert_complete_in_order(values: &[u64], first: u64, last: u64) {
    let mut firsts = Vec::new();
    for v in values {
        if !firsts.contains(v) {
            firsts.push(*v);
        }
    }
    let missing: Vec<u64> = (first..=last).filter(|v| !firsts.contains(v)).collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?} of {first}..={last}; got {values:?}"
    );
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "out of order: {firsts:?}"
    );
}

/// A tmpfs mounted for one test, unmounted when dropped (needs root).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `options` as for `mount -o`, e.g. `size=1M` or `ro,size=1M`.
    pub fn mount(path: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(path).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(path.to_path_buf()))
    }

    pub fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
