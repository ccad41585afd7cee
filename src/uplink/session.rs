//! One uplink session per destination topic: connect (LOOKUP, PRODUCER),
//! reconcile the broker's `last_sequence_id` with the store, then stream
//! the store's records in order within the window, and on any error back
//! off and start over. This is the I/O loop: every frame goes to
//! [`Protocol::handle`] (through [`step`]) and the loop acts on the
//! [`Event`]s; the window is the protocol state's [`ProducerState`].
//!
//! Each session ticks a beat of its own (see [`Uplink::session`]), and
//! [`DrainGate`] lets status topics send current state first.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use pulsar::proto::{CommandSend, KeyValue, MessageMetadata};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::error::{ErrorClass, UplinkError};
use super::frame::{self, Frame};
use super::link::{create_producer, step, PRODUCER_ID};
use super::lookup::connect_to_topic;
use super::producer::{ProducerState, Receipt};
use super::protocol::{Event, Protocol};
use super::settings::UplinkSettings;
use crate::backoff::Backoff;
use crate::store::db::forgotten_detail;
use crate::store::{Forgotten, Record, StoreHandle};

/// Ferry pings the broker this often and expects some frame within twice it.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// What an event means for an established session: the error that ends it
/// (and so reconnects), if any. A closed producer reconnects at once
/// (`backoff_min`).
pub fn ends_session(event: &Event) -> Option<UplinkError> {
    match event {
        Event::ProducerClosed { producer_id } if *producer_id == PRODUCER_ID => {
            Some(UplinkError::ProducerClosed)
        }
        _ => None,
    }
}

/// How a session ended without an error.
enum SessionEnd {
    Shutdown,
}

/// Status topics get this long after a (re)connect to send each device's
/// current state before history and events topics start sending anyway.
const PRIORITY_WAIT: Duration = Duration::from_secs(30);

/// Lets history and events sessions wait until every status topic of their
/// Pulsar cluster has sent its backlog, so that after an outage the fleet
/// sees current state first (a cluster that is dark holds back no other).
#[derive(Clone)]
pub struct DrainGate {
    /// Per session: true while a status session has not caught up.
    behind: std::sync::Arc<watch::Sender<Vec<bool>>>,
    /// Per session: its cluster.
    clusters: std::sync::Arc<Vec<usize>>,
}

impl DrainGate {
    /// `clusters`: each session's cluster.
    pub fn new(clusters: Vec<usize>) -> DrainGate {
        DrainGate {
            behind: std::sync::Arc::new(watch::channel(vec![false; clusters.len()]).0),
            clusters: std::sync::Arc::new(clusters),
        }
    }

    pub(super) fn set(&self, session: usize, behind: bool) {
        self.behind.send_if_modified(|v| {
            let changed = v[session] != behind;
            v[session] = behind;
            changed
        });
    }

    /// No status session of `cluster` is behind.
    pub(super) fn open(&self, cluster: usize) -> bool {
        !self
            .behind
            .borrow()
            .iter()
            .zip(self.clusters.iter())
            .any(|(b, c)| *b && *c == cluster)
    }
}

/// Runs the session of one destination until `shutdown`; returns early only
/// on a fatal error.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    settings: UplinkSettings,
    session: usize,
    beat: crate::notify::Beat,
    gate: DrainGate,
    store: StoreHandle,
    committed: watch::Receiver<Vec<u64>>,
    live: crate::status::Live,
    metrics: crate::metrics::UplinkMetrics,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    let mut uplink = Uplink::new(
        settings, session, beat, gate, store, committed, live, metrics, shutdown,
    );
    loop {
        match uplink.session().await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Err(e) => {
                let class = e.class();
                e.audit(&uplink.settings.name);
                if class == ErrorClass::Fatal {
                    return Err(e);
                }
                uplink.proto.on_disconnect();
                if uplink.settings.drains_first {
                    uplink.gate.set(uplink.session, true);
                }
                uplink.report_delivered()?;
                uplink.metrics.connected.set(0);
                uplink.metrics.reconnects.inc();
                let delay = match (&e, class) {
                    (UplinkError::ProducerClosed, _) => uplink.settings.uplink.backoff_min,
                    // Retrying fast cannot fix a certificate or a permission.
                    (_, ErrorClass::NeedsOperator) => uplink.settings.uplink.backoff_max,
                    _ => uplink.backoff.next_delay(),
                };
                let retry_in_ms = delay.as_millis() as u64;
                uplink.live.pulsar_down(
                    &uplink.settings.name,
                    &uplink.settings.service.to_string(),
                    e.to_string(),
                );
                if class == ErrorClass::NeedsOperator {
                    tracing::error!(error = %e, topic = %uplink.settings.name, retry_in_ms,
                        "uplink blocked until an operator fixes this; records stay in the store");
                } else {
                    tracing::warn!(error = %e, topic = %uplink.settings.name, retry_in_ms,
                        "uplink disconnected; records stay in the store");
                }
                let backoff = tokio::time::sleep(delay);
                if bounded(&uplink.beat, &uplink.shutdown, backoff)
                    .await
                    .is_none()
                {
                    return Ok(());
                }
            }
        }
    }
}

