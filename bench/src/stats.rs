//! What client threads and client processes report, and how reports merge: counters
//! add, histograms add, per-seq delivery counts add element-wise. Reports cross process
//! boundaries as JSON lines, histograms as (value, count) pairs of their recorded
//! buckets (exact up to the histogram's own precision).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Histogram range: 1 µs to 1 hour, 3 significant digits (~200 KB per histogram).
pub const HIST_MAX_US: u64 = 3_600_000_000;

/// A new µs histogram.
pub fn new_hist() -> Histogram<u64> {
    // Constant, valid bounds.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

/// A histogram in transit: its recorded buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        Self(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds these buckets into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            let _ = h.record_n(v.clamp(1, HIST_MAX_US), n);
        }
    }

    pub fn merge(&mut self, other: &Self) {
        let mut h = self.to_hist();
        other.add_to(&mut h);
        *self = Self::from_hist(&h);
    }

    pub fn to_hist(&self) -> Histogram<u64> {
        let mut h = new_hist();
        self.add_to(&mut h);
        h
    }
}

/// Why connections failed, by stage.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Failures {
    /// socket(), bind() or connect() failed (EMFILE, EADDRNOTAVAIL, ECONNREFUSED, …).
    pub connect: u64,
    /// The gateway answered the upgrade with another status or a wrong accept key.
    pub refused: u64,
    /// The peer closed or reset before the connection was ready.
    pub closed: u64,
    /// A frame we could not read, or a welcome/subscribed that did not come in order.
    pub protocol: u64,
    /// A small write (upgrade, subscribe, pong) did not fit the socket buffer.
    pub write: u64,
    /// Not ready when the deadline passed.
    pub timeout: u64,
}

impl Failures {
    /// The total and its breakdown, for the report table.
    pub fn summary(&self) -> String {
        format!(
            "{} (connect {}, refused {}, closed {}, protocol {}, write {}, timeout {})",
            self.total(),
            self.connect,
            self.refused,
            self.closed,
            self.protocol,
            self.write,
            self.timeout
        )
    }

    pub fn total(&self) -> u64 {
        self.connect + self.refused + self.closed + self.protocol + self.write + self.timeout
    }
    pub fn add(&mut self, o: &Self) {
        self.connect += o.connect;
        self.refused += o.refused;
        self.closed += o.closed;
        self.protocol += o.protocol;
        self.write += o.write;
        self.timeout += o.timeout;
    }
}

/// After opening (and, for fanout, subscribing) every connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OpenReport {
    pub requested: u64,
    /// Connections upgraded, welcomed (and subscribed) by the deadline.
    pub opened: u64,
    pub failures: Failures,
    /// connect() to ready, per connection.
    pub ready_us: HistData,
    /// Ready subscribers per topic index (empty when not subscribing).
    pub ready_per_topic: Vec<u64>,
    /// RSS of the client process(es) before and after opening.
    pub self_rss_before: u64,
    pub self_rss_after: u64,
    /// CPU seconds the client process(es) had used when opening finished.
    pub self_cpu_secs: f64,
}

impl OpenReport {
    pub fn merge(&mut self, o: &Self) {
        self.requested += o.requested;
        self.opened += o.opened;
        self.failures.add(&o.failures);
        self.ready_us.merge(&o.ready_us);
        add_vec(&mut self.ready_per_topic, &o.ready_per_topic);
        self.self_rss_before += o.self_rss_before;
        self.self_rss_after += o.self_rss_after;
        self.self_cpu_secs += o.self_cpu_secs;
    }
}

/// Deliveries seen by subscribers up to the end of the drain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainReport {
    /// Deliveries this part expected (from the publisher's acknowledged seqs).
    pub expected: u64,
    /// Our messages received (duplicates included).
    pub received: u64,
    /// Deliveries per message seq.
    pub counts: Vec<u32>,
    /// now − intended send time, µs.
    pub latency_us: HistData,
    /// When the last of our messages arrived, ns since the UNIX epoch (0: none).
    pub last_delivery_unix_ns: u64,
    /// Resume storm: when the last message published before the subscribers connected
    /// (replayed to them) arrived, ns since the UNIX epoch (0: none).
    #[serde(default)]
    pub last_replay_unix_ns: u64,
    /// A message for a topic this connection did not subscribe to (or seq ≠ topic).
    pub misrouted: u64,
    /// Text frames we could not classify, and messages without our seq/t.
    pub unknown_frames: u64,
    /// `error` frames received.
    pub error_frames: u64,
    /// Pings answered since the connections opened.
    pub pings: u64,
    /// Ready connections the peer closed before the drain ended.
    pub peer_closed: u64,
    /// How they ended: `close_<code>` (close frame from the peer), `eof`, `reset`,
    /// `write_failed`, `bad_frame`.
    pub peer_close_causes: BTreeMap<String, u64>,
    /// CPU seconds the client process(es) had used when the drain ended.
    pub self_cpu_secs: f64,
    /// Slow consumers (subscribed, then not reading): how many, how many the server
    /// had closed when they finally read, how, and how many of our messages they read.
    pub slow: u64,
    pub slow_closed: u64,
    pub slow_close_causes: BTreeMap<String, u64>,
    pub slow_received: u64,
}

