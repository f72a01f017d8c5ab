//! Bad days, each a regression test of a defect the core review found
//! (issue 9), through the real binary, a real pty and a real broker: a
//! fault-injecting slave ([`common::faulty`]), brokers that refuse large
//! packets or go away, hostile downlink. Run them against another build
//! with `FIELDGATE_BIN=/path/to/fieldgate cargo test --test faults`.

mod common;

use std::time::{Duration, Instant};

use common::faulty::{Fault, Faulty};
use common::*;
use fieldgate::modbus::Request;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

fn reg(address: u16, extra: &str) -> String {
    format!("area = \"holding\"\naddress = {address}\ntype = \"u16\"\n{extra}")
}

/// A broker, the platform's subscriber and `fieldgate run` on `devices`
/// behind `slave`.
async fn start(pty: &std::path::Path, bus_extra: &str, devices: &str) -> (Subscriber, Gateway) {
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let gw = Gateway::start(&(header(port, pty, bus_extra) + devices));
    (platform, gw)
}

async fn readings(platform: &Subscriber, n: usize, within: Duration) -> Vec<Seen> {
    platform
        .wait_until(within, &format!("{n} readings"), |s| {
            payloads(s, "attributes").len() >= n
        })
        .await
}

/// Defect 1: a command whose method is 32,700 C1 control characters gets
/// a short reply, and the readings behind it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_command_method_gets_a_bounded_reply_and_blocks_nothing() {
    let slave = Faulty::start();
    slave.set(1, 0, 7);
    let devices = device("meter", 1, "200ms", "", &[("v", &reg(0, ""))]);
    let (platform, gw) = start(&slave.pty.path, "", &devices).await;
    readings(&platform, 1, Duration::from_secs(10)).await;
    let method = "\u{85}".repeat(32_700);
    let payload = serde_json::to_vec(&json!({ "method": method, "params": {}, "id": 1 })).unwrap();
    assert!(payload.len() < 64 * 1024, "within the downlink limit");
    platform.publish("command/send/1", payload).await;
    let seen = platform
        .wait_until(Duration::from_secs(10), "the reply", |s| {
            !payloads(s, "command/reply/1").is_empty()
        })
        .await;
    let reply = seen.iter().find(|s| s.topic == "command/reply/1").unwrap();
    assert!(
        reply.raw.len() < 1024,
        "a bounded reply: {} bytes",
        reply.raw.len()
    );
    assert_eq!(reply.payload["params"]["ok"], false);
    assert!(reply.payload["params"]["error"]
        .as_str()
        .unwrap()
        .contains("unknown method"));
    let before = payloads(&seen, "attributes").len();
    readings(&platform, before + 10, Duration::from_secs(10)).await;
    assert!(
        gw.log_lines("broker connection").is_empty(),
        "no reconnect:\n{}",
        gw.log()
    );
}

/// Defect 1: a retained 300 KiB message on a subscribed topic costs that
/// message, never a reconnect loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_oversized_message_costs_only_itself() {
    let slave = Faulty::start();
    slave.set(1, 0, 7);
    let port = broker();
    let platform = Subscriber::connect(port).await;
    platform
        .publish_retained("attributes/push", vec![b' '; 300 * 1024])
        .await;
    let devices = device("meter", 1, "200ms", "", &[("v", &reg(0, ""))]);
    let gw = Gateway::start(&(header(port, &slave.pty.path, "") + &devices));
    readings(&platform, 20, Duration::from_secs(15)).await;
    assert!(
        gw.log_lines("broker connection").is_empty(),
        "no reconnect:\n{}",
        gw.log()
    );
    assert!(slave.writes().is_empty());
}

