//! The command connection of one shard: one pipelined Redis connection for publishes,
//! presence and the node registry, and for requests forwarded by the admin API.
//!
//! Every write carries everything queued since the last one (`queue`); replies come
//! back in order and are matched to their handlers (`Reply`). Each second it also runs
//! the presence heartbeat, and on every (re)connect it loads the functions and sends
//! presence what it missed (`presence`).

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_protocol::resp2::types::BytesFrame;

use super::keep::{keep_connected, Role};
use super::link::{self, LinkError};
use super::masters::{Masters, Route};
use super::presence;
use super::schema;
use super::{Backplane, LinkState, Reply, REPLY_TIMEOUT};

use crate::shard::Shard;

/// Runs for the life of the shard, or until `Backplane::finish` has been served.
pub async fn run(shard: Rc<Shard>) {
    let Some(bp) = shard.backplane() else {
        return;
    };
    let shard = &*shard;
    keep_connected(shard, bp, Role::Commands, |link| async move {
        let end = serve(shard, bp, link).await;
        // Down before the failures are handed out, so nothing they trigger is queued
        // for a connection that is gone.
        bp.set_link(Role::Commands, LinkState::Down);
        fail_all(bp);
        shard.finish_reads();
        end
    })
    .await;
    bp.finished.set(true);
}

/// Fails every command written or queued: their callers learn now, not never.
/// Presence changes are kept instead, to be written again.
fn fail_all(bp: &Backplane) {
    let replies = bp.queue.borrow_mut().drain_all();
    for reply in replies {
        match reply {
            Reply::Presence { set, entries } => bp.presence.borrow_mut().unanswered(set, entries),
            // The next connection asks again.
            Reply::Server => {}
            reply => bp.complete(reply, Err("redis connection lost".into())),
        }
    }
    bp.presence_in_flight.set(0);
}

/// Serves one connection. `Ok` once the shard is stopping and everything is answered.
async fn serve(shard: &Shard, bp: &Backplane, mut link: Masters) -> Result<(), LinkError> {
    // On every (re)connect: load this version's functions first, then learn which
    // Redis this is (presence waits for that). Shard 0 also makes sure the public
    // library (the names services call) is at least this version's.
    if shard.index == 0 {
        let mut public = BytesMut::new();
        link::encode(
            &mut public,
            &[b"FUNCTION", b"LOAD", schema::library(true).as_bytes()],
        );
        // Every master: a cluster's functions are loaded on each.
        bp.queue
            .borrow_mut()
            .push_front(public.freeze(), Route::All, Reply::PublicLibrary);
    }
    let mut load = BytesMut::new();
    link::encode(
        &mut load,
        &[
            b"FUNCTION",
            b"LOAD",
            b"REPLACE",
            schema::library(false).as_bytes(),
        ],
    );
    bp.queue.borrow_mut().push_front(
        load.freeze(),
        Route::All,
        Reply::Ignore("FUNCTION LOAD (needs Redis >= 7.0)"),
    );
    // Which Redis this is decides what presence sends: only what changed while it was
    // away (the same Redis), or every connection (another). Nothing is sent until then.
    bp.presence_ready.set(false);
    let mut info = BytesMut::new();
    link::encode(&mut info, &[b"INFO", b"server", b"replication"]);
    // The master that holds presence (in a cluster, the one serving its slot).
    bp.queue.borrow_mut().push_front(
        info.freeze(),
        Route::Slot(schema::home_slot()),
        Reply::Server,
    );
    // Stream reads that waited for this connection.
    bp.start_reads();
    let mut next_heartbeat = Instant::now();
    let mut tick: usize = 0;
    let mut deregistered = false;
    loop {
        if let Some(to) = bp.moved_from(link.addr()) {
            return Err(LinkError::MasterMoved(to));
        }
        let now = Instant::now();
        if now >= next_heartbeat && !bp.stopping.get() {
            // The node's heartbeat, every second: it is what keeps every entry of this
            // process live.
            presence::heartbeat(shard, bp);
            if tick.is_multiple_of(10) {
                shard
                    .metrics
                    .presence_entries
                    .set(shard.identified_count() as u64);
            }
            tick += 1;
            next_heartbeat = now + Duration::from_secs(1);
        }
        // A new connection's inbox is read behind its registration, so both wait.
        if bp.presence_ready.get() && bp.presence_retry.get().is_none_or(|t| now >= t) {
            presence::queue_changes(shard, bp);
            bp.queue_inbox_reads();
        }
        if bp.stopping.get() && !deregistered {
            deregistered = true;
            presence::node_gone(shard, bp);
        }
        let batch = bp.queue.borrow_mut().take_for_write(Instant::now());
        if let Some(commands) = batch {
            shard.metrics.redis_commands.add(commands.len() as u64);
            link.write_commands(commands).await?;
        }
        if link.must_flush() {
            link.flush().await?;
        }
        while let Some(frame) = link.next_reply()? {
            let reply = bp.queue.borrow_mut().answered();
            let Some(reply) = reply else {
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
        let oldest = bp.queue.borrow().oldest_unanswered();
        if oldest.is_some_and(|t| t.elapsed() > REPLY_TIMEOUT) {
            return Err(LinkError::NoAnswer(REPLY_TIMEOUT));
        }
        // Done once everything is answered, the last presence removals included.
        if deregistered
            && bp.queue.borrow().is_idle()
            && bp.presence_ready.get()
            && bp.presence.borrow().is_empty()
        {
            return Ok(());
        }
        if bp.queue.borrow().has_waiting() || link.must_flush() {
            continue;
        }
        let mut sleep = next_heartbeat.saturating_duration_since(Instant::now());
        if let Some(retry) = link.next_retry() {
            sleep = sleep.min(retry);
        }
        if deregistered {
            sleep = Duration::from_millis(50);
        }
        if let Some(t) = oldest {
            let left = REPLY_TIMEOUT.saturating_sub(t.elapsed());
            sleep = sleep.min(left + Duration::from_millis(1));
        }
        link.fill_within(sleep, bp.cmd_wake.woken()).await?;
    }
}
