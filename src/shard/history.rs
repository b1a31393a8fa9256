//! A shard's recent topic messages: what a resuming client missed (`subscribe` with
//! `since`) and what `GET /v1/history` reads, in a single node.
//!
//! Every shard receives every topic message of its node, in id order (`broker`), so
//! each keeps a ring per topic of the `Bytes` frames it delivered: a reference to the
//! one frame built per message, not a copy. A resume is then answered on the client's
//! own shard from its own ring, in the same thread that delivers what comes next, so
//! the replay and the live messages meet without a gap or a duplicate.
//!
//! Rings are bounded by count (`history_size`) and age (`history_ttl_secs`). What
//! leaves a ring is remembered as its newest evicted id, so a resume from before it is
//! told `too_old` instead of silently missing messages. A ring that empties by age
//! stays as a tombstone (no entries, that id), so a quiet topic still resumes from its
//! last message; past `MAX_TOMBSTONES` per shard, tombstones are folded into one
//! shard-wide id (`dropped`), which errs on the side of `too_old`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use crate::protocol::{MessageId, NotRecovered};

/// Empty rings a shard keeps per topic before folding them into `dropped`: about 80
/// bytes each.
const MAX_TOMBSTONES: usize = 65_536;

/// Rings (topics) a shard keeps at most: a publisher that spreads messages over
/// endless topic names cannot grow history without bound. A message for a new topic
/// beyond it is not kept, and `dropped` says so.
const MAX_RINGS: usize = 100_000;

/// The bounds in force (from the configuration; 0 in either turns history off).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub size: usize,
    pub ttl_secs: u32,
}

impl Bounds {
    /// The bounds in force in `cfg`.
    pub fn of(cfg: &crate::config::Config) -> Self {
        Self {
            size: cfg.history_size,
            ttl_secs: u32::try_from(cfg.history_ttl_secs).unwrap_or(u32::MAX),
        }
    }

    pub fn off(self) -> bool {
        self.size == 0 || self.ttl_secs == 0
    }

    /// The age bound in milliseconds (what Redis trims a topic's stream by).
    pub fn ttl_ms(self) -> u64 {
        u64::from(self.ttl_secs) * 1000
    }
}

#[derive(Debug)]
struct Entry {
    id: MessageId,
    /// Shard clock (seconds) when it arrived.
    at: u32,
    frame: Bytes,
}

#[derive(Debug, Default)]
struct Ring {
    entries: VecDeque<Entry>,
    /// The newest id that left this ring (or that may have: see `dropped`).
    evicted: Option<MessageId>,
}

impl Ring {
    fn evict_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.evicted = Some(e.id);
        }
    }

    fn trim(&mut self, now: u32, b: Bounds) {
        while self.entries.len() > b.size {
            self.evict_front();
        }
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_sub(e.at) >= b.ttl_secs)
        {
            self.evict_front();
        }
    }
}

/// One shard's rings.
#[derive(Debug)]
pub struct History {
    topics: HashMap<Arc<str>, Ring>,
    /// The newest id of any ring dropped whole (tombstones folded, or history turned
    /// off): a topic without a ring may have lost messages up to here.
    dropped: Option<MessageId>,
    max_tombstones: usize,
    max_rings: usize,
    /// The newest id this shard has kept or skipped.
    latest: Option<MessageId>,
    entries: usize,
}

impl Default for History {
    fn default() -> Self {
        Self::with_tombstones(MAX_TOMBSTONES)
    }
}

impl History {
    fn with_tombstones(max_tombstones: usize) -> Self {
        Self {
            topics: HashMap::new(),
            dropped: None,
            max_tombstones,
            max_rings: MAX_RINGS,
            latest: None,
            entries: 0,
        }
    }

    /// Keeps `frame` (message `id` of `topic`, which arrived at shard time `now`).
    pub fn push(&mut self, topic: &Arc<str>, id: MessageId, frame: &Bytes, now: u32, b: Bounds) {
        self.latest = Some(id);
        if b.off() {
            if !self.topics.is_empty() {
                self.trim(now, b);
            }
            self.dropped = Some(id);
            return;
        }
        if self.topics.len() >= self.max_rings && !self.topics.contains_key(topic) {
            self.dropped = self.dropped.max(Some(id));
            return;
        }
        let dropped = self.dropped;
        // The topic's ring usually exists: look it up without touching the key's count.
        let ring = match self.topics.get_mut(&**topic) {
            Some(ring) => ring,
            None => self.topics.entry(topic.clone()).or_insert_with(|| Ring {
                entries: VecDeque::new(),
                evicted: dropped,
            }),
        };
        let before = ring.entries.len();
        ring.entries.push_back(Entry {
            id,
            at: now,
            frame: frame.clone(),
        });
        ring.trim(now, b);
        self.entries = self.entries + ring.entries.len() - before;
    }

