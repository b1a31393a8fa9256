//! The subscriber connection of one shard: keeps Redis subscribed to exactly the topics
//! this shard owns that the node's connections want (plus the shard's direct channel),
//! delivers what Redis sends, and hands it to the sibling shards that want it (`relay`).
//!
//! Changes are batched: subscribes and unsubscribes made since the last write leave
//! together, as one SUBSCRIBE and one UNSUBSCRIBE of up to `BATCH` channels each. After
//! a reconnect the whole set is subscribed again from the topic table.
//!
//! In a Redis Cluster the link holds one connection per master (`masters`) and uses
//! sharded pub/sub: each topic is SSUBSCRIBEd on the master serving its slot (one
//! command per slot). A master that gives a slot away unsubscribes its channels; the
//! link then reconnects, reading the topology again, and what was published meanwhile
//! is read from the topics' streams as after any reconnect.

use std::rc::Rc;

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use redis_protocol::resp2::types::BytesFrame;

use super::cluster;
use super::keep::{keep_connected, Role};
use super::link::{self, LinkError};
use super::masters::{Masters, Route};
use super::schema::{self, DirectEnvelope, TopicEnvelope};
use super::{Backplane, LinkState, BATCH, PING_EVERY, REPLY_TIMEOUT};
use crate::protocol::{self, MessageId};
use crate::shard::Shard;

/// Runs for the life of the shard.
pub async fn run(shard: Rc<Shard>) {
    let Some(bp) = shard.backplane() else {
        return;
    };
    let shard = &*shard;
    keep_connected(shard, bp, Role::Subscriber, |link| async move {
        Err(serve(shard, bp, link).await)
    })
    .await;
}

/// Serves one connection until it fails.
async fn serve(shard: &Shard, bp: &Backplane, mut link: Masters) -> LinkError {
    // Everything this shard wants, from scratch: the topics it owns that its own
    // connections or its siblings want. Replies waiting for topics nobody holds any
    // more (their clients left during the outage) are dropped, not kept for a
    // confirmation that will never come.
    let local: Vec<Rc<str>> = shard
        .topic_names()
        .into_iter()
        .filter(|t| bp.mine(t))
        .collect();
    let mut topics = local.clone();
    topics.extend(
        bp.owned
            .borrow()
            .topics()
            .filter(|t| !shard.has_subscribers(t))
            .cloned(),
    );
    bp.subs.borrow_mut().restart(&topics, |topic, a| {
        a.conn.strong_count() > 0 && shard.has_subscribers(topic)
    });
    // What was published while the connection was away is read from the streams once
    // each topic is confirmed (`replay`); the siblings were told (`Lost`) and read for
    // themselves.
    bp.replays
        .borrow_mut()
        .reconnected(&local, shard.history_on(), |t| bp.mine(t));
    let mut out = vec![command(
        &[subscribe_command(true), bp.direct_channel.as_bytes()],
        Route::Slot(cluster::slot(bp.direct_channel.as_bytes())),
    )];
    out.extend(channel_commands(true, &topics));
    // Redis answers in order: each master's PONG says every SUBSCRIBE above is in place.
    out.push(command(&[b"PING"], Route::All));
    if let Err(e) = link.send(out).await {
        return e;
    }
    link.keep_alive(PING_EVERY, REPLY_TIMEOUT);
    // Which masters have answered the PING after the restoring SUBSCRIBEs.
    let mut ponged = vec![false; link.count()];
    loop {
        if let Some(to) = bp.moved_from(link.addr()) {
            return LinkError::MasterMoved(to);
        }
        let (subscribe, unsubscribe) = bp
            .subs
            .borrow_mut()
            .take_changes(|t| shard.has_subscribers(t) || bp.owned.borrow().wanted(t));
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            note_changes(shard, bp, &subscribe, &unsubscribe);
            let mut out = channel_commands(true, &subscribe);
            out.extend(channel_commands(false, &unsubscribe));
            if let Err(e) = link.send(out).await {
                return e;
            }
        }
        let mut handled = 0;
        loop {
            match link.next_push() {
                Ok(Some((from, frame))) => match on_frame(shard, bp, frame) {
                    Err(e) => return e,
                    Ok(Pushed::Pong) if bp.sub_link.get() == LinkState::Syncing => {
                        ponged[from] = true;
                        if ponged.iter().all(|p| *p) {
                            bp.set_link(Role::Subscriber, LinkState::Up);
                        }
                    }
                    Ok(_) => {}
                },
                Ok(None) => break,
                Err(e) => return e,
            }
            handled += 1;
        }
        if handled > 0 {
            // Let connection tasks write what the deliveries queued.
            crate::shard::yield_now().await;
        }
        let wait = match link.check_alive().await {
            Ok(wait) => wait,
            Err(e) => return e,
        };
        if let Err(e) = link.fill_within(wait, bp.sub_wake.woken()).await {
            return e;
        }
    }
}

/// Topics the shard subscribes to anew for its own connections get their position
/// read (`replay`); those it leaves are forgotten.
pub(super) fn note_changes(
    shard: &Shard,
    bp: &Backplane,
    subscribe: &[Rc<str>],
    unsubscribe: &[Rc<str>],
) {
    let mut replays = bp.replays.borrow_mut();
    for t in unsubscribe {
        replays.unsubscribed(t);
    }
    if shard.history_on() {
        for t in subscribe.iter().filter(|t| shard.has_subscribers(t)) {
            replays.subscribed(t);
        }
    }
}

