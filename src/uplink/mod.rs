//! The uplink: ferry's own idempotent Pulsar producer.
//!
//! It speaks the Pulsar binary protocol directly (the `pulsar` crate's
//! producer can neither set sequence ids nor report the broker's
//! `last_sequence_id`). One session is: connect, CONNECT, LOOKUP (following
//! redirects), PRODUCER with a stable name, then stream the store's records
//! in order with `sequence_id` = record number and a bounded window of sends
//! awaiting their receipt. On PRODUCER_SUCCESS the broker names the last
//! record it holds and everything up to it is dropped from the store unsent.
//! Any error ends the session; the loop backs off and starts a new one, which
//! resends in order whatever was not confirmed.
//!
//! The decisions live in [`producer::ProducerState`] and the byte layout in
//! [`frame`]; this module owns the sockets and the timers.

pub mod auth;
pub mod conn;
pub mod frame;
pub mod producer;
pub mod tls;

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use pulsar::proto::{
    self, base_command::Type, command_lookup_topic_response::LookupType, KeyValue, MessageMetadata,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{parse_service_url, Config, TlsConfig, TokenSource};
use crate::layout::{DestIx, Layout};
use crate::store::{Record, StoreError, StoreHandle};
use conn::{command, server_error, Conn, Endpoint};
use frame::{Frame, FrameError};
use producer::{ProducerError, ProducerState};

/// Lookups may redirect this many times before ferry gives up.
const MAX_REDIRECTS: usize = 8;
/// Ferry pings the broker this often and expects some frame within twice it.
const KEEPALIVE: Duration = Duration::from_secs(30);
/// The only producer on each connection.
const PRODUCER_ID: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {failure}")]
    Tls {
        addr: String,
        failure: tls::TlsFailure,
    },
    #[error(transparent)]
    TlsSetup(#[from] tls::TlsSetupError),
    #[error(transparent)]
    Token(#[from] auth::AuthError),
    #[error("broker rejected the token{}: {message}", role_suffix(.role))]
    AuthRejected {
        message: String,
        role: Option<String>,
    },
    #[error("not authorized to produce on {topic}{}: {message}", role_suffix(.role))]
    NotAuthorized {
        topic: String,
        role: Option<String>,
        message: String,
    },
    #[error("topic {topic} is terminated: it accepts no more messages")]
    TopicTerminated { topic: String },
    #[error("broker closed the connection")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("timed out writing to {addr}: the broker took nothing for {waited_ms} ms ({pending} bytes waiting)")]
    WriteStalled {
        addr: String,
        pending: usize,
        waited_ms: u64,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("broker refused {during}: {error} ({message})")]
    Broker {
        during: &'static str,
        error: String,
        message: String,
    },
    #[error("lookup of {topic} failed: {error} ({message})")]
    Lookup {
        topic: String,
        error: String,
        message: String,
    },
    #[error("lookup of {0} redirected too many times")]
    TooManyRedirects(String),
    #[error("broker answered with an unusable url `{0}`")]
    BadBrokerUrl(String),
    #[error("lookup of {topic} sent ferry to `{url}`, a plaintext broker, while pulsar.service_url uses TLS; ferry never leaves TLS, so this is a misconfigured cluster (the brokers must advertise their TLS listener, brokerServicePortTls)")]
    TlsDowngrade { topic: String, url: String },
    #[error("lookup of {topic} sent ferry to `{url}`, a TLS broker, while pulsar.service_url is plain pulsar://; use pulsar+ssl:// with [pulsar.tls]")]
    TlsNotConfigured { topic: String, url: String },
    #[error("lookup of {0} answered without a broker url")]
    NoBrokerUrl(String),
    #[error("broker closed the producer")]
    ProducerClosed,
    #[error("broker refused record {seq}: {error} ({message})")]
    SendError {
        seq: u64,
        error: String,
        message: String,
    },
    #[error(transparent)]
    Producer(#[from] ProducerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn role_suffix(role: &Option<String>) -> String {
    role.as_ref()
        .map(|r| format!(" as role {r}"))
        .unwrap_or_default()
}

/// What an error means for the uplink loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network or broker trouble: back off and try again.
    Transient,
    /// Needs an operator (certificate, token, permission, terminated
    /// topic): keep the data, retry slowly, say why.
    NeedsOperator,
    /// The store is unusable: ferry stops.
    Fatal,
}

impl UplinkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            UplinkError::Store(StoreError::DiskFull) => ErrorClass::Transient,
            // Nothing was changed; an operator must find the other producer
            // (or the broker's broken state).
            UplinkError::Store(StoreError::SequenceRefused { .. }) => ErrorClass::NeedsOperator,
            UplinkError::Store(_) => ErrorClass::Fatal,
            UplinkError::Tls { failure, .. } => match failure {
                tls::TlsFailure::Other(_) => ErrorClass::Transient,
                _ => ErrorClass::NeedsOperator,
            },
            UplinkError::TlsSetup(_)
            | UplinkError::Token(_)
            | UplinkError::AuthRejected { .. }
            | UplinkError::NotAuthorized { .. }
            | UplinkError::TopicTerminated { .. }
            | UplinkError::TlsDowngrade { .. }
            | UplinkError::TlsNotConfigured { .. } => ErrorClass::NeedsOperator,
            _ => ErrorClass::Transient,
        }
    }
}

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
    pub max_in_flight: usize,
    /// Payload bytes in flight (and fetched ahead), at most; one record
    /// always goes.
    pub max_in_flight_bytes: usize,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long to wait for receipts of what is in flight.
    pub drain_timeout: Duration,
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
            max_in_flight: cfg.uplink.max_in_flight,
            max_in_flight_bytes: cfg.uplink.max_in_flight_bytes,
            connect_timeout: cfg.uplink.connect_timeout,
            operation_timeout: cfg.uplink.operation_timeout,
            backoff_min: cfg.uplink.backoff_min,
            backoff_max: cfg.uplink.backoff_max,
            drain_timeout: cfg.uplink.drain_timeout,
        }
    }
}

