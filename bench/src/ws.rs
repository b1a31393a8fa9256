//! The client side of the WebSocket upgrade and of protocol v1, as pure functions over
//! bytes: building the upgrade request, checking the 101 response, splitting frames,
//! and recognising server messages. Frame headers, masking and the accept key come from
//! `ringway::ws`, so the generator and the gateway share one codec.

use base64::Engine as _;
use ringway::ws::frame::{client_frame, parse_header, OpCode};
use ringway::ws::handshake::accept_key;

/// Largest 101 response head we wait for before calling the upgrade refused.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Largest server frame payload accepted (the gateway's default message limit is 64 KiB).
pub const MAX_FRAME: u64 = 16 * 1024 * 1024;

/// The `Sec-WebSocket-Key` of connection `index`: derived, not stored, so that the
/// expected accept value can be recomputed when the response arrives.
pub fn key_for(index: u64) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&index.to_le_bytes());
    raw[8..].copy_from_slice(&0x7269_6e67_7761_7921u64.to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The HTTP/1.1 upgrade request, with `Authorization: Bearer <token>` when given.
pub fn upgrade_request(host: &str, path: &str, key: &str, token: Option<&str>) -> Vec<u8> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
    .into_bytes()
}

/// Why an upgrade failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeError {
    /// A status other than 101.
    Status(u16),
    /// 101 without the right `Sec-WebSocket-Accept`.
    BadAccept,
    /// Not HTTP, or a head over [`MAX_RESPONSE_HEAD`].
    Malformed,
}

/// Checks the response to the upgrade of connection `index`: `Ok(None)` until the head
/// is complete, then `Ok(Some(head_len))`; anything after the head is frame data.
pub fn check_upgrade(buf: &[u8], index: u64) -> Result<Option<usize>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => {
            let code = resp.code.unwrap_or(0);
            if code != 101 {
                return Err(UpgradeError::Status(code));
            }
            let accept = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                .map(|h| h.value);
            if accept != Some(accept_key(key_for(index).as_bytes()).as_bytes()) {
                return Err(UpgradeError::BadAccept);
            }
            Ok(Some(n))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => Ok(None),
        _ => Err(UpgradeError::Malformed),
    }
}

/// One complete frame at the start of a buffer.
#[derive(Debug)]
pub struct RawFrame {
    pub fin: bool,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub payload: std::ops::Range<usize>,
    /// Bytes the whole frame takes.
    pub len: usize,
}

/// Splits the first frame off `buf`: `Ok(None)` while incomplete, `Err` for a payload
/// larger than [`MAX_FRAME`].
pub fn next_frame(buf: &[u8]) -> Result<Option<RawFrame>, ()> {
    let Some(h) = parse_header(buf) else {
        return Ok(None);
    };
    if h.payload_len > MAX_FRAME {
        return Err(());
    }
    let end = h.header_len + h.payload_len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some(RawFrame {
        fin: h.fin,
        opcode: h.opcode,
        mask: h.mask,
        payload: h.header_len..end,
        len: end,
    }))
}

/// What a server text frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    Welcome,
    Subscribed,
    Message(Delivery<'a>),
    /// A `message` whose data is not ours (no seq/t).
    ForeignMessage,
    Published {
        reference: Option<u64>,
    },
    Error {
        reference: Option<u64>,
    },
    Other,
}

/// The fields of one of our messages.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub topic: &'a [u8],
    pub seq: u64,
    /// Intended send time, ns since the UNIX epoch.
    pub t_ns: u64,
}

const MESSAGE_PREFIX: &[u8] = br#"{"type":"message","topic":""#;
const DIRECT_PREFIX: &[u8] = br#"{"type":"message","user":""#;
const DATA_PREFIX: &[u8] = br#""data":{"seq":"#;

/// Classifies a server text payload. Messages in the gateway's own layout
/// (`{"type":"message","topic":"T","id":..,"data":{"seq":k,"t":..}}`) are read without a
/// JSON parser; anything else goes through serde_json.
pub fn classify(p: &[u8]) -> Kind<'_> {
    if let Some(d) = fast_delivery(p) {
        return Kind::Message(d);
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(p) else {
        return Kind::Other;
    };
    let reference = v.get("ref").and_then(serde_json::Value::as_u64);
    // A server that delivers the published data as it is: `{"seq":k,"t":…,"pad":…}`.
    if let (Some(seq), Some(t_ns)) = (
        v.get("seq").and_then(serde_json::Value::as_u64),
        v.get("t").and_then(serde_json::Value::as_u64),
    ) {
        return Kind::Message(Delivery {
            topic: b"",
            seq,
            t_ns,
        });
    }
    match v.get("type").and_then(|t| t.as_str()) {
        Some("welcome") => Kind::Welcome,
        Some("subscribed") => Kind::Subscribed,
        Some("published") => Kind::Published { reference },
        Some("error") => Kind::Error { reference },
        Some("message") => {
            // Re-encoded by something on the way (another gateway): find the fields.
            let topic = v
                .get("topic")
                .or_else(|| v.get("user"))
                .and_then(|t| t.as_str());
            let data = v.get("data");
            let seq = data.and_then(|d| d.get("seq")).and_then(|s| s.as_u64());
            let t = data.and_then(|d| d.get("t")).and_then(|s| s.as_u64());
            match (topic, seq, t) {
                (Some(topic), Some(seq), Some(t_ns)) => {
                    // Borrow the topic from the payload when it is there verbatim.
                    let needle = topic.as_bytes();
                    match find(p, needle) {
                        Some(i) => Kind::Message(Delivery {
                            topic: &p[i..i + needle.len()],
                            seq,
                            t_ns,
                        }),
                        None => Kind::ForeignMessage,
                    }
                }
                _ => Kind::ForeignMessage,
            }
        }
        _ => Kind::Other,
    }
}

