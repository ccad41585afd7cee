//! The MQTT side of the downlink: publishes each device's desired state to
//! the local broker, retained, QoS 1, on a connection of its own (client id
//! `<mqtt.client_id>-downlink`, persistent session), and reports the
//! broker's PUBACKs to the store, which records the applied versions and
//! their acknowledgements in one transaction. When the broker comes back
//! without ferry's session (it lost its state), every device's desired
//! state is published again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
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

/// Publishes awaiting their PUBACK, at most (rumqttc's in-flight limit and
/// its request channel are this large, so handing one over never waits).
const WINDOW: usize = 1_000;
/// PUBACKs refill the window once this much of it is free (one store query
/// per this many publishes), or when it is empty.
const REFILL_STEP: usize = 100;
/// PUBACKs go to the store in batches, one batch at a time (the next one
/// gathers while the store commits): at once when this many wait, else
/// this long after the first.
const ACK_BATCH: usize = 500;
const ACK_WAIT: Duration = Duration::from_millis(10);
/// Without news, the store is asked for work this often anyway.
const POLL: Duration = Duration::from_secs(1);
/// Unsubscribed from (never subscribed) after a session loss: its
/// UNSUBSCRIBE goes out after every publish the client still held.
const MARKER_FILTER: &str = "$ferry/downlink-marker";

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
    /// The store's pending states are read in pages by device; the last
    /// device looked at (`None`: the next page starts from the first).
    cursor: Option<String>,
    /// Whether the current pass through the pending states began at the
    /// first device (then its end means everything was looked at).
    from_start: bool,
    /// Whether the store may hold states to publish that the tracker has
    /// not looked at: set by news (something stored, the broker forgot, a
    /// reconnect, the poll), cleared by a pass that ended with room left.
    more: bool,
    /// The broker lost the session: publishes handed to the client for it
    /// may still go out (the client sends what was still in its request
    /// channel), with packet ids that mean nothing to the tracker. Until
    /// the marker sent after them passes ([`Tracker::marker_passed`]), no
    /// packet id is taken and nothing new is handed out.
    stale: bool,
}

impl Tracker {
    /// How many more publishes the window takes.
    pub fn room(&self) -> usize {
        WINDOW.saturating_sub(self.awaiting_pkid.len() + self.in_flight.len())
    }

    /// Whether `d` is new to the client (not the same or an older version
    /// of what is already on its way); if it is, it is on its way now.
    pub fn take(&mut self, d: &Desired) -> bool {
        if self.queued.get(&d.device).is_some_and(|v| *v >= d.version) {
            return false;
        }
        self.queued.insert(d.device.clone(), d.version);
        // The payload goes to the client, not here.
        self.awaiting_pkid.push_back(Desired {
            device: d.device.clone(),
            version: d.version,
            payload: Vec::new(),
        });
        true
    }

    /// The store may hold something new to publish, maybe before the
    /// cursor: the pass under way no longer covers everything.
    pub fn news(&mut self) {
        self.more = true;
        self.from_start = false;
    }

    /// Whether to ask the store for a page now: it may hold more, and the
    /// window has a refill's worth of room (or is empty: nothing in flight
    /// would bring a PUBACK to ask again).
    pub fn wants_page(&self) -> bool {
        let room = self.room();
        !self.stale && self.more && room > 0 && (room >= REFILL_STEP || room == WINDOW)
    }

    /// The broker lost the session (a CONNACK without it): what was in
    /// flight or awaiting its packet id will never be acknowledged in a way
    /// the tracker can tell apart, so it is forgotten (the store publishes
    /// every device's state again), and packet ids mean nothing until the
    /// marker passes. Acknowledged versions stay, to be stored.
    pub fn session_lost(&mut self) {
        for d in self
            .awaiting_pkid
            .drain(..)
            .chain(self.in_flight.drain().map(|(_, d)| d))
        {
            if self.queued.get(&d.device).is_some_and(|v| *v <= d.version) {
                self.queued.remove(&d.device);
            }
        }
        self.stale = true;
        self.news();
    }

