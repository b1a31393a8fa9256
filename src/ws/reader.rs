//! Per-connection message reassembly: turns received bytes into whole messages and
//! control frames, enforcing RFC 6455's rules and the message size limit. Pure and
//! sans-io: the socket loop (`ws::conn`) hands it bytes, it calls back with events.
//!
//! Memory: a `Reader` is 8 bytes while no fragmented message is in flight; the
//! reassembly buffer exists only between the first and the last fragment.

use super::frame::{self, OpCode};

/// A complete message or control frame, borrowed from the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// The peer's close frame: its code (if any) and reason, both already validated.
    Close(Option<u16>, &'a str),
}

/// Why the reader gave up on the connection; each maps to one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A framing rule was broken (close 1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason was not UTF-8 (close 1007).
    #[error("invalid UTF-8 in text message")]
    InvalidUtf8,
    /// A message exceeded the configured maximum (close 1009).
    #[error("message too big")]
    TooBig,
}

impl ReadError {
    /// The close code that tells the peer what it did wrong.
    pub fn close_code(self) -> u16 {
        match self {
            Self::Protocol(_) => crate::close::PROTOCOL_ERROR,
            Self::InvalidUtf8 => crate::close::INVALID_PAYLOAD,
            Self::TooBig => crate::close::MESSAGE_TOO_BIG,
        }
    }

    /// Short reason for the close frame and the metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Protocol(r) => r,
            Self::InvalidUtf8 => "invalid utf-8",
            Self::TooBig => "message too big",
        }
    }
}

/// What the event handler wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Stop reading: the connection is closing.
    Stop,
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    data: Vec<u8>,
    /// For text: bytes already known to be valid UTF-8 (fail fast on bad fragments).
    valid_up_to: usize,
}

/// Reassembly state for one connection.
#[derive(Debug, Default)]
pub struct Reader {
    partial: Option<Box<Partial>>,
}

/// Result of one `feed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of complete frames consumed from the front of the buffer.
    pub consumed: usize,
    /// When the buffer ends in an incomplete frame: the total bytes that frame needs.
    pub pending_frame: Option<usize>,
    pub flow: Flow,
}

impl Reader {
    /// Whether a fragmented message is being reassembled.
    pub fn in_message(&self) -> bool {
        self.partial.is_some()
    }

