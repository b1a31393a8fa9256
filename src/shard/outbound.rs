//! A connection's shared half: its bounded send queue, the shard tick that writes it,
//! the list of connections the shard's reactor must look at, and the timestamps the
//! shard's sweeper reads. The fan-out path, the sweeper and the reactor all hold an
//! `Rc<ConnHandle>`.
//!
//! Sending is by tick. A topic message costs one append to its topic's log on the
//! shard (`topic_log`); each subscriber is owed a *run* of that log, handed to it once
//! per tick, not a queue entry per message. A reply, a ping or a close goes out at once
//! with one `send` when nothing waits for the connection, and queues behind what does
//! otherwise (closing any run before it, so the stream keeps its order). The first
//! thing owed to a connection with no write in flight puts it on its shard's owed list
//! and wakes the shard's flush task ([`flush_loop`]). That task runs after every task
//! that was already ready (the inbox batch, the connections' reads, the Redis
//! subscriber), so everything that reached the shard since the last tick is applied
//! first; then each owed connection gets one `sendmsg` gathering all it is owed, its
//! runs read in place from the logs (`sys`). A connection owed many messages of one
//! topic costs one system call and no per-message work but the gather (messages of
//! topics that interleave, or replies between them, cost a run each): the cost per
//! delivery falls as the rate rises. What the socket does not take stays owed: the connection is
//! *blocked*, and the shard's reactor (`ws::reactor`) writes the rest when the socket
//! reports room again. Runs still unwritten when the tick ends become `Bytes` handles
//! in the connection's own queue, under the slow-consumer limit (`settle`), and the
//! logs empty.

use std::cell::{Cell, Ref, RefCell};
use std::collections::VecDeque;
use std::io::{ErrorKind, IoSlice};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::topic_log::TopicLog;
use crate::metrics::{CloseReason, ShardMetrics};

pub use crate::close::{CloseRequest, ShardClose};

/// Result of queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued; it leaves at the shard's next tick, or behind a write in progress.
    Queued,
    /// The queue was full and the policy dropped this frame.
    Dropped,
    /// The queue was full and the connection is now closing (or already was).
    Closing,
}

/// Frames handed to one `sendmsg` at most (the kernel's IOV_MAX is 1024).
const IOV_BATCH: usize = 64;

/// One thing a connection is owed.
pub enum Item {
    /// A frame of its own (a reply, a direct message, a frame a tick left unwritten).
    Frame(Bytes),
    /// A run of topic frames read in place: `log`'s frames `from .. to`, where `to`
    /// is `OPEN` while the run is the last item and takes later appends
    /// (`topic_log`).
    Log {
        log: Rc<TopicLog>,
        from: u32,
        to: u32,
    },
}

/// The end of a run that still takes appends.
const OPEN: u32 = u32::MAX;

/// Frames `from .. to` of `frames` (`to` may be `OPEN`).
fn run(frames: &[Bytes], from: u32, to: u32) -> &[Bytes] {
    let end = (to as usize).min(frames.len());
    &frames[(from as usize).min(end)..end]
}

pub struct ConnHandle {
    /// Node-unique connection number (shown as `<shard>-<id>` to clients).
    pub id: u64,
    /// The socket, for the tick's writes; -1 once the connection is unregistered (the
    /// reactor unregisters it before closing the socket), and in unit tests (queue
    /// only).
    fd: Cell<RawFd>,
    /// What the connection is owed, in order: frames, and runs of topic frames read
    /// in place from their topic's log (`Item::Log`).
    queue: RefCell<VecDeque<Item>>,
    /// Bytes of the queue's frames (`Item::Frame`); runs of topic frames are counted
    /// when written, or when the tick ends with them unwritten (`settle`).
    queued: Cell<usize>,
    /// On the shard's owed list: the next tick writes the queue.
    owed: Cell<bool>,
    /// The queue's front frame is the rest of one partly written: nothing may go out
    /// before it, a close frame included.
    front_partial: Cell<bool>,
    /// On the tick's list of blocked connections handed runs (settled at its end).
    held: Cell<bool>,
    /// Counted in the shard's connections at risk (queue over half the limit).
    at_risk: Cell<bool>,
    /// On the reactor's work list (a close to start, an abort, more to read).
    scheduled: Cell<bool>,
    /// The connection's key in its shard's table; `u32::MAX` once it has left it.
    pub key: Cell<u32>,
    /// The established connection's socket, frame reader and protocol state, which
    /// only the shard's reactor touches (taken out while it runs). `None` during the
    /// upgrade. Kept here so that a connection is one allocation.
    pub io: Cell<Option<crate::ws::conn::Conn>>,
    /// Shard clock (seconds) of the last byte received.
    pub last_rx: Cell<u32>,
    /// Shard clock when the socket last refused bytes that are still queued (the
    /// connection is blocked until the socket has room); 0 when not blocked.
    pub writing_since: Cell<u32>,
    /// Shard clock when our close frame was queued; 0 while open.
    pub closing_since: Cell<u32>,
    /// Why that close frame was sent: the reason counted if the client never answers it.
    pub closing_why: Cell<CloseReason>,
    pub ping_sent: Cell<bool>,
    close: Cell<Option<ShardClose>>,
    abort: Cell<Option<CloseReason>>,
    /// The user id from the client's token; `None` for anonymous clients.
    pub user: Option<std::rc::Rc<str>>,
    /// What the client's token grants beyond the topic namespaces; `None` when nothing.
    /// A `refresh` replaces it.
    pub grants: Cell<Option<Box<crate::permissions::Grants>>>,
}

