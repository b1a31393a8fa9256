//! `ringway doctor`: checks this host against what ringway needs and the `tuning/`
//! guide, and prints PASS / WARN / FAIL with the exact fix for each. Exit code: 0 when
//! everything passes, 1 when something warns, 2 when something fails.

use std::fmt;

use crate::config::{Config, Driver};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Warn => "WARN",
            Self::Fail => "FAIL",
        })
    }
}

/// One check's result.
#[derive(Debug)]
pub struct Check {
    pub level: Level,
    pub name: &'static str,
    pub detail: String,
    /// What to do about a WARN or FAIL.
    pub fix: Option<String>,
}

fn check(level: Level, name: &'static str, detail: String, fix: Option<String>) -> Check {
    Check {
        level,
        name,
        detail,
        fix,
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", path.replace('.', "/")))
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Connections the host should be ready for (the tuning guide's target).
pub const TARGET_CONNECTIONS: u64 = 1_000_000;

/// Runs every check for `cfg`.
pub fn run(cfg: &Config) -> Vec<Check> {
    let mut out = Vec::new();
    out.push(io_uring(cfg));
    out.push(file_limit());
    out.extend(sysctl_min(
        "fs.nr_open",
        1_100_000,
        "the kernel's ceiling for LimitNOFILE",
    ));
    out.extend(sysctl_min(
        "fs.epoll.max_user_watches",
        1_100_000,
        "one watch per connection in the shards' epoll sets",
    ));
    out.extend(sysctl_min(
        "net.core.somaxconn",
        u64::from(cfg.backlog),
        "caps each shard's listen backlog",
    ));
    out.extend(sysctl_min(
        "net.ipv4.tcp_max_syn_backlog",
        65_535,
        "half-open connections during reconnect storms",
    ));
    out.extend(sysctl_min(
        "net.ipv4.tcp_migrate_req",
        1,
        "a restart beside the old process resets no queued connection",
    ));
    out.push(cpus(cfg));
    out.extend(redis(cfg));
    out.extend(sentinels(cfg));
    out.extend(redis_cluster(cfg));
    out
}

/// Oldest Redis ringway works with: it loads its Lua library with FUNCTION LOAD.
const REDIS_MIN: (u32, u32) = (7, 0);

/// Reachability, credentials and version of the configured Redis.
fn redis(cfg: &Config) -> Option<Check> {
    let url = cfg.redis.as_deref()?;
    let fail =
        |detail: String, fix: &str| Some(check(Level::Fail, "redis", detail, Some(fix.into())));
    let parsed = match crate::backplane::RedisUrl::parse(url) {
        Ok(u) => u,
        Err(e) => return fail(format!("{url}: {e}"), "fix the `redis` option"),
    };
    let place = parsed.describe();
    match redis_version(&parsed) {
        Ok((at, version)) => {
            let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
            let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
            if (major, minor) >= REDIS_MIN {
                Some(check(
                    Level::Pass,
                    "redis",
                    format!("{place}: {at} answers, Redis {version}"),
                    None,
                ))
            } else {
                fail(
                    format!("{place}: {at} is Redis {version}: functions need 7.0"),
                    "upgrade Redis to 7.0 or later (ringway loads its Lua functions with FUNCTION LOAD)",
                )
            }
        }
        Err(e) => fail(
            format!("{place}: {e}"),
            "start Redis or correct the `redis` URL (and its user/password); ringway itself starts anyway, answers 503 on /readyz and keeps retrying",
        ),
    }
}

/// With `redis+sentinel://`: whether every Sentinel answers and all name the same
/// master (a failover needs a quorum of them; one that is down or disagrees is a risk
/// worth knowing before it matters).
fn sentinels(cfg: &Config) -> Option<Check> {
    let url = crate::backplane::RedisUrl::parse(cfg.redis.as_deref()?).ok()?;
    if !matches!(url.target, crate::backplane::Target::Sentinel { .. }) {
        return None;
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .ok()?;
    let answers = rt.block_on(crate::backplane::sentinel::ask_each(&url));
    let total = answers.len();
    let mut masters: Vec<String> = Vec::new();
    let mut problems = Vec::new();
    for (sentinel, answer) in answers {
        match answer {
            Ok(Some(master)) => masters.push(master.to_string()),
            Ok(None) => problems.push(format!("{sentinel} does not know that master")),
            Err(e) => problems.push(format!("{sentinel}: {e}")),
        }
    }
    let answered = masters.len();
    masters.sort();
    masters.dedup();
    if problems.is_empty() && masters.len() == 1 {
        return Some(check(
            Level::Pass,
            "sentinel",
            format!("{answered} of {total} Sentinels name {}", masters[0]),
            None,
        ));
    }
    if masters.len() > 1 {
        problems.push(format!("they disagree: {}", masters.join(" vs ")));
    }
    let level = if answered == 0 {
        Level::Fail
    } else {
        Level::Warn
    };
    Some(check(
        level,
        "sentinel",
        format!("{answered} of {total} Sentinels answer; {}", problems.join("; ")),
        Some("start or fix the Sentinels named, or list the right ones in the `redis` URL (a failover needs a quorum of them)".into()),
    ))
}

/// With `redis+cluster://`: whether the seeds answer with a map that serves every slot,
/// and whether every master the map names answers (the gateway connects to each).
fn redis_cluster(cfg: &Config) -> Option<Check> {
    let url = crate::backplane::RedisUrl::parse(cfg.redis.as_deref()?).ok()?;
    if !url.is_cluster() {
        return None;
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .ok()?;
    let timeout = std::time::Duration::from_secs(3);
    let report = rt.block_on(crate::backplane::masters::ask_seeds(&url, timeout));
    let mut problems = Vec::new();
    let mut answered = 0;
    for (seed, answer) in &report.seeds {
        match answer {
            Ok(_) => answered += 1,
            Err(e) => problems.push(format!("seed {seed}: {e}")),
        }
    }
    let reached = report.masters.iter().filter(|(_, a)| a.is_ok()).count();
    for (master, answer) in &report.masters {
        if let Err(e) = answer {
            problems.push(format!("master {master}: {e}"));
        }
    }
    let total = report.seeds.len();
    let summary = format!(
        "{answered} of {total} seeds answer; {reached} of {} masters serving every slot answer",
        report.masters.len()
    );
    if problems.is_empty() {
        return Some(check(Level::Pass, "cluster", summary, None));
    }
    let level = if answered == 0 || reached < report.masters.len() {
        Level::Fail
    } else {
        Level::Warn
    };
    Some(check(
        level,
        "cluster",
        format!("{summary}: {}", problems.join("; ")),
        Some("list reachable cluster nodes in the `redis` URL, and check that every master is up and reachable from this host (ringway connects to each)".into()),
    ))
}

/// Connects as the gateway would (TLS, Sentinel, AUTH, SELECT, the master's role) and
/// asks `INFO server`: the server answering and its `redis_version`.
fn redis_version(url: &crate::backplane::RedisUrl) -> Result<(String, String), String> {
    use crate::backplane::link::{encode, Link};
    use redis_protocol::resp2::types::BytesFrame;
    let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let mut link = Link::connect(url, std::time::Duration::from_secs(3), None)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = bytes::BytesMut::new();
        encode(&mut out, &[b"INFO", b"server"]);
        link.write(out.freeze()).await.map_err(|e| e.to_string())?;
        let reply = monoio::time::timeout(std::time::Duration::from_secs(3), link.next_frame())
            .await
            .map_err(|_| "no answer to INFO".to_string())?
            .map_err(|e| e.to_string())?;
        let BytesFrame::BulkString(info) = reply else {
            return Err(format!("unexpected reply to INFO: {reply:?}"));
        };
        let version = String::from_utf8_lossy(&info)
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| "INFO has no redis_version".to_string())?;
        Ok((link.addr.to_string(), version))
    })
}

fn io_uring(cfg: &Config) -> Check {
    let available = monoio::utils::detect_uring();
    let disabled = read_sysctl("kernel.io_uring_disabled").unwrap_or_else(|| "absent".into());
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "?".into());
    let container = std::path::Path::new("/.dockerenv").exists()
        || std::path::Path::new("/run/.containerenv").exists();
    let detail = format!(
        "io_uring {}; kernel.io_uring_disabled={disabled}; seccomp mode {seccomp}{}",
        if available {
            "available"
        } else {
            "unavailable"
        },
        if container {
            "; inside a container"
        } else {
            ""
        }
    );
    match (available, cfg.driver) {
        (true, Driver::Epoll) => check(Level::Pass, "io_uring", detail + "; driver = epoll by configuration", None),
        (true, _) => check(Level::Pass, "io_uring", detail + "; shards will use io_uring", None),
        (false, Driver::IoUring) => check(
            Level::Fail,
            "io_uring",
            detail + "; driver = io_uring will refuse to start",
            Some("set driver = \"auto\" or \"epoll\", or allow io_uring: sysctl kernel.io_uring_disabled=0, and a seccomp profile that permits io_uring_setup/io_uring_enter/io_uring_register".into()),
        ),
        (false, _) => check(
            Level::Warn,
            "io_uring",
            detail + "; shards will fall back to epoll",
            Some("for io_uring: kernel >= 5.6, sysctl kernel.io_uring_disabled=0, and a seccomp profile that permits io_uring_setup/io_uring_enter/io_uring_register (Docker's default blocks them)".into()),
        ),
    }
}

fn file_limit() -> Check {
    match crate::sys::nofile_limit() {
        Ok((_, hard)) if hard >= TARGET_CONNECTIONS => {
            check(Level::Pass, "file limit", format!("hard RLIMIT_NOFILE {hard}"), None)
        }
        Ok((_, hard)) => check(
            Level::Warn,
            "file limit",
            format!("hard RLIMIT_NOFILE {hard}: at most about {} connections per process", hard.saturating_sub(64)),
            Some("LimitNOFILE=1048576 in the systemd unit (systemd/ringway.service), or `ulimit -Hn 1048576` as root; where it cannot be raised, run several processes on the same port".into()),
        ),
        Err(e) => check(Level::Fail, "file limit", format!("cannot read RLIMIT_NOFILE: {e}"), None),
    }
}

fn sysctl_min(name: &'static str, min: u64, why: &str) -> Option<Check> {
    let value = read_sysctl(name)?;
    let n: u64 = value.parse().ok()?;
    Some(if n >= min {
        check(Level::Pass, name, format!("{n} (>= {min}: {why})"), None)
    } else {
        check(
            Level::Warn,
            name,
            format!("{n} (< {min}: {why})"),
            Some(format!("sysctl -w {name}={min}, and persist it with tuning/99-ringway.conf in /etc/sysctl.d/")),
        )
    })
}

fn cpus(cfg: &Config) -> Check {
    let cpus = crate::sys::allowed_cpus().len();
    let shards = if cfg.shards == 0 { cpus } else { cfg.shards };
    if shards <= cpus {
        check(
            Level::Pass,
            "shards",
            format!("{shards} shard(s) on {cpus} CPU(s) in the affinity mask"),
            None,
        )
    } else {
        check(
            Level::Warn,
            "shards",
            format!("{shards} shards on {cpus} CPU(s): shards will share CPUs"),
            Some(format!("shards = {cpus} (or 0 for one per CPU)")),
        )
    }
}

/// Prints the checks; returns the worst level.
pub fn print(checks: &[Check]) -> Level {
    for c in checks {
        println!("{:<4}  {:<30} {}", c.level, c.name, c.detail);
        if let Some(fix) = &c.fix {
            println!("      {:<30} fix: {fix}", "");
        }
    }
    checks.iter().map(|c| c.level).max().unwrap_or(Level::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worst_level_wins() {
        let checks = vec![
            check(Level::Pass, "a", String::new(), None),
            check(Level::Warn, "b", String::new(), Some("x".into())),
        ];
        assert_eq!(print(&checks), Level::Warn);
        assert!(Level::Fail > Level::Warn && Level::Warn > Level::Pass);
    }

    #[test]
    fn every_check_runs_on_this_host() {
        let checks = run(&Config::default());
        let names: Vec<_> = checks.iter().map(|c| c.name).collect();
        for n in ["io_uring", "file limit", "net.core.somaxconn", "shards"] {
            assert!(names.contains(&n), "{names:?}");
        }
        assert!(
            checks
                .iter()
                .all(|c| c.level == Level::Pass || c.fix.is_some()),
            "every WARN/FAIL says how to fix it"
        );
    }
}
