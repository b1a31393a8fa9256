//! A connection: the I/O shell around the handshake parser, the frame reader and the
//! protocol state machine (`session`), whose effects it carries out against the shard.
//! The upgrade runs as a task of its own (`serve`); the established connection is a
//! [`Conn`] held by the shard's reactor (`reactor`), which calls it when its socket is
//! ready or the shard has asked something of it. Nothing here waits.
//!
//! Memory: an idle connection owns no read buffer. It is read with
//! `recv(MSG_DONTWAIT)` into the shard's scratch buffer when the reactor reports it
//! readable. Only a frame cut by the end of a read is copied into a per-connection
//! buffer, which is freed as soon as the frame is complete.
//!
//! Lifecycle: handshake (own timeout) → open → closing (our close frame sent, write
//! side shut, waiting for the peer's close or EOF, bounded by the sweeper) → done. Every
//! registered connection is unregistered exactly once, with its close reason.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use monoio::io::AsyncWriteRentExt;
use monoio::net::TcpStream;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::handshake::{self, Endpoint, Parsed, Refusal};
use super::proxy::{self, Proxied, ProxyProtocol};
use super::reader::{Event, Flow, Reader};
use super::session::{Effects, Limits, Session, State};
use crate::auth::Identity;
use crate::config::Config;
use crate::metrics::CloseReason;
use crate::permissions::{Refused, Rules};
use crate::protocol::{self, ErrorCode, MessageId, Since};
use crate::registry::{ConnKey, SubscribeError};
use crate::shard::outbound::{ConnHandle, ShardClose};
use crate::shard::{Admitted, Shard, SCRATCH_BYTES};
use crate::{sys, tls};

/// Upgrades one accepted socket and hands the connection to the shard's reactor. The
/// caller has counted it in the shard's handshakes in progress; this lowers the count
/// when the upgrade ends.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream, peer: SocketAddr) {
    let upgraded = upgrade(shard.clone(), stream, peer).await;
    shard.handshake_ended();
    if let Some((key, handle, conn)) = upgraded {
        shard.reactor.adopt(&shard, key, &handle, conn);
    }
}

/// Runs the handshake under its timeout, registers the connection and sends the 101
/// response with the welcome frame. `None` when refused, abandoned or timed out.
async fn upgrade(
    shard: Rc<Shard>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<(ConnKey, Rc<ConnHandle>, Conn)> {
    let _ = stream.set_nodelay(true);
    // Declared after `stream` (a parameter), so dropped before it: the socket leaves the
    // shard's list of unfinished upgrades before it can be closed.
    let _pending = Pending {
        id: shard.upgrade_begun(stream.as_raw_fd()),
        shard: &shard,
    };
    let limit = Duration::from_millis(shard.cfg().handshake_timeout_ms);
    let (upgrade, admitted, leftover, session) =
        match monoio::time::timeout(limit, handshake(&shard, &mut stream, peer)).await {
            Ok(u) => u?,
            Err(_) => {
                shard.metrics.handshake_timeouts.inc();
                return None;
            }
        };
    let endpoint = upgrade.endpoint;
    let fd = stream.as_raw_fd();
    let (key, handle) = shard.register(fd, admitted);
    if let Some(session) = session {
        tls::adopt(handle.key.get(), session);
    }
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
        let sent = match tls::send(handle.key.get(), fd, &out) {
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
            // Counted as a frame when the rest is written.
            handle.push_rest(&out, sent, m);
        } else if welcome {
            m.frames_out.inc();
        }
        handle.blocked_if_held();
    }
    // What waits unacknowledged for this user goes right behind the welcome, then the
    // token's server-side subscriptions are joined, each answered `subscribed`.
    if endpoint == Endpoint::Gateway {
        shard.give_unacked(key, &handle);
        join_granted(&shard, key, &handle);
    }
    // Accepted just before the drain began: upgrade it and ask it, like every other
    // client, to reconnect elsewhere, rather than refuse the handshake.
    if shard.draining() {
        handle.request_close(ShardClose::Shutdown);
    }
    let conn = Conn {
        fd: sys::into_owned(stream),
        reader: Reader::default(),
        pending: (!leftover.is_empty()).then(|| Box::new(leftover)),
        write_shut: false,
        read_more: false,
        session: Session::new(endpoint),
    };
    Some((key, handle, conn))
}

