//! One role's connections (a shard's command or subscriber link) to every master: one
//! for a single Redis or a Sentinel's master, one per master of a Redis Cluster. Each
//! command goes to the master serving its slot (`Route`); the command link gets its
//! replies back in the order it wrote the commands, whichever masters answer first;
//! the subscriber link gets pushes as they come.
//!
//! A cluster's topology is read from its seeds (`CLUSTER SHARDS`) at every connect.
//! A `MOVED` or `ASK` answer naming a master this link holds is followed in place (the
//! command is sent there again, after `ASKING` for an `ASK`); one naming a master it
//! does not hold fails the link, whose reconnect reads the topology again. A `TRYAGAIN`
//! (a multi-key command while its slot migrates) is sent again from the start shortly. A master
//! lost fails the whole link the same way: every master is connected again, and the
//! shard restores its state as after any reconnect.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;

use super::cluster::{self, SlotMap};
use super::link::{self, Keepalive, Link, LinkError};
use super::order::Order;
use super::url::{Addr, Target};
use super::RedisUrl;

/// Where a command goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the master serving this slot.
    Slot(u16),
    /// To every master, answered once: the first error, else the smallest integer (a
    /// library version: the oldest master's), else the first master's reply
    /// (`FUNCTION LOAD`, `PING`, `FCALL ringway_version 0`).
    All,
}

impl Route {
    /// The route of a command by its first key: `FCALL`'s first declared key, the
    /// argument after the command name for the rest; `All` for `FUNCTION`, and for
    /// what has no key.
    pub fn of(args: &[&[u8]]) -> Self {
        let name = args.first().copied().unwrap_or_default();
        let key = if name.eq_ignore_ascii_case(b"FCALL") || name.eq_ignore_ascii_case(b"FCALL_RO") {
            let keys = args.get(2).and_then(|n| std::str::from_utf8(n).ok());
            match keys.and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n > 0 => args.get(3),
                _ => None,
            }
        } else if name.eq_ignore_ascii_case(b"FUNCTION") || name.eq_ignore_ascii_case(b"PING") {
            None
        } else {
            args.get(1)
        };
        match key {
            Some(k) => Route::Slot(cluster::slot(k)),
            None => Route::All,
        }
    }
}

/// One connection's wait for something to read.
type Readable<'a> = Pin<Box<dyn Future<Output = Result<(), LinkError>> + 'a>>;

pub struct Masters {
    links: Vec<Link>,
    /// Where each command goes, and its reply's place in the order written.
    order: Order,
    /// Per link, the keepalive of a subscriber link.
    keepalive: Vec<Keepalive>,
    /// The next link `next_push` reads first, so that one busy master cannot starve
    /// the others.
    turn: usize,
}

impl Masters {
    /// Connects to the URL's Redis: to its one server (or the master its Sentinels
    /// name), or to every master of its cluster, whose topology is read from the first
    /// seed that answers. `name` names each connection (`CLIENT SETNAME`).
    pub async fn connect(url: &RedisUrl, timeout: Duration, name: &str) -> Result<Self, LinkError> {
        let (links, map) = match &url.target {
            Target::Cluster { seeds } => {
                let map = topology(url, seeds, timeout).await?;
                let mut links = Vec::with_capacity(map.masters.len());
                for m in &map.masters {
                    links.push(Link::connect(&url.at(&m.addr), timeout, Some(name)).await?);
                }
                (links, map)
            }
            _ => {
                let link = Link::connect(url, timeout, Some(name)).await?;
                let map = SlotMap::single(link.addr.clone());
                (vec![link], map)
            }
        };
        let addrs = links.iter().map(|l| l.addr.clone()).collect();
        Ok(Self {
            links,
            order: Order::new(map, addrs, url.is_cluster()),
            keepalive: Vec::new(),
            turn: 0,
        })
    }

    /// How many masters this link holds.
    pub fn count(&self) -> usize {
        self.links.len()
    }

    /// The server the first connection reached (with Sentinel: the master).
    pub fn addr(&self) -> &Addr {
        &self.links[0].addr
    }

