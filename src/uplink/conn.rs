//! One connection to a Pulsar broker, transport only: frames over TCP or
//! TLS. It knows [`Options`] (TLS settings, timeouts, buffer sizes) and an
//! [`Endpoint`], nothing of commands, tokens or topics: what a frame means
//! is [`super::protocol`]'s business.
//!
//! Frames are appended to `wbuf` and flushed by the owner's loop, so reading
//! stays cancel-safe; writing is cancel-safe too ([`Conn::write_some`]), so
//! that a loop can stop waiting for a broker that no longer reads. Every
//! write is bounded by [`Options::write_timeout`], connecting and the TLS
//! handshake by [`Options::connect_timeout`].

use std::time::{Duration, Instant};

use bytes::BytesMut;
use pulsar::proto::BaseCommand;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame::{self, Frame, FrameError};
use super::tls;
use crate::config::TlsConfig;

/// Kept at its old path for callers that build commands next to a `Conn`.
pub use super::frame::command;

/// Buffer capacity a connection starts with.
pub const BUF_INITIAL: usize = 64 * 1024;
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

/// How connections are made and bounded.
#[derive(Debug, Clone)]
pub struct Options {
    /// Trust anchors and client certificate. Present exactly when every
    /// connection must be TLS: an endpoint of the other kind is refused.
    pub tls: Option<TlsConfig>,
    /// TCP connect, and the TLS handshake, each at most this long.
    pub connect_timeout: Duration,
    /// How long the broker may take nothing of what waits to be written.
    pub write_timeout: Duration,
    /// Capacity the read and write buffers start with.
    pub buffer_initial: usize,
    /// A write buffer grown past this is given back once written.
    pub buffer_keep: usize,
}

impl Options {
    /// The default buffer sizes with these TLS settings and timeouts.
    pub fn new(
        tls: Option<TlsConfig>,
        connect_timeout: Duration,
        write_timeout: Duration,
    ) -> Options {
        Options {
            tls,
            connect_timeout,
            write_timeout,
            buffer_initial: BUF_INITIAL,
            buffer_keep: WBUF_KEEP,
        }
    }
}

/// What can go wrong on the wire.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
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
    #[error("refusing {addr}: the endpoint {} TLS but the connection options {}", if *.endpoint_tls { "is" } else { "is not" }, if *.endpoint_tls { "have no TLS settings" } else { "require TLS" })]
    TlsMismatch { addr: String, endpoint_tls: bool },
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
    write_timeout: Duration,
    buffer_initial: usize,
    buffer_keep: usize,
}

