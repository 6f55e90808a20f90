//! Process-wide counters and histograms an operator graphs across a fleet (ack
//! latency, commit batch size, device connects and disconnects by reason). A leaf
//! module: anything may call it, it imports nothing of the hub. `/metrics` renders
//! it beside the figures it reads from the realms at scrape time.
//!
//! Cheap on the hot path: a histogram observation is two relaxed atomic adds and a
//! short linear scan of at most 16 bucket bounds; labelled counters take a mutex
//! only per connect/disconnect (never per event).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

/// A fixed-bucket histogram (Prometheus semantics: cumulative `le` buckets, `_sum`,
/// `_count`). The sum is kept in micro-units so it fits an atomic integer.
pub struct Histogram {
    bounds: &'static [f64],
    counts: [AtomicU64; 16],
    /// Sum of observations x 1e6.
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Self {
        assert!(bounds.len() <= 16);
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; 16],
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micro
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Appends the histogram in Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A counter per label value (a small, bounded set of `&'static str` reasons).
pub struct LabelledCounter {
    by: Mutex<BTreeMap<&'static str, u64>>,
}

impl LabelledCounter {
    pub const fn new() -> Self {
        LabelledCounter {
            by: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn inc(&self, label: &'static str) {
        *self.by.lock().entry(label).or_insert(0) += 1;
    }

    pub fn get(&self, label: &str) -> u64 {
        self.by.lock().get(label).copied().unwrap_or(0)
    }

    pub fn render(&self, out: &mut String, name: &str, label: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (k, v) in self.by.lock().iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
        }
    }
}

impl Default for LabelledCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds from a device's event arriving at the hub to its ack being queued to the
/// device (after the commit is durable).
pub static ACK_LATENCY: Histogram = Histogram::new(&[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
]);

/// Events stored per commit (one transaction, one fsync).
pub static COMMIT_BATCH: Histogram = Histogram::new(&[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
]);

/// Devices admitted (Socket.IO connect accepted), by role class.
pub static CONNECTS: LabelledCounter = LabelledCounter::new();
/// Connections refused at the handshake, by refusal code (`expired`, `bad_signature`...).
pub static REFUSED: LabelledCounter = LabelledCounter::new();
/// Devices gone, by reason (see [`disconnect_label`] and [`Cause`]).
pub static DISCONNECTS: LabelledCounter = LabelledCounter::new();

/// A device connected.
pub fn device_connected(role: &str) {
    CONNECTS.inc(match role {
        "till" => "till",
        "admin" => "admin",
        "kitchen" => "kitchen",
        "bar" => "bar",
        _ => "other",
    });
}

/// A device gone, by reason: the hub's own (`link::Why::as_str`: `queue_full`,
/// `catch_up_stalled`, `bad_packet`, `shutdown`, ...) when it cut the device, else
/// [`disconnect_label`] of Engine.IO's.
pub fn device_disconnected(reason: &'static str) {
    DISCONNECTS.inc(reason);
}

/// A stable label for Engine.IO's disconnect reason.
pub fn disconnect_label(r: engineioxide::socket::DisconnectReason) -> &'static str {
    use engineioxide::socket::DisconnectReason as R;
    match r {
        R::TransportClose => "client_disconnect",
        R::MultipleHttpPollingError => "polling_error",
        R::PacketParsingError => "packet_parsing_error",
        R::TransportError => "transport_error",
        R::HeartbeatTimeout => "heartbeat_timeout",
        R::ClosingServer => "hub_shutdown",
    }
}

/// A refused handshake, by its stable code.
pub fn device_refused(code: &'static str) {
    REFUSED.inc(code);
}

/// Appends everything kept here in Prometheus text format.
pub fn render(out: &mut String) {
    ACK_LATENCY.render(
        out,
        "poshub_ack_latency_seconds",
        "From an event's arrival to its ack (after the durable commit)",
    );
    COMMIT_BATCH.render(
        out,
        "poshub_commit_batch_events",
        "Events stored per commit (one transaction, one fsync)",
    );
    CONNECTS.render(
        out,
        "poshub_device_connects_total",
        "role",
        "Devices admitted since the hub started, by role",
    );
    REFUSED.render(
        out,
        "poshub_device_refused_total",
        "code",
        "Connections refused at the handshake, by code",
    );
    DISCONNECTS.render(
        out,
        "poshub_device_disconnects_total",
        "reason",
        "Devices gone since the hub started, by reason",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        static H: Histogram = Histogram::new(&[1.0, 10.0]);
        H.observe(0.5);
        H.observe(5.0);
        H.observe(50.0);
        let mut s = String::new();
        H.render(&mut s, "x", "help");
        assert!(s.contains("x_bucket{le=\"1\"} 1\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"10\"} 2\n"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3\n"), "{s}");
        assert!(s.contains("x_sum 55.5\n"), "{s}");
        assert!(s.contains("x_count 3\n"), "{s}");
    }

    #[test]
    fn labelled_counter_counts_per_label() {
        let c = LabelledCounter::new();
        c.inc("a");
        c.inc("a");
        c.inc("b");
        assert_eq!(c.get("a"), 2);
        let mut s = String::new();
        c.render(&mut s, "y", "reason", "h");
        assert!(s.contains("y{reason=\"a\"} 2\n"));
        assert!(s.contains("y{reason=\"b\"} 1\n"));
    }
}
