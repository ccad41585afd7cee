//! One MQTT session of ingest: its connections to the broker (a new
//! rumqttc client for each), the messages it hands to the store, and
//! `send_acks`, which acknowledges what the store committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::ack_line::AckLine;
use super::guard::{self, Guard, Mark};
use super::intake::{self, Budget};
use super::state::{AckBarrier, Reconnect, Subscriptions};
use super::{cost, inbound, IngestError, Shared, BARRIER_FILTER};
use crate::config::MqttConfig;
use crate::layout::{Layout, SessionSpec};
use crate::mqtt_events::Events;
use crate::store::{AckToken, Intake, StoreHandle};

/// One MQTT session (`index` in [`Layout::sessions`]) until `shutdown`.
/// `moved`: filters of other sessions that session 0 unsubscribes from (see
/// [`Session::give_back_moved`]).
#[allow(clippy::too_many_arguments)]
pub(super) async fn lane(
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
    /// The client and ack line of the current connection, with its epoch,
    /// from its CONNACK until it ends: `send_acks` sends an ack only on the
    /// line of the connection it belongs to.
    current: watch::Sender<Option<(u64, AsyncClient, AckLine)>>,
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
                    match self.guard.ack_line() {
                        Some(line) => {
                            self.current.send_replace(Some((n, client.clone(), line)));
                        }
                        None => tracing::error!("mqtt guard: no ack line for this connection; nothing is acknowledged on it"),
                    }
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

/// Sends the PUBACK of every committed message of the current connection
/// on that connection's ack line (none between connections, or while
/// ingest is paused), all that is ready in one run, and after them the
/// acknowledgement barrier through the connection's client. Acks come one
/// batch per commit, so a barrier follows every ack of each commit it
/// confirms (a commit whose acks were still arriving when the barrier went
/// out would be confirmed with some of them unsent: a crash then, and their
/// redeliveries would be taken for new messages).
async fn send_acks(
    current: watch::Receiver<Option<(u64, AsyncClient, AckLine)>>,
    mut acks: UnboundedReceiver<Vec<AckToken>>,
    committed: Arc<AtomicU64>,
    barrier: Arc<Mutex<AckBarrier>>,
    answered: Arc<Notify>,
) {
    let mut pkids = Vec::new();
    loop {
        let first = tokio::select! {
            a = acks.recv() => match a {
                Some(a) => Some(a),
                None => return,
            },
            _ = answered.notified() => None,
        };
        // The line is the one of `epoch`: if that connection ends
        // meanwhile, what is handed to it is dropped with it.
        let Some((epoch, client, line)) = current.borrow().clone() else {
            continue;
        };
        let mut next = first;
        let mut gen = 0;
        while let Some(batch) = next.take().or_else(|| acks.try_recv().ok()) {
            for a in batch.into_iter().filter(|a| a.epoch == epoch) {
                pkids.push(a.pkid);
                gen = gen.max(a.gen);
            }
        }
        if !pkids.is_empty() {
            committed.store(epoch, Ordering::Release);
            // A line whose relay is gone means its connection is gone; the
            // broker redelivers those messages and they are acked then.
            if line.send(std::mem::take(&mut pkids)) {
                barrier.lock().expect("barrier lock").acked(epoch, gen);
            }
        }
        let send = barrier.lock().expect("barrier lock").send_now(epoch);
        if send {
            let _ = client.unsubscribe(BARRIER_FILTER).await;
        }
    }
}
