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
//! sent under the reused packet id and that is not yet committed; and a
//! PUBACK the broker does not expect can break its order: Mosquitto 2.0
//! counts every PUBACK as a free in-flight slot, and a slot it thinks free
//! lets the next new message overtake the ones it still queues. So every
//! network connection has an rumqttc client of its own: rumqttc keeps its
//! request queue across the reconnects it makes itself, and would send an
//! ack (or a barrier) handed to it for one connection on the next.
//!
//! rumqttc does not talk to the broker directly but through the [`guard`],
//! which rewrites the PUBLISH packets rumqttc cannot take (too long for
//! memory, a topic that is not UTF-8) into ones the store dead-letters, so a
//! poison message is acknowledged and never blocks the ones behind it. What
//! is on its way to the store is bounded by bytes ([`intake`]); while that
//! budget is spent, ingest reads nothing more from the broker.
//!
//! The broker is subscribed to on the first CONNACK of the process (the
//! configuration may have changed since the session was made) and after
//! that only when the broker lost the session: every subscription makes the
//! broker resend every retained message. Reconnecting backs off, and the
//! backoff starts over only after a connection proved good: it stayed up
//! for [`STABLE_AFTER`] or delivered a message that was committed.

pub mod guard;
pub mod intake;

#[cfg(test)]
mod ack_tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, Transport};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::MqttConfig;
use crate::layout::{Layout, SessionSpec};
use crate::mqtt_events::Events;
use crate::store::{AckToken, Guarded, Inbound, Intake, StoreError, StoreHandle};
use guard::{Guard, Mark};
use intake::Budget;

/// A connection that stayed up this long was a good one: the next
/// reconnect starts its backoff over.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The topic filter of the acknowledgement barrier (see [`AckBarrier`]):
/// ferry never subscribes to it, so unsubscribing changes nothing.
pub const BARRIER_FILTER: &str = "$ferry/ack-barrier";

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the mqtt guard: {0}")]
    Guard(std::io::Error),
}

