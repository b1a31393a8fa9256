//! Shards: one thread per CPU, pinned, each running its own monoio runtime with its own
//! SO_REUSEPORT listener, connections, topic table and counters. Nothing on the hot path
//! is shared; another shard is reached only through its inbox (`Inbox`).
//!
//! A shard runs these tasks: the accept loop, one task per upgrade in progress
//! (`ws::conn`), the reactor that reads and writes every established connection
//! (`ws::reactor`), the delivery tick (`outbound`), the inbox loop (cross-shard fan-out,
//! drain) and the sweeper (pings, idle and stalled-write timeouts, close deadlines),
//! which walks every connection once a second instead of giving each one a timer.

mod expiry;
pub mod fanout;
mod floors;
pub mod history;
mod node;
pub mod outbound;
pub mod topic_log;
pub mod unacked;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use monoio::net::TcpListener;
use slab::Slab;

pub use node::{start, HistoryPage, Inbox, Node, RunningNode, ShardLink, StartError, Unsent};

use crate::auth::Identity;
use crate::backplane::{self, Backplane, RedisUrl};
use crate::broker::Refused;
use crate::config::{Config, SlowConsumer};
use crate::metrics::{CloseReason, ShardMetrics};
use crate::protocol::{self, ErrorCode};
use crate::protocol::{MessageId, NotRecovered, Since};
use crate::registry::{Change, SubscribeError};
use crate::registry::{ConnKey, Registry};
use crate::ws::frame::{self, OpCode};
use fanout::Fanout;
use floors::Floors;
use history::{Bounds, History};
use outbound::{ConnHandle, Push, ShardClose};
use serde_json::value::RawValue;

/// Size of the per-shard read buffer every connection reads into.
pub const SCRATCH_BYTES: usize = 64 * 1024;

/// Who an upgrade admitted, and what it holds against the node's caps (given back by
/// `Shard::unregister`).
#[derive(Debug, Default)]
pub struct Admitted {
    /// The user, if the token identified one (counted against
    /// `max_connections_per_user`).
    pub user: Option<Rc<str>>,
    /// What the token grants, when it grants anything.
    pub grants: Option<Box<crate::permissions::Grants>>,
    /// The client address, when it was counted against `max_connections_per_ip`.
    pub ip: Option<std::net::IpAddr>,
    /// When the token runs out, leeway included (Unix seconds): the connection is
    /// closed then unless refreshed.
    pub expires: Option<u64>,
}

/// One shard's state. Lives in an `Rc` on its own thread.
pub struct Shard {
    pub index: usize,
    /// This shard's copy of the configuration in force (see `cfg()`).
    cfg: RefCell<Arc<Config>>,
    cfg_epoch: Cell<u64>,
    pub node: Arc<Node>,
    pub metrics: Arc<ShardMetrics>,
    conns: RefCell<Slab<Rc<ConnHandle>>>,
    registry: RefCell<Registry>,
    /// Shared read buffer; borrowed only between two awaits.
    pub scratch: RefCell<Box<[u8]>>,
    /// Shared buffer for building handshake responses; borrowed only between two awaits.
    pub response: RefCell<Vec<u8>>,
    /// This node's welcome frame, but for the connection id.
    pub welcome: crate::protocol::WelcomeTemplate,
    started: Instant,
    clock: Cell<u32>,
    /// Accepted sockets still in their upgrade (not yet in `conns`); the drain waits
    /// for them too, so none is cut off by the process exiting.
    handshaking: Cell<usize>,
    /// Upgrades in progress, oldest first (by a number taken at their start), with
    /// their sockets: the oldest is dropped when `max_pending_handshakes` is reached.
    pending: RefCell<std::collections::BTreeMap<u64, std::os::fd::RawFd>>,
    next_pending: Cell<u64>,
    next_conn: Cell<u64>,
    draining: Cell<bool>,
    stop_accepting: StopSignal,
    ping: Bytes,
    /// Connections of each identified user on this shard.
    users: RefCell<HashMap<Rc<str>, Vec<ConnKey>>>,
    /// The address of each connection counted against `max_connections_per_ip`.
    counted_ips: RefCell<HashMap<ConnKey, std::net::IpAddr>>,
    /// When each identified connection's token runs out.
    expiries: RefCell<expiry::Expiries>,
    /// Each connection's message budget (by key), while `client_messages_per_sec` is
    /// set: made at its first message.
    buckets: RefCell<Vec<Option<crate::limits::Bucket>>>,
    /// The rest of the node (in-process) or of the cluster (Redis).
    fanout: Fanout,
    /// Recent topic messages, for resume and `/v1/history` (single node).
    history: RefCell<History>,
    /// Messages connections already have (a resume ahead of this shard, direct
    /// messages given at connect): live copies skip them (`floors`).
    floors: RefCell<Floors>,
    /// Reads and writes every established connection (`ws::reactor`).
    pub reactor: crate::ws::reactor::Reactor,
}

impl Shard {
    fn new(index: usize, cfg: Arc<Config>, node: Arc<Node>) -> std::io::Result<Self> {
        let metrics = node.shards[index].metrics.clone();
        let welcome = crate::protocol::WelcomeTemplate::new(&node.id);
        // The URL was checked by `Config::validate`.
        let fanout = match cfg.redis.as_deref().and_then(|u| RedisUrl::parse(u).ok()) {
            Some(url) => Fanout::Redis(Box::new(Backplane::new(
                url,
                node.clone(),
                index,
                &cfg,
                metrics.clone(),
            ))),
            None => Fanout::Local,
        };
        Ok(Self {
            index,
            cfg: RefCell::new(cfg),
            cfg_epoch: Cell::new(0),
            node,
            metrics,
            conns: RefCell::new(Slab::new()),
            registry: RefCell::new(Registry::default()),
            scratch: RefCell::new(vec![0u8; SCRATCH_BYTES].into_boxed_slice()),
            response: RefCell::new(Vec::with_capacity(512)),
            welcome,
            started: Instant::now(),
            // Starts at 1 so 0 can mean "never" in connection timestamps.
            clock: Cell::new(1),
            handshaking: Cell::new(0),
            pending: RefCell::default(),
            next_pending: Cell::new(0),
            next_conn: Cell::new(0),
            draining: Cell::new(false),
            stop_accepting: StopSignal::default(),
            ping: frame::server_frame(OpCode::Ping, b""),
            users: RefCell::default(),
            counted_ips: RefCell::default(),
            expiries: RefCell::default(),
            buckets: RefCell::default(),
            fanout,
            history: RefCell::default(),
            floors: RefCell::default(),
            reactor: crate::ws::reactor::Reactor::new()?,
        })
    }

