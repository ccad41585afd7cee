//! One connection to a Pulsar broker: TCP, optional TLS, CONNECT/CONNECTED
//! with the token, and the requests that wait for an answer. Frames are
//! written into `wbuf` by whoever handles them and flushed by the owner's
//! loop, so reading stays cancel-safe; writing is cancel-safe too
//! ([`Conn::write_some`]), so that a loop can stop waiting for a broker that
//! no longer reads. Every write and every wait for an answer is bounded by
//! `uplink.operation_timeout`.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pulsar::proto::{self, base_command::Type, BaseCommand, ServerError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::auth::{self, Secret};
use super::frame::{self, Frame};
use super::tls;
use super::{UplinkError, UplinkSettings};

/// Pulsar protocol version ferry speaks.
const PROTOCOL_VERSION: i32 = 19;

/// Buffer capacity a connection starts with.
const BUF_INITIAL: usize = 64 * 1024;
/// A write buffer that grew past this (large records) is given back once
/// it has been written out, so that one burst does not hold its memory.
pub const WBUF_KEEP: usize = 1024 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A broker address as a lookup names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

pub struct Conn {
    pub endpoint: Endpoint,
    stream: Box<dyn Io>,
    rbuf: BytesMut,
    /// Frames to write; appended to by whoever handles a frame.
    pub wbuf: BytesMut,
    /// How much of `wbuf` is written already.
    written: usize,
    /// Everything in `wbuf` went to the stream, which may still hold some
    /// (TLS records) until flushed.
    unflushed: bool,
    /// Since when the broker has taken nothing of what waits to be written.
    write_waiting_since: Option<Instant>,
    /// How long the broker may take nothing (`uplink.operation_timeout`).
    write_timeout: Duration,
    request_id: u64,
    /// The role of the token this connection authenticated with (from its
    /// unverified `sub` claim), for messages.
    pub role: Option<String>,
    /// AUTH_CHALLENGEs answered on this connection.
    pub challenges: u64,
}

/// Builds a `BaseCommand` of one type.
pub fn command(t: Type, fill: impl FnOnce(&mut BaseCommand)) -> BaseCommand {
    let mut c = BaseCommand {
        r#type: t as i32,
        ..Default::default()
    };
    fill(&mut c);
    c
}

pub fn server_error(code: i32) -> String {
    ServerError::try_from(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|_| format!("error {code}"))
}