/// Runs ingest until `shutdown`: one MQTT session per
/// [`Layout::sessions`], each with its own client, guard, acks and
/// back-pressure (`accepting`, in the same order). Messages go to `store`;
/// the store's commit confirmations arrive on `acks` and go to the session
/// each names. While a session's `accepting` is false (the store holds back
/// as much as it may of it: a `reject` stream at its limit, or a full
/// disk), that session stays disconnected and the broker keeps its backlog.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: MqttConfig,
    layout: Layout,
    store: StoreHandle,
    mut acks: UnboundedReceiver<Vec<AckToken>>,
    accepting: Vec<watch::Receiver<Intake>>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let specs = layout.sessions(&cfg.client_id);
    debug_assert_eq!(specs.len(), accepting.len());
    // A failing session stops the others.
    let stop = shutdown.child_token();
    let shared = Shared {
        epochs: Arc::new(AtomicU64::new(0)),
        subscribed: Arc::new(watch::channel(vec![false; specs.len()]).0),
    };
    // Filters that session 0 may still hold from before they had a session
    // of their own (an upgrade, or a stream that became `reject`).
    let moved: Vec<String> = specs[1..]
        .iter()
        .flat_map(|s| s.filters.iter().cloned())
        .collect();
    let mut lanes = tokio::task::JoinSet::new();
    let mut to_lane = Vec::new();
    for (index, (spec, accepting)) in specs.into_iter().zip(accepting).enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        to_lane.push(tx);
        let moved = if index == 0 {
            moved.clone()
        } else {
            Vec::new()
        };
        lanes.spawn(lane(
            cfg.clone(),
            index,
            spec,
            moved,
            layout.clone(),
            store.clone(),
            rx,
            accepting,
            live.clone(),
            metrics.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    // One commit's acks of one session stay together (see `send_acks`).
    let demux = tokio::spawn(async move {
        while let Some(batch) = acks.recv().await {
            let mut per: Vec<Vec<AckToken>> = vec![Vec::new(); to_lane.len()];
            for a in batch {
                if let Some(v) = per.get_mut(a.session) {
                    v.push(a);
                }
            }
            for (tx, b) in to_lane.iter().zip(per) {
                if !b.is_empty() {
                    let _ = tx.send(b);
                }
            }
        }
    });
    let mut result = Ok(());
    while let Some(r) = lanes.join_next().await {
        let r = match r {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(()),
        };
        if let Err(e) = r {
            stop.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    demux.abort();
    result
}

/// What ingest's MQTT sessions share.
#[derive(Clone)]
struct Shared {
    /// The last connection epoch handed out: epochs are unique across
    /// sessions, so an epoch names one connection of one session.
    epochs: Arc<AtomicU64>,
    /// Per session: every filter it subscribes to was confirmed by the
    /// broker since the process started.
    subscribed: Arc<watch::Sender<Vec<bool>>>,
}

/// One MQTT session (`index` in [`Layout::sessions`]) until `shutdown`.
/// `moved`: filters of other sessions that session 0 unsubscribes from (see
/// [`Session::give_back_moved`]).
#[allow(clippy::too_many_arguments)]
async fn lane(
    cfg: MqttConfig,
    index: usize,
    spec: SessionSpec,
    moved: Vec<String>,
    layout: Layout,
    store: StoreHandle,
    acks: UnboundedReceiver<Vec<AckToken>>,
    mut accepting: watch::Receiver<Intake>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    shared: Shared,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let guard =
        Guard::start((cfg.host.clone(), cfg.port), shutdown.clone()).map_err(IngestError::Guard)?;
    // rumqttc connects to the guard; nothing longer than the guard's cap
    // reaches it.
    let mut opts = MqttOptions::new(spec.client_id.clone(), guard.path(), 0);
    opts.set_transport(Transport::Unix)
        .set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(guard::CAP, 64 * 1024)
        .set_request_channel_capacity(1024);
    let epoch = Arc::new(AtomicU64::new(0));
    let committed = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Mutex::new(AckBarrier::default()));
    let answered = Arc::new(Notify::new());
    let (current, client_rx) = watch::channel(None);
    let acker = tokio::spawn(send_acks(
        client_rx,
        acks,
        committed.clone(),
        barrier.clone(),
        answered.clone(),
    ));
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let mut session = Session {
        index,
        client_id: spec.client_id,
        filters: spec.filters,
        moved,
        moved_done: false,
        layout,
        store,
        live,
        metrics,
        epoch,
        shared,
        committed,
        addr,
        mark: guard.mark(),
        guard,
        budget: Budget::new(intake::INTAKE_BYTES),
        reconnect: Reconnect::new(),
        subscriptions: Subscriptions::default(),
        barrier,
        answered,
        current,
    };
    let result = loop {
        if !accepting.borrow_and_update().open {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                r = accepting.wait_for(|a| a.open) => if r.is_err() { break Ok(()) },
            }
            tracing::info!(client_id = %session.client_id, "store has room again: reconnecting to the mqtt broker");
        }
        let pauses = accepting.borrow_and_update().pauses;
        // A client (and event loop) per network connection: nothing handed
        // to one reaches the broker on a later connection.
        let (client, eventloop) = AsyncClient::new(opts.clone(), 1024);
        let mut events = Events::start(eventloop, 1);
        let end = session
            .connection(&client, &mut events, &mut accepting, pauses, &shutdown)
            .await;
        session.current.send_replace(None);
        if let Ok(Ended::Lost) = end {
            continue;
        }
        // Leave the session on the broker: what was not acked is
        // redelivered later. A clean DISCONNECT keeps the persistent session.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(ev)) = events.next().await {
                if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                    break;
                }
            }
        })
        .await;
        match end {
            Ok(Ended::Shutdown) => break Ok(()),
            Ok(Ended::Lost) => unreachable!("a lost connection connects again above"),
            Ok(Ended::Paused) => {
                let why = "paused: the store holds back what it may (reject limit or full disk); the broker keeps the backlog";
                session.link_down(why.into(), false);
                tracing::warn!(broker = %session.addr, client_id = %session.client_id, "mqtt intake {why}");
            }
            Err(e) => break Err(e),
        }
    };
    acker.abort();
    // rumqttc's socket is closed: let the guard pass on its last bytes.
    session.guard.finish(Duration::from_secs(1)).await;
    result
}