    /// The marker sent after a session loss went out: every publish of the
    /// lost session did too; packet ids mean what they say again.
    pub fn marker_passed(&mut self) {
        self.stale = false;
    }

    /// The page to ask the store for: pending states after which device,
    /// and how many.
    pub fn page_request(&mut self) -> (Option<String>, usize) {
        if self.cursor.is_none() {
            self.from_start = true;
        }
        (self.cursor.clone(), self.room())
    }

    /// Takes what it can of a page the store answered `page_request` with
    /// (`asked` at most), in device order, and returns what to publish. The
    /// cursor moves past what was looked at; a short page is the end of the
    /// pass: the next starts from the first device, and a pass that began
    /// there looked at everything (nothing more until news).
    pub fn page(&mut self, page: Vec<Desired>, asked: usize) -> Vec<Desired> {
        let end = page.len() < asked;
        let mut out = Vec::new();
        for d in page {
            if self.room() == 0 {
                return out;
            }
            self.cursor = Some(d.device.clone());
            if self.take(&d) {
                out.push(d);
            }
        }
        if end && self.room() > 0 {
            self.cursor = None;
            if self.from_start {
                self.more = false;
            }
            self.from_start = false;
        }
        out
    }

    /// The client sent a PUBLISH with `pkid`: the first one awaiting it,
    /// unless it is a retransmission of one already in flight.
    pub fn sent(&mut self, pkid: u16) {
        if self.stale || self.in_flight.contains_key(&pkid) {
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

    /// How many acknowledged versions wait to be stored as applied.
    pub fn acked(&self) -> usize {
        self.acked.len()
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

/// A batch of acknowledged versions being stored as applied: the batch,
/// and how many were newly applied.
type Flush = Pin<Box<dyn Future<Output = Result<(Vec<Desired>, u64), StoreError>> + Send>>;

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
    let mut flushing: Option<Flush> = None;
    loop {
        let flush_due = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let flushed = async {
            match flushing.as_mut() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        let mut flush_now = false;
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(f) = flushing.take() {
                    let (_, n) = f.await?;
                    metrics.downlink_applied.inc_by(n);
                }
                let acked = t.take_acked();
                let n = apply(&store, &downlink, ack_stream, &acked).await?;
                metrics.downlink_applied.inc_by(n);
                let _ = client.try_disconnect();
                return Ok(());
            }
            done = flushed => {
                flushing = None;
                let (acked, n) = done?;
                metrics.downlink_applied.inc_by(n);
                t.stored(&acked);
                // What gathered meanwhile goes next if it is a batch.
                flush_now = t.acked() >= ACK_BATCH;
            }
            ev = events.next() => match ev {
                None => return Ok(()),
                Some(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    connected = true;
                    backoff.reset();
                    if !ack.session_present {
                        // PUBACKs of the lost session are stored first, so
                        // they cannot clear the republication asked next.
                        if let Some(f) = flushing.take() {
                            let (acked, n) = f.await?;
                            metrics.downlink_applied.inc_by(n);
                            t.stored(&acked);
                        }
                        let acked = t.take_acked();
                        let n = apply(&store, &downlink, ack_stream, &acked).await?;
                        metrics.downlink_applied.inc_by(n);
                        t.stored(&acked);
                        flush_at = None;
                        let n = store.downlink(|reply| DownlinkCommand::Forgotten { reply }).await?;
                        tracing::info!(devices = n,
                            "the mqtt broker has no session of the downlink (new, or it lost its state): publishing every device's desired state again");
                        // Publishes of the lost session may still go out;
                        // the marker tells when they all did.
                        t.session_lost();
                        if client.unsubscribe(MARKER_FILTER).await.is_err() {
                            return Ok(());
                        }
                    }
                    t.news();
                }
                Some(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    t.puback(a.pkid);
                    flush_now = t.acked() >= ACK_BATCH;
                }
                Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => t.sent(pkid),
                Some(Ok(Event::Outgoing(Outgoing::Unsubscribe(_)))) => t.marker_passed(),
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
            _ = flush_due => flush_now = true,
            _ = stored.notified() => t.news(),
            _ = poll.tick() => t.news(),
            _ = beats.tick() => beat.tick(),
        }
        // One batch is stored at a time; while it is, the next gathers
        // (its completion looks again), else a timer bounds the wait.
        if flushing.is_none() && t.acked() > 0 {
            if flush_now {
                flush_at = None;
                let acked = t.take_acked();
                let (store, downlink) = (store.clone(), downlink.clone());
                flushing = Some(Box::pin(async move {
                    let n = apply(&store, &downlink, ack_stream, &acked).await?;
                    Ok((acked, n))
                }));
            } else if flush_at.is_none() {
                flush_at = Some(tokio::time::Instant::now() + ACK_WAIT);
            }
        } else {
            flush_at = None;
        }
        while connected && t.wants_page() {
            let (after, limit) = t.page_request();
            let page = store
                .downlink(|reply| DownlinkCommand::Pending {
                    after,
                    limit,
                    reply,
                })
                .await?;
            for d in t.page(page, limit) {
                let topic = downlink.mqtt_topic_for(&d.device);
                // The request channel holds a window's worth: this never
                // waits.
                if client
                    .publish(topic, QoS::AtLeastOnce, true, d.payload)
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
) -> Result<u64, StoreError> {
    if acked.is_empty() {
        return Ok(0);
    }
    let applied_at = crate::status::now_ms();
    let applied: Vec<(Desired, Inbound)> = acked
        .iter()
        .map(|d| (d.clone(), ack_record(downlink, ack_stream, d, applied_at)))
        .collect();
    store
        .downlink(|reply| DownlinkCommand::Applied { applied, reply })
        .await
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
        session: 0,
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

    /// Pending states as the store lists them: by device, after `after`.
    fn store_page(pending: &[Desired], after: Option<String>, limit: usize) -> Vec<Desired> {
        pending
            .iter()
            .filter(|d| after.as_ref().map_or(true, |a| d.device > *a))
            .take(limit)
            .cloned()
            .collect()
    }

    fn devices(ds: &[Desired]) -> Vec<&str> {
        ds.iter().map(|d| d.device.as_str()).collect()
    }

    #[test]
    fn a_pass_from_the_first_device_that_leaves_room_ends_the_asking_until_news() {
        let mut t = Tracker::default();
        assert!(!t.wants_page(), "nothing asked before news");
        t.news();
        assert!(t.wants_page());
        let store = [d("a", 1), d("b", 1)];
        let (after, limit) = t.page_request();
        assert_eq!((after.as_deref(), limit), (None, WINDOW));
        let out = t.page(store_page(&store, after, limit), limit);
        assert_eq!(devices(&out), ["a", "b"]);
        assert!(!t.wants_page(), "everything was looked at");
        t.news();
        let (after, limit) = t.page_request();
        assert_eq!(after, None, "a new pass starts from the first device");
        assert!(t.page(store_page(&store, after, limit), limit).is_empty());
        assert!(!t.wants_page());
    }

    #[test]
    fn a_full_window_keeps_the_cursor_and_the_next_pass_wraps_around() {
        let mut t = Tracker::default();
        t.news();
        let store: Vec<Desired> = (0..WINDOW + 150)
            .map(|i| d(&format!("d{i:05}"), 1))
            .collect();
        let (after, limit) = t.page_request();
        let out = t.page(store_page(&store, after, limit), limit);
        assert_eq!(out.len(), WINDOW);
        assert_eq!(t.room(), 0);
        assert!(!t.wants_page());
        // PUBACKs free a refill's worth.
        for pkid in 1..=REFILL_STEP as u16 {
            t.sent(pkid);
            t.puback(pkid);
        }
        assert!(t.wants_page(), "more may wait, and there is room");
        let (after, limit) = t.page_request();
        assert_eq!(after.as_deref(), Some("d00999"), "after the last one taken");
        let out = t.page(store_page(&store, after, limit), limit);
        assert_eq!(out.len(), REFILL_STEP, "the next ones");
        assert_eq!(out[0].device, "d01000");
        // Stored as applied: the store lists the rest, and the first ones
        // again with a newer version.
        let acked = t.take_acked();
        t.stored(&acked);
        for pkid in REFILL_STEP as u16 + 1..=2 * REFILL_STEP as u16 {
            t.sent(pkid);
            t.puback(pkid);
        }
        let mut store = store[REFILL_STEP..].to_vec();
        store.insert(0, d("d00000", 2));
        t.news();
        let (after, limit) = t.page_request();
        assert_eq!(after.as_deref(), Some("d01099"));
        let out = t.page(store_page(&store, after.clone(), limit), limit);
        assert_eq!(
            devices(&out),
            (1100..1150).map(|i| format!("d{i:05}")).collect::<Vec<_>>()
        );
        assert_eq!(t.room(), REFILL_STEP / 2);
        for pkid in 2 * REFILL_STEP as u16 + 1..=(2 * REFILL_STEP + REFILL_STEP / 2) as u16 {
            t.sent(pkid);
            t.puback(pkid);
        }
        assert!(
            t.wants_page(),
            "the pass began mid-way: it goes on from the first"
        );
        assert_eq!(t.page_request().0, None);
        assert_eq!(
            refill(&mut t, &store),
            ["d00000"],
            "the rest is on its way already"
        );
        assert!(!t.wants_page());
    }

    /// What the applier's loop publishes from `store` while it may.
    fn refill(t: &mut Tracker, store: &[Desired]) -> Vec<String> {
        let mut out = Vec::new();
        while t.wants_page() {
            let (after, limit) = t.page_request();
            for d in t.page(store_page(store, after, limit), limit) {
                out.push(d.device);
            }
        }
        out
    }

    #[test]
    fn news_during_a_pass_keeps_it_from_counting_as_complete() {
        let mut t = Tracker::default();
        t.news();
        let (after, limit) = t.page_request();
        let store = [d("b", 1)];
        // Meanwhile "a" was stored, before the cursor.
        t.news();
        t.page(store_page(&store, after, limit), limit);
        assert!(t.wants_page(), "a pass from the first device looks at it");
        let store = [d("a", 1), d("b", 1)];
        let (after, limit) = t.page_request();
        let out = t.page(store_page(&store, after, limit), limit);
        assert_eq!(devices(&out), ["a"]);
        assert!(!t.wants_page());
    }

    #[test]
    fn a_refill_waits_for_a_step_of_room_unless_the_window_is_empty() {
        let mut t = Tracker::default();
        t.news();
        assert!(t.wants_page(), "empty window");
        for i in 0..WINDOW - REFILL_STEP + 1 {
            assert!(t.take(&d(&format!("d{i}"), 1)));
        }
        assert!(!t.wants_page());
        t.sent(1);
        t.puback(1);
        assert!(t.wants_page());
    }

    #[test]
    fn after_a_session_loss_packet_ids_mean_nothing_until_the_marker_passes() {
        let mut t = Tracker::default();
        assert!(t.take(&d("a", 1)));
        assert!(t.take(&d("b", 1)));
        t.sent(7);
        // The broker lost the session: "a" (in flight) and "b" (awaiting
        // its packet id) are forgotten and may be handed out again.
        t.session_lost();
        assert_eq!(t.room(), WINDOW);
        assert!(!t.wants_page(), "nothing new before the marker");
        // The client still sends "b" in the new session; its packet id and
        // acknowledgement mean nothing.
        t.sent(1);
        t.puback(1);
        t.puback(7);
        assert_eq!(t.acked(), 0);
        t.marker_passed();
        assert!(t.wants_page());
        assert!(t.take(&d("a", 1)), "handed out again");
        assert!(t.take(&d("b", 1)));
        t.sent(2);
        t.sent(3);
        t.puback(3);
        assert_eq!(t.take_acked(), vec![d("b", 1)]);
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
