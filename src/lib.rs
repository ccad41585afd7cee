//! Ferry keeps IoT device state in sync with Apache Pulsar from the edge.
//!
//! The data path, one module per stage:
//!
//! - [`config`]: the gateway's TOML file, validated into [`config::Config`].
//! - [`ingest`]: MQTT (rumqttc) in, QoS 1 with manual acks after commit.
//! - [`store`]: SQLite journal on its own thread, group commit, record numbers.
//! - [`uplink`]: ferry's own idempotent Pulsar producer, sequence id = record
//!   number, resume from the broker's `last_sequence_id`.
//! - [`shutdown`]: SIGTERM/SIGINT into one cancellation token.
//! - [`check`]: what `ferry check` reports to installers.
//!
//! [`run`] wires them together. See ARCHITECTURE.md for the invariants.

pub mod check;
pub mod config;
pub mod ingest;
pub mod shutdown;
pub mod store;
pub mod uplink;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Why ferry stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Uplink(#[from] uplink::UplinkError),
}

/// Runs ferry until `shutdown` is cancelled or a fatal error occurs.
///
/// Shutdown order: stop intake (ingest disconnects, leaving unacked messages
/// with the broker), let the store commit what it holds, give the uplink a
/// short while for receipts of what is in flight, then close the store.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
    for w in check::secret_file_warnings(&config) {
        tracing::warn!("{w}");
    }
    let store = store::Store::open(&config.store, ack_tx)?;
    tracing::info!(gateway = %config.gateway_id, store = %config.store.path.display(),
        topic = %config.pulsar.topic, "ferry starting");

    // Ingest and uplink stop on their own token so that a fatal error in
    // one stops the other, and so ingest can stop before the uplink does.
    let intake = shutdown.child_token();
    let outlet = CancellationToken::new();
    let ingest = tokio::spawn(ingest::run(
        config.mqtt.clone(),
        store.handle.clone(),
        ack_rx,
        intake.clone(),
    ));
    let uplink = tokio::spawn(uplink::run(
        uplink::UplinkSettings::from_config(&config),
        store.handle.clone(),
        store.committed.clone(),
        outlet.clone(),
    ));

    let mut ingest = ingest;
    let mut uplink = uplink;
    let mut failure: Option<RunError> = None;
    let mut ingest_done = false;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = &mut ingest => {
            ingest_done = true;
            if let Ok(Err(e)) = r { failure = Some(e.into()); }
        }
        r = &mut uplink => {
            if let Ok(Err(e)) = r { failure = Some(e.into()); }
            intake.cancel();
            let _ = (&mut ingest).await;
            return finish(store, failure);
        }
    }
    intake.cancel();
    if !ingest_done {
        if let Ok(Err(e)) = ingest.await {
            failure.get_or_insert(e.into());
        }
    }
    outlet.cancel();
    if let Ok(Err(e)) = uplink.await {
        failure.get_or_insert(e.into());
    }
    finish(store, failure)
}

fn finish(store: store::Store, failure: Option<RunError>) -> Result<(), RunError> {
    let joined = store.join();
    match failure {
        Some(e) => Err(e),
        None => {
            joined?;
            tracing::info!("ferry stopped");
            Ok(())
        }
    }
}