/// An upgrade on the shard's list of unfinished ones, taken off when it ends however
/// it ends.
struct Pending<'a> {
    shard: &'a Shard,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.shard.upgrade_done(self.id);
    }
}

/// Joins the topics of the token's `subscribe` claim, as if the client had asked.
fn join_granted(shard: &Shard, key: ConnKey, handle: &Rc<ConnHandle>) {
    let topics = handle
        .with_grants(|g| g.and_then(|g| g.subscribe.clone()))
        .unwrap_or_default();
    let max_topic = shard.cfg().max_topic_bytes;
    for topic in topics.iter() {
        let refused = if protocol::validate_topic(topic, max_topic).is_err() {
            Some((
                ErrorCode::BadTopic,
                "a topic of the token's `subscribe` claim is not a valid topic name",
            ))
        } else if shard.subscribe(key, handle, topic, None, None).is_err() {
            Some((
                ErrorCode::TooManySubscriptions,
                "the token's `subscribe` claim lists more topics than max_subscriptions",
            ))
        } else {
            None
        };
        if let Some((code, message)) = refused {
            shard.reply_error(handle, protocol::error(code, message, None));
        }
    }
}

/// Holds room for one connection against every cap, then checks the token (the costly
/// part); gives back what it held when the client is refused. `unregister` gives back
/// the rest.
fn admit(
    shard: &Shard,
    cfg: &Config,
    peer: Option<IpAddr>,
    token: Option<&str>,
) -> Result<Admitted, Refusal> {
    let node = &shard.node;
    if !node.reserve_connection(cfg.max_connections) {
        return Err(Refusal::Full);
    }
    let ip = peer.filter(|_| cfg.max_connections_per_ip > 0);
    if let Some(ip) = &ip {
        if !node.per_ip.try_add(ip, cfg.max_connections_per_ip) {
            node.release_connection();
            return Err(Refusal::PerIp);
        }
    }
    let give_back = || {
        if let Some(ip) = &ip {
            node.per_ip.remove(ip);
        }
        node.release_connection();
    };
    let auth = node.auth();
    let admitted = match auth.identify(token) {
        Ok(Identity::User { user, grants, exp }) => {
            if !node.per_user.try_add(&*user, cfg.max_connections_per_user) {
                give_back();
                return Err(Refusal::PerUser);
            }
            Admitted {
                user: Some(Rc::from(&*user)),
                grants: grants.kept(),
                ip,
                expires: Some(exp.saturating_add(auth.leeway())),
            }
        }
        Ok(Identity::Anonymous) => Admitted {
            ip,
            ..Admitted::default()
        },
        Err(e) => {
            give_back();
            return Err(Refusal::Unauthorized(e));
        }
    };
    Ok(admitted)
}

/// What a finished upgrade hands on: the request, the client, the bytes pipelined
/// behind the request, and the TLS session on a `wss://` listener.
type Upgraded = (
    handshake::Upgrade,
    Admitted,
    Vec<u8>,
    Option<Box<rustls::ServerConnection>>,
);

