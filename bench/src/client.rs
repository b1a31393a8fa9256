//! The client side of every scenario: `threads` OS threads, each with its own mio
//! (epoll, edge-triggered) loop and its own slice of the connections. Threads share
//! nothing; the [`Client`] handle sends each a command and merges their replies.
//!
//! Memory per idle connection is the point of this design (the plan is a million
//! connections with gateway and generator on one host): a connection is a 40-byte
//! [`Conn`] slot plus the kernel's socket. Every read goes into one 64 KiB scratch
//! buffer per thread after readiness; a connection holds bytes of its own only while a
//! frame (or the 101 response) is partial, and gives them back as soon as it is whole.
//!
//! Connection lifecycle: `Connecting` (non-blocking connect) → `Upgrading` (request
//! sent, waiting for 101) → `Welcoming` (waiting for `welcome`) → [`Subscribing`
//! (fanout: waiting for `subscribed`)] → `Ready`. Pings are answered with masked pongs
//! in every state. Each failure is counted once, by stage ([`Failures`]).
//!
//! Every loop is bounded: each command carries a deadline, reads per readiness event
//! are capped, and a thread exits on `Close`, when its command channel closes, or at
//! the client's maximum lifetime.

use std::collections::{BTreeMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::stats::{
    new_hist, ChurnReport, CloseReport, DrainReport, Failures, HistData, OpenReport,
};
use crate::ws::{self, Kind, Rng, UpgradeError};

/// Per-thread read buffer.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Reads a slow consumer makes when the drain ends, at most.
const SLOW_READS: usize = 100_000;
/// How long a slow consumer's socket must stay empty before its final read ends.
const SLOW_QUIET_MS: i32 = 500;
/// Reads per readiness event before the connection goes to the back of the line.
const READS_PER_EVENT: usize = 16;
/// Seqs beyond this are not counted per seq (bounds the counts vector: 4 bytes each).
pub const MAX_COUNTED_SEQ: u64 = 50_000_000;

/// Signed tokens for the connections of one process: for user `g mod users` of each
/// connection g it opens. A process signs only its own range, so a million identified
/// connections over many processes sign a million tokens, not a million each.
#[derive(Debug)]
pub struct Tokens {
    pub users: u64,
    /// The first connection of the range (0 when every user is signed).
    pub first: u64,
    /// Every user's token (`users` of them), or one per connection of the range.
    pub signed: Vec<String>,
}

impl Tokens {
    pub fn for_conn(&self, g: u64) -> &str {
        if self.signed.len() as u64 == self.users && self.first == 0 {
            &self.signed[(g % self.users) as usize]
        } else {
            &self.signed[(g - self.first) as usize]
        }
    }
}

/// What one client process runs.
#[derive(Debug, Clone)]
pub struct ClientCfg {
    /// `direct`: the users' tokens; connection g presents the token of user `g mod T`
    /// and does not subscribe.
    pub tokens: Option<std::sync::Arc<Tokens>>,
    /// How to talk to a server that is not ringway (comparison mode).
    pub foreign: Foreign,
    /// 0: none; K: every K-th subscriber (g mod K = K-1) is a slow consumer: a small
    /// receive buffer, and it stops reading once subscribed (until the drain ends).
    pub slow_every: u64,
    /// SO_RCVBUF of a slow consumer.
    pub slow_rcvbuf: usize,
    /// The closed-loop window's counters (`fanout --window K`): every delivery counts.
    pub window: Option<std::sync::Arc<crate::window::Window>>,
    pub target: SocketAddr,
    /// `Host` header value.
    pub host: String,
    pub path: String,
    /// 0: let the kernel pick 127.0.0.1; N: connection g binds 127.0.0.(2 + g mod N).
    pub source_ips: u32,
    /// 0: do not subscribe; T: connection g subscribes to `topic-(g mod T)`.
    pub topics: u32,
    pub threads: usize,
    /// This process's connections are global indices `offset .. offset + count`.
    pub offset: u64,
    pub count: u64,
    /// Connections in progress at once in this process (split over its threads).
    pub concurrency: usize,
    /// Threads exit after this long whatever happens.
    pub max_lifetime: Duration,
    /// Resume storm: messages with a seq below this were published before the
    /// subscribers connected (replayed); their latency is not recorded.
    pub replayed: u64,
}

/// What the server under test says and expects, where it differs from protocol v1.
#[derive(Debug, Clone)]
pub struct Foreign {
    /// The subscribe request, `{topic}` replaced by the topic name.
    pub subscribe_template: String,
    /// The server sends a first frame after the upgrade (ringway's `welcome`).
    pub expect_welcome: bool,
    /// The server answers a subscribe (ringway's `subscribed`); without it a
    /// subscriber counts as ready once its request is written.
    pub expect_subscribed: bool,
}

impl Default for Foreign {
    fn default() -> Self {
        Self {
            subscribe_template: ws::SUBSCRIBE_TEMPLATE.into(),
            expect_welcome: true,
            expect_subscribed: true,
        }
    }
}

/// Source address of global connection `g`, if spreading over source IPs.
pub fn source_ip(g: u64, source_ips: u32) -> Option<IpAddr> {
    if source_ips == 0 {
        return None;
    }
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    Some(IpAddr::V4(Ipv4Addr::from(
        base + (g % u64::from(source_ips)) as u32,
    )))
}

/// A command to every thread.
#[derive(Debug, Clone)]
enum Cmd {
    Open {
        deadline: Instant,
    },
    Drain {
        published: u64,
        not_ok: Arc<HashSet<u64>>,
        deadline: Instant,
    },
    Close,
    Churn {
        deadline: Instant,
    },
}

#[derive(Debug)]
enum Reply {
    Opened(OpenReport),
    Drained(DrainReport),
    Closed(CloseReport),
    Churned(ChurnReport),
}

// === impl Client ===

/// The threads of one client process.
pub struct Client {
    threads: Vec<(Sender<Cmd>, JoinHandle<()>)>,
    replies: Receiver<Reply>,
}

impl Client {
    /// Starts the threads; they idle until a command comes.
    pub fn start(cfg: ClientCfg) -> std::io::Result<Self> {
        let cfg = Arc::new(cfg);
        let (reply_tx, replies) = mpsc::channel();
        let n = cfg.threads.max(1) as u64;
        let mut first = cfg.offset;
        let mut threads = Vec::new();
        for t in 0..n {
            let count = cfg.count / n + u64::from(t < cfg.count % n);
            let conc = (cfg.concurrency / n as usize).max(1);
            let (tx, rx) = mpsc::channel();
            let mut w = Worker::new(
                t as usize,
                cfg.clone(),
                first,
                count,
                conc,
                reply_tx.clone(),
            )?;
            first += count;
            let handle = std::thread::Builder::new()
                .name(format!("bench-client-{t}"))
                .spawn(move || w.run(rx))?;
            threads.push((tx, handle));
        }
        Ok(Self { threads, replies })
    }

    fn broadcast(&self, cmd: &Cmd) {
        for (tx, _) in &self.threads {
            let _ = tx.send(cmd.clone());
        }
    }

    /// One reply from every thread, or an error at `deadline`.
    fn gather(&self, deadline: Instant) -> Result<Vec<Reply>, String> {
        let mut out = Vec::new();
        while out.len() < self.threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} of {} client threads did not answer in time",
                        self.threads.len() - out.len(),
                        self.threads.len()
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("client threads exited".into()),
            }
        }
        Ok(out)
    }

    /// Opens (and subscribes) every connection; returns when all are ready or failed.
    pub fn open(&self, timeout: Duration) -> Result<OpenReport, String> {
        let before = crate::procfs::self_rss_bytes().unwrap_or(0);
        let deadline = Instant::now() + timeout;
        self.broadcast(&Cmd::Open { deadline });
        let mut total = OpenReport::default();
        for r in self.gather(deadline + Duration::from_secs(10))? {
            if let Reply::Opened(o) = r {
                total.merge(&o);
            }
        }
        total.self_rss_before = before;
        total.self_rss_after = crate::procfs::self_rss_bytes().unwrap_or(0);
        total.self_cpu_secs = crate::procfs::self_cpu_secs();
        Ok(total)
    }

    /// Waits until every delivery of the `published` messages (less `not_ok`) arrived, or
    /// `timeout`; returns what was received.
    pub fn drain(
        &self,
        published: u64,
        not_ok: HashSet<u64>,
        timeout: Duration,
    ) -> Result<DrainReport, String> {
        let deadline = Instant::now() + timeout;
        self.broadcast(&Cmd::Drain {
            published,
            not_ok: Arc::new(not_ok),
            deadline,
        });
        let mut total = DrainReport::default();
        for r in self.gather(deadline + Duration::from_secs(10))? {
            if let Reply::Drained(d) = r {
                total.merge(&d);
            }
        }
        total.self_cpu_secs = crate::procfs::self_cpu_secs();
        Ok(total)
    }

    /// Closes every connection (close frame, then drop) and ends the threads.
    pub fn close(self) -> Result<CloseReport, String> {
        let rss = crate::procfs::self_rss_bytes().unwrap_or(0);
        self.broadcast(&Cmd::Close);
        let mut total = CloseReport::default();
        let res = self.gather(Instant::now() + Duration::from_secs(60));
        for r in res.iter().flatten() {
            if let Reply::Closed(c) = r {
                total.merge(c);
            }
        }
        total.self_rss = rss;
        let Client { threads, .. } = self;
        for (tx, h) in threads {
            drop(tx);
            let _ = h.join();
        }
        res.map(|_| total)
    }

    /// Runs the churn: every connection opened, welcomed and closed.
    pub fn churn(&self, timeout: Duration) -> Result<ChurnReport, String> {
        let cpu0 = crate::procfs::self_cpu_secs();
        let deadline = Instant::now() + timeout;
        self.broadcast(&Cmd::Churn { deadline });
        let mut total = ChurnReport::default();
        for r in self.gather(deadline + Duration::from_secs(10))? {
            if let Reply::Churned(c) = r {
                total.merge(&c);
            }
        }
        total.self_cpu_secs = crate::procfs::self_cpu_secs() - cpu0;
        Ok(total)
    }
}

