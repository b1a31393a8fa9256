//! Replays through Redis: reading a topic's history from its stream for the shard's
//! connections that resume with `since`, and for the shard itself when its subscriber
//! connection comes back (what was published while it was away).
//!
//! Per topic, the shard keeps who waits for the stream (`Who`), at most one read in
//! flight (a `Batch`: one `ringway_history` call from the oldest position any member
//! needs), and the live messages that arrive while the read is in flight (`held`). A
//! read is sent only once Redis has confirmed the shard's subscription to the topic, so
//! every message is in the stream, or arrives live after the read was sent, or both;
//! each member gets the stream's entries after its position and then the held messages
//! above the last entry. No gap, no duplicate, and nothing newer before anything older.
//!
//! Connections that wait are skipped by live deliveries of the topic; after a
//! reconnect of the subscriber connection every subscriber of the topic is (`hold_all`)
//! until the catch-up is answered. The shard's `seen` position per topic is the last
//! message its subscribers were given; it is where the catch-up starts.
//!
//! Pure state with unit tests; the RESP of the call and of its reply is here too, so
//! the shard deals in frames and connection keys only.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use serde_json::value::RawValue;

use super::schema;
use crate::protocol::{self, MessageId, NotRecovered};
use crate::registry::ConnKey;

/// Entries one read may return; more than that is `too_large` for a resume.
pub const MAX_REPLAY: usize = 10_000;
/// Live messages (and their bytes) held per topic while a read is in flight; beyond
/// either, the read's members are answered `unavailable` instead of being replayed.
const MAX_HELD: usize = 100_000;
const MAX_HELD_BYTES: usize = 64 * 1024 * 1024;
/// Reads a catch-up makes before its subscribers are told `unavailable`.
const CATCH_UP_TRIES: u8 = 3;
/// How long a catch-up may hold its topic's subscribers while it cannot read.
const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// Where a topic stands for someone: the last message id had, in history `epoch`
/// (`None`: the topic had no history yet, so everything in the stream is after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub id: MessageId,
    pub epoch: Option<Rc<str>>,
}

/// Someone waiting for a topic's stream.
#[derive(Debug)]
pub enum Who {
    /// A connection that subscribed with `since`.
    Conn {
        key: ConnKey,
        /// The connection's number, so a reused slab key is never mistaken for it.
        conn: u64,
        since: Position,
        reference: Option<Box<RawValue>>,
    },
    /// Every subscriber of the topic on this shard, after the subscriber connection
    /// came back: they get what was published while it was away. `tries`: reads that
    /// failed for want of Redis (retried up to `CATCH_UP_TRIES`).
    Shard { since: Position, tries: u8 },
    /// Nobody: the shard first learns where the topic stands (its `seen`), so that a
    /// later catch-up has a position to start from. `tries` as for `Shard`.
    Position { tries: u8 },
}

/// The read to send: entries after `after` (`None`: from the first), at most `count`.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub after: Option<MessageId>,
    pub count: usize,
    /// Answers carry this, so a stale answer is told apart.
    pub serial: u64,
}

/// A topic's stream as read by `ringway_history`.
#[derive(Debug, Default)]
pub struct Page {
    pub epoch: Option<String>,
    /// The last id the stream gave out; `None` when there is no stream.
    pub last: Option<MessageId>,
    /// The highest id trimmed away (`0-0` when none).
    pub trimmed: Option<MessageId>,
    pub entries: Vec<(MessageId, Box<RawValue>)>,
    /// More entries followed than were read.
    pub cut: bool,
}

/// Where a replay's frames go.
#[derive(Debug, PartialEq, Eq)]
pub enum To {
    /// One connection (if it is still connection number `conn`).
    Conn { key: ConnKey, conn: u64 },
    /// Every subscriber of the topic but these (connections still waiting).
    Others { except: Vec<ConnKey> },
}

/// Frames to queue, in order.
#[derive(Debug)]
pub struct Delivery {
    pub to: To,
    pub frames: Vec<Bytes>,
    /// Counted as a resume, recovered or not (a connection's answer).
    pub resumed: Option<bool>,
}

/// Which subscribers a live message of a topic goes to now.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    All,
    AllBut(Vec<ConnKey>),
    Nobody,
}

#[derive(Debug)]
struct Batch {
    members: Vec<Who>,
    serial: u64,
    /// The topic's `lost` count when the read was sent.
    lost: u64,
}

#[derive(Debug, Default)]
struct Topic {
    waiting: Vec<Who>,
    batch: Option<Batch>,
    /// Every subscriber waits for a catch-up (`Who::Shard`), since this instant.
    hold_all: bool,
    hold_since: Option<Instant>,
    held: Vec<(MessageId, Bytes)>,
    held_bytes: usize,
    /// `held` overflowed: the batch's members are answered `unavailable`.
    overflowed: bool,
    /// Connections given the topic up to an id by a replay: a live copy at or below it
    /// is late (it was published before the read but reached this shard after the
    /// answer, on the other connection) and skips them. Gone once passed.
    floors: Vec<(ConnKey, MessageId)>,
    /// The same for every subscriber, after a catch-up.
    floor_all: Option<MessageId>,
    /// The shard left the topic while a read was in flight: its answer is dropped.
    left: bool,
    /// Times the topic's live messages were lost (the subscription went down); a read
    /// sent before the last loss is stale.
    lost: u64,
}

impl Topic {
    fn holding(&self) -> bool {
        self.hold_all
            || self
                .batch
                .as_ref()
                .is_some_and(|b| b.members.iter().any(|w| !matches!(w, Who::Position { .. })))
    }

