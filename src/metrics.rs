//! Prometheus metrics, served over HTTP at `/metrics` (localhost by default).
//!
//! Names follow Prometheus conventions with units; labels stay
//! low-cardinality (the uplink's `topic`, never a device id). Each stage
//! updates its own metrics; this module only defines and serves them.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Every metric ferry exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub mqtt_received: Counter,
    pub mqtt_connected: Gauge,
    pub mqtt_reconnects: Counter,

    pub store_stored: Counter,
    pub store_dead_lettered: Counter,
    pub store_redeliveries_dropped: Counter,
    pub store_records: Gauge,
    pub store_bytes: Gauge,
    pub store_oldest_age: Gauge<f64, AtomicU64>,
    pub store_commit_seconds: Histogram,

    pub uplink_sent: Counter,
    pub uplink_acknowledged: Counter,
    pub uplink_skipped: Counter,
    pub uplink_resent: Counter,
    pub uplink_connected: Gauge,
    pub uplink_reconnects: Counter,
    pub uplink_auth_challenges: Counter,
    pub uplink_send_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            mqtt_received: Counter::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            store_stored: Counter::default(),
            store_dead_lettered: Counter::default(),
            store_redeliveries_dropped: Counter::default(),
            store_records: Gauge::default(),
            store_bytes: Gauge::default(),
            store_oldest_age: Gauge::default(),
            // 0.1 ms to ~6.5 s.
            store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            uplink_sent: Counter::default(),
            uplink_acknowledged: Counter::default(),
            uplink_skipped: Counter::default(),
            uplink_resent: Counter::default(),
            uplink_connected: Gauge::default(),
            uplink_reconnects: Counter::default(),
            uplink_auth_challenges: Counter::default(),
            // 0.5 ms to ~33 s.
            uplink_send_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::default()
    }

    /// A registry holding every metric; uplink metrics carry `topic`.
    pub fn registry(&self, topic: &str) -> Registry {
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
            "Records committed to the store",
            self.store_stored.clone(),
        );
        r.register(
            "store_dead_letters",
            "Messages moved to the dead-letter table",
            self.store_dead_lettered.clone(),
        );
        r.register(
            "store_redeliveries_dropped",
            "Broker redeliveries of messages already stored (acked, not stored twice)",
            self.store_redeliveries_dropped.clone(),
        );
        r.register(
            "store_records",
            "Records waiting in the store",
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
        r.register_with_unit(
            "store_commit_duration",
            "Time to commit one group of records",
            Unit::Seconds,
            self.store_commit_seconds.clone(),
        );

        let u = r.sub_registry_with_label((Cow::Borrowed("topic"), Cow::Owned(topic.to_string())));
        u.register(
            "uplink_records_sent",
            "Records sent to Pulsar (resends included)",
            self.uplink_sent.clone(),
        );
        u.register(
            "uplink_records_acknowledged",
            "Records confirmed by a Pulsar receipt",
            self.uplink_acknowledged.clone(),
        );
        u.register(
            "uplink_records_skipped",
            "Stored records the broker already held at producer (re)connect, dropped unsent",
            self.uplink_skipped.clone(),
        );
        u.register(
            "uplink_records_resent",
            "Records sent more than once",
            self.uplink_resent.clone(),
        );
        u.register(
            "uplink_connected",
            "1 while the producer is ready",
            self.uplink_connected.clone(),
        );
        u.register(
            "uplink_reconnects",
            "Uplink sessions ended by an error",
            self.uplink_reconnects.clone(),
        );
        u.register(
            "uplink_auth_challenges",
            "AUTH_CHALLENGEs answered",
            self.uplink_auth_challenges.clone(),
        );
        u.register_with_unit(
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
    fn names_carry_units_and_the_topic_label() {
        let m = Metrics::new();
        m.mqtt_received.inc();
        m.uplink_acknowledged.inc_by(3);
        m.store_commit_seconds.observe(0.002);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry("persistent://t/n/s"))
            .unwrap();
        assert!(
            text.contains("ferry_mqtt_messages_received_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "ferry_uplink_records_acknowledged_total{topic=\"persistent://t/n/s\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains("ferry_store_commit_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("ferry_store_bytes "), "{text}");
        assert!(
            text.contains("ferry_store_oldest_record_age_seconds "),
            "{text}"
        );
    }
}
