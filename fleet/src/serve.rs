//! The view over HTTP, for backends and Prometheus: `GET /devices/{id}`
//! (the device's row as JSON, 404 if the view has none) and `GET /metrics`
//! (see [`crate::metrics`]).
//!
//! `ferry-fleet view` serves both on `[view] listen` while it consumes (its
//! counts are live there); `ferry-fleet serve` serves the same without
//! consuming (rows and lag; no counts), for machines that only read the
//! view. A minimal HTTP/1.1 server, as the agent's `/metrics`: one request
//! per connection, `Connection: close`; the request line is all it reads.
//! Device lookups run on a blocking thread, on a database connection of
//! their own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admin::{Admin, AdminError};
use crate::config::FleetConfig;
use crate::db::{self, DbError, ViewStore};
use crate::metrics::FleetMetrics;
use crate::view::Counts;

/// How long a client may take to send its request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a request that is read.
const MAX_REQUEST: usize = 8192;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
    #[error("the database thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /devices/{id}`, the id percent-decoded.
    Device(String),
    /// `GET /metrics`.
    Metrics,
    /// A path that is not served.
    NotFound,
    /// Another method than GET (or HEAD) on a served path.
    MethodNotAllowed,
    /// Not a request line, or a device id that does not decode.
    BadRequest,
}

/// Routes a request by its first line (`GET /devices/dev-1 HTTP/1.1`).
pub fn route(request_line: &str) -> Route {
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Route::BadRequest;
    };
    let path = target.split(['?', '#']).next().unwrap_or("");
    let route = if path == "/metrics" {
        Route::Metrics
    } else if let Some(id) = path.strip_prefix("/devices/") {
        // One path segment; a `/` in an id is written `%2F`.
        if id.is_empty() || id.contains('/') {
            return Route::NotFound;
        }
        match percent_decode(id) {
            Some(id) => Route::Device(id),
            None => return Route::BadRequest,
        }
    } else {
        return Route::NotFound;
    };
    if method == "GET" || method == "HEAD" {
        route
    } else {
        Route::MethodNotAllowed
    }
}

/// `%XX` escapes into bytes, then UTF-8; `None` if either fails.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A whole HTTP/1.1 response.
pub fn response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

const JSON: &str = "application/json";
const METRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn error(status: &str, message: &str) -> String {
    response(
        status,
        JSON,
        &serde_json::json!({ "error": message }).to_string(),
    )
}

type Store = Arc<Mutex<Box<dyn ViewStore>>>;

/// What answers requests: a database connection and the registry.
#[derive(Clone)]
pub struct Handler {
    store: Store,
    registry: Arc<Registry>,
}

impl Handler {
    /// The response to one request (its first line).
    pub async fn answer(&self, request_line: &str) -> String {
        match route(request_line) {
            Route::Metrics => {
                let mut body = String::new();
                let _ = prometheus_client::encoding::text::encode(&mut body, &self.registry);
                response("200 OK", METRICS_TYPE, &body)
            }
            Route::Device(id) => {
                let store = self.store.clone();
                let lookup = tokio::task::spawn_blocking(move || {
                    let row = store.lock().unwrap_or_else(|e| e.into_inner()).get(&id);
                    (id, row)
                })
                .await;
                match lookup {
                    Ok((_, Ok(Some(row)))) => match serde_json::to_string(&row) {
                        Ok(body) => response("200 OK", JSON, &body),
                        Err(e) => error("500 Internal Server Error", &e.to_string()),
                    },
                    Ok((id, Ok(None))) => error("404 Not Found", &format!("no device {id}")),
                    Ok((_, Err(e))) => {
                        tracing::warn!(error = %e, "serve: database read failed");
                        error("503 Service Unavailable", &format!("database: {e}"))
                    }
                    Err(e) => error("500 Internal Server Error", &e.to_string()),
                }
            }
            Route::NotFound => error("404 Not Found", "not found"),
            Route::MethodNotAllowed => error("405 Method Not Allowed", "only GET"),
            Route::BadRequest => error("400 Bad Request", "bad request"),
        }
    }
}

