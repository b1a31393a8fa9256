//! The command line: `serve`, `publish`, `send`, `doctor`. Flags override `RINGWAY_*` environment
//! variables, which override the config file. Exit codes: 0 success, 1 runtime failure,
//! 64 bad usage or configuration, 65 bad data (not JSON, or refused by the API with 400),
//! 69 admin API unreachable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::builder::PossibleValuesParser;
use clap::{Arg, ArgMatches, Args, Parser, Subcommand};

use crate::config::{Config, LogFormat, OptionInfo, Shape, OPTIONS};

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

/// The options of `serve` and `doctor`: `--config`, and a flag for every option of the
/// option table (`config::OPTIONS`), each also read from `RINGWAY_<NAME>`.
#[derive(Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML config file.
    pub config: Option<PathBuf>,
    /// The options given as flags or in the environment, with their values, in the
    /// table's order.
    pub set: Vec<(&'static str, Vec<String>)>,
}

impl ServeArgs {
    /// Builds the effective configuration: defaults < file < env < flags.
    pub fn config(self) -> Result<Config, crate::config::ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        for (name, values) in &self.set {
            cfg.set(name, values)?;
            // A key given here replaces the other kind of key from the file.
            match *name {
                "jwt_secret" => cfg.jwt_key = None,
                "jwt_key" => cfg.jwt_secret = None,
                _ => {}
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The flag of one option, made from its entry in the table.
fn option_arg(o: &OptionInfo, default: String) -> Arg {
    let help = o.help();
    let short = help
        .split(". ")
        .next()
        .unwrap_or(&help)
        .trim_end_matches('.');
    let mut arg = Arg::new(o.name)
        .long(o.flag())
        .env(o.env())
        .value_name(o.name.to_ascii_uppercase())
        .help(format!("{short} [default: {default}]"))
        .long_help(format!("{help}\n[default: {default}]"))
        .hide_env_values(o.secret);
    arg = match o.shape {
        Shape::One => arg.num_args(1),
        Shape::Switch => arg
            .num_args(0..=1)
            .default_missing_value("true")
            .value_parser(["true", "false"]),
        Shape::List => arg
            .num_args(1)
            .value_delimiter(',')
            .action(clap::ArgAction::Append),
    };
    if !o.choices.is_empty() {
        arg = arg.value_parser(PossibleValuesParser::new(o.choices));
    }
    if o.name == "jwt_secret" {
        arg = arg.conflicts_with("jwt_key");
    }
    arg
}

impl clap::Args for ServeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd.arg(
            Arg::new("config")
                .long("config")
                .env("RINGWAY_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("TOML config file"),
        )
        .args(OPTIONS.iter().filter(|o| !o.file).map(|o| {
            let (default, _) = Config::shown_default(o.name).unwrap_or_default();
            option_arg(o, default)
        }))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl clap::FromArgMatches for ServeArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self {
            config: m.get_one::<PathBuf>("config").cloned(),
            set: OPTIONS
                .iter()
                .filter(|o| !o.file)
                .filter_map(|o| {
                    let values = m.get_many::<String>(o.name)?;
                    Some((o.name, values.cloned().collect()))
                })
                .collect(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
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
    let (mut merged, mut r) = old.reloaded(&new);
    // What goes in force mixes new values with old ones that need a restart: check the
    // mix too (a new file without `admin_token` is valid for a loopback `admin`, but
    // not for the public address still in force).
    if let Err(e) = merged.validate() {
        tracing::error!(error = %e, "SIGHUP: configuration not reloaded (with the options that need a restart kept), the running one stays");
        return;
    }
    // The token keys are read again on every reload: a PEM file may have changed in
    // place. If they cannot be, the running keys and their options stay.
    match crate::auth::Authenticator::reloaded(&merged, &node.auth()) {
        Ok(auth) => node.replace_auth(Arc::new(auth)),
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: token keys not reloaded; the running ones stay");
            merged.jwt_secret.clone_from(&old.jwt_secret);
            merged.jwt_key.clone_from(&old.jwt_key);
            merged.jwt_jwks_url.clone_from(&old.jwt_jwks_url);
            merged.jwt_audience.clone_from(&old.jwt_audience);
            merged.jwt_issuer.clone_from(&old.jwt_issuer);
            merged.jwt_leeway_secs = old.jwt_leeway_secs;
            merged.allow_anonymous = old.allow_anonymous;
            r.changed
                .retain(|o| !o.starts_with("jwt_") && *o != "allow_anonymous");
        }
    }
    // The certificate and key are read again too: renewed in place, they serve new
    // connections from now on.
    if let (Some(cert), Some(key)) = (&merged.tls_cert, &merged.tls_key) {
        match crate::tls::server_config(cert, key) {
            Ok(tls) => {
                node.replace_tls(tls);
                r.changed.push("tls_cert");
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: certificate not reloaded; the running one stays")
            }
        }
    }
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
    if cfg.presence_ttl_secs != crate::config::Config::default().presence_ttl_secs {
        tracing::warn!("presence_ttl_secs is no longer used: presence entries live as long as their node's heartbeat; remove it");
    }
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
            // A key or certificate that cannot be used is a configuration error.
            let config = matches!(
                e,
                crate::shard::StartError::Auth(_) | crate::shard::StartError::Tls(_)
            );
            return ExitCode::from(if config { 64 } else { 1 });
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
    use clap::FromArgMatches;

    fn parse(flags: &[&str]) -> ServeArgs {
        let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
        let m = cmd
            .try_get_matches_from(std::iter::once("serve").chain(flags.iter().copied()))
            .unwrap();
        ServeArgs::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("ringway-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "shards = 3\nmax_topic_bytes = 10\n").unwrap();
        let args = parse(&["--config", file.to_str().unwrap(), "--shards", "1"]);
        let cfg = args.config().unwrap();
        assert_eq!(cfg.shards, 1);
        assert_eq!(cfg.max_topic_bytes, 10);
    }

    #[test]
    fn invalid_combination_is_refused() {
        let args = parse(&["--ping-interval-secs", "30", "--idle-timeout-secs", "10"]);
        assert!(args
            .config()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_secs"));
    }
}
