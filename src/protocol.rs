//! Client wire protocol v1: parsing client ops and building server messages. Pure.
//!
//! Client → gateway (JSON text frames, unknown fields ignored; any op may carry `ref`):
//! `subscribe {topic, since?: {offset, epoch}}`, `unsubscribe {topic}`,
//! `publish {topic, data}`, `ack {id}` (direct messages, cumulative).
//! Gateway → client: `welcome`, `subscribed` (with `recovered`, and `reason` when
//! false, for a subscribe that carried `since`), `unsubscribed`, `message {topic, id,
//! epoch?, data}`, `published` and `acked` (only for a publish or ack that carried a
//! `ref`),
//! `error {code, message}`.
//!
//! Error codes (the `code` field of an error frame):
//! | code | meaning |
//! |---|---|
//! | `bad_json` | the frame is not a JSON object |
//! | `unknown_op` | `op` missing or not one of the above |
//! | `bad_request` | a required field is missing, or a field has the wrong type |
//! | `bad_topic` | topic empty, too long, or holding control characters (with a Redis Cluster, also starting with `}`) |
//! | `too_many_subscriptions` | the per-connection subscription limit is reached |
//! | `publish_forbidden` | client publishing is disabled by configuration |
//! | `overloaded` | the gateway could not accept the publish right now; retry |

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::ws::frame::{self, OpCode};

/// A parsed client request.
#[derive(Debug)]
pub struct Request<'a> {
    pub op: Op<'a>,
    /// Echoed verbatim in the reply.
    pub reference: Option<&'a RawValue>,
}

/// Client operations.
#[derive(Debug)]
pub enum Op<'a> {
    Subscribe {
        topic: Cow<'a, str>,
        since: Option<Since<'a>>,
    },
    Unsubscribe {
        topic: Cow<'a, str>,
    },
    Publish {
        topic: Cow<'a, str>,
        data: &'a RawValue,
    },
    /// Acknowledge the connection's direct messages up to `id` (cumulative).
    Ack {
        id: MessageId,
    },
    /// Extend the connection's life with a newer token of the same user.
    Refresh {
        token: Cow<'a, str>,
    },
}

/// Where a resuming client left a topic: the last message it got (`offset`, a message
/// id) in the topic's history `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since<'a> {
    pub offset: MessageId,
    pub epoch: Cow<'a, str>,
}

/// A message id, `<ms>-<seq>` (the shape of a Redis stream id). Ids of one topic
/// increase in the order its messages are delivered, so they compare as offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub ms: u64,
    pub seq: u64,
}

impl MessageId {
    /// Above every id (a message that cannot be placed in a topic's order).
    pub const MAX: Self = Self {
        ms: u64::MAX,
        seq: u64::MAX,
    };
}

impl std::str::FromStr for MessageId {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').ok_or(())?;
        let digits = |p: &str| {
            if p.is_empty() || p.len() > 20 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            p.parse::<u64>().map_err(|_| ())
        };
        Ok(Self {
            ms: digits(ms)?,
            seq: digits(seq)?,
        })
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Why a resume (`subscribe` with `since`) could not replay what was missed: the
/// `reason` of a `subscribed` answer with `"recovered":false`. The subscription itself
/// is made; the client resyncs from its own source of truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRecovered {
    /// History is turned off (`history_size` or `history_ttl_secs` is 0).
    HistoryOff,
    /// The history the offset belongs to is gone (the node restarted).
    EpochChanged,
    /// Messages after the offset have already left history (size or age).
    TooOld,
    /// What was missed is more than the connection's queue may hold
    /// (`outbound_queue_bytes`): page through `GET /v1/history` or resync.
    TooLarge,
    /// The offset was never given out in this epoch.
    UnknownOffset,
    /// Redis could not be asked (unreachable, or the answer was lost in a reconnect):
    /// try again.
    Unavailable,
}

