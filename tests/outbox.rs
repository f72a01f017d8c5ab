//! Store and forward (SPEC §7): a slave register counts its reads, so each
//! poll reports the next integer, and the platform side can tell exactly
//! whether anything was lost, duplicated or reordered across outages,
//! crashes and a full outbox.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fieldgate::config::Area;

const COUNTER: &str = "area = \"holding\"\naddress = 0\ntype = \"u16\"";

struct Setup {
    slaves: Slaves,
    _pty: Pty,
    relay: Relay,
    platform: Subscriber,
    gw: Gateway,
}

/// Counter slaves (units 1..=`units`), the gateway behind a relay that can
/// cut the broker off, and a subscriber on the broker itself.
async fn setup(units: u8, platform_extra: &str, devices: &str) -> Setup {
    let slaves = Slaves::new();
    for unit in 1..=units {
        slaves.unit(unit, |u| u.read_counters.push((Area::Holding, 0)));
    }
    let pty = slaves.serve().unwrap();
    let broker_port = broker();
    let relay = Relay::start(broker_port).await;
    let platform = Subscriber::connect(broker_port).await;
    let config = header(relay.port, &pty.path, "")
        .replace("max_publish_rate = 0\n", platform_extra)
        + devices;
    let gw = Gateway::start(&config);
    Setup {
        slaves,
        _pty: pty,
        relay,
        platform,
        gw,
    }
}

fn counter_device(poll: &str) -> String {
    device("counter", 1, poll, "", &[("n", COUNTER)])
}

/// The counter value the slave served most recently.
fn served(slaves: &Slaves, unit: u8) -> u64 {
    slaves.unit(unit, |u| u.holding.get(&0).copied().unwrap_or(0).into())
}

