//! The config loader on arbitrary text: an error (with a location) or a
//! valid config, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fieldgate::config::parse(std::path::Path::new("fuzz.toml"), text);
    }
});
