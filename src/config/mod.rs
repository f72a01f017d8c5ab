//! Configuration: reads the TOML register map and the device profiles it
//! names, applies defaults and every rule of SPEC §3 and §11, and hands out
//! a [`Config`] that is valid by construction. Errors point at file, line
//! and column, like a compiler's.

mod error;
mod model;
mod profile;
mod raw;

use std::path::Path;

pub use error::{ConfigError, Located};
pub use model::*;
pub use profile::Library;

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|io| ConfigError::Read {
        path: path.to_path_buf(),
        io,
    })?;
    parse(path, &text)
}

/// Validates config `text`; `path` is only used in messages. The profiles
/// it names are read from the search path of its `[gateway] profile_dir`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    error::parse_with(path, text, |raw: raw::RawConfig| {
        let library = Library::new(raw.profile_dir());
        raw.into_config(&library)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use error::mask_secrets;

    const MINIMAL: &str = r#"
[gateway]
id = "gw"

[[bus]]
name = "b"
port = "/dev/null"

[[device]]
name = "d"
bus = "b"
unit = 1

[[device.point]]
name = "v"
area = "input"
address = 0
type = "u16"
"#;

    fn error_of(text: &str) -> Located {
        match parse(Path::new("t.toml"), text) {
            Err(ConfigError::Invalid(l)) => l,
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(Path::new("t.toml"), MINIMAL).unwrap();
        let bus = &c.buses[0];
        assert_eq!(bus.baud, 9600);
        assert_eq!(bus.timeout.as_millis(), 500);
        assert_eq!(bus.retries, 1);
        assert_eq!(c.devices[0].report, Report::Always);
        assert_eq!(c.buffer.max_bytes, 64 << 20);
        assert_eq!(c.gateway.data_dir, Path::new("/var/lib/fieldgate"));
    }

    #[test]
    fn errors_name_line_and_column() {
        let text = MINIMAL.replace("unit = 1", "unit = 0");
        let e = error_of(&text);
        assert_eq!((e.line, e.column), (12, 8));
        assert!(e.message.contains("1..247"), "{}", e.message);
        let shown = e.to_string();
        assert!(shown.starts_with("t.toml:12:8: "), "{shown}");
        assert!(shown.contains("unit = 0"), "{shown}");
    }

    #[test]
    fn every_rule_is_enforced() {
        let cases: &[(&str, &str, &str)] = &[
            ("type = \"u16\"", "type = \"u16\"\nfoo = 1", "unknown field"),
            ("bus = \"b\"", "bus = \"nope\"", "unknown bus"),
            ("area = \"input\"", "area = \"coil\"", "must be \"bool\""),
            (
                "type = \"u16\"",
                "type = \"u16\"\nwritable = true",
                "read-only",
            ),
            ("address = 0", "address = 65535\n", "past the end"),
            ("address = 0", "address = -1", "outside 0..65535"),
            ("name = \"v\"", "name = \"1v\"", "must match"),
            ("type = \"u16\"", "type = \"string\"", "needs length"),
            (
                "type = \"u16\"",
                "type = \"u16\"\nbit = 2",
                "type = \"bool\"",
            ),
            ("poll = \"x\"", "", ""),
        ];
        for (from, to, expect) in cases {
            if expect.is_empty() {
                continue;
            }
            let text = MINIMAL.replace(from, to);
            let address_case = to.contains("65535") && !text.contains("u32");
            let text = if address_case {
                text.replace("type = \"u16\"", "type = \"u32\"")
            } else {
                text
            };
            let e = error_of(&text);
            assert!(e.message.contains(expect), "{to:?}: {}", e.message);
        }
    }

    #[test]
    fn durations_sizes_and_enums_are_checked() {
        let e = error_of(&MINIMAL.replace("unit = 1", "unit = 1\npoll = \"fast\""));
        assert!(e.message.contains("invalid duration"), "{}", e.message);
        let e = error_of(&format!("{MINIMAL}\n[buffer]\nmax_bytes = \"lots\"\n"));
        assert!(e.message.contains("invalid size"), "{}", e.message);
        let e = error_of(&MINIMAL.replace(
            "port = \"/dev/null\"",
            "port = \"/dev/null\"\nparity = \"mark\"",
        ));
        assert!(e.message.contains("unknown variant"), "{}", e.message);
    }

    #[test]
    fn attributes_are_unique_per_platform_device() {
        let second = r#"
[[device]]
name = "d2"
bus = "b"
unit = 2

[[device.point]]
name = "v"
area = "input"
address = 0
type = "u16"
"#;
        let e = error_of(&format!("{MINIMAL}{second}"));
        assert!(e.message.contains("already defined"), "{}", e.message);
        // The same attribute on a sub-device is a different platform device.
        let keyed = second.replace("unit = 2", "unit = 2\nkey = \"k\"");
        parse(Path::new("t.toml"), &format!("{MINIMAL}{keyed}")).unwrap();
    }

    #[test]
    fn secrets_never_appear_in_an_error_excerpt() {
        let text = "[gateway]\nid = \"gw\"\n[platform]\nhost = \"h\"\naccess_token = \"abc\"\nproject_key = \"s3cr3t\" x\n";
        let e = error_of(text);
        let shown = e.to_string();
        assert_eq!(e.line, 6, "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("project_key = ********"), "{shown}");
        assert_eq!(mask_secrets("  password=\"p\""), "  password = ********");
        assert_eq!(mask_secrets("tokens = 1"), "tokens = 1");
        assert_eq!(
            mask_secrets("x = { token = \"t\" }"),
            "x = { token = ********"
        );
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        for ca in [dir.path().join("missing.pem"), empty] {
            let text = format!(
                "[gateway]\nid = \"gw\"\n[platform]\nhost = \"h\"\naccess_token = \"a\"\nproject_key = \"k\"\ntls = true\nca_file = \"{}\"\n",
                ca.display()
            );
            let e = error_of(&text);
            assert_eq!((e.line, e.column), (8, 11), "{e}");
            assert!(e.message.contains(&ca.display().to_string()), "{e}");
        }
    }

    #[test]
    fn baud_and_durations_are_bounded() {
        let e =
            error_of(&MINIMAL.replace("port = \"/dev/null\"", "port = \"/dev/null\"\nbaud = 110"));
        assert!(e.message.contains("300"), "{}", e.message);
        let e = error_of(&MINIMAL.replace("unit = 1", "unit = 1\npoll = \"1000000000years\""));
        assert!(e.message.contains("at most"), "{}", e.message);
        let e = error_of(&MINIMAL.replace(
            "port = \"/dev/null\"",
            "port = \"/dev/null\"\ntimeout = \"2h\"",
        ));
        assert!(e.message.contains("at most 1m"), "{}", e.message);
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fieldgate.toml");
        let c = load(&path).unwrap();
        assert!(!c.devices.is_empty());
    }

    #[test]
    fn the_api_section_is_checked() {
        let api = |body: &str| format!("[api]\n{body}\n{MINIMAL}");
        let ok = parse(Path::new("t.toml"), MINIMAL).unwrap();
        assert_eq!(ok.api, Api::default());
        assert_eq!(
            ok.api.listen.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:8480")
        );
        let off = parse(Path::new("t.toml"), &api("listen = \"\"")).unwrap();
        assert_eq!(off.api.listen, None);
        let v6 = parse(Path::new("t.toml"), &api("listen = \"[::1]:9000\"")).unwrap();
        assert_eq!(v6.api.token, None);
        // Beyond loopback without a token: an error at the listen value.
        let e = error_of(&api("listen = \"0.0.0.0:8480\""));
        assert_eq!((e.line, e.column), (2, 10));
        assert!(e.message.contains("set [api] token"), "{}", e.message);
        parse(
            Path::new("t.toml"),
            &api("listen = \"0.0.0.0:8480\"\ntoken = \"a-long-token\""),
        )
        .unwrap();
        for (body, expect) in [
            ("listen = \"localhost\"", "not an address:port"),
            ("token = \"\"", "must not be empty"),
            ("token = \"two words\"", "no spaces"),
            ("token = \"semi;colon\"", "printable ASCII"),
            ("port = 1", "unknown field"),
        ] {
            let e = error_of(&api(body));
            assert!(e.message.contains(expect), "{body}: {}", e.message);
            assert_eq!(e.line, 2, "{body}");
        }
    }

    #[test]
    fn stats_is_a_duration_and_zero_turns_it_off() {
        let platform = |stats: &str| {
            format!("{MINIMAL}\n[platform]\nhost = \"h\"\naccess_token = \"a\"\nproject_key = \"k\"\nstats = \"{stats}\"\n")
        };
        let on = parse(Path::new("t.toml"), &platform("60s")).unwrap();
        assert_eq!(
            on.platform.and_then(|p| p.stats),
            Some(std::time::Duration::from_secs(60))
        );
        let off = parse(Path::new("t.toml"), &platform("0s")).unwrap();
        assert_eq!(off.platform.and_then(|p| p.stats), None);
        let e = error_of(&platform("often"));
        assert!(e.message.contains("invalid duration"), "{}", e.message);
        let e = error_of(&platform("2d"));
        assert!(e.message.contains("stats"), "{}", e.message);
    }

    #[test]
    fn labels_and_alarms_are_checked() {
        let point =
            |extra: &str| MINIMAL.replace("type = \"u16\"", &format!("type = \"u16\"\n{extra}"));
        let ok = parse(
            Path::new("t.toml"),
            &point("labels = { 0 = \"off\", 1 = \"on\" }\nalarm = { above = 10.0, hysteresis = 1.0, after = \"5s\" }"),
        )
        .unwrap();
        let p = &ok.devices[0].points[0];
        assert_eq!(
            p.labels,
            vec![(0, "off".to_string()), (1, "on".to_string())]
        );
        assert_eq!(
            p.alarm,
            Some(Alarm::Range {
                above: Some(10.0),
                below: None,
                hysteresis: 1.0,
                after: std::time::Duration::from_secs(5)
            })
        );
        for (extra, expect) in [
            ("labels = { 0 = \"off\" }\nscale = 0.1", "integer point"),
            ("labels = { x = \"off\" }", "not an integer"),
            ("labels = { 0 = \"off\", 1 = \"off\" }", "twice"),
            ("labels = { 0 = \"5\" }", "not a number"),
            ("labels = {}", "empty"),
            ("alarm = { when = true }", "for bool points"),
            ("alarm = { hysteresis = 1.0 }", "needs above, below"),
            ("alarm = { above = 1.0, below = 2.0 }", "greater than below"),
            (
                "alarm = { above = 10.0, below = 0.0, hysteresis = 5.0 }",
                "less than half",
            ),
            ("alarm = { above = 1.0, hysteresis = -1.0 }", ">= 0"),
            ("alarm = { above = 1.0, after = \"2d\" }", "at most 24h"),
            ("alarm = { above = 1.0, later = 1 }", "unknown field"),
        ] {
            let e = error_of(&point(extra));
            assert!(e.message.contains(expect), "{extra}: {}", e.message);
        }
        let coil = MINIMAL
            .replace("area = \"input\"", "area = \"coil\"")
            .replace("type = \"u16\"", "type = \"bool\"");
        let e = error_of(&coil.replace(
            "type = \"bool\"",
            "type = \"bool\"\nalarm = { above = 1.0 }",
        ));
        assert!(e.message.contains("for number points"), "{}", e.message);
        let e =
            error_of(&coil.replace("type = \"bool\"", "type = \"bool\"\nlabels = { 0 = \"a\" }"));
        assert!(e.message.contains("integer point"), "{}", e.message);
        parse(
            Path::new("t.toml"),
            &coil.replace(
                "type = \"bool\"",
                "type = \"bool\"\nalarm = { when = false, after = \"0s\" }",
            ),
        )
        .unwrap();
    }
}