// === impl Worker ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Connecting,
    Upgrading,
    Welcoming,
    Subscribing,
    Ready,
    /// A ready slow consumer: subscribed, not reading.
    Slow,
}

impl State {
    fn in_progress(self) -> bool {
        matches!(
            self,
            Self::Connecting | Self::Upgrading | Self::Welcoming | Self::Subscribing
        )
    }
}

/// One connection slot: 40 bytes.
struct Conn {
    sock: Option<TcpStream>,
    state: State,
    /// Index within this thread's range (global index = `first + rel`).
    rel: u32,
    /// When connect() was called, µs since the thread's epoch (wrapping).
    started_us: u32,
    /// Bytes of a partial frame or response; empty (no allocation) most of the time.
    pending: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Connections stay open once ready.
    Hold,
    /// Each connection closes as soon as it is welcomed.
    Churn,
}

enum Task {
    Open { deadline: Instant },
    Drain { expected: u64, deadline: Instant },
    Churn { deadline: Instant },
}

struct Worker {
    cfg: Arc<ClientCfg>,
    first: u64,
    count: u64,
    conc: usize,
    poll: Poll,
    events: Events,
    conns: Vec<Conn>,
    free: Vec<u32>,
    /// Connections whose read was cut short by [`READS_PER_EVENT`].
    again: Vec<usize>,
    scratch: Vec<u8>,
    rng: Rng,
    epoch: Instant,
    mode: Mode,
    task: Option<Task>,
    replies: Sender<Reply>,
    // Progress of the current open/churn.
    next: u64,
    in_flight: usize,
    // Figures.
    failures: Failures,
    ready: u64,
    ready_hist: Histogram<u64>,
    ready_per_topic: Vec<u64>,
    latency: Histogram<u64>,
    counts: Vec<u32>,
    drain: DrainReport,
    peer_closed: u64,
    /// Why ready connections ended: close code sent by the peer, or how it went.
    peer_close_causes: BTreeMap<String, u64>,
    pings: u64,
}

