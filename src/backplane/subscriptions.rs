//! What one shard's subscriber connection has asked Redis for, and who waits on it: a
//! pure state machine (no I/O), driven by the shard and by the subscriber task.
//!
//! - A topic whose local interest changed is *dirty*; the subscriber's next write takes
//!   the changes (`take_changes`) and SUBSCRIBEs or UNSUBSCRIBEs what differs.
//! - A topic subscribed is *sent* until Redis confirms it, and *confirmed* only by the
//!   answer to the last SUBSCRIBE written for it on this connection (a SUBSCRIBE,
//!   UNSUBSCRIBE, SUBSCRIBE sequence must not be confirmed by the first answer).
//! - Replies waiting for a confirmation (`A`: a client's `subscribed` answer) are held
//!   per topic and handed back when it comes.
//! - A lost connection forgets what Redis had (`lost`); the next one starts from what
//!   the shard wants (`restart`).

use std::collections::HashMap;
use std::rc::Rc;

/// Where a topic's Redis subscription stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Sent,
    Confirmed,
}

pub struct Subscriptions<A> {
    state: HashMap<Rc<str>, State>,
    /// SUBSCRIBEs written per topic and not yet answered on the current connection.
    unanswered: HashMap<Rc<str>, u32>,
    dirty: Vec<Rc<str>>,
    waiting: HashMap<Rc<str>, Vec<A>>,
}

impl<A> Default for Subscriptions<A> {
    fn default() -> Self {
        Self {
            state: HashMap::new(),
            unanswered: HashMap::new(),
            dirty: Vec::new(),
            waiting: HashMap::new(),
        }
    }
}

impl<A> Subscriptions<A> {
    /// Redis has confirmed `topic` on the current connection.
    pub fn is_confirmed(&self, topic: &str) -> bool {
        self.state.get(topic) == Some(&State::Confirmed)
    }

    /// Whether `topic` was asked for (and not given up) on the current connection.
    pub fn holds(&self, topic: &str) -> bool {
        self.state.contains_key(topic)
    }

    /// `topic`'s subscription was lost on its own (the connection stays): it is asked
    /// for again at the next write if still wanted, and confirmed only by the answer to
    /// that. Returns whether it was held.
    pub fn relost(&mut self, topic: &Rc<str>) -> bool {
        if self.state.remove(topic).is_none() {
            return false;
        }
        self.dirty.push(topic.clone());
        true
    }

    /// The shard's interest in `topic` may have changed.
    pub fn mark_dirty(&mut self, topic: Rc<str>) {
        self.dirty.push(topic);
    }

    /// `reply` waits for `topic` to be confirmed.
    pub fn wait(&mut self, topic: Rc<str>, reply: A) {
        self.waiting.entry(topic).or_default().push(reply);
    }

    /// Takes the replies waiting on `topic` that `mine` picks.
    pub fn take_waiting(&mut self, topic: &str, mut mine: impl FnMut(&A) -> bool) -> Vec<A> {
        let Some(waiting) = self.waiting.get_mut(topic) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(waiting.len());
        for a in waiting.drain(..) {
            if mine(&a) {
                taken.push(a);
            } else {
                kept.push(a);
            }
        }
        if kept.is_empty() {
            self.waiting.remove(topic);
        } else {
            *waiting = kept;
        }
        taken
    }

    /// A new connection, on which `topics` (everything the shard wants) are about to be
    /// subscribed. Waiting replies that `keep` rejects are dropped (their client left,
    /// or nobody on the shard holds the topic any more).
    pub fn restart(&mut self, topics: &[Rc<str>], mut keep: impl FnMut(&str, &A) -> bool) {
        self.dirty.clear();
        self.state.clear();
        self.unanswered.clear();
        for t in topics {
            self.state.insert(t.clone(), State::Sent);
            self.unanswered.insert(t.clone(), 1);
        }
        self.waiting.retain(|topic, waiting| {
            waiting.retain(|a| keep(topic, a));
            !waiting.is_empty()
        });
    }

    /// The connection is gone: nothing is subscribed any more.
    pub fn lost(&mut self) {
        self.state.clear();
        self.unanswered.clear();
    }

    /// Topics to SUBSCRIBE and UNSUBSCRIBE now: the dirty ones whose wanted state
    /// (`wanted`) differs from what was asked of Redis. The SUBSCRIBEs are counted as
    /// written.
    pub fn take_changes(&mut self, wanted: impl Fn(&str) -> bool) -> (Vec<Rc<str>>, Vec<Rc<str>>) {
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        for topic in std::mem::take(&mut self.dirty) {
            let want = wanted(&topic);
            let have = self.state.contains_key(&topic);
            if want && !have {
                self.state.insert(topic.clone(), State::Sent);
                *self.unanswered.entry(topic.clone()).or_insert(0) += 1;
                subscribe.push(topic);
            } else if !want && have {
                self.state.remove(&topic);
                unsubscribe.push(topic);
            }
        }
        (subscribe, unsubscribe)
    }

