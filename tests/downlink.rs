//! Downlink (SPEC §5): the platform publishes on a real broker, the real
//! binary routes to a simulated slave on a pty, and the slave's request log
//! shows exactly what reached the wire.

mod common;

use std::time::Duration;

use common::*;
use fieldgate::config::Area;
use fieldgate::modbus::Request;
use serde_json::{json, Value};
use tokio_modbus::ExceptionCode;

const POINTS: &[(&str, &str)] = &[
    ("setpoint", "area = \"holding\"\naddress = 10\ntype = \"u16\"\nscale = 0.1\nwritable = true\nmin = 0.0\nmax = 300.0"),
    ("big", "area = \"holding\"\naddress = 20\ntype = \"u32\"\nwritable = true"),
    ("ratio", "area = \"holding\"\naddress = 40\ntype = \"f32\"\norder = \"CDAB\"\nwritable = true"),
    ("raw", "area = \"holding\"\naddress = 50\ntype = \"u16\"\nwritable = true"),
    ("flag", "area = \"holding\"\naddress = 30\ntype = \"bool\"\nbit = 3\nwritable = true"),
    ("relay1", "area = \"coil\"\naddress = 0\ntype = \"bool\"\nwritable = true"),
    ("relay2", "area = \"coil\"\naddress = 1\ntype = \"bool\"\nwritable = true"),
    ("relay3", "area = \"coil\"\naddress = 5\ntype = \"bool\"\nwritable = true"),
    ("temp", "area = \"input\"\naddress = 0\ntype = \"u16\""),
];

fn writes(slaves: &Slaves) -> Vec<(u8, Request)> {
    slaves
        .received()
        .into_iter()
        .filter(|r| {
            matches!(
                r.request,
                Request::WriteCoil(..)
                    | Request::WriteCoils(..)
                    | Request::WriteRegister(..)
                    | Request::WriteRegisters(..)
            )
        })
        .map(|r| (r.unit, r.request))
        .collect()
}

/// Requests the slave received after the first `skip`.
fn received_after(slaves: &Slaves, skip: usize) -> Vec<(u8, Request)> {
    slaves
        .received()
        .into_iter()
        .skip(skip)
        .map(|r| (r.unit, r.request))
        .collect()
}

