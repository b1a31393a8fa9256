//! The admin API's calls to Redis, made from the admin thread through a shard whose
//! command connection is up: a publish (`PUBLISH`), a direct send (`FCALL ringway_send`)
//! and the live-node list. The RESP commands and replies stay in this module; callers
//! see ids, counts and typed errors.

use std::time::Duration;

use bytes::Bytes;
use redis_protocol::resp2::types::BytesFrame;
use serde_json::value::RawValue;

use super::{replay, schema};
use crate::broker::Sent;
use crate::protocol::{MessageId, NotRecovered};
use crate::shard::{HistoryPage, Inbox, Node, Unsent};

/// How long an API request waits for Redis.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call through Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Redis cannot be reached, or did not answer in time: retry.
    #[error("{0}")]
    Unavailable(String),
    /// Redis answered something the schema does not allow.
    #[error("unexpected reply from {0}")]
    BadReply(&'static str),
    /// The shard that would carry the call has a full inbox: nothing was sent; retry.
    #[error("gateway overloaded: shard {0}'s inbox is full; nothing was sent; retry")]
    Overloaded(usize),
}

/// Sends a command through a shard whose command connection is up and waits for the
/// reply.
async fn call(node: &Node, args: Vec<Bytes>) -> Result<BytesFrame, RemoteError> {
    let shard = node
        .shard_with_redis()
        .ok_or_else(|| RemoteError::Unavailable("redis unavailable".into()))?;
    let link = &node.shards[shard];
    let rx = link
        .ask(|reply| Inbox::Redis { args, reply })
        .map_err(|e| match e {
            Unsent::Full => {
                link.metrics.inbox_full.inc();
                RemoteError::Overloaded(shard)
            }
            Unsent::Stopped => RemoteError::Unavailable("shard stopped".into()),
        })?;
    match monoio::time::timeout(TIMEOUT, rx.recv_async()).await {
        Ok(Ok(reply)) => reply.map_err(RemoteError::Unavailable),
        Ok(Err(_)) => Err(RemoteError::Unavailable("shard stopped".into())),
        Err(_) => Err(RemoteError::Unavailable(
            "redis did not answer in time".into(),
        )),
    }
}

/// Publishes a topic message to every node; returns its id: the stream id when the
/// message is kept in history (`history` on), else `id`.
pub async fn publish(
    node: &Node,
    topic: &str,
    id: &str,
    data: &RawValue,
    history: crate::shard::history::Bounds,
) -> Result<String, RemoteError> {
    let sent_id = if history.off() { id } else { "" };
    let args = super::publish_args(topic, sent_id, data, history);
    let reply = call(node, args).await?;
    super::published_id(&reply, sent_id).ok_or(RemoteError::BadReply("ringway_publish"))
}

/// Up to `limit` messages of `topic` after `since` (from the first kept without),
/// oldest first, from the topic's stream. `epoch`, when given, must be the stream's.
pub async fn history(
    node: &Node,
    topic: &str,
    since: Option<MessageId>,
    epoch: Option<&str>,
    limit: usize,
) -> Result<Result<HistoryPage, NotRecovered>, RemoteError> {
    let count = limit.saturating_add(1);
    let req = replay::Request {
        after: since,
        count,
        serial: 0,
    };
    let args = replay::request_args(topic, &req);
    let reply = call(node, args).await?;
    let page = replay::parse_page(&reply, count).map_err(RemoteError::Unavailable)?;
    Ok(
        replay::page_since(topic, &page, since, epoch).map(|(epoch, frames)| HistoryPage {
            epoch,
            frames,
            more: page.cut,
        }),
    )
}

/// Sends a direct message to every connection of `users`, wherever they are: one
/// function call that looks them up, publishes once per shard holding any, and with
/// `inbox` on keeps the message in each user's inbox until acknowledged (the inbox
/// then gives the id; `id` is used otherwise).
pub async fn send(
    node: &Node,
    users: &[String],
    id: String,
    data: &RawValue,
    inbox: crate::shard::unacked::Bounds,
) -> Result<Sent, RemoteError> {
    let keys = if !inbox.off() {
        2 * users.len()
    } else {
        users.len()
    };
    let mut args = Vec::with_capacity(keys + 7);
    args.push(Bytes::from_static(b"FCALL"));
    args.push(Bytes::from_static(schema::FN_SEND.as_bytes()));
    args.push(Bytes::from(keys.to_string()));
    args.extend(users.iter().map(|u| Bytes::from(schema::user_key(u))));
    if !inbox.off() {
        args.extend(users.iter().map(|u| Bytes::from(schema::inbox_key(u))));
        args.push(Bytes::new());
    } else {
        args.push(Bytes::from(id.clone()));
    }
    args.push(Bytes::copy_from_slice(data.get().as_bytes()));
    if !inbox.off() {
        args.push(Bytes::from(inbox.size.to_string()));
        args.push(Bytes::from(inbox.ttl.as_millis().to_string()));
    }
    match call(node, args).await? {
        BytesFrame::Array(parts) => match parts.as_slice() {
            [BytesFrame::Integer(online), BytesFrame::Integer(shards), BytesFrame::BulkString(given), rest @ ..] => {
                Ok(Sent {
                    id: String::from_utf8_lossy(given).into_owned(),
                    online: *online as usize,
                    shards: *shards as usize,
                    connections: match rest.get(1) {
                        Some(BytesFrame::Integer(n)) => Some(*n as usize),
                        _ => None,
                    },
                    stored: matches!(rest.first(), Some(BytesFrame::Integer(1))),
                })
            }
            _ => Err(RemoteError::BadReply("ringway_send")),
        },
        _ => Err(RemoteError::BadReply("ringway_send")),
    }
}

/// The cluster's live nodes (by the registry in Redis, read with this host's clock).
pub async fn live_nodes(node: &Node) -> Result<Vec<String>, RemoteError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let args = vec![
        Bytes::from_static(b"ZRANGE"),
        Bytes::from(schema::nodes_key()),
        Bytes::from(format!("({now_ms}")),
        Bytes::from_static(b"+inf"),
        Bytes::from_static(b"BYSCORE"),
    ];
    match call(node, args).await? {
        BytesFrame::Array(parts) => Ok(parts
            .iter()
            .filter_map(|p| match p {
                BytesFrame::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
                _ => None,
            })
            .collect()),
        _ => Err(RemoteError::BadReply("ZRANGE")),
    }
}
