//! Presence in Redis as one shard keeps it: a user's connection has an entry in the
//! user's sorted set from when it opens to when it closes, and nothing at rest.
//!
//! - Connects and disconnects since the command connection's last write go out as one
//!   `ringway_presence_set` / `ringway_presence_del` call per `PRESENCE_BATCH`.
//! - An entry is never refreshed: shard 0's heartbeat, every second, keeps every entry
//!   of this node process live, and also reaps a batch of the entries a dead process
//!   left behind (`ringway_reap`).
//! - A reconnect to the Redis it last spoke to (the same `run_id`, so nothing was lost
//!   but what was in flight) sends only what changed while it was away and what was
//!   written but never answered (`Pending`). A reconnect to another Redis (a restart, a
//!   failover) registers every entry again, since it may hold none. Removals made while
//!   Redis was away are kept either way, so entries that outlived a partition are
//!   deleted at the reconnect. Were a reconnect to register everything, a Redis too
//!   slow to answer in time would get every node's whole presence again at each
//!   timeout, which keeps it too slow: a reconnect storm.

use std::rc::Rc;
use std::time::Duration;

use super::{schema, Backplane, Reply};
use crate::shard::Shard;

/// How long a node counts as alive after its last heartbeat (sent every second): a
/// killed node's users count as offline, and are not routed to, within this.
const NODE_TTL: Duration = Duration::from_secs(5);
/// Presence entries per function call: each costs Redis three commands, so a call holds
/// Redis for well under a millisecond and sends queued behind it barely notice.
const PRESENCE_BATCH: usize = 128;
/// Entries of a dead node process reaped per second by each node.
const REAP_BATCH: usize = 1000;
/// Presence removals kept while Redis is away. Beyond it the surplus entries stay in
/// Redis, counted as live, until this process stops (then the reaper removes every
/// entry it left); a warning says so.
const MAX_PENDING_REMOVALS: usize = 100_000;
/// Registrations kept while Redis is away. Beyond it they are dropped, and the
/// reconnect registers every connection instead.
const MAX_PENDING_ADDITIONS: usize = 100_000;

/// A connection of a user: (user, connection number).
pub type Entry = (Rc<str>, u64);

/// Connects and disconnects not yet written, or written and not answered.
#[derive(Default)]
pub struct Pending {
    opened: Vec<Entry>,
    closed: Vec<Entry>,
    /// The bound was hit (warned once per outage).
    overflowed: bool,
    /// Registrations were dropped (or never recorded): the next connection registers
    /// every connection.
    register_all: bool,
}

impl Pending {
    pub fn opened(&mut self, user: &Rc<str>, conn: u64) {
        if self.register_all {
            return;
        }
        if self.opened.len() >= MAX_PENDING_ADDITIONS {
            self.opened = Vec::new();
            self.register_all = true;
            return;
        }
        self.opened.push((user.clone(), conn));
    }

    /// Calls written and not answered (the connection was lost): Redis may or may not
    /// have run them, and running them again is harmless, so they go out again.
    pub fn unanswered(&mut self, set: bool, entries: Vec<Entry>) {
        if set {
            for (user, conn) in entries {
                self.opened(&user, conn);
            }
        } else {
            for (user, conn) in entries {
                self.closed(&user, conn);
            }
        }
    }

    /// Kept up to `MAX_PENDING_REMOVALS`; false once that is full.
    pub fn closed(&mut self, user: &Rc<str>, conn: u64) -> bool {
        if self.closed.len() >= MAX_PENDING_REMOVALS {
            if !self.overflowed {
                self.overflowed = true;
                tracing::warn!(
                    kept = MAX_PENDING_REMOVALS,
                    "too many connections closed while redis was away: the presence entries of the rest stay until this process stops"
                );
            }
            return false;
        }
        self.closed.push((user.clone(), conn));
        true
    }

    /// Redis may hold none of this shard's entries (another server, the first
    /// connection, or a heartbeat that lapsed): every connection is registered at the
    /// next write, which covers the registrations kept.
    pub fn all_again(&mut self) {
        self.opened = Vec::new();
        self.register_all = true;
    }

    /// Whether every connection must be registered (true once per `all_again`).
    fn needs_all(&mut self) -> bool {
        std::mem::take(&mut self.register_all)
    }

    /// Nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty() && self.closed.is_empty() && !self.register_all
    }

    fn take(&mut self) -> (Vec<Entry>, Vec<Entry>) {
        self.overflowed = false;
        (
            std::mem::take(&mut self.opened),
            std::mem::take(&mut self.closed),
        )
    }
}

/// Registers every identified connection of the shard, in calls of `PRESENCE_BATCH`.
fn register_all(shard: &Shard, bp: &Backplane) {
    let entries = shard.identified_conns();
    for chunk in entries.chunks(PRESENCE_BATCH) {
        presence_call(shard, bp, true, chunk);
    }
}

