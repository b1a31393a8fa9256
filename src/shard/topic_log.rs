//! A topic's frames of the current tick on one shard, which every subscriber reads in
//! place through a cursor: delivery costs one append per message and shard, not one
//! queue push per subscriber.
//!
//! The first message of a tick for a topic hands each of its subscribers a *run*
//! (`outbound::Item::Log`): "this log's frames from position `from` on". Later messages
//! of the same tick are appended to the log and nothing else; the runs already cover
//! them. The tick writes each run straight from the log, gathered into the
//! connection's one `sendmsg`. What a full socket leaves unwritten becomes handles to
//! the same frames in the connection's own queue when the tick ends, under the
//! slow-consumer limit (`ConnHandle::settle`), and the log empties for the next tick.
//!
//! A run takes later appends only while it is the last thing its connection is owed.
//! Anything queued behind it (a reply, another topic's run) closes it at the log's
//! current length, so a connection's stream keeps the order in which things reached
//! the shard. A connection whose run was closed, or written whole, waits on the log's
//! `waiting` list and is handed a new run at the next append. So a connection with one
//! busy topic costs one run per tick, and one whose topics interleave message by
//! message costs a run per message, as a queued handle per message did before.

use std::cell::{Cell, Ref, RefCell};
use std::collections::HashSet;
use std::rc::Rc;

use bytes::Bytes;
use slab::Slab;

use super::outbound::{self, ConnHandle};
use crate::metrics::ShardMetrics;
use crate::registry::ConnKey;

pub struct TopicLog {
    /// This tick's frames, in the order they reached the shard.
    entries: RefCell<Vec<Bytes>>,
    /// The tick the entries belong to (`outbound::tick`).
    tick: Cell<u64>,
    /// Subscribers (slab key, connection number) with no run open on this log: handed
    /// one at the next append. The number guards against a reused key.
    waiting: RefCell<Vec<(u32, u64)>>,
}

impl TopicLog {
    pub fn new() -> Rc<Self> {
        Rc::new(Self {
            entries: RefCell::new(Vec::new()),
            tick: Cell::new(u64::MAX),
            waiting: RefCell::new(Vec::new()),
        })
    }

    /// Frames appended this tick.
    pub fn appended(&self) -> u32 {
        self.entries.borrow().len() as u32
    }

    pub fn frames(&self) -> Ref<'_, Vec<Bytes>> {
        self.entries.borrow()
    }

    /// A connection's run on this log was closed or written whole: it is handed a new
    /// one at the next append.
    pub fn wait(&self, key: u32, id: u64) {
        self.waiting.borrow_mut().push((key, id));
    }

    /// A connection subscribed: from the next append on it reads this log. Before this
    /// tick's first append, handing out runs reaches it anyway.
    pub fn joined(&self, key: ConnKey, id: u64) {
        if self.tick.get() == outbound::tick() {
            self.wait(key as u32, id);
        }
    }

    /// A connection unsubscribed (its open run, if any, was closed already).
    pub fn left(&self, id: u64) {
        self.waiting.borrow_mut().retain(|(_, i)| *i != id);
    }

    /// The tick ended: every run on this log was written or settled into queues.
    pub fn clear(&self) {
        let mut entries = self.entries.borrow_mut();
        entries.clear();
        // A burst's storage is not kept past a tick that needed more than this.
        if entries.capacity() > 1024 {
            entries.shrink_to(64);
        }
        self.waiting.borrow_mut().clear();
    }

    /// Appends `frame` for `subscribers` (keys into `conns`) but those in `except`.
    pub fn append(
        self: &Rc<Self>,
        frame: &Bytes,
        subscribers: &HashSet<ConnKey>,
        conns: &Slab<Rc<ConnHandle>>,
        except: &[ConnKey],
        m: &ShardMetrics,
    ) {
        let tick = outbound::tick();
        let mut skipped = Vec::new();
        if self.tick.replace(tick) != tick {
            // First message of this tick: every subscriber gets a run from here.
            self.clear();
            outbound::appended(self.clone());
            for key in subscribers {
                let Some(conn) = conns.get(*key) else {
                    continue;
                };
                if except.contains(key) {
                    skipped.push((*key as u32, conn.id));
                } else {
                    conn.open_run(self, 0, m);
                }
            }
        } else {
            let from = self.appended();
            let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
            for &(key, id) in &waiting {
                let Some(conn) = conns.get(key as usize).filter(|c| c.id == id) else {
                    continue;
                };
                if except.contains(&(key as usize)) {
                    skipped.push((key, id));
                } else {
                    conn.open_run(self, from, m);
                }
            }
            for key in except {
                if let Some(conn) = conns.get(*key).filter(|_| subscribers.contains(key)) {
                    if conn.close_run(self) {
                        skipped.push((*key as u32, conn.id));
                    }
                }
            }
        }
        self.entries.borrow_mut().push(frame.clone());
        // Skipped this one, they read the log again from the next append.
        self.waiting.borrow_mut().extend(skipped);
    }
}