/// Defect 1: a broker that closes the connection on every message over
/// its own (smaller) limit: that message is dropped, counted and logged,
/// and the readings behind it go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_is_dropped_not_retried_forever() {
    let slave = Faulty::start();
    slave.set(1, 0, 7);
    slave.set(2, 0, 9);
    let port = fieldgate::broker::free_port().unwrap();
    let mut listener = fieldgate::broker::listener(port, None);
    listener.connections.max_payload_size = 4096;
    fieldgate::broker::start_listeners(vec![listener]).unwrap();
    let platform = Subscriber::connect(port).await;
    // Device "big" reports a 5 KB attribute name: over the broker's limit.
    let long_name = format!("v{}", "x".repeat(5000));
    let devices = device(
        "big",
        1,
        "2s",
        "key = \"big\"",
        &[(&long_name, &reg(0, ""))],
    ) + &device("small", 2, "300ms", "", &[("v", &reg(0, ""))]);
    let gw = Gateway::start(&(header(port, &slave.pty.path, "") + &devices));
    let seen = readings(&platform, 20, Duration::from_secs(60)).await;
    assert!(
        !gw.log_lines("taking").is_empty() && !gw.log_lines("can never be published").is_empty(),
        "the refused message is named in the log:\n{}",
        gw.log()
    );
    // Later big reports are dropped at once: the small device stays live.
    let start = payloads(&seen, "attributes").len();
    readings(&platform, start + 10, Duration::from_secs(10)).await;
    gw.signal(Signal::SIGTERM);
    let mut gw = gw;
    gw.wait_exit(Duration::from_secs(10));
    let status = gw.command(&["buffer"]);
    let dropped: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("dropped so far: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 1, "counted: {status}");
}

/// Defect 2: noise, garbage, CRC-bad, truncated and PDU-garbled replies
/// are each one failed attempt: the port stays open, nobody goes offline,
/// and a write whose first reply was garbled succeeds on its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_on_the_line_is_one_failed_attempt_not_a_lost_port() {
    let slave = Faulty::start();
    slave.set(1, 0, 11);
    slave.set(2, 0, 22);
    let devices = device(
        "meter1",
        1,
        "200ms",
        "",
        &[("v1", &reg(0, "")), ("sp", &reg(1, "writable = true"))],
    ) + &device("meter2", 2, "200ms", "key = \"m2\"", &[("v2", &reg(0, ""))]);
    let (platform, gw) = start(&slave.pty.path, "retries = 1", &devices).await;
    readings(&platform, 2, Duration::from_secs(10)).await;
    for fault in [
        Fault::NoiseThenReply,
        Fault::BadCrc,
        Fault::Truncated,
        Fault::BadPdu,
        Fault::Garbage(300),
        Fault::BadCrc,
    ] {
        slave.script([fault]);
        // Long enough for the attempt, its settle time and its retry.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    slave.script_writes([Fault::BadCrc]);
    platform
        .publish("attributes/push", br#"{"sp": 5}"#.to_vec())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = platform.all();
    assert_eq!(slave.get(1, 1), 5, "the write went through on its retry");
    let writes = slave.writes();
    assert_eq!(
        writes,
        [
            (1, Request::WriteRegister(1, 5)),
            (1, Request::WriteRegister(1, 5))
        ],
        "sent once, retried once after the garbled reply"
    );
    assert!(events(&seen, "write_failed").is_empty(), "{seen:#?}");
    assert!(events(&seen, "device_offline").is_empty(), "{seen:#?}");
    assert!(
        gw.log_lines("reopening").is_empty(),
        "the port stayed open:\n{}",
        gw.log()
    );
    assert!(
        gw.log_lines("port").iter().all(|l| !l.contains("back")),
        "{}",
        gw.log()
    );
    // Both devices kept reporting through it all.
    assert!(payloads(&seen, "attributes").len() >= 25, "{seen:#?}");
    assert!(
        payloads(&seen, "gateway/attributes").len() >= 25,
        "{seen:#?}"
    );
}

/// Defect 3: a bit write on a byte-swapped register changes that bit of
/// the logical register and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_write_keeps_its_neighbours_in_every_byte_order() {
    let slave = Faulty::start();
    // Logical 0x0012 in each order; on one register BADC and DCBA swap bytes.
    for (address, wire) in [(5, 0x1200), (6, 0x1200), (7, 0x0012), (8, 0x0012)] {
        slave.set(1, address, wire);
    }
    let points: Vec<(String, String)> = [("BADC", 5), ("DCBA", 6), ("ABCD", 7), ("CDAB", 8)]
        .iter()
        .map(|(order, address)| {
            (
                format!("flag_{}", order.to_lowercase()),
                format!("area = \"holding\"\naddress = {address}\ntype = \"bool\"\nbit = 0\norder = \"{order}\"\nwritable = true"),
            )
        })
        .collect();
    let points: Vec<(&str, &str)> = points
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    let devices = device("plc", 1, "500ms", "", &points);
    let (platform, _gw) = start(&slave.pty.path, "", &devices).await;
    readings(&platform, 1, Duration::from_secs(10)).await;
    platform
        .publish(
            "attributes/push",
            br#"{"flag_badc": true, "flag_dcba": true, "flag_abcd": true, "flag_cdab": true}"#
                .to_vec(),
        )
        .await;
    let start = Instant::now();
    while slave.writes().len() < 4 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slave.get(1, 5), 0x1300, "BADC: logical 0x0013");
    assert_eq!(slave.get(1, 6), 0x1300, "DCBA: logical 0x0013");
    assert_eq!(slave.get(1, 7), 0x0013, "ABCD");
    assert_eq!(slave.get(1, 8), 0x0013, "CDAB");
}

