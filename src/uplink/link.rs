//! The glue between a [`Conn`] (bytes) and the [`Protocol`] (meaning): open
//! a connection and authenticate, feed every incoming frame to
//! [`Protocol::handle`] and write what it returns, read the token again
//! when the broker challenges, and wait for the answer to a request. Every
//! wait here is bounded by `uplink.operation_timeout`.

use std::time::Duration;

use pulsar::proto::MessageIdData;

use super::auth;
use super::conn::{Conn, Endpoint};
use super::error::UplinkError;
use super::frame::Frame;
use super::producer::ProducerState;
use super::protocol::{Event, Handled, Protocol, SubscribeOptions};
use super::settings::UplinkSettings;

/// Opens a connection to `endpoint` (`proxy_to`: asks the Pulsar proxy
/// there to forward to that broker) and authenticates with CONNECT.
///
/// With a `pulsar+ssl://` service URL every connection is TLS: a plaintext
/// endpoint is refused here before anything is sent (and so is a TLS one
/// without TLS settings). `lookup_step` refuses such answers first.
pub async fn open(
    endpoint: Endpoint,
    proxy_to: Option<&str>,
    s: &UplinkSettings,
    proto: &mut Protocol,
) -> Result<Conn, UplinkError> {
    match (s.tls.is_some(), endpoint.tls) {
        (true, false) => {
            return Err(UplinkError::TlsDowngrade {
                topic: s.topic.clone(),
                url: format!("pulsar://{endpoint}"),
            })
        }
        (false, true) => {
            return Err(UplinkError::TlsNotConfigured {
                topic: s.topic.clone(),
                url: format!("pulsar+ssl://{endpoint}"),
            })
        }
        _ => {}
    }
    let mut conn = Conn::connect(endpoint, &s.conn_options()).await?;
    let token = match &s.auth {
        Some(src) => Some(auth::read_async(src, s.operation_timeout()).await?),
        None => None,
    };
    conn.push(&proto.connect(token.as_ref(), proxy_to));
    conn.flush().await?;
    let connected = until(&mut conn, proto, s, |e| {
        matches!(e, Event::Connected { .. }).then_some(())
    });
    within(s.operation_timeout(), "connected", connected).await?;
    Ok(conn)
}

/// Lets `proto` handle one frame: its reply goes into the write buffer,
/// and an AUTH_CHALLENGE is answered with the token read again from its
/// source. Returns what happened for the caller to act on.
pub async fn step(
    conn: &mut Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
    frame: Frame,
) -> Result<Option<Event>, UplinkError> {
    let Handled { reply, event } = proto.handle(frame)?;
    if let Some(reply) = reply {
        conn.push(&reply);
    }
    if event == Some(Event::AuthChallenge) {
        answer_challenge(conn, proto, s).await?;
    }
    Ok(event)
}

async fn answer_challenge(
    conn: &mut Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
) -> Result<(), UplinkError> {
    let Some(src) = &s.auth else {
        return Err(UplinkError::AuthRejected {
            message: "broker asks for credentials but pulsar.auth is not configured".into(),
            role: None,
        });
    };
    let token = auth::read_async(src, s.operation_timeout()).await?;
    conn.push(&proto.answer_challenge(&token));
    tracing::info!(challenges = proto.challenges(), source = %auth::describe(src),
        "auth challenge answered with the token read again from its source");
    Ok(())
}

/// Reads and handles frames (see [`step`]), writing what they ask for,
/// until `pick` takes an event. Unbounded: callers wrap it in [`within`].
pub async fn until<T>(
    conn: &mut Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> Result<T, UplinkError> {
    loop {
        let f = conn.read_frame().await?;
        if let Some(t) = step(conn, proto, s, f).await?.and_then(&mut pick) {
            return Ok(t);
        }
        conn.flush().await?;
    }
}

/// `fut`, or [`UplinkError::Timeout`] naming `what` after `limit`.
pub async fn within<T>(
    limit: Duration,
    what: &'static str,
    fut: impl std::future::Future<Output = Result<T, UplinkError>>,
) -> Result<T, UplinkError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| UplinkError::Timeout(what))?
}

/// The only producer on each connection.
pub const PRODUCER_ID: u64 = 1;

/// Creates the producer `name` on `s.topic` ([`PRODUCER_ID`], added to
/// `proto` with the configured window if it is not there yet); returns the
/// broker's `last_sequence_id`. The window stays shut: the caller opens it
/// ([`Protocol::open_window`]) once the store has taken the number.
pub async fn create_producer(
    conn: &mut Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
    name: &str,
) -> Result<i64, UplinkError> {
    if !proto.has_producer(PRODUCER_ID) {
        let window = ProducerState::new(s.uplink.max_in_flight, s.uplink.max_in_flight_bytes);
        proto.add_producer(PRODUCER_ID, &s.topic, window);
    }
    let Some((request_id, cmd)) = proto.producer(PRODUCER_ID, name) else {
        unreachable!("the producer was added above");
    };
    conn.push(&cmd);
    conn.flush().await?;
    loop {
        // Each answer within the operation timeout; a producer waiting for
        // exclusive access gets another PRODUCER_SUCCESS when it is granted.
        let answer = until(conn, proto, s, |e| match e {
            Event::ProducerReady {
                request_id: id,
                last_sequence_id,
                ..
            } if id == request_id => Some(Some(last_sequence_id)),
            Event::ProducerWaiting { request_id: id, .. } if id == request_id => Some(None),
            _ => None,
        });
        if let Some(last_sequence_id) = within(s.operation_timeout(), "producer", answer).await? {
            return Ok(last_sequence_id);
        }
    }
}

