//! Fuzzes the rules loader: any bytes as a rules file must give rules or diagnostics,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sagawatch::rules::load_sources(&[("fuzz.yaml".into(), text.to_string())]);
    }
});
