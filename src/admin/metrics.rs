//! `/metrics`: renders every shard's counters in the Prometheus text format through
//! `prometheus-client`, reading the shards' atomics at scrape time (no locks, no copies
//! kept between scrapes).
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `ringway_connections` | gauge | shard | open WebSocket connections |
//! | `ringway_accepted_total` | counter | shard | TCP connections accepted |
//! | `ringway_accept_errors_total` | counter | shard | failed accepts (usually the file limit) |
//! | `ringway_handshake_failures_total` | counter | shard, reason | upgrades refused or timed out |
//! | `ringway_closes_total` | counter | shard, reason | connections closed, by cause |
//! | `ringway_frames_in_total` / `ringway_frames_out_total` | counter | shard | WebSocket frames |
//! | `ringway_bytes_in_total` / `ringway_bytes_out_total` | counter | shard | socket bytes |
//! | `ringway_deliveries_total` | counter | shard | topic messages given to subscribers (written to the socket, or queued for it) |
//! | `ringway_dropped_total` | counter | shard | deliveries not given (slow consumer under `drop`, or past its limit under `close`, or a connection already closing) |
//! | `ringway_inbox_full_total` | counter | shard | messages refused because this shard's inbox stayed full (once each) |
//! | `ringway_error_frames_total` | counter | shard | protocol error frames sent |
//! | `ringway_ticks_total` | counter | shard | delivery ticks (passes over the connections owed a write) |
//! | `ringway_tick_writes_total` | counter | shard | connections written by ticks; ÷ ticks = connections per tick |
//! | `ringway_handshakes_evicted_total` | counter | shard | unfinished upgrades dropped, oldest first, to stay under `max_pending_handshakes` |
//! | `ringway_rate_limited_total` | counter | shard | client messages refused for going over `client_messages_per_sec` (`rate_limited`) |
//! | `ringway_congestion_waits_total` | counter | shard | inbox messages held back because a quarter of the shard's connections had queues over half full (publishers feel it) |
//! | `ringway_blocked_connections` | gauge | shard | connections whose socket refused bytes still owed (sampled each second) |
//! | `ringway_topics` / `ringway_subscriptions` | gauge | shard | topic table size |
//! | `ringway_history_messages` | gauge | shard | topic messages held for resume and `/v1/history` |
//! | `ringway_resumes_total` | counter | shard, recovered | subscribes with `since`, by outcome |
//! | `ringway_published_total` | counter | — | messages accepted for publishing |
//! | `ringway_direct_unacked` | gauge | — | direct messages kept unacknowledged for their users (single node) |
//! | `ringway_direct_unacked_dropped_total` / `ringway_direct_acked_total` | counter | — | unacknowledged direct messages dropped by a full user inbox / acknowledged |
//! | `ringway_direct_given_again_total` | counter | shard | unacknowledged direct messages given again to a user's new connection |
//! | `ringway_caught_up_total` | counter | shard | frames given to a topic's subscribers from its Redis stream after the shard's subscription came back (notices included) |
//! | `ringway_publish_waits_total` | counter | — | admin API publishes and sends that waited for inbox room (`publish_wait_ms`) |
//! | `ringway_direct_received_total` | counter | shard | direct messages that reached this shard |
//! | `ringway_direct_deliveries_total` | counter | shard | direct messages queued to connections |
//! | `ringway_backplane_received_total` | counter | shard | topic messages received from Redis |
//! | `ringway_relayed_total` | counter | shard | topic messages from Redis handed to sibling shards (the shard owns the topic's subscription on the node) |
//! | `ringway_relays_lost_total` | counter | shard | messages not handed to a sibling whose relays were over `relay_buffer_bytes` (it catches up from the topic's stream) |
//! | `ringway_backplane_malformed_total` | counter | shard | payloads on ringway channels not following the schema |
//! | `ringway_redis_subscriber_up` / `ringway_redis_commands_up` | gauge | shard | 1 while that Redis connection is up (the subscriber: once Redis confirmed the subscriptions it restored) |
//! | `ringway_redis_reconnects_total` | counter | shard | Redis connections lost |
//! | `ringway_redis_commands_total` | counter | shard | commands written to Redis |
//! | `ringway_presence_entries` | gauge | shard | connections with a user id (updated every 10 s) |
//! | `ringway_ready` | gauge | — | 1 when every shard listens, not draining, Redis (if configured) reachable |
//! | `ringway_info` | gauge | node, driver, version | always 1 |

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::metrics::{CloseReason, ShardMetrics};
use crate::shard::Node;
use crate::ws::handshake::Refusal;

/// Reads the node's shards on every scrape.
#[derive(Debug)]
struct NodeCollector(Arc<Node>);

