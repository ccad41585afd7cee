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
//! Layers, from the wire up:
//!
//! - [`frame`]: the byte layout (sizes, magic, CRC32C). No I/O.
//! - [`conn`]: transport only, frames over TCP or TLS ([`conn::Conn`] with
//!   its own [`conn::Options`]). [`tls`] makes the rustls configuration.
//! - [`protocol`]: what every broker command means ([`Protocol::handle`]
//!   returns what to send and what happened), requests and their ids, the
//!   producer's window ([`producer::ProducerState`]). No I/O.
//! - [`link`]: the glue: open and authenticate, feed frames to the
//!   protocol state, answer auth challenges with the token read again,
//!   wait for an answer within the operation timeout.
//! - [`lookup`]: the broker that serves the topic (redirects, proxy, TLS
//!   kept).
//! - [`session`]: the loop per destination topic, its backoff, beat and
//!   drain; [`session::DrainGate`] lets status topics go first.
//! - [`settings`], [`error`], [`auth`]: configuration, the classified
//!   errors, the token.

pub mod auth;
pub mod conn;
pub mod error;
pub mod frame;
pub mod link;
pub mod lookup;
pub mod producer;
pub mod protocol;
pub mod session;
pub mod settings;
#[cfg(test)]
mod testing;
pub mod tls;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::store::StoreHandle;
pub use error::{ErrorClass, UplinkError};
pub use link::create_producer;
pub use lookup::{connect_to_topic, lookup_step, LookupStep, Route};
pub use protocol::{Event, Protocol};
pub use session::DrainGate;
pub use settings::{producer_name, UplinkSettings};

/// Runs one session per destination until `shutdown`; returns early only on
/// a fatal error. Each session ticks a beat of its own in `health` (see
/// [`session`] for when).
pub async fn run_all(
    sessions: Vec<UplinkSettings>,
    store: StoreHandle,
    committed: watch::Receiver<Vec<u64>>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    health: crate::notify::Health,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    let gate = DrainGate::new(sessions.iter().map(|s| s.cluster).collect());
    for (i, s) in sessions.iter().enumerate() {
        // Until a status session has caught up, the others wait.
        gate.set(i, s.drains_first);
    }
    let runs = sessions.into_iter().enumerate().map(|(i, s)| {
        let m = metrics.uplink(&s.name);
        let beat = health.beat(format!("uplink {}", s.name));
        session::run(
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