impl Conn {
    /// Connects, completes TLS if asked, and authenticates with CONNECT.
    /// `proxy_to` asks a Pulsar proxy at `endpoint` to forward to that broker.
    pub async fn open(
        endpoint: Endpoint,
        proxy_to: Option<&str>,
        s: &UplinkSettings,
    ) -> Result<Conn, UplinkError> {
        let addr = endpoint.to_string();
        // TLS is configured exactly when the service URL is pulsar+ssl://;
        // a connection never goes without it then (nor tries it without
        // trust anchors). `lookup_step` refuses such answers first.
        match (s.tls.is_some(), endpoint.tls) {
            (true, false) => {
                return Err(UplinkError::TlsDowngrade {
                    topic: s.topic.clone(),
                    url: format!("pulsar://{addr}"),
                })
            }
            (false, true) => {
                return Err(UplinkError::TlsNotConfigured {
                    topic: s.topic.clone(),
                    url: format!("pulsar+ssl://{addr}"),
                })
            }
            _ => {}
        }
        let tcp = tokio::time::timeout(
            s.connect_timeout,
            TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| UplinkError::Timeout("tcp connect"))?
        .map_err(|source| UplinkError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = match &s.tls {
            Some(cfg) => {
                let connector = tls::connector(cfg)?;
                let name = tls::server_name(&endpoint.host)?;
                let handshake = connector.connect(name, tcp);
                let tls = tokio::time::timeout(s.connect_timeout, handshake)
                    .await
                    .map_err(|_| UplinkError::Timeout("tls handshake"))?
                    .map_err(|e| io_error(&addr, e))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let mut conn = Conn {
            endpoint,
            stream,
            rbuf: BytesMut::with_capacity(BUF_INITIAL),
            wbuf: BytesMut::with_capacity(BUF_INITIAL),
            written: 0,
            unflushed: false,
            write_waiting_since: None,
            write_timeout: s.operation_timeout,
            request_id: 0,
            role: None,
            challenges: 0,
        };
        let token = match &s.auth {
            Some(src) => Some(auth::read_async(src, s.operation_timeout).await?),
            None => None,
        };
        conn.role = token.as_ref().and_then(Secret::role);
        let connect = command(Type::Connect, |c| {
            c.connect = Some(proto::CommandConnect {
                client_version: client_version(),
                protocol_version: Some(PROTOCOL_VERSION),
                proxy_to_broker_url: proxy_to.map(str::to_string),
                auth_method_name: token.as_ref().map(|_| auth::METHOD_TOKEN.to_string()),
                auth_data: token.as_ref().map(|t| t.expose().as_bytes().to_vec()),
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
                if f.command.auth_challenge.is_some() {
                    conn.answer_challenge(s).await?;
                    conn.flush().await?;
                    continue;
                }
                if let Some(e) = f.command.error {
                    let mut message = e.message;
                    if let Some(exp) = token.as_ref().and_then(Secret::expires_at) {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        if exp <= now {
                            message.push_str(&format!(" (the token expired {} s ago)", now - exp));
                        }
                    }
                    return Err(refusal("connect", e.error, message, s, conn.role.clone()));
                }
            }
        };
        tokio::time::timeout(s.operation_timeout, wait)
            .await
            .map_err(|_| UplinkError::Timeout("connected"))??;
        Ok(conn)
    }

    pub fn next_request_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    pub fn push(&mut self, cmd: &BaseCommand) {
        frame::encode_command(cmd, &mut self.wbuf);
    }

    /// Answers an AUTH_CHALLENGE with the token read again from its source.
    pub async fn answer_challenge(&mut self, s: &UplinkSettings) -> Result<(), UplinkError> {
        let Some(src) = &s.auth else {
            return Err(UplinkError::AuthRejected {
                message: "broker asks for credentials but pulsar.auth is not configured".into(),
                role: None,
            });
        };
        let token = auth::read_async(src, s.operation_timeout).await?;
        self.role = token.role().or(self.role.take());
        let response = command(Type::AuthResponse, |c| {
            c.auth_response = Some(proto::CommandAuthResponse {
                client_version: Some(client_version()),
                response: Some(proto::AuthData {
                    auth_method_name: Some(auth::METHOD_TOKEN.into()),
                    auth_data: Some(token.expose().as_bytes().to_vec()),
                }),
                protocol_version: Some(PROTOCOL_VERSION),
            })
        });
        self.push(&response);
        self.challenges += 1;
        tracing::info!(challenges = self.challenges, source = %auth::describe(src),
            "auth challenge answered with the token read again from its source");
        Ok(())
    }

    /// Whether frames wait to be written (or flushed).
    pub fn pending_write(&self) -> bool {
        self.written < self.wbuf.len() || self.unflushed
    }

    /// Writes what the broker takes now: returns once some bytes went out,
    /// or fails with [`UplinkError::WriteStalled`] when the broker has taken
    /// nothing for `operation_timeout` (a slow link makes progress; a broker
    /// that stopped reading does not). Cancel-safe: what was written stays
    /// written, and the clock keeps running across calls.
    pub async fn write_some(&mut self) -> Result<(), UplinkError> {
        let since = *self.write_waiting_since.get_or_insert_with(Instant::now);
        let deadline = tokio::time::Instant::from(since + self.write_timeout);
        let stalled = |c: &Conn| UplinkError::WriteStalled {
            addr: c.endpoint.to_string(),
            pending: c.wbuf.len() - c.written,
            waited_ms: c.write_timeout.as_millis() as u64,
        };
        if self.written < self.wbuf.len() {
            let write = self.stream.write(&self.wbuf[self.written..]);
            let n = match tokio::time::timeout_at(deadline, write).await {
                Err(_) => return Err(stalled(self)),
                Ok(r) => r.map_err(|e| io_error(&self.endpoint.to_string(), e))?,
            };
            if n == 0 {
                return Err(io_error(
                    &self.endpoint.to_string(),
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            self.written += n;
            self.write_waiting_since = Some(Instant::now());
            if self.written == self.wbuf.len() {
                self.wbuf.clear();
                self.written = 0;
                self.unflushed = true;
                if self.wbuf.capacity() > WBUF_KEEP {
                    self.wbuf = BytesMut::with_capacity(BUF_INITIAL);
                }
            }
            return Ok(());
        }
        if self.unflushed {
            match tokio::time::timeout_at(deadline, self.stream.flush()).await {
                Err(_) => return Err(stalled(self)),
                Ok(r) => r.map_err(|e| io_error(&self.endpoint.to_string(), e))?,
            }
            self.unflushed = false;
        }
        self.write_waiting_since = None;
        Ok(())
    }

    /// Writes everything pending (see [`Conn::write_some`] for the bound).
    pub async fn flush(&mut self) -> Result<(), UplinkError> {
        while self.pending_write() {
            self.write_some().await?;
        }
        Ok(())
    }

    /// A frame already in the read buffer, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, UplinkError> {
        Ok(frame::decode(&mut self.rbuf)?)
    }

    /// Reads the next frame. Cancel-safe: partial input stays in `rbuf`.
    pub async fn read_frame(&mut self) -> Result<Frame, UplinkError> {
        loop {
            if let Some(f) = frame::decode(&mut self.rbuf)? {
                return Ok(f);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| io_error(&self.endpoint.to_string(), e))?;
            if n == 0 {
                return Err(UplinkError::Closed);
            }
        }
    }

    /// Sends a request and waits for the answer with the same request id,
    /// answering pings and auth challenges meanwhile.
    pub async fn request(
        &mut self,
        cmd: &BaseCommand,
        request_id: u64,
        during: &'static str,
        s: &UplinkSettings,
    ) -> Result<Frame, UplinkError> {
        self.push(cmd);
        self.flush().await?;
        self.wait_for(request_id, during, s).await
    }

    pub async fn wait_for(
        &mut self,
        request_id: u64,
        during: &'static str,
        s: &UplinkSettings,
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
                if c.auth_challenge.is_some() {
                    self.answer_challenge(s).await?;
                    self.flush().await?;
                    continue;
                }
                if let Some(e) = &c.error {
                    if e.request_id == request_id {
                        return Err(refusal(
                            during,
                            e.error,
                            e.message.clone(),
                            s,
                            self.role.clone(),
                        ));
                    }
                }
                let answers = c.lookup_topic_response.as_ref().map(|r| r.request_id)
                    == Some(request_id)
                    || c.producer_success.as_ref().map(|r| r.request_id) == Some(request_id)
                    || c.success.as_ref().map(|r| r.request_id) == Some(request_id);
                if answers {
                    return Ok(f);
                }
            }
        };
        tokio::time::timeout(s.operation_timeout, wait)
            .await
            .map_err(|_| UplinkError::Timeout(during))?
    }
}

fn client_version() -> String {
    format!("ferry/{}", env!("CARGO_PKG_VERSION"))
}

/// An I/O error, with TLS failures told apart.
fn io_error(addr: &str, e: std::io::Error) -> UplinkError {
    match tls::classify(&e) {
        Some(failure) => UplinkError::Tls {
            addr: addr.to_string(),
            failure,
        },
        None => UplinkError::Io {
            addr: addr.to_string(),
            source: e,
        },
    }
}

/// Whether a server error code is one [`refusal`] gives its own meaning.
pub fn is_refusal(code: i32) -> bool {
    matches!(
        ServerError::try_from(code),
        Ok(ServerError::AuthenticationError
            | ServerError::AuthorizationError
            | ServerError::TopicTerminatedError)
    )
}

/// A broker's refusal, classified by its error code.
pub fn refusal(
    during: &'static str,
    code: i32,
    message: String,
    s: &UplinkSettings,
    role: Option<String>,
) -> UplinkError {
    match ServerError::try_from(code) {
        Ok(ServerError::AuthenticationError) => UplinkError::AuthRejected { message, role },
        Ok(ServerError::AuthorizationError) => UplinkError::NotAuthorized {
            topic: s.topic.clone(),
            role,
            message,
        },
        Ok(ServerError::TopicTerminatedError) => UplinkError::TopicTerminated {
            topic: s.topic.clone(),
        },
        _ => UplinkError::Broker {
            during,
            error: server_error(code),
            message,
        },
    }
}
