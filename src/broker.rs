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

/// A publish that did not reach every shard.
#[derive(Debug, thiserror::Error)]
#[error("gateway overloaded: {missed} of {total} shards could not take the message; retry")]
pub struct Overloaded {
    pub missed: usize,
    pub total: usize,
}

/// Publishes `data` on `topic`; returns the message id. `local` is the calling shard,
/// which delivers directly instead of through its own inbox.
pub fn publish(
    node: &Node,
    local: Option<&Shard>,
    topic: &str,
    data: &RawValue,
) -> Result<String, Overloaded> {
    let id = node.next_message_id();
    let frame = protocol::message(topic, &id, data);
    let shared_topic: Arc<str> = Arc::from(topic);
    let mut missed = 0;
    for (i, link) in node.shards.iter().enumerate() {
        if local.is_some_and(|s| s.index == i) {
            continue;
        }
        let msg = Inbox::Publish {
            topic: shared_topic.clone(),
            frame: frame.clone(),
        };
        if link.tx.try_send(msg).is_err() {
            link.metrics.inbox_full.inc();
            missed += 1;
        }
    }
    if let Some(shard) = local {
        shard.deliver(topic, &frame);
    }
    node.published.inc();
    if missed > 0 {
        return Err(Overloaded {
            missed,
            total: node.shards.len(),
        });
    }
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
    let shared_id: Arc<str> = Arc::from(id.as_str());
    let data: Arc<RawValue> = Arc::from(data.to_owned());
    let (mut shards, mut missed) = (0, 0);
    for (i, users) in routes.into_iter().enumerate() {
        if users.is_empty() {
            continue;
        }
        shards += 1;
        let link = &node.shards[i];
        let msg = Inbox::Direct {
            users,
            id: shared_id.clone(),
            data: data.clone(),
        };
        if link.tx.try_send(msg).is_err() {
            link.metrics.inbox_full.inc();
            missed += 1;
        }
    }
    node.published.inc();
    if missed > 0 {
        return Err(Overloaded {
            missed,
            total: shards,
        });
    }
    Ok(Sent { id, online, shards })
}
