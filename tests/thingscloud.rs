//! ThingsCloud fidelity through the real binary and a real broker: the
//! gateway's own devices combined under the rate cap, sub-device presence,
//! both push shapes, acknowledgements, and the platform budget in `check`
//! and at run time (SPEC §4, §5).

mod common;

use std::time::Duration;

use common::*;
use fieldgate::config::Area;
use serde_json::json;

/// A counter point: register 0 counts the reads, so every sample is told
/// apart.
fn counting(slaves: &Slaves, unit: u8) {
    slaves.unit(unit, |u| u.read_counters.push((Area::Input, 0)));
}

fn counter_point(name: &str) -> (&str, &'static str) {
    (name, "area = \"input\"\naddress = 0\ntype = \"u16\"")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_devices_on_two_buses_share_one_message_under_the_cap() {
    let (a, b) = (Slaves::new(), Slaves::new());
    counting(&a, 1);
    counting(&b, 2);
    let (pty_a, pty_b) = (a.serve().expect("pty"), b.serve().expect("pty"));
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = header(port, &pty_a.path, "")
        .replace("max_publish_rate = 0", "max_publish_rate = 1")
        + &format!(
            "\n[[bus]]\nname = \"line2\"\nport = \"{}\"\nbaud = 115200\ntimeout = \"300ms\"\n",
            pty_b.path.display()
        )
        + &device("meter", 1, "1s", "", &[counter_point("meter_reads")])
        + &device("pump", 2, "1s", "", &[counter_point("pump_reads")])
            .replace("bus = \"line\"", "bus = \"line2\"");
    let _gw = Gateway::start(&config);
    let seen = platform
        .wait_until(Duration::from_secs(30), "15 s of reports", |s| {
            payloads(s, "attributes").len() >= 15
        })
        .await;
    let reports: Vec<&Seen> = seen.iter().filter(|s| s.topic == "attributes").collect();
    // ≤ 2 messages in any second (the cap is 1/s).
    for (i, first) in reports.iter().enumerate() {
        let within = reports[i..]
            .iter()
            .take_while(|s| s.at.duration_since(first.at) < Duration::from_secs(1))
            .count();
        assert!(within <= 2, "{within} messages within 1 s of #{i}");
    }
    // Both devices keep reporting, each at least every 2 s once started.
    for field in ["meter_reads", "pump_reads"] {
        let times: Vec<_> = reports
            .iter()
            .filter(|s| s.payload.get(field).is_some())
            .map(|s| s.at)
            .collect();
        assert!(times.len() >= 10, "{field}: {} reports", times.len());
        for gap in times.windows(2).skip(1) {
            let gap = gap[1].duration_since(gap[0]);
            assert!(
                gap <= Duration::from_millis(2100),
                "{field}: a gap of {gap:?}"
            );
        }
        // No sample was merged into another: every read arrived, in order.
        let values = counter_values(&seen, "attributes", None, field);
        let (first, last) = (values[0], *values.last().unwrap());
        assert_complete_in_order(&values, first, last);
    }
    // The combining is what keeps up: most messages carry both devices.
    let both = reports
        .iter()
        .filter(|s| s.payload.get("meter_reads").is_some() && s.payload.get("pump_reads").is_some())
        .count();
    assert!(
        both * 2 >= reports.len(),
        "{both} of {} combined",
        reports.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_device_presence_follows_the_slave_and_the_connection() {
    let slaves = Slaves::new();
    counting(&slaves, 1);
    let pty = slaves.serve().expect("pty");
    let port = broker();
    let relay = Relay::start(port).await;
    let platform = Subscriber::connect(port).await;
    let config = header(relay.port, &pty.path, "timeout = \"100ms\"\nretries = 0")
        + &device(
            "sensor",
            1,
            "300ms",
            "key = \"s-1\"",
            &[counter_point("reads")],
        );
    let gw = Gateway::start(&config);
    let connects = |s: &[Seen]| payloads(s, "gateway/connect");
    let seen = platform
        .wait_until(Duration::from_secs(10), "gateway/connect", |s| {
            !connects(s).is_empty()
        })
        .await;
    // At least once: a reconnect while it was in flight sends it again.
    assert!(connects(&seen)
        .iter()
        .all(|c| *c == json!({"device": "s-1"})));
    let first_report = seen.iter().position(|s| s.topic == "gateway/attributes");
    let connect = seen.iter().position(|s| s.topic == "gateway/connect");
    assert!(
        connect < first_report || first_report.is_none(),
        "connect comes before the first report"
    );

    slaves.unit(1, |u| u.silent = true);
    let seen = platform
        .wait_until(Duration::from_secs(10), "gateway/disconnect", |s| {
            !payloads(s, "gateway/disconnect").is_empty()
        })
        .await;
    assert_eq!(
        payloads(&seen, "gateway/disconnect"),
        [json!({"device": "s-1"})]
    );
    let before = connects(&seen).len();
    slaves.unit(1, |u| u.silent = false);
    let seen = platform
        .wait_until(
            Duration::from_secs(10),
            "a gateway/connect when it is back",
            |s| connects(s).len() > before,
        )
        .await;
    let before = connects(&seen).len();

    // The connection drops while the device stays online: after the
    // reconnect the gateway announces it again.
    relay.down();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.up().await;
    let seen = platform
        .wait_until(
            Duration::from_secs(20),
            "gateway/connect after the reconnect",
            |s| connects(s).len() > before,
        )
        .await;
    assert_eq!(
        payloads(&seen, "gateway/disconnect").len(),
        1,
        "the device never went offline again"
    );
    assert!(
        gw.log_lines("connected to the broker").len() >= 2,
        "{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_push_shapes_write_a_sub_device() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.set_registers(Area::Holding, 1, &[0]));
    let setpoint = "area = \"holding\"\naddress = 1\ntype = \"u16\"\nwritable = true\nmax = 100";
    let rig = Rig::start(
        &slaves,
        "",
        &device("valve", 1, "500ms", "key = \"v-1\"", &[("sp", setpoint)]),
    )
    .await;
    rig.wait_for("gateway/attributes", 1, Duration::from_secs(10))
        .await;
    let holding = |slaves: &Slaves| slaves.unit(1, |u| u.holding.get(&1).copied());
    for (payload, value) in [
        (json!({"v-1": {"sp": 5}}), 5),
        (json!({"device": "v-1", "attributes": {"sp": 7}}), 7),
    ] {
        rig.platform
            .publish("gateway/attributes/push", payload.to_string())
            .await;
        let start = std::time::Instant::now();
        while holding(&slaves) != Some(value) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{payload} was not written"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The second shape is validated like the first: nothing is written.
    rig.platform
        .publish(
            "gateway/attributes/push",
            json!({"device": "v-1", "attributes": {"sp": 1000}}).to_string(),
        )
        .await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(5), "the rejection", |s| {
            s.iter().any(|m| {
                m.topic.starts_with("event/report/") && m.payload["method"] == "write_rejected"
            })
        })
        .await;
    let rejection = seen
        .iter()
        .find(|m| m.topic.starts_with("event/report/"))
        .expect("an event");
    assert!(
        rejection.payload.to_string().contains("sp"),
        "{}",
        rejection.payload
    );
    assert_eq!(holding(&slaves), Some(7));
    assert_eq!(
        slaves
            .received()
            .iter()
            .filter(|r| r.request.function_code().value() == 6)
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_is_logged_once_per_change() {
    let slaves = Slaves::new();
    counting(&slaves, 1);
    let rig = Rig::start(
        &slaves,
        "",
        &device("meter", 1, "500ms", "", &[counter_point("n")]),
    )
    .await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    let refusal = json!({"result": 0, "errcode": 413, "message": "payload too large"}).to_string();
    for _ in 0..3 {
        rig.platform
            .publish("attributes/response", refusal.clone())
            .await;
    }
    rig.platform
        .publish("attributes/response", json!({"result": 1}).to_string())
        .await;
    let start = std::time::Instant::now();
    while rig.gw.log_lines("takes reports again").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", rig.gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = rig.gw.log_lines("refused a report");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("errcode 413")
            && refused[0].contains("payload too large")
            && refused[0].contains("too large for the platform"),
        "{}",
        refused[0]
    );
    assert!(
        rig.gw.log_lines("write_rejected").is_empty() && rig.gw.log_lines("unknown").is_empty(),
        "an acknowledgement is not a downlink command: {}",
        rig.gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_growing_while_connected_is_warned_about() {
    let slaves = Slaves::new();
    counting(&slaves, 1);
    let port = broker();
    let pty = slaves.serve().expect("pty");
    let _platform = Subscriber::connect(port).await;
    // One sub-device every 200 ms: 5 reports/s, and no two of them can share
    // a message, against a cap of 1/s.
    let config = header(port, &pty.path, "")
        .replace("max_publish_rate = 0", "max_publish_rate = 1")
        + &device("fast", 1, "200ms", "key = \"f-1\"", &[counter_point("n")]);
    let gw = Gateway::start(&config);
    let start = std::time::Instant::now();
    while gw
        .log_lines("grows while the platform is connected")
        .is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "no warning: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let warning = &gw.log_lines("grows while the platform is connected")[0];
    assert!(warning.contains("max_publish_rate"), "{warning}");
    assert!(
        warning.contains("5.00 messages/s"),
        "names the planned rate: {warning}"
    );
    assert_eq!(
        gw.log_lines("over budget").len(),
        1,
        "and the start-up warning: {}",
        gw.log()
    );
}

#[test]
fn check_prints_the_platform_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |poll: &str| {
        let mut config = header(1883, std::path::Path::new("/dev/null"), "")
            .replace("{data_dir}", &dir.path().display().to_string())
            .replace("max_publish_rate = 0", "max_publish_rate = 1");
        for unit in 1..=4u8 {
            config += &device(
                &format!("sub{unit}"),
                unit,
                poll,
                &format!("key = \"k-{unit}\""),
                &[counter_point("n")],
            );
        }
        let path = dir.path().join("fieldgate.toml");
        std::fs::write(&path, config).expect("config");
        let out = std::process::Command::new(bin())
            .arg("--config")
            .arg(&path)
            .arg("check")
            .output()
            .expect("check runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fast = run("100ms");
    assert!(
        fast.contains("platform budget: up to 10.00 messages/s against max_publish_rate = 1/s"),
        "{fast}"
    );
    assert!(
        fast.contains("warning") && fast.contains("over budget"),
        "{fast}"
    );
    let slow = run("10s");
    assert!(
        slow.contains("platform budget: up to 0.10 messages/s"),
        "{slow}"
    );
    assert!(!slow.contains("warning"), "{slow}");
}
