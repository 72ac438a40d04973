//! Prometheus counters, rendered in the text exposition format at /metrics.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub bytes_sent: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub shared_waits: AtomicU64,
    pub diffs: AtomicU64,
    diff_micros: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub rejected_connections: AtomicU64,
    pub rejected_client_diffs: AtomicU64,
    pub known_base_answers: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16, bytes: u64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route, status))
            .or_default() += 1;
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn diff_done(&self, seconds: f64) {
        self.diffs.fetch_add(1, Ordering::Relaxed);
        self.diff_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "atom_dist_response_bytes_total",
            "Bytes of response bodies sent.",
            get(&self.bytes_sent),
        );
        counter(
            "atom_dist_delta_known_base_total",
            "Delta requests from hosts on a published base, answered with its delta.",
            get(&self.known_base_answers),
        );
        counter(
            "atom_dist_delta_cache_hits_total",
            "Delta requests answered from the cache.",
            get(&self.cache_hits),
        );
        counter(
            "atom_dist_delta_cache_misses_total",
            "Delta requests that needed a new diff.",
            get(&self.cache_misses),
        );
        counter(
            "atom_dist_delta_shared_total",
            "Delta requests that waited for an identical diff already running.",
            get(&self.shared_waits),
        );
        counter(
            "atom_dist_delta_busy_total",
            "Delta requests refused with 503 (too many diffs).",
            get(&self.rejected_busy),
        );
        counter(
            "atom_dist_client_connections_refused_total",
            "Connections closed at once because their address held its share already.",
            get(&self.rejected_connections),
        );
        counter(
            "atom_dist_client_diffs_refused_total",
            "Delta requests refused with 429: their address already had its diffs running.",
            get(&self.rejected_client_diffs),
        );
        let _ = writeln!(
            out,
            "# HELP atom_dist_diff_seconds Time spent computing uncached diffs.\n# TYPE atom_dist_diff_seconds summary\n\
             atom_dist_diff_seconds_sum {:.6}\natom_dist_diff_seconds_count {}",
            get(&self.diff_micros) as f64 / 1e6,
            get(&self.diffs)
        );
        let _ = writeln!(
            out,
            "# HELP atom_dist_requests_total HTTP requests by route and status.\n# TYPE atom_dist_requests_total counter"
        );
        for ((route, status), n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "atom_dist_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}

/// Gauges of when each signed document expires, so an alert fires days ahead
/// (`atom_channel_expires_timestamp_seconds - time() < 3 * 86400`).
pub fn render_expiries(out: &mut String, expiries: &[crate::expiry::Expiry]) {
    let _ = writeln!(
        out,
        "# HELP atom_channel_expires_timestamp_seconds When a channel's current manifest or timestamp expires.\n\
         # TYPE atom_channel_expires_timestamp_seconds gauge"
    );
    for e in expiries {
        if let Some(c) = &e.channel {
            let _ = writeln!(
                out,
                "atom_channel_expires_timestamp_seconds{{channel=\"{c}\",document=\"{}\"}} {}",
                e.document,
                e.expires.as_second()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP atom_keys_expires_timestamp_seconds When keys.toml or a key it names expires (key roles).\n\
         # TYPE atom_keys_expires_timestamp_seconds gauge"
    );
    for e in expiries.iter().filter(|e| e.channel.is_none()) {
        let _ = writeln!(
            out,
            "atom_keys_expires_timestamp_seconds{{document=\"{}\",key=\"{}\"}} {}",
            e.document,
            e.key.as_deref().unwrap_or(""),
            e.expires.as_second()
        );
    }
}