/// Subscribes consumer `consumer_id` to `s.topic` with `options` and waits
/// (within the operation timeout) for the broker's SUCCESS.
pub async fn subscribe(
    conn: &mut Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
    consumer_id: u64,
    options: SubscribeOptions,
) -> Result<(), UplinkError> {
    let (request_id, cmd) = proto.subscribe_with(consumer_id, &s.topic, options);
    conn.push(&cmd);
    conn.flush().await?;
    let subscribed = until(conn, proto, s, |e| match e {
        Event::Subscribed { request_id: id, .. } if id == request_id => Some(()),
        _ => None,
    });
    within(s.operation_timeout(), "subscribe", subscribed).await
}

/// Where `s.topic` ends now (GET_LAST_MESSAGE_ID through consumer
/// `consumer_id`), within the operation timeout.
pub async fn last_message_id(
    conn: &mut Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
    consumer_id: u64,
) -> Result<MessageIdData, UplinkError> {
    let (request_id, cmd) = proto.last_message_id(consumer_id);
    conn.push(&cmd);
    conn.flush().await?;
    let last = until(conn, proto, s, |e| match e {
        Event::LastMessageId {
            request_id: id,
            last,
            ..
        } if id == request_id => Some(last),
        _ => None,
    });
    within(s.operation_timeout(), "last message id", last).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSource;
    use crate::uplink::frame::{self, command};
    use crate::uplink::testing::{settings, Scratch};
    use bytes::BytesMut;
    use pulsar::proto::{self, base_command::Type, BaseCommand};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A broker that, before it says CONNECTED, pings, rotates the token
    /// file to `rotated` and challenges; it reports every command it got.
    async fn challenging_broker(
        token_file: std::path::PathBuf,
        rotated: &'static str,
    ) -> (u16, tokio::sync::mpsc::UnboundedReceiver<BaseCommand>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            loop {
                while let Some(f) = frame::decode(&mut buf).unwrap() {
                    let mut out = BytesMut::new();
                    let c = f.command.clone();
                    let _ = seen.send(*f.command);
                    if c.connect.is_some() {
                        std::fs::write(&token_file, rotated).unwrap();
                        let ping = command(Type::Ping, |r| r.ping = Some(proto::CommandPing {}));
                        let challenge = command(Type::AuthChallenge, |r| {
                            r.auth_challenge = Some(proto::CommandAuthChallenge::default())
                        });
                        frame::encode_command(&ping, &mut out);
                        frame::encode_command(&challenge, &mut out);
                    } else if c.auth_response.is_some() {
                        let connected = command(Type::Connected, |r| {
                            r.connected = Some(proto::CommandConnected {
                                server_version: "fake".into(),
                                ..Default::default()
                            })
                        });
                        frame::encode_command(&connected, &mut out);
                    }
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
                if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn a_challenge_while_connecting_is_answered_with_the_token_read_again() {
        let dir = Scratch::new("challenge");
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, "first-token\n").unwrap();
        let (port, mut seen) = challenging_broker(token_file.clone(), "rotated-token").await;
        let mut s = settings(port);
        s.auth = Some(TokenSource::File(token_file));
        let mut proto = Protocol::new(true, &s.topic);
        let conn = open(s.service.clone(), None, &s, &mut proto).await.unwrap();
        assert!(proto.is_connected());
        assert_eq!(proto.challenges(), 1);
        drop(conn);
        let mut got = Vec::new();
        while let Some(c) = seen.recv().await {
            got.push(c);
        }
        let types: Vec<i32> = got.iter().map(|c| c.r#type).collect();
        assert_eq!(
            types,
            [Type::Connect, Type::Pong, Type::AuthResponse].map(|t| t as i32)
        );
        let connect = got[0].connect.as_ref().unwrap();
        assert_eq!(connect.auth_data.as_deref(), Some(&b"first-token"[..]));
        let answer = got[2].auth_response.as_ref().unwrap().response.as_ref();
        assert_eq!(
            answer.and_then(|a| a.auth_data.as_deref()),
            Some(&b"rotated-token"[..])
        );
    }

    #[tokio::test]
    async fn a_broker_that_never_says_connected_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move { listener.accept().await });
        let mut s = settings(port);
        s.uplink.operation_timeout = Duration::from_millis(200);
        let mut proto = Protocol::new(false, &s.topic);
        let err = open(s.service.clone(), None, &s, &mut proto)
            .await
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "timed out waiting for connected");
        drop(held);
    }
}
