//! Ingest: device updates from the gateway's MQTT broker into the store.
//!
//! Ferry connects with a fixed client id and a persistent session
//! (`clean_session = false`), subscribes at QoS 1 and acknowledges manually:
//! a PUBACK goes out only after the store has committed the message, so the
//! broker keeps (and after any crash redelivers) everything ferry has not
//! made durable. Two tasks share the work, as rumqttc requires: one polls the
//! event loop and hands messages to the store; the other receives the store's
//! commit confirmations and sends the acks. Acking from the polling task
//! could deadlock it (rumqttc #1025).
//!
//! Acks carry the connection epoch they belong to. An ack left over from an
//! earlier connection is dropped: the broker redelivers that message with
//! the DUP flag, the store recognises it, and it is acked then. Sending the
//! stale ack instead could acknowledge a *different* message that the broker
//! sent under the reused packet id and that is not yet committed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::store::layout::Layout;
use crate::store::{AckToken, Inbound, Intake, StoreError, StoreHandle};
use crate::uplink::Backoff;

/// rumqttc refuses larger incoming packets by closing the connection, which
/// would make the broker redeliver the same message forever. Ferry accepts
/// anything up to MQTT's own limit and dead-letters what is over
/// `store.max_payload_bytes` instead.
const MAX_INCOMING_PACKET: usize = 268_435_455;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Runs ingest until `shutdown`. Messages go to `store`; the store's commit
/// confirmations arrive on `acks`. While `accepting` is false (the store
/// holds back as much as it may: a `reject` stream at its limit, or a full
/// disk), ingest stays disconnected and the broker keeps the backlog.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: MqttConfig,
    layout: Layout,
    store: StoreHandle,
    acks: UnboundedReceiver<AckToken>,
    mut accepting: watch::Receiver<Intake>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024)
        .set_request_channel_capacity(1024);
    let epoch = Arc::new(AtomicU64::new(0));
    let (current, client_rx) = watch::channel(None);
    let acker = tokio::spawn(send_acks(client_rx, acks, epoch.clone()));
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let mut session = Session {
        layout,
        store,
        live,
        metrics,
        epoch,
        addr,
        backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
    };
    let result = loop {
        if !accepting.borrow_and_update().open {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                r = accepting.wait_for(|a| a.open) => if r.is_err() { break Ok(()) },
            }
            tracing::info!("store has room again: reconnecting to the mqtt broker");
        }
        let pauses = accepting.borrow_and_update().pauses;
        let (client, mut eventloop) = AsyncClient::new(opts.clone(), 1024);
        current.send_replace(Some(client.clone()));
        let end = session
            .connection(&client, &mut eventloop, &mut accepting, pauses, &shutdown)
            .await;
        current.send_replace(None);
        // Leave the session on the broker: what was not acked is
        // redelivered later. A clean DISCONNECT keeps the persistent session.
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Outgoing(rumqttc::Outgoing::Disconnect) = ev {
                    break;
                }
            }
        })
        .await;
        match end {
            Ok(Ended::Shutdown) => break Ok(()),
            Ok(Ended::Paused) => {
                let why = "paused: the store holds back what it may (reject limit or full disk); the broker keeps the backlog";
                session.live.mqtt_down(&session.addr, why.into());
                session.metrics.mqtt_connected.set(0);
                tracing::warn!(broker = %session.addr, "mqtt intake {why}");
            }
            Err(e) => break Err(e),
        }
    };
    acker.abort();
    result
}

/// Why one MQTT connection ended without an error.
enum Ended {
    Shutdown,
    /// The store asked for back-pressure.
    Paused,
}

/// What the MQTT connections of one ingest share.
struct Session {
    layout: Layout,
    store: StoreHandle,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    /// Incremented at every CONNACK; acks carry it.
    epoch: Arc<AtomicU64>,
    addr: String,
    backoff: Backoff,
}

impl Session {
    /// Polls one client's event loop (reconnecting as rumqttc does) until
    /// shutdown or back-pressure.
    async fn connection(
        &mut self,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
        accepting: &mut watch::Receiver<Intake>,
        pauses: u64,
        shutdown: &CancellationToken,
    ) -> Result<Ended, IngestError> {
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                r = accepting.changed() => {
                    // A pause, even one already over, ends this connection.
                    if r.is_ok() && accepting.borrow_and_update().pauses != pauses {
                        return Ok(Ended::Paused);
                    }
                    continue;
                }
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.metrics.mqtt_received.inc();
                    let epoch = self.epoch.load(Ordering::Acquire);
                    self.store.insert(inbound(&self.layout, p, epoch))?;
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        tracing::error!(pkid = ack.pkid, "mqtt broker refused a subscription");
                    } else {
                        tracing::info!(pkid = ack.pkid, "mqtt subscribed");
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    self.backoff.reset();
                    let n = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
                    // Messages held back from earlier connections will be
                    // redelivered on this one.
                    self.store.new_epoch(n, ack.session_present)?;
                    self.live.mqtt_up(&self.addr);
                    self.metrics.mqtt_connected.set(1);
                    tracing::info!(broker = %self.addr, session_present = ack.session_present, epoch = n, "mqtt connected");
                    // Subscribing from this task would block the loop it
                    // polls if the request channel were full.
                    let client = client.clone();
                    let filters = self.layout.filters();
                    tokio::spawn(async move {
                        for f in filters {
                            if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                                tracing::warn!(filter = %f, error = %e, "mqtt subscribe failed");
                            }
                        }
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    self.live.mqtt_down(&self.addr, e.to_string());
                    if self.metrics.mqtt_connected.set(0) == 1 {
                        self.metrics.mqtt_reconnects.inc();
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(broker = %self.addr, error = %e, retry_in_ms = delay.as_millis() as u64,
                        "mqtt connection lost; the broker keeps unacknowledged messages");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Ended::Shutdown),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

fn inbound(layout: &Layout, p: Publish, epoch: u64) -> Inbound {
    let (stream, device) = match layout.route(&p.topic) {
        Some((s, d)) => (Some(s), d),
        None => (None, None),
    };
    let ack = (p.qos != QoS::AtMostOnce).then_some(AckToken {
        pkid: p.pkid,
        epoch,
        gen: 0,
    });
    Inbound {
        stream,
        device,
        counted: false,
        dup: p.dup,
        pkid: p.pkid,
        retain: p.retain,
        mqtt_topic: p.topic,
        payload: p.payload,
        ack,
    }
}

/// Sends the PUBACK of every committed message of the current connection
/// (through the current client; none while ingest is paused).
async fn send_acks(
    client: watch::Receiver<Option<AsyncClient>>,
    mut acks: UnboundedReceiver<AckToken>,
    epoch: Arc<AtomicU64>,
) {
    while let Some(a) = acks.recv().await {
        if a.epoch != epoch.load(Ordering::Acquire) {
            continue;
        }
        let Some(client) = client.borrow().clone() else {
            continue;
        };
        let mut p = Publish::new("", QoS::AtLeastOnce, Vec::new());
        p.pkid = a.pkid;
        // A closed client means its connection is gone; the broker
        // redelivers the message and it is acked then.
        let _ = client.ack(&p).await;
    }
}
