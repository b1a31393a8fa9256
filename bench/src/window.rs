//! The closed-loop window of `fanout --rate 0 --window K`: message n is published only
//! once message n − K reached every subscriber of its topic. So the publisher goes as
//! fast as the server delivers to everyone, not as fast as it accepts publishes, and a
//! server that takes publishes faster than it delivers gains nothing from it.
//!
//! Client threads (in this process or in child processes) count deliveries per message
//! in counters shared through a mapped file, one slot per message modulo [`SLOTS`]; the
//! publisher reads them. The parent creates the file and names it in [`ENV`] for the
//! client parts.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use crate::sys::SharedCounters;

/// Names the counter file for client parts.
pub const ENV: &str = "RINGWAY_BENCH_WINDOW_FILE";
/// Counter slots: messages n and n + SLOTS share one, so a window must stay below it.
pub const SLOTS: u64 = 1 << 16;
/// A message nobody will receive (refused or unacknowledged): its slot reads as done.
const GIVEN_UP: u32 = u32::MAX;

pub struct Window {
    counters: SharedCounters,
    /// The creator removes the file.
    owned: Option<PathBuf>,
}

impl Window {
    /// Creates the counter file (in /dev/shm when there is one) and names it in [`ENV`]
    /// for the client parts started after this.
    pub fn create() -> Result<Self, String> {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ringway-bench-window-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        file.set_len(SLOTS * 4).map_err(|e| e.to_string())?;
        let counters = SharedCounters::map(&file, SLOTS as usize).map_err(|e| e.to_string())?;
        std::env::set_var(ENV, &path);
        Ok(Self {
            counters,
            owned: Some(path),
        })
    }

    /// The window named in [`ENV`], if any (in a client part).
    pub fn from_env() -> Result<Option<Self>, String> {
        let Some(path) = std::env::var_os(ENV) else {
            return Ok(None);
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", PathBuf::from(&path).display()))?;
        let counters = SharedCounters::map(&file, SLOTS as usize).map_err(|e| e.to_string())?;
        Ok(Some(Self {
            counters,
            owned: None,
        }))
    }

    /// A subscriber received message `seq`.
    pub fn delivered(&self, seq: u64) {
        self.counters.at(seq).fetch_add(1, Ordering::Relaxed);
    }

    /// Whether message `seq` reached `subscribers` subscribers (or was given up).
    pub fn reached(&self, seq: u64, subscribers: u32) -> bool {
        self.counters.at(seq).load(Ordering::Acquire) >= subscribers
    }

    /// Message `seq` is about to be sent: its slot starts from zero.
    pub fn sending(&self, seq: u64) {
        self.counters.at(seq).store(0, Ordering::Release);
    }

    /// Message `seq` will reach nobody (refused, or its answer never came).
    pub fn give_up(&self, seq: u64) {
        self.counters.at(seq).store(GIVEN_UP, Ordering::Release);
    }
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(path) = &self.owned {
            let _ = std::fs::remove_file(path);
        }
    }
}
