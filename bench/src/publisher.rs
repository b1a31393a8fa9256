//! The fanout publisher: messages on a fixed schedule (or as fast as acknowledgements
//! allow) through a few keep-alive HTTP connections to the admin API (`POST
//! /v1/publish`, pipelined) or one WebSocket connection (`{"op":"publish",…,"ref":k}`).
//!
//! Coordinated-omission-free: message k of a fixed-rate run is due at `start + k/R` and
//! carries that *intended* time in `t`, whenever it actually leaves. A publisher that
//! falls behind (in-flight cap reached, slow acks) therefore shows up in the measured
//! latency instead of hiding it. At `--rate 0` there is no schedule: `t` is the send
//! time, and at most `max_inflight` requests are unacknowledged at once.
//!
//! Message k goes to `topic-(k mod T)`; its data is `{"seq":k,"t":<ns>,"pad":"…"}`.
//! The run is bounded: sending stops at the duration, acknowledgements are awaited at
//! most [`ACK_GRACE`] longer.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream as StdStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use crate::ws::{self, Kind, Rng};

/// How long after the last send unacknowledged messages are waited for.
pub const ACK_GRACE: Duration = Duration::from_secs(10);

/// Where messages go.
#[derive(Debug, Clone)]
pub enum Via {
    /// The admin API, over `conns` keep-alive connections.
    Http { admin: SocketAddr },
    /// A WebSocket connection to the gateway (needs `--client-publish true` there).
    Ws {
        target: SocketAddr,
        host: String,
        path: String,
    },
}

#[derive(Debug, Clone)]
pub struct PubCfg {
    /// Send message k to `user-(k mod T)` (`POST /v1/send`) instead of a topic.
    pub direct: bool,
    /// Admin path; default `/v1/publish` (or `/v1/send` when `direct`).
    pub path: Option<String>,
    /// HTTP body with `{topic}` and `{data}`; default protocol v1's.
    pub template: Option<String>,
    pub via: Via,
    /// HTTP connections (ignored for WebSocket: one connection).
    pub conns: usize,
    /// Messages per second over all topics; 0 = saturation.
    pub rate: f64,
    pub duration: Duration,
    pub topics: u32,
    pub msg_bytes: usize,
    pub max_inflight: usize,
    /// The first message's seq (later ones follow); `refused` and `unacked` are seqs
    /// from it, `sent` a count.
    pub first_seq: u64,
    /// Closed loop (`--window K`): message n waits until message n − K reached every
    /// subscriber ready on its topic (`ready_per_topic`).
    pub window: Option<ClosedLoop>,
}

/// The closed-loop window: its counters, its size and the subscribers per topic.
#[derive(Debug, Clone)]
pub struct ClosedLoop {
    pub counters: std::sync::Arc<crate::window::Window>,
    pub size: u64,
    pub ready_per_topic: Vec<u32>,
}

impl ClosedLoop {
    /// Whether message `next` may be sent.
    fn open(&self, next: u64) -> bool {
        if next < self.size {
            return true;
        }
        let seq = next - self.size;
        let t = (seq % self.ready_per_topic.len().max(1) as u64) as usize;
        self.counters
            .reached(seq, self.ready_per_topic.get(t).copied().unwrap_or(0))
    }
}

/// What the publisher did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PubReport {
    /// Messages sent (seqs 0 .. sent).
    pub sent: u64,
    /// Acknowledged as published (HTTP 200 / `published`).
    pub acked_ok: u64,
    /// Refused by the gateway (any other status / an `error` reply): not published.
    pub refused: Vec<u64>,
    /// Never acknowledged (connection lost or grace expired): fate unknown.
    pub unacked: Vec<u64>,
    /// Refusals by HTTP status or error code.
    pub refusals: BTreeMap<String, u64>,
    /// The schedule's start, ns since the UNIX epoch.
    pub start_unix_ns: u64,
    /// First send to last send.
    pub send_secs: f64,
    /// Start to the last acknowledgement.
    pub total_secs: f64,
    /// Largest (actual − intended) send time, µs (fixed rate only).
    pub max_lag_us: u64,
    /// Messages sent more than 1 ms after their intended time.
    pub late_over_1ms: u64,
}

