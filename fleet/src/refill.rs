//! `ferry-fleet refill --from west --to east`: a cluster that lost its data
//! (a region lost for good and brought back empty, a topic deleted) gets
//! the gateways' records again, copied from a cluster that kept them.
//!
//! ## Why a copy is exact
//!
//! Ferry writes every record to each cluster itself, under the same record
//! number in each (the sequence id of its producer, whose name is the same
//! in every cluster). A gateway whose cluster answers that it holds fewer
//! records than it confirmed holds that cluster's records back (see the
//! agent's `lost_by_cluster`) until the cluster holds them again. So a
//! record copied with its producer name, sequence id and metadata unchanged
//! is, for the target cluster's deduplication, the record the gateway would
//! have sent: when the gateway's producer comes back, the broker names the
//! last copied number and the gateway skips what the copy holds and sends
//! the rest, in order. Exactly once, per-device order kept.
//!
//! ## One topic
//!
//! 1. What the target already holds: its messages read once, non-durable,
//!    from the start to its last message id (nothing for a new cluster),
//!    the highest sequence id per producer name.
//! 2. The source read the same way, in chunks. Each message of producer `P`
//!    goes to the target through a producer named `P` (the agent's
//!    protocol core, which sends the sequence id it is given), unless the
//!    target holds it (its sequence id at most the highest of step 1 or the
//!    `last_sequence_id` the target names for `P`). The broker allows one
//!    producer of a name on a topic: while the copy runs, the gateway's own
//!    producer cannot connect, and a copy waits for a gateway's producer to
//!    go (a held gateway only looks in every `uplink.backoff_max_ms`).
//!
//! A run that fails part way can be started again: it copies only what
//! the target does not hold.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferry::uplink::frame;
use ferry::uplink::link::{create_producer, until, within, PRODUCER_ID};
use ferry::uplink::producer::Receipt;
use ferry::uplink::{connect_to_topic, ErrorClass, Event, Protocol, UplinkError, UplinkSettings};
use thiserror::Error;

use crate::config::{FleetConfig, TopicRole};
use crate::reader::{Reader, Stored};

/// Sends to the target in flight.
const WINDOW: usize = 500;
/// Attempts to take a producer's name on the target (a gateway may hold
/// it for a moment).
const ATTEMPTS: u32 = 20;

#[derive(Debug, Error)]
pub enum RefillError {
    #[error("--{flag} {name}: fleet.toml names no such cluster (its clusters: {known})")]
    UnknownCluster {
        flag: &'static str,
        name: String,
        known: String,
    },
    #[error("--from and --to name the same cluster ({0})")]
    SameCluster(String),
    #[error("pulsar.clusters: {0}")]
    ServiceUrl(String),
    #[error("{cluster} {topic}: {source}")]
    Pulsar {
        cluster: String,
        topic: String,
        source: Box<UplinkError>,
    },
}

impl RefillError {
    /// Whether the command line was wrong (exit 2) rather than the run.
    pub fn is_usage(&self) -> bool {
        !matches!(self, RefillError::Pulsar { .. })
    }
}

/// What the copy of one topic did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicRefill {
    pub topic: String,
    /// Messages read from the source.
    pub read: u64,
    /// Messages written to the target.
    pub copied: u64,
    /// Messages the target already held.
    pub present: u64,
    /// The producers whose messages were copied, each with the last
    /// sequence id the target holds of it now.
    pub producers: Vec<(String, i64)>,
}

impl std::fmt::Display for TopicRefill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: read {}, copied {}, already there {}",
            self.topic, self.read, self.copied, self.present
        )?;
        for (p, last) in &self.producers {
            write!(f, "; {p} up to {last}")?;
        }
        Ok(())
    }
}

/// The topics a refill copies by default: every topic of every gateway of
/// fleet.toml.
pub fn fleet_topics(config: &FleetConfig) -> Vec<String> {
    config
        .gateways
        .iter()
        .flat_map(|g| TopicRole::ALL.iter().map(|r| config.topic(g, *r)))
        .collect()
}

/// Copies `topics` from cluster `from` to cluster `to`, one after the
/// other; prints a line per topic to `out` as it is done.
pub async fn refill(
    config: &FleetConfig,
    from: &str,
    to: &str,
    topics: &[String],
    out: &mut impl std::io::Write,
) -> Result<Vec<TopicRefill>, RefillError> {
    let cluster = |flag, name: &str| {
        config
            .on_cluster(name)
            .ok_or_else(|| RefillError::UnknownCluster {
                flag,
                name: name.to_string(),
                known: match config.cluster_names() {
                    n if n.is_empty() => "one, without a name".to_string(),
                    n => n.join(", "),
                },
            })
    };
    let (source, target) = (cluster("from", from)?, cluster("to", to)?);
    if from == to {
        return Err(RefillError::SameCluster(from.to_string()));
    }
    let mut done = Vec::new();
    for topic in topics {
        let at = |cluster: &str| {
            let cluster = cluster.to_string();
            let topic = topic.clone();
            move |source| RefillError::Pulsar {
                cluster,
                topic,
                source: Box::new(source),
            }
        };
        let s = settings(&source, topic, "ferry-fleet-refill")?;
        let t = settings(&target, topic, "ferry-fleet-refill")?;
        let present = with_retries(|| highest_per_producer(&t))
            .await
            .map_err(at(to))?;
        let mut copy = Copy::new(t, present);
        let mut reader = Reader::open(&s, false).await.map_err(at(from))?;
        while let Some(chunk) = reader.next_chunk().await.map_err(at(from))? {
            copy.chunk(chunk).await.map_err(at(to))?;
        }
        let report = copy.finish().await.map_err(at(to))?;
        let _ = writeln!(out, "{report}");
        done.push(report);
    }
    Ok(done)
}

