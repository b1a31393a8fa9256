//! A connection's protocol state machine, without I/O: WebSocket events in (from
//! `reader`), effects out (through [`Effects`]). It owns the connection's state (open,
//! closing, done), answers pings and closes, turns text messages into protocol v1
//! requests and decides every close the connection itself starts. The connection task
//! (`conn`) feeds it and carries out its effects against the socket and the shard; the
//! tests below drive it with bytes and read the effects back.

use bytes::Bytes;
use serde_json::value::RawValue;

use super::frame::{self, OpCode};
use super::handshake::Endpoint;
use super::reader::{Event, Flow, ReadError};
use crate::close::CloseRequest;
use crate::limits::Admit;
use crate::metrics::CloseReason;
use crate::permissions::Refused;
use crate::protocol::{self, ErrorCode, MessageId, Op, Since};
use crate::registry::SubscribeError;

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Open,
    /// Our close frame is queued or sent. `discard`: input after a protocol error is
    /// not parsed any more.
    Closing {
        discard: bool,
    },
    /// Nothing more to read: flush and drop the socket.
    Done,
}

/// What the session asks of the world. Implemented by the connection task against the
/// shard, and by the tests as a recording.
pub trait Effects {
    /// Queue a frame for the client, bounded like every frame (a client that sends
    /// requests or pings and never reads becomes a slow consumer).
    fn send(&mut self, frame: Bytes);
    /// Queue a frame for a refused request (counted as an error frame).
    fn send_error(&mut self, frame: Bytes);
    /// Queue our close frame, or the answer to the client's, whatever the queue holds;
    /// the connection is closing from now on, counted under `why`.
    fn closing(&mut self, frame: Bytes, why: CloseReason);
    /// Subscribe, resuming from `since` when given; the `subscribed` reply (echoing
    /// `reference`) goes out once the subscription holds.
    fn subscribe(
        &mut self,
        topic: &str,
        since: Option<&Since<'_>>,
        reference: Option<&RawValue>,
    ) -> Result<(), SubscribeError>;
    fn unsubscribe(&mut self, topic: &str);
    /// Whether the client may send one more message now (`client_messages_per_sec`).
    fn admit(&mut self) -> Admit;
    /// Whether this client may subscribe to (`publish` false) or publish on `topic`:
    /// its token's grants and the topic's namespace (`crate::permissions`).
    fn permit(&self, publish: bool, topic: &str) -> Result<(), Refused>;
    /// Publish a client's message (permitted: checked here).
    fn publish(&mut self, topic: &str, data: &RawValue, reference: Option<&RawValue>);
    /// Acknowledge direct messages up to `id`.
    fn ack(&mut self, id: MessageId, reference: Option<&RawValue>);
    /// Present a newer token (answers `refreshed` or `bad_token`).
    fn refresh(&mut self, token: &str, reference: Option<&RawValue>);
}

/// The configuration a session reads (the values in force when the event arrives).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_topic_bytes: usize,
    pub max_subscriptions: usize,
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    endpoint: Endpoint,
    state: State,
    why: Option<CloseReason>,
}

impl Session {
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            state: State::Open,
            why: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Why the connection is closing, once it is.
    pub fn why(&self) -> Option<CloseReason> {
        self.why
    }

    /// Whether input is still parsed (not after a protocol error, nor once done).
    pub fn reads_input(&self) -> bool {
        !matches!(self.state, State::Closing { discard: true } | State::Done)
    }

