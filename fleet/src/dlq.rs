//! `ferry-fleet dlq list` and `dlq replay`: what is on the view's
//! dead-letter topic, and putting it back.
//!
//! Both read the dead-letter topic through one durable subscription,
//! `<view.subscription>-dlq` (Exclusive: one `dlq` command at a time).
//! `list` reads what that subscription has not acknowledged and
//! acknowledges nothing, so it shows the same entries until they are
//! replayed. `replay` copies each entry onto the retry topic (delivered at
//! once, its attempts reset, its original topic kept) and acknowledges it
//! only after the broker confirmed the copy; the running `view` processes
//! then apply it under the usual rule (so a replay never writes an older
//! state over a newer one), or send it back here if it fails again.
//!
//! The end of the topic is the last message id the broker reports when the
//! command starts; a command also stops after [`IDLE`] without a message
//! (all entries replayed before).

use std::time::Duration;

use futures::StreamExt;
use pulsar::consumer::InitialPosition;
use pulsar::{Consumer, ConsumerOptions, SubType, TokioExecutor};
use serde::Serialize;
use thiserror::Error;
use tokio::sync::watch;

use crate::config::FleetConfig;
use crate::pulsar_client::ClientError;
use crate::view::apply::{ATTEMPTS, FAILED_MS, GATEWAY, ORIGIN_TOPIC, REASON, RECORD};
use crate::view::consume::{incoming, send_confirmed};
use crate::view::retry::replay_copy;

/// How long a `dlq` command waits for the next entry before it takes the
/// topic as read.
pub const IDLE: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum DlqError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot read {topic}: {source}")]
    Subscribe {
        topic: String,
        source: pulsar::Error,
    },
    #[error("cannot create a producer on {topic}: {source}")]
    Producer {
        topic: String,
        source: pulsar::Error,
    },
    #[error("reading {topic}: {source}")]
    Read {
        topic: String,
        source: pulsar::Error,
    },
    #[error("acknowledging on {topic}: {source}")]
    Ack {
        topic: String,
        source: pulsar::error::ConsumerError,
    },
}

/// One update on the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The message key (empty if it had none).
    pub device: String,
    pub gateway: Option<String>,
    /// `ferry.record` as it was (it may be what was wrong).
    pub record: Option<String>,
    pub reason: String,
    pub attempts: u32,
    /// When it was dead-lettered (ms since the epoch).
    pub failed_ms: i64,
    /// The status topic it was first published on.
    pub topic: String,
}

impl DeadLetter {
    fn of(inc: &crate::view::apply::Incoming) -> DeadLetter {
        let p = |k: &str| inc.properties.get(k).cloned();
        DeadLetter {
            device: inc.key.clone().unwrap_or_default(),
            gateway: p(GATEWAY),
            record: p(RECORD),
            reason: p(REASON).unwrap_or_default(),
            attempts: p(ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(0),
            failed_ms: p(FAILED_MS).and_then(|a| a.parse().ok()).unwrap_or(0),
            topic: p(ORIGIN_TOPIC).unwrap_or_default(),
        }
    }
}

/// `dlq list`'s text form: a tab-separated table and the count.
pub fn table(dead: &[DeadLetter]) -> String {
    let mut t = String::from("DEVICE\tGATEWAY\tRECORD\tATTEMPTS\tFAILED_MS\tTOPIC\tREASON\n");
    for d in dead {
        t.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            d.device,
            d.gateway.as_deref().unwrap_or("-"),
            d.record.as_deref().unwrap_or("-"),
            d.attempts,
            d.failed_ms,
            d.topic,
            d.reason
        ));
    }
    t.push_str(&format!("{} dead letters\n", dead.len()));
    t
}

async fn subscribe(config: &FleetConfig) -> Result<Consumer<Vec<u8>, TokioExecutor>, DlqError> {
    let topic = config.dead_letter_topic();
    let pulsar = crate::pulsar_client::connect(&config.pulsar).await?;
    pulsar
        .consumer()
        .with_topic(&topic)
        .with_subscription(format!("{}-dlq", config.view.subscription))
        .with_subscription_type(SubType::Exclusive)
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            durable: Some(true),
            ..Default::default()
        })
        .build()
        .await
        .map_err(|source| DlqError::Subscribe { topic, source })
}

/// Reads the unacknowledged entries one by one, handing each to `each`,
/// until the broker's last message id or [`IDLE`].
async fn read_each<F, Fut>(
    consumer: &mut Consumer<Vec<u8>, TokioExecutor>,
    topic: &str,
    mut each: F,
) -> Result<(), DlqError>
where
    F: FnMut(pulsar::consumer::Message<Vec<u8>>) -> Fut,
    Fut: std::future::Future<Output = Result<bool, DlqError>>,
{
    let last = consumer
        .get_last_message_id()
        .await
        .map_err(|source| DlqError::Read {
            topic: topic.into(),
            source,
        })?
        .first()
        .map(|id| (id.ledger_id, id.entry_id));
    loop {
        let msg = match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                return Err(DlqError::Read {
                    topic: topic.into(),
                    source: e,
                })
            }
            Ok(None) | Err(_) => return Ok(()),
        };
        let id = msg.message_id();
        let at_end = last.is_some_and(|l| (id.ledger_id, id.entry_id) >= l);
        if !each(msg).await? || at_end {
            return Ok(());
        }
    }
}

/// What is on the dead-letter topic (not yet replayed).
pub async fn list(config: &FleetConfig) -> Result<Vec<DeadLetter>, DlqError> {
    let topic = config.dead_letter_topic();
    let mut consumer = subscribe(config).await?;
    let mut out = Vec::new();
    read_each(&mut consumer, &topic, |m| {
        out.push(DeadLetter::of(&incoming(&m)));
        async { Ok(true) }
    })
    .await?;
    // Nothing acknowledged: the entries stay for the next reader.
    let _ = consumer.close().await;
    Ok(out)
}

/// Puts every entry back on the retry topic; how many.
pub async fn replay(config: &FleetConfig, stop: watch::Receiver<bool>) -> Result<u64, DlqError> {
    let topic = config.dead_letter_topic();
    let retry_topic = config.retry_topic();
    let pulsar = crate::pulsar_client::connect(&config.pulsar).await?;
    let mut producer = pulsar
        .producer()
        .with_topic(&retry_topic)
        .build()
        .await
        .map_err(|source| DlqError::Producer {
            topic: retry_topic.clone(),
            source,
        })?;
    let mut consumer = subscribe(config).await?;
    let mut pending = Vec::new();
    read_each(&mut consumer, &topic, |m| {
        pending.push(m);
        async { Ok(true) }
    })
    .await?;
    let mut replayed = 0;
    for m in pending {
        let mut stop = stop.clone();
        if !send_confirmed(&mut producer, replay_copy(&incoming(&m)), &mut stop).await {
            break;
        }
        consumer.ack(&m).await.map_err(|source| DlqError::Ack {
            topic: topic.clone(),
            source,
        })?;
        replayed += 1;
    }
    let _ = consumer.close().await;
    Ok(replayed)
}