impl Worker {
    fn new(
        id: usize,
        cfg: Arc<ClientCfg>,
        first: u64,
        count: u64,
        conc: usize,
        replies: Sender<Reply>,
    ) -> std::io::Result<Self> {
        let topics = cfg.topics as usize;
        Ok(Self {
            first,
            count,
            conc,
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: Vec::new(),
            free: Vec::new(),
            again: Vec::new(),
            scratch: vec![0; SCRATCH_BYTES],
            rng: Rng::new(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1) ^ u64::from(std::process::id())),
            epoch: Instant::now(),
            mode: Mode::Hold,
            task: None,
            replies,
            next: 0,
            in_flight: 0,
            failures: Failures::default(),
            ready: 0,
            ready_hist: new_hist(),
            ready_per_topic: vec![0; topics],
            latency: new_hist(),
            counts: Vec::new(),
            drain: DrainReport::default(),
            peer_closed: 0,
            peer_close_causes: BTreeMap::new(),
            pings: 0,
            cfg,
        })
    }

    fn now_us(&self) -> u32 {
        self.epoch.elapsed().as_micros() as u32
    }

    /// The event loop: until `Close`, a closed command channel, or the lifetime ends.
    fn run(&mut self, commands: Receiver<Cmd>) {
        let end = self.epoch + self.cfg.max_lifetime;
        loop {
            let now = Instant::now();
            if now >= end {
                eprintln!("ringway-bench: client thread reached its maximum lifetime");
                self.close_all();
                return;
            }
            let timeout = if !self.again.is_empty() {
                Duration::ZERO
            } else if self.task.is_some() {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(50)
            };
            let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("ringway-bench: poll failed: {e}");
                    self.events = events;
                    self.close_all();
                    return;
                }
            }
            for ev in events.iter() {
                self.on_event(ev.token().0, ev);
            }
            self.events = events;
            for slot in std::mem::take(&mut self.again) {
                if self.conns[slot].sock.is_some() {
                    self.read(slot);
                }
            }
            self.progress();
            if self.task.is_none() {
                match commands.try_recv() {
                    Ok(Cmd::Close) => {
                        let closed = self.close_all();
                        let _ = self.replies.send(Reply::Closed(CloseReport {
                            closed,
                            peer_closed: self.peer_closed,
                            peer_close_causes: std::mem::take(&mut self.peer_close_causes),
                            pings: self.pings,
                            self_rss: 0,
                        }));
                        return;
                    }
                    Ok(cmd) => self.begin(cmd),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Disconnected) => {
                        self.close_all();
                        return;
                    }
                }
            }
        }
    }

    fn begin(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open { deadline } => {
                self.mode = Mode::Hold;
                self.next = 0;
                self.conns.reserve_exact(self.count as usize);
                self.task = Some(Task::Open { deadline });
            }
            Cmd::Churn { deadline } => {
                self.mode = Mode::Churn;
                self.next = 0;
                self.task = Some(Task::Churn { deadline });
            }
            Cmd::Drain {
                published,
                not_ok,
                deadline,
            } => {
                let t = u64::from(self.cfg.topics.max(1));
                let mut ok_per_topic = vec![0u64; t as usize];
                for (topic, ok) in ok_per_topic.iter_mut().enumerate() {
                    let topic = topic as u64;
                    *ok = published / t + u64::from(topic < published % t);
                }
                for k in not_ok.iter().filter(|k| **k < published) {
                    ok_per_topic[(k % t) as usize] -= 1;
                }
                let expected = ok_per_topic
                    .iter()
                    .zip(&self.ready_per_topic)
                    .map(|(a, b)| a * b)
                    .sum();
                self.drain.expected = expected;
                self.task = Some(Task::Drain { expected, deadline });
            }
            Cmd::Close => unreachable!("handled by run"),
        }
    }

    /// Starts connections up to the concurrency limit; finishes the task when done.
    fn progress(&mut self) {
        let now = Instant::now();
        match self.task {
            None => {}
            Some(Task::Open { deadline } | Task::Churn { deadline }) => {
                while self.next < self.count && self.in_flight < self.conc && now < deadline {
                    let rel = self.next as u32;
                    self.next += 1;
                    self.start(rel);
                }
                let done = self.next >= self.count && self.in_flight == 0;
                if done || now >= deadline {
                    self.expire();
                    let reply = self.finish_connecting();
                    self.task = None;
                    let _ = self.replies.send(reply);
                }
            }
            Some(Task::Drain { expected, deadline })
                if self.drain.received >= expected || now >= deadline =>
            {
                self.read_slow();
                let mut d = std::mem::take(&mut self.drain);
                d.counts = std::mem::take(&mut self.counts);
                d.latency_us = HistData::from_hist(&self.latency);
                d.pings = self.pings;
                d.peer_closed = self.peer_closed;
                d.peer_close_causes = self.peer_close_causes.clone();
                self.task = None;
                let _ = self.replies.send(Reply::Drained(d));
            }
            Some(Task::Drain { .. }) => {}
        }
    }

    /// Fails everything still in progress and everything never started (timeout).
    fn expire(&mut self) {
        self.failures.timeout += self.count - self.next;
        self.next = self.count;
        for slot in 0..self.conns.len() {
            if self.conns[slot].state.in_progress() {
                self.fail(slot, |f| &mut f.timeout);
            }
        }
    }

    fn finish_connecting(&mut self) -> Reply {
        let failures = std::mem::take(&mut self.failures);
        let hist = HistData::from_hist(&self.ready_hist);
        self.ready_hist.reset();
        let ready = std::mem::take(&mut self.ready);
        match self.mode {
            Mode::Hold => Reply::Opened(OpenReport {
                requested: self.count,
                opened: ready,
                failures,
                ready_us: hist,
                ready_per_topic: self.ready_per_topic.clone(),
                self_rss_before: 0,
                self_rss_after: 0,
                self_cpu_secs: 0.0,
            }),
            Mode::Churn => {
                self.conns = Vec::new();
                self.free = Vec::new();
                Reply::Churned(ChurnReport {
                    requested: self.count,
                    upgraded: ready,
                    failures,
                    upgrade_us: hist,
                    self_cpu_secs: 0.0,
                })
            }
        }
    }

    /// Opens connection `rel`: socket, optional bind, non-blocking connect, register.
    fn start(&mut self, rel: u32) {
        let g = self.first + u64::from(rel);
        let sock = match self.connect(g) {
            Ok(s) => s,
            Err(e) => {
                self.failures.connect += 1;
                if self.failures.connect <= 3 {
                    eprintln!("ringway-bench: connect #{g} failed: {e}");
                }
                return;
            }
        };
        let slot = match self.free.pop() {
            Some(s) => s as usize,
            None => {
                self.conns.push(Conn {
                    sock: None,
                    state: State::Free,
                    rel: 0,
                    started_us: 0,
                    pending: Vec::new(),
                });
                self.conns.len() - 1
            }
        };
        let mut sock = sock;
        if let Err(e) = self.poll.registry().register(
            &mut sock,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            eprintln!("ringway-bench: register failed: {e}");
            self.failures.connect += 1;
            self.free.push(slot as u32);
            return;
        }
        let started_us = self.now_us();
        let c = &mut self.conns[slot];
        c.sock = Some(sock);
        c.state = State::Connecting;
        c.rel = rel;
        c.started_us = started_us;
        self.in_flight += 1;
    }

    fn connect(&self, g: u64) -> std::io::Result<TcpStream> {
        let s = Socket::new(
            Domain::IPV4,
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        if let Some(ip) = source_ip(g, self.cfg.source_ips) {
            crate::sys::set_bind_address_no_port(&s)?;
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        if self.is_slow(g) {
            s.set_recv_buffer_size(self.cfg.slow_rcvbuf)?;
        }
        s.set_nodelay(true)?;
        match s.connect(&self.cfg.target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(s.into()))
    }

    fn on_event(&mut self, slot: usize, ev: &mio::event::Event) {
        let Some(c) = self.conns.get(slot) else {
            return;
        };
        if c.sock.is_none() {
            return;
        }
        if c.state == State::Connecting {
            if !(ev.is_writable() || ev.is_error() || ev.is_write_closed()) {
                return;
            }
            let sock = c.sock.as_ref().expect("checked above");
            match sock.take_error() {
                Ok(None) => {}
                _ => return self.fail(slot, |f| &mut f.connect),
            }
            match sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected && !ev.is_error() => return,
                Err(_) => return self.fail(slot, |f| &mut f.connect),
            }
            let g = self.first + u64::from(c.rel);
            let token = self.cfg.tokens.as_ref().map(|t| t.for_conn(g));
            let req = ws::upgrade_request(&self.cfg.host, &self.cfg.path, &ws::key_for(g), token);
            self.conns[slot].state = State::Upgrading;
            if !self.send(slot, &req) {
                return;
            }
        }
        if self.conns[slot].state == State::Slow {
            return; // read once, when the drain ends
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.read(slot);
        }
    }

    fn is_slow(&self, g: u64) -> bool {
        self.mode == Mode::Hold
            && self.cfg.slow_every > 0
            && self.cfg.topics > 0
            && g % self.cfg.slow_every == self.cfg.slow_every - 1
    }

    /// The drain ended: every slow consumer reads what reached it, to learn whether
    /// the server closed it (and how) and how many messages it got. Reads until EOF, an
    /// error, or the socket stays empty for [`SLOW_QUIET_MS`]: a small receive buffer
    /// refills from the server's kernel buffers only as it is read, so an empty read
    /// does not mean the end (the server's close may still be queued behind megabytes).
    /// Bounded by [`SLOW_READS`].
    fn read_slow(&mut self) {
        for slot in 0..self.conns.len() {
            if self.conns[slot].state != State::Slow {
                continue;
            }
            self.drain.slow += 1;
            for _ in 0..SLOW_READS {
                if self.conns[slot].state != State::Slow {
                    break;
                }
                let Some(sock) = self.conns[slot].sock.as_mut() else {
                    break;
                };
                match sock.read(&mut self.scratch) {
                    Ok(0) => {
                        self.peer_gone(slot, "eof");
                        break;
                    }
                    Ok(n) => {
                        if !self.consume(slot, n) {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if !matches!(crate::sys::wait_readable(sock, SLOW_QUIET_MS), Ok(true)) {
                            break;
                        }
                    }
                    Err(_) => {
                        self.peer_gone(slot, "reset");
                        break;
                    }
                }
            }
        }
    }

    /// Reads until the socket would block (or [`READS_PER_EVENT`] reads).
    fn read(&mut self, slot: usize) {
        for _ in 0..READS_PER_EVENT {
            let Some(sock) = self.conns[slot].sock.as_mut() else {
                return;
            };
            match sock.read(&mut self.scratch) {
                Ok(0) => return self.peer_gone(slot, "eof"),
                Ok(n) => {
                    if !self.consume(slot, n) {
                        return;
                    }
                    if n < SCRATCH_BYTES {
                        // A short read emptied the receive queue; anything arriving
                        // later raises a new edge. Skipping the read that would return
                        // EAGAIN halves the syscalls per delivery.
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.peer_gone(slot, "reset"),
            }
        }
        self.again.push(slot);
    }

    /// Handles `n` new bytes in the scratch buffer; false if the connection ended.
    fn consume(&mut self, slot: usize, n: usize) -> bool {
        let scratch = std::mem::take(&mut self.scratch);
        let mut pending = std::mem::take(&mut self.conns[slot].pending);
        let alive = if pending.is_empty() {
            let (used, alive) = self.process(slot, &scratch[..n]);
            if alive && used < n {
                pending.extend_from_slice(&scratch[used..n]);
            }
            alive
        } else {
            pending.extend_from_slice(&scratch[..n]);
            let (used, alive) = self.process(slot, &pending);
            pending.drain(..used);
            if pending.is_empty() {
                // Give the partial buffer back: idle connections hold nothing.
                pending = Vec::new();
            }
            alive
        };
        self.scratch = scratch;
        if alive {
            self.conns[slot].pending = pending;
        }
        alive
    }

    /// Parses the 101 response (when upgrading) and whole frames; returns bytes used and
    /// whether the connection is still open.
    fn process(&mut self, slot: usize, data: &[u8]) -> (usize, bool) {
        let mut at = 0;
        if self.conns[slot].state == State::Upgrading {
            let g = self.first + u64::from(self.conns[slot].rel);
            match ws::check_upgrade(data, g) {
                Ok(None) => return (0, true),
                Ok(Some(head)) => {
                    at = head;
                    self.conns[slot].state = State::Welcoming;
                    if !self.cfg.foreign.expect_welcome && !self.welcomed(slot) {
                        return (at, false);
                    }
                }
                Err(UpgradeError::Malformed) => {
                    self.fail(slot, |f| &mut f.protocol);
                    return (0, false);
                }
                Err(e) => {
                    if self.failures.refused < 3 {
                        eprintln!("ringway-bench: upgrade #{g} refused: {e:?}");
                    }
                    self.fail(slot, |f| &mut f.refused);
                    return (0, false);
                }
            }
        }
        loop {
            match ws::next_frame(&data[at..]) {
                Ok(None) => return (at, true),
                Err(()) => {
                    self.fail_or_close(slot, |f| &mut f.protocol, "bad_frame");
                    return (at, false);
                }
                Ok(Some(f)) => {
                    let range = at + f.payload.start..at + f.payload.end;
                    at += f.len;
                    let alive = match f.mask {
                        None => self.on_frame(slot, f.opcode, f.fin, &data[range]),
                        Some(mask) => {
                            let mut p = data[range].to_vec();
                            ringway::ws::frame::apply_mask(&mut p, mask, 0);
                            self.on_frame(slot, f.opcode, f.fin, &p)
                        }
                    };
                    if !alive {
                        return (at, false);
                    }
                }
            }
        }
    }

    /// One server frame; false if the connection ended.
    fn on_frame(&mut self, slot: usize, opcode: u8, fin: bool, payload: &[u8]) -> bool {
        match opcode {
            0x1 if fin => self.on_text(slot, payload),
            0x8 => {
                let cause = match payload {
                    [a, b, ..] => format!("close_{}", u16::from_be_bytes([*a, *b])),
                    _ => "close_no_code".to_string(),
                };
                self.peer_gone(slot, &cause);
                false
            }
            0x9 => {
                self.pings += 1;
                let pong = ws::pong_frame(payload, self.rng.mask());
                self.send(slot, &pong)
            }
            0xA => true,
            // Binary, fragmented or reserved: the gateway sends none of these.
            _ => {
                self.drain.unknown_frames += 1;
                true
            }
        }
    }

    fn on_text(&mut self, slot: usize, payload: &[u8]) -> bool {
        let kind = ws::classify(payload);
        let state = self.conns[slot].state;
        match (state, kind) {
            (State::Welcoming, Kind::Welcome) => self.welcomed(slot),
            (State::Subscribing, Kind::Subscribed) => self.on_ready(slot),
            (State::Slow, Kind::Message(_)) => {
                self.drain.slow_received += 1;
                true
            }
            (State::Slow, _) => true,
            (State::Ready, Kind::Message(d)) => {
                self.on_delivery(slot, d.topic, d.seq, d.t_ns);
                true
            }
            (State::Ready, Kind::Error { .. }) => {
                self.drain.error_frames += 1;
                true
            }
            (State::Ready, _) => {
                self.drain.unknown_frames += 1;
                true
            }
            (_, k) => {
                if self.failures.protocol < 3 {
                    eprintln!(
                        "ringway-bench: unexpected frame in state {state:?}: {k:?} {}",
                        String::from_utf8_lossy(&payload[..payload.len().min(200)])
                    );
                }
                self.fail(slot, |f| &mut f.protocol);
                false
            }
        }
    }

    /// The connection is open (welcome received, or none expected): subscribe, or be
    /// ready.
    fn welcomed(&mut self, slot: usize) -> bool {
        if self.cfg.topics > 0 && self.mode == Mode::Hold && self.cfg.tokens.is_none() {
            let g = self.first + u64::from(self.conns[slot].rel);
            let topic = format!("topic-{}", g % u64::from(self.cfg.topics));
            let request = self
                .cfg
                .foreign
                .subscribe_template
                .replace("{topic}", &topic);
            let frame = ws::text_frame(request.as_bytes(), self.rng.mask());
            self.conns[slot].state = State::Subscribing;
            if !self.send(slot, &frame) {
                return false;
            }
            if self.cfg.foreign.expect_subscribed {
                return true;
            }
        }
        self.on_ready(slot)
    }

    fn on_ready(&mut self, slot: usize) -> bool {
        let g = self.first + u64::from(self.conns[slot].rel);
        let slow = self.is_slow(g);
        let c = &mut self.conns[slot];
        c.state = if slow { State::Slow } else { State::Ready };
        let took = self.epoch.elapsed().as_micros() as u32;
        let took = took.wrapping_sub(c.started_us).max(1);
        let _ = self
            .ready_hist
            .record(u64::from(took).min(crate::stats::HIST_MAX_US));
        self.ready += 1;
        self.in_flight -= 1;
        if self.cfg.topics > 0 && self.mode == Mode::Hold && !slow {
            self.ready_per_topic[(g % u64::from(self.cfg.topics)) as usize] += 1;
        }
        if self.mode == Mode::Churn {
            let close = ws::close_frame(self.rng.mask());
            if let Some(sock) = self.conns[slot].sock.as_mut() {
                let _ = sock.write(&close);
            }
            self.release(slot);
            return false;
        }
        true
    }

    fn on_delivery(&mut self, slot: usize, topic: &[u8], seq: u64, t_ns: u64) {
        let now = crate::publisher::unix_ns();
        let d = &mut self.drain;
        d.received += 1;
        d.last_delivery_unix_ns = now;
        if seq < self.cfg.replayed {
            d.last_replay_unix_ns = now;
        } else {
            let lat_us = (now.saturating_sub(t_ns) / 1000).max(1);
            self.latency.saturating_record(lat_us);
        }
        if let Some(w) = &self.cfg.window {
            w.delivered(seq);
        }
        if seq < MAX_COUNTED_SEQ {
            let i = seq as usize;
            if self.counts.len() <= i {
                self.counts.resize((i + 1).next_power_of_two(), 0);
            }
            self.counts[i] += 1;
        }
        let t = u64::from(self.cfg.topics.max(1));
        let g = self.first + u64::from(self.conns[slot].rel);
        if topic.is_empty() {
            // A server that delivers the published data bare: only the seq says where it
            // belongs.
            if seq % t != g % t {
                d.misrouted += 1;
            }
            return;
        }
        let topic_index = topic
            .strip_prefix(b"topic-")
            .or_else(|| topic.strip_prefix(b"user-"))
            .and_then(|r| std::str::from_utf8(r).ok()?.parse::<u64>().ok());
        if topic_index != Some(g % t) || seq % t != g % t {
            d.misrouted += 1;
        }
    }

    /// Writes a small frame whole; a write that does not fit fails the connection.
    fn send(&mut self, slot: usize, bytes: &[u8]) -> bool {
        let Some(sock) = self.conns[slot].sock.as_mut() else {
            return false;
        };
        match sock.write(bytes) {
            Ok(n) if n == bytes.len() => true,
            _ => {
                self.fail_or_close(slot, |f| &mut f.write, "write_failed");
                false
            }
        }
    }

    /// The peer closed (close frame, EOF or reset).
    fn peer_gone(&mut self, slot: usize, cause: &str) {
        self.fail_or_close(slot, |f| &mut f.closed, cause);
    }

    /// A failure while connecting, or a close of a ready connection.
    fn fail_or_close(&mut self, slot: usize, kind: fn(&mut Failures) -> &mut u64, cause: &str) {
        if self.conns[slot].state == State::Slow {
            self.drain.slow_closed += 1;
            *self
                .drain
                .slow_close_causes
                .entry(cause.to_string())
                .or_default() += 1;
            self.release(slot);
        } else if self.conns[slot].state == State::Ready {
            self.peer_closed += 1;
            *self.peer_close_causes.entry(cause.to_string()).or_default() += 1;
            self.release(slot);
        } else {
            self.fail(slot, kind);
        }
    }

    fn fail(&mut self, slot: usize, kind: fn(&mut Failures) -> &mut u64) {
        if self.conns[slot].state.in_progress() {
            *kind(&mut self.failures) += 1;
            self.in_flight -= 1;
        }
        self.release(slot);
    }

    /// Drops the socket and frees the slot.
    fn release(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.state = State::Free;
        c.pending = Vec::new();
        self.free.push(slot as u32);
    }

    /// Sends a close frame on every open connection and drops it; returns how many.
    fn close_all(&mut self) -> u64 {
        let mut closed = 0;
        for slot in 0..self.conns.len() {
            if self.conns[slot].sock.is_none() {
                continue;
            }
            if matches!(self.conns[slot].state, State::Ready | State::Slow) {
                let close = ws::close_frame(self.rng.mask());
                if let Some(sock) = self.conns[slot].sock.as_mut() {
                    let _ = sock.write(&close);
                }
                closed += 1;
            }
            self.release(slot);
        }
        self.conns = Vec::new();
        self.free = Vec::new();
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_slot_stays_small() {
        // mio adds a selector id to every registered source under debug assertions.
        let limit = if cfg!(debug_assertions) { 56 } else { 40 };
        assert!(
            std::mem::size_of::<Conn>() <= limit,
            "{}",
            std::mem::size_of::<Conn>()
        );
    }

    #[test]
    fn source_ips_spread() {
        assert_eq!(source_ip(0, 0), None);
        assert_eq!(source_ip(0, 4), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_ip(5, 4), Some("127.0.0.3".parse().unwrap()));
        assert_eq!(source_ip(300, 1000), Some("127.0.1.46".parse().unwrap()));
    }
}
