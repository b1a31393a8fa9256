//! Configuration: defaults < TOML file < `RINGWAY_*` environment < command-line flags.
//! Every option is declared once, in the option table below (name, type, default, doc,
//! whether a reload takes it); the struct, its defaults, the command line, the reload
//! and the README check are made from it (`table`). Invalid values fail at start with
//! the option's name.

pub mod table;

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

pub use table::{OptionInfo, Shape};

/// Which I/O driver the shards use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    /// io_uring when the kernel allows it, else epoll (logged).
    Auto,
    /// io_uring or fail at start.
    IoUring,
    /// epoll always (containers whose seccomp profile blocks io_uring).
    Epoll,
}

/// What happens when a connection's outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Close the connection with 1008 "slow consumer" (the client reconnects and resumes).
    Close,
    /// Keep the connection and drop the message for it (counted in metrics).
    Drop,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

table::choice!(
    crate::ws::proxy::ProxyProtocol => ["off", "v1", "v2"],
    Driver => ["auto", "io_uring", "epoll"],
    SlowConsumer => ["close", "drop"],
    LogFormat => ["text", "json"],
);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a valid default address")
}

table::options! {
    /// Client WebSocket listener (one SO_REUSEPORT socket per shard).
    listen: SocketAddr = addr("0.0.0.0:8080");
    /// Admin HTTP listener: health, metrics, publish API. Keep it private.
    admin: SocketAddr = addr("127.0.0.1:9090");
    /// Bearer token the admin API requires on every endpoint but `/healthz`, `/readyz`
    /// and `/metrics`; required when `admin` is not a loopback address. Prefer
    /// `RINGWAY_ADMIN_TOKEN` to a flag (a flag shows in `ps`).
    admin_token: Option<String> = None, live, secret;
    /// `Origin` values a browser may upgrade from (exact, e.g.
    /// `https://app.example.com`); others get 403. Empty: any. A request without
    /// `Origin` (not a browser) is let through.
    allowed_origins: Vec<String> = Vec::new() => "any", live;
    /// PEM certificate chain (leaf first) for `wss://`. With `tls_key`, the client
    /// listener speaks TLS only; SIGHUP reads both files again (a renewed certificate
    /// serves new connections, open ones carry on). Turning TLS on or off needs a restart.
    tls_cert: Option<std::path::PathBuf> = None;
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1).
    tls_key: Option<std::path::PathBuf> = None;
    /// PROXY protocol on the client listener: `off`, `v1` or `v2` (HAProxy
    /// `send-proxy-v2`). When on, every connection must start with the header, from an
    /// address in `proxy_trusted`; the client address it names is the one the per-IP
    /// limit counts.
    proxy_protocol: crate::ws::proxy::ProxyProtocol = crate::ws::proxy::ProxyProtocol::Off, live;
    /// Networks (CIDR, e.g. `10.0.0.0/8`, `127.0.0.1/32`) of the load balancers allowed
    /// to send the PROXY header; others are refused with 403.
    proxy_trusted: Vec<ipnet::IpNet> = Vec::new(), live;
    /// Connections the node holds at most (0: no limit beyond the file limit); beyond
    /// it an upgrade gets 503 with `Retry-After`, before the token is checked.
    max_connections: usize = 0, live;
    /// Connections one client address may hold on the node at once (0: no cap); beyond
    /// it an upgrade gets 429. Counts connections made while a cap is set.
    max_connections_per_ip: usize = 0, live;
    /// Connections one user (a token's `sub`) may hold on the node at once (0: no
    /// cap); beyond it an upgrade gets 429.
    max_connections_per_user: usize = 0, live;
    /// Messages a connection may send per second, on average (0: no limit); beyond it
    /// a message is refused with `rate_limited`.
    client_messages_per_sec: u32 = 0, live;
    /// Messages a connection may send at once before `client_messages_per_sec` applies.
    client_burst: u32 = 50, live;
    /// Refused messages in a row (the budget not full again in between) after which
    /// the connection is closed with 1008; 0 never closes.
    rate_limit_strikes: u32 = 10, live;
    /// Shards (threads, one per CPU); 0 = one per CPU in the process's affinity mask.
    shards: usize = 0;
    /// I/O driver: auto, io_uring or epoll.
    driver: Driver = Driver::Auto;
    /// Pin shard i to the i-th CPU of the affinity mask. Turn off where the CPUs are
    /// shared with other busy processes (several nodes or a load generator on one
    /// host), so the scheduler can move shards off a busy CPU.
    pin_shards: bool = true;
    /// Node id sent in `welcome`; default `<hostname>-<pid>`.
    node_id: Option<String> = None => "`<hostname>-<pid>`";
    /// Enable the `/echo` endpoint (conformance testing only).
    echo: bool = false;
    /// Allow clients to publish with `{"op":"publish"}`.
    client_publish: bool = false, live;
    /// Largest message a client may send, in bytes (close 1009 beyond it).
    max_message_bytes: usize = defaults::MAX_MESSAGE_BYTES, live;
    /// Largest upgrade request (request line and headers), in bytes (HTTP 431 beyond).
    max_header_bytes: usize = defaults::MAX_HEADER_BYTES, live;
    /// Longest topic name, in bytes.
    max_topic_bytes: usize = 256, live;
    /// Topics one connection may hold at once.
    max_subscriptions: usize = 256, live;
    /// Bytes queued for one connection before the slow-consumer policy applies.
    outbound_queue_bytes: usize = defaults::OUTBOUND_QUEUE_BYTES, live;
    /// Slow-consumer policy: close or drop.
    slow_consumer: SlowConsumer = SlowConsumer::Close, live;
    /// Time a new socket has to complete the upgrade, in milliseconds.
    handshake_timeout_ms: u64 = 5_000, live;
    /// Upgrades one shard holds unfinished at once (0: no cap); beyond it the oldest
    /// is dropped, so sockets that send slowly or nothing (slowloris) cannot take the
    /// descriptors and memory that real clients need.
    max_pending_handshakes: usize = 1024, live;
    /// A connection silent this long gets a ping, in seconds.
    ping_interval_secs: u64 = defaults::PING_INTERVAL_SECS, live;
    /// A connection silent this long (no frame, no pong) is closed, in seconds.
    idle_timeout_secs: u64 = defaults::IDLE_TIMEOUT_SECS, live;
    /// A write that makes no progress this long closes the connection, in seconds.
    write_timeout_secs: u64 = 10, live;
    /// After sending a close frame, how long to wait for the peer's, in milliseconds.
    close_timeout_ms: u64 = 2_000, live;
    /// On SIGTERM, how long connections get to close before the process exits, in seconds.
    drain_timeout_secs: u64 = 10, live;
    /// On SIGTERM, the window over which 1001 closes are spread (at least 500 a second
    /// per shard), so other nodes take the reconnects gradually; in seconds.
    drain_spread_secs: u64 = 5, live;
    /// Listen backlog per shard.
    backlog: u32 = 4096;
    /// io_uring submission queue entries per shard.
    uring_entries: u32 = 4096;
    /// Messages one shard's inbox holds; a publish goes to every shard or, if one is
    /// full, to none. Each message may fan out to thousands of subscribers, so this is
    /// a backlog of work: 1024 messages to 5,000 subscribers a shard is about two
    /// seconds of it on our 2-core hosts.
    inbox_capacity: usize = 1024;
    /// With Redis: bytes of topic messages a topic's owner shard may have handed to
    /// one sibling shard that the sibling has not yet taken (like Redis's own output
    /// limit for a subscriber). Beyond it the sibling is told it missed messages and
    /// reads them from the topic's stream; messages outside history are lost.
    relay_buffer_bytes: usize = 33554432;
    /// How long an admin API publish or send waits for room in full inboxes before it
    /// is refused with `overloaded`; 0 refuses at once.
    publish_wait_ms: u64 = 1000, live;
    /// Messages of each topic kept for resume (`subscribe` with `since`) and
    /// `GET /v1/history`; 0 turns history off.
    history_size: usize = 100, live;
    /// Messages older than this are dropped from history, in seconds; 0 turns history
    /// off.
    history_ttl_secs: u64 = 300, live;
    /// Unacknowledged direct messages kept per user, given again to the user's next
    /// connection until acknowledged (single node); 0 turns this off.
    direct_inbox_size: usize = 100, live;
    /// Unacknowledged direct messages older than this are dropped, in seconds; 0 turns
    /// storing off.
    direct_inbox_ttl_secs: u64 = 300, live;
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` wins when set.
    log: String = "info".into(), live;
    /// Log format: text or json.
    log_format: LogFormat = LogFormat::Text;
    /// Redis backplane, `redis://[user:password@]host:port[/db]` (`rediss://` for TLS).
    /// Unset: a single node with the in-process broker.
    redis: Option<String> = None;
    /// HS256 secret for client JWTs. Prefer `RINGWAY_JWT_SECRET` to a flag (a flag shows
    /// in `ps`).
    jwt_secret: Option<String> = None, live, secret;
    /// PEM public key file for client JWTs: RSA (RS256), Ed25519 (EdDSA) or P-256 (ES256).
    jwt_key: Option<std::path::PathBuf> = None, live;
    /// URL of a JSON Web Key Set (`https://id.example.com/.well-known/jwks.json`) whose
    /// keys verify client tokens by `kid` (RS*, PS*, ES256, ES384, EdDSA); fetched at
    /// start, every 5 minutes, on an unknown `kid` (at most every 10 s) and on SIGHUP.
    jwt_jwks_url: Option<String> = None, live;
    /// Required `aud` of client tokens (unset: `aud` is not checked).
    jwt_audience: Option<String> = None, live;
    /// Required `iss` of client tokens (unset: `iss` is not checked).
    jwt_issuer: Option<String> = None, live;
    /// Seconds a token is still accepted after its `exp` (and before its `nbf`), for
    /// clocks that differ; a connection is closed (4001) this long after its `exp`.
    jwt_leeway_secs: u64 = 60, live;
    /// With a JWT key configured, let clients without a token connect as anonymous
    /// (they can subscribe but receive no direct messages). A bad token is always refused.
    allow_anonymous: bool = false, live;
    /// No longer used: presence entries live as long as their node's heartbeat.
    /// Accepted so that existing configuration files still load (a warning says so).
    presence_ttl_secs: u64 = 30;
    /// Topic namespaces (`[[namespace]]` sections): who may subscribe and publish
    /// without a grant in the token, by topic prefix (`crate::permissions`).
    namespace: Vec<crate::permissions::Namespace> = Vec::new(), live, file;
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

