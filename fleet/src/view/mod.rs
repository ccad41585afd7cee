//! `ferry-fleet view`: the latest state of every device, kept in a
//! database from every gateway's status topic.
//!
//! - [`apply`]: what a message means and the apply rule (pure);
//! - [`retry`]: where a failed update goes, and its copies (pure);
//! - [`consume`]: the loop: Key_Shared consumer, database, producers.
//!
//! ## What the view promises
//!
//! - **Never back.** A row changes only to a newer update of its device
//!   ([`apply::decide`]): redeliveries, retries, replays and late arrivals
//!   are counted stale and change nothing.
//! - **Per-device order, shared work.** Every `view` process joins one
//!   durable Key_Shared subscription on all status topics and the retry
//!   topic: the broker hands all of a device's messages to one process, in
//!   order, and spreads the devices over the processes.
//! - **Nothing lost.** A message is acknowledged only after its update was
//!   written (or found stale), or after its retry or dead-letter copy was
//!   confirmed by the broker. Delivery is at least once: a crash between
//!   the write and the acknowledgement hands the message over again, and
//!   the apply rule makes that harmless.
//! - **Counted**: consumed, applied, stale, retried, dead-lettered.

pub mod apply;
pub mod consume;
pub mod retry;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use thiserror::Error;

use crate::config::{FleetConfig, TopicRole};
use crate::db::DbError;
use crate::pulsar_client::ClientError;

pub use consume::run;

#[derive(Debug, Error)]
pub enum ViewError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("database: {0}")]
    Db(#[from] DbError),
    #[error("cannot subscribe {subscription}: {source}")]
    Subscribe {
        subscription: String,
        source: pulsar::Error,
    },
    #[error("cannot create a producer on {topic}: {source}")]
    Producer {
        topic: String,
        source: pulsar::Error,
    },
    #[error("the consumer ended")]
    ConsumerEnded,
    #[error("the database thread failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the view did, since it started.
#[derive(Debug, Default)]
pub struct Counts {
    /// Messages taken from the topics (status and retry).
    pub consumed: AtomicU64,
    /// Updates written.
    pub applied: AtomicU64,
    /// Updates older than (or equal to) their row: not written.
    pub stale: AtomicU64,
    /// Copies sent to the retry topic.
    pub retried: AtomicU64,
    /// Copies sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
}

/// A copy of [`Counts`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub consumed: u64,
    pub applied: u64,
    pub stale: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

impl Counts {
    pub fn snapshot(&self) -> Snapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            consumed: l(&self.consumed),
            applied: l(&self.applied),
            stale: l(&self.stale),
            retried: l(&self.retried),
            dead_lettered: l(&self.dead_lettered),
        }
    }

    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "consumed {}, applied {}, stale {}, retried {}, dead-lettered {}",
            self.consumed, self.applied, self.stale, self.retried, self.dead_lettered
        )
    }
}

/// The topics of a fleet: each gateway's status topic, the retry topic.
pub struct ViewTopics {
    status: HashMap<String, String>,
    retry: String,
}

impl ViewTopics {
    pub fn new(config: &FleetConfig) -> ViewTopics {
        ViewTopics {
            status: config
                .gateways
                .iter()
                .map(|g| (config.topic(g, TopicRole::Status), g.clone()))
                .collect(),
            retry: config.retry_topic(),
        }
    }

    /// What the view consumes: every status topic, then the retry topic.
    pub fn consumed(&self) -> Vec<String> {
        let mut t: Vec<String> = self.status.keys().cloned().collect();
        t.sort();
        t.push(self.retry.clone());
        t
    }
}

impl apply::Topics for ViewTopics {
    fn gateway_of(&self, topic: &str) -> Option<&str> {
        self.status
            .iter()
            .find(|(t, _)| apply::same_topic(t, topic))
            .map(|(_, g)| g.as_str())
    }

    fn is_retry(&self, topic: &str) -> bool {
        apply::same_topic(&self.retry, topic)
    }
}