impl ConnHandle {
    pub fn new(id: u64, fd: RawFd, now: u32, user: Option<std::rc::Rc<str>>) -> Self {
        Self {
            id,
            fd: Cell::new(fd),
            user,
            grants: Cell::new(None),
            queue: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            owed: Cell::new(false),
            front_partial: Cell::new(false),
            scheduled: Cell::new(false),
            held: Cell::new(false),
            at_risk: Cell::new(false),
            key: Cell::new(u32::MAX),
            io: Cell::new(None),
            last_rx: Cell::new(now),
            writing_since: Cell::new(0),
            closing_since: Cell::new(0),
            closing_why: Cell::new(CloseReason::Client),
            ping_sent: Cell::new(false),
            close: Cell::new(None),
            abort: Cell::new(None),
        }
    }

    /// Queues a frame for this connection alone (a direct message, a resume's missed
    /// frames, a catch-up) for the next tick if the queue stays within `limit` bytes (an
    /// empty queue takes one frame of any size); otherwise applies the slow-consumer
    /// policy (see [`ConnHandle::admit`]).
    pub fn push(
        self: &Rc<Self>,
        frame: Bytes,
        limit: usize,
        drop_when_full: bool,
        m: &ShardMetrics,
    ) -> Push {
        if let Some(refused) = self.admit(frame.len(), limit, drop_when_full, m) {
            return refused;
        }
        self.enqueue(frame);
        Push::Queued
    }

    /// A reply to the client (or a pong), bounded like a delivery under the `close`
    /// policy. Replies come one per request, so there is nothing to batch: when nothing
    /// waits for this connection it is sent at once, and an idle connection that is
    /// answered or pinged never needs queue storage.
    pub fn reply(self: &Rc<Self>, frame: Bytes, limit: usize, m: &ShardMetrics) -> Push {
        if let Some(refused) = self.admit(frame.len(), limit, false, m) {
            return refused;
        }
        self.send_or_enqueue(frame, false, m)
    }

    /// Sends or queues a frame regardless of the limit: only for frames bounded in
    /// number by the gateway itself (one close, one ping per interval).
    pub fn push_unbounded(self: &Rc<Self>, frame: Bytes, m: &ShardMetrics) -> Push {
        self.send_or_enqueue(frame, false, m)
    }

    /// Like `push_unbounded`, for what the socket did not take of a first write (the
    /// upgrade response and welcome, `out`, of which it took `sent` bytes).
    pub fn push_rest(self: &Rc<Self>, out: &[u8], sent: usize, m: &ShardMetrics) -> Push {
        self.send_or_enqueue(Bytes::copy_from_slice(&out[sent..]), sent > 0, m)
    }

    /// Whether `len` more bytes may be queued; if not, what the policy did. Before
    /// judging, a connection whose queue only waits for this tick is written now: a
    /// client is slow when its socket refuses bytes, not when one tick owes it much.
    /// Under `close` the queue is discarded and the connection closed (aborted at once
    /// if a write is stuck on a full socket or a frame is half written, since no close
    /// frame could follow cleanly);
    /// under `drop` (`drop_when_full`) this frame is skipped.
    fn admit(
        &self,
        len: usize,
        limit: usize,
        drop_when_full: bool,
        m: &ShardMetrics,
    ) -> Option<Push> {
        if self.closing() {
            return Some(Push::Closing);
        }
        if self.held.get() && self.writing_since.get() != 0 {
            // Blocked with runs handed this tick: they are older than this frame, so
            // they are judged first, under the policy of the last tick.
            let drop_runs = TICK.with(|t| t.drop_when_full.get());
            self.settle(limit, drop_runs, m);
            if self.close_pending() || self.abort.get().is_some() {
                return Some(Push::Closing);
            }
        }
        if self.queued.get() > 0 && self.queued.get() + len > limit && self.owed.get() {
            self.flush_owed(m);
        }
        let queued = self.queued.get();
        if queued == 0 || queued + len <= limit {
            return None;
        }
        if drop_when_full {
            return Some(Push::Dropped);
        }
        self.close_slow();
        Some(Push::Closing)
    }

    /// Whether the connection is closing (or asked to, or aborted): it takes nothing
    /// more.
    fn closing(&self) -> bool {
        self.closing_since.get() != 0 || self.close_pending() || self.abort.get().is_some()
    }

    /// The `close` policy: discards the queue and closes the connection with 1008. A
    /// close frame can follow only whole frames: with a write stuck on the full socket,
    /// or part of a frame already on the wire, the connection is dropped instead.
    fn close_slow(&self) {
        let stuck = self.writing_since.get() != 0 || self.front_partial.get();
        release_queue(&mut self.queue.borrow_mut());
        self.set_queued(0);
        self.front_partial.set(false);
        self.request_close(ShardClose::SlowConsumer);
        if stuck {
            self.abort(CloseReason::SlowConsumer);
        }
    }

    /// Sends `frame` with one non-blocking `send` when nothing waits for this
    /// connection; queues what the socket does not take. `partial`: the frame is the
    /// rest of one already begun.
    fn send_or_enqueue(self: &Rc<Self>, frame: Bytes, partial: bool, m: &ShardMetrics) -> Push {
        let fd = self.fd.get();
        let idle =
            self.queue.borrow().is_empty() && !self.owed.get() && self.writing_since.get() == 0;
        if !idle || fd < 0 {
            self.enqueue(frame);
            return Push::Queued;
        }
        match crate::tls::send(self.key.get(), fd, &frame) {
            Ok(n) if n == frame.len() => {
                m.frames_out.inc();
                m.bytes_out.add(n as u64);
            }
            Ok(n) => {
                m.bytes_out.add(n as u64);
                self.enqueue(frame.slice(n..));
                self.front_partial.set(true);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                self.enqueue(frame);
                self.front_partial.set(partial);
            }
            Err(_) => self.abort(CloseReason::IoError),
        }
        self.blocked_if_held();
        Push::Queued
    }

