//! Configuration: defaults < TOML file < `RINGWAY_*` environment < command-line flags.
//! Every option is a field of [`Config`]; its doc comment is the reference (the README's
//! table mirrors it). Invalid values fail at start with the option's name.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// Which I/O driver the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// io_uring when the kernel allows it, else epoll (logged).
    Auto,
    /// io_uring or fail at start.
    #[value(name = "io_uring")]
    IoUring,
    /// epoll always (containers whose seccomp profile blocks io_uring).
    Epoll,
}

/// What happens when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close the connection with 1008 "slow consumer" (the client reconnects and resumes).
    Close,
    /// Keep the connection and drop the message for it (counted in metrics).
    Drop,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Every option, with its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client WebSocket listener (one SO_REUSEPORT socket per shard).
    pub listen: SocketAddr,
    /// Admin HTTP listener: health, metrics, publish API. Keep it private.
    pub admin: SocketAddr,
    /// Bearer token the admin API requires on every endpoint but `/healthz`, `/readyz`
    /// and `/metrics`; required when `admin` is not a loopback address. Prefer
    /// `RINGWAY_ADMIN_TOKEN` to a flag (a flag shows in `ps`).
    pub admin_token: Option<String>,
    /// `Origin` values a browser may upgrade from (exact, e.g.
    /// `https://app.example.com`); others get 403. Empty: any. A request without
    /// `Origin` (not a browser) is let through.
    pub allowed_origins: Vec<String>,
    /// Connections the node holds at most (0: no limit beyond the file limit); beyond
    /// it an upgrade gets 503 with `Retry-After`, before the token is checked.
    pub max_connections: usize,
    /// Shards (threads, one per CPU); 0 = one per CPU in the process's affinity mask.
    pub shards: usize,
    /// I/O driver: auto, io_uring or epoll.
    pub driver: Driver,
    /// Pin shard i to the i-th CPU of the affinity mask. Turn off where the CPUs are
    /// shared with other busy processes (several nodes or a load generator on one
    /// host), so the scheduler can move shards off a busy CPU.
    pub pin_shards: bool,
    /// Node id sent in `welcome`; default `<hostname>-<pid>`.
    pub node_id: Option<String>,
    /// Enable the `/echo` endpoint (conformance testing only).
    pub echo: bool,
    /// Allow clients to publish with `{"op":"publish"}`.
    pub client_publish: bool,
    /// Largest message a client may send, in bytes (close 1009 beyond it).
    pub max_message_bytes: usize,
    /// Largest upgrade request (request line and headers), in bytes (HTTP 431 beyond).
    pub max_header_bytes: usize,
    /// Longest topic name, in bytes.
    pub max_topic_bytes: usize,
    /// Topics one connection may hold at once.
    pub max_subscriptions: usize,
    /// Bytes queued for one connection before the slow-consumer policy applies.
    pub outbound_queue_bytes: usize,
    /// Slow-consumer policy: close or drop.
    pub slow_consumer: SlowConsumer,
    /// Time a new socket has to complete the upgrade, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// A connection silent this long gets a ping, in seconds.
    pub ping_interval_secs: u64,
    /// A connection silent this long (no frame, no pong) is closed, in seconds.
    pub idle_timeout_secs: u64,
    /// A write that makes no progress this long closes the connection, in seconds.
    pub write_timeout_secs: u64,
    /// After sending a close frame, how long to wait for the peer's, in milliseconds.
    pub close_timeout_ms: u64,
    /// On SIGTERM, how long connections get to close before the process exits, in seconds.
    pub drain_timeout_secs: u64,
    /// On SIGTERM, the window over which 1001 closes are spread (at least 500 a second
    /// per shard), so other nodes take the reconnects gradually; in seconds.
    pub drain_spread_secs: u64,
    /// Listen backlog per shard.
    pub backlog: u32,
    /// io_uring submission queue entries per shard.
    pub uring_entries: u32,
    /// Messages one shard's inbox holds; a publish goes to every shard or, if one is
    /// full, to none. Each message may fan out to thousands of subscribers, so this is
    /// a backlog of work: 1024 messages to 5,000 subscribers a shard is about two
    /// seconds of it on our 2-core hosts.
    pub inbox_capacity: usize,
    /// How long an admin API publish or send waits for room in full inboxes before it
    /// is refused with `overloaded`; 0 refuses at once.
    pub publish_wait_ms: u64,
    /// Messages of each topic kept for resume (`subscribe` with `since`) and
    /// `GET /v1/history`; 0 turns history off.
    pub history_size: usize,
    /// Messages older than this are dropped from history, in seconds; 0 turns history
    /// off.
    pub history_ttl_secs: u64,
    /// Unacknowledged direct messages kept per user, given again to the user's next
    /// connection until acknowledged (single node); 0 turns this off.
    pub direct_inbox_size: usize,
    /// Unacknowledged direct messages older than this are dropped, in seconds; 0 turns
    /// storing off.
    pub direct_inbox_ttl_secs: u64,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    pub log: String,
    /// Log format: text or json.
    pub log_format: LogFormat,
    /// Redis backplane, `redis://[user:password@]host:port[/db]`. Unset: a single node
    /// with the in-process broker.
    pub redis: Option<String>,
    /// HS256 secret for client JWTs. Prefer `RINGWAY_JWT_SECRET` to a flag (a flag shows
    /// in `ps`).
    pub jwt_secret: Option<String>,
    /// PEM public key file for client JWTs: RSA (RS256), Ed25519 (EdDSA) or P-256 (ES256).
    pub jwt_key: Option<std::path::PathBuf>,
    /// Required `aud` of client tokens (unset: `aud` is not checked).
    pub jwt_audience: Option<String>,
    /// Required `iss` of client tokens (unset: `iss` is not checked).
    pub jwt_issuer: Option<String>,
    /// With a JWT key configured, let clients without a token connect as anonymous
    /// (they can subscribe but receive no direct messages). A bad token is always refused.
    pub allow_anonymous: bool,
    /// Lifetime of a presence entry in Redis, in seconds; refreshed every third of it,
    /// so a crashed node's users expire within this time.
    pub presence_ttl_secs: u64,
}

