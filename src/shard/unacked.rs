//! Direct messages not yet acknowledged, per user, for a single node: what a user's
//! next connection is given again (at least once), until the client acknowledges it
//! with `{"op":"ack","id":…}` (cumulative) or it ages out.
//!
//! One map for the node behind one lock: a direct send stores its message while it
//! holds the lock across the directory lookup, and a connection reads what waits for
//! its user under the same lock after joining the directory. So a message is either
//! routed to the new connection live or found waiting by it, never neither.
//! Bounded per user by `direct_inbox_size` (the oldest is dropped, and counted) and by
//! age (`direct_inbox_ttl_secs`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::value::RawValue;

use crate::metrics::Counter;
use crate::protocol::MessageId;

/// The bounds in force (0 in either turns storing off).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub size: usize,
    pub ttl: Duration,
}

impl Bounds {
    /// The bounds in force in `cfg`.
    pub fn of(cfg: &crate::config::Config) -> Self {
        Self {
            size: cfg.direct_inbox_size,
            ttl: Duration::from_secs(cfg.direct_inbox_ttl_secs),
        }
    }

    pub fn off(self) -> bool {
        self.size == 0 || self.ttl.is_zero()
    }
}

/// A stored direct message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub id: MessageId,
    pub id_text: Arc<str>,
    pub data: Arc<RawValue>,
    at: Instant,
}

type Inboxes = HashMap<Box<str>, VecDeque<Stored>>;

#[derive(Debug, Default)]
pub struct Unacked {
    map: Mutex<Inboxes>,
    /// Messages dropped unacknowledged because a user's inbox was full.
    pub dropped: Counter,
    /// Messages acknowledged.
    pub acked: Counter,
}

/// The map, held (see the module comment).
pub struct Held<'a> {
    map: MutexGuard<'a, Inboxes>,
    dropped: &'a Counter,
}

impl Held<'_> {
    /// Keeps message `id` for `user` until acknowledged or aged out.
    pub fn store(&mut self, user: &str, stored: &Stored, b: Bounds) {
        if b.off() {
            return;
        }
        // The user's inbox usually exists: look it up without allocating its key.
        let inbox = match self.map.get_mut(user) {
            Some(inbox) => inbox,
            None => self.map.entry(user.into()).or_default(),
        };
        inbox.push_back(stored.clone());
        while inbox.len() > b.size {
            inbox.pop_front();
            self.dropped.inc();
        }
    }
}

impl Stored {
    pub fn new(id: MessageId, id_text: Arc<str>, data: Arc<RawValue>) -> Self {
        Self {
            id,
            id_text,
            data,
            at: Instant::now(),
        }
    }
}

impl Unacked {
    pub fn hold(&self) -> Held<'_> {
        Held {
            // Every update is a push, a pop or a retain: a panic elsewhere cannot leave
            // the map half-changed.
            map: self
                .map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            dropped: &self.dropped,
        }
    }

    /// What waits for `user`, oldest first (aged-out messages are dropped first).
    pub fn pending(&self, user: &str, b: Bounds) -> Vec<Stored> {
        let mut held = self.hold();
        let Some(inbox) = held.map.get_mut(user) else {
            return Vec::new();
        };
        expire(inbox, b);
        inbox.iter().cloned().collect()
    }

    /// `user` acknowledged everything up to `upto`; returns how many went.
    pub fn ack(&self, user: &str, upto: MessageId) -> usize {
        let mut held = self.hold();
        let Some(inbox) = held.map.get_mut(user) else {
            return 0;
        };
        let before = inbox.len();
        while inbox.front().is_some_and(|m| m.id <= upto) {
            inbox.pop_front();
        }
        let gone = before - inbox.len();
        if inbox.is_empty() {
            held.map.remove(user);
        }
        self.acked.add(gone as u64);
        gone
    }

    /// Ages every inbox out; returns the messages left.
    pub fn trim(&self, b: Bounds) -> usize {
        let mut held = self.hold();
        let mut left = 0;
        held.map.retain(|_, inbox| {
            if b.off() {
                inbox.clear();
            } else {
                expire(inbox, b);
                while inbox.len() > b.size {
                    inbox.pop_front();
                }
            }
            left += inbox.len();
            !inbox.is_empty()
        });
        left
    }
}

fn expire(inbox: &mut VecDeque<Stored>, b: Bounds) {
    while inbox.front().is_some_and(|m| m.at.elapsed() >= b.ttl) {
        inbox.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        size: 3,
        ttl: Duration::from_secs(60),
    };

    fn msg(seq: u64) -> Stored {
        let data: Arc<RawValue> = Arc::from(RawValue::from_string(seq.to_string()).unwrap());
        Stored::new(
            MessageId { ms: 1, seq },
            Arc::from(format!("1-{seq}")),
            data,
        )
    }

    fn ids(v: &[Stored]) -> Vec<u64> {
        v.iter().map(|m| m.id.seq).collect()
    }

    #[test]
    fn pending_until_acknowledged_cumulatively() {
        let u = Unacked::default();
        for seq in 1..=3 {
            u.hold().store("alice", &msg(seq), B);
        }
        u.hold().store("bob", &msg(4), B);
        assert_eq!(ids(&u.pending("alice", B)), [1, 2, 3]);
        assert_eq!(u.ack("alice", MessageId { ms: 1, seq: 2 }), 2);
        assert_eq!(ids(&u.pending("alice", B)), [3]);
        assert_eq!(ids(&u.pending("bob", B)), [4]);
        assert_eq!(u.ack("alice", MessageId { ms: 1, seq: 9 }), 1);
        assert!(u.pending("alice", B).is_empty());
        assert_eq!(u.acked.get(), 3);
        assert_eq!(u.trim(B), 1);
    }

    #[test]
    fn a_full_inbox_drops_the_oldest_and_counts_it() {
        let u = Unacked::default();
        for seq in 1..=5 {
            u.hold().store("alice", &msg(seq), B);
        }
        assert_eq!(ids(&u.pending("alice", B)), [3, 4, 5]);
        assert_eq!(u.dropped.get(), 2);
    }

    #[test]
    fn off_stores_nothing_and_age_expires() {
        let u = Unacked::default();
        let off = Bounds {
            size: 0,
            ttl: Duration::from_secs(60),
        };
        u.hold().store("alice", &msg(1), off);
        assert!(u.pending("alice", B).is_empty());
        u.hold().store("alice", &msg(2), B);
        let expired = Bounds {
            size: 3,
            ttl: Duration::ZERO + Duration::from_nanos(1),
        };
        std::thread::sleep(Duration::from_millis(2));
        assert!(u.pending("alice", expired).is_empty());
        assert_eq!(u.trim(B), 0);
    }
}