/// The stable producer name: the broker keys its deduplication state by it,
/// so it must be the same after every restart of the same gateway.
pub fn producer_name(gateway_id: &str, topic: &str) -> String {
    let local = topic.rsplit('/').next().unwrap_or(topic);
    format!("ferry-{gateway_id}-{local}")
}

/// Exponential backoff with jitter.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    /// The next wait: the current step with up to 25% jitter; the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = base.as_millis() as u64 / 4;
        base + Duration::from_millis(if jitter > 0 {
            rand::random::<u64>() % jitter
        } else {
            0
        })
    }
}

/// How a session ended without an error.
enum SessionEnd {
    Shutdown,
}

/// Status topics get this long after a (re)connect to send each device's
/// current state before history and events topics start sending anyway.
const PRIORITY_WAIT: Duration = Duration::from_secs(30);

/// Lets history and events sessions wait until every status topic has sent
/// its backlog, so that after an outage the fleet sees current state first.
#[derive(Clone)]
pub struct DrainGate {
    /// Per session: true while a status session has not caught up.
    behind: std::sync::Arc<watch::Sender<Vec<bool>>>,
}

impl DrainGate {
    pub fn new(sessions: usize) -> DrainGate {
        DrainGate {
            behind: std::sync::Arc::new(watch::channel(vec![false; sessions]).0),
        }
    }

    fn set(&self, session: usize, behind: bool) {
        self.behind.send_if_modified(|v| {
            let changed = v[session] != behind;
            v[session] = behind;
            changed
        });
    }

    fn open(&self) -> bool {
        !self.behind.borrow().iter().any(|b| *b)
    }
}

/// Runs one session per destination until `shutdown`; returns early only on
/// a fatal error. Each session ticks a beat of its own in `health` (see
/// [`Uplink::session`] for when).
pub async fn run_all(
    sessions: Vec<UplinkSettings>,
    store: StoreHandle,
    committed: watch::Receiver<Vec<u64>>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    health: crate::notify::Health,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    let gate = DrainGate::new(sessions.len());
    for (i, s) in sessions.iter().enumerate() {
        // Until a status session has caught up, the others wait.
        gate.set(i, s.drains_first);
    }
    let runs = sessions.into_iter().enumerate().map(|(i, s)| {
        let m = metrics.uplink(&s.topic);
        let beat = health.beat(format!("uplink {}", s.topic));
        run(
            s,
            i,
            beat,
            gate.clone(),
            store.clone(),
            committed.clone(),
            live.clone(),
            m,
            shutdown.clone(),
        )
    });
    futures::future::try_join_all(runs).await.map(|_| ())
}