    /// Writes commands whose replies come back in order (`next_reply`), after
    /// anything sent again that waited.
    pub async fn write_commands(&mut self, commands: Vec<(Bytes, Route)>) -> Result<(), LinkError> {
        for (bytes, route) in commands {
            self.order.issue(bytes, route)?;
        }
        self.flush().await
    }

    /// Writes each link's buffer (one write per link).
    async fn write_each(&mut self, out: Vec<BytesMut>) -> Result<(), LinkError> {
        for (i, buf) in out.into_iter().enumerate() {
            if !buf.is_empty() {
                self.links[i].write(buf.freeze()).await?;
            }
        }
        Ok(())
    }

    /// Writes what waits: commands sent again, and the retries that are due.
    pub async fn flush(&mut self) -> Result<(), LinkError> {
        let out = self.order.take_writes(Instant::now())?;
        self.write_each(out).await
    }

    /// Whether redirected commands or due retries wait for `flush`.
    pub fn must_flush(&self) -> bool {
        self.order.must_flush(Instant::now())
    }

    /// How long until the next retry is due, if one waits.
    pub fn next_retry(&self) -> Option<Duration> {
        self.order.next_retry(Instant::now())
    }

    /// The reply to the oldest command not yet handed out, once it has come (and every
    /// master it went to has answered).
    pub fn next_reply(&mut self) -> Result<Option<BytesFrame>, LinkError> {
        for i in 0..self.links.len() {
            while let Some(frame) = self.links[i].next_buffered()? {
                self.order.answered(i, frame)?;
            }
        }
        Ok(self.order.next_reply())
    }

    /// Writes `bytes` where `route` says, for a subscriber link (no replies are
    /// matched: everything comes back as a push).
    pub async fn send(&mut self, commands: Vec<(Bytes, Route)>) -> Result<(), LinkError> {
        let mut out = vec![BytesMut::new(); self.links.len()];
        for (bytes, route) in commands {
            for t in self.order.targets(route)? {
                out[t].extend_from_slice(&bytes);
            }
        }
        self.write_each(out).await
    }

    /// The next push any master sent (a subscriber link), each master in turn, with
    /// the index of the connection it came on.
    pub fn next_push(&mut self) -> Result<Option<(usize, BytesFrame)>, LinkError> {
        let n = self.links.len();
        for k in 0..n {
            let i = (self.turn + k) % n;
            if let Some(frame) = self.links[i].next_buffered()? {
                if let Some(k) = self.keepalive.get_mut(i) {
                    k.heard();
                }
                self.turn = (i + 1) % n;
                return Ok(Some((i, frame)));
            }
        }
        Ok(None)
    }

    /// Starts keeping every connection of a subscriber link honest (`Keepalive`); a
    /// PING was just written to each.
    pub fn keep_alive(&mut self, every: Duration, timeout: Duration) {
        self.keepalive = (0..self.links.len())
            .map(|_| Keepalive::new(every, timeout, true))
            .collect();
    }

    /// PINGs the quiet connections, fails on an overdue answer; how long until asked
    /// again.
    pub async fn check_alive(&mut self) -> Result<Duration, LinkError> {
        let mut wait = Duration::MAX;
        for (k, l) in self.keepalive.iter_mut().zip(self.links.iter_mut()) {
            wait = wait.min(k.check(l).await?);
        }
        Ok(wait)
    }

    /// Waits for something to read on any connection, at most `wait` or until `wake`,
    /// and moves what arrived into the read buffers (every connection is read without
    /// waiting, whichever way the wait ends: see `Link::fill_within`).
    pub async fn fill_within(
        &mut self,
        wait: Duration,
        wake: impl Future<Output = ()>,
    ) -> Result<(), LinkError> {
        if self.links.len() == 1 {
            return self.links[0].fill_within(wait, wake).await;
        }
        {
            let mut readable: Vec<Readable<'_>> = self
                .links
                .iter()
                .map(|l| Box::pin(l.readable()) as _)
                .collect();
            let any = std::future::poll_fn(|cx| {
                for r in readable.iter_mut() {
                    if let Poll::Ready(res) = r.as_mut().poll(cx) {
                        return Poll::Ready(res);
                    }
                }
                Poll::Pending
            });
            let readable = monoio::select! {
                r = any => Some(r),
                _ = wake => None,
                _ = monoio::time::sleep(wait) => None,
            };
            if let Some(r) = readable {
                r?;
            }
        }
        for l in &mut self.links {
            l.fill()?;
        }
        Ok(())
    }
}

