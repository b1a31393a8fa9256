//! Redis Sentinel (`redis+sentinel://`): which server is the master, and noticing at
//! once when that changes.
//!
//! - `master` asks the URL's Sentinels in turn for the master's address; every link
//!   does so before it connects, and then checks with `ROLE` that the server named is
//!   a master (a Sentinel may still name the old one early in a failover).
//! - `watch`, one task per shard, holds a connection to one Sentinel, subscribed to
//!   `+switch-master`. When the master moves, or when a reconnect to a Sentinel finds
//!   that it moved meanwhile, the shard's links drop their connection and reconnect at
//!   once instead of waiting out their backoff. This is what catches a master that was
//!   cut off rather than killed: its connections stay open, and only Sentinel knows.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_protocol::resp2::types::BytesFrame;

use super::link::{self, Keepalive, Link, LinkError};
use super::url::{Addr, Target};
use super::{Backoff, Backplane, RedisUrl, PING_EVERY, REPLY_TIMEOUT};
use crate::shard::Shard;

/// Time one Sentinel gets to answer before the next is asked.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);

/// The master's address as the first Sentinel that knows it says.
pub async fn master(url: &RedisUrl) -> Result<Addr, LinkError> {
    let mut said = Vec::new();
    for (s, answer) in answers(url, true).await {
        match answer {
            Ok(Some(addr)) => return Ok(addr),
            Ok(None) => said.push(format!("{s}: does not know that master")),
            Err(e) => said.push(format!("{s}: {e}")),
        }
    }
    if said.is_empty() {
        said.push("not a Sentinel URL".into());
    }
    Err(LinkError::NoMaster(said.join("; ")))
}

/// What each of the URL's Sentinels says the master is (for `ringway doctor`).
pub async fn ask_each(url: &RedisUrl) -> Vec<(Addr, Result<Option<Addr>, LinkError>)> {
    answers(url, false).await
}

/// The Sentinels' answers in turn, each within `SENTINEL_TIMEOUT`; with `first`, up to
/// the first that names a master.
async fn answers(url: &RedisUrl, first: bool) -> Vec<(Addr, Result<Option<Addr>, LinkError>)> {
    let Target::Sentinel {
        sentinels,
        master,
        password,
    } = &url.target
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for s in sentinels {
        let asked = ask(s, master, password.as_deref());
        let answer = match monoio::time::timeout(SENTINEL_TIMEOUT, asked).await {
            Ok(r) => r,
            Err(_) => Err(LinkError::Timeout),
        };
        let found = matches!(answer, Ok(Some(_)));
        out.push((s.clone(), answer));
        if first && found {
            break;
        }
    }
    out
}

/// `SENTINEL get-master-addr-by-name` on one Sentinel.
async fn ask(
    sentinel: &Addr,
    name: &str,
    password: Option<&str>,
) -> Result<Option<Addr>, LinkError> {
    let mut link = Link::open(sentinel, None).await?;
    let mut out = BytesMut::new();
    let expect_auth = auth(&mut out, password);
    link::encode(
        &mut out,
        &[b"SENTINEL", b"get-master-addr-by-name", name.as_bytes()],
    );
    link.write(out.freeze()).await?;
    if expect_auth {
        refused("AUTH", link.next_frame().await?)?;
    }
    let reply = refused("SENTINEL", link.next_frame().await?)?;
    Ok(parse_addr(&reply))
}

/// Appends `AUTH` when the Sentinels take a password; true if it did.
fn auth(out: &mut BytesMut, password: Option<&str>) -> bool {
    match password {
        Some(p) => {
            link::encode(out, &[b"AUTH", p.as_bytes()]);
            true
        }
        None => false,
    }
}

fn refused(what: &'static str, frame: BytesFrame) -> Result<BytesFrame, LinkError> {
    match frame {
        BytesFrame::Error(message) => Err(LinkError::Refused {
            what,
            message: message.to_string(),
        }),
        f => Ok(f),
    }
}

/// `[host, port]`; `None` for a nil reply (the Sentinel does not monitor that name).
fn parse_addr(frame: &BytesFrame) -> Option<Addr> {
    let BytesFrame::Array(parts) = frame else {
        return None;
    };
    let [BytesFrame::BulkString(host), BytesFrame::BulkString(port)] = parts.as_slice() else {
        return None;
    };
    Some(Addr {
        host: std::str::from_utf8(host).ok()?.to_owned(),
        port: std::str::from_utf8(port).ok()?.parse().ok()?,
    })
}

