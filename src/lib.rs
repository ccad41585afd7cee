//! Ferry keeps IoT device state in sync with Apache Pulsar from the edge.
//!
//! The data path, one module per stage:
//!
//! - [`config`]: the gateway's TOML file, validated into [`config::Config`].
//! - [`ingest`]: MQTT (rumqttc) in, QoS 1 with manual acks after commit.
//! - [`store`]: SQLite on its own thread: one backlog per destination topic,
//!   group commit, record numbers, overflow policies, full-disk handling.
//! - [`uplink`]: ferry's own idempotent Pulsar producer, one session per
//!   topic, sequence id = record number, resume from `last_sequence_id`.
//! - [`shutdown`]: SIGTERM/SIGINT into one cancellation token.
//! - [`metrics`]: Prometheus metrics at `/metrics`.
//! - [`check`]: what `ferry check` reports to installers.
//! - [`status`]: what `ferry status` reports, from the store.
//! - [`notify`]: systemd readiness and a watchdog fed only while all loops
//!   are alive.
//!
//! [`run`] wires them together. See ARCHITECTURE.md for the invariants.

pub mod audit;
pub mod backoff;
pub mod check;
pub mod config;
pub mod downlink;
pub mod ingest;
pub mod layout;
pub mod metrics;
pub mod mqtt_events;
pub mod notify;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod uplink;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How much longer than `uplink.drain_timeout` shutdown waits for the uplink.
const UPLINK_STOP_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Why ferry stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    Uplink(#[from] uplink::UplinkError),
    #[error(transparent)]
    Downlink(#[from] downlink::DownlinkError),
}

/// Runs ferry until `shutdown` is cancelled or a fatal error occurs. A new
/// configuration on `reload` applies the store's limits at once and names
/// the settings that need a restart.
///
/// Shutdown order: stop intake (ingest disconnects, leaving unacked messages
/// with the broker), let the store commit what it holds, give the uplink a
/// short while for receipts of what is in flight, then close the store.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    mut reload: tokio::sync::watch::Receiver<Config>,
) -> Result<(), RunError> {
    let health = notify::Health::default();
    let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
    for w in check::secret_file_warnings(&config) {
        tracing::warn!("{w}");
    }
    let live = status::Live::default();
    let metrics = metrics::Metrics::new();
    let layout = layout::Layout::for_config(&config);
    for s in &layout.streams {
        let mut policies = vec![s.overflow.as_str(), "disk-full", "store-max-bytes"];
        if s.limits.max_age.is_some() {
            policies.push("max-age");
        }
        metrics.declare_stream(&s.name, &policies);
    }
    let sessions: Vec<String> = layout
        .sessions(&config.mqtt.client_id)
        .into_iter()
        .map(|s| s.client_id)
        .collect();
    let store = store::Store::open(
        &config.store,
        layout.clone(),
        &sessions,
        ack_tx,
        health.beat("store"),
        live.clone(),
        metrics.clone(),
    )?;
    let background = CancellationToken::new();
    if let Some(addr) = config.metrics.listen {
        let registry = metrics.registry();
        let stop = background.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, registry, stop).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed; ferry goes on without it");
            }
        });
    }
    let topics: Vec<&str> = layout.dests.iter().map(|d| d.topic.as_str()).collect();
    tracing::info!(gateway = %config.gateway_id, store = %config.store.path.display(),
        streams = layout.streams.len(), topics = ?topics, "ferry starting");

    // Ingest and uplink stop on their own token so that a fatal error in
    // one stops the other, and so ingest can stop before the uplink does.
    let intake = shutdown.child_token();
    let outlet = CancellationToken::new();
    let mut ingest = tokio::spawn(alive(
        "ingest",
        health.beat("ingest"),
        ingest::run(
            config.mqtt.clone(),
            layout.clone(),
            store.handle.clone(),
            ack_rx,
            store.accepting.clone(),
            live.clone(),
            metrics.clone(),
            intake.clone(),
        ),
    ));
    // The uplink's sessions tick beats of their own, from their progress.
    let uplink_run = uplink::run_all(
        uplink::UplinkSettings::from_config(&config, &layout),
        store.handle.clone(),
        store.committed.clone(),
        live.clone(),
        metrics.clone(),
        health.clone(),
        outlet.clone(),
    );
    let mut uplink = tokio::spawn(async move {
        debug_hang("uplink").await;
        uplink_run.await
    });
    // The downlink (if configured) stops with ingest: both talk to the
    // local broker, and both must be done before the store closes.
    let mut downlink_running = config.downlink.is_some();
    let mut downlink = tokio::spawn(downlink::run(
        config.clone(),
        layout.clone(),
        store.handle.clone(),
        health.clone(),
        live.clone(),
        metrics.clone(),
        intake.clone(),
    ));
    let uplink_stop = config.uplink.drain_timeout + UPLINK_STOP_MARGIN;
    if let Some(interval) = notify::watchdog_interval() {
        tokio::spawn(notify::watchdog(
            health.clone(),
            interval,
            background.clone(),
        ));
    }
    notify::notify(&format!(
        "READY=1\nSTATUS=forwarding {} stream(s) to {}",
        layout.streams.len(),
        topics.join(", ")
    ));

    let mut current = config;
    let mut failure: Option<RunError> = None;
    let mut ingest_done = false;
    let mut reloads_open = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = reload.changed(), if reloads_open => {
                if changed.is_err() {
                    // No more reloads can come; keep running.
                    reloads_open = false;
                    continue;
                }
                let new = reload.borrow_and_update().clone();
                apply_reload(&current, &new, &store.handle);
                current = new;
            }
            r = &mut ingest => {
                ingest_done = true;
                if let Ok(Err(e)) = r { failure = Some(e.into()); }
                break;
            }
            r = &mut downlink, if downlink_running => {
                downlink_running = false;
                if let Ok(Err(e)) = r {
                    failure = Some(e.into());
                    break;
                }
            }
            r = &mut uplink => {
                if let Ok(Err(e)) = r { failure = Some(e.into()); }
                notify::notify("STOPPING=1");
                intake.cancel();
                let _ = (&mut ingest).await;
                stop_downlink(&mut downlink, downlink_running, &mut failure).await;
                background.cancel();
                return finish(store, failure);
            }
        }
    }
    notify::notify("STOPPING=1");
    intake.cancel();
    if !ingest_done {
        if let Ok(Err(e)) = ingest.await {
            failure.get_or_insert(e.into());
        }
    }
    stop_downlink(&mut downlink, downlink_running, &mut failure).await;
    outlet.cancel();
    // The uplink drains for at most drain_timeout; whatever it waits on,
    // shutdown does not wait much longer.
    match tokio::time::timeout(uplink_stop, &mut uplink).await {
        Ok(Ok(Err(e))) => {
            failure.get_or_insert(e.into());
        }
        Ok(_) => {}
        Err(_) => {
            uplink.abort();
            tracing::warn!(
                waited_ms = uplink_stop.as_millis() as u64,
                "uplink did not stop in time; unconfirmed records stay in the store"
            );
        }
    }
    background.cancel();
    finish(store, failure)
}

