//! The command connection's queue: commands waiting to be written, bounded in count and
//! bytes so that a stalled Redis cannot pile them up, and the commands written and not
//! yet answered, whose replies Redis sends in order. Pure bookkeeping, no I/O.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::masters::Route;

/// Commands waiting to be written beyond which new ones are refused.
const MAX_WAITING: usize = 100_000;
/// Bytes waiting to be written beyond which new commands are refused.
const MAX_WAITING_BYTES: usize = 64 * 1024 * 1024;

pub struct CommandQueue<R> {
    waiting: VecDeque<(Bytes, Route, R)>,
    waiting_bytes: usize,
    /// Written, in order, with when.
    in_flight: VecDeque<(Instant, R)>,
}

impl<R> Default for CommandQueue<R> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            waiting_bytes: 0,
            in_flight: VecDeque::new(),
        }
    }
}

impl<R> CommandQueue<R> {
    /// Whether a command of about `size` bytes fits.
    pub fn has_room(&self, size: usize) -> bool {
        self.waiting.len() < MAX_WAITING && self.waiting_bytes + size <= MAX_WAITING_BYTES
    }

    /// Queues an encoded command, after the others.
    pub fn push(&mut self, bytes: Bytes, route: Route, reply: R) {
        self.waiting_bytes += bytes.len();
        self.waiting.push_back((bytes, route, reply));
    }

    /// Queues an encoded command before every other (what a new connection must run
    /// first).
    pub fn push_front(&mut self, bytes: Bytes, route: Route, reply: R) {
        self.waiting_bytes += bytes.len();
        self.waiting.push_front((bytes, route, reply));
    }

    /// Everything waiting, in order, to write now, counted as written at `now`.
    /// `None` when nothing waits.
    pub fn take_for_write(&mut self, now: Instant) -> Option<Vec<(Bytes, Route)>> {
        if self.waiting.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(self.waiting.len());
        for (bytes, route, reply) in self.waiting.drain(..) {
            out.push((bytes, route));
            self.in_flight.push_back((now, reply));
        }
        self.waiting_bytes = 0;
        Some(out)
    }

    /// The handler of the next reply; `None` when nothing was written (a reply
    /// without a command).
    pub fn answered(&mut self) -> Option<R> {
        self.in_flight.pop_front().map(|(_, r)| r)
    }

    /// When the oldest unanswered command was written.
    pub fn oldest_unanswered(&self) -> Option<Instant> {
        self.in_flight.front().map(|(t, _)| *t)
    }

    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Nothing waits and nothing is unanswered.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.in_flight.is_empty()
    }

    /// Every command written or waiting, in that order, for failing them all: the
    /// connection is gone.
    pub fn drain_all(&mut self) -> Vec<R> {
        self.waiting_bytes = 0;
        let written = self.in_flight.drain(..).map(|(_, r)| r);
        written
            .chain(self.waiting.drain(..).map(|(_, _, r)| r))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_match_commands_in_the_order_written() {
        let mut q = CommandQueue::default();
        q.push(Bytes::from_static(b"b"), Route::Slot(7), 2);
        q.push_front(Bytes::from_static(b"a"), Route::All, 1);
        let t = Instant::now();
        assert_eq!(
            q.take_for_write(t),
            Some(vec![
                (Bytes::from_static(b"a"), Route::All),
                (Bytes::from_static(b"b"), Route::Slot(7))
            ])
        );
        assert_eq!(q.take_for_write(t), None);
        q.push(Bytes::from_static(b"c"), Route::All, 3);
        assert_eq!(q.oldest_unanswered(), Some(t));
        assert_eq!((q.answered(), q.answered()), (Some(1), Some(2)));
        assert!(!q.is_idle() && q.has_waiting());
        // A lost connection fails what was written before what still waited.
        q.take_for_write(t);
        q.push(Bytes::from_static(b"d"), Route::All, 4);
        assert_eq!(q.drain_all(), vec![3, 4]);
        assert!(q.is_idle() && q.answered().is_none());
    }

    #[test]
    fn room_is_bounded_in_count_and_bytes() {
        let mut q = CommandQueue::default();
        assert!(q.has_room(MAX_WAITING_BYTES) && !q.has_room(MAX_WAITING_BYTES + 1));
        q.push(Bytes::from(vec![0u8; 1024]), Route::All, ());
        assert!(!q.has_room(MAX_WAITING_BYTES - 1023));
        for _ in 1..MAX_WAITING {
            q.push(Bytes::new(), Route::All, ());
        }
        assert!(!q.has_room(0));
        q.take_for_write(Instant::now());
        assert!(q.has_room(MAX_WAITING_BYTES));
    }
}