struct Uplink {
    live: crate::status::Live,
    metrics: crate::metrics::UplinkMetrics,
    settings: UplinkSettings,
    /// This session's place in the [`DrainGate`].
    session: usize,
    /// This session's liveness for the systemd watchdog.
    beat: crate::notify::Beat,
    gate: DrainGate,
    store: StoreHandle,
    committed: watch::Receiver<Vec<u64>>,
    shutdown: CancellationToken,
    /// The protocol state, with the producer's window; it outlives each
    /// connection.
    proto: Protocol,
    backoff: Backoff,
    /// Highest confirmed record already reported to the store.
    reported: u64,
    /// The log said that the broker forgot this producer (once).
    told_forgotten: bool,
}

impl Uplink {
    #[allow(clippy::too_many_arguments)]
    fn new(
        settings: UplinkSettings,
        session: usize,
        beat: crate::notify::Beat,
        gate: DrainGate,
        store: StoreHandle,
        committed: watch::Receiver<Vec<u64>>,
        live: crate::status::Live,
        metrics: crate::metrics::UplinkMetrics,
        shutdown: CancellationToken,
    ) -> Uplink {
        metrics.deduplication.set(-1);
        let mut proto = Protocol::new(settings.auth.is_some(), &settings.topic);
        let window = ProducerState::new(
            settings.uplink.max_in_flight,
            settings.uplink.max_in_flight_bytes,
        );
        proto.add_producer(PRODUCER_ID, &settings.topic, window);
        Uplink {
            live,
            metrics,
            proto,
            backoff: Backoff::new(settings.uplink.backoff_min, settings.uplink.backoff_max),
            settings,
            session,
            beat,
            gate,
            store,
            committed,
            shutdown,
            reported: 0,
            told_forgotten: false,
        }
    }

    /// What the broker's answer says of deduplication: it works when the
    /// broker names the producer's last record; it is off when the broker
    /// forgot a producer it had confirmed records of (said in the log once
    /// per process; the store keeps an incident).
    fn deduplication(&mut self, last_sequence_id: i64, forgotten: Option<Forgotten>) {
        match forgotten {
            Some(f) => {
                self.metrics.deduplication.set(0);
                if !self.told_forgotten {
                    self.told_forgotten = true;
                    tracing::error!(topic = %self.settings.name, producer = %self.settings.producer_name,
                        "EXACTLY ONCE IS OFF: {}", forgotten_detail(&self.settings.name, &f));
                }
            }
            None if last_sequence_id >= 0 => {
                self.metrics.deduplication.set(1);
            }
            None => {}
        }
    }

    /// The producer's window.
    fn window(&self) -> &ProducerState {
        self.proto
            .window(PRODUCER_ID)
            .expect("the producer is added when the session is made")
    }

