//! The command line as a user meets it: exit codes, error locations, `check`,
//! `demo`, and commissioning (`simulate` + `read` + `scan`) through the binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fieldgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fieldgate"));
    cmd.env_remove("FIELDGATE_CONFIG").env_remove("RUST_LOG");
    cmd
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

#[test]
fn invalid_configs_exit_2_naming_file_line_and_column() {
    let cases = [
        ("unknown_key", "16:1", "unknown field `adress`"),
        ("duplicate_point", "20:8", "duplicate point \"voltage\""),
        ("missing_bus", "10:7", "unknown bus \"rs485-2\""),
        ("bit_on_coil", "18:7", "a coil is already a single bit"),
        ("unit_zero", "11:8", "unit 0 is not a valid slave id"),
        ("writable_input", "19:12", "an input register is read-only"),
        (
            "shared_port",
            "10:8",
            "two buses cannot share a serial port",
        ),
    ];
    for (name, place, message) in cases {
        let path = repo(&format!("tests/configs/invalid/{name}.toml"));
        let out = fieldgate()
            .args(["--config", &path, "check"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}:{place}: ")),
            "{name}: {stderr}"
        );
        assert!(stderr.contains(message), "{name}: {stderr}");
    }
}

#[test]
fn usage_errors_exit_2_and_a_missing_file_is_named() {
    let out = fieldgate()
        .args(["--config", "/nonexistent/f.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/f.toml"));
    let out = fieldgate().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let example = repo("config/fieldgate.toml");
    let out = fieldgate()
        .args(["--config", &example, "read", "no-such-device"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device \"no-such-device\""));
}