/// The slot map, from the first seed that answers `CLUSTER SHARDS` with every slot
/// served.
async fn topology(url: &RedisUrl, seeds: &[Addr], timeout: Duration) -> Result<SlotMap, LinkError> {
    let mut last = LinkError::Topology("no seed".into());
    for seed in seeds {
        match ask_seed(url, seed, timeout).await {
            Ok(map) => return Ok(map),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One seed's slot map, checked to serve every slot.
async fn ask_seed(url: &RedisUrl, seed: &Addr, timeout: Duration) -> Result<SlotMap, LinkError> {
    let mut l = Link::connect(&url.at(seed), timeout, None).await?;
    let mut out = BytesMut::new();
    link::encode(&mut out, &[b"CLUSTER", b"SHARDS"]);
    l.write(out.freeze()).await?;
    match monoio::time::timeout(timeout, l.next_frame()).await {
        Ok(Ok(BytesFrame::Error(e))) => Err(LinkError::Refused {
            what: "CLUSTER SHARDS (is this a Redis Cluster node, Redis >= 7.0?)",
            message: e.to_string(),
        }),
        Ok(Ok(frame)) => {
            let map = SlotMap::from_shards(&frame, url.tls)
                .map_err(|e| LinkError::Topology(format!("{seed}: {e}")))?;
            map.check_covered()
                .map_err(|e| LinkError::Topology(format!("{seed}: {e}")))?;
            Ok(map)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(LinkError::Timeout),
    }
}

/// For `ringway doctor`: each seed's answer (the masters it names, every slot
/// served), and for the first map, whether each master answers as the gateway would
/// connect to it.
pub async fn ask_seeds(url: &RedisUrl, timeout: Duration) -> SeedReport {
    let Target::Cluster { seeds } = &url.target else {
        return SeedReport::default();
    };
    let mut report = SeedReport::default();
    for seed in seeds {
        let answer = ask_seed(url, seed, timeout)
            .await
            .map(|m| m.masters.iter().map(|m| m.addr.clone()).collect::<Vec<_>>());
        report.seeds.push((seed.clone(), answer));
    }
    let first = report
        .seeds
        .iter()
        .find_map(|(_, a)| a.as_ref().ok())
        .cloned();
    for master in first.unwrap_or_default() {
        let answer = Link::connect(&url.at(&master), timeout, None)
            .await
            .map(|_| ());
        report.masters.push((master, answer));
    }
    report
}

/// What `ask_seeds` found.
#[derive(Default)]
pub struct SeedReport {
    pub seeds: Vec<(Addr, Result<Vec<Addr>, LinkError>)>,
    pub masters: Vec<(Addr, Result<(), LinkError>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_by_their_first_key() {
        let slot = |k: &str| Route::Slot(cluster::slot(k.as_bytes()));
        assert_eq!(
            Route::of(&[b"FCALL", b"f", b"2", b"ringway:history:{a}", b"x"]),
            slot("a")
        );
        assert_eq!(Route::of(&[b"FCALL", b"ringway_version", b"0"]), Route::All);
        assert_eq!(Route::of(&[b"fcall_ro", b"f", b"1", b"{u}k"]), slot("u"));
        assert_eq!(
            Route::of(&[b"XRANGE", b"{ringway}:inbox:u", b"-", b"+"]),
            slot("ringway")
        );
        assert_eq!(Route::of(&[b"FUNCTION", b"LOAD", b"x"]), Route::All);
        assert_eq!(Route::of(&[b"PING"]), Route::All);
    }
}