/// Reads the PROXY header, runs the TLS handshake, reads the upgrade request and admits
/// the client, each when configured; answers a refusal itself. `None` when refused or
/// abandoned.
/// `peer` is the address `accept` gave (no `getpeername` per connection).
async fn handshake(shard: &Shard, stream: &mut TcpStream, peer: SocketAddr) -> Option<Upgraded> {
    let cfg = shard.cfg();
    let fd = stream.as_raw_fd();
    // An IPv4 client of a dual-stack listener shows as `::ffff:a.b.c.d`: counted and
    // matched against `proxy_trusted` as the IPv4 address it is.
    let mut peer = Some(peer.ip().to_canonical());
    // With the PROXY protocol its header comes first, and only from a trusted balancer;
    // `proxy` is set back to `Off` once the header is read.
    let mut proxy = cfg.proxy_protocol;
    if proxy != ProxyProtocol::Off
        && !peer.is_some_and(|p| cfg.proxy_trusted.iter().any(|net| net.contains(&p)))
    {
        return refuse(shard, stream, None, Refusal::ProxyUntrusted).await;
    }
    // On a `wss://` listener the TLS handshake starts once the PROXY header is read.
    let mut tls = shard.node.tls();
    let mut session: Option<Box<rustls::ServerConnection>> = None;
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
            let header_room = if proxy == ProxyProtocol::Off {
                0
            } else {
                proxy::MAX_HEADER
            };
            let room = (cfg.max_header_bytes + 1 + header_room)
                .saturating_sub(buf.len())
                .clamp(1, scratch.len());
            let read = match session.as_deref_mut() {
                Some(s) => tls::recv_session(s, fd, &mut scratch[..room]),
                None => sys::recv_nonblocking(fd, &mut scratch[..room]),
            };
            match read {
                Ok(0) => return None,
                Ok(n) => buf.extend_from_slice(&scratch[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    continue
                }
                Err(_) => return None,
            }
        }
        if proxy != ProxyProtocol::Off {
            match proxy::parse(&buf, proxy) {
                Proxied::Partial => continue,
                Proxied::Bad => return refuse(shard, stream, None, Refusal::ProxyHeader).await,
                Proxied::Header { len, client } => {
                    buf.drain(..len);
                    peer = client.map(|c| c.to_canonical()).or(peer);
                    proxy = ProxyProtocol::Off;
                    if buf.is_empty() {
                        continue;
                    }
                }
            }
        }
        if let Some(config) = tls.take() {
            // Boxed: the TLS handshake's state (a 4 KiB read buffer among it) would
            // otherwise be part of every upgrade task, plain ones included, and the
            // allocator keeps the pages of a few hundred such tasks in flight.
            match Box::pin(tls::accept(stream, config, &mut buf)).await {
                Ok(s) => session = Some(s),
                Err(tls::Failed::PlainHttp) => {
                    return refuse(shard, stream, None, Refusal::PlainOnTls).await
                }
                Err(tls::Failed::Handshake) => {
                    shard.metrics.refused(Refusal::TlsHandshake).inc();
                    return None;
                }
            }
            if buf.is_empty() {
                continue;
            }
        }
        let refusal =
            match handshake::parse(&buf, cfg.max_header_bytes, cfg.echo, &cfg.allowed_origins) {
                Ok(Parsed::Partial) => continue,
                Ok(Parsed::Upgrade(u)) => match admit(shard, &cfg, peer, u.token.as_deref()) {
                    Ok(admitted) => {
                        // Frames pipelined behind the request, if any; no allocation otherwise.
                        let leftover = if buf.len() > u.request_len {
                            buf[u.request_len..].to_vec()
                        } else {
                            Vec::new()
                        };
                        return Some((u, admitted, leftover, session));
                    }
                    Err(r) => r,
                },
                Err(r) => r,
            };
        return refuse(shard, stream, session.as_deref_mut(), refusal).await;
    }
}

/// Answers a refused upgrade with its HTTP status and reason (through TLS once it is
/// up), and counts it.
async fn refuse<T>(
    shard: &Shard,
    stream: &mut TcpStream,
    session: Option<&mut rustls::ServerConnection>,
    refusal: Refusal,
) -> Option<T> {
    shard.metrics.refused(refusal).inc();
    match session {
        Some(s) => tls::respond(stream, s, &refusal.response()).await,
        None => {
            let _ = stream.write_all(refusal.response()).await;
        }
    }
    None
}

/// An established connection's own state, kept in its handle and run by the shard's
/// reactor.
pub struct Conn {
    fd: OwnedFd,
    reader: Reader,
    /// Bytes of a frame cut by the end of a read; `None` (no allocation) otherwise. Boxed
    /// so that it costs every idle connection one word instead of three.
    #[allow(clippy::box_collection)]
    pending: Option<Box<Vec<u8>>>,
    write_shut: bool,
    /// A read stopped before the socket was empty (fairness): read again next turn.
    read_more: bool,
    session: Session,
}

