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
//! `pulsar.ca_file`; the system's roots when the fleet names none). With
//! `[[pulsar.clusters]]` the gateway writes to each of them: one
//! `[[pulsar.clusters]]` each, with its own CA copy ([`ca_file_of`]) and
//! the same token (every cluster trusts the fleet's signing key).

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

/// Where the gateway keeps the CA of cluster `name`'s brokers.
pub fn ca_file_of(name: &str) -> String {
    format!("/etc/ferry/pulsar-ca-{name}.pem")
}

/// The TLS settings of a cluster, as the agent's inline table or section
/// body, and the CA file it needs (if any).
fn tls_of(pulsar: &crate::config::PulsarConfig, ca_file: &str) -> Option<(String, Option<String>)> {
    if !pulsar.service_url.starts_with("pulsar+ssl://") {
        return None;
    }
    Some(match pulsar.ca_file {
        Some(_) => (
            format!("ca_file = {}", quoted(ca_file)),
            Some(ca_file.to_string()),
        ),
        None => ("use_system_roots = true".to_string(), None),
    })
}

/// The `[pulsar]` part: the plain form for one cluster without a name,
/// else one `[[pulsar.clusters]]` per cluster. With the CA files it needs.
fn pulsar_part(config: &FleetConfig) -> (String, Vec<String>) {
    let token = quoted(TOKEN_FILE);
    if config.cluster_names().is_empty() {
        let p = &config.pulsar;
        let mut out = format!("[pulsar]\nservice_url = {}\n", quoted(&p.service_url));
        let mut cas = Vec::new();
        if let Some((tls, ca)) = tls_of(p, CA_FILE) {
            let why = if ca.is_some() {
                "# A copy of the CA that signed the brokers' certificates."
            } else {
                "# The brokers' certificates chain to a public CA."
            };
            out.push_str(&format!("\n[pulsar.tls]\n{why}\n{tls}\n"));
            cas.extend(ca);
        }
        out.push_str(&format!("\n[pulsar.auth]\ntoken_file = {token}\n"));
        return (out, cas);
    }
    let mut out =
        String::from("# Every record goes to each cluster (region), exactly once in each.\n");
    let mut cas = Vec::new();
    for c in &config.clusters {
        out.push_str(&format!(
            "[[pulsar.clusters]]\nname = {}\nservice_url = {}\n",
            quoted(&c.name),
            quoted(&c.pulsar.service_url)
        ));
        if let Some((tls, ca)) = tls_of(&c.pulsar, &ca_file_of(&c.name)) {
            out.push_str(&format!("tls = {{ {tls} }}\n"));
            cas.extend(ca);
        }
        out.push_str(&format!("auth = {{ token_file = {token} }}\n\n"));
    }
    (out.trim_end().to_string() + "\n", cas)
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
    let (pulsar, cas) = pulsar_part(config);
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

{pulsar}
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
        ca_note = match cas.as_slice() {
            [] => String::new(),
            [one] => format!(" and the brokers' CA in {one}"),
            many => format!(" and each cluster's CA in {}", many.join(", ")),
        },
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
    fn a_gateway_of_a_fleet_in_two_regions_writes_to_both() {
        let fleet = crate::config::parse(
            "[[pulsar.clusters]]\nname = \"east\"\nservice_url = \"pulsar+ssl://east:6651\"\n\
             admin_url = \"https://east:8443\"\nca_file = \"/etc/ferry-fleet/east-ca.pem\"\n\
             [[pulsar.clusters]]\nname = \"west\"\nservice_url = \"pulsar://west:6650\"\n\
             admin_url = \"http://west:8080\"\n\
             [namespace]\ntenant = \"iot\"\nname = \"fleet\"\n[[gateways]]\nid = \"gw-0001\"\n",
        )
        .unwrap();
        let text = render(&fleet, "gw-0001").unwrap();
        let c = ferry::config::parse(&text).unwrap_or_else(|e| panic!("{e:#?}\n{text}"));
        let got: Vec<(&str, &str)> = c
            .pulsar
            .clusters
            .iter()
            .map(|k| (k.name.as_str(), k.service_url.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("east", "pulsar+ssl://east:6651"),
                ("west", "pulsar://west:6650")
            ]
        );
        let east = &c.pulsar.clusters[0];
        assert_eq!(
            east.tls.as_ref().unwrap().ca_file,
            Some(PathBuf::from(ca_file_of("east")))
        );
        assert!(c.pulsar.clusters[1].tls.is_none());
        for k in &c.pulsar.clusters {
            assert_eq!(
                k.auth,
                Some(ferry::config::TokenSource::File(PathBuf::from(TOKEN_FILE)))
            );
        }
        assert!(
            text.contains("the brokers' CA in /etc/ferry/pulsar-ca-east.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_gateway_not_in_the_fleet_gets_no_config() {
        let err = render(&fleet("pulsar://h:6650", false), "gw-9").unwrap_err();
        assert_eq!(err.to_string(), "gateway gw-9 is not in fleet.toml");
    }
}