/// Defect 4: a reload whose CA file is missing or empty is refused at
/// load; the daemon goes on with the config it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_bad_ca_file_keeps_the_daemon_running() {
    let slave = Faulty::start();
    slave.set(1, 0, 3);
    let devices = device("meter", 1, "200ms", "", &[("v", &reg(0, ""))]);
    let (platform, mut gw) = start(&slave.pty.path, "", &devices).await;
    readings(&platform, 1, Duration::from_secs(10)).await;
    let good = std::fs::read_to_string(gw.config_path()).unwrap();
    let empty = gw.dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (n, ca) in [gw.dir.path().join("missing.pem"), empty]
        .iter()
        .enumerate()
    {
        let bad = good.replace(
            "max_publish_rate = 0",
            &format!(
                "max_publish_rate = 0\ntls = true\nca_file = \"{}\"",
                ca.display()
            ),
        );
        std::fs::write(gw.config_path(), bad).unwrap();
        gw.signal(Signal::SIGHUP);
        let start = Instant::now();
        while gw.log_lines("reload failed").len() <= n {
            assert!(start.elapsed() < Duration::from_secs(10), "{}", gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gw.running(), "the daemon must survive:\n{}", gw.log());
        let line = gw.log_lines("reload failed").pop().unwrap();
        assert!(line.contains(&ca.display().to_string()), "{line}");
    }
    let before = payloads(&platform.all(), "attributes").len();
    readings(&platform, before + 5, Duration::from_secs(10)).await;
    assert!(gw.running());
}

/// Defect 5: fifteen writes to a slave that does not answer writes take
/// about 12 s of bus time; polling goes on between them and the watchdog
/// keeps being pinged, since liveness is not a place in the job queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_writes_neither_starves_polling_nor_trips_the_watchdog() {
    let slave = Faulty::start();
    slave.set(1, 0, 1);
    slave.deaf_to_writes(1);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let devices = device(
        "meter",
        1,
        "300ms",
        "",
        &[("v", &reg(0, "")), ("sp", &reg(1, "writable = true"))],
    );
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = header(port, &slave.pty.path, "timeout = \"200ms\"\nretries = 2") + &devices;
    let _gw = Gateway::start_with(&config, &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    readings(&platform, 1, Duration::from_secs(10)).await;
    for i in 0..15 {
        platform
            .publish("attributes/push", format!("{{\"sp\": {i}}}").into_bytes())
            .await;
    }
    let flood = Instant::now();
    let mut pings = Vec::new();
    let mut buf = [0u8; 4096];
    while flood.elapsed() < Duration::from_secs(12) {
        if let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                pings.push(flood.elapsed());
            }
        }
    }
    let mut last = Duration::ZERO;
    for at in &pings {
        assert!(
            *at - last < Duration::from_secs(7),
            "no watchdog ping between {last:?} and {at:?}: {pings:?}"
        );
        last = *at;
    }
    assert!(pings.len() >= 2, "{pings:?}");
    let seen = platform.all();
    let during: Vec<_> = seen
        .iter()
        .filter(|s| s.topic == "attributes" && s.at > Instant::now() - Duration::from_secs(11))
        .collect();
    assert!(
        during.len() >= 10,
        "polling went on during the writes: {} readings",
        during.len()
    );
    assert!(
        slave.writes().len() >= 9,
        "the writes were tried too: {}",
        slave.writes().len()
    );
}

