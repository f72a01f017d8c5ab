//! Text that came from the network (topics, methods, attribute names), made
//! safe to put in a log line, an event or a reply: quoted, at most
//! [`MAX_CHARS`] characters, control and invisible formatting characters
//! escaped. Whatever a peer sends, what we write about it stays short, so a
//! hostile name can neither forge log lines nor grow an uplink message past
//! the broker's packet limit. `{:?}` is never used on such text: its escapes
//! grow the text up to sixfold.

use std::fmt::Write as _;

/// Characters of network text kept in a message, escapes included.
pub const MAX_CHARS: usize = 64;

/// `text` in double quotes, escaped and cut to [`MAX_CHARS`] (`…` marks a
/// cut): for log lines.
pub fn quote(text: &str) -> String {
    format!("\"{}\"", escape(text, true))
}

/// `text` escaped and cut like [`quote`], without quotes: for a JSON string
/// field of an event or reply (JSON adds its own quoting).
pub fn clip(text: &str) -> String {
    escape(text, false)
}

fn escape(text: &str, quotes: bool) -> String {
    let mut out = String::with_capacity(MAX_CHARS + 8);
    let mut used = 0;
    for c in text.chars() {
        let mut piece = String::new();
        match c {
            '"' if quotes => piece.push_str("\\\""),
            '\\' if quotes => piece.push_str("\\\\"),
            c if invisible(c) => {
                let _ = write!(piece, "\\u{{{:x}}}", u32::from(c));
            }
            c => piece.push(c),
        }
        used += piece.chars().count();
        if used > MAX_CHARS {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Control characters (C0, DEL, C1) and the formatting characters that
/// change how surrounding text is shown (zero-width, bidirectional).
fn invisible(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

/// Hex text (any spacing, either case) to bytes.
pub fn from_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() % 2 == 1 {
        return Err("an odd number of hex digits".into());
    }
    digits
        .chunks_exact(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "{} is not a hex byte",
                        quote(&String::from_utf8_lossy(pair))
                    )
                })
        })
        .collect()
}

/// Bytes as upper-case hex pairs separated by spaces (`01 03 02 00 2A …`).
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{b:02X}");
    }
    out
}

/// `1 bus`, `2 buses`, `1 point`, `3 points`.
pub fn count(n: usize, singular: &str) -> String {
    match (n, singular) {
        (1, _) => format!("1 {singular}"),
        (_, "bus") => format!("{n} buses"),
        _ => format!("{n} {singular}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted() {
        assert_eq!(quote("reset_energy"), "\"reset_energy\"");
        assert_eq!(quote("a\"b\\c"), "\"a\\\"b\\\\c\"");
    }

    #[test]
    fn control_characters_are_escaped_and_the_length_is_capped() {
        assert_eq!(quote("a\nb\u{85}"), "\"a\\u{a}b\\u{85}\"");
        let hostile = "\u{85}".repeat(33_000);
        let q = quote(&hostile);
        assert!(q.chars().count() <= MAX_CHARS + 3, "{q}");
        assert!(q.ends_with("…\""));
        assert!(!q.chars().any(|c| c.is_control()));
        assert_eq!(quote("\u{202E}x"), "\"\\u{202e}x\"");
        assert_eq!(clip("a\"\u{7}"), "a\"\\u{7}");
    }

    #[test]
    fn hex_text_any_spacing_either_case() {
        assert_eq!(
            from_hex("01 03 00 00 00 02 C4 0b"),
            Ok(vec![1, 3, 0, 0, 0, 2, 0xC4, 0x0B])
        );
        assert_eq!(from_hex("0103\n0000"), Ok(vec![1, 3, 0, 0]));
        assert!(from_hex("0 1 3").is_err());
        assert!(from_hex("zz").is_err());
        assert_eq!(to_hex(&[0x01, 0xAB]), "01 AB");
    }
}
