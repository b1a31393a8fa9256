//! The Redis backplane of one shard: what joins nodes into a cluster.
//!
//! Every shard has two Redis connections of its own, each run by one task on the
//! shard's runtime:
//! - **subscriber** (`subscriber`): SUBSCRIBEs to a topic's channel when its first
//!   subscriber on the node arrives and UNSUBSCRIBEs when its last leaves, batching every
//!   change made since its last write into one command; also listens on the shard's
//!   direct channel. A client's `subscribed` reply waits for Redis to confirm the
//!   subscription, so a message published after it is never missed. What it has asked
//!   Redis for, and who waits on it, is a pure state machine (`subscriptions`).
//! - One copy per node (`owners`, `relay`): each topic's subscription is held by one
//!   shard of the node, its owner, which hands every message to the sibling shards that
//!   want the topic. A sibling asks its owner as it would ask Redis, and waits for the
//!   answer the same way.
//! - **commands** (`commands`): pipelines publishes, presence changes and heartbeats,
//!   and requests from the admin API; replies are matched in order. Its queue
//!   (`queue`, bounded) and the presence it keeps (`presence`) are modules of their own.
//!
//! Both run the same connect-and-backoff loop (`keep`): exponential backoff and jitter,
//! then they restore their state: every topic is resubscribed and every user's presence
//! re-registered. Until then the shard keeps serving its own connections. With Sentinel
//! (`sentinel`) they follow the master. Each link's state (`LinkState`) is the truth
//! the shard acts on; the `ringway_redis_*_up` gauges mirror it. The schema is in
//! `schema`.

pub mod cluster;
mod commands;
pub mod inbox;
mod keep;
pub mod link;
pub mod masters;
mod order;
mod owners;
mod presence;
mod queue;
mod relay;
pub mod remote;
pub mod replay;
pub mod schema;
pub mod sentinel;
mod subscriber;
mod subscriptions;
mod url;

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;
use serde_json::value::RawValue;

pub use commands::run as run_commands;
pub use relay::run as run_interest;
pub use sentinel::watch as watch_sentinel;
pub use subscriber::run as run_subscriber;
use url::Addr;
pub use url::{RedisUrl, Target, UrlError};

use std::sync::Arc;

use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode, NotRecovered};
use crate::shard::history::Bounds as HistoryBounds;
use crate::shard::outbound::ConnHandle;
use crate::shard::Node;

/// Time allowed for connecting to Redis (and AUTH/SELECT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels or presence entries per command, so one command never blocks Redis long.
const BATCH: usize = 512;
/// A command unanswered this long, or a subscriber PING, breaks the connection.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The subscriber PINGs Redis after this long without traffic.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The answer to a request forwarded from another thread.
pub type RemoteReply = flume::Sender<Result<BytesFrame, String>>;

/// What to do with a command's reply.
pub enum Reply {
    /// Nothing; an error is logged under this name.
    Ignore(&'static str),
    /// A client's publish: answered `published` (with the id Redis gave) when it has a
    /// `ref`, an error frame on failure.
    Publish {
        conn: Weak<ConnHandle>,
        topic: Rc<str>,
        /// The id it was published with (the stream gives one when kept in history).
        id: String,
        reference: Option<Box<RawValue>>,
    },
    /// A read of a topic's stream for `replay` (`count` entries asked for).
    History {
        topic: Rc<str>,
        serial: u64,
        count: usize,
    },
    /// A read of a user's inbox for a new connection (`inbox`).
    Inbox {
        key: usize,
        conn: u64,
        user: Rc<str>,
    },
    /// A client's `ack`: answered `acked` when it has a `ref`.
    Ack {
        conn: Weak<ConnHandle>,
        id: String,
        reference: Option<Box<RawValue>>,
    },
    /// A request from another thread (the admin API).
    Remote(RemoteReply),
    /// The node's heartbeat (`ringway_node_alive`): 0 past the first means it came
    /// too late and every shard registers its connections again.
    Heartbeat,
    /// The public library loaded where there was none; when there was one, its
    /// version is asked (`PublicVersion`).
    PublicLibrary,
    /// The loaded public library's version (`ringway_version`): replaced when it is
    /// older than this gateway's, or has none; left alone when a newer gateway loaded
    /// it.
    PublicVersion,
    /// Presence entries added (`set`) or removed: written again if the connection is
    /// lost before Redis answers (`presence::Pending::unanswered`).
    Presence {
        set: bool,
        entries: Vec<presence::Entry>,
    },
    /// `INFO server replication` on a new command connection: the same Redis as
    /// before (its `run_id` and replication id) kept this shard's presence entries, and
    /// only changes are sent; another registers every connection.
    Server,
}

/// Where one of the shard's Redis links stands. This is the truth the shard acts on;
/// the `ringway_redis_*_up` gauges (and so `/readyz`) mirror it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Not connected: nothing is recorded for it, the reconnect starts from scratch.
    Down,
    /// Connected, and the state this shard wants is being restored (the subscriber's
    /// first SUBSCRIBEs are not all confirmed yet).
    Syncing,
    /// Connected and in step.
    Up,
}

