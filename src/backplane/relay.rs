//! One copy per node, in motion: the messages between a topic's owner shard and its
//! siblings (`crate::shard::Inbox::{Relay, Interest, Answer, Lost}`), and the task that
//! sends a sibling's interest changes. The owner's state is `owners::Owned`; the
//! sibling's is its `via` subscriptions, counted like the ones it makes in Redis.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use super::replay::Gate;
use super::{owners, Backplane};
use crate::protocol::MessageId;
use crate::shard::{Inbox, Shard};

/// Sends this shard's interest changes to the topics' owners, for the life of the
/// shard. Batched like SUBSCRIBEs: everything changed since the last round goes out
/// together.
pub async fn run(shard: Rc<Shard>) {
    let Some(bp) = shard.backplane() else {
        return;
    };
    if bp.node.shards.len() < 2 {
        return;
    }
    loop {
        bp.via_wake.woken().await;
        let (on, off) = bp
            .via
            .borrow_mut()
            .take_changes(|t| shard.has_subscribers(t));
        super::subscriber::note_changes(&shard, bp, &on, &off);
        for (topics, on) in [(on, true), (off, false)] {
            for topic in topics {
                bp.send_to(
                    owners::owner(&topic, bp.node.shards.len()),
                    Inbox::Interest {
                        topic: Arc::from(&*topic),
                        from: bp.index,
                        on,
                    },
                );
            }
        }
    }
}

impl Backplane {
    /// Sends a message that holds no inbox room (a control message between shards) to
    /// shard `to`; a stopped shard is shutting down and needs nothing more.
    pub(super) fn send_to(&self, to: usize, msg: Inbox) {
        debug_assert!(!msg.holds_room() && !matches!(msg, Inbox::Relay { .. }));
        let _ = self.node.shards[to].tx.send(msg);
    }

    /// Owner: sibling `from` wants `topic` (`on`) or no longer does.
    pub fn on_interest(&self, topic: Arc<str>, from: usize, on: bool) {
        let name: Rc<str> = Rc::from(&*topic);
        if on {
            let confirmed = self.subs.borrow().is_confirmed(&name);
            if self.owned.borrow_mut().on(&name, from, confirmed) {
                self.send_to(from, Inbox::Answer { topic });
                return;
            }
        } else {
            let owed = self.owned.borrow_mut().off(&name, from);
            for _ in 0..owed {
                self.send_to(
                    from,
                    Inbox::Answer {
                        topic: topic.clone(),
                    },
                );
            }
        }
        self.topic_changed(name);
    }

    /// Owner: Redis confirmed `topic`; the siblings waiting are answered.
    pub(super) fn answer_siblings(&self, topic: &str) {
        let owed = self.owned.borrow_mut().confirmed(topic);
        if owed.is_empty() {
            return;
        }
        let topic: Arc<str> = Arc::from(topic);
        for s in owed {
            self.send_to(
                s,
                Inbox::Answer {
                    topic: topic.clone(),
                },
            );
        }
    }

    /// Owner: the subscriber connection is gone; every sibling may miss messages.
    pub(super) fn siblings_lost(&self) {
        let lost = self.owned.borrow_mut().lost();
        for (topic, s) in lost {
            self.send_to(
                s,
                Inbox::Lost {
                    topic: Arc::from(&*topic),
                },
            );
        }
    }

    /// Owner: hands a message from Redis to the siblings that want its topic. A sibling
    /// that has not taken `relay_buffer_bytes` of relays yet is told `Lost` instead,
    /// and gets nothing more of the topic until it asks again (then it catches up from
    /// the stream).
    pub(super) fn relay(&self, topic: &str, pos: Option<(MessageId, &str)>, frame: &Bytes) {
        let owned = self.owned.borrow();
        let siblings = owned.siblings(topic);
        if siblings.is_empty() {
            return;
        }
        let name: Arc<str> = Arc::from(topic);
        let pos = pos.map(|(id, epoch)| (id, Arc::<str>::from(epoch)));
        let mut refused = Vec::new();
        for &s in siblings {
            let link = &self.node.shards[s];
            if !link.reserve_relay(frame.len()) {
                refused.push(s);
                continue;
            }
            let msg = Inbox::Relay {
                topic: name.clone(),
                pos: pos.clone(),
                frame: frame.clone(),
            };
            if link.tx.send(msg).is_err() {
                link.release_relay(frame.len());
            } else {
                self.metrics.relayed.inc();
            }
        }
        drop(owned);
        for s in refused {
            self.metrics.relays_lost.inc();
            self.owned.borrow_mut().drop_sibling(topic, s);
            self.send_to(
                s,
                Inbox::Lost {
                    topic: name.clone(),
                },
            );
        }
    }

    /// Owner: the first subscriber of `topic` on this shard. When the topic is already
    /// subscribed for the siblings, no SUBSCRIBE will read its position for a later
    /// catch-up: it is read now.
    pub fn first_subscriber(&self, topic: &str) {
        if self.mine(topic) && self.subs.borrow().holds(topic) {
            self.replays.borrow_mut().subscribed(&Rc::from(topic));
            self.start_read(topic);
        }
    }

    /// Sibling: a message its owner relayed. Dropped when the shard no longer asks for
    /// the topic (the owner had not yet read the `off`).
    pub fn on_relay(
        &self,
        shard: &Shard,
        topic: &str,
        pos: Option<(MessageId, &str)>,
        frame: &Bytes,
    ) {
        if self.via.borrow().holds(topic) {
            self.deliver_live(shard, topic, pos, frame);
        }
    }

    /// Sibling: the owner may have lost messages of `topic` for this shard. The
    /// subscribers are held, the topic is asked for again, and once answered they
    /// catch up from the stream.
    pub fn on_lost(&self, shard: &Shard, topic: &str) {
        let name: Rc<str> = Rc::from(topic);
        if !self.via.borrow_mut().relost(&name) {
            return;
        }
        if shard.has_subscribers(topic) {
            self.replays.borrow_mut().lost(&name, shard.history_on());
        }
        self.via_wake.wake();
    }

    /// A live message of `topic` (from Redis, or relayed) to this shard's subscribers,
    /// past those a replay still holds.
    pub(super) fn deliver_live(
        &self,
        shard: &Shard,
        topic: &str,
        pos: Option<(MessageId, &str)>,
        frame: &Bytes,
    ) {
        let gate = self.replays.borrow_mut().live(topic, pos, frame);
        match gate {
            Gate::All => shard.deliver(topic, frame),
            Gate::AllBut(waiting) => shard.deliver_except(topic, frame, &waiting),
            Gate::Nobody => {}
        }
    }
}
