//! The durable store: SQLite in WAL mode, owned by one dedicated thread.
//!
//! # Schema (see [`schema`] for its versions, [`db`] for the SQL)
//!
//! - `outbox(key, device, received_ms, payload, props, stored_at)`: every
//!   accepted update not yet confirmed by Pulsar, once per destination
//!   topic, keyed by `destination id << 48 | record number`. `props` holds
//!   the structured fields (MQTT topic, retain flag) encoded with postcard;
//!   `stored_at` is the store clock's time of the commit.
//! - `destinations(id, topic, next_seq, stream, role, horizon)`: one row per
//!   Pulsar topic; `next_seq` only ever grows, so a number is never reused;
//!   `horizon` is the highest number a session may have sent.
//! - `mqtt_sessions(id, client_id, moot_below)`: ingest's MQTT sessions
//!   (one per `reject` stream besides the main one), by client id.
//! - `mqtt_seen(session, pkid, digest, conn, gen)`: the last stored message
//!   per MQTT session and packet id, with the connection and commit it
//!   came with, to recognise a broker redelivery (DUP flag) of a message
//!   that was committed but whose PUBACK never reached the broker;
//!   `ack_confirmed(conn, gen)`: the acks the broker is known to have
//!   processed (connection numbers are unique across sessions).
//! - `topic_last(topic, digest)`: the last payload stored per MQTT topic, so
//!   that a retained state the broker sends again is stored once.
//! - `dead_letters(...)`: messages that can never be forwarded.
//! - `counters(name, value)`: lifetime counts, with what each stream shed
//!   (`stream:<name>:superseded`, `stream:<name>:dropped:<reason>`).
//! - `store_state(name, value)`: the store clock, the store's id, commit and
//!   connection numbers.
//! - `agent(snapshot)`: the running agent's view of its links, for
//!   `ferry status`.
//! - `incidents(at_ms, kind, detail)`: things an operator must hear about
//!   (a damaged store moved aside, a full disk, a broker number refused).
//!
//! # Lifecycle of a record
//!
//! 1. [`Command::Insert`] arrives from ingest. The store thread gathers
//!    inserts until `commit_max_wait` after the previous commit began (group
//!    commit: at once after a quiet spell, batches under load), gives each a record
//!    number per destination and commits them in one transaction. A stream
//!    over its limits sheds by its policy in that same transaction; a
//!    `reject` stream over its limits holds the message back instead
//!    (*parked*: neither stored nor acknowledged, retried as space frees).
//! 2. Only after that commit are the MQTT ack tokens released to ingest.
//! 3. The uplink reads each destination in record order
//!    ([`Command::Fetch`]) and, after the broker's receipt, asks for the
//!    deletion ([`Command::Delivered`]).
//! 4. On every producer (re)connect the broker names the last record it
//!    holds and [`Command::Resume`] drops what it holds of the records a
//!    session may have sent (up to the horizon), and numbers the others
//!    above the broker's number if it reaches them.
//!
//! # Disk full
//!
//! A commit that fails because the disk is full changes nothing (SQLite
//! rolls it back). The store gives back its reserve file (a few MiB kept
//! beside the database for this), sheds as cheaply as keeping every
//! device's newest state allows ([`db::Db::shed_emergency`]) and tries
//! again; what still does not fit stays parked, unacknowledged, in the MQTT
//! broker. Once the file system has room again, the reserve is rewritten
//! and the configured policies apply again. The same shedding keeps the file
//! under `store.max_bytes`.
//!
//! The store never touches the network.

pub mod db;
mod holdback;
pub mod report;
mod space;
mod worker;

pub use db::schema;