    /// Through TLS, records the socket did not take wait in the session: the
    /// connection is blocked until the socket has room, like one with a queue.
    pub fn blocked_if_held(&self) {
        if self.writing_since.get() == 0 && crate::tls::holds(self.key.get()) {
            self.writing_since.set(CLOCK.with(Cell::get).max(1));
        }
    }

    /// Appends a frame; the first one owed by an idle connection puts it on the tick's
    /// list. One behind a blocked write waits for the socket to have room (the
    /// reactor writes it then).
    fn enqueue(self: &Rc<Self>, frame: Bytes) {
        self.set_queued(self.queued.get() + frame.len());
        {
            let mut q = self.queue.borrow_mut();
            if q.capacity() == 0 {
                *q = spare_queue();
            }
            // A run still taking appends ends here: what reaches the shard after this
            // frame goes out after it.
            self.seal(&mut q, None);
            q.push_back(Item::Frame(frame));
        }
        if self.writing_since.get() == 0 {
            self.owe();
        }
    }

    /// Sets the bytes queued, keeping the shard's count of connections at risk
    /// (`at_risk`) in step.
    fn set_queued(&self, bytes: usize) {
        self.queued.set(bytes);
        TICK.with(|t| {
            let half = t.half_limit.get();
            let risk = half > 0 && bytes > half;
            if risk != self.at_risk.replace(risk) {
                let n = t.at_risk.get();
                t.at_risk.set(if risk { n + 1 } else { n - 1 });
            }
        });
    }

    /// Puts the connection on the tick's list (once per tick). A blocked connection is
    /// not: the reactor writes its queue when the socket has room.
    fn owe(self: &Rc<Self>) {
        if !self.owed.replace(true) {
            TICK.with(|t| t.add(&t.owed, self.clone()));
        }
    }

    /// Closes the open run at the back of `q`, if any, at its log's current length: the
    /// connection then waits on that log for its next append. With `only`, just a run
    /// on that log, and the connection does not wait (`close_run`). Returns whether a
    /// run was closed.
    fn seal(&self, q: &mut VecDeque<Item>, only: Option<&Rc<TopicLog>>) -> bool {
        let Some(Item::Log { log, from, to }) = q.back_mut() else {
            return false;
        };
        if *to != OPEN || only.is_some_and(|l| !Rc::ptr_eq(l, log)) {
            return false;
        }
        *to = log.appended();
        if only.is_none() {
            log.wait(self.key.get(), self.id);
        }
        if *from >= *to {
            q.pop_back();
        }
        true
    }

    /// The tick's first message on `log` (or the first since this connection's last
    /// run there ended): the connection reads the log from `from` on.
    pub fn open_run(self: &Rc<Self>, log: &Rc<TopicLog>, from: u32, m: &ShardMetrics) {
        if self.closing() || self.fd.get() < 0 {
            m.dropped.inc();
            return;
        }
        {
            let mut q = self.queue.borrow_mut();
            if q.capacity() == 0 {
                *q = spare_queue();
            }
            if let Some(Item::Log { log: back, to, .. }) = q.back() {
                if *to == OPEN && Rc::ptr_eq(back, log) {
                    return;
                }
            }
            self.seal(&mut q, None);
            q.push_back(Item::Log {
                log: log.clone(),
                from,
                to: OPEN,
            });
        }
        if self.writing_since.get() == 0 {
            self.owe();
        } else if !self.held.replace(true) {
            // Blocked: if the socket has no room by the tick's end, the run becomes
            // queued frames then, under the limit.
            TICK.with(|t| t.add(&t.held, self.clone()));
        }
    }

    /// Ends this connection's open run on `log` at its current length, without waiting
    /// for the next append (an unsubscribe, or a message it must skip). Returns whether
    /// it had one.
    pub fn close_run(&self, log: &Rc<TopicLog>) -> bool {
        self.seal(&mut self.queue.borrow_mut(), Some(log))
    }

    /// At the tick's end, the runs this connection was not written whole become frames
    /// of its own queue (the log empties), each admitted under the slow-consumer
    /// limit: under `drop` a frame that would pass it is skipped; under `close` the
    /// connection is closed as `admit` does.
    pub fn settle(&self, limit: usize, drop_when_full: bool, m: &ShardMetrics) {
        self.held.set(false);
        let has_runs = self
            .queue
            .borrow()
            .iter()
            .any(|i| matches!(i, Item::Log { .. }));
        if !has_runs {
            return;
        }
        let mut old = std::mem::take(&mut *self.queue.borrow_mut());
        let mut q = spare_queue();
        let (mut delivered, mut dropped) = (0, 0);
        let mut over = false;
        for item in old.drain(..) {
            let (log, from, to) = match item {
                Item::Frame(f) => {
                    q.push_back(Item::Frame(f));
                    continue;
                }
                Item::Log { log, from, to } => (log, from, to),
            };
            if to == OPEN {
                // Settled before the tick's end (`admit`): later appends come as a new
                // run.
                log.wait(self.key.get(), self.id);
            }
            for f in run(&log.frames(), from, to) {
                let queued = self.queued.get();
                if !over && (queued == 0 || queued + f.len() <= limit) {
                    self.set_queued(queued + f.len());
                    q.push_back(Item::Frame(f.clone()));
                    delivered += 1;
                } else {
                    dropped += 1;
                    over |= !drop_when_full;
                }
            }
        }
        release_queue(&mut old);
        *self.queue.borrow_mut() = q;
        if over {
            // Closed as a slow consumer: what was settled is discarded with the rest.
            m.dropped.add(dropped + delivered);
            self.close_slow();
            return;
        }
        m.deliveries.add(delivered);
        m.dropped.add(dropped);
        if self.queue.borrow().is_empty() {
            release_queue(&mut self.queue.borrow_mut());
        }
    }