/// Defaults, each with its reason.
pub mod defaults {
    /// 64 KiB: protocol v1 messages are small JSON; large payloads belong elsewhere.
    pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
    /// 8 KiB: enough for cookies and a token; bounds what a half-open client can cost.
    pub const MAX_HEADER_BYTES: usize = 8 * 1024;
    /// 256 KiB: a few seconds of a busy topic for a client on a slow link.
    pub const OUTBOUND_QUEUE_BYTES: usize = 256 * 1024;
    /// 25 s ping, 60 s idle: below common 60 s L4 load-balancer idle timeouts.
    pub const PING_INTERVAL_SECS: u64 = 25;
    pub const IDLE_TIMEOUT_SECS: u64 = 60;
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid address"),
            admin: "127.0.0.1:9090".parse().expect("valid address"),
            shards: 0,
            driver: Driver::Auto,
            pin_shards: true,
            node_id: None,
            echo: false,
            client_publish: false,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            max_header_bytes: defaults::MAX_HEADER_BYTES,
            max_topic_bytes: 256,
            max_subscriptions: 256,
            outbound_queue_bytes: defaults::OUTBOUND_QUEUE_BYTES,
            slow_consumer: SlowConsumer::Close,
            handshake_timeout_ms: 5_000,
            ping_interval_secs: defaults::PING_INTERVAL_SECS,
            idle_timeout_secs: defaults::IDLE_TIMEOUT_SECS,
            write_timeout_secs: 10,
            close_timeout_ms: 2_000,
            drain_timeout_secs: 10,
            drain_spread_secs: 5,
            backlog: 4096,
            uring_entries: 4096,
            inbox_capacity: 1024,
            publish_wait_ms: 1000,
            history_size: 100,
            history_ttl_secs: 300,
            direct_inbox_size: 100,
            direct_inbox_ttl_secs: 300,
            log: "info".into(),
            log_format: LogFormat::Text,
            redis: None,
            jwt_secret: None,
            jwt_key: None,
            jwt_audience: None,
            jwt_issuer: None,
            admin_token: None,
            allowed_origins: Vec::new(),
            max_connections: 0,
            allow_anonymous: false,
            presence_ttl_secs: 30,
        }
    }
}

