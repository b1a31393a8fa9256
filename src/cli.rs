//! The command line: `serve`, `publish`, `send`, `doctor`. Flags override `RINGWAY_*` environment
//! variables, which override the config file. Exit codes: 0 success, 1 runtime failure,
//! 64 bad usage or configuration, 65 bad data (not JSON, or refused by the API with 400),
//! 69 admin API unreachable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, Driver, LogFormat, SlowConsumer};

#[derive(Parser, Debug)]
#[command(
    name = "ringway",
    version,
    about = "Edge WebSocket gateway: io_uring, thread-per-core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Publish a JSON message to a topic through a running gateway's admin API.
    Publish(PublishArgs),
    /// Send a JSON message to users (every connection of each, on any node) through a
    /// running gateway's admin API.
    Send(SendArgs),
    /// Print a topic's recent messages (single node), one JSON object per line, oldest
    /// first, through a running gateway's admin API.
    History(HistoryArgs),
    /// Check this host (io_uring, limits, sysctls, CPUs) against what ringway needs;
    /// takes the same options as `serve`. Exit 0 all pass, 1 a warning, 2 a failure.
    Doctor(Box<ServeArgs>),
}

/// Every option of `serve`; each also reads `RINGWAY_<NAME>` and the config file.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "RINGWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Client WebSocket listener [default: 0.0.0.0:8080].
    #[arg(long, env = "RINGWAY_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP listener [default: 127.0.0.1:9090].
    #[arg(long, env = "RINGWAY_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// Shards; 0 = one per CPU [default: 0].
    #[arg(long, env = "RINGWAY_SHARDS")]
    pub shards: Option<usize>,
    /// I/O driver [default: auto].
    #[arg(long, env = "RINGWAY_DRIVER", value_enum)]
    pub driver: Option<Driver>,
    /// Pin each shard to its CPU [default: true].
    #[arg(long, env = "RINGWAY_PIN_SHARDS")]
    pub pin_shards: Option<bool>,
    /// Node id in `welcome` [default: <hostname>-<pid>].
    #[arg(long, env = "RINGWAY_NODE_ID")]
    pub node_id: Option<String>,
    /// Enable the /echo endpoint (conformance testing).
    #[arg(long, env = "RINGWAY_ECHO")]
    pub echo: Option<bool>,
    /// Allow clients to publish [default: false].
    #[arg(long, env = "RINGWAY_CLIENT_PUBLISH")]
    pub client_publish: Option<bool>,
    /// Largest client message in bytes; close 1009 beyond [default: 65536].
    #[arg(long, env = "RINGWAY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest upgrade request in bytes; HTTP 431 beyond [default: 8192].
    #[arg(long, env = "RINGWAY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Longest topic name in bytes [default: 256].
    #[arg(long, env = "RINGWAY_MAX_TOPIC_BYTES")]
    pub max_topic_bytes: Option<usize>,
    /// Topics one connection may hold [default: 256].
    #[arg(long, env = "RINGWAY_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Bytes queued for one connection before the slow-consumer policy applies [default: 262144].
    #[arg(long, env = "RINGWAY_OUTBOUND_QUEUE_BYTES")]
    pub outbound_queue_bytes: Option<usize>,
    /// What to do with a client whose queue is full [default: close].
    #[arg(long, env = "RINGWAY_SLOW_CONSUMER", value_enum)]
    pub slow_consumer: Option<SlowConsumer>,
    /// Time a new socket has to finish the upgrade [default: 5000].
    #[arg(long, env = "RINGWAY_HANDSHAKE_TIMEOUT_MS")]
    pub handshake_timeout_ms: Option<u64>,
    /// Ping a connection silent this long [default: 25].
    #[arg(long, env = "RINGWAY_PING_INTERVAL_SECS")]
    pub ping_interval_secs: Option<u64>,
    /// Close (1001) a connection silent this long [default: 60].
    #[arg(long, env = "RINGWAY_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,
    /// Close a connection whose write makes no progress this long [default: 10].
    #[arg(long, env = "RINGWAY_WRITE_TIMEOUT_SECS")]
    pub write_timeout_secs: Option<u64>,
    /// After our close frame, wait this long for the peer's [default: 2000].
    #[arg(long, env = "RINGWAY_CLOSE_TIMEOUT_MS")]
    pub close_timeout_ms: Option<u64>,
    /// On SIGTERM, time connections get to close [default: 10].
    #[arg(long, env = "RINGWAY_DRAIN_TIMEOUT_SECS")]
    pub drain_timeout_secs: Option<u64>,
    /// On SIGTERM, spread the 1001 closes over this window (at least 500/s per shard) [default: 5].
    #[arg(long, env = "RINGWAY_DRAIN_SPREAD_SECS")]
    pub drain_spread_secs: Option<u64>,
    /// Listen backlog per shard [default: 4096].
    #[arg(long, env = "RINGWAY_BACKLOG")]
    pub backlog: Option<u32>,
    /// io_uring submission queue entries per shard [default: 4096].
    #[arg(long, env = "RINGWAY_URING_ENTRIES")]
    pub uring_entries: Option<u32>,
    /// Messages a shard's inbox holds; a publish goes to every shard or none [default: 1024].
    #[arg(long, env = "RINGWAY_INBOX_CAPACITY")]
    pub inbox_capacity: Option<usize>,
    /// How long an admin API publish waits for inbox room before `overloaded`; 0 refuses at once [default: 1000].
    #[arg(long, env = "RINGWAY_PUBLISH_WAIT_MS")]
    pub publish_wait_ms: Option<u64>,
    /// Messages of each topic kept for resume and /v1/history; 0 turns history off [default: 100].
    #[arg(long, env = "RINGWAY_HISTORY_SIZE")]
    pub history_size: Option<usize>,
    /// Messages older than this leave history, in seconds; 0 turns history off [default: 300].
    #[arg(long, env = "RINGWAY_HISTORY_TTL_SECS")]
    pub history_ttl_secs: Option<u64>,
    /// Unacknowledged direct messages kept per user for its next connection; 0 = off [default: 100].
    #[arg(long, env = "RINGWAY_DIRECT_INBOX_SIZE")]
    pub direct_inbox_size: Option<usize>,
    /// Unacknowledged direct messages older than this are dropped, in seconds; 0 = off [default: 300].
    #[arg(long, env = "RINGWAY_DIRECT_INBOX_TTL_SECS")]
    pub direct_inbox_ttl_secs: Option<u64>,
    /// Log filter, e.g. `info` or `ringway=debug` (RUST_LOG wins) [default: info].
    #[arg(long, env = "RINGWAY_LOG")]
    pub log: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "RINGWAY_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Redis backplane URL, redis://[user:password@]host:port[/db] [default: none, single node].
    #[arg(long, env = "RINGWAY_REDIS")]
    pub redis: Option<String>,
    /// HS256 secret for client JWTs (prefer the environment variable).
    #[arg(
        long,
        env = "RINGWAY_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_key"
    )]
    pub jwt_secret: Option<String>,
    /// Bearer token required by the admin API (all but /healthz, /readyz, /metrics);
    /// required when --admin is not a loopback address (prefer the environment variable).
    #[arg(long, env = "RINGWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Connections the node holds at most; beyond it upgrades get 503 [default: 0, no limit].
    #[arg(long, env = "RINGWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Origins browsers may upgrade from, comma-separated (others get 403) [default: any].
    #[arg(long, env = "RINGWAY_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,
    /// PEM public key for client JWTs (RS256, EdDSA or ES256).
    #[arg(long, env = "RINGWAY_JWT_KEY")]
    pub jwt_key: Option<PathBuf>,
    /// Required `aud` of client tokens [default: not checked].
    #[arg(long, env = "RINGWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` of client tokens [default: not checked].
    #[arg(long, env = "RINGWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// With a JWT key, let clients without a token in as anonymous [default: false].
    #[arg(long, env = "RINGWAY_ALLOW_ANONYMOUS", num_args = 0..=1, default_missing_value = "true")]
    pub allow_anonymous: Option<bool>,
    /// Presence entry lifetime in Redis, in seconds [default: 30].
    #[arg(long, env = "RINGWAY_PRESENCE_TTL_SECS")]
    pub presence_ttl_secs: Option<u64>,
}