struct PubConn {
    sock: TcpStream,
    out: Vec<u8>,
    out_at: usize,
    inbuf: Vec<u8>,
    /// HTTP: seqs awaiting a response, in order.
    queue: VecDeque<u64>,
    dead: bool,
}

/// Now, in ns since the UNIX epoch: the clock of the publish times messages carry and
/// of the receive times they are measured against.
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Connects, upgrades and reads the welcome (WebSocket), all blocking with timeouts.
fn open_conn(via: &Via, index: u64) -> Result<(StdStream, Vec<u8>), String> {
    let addr = match via {
        Via::Http { admin } => *admin,
        Via::Ws { target, .. } => *target,
    };
    let s = StdStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("publisher cannot connect to {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let Via::Ws { host, path, .. } = via else {
        return Ok((s, Vec::new()));
    };
    let mut s = s;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let key_index = u64::MAX - index;
    s.write_all(&ws::upgrade_request(
        host,
        path,
        &ws::key_for(key_index),
        None,
    ))
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut head = None;
    for _ in 0..64 {
        let n = s
            .read(&mut chunk)
            .map_err(|e| format!("publisher upgrade: {e}"))?;
        if n == 0 {
            return Err("publisher: gateway closed during upgrade".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if head.is_none() {
            head = ws::check_upgrade(&buf, key_index)
                .map_err(|e| format!("publisher upgrade refused: {e:?}"))?;
        }
        if let Some(h) = head {
            if let Ok(Some(f)) = ws::next_frame(&buf[h..]) {
                if ws::classify(&buf[h + f.payload.start..h + f.payload.end]) != Kind::Welcome {
                    return Err("publisher: no welcome".into());
                }
                let rest = buf[h + f.len..].to_vec();
                return Ok((s, rest));
            }
        }
    }
    Err("publisher: no welcome".into())
}

/// Runs the schedule; returns what was sent and acknowledged.
pub fn run(cfg: &PubCfg) -> Result<PubReport, String> {
    let ws_mode = matches!(cfg.via, Via::Ws { .. });
    let n_conns = if ws_mode { 1 } else { cfg.conns.max(1) };
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut conns = Vec::new();
    for i in 0..n_conns {
        let (s, rest) = open_conn(&cfg.via, i as u64)?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut sock = TcpStream::from_std(s);
        poll.registry()
            .register(&mut sock, Token(i), Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| e.to_string())?;
        conns.push(PubConn {
            sock,
            out: Vec::new(),
            out_at: 0,
            inbuf: rest,
            queue: VecDeque::new(),
            dead: false,
        });
    }
    let host = match &cfg.via {
        Via::Http { admin } => admin.to_string(),
        Via::Ws { host, .. } => host.clone(),
    };
    // The admin API's bearer token, when the gateway requires one.
    let auth = ringway::admin::client::auth_header();
    let fixed = cfg.rate > 0.0;
    let total: u64 = if fixed {
        (cfg.rate * cfg.duration.as_secs_f64()).floor() as u64
    } else {
        u64::MAX
    };
    let interval_ns = if fixed { 1e9 / cfg.rate } else { 0.0 };
    let topics = u64::from(cfg.topics.max(1));
    let mut rep = PubReport::default();
    // WebSocket acks come by ref, in any order.
    let mut ws_inflight: HashSet<u64> = HashSet::new();
    let mut inflight = 0usize;
    let mut rng = Rng::new(0x5eed);
    let mut events = Events::with_capacity(64);
    let start = Instant::now();
    let start_unix = unix_ns();
    rep.start_unix_ns = start_unix;
    let send_end = start + cfg.duration;
    let hard_end = send_end + ACK_GRACE;
    let mut next: u64 = 0;
    let mut rr = 0usize;
    let mut last_send = start;
    let mut last_ack = start;
    loop {
        let now = Instant::now();
        // Send everything that is due, up to the in-flight cap.
        // A fixed-rate run sends all floor(R·D) messages (all due before the end, even
        // if the publisher runs late); saturation stops at the end.
        while next < total
            && inflight < cfg.max_inflight
            && (fixed || now < send_end)
            && now < hard_end
            && cfg.window.as_ref().is_none_or(|w| w.open(next))
        {
            if let Some(w) = &cfg.window {
                w.counters.sending(next);
            }
            let due_ns = (next as f64 * interval_ns) as u64;
            let due = start + Duration::from_nanos(due_ns);
            if fixed && due > now {
                break;
            }
            let live: Vec<usize> = (0..conns.len()).filter(|i| !conns[*i].dead).collect();
            if live.is_empty() {
                break;
            }
            let j = live[rr % live.len()];
            rr += 1;
            let t_ns = if fixed {
                start_unix + due_ns
            } else {
                unix_ns()
            };
            if fixed {
                let lag = now.saturating_duration_since(due).as_micros() as u64;
                rep.max_lag_us = rep.max_lag_us.max(lag);
                if lag > 1000 {
                    rep.late_over_1ms += 1;
                }
            }
            let data = ws::message_data(cfg.first_seq + next, t_ns, cfg.msg_bytes);
            let topic = next % topics;
            let c = &mut conns[j];
            if ws_mode {
                let payload = format!(
                    "{{\"op\":\"publish\",\"topic\":\"topic-{topic}\",\"data\":{data},\"ref\":{next}}}"
                );
                c.out
                    .extend_from_slice(&ws::text_frame(payload.as_bytes(), rng.mask()));
                ws_inflight.insert(next);
            } else {
                let name = if cfg.direct {
                    format!("user-{topic}")
                } else {
                    format!("topic-{topic}")
                };
                let body = match &cfg.template {
                    Some(t) => t.replace("{topic}", &name).replace("{data}", &data),
                    None if cfg.direct => format!("{{\"user\":\"{name}\",\"data\":{data}}}"),
                    None => format!("{{\"topic\":\"{name}\",\"data\":{data}}}"),
                };
                let path = cfg.path.as_deref().unwrap_or(if cfg.direct {
                    "/v1/send"
                } else {
                    "/v1/publish"
                });
                c.out.extend_from_slice(
                    format!(
                        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                c.out.extend_from_slice(body.as_bytes());
                c.queue.push_back(next);
            }
            inflight += 1;
            next += 1;
            last_send = now;
        }
        for c in conns.iter_mut() {
            flush(c);
        }
        let sending_done = next >= total || (!fixed && Instant::now() >= send_end);
        if sending_done && inflight == 0 {
            break;
        }
        if now >= hard_end || conns.iter().all(|c| c.dead) {
            break;
        }
        let timeout = if !sending_done && inflight < cfg.max_inflight && fixed {
            let due = start + Duration::from_nanos((next as f64 * interval_ns) as u64);
            let wait = due.saturating_duration_since(Instant::now());
            if wait < Duration::from_millis(1) {
                // epoll_wait counts whole milliseconds (mio rounds up): sleep the
                // sub-millisecond rest precisely, then only collect what is ready.
                std::thread::sleep(wait);
                Duration::ZERO
            } else {
                // Whole milliseconds, rounded down; the rest is slept next time round.
                Duration::from_millis(wait.as_millis().min(100) as u64)
            }
        } else if !sending_done && inflight < cfg.max_inflight {
            if cfg.window.as_ref().is_some_and(|w| !w.open(next)) {
                // Waiting for deliveries, which no socket of ours signals.
                std::thread::sleep(Duration::from_micros(50));
            }
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("publisher poll: {e}")),
        }
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            if c.dead {
                continue;
            }
            if ev.is_writable() {
                flush(c);
            }
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                read_all(c);
            }
        }
        // Handle whatever the reads brought (and bytes left over from the upgrade).
        let refused_before = rep.refused.len();
        for c in conns.iter_mut() {
            let acked = if ws_mode {
                ws_replies(c, &mut ws_inflight, &mut rep, &mut rng)
            } else {
                http_replies(c, &mut rep)
            };
            if acked > 0 {
                inflight -= acked;
                last_ack = Instant::now();
            }
            if c.dead {
                // Whatever it still owed is unknown.
                let lost: Vec<u64> = c.queue.drain(..).collect();
                inflight -= lost.len();
                if let Some(w) = &cfg.window {
                    lost.iter().for_each(|k| w.counters.give_up(*k));
                }
                rep.unacked.extend(lost);
            }
        }
        if let Some(w) = &cfg.window {
            // Refused messages reach nobody: the window must not wait for them.
            rep.refused[refused_before..]
                .iter()
                .for_each(|k| w.counters.give_up(*k));
        }
    }
    for c in conns.iter_mut() {
        rep.unacked.extend(c.queue.drain(..));
    }
    rep.unacked.extend(ws_inflight.drain());
    rep.unacked.sort_unstable();
    for k in rep.refused.iter_mut().chain(rep.unacked.iter_mut()) {
        *k += cfg.first_seq;
    }
    rep.sent = next;
    rep.send_secs = last_send.duration_since(start).as_secs_f64();
    rep.total_secs = last_ack.duration_since(start).as_secs_f64();
    Ok(rep)
}

fn flush(c: &mut PubConn) {
    while c.out_at < c.out.len() && !c.dead {
        match c.sock.write(&c.out[c.out_at..]) {
            Ok(0) => c.dead = true,
            Ok(n) => c.out_at += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => c.dead = true,
        }
    }
    if c.out_at == c.out.len() {
        c.out.clear();
        c.out_at = 0;
    }
}

fn read_all(c: &mut PubConn) {
    let mut chunk = [0u8; 16 * 1024];
    for _ in 0..64 {
        match c.sock.read(&mut chunk) {
            Ok(0) => {
                c.dead = true;
                return;
            }
            Ok(n) => {
                c.inbuf.extend_from_slice(&chunk[..n]);
                if n < chunk.len() {
                    // Short read: the queue is empty; new data raises a new edge.
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                c.dead = true;
                return;
            }
        }
    }
}

/// Pipelined HTTP responses, matched to requests in order; returns how many completed.
fn http_replies(c: &mut PubConn, rep: &mut PubReport) -> usize {
    let mut done = 0;
    let mut used = 0;
    loop {
        let buf = &c.inbuf[used..];
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(buf) {
            Ok(httparse::Status::Complete(head)) => {
                let len = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                if buf.len() < head + len {
                    break;
                }
                let code = r.code.unwrap_or(0);
                let Some(k) = c.queue.pop_front() else {
                    c.dead = true;
                    break;
                };
                if code == 200 {
                    rep.acked_ok += 1;
                } else {
                    rep.refused.push(k);
                    *rep.refusals.entry(format!("http_{code}")).or_default() += 1;
                }
                done += 1;
                used += head + len;
            }
            Ok(httparse::Status::Partial) => break,
            Err(_) => {
                c.dead = true;
                break;
            }
        }
    }
    c.inbuf.drain(..used);
    done
}

/// WebSocket replies: `published`/`error` with our ref; pings answered.
fn ws_replies(
    c: &mut PubConn,
    inflight: &mut HashSet<u64>,
    rep: &mut PubReport,
    rng: &mut Rng,
) -> usize {
    let mut done = 0;
    let mut used = 0;
    loop {
        let f = match ws::next_frame(&c.inbuf[used..]) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(()) => {
                c.dead = true;
                break;
            }
        };
        let p = &c.inbuf[used + f.payload.start..used + f.payload.end];
        match f.opcode {
            0x1 => match ws::classify(p) {
                Kind::Published { reference: Some(k) } if inflight.remove(&k) => {
                    rep.acked_ok += 1;
                    done += 1;
                }
                Kind::Error { reference: Some(k) } if inflight.remove(&k) => {
                    rep.refused.push(k);
                    let code = serde_json::from_slice::<serde_json::Value>(p)
                        .ok()
                        .and_then(|v| v.get("code")?.as_str().map(str::to_owned))
                        .unwrap_or_else(|| "error".into());
                    *rep.refusals.entry(code).or_default() += 1;
                    done += 1;
                }
                _ => {}
            },
            0x9 => {
                let pong = ws::pong_frame(p, rng.mask()).to_vec();
                c.out.extend_from_slice(&pong);
            }
            0x8 => c.dead = true,
            _ => {}
        }
        used += f.len;
    }
    c.inbuf.drain(..used);
    if c.dead {
        // Everything in flight on the only WebSocket connection is now unknown.
        c.queue.extend(inflight.drain());
    }
    flush(c);
    done
}