    /// The configuration in force. An owned handle: hold it across awaits freely; a
    /// reload reaches this shard at its next sweep.
    pub fn cfg(&self) -> Arc<Config> {
        self.cfg.borrow().clone()
    }

    /// Takes a reloaded configuration, if there is one.
    fn follow_config(&self) {
        let epoch = self.node.config_epoch();
        if epoch != self.cfg_epoch.get() {
            self.cfg_epoch.set(epoch);
            let cfg = self.node.config();
            self.fanout.set_reply_limit(cfg.outbound_queue_bytes);
            *self.cfg.borrow_mut() = cfg;
        }
    }

    /// Seconds since the shard started, plus one; advanced by the sweeper.
    pub fn now(&self) -> u32 {
        self.clock.get()
    }

    pub fn draining(&self) -> bool {
        self.draining.get()
    }

    /// Adds the connection on socket `fd`, of the client `admitted` (which holds room
    /// against the node's caps, given back by `unregister`); returns its slab key and
    /// shared handle.
    pub fn register(
        &self,
        fd: std::os::fd::RawFd,
        admitted: Admitted,
    ) -> (ConnKey, Rc<ConnHandle>) {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        let user = admitted.user.as_ref();
        let mut handle = ConnHandle::new(id, fd, self.now(), user.cloned());
        handle.grants = Cell::new(admitted.grants);
        let handle = Rc::new(handle);
        let key = self.conns.borrow_mut().insert(handle.clone());
        if let Some(ip) = admitted.ip {
            self.counted_ips.borrow_mut().insert(key, ip);
        }
        if let Some(at) = admitted.expires {
            self.expiries.borrow_mut().set(key, at);
        }
        if let Some(slot) = self.buckets.borrow_mut().get_mut(key) {
            *slot = None;
        }
        // Every entry holds a file descriptor, so keys stay far below 2^32.
        handle.key.set(key as u32);
        self.metrics
            .connections
            .set(self.conns.borrow().len() as u64);
        if let Some(user) = user {
            self.users
                .borrow_mut()
                .entry(user.clone())
                .or_default()
                .push(key);
            self.fanout.user_online(&self.node, self.index, user, id);
        }
        (key, handle)
    }

