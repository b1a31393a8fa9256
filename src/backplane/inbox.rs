//! Acknowledged direct messages through Redis: each user's inbox is a stream
//! (`ringway:inbox:<user>`) that `ringway_send` appends to and `ringway_ack` trims. A
//! new connection of the user reads it once its presence is registered (the read is
//! queued behind the registration on the command connection), so a message sent while
//! it connects is either routed to it live or found in the inbox. Live direct messages
//! that reach the connection before the read is answered are held and follow what the
//! inbox held, so the connection sees its messages in id order; a live copy of a
//! message the inbox already gave may still come (at least once: clients drop ids at
//! or below the last one they handled).

use std::collections::HashMap;
use std::rc::Rc;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use serde_json::value::RawValue;

use crate::protocol::MessageId;
use crate::registry::ConnKey;

/// A user's inbox as read: (id, data) oldest first.
pub type Entries = Vec<(MessageId, Box<RawValue>)>;

/// An answered inbox read: connection key and number, user, entries.
pub type InboxDone = (ConnKey, u64, Rc<str>, Result<Entries, String>);

/// Live direct messages held for one connection while its inbox is read; beyond it,
/// the connection stops waiting and counts as unread (below).
const MAX_HELD: usize = 10_000;
/// Reads of one connection's inbox that may fail before it counts as unread.
const TRIES: u8 = 3;

#[derive(Debug)]
struct Wait {
    conn: u64,
    user: Rc<str>,
    held: Vec<(MessageId, Bytes)>,
    tries: u8,
    /// Read again once this read is answered (it may have run before the shard's
    /// direct channel was subscribed again).
    again: bool,
}

/// One shard's inbox reads.
#[derive(Debug, Default)]
pub struct Inboxes {
    waiting: HashMap<ConnKey, Wait>,
    unsent: Vec<(ConnKey, u64, Rc<str>)>,
    done: Vec<InboxDone>,
    /// Connections whose inbox could not be read (or held too much meanwhile): they
    /// may have missed messages that wait in the inbox, so their acks are refused
    /// (an ack would remove what they never got); the next connection reads it.
    unread: Vec<(ConnKey, u64)>,
}

impl Inboxes {
    /// Connection `key` (number `conn`) of `user` waits for the user's inbox.
    pub fn wait(&mut self, key: ConnKey, conn: u64, user: Rc<str>) {
        if let Some(w) = self.waiting.get_mut(&key).filter(|w| w.conn == conn) {
            w.again = true;
            return;
        }
        self.waiting.insert(
            key,
            Wait {
                conn,
                user: user.clone(),
                held: Vec::new(),
                tries: 0,
                again: false,
            },
        );
        self.unsent.push((key, conn, user));
    }

    /// A read failed: asked again, holding what was held, a few times; then the
    /// connection counts as unread. True when it is asked again.
    pub fn retry(&mut self, key: ConnKey, conn: u64, user: Rc<str>) -> bool {
        match self.waiting.get_mut(&key) {
            Some(w) if w.conn == conn && w.tries + 1 < TRIES => {
                w.tries += 1;
                self.unsent.push((key, conn, user));
                true
            }
            _ => false,
        }
    }

    /// Whether connection `key` (number `conn`) may acknowledge: its inbox was read.
    pub fn may_ack(&self, key: ConnKey, conn: u64) -> bool {
        !self.unread.contains(&(key, conn)) && self.waiting.get(&key).is_none_or(|w| w.conn != conn)
    }

    /// Connection `key` missed what its inbox holds (its read failed).
    pub fn mark_unread(&mut self, key: ConnKey, conn: u64) {
        if !self.unread.contains(&(key, conn)) {
            self.unread.push((key, conn));
        }
    }