/// The agent's client settings for `topic` on the cluster `config` talks to.
fn settings(config: &FleetConfig, topic: &str, name: &str) -> Result<UplinkSettings, RefillError> {
    let mut s = crate::desire::settings(&config.pulsar, topic, name)
        .map_err(|e| RefillError::ServiceUrl(e.to_string()))?;
    s.uplink.max_in_flight = WINDOW;
    Ok(s)
}

/// Runs `f` again after a transient failure, a few times.
async fn with_retries<T, F, Fut>(mut f: F) -> Result<T, UplinkError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, UplinkError>>,
{
    let mut backoff =
        ferry::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(3));
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e) if e.class() == ErrorClass::Transient && attempt < ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64,
                    "refill: trying again");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The highest sequence id of each producer in the topic.
async fn highest_per_producer(s: &UplinkSettings) -> Result<HashMap<String, u64>, UplinkError> {
    let mut highest = HashMap::new();
    let mut reader = Reader::open(s, false).await?;
    while let Some(chunk) = reader.next_chunk().await? {
        for m in chunk {
            let h = highest.entry(m.metadata.producer_name.clone()).or_insert(0);
            *h = m.metadata.sequence_id.max(*h);
        }
    }
    Ok(highest)
}

/// The target side of a copy: one producer at a time, named as the
/// messages' producer.
struct Copy {
    settings: UplinkSettings,
    /// What the target held before the copy, per producer.
    present: HashMap<String, u64>,
    /// The producer open now: its name, connection and protocol state.
    open: Option<(String, ferry::uplink::conn::Conn, Protocol)>,
    /// Per producer: the highest sequence id the target holds or was sent.
    last: HashMap<String, i64>,
    report: TopicRefill,
}

impl Copy {
    fn new(settings: UplinkSettings, present: HashMap<String, u64>) -> Copy {
        let report = TopicRefill {
            topic: settings.topic.clone(),
            ..TopicRefill::default()
        };
        Copy {
            settings,
            present,
            open: None,
            last: HashMap::new(),
            report,
        }
    }

    async fn chunk(&mut self, chunk: Vec<Stored>) -> Result<(), UplinkError> {
        for m in chunk {
            self.report.read += 1;
            let name = m.metadata.producer_name.clone();
            let seq = m.metadata.sequence_id;
            // What the target holds needs no producer (the gateway's own
            // may be connected again).
            let known = self.present.get(&name).map_or(-1, |h| *h as i64);
            if seq as i64 <= self.last.get(&name).copied().unwrap_or(known) {
                self.report.present += 1;
                continue;
            }
            if self.open.as_ref().map(|(n, ..)| n) != Some(&name) {
                self.close().await?;
                self.open_producer(&name).await?;
                if seq as i64 <= self.last[&name] {
                    self.report.present += 1;
                    continue;
                }
            }
            let (_, conn, proto) = self.open.as_mut().expect("opened above");
            while proto.window(PRODUCER_ID).map_or(0, |w| w.room()) == 0 {
                receipt(conn, proto, &self.settings).await?;
            }
            let mut send = proto
                .send(PRODUCER_ID, seq, m.payload.len(), Instant::now())
                .expect("the producer was created");
            send.num_messages = m.metadata.num_messages_in_batch.or(Some(1));
            frame::encode_send(&send, &m.metadata, &m.payload, &mut conn.wbuf);
            conn.flush().await?;
            self.last.insert(name, seq as i64);
            self.report.copied += 1;
        }
        Ok(())
    }

    /// Takes the name `name` on the target (waiting while another holds
    /// it).
    async fn open_producer(&mut self, name: &str) -> Result<(), UplinkError> {
        let s = &self.settings;
        let (conn, proto, last) = with_retries(|| async {
            let mut proto = Protocol::new(s.auth.is_some(), &s.topic);
            let mut conn = connect_to_topic(s, &mut proto).await?;
            let last = create_producer(&mut conn, &mut proto, s, name).await?;
            proto.open_window(PRODUCER_ID, last);
            Ok((conn, proto, last))
        })
        .await?;
        let held = self.present.get(name).map_or(-1, |h| *h as i64);
        let last = *self
            .last
            .entry(name.to_string())
            .and_modify(|l| *l = (*l).max(last).max(held))
            .or_insert(last.max(held));
        tracing::info!(topic = %s.topic, producer = name, last, "refill: copying");
        self.open = Some((name.to_string(), conn, proto));
        Ok(())
    }

    /// Waits for every receipt of the open producer, then lets its name go.
    async fn close(&mut self) -> Result<(), UplinkError> {
        let Some((name, mut conn, mut proto)) = self.open.take() else {
            return Ok(());
        };
        while proto.window(PRODUCER_ID).map_or(0, |w| w.in_flight()) > 0 {
            receipt(&mut conn, &mut proto, &self.settings).await?;
        }
        let last = self.last[&name];
        self.report.producers.push((name, last));
        Ok(())
    }

    async fn finish(mut self) -> Result<TopicRefill, UplinkError> {
        self.close().await?;
        Ok(self.report)
    }
}

/// Waits for the next receipt of the producer.
async fn receipt(
    conn: &mut ferry::uplink::conn::Conn,
    proto: &mut Protocol,
    s: &UplinkSettings,
) -> Result<(), UplinkError> {
    let next = until(conn, proto, s, |e| match e {
        Event::Receipt {
            producer_id: PRODUCER_ID,
            receipt: Receipt::Confirmed { .. },
        } => Some(Ok(())),
        Event::ProducerClosed { .. } => Some(Err(UplinkError::ProducerClosed)),
        _ => None,
    });
    within(s.operation_timeout(), "a send receipt", next).await?
}