fn fast_delivery(p: &[u8]) -> Option<Delivery<'_>> {
    let rest = p
        .strip_prefix(MESSAGE_PREFIX)
        .or_else(|| p.strip_prefix(DIRECT_PREFIX))?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        return None;
    }
    let topic = &rest[..end];
    let after = &rest[end..];
    let at = find(after, DATA_PREFIX)? + DATA_PREFIX.len();
    let (seq, used) = digits(&after[at..])?;
    let rest = after[at + used..].strip_prefix(b",\"t\":")?;
    let (t_ns, _) = digits(rest)?;
    Some(Delivery { topic, seq, t_ns })
}

fn digits(b: &[u8]) -> Option<(u64, usize)> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let v = std::str::from_utf8(&b[..n]).ok()?.parse().ok()?;
    Some((v, n))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A masked client text frame.
pub fn text_frame(payload: &[u8], mask: [u8; 4]) -> impl std::ops::Deref<Target = [u8]> {
    client_frame(OpCode::Text, true, payload, mask)
}

/// A masked pong echoing `payload`.
pub fn pong_frame(payload: &[u8], mask: [u8; 4]) -> impl std::ops::Deref<Target = [u8]> {
    client_frame(OpCode::Pong, true, payload, mask)
}

/// A masked close frame with code 1000.
pub fn close_frame(mask: [u8; 4]) -> impl std::ops::Deref<Target = [u8]> {
    client_frame(OpCode::Close, true, &1000u16.to_be_bytes(), mask)
}

/// The JSON of message `seq`: `{"seq":k,"t":<ns>,"pad":"…"}`, padded to about
/// `msg_bytes` bytes (never shorter than without padding).
pub fn message_data(seq: u64, t_ns: u64, msg_bytes: usize) -> String {
    let mut s = format!("{{\"seq\":{seq},\"t\":{t_ns},\"pad\":\"");
    let pad = msg_bytes.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

/// Protocol v1's subscribe request; `{topic}` is replaced by the topic name.
pub const SUBSCRIBE_TEMPLATE: &str = r#"{"op":"subscribe","topic":"{topic}"}"#;

/// A small xorshift generator for masks: masks need not be secret here.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_round_trip_with_gateway_parser() {
        let req = upgrade_request("127.0.0.1:1", "/ws", &key_for(42), None);
        let parsed = ringway::ws::handshake::parse(&req, 8192, false, &[]).unwrap();
        let ringway::ws::handshake::Parsed::Upgrade(up) = parsed else {
            panic!("incomplete")
        };
        let mut resp = Vec::new();
        ringway::ws::handshake::write_switching_protocols(&mut resp, &up.accept, None);
        assert_eq!(check_upgrade(&resp, 42), Ok(Some(resp.len())));
        assert_eq!(check_upgrade(&resp, 43), Err(UpgradeError::BadAccept));
        assert_eq!(check_upgrade(&resp[..10], 42), Ok(None));
        assert_eq!(
            check_upgrade(b"HTTP/1.1 404 Not Found\r\n\r\n", 1),
            Err(UpgradeError::Status(404))
        );
    }

    #[test]
    fn classifies_gateway_messages() {
        let raw = serde_json::value::RawValue::from_string(message_data(7, 123, 64)).unwrap();
        let f = ringway::protocol::message("topic-3", "9-0", Some("e1"), &raw);
        let fr = next_frame(&f).unwrap().unwrap();
        assert_eq!(fr.len, f.len());
        let k = classify(&f[fr.payload]);
        assert_eq!(
            k,
            Kind::Message(Delivery {
                topic: b"topic-3",
                seq: 7,
                t_ns: 123
            })
        );
        // The same message re-encoded with other field order still classifies.
        let other = br#"{"data":{"pad":"","t":5,"seq":2},"topic":"a","type":"message"}"#;
        assert_eq!(
            classify(other),
            Kind::Message(Delivery {
                topic: b"a",
                seq: 2,
                t_ns: 5
            })
        );
        let w = ringway::protocol::welcome("1", "n");
        let fr = next_frame(&w).unwrap().unwrap();
        assert_eq!(classify(&w[fr.payload]), Kind::Welcome);
        let a = ringway::protocol::ack("subscribed", "t", None);
        let fr = next_frame(&a).unwrap().unwrap();
        assert_eq!(classify(&a[fr.payload]), Kind::Subscribed);
        assert_eq!(
            classify(br#"{"type":"published","topic":"t","id":"1","ref":17}"#),
            Kind::Published {
                reference: Some(17)
            }
        );
        assert!(next_frame(&a[..a.len() - 1]).unwrap().is_none());
        // A server that delivers the published data bare (comparison mode).
        assert_eq!(
            classify(message_data(4, 99, 32).as_bytes()),
            Kind::Message(Delivery {
                topic: b"",
                seq: 4,
                t_ns: 99
            })
        );
        // A direct message.
        let d = ringway::protocol::direct("user-5", "1-1", &raw);
        let fr = next_frame(&d).unwrap().unwrap();
        assert!(matches!(
            classify(&d[fr.payload]),
            Kind::Message(Delivery {
                topic: b"user-5",
                seq: 7,
                ..
            })
        ));
    }

    #[test]
    fn message_data_is_padded_json() {
        let d = message_data(1, 2, 100);
        assert_eq!(d.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["seq"], 1);
        assert!(message_data(1, 2, 0).ends_with("\"pad\":\"\"}"));
    }
}
