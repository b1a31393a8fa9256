//! Presence in Redis as one shard keeps it: a user's connection has an entry in the
//! user's sorted set from when it opens to when it closes, and nothing at rest.
//!
//! - Connects and disconnects not yet written go out as one `ringway_presence_set` /
//!   `ringway_presence_del` call per `PRESENCE_BATCH`, a few calls unanswered at a time
//!   (`PRESENCE_IN_FLIGHT`), so the heartbeat never queues behind thousands in Redis.
//! - An entry is never refreshed: shard 0's heartbeat, every second, keeps every entry
//!   of this node process live, and in the same call reaps a batch of the entries a
//!   dead process left behind (`ringway_node_alive`).
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

use indexmap::IndexMap;

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
/// Presence calls written and not yet answered, per shard. The heartbeat shares the
/// command connection, so it never waits behind more than these: were a shard to write
/// every registration at once (a reconnect, a node registering all of its users
/// again), its heartbeat would wait behind all of them in Redis, lapse, and make the
/// node look dead to the others.
const PRESENCE_IN_FLIGHT: usize = 4;

/// A connection of a user: (user, connection number).
pub type Entry = (Rc<str>, u64);

/// Connects and disconnects not yet written, or written and not answered.
///
/// A connection is never in both: a close cancels a registration that was never
/// written, so connections that open and close while Redis is away (or faster than it
/// answers) cost Redis nothing. Registrations are bounded by the shard's identified
/// connections, removals by `MAX_PENDING_REMOVALS`.
#[derive(Default)]
pub struct Pending {
    /// Registrations to write, by connection number: the user, and whether Redis may
    /// hold the entry already (it was written once, or is part of registering
    /// everything again), in which case a close must still remove it.
    opened: IndexMap<u64, (Rc<str>, bool)>,
    /// Removals to write, by connection number.
    closed: IndexMap<u64, Rc<str>>,
    /// The bound was hit (warned once per outage).
    overflowed: bool,
    /// Every connection is to be registered (`all_again`): the next write takes them.
    register_all: bool,
}

impl Pending {
    pub fn opened(&mut self, user: &Rc<str>, conn: u64) {
        if !self.register_all {
            self.opened.insert(conn, (user.clone(), false));
        }
    }

    /// Calls written and not answered (the connection was lost, or Redis refused):
    /// Redis may or may not have run them, and running them again is harmless, so they
    /// go out again.
    pub fn unanswered(&mut self, set: bool, entries: Vec<Entry>) {
        for (user, conn) in entries {
            if !set {
                self.closed(&user, conn);
            } else if !self.closed.contains_key(&conn) {
                self.opened.insert(conn, (user, true));
            }
        }
    }

    /// Kept up to `MAX_PENDING_REMOVALS`; false once that is full.
    pub fn closed(&mut self, user: &Rc<str>, conn: u64) -> bool {
        if let Some((_, false)) = self.opened.swap_remove(&conn) {
            return true; // never written: Redis has nothing to remove
        }
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
        self.closed.insert(conn, user.clone());
        true
    }

    /// Redis may hold none of this shard's entries (another server, the first
    /// connection, or a heartbeat that lapsed): every connection is registered from
    /// the next write on.
    pub fn all_again(&mut self) {
        self.register_all = true;
    }

    /// Whether every connection must be registered (true once per `all_again`).
    fn needs_all(&mut self) -> bool {
        std::mem::take(&mut self.register_all)
    }

    /// Every identified connection of the shard, to be registered.
    fn register(&mut self, entries: Vec<Entry>) {
        for (user, conn) in entries {
            self.opened.insert(conn, (user, true));
        }
    }

    /// Nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty() && self.closed.is_empty() && !self.register_all
    }

    /// Whether connection `conn`'s registration is still to be written.
    pub fn registering(&self, conn: u64) -> bool {
        self.opened.contains_key(&conn)
    }

    /// The next call: up to `PRESENCE_BATCH` removals, or else registrations of
    /// connections that are still open (`open`); `(set, entries)`.
    fn next_call(&mut self, open: impl Fn(&str, u64) -> bool) -> Option<(bool, Vec<Entry>)> {
        if !self.closed.is_empty() {
            let n = self.closed.len().min(PRESENCE_BATCH);
            let entries = self.closed.drain(self.closed.len() - n..);
            let entries = entries.map(|(conn, user)| (user, conn)).collect();
            self.overflowed = false;
            return Some((false, entries));
        }
        let mut entries = Vec::new();
        while entries.len() < PRESENCE_BATCH {
            let Some((conn, (user, _))) = self.opened.pop() else {
                break;
            };
            if open(&user, conn) {
                entries.push((user, conn));
            }
        }
        (!entries.is_empty()).then_some((true, entries))
    }
}

/// On shard 0: keeps the node's registry entry, and so every presence entry of this
/// process, alive; and reaps a batch of entries left by a node process whose heartbeat
/// stopped over `NODE_TTL` ago, unless this node's own beat was late within
/// `NODE_TTL` (then Redis, or this host, is the slow one: see `ringway.lua`).
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
    let batch = REAP_BATCH.to_string();
    let (nodes, incarnations) = (schema::nodes_key(), schema::incarnations_key());
    let args: [&[u8]; 11] = [
        b"FCALL",
        schema::FN_NODE_ALIVE.as_bytes(),
        b"3",
        nodes.as_bytes(),
        node_key.as_bytes(),
        incarnations.as_bytes(),
        ttl_ms.as_bytes(),
        node.as_bytes(),
        info.as_bytes(),
        incarnation.as_bytes(),
        batch.as_bytes(),
    ];
    bp.command(&args, Reply::Heartbeat);
}

