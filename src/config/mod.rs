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
pub use profile::{Library, LoadError};

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|io| ConfigError::Read {
        path: path.to_path_buf(),
        io,
    })?;
    parse(path, &text)
}

/// `[gateway] profile_dir` of the config at `path`, read leniently (for
/// `profiles`, which must work with a config that is missing or broken).
pub fn profile_dir_of(path: &Path) -> Option<std::path::PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let dir = table.get("gateway")?.get("profile_dir")?.as_str()?;
    Some(std::path::PathBuf::from(dir))
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

    /// A config whose one device `d` uses `device` keys (profile, points,
    /// own points), with `[gateway] profile_dir` if given.
    fn with_profile(profile_dir: Option<&Path>, device: &str) -> String {
        let dir = profile_dir.map_or(String::new(), |d| {
            format!("profile_dir = \"{}\"\n", d.display())
        });
        format!(
            "[gateway]\nid = \"gw\"\n{dir}\n[[bus]]\nname = \"b\"\nport = \"/dev/null\"\n\n[[device]]\nname = \"d\"\nbus = \"b\"\nunit = 1\n{device}\n"
        )
    }

    #[test]
    fn a_device_takes_its_points_from_a_profile() {
        let c = parse(
            Path::new("t.toml"),
            &with_profile(None, "profile = \"eastron-sdm630\""),
        )
        .unwrap();
        let d = &c.devices[0];
        assert_eq!(d.profile.as_ref().unwrap().name, "eastron-sdm630");
        let v = d.point("voltage_l1").unwrap();
        assert_eq!((v.area, v.address, v.kind), (Area::Input, 0, Kind::F32));
        assert!(d.points.len() > 20);

        let some = with_profile(
            None,
            "profile = \"eastron-sdm630\"\npoints = [\"power_total\", \"voltage_l1\"]\n\n[[device.point]]\nname = \"demand\"\narea = \"input\"\naddress = 0x54\ntype = \"f32\"",
        );
        let c = parse(Path::new("t.toml"), &some).unwrap();
        let names: Vec<&str> = c.devices[0]
            .points
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        // The profile's order, then the device's own.
        assert_eq!(names, ["voltage_l1", "power_total", "demand"]);
    }

    #[test]
    fn profile_rules_are_enforced() {
        let point = "[[device.point]]\nname = \"voltage_l1\"\narea = \"input\"\naddress = 0\ntype = \"u16\"";
        for (device, expect, line_col) in [
            (
                "profile = \"nope\"",
                "no profile \"nope\" (searched",
                (12, 11),
            ),
            ("profile = \"../x\"", "may only contain", (12, 11)),
            ("points = [\"a\"]", "needs profile", (12, 10)),
            (
                "profile = \"xy-md02\"\npoints = []",
                "points is empty",
                (13, 10),
            ),
            (
                "profile = \"xy-md02\"\npoints = [\"temperature\", \"wind\"]",
                "has no point \"wind\" (it has: temperature, humidity",
                (13, 26),
            ),
            (
                "profile = \"xy-md02\"\npoints = [\"humidity\", \"humidity\"]",
                "duplicate point",
                (13, 23),
            ),
            (
                &format!("profile = \"eastron-sdm120\"\n\n{point}"),
                "already defined by profile \"eastron-sdm120\"",
                (15, 8),
            ),
            ("", "has no points", (9, 8)),
        ] {
            let text = with_profile(None, device);
            let e = error_of(&text);
            assert!(e.message.contains(expect), "{device}: {}", e.message);
            assert_eq!((e.line, e.column), line_col, "{device}: {e}");
        }
        // Leaving the profile's point out makes room for one of its own.
        let own = with_profile(
            None,
            &format!("profile = \"eastron-sdm120\"\npoints = [\"power_total\"]\n\n{point}"),
        );
        parse(Path::new("t.toml"), &own).unwrap();
        // Two devices of one profile on one platform device collide, named
        // at the second device's profile.
        let twice = format!(
            "{}\n[[device]]\nname = \"e\"\nbus = \"b\"\nunit = 2\nprofile = \"xy-md02\"\n",
            with_profile(None, "profile = \"xy-md02\"")
        );
        let e = error_of(&twice);
        assert!(
            e.message.contains("already defined by another device"),
            "{e}"
        );
        assert_eq!(e.line, 18, "{e}");
        let e = error_of(&with_profile(
            Some(Path::new("/nonexistent/profiles")),
            "profile = \"xy-md02\"",
        ));
        assert!(e.message.contains("is not a directory"), "{e}");
        let e = error_of(&MINIMAL.replace(
            "type = \"u16\"",
            "type = \"bool\"\nsim = { min = 0.0, max = 1.0 }",
        ));
        assert!(e.message.contains("number points"), "{e}");
        let e = error_of(&MINIMAL.replace(
            "type = \"u16\"",
            "type = \"u16\"\nsim = { min = 2.0, max = 1.0 }",
        ));
        assert!(e.message.contains("min < max"), "{e}");
    }

    #[test]
    fn profile_dir_comes_first_and_a_broken_profile_is_named_with_the_config() {
        let dir = tempfile::tempdir().unwrap();
        // A site's own xy-md02 replaces the shipped one.
        let own = "[profile]\nname = \"xy-md02\"\nvendor = \"v\"\nmodel = \"m\"\nsource = \"s\"\n\n[[point]]\nname = \"t\"\narea = \"input\"\naddress = 7\ntype = \"i16\"\n";
        std::fs::write(dir.path().join("xy-md02.toml"), own).unwrap();
        let c = parse(
            Path::new("t.toml"),
            &with_profile(Some(dir.path()), "profile = \"xy-md02\""),
        )
        .unwrap();
        assert_eq!(c.devices[0].points[0].address, 7);
        assert_eq!(
            c.devices[0].profile.as_ref().unwrap().path,
            dir.path().join("xy-md02.toml")
        );

        // A site's terse profile: points only.
        let terse = "[[point]]\nname = \"t\"\narea = \"input\"\naddress = 3\ntype = \"u16\"\n";
        std::fs::write(dir.path().join("acme.toml"), terse).unwrap();
        let c = parse(
            Path::new("t.toml"),
            &with_profile(Some(dir.path()), "profile = \"acme\""),
        )
        .unwrap();
        assert_eq!(c.devices[0].profile.as_ref().unwrap().name, "acme");

        let broken = own.replace("type = \"i16\"", "type = \"i16\"\nwritable = true");
        std::fs::write(dir.path().join("xy-md02.toml"), &broken).unwrap();
        let text = with_profile(Some(dir.path()), "profile = \"xy-md02\"");
        let e = parse(Path::new("t.toml"), &text).unwrap_err();
        let shown = e.to_string();
        let file = dir.path().join("xy-md02.toml");
        assert!(
            shown.starts_with(&format!("{}:12:12: ", file.display())),
            "{shown}"
        );
        assert!(shown.contains("read-only"), "{shown}");
        assert!(
            shown.contains("t.toml:13:11: profile \"xy-md02\" is used here"),
            "{shown}"
        );

        for (bad, expect) in [
            (own.replace("name = \"xy-md02\"", "name = \"other\""), "file name"),
            (own.replace("\n[[point]]", "\nbaud = 1\n[[point]]"), "baud must be"),
            (format!("{own}\n[identify]\narea = \"input\"\naddress = 7\ntype = \"i16\"\nrange = [5.0, 1.0]\n"), "low <= high"),
            (format!("{own}\n[identify]\narea = \"coil\"\naddress = 7\ntype = \"bool\"\nrange = [1.0, 1.0]\n"), "reads a number"),
            (own.replace("[[point]]", "[[points]]"), "unknown field"),
        ] {
            std::fs::write(dir.path().join("xy-md02.toml"), &bad).unwrap();
            let shown = parse(Path::new("t.toml"), &text).unwrap_err().to_string();
            assert!(shown.contains(expect), "{expect}: {shown}");
            assert!(shown.starts_with(&file.display().to_string()), "{shown}");
        }
    }
}
