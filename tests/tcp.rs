//! TCP reach (SPEC §4 "TCP transports", §9) through the real binary and a
//! real broker: Modbus TCP and RTU over TCP to servers on loopback
//! (tokio-modbus's servers via the simulator, and hand-written peers for
//! the faults: a late reply, a bogus transaction id), a server that stops
//! and comes back, a connection refused at start, and dial-in DTUs told
//! apart by registration, with heartbeats, reconnecting. The pymodbus side
//! of the same is in tests/interop.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use fieldgate::config::Area;
use fieldgate::sim::TcpFraming;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `[gateway]`, `[platform]` and one TCP `[[bus]]` named "line".
fn tcp_header(broker: u16, bus: &str) -> String {
    format!(
        r#"
[gateway]
id = "test-gw"
data_dir = "{{data_dir}}"

[platform]
host = "127.0.0.1"
port = {broker}
access_token = "token"
project_key = "key"
max_publish_rate = 0

[api]
listen = ""

[[bus]]
name = "line"
{bus}
"#
    )
}

fn counter(name: &str, address: u16) -> (String, String) {
    (
        name.to_string(),
        format!("area = \"holding\"\naddress = {address}\ntype = \"u16\""),
    )
}

fn dev(name: &str, unit: u8, poll: &str, extra: &str, points: &[(String, String)]) -> String {
    let points: Vec<(&str, &str)> = points
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    device(name, unit, poll, extra, &points)
}

fn values(seen: &[Seen], field: &str) -> Vec<u64> {
    counter_values(seen, "attributes", None, field)
}

async fn wait_log(gw: &Gateway, needle: &str, limit: Duration) {
    let start = std::time::Instant::now();
    while gw.log_lines(needle).is_empty() {
        assert!(
            start.elapsed() < limit,
            "no {needle:?} in the log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_tcp_values_writes_and_a_raw_frame() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.set_registers(Area::Holding, 0, &[0x1234, 0x5678]);
        u.set_registers(Area::Holding, 5, &[0]);
    });
    let server = slaves
        .serve_tcp(TcpFraming::Mbap, "127.0.0.1:0")
        .await
        .unwrap();
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let points = [
        counter("a", 0),
        counter("b", 1),
        (
            "sp".into(),
            "area = \"holding\"\naddress = 5\ntype = \"u16\"\nwritable = true".into(),
        ),
    ];
    let config = tcp_header(
        port,
        &format!("transport = \"tcp\"\naddress = \"{}\"", server.addr),
    ) + &dev("plc", 1, "300ms", "", &points)
        + "\n[[stream]]\nname = \"raw\"\nbus = \"line\"\nencoding = \"hex\"\n";
    let _gw = Gateway::start(&config);
    let seen = platform
        .wait_until(Duration::from_secs(10), "a report", |s| {
            !payloads(s, "attributes").is_empty()
        })
        .await;
    assert_eq!(
        payloads(&seen, "attributes")[0],
        json!({"a": 4660, "b": 22136, "sp": 0})
    );
    platform
        .publish("attributes/push", json!({"sp": 42}).to_string())
        .await;
    let start = std::time::Instant::now();
    while slaves.unit(1, |u| u.holding.get(&5).copied()) != Some(42) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the write never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A raw frame is RTU-style on every bus: sent with an MBAP header,
    // answered in RTU form with its CRC (computed by Python: 0x0781).
    platform
        .publish("data/raw/set", "01 03 00 00 00 02 C4 0B")
        .await;
    let seen = platform
        .wait_until(Duration::from_secs(5), "the raw reply", |s| {
            !payloads(s, "data/raw").is_empty()
        })
        .await;
    let reply = seen.iter().find(|s| s.topic == "data/raw").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&reply.raw),
        "01 03 04 12 34 56 78 81 07"
    );
}

/// An RTU-over-TCP peer that answers its first request only after the
/// gateway gave up on it, with a value (111) that must never be reported,
/// and every later one at once (222).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_on_rtu_over_tcp_is_not_taken_as_the_next_answer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 256];
        let mut first = true;
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let value: u16 = if first { 111 } else { 222 };
            if first {
                tokio::time::sleep(Duration::from_millis(350)).await;
                first = false;
            }
            let reply = rtu_reply(buf[0], &[0x03, 0x02, (value >> 8) as u8, value as u8]);
            if stream.write_all(&reply).await.is_err() {
                break;
            }
        }
    });
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = tcp_header(
        port,
        &format!(
            "transport = \"rtu_over_tcp\"\naddress = \"{addr}\"\ntimeout = \"200ms\"\nretries = 0"
        ),
    ) + &dev("meter", 1, "300ms", "", &[counter("v", 0)]);
    let _gw = Gateway::start(&config);
    let seen = platform
        .wait_until(Duration::from_secs(10), "5 reports", |s| {
            values(s, "v").len() >= 5
        })
        .await;
    assert!(
        values(&seen, "v").iter().all(|v| *v == 222),
        "{:?}",
        values(&seen, "v")
    );
}

