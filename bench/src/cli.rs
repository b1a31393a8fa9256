//! Command-line flags. Counts and sizes take SI suffixes: `19k` = 19,000, `1M` =
//! 1,000,000, `4Ki` = 4,096, `1Mi` = 1,048,576.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "ringway-bench",
    version,
    about = "Load generator for ringway: idle, fanout and churn over loopback"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Flags every scenario takes (before or after the subcommand).
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Gateway WebSocket endpoint (loopback only).
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Gateway admin API (loopback only), for `fanout` publishing over HTTP.
    #[arg(long, global = true, default_value = "127.0.0.1:9090")]
    pub admin: String,
    /// Process(es) under test, for RSS (VmRSS) and CPU (utime + stime); repeatable.
    #[arg(long = "gateway-pid", global = true)]
    pub gateway_pid: Vec<u32>,
    /// Client threads per client process, one mio loop each.
    #[arg(long, global = true, default_value_t = 2)]
    pub threads: usize,
    /// Spread connections over source IPs 127.0.0.2 … 127.0.0.(N+1); 0 = kernel's choice
    /// (127.0.0.1). Keep connections per source IP ≤ 8k.
    #[arg(long, global = true, default_value = "0", value_parser = parse_si)]
    pub source_ips: u64,
    /// Client processes (re-executions of this binary), each with N/P connections, so
    /// that one process's file limit does not cap the total.
    #[arg(long, global = true, default_value_t = 1)]
    pub procs: usize,
    /// Connection attempts in progress at once (all processes) while opening.
    #[arg(long, global = true, default_value = "512", value_parser = parse_si)]
    pub open_concurrency: u64,
    /// Seconds allowed for opening (and subscribing) every connection.
    #[arg(long, global = true, default_value_t = 120)]
    pub open_timeout_secs: u64,
    /// Hard bound on the whole run; client threads and processes exit after it.
    #[arg(long, global = true, default_value_t = 3600)]
    pub max_run_secs: u64,
    /// Write the results as JSON to this file.
    #[arg(long, global = true)]
    pub json: Option<PathBuf>,
    /// Comparison mode, for a server that is not ringway: its subscribe request, with
    /// `{topic}` for the topic name.
    #[arg(
        long,
        global = true,
        default_value = r#"{"op":"subscribe","topic":"{topic}"}"#
    )]
    pub subscribe_template: String,
    /// Whether the server sends a first frame after the upgrade (ringway's `welcome`).
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    pub expect_welcome: bool,
    /// Whether the server answers a subscribe (ringway's `subscribed`); if not, a
    /// subscriber is ready once its request is written.
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    pub expect_subscribed: bool,
    /// Redis the gateways share (host:port, loopback): fanout and direct report the Redis
    /// commands they cost per message (INFO commandstats before and after).
    #[arg(long, global = true)]
    pub redis: Option<String>,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Scenario {
    /// Open N connections, hold them idle, measure memory per connection, close them.
    Idle(IdleArgs),
    /// S subscribers over T topics; publish at a fixed rate; measure latency and loss.
    Fanout(FanoutArgs),
    /// Open, upgrade, welcome and close N connections with C in flight.
    Churn(ChurnArgs),
    /// Like fanout, but each message goes to one user (`POST /v1/send`): connection g
    /// presents a token for `user-(g mod T)` (`--topics` = users) and message k goes to
    /// `user-(k mod T)`, through the gateway's presence directory.
    Direct(FanoutArgs),
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    /// Connections to open.
    #[arg(long, value_parser = parse_si)]
    pub conns: u64,
    /// Seconds to hold them open (pings answered) before measuring.
    #[arg(long, default_value_t = 10)]
    pub hold_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// `POST /v1/publish` on the admin API over keep-alive connections.
    Http,
    /// `{"op":"publish"}` on a WebSocket connection (gateway needs client publishing).
    Ws,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Subscriber connections.
    #[arg(long, value_parser = parse_si)]
    pub subs: u64,
    /// Topics; subscriber g subscribes to topic-(g mod T), message k goes to topic-(k mod T).
    #[arg(long, default_value = "1", value_parser = parse_si)]
    pub topics: u64,
    /// Messages per second over all topics; 0 = saturation.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Approximate size of each message's data JSON (padded).
    #[arg(long, default_value = "64", value_parser = parse_si)]
    pub msg_bytes: u64,
    #[arg(long, value_enum, default_value_t = PublishVia::Http)]
    pub publish_via: PublishVia,
    /// HTTP keep-alive connections to the admin API.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Unacknowledged publishes allowed at once.
    #[arg(long, default_value = "256", value_parser = parse_si)]
    pub max_inflight: u64,
    /// Closed loop (with `--rate 0`): publish message n only once message n − K reached
    /// every subscriber of its topic; 0 = off (open loop: as fast as acknowledged).
    #[arg(long, default_value_t = 0)]
    pub window: u64,
    /// Mix in slow consumers: every K-th subscriber (0 = none) gets a small receive
    /// buffer and stops reading once subscribed; it reads once when the drain ends.
    /// They are left out of expected/received/latency and reported apart.
    #[arg(long, default_value_t = 0)]
    pub slow_every: u64,
    /// Receive buffer (SO_RCVBUF) of a slow consumer, in bytes.
    #[arg(long, default_value = "4096", value_parser = parse_si)]
    pub slow_rcvbuf: u64,
    /// Resume storm (ringway, single node, `--topics 1`): before the subscribers
    /// connect, publish an anchor and then N messages; every subscriber subscribes with
    /// `since` the anchor, so it must first receive the N it missed (seqs 0..N), then
    /// the live ones (seqs from N), whose latency alone is reported. 0 = off.
    #[arg(long, default_value_t = 0)]
    pub behind: u64,
    /// Seconds to hold every connection idle (pings answered) before publishing.
    #[arg(long, default_value_t = 0)]
    pub hold_secs: u64,
    /// Seconds to wait for outstanding deliveries after the last acknowledgement.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Write a latency-by-percentile plot (SVG) to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// Comparison mode: the admin path publishes go to [default: /v1/publish, or
    /// /v1/send for `direct`].
    #[arg(long)]
    pub publish_path: Option<String>,
    /// Comparison mode: the HTTP body of a publish, with `{topic}` (the topic or user
    /// name) and `{data}` (the message JSON) [default: {"topic":"{topic}","data":{data}}].
    #[arg(long)]
    pub publish_template: Option<String>,
    /// HS256 secret the gateway verifies tokens with (`direct`); also read from
    /// RINGWAY_JWT_SECRET.
    #[arg(long, env = "RINGWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ChurnArgs {
    /// Connections to open and close.
    #[arg(long, value_parser = parse_si)]
    pub conns: u64,
    /// Connections in progress at once (all processes).
    #[arg(long, default_value = "64", value_parser = parse_si)]
    pub concurrency: u64,
}