/// Why one MQTT connection ended without an error.
enum Ended {
    Shutdown,
    /// The store asked for back-pressure.
    Paused,
    /// The connection failed (or could not be made), and the backoff
    /// before the next one is over.
    Lost,
}

/// What the MQTT connections of one session share.
struct Session {
    /// The session's place in [`Layout::sessions`]; 0 is the main one,
    /// whose link `ferry status` and the metrics show.
    index: usize,
    client_id: String,
    filters: Vec<String>,
    /// Filters of other sessions to unsubscribe from (session 0 only).
    moved: Vec<String>,
    /// The broker confirmed `moved` unsubscribed.
    moved_done: bool,
    layout: Layout,
    store: StoreHandle,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    /// This session's current connection (a new one from
    /// [`Shared::epochs`] at every CONNACK); acks carry it.
    epoch: Arc<AtomicU64>,
    shared: Shared,
    /// The last epoch with a message the store committed (set by
    /// `send_acks`).
    committed: Arc<AtomicU64>,
    addr: String,
    guard: Guard,
    mark: Mark,
    budget: Budget,
    reconnect: Reconnect,
    subscriptions: Subscriptions,
    /// Shared with `send_acks`, which sends the barriers.
    barrier: Arc<Mutex<AckBarrier>>,
    /// Tells `send_acks` that a barrier was answered.
    answered: Arc<Notify>,
    /// The client of the current connection, with its epoch, from its
    /// CONNACK until it ends: `send_acks` sends an ack only through the
    /// client of the connection it belongs to.
    current: watch::Sender<Option<(u64, AsyncClient)>>,
}

impl Session {
    /// Polls one client's event loop for one connection: until it fails
    /// (and the backoff is over), shutdown or back-pressure.
    async fn connection(
        &mut self,
        client: &AsyncClient,
        events: &mut Events,
        accepting: &mut watch::Receiver<Intake>,
        pauses: u64,
        shutdown: &CancellationToken,
    ) -> Result<Ended, IngestError> {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                r = accepting.changed() => {
                    // A pause, even one already over, ends this connection.
                    if r.is_ok() && accepting.borrow_and_update().pauses != pauses {
                        return Ok(Ended::Paused);
                    }
                    continue;
                }
                e = events.next() => match e {
                    Some(e) => e,
                    // The poller ended: only when this connection is dropped.
                    None => return Ok(Ended::Shutdown),
                },
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.metrics.mqtt_received.inc();
                    let epoch = self.epoch.load(Ordering::Acquire);
                    let rewrite = self.mark.read(&p.payload);
                    // While the budget is spent, this loop reads nothing:
                    // TCP back-pressure reaches the broker.
                    let share = tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                        s = self.budget.reserve(cost(&p)) => s,
                    };
                    let msg = inbound(&self.layout, p, rewrite, self.index, epoch, share);
                    self.store.insert(msg)?;
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
                    self.subscriptions.acked(!refused);
                    if self.subscriptions.confirmed {
                        self.shared.subscribed.send_modify(|v| v[self.index] = true);
                    }
                }
                Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                    // Ferry unsubscribes from nothing but the barrier and,
                    // once, the filters of other sessions (`moved`).
                    let (confirmed, moved_answered) = {
                        let mut b = self.barrier.lock().expect("barrier lock");
                        (b.answered(), b.extra_answered)
                    };
                    if let Some((epoch, gen)) = confirmed {
                        self.store.acks_confirmed(epoch, gen)?;
                    }
                    if !self.moved_done
                        && !self.moved.is_empty()
                        && moved_answered >= self.moved.len()
                    {
                        self.moved_done = true;
                        tracing::info!(client_id = %self.client_id, filters = ?self.moved,
                            "the filters of the reject streams' own mqtt sessions are no longer subscribed in this one");
                    }
                    self.answered.notify_one();
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.reconnect.connected(Instant::now());
                    let n = self.shared.epochs.fetch_add(1, Ordering::AcqRel) + 1;
                    self.epoch.store(n, Ordering::Release);
                    self.barrier.lock().expect("barrier lock").connected(n);
                    self.current.send_replace(Some((n, client.clone())));
                    // Messages held back from earlier connections will be
                    // redelivered on this one.
                    self.store.new_epoch(self.index, n, ack.session_present)?;
                    if self.index == 0 {
                        self.live.mqtt_up(&self.addr);
                        self.metrics.mqtt_connected.set(1);
                    }
                    tracing::info!(broker = %self.addr, client_id = %self.client_id, session_present = ack.session_present, epoch = n, "mqtt connected");
                    if !ack.session_present {
                        // A new session holds no subscription of before.
                        self.moved_done = true;
                    } else if !self.moved_done && !self.moved.is_empty() {
                        self.give_back_moved(client, n);
                    }
                    let filters = self.filters.clone();
                    let subscribe = self
                        .subscriptions
                        .connected(ack.session_present, filters.len());
                    if self.subscriptions.confirmed {
                        // Nothing to subscribe to, or kept by the broker.
                        self.shared.subscribed.send_modify(|v| v[self.index] = true);
                    }
                    if subscribe {
                        // Subscribing from this task would block the loop
                        // it polls if the request channel were full.
                        let client = client.clone();
                        tokio::spawn(async move {
                            for f in filters {
                                if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await
                                {
                                    tracing::warn!(filter = %f, error = %e, "mqtt subscribe failed");
                                }
                            }
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // The guard knows better why the broker is unreachable.
                    let why = self.guard.take_upstream_error().unwrap_or(e.to_string());
                    self.link_down(why.clone(), true);
                    let epoch = self.epoch.load(Ordering::Acquire);
                    let committed = self.committed.load(Ordering::Acquire) == epoch;
                    let delay = self.reconnect.lost(Instant::now(), committed);
                    tracing::warn!(broker = %self.addr, client_id = %self.client_id, error = %why, retry_in_ms = delay.as_millis() as u64,
                        "mqtt connection lost; the broker keeps unacknowledged messages");
                    self.current.send_replace(None);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    return Ok(Ended::Lost);
                }
            }
        }
    }
}

