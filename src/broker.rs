//! The in-process broker (single node, no Redis): a topic message published on any
//! shard (or through the admin API) reaches subscribers on every shard of this node. The
//! message is framed once, on the publishing thread; every shard receives the same
//! `Bytes` through its inbox and writes it to each local subscriber. Direct messages go
//! only to the shards that hold the user (`Directory`).
//!
//! Each shard gets every message, even one with no local subscriber: with one shard
//! per core that is a handful of inbox sends per message. A node-wide interest map is
//! the option not taken until many-core nodes show it matters.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::protocol;
use crate::shard::{Inbox, Node, Shard};

/// A publish or send that no shard took, because one it had to reach was full.
#[derive(Debug, thiserror::Error)]
#[error("gateway overloaded: shard {shard}'s inbox is full; nothing was delivered; retry")]
pub struct Overloaded {
    pub shard: usize,
}

/// Holds inbox room in every shard of `targets`, or in none of them.
fn reserve_all(node: &Node, targets: &[usize]) -> Result<(), Overloaded> {
    for (n, &i) in targets.iter().enumerate() {
        if !node.shards[i].reserve() {
            for &held in &targets[..n] {
                node.shards[held].release();
            }
            return Err(Overloaded { shard: i });
        }
    }
    Ok(())
}

/// Sends a message whose room `reserve_all` holds; a shard that has stopped gives the
/// room back.
fn send_reserved(node: &Node, shard: usize, msg: Inbox) {
    if node.shards[shard].tx.send(msg).is_err() {
        node.shards[shard].release();
    }
}

/// Publishes `data` on `topic` to every shard or to none; returns the message id.
/// `local` is the calling shard, which delivers directly instead of through its own
/// inbox.
pub fn publish(
    node: &Node,
    local: Option<&Shard>,
    topic: &str,
    data: &RawValue,
) -> Result<String, Overloaded> {
    let others: Vec<usize> = (0..node.shards.len())
        .filter(|i| local.is_none_or(|s| s.index != *i))
        .collect();
    reserve_all(node, &others)?;
    let id = node.next_message_id();
    let frame = protocol::message(topic, &id, data);
    let shared_topic: Arc<str> = Arc::from(topic);
    for i in others {
        let msg = Inbox::Publish {
            topic: shared_topic.clone(),
            frame: frame.clone(),
        };
        send_reserved(node, i, msg);
    }
    if let Some(shard) = local {
        shard.deliver(topic, &frame);
    }
    node.published.inc();
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
}

/// Sends `data` to every connection of `users` on this node, through the inboxes of
/// the shards that hold them only (single-node mode; with a backplane the Redis
/// function `ringway_send` does the same across nodes).
pub fn send(node: &Node, users: &[String], data: &RawValue) -> Result<Sent, Overloaded> {
    let id = node.next_message_id();
    let mut routes: Vec<Vec<Arc<str>>> = vec![Vec::new(); node.shards.len()];
    let mut online = 0;
    let mut seen = std::collections::HashSet::new();
    for user in users {
        if !seen.insert(user.as_str()) {
            continue;
        }
        let shards = node.directory.shards_of(user);
        if !shards.is_empty() {
            online += 1;
        }
        let user: Arc<str> = Arc::from(user.as_str());
        for s in shards {
            routes[s].push(user.clone());
        }
    }
    let targets: Vec<usize> = (0..routes.len())
        .filter(|i| !routes[*i].is_empty())
        .collect();
    reserve_all(node, &targets)?;
    let shared_id: Arc<str> = Arc::from(id.as_str());
    let data: Arc<RawValue> = Arc::from(data.to_owned());
    let shards = targets.len();
    for (i, users) in routes.into_iter().enumerate() {
        if users.is_empty() {
            continue;
        }
        let msg = Inbox::Direct {
            users,
            id: shared_id.clone(),
            data: data.clone(),
        };
        send_reserved(node, i, msg);
    }
    node.published.inc();
    Ok(Sent { id, online, shards })
}