    /// Redis answered a SUBSCRIBE of `topic`. When it was the last one written and the
    /// topic is still wanted, the topic is confirmed and the replies waiting on it are
    /// returned; otherwise `None`.
    pub fn confirmed(&mut self, topic: &str) -> Option<Vec<A>> {
        match self.unanswered.get_mut(topic) {
            Some(n) if *n > 1 => {
                *n -= 1;
                return None;
            }
            Some(_) => {
                self.unanswered.remove(topic);
            }
            None => {}
        }
        // Unsubscribed since: its waiting replies went out with the unsubscribe.
        let state = self.state.get_mut(topic)?;
        *state = State::Confirmed;
        Some(self.waiting.remove(topic).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Rc<str> {
        Rc::from(s)
    }

    #[test]
    fn a_topic_is_confirmed_by_its_subscribe_and_hands_back_its_waiters() {
        let mut s = Subscriptions::default();
        s.wait(t("a"), 1);
        s.wait(t("a"), 2);
        s.mark_dirty(t("a"));
        assert_eq!(s.take_changes(|_| true), (vec![t("a")], vec![]));
        assert!(!s.is_confirmed("a"));
        assert_eq!(s.confirmed("a"), Some(vec![1, 2]));
        assert!(s.is_confirmed("a"));
        // Nothing changed: nothing to write.
        s.mark_dirty(t("a"));
        assert_eq!(s.take_changes(|_| true), (vec![], vec![]));
    }

    #[test]
    fn only_the_answer_to_the_last_subscribe_confirms() {
        let mut s: Subscriptions<u32> = Subscriptions::default();
        s.mark_dirty(t("a"));
        s.take_changes(|_| true);
        s.mark_dirty(t("a"));
        assert_eq!(s.take_changes(|_| false), (vec![], vec![t("a")]));
        s.mark_dirty(t("a"));
        assert_eq!(s.take_changes(|_| true), (vec![t("a")], vec![]));
        s.wait(t("a"), 7);
        // The first SUBSCRIBE's answer: the second is still on its way.
        assert_eq!(s.confirmed("a"), None);
        assert!(!s.is_confirmed("a"));
        assert_eq!(s.confirmed("a"), Some(vec![7]));
        assert!(s.is_confirmed("a"));
    }

    #[test]
    fn an_answer_after_the_unsubscribe_confirms_nothing() {
        let mut s: Subscriptions<u32> = Subscriptions::default();
        s.mark_dirty(t("a"));
        s.take_changes(|_| true);
        s.mark_dirty(t("a"));
        s.take_changes(|_| false);
        assert_eq!(s.confirmed("a"), None);
        assert!(!s.is_confirmed("a"));
    }

    #[test]
    fn a_lost_connection_forgets_and_a_restart_resends_what_is_wanted() {
        let mut s = Subscriptions::default();
        s.mark_dirty(t("a"));
        s.take_changes(|_| true);
        s.confirmed("a");
        s.wait(t("b"), 1);
        s.wait(t("b"), 2);
        s.wait(t("gone"), 3);
        s.lost();
        assert!(!s.is_confirmed("a"));
        // Changes made while down are covered by the restart's full set.
        s.mark_dirty(t("c"));
        s.restart(&[t("a"), t("b")], |topic, &a| topic != "gone" && a != 2);
        assert_eq!(s.take_changes(|_| true), (vec![], vec![]));
        assert_eq!(s.confirmed("a"), Some(vec![]));
        assert_eq!(s.confirmed("b"), Some(vec![1]));
        assert_eq!(s.confirmed("gone"), None);
    }

    #[test]
    fn a_topic_lost_alone_is_asked_again_and_confirmed_by_the_last_answer() {
        let mut s = Subscriptions::default();
        s.mark_dirty(t("a"));
        s.take_changes(|_| true);
        s.wait(t("a"), 1);
        // Lost before the first answer: asked again; the first answer confirms nothing.
        assert!(s.relost(&t("a")));
        assert!(!s.holds("a"));
        assert_eq!(s.take_changes(|_| true), (vec![t("a")], vec![]));
        assert_eq!(s.confirmed("a"), None);
        assert_eq!(s.confirmed("a"), Some(vec![1]));
        // Not held: nothing to lose.
        assert!(!s.relost(&t("b")));
        // Lost, then no longer wanted: nothing is asked.
        assert!(s.relost(&t("a")));
        assert_eq!(s.take_changes(|_| false), (vec![], vec![]));
    }

    #[test]
    fn take_waiting_takes_only_what_is_picked() {
        let mut s = Subscriptions::default();
        s.wait(t("a"), 1);
        s.wait(t("a"), 2);
        s.wait(t("a"), 1);
        assert_eq!(s.take_waiting("a", |&x| x == 1), vec![1, 1]);
        assert_eq!(s.take_waiting("a", |&x| x == 1), Vec::<i32>::new());
        assert_eq!(s.take_waiting("a", |_| true), vec![2]);
        assert_eq!(s.take_waiting("nothing", |_| true), Vec::<i32>::new());
    }
}
