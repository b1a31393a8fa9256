//! The in-process broker: a topic message published on any shard (or through the admin
//! API) reaches subscribers on every shard of this node. The message is framed once, on
//! the publishing thread; every shard receives the same `Bytes` through its inbox and
//! writes it to each local subscriber.
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
