//! Ingest: device updates from the gateway's MQTT broker into the store.
//!
//! Ferry connects with a fixed client id and a persistent session
//! (`clean_session = false`), subscribes at QoS 1 and acknowledges manually:
//! a PUBACK goes out only after the store has committed the message, so the
//! broker keeps (and after any crash redelivers) everything ferry has not
//! made durable. Two tasks share the work, as rumqttc requires: one polls the
//! event loop and hands messages to the store; the other receives the store's
//! commit confirmations and sends the acks. Acking from the polling task
//! could deadlock it (rumqttc #1025).
//!
//! Acks carry the connection epoch they belong to. An ack left over from an
//! earlier connection is dropped: the broker redelivers that message with
//! the DUP flag, the store recognises it, and it is acked then. Sending the
//! stale ack instead could acknowledge a *different* message that the broker
//! sent under the reused packet id and that is not yet committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, Subscription};
use crate::store::{AckToken, Inbound, StoreError, StoreHandle};
use crate::uplink::Backoff;

/// rumqttc refuses larger incoming packets by closing the connection, which
/// would make the broker redeliver the same message forever. Ferry accepts
/// anything up to MQTT's own limit and dead-letters what is over
/// `store.max_payload_bytes` instead.
const MAX_INCOMING_PACKET: usize = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Finds the device id of a message from the first subscription whose filter
/// matches its topic.
pub fn device_id(subscriptions: &[Subscription], topic: &str) -> Option<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    subscriptions
        .iter()
        .find(|s| matches_filter(&s.filter, &levels))
        .and_then(|s| levels.get(s.device_id_level))
        .filter(|id| !id.is_empty())
        .map(|id| id.to_string())
}

fn matches_filter(filter: &str, topic: &[&str]) -> bool {
    let mut i = 0;
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" if i < topic.len() => {}
            f if i < topic.len() && topic[i] == f => {}
            _ => return false,
        }
        i += 1;
    }
    i == topic.len()
}

/// Runs ingest until `shutdown`. Messages go to `store`; the store's commit
/// confirmations arrive on `acks`.
pub async fn run(
    cfg: MqttConfig,
    store: StoreHandle,
    acks: UnboundedReceiver<AckToken>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024)
        .set_request_channel_capacity(1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let epoch = Arc::new(AtomicU64::new(0));

    let acker = tokio::spawn(send_acks(client.clone(), acks, epoch.clone()));
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let result = loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            e = eventloop.poll() => e,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                metrics.mqtt_received.inc();
                if let Err(e) = store.insert(inbound(
                    &cfg.subscriptions,
                    p,
                    epoch.load(Ordering::Acquire),
                )) {
                    break Err(e.into());
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    tracing::error!(pkid = ack.pkid, "mqtt broker refused a subscription");
                } else {
                    tracing::info!(pkid = ack.pkid, "mqtt subscribed");
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                let n = epoch.fetch_add(1, Ordering::AcqRel) + 1;
                live.mqtt_up(&addr);
                metrics.mqtt_connected.set(1);
                tracing::info!(broker = %addr, session_present = ack.session_present, epoch = n, "mqtt connected");
                // Subscribing from this task would block the loop it polls
                // if the request channel were full.
                let client = client.clone();
                let filters: Vec<String> =
                    cfg.subscriptions.iter().map(|s| s.filter.clone()).collect();
                tokio::spawn(async move {
                    for f in filters {
                        if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            tracing::warn!(filter = %f, error = %e, "mqtt subscribe failed");
                        }
                    }
                });
            }
            Ok(_) => {}
            Err(e) => {
                live.mqtt_down(&addr, e.to_string());
                if metrics.mqtt_connected.set(0) == 1 {
                    metrics.mqtt_reconnects.inc();
                }
                let delay = backoff.next_delay();
                tracing::warn!(broker = %addr, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "mqtt connection lost; the broker keeps unacknowledged messages");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    acker.abort();
    // Leave the session on the broker: what was not acked is redelivered at
    // the next start. A clean DISCONNECT keeps the persistent session.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                break;
            }
        }
    })
    .await;
    result
}

fn inbound(subscriptions: &[Subscription], p: Publish, epoch: u64) -> Inbound {
    let device = device_id(subscriptions, &p.topic);
    let ack = (p.qos != QoS::AtMostOnce).then_some(AckToken {
        pkid: p.pkid,
        epoch,
    });
    Inbound {
        device,
        dup: p.dup,
        pkid: p.pkid,
        retain: p.retain,
        mqtt_topic: p.topic,
        payload: p.payload,
        ack,
    }
}

/// Sends the PUBACK of every committed message of the current connection.
async fn send_acks(
    client: AsyncClient,
    mut acks: UnboundedReceiver<AckToken>,
    epoch: Arc<AtomicU64>,
) {
    while let Some(a) = acks.recv().await {
        if a.epoch != epoch.load(Ordering::Acquire) {
            continue;
        }
        let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
        p.pkid = a.pkid;
        if client.ack(&p).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs() -> Vec<Subscription> {
        vec![
            Subscription {
                filter: "devices/+/state".into(),
                device_id_level: 1,
            },
            Subscription {
                filter: "zigbee2mqtt/#".into(),
                device_id_level: 1,
            },
        ]
    }

    #[test]
    fn the_device_id_comes_from_the_matching_rule() {
        assert_eq!(
            device_id(&subs(), "devices/s-1/state").as_deref(),
            Some("s-1")
        );
        assert_eq!(
            device_id(&subs(), "zigbee2mqtt/lamp/availability").as_deref(),
            Some("lamp")
        );
        assert_eq!(device_id(&subs(), "devices/s-1/other"), None);
        assert_eq!(device_id(&subs(), "devices/s-1/state/x"), None);
        assert_eq!(device_id(&subs(), "zigbee2mqtt"), None);
        assert_eq!(device_id(&subs(), "devices//state"), None);
    }
}
