//! Desired state down to the devices (`[downlink]`): the reader takes the
//! fleet's desired-state messages from the gateway's compacted desired
//! topic into the store (one reader per Pulsar cluster, each with its own
//! position: an update written in any cluster reaches the device, and the
//! version rule keeps the newest whichever cluster it came from); the
//! applier publishes each device's newest version to the local MQTT broker,
//! retained, and records it as applied (with an acknowledgement on the ack
//! topic, in every cluster) once the broker confirmed it. The store
//! stands between them, so neither waits for the other and a restart at any
//! point repeats at most the last publish.
//!
//! - `message`: what one Pulsar message holds (batches included). No I/O.
//! - `reader`: the Pulsar side, on the uplink's protocol client.
//! - `apply`: the MQTT side, on a connection of its own.

pub mod apply;
pub mod message;
pub mod reader;

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ACK_STREAM};
use crate::layout::Layout;
use crate::store::{StoreError, StoreHandle};
use crate::uplink::{UplinkError, UplinkSettings};

#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs the downlink of `config` until shutdown (nothing when it has none).
pub async fn run(
    config: Config,
    layout: Layout,
    store: StoreHandle,
    health: crate::notify::Health,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), DownlinkError> {
    let Some(downlink) = config.downlink.clone() else {
        return Ok(());
    };
    let ack_stream = layout
        .streams
        .iter()
        .position(|s| s.name == ACK_STREAM)
        .expect("config adds the acknowledgement stream with [downlink]");
    let stored = Arc::new(Notify::new());
    let subscription = format!("ferry-{}-desired", config.gateway_id);
    let readers = futures::future::try_join_all((0..config.pulsar.clusters.len()).map(|c| {
        let settings = UplinkSettings::for_topic_on(&config, c, &downlink.topic);
        let beat = match config.pulsar.clusters[c].name.as_str() {
            "" => health.beat("downlink-reader"),
            name => health.beat(format!("downlink-reader {name}")),
        };
        reader::run(
            settings,
            subscription.clone(),
            store.clone(),
            stored.clone(),
            beat,
            live.clone(),
            shutdown.clone(),
        )
    }));
    let applier = apply::run(
        config.mqtt.clone(),
        downlink,
        ack_stream,
        store,
        stored,
        health.beat("downlink-apply"),
        metrics,
        shutdown,
    );
    let (r, a) = tokio::join!(readers, applier);
    r?;
    a?;
    Ok(())
}
