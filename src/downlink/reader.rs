//! The Pulsar side of the downlink: a reader of the gateway's desired topic
//! on ferry's own protocol client (TLS, mTLS, tokens with challenges and
//! lookup redirects as for the producers). It subscribes without a durable
//! cursor, from the position the store keeps, on the topic's compacted
//! view; it hands what it read to the store in batches, each with the
//! position after it, and asks the broker for more only once the store
//! committed them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pulsar::proto::command_subscribe::SubType;
use pulsar::proto::MessageIdData;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::message::{decode_position, encode_position, is_after, is_empty_topic, read_message};
use crate::backoff::Backoff;
use crate::store::db::DesiredUpdate;
use crate::store::{DownlinkCommand, StoreHandle};
use crate::uplink::link::{last_message_id, step, subscribe};
use crate::uplink::lookup::connect_to_topic;
use crate::uplink::protocol::{Event, Protocol, SubscribeOptions};
use crate::uplink::session::bounded;
use crate::uplink::{ErrorClass, UplinkError, UplinkSettings};

/// The reader's consumer on its connection.
const CONSUMER_ID: u64 = 1;
/// Messages the broker may send ahead of what the store committed: several
/// batches, so that the broker keeps sending while a batch commits.
const PERMITS: u32 = 4_000;
/// A batch goes to the store once it holds this many messages, or once
/// what the connection had already received is taken and this long has
/// passed since the previous batch was stored: a message after a quiet
/// spell goes at once, and a busy stream is stored in batches (at most one
/// commit per gap besides the full ones), leaving the store thread to the
/// uplink in between.
const BATCH_MESSAGES: u32 = 1_000;
/// A batch also goes to the store once its payloads reach this many bytes:
/// what the reader holds in memory is bounded by bytes, not by what the
/// fleet writes (a desired document may be as large as a Pulsar message).
const BATCH_BYTES: usize = 4 * 1024 * 1024;
const BATCH_GAP: Duration = Duration::from_millis(5);
/// Catching up also ends when the broker has been silent this long with
/// permits to spare: the rest of the topic was compacted away (a cleared
/// device's tombstone may be its last message, which a compacted read never
/// delivers). Long, because ending early would let a fresh store publish a
/// version older than the one the topic holds further on; the usual end is
/// reaching the topic's last message id.
const CATCH_UP_QUIET: Duration = Duration::from_secs(10);
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Reads the desired topic until shutdown; errors back off and start over
/// (from the position the store kept), and only a store failure ends it.
pub async fn run(
    settings: UplinkSettings,
    subscription: String,
    store: StoreHandle,
    stored: Arc<Notify>,
    beat: crate::notify::Beat,
    live: crate::status::Live,
    shutdown: CancellationToken,
) -> Result<(), UplinkError> {
    let mut backoff = Backoff::new(settings.uplink.backoff_min, settings.uplink.backoff_max);
    loop {
        let mut reader = Reader {
            settings: &settings,
            subscription: &subscription,
            store: &store,
            stored: &stored,
            beat: &beat,
            live: &live,
            backoff: &mut backoff,
        };
        let e = match reader.session(&shutdown).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let class = e.class();
        e.audit(&settings.name);
        if class == ErrorClass::Fatal {
            return Err(e);
        }
        let delay = if class == ErrorClass::NeedsOperator {
            settings.uplink.backoff_max
        } else {
            backoff.next_delay()
        };
        live.pulsar_down(&settings.name, &settings.service.to_string(), e.to_string());
        let retry_in_ms = delay.as_millis() as u64;
        if class == ErrorClass::NeedsOperator {
            tracing::error!(error = %e, topic = %settings.name, retry_in_ms,
                "downlink blocked until an operator fixes this; desired state waits in Pulsar");
        } else {
            tracing::warn!(error = %e, topic = %settings.name, retry_in_ms,
                "downlink disconnected; it resumes from the last position stored");
        }
        if bounded(&beat, &shutdown, tokio::time::sleep(delay))
            .await
            .is_none()
        {
            return Ok(());
        }
    }
}

struct Reader<'a> {
    settings: &'a UplinkSettings,
    subscription: &'a str,
    store: &'a StoreHandle,
    stored: &'a Notify,
    beat: &'a crate::notify::Beat,
    live: &'a crate::status::Live,
    backoff: &'a mut Backoff,
}

/// What was read and not yet stored.
#[derive(Default)]
struct Batch {
    updates: Vec<DesiredUpdate>,
    /// Payload bytes of `updates`.
    bytes: usize,
    /// Messages (entries) it covers: the permits to give back once stored.
    messages: u32,
    /// The position after it.
    last: Option<MessageIdData>,
}

impl Batch {
    fn is_full(&self) -> bool {
        self.messages >= BATCH_MESSAGES || self.bytes >= BATCH_BYTES
    }
}