async fn handle(handler: Handler, mut sock: TcpStream) {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut n = 0;
    // Read until the request line is complete (or the buffer is full).
    while !buf[..n].contains(&b'\n') && n < buf.len() {
        match tokio::time::timeout(READ_TIMEOUT, sock.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => n += k,
        }
    }
    let request = String::from_utf8_lossy(&buf[..n]);
    let line = request.lines().next().unwrap_or("");
    let mut answer = handler.answer(line).await;
    if line.starts_with("HEAD ") {
        if let Some(end) = answer.find("\r\n\r\n") {
            answer.truncate(end + 4);
        }
    }
    let _ = sock.write_all(answer.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// A bound listener with what it serves.
pub struct Server {
    listener: TcpListener,
    handler: Handler,
    lag: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Binds `listen`, opens a connection to the view's database and
    /// starts polling the lag (until [`Server::run`] ends); serves the counts of `counts` if given.
    pub async fn bind(
        config: &FleetConfig,
        listen: &str,
        counts: Option<Arc<Counts>>,
    ) -> Result<Server, ServeError> {
        let addr: SocketAddr = listen.parse().map_err(|_| ServeError::Bind {
            addr: listen.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an address"),
        })?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: listen.to_string(),
                source,
            })?;
        let database = config.view.database.clone();
        let store = tokio::task::spawn_blocking(move || db::open(&database)).await??;
        let admin = Admin::new(&config.pulsar)?;
        let metrics = FleetMetrics::default();
        let registry = Arc::new(metrics.registry(counts));
        let lag = tokio::spawn(crate::metrics::poll_lag(config.clone(), admin, metrics));
        Ok(Server {
            listener,
            handler: Handler {
                store: Arc::new(Mutex::new(store)),
                registry,
            },
            lag: Some(lag),
        })
    }

    /// Where it listens (the port the system chose for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` says true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), ServeError> {
        loop {
            let (sock, _) = tokio::select! {
                _ = stopped(&mut stop) => break,
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) if is_transient(&e) => {
                        tracing::warn!(error = %e, "serve: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(e) => return Err(ServeError::Accept(e)),
                },
            };
            tokio::spawn(handle(self.handler.clone(), sock));
        }
        if let Some(lag) = self.lag.take() {
            lag.abort();
        }
        Ok(())
    }
}

/// Resolves once `stop` says true.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Errors of one connection (or too many open files for a moment), not of
/// the listener.
fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || e.raw_os_error() == Some(24)
        || e.raw_os_error() == Some(23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::sqlite::SqliteStore;
    use crate::db::StateUpdate;

    #[test]
    fn requests_are_routed_by_their_first_line() {
        assert_eq!(
            route("GET /devices/dev-1 HTTP/1.1"),
            Route::Device("dev-1".into())
        );
        assert_eq!(
            route("GET /devices/a%20b%2Fc?x=1 HTTP/1.1"),
            Route::Device("a b/c".into())
        );
        assert_eq!(route("GET /metrics HTTP/1.1"), Route::Metrics);
        assert_eq!(route("GET /metrics?name[]=x HTTP/1.1"), Route::Metrics);
        assert_eq!(route("HEAD /metrics HTTP/1.1"), Route::Metrics);
        assert_eq!(route("GET /devices/ HTTP/1.1"), Route::NotFound);
        assert_eq!(route("GET /devices/a/b HTTP/1.1"), Route::NotFound);
        assert_eq!(route("GET / HTTP/1.1"), Route::NotFound);
        assert_eq!(route("POST /devices/x HTTP/1.1"), Route::MethodNotAllowed);
        assert_eq!(route("GET /devices/%zz HTTP/1.1"), Route::BadRequest);
        assert_eq!(route("GET /devices/%ff HTTP/1.1"), Route::BadRequest);
        assert_eq!(route(""), Route::BadRequest);
    }

    #[test]
    fn percent_decoding_takes_utf8_escapes() {
        assert_eq!(percent_decode("d%C3%A9v").as_deref(), Some("dév"));
        assert_eq!(percent_decode("50%").as_deref(), None);
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
    }

    fn handler() -> Handler {
        let mut s = SqliteStore::memory().unwrap();
        s.apply(&StateUpdate {
            device: "dev 1".into(),
            gateway: "gw".into(),
            record: 4,
            received_ms: 99,
            state: r#"{"t":21.5}"#.into(),
            topic: "persistent://t/n/gw-status".into(),
        })
        .unwrap();
        Handler {
            store: Arc::new(Mutex::new(Box::new(s))),
            registry: Arc::new(FleetMetrics::default().registry(None)),
        }
    }

    #[tokio::test]
    async fn a_device_is_its_row_as_json_or_404() {
        let h = handler();
        let ok = h.answer("GET /devices/dev%201 HTTP/1.1").await;
        let body =
            r#"{"device":"dev 1","gateway":"gw","record":4,"received_ms":99,"state":{"t":21.5}}"#;
        assert_eq!(ok, response("200 OK", JSON, body));
        let missing = h.answer("GET /devices/nope HTTP/1.1").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        assert!(
            missing.ends_with(r#"{"error":"no device nope"}"#),
            "{missing}"
        );
        let metrics = h.answer("GET /metrics HTTP/1.0").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    }
}