/// Defect 5: a write to a device that is offline fails at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_an_offline_device_fails_fast() {
    let slave = Faulty::start();
    slave.silence(1, true);
    let devices = device(
        "meter",
        1,
        "500ms",
        "",
        &[("sp", &reg(1, "writable = true"))],
    );
    let (platform, _gw) = start(
        &slave.pty.path,
        "timeout = \"300ms\"\nretries = 2",
        &devices,
    )
    .await;
    platform
        .wait_until(Duration::from_secs(10), "device_offline", |s| {
            !events(s, "device_offline").is_empty()
        })
        .await;
    let sent = Instant::now();
    platform
        .publish("attributes/push", br#"{"sp": 1}"#.to_vec())
        .await;
    let seen = platform
        .wait_until(Duration::from_secs(5), "write_failed", |s| {
            !events(s, "write_failed").is_empty()
        })
        .await;
    let failed = events(&seen, "write_failed")[0].clone();
    let at = seen
        .iter()
        .find(|s| s.payload["method"] == "write_failed")
        .unwrap()
        .at;
    assert!(
        failed["error"].as_str().unwrap().contains("offline"),
        "{failed}"
    );
    // At most the transaction in progress (3 attempts of 300 ms) first.
    assert!(at - sent < Duration::from_secs(2), "{:?}", at - sent);
    assert!(slave.writes().is_empty(), "nothing was sent");
}

/// Defect 6: a write that lands in the middle of a poll: the poll's
/// report (read before the write) reaches the platform before the
/// read-back, never after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_back_is_never_followed_by_the_stale_value() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.holding.insert(0, 7);
        u.slow.push((
            fieldgate::config::Area::Holding,
            100..=100,
            Duration::from_millis(300),
        ));
        u.slow.push((
            fieldgate::config::Area::Holding,
            200..=200,
            Duration::from_millis(300),
        ));
    });
    let devices = device(
        "plc",
        1,
        "2s",
        "",
        &[
            ("p0", &reg(0, "writable = true")),
            ("p100", &reg(100, "")),
            ("p200", &reg(200, "")),
        ],
    );
    let rig = Rig::start(&slaves, "timeout = \"1s\"", &devices).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    // Wait for the next poll's first read, then write while it is in progress.
    let reads = slaves.received().len();
    while slaves.received().len() == reads {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    rig.platform
        .publish("attributes/push", br#"{"p0": 42}"#.to_vec())
        .await;
    let seen = rig.wait_for("attributes", 4, Duration::from_secs(10)).await;
    let p0: Vec<u64> = payloads(&seen, "attributes")
        .iter()
        .filter_map(|p| p.get("p0").and_then(Value::as_u64))
        .collect();
    let first_new = p0.iter().position(|v| *v == 42).expect("the read-back");
    assert!(
        p0[first_new..].iter().all(|v| *v == 42),
        "a stale value followed the read-back: {p0:?}"
    );
    assert!(p0[..first_new].contains(&7), "{p0:?}");
}

/// Defect 7: 64-bit integers are written exactly, never through f64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_bit_writes_reach_the_registers_exactly() {
    let slave = Faulty::start();
    let devices = device(
        "counter",
        1,
        "1s",
        "",
        &[
            (
                "big",
                "area = \"holding\"\naddress = 10\ntype = \"i64\"\nwritable = true",
            ),
            (
                "ubig",
                "area = \"holding\"\naddress = 20\ntype = \"u64\"\nwritable = true",
            ),
        ],
    );
    let (platform, _gw) = start(&slave.pty.path, "", &devices).await;
    readings(&platform, 1, Duration::from_secs(10)).await;
    platform
        .publish(
            "attributes/push",
            br#"{"big": 9223372036854775807, "ubig": 18446744073709551614}"#.to_vec(),
        )
        .await;
    let seen = platform
        .wait_until(Duration::from_secs(10), "the read-back", |s| {
            payloads(s, "attributes")
                .iter()
                .any(|p| p.get("ubig").is_some_and(|v| v != 0))
        })
        .await;
    let regs = |base: u16| {
        (0..4u16)
            .map(|i| slave.get(1, base + i))
            .collect::<Vec<_>>()
    };
    assert_eq!(regs(10), [0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF]);
    assert_eq!(regs(20), [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]);
    let back = payloads(&seen, "attributes").pop().unwrap();
    assert_eq!(back["big"], json!(9_223_372_036_854_775_807_i64));
    assert_eq!(back["ubig"], json!(18_446_744_073_709_551_614_u64));
    // One past the end is refused, nothing written.
    let writes = slave.writes().len();
    platform
        .publish(
            "attributes/push",
            br#"{"big": 9223372036854775808}"#.to_vec(),
        )
        .await;
    platform
        .wait_until(Duration::from_secs(5), "write_rejected", |s| {
            !events(s, "write_rejected").is_empty()
        })
        .await;
    assert_eq!(slave.writes().len(), writes);
}

