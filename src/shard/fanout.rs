//! Where traffic goes beyond the shard or thread it enters: the in-process broker of a
//! single node (`Local`) or the Redis backplane (`Redis`). The shard's verbs, the
//! connections and the admin API call these and never ask which one is in use; RESP
//! stays in `backplane/`.

use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::value::RawValue;

use super::node::{HistoryPage, Inbox, Node, Unsent};
use super::outbound::ConnHandle;
use crate::backplane::{self, remote::RemoteError, Backplane};
use crate::broker::{self, Refused, Sent};
use crate::protocol::{MessageId, NotRecovered};

/// One shard's way to the rest of the node, or of the cluster.
pub enum Fanout {
    /// Single node: the other shards are reached through their inboxes, and the node's
    /// directory knows which shards hold a user.
    Local,
    /// A cluster: topics and users go through this shard's Redis connections.
    Redis(Box<Backplane>),
}

impl Fanout {
    /// The backplane, for the tasks that run its Redis connections.
    pub fn backplane(&self) -> Option<&Backplane> {
        match self {
            Self::Local => None,
            Self::Redis(bp) => Some(bp),
        }
    }

    /// A connection of `user` (connection number `conn`) opened on shard `shard`.
    pub fn user_online(&self, node: &Node, shard: usize, user: &Rc<str>, conn: u64) {
        match self {
            Self::Local => node.directory.add(user, shard),
            Self::Redis(bp) => bp.user_online(user, conn),
        }
    }

    /// A connection of `user` closed.
    pub fn user_offline(&self, node: &Node, shard: usize, user: &Rc<str>, conn: u64) {
        match self {
            Self::Local => node.directory.remove(user, shard),
            Self::Redis(bp) => bp.user_offline(user, conn),
        }
    }

    /// A topic gained its first or lost its last subscriber on this shard.
    pub fn topic_changed(&self, topic: Rc<str>) {
        if let Self::Redis(bp) = self {
            bp.topic_changed(topic);
        }
    }

    /// A connection subscribed to `topic`: returns the `subscribed` reply to send now,
    /// or `None` when it goes out later (once Redis has the subscription, so nothing
    /// published after the reply is missed).
    pub fn subscribed(&self, topic: &str, conn: &Rc<ConnHandle>, ack: Bytes) -> Option<Bytes> {
        match self {
            Self::Local => Some(ack),
            Self::Redis(bp) => bp.subscribed(topic, conn, ack),
        }
    }

    /// A connection unsubscribes from `topic`: a `subscribed` reply still waiting goes
    /// out first.
    pub fn unsubscribing(&self, topic: &str, conn: &Rc<ConnHandle>) {
        if let Self::Redis(bp) = self {
            bp.unsubscribing(topic, conn);
        }
    }

    /// A reload changed `outbound_queue_bytes`.
    pub fn set_reply_limit(&self, limit: usize) {
        if let Self::Redis(bp) = self {
            bp.set_reply_limit(limit);
        }
    }
}

/// Why a publish or send from the admin API did not go out.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// A shard's inbox stayed full, or a shard has stopped: nothing was delivered.
    #[error(transparent)]
    Refused(#[from] Refused),
    /// Through Redis: unavailable, or an unexpected reply.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// History cannot give what was asked.
    #[error("{}", history_message(*.0))]
    History(NotRecovered),
}

fn history_message(why: NotRecovered) -> &'static str {
    match why {
        NotRecovered::HistoryOff => "history is off (history_size or history_ttl_secs is 0)",
        NotRecovered::EpochChanged => {
            "that epoch's history is gone (a node or Redis restarted without it)"
        }
        NotRecovered::TooOld => "messages after that offset have already left history",
        NotRecovered::TooLarge => "what was missed is more than the connection's queue may hold",
        NotRecovered::UnknownOffset => "that offset was never given out",
        NotRecovered::Unavailable => "redis could not be asked; retry",
    }
}

/// Up to `limit` messages of `topic` after `since` from one shard's history (every
/// shard of a single node holds the same), oldest first.
pub async fn history(
    node: &Node,
    topic: &str,
    since: Option<MessageId>,
    epoch: Option<&str>,
    limit: usize,
) -> Result<HistoryPage, FanoutError> {
    if node.backplane {
        let cfg = node.config();
        if cfg.history_size == 0 || cfg.history_ttl_secs == 0 {
            return Err(FanoutError::History(NotRecovered::HistoryOff));
        }
        return backplane::remote::history(node, topic, since, epoch, limit)
            .await?
            .map_err(FanoutError::History);
    }
    if epoch.is_some_and(|e| e != &*node.epoch) {
        return Err(FanoutError::History(NotRecovered::EpochChanged));
    }
    if let Some(s) = since {
        if node.last_ordered_id().is_none_or(|last| s > last) {
            return Err(FanoutError::History(NotRecovered::UnknownOffset));
        }
    }
    let shard = node.any_shard();
    let rx = node.shards[shard]
        .ask(|reply| Inbox::History {
            topic: topic.into(),
            since,
            limit,
            reply,
        })
        .map_err(|e| match e {
            Unsent::Full => Refused::Overloaded { shard },
            Unsent::Stopped => Refused::Stopped { shard },
        })?;
    match rx.recv_async().await {
        Ok(page) => page.map_err(FanoutError::History),
        Err(_) => Err(Refused::Stopped { shard }.into()),
    }
}

/// Retries `attempt` while the shards are full, backing off from 100 µs to 5 ms, for up
/// to `publish_wait_ms`: a publisher from the admin API feels the backpressure as a
/// slower answer first, and as `overloaded` only when the shards stay full. Each attempt
/// is all or none, so retrying cannot duplicate. A stopped shard is not retried.
async fn with_room<T>(
    node: &Node,
    mut attempt: impl FnMut() -> Result<T, Refused>,
) -> Result<T, Refused> {
    let deadline = Instant::now() + Duration::from_millis(node.config().publish_wait_ms);
    let mut pause = Duration::from_micros(100);
    let mut waited = false;
    loop {
        match attempt() {
            Err(Refused::Overloaded { .. }) if Instant::now() + pause < deadline => {
                if !std::mem::replace(&mut waited, true) {
                    node.publish_waits.inc();
                }
                monoio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(e) => {
                e.count(node);
                return Err(e);
            }
            ok => return ok,
        }
    }
}

/// Publishes `data` on `topic` from outside the shards (the admin API); returns the id.
pub async fn publish(node: &Node, topic: &str, data: &RawValue) -> Result<String, FanoutError> {
    if !node.backplane {
        return Ok(with_room(node, || broker::publish(node, topic, data)).await?);
    }
    let id = node.next_message_id();
    let history = super::history::Bounds::of(&node.config());
    let id = backplane::remote::publish(node, topic, &id, data, history).await?;
    node.published.inc();
    Ok(id)
}

/// Sends `data` to every connection of `users`, on this node or in the cluster.
pub async fn send(node: &Node, users: &[String], data: &RawValue) -> Result<Sent, FanoutError> {
    if !node.backplane {
        return Ok(with_room(node, || broker::send(node, users, data)).await?);
    }
    let inbox = super::unacked::Bounds::of(&node.config());
    let sent = backplane::remote::send(node, users, node.next_message_id(), data, inbox).await?;
    node.published.inc();
    Ok(sent)
}

/// The live nodes: this one alone without Redis.
pub async fn nodes(node: &Node) -> Result<Vec<String>, FanoutError> {
    if !node.backplane {
        return Ok(vec![node.id.clone()]);
    }
    Ok(backplane::remote::live_nodes(node).await?)
}