impl NotRecovered {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HistoryOff => "history_off",
            Self::EpochChanged => "epoch_changed",
            Self::TooOld => "too_old",
            Self::TooLarge => "too_large",
            Self::UnknownOffset => "unknown_offset",
            Self::Unavailable => "unavailable",
        }
    }
}

/// A request the gateway refuses, with the `ref` to echo if one could be read.
#[derive(Debug)]
pub struct Rejection<'a> {
    pub error: ErrorCode,
    pub message: Cow<'static, str>,
    pub reference: Option<&'a RawValue>,
}

/// Machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    UnknownOp,
    BadRequest,
    BadTopic,
    TooManySubscriptions,
    PublishForbidden,
    /// Neither the token's grants nor the topic's namespace allow it.
    Forbidden,
    /// Over `client_messages_per_sec`: the message was not handled.
    RateLimited,
    /// A `refresh` whose token does not verify or is for another user.
    BadToken,
    Overloaded,
    /// The backplane (Redis) cannot take the request now; retry later.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadJson => "bad_json",
            Self::UnknownOp => "unknown_op",
            Self::BadRequest => "bad_request",
            Self::BadTopic => "bad_topic",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::PublishForbidden => "publish_forbidden",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::BadToken => "bad_token",
            Self::Overloaded => "overloaded",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Every field as raw JSON, so a wrongly typed field is reported with the request's
/// `ref` instead of failing the whole object.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow, default, deserialize_with = "present")]
    reference: Option<&'a RawValue>,
}

/// A field that is present is `Some`, even when its value is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// A present field as a string (borrowed unless it holds escapes).
fn string_field<'a>(raw: Option<&'a RawValue>, name: &str) -> Result<Option<Cow<'a, str>>, String> {
    let Some(raw) = raw else { return Ok(None) };
    if let Ok(s) = serde_json::from_str::<&'a str>(raw.get()) {
        return Ok(Some(Cow::Borrowed(s)));
    }
    serde_json::from_str::<String>(raw.get())
        .map(|s| Some(Cow::Owned(s)))
        .map_err(|_| format!("\"{name}\" must be a string"))
}

/// Parses one client text frame. `max_topic` bounds topic names in bytes.
pub fn parse<'a>(text: &'a str, max_topic: usize) -> Result<Request<'a>, Rejection<'a>> {
    // serde would also accept a JSON array as a struct (fields by position).
    let is_object = text.trim_start().starts_with('{');
    let wire: Wire<'a> = match serde_json::from_str(text) {
        Ok(w) if is_object => w,
        Ok(_) => {
            return Err(Rejection {
                error: ErrorCode::BadJson,
                message: "expected a JSON object".into(),
                reference: None,
            })
        }
        Err(e) => {
            return Err(Rejection {
                error: ErrorCode::BadJson,
                message: format!("expected a JSON object: {e}").into(),
                reference: None,
            })
        }
    };
    let reference = wire.reference;
    let reject = |error, message: Cow<'static, str>| Rejection {
        error,
        message,
        reference,
    };
    let string =
        |raw, name| string_field(raw, name).map_err(|m| reject(ErrorCode::BadRequest, m.into()));
    let topic = |raw| -> Result<Cow<'a, str>, Rejection<'a>> {
        let t = string(raw, "topic")?
            .ok_or_else(|| reject(ErrorCode::BadRequest, "missing \"topic\" (a string)".into()))?;
        validate_topic(&t, max_topic).map_err(|m| reject(ErrorCode::BadTopic, m.into()))?;
        Ok(t)
    };
    let op = match string(wire.op, "op")?.as_deref() {
        Some("subscribe") => Op::Subscribe {
            topic: topic(wire.topic)?,
            since: match wire.since {
                None => None,
                Some(raw) => Some(since(raw).map_err(|m| reject(ErrorCode::BadRequest, m.into()))?),
            },
        },
        Some("unsubscribe") => Op::Unsubscribe {
            topic: topic(wire.topic)?,
        },
        Some("publish") => Op::Publish {
            topic: topic(wire.topic)?,
            data: wire.data.unwrap_or(RawValue::NULL),
        },
        Some("ack") => {
            const FORM: &str = "missing \"id\": the id of the last direct message received";
            let id =
                string(wire.id, "id")?.ok_or_else(|| reject(ErrorCode::BadRequest, FORM.into()))?;
            Op::Ack {
                id: id
                    .parse()
                    .map_err(|()| reject(ErrorCode::BadRequest, FORM.into()))?,
            }
        }
        Some("refresh") => Op::Refresh {
            token: string(wire.token, "token")?.ok_or_else(|| {
                reject(ErrorCode::BadRequest, "missing \"token\" (a string)".into())
            })?,
        },
        Some(other) => {
            let shown: String = other.chars().take(32).collect();
            return Err(reject(
                ErrorCode::UnknownOp,
                format!("unknown op \"{shown}\"").into(),
            ));
        }
        None => return Err(reject(ErrorCode::UnknownOp, "missing \"op\"".into())),
    };
    Ok(Request { op, reference })
}

