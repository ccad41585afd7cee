//! Prometheus metrics, served over HTTP at `/metrics` (localhost by default).
//!
//! Names follow Prometheus conventions with units; labels stay
//! low-cardinality (`stream`, `policy`, the uplink's `topic`; never a device
//! id). Each stage
//! updates its own metrics; this module only defines and serves them.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Label pairs, such as `[("stream", "status")]`.
type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn send_latency() -> Histogram {
    // 0.5 ms to ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// Every metric ferry exports. Store metrics carry `stream` (and `policy`
/// for what was dropped), uplink metrics carry `topic`.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub mqtt_received: Counter,
    pub mqtt_connected: Gauge,
    pub mqtt_reconnects: Counter,

    pub store_stored: Counter,
    pub store_dead_lettered: Counter,
    pub store_dead_letters_pruned: Counter,
    pub store_redeliveries_dropped: Counter,
    pub store_retained_unchanged: Counter,
    pub downlink_received: Counter,
    pub downlink_stale: Counter,
    pub downlink_dead_lettered: Counter,
    pub downlink_published: Counter,
    pub downlink_applied: Counter,
    pub downlink_pending: Gauge,
    pub store_commit_seconds: Histogram,
    pub store_disk_full: Gauge,
    pub store_damaged: Counter,
    store_records: Family<Labels, Gauge>,
    store_bytes: Family<Labels, Gauge>,
    store_oldest_age: Family<Labels, FloatGauge>,
    store_rejecting: Family<Labels, Gauge>,
    store_superseded: Family<Labels, Counter>,
    store_dropped: Family<Labels, Counter>,

    uplink_sent: Family<Labels, Counter>,
    uplink_acknowledged: Family<Labels, Counter>,
    uplink_skipped: Family<Labels, Counter>,
    uplink_resent: Family<Labels, Counter>,
    uplink_connected: Family<Labels, Gauge>,
    uplink_reconnects: Family<Labels, Counter>,
    uplink_auth_challenges: Family<Labels, Counter>,
    uplink_deduplication: Family<Labels, Gauge>,
    uplink_send_latency: Family<Labels, Histogram, fn() -> Histogram>,
}

/// The metrics of one uplink session (one destination topic).
#[derive(Debug, Clone)]
pub struct UplinkMetrics {
    pub sent: Counter,
    pub acknowledged: Counter,
    pub skipped: Counter,
    pub resent: Counter,
    pub connected: Gauge,
    pub reconnects: Counter,
    pub auth_challenges: Counter,
    /// 1: the broker named the producer's last record (deduplication
    /// works); 0: it forgot a producer it had confirmed records of
    /// (deduplication off); -1: not known yet.
    pub deduplication: Gauge,
    pub send_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            mqtt_received: Counter::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            store_stored: Counter::default(),
            store_dead_lettered: Counter::default(),
            store_dead_letters_pruned: Counter::default(),
            store_redeliveries_dropped: Counter::default(),
            store_retained_unchanged: Counter::default(),
            downlink_received: Counter::default(),
            downlink_stale: Counter::default(),
            downlink_dead_lettered: Counter::default(),
            downlink_published: Counter::default(),
            downlink_applied: Counter::default(),
            downlink_pending: Gauge::default(),
            // 0.1 ms to ~6.5 s.
            store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            store_disk_full: Gauge::default(),
            store_damaged: Counter::default(),
            store_records: Family::default(),
            store_bytes: Family::default(),
            store_oldest_age: Family::default(),
            store_rejecting: Family::default(),
            store_superseded: Family::default(),
            store_dropped: Family::default(),
            uplink_sent: Family::default(),
            uplink_acknowledged: Family::default(),
            uplink_skipped: Family::default(),
            uplink_resent: Family::default(),
            uplink_connected: Family::default(),
            uplink_reconnects: Family::default(),
            uplink_auth_challenges: Family::default(),
            uplink_deduplication: Family::default(),
            uplink_send_latency: Family::new_with_constructor(send_latency),
        }
    }
}