#[cfg(test)]
mod tests {
    //! Property tests: random interleavings of publishes, replies, subscribes,
    //! unsubscribes, skipped deliveries, ticks and readers of every speed, checked
    //! against a model of what each connection must receive.

    use std::io::{ErrorKind, Read};
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::metrics::ShardMetrics;
    use crate::shard::outbound::flush_all;

    /// xorshift64*: deterministic, so a failing seed can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A frame carrying its number: 4 bytes of number, 4 of length, then filler.
    fn frame(number: u32, len: usize) -> Bytes {
        let mut v = Vec::with_capacity(len.max(8));
        v.extend_from_slice(&number.to_le_bytes());
        v.extend_from_slice(&(len.max(8) as u32).to_le_bytes());
        v.resize(len.max(8), (number % 251) as u8);
        Bytes::from(v)
    }

    /// The frame numbers in a received stream (checking each frame whole).
    fn numbers(stream: &[u8]) -> Vec<u32> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            if at + 8 > stream.len() {
                out.push(u32::MAX);
                break;
            }
            let number = u32::from_le_bytes(stream[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(stream[at + 4..at + 8].try_into().unwrap()) as usize;
            let Some(body) = stream.get(at + 8..at + len) else {
                out.push(number);
                out.push(u32::MAX);
                break;
            };
            assert!(
                body.iter().all(|b| *b == (number % 251) as u8),
                "frame {number} torn"
            );
            out.push(number);
            at += len;
        }
        out
    }

    struct Peer {
        handle: Rc<ConnHandle>,
        _server: std::net::TcpStream,
        client: std::net::TcpStream,
        got: Vec<u8>,
        expected: Vec<u32>,
        expected_bytes: usize,
        /// Reads on one step in this many (1: keeps up).
        pace: u64,
    }

