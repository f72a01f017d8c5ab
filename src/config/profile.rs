//! The device profile library (SPEC §11): where profile files are found and
//! reading one. The search path is `[gateway] profile_dir`, then
//! `/etc/fieldgate/profiles/`, then the package's
//! `/usr/share/fieldgate/profiles/`; the first file named `<name>.toml`
//! wins. The shipped library (`config/profiles/` in the source tree) is also
//! built into the binary, last on the path, so a binary run from anywhere
//! (`cargo run`, a copied executable) knows the same profiles as the package.

use std::path::{Path, PathBuf};

use super::error::{self, ConfigError};
use super::model::DeviceProfile;
use super::raw::RawProfileFile;

/// The system directories, after `profile_dir`.
const SYSTEM_DIRS: [&str; 2] = ["/etc/fieldgate/profiles", "/usr/share/fieldgate/profiles"];

/// The shipped library, compiled in from `config/profiles/`.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "chint-ddsu666",
        include_str!("../../config/profiles/chint-ddsu666.toml"),
    ),
    (
        "chint-dtsu666",
        include_str!("../../config/profiles/chint-dtsu666.toml"),
    ),
    (
        "eastron-sdm120",
        include_str!("../../config/profiles/eastron-sdm120.toml"),
    ),
    (
        "eastron-sdm230",
        include_str!("../../config/profiles/eastron-sdm230.toml"),
    ),
    (
        "eastron-sdm630",
        include_str!("../../config/profiles/eastron-sdm630.toml"),
    ),
    (
        "eastron-sdm72d",
        include_str!("../../config/profiles/eastron-sdm72d.toml"),
    ),
    (
        "peacefair-pzem016",
        include_str!("../../config/profiles/peacefair-pzem016.toml"),
    ),
    (
        "xy-md02",
        include_str!("../../config/profiles/xy-md02.toml"),
    ),
];

/// Why a profile could not be had.
#[derive(Debug)]
pub enum LoadError {
    NotFound,
    Broken(ConfigError),
}

/// The profile search path of one config.
#[derive(Debug, Clone)]
pub struct Library {
    dirs: Vec<PathBuf>,
}

impl Library {
    pub fn new(profile_dir: Option<&Path>) -> Self {
        let dirs = profile_dir
            .map(Path::to_path_buf)
            .into_iter()
            .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
            .collect();
        Self { dirs }
    }

    /// The search path, for a person.
    pub fn describe(&self) -> String {
        let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
        format!("{}, then the built-in library", dirs.join(", "))
    }

    /// The profile `name` from the first place on the path that has it; a
    /// name that is not letters, digits, `_` and `-` is none (it names a file).
    pub fn load(&self, name: &str) -> Result<DeviceProfile, LoadError> {
        if !is_name(name) {
            return Err(LoadError::NotFound);
        }
        for dir in &self.dirs {
            let path = dir.join(format!("{name}.toml"));
            match std::fs::read_to_string(&path) {
                Ok(text) => return parse(&path, &text, name).map_err(LoadError::Broken),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(io) => return Err(LoadError::Broken(ConfigError::Read { path, io })),
            }
        }
        match BUILT_IN.iter().find(|(n, _)| *n == name) {
            Some((_, text)) => parse(&built_in_path(name), text, name).map_err(LoadError::Broken),
            None => Err(LoadError::NotFound),
        }
    }

    /// Every profile on the path, by name, each from the place that wins;
    /// a broken one is its error.
    pub fn all(&self) -> Vec<Result<DeviceProfile, ConfigError>> {
        let mut names: Vec<String> = BUILT_IN.iter().map(|(n, _)| n.to_string()).collect();
        for dir in &self.dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let stem = path.file_stem().and_then(|s| s.to_str());
                if let (Some(stem), Some("toml")) =
                    (stem, path.extension().and_then(|e| e.to_str()))
                {
                    if is_name(stem) {
                        names.push(stem.to_string());
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        names
            .iter()
            .filter_map(|name| match self.load(name) {
                Ok(profile) => Some(Ok(profile)),
                Err(LoadError::Broken(e)) => Some(Err(e)),
                Err(LoadError::NotFound) => None,
            })
            .collect()
    }

    /// The profiles that load; each broken one is logged and left out
    /// (what `scan --identify` matches against).
    pub fn usable(&self) -> Vec<DeviceProfile> {
        self.all()
            .into_iter()
            .filter_map(|profile| {
                profile
                    .map_err(|e| log::warn!("profile left out: {e}"))
                    .ok()
            })
            .collect()
    }
}

/// Whether `text` can name a profile (and so a file in a directory).
fn is_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// How a built-in profile is named in messages and listings.
fn built_in_path(name: &str) -> PathBuf {
    PathBuf::from(format!("(built in) config/profiles/{name}.toml"))
}

fn parse(path: &Path, text: &str, name: &str) -> Result<DeviceProfile, ConfigError> {
    error::parse_with(path, text, |raw: RawProfileFile| {
        raw.into_profile(name, path.to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_library_is_the_shipped_directory() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/profiles");
        let mut shipped: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let path = e.path();
                (path.extension()? == "toml")
                    .then(|| path.file_stem()?.to_str().map(String::from))?
            })
            .collect();
        shipped.sort();
        let built_in: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        assert_eq!(shipped, built_in);
        for (name, text) in BUILT_IN {
            let on_disk = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(&on_disk, text);
            let profile = parse(&built_in_path(name), text, name).unwrap_or_else(|e| panic!("{e}"));
            for (field, value) in [
                ("vendor", &profile.vendor),
                ("model", &profile.model),
                ("description", &profile.description),
                ("source", &profile.source),
            ] {
                assert!(!value.trim().is_empty(), "{name}: no {field}");
            }
            assert!(profile.identify.is_some(), "{name}: no [identify]");
            assert!(profile.baud.is_some(), "{name}: no factory baud");
        }
    }
}
