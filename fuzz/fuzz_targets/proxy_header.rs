//! The PROXY protocol header (v1 and v2): any bytes give a header, "more", or a
//! refusal, never a panic, and a header's length never exceeds what was read.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::ws::proxy::{parse, Proxied, ProxyProtocol};

fuzz_target!(|data: &[u8]| {
    for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
        if let Proxied::Header { len, .. } = parse(data, version) {
            assert!(len <= data.len());
        }
    }
});