/// Defect 8: a baud rate the line math cannot serve is a config error.
#[test]
fn a_baud_below_300_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("slow.toml");
    std::fs::write(
        &config,
        "[gateway]\nid = \"gw\"\n\n[[bus]]\nname = \"b\"\nport = \"/dev/null\"\nbaud = 110\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("slow.toml:7:8"), "{stderr}");
    assert!(stderr.contains("300"), "{stderr}");
}

/// Defect 9: a full disk does not stop the daemon, is logged once, and
/// storing resumes by itself when space returns; every reading that was
/// not stored is counted: delivered + dropped + still held accounts for
/// every poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_a_full_disk_cannot_store_are_all_counted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(disk) = Tmpfs::mount(&data, "size=1M") else {
        eprintln!("SKIPPED readings_a_full_disk_cannot_store_are_all_counted: cannot mount a tmpfs here (needs root)");
        return;
    };
    let specs: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                format!("p{i}"),
                format!("area = \"holding\"\naddress = {i}\ntype = \"u16\""),
            )
        })
        .collect();
    let points: Vec<(&str, &str)> = specs
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.read_counters.push((fieldgate::config::Area::Holding, 0))
    });
    let pty = slaves.serve().unwrap();
    let broker_port = broker();
    let relay = Relay::start(broker_port).await;
    relay.down();
    let platform = Subscriber::connect(broker_port).await;
    let config = header(relay.port, &pty.path, "")
        .replace("{data_dir}", &data.display().to_string())
        + &device("counter", 1, "50ms", "", &points);
    let mut gw = Gateway::start(&config);
    let start = Instant::now();
    while gw.log_lines("cannot append").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the disk never filled:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several reopen cycles while full.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(gw.running(), "a full disk must not stop the daemon");
    assert_eq!(
        gw.log_lines("cannot append").len(),
        1,
        "logged once:\n{}",
        gw.log()
    );
    disk.resize("64M");
    let start = Instant::now();
    while gw.log_lines("appending works again").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no recovery:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    relay.up().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    gw.signal(Signal::SIGTERM);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    let served = slaves.unit(1, |u| u.holding.get(&0).copied().unwrap_or(0)) as u64;
    let mut delivered: Vec<u64> = counter_values(&platform.all(), "attributes", None, "p0");
    delivered.sort();
    delivered.dedup();
    let status = gw.command(&["buffer"]);
    let figure = |label: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|n| n.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let (held, dropped) = (figure("messages held:"), figure("dropped so far:"));
    let accounted = delivered.len() as u64 + held + dropped;
    // A poll cut short at SIGTERM was read but never reported.
    assert!(
        accounted + 2 >= served,
        "{served} readings taken, {} delivered + {held} held + {dropped} dropped = {accounted}:\n{status}",
        delivered.len()
    );
    drop(disk);
}