/// A `subscribed` reply waiting for Redis to confirm the subscription.
struct PendingAck {
    conn: Weak<ConnHandle>,
    frame: Bytes,
}

/// One shard's backplane state.
pub struct Backplane {
    pub url: RedisUrl,
    /// This shard's direct-message channel.
    pub direct_channel: String,
    /// The subscriber connection's topics (those this shard owns), and the replies
    /// waiting on them.
    subs: RefCell<subscriptions::Subscriptions<PendingAck>>,
    sub_wake: Wake,
    /// The topics this shard gets from their owners, and the replies waiting on them;
    /// the interest task (`relay::run`) sends the changes.
    via: RefCell<subscriptions::Subscriptions<PendingAck>>,
    via_wake: Wake,
    /// The topics this shard owns for its siblings.
    owned: RefCell<owners::Owned>,
    /// This shard's index, and the node (its other shards' inboxes).
    index: usize,
    node: Arc<Node>,
    /// The command connection's queue: waiting (bounded; beyond it new commands fail
    /// at once with `unavailable` rather than pile up behind a stalled Redis) and
    /// unanswered.
    queue: RefCell<queue::CommandQueue<Reply>>,
    last_command_warn: Cell<Option<std::time::Instant>>,
    cmd_wake: Wake,
    /// Presence entries to add or remove at the next write.
    presence: RefCell<presence::Pending>,
    /// Which Redis the command connection last reached (`run_id` and replication id),
    /// and whether this connection has learned it yet (presence changes wait for it).
    redis_run: RefCell<Option<String>>,
    presence_ready: Cell<bool>,
    /// Presence calls written and not yet answered (`presence::queue_changes` keeps
    /// them few).
    presence_in_flight: Cell<usize>,
    /// Presence calls Redis refused (or that found no room in the queue) are sent
    /// again, but not before this.
    presence_retry: Cell<Option<std::time::Instant>>,
    stopping: Cell<bool>,
    finished: Cell<bool>,
    sub_link: Cell<LinkState>,
    cmd_link: Cell<LinkState>,
    /// With Sentinel: the master as last named (by a Sentinel, or by the address a
    /// link found a master at). A link connected elsewhere reconnects.
    master: RefCell<Option<Addr>>,
    /// Ends a link's backoff early: the master moved, so retrying now should work.
    sub_retry: Wake,
    cmd_retry: Wake,
    last_warn: Cell<Option<std::time::Instant>>,
    /// Outbound queue limit for replies, and the shard's counters.
    reply_limit: Cell<usize>,
    metrics: Arc<ShardMetrics>,
    /// Resumes and catch-ups reading topics' streams.
    pub replays: RefCell<replay::Replays>,
    /// Answered stream reads, for the shard to hand out (`Shard::finish_reads`).
    reads_done: RefCell<Vec<ReadDone>>,
    /// New connections whose user's inbox is read, and what it got meanwhile.
    pub inboxes: RefCell<inbox::Inboxes>,
}

