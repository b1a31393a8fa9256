//! systemd's notify protocol (sd_notify): `READY=1` once every shard listens,
//! `STOPPING=1` when the drain starts, and `WATCHDOG=1` pings while every shard's
//! sweeper keeps ticking. Without `NOTIFY_SOCKET` (not under systemd, or not
//! `Type=notify`) every call is a no-op.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::shard::Node;

/// Sends one notification (`KEY=VALUE` lines); `Ok(false)` when there is no socket.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())?
        }
        None => SocketAddr::from_pathname(&path)?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this pid), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval while every shard's sweeper has ticked
/// since the last ping; stops when `stop` is set. A stuck shard stops the pings, and
/// systemd restarts the service.
pub fn spawn_watchdog(
    node: Arc<Node>,
    interval: Duration,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("ringway-watchdog".into())
        .spawn(move || {
            let period = interval / 2;
            let mut last: Vec<u64> = node.shards.iter().map(|s| s.metrics.sweeps.get()).collect();
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(period);
                let now: Vec<u64> = node.shards.iter().map(|s| s.metrics.sweeps.get()).collect();
                // Sweepers tick once a second: below that period a shard may rightly not
                // have ticked, so the check needs WatchdogSec >= 2 s to mean anything.
                let healthy =
                    period < Duration::from_secs(1) || now.iter().zip(&last).all(|(n, l)| n > l);
                if healthy {
                    let _ = notify("WATCHDOG=1");
                } else {
                    tracing::error!("a shard stopped ticking: withholding the watchdog ping");
                }
                last = now;
            }
        })?;
    Ok(())
}