/// `+switch-master`'s payload, `<name> <old ip> <old port> <new ip> <new port>`: the
/// new address when it is about `name`.
fn switched(payload: &[u8], name: &str) -> Option<Addr> {
    let text = std::str::from_utf8(payload).ok()?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        [n, _, _, host, port] if *n == name => Some(Addr {
            host: (*host).to_owned(),
            port: port.parse().ok()?,
        }),
        _ => None,
    }
}

/// Runs for the life of the shard when the URL names Sentinels.
pub async fn watch(shard: Rc<Shard>) {
    let Some(bp) = shard.backplane() else {
        return;
    };
    let Target::Sentinel {
        sentinels,
        master,
        password,
    } = &bp.url.target
    else {
        return;
    };
    let mut backoff = Backoff::new(shard.index as u64 * 2 + 3);
    // Shards start at different Sentinels, so one that is down costs each shard a
    // reconnect at most, and the Sentinels share the connections.
    let mut next = shard.index;
    let mut warned = false;
    loop {
        let sentinel = &sentinels[next % sentinels.len()];
        next += 1;
        let started = Instant::now();
        let err = follow(bp, sentinel, master, password.as_deref()).await;
        if started.elapsed() > Duration::from_secs(10) {
            backoff.reset();
            warned = false;
        }
        if !warned {
            tracing::warn!(shard = shard.index, sentinel = %sentinel, error = %err, "lost the Sentinel watching the master; trying the next");
            warned = true;
        }
        monoio::time::sleep(backoff.next_delay()).await;
    }
}

/// Follows one Sentinel until its connection fails.
async fn follow(bp: &Backplane, sentinel: &Addr, name: &str, password: Option<&str>) -> LinkError {
    let mut link = match monoio::time::timeout(SENTINEL_TIMEOUT, Link::open(sentinel, None)).await {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return e,
        Err(_) => return LinkError::Timeout,
    };
    let mut out = BytesMut::new();
    let mut expect_auth = auth(&mut out, password);
    // Where the master is now, then every move from here on.
    link::encode(
        &mut out,
        &[b"SENTINEL", b"get-master-addr-by-name", name.as_bytes()],
    );
    let mut expect_addr = true;
    link::encode(&mut out, &[b"SUBSCRIBE", b"+switch-master"]);
    if let Err(e) = link.write(out.freeze()).await {
        return e;
    }
    let mut keepalive = Keepalive::new(PING_EVERY, REPLY_TIMEOUT, false);
    loop {
        loop {
            let frame = match link.next_buffered() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return e,
            };
            keepalive.heard();
            if std::mem::take(&mut expect_auth) {
                if let Err(e) = refused("AUTH", frame) {
                    return e;
                }
                continue;
            }
            if std::mem::take(&mut expect_addr) {
                match refused("SENTINEL", frame) {
                    Err(e) => return e,
                    Ok(f) => {
                        if let Some(addr) = parse_addr(&f) {
                            bp.master_named(addr);
                        }
                    }
                }
                continue;
            }
            match frame {
                BytesFrame::Error(e) => {
                    return LinkError::Refused {
                        what: "SUBSCRIBE",
                        message: e.to_string(),
                    }
                }
                BytesFrame::Array(parts) => {
                    if let [BytesFrame::BulkString(kind), _, BytesFrame::BulkString(payload)] =
                        parts.as_slice()
                    {
                        if &kind[..] == b"message" {
                            if let Some(addr) = switched(payload, name) {
                                bp.master_named(addr);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let wait = match keepalive.check(&mut link).await {
            Ok(wait) => wait,
            Err(e) => return e,
        };
        if let Err(e) = link.fill_within(wait, std::future::pending()).await {
            return e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn reads_addresses_and_switches() {
        let reply = BytesFrame::Array(vec![
            BytesFrame::BulkString(Bytes::from_static(b"10.0.0.5")),
            BytesFrame::BulkString(Bytes::from_static(b"6380")),
        ]);
        assert_eq!(
            parse_addr(&reply).map(|a| a.to_string()),
            Some("10.0.0.5:6380".into())
        );
        assert_eq!(parse_addr(&BytesFrame::Null), None);
        let moved = switched(b"mymaster 10.0.0.5 6380 10.0.0.6 6381", "mymaster");
        assert_eq!(moved.map(|a| a.to_string()), Some("10.0.0.6:6381".into()));
        assert_eq!(switched(b"other 1.1.1.1 1 2.2.2.2 2", "mymaster"), None);
        assert_eq!(switched(b"mymaster garbage", "mymaster"), None);
    }
}
