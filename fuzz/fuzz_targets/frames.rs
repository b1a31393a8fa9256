//! The frame reader: any bytes from a client give events, "more", or a close code,
//! never a panic, whatever the split between reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringway::ws::reader::{Flow, Reader};

fuzz_target!(|data: &[u8]| {
    let (split, rest) = match data.split_first() {
        Some((s, r)) => (*s as usize, r),
        None => return,
    };
    let mut reader = Reader::default();
    let mut pending: Vec<u8> = Vec::new();
    let cut = split.min(rest.len());
    for chunk in [&rest[..cut], &rest[cut..]] {
        pending.extend_from_slice(chunk);
        match reader.feed(&mut pending, 1 << 16, &mut |_| Flow::Continue) {
            Ok(fed) => {
                pending.drain(..fed.consumed);
            }
            Err(e) => {
                let _ = (e.close_code(), e.reason());
                return;
            }
        }
    }
});
