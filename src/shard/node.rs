//! The node: what all shards of one process share (its id, the shard inboxes, the
//! message-id sequence) and the code that starts and stops the shard threads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use bytes::Bytes as RawBytes;
use serde_json::value::RawValue;

use super::unacked::Unacked;
use super::Shard;
use crate::auth::Authenticator;
use crate::backplane::RemoteReply;
use crate::config::{Config, Driver};
use crate::metrics::{Counter, ShardMetrics};
use crate::protocol::{MessageId, NotRecovered};

/// Messages a shard accepts from other threads.
#[derive(Debug)]
pub enum Inbox {
    /// Deliver an already-framed topic message to local subscribers (and keep it in
    /// history).
    Publish {
        topic: Arc<str>,
        id: MessageId,
        frame: Bytes,
    },
    /// Deliver a direct message to these users' local connections (no backplane).
    Direct {
        users: Vec<Arc<str>>,
        key: MessageId,
        id: Arc<str>,
        data: Arc<RawValue>,
    },
    /// Send a command on this shard's Redis command connection (the admin API's way
    /// to Redis) and answer on `reply`.
    Redis {
        args: Vec<RawBytes>,
        reply: RemoteReply,
    },
    /// Read this shard's history of a topic (`GET /v1/history`) and answer on `reply`.
    History {
        topic: Box<str>,
        since: Option<MessageId>,
        limit: usize,
        reply: flume::Sender<Result<HistoryPage, NotRecovered>>,
    },
    /// A topic message from Redis, handed on by the shard that owns the topic's
    /// subscription on this node (`backplane::owners`); `pos` is its id and epoch when
    /// it is in history.
    Relay {
        topic: Arc<str>,
        pos: Option<(MessageId, Arc<str>)>,
        frame: Bytes,
    },
    /// To a topic's owner: sibling `from` wants (`on`) or no longer wants its messages.
    Interest {
        topic: Arc<str>,
        from: usize,
        on: bool,
    },
    /// From a topic's owner: the answer to one `Interest` on (its subscription is
    /// confirmed, or the interest was taken back first).
    Answer { topic: Arc<str> },
    /// From a topic's owner: messages of the topic may have been missed; ask again and
    /// catch up from the stream.
    Lost { topic: Arc<str> },
    /// From shard 0: the node's heartbeat lapsed, so other nodes may have reaped its
    /// presence entries; register every identified connection again.
    Reregister,
    /// Stop accepting and close every connection with 1001.
    Drain,
}

impl Inbox {
    /// Whether the message held room in the inbox (`ShardLink::reserve`). The drain, the
    /// messages between a topic's owner and its siblings (a handful per subscription
    /// change) and `Reregister` need none, so they are never refused; a relay holds its
    /// bytes instead (`ShardLink::reserve_relay`).
    pub fn holds_room(&self) -> bool {
        !matches!(
            self,
            Self::Drain
                | Self::Relay { .. }
                | Self::Interest { .. }
                | Self::Answer { .. }
                | Self::Lost { .. }
                | Self::Reregister
        )
    }
}

/// A page of a topic's history: message frames, oldest first.
#[derive(Debug)]
pub struct HistoryPage {
    pub epoch: String,
    pub frames: Vec<Bytes>,
    /// The limit cut the page short.
    pub more: bool,
}

/// How other threads reach one shard.
///
/// The inbox channel itself is unbounded; what bounds it is `reserved`: a publish or a
/// direct send first holds room in every shard it goes to (`inbox_capacity` messages
/// each), and goes to none of them if one is full. So a message is taken by every shard
/// or by none, and an `overloaded` answer means nothing was delivered. The admin API's
/// Redis commands hold room the same way; relayed topic messages hold bytes
/// (`relay_buffer_bytes`); the drain (one per shard) and the few messages that keep a
/// topic's owner and its siblings in step (`Inbox::holds_room`) need none.
#[derive(Debug)]
pub struct ShardLink {
    pub tx: flume::Sender<Inbox>,
    pub metrics: Arc<ShardMetrics>,
    pub cpu: usize,
    reserved: AtomicUsize,
    capacity: usize,
    /// Bytes of relayed topic messages in the inbox (`relay_buffer_bytes`).
    relayed: AtomicUsize,
    relay_capacity: usize,
}

