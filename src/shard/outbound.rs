//! A connection's shared half: its send path, bounded send queue, wake-up signal and
//! the timestamps the shard's sweeper reads. The fan-out path, the sweeper and the
//! connection's own task all hold an `Rc<ConnHandle>`.
//!
//! Sending: while nothing is queued or being written, a frame is sent at once with a
//! non-blocking `send` (the common case: the socket has room). Only what the socket
//! does not take is queued, and the connection's task writes the queue through the
//! runtime (io_uring) as the socket drains. So a delivery to a keeping-up client costs
//! one system call, no task wake-up and no allocation; the queue holds `Bytes` handles
//! to the one frame built per node.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use std::io::ErrorKind;
use std::os::fd::RawFd;

use crate::metrics::{CloseReason, ShardMetrics};
use crate::sys;

/// A close the connection's task should perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    pub code: u16,
    pub reason: &'static str,
    pub why: CloseReason,
}

/// Result of sending or queueing a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Written to the socket at once.
    Sent,
    /// (Partly) queued for the connection's task to write.
    Queued,
    /// The queue was full and the policy dropped this frame.
    Dropped,
    /// The queue was full and the connection is now closing (or already was).
    Closing,
}

/// Queued frames are coalesced into one write of up to this many bytes: one io_uring
/// round trip per write, so a write must carry at least what one inbox batch
/// (`shard::INBOX_BATCH` messages) can queue, or a burst outruns a reading client.
const COALESCE_BYTES: usize = 64 * 1024;

pub struct ConnHandle {
    /// Node-unique connection number (shown as `<shard>-<id>` to clients).
    pub id: u64,
    /// The socket, for direct sends; valid while the connection is registered (its task
    /// unregisters before closing it). Negative: queue only (unit tests).
    fd: RawFd,
    queue: RefCell<VecDeque<Bytes>>,
    queued: Cell<usize>,
    waker: Cell<Option<Waker>>,
    /// Shard clock (seconds) of the last byte received.
    pub last_rx: Cell<u32>,
    /// Shard clock when the current write started; 0 when not writing.
    pub writing_since: Cell<u32>,
    /// Shard clock when our close frame was queued; 0 while open.
    pub closing_since: Cell<u32>,
    pub ping_sent: Cell<bool>,
    close: Cell<Option<CloseRequest>>,
    abort: Cell<Option<CloseReason>>,
    /// The user id from the client's token; `None` for anonymous clients.
    pub user: Option<std::rc::Rc<str>>,
}

impl ConnHandle {
    pub fn new(id: u64, fd: RawFd, now: u32, user: Option<std::rc::Rc<str>>) -> Self {
        Self {
            id,
            fd,
            user,
            queue: RefCell::new(VecDeque::new()),
            queued: Cell::new(0),
            waker: Cell::new(None),
            last_rx: Cell::new(now),
            writing_since: Cell::new(0),
            closing_since: Cell::new(0),
            ping_sent: Cell::new(false),
            close: Cell::new(None),
            abort: Cell::new(None),
        }
    }

    /// Sends or queues a frame if the queue stays within `limit` bytes (an empty queue
    /// takes one frame of any size); otherwise applies the policy: `drop_when_full` drops
    /// this frame, else the connection is closed as a slow consumer: its queue is
    /// discarded, and if a write is stuck on a full socket the connection is aborted at
    /// once, since no close frame could get through.
    pub fn push(&self, frame: Bytes, limit: usize, drop_when_full: bool, m: &ShardMetrics) -> Push {
        if self.closing_since.get() != 0 || self.close_pending() || self.abort.get().is_some() {
            return Push::Closing;
        }
        let queued = self.queued.get();
        if queued > 0 && queued + frame.len() > limit {
            if drop_when_full {
                return Push::Dropped;
            }
            self.queue.borrow_mut().clear();
            self.request_close(CloseRequest {
                code: 1008,
                reason: "slow consumer",
                why: CloseReason::SlowConsumer,
            });
            if self.writing_since.get() != 0 {
                self.abort(CloseReason::SlowConsumer);
            }
            return Push::Closing;
        }
        self.push_unbounded(frame, m)
    }

    /// Sends or queues a frame regardless of the limit: only for frames bounded in
    /// number by the gateway itself (the welcome, one close, one ping per interval).
    pub fn push_unbounded(&self, frame: Bytes, m: &ShardMetrics) -> Push {
        let rest = if self.queued.get() == 0 && self.writing_since.get() == 0 {
            match self.send_now(&frame, m) {
                Some(rest) => rest,
                None => return Push::Sent,
            }
        } else {
            frame
        };
        self.queued.set(self.queued.get() + rest.len());
        self.queue.borrow_mut().push_back(rest);
        self.wake();
        Push::Queued
    }