    /// Ages every ring out (the sweep, once a second). Rings left empty stay as
    /// tombstones; all rings go when history is off, and tombstones when there are
    /// too many of them.
    pub fn trim(&mut self, now: u32, b: Bounds) {
        let mut entries = 0;
        let mut tombstones = 0;
        for ring in self.topics.values_mut() {
            if b.off() {
                ring.entries.clear();
                ring.evicted = ring.evicted.max(self.latest);
            } else {
                ring.trim(now, b);
            }
            entries += ring.entries.len();
            tombstones += usize::from(ring.entries.is_empty());
        }
        if b.off() || tombstones > self.max_tombstones {
            let mut dropped = self.dropped;
            self.topics.retain(|_, ring| {
                if ring.entries.is_empty() {
                    dropped = dropped.max(ring.evicted);
                    return false;
                }
                true
            });
            self.dropped = dropped;
        }
        self.entries = entries;
    }

    /// The frames of `topic` after `offset`, oldest first, or why they cannot all be
    /// given. `Ok` with none: nothing was missed.
    pub fn since(&self, topic: &str, offset: MessageId) -> Result<Vec<Bytes>, NotRecovered> {
        let Some(ring) = self.topics.get(topic) else {
            return match self.dropped {
                Some(d) if d > offset => Err(NotRecovered::TooOld),
                _ => Ok(Vec::new()),
            };
        };
        if ring.evicted.is_some_and(|e| e > offset) {
            return Err(NotRecovered::TooOld);
        }
        let start = ring.entries.partition_point(|e| e.id <= offset);
        Ok(ring
            .entries
            .range(start..)
            .map(|e| e.frame.clone())
            .collect())
    }

    /// Every frame `topic` still holds, oldest first.
    pub fn oldest_first(&self, topic: &str) -> Vec<Bytes> {
        self.topics.get(topic).map_or_else(Vec::new, |ring| {
            ring.entries.iter().map(|e| e.frame.clone()).collect()
        })
    }

    /// The newest message id this shard has seen (kept in a ring or not).
    pub fn latest(&self) -> Option<MessageId> {
        self.latest
    }

    /// Messages held, all topics together.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Topics with a ring.
    pub fn topics(&self) -> usize {
        self.topics.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        size: 3,
        ttl_secs: 10,
    };

    fn id(seq: u64) -> MessageId {
        MessageId { ms: 1000, seq }
    }

    fn frame(seq: u64) -> Bytes {
        Bytes::from(seq.to_string())
    }

