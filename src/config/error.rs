//! Config errors: a message tied to file, line and column, rendered like a
//! compiler's, with credentials masked in the excerpt.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is part of the message, not a source: `{:#}` would
    /// print it twice.
    #[error("cannot read {}: {io}", path.display())]
    Read { path: PathBuf, io: std::io::Error },
    #[error("{0}")]
    Invalid(Located),
    /// A profile the config names is broken; `used` is where it is named.
    #[error("{error}\n{used}")]
    InProfile {
        error: Box<ConfigError>,
        used: Located,
    },
}

/// A message tied to a place in the source, rendered as
/// `file:line:col: error: message` followed by the offending line.
#[derive(Debug)]
pub struct Located {
    pub path: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
    source_line: String,
}

impl Located {
    pub(super) fn new(path: &Path, text: &str, span: Range<usize>, message: String) -> Self {
        let start = span.start.min(text.len());
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = text[..start].matches('\n').count() + 1;
        let column = text[line_start..start].chars().count() + 1;
        let source_line = mask_secrets(text[line_start..].lines().next().unwrap_or_default());
        Located {
            path: path.to_path_buf(),
            line,
            column,
            message,
            source_line,
        }
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )?;
        if !self.source_line.trim().is_empty() {
            let gutter = self.line.to_string().len();
            write!(
                f,
                "\n{:gutter$} |\n{} | {}\n{:gutter$} | {:>col$}",
                "",
                self.line,
                self.source_line,
                "",
                "^",
                col = self.column
            )?;
        }
        Ok(())
    }
}

/// Keys whose values are credentials.
const SECRET_KEYS: [&str; 5] = [
    "access_token",
    "project_key",
    "password",
    "token",
    "username",
];

/// `line` with the value of any credential key replaced by `********`, so
/// an error excerpt (in a terminal, a journal, a support ticket) never
/// shows a secret.
pub(super) fn mask_secrets(line: &str) -> String {
    for key in SECRET_KEYS {
        let mut from = 0;
        while let Some(at) = line[from..].find(key).map(|i| i + from) {
            let before_ok = line[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            let rest = line[at + key.len()..].trim_start();
            if before_ok && rest.starts_with('=') {
                return format!("{}{key} = ********", &line[..at]);
            }
            from = at + key.len();
        }
    }
    line.to_string()
}

/// A rule violation at a byte range of the source being converted; `cause`
/// is the error of another file (a profile) this place refers to.
#[derive(Debug)]
pub(super) struct Violation {
    pub(super) span: Range<usize>,
    pub(super) message: String,
    pub(super) cause: Option<Box<ConfigError>>,
}

/// Deserializes `text` (a config or a profile) and converts it, placing any
/// error in `path` by line and column.
pub(super) fn parse_with<R: DeserializeOwned, T>(
    path: &Path,
    text: &str,
    convert: impl FnOnce(R) -> Result<T, Violation>,
) -> Result<T, ConfigError> {
    let raw: R = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        ConfigError::Invalid(Located::new(
            path,
            text,
            span,
            e.message().trim().to_string(),
        ))
    })?;
    convert(raw).map_err(|v| {
        let here = Located::new(path, text, v.span, v.message);
        match v.cause {
            Some(error) => ConfigError::InProfile { error, used: here },
            None => ConfigError::Invalid(here),
        }
    })
}