    /// The tick's write: everything queued, in order, with as few `sendmsg` calls as
    /// `IOV_BATCH` allows. What the socket does not take stays queued and the
    /// connection is blocked until the socket has room ([`ConnHandle::write_ready`]).
    /// Returns whether it wrote (called the kernel).
    pub fn flush_owed(&self, m: &ShardMetrics) -> bool {
        if !self.owed.replace(false) || self.writing_since.get() != 0 {
            return false;
        }
        self.write_queue(m)
    }

    /// The socket has room again: writes what a blocked connection still owes.
    /// Returns whether it wrote.
    pub fn write_ready(&self, m: &ShardMetrics) -> bool {
        if self.writing_since.get() == 0 || self.owed.get() {
            return false;
        }
        let since = self.writing_since.replace(0);
        let before = m.bytes_out.get();
        let wrote = self.write_queue(m);
        if self.writing_since.get() != 0 && m.bytes_out.get() == before {
            // Nothing taken: the write-timeout clock keeps running from its start.
            self.writing_since.set(since);
        }
        wrote
    }

    /// Writes the queue now, ahead of the tick: for a connection about to close,
    /// which must not leave frames behind. Does nothing while blocked.
    pub fn flush_now(&self, m: &ShardMetrics) -> bool {
        self.owed.set(false);
        if self.writing_since.get() != 0 {
            return false;
        }
        self.write_queue(m)
    }

    /// Whether the socket refused bytes that are still queued.
    pub fn blocked(&self) -> bool {
        self.writing_since.get() != 0
    }

    fn write_queue(&self, m: &ShardMetrics) -> bool {
        let fd = self.fd.get();
        if fd < 0 || self.abort.get().is_some() {
            return false;
        }
        let key = self.key.get();
        // Through TLS, the records of an earlier write go first.
        match crate::tls::flush(key, fd) {
            Ok(true) => {}
            Ok(false) => {
                self.writing_since.set(CLOCK.with(Cell::get).max(1));
                return true;
            }
            Err(_) => {
                self.abort(CloseReason::IoError);
                return true;
            }
        }
        let mut wrote = false;
        loop {
            let q = self.queue.borrow();
            if q.is_empty() {
                break;
            }
            // The runs among the first items, borrowed from their logs for the call.
            let logs: [Option<Ref<'_, Vec<Bytes>>>; IOV_BATCH] =
                std::array::from_fn(|i| match q.get(i) {
                    Some(Item::Log { log, .. }) => Some(log.frames()),
                    _ => None,
                });
            let mut iov = [IoSlice::new(&[]); IOV_BATCH];
            let mut n = 0;
            let mut total = 0;
            'gather: for (item, frames) in q.iter().zip(logs.iter()) {
                let frames = match (item, frames) {
                    (Item::Frame(f), _) => std::slice::from_ref(f),
                    (Item::Log { from, to, .. }, Some(frames)) => run(frames, *from, *to),
                    (Item::Log { .. }, None) => unreachable!("borrowed above"),
                };
                for frame in frames {
                    if n == IOV_BATCH {
                        break 'gather;
                    }
                    iov[n] = IoSlice::new(frame);
                    total += frame.len();
                    n += 1;
                }
            }
            if n == 0 {
                // Only runs with nothing in them yet: nothing to write.
                drop(logs);
                drop(q);
                self.consume(0, m);
                break;
            }
            let sent = crate::tls::send_vectored(key, fd, &iov[..n]);
            wrote = true;
            drop(logs);
            drop(q);
            match sent {
                Ok(written) => {
                    self.consume(written, m);
                    if written < total {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.abort(CloseReason::IoError);
                    return true;
                }
            }
        }
        let empty = self.queue.borrow().is_empty();
        if empty {
            release_queue(&mut self.queue.borrow_mut());
        }
        if !empty || crate::tls::holds(key) {
            // The socket is full: the reactor writes the rest when it has room.
            self.writing_since.set(CLOCK.with(Cell::get).max(1));
        }
        wrote
    }

    /// Drops the `written` bytes at the front of the queue, counting whole frames (and
    /// as deliveries, those read from a log). A frame of a run partly written leaves
    /// its rest as a frame of its own at the front. A run written whole leaves the
    /// queue; if it was open, the connection waits on its log for the next append.
    fn consume(&self, mut written: usize, m: &ShardMetrics) {
        m.bytes_out.add(written as u64);
        let mut q = self.queue.borrow_mut();
        let (mut frames, mut delivered) = (0, 0);
        while let Some(front) = q.front_mut() {
            let rest = match front {
                Item::Frame(f) => {
                    if written == 0 {
                        break;
                    }
                    let n = f.len().min(written);
                    written -= n;
                    self.set_queued(self.queued.get() - n);
                    if n < f.len() {
                        *f = f.slice(n..);
                        self.front_partial.set(true);
                        break;
                    }
                    q.pop_front();
                    frames += 1;
                    self.front_partial.set(false);
                    continue;
                }
                Item::Log { log, from, to } => {
                    let entries = log.frames();
                    let pending = run(&entries, *from, *to);
                    let mut whole = 0;
                    while whole < pending.len() && pending[whole].len() <= written {
                        written -= pending[whole].len();
                        whole += 1;
                    }
                    frames += whole as u64;
                    delivered += whole as u64;
                    let rest = (whole < pending.len() && written > 0)
                        .then(|| pending[whole].slice(written..));
                    let consumed = whole + usize::from(rest.is_some());
                    let done = consumed == pending.len();
                    *from += consumed as u32;
                    drop(entries);
                    if done {
                        if *to == OPEN {
                            log.wait(self.key.get(), self.id);
                        }
                        q.pop_front();
                        self.front_partial.set(false);
                    }
                    match rest {
                        Some(rest) => rest,
                        None if done => continue,
                        None => break,
                    }
                }
            };
            // A frame of a run went out in part: its rest leads the queue.
            written = 0;
            delivered += 1;
            self.set_queued(self.queued.get() + rest.len());
            q.push_front(Item::Frame(rest));
            self.front_partial.set(true);
            break;
        }
        debug_assert_eq!(written, 0, "more written than was queued");
        m.frames_out.add(frames);
        m.deliveries.add(delivered);
    }

    /// Whether any frame waits to be written.
    pub fn has_queued(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    /// The connection is gone from its shard: its socket is about to close, so no tick
    /// may write to that descriptor number again.
    pub fn detach(&self) {
        self.fd.set(-1);
        release_queue(&mut self.queue.borrow_mut());
        self.set_queued(0);
        self.front_partial.set(false);
    }

    /// Asks the connection to send a close frame (first request wins).
    pub fn request_close(&self, req: ShardClose) {
        if self.closing_since.get() == 0 && !self.close_pending() {
            self.close.set(Some(req));
            self.wake();
        }
    }

    /// Runs `f` on the grants of the client's token (out of their cell meanwhile).
    pub fn with_grants<R>(&self, f: impl FnOnce(Option<&crate::permissions::Grants>) -> R) -> R {
        let held = self.grants.take();
        let r = f(held.as_deref());
        self.grants.set(held);
        r
    }

    /// Withdraws the close the shard asked for with `req`, if the connection has not
    /// started it yet (a `refresh` handled in the same turn as its token's expiry).
    pub fn withdraw_close(&self, req: ShardClose) {
        if self.close.get() == Some(req) {
            self.close.set(None);
        }
    }

    fn close_pending(&self) -> bool {
        let c = self.close.get();
        c.is_some()
    }

    pub fn take_close_request(&self) -> Option<CloseRequest> {
        self.close.take().map(ShardClose::request)
    }

    /// Drops the socket at the reactor's next turn (write stalled, close timed out).
    pub fn abort(&self, why: CloseReason) {
        if self.abort.get().is_none() {
            self.abort.set(Some(why));
        }
        self.wake();
    }

    pub fn aborted(&self) -> Option<CloseReason> {
        self.abort.get()
    }

    /// Puts the connection on the reactor's work list (once). A connection the reactor
    /// has not adopted yet is looked at when it is.
    fn wake(&self) {
        let key = self.key.get();
        if key != u32::MAX && !self.scheduled.replace(true) {
            WORK.with(|w| w.add(key));
        }
    }

    /// Taken off the work list: the reactor is looking at it now.
    pub fn unschedule(&self) {
        self.scheduled.set(false);
    }
}

/// Queue storage kept for reuse, per shard thread: at most this many, of at most
/// `SPARE_QUEUE_SLOTS` frames each.
const SPARE_QUEUES: usize = 4096;
const SPARE_QUEUE_SLOTS: usize = 64;

thread_local! {
    /// Idle connections keep no queue storage; a connection that is owed something
    /// borrows it from here and gives it back once written. Allocating and freeing it
    /// each time left the freed blocks scattered between longer-lived ones (the
    /// allocator could not return those pages), which showed as resident memory per
    /// idle connection after a subscribe reply or a ping.
    static SPARE: RefCell<Vec<VecDeque<Item>>> = const { RefCell::new(Vec::new()) };
}

/// Empty queue storage, reused when there is some.
fn spare_queue() -> VecDeque<Item> {
    SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default()
}

/// Empties `q` and keeps its storage for the next connection that needs one.
fn release_queue(q: &mut VecDeque<Item>) {
    let mut storage = std::mem::take(q);
    if storage.capacity() == 0 || storage.capacity() > SPARE_QUEUE_SLOTS {
        return;
    }
    storage.clear();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_QUEUES {
            s.push(storage);
        }
    });
}

