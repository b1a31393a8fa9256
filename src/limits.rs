//! Limits on what one client may take at the edge: connections per client address and
//! per user, counted node-wide ([`Tally`], for `max_connections_per_ip` and
//! `max_connections_per_user`), and the messages a connection may send per second
//! ([`Bucket`], a token bucket for `client_messages_per_sec` and `client_burst`, with
//! the strikes that `rate_limit_strikes` closes it after).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// Connections open per key (a client address, a user id) on this node.
#[derive(Debug)]
pub struct Tally<K>(Mutex<HashMap<K, u32>>);

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq> Tally<K> {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        // Every update is one insert, increment or removal: a panic elsewhere cannot
        // leave the map half-updated.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more connection of `key`, unless it has `max` already (0: no cap).
    pub fn try_add<Q>(&self, key: &Q, max: usize) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut map = self.map();
        match map.get_mut(key) {
            Some(n) if max > 0 && *n as usize >= max => false,
            Some(n) => {
                *n += 1;
                true
            }
            None => {
                map.insert(key.to_owned(), 1);
                true
            }
        }
    }

    /// One connection of `key` is gone.
    pub fn remove<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.map();
        if let Some(n) = map.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                map.remove(key);
            }
        }
    }

    /// Keys with at least one connection.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A connection's message budget: `rate` messages a second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Messages it may send now.
    tokens: f32,
    /// When `tokens` was last brought up to date (milliseconds of the shard's clock).
    stamp_ms: u32,
    /// Messages refused since the bucket was last full.
    strikes: u32,
}

/// What a connection's message gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Refused (`rate_limited`); the connection stays.
    Limited,
    /// Refused `strikes` times since the bucket was last full: close it.
    Strikeout,
}

/// The limit in force: `client_messages_per_sec`, `client_burst`, `rate_limit_strikes`.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub per_sec: u32,
    pub burst: u32,
    pub strikes: u32,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub fn full(rate: Rate, now_ms: u32) -> Self {
        Self {
            tokens: rate.burst as f32,
            stamp_ms: now_ms,
            strikes: 0,
        }
    }

    /// Takes one message at `now_ms`.
    pub fn admit(&mut self, rate: Rate, now_ms: u32) -> Admit {
        let elapsed = now_ms.wrapping_sub(self.stamp_ms);
        self.stamp_ms = now_ms;
        let burst = rate.burst as f32;
        self.tokens = (self.tokens + elapsed as f32 * rate.per_sec as f32 / 1000.0).min(burst);
        if self.tokens >= burst {
            self.strikes = 0;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Admit::Yes;
        }
        self.strikes = self.strikes.saturating_add(1);
        if rate.strikes > 0 && self.strikes >= rate.strikes {
            Admit::Strikeout
        } else {
            Admit::Limited
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn a_tally_caps_each_key_and_forgets_it_at_zero() {
        let t: Tally<IpAddr> = Tally::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(t.try_add(&a, 2) && t.try_add(&a, 2));
        assert!(!t.try_add(&a, 2), "a third connection from a");
        assert!(t.try_add(&b, 2), "b has its own count");
        t.remove(&a);
        assert!(t.try_add(&a, 2), "room again after a close");
        t.remove(&a);
        t.remove(&a);
        t.remove(&b);
        assert!(t.is_empty());
        // 0 is no cap, and still counts.
        let users: Tally<String> = Tally::default();
        for _ in 0..100 {
            assert!(users.try_add("alice", 0));
        }
        assert!(!users.try_add("alice", 100));
        assert_eq!(users.len(), 1);
    }

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate_and_strikes_out() {
        let rate = Rate {
            per_sec: 10,
            burst: 5,
            strikes: 3,
        };
        let mut b = Bucket::full(rate, 0);
        for _ in 0..5 {
            assert_eq!(b.admit(rate, 0), Admit::Yes);
        }
        assert_eq!(b.admit(rate, 0), Admit::Limited);
        // 100 ms at 10 a second is one more message.
        assert_eq!(b.admit(rate, 100), Admit::Yes);
        assert_eq!(b.admit(rate, 100), Admit::Limited);
        assert_eq!(b.admit(rate, 100), Admit::Strikeout);
        // Full again (half a second), the strikes are forgiven.
        let mut b = Bucket::full(rate, 0);
        for _ in 0..5 {
            b.admit(rate, 0);
        }
        assert_eq!(b.admit(rate, 0), Admit::Limited);
        assert_eq!(b.admit(rate, 0), Admit::Limited);
        assert_eq!(b.admit(rate, 600), Admit::Yes);
        assert_eq!(b.admit(rate, 600), Admit::Yes);
        for _ in 0..3 {
            b.admit(rate, 600);
        }
        assert_eq!(b.admit(rate, 600), Admit::Limited, "strikes started over");
    }

    #[test]
    fn a_steady_client_at_the_rate_is_never_refused() {
        let rate = Rate {
            per_sec: 100,
            burst: 1,
            strikes: 1,
        };
        let mut b = Bucket::full(rate, u32::MAX - 500);
        let mut now = u32::MAX - 500;
        for _ in 0..1000 {
            now = now.wrapping_add(10);
            assert_eq!(b.admit(rate, now), Admit::Yes, "the clock wrapped at {now}");
        }
    }
}
