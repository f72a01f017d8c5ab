//! End to end: simulated RTU slaves on a real pty → the `fieldgate run`
//! binary → a real MQTT broker → what the platform receives.
//!
//! Register contents are written from values computed independently of our
//! encoder (Python's `struct`, noted beside each), so a decoding bug cannot
//! hide behind a matching encoding bug.

mod common;

use std::time::Duration;

use common::*;
use fieldgate::config::Area;
use serde_json::json;
use tokio_modbus::ExceptionCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_twenty_points_give_exact_json() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.set_registers(Area::Input, 0, &[2296]); // voltage 229.6 (x0.1)
        u.set_registers(Area::Input, 1, &[0x4365, 0x999A]); // struct.pack('>f', 229.6)
        u.set_registers(Area::Input, 3, &[0x7960, 0xFFFE]); // '>i' -100000 = fffe7960, CDAB
        u.set_registers(Area::Input, 5, &[0xEE6B, 0x2800]); // '>I' 4000000000
        u.set_registers(Area::Input, 7, &[0x4093, 0x4A45, 0x6D5C, 0xFAAD]); // '>d' 1234.5678
        u.set_bit(Area::Coil, 0, true);
        u.set_bit(Area::Coil, 1, false);
        u.set_registers(Area::Holding, 0, &[0x0008]); // bit 3 set, bit 0 clear
        u.set_registers(Area::Holding, 1, &[0xFFFC]); // i16 -4 -> -4 x 0.5 - 10 = -12
    });
    slaves.unit(2, |u| {
        u.set_registers(Area::Holding, 0, &[1234]);
        u.set_registers(Area::Holding, 1, &[0xFFFE]); // i16 -2
        u.set_registers(Area::Holding, 2, &[0xFFFF, 0xFFFE, 0xD5FA, 0x0E00]); // '>q' -5000000000
        u.set_registers(Area::Holding, 6, &[0x141A, 0x99BE, 0x1C00, 0x0000]); // '>Q' 123456789012 reversed (DCBA)
        u.set_registers(Area::Holding, 10, &[0x803E, 0x0000]); // '>f' 0.25 = 3e800000, BADC
        u.set_registers(Area::Holding, 12, &[0x0000, 0x4A42]); // '>f' 50.5 = 424a0000, DCBA
        u.set_registers(Area::Holding, 20, &[0x5055, 0x4D50, 0x2D37, 0x0000]); // "PUMP-7\0\0"
        u.set_bit(Area::Discrete, 0, true);
        u.set_bit(Area::Discrete, 3, false);
        u.set_registers(Area::Input, 0, &[1500]);
    });
    let mut devices = device(
        "meter",
        1,
        "300ms",
        "",
        &[
            (
                "voltage",
                "area = \"input\"\naddress = 0\ntype = \"u16\"\nscale = 0.1",
            ),
            ("current", "area = \"input\"\naddress = 1\ntype = \"f32\""),
            (
                "power",
                "area = \"input\"\naddress = 3\ntype = \"i32\"\norder = \"CDAB\"",
            ),
            ("energy", "area = \"input\"\naddress = 5\ntype = \"u32\""),
            ("total", "area = \"input\"\naddress = 7\ntype = \"f64\""),
            ("relay1", "area = \"coil\"\naddress = 0\ntype = \"bool\""),
            ("relay2", "area = \"coil\"\naddress = 1\ntype = \"bool\""),
            (
                "alarm",
                "area = \"holding\"\naddress = 0\ntype = \"bool\"\nbit = 3",
            ),
            (
                "fault",
                "area = \"holding\"\naddress = 0\ntype = \"bool\"\nbit = 0",
            ),
            (
                "temp",
                "area = \"holding\"\naddress = 1\ntype = \"i16\"\nscale = 0.5\noffset = -10.0",
            ),
        ],
    );
    devices += &device(
        "pump",
        2,
        "300ms",
        "key = \"sub-1\"",
        &[
            ("level", "area = \"holding\"\naddress = 0\ntype = \"u16\""),
            ("trim", "area = \"holding\"\naddress = 1\ntype = \"i16\""),
            ("big", "area = \"holding\"\naddress = 2\ntype = \"i64\""),
            (
                "count",
                "area = \"holding\"\naddress = 6\ntype = \"u64\"\norder = \"DCBA\"",
            ),
            (
                "ratio",
                "area = \"holding\"\naddress = 10\ntype = \"f32\"\norder = \"BADC\"",
            ),
            (
                "flow",
                "area = \"holding\"\naddress = 12\ntype = \"f32\"\norder = \"DCBA\"",
            ),
            (
                "name",
                "area = \"holding\"\naddress = 20\ntype = \"string\"\nlength = 4",
            ),
            (
                "running",
                "area = \"discrete\"\naddress = 0\ntype = \"bool\"",
            ),
            ("door", "area = \"discrete\"\naddress = 3\ntype = \"bool\""),
            ("speed", "area = \"input\"\naddress = 0\ntype = \"u16\""),
        ],
    );
    let rig = Rig::start(&slaves, "", &devices).await;

    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "both reports", |s| {
            !payloads(s, "attributes").is_empty() && !payloads(s, "gateway/attributes").is_empty()
        })
        .await;
    let own = &payloads(&seen, "attributes")[0];
    assert_eq!(
        *own,
        json!({"voltage": 229.6, "current": 229.6, "power": -100000, "energy": 4000000000u64,
               "total": 1234.5678, "relay1": true, "relay2": false, "alarm": true,
               "fault": false, "temp": -12.0}),
        "log:\n{}",
        rig.gw.log()
    );
    // Integers stay integers: 4000000000, not 4000000000.0.
    assert!(own["energy"].is_u64() && own["power"].is_i64() && own["temp"].is_f64());
    let sub = &payloads(&seen, "gateway/attributes")[0];
    assert_eq!(
        *sub,
        json!({"sub-1": {"level": 1234, "trim": -2, "big": -5000000000i64, "count": 123456789012u64,
                         "ratio": 0.25, "flow": 50.5, "name": "PUMP-7", "running": true,
                         "door": false, "speed": 1500}})
    );
    // Coalescing: the meter needs 3 reads (input 0..10, coils 0..1, holding 0..1).
    let meter_reads = slaves.received().iter().filter(|r| r.unit == 1).count();
    assert!(meter_reads >= 3);
    let first_poll: Vec<_> = slaves
        .received()
        .into_iter()
        .filter(|r| r.unit == 1)
        .take(3)
        .collect();
    let spans: Vec<_> = first_poll.iter().map(|r| r.request.span()).collect();
    assert_eq!(
        spans,
        [
            (Area::Coil, 0, 2),
            (Area::Input, 0, 11),
            (Area::Holding, 0, 2)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_slave_is_logged_once_and_its_neighbour_keeps_reporting() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[7]));
    slaves.unit(2, |u| u.silent = true);
    let mut devices = device(
        "alive",
        1,
        "200ms",
        "",
        &[("a", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    devices += &device(
        "dead",
        2,
        "200ms",
        "key = \"d\"",
        &[("b", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let rig = Rig::start(&slaves, "retries = 1", &devices).await;

    rig.platform
        .wait_until(
            Duration::from_secs(10),
            "10 reports of the live device",
            |s| payloads(s, "attributes").len() >= 10,
        )
        .await;
    assert!(payloads(&rig.platform.all(), "gateway/attributes").is_empty());
    let lines = rig.gw.log_lines("device dead");
    assert_eq!(
        lines.len(),
        1,
        "logged once per state change, got {lines:#?}"
    );
    assert!(lines[0].contains("not responding"), "{lines:?}");

    // It comes back: logged once more, and it reports again.
    slaves.unit(2, |u| u.silent = false);
    rig.platform
        .wait_until(Duration::from_secs(15), "the revived device", |s| {
            !payloads(s, "gateway/attributes").is_empty()
        })
        .await;
    let lines = rig.gw.log_lines("device dead");
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert!(lines[1].contains("responding again"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_on_one_block_keeps_the_other_points() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.set_registers(Area::Input, 0, &[11, 22]);
        u.exceptions
            .push((Area::Holding, 100..=101, ExceptionCode::IllegalDataAddress));
    });
    let devices = device(
        "m",
        1,
        "200ms",
        "",
        &[
            ("x", "area = \"input\"\naddress = 0\ntype = \"u16\""),
            ("y", "area = \"input\"\naddress = 1\ntype = \"u16\""),
            ("z", "area = \"holding\"\naddress = 100\ntype = \"u32\""),
        ],
    );
    let rig = Rig::start(&slaves, "", &devices).await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "5 reports", |s| {
            payloads(s, "attributes").len() >= 5
        })
        .await;
    for p in payloads(&seen, "attributes") {
        assert_eq!(p, json!({"x": 11, "y": 22}));
    }
    let lines = rig.gw.log_lines("cannot read");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains("exception 0x02") && lines[0].contains("holding 100..101"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_is_never_taken_for_the_next_answer() {
    // Two blocks of the same unit with identical shape: RTU has no
    // transaction id, so only discarding stale input tells their replies apart.
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.set_registers(Area::Holding, 0, &[1111, 1112]);
        u.set_registers(Area::Holding, 60, &[2221, 2222]);
        u.slow
            .push((Area::Holding, 0..=1, Duration::from_millis(400)));
    });
    let devices = device(
        "m",
        1,
        "500ms",
        "",
        &[
            ("a", "area = \"holding\"\naddress = 0\ntype = \"u16\""),
            ("a2", "area = \"holding\"\naddress = 1\ntype = \"u16\""),
            ("b", "area = \"holding\"\naddress = 60\ntype = \"u16\""),
            ("b2", "area = \"holding\"\naddress = 61\ntype = \"u16\""),
        ],
    );
    let rig = Rig::start(&slaves, "retries = 1", &devices).await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(20), "5 reports", |s| {
            payloads(s, "attributes").len() >= 5
        })
        .await;
    for p in payloads(&seen, "attributes") {
        assert_eq!(p, json!({"b": 2221, "b2": 2222}), "log:\n{}", rig.gw.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_unit_backs_off_while_its_neighbour_keeps_its_interval() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[1]));
    slaves.unit(3, |u| u.silent = true);
    let mut devices = device(
        "alive",
        1,
        "250ms",
        "",
        &[("a", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    devices += &device(
        "dead",
        3,
        "250ms",
        "key = \"d\"",
        &[("b", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let _rig = Rig::start(&slaves, "retries = 0\ntimeout = \"100ms\"", &devices).await;
    tokio::time::sleep(Duration::from_millis(7500)).await;

    let times = |unit: u8| -> Vec<f64> {
        let at: Vec<_> = slaves
            .received()
            .into_iter()
            .filter(|r| r.unit == unit)
            .map(|r| r.at)
            .collect();
        at.windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
            .collect()
    };
    let dead = times(3);
    // 1x, 1x, 1x, then 2x, 3x, 4x, ... the 250 ms interval.
    let expected = [250.0, 250.0, 250.0, 500.0, 750.0, 1000.0, 1250.0, 1500.0];
    assert!(dead.len() >= expected.len(), "dead unit gaps {dead:?}");
    for (got, want) in dead.iter().zip(expected) {
        assert!((got - want).abs() < 120.0, "gaps {dead:?} vs {expected:?}");
    }
    let mut alive = times(1);
    alive.sort_by(f64::total_cmp);
    let median = alive[alive.len() / 2];
    assert!(
        (median - 250.0).abs() < 30.0,
        "neighbour's median gap {median} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_on_change_honours_deadband_and_heartbeat() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[100, 1]));
    let devices = device(
        "m",
        1,
        "100ms",
        "report = \"change\"\nheartbeat = \"3s\"",
        &[
            (
                "temp",
                "area = \"holding\"\naddress = 0\ntype = \"u16\"\nscale = 0.1\ndeadband = 0.5",
            ),
            ("mode", "area = \"holding\"\naddress = 1\ntype = \"u16\""),
        ],
    );
    let rig = Rig::start(&slaves, "", &devices).await;
    rig.platform
        .wait_until(Duration::from_secs(10), "first report", |s| {
            !payloads(s, "attributes").is_empty()
        })
        .await;
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[103])); // +0.3: inside the deadband
    tokio::time::sleep(Duration::from_millis(600)).await;
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[111])); // +1.1: reported alone
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "heartbeat", |s| {
            payloads(s, "attributes").len() >= 3
        })
        .await;
    let got = payloads(&seen, "attributes");
    assert_eq!(
        got[..3],
        [
            json!({"temp": 10.0, "mode": 1}),
            json!({"temp": 11.1}),
            json!({"temp": 11.1, "mode": 1})
        ]
    );
    let reports: Vec<_> = seen.iter().filter(|s| s.topic == "attributes").collect();
    let heartbeat = (reports[2].at - reports[0].at).as_secs_f64();
    assert!(
        (2.8..3.5).contains(&heartbeat),
        "heartbeat after {heartbeat} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_port_is_reopened_and_the_other_bus_runs_on() {
    // The config names a symlink, as udev's /dev/serial/by-id does; unplugging
    // removes both the line and the link.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyUSB-by-id");
    let first = Slaves::new();
    first.unit(1, |u| u.set_registers(Area::Holding, 0, &[1]));
    let other = Slaves::new();
    other.unit(1, |u| u.set_registers(Area::Holding, 0, &[2]));
    let pty = first.serve().unwrap();
    std::os::unix::fs::symlink(&pty.path, &link).unwrap();
    let other_pty = other.serve().unwrap();

    let port = broker();
    let platform = Subscriber::connect(port).await;
    let mut config = header(port, &link, "");
    config += &format!(
        "\n[[bus]]\nname = \"line2\"\nport = \"{}\"\nbaud = 115200\n",
        other_pty.path.display()
    );
    config += &device(
        "on-usb",
        1,
        "200ms",
        "",
        &[("a", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    config += &device(
        "on-other",
        1,
        "200ms",
        "key = \"o\"",
        &[("b", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    )
    .replace("bus = \"line\"", "bus = \"line2\"");
    let gw = Gateway::start(&config);
    platform
        .wait_until(Duration::from_secs(10), "reports from both buses", |s| {
            !payloads(s, "attributes").is_empty() && !payloads(s, "gateway/attributes").is_empty()
        })
        .await;

    // Unplug for 2 s.
    drop(pty);
    std::fs::remove_file(&link).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unplugged = platform.all().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = &platform.all()[unplugged..];
    assert!(
        payloads(during, "attributes").is_empty(),
        "no reports from a missing port"
    );
    assert!(
        payloads(during, "gateway/attributes").len() >= 5,
        "the other bus keeps its pace"
    );

    // Plug back in: a new pty behind the same name.
    let pty = first.serve().unwrap();
    std::os::unix::fs::symlink(&pty.path, &link).unwrap();
    let replugged = platform.all().len();
    platform
        .wait_until(Duration::from_secs(35), "reports after the replug", |s| {
            !payloads(&s[replugged..], "attributes").is_empty()
        })
        .await;
    let log = gw.log();
    let bus_lines: Vec<&str> = log.lines().filter(|l| l.contains("bus line:")).collect();
    assert_eq!(
        bus_lines.len(),
        2,
        "one line when lost, one when back: {bus_lines:#?}"
    );
    assert!(bus_lines[1].contains("is back"), "{bus_lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slave_that_rejects_bridged_gaps_gets_gapless_reads() {
    // Registers 2..5 are unmapped: reading across them is refused, as many
    // meters do. The planner bridges the gap; the poller must learn.
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.set_registers(Area::Holding, 0, &[10, 11]);
        u.set_registers(Area::Holding, 6, &[16]);
        u.exceptions
            .push((Area::Holding, 2..=5, ExceptionCode::IllegalDataAddress));
    });
    let devices = device(
        "m",
        1,
        "200ms",
        "",
        &[
            ("a", "area = \"holding\"\naddress = 0\ntype = \"u32\""),
            ("c", "area = \"holding\"\naddress = 6\ntype = \"u16\""),
        ],
    );
    let rig = Rig::start(&slaves, "", &devices).await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "3 reports", |s| {
            payloads(s, "attributes").len() >= 3
        })
        .await;
    assert_eq!(
        payloads(&seen, "attributes")[0],
        json!({"a": 655371, "c": 16})
    );
    // The bridged read and its retry (SPEC §4 retries exceptions too), then
    // the two gapless reads.
    let spans: Vec<_> = slaves
        .received()
        .iter()
        .take(4)
        .map(|r| r.request.span())
        .collect();
    assert_eq!(
        spans,
        [
            (Area::Holding, 0, 7),
            (Area::Holding, 0, 7),
            (Area::Holding, 0, 2),
            (Area::Holding, 6, 1)
        ]
    );
    assert_eq!(rig.gw.log_lines("gapless").len(), 1, "{}", rig.gw.log());
    assert!(
        rig.gw.log_lines("not responding").is_empty(),
        "an exception is an answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_timeout_overrides_the_bus_timeout() {
    // Both slaves answer after 450 ms; the bus allows 300 ms, one device 1 s.
    let slaves = Slaves::new();
    for unit in [1, 2] {
        slaves.unit(unit, |u| {
            u.set_registers(Area::Holding, 0, &[u16::from(unit)]);
            u.delay = Duration::from_millis(450);
        });
    }
    let mut devices = device(
        "patient",
        1,
        "1s",
        "timeout = \"1s\"",
        &[("a", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    devices += &device(
        "hasty",
        2,
        "1s",
        "key = \"h\"",
        &[("b", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let rig = Rig::start(&slaves, "retries = 0", &devices).await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(15), "3 reports", |s| {
            payloads(s, "attributes").len() >= 3
        })
        .await;
    assert!(payloads(&seen, "attributes")
        .iter()
        .all(|p| *p == json!({"a": 1})));
    assert!(payloads(&seen, "gateway/attributes").is_empty());
    assert_eq!(
        rig.gw.log_lines("device hasty").len(),
        1,
        "{}",
        rig.gw.log()
    );
}