    fn waiting_keys(&self) -> Vec<ConnKey> {
        let batch = self.batch.iter().flat_map(|b| b.members.iter());
        self.waiting
            .iter()
            .chain(batch)
            .filter_map(|w| match w {
                Who::Conn { key, .. } => Some(*key),
                _ => None,
            })
            .collect()
    }

    fn idle(&self) -> bool {
        self.waiting.is_empty()
            && self.batch.is_none()
            && !self.hold_all
            && self.floors.is_empty()
            && self.floor_all.is_none()
    }
}

/// One shard's replays.
#[derive(Debug, Default)]
pub struct Replays {
    topics: HashMap<Rc<str>, Topic>,
    seen: HashMap<Rc<str>, Position>,
    serial: u64,
}

impl Replays {
    /// Whether nothing waits (the common case: live deliveries skip every lookup).
    pub fn quiet(&self) -> bool {
        self.topics.is_empty()
    }

    /// `who` waits for `topic`'s stream; `start` sends the read.
    pub fn wait(&mut self, topic: &Rc<str>, who: Who) {
        let t = self.topics.entry(topic.clone()).or_default();
        match &who {
            Who::Shard { .. } => {
                if !t.hold_all {
                    t.hold_since = Some(Instant::now());
                }
                t.hold_all = true;
                t.waiting.retain(|w| !matches!(w, Who::Shard { .. }));
            }
            Who::Position { .. } if t.waiting.iter().any(|w| matches!(w, Who::Position { .. })) => {
                return
            }
            _ => {}
        }
        t.waiting.push(who);
    }

    /// The read to send for `topic` now, if someone waits and no read is in flight.
    pub fn start(&mut self, topic: &str) -> Option<Request> {
        let t = self.topics.get_mut(topic)?;
        if t.batch.is_some() || t.waiting.is_empty() {
            return None;
        }
        let members = std::mem::take(&mut t.waiting);
        let mut after: Option<Option<MessageId>> = None;
        let mut replay = false;
        for w in &members {
            let from = match w {
                Who::Conn { since, .. } | Who::Shard { since, .. } => {
                    // A position without an epoch is from before the stream began.
                    since.epoch.as_ref().map(|_| since.id)
                }
                Who::Position { .. } => continue,
            };
            replay = true;
            after = Some(match after {
                None => from,
                Some(a) => a.min(from),
            });
        }
        if !t.hold_all {
            // Messages held for an earlier read are in this read's stream.
            t.held.clear();
            t.held_bytes = 0;
            t.overflowed = false;
        }
        self.serial += 1;
        t.batch = Some(Batch {
            members,
            serial: self.serial,
            lost: t.lost,
        });
        Some(Request {
            after: after.flatten(),
            count: if replay { MAX_REPLAY + 1 } else { 0 },
            serial: self.serial,
        })
    }