macro_rules! overlay {
    ($cfg:ident, $args:ident, $($field:ident),* $(,)?) => {
        $( if let Some(v) = $args.$field { $cfg.$field = v; } )*
    };
}

impl ServeArgs {
    /// Builds the effective configuration: defaults < file < env < flags.
    pub fn config(self) -> Result<Config, crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let args = self;
        if args.node_id.is_some() {
            cfg.node_id = args.node_id;
        }
        if args.redis.is_some() {
            cfg.redis = args.redis;
        }
        if args.jwt_secret.is_some() {
            cfg.jwt_secret = args.jwt_secret;
            cfg.jwt_key = None;
        }
        if args.jwt_key.is_some() {
            cfg.jwt_key = args.jwt_key;
            cfg.jwt_secret = None;
        }
        if args.admin_token.is_some() {
            cfg.admin_token = args.admin_token;
        }
        if args.jwt_audience.is_some() {
            cfg.jwt_audience = args.jwt_audience;
        }
        if args.jwt_issuer.is_some() {
            cfg.jwt_issuer = args.jwt_issuer;
        }
        overlay!(
            cfg,
            args,
            listen,
            admin,
            shards,
            driver,
            pin_shards,
            echo,
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
            backlog,
            uring_entries,
            inbox_capacity,
            publish_wait_ms,
            history_size,
            history_ttl_secs,
            direct_inbox_size,
            direct_inbox_ttl_secs,
            log,
            log_format,
            allow_anonymous,
            presence_ttl_secs,
            allowed_origins,
            max_connections,
        );
        cfg.validate()?;
        Ok(cfg)
    }
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// Admin API of the gateway.
    #[arg(long, env = "RINGWAY_ADMIN", default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// Topic to publish to.
    #[arg(long)]
    pub topic: String,
    /// The message: any JSON value.
    pub data: String,
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Admin API of the gateway.
    #[arg(long, env = "RINGWAY_ADMIN", default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// User id (the token's `sub`); repeat for several users.
    #[arg(long = "user", required = true)]
    pub users: Vec<String>,
    /// The message: any JSON value.
    pub data: String,
}

