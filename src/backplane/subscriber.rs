//! The subscriber connection of one shard: keeps Redis subscribed to exactly the topics
//! this shard owns that the node's connections want (plus the shard's direct channel),
//! delivers what Redis sends, and hands it to the sibling shards that want it (`relay`).
//!
//! Changes are batched: subscribes and unsubscribes made since the last write leave
//! together, as one SUBSCRIBE and one UNSUBSCRIBE of up to `BATCH` channels each. After
//! a reconnect the whole set is subscribed again from the topic table.

use std::rc::Rc;

use bytes::BytesMut;
use redis_protocol::resp2::types::BytesFrame;

use super::keep::{keep_connected, Role};
use super::link::{self, Keepalive, Link, LinkError};
use super::schema::{self, DirectEnvelope, TopicEnvelope, TOPIC_PREFIX};
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
async fn serve(shard: &Shard, bp: &Backplane, mut link: Link) -> LinkError {
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
    let mut out = BytesMut::new();
    link::encode(&mut out, &[b"SUBSCRIBE", bp.direct_channel.as_bytes()]);
    encode_channels(&mut out, b"SUBSCRIBE", &topics);
    // Redis answers in order: its PONG says every SUBSCRIBE above is in place.
    link::encode(&mut out, &[b"PING"]);
    if let Err(e) = link.write(out.freeze()).await {
        return e;
    }
    let mut keepalive = Keepalive::new(PING_EVERY, REPLY_TIMEOUT, true);
    loop {
        if let Some(to) = bp.moved_from(&link.addr) {
            return LinkError::MasterMoved(to);
        }
        let (subscribe, unsubscribe) = bp
            .subs
            .borrow_mut()
            .take_changes(|t| shard.has_subscribers(t) || bp.owned.borrow().wanted(t));
        if !subscribe.is_empty() || !unsubscribe.is_empty() {
            note_changes(shard, bp, &subscribe, &unsubscribe);
            let mut out = BytesMut::new();
            encode_channels(&mut out, b"SUBSCRIBE", &subscribe);
            encode_channels(&mut out, b"UNSUBSCRIBE", &unsubscribe);
            if let Err(e) = link.write(out.freeze()).await {
                return e;
            }
        }
        let mut handled = 0;
        loop {
            match link.next_buffered() {
                Ok(Some(frame)) => match on_frame(shard, bp, frame) {
                    Err(e) => return e,
                    Ok(Pushed::Pong) if bp.sub_link.get() == LinkState::Syncing => {
                        bp.set_link(Role::Subscriber, LinkState::Up);
                    }
                    Ok(_) => {}
                },
                Ok(None) => break,
                Err(e) => return e,
            }
            handled += 1;
        }
        if handled > 0 {
            keepalive.heard();
            // Let connection tasks write what the deliveries queued.
            crate::shard::yield_now().await;
        }
        let wait = match keepalive.check(&mut link).await {
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

fn encode_channels(out: &mut BytesMut, command: &[u8], topics: &[Rc<str>]) {
    for chunk in topics.chunks(BATCH) {
        let channels: Vec<String> = chunk.iter().map(|t| schema::topic_channel(t)).collect();
        let mut args: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
        args.push(command);
        args.extend(channels.iter().map(|c| c.as_bytes()));
        link::encode(out, &args);
    }
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
        (b"message", BytesFrame::BulkString(payload)) => dispatch(shard, bp, channel, payload),
        (b"subscribe", _) if channel == bp.direct_channel.as_bytes() => {
            // Direct messages published while the channel was not subscribed wait in
            // the users' inboxes: read them now that nothing more can slip past.
            shard.reread_inboxes();
        }
        (b"subscribe", _) => {
            if let Some(topic) = std::str::from_utf8(channel)
                .ok()
                .and_then(|c| c.strip_prefix(TOPIC_PREFIX))
            {
                bp.confirm(topic);
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
        .and_then(|c| c.strip_prefix(TOPIC_PREFIX))
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