async fn wait_for_value(
    s: &Setup,
    topic: &str,
    key: Option<&str>,
    value: u64,
    limit: Duration,
) -> Vec<u64> {
    let seen = s
        .platform
        .wait_until(limit, &format!("counter {value}"), |seen| {
            counter_values(seen, topic, key, "n").contains(&value)
        })
        .await;
    counter_values(&seen, topic, key, "n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_second_outage_loses_nothing() {
    let s = setup(1, "max_publish_rate = 0\n", &counter_device("1s")).await;
    wait_for_value(&s, "attributes", None, 3, Duration::from_secs(10)).await;
    s.relay.down();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let last = served(&s.slaves, 1);
    assert!(last >= 60, "polling went on during the outage: {last}");
    s.relay.up().await;
    let values = wait_for_value(&s, "attributes", None, last, Duration::from_secs(30)).await;
    assert_complete_in_order(&values, 1, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_broker_restarts_at_odd_moments_lose_nothing() {
    let s = setup(1, "max_publish_rate = 0\n", &counter_device("300ms")).await;
    wait_for_value(&s, "attributes", None, 3, Duration::from_secs(10)).await;
    // A fixed irregular pattern (ms): up for a while, down for a while.
    for (up, down) in [
        (1100, 1300),
        (2300, 400),
        (600, 2100),
        (1700, 700),
        (900, 3200),
    ] {
        tokio::time::sleep(Duration::from_millis(up)).await;
        s.relay.down();
        tokio::time::sleep(Duration::from_millis(down)).await;
        s.relay.up().await;
    }
    let last = served(&s.slaves, 1);
    let values = wait_for_value(&s, "attributes", None, last, Duration::from_secs(60)).await;
    assert_complete_in_order(&values, 1, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_outage_keeps_what_was_flushed() {
    let mut s = setup(1, "max_publish_rate = 0\n", &counter_device("200ms")).await;
    wait_for_value(&s, "attributes", None, 3, Duration::from_secs(10)).await;
    s.relay.down();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let killed = Instant::now();
    s.gw.kill9();
    // Every value read more than 1 s before the kill must survive it.
    let reads: Vec<Instant> = s
        .slaves
        .received()
        .iter()
        .filter(|r| r.unit == 1)
        .map(|r| r.at)
        .collect();
    let durable = reads
        .iter()
        .filter(|at| **at + Duration::from_secs(1) < killed)
        .count() as u64;
    assert!(durable >= 20, "{durable}");
    s.gw.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.relay.up().await;
    let values = wait_for_value(&s, "attributes", None, durable, Duration::from_secs(30)).await;
    assert_complete_in_order(
        &values[..values.iter().position(|v| *v == durable).unwrap() + 1],
        1,
        durable,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_the_oldest_counts_and_keeps_the_newest() {
    let platform = "max_publish_rate = 0\n\n[buffer]\nmax_bytes = \"4KiB\"\n";
    let s = setup(1, platform, &counter_device("100ms")).await;
    wait_for_value(&s, "attributes", None, 3, Duration::from_secs(10)).await;
    s.relay.down();
    let before = served(&s.slaves, 1);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let status = s.gw.command(&["buffer"]);
    let dropped: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("dropped so far: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped count in {status}"));
    assert!(dropped > 20, "{status}");
    assert!(status.contains("in use by the running daemon"), "{status}");
    let log = s.gw.log_lines("outbox full");
    assert!(
        !log.is_empty() && log.len() <= 2,
        "logged, not per message: {log:#?}"
    );
    assert!(log[0].contains("oldest kept taken at"), "{log:?}");

    s.relay.up().await;
    // The gateway notices at its next reconnect attempt (backoff); until
    // then it keeps polling into the full outbox.
    let reconnect = Instant::now();
    while s.gw.log_lines("connected to the broker").len() < 2 {
        assert!(
            reconnect.elapsed() < Duration::from_secs(70),
            "no reconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let upto = served(&s.slaves, 1) + 10;
    let values = wait_for_value(&s, "attributes", None, upto, Duration::from_secs(40)).await;
    let after: Vec<u64> = values.iter().copied().filter(|v| *v > before).collect();
    // The newest survive as an unbroken run up to the live values…
    let kept = *after.iter().min().unwrap();
    assert_complete_in_order(&after, kept, upto);
    // …and the oldest of the outage were dropped.
    assert!(
        kept > before + 10,
        "kept from {kept}, outage began after {before}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_respects_max_publish_rate() {
    let s = setup(1, "max_publish_rate = 4\n", &counter_device("100ms")).await;
    wait_for_value(&s, "attributes", None, 1, Duration::from_secs(10)).await;
    s.relay.down();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outage_end = Instant::now();
    s.relay.up().await;
    // Measure from the first replayed message (the reconnect waits for the
    // gateway's backoff) for 5 s.
    let first = s
        .platform
        .wait_until(Duration::from_secs(20), "the replay", |seen| {
            seen.iter().any(|m| m.at > outage_end)
        })
        .await
        .into_iter()
        .find(|m| m.at > outage_end)
        .map(|m| m.at)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let arrivals: Vec<Instant> = s
        .platform
        .on("attributes")
        .into_iter()
        .map(|m| m.at)
        .filter(|at| *at >= first && *at < first + Duration::from_secs(5))
        .collect();
    assert!(
        arrivals.len() >= 18,
        "replay ran at the cap: {}",
        arrivals.len()
    );
    // No more than 4 in any 1-second window (+1 for a window's edges).
    for (i, t) in arrivals.iter().enumerate() {
        let in_window = arrivals[i..]
            .iter()
            .filter(|a| **a < *t + Duration::from_secs(1))
            .count();
        assert!(
            in_window <= 5,
            "{in_window} messages within 1 s of arrival {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sub_devices_at_one_message_per_second_stay_live_combined() {
    let devices: String = (1..=3)
        .map(|u| {
            device(
                &format!("sub{u}"),
                u,
                "1s",
                &format!("key = \"k{u}\""),
                &[("n", COUNTER)],
            )
        })
        .collect();
    let s = setup(3, "max_publish_rate = 1\n", &devices).await;
    // 12 s for at least 8 messages: start-up and a loaded machine take a few.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let seen = s.platform.on("gateway/attributes");
    let combined = seen
        .iter()
        .filter(|m| m.payload.as_object().is_some_and(|o| o.len() == 3))
        .count();
    assert!(
        combined >= 6,
        "messages carry all three sub-devices: {seen:#?}"
    );
    for key in ["k1", "k2", "k3"] {
        let values = counter_values(&seen, "gateway/attributes", Some(key), "n");
        assert!(
            values.len() >= 8,
            "{key} keeps arriving every second: {values:?}"
        );
        assert_complete_in_order(&values, 1, *values.iter().max().unwrap());
    }
    // One message per second at most, as configured.
    let seconds = seen.last().unwrap().at - seen.first().unwrap().at;
    assert!(
        seen.len() as f64 <= seconds.as_secs_f64() + 2.0,
        "{} messages in {seconds:?}",
        seen.len()
    );
}

/// An unwritable data dir stops `run` at once with an error that names the
/// outbox path and what to do; nothing is created or wiped. As root the dir
/// is a read-only tmpfs (root ignores permission bits); otherwise mode 0555.
#[test]
fn an_unwritable_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mount = Tmpfs::mount(&data, "ro,size=1M");
    if mount.is_none() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let config = dir.path().join("fieldgate.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n[platform]\nprofile = \"generic\"\nhost = \"127.0.0.1\"\nport = {}\n",
            data.display(),
            fieldgate::broker::free_port().unwrap()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fieldgate"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot open the outbox at {}",
            data.join("outbox").display()
        )),
        "{stderr}"
    );
    let hint = if mount.is_some() {
        "Check that the disk is mounted, writable and not full."
    } else {
        "Check that the service user owns the directory"
    };
    assert!(stderr.contains(hint), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!data.join("outbox").exists());
}
