//! `ferry check`: what an installer wants to know before starting the
//! service. Offline: the configuration and the permissions of secret files.
//! Online (`--online`): that the MQTT broker accepts a connection and that
//! Pulsar accepts TLS, the token, the topic lookup and a producer on every
//! topic ferry writes, and a reader on the desired topic ferry reads.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

use crate::config::{Config, TokenSource};
use crate::layout::Layout;
use crate::uplink::{self, auth, UplinkSettings};

/// Secret files that others can read, and token files ferry cannot use (a
/// device, a FIFO, a file over 64 KiB), as warnings.
pub fn secret_file_warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for c in &cfg.pulsar.clusters {
        if let Some(TokenSource::File(p)) = &c.auth {
            match auth::token_file_problem(p) {
                Some(problem) => out.push(problem),
                None => out.extend(auth::permission_warning("token file", p)),
            }
        }
        if let Some((_, key)) = c.tls.as_ref().and_then(|t| t.client_cert.as_ref()) {
            out.extend(auth::permission_warning("TLS key file", key));
        }
    }
    out
}

/// One line of the online report.
#[derive(Debug)]
pub struct Probe {
    pub what: &'static str,
    pub result: Result<String, String>,
}

/// Connects to both brokers (every Pulsar cluster) as ferry would, without
/// disturbing a running ferry (other client id and producer name).
pub async fn online(cfg: &Config) -> Vec<Probe> {
    vec![Probe {
        what: "mqtt",
        result: probe_mqtt(cfg).await,
    }]
    .into_iter()
    .chain(
        futures::future::join_all(
            UplinkSettings::from_config(cfg, &Layout::for_config(cfg))
                .into_iter()
                .map(|s| async move {
                    Probe {
                        what: "pulsar",
                        result: probe_pulsar(&s).await,
                    }
                }),
        )
        .await,
    )
    .chain(match &cfg.downlink {
        // The desired topic, on every cluster.
        Some(d) => {
            futures::future::join_all((0..cfg.pulsar.clusters.len()).map(|c| async move {
                Probe {
                    what: "pulsar",
                    result: probe_reader(&UplinkSettings::for_topic_on(cfg, c, &d.topic)).await,
                }
            }))
            .await
        }
        None => Vec::new(),
    })
    .collect()
}

/// What the running (or last) ferry learnt from the broker: a topic whose
/// broker forgot ferry's producer after confirming its records has
/// deduplication off, and exactly once is not kept there. Read from the
/// store (the broker tells only the producer ferry uses, which a check must
/// not take over from a running ferry).
pub fn deduplication(cfg: &Config) -> Vec<Probe> {
    if !cfg.store.path.is_file() {
        return Vec::new();
    }
    let Ok(report) = crate::status::read(&cfg.store.path) else {
        return Vec::new();
    };
    report
        .deduplication_off
        .iter()
        .map(|t| Probe {
            what: "pulsar",
            result: Err(format!(
                "deduplication is off on {t}: the broker forgot ferry's producer after confirming its records (exactly once is not kept); fix: pulsar-admin namespaces set-deduplication {} --enable",
                crate::status::namespace_of(t)
            )),
        })
        .collect()
}

/// The downlink's reader: lookup and a non-durable subscription (which
/// needs the `consume` permission) on the desired topic.
async fn probe_reader(s: &UplinkSettings) -> Result<String, String> {
    probe_reader_inner(s).await.map_err(|e| e.to_string())
}

async fn probe_reader_inner(s: &UplinkSettings) -> Result<String, uplink::UplinkError> {
    use uplink::link::subscribe;
    use uplink::protocol::SubscribeOptions;

    let mut proto = uplink::Protocol::new(s.auth.is_some(), &s.topic).for_reading();
    let mut conn = uplink::connect_to_topic(s, &mut proto).await?;
    let options = SubscribeOptions {
        name: format!("ferry-{}-desired-check", s.gateway_id),
        durable: false,
        read_compacted: true,
        ..SubscribeOptions::default()
    };
    subscribe(&mut conn, &mut proto, s, 1, options).await?;
    Ok(format!(
        "broker {}; reader accepted on {} (the downlink)",
        conn.endpoint, s.topic
    ))
}

async fn probe_mqtt(cfg: &Config) -> Result<String, String> {
    let m = &cfg.mqtt;
    let mut opts = MqttOptions::new(format!("{}-check", m.client_id), m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let addr = format!("{}:{}", m.host, m.port);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 10 s".into()));
    let _ = client.try_disconnect();
    connected
        .map(|()| format!("connected to {addr}"))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))
}

async fn probe_pulsar(s: &UplinkSettings) -> Result<String, String> {
    let mut proto = uplink::Protocol::new(s.auth.is_some(), &s.topic);
    let mut conn = uplink::connect_to_topic(s, &mut proto)
        .await
        .map_err(|e| e.to_string())?;
    let name = format!("{}-check", s.producer_name);
    uplink::create_producer(&mut conn, &mut proto, s, &name)
        .await
        .map_err(|e| e.to_string())?;
    let mut how = vec![if s.service.tls {
        "TLS verified".to_string()
    } else {
        "plain TCP".to_string()
    }];
    if let Some(src) = &s.auth {
        let token = auth::read_async(src, s.uplink.operation_timeout)
            .await
            .map_err(|e| e.to_string())?;
        how.push(format!(
            "token from {} accepted{}",
            auth::describe(src),
            token
                .role()
                .map(|r| format!(" (role {r})"))
                .unwrap_or_default()
        ));
    }
    Ok(format!(
        "broker {} ({}); producer accepted on {}",
        conn.endpoint,
        how.join(", "),
        s.topic
    ))
}
