//! The view's loop: one durable Key_Shared consumer on every gateway's
//! status topic and the retry topic, the database on a blocking thread,
//! and two producers for the retry and dead-letter copies.
//!
//! Messages are handled one at a time, in the order the broker hands them
//! over, so a device's updates reach the database in order. Each ends in
//! exactly one of: written (applied), older than the row (stale), copied to
//! the retry topic, copied to the dead-letter topic; and only then is it
//! acknowledged. A copy is acknowledged only once the broker has confirmed
//! it (its send receipt): until then the send is tried again, and on
//! shutdown the message stays unacknowledged for the broker to hand over
//! again.
//!
//! The `pulsar` crate's consumer subscribes again from its start position
//! after a reconnect. On this durable subscription the broker keeps the
//! cursor, so that only hands over again what was not acknowledged yet:
//! at-least-once, and the apply rule ([`super::apply::decide`], in the
//! database's one conditional write) makes every second delivery stale and
//! harmless. A retry copy whose receipt was lost may exist twice; the
//! second one ends stale too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use pulsar::consumer::InitialPosition;
use pulsar::producer::Message;
use pulsar::{Consumer, ConsumerOptions, Producer, SubType, TokioExecutor};
use tokio::sync::watch;

use super::apply::{self, Incoming};
use super::retry::{self, Failure, Route};
use super::{Counts, ViewError, ViewTopics};
use crate::config::FleetConfig;
use crate::db::{self, Applied, ViewStore};

/// How often the counts are logged (when they changed).
const LOG_EVERY: Duration = Duration::from_secs(30);
/// The longest wait between two tries of a retry or dead-letter copy.
const SEND_BACKOFF_MAX: Duration = Duration::from_secs(30);

type Store = Arc<Mutex<Box<dyn ViewStore>>>;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The parts of a consumed message the view reads.
pub fn incoming(msg: &pulsar::consumer::Message<Vec<u8>>) -> Incoming {
    let meta = msg.metadata();
    Incoming {
        topic: msg.topic.clone(),
        key: meta.partition_key.clone(),
        payload: msg.payload.data.clone(),
        properties: meta
            .properties
            .iter()
            .map(|kv| (kv.key.clone(), kv.value.clone()))
            .collect(),
    }
}

/// Resolves once `stop` says true.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Sends `msg` until the broker confirms it; false if `stop` came first.
pub async fn send_confirmed(
    producer: &mut Producer<TokioExecutor>,
    msg: Message,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut backoff = Duration::from_millis(200);
    loop {
        let sent = async {
            producer
                .send_non_blocking(msg.clone())
                .await?
                .await
                .map(|_| ())
        };
        tokio::select! {
            biased;
            _ = stopped(stop) => return false,
            r = sent => match r {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "copy not confirmed; trying again"),
            },
        }
        tokio::select! {
            _ = stopped(stop) => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(SEND_BACKOFF_MAX);
    }
}

/// Runs the view until `stop` says true, counting in `counts`.
pub async fn run(
    config: &FleetConfig,
    counts: Arc<Counts>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ViewError> {
    let database = config.view.database.clone();
    let store: Store = Arc::new(Mutex::new(
        tokio::task::spawn_blocking(move || db::open(&database)).await??,
    ));
    let topics = ViewTopics::new(config);
    let pulsar = crate::pulsar_client::connect(&config.pulsar).await?;
    let subscription = config.view.subscription.clone();
    let mut consumer: Consumer<Vec<u8>, TokioExecutor> = pulsar
        .consumer()
        .with_topics(topics.consumed())
        .with_subscription(&subscription)
        .with_subscription_type(SubType::KeyShared)
        .with_options(ConsumerOptions {
            // A new view reads what the topics still hold; an existing
            // subscription goes on from its cursor.
            initial_position: InitialPosition::Earliest,
            durable: Some(true),
            ..Default::default()
        })
        .build()
        .await
        .map_err(|source| ViewError::Subscribe {
            subscription: subscription.clone(),
            source,
        })?;
    let producer = |topic: String| {
        let pulsar = pulsar.clone();
        async move {
            pulsar
                .producer()
                .with_topic(&topic)
                .build()
                .await
                .map_err(|source| ViewError::Producer { topic, source })
        }
    };
    let mut to_retry = producer(config.retry_topic()).await?;
    let mut to_dead = producer(config.dead_letter_topic()).await?;
    tracing::info!(
        topics = topics.consumed().len(),
        %subscription,
        "view: consuming"
    );

    let mut every = tokio::time::interval(LOG_EVERY);
    let mut logged = counts.snapshot();
    loop {
        let msg = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            _ = every.tick() => {
                let now = counts.snapshot();
                if now != logged {
                    tracing::info!(counts = %now, "view");
                    logged = now;
                }
                continue;
            }
            m = consumer.next() => m,
        };
        let msg = match msg {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "view: consumer error");
                continue;
            }
            None => return Err(ViewError::ConsumerEnded),
        };
        Counts::add(&counts.consumed);
        let inc = incoming(&msg);
        let parsed = apply::parse(&inc, &topics);
        let failure = match parsed.update {
            Err(poison) => Failure::Poison(poison),
            Ok(update) => {
                let store = store.clone();
                let device = update.device.clone();
                match tokio::task::spawn_blocking(move || store.lock().unwrap().apply(&update))
                    .await?
                {
                    Ok(Applied::Applied) => {
                        Counts::add(&counts.applied);
                        ack(&mut consumer, &msg).await;
                        continue;
                    }
                    Ok(Applied::Stale) => {
                        Counts::add(&counts.stale);
                        ack(&mut consumer, &msg).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(%device, error = %e, "view: database refused an update");
                        Failure::Transient(e.to_string())
                    }
                }
            }
        };
        let now = now_ms();
        let route = retry::route_failure(
            parsed.failed_before,
            config.view.max_attempts,
            config.view.retry_delay,
            now,
        );
        let (confirmed, counter) = match route {
            Route::Retry {
                attempts,
                deliver_at_ms,
            } => {
                let copy = retry::retry_copy(
                    &inc,
                    &parsed.origin_topic,
                    attempts,
                    &failure,
                    deliver_at_ms,
                );
                (
                    send_confirmed(&mut to_retry, copy, &mut stop).await,
                    &counts.retried,
                )
            }
            Route::DeadLetter { attempts } => {
                tracing::warn!(
                    topic = %parsed.origin_topic,
                    device = inc.key.as_deref().unwrap_or(""),
                    attempts,
                    reason = %failure,
                    "view: update dead-lettered"
                );
                let copy =
                    retry::dead_letter_copy(&inc, &parsed.origin_topic, attempts, &failure, now);
                (
                    send_confirmed(&mut to_dead, copy, &mut stop).await,
                    &counts.dead_lettered,
                )
            }
        };
        if !confirmed {
            // Stopping: the original stays unacknowledged.
            break;
        }
        Counts::add(counter);
        ack(&mut consumer, &msg).await;
    }
    let _ = consumer.close().await;
    Ok(())
}

async fn ack(
    consumer: &mut Consumer<Vec<u8>, TokioExecutor>,
    msg: &pulsar::consumer::Message<Vec<u8>>,
) {
    if let Err(e) = consumer.ack(msg).await {
        // The broker hands it over again; the apply rule makes it stale.
        tracing::warn!(error = %e, "view: acknowledgement failed");
    }
}