impl Reader<'_> {
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), UplinkError> {
        let s = self.settings;
        // The store knows each cluster's read position by the name.
        let topic = s.name.clone();
        let store = self.store;
        let setup = async {
            let mut proto = Protocol::new(s.auth.is_some(), &s.topic).for_reading();
            let mut conn = connect_to_topic(s, &mut proto).await?;
            let start = store
                .downlink(|reply| DownlinkCommand::Start {
                    topic: topic.clone(),
                    reply,
                })
                .await?;
            let position = start.position.as_deref().and_then(decode_position);
            let options = SubscribeOptions {
                name: self.subscription.to_string(),
                sub_type: SubType::Exclusive,
                durable: false,
                start: position.clone(),
                read_compacted: true,
                earliest: true,
                consumer_name: Some(self.subscription.to_string()),
            };
            subscribe(&mut conn, &mut proto, s, CONSUMER_ID, options).await?;
            // A store that never read the topic to its end reads up to where
            // it ends now before anything is published.
            let target = if start.caught_up {
                None
            } else {
                Some(last_message_id(&mut conn, &mut proto, s, CONSUMER_ID).await?)
            };
            Ok::<_, UplinkError>((conn, proto, position, start.caught_up, target))
        };
        let Some(ready) = bounded(self.beat, shutdown, setup).await else {
            return Ok(());
        };
        let (mut conn, mut proto, mut position, mut caught_up, target) = ready?;
        if let Some(t) = &target {
            let nothing_left =
                is_empty_topic(t) || position.as_ref().is_some_and(|p| !is_after(t, p));
            if nothing_left {
                self.store(&mut Batch::default(), &position, true).await?;
                caught_up = true;
            }
        }
        self.backoff.reset();
        self.live.pulsar_up(&s.name, &conn.endpoint.to_string());
        tracing::info!(topic = %s.name, caught_up, "downlink reading the desired topic");
        conn.push(&proto.flow(CONSUMER_ID, PERMITS));
        conn.flush().await?;
        let mut batch = Batch::default();
        let mut last_stored: Option<Instant> = None;
        let mut last_heard = Instant::now();
        let mut ping = tokio::time::interval(KEEPALIVE);
        let mut beat = tokio::time::interval(crate::notify::BEAT_EVERY);
        loop {
            let due = (batch.messages > 0)
                .then(|| last_stored.map_or_else(Instant::now, |t| t + BATCH_GAP));
            tokio::select! {
                _ = shutdown.cancelled() => {
                    if batch.messages > 0 {
                        self.store(&mut batch, &position, caught_up).await?;
                    }
                    return Ok(());
                }
                frame = conn.read_frame() => {
                    last_heard = Instant::now();
                    let mut frame = Some(frame?);
                    // And what arrived with it.
                    while let Some(f) = frame {
                        if let Some(event) = step(&mut conn, &mut proto, s, f).await? {
                            self.on_event(event, &mut batch, &position)?;
                        }
                        frame = if !batch.is_full() {
                            conn.try_frame()?
                        } else {
                            None
                        };
                    }
                    conn.flush().await?;
                }
                _ = sleep_until_opt(due) => {}
                _ = ping.tick() => {
                    if last_heard.elapsed() > 2 * KEEPALIVE {
                        return Err(UplinkError::Timeout("the broker's keepalive"));
                    }
                    conn.push(&proto.ping());
                    conn.flush().await?;
                }
                _ = beat.tick() => self.beat.tick(),
            }
            let reached = match (&target, &batch.last) {
                (Some(t), Some(last)) => !is_after(t, last),
                _ => false,
            };
            let quiet = !caught_up && batch.messages == 0 && last_heard.elapsed() >= CATCH_UP_QUIET;
            let full = batch.is_full();
            let waited =
                batch.messages > 0 && last_stored.map_or(true, |t| t.elapsed() >= BATCH_GAP);
            if full || waited || reached || quiet {
                if reached || quiet {
                    if !caught_up {
                        tracing::info!(topic = %s.name, "downlink caught up with the desired topic");
                    }
                    caught_up = true;
                }
                let permits = batch.messages;
                if let Some(last) = batch.last.clone() {
                    position = Some(last);
                }
                self.store(&mut batch, &position, caught_up).await?;
                last_stored = Some(Instant::now());
                if permits > 0 {
                    conn.push(&proto.flow(CONSUMER_ID, permits));
                    conn.flush().await?;
                }
            }
        }
    }

    /// Takes a message into the batch (what the store already holds, at or
    /// before its position, is skipped).
    fn on_event(
        &self,
        event: Event,
        batch: &mut Batch,
        position: &Option<MessageIdData>,
    ) -> Result<(), UplinkError> {
        match event {
            Event::Message {
                consumer_id: CONSUMER_ID,
                message_id,
                metadata,
                payload,
                ..
            } => {
                batch.messages += 1;
                let from = batch.last.clone().or_else(|| position.clone());
                for r in read_message(&message_id, &metadata, &payload) {
                    if from.as_ref().map_or(true, |p| is_after(&r.id, p)) {
                        batch.bytes += r.update.payload.len();
                        batch.updates.push(r.update);
                    }
                }
                let at = MessageIdData {
                    batch_index: metadata.num_messages_in_batch.map(|n| n - 1),
                    ..message_id
                };
                if batch.last.as_ref().map_or(true, |l| is_after(&at, l)) {
                    batch.last = Some(at);
                }
                Ok(())
            }
            Event::ConsumerClosed { .. } => {
                Err(UplinkError::ConsumerClosed(self.settings.topic.clone()))
            }
            _ => Ok(()),
        }
    }

    /// Hands a batch (maybe empty) with the position after it to the store.
    async fn store(
        &self,
        batch: &mut Batch,
        position: &Option<MessageIdData>,
        caught_up: bool,
    ) -> Result<(), UplinkError> {
        let updates = std::mem::take(&mut batch.updates);
        let position = position.as_ref().map(encode_position).unwrap_or_default();
        let topic = self.settings.name.clone();
        let out = self
            .store
            .downlink(|reply| DownlinkCommand::Received {
                topic,
                updates,
                position,
                caught_up,
                reply,
            })
            .await?;
        if out.stored > 0 || caught_up {
            self.stored.notify_one();
        }
        *batch = Batch::default();
        Ok(())
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