/// What a reload changed and what it could not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    /// Options that took the new value.
    pub changed: Vec<&'static str>,
    /// Options that differ but keep their old value until a restart.
    pub need_restart: Vec<&'static str>,
}

macro_rules! merge {
    ($merged:ident, $new:ident, $list:expr, $($field:ident),* $(,)?) => {
        $( if $merged.$field != $new.$field {
            $list.push(stringify!($field));
            $merged.$field = $new.$field.clone();
        } )*
    };
}

macro_rules! differ {
    ($old:ident, $new:ident, $list:expr, $($field:ident),* $(,)?) => {
        $( if $old.$field != $new.$field { $list.push(stringify!($field)); } )*
    };
}

impl Config {
    /// `self` with the options that can change while running taken from `new` (limits,
    /// timeouts, the log filter); the others are listed as needing a restart.
    pub fn reloaded(&self, new: &Config) -> (Config, Reload) {
        let mut merged = self.clone();
        let mut r = Reload::default();
        merge!(
            merged,
            new,
            r.changed,
            log,
            client_publish,
            max_message_bytes,
            max_header_bytes,
            max_topic_bytes,
            max_subscriptions,
            outbound_queue_bytes,
            slow_consumer,
            handshake_timeout_ms,
            ping_interval_secs,
            idle_timeout_secs,
            write_timeout_secs,
            close_timeout_ms,
            drain_timeout_secs,
            drain_spread_secs,
            publish_wait_ms,
            history_size,
            history_ttl_secs,
            direct_inbox_size,
            direct_inbox_ttl_secs,
            admin_token,
            allowed_origins,
            max_connections,
        );
        differ!(
            self,
            new,
            r.need_restart,
            listen,
            admin,
            shards,
            driver,
            pin_shards,
            node_id,
            echo,
            backlog,
            uring_entries,
            inbox_capacity,
            log_format,
            redis,
            jwt_secret,
            jwt_key,
            jwt_audience,
            jwt_issuer,
            allow_anonymous,
            presence_ttl_secs,
        );
        (merged, r)
    }
}