    /// One WebSocket event from the client.
    pub fn on_event(&mut self, ev: Event<'_>, limits: &Limits, fx: &mut impl Effects) -> Flow {
        match self.state {
            State::Open => {}
            State::Closing { .. } => {
                if let Event::Close(..) = ev {
                    self.state = State::Done;
                    return Flow::Stop;
                }
                return Flow::Continue;
            }
            State::Done => return Flow::Stop,
        }
        match ev {
            Event::Ping(payload) => fx.send(frame::server_frame(OpCode::Pong, payload)),
            Event::Pong(_) => {}
            Event::Close(code, _) => {
                let reply = match code {
                    Some(c) => frame::close_frame(c, ""),
                    None => frame::server_frame(OpCode::Close, b""),
                };
                fx.closing(reply, CloseReason::Client);
                self.why = Some(CloseReason::Client);
                self.state = State::Done;
                return Flow::Stop;
            }
            Event::Text(text) => match self.endpoint {
                Endpoint::Echo => fx.send(frame::server_frame(OpCode::Text, text.as_bytes())),
                Endpoint::Gateway => match fx.admit() {
                    Admit::Yes => self.on_request(text, limits, fx),
                    // Not parsed: a client over its rate costs as little as possible.
                    Admit::Limited => fx.send_error(protocol::error(
                        ErrorCode::RateLimited,
                        "more messages than client_messages_per_sec allows: this one was not handled",
                        None,
                    )),
                    Admit::Strikeout => {
                        self.close(CloseRequest::RATE_LIMITED, true, fx);
                        return Flow::Stop;
                    }
                },
            },
            Event::Binary(data) => match self.endpoint {
                Endpoint::Echo => fx.send(frame::server_frame(OpCode::Binary, data)),
                Endpoint::Gateway => {
                    self.close(CloseRequest::BINARY_FRAME, true, fx);
                    return Flow::Stop;
                }
            },
        }
        Flow::Continue
    }

    /// The frame reader gave up: close with the code that says why, and read no more.
    pub fn on_read_error(&mut self, e: ReadError, fx: &mut impl Effects) {
        let req = CloseRequest {
            code: e.close_code(),
            reason: e.reason(),
            why: CloseReason::ProtocolError,
        };
        self.close(req, true, fx);
    }

    /// A close the shard asked for (idle timeout, slow consumer, drain).
    pub fn on_close_request(&mut self, req: CloseRequest, fx: &mut impl Effects) {
        self.close(req, false, fx);
    }

    /// Queues our close frame (once) and enters the closing state.
    fn close(&mut self, req: CloseRequest, discard: bool, fx: &mut impl Effects) {
        if self.state != State::Open {
            return;
        }
        fx.closing(frame::close_frame(req.code, req.reason), req.why);
        self.why = Some(req.why);
        self.state = State::Closing { discard };
    }