use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::config::StoreConfig;
use crate::layout::{DestIx, Layout};
use db::{Db, Desired, DesiredOutcome, DesiredUpdate, DownlinkStart};
use space::{Reserve, Space};
use worker::Worker;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot move the damaged store {path} aside: {source}")]
    MoveAside {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store failure: {0}")]
    Sqlite(rusqlite::Error),
    #[error("the disk holding the store is full")]
    DiskFull,
    #[error("record numbers of {0} are exhausted (2^48)")]
    Exhausted(String),
    /// The broker's `last_sequence_id` cannot be honoured: nothing changed.
    #[error("the broker says it holds record {last_sequence_id} of {topic}, more than ferry numbers (below 2^47), with {pending} record(s) to send: another producer may use this gateway's producer name, or the broker's deduplication state is wrong; records stay in the store")]
    SequenceRefused {
        topic: String,
        last_sequence_id: i64,
        pending: u64,
    },
    /// One of several clusters lost records it had confirmed (its data was
    /// deleted: a region lost for good): its destination is held, nothing
    /// changed, until those records are back in it (`ferry-fleet refill`
    /// copies them from another cluster).
    #[error("{topic}: this cluster confirmed records up to {confirmed} but now holds {} of them (its data was lost, or deduplication is off on its namespace); ferry holds this cluster's records until they are back: copy them from another cluster with `ferry-fleet refill --from <cluster> --to <this cluster>`", held_text(*.broker_last))]
    ClusterLost {
        topic: String,
        confirmed: u64,
        broker_last: i64,
    },
    /// The store is damaged (found while running); the next start moves it
    /// aside.
    #[error("store damaged: {0}")]
    Damaged(String),
    /// The store was written by a newer ferry; it is left as it is.
    #[error("the store has schema version {found}, but this ferry knows versions up to {supported}: it was written by a newer ferry; run that version (or move the store away to start a new one)")]
    TooNew { found: i32, supported: i32 },
    #[error("store thread has stopped")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    /// A full disk is its own error wherever it happens: callers keep going.
    fn from(e: rusqlite::Error) -> StoreError {
        if db::is_disk_full(&e) {
            StoreError::DiskFull
        } else if schema::is_damage(&e) {
            StoreError::Damaged(e.to_string())
        } else {
            StoreError::Sqlite(e)
        }
    }
}

/// Structured fields of a record, stored with postcard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordProps {
    pub mqtt_topic: String,
    pub retain: bool,
}

/// One stored device update, as one destination sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Record number in its destination; also the Pulsar `sequence_id`.
    pub seq: u64,
    pub device: String,
    pub received_ms: u64,
    pub payload: Vec<u8>,
    pub props: RecordProps,
}

/// A message from the MQTT broker, as ingest hands it over.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub mqtt_topic: String,
    pub payload: bytes::Bytes,
    pub retain: bool,
    /// The stream whose subscription matched; `None`: none did.
    pub stream: Option<usize>,
    /// `None` when the stream's rule yields no device id.
    pub device: Option<String>,
    /// The broker marked this as a redelivery.
    pub dup: bool,
    /// MQTT packet id (0 for QoS 0).
    pub pkid: u16,
    /// The MQTT session it came through (see
    /// [`crate::layout::Layout::sessions`]): packet ids are per session.
    pub session: usize,
    /// Handed back after the commit; `None` when nothing is to be acked.
    pub ack: Option<AckToken>,
    /// Already counted as received by a committed transaction (it was held
    /// back by a `reject` stream and is tried again).
    pub counted: bool,
    /// What the MQTT guard changed on its way in, if anything: such a
    /// message is dead-lettered.
    pub guarded: Option<Guarded>,
}

/// What the MQTT guard changed of a message it could not pass on whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// The payload was cut while it streamed in: `payload` holds its first
    /// bytes; it had this many.
    Cut { len: u64 },
    /// The topic was not UTF-8 (`mqtt_topic` is the guard's escaped form).
    TopicNotUtf8,
}

impl Inbound {
    /// The payload's size as the device sent it.
    pub fn size(&self) -> u64 {
        match self.guarded {
            Some(Guarded::Cut { len }) => len,
            _ => self.payload.len() as u64,
        }
    }
}

/// What ingest needs to acknowledge one message, returned after commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pub pkid: u16,
    /// The MQTT session it is acknowledged on.
    pub session: usize,
    /// MQTT connection epoch the message arrived on.
    pub epoch: u64,
    /// The commit that stored (or dropped) the message, set by the store
    /// when it releases the ack; ingest reports it back once the broker
    /// processed the ack ([`Command::AcksConfirmed`]).
    pub gen: u64,
}

