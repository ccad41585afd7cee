//! The MQTT side of the downlink: publishes each device's desired state to
//! the local broker, retained, QoS 1, on a connection of its own (client id
//! `<mqtt.client_id>-downlink`, persistent session), and reports the
//! broker's PUBACKs to the store, which records the applied versions and
//! their acknowledgements in one transaction. When the broker comes back
//! without ferry's session (it lost its state), every device's desired
//! state is published again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{DownlinkConfig, MqttConfig, MAX_PAYLOAD_BYTES};
use crate::mqtt_events::Events;
use crate::store::db::Desired;
use crate::store::{DownlinkCommand, Inbound, StoreError, StoreHandle};

/// Publishes awaiting their PUBACK, at most.
const WINDOW: usize = 100;
/// PUBACKs go to the store in batches: after this long, or this many.
const ACK_WAIT: Duration = Duration::from_millis(20);
const ACK_BATCH: usize = 200;
/// Without news, the store is asked for work this often anyway.
const POLL: Duration = Duration::from_secs(1);

/// What the applier tracks between the store and the broker.
#[derive(Default)]
pub struct Tracker {
    /// Handed to the client, its packet id not yet known.
    awaiting_pkid: VecDeque<Desired>,
    /// Sent, awaiting the PUBACK, by packet id.
    in_flight: HashMap<u16, Desired>,
    /// Acknowledged by the broker, not yet stored as applied.
    acked: Vec<Desired>,
    /// Per device, the highest version handed to the client and not yet
    /// stored as applied: the store hands it out again until then.
    queued: HashMap<String, u64>,
}

impl Tracker {
    /// How many more publishes the window takes.
    pub fn room(&self) -> usize {
        WINDOW.saturating_sub(self.awaiting_pkid.len() + self.in_flight.len())
    }

    /// Whether `d` is new to the client (not the same or an older version
    /// of what is already on its way).
    pub fn take(&mut self, d: &Desired) -> bool {
        if self.queued.get(&d.device).is_some_and(|v| *v >= d.version) {
            return false;
        }
        self.queued.insert(d.device.clone(), d.version);
        self.awaiting_pkid.push_back(d.clone());
        true
    }

    /// The client sent a PUBLISH with `pkid`: the first one awaiting it,
    /// unless it is a retransmission of one already in flight.
    pub fn sent(&mut self, pkid: u16) {
        if self.in_flight.contains_key(&pkid) {
            return;
        }
        if let Some(d) = self.awaiting_pkid.pop_front() {
            self.in_flight.insert(pkid, d);
        }
    }

    /// The broker acknowledged `pkid`.
    pub fn puback(&mut self, pkid: u16) {
        if let Some(d) = self.in_flight.remove(&pkid) {
            self.acked.push(d);
        }
    }

    pub fn take_acked(&mut self) -> Vec<Desired> {
        std::mem::take(&mut self.acked)
    }

    /// The store recorded `applied`: those devices may be handed out again.
    pub fn stored(&mut self, applied: &[Desired]) {
        for d in applied {
            if self.queued.get(&d.device).is_some_and(|v| *v <= d.version) {
                self.queued.remove(&d.device);
            }
        }
    }
}

/// Publishes desired state until shutdown; a broker that is down means
/// waiting (the store keeps everything); only a store failure ends it.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mqtt: MqttConfig,
    downlink: DownlinkConfig,
    ack_stream: usize,
    store: StoreHandle,
    stored: Arc<Notify>,
    beat: crate::notify::Beat,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    let mut opts = MqttOptions::new(
        format!("{}-downlink", mqtt.client_id),
        mqtt.host.clone(),
        mqtt.port,
    );
    opts.set_keep_alive(mqtt.keep_alive)
        .set_clean_session(false)
        .set_inflight(WINDOW as u16)
        .set_max_packet_size(64 * 1024, MAX_PAYLOAD_BYTES + 64 * 1024);
    let (client, eventloop) = AsyncClient::new(opts, WINDOW);
    let mut events = Events::start(eventloop, WINDOW);
    let mut t = Tracker::default();
    let mut connected = false;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut poll = tokio::time::interval(POLL);
    let mut beats = tokio::time::interval(crate::notify::BEAT_EVERY);
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        let flush_due = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut fill = false;
        tokio::select! {
            _ = shutdown.cancelled() => {
                let acked = t.take_acked();
                apply(&store, &downlink, ack_stream, &acked, &metrics).await?;
                let _ = client.try_disconnect();
                return Ok(());
            }
            ev = events.next() => match ev {
                None => return Ok(()),
                Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    connected = true;
                    backoff.reset();
                    if !ack.session_present {
                        let n = store.downlink(|reply| DownlinkCommand::Forgotten { reply }).await?;
                        tracing::info!(devices = n,
                            "the mqtt broker has no session of the downlink (new, or it lost its state): publishing every device's desired state again");
                    }
                    fill = true;
                }
                Some(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    t.puback(a.pkid);
                    if flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + ACK_WAIT);
                    }
                    if t.acked.len() >= ACK_BATCH {
                        flush_at = Some(tokio::time::Instant::now());
                    }
                }
                Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => t.sent(pkid),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    connected = false;
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                        "downlink's mqtt connection lost; desired state waits in the store");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    events.retry();
                }
            },
            _ = flush_due => {
                flush_at = None;
                let acked = t.take_acked();
                apply(&store, &downlink, ack_stream, &acked, &metrics).await?;
                t.stored(&acked);
                fill = true;
            }
            _ = stored.notified() => fill = true,
            _ = poll.tick() => fill = true,
            _ = beats.tick() => beat.tick(),
        }
        if fill && connected && t.room() > 0 {
            let limit = t.room() + t.queued.len();
            let pending = store
                .downlink(|reply| DownlinkCommand::Pending { limit, reply })
                .await?;
            for d in pending {
                if t.room() == 0 {
                    break;
                }
                if !t.take(&d) {
                    continue;
                }
                let topic = downlink.mqtt_topic_for(&d.device);
                // The request channel holds a window's worth: this waits
                // only while the event loop is busy.
                if client
                    .publish(topic, QoS::AtLeastOnce, true, d.payload.clone())
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                metrics.downlink_published.inc();
            }
        }
    }
}