impl ShardLink {
    /// Holds room for one message in this shard's inbox; false when it is full.
    pub fn reserve(&self) -> bool {
        if self.reserved.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.reserved.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back room held by `reserve`: the shard took the message out of its inbox,
    /// or it was never sent.
    pub fn release(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }

    /// Holds room for a relayed topic message of `bytes`; false when the shard's
    /// relays would go over `relay_buffer_bytes` (a message larger than that is still
    /// taken when none are waiting). Relays are bounded apart from the inbox's message
    /// count: they are what Redis would otherwise have buffered for the shard.
    pub fn reserve_relay(&self, bytes: usize) -> bool {
        let before = self.relayed.fetch_add(bytes, Ordering::AcqRel);
        if before > 0 && before + bytes > self.relay_capacity {
            self.relayed.fetch_sub(bytes, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back room held by `reserve_relay`.
    pub fn release_relay(&self, bytes: usize) {
        self.relayed.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Sends the request `make` builds around its reply channel (an admin API request
    /// to this shard), holding inbox room like a publish; returns where the answer will
    /// come.
    pub fn ask<R>(
        &self,
        make: impl FnOnce(flume::Sender<R>) -> Inbox,
    ) -> Result<flume::Receiver<R>, Unsent> {
        if !self.reserve() {
            return Err(Unsent::Full);
        }
        let (tx, rx) = flume::bounded(1);
        if self.tx.send(make(tx)).is_err() {
            self.release();
            return Err(Unsent::Stopped);
        }
        Ok(rx)
    }
}

/// Why `ShardLink::ask` sent nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    /// The shard's inbox is full.
    Full,
    /// The shard has stopped.
    Stopped,
}

/// State shared by every shard of this process.
#[derive(Debug)]
pub struct Node {
    pub id: String,
    pub shards: Vec<ShardLink>,
    /// The I/O driver the shards run on: "io_uring" or "epoll".
    pub driver: &'static str,
    pub listen: SocketAddr,
    seq: AtomicU64,
    /// The largest millisecond part given to an id, so ids never go back with the
    /// wall clock.
    last_ms: AtomicU64,
    /// Held while a message takes its id and goes into the shards' inboxes, so every
    /// shard receives messages in id order (`broker`); holds the last id given.
    order: Mutex<Option<MessageId>>,
    /// This node's history epoch: chosen at start, so a resume from before a restart
    /// (whose history is gone) is told so.
    pub epoch: String,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Messages accepted for publishing (client or API).
    pub published: Counter,
    /// Connections open on the node, or reserved by an upgrade about to register
    /// (`reserve_connection`), against `max_connections`.
    open_connections: AtomicUsize,
    /// Admin API publishes and sends that waited for room in a full shard inbox.
    pub publish_waits: Counter,
    /// Verifies client tokens.
    auth: Mutex<Arc<Authenticator>>,
    /// The TLS server configuration in force; `None` when the listener is plain.
    tls: Mutex<Option<Arc<rustls::ServerConfig>>>,
    /// Whether shards are joined to other nodes through Redis.
    pub backplane: bool,
    /// Which shards hold which users, for direct messages without a backplane.
    pub directory: Directory,
    /// Connections per client address, counted while `max_connections_per_ip` is set.
    pub per_ip: crate::limits::Tally<std::net::IpAddr>,
    /// Connections per identified user, against `max_connections_per_user`.
    pub per_user: crate::limits::Tally<String>,
    /// Direct messages not yet acknowledged, per user (single node), and how many at
    /// the last sweep.
    pub unacked: Unacked,
    pub unacked_messages: crate::metrics::Gauge,
    /// Round robin over shards for admin requests to Redis.
    next_shard: AtomicUsize,
    /// The configuration in force; replaced by a reload (SIGHUP). Shards pick up a new
    /// one at their next sweep (within a second).
    config: Mutex<Arc<Config>>,
    config_epoch: AtomicU64,
}

/// Which shards of this node hold a connection of each user (single-node mode; with
/// a backplane the presence directory in Redis does this).
#[derive(Debug, Default)]
pub struct Directory(Mutex<UserShards>);

/// User → (shard, connections of the user on it).
type UserShards = HashMap<Box<str>, Vec<(usize, u32)>>;

impl Directory {
    fn map(&self) -> std::sync::MutexGuard<'_, UserShards> {
        // A panic elsewhere cannot leave this map half-updated: every update is one
        // insert or remove.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add(&self, user: &str, shard: usize) {
        let mut map = self.map();
        let shards = map.entry(user.into()).or_default();
        match shards.iter_mut().find(|(s, _)| *s == shard) {
            Some((_, n)) => *n += 1,
            None => shards.push((shard, 1)),
        }
    }

    pub fn remove(&self, user: &str, shard: usize) {
        let mut map = self.map();
        let Some(shards) = map.get_mut(user) else {
            return;
        };
        if let Some(i) = shards.iter().position(|(s, _)| *s == shard) {
            shards[i].1 -= 1;
            if shards[i].1 == 0 {
                shards.swap_remove(i);
            }
        }
        if shards.is_empty() {
            map.remove(user);
        }
    }

    /// Shards holding `user`, with its connections on each.
    pub fn shards_of(&self, user: &str) -> Vec<(usize, u32)> {
        self.map().get(user).cloned().unwrap_or_default()
    }
}

impl Node {
    /// A new message id, `<unix ms>-<sequence>`, unique within the node; both parts
    /// never decrease, so ids taken one after another increase.
    pub fn next_id(&self) -> MessageId {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ms = self.last_ms.fetch_max(now, Ordering::AcqRel).max(now);
        let seq = self.seq.fetch_add(1, Ordering::AcqRel);
        MessageId { ms, seq }
    }

    /// `next_id` as text.
    pub fn next_message_id(&self) -> String {
        self.next_id().to_string()
    }

    /// The node's message order, held by `broker` from taking an id to the last
    /// inbox send; holds the last id given that way. Nothing inside can panic
    /// half-way, so a poisoned lock is usable.
    pub fn order(&self) -> std::sync::MutexGuard<'_, Option<MessageId>> {
        self.order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The last id `broker` gave a topic message or direct send.
    pub fn last_ordered_id(&self) -> Option<MessageId> {
        *self.order()
    }

    /// Every shard listens and the node is not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Holds room for one more connection, unless `max` (0: no limit) are open.
    /// Every `true` is matched by one `release_connection`.
    pub fn reserve_connection(&self, max: usize) -> bool {
        let before = self.open_connections.fetch_add(1, Ordering::Relaxed);
        if max > 0 && before >= max {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// A connection closed (or an upgrade that held room did not become one).
    pub fn release_connection(&self) {
        self.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// The token verifier in force (a reload may replace it).
    pub fn auth(&self) -> Arc<Authenticator> {
        self.auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts a new token verifier in force (a reload that read the keys again):
    /// upgrades and refreshes from now on use it; open connections keep running.
    pub fn replace_auth(&self, auth: Arc<Authenticator>) {
        *self
            .auth
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = auth;
    }

    /// The TLS configuration for new upgrades; `None` for a plain listener.
    pub fn tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts certificates read again in force (a reload): new upgrades use them; open
    /// connections keep their sessions.
    pub fn replace_tls(&self, tls: Arc<rustls::ServerConfig>) {
        *self
            .tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tls);
    }

    /// Increases whenever the configuration is replaced.
    pub fn config_epoch(&self) -> u64 {
        self.config_epoch.load(Ordering::Acquire)
    }

    /// Puts `cfg` in force (a reload); shards follow within a second.
    pub fn replace_config(&self, cfg: Arc<Config>) {
        *self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = cfg;
        self.config_epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Why the backplane cannot serve, if it cannot: some shard has lost Redis.
    pub fn backplane_problem(&self) -> Option<String> {
        if !self.backplane {
            return None;
        }
        let down: Vec<String> = self
            .shards
            .iter()
            .enumerate()
            .filter(|(_, l)| {
                l.metrics.redis_subscriber_up.get() == 0 || l.metrics.redis_commands_up.get() == 0
            })
            .map(|(i, _)| i.to_string())
            .collect();
        (!down.is_empty()).then(|| format!("redis unreachable from shard(s) {}", down.join(",")))
    }

    /// The next shard in turn, for admin requests any shard can answer.
    pub fn any_shard(&self) -> usize {
        self.next_shard.fetch_add(1, Ordering::Relaxed) % self.shards.len()
    }

    /// A shard whose Redis command connection is up (round robin), for the admin
    /// API's calls to Redis (`backplane::remote`).
    pub fn shard_with_redis(&self) -> Option<usize> {
        let n = self.shards.len();
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.shards[i].metrics.redis_commands_up.get() == 1)
    }
}

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("driver io_uring requested but io_uring is not available (kernel, io_uring_disabled sysctl or seccomp); use --driver epoll")]
    NoUring,
    #[error("{0}")]
    Auth(#[from] crate::auth::KeyError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("shard {shard} failed to start: {message}")]
    Shard { shard: usize, message: String },
}

/// A started node: its shared state and the shard threads.
pub struct RunningNode {
    pub node: Arc<Node>,
    threads: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Asks every shard to drain, then waits for all of them to finish.
    pub fn shutdown(self) {
        self.node.draining.store(true, Ordering::Release);
        for link in &self.node.shards {
            // Unbounded: the drain never waits behind a full inbox. A shard that has
            // already stopped needs none.
            let _ = link.tx.send(Inbox::Drain);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Binds one listener per shard, starts the shard threads and waits until all listen.
pub fn start(cfg: Arc<Config>) -> Result<RunningNode, StartError> {
    let cpus = crate::sys::allowed_cpus();
    let count = if cfg.shards == 0 {
        cpus.len()
    } else {
        cfg.shards
    };
    let uring = match cfg.driver {
        Driver::Epoll => false,
        Driver::Auto => monoio::utils::detect_uring(),
        Driver::IoUring if monoio::utils::detect_uring() => true,
        Driver::IoUring => return Err(StartError::NoUring),
    };
    if cfg.driver == Driver::Auto && !uring {
        tracing::warn!(
            "io_uring is not available (kernel, io_uring_disabled or seccomp): using epoll"
        );
    }
    // Bind every listener before starting any thread, so a port clash fails cleanly.
    // The first bind resolves port 0; the others share the port it got.
    let listen_err = |source| StartError::Listen {
        addr: cfg.listen,
        source,
    };
    let first = bind_listener(cfg.listen, cfg.backlog).map_err(listen_err)?;
    let listen = first.local_addr().map_err(listen_err)?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_listener(listen, cfg.backlog).map_err(listen_err)?);
    }
    let mut receivers = Vec::with_capacity(count);
    let mut links = Vec::with_capacity(count);
    for i in 0..count {
        let (tx, rx) = flume::unbounded();
        receivers.push(rx);
        links.push(ShardLink {
            tx,
            metrics: Arc::new(ShardMetrics::default()),
            cpu: cpus[i % cpus.len()],
            reserved: AtomicUsize::new(0),
            capacity: cfg.inbox_capacity,
            relayed: AtomicUsize::new(0),
            relay_capacity: cfg.relay_buffer_bytes,
        });
    }
    let node = Arc::new(Node {
        id: cfg.node_id(),
        shards: links,
        driver: if uring { "io_uring" } else { "epoll" },
        listen,
        seq: AtomicU64::new(0),
        last_ms: AtomicU64::new(0),
        order: Mutex::new(None),
        epoch: new_epoch(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        published: Counter::default(),
        open_connections: AtomicUsize::new(0),
        publish_waits: Counter::default(),
        auth: Mutex::new(Arc::new(Authenticator::from_config(&cfg)?)),
        tls: Mutex::new(match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::server_config(cert, key)?),
            _ => None,
        }),
        backplane: cfg.redis.is_some(),
        directory: Directory::default(),
        per_ip: Default::default(),
        per_user: Default::default(),
        unacked: Unacked::default(),
        unacked_messages: crate::metrics::Gauge::default(),
        next_shard: AtomicUsize::new(0),
        config: Mutex::new(cfg.clone()),
        config_epoch: AtomicU64::new(0),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut threads = Vec::with_capacity(count);
    for (i, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
        let (cfg, node, ready) = (cfg.clone(), node.clone(), ready_tx.clone());
        let pin = cfg.pin_shards;
        let entries = cfg.uring_entries;
        let spawned = std::thread::Builder::new()
            .name(format!("ringway-shard-{i}"))
            .spawn(move || {
                let cpu = node.shards[i].cpu;
                if pin {
                    if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                        tracing::warn!(shard = i, cpu, error = ?e, "could not pin shard to its CPU");
                    }
                }
                let shard_node = node.clone();
                let make = move |on_uring: bool| async move {
                    match Shard::new(i, cfg, shard_node) {
                        Ok(shard) => {
                            super::run(Rc::new(shard), listener, !on_uring, inbox, ready).await
                        }
                        Err(e) => {
                            let _ = ready.send(Err(format!("shard {i}: epoll set: {e}")));
                        }
                    }
                };
                run_on_runtime(uring, entries, i, make);
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                return Err(StartError::Shard {
                    shard: i,
                    message: e.to_string(),
                })
            }
        }
    }
    drop(ready_tx);
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(message)) => return Err(StartError::Shard { shard: 0, message }),
            Err(_) => {
                return Err(StartError::Shard {
                    shard: 0,
                    message: "exited during start".into(),
                })
            }
        }
    }
    node.ready.store(true, Ordering::Release);
    Ok(RunningNode { node, threads })
}

/// Builds the shard's runtime on the chosen driver and runs the shard to completion.
fn run_on_runtime<F, Fut>(uring: bool, entries: u32, index: usize, make: F)
where
    F: FnOnce(bool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if uring {
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(entries)
            .enable_timer()
            .build()
        {
            Ok(mut rt) => return rt.block_on(make(true)),
            Err(e) => {
                tracing::warn!(shard = index, error = %e, "io_uring runtime failed to start: using epoll")
            }
        }
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
    {
        Ok(mut rt) => rt.block_on(make(false)),
        Err(e) => tracing::error!(shard = index, error = %e, "epoll runtime failed to start"),
    }
}

/// A listening socket with SO_REUSEPORT, so every shard has its own accept queue.
fn bind_listener(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// A history epoch: this start's time in nanoseconds and the process id, in base 36.
/// Two starts of a node never share one.
fn new_epoch() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut n = nanos ^ (u128::from(std::process::id()) << 96);
    let mut out = Vec::new();
    while n > 0 {
        out.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}
