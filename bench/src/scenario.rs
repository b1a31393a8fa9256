//! The three scenarios as scripts over client parts: sample the gateway, run a phase on
//! every part, sample again, and turn the differences into the reported figures. How
//! each figure is computed is stated next to it here and in `bench/README.md`.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::{ChurnArgs, Cli, FanoutArgs, IdleArgs, PublishVia, Scenario};
use crate::client::ClientCfg;
use crate::parts::{self, Part, PartCmd, PartReply};
use crate::procfs::{slab_bytes, GatewaySample, Host, SockStat};
use crate::publisher::{self, PubCfg, Via};
use crate::report::{bytes, latency_svg, thousands, Table};
use crate::stats::{ChurnReport, CloseReport, DrainReport, OpenReport, Percentiles};

/// Connections per (source IP, destination) beyond which connect() slows sharply here.
const MAX_PER_SOURCE_IP: u64 = 8_000;
/// File descriptors a client process keeps for itself (epoll, pipes, publisher).
const FD_HEADROOM: u64 = 64;

#[derive(Debug)]
pub enum Error {
    /// Bad flags: exit 64.
    Usage(String),
    /// The run failed: exit 1.
    Run(String),
}

fn run_err(e: impl std::fmt::Display) -> Error {
    Error::Run(e.to_string())
}

/// The gateway endpoint from `--url`.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn loopback(addr: SocketAddr) -> Result<SocketAddr, String> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Ok(addr),
        IpAddr::V6(ip) if ip.is_loopback() => Err("IPv6 targets are not supported".into()),
        _ => Err(format!(
            "{addr} is not a loopback address: this tool only targets 127.0.0.0/8"
        )),
    }
}

fn resolve(hostport: &str) -> Result<SocketAddr, String> {
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport:?}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{hostport:?} has no IPv4 address"))?;
    loopback(addr)
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("--url must start with ws:// (got {url:?})"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport_full = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok(Target {
        addr: resolve(&hostport_full)?,
        host: hostport.to_string(),
        path: path.to_string(),
    })
}

/// Connections and concurrency of the scenario.
fn shape(cli: &Cli) -> (u64, u64, u32) {
    match &cli.scenario {
        Scenario::Idle(a) => (a.conns, cli.common.open_concurrency, 0),
        Scenario::Fanout(a) | Scenario::Direct(a) => {
            (a.subs, cli.common.open_concurrency, a.topics as u32)
        }
        Scenario::Churn(a) => (a.conns, a.concurrency, 0),
    }
}

fn client_cfg(cli: &Cli, offset: u64, count: u64, concurrency: usize) -> Result<ClientCfg, String> {
    let target = parse_url(&cli.common.url)?;
    let (_, _, topics) = shape(cli);
    let tokens = match &cli.scenario {
        Scenario::Direct(a) => Some(std::sync::Arc::new(user_tokens(a, offset, count)?)),
        _ => None,
    };
    let window = crate::window::Window::from_env()?.map(std::sync::Arc::new);
    let resume = Resume::from_env()?;
    let mut subscribe_template = cli.common.subscribe_template.clone();
    if let Some(r) = &resume {
        subscribe_template = r.subscribe_template();
    }
    Ok(ClientCfg {
        replayed: resume.as_ref().map_or(0, |r| r.behind),
        window,
        tokens,
        slow_every: match &cli.scenario {
            Scenario::Fanout(a) | Scenario::Direct(a) => a.slow_every,
            _ => 0,
        },
        slow_rcvbuf: match &cli.scenario {
            Scenario::Fanout(a) | Scenario::Direct(a) => a.slow_rcvbuf as usize,
            _ => 0,
        },
        foreign: crate::client::Foreign {
            subscribe_template,
            expect_welcome: cli.common.expect_welcome,
            expect_subscribed: cli.common.expect_subscribed,
        },
        target: target.addr,
        host: target.host,
        path: target.path,
        source_ips: cli.common.source_ips as u32,
        topics,
        threads: cli.common.threads.max(1),
        offset,
        count,
        concurrency: concurrency.max(1),
        max_lifetime: Duration::from_secs(cli.common.max_run_secs),
    })
}

/// A resume storm's starting point (`fanout --behind N`): found by the parent before
/// any client connects, and handed to the client processes through the environment.
#[derive(Debug, Clone)]
struct Resume {
    offset: String,
    epoch: String,
    behind: u64,
}

const RESUME_ENV: &str = "RINGWAY_BENCH_RESUME";

impl Resume {
    fn from_env() -> Result<Option<Self>, String> {
        let Ok(v) = std::env::var(RESUME_ENV) else {
            return Ok(None);
        };
        let mut f = v.split(',');
        match (f.next(), f.next(), f.next().and_then(|b| b.parse().ok())) {
            (Some(offset), Some(epoch), Some(behind)) => Ok(Some(Self {
                offset: offset.into(),
                epoch: epoch.into(),
                behind,
            })),
            _ => Err(format!("bad {RESUME_ENV}: {v:?}")),
        }
    }

    fn subscribe_template(&self) -> String {
        format!(
            r#"{{"op":"subscribe","topic":"{{topic}}","since":{{"offset":"{}","epoch":"{}"}}}}"#,
            self.offset, self.epoch
        )
    }

