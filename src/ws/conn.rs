//! The connection task: the I/O shell around the handshake parser, the frame reader
//! and the protocol state machine (`session`), whose effects it carries out against the
//! shard. One task per connection; it alone reads the socket, and writes what a tick
//! could not.
//!
//! Memory: an idle connection owns no read buffer. The task waits for readiness
//! (io_uring PollAdd or epoll), then reads with `recv(MSG_DONTWAIT)` into the shard's
//! scratch buffer. Only a frame cut by the end of a read is copied into a
//! per-connection buffer, which is freed as soon as the frame is complete.
//!
//! Lifecycle: handshake (own timeout) → open → closing (our close frame sent, write
//! side shut, waiting for the peer's close or EOF, bounded by the sweeper) → done. Every
//! registered connection is unregistered exactly once, with its close reason.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::handshake::{self, Endpoint, Parsed, Refusal};
use super::reader::{Event, Flow, Reader};
use super::session::{Effects, Limits, Session, State};
use crate::auth::Identity;
use crate::metrics::CloseReason;
use crate::protocol::{MessageId, Since};
use crate::registry::{ConnKey, SubscribeError};
use crate::shard::outbound::{ConnHandle, ShardClose};
use crate::shard::{Shard, SCRATCH_BYTES};
use crate::sys;

/// Serves one accepted socket until it closes. The caller has counted it in
/// the shard's handshakes in progress; this lowers the count when the upgrade ends.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    // Everything the upgrade needs lives in this boxed future and is freed when it
    // ends: an established connection's task holds only its `Conn` and the read loop.
    // `handshaking` was raised by the accept loop when it spawned this task.
    let upgraded = Box::pin(upgrade(shard.clone(), stream)).await;
    shard.handshake_ended();
    drop(shard); // the connection holds its own reference from here on
    let Some(mut conn) = upgraded else {
        return;
    };
    let why = conn.run().await;
    conn.io.shard.unregister(conn.io.key, why);
}

/// Runs the handshake under its timeout, registers the connection and sends the 101
/// response with the welcome frame. `None` when refused, abandoned or timed out.
async fn upgrade(shard: Rc<Shard>, mut stream: TcpStream) -> Option<Conn> {
    let _ = stream.set_nodelay(true);
    let limit = Duration::from_millis(shard.cfg().handshake_timeout_ms);
    let (upgrade, user, leftover) =
        match monoio::time::timeout(limit, handshake(&shard, &mut stream)).await {
            Ok(u) => u?,
            Err(_) => {
                shard.metrics.handshake_timeouts.inc();
                return None;
            }
        };
    let endpoint = upgrade.endpoint;
    let fd = stream.as_raw_fd();
    let (key, handle) = shard.register(fd, user.as_ref());
    // The 101 response and the welcome frame leave in one send, built in the shard's
    // buffer; what the socket does not take goes through the connection's queue like
    // any other frame.
    {
        let m = &shard.metrics;
        let mut out = shard.response.borrow_mut();
        out.clear();
        let bearer;
        let selected = match upgrade.subprotocol {
            Some(handshake::Subprotocol::V1) => Some(handshake::SUBPROTOCOL),
            Some(handshake::Subprotocol::Bearer) => {
                bearer = format!("bearer.{}", upgrade.token.as_deref().unwrap_or(""));
                Some(bearer.as_str())
            }
            None => None,
        };
        handshake::write_switching_protocols(&mut out, &upgrade.accept, selected);
        let welcome = endpoint == Endpoint::Gateway;
        if welcome {
            shard.welcome.write(&mut out, shard.index, handle.id);
        }
        let sent = match sys::send_nonblocking(fd, &out) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => 0,
            Err(_) => {
                drop(out);
                shard.unregister(key, CloseReason::IoError);
                return None;
            }
        };
        m.bytes_out.add(sent as u64);
        if sent < out.len() {
            // Counted as a frame when the connection task writes it.
            handle.push_rest(&out, sent, m);
        } else if welcome {
            m.frames_out.inc();
        }
    }
    // What waits unacknowledged for this user goes right behind the welcome.
    if endpoint == Endpoint::Gateway {
        shard.give_unacked(key, &handle);
    }
    // Accepted just before the drain began: upgrade it and ask it, like every other
    // client, to reconnect elsewhere, rather than refuse the handshake.
    if shard.draining() {
        handle.request_close(ShardClose::Shutdown);
    }
    Some(Conn {
        stream,
        fd,
        reader: Reader::default(),
        pending: leftover,
        write_shut: false,
        session: Session::new(endpoint),
        io: Io { shard, handle, key },
    })
}

