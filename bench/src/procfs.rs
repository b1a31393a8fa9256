//! Readings from `/proc`: a process's RSS and CPU time, the kernel's socket counters
//! (`/proc/net/sockstat`, per network namespace) and slab size (`/proc/meminfo`,
//! machine-wide). Every reader returns `None` rather than failing: a figure that cannot
//! be read is reported as missing, never as zero.

use serde::{Deserialize, Serialize};

/// RSS of `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kb(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// RSS of this process in bytes.
pub fn self_rss_bytes() -> Option<u64> {
    status_kb("/proc/self/status", "VmRSS:")
}

fn status_kb(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU seconds (user + system, all threads, living and exited) used by `pid`, from
/// `/proc/PID/stat` fields 14 and 15 divided by `CLK_TCK` (10 ms resolution at 100 Hz).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14 → index 11, stime field 15 → 12.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / crate::sys::clock_ticks() as f64)
}

/// CPU seconds used by this process so far.
pub fn self_cpu_secs() -> f64 {
    cpu_secs(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds of the living threads of `pid` at nanosecond resolution (sum of the
/// first field of `/proc/PID/task/*/schedstat`). Threads that exited are missing, which
/// is fine for a gateway whose threads live as long as it does.
pub fn cpu_secs_precise(pid: u32) -> Option<f64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut ns: u64 = 0;
    for e in dir.flatten() {
        // A thread can exit between the listing and the read: skip it rather than lose
        // the whole sample (its CPU time is then missing from the sum).
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue;
        };
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// A sample of the processes under test (summed over all pids given).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GatewaySample {
    pub rss_bytes: Option<u64>,
    pub cpu_secs: Option<f64>,
    pub cpu_secs_precise: Option<f64>,
}

impl GatewaySample {
    /// Reads every pid; a figure is `None` if any pid could not be read (or none given).
    pub fn take(pids: &[u32]) -> Self {
        if pids.is_empty() {
            return Self::default();
        }
        let sum_u = |f: fn(u32) -> Option<u64>| pids.iter().map(|p| f(*p)).sum::<Option<u64>>();
        let sum_f = |f: fn(u32) -> Option<f64>| pids.iter().map(|p| f(*p)).sum::<Option<f64>>();
        Self {
            rss_bytes: sum_u(rss_bytes),
            cpu_secs: sum_f(cpu_secs),
            cpu_secs_precise: sum_f(cpu_secs_precise),
        }
    }
}

/// The `TCP:` line of `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SockStat {
    pub tcp_inuse: u64,
    pub tcp_orphan: u64,
    pub tcp_tw: u64,
    pub tcp_alloc: u64,
    /// Pages of socket buffer memory charged to TCP (`mem`).
    pub tcp_mem_pages: u64,
    pub tcp_mem_bytes: u64,
}

impl SockStat {
    /// Reads `/proc/net/sockstat` of this process's network namespace.
    pub fn take() -> Option<Self> {
        let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let line = s.lines().find(|l| l.starts_with("TCP:"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let get = |name: &str| -> Option<u64> {
            let i = f.iter().position(|w| *w == name)?;
            f.get(i + 1)?.parse().ok()
        };
        let pages = get("mem")?;
        Some(Self {
            tcp_inuse: get("inuse")?,
            tcp_orphan: get("orphan").unwrap_or(0),
            tcp_tw: get("tw").unwrap_or(0),
            tcp_alloc: get("alloc").unwrap_or(0),
            tcp_mem_pages: pages,
            tcp_mem_bytes: pages * crate::sys::page_size(),
        })
    }
}

/// Kernel slab memory in bytes (`Slab:` of `/proc/meminfo`; machine-wide).
pub fn slab_bytes() -> Option<u64> {
    status_kb("/proc/meminfo", "Slab:")
}

/// Facts about the host, stated with every result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub mem_total_bytes: Option<u64>,
    pub nofile_limit: Option<u64>,
    pub ip_local_port_range: String,
}

impl Host {
    pub fn take(nofile: Option<u64>) -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        Self {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_total_bytes: status_kb("/proc/meminfo", "MemTotal:"),
            nofile_limit: nofile,
            ip_local_port_range: read("/proc/sys/net/ipv4/ip_local_port_range")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_secs(me).is_some());
        assert!(cpu_secs_precise(me).is_some());
        assert!(SockStat::take().is_some());
        let s = GatewaySample::take(&[me, me]);
        assert!(s.rss_bytes.unwrap() >= 2 * rss_bytes(me).unwrap() / 2);
        assert!(GatewaySample::take(&[]).rss_bytes.is_none());
    }
}