/// What a connection acts on: its shard and its handle. The session's effects are
/// carried out through it (apart from `Conn`, so the reader can borrow the pending
/// buffer while the session runs).
pub struct Io<'a> {
    shard: &'a Shard,
    handle: &'a Rc<ConnHandle>,
    key: ConnKey,
}

impl<'a> Io<'a> {
    pub fn new(shard: &'a Shard, handle: &'a Rc<ConnHandle>, key: ConnKey) -> Self {
        Self { shard, handle, key }
    }
}

impl Effects for Io<'_> {
    fn send(&mut self, frame: Bytes) {
        self.shard.reply(self.handle, frame);
    }
    fn send_error(&mut self, frame: Bytes) {
        self.shard.reply_error(self.handle, frame);
    }
    fn closing(&mut self, frame: Bytes, why: CloseReason) {
        self.handle.push_unbounded(frame, &self.shard.metrics);
        self.handle.closing_why.set(why);
        self.handle.closing_since.set(self.shard.now());
    }
    fn ack(&mut self, id: MessageId, reference: Option<&RawValue>) {
        self.shard.ack(self.key, self.handle, id, reference);
    }
    fn subscribe(
        &mut self,
        topic: &str,
        since: Option<&Since<'_>>,
        reference: Option<&RawValue>,
    ) -> Result<(), SubscribeError> {
        self.shard
            .subscribe(self.key, self.handle, topic, since, reference)
    }
    fn unsubscribe(&mut self, topic: &str) {
        self.shard.unsubscribe(self.key, self.handle, topic);
    }
    fn refresh(&mut self, token: &str, reference: Option<&RawValue>) {
        self.shard.refresh(self.key, self.handle, token, reference);
    }
    fn admit(&mut self) -> crate::limits::Admit {
        self.shard.admit_message(self.key)
    }
    fn permit(&self, publish: bool, topic: &str) -> Result<(), Refused> {
        let cfg = self.shard.cfg();
        let rules = Rules {
            namespaces: &cfg.namespace,
            client_publish: cfg.client_publish,
        };
        let identified = self.handle.user.is_some();
        self.handle.with_grants(|grants| {
            if publish {
                rules.publish(grants, topic)
            } else {
                rules.subscribe(identified, grants, topic)
            }
        })
    }
    fn publish(&mut self, topic: &str, data: &RawValue, reference: Option<&RawValue>) {
        self.shard.publish(self.handle, topic, data, reference);
    }
}

// === impl Conn ===

impl Conn {
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Adopted by the reactor: handles what came pipelined behind the upgrade request.
    pub fn start(&mut self, io: &mut Io) -> Option<CloseReason> {
        if let Some(mut first) = self.pending.take() {
            self.on_data(io, &mut first);
        }
        None
    }

    /// The socket reported input (or EOF, or an error) and/or room to write.
    pub fn on_ready(&mut self, io: &mut Io, ev: sys::Ready) -> Option<CloseReason> {
        if ev.write {
            io.handle.write_ready(&io.shard.metrics);
        }
        if ev.read {
            if let Err(why) = self.read_ready(io) {
                return Some(why);
            }
            // Through TLS, a read may leave a record to send (a key update).
            io.handle.blocked_if_held();
        }
        None
    }

    /// On the work list: a close request, an abort, or a read to finish.
    pub fn on_work(&mut self, io: &mut Io) -> Option<CloseReason> {
        if std::mem::take(&mut self.read_more) {
            if let Err(why) = self.read_ready(io) {
                return Some(why);
            }
            io.handle.blocked_if_held();
        }
        None
    }

    /// A read stopped short and waits for the next turn (`on_work` does it).
    pub fn read_more(&self) -> bool {
        self.read_more
    }