    /// Topics with members waiting and no read in flight.
    pub fn startable(&self) -> Vec<Rc<str>> {
        self.topics
            .iter()
            .filter(|(_, t)| t.batch.is_none() && !t.waiting.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A live message of `topic` (with its id and epoch when it is in history)
    /// arrived: who gets it now. Messages that some subscribers must wait for are held.
    pub fn live(&mut self, topic: &str, pos: Option<(MessageId, &str)>, frame: &Bytes) -> Gate {
        let hold_all = self.topics.get(topic).is_some_and(|t| t.hold_all);
        if !hold_all {
            if let Some((id, epoch)) = pos {
                self.see(topic, id, epoch);
            }
        }
        let Some(t) = self.topics.get_mut(topic) else {
            return Gate::All;
        };
        if t.holding() && !t.overflowed {
            if t.held.len() >= MAX_HELD || t.held_bytes + frame.len() > MAX_HELD_BYTES {
                t.overflowed = true;
            } else {
                // A message outside history cannot be matched with the stream: it goes
                // after the replay.
                let id = pos.map_or(MessageId::MAX, |(id, _)| id);
                t.held.push((id, frame.clone()));
                t.held_bytes += frame.len();
            }
        }
        if t.hold_all {
            return Gate::Nobody;
        }
        let mut keys = t.waiting_keys();
        if let Some((id, _)) = pos {
            // This topic's messages reach the shard in id order: a floor passed once
            // is passed for good.
            if let Some(floor) = t.floor_all {
                if id <= floor {
                    return Gate::Nobody;
                }
                t.floor_all = None;
            }
            keys.extend(t.floors.iter().filter(|(_, f)| id <= *f).map(|(k, _)| *k));
            t.floors.retain(|(_, f)| id < *f);
        }
        let gate = if keys.is_empty() {
            Gate::All
        } else {
            Gate::AllBut(keys)
        };
        if t.idle() {
            self.topics.remove(topic);
        }
        gate
    }

    fn see(&mut self, topic: &str, id: MessageId, epoch: &str) {
        match self.seen.get_mut(topic) {
            Some(p) => {
                if p.epoch.as_deref() != Some(epoch) {
                    p.epoch = Some(Rc::from(epoch));
                    p.id = id;
                } else if id > p.id {
                    p.id = id;
                }
            }
            None => {
                self.seen.insert(
                    Rc::from(topic),
                    Position {
                        id,
                        epoch: Some(Rc::from(epoch)),
                    },
                );
            }
        }
    }

    /// The subscriber connection is back and about to subscribe to `topics` again
    /// (those of the topics `mine` picks that have subscribers here; the others come
    /// through another shard and are left alone): each is `lost`, and what `mine`
    /// picks but is not in `topics` is forgotten. `history`: whether this node keeps
    /// history (else nothing is read).
    pub fn reconnected(&mut self, topics: &[Rc<str>], history: bool, mine: impl Fn(&str) -> bool) {
        let wanted: std::collections::HashSet<&str> = topics.iter().map(|t| &**t).collect();
        let gone: Vec<Rc<str>> = self
            .topics
            .keys()
            .filter(|t| mine(t) && !wanted.contains(&***t))
            .cloned()
            .collect();
        for t in gone {
            self.unsubscribed(&t);
        }
        self.seen.retain(|t, _| !mine(t) || wanted.contains(&**t));
        for topic in topics {
            self.lost(topic, history);
        }
    }

    /// `topic`'s live messages may have been missed (its subscription went down and is
    /// being made again): a read in flight is stale, held messages are dropped (the
    /// catch-up reads them from the stream), and, with history, every subscriber is
    /// held until the catch-up from the shard's position is answered.
    pub fn lost(&mut self, topic: &Rc<str>, history: bool) {
        if let Some(t) = self.topics.get_mut(topic) {
            t.lost += 1;
            t.held.clear();
            t.held_bytes = 0;
            t.overflowed = false;
        }
        if !history {
            return;
        }
        let who = match self.seen.get(topic) {
            Some(p) => Who::Shard {
                since: p.clone(),
                tries: 0,
            },
            None => Who::Position { tries: 0 },
        };
        self.wait(topic, who);
    }

    /// Catch-ups that have held their topic's subscribers longer than `HOLD_LIMIT`
    /// without a read in flight (the command connection stays away) give up: the
    /// subscribers are told (`unavailable`), get what was held, and live messages flow
    /// again.
    pub fn expire(&mut self, now: Instant) -> Vec<(Rc<str>, Delivery)> {
        let mut out = Vec::new();
        for (topic, t) in self.topics.iter_mut() {
            let due = t.hold_all
                && t.batch.is_none()
                && t.hold_since
                    .is_some_and(|s| now.duration_since(s) > HOLD_LIMIT);
            if !due {
                continue;
            }
            t.hold_all = false;
            t.hold_since = None;
            t.waiting.retain(|w| !matches!(w, Who::Shard { .. }));
            let mut frames = vec![protocol::resumed(
                topic,
                Err(NotRecovered::Unavailable),
                None,
                None,
            )];
            frames.extend(std::mem::take(&mut t.held).into_iter().map(|(_, f)| f));
            t.held_bytes = 0;
            t.overflowed = false;
            out.push((
                topic.clone(),
                Delivery {
                    to: To::Others {
                        except: t.waiting_keys(),
                    },
                    frames,
                    resumed: None,
                },
            ));
        }
        for (topic, _) in &out {
            self.seen.remove(topic);
            if self.topics.get(topic).is_some_and(Topic::idle) {
                self.topics.remove(topic);
            }
        }
        out
    }

    /// The shard subscribed to `topic` anew (its first subscriber): learn where it
    /// stands.
    pub fn subscribed(&mut self, topic: &Rc<str>) {
        if !self.seen.contains_key(topic) {
            self.wait(topic, Who::Position { tries: 0 });
        }
    }

    /// The shard unsubscribed from `topic` (its last subscriber left).
    pub fn unsubscribed(&mut self, topic: &str) {
        self.seen.remove(topic);
        if let Some(t) = self.topics.get_mut(topic) {
            t.waiting.clear();
            t.hold_all = false;
            t.floors.clear();
            t.floor_all = None;
            if t.batch.is_none() {
                self.topics.remove(topic);
            } else {
                t.left = true;
            }
        }
    }

    /// Connection `key` left `topic` (or closed): it waits no more. `Some(its ref)`
    /// when it was waiting (its `subscribed` answer is still owed).
    #[allow(clippy::option_option)]
    pub fn leave(&mut self, topic: &str, key: ConnKey) -> Option<Option<Box<RawValue>>> {
        let t = self.topics.get_mut(topic)?;
        let mut owed = None;
        let mut take = |list: &mut Vec<Who>| {
            if let Some(i) = list
                .iter()
                .position(|w| matches!(w, Who::Conn { key: k, .. } if *k == key))
            {
                if let Who::Conn { reference, .. } = list.remove(i) {
                    owed = Some(reference);
                }
            }
        };
        take(&mut t.waiting);
        if let Some(b) = &mut t.batch {
            take(&mut b.members);
        }
        owed
    }

    /// Connection `key` closed.
    pub fn forget(&mut self, key: ConnKey) {
        let topics: Vec<Rc<str>> = self.topics.keys().cloned().collect();
        for t in topics {
            self.leave(&t, key);
        }
    }

    /// The answer to read `serial` of `topic`: what each member gets. `room(key,
    /// conn)` is the free space in that connection's queue, `None` when it is gone.
    /// A read sent before the subscriber connection last came back is stale: its
    /// members wait again (for the next confirmation).
    pub fn finish(
        &mut self,
        topic: &str,
        serial: u64,
        result: Result<Page, NotRecovered>,
        room: impl Fn(ConnKey, u64) -> Option<usize>,
    ) -> Vec<Delivery> {
        let Some(t) = self.topics.get_mut(topic) else {
            return Vec::new();
        };
        if t.batch.as_ref().is_none_or(|b| b.serial != serial) {
            return Vec::new();
        }
        let batch = t.batch.take().expect("checked above");
        if std::mem::take(&mut t.left) {
            // Read for subscribers that are gone; anyone waiting now is read afresh.
            if t.idle() {
                self.topics.remove(topic);
            }
            return Vec::new();
        }
        if batch.lost != t.lost {
            let mut members = batch.members;
            // The reconnect queued a fresh catch-up; an old one would start too early.
            members.retain(|w| !matches!(w, Who::Shard { .. } | Who::Position { .. }));
            members.append(&mut t.waiting);
            t.waiting = members;
            return Vec::new();
        }
        let result = if t.overflowed {
            Err(NotRecovered::Unavailable)
        } else {
            result
        };
        let mut batch = batch;
        if result.is_err() && !t.overflowed {
            // Redis could not be asked: a catch-up is read again (its subscribers stay
            // held), a few times, before they are told.
            let mut again = Vec::new();
            batch.members.retain_mut(|w| match w {
                Who::Shard { since, tries } if *tries + 1 < CATCH_UP_TRIES => {
                    again.push(Who::Shard {
                        since: since.clone(),
                        tries: *tries + 1,
                    });
                    false
                }
                Who::Position { tries } => {
                    if *tries + 1 < CATCH_UP_TRIES {
                        again.push(Who::Position { tries: *tries + 1 });
                    }
                    false
                }
                _ => true,
            });
            t.waiting.extend(again);
        }
        let held = std::mem::take(&mut t.held);
        t.held_bytes = 0;
        t.overflowed = false;
        // Connections resuming (in this read or the next) get their own replay only.
        let mut still_waiting = t.waiting_keys();
        still_waiting.extend(batch.members.iter().filter_map(|w| match w {
            Who::Conn { key, .. } => Some(*key),
            _ => None,
        }));
        let hold_all_done = batch.members.iter().any(|w| matches!(w, Who::Shard { .. }));
        if hold_all_done {
            t.hold_all = false;
            t.hold_since = None;
        }
        let frames = match &result {
            Ok(page) => page_frames(topic, page),
            Err(_) => Vec::new(),
        };
        let epoch = result.as_ref().ok().and_then(|p| p.epoch.as_deref());
        let page_last = result.as_ref().ok().and_then(|p| p.last);
        let newest_held = held
            .iter()
            .rev()
            .map(|(id, _)| *id)
            .find(|id| *id != MessageId::MAX);
        let (mut floors, mut floor_all) = (Vec::new(), None);
        let mut out = Vec::new();
        for who in &batch.members {
            match who {
                Who::Conn {
                    key,
                    conn,
                    since,
                    reference,
                } => {
                    let Some(free) = room(*key, *conn) else {
                        continue;
                    };
                    let mut outcome = result
                        .as_ref()
                        .map_err(|e| *e)
                        .and_then(|page| decide(since, page));
                    let mut given = Vec::new();
                    if let Ok(first) = outcome {
                        given = replay_after(&frames, first, &held, since.id);
                        if given.iter().map(Bytes::len).sum::<usize>() > free {
                            outcome = Err(NotRecovered::TooLarge);
                        }
                    }
                    if outcome.is_err() {
                        given = held.iter().map(|(_, f)| f.clone()).collect();
                    }
                    let has = match outcome {
                        Ok(first) => frames[first.min(frames.len())..]
                            .last()
                            .map(|(id, _)| *id)
                            .into_iter()
                            .chain(newest_held)
                            .chain(Some(since.id))
                            .max(),
                        Err(_) => newest_held.max(page_last),
                    };
                    if let Some(upto) = has {
                        floors.push((*key, upto));
                    }
                    let ack =
                        protocol::resumed(topic, outcome.map(|_| ()), epoch, reference.as_deref());
                    given.insert(0, ack);
                    out.push(Delivery {
                        to: To::Conn {
                            key: *key,
                            conn: *conn,
                        },
                        frames: given,
                        resumed: Some(outcome.is_ok()),
                    });
                }
                Who::Shard { since, .. } => {
                    let outcome = result
                        .as_ref()
                        .map_err(|e| *e)
                        .and_then(|page| decide(since, page));
                    floor_all = frames
                        .last()
                        .map(|(id, _)| *id)
                        .into_iter()
                        .chain(newest_held)
                        .chain(page_last)
                        .max();
                    let given = match outcome {
                        Ok(first) => replay_after(&frames, first, &held, since.id),
                        Err(why) => {
                            // Nothing to replay from: the subscribers learn it, as a
                            // `subscribed` answer without `ref`, and resync. When the
                            // history began anew and has lost nothing since, they get
                            // all of the new one after the notice.
                            let mut v = vec![protocol::resumed(topic, Err(why), epoch, None)];
                            let whole_new_epoch = why == NotRecovered::EpochChanged
                                && result.as_ref().is_ok_and(|p| {
                                    !p.cut
                                        && p.trimmed
                                            .is_none_or(|t| t == MessageId { ms: 0, seq: 0 })
                                });
                            if whole_new_epoch {
                                v.extend(replay_after(
                                    &frames,
                                    0,
                                    &held,
                                    MessageId { ms: 0, seq: 0 },
                                ));
                            } else {
                                v.extend(held.iter().map(|(_, f)| f.clone()));
                            }
                            v
                        }
                    };
                    out.push(Delivery {
                        to: To::Others {
                            except: still_waiting.clone(),
                        },
                        frames: given,
                        resumed: None,
                    });
                }
                Who::Position { .. } => {}
            }
        }
        if let Some(t) = self.topics.get_mut(topic) {
            t.floors.extend(floors);
            t.floor_all = t.floor_all.max(floor_all);
        }
        // The shard's own position: past whatever its subscribers were just given.
        if let Ok(page) = &result {
            let newest = newest_held.or(page.entries.last().map(|(id, _)| *id));
            match (&page.epoch, hold_all_done) {
                (Some(e), true) => {
                    let id = newest.or(page.last).unwrap_or(MessageId { ms: 0, seq: 0 });
                    self.seen.insert(
                        Rc::from(topic),
                        Position {
                            id: id.max(page.last.unwrap_or(id)),
                            epoch: Some(Rc::from(e.as_str())),
                        },
                    );
                }
                (epoch, _) if !self.seen.contains_key(topic) => {
                    self.seen.insert(
                        Rc::from(topic),
                        Position {
                            id: page.last.unwrap_or(MessageId { ms: 0, seq: 0 }),
                            epoch: epoch.as_deref().map(Rc::from),
                        },
                    );
                }
                _ => {}
            }
        } else if hold_all_done {
            // A catch-up that failed: the subscribers were told; start afresh from the
            // next message.
            self.seen.remove(topic);
        }
        if self.topics.get(topic).is_some_and(Topic::idle) {
            self.topics.remove(topic);
        }
        out
    }
}

/// Whether a member at `since` can be replayed from `page`: the index of the first
/// entry after its position, or why not.
fn decide(since: &Position, page: &Page) -> Result<usize, NotRecovered> {
    let first = page.entries.partition_point(|(id, _)| *id <= since.id);
    match (&since.epoch, &page.epoch) {
        // Nothing was ever kept, then or now: nothing was missed.
        (None, None) => return Ok(0),
        // History began after the position: everything kept is after it.
        (None, Some(_)) => {
            if page
                .trimmed
                .is_some_and(|t| t > MessageId { ms: 0, seq: 0 })
            {
                return Err(NotRecovered::TooOld);
            }
            return if page.cut {
                Err(NotRecovered::TooLarge)
            } else {
                Ok(0)
            };
        }
        (Some(want), Some(have)) if **want == **have => {}
        _ => return Err(NotRecovered::EpochChanged),
    }
    let Some(last) = page.last else {
        // The epoch outlived its stream: history was lost.
        return Err(NotRecovered::EpochChanged);
    };
    if since.id > last {
        return Err(NotRecovered::UnknownOffset);
    }
    if page.trimmed.is_some_and(|t| t > since.id) {
        return Err(NotRecovered::TooOld);
    }
    if page.cut {
        return Err(NotRecovered::TooLarge);
    }
    Ok(first)
}

/// One frame per entry of the page, built once for every member.
fn page_frames(topic: &str, page: &Page) -> Vec<(MessageId, Bytes)> {
    let epoch = page.epoch.as_deref();
    page.entries
        .iter()
        .map(|(id, data)| (*id, protocol::message(topic, &id.to_string(), epoch, data)))
        .collect()
}

/// The entries from index `first`, then the held messages above both them and `since`.
fn replay_after(
    frames: &[(MessageId, Bytes)],
    first: usize,
    held: &[(MessageId, Bytes)],
    since: MessageId,
) -> Vec<Bytes> {
    let replayed = &frames[first.min(frames.len())..];
    let floor = replayed.last().map_or(since, |(id, _)| (*id).max(since));
    replayed
        .iter()
        .map(|(_, f)| f.clone())
        .chain(
            held.iter()
                .filter(|(id, _)| *id > floor)
                .map(|(_, f)| f.clone()),
        )
        .collect()
}

/// `FCALL_RO ringway_history 2 <stream> <epoch key> <start> <count>`.
pub fn request_args(topic: &str, req: &Request) -> Vec<Bytes> {
    let start = match req.after {
        Some(id) => format!("({id}"),
        None => "-".to_owned(),
    };
    vec![
        Bytes::from_static(b"FCALL_RO"),
        Bytes::from_static(schema::FN_HISTORY.as_bytes()),
        Bytes::from_static(b"2"),
        Bytes::from(schema::history_key(topic)),
        Bytes::from(schema::epoch_key(topic)),
        Bytes::from(start),
        Bytes::from(req.count.to_string()),
    ]
}

/// For `GET /v1/history`: the epoch and the frames of `page` (read from after
/// `since`), or why the range asked for cannot be given whole. A cut page is fine
/// there (`more`).
pub fn page_since(
    topic: &str,
    page: &Page,
    since: Option<MessageId>,
    epoch: Option<&str>,
) -> Result<(String, Vec<Bytes>), NotRecovered> {
    if let Some(want) = epoch {
        if page.epoch.as_deref() != Some(want) {
            return Err(NotRecovered::EpochChanged);
        }
    }
    if let Some(since) = since {
        let position = Position {
            id: since,
            epoch: page.epoch.as_deref().map(Rc::from),
        };
        let uncut = Page {
            epoch: page.epoch.clone(),
            last: page.last,
            trimmed: page.trimmed,
            entries: Vec::new(),
            cut: false,
        };
        if page.epoch.is_none() {
            return Err(NotRecovered::EpochChanged);
        }
        decide(&position, &uncut)?;
    }
    let frames = page_frames(topic, page)
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    Ok((page.epoch.clone().unwrap_or_default(), frames))
}

/// Reads `ringway_history`'s reply; `count` is what was asked for (a full answer means
/// more may follow).
pub fn parse_page(frame: &BytesFrame, count: usize) -> Result<Page, String> {
    let bad = || "unexpected reply from ringway_history".to_owned();
    let BytesFrame::Array(parts) = frame else {
        return Err(match frame {
            BytesFrame::Error(e) => e.to_string(),
            _ => bad(),
        });
    };
    let [epoch, last, trimmed, BytesFrame::Array(entries)] = parts.as_slice() else {
        return Err(bad());
    };
    let id = |f: &BytesFrame| text(f).and_then(|s| s.parse::<MessageId>().ok());
    let mut page = Page {
        epoch: text(epoch),
        last: id(last),
        trimmed: id(trimmed),
        entries: stream_entries(entries).ok_or_else(bad)?,
        cut: false,
    };
    if count > 0 && entries.len() >= count {
        page.cut = true;
        page.entries.truncate(count.saturating_sub(1));
    }
    Ok(page)
}

/// A string reply's text (`None` for nil and anything else).
fn text(f: &BytesFrame) -> Option<String> {
    match f {
        BytesFrame::BulkString(b) | BytesFrame::SimpleString(b) => {
            std::str::from_utf8(b).ok().map(str::to_owned)
        }
        _ => None,
    }
}

/// The entries of an `XRANGE` reply whose data (field `d`) is one JSON value; an entry
/// someone else wrote without it is skipped. `None` when the reply is not a stream's.
pub fn stream_entries(entries: &[BytesFrame]) -> Option<Vec<(MessageId, Box<RawValue>)>> {
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let BytesFrame::Array(e) = entry else {
            return None;
        };
        let [eid, BytesFrame::Array(fields)] = e.as_slice() else {
            return None;
        };
        let eid = text(eid)?.parse::<MessageId>().ok()?;
        let data = fields
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some("d"))
            .and_then(|kv| kv.get(1))
            .and_then(text)
            .and_then(|s| RawValue::from_string(s).ok());
        if let Some(data) = data {
            out.push((eid, data));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> MessageId {
        MessageId { ms: 1000, seq }
    }

    fn pos(seq: u64) -> Position {
        Position {
            id: id(seq),
            epoch: Some(Rc::from("e")),
        }
    }

    fn conn(key: ConnKey, since: u64) -> Who {
        Who::Conn {
            key,
            conn: key as u64 + 100,
            since: pos(since),
            reference: None,
        }
    }

    fn page(from: u64, to: u64, trimmed: u64) -> Page {
        Page {
            epoch: Some("e".into()),
            last: Some(id(to)),
            trimmed: Some(id(trimmed)),
            entries: (from..=to)
                .map(|s| (id(s), RawValue::from_string(s.to_string()).unwrap()))
                .collect(),
            cut: false,
        }
    }

    fn live_frame(seq: u64) -> Bytes {
        let data = RawValue::from_string(seq.to_string()).unwrap();
        protocol::message("t", &id(seq).to_string(), Some("e"), &data)
    }

    /// The data of the message frames (the `subscribed` answer shows as `ack`).
    fn seqs(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                let text = std::str::from_utf8(&f[2..]).unwrap();
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                match v["type"].as_str() {
                    Some("message") => v["data"].to_string(),
                    _ => format!("ack:{}", v["recovered"]),
                }
            })
            .collect()
    }