/// The node's id, its heartbeat key and this process's `<node>@<boot>`.
fn registry(shard: &Shard) -> (&str, String, String) {
    let node = shard.node.id.as_str();
    let key = schema::node_key(node);
    (node, key, schema::incarnation(node, &shard.node.epoch))
}

/// On shard 0, when the node drains: the node leaves the registry, and its process is
/// handed to the reaper for whatever entries its shards could not remove.
pub fn node_gone(shard: &Shard, bp: &Backplane) {
    if shard.index != 0 {
        return;
    }
    let (node, node_key, incarnation) = registry(shard);
    let (nodes, incarnations) = (schema::nodes_key(), schema::incarnations_key());
    let args: [&[u8]; 8] = [
        b"FCALL",
        schema::FN_NODE_GONE.as_bytes(),
        b"3",
        nodes.as_bytes(),
        node_key.as_bytes(),
        incarnations.as_bytes(),
        node.as_bytes(),
        incarnation.as_bytes(),
    ];
    bp.command(&args, Reply::Ignore(schema::FN_NODE_GONE));
}

/// Connects and disconnects since the last write (or every connection, when Redis may
/// hold none), one call per `PRESENCE_BATCH`, with at most `PRESENCE_IN_FLIGHT` calls
/// unanswered.
pub fn queue_changes(shard: &Shard, bp: &Backplane) {
    // Not while stopping: the node has left the registry, and entries written now
    // might outlive it.
    if bp.presence.borrow_mut().needs_all() && !bp.stopping.get() {
        bp.presence.borrow_mut().register(shard.identified_conns());
    }
    while bp.presence_in_flight.get() < PRESENCE_IN_FLIGHT {
        let call = bp
            .presence
            .borrow_mut()
            .next_call(|user, conn| shard.holds(user, conn));
        let Some((set, entries)) = call else {
            break;
        };
        presence_call(shard, bp, set, entries);
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
fn presence_call(shard: &Shard, bp: &Backplane, set: bool, entries: Vec<Entry>) {
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
    bp.presence_in_flight.set(bp.presence_in_flight.get() + 1);
    bp.command(&args, Reply::Presence { set, entries });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<Entry>) -> Vec<Entry> {
        v.sort_by_key(|e| e.1);
        v
    }

    /// Every call `next_call` gives, with every connection open.
    fn calls(p: &mut Pending) -> Vec<(bool, Vec<Entry>)> {
        std::iter::from_fn(|| p.next_call(|_, _| true))
            .map(|(set, e)| (set, sorted(e)))
            .collect()
    }

    #[test]
    fn removals_are_kept_up_to_a_bound() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        for i in 0..MAX_PENDING_REMOVALS as u64 {
            assert!(p.closed(&u, i));
        }
        assert!(!p.closed(&u, MAX_PENDING_REMOVALS as u64));
        let calls = calls(&mut p);
        assert_eq!(calls.len(), MAX_PENDING_REMOVALS.div_ceil(PRESENCE_BATCH));
        assert!(calls.iter().all(|(set, _)| !set));
        assert!(p.closed(&u, 0));
    }

    #[test]
    fn a_close_cancels_a_registration_never_written() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        p.opened(&u, 1);
        p.opened(&u, 2);
        p.closed(&u, 1);
        assert_eq!(calls(&mut p), vec![(true, vec![(u.clone(), 2)])]);
        assert!(p.is_empty());
    }

    #[test]
    fn a_registration_redis_may_hold_is_removed_at_close() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        // Written, then lost with the connection: Redis may have run it.
        p.unanswered(true, vec![(u.clone(), 1), (u.clone(), 2)]);
        p.closed(&u, 1);
        assert!(!p.registering(1) && p.registering(2));
        assert_eq!(
            calls(&mut p),
            vec![(false, vec![(u.clone(), 1)]), (true, vec![(u.clone(), 2)])]
        );
        // A registration lost after its removal was queued is not written again.
        p.closed(&u, 3);
        p.unanswered(true, vec![(u.clone(), 3)]);
        assert_eq!(calls(&mut p), vec![(false, vec![(u.clone(), 3)])]);
    }

    #[test]
    fn registering_everything_takes_only_open_connections_and_keeps_removals() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        p.closed(&u, 5);
        p.all_again(); // another redis may hold nothing
        p.opened(&u, 6); // taken by the registration of everything
        assert!(p.needs_all());
        assert!(!p.needs_all(), "asked once");
        p.register(vec![(u.clone(), 6), (u.clone(), 7), (u.clone(), 8)]);
        let open = |_: &str, conn: u64| conn != 8; // closed since
        let first = p.next_call(open).unwrap();
        assert_eq!(first, (false, vec![(u.clone(), 5)]), "removals first");
        let (set, entries) = p.next_call(open).unwrap();
        assert!(set);
        assert_eq!(sorted(entries), vec![(u.clone(), 6), (u.clone(), 7)]);
        assert!(p.next_call(open).is_none() && p.is_empty());
    }

    #[test]
    fn calls_hold_at_most_a_batch() {
        let mut p = Pending::default();
        let u: Rc<str> = Rc::from("u");
        let n = 2 * PRESENCE_BATCH as u64 + 1;
        for i in 0..n {
            p.opened(&u, i);
        }
        let sizes: Vec<usize> = calls(&mut p).iter().map(|(_, e)| e.len()).collect();
        assert_eq!(sizes, vec![PRESENCE_BATCH, PRESENCE_BATCH, 1]);
    }
}
