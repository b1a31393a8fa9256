//! The protocol v1 request parser: any text gives a request or a refusal with its
//! code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::protocol;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = protocol::parse(text, 256);
        let _ = protocol::parse(text, 1);
    }
});
