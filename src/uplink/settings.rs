//! What one uplink session (one destination: a topic on one cluster) is
//! configured with: the broker, TLS and token source of its cluster
//! (`[pulsar]` or one of `[[pulsar.clusters]]`), the topic, its name and
//! its stable producer name from the layout, and the `[uplink]` section as
//! it is.

use std::time::Duration;

use super::conn::{self, Endpoint};
use crate::config::{ClusterConfig, Config, TlsConfig, TokenSource, UplinkConfig};
use crate::layout::{DestIx, Layout};

/// Settings of one uplink session (one destination topic), from the
/// configuration.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// The destination in the store.
    pub dest: DestIx,
    /// Its Pulsar cluster (index in `[[pulsar.clusters]]`).
    pub cluster: usize,
    /// Status topics drain first; the others wait for them.
    pub drains_first: bool,
    pub gateway_id: String,
    pub service: Endpoint,
    pub tls: Option<TlsConfig>,
    pub auth: Option<TokenSource>,
    pub topic: String,
    /// The destination's name (the topic, with `@<cluster>` when the
    /// clusters are named): the label of its metrics, logs and status.
    pub name: String,
    /// The same on every cluster: each cluster keeps its own deduplication
    /// state for it.
    pub producer_name: String,
    /// The `[uplink]` section: the window (`max_in_flight`,
    /// `max_in_flight_bytes`: one record always goes), timeouts, backoff,
    /// `drain_timeout` (on shutdown, how long to wait for receipts).
    pub uplink: UplinkConfig,
}

impl UplinkSettings {
    /// One session's settings per destination of `layout`.
    pub fn from_config(cfg: &Config, layout: &Layout) -> Vec<UplinkSettings> {
        (0..layout.dests.len())
            .map(|d| UplinkSettings::for_dest(cfg, layout, d))
            .collect()
    }

    pub fn for_dest(cfg: &Config, layout: &Layout, dest: DestIx) -> UplinkSettings {
        let d = &layout.dests[dest];
        let mut s = UplinkSettings::on_cluster(cfg, &cfg.pulsar.clusters[d.cluster], &d.topic);
        s.dest = dest;
        s.cluster = d.cluster;
        s.drains_first = d.role.drains_first();
        s.name = d.name.clone();
        s
    }

    /// Settings for reading `topic` (the downlink) on cluster `cluster`:
    /// its broker, TLS and token, and the `[uplink]` section.
    pub fn for_topic_on(cfg: &Config, cluster: usize, topic: &str) -> UplinkSettings {
        let mut s = UplinkSettings::on_cluster(cfg, &cfg.pulsar.clusters[cluster], topic);
        s.cluster = cluster;
        s
    }

    fn on_cluster(cfg: &Config, cluster: &ClusterConfig, topic: &str) -> UplinkSettings {
        UplinkSettings {
            dest: 0,
            cluster: 0,
            drains_first: false,
            gateway_id: cfg.gateway_id.clone(),
            service: Endpoint {
                host: cluster.host.clone(),
                port: cluster.port,
                tls: cluster.tls.is_some(),
            },
            tls: cluster.tls.clone(),
            auth: cluster.auth.clone(),
            producer_name: producer_name(&cfg.gateway_id, topic),
            topic: topic.to_string(),
            name: crate::layout::dest_name(topic, &cluster.name),
            uplink: cfg.uplink.clone(),
        }
    }

    /// How this session's connections are made: TLS exactly when the
    /// service URL is `pulsar+ssl://`, `connect_timeout` for TCP and the
    /// handshake, `operation_timeout` for every write.
    pub fn conn_options(&self) -> conn::Options {
        conn::Options::new(
            self.tls.clone(),
            self.uplink.connect_timeout,
            self.uplink.operation_timeout,
        )
    }

    /// How long a request, a receipt or a token read may take.
    pub fn operation_timeout(&self) -> Duration {
        self.uplink.operation_timeout
    }
}

/// The stable producer name: the broker keys its deduplication state by it,
/// so it must be the same after every restart of the same gateway.
pub fn producer_name(gateway_id: &str, topic: &str) -> String {
    let local = topic.rsplit('/').next().unwrap_or(topic);
    format!("ferry-{gateway_id}-{local}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn producer_names_are_stable_per_gateway_and_topic() {
        assert_eq!(
            producer_name("gw-1", "persistent://public/default/device-status"),
            "ferry-gw-1-device-status"
        );
    }

    #[test]
    fn settings_carry_the_uplink_section_as_configured() {
        let text = r#"
gateway_id = "gw"
[[mqtt.subscriptions]]
filter = "devices/+/state"
device_id_level = 1
[pulsar]
service_url = "pulsar://broker.example:6650"
topic = "persistent://t/n/status"
[store]
path = "/var/lib/ferry/ferry.db"
[uplink]
max_in_flight = 7
operation_timeout_ms = 1234
"#;
        let cfg = match crate::config::parse(text) {
            Ok(cfg) => cfg,
            Err(e) => panic!("{e:?}"),
        };
        let all = UplinkSettings::from_config(&cfg, &Layout::for_config(&cfg));
        assert_eq!(all.len(), 1);
        let s = &all[0];
        assert_eq!(s.uplink, cfg.uplink);
        assert_eq!(s.uplink.max_in_flight, 7);
        assert_eq!(s.topic, "persistent://t/n/status");
        assert_eq!(s.producer_name, "ferry-gw-status");
        assert_eq!(s.service.to_string(), "broker.example:6650");
        assert!(s.drains_first);
        let o = s.conn_options();
        assert!(o.tls.is_none());
        assert_eq!(o.write_timeout, Duration::from_millis(1234));
        assert_eq!(o.connect_timeout, cfg.uplink.connect_timeout);
    }
}