/// Defect 10: two bad pushes a second against ThingsCloud's budget of one
/// message a second: the rejections take a small share of it (with a
/// count), and live readings are not delayed behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_pushes_does_not_delay_live_readings() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.read_counters.push((fieldgate::config::Area::Holding, 0))
    });
    // Half the budget: a backlog can drain.
    let devices = device("counter", 1, "2s", "", &[("n", &reg(0, ""))]);
    let pty = slaves.serve().unwrap();
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = header(port, &pty.path, "")
        .replace("max_publish_rate = 0", "max_publish_rate = 1")
        + &devices;
    let _gw = Gateway::start(&config);
    readings(&platform, 1, Duration::from_secs(10)).await;
    let flood = Instant::now();
    for i in 0..40 {
        platform
            .publish(
                "attributes/push",
                format!("{{\"nope{i}\": 1}}").into_bytes(),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    let seen = platform.all();
    let rejected = events(&seen, "write_rejected");
    // A burst of ten, then a tenth of the budget.
    assert!(
        rejected.len() <= 14,
        "{} rejection events in {:?}",
        rejected.len(),
        flood.elapsed()
    );
    let told: u64 = rejected
        .iter()
        .map(|p| 1 + p.get("repeated").and_then(Value::as_u64).unwrap_or(0))
        .sum();
    assert!(told >= 25, "the rejections are counted: {rejected:?}");
    let served = slaves.unit(1, |u| u.holding.get(&0).copied().unwrap_or(0)) as u64;
    let latest = counter_values(&seen, "attributes", None, "n")
        .into_iter()
        .max()
        .unwrap_or(0);
    assert!(
        latest + 2 >= served,
        "live readings lag: latest delivered {latest}, taken {served}"
    );
}

/// Defect 11: every accepted write gets an outcome and every accepted
/// command a reply, across a reload and across SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_and_shutdown_answer_every_accepted_job() {
    let slave = Faulty::start();
    slave.set(1, 0, 1);
    slave.deaf_to_writes(1);
    let devices = device(
        "meter",
        1,
        "1s",
        "",
        &[("v", &reg(0, "")), ("sp", &reg(1, "writable = true"))],
    ) + "\n[[command]]\nname = \"zero\"\ndevice = \"meter\"\nwrite = [ { point = \"sp\", value = 0 } ]\n";
    let (platform, mut gw) = start(
        &slave.pty.path,
        "timeout = \"300ms\"\nretries = 1",
        &devices,
    )
    .await;
    readings(&platform, 1, Duration::from_secs(10)).await;
    for i in 1..=6 {
        platform
            .publish("attributes/push", format!("{{\"sp\": {i}}}").into_bytes())
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(Signal::SIGHUP);
    let seen = platform
        .wait_until(Duration::from_secs(15), "6 write outcomes", |s| {
            events(s, "write_failed").len() >= 6
        })
        .await;
    let reasons: Vec<String> = events(&seen, "write_failed")
        .iter()
        .map(|p| p["error"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("reloaded")),
        "{reasons:?}"
    );

    for id in 1..=3 {
        platform
            .publish(
                &format!("command/send/{id}"),
                br#"{"method": "zero", "params": {}}"#.to_vec(),
            )
            .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal(Signal::SIGTERM);
    assert_eq!(
        gw.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    gw.restart();
    let seen = platform
        .wait_until(Duration::from_secs(15), "3 replies", |s| {
            (1..=3).all(|id| !payloads(s, &format!("command/reply/{id}")).is_empty())
        })
        .await;
    for id in 1..=3 {
        let reply = &payloads(&seen, &format!("command/reply/{id}"))[0];
        assert_eq!(reply["params"]["ok"], false, "{reply}");
    }
}