#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// Admin API of the gateway.
    #[arg(long, env = "RINGWAY_ADMIN", default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Only messages after this message id (with --epoch).
    #[arg(long, requires = "epoch")]
    pub since: Option<String>,
    /// The epoch `--since` belongs to (from the message that carried it).
    #[arg(long, requires = "since")]
    pub epoch: Option<String>,
    /// At most this many messages (1 to 1000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub limit: u16,
}

/// Exit code for a failed admin API call.
fn client_exit(command: &str, e: &crate::admin::client::ClientError) -> ExitCode {
    use crate::admin::client::ClientError;
    eprintln!("ringway {command}: {e}");
    ExitCode::from(match e {
        ClientError::BadJson(_) => 65,
        ClientError::Status { status: 400, .. } => 65,
        ClientError::Connect { .. } => 69,
        _ => 1,
    })
}

/// Runs the parsed command line.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(64),
            };
        }
    };
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Doctor(args) => doctor(*args),
        Command::Publish(args) => {
            match crate::admin::client::publish(args.admin, &args.topic, &args.data) {
                Ok(id) => {
                    println!("{id}");
                    ExitCode::SUCCESS
                }
                Err(e) => client_exit("publish", &e),
            }
        }
        Command::Send(args) => {
            match crate::admin::client::send(args.admin, &args.users, &args.data) {
                Ok(sent) => {
                    println!("{} online={} shards={}", sent.id, sent.online, sent.shards);
                    ExitCode::SUCCESS
                }
                Err(e) => client_exit("send", &e),
            }
        }
        Command::History(args) => {
            let since = args.since.as_deref().zip(args.epoch.as_deref());
            let limit = usize::from(args.limit);
            match crate::admin::client::history(args.admin, &args.topic, since, limit) {
                Ok(page) => {
                    for m in page["messages"].as_array().into_iter().flatten() {
                        println!("{m}");
                    }
                    if page["more"].as_bool() == Some(true) {
                        eprintln!("ringway history: more messages follow; ask again with --since");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => client_exit("history", &e),
            }
        }
    }
}

fn doctor(args: ServeArgs) -> ExitCode {
    let cfg = match args.config() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL  {:<30} {e}", "configuration");
            return ExitCode::from(2);
        }
    };
    println!("PASS  {:<30} valid", "configuration");
    match crate::doctor::print(&crate::doctor::run(&cfg)) {
        crate::doctor::Level::Pass => ExitCode::SUCCESS,
        crate::doctor::Level::Warn => ExitCode::from(1),
        crate::doctor::Level::Fail => ExitCode::from(2),
    }
}