/// An answered stream read: topic, serial, page.
pub type ReadDone = (Rc<str>, u64, Result<replay::Page, NotRecovered>);

/// `FCALL ringway_publish 3 <channel> <stream> <epoch key> <id> <data> <size> <ttl ms>`.
/// With history on, `id` is empty (the stream gives it); the reply is `[id, receivers,
/// epoch]`.
///
/// In a Redis Cluster a message kept out of history is `SPUBLISH`ed as is (reply: the
/// receivers): while its slot migrates, a plain `SPUBLISH` stays with the master whose
/// subscribers have the channel, where the function's call would follow its keys to
/// the importing master and reach nobody.
pub fn publish_args(topic: &str, id: &str, data: &RawValue, history: HistoryBounds) -> Vec<Bytes> {
    if schema::cluster() && history.off() {
        return vec![
            Bytes::from_static(b"SPUBLISH"),
            Bytes::from(schema::topic_channel(topic)),
            Bytes::from(schema::topic_envelope(id, data)),
        ];
    }
    vec![
        Bytes::from_static(b"FCALL"),
        Bytes::from_static(schema::FN_PUBLISH.as_bytes()),
        Bytes::from_static(b"3"),
        Bytes::from(schema::topic_channel(topic)),
        Bytes::from(schema::history_key(topic)),
        Bytes::from(schema::epoch_key(topic)),
        Bytes::from(id.to_owned()),
        Bytes::copy_from_slice(data.get().as_bytes()),
        Bytes::from(history.size.to_string()),
        Bytes::from(history.ttl_ms().to_string()),
    ]
}

/// The message id in `ringway_publish`'s reply; `sent`, the id it was given, for a
/// plain `SPUBLISH` (whose reply is a count).
pub fn published_id(reply: &BytesFrame, sent: &str) -> Option<String> {
    match reply {
        BytesFrame::Integer(_) if !sent.is_empty() => Some(sent.to_owned()),
        BytesFrame::Array(parts) => match parts.first() {
            Some(BytesFrame::BulkString(id)) => std::str::from_utf8(id).ok().map(str::to_owned),
            _ => None,
        },
        _ => None,
    }
}

impl Backplane {
    pub fn new(
        url: RedisUrl,
        node: Arc<Node>,
        shard: usize,
        cfg: &Config,
        metrics: Arc<ShardMetrics>,
    ) -> Self {
        // Before any key is named: a cluster's keys carry hash tags.
        schema::set_cluster(url.is_cluster());
        Self {
            url,
            via: RefCell::default(),
            via_wake: Wake::default(),
            owned: RefCell::default(),
            index: shard,
            reply_limit: Cell::new(cfg.outbound_queue_bytes),
            metrics,
            replays: RefCell::default(),
            reads_done: RefCell::default(),
            inboxes: RefCell::default(),
            direct_channel: schema::shard_channel(&node.id, shard),
            node,
            subs: RefCell::default(),
            last_command_warn: Cell::new(None),
            sub_wake: Wake::default(),
            queue: RefCell::default(),
            cmd_wake: Wake::default(),
            presence: RefCell::default(),
            redis_run: RefCell::default(),
            presence_ready: Cell::new(false),
            presence_in_flight: Cell::new(0),
            presence_retry: Cell::new(None),
            stopping: Cell::new(false),
            finished: Cell::new(false),
            sub_link: Cell::new(LinkState::Down),
            cmd_link: Cell::new(LinkState::Down),
            master: RefCell::default(),
            sub_retry: Wake::default(),
            cmd_retry: Wake::default(),
            last_warn: Cell::new(None),
        }
    }

    /// A connection subscribed to `topic`: the reply `ack` goes out once Redis has the
    /// subscription (at once if it already has).
    pub fn subscribed(&self, topic: &str, conn: &Rc<ConnHandle>, ack: Bytes) -> Option<Bytes> {
        if self.is_confirmed(topic) {
            return Some(ack);
        }
        let topic: Rc<str> = Rc::from(topic);
        self.subs_of(&topic).borrow_mut().wait(
            topic.clone(),
            PendingAck {
                conn: Rc::downgrade(conn),
                frame: ack,
            },
        );
        self.topic_changed(topic);
        None
    }