/// What a reload changed and what it could not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    /// Options that took the new value.
    pub changed: Vec<&'static str>,
    /// Options that differ but keep their old value until a restart.
    pub need_restart: Vec<&'static str>,
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
        if self.jwt_jwks_url.is_some() && (self.jwt_secret.is_some() || self.jwt_key.is_some()) {
            return bad(
                "jwt_jwks_url",
                "set one of jwt_secret, jwt_key and jwt_jwks_url",
            );
        }
        if let Some(url) = &self.jwt_jwks_url {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return bad("jwt_jwks_url", "must be an http:// or https:// URL");
            }
        }
        if self.jwt_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return bad("jwt_secret", "must be at least 16 bytes");
        }
        if !(3..=86_400).contains(&self.presence_ttl_secs) {
            return bad("presence_ttl_secs", "must be from 3 to 86400");
        }
        if self.proxy_protocol != crate::ws::proxy::ProxyProtocol::Off
            && self.proxy_trusted.is_empty()
        {
            return bad(
                "proxy_trusted",
                "list the load balancers' networks (CIDR) when proxy_protocol is on",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad(
                if self.tls_cert.is_some() {
                    "tls_key"
                } else {
                    "tls_cert"
                },
                "set tls_cert and tls_key together",
            );
        }
        if self.jwt_leeway_secs > 3600 {
            return bad("jwt_leeway_secs", "must be at most 3600 (an hour)");
        }
        if self.client_messages_per_sec > 0 && self.client_burst == 0 {
            return bad(
                "client_burst",
                "must be at least 1 when client_messages_per_sec is set",
            );
        }
        if let Err(e) = crate::permissions::validate(&self.namespace) {
            return bad("namespace", &e);
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

    /// The README's option table row of each option, as the table says it should
    /// start: name, default, whether a reload takes it.
    fn readme_row(o: &OptionInfo) -> String {
        let (default, literal) = Config::shown_default(o.name).unwrap();
        let default = if literal {
            format!("`{default}`")
        } else {
            default
        };
        let reload = if o.reload { "yes" } else { "restart" };
        format!("| `{}` | {default} | {reload} |", o.name)
    }

    /// Every option is in the README's table, in the table's order, with the default
    /// `--help` shows and whether a reload takes it; and the README has no other.
    #[test]
    fn the_readme_documents_every_option() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));
        let section = readme
            .split("\n## Configuration\n")
            .nth(1)
            .expect("README.md has a Configuration section");
        let rows: Vec<&str> = section
            .lines()
            .skip_while(|l| !l.starts_with("| option |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .collect();
        let expected: Vec<String> = OPTIONS.iter().map(readme_row).collect();
        let found: Vec<String> = rows
            .iter()
            .map(|r| {
                let cells: Vec<&str> = r.splitn(5, " | ").collect();
                format!(
                    "{} | {} | {} |",
                    cells[0],
                    cells[1],
                    cells.get(2).unwrap_or(&"")
                )
            })
            .collect();
        let meanings_filled = rows
            .iter()
            .all(|r| r.splitn(4, " | ").nth(3).is_some_and(|m| m.len() > 3));
        assert!(
            found == expected && meanings_filled,
            "README.md's option table should start its rows so (then the meaning):\n{}",
            expected.join("\n")
        );
    }

    /// The example file shipped for systemd is valid as it is, and with every
    /// commented-out option in it switched on.
    #[test]
    fn the_systemd_example_file_is_valid_with_every_example_on() {
        let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/ringway.toml"));
        let shipped: Config = toml::from_str(text).unwrap();
        shipped.validate().unwrap();
        fn example(l: &str) -> Option<&str> {
            let rest = l.strip_prefix("# ")?;
            let key = rest.split([' ', '=']).next()?;
            let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            (rest.starts_with("[[") || (is_key && rest.contains(" = "))).then_some(rest)
        }
        let all_on: String = text
            .lines()
            .map(|l| example(l).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let on: Config = toml::from_str(&all_on).unwrap_or_else(|e| panic!("{e}\n{all_on}"));
        on.validate().unwrap();
        assert_eq!(on.namespace.len(), 2, "{all_on}");
        assert!(on.max_connections_per_ip > 0 && on.redis.is_some());
    }

    #[test]
    fn options_have_distinct_flags_and_a_doc() {
        let mut flags: Vec<String> = OPTIONS.iter().map(OptionInfo::flag).collect();
        flags.sort();
        flags.dedup();
        assert_eq!(flags.len(), OPTIONS.len());
        assert!(
            OPTIONS.iter().all(|o| o.help().len() > 10),
            "an option lacks a doc"
        );
    }

    #[test]
    fn command_line_values_are_read_like_the_file() {
        let mut c = Config::default();
        c.set("driver", &["io_uring".into()]).unwrap();
        assert_eq!(c.driver, Driver::IoUring);
        c.set("slow_consumer", &["drop".into()]).unwrap();
        assert_eq!(c.slow_consumer, SlowConsumer::Drop);
        c.set("allowed_origins", &["https://a".into(), "https://b".into()])
            .unwrap();
        assert_eq!(c.allowed_origins, ["https://a", "https://b"]);
        c.set("jwt_issuer", &["me".into()]).unwrap();
        assert_eq!(c.jwt_issuer.as_deref(), Some("me"));
        c.set("pin_shards", &["false".into()]).unwrap();
        assert!(!c.pin_shards);
        let e = c.set("shards", &["two".into()]).unwrap_err().to_string();
        assert!(e.contains("shards") && e.contains("two"), "{e}");
        let e = c.set("driver", &["uring".into()]).unwrap_err().to_string();
        assert!(e.contains("io_uring"), "{e}");
        // Every choice --help offers is one the file takes, and shows as itself.
        for o in OPTIONS {
            for choice in o.choices {
                let mut c = Config::default();
                c.set(o.name, &[choice.to_string()]).unwrap();
                let file: Config = toml::from_str(&format!("{} = \"{choice}\"", o.name)).unwrap();
                let (a, b) = (format!("{c:?}"), format!("{file:?}"));
                assert_eq!(a, b, "{} = {choice}", o.name);
            }
        }
    }

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
        assert_eq!(r.changed, vec!["max_subscriptions", "log"]);
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