    /// One session: connect, create the producer, then send until an error
    /// or shutdown.
    ///
    /// Its beat ticks at every turn of the loop, whenever a write moved
    /// bytes, and every second while the session waits for something that is
    /// bounded (connecting, the producer, frames, the store). It does not
    /// tick while a write makes no progress: a broker that stopped reading
    /// silences the beat (and so the systemd watchdog) until the write fails
    /// after `operation_timeout`. Shutdown never waits for a write.
    async fn session(&mut self) -> Result<SessionEnd, UplinkError> {
        let shutdown = self.shutdown.clone();
        let dest = self.settings.dest;
        let (settings, proto, store) = (&self.settings, &mut self.proto, &self.store);
        let setup = async {
            let mut conn = connect_to_topic(settings, proto).await?;
            let name = &settings.producer_name;
            let last_sequence_id = create_producer(&mut conn, proto, settings, name).await?;
            let outcome = store.resume(dest, last_sequence_id).await?;
            Ok::<_, UplinkError>((conn, last_sequence_id, outcome))
        };
        let Some(ready) = bounded(&self.beat, &shutdown, setup).await else {
            return Ok(SessionEnd::Shutdown);
        };
        let (mut conn, last_sequence_id, outcome) = ready?;
        // The store took the broker's number: the window opens.
        let cursor = self
            .proto
            .open_window(PRODUCER_ID, last_sequence_id)
            .expect("the producer is added when the session is made");
        self.reported = self.reported.max(cursor);
        self.backoff.reset();
        self.live
            .pulsar_up(&self.settings.name, &conn.endpoint.to_string());
        self.metrics.connected.set(1);
        self.metrics.skipped.inc_by(outcome.skipped);
        self.metrics.auth_challenges.inc_by(self.proto.challenges());
        // History and events wait (a while at most) for the status topics.
        let ready_at = Instant::now();
        let mut gate = self.gate.behind.subscribe();
        let mut waiting = !self.settings.drains_first && !self.gate.open(self.settings.cluster);
        if waiting {
            tracing::info!(topic = %self.settings.name, "waiting for the status topics to send current state first");
        }
        let mut challenges_seen = self.proto.challenges();
        self.deduplication(last_sequence_id, outcome.forgotten);
        if outcome.renumbered_by > 0 {
            tracing::error!(last_sequence_id, renumbered_by = outcome.renumbered_by,
                "broker holds record numbers this store never gave out (store replaced?); pending records renumbered above them");
        }
        tracing::info!(topic = %self.settings.name, producer = %self.settings.producer_name, broker = %conn.endpoint,
            last_sequence_id, skipped = outcome.skipped, "producer ready");

        let mut buffer: VecDeque<Record> = VecDeque::new();
        let mut ping = tokio::time::interval(KEEPALIVE);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut alive = tokio::time::interval(crate::notify::BEAT_EVERY);
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        loop {
            self.beat.tick();
            if waiting
                && (self.gate.open(self.settings.cluster) || ready_at.elapsed() >= PRIORITY_WAIT)
            {
                waiting = false;
            }
            // Fill the window from the store, in record order.
            while self.window().room() > 0 && !waiting {
                if buffer.is_empty() {
                    let last_committed = self.committed.borrow_and_update()[dest];
                    if last_committed <= self.window().cursor() {
                        self.caught_up();
                        break;
                    }
                    // Fetched ahead: the window's worth of payload bytes.
                    let limit = self.settings.uplink.max_in_flight.max(64);
                    let bytes = self.settings.uplink.max_in_flight_bytes;
                    let after = self.window().cursor();
                    buffer.extend(self.store.fetch(dest, after, limit, bytes).await?);
                    if buffer.is_empty() {
                        break;
                    }
                }
                let Some(rec) = buffer.front() else { break };
                if rec.seq <= self.window().cursor() {
                    buffer.pop_front();
                    continue;
                }
                if !self.window().may_send(rec.payload.len()) {
                    break;
                }
                let Some(rec) = buffer.pop_front() else { break };
                let (seq, bytes) = (rec.seq, rec.payload.len());
                let send = self
                    .proto
                    .send(PRODUCER_ID, seq, bytes, Instant::now())
                    .expect("the producer is added when the session is made");
                encode_record(&self.settings, send, rec, &mut conn.wbuf);
                self.metrics.sent.inc();
            }
            // Write what is pending; the beat ticks only when bytes move.
            while conn.pending_write() {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => {
                        self.drain(&mut conn).await;
                        return Ok(SessionEnd::Shutdown);
                    }
                    written = conn.write_some() => {
                        written?;
                        self.beat.tick();
                    }
                }
            }

            let operation_timeout = self.settings.operation_timeout();
            let deadline = self.window().next_deadline(operation_timeout);
            let want_more = buffer.is_empty() && self.window().room() > 0 && !waiting;
            let priority_wait = waiting.then(|| ready_at + PRIORITY_WAIT);
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.drain(&mut conn).await;
                    return Ok(SessionEnd::Shutdown);
                }
                frame = conn.read_frame() => {
                    last_heard = Instant::now();
                    self.handle(&mut conn, frame?).await?;
                    // Take whatever else already arrived before writing more.
                    while let Some(f) = conn.try_frame()? {
                        self.handle(&mut conn, f).await?;
                    }
                    self.report_delivered()?;
                    let challenges = self.proto.challenges();
                    if challenges > challenges_seen {
                        self.metrics.auth_challenges.inc_by(challenges - challenges_seen);
                        challenges_seen = challenges;
                    }
                }
                r = self.committed.changed(), if want_more => {
                    if r.is_err() {
                        // The store is gone: ferry is stopping.
                        return Ok(SessionEnd::Shutdown);
                    }
                }
                _ = gate.changed(), if waiting => {}
                _ = sleep_until_opt(priority_wait), if waiting => {}
                _ = ping.tick() => {
                    if last_heard.elapsed() > 2 * KEEPALIVE {
                        return Err(UplinkError::Timeout("any frame from the broker"));
                    }
                    conn.push(&self.proto.ping());
                }
                _ = sleep_until_opt(deadline) => {
                    self.proto.check_timeout(PRODUCER_ID, Instant::now(), operation_timeout)?;
                }
                _ = alive.tick() => {}
            }
        }
    }

    /// Handles one frame of an established session: the protocol state
    /// decides, this acts on what happened.
    async fn handle(&mut self, conn: &mut Conn, f: Frame) -> Result<(), UplinkError> {
        let event = step(conn, &mut self.proto, &self.settings, f).await?;
        let Some(event) = event else { return Ok(()) };
        if let Some(e) = ends_session(&event) {
            return Err(e);
        }
        match event {
            Event::Receipt {
                receipt: Receipt::Confirmed { sent, .. },
                ..
            } => {
                self.metrics.acknowledged.inc();
                self.metrics
                    .send_latency
                    .observe(sent.elapsed().as_secs_f64());
            }
            Event::BrokerError { error, message, .. } => {
                tracing::warn!(error = %error, message = %message, "broker error");
            }
            _ => {}
        }
        Ok(())
    }

    /// A status session has sent everything committed so far (it may still
    /// await receipts): the others may go.
    fn caught_up(&self) {
        if self.settings.drains_first {
            self.gate.set(self.session, false);
        }
    }

    /// Tells the store what the broker confirmed since the last report.
    fn report_delivered(&mut self) -> Result<(), UplinkError> {
        let confirmed = self.window().confirmed();
        let resent = self.proto.take_resent(PRODUCER_ID);
        self.metrics.resent.inc_by(resent);
        if confirmed > self.reported || resent > 0 {
            self.store
                .delivered(self.settings.dest, confirmed, resent)?;
            self.reported = confirmed;
        }
        Ok(())
    }

    /// On shutdown: wait a little for the receipts of what is in flight,
    /// at most `drain_timeout`, however the broker behaves.
    async fn drain(&mut self, conn: &mut Conn) {
        let deadline = tokio::time::Instant::now() + self.settings.uplink.drain_timeout;
        let receipts = async {
            loop {
                // What is written already (a part of a frame included) is
                // completed first: receipts come only for whole frames.
                conn.flush().await?;
                if self.window().in_flight() == 0 {
                    return Ok(());
                }
                let f = conn.read_frame().await?;
                self.handle(conn, f).await?;
                self.beat.tick();
            }
        };
        let _: Result<Result<(), UplinkError>, _> =
            tokio::time::timeout_at(deadline, receipts).await;
        let left = self.window().in_flight();
        let _ = self.report_delivered();
        tracing::info!(
            unconfirmed = left,
            "uplink stopped; unconfirmed records stay in the store"
        );
    }
}

