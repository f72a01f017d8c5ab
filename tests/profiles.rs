//! The shipped device profiles against the makers' documents, through the
//! wire: a slave serves known values at the documented addresses in the
//! documented encoding (written out here from the documents, not from the
//! profile files), and the daemon's reports carry the documented meaning.
//! Also: `points` limiting what is read, `scan --identify` on the bus and
//! through the daemon, and `simulate` serving profile devices.

mod common;

use std::time::Duration;

use common::*;
use fieldgate::config::Area;
use fieldgate::sim::Unit;
use serde_json::{json, Value};

/// An IEEE 754 float as two registers, high word first (ABCD).
fn f32_abcd(value: f32) -> [u16; 2] {
    let bits = value.to_bits();
    [(bits >> 16) as u16, bits as u16]
}

/// A 32-bit integer as two registers, low word first (CDAB).
fn u32_cdab(value: u32) -> [u16; 2] {
    [value as u16, (value >> 16) as u16]
}

/// One shipped profile at one unit: what its document says is where, and
/// what the daemon must report for it.
struct Case {
    profile: &'static str,
    unit: u8,
    serve: fn(&mut Unit),
    expect: &'static [(&'static str, f64)],
}

fn cases() -> Vec<Case> {
    vec![
        // Eastron SDM630: FC04, floats ABCD; 30001 phase 1 voltage,
        // 30013 phase 1 power, 30053 total power, 30071 frequency,
        // 30073 import kWh, 30201 L1-L2 voltage, 30343 total kWh.
        Case {
            profile: "eastron-sdm630",
            unit: 1,
            serve: |u| {
                u.set_registers(Area::Input, 0, &f32_abcd(230.2));
                u.set_registers(Area::Input, 2, &f32_abcd(231.5));
                u.set_registers(Area::Input, 4, &f32_abcd(229.9));
                u.set_registers(Area::Input, 12, &f32_abcd(1500.0));
                u.set_registers(Area::Input, 52, &f32_abcd(4321.5));
                u.set_registers(Area::Input, 70, &f32_abcd(50.02));
                u.set_registers(Area::Input, 72, &f32_abcd(12345.6));
                u.set_registers(Area::Input, 200, &f32_abcd(399.1));
                u.set_registers(Area::Input, 342, &f32_abcd(12400.5));
            },
            expect: &[
                ("voltage_l1", 230.2),
                ("voltage_l2", 231.5),
                ("voltage_l3", 229.9),
                ("power_l1", 1500.0),
                ("power_total", 4321.5),
                ("frequency", 50.02),
                ("energy_import", 12345.6),
                ("voltage_l1_l2", 399.1),
                ("energy_total", 12400.5),
            ],
        },
        // Eastron SDM120: FC04 floats; 30001 V, 30007 A, 30013 W, 30031 PF,
        // 30071 Hz, 30073 import kWh, 30075 export kWh, 30343 total kWh.
        Case {
            profile: "eastron-sdm120",
            unit: 2,
            serve: |u| {
                u.set_registers(Area::Input, 0, &f32_abcd(229.7));
                u.set_registers(Area::Input, 6, &f32_abcd(4.25));
                u.set_registers(Area::Input, 12, &f32_abcd(960.0));
                u.set_registers(Area::Input, 30, &f32_abcd(0.98));
                u.set_registers(Area::Input, 70, &f32_abcd(49.98));
                u.set_registers(Area::Input, 72, &f32_abcd(810.25));
                u.set_registers(Area::Input, 74, &f32_abcd(3.5));
                u.set_registers(Area::Input, 342, &f32_abcd(813.75));
            },
            expect: &[
                ("voltage_l1", 229.7),
                ("current_l1", 4.25),
                ("power_total", 960.0),
                ("power_factor_total", 0.98),
                ("frequency", 49.98),
                ("energy_import", 810.25),
                ("energy_export", 3.5),
                ("energy_total", 813.75),
            ],
        },
        // Eastron SDM230: the same single-phase map as the SDM120.
        Case {
            profile: "eastron-sdm230",
            unit: 3,
            serve: |u| {
                u.set_registers(Area::Input, 0, &f32_abcd(231.0));
                u.set_registers(Area::Input, 6, &f32_abcd(16.5));
                u.set_registers(Area::Input, 12, &f32_abcd(3800.0));
                u.set_registers(Area::Input, 72, &f32_abcd(2048.5));
            },
            expect: &[
                ("voltage_l1", 231.0),
                ("current_l1", 16.5),
                ("power_total", 3800.0),
                ("energy_import", 2048.5),
            ],
        },
        // Eastron SDM72D-M: FC04 floats; 30001-30005 V, 30053 total W,
        // 30073 import kWh, 31281 total import power (0x0500).
        Case {
            profile: "eastron-sdm72d",
            unit: 4,
            serve: |u| {
                u.set_registers(Area::Input, 0, &f32_abcd(230.2));
                u.set_registers(Area::Input, 4, &f32_abcd(228.8));
                u.set_registers(Area::Input, 0x34, &f32_abcd(7200.0));
                u.set_registers(Area::Input, 0x48, &f32_abcd(999.5));
                u.set_registers(Area::Input, 0x500, &f32_abcd(7150.0));
            },
            expect: &[
                ("voltage_l1", 230.2),
                ("voltage_l3", 228.8),
                ("power_total", 7200.0),
                ("energy_import", 999.5),
                ("power_import", 7150.0),
            ],
        },
        // CHINT DTSU666: FC03 floats in document units: Ua at 2006H in
        // 0.1 V, Ia at 200CH in 0.001 A, Pt at 2012H in 0.1 W, PFt at 202AH
        // in 0.001, Freq at 2044H in 0.01 Hz; ImpEp at 101EH in kWh.
        Case {
            profile: "chint-dtsu666",
            unit: 5,
            serve: |u| {
                u.set_registers(Area::Holding, 0x2006, &f32_abcd(2302.0));
                u.set_registers(Area::Holding, 0x200C, &f32_abcd(12345.0));
                u.set_registers(Area::Holding, 0x2012, &f32_abcd(84210.0));
                u.set_registers(Area::Holding, 0x202A, &f32_abcd(985.0));
                u.set_registers(Area::Holding, 0x2044, &f32_abcd(5001.0));
                u.set_registers(Area::Holding, 0x101E, &f32_abcd(5123.5));
            },
            expect: &[
                ("voltage_l1", 230.2),
                ("current_l1", 12.345),
                ("power_total", 8421.0),
                ("power_factor_total", 0.985),
                ("frequency", 50.01),
                ("energy_import", 5123.5),
            ],
        },
        // CHINT DDSU666: FC03 floats; U 2000H V, I 2002H A, P 2004H kW,
        // Freq 200EH Hz, Ep 4000H kWh.
        Case {
            profile: "chint-ddsu666",
            unit: 6,
            serve: |u| {
                u.set_registers(Area::Holding, 0x2000, &f32_abcd(230.2));
                u.set_registers(Area::Holding, 0x2002, &f32_abcd(5.5));
                u.set_registers(Area::Holding, 0x2004, &f32_abcd(1.25));
                u.set_registers(Area::Holding, 0x200E, &f32_abcd(50.0));
                u.set_registers(Area::Holding, 0x4000, &f32_abcd(321.5));
            },
            expect: &[
                ("voltage_l1", 230.2),
                ("current_l1", 5.5),
                ("power_total", 1250.0),
                ("frequency", 50.0),
                ("energy_import", 321.5),
            ],
        },
        // XY-MD02: FC04 0001H temperature, signed 0.1 °C; 0002H humidity,
        // 0.1 %RH; FC03 0101H its address, 0103H temperature correction.
        Case {
            profile: "xy-md02",
            unit: 7,
            serve: |u| {
                u.set_registers(Area::Input, 1, &[(-105i16) as u16]);
                u.set_registers(Area::Input, 2, &[456]);
                u.set_registers(Area::Holding, 0x0101, &[7]);
                u.set_registers(Area::Holding, 0x0103, &[(-15i16) as u16]);
            },
            expect: &[
                ("temperature", -10.5),
                ("humidity", 45.6),
                ("modbus_address", 7.0),
                ("temperature_correction", -1.5),
            ],
        },
        // PZEM-016: FC04 0000H voltage 0.1 V; 0001H/0002H current low/high
        // word, 0.001 A; 0003H/0004H power 0.1 W; 0005H/0006H energy 1 Wh;
        // 0007H frequency 0.1 Hz; 0008H power factor 0.01.
        Case {
            profile: "peacefair-pzem016",
            unit: 8,
            serve: |u| {
                u.set_registers(Area::Input, 0, &[2302]);
                u.set_registers(Area::Input, 1, &u32_cdab(71_234));
                u.set_registers(Area::Input, 3, &u32_cdab(163_987));
                u.set_registers(Area::Input, 5, &u32_cdab(123_456));
                u.set_registers(Area::Input, 7, &[500]);
                u.set_registers(Area::Input, 8, &[95]);
            },
            expect: &[
                ("voltage_l1", 230.2),
                ("current_l1", 71.234),
                ("power_total", 16398.7),
                ("energy_total", 123.456),
                ("frequency", 50.0),
                ("power_factor_total", 0.95),
            ],
        },
    ]
}