/// Requests to the store thread.
pub enum Command {
    Insert(Inbound),
    /// Records of `dest` with `seq > after`, in order, at most `limit` and
    /// `max_bytes` of payload (but at least one).
    Fetch {
        dest: DestIx,
        after: u64,
        limit: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<Record>, StoreError>>,
    },
    /// The broker confirmed every record of `dest` up to `up_to`; `resent`
    /// of them had been sent more than once.
    Delivered {
        dest: DestIx,
        up_to: u64,
        resent: u64,
    },
    /// A producer (re)connected and the broker holds every record of `dest`
    /// up to `last_sequence_id` (-1: none).
    Resume {
        dest: DestIx,
        last_sequence_id: i64,
        reply: oneshot::Sender<Result<ResumeOutcome, StoreError>>,
    },
    /// New batching, payload and stream limits (configuration reload).
    SetLimits(StoreConfig, Layout),
    /// One MQTT session of ingest connected again (connection `epoch`,
    /// unique across sessions; `present`: the broker still had the
    /// session): messages it held back from earlier connections will be
    /// redelivered, so their held copies are dropped, unless the broker lost
    /// the session (then nothing is redelivered).
    Epoch {
        session: usize,
        epoch: u64,
        present: bool,
    },
    /// The broker processed every ack of a commit up to `gen` sent on
    /// connection `epoch`: ingest sent a request after them and got its
    /// answer. From then on a DUP message under one of those packet ids is
    /// a new message, even when byte-identical.
    AcksConfirmed {
        epoch: u64,
        gen: u64,
    },
    /// The downlink's state (see [`db::Db::desired_received`] and the
    /// methods beside it).
    Downlink(DownlinkCommand),
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Requests of the downlink.
pub enum DownlinkCommand {
    /// Where reading `topic` resumes.
    Start {
        topic: String,
        reply: Reply<DownlinkStart>,
    },
    /// Desired-state messages read up to `position`.
    Received {
        topic: String,
        updates: Vec<DesiredUpdate>,
        position: Vec<u8>,
        caught_up: bool,
        reply: Reply<DesiredOutcome>,
    },
    /// Desired states to publish, at most `limit`, by device after `after`
    /// (from the first with `None`).
    Pending {
        after: Option<String>,
        limit: usize,
        reply: Reply<Vec<Desired>>,
    },
    /// The local broker acknowledged these, each with the acknowledgement
    /// record to store if its version is newly applied; returns how many
    /// were.
    Applied {
        applied: Vec<(Desired, Inbound)>,
        reply: Reply<u64>,
    },
    /// The local broker lost its state: publish everything again.
    Forgotten { reply: Reply<u64> },
}

/// What a cluster's broker says it holds of a producer, in words.
fn held_text(broker_last: i64) -> String {
    if broker_last < 0 {
        "none".to_string()
    } else {
        format!("only those up to {broker_last}")
    }
}

/// What [`Command::Resume`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeOutcome {
    /// Stored records the broker already held, dropped without sending.
    pub skipped: u64,
    /// The broker held numbers this store never handed out (the store was
    /// lost or replaced); pending records were renumbered above them by this
    /// much.
    pub renumbered_by: u64,
    /// The broker knows no record of the producer although it confirmed
    /// records through it to this store before (see [`Forgotten`]).
    pub forgotten: Option<Forgotten>,
}

/// The broker answered a producer with `last_sequence_id = -1` although it
/// had confirmed records of that producer to this store: deduplication is
/// off on the topic's namespace, the topic was deleted, or the broker
/// forgot the producer after it was idle longer than
/// `brokerDeduplicationProducerInactivityTimeoutMinutes` (6 h by default).
/// Exactly once into Pulsar needs the first of these to be on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forgotten {
    /// The highest record number the broker had confirmed.
    pub confirmed: u64,
    /// How long ago (store clock) it confirmed one.
    pub idle_ms: u64,
}

/// What the store tells one MQTT session of ingest: `pauses` counts the times it asked ingest
/// to disconnect (a pause and the resume after it may come faster than
/// ingest looks; the count still tells it to reconnect); `open` whether
/// ingest may be connected now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intake {
    pub open: bool,
    pub pauses: u64,
}

/// Cheap handle for talking to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
}

impl StoreHandle {
    pub fn insert(&self, msg: Inbound) -> Result<(), StoreError> {
        self.send(Command::Insert(msg))
    }