    fn room(_: ConnKey, _: u64) -> Option<usize> {
        Some(usize::MAX)
    }

    #[test]
    fn a_resume_gets_the_stream_after_its_offset_then_newer_held_messages_once() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.wait(&t, conn(1, 3));
        r.wait(&t, conn(2, 5));
        let req = r.start("t").unwrap();
        assert_eq!(req.after, Some(id(3)), "from the oldest position");
        // Live messages while the read is in flight: 7 and 8 overlap the stream's
        // answer, 9 and 10 are newer. Waiting connections are skipped.
        for s in 7..=10 {
            assert_eq!(
                r.live("t", Some((id(s), "e")), &live_frame(s)),
                Gate::AllBut(vec![1, 2])
            );
        }
        let out = r.finish("t", req.serial, Ok(page(4, 8, 0)), room);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].to, To::Conn { key: 1, conn: 101 });
        assert_eq!(
            seqs(&out[0].frames),
            ["ack:true", "4", "5", "6", "7", "8", "9", "10"]
        );
        assert_eq!(seqs(&out[1].frames), ["ack:true", "6", "7", "8", "9", "10"]);
        // A copy of 10 that reaches the shard after the answer (it came on the other
        // connection) is late: both have it. 11 is new for both.
        assert_eq!(
            r.live("t", Some((id(10), "e")), &live_frame(10)),
            Gate::AllBut(vec![1, 2])
        );
        assert_eq!(r.live("t", Some((id(11), "e")), &live_frame(11)), Gate::All);
        assert!(r.quiet(), "nothing left waiting");
    }

    #[test]
    fn positions_the_stream_lost_are_not_recovered_but_still_get_live_messages() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.wait(&t, conn(1, 3)); // trimmed: 4 is gone
        r.wait(&t, conn(2, 50)); // never given out
        r.wait(
            &t,
            Who::Conn {
                key: 3,
                conn: 103,
                since: Position {
                    id: id(5),
                    epoch: Some(Rc::from("old")),
                },
                reference: None,
            },
        );
        let req = r.start("t").unwrap();
        r.live("t", Some((id(11), "e")), &live_frame(11));
        let out = r.finish("t", req.serial, Ok(page(5, 10, 4)), room);
        let answers: Vec<String> = out
            .iter()
            .map(|d| {
                let text = std::str::from_utf8(&d.frames[0][2..]).unwrap();
                let v: serde_json::Value = serde_json::from_str(text).unwrap();
                v["reason"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(answers, ["too_old", "unknown_offset", "epoch_changed"]);
        for d in &out {
            assert_eq!(seqs(&d.frames[1..]), ["11"], "live messages still come");
            assert_eq!(d.resumed, Some(false));
        }
    }

    #[test]
    fn a_replay_that_does_not_fit_the_queue_is_too_large_and_a_closed_connection_gets_nothing() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.wait(&t, conn(1, 0));
        r.wait(&t, conn(2, 0));
        let req = r.start("t").unwrap();
        let out = r.finish("t", req.serial, Ok(page(1, 10, 0)), |key, _| {
            (key == 1).then_some(100)
        });
        assert_eq!(out.len(), 1, "connection 2 is gone");
        let text = std::str::from_utf8(&out[0].frames[0][2..]).unwrap();
        assert!(text.contains("too_large"), "{text}");
    }

    #[test]
    fn a_catch_up_holds_every_subscriber_until_the_stream_answers() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        assert_eq!(r.live("t", Some((id(5), "e")), &live_frame(5)), Gate::All);
        // The subscriber connection dropped after 5 and is back; 6..8 were published
        // meanwhile, 9 arrives live after the resubscription.
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        let req = r.start("t").unwrap();
        assert_eq!(req.after, Some(id(5)));
        assert_eq!(
            r.live("t", Some((id(9), "e")), &live_frame(9)),
            Gate::Nobody
        );
        // A connection resuming meanwhile waits for the next read.
        r.wait(&t, conn(4, 7));
        assert_eq!(
            r.live("t", Some((id(10), "e")), &live_frame(10)),
            Gate::Nobody
        );
        let out = r.finish("t", req.serial, Ok(page(6, 9, 0)), room);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].to, To::Others { except: vec![4] });
        assert_eq!(seqs(&out[0].frames), ["6", "7", "8", "9", "10"]);
        // The resuming connection is read for next, from its own position.
        let next = r.start("t").unwrap();
        assert_eq!(next.after, Some(id(7)));
        assert_eq!(
            r.live("t", Some((id(11), "e")), &live_frame(11)),
            Gate::AllBut(vec![4])
        );
        let out = r.finish("t", next.serial, Ok(page(8, 11, 0)), room);
        assert_eq!(seqs(&out[0].frames), ["ack:true", "8", "9", "10", "11"]);
        // Late copies skip whoever already has them.
        assert_eq!(
            r.live("t", Some((id(11), "e")), &live_frame(11)),
            Gate::AllBut(vec![4])
        );
        assert_eq!(r.live("t", Some((id(12), "e")), &live_frame(12)), Gate::All);
        assert!(r.quiet());
    }

    #[test]
    fn a_topic_lost_alone_catches_up_alone_and_a_reconnect_keeps_other_shards_topics() {
        let mut r = Replays::default();
        let (a, b): (Rc<str>, Rc<str>) = (Rc::from("a"), Rc::from("b"));
        r.live("a", Some((id(5), "e")), &live_frame(5));
        r.live("b", Some((id(7), "e")), &live_frame(7));
        // A read of b in flight goes stale when b is lost; a is untouched.
        r.wait(&b, conn(3, 1));
        let stale = r.start("b").unwrap();
        r.lost(&b, true);
        assert_eq!(r.live("a", Some((id(6), "e")), &live_frame(6)), Gate::All);
        assert_eq!(
            r.live("b", Some((id(8), "e")), &live_frame(8)),
            Gate::Nobody
        );
        assert!(r
            .finish("b", stale.serial, Ok(page(1, 8, 0)), room)
            .is_empty());
        let req = r.start("b").unwrap();
        assert_eq!(req.after, Some(id(1)), "the resuming connection's position");
        let out = r.finish("b", req.serial, Ok(page(2, 8, 0)), room);
        assert!(out.iter().any(|d| matches!(d.to, To::Others { .. })));
        assert!(out.iter().any(|d| d.to == To::Conn { key: 3, conn: 103 }));
        // The shard's own connection comes back subscribing to a only: b (owned by
        // another shard) keeps its position.
        r.reconnected(std::slice::from_ref(&a), true, |t| t == "a");
        let req = r.start("a").unwrap();
        assert_eq!(req.after, Some(id(6)));
        assert!(r.start("b").is_none());
        assert_eq!(r.live("b", Some((id(9), "e")), &live_frame(9)), Gate::All);
    }

    #[test]
    fn a_catch_up_after_history_was_lost_tells_the_subscribers() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.live("t", Some((id(5), "e")), &live_frame(5));
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        let req = r.start("t").unwrap();
        let mut fresh = page(1, 2, 0);
        fresh.epoch = Some("new".into());
        let out = r.finish("t", req.serial, Ok(fresh), room);
        let text = std::str::from_utf8(&out[0].frames[0][2..]).unwrap();
        assert!(
            text.contains("\"recovered\":false") && text.contains("epoch_changed"),
            "{text}"
        );
        assert_eq!(out[0].frames.len(), 1);
    }

    #[test]
    fn a_read_made_stale_by_a_reconnect_is_read_again() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.wait(&t, conn(1, 3));
        let req = r.start("t").unwrap();
        r.live("t", Some((id(9), "e")), &live_frame(9));
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        assert!(r
            .finish("t", req.serial, Ok(page(4, 9, 0)), room)
            .is_empty());
        // Read again: the connection and the shard's own catch-up (from 9) together.
        let again = r.start("t").unwrap();
        assert_eq!(again.after, Some(id(3)));
        let out = r.finish("t", again.serial, Ok(page(4, 12, 0)), room);
        assert_eq!(
            seqs(&out[0].frames),
            ["ack:true", "4", "5", "6", "7", "8", "9", "10", "11", "12"]
        );
        assert_eq!(seqs(&out[1].frames), ["10", "11", "12"]);
        assert_eq!(out[1].to, To::Others { except: vec![1] });
    }

    #[test]
    fn a_topic_first_published_after_the_position_is_replayed_from_its_start() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.subscribed(&t);
        let req = r.start("t").unwrap();
        assert_eq!(req.count, 0, "a position read asks for no entries");
        let out = r.finish("t", req.serial, Ok(Page::default()), room);
        assert!(out.is_empty());
        // Redis went away; while it was, the topic got its first messages.
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        let req = r.start("t").unwrap();
        assert_eq!(req.after, None);
        let mut first = page(1, 3, 0);
        first.trimmed = Some(MessageId { ms: 0, seq: 0 });
        let out = r.finish("t", req.serial, Ok(first), room);
        assert_eq!(seqs(&out[0].frames), ["1", "2", "3"]);
    }

    #[test]
    fn leaving_while_waiting_owes_an_answer_and_unskips_the_connection() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.wait(&t, conn(1, 3));
        let req = r.start("t").unwrap();
        assert!(r.leave("t", 1).is_some());
        assert!(r.leave("t", 1).is_none());
        assert_eq!(r.live("t", Some((id(4), "e")), &live_frame(4)), Gate::All);
        assert!(r
            .finish("t", req.serial, Ok(page(4, 4, 0)), room)
            .is_empty());
        assert!(r.quiet());
    }

    #[test]
    fn a_topic_left_during_its_read_is_forgotten_with_the_answer() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.subscribed(&t);
        let req = r.start("t").unwrap();
        r.unsubscribed("t");
        assert!(r
            .finish("t", req.serial, Ok(page(1, 2, 0)), room)
            .is_empty());
        assert!(r.quiet());
        assert!(
            r.seen.is_empty(),
            "no position kept for a topic the shard left"
        );
    }

    #[test]
    fn a_connection_resuming_in_the_same_read_as_a_catch_up_gets_only_its_own_replay() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.live("t", Some((id(5), "e")), &live_frame(5));
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        r.wait(&t, conn(1, 3));
        let req = r.start("t").unwrap();
        let out = r.finish("t", req.serial, Ok(page(4, 7, 0)), room);
        let mine = out
            .iter()
            .find(|d| matches!(d.to, To::Conn { .. }))
            .unwrap();
        assert_eq!(seqs(&mine.frames), ["ack:true", "4", "5", "6", "7"]);
        let others = out
            .iter()
            .find(|d| matches!(d.to, To::Others { .. }))
            .unwrap();
        assert_eq!(others.to, To::Others { except: vec![1] });
        assert_eq!(seqs(&others.frames), ["6", "7"]);
    }

    #[test]
    fn a_read_for_subscribers_that_left_is_dropped_and_newcomers_are_read_afresh() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.live("t", Some((id(5), "e")), &live_frame(5));
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        let req = r.start("t").unwrap();
        r.unsubscribed("t");
        r.wait(&t, conn(2, 6));
        assert!(r
            .finish("t", req.serial, Ok(page(6, 8, 0)), room)
            .is_empty());
        let next = r.start("t").unwrap();
        assert_eq!(next.after, Some(id(6)));
        let out = r.finish("t", next.serial, Ok(page(7, 8, 0)), room);
        assert_eq!(out.len(), 1, "no catch-up for the subscribers that left");
        assert_eq!(seqs(&out[0].frames), ["ack:true", "7", "8"]);
    }

    #[test]
    fn a_catch_up_that_cannot_read_gives_up_after_the_hold_limit() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.live("t", Some((id(5), "e")), &live_frame(5));
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        // The command connection is away: no read starts; messages are held.
        assert_eq!(
            r.live("t", Some((id(6), "e")), &live_frame(6)),
            Gate::Nobody
        );
        assert!(r.expire(Instant::now()).is_empty(), "not yet");
        let out = r.expire(Instant::now() + HOLD_LIMIT + Duration::from_secs(1));
        assert_eq!(out.len(), 1);
        assert_eq!(seqs(&out[0].1.frames), ["ack:false", "6"]);
        assert_eq!(r.live("t", Some((id(7), "e")), &live_frame(7)), Gate::All);
    }

    #[test]
    fn a_catch_up_into_a_new_epoch_that_lost_nothing_since_gives_all_of_it_after_the_notice() {
        let mut r = Replays::default();
        let t: Rc<str> = Rc::from("t");
        r.live("t", Some((id(5), "e")), &live_frame(5));
        r.reconnected(std::slice::from_ref(&t), true, |_| true);
        let req = r.start("t").unwrap();
        let mut fresh = page(1, 2, 0);
        fresh.epoch = Some("new".into());
        fresh.trimmed = Some(MessageId { ms: 0, seq: 0 });
        let out = r.finish("t", req.serial, Ok(fresh), room);
        assert_eq!(seqs(&out[0].frames), ["ack:false", "1", "2"]);
    }

    #[test]
    fn pages_parse_from_the_function_reply() {
        let bulk = |s: &str| BytesFrame::BulkString(Bytes::copy_from_slice(s.as_bytes()));
        let entry = |i: &str, d: &str| {
            BytesFrame::Array(vec![bulk(i), BytesFrame::Array(vec![bulk("d"), bulk(d)])])
        };
        let reply = BytesFrame::Array(vec![
            bulk("ep"),
            bulk("10-2"),
            bulk("0-0"),
            BytesFrame::Array(vec![entry("10-1", "{\"a\":1}"), entry("10-2", "[2]")]),
        ]);
        let p = parse_page(&reply, 3).unwrap();
        assert_eq!(p.epoch.as_deref(), Some("ep"));
        assert_eq!(p.last, Some(MessageId { ms: 10, seq: 2 }));
        assert_eq!(p.entries.len(), 2);
        assert!(!p.cut);
        let p = parse_page(&reply, 2).unwrap();
        assert!(p.cut);
        assert_eq!(p.entries.len(), 1);
        let none = BytesFrame::Array(vec![
            BytesFrame::Null,
            BytesFrame::Null,
            BytesFrame::Null,
            BytesFrame::Array(vec![]),
        ]);
        let p = parse_page(&none, 0).unwrap();
        assert!(p.epoch.is_none() && p.last.is_none());
    }
}