    fn seqs(frames: &[Bytes]) -> Vec<u64> {
        frames
            .iter()
            .map(|f| std::str::from_utf8(f).unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn replays_what_follows_the_offset_in_order_and_shares_the_frame() {
        let mut h = History::default();
        let t: Arc<str> = Arc::from("t");
        let other: Arc<str> = Arc::from("other");
        for seq in 1..=3 {
            h.push(&t, id(seq), &frame(seq), 0, B);
            h.push(&other, id(100 + seq), &frame(100 + seq), 0, B);
        }
        assert_eq!(seqs(&h.since("t", id(1)).unwrap()), [2, 3]);
        assert_eq!(seqs(&h.since("t", id(3)).unwrap()), Vec::<u64>::new());
        // An offset from another topic's sequence works too: ids are node-wide.
        assert_eq!(seqs(&h.since("t", id(2)).unwrap()), [3]);
        assert_eq!((h.len(), h.topics()), (6, 2));
        let f = frame(7);
        h.push(&t, id(7), &f, 0, B);
        let got = h.since("t", id(3)).unwrap();
        assert_eq!(got[0].as_ptr(), f.as_ptr(), "a reference, not a copy");
    }

    #[test]
    fn an_offset_before_what_left_by_size_is_too_old() {
        let mut h = History::default();
        let t: Arc<str> = Arc::from("t");
        for seq in 1..=5 {
            h.push(&t, id(seq), &frame(seq), 0, B);
        }
        // 1 and 2 left; from 2 on nothing is missing, before it something is.
        assert_eq!(seqs(&h.since("t", id(2)).unwrap()), [3, 4, 5]);
        assert_eq!(h.since("t", id(1)), Err(NotRecovered::TooOld));
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn a_topic_quiet_past_the_age_limit_still_resumes_from_its_last_message() {
        let mut h = History::default();
        let t: Arc<str> = Arc::from("t");
        let busy: Arc<str> = Arc::from("busy");
        h.push(&t, id(1), &frame(1), 0, B);
        h.push(&t, id(2), &frame(2), 5, B);
        h.trim(10, B);
        assert_eq!(seqs(&h.since("t", id(1)).unwrap()), [2]);
        h.trim(15, B);
        assert_eq!((h.len(), h.topics()), (0, 1));
        assert_eq!(h.since("t", id(1)), Err(NotRecovered::TooOld));
        assert_eq!(h.since("t", id(2)), Ok(Vec::new()));
        // Other topics emptying later do not make "t" look older than it is.
        h.push(&busy, id(3), &frame(3), 20, B);
        h.trim(40, B);
        assert_eq!(h.since("t", id(2)), Ok(Vec::new()));
        assert_eq!(h.since("busy", id(2)), Err(NotRecovered::TooOld));
    }

    #[test]
    fn too_many_tombstones_fold_into_one_id_that_errs_towards_too_old() {
        let mut h = History::with_tombstones(1);
        let (t, u): (Arc<str>, Arc<str>) = (Arc::from("t"), Arc::from("u"));
        h.push(&t, id(1), &frame(1), 0, B);
        h.push(&u, id(2), &frame(2), 0, B);
        h.trim(10, B);
        assert_eq!(h.topics(), 0);
        // "t" never got 2, but its tombstone is gone: the shard can no longer tell.
        assert_eq!(h.since("t", id(1)), Err(NotRecovered::TooOld));
        assert_eq!(h.since("t", id(2)), Ok(Vec::new()));
        // A ring started after the fold inherits what may have been lost.
        h.push(&t, id(3), &frame(3), 20, B);
        assert_eq!(h.since("t", id(1)), Err(NotRecovered::TooOld));
        assert_eq!(seqs(&h.since("t", id(2)).unwrap()), [3]);
        // A topic never seen: nothing missed since the fold.
        assert_eq!(h.since("never", id(2)), Ok(Vec::new()));
    }

    #[test]
    fn a_topic_beyond_the_ring_cap_is_not_kept_and_says_so() {
        let mut h = History {
            max_rings: 2,
            ..History::default()
        };
        let (a, b, c): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        h.push(&a, id(1), &frame(1), 0, B);
        h.push(&b, id(2), &frame(2), 0, B);
        h.push(&c, id(3), &frame(3), 0, B);
        assert_eq!((h.topics(), h.len()), (2, 2));
        assert_eq!(h.since("c", id(2)), Err(NotRecovered::TooOld));
        // Topics already kept go on.
        h.push(&a, id(4), &frame(4), 0, B);
        assert_eq!(seqs(&h.since("a", id(1)).unwrap()), [4]);
    }

    #[test]
    fn turning_history_off_forgets_everything_and_says_so() {
        let mut h = History::default();
        let t: Arc<str> = Arc::from("t");
        h.push(&t, id(1), &frame(1), 0, B);
        let off = Bounds {
            size: 0,
            ttl_secs: 10,
        };
        h.push(&t, id(2), &frame(2), 0, off);
        assert_eq!((h.len(), h.topics()), (0, 0));
        assert_eq!(h.since("t", id(1)), Err(NotRecovered::TooOld));
        assert_eq!(h.latest(), Some(id(2)));
        // Back on: later offsets resume.
        h.push(&t, id(3), &frame(3), 0, B);
        assert_eq!(seqs(&h.since("t", id(2)).unwrap()), [3]);
    }

    /// Random pushes, trims and bound changes over a few topics, checked against a
    /// model that keeps everything. Always: an `Ok` answer is exactly what the topic got
    /// after the offset, in order (never a silent gap). While no ring was folded and
    /// history stayed on (`exact`): `TooOld` only when one of those messages is really
    /// gone. (Folds and history off err towards `TooOld` by design.)
    fn check_against_a_model(exact: bool) {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let min = usize::from(exact);
        for round in 0..300 {
            let mut h = History::with_tombstones(if exact { usize::MAX } else { 1 + round % 3 });
            let topics: Vec<Arc<str>> = ["a", "b", "c", "d"].map(Arc::from).to_vec();
            let mut model: Vec<(usize, u64)> = Vec::new(); // (topic, seq)
            let (mut seq, mut now) = (0u64, 1u32);
            let mut b = Bounds {
                size: 1 + (next() % 5) as usize,
                ttl_secs: 1 + (next() % 6) as u32,
            };
            for _ in 0..60 {
                match next() % 10 {
                    0 => now += (next() % 4) as u32,
                    1 => h.trim(now, b),
                    2 => {
                        b = Bounds {
                            size: min + (next() % 5) as usize,
                            ttl_secs: min as u32 + (next() % 6) as u32,
                        }
                    }
                    _ => {
                        seq += 1;
                        let t = (next() % 4) as usize;
                        h.push(&topics[t], id(seq), &frame(seq), now, b);
                        model.push((t, seq));
                    }
                }
                for (t, name) in topics.iter().enumerate() {
                    let offset = next() % (seq + 1);
                    let want: Vec<u64> = model
                        .iter()
                        .filter(|(mt, s)| *mt == t && *s > offset)
                        .map(|(_, s)| *s)
                        .collect();
                    match h.since(name, id(offset)) {
                        Ok(got) => assert_eq!(seqs(&got), want, "round {round}, topic {name}"),
                        Err(NotRecovered::TooOld) if exact => {
                            let kept = seqs(&h.oldest_first(name));
                            assert!(
                                want.iter().any(|s| !kept.contains(s)),
                                "round {round}, topic {name}: too_old although all of {want:?} is kept"
                            );
                        }
                        Err(NotRecovered::TooOld) => {}
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn answers_are_exact_while_nothing_is_folded() {
        check_against_a_model(true);
    }

    #[test]
    fn answers_never_hide_a_gap_whatever_happens() {
        check_against_a_model(false);
    }
}