    /// Publishes the anchor and then `behind` messages (seqs 0..behind) to topic-0
    /// through the admin API, and learns the node's epoch; sets the environment the
    /// client processes read.
    fn prepare(admin: SocketAddr, behind: u64, msg_bytes: usize) -> Result<Self, String> {
        use ringway::admin::client;
        let offset = client::publish(admin, "topic-0", "\"anchor\"").map_err(|e| e.to_string())?;
        let page = client::history(admin, "topic-0", None, 1).map_err(|e| e.to_string())?;
        let epoch = page["epoch"]
            .as_str()
            .ok_or("GET /v1/history gave no epoch: is this ringway on a single node?")?
            .to_owned();
        for seq in 0..behind {
            let data = crate::ws::message_data(seq, crate::publisher::unix_ns(), msg_bytes);
            client::publish(admin, "topic-0", &data).map_err(|e| e.to_string())?;
        }
        let r = Self {
            offset,
            epoch,
            behind,
        };
        // Before any client thread or process exists: nothing reads the environment
        // concurrently.
        std::env::set_var(RESUME_ENV, format!("{},{},{}", r.offset, r.epoch, r.behind));
        Ok(r)
    }
}

/// The client configuration of a child process, from [`parts::PART_ENV`].
pub fn child_cfg(cli: &Cli, part: &str) -> Result<ClientCfg, String> {
    let f: Vec<u64> = part
        .split(',')
        .map(|x| {
            x.parse()
                .map_err(|_| format!("bad {}: {part:?}", parts::PART_ENV))
        })
        .collect::<Result<_, _>>()?;
    let [offset, count, conc] = f[..] else {
        return Err(format!("bad {}: {part:?}", parts::PART_ENV));
    };
    client_cfg(cli, offset, count, conc as usize)
}

/// Splits `total` connections over the client processes.
fn make_parts(cli: &Cli, total: u64, concurrency: u64) -> Result<Vec<Part>, Error> {
    let p = cli.common.procs.max(1) as u64;
    if p == 1 {
        let cfg = client_cfg(cli, 0, total, concurrency as usize).map_err(Error::Usage)?;
        return Ok(vec![Part::local(cfg).map_err(run_err)?]);
    }
    let conc = (concurrency / p).max(1) as usize;
    let mut out = Vec::new();
    let mut offset = 0;
    for i in 0..p {
        let count = total / p + u64::from(i < total % p);
        out.push(Part::spawn(offset, count, conc).map_err(run_err)?);
        offset += count;
    }
    Ok(out)
}

/// Checks flags against the host's limits before anything connects.
fn preflight(cli: &Cli, nofile: Option<u64>) -> Result<(), Error> {
    parse_url(&cli.common.url).map_err(Error::Usage)?;
    let (total, conc, _) = shape(cli);
    if total == 0 {
        return Err(Error::Usage("nothing to do: 0 connections".into()));
    }
    let procs = cli.common.procs.max(1) as u64;
    let per_proc = match cli.scenario {
        Scenario::Churn(_) => conc.div_ceil(procs),
        _ => total.div_ceil(procs),
    };
    if let Some(limit) = nofile {
        if per_proc + FD_HEADROOM > limit {
            return Err(Error::Usage(format!(
                "{per_proc} sockets per process exceed the file limit {limit}: use --procs {}",
                (total).div_ceil(limit.saturating_sub(FD_HEADROOM).max(1))
            )));
        }
    }
    if !matches!(cli.scenario, Scenario::Churn(_)) {
        let per_ip = total / cli.common.source_ips.max(1);
        if per_ip > MAX_PER_SOURCE_IP {
            eprintln!(
                "ringway-bench: warning: {per_ip} connections per source IP (> {MAX_PER_SOURCE_IP}); \
                 connect() slows sharply beyond that here: raise --source-ips"
            );
        }
    }
    if cli.common.source_ips > 60_000 {
        return Err(Error::Usage(
            "--source-ips must stay inside 127.0.0.0/8".into(),
        ));
    }
    if let Scenario::Direct(a) = &cli.scenario {
        if a.jwt_secret.is_none() {
            return Err(Error::Usage(
                "direct needs the gateway's HS256 secret: --jwt-secret or RINGWAY_JWT_SECRET"
                    .into(),
            ));
        }
        if a.publish_via != PublishVia::Http {
            return Err(Error::Usage(
                "direct sends through the admin API only (--publish-via http)".into(),
            ));
        }
    }
    if let Scenario::Fanout(a) | Scenario::Direct(a) = &cli.scenario {
        if a.topics == 0 || a.topics > u64::from(u32::MAX) {
            return Err(Error::Usage("--topics must be at least 1".into()));
        }
        if a.rate < 0.0 || a.duration <= 0.0 || a.drain_secs < 0.0 {
            return Err(Error::Usage(
                "--rate ≥ 0, --duration > 0, --drain-secs ≥ 0".into(),
            ));
        }
        if a.rate * a.duration > crate::client::MAX_COUNTED_SEQ as f64 {
            return Err(Error::Usage(
                "--rate × --duration too large to count per message".into(),
            ));
        }
        resolve(&cli.common.admin).map_err(Error::Usage)?;
    }
    Ok(())
}