/// SUBSCRIBE or UNSUBSCRIBE; their sharded forms in a cluster.
fn subscribe_command(on: bool) -> &'static [u8] {
    match (on, schema::cluster()) {
        (true, false) => b"SUBSCRIBE",
        (false, false) => b"UNSUBSCRIBE",
        (true, true) => b"SSUBSCRIBE",
        (false, true) => b"SUNSUBSCRIBE",
    }
}

/// One command, encoded, with its route.
fn command(args: &[&[u8]], route: Route) -> (Bytes, Route) {
    let mut out = BytesMut::new();
    link::encode(&mut out, args);
    (out.freeze(), route)
}

/// (Un)subscribes `topics`, up to `BATCH` channels a command; in a cluster, one
/// command per slot, sent to the master serving it.
fn channel_commands(on: bool, topics: &[Rc<str>]) -> Vec<(Bytes, Route)> {
    let name = subscribe_command(on);
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for t in topics {
        let channel = schema::topic_channel(t);
        let slot = if schema::cluster() {
            cluster::slot(channel.as_bytes())
        } else {
            0
        };
        by_slot.entry(slot).or_default().push(channel);
    }
    let mut out = Vec::new();
    for (slot, channels) in by_slot {
        for chunk in channels.chunks(BATCH) {
            let mut args: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
            args.push(name);
            args.extend(chunk.iter().map(|c| c.as_bytes()));
            out.push(command(&args, Route::Slot(slot)));
        }
    }
    out
}

/// What a push from Redis was, as far as the connection's loop cares.
enum Pushed {
    Pong,
    Other,
}

/// Handles one push from Redis; an error reply breaks the connection (the reconnect
/// starts from a clean state).
fn on_frame(shard: &Shard, bp: &Backplane, frame: BytesFrame) -> Result<Pushed, LinkError> {
    let parts = match frame {
        BytesFrame::Array(parts) => parts,
        // A connection with no subscription (a master serving none of this shard's
        // channels) answers PING as any connection does.
        BytesFrame::SimpleString(s) if &s[..] == b"PONG" => return Ok(Pushed::Pong),
        BytesFrame::Error(e) => {
            return Err(LinkError::Refused {
                what: "SUBSCRIBE",
                message: e.to_string(),
            })
        }
        _ => return Ok(Pushed::Other),
    };
    if matches!(parts.first(), Some(BytesFrame::BulkString(k)) if &k[..] == b"pong") {
        return Ok(Pushed::Pong);
    }
    let [BytesFrame::BulkString(kind), BytesFrame::BulkString(channel), third] = parts.as_slice()
    else {
        return Ok(Pushed::Other);
    };
    match (&kind[..], third) {
        (b"message" | b"smessage", BytesFrame::BulkString(payload)) => {
            dispatch(shard, bp, channel, payload)
        }
        (b"subscribe" | b"ssubscribe", _) if channel == bp.direct_channel.as_bytes() => {
            // Direct messages published while the channel was not subscribed wait in
            // the users' inboxes: read them now that nothing more can slip past.
            shard.reread_inboxes();
        }
        (b"subscribe" | b"ssubscribe", _) => {
            if let Some(topic) = std::str::from_utf8(channel)
                .ok()
                .and_then(schema::channel_topic)
            {
                bp.confirm(topic);
            }
        }
        // A master gave the slot of a channel this link still holds away (resharding
        // or a failover): read the topology again. Answers to this link's own
        // SUNSUBSCRIBEs find their topic no longer confirmed.
        (b"sunsubscribe", _) => {
            let channel = String::from_utf8_lossy(channel);
            let held = channel == bp.direct_channel
                || schema::channel_topic(&channel)
                    .is_some_and(|t| bp.subs.borrow().is_confirmed(t));
            if held {
                return Err(LinkError::SlotsMoved(format!(
                    "{channel} was unsubscribed by its master"
                )));
            }
        }
        _ => {}
    }
    Ok(Pushed::Other)
}

/// Delivers one message from Redis to this shard's connections.
fn dispatch(shard: &Shard, bp: &Backplane, channel: &[u8], payload: &[u8]) {
    let m = &shard.metrics;
    if channel == bp.direct_channel.as_bytes() {
        m.direct_received.inc();
        match serde_json::from_slice::<DirectEnvelope<'_>>(payload) {
            Ok(env) => {
                let id = env
                    .id
                    .unwrap_or_else(|| shard.node.next_message_id().into());
                for user in &env.users {
                    shard.deliver_direct_live(user, &id, env.data);
                }
            }
            Err(e) => bp.bad_message(m, "direct", &e),
        }
        return;
    }
    let Some(topic) = std::str::from_utf8(channel)
        .ok()
        .and_then(schema::channel_topic)
    else {
        return;
    };
    m.backplane_received.inc();
    match serde_json::from_slice::<TopicEnvelope<'_>>(payload) {
        Ok(env) => {
            let id = env
                .id
                .unwrap_or_else(|| shard.node.next_message_id().into());
            let epoch = env.epoch.as_deref();
            let frame = protocol::message(topic, &id, epoch, env.data);
            // A message in history has a stream id; anything else cannot be placed in
            // the topic's order.
            let pos = epoch.and_then(|e| id.parse::<MessageId>().ok().map(|i| (i, e)));
            bp.relay(topic, pos, &frame);
            bp.deliver_live(shard, topic, pos, &frame);
        }
        Err(e) => bp.bad_message(m, topic, &e),
    }
}