/// Waits (a few seconds at most) for the downlink to store what the local
/// broker acknowledged and stop.
async fn stop_downlink(
    downlink: &mut tokio::task::JoinHandle<Result<(), downlink::DownlinkError>>,
    running: bool,
    failure: &mut Option<RunError>,
) {
    if !running {
        return;
    }
    match tokio::time::timeout(std::time::Duration::from_secs(5), &mut *downlink).await {
        Ok(Ok(Err(e))) => {
            failure.get_or_insert(e.into());
        }
        Ok(_) => {}
        Err(_) => {
            downlink.abort();
            let _ = (&mut *downlink).await;
            tracing::warn!("downlink did not stop in time; what it published is published again at the next start");
        }
    }
}

/// Ticks `beat` while `fut` runs; honours the `FERRY_DEBUG_HANG` test hook.
async fn alive<F: std::future::Future>(
    name: &'static str,
    beat: notify::Beat,
    fut: F,
) -> F::Output {
    debug_hang(name).await;
    notify::with_beat(beat, fut).await
}

/// The `FERRY_DEBUG_HANG` test hook: blocks this task's thread 2 s after
/// start when asked to.
async fn debug_hang(name: &'static str) {
    if notify::hang_requested(name) {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        notify::hang_forever(name);
    }
}

fn apply_reload(old: &Config, new: &Config, store: &store::StoreHandle) {
    let restart = old.needs_restart(new);
    let layout = layout::Layout::for_config(new);
    if (new.store != old.store || new.streams != old.streams)
        && layout.dests == layout::Layout::for_config(old).dests
    {
        let _ = store.set_limits(new.store.clone(), layout);
    }
    if restart.is_empty() {
        tracing::info!("configuration reloaded");
    } else {
        tracing::warn!(settings = ?restart, "configuration reloaded; these changes take effect after a restart");
    }
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