impl Session {
    /// The connection is down (`lost`: not given back for back-pressure,
    /// which is no reconnect): `ferry status` and the metrics show the main
    /// session's link (the others log theirs).
    fn link_down(&self, why: String, lost: bool) {
        if self.index == 0 {
            self.live.mqtt_down(&self.addr, why);
            if self.metrics.mqtt_connected.set(0) == 1 && lost {
                self.metrics.mqtt_reconnects.inc();
            }
        }
    }

    /// Session 0 unsubscribes from the filters that now have sessions of
    /// their own (after an upgrade, or a stream that became `reject`), so
    /// that the broker stops sending their messages to it. Only once every
    /// other session's subscriptions are confirmed: until then session 0
    /// still stores what they match, and nothing published meanwhile is
    /// lost (what both receive in the moment between is stored twice). The
    /// UNSUBACKs are told from the barrier's by their count (see
    /// [`AckBarrier::extra`]); on a lost connection the next CONNACK tries
    /// again.
    fn give_back_moved(&self, client: &AsyncClient, epoch: u64) {
        let client = client.clone();
        let barrier = self.barrier.clone();
        let moved = self.moved.clone();
        let mut subscribed = self.shared.subscribed.subscribe();
        tokio::spawn(async move {
            if subscribed
                .wait_for(|v| v[1..].iter().all(|s| *s))
                .await
                .is_err()
            {
                return;
            }
            {
                let mut b = barrier.lock().expect("barrier lock");
                if b.epoch != epoch {
                    return;
                }
                b.extra += moved.len();
            }
            for f in moved {
                if client.unsubscribe(f).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// What a message costs of the intake budget: what it holds in memory.
fn cost(p: &Publish) -> usize {
    p.payload.len() + p.topic.len()
}

/// The message for the store. One the guard rewrote (`rewrite`, from its
/// mark) says so ([`Guarded`]), and the store dead-letters it with its real
/// size: a cut payload keeps only its first bytes, a topic that was not
/// UTF-8 is the guard's escaped form.
fn inbound(
    layout: &Layout,
    p: Publish,
    rewrite: Option<(guard::Rewrite, usize)>,
    session: usize,
    epoch: u64,
    share: OwnedSemaphorePermit,
) -> Inbound {
    let ack = (p.qos != QoS::AtMostOnce).then_some(AckToken {
        pkid: p.pkid,
        session,
        epoch,
        gen: 0,
    });
    let (stream, device) = match layout.route(&p.topic) {
        Some((s, d)) => (Some(s), d),
        None => (None, None),
    };
    let (payload, guarded) = match rewrite {
        None => (intake::held(&p.payload, share), None),
        Some((r, kept)) => {
            let guarded = if r.invalid_topic {
                Some(Guarded::TopicNotUtf8)
            } else if r.payload_len > kept {
                Some(Guarded::Cut {
                    len: r.payload_len as u64,
                })
            } else {
                None
            };
            (intake::held(&p.payload[..kept], share), guarded)
        }
    };
    Inbound {
        stream,
        device,
        counted: false,
        dup: p.dup,
        pkid: p.pkid,
        session,
        retain: p.retain,
        mqtt_topic: p.topic,
        payload,
        ack,
        guarded,
    }
}

/// When to reconnect to the MQTT broker: exponential backoff from 200 ms to
/// 30 s that starts over only after a good connection, one that stayed up
/// for [`STABLE_AFTER`] or delivered a message the store committed. A
/// CONNACK alone proves nothing: a broker that accepts the connection and
/// then sends what ends it (or drops it) must not be hammered.
struct Reconnect {
    backoff: Backoff,
    /// When the current connection got its CONNACK.
    since: Option<Instant>,
}

impl Reconnect {
    fn new() -> Reconnect {
        Reconnect {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            since: None,
        }
    }

    fn connected(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// The connection ended (or could not be made): how long to wait.
    /// `committed`: the last connection delivered a message the store
    /// committed (it counts only if there was a connection since the last
    /// loss).
    fn lost(&mut self, now: Instant, committed: bool) -> Duration {
        if let Some(since) = self.since.take() {
            if committed || now.duration_since(since) >= STABLE_AFTER {
                self.backoff.reset();
            }
        }
        self.backoff.next_delay()
    }
}

/// Whether to subscribe after a CONNACK: on the first of the process (the
/// configuration may have changed since the session was made), when the
/// broker lost the session, and until the broker has confirmed every
/// filter once (a SUBSCRIBE lost with its connection is not resent by
/// rumqttc).
#[derive(Debug, Default)]
struct Subscriptions {
    /// Every filter was confirmed by a SUBACK since the process started.
    confirmed: bool,
    /// SUBACKs still expected for the subscriptions sent.
    awaiting: usize,
}

impl Subscriptions {
    /// A CONNACK: true if the filters (`count`) must be subscribed now.
    fn connected(&mut self, session_present: bool, count: usize) -> bool {
        if count == 0 {
            // Nothing to subscribe to (a session 0 whose streams all
            // have sessions of their own).
            self.confirmed = true;
            return false;
        }
        if self.confirmed && session_present {
            return false;
        }
        self.confirmed = false;
        self.awaiting = count;
        true
    }

    /// A SUBACK; `ok`: the broker granted every filter in it.
    fn acked(&mut self, ok: bool) {
        if !ok {
            self.awaiting = usize::MAX;
        }
        self.awaiting = self.awaiting.saturating_sub(1);
        if self.awaiting == 0 {
            self.confirmed = true;
        }
    }
}

/// Which acknowledgements the broker has processed. It handles one
/// connection's packets in order, so the UNSUBACK to an UNSUBSCRIBE sent
/// after some PUBACKs proves it processed them, and may give their packet
/// ids to new messages. The store uses that to tell a new message that
/// happens to be byte-identical to the last one under its packet id from a
/// redelivery ([`crate::store::Command::AcksConfirmed`]). One barrier is
/// outstanding at a time: about one per round trip while acks flow.
#[derive(Debug, Default)]
struct AckBarrier {
    epoch: u64,
    /// The newest commit whose ack went out on this connection and no
    /// barrier follows yet.
    unconfirmed: Option<u64>,
    /// The commit the outstanding barrier confirms.
    outstanding: Option<u64>,
    /// UNSUBSCRIBEs of other filters sent on this connection and not yet
    /// answered (see [`Session::give_back_moved`]). The broker answers in
    /// order; whichever UNSUBACK comes, it proves at least as much as the
    /// barrier's, so the first ones answer these and the last the barrier.
    extra: usize,
    /// How many of those were answered on this connection.
    extra_answered: usize,
}

impl AckBarrier {
    /// A new connection: barriers of the old one will never be answered.
    fn connected(&mut self, epoch: u64) {
        *self = AckBarrier {
            epoch,
            ..AckBarrier::default()
        };
    }

    /// The ack of a message of commit `gen` went out on connection `epoch`.
    fn acked(&mut self, epoch: u64, gen: u64) {
        if epoch == self.epoch && gen > 0 {
            self.unconfirmed = Some(self.unconfirmed.map_or(gen, |g| g.max(gen)));
        }
    }

    /// Whether to send a barrier now through the client of connection
    /// `epoch` (acks went out on this connection that none follows, and
    /// none is outstanding); the barrier then confirms them.
    fn send_now(&mut self, epoch: u64) -> bool {
        if epoch != self.epoch || self.outstanding.is_some() || self.unconfirmed.is_none() {
            return false;
        }
        self.outstanding = self.unconfirmed.take();
        true
    }

    /// An UNSUBACK: the connection and commit the barrier confirms, if it
    /// was the barrier's answer.
    fn answered(&mut self) -> Option<(u64, u64)> {
        if self.extra > 0 {
            self.extra -= 1;
            self.extra_answered += 1;
            return None;
        }
        self.outstanding.take().map(|gen| (self.epoch, gen))
    }
}

/// Sends the PUBACK of every committed message of the current connection
/// through that connection's own client (none between connections, or
/// while ingest is paused), and after them the acknowledgement barrier.
/// Acks come one batch per commit, so a barrier follows every ack of each
/// commit it confirms (a commit whose acks were still arriving when the
/// barrier went out would be confirmed with some of them unsent: a crash
/// then, and their redeliveries would be taken for new messages).
async fn send_acks(
    current: watch::Receiver<Option<(u64, AsyncClient)>>,
    mut acks: UnboundedReceiver<Vec<AckToken>>,
    committed: Arc<AtomicU64>,
    barrier: Arc<Mutex<AckBarrier>>,
    answered: Arc<Notify>,
) {
    loop {
        let first = tokio::select! {
            a = acks.recv() => match a {
                Some(a) => Some(a),
                None => return,
            },
            _ = answered.notified() => None,
        };
        // The client is the one of `epoch`: if that connection ends
        // meanwhile, what is handed to it is dropped with it.
        let Some((epoch, client)) = current.borrow().clone() else {
            continue;
        };
        let mut next = first;
        while let Some(batch) = next.take().or_else(|| acks.try_recv().ok()) {
            for a in batch {
                if a.epoch != epoch {
                    continue;
                }
                committed.store(a.epoch, Ordering::Release);
                let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
                p.pkid = a.pkid;
                // A closed client means its connection is gone; the broker
                // redelivers the message and it is acked then.
                if client.ack(&p).await.is_ok() {
                    barrier.lock().expect("barrier lock").acked(a.epoch, a.gen);
                }
            }
        }
        let send = barrier.lock().expect("barrier lock").send_now(epoch);
        if send {
            let _ = client.unsubscribe(BARRIER_FILTER).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::guard::{Framer, Mark, Rewritten, CAP, KEEP};
    use super::*;
    use crate::config::{Limits, Overflow, StreamConfig, StreamKind, Subscription};

    fn layout() -> Layout {
        Layout::new(&[StreamConfig {
            name: "status".into(),
            kind: StreamKind::State,
            subscriptions: vec![Subscription {
                filter: "devices/+/state".into(),
                device_id_level: 1,
            }],
            topic: "persistent://t/n/status".into(),
            history_topic: None,
            overflow: Overflow::Coalesce,
            limits: Limits::default(),
        }])
    }

    /// A PUBLISH as rumqttc hands it over after the guard: the broker's
    /// bytes through a framer with `mark`, parsed by rumqttc.
    fn through_guard(mark: Mark, qos: u8, topic: &[u8], payload: &[u8]) -> Publish {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        raw.extend_from_slice(topic);
        if qos > 0 {
            raw.extend_from_slice(&9u16.to_be_bytes());
        }
        raw.extend_from_slice(payload);
        let mut packet = vec![0x30 | qos << 1];
        let mut n = raw.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            packet.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        packet.extend(raw);
        let mut out = Vec::new();
        let mut rw: Vec<Rewritten> = Vec::new();
        Framer::new(mark, CAP)
            .feed(&packet, &mut out, &mut rw)
            .unwrap();
        match rumqttc::Packet::read(&mut bytes::BytesMut::from(&out[..]), CAP).unwrap() {
            Packet::Publish(p) => p,
            other => panic!("{other:?}"),
        }
    }

    async fn to_store(mark: Mark, p: Publish, budget: &Budget) -> Inbound {
        let rewrite = mark.read(&p.payload);
        let share = budget.reserve(cost(&p)).await;
        inbound(&layout(), p, rewrite, 0, 3, share)
    }

    #[tokio::test]
    async fn an_ordinary_message_goes_to_its_stream_unchanged() {
        let mark = Mark::random();
        let budget = Budget::new(1 << 20);
        let p = through_guard(mark, 1, b"devices/d1/state", b"{\"n\":1}");
        let m = to_store(mark, p, &budget).await;
        assert_eq!((m.stream, m.device.as_deref()), (Some(0), Some("d1")));
        assert_eq!(&m.payload[..], b"{\"n\":1}");
        assert_eq!(
            m.ack,
            Some(AckToken {
                pkid: 9,
                session: 0,
                epoch: 3,
                gen: 0
            })
        );
        assert!(budget.available() < 1 << 20);
        drop(m);
        assert_eq!(
            budget.available(),
            1 << 20,
            "the store dropping it frees its share"
        );
    }

    #[tokio::test]
    async fn a_cut_payload_reaches_the_store_with_its_real_size_over_any_limit() {
        let mark = Mark::random();
        let budget = Budget::new(intake::INTAKE_BYTES);
        let n = CAP + 1000;
        let payload: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
        let p = through_guard(mark, 1, b"devices/d2/state", &payload);
        assert!(p.payload.len() < KEEP + 100, "rumqttc got the cut packet");
        let m = to_store(mark, p, &budget).await;
        assert_eq!(m.guarded, Some(Guarded::Cut { len: n as u64 }));
        assert_eq!(m.size(), n as u64);
        assert!(m.size() > crate::config::MAX_PAYLOAD_BYTES as u64);
        assert_eq!(&m.payload[..], &payload[..KEEP]);
        assert_eq!((m.stream, m.device.as_deref()), (Some(0), Some("d2")));
        assert_eq!(m.mqtt_topic, "devices/d2/state");
        assert!(m.ack.is_some(), "acknowledged once dead-lettered");
        let reason = crate::store::db::dead_letter_reason(&m, crate::config::MAX_PAYLOAD_BYTES);
        assert!(reason.unwrap().contains(&format!("payload of {n} bytes")));
        let taken = intake::INTAKE_BYTES - budget.available();
        assert!(taken < KEEP + 1024, "{taken}");
    }

    #[tokio::test]
    async fn a_topic_that_is_not_utf8_matches_no_stream_and_says_so() {
        let mark = Mark::random();
        let budget = Budget::new(1 << 20);
        let p = through_guard(mark, 1, b"devices/\xff/state", b"{}");
        let m = to_store(mark, p, &budget).await;
        assert_eq!(m.stream, None);
        assert_eq!(m.guarded, Some(Guarded::TopicNotUtf8));
        assert_eq!(
            crate::store::db::dead_letter_reason(&m, 1024).as_deref(),
            Some("topic is not valid UTF-8")
        );
        assert_eq!(m.mqtt_topic, "$ferry/invalid-utf8/devices/%FF/state");
        assert_eq!(&m.payload[..], b"{}");
        assert!(m.ack.is_some());
    }

    #[tokio::test]
    async fn a_payload_with_another_processs_mark_is_an_ordinary_payload() {
        let mark = Mark::random();
        let budget = Budget::new(1 << 20);
        let p = through_guard(Mark::random(), 0, b"devices/\xfe/state", b"x");
        let len = p.payload.len();
        let m = to_store(mark, p, &budget).await;
        assert_eq!(m.payload.len(), len);
    }

    #[test]
    fn a_barrier_confirms_exactly_the_acks_sent_before_it_on_its_connection() {
        let mut b = AckBarrier::default();
        b.connected(1);
        assert!(!b.send_now(1), "nothing to confirm");
        b.acked(1, 4);
        b.acked(1, 5);
        assert!(b.send_now(1));
        // Acks of commit 6 go out while the barrier is on its way.
        b.acked(1, 6);
        assert!(!b.send_now(1), "one barrier at a time");
        assert_eq!(b.answered(), Some((1, 5)));
        assert!(b.send_now(1));
        assert_eq!(b.answered(), Some((1, 6)));
        assert_eq!(b.answered(), None);
        // An ack of an earlier connection (it never went out on this one)
        // and a new connection while a barrier is outstanding.
        b.acked(1, 7);
        assert!(b.send_now(1));
        b.connected(2);
        b.acked(1, 8);
        assert_eq!(b.answered(), None, "the old barrier is never answered");
        assert!(!b.send_now(2));
        b.acked(2, 9);
        assert!(
            !b.send_now(1),
            "never through the client of an earlier connection"
        );
        assert!(b.send_now(2));
        assert_eq!(b.answered(), Some((2, 9)));
    }

    #[test]
    fn unsubscribes_of_moved_filters_never_pass_for_the_barriers_answer() {
        // The barrier goes out, then two UNSUBSCRIBEs of moved filters: the
        // first two answers are theirs as far as the barrier knows, the
        // third confirms it (it proves at least as much).
        let mut b = AckBarrier::default();
        b.connected(1);
        b.acked(1, 4);
        assert!(b.send_now(1));
        b.extra += 2;
        assert_eq!(b.answered(), None);
        assert_eq!(b.answered(), None);
        assert_eq!(b.extra_answered, 2);
        assert_eq!(b.answered(), Some((1, 4)));
        // A new connection forgets what the old one had outstanding.
        b.extra += 1;
        b.connected(2);
        assert_eq!((b.extra, b.extra_answered), (0, 0));
    }

    #[test]
    fn the_backoff_starts_over_only_after_a_good_connection() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut r = Reconnect::new();
        let step = |d: Duration| d.as_millis() as u64;
        // Connections that end right after CONNACK: the waits grow.
        let mut waits = Vec::new();
        let mut at = 0;
        for _ in 0..6 {
            r.connected(ms(at));
            let d = r.lost(ms(at + 10), false);
            waits.push(step(d));
            at += 10 + step(d);
        }
        for (w, base) in waits.iter().zip([200, 400, 800, 1600, 3200, 6400]) {
            assert!(*w >= base && *w < base + base / 4, "{waits:?}");
        }
        // A connection that stayed up 30 s starts over.
        r.connected(ms(at));
        let d = r.lost(ms(at) + STABLE_AFTER, false);
        assert!(step(d) < 250, "{d:?}");
        // So does one that delivered a committed message, however short.
        r.lost(ms(at), false);
        r.lost(ms(at), false);
        r.connected(ms(at));
        let d = r.lost(ms(at + 50), true);
        assert!(step(d) < 250, "{d:?}");
        // Failed connection attempts (no CONNACK) keep growing, whatever
        // the connection before them delivered.
        let a = r.lost(ms(at), true);
        let b = r.lost(ms(at), true);
        let c = r.lost(ms(at), true);
        assert!(step(b) >= 800 && step(c) >= 1600, "{a:?} {b:?} {c:?}");
    }

    #[test]
    fn subscriptions_are_sent_on_the_first_connack_and_when_the_session_is_lost() {
        let mut s = Subscriptions::default();
        // The first CONNACK of the process, even with a session present.
        assert!(s.connected(true, 2));
        s.acked(true);
        // A reconnect before both SUBACKs came: again.
        assert!(s.connected(true, 2));
        s.acked(true);
        s.acked(true);
        // Confirmed: a present session keeps them.
        assert!(!s.connected(true, 2));
        assert!(!s.connected(true, 2));
        // The broker lost the session.
        assert!(s.connected(false, 2));
        s.acked(true);
        s.acked(false);
        // A refused filter is asked for again at the next connection.
        assert!(s.connected(true, 2));
    }
}