    /// After every event: starts a requested close, writes what a closing connection
    /// still owes, shuts the write side after our close frame, and says when the
    /// connection is finished (`Some`, with the reason to count).
    pub fn step(&mut self, io: &mut Io) -> Option<CloseReason> {
        let handle = io.handle;
        loop {
            if let Some(why) = handle.aborted() {
                return Some(self.session.why().unwrap_or(why));
            }
            let Some(req) = handle.take_close_request() else {
                break;
            };
            self.session.on_close_request(req, io);
        }
        let state = self.session.state();
        if state != State::Open && handle.has_queued() {
            // Closing: written now rather than at the tick, so that the shutdown and
            // the close can follow as soon as the socket has taken it.
            handle.flush_now(&io.shard.metrics);
            if let Some(why) = handle.aborted() {
                return Some(self.session.why().unwrap_or(why));
            }
        }
        if handle.has_queued() {
            // Left for the tick, or for the socket to have room.
            return None;
        }
        if matches!(state, State::Closing { .. }) && !self.write_shut {
            self.write_shut = true;
            let fd = self.fd.as_raw_fd();
            tls::close_notify(handle.key.get(), fd);
            let _ = sys::shutdown_write(fd);
        }
        if state == State::Done {
            return Some(self.session.why().unwrap_or(CloseReason::Client));
        }
        None
    }

    /// Unregisters the connection (which detaches its handle, so no tick writes to its
    /// descriptor again), then closes the socket.
    pub fn finish(self, shard: &Shard, key: ConnKey, why: CloseReason) {
        shard.unregister(key, why);
        drop(self.fd);
    }

    /// Reads what the socket has (bounded per turn for fairness) and handles it.
    fn read_ready(&mut self, io: &mut Io) -> Result<(), CloseReason> {
        let fd = self.fd.as_raw_fd();
        let shard = io.shard;
        let key = io.handle.key.get();
        let mut scratch = shard.scratch.borrow_mut();
        let mut total = 0;
        loop {
            match tls::recv(key, fd, &mut scratch) {
                Ok(0) => return Err(self.session.why().unwrap_or(CloseReason::Client)),
                Ok(n) => {
                    total += n;
                    shard.metrics.bytes_in.add(n as u64);
                    io.handle.last_rx.set(shard.now());
                    io.handle.ping_sent.set(false);
                    self.on_data(io, &mut scratch[..n]);
                    if self.session.state() == State::Done || n < scratch.len() {
                        return Ok(());
                    }
                    if total >= 4 * SCRATCH_BYTES {
                        // The socket is edge-triggered: nothing reports the rest, so
                        // the reactor comes back for it.
                        self.read_more = true;
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
    fn on_data(&mut self, io: &mut Io, data: &mut [u8]) {
        if !self.session.reads_input() {
            return;
        }
        let cfg = io.shard.cfg();
        let max = cfg.max_message_bytes;
        let limits = Limits {
            max_topic_bytes: cfg.max_topic_bytes,
            max_subscriptions: cfg.max_subscriptions,
        };
        let session = &mut self.session;
        let mut handler = |ev: Event<'_>| {
            io.shard.metrics.frames_in.inc();
            session.on_event(ev, &limits, io)
        };
        let result = match self.pending.as_deref_mut() {
            None => {
                let r = self.reader.feed(data, max, &mut handler);
                if let Ok(fed) = &r {
                    if fed.flow == Flow::Continue && fed.consumed < data.len() {
                        let rest = &data[fed.consumed..];
                        let need = fed.pending_frame.unwrap_or(0).min(max + 14);
                        let mut cut = Vec::with_capacity(need.max(rest.len()));
                        cut.extend_from_slice(rest);
                        self.pending = Some(Box::new(cut));
                    }
                }
                r.map(|_| ())
            }
            Some(pending) => {
                pending.extend_from_slice(data);
                let r = self.reader.feed(pending, max, &mut handler);
                match &r {
                    Ok(fed) if fed.flow == Flow::Continue => {
                        pending.drain(..fed.consumed);
                    }
                    _ => pending.clear(),
                }
                if pending.is_empty() {
                    self.pending = None;
                }
                r.map(|_| ())
            }
        };
        if let Err(e) = result {
            self.session.on_read_error(e, io);
        }
    }
}