/// A configuration problem, naming the option.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("option `{option}`: {message}")]
    Invalid {
        option: &'static str,
        message: String,
    },
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown,
            message: e.to_string(),
        })
    }

    /// Checks relations between options; returns the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |option, message: &str| {
            Err(ConfigError::Invalid {
                option,
                message: message.into(),
            })
        };
        if self.max_message_bytes < 128 {
            return bad("max_message_bytes", "must be at least 128");
        }
        if self.max_header_bytes < 256 {
            return bad("max_header_bytes", "must be at least 256");
        }
        if self.max_topic_bytes == 0 {
            return bad("max_topic_bytes", "must be at least 1");
        }
        if self.outbound_queue_bytes < 1024 {
            return bad("outbound_queue_bytes", "must be at least 1024");
        }
        if self.ping_interval_secs == 0 {
            return bad("ping_interval_secs", "must be at least 1");
        }
        if self.idle_timeout_secs <= self.ping_interval_secs {
            return bad(
                "idle_timeout_secs",
                "must be greater than ping_interval_secs",
            );
        }
        if self.handshake_timeout_ms == 0
            || self.write_timeout_secs == 0
            || self.close_timeout_ms == 0
        {
            return bad(
                "handshake_timeout_ms/write_timeout_secs/close_timeout_ms",
                "must be greater than 0",
            );
        }
        if self.drain_spread_secs >= self.drain_timeout_secs {
            return bad("drain_spread_secs", "must be less than drain_timeout_secs");
        }
        if self.inbox_capacity == 0 {
            return bad("inbox_capacity", "must be at least 1");
        }
        if self.publish_wait_ms > 60_000 {
            return bad("publish_wait_ms", "must be at most 60000 (one minute)");
        }
        if self.history_size > 100_000 {
            return bad("history_size", "must be at most 100000 messages per topic");
        }
        if self.history_ttl_secs > 7 * 86_400 {
            return bad("history_ttl_secs", "must be at most 604800 (one week)");
        }
        if self.direct_inbox_size > 10_000 {
            return bad(
                "direct_inbox_size",
                "must be at most 10000 messages per user",
            );
        }
        if self.direct_inbox_ttl_secs > 7 * 86_400 {
            return bad("direct_inbox_ttl_secs", "must be at most 604800 (one week)");
        }
        if !(2..=32768).contains(&self.uring_entries) || !self.uring_entries.is_power_of_two() {
            return bad("uring_entries", "must be a power of two from 2 to 32768");
        }
        if self.listen == self.admin && self.listen.port() != 0 {
            return bad("admin", "must differ from listen");
        }
        if let Some(url) = &self.redis {
            if let Err(e) = crate::backplane::RedisUrl::parse(url) {
                return bad("redis", &e.to_string());
            }
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return bad("admin_token", "must be at least 16 bytes");
        }
        if self.admin_token.is_none() && !self.admin.ip().is_loopback() {
            return bad(
                "admin_token",
                &format!(
                    "required when the admin API listens beyond loopback ({}): anyone who reaches it could publish to every client",
                    self.admin
                ),
            );
        }
        if self.jwt_secret.is_some() && self.jwt_key.is_some() {
            return bad(
                "jwt_secret",
                "set jwt_secret (HS256) or jwt_key (PEM), not both",
            );
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return bad("jwt_secret", "must be at least 16 bytes");
        }
        if !(3..=86_400).contains(&self.presence_ttl_secs) {
            return bad("presence_ttl_secs", "must be from 3 to 86400");
        }
        if let Some(id) = &self.node_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                return bad("node_id", "1–64 characters of [A-Za-z0-9-_.:]");
            }
        }
        Ok(())
    }

    /// The node id to announce.
    pub fn node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_else(|_| "ringway".into());
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_takes_limits_and_keeps_addresses() {
        let old = Config::default();
        let new = Config {
            max_subscriptions: 3,
            log: "debug".into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            ..Config::default()
        };
        let (merged, r) = old.reloaded(&new);
        assert_eq!(merged.max_subscriptions, 3);
        assert_eq!(merged.log, "debug");
        assert_eq!(merged.listen, old.listen);
        assert_eq!(r.changed, vec!["log", "max_subscriptions"]);
        assert_eq!(r.need_restart, vec!["listen"]);
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn file_values_and_unknown_keys() {
        let c: Config =
            toml::from_str("listen = \"127.0.0.1:1\"\nshards = 3\nslow_consumer = \"drop\"")
                .unwrap();
        assert_eq!(c.shards, 3);
        assert_eq!(c.slow_consumer, SlowConsumer::Drop);
        assert_eq!(c.admin, Config::default().admin);
        let e = toml::from_str::<Config>("listn = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listn"), "{e}");
        let e = toml::from_str::<Config>("shards = \"two\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shards"), "{e}");
    }

    #[test]
    fn validation_names_the_option() {
        let c = Config {
            idle_timeout_secs: 5,
            ping_interval_secs: 10,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_secs"));
        let c = Config {
            node_id: Some("a b".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("node_id"));
    }
}