fn stream(name: &str) -> Labels {
    vec![("stream", name.to_string())]
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    pub fn store_records(&self, s: &str) -> Gauge {
        self.store_records.get_or_create(&stream(s)).clone()
    }

    pub fn store_bytes(&self, s: &str) -> Gauge {
        self.store_bytes.get_or_create(&stream(s)).clone()
    }

    pub fn store_oldest_age(&self, s: &str) -> FloatGauge {
        self.store_oldest_age.get_or_create(&stream(s)).clone()
    }

    pub fn store_rejecting(&self, s: &str) -> Gauge {
        self.store_rejecting.get_or_create(&stream(s)).clone()
    }

    pub fn superseded(&self, s: &str) -> Counter {
        self.store_superseded.get_or_create(&stream(s)).clone()
    }

    pub fn dropped(&self, s: &str, policy: &str) -> Counter {
        let labels = vec![("stream", s.to_string()), ("policy", policy.to_string())];
        self.store_dropped.get_or_create(&labels).clone()
    }

    /// Creates every per-stream series at zero, so dashboards see them
    /// before anything happens.
    pub fn declare_stream(&self, s: &str, policies: &[&str]) {
        self.store_records(s);
        self.store_bytes(s);
        self.store_oldest_age(s);
        self.store_rejecting(s);
        self.superseded(s);
        for p in policies {
            self.dropped(s, p);
        }
    }

    /// The metrics of the uplink session of `topic`.
    pub fn uplink(&self, topic: &str) -> UplinkMetrics {
        let l = vec![("topic", topic.to_string())];
        UplinkMetrics {
            sent: self.uplink_sent.get_or_create(&l).clone(),
            acknowledged: self.uplink_acknowledged.get_or_create(&l).clone(),
            skipped: self.uplink_skipped.get_or_create(&l).clone(),
            resent: self.uplink_resent.get_or_create(&l).clone(),
            connected: self.uplink_connected.get_or_create(&l).clone(),
            reconnects: self.uplink_reconnects.get_or_create(&l).clone(),
            auth_challenges: self.uplink_auth_challenges.get_or_create(&l).clone(),
            deduplication: self.uplink_deduplication.get_or_create(&l).clone(),
            send_latency: self.uplink_send_latency.get_or_create(&l).clone(),
        }
    }

    /// A registry holding every metric.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("ferry");
        r.register(
            "mqtt_messages_received",
            "MQTT messages received from the local broker",
            self.mqtt_received.clone(),
        );
        r.register(
            "mqtt_connected",
            "1 while connected to the local MQTT broker",
            self.mqtt_connected.clone(),
        );
        r.register(
            "mqtt_reconnects",
            "MQTT connections lost",
            self.mqtt_reconnects.clone(),
        );

        r.register(
            "store_records_stored",
            "Updates committed to the store",
            self.store_stored.clone(),
        );
        r.register(
            "store_dead_letters",
            "Messages moved to the dead-letter table",
            self.store_dead_lettered.clone(),
        );
        r.register(
            "store_dead_letters_pruned",
            "The oldest dead letters removed to keep the table within store.dead_letters_max, _max_bytes and _max_age_secs (still counted in store_dead_letters)",
            self.store_dead_letters_pruned.clone(),
        );
        r.register(
            "store_redeliveries_dropped",
            "Broker redeliveries of messages already stored (acked, not stored twice)",
            self.store_redeliveries_dropped.clone(),
        );
        r.register(
            "store_retained_unchanged",
            "Retained messages the broker sent again at a subscription, unchanged since they were stored (acked, not stored twice)",
            self.store_retained_unchanged.clone(),
        );
        r.register(
            "downlink_received",
            "Desired-state messages read from the desired topic",
            self.downlink_received.clone(),
        );
        r.register(
            "downlink_stale",
            "Desired-state versions at or below what the device already had (never published)",
            self.downlink_stale.clone(),
        );
        r.register(
            "downlink_dead_lettered",
            "Desired-state messages that can never be applied (no key, no version, too large, ...), moved to the dead-letter table",
            self.downlink_dead_lettered.clone(),
        );
        r.register(
            "downlink_pending",
            "Desired-state versions read and not yet acknowledged by the local MQTT broker",
            self.downlink_pending.clone(),
        );
        r.register(
            "downlink_published",
            "Desired states published to the local MQTT broker (retained, QoS 1), republications included",
            self.downlink_published.clone(),
        );
        r.register(
            "downlink_applied",
            "Desired-state versions the local MQTT broker acknowledged for the first time (each acknowledged on the ack topic)",
            self.downlink_applied.clone(),
        );
        r.register(
            "store_records_superseded",
            "Pending status records replaced by a newer state of the same device and never sent (coalesce)",
            self.store_superseded.clone(),
        );
        r.register(
            "store_records_dropped",
            "Pending records dropped unsent, by the policy or condition that dropped them",
            self.store_dropped.clone(),
        );
        r.register(
            "store_records",
            "Records waiting in the store (one per destination topic)",
            self.store_records.clone(),
        );
        r.register_with_unit(
            "store",
            "Payload bytes waiting in the store",
            Unit::Bytes,
            self.store_bytes.clone(),
        );
        r.register_with_unit(
            "store_oldest_record_age",
            "Age of the oldest record waiting in the store",
            Unit::Seconds,
            self.store_oldest_age.clone(),
        );
        r.register(
            "store_rejecting",
            "1 while a reject stream is at its limit and MQTT messages are not acknowledged",
            self.store_rejecting.clone(),
        );
        r.register(
            "store_disk_full",
            "1 while the disk holding the store is full",
            self.store_disk_full.clone(),
        );
        r.register(
            "store_damaged",
            "Damaged store files moved aside at start",
            self.store_damaged.clone(),
        );
        r.register_with_unit(
            "store_commit_duration",
            "Time to commit one group of records",
            Unit::Seconds,
            self.store_commit_seconds.clone(),
        );

        r.register(
            "uplink_records_sent",
            "Records sent to Pulsar (resends included)",
            self.uplink_sent.clone(),
        );
        r.register(
            "uplink_records_acknowledged",
            "Records confirmed by a Pulsar receipt",
            self.uplink_acknowledged.clone(),
        );
        r.register(
            "uplink_records_skipped",
            "Stored records the broker already held at producer (re)connect, dropped unsent",
            self.uplink_skipped.clone(),
        );
        r.register(
            "uplink_records_resent",
            "Records sent more than once",
            self.uplink_resent.clone(),
        );
        r.register(
            "uplink_connected",
            "1 while the producer is ready",
            self.uplink_connected.clone(),
        );
        r.register(
            "uplink_reconnects",
            "Uplink sessions that ended with an error, failed connection attempts included",
            self.uplink_reconnects.clone(),
        );
        r.register(
            "uplink_auth_challenges",
            "AUTH_CHALLENGEs answered",
            self.uplink_auth_challenges.clone(),
        );
        r.register(
            "uplink_deduplication",
            "1: the broker named the producer's last record (deduplication works); 0: it forgot a producer it had confirmed records of (deduplication off: exactly once is not kept); -1: not known yet",
            self.uplink_deduplication.clone(),
        );
        r.register_with_unit(
            "uplink_send_latency",
            "Time from SEND to its receipt",
            Unit::Seconds,
            self.uplink_send_latency.clone(),
        );
        r
    }
}

