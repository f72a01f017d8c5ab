//! The local API and console (SPEC §10) through real HTTP against the real
//! binary: every endpoint's fields and values against a pty slave whose
//! registers the test sets, access control with nothing written at the
//! slave, the trace against the frames on the wire, hostile clients while
//! reports keep flowing, the CLI through the running daemon, the API port
//! taken at start, and `[platform] stats`. `/metrics` through Python's
//! `prometheus_client` and the console in Chromium are in tests/interop.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use fieldgate::config::Area;
use fieldgate::modbus::rtu;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request; the status and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.expect("connect to the API");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender
        .send_request(
            request
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap(),
        )
        .await
        .expect("response");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, &[], "").await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, Value) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (status, text) = http(addr, "POST", path, &all, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits until the API answers `GET /api/v1/status`.
async fn api_up(addr: SocketAddr, gw: &Gateway) {
    let start = Instant::now();
    loop {
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
        {
            drop(stream);
            let (status, _) = http(addr, "GET", "/api/v1/status", &[], "").await;
            if status == 200 || status == 401 {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the API never came up:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two devices: a meter at unit 1 (voltage 230.2 V, a writable setpoint
/// and relay) and a pump at unit 2.
fn slaves() -> Slaves {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.set_registers(Area::Holding, 0, &[2302, 5]);
        u.set_bit(Area::Coil, 0, false);
    });
    slaves.unit(2, |u| u.set_registers(Area::Holding, 0, &[7]));
    slaves
}

fn devices() -> String {
    device(
        "meter",
        1,
        "300ms",
        "",
        &[
            (
                "voltage",
                "area = \"holding\"\naddress = 0\ntype = \"u16\"\nscale = 0.1\nunit = \"V\"",
            ),
            (
                "setpoint",
                "area = \"holding\"\naddress = 1\ntype = \"u16\"\nwritable = true\nmin = 0\nmax = 100",
            ),
            ("relay", "area = \"coil\"\naddress = 0\ntype = \"bool\"\nwritable = true"),
        ],
    ) + &device(
        "pump",
        2,
        "300ms",
        "key = \"pump-1\"",
        &[("speed", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    )
}

/// A daemon with the API on a free loopback port (`api_extra` adds to
/// `[api]`), polling [`devices`] on `slaves`.
async fn start(slaves: &Slaves, api_extra: &str) -> (Rig, SocketAddr) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let api = format!("[api]\nlisten = \"{addr}\"\n{api_extra}\n");
    let rig = Rig::start_with_api(slaves, "", &devices(), &api).await;
    api_up(addr, &rig.gw).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    (rig, addr)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Write requests (FC05/06/15/16) the slaves received.
fn writes(slaves: &Slaves) -> usize {
    slaves
        .received()
        .iter()
        .filter(|r| r.request.is_write())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_with_the_fields_and_values_of_the_spec() {
    let slaves = slaves();
    let (_rig, addr) = start(&slaves, "").await;

    // The broker may hand a message to the test's subscriber before its
    // PUBACK reaches the daemon, which counts `published` on the ack.
    let start = Instant::now();
    let status = loop {
        let status = get_json(addr, "/api/v1/status").await;
        if status["uplink"]["published"].as_u64() >= Some(1)
            || start.elapsed() > Duration::from_secs(5)
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["gateway"], "test-gw");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_s"].is_u64());
    let uplink = &status["uplink"];
    assert_eq!(uplink["connected"], true);
    assert!(uplink["since_ms"].as_u64().unwrap() <= now_ms());
    assert!(uplink["published"].as_u64().unwrap() >= 1, "{uplink}");
    assert_eq!(uplink["errors"], 0);
    for field in ["messages", "bytes", "max_bytes", "dropped"] {
        assert!(status["outbox"][field].is_u64(), "outbox.{field}: {status}");
    }
    assert_eq!(status["outbox"]["max_bytes"], 64 * 1024 * 1024);
    assert!(status["outbox"].get("oldest_ms").is_some());
    let bus = &status["buses"][0];
    assert_eq!(bus["name"], "line");
    assert_eq!(bus["transport"], "serial");
    assert_eq!(bus["connected"], true);
    assert!(bus["requests"].as_u64().unwrap() >= 2);
    assert_eq!(
        (bus["timeouts"].clone(), bus["errors"].clone()),
        (json!(0), json!(0))
    );
    let busy = bus["busy_ratio"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&busy), "{busy}");
    let devices = status["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let meter = &devices[0];
    assert_eq!(
        (
            &meter["name"],
            &meter["bus"],
            &meter["unit"],
            &meter["key"],
            &meter["online"],
            &meter["failures"]
        ),
        (
            &json!("meter"),
            &json!("line"),
            &json!(1),
            &Value::Null,
            &json!(true),
            &json!(0)
        )
    );
    assert!(now_ms() - meter["last_ok_ms"].as_u64().unwrap() < 5_000);
    assert_eq!(devices[1]["key"], "pump-1");

    let meter = get_json(addr, "/api/v1/devices/meter").await;
    assert_eq!(meter["name"], "meter");
    let voltage = &meter["values"]["voltage"];
    assert_eq!(voltage["value"], 230.2);
    assert_eq!(voltage["raw"], json!([2302]));
    assert_eq!(voltage["unit"], "V");
    assert!(now_ms() - voltage["ts_ms"].as_u64().unwrap() < 5_000);
    assert_eq!(meter["values"]["relay"]["raw"], json!([false]));
    let (status, _) = http(addr, "GET", "/api/v1/devices/nope", &[], "").await;
    assert_eq!(status, 404);

    // Read now: the register the test changed, fresh.
    slaves.unit(1, |u| u.set_registers(Area::Holding, 0, &[2310]));
    let (status, read) = post(addr, "/api/v1/devices/meter/read", &[], json!({})).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["values"]["voltage"]["value"], 231.0);
    assert_eq!(read["values"]["setpoint"]["value"], 5);
    let (_, read) = post(
        addr,
        "/api/v1/devices/meter/read",
        &[],
        json!({"points": ["setpoint"]}),
    )
    .await;
    assert_eq!(
        read["values"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["setpoint"]
    );
    let (status, _) = post(
        addr,
        "/api/v1/devices/meter/read",
        &[],
        json!({"points": ["nope"]}),
    )
    .await;
    assert_eq!(status, 422);

    // Write: validated, written, read back.
    let (status, wrote) = post(
        addr,
        "/api/v1/devices/meter/write",
        &[],
        json!({"setpoint": 42, "relay": true}),
    )
    .await;
    assert_eq!(status, 200, "{wrote}");
    assert_eq!(wrote["values"], json!({"setpoint": 42, "relay": true}));
    assert_eq!(slaves.unit(1, |u| u.holding.get(&1).copied()), Some(42));
    assert_eq!(slaves.unit(1, |u| u.coils.get(&0).copied()), Some(true));

    // Scan: the two units answer, the third is silent.
    let (status, scan) = post(
        addr,
        "/api/v1/buses/line/scan",
        &[],
        json!({"units": "1-3"}),
    )
    .await;
    assert_eq!(status, 200, "{scan}");
    assert_eq!(scan["found"], json!([1, 2]));
    assert_eq!(scan["probes"][0]["answer"], "registers");
    let (status, _) = post(
        addr,
        "/api/v1/buses/line/scan",
        &[],
        json!({"units": "0-400"}),
    )
    .await;
    assert_eq!(status, 422);
    let (status, _) = post(addr, "/api/v1/buses/nope/scan", &[], json!({})).await;
    assert_eq!(status, 404);

    let (status, metrics) = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    let ok = metrics
        .lines()
        .find(|l| {
            l.starts_with("fieldgate_modbus_requests_total{")
                && l.contains("device=\"meter\"")
                && l.contains("outcome=\"ok\"")
        })
        .unwrap_or_else(|| panic!("no ok counter for meter:\n{metrics}"));
    assert!(ok.rsplit(' ').next().unwrap().parse::<u64>().unwrap() > 2);
    for line in [
        "fieldgate_device_online{device=\"meter\"} 1",
        "fieldgate_mqtt_connected 1",
        "# TYPE fieldgate_modbus_request_seconds histogram",
        "# TYPE fieldgate_bus_busy_ratio gauge",
        "fieldgate_outbox_dropped_total 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    for name in [
        "fieldgate_outbox_messages ",
        "fieldgate_outbox_bytes ",
        "fieldgate_mqtt_published_total ",
        "fieldgate_uptime_seconds ",
    ] {
        assert!(metrics.lines().any(|l| l.starts_with(name)), "{name}");
    }

    let (status, page) = http(addr, "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>fieldgate</title>"));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the console loads nothing from elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_and_refused_ones_write_nothing() {
    let slaves = slaves();
    let (_rig, addr) = start(&slaves, "token = \"s3cret-t0ken\"").await;
    let good = [("authorization", "Bearer s3cret-t0ken")];
    let path = "/api/v1/devices/meter/write";
    let (status, body) = post(addr, path, &[], json!({"setpoint": 42})).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = post(
        addr,
        path,
        &[("authorization", "Bearer s3cret-t0keN")],
        json!({"setpoint": 42}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = post(addr, "/api/v1/devices/meter/read", &[], json!({})).await;
    assert_eq!(status, 401, "every POST needs the token");
    for (values, reason) in [
        (json!({"setpoint": 101}), "outside"),
        (json!({"voltage": 1}), "read-only"),
        (json!({"nope": 1}), "unknown attribute"),
        (json!({"setpoint": 42, "relay": "on"}), "relay"),
    ] {
        let (status, body) = post(addr, path, &good, values.clone()).await;
        assert_eq!(status, 422, "{values}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(reason),
            "{values}: {body}"
        );
    }
    // A page on another site cannot post to a gateway on loopback.
    let (status, _) = post(
        addr,
        path,
        &[good[0], ("origin", "http://evil.example")],
        json!({"setpoint": 42}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = http(addr, "POST", path, &[good[0]], &"x".repeat(70 * 1024)).await;
    assert_eq!(status, 413);
    assert_eq!(writes(&slaves), 0, "a refused request wrote to the slave");
    assert_eq!(slaves.unit(1, |u| u.holding.get(&1).copied()), Some(5));
    // On loopback, reading state needs no token.
    get_json(addr, "/api/v1/status").await;

    let (status, body) = post(addr, path, &good, json!({"setpoint": 42})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(writes(&slaves), 1);
    assert_eq!(slaves.unit(1, |u| u.holding.get(&1).copied()), Some(42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_every_path_needs_the_token() {
    let slaves = slaves();
    let pty = slaves.serve().unwrap();
    let port = broker();
    let api = free_port();
    let config = header(port, &pty.path, "").replace(
        API_OFF,
        &format!("[api]\nlisten = \"0.0.0.0:{api}\"\ntoken = \"tok-123\"\n"),
    ) + &devices();
    let gw = Gateway::start(&config);
    let addr: SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
    api_up(addr, &gw).await;
    for path in [
        "/api/v1/status",
        "/metrics",
        "/api/v1/trace",
        "/api/v1/devices/meter",
    ] {
        let (status, _) = http(addr, "GET", path, &[], "").await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, page) = http(addr, "GET", "/", &[], "").await;
    assert_eq!(status, 401);
    assert!(
        page.contains("token"),
        "the page asks for the token: {page}"
    );
    let (status, page) = http(
        addr,
        "GET",
        "/",
        &[("cookie", "a=b; fieldgate_token=tok-123")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert!(page.contains("id=\"devices\""));
    let (status, _) = http(
        addr,
        "GET",
        "/api/v1/status",
        &[("authorization", "Bearer tok-123")],
        "",
    )
    .await;
    assert_eq!(status, 200);
    // The cookie is for the page's GETs; a POST needs the header.
    let (status, _) = post(
        addr,
        "/api/v1/devices/meter/read",
        &[("cookie", "fieldgate_token=tok-123")],
        json!({}),
    )
    .await;
    assert_eq!(status, 401);
}

/// Reads SSE `data:` events from `stream` until `n` have arrived.
async fn sse_events(stream: &mut TcpStream, n: usize, limit: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    let mut text = String::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while got.len() < n {
        let left = limit.saturating_sub(start.elapsed());
        let read = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("only {} trace events in {limit:?}", got.len()))
            .unwrap();
        assert!(read > 0, "the trace closed");
        text.push_str(&String::from_utf8_lossy(&buf[..read]));
        while let Some(end) = text.find('\n') {
            let line: String = text.drain(..=end).collect();
            if let Some(data) = line.trim().strip_prefix("data: ") {
                got.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    got
}

async fn open_trace(addr: SocketAddr, query: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET /api/v1/trace{query} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_events_are_the_frames_on_the_wire() {
    let slaves = slaves();
    let extra = device(
        "ghost",
        9,
        "300ms",
        "",
        &[("g", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let api = format!("[api]\nlisten = \"{addr}\"\n");
    let rig = Rig::start_with_api(&slaves, "", &(devices() + &extra), &api).await;
    api_up(addr, &rig.gw).await;
    let mut stream = open_trace(addr, "?bus=line").await;
    let got = sse_events(&mut stream, 12, Duration::from_secs(10)).await;
    let received = slaves.received();
    for event in &got {
        for field in [
            "ts_ms", "bus", "unit", "fc", "request", "response", "ms", "outcome",
        ] {
            assert!(event.get(field).is_some(), "{field} missing: {event}");
        }
        assert_eq!(event["bus"], "line");
        let unit = event["unit"].as_u64().unwrap() as u8;
        if unit == 9 {
            assert_eq!(event["outcome"], "timeout");
            assert_eq!(event["response"], "");
            continue;
        }
        assert_eq!(event["outcome"], "ok", "{event}");
        // The request is a frame the slave received, byte for byte.
        let frames: Vec<String> = received
            .iter()
            .filter(|r| r.unit == unit)
            .map(|r| fieldgate::text::to_hex(&rtu::adu(unit, &r.request.pdu())))
            .collect();
        assert!(
            frames.contains(&event["request"].as_str().unwrap().to_string()),
            "{event}"
        );
        // And the response carries the registers and coils the slave holds.
        let expected = match (unit, event["fc"].as_u64().unwrap()) {
            (1, 3) => "01 03 04 08 FE 00 05",
            (1, 1) => "01 01 01 00",
            (2, 3) => "02 03 02 00 07",
            other => panic!("unexpected transaction {other:?}: {event}"),
        };
        assert!(
            event["response"].as_str().unwrap().starts_with(expected),
            "{event}"
        );
    }
    assert!(
        got.iter().any(|e| e["unit"] == 9),
        "the silent unit's timeout is traced"
    );
    assert!(got.iter().any(|e| e["unit"] == 1));
    let (status, _) = http(addr, "GET", "/api/v1/trace?bus=nope", &[], "").await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_slow_reports_or_the_daemon() {
    let slaves = slaves();
    let (rig, addr) = start(&slaves, "").await;
    // A body that trickles in is cut off (408) instead of holding a slot.
    let trickle = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("POST /api/v1/devices/meter/write HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 100\r\n\r\n{{\"setpoint\"").as_bytes())
            .await
            .unwrap();
        let mut answer = vec![0u8; 128];
        let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut answer))
            .await
            .expect("the server waited more than 15 s for a body")
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    });
    // A 1 MiB body is refused; so is one sent without a length.
    let mut big = TcpStream::connect(addr).await.unwrap();
    big.write_all(
        format!(
            "POST /api/v1/devices/meter/write HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            1 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let _ = big.write_all(&vec![b' '; 1 << 20]).await;
    let mut answer = vec![0u8; 256];
    let n = big.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    let mut chunked = TcpStream::connect(addr).await.unwrap();
    chunked
        .write_all(format!("POST /api/v1/devices/meter/write HTTP/1.1\r\nhost: {addr}\r\ntransfer-encoding: chunked\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 1 << 16, " ".repeat(1 << 16));
    for _ in 0..16 {
        if chunked.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let n = chunked.read(&mut answer).await.unwrap_or(0);
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"));
    assert_eq!(writes(&slaves), 0);

    // 50 connections that never send a request, and a trace nobody reads.
    let mut idle = Vec::new();
    for _ in 0..50 {
        if let Ok(s) = TcpStream::connect(addr).await {
            idle.push(s);
        }
    }
    let before = payloads(&rig.platform.all(), "gateway/attributes").len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = payloads(&rig.platform.all(), "gateway/attributes").len() - before;
    // The pump reports every 300 ms: about 10 in 3 s.
    assert!(
        during >= 7,
        "only {during} reports in 3 s with 50 idle connections"
    );
    // The server drops the idle ones (request head timeout), then answers.
    let start = Instant::now();
    for mut s in idle {
        let mut b = [0u8; 16];
        let left = Duration::from_secs(15).saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut b)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => panic!("an idle connection stayed open for 15 s"),
        }
    }
    get_json(addr, "/api/v1/status").await;
    let answer = trickle.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(writes(&slaves), 0);
    assert!(rig.gw.log_lines("panicked").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_scan_and_trace_go_through_the_running_daemon() {
    let slaves = slaves();
    let (mut rig, addr) = start(&slaves, "token = \"cli-t0ken\"").await;
    let through_daemon = rig.gw.command(&["read", "meter"]);
    assert!(through_daemon.contains("voltage"), "{through_daemon}");
    assert!(through_daemon.contains("230.2"), "{through_daemon}");
    assert!(through_daemon.contains("08FE"), "{through_daemon}");

    let out = rig.gw.command(&["write", "meter", "setpoint", "42"]);
    assert!(out.contains("wrote setpoint = 42 to meter"), "{out}");
    assert_eq!(slaves.unit(1, |u| u.holding.get(&1).copied()), Some(42));
    assert!(
        !rig.gw.log_lines("(local API)").is_empty(),
        "the daemon did the write"
    );
    let out = rig.gw.command(&["write", "meter", "setpoint", "420"]);
    assert!(out.contains("nothing written"), "{out}");

    let out = rig.gw.command(&["scan", "line", "--units", "1-3"]);
    assert!(out.contains("unit 1: answers"), "{out}");
    assert!(out.contains("unit 2: answers"), "{out}");
    assert!(out.contains("2 of 3 unit ids answered"), "{out}");

    let mut trace = std::process::Command::new(bin())
        .arg("--config")
        .arg(rig.gw.config_path())
        .args(["trace", "line"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let _ = trace.kill();
    let output = trace.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("line  u1  fc03  01 03 00 00") && l.ends_with("ok")),
        "{text}"
    );

    // Without the daemon the same command opens the bus itself, and
    // prints the same.
    rig.gw.kill9();
    let _ = addr;
    let direct = rig.gw.command(&["read", "meter"]);
    assert_eq!(
        direct.replace("setpoint  002A  42", "setpoint  0005  5"),
        through_daemon.replace("setpoint  002A  42", "setpoint  0005  5")
    );
    let out = rig.gw.command(&["trace"]);
    assert!(out.contains("trace needs the running daemon"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_daemon_on_the_api_address_is_not_used() {
    let theirs = slaves();
    let (rig, addr) = start(&theirs, "").await;
    // Our config: the same gateway id and API address, another data_dir
    // and another line, whose meter reads 199.9 V.
    let ours = slaves();
    ours.unit(1, |u| u.set_registers(Area::Holding, 0, &[1999]));
    let pty = ours.serve().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = header(broker(), &pty.path, "")
        .replace("{data_dir}", &dir.path().display().to_string())
        .replace(API_OFF, &format!("[api]\nlisten = \"{addr}\"\n"))
        + &devices();
    let path = dir.path().join("fieldgate.toml");
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(bin())
        .arg("--config")
        .arg(&path)
        .args(["read", "meter", "voltage"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("199.9"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_on_while_the_api_address_is_taken() {
    let slaves = slaves();
    let api = free_port();
    let taken = std::net::TcpListener::bind(("127.0.0.1", api)).unwrap();
    let rig = Rig::start_with_api(
        &slaves,
        "",
        &devices(),
        &format!("[api]\nlisten = \"127.0.0.1:{api}\"\n"),
    )
    .await;
    rig.wait_for("attributes", 3, Duration::from_secs(10)).await;
    assert!(
        !rig.gw.log_lines("cannot listen on").is_empty(),
        "{}",
        rig.gw.log()
    );
    drop(taken);
    let addr: SocketAddr = format!("127.0.0.1:{api}").parse().unwrap();
    let start = Instant::now();
    while rig.gw.log_lines("local API and console on").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "never bound again:\n{}",
            rig.gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    get_json(addr, "/api/v1/status").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_publish_the_gateways_health() {
    let slaves = slaves();
    let pty = slaves.serve().unwrap();
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = header(port, &pty.path, "").replace(
        "max_publish_rate = 0",
        "max_publish_rate = 0\nstats = \"1s\"",
    ) + &devices();
    let _gw = Gateway::start(&config);
    let seen = platform
        .wait_until(Duration::from_secs(10), "health attributes", |s| {
            payloads(s, "attributes")
                .iter()
                .any(|p| p.get("fieldgate_uptime_s").is_some())
        })
        .await;
    let health = payloads(&seen, "attributes")
        .into_iter()
        .find(|p| p.get("fieldgate_uptime_s").is_some())
        .unwrap();
    assert_eq!(health["fieldgate_devices_total"], 2);
    assert_eq!(health["fieldgate_devices_online"], 2);
    for name in [
        "fieldgate_outbox_messages",
        "fieldgate_outbox_dropped",
        "fieldgate_modbus_errors",
        "fieldgate_uplink_reconnects",
    ] {
        assert!(health[name].is_u64(), "{name}: {health}");
    }

    // The generic profile: the status JSON on <prefix>/stats.
    let second = slaves.serve().unwrap();
    let config = format!(
        "[gateway]\nid = \"gen-gw\"\ndata_dir = \"{{data_dir}}\"\n[platform]\nprofile = \"generic\"\nhost = \"127.0.0.1\"\nport = {port}\nstats = \"1s\"\n[api]\nlisten = \"\"\n[[bus]]\nname = \"line\"\nport = \"{}\"\nbaud = 115200\n",
        second.path.display()
    ) + &devices();
    let _generic = Gateway::start(&config);
    let seen = platform
        .wait_until(Duration::from_secs(10), "generic stats", |s| {
            !payloads(s, "fieldgate/gen-gw/stats").is_empty()
        })
        .await;
    let stats = &payloads(&seen, "fieldgate/gen-gw/stats")[0];
    assert_eq!(stats["gateway"], "gen-gw");
    assert_eq!(stats["devices"].as_array().unwrap().len(), 2);
    assert!(stats["uplink"]["connected"].as_bool().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_nobody_reads_loses_events_not_bus_time() {
    let slaves = slaves();
    let fast = device(
        "fast",
        3,
        "5ms",
        "",
        &[("f", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    slaves.unit(3, |u| u.set_registers(Area::Holding, 0, &[1]));
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let api = format!("[api]\nlisten = \"{addr}\"\n");
    let rig = Rig::start_with_api(&slaves, "", &(devices() + &fast), &api).await;
    api_up(addr, &rig.gw).await;
    let requests = |status: &Value| status["buses"][0]["requests"].as_u64().unwrap();
    let rate = |a: &Value, b: &Value, secs: f64| (requests(b) - requests(a)) as f64 / secs;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t0 = get_json(addr, "/api/v1/status").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t1 = get_json(addr, "/api/v1/status").await;
    let alone = rate(&t0, &t1, 3.0);

    // A trace client with a tiny receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut stalled = socket.connect(addr).await.unwrap();
    stalled
        .write_all(format!("GET /api/v1/trace HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let dropped = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("fieldgate_trace_dropped_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let start = Instant::now();
    let t2 = get_json(addr, "/api/v1/status").await;
    loop {
        let (_, metrics) = http(addr, "GET", "/metrics", &[], "").await;
        if dropped(&metrics) > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no trace event was dropped for the stalled client:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let t3 = get_json(addr, "/api/v1/status").await;
    let traced = rate(&t2, &t3, start.elapsed().as_secs_f64());
    assert!(
        traced > 0.8 * alone,
        "polling slowed from {alone:.0} to {traced:.0} requests/s with a stalled trace"
    );
    drop(stalled);
}
