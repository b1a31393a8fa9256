//! The Redis schema: every channel, key and payload ringway reads or writes, and the
//! Lua library it loads. This is a public contract (documented in the README): services
//! in any language publish with one Redis command.
//!
//! | name | kind | contents |
//! |---|---|---|
//! | `ringway:topic:<topic>` | channel | topic messages: `{"id":"<optional>","epoch":"<with history>","data":<JSON>}` |
//! | `ringway:history:<topic>` | stream | the topic's history: entries `d` = data; the entry id is the message id |
//! | `ringway:epoch:<topic>` | string | the history's epoch; a new one whenever the stream was lost |
//! | `ringway:inbox:<user>` | stream | the user's unacknowledged direct messages: entries `d` = data; the entry id is the message id |
//! | `ringway:shard:<node>/<shard>` | channel | direct messages for users on that shard: `{"users":["U",…],"id":"…","data":<JSON>}` |
//! | `ringway:user:<user>` | sorted set | presence: member `<node>/<shard>/<shard>-<conn>@<boot>` per open connection, written at connect and removed at close; live while its node's heartbeat names that boot |
//! | `ringway:nodes` | sorted set | live nodes: member node id, score = expiry (ms) |
//! | `ringway:node:<node>` | string | the node's heartbeat: JSON about it (shards, listen address, version, `boot` = this process), expires 5 s after the last beat |
//! | `ringway:incarnations` | sorted set | node processes: member `<node>@<boot>`, score = expiry (ms); dead ones are reaped |
//! | `ringway:conns:<node>@<boot>` | hash | a node process's presence entries: field member, value user (for reaping) |
//! | `ringway:reaped:<node>@<boot>` | string | set when a reaper removed entries of that process (kept a day): if it was only late, its heartbeats find this until it has registered its connections again and deleted it |
//! | `ringway:late:<node>@<boot>` | string | set for 5 s when that process's heartbeat came after its key expired: it reaps nobody meanwhile |
//!
//! Functions, loaded twice from one text (`library`): as `ringway_v<LIBRARY_VERSION>`
//! (`ringway_v3_send`, …), which this release's gateways call and each loads with
//! `FUNCTION LOAD REPLACE`, and as `ringway`, the names below for services, replaced
//! only when the loaded one is older (`ringway_version`):
//! - `FCALL ringway_send <n> ringway:user:<U1> … <id or ""> <data JSON>`: looks every
//!   user up and publishes once per shard that holds any of them; returns
//!   `[users online, shards published to, id, 0, connections]` (connections of nodes
//!   whose heartbeat key `ringway:node:<node>` exists). With `2n` keys (the user keys, then
//!   `ringway:inbox:<U>` for each) and `"" <data> <inbox size> <inbox ttl ms>`, it also
//!   appends the message to each user's inbox under one id; the fourth element is then 1.
//! - `FCALL ringway_ack 1 ringway:inbox:<U> <id>`: removes the user's messages up to id.
//! - `FCALL ringway_publish 3 ringway:topic:<T> ringway:history:<T> ringway:epoch:<T> ""
//!   <data JSON> <history size> <history ttl ms>`: appends the message to the topic's
//!   stream (trimmed to the size and age) and publishes it with the stream id as its id
//!   and the topic's epoch; returns `[id, receivers, epoch]`. With 1 key (the channel)
//!   it only publishes, with a Redis-time id when none is given: such a message is not
//!   in history.
//! - `FCALL_RO ringway_history 2 ringway:history:<T> ringway:epoch:<T> <start> <count>`:
//!   the epoch, the last id given out, the highest id trimmed away and up to `count`
//!   entries from `start` (`-`, or `(<id>` for after an id).
//! - `ringway_presence_set`, `ringway_presence_del`, `ringway_node_alive` (the
//!   heartbeat, which also reaps), `ringway_node_gone`: used by the gateway itself.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use serde_json::value::RawValue;

pub const TOPIC_PREFIX: &str = "ringway:topic:";
const HISTORY_PREFIX: &str = "ringway:history:";
const EPOCH_PREFIX: &str = "ringway:epoch:";

/// Redis Cluster mode (`redis+cluster://`), set once at startup: every key but a
/// topic's lives under `{ringway}:` instead of `ringway:`, so the user directory, the
/// inboxes, the node registry and the shards' channels share one slot and every
/// function call stays in it (never a CROSSSLOT error); a topic's channel, stream and
/// epoch carry the topic as their hash tag (`ringway:topic:{<topic>}`), so a topic's
/// three keys share a slot and topics spread over the masters; and messages go by
/// sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`).
static CLUSTER: AtomicBool = AtomicBool::new(false);