    /// Whether this shard owns `topic`'s Redis subscription on the node.
    fn mine(&self, topic: &str) -> bool {
        owners::owner(topic, self.node.shards.len()) == self.index
    }

    /// The subscriptions `topic` is in: Redis's (owned here) or its owner's.
    fn subs_of(&self, topic: &str) -> &RefCell<subscriptions::Subscriptions<PendingAck>> {
        if self.mine(topic) {
            &self.subs
        } else {
            &self.via
        }
    }

    /// Whether `topic`'s subscription is confirmed (by Redis, or by its owner).
    fn is_confirmed(&self, topic: &str) -> bool {
        self.subs_of(topic).borrow().is_confirmed(topic)
    }

    /// The command connection is up.
    fn cmd_up(&self) -> bool {
        self.cmd_link.get() == LinkState::Up
    }

    /// A link's state changed; its gauge mirrors it. The subscriber counts as up only
    /// once the subscriptions it restored are confirmed: until then the node is not
    /// ready. A subscriber that goes down forgets what Redis had.
    fn set_link(&self, role: keep::Role, state: LinkState) {
        let up = u64::from(state == LinkState::Up);
        match role {
            keep::Role::Subscriber => {
                self.sub_link.set(state);
                self.metrics.redis_subscriber_up.set(up);
                if state == LinkState::Down {
                    self.subs.borrow_mut().lost();
                    self.siblings_lost();
                }
            }
            keep::Role::Commands => {
                self.cmd_link.set(state);
                self.metrics.redis_commands_up.set(up);
            }
        }
    }

    /// Ends a link's backoff early.
    fn retry(&self, role: keep::Role) -> &Wake {
        match role {
            keep::Role::Subscriber => &self.sub_retry,
            keep::Role::Commands => &self.cmd_retry,
        }
    }

    /// A link connected to `addr`. With Sentinel that is the master now (the link
    /// asked a Sentinel and checked the role); a link of this shard connected
    /// elsewhere is told to move.
    fn connected_to(&self, addr: &Addr) {
        if matches!(self.url.target, Target::Sentinel { .. }) {
            self.master_named(addr.clone());
        }
    }

    /// A Sentinel (or a link) named the master.
    fn master_named(&self, addr: Addr) {
        let mut master = self.master.borrow_mut();
        if master.as_ref() == Some(&addr) {
            return;
        }
        if let Some(old) = master.as_ref() {
            tracing::info!(from = %old, to = %addr, "the redis master moved; reconnecting");
        }
        *master = Some(addr);
        drop(master);
        self.sub_wake.wake();
        self.cmd_wake.wake();
        self.sub_retry.wake();
        self.cmd_retry.wake();
    }

    /// Where the master is now, if a link connected to `addr` is on the wrong server.
    fn moved_from(&self, addr: &Addr) -> Option<Addr> {
        self.master
            .borrow()
            .as_ref()
            .filter(|m| *m != addr)
            .cloned()
    }

    /// A topic gained its first or lost its last local subscriber (or, for a topic
    /// this shard owns, a sibling's interest changed). For a topic owned here, nothing
    /// is recorded while the subscriber connection is down: the reconnect subscribes
    /// everything wanted anyway.
    pub fn topic_changed(&self, topic: Rc<str>) {
        if !self.mine(&topic) {
            self.via.borrow_mut().mark_dirty(topic);
            self.via_wake.wake();
        } else if self.sub_link.get() != LinkState::Down {
            self.subs.borrow_mut().mark_dirty(topic);
            self.sub_wake.wake();
        }
    }