    pub async fn fetch(
        &self,
        dest: DestIx,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch {
            dest,
            after,
            limit,
            max_bytes,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn delivered(&self, dest: DestIx, up_to: u64, resent: u64) -> Result<(), StoreError> {
        self.send(Command::Delivered {
            dest,
            up_to,
            resent,
        })
    }

    pub async fn resume(
        &self,
        dest: DestIx,
        last_sequence_id: i64,
    ) -> Result<ResumeOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Resume {
            dest,
            last_sequence_id,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn new_epoch(&self, session: usize, epoch: u64, present: bool) -> Result<(), StoreError> {
        self.send(Command::Epoch {
            session,
            epoch,
            present,
        })
    }

    pub fn acks_confirmed(&self, epoch: u64, gen: u64) -> Result<(), StoreError> {
        self.send(Command::AcksConfirmed { epoch, gen })
    }

    pub fn set_limits(&self, cfg: StoreConfig, layout: Layout) -> Result<(), StoreError> {
        self.send(Command::SetLimits(cfg, layout))
    }

    /// Sends a downlink request made by `make` and waits for its answer.
    pub async fn downlink<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> DownlinkCommand,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Downlink(make(reply)))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn send(&self, cmd: Command) -> Result<(), StoreError> {
        self.tx.send(cmd).map_err(|_| StoreError::Closed)
    }
}

/// The running store thread.
pub struct Store {
    pub handle: StoreHandle,
    /// The highest committed record number per destination; the uplink
    /// sessions watch it.
    pub committed: watch::Receiver<Vec<u64>>,
    /// Set when the store was found damaged at start and moved aside.
    pub damaged: Option<db::Damaged>,
    /// Per MQTT session of ingest: whether it may be connected to the
    /// broker (see [`Intake`]).
    pub accepting: Vec<watch::Receiver<Intake>>,
    thread: thread::JoinHandle<Result<(), StoreError>>,
}

impl Store {
    /// Opens (or creates) the store and starts its thread. `sessions`: the
    /// client ids of ingest's MQTT sessions, in order. Acks of committed
    /// messages are sent to `acks`, one batch per commit.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        cfg: &StoreConfig,
        layout: Layout,
        sessions: &[String],
        acks: tokio::sync::mpsc::UnboundedSender<Vec<AckToken>>,
        beat: crate::notify::Beat,
        live: crate::status::Live,
        metrics: crate::metrics::Metrics,
    ) -> Result<Store, StoreError> {
        let reserve = Reserve::new(&cfg.path);
        let (db, damaged) = match Db::open(&cfg.path, layout.clone(), cfg.durability) {
            // Opening may need to write (the WAL index, a migration): give
            // back the reserve and try once more.
            Err(StoreError::DiskFull) => {
                reserve.release();
                tracing::error!(store = %cfg.path.display(), "DISK FULL at start: reserve given back");
                Db::open(&cfg.path, layout, cfg.durability)?
            }
            r => r?,
        };
        let mut db = db;
        db.register_sessions(sessions)?;
        if damaged.is_some() {
            metrics.store_damaged.inc();
        }
        reserve.fill();
        let (tx, rx) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(db.last_seqs());
        let (accepting_tx, accepting): (Vec<_>, Vec<_>) = sessions
            .iter()
            .map(|_| {
                watch::channel(Intake {
                    open: true,
                    pauses: 0,
                })
            })
            .unzip();
        let worker = Worker::new(
            db,
            rx,
            acks,
            committed_tx,
            accepting_tx,
            cfg.clone(),
            Space::new(reserve),
            beat,
            live,
            metrics,
        );
        let thread = thread::Builder::new()
            .name("ferry-store".into())
            .spawn(move || worker.run())
            .expect("spawn store thread");
        Ok(Store {
            handle: StoreHandle { tx },
            committed,
            damaged,
            accepting,
            thread,
        })
    }

    /// Waits for the thread to commit what it holds and stop. It stops when
    /// every [`StoreHandle`] is dropped.
    pub fn join(self) -> Result<(), StoreError> {
        drop(self.handle);
        self.thread.join().unwrap_or(Err(StoreError::Closed))
    }
}

#[cfg(test)]
mod tests;