/// Tells the store what the broker acknowledged, each with its
/// acknowledgement record (stored only for a version newly applied).
async fn apply(
    store: &StoreHandle,
    downlink: &DownlinkConfig,
    ack_stream: usize,
    acked: &[Desired],
    metrics: &crate::metrics::Metrics,
) -> Result<(), StoreError> {
    if acked.is_empty() {
        return Ok(());
    }
    let applied_at = crate::status::now_ms();
    let applied: Vec<(Desired, Inbound)> = acked
        .iter()
        .map(|d| (d.clone(), ack_record(downlink, ack_stream, d, applied_at)))
        .collect();
    let n = store
        .downlink(|reply| DownlinkCommand::Applied { applied, reply })
        .await?;
    metrics.downlink_applied.inc_by(n);
    Ok(())
}

/// The acknowledgement of one applied version, as a record of the
/// acknowledgement stream: `{"device", "version", "applied_at"}` (ms since
/// the epoch, the gateway's clock), keyed by the device.
pub fn ack_record(
    downlink: &DownlinkConfig,
    ack_stream: usize,
    d: &Desired,
    applied_at: u64,
) -> Inbound {
    let payload = serde_json::json!({
        "device": d.device,
        "version": d.version,
        "applied_at": applied_at,
    })
    .to_string();
    Inbound {
        mqtt_topic: downlink.mqtt_topic_for(&d.device),
        payload: bytes::Bytes::from(payload),
        retain: false,
        stream: Some(ack_stream),
        device: Some(d.device.clone()),
        dup: false,
        pkid: 0,
        ack: None,
        // Not a message ferry received.
        counted: true,
        guarded: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(device: &str, version: u64) -> Desired {
        Desired {
            device: device.into(),
            version,
            payload: Vec::new(),
        }
    }

    #[test]
    fn a_version_goes_out_once_until_it_is_stored_as_applied() {
        let mut t = Tracker::default();
        assert!(t.take(&d("a", 1)));
        assert!(
            !t.take(&d("a", 1)),
            "the store hands it out again meanwhile"
        );
        assert!(t.take(&d("a", 2)), "a newer version follows it");
        t.sent(7);
        t.sent(8);
        // A retransmission after a reconnect keeps its packet id.
        t.sent(7);
        t.puback(8);
        t.puback(7);
        t.puback(7);
        let acked = t.take_acked();
        assert_eq!(acked, [d("a", 2), d("a", 1)]);
        t.stored(&acked);
        assert!(
            t.take(&d("a", 2)),
            "stored: handed out again if the store says so"
        );
    }

    #[test]
    fn the_window_counts_what_awaits_its_packet_id_and_its_puback() {
        let mut t = Tracker::default();
        for i in 0..WINDOW {
            assert!(t.take(&d(&format!("d{i}"), 1)));
        }
        assert_eq!(t.room(), 0);
        t.sent(1);
        assert_eq!(t.room(), 0);
        t.puback(1);
        assert_eq!(t.room(), 1);
    }

    #[test]
    fn an_acknowledgement_names_device_version_and_time() {
        let cfg = DownlinkConfig {
            topic: "persistent://t/n/desired".into(),
            mqtt_topic: "devices/{device}/desired".into(),
            ack_topic: "persistent://t/n/acks".into(),
        };
        let r = ack_record(&cfg, 3, &d("pump-1", 9), 1_700_000_000_000);
        assert_eq!(r.stream, Some(3));
        assert_eq!(r.device.as_deref(), Some("pump-1"));
        assert_eq!(r.mqtt_topic, "devices/pump-1/desired");
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"device": "pump-1", "version": 9, "applied_at": 1_700_000_000_000u64})
        );
    }
}
