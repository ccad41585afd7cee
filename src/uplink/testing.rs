//! Fakes at the I/O seam for the uplink's unit tests: brokers that answer
//! CONNECT and LOOKUP as told or misbehave once the producer is ready, a
//! TLS certificate, a real store with records. Never used by integration
//! tests, which run against the real brokers.

use std::time::Duration;

use bytes::BytesMut;
use pulsar::proto::{
    self, base_command::Type, command_lookup_topic_response::LookupType, BaseCommand,
    CommandLookupTopic, CommandLookupTopicResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::conn::Endpoint;
use super::frame::{self, command};
use super::settings::UplinkSettings;
use crate::config::{TlsConfig, TokenSource, UplinkConfig};
use crate::layout::Layout;

pub fn settings(port: u16) -> UplinkSettings {
    UplinkSettings {
        dest: 0,
        cluster: 0,
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
        name: "persistent://t/n/status".into(),
        producer_name: "ferry-gw-status".into(),
        uplink: UplinkConfig {
            max_in_flight: 10,
            max_in_flight_bytes: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(2),
            operation_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            drain_timeout: Duration::from_millis(100),
        },
    }
}

pub type Answer = Box<dyn Fn(&CommandLookupTopic, u16) -> CommandLookupTopicResponse + Send + Sync>;

/// A fake broker at the I/O seam: answers CONNECT, and LOOKUP as told;
/// reports every CONNECT and LOOKUP it saw.
pub async fn fake_broker(answer: Answer) -> (u16, mpsc::UnboundedReceiver<BaseCommand>) {
    fake_broker_with(None, answer).await
}

/// [`fake_broker`], speaking TLS when given an acceptor.
pub async fn fake_broker_with(
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

pub async fn answer_lookups<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
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
            let _ = seen.send(*f.command);
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
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
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
pub fn tls_pki(
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

pub fn lookup_reply(
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

/// How a producing fake broker misbehaves once the producer is ready.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// Never reads from the connection again (keeps it open).
    StopsReading,
    /// Reads every SEND but never sends a receipt.
    WithholdsReceipts,
}

/// What a producing fake broker saw: per connection, the payload bytes
/// of the SENDs it received.
#[derive(Default)]
pub struct Received {
    pub payload_bytes: std::sync::Mutex<Vec<u64>>,
    pub producers: std::sync::atomic::AtomicUsize,
}

impl Received {
    pub fn per_connection(&self) -> Vec<u64> {
        self.payload_bytes.lock().unwrap().clone()
    }
}

/// A fake broker at the socket seam that lets ferry connect, look the
/// topic up (itself) and create its producer, and then misbehaves. Its
/// receive buffer is small, so that when it stops reading, ferry's
/// writes stop soon.
pub async fn producing_broker(mode: Hostile) -> (u16, std::sync::Arc<Received>) {
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

pub async fn produce_badly(
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
            let c = *f.command;
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
pub async fn store_with(dir: &std::path::Path, n: usize, size: usize) -> crate::store::Store {
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
        &["test".to_string()],
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
                session: 0,
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
