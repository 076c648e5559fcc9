//! Fuzzes the config parser: a TOML file flattened into options, each option
//! through `Config::set` (the one parser for files, `KEEL_*` and flags), the
//! cross-option checks, and `name=value` lines as the environment gives them.
#![no_main]

use keel::config::{parse_duration, Config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut c = Config::default();
    if let Ok(pairs) = keel_server::settings::flatten_toml(text) {
        for (name, value) in pairs {
            let _ = c.set(&name, &value);
        }
        let _ = c.validate();
    }
    let mut c = Config::default();
    for line in text.lines() {
        if let Some((name, value)) = line.split_once('=') {
            let _ = c.set(name.trim(), value);
        }
    }
    let _ = c.validate();
    let _ = parse_duration(text);
});
