//! RFC 6455 frame codec: header parsing, unmasking and frame building. Pure: no I/O,
//! no allocation when parsing. The per-connection reassembly of messages lives in
//! `ws::reader`; the socket loop in `ws::conn`.
//!
//! Server frames are never masked. Client frames must be (RFC 6455 §5.1); the reader
//! rejects unmasked ones.

use bytes::{BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    /// The 4-bit wire value.
    pub fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Decodes a wire value; `None` for the reserved opcodes 3–7 and 0xB–0xF.
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Close, ping and pong: at most 125 bytes and never fragmented.
    pub fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits; nonzero is an error without extensions.
    pub rsv: u8,
    /// Raw opcode bits (validated by the reader so it can pick the close code).
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes taken by the header itself (2 to 14).
    pub header_len: usize,
}

/// Parses a frame header from the start of `buf`; `None` until enough bytes are there.
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() < 2 {
        return None;
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    let (payload_len, mut at) = match len7 {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if buf.len() < at + 4 {
            return None;
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0f,
        mask,
        payload_len,
        header_len: at,
    })
}

/// XORs `data` with `mask`, as if `data` started `offset` bytes into the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    // Rotate the key so word-sized chunks line up with the payload offset.
    let mut key = [0u8; 4];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(key);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i];
    }
}

/// Length of the header a server (unmasked) frame with `payload_len` bytes needs.
pub fn server_header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// Writes an unmasked frame header (FIN set) for `payload_len` bytes into `out`.
pub fn put_server_header(out: &mut BytesMut, opcode: OpCode, payload_len: usize) {
    out.put_u8(0x80 | opcode.bits());
    put_len(out, 0, payload_len);
}

fn put_len(out: &mut BytesMut, mask_bit: u8, payload_len: usize) {
    match payload_len {
        0..=125 => out.put_u8(mask_bit | payload_len as u8),
        126..=0xffff => {
            out.put_u8(mask_bit | 126);
            out.put_u16(payload_len as u16);
        }
        _ => {
            out.put_u8(mask_bit | 127);
            out.put_u64(payload_len as u64);
        }
    }
}

/// The payload of a text frame built by `server_frame` (our own frames only: a frame
/// that is not whole UTF-8 text gives `null`).
pub fn payload_text(frame: &[u8]) -> &str {
    parse_header(frame)
        .and_then(|h| frame.get(h.header_len..))
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("null")
}

/// One complete unmasked server frame.
pub fn server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(server_header_len(payload.len()) + payload.len());
    put_server_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A close frame with `code` and a reason (truncated to fit the 125-byte control limit
/// on a character boundary).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    server_frame(OpCode::Close, &payload)
}

/// One complete masked client frame (used by the load generator and tests).
pub fn client_frame(opcode: OpCode, fin: bool, payload: &[u8], mask: [u8; 4]) -> Bytes {
    let mut out = BytesMut::with_capacity(14 + payload.len());
    out.put_u8(if fin { 0x80 } else { 0 } | opcode.bits());
    put_len(&mut out, 0x80, payload.len());
    out.put_slice(&mask);
    let start = out.len();
    out.put_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
    out.freeze()
}

/// Whether a close code received from a peer is allowed on the wire (RFC 6455 §7.4).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_round_trip() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            let payload = vec![7u8; len];
            let f = client_frame(OpCode::Binary, true, &payload, [1, 2, 3, 4]);
            let h = parse_header(&f).expect("complete header");
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.mask, Some([1, 2, 3, 4]));
            assert!(h.fin);
            assert_eq!(h.opcode, 0x2);
            let mut body = f[h.header_len..].to_vec();
            apply_mask(&mut body, [1, 2, 3, 4], 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn partial_header_is_none() {
        let f = client_frame(OpCode::Text, true, &[b'x'; 300], [9, 9, 9, 9]);
        for cut in 0..8 {
            assert!(parse_header(&f[..cut]).is_none(), "cut at {cut}");
        }
        assert!(parse_header(&f[..8]).is_some());
    }

    #[test]
    fn mask_at_any_offset_matches_bytewise() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        let data: Vec<u8> = (0..=255u8).collect();
        for offset in 0..8 {
            let mut fast = data.clone();
            apply_mask(&mut fast, mask, offset);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[(i + offset) % 4])
                .collect();
            assert_eq!(fast, slow, "offset {offset}");
        }
    }

    #[test]
    fn server_frame_is_unmasked() {
        let f = server_frame(OpCode::Text, b"hello");
        assert_eq!(&f[..], b"\x81\x05hello");
        let h = parse_header(&f).unwrap();
        assert_eq!(h.mask, None);
    }

    #[test]
    fn close_reason_truncates_on_char_boundary() {
        let reason = "é".repeat(100);
        let f = close_frame(1008, &reason);
        let h = parse_header(&f).unwrap();
        assert!(h.payload_len <= 125);
        let body = &f[h.header_len..];
        assert_eq!(u16::from_be_bytes([body[0], body[1]]), 1008);
        assert!(std::str::from_utf8(&body[2..]).is_ok());
    }

    #[test]
    fn close_code_ranges() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            assert!(is_valid_close_code(ok), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!is_valid_close_code(bad), "{bad}");
        }
    }
}
