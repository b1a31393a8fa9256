//! One copy per node: each topic's Redis subscription is held by one shard of the node
//! (its *owner*, a hash of the topic), which hands every message to the sibling shards
//! that want the topic. Redis then sends a topic's message once per node, not once per
//! shard.
//!
//! A sibling asks its owner with *interest* messages through the shard inboxes, the way
//! a shard asks Redis with SUBSCRIBE: each "on" is answered exactly once, when the
//! owner's subscription is confirmed (or at once when it already is, or when an "off"
//! follows before it ever is). So the sibling's `Subscriptions` counts the answers just
//! as it counts Redis's, and a client's `subscribed` reply waits for the owner's.
//!
//! When a sibling may have missed messages (the owner's Redis connection went down, or
//! the sibling was more than `relay_buffer_bytes` behind) it is told `Lost`: it holds
//! its subscribers, asks again, and catches up from the topic's stream once answered,
//! as after its own reconnect (`replay`).
//!
//! This module is the owner's pure state: who wants each topic and who is owed an
//! answer. The messages themselves are `crate::shard::Inbox` variants.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::Rc;

/// The shard of `shards` that owns `topic`'s Redis subscription. The same on every
/// shard of the node (`DefaultHasher::new` is the same in every thread of a process).
pub fn owner(topic: &str, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut h = std::hash::DefaultHasher::new();
    topic.hash(&mut h);
    (h.finish() % shards as u64) as usize
}

/// The topics a shard owns for its siblings.
#[derive(Debug, Default)]
pub struct Owned {
    /// Siblings that want each topic (each at most once), in the order they asked.
    interested: HashMap<Rc<str>, Vec<usize>>,
    /// Answers owed per topic: one per "on" not yet answered (a sibling may be owed
    /// more than one).
    owed: HashMap<Rc<str>, Vec<usize>>,
}

impl Owned {
    /// Sibling `from` wants `topic`. Returns whether it must be answered now (when the
    /// owner's subscription is `confirmed`); otherwise the answer is owed.
    pub fn on(&mut self, topic: &Rc<str>, from: usize, confirmed: bool) -> bool {
        let who = self.interested.entry(topic.clone()).or_default();
        if !who.contains(&from) {
            who.push(from);
        }
        if confirmed {
            return true;
        }
        self.owed.entry(topic.clone()).or_default().push(from);
        false
    }

    /// Sibling `from` no longer wants `topic`. Returns how many answers it is still
    /// owed for it: they go out now, since the subscription they wait for may never
    /// come.
    pub fn off(&mut self, topic: &str, from: usize) -> usize {
        self.drop_sibling(topic, from);
        let Some(owed) = self.owed.get_mut(topic) else {
            return 0;
        };
        let before = owed.len();
        owed.retain(|&s| s != from);
        let n = before - owed.len();
        if owed.is_empty() {
            self.owed.remove(topic);
        }
        n
    }

    /// The owner's subscription to `topic` is confirmed: the answers owed for it.
    pub fn confirmed(&mut self, topic: &str) -> Vec<usize> {
        self.owed.remove(topic).unwrap_or_default()
    }

    /// The owner's subscriber connection is gone, so every interested sibling may miss
    /// messages: the (topic, sibling) pairs to tell `Lost`. They stop being interested
    /// until they ask again; owed answers stay owed.
    pub fn lost(&mut self) -> Vec<(Rc<str>, usize)> {
        let mut out = Vec::new();
        for (topic, who) in self.interested.drain() {
            out.extend(who.into_iter().map(|s| (topic.clone(), s)));
        }
        out
    }

    /// Sibling `to` no longer gets `topic`'s messages: it took its interest back, or
    /// could not take a message (it asks again after its `Lost`).
    pub fn drop_sibling(&mut self, topic: &str, to: usize) {
        if let Some(who) = self.interested.get_mut(topic) {
            who.retain(|&s| s != to);
            if who.is_empty() {
                self.interested.remove(topic);
            }
        }
    }

    /// Whether a sibling wants `topic` (so the owner keeps its Redis subscription).
    pub fn wanted(&self, topic: &str) -> bool {
        self.interested.contains_key(topic) || self.owed.contains_key(topic)
    }

    /// The siblings that get `topic`'s messages.
    pub fn siblings(&self, topic: &str) -> &[usize] {
        self.interested.get(topic).map_or(&[], Vec::as_slice)
    }

    /// Every topic a sibling wants or waits on.
    pub fn topics(&self) -> impl Iterator<Item = &Rc<str>> {
        self.interested.keys().chain(
            self.owed
                .keys()
                .filter(|t| !self.interested.contains_key(*t)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Rc<str> {
        Rc::from(s)
    }

    #[test]
    fn the_owner_is_stable_and_spreads_topics() {
        assert_eq!(owner("news", 1), 0);
        let a = owner("news", 4);
        assert_eq!(owner("news", 4), a);
        let mut seen = [0usize; 4];
        for i in 0..400 {
            seen[owner(&format!("topic-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn every_on_is_answered_exactly_once() {
        let mut o = Owned::default();
        // Not confirmed yet: owed.
        assert!(!o.on(&t("a"), 1, false));
        assert!(!o.on(&t("a"), 2, false));
        assert!(o.wanted("a"));
        assert_eq!(o.siblings("a"), &[1, 2]);
        assert_eq!(o.confirmed("a"), vec![1, 2]);
        assert_eq!(o.confirmed("a"), Vec::<usize>::new());
        // Confirmed: answered at once, nothing owed.
        assert!(o.on(&t("a"), 3, true));
        assert_eq!(o.confirmed("a"), Vec::<usize>::new());
        assert_eq!(o.siblings("a"), &[1, 2, 3]);
    }

    #[test]
    fn an_off_answers_what_is_still_owed() {
        let mut o = Owned::default();
        o.on(&t("a"), 1, false);
        o.on(&t("a"), 1, false);
        o.on(&t("a"), 2, false);
        assert_eq!(o.off("a", 1), 2);
        assert_eq!(o.siblings("a"), &[2]);
        assert_eq!(o.off("a", 2), 1);
        assert!(!o.wanted("a"));
        assert!(o.siblings("a").is_empty());
        assert_eq!(o.off("a", 2), 0);
    }

    #[test]
    fn a_lost_subscription_tells_every_sibling_and_keeps_what_is_owed() {
        let mut o = Owned::default();
        o.on(&t("a"), 1, true);
        o.on(&t("b"), 2, false);
        let mut lost = o.lost();
        lost.sort();
        assert_eq!(lost, vec![(t("a"), 1), (t("b"), 2)]);
        assert!(o.siblings("a").is_empty());
        // Still subscribed for the answer owed to 2.
        assert!(o.wanted("b"));
        assert_eq!(o.topics().cloned().collect::<Vec<_>>(), vec![t("b")]);
        // The siblings ask again; 2 is owed twice now.
        o.on(&t("b"), 2, false);
        assert_eq!(o.confirmed("b"), vec![2, 2]);
    }

    #[test]
    fn a_dropped_sibling_gets_nothing_until_it_asks_again() {
        let mut o = Owned::default();
        o.on(&t("a"), 1, true);
        o.on(&t("a"), 2, true);
        o.drop_sibling("a", 1);
        assert_eq!(o.siblings("a"), &[2]);
        o.drop_sibling("a", 2);
        assert!(!o.wanted("a"));
        o.on(&t("a"), 1, true);
        assert_eq!(o.siblings("a"), &[1]);
    }
}