impl Conn {
    /// Connects, and completes TLS when the endpoint is TLS. A TLS endpoint
    /// without TLS settings, or a plaintext one with them, is refused
    /// before anything is sent.
    pub async fn connect(endpoint: Endpoint, opts: &Options) -> Result<Conn, ConnError> {
        let addr = endpoint.to_string();
        if opts.tls.is_some() != endpoint.tls {
            return Err(ConnError::TlsMismatch {
                addr,
                endpoint_tls: endpoint.tls,
            });
        }
        let tcp = tokio::time::timeout(
            opts.connect_timeout,
            TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| ConnError::Timeout("tcp connect"))?
        .map_err(|source| ConnError::Connect {
            addr: addr.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = match &opts.tls {
            Some(cfg) => {
                let connector = tls::connector(cfg)?;
                let name = tls::server_name(&endpoint.host)?;
                let handshake = connector.connect(name, tcp);
                let tls = tokio::time::timeout(opts.connect_timeout, handshake)
                    .await
                    .map_err(|_| ConnError::Timeout("tls handshake"))?
                    .map_err(|e| io_error(&addr, e))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        Ok(Conn {
            endpoint,
            stream,
            rbuf: BytesMut::with_capacity(opts.buffer_initial),
            wbuf: BytesMut::with_capacity(opts.buffer_initial),
            written: 0,
            unflushed: false,
            write_waiting_since: None,
            write_timeout: opts.write_timeout,
            buffer_initial: opts.buffer_initial,
            buffer_keep: opts.buffer_keep,
        })
    }

    /// Appends a command-only frame to what waits to be written.
    pub fn push(&mut self, cmd: &BaseCommand) {
        frame::encode_command(cmd, &mut self.wbuf);
    }

    /// Whether frames wait to be written (or flushed).
    pub fn pending_write(&self) -> bool {
        self.written < self.wbuf.len() || self.unflushed
    }

    /// Writes what the broker takes now: returns once some bytes went out,
    /// or fails with [`ConnError::WriteStalled`] when the broker has taken
    /// nothing for `write_timeout` (a slow link makes progress; a broker
    /// that stopped reading does not). Cancel-safe: what was written stays
    /// written, and the clock keeps running across calls.
    pub async fn write_some(&mut self) -> Result<(), ConnError> {
        let since = *self.write_waiting_since.get_or_insert_with(Instant::now);
        let deadline = tokio::time::Instant::from(since + self.write_timeout);
        let stalled = |c: &Conn| ConnError::WriteStalled {
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
                if self.wbuf.capacity() > self.buffer_keep {
                    self.wbuf = BytesMut::with_capacity(self.buffer_initial);
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
    pub async fn flush(&mut self) -> Result<(), ConnError> {
        while self.pending_write() {
            self.write_some().await?;
        }
        Ok(())
    }

    /// A frame already in the read buffer, if any.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, ConnError> {
        Ok(frame::decode(&mut self.rbuf)?)
    }

    /// Reads the next frame. Cancel-safe: partial input stays in `rbuf`.
    pub async fn read_frame(&mut self) -> Result<Frame, ConnError> {
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
                return Err(ConnError::Closed);
            }
        }
    }
}

/// An I/O error, with TLS failures told apart.
fn io_error(addr: &str, e: std::io::Error) -> ConnError {
    match tls::classify(&e) {
        Some(failure) => ConnError::Tls {
            addr: addr.to_string(),
            failure,
        },
        None => ConnError::Io {
            addr: addr.to_string(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsar::proto::{self, base_command::Type};

    /// A peer that reads and discards everything; its port.
    async fn sink() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while sock.read(&mut buf).await.unwrap_or(0) > 0 {}
                });
            }
        });
        port
    }

    fn plain(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        }
    }

    fn opts() -> Options {
        Options::new(None, Duration::from_secs(2), Duration::from_secs(2))
    }

    #[tokio::test]
    async fn a_write_buffer_that_grew_is_given_back_once_written() {
        let mut conn = Conn::connect(plain(sink().await), &opts()).await.unwrap();
        let big = vec![0u8; 8 * 1024 * 1024];
        conn.wbuf.extend_from_slice(&big);
        conn.flush().await.unwrap();
        assert!(
            conn.wbuf.capacity() <= WBUF_KEEP,
            "capacity {} after writing 8 MiB",
            conn.wbuf.capacity()
        );
    }

    #[tokio::test]
    async fn an_endpoint_of_the_other_kind_is_refused_before_connecting() {
        // Nothing listens on port 9: a connection attempt would fail otherwise.
        let mut tls = opts();
        tls.tls = Some(TlsConfig {
            ca_file: None,
            use_system_roots: true,
            client_cert: None,
        });
        let err = Conn::connect(plain(9), &tls).await.err().unwrap();
        assert!(
            matches!(
                err,
                ConnError::TlsMismatch {
                    endpoint_tls: false,
                    ..
                }
            ),
            "{err:?}"
        );
        let mut e = plain(9);
        e.tls = true;
        let err = Conn::connect(e, &opts()).await.err().unwrap();
        assert!(
            matches!(
                err,
                ConnError::TlsMismatch {
                    endpoint_tls: true,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn frames_pushed_are_read_back_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = sock.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let mut conn = Conn::connect(plain(port), &opts()).await.unwrap();
        let ping = command(Type::Ping, |c| c.ping = Some(proto::CommandPing {}));
        conn.push(&ping);
        conn.push(&ping);
        assert!(conn.pending_write());
        conn.flush().await.unwrap();
        assert!(!conn.pending_write());
        assert_eq!(*conn.read_frame().await.unwrap().command, ping);
        let next = match conn.try_frame().unwrap() {
            Some(f) => f,
            None => conn.read_frame().await.unwrap(),
        };
        assert_eq!(*next.command, ping);
        drop(conn);
        echo.await.unwrap();
    }
}
