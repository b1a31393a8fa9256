//! When each identified connection's token runs out: the shard's sweeper closes a
//! connection (4001, "token expired") once its token's `exp` plus the leeway has
//! passed, unless a `refresh` moved it. Ordered by time, so a sweep costs the
//! connections due, not every connection.

use std::collections::{BTreeSet, HashMap};

use crate::registry::ConnKey;

/// Expiry times (Unix seconds, leeway included) of the shard's identified connections.
#[derive(Debug, Default)]
pub struct Expiries {
    by_time: BTreeSet<(u64, ConnKey)>,
    by_conn: HashMap<ConnKey, u64>,
}

impl Expiries {
    /// Connection `key` is to be closed at `at` (replacing any earlier time).
    pub fn set(&mut self, key: ConnKey, at: u64) {
        if let Some(old) = self.by_conn.insert(key, at) {
            self.by_time.remove(&(old, key));
        }
        self.by_time.insert((at, key));
    }

    /// Connection `key` is gone.
    pub fn forget(&mut self, key: ConnKey) {
        if let Some(old) = self.by_conn.remove(&key) {
            self.by_time.remove(&(old, key));
        }
    }

    /// Takes the connections whose time is `now` or earlier.
    pub fn due(&mut self, now: u64) -> Vec<ConnKey> {
        let mut out = Vec::new();
        while let Some(&(at, key)) = self.by_time.first() {
            if at > now {
                break;
            }
            self.by_time.pop_first();
            self.by_conn.remove(&key);
            out.push(key);
        }
        out
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_in_time_order_and_a_refresh_moves_one() {
        let mut e = Expiries::default();
        e.set(1, 100);
        e.set(2, 50);
        e.set(3, 200);
        assert_eq!(e.due(49), Vec::<ConnKey>::new());
        assert_eq!(e.due(100), vec![2, 1]);
        e.set(3, 300);
        assert_eq!(e.due(250), Vec::<ConnKey>::new(), "refreshed");
        e.set(4, 10);
        e.forget(4);
        assert_eq!(e.due(300), vec![3]);
        assert!(e.is_empty());
    }
}
