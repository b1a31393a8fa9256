//! RESP replies from Redis, decoded and read by the backplane's reply parsers
//! (history pages, inbox entries): a wrong or hostile reply is an error, never a panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringway::backplane::{inbox, replay};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some((frame, _, _))) = redis_protocol::resp2::decode::decode_bytes_mut(&mut buf) {
        let _ = replay::parse_page(&frame, 10);
        let _ = inbox::parse_entries(&frame);
    }
});