/// Runs the scenario; prints the table and writes `--json`.
pub fn run(cli: &Cli, nofile: Option<u64>) -> Result<(), Error> {
    preflight(cli, nofile)?;
    let host = Host::take(nofile);
    let (name, results, table) = match &cli.scenario {
        Scenario::Idle(a) => ("idle", idle(cli, a)?),
        Scenario::Fanout(a) => ("fanout", fanout(cli, a, false)?),
        Scenario::Direct(a) => ("direct", fanout(cli, a, true)?),
        Scenario::Churn(a) => ("churn", churn(cli, a)?),
    }
    .flatten();
    let command: Vec<String> = std::env::args().collect();
    println!("ringway-bench {name}: {}", command.join(" "));
    println!(
        "host: {} CPUs ({}), {} memory, kernel {}, file limit {}",
        host.cpus,
        host.cpu_model,
        host.mem_total_bytes.map_or("?".into(), |b| bytes(b as f64)),
        host.kernel,
        host.nofile_limit.map_or("?".into(), |n| n.to_string())
    );
    println!("gateway: {}", describe_pids(&cli.common.gateway_pid));
    table.print();
    if let Some(path) = &cli.common.json {
        let doc = json!({
            "tool": "ringway-bench",
            "version": env!("CARGO_PKG_VERSION"),
            "scenario": name,
            "command": command,
            "host": host,
            "settings": {
                "url": cli.common.url,
                "admin": cli.common.admin,
                "gateway_pids": cli.common.gateway_pid,
                "threads": cli.common.threads,
                "procs": cli.common.procs,
                "source_ips": cli.common.source_ips,
                "open_concurrency": cli.common.open_concurrency,
                "scenario": format!("{:?}", cli.scenario),
            },
            "results": results,
        });
        let text = serde_json::to_string_pretty(&doc).map_err(run_err)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| Error::Run(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

trait Flatten {
    fn flatten(self) -> (&'static str, Value, Table);
}

impl Flatten for (&'static str, (Value, Table)) {
    fn flatten(self) -> (&'static str, Value, Table) {
        (self.0, self.1 .0, self.1 .1)
    }
}

fn sub_opt<T: std::ops::Sub<Output = T>>(a: Option<T>, b: Option<T>) -> Option<T> {
    Some(a? - b?)
}

fn opt_num(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("n/a".into(), f)
}

/// Smallest CPU delta worth dividing by: one `/proc/PID/stat` tick at 100 Hz.
const MIN_CPU_SECS: f64 = 0.01;

/// `count` per CPU-second, or `None` when the CPU delta is below the clock's
/// resolution (too short a run, or `--gateway-pid` names the wrong process).
fn per_cpu(count: u64, cpu: Option<f64>) -> Option<f64> {
    cpu.filter(|c| *c >= MIN_CPU_SECS).map(|c| count as f64 / c)
}

/// `PID (comm)` for each gateway pid, so a wrong pid shows in the output.
fn describe_pids(pids: &[u32]) -> String {
    if pids.is_empty() {
        return "none given (--gateway-pid): gateway figures are n/a".into();
    }
    pids.iter()
        .map(|p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map_or_else(|_| "not running".to_string(), |c| c.trim().to_string());
            format!("{p} ({comm})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn merge_open(replies: Vec<PartReply>) -> OpenReport {
    let mut total = OpenReport::default();
    for r in replies {
        if let PartReply::Opened(o) = r {
            total.merge(&o);
        }
    }
    total
}

fn merge_close(replies: Vec<PartReply>) -> CloseReport {
    let mut total = CloseReport::default();
    for r in replies {
        if let PartReply::Closed(c) = r {
            total.merge(&c);
        }
    }
    total
}

fn open_all(cli: &Cli, parts: &mut [Part]) -> Result<(OpenReport, f64), Error> {
    let timeout = Duration::from_secs(cli.common.open_timeout_secs);
    let t0 = Instant::now();
    let replies = parts::all(
        parts,
        &PartCmd::Open {
            timeout_ms: timeout.as_millis() as u64,
        },
        timeout + Duration::from_secs(30),
    )
    .map_err(Error::Run)?;
    Ok((merge_open(replies), t0.elapsed().as_secs_f64()))
}

fn close_all(parts: &mut [Part]) -> Result<CloseReport, Error> {
    let replies =
        parts::all(parts, &PartCmd::Close, Duration::from_secs(90)).map_err(Error::Run)?;
    Ok(merge_close(replies))
}

fn open_rows(t: &mut Table, open: &OpenReport, secs: f64) {
    t.row("connections requested", thousands(open.requested));
    t.row("connections opened", thousands(open.opened));
    let f = &open.failures;
    t.row("failed", f.summary());
    t.row("open time", format!("{secs:.2} s"));
    t.row(
        "connects/s",
        format!("{:.0}", open.opened as f64 / secs.max(1e-9)),
    );
    t.percentiles("connect→ready", &Percentiles::of(&open.ready_us.to_hist()));
}

// === idle ===

fn idle(cli: &Cli, a: &IdleArgs) -> Result<(Value, Table), Error> {
    let pids = &cli.common.gateway_pid;
    let gw0 = GatewaySample::take(pids);
    let sock0 = SockStat::take();
    let slab0 = slab_bytes();
    let mut parts = make_parts(cli, a.conns, cli.common.open_concurrency)?;
    let (open, open_secs) = open_all(cli, &mut parts)?;
    let gw_open = GatewaySample::take(pids);
    eprintln!(
        "ringway-bench: {} of {} connections open in {open_secs:.2} s; holding {} s",
        open.opened, a.conns, a.hold_secs
    );
    std::thread::sleep(Duration::from_secs(a.hold_secs));
    let gw1 = GatewaySample::take(pids);
    let sock1 = SockStat::take();
    let slab1 = slab_bytes();
    let close = close_all(&mut parts)?;
    drop(parts);
    std::thread::sleep(Duration::from_secs(2));
    let gw2 = GatewaySample::take(pids);

    let n = open.opened.max(1) as f64;
    let gw_delta = sub_opt(
        gw1.rss_bytes.map(|v| v as f64),
        gw0.rss_bytes.map(|v| v as f64),
    );
    let gw_per_conn = gw_delta.map(|d| d / n);
    // Right after opening, before the gateway's first ping round: a lower bound.
    let gw_per_conn_open = sub_opt(
        gw_open.rss_bytes.map(|v| v as f64),
        gw0.rss_bytes.map(|v| v as f64),
    )
    .map(|d| d / n);
    let gen_delta = open.self_rss_after as f64 - open.self_rss_before as f64;
    let slab_delta = sub_opt(slab1.map(|v| v as f64), slab0.map(|v| v as f64));
    let cpu_open = sub_opt(gw_open.cpu_secs, gw0.cpu_secs);
    let cpu_hold = sub_opt(gw1.cpu_secs, gw_open.cpu_secs);

    let mut t = Table::default();
    t.section("open");
    open_rows(&mut t, &open, open_secs);
    t.row(
        "gateway CPU while opening",
        opt_num(cpu_open, |c| {
            format!(
                "{c:.2} s ({} connects per CPU-s)",
                opt_num(per_cpu(open.opened, Some(c)), |v| format!("{v:.0}"))
            )
        }),
    );
    t.section(&format!("after holding {} s", a.hold_secs));
    t.row(
        "closed by the gateway during hold",
        format!("{} {:?}", close.peer_closed, close.peer_close_causes),
    );
    t.row("pings answered", close.pings);
    t.row(
        "gateway CPU during hold",
        opt_num(cpu_hold, |c| format!("{c:.2} s")),
    );
    t.row(
        "gateway RSS before → after",
        match (gw0.rss_bytes, gw1.rss_bytes) {
            (Some(b), Some(a)) => format!("{} → {}", bytes(b as f64), bytes(a as f64)),
            _ => "n/a (no --gateway-pid)".into(),
        },
    );
    t.row("gateway RSS delta", opt_num(gw_delta, bytes));
    t.row(
        "gateway RSS per connection",
        opt_num(gw_per_conn, |v| format!("{v:.0} B")),
    );
    t.row(
        "gateway RSS per connection right after open",
        opt_num(gw_per_conn_open, |v| format!("{v:.0} B")),
    );
    t.row(
        "gateway RSS after close",
        opt_num(gw2.rss_bytes.map(|v| v as f64), bytes),
    );
    if let (Some(s0), Some(s1)) = (sock0, sock1) {
        t.row(
            "kernel TCP sockets in use",
            format!("{} → {}", thousands(s0.tcp_inuse), thousands(s1.tcp_inuse)),
        );
        t.row(
            "kernel TCP buffer memory",
            format!(
                "{} pages ({})",
                s1.tcp_mem_pages,
                bytes(s1.tcp_mem_bytes as f64)
            ),
        );
    }
    t.row(
        "kernel slab delta per connection (machine-wide)",
        opt_num(slab_delta, |d| format!("{:.0} B", d / n)),
    );
    t.row(
        "generator RSS delta per connection",
        format!("{:.0} B", gen_delta / n),
    );
    t.row(
        "generator RSS total (all client processes)",
        bytes(close.self_rss as f64),
    );

    let results = json!({
        "conns_requested": a.conns,
        "hold_secs": a.hold_secs,
        "open": open_json(&open, open_secs),
        "gateway": {
            "before": gw0, "after_open": gw_open, "after_hold": gw1, "after_close": gw2,
            "rss_delta_bytes": gw_delta,
            "rss_bytes_per_conn": gw_per_conn,
            "rss_bytes_per_conn_after_open": gw_per_conn_open,
            "cpu_secs_open": cpu_open,
            "cpu_secs_hold": cpu_hold,
        },
        "kernel": {
            "sockstat_before": sock0, "sockstat_after": sock1,
            "slab_before_bytes": slab0, "slab_after_bytes": slab1,
            "slab_delta_bytes_per_conn": slab_delta.map(|d| d / n),
        },
        "generator": {
            "rss_before_bytes": open.self_rss_before,
            "rss_after_open_bytes": open.self_rss_after,
            "rss_at_close_bytes": close.self_rss,
            "rss_delta_bytes_per_conn": gen_delta / n,
        },
        "hold": {
            "closed_by_peer": close.peer_closed,
            "closed_by_peer_causes": close.peer_close_causes,
            "pings_answered": close.pings,
            "closed_by_us": close.closed,
        },
    });
    Ok((results, t))
}

fn open_json(open: &OpenReport, secs: f64) -> Value {
    json!({
        "requested": open.requested,
        "opened": open.opened,
        "failed": open.failures.total(),
        "failures": open.failures,
        "secs": secs,
        "connects_per_sec": open.opened as f64 / secs.max(1e-9),
        "connect_to_ready_us": Percentiles::of(&open.ready_us.to_hist()),
    })
}

// === fanout ===

/// Loss and duplicates from the per-seq delivery counts.
#[derive(Debug, Default, PartialEq, Eq)]
struct Accounting {
    expected: u64,
    lost: u64,
    duplicates: u64,
    /// Deliveries of seqs never sent, or of seqs whose publish was refused.
    unexpected: u64,
    /// Deliveries of seqs whose publish was never acknowledged (not judged).
    of_unacked: u64,
}

fn account(
    counts: &[u32],
    sent: u64,
    ready_per_topic: &[u64],
    refused: &HashSet<u64>,
    unacked: &HashSet<u64>,
) -> Accounting {
    let topics = ready_per_topic.len().max(1) as u64;
    let mut acc = Accounting::default();
    let subs = |k: u64| {
        ready_per_topic
            .get((k % topics) as usize)
            .copied()
            .unwrap_or(0)
    };
    for k in 0..sent.max(counts.len() as u64) {
        let c = u64::from(counts.get(k as usize).copied().unwrap_or(0));
        if unacked.contains(&k) {
            acc.of_unacked += c;
            continue;
        }
        let exp = if k >= sent || refused.contains(&k) {
            0
        } else {
            subs(k)
        };
        if exp == 0 {
            acc.unexpected += c;
            continue;
        }
        acc.expected += exp;
        acc.lost += exp.saturating_sub(c);
        acc.duplicates += c.saturating_sub(exp);
    }
    acc
}

/// HS256 tokens, valid for a day, for the users of connections `offset ..
/// offset + count` (user `g mod T` for connection g): every user's when the range covers
/// them all, else one per connection of the range.
fn user_tokens(a: &FanoutArgs, offset: u64, count: u64) -> Result<crate::client::Tokens, String> {
    let secret = a.jwt_secret.as_deref().ok_or("no --jwt-secret")?;
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 86_400;
    let users = a.topics.max(1);
    let (first, conns) = if count >= users {
        (0, 0..users)
    } else {
        (offset, offset..offset + count)
    };
    let signed = conns
        .map(|g| {
            let claims = json!({ "sub": format!("user-{}", g % users), "exp": exp });
            jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)
                .map_err(|e| format!("cannot sign a token: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(crate::client::Tokens {
        users,
        first,
        signed,
    })
}

fn fanout(cli: &Cli, a: &FanoutArgs, direct: bool) -> Result<(Value, Table), Error> {
    let pids = &cli.common.gateway_pid;
    let target = parse_url(&cli.common.url).map_err(Error::Usage)?;
    let via = match a.publish_via {
        PublishVia::Http => Via::Http {
            admin: resolve(&cli.common.admin).map_err(Error::Usage)?,
        },
        PublishVia::Ws => Via::Ws {
            target: target.addr,
            host: target.host.clone(),
            path: target.path.clone(),
        },
    };
    if a.window > 0 && (a.rate > 0.0 || a.window >= crate::window::SLOTS) {
        return Err(Error::Usage(format!(
            "--window needs --rate 0 and at most {} messages",
            crate::window::SLOTS - 1
        )));
    }
    // Created before the client parts, which find it through the environment.
    let window = if a.window > 0 {
        Some(std::sync::Arc::new(
            crate::window::Window::create().map_err(Error::Run)?,
        ))
    } else {
        None
    };
    if a.behind > 0 && (a.topics != 1 || direct || a.window > 0 || a.behind >= 1_000_000) {
        return Err(Error::Usage(
            "--behind needs --topics 1, a topic fan-out, no --window and at most 999999 messages"
                .into(),
        ));
    }
    let resume = if a.behind > 0 {
        let admin = resolve(&cli.common.admin).map_err(Error::Usage)?;
        Some(Resume::prepare(admin, a.behind, a.msg_bytes as usize).map_err(Error::Run)?)
    } else {
        None
    };
    let gw0 = GatewaySample::take(pids);
    let slab0 = slab_bytes();
    let storm_start_ns = crate::publisher::unix_ns();
    let mut parts = make_parts(cli, a.subs, cli.common.open_concurrency)?;
    let (open, open_secs) = open_all(cli, &mut parts)?;
    if open.opened == 0 {
        return Err(Error::Run(
            "no subscriber could connect and subscribe".into(),
        ));
    }
    eprintln!(
        "ringway-bench: {} of {} subscribers ready in {open_secs:.2} s; {}",
        open.opened,
        a.subs,
        if a.hold_secs > 0 {
            format!("holding {} s, then publishing", a.hold_secs)
        } else {
            "publishing".into()
        }
    );
    // Held idle first if asked (client threads answer pings meanwhile), then a settle
    // after the subscribe burst before the window opens.
    std::thread::sleep(Duration::from_secs(a.hold_secs) + Duration::from_millis(500));
    let slab1 = slab_bytes();
    let held = GatewaySample::take(pids);
    let per_conn = |after: Option<u64>, before: Option<u64>| {
        Some(after?.saturating_sub(before?) as f64 / open.opened.max(1) as f64)
    };
    let gw_rss_per_conn = per_conn(held.rss_bytes, gw0.rss_bytes);
    let slab_per_conn = per_conn(slab1, slab0);
    let redis = match &cli.common.redis {
        Some(r) => Some(resolve(r).map_err(Error::Usage)?),
        None => None,
    };
    let redis0 = match redis {
        Some(addr) => Some(crate::redisinfo::sample(addr).map_err(Error::Run)?),
        None => None,
    };
    let gw_start = GatewaySample::take(pids);
    let parent_cpu0 = crate::procfs::self_cpu_secs();
    let pcfg = PubCfg {
        direct,
        path: a.publish_path.clone(),
        template: a.publish_template.clone(),
        via,
        conns: a.publishers,
        rate: a.rate,
        duration: Duration::from_secs_f64(a.duration),
        topics: a.topics as u32,
        msg_bytes: a.msg_bytes as usize,
        max_inflight: a.max_inflight.max(1) as usize,
        first_seq: a.behind,
        window: window.map(|counters| publisher::ClosedLoop {
            counters,
            size: a.window,
            ready_per_topic: open.ready_per_topic.iter().map(|n| *n as u32).collect(),
        }),
    };
    let pubrep = publisher::run(&pcfg).map_err(Error::Run)?;
    let refused: HashSet<u64> = pubrep.refused.iter().copied().collect();
    let unacked: HashSet<u64> = pubrep.unacked.iter().copied().collect();
    let not_ok: Vec<u64> = refused.union(&unacked).copied().collect();
    let drain_replies = parts::all(
        &mut parts,
        &PartCmd::Drain {
            published: a.behind + pubrep.sent,
            not_ok,
            timeout_ms: (a.drain_secs * 1000.0) as u64,
        },
        Duration::from_secs_f64(a.drain_secs + 30.0),
    )
    .map_err(Error::Run)?;
    let gw_end = GatewaySample::take(pids);
    // Commands from the publish start to the drain end (heartbeats of the window included).
    let redis_calls = match (redis, &redis0) {
        (Some(addr), Some(before)) => Some(crate::redisinfo::delta(
            before,
            &crate::redisinfo::sample(addr).map_err(Error::Run)?,
        )),
        _ => None,
    };
    let mut drain = DrainReport::default();
    for r in drain_replies {
        if let PartReply::Drained(d) = r {
            drain.merge(&d);
        }
    }
    // Client processes' CPU from the end of opening to the end of the drain (the 0.5 s
    // settle included); with --procs > 1 the publisher runs in this process, apart.
    let mut gen_cpu = drain.self_cpu_secs - open.self_cpu_secs;
    if cli.common.procs > 1 {
        gen_cpu += crate::procfs::self_cpu_secs() - parent_cpu0;
    }
    let close = close_all(&mut parts)?;
    drop(parts);

    let acc = account(
        &drain.counts,
        a.behind + pubrep.sent,
        &open.ready_per_topic,
        &refused,
        &unacked,
    );
    let window_secs = if drain.last_delivery_unix_ns > pubrep.start_unix_ns {
        (drain.last_delivery_unix_ns - pubrep.start_unix_ns) as f64 / 1e9
    } else {
        pubrep.total_secs
    };
    let per_sec = drain.received as f64 / window_secs.max(1e-9);
    let cpu = sub_opt(gw_end.cpu_secs, gw_start.cpu_secs);
    let cpu_precise = sub_opt(gw_end.cpu_secs_precise, gw_start.cpu_secs_precise);
    let per_cpu_secs = per_cpu(drain.received, cpu);
    let per_cpu_precise = per_cpu(drain.received, cpu_precise);
    let hist = drain.latency_us.to_hist();
    let lat = Percentiles::of(&hist);

    let mut t = Table::default();
    t.section("subscribers");
    open_rows(&mut t, &open, open_secs);
    if a.hold_secs > 0 {
        t.row("held idle before publishing", format!("{} s", a.hold_secs));
    }
    t.row(
        "gateway RSS per connection (before publishing)",
        opt_num(gw_rss_per_conn, |v| format!("{v:.0} B")),
    );
    t.row(
        "kernel slab per connection (before publishing)",
        opt_num(slab_per_conn, |v| format!("{v:.0} B")),
    );
    t.section("publisher");
    t.row(
        "schedule",
        if a.rate > 0.0 {
            format!(
                "{} msg/s for {} s over {} {}, {} B data",
                a.rate,
                a.duration,
                a.topics,
                if direct { "user(s)" } else { "topic(s)" },
                a.msg_bytes
            )
        } else {
            format!(
                "saturation for {} s over {} {}, ≤ {} in flight",
                a.duration,
                a.topics,
                if direct { "user(s)" } else { "topic(s)" },
                a.max_inflight
            )
        },
    );
    t.row("published (sent)", thousands(pubrep.sent));
    t.row("acknowledged ok", thousands(pubrep.acked_ok));
    t.row(
        "refused / unacknowledged",
        format!(
            "{} {:?} / {}",
            pubrep.refused.len(),
            pubrep.refusals,
            pubrep.unacked.len()
        ),
    );
    t.row(
        "publish rate achieved",
        format!(
            "{:.0} msg/s",
            pubrep.sent as f64 / pubrep.send_secs.max(1e-9)
        ),
    );
    if a.rate > 0.0 {
        t.row(
            "publisher behind schedule",
            format!(
                "max {:.3} ms, {} messages > 1 ms late",
                pubrep.max_lag_us as f64 / 1000.0,
                pubrep.late_over_1ms
            ),
        );
    }
    let recover_secs = (resume.is_some() && drain.last_replay_unix_ns > storm_start_ns)
        .then(|| (drain.last_replay_unix_ns - storm_start_ns) as f64 / 1e9);
    if let Some(r) = &resume {
        t.section("resume storm");
        t.row(
            "missed by each subscriber",
            format!(
                "{} messages after {} (epoch {})",
                r.behind, r.offset, r.epoch
            ),
        );
        t.row(
            "time to recover everyone (first connect → last missed message received)",
            opt_num(recover_secs, |s| format!("{s:.3} s")),
        );
    }
    t.section("deliveries");
    t.row("expected", thousands(acc.expected));
    t.row("received", thousands(drain.received));
    t.row("lost", thousands(acc.lost));
    t.row("duplicates", thousands(acc.duplicates));
    if acc.unexpected + acc.of_unacked + drain.misrouted > 0 {
        t.row(
            "unexpected / of unacked / misrouted",
            format!(
                "{} / {} / {}",
                acc.unexpected, acc.of_unacked, drain.misrouted
            ),
        );
    }
    t.row(
        "subscribers closed by the gateway",
        format!("{} {:?}", drain.peer_closed, drain.peer_close_causes),
    );
    t.row("error frames", drain.error_frames);
    if a.slow_every > 0 {
        t.row(
            "slow consumers (not counted above)",
            format!(
                "{}: {} closed by the server {:?}; {} messages read",
                drain.slow, drain.slow_closed, drain.slow_close_causes, drain.slow_received
            ),
        );
    }
    t.row(
        "window (publish start → last delivery)",
        format!("{window_secs:.3} s"),
    );
    t.row("deliveries/s", format!("{per_sec:.0}"));
    t.row(
        "gateway CPU (publish start → drain end)",
        opt_num(cpu, |c| format!("{c:.2} s")),
    );
    t.row(
        "deliveries per gateway CPU-second",
        opt_num(per_cpu_secs, |v| format!("{v:.0}")),
    );
    t.row(
        "deliveries per gateway CPU-second (schedstat)",
        opt_num(per_cpu_precise, |v| format!("{v:.0}")),
    );
    t.row("generator CPU (publish + drain)", format!("{gen_cpu:.2} s"));
    if let Some(calls) = &redis_calls {
        // INFO commandstats counts the commands a function runs too, so `all` includes
        // the lookups and publishes inside `ringway_send`.
        let per_msg = |n: u64| n as f64 / pubrep.acked_ok.max(1) as f64;
        let all: u64 = calls.values().sum();
        let by: Vec<String> = calls
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", per_msg(*v)))
            .collect();
        t.row(
            "redis commands per message",
            format!("{:.2} ({})", per_msg(all), by.join(", ")),
        );
    }
    t.section(if resume.is_some() {
        "latency of live messages (now − intended send time)"
    } else {
        "latency (now − intended send time)"
    });
    t.percentiles("latency", &lat);

    if let Some(path) = &a.svg {
        let title = format!(
            "ringway-bench {}: {} connections, {} {}, {}",
            if direct { "direct" } else { "fanout" },
            open.opened,
            a.topics,
            if direct { "user(s)" } else { "topic(s)" },
            if a.rate > 0.0 {
                format!("{} msg/s", a.rate)
            } else {
                "saturation".into()
            }
        );
        let sub = format!(
            "{} deliveries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            drain.received,
            lat.p50 as f64 / 1000.0,
            lat.p99 as f64 / 1000.0,
            lat.max as f64 / 1000.0
        );
        std::fs::write(path, latency_svg(&hist, &title, &sub))
            .map_err(|e| Error::Run(format!("cannot write {}: {e}", path.display())))?;
    }

    let results = json!({
        "subs_requested": a.subs,
        "topics": a.topics,
        "rate": a.rate,
        "duration_secs": a.duration,
        "msg_bytes": a.msg_bytes,
        "publish_via": format!("{:?}", a.publish_via).to_lowercase(),
        "direct": direct,
        "redis_calls": redis_calls,
        "open": open_json(&open, open_secs),
        "ready_per_topic": open.ready_per_topic,
        "hold_secs": a.hold_secs,
        "resume": resume.as_ref().map(|r| json!({
            "behind": r.behind,
            "offset": r.offset,
            "epoch": r.epoch,
            "recover_secs": recover_secs,
        })),
        "slow_consumers": {
            "every": a.slow_every,
            "rcvbuf": a.slow_rcvbuf,
            "count": drain.slow,
            "closed_by_server": drain.slow_closed,
            "close_causes": drain.slow_close_causes,
            "messages_read": drain.slow_received,
        },
        "memory_before_publish": {
            "gateway_rss_bytes_per_conn": gw_rss_per_conn,
            "kernel_slab_bytes_per_conn": slab_per_conn,
            "generator_rss_after_open_bytes": open.self_rss_after,
        },
        "publisher": {
            "sent": pubrep.sent,
            "acked_ok": pubrep.acked_ok,
            "refused": pubrep.refused.len(),
            "refusals": pubrep.refusals,
            "unacked": pubrep.unacked.len(),
            "send_secs": pubrep.send_secs,
            "total_secs": pubrep.total_secs,
            "max_lag_us": pubrep.max_lag_us,
            "late_over_1ms": pubrep.late_over_1ms,
        },
        "deliveries": {
            "expected": acc.expected,
            "received": drain.received,
            "lost": acc.lost,
            "duplicates": acc.duplicates,
            "unexpected": acc.unexpected,
            "of_unacked": acc.of_unacked,
            "misrouted": drain.misrouted,
            "unknown_frames": drain.unknown_frames,
            "error_frames": drain.error_frames,
            "subscribers_closed_by_peer": drain.peer_closed,
            "subscribers_closed_by_peer_causes": drain.peer_close_causes,
            "window_secs": window_secs,
            "per_sec": per_sec,
        },
        "gateway": {
            "before_open": gw0, "publish_start": gw_start, "drain_end": gw_end,
            "cpu_secs": cpu,
            "cpu_secs_schedstat": cpu_precise,
            "deliveries_per_cpu_sec": per_cpu_secs,
            "deliveries_per_cpu_sec_schedstat": per_cpu_precise,
        },
        "latency_us": lat,
        "generator": {
            "rss_after_open_bytes": open.self_rss_after,
            "rss_at_close_bytes": close.self_rss,
            "cpu_secs_publish_and_drain": gen_cpu,
        },
    });
    Ok((results, t))
}

// === churn ===

fn churn(cli: &Cli, a: &ChurnArgs) -> Result<(Value, Table), Error> {
    let pids = &cli.common.gateway_pid;
    let mut parts = make_parts(cli, a.conns, a.concurrency)?;
    let timeout = Duration::from_secs(cli.common.open_timeout_secs);
    let gw0 = GatewaySample::take(pids);
    let sock0 = SockStat::take();
    let t0 = Instant::now();
    let replies = parts::all(
        &mut parts,
        &PartCmd::Churn {
            timeout_ms: timeout.as_millis() as u64,
        },
        timeout + Duration::from_secs(30),
    )
    .map_err(Error::Run)?;
    let secs = t0.elapsed().as_secs_f64();
    let gw1 = GatewaySample::take(pids);
    let sock1 = SockStat::take();
    drop(parts);
    let mut rep = ChurnReport::default();
    for r in replies {
        if let PartReply::Churned(c) = r {
            rep.merge(&c);
        }
    }
    let per_sec = rep.upgraded as f64 / secs.max(1e-9);
    let cpu = sub_opt(gw1.cpu_secs, gw0.cpu_secs);
    let cpu_precise = sub_opt(gw1.cpu_secs_precise, gw0.cpu_secs_precise);
    let per_cpu_secs = per_cpu(rep.upgraded, cpu);
    let per_cpu_precise = per_cpu(rep.upgraded, cpu_precise);
    let lat = Percentiles::of(&rep.upgrade_us.to_hist());
    let f = &rep.failures;

    let mut t = Table::default();
    t.section("churn");
    t.row("connections requested", thousands(rep.requested));
    t.row("concurrency", a.concurrency);
    t.row("upgraded (welcome received)", thousands(rep.upgraded));
    t.row("failed", f.summary());
    t.row("elapsed", format!("{secs:.2} s"));
    t.row("upgrades/s", format!("{per_sec:.0}"));
    t.row("gateway CPU", opt_num(cpu, |c| format!("{c:.2} s")));
    t.row(
        "upgrades per gateway CPU-second",
        opt_num(per_cpu_secs, |v| format!("{v:.0}")),
    );
    t.row(
        "upgrades per gateway CPU-second (schedstat)",
        opt_num(per_cpu_precise, |v| format!("{v:.0}")),
    );
    if let (Some(s0), Some(s1)) = (sock0, sock1) {
        t.row(
            "TCP TIME_WAIT before → after",
            format!("{} → {}", s0.tcp_tw, s1.tcp_tw),
        );
    }
    t.row("generator CPU", format!("{:.2} s", rep.self_cpu_secs));
    t.percentiles("connect→welcome", &lat);

    let results = json!({
        "conns_requested": a.conns,
        "concurrency": a.concurrency,
        "upgraded": rep.upgraded,
        "failed": f.total(),
        "failures": rep.failures,
        "secs": secs,
        "upgrades_per_sec": per_sec,
        "gateway": {
            "before": gw0, "after": gw1,
            "cpu_secs": cpu,
            "cpu_secs_schedstat": cpu_precise,
            "upgrades_per_cpu_sec": per_cpu_secs,
            "upgrades_per_cpu_sec_schedstat": per_cpu_precise,
        },
        "connect_to_welcome_us": lat,
        "generator_cpu_secs": rep.self_cpu_secs,
        "kernel": { "sockstat_before": sock0, "sockstat_after": sock1 },
    });
    Ok((results, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_loopback() {
        let t = parse_url("ws://127.0.0.1:18080/ws").unwrap();
        assert_eq!(t.addr, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(t.path, "/ws");
        assert_eq!(t.host, "127.0.0.1:18080");
        assert!(parse_url("ws://10.0.0.1:80/ws").is_err());
        assert!(parse_url("http://127.0.0.1/ws").is_err());
        assert!(resolve("127.0.0.9:1").is_ok());
    }

    #[test]
    fn accounting_finds_loss_and_duplicates() {
        // Two topics: 3 subscribers on topic 0, 1 on topic 1; seqs 0..4 sent.
        let rpt = [3, 1];
        let counts = [3, 1, 2, 3, 0, 0, 1];
        let refused: HashSet<u64> = [4].into();
        let none = HashSet::new();
        let acc = account(&counts, 5, &rpt, &refused, &none);
        // seq 2 lost 1, seq 3 (topic 1, 1 sub) has 2 duplicates, seq 6 unexpected.
        assert_eq!(
            acc,
            Accounting {
                expected: 3 + 1 + 3 + 1,
                lost: 1,
                duplicates: 2,
                unexpected: 1,
                of_unacked: 0,
            }
        );
        let unacked: HashSet<u64> = [2].into();
        let acc = account(&counts, 5, &rpt, &refused, &unacked);
        assert_eq!(acc.lost, 0);
        assert_eq!(acc.of_unacked, 2);
    }
}