/// On shard 0: keeps the node's registry entry, and so every presence entry of this
/// process, alive; and reaps a batch of entries left by a node process that died.
pub fn heartbeat(shard: &Shard, bp: &Backplane) {
    if shard.index != 0 {
        return;
    }
    let ttl_ms = NODE_TTL.as_millis().to_string();
    let (node, node_key, incarnation) = registry(shard);
    let info = serde_json::json!({
        "node": node,
        "shards": shard.node.shards.len(),
        "listen": shard.node.listen.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
        "boot": shard.node.epoch,
    })
    .to_string();
    let args: [&[u8]; 10] = [
        b"FCALL",
        schema::FN_NODE_ALIVE.as_bytes(),
        b"3",
        schema::NODES_KEY.as_bytes(),
        node_key.as_bytes(),
        schema::INCARNATIONS_KEY.as_bytes(),
        ttl_ms.as_bytes(),
        node.as_bytes(),
        info.as_bytes(),
        incarnation.as_bytes(),
    ];
    bp.command(&args, Reply::Heartbeat);
    let batch = REAP_BATCH.to_string();
    let args: [&[u8]; 5] = [
        b"FCALL",
        schema::FN_REAP.as_bytes(),
        b"1",
        schema::INCARNATIONS_KEY.as_bytes(),
        batch.as_bytes(),
    ];
    bp.command(&args, Reply::Ignore(schema::FN_REAP));
}

/// The node's id, its heartbeat key and this process's `<node>@<boot>`.
fn registry(shard: &Shard) -> (&str, String, String) {
    let node = shard.node.id.as_str();
    let key = format!("{}{node}", schema::NODE_PREFIX);
    (node, key, schema::incarnation(node, &shard.node.epoch))
}

/// On shard 0, when the node drains: the node leaves the registry, and its process is
/// handed to the reaper for whatever entries its shards could not remove.
pub fn node_gone(shard: &Shard, bp: &Backplane) {
    if shard.index != 0 {
        return;
    }
    let (node, node_key, incarnation) = registry(shard);
    let args: [&[u8]; 8] = [
        b"FCALL",
        schema::FN_NODE_GONE.as_bytes(),
        b"3",
        schema::NODES_KEY.as_bytes(),
        node_key.as_bytes(),
        schema::INCARNATIONS_KEY.as_bytes(),
        node.as_bytes(),
        incarnation.as_bytes(),
    ];
    bp.command(&args, Reply::Ignore(schema::FN_NODE_GONE));
}

/// Connects and disconnects since the last write, one call each per `PRESENCE_BATCH`
/// (or every connection, when registrations were dropped).
pub fn queue_changes(shard: &Shard, bp: &Backplane) {
    // Not while stopping: the node has left the registry, and entries written now
    // might outlive it.
    if bp.presence.borrow_mut().needs_all() && !bp.stopping.get() {
        register_all(shard, bp);
    }
    let (added, removed) = bp.presence.borrow_mut().take();
    for chunk in added.chunks(PRESENCE_BATCH) {
        presence_call(shard, bp, true, chunk);
    }
    for chunk in removed.chunks(PRESENCE_BATCH) {
        presence_call(shard, bp, false, chunk);
    }
}

/// The function that adds (`set`) or removes presence entries.
pub fn function(set: bool) -> &'static str {
    if set {
        schema::FN_PRESENCE_SET
    } else {
        schema::FN_PRESENCE_DEL
    }
}

/// `FCALL <function> n+1 user-keys… index-key members…`: `ringway_presence_set` when
/// `set`, else `ringway_presence_del`.
fn presence_call(shard: &Shard, bp: &Backplane, set: bool, entries: &[Entry]) {
    let function = function(set);
    let boot = &shard.node.epoch;
    let mut keys: Vec<String> = entries.iter().map(|(u, _)| schema::user_key(u)).collect();
    keys.push(schema::conns_key(&shard.node.id, boot));
    let members: Vec<String> = entries
        .iter()
        .map(|(_, conn)| schema::presence_member(&shard.node.id, shard.index, *conn, boot))
        .collect();
    let count = keys.len().to_string();
    let mut args: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + members.len());
    args.extend([b"FCALL".as_slice(), function.as_bytes(), count.as_bytes()]);
    args.extend(keys.iter().map(|k| k.as_bytes()));
    args.extend(members.iter().map(|m| m.as_bytes()));
    bp.command(
        &args,
        Reply::Presence {
            set,
            entries: entries.to_vec(),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_kept_up_to_a_bound() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        for i in 0..MAX_PENDING_REMOVALS as u64 {
            assert!(p.closed(&u, i));
        }
        assert!(!p.closed(&u, 0));
        let (opened, closed) = p.take();
        assert!(opened.is_empty() && closed.len() == MAX_PENDING_REMOVALS);
        assert!(p.closed(&u, 0));
    }

    #[test]
    fn registrations_are_kept_until_everything_is_registered_again() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        p.opened(&u, 1);
        p.unanswered(true, vec![(u.clone(), 2)]);
        p.unanswered(false, vec![(u.clone(), 3)]);
        assert!(!p.needs_all());
        assert_eq!(
            p.take(),
            (vec![(u.clone(), 1), (u.clone(), 2)], vec![(u.clone(), 3)])
        );

        p.opened(&u, 4);
        p.closed(&u, 5);
        p.all_again(); // another redis may hold nothing
        p.opened(&u, 6);
        assert!(p.needs_all());
        assert_eq!(
            p.take(),
            (vec![], vec![(u.clone(), 5)]),
            "removals are kept"
        );
    }

    #[test]
    fn too_many_registrations_become_one_registration_of_everything() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        for i in 0..=MAX_PENDING_ADDITIONS as u64 {
            p.opened(&u, i);
        }
        p.opened(&u, 0);
        assert!(p.take().0.is_empty());
        assert!(p.needs_all());
        assert!(!p.needs_all(), "asked once");
        p.opened(&u, 1);
        assert_eq!(p.take().0, vec![(u.clone(), 1)]);
    }
}