/// `since`: `{"offset":"<ms>-<seq>","epoch":"<epoch>"}`, as the last `message` a client
/// got carried them.
fn since(raw: &RawValue) -> Result<Since<'_>, &'static str> {
    #[derive(Deserialize)]
    struct Wire<'a> {
        #[serde(borrow)]
        offset: Cow<'a, str>,
        #[serde(borrow)]
        epoch: Cow<'a, str>,
    }
    const SHAPE: &str =
        "\"since\" must be {\"offset\":\"<message id>\",\"epoch\":\"<epoch>\"} from the last message received";
    let w: Wire<'_> = serde_json::from_str(raw.get()).map_err(|_| SHAPE)?;
    let offset = w.offset.parse().map_err(|()| SHAPE)?;
    if w.epoch.is_empty() || w.epoch.len() > 64 {
        return Err(SHAPE);
    }
    Ok(Since {
        offset,
        epoch: w.epoch,
    })
}

/// Checks a topic name: 1..=max bytes, no control characters.
pub fn validate_topic(topic: &str, max: usize) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic must not be empty".into());
    }
    if topic.len() > max {
        return Err(format!("topic longer than {max} bytes"));
    }
    if topic.chars().any(char::is_control) {
        return Err("topic must not contain control characters".into());
    }
    // Its keys would carry an empty hash tag (`ringway:topic:{}…}`) and land in
    // different slots.
    if topic.starts_with('}') && crate::backplane::schema::cluster() {
        return Err("with a Redis Cluster a topic must not start with '}'".into());
    }
    Ok(())
}

// === Server messages ===

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a &str to a String cannot fail.
    out.push_str(&serde_json::to_string(s).expect("string serializes"));
}

fn push_ref(out: &mut String, reference: Option<&RawValue>) {
    if let Some(r) = reference {
        out.push_str(",\"ref\":");
        out.push_str(r.get());
    }
}

fn text(json: String) -> Bytes {
    frame::server_frame(OpCode::Text, json.as_bytes())
}

/// `{"type":"welcome","conn":…,"node":…}` as a frame.
pub fn welcome(conn: &str, node: &str) -> Bytes {
    let mut s = String::from("{\"type\":\"welcome\",\"conn\":");
    push_json_str(&mut s, conn);
    s.push_str(",\"node\":");
    push_json_str(&mut s, node);
    s.push('}');
    text(s)
}

/// The fixed parts of a node's welcome frame, built once per shard so that each
/// connection's welcome is written without allocating.
#[derive(Debug)]
pub struct WelcomeTemplate {
    prefix: &'static [u8],
    /// `","node":<node id as JSON>}`
    suffix: Box<[u8]>,
}

impl WelcomeTemplate {
    pub fn new(node: &str) -> Self {
        let mut suffix = String::from("\",\"node\":");
        push_json_str(&mut suffix, node);
        suffix.push('}');
        Self {
            prefix: b"{\"type\":\"welcome\",\"conn\":\"",
            suffix: suffix.into_bytes().into(),
        }
    }