    /// One protocol v1 request.
    fn on_request(&mut self, text: &str, limits: &Limits, fx: &mut impl Effects) {
        let req = match protocol::parse(text, limits.max_topic_bytes) {
            Ok(r) => r,
            Err(rej) => {
                return fx.send_error(protocol::error(rej.error, &rej.message, rej.reference))
            }
        };
        let reference = req.reference;
        match req.op {
            Op::Subscribe { topic, since } => {
                if fx.permit(false, &topic).is_err() {
                    return fx.send_error(protocol::error(
                        ErrorCode::Forbidden,
                        "this connection may not subscribe to this topic",
                        reference,
                    ));
                }
                if let Err(SubscribeError::TooMany) =
                    fx.subscribe(&topic, since.as_ref(), reference)
                {
                    let msg = format!(
                        "at most {} subscriptions per connection",
                        limits.max_subscriptions
                    );
                    fx.send_error(protocol::error(
                        ErrorCode::TooManySubscriptions,
                        &msg,
                        reference,
                    ));
                }
            }
            Op::Unsubscribe { topic } => {
                fx.unsubscribe(&topic);
                fx.send(protocol::ack("unsubscribed", &topic, reference));
            }
            Op::Publish { topic, data } => match fx.permit(true, &topic) {
                Ok(()) => fx.publish(&topic, data, reference),
                Err(Refused::PublishOff) => fx.send_error(protocol::error(
                    ErrorCode::PublishForbidden,
                    "client publishing is disabled on this gateway",
                    reference,
                )),
                Err(Refused::Forbidden) => fx.send_error(protocol::error(
                    ErrorCode::Forbidden,
                    "this connection may not publish to this topic",
                    reference,
                )),
            },
            Op::Ack { id } => fx.ack(id, reference),
            Op::Refresh { token } => fx.refresh(&token, reference),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::reader::Reader;

    /// What a session asked for, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Did {
        Send(String),
        Error(String),
        Closing(Vec<u8>, CloseReason),
        Subscribe(String),
        Unsubscribe(String),
        Ack(String),
        Refresh(String),
        Publish(String, String),
    }

    #[derive(Default)]
    struct Recording {
        did: Vec<Did>,
        max: usize,
        topics: Vec<String>,
        /// Anyone may publish anywhere.
        client_publish: bool,
        /// Topics this client may neither subscribe to nor publish on.
        forbidden: Vec<&'static str>,
        /// What `admit` answers, in turn (then `Yes`).
        admits: Vec<Admit>,
    }

    /// The payload of one server frame (unmasked, under 64 KiB).
    fn payload(frame: &Bytes) -> Vec<u8> {
        match frame[1] & 0x7f {
            126 => frame[4..4 + u16::from_be_bytes([frame[2], frame[3]]) as usize].to_vec(),
            len => frame[2..2 + len as usize].to_vec(),
        }
    }

    fn text(frame: &Bytes) -> String {
        String::from_utf8(payload(frame)).unwrap()
    }

    impl Effects for Recording {
        fn send(&mut self, frame: Bytes) {
            self.did.push(Did::Send(text(&frame)));
        }
        fn send_error(&mut self, frame: Bytes) {
            let v: serde_json::Value = serde_json::from_str(&text(&frame)).unwrap();
            self.did
                .push(Did::Error(v["code"].as_str().unwrap().to_owned()));
        }
        fn closing(&mut self, frame: Bytes, why: CloseReason) {
            self.did.push(Did::Closing(payload(&frame), why));
        }
        fn subscribe(
            &mut self,
            topic: &str,
            _: Option<&Since<'_>>,
            reference: Option<&RawValue>,
        ) -> Result<(), SubscribeError> {
            if self.topics.len() >= self.max {
                return Err(SubscribeError::TooMany);
            }
            self.topics.push(topic.to_owned());
            self.did.push(Did::Subscribe(topic.to_owned()));
            self.send(protocol::ack("subscribed", topic, reference));
            Ok(())
        }
        fn unsubscribe(&mut self, topic: &str) {
            self.did.push(Did::Unsubscribe(topic.to_owned()));
        }
        fn admit(&mut self) -> Admit {
            if self.admits.is_empty() {
                Admit::Yes
            } else {
                self.admits.remove(0)
            }
        }
        fn permit(&self, publish: bool, topic: &str) -> Result<(), Refused> {
            if self.forbidden.contains(&topic) {
                Err(Refused::Forbidden)
            } else if publish && !self.client_publish {
                Err(Refused::PublishOff)
            } else {
                Ok(())
            }
        }
        fn publish(&mut self, topic: &str, data: &RawValue, _: Option<&RawValue>) {
            self.did
                .push(Did::Publish(topic.to_owned(), data.get().to_owned()));
        }
        fn ack(&mut self, id: MessageId, _: Option<&RawValue>) {
            self.did.push(Did::Ack(id.to_string()));
        }
        fn refresh(&mut self, token: &str, _: Option<&RawValue>) {
            self.did.push(Did::Refresh(token.to_owned()));
        }
    }

    const LIMITS: Limits = Limits {
        max_topic_bytes: 64,
        max_subscriptions: 2,
    };

    /// Feeds raw client bytes through a reader into `session`, as the connection does.
    fn feed(session: &mut Session, limits: &Limits, bytes: &[u8]) -> Recording {
        feed_to(session, limits, bytes, Recording::default())
    }

    /// The same, into a given recording (for its permissions).
    fn feed_to(session: &mut Session, limits: &Limits, bytes: &[u8], fx: Recording) -> Recording {
        let mut fx = Recording {
            max: limits.max_subscriptions,
            ..fx
        };
        let mut buf = bytes.to_vec();
        let mut reader = Reader::default();
        let result = reader.feed(&mut buf, 1 << 20, &mut |ev| {
            session.on_event(ev, limits, &mut fx)
        });
        if let Err(e) = result {
            session.on_read_error(e, &mut fx);
        }
        fx
    }

    fn client(op: OpCode, payload: &[u8]) -> Vec<u8> {
        frame::client_frame(op, true, payload, [1, 2, 3, 4]).to_vec()
    }

    #[test]
    fn subscribe_then_unsubscribe_reply_in_order_with_ref() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = client(OpCode::Text, br#"{"op":"subscribe","topic":"a","ref":7}"#);
        bytes.extend(client(OpCode::Text, br#"{"op":"unsubscribe","topic":"a"}"#));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(
            fx.did,
            vec![
                Did::Subscribe("a".into()),
                Did::Send(r#"{"type":"subscribed","topic":"a","ref":7}"#.into()),
                Did::Unsubscribe("a".into()),
                Did::Send(r#"{"type":"unsubscribed","topic":"a"}"#.into()),
            ]
        );
        assert_eq!(s.state(), State::Open);
    }

    #[test]
    fn too_many_subscriptions_is_an_error_frame_and_the_connection_stays() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = Vec::new();
        for t in ["a", "b", "c"] {
            let req = format!(r#"{{"op":"subscribe","topic":"{t}"}}"#);
            bytes.extend(client(OpCode::Text, req.as_bytes()));
        }
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(
            fx.did.last(),
            Some(&Did::Error("too_many_subscriptions".into()))
        );
        assert_eq!(s.state(), State::Open);
    }

    #[test]
    fn bad_requests_get_error_frames_not_closes() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = client(OpCode::Text, b"not json");
        bytes.extend(client(OpCode::Text, br#"{"op":"dance"}"#));
        bytes.extend(client(
            OpCode::Text,
            br#"{"op":"publish","topic":"a","data":1}"#,
        ));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(
            fx.did,
            vec![
                Did::Error("bad_json".into()),
                Did::Error("unknown_op".into()),
                Did::Error("publish_forbidden".into()),
            ]
        );
        assert_eq!(s.state(), State::Open);
    }

    #[test]
    fn publish_passes_data_through_when_allowed() {
        let mut s = Session::new(Endpoint::Gateway);
        let fx = feed_to(
            &mut s,
            &LIMITS,
            &client(
                OpCode::Text,
                br#"{"op":"publish","topic":"a","data":{"x": [1,2]}}"#,
            ),
            Recording {
                client_publish: true,
                ..Recording::default()
            },
        );
        assert_eq!(
            fx.did,
            vec![Did::Publish("a".into(), r#"{"x": [1,2]}"#.into())]
        );
    }

    #[test]
    fn refresh_hands_the_token_on() {
        let mut s = Session::new(Endpoint::Gateway);
        let fx = feed(
            &mut s,
            &LIMITS,
            &client(OpCode::Text, br#"{"op":"refresh","token":"a.b.c"}"#),
        );
        assert_eq!(fx.did, vec![Did::Refresh("a.b.c".into())]);
    }

    #[test]
    fn a_client_over_its_rate_is_refused_then_closed_with_1008() {
        let mut s = Session::new(Endpoint::Gateway);
        let sub = |t: &str| {
            client(
                OpCode::Text,
                format!(r#"{{"op":"subscribe","topic":"{t}"}}"#).as_bytes(),
            )
        };
        let mut bytes = sub("a");
        bytes.extend(sub("b"));
        bytes.extend(sub("c"));
        bytes.extend(sub("d"));
        bytes.extend(sub("e"));
        let fx = feed_to(
            &mut s,
            &LIMITS,
            &bytes,
            Recording {
                admits: vec![Admit::Yes, Admit::Limited, Admit::Strikeout],
                ..Recording::default()
            },
        );
        let mut close = 1008u16.to_be_bytes().to_vec();
        close.extend(b"rate limited");
        assert_eq!(
            fx.did,
            vec![
                Did::Subscribe("a".into()),
                Did::Send(r#"{"type":"subscribed","topic":"a"}"#.into()),
                Did::Error("rate_limited".into()),
                Did::Closing(close, CloseReason::RateLimited),
            ]
        );
        assert!(!s.reads_input(), "nothing after the close is handled");
    }

    #[test]
    fn a_topic_not_permitted_is_refused_and_the_connection_stays_open() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = client(OpCode::Text, br#"{"op":"subscribe","topic":"vip","ref":1}"#);
        bytes.extend(client(
            OpCode::Text,
            br#"{"op":"publish","topic":"vip","data":1}"#,
        ));
        bytes.extend(client(
            OpCode::Text,
            br#"{"op":"subscribe","topic":"open"}"#,
        ));
        let fx = feed_to(
            &mut s,
            &LIMITS,
            &bytes,
            Recording {
                client_publish: true,
                forbidden: vec!["vip"],
                ..Recording::default()
            },
        );
        assert_eq!(
            fx.did,
            vec![
                Did::Error("forbidden".into()),
                Did::Error("forbidden".into()),
                Did::Subscribe("open".into()),
                Did::Send(r#"{"type":"subscribed","topic":"open"}"#.into()),
            ]
        );
        assert_eq!(s.state(), State::Open);
    }

    #[test]
    fn ack_takes_a_message_id_and_refuses_anything_else() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = client(OpCode::Text, br#"{"op":"ack","id":"17-4"}"#);
        bytes.extend(client(OpCode::Text, br#"{"op":"ack","id":"soon","ref":2}"#));
        bytes.extend(client(OpCode::Text, br#"{"op":"ack","ref":3}"#));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(fx.did[0], Did::Ack("17-4".into()));
        assert_eq!(fx.did.len(), 3);
        assert_eq!(
            fx.did[1..],
            [
                Did::Error("bad_request".into()),
                Did::Error("bad_request".into())
            ]
        );
    }

    #[test]
    fn ping_is_answered_with_its_payload() {
        let mut s = Session::new(Endpoint::Gateway);
        let fx = feed(&mut s, &LIMITS, &client(OpCode::Ping, b"hi"));
        assert_eq!(fx.did, vec![Did::Send("hi".into())]);
    }

    #[test]
    fn client_close_is_echoed_and_ends_the_session() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = client(OpCode::Close, &[0x03, 0xe8, b'b', b'y', b'e']);
        bytes.extend(client(
            OpCode::Text,
            br#"{"op":"subscribe","topic":"late"}"#,
        ));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(
            fx.did,
            vec![Did::Closing(vec![0x03, 0xe8], CloseReason::Client)]
        );
        assert_eq!(
            (s.state(), s.why()),
            (State::Done, Some(CloseReason::Client))
        );
    }

    #[test]
    fn binary_on_the_gateway_closes_1003_and_discards_what_follows() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut bytes = client(OpCode::Binary, b"\x00\x01");
        bytes.extend(client(
            OpCode::Text,
            br#"{"op":"subscribe","topic":"late"}"#,
        ));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(fx.did.len(), 1);
        assert!(
            matches!(&fx.did[0], Did::Closing(p, CloseReason::ProtocolError) if p[..2] == [0x03, 0xeb])
        );
        assert_eq!(s.state(), State::Closing { discard: true });
        assert!(!s.reads_input());
    }

    #[test]
    fn framing_errors_close_with_their_code() {
        // An unmasked client frame: 1002.
        let mut s = Session::new(Endpoint::Gateway);
        let fx = feed(&mut s, &LIMITS, &frame::server_frame(OpCode::Text, b"x"));
        assert!(
            matches!(&fx.did[..], [Did::Closing(p, CloseReason::ProtocolError)] if p[..2] == [0x03, 0xea])
        );
        // Invalid UTF-8: 1007.
        let mut s = Session::new(Endpoint::Gateway);
        let fx = feed(&mut s, &LIMITS, &client(OpCode::Text, &[0xff, 0xfe]));
        assert!(matches!(&fx.did[..], [Did::Closing(p, _)] if p[..2] == [0x03, 0xef]));
    }

    #[test]
    fn after_our_close_only_the_clients_close_matters() {
        let mut s = Session::new(Endpoint::Gateway);
        let mut fx = Recording::default();
        s.on_close_request(CloseRequest::IDLE_TIMEOUT, &mut fx);
        assert_eq!(s.state(), State::Closing { discard: false });
        // A second request is ignored: one close frame per connection.
        s.on_close_request(CloseRequest::SHUTDOWN, &mut fx);
        assert_eq!(fx.did.len(), 1);
        let mut bytes = client(OpCode::Text, br#"{"op":"subscribe","topic":"a"}"#);
        bytes.extend(client(OpCode::Close, &[0x03, 0xe9]));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert!(fx.did.is_empty(), "{:?}", fx.did);
        assert_eq!(
            (s.state(), s.why()),
            (State::Done, Some(CloseReason::IdleTimeout))
        );
    }

    #[test]
    fn echo_endpoint_echoes_text_and_binary() {
        let mut s = Session::new(Endpoint::Echo);
        let mut bytes = client(OpCode::Text, b"hello");
        bytes.extend(client(OpCode::Binary, b"bin"));
        let fx = feed(&mut s, &LIMITS, &bytes);
        assert_eq!(
            fx.did,
            vec![Did::Send("hello".into()), Did::Send("bin".into())]
        );
    }
}