/// Replaces the log filter (a reload); an error names what is wrong with it.
type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String>>;

fn init_logging(cfg: &Config) -> SetLogFilter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cfg.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    fn setter<L, S>(handle: tracing_subscriber::reload::Handle<L, S>) -> SetLogFilter
    where
        L: From<tracing_subscriber::EnvFilter> + 'static,
        S: 'static,
    {
        Box::new(move |spec: &str| {
            let filter = tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        })
    }
    match cfg.log_format {
        LogFormat::Json => {
            let b = builder.json().with_filter_reloading();
            let handle = b.reload_handle();
            b.init();
            setter(handle)
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            b.init();
            setter(handle)
        }
    }
}

/// SIGHUP: reads the configuration again (file, environment and the original flags),
/// puts in force what can change while running and says what it did.
fn reload(args: &ServeArgs, node: &crate::shard::Node, set_log: &SetLogFilter) {
    let new = match args.clone().config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: configuration not reloaded, the running one stays");
            return;
        }
    };
    let old = node.config();
    let (merged, r) = old.reloaded(&new);
    if merged.log != old.log {
        if std::env::var_os("RUST_LOG").is_some() {
            tracing::warn!("SIGHUP: RUST_LOG is set and wins over `log`; log filter unchanged");
        } else if let Err(e) = set_log(&merged.log) {
            tracing::error!(error = %e, "SIGHUP: log filter not changed");
        }
    }
    node.replace_config(Arc::new(merged));
    if !r.need_restart.is_empty() {
        tracing::warn!(
            options = r.need_restart.join(","),
            "SIGHUP: these options changed but need a restart; their old values stay"
        );
    }
    tracing::info!(
        changed = if r.changed.is_empty() {
            "none".to_string()
        } else {
            r.changed.join(",")
        },
        "SIGHUP: configuration reloaded"
    );
}

fn serve(args: ServeArgs) -> ExitCode {
    let reload_args = args.clone();
    let cfg = match args.config() {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("ringway: invalid configuration: {e}");
            return ExitCode::from(64);
        }
    };
    let set_log = init_logging(&cfg);
    match crate::sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the file limit"),
    }
    // Installed before anything listens, so a SIGTERM right after start still drains.
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringway: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let running = match crate::shard::start(cfg.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("ringway: {e}");
            return ExitCode::from(1);
        }
    };
    let node = running.node.clone();
    let admin = match crate::admin::start(cfg.clone(), node.clone()) {
        Ok((addr, _thread)) => addr,
        Err(e) => {
            eprintln!("ringway: cannot listen on admin address {}: {e}", cfg.admin);
            running.shutdown();
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        listen = %node.listen,
        admin = %admin,
        shards = node.shards.len(),
        driver = node.driver,
        node = %node.id,
        "ringway ready"
    );
    let status = format!(
        "READY=1\nSTATUS=listening on {} with {} shard(s), driver {}",
        node.listen,
        node.shards.len(),
        node.driver
    );
    if let Err(e) = crate::notify::notify(&status) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
    let stop_watchdog = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(interval) = crate::notify::watchdog_interval() {
        if let Err(e) = crate::notify::spawn_watchdog(node.clone(), interval, stop_watchdog.clone())
        {
            tracing::warn!(error = %e, "could not start the watchdog thread");
        }
    }
    let mut signal = None;
    for s in signals.forever() {
        if s == signal_hook::consts::SIGHUP {
            reload(&reload_args, &node, &set_log);
            continue;
        }
        signal = Some(s);
        break;
    }
    stop_watchdog.store(true, std::sync::atomic::Ordering::Release);
    let _ = crate::notify::notify("STOPPING=1\nSTATUS=draining");
    tracing::info!(?signal, "shutting down: closing connections with 1001");
    running.shutdown();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("ringway-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "shards = 3\nmax_topic_bytes = 10\n").unwrap();
        let args = ServeArgs {
            config: Some(file),
            shards: Some(1),
            ..ServeArgs::default()
        };
        let cfg = args.config().unwrap();
        assert_eq!(cfg.shards, 1);
        assert_eq!(cfg.max_topic_bytes, 10);
    }

    #[test]
    fn invalid_combination_is_refused() {
        let args = ServeArgs {
            ping_interval_secs: Some(30),
            idle_timeout_secs: Some(10),
            ..ServeArgs::default()
        };
        assert!(args
            .config()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_secs"));
    }
}
