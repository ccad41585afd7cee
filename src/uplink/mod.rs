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

pub mod frame;
pub mod producer;

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use pulsar::proto::{
    self, base_command::Type, command_lookup_topic_response::LookupType, BaseCommand, KeyValue,
    MessageMetadata,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{parse_service_url, Config};
use crate::store::{Record, StoreError, StoreHandle};
use frame::{Frame, FrameError};
use producer::{ProducerError, ProducerState};

/// Pulsar protocol version ferry speaks.
const PROTOCOL_VERSION: i32 = 19;
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
    #[error("broker closed the connection")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
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

impl UplinkError {
    /// Store failures end ferry; everything else is worth another try.
    pub fn is_fatal(&self) -> bool {
        matches!(self, UplinkError::Store(_))
    }
}

/// Settings of one uplink, from the configuration.
#[derive(Debug, Clone)]
pub struct UplinkSettings {
    pub gateway_id: String,
    pub service_host: String,
    pub service_port: u16,
    pub topic: String,
    pub producer_name: String,
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long to wait for receipts of what is in flight.
    pub drain_timeout: Duration,
}

impl UplinkSettings {
    pub fn from_config(cfg: &Config) -> UplinkSettings {
        UplinkSettings {
            gateway_id: cfg.gateway_id.clone(),
            service_host: cfg.pulsar.host.clone(),
            service_port: cfg.pulsar.port,
            topic: cfg.pulsar.topic.clone(),
            producer_name: producer_name(&cfg.gateway_id, &cfg.pulsar.topic),
            max_in_flight: cfg.uplink.max_in_flight,
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

/// Runs the uplink until `shutdown`; returns early only on a fatal error.
pub async fn run(
    settings: UplinkSettings,
    store: StoreHandle,
    committed: watch::Receiver<u64>,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    let mut uplink = Uplink {
        state: ProducerState::new(settings.max_in_flight),
        backoff: Backoff::new(settings.backoff_min, settings.backoff_max),
        settings,
        store,
        committed,
        shutdown,
        reported: 0,
    };
    loop {
        match uplink.session().await {
            Ok(SessionEnd::Shutdown) => return Ok(()),
            Err(e) if e.is_fatal() => return Err(e),
            Err(e) => {
                uplink.state.on_disconnect();
                uplink.report_delivered()?;
                let delay = match e {
                    UplinkError::ProducerClosed => uplink.settings.backoff_min,
                    _ => uplink.backoff.next_delay(),
                };
                tracing::warn!(error = %e, topic = %uplink.settings.topic, retry_in_ms = delay.as_millis() as u64,
                    "uplink disconnected; records stay in the store");
                tokio::select! {
                    _ = uplink.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

struct Uplink {
    settings: UplinkSettings,
    store: StoreHandle,
    committed: watch::Receiver<u64>,
    shutdown: CancellationToken,
    state: ProducerState,
    backoff: Backoff,
    /// Highest confirmed record already reported to the store.
    reported: u64,
}

impl Uplink {
    async fn session(&mut self) -> Result<SessionEnd, UplinkError> {
        let shutdown = self.shutdown.clone();
        let mut conn = tokio::select! {
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            c = self.connect_to_topic() => c?,
        };
        let last_sequence_id = self.create_producer(&mut conn).await?;
        let outcome = self.store.resume(last_sequence_id).await?;
        let cursor = self.state.on_ready(last_sequence_id);
        self.reported = self.reported.max(cursor);
        self.backoff.reset();
        if outcome.renumbered_by > 0 {
            tracing::error!(last_sequence_id, renumbered_by = outcome.renumbered_by,
                "broker holds record numbers this store never gave out (store replaced?); pending records renumbered above them");
        }
        tracing::info!(topic = %self.settings.topic, producer = %self.settings.producer_name, broker = %conn.addr,
            last_sequence_id, skipped = outcome.skipped, "producer ready");

        let mut buffer: VecDeque<Record> = VecDeque::new();
        let mut ping = tokio::time::interval(KEEPALIVE);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut last_heard = Instant::now();
        loop {
            // Fill the window from the store, in record order.
            while self.state.room() > 0 {
                if buffer.is_empty() {
                    let last_committed = *self.committed.borrow_and_update();
                    if last_committed <= self.state.cursor() {
                        break;
                    }
                    let limit = self.settings.max_in_flight.max(64);
                    buffer.extend(self.store.fetch(self.state.cursor(), limit).await?);
                    if buffer.is_empty() {
                        break;
                    }
                }
                let Some(rec) = buffer.pop_front() else { break };
                if rec.seq <= self.state.cursor() {
                    continue;
                }
                encode_send(&self.settings, &rec, &mut conn.wbuf);
                self.state.on_send(rec.seq, Instant::now());
            }
            conn.flush().await?;

            let deadline = self.state.next_deadline(self.settings.operation_timeout);
            let want_more = buffer.is_empty() && self.state.room() > 0;
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.drain(&mut conn).await;
                    return Ok(SessionEnd::Shutdown);
                }
                frame = conn.read_frame() => {
                    last_heard = Instant::now();
                    self.handle(&mut conn, frame?)?;
                    // Take whatever else already arrived before writing more.
                    while let Some(f) = conn.try_frame()? {
                        self.handle(&mut conn, f)?;
                    }
                    self.report_delivered()?;
                }
                r = self.committed.changed(), if want_more => {
                    if r.is_err() {
                        // The store is gone: ferry is stopping.
                        return Ok(SessionEnd::Shutdown);
                    }
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > 2 * KEEPALIVE {
                        return Err(UplinkError::Timeout("any frame from the broker"));
                    }
                    conn.push(&command(Type::Ping, |c| c.ping = Some(proto::CommandPing {})));
                }
                _ = sleep_until_opt(deadline) => {
                    self.state.check_timeout(Instant::now(), self.settings.operation_timeout)?;
                }
            }
        }
    }

    /// Handles one frame of an established session.
    fn handle(&mut self, conn: &mut Conn, f: Frame) -> Result<(), UplinkError> {
        let c = f.command;
        if let Some(r) = c.send_receipt {
            if r.producer_id == PRODUCER_ID {
                self.state.on_receipt(r.sequence_id)?;
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
        } else if c.close_producer.is_some() {
            return Err(UplinkError::ProducerClosed);
        } else if let Some(e) = c.error {
            tracing::warn!(error = %server_error(e.error), message = %e.message, "broker error");
        }
        Ok(())
    }

    /// Tells the store what the broker confirmed since the last report.
    fn report_delivered(&mut self) -> Result<(), UplinkError> {
        let confirmed = self.state.confirmed();
        let resent = self.state.take_resent();
        if confirmed > self.reported || resent > 0 {
            self.store.delivered(confirmed, resent)?;
            self.reported = confirmed;
        }
        Ok(())
    }

    /// On shutdown: wait a little for the receipts of what is in flight.
    async fn drain(&mut self, conn: &mut Conn) {
        let deadline = tokio::time::Instant::now() + self.settings.drain_timeout;
        while self.state.in_flight() > 0 {
            let frame = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                f = conn.read_frame() => f,
            };
            match frame.and_then(|f| self.handle(conn, f)) {
                Ok(()) => {}
                Err(_) => break,
            }
        }
        let left = self.state.in_flight();
        let _ = self.report_delivered();
        tracing::info!(
            unconfirmed = left,
            "uplink stopped; unconfirmed records stay in the store"
        );
    }

    /// Connects to the broker that serves the topic.
    async fn connect_to_topic(&self) -> Result<Conn, UplinkError> {
        let s = &self.settings;
        let mut conn = Conn::open(&s.service_host, s.service_port, None, s).await?;
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
            let reply = conn
                .request(&lookup, request_id, "lookup", s.operation_timeout)
                .await?;
            let Some(r) = reply.command.lookup_topic_response else {
                return Err(UplinkError::Timeout("lookup response"));
            };
            let url = r.broker_service_url.clone().unwrap_or_default();
            match LookupType::try_from(r.response.unwrap_or(0)).unwrap_or(LookupType::Failed) {
                LookupType::Failed => {
                    return Err(UplinkError::Lookup {
                        topic: s.topic.clone(),
                        error: r.error.map(server_error).unwrap_or_default(),
                        message: r.message.unwrap_or_default(),
                    })
                }
                LookupType::Redirect => {
                    let (host, port) = parse_service_url(&url)
                        .map_err(|_| UplinkError::BadBrokerUrl(url.clone()))?;
                    authoritative = r.authoritative.unwrap_or(false);
                    conn = if r.proxy_through_service_url.unwrap_or(false) {
                        Conn::open(&s.service_host, s.service_port, Some(&url), s).await?
                    } else {
                        Conn::open(&host, port, None, s).await?
                    };
                }
                LookupType::Connect => {
                    if r.proxy_through_service_url.unwrap_or(false) {
                        return Conn::open(&s.service_host, s.service_port, Some(&url), s).await;
                    }
                    let (host, port) = parse_service_url(&url)
                        .map_err(|_| UplinkError::BadBrokerUrl(url.clone()))?;
                    if (host.as_str(), port) == (conn.host.as_str(), conn.port) {
                        return Ok(conn);
                    }
                    return Conn::open(&host, port, None, s).await;
                }
            }
        }
        Err(UplinkError::TooManyRedirects(s.topic.clone()))
    }

    /// Creates the producer; returns the broker's `last_sequence_id`.
    async fn create_producer(&mut self, conn: &mut Conn) -> Result<i64, UplinkError> {
        let s = &self.settings;
        let request_id = conn.next_request_id();
        let cmd = command(Type::Producer, |c| {
            c.producer = Some(proto::CommandProducer {
                topic: s.topic.clone(),
                producer_id: PRODUCER_ID,
                request_id,
                producer_name: Some(s.producer_name.clone()),
                user_provided_producer_name: Some(true),
                ..Default::default()
            })
        });
        let mut reply = conn
            .request(&cmd, request_id, "producer", s.operation_timeout)
            .await?;
        loop {
            match reply.command.producer_success {
                Some(ok) if ok.producer_ready != Some(false) => {
                    return Ok(ok.last_sequence_id.unwrap_or(-1))
                }
                Some(_) => {
                    // Waiting for exclusive access; the broker sends another
                    // PRODUCER_SUCCESS when it is granted.
                    reply = conn
                        .wait_for(request_id, "producer", s.operation_timeout)
                        .await?;
                }
                None => return Err(UplinkError::Timeout("producer success")),
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

fn server_error(code: i32) -> String {
    proto::ServerError::try_from(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|_| format!("error {code}"))
}

/// Builds a `BaseCommand` of one type.
fn command(t: Type, fill: impl FnOnce(&mut BaseCommand)) -> BaseCommand {
    let mut c = BaseCommand {
        r#type: t as i32,
        ..Default::default()
    };
    fill(&mut c);
    c
}

/// Appends the SEND frame of one record.
fn encode_send(s: &UplinkSettings, rec: &Record, dst: &mut BytesMut) {
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
        partition_key: Some(rec.device.clone()),
        event_time: Some(rec.received_ms),
        properties: vec![
            kv("ferry.gateway", s.gateway_id.clone()),
            kv("ferry.record", rec.seq.to_string()),
            kv("ferry.received_ms", rec.received_ms.to_string()),
            kv("mqtt.topic", rec.props.mqtt_topic.clone()),
        ],
        ..Default::default()
    };
    frame::encode_with_payload(&send, &metadata, &rec.payload, dst);
}

/// One TCP connection to a broker, after CONNECT/CONNECTED.
struct Conn {
    host: String,
    port: u16,
    addr: String,
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    request_id: u64,
}

impl Conn {
    async fn open(
        host: &str,
        port: u16,
        proxy_to: Option<&str>,
        s: &UplinkSettings,
    ) -> Result<Conn, UplinkError> {
        let addr = format!("{host}:{port}");
        let stream = tokio::time::timeout(s.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| UplinkError::Timeout("tcp connect"))?
            .map_err(|source| UplinkError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            host: host.to_string(),
            port,
            addr,
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            request_id: 0,
        };
        let connect = command(Type::Connect, |c| {
            c.connect = Some(proto::CommandConnect {
                client_version: format!("ferry/{}", env!("CARGO_PKG_VERSION")),
                protocol_version: Some(PROTOCOL_VERSION),
                proxy_to_broker_url: proxy_to.map(str::to_string),
                feature_flags: Some(proto::FeatureFlags {
                    supports_auth_refresh: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            })
        });
        conn.push(&connect);
        conn.flush().await?;
        let wait = async {
            loop {
                let f = conn.read_frame().await?;
                if f.command.connected.is_some() {
                    return Ok(());
                }
                if let Some(e) = f.command.error {
                    return Err(UplinkError::Broker {
                        during: "connect",
                        error: server_error(e.error),
                        message: e.message,
                    });
                }
            }
        };
        tokio::time::timeout(s.operation_timeout, wait)
            .await
            .map_err(|_| UplinkError::Timeout("connected"))??;
        Ok(conn)
    }

    fn next_request_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    fn push(&mut self, cmd: &BaseCommand) {
        frame::encode_command(cmd, &mut self.wbuf);
    }

    async fn flush(&mut self) -> Result<(), UplinkError> {
        if !self.wbuf.is_empty() {
            self.stream
                .write_all(&self.wbuf)
                .await
                .map_err(|source| UplinkError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// A frame already in the read buffer, if any.
    fn try_frame(&mut self) -> Result<Option<Frame>, UplinkError> {
        Ok(frame::decode(&mut self.rbuf)?)
    }

    /// Reads the next frame. Cancel-safe: partial input stays in `rbuf`.
    async fn read_frame(&mut self) -> Result<Frame, UplinkError> {
        loop {
            if let Some(f) = frame::decode(&mut self.rbuf)? {
                return Ok(f);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|source| UplinkError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(UplinkError::Closed);
            }
        }
    }

    /// Sends a request and waits for the answer with the same request id.
    async fn request(
        &mut self,
        cmd: &BaseCommand,
        request_id: u64,
        during: &'static str,
        limit: Duration,
    ) -> Result<Frame, UplinkError> {
        self.push(cmd);
        self.flush().await?;
        self.wait_for(request_id, during, limit).await
    }

    /// Waits for the answer to `request_id`, answering pings meanwhile.
    async fn wait_for(
        &mut self,
        request_id: u64,
        during: &'static str,
        limit: Duration,
    ) -> Result<Frame, UplinkError> {
        let wait = async {
            loop {
                let f = self.read_frame().await?;
                let c = &f.command;
                if c.ping.is_some() {
                    self.push(&command(Type::Pong, |c| {
                        c.pong = Some(proto::CommandPong {})
                    }));
                    self.flush().await?;
                    continue;
                }
                if let Some(e) = &c.error {
                    if e.request_id == request_id {
                        return Err(UplinkError::Broker {
                            during,
                            error: server_error(e.error),
                            message: e.message.clone(),
                        });
                    }
                }
                let answers = c.lookup_topic_response.as_ref().map(|r| r.request_id)
                    == Some(request_id)
                    || c.producer_success.as_ref().map(|r| r.request_id) == Some(request_id);
                if answers {
                    return Ok(f);
                }
            }
        };
        tokio::time::timeout(limit, wait)
            .await
            .map_err(|_| UplinkError::Timeout(during))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