/// What this thread's shard's next tick must do: the connections owed a write, the
/// blocked ones handed runs (settled at the tick's end if still unwritten), and the
/// topic logs appended to (emptied at its end).
#[derive(Default)]
struct Tick {
    owed: RefCell<Vec<Rc<ConnHandle>>>,
    held: RefCell<Vec<Rc<ConnHandle>>>,
    logs: RefCell<Vec<Rc<TopicLog>>>,
    /// Ticks ended so far: a topic log's entries belong to the tick of this number.
    number: Cell<u64>,
    /// The slow-consumer policy the last tick applied (`drop` rather than `close`).
    drop_when_full: Cell<bool>,
    /// Connections whose queue holds more than half the slow-consumer limit.
    at_risk: Cell<usize>,
    /// Half the slow-consumer limit of the last tick (0 before one: nobody counts as
    /// at risk until a tick has said what the limit is).
    half_limit: Cell<usize>,
    waker: Cell<Option<Waker>>,
}

impl Tick {
    fn add<T>(&self, list: &RefCell<Vec<T>>, item: T) {
        list.borrow_mut().push(item);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn pending(&self) -> bool {
        !self.owed.borrow().is_empty()
            || !self.held.borrow().is_empty()
            || !self.logs.borrow().is_empty()
    }
}

thread_local! {
    /// One per shard thread: shards share nothing.
    static TICK: Tick = Tick::default();
    /// The connections (shard keys) the reactor must look at: a close to start, an
    /// abort, a read cut short.
    static WORK: Work = Work::default();
    /// The shard's clock (`Shard::now`), for the blocked-since stamps written here.
    static CLOCK: Cell<u32> = const { Cell::new(1) };
}

/// The number of the tick in progress (see `topic_log`).
pub fn tick() -> u64 {
    TICK.with(|t| t.number.get())
}

/// Connections of this shard whose queue holds more than half the slow-consumer
/// limit: those the policy will close or drop for first.
pub fn at_risk() -> usize {
    TICK.with(|t| t.at_risk.get())
}

/// `log` had its first append of this tick: it is emptied when the tick ends.
pub fn appended(log: Rc<TopicLog>) {
    TICK.with(|t| t.add(&t.logs, log));
}

/// Sets the clock that blocked-since stamps read (the shard's sweeper does, each second).
pub fn set_clock(now: u32) {
    CLOCK.with(|c| c.set(now));
}

#[derive(Default)]
struct Work {
    keys: RefCell<Vec<u32>>,
    waker: Cell<Option<Waker>>,
}

impl Work {
    fn add(&self, key: u32) {
        let mut keys = self.keys.borrow_mut();
        keys.push(key);
        if keys.len() == 1 {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

/// Puts connection `key` on the work list (a read the reactor cut short).
pub fn schedule(key: u32) {
    WORK.with(|w| w.add(key));
}

/// Moves the work list into `into` (which must be empty).
pub fn take_work(into: &mut Vec<u32>) {
    WORK.with(|w| std::mem::swap(&mut *w.keys.borrow_mut(), into));
}

/// Whether the work list has entries; if not, `cx` is woken when it gets one.
pub fn work_waiting(cx: &mut Context<'_>) -> bool {
    WORK.with(|w| {
        if w.keys.borrow().is_empty() {
            w.waker.set(Some(cx.waker().clone()));
            false
        } else {
            true
        }
    })
}

/// The tick: writes every owed connection's queue (see the module comment), then
/// settles the runs that stayed unwritten under the slow-consumer limit (`limit`
/// bytes; `drop_when_full` for the `drop` policy) and empties the topic logs. Returns
/// how many connections were written (a blocked connection, or one already written
/// when a full queue flushed it early, is not).
pub fn flush_all(m: &ShardMetrics, limit: usize, drop_when_full: bool) -> usize {
    let (mut batch, mut held, mut logs) = TICK.with(|t| {
        t.drop_when_full.set(drop_when_full);
        t.half_limit.set(limit / 2);
        (
            std::mem::take(&mut *t.owed.borrow_mut()),
            std::mem::take(&mut *t.held.borrow_mut()),
            std::mem::take(&mut *t.logs.borrow_mut()),
        )
    });
    let mut n = 0;
    for conn in &batch {
        n += usize::from(conn.flush_owed(m));
    }
    for conn in batch.drain(..).chain(held.drain(..)) {
        conn.settle(limit, drop_when_full, m);
    }
    for log in logs.drain(..) {
        log.clear();
    }
    // Keep the lists' storage for the next tick unless one was started meanwhile.
    TICK.with(|t| {
        t.number.set(t.number.get() + 1);
        for (list, spare) in [(&t.owed, batch), (&t.held, held)] {
            let mut list = list.borrow_mut();
            if list.is_empty() {
                *list = spare;
            }
        }
        let mut list = t.logs.borrow_mut();
        if list.is_empty() {
            *list = logs;
        }
    });
    n
}

/// The shard's flush task: waits until a connection is owed a write, lets every task
/// that is ready run first (the runtime's queue is first in, first out), then ticks
/// under the slow-consumer policy `policy` gives (limit in bytes, whether to drop).
pub async fn flush_loop(m: std::sync::Arc<ShardMetrics>, policy: impl Fn() -> (usize, bool)) {
    loop {
        std::future::poll_fn(|cx| {
            TICK.with(|t| {
                if t.pending() {
                    Poll::Ready(())
                } else {
                    t.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
        })
        .await;
        let (limit, drop_when_full) = policy();
        let writes = flush_all(&m, limit, drop_when_full);
        m.ticks.inc();
        m.tick_writes.add(writes as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static M: std::sync::LazyLock<ShardMetrics> = std::sync::LazyLock::new(ShardMetrics::default);

    /// A slow-consumer limit no test here reaches through `settle`.
    const LIMIT: usize = 1 << 30;

    fn handle(fd: RawFd) -> Rc<ConnHandle> {
        Rc::new(ConnHandle::new(1, fd, 0, None))
    }

    /// A connected pair: the server end's handle and the client socket.
    fn pair() -> (Rc<ConnHandle>, std::net::TcpStream, std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (handle(server.as_raw_fd()), server, peer)
    }

    #[test]
    fn limit_closes_slow_consumer_and_discards_queue() {
        let h = handle(-1);
        assert_eq!(
            h.push(Bytes::from(vec![0; 600]), 1000, false, &M),
            Push::Queued
        );
        assert_eq!(
            h.push(Bytes::from(vec![0; 600]), 1000, false, &M),
            Push::Closing
        );
        assert!(!h.has_queued());
        let req = h.take_close_request().unwrap();
        assert_eq!((req.code, req.why), (1008, CloseReason::SlowConsumer));
        flush_all(&M, LIMIT, false);
    }

    #[test]
    fn one_tick_writes_everything_owed_in_one_call_in_order() {
        use std::io::Read;
        let (h, _server, mut peer) = pair();
        let m = ShardMetrics::default();
        for i in 0..10u8 {
            assert_eq!(
                h.push(Bytes::from(vec![i; 100]), 1 << 20, false, &m),
                Push::Queued
            );
        }
        // Nothing is written before the tick.
        assert_eq!((m.bytes_out.get(), h.queued()), (0, 1000));
        assert!(!h.blocked());
        assert_eq!(flush_all(&m, LIMIT, false), 1);
        assert_eq!(
            (m.frames_out.get(), m.bytes_out.get(), h.queued()),
            (10, 1000, 0)
        );
        // A connection that owes nothing holds no queue storage: it went back for reuse.
        assert_eq!(h.queue.borrow().capacity(), 0);
        let spare = SPARE.with(|s| s.borrow().len());
        assert!(spare >= 1);
        let mut got = vec![0u8; 1000];
        peer.read_exact(&mut got).unwrap();
        for (i, chunk) in got.chunks(100).enumerate() {
            assert!(chunk.iter().all(|b| *b as usize == i));
        }
        // The next frame starts a new tick, in reused storage.
        h.push(Bytes::from_static(b"next"), 1 << 20, false, &m);
        assert_eq!(SPARE.with(|s| s.borrow().len()), spare - 1);
        assert_eq!(flush_all(&m, LIMIT, false), 1);
        assert_eq!(m.frames_out.get(), 11);
    }

    #[test]
    fn what_the_socket_refuses_stays_queued_until_it_has_room_in_order() {
        use std::io::Read;
        let (h, _server, mut peer) = pair();
        let m = ShardMetrics::default();
        h.push(Bytes::from_static(b"first"), 1 << 30, false, &m);
        // Nobody reads: tick after tick the socket fills, and the rest stays queued.
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let mut pushed = 5;
        loop {
            h.push(chunk.clone(), 1 << 30, false, &m);
            pushed += chunk.len();
            flush_all(&m, LIMIT, false);
            if h.queued() > 0 {
                break;
            }
            assert!(pushed < 64 << 20, "socket never filled");
        }
        // Blocked now, and a later frame goes behind the rest, never around it.
        assert!(h.blocked());
        assert_eq!(
            h.push(Bytes::from_static(b"last"), 1 << 30, false, &m),
            Push::Queued
        );
        assert_eq!(
            flush_all(&m, LIMIT, false),
            0,
            "a blocked connection is not owed to the tick"
        );
        // The reader drains the socket; each time it has room the rest goes out.
        peer.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 256 * 1024];
        for _ in 0..100_000 {
            match peer.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    h.write_ready(&m);
                }
                Err(e) => panic!("{e}"),
            }
            if got.len() == pushed + 4 {
                break;
            }
        }
        assert_eq!(got.len(), pushed + 4);
        assert!(!h.blocked() && !h.has_queued());
        assert_eq!(&got[..5], b"first");
        assert_eq!(&got[got.len() - 4..], b"last");
        assert!(got[5..got.len() - 4].iter().all(|b| *b == 7));
    }

    #[test]
    fn a_reply_to_an_idle_connection_goes_at_once_and_behind_what_is_owed_otherwise() {
        use std::io::Read;
        let (h, _server, mut peer) = pair();
        let m = ShardMetrics::default();
        assert_eq!(
            h.reply(Bytes::from_static(b"pong"), 1 << 20, &m),
            Push::Queued
        );
        assert_eq!(
            (m.frames_out.get(), h.queued(), h.queue.borrow().capacity()),
            (1, 0, 0)
        );
        // Owed a delivery: the reply waits behind it, for the same tick.
        h.push(Bytes::from_static(b"msg"), 1 << 20, false, &m);
        h.reply(Bytes::from_static(b"ack"), 1 << 20, &m);
        assert_eq!(m.frames_out.get(), 1);
        flush_all(&m, LIMIT, false);
        let mut got = [0u8; 10];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pongmsgack");
    }

    #[test]
    fn a_tick_owing_more_than_the_limit_is_not_a_slow_consumer_if_the_socket_takes_it() {
        let (h, _server, _peer) = pair();
        let m = ShardMetrics::default();
        // 40 frames of 1 KiB against a 4 KiB limit, all in one tick: the socket has room,
        // so each overflow writes what is owed instead of closing the connection.
        for _ in 0..40 {
            assert_eq!(
                h.push(Bytes::from(vec![1; 1024]), 4096, false, &m),
                Push::Queued
            );
        }
        flush_all(&m, LIMIT, false);
        assert_eq!((m.bytes_out.get(), h.queued()), (40 * 1024, 0));
        assert!(h.take_close_request().is_none());
    }

    #[test]
    fn a_slow_consumer_with_a_frame_half_written_is_dropped_not_sent_a_close_frame() {
        let h = handle(-1);
        h.push(Bytes::from(vec![1; 600]), 1000, false, &M);
        h.push(Bytes::from(vec![2; 300]), 1000, false, &M);
        // The socket took 100 bytes of the first frame, then filled: a close frame
        // queued now would land inside that frame.
        h.consume(100, &M);
        assert_eq!(
            h.push(Bytes::from(vec![3; 600]), 1000, false, &M),
            Push::Closing
        );
        assert_eq!(h.aborted(), Some(CloseReason::SlowConsumer));
        assert!(!h.has_queued());
        flush_all(&M, LIMIT, false);
    }

    #[test]
    fn a_slow_consumer_between_frames_gets_a_close_frame() {
        let h = handle(-1);
        h.push(Bytes::from(vec![1; 600]), 1000, false, &M);
        h.push(Bytes::from(vec![2; 300]), 1000, false, &M);
        // The socket took the first frame whole, then filled.
        h.consume(600, &M);
        assert_eq!(
            h.push(Bytes::from(vec![3; 800]), 1000, false, &M),
            Push::Closing
        );
        assert_eq!(h.aborted(), None);
        assert!(!h.has_queued());
        let req = h.take_close_request().unwrap();
        assert_eq!((req.code, req.why), (1008, CloseReason::SlowConsumer));
        flush_all(&M, LIMIT, false);
    }

    #[test]
    fn an_empty_queue_takes_one_frame_of_any_size() {
        let h = handle(-1);
        assert_eq!(
            h.push(Bytes::from(vec![0; 5000]), 1000, false, &M),
            Push::Queued
        );
        assert_eq!(
            h.push(Bytes::from(vec![0; 10]), 1000, false, &M),
            Push::Closing
        );
        flush_all(&M, LIMIT, false);
    }

    #[test]
    fn overflow_during_a_stuck_write_aborts() {
        let h = handle(-1);
        h.writing_since.set(5);
        h.push(Bytes::from(vec![0; 600]), 1000, false, &M);
        assert_eq!(
            h.push(Bytes::from(vec![0; 600]), 1000, false, &M),
            Push::Closing
        );
        assert_eq!(h.aborted(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn drop_policy_keeps_the_connection() {
        let h = handle(-1);
        assert_eq!(
            h.push(Bytes::from(vec![0; 600]), 1000, true, &M),
            Push::Queued
        );
        assert_eq!(
            h.push(Bytes::from(vec![0; 600]), 1000, true, &M),
            Push::Dropped
        );
        assert!(h.take_close_request().is_none());
        assert_eq!(h.queue.borrow().len(), 1);
        flush_all(&M, LIMIT, false);
    }

    /// A connection whose socket is full: its handle, sockets, and what it has queued.
    fn blocked_pair(
        m: &ShardMetrics,
    ) -> (Rc<ConnHandle>, std::net::TcpStream, std::net::TcpStream) {
        let (h, server, peer) = pair();
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        for _ in 0..1024 {
            if h.blocked() {
                break;
            }
            h.push(chunk.clone(), 1 << 30, false, m);
            flush_all(m, LIMIT, false);
        }
        assert!(h.blocked(), "socket never filled");
        (h, server, peer)
    }

    /// `conn` alone subscribed to each of `logs`, as the shard's slab and topic table.
    fn subscribed(
        conn: &Rc<ConnHandle>,
    ) -> (slab::Slab<Rc<ConnHandle>>, std::collections::HashSet<usize>) {
        let mut conns = slab::Slab::new();
        let key = conns.insert(conn.clone());
        conn.key.set(key as u32);
        (conns, [key].into())
    }

    fn runs(h: &ConnHandle) -> usize {
        h.queue
            .borrow()
            .iter()
            .filter(|i| matches!(i, Item::Log { .. }))
            .count()
    }

    #[test]
    fn a_blocked_connection_handed_interleaved_runs_is_settled_once_in_order() {
        let m = ShardMetrics::default();
        let (h, _server, _peer) = blocked_pair(&m);
        let (conns, subs) = subscribed(&h);
        let (a, b) = (TopicLog::new(), TopicLog::new());
        for i in 0..100u8 {
            let log = if i % 2 == 0 { &a } else { &b };
            log.append(&Bytes::from(vec![i; 10]), &subs, &conns, &[], &m);
        }
        // Topics that alternate cost a run per message, but one entry on the tick's list.
        assert_eq!(runs(&h), 100);
        assert_eq!(TICK.with(|t| t.held.borrow().len()), 1);
        let before = h.queued();
        flush_all(&m, LIMIT, false);
        assert_eq!(runs(&h), 0);
        assert_eq!(h.queued(), before + 1000);
        let q = h.queue.borrow();
        let tail: Vec<u8> = q
            .iter()
            .rev()
            .take(100)
            .map(|i| match i {
                Item::Frame(f) => f[0],
                Item::Log { .. } => unreachable!(),
            })
            .collect();
        assert!(
            tail.iter().rev().copied().eq(0..100u8),
            "settled out of order"
        );
    }

    #[test]
    fn runs_of_a_blocked_connection_are_judged_before_a_newer_reply() {
        let m = ShardMetrics::default();
        let (h, _server, _peer) = blocked_pair(&m);
        // The last tick ran under the drop policy.
        flush_all(&m, LIMIT, true);
        let (conns, subs) = subscribed(&h);
        let log = TopicLog::new();
        for i in 0..3u8 {
            log.append(&Bytes::from(vec![i; 60]), &subs, &conns, &[], &m);
        }
        let limit = h.queued() + 100;
        // The first run frame fits, the next two do not; the reply, newer, then fits.
        assert_eq!(
            h.reply(Bytes::from_static(b"0123456789"), limit, &m),
            Push::Queued
        );
        assert_eq!(m.dropped.get(), 2);
        assert_eq!(runs(&h), 0);
        let q = h.queue.borrow();
        let last: Vec<usize> = q
            .iter()
            .rev()
            .take(2)
            .map(|i| match i {
                Item::Frame(f) => f.len(),
                Item::Log { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(last, [10, 60]);
    }

    #[test]
    fn a_queue_over_half_the_limit_counts_as_at_risk_until_it_is_gone() {
        let m = ShardMetrics::default();
        let g = handle(-1);
        g.push(Bytes::from(vec![1; 3000]), 4000, false, &m);
        assert_eq!(
            at_risk(),
            0,
            "nothing counts before a tick says what the limit is"
        );
        g.detach();
        // The tick says what the limit is: 4,000 bytes.
        flush_all(&m, 4000, false);
        let h = handle(-1);
        h.push(Bytes::from(vec![1; 1500]), 4000, false, &m);
        assert_eq!(at_risk(), 0);
        h.push(Bytes::from(vec![1; 1500]), 4000, false, &m);
        assert_eq!(at_risk(), 1, "3,000 of 4,000 bytes queued");
        h.detach();
        assert_eq!(at_risk(), 0);
    }

    #[test]
    fn a_detached_connection_is_never_written() {
        let (h, server, _peer) = pair();
        let m = ShardMetrics::default();
        h.push(Bytes::from_static(b"late"), 1 << 20, false, &m);
        h.detach();
        drop(server);
        assert_eq!(
            flush_all(&m, LIMIT, false),
            0,
            "a detached connection is not written"
        );
        assert_eq!(m.bytes_out.get(), 0);
    }
}