impl DrainReport {
    pub fn merge(&mut self, o: &Self) {
        self.expected += o.expected;
        self.received += o.received;
        if self.counts.len() < o.counts.len() {
            self.counts.resize(o.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.latency_us.merge(&o.latency_us);
        self.last_delivery_unix_ns = self.last_delivery_unix_ns.max(o.last_delivery_unix_ns);
        self.last_replay_unix_ns = self.last_replay_unix_ns.max(o.last_replay_unix_ns);
        self.misrouted += o.misrouted;
        self.unknown_frames += o.unknown_frames;
        self.error_frames += o.error_frames;
        self.pings += o.pings;
        self.peer_closed += o.peer_closed;
        add_map(&mut self.peer_close_causes, &o.peer_close_causes);
        self.self_cpu_secs += o.self_cpu_secs;
        self.slow += o.slow;
        self.slow_closed += o.slow_closed;
        add_map(&mut self.slow_close_causes, &o.slow_close_causes);
        self.slow_received += o.slow_received;
    }
}

/// After closing every connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CloseReport {
    /// Connections still open that we closed (close frame, then drop).
    pub closed: u64,
    /// Ready connections the peer had closed before we closed them.
    pub peer_closed: u64,
    /// How they ended (as in [`DrainReport::peer_close_causes`]).
    pub peer_close_causes: BTreeMap<String, u64>,
    /// Pings answered while the connections were open.
    pub pings: u64,
    /// RSS of the client process(es) just before closing.
    pub self_rss: u64,
}

impl CloseReport {
    pub fn merge(&mut self, o: &Self) {
        self.closed += o.closed;
        self.peer_closed += o.peer_closed;
        add_map(&mut self.peer_close_causes, &o.peer_close_causes);
        self.pings += o.pings;
        self.self_rss += o.self_rss;
    }
}

/// A churn run: open, upgrade, welcome, close, as fast as the concurrency allows.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnReport {
    pub requested: u64,
    pub upgraded: u64,
    pub failures: Failures,
    /// connect() to welcome, per connection.
    pub upgrade_us: HistData,
    /// CPU seconds the client process(es) used during the churn.
    pub self_cpu_secs: f64,
}

impl ChurnReport {
    pub fn merge(&mut self, o: &Self) {
        self.requested += o.requested;
        self.upgraded += o.upgraded;
        self.failures.add(&o.failures);
        self.upgrade_us.merge(&o.upgrade_us);
        self.self_cpu_secs += o.self_cpu_secs;
    }
}

fn add_map(a: &mut BTreeMap<String, u64>, b: &BTreeMap<String, u64>) {
    for (k, v) in b {
        *a.entry(k.clone()).or_default() += v;
    }
}

fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// Percentiles of a µs histogram, in µs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            min: h.min(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_transit_and_merge() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in 1..=1000 {
            a.record(v).unwrap();
            b.record(v * 1000).unwrap();
        }
        let mut da = HistData::from_hist(&a);
        let json = serde_json::to_string(&da).unwrap();
        let back: HistData = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_hist().len(), 1000);
        da.merge(&HistData::from_hist(&b));
        let h = da.to_hist();
        assert_eq!(h.len(), 2000);
        assert_eq!(h.max(), b.max());
        assert_eq!(h.value_at_quantile(0.5), a.value_at_quantile(1.0));
    }

    #[test]
    fn drain_reports_add_counts() {
        let mut a = DrainReport {
            counts: vec![1, 2],
            received: 3,
            ..Default::default()
        };
        let b = DrainReport {
            counts: vec![1, 1, 5],
            received: 7,
            last_delivery_unix_ns: 9,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!(a.counts, vec![2, 3, 5]);
        assert_eq!(a.received, 10);
        assert_eq!(a.last_delivery_unix_ns, 9);
    }
}
