//! The fleet side's Prometheus metrics: what a `view` process did (its
//! [`Counts`], live) and the lag of the view's subscription on every
//! gateway's status topic (its backlog, as the broker reports it).
//!
//! Names (OpenMetrics text, as the agent's `/metrics`):
//!
//! - `ferry_fleet_view_{consumed,applied,stale,retried,dead_lettered}_total`:
//!   this process's counts since it started (only where a `view` runs);
//! - `ferry_fleet_view_lag_messages{topic="..."}`: messages of the topic
//!   the subscription has not acknowledged yet, shared by every `view`
//!   process; polled from the admin REST API every [`LAG_EVERY`]. A topic
//!   the broker has not answered for yet (or where the subscription does
//!   not exist yet) has no sample.
//!
//! Labels stay low-cardinality: a topic per gateway, never a device.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::admin::Admin;
use crate::config::{FleetConfig, TopicRole};
use crate::view::{Counts, Snapshot};

/// How often the lag is read from the broker.
pub const LAG_EVERY: Duration = Duration::from_secs(3);

type Labels = Vec<(&'static str, String)>;

/// The registry behind `/metrics` and the lag gauges the poller sets.
#[derive(Debug, Clone, Default)]
pub struct FleetMetrics {
    lag: Family<Labels, Gauge>,
}

/// Exposes a `view`'s counts at each scrape.
#[derive(Debug)]
struct CountsCollector(Arc<Counts>);

/// The counters, in their exposition order: (name, help, value).
pub fn counters(s: &Snapshot) -> [(&'static str, &'static str, u64); 5] {
    [
        (
            "ferry_fleet_view_consumed",
            "Messages this view took from the status and retry topics",
            s.consumed,
        ),
        (
            "ferry_fleet_view_applied",
            "Updates this view wrote (newer than their row)",
            s.applied,
        ),
        (
            "ferry_fleet_view_stale",
            "Updates this view found older than or equal to their row (not written)",
            s.stale,
        ),
        (
            "ferry_fleet_view_retried",
            "Copies this view sent to the retry topic",
            s.retried,
        ),
        (
            "ferry_fleet_view_dead_lettered",
            "Copies this view sent to the dead-letter topic",
            s.dead_lettered,
        ),
    ]
}

impl prometheus_client::collector::Collector for CountsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in counters(&self.0.snapshot()) {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

impl FleetMetrics {
    /// The registry: the lag gauges, and a view's counts if given.
    pub fn registry(&self, counts: Option<Arc<Counts>>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "ferry_fleet_view_lag_messages",
            "Messages of the status topic the view's subscription has not acknowledged yet",
            self.lag.clone(),
        );
        if let Some(counts) = counts {
            r.register_collector(Box::new(CountsCollector(counts)));
        }
        r
    }

    /// Sets the lag of `topic`.
    pub fn set_lag(&self, topic: &str, messages: u64) {
        self.lag
            .get_or_create(&vec![("topic", topic.to_string())])
            .set(messages.min(i64::MAX as u64) as i64);
    }
}

/// The backlog of `subscription` in a topic's stats (`GET .../stats`):
/// `subscriptions.<name>.msgBacklog`; `None` if the subscription is not
/// there.
pub fn backlog_of(stats: &Value, subscription: &str) -> Option<u64> {
    stats
        .get("subscriptions")?
        .get(subscription)?
        .get("msgBacklog")?
        .as_u64()
}

/// The admin API path of a topic's stats.
pub fn stats_path(topic: &str) -> String {
    let rest = topic
        .strip_prefix("persistent://")
        .unwrap_or(topic)
        .trim_start_matches('/');
    format!("persistent/{rest}/stats")
}

/// Reads the lag of every status topic every [`LAG_EVERY`], until the task
/// is dropped. A failed call is logged and tried again at the next round.
pub async fn poll_lag(config: FleetConfig, admin: Admin, metrics: FleetMetrics) {
    let topics: Vec<String> = config
        .gateways
        .iter()
        .map(|g| config.topic(g, TopicRole::Status))
        .collect();
    let subscription = &config.view.subscription;
    let mut every = tokio::time::interval(LAG_EVERY);
    loop {
        every.tick().await;
        for topic in &topics {
            match admin.get(&stats_path(topic)).await {
                Ok(Some(stats)) => {
                    if let Some(n) = backlog_of(&stats, subscription) {
                        metrics.set_lag(topic, n);
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(%topic, error = %e, "lag: topic stats not read"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn counts_and_lag_are_exposed_by_name() {
        let counts = Arc::new(Counts::default());
        counts.applied.store(7, Ordering::Relaxed);
        counts.stale.store(2, Ordering::Relaxed);
        let m = FleetMetrics::default();
        m.set_lag("persistent://t/n/gw-status", 12);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry(Some(counts.clone())))
            .unwrap();
        for line in [
            "ferry_fleet_view_lag_messages{topic=\"persistent://t/n/gw-status\"} 12",
            "ferry_fleet_view_applied_total 7",
            "ferry_fleet_view_stale_total 2",
            "ferry_fleet_view_dead_lettered_total 0",
            "# TYPE ferry_fleet_view_retried counter",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        // Live: a later scrape sees later counts.
        counts.applied.store(8, Ordering::Relaxed);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry(Some(counts))).unwrap();
        assert!(text.contains("ferry_fleet_view_applied_total 8"), "{text}");
    }

    #[test]
    fn without_a_view_only_the_lag_is_there() {
        let m = FleetMetrics::default();
        let mut text = String::new();
        m.set_lag("persistent://t/n/gw-status", 0);
        prometheus_client::encoding::text::encode(&mut text, &m.registry(None)).unwrap();
        assert!(!text.contains("applied"), "{text}");
        assert!(
            text.contains("ferry_fleet_view_lag_messages{topic=\"persistent://t/n/gw-status\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn the_backlog_is_the_subscriptions_own() {
        let stats = serde_json::json!({
            "msgInCounter": 10,
            "subscriptions": {
                "view": {"msgBacklog": 3, "consumers": []},
                "other": {"msgBacklog": 9}
            }
        });
        assert_eq!(backlog_of(&stats, "view"), Some(3));
        assert_eq!(backlog_of(&stats, "nope"), None);
        assert_eq!(backlog_of(&serde_json::json!({}), "view"), None);
        assert_eq!(
            stats_path("persistent://iot/fleet/gw-1-status"),
            "persistent/iot/fleet/gw-1-status/stats"
        );
    }
}