    impl Peer {
        /// Reads what has arrived, then lets the handle write what the socket now has
        /// room for (what the reactor does on a writable event).
        fn read(&mut self, m: &ShardMetrics) {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match self.client.read(&mut buf) {
                    Ok(0) => panic!("closed"),
                    Ok(n) => self.got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if !self.handle.blocked() || !self.handle.write_ready(m) {
                            break;
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    fn connect(
        id: u64,
        small_buffers: bool,
    ) -> (Rc<ConnHandle>, std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client.set_nonblocking(true).unwrap();
        if small_buffers {
            // A small send buffer, so that writes block and end part-way through.
            socket2::SockRef::from(&server)
                .set_send_buffer_size(4096)
                .unwrap();
        }
        let handle = Rc::new(ConnHandle::new(id, server.as_raw_fd(), 0, None));
        (handle, server, client)
    }

    /// Returns how many steps ended with some connection blocked (its socket full).
    fn run(seed: u64, steps: usize) -> usize {
        const TOPICS: usize = 3;
        let m = ShardMetrics::default();
        let mut rng = Rng(seed | 1);
        let mut conns: Slab<Rc<ConnHandle>> = Slab::new();
        let mut peers = Vec::new();
        for i in 0..5u64 {
            let (handle, server, client) = connect(i, i % 2 == 1);
            let key = conns.insert(handle.clone());
            handle.key.set(key as u32);
            peers.push(Peer {
                handle,
                _server: server,
                client,
                got: Vec::new(),
                expected: Vec::new(),
                expected_bytes: 0,
                pace: [1, 1, 3, 7, 20][i as usize],
            });
        }
        let logs: Vec<Rc<TopicLog>> = (0..TOPICS).map(|_| TopicLog::new()).collect();
        let mut subs: Vec<HashSet<ConnKey>> = vec![HashSet::new(); TOPICS];
        let mut number = 0u32;
        let mut blocked = 0;
        for _ in 0..steps {
            number += 1;
            match rng.below(10) {
                0..=4 => {
                    let t = rng.below(TOPICS as u64) as usize;
                    let len = [20, 300, 3000, 40_000][rng.below(4) as usize];
                    let except: Vec<ConnKey> = match rng.below(6) {
                        0 => vec![rng.below(peers.len() as u64) as usize],
                        _ => Vec::new(),
                    };
                    logs[t].append(&frame(number, len), &subs[t], &conns, &except, &m);
                    for k in &subs[t] {
                        if !except.contains(k) {
                            peers[*k].expected.push(number);
                            peers[*k].expected_bytes += len;
                        }
                    }
                }
                5 => {
                    let k = rng.below(peers.len() as u64) as usize;
                    peers[k].handle.reply(frame(number, 50), usize::MAX, &m);
                    peers[k].expected.push(number);
                    peers[k].expected_bytes += 50;
                }
                6 => {
                    let (k, t) = (rng.below(5) as usize, rng.below(TOPICS as u64) as usize);
                    if subs[t].insert(k) {
                        logs[t].joined(k, peers[k].handle.id);
                    }
                }
                7 => {
                    let (k, t) = (rng.below(5) as usize, rng.below(TOPICS as u64) as usize);
                    if subs[t].remove(&k) {
                        peers[k].handle.close_run(&logs[t]);
                        logs[t].left(peers[k].handle.id);
                    }
                }
                _ => {
                    flush_all(&m, usize::MAX, false);
                }
            }
            for p in &mut peers {
                if rng.below(p.pace) == 0 {
                    p.read(&m);
                }
            }
            blocked += usize::from(peers.iter().any(|p| p.handle.blocked()));
        }
        // Everyone reads to the end (what is still in the kernel's buffers included).
        flush_all(&m, usize::MAX, false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while std::time::Instant::now() < deadline
            && peers.iter().any(|p| p.got.len() < p.expected_bytes)
        {
            for p in &mut peers {
                p.read(&m);
            }
        }
        for (i, p) in peers.iter_mut().enumerate() {
            assert!(
                !p.handle.has_queued(),
                "seed {seed}: connection {i} still owed"
            );
            let got = numbers(&p.got);
            if got != p.expected {
                let same = got
                    .iter()
                    .zip(&p.expected)
                    .take_while(|(a, b)| a == b)
                    .count();
                eprintln!(
                    "seed {seed} conn {i}: first difference at {same}: got {:?} expected {:?}; queued {} blocked {} has_queued {} got {} bytes",
                    &got[same..(same + 5).min(got.len())],
                    &p.expected[same..(same + 5).min(p.expected.len())],
                    p.handle.queued(),
                    p.handle.blocked(),
                    p.handle.has_queued(),
                    p.got.len(),
                );
            }
            assert_eq!(
                got, p.expected,
                "seed {seed}: connection {i} (reads 1 step in {})",
                p.pace
            );
        }
        assert_eq!(m.dropped.get(), 0);
        blocked
    }

    #[test]
    fn every_subscriber_gets_every_message_once_in_order_whatever_its_pace() {
        let mut blocked = 0;
        for seed in 1..=30 {
            blocked += run(seed * 0x9E37_79B9, 300);
        }
        // The interleavings covered full sockets and writes that ended mid-frame.
        assert!(
            blocked > 100,
            "only {blocked} steps had a blocked connection"
        );
    }

    /// A blocked connection handed runs of random sizes: at the tick's end exactly the
    /// frames that fit the limit are kept (one of any size when nothing is queued),
    /// the rest dropped under `drop`, or the connection closed under `close`.
    #[test]
    fn the_slow_consumer_policy_triggers_exactly_at_the_limit() {
        let m = ShardMetrics::default();
        let mut rng = Rng(7);
        for round in 0..200 {
            let drop_when_full = round % 2 == 0;
            let (handle, _server, _client) = connect(round, true);
            let mut conns = Slab::new();
            let key = conns.insert(handle.clone());
            handle.key.set(key as u32);
            // Fill the socket until the connection is blocked.
            let filler = Bytes::from(vec![0u8; 1 << 16]);
            while !handle.blocked() {
                handle.reply(filler.clone(), usize::MAX, &m);
                flush_all(&m, usize::MAX, false);
            }
            let before = handle.queued();
            let limit = before + rng.below(20_000) as usize;
            let log = TopicLog::new();
            let subs: HashSet<ConnKey> = [key].into();
            let (mut queued, mut over) = (before, false);
            let dropped = m.dropped.get();
            let mut expect_dropped = 0;
            let appended = rng.below(30);
            for n in 0..appended {
                let len = 1 + rng.below(3000) as usize;
                log.append(&frame(n as u32, len), &subs, &conns, &[], &m);
                let len = len.max(8);
                if !over && (queued == 0 || queued + len <= limit) {
                    queued += len;
                } else {
                    expect_dropped += 1;
                    over |= !drop_when_full;
                }
            }
            flush_all(&m, limit, drop_when_full);
            if over {
                // Closed: what had been settled is discarded with the rest.
                expect_dropped = appended;
            }
            assert_eq!(m.dropped.get() - dropped, expect_dropped, "round {round}");
            if over {
                assert_eq!(handle.queued(), 0, "round {round}");
                let req = handle.take_close_request();
                let aborted = handle.aborted().is_some();
                assert!(req.is_some() || aborted, "round {round}: not closed");
            } else {
                assert_eq!(handle.queued(), queued, "round {round}");
                assert!(handle.take_close_request().is_none() && handle.aborted().is_none());
            }
            handle.detach();
        }
    }
}
