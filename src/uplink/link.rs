//! The glue between a [`Conn`] (bytes) and the [`Protocol`] (meaning): open
//! a connection and authenticate, feed every incoming frame to
//! [`Protocol::handle`] and write what it returns, read the token again
//! when the broker challenges, and wait for the answer to a request. Every
//! wait here is bounded by `uplink.operation_timeout`.

use std::time::Duration;

use super::auth;
use super::conn::{Conn, Endpoint};
use super::error::UplinkError;
use super::frame::Frame;
use super::producer::ProducerState;
use super::protocol::{Event, Handled, Protocol};
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
