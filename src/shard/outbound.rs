//! A connection's shared half: its bounded send queue, the shard tick that writes it,
//! its wake-up signal and the timestamps the shard's sweeper reads. The fan-out path,
//! the sweeper and the connection's own task all hold an `Rc<ConnHandle>`.
//!
//! Sending is by tick. A delivery is queued as a `Bytes` handle to the one frame built
//! per node; a reply, a ping or a close goes out at once with one `send` when nothing
//! waits for the connection, and queues behind what does otherwise (so the stream keeps
//! its order). The first frame queued for a connection with no write in flight puts it
//! on its shard's owed list and
//! wakes the shard's flush task ([`flush_loop`]). That task runs after every task that
//! was already ready (the inbox batch, the connections' reads, the Redis subscriber), so
//! everything that reached the shard since the last tick is applied first; then each
//! owed connection gets one `sendmsg` carrying all it is owed (`sys`). A delivery
//! therefore costs a queue push, and a connection owed many messages costs one system
//! call, not one per message: the cost per delivery falls as the rate rises. What the
//! socket does not take stays queued, and the connection's own task writes it through
//! the runtime (io_uring) as the socket drains.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io::{ErrorKind, IoSlice};
use std::os::fd::RawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use crate::metrics::{CloseReason, ShardMetrics};
use crate::sys;

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

/// Queued frames are coalesced into one write of up to this many bytes when the
/// connection's task writes through the runtime (a socket that was full).
const COALESCE_BYTES: usize = 64 * 1024;

/// Frames handed to one `sendmsg` at most (the kernel's IOV_MAX is 1024).
const IOV_BATCH: usize = 64;

pub struct ConnHandle {
    /// Node-unique connection number (shown as `<shard>-<id>` to clients).
    pub id: u64,
    /// The socket, for the tick's writes; -1 once the connection is unregistered (its
    /// task unregisters before closing it), and in unit tests (queue only).
    fd: Cell<RawFd>,
    queue: RefCell<VecDeque<Bytes>>,
    queued: Cell<usize>,
    /// On the shard's owed list: the next tick writes the queue.
    owed: Cell<bool>,
    /// The queue's front frame is the rest of one partly written: nothing may go out
    /// before it, a close frame included.
    front_partial: Cell<bool>,
    waker: Cell<Option<Waker>>,
    /// Shard clock (seconds) of the last byte received.
    pub last_rx: Cell<u32>,
    /// Shard clock when the task's current write started; 0 when not writing.
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
}

impl ConnHandle {
    pub fn new(id: u64, fd: RawFd, now: u32, user: Option<std::rc::Rc<str>>) -> Self {
        Self {
            id,
            fd: Cell::new(fd),
            user,
            queue: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            owed: Cell::new(false),
            front_partial: Cell::new(false),
            waker: Cell::new(None),
            last_rx: Cell::new(now),
            writing_since: Cell::new(0),
            closing_since: Cell::new(0),
            closing_why: Cell::new(CloseReason::Client),
            ping_sent: Cell::new(false),
            close: Cell::new(None),
            abort: Cell::new(None),
        }
    }