/// Reads the upgrade request and identifies the client; answers a refusal itself.
/// Returns the upgrade, the user (if identified) and any bytes pipelined behind the
/// request; `None` when refused or abandoned.
async fn handshake(
    shard: &Shard,
    stream: &mut TcpStream,
) -> Option<(handshake::Upgrade, Option<Rc<str>>, Vec<u8>)> {
    let cfg = shard.cfg();
    let fd = stream.as_raw_fd();
    let mut buf = Vec::new();
    // The request usually arrives with the connection: read first, wait only if empty.
    let mut wait = false;
    loop {
        if wait {
            stream.readable(false).await.ok()?;
        }
        wait = true;
        {
            let mut scratch = shard.scratch.borrow_mut();
            let room = (cfg.max_header_bytes + 1)
                .saturating_sub(buf.len())
                .clamp(1, scratch.len());
            match sys::recv_nonblocking(fd, &mut scratch[..room]) {
                Ok(0) => return None,
                Ok(n) => buf.extend_from_slice(&scratch[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    continue
                }
                Err(_) => return None,
            }
        }
        let refusal =
            match handshake::parse(&buf, cfg.max_header_bytes, cfg.echo, &cfg.allowed_origins) {
                Ok(Parsed::Partial) => continue,
                // Room is held before the token is checked (the costly part), and given
                // back if the client is refused; `unregister` gives back the rest.
                Ok(Parsed::Upgrade(_)) if !shard.node.reserve_connection(cfg.max_connections) => {
                    Refusal::Full
                }
                Ok(Parsed::Upgrade(u)) => match shard.node.auth.identify(u.token.as_deref()) {
                    Ok(identity) => {
                        // Frames pipelined behind the request, if any; no allocation otherwise.
                        let leftover = if buf.len() > u.request_len {
                            buf[u.request_len..].to_vec()
                        } else {
                            Vec::new()
                        };
                        let user = match identity {
                            Identity::User(u) => Some(Rc::from(&*u)),
                            Identity::Anonymous => None,
                        };
                        return Some((u, user, leftover));
                    }
                    Err(e) => {
                        shard.node.release_connection();
                        Refusal::Unauthorized(e)
                    }
                },
                Err(r) => r,
            };
        shard.metrics.refused(refusal).inc();
        let _ = stream.write_all(refusal.response()).await;
        return None;
    }
}

struct Conn {
    stream: TcpStream,
    fd: RawFd,
    reader: Reader,
    /// Bytes of a frame cut by the end of a read; empty (no allocation) otherwise.
    pending: Vec<u8>,
    write_shut: bool,
    session: Session,
    io: Io,
}

/// The session's effects, carried out against the shard (split from `Conn` so the
/// reader can borrow the pending buffer while the session runs).
struct Io {
    shard: Rc<Shard>,
    handle: Rc<ConnHandle>,
    key: ConnKey,
}

impl Effects for Io {
    fn send(&mut self, frame: Bytes) {
        self.shard.reply(&self.handle, frame);
    }
    fn send_error(&mut self, frame: Bytes) {
        self.shard.reply_error(&self.handle, frame);
    }
    fn closing(&mut self, frame: Bytes, why: CloseReason) {
        self.handle.push_unbounded(frame, &self.shard.metrics);
        self.handle.closing_why.set(why);
        self.handle.closing_since.set(self.shard.now());
    }
    fn ack(&mut self, id: MessageId, reference: Option<&RawValue>) {
        self.shard.ack(self.key, &self.handle, id, reference);
    }
    fn subscribe(
        &mut self,
        topic: &str,
        since: Option<&Since<'_>>,
        reference: Option<&RawValue>,
    ) -> Result<(), SubscribeError> {
        self.shard
            .subscribe(self.key, &self.handle, topic, since, reference)
    }
    fn unsubscribe(&mut self, topic: &str) {
        self.shard.unsubscribe(self.key, &self.handle, topic);
    }
    fn publish(&mut self, topic: &str, data: &RawValue, reference: Option<&RawValue>) {
        self.shard.publish(&self.handle, topic, data, reference);
    }
}

// === impl Conn ===

impl Conn {
    async fn run(&mut self) -> CloseReason {
        if !self.pending.is_empty() {
            let mut first = std::mem::take(&mut self.pending);
            self.on_data(&mut first);
        }
        loop {
            if let Some(why) = self.io.handle.aborted() {
                return self.session.why().unwrap_or(why);
            }
            let finishing = self.session.state() != State::Open;
            if self.io.handle.task_owes(finishing) || self.needs_shutdown() {
                // Boxed: the write path's state exists only while writing, not in every
                // idle connection's task.
                if let Err(why) = Box::pin(self.flush()).await {
                    return why;
                }
            }
            if self.session.state() == State::Done {
                return self.session.why().unwrap_or(CloseReason::Client);
            }
            if let Some(req) = self.io.handle.take_close_request() {
                self.session.on_close_request(req, &mut self.io);
                continue;
            }
            let readable = monoio::select! {
                r = self.stream.readable(false) => Some(r.is_ok()),
                _ = self.io.handle.work() => None,
            };
            match readable {
                Some(false) => return CloseReason::IoError,
                Some(true) => {
                    if let Err(why) = self.read_ready() {
                        return why;
                    }
                }
                None => {}
            }
        }
    }

    /// Reads what the socket has (bounded per wake-up for fairness) and handles it.
    fn read_ready(&mut self) -> Result<(), CloseReason> {
        let shard = self.io.shard.clone();
        let mut scratch = shard.scratch.borrow_mut();
        let mut total = 0;
        loop {
            match sys::recv_nonblocking(self.fd, &mut scratch) {
                Ok(0) => return Err(self.session.why().unwrap_or(CloseReason::Client)),
                Ok(n) => {
                    total += n;
                    shard.metrics.bytes_in.add(n as u64);
                    self.io.handle.last_rx.set(shard.now());
                    self.io.handle.ping_sent.set(false);
                    self.on_data(&mut scratch[..n]);
                    if self.session.state() == State::Done
                        || n < scratch.len()
                        || total >= 4 * SCRATCH_BYTES
                    {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(self.session.why().unwrap_or(CloseReason::IoError)),
            }
        }
    }

    /// Feeds received bytes to the frame reader, keeping a cut frame for later.
    fn on_data(&mut self, data: &mut [u8]) {
        if !self.session.reads_input() {
            return;
        }
        let cfg = self.io.shard.cfg();
        let max = cfg.max_message_bytes;
        let limits = Limits {
            max_topic_bytes: cfg.max_topic_bytes,
            max_subscriptions: cfg.max_subscriptions,
            client_publish: cfg.client_publish,
        };
        let (session, io) = (&mut self.session, &mut self.io);
        let mut handler = |ev: Event<'_>| {
            io.shard.metrics.frames_in.inc();
            session.on_event(ev, &limits, io)
        };
        let result = if self.pending.is_empty() {
            let r = self.reader.feed(data, max, &mut handler);
            if let Ok(fed) = &r {
                if fed.flow == Flow::Continue && fed.consumed < data.len() {
                    let need = fed.pending_frame.unwrap_or(0).min(max + 14);
                    self.pending.reserve(need);
                    self.pending.extend_from_slice(&data[fed.consumed..]);
                }
            }
            r.map(|_| ())
        } else {
            self.pending.extend_from_slice(data);
            let r = self.reader.feed(&mut self.pending, max, &mut handler);
            match &r {
                Ok(fed) if fed.flow == Flow::Continue => {
                    self.pending.drain(..fed.consumed);
                }
                _ => self.pending.clear(),
            }
            if self.pending.is_empty() {
                self.pending = Vec::new();
            }
            r.map(|_| ())
        };
        if let Err(e) = result {
            self.session.on_read_error(e, &mut self.io);
        }
    }

    /// Our close frame is queued or out and the write side is still open.
    fn needs_shutdown(&self) -> bool {
        matches!(self.session.state(), State::Closing { .. }) && !self.write_shut
    }

    /// Writes everything queued. After our close frame is out, shuts the write side.
    async fn flush(&mut self) -> Result<(), CloseReason> {
        let handle = self.io.handle.clone();
        let metrics = &self.io.shard.metrics;
        while let Some((buf, frames)) = handle.take_batch() {
            let len = buf.len();
            handle.writing_since.set(self.io.shard.now());
            let written = monoio::select! {
                r = self.stream.write_all(buf) => Some(r.0),
                _ = handle.aborted_signal() => None,
            };
            handle.writing_since.set(0);
            match written {
                Some(Ok(_)) => {}
                Some(Err(_)) => return Err(self.session.why().unwrap_or(CloseReason::IoError)),
                None => {
                    return Err(self
                        .session
                        .why()
                        .or(handle.aborted())
                        .unwrap_or(CloseReason::IoError))
                }
            }
            handle.written(len);
            metrics.frames_out.add(frames);
            metrics.bytes_out.add(len as u64);
        }
        if self.needs_shutdown() {
            self.write_shut = true;
            let _ = monoio::io::AsyncWriteRent::shutdown(&mut self.stream).await;
        }
        Ok(())
    }
}