/// Parses `123`, `19k`, `1.5M`, `4Ki`, `1Mi`, `2G`.
pub fn parse_si(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let num: f64 = num
        .replace('_', "")
        .parse()
        .map_err(|_| format!("not a number: {s:?}"))?;
    let mult: f64 = match suffix {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown suffix {other:?} (k, M, G, Ki, Mi, Gi)")),
    };
    let v = num * mult;
    if !(0.0..1e15).contains(&v) || v.fract() != 0.0 {
        return Err(format!("{s:?} is not a whole count"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn si_suffixes() {
        assert_eq!(parse_si("19k"), Ok(19_000));
        assert_eq!(parse_si("1.5M"), Ok(1_500_000));
        assert_eq!(parse_si("4Ki"), Ok(4096));
        assert_eq!(parse_si("1_000"), Ok(1000));
        assert!(parse_si("1.5").is_err());
        assert!(parse_si("3x").is_err());
    }

    #[test]
    fn flags_parse_before_and_after_the_subcommand() {
        let c = Cli::try_parse_from([
            "b",
            "--threads",
            "3",
            "idle",
            "--conns",
            "2k",
            "--procs",
            "2",
            "--gateway-pid",
            "1",
            "--gateway-pid",
            "2",
        ])
        .unwrap();
        assert_eq!(c.common.threads, 3);
        assert_eq!(c.common.procs, 2);
        assert_eq!(c.common.gateway_pid, vec![1, 2]);
        assert!(matches!(
            c.scenario,
            Scenario::Idle(IdleArgs { conns: 2000, .. })
        ));
    }
}