    /// Queues a delivery for the next tick if the queue stays within `limit` bytes (an
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
        if self.closing_since.get() != 0 || self.close_pending() || self.abort.get().is_some() {
            return Some(Push::Closing);
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
        // A close frame can follow only whole frames: with a write stuck on the full
        // socket, or part of a frame already on the wire, the connection is dropped.
        let stuck = self.writing_since.get() != 0 || self.front_partial.get();
        release_queue(&mut self.queue.borrow_mut());
        self.queued.set(0);
        self.front_partial.set(false);
        self.request_close(ShardClose::SlowConsumer);
        if stuck {
            self.abort(CloseReason::SlowConsumer);
        }
        Some(Push::Closing)
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
        match sys::send_nonblocking(fd, &frame) {
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
        Push::Queued
    }

    /// Appends a frame; the first one owed by an idle connection puts it on the tick's
    /// list, one behind a write in progress wakes the task.
    fn enqueue(self: &Rc<Self>, frame: Bytes) {
        let was_empty = self.queue.borrow().is_empty();
        self.queued.set(self.queued.get() + frame.len());
        {
            let mut q = self.queue.borrow_mut();
            if q.capacity() == 0 {
                *q = spare_queue();
            }
            q.push_back(frame);
        }
        if self.owed.get() {
            // The tick already owes this connection its queue.
        } else if was_empty && self.writing_since.get() == 0 {
            self.owed.set(true);
            OWED.with(|o| o.add(self.clone()));
        } else {
            // The task is writing (or about to): it takes this frame behind the others.
            self.wake();
        }
    }

    /// The tick's write: everything queued, in order, with as few `sendmsg` calls as
    /// `IOV_BATCH` allows. What the socket does not take stays queued for the
    /// connection's task, which is woken to write it as the socket drains. Returns
    /// whether it wrote (called the kernel).
    pub fn flush_owed(&self, m: &ShardMetrics) -> bool {
        if !self.owed.replace(false) {
            return false;
        }
        let fd = self.fd.get();
        if fd < 0 || self.abort.get().is_some() {
            return false;
        }
        if self.writing_since.get() != 0 {
            self.wake();
            return false;
        }
        let mut wrote = false;
        loop {
            let q = self.queue.borrow();
            if q.is_empty() {
                break;
            }
            let mut iov = [IoSlice::new(&[]); IOV_BATCH];
            let mut n = 0;
            let mut total = 0;
            for (slot, frame) in iov.iter_mut().zip(q.iter()) {
                *slot = IoSlice::new(frame);
                total += frame.len();
                n += 1;
            }
            let sent = sys::send_vectored_nonblocking(fd, &iov[..n]);
            wrote = true;
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
        if self.queue.borrow().is_empty() {
            release_queue(&mut self.queue.borrow_mut());
        } else {
            self.wake();
        }
        wrote
    }

    /// Drops the `written` bytes at the front of the queue, counting whole frames.
    fn consume(&self, mut written: usize, m: &ShardMetrics) {
        m.bytes_out.add(written as u64);
        self.queued.set(self.queued.get().saturating_sub(written));
        let mut q = self.queue.borrow_mut();
        let mut frames = 0;
        while written > 0 {
            let Some(front) = q.front_mut() else { break };
            if front.len() <= written {
                written -= front.len();
                q.pop_front();
                frames += 1;
                self.front_partial.set(false);
            } else {
                *front = front.slice(written..);
                written = 0;
                self.front_partial.set(true);
            }
        }
        m.frames_out.add(frames);
    }

    /// Takes the next write for the connection's task: one frame, or several small ones
    /// coalesced. Returns the buffer and how many frames it holds.
    pub fn take_batch(&self) -> Option<(Bytes, u64)> {
        let mut q = self.queue.borrow_mut();
        let Some(first) = q.pop_front() else {
            release_queue(&mut q);
            return None;
        };
        // The task writes the whole batch (or drops the connection).
        self.front_partial.set(false);
        if first.len() >= COALESCE_BYTES
            || q.front()
                .is_none_or(|n| first.len() + n.len() > COALESCE_BYTES)
        {
            return Some((first, 1));
        }
        let mut buf = BytesMut::with_capacity(COALESCE_BYTES);
        buf.extend_from_slice(&first);
        let mut frames = 1;
        while let Some(next) = q.front() {
            if buf.len() + next.len() > COALESCE_BYTES {
                break;
            }
            buf.extend_from_slice(next);
            q.pop_front();
            frames += 1;
        }
        Some((buf.freeze(), frames))
    }

    /// Accounts for `n` bytes the task wrote to the socket.
    pub fn written(&self, n: usize) {
        self.queued.set(self.queued.get().saturating_sub(n));
    }

    /// Whether any frame waits to be written.
    pub fn has_queued(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Whether the connection's task should write the queue itself: frames wait and no
    /// tick is about to write them (the socket was full), or `finishing` (the task is
    /// about to close the socket and must not leave frames behind).
    pub fn task_owes(&self, finishing: bool) -> bool {
        self.has_queued() && (finishing || !self.owed.get())
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
        self.queued.set(0);
        self.front_partial.set(false);
    }

    /// Asks the task to send a close frame (first request wins).
    pub fn request_close(&self, req: ShardClose) {
        if self.closing_since.get() == 0 && !self.close_pending() {
            self.close.set(Some(req));
            self.wake();
        }
    }

    fn close_pending(&self) -> bool {
        let c = self.close.get();
        c.is_some()
    }

    pub fn take_close_request(&self) -> Option<CloseRequest> {
        self.close.take().map(ShardClose::request)
    }

    /// Tells the task to drop the socket now (write stalled, close timed out).
    pub fn abort(&self, why: CloseReason) {
        if self.abort.get().is_none() {
            self.abort.set(Some(why));
        }
        self.wake();
    }

    pub fn aborted(&self) -> Option<CloseReason> {
        self.abort.get()
    }

    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Resolves when the task has something to write, a close to start, or an abort.
    pub fn work(&self) -> Signal<'_> {
        Signal {
            handle: self,
            abort_only: false,
        }
    }

    /// Resolves only on abort (raced against a write in progress).
    pub fn aborted_signal(&self) -> Signal<'_> {
        Signal {
            handle: self,
            abort_only: true,
        }
    }
}

/// Future returned by [`ConnHandle::work`] and [`ConnHandle::aborted_signal`].
pub struct Signal<'a> {
    handle: &'a ConnHandle,
    abort_only: bool,
}

impl Future for Signal<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let h = self.handle;
        let ready = h.abort.get().is_some()
            || (!self.abort_only && (h.close_pending() || h.task_owes(false)));
        if ready {
            Poll::Ready(())
        } else {
            h.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
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
    static SPARE: RefCell<Vec<VecDeque<Bytes>>> = const { RefCell::new(Vec::new()) };
}

/// Empty queue storage, reused when there is some.
fn spare_queue() -> VecDeque<Bytes> {
    SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default()
}