    /// Writes `frame` with one non-blocking send; returns what the socket did not take
    /// (`None`: all of it went, or the socket failed and the task was told to abort).
    fn send_now(&self, frame: &Bytes, m: &ShardMetrics) -> Option<Bytes> {
        if self.fd < 0 {
            return Some(frame.clone());
        }
        match sys::send_nonblocking(self.fd, frame) {
            Ok(n) if n == frame.len() => {
                m.frames_out.inc();
                m.bytes_out.add(n as u64);
                None
            }
            Ok(n) => {
                m.bytes_out.add(n as u64);
                Some(frame.slice(n..))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Some(frame.clone())
            }
            Err(_) => {
                self.abort(CloseReason::IoError);
                None
            }
        }
    }

    /// Takes the next write: one frame, or several small ones coalesced. Returns the
    /// buffer and how many frames it holds.
    pub fn take_batch(&self) -> Option<(Bytes, u64)> {
        let mut q = self.queue.borrow_mut();
        let Some(first) = q.pop_front() else {
            // Idle connections keep no queue storage.
            if q.capacity() > 0 {
                *q = VecDeque::new();
            }
            return None;
        };
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

    /// Accounts for `n` bytes written to the socket.
    pub fn written(&self, n: usize) {
        self.queued.set(self.queued.get().saturating_sub(n));
    }

    /// Whether any frame waits to be written.
    pub fn has_queued(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.queued.get()
    }

    /// Asks the task to send a close frame (first request wins).
    pub fn request_close(&self, req: CloseRequest) {
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
        self.close.take()
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

    /// Resolves when there is something to write, a close to start, or an abort.
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
            || (!self.abort_only && (h.close_pending() || !h.queue.borrow().is_empty()));
        if ready {
            Poll::Ready(())
        } else {
            h.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static M: std::sync::LazyLock<ShardMetrics> = std::sync::LazyLock::new(ShardMetrics::default);

    #[test]
    fn limit_closes_slow_consumer_and_discards_queue() {
        let h = ConnHandle::new(1, -1, 0, None);
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
    }

    #[test]
    fn sends_directly_until_the_socket_is_full_then_queues_in_order() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let m = ShardMetrics::default();
        let h = ConnHandle::new(1, server.as_raw_fd(), 0, None);
        assert_eq!(
            h.push(Bytes::from_static(b"first"), 1 << 30, false, &m),
            Push::Sent
        );
        assert_eq!((m.frames_out.get(), h.queued()), (1, 0));
        // Nobody reads: the socket fills, and the rest is queued, not lost.
        let chunk = Bytes::from(vec![7u8; 64 * 1024]);
        let mut pushed = 5;
        while h.push(chunk.clone(), 1 << 30, false, &m) == Push::Sent {
            pushed += chunk.len();
            assert!(pushed < 64 << 20, "socket never filled");
        }
        pushed += chunk.len();
        assert!(h.queued() > 0 && h.has_queued());
        // Later frames go behind the queue, never around it.
        assert_eq!(
            h.push(Bytes::from_static(b"last"), 1 << 30, false, &m),
            Push::Queued
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
    fn an_empty_queue_takes_one_frame_of_any_size() {
        let h = ConnHandle::new(1, -1, 0, None);
        assert_eq!(
            h.push(Bytes::from(vec![0; 5000]), 1000, false, &M),
            Push::Queued
        );
        assert_eq!(
            h.push(Bytes::from(vec![0; 10]), 1000, false, &M),
            Push::Closing
        );
    }

    #[test]
    fn overflow_during_a_stuck_write_aborts() {
        let h = ConnHandle::new(1, -1, 0, None);
        h.push(Bytes::from(vec![0; 600]), 1000, false, &M);
        h.writing_since.set(5);
        assert_eq!(
            h.push(Bytes::from(vec![0; 600]), 1000, false, &M),
            Push::Closing
        );
        assert_eq!(h.aborted(), Some(CloseReason::SlowConsumer));
    }

    #[test]
    fn drop_policy_keeps_the_connection() {
        let h = ConnHandle::new(1, -1, 0, None);
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
    }

    #[test]
    fn small_frames_coalesce_and_accounting_balances() {
        let h = ConnHandle::new(1, -1, 0, None);
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
