//! Per-shard counters and gauges. Each shard is the only writer of its own
//! `ShardMetrics` (relaxed atomics, no contention); the admin thread reads all of them
//! when `/metrics` is scraped and renders the Prometheus text format (`admin::metrics`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::ws::handshake::Refusal;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Close reasons counted by `ringway_closes_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed (close frame or EOF).
    Client,
    /// The client broke the protocol (1002, 1003, 1007, 1008, 1009).
    ProtocolError,
    /// Outbound queue full under the `close` policy.
    SlowConsumer,
    /// No frame within the idle timeout.
    IdleTimeout,
    /// A write made no progress within the write timeout.
    WriteTimeout,
    /// The server is shutting down.
    Shutdown,
    /// The socket failed (reset, broken pipe).
    IoError,
    /// Over its message rate `rate_limit_strikes` times in a row.
    RateLimited,
    /// Its token expired without a refresh.
    TokenExpired,
}

impl CloseReason {
    pub const ALL: [Self; 9] = [
        Self::Client,
        Self::ProtocolError,
        Self::SlowConsumer,
        Self::IdleTimeout,
        Self::WriteTimeout,
        Self::Shutdown,
        Self::IoError,
        Self::RateLimited,
        Self::TokenExpired,
    ];
    pub fn label(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::ProtocolError => "protocol_error",
            Self::SlowConsumer => "slow_consumer",
            Self::IdleTimeout => "idle_timeout",
            Self::WriteTimeout => "write_timeout",
            Self::Shutdown => "shutdown",
            Self::IoError => "io_error",
            Self::RateLimited => "rate_limited",
            Self::TokenExpired => "token_expired",
        }
    }
    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed in ALL")
    }
}

/// Everything one shard counts.
#[derive(Debug, Default)]
pub struct ShardMetrics {
    pub connections: Gauge,
    pub accepted: Counter,
    pub accept_errors: Counter,
    pub handshake_timeouts: Counter,
    /// Unfinished upgrades dropped to make room under `max_pending_handshakes`.
    pub handshakes_evicted: Counter,
    handshake_refusals: [Counter; Refusal::ALL.len()],
    closes: [Counter; CloseReason::ALL.len()],
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub frames_out: Counter,
    pub bytes_out: Counter,
    pub published: Counter,
    pub deliveries: Counter,
    pub dropped: Counter,
    pub inbox_full: Counter,
    pub topics: Gauge,
    pub subscriptions: Gauge,
    /// Topic messages held in history (`shard::history`), and resumes answered.
    pub history_messages: Gauge,
    pub resumes_recovered: Counter,
    pub resumes_not_recovered: Counter,
    /// Unacknowledged direct messages given again to a user's new connection.
    pub direct_given_again: Counter,
    /// Frames given to a topic's subscribers by a catch-up from its Redis stream.
    pub caught_up: Counter,
    pub error_frames: Counter,
    /// Sweeper ticks (one a second): the watchdog's sign that the shard is alive.
    pub sweeps: Counter,
    /// Delivery ticks: passes of the flush task over the connections owed a write.
    pub ticks: Counter,
    /// Connection writes the ticks started (one `sendmsg` each, more for over 64 frames).
    pub tick_writes: Counter,
    /// Connections whose socket refused bytes still owed (counted by the sweeper).
    pub blocked: Gauge,
    /// Inbox messages held back because a quarter of the shard's connections had
    /// queues over half full (`Shard::congested`).
    pub congestion_waits: Counter,
    /// Client messages refused for going over `client_messages_per_sec`.
    pub rate_limited: Counter,
    /// Direct messages that reached this shard (its Redis channel or its inbox).
    pub direct_received: Counter,
    /// Direct messages queued to this shard's connections.
    pub direct_deliveries: Counter,
    /// Topic messages received from Redis.
    pub backplane_received: Counter,
    /// Topic messages from Redis handed to sibling shards (this shard owns the topic's
    /// subscription on the node).
    pub relayed: Counter,
    /// Topic messages not handed to a sibling shard because its relays were over
    /// `relay_buffer_bytes`: it catches up from the topic's stream instead.
    pub relays_lost: Counter,
    /// Messages on ringway channels that did not follow the schema (dropped).
    pub backplane_bad: Counter,
    /// 1 while the shard's Redis subscriber / command connection is up.
    pub redis_subscriber_up: Gauge,
    pub redis_commands_up: Gauge,
    /// Redis connections lost (either kind).
    pub redis_reconnects: Counter,
    /// Commands written to Redis.
    pub redis_commands: Counter,
    /// Presence entries (connections with a user id) at the last heartbeat.
    pub presence_entries: Gauge,
}

impl ShardMetrics {
    pub fn refused(&self, r: Refusal) -> &Counter {
        let i = Refusal::ALL
            .iter()
            .position(|x| x.label() == r.label())
            .expect("listed in ALL");
        &self.handshake_refusals[i]
    }
    pub fn closed(&self, r: CloseReason) -> &Counter {
        &self.closes[r.index()]
    }
}