    /// The connection unsubscribes from `topic`: a `subscribed` reply still waiting
    /// for Redis goes out now, so the client never sees the two replies out of order.
    pub fn unsubscribing(&self, topic: &str, conn: &Rc<ConnHandle>) {
        let mine = self
            .subs_of(topic)
            .borrow_mut()
            .take_waiting(topic, |a| std::ptr::eq(a.conn.as_ptr(), Rc::as_ptr(conn)));
        for a in mine {
            self.reply(conn, a.frame);
        }
    }

    /// Publishes a topic message through Redis: appended to the topic's stream when
    /// `history` is on (the stream then gives the id), else with `id`.
    pub fn publish(
        &self,
        topic: &str,
        id: &str,
        data: &RawValue,
        history: HistoryBounds,
        reply: Reply,
    ) {
        let id = if history.off() { id } else { "" };
        let args = publish_args(topic, id, data, history);
        let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        self.command(&args, reply);
    }

    /// Connection `key` (number `conn`) subscribed to `topic` with `since`: it gets
    /// its `subscribed` answer and what it missed from the topic's stream once Redis
    /// has the subscription. `Some(answer)` when it cannot be asked now.
    pub fn resume(
        &self,
        topic: &str,
        conn: &Rc<ConnHandle>,
        key: usize,
        since: replay::Position,
        reference: Option<&RawValue>,
    ) -> Option<Bytes> {
        if !self.cmd_up() {
            return Some(protocol::resumed(
                topic,
                Err(NotRecovered::Unavailable),
                None,
                reference,
            ));
        }
        let topic: Rc<str> = Rc::from(topic);
        self.replays.borrow_mut().wait(
            &topic,
            replay::Who::Conn {
                key,
                conn: conn.id,
                since,
                reference: reference.map(ToOwned::to_owned),
            },
        );
        if self.is_confirmed(&topic) {
            self.start_read(&topic);
        } else {
            self.topic_changed(topic);
        }
        None
    }

    /// Sends `topic`'s stream read if someone waits, Redis has the subscription and the
    /// command connection is up.
    pub fn start_read(&self, topic: &str) {
        if !self.cmd_up() || !self.is_confirmed(topic) {
            return;
        }
        let Some(req) = self.replays.borrow_mut().start(topic) else {
            return;
        };
        let args = replay::request_args(topic, &req);
        let args: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
        let mut buf = BytesMut::new();
        link::encode(&mut buf, &args);
        self.queue.borrow_mut().push(
            buf.freeze(),
            masters::Route::of(&args),
            Reply::History {
                topic: Rc::from(topic),
                serial: req.serial,
                count: req.count,
            },
        );
        self.cmd_wake.wake();
    }

    /// A new connection of `user` gets what waits in the user's inbox (read once its
    /// presence is registered, so a message sent meanwhile is routed to it live or
    /// found in the inbox); until then its live direct messages are held.
    pub fn read_inbox(&self, key: usize, conn: u64, user: &Rc<str>) {
        // While the command connection is away the read waits for it (and is sent
        // after the reconnect registers every connection).
        self.inboxes.borrow_mut().wait(key, conn, user.clone());
        self.cmd_wake.wake();
    }

    /// Lets the command task write what was queued.
    pub fn wake_commands(&self) {
        self.cmd_wake.wake();
    }

    /// Queues the inbox reads asked for since the last write, behind the presence
    /// changes (`commands`).
    fn queue_inbox_reads(&self) {
        let reads = {
            let presence = self.presence.borrow();
            let ready = |conn| !presence.registering(conn);
            self.inboxes.borrow_mut().take_unsent(ready)
        };
        for (key, conn, user) in reads {
            let inbox = schema::inbox_key(&user);
            let args: [&[u8]; 4] = [b"XRANGE", inbox.as_bytes(), b"-", b"+"];
            self.command(&args, Reply::Inbox { key, conn, user });
        }
    }

    /// Acknowledges `user`'s direct messages up to `id` in the user's inbox.
    pub fn ack(&self, conn: &Rc<ConnHandle>, user: &str, id: &str, reference: Option<&RawValue>) {
        let inbox = schema::inbox_key(user);
        let args: [&[u8]; 5] = [
            b"FCALL",
            schema::FN_ACK.as_bytes(),
            b"1",
            inbox.as_bytes(),
            id.as_bytes(),
        ];
        let reply = Reply::Ack {
            conn: Rc::downgrade(conn),
            id: id.to_owned(),
            reference: reference.map(ToOwned::to_owned),
        };
        self.command(&args, reply);
    }