/// Switches the schema to Redis Cluster's (see `CLUSTER`); before any key is named.
pub fn set_cluster(on: bool) {
    CLUSTER.store(on, Ordering::Relaxed);
}

/// Whether the schema is Redis Cluster's.
pub fn cluster() -> bool {
    CLUSTER.load(Ordering::Relaxed)
}

/// The namespace of every key but a topic's.
fn ns() -> &'static str {
    if cluster() {
        "{ringway}:"
    } else {
        "ringway:"
    }
}

/// A topic's key: `<prefix><topic>`, or `<prefix>{<topic>}` in a cluster.
fn topic_key(prefix: &str, topic: &str) -> String {
    if cluster() {
        format!("{prefix}{{{topic}}}")
    } else {
        format!("{prefix}{topic}")
    }
}

/// The topic of a topic channel, `None` for any other channel.
pub fn channel_topic(channel: &str) -> Option<&str> {
    let rest = channel.strip_prefix(TOPIC_PREFIX)?;
    if cluster() {
        rest.strip_prefix('{')?.strip_suffix('}')
    } else {
        Some(rest)
    }
}

/// The slot every key but a topic's is in, in a cluster.
pub fn home_slot() -> u16 {
    super::cluster::slot(b"{ringway}")
}

pub fn nodes_key() -> String {
    format!("{}nodes", ns())
}

pub fn incarnations_key() -> String {
    format!("{}incarnations", ns())
}

/// A node's heartbeat key.
pub fn node_key(node: &str) -> String {
    format!("{}node:{node}", ns())
}

/// The Lua library's text (Redis ≥ 7.0 functions), as the public library `ringway`.
const LIBRARY: &str = include_str!("ringway.lua");

/// The version of the functions' contract (their keys, arguments and replies); the
/// library's own `VERSION`. The gateway calls the functions of `ringway_v<VERSION>`,
/// so nodes of two versions can share a Redis while a cluster is upgraded node by node.
pub const LIBRARY_VERSION: i64 = 3;

/// The name of a function of this version's library (`ringway_v3_send`, …).
macro_rules! gateway_fn {
    ($name:literal) => {
        concat!("ringway_v3_", $name)
    };
}
pub const FN_SEND: &str = gateway_fn!("send");
pub const FN_ACK: &str = gateway_fn!("ack");
pub const FN_PUBLISH: &str = gateway_fn!("publish");
pub const FN_HISTORY: &str = gateway_fn!("history");
pub const FN_PRESENCE_SET: &str = gateway_fn!("presence_set");
pub const FN_PRESENCE_DEL: &str = gateway_fn!("presence_del");
pub const FN_NODE_ALIVE: &str = gateway_fn!("node_alive");
pub const FN_NODE_GONE: &str = gateway_fn!("node_gone");
/// The public library's version, as services see it (`FCALL ringway_version 0`).
pub const FN_PUBLIC_VERSION: &str = "ringway_version";

/// The library text: the public `ringway` (the names services call), or this
/// version's `ringway_v<VERSION>` (the names the gateway calls).
///
/// In a cluster (`set_cluster`) its keys are under `{ringway}:` and it publishes with
/// `SPUBLISH`.
pub fn library(public: bool) -> String {
    let text = if cluster() {
        LIBRARY
            .replacen("local NS = 'ringway:'", "local NS = '{ringway}:'", 1)
            .replacen("local SHARDED = false", "local SHARDED = true", 1)
    } else {
        LIBRARY.to_owned()
    };
    if public {
        return text;
    }
    let v = LIBRARY_VERSION;
    text.replacen(
        "#!lua name=ringway\n",
        &format!("#!lua name=ringway_v{v}\n"),
        1,
    )
    .replacen(
        "local PREFIX = 'ringway_'",
        &format!("local PREFIX = 'ringway_v{v}_'"),
        1,
    )
}

pub fn topic_channel(topic: &str) -> String {
    topic_key(TOPIC_PREFIX, topic)
}

pub fn history_key(topic: &str) -> String {
    topic_key(HISTORY_PREFIX, topic)
}

pub fn epoch_key(topic: &str) -> String {
    topic_key(EPOCH_PREFIX, topic)
}

