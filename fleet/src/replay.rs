//! `ferry-fleet replay`: rebuilds the view from the gateways' compacted
//! status topics, for a new database or after one was lost.
//!
//! Each status topic is read once, from its earliest position, with a
//! compacted read (a non-durable Exclusive subscription with
//! `read_compacted`: the broker hands over the latest message per device
//! that compaction kept, then whatever came after the last compaction), up
//! to the topic's last message id as the broker reports it when the read
//! starts. Every message goes through the view's own parsing and apply rule
//! ([`crate::view::apply::parse`], [`ViewStore::apply`]), so replaying into
//! a live or a partly filled database never takes a row back: what the
//! database already holds newer counts stale. Nothing is acknowledged or
//! written to Pulsar; what cannot be parsed is counted as skipped (the live
//! view dead-letters it).

use std::time::{Duration, Instant};

use futures::StreamExt;
use pulsar::consumer::InitialPosition;
use pulsar::proto::MessageIdData;
use pulsar::{Consumer, ConsumerOptions, SubType, TokioExecutor};
use thiserror::Error;
use tokio::sync::watch;

use crate::config::{FleetConfig, TopicRole};
use crate::db::{self, Applied, DbError, StateUpdate, ViewStore};
use crate::pulsar_client::ClientError;
use crate::view::apply;
use crate::view::consume::incoming;
use crate::view::ViewTopics;

/// How long a topic may go without a message before its end before the
/// read stops there (and says so).
pub const IDLE: Duration = Duration::from_secs(10);
/// Updates written per trip to the database thread.
const BATCH: usize = 500;

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("cannot read {topic}: {source}")]
    Read {
        topic: String,
        source: pulsar::Error,
    },
    #[error("the database thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    pub topics: usize,
    /// Messages read from the topics.
    pub read: u64,
    /// Updates written (newer than their row).
    pub applied: u64,
    /// Updates the database already held (or something newer).
    pub stale: u64,
    /// Messages that are no update (no key, not JSON, ...).
    pub skipped: u64,
    /// Topics whose read stopped after [`IDLE`] before their end.
    pub short: Vec<String>,
    /// Stopped by a signal before the end.
    pub interrupted: bool,
    pub elapsed: Duration,
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replayed {} topics in {:.3} s: read {}, applied {}, stale {}, skipped {}",
            self.topics,
            self.elapsed.as_secs_f64(),
            self.read,
            self.applied,
            self.stale,
            self.skipped
        )?;
        if !self.short.is_empty() {
            write!(f, "; ended early on {}", self.short.join(", "))?;
        }
        if self.interrupted {
            write!(f, "; interrupted")?;
        }
        Ok(())
    }
}

/// A message position, comparable: (ledger, entry).
pub type Position = (u64, u64);

/// Where a topic ends, from its last message id; `None` for a topic without
/// messages (the broker names entry -1).
pub fn end_of(last: &MessageIdData) -> Option<Position> {
    (last.ledger_id != u64::MAX && last.entry_id != u64::MAX)
        .then_some((last.ledger_id, last.entry_id))
}

/// Whether a message at `at` is the end (or past it).
pub fn reached(at: Position, end: Position) -> bool {
    at >= end
}