    /// Sends every read that waited for the command connection.
    fn start_reads(&self) {
        let topics = self.replays.borrow().startable();
        for t in topics {
            self.start_read(&t);
        }
    }

    /// Stream reads answered since the last call.
    pub fn take_reads(&self) -> Vec<ReadDone> {
        std::mem::take(&mut *self.reads_done.borrow_mut())
    }

    /// Queues one command; fails it at once while Redis is unreachable.
    pub fn command(&self, args: &[&[u8]], reply: Reply) {
        if !self.cmd_up() {
            self.complete(reply, Err("redis unavailable".into()));
            return;
        }
        let size: usize = args.iter().map(|a| a.len() + 16).sum();
        if !self.queue.borrow().has_room(size) {
            self.complete(reply, Err("redis is not keeping up: backlog full".into()));
            return;
        }
        let mut buf = BytesMut::with_capacity(size);
        link::encode(&mut buf, args);
        self.queue
            .borrow_mut()
            .push(buf.freeze(), masters::Route::of(args), reply);
        self.cmd_wake.wake();
    }

    /// A connection of `user` opened on this shard. Kept while Redis is away (up to a
    /// bound), for a reconnect to the same Redis.
    pub fn user_online(&self, user: &Rc<str>, conn: u64) {
        self.presence.borrow_mut().opened(user, conn);
        self.cmd_wake.wake();
    }

    /// Registers every identified connection of the shard again, at the command
    /// connection's next write (its node's heartbeat lapsed: others may have reaped
    /// its entries).
    pub fn register_all(&self) {
        self.presence.borrow_mut().all_again();
        self.cmd_wake.wake();
    }

    /// A connection of `user` closed. Kept while Redis is away (up to a bound), so
    /// entries that outlived a network partition are deleted at the reconnect.
    pub fn user_offline(&self, user: &Rc<str>, conn: u64) {
        self.presence.borrow_mut().closed(user, conn);
        self.cmd_wake.wake();
    }