/// Awaits `fut`, whose own timeouts bound it, ticking `beat` every second
/// meanwhile; `None` if `shutdown` came first.
pub(crate) async fn bounded<F: std::future::Future>(
    beat: &crate::notify::Beat,
    shutdown: &CancellationToken,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut every = tokio::time::interval(crate::notify::BEAT_EVERY);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            out = &mut fut => return Some(out),
            _ = every.tick() => beat.tick(),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Appends the SEND frame of one record (`send`, from the protocol state;
/// the record taken by value: its strings move into the metadata instead
/// of being copied).
fn encode_record(s: &UplinkSettings, send: CommandSend, rec: Record, dst: &mut BytesMut) {
    let kv = |k: &str, v: String| KeyValue {
        key: k.into(),
        value: v,
    };
    let metadata = MessageMetadata {
        producer_name: s.producer_name.clone(),
        sequence_id: rec.seq,
        publish_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        partition_key: Some(rec.device),
        event_time: Some(rec.received_ms),
        properties: vec![
            kv("ferry.gateway", s.gateway_id.clone()),
            kv("ferry.record", rec.seq.to_string()),
            kv("ferry.received_ms", rec.received_ms.to_string()),
            kv("mqtt.topic", rec.props.mqtt_topic),
        ],
        ..Default::default()
    };
    frame::encode_send(&send, &metadata, &rec.payload, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::testing::*;
    use pulsar::proto::{command_lookup_topic_response::LookupType, CommandLookupTopicResponse};

    /// An uplink session on `store`, as `run` makes it.
    fn uplink_on(
        settings: UplinkSettings,
        store: &crate::store::Store,
        shutdown: CancellationToken,
    ) -> Uplink {
        uplink_beating(settings, store, shutdown, &crate::notify::Health::default())
    }

    /// [`uplink_on`], its beat in `health`.
    fn uplink_beating(
        settings: UplinkSettings,
        store: &crate::store::Store,
        shutdown: CancellationToken,
        health: &crate::notify::Health,
    ) -> Uplink {
        let metrics = crate::metrics::Metrics::new().uplink(&settings.name);
        Uplink::new(
            settings,
            0,
            health.beat("uplink"),
            DrainGate::new(vec![0]),
            store.handle.clone(),
            store.committed.clone(),
            crate::status::Live::default(),
            metrics,
            shutdown,
        )
    }

    #[tokio::test]
    async fn a_broker_that_stops_reading_ends_the_session_with_a_timeout() {
        let dir = Scratch::new("stops-reading");
        // 10 MiB: more than the socket buffers between ferry and the broker.
        let store = store_with(&dir.0, 40, 256 * 1024).await;
        let (port, seen) = producing_broker(Hostile::StopsReading).await;
        let mut s = settings(port);
        s.uplink.max_in_flight = 1000;
        s.uplink.operation_timeout = Duration::from_millis(1000);
        let mut up = uplink_on(s, &store, CancellationToken::new());
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(10), up.session())
            .await
            .unwrap_or_else(|_| panic!("the session still waits on the broker after 10 s"));
        let waited = started.elapsed();
        assert_eq!(seen.producers.load(std::sync::atomic::Ordering::SeqCst), 1);
        match outcome {
            Ok(_) => panic!("the session ended without an error"),
            Err(e) => assert!(e.to_string().contains("timed out"), "{e}"),
        }
        assert!(
            waited < Duration::from_secs(4),
            "ended {waited:?} after it started, operation_timeout 1 s"
        );
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_broker_that_stopped_reading() {
        let dir = Scratch::new("stuck-shutdown");
        let store = store_with(&dir.0, 40, 256 * 1024).await;
        let (port, seen) = producing_broker(Hostile::StopsReading).await;
        let mut s = settings(port);
        s.uplink.max_in_flight = 1000;
        s.uplink.operation_timeout = Duration::from_secs(60);
        s.uplink.drain_timeout = Duration::from_millis(300);
        let shutdown = CancellationToken::new();
        let mut up = uplink_on(s, &store, shutdown.clone());
        let session = tokio::spawn(async move { up.session().await.map(|_| ()) });
        while seen.producers.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let ferry's writes fill the socket buffers and stall.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cancelled = Instant::now();
        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), session).await;
        let took = cancelled.elapsed();
        assert!(ended.is_ok(), "the session still runs 5 s after shutdown");
        assert!(
            took < Duration::from_millis(300 + 700),
            "stopped {took:?} after shutdown, drain_timeout 300 ms"
        );
    }

    #[tokio::test]
    async fn a_session_beats_while_idle_and_falls_silent_while_a_write_is_stuck() {
        let silent = |h: &crate::notify::Health| h.stalled(Duration::from_millis(1500)).is_some();
        // Idle: nothing to send, the broker reads.
        let dir = Scratch::new("beat-idle");
        let store = store_with(&dir.0, 0, 0).await;
        let (port, _) = producing_broker(Hostile::WithholdsReceipts).await;
        let health = crate::notify::Health::default();
        let mut up = uplink_beating(settings(port), &store, CancellationToken::new(), &health);
        let idle = tokio::time::timeout(Duration::from_secs(3), up.session()).await;
        assert!(idle.is_err(), "an idle session goes on");
        assert!(!silent(&health), "an idle session beats");

        // Stuck: the broker stopped reading; the write fails only after 4 s.
        let dir = Scratch::new("beat-stuck");
        let store = store_with(&dir.0, 40, 256 * 1024).await;
        let (port, _) = producing_broker(Hostile::StopsReading).await;
        let mut s = settings(port);
        s.uplink.max_in_flight = 1000;
        s.uplink.operation_timeout = Duration::from_secs(4);
        let health = crate::notify::Health::default();
        let mut up = uplink_beating(s, &store, CancellationToken::new(), &health);
        let stuck = tokio::time::timeout(Duration::from_secs(3), up.session()).await;
        assert!(stuck.is_err(), "still within the write bound");
        assert!(silent(&health), "a session stuck in a write does not beat");
    }

    #[tokio::test]
    async fn payload_bytes_in_flight_stay_under_the_cap_plus_one_record() {
        let dir = Scratch::new("in-flight-bytes");
        let size = 256 * 1024;
        // 25 MiB waiting, receipts withheld: only the window goes out.
        let store = store_with(&dir.0, 100, size).await;
        for (cap, most) in [(1024 * 1024, 1024 * 1024 + size), (1024, size)] {
            let (port, seen) = producing_broker(Hostile::WithholdsReceipts).await;
            let mut s = settings(port);
            s.uplink.max_in_flight = 1000;
            s.uplink.max_in_flight_bytes = cap;
            s.uplink.operation_timeout = Duration::from_secs(5);
            let mut up = uplink_on(s, &store, CancellationToken::new());
            let run = tokio::time::timeout(Duration::from_millis(1500), up.session()).await;
            assert!(run.is_err(), "the session waits for receipts");
            let got = seen.per_connection();
            assert_eq!(got.len(), 1, "one connection");
            assert!(
                got[0] >= size as u64 && got[0] <= most as u64,
                "cap {cap}: the broker got {} payload bytes without receipts, at most {most} allowed",
                got[0]
            );
        }
    }

    #[tokio::test]
    async fn a_tls_downgrade_is_the_links_last_error_and_is_retried_slowly() {
        let dir = Scratch::new("downgrade-run");
        let (acceptor, settings_for) = tls_pki(&dir.0);
        let (service, mut seen) = fake_broker_with(
            Some(acceptor),
            Box::new(|l, _| CommandLookupTopicResponse {
                broker_service_url: Some("pulsar://127.0.0.1:9".into()),
                response: Some(LookupType::Connect as i32),
                request_id: l.request_id,
                ..Default::default()
            }),
        )
        .await;
        let mut s = settings_for(service);
        s.uplink.backoff_min = Duration::from_millis(10);
        s.uplink.backoff_max = Duration::from_secs(30);
        let topic = s.topic.clone();
        let store = store_with(&dir.0, 1, 10).await;
        let live = crate::status::Live::default();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(run(
            s,
            0,
            crate::notify::Health::default().beat("uplink"),
            DrainGate::new(vec![0]),
            store.handle.clone(),
            store.committed.clone(),
            live.clone(),
            crate::metrics::Metrics::new().uplink(&topic),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(800)).await;
        let link = live
            .snapshot()
            .topics
            .get(&topic)
            .cloned()
            .unwrap_or_default();
        let error = link.last_error.unwrap_or_default();
        assert!(
            !link.connected && error.contains("never leaves TLS"),
            "{error}"
        );
        let mut connects = 0;
        while let Ok(c) = seen.try_recv() {
            connects += c.connect.iter().count();
        }
        assert_eq!(connects, 1, "retried at backoff_max, not at once");
        shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(2), running).await;
        assert!(matches!(stopped, Ok(Ok(Ok(())))), "stops on shutdown");
    }
}
