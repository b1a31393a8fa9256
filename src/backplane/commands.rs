//! The command connection of one shard: one pipelined Redis connection for publishes,
//! presence and the node registry, and for requests forwarded by the admin API.
//!
//! Every write carries everything queued since the last one; replies come back in
//! order and are matched to their handlers (`Reply`). Presence is never one command
//! per connection: connects and disconnects since the last write go out as one
//! `ringway_presence_set` / `ringway_presence_del` call per `PRESENCE_BATCH`, and an
//! entry is never refreshed: shard 0's heartbeat, every second, is what keeps all of
//! this process's entries live, and it also reaps a batch of entries left behind by a
//! node process that died. After a (re)connect every entry is registered again (Redis
//! may have restarted empty).

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_protocol::resp2::types::BytesFrame;

use super::keep::{keep_connected, Role};
use super::link::{self, Link, LinkError};
use super::schema;
use super::{Backplane, Command, LinkState, Reply, REPLY_TIMEOUT};

/// How long a node counts as alive after its last heartbeat (sent every second): a
/// killed node's users count as offline, and are not routed to, within this.
const NODE_TTL: Duration = Duration::from_secs(5);

/// Presence entries per function call: each costs Redis three commands, so a call holds
/// Redis for well under a millisecond and sends queued behind it barely notice.
const PRESENCE_BATCH: usize = 128;
/// Entries of a dead node process reaped per second by each node.
const REAP_BATCH: usize = 1000;
use crate::shard::Shard;

/// Runs for the life of the shard, or until `Backplane::finish` has been served.
pub async fn run(shard: Rc<Shard>) {
    let Some(bp) = shard.backplane() else {
        return;
    };
    let shard = &*shard;
    keep_connected(shard, bp, Role::Commands, |link| async move {
        let mut in_flight = VecDeque::new();
        let end = serve(shard, bp, link, &mut in_flight).await;
        // Down before the failures are handed out, so nothing they trigger is queued
        // for a connection that is gone.
        bp.set_link(Role::Commands, LinkState::Down);
        fail_all(bp, &mut in_flight);
        shard.finish_reads();
        end
    })
    .await;
    bp.finished.set(true);
}

/// Fails every command written or queued: their callers learn now, not never.
fn fail_all(bp: &Backplane, in_flight: &mut VecDeque<(Instant, Reply)>) {
    let queued: Vec<Command> = bp.queue.borrow_mut().drain(..).collect();
    bp.queued_bytes.set(0);
    let written = in_flight.drain(..).map(|(_, r)| r);
    for reply in written.chain(queued.into_iter().map(|c| c.reply)) {
        bp.complete(reply, Err("redis connection lost".into()));
    }
    bp.in_flight.set(0);
}

/// Serves one connection. `Ok` once the shard is stopping and everything is answered.
async fn serve(
    shard: &Shard,
    bp: &Backplane,
    mut link: Link,
    in_flight: &mut VecDeque<(Instant, Reply)>,
) -> Result<(), LinkError> {
    // On every (re)connect: load the functions first, then register everything anew.
    bp.queue.borrow_mut().push_front(Command {
        bytes: {
            let mut b = BytesMut::new();
            link::encode(
                &mut b,
                &[b"FUNCTION", b"LOAD", b"REPLACE", schema::LIBRARY.as_bytes()],
            );
            b.freeze()
        },
        reply: Reply::Ignore("FUNCTION LOAD (needs Redis >= 7.0)"),
    });
    // Stream reads that waited for this connection.
    bp.start_reads();
    // The registration below covers connections added while Redis was away; removals
    // are kept so entries of connections that closed meanwhile are deleted.
    bp.presence_added.borrow_mut().clear();
    let mut next_heartbeat = Instant::now();
    let mut tick: usize = 0;
    let mut deregistered = false;
    loop {
        if let Some(to) = bp.moved_from(&link.addr) {
            return Err(LinkError::MasterMoved(to));
        }
        let now = Instant::now();
        if now >= next_heartbeat && !bp.stopping.get() {
            if tick == 0 {
                // Just (re)connected: Redis may have restarted empty. Otherwise entries
                // are written once, at connect: nothing is refreshed.
                register_all(shard, bp);
            }
            // The node's heartbeat, every second: it is what keeps every entry of this
            // process live (`NODE_TTL`).
            node_alive(shard, bp);
            if tick.is_multiple_of(10) {
                shard
                    .metrics
                    .presence_entries
                    .set(shard.identified_count() as u64);
            }
            tick += 1;
            next_heartbeat = now + Duration::from_secs(1);
        }
        queue_presence_changes(shard, bp);
        bp.queue_inbox_reads();
        if bp.stopping.get() && !deregistered {
            deregistered = true;
            if shard.index == 0 {
                let node = &shard.node.id;
                let node_key = format!("{}{node}", schema::NODE_PREFIX);
                let incarnation = schema::incarnation(node, &shard.node.epoch);
                let args: [&[u8]; 8] = [
                    b"FCALL",
                    b"ringway_node_gone",
                    b"3",
                    schema::NODES_KEY.as_bytes(),
                    node_key.as_bytes(),
                    schema::INCARNATIONS_KEY.as_bytes(),
                    node.as_bytes(),
                    incarnation.as_bytes(),
                ];
                bp.command(&args, Reply::Ignore("ringway_node_gone"));
            }
        }
        let batch: Vec<Command> = bp.queue.borrow_mut().drain(..).collect();
        bp.queued_bytes.set(0);
        if !batch.is_empty() {
            let mut out = BytesMut::with_capacity(batch.iter().map(|c| c.bytes.len()).sum());
            let sent = Instant::now();
            for c in batch {
                out.extend_from_slice(&c.bytes);
                in_flight.push_back((sent, c.reply));
                shard.metrics.redis_commands.inc();
            }
            bp.in_flight.set(in_flight.len());
            link.write(out.freeze()).await?;
        }
        while let Some(frame) = link.next_buffered()? {
            let Some((_, reply)) = in_flight.pop_front() else {
                return Err(LinkError::Protocol("reply without a command".into()));
            };
            // A master that was turned into a replica (a failover it did not see
            // coming) answers writes with READONLY: find the master again.
            let demoted = match &frame {
                BytesFrame::Error(e) if e.starts_with("READONLY") => Some(e.to_string()),
                _ => None,
            };
            bp.complete(reply, Ok(frame));
            if let Some(message) = demoted {
                return Err(LinkError::Refused {
                    what: "a write",
                    message,
                });
            }
        }
        shard.finish_reads();
        // Redis that stops answering (hung, or gone without a reset) breaks the link, so
        // callers hear `unavailable` instead of waiting on a dead connection.
        let oldest = in_flight.front().map(|(t, _)| *t);
        if oldest.is_some_and(|t| t.elapsed() > REPLY_TIMEOUT) {
            return Err(LinkError::NoAnswer(REPLY_TIMEOUT));
        }
        bp.in_flight.set(in_flight.len());
        if deregistered && in_flight.is_empty() && bp.queue.borrow().is_empty() {
            return Ok(());
        }
        if !bp.queue.borrow().is_empty() {
            continue;
        }
        let mut sleep = next_heartbeat.saturating_duration_since(Instant::now());
        if deregistered {
            sleep = Duration::from_millis(50);
        }
        if let Some(t) = oldest {
            let left = REPLY_TIMEOUT.saturating_sub(t.elapsed());
            sleep = sleep.min(left + Duration::from_millis(1));
        }
        let readable = monoio::select! {
            r = link.readable() => Some(r),
            _ = bp.cmd_wake.woken() => None,
            _ = monoio::time::sleep(sleep) => None,
        };
        if let Some(r) = readable {
            r?;
            link.fill()?;
        }
    }
}