type Labels = Vec<(&'static str, String)>;

/// A per-shard family: name, help, and how to read it from a shard's metrics.
type ShardFamily = (&'static str, &'static str, fn(&ShardMetrics) -> u64);

fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let node = &self.0;
        let shards: Vec<(String, &ShardMetrics)> = node
            .shards
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), &*l.metrics))
            .collect();
        let per_shard = |f: fn(&ShardMetrics) -> u64| -> Vec<(Labels, u64)> {
            shards
                .iter()
                .map(|(i, m)| (vec![("shard", i.clone())], f(m)))
                .collect()
        };
        let counters: [ShardFamily; 26] = [
            ("ringway_accepted", "TCP connections accepted", |m| {
                m.accepted.get()
            }),
            (
                "ringway_accept_errors",
                "Failed accepts (usually the file limit)",
                |m| m.accept_errors.get(),
            ),
            ("ringway_frames_in", "WebSocket frames received", |m| {
                m.frames_in.get()
            }),
            ("ringway_frames_out", "WebSocket frames sent", |m| {
                m.frames_out.get()
            }),
            (
                "ringway_bytes_in",
                "Bytes received on client sockets",
                |m| m.bytes_in.get(),
            ),
            (
                "ringway_bytes_out",
                "Bytes written to client sockets",
                |m| m.bytes_out.get(),
            ),
            (
                "ringway_deliveries",
                "Topic messages given to subscribers (written, or queued for a full socket)",
                |m| m.deliveries.get(),
            ),
            (
                "ringway_dropped",
                "Deliveries not given: the subscriber was too slow, or its connection was closing",
                |m| m.dropped.get(),
            ),
            (
                "ringway_inbox_full",
                "Messages (publishes, direct sends) refused because this shard's inbox stayed full",
                |m| m.inbox_full.get(),
            ),
            (
                "ringway_error_frames",
                "Protocol error frames sent to clients",
                |m| m.error_frames.get(),
            ),
            (
                "ringway_ticks",
                "Delivery ticks: passes over the connections owed a write",
                |m| m.ticks.get(),
            ),
            (
                "ringway_tick_writes",
                "Connections written by delivery ticks",
                |m| m.tick_writes.get(),
            ),
            (
                "ringway_congestion_waits",
                "Inbox messages held back because a quarter of the shard's connections had queues over half full",
                |m| m.congestion_waits.get(),
            ),
            (
                "ringway_rate_limited",
                "Client messages refused for going over client_messages_per_sec",
                |m| m.rate_limited.get(),
            ),
            (
                "ringway_handshakes_evicted",
                "Unfinished upgrades dropped, oldest first, to stay under max_pending_handshakes",
                |m| m.handshakes_evicted.get(),
            ),
            (
                "ringway_handshake_timeouts",
                "Sockets that did not finish the upgrade in time",
                |m| m.handshake_timeouts.get(),
            ),
            (
                "ringway_direct_received",
                "Direct messages that reached this shard",
                |m| m.direct_received.get(),
            ),
            (
                "ringway_direct_deliveries",
                "Direct messages queued to this shard's connections",
                |m| m.direct_deliveries.get(),
            ),
            (
                "ringway_direct_given_again",
                "Unacknowledged direct messages given again to a user's new connection",
                |m| m.direct_given_again.get(),
            ),
            (
                "ringway_caught_up",
                "Frames given to a topic's subscribers from its Redis stream after the shard's subscription came back",
                |m| m.caught_up.get(),
            ),
            (
                "ringway_backplane_received",
                "Topic messages received from Redis",
                |m| m.backplane_received.get(),
            ),
            (
                "ringway_relayed",
                "Topic messages from Redis handed to sibling shards (this shard owns the topic's subscription on the node)",
                |m| m.relayed.get(),
            ),
            (
                "ringway_relays_lost",
                "Topic messages not handed to a sibling shard whose relays were over relay_buffer_bytes (it catches up from the topic's stream)",
                |m| m.relays_lost.get(),
            ),
            (
                "ringway_backplane_malformed",
                "Messages on ringway channels that did not follow the schema (dropped)",
                |m| m.backplane_bad.get(),
            ),
            (
                "ringway_redis_reconnects",
                "Redis connections lost (subscriber or commands)",
                |m| m.redis_reconnects.get(),
            ),
            ("ringway_redis_commands", "Commands written to Redis", |m| {
                m.redis_commands.get()
            }),
        ];
        for (name, help, f) in counters {
            let samples = per_shard(f)
                .into_iter()
                .map(|(l, v)| (l, ConstCounter::new(v)));
            family(&mut enc, name, help, MetricType::Counter, samples)?;
        }
        let gauges: [ShardFamily; 8] = [
            ("ringway_connections", "Open WebSocket connections", |m| {
                m.connections.get()
            }),
            (
                "ringway_topics",
                "Topics with at least one local subscriber",
                |m| m.topics.get(),
            ),
            (
                "ringway_subscriptions",
                "Connection-topic subscriptions",
                |m| m.subscriptions.get(),
            ),
            (
                "ringway_blocked_connections",
                "Connections whose socket refused bytes still owed (sampled each second)",
                |m| m.blocked.get(),
            ),
            (
                "ringway_history_messages",
                "Topic messages held in history for resume and /v1/history",
                |m| m.history_messages.get(),
            ),
            (
                "ringway_redis_subscriber_up",
                "1 while the shard's Redis subscriber connection is up",
                |m| m.redis_subscriber_up.get(),
            ),
            (
                "ringway_redis_commands_up",
                "1 while the shard's Redis command connection is up",
                |m| m.redis_commands_up.get(),
            ),
            (
                "ringway_presence_entries",
                "Connections with a user id, as registered at the last heartbeat",
                |m| m.presence_entries.get(),
            ),
        ];
        for (name, help, f) in gauges {
            let samples = per_shard(f)
                .into_iter()
                .map(|(l, v)| (l, ConstGauge::new(v as i64)));
            family(&mut enc, name, help, MetricType::Gauge, samples)?;
        }
        let refusals = shards.iter().flat_map(|(i, m)| {
            Refusal::ALL.iter().map(move |r| {
                (
                    vec![("shard", i.clone()), ("reason", r.label().to_string())],
                    ConstCounter::new(m.refused(*r).get()),
                )
            })
        });
        let resumes = shards.iter().flat_map(|(i, m)| {
            [
                ("true", m.resumes_recovered.get()),
                ("false", m.resumes_not_recovered.get()),
            ]
            .map(|(recovered, n)| {
                (
                    vec![("shard", i.clone()), ("recovered", recovered.to_string())],
                    ConstCounter::new(n),
                )
            })
        });
        family(
            &mut enc,
            "ringway_resumes",
            "Subscribes with since, by whether what was missed could be replayed",
            MetricType::Counter,
            resumes,
        )?;
        family(
            &mut enc,
            "ringway_handshake_failures",
            "Upgrade requests refused, by reason",
            MetricType::Counter,
            refusals,
        )?;
        let closes = shards.iter().flat_map(|(i, m)| {
            CloseReason::ALL.iter().map(move |r| {
                (
                    vec![("shard", i.clone()), ("reason", r.label().to_string())],
                    ConstCounter::new(m.closed(*r).get()),
                )
            })
        });
        family(
            &mut enc,
            "ringway_closes",
            "Connections closed, by cause",
            MetricType::Counter,
            closes,
        )?;
        let none: Labels = Vec::new();
        family(
            &mut enc,
            "ringway_published",
            "Messages accepted for publishing",
            MetricType::Counter,
            [(none.clone(), ConstCounter::new(node.published.get()))],
        )?;
        family(
            &mut enc,
            "ringway_direct_unacked",
            "Direct messages kept unacknowledged for their users (single node)",
            MetricType::Gauge,
            [(
                none.clone(),
                ConstGauge::new(node.unacked_messages.get() as i64),
            )],
        )?;
        family(
            &mut enc,
            "ringway_direct_unacked_dropped",
            "Unacknowledged direct messages dropped because a user's inbox was full",
            MetricType::Counter,
            [(none.clone(), ConstCounter::new(node.unacked.dropped.get()))],
        )?;
        family(
            &mut enc,
            "ringway_direct_acked",
            "Direct messages acknowledged by clients",
            MetricType::Counter,
            [(none.clone(), ConstCounter::new(node.unacked.acked.get()))],
        )?;
        family(
            &mut enc,
            "ringway_publish_waits",
            "Admin API publishes and sends that waited for room in a full shard inbox",
            MetricType::Counter,
            [(none.clone(), ConstCounter::new(node.publish_waits.get()))],
        )?;
        family(
            &mut enc,
            "ringway_ready",
            "1 when every shard listens, the node is not draining and Redis (if configured) is reachable",
            MetricType::Gauge,
            [(
                none,
                ConstGauge::new(i64::from(
                    node.is_ready() && node.backplane_problem().is_none(),
                )),
            )],
        )?;
        let info = vec![
            ("node", node.id.clone()),
            ("driver", node.driver.to_string()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ];
        family(
            &mut enc,
            "ringway_info",
            "Build and runtime facts",
            MetricType::Gauge,
            [(info, ConstGauge::new(1))],
        )?;
        Ok(())
    }
}

/// A registry that reads `node` at every scrape.
pub fn registry(node: Arc<Node>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(NodeCollector(node)));
    r
}

/// Renders the exposition text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    prometheus_client::encoding::text::encode(&mut out, registry).expect("encode into String");
    out
}