    /// Appends the welcome frame for connection `<shard>-<id>` to `out`.
    pub fn write(&self, out: &mut Vec<u8>, shard: usize, id: u64) {
        let mut digits = [0u8; 48];
        let conn = {
            use std::io::Write as _;
            let mut cur = std::io::Cursor::new(&mut digits[..]);
            // Two integers and a dash always fit in 48 bytes.
            write!(cur, "{shard}-{id}").expect("fits");
            let n = cur.position() as usize;
            &digits[..n]
        };
        let len = self.prefix.len() + conn.len() + self.suffix.len();
        out.push(0x80 | OpCode::Text.bits());
        // The node id is at most 64 bytes (config validation) or a hostname: the
        // payload always fits a 16-bit length.
        match len {
            0..=125 => out.push(len as u8),
            _ => {
                out.push(126);
                out.extend_from_slice(&(len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(self.prefix);
        out.extend_from_slice(conn);
        out.extend_from_slice(&self.suffix);
    }
}

/// `subscribed` / `unsubscribed` reply as a frame.
pub fn ack(kind: &str, topic: &str, reference: Option<&RawValue>) -> Bytes {
    let mut s = format!("{{\"type\":\"{kind}\",\"topic\":");
    push_json_str(&mut s, topic);
    push_ref(&mut s, reference);
    s.push('}');
    text(s)
}

/// `subscribed` reply to a subscribe that carried `since`: `recovered` true (what was
/// missed follows, then what is new) or false with the reason. `epoch` is the topic's
/// history epoch when there is one.
pub fn resumed(
    topic: &str,
    outcome: Result<(), NotRecovered>,
    epoch: Option<&str>,
    reference: Option<&RawValue>,
) -> Bytes {
    let mut s = String::from("{\"type\":\"subscribed\",\"topic\":");
    push_json_str(&mut s, topic);
    match outcome {
        Ok(()) => s.push_str(",\"recovered\":true"),
        Err(why) => {
            s.push_str(",\"recovered\":false,\"reason\":\"");
            s.push_str(why.as_str());
            s.push('"');
        }
    }
    if let Some(e) = epoch {
        s.push_str(",\"epoch\":");
        push_json_str(&mut s, e);
    }
    push_ref(&mut s, reference);
    s.push('}');
    text(s)
}

/// `acked` reply (sent only when the ack carried a `ref`): `removed` messages went.
pub fn acked(id: &str, removed: usize, reference: Option<&RawValue>) -> Bytes {
    let mut s = String::from("{\"type\":\"acked\",\"id\":");
    push_json_str(&mut s, id);
    s.push_str(",\"removed\":");
    s.push_str(&removed.to_string());
    push_ref(&mut s, reference);
    s.push('}');
    text(s)
}

/// `refreshed` reply: the connection now lives until `exp` (Unix seconds, before the
/// leeway).
pub fn refreshed(exp: u64, reference: Option<&RawValue>) -> Bytes {
    let mut s = format!("{{\"type\":\"refreshed\",\"exp\":{exp}");
    push_ref(&mut s, reference);
    s.push('}');
    text(s)
}

/// `published` reply (sent only when the publish carried a `ref`).
pub fn published(topic: &str, id: &str, reference: Option<&RawValue>) -> Bytes {
    let mut s = String::from("{\"type\":\"published\",\"topic\":");
    push_json_str(&mut s, topic);
    s.push_str(",\"id\":");
    push_json_str(&mut s, id);
    push_ref(&mut s, reference);
    s.push('}');
    text(s)
}

/// `error` frame.
pub fn error(code: ErrorCode, message: &str, reference: Option<&RawValue>) -> Bytes {
    let mut s = String::from("{\"type\":\"error\",\"code\":\"");
    s.push_str(code.as_str());
    s.push_str("\",\"message\":");
    push_json_str(&mut s, message);
    push_ref(&mut s, reference);
    s.push('}');
    text(s)
}

/// A topic `message` frame: built once, written to every subscriber.
/// `epoch`: the topic's history epoch (with `id`, what a client resumes from), when
/// the message is kept in history.
pub fn message(topic: &str, id: &str, epoch: Option<&str>, data: &RawValue) -> Bytes {
    message_to("topic", topic, id, epoch, data)
}

/// A direct `message` frame for one user: built once per user per shard.
pub fn direct(user: &str, id: &str, data: &RawValue) -> Bytes {
    message_to("user", user, id, None, data)
}

/// `{"type":"message","<field>":<name>,"id":<id>[,"epoch":<epoch>],"data":<data>}`.
fn message_to(field: &str, name: &str, id: &str, epoch: Option<&str>, data: &RawValue) -> Bytes {
    let mut s = String::with_capacity(48 + name.len() + id.len() + data.get().len());
    s.push_str("{\"type\":\"message\",\"");
    s.push_str(field);
    s.push_str("\":");
    push_json_str(&mut s, name);
    s.push_str(",\"id\":");
    push_json_str(&mut s, id);
    if let Some(e) = epoch {
        s.push_str(",\"epoch\":");
        push_json_str(&mut s, e);
    }
    s.push_str(",\"data\":");
    s.push_str(data.get());
    s.push('}');
    text(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(f: &Bytes) -> serde_json::Value {
        let h = frame::parse_header(f).unwrap();
        serde_json::from_slice(&f[h.header_len..]).unwrap()
    }

    #[test]
    fn parses_each_op_and_ignores_unknown_fields() {
        let r = parse(
            r#"{"op":"subscribe","topic":"a","since":{"offset":"17-3","epoch":"e1"},"x":1,"ref":7}"#,
            64,
        )
        .unwrap();
        assert!(
            matches!(r.op, Op::Subscribe { ref topic, since: Some(ref s) }
            if topic == "a" && s.offset == MessageId { ms: 17, seq: 3 } && s.epoch == "e1")
        );
        assert_eq!(r.reference.unwrap().get(), "7");
        let r = parse(r#"{"op":"unsubscribe","topic":"a"}"#, 64).unwrap();
        assert!(matches!(r.op, Op::Unsubscribe { .. }));
        let r = parse(r#"{"op":"publish","topic":"a","data":{"k":[1,2]}}"#, 64).unwrap();
        assert!(matches!(r.op, Op::Publish { data, .. } if data.get() == r#"{"k":[1,2]}"#));
        let r = parse(r#"{"op":"publish","topic":"a"}"#, 64).unwrap();
        assert!(matches!(r.op, Op::Publish { data, .. } if data.get() == "null"));
        let r = parse(r#"{"op":"refresh","token":"a.b.c","ref":1}"#, 64).unwrap();
        assert!(matches!(r.op, Op::Refresh { ref token } if token == "a.b.c"));
        let e = parse(r#"{"op":"refresh","token":5,"ref":2}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadRequest);
        assert_eq!(e.reference.unwrap().get(), "2");
    }

    #[test]
    fn escaped_topic_is_decoded() {
        let r = parse(r#"{"op":"subscribe","topic":"caf\u00e9"}"#, 64).unwrap();
        assert!(matches!(r.op, Op::Subscribe { ref topic, .. } if topic == "café"));
    }

    #[test]
    fn rejections_carry_code_and_ref() {
        let e = parse("not json", 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadJson);
        let e = parse("[1,2]", 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadJson);
        let e = parse(r#"{"op":"dance","ref":"r1"}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::UnknownOp);
        assert_eq!(e.reference.unwrap().get(), "\"r1\"");
        let e = parse(r#"{"topic":"a"}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::UnknownOp);
        let e = parse(r#"{"op":"subscribe"}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadRequest);
        let e = parse(r#"{"op":"subscribe","topic":5,"ref":"r2"}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadRequest);
        assert_eq!(e.reference.unwrap().get(), "\"r2\"");
        let e = parse(r#"{"op":7}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadRequest);
        let r = parse(r#"{"op":"subscribe","topic":"t","ref":null}"#, 64).unwrap();
        assert_eq!(r.reference.unwrap().get(), "null");
        let e = parse(r#"{"op":"subscribe","topic":""}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadTopic);
        let long = format!(r#"{{"op":"subscribe","topic":"{}"}}"#, "x".repeat(65));
        assert_eq!(parse(&long, 64).unwrap_err().error, ErrorCode::BadTopic);
        let e = parse(r#"{"op":"subscribe","topic":"a\nb"}"#, 64).unwrap_err();
        assert_eq!(e.error, ErrorCode::BadTopic);
    }

    #[test]
    fn since_must_be_an_offset_and_an_epoch() {
        for bad in [
            r#""1-0""#,
            r#"{"offset":"1-0"}"#,
            r#"{"epoch":"e"}"#,
            r#"{"offset":"1","epoch":"e"}"#,
            r#"{"offset":"-1-0","epoch":"e"}"#,
            r#"{"offset":"1-x","epoch":"e"}"#,
            r#"{"offset":"1-0","epoch":""}"#,
            r#"{"offset":1,"epoch":"e"}"#,
        ] {
            let text = format!(r#"{{"op":"subscribe","topic":"t","since":{bad},"ref":1}}"#);
            let e = parse(&text, 64).unwrap_err();
            assert_eq!(
                (e.error, e.reference.map(RawValue::get)),
                (ErrorCode::BadRequest, Some("1")),
                "{bad}"
            );
        }
    }

    #[test]
    fn message_ids_order_as_offsets() {
        let a: MessageId = "1700000000000-9".parse().unwrap();
        let b: MessageId = "1700000000000-10".parse().unwrap();
        let c: MessageId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert!("99999999999999999999999-0".parse::<MessageId>().is_err());
    }

    #[test]
    fn resumed_answers_say_whether_and_why() {
        let ok = payload(&resumed("t", Ok(()), Some("e1"), None));
        assert_eq!(
            ok,
            serde_json::json!({"type":"subscribed","topic":"t","recovered":true,"epoch":"e1"})
        );
        let r = RawValue::from_string("5".into()).unwrap();
        let no = payload(&resumed("t", Err(NotRecovered::TooOld), None, Some(&r)));
        assert_eq!(
            no,
            serde_json::json!({"type":"subscribed","topic":"t","recovered":false,"reason":"too_old","ref":5})
        );
    }

    #[test]
    fn welcome_template_matches_the_allocating_builder() {
        for node in ["n1", "host-\"quoted\"", &"x".repeat(120)] {
            let mut out = Vec::new();
            WelcomeTemplate::new(node).write(&mut out, 1, 42);
            assert_eq!(out, welcome("1-42", node).to_vec(), "{node}");
        }
    }

    #[test]
    fn server_messages_are_valid_json() {
        let r = RawValue::from_string("{\"n\":1}".into()).unwrap();
        let m = payload(&message("t\"q", "5-1", None, &r));
        assert_eq!(
            m,
            serde_json::json!({"type":"message","topic":"t\"q","id":"5-1","data":{"n":1}})
        );
        let m = payload(&message("t", "5-1", Some("e7"), &r));
        assert_eq!(
            m,
            serde_json::json!({"type":"message","topic":"t","id":"5-1","epoch":"e7","data":{"n":1}})
        );
        let reference = RawValue::from_string("[1]".into()).unwrap();
        let e = payload(&error(ErrorCode::BadTopic, "no \"way\"", Some(&reference)));
        assert_eq!(
            e,
            serde_json::json!({"type":"error","code":"bad_topic","message":"no \"way\"","ref":[1]})
        );
        let w = payload(&welcome("0.1", "node-a"));
        assert_eq!(
            w,
            serde_json::json!({"type":"welcome","conn":"0.1","node":"node-a"})
        );
        let a = payload(&ack("subscribed", "t", None));
        assert_eq!(a, serde_json::json!({"type":"subscribed","topic":"t"}));
    }
}