    /// Asks the command task to deregister the node and send the last presence
    /// removals; returns once Redis has answered them, at once while Redis is away, or
    /// after `limit`.
    pub async fn finish(&self, limit: Duration) {
        self.stopping.set(true);
        self.cmd_wake.wake();
        let deadline = std::time::Instant::now() + limit;
        while self.cmd_up() && !self.finished.get() && std::time::Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A payload on a ringway channel that is not what the schema says: counted, and
    /// logged at most every 10 s.
    fn bad_message(&self, m: &ShardMetrics, channel: &str, e: &serde_json::Error) {
        m.backplane_bad.inc();
        let now = std::time::Instant::now();
        if self
            .last_warn
            .get()
            .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10))
        {
            self.last_warn.set(Some(now));
            tracing::warn!(channel, error = %e, "dropped a malformed message from redis (see the schema in the README)");
        }
    }

    /// Redis answered a SUBSCRIBE of `topic` (or, for a topic owned by a sibling, its
    /// owner answered an interest): once confirmed, every pending `subscribed` reply
    /// goes out, and siblings waiting on this shard are answered.
    pub fn confirm(&self, topic: &str) {
        let Some(waiting) = self.subs_of(topic).borrow_mut().confirmed(topic) else {
            return;
        };
        if self.mine(topic) {
            self.answer_siblings(topic);
        }
        for ack in waiting {
            if let Some(conn) = ack.conn.upgrade() {
                self.reply(&conn, ack.frame);
            }
        }
        self.start_read(topic);
    }

    /// A reload changed `outbound_queue_bytes`.
    pub fn set_reply_limit(&self, limit: usize) {
        self.reply_limit.set(limit);
    }

    /// Queues a reply to a client, bounded like every other reply.
    fn reply(&self, conn: &Rc<ConnHandle>, frame: Bytes) {
        conn.reply(frame, self.reply_limit.get(), &self.metrics);
    }

    /// Runs a command's reply handler.
    fn complete(&self, reply: Reply, result: Result<BytesFrame, String>) {
        let result = match result {
            Ok(BytesFrame::Error(e)) => Err(e.to_string()),
            other => other,
        };
        match reply {
            Reply::Ignore(what) => {
                if let Err(e) = result {
                    let now = std::time::Instant::now();
                    let quiet = self
                        .last_command_warn
                        .get()
                        .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10));
                    if !quiet {
                        self.last_command_warn.set(Some(now));
                        tracing::warn!(command = what, error = %e, "redis command failed (repeats within 10 s not logged)");
                    }
                }
            }
            Reply::Publish {
                conn,
                topic,
                id,
                reference,
            } => {
                let Some(conn) = conn.upgrade() else { return };
                match result {
                    Ok(reply) => {
                        if let Some(r) = reference {
                            let id = published_id(&reply, &id).unwrap_or_default();
                            self.reply(&conn, protocol::published(&topic, &id, Some(&r)));
                        }
                    }
                    Err(e) => self.reply(
                        &conn,
                        protocol::error(
                            ErrorCode::Unavailable,
                            &format!("publish failed: {e}"),
                            reference.as_deref(),
                        ),
                    ),
                }
            }
            Reply::Remote(tx) => {
                let _ = tx.send(result);
            }
            Reply::Presence { set, entries } => {
                self.presence_in_flight
                    .set(self.presence_in_flight.get().saturating_sub(1));
                self.cmd_wake.wake(); // room for the next call
                if let Err(e) = result {
                    // Refused (an error reply, a full queue, Redis away): kept, and
                    // sent again in a second.
                    self.complete(Reply::Ignore(presence::function(set)), Err(e));
                    self.presence.borrow_mut().unanswered(set, entries);
                    self.presence_retry
                        .set(Some(std::time::Instant::now() + Duration::from_secs(1)));
                }
            }
            Reply::Server => {
                let run = match &result {
                    Ok(BytesFrame::BulkString(info)) => redis_identity(info),
                    Ok(_) => None,
                    Err(e) => {
                        let what = "INFO (refused: every reconnect registers every connection again; an ACL user needs +info)";
                        self.complete(Reply::Ignore(what), Err(e.clone()));
                        None
                    }
                };
                let before = self.redis_run.replace(run.clone());
                if run.is_none() || run != before {
                    if before.is_some() {
                        tracing::info!(
                            shard = self.index,
                            "reconnected to another redis (or one that restarted): registering every connection again"
                        );
                    }
                    self.presence.borrow_mut().all_again();
                }
                self.presence_ready.set(true);
                self.cmd_wake.wake();
            }
            Reply::Heartbeat => match result {
                Ok(BytesFrame::Integer(0)) => {
                    tracing::warn!(
                        "this node's heartbeat came after it had expired and other nodes reaped some of its entries (the process was paused, starved or cut off from redis); every shard registers its connections again"
                    );
                    for shard in 0..self.node.shards.len() {
                        self.send_to(shard, crate::shard::Inbox::Reregister);
                    }
                    // The mark goes once the shards are asked: were this answer lost
                    // with the connection, the next heartbeat would say it again.
                    let mark =
                        schema::reaped_key(&schema::incarnation(&self.node.id, &self.node.epoch));
                    self.command(&[b"DEL", mark.as_bytes()], Reply::Ignore("DEL"));
                }
                Ok(_) => {}
                Err(e) => self.complete(Reply::Ignore(schema::FN_NODE_ALIVE), Err(e)),
            },
            Reply::PublicLibrary => match result {
                Err(e) if e.contains("already exists") => {
                    let args: [&[u8]; 3] = [b"FCALL", schema::FN_PUBLIC_VERSION.as_bytes(), b"0"];
                    self.command(&args, Reply::PublicVersion);
                }
                Err(e) => {
                    self.complete(Reply::Ignore("FUNCTION LOAD (the public library)"), Err(e))
                }
                Ok(_) => {}
            },
            Reply::PublicVersion => {
                let older = match &result {
                    Ok(BytesFrame::Integer(v)) => *v < schema::LIBRARY_VERSION,
                    Err(e) => e.contains("not found"),
                    Ok(_) => false,
                };
                if older {
                    let text = schema::library(true);
                    let args: [&[u8]; 4] = [b"FUNCTION", b"LOAD", b"REPLACE", text.as_bytes()];
                    self.command(&args, Reply::Ignore("FUNCTION LOAD (the public library)"));
                }
            }
            Reply::Inbox { key, conn, user } => {
                let entries = result.and_then(|frame| inbox::parse_entries(&frame));
                self.inboxes.borrow_mut().answered(key, conn, user, entries);
            }
            Reply::Ack {
                conn,
                id,
                reference,
            } => {
                let Some(conn) = conn.upgrade() else { return };
                match result {
                    Ok(BytesFrame::Integer(removed)) => {
                        if let Some(r) = reference {
                            self.reply(&conn, protocol::acked(&id, removed as usize, Some(&r)));
                        }
                    }
                    Ok(_) | Err(_) => self.reply(
                        &conn,
                        protocol::error(
                            ErrorCode::Unavailable,
                            "the acknowledgement did not reach redis; send it again",
                            reference.as_deref(),
                        ),
                    ),
                }
            }
            Reply::History {
                topic,
                serial,
                count,
            } => {
                let page = result
                    .and_then(|frame| replay::parse_page(&frame, count))
                    .map_err(|e| {
                        tracing::debug!(topic = &*topic, error = %e, "history read failed");
                        NotRecovered::Unavailable
                    });
                self.reads_done.borrow_mut().push((topic, serial, page));
            }
        }
    }
}