pub fn inbox_key(user: &str) -> String {
    format!("{}inbox:{user}", ns())
}

pub fn shard_channel(node: &str, shard: usize) -> String {
    format!("{}shard:{node}/{shard}", ns())
}

pub fn user_key(user: &str) -> String {
    format!("{}user:{user}", ns())
}

/// A presence member: where one connection of a user is, and in which process of the
/// node (`boot`).
pub fn presence_member(node: &str, shard: usize, conn: u64, boot: &str) -> String {
    format!("{node}/{shard}/{shard}-{conn}@{boot}")
}

/// A node process: `<node>@<boot>`.
pub fn incarnation(node: &str, boot: &str) -> String {
    format!("{node}@{boot}")
}

/// The mark a reaper leaves on a process whose entries it removed.
pub fn reaped_key(incarnation: &str) -> String {
    format!("{}reaped:{incarnation}", ns())
}

/// The index of a node process's presence entries.
pub fn conns_key(node: &str, boot: &str) -> String {
    format!("{}conns:{node}@{boot}", ns())
}

/// The payload of a topic message on its channel. `id` is set by ringway; a service may
/// leave it out, and then each receiving node assigns its own. `epoch` comes with
/// messages kept in history (their id is then the stream id).
#[derive(Deserialize)]
pub struct TopicEnvelope<'a> {
    #[serde(borrow, default)]
    pub id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub epoch: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// The payload of a direct message on a shard's channel.
#[derive(Deserialize)]
pub struct DirectEnvelope<'a> {
    #[serde(borrow)]
    pub users: Vec<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    pub id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

/// Builds a topic envelope. `id` is a ringway message id (digits and a dash).
pub fn topic_envelope(id: &str, data: &RawValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.get().len() + id.len() + 20);
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"data\":");
    out.extend_from_slice(data.get().as_bytes());
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let data = RawValue::from_string("{\"a\":[1,2]}".into()).unwrap();
        let env = topic_envelope("17-3", &data);
        let back: TopicEnvelope<'_> = serde_json::from_slice(&env).unwrap();
        assert_eq!(back.id.as_deref(), Some("17-3"));
        assert_eq!(back.data.get(), "{\"a\":[1,2]}");
        let direct: DirectEnvelope<'_> =
            serde_json::from_str(r#"{"users":["u\/1","v"],"id":"1-2","data":null}"#).unwrap();
        assert_eq!(direct.users, vec!["u/1", "v"]);
        // Lua's cjson writes `/` as `\/`: ids with escapes are read too.
        let t: TopicEnvelope<'_> = serde_json::from_str(r#"{"id":"order\/42","data":1}"#).unwrap();
        assert_eq!(t.id.as_deref(), Some("order/42"));
    }

    #[test]
    fn the_versioned_library_is_the_public_one_renamed() {
        let v = LIBRARY_VERSION;
        assert!(LIBRARY.contains(&format!("\nlocal VERSION = {v}\n")));
        let versioned = library(false);
        assert!(versioned.starts_with(&format!("#!lua name=ringway_v{v}\n")));
        assert!(versioned.contains(&format!("local PREFIX = 'ringway_v{v}_'")));
        assert!(library(true).starts_with("#!lua name=ringway\n"));
        let prefix = format!("ringway_v{v}_");
        for f in [
            FN_SEND,
            FN_ACK,
            FN_PUBLISH,
            FN_HISTORY,
            FN_PRESENCE_SET,
            FN_PRESENCE_DEL,
            FN_NODE_ALIVE,
            FN_NODE_GONE,
        ] {
            let name = f.strip_prefix(&prefix).expect("this version's prefix");
            // Every name the gateway calls is registered by the library.
            assert!(
                LIBRARY.contains(&format!("PREFIX .. '{name}'")),
                "{name} is not registered"
            );
        }
        // Every registration goes through PREFIX.
        assert!(!LIBRARY.contains("register_function('ringway_"));
    }

    #[test]
    fn names() {
        assert_eq!(topic_channel("news"), "ringway:topic:news");
        assert_eq!(shard_channel("n1", 2), "ringway:shard:n1/2");
        assert_eq!(presence_member("n1", 2, 9, "k3x"), "n1/2/2-9@k3x");
        assert_eq!(conns_key("n1", "k3x"), "ringway:conns:n1@k3x");
        assert_eq!(
            reaped_key(&incarnation("n1", "k3x")),
            "ringway:reaped:n1@k3x"
        );
    }
}