fn profile_device(case: &Case, extra: &str) -> String {
    format!(
        "\n[[device]]\nname = \"{0}\"\nbus = \"line\"\nunit = {1}\npoll = \"200ms\"\nkey = \"{0}\"\nprofile = \"{0}\"\n{extra}\n",
        case.profile, case.unit
    )
}

/// The latest value of `point` of sub-device `key`.
fn latest(seen: &[Seen], key: &str, point: &str) -> Option<Value> {
    payloads(seen, "gateway/attributes")
        .iter()
        .rev()
        .find_map(|p| p[key].get(point).cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_profile_reads_what_its_document_says() {
    let slaves = Slaves::new();
    let cases = cases();
    let mut devices = String::new();
    for case in &cases {
        slaves.unit(case.unit, case.serve);
        devices += &profile_device(case, "");
    }
    let rig = Rig::start(&slaves, "", &devices).await;
    let seen = rig
        .platform
        .wait_until(Duration::from_secs(20), "every profile device", |s| {
            cases
                .iter()
                .all(|c| latest(s, c.profile, c.expect[0].0).is_some())
        })
        .await;
    for case in &cases {
        for (point, want) in case.expect {
            let got = latest(&seen, case.profile, point)
                .and_then(|v| v.as_f64())
                .unwrap_or_else(|| panic!("{}: no {point} reported", case.profile));
            // f32 carries about 7 significant digits.
            let tolerance = want.abs().max(1.0) * 1e-6;
            assert!(
                (got - want).abs() <= tolerance,
                "{}: {point} = {got}, the document says {want}",
                case.profile
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_limits_what_is_read_on_the_wire() {
    let slaves = Slaves::new();
    let sdm630 = cases().into_iter().next().unwrap();
    slaves.unit(1, sdm630.serve);
    let rig = Rig::start(
        &slaves,
        "",
        &profile_device(&sdm630, "points = [\"voltage_l1\", \"power_total\"]"),
    )
    .await;
    let seen = rig
        .wait_for("gateway/attributes", 3, Duration::from_secs(10))
        .await;
    let reports = payloads(&seen, "gateway/attributes");
    assert_eq!(
        reports.last().unwrap()["eastron-sdm630"],
        json!({"voltage_l1": 230.2, "power_total": 4321.5})
    );
    // Only the two points' registers were asked for: input 0-1 and 52-53.
    let mut spans: Vec<(Area, u16, u16)> =
        slaves.received().iter().map(|r| r.request.span()).collect();
    spans.sort();
    spans.dedup();
    assert_eq!(spans, [(Area::Input, 0, 2), (Area::Input, 52, 2)]);
}

/// `scan --identify` output for units 1-9 on the rig's bus.
fn scan_identify(rig: &Rig) -> String {
    rig.gw
        .command(&["scan", "line", "--units", "1-9", "--identify"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_identify_names_the_profiles_each_unit_matches() {
    let slaves = Slaves::new();
    let cases = cases();
    for case in &cases {
        slaves.unit(case.unit, case.serve);
    }
    // A slave no profile describes.
    slaves.unit(9, |u| u.set_registers(Area::Holding, 0, &[1]));
    let devices = device(
        "other",
        9,
        "5s",
        "",
        &[("x", "area = \"holding\"\naddress = 0\ntype = \"u16\"")],
    );
    let port = free_port();
    let api = format!("[api]\nlisten = \"127.0.0.1:{port}\"\n");
    let rig = Rig::start_with_api(&slaves, "", &devices, &api).await;
    rig.wait_for("attributes", 1, Duration::from_secs(10)).await;
    // Through the running daemon (it holds the port).
    let through_daemon = scan_identify(&rig);
    let unit_line = |out: &str, unit: u8| -> String {
        out.lines()
            .find(|l| l.starts_with(&format!("unit {unit}: ")))
            .unwrap_or_else(|| panic!("no unit {unit} in:\n{out}"))
            .to_string()
    };
    for case in &cases {
        let line = unit_line(&through_daemon, case.unit);
        assert!(line.contains(case.profile), "{line}");
    }
    // Single registers that decode out of range for the other models.
    for (unit, only) in [
        (7, "xy-md02"),
        (8, "peacefair-pzem016"),
        (5, "chint-dtsu666"),
    ] {
        let line = unit_line(&through_daemon, unit);
        for other in cases.iter().map(|c| c.profile).filter(|p| *p != only) {
            assert!(!line.contains(other), "{unit} matches only {only}: {line}");
        }
    }
    assert!(
        unit_line(&through_daemon, 9).ends_with("matches no profile"),
        "{through_daemon}"
    );
    // The identify reads were made once per register, not once per
    // profile: eight profiles read six distinct registers (the SDM120 and
    // SDM230 share one, the SDM630 and SDM72D another).
    let reads_of_unit_9 = slaves
        .received()
        .iter()
        .filter(|r| r.unit == 9 && r.request.span() != (Area::Holding, 0, 1))
        .count();
    assert_eq!(reads_of_unit_9, 6, "identify reads of unit 9");

    // Without the daemon, on the bus directly: the same answers.
    drop(rig);
    let direct = fieldgate_scan(&slaves).await;
    for unit in 1..=9 {
        assert_eq!(unit_line(&direct, unit), unit_line(&through_daemon, unit));
    }
}

/// `scan --identify` with no daemon, on a fresh pty of `slaves`.
async fn fieldgate_scan(slaves: &Slaves) -> String {
    let pty = slaves.serve().expect("pty");
    let config = header(broker(), &pty.path, "");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scan.toml");
    std::fs::write(
        &path,
        config.replace("{data_dir}", &dir.path().join("data").display().to_string()),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin())
            .args([
                "--config",
                path.to_str().unwrap(),
                "scan",
                "line",
                "--units",
                "1-9",
                "--identify",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