    /// Removes a connection, its subscriptions and its presence. Called exactly once
    /// per `register`.
    pub fn unregister(&self, key: ConnKey, why: CloseReason) {
        let user = self.conns.borrow().get(key).and_then(|c| c.user.clone());
        let user = user.as_ref();
        self.floors.borrow_mut().forget(key);
        crate::tls::forget(key as u32);
        if let Some(bp) = self.backplane() {
            bp.replays.borrow_mut().forget(key);
            bp.inboxes.borrow_mut().forget(key);
        }
        let gone = self.registry.borrow_mut().remove_conn(key);
        for topic in gone {
            self.fanout.topic_changed(topic);
        }
        if let Some(user) = user {
            let mut users = self.users.borrow_mut();
            if let Some(keys) = users.get_mut(user) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    users.remove(user);
                }
            }
            if let Some(conn) = self.conns.borrow().get(key) {
                self.fanout
                    .user_offline(&self.node, self.index, user, conn.id);
            }
        }
        if let Some(conn) = self.conns.borrow_mut().try_remove(key) {
            conn.key.set(u32::MAX);
            conn.detach();
            self.node.release_connection();
            if let Some(user) = &conn.user {
                self.node.per_user.remove(&**user);
            }
            if let Some(ip) = self.counted_ips.borrow_mut().remove(&key) {
                self.node.per_ip.remove(&ip);
            }
            self.expiries.borrow_mut().forget(key);
        }
        self.metrics
            .connections
            .set(self.conns.borrow().len() as u64);
        self.metrics.closed(why).inc();
        self.update_registry_gauges();
    }

    /// Whether connection `key` may send one more message now (`client_messages_per_sec`).
    pub fn admit_message(&self, key: ConnKey) -> crate::limits::Admit {
        use crate::limits::{Admit, Bucket, Rate};
        let cfg = self.cfg();
        if cfg.client_messages_per_sec == 0 {
            return Admit::Yes;
        }
        let rate = Rate {
            per_sec: cfg.client_messages_per_sec,
            burst: cfg.client_burst,
            strikes: cfg.rate_limit_strikes,
        };
        let now_ms = self.started.elapsed().as_millis() as u32;
        let mut buckets = self.buckets.borrow_mut();
        if buckets.len() <= key {
            buckets.resize(key + 1, None);
        }
        let admit = buckets[key]
            .get_or_insert_with(|| Bucket::full(rate, now_ms))
            .admit(rate, now_ms);
        if admit != Admit::Yes {
            self.metrics.rate_limited.inc();
        }
        admit
    }

    /// Connection `key`'s handle, if it is still registered.
    pub fn conn(&self, key: ConnKey) -> Option<Rc<ConnHandle>> {
        self.conns.borrow().get(key).cloned()
    }

    pub fn update_registry_gauges(&self) {
        let r = self.registry.borrow();
        self.metrics.topics.set(r.topics() as u64);
        self.metrics.subscriptions.set(r.subscriptions() as u64);
    }

    /// An upgrade on socket `fd` begins; returns its number for `upgrade_done`. At
    /// `max_pending_handshakes` the oldest unfinished upgrades are shut (their reads end,
    /// and their tasks give up) to make room.
    pub fn upgrade_begun(&self, fd: std::os::fd::RawFd) -> u64 {
        let cap = self.cfg().max_pending_handshakes;
        let mut pending = self.pending.borrow_mut();
        while cap > 0 && pending.len() >= cap {
            let Some((_, old)) = pending.pop_first() else {
                break;
            };
            // Its task still owns the socket (it leaves this map before closing it).
            let _ = crate::sys::shutdown_both(old);
            self.metrics.handshakes_evicted.inc();
        }
        let id = self.next_pending.get();
        self.next_pending.set(id + 1);
        pending.insert(id, fd);
        id
    }

    /// Upgrade `id` finished, failed or was dropped: its socket leaves the map (before
    /// it is closed or handed on).
    pub fn upgrade_done(&self, id: u64) {
        self.pending.borrow_mut().remove(&id);
    }

    /// An accepted socket finished its upgrade (or gave up): the drain stops waiting
    /// for it.
    pub fn handshake_ended(&self) {
        self.handshaking.set(self.handshaking.get() - 1);
    }

    /// The Redis backplane, when this shard has one (for its Redis tasks).
    pub fn backplane(&self) -> Option<&Backplane> {
        self.fanout.backplane()
    }

    /// Connection `key` subscribes to `topic` (at most `max_subscriptions` topics per
    /// connection). The `subscribed` reply goes out now, or once Redis has the
    /// subscription, so nothing published after it is missed. With `since`, what the
    /// client missed follows the reply, before anything newer (`resume`).
    pub fn subscribe(
        &self,
        key: ConnKey,
        conn: &Rc<ConnHandle>,
        topic: &str,
        since: Option<&Since<'_>>,
        reference: Option<&RawValue>,
    ) -> Result<(), SubscribeError> {
        let change =
            self.registry
                .borrow_mut()
                .subscribe(key, topic, self.cfg().max_subscriptions)?;
        self.update_registry_gauges();
        if change != Change::None {
            if let Some(log) = self.registry.borrow().log(topic) {
                log.joined(key, conn.id);
            }
        }
        // Already subscribed, it missed nothing since: a plain answer.
        let (ack, missed) = match since.filter(|_| change != Change::None) {
            None => (protocol::ack("subscribed", topic, reference), Vec::new()),
            Some(since) if self.history_on() && self.backplane().is_some() => {
                // Through Redis: the answer and the replay come from the topic's stream
                // once Redis has the subscription.
                let bp = self.backplane().expect("checked above");
                let position = backplane::replay::Position {
                    id: since.offset,
                    epoch: Some(Rc::from(&*since.epoch)),
                };
                match bp.resume(topic, conn, key, position, reference) {
                    None => {
                        self.finish_reads();
                        return Ok(());
                    }
                    Some(answer) => {
                        self.metrics.resumes_not_recovered.inc();
                        (answer, Vec::new())
                    }
                }
            }
            Some(since) => {
                let outcome = self.resume(key, conn, topic, since);
                let counter = match outcome {
                    Ok(_) => &self.metrics.resumes_recovered,
                    Err(_) => &self.metrics.resumes_not_recovered,
                };
                counter.inc();
                let epoch = self
                    .fanout
                    .backplane()
                    .is_none()
                    .then_some(&*self.node.epoch);
                let ack = protocol::resumed(
                    topic,
                    outcome.as_ref().map(|_| ()).map_err(|e| *e),
                    epoch,
                    reference,
                );
                (ack, outcome.unwrap_or_default())
            }
        };
        if change == Change::TopicEdge && self.history_on() {
            if let Some(bp) = self.backplane() {
                bp.first_subscriber(topic);
            }
        }
        // With Redis, a topic not yet confirmed there is (re)marked for the subscriber
        // connection here.
        if let Some(ack) = self.fanout.subscribed(topic, conn, ack) {
            self.reply(conn, ack);
        }
        for frame in &missed {
            let queued = self.push_to(std::iter::once(key), frame);
            self.metrics.deliveries.add(queued);
        }
        Ok(())
    }

    /// What connection `key`, resuming `topic` from `since`, missed: the frames after
    /// the offset from this shard's history (every shard of a node receives every topic
    /// message, in id order, so its own history is enough), or why they cannot be had.
    /// Everything this shard delivers after this call is newer, so nothing is missed or
    /// given twice. The frames must fit the connection's queue whole: cut by the
    /// slow-consumer policy, they would leave a gap after `recovered: true`.
    fn resume(
        &self,
        key: ConnKey,
        conn: &ConnHandle,
        topic: &str,
        since: &Since<'_>,
    ) -> Result<Vec<Bytes>, NotRecovered> {
        if self.history_bounds().off() {
            return Err(NotRecovered::HistoryOff);
        }
        if since.epoch != self.node.epoch {
            return Err(NotRecovered::EpochChanged);
        }
        if self
            .node
            .last_ordered_id()
            .is_none_or(|last| since.offset > last)
        {
            return Err(NotRecovered::UnknownOffset);
        }
        let history = self.history.borrow();
        let missed = history.since(topic, since.offset)?;
        let bytes: usize = missed.iter().map(Bytes::len).sum();
        if conn.queued() + bytes > self.cfg.borrow().outbound_queue_bytes {
            return Err(NotRecovered::TooLarge);
        }
        if history.latest().is_none_or(|l| l < since.offset) {
            // Delivered on another shard and not yet here: skip it when it comes.
            self.floors.borrow_mut().add(key, Some(topic), since.offset);
        }
        Ok(missed)
    }

    /// Whether this node keeps history (`history_size` and `history_ttl_secs` above 0).
    pub fn history_on(&self) -> bool {
        !self.history_bounds().off()
    }

    /// Hands out the stream reads Redis has answered (resumes, catch-ups, inboxes),
    /// then sends the reads that waited behind them.
    pub fn finish_reads(&self) {
        let Some(bp) = self.backplane() else {
            return;
        };
        let inboxes = bp.inboxes.borrow_mut().take_done();
        for (key, conn, user, entries) in inboxes {
            self.give_inbox(bp, key, conn, &user, entries);
        }
        loop {
            let done = bp.take_reads();
            if done.is_empty() {
                return;
            }
            for (topic, serial, result) in done {
                let limit = self.cfg().outbound_queue_bytes;
                let deliveries = {
                    let conns = self.conns.borrow();
                    let room = |key: ConnKey, id: u64| {
                        conns
                            .get(key)
                            .filter(|c| c.id == id)
                            .map(|c| limit.saturating_sub(c.queued()))
                    };
                    bp.replays.borrow_mut().finish(&topic, serial, result, room)
                };
                for d in deliveries {
                    self.hand_out(&topic, d);
                }
                bp.start_read(&topic);
            }
        }
    }

    /// Connection `key` (number `conn`) gets what its user's inbox held, then the live
    /// direct messages held meanwhile that are newer.
    fn give_inbox(
        &self,
        bp: &Backplane,
        key: ConnKey,
        conn: u64,
        user: &str,
        entries: Result<backplane::inbox::Entries, String>,
    ) {
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!(user, error = %e, "inbox read failed");
                if bp.inboxes.borrow_mut().retry(key, conn, Rc::from(user)) {
                    return;
                }
                // Given up: it gets what was held; what waits in the inbox comes to
                // the user's next connection (this one's acks are refused meanwhile).
                bp.inboxes.borrow_mut().mark_unread(key, conn);
                Vec::new()
            }
        };
        let Some(held) = bp.inboxes.borrow_mut().finish(key, conn) else {
            return;
        };
        let last = entries.last().map(|(id, _)| *id);
        for (id, data) in &entries {
            let frame = protocol::direct(user, &id.to_string(), data);
            let queued = self.push_to(std::iter::once(key), &frame);
            self.metrics.direct_deliveries.add(queued);
            self.metrics.direct_given_again.add(queued);
        }
        for (id, frame) in held {
            if last.is_none_or(|l| id > l) {
                let queued = self.push_to(std::iter::once(key), &frame);
                self.metrics.direct_deliveries.add(queued);
            }
        }
    }

    /// After the subscriber connection came back: every identified connection reads
    /// its user's inbox again, for the direct messages published while it was away
    /// (at least once: what it already had comes again, and the client drops it).
    pub fn reread_inboxes(&self) {
        let Some(bp) = self.backplane() else {
            return;
        };
        if self.direct_bounds().off() {
            return;
        }
        let conns = self.conns.borrow();
        let mut inboxes = bp.inboxes.borrow_mut();
        for (key, c) in conns.iter() {
            if let Some(user) = &c.user {
                inboxes.wait(key, c.id, user.clone());
            }
        }
        bp.wake_commands();
    }

    /// A direct message from Redis for every local connection of `user`; connections
    /// whose inbox is still being read hold it (`backplane::inbox`).
    pub fn deliver_direct_live(&self, user: &str, id: &str, data: &RawValue) {
        let mut held = Vec::new();
        if let Some(bp) = self
            .backplane()
            .filter(|bp| !bp.inboxes.borrow().is_empty())
        {
            if let Some(keys) = self.users.borrow().get(user) {
                let frame = protocol::direct(user, id, data);
                let mid = id.parse::<MessageId>().unwrap_or(MessageId::MAX);
                let mut inboxes = bp.inboxes.borrow_mut();
                held.extend(
                    keys.iter()
                        .copied()
                        .filter(|k| inboxes.hold(*k, mid, &frame)),
                );
            }
        }
        self.deliver_direct(user, id, data, &held);
    }

    /// Queues one replay's frames.
    fn hand_out(&self, topic: &str, d: backplane::replay::Delivery) {
        use backplane::replay::To;
        match d.to {
            To::Conn { key, conn } => {
                if self.conns.borrow().get(key).is_none_or(|c| c.id != conn) {
                    return;
                }
                if let Some(recovered) = d.resumed {
                    let counter = match recovered {
                        true => &self.metrics.resumes_recovered,
                        false => &self.metrics.resumes_not_recovered,
                    };
                    counter.inc();
                }
                for frame in &d.frames {
                    let queued = self.push_to(std::iter::once(key), frame);
                    self.metrics.deliveries.add(queued);
                }
            }
            To::Others { except } => {
                let keys: Vec<ConnKey> = match self.registry.borrow().subscribers(topic) {
                    Some(subs) => subs
                        .iter()
                        .copied()
                        .filter(|k| !except.contains(k))
                        .collect(),
                    None => return,
                };
                for frame in &d.frames {
                    let queued = self.push_to(keys.iter().copied(), frame);
                    self.metrics.deliveries.add(queued);
                    self.metrics.caught_up.add(queued);
                }
            }
        }
    }

    /// The history bounds in force.
    fn history_bounds(&self) -> Bounds {
        Bounds::of(&self.cfg.borrow())
    }

    /// Up to `limit` frames of `topic` after `since` (all it holds without), oldest
    /// first, for `GET /v1/history`; `more` when the limit cut the list short.
    pub fn history_page(
        &self,
        topic: &str,
        since: Option<MessageId>,
        limit: usize,
    ) -> Result<HistoryPage, NotRecovered> {
        if self.history_bounds().off() {
            return Err(NotRecovered::HistoryOff);
        }
        let history = self.history.borrow();
        let mut frames = match since {
            Some(offset) => history.since(topic, offset)?,
            // Without `since`, what is left is the answer.
            None => history.oldest_first(topic),
        };
        let more = frames.len() > limit;
        frames.truncate(limit);
        Ok(HistoryPage {
            epoch: self.node.epoch.clone(),
            frames,
            more,
        })
    }

    /// Connection `key` unsubscribes from `topic`; a `subscribed` reply still waiting
    /// for Redis goes out first.
    pub fn unsubscribe(&self, key: ConnKey, conn: &Rc<ConnHandle>, topic: &str) {
        if let Some(log) = self.registry.borrow().log(topic) {
            // What reached the shard before the unsubscribe is still written; what
            // comes after is not.
            conn.close_run(log);
            log.left(conn.id);
        }
        let change = self.registry.borrow_mut().unsubscribe(key, topic);
        self.floors.borrow_mut().leave(key, topic);
        if let Some(bp) = self.backplane() {
            if let Some(reference) = bp.replays.borrow_mut().leave(topic, key) {
                // Its resume was still being read: answered before `unsubscribed`.
                let why = Err(NotRecovered::Unavailable);
                self.reply(
                    conn,
                    protocol::resumed(topic, why, None, reference.as_deref()),
                );
            }
        }
        self.fanout.unsubscribing(topic, conn);
        if change == Change::TopicEdge {
            self.fanout.topic_changed(Rc::from(topic));
        }
        self.update_registry_gauges();
    }

    /// A client on this shard publishes `data` on `topic`. With `reference`, it is
    /// answered `published` (or an error) once the message is out.
    pub fn publish(
        &self,
        conn: &Rc<ConnHandle>,
        topic: &str,
        data: &RawValue,
        reference: Option<&RawValue>,
    ) {
        if let Some(bp) = self.fanout.backplane() {
            let id = self.node.next_message_id();
            self.node.published.inc();
            let history = self.history_bounds();
            let reply = backplane::Reply::Publish {
                conn: Rc::downgrade(conn),
                topic: Rc::from(topic),
                id: if history.off() {
                    id.clone()
                } else {
                    String::new()
                },
                reference: reference.map(|r| r.to_owned()),
            };
            bp.publish(topic, &id, data, history, reply);
            return;
        }
        match crate::broker::publish(&self.node, topic, data) {
            Ok(id) => {
                if reference.is_some() {
                    self.reply(conn, protocol::published(topic, &id, reference));
                }
            }
            Err(e) => {
                e.count(&self.node);
                let code = match e {
                    Refused::Overloaded { .. } => ErrorCode::Overloaded,
                    Refused::Stopped { .. } => ErrorCode::Unavailable,
                };
                self.reply_error(conn, protocol::error(code, &e.to_string(), reference));
            }
        }
    }

    /// Whether so many of this shard's connections are behind that taking more
    /// messages from the inbox would only push them past the slow-consumer limit: at
    /// least `CONGESTED_MIN`, and a quarter of them, have queues more than half full.
    /// A few slow clients, however slow, never make a shard congested; they are slow
    /// consumers.
    fn congested(&self) -> bool {
        let at_risk = outbound::at_risk();
        at_risk >= CONGESTED_MIN && at_risk * 4 >= self.conns.borrow().len()
    }

    /// Holds the inbox back while the shard is congested: the inbox fills, and
    /// publishers feel it (the admin API waits, then answers 503; a client's publish is
    /// answered `overloaded`) instead of the subscribers overflowing their queues and
    /// being closed as slow consumers while they catch up. The wait is bounded: a
    /// connection whose write makes no progress for `write_timeout_secs` is closed,
    /// and the wait never lasts longer than that.
    async fn ease_congestion(&self) {
        // First let the tick write what was appended: sockets that take it were only
        // owed it, not behind.
        yield_now().await;
        if !self.congested() {
            return;
        }
        self.metrics.congestion_waits.inc();
        let give_up = Duration::from_secs(self.cfg().write_timeout_secs.max(1));
        let start = Instant::now();
        while self.congested() && start.elapsed() < give_up {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Queues a reply to a client, bounded like any other frame (a client that sends
    /// requests and never reads is a slow consumer).
    pub fn reply(&self, conn: &Rc<ConnHandle>, frame: Bytes) {
        conn.reply(frame, self.cfg().outbound_queue_bytes, &self.metrics);
    }

    /// Queues an error frame (`protocol::error`) for a refused request, counted.
    pub fn reply_error(&self, conn: &Rc<ConnHandle>, frame: Bytes) {
        self.metrics.error_frames.inc();
        self.reply(conn, frame);
    }

    /// Every topic with a subscriber on this shard.
    pub fn topic_names(&self) -> Vec<Rc<str>> {
        self.registry.borrow().topic_names().cloned().collect()
    }

    /// Whether `topic` has a subscriber on this shard.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.registry.borrow().subscribers(topic).is_some()
    }

    /// The identified connections: (user, connection number).
    pub fn identified_conns(&self) -> Vec<(Rc<str>, u64)> {
        self.conns
            .borrow()
            .iter()
            .filter_map(|(_, c)| c.user.as_ref().map(|u| (u.clone(), c.id)))
            .collect()
    }

    /// Whether `user`'s connection number `conn` is open on this shard.
    pub fn holds(&self, user: &str, conn: u64) -> bool {
        let conns = self.conns.borrow();
        self.users.borrow().get(user).is_some_and(|keys| {
            keys.iter()
                .any(|k| conns.get(*k).is_some_and(|c| c.id == conn))
        })
    }

    /// Connections with a user id on this shard.
    pub fn identified_count(&self) -> usize {
        self.users.borrow().values().map(Vec::len).sum()
    }

    /// Hands `frame` to every local subscriber of `topic`: one append to the topic's
    /// log, which the tick writes to each of them (`topic_log`).
    pub fn deliver(&self, topic: &str, frame: &Bytes) {
        self.deliver_except(topic, frame, &[]);
    }

    /// `deliver`, but for the connections in `except` (resumes still being read).
    pub fn deliver_except(&self, topic: &str, frame: &Bytes, except: &[ConnKey]) {
        let mut registry = self.registry.borrow_mut();
        let Some((subs, log)) = registry.delivery(topic) else {
            return;
        };
        let conns = self.conns.borrow();
        log.append(frame, subs, &conns, except, &self.metrics);
    }

    /// `deliver`, skipping connections that resumed from an offset at or past `id`.
    fn deliver_past_floors(&self, topic: &str, id: MessageId, frame: &Bytes) {
        let skip = self.floors.borrow_mut().skip(Some(topic), id);
        self.deliver_except(topic, frame, &skip);
    }

    /// Queues a direct message for every local connection of `user`; returns how many.
    /// Connections in `skip` already have it (given at connect).
    pub fn deliver_direct(
        &self,
        user: &str,
        id: &str,
        data: &serde_json::value::RawValue,
        skip: &[ConnKey],
    ) -> u64 {
        let users = self.users.borrow();
        let Some(keys) = users.get(user) else {
            return 0;
        };
        let frame = crate::protocol::direct(user, id, data);
        let queued = self.push_to(keys.iter().copied().filter(|k| !skip.contains(k)), &frame);
        self.metrics.direct_deliveries.add(queued);
        queued
    }

    /// A new connection of an identified user gets what waits unacknowledged for the
    /// user (single node), oldest first, right behind the welcome.
    pub fn give_unacked(&self, key: ConnKey, conn: &Rc<ConnHandle>) {
        let Some(user) = conn.user.as_ref() else {
            return;
        };
        if let Some(bp) = self.fanout.backplane() {
            // Through Redis: read from the user's inbox once its presence is in.
            if !self.direct_bounds().off() {
                bp.read_inbox(key, conn.id, user);
            }
            return;
        }
        let waiting = self.node.unacked.pending(user, self.direct_bounds());
        let Some(last) = waiting.last() else {
            return;
        };
        self.floors.borrow_mut().add(key, None, last.id);
        for m in &waiting {
            let frame = protocol::direct(user, &m.id_text, &m.data);
            let queued = self.push_to(std::iter::once(key), &frame);
            self.metrics.direct_deliveries.add(queued);
            self.metrics.direct_given_again.add(queued);
        }
    }

    /// Connection `key` presents a newer token (`refresh`): if it verifies and is for
    /// the same user, the connection lives until its `exp` (plus the leeway) and takes
    /// its grants; otherwise `bad_token`, and the old token's time still runs.
    pub fn refresh(
        &self,
        key: ConnKey,
        conn: &Rc<ConnHandle>,
        token: &str,
        reference: Option<&RawValue>,
    ) {
        let refused = |message: &str| {
            self.reply_error(
                conn,
                protocol::error(ErrorCode::BadToken, message, reference),
            );
        };
        let Some(user) = &conn.user else {
            return refused("this connection has no token to refresh (anonymous)");
        };
        let auth = self.node.auth();
        match auth.identify(Some(token)) {
            Ok(Identity::User {
                user: new,
                grants,
                exp,
            }) if *new == **user => {
                let at = exp.saturating_add(auth.leeway());
                self.expiries.borrow_mut().set(key, at);
                conn.withdraw_close(ShardClose::TokenExpired);
                conn.grants.set(grants.kept());
                self.reply(conn, protocol::refreshed(exp, reference));
            }
            Ok(_) => refused("the token is for another user"),
            Err(e) => refused(&e.to_string()),
        }
    }

    /// Connection `conn` acknowledges its user's direct messages up to `id`.
    pub fn ack(
        &self,
        key: ConnKey,
        conn: &Rc<ConnHandle>,
        id: MessageId,
        reference: Option<&RawValue>,
    ) {
        let Some(user) = conn.user.as_ref() else {
            let m = "only a connection with a user (a token with `sub`) has direct messages to acknowledge";
            return self.reply_error(conn, protocol::error(ErrorCode::BadRequest, m, reference));
        };
        if let Some(bp) = self.fanout.backplane() {
            if !bp.inboxes.borrow().may_ack(key, conn.id) {
                let m = "this connection has not been given its inbox yet (redis could not be read): not acknowledged; reconnect";
                return self
                    .reply_error(conn, protocol::error(ErrorCode::Unavailable, m, reference));
            }
            return bp.ack(conn, user, &id.to_string(), reference);
        }
        let removed = self.node.unacked.ack(user, id);
        if reference.is_some() {
            self.reply(conn, protocol::acked(&id.to_string(), removed, reference));
        }
    }

    fn direct_bounds(&self) -> unacked::Bounds {
        unacked::Bounds::of(&self.cfg.borrow())
    }

    /// Queues `frame` on each connection under the slow-consumer policy; returns how
    /// many took it (the others are counted as dropped).
    fn push_to(&self, keys: impl Iterator<Item = ConnKey>, frame: &Bytes) -> u64 {
        let conns = self.conns.borrow();
        let cfg = self.cfg();
        let limit = cfg.outbound_queue_bytes;
        let drop_when_full = cfg.slow_consumer == SlowConsumer::Drop;
        let (mut queued, mut dropped) = (0, 0);
        for key in keys {
            let Some(conn) = conns.get(key) else {
                continue;
            };
            match conn.push(frame.clone(), limit, drop_when_full, &self.metrics) {
                Push::Queued => queued += 1,
                Push::Dropped | Push::Closing => dropped += 1,
            }
        }
        self.metrics.dropped.add(dropped);
        queued
    }

    /// Handles one inbox message; false for `Drain`. Room a message held in the inbox
    /// (`ShardLink::reserve`) is given back as it is taken out.
    fn handle(&self, msg: Inbox) -> bool {
        if msg.holds_room() {
            self.node.shards[self.index].release();
        }
        match msg {
            Inbox::Publish { topic, id, frame } => {
                let mut history = self.history.borrow_mut();
                history.push(&topic, id, &frame, self.now(), self.history_bounds());
                self.metrics.history_messages.set(history.len() as u64);
                drop(history);
                if self.floors.borrow().is_empty() {
                    self.deliver(&topic, &frame);
                } else {
                    self.deliver_past_floors(&topic, id, &frame);
                }
            }
            Inbox::History {
                topic,
                since,
                limit,
                reply,
            } => {
                let _ = reply.send(self.history_page(&topic, since, limit));
            }
            Inbox::Direct {
                users,
                key,
                id,
                data,
            } => {
                self.metrics.direct_received.inc();
                let skip = self.floors.borrow_mut().skip(None, key);
                for user in &users {
                    self.deliver_direct(user, &id, &data, &skip);
                }
            }
            Inbox::Redis { args, reply } => match self.fanout.backplane() {
                Some(bp) => {
                    let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
                    bp.command(&args, backplane::Reply::Remote(reply));
                }
                None => {
                    let _ = reply.send(Err("no redis configured".into()));
                }
            },
            Inbox::Relay { topic, pos, frame } => {
                self.node.shards[self.index].release_relay(frame.len());
                if let Some(bp) = self.backplane() {
                    let pos = pos.as_ref().map(|(id, epoch)| (*id, &**epoch));
                    bp.on_relay(self, &topic, pos, &frame);
                }
            }
            Inbox::Interest { topic, from, on } => {
                if let Some(bp) = self.backplane() {
                    bp.on_interest(topic, from, on);
                }
            }
            Inbox::Answer { topic } => {
                if let Some(bp) = self.backplane() {
                    bp.confirm(&topic);
                }
            }
            Inbox::Lost { topic } => {
                if let Some(bp) = self.backplane() {
                    bp.on_lost(self, &topic);
                }
            }
            Inbox::Reregister => {
                if let Some(bp) = self.backplane() {
                    bp.register_all();
                }
            }
            Inbox::Drain => return false,
        }
        true
    }

    /// One sweep over all connections: pings, idle closes, stalled writes, close
    /// deadlines. Timestamps have one-second resolution, so each limit fires between its
    /// value and one second after it, never early.
    fn sweep(&self) {
        let now = (self.started.elapsed().as_secs() as u32).saturating_add(1);
        self.clock.set(now);
        outbound::set_clock(now);
        self.metrics.sweeps.inc();
        self.follow_config();
        if let Some(bp) = self.backplane() {
            let expired = bp.replays.borrow_mut().expire(Instant::now());
            for (topic, d) in expired {
                self.hand_out(&topic, d);
            }
        }
        let mut history = self.history.borrow_mut();
        history.trim(now, self.history_bounds());
        self.metrics.history_messages.set(history.len() as u64);
        drop(history);
        if self.index == 0 && self.fanout.backplane().is_none() {
            let left = self.node.unacked.trim(self.direct_bounds());
            self.node.unacked_messages.set(left as u64);
        }
        let unix = unix_now();
        for key in self.expiries.borrow_mut().due(unix) {
            if let Some(conn) = self.conns.borrow().get(key) {
                conn.request_close(ShardClose::TokenExpired);
            }
        }
        let cfg = self.cfg();
        let ping_after = cfg.ping_interval_secs as u32;
        let idle_after = cfg.idle_timeout_secs as u32;
        let write_after = cfg.write_timeout_secs as u32;
        let close_after = cfg.close_timeout_ms.div_ceil(1000) as u32;
        let mut blocked = 0;
        for (_, conn) in self.conns.borrow().iter() {
            let writing = conn.writing_since.get();
            blocked += u64::from(writing != 0);
            if writing != 0 && now - writing > write_after {
                conn.abort(CloseReason::WriteTimeout);
                continue;
            }
            let closing = conn.closing_since.get();
            if closing != 0 {
                if now - closing > close_after {
                    // Unanswered: counted under the reason the close was sent for.
                    conn.abort(conn.closing_why.get());
                }
                continue;
            }
            let idle = now.saturating_sub(conn.last_rx.get());
            if idle > idle_after {
                conn.request_close(ShardClose::IdleTimeout);
            } else if idle > ping_after && !conn.ping_sent.get() {
                conn.ping_sent.set(true);
                conn.push_unbounded(self.ping.clone(), &self.metrics);
            }
        }
        self.metrics.blocked.set(blocked);
    }

    /// Starts the drain: no new connections; returns the connections to close.
    fn begin_drain(&self) -> Vec<ConnKey> {
        self.draining.set(true);
        self.stop_accepting.fire();
        self.conns.borrow().iter().map(|(key, _)| key).collect()
    }

    /// Asks connection `key` (if still open) to close with 1001 so it reconnects elsewhere.
    fn close_for_drain(&self, key: ConnKey) {
        if let Some(conn) = self.conns.borrow().get(key) {
            conn.request_close(ShardClose::Shutdown);
        }
    }
}

/// Seconds since the Unix epoch (token times are in these).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The whole life of one shard, run inside its runtime: accept, serve, drain, return.
/// `nonblocking`: the runtime is epoll-based, whose accepts need a non-blocking listener.
async fn run(
    shard: Rc<Shard>,
    listener: std::net::TcpListener,
    nonblocking: bool,
    inbox: flume::Receiver<Inbox>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let listener = match listener
        .set_nonblocking(nonblocking)
        .and_then(|()| TcpListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(format!("shard {}: listener: {e}", shard.index)));
            return;
        }
    };
    monoio::spawn(accept_loop(shard.clone(), listener));
    let policy = {
        let shard = shard.clone();
        move || {
            let cfg = shard.cfg.borrow();
            let drop_when_full = cfg.slow_consumer == SlowConsumer::Drop;
            (cfg.outbound_queue_bytes, drop_when_full)
        }
    };
    monoio::spawn(outbound::flush_loop(shard.metrics.clone(), policy));
    monoio::spawn(crate::ws::reactor::run(shard.clone()));
    monoio::spawn(sweeper(shard.clone()));
    if shard.fanout.backplane().is_some() {
        monoio::spawn(backplane::run_subscriber(shard.clone()));
        monoio::spawn(backplane::run_commands(shard.clone()));
        monoio::spawn(backplane::run_interest(shard.clone()));
        monoio::spawn(backplane::watch_sentinel(shard.clone()));
    }
    let _ = ready.send(Ok(()));
    let mut handled: usize = 0;
    while let Ok(msg) = inbox.recv_async().await {
        if shard.congested() && msg.holds_room() {
            shard.ease_congestion().await;
        }
        if !shard.handle(msg) {
            break;
        }
        if outbound::at_risk() > 0 {
            // A queue is over half full: one message a tick, so that no tick pushes it
            // past the limit before the shard looks again.
            yield_now().await;
            continue;
        }
        // Every batch, let the tick write what the batch queued (and connection tasks
        // and the runtime run), so a burst of publishes does not pile up in subscribers'
        // queues while the inbox is emptied. An inbox that runs dry yields by itself.
        handled = handled.wrapping_add(1);
        if handled.is_multiple_of(INBOX_BATCH) {
            yield_now().await;
        }
    }
    // Closes are spread over drain_spread_secs so the nodes that take the reconnects do
    // not get them all at once; but never slower than MIN_DRAIN_CLOSES_PER_TICK, so a
    // lightly loaded node stops at once.
    let to_close = shard.begin_drain();
    let started = Instant::now();
    let cfg = shard.cfg();
    let spread = Duration::from_secs(cfg.drain_spread_secs);
    let deadline = started + Duration::from_secs(cfg.drain_timeout_secs);
    let mut closed = 0;
    let busy = |s: &Shard| !s.conns.borrow().is_empty() || s.handshaking.get() > 0;
    while closed < to_close.len() || (busy(&shard) && Instant::now() < deadline) {
        if closed < to_close.len() {
            let due = if spread.is_zero() {
                to_close.len()
            } else {
                let share = started.elapsed().as_secs_f64() / spread.as_secs_f64();
                ((to_close.len() as f64 * share).ceil() as usize).min(to_close.len())
            };
            let until = due
                .max(closed + MIN_DRAIN_CLOSES_PER_TICK)
                .min(to_close.len());
            for key in &to_close[closed..until] {
                shard.close_for_drain(*key);
            }
            closed = until;
        }
        if Instant::now() >= deadline {
            break;
        }
        // Messages that arrive during the drain still reach connections not yet closed.
        while let Ok(msg) = inbox.try_recv() {
            shard.handle(msg);
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = shard.conns.borrow().len();
    if left > 0 {
        tracing::warn!(
            shard = shard.index,
            connections = left,
            "drain timeout: dropping remaining connections"
        );
    }
    if let Some(bp) = shard.fanout.backplane() {
        // Presence removals of the closed connections, and the node's deregistration.
        bp.finish(Duration::from_secs(2)).await;
    }
}

/// Accepts until the drain. The accept in flight is never dropped (a cancelled accept
/// can lose a connection the kernel completed at that instant): on drain the listener's
/// read side is shut, which hands its queue to another `SO_REUSEPORT` listener (with
/// `net.ipv4.tcp_migrate_req = 1`) and makes the pending accept finish, with a
/// connection that is still served (and closed with 1001) or with an error.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    let mut last_warn: Option<Instant> = None;
    let mut stopping = false;
    loop {
        let mut accept = std::pin::pin!(listener.accept());
        let accepted = loop {
            let event = std::future::poll_fn(|cx| {
                if let std::task::Poll::Ready(r) = accept.as_mut().poll(cx) {
                    return std::task::Poll::Ready(Some(r));
                }
                if !stopping && shard.stop_accepting.poll_fired(cx) {
                    return std::task::Poll::Ready(None);
                }
                std::task::Poll::Pending
            })
            .await;
            match event {
                Some(r) => break r,
                None => {
                    stopping = true;
                    if let Err(e) = crate::sys::shutdown_read(listener.as_raw_fd()) {
                        tracing::warn!(shard = shard.index, error = %e, "could not shut the listener");
                    }
                }
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                shard.metrics.accepted.inc();
                // Counted before the task first runs, so a drain starting now waits for it.
                shard.handshaking.set(shard.handshaking.get() + 1);
                monoio::spawn(crate::ws::conn::serve(shard.clone(), stream, peer));
            }
            Err(_) if stopping => break,
            Err(e) => {
                shard.metrics.accept_errors.inc();
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(shard = shard.index, error = %e, "accept failed (file limit?)");
                    last_warn = Some(Instant::now());
                }
                // Out of descriptors or memory: back off instead of spinning.
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::debug!(shard = shard.index, "listener closed");
}

async fn sweeper(shard: Rc<Shard>) {
    while !shard.draining() || !shard.conns.borrow().is_empty() {
        monoio::time::sleep(Duration::from_secs(1)).await;
        shard.sweep();
    }
}

/// Drain closes per 20 ms tick at the least (500 a second per shard): a few clients
/// close at once, and beyond about 500 × drain_spread_secs per shard the window governs.
const MIN_DRAIN_CLOSES_PER_TICK: usize = 10;

/// Inbox messages handled before the inbox task lets the others run: the delivery tick
/// (one write per owed connection, carrying up to this many messages of a topic),
/// connection tasks and the runtime's completions.
const INBOX_BATCH: usize = 64;

/// A shard is congested when at least this many of its connections, and a quarter of
/// them, have queues more than half full: the host, not a client or two, is what is
/// slow.
const CONGESTED_MIN: usize = 4;

/// Lets every other ready task run, and the runtime submit and reap I/O, once.
pub(crate) async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// A one-shot, single-waiter local signal.
#[derive(Default)]
struct StopSignal {
    fired: Cell<bool>,
    waker: Cell<Option<std::task::Waker>>,
}

impl StopSignal {
    fn fire(&self) {
        self.fired.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Whether the signal fired; if not, `cx` is woken when it does.
    fn poll_fired(&self, cx: &mut std::task::Context<'_>) -> bool {
        if !self.fired.get() {
            self.waker.set(Some(cx.waker().clone()));
        }
        self.fired.get()
    }
}
