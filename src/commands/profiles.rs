//! `fieldgate profiles [NAME]`: the device profiles on the config's search
//! path (SPEC §11), or one of them point by point, with the maker's
//! document it was transcribed from.

use std::path::Path;

use crate::commands::table;
use crate::config::{self, DeviceProfile, Library, Parity, Point};
use crate::Usage;

/// Lists the profiles, or shows `name`. A broken profile file fails the
/// listing (exit 2) after the others are shown.
pub fn run(config_path: &Path, name: Option<&str>) -> anyhow::Result<()> {
    let library = Library::new(config::profile_dir_of(config_path).as_deref());
    match name {
        Some(name) => match library.load(name) {
            Ok(profile) => {
                print!("{}", show(&profile));
                Ok(())
            }
            Err(config::LoadError::Broken(e)) => Err(e.into()),
            Err(config::LoadError::NotFound) => Err(Usage(format!(
                "no profile {} (searched {})",
                crate::text::quote(name),
                library.describe()
            ))
            .into()),
        },
        None => {
            let (profiles, broken): (Vec<_>, Vec<_>) =
                library.all().into_iter().partition(Result::is_ok);
            let mut rows = vec![[
                "NAME",
                "VENDOR",
                "MODEL",
                "POINTS",
                "LINE",
                "FROM",
                "DESCRIPTION",
            ]
            .map(String::from)];
            for profile in profiles.into_iter().flatten() {
                rows.push([
                    profile.name.clone(),
                    profile.vendor.clone(),
                    profile.model.clone(),
                    profile.points.len().to_string(),
                    line(&profile),
                    origin(&profile),
                    profile.description.clone(),
                ]);
            }
            print!("{}", table(&rows));
            println!(
                "`fieldgate profiles NAME` shows one; searched {}",
                library.describe()
            );
            // Every broken file is named; the first is the error.
            let mut errors = broken.into_iter().filter_map(Result::err);
            match errors.next() {
                Some(first) => {
                    for e in errors {
                        eprintln!("error: {e}");
                    }
                    Err(first.into())
                }
                None => Ok(()),
            }
        }
    }
}

/// The factory line settings, `9600 8N1`.
fn line(profile: &DeviceProfile) -> String {
    let parity = match profile.parity {
        Some(Parity::None) | None => "N",
        Some(Parity::Even) => "E",
        Some(Parity::Odd) => "O",
    };
    match profile.baud {
        Some(baud) => format!("{baud} 8{parity}1"),
        None => "-".into(),
    }
}

/// The directory it was found in, or "built in".
fn origin(profile: &DeviceProfile) -> String {
    if profile.path.is_relative() {
        "built in".into()
    } else {
        profile
            .path
            .parent()
            .map_or_else(String::new, |d| d.display().to_string())
    }
}

/// The register number the makers' manuals use: 00001 coils, 10001
/// discrete inputs, 30001 input registers, 40001 holding registers (the
/// 0-based address plus one).
fn register_number(point: &Point) -> String {
    let base = match point.area {
        config::Area::Coil => 1,
        config::Area::Discrete => 10_001,
        config::Area::Input => 30_001,
        config::Area::Holding => 40_001,
    };
    format!("{:05}", base + u32::from(point.address))
}

/// One profile: its header, then a row per point.
fn show(profile: &DeviceProfile) -> String {
    let mut out = format!(
        "{}: {} {}{}\nsource:   {}\nfile:     {}\nline:     {} (factory setting)\n",
        profile.name,
        profile.vendor,
        profile.model,
        if profile.description.is_empty() {
            String::new()
        } else {
            format!(", {}", profile.description)
        },
        profile.source,
        profile.path.display(),
        line(profile),
    );
    if let Some(identify) = &profile.identify {
        let p = &identify.point;
        out.push_str(&format!(
            "identify: {} {} (0x{:04X}, {}) {}, {} to {}\n",
            p.area,
            p.address,
            p.address,
            register_number(p),
            p.kind,
            identify.range.0,
            identify.range.1
        ));
    }
    out.push('\n');
    let mut rows = vec![[
        "POINT", "AREA", "ADDRESS", "REGISTER", "TYPE", "ORDER", "SCALE", "UNIT", "ACCESS",
    ]
    .map(String::from)];
    for p in &profile.points {
        let scale = if p.offset == 0.0 {
            p.scale.to_string()
        } else {
            format!("{} + {}", p.scale, p.offset)
        };
        rows.push([
            p.name.clone(),
            p.area.to_string(),
            format!("{} (0x{:04X})", p.address, p.address),
            register_number(p),
            match p.kind {
                config::Kind::RegisterBit(bit) => format!("bool bit {bit}"),
                config::Kind::String { len } => format!("string[{len}]"),
                kind => kind.to_string(),
            },
            if p.kind.width() > 1 && !p.area.is_bits() {
                format!("{:?}", p.order).to_uppercase()
            } else {
                String::new()
            },
            scale,
            p.unit.clone().unwrap_or_default(),
            if p.writable { "rw" } else { "r" }.into(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}