#[test]
fn check_prints_the_plan_and_warns_when_a_bus_is_over_budget() {
    let example = repo("config/fieldgate.toml");
    let out = fieldgate()
        .args(["--config", &example, "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("OK (1 bus, 2 devices, 9 points"),
        "{stdout}"
    );
    assert!(stdout.contains("FC04 input"), "{stdout}");
    assert!(!stdout.contains("warning"), "{stdout}");

    // Same map at 1200 baud polled every 100 ms cannot fit.
    let slow = std::fs::read_to_string(&example)
        .unwrap()
        .replace("baud = 9600", "baud = 1200")
        .replace("poll = \"5s\"", "poll = \"100ms\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.toml");
    std::fs::write(&path, slow).unwrap();
    let out = fieldgate()
        .args(["--config", path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains("warning: bus rs485-1 is over budget"),
        "{stdout}"
    );
}

/// Kills the child process when the test ends, even by panic.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a child's stdout lines until `pred` matches one, within `limit`.
fn wait_for_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> Option<String> {
    let start = Instant::now();
    for line in lines {
        let line = line.ok()?;
        if pred(&line) {
            return Some(line);
        }
        if start.elapsed() > limit {
            return None;
        }
    }
    None
}

/// Starts `fieldgate simulate` on the config at `path` and returns it with
/// the address it prints for `bus` (a pty path, or host:port); the rest of
/// its output is drained.
fn simulate(path: &str, bus: &str) -> (Running, String) {
    let mut sim = Running(
        fieldgate()
            .args(["--config", path, "simulate"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(sim.0.stdout.take().unwrap()).lines();
    let prefix = format!("bus {bus}: ");
    let line = wait_for_line(&mut lines, Duration::from_secs(5), |l| {
        l.starts_with(&prefix)
    })
    .unwrap_or_else(|| panic!("simulate prints the address of bus {bus}"));
    std::thread::spawn(move || lines.for_each(drop));
    let addr = line.split_whitespace().nth(2).unwrap().to_string();
    (sim, addr)
}

#[test]
fn demo_shows_platform_messages_within_5_seconds() {
    let start = Instant::now();
    let mut child = Running(
        fieldgate()
            .arg("demo")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let own = wait_for_line(&mut lines, Duration::from_secs(5), |l| {
        l.contains("] attributes  {")
    });
    let sub = wait_for_line(&mut lines, Duration::from_secs(5), |l| {
        l.contains("] gateway/attributes  {")
    });
    let elapsed = start.elapsed();
    assert!(
        own.is_some() && sub.is_some(),
        "demo printed no platform messages"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "first messages after {elapsed:?}"
    );
}

#[test]
fn simulate_then_read_and_scan_through_the_binary() {
    let example = repo("config/fieldgate.toml");
    let (_sim, pty) = simulate(&example, "rs485-1");

    let config = std::fs::read_to_string(&example)
        .unwrap()
        .replace("/dev/ttyUSB0", &pty);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sim.toml");
    std::fs::write(&path, config).unwrap();
    let path = path.to_str().unwrap();

    let read = fieldgate()
        .args(["--config", path, "read", "tc-1"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&read.stdout);
    assert_eq!(
        read.status.code(),
        Some(0),
        "{table}{}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(
        table.contains("firmware") && table.contains("\"SIM2\""),
        "{table}"
    );
    assert!(
        table.contains("temperature") && table.contains("°C"),
        "{table}"
    );

    let one = fieldgate()
        .args(["--config", path, "read", "meter-a", "voltage"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&one.stdout);
    assert!(
        table.contains("voltage") && !table.contains("current"),
        "{table}"
    );

    let scan = fieldgate()
        .args(["--config", path, "scan", "rs485-1", "--units", "1-4"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&scan.stdout);
    assert_eq!(scan.status.code(), Some(0), "{report}");
    assert!(
        report.contains("unit 1: answers") && report.contains("unit 2: answers"),
        "{report}"
    );
    assert!(
        !report.contains("unit 3") && report.contains("2 of 4 unit ids answered"),
        "{report}"
    );

    // `write` (defect 12): validated like a push, written, read back.
    let write = fieldgate()
        .args(["--config", path, "write", "tc-1", "setpoint", "21.5"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&write.stdout);
    assert_eq!(
        write.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&write.stderr)
    );
    assert!(out.contains("wrote setpoint = 21.5 to tc-1"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("setpoint"))
        .unwrap_or_default();
    assert!(
        row.contains("21.5") && row.contains("00D7"),
        "read back as 215 x 0.1: {out}"
    );
    let again = fieldgate()
        .args(["--config", path, "read", "tc-1", "setpoint"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("21.5"));
    for (args, why) in [
        (["tc-1", "setpoint", "500"], "outside"),
        (["tc-1", "temperature", "1"], "read-only"),
        (["tc-1", "setpoint", "true"], "expected a number"),
        (["tc-1", "nope", "1"], "no point"),
    ] {
        let bad = fieldgate()
            .args(["--config", path, "write"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
    let after = fieldgate()
        .args(["--config", path, "read", "tc-1", "setpoint"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&after.stdout).contains("21.5"),
        "nothing else was written"
    );
}

/// A TOML error on a line that holds a credential shows where, never the
/// secret itself.
#[test]
fn a_config_error_never_shows_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret.toml");
    std::fs::write(
        &path,
        "[gateway]\nid = \"gw\"\n[platform]\nhost = \"h\"\naccess_token = \"tok3n-abc\"\nproject_key = \"pr0ject-s3cret\" \"oops\"\n",
    )
    .unwrap();
    let out = fieldgate()
        .args(["--config", path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("secret.toml:6:"), "{stderr}");
    assert!(!stderr.contains("pr0ject-s3cret"), "{stderr}");
    assert!(stderr.contains("project_key = ********"), "{stderr}");
}

/// `demo` keeps its outbox in a private directory with an unpredictable
/// name, and removes it when it ends.
#[test]
fn demo_uses_a_private_temporary_directory() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut demo = Running(
        fieldgate()
            .arg("demo")
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(demo.0.stdout.take().unwrap()).lines();
    wait_for_line(&mut lines, Duration::from_secs(10), |l| {
        l.contains("attributes")
    })
    .expect("the demo runs");
    let dirs: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("fieldgate-demo-")
        })
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let name = dirs[0].file_name().to_string_lossy().into_owned();
    assert_ne!(
        name,
        format!("fieldgate-demo-{}", demo.0.id()),
        "not predictable from the pid"
    );
    let mode = dirs[0].metadata().unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "private");
    let pid = nix::unistd::Pid::from_raw(demo.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let _ = demo.0.wait();
    assert!(!tmp.path().join(&name).exists(), "removed at the end");
}

/// The unit allows the serial drivers a Raspberry Pi user meets, the
/// SC16IS75x RS-485 HATs (ttySC) among them, and nothing else.
#[test]
fn the_unit_allows_the_common_serial_drivers() {
    let unit = std::fs::read_to_string(repo("systemd/fieldgate.service")).unwrap();
    let allowed: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("DeviceAllow="))
        .collect();
    for driver in [
        "ttyS",
        "ttyUSB",
        "ttyACM",
        "ttyAMA",
        "ttySC",
        "ttyXRUSB",
        "ttyCH343USB",
    ] {
        assert!(
            allowed.contains(&format!("char-{driver} rw").as_str()),
            "{driver}: {allowed:?}"
        );
    }
    assert!(
        allowed.iter().all(|a| a.starts_with("char-tty")),
        "{allowed:?}"
    );
    assert!(unit.contains("DevicePolicy=closed"));
}

#[test]
fn buffer_reads_the_outbox_when_no_daemon_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo("config/fieldgate.toml"))
        .unwrap()
        .replace(
            "/var/lib/fieldgate",
            &dir.path().join("data").display().to_string(),
        );
    let path = dir.path().join("f.toml");
    std::fs::write(&path, config).unwrap();
    let out = fieldgate()
        .args(["--config", path.to_str().unwrap(), "buffer"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("messages held:  0"), "{stdout}");
    assert!(stdout.contains("of 67108864"), "{stdout}");
    assert!(stdout.contains("dropped so far: 0"), "{stdout}");
}

/// SPEC §3's transport keys: each broken rule is an error at the line of
/// the key that breaks it (the bus's own line when a key is missing).
#[test]
fn tcp_transport_rules_name_the_line_and_column() {
    let cases: [(&str, &str, &str); 12] = [
        (
            "transport = \"tcp\"\n>port = \"/dev/ttyUSB0\"",
            "",
            "a TCP bus has address",
        ),
        (
            "transport = \"tcp\"\n>address = \"192.168.1.50\"",
            "",
            "address must be host:port",
        ),
        (
            "transport = \"tcp\"\n>listen = \"0.0.0.0:9000\"",
            "",
            "listen is for dial-in DTUs",
        ),
        (
            "transport = \"rtu_over_tcp\"\naddress = \"10.0.0.2:8899\"\n>registration = \"A\"",
            "",
            "registration belongs with listen",
        ),
        (
            "transport = \"rtu_over_tcp\"\naddress = \"10.0.0.2:8899\"\n>listen = \"0.0.0.0:9000\"",
            "",
            "not both",
        ),
        (
            "transport = \"rtu_over_tcp\"\n>listen = \"0.0.0.0\"",
            "",
            "listen must be ip:port",
        ),
        (
            "transport = \"tcp\"\naddress = \"10.0.0.2:502\"\n>baud = 9600",
            "",
            "baud is a serial line setting",
        ),
        (
            "transport = \"rtu_over_tcp\"\nlisten = \"0.0.0.0:9000\"\n>heartbeat = \"hex:0G\"",
            "",
            "not hex digits",
        ),
        (">transport = \"udp\"", "", "unknown variant `udp`"),
        (
            "transport = \"rtu_over_tcp\"\n>address = \"10.0.0.2:8899\"",
            "transport = \"rtu_over_tcp\"\n>address = \"10.0.0.2:8899\"",
            "cannot share one connection",
        ),
        (
            "transport = \"rtu_over_tcp\"\nlisten = \"0.0.0.0:9000\"\nregistration = \"A\"",
            "transport = \"rtu_over_tcp\"\nlisten = \"0.0.0.0:9000\"",
            "need a registration each",
        ),
        ("transport = \"tcp\"", "", "a TCP bus needs address"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (first, second, message)) in cases.into_iter().enumerate() {
        let mut text = String::from("[gateway]\nid = \"gw\"\n");
        let mut marked = None;
        for (n, body) in [first, second].iter().enumerate() {
            if n == 1 && body.is_empty() {
                continue;
            }
            text += &format!("\n[[bus]]\nname = \"b{n}\"\n");
            if !body.contains('>') {
                // A missing key: the error is at the bus's `[[bus]]` line.
                marked = Some(text.lines().count() - 1);
            }
            for line in body.lines() {
                if let Some(key) = line.strip_prefix('>') {
                    if marked.is_none() || n == 1 {
                        marked = Some(text.lines().count() + 1);
                    }
                    text += &format!("{key}\n");
                } else {
                    text += &format!("{line}\n");
                }
            }
        }
        let path = dir.path().join(format!("case{i}.toml"));
        std::fs::write(&path, &text).unwrap();
        let out = fieldgate()
            .arg("--config")
            .arg(&path)
            .arg("check")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "case {i}: {stderr}");
        assert!(
            stderr.contains(message),
            "case {i}: {message:?} in {stderr}\n{text}"
        );
        let place = format!("{}:{}:", path.display(), marked.unwrap_or(0));
        let at = stderr.find(&place).map(|p| &stderr[p + place.len()..]);
        assert!(
            at.is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit())),
            "case {i}: expected {place}<column> in {stderr}\n{text}"
        );
    }
}

/// `simulate` serves a tcp bus on loopback and dials in as a DTU; `scan`
/// and `read` reach both through the binary.
#[test]
fn simulate_then_scan_and_read_over_tcp_and_a_dial_in_bus() {
    let listen = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = |plc: &str| {
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n\n[[bus]]\nname = \"plc\"\ntransport = \"tcp\"\naddress = \"{plc}\"\n\n[[bus]]\nname = \"dtu\"\ntransport = \"rtu_over_tcp\"\nlisten = \"127.0.0.1:{listen}\"\nregistration = \"DTU-1\"\nheartbeat = \"HB\"\n\n[[device]]\nname = \"p\"\nbus = \"plc\"\nunit = 3\npoll = \"1s\"\n[[device.point]]\nname = \"t\"\narea = \"holding\"\naddress = 0\ntype = \"u16\"\n\n[[device]]\nname = \"d\"\nbus = \"dtu\"\nunit = 4\npoll = \"1s\"\n[[device.point]]\nname = \"x\"\narea = \"holding\"\naddress = 0\ntype = \"u16\"\n",
            dir.path().join("data").display()
        )
    };
    let path = dir.path().join("tcp.toml");
    std::fs::write(&path, config("127.0.0.1:1")).unwrap();
    let path = path.to_str().unwrap().to_string();
    let (_sim, addr) = simulate(&path, "plc");
    std::fs::write(&path, config(&addr)).unwrap();

    let scan = fieldgate()
        .args(["--config", &path, "scan", "plc", "--units", "1-5"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&scan.stdout);
    assert!(
        report.contains("unit 3: answers") && report.contains("1 of 5 unit ids answered"),
        "{report}"
    );
    for device in ["p", "d"] {
        let read = fieldgate()
            .args(["--config", &path, "read", device])
            .output()
            .unwrap();
        assert_eq!(
            read.status.code(),
            Some(0),
            "{device}: {}{}",
            String::from_utf8_lossy(&read.stdout),
            String::from_utf8_lossy(&read.stderr)
        );
    }
}

/// `simulate` serves profile devices with plausible values (their `sim`
/// ranges) and answers `scan --identify` as the real models would;
/// `profiles` lists and shows the library.
#[test]
fn simulate_serves_profile_devices_that_scan_identifies() {
    let dir = tempfile::tempdir().unwrap();
    let config = |port: &str| {
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"{}\"\n\n[api]\nlisten = \"\"\n\n[[bus]]\nname = \"line\"\nport = \"{port}\"\n\n[[device]]\nname = \"main\"\nbus = \"line\"\nunit = 1\nprofile = \"eastron-sdm630\"\n\n[[device]]\nname = \"room\"\nbus = \"line\"\nunit = 2\nkey = \"room\"\nprofile = \"xy-md02\"\n",
            dir.path().join("data").display()
        )
    };
    let path = dir.path().join("fieldgate.toml");
    std::fs::write(&path, config("/dev/ttyUSB0")).unwrap();
    let path = path.to_str().unwrap().to_string();
    let (_sim, pty) = simulate(&path, "line");
    std::fs::write(&path, config(&pty)).unwrap();

    let read = fieldgate()
        .args(["--config", &path, "read", "main", "voltage_l1", "frequency"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&read.stdout);
    assert_eq!(read.status.code(), Some(0), "{table}");
    let value = |name: &str| -> f64 {
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{table}"));
        row.split_whitespace().nth(3).unwrap().parse().unwrap()
    };
    let (volts, hertz) = (value("voltage_l1"), value("frequency"));
    assert!((228.0..=234.0).contains(&volts), "{table}");
    assert!((49.9..=50.1).contains(&hertz), "{table}");

    let scan = fieldgate()
        .args([
            "--config",
            &path,
            "scan",
            "line",
            "--units",
            "1-3",
            "--identify",
        ])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&scan.stdout);
    assert_eq!(scan.status.code(), Some(0), "{report}");
    let unit = |n: u8| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("unit {n}: ")))
            .unwrap_or_else(|| panic!("no unit {n} in\n{report}"))
            .to_string()
    };
    assert!(
        unit(1).contains("eastron-sdm630 (Eastron SDM630-Modbus V2)"),
        "{report}"
    );
    assert!(unit(2).contains("matches profile xy-md02 ("), "{report}");
    assert!(report.contains("2 of 3 unit ids answered"), "{report}");

    let list = fieldgate()
        .args(["--config", &path, "profiles"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.status.code(), Some(0), "{listed}");
    for name in [
        "eastron-sdm120",
        "eastron-sdm230",
        "eastron-sdm630",
        "chint-ddsu666",
        "chint-dtsu666",
        "xy-md02",
    ] {
        assert!(listed.contains(name), "{listed}");
    }
    let one = fieldgate()
        .args(["--config", &path, "profiles", "eastron-sdm630"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&one.stdout);
    assert!(
        shown.contains("source:   Eastron SDM630 Modbus protocol"),
        "{shown}"
    );
    let row = shown
        .lines()
        .find(|l| l.starts_with("voltage_l1 "))
        .unwrap_or_else(|| panic!("{shown}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "voltage_l1",
            "input",
            "0",
            "(0x0000)",
            "30001",
            "f32",
            "ABCD",
            "1",
            "V",
            "r"
        ]
    );
    let missing = fieldgate()
        .args(["--config", &path, "profiles", "nope"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no profile \"nope\""));
}