/// Empties `q` and keeps its storage for the next connection that needs one.
fn release_queue(q: &mut VecDeque<Bytes>) {
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

/// The connections of this thread's shard owed a write at the next tick.
#[derive(Default)]
struct Owed {
    conns: RefCell<Vec<Rc<ConnHandle>>>,
    waker: Cell<Option<Waker>>,
}

impl Owed {
    fn add(&self, conn: Rc<ConnHandle>) {
        let mut conns = self.conns.borrow_mut();
        conns.push(conn);
        if conns.len() == 1 {
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }
}

thread_local! {
    /// One per shard thread: shards share nothing.
    static OWED: Owed = Owed::default();
}

/// The tick: writes every owed connection's queue (see the module comment). Returns
/// how many connections were written (a connection the task writes, or one already
/// written when a full queue flushed it early, is not).
pub fn flush_all(m: &ShardMetrics) -> usize {
    let mut batch = OWED.with(|o| std::mem::take(&mut *o.conns.borrow_mut()));
    let mut n = 0;
    for conn in batch.drain(..) {
        n += usize::from(conn.flush_owed(m));
    }
    // Keep the list's storage for the next tick unless one was started meanwhile.
    OWED.with(|o| {
        let mut conns = o.conns.borrow_mut();
        if conns.is_empty() {
            *conns = batch;
        }
    });
    n
}

/// The shard's flush task: waits until a connection is owed a write, lets every task
/// that is ready run first (the runtime's queue is first in, first out), then ticks.
pub async fn flush_loop(m: std::sync::Arc<ShardMetrics>) {
    loop {
        std::future::poll_fn(|cx| {
            OWED.with(|o| {
                if o.conns.borrow().is_empty() {
                    o.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
        })
        .await;
        let writes = flush_all(&m);
        m.ticks.inc();
        m.tick_writes.add(writes as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static M: std::sync::LazyLock<ShardMetrics> = std::sync::LazyLock::new(ShardMetrics::default);

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
        assert!(h.take_batch().is_none());
        let req = h.take_close_request().unwrap();
        assert_eq!((req.code, req.why), (1008, CloseReason::SlowConsumer));
        flush_all(&M);
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
        // Nothing is written before the tick, and the task is not asked to write.
        assert_eq!((m.bytes_out.get(), h.queued()), (0, 1000));
        assert!(!h.task_owes(false));
        assert_eq!(flush_all(&m), 1);
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
        assert_eq!(flush_all(&m), 1);
        assert_eq!(m.frames_out.get(), 11);
    }

    #[test]
    fn what_the_socket_refuses_stays_queued_for_the_task_in_order() {
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
            flush_all(&m);
            if h.queued() > 0 {
                break;
            }
            assert!(pushed < 64 << 20, "socket never filled");
        }
        // The task owes the rest now, and a later frame goes behind it, never around it.
        assert!(h.task_owes(false));
        assert_eq!(
            h.push(Bytes::from_static(b"last"), 1 << 30, false, &m),
            Push::Queued
        );
        assert_eq!(
            flush_all(&m),
            0,
            "a connection the task is writing is not owed to the tick"
        );
        let sent_directly = m.bytes_out.get() as usize;
        let mut rest = Vec::new();
        while let Some((b, _)) = h.take_batch() {
            rest.extend_from_slice(&b);
        }
        let mut got = vec![0u8; sent_directly];
        peer.read_exact(&mut got).unwrap();
        got.extend_from_slice(&rest);
        assert_eq!(got.len(), pushed + 4);
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
        flush_all(&m);
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
        flush_all(&m);
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
        assert!(h.take_batch().is_none());
        flush_all(&M);
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
        assert!(h.take_batch().is_none());
        let req = h.take_close_request().unwrap();
        assert_eq!((req.code, req.why), (1008, CloseReason::SlowConsumer));
        flush_all(&M);
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
        flush_all(&M);
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
        assert_eq!(h.take_batch().unwrap().1, 1);
        flush_all(&M);
    }

    #[test]
    fn a_detached_connection_is_never_written() {
        let (h, server, _peer) = pair();
        let m = ShardMetrics::default();
        h.push(Bytes::from_static(b"late"), 1 << 20, false, &m);
        h.detach();
        drop(server);
        assert_eq!(flush_all(&m), 0, "a detached connection is not written");
        assert_eq!(m.bytes_out.get(), 0);
    }

    #[test]
    fn small_frames_coalesce_for_the_task_and_accounting_balances() {
        let h = handle(-1);
        h.writing_since.set(1);
        for _ in 0..10 {
            h.push(Bytes::from_static(b"0123456789"), 1 << 20, false, &M);
        }
        h.push(Bytes::from(vec![1; COALESCE_BYTES]), 1 << 20, false, &M);
        let (b, n) = h.take_batch().unwrap();
        assert_eq!((b.len(), n), (100, 10));
        h.written(b.len());
        let (b, n) = h.take_batch().unwrap();
        assert_eq!((b.len(), n), (COALESCE_BYTES, 1));
        h.written(b.len());
        assert_eq!(h.queued(), 0);
    }
}