/// Rebuilds the view in `database` (fleet.toml's if `None`).
pub async fn replay(
    config: &FleetConfig,
    database: Option<&str>,
    stop: watch::Receiver<bool>,
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let database = database.unwrap_or(&config.view.database).to_string();
    let mut store = tokio::task::spawn_blocking(move || db::open(&database)).await??;
    let pulsar = crate::pulsar_client::connect(&config.pulsar).await?;
    let view_topics = ViewTopics::new(config);
    let mut report = ReplayReport {
        topics: config.gateways.len(),
        ..Default::default()
    };
    for gateway in &config.gateways {
        let topic = config.topic(gateway, TopicRole::Status);
        let mut consumer: Consumer<Vec<u8>, TokioExecutor> = pulsar
            .consumer()
            .with_topic(&topic)
            .with_subscription(format!("{}-replay", config.view.subscription))
            .with_subscription_type(SubType::Exclusive)
            .with_options(ConsumerOptions {
                initial_position: InitialPosition::Earliest,
                read_compacted: Some(true),
                durable: Some(false),
                ..Default::default()
            })
            .build()
            .await
            .map_err(|source| ReplayError::Read {
                topic: topic.clone(),
                source,
            })?;
        let last = consumer
            .get_last_message_id()
            .await
            .map_err(|source| ReplayError::Read {
                topic: topic.clone(),
                source,
            })?;
        let Some(end) = last.first().and_then(end_of) else {
            let _ = consumer.close().await;
            continue;
        };
        let mut batch: Vec<StateUpdate> = Vec::with_capacity(BATCH);
        let mut stop = stop.clone();
        loop {
            let next = tokio::select! {
                biased;
                _ = stopped(&mut stop) => {
                    report.interrupted = true;
                    break;
                }
                n = tokio::time::timeout(IDLE, consumer.next()) => n,
            };
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(source))) => {
                    return Err(ReplayError::Read {
                        topic: topic.clone(),
                        source,
                    })
                }
                Ok(None) | Err(_) => {
                    tracing::warn!(%topic, "replay: no message for {IDLE:?} before the topic's end");
                    report.short.push(topic.clone());
                    break;
                }
            };
            report.read += 1;
            let id = msg.message_id();
            let at_end = reached((id.ledger_id, id.entry_id), end);
            match apply::parse(&incoming(&msg), &view_topics).update {
                Ok(u) => batch.push(u),
                Err(poison) => {
                    tracing::warn!(%topic, reason = %poison, "replay: not an update; skipped");
                    report.skipped += 1;
                }
            }
            if batch.len() >= BATCH || at_end {
                store = write(store, std::mem::take(&mut batch), &mut report).await?;
            }
            if at_end {
                break;
            }
        }
        store = write(store, batch, &mut report).await?;
        let _ = consumer.close().await;
        if report.interrupted {
            break;
        }
    }
    // The store is dropped off the async threads (PostgreSQL's client).
    tokio::task::spawn_blocking(move || drop(store)).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Resolves once `stop` says true.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Applies a batch on the blocking pool; the store comes back.
async fn write(
    mut store: Box<dyn ViewStore>,
    batch: Vec<StateUpdate>,
    report: &mut ReplayReport,
) -> Result<Box<dyn ViewStore>, ReplayError> {
    if batch.is_empty() {
        return Ok(store);
    }
    let (store, result) = tokio::task::spawn_blocking(move || {
        let mut n = (0u64, 0u64);
        for u in &batch {
            match store.apply(u) {
                Ok(Applied::Applied) => n.0 += 1,
                Ok(Applied::Stale) => n.1 += 1,
                Err(e) => return (store, Err(e)),
            }
        }
        (store, Ok(n))
    })
    .await?;
    let (applied, stale) = result?;
    report.applied += applied;
    report.stale += stale;
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_topic_has_no_end_and_the_end_is_inclusive() {
        let id = |ledger_id, entry_id| MessageIdData {
            ledger_id,
            entry_id,
            ..Default::default()
        };
        assert_eq!(end_of(&id(7, u64::MAX)), None);
        assert_eq!(end_of(&id(u64::MAX, u64::MAX)), None);
        assert_eq!(end_of(&id(7, 0)), Some((7, 0)));
        assert!(reached((7, 3), (7, 3)));
        assert!(reached((8, 0), (7, 3)));
        assert!(!reached((7, 2), (7, 3)));
        assert!(!reached((6, 9), (7, 3)));
    }

    #[test]
    fn the_report_says_what_was_read_and_applied() {
        let r = ReplayReport {
            topics: 5,
            read: 100,
            applied: 98,
            stale: 2,
            skipped: 0,
            short: vec![],
            interrupted: false,
            elapsed: Duration::from_millis(1234),
        };
        assert_eq!(
            r.to_string(),
            "replayed 5 topics in 1.234 s: read 100, applied 98, stale 2, skipped 0"
        );
    }
}