    /// Reads to send: those of connections for which `ready` (their registration is
    /// written); the rest wait for a later call.
    pub fn take_unsent(&mut self, ready: impl Fn(u64) -> bool) -> Vec<(ConnKey, u64, Rc<str>)> {
        let (now, later) = std::mem::take(&mut self.unsent)
            .into_iter()
            .partition(|(_, conn, _)| ready(*conn));
        self.unsent = later;
        now
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// A live direct message for connection `key`: held (true) if it waits.
    pub fn hold(&mut self, key: ConnKey, id: MessageId, frame: &Bytes) -> bool {
        match self.waiting.get_mut(&key) {
            Some(w) if w.held.len() < MAX_HELD => {
                w.held.push((id, frame.clone()));
                true
            }
            Some(w) => {
                // Held too much: it gets what was held now, and live messages from
                // here; what its inbox holds comes to its next connection.
                let conn = w.conn;
                self.waiting.remove(&key);
                self.mark_unread(key, conn);
                false
            }
            None => false,
        }
    }

    /// Redis answered a read.
    pub fn answered(
        &mut self,
        key: ConnKey,
        conn: u64,
        user: Rc<str>,
        entries: Result<Entries, String>,
    ) {
        self.done.push((key, conn, user, entries));
    }

    /// Answered reads since the last call.
    pub fn take_done(&mut self) -> Vec<InboxDone> {
        std::mem::take(&mut self.done)
    }

    /// Connection `key` (if still number `conn`) waits no more: what was held for it,
    /// in arrival order. `None` when it went away meanwhile.
    /// A connection asked to read again meanwhile keeps waiting (with nothing held)
    /// and is read again.
    pub fn finish(&mut self, key: ConnKey, conn: u64) -> Option<Vec<(MessageId, Bytes)>> {
        let w = self.waiting.get_mut(&key).filter(|w| w.conn == conn)?;
        if std::mem::take(&mut w.again) {
            w.tries = 0;
            let user = w.user.clone();
            let held = std::mem::take(&mut w.held);
            self.unsent.push((key, conn, user));
            return Some(held);
        }
        self.waiting.remove(&key).map(|w| w.held)
    }

    /// Connection `key` closed.
    pub fn forget(&mut self, key: ConnKey) {
        self.waiting.remove(&key);
        self.unsent.retain(|(k, _, _)| *k != key);
        self.unread.retain(|(k, _)| *k != key);
    }
}

/// The entries of an `XRANGE` reply on an inbox.
pub fn parse_entries(frame: &BytesFrame) -> Result<Entries, String> {
    match frame {
        BytesFrame::Array(list) => super::replay::stream_entries(list)
            .ok_or_else(|| "unexpected reply to XRANGE on an inbox".to_owned()),
        BytesFrame::Error(e) => Err(e.to_string()),
        _ => Err("unexpected reply to XRANGE on an inbox".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_connection_holds_live_messages_until_its_read_is_answered() {
        let mut i = Inboxes::default();
        i.wait(3, 30, Rc::from("u"));
        assert_eq!(i.take_unsent(|_| true).len(), 1);
        let id = MessageId { ms: 5, seq: 0 };
        assert!(i.hold(3, id, &Bytes::from_static(b"m")));
        assert!(!i.hold(4, id, &Bytes::from_static(b"m")), "not waiting");
        // A reused slot is not the connection that asked.
        assert!(i.finish(3, 31).is_none());
        // Asked again while its read was out: it gets what was held, and waits for a
        // second read.
        i.wait(3, 30, Rc::from("u"));
        assert_eq!(i.finish(3, 30).unwrap().len(), 1);
        assert_eq!(i.take_unsent(|_| true).len(), 1);
        assert!(i.hold(3, id, &Bytes::from_static(b"n")));
        assert_eq!(i.finish(3, 30).unwrap().len(), 1);
        assert!(i.is_empty());
        assert!(!i.hold(3, id, &Bytes::from_static(b"m")));
    }

    #[test]
    fn a_closed_connection_is_forgotten_before_its_read_is_sent() {
        let mut i = Inboxes::default();
        i.wait(3, 30, Rc::from("u"));
        i.forget(3);
        assert!(i.take_unsent(|_| true).is_empty());
        assert!(i.is_empty());
    }
}