    /// Consumes every complete frame at the front of `buf` (unmasking it in place) and
    /// calls `on_event` for each message and control frame. Stops early when the handler
    /// returns `Flow::Stop` or a close frame arrives.
    pub fn feed(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<Fed, ReadError> {
        let mut at = 0;
        loop {
            let Some(h) = frame::parse_header(&buf[at..]) else {
                let pending = (at < buf.len()).then_some(14);
                return Ok(Fed {
                    consumed: at,
                    pending_frame: pending,
                    flow: Flow::Continue,
                });
            };
            if h.rsv != 0 {
                return Err(ReadError::Protocol("reserved bits set"));
            }
            let Some(op) = OpCode::from_bits(h.opcode) else {
                return Err(ReadError::Protocol("reserved opcode"));
            };
            let Some(mask) = h.mask else {
                return Err(ReadError::Protocol("client frame not masked"));
            };
            if op.is_control() {
                if !h.fin {
                    return Err(ReadError::Protocol("fragmented control frame"));
                }
                if h.payload_len > 125 {
                    return Err(ReadError::Protocol("control frame too long"));
                }
            } else {
                // A 64-bit length near u64::MAX (its top bit must be 0, RFC 6455 §5.2)
                // must not wrap the sum: found by the `frames` fuzz target.
                let already = self.partial.as_ref().map_or(0, |p| p.data.len() as u64);
                if already.saturating_add(h.payload_len) > max_message as u64 {
                    return Err(ReadError::TooBig);
                }
            }
            let total = h.header_len + h.payload_len as usize;
            if buf.len() - at < total {
                return Ok(Fed {
                    consumed: at,
                    pending_frame: Some(total),
                    flow: Flow::Continue,
                });
            }
            let payload = &mut buf[at + h.header_len..at + total];
            frame::apply_mask(payload, mask, 0);
            at += total;
            let flow = self.on_frame(op, h.fin, payload, on_event)?;
            if flow == Flow::Stop {
                return Ok(Fed {
                    consumed: at,
                    pending_frame: None,
                    flow,
                });
            }
        }
    }

    fn on_frame(
        &mut self,
        op: OpCode,
        fin: bool,
        payload: &[u8],
        on_event: &mut dyn FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, ReadError> {
        match op {
            OpCode::Ping => Ok(on_event(Event::Ping(payload))),
            OpCode::Pong => Ok(on_event(Event::Pong(payload))),
            OpCode::Close => {
                let event = parse_close(payload)?;
                on_event(event);
                Ok(Flow::Stop)
            }
            OpCode::Text | OpCode::Binary => {
                if self.partial.is_some() {
                    return Err(ReadError::Protocol("new message inside a fragmented one"));
                }
                let text = op == OpCode::Text;
                if fin {
                    return emit(text, payload, on_event);
                }
                let mut p = Box::new(Partial {
                    text,
                    data: payload.to_vec(),
                    valid_up_to: 0,
                });
                check_partial_utf8(&mut p)?;
                self.partial = Some(p);
                Ok(Flow::Continue)
            }
            OpCode::Continuation => {
                let Some(p) = self.partial.as_mut() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                p.data.extend_from_slice(payload);
                check_partial_utf8(p)?;
                if !fin {
                    return Ok(Flow::Continue);
                }
                let p = self.partial.take().expect("checked above");
                emit(p.text, &p.data, on_event)
            }
        }
    }
}

fn emit(
    text: bool,
    payload: &[u8],
    on_event: &mut dyn FnMut(Event<'_>) -> Flow,
) -> Result<Flow, ReadError> {
    if text {
        let s = std::str::from_utf8(payload).map_err(|_| ReadError::InvalidUtf8)?;
        Ok(on_event(Event::Text(s)))
    } else {
        Ok(on_event(Event::Binary(payload)))
    }
}

/// Validates the new bytes of a fragmented text message, allowing a code point that
/// is cut at the end of this fragment.
fn check_partial_utf8(p: &mut Partial) -> Result<(), ReadError> {
    if !p.text {
        return Ok(());
    }
    match std::str::from_utf8(&p.data[p.valid_up_to..]) {
        Ok(_) => p.valid_up_to = p.data.len(),
        Err(e) if e.error_len().is_none() => p.valid_up_to += e.valid_up_to(),
        Err(_) => return Err(ReadError::InvalidUtf8),
    }
    Ok(())
}

fn parse_close(payload: &[u8]) -> Result<Event<'_>, ReadError> {
    match payload.len() {
        0 => Ok(Event::Close(None, "")),
        1 => Err(ReadError::Protocol("close frame with a 1-byte payload")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !frame::is_valid_close_code(code) {
                return Err(ReadError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(&payload[2..]).map_err(|_| ReadError::InvalidUtf8)?;
            Ok(Event::Close(Some(code), reason))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::client_frame;

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, String),
    }

    fn run(reader: &mut Reader, bytes: &[u8], max: usize) -> (Result<Fed, ReadError>, Vec<Owned>) {
        let mut buf = bytes.to_vec();
        let mut out = Vec::new();
        let r = reader.feed(&mut buf, max, &mut |e| {
            out.push(match e {
                Event::Text(s) => Owned::Text(s.to_owned()),
                Event::Binary(b) => Owned::Binary(b.to_vec()),
                Event::Ping(b) => Owned::Ping(b.to_vec()),
                Event::Pong(b) => Owned::Pong(b.to_vec()),
                Event::Close(c, r) => Owned::Close(c, r.to_owned()),
            });
            Flow::Continue
        });
        (r, out)
    }

    fn concat(frames: &[bytes::Bytes]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.iter().copied()).collect()
    }

    #[test]
    fn whole_text_message() {
        let f = client_frame(OpCode::Text, true, b"{\"op\":\"x\"}", MASK);
        let (r, ev) = run(&mut Reader::default(), &f, 1024);
        assert_eq!(r.unwrap().consumed, f.len());
        assert_eq!(ev, vec![Owned::Text("{\"op\":\"x\"}".into())]);
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let bytes = concat(&[
            client_frame(OpCode::Text, false, b"hel", MASK),
            client_frame(OpCode::Ping, true, b"p", MASK),
            client_frame(OpCode::Continuation, true, b"lo", MASK),
        ]);
        let mut r = Reader::default();
        let (res, ev) = run(&mut r, &bytes, 1024);
        assert_eq!(res.unwrap().consumed, bytes.len());
        assert_eq!(
            ev,
            vec![Owned::Ping(b"p".to_vec()), Owned::Text("hello".into())]
        );
        assert!(!r.in_message());
    }

    #[test]
    fn incomplete_frame_reports_what_it_needs() {
        let f = client_frame(OpCode::Binary, true, &[1u8; 200], MASK);
        let (res, ev) = run(&mut Reader::default(), &f[..50], 1024);
        let fed = res.unwrap();
        assert_eq!(fed.consumed, 0);
        assert_eq!(fed.pending_frame, Some(f.len()));
        assert!(ev.is_empty());
    }

    #[test]
    fn too_big_is_refused_from_the_header() {
        let f = client_frame(OpCode::Binary, true, &[1u8; 2000], MASK);
        let (res, _) = run(&mut Reader::default(), &f[..20], 1000);
        assert_eq!(res.unwrap_err(), ReadError::TooBig);
        assert_eq!(ReadError::TooBig.close_code(), 1009);
    }

    /// Regression (fuzz target `frames`): a continuation whose 64-bit length would wrap
    /// the running size of a fragmented message, which panicked (an overflow in debug
    /// builds, an inverted slice in release).
    #[test]
    fn a_continuation_length_near_u64_max_is_too_big_not_a_panic() {
        let mut bytes = client_frame(OpCode::Text, false, b"abc", MASK).to_vec();
        bytes.extend([0x80, 0x80 | 127]);
        bytes.extend((u64::MAX - 1).to_be_bytes());
        bytes.extend(MASK);
        bytes.extend([0u8; 8]);
        let (res, _) = run(&mut Reader::default(), &bytes, 1 << 16);
        assert_eq!(res.unwrap_err(), ReadError::TooBig);
    }

    #[test]
    fn too_big_across_fragments() {
        let bytes = concat(&[
            client_frame(OpCode::Binary, false, &[0u8; 600], MASK),
            client_frame(OpCode::Continuation, true, &[0u8; 600], MASK),
        ]);
        let (res, _) = run(&mut Reader::default(), &bytes, 1000);
        assert_eq!(res.unwrap_err(), ReadError::TooBig);
    }

    #[test]
    fn unmasked_frame_is_a_protocol_error() {
        let f = crate::ws::frame::server_frame(OpCode::Text, b"hi");
        let (res, _) = run(&mut Reader::default(), &f, 1024);
        assert_eq!(res.unwrap_err().close_code(), 1002);
    }

    #[test]
    fn invalid_utf8_text_is_1007() {
        let f = client_frame(OpCode::Text, true, &[0xff, 0xfe], MASK);
        let (res, _) = run(&mut Reader::default(), &f, 1024);
        assert_eq!(res.unwrap_err().close_code(), 1007);
    }

    #[test]
    fn utf8_split_across_fragments_is_fine_but_bad_fragment_fails_fast() {
        let euro = "€".as_bytes();
        let bytes = concat(&[
            client_frame(OpCode::Text, false, &euro[..1], MASK),
            client_frame(OpCode::Continuation, true, &euro[1..], MASK),
        ]);
        let (res, ev) = run(&mut Reader::default(), &bytes, 1024);
        assert!(res.is_ok());
        assert_eq!(ev, vec![Owned::Text("€".into())]);

        // An invalid byte in a non-final fragment is caught before the message ends.
        let f = client_frame(OpCode::Text, false, &[b'a', 0xc0, b'b'], MASK);
        let (res, _) = run(&mut Reader::default(), &f, 1024);
        assert_eq!(res.unwrap_err(), ReadError::InvalidUtf8);
    }

    #[test]
    fn control_frame_rules() {
        let long_ping = client_frame(OpCode::Ping, true, &[0u8; 126], MASK);
        assert_eq!(
            run(&mut Reader::default(), &long_ping, 1024)
                .0
                .unwrap_err()
                .close_code(),
            1002
        );
        let frag_ping = client_frame(OpCode::Ping, false, b"x", MASK);
        assert_eq!(
            run(&mut Reader::default(), &frag_ping, 1024)
                .0
                .unwrap_err()
                .close_code(),
            1002
        );
    }

    #[test]
    fn continuation_and_nesting_errors() {
        let cont = client_frame(OpCode::Continuation, true, b"x", MASK);
        assert!(matches!(
            run(&mut Reader::default(), &cont, 1024).0,
            Err(ReadError::Protocol(_))
        ));
        let nested = concat(&[
            client_frame(OpCode::Text, false, b"a", MASK),
            client_frame(OpCode::Text, true, b"b", MASK),
        ]);
        assert!(matches!(
            run(&mut Reader::default(), &nested, 1024).0,
            Err(ReadError::Protocol(_))
        ));
    }

    #[test]
    fn reserved_bits_and_opcodes() {
        let mut f = client_frame(OpCode::Text, true, b"x", MASK).to_vec();
        f[0] |= 0x40;
        assert!(matches!(
            run(&mut Reader::default(), &f, 1024).0,
            Err(ReadError::Protocol(_))
        ));
        let mut f = client_frame(OpCode::Text, true, b"x", MASK).to_vec();
        f[0] = 0x83;
        assert!(matches!(
            run(&mut Reader::default(), &f, 1024).0,
            Err(ReadError::Protocol(_))
        ));
    }

    #[test]
    fn close_frames() {
        let f = client_frame(OpCode::Close, true, &[0x03, 0xe8, b'b', b'y', b'e'], MASK);
        let (res, ev) = run(&mut Reader::default(), &f, 1024);
        assert_eq!(res.unwrap().flow, Flow::Stop);
        assert_eq!(ev, vec![Owned::Close(Some(1000), "bye".into())]);

        let f = client_frame(OpCode::Close, true, &[0x03], MASK);
        assert_eq!(
            run(&mut Reader::default(), &f, 1024)
                .0
                .unwrap_err()
                .close_code(),
            1002
        );
        let f = client_frame(OpCode::Close, true, &[0x03, 0xed], MASK); // 1005
        assert_eq!(
            run(&mut Reader::default(), &f, 1024)
                .0
                .unwrap_err()
                .close_code(),
            1002
        );
        let f = client_frame(OpCode::Close, true, &[0x03, 0xe8, 0xff], MASK);
        assert_eq!(
            run(&mut Reader::default(), &f, 1024)
                .0
                .unwrap_err()
                .close_code(),
            1007
        );
    }

    #[test]
    fn frames_after_close_are_not_read() {
        let bytes = concat(&[
            client_frame(OpCode::Close, true, &[], MASK),
            client_frame(OpCode::Text, true, b"late", MASK),
        ]);
        let (res, ev) = run(&mut Reader::default(), &bytes, 1024);
        assert_eq!(ev, vec![Owned::Close(None, String::new())]);
        assert_eq!(res.unwrap().flow, Flow::Stop);
    }
}
