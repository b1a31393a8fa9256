//! The in-process broker (single node, no Redis): a topic message published on any
//! shard (or through the admin API) reaches subscribers on every shard of this node. The
//! message is framed once, on the publishing thread; every shard receives the same
//! `Bytes` through its inbox (the publishing shard's own included, so its message
//! queues behind what other threads sent before it) and writes it to each local
//! subscriber. Direct messages go only to the shards that hold the user (`Directory`).
//!
//! Each shard gets every message, even one with no local subscriber: with one shard
//! per core that is a handful of inbox sends per message. A node-wide interest map is
//! the option not taken until many-core nodes show it matters.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::protocol::{self, MessageId};
use crate::shard::{unacked, Inbox, Node};

/// A publish or send that no shard took.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// A shard it had to reach was full.
    #[error("gateway overloaded: shard {shard}'s inbox is full; nothing was delivered; retry")]
    Overloaded { shard: usize },
    /// A shard it had to reach has stopped: the node is shutting down.
    #[error("shard {shard} has stopped (the node is shutting down); nothing was delivered")]
    Stopped { shard: usize },
}

impl Refused {
    /// Counts a refusal the caller gives up on (`ringway_inbox_full_total`): once per
    /// refused message, not once per retry.
    pub fn count(&self, node: &Node) {
        if let Self::Overloaded { shard } = self {
            node.shards[*shard].metrics.inbox_full.inc();
        }
    }
}

/// Holds inbox room in every shard of `targets`, or in none of them.
fn reserve_all(node: &Node, targets: &[usize]) -> Result<(), Refused> {
    for (n, &i) in targets.iter().enumerate() {
        if !node.shards[i].reserve() {
            release_all(node, &targets[..n]);
            return Err(Refused::Overloaded { shard: i });
        }
    }
    Ok(())
}

fn release_all(node: &Node, targets: &[usize]) {
    for &i in targets {
        node.shards[i].release();
    }
}

/// Reserves room in every shard of `targets`, then, holding the node's order, takes a
/// message id and sends each shard the message `make` builds from it. So every shard
/// receives messages in id order, and a subscriber never sees ids go backwards: not
/// between two publishers, nor between the admin API and a client on the same shard
/// (a shard's own clients go through its inbox too, behind what came before). A
/// stopped shard refuses the whole message before any shard gets it.
fn send_in_order(
    node: &Node,
    targets: &[usize],
    mut make: impl FnMut(usize, MessageId, &str) -> Inbox,
) -> Result<(MessageId, String), Refused> {
    reserve_all(node, targets)?;
    let mut order = node.order();
    if let Some(&shard) = targets
        .iter()
        .find(|&&i| node.shards[i].tx.is_disconnected())
    {
        release_all(node, targets);
        return Err(Refused::Stopped { shard });
    }
    let key = node.next_id();
    *order = Some(key);
    let id = key.to_string();
    for &i in targets {
        if node.shards[i].tx.send(make(i, key, &id)).is_err() {
            // Stopped since the check above (only while the node shuts down).
            node.shards[i].release();
        }
    }
    node.published.inc();
    Ok((key, id))
}

/// Publishes `data` on `topic` to every shard of the node (the caller's own included),
/// or to none; returns the message id.
pub fn publish(node: &Node, topic: &str, data: &RawValue) -> Result<String, Refused> {
    let all: Vec<usize> = (0..node.shards.len()).collect();
    let shared_topic: Arc<str> = Arc::from(topic);
    let mut frame = None;
    let (_, id) = send_in_order(node, &all, |_, key, id| Inbox::Publish {
        topic: shared_topic.clone(),
        id: key,
        frame: frame
            .get_or_insert_with(|| protocol::message(topic, id, Some(&node.epoch), data))
            .clone(),
    })?;
    Ok(id)
}

/// What a direct send found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub id: String,
    /// Users with at least one connection.
    pub online: usize,
    /// Shards the message went to.
    pub shards: usize,
    /// Connections the message went to, where this node can know (single node).
    pub connections: Option<usize>,
    /// Kept for each user until acknowledged (`direct_inbox_size`), so a user's next
    /// connection gets it if this one does not.
    pub stored: bool,
}

/// Sends `data` to every connection of `users` on this node, through the inboxes of
/// the shards that hold them only (single-node mode; with a backplane the Redis
/// function `ringway_send` does the same across nodes), and keeps it for each user
/// until acknowledged (`shard::unacked`).
pub fn send(node: &Node, users: &[String], data: &RawValue) -> Result<Sent, Refused> {
    let bounds = unacked::Bounds::of(&node.config());
    // Held from the lookup to the store: a connection that joins the directory after
    // the lookup finds the message waiting (see `shard::unacked`).
    let mut held = node.unacked.hold();
    let mut routes: Vec<Vec<Arc<str>>> = vec![Vec::new(); node.shards.len()];
    let (mut online, mut connections) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    let mut named = Vec::new();
    for user in users {
        if !seen.insert(user.as_str()) {
            continue;
        }
        let shards = node.directory.shards_of(user);
        if !shards.is_empty() {
            online += 1;
        }
        let user: Arc<str> = Arc::from(user.as_str());
        for (s, n) in shards {
            routes[s].push(user.clone());
            connections += n as usize;
        }
        named.push(user);
    }
    let targets: Vec<usize> = (0..routes.len())
        .filter(|i| !routes[*i].is_empty())
        .collect();
    let data: Arc<RawValue> = Arc::from(data.to_owned());
    let mut shared_id: Option<Arc<str>> = None;
    let (key, id) = send_in_order(node, &targets, |i, key, id| Inbox::Direct {
        users: std::mem::take(&mut routes[i]),
        key,
        id: shared_id.get_or_insert_with(|| Arc::from(id)).clone(),
        data: data.clone(),
    })?;
    let stored = !bounds.off();
    if stored {
        let msg = unacked::Stored::new(
            key,
            shared_id.unwrap_or_else(|| Arc::from(id.as_str())),
            data,
        );
        for user in &named {
            held.store(user, &msg, bounds);
        }
    }
    Ok(Sent {
        id,
        online,
        shards: targets.len(),
        connections: Some(connections),
        stored,
    })
}
