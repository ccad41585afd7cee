//! `ferry-fleet gateway-config`: a complete `ferry.toml` for one gateway of
//! the fleet, which `ferry check` accepts as it is.
//!
//! From fleet.toml it takes the gateway id, the Pulsar service URL and the
//! gateway's topics ([`FleetConfig::topic`]): a `status` stream (state,
//! coalesced) to its status topic with its history topic, and the downlink
//! from its desired topic with acknowledgements to its desired-acks topic.
//! The rest are the agent's defaults for a gateway whose devices publish to
//! the local Mosquitto at `devices/<id>/state`; the installer edits what
//! differs. The files the gateway needs sit at fixed places under
//! `/etc/ferry`: the token ([`TOKEN_FILE`], from `ferry-fleet token`) and,
//! for a TLS service URL, the CA ([`CA_FILE`], a copy of fleet.toml's
//! `pulsar.ca_file`; the system's roots when the fleet names none).

use crate::config::{FleetConfig, TopicRole};

/// Where the gateway keeps its Pulsar token.
pub const TOKEN_FILE: &str = "/etc/ferry/pulsar.token";
/// Where the gateway keeps the CA of the brokers' certificates.
pub const CA_FILE: &str = "/etc/ferry/pulsar-ca.pem";

#[derive(Debug, thiserror::Error)]
pub enum GatewayConfigError {
    #[error("gateway {0} is not in fleet.toml")]
    UnknownGateway(String),
}

/// A TOML basic string (quotes and escapes).
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The `ferry.toml` of `gateway`.
pub fn render(config: &FleetConfig, gateway: &str) -> Result<String, GatewayConfigError> {
    if !config.gateways.iter().any(|g| g == gateway) {
        return Err(GatewayConfigError::UnknownGateway(
            gateway.escape_debug().to_string(),
        ));
    }
    let topic = |role| quoted(&config.topic(gateway, role));
    let service_url = &config.pulsar.service_url;
    let tls = if service_url.starts_with("pulsar+ssl://") {
        if config.pulsar.ca_file.is_some() {
            format!(
                "\n[pulsar.tls]\n# A copy of the CA that signed the brokers' certificates.\nca_file = {}\n",
                quoted(CA_FILE)
            )
        } else {
            "\n[pulsar.tls]\n# The brokers' certificates chain to a public CA.\nuse_system_roots = true\n"
                .to_string()
        }
    } else {
        String::new()
    };
    Ok(format!(
        r#"# ferry.toml of gateway {gateway}, written by `ferry-fleet gateway-config`
# for namespace {namespace}. Before starting ferry: put the gateway's token
# (`ferry-fleet token {gateway} --ttl ...`) in {TOKEN_FILE} (mode 0600,
# owner ferry){ca_note}, then run
# `ferry check --online --config /etc/ferry/ferry.toml`.

gateway_id = {gateway_q}

[mqtt]
# The gateway's local broker.
host = "127.0.0.1"
port = 1883
keep_alive_secs = 30

[pulsar]
service_url = {service_url_q}
{tls}
[pulsar.auth]
token_file = {token_file}

# Each device publishes its state to devices/<device id>/state (QoS 1).
[[streams]]
name = "status"
kind = "state"
topic = {status}
history_topic = {history}
overflow = "coalesce"
max_records = 200000
subscriptions = [{{ filter = "devices/+/state", device_id_level = 1 }}]

# Events (every one, in order) go to the gateway's events topic:
# [[streams]]
# name = "events"
# kind = "events"
# topic = {events}
# overflow = "drop-oldest"
# max_records = 50000
# subscriptions = [{{ filter = "devices/+/events", device_id_level = 1 }}]

# Desired state from the fleet, published retained to devices/<id>/desired.
[downlink]
topic = {desired}
ack_topic = {acks}
mqtt_topic = "devices/{{device}}/desired"

[store]
path = "/var/lib/ferry/ferry.db"
durability = "full"

[metrics]
listen = "127.0.0.1:9464"
"#,
        namespace = config.namespace(),
        gateway_q = quoted(gateway),
        ca_note = if tls.contains("ca_file") {
            format!(" and the brokers' CA in {CA_FILE}")
        } else {
            String::new()
        },
        service_url_q = quoted(service_url),
        token_file = quoted(TOKEN_FILE),
        status = topic(TopicRole::Status),
        history = topic(TopicRole::History),
        events = topic(TopicRole::Events),
        desired = topic(TopicRole::Desired),
        acks = topic(TopicRole::DesiredAcks),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fleet(service_url: &str, ca: bool) -> FleetConfig {
        crate::config::parse(&format!(
            "[pulsar]\nservice_url = \"{service_url}\"\nadmin_url = \"https://h:8443\"\n{}\
             [namespace]\ntenant = \"iot\"\nname = \"fleet\"\n\
             [[gateways]]\nid = \"gw-0001\"\n[[gateways]]\nid = \"gw-0002\"\n[[gateways]]\nid = \"gw_3.x\"\n",
            if ca { "ca_file = \"/etc/ferry-fleet/ca.pem\"\n" } else { "" }
        ))
        .unwrap()
    }

    #[test]
    fn ferry_accepts_the_config_of_every_gateway() {
        for (url, ca) in [
            ("pulsar+ssl://pulsar.example.com:6651", true),
            ("pulsar+ssl://pulsar.example.com:6651", false),
            ("pulsar://pulsar.example.com:6650", false),
        ] {
            let fleet = fleet(url, ca);
            for gateway in &fleet.gateways {
                let text = render(&fleet, gateway).unwrap();
                let c = ferry::config::parse(&text)
                    .unwrap_or_else(|e| panic!("{url} {gateway}: {e:#?}\n{text}"));
                assert_eq!(&c.gateway_id, gateway);
                assert_eq!(c.pulsar.first().service_url, url);
                let status = &c.streams[0];
                assert_eq!(status.name, "status");
                assert_eq!(status.topic, fleet.topic(gateway, TopicRole::Status));
                assert_eq!(
                    status.history_topic.as_deref(),
                    Some(fleet.topic(gateway, TopicRole::History).as_str())
                );
                let downlink = c.downlink.as_ref().unwrap();
                assert_eq!(downlink.topic, fleet.topic(gateway, TopicRole::Desired));
                assert_eq!(
                    downlink.ack_topic,
                    fleet.topic(gateway, TopicRole::DesiredAcks)
                );
                assert_eq!(
                    c.pulsar.first().auth,
                    Some(ferry::config::TokenSource::File(PathBuf::from(TOKEN_FILE)))
                );
                assert_eq!((c.mqtt.host.as_str(), c.mqtt.port), ("127.0.0.1", 1883));
                match (&c.pulsar.first().tls, url.starts_with("pulsar+ssl"), ca) {
                    (None, false, _) => {}
                    (Some(tls), true, true) => {
                        assert_eq!(tls.ca_file, Some(PathBuf::from(CA_FILE)));
                    }
                    (Some(tls), true, false) => {
                        assert!(tls.use_system_roots && tls.ca_file.is_none());
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_gateway_not_in_the_fleet_gets_no_config() {
        let err = render(&fleet("pulsar://h:6650", false), "gw-9").unwrap_err();
        assert_eq!(err.to_string(), "gateway gw-9 is not in fleet.toml");
    }
}
