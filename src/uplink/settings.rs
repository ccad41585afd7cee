//! What one uplink session (one destination topic) is configured with: the
//! broker, TLS and token source from `[pulsar]`, the topic and its stable
//! producer name from the layout, and the `[uplink]` section as it is.

use std::time::Duration;

use super::conn::{self, Endpoint};
use crate::config::{Config, TlsConfig, TokenSource, UplinkConfig};
use crate::layout::{DestIx, Layout};

/// Settings of one uplink session (one destination topic), from the
/// configuration.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    /// The destination in the store.
    pub dest: DestIx,
    /// Status topics drain first; the others wait for them.
    pub drains_first: bool,
    pub gateway_id: String,
    pub service: Endpoint,
    pub tls: Option<TlsConfig>,
    pub auth: Option<TokenSource>,
    pub topic: String,
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
        let topic = layout.dests[dest].topic.clone();
        UplinkSettings {
            dest,
            drains_first: layout.dests[dest].role.drains_first(),
            gateway_id: cfg.gateway_id.clone(),
            service: Endpoint {
                host: cfg.pulsar.host.clone(),
                port: cfg.pulsar.port,
                tls: cfg.pulsar.tls.is_some(),
            },
            tls: cfg.pulsar.tls.clone(),
            auth: cfg.pulsar.auth.clone(),
            producer_name: producer_name(&cfg.gateway_id, &topic),
            topic,
            uplink: cfg.uplink.clone(),
        }
    }

    /// Settings for reading `topic` (the downlink): the same broker, TLS,
    /// token and `[uplink]` section as the producers.
    pub fn for_topic(cfg: &Config, topic: &str) -> UplinkSettings {
        UplinkSettings {
            dest: 0,
            drains_first: false,
            gateway_id: cfg.gateway_id.clone(),
            service: Endpoint {
                host: cfg.pulsar.host.clone(),
                port: cfg.pulsar.port,
                tls: cfg.pulsar.tls.is_some(),
            },
            tls: cfg.pulsar.tls.clone(),
            auth: cfg.pulsar.auth.clone(),
            producer_name: producer_name(&cfg.gateway_id, topic),
            topic: topic.to_string(),
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
        let all = UplinkSettings::from_config(&cfg, &Layout::new(&cfg.streams));
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