/// `<run_id>/<master_replid>` from an `INFO server replication` reply. The run id
/// changes when Redis restarts and differs between servers; the replication id changes
/// when a replica is promoted, or a master resyncs from another, so a server that was
/// demoted and promoted again while a shard was away does not pass for the same data.
fn redis_identity(info: &[u8]) -> Option<String> {
    let info = std::str::from_utf8(info).ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    Some(format!(
        "{}/{}",
        field("run_id:")?,
        field("master_replid:")?
    ))
}

/// Exponential backoff with jitter: 100 ms doubling to 5 s, each delay drawn from
/// [½, 1½) of its step, so a fleet that lost Redis together does not return together.
pub struct Backoff {
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(seed: u64) -> Self {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self {
            attempt: 0,
            seed: (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ time) | 1,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let step_ms = (100u64 << self.attempt.min(6)).min(5_000);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let jitter = (self.seed % 1000) as f64 / 1000.0 + 0.5;
        Duration::from_millis((step_ms as f64 * jitter) as u64)
    }
}

/// A re-armable, single-waiter wake-up for a task on the same thread.
#[derive(Default)]
struct Wake {
    pending: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Wake {
    fn wake(&self) {
        self.pending.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Ready once `wake` has been called since the last time this returned Ready.
    fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending.replace(false) {
            Poll::Ready(())
        } else {
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }

    async fn woken(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_is_told_apart_by_run_id_and_replication_id() {
        let info = b"# Server\r\nredis_version:7.0.15\r\nrun_id:abc123\r\n\r\n# Replication\r\nrole:master\r\nmaster_replid:r9\r\n";
        assert_eq!(redis_identity(info).as_deref(), Some("abc123/r9"));
        assert_eq!(redis_identity(b"# Server\r\nrun_id:abc123\r\n"), None);
        assert_eq!(redis_identity(b"run_id:\r\nmaster_replid:r9\r\n"), None);
    }

    #[test]
    fn backoff_grows_to_five_seconds_with_jitter() {
        let mut b = Backoff::new(3);
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first < Duration::from_millis(150));
        for _ in 0..10 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(2_500) && late < Duration::from_millis(7_500));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(150));
    }
}
