//! Floors: messages a connection already has, so the shard's live copies skip it.
//!
//! Two things hand a connection messages ahead of the shard's own stream:
//! - a resume from an offset this shard has not reached yet (the client got that topic
//!   message on another shard a moment ago, and it is still in this shard's inbox);
//! - the unacknowledged direct messages given to a user's new connection, some of
//!   which may still be in the inbox as live copies.
//!
//! Either way the connection holds everything up to an id. A shard receives its
//! messages in id order (`broker`), so live copies up to that id skip the connection,
//! and the floor goes once the shard passes it.

use std::rc::Rc;

use crate::protocol::MessageId;
use crate::registry::ConnKey;

/// Whose messages a floor holds back: one topic's (`Some`), or the connection's direct
/// messages (`None`).
type Stream = Option<Rc<str>>;

#[derive(Debug, Default)]
pub struct Floors(Vec<(ConnKey, Stream, MessageId)>);

impl Floors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Connection `conn` has the messages of `topic` (`None`: its direct messages) up
    /// to `upto`; replaces an earlier floor of the same stream.
    pub fn add(&mut self, conn: ConnKey, topic: Option<&str>, upto: MessageId) {
        self.0
            .retain(|(k, t, _)| *k != conn || t.as_deref() != topic);
        self.0.push((conn, topic.map(Rc::from), upto));
    }

    /// The connections message `id` of `topic` (`None`: a direct message) must skip;
    /// forgets every floor at or below `id` (the shard's ids only grow from here).
    pub fn skip(&mut self, topic: Option<&str>, id: MessageId) -> Vec<ConnKey> {
        let skip = self
            .0
            .iter()
            .filter(|(_, t, upto)| t.as_deref() == topic && id <= *upto)
            .map(|(k, _, _)| *k)
            .collect();
        self.0.retain(|(_, _, upto)| *upto > id);
        skip
    }

    /// The connection left `topic`.
    pub fn leave(&mut self, conn: ConnKey, topic: &str) {
        self.0
            .retain(|(k, t, _)| *k != conn || t.as_deref() != Some(topic));
    }

    /// The connection closed.
    pub fn forget(&mut self, conn: ConnKey) {
        self.0.retain(|(k, _, _)| *k != conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> MessageId {
        MessageId { ms: 1000, seq }
    }

    #[test]
    fn a_floor_skips_the_topic_up_to_the_offset_then_goes() {
        let mut f = Floors::default();
        f.add(1, Some("t"), id(5));
        f.add(2, Some("t"), id(3));
        f.add(1, Some("other"), id(5));
        assert!(f.skip(Some("t"), id(2)).iter().copied().eq([1, 2]));
        assert_eq!(f.skip(Some("t"), id(3)), [1, 2]);
        // 2's floor is passed; 1 still skips "t" up to 5, and not other topics.
        assert_eq!(f.skip(Some("u"), id(4)), Vec::<ConnKey>::new());
        assert_eq!(f.skip(Some("t"), id(5)), [1]);
        assert!(f.is_empty(), "every floor passed");
        assert_eq!(f.skip(Some("t"), id(6)), Vec::<ConnKey>::new());
    }

    #[test]
    fn a_floor_goes_with_its_subscription_or_connection() {
        let mut f = Floors::default();
        f.add(1, Some("t"), id(5));
        f.add(1, Some("t"), id(7));
        f.add(1, Some("u"), id(5));
        f.add(2, Some("t"), id(5));
        // A second resume of the same topic replaces the first.
        assert_eq!(f.0.len(), 3);
        f.leave(1, "t");
        assert_eq!(f.skip(Some("t"), id(4)), [2]);
        f.forget(1);
        assert_eq!(f.skip(Some("u"), id(4)), Vec::<ConnKey>::new());
    }

    #[test]
    fn direct_floors_hold_back_direct_messages_only_and_pass_with_any_message() {
        let mut f = Floors::default();
        f.add(1, None, id(5));
        f.add(2, Some("t"), id(5));
        assert_eq!(f.skip(None, id(4)), [1]);
        assert_eq!(f.skip(Some("t"), id(4)), [2]);
        // A topic message past the floor ends the direct floor too.
        assert_eq!(f.skip(Some("other"), id(6)), Vec::<ConnKey>::new());
        assert!(f.is_empty());
    }
}