/// Runs the session of one destination until `shutdown`; returns early only
/// on a fatal error.
#[allow(clippy::too_many_arguments)]
async fn run(
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
    let mut uplink = Uplink {
        live,
        metrics,
        state: ProducerState::new(settings.max_in_flight, settings.max_in_flight_bytes),
        backoff: Backoff::new(settings.backoff_min, settings.backoff_max),
        settings,
        session,
        beat,
        gate,
        store,
        committed,
        shutdown,
        reported: 0,
    };
    loop {
        match uplink.session().await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Err(e) => {
                let class = e.class();
                if class == ErrorClass::Fatal {
                    return Err(e);
                }
                uplink.state.on_disconnect();
                if uplink.settings.drains_first {
                    uplink.gate.set(uplink.session, true);
                }
                uplink.report_delivered()?;
                uplink.metrics.connected.set(0);
                uplink.metrics.reconnects.inc();
                let delay = match (&e, class) {
                    (UplinkError::ProducerClosed, _) => uplink.settings.backoff_min,
                    // Retrying fast cannot fix a certificate or a permission.
                    (_, ErrorClass::NeedsOperator) => uplink.settings.backoff_max,
                    _ => uplink.backoff.next_delay(),
                };
                let retry_in_ms = delay.as_millis() as u64;
                uplink.live.pulsar_down(
                    &uplink.settings.topic,
                    &uplink.settings.service.to_string(),
                    e.to_string(),
                );
                if class == ErrorClass::NeedsOperator {
                    tracing::error!(error = %e, topic = %uplink.settings.topic, retry_in_ms,
                        "uplink blocked until an operator fixes this; records stay in the store");
                } else {
                    tracing::warn!(error = %e, topic = %uplink.settings.topic, retry_in_ms,
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
    state: ProducerState,
    backoff: Backoff,
    /// Highest confirmed record already reported to the store.
    reported: u64,
}

impl Uplink {
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
        let setup = async {
            let mut conn = connect_to_topic(&self.settings).await?;
            let name = self.settings.producer_name.clone();
            let last_sequence_id = create_producer(&mut conn, &self.settings, &name).await?;
            let outcome = self.store.resume(dest, last_sequence_id).await?;
            Ok::<_, UplinkError>((conn, last_sequence_id, outcome))
        };
        let Some(ready) = bounded(&self.beat, &shutdown, setup).await else {
            return Ok(SessionEnd::Shutdown);
        };
        let (mut conn, last_sequence_id, outcome) = ready?;
        let cursor = self.state.on_ready(last_sequence_id);
        self.reported = self.reported.max(cursor);
        self.backoff.reset();
        self.live
            .pulsar_up(&self.settings.topic, &conn.endpoint.to_string());
        self.metrics.connected.set(1);
        self.metrics.skipped.inc_by(outcome.skipped);
        self.metrics.auth_challenges.inc_by(conn.challenges);
        // History and events wait (a while at most) for the status topics.
        let ready_at = Instant::now();
        let mut gate = self.gate.behind.subscribe();
        let mut waiting = !self.settings.drains_first && !self.gate.open();
        if waiting {
            tracing::info!(topic = %self.settings.topic, "waiting for the status topics to send current state first");
        }
        let mut challenges_seen = conn.challenges;
        if outcome.renumbered_by > 0 {
            tracing::error!(last_sequence_id, renumbered_by = outcome.renumbered_by,
                "broker holds record numbers this store never gave out (store replaced?); pending records renumbered above them");
        }
        tracing::info!(topic = %self.settings.topic, producer = %self.settings.producer_name, broker = %conn.endpoint,
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
            if waiting && (self.gate.open() || ready_at.elapsed() >= PRIORITY_WAIT) {
                waiting = false;
            }
            // Fill the window from the store, in record order.
            while self.state.room() > 0 && !waiting {
                if buffer.is_empty() {
                    let last_committed = self.committed.borrow_and_update()[dest];
                    if last_committed <= self.state.cursor() {
                        self.caught_up();
                        break;
                    }
                    // Fetched ahead: the window's worth of payload bytes.
                    let limit = self.settings.max_in_flight.max(64);
                    let bytes = self.settings.max_in_flight_bytes;
                    let after = self.state.cursor();
                    buffer.extend(self.store.fetch(dest, after, limit, bytes).await?);
                    if buffer.is_empty() {
                        break;
                    }
                }
                let Some(rec) = buffer.front() else { break };
                if rec.seq <= self.state.cursor() {
                    buffer.pop_front();
                    continue;
                }
                if !self.state.may_send(rec.payload.len()) {
                    break;
                }
                let Some(rec) = buffer.pop_front() else { break };
                let (seq, bytes) = (rec.seq, rec.payload.len());
                encode_send(&self.settings, rec, &mut conn.wbuf);
                self.state.on_send(seq, bytes, Instant::now());
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

            let deadline = self.state.next_deadline(self.settings.operation_timeout);
            let want_more = buffer.is_empty() && self.state.room() > 0 && !waiting;
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
                    if conn.challenges > challenges_seen {
                        self.metrics.auth_challenges.inc_by(conn.challenges - challenges_seen);
                        challenges_seen = conn.challenges;
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
                    conn.push(&command(Type::Ping, |c| c.ping = Some(proto::CommandPing {})));
                }
                _ = sleep_until_opt(deadline) => {
                    self.state.check_timeout(Instant::now(), self.settings.operation_timeout)?;
                }
                _ = alive.tick() => {}
            }
        }
    }

    /// Handles one frame of an established session.
    async fn handle(&mut self, conn: &mut Conn, f: Frame) -> Result<(), UplinkError> {
        let c = f.command;
        if let Some(r) = c.send_receipt {
            if r.producer_id == PRODUCER_ID {
                if let producer::Receipt::Confirmed { sent, .. } =
                    self.state.on_receipt(r.sequence_id)?
                {
                    self.metrics.acknowledged.inc();
                    self.metrics
                        .send_latency
                        .observe(sent.elapsed().as_secs_f64());
                }
            }
        } else if let Some(e) = c.send_error {
            return Err(UplinkError::SendError {
                seq: e.sequence_id,
                error: server_error(e.error),
                message: e.message,
            });
        } else if c.ping.is_some() {
            conn.push(&command(Type::Pong, |c| {
                c.pong = Some(proto::CommandPong {})
            }));
        } else if c.auth_challenge.is_some() {
            conn.answer_challenge(&self.settings).await?;
        } else if c.close_producer.is_some() {
            return Err(UplinkError::ProducerClosed);
        } else if let Some(e) = c.error {
            tracing::warn!(error = %server_error(e.error), message = %e.message, "broker error");
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
        let confirmed = self.state.confirmed();
        let resent = self.state.take_resent();
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
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        let receipts = async {
            loop {
                // What is written already (a part of a frame included) is
                // completed first: receipts come only for whole frames.
                conn.flush().await?;
                if self.state.in_flight() == 0 {
                    return Ok(());
                }
                let f = conn.read_frame().await?;
                self.handle(conn, f).await?;
                self.beat.tick();
            }
        };
        let _: Result<Result<(), UplinkError>, _> =
            tokio::time::timeout_at(deadline, receipts).await;
        let left = self.state.in_flight();
        let _ = self.report_delivered();
        tracing::info!(
            unconfirmed = left,
            "uplink stopped; unconfirmed records stay in the store"
        );
    }
}

/// Awaits `fut`, whose own timeouts bound it, ticking `beat` every second
/// meanwhile; `None` if `shutdown` came first.
async fn bounded<F: std::future::Future>(
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

/// Connects to the broker that serves the topic: LOOKUP on the service URL,
/// following redirects, connecting directly or through a proxy as told.
pub async fn connect_to_topic(s: &UplinkSettings) -> Result<Conn, UplinkError> {
    let mut conn = Conn::open(s.service.clone(), None, s).await?;
    let mut authoritative = false;
    for _ in 0..MAX_REDIRECTS {
        let request_id = conn.next_request_id();
        let lookup = command(Type::Lookup, |c| {
            c.lookup_topic = Some(proto::CommandLookupTopic {
                topic: s.topic.clone(),
                request_id,
                authoritative: Some(authoritative),
                ..Default::default()
            })
        });
        let reply = conn.request(&lookup, request_id, "lookup", s).await?;
        let Some(r) = reply.command.lookup_topic_response else {
            return Err(UplinkError::Timeout("lookup response"));
        };
        let step = lookup_step(s, r, conn.role.clone())?;
        match step.route {
            Route::Proxy(url) => {
                // Keep talking to the service URL; the proxy forwards to `url`.
                let next = Conn::open(s.service.clone(), Some(&url), s).await?;
                if step.serves_topic {
                    return Ok(next);
                }
                conn = next;
            }
            Route::Direct(target) => {
                if step.serves_topic && target == conn.endpoint {
                    return Ok(conn);
                }
                conn = Conn::open(target, None, s).await?;
                if step.serves_topic {
                    return Ok(conn);
                }
            }
        }
        authoritative = step.authoritative;
    }
    Err(UplinkError::TooManyRedirects(s.topic.clone()))
}

/// Where a lookup answer sends the uplink next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A connection of its own to this broker.
    Direct(Endpoint),
    /// The connection to the service URL, through the proxy there, which
    /// forwards to the broker this URL names.
    Proxy(String),
}

/// What one LOOKUP answer means, decided without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupStep {
    pub route: Route,
    /// The broker on `route` serves the topic (CONNECT); otherwise look up
    /// again there (REDIRECT).
    pub serves_topic: bool,
    /// Passed on with the next lookup after a redirect.
    pub authoritative: bool,
}

/// Reads a LOOKUP answer: a refusal, a redirect or the broker to produce
/// on, directly or through the proxy. `role` names the token's role in
/// refusals.
///
/// Ferry never leaves TLS once `pulsar.service_url` is `pulsar+ssl://`: a
/// direct connection must go to the answer's `broker_service_url_tls`, and
/// that must be a `pulsar+ssl://` URL; a plaintext URL there, or only a
/// plaintext `broker_service_url`, is a misconfigured cluster
/// ([`UplinkError::TlsDowngrade`]), never a reason to send the token and
/// the records in the clear. Through a proxy, ferry's connection stays the
/// one to the service URL; the URL only tells the proxy which broker to
/// forward to (a Pulsar proxy puts the one URL it reaches the broker by in
/// both fields, TLS or not: how it gets there is the proxy's part).
pub fn lookup_step(
    s: &UplinkSettings,
    r: proto::CommandLookupTopicResponse,
    role: Option<String>,
) -> Result<LookupStep, UplinkError> {
    let kind = LookupType::try_from(r.response.unwrap_or(0)).unwrap_or(LookupType::Failed);
    if kind == LookupType::Failed {
        return Err(match r.error {
            Some(code) if conn::is_refusal(code) => {
                conn::refusal("lookup", code, r.message.unwrap_or_default(), s, role)
            }
            code => UplinkError::Lookup {
                topic: s.topic.clone(),
                error: code.map(server_error).unwrap_or_default(),
                message: r.message.unwrap_or_default(),
            },
        });
    }
    let given = |u: Option<String>| u.filter(|u| !u.is_empty());
    let (plain_url, tls_url) = (given(r.broker_service_url), given(r.broker_service_url_tls));
    let no_url = || UplinkError::NoBrokerUrl(s.topic.clone());
    let route = if r.proxy_through_service_url.unwrap_or(false) {
        let url = if s.service.tls {
            tls_url.or(plain_url)
        } else {
            plain_url.or(tls_url)
        };
        Route::Proxy(url.ok_or_else(no_url)?)
    } else {
        // The URL of ferry's own scheme; the other one only to say why not.
        let (url, other) = if s.service.tls {
            (tls_url, plain_url)
        } else {
            (plain_url, tls_url)
        };
        let url = url.or(other).ok_or_else(no_url)?;
        let (host, port, tls) =
            parse_service_url(&url).map_err(|_| UplinkError::BadBrokerUrl(url.clone()))?;
        match (s.service.tls, tls) {
            (true, false) => {
                return Err(UplinkError::TlsDowngrade {
                    topic: s.topic.clone(),
                    url,
                })
            }
            (false, true) => {
                return Err(UplinkError::TlsNotConfigured {
                    topic: s.topic.clone(),
                    url,
                })
            }
            _ => Route::Direct(Endpoint { host, port, tls }),
        }
    };
    Ok(LookupStep {
        route,
        serves_topic: kind == LookupType::Connect,
        authoritative: r.authoritative.unwrap_or(false),
    })
}

/// Creates a producer named `name`; returns the broker's `last_sequence_id`.
pub async fn create_producer(
    conn: &mut Conn,
    s: &UplinkSettings,
    name: &str,
) -> Result<i64, UplinkError> {
    let request_id = conn.next_request_id();
    let cmd = command(Type::Producer, |c| {
        c.producer = Some(proto::CommandProducer {
            topic: s.topic.clone(),
            producer_id: PRODUCER_ID,
            request_id,
            producer_name: Some(name.to_string()),
            user_provided_producer_name: Some(true),
            ..Default::default()
        })
    });
    let mut reply = conn.request(&cmd, request_id, "producer", s).await?;
    loop {
        match reply.command.producer_success {
            Some(ok) if ok.producer_ready != Some(false) => {
                return Ok(ok.last_sequence_id.unwrap_or(-1))
            }
            Some(_) => {
                // Waiting for exclusive access; the broker sends another
                // PRODUCER_SUCCESS when it is granted.
                reply = conn.wait_for(request_id, "producer", s).await?;
            }
            None => return Err(UplinkError::Timeout("producer success")),
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Appends the SEND frame of one record (taken by value: its strings move
/// into the metadata instead of being copied).
fn encode_send(s: &UplinkSettings, rec: Record, dst: &mut BytesMut) {
    let send = command(Type::Send, |c| {
        c.send = Some(proto::CommandSend {
            producer_id: PRODUCER_ID,
            sequence_id: rec.seq,
            num_messages: Some(1),
            ..Default::default()
        })
    });
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
    frame::encode_with_payload(&send, &metadata, &rec.payload, dst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TlsConfig, TokenSource};
    use proto::{BaseCommand, CommandConnect, CommandLookupTopic, CommandLookupTopicResponse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    fn settings(port: u16) -> UplinkSettings {
        UplinkSettings {
            dest: 0,
            drains_first: true,
            gateway_id: "gw".into(),
            service: Endpoint {
                host: "127.0.0.1".into(),
                port,
                tls: false,
            },
            tls: None,
            auth: None,
            topic: "persistent://t/n/status".into(),
            producer_name: "ferry-gw-status".into(),
            max_in_flight: 10,
            max_in_flight_bytes: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            drain_timeout: Duration::from_millis(100),
        }
    }

    type Answer = Box<dyn Fn(&CommandLookupTopic, u16) -> CommandLookupTopicResponse + Send + Sync>;

    /// A fake broker at the I/O seam: answers CONNECT, and LOOKUP as told;
    /// reports every CONNECT and LOOKUP it saw.
    async fn fake_broker(answer: Answer) -> (u16, mpsc::UnboundedReceiver<BaseCommand>) {
        fake_broker_with(None, answer).await
    }

    /// [`fake_broker`], speaking TLS when given an acceptor.
    async fn fake_broker_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        answer: Answer,
    ) -> (u16, mpsc::UnboundedReceiver<BaseCommand>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, rx) = mpsc::unbounded_channel();
        let answer = std::sync::Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (seen, answer, tls) = (seen.clone(), answer.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(sock) = acceptor.accept(sock).await {
                                answer_lookups(sock, port, seen, answer).await;
                            }
                        }
                        None => answer_lookups(sock, port, seen, answer).await,
                    }
                });
            }
        });
        (port, rx)
    }

    async fn answer_lookups<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut sock: S,
        port: u16,
        seen: mpsc::UnboundedSender<BaseCommand>,
        answer: std::sync::Arc<Answer>,
    ) {
        let mut buf = BytesMut::new();
        loop {
            while let Some(f) = frame::decode(&mut buf).unwrap() {
                let mut out = BytesMut::new();
                let c = f.command.clone();
                let _ = seen.send(f.command);
                if c.connect.is_some() {
                    let reply = command(Type::Connected, |r| {
                        r.connected = Some(proto::CommandConnected {
                            server_version: "fake".into(),
                            ..Default::default()
                        })
                    });
                    frame::encode_command(&reply, &mut out);
                } else if let Some(l) = &c.lookup_topic {
                    let reply = command(Type::LookupResponse, |r| {
                        r.lookup_topic_response = Some(answer(l, port))
                    });
                    frame::encode_command(&reply, &mut out);
                }
                if sock.write_all(&out).await.is_err() || sock.flush().await.is_err() {
                    return;
                }
            }
            if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    }

    /// A throwaway folder, removed on drop.
    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "ferry-uplink-{name}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for `localhost` and a token file: the
    /// acceptor of a TLS fake broker, and a function that gives ferry's
    /// settings for that broker's port (trusting the certificate).
    fn tls_pki(
        dir: &std::path::Path,
    ) -> (tokio_rustls::TlsAcceptor, impl Fn(u16) -> UplinkSettings) {
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, key.cert.pem()).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "secret-token\n").unwrap();
        let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![key.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
        )
        .unwrap();
        let settings_for = move |port| {
            let mut s = settings(port);
            s.service = Endpoint {
                host: "localhost".into(),
                port,
                tls: true,
            };
            s.tls = Some(TlsConfig {
                ca_file: Some(ca.clone()),
                use_system_roots: false,
                client_cert: None,
            });
            s.auth = Some(TokenSource::File(token.clone()));
            s
        };
        (
            tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server)),
            settings_for,
        )
    }

    fn lookup_reply(
        l: &CommandLookupTopic,
        kind: LookupType,
        url: String,
        authoritative: bool,
        proxy: bool,
    ) -> CommandLookupTopicResponse {
        CommandLookupTopicResponse {
            broker_service_url: Some(url),
            response: Some(kind as i32),
            request_id: l.request_id,
            authoritative: Some(authoritative),
            proxy_through_service_url: Some(proxy),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_lookup_redirect_is_followed_to_the_owning_broker() {
        let (owner, mut owner_seen) = fake_broker(Box::new(|l, me| {
            lookup_reply(
                l,
                LookupType::Connect,
                format!("pulsar://127.0.0.1:{me}"),
                true,
                false,
            )
        }))
        .await;
        let (service, _) = fake_broker(Box::new(move |l, _| {
            lookup_reply(
                l,
                LookupType::Redirect,
                format!("pulsar://127.0.0.1:{owner}"),
                true,
                false,
            )
        }))
        .await;
        let conn = connect_to_topic(&settings(service)).await.unwrap();
        assert_eq!(conn.endpoint.port, owner);
        let mut lookups = Vec::new();
        while let Ok(c) = owner_seen.try_recv() {
            lookups.extend(c.lookup_topic);
        }
        assert_eq!(lookups.len(), 1);
        assert_eq!(
            lookups[0].authoritative,
            Some(true),
            "the redirect's authority is passed on"
        );
    }

    #[tokio::test]
    async fn a_lookup_that_asks_for_the_proxy_keeps_the_service_url() {
        let (service, mut seen) = fake_broker(Box::new(|l, _| {
            lookup_reply(
                l,
                LookupType::Connect,
                "pulsar://10.1.2.3:6650".into(),
                false,
                true,
            )
        }))
        .await;
        let conn = connect_to_topic(&settings(service)).await.unwrap();
        assert_eq!(conn.endpoint.port, service);
        let mut connects: Vec<CommandConnect> = Vec::new();
        while let Ok(c) = seen.try_recv() {
            connects.extend(c.connect);
        }
        assert_eq!(connects.len(), 2);
        assert_eq!(connects[0].proxy_to_broker_url, None);
        assert_eq!(
            connects[1].proxy_to_broker_url.as_deref(),
            Some("pulsar://10.1.2.3:6650")
        );
        assert_eq!(
            connects[1]
                .feature_flags
                .as_ref()
                .and_then(|f| f.supports_auth_refresh),
            Some(true)
        );
    }

    fn tls_settings() -> UplinkSettings {
        let mut s = settings(6651);
        s.service = Endpoint {
            host: "pulsar.example".into(),
            port: 6651,
            tls: true,
        };
        s
    }

    /// A lookup answer with both URLs as given.
    fn answer(
        kind: LookupType,
        plain: Option<&str>,
        tls: Option<&str>,
        proxy: bool,
    ) -> CommandLookupTopicResponse {
        CommandLookupTopicResponse {
            broker_service_url: plain.map(str::to_string),
            broker_service_url_tls: tls.map(str::to_string),
            response: Some(kind as i32),
            request_id: 1,
            authoritative: Some(true),
            proxy_through_service_url: Some(proxy),
            ..Default::default()
        }
    }

    fn direct(host: &str, port: u16, tls: bool) -> Route {
        Route::Direct(Endpoint {
            host: host.into(),
            port,
            tls,
        })
    }

    #[test]
    fn a_lookup_answer_redirects_or_names_the_broker_of_the_same_scheme() {
        use LookupType::{Connect, Redirect};
        let plain = settings(6650);
        let step = lookup_step(
            &plain,
            answer(
                Redirect,
                Some("pulsar://b2:6650"),
                Some("pulsar+ssl://b2:6651"),
                false,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            step,
            LookupStep {
                route: direct("b2", 6650, false),
                serves_topic: false,
                authoritative: true
            }
        );
        let step = lookup_step(
            &plain,
            answer(Connect, Some("pulsar://b2:6650"), None, false),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (direct("b2", 6650, false), true)
        );

        let tls = tls_settings();
        let step = lookup_step(
            &tls,
            answer(
                Redirect,
                Some("pulsar://b2:6650"),
                Some("pulsar+ssl://b2:6651"),
                false,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (direct("b2", 6651, true), false)
        );
        let step = lookup_step(
            &tls,
            answer(
                Connect,
                Some("pulsar://b2:6650"),
                Some("pulsar+ssl://b2:6651"),
                false,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (direct("b2", 6651, true), true)
        );
    }

    #[test]
    fn a_lookup_answer_through_the_proxy_keeps_the_service_connection() {
        use LookupType::{Connect, Redirect};
        let step = lookup_step(
            &settings(6650),
            answer(Connect, Some("pulsar://10.1.2.3:6650"), None, true),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (Route::Proxy("pulsar://10.1.2.3:6650".into()), true)
        );
        // A Pulsar proxy puts the one URL it reaches the broker by in both
        // fields; ferry's own connection stays TLS to the proxy.
        let step = lookup_step(
            &tls_settings(),
            answer(
                Connect,
                Some("pulsar://10.1.2.3:6650"),
                Some("pulsar://10.1.2.3:6650"),
                true,
            ),
            None,
        )
        .unwrap();
        assert_eq!(step.route, Route::Proxy("pulsar://10.1.2.3:6650".into()));
        let step = lookup_step(
            &tls_settings(),
            answer(
                Redirect,
                Some("pulsar://10.1.2.3:6650"),
                Some("pulsar+ssl://10.1.2.3:6651"),
                true,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (Route::Proxy("pulsar+ssl://10.1.2.3:6651".into()), false)
        );
    }

    #[test]
    fn a_lookup_answer_never_switches_tls_off() {
        use LookupType::{Connect, Redirect};
        let tls = tls_settings();
        for (kind, plain, tls_url) in [
            // The TLS field names a plaintext broker.
            (Connect, Some("pulsar://b2:6650"), Some("pulsar://b2:6650")),
            (Redirect, None, Some("pulsar://b2:6650")),
            // No TLS field, only the plaintext one.
            (Connect, Some("pulsar://b2:6650"), None),
            (Redirect, Some("pulsar://b2:6650"), Some("")),
        ] {
            let err = lookup_step(&tls, answer(kind, plain, tls_url, false), None)
                .expect_err("a plaintext broker is refused");
            assert!(
                matches!(&err, UplinkError::TlsDowngrade { url, .. } if url == "pulsar://b2:6650"),
                "{kind:?} {plain:?} {tls_url:?}: {err:?}"
            );
            assert_eq!(err.class(), ErrorClass::NeedsOperator);
            assert!(err.to_string().contains("never leaves TLS"), "{err}");
        }
        // Without TLS settings ferry cannot verify a TLS broker either.
        let err = lookup_step(
            &settings(6650),
            answer(Connect, None, Some("pulsar+ssl://b2:6651"), false),
            None,
        )
        .expect_err("no TLS settings");
        assert!(
            matches!(err, UplinkError::TlsNotConfigured { .. }),
            "{err:?}"
        );
        assert_eq!(err.class(), ErrorClass::NeedsOperator);
    }

    #[test]
    fn a_lookup_answer_without_a_usable_url_is_an_error() {
        use LookupType::Connect;
        for (s, a) in [
            (settings(6650), answer(Connect, None, None, false)),
            (settings(6650), answer(Connect, Some(""), None, false)),
            (tls_settings(), answer(Connect, None, None, false)),
            (settings(6650), answer(Connect, None, None, true)),
            (tls_settings(), answer(Connect, None, None, true)),
        ] {
            let err = lookup_step(&s, a, None).expect_err("no url");
            assert!(matches!(err, UplinkError::NoBrokerUrl(_)), "{err:?}");
        }
        for url in [
            "http://b2:8080",
            "pulsar://b2:notaport",
            "pulsar://b2:1,b3:2",
        ] {
            let err = lookup_step(
                &settings(6650),
                answer(Connect, Some(url), None, false),
                None,
            )
            .expect_err("bad url");
            assert!(
                matches!(&err, UplinkError::BadBrokerUrl(u) if u == url),
                "{err:?}"
            );
        }
        let err = lookup_step(
            &tls_settings(),
            answer(Connect, None, Some("pulsar+ssl://b2:0"), false),
            None,
        )
        .expect_err("bad url");
        assert!(matches!(err, UplinkError::BadBrokerUrl(_)), "{err:?}");
    }

    #[test]
    fn a_failed_lookup_is_a_refusal_or_a_lookup_error() {
        let mut denied = answer(LookupType::Failed, None, None, false);
        denied.error = Some(proto::ServerError::AuthorizationError as i32);
        denied.message = Some("no produce permission".into());
        let err = lookup_step(&settings(6650), denied, Some("gw-a".into())).unwrap_err();
        assert!(
            matches!(&err, UplinkError::NotAuthorized { role: Some(r), .. } if r == "gw-a"),
            "{err:?}"
        );
        let mut busy = answer(LookupType::Failed, None, None, false);
        busy.error = Some(proto::ServerError::ServiceNotReady as i32);
        let err = lookup_step(&settings(6650), busy, None).unwrap_err();
        assert!(matches!(err, UplinkError::Lookup { .. }), "{err:?}");
        assert_eq!(err.class(), ErrorClass::Transient);
    }

    #[tokio::test]
    async fn a_tls_lookup_that_names_a_plaintext_broker_gets_neither_token_nor_records() {
        // The plaintext broker the lookup points at records what reaches it.
        let (plain, mut plain_seen) = fake_broker(Box::new(|l, me| {
            lookup_reply(
                l,
                LookupType::Connect,
                format!("pulsar://127.0.0.1:{me}"),
                true,
                false,
            )
        }))
        .await;
        let dir = Scratch::new("downgrade");
        let (acceptor, settings_for) = tls_pki(&dir.0);
        let (service, mut seen) = fake_broker_with(
            Some(acceptor),
            Box::new(move |l, _| CommandLookupTopicResponse {
                broker_service_url: Some(format!("pulsar://127.0.0.1:{plain}")),
                broker_service_url_tls: Some(format!("pulsar://127.0.0.1:{plain}")),
                response: Some(LookupType::Connect as i32),
                request_id: l.request_id,
                authoritative: Some(true),
                ..Default::default()
            }),
        )
        .await;
        let s = settings_for(service);
        let outcome = connect_to_topic(&s).await;
        let mut connects = 0;
        while let Ok(c) = seen.try_recv() {
            connects += c.connect.iter().count();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut leaked = Vec::new();
        while let Ok(c) = plain_seen.try_recv() {
            leaked.push(c);
        }
        assert!(leaked.is_empty(), "the plaintext broker got {leaked:?}");
        match outcome {
            Ok(conn) => panic!("connected to {} in plaintext", conn.endpoint),
            Err(e) => {
                assert!(matches!(e, UplinkError::TlsDowngrade { .. }), "{e:?}");
                assert_eq!(e.class(), ErrorClass::NeedsOperator);
            }
        }
        assert_eq!(connects, 1, "the TLS service broker was reached");
    }

    /// How a producing fake broker misbehaves once the producer is ready.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Hostile {
        /// Never reads from the connection again (keeps it open).
        StopsReading,
        /// Reads every SEND but never sends a receipt.
        WithholdsReceipts,
    }

    /// What a producing fake broker saw: per connection, the payload bytes
    /// of the SENDs it received.
    #[derive(Default)]
    struct Received {
        payload_bytes: std::sync::Mutex<Vec<u64>>,
        producers: std::sync::atomic::AtomicUsize,
    }

    impl Received {
        fn per_connection(&self) -> Vec<u64> {
            self.payload_bytes.lock().unwrap().clone()
        }
    }

    /// A fake broker at the socket seam that lets ferry connect, look the
    /// topic up (itself) and create its producer, and then misbehaves. Its
    /// receive buffer is small, so that when it stops reading, ferry's
    /// writes stop soon.
    async fn producing_broker(mode: Hostile) -> (u16, std::sync::Arc<Received>) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(64 * 1024).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(16).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(Received::default());
        let received = seen.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move { produce_badly(sock, port, mode, seen).await });
            }
        });
        (port, received)
    }

    async fn produce_badly(
        mut sock: tokio::net::TcpStream,
        port: u16,
        mode: Hostile,
        seen: std::sync::Arc<Received>,
    ) {
        let conn_ix = {
            let mut v = seen.payload_bytes.lock().unwrap();
            v.push(0);
            v.len() - 1
        };
        let mut buf = BytesMut::new();
        loop {
            while let Ok(Some(f)) = frame::decode(&mut buf) {
                let c = f.command;
                let mut out = BytesMut::new();
                let mut stop_reading = false;
                if c.connect.is_some() {
                    let reply = command(Type::Connected, |r| {
                        r.connected = Some(proto::CommandConnected {
                            server_version: "fake".into(),
                            ..Default::default()
                        })
                    });
                    frame::encode_command(&reply, &mut out);
                } else if let Some(l) = &c.lookup_topic {
                    let reply = command(Type::LookupResponse, |r| {
                        r.lookup_topic_response = Some(lookup_reply(
                            l,
                            LookupType::Connect,
                            format!("pulsar://127.0.0.1:{port}"),
                            true,
                            false,
                        ))
                    });
                    frame::encode_command(&reply, &mut out);
                } else if let Some(p) = &c.producer {
                    let reply = command(Type::ProducerSuccess, |r| {
                        r.producer_success = Some(proto::CommandProducerSuccess {
                            request_id: p.request_id,
                            producer_name: p.producer_name.clone().unwrap_or_default(),
                            last_sequence_id: Some(-1),
                            ..Default::default()
                        })
                    });
                    frame::encode_command(&reply, &mut out);
                    seen.producers
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    stop_reading = mode == Hostile::StopsReading;
                } else if c.send.is_some() {
                    let len = f.payload.map(|(_, p)| p.len() as u64).unwrap_or(0);
                    seen.payload_bytes.lock().unwrap()[conn_ix] += len;
                } else if c.ping.is_some() {
                    frame::encode_command(
                        &command(Type::Pong, |r| r.pong = Some(proto::CommandPong {})),
                        &mut out,
                    );
                }
                if sock.write_all(&out).await.is_err() {
                    return;
                }
                if stop_reading {
                    // Keep the connection open, never read again.
                    std::future::pending::<()>().await;
                }
            }
            if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    }

    /// A real store in `dir` holding `n` records of `size` payload bytes for
    /// the topic of [`settings`], committed.
    async fn store_with(dir: &std::path::Path, n: usize, size: usize) -> crate::store::Store {
        let text = format!(
            r#"
gateway_id = "gw"
[[mqtt.subscriptions]]
filter = "devices/+/state"
device_id_level = 1
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
topic = "persistent://t/n/status"
[store]
path = "{}"
"#,
            dir.join("ferry.db").display()
        );
        let cfg = crate::config::parse(&text).unwrap();
        let (acks, _) = mpsc::unbounded_channel();
        let store = crate::store::Store::open(
            &cfg.store,
            Layout::new(&cfg.streams),
            acks,
            crate::notify::Health::default().beat("store"),
            crate::status::Live::default(),
            crate::metrics::Metrics::new(),
        )
        .unwrap();
        for i in 0..n {
            store
                .handle
                .insert(crate::store::Inbound {
                    mqtt_topic: format!("devices/d{i}/state"),
                    payload: bytes::Bytes::from(vec![b'x'; size]),
                    retain: false,
                    stream: Some(0),
                    device: Some(format!("d{i}")),
                    dup: false,
                    pkid: (i % 60_000) as u16 + 1,
                    ack: None,
                    counted: false,
                    guarded: None,
                })
                .unwrap();
        }
        let mut committed = store.committed.clone();
        tokio::time::timeout(
            Duration::from_secs(30),
            committed.wait_for(|c| c[0] >= n as u64),
        )
        .await
        .expect("records committed")
        .unwrap();
        store
    }

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
        Uplink {
            beat: health.beat("uplink"),
            live: crate::status::Live::default(),
            metrics: crate::metrics::Metrics::new().uplink(&settings.topic),
            state: ProducerState::new(settings.max_in_flight, settings.max_in_flight_bytes),
            backoff: Backoff::new(settings.backoff_min, settings.backoff_max),
            settings,
            session: 0,
            gate: DrainGate::new(1),
            store: store.handle.clone(),
            committed: store.committed.clone(),
            shutdown,
            reported: 0,
        }
    }

    #[tokio::test]
    async fn a_broker_that_stops_reading_ends_the_session_with_a_timeout() {
        let dir = Scratch::new("stops-reading");
        // 10 MiB: more than the socket buffers between ferry and the broker.
        let store = store_with(&dir.0, 40, 256 * 1024).await;
        let (port, seen) = producing_broker(Hostile::StopsReading).await;
        let mut s = settings(port);
        s.max_in_flight = 1000;
        s.operation_timeout = Duration::from_millis(1000);
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
        s.max_in_flight = 1000;
        s.operation_timeout = Duration::from_secs(60);
        s.drain_timeout = Duration::from_millis(300);
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
        s.max_in_flight = 1000;
        s.operation_timeout = Duration::from_secs(4);
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
            s.max_in_flight = 1000;
            s.max_in_flight_bytes = cap;
            s.operation_timeout = Duration::from_secs(5);
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
    async fn a_write_buffer_that_grew_is_given_back_once_written() {
        let (port, _) = producing_broker(Hostile::WithholdsReceipts).await;
        let s = settings(port);
        let mut conn = Conn::open(s.service.clone(), None, &s).await.unwrap();
        let big = vec![0u8; 8 * 1024 * 1024];
        conn.wbuf.extend_from_slice(&big);
        conn.flush().await.unwrap();
        assert!(
            conn.wbuf.capacity() <= conn::WBUF_KEEP,
            "capacity {} after writing 8 MiB",
            conn.wbuf.capacity()
        );
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
        s.backoff_min = Duration::from_millis(10);
        s.backoff_max = Duration::from_secs(30);
        let topic = s.topic.clone();
        let store = store_with(&dir.0, 1, 10).await;
        let live = crate::status::Live::default();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(run(
            s,
            0,
            crate::notify::Health::default().beat("uplink"),
            DrainGate::new(1),
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

    #[test]
    fn producer_names_are_stable_per_gateway_and_topic() {
        assert_eq!(
            producer_name("gw-1", "persistent://public/default/device-status"),
            "ferry-gw-1-device-status"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<u64> = (0..4).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!((100..125).contains(&d[0]), "{d:?}");
        assert!((200..250).contains(&d[1]), "{d:?}");
        assert!((350..438).contains(&d[2]), "{d:?}");
        assert!((350..438).contains(&d[3]), "{d:?}");
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(125));
    }
}
