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
    out
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