/// RTU frame: unit, PDU, CRC-16/MODBUS low byte first.
fn rtu_reply(unit: u8, pdu: &[u8]) -> Vec<u8> {
    fieldgate::modbus::rtu::adu(unit, pdu)
}

/// A Modbus TCP peer that sends, before every real answer (5), a reply
/// with another transaction id (999): it must be dropped, not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_mbap_transaction_id_is_discarded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 260];
        while let Ok(n) = stream.read(&mut buf).await {
            if n < 12 {
                break;
            }
            let tid = u16::from_be_bytes([buf[0], buf[1]]);
            let unit = buf[6];
            let frame = |tid: u16, value: u16| {
                let mut f = tid.to_be_bytes().to_vec();
                f.extend([0, 0, 0, 5, unit, 0x03, 0x02]);
                f.extend(value.to_be_bytes());
                f
            };
            let mut out = frame(tid.wrapping_add(100), 999);
            out.extend(frame(tid, 5));
            if stream.write_all(&out).await.is_err() {
                break;
            }
        }
    });
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = tcp_header(port, &format!("transport = \"tcp\"\naddress = \"{addr}\""))
        + &dev("plc", 1, "200ms", "", &[counter("v", 0)]);
    let _gw = Gateway::start(&config);
    let seen = platform
        .wait_until(Duration::from_secs(10), "5 reports", |s| {
            values(s, "v").len() >= 5
        })
        .await;
    assert!(
        values(&seen, "v").iter().all(|v| *v == 5),
        "{:?}",
        values(&seen, "v")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_for_5_s_is_reached_again_without_a_restart() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.read_counters.push((Area::Holding, 0)));
    let server = slaves
        .serve_tcp(TcpFraming::Mbap, "127.0.0.1:0")
        .await
        .unwrap();
    let addr = server.addr;
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = tcp_header(
        port,
        &format!("transport = \"tcp\"\naddress = \"{addr}\"\ntimeout = \"300ms\"\nretries = 0"),
    ) + &dev("plc", 1, "200ms", "", &[counter("n", 0)]);
    let mut gw = Gateway::start(&config);
    platform
        .wait_until(Duration::from_secs(10), "reports", |s| {
            values(s, "n").len() >= 3
        })
        .await;
    drop(server);
    wait_log(&gw, "not responding", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = values(&platform.all(), "n").len();
    let _server = slaves
        .serve_tcp(TcpFraming::Mbap, &addr.to_string())
        .await
        .unwrap();
    platform
        .wait_until(Duration::from_secs(40), "reports again", |s| {
            values(s, "n").len() >= before + 3
        })
        .await;
    assert!(gw.running(), "the daemon kept running");
    let seen = platform.all();
    let methods: Vec<String> = seen
        .iter()
        .filter(|s| s.topic.starts_with("event/report/"))
        .map(|s| s.payload["method"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(methods, ["device_offline", "device_online"]);
    // Logged once per outage, not at every reconnect attempt.
    assert_eq!(gw.log_lines("ERROR bus").len(), 1, "{}", gw.log());
    assert!(!gw.log_lines("is back").is_empty(), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_refused_at_start_is_retried() {
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let free = fieldgate::broker::free_port().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{free}").parse().unwrap();
    let config = tcp_header(
        port,
        &format!("transport = \"rtu_over_tcp\"\naddress = \"{addr}\""),
    ) + &dev("meter", 1, "300ms", "", &[counter("v", 0)]);
    let gw = Gateway::start(&config);
    wait_log(&gw, "cannot connect to", Duration::from_secs(10)).await;
    let slaves = Slaves::new();
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[77]));
    let _server = slaves
        .serve_tcp(TcpFraming::Rtu, &addr.to_string())
        .await
        .unwrap();
    let seen = platform
        .wait_until(Duration::from_secs(20), "a report", |s| {
            !values(s, "v").is_empty()
        })
        .await;
    assert_eq!(values(&seen, "v")[0], 77);
}

/// Two DTUs dial in to one `listen`, each with its registration, sending
/// heartbeats between frames; each bus gets its own DTU's slaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dtus_on_one_listen_are_told_apart_by_registration() {
    let listen = fieldgate::broker::free_port().unwrap();
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = tcp_header(
        port,
        &format!("transport = \"rtu_over_tcp\"\nlisten = \"127.0.0.1:{listen}\"\nregistration = \"DTU-A\"\nheartbeat = \"HB\""),
    ) + &format!(
        "\n[[bus]]\nname = \"line2\"\ntransport = \"rtu_over_tcp\"\nlisten = \"127.0.0.1:{listen}\"\nregistration = \"hex:4454552D42\"\nheartbeat = \"HB\"\n"
    ) + &dev("a", 1, "200ms", "", &[counter("a_v", 0)])
        + &dev("b", 1, "200ms", "", &[counter("b_v", 0)]).replace("bus = \"line\"", "bus = \"line2\"");
    let gw = Gateway::start(&config);
    wait_log(&gw, "listening for DTUs", Duration::from_secs(10)).await;
    let gateway: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let (dtu_a, dtu_b) = (Slaves::new(), Slaves::new());
    dtu_a.unit(1, |u| u.set_registers(Area::Holding, 0, &[1]));
    dtu_b.unit(1, |u| u.set_registers(Area::Holding, 0, &[2]));
    let heartbeat = Some((b"HB".to_vec(), Duration::from_millis(50)));
    let _a = dtu_a
        .dial_in(gateway, Some(b"DTU-A".to_vec()), heartbeat.clone())
        .await
        .unwrap();
    let _b = dtu_b
        .dial_in(gateway, Some(b"DTU-B".to_vec()), heartbeat)
        .await
        .unwrap();
    let seen = platform
        .wait_until(Duration::from_secs(15), "both DTUs' reports", |s| {
            values(s, "a_v").len() >= 10 && values(s, "b_v").len() >= 10
        })
        .await;
    assert!(
        values(&seen, "a_v").iter().all(|v| *v == 1),
        "{:?}",
        values(&seen, "a_v")
    );
    assert!(
        values(&seen, "b_v").iter().all(|v| *v == 2),
        "{:?}",
        values(&seen, "b_v")
    );
    assert!(
        gw.log_lines("no reply").is_empty() && gw.log_lines("not responding").is_empty(),
        "heartbeats never broke a read: {}",
        gw.log()
    );

    // A stranger with another registration is turned away.
    let mut stranger = tokio::net::TcpStream::connect(gateway).await.unwrap();
    stranger.write_all(b"DTU-X").await.unwrap();
    wait_log(
        &gw,
        "instead of a known registration",
        Duration::from_secs(15),
    )
    .await;
}

/// A DTU whose link died without a FIN dials in again: the new connection
/// replaces the old one and readings resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dtu_dialling_in_again_replaces_its_old_connection() {
    let listen = fieldgate::broker::free_port().unwrap();
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = tcp_header(
        port,
        &format!("transport = \"rtu_over_tcp\"\nlisten = \"127.0.0.1:{listen}\"\nregistration = \"SITE-3\"\ntimeout = \"200ms\"\nretries = 0"),
    ) + &dev("m", 1, "200ms", "", &[counter("v", 0)]);
    let gw = Gateway::start(&config);
    wait_log(&gw, "listening for DTUs", Duration::from_secs(10)).await;
    let gateway: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    // The old connection: registered, then never answers (a dead 4G link).
    let mut old = tokio::net::TcpStream::connect(gateway).await.unwrap();
    old.write_all(b"SITE-3").await.unwrap();
    wait_log(&gw, "DTU connected from", Duration::from_secs(10)).await;
    // The bus takes it and its requests go unanswered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dtu = Slaves::new();
    dtu.unit(1, |u| u.set_registers(Area::Holding, 0, &[9]));
    let _dtu = dtu
        .dial_in(gateway, Some(b"SITE-3".to_vec()), None)
        .await
        .unwrap();
    let seen = platform
        .wait_until(
            Duration::from_secs(15),
            "reports over the new connection",
            |s| values(s, "v").len() >= 3,
        )
        .await;
    assert!(values(&seen, "v").iter().all(|v| *v == 9));
    wait_log(&gw, "replaces the old", Duration::from_secs(1)).await;
    drop(old);
}