/// Registers every identified connection of the shard, in calls of `PRESENCE_BATCH`.
fn register_all(shard: &Shard, bp: &Backplane) {
    let entries = shard.identified_conns(0, usize::MAX);
    for chunk in entries.chunks(PRESENCE_BATCH) {
        presence_call(shard, bp, "ringway_presence_set", chunk);
    }
}

/// On shard 0: keeps the node's registry entry, and so every presence entry of this
/// process, alive; and reaps a batch of entries left by a node process that died.
fn node_alive(shard: &Shard, bp: &Backplane) {
    if shard.index != 0 {
        return;
    }
    let ttl_ms = NODE_TTL.as_millis().to_string();
    let node = &shard.node.id;
    let node_key = format!("{}{node}", schema::NODE_PREFIX);
    let incarnation = schema::incarnation(node, &shard.node.epoch);
    let info = serde_json::json!({
        "node": node,
        "shards": shard.node.shards.len(),
        "listen": shard.node.listen.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "boot": shard.node.epoch,
    })
    .to_string();
    let args: [&[u8]; 10] = [
        b"FCALL",
        b"ringway_node_alive",
        b"3",
        schema::NODES_KEY.as_bytes(),
        node_key.as_bytes(),
        schema::INCARNATIONS_KEY.as_bytes(),
        ttl_ms.as_bytes(),
        node.as_bytes(),
        info.as_bytes(),
        incarnation.as_bytes(),
    ];
    bp.command(&args, Reply::Ignore("ringway_node_alive"));
    let batch = REAP_BATCH.to_string();
    let args: [&[u8]; 5] = [
        b"FCALL",
        b"ringway_reap",
        b"1",
        schema::INCARNATIONS_KEY.as_bytes(),
        batch.as_bytes(),
    ];
    bp.command(&args, Reply::Ignore("ringway_reap"));
}

/// Connects and disconnects since the last write, one call each per `BATCH`.
fn queue_presence_changes(shard: &Shard, bp: &Backplane) {
    let added = std::mem::take(&mut *bp.presence_added.borrow_mut());
    let removed = std::mem::take(&mut *bp.presence_removed.borrow_mut());
    for chunk in added.chunks(PRESENCE_BATCH) {
        presence_call(shard, bp, "ringway_presence_set", chunk);
    }
    for chunk in removed.chunks(PRESENCE_BATCH) {
        presence_call(shard, bp, "ringway_presence_del", chunk);
    }
}

/// `FCALL <function> n+1 user-keys… index-key members…`
fn presence_call(
    shard: &Shard,
    bp: &Backplane,
    function: &'static str,
    entries: &[(Rc<str>, u64)],
) {
    let boot = &shard.node.epoch;
    let mut keys: Vec<String> = entries.iter().map(|(u, _)| schema::user_key(u)).collect();
    keys.push(schema::conns_key(&shard.node.id, boot));
    let members: Vec<String> = entries
        .iter()
        .map(|(_, conn)| schema::presence_member(&shard.node.id, shard.index, *conn, boot))
        .collect();
    let count = keys.len().to_string();
    let mut args: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + members.len());
    args.extend([b"FCALL".as_slice(), function.as_bytes(), count.as_bytes()]);
    args.extend(keys.iter().map(|k| k.as_bytes()));
    args.extend(members.iter().map(|m| m.as_bytes()));
    bp.command(&args, Reply::Ignore(function));
}
