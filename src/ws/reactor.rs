//! A shard's reactor: the one loop that reads and writes every established client
//! connection of the shard. After its upgrade a connection is an entry in the shard's
//! table (its `ConnHandle`, which holds the socket, frame reader and protocol state),
//! with no task, no future and no submission of its own: the shard's sockets sit in one
//! edge-triggered epoll set, whose descriptor the runtime waits on (an io_uring poll,
//! or epoll on the fallback driver). When it is readable the reactor takes the reports
//! without blocking and, for each, reads the socket into the shard's scratch buffer or
//! writes what a blocked connection owes; then it looks at the connections on the work
//! list (a close to start, an abort, a read cut short for fairness).
//!
//! Why not a task per connection: an idle connection's task (the future, monoio's task
//! header, its pending poll and shared descriptor) cost more memory than all the rest
//! of the connection (ARCHITECTURE.md, "Memory per idle connection").

use std::future::Future;
use std::rc::Rc;
use std::task::Poll;

use super::conn::{Conn, Io};
use crate::metrics::CloseReason;
use crate::registry::ConnKey;
use crate::shard::outbound::{self, ConnHandle};
use crate::shard::Shard;
use crate::sys;

/// Readiness reports taken per turn; more wait for the next turn, after the other
/// tasks (the delivery tick, the inbox) have run.
const EVENTS: usize = 256;

pub struct Reactor {
    epoll: sys::Epoll,
}

impl Reactor {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            epoll: sys::Epoll::new()?,
        })
    }

    /// Takes connection `key`, just upgraded: from now on the reactor reads and writes
    /// it. Bytes that came behind the upgrade request are handled at once.
    pub fn adopt(&self, shard: &Shard, key: ConnKey, handle: &Rc<ConnHandle>, conn: Conn) {
        if self
            .epoll
            .add(conn.raw_fd(), token(key, handle.id))
            .is_err()
        {
            conn.finish(shard, key, CloseReason::IoError);
            return;
        }
        handle.io.set(Some(conn));
        self.turn(shard, key, handle, |conn, io| conn.start(io));
    }

    /// Runs `f` on connection `key` (whose registered handle is `handle`), then carries
    /// out what it left to do: finish it, or come back for the rest of a read cut short.
    fn turn(
        &self,
        shard: &Shard,
        key: ConnKey,
        handle: &Rc<ConnHandle>,
        f: impl FnOnce(&mut Conn, &mut Io) -> Option<CloseReason>,
    ) {
        // Out of its handle while it runs: nothing it sets off can reach it again.
        let Some(mut conn) = handle.io.take() else {
            return;
        };
        let mut io = Io::new(shard, handle, key);
        match f(&mut conn, &mut io).or_else(|| conn.step(&mut io)) {
            Some(why) => conn.finish(shard, key, why),
            None => {
                let again = conn.read_more();
                handle.io.set(Some(conn));
                if again {
                    outbound::schedule(key as u32);
                }
            }
        }
    }

    fn ready(&self, shard: &Shard, ev: sys::Ready) {
        let key = (ev.token & u64::from(u32::MAX)) as ConnKey;
        let id = (ev.token >> 32) as u32;
        // A report for a socket closed earlier in this batch, whose key was reused.
        let Some(handle) = shard.conn(key).filter(|h| h.id as u32 == id) else {
            return;
        };
        self.turn(shard, key, &handle, |conn, io| conn.on_ready(io, ev));
    }

    fn work(&self, shard: &Shard, key: u32) {
        let key = key as ConnKey;
        let Some(handle) = shard.conn(key) else {
            return;
        };
        handle.unschedule();
        self.turn(shard, key, &handle, |conn, io| conn.on_work(io));
    }
}

fn token(key: ConnKey, id: u64) -> u64 {
    (key as u64 & u64::from(u32::MAX)) | (u64::from(id as u32) << 32)
}

/// The shard's reactor loop: waits until a socket is ready or a connection is on the
/// work list, handles a turn's worth, and lets the other tasks run.
pub async fn run(shard: Rc<Shard>) {
    let waitable = match shard
        .reactor
        .epoll
        .waitable()
        .and_then(monoio::net::UnixStream::from_std)
    {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(shard = shard.index, error = %e, "reactor: cannot wait on the epoll set");
            return;
        }
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let mut work = Vec::new();
    let mut readable = Box::pin(waitable.readable(false));
    loop {
        let ready = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = readable.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if outbound::work_waiting(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        if let Some(r) = ready {
            if let Err(e) = r {
                tracing::error!(shard = shard.index, error = %e, "reactor: epoll wait failed");
                return;
            }
            readable = Box::pin(waitable.readable(false));
            let n = shard.reactor.epoll.poll(&mut events).unwrap_or(0);
            for ev in &events[..n] {
                shard.reactor.ready(&shard, sys::ready(ev));
            }
        }
        // What this turn put on the list is looked at in this turn too.
        outbound::take_work(&mut work);
        for key in work.drain(..) {
            shard.reactor.work(&shard, key);
        }
        crate::shard::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use crate::shard::outbound::ConnHandle;

    /// An idle connection is one allocation: its handle, with the socket, reader and
    /// protocol state inside, in an `Rc` (two counts of 8 bytes). The memory budget
    /// (BENCHMARKS.md, idle subscribed connections beside uWebSockets) counts on it
    /// fitting the allocator's 160-byte size class.
    #[test]
    fn a_connection_fits_one_160_byte_allocation() {
        let size = std::mem::size_of::<ConnHandle>() + 16;
        assert!(size <= 160, "Rc<ConnHandle> takes {size} bytes");
    }
}