async fn wait_for_writes(slaves: &Slaves, n: usize) {
    for _ in 0..200 {
        if writes(slaves).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected {n} writes, got {:?}", writes(slaves));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_writes_take_each_path_and_are_read_back() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.holding.insert(30, 0x0101);
        u.input.insert(0, 7);
    });
    let rig = Rig::start(&slaves, "", &device("plc", 1, "30s", "", POINTS)).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    let p = &rig.platform;

    // One register (FC06, 21.5 / 0.1) and a 32-bit point (one FC16).
    p.publish("attributes/push", r#"{"setpoint": 21.5, "big": 70000}"#)
        .await;
    wait_for_writes(&slaves, 2).await;
    // Two adjacent coils (one FC15) and one apart (FC05).
    p.publish(
        "attributes/push",
        r#"{"relay1": true, "relay2": false, "relay3": true}"#,
    )
    .await;
    wait_for_writes(&slaves, 4).await;
    // A float in CDAB order, and a bit inside a register (read, modify, write).
    p.publish("attributes/push", r#"{"ratio": 1.5, "flag": true}"#)
        .await;
    wait_for_writes(&slaves, 6).await;
    // 1.5f32 = 0x3FC00000, words swapped for CDAB; bit 3 set in 0x0101.
    let order = writes(&slaves);
    assert_eq!(
        order[0..2],
        [
            (1, Request::WriteRegister(10, 215)),
            (1, Request::WriteRegisters(20, vec![0x0001, 0x1170]))
        ]
    );
    assert_eq!(
        order[2..4],
        [
            (1, Request::WriteCoils(0, vec![true, false])),
            (1, Request::WriteCoil(5, true))
        ]
    );
    assert!(
        order[4..].contains(&(1, Request::WriteRegister(30, 0x0109))),
        "{order:?}"
    );
    assert!(
        order[4..].contains(&(1, Request::WriteRegisters(40, vec![0x0000, 0x3FC0]))),
        "{order:?}"
    );
    assert!(
        slaves
            .received()
            .iter()
            .any(|r| r.request == Request::ReadHolding(30, 1)),
        "the bit's register is read before it is written"
    );
    assert_eq!(
        slaves.unit(1, |u| u.holding.get(&30).copied()),
        Some(0x0109),
        "other bits kept"
    );

    // Each push is read back and reported at once.
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "read-back reports", |seen| {
            payloads(seen, "attributes")
                .iter()
                .any(|p| p.get("flag") == Some(&json!(true)))
        })
        .await;
    let reports = payloads(&seen, "attributes");
    assert!(
        reports.contains(&json!({"setpoint": 21.5, "big": 70000})),
        "{reports:?}"
    );
    assert!(
        reports.contains(&json!({"relay1": true, "relay2": false, "relay3": true})),
        "{reports:?}"
    );
    assert!(
        reports.contains(&json!({"ratio": 1.5, "flag": true})),
        "{reports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_push_writes_nothing_and_says_why() {
    let slaves = Slaves::new();
    slaves.unit(1, |_| ());
    let rig = Rig::start(&slaves, "", &device("plc", 1, "30s", "", POINTS)).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    let cases = [
        (
            r#"{"setpoint": 20, "nope": 1}"#,
            "nope",
            "unknown attribute",
        ),
        (r#"{"temp": 3}"#, "temp", "read-only"),
        (r#"{"setpoint": "20"}"#, "setpoint", "expected a number"),
        (r#"{"relay1": 1}"#, "relay1", "expected true or false"),
        (r#"{"setpoint": 300.5}"#, "setpoint", "outside"),
        (r#"{"raw": 70000}"#, "raw", "does not fit the point's type"),
        (r#"{"raw": -1}"#, "raw", "does not fit the point's type"),
        (
            r#"{"big": 1.5e300}"#,
            "big",
            "does not fit the point's type",
        ),
    ];
    for (payload, _, _) in cases {
        rig.platform.publish("attributes/push", payload).await;
    }
    let seen = rig
        .platform
        .wait_until(
            Duration::from_secs(10),
            "one event per rejected push",
            |seen| events(seen, "write_rejected").len() >= cases.len(),
        )
        .await;
    let rejected = events(&seen, "write_rejected");
    for (params, (payload, attribute, reason)) in rejected.iter().zip(cases) {
        assert_eq!(params["attribute"], attribute, "{payload}: {params}");
        let text = params["reason"].as_str().unwrap_or_default();
        assert!(
            text.contains(reason),
            "{payload}: {text:?} should say {reason:?}"
        );
    }
    // Malformed JSON is dropped without an event; still nothing written.
    rig.platform.publish("attributes/push", "{not json").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(writes(&slaves), [], "no rejected push reaches the wire");
}

/// Device "plc" (unit 1, the gateway's own) and sub-device "pump-7" (unit 2).
fn plc_and_pump(poll: &str) -> String {
    device("plc", 1, poll, "", POINTS)
        + &device(
            "sub",
            2,
            poll,
            "key = \"pump-7\"",
            &[(
                "speed",
                "area = \"holding\"\naddress = 3\ntype = \"u16\"\nwritable = true",
            )],
        )
}

const COMMANDS: &str = r#"
[[command]]
name = "start"
device = "plc"
write = [ { point = "relay1", value = true }, { point = "setpoint", value = 12.5 } ]

[[command]]
name = "broken"
device = "plc"
write = [ { point = "relay1", value = false }, { point = "raw", value = 5 }, { point = "relay3", value = true } ]

[[command]]
name = "pump"
device = "sub"
write = [ { point = "speed", value = 40 } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_and_sub_devices() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.exceptions
            .push((Area::Holding, 50..=50, ExceptionCode::ServerDeviceFailure))
    });
    slaves.unit(2, |_| ());
    let rig = Rig::start(&slaves, "", &(plc_and_pump("30s") + COMMANDS)).await;
    rig.wait_for("gateway/attributes", 1, Duration::from_secs(10))
        .await;
    let p = &rig.platform;

    p.publish(
        "command/send/41",
        r#"{"method": "start", "params": {}, "id": 41}"#,
    )
    .await;
    let seen = rig
        .wait_for("command/reply/41", 1, Duration::from_secs(10))
        .await;
    assert_eq!(
        payloads(&seen, "command/reply/41"),
        [json!({"method": "start", "params": {"ok": true}})]
    );
    assert_eq!(
        writes(&slaves),
        [
            (1, Request::WriteCoil(0, true)),
            (1, Request::WriteRegister(10, 125))
        ]
    );

    p.publish(
        "command/send/42",
        r#"{"method": "launch", "params": {}, "id": 42}"#,
    )
    .await;
    let seen = rig
        .wait_for("command/reply/42", 1, Duration::from_secs(10))
        .await;
    let reply = &payloads(&seen, "command/reply/42")[0];
    assert_eq!(reply["params"]["ok"], false);
    assert!(
        reply["params"]["error"]
            .as_str()
            .unwrap()
            .contains("unknown method"),
        "{reply}"
    );
    assert_eq!(writes(&slaves).len(), 2, "an unknown method writes nothing");

    // The second write fails at the slave: the third is not attempted.
    p.publish(
        "command/send/43",
        r#"{"method": "broken", "params": {}, "id": 43}"#,
    )
    .await;
    let seen = rig
        .wait_for("command/reply/43", 1, Duration::from_secs(10))
        .await;
    let reply = &payloads(&seen, "command/reply/43")[0];
    assert_eq!(reply["params"]["ok"], false, "{reply}");
    let error = reply["params"]["error"].as_str().unwrap();
    assert!(
        error.contains("write 2 of 3 (raw)") && error.contains("exception"),
        "{error}"
    );
    let after: Vec<_> = writes(&slaves).into_iter().skip(2).collect();
    assert_eq!(
        after,
        [
            (1, Request::WriteCoil(0, false)),
            (1, Request::WriteRegister(50, 5))
        ]
    );

    // A command for the sub-device, and one of the gateway's own commands
    // sent to the sub-device (unknown there).
    p.publish(
        "gateway/command/send",
        r#"{"device": "pump-7", "command": {"id": 9, "method": "pump", "params": {}}}"#,
    )
    .await;
    p.publish(
        "gateway/command/send",
        r#"{"device": "pump-7", "command": {"id": 10, "method": "start", "params": {}}}"#,
    )
    .await;
    let seen = rig
        .wait_for("gateway/command/reply", 2, Duration::from_secs(10))
        .await;
    let replies = payloads(&seen, "gateway/command/reply");
    let by_id = |id: u64| replies.iter().find(|r| r["command"]["id"] == id).cloned();
    assert_eq!(
        by_id(9),
        Some(
            json!({"device": "pump-7", "command": {"id": 9, "method": "pump", "params": {"ok": true}}})
        )
    );
    assert_eq!(by_id(10).unwrap()["command"]["params"]["ok"], false);
    assert_eq!(
        writes(&slaves).last(),
        Some(&(2, Request::WriteRegister(3, 40)))
    );

    // A sub-device push, read back on gateway/attributes.
    p.publish("gateway/attributes/push", r#"{"pump-7": {"speed": 55}}"#)
        .await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "the read-back", |seen| {
            payloads(seen, "gateway/attributes").contains(&json!({"pump-7": {"speed": 55}}))
        })
        .await;
    assert!(!seen.is_empty());
    assert_eq!(
        writes(&slaves).last(),
        Some(&(2, Request::WriteRegister(3, 55)))
    );
    // An unknown sub-device key is rejected with an event.
    p.publish("gateway/attributes/push", r#"{"pump-8": {"speed": 1}}"#)
        .await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "a rejection", |seen| {
            !events(seen, "write_rejected").is_empty()
        })
        .await;
    assert_eq!(events(&seen, "write_rejected")[0]["target"], "pump-8");
}

const STREAMS: &str = r#"
[[stream]]
name = "bin"
bus = "line"

[[stream]]
name = "hex"
bus = "line"
encoding = "hex"
"#;

/// Frames and their CRCs computed independently (Python, poly 0xA001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_in_binary_and_hex() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.holding.insert(0, 0x1234);
        u.holding.insert(1, 0x5678);
        u.exceptions
            .push((Area::Holding, 100..=101, ExceptionCode::IllegalDataAddress));
    });
    let devices = device(
        "plc",
        1,
        "30s",
        "",
        &[("a", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let rig = Rig::start(&slaves, "", &(devices + STREAMS)).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    let p = &rig.platform;
    let before = slaves.received().len();

    p.publish(
        "data/bin/set",
        vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0B],
    )
    .await;
    let seen = rig.wait_for("data/bin", 1, Duration::from_secs(10)).await;
    let bin: Vec<Vec<u8>> = seen
        .iter()
        .filter(|s| s.topic == "data/bin")
        .map(|s| s.raw.clone())
        .collect();
    assert_eq!(
        bin[0],
        [0x01, 0x03, 0x04, 0x12, 0x34, 0x56, 0x78, 0x81, 0x07]
    );

    p.publish("data/hex/set", "01 06 00 01 00 03 98 0b").await;
    let seen = rig.wait_for("data/hex", 1, Duration::from_secs(10)).await;
    assert_eq!(
        payloads(&seen, "data/hex")[0],
        json!("01 06 00 01 00 03 98 0B")
    );
    assert_eq!(slaves.unit(1, |u| u.holding.get(&1).copied()), Some(3));

    p.publish("data/hex/set", "010300640002 85D4").await;
    let seen = rig.wait_for("data/hex", 2, Duration::from_secs(10)).await;
    assert_eq!(
        payloads(&seen, "data/hex")[1],
        json!("01 83 02 C0 F1"),
        "the exception frame"
    );

    assert_eq!(
        received_after(&slaves, before)
            .into_iter()
            .filter(|(_, r)| *r != Request::ReadHolding(0, 1))
            .collect::<Vec<_>>(),
        [
            (1, Request::ReadHolding(0, 2)),
            (1, Request::WriteRegister(1, 3)),
            (1, Request::ReadHolding(100, 2)),
        ]
    );

    // A bad CRC, an unknown unit, a truncated frame and non-hex text never
    // reach the slave; each is answered by an event.
    let count = slaves.received().len();
    p.publish(
        "data/bin/set",
        vec![0x01, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC4, 0x0C],
    )
    .await;
    p.publish("data/hex/set", "09 03 00 00 00 02 C5 43").await;
    p.publish("data/hex/set", "01 03 00 00 00").await;
    p.publish("data/hex/set", "hello").await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "four rejections", |seen| {
            events(seen, "frame_rejected").len() >= 4
        })
        .await;
    let reasons: Vec<String> = events(&seen, "frame_rejected")
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(reasons[0].contains("CRC"), "{reasons:?}");
    assert!(
        reasons[1].contains("unit 9 is not configured"),
        "{reasons:?}"
    );
    assert!(reasons[3].contains("hex"), "{reasons:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        received_after(&slaves, count)
            .iter()
            .all(|(_, r)| *r == Request::ReadHolding(0, 1)),
        "no rejected frame reached the slave: {:?}",
        received_after(&slaves, count)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transparent_bus_carries_bytes_as_they_are() {
    let slaves = Slaves::new();
    slaves.unit(1, |_| ());
    let echo = fieldgate::sim::echo().unwrap();
    let extra = format!(
        "\n[[bus]]\nname = \"raw\"\nport = \"{}\"\nbaud = 9600\nmode = \"transparent\"\ntimeout = \"200ms\"\n\n[[stream]]\nname = \"dtu\"\nbus = \"raw\"\n\n[[stream]]\nname = \"dtuhex\"\nbus = \"raw\"\nencoding = \"hex\"\n",
        echo.path.display()
    );
    let devices = device(
        "plc",
        1,
        "30s",
        "",
        &[("a", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let rig = Rig::start(&slaves, "", &(devices + &extra)).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    let bytes: Vec<u8> = (0..=255).collect();
    rig.platform.publish("data/dtu/set", bytes.clone()).await;
    rig.platform.publish("data/dtuhex/set", "de ad BE EF").await;
    let seen = rig
        .wait_for("data/dtuhex", 1, Duration::from_secs(10))
        .await;
    let raw: Vec<Vec<u8>> = seen
        .iter()
        .filter(|s| s.topic == "data/dtu")
        .map(|s| s.raw.clone())
        .collect();
    assert_eq!(
        raw,
        [bytes],
        "256 arbitrary bytes (no Modbus framing) come back unchanged"
    );
    assert_eq!(payloads(&seen, "data/dtuhex"), [json!("DE AD BE EF")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_offline_and_online_are_events() {
    let slaves = Slaves::new();
    slaves.unit(1, |_| ());
    slaves.unit(2, |_| ());
    let devices = device(
        "a",
        1,
        "200ms",
        "",
        &[("x", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    ) + &device(
        "b",
        2,
        "200ms",
        "key = \"b-1\"",
        &[("y", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let rig = Rig::start(&slaves, "", &devices).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    slaves.unit(2, |u| u.silent = true);
    rig.platform
        .wait_until(Duration::from_secs(10), "offline", |s| {
            !events(s, "device_offline").is_empty()
        })
        .await;
    slaves.unit(2, |u| u.silent = false);
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(10), "online", |s| {
            !events(s, "device_online").is_empty()
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = [seen, rig.platform.all()].concat();
    let offline = events(&seen, "device_offline");
    assert_eq!(offline[0]["device"], "b");
    assert_eq!(offline[0]["key"], "b-1");
    assert!(offline[0]["reason"]
        .as_str()
        .unwrap()
        .contains("no response"));
    assert_eq!(
        events(&rig.platform.all(), "device_offline").len(),
        1,
        "once per transition"
    );
    assert_eq!(
        events(&rig.platform.all(), "device_online").len(),
        1,
        "once per transition"
    );
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A payload for `topic` that must never lead to a write: random bytes,
/// broken JSON, or well-formed JSON that is wrong in at least one way.
fn hostile(rng: &mut Rng, topic: &str) -> Vec<u8> {
    // Each pair is invalid on its own, so any push holding one is refused.
    let invalid = [
        ("nope", json!(1)),
        ("", json!(true)),
        ("temp", json!(3)),
        ("setpoint", json!(-1)),
        ("setpoint", json!(300.01)),
        ("setpoint", json!("21")),
        ("setpoint", json!(null)),
        ("raw", json!(70000)),
        ("raw", json!(-1)),
        ("raw", json!([1])),
        ("big", json!(1e20)),
        ("big", json!(true)),
        ("relay1", json!(1)),
        ("relay1", json!("on")),
        ("ratio", json!(1e39)),
        ("ratio", json!({"a": 1})),
        ("flag", json!(0)),
    ];
    match rng.below(6) {
        0 => rng.bytes(300),
        1 => {
            let valid = r#"{"setpoint": 20}"#.as_bytes();
            valid[..rng.below(valid.len())].to_vec()
        }
        2 => format!(
            "{}{}",
            "[".repeat(rng.below(5000)),
            "]".repeat(rng.below(5000))
        )
        .into_bytes(),
        _ if topic.starts_with("data/") => {
            // A valid frame with its CRC broken, a valid-CRC frame for an
            // unknown unit, or not hex.
            let mut frame = vec![0x01, 0x06, 0x00, 0x01, 0x00, 0x03, 0x98, 0x0B];
            match rng.below(3) {
                0 => frame[6 + rng.below(2)] ^= 1 + rng.next() as u8 % 255,
                1 => frame = vec![0x09, 0x03, 0x00, 0x00, 0x00, 0x02, 0xC5, 0x43],
                _ => return b"zz 01 06".to_vec(),
            }
            if topic.contains("hex") {
                fieldgate::text::to_hex(&frame).into_bytes()
            } else {
                frame
            }
        }
        _ => {
            // JSON with at least one invalid attribute or shape.
            let mut body = serde_json::Map::new();
            if rng.below(2) == 0 {
                body.insert("setpoint".into(), json!(20));
            }
            let (name, value) = rng.pick(&invalid).clone();
            body.insert(name.into(), value);
            let inner = Value::Object(body);
            let payload = match topic {
                "gateway/attributes/push" => json!({ *rng.pick(&["pump-8", "", "plc"]): inner }),
                "gateway/command/send" => {
                    json!({"device": rng.pick(&["pump-8", "x"]), "command": {"id": 1, "method": rng.pick(&["stop", "", "START"])}})
                }
                t if t.starts_with("command/send") => {
                    json!({"method": rng.pick(&["stop", "", "START", "reset "])})
                }
                _ => inner,
            };
            payload.to_string().into_bytes()
        }
    }
}

/// 10,000 hostile payloads across every downlink topic: nothing is written,
/// the daemon lives and keeps reporting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_payloads_write_nothing() {
    let slaves = Slaves::new();
    slaves.unit(1, |_| ());
    slaves.unit(2, |_| ());
    let config = plc_and_pump("1s") + COMMANDS + STREAMS;
    let mut rig = Rig::start(&slaves, "", &config).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    let polls: std::collections::HashSet<String> = slaves
        .received()
        .iter()
        .map(|r| format!("{}:{:?}", r.unit, r.request))
        .collect();
    let topics = [
        "attributes/push",
        "gateway/attributes/push",
        "command/send/1",
        "command/send/",
        "gateway/command/send",
        "data/bin/set",
        "data/hex/set",
        "data/none/set",
        "attributes",
        "command/reply/1",
        "data/bin",
        "gateway/attributes/push/extra",
    ];
    // The last four are not downlink topics: the gateway never sees them.
    let subscribed = &topics[..8];
    let mut sent_to_gateway = 0;
    let mut rng = Rng(0x5EED_F1E1_D6A7_E000);
    for i in 0..10_000 {
        let topic = *rng.pick(&topics);
        sent_to_gateway += usize::from(subscribed.contains(&topic));
        let payload = hostile(&mut rng, topic);
        rig.platform.publish(topic, payload).await;
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let after = rig.platform.all().len();
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(30), "a report after the soak", |seen| {
            seen[after..].iter().any(|s| s.topic == "attributes")
        })
        .await;
    assert!(rig.gw.running(), "the daemon survived:\n{}", rig.gw.log());
    assert_eq!(writes(&slaves), [], "no write request reached the slave");
    let unexpected: Vec<_> = slaves
        .received()
        .into_iter()
        .filter(|r| !polls.contains(&format!("{}:{:?}", r.unit, r.request)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "only the polls reached the slave: {unexpected:?}"
    );
    assert!(!events(&seen, "write_rejected").is_empty());
    assert!(rig.gw.log_lines("panicked").is_empty());
    assert!(
        rig.gw.log_lines("downlink queue full").is_empty(),
        "every payload was examined, none skipped"
    );
    let examined = rig.gw.log_lines("dropped a message").len()
        + rig.gw.log_lines("write rejected").len()
        + rig.gw.log_lines("frame not sent").len()
        + rig.gw.log_lines("unknown command method").len()
        + rig.gw.log_lines("unknown stream").len();
    assert_eq!(
        examined, sent_to_gateway,
        "each payload was refused and logged"
    );
}

/// The generic profile's twins (SPEC §6): `<prefix>/<device>/set`,
/// `<prefix>/command/<id>` → `…/reply`, `<prefix>/stream/<name>/set` →
/// `<prefix>/stream/<name>`, events on `<prefix>/event`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_profile_downlink() {
    let slaves = Slaves::new();
    slaves.unit(1, |u| {
        u.holding.insert(0, 0x1234);
        u.holding.insert(1, 0x5678);
    });
    slaves.unit(2, |_| ());
    let pty = slaves.serve().unwrap();
    let port = broker();
    let platform = Subscriber::connect(port).await;
    let config = header(port, &pty.path, "").replace(
        "access_token = \"token\"\nproject_key = \"key\"",
        "profile = \"generic\"\ntopic_prefix = \"site/gw\"",
    ) + &plc_and_pump("30s")
        + COMMANDS
        + STREAMS;
    let _gw = Gateway::start(&config);
    platform
        .wait_until(Duration::from_secs(10), "first report", |s| {
            !payloads(s, "site/gw/plc/attributes").is_empty()
        })
        .await;

    platform
        .publish("site/gw/plc/set", r#"{"setpoint": 12.5}"#)
        .await;
    platform.publish("site/gw/sub/set", r#"{"speed": 7}"#).await;
    platform
        .publish("site/gw/command/c1", r#"{"method": "pump", "params": {}}"#)
        .await;
    platform
        .publish("site/gw/stream/hex/set", "01 03 00 00 00 02 C4 0B")
        .await;
    platform.publish("site/gw/plc/set", r#"{"temp": 1}"#).await;
    let seen = platform
        .wait_until(Duration::from_secs(10), "the replies", |s| {
            !payloads(s, "site/gw/command/c1/reply").is_empty()
                && !payloads(s, "site/gw/stream/hex").is_empty()
                && !payloads(s, "site/gw/event").is_empty()
                && payloads(s, "site/gw/sub/attributes")
                    .iter()
                    .any(|p| p["values"] == json!({"speed": 7}))
        })
        .await;
    assert_eq!(
        payloads(&seen, "site/gw/command/c1/reply"),
        [json!({"method": "pump", "params": {"ok": true}})]
    );
    assert_eq!(
        payloads(&seen, "site/gw/stream/hex"),
        [json!("01 03 04 12 34 56 78 81 07")]
    );
    let event = &payloads(&seen, "site/gw/event")[0];
    assert_eq!(event["method"], "write_rejected");
    assert_eq!(event["params"]["attribute"], "temp");
    assert!(event["ts"].as_u64().is_some(), "{event}");
    let plc = payloads(&seen, "site/gw/plc/attributes");
    assert!(
        plc.iter().any(|p| p["values"] == json!({"setpoint": 12.5})),
        "{plc:?}"
    );
    assert_eq!(
        writes(&slaves),
        [
            (1, Request::WriteRegister(10, 125)),
            (2, Request::WriteRegister(3, 7)),
            (2, Request::WriteRegister(3, 40)),
        ]
    );
}