/// Serves `GET /metrics` on `addr` until `stop`.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    let registry = Arc::new(registry);
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            a = listener.accept() => a?,
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let response = if request.starts_with("GET ")
                && (path == "/metrics" || path.starts_with("/metrics?"))
            {
                let mut body = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut body, &registry);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_units_and_low_cardinality_labels() {
        let m = Metrics::new();
        m.mqtt_received.inc();
        m.uplink("persistent://t/n/s").acknowledged.inc_by(3);
        m.store_commit_seconds.observe(0.002);
        m.declare_stream("status", &["coalesce"]);
        m.superseded("status").inc_by(7);
        m.dropped("alarms", "drop-oldest").inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry()).unwrap();
        for line in [
            "ferry_mqtt_messages_received_total 1",
            "ferry_uplink_records_acknowledged_total{topic=\"persistent://t/n/s\"} 3",
            "ferry_store_commit_duration_seconds_count 1",
            "ferry_store_bytes{stream=\"status\"} 0",
            "ferry_store_oldest_record_age_seconds{stream=\"status\"} 0.0",
            "ferry_store_records_superseded_total{stream=\"status\"} 7",
            "ferry_store_records_dropped_total{stream=\"status\",policy=\"coalesce\"} 0",
            "ferry_store_records_dropped_total{stream=\"alarms\",policy=\"drop-oldest\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
