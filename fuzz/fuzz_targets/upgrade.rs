//! The HTTP upgrade request parser: any bytes give an upgrade, "more", or a refusal
//! with its status, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::ws::handshake;

fuzz_target!(|data: &[u8]| {
    let origins = vec!["https://app.example".to_string()];
    for echo in [false, true] {
        if let Err(r) = handshake::parse(data, 8192, echo, &origins) {
            let _ = r.response();
        }
        let _ = handshake::parse(data, 256, echo, &[]);
    }
});
