//! The device model of SPEC §3 through the real binary and broker: labels
//! reported and written, and alarms with hysteresis and a minimum duration
//! (a short spike raises nothing), evaluated on every poll even when the
//! reading is not reported.

mod common;

use std::time::Duration;

use common::*;
use fieldgate::config::Area;
use serde_json::json;

fn set(slaves: &Slaves, address: u16, value: u16) {
    slaves.unit(1, |u| u.set_registers(Area::Holding, address, &[value]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_are_reported_and_written_by_name() {
    let slaves = Slaves::new();
    set(&slaves, 0, 1);
    let rig = Rig::start(
        &slaves,
        "",
        &device(
            "pump",
            1,
            "100ms",
            "",
            &[(
                "state",
                "area = \"holding\"\naddress = 0\ntype = \"u16\"\nwritable = true\nlabels = { 0 = \"stopped\", 1 = \"running\", 2 = \"fault\" }",
            )],
        ),
    )
    .await;
    rig.platform
        .wait_until(Duration::from_secs(10), "running", |s| {
            payloads(s, "attributes").contains(&json!({"state": "running"}))
        })
        .await;
    // An unlisted number is reported as the number.
    set(&slaves, 0, 7);
    rig.platform
        .wait_until(Duration::from_secs(5), "7", |s| {
            payloads(s, "attributes").contains(&json!({"state": 7}))
        })
        .await;
    // Writes take the label or the number.
    rig.platform
        .publish("attributes/push", json!({"state": "fault"}).to_string())
        .await;
    rig.platform
        .wait_until(Duration::from_secs(5), "fault written", |s| {
            payloads(s, "attributes").contains(&json!({"state": "fault"}))
        })
        .await;
    assert_eq!(slaves.unit(1, |u| u.holding.get(&0).copied()), Some(2));
    rig.platform
        .publish("attributes/push", json!({"state": 0}).to_string())
        .await;
    rig.platform
        .wait_until(Duration::from_secs(5), "stopped", |s| {
            payloads(s, "attributes").contains(&json!({"state": "stopped"}))
        })
        .await;
    // An unknown label is refused; nothing is written.
    rig.platform
        .publish("attributes/push", json!({"state": "flying"}).to_string())
        .await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(5), "write_rejected", |s| {
            !events(s, "write_rejected").is_empty()
        })
        .await;
    let reason = events(&seen, "write_rejected")[0].to_string();
    assert!(reason.contains("not one of its labels"), "{reason}");
    assert_eq!(slaves.unit(1, |u| u.holding.get(&0).copied()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_need_their_duration_and_clear_by_the_hysteresis() {
    let slaves = Slaves::new();
    set(&slaves, 0, 2300);
    slaves.unit(1, |u| u.set_bit(Area::Coil, 0, false));
    // report = "change" with a long heartbeat: alarms do not wait for a
    // report.
    let rig = Rig::start(
        &slaves,
        "",
        &device(
            "meter",
            1,
            "100ms",
            "key = \"m-1\"\nreport = \"change\"\nheartbeat = \"1h\"",
            &[
                (
                    "voltage",
                    "area = \"holding\"\naddress = 0\ntype = \"u16\"\nscale = 0.1\ndeadband = 1000\nalarm = { above = 250.0, below = 190.0, hysteresis = 2.0, after = \"1s\" }",
                ),
                ("fault", "area = \"coil\"\naddress = 0\ntype = \"bool\"\nalarm = { when = true }"),
            ],
        ),
    )
    .await;
    rig.wait_for("gateway/attributes", 1, Duration::from_secs(10))
        .await;

    // A 400 ms spike over the limit raises nothing.
    set(&slaves, 0, 2600);
    tokio::time::sleep(Duration::from_millis(400)).await;
    set(&slaves, 0, 2300);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        events(&rig.platform.all(), "alarm_raised").is_empty(),
        "a short spike raised an alarm"
    );

    // Over the limit for longer than `after`: raised once.
    set(&slaves, 0, 2600);
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(5), "alarm_raised", |s| {
            !events(s, "alarm_raised").is_empty()
        })
        .await;
    assert_eq!(
        events(&seen, "alarm_raised")[0],
        json!({"point": "voltage", "value": 260.0, "limit": 250.0, "device": "meter", "key": "m-1"})
    );
    // Back under the limit, but not by the hysteresis: still raised.
    set(&slaves, 0, 2490);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let all = rig.platform.all();
    assert!(events(&all, "alarm_cleared").is_empty());
    assert_eq!(events(&all, "alarm_raised").len(), 1, "raised once");
    set(&slaves, 0, 2470);
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(5), "alarm_cleared", |s| {
            !events(s, "alarm_cleared").is_empty()
        })
        .await;
    assert_eq!(events(&seen, "alarm_cleared")[0]["value"], 247.0);
    // No report was due for any of it (deadband 1000, heartbeat 1 h).
    assert_eq!(payloads(&seen, "gateway/attributes").len(), 1);

    // A fault bit raises at once with `when = true` and clears when it drops.
    slaves.unit(1, |u| u.set_bit(Area::Coil, 0, true));
    rig.platform
        .wait_until(Duration::from_secs(5), "fault raised", |s| {
            events(s, "alarm_raised")
                .iter()
                .any(|p| p["point"] == "fault" && p["value"] == true)
        })
        .await;
    slaves.unit(1, |u| u.set_bit(Area::Coil, 0, false));
    rig.platform
        .wait_until(Duration::from_secs(5), "fault cleared", |s| {
            events(s, "alarm_cleared")
                .iter()
                .any(|p| p["point"] == "fault")
        })
        .await;
}

/// A meter with `fast` at holding 0 (every 200 ms) and `slow` at holding
/// `slow_at` (every second).
async fn fast_and_slow(slaves: &Slaves, slow_at: u16) -> Rig {
    let slow = format!("area = \"holding\"\naddress = {slow_at}\ntype = \"u16\"\npoll = \"1s\"");
    let rig = Rig::start(
        slaves,
        "",
        &device(
            "meter",
            1,
            "200ms",
            "",
            &[
                ("fast", "area = \"holding\"\naddress = 0\ntype = \"u16\""),
                ("slow", &slow),
            ],
        ),
    )
    .await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    rig
}

/// The requests the slaves receive in the next 3 s.
async fn spans_in_3s(slaves: &Slaves) -> Vec<(Area, u16, u16)> {
    let start = slaves.received().len();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    slaves.received()[start..]
        .iter()
        .map(|r| r.request.span())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_with_its_own_poll_is_read_at_its_own_interval() {
    let slaves = Slaves::new();
    set(&slaves, 0, 11);
    set(&slaves, 100, 22);
    let rig = fast_and_slow(&slaves, 100).await;
    let reads: Vec<u16> = spans_in_3s(&slaves).await.iter().map(|s| s.1).collect();
    let (fast, slow) = (
        reads.iter().filter(|a| **a == 0).count(),
        reads.iter().filter(|a| **a == 100).count(),
    );
    // On the wire: each point's own block, at its own rate (never bridged
    // across the 99 registers between them).
    assert!((12..=17).contains(&fast), "fast read {fast} times in 3 s");
    assert!((2..=4).contains(&slow), "slow read {slow} times in 3 s");
    assert_eq!(reads.len(), fast + slow);
    // A report carries what that poll read.
    let seen = rig.platform.all();
    let reports = payloads(&seen, "attributes");
    assert!(reports.contains(&json!({"fast": 11})), "{reports:?}");
    assert!(
        reports.contains(&json!({"fast": 11, "slow": 22})),
        "{reports:?}"
    );
    let with_slow = reports.iter().filter(|r| r.get("slow").is_some()).count();
    assert!(
        with_slow * 3 < reports.len(),
        "{with_slow} of {} reports carry slow",
        reports.len()
    );
    // `check` shows each interval's requests and bus time.
    let out = rig.gw.command(&["check"]);
    assert!(
        out.contains("2 points in 2 requests at 2 intervals"),
        "{out}"
    );
    assert!(out.contains("every 1.00 s: 1 point in 1 request"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_due_together_share_a_request() {
    let slaves = Slaves::new();
    set(&slaves, 0, 11);
    set(&slaves, 1, 22);
    let rig = fast_and_slow(&slaves, 1).await;
    let spans = spans_in_3s(&slaves).await;
    // When both are due, one read covers both registers; otherwise the
    // fast point is read alone. The slow register is never read by itself.
    let together = spans
        .iter()
        .filter(|s| **s == (Area::Holding, 0, 2))
        .count();
    let alone = spans
        .iter()
        .filter(|s| **s == (Area::Holding, 0, 1))
        .count();
    assert!((2..=4).contains(&together), "{spans:?}");
    assert!((9..=15).contains(&alone), "{spans:?}");
    assert_eq!(together + alone, spans.len(), "{spans:?}");
    let reports = payloads(&rig.platform.all(), "attributes");
    assert!(
        reports.contains(&json!({"fast": 11, "slow": 22})),
        "{reports:?}"
    );
}

/// A slave that refuses the joined read (the slow register raises an
/// exception) gets each block on its own from then on: the fast point is
/// not lost whenever the slow one is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_joined_read_falls_back_to_separate_requests() {
    let slaves = Slaves::new();
    set(&slaves, 0, 11);
    slaves.unit(1, |u| {
        u.exceptions.push((
            Area::Holding,
            1..=1,
            tokio_modbus::ExceptionCode::IllegalDataAddress,
        ))
    });
    let rig = fast_and_slow(&slaves, 1).await;
    let spans = spans_in_3s(&slaves).await;
    assert!(!spans.contains(&(Area::Holding, 0, 2)), "{spans:?}");
    assert!(spans.contains(&(Area::Holding, 1, 1)), "{spans:?}");
    let fast = spans
        .iter()
        .filter(|s| **s == (Area::Holding, 0, 1))
        .count();
    assert!((12..=17).contains(&fast), "{spans:?}");
    assert!(
        !rig.gw.log_lines("reading each block on its own").is_empty(),
        "{}",
        rig.gw.log()
    );
}
