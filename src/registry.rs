//! Per-shard topic table, indexed both ways: topic → connections and connection →
//! topics. Pure: it reports when a topic gains its first or loses its last local
//! subscriber, and the shard decides what that means (nothing for the in-process
//! broker; SUBSCRIBE/UNSUBSCRIBE for a backplane).
//!
//! Each topic also holds its delivery log on this shard (`shard::topic_log`), made at
//! its first message.
//!
//! Cost: subscribe and unsubscribe are O(1) hash operations; removing a connection is
//! O(its topics). A topic's entry is freed when its last subscriber leaves.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use crate::shard::topic_log::TopicLog;

/// Index of a connection in its shard's slab.
pub type ConnKey = usize;

/// What a subscribe or unsubscribe changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing changed (already subscribed / not subscribed).
    None,
    /// The connection was added to or removed from a topic others still hold.
    Updated,
    /// First subscriber on this shard (subscribe) or last one gone (unsubscribe).
    TopicEdge,
}

/// Why a subscribe was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeError {
    TooMany,
}

/// One topic's subscribers on this shard.
#[derive(Default)]
struct Topic {
    conns: HashSet<ConnKey>,
    log: Option<Rc<TopicLog>>,
}

#[derive(Default)]
pub struct Registry {
    by_topic: HashMap<Rc<str>, Topic>,
    by_conn: HashMap<ConnKey, Vec<Rc<str>>>,
    subscriptions: usize,
}

impl Registry {
    /// Adds `conn` to `topic` unless it already holds `max_per_conn` topics.
    pub fn subscribe(
        &mut self,
        conn: ConnKey,
        topic: &str,
        max_per_conn: usize,
    ) -> Result<Change, SubscribeError> {
        // Most connections hold one topic: start the list at one slot, not four.
        let topics = self
            .by_conn
            .entry(conn)
            .or_insert_with(|| Vec::with_capacity(1));
        if topics.iter().any(|t| &**t == topic) {
            return Ok(Change::None);
        }
        if topics.len() >= max_per_conn {
            if topics.is_empty() {
                self.by_conn.remove(&conn);
            }
            return Err(SubscribeError::TooMany);
        }
        let (name, set) = match self.by_topic.get_key_value(topic) {
            Some((name, _)) => (name.clone(), None),
            None => (Rc::<str>::from(topic), Some(Topic::default())),
        };
        topics.push(name.clone());
        let edge = set.is_some();
        let set = match set {
            Some(s) => self.by_topic.entry(name).or_insert(s),
            None => self.by_topic.get_mut(topic).expect("present"),
        };
        set.conns.insert(conn);
        self.subscriptions += 1;
        Ok(if edge {
            Change::TopicEdge
        } else {
            Change::Updated
        })
    }

    /// Removes `conn` from `topic`.
    pub fn unsubscribe(&mut self, conn: ConnKey, topic: &str) -> Change {
        let Some(topics) = self.by_conn.get_mut(&conn) else {
            return Change::None;
        };
        let Some(pos) = topics.iter().position(|t| &**t == topic) else {
            return Change::None;
        };
        topics.swap_remove(pos);
        if topics.is_empty() {
            self.by_conn.remove(&conn);
        }
        self.remove_from_topic(conn, topic)
    }

    /// Removes `conn` from every topic; returns the topics that lost their last local
    /// subscriber.
    pub fn remove_conn(&mut self, conn: ConnKey) -> Vec<Rc<str>> {
        let mut emptied = Vec::new();
        for topic in self.by_conn.remove(&conn).unwrap_or_default() {
            if self.remove_from_topic(conn, &topic) == Change::TopicEdge {
                emptied.push(topic);
            }
        }
        emptied
    }

    fn remove_from_topic(&mut self, conn: ConnKey, topic: &str) -> Change {
        let Some(set) = self.by_topic.get_mut(topic) else {
            return Change::None;
        };
        if !set.conns.remove(&conn) {
            return Change::None;
        }
        self.subscriptions -= 1;
        if set.conns.is_empty() {
            self.by_topic.remove(topic);
            Change::TopicEdge
        } else {
            Change::Updated
        }
    }

    /// Every topic with a local subscriber.
    pub fn topic_names(&self) -> impl Iterator<Item = &Rc<str>> {
        self.by_topic.keys()
    }

    /// Local subscribers of `topic`.
    pub fn subscribers(&self, topic: &str) -> Option<&HashSet<ConnKey>> {
        self.by_topic.get(topic).map(|t| &t.conns)
    }

    /// Local subscribers of `topic` and its delivery log (made now if it has none).
    pub fn delivery(&mut self, topic: &str) -> Option<(&HashSet<ConnKey>, &Rc<TopicLog>)> {
        let t = self.by_topic.get_mut(topic)?;
        let log = t.log.get_or_insert_with(TopicLog::new);
        Some((&t.conns, log))
    }

    /// `topic`'s delivery log, if it has had a message.
    pub fn log(&self, topic: &str) -> Option<&Rc<TopicLog>> {
        self.by_topic.get(topic).and_then(|t| t.log.as_ref())
    }

    /// Topics with at least one local subscriber.
    pub fn topics(&self) -> usize {
        self.by_topic.len()
    }

    /// Total (connection, topic) pairs.
    pub fn subscriptions(&self) -> usize {
        self.subscriptions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_are_reported_once() {
        let mut r = Registry::default();
        assert_eq!(r.subscribe(1, "a", 10), Ok(Change::TopicEdge));
        assert_eq!(r.subscribe(2, "a", 10), Ok(Change::Updated));
        assert_eq!(r.subscribe(2, "a", 10), Ok(Change::None));
        assert_eq!(r.subscriptions(), 2);
        assert_eq!(r.unsubscribe(1, "a"), Change::Updated);
        assert_eq!(r.unsubscribe(1, "a"), Change::None);
        assert_eq!(r.unsubscribe(2, "a"), Change::TopicEdge);
        assert_eq!(r.topics(), 0);
        assert_eq!(r.subscriptions(), 0);
    }

    #[test]
    fn limit_per_connection() {
        let mut r = Registry::default();
        assert!(r.subscribe(1, "a", 2).is_ok());
        assert!(r.subscribe(1, "b", 2).is_ok());
        assert_eq!(r.subscribe(1, "c", 2), Err(SubscribeError::TooMany));
        assert_eq!(r.subscribe(1, "a", 2), Ok(Change::None));
        assert_eq!(r.subscribe(9, "x", 0), Err(SubscribeError::TooMany));
        assert!(!r.by_conn.contains_key(&9));
    }

    #[test]
    fn removing_a_connection_frees_emptied_topics() {
        let mut r = Registry::default();
        r.subscribe(1, "a", 10).unwrap();
        r.subscribe(1, "b", 10).unwrap();
        r.subscribe(2, "b", 10).unwrap();
        let mut emptied: Vec<String> = r.remove_conn(1).iter().map(|t| t.to_string()).collect();
        emptied.sort();
        assert_eq!(emptied, vec!["a"]);
        assert_eq!(r.subscribers("b").map(|s| s.len()), Some(1));
        assert!(r.subscribers("a").is_none());
        assert_eq!(r.subscriptions(), 1);
        assert!(r.remove_conn(1).is_empty());
    }
}
