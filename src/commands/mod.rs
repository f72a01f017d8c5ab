//! The CLI subcommands other than `run`. Each takes a loaded config and
//! prints for a person; errors go back to `main` for the exit code.

pub mod buffer;
pub mod check;
#[cfg(feature = "sim")]
pub mod demo;
pub mod profiles;
pub mod read;
pub mod scan;
#[cfg(feature = "sim")]
pub mod simulate;
pub mod trace;
pub mod write;

use std::fmt::Write as _;
use std::time::Duration;

/// `1.2 ms`, `350 ms`, `2.5 s`: durations for people.
pub fn human(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{:.2} s", ms / 1000.0)
    }
}

/// Registers as hex words, `0x1234 0xABCD`.
pub fn hex_words(regs: &[u16]) -> String {
    let mut out = String::new();
    for (i, r) in regs.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{r:04X}");
    }
    out
}

/// Rows as left-aligned columns two spaces apart (the last unpadded).
pub fn table<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.as_ref().get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells = row.as_ref();
        for (c, cell) in cells.iter().enumerate() {
            if c + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ", w = widths[c]);
            }
        }
        out.truncate(out.trim_end_matches(' ').len());
        out.push('\n');
    }
    out
}
