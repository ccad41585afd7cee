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
//! - `mqtt_seen(pkid, digest, conn, gen)`: the last stored message per MQTT
//!   packet id, with the connection and commit it came with, to recognise a
//!   broker redelivery (DUP flag) of a message that was committed but whose
//!   PUBACK never reached the broker; `ack_confirmed(conn, gen)`: the acks
//!   the broker is known to have processed.
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
//!    inserts for up to `commit_max_wait` (group commit), gives each a record
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
pub mod report;

pub use db::schema;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::config::{Durability, Overflow, StoreConfig};
use crate::layout::{DestIx, DropReason, Layout};
use db::{Db, Delivery, Shed};

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
    /// Ingest connected to the MQTT broker again (connection `epoch`; was the
    /// session still there): messages held back from earlier connections
    /// will be redelivered, so their held copies are dropped, unless the
    /// broker lost the session (then nothing is redelivered).
    Epoch(u64, bool),
    /// The broker processed every ack of a commit up to `gen` sent on
    /// connection `epoch`: ingest sent a request after them and got its
    /// answer. From then on a DUP message under one of those packet ids is
    /// a new message, even when byte-identical.
    AcksConfirmed {
        epoch: u64,
        gen: u64,
    },
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
}

/// What the store tells ingest: `pauses` counts the times it asked ingest
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

    pub fn new_epoch(&self, epoch: u64, session_present: bool) -> Result<(), StoreError> {
        self.send(Command::Epoch(epoch, session_present))
    }

    pub fn acks_confirmed(&self, epoch: u64, gen: u64) -> Result<(), StoreError> {
        self.send(Command::AcksConfirmed { epoch, gen })
    }

    pub fn set_limits(&self, cfg: StoreConfig, layout: Layout) -> Result<(), StoreError> {
        self.send(Command::SetLimits(cfg, layout))
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
    /// Whether ingest may be connected to the MQTT broker (see [`Intake`]).
    pub accepting: watch::Receiver<Intake>,
    thread: thread::JoinHandle<Result<(), StoreError>>,
}

impl Store {
    /// Opens (or creates) the store and starts its thread. Acks of committed
    /// messages are sent to `acks`.
    pub fn open(
        cfg: &StoreConfig,
        layout: Layout,
        acks: tokio::sync::mpsc::UnboundedSender<AckToken>,
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
        if damaged.is_some() {
            metrics.store_damaged.inc();
        }
        reserve.fill();
        let (tx, rx) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(db.last_seqs());
        let (accepting_tx, accepting) = watch::channel(Intake {
            open: true,
            pauses: 0,
        });
        let streams = db.layout().streams.len();
        let worker = Worker {
            db,
            rx,
            acks,
            committed: committed_tx,
            cfg: cfg.clone(),
            beat,
            live,
            metrics,
            last_gauges: None,
            last_snapshot: None,
            last_sync: Instant::now(),
            last_age_check: None,
            deliveries: VecDeque::new(),
            parked: VecDeque::new(),
            rejecting: vec![false; streams],
            accepting: accepting_tx,
            epoch: 0,
            closing_epoch: None,
            last_full_failure: None,
            disk_full: false,
            reserve,
            last_space_check: None,
            undelivered: Vec::new(),
            forget: Vec::new(),
            budget_rearm: None,
        };
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

/// A file of a few MiB beside the store, given back to the file system when
/// the disk fills so that shedding (which writes to the WAL) can proceed.
struct Reserve {
    path: PathBuf,
}

/// Larger than what the WAL holds between checkpoints (1,000 pages) plus one
/// shedding transaction, so that both fit once it is given back.
const RESERVE_BYTES: usize = 8 * 1024 * 1024;

impl Reserve {
    fn new(store: &Path) -> Reserve {
        Reserve {
            path: PathBuf::from(format!("{}.reserve", store.display())),
        }
    }

    fn present(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.len() == RESERVE_BYTES as u64)
    }

    /// Writes the reserve file if it is missing and the file system has
    /// room to spare; true if it is in place.
    fn fill(&self) -> bool {
        if self.present() {
            return true;
        }
        if self
            .free_bytes()
            .map_or(true, |f| f < RESERVE_BYTES as u64 + SPACE_TO_RECOVER)
        {
            return false;
        }
        let ok = std::fs::write(&self.path, vec![0u8; RESERVE_BYTES]).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&self.path);
        }
        ok
    }

    fn release(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Free bytes on the file system of the store.
    fn free_bytes(&self) -> Option<u64> {
        let dir = self.path.parent()?;
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let st = rustix::fs::statvfs(dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

struct Worker {
    db: Db,
    rx: mpsc::Receiver<Command>,
    acks: tokio::sync::mpsc::UnboundedSender<AckToken>,
    committed: watch::Sender<Vec<u64>>,
    cfg: StoreConfig,
    beat: crate::notify::Beat,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    last_gauges: Option<Instant>,
    last_snapshot: Option<Instant>,
    last_sync: Instant,
    last_age_check: Option<Instant>,
    /// Recent deliveries (when, how many) for the drain rate.
    deliveries: VecDeque<(Instant, u64)>,
    /// Messages held back, in arrival order: neither stored nor acked.
    parked: VecDeque<Inbound>,
    /// Per stream: a `reject` stream is holding messages back.
    rejecting: Vec<bool>,
    /// Tells ingest to disconnect when too much is held back, and to come
    /// back once there is room.
    accepting: watch::Sender<Intake>,
    /// The current MQTT connection (see [`Command::Epoch`]).
    epoch: u64,
    /// Messages of this connection and earlier ones are refused (the
    /// connection is being closed for back-pressure).
    closing_epoch: Option<u64>,
    /// While the disk is full and nothing fits, new messages are tried at
    /// most once a second.
    last_full_failure: Option<Instant>,
    disk_full: bool,
    reserve: Reserve,
    last_space_check: Option<Instant>,
    /// Deliveries whose deletion failed on a full disk, retried later.
    undelivered: Vec<Delivery>,
    /// Packet ids of messages received but not stored (see
    /// [`Db::commit_batch`]), cleared by the next commit.
    forget: Vec<u16>,
    /// After shedding for `store.max_bytes` could not get under it, not
    /// again before the file uses this much.
    budget_rearm: Option<u64>,
}

/// The window the drain rate is averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(30);
/// Room the file system must have beyond the reserve before the disk counts
/// as not full again.
const SPACE_TO_RECOVER: u64 = 4 * 1024 * 1024;
/// Held-back messages kept in memory at most; past either bound ingest
/// disconnects and the MQTT broker keeps the backlog.
const MAX_PARKED: usize = 1_000;
const MAX_PARKED_BYTES: usize = 8 * 1024 * 1024;

impl Worker {
    fn run(mut self) -> Result<(), StoreError> {
        let result = self.main_loop();
        match &result {
            Ok(()) => {
                let _ = self.db.save_state_now();
            }
            Err(StoreError::Damaged(reason)) => {
                schema::mark_damaged(&self.cfg.path, reason);
                tracing::error!(store = %self.cfg.path.display(), %reason,
                    "STORE DAMAGED while running: ferry stops; the next start moves the store aside (not deleted) and starts a fresh one");
            }
            Err(e) => tracing::error!(error = %e, "store thread failed"),
        }
        result
    }

    fn main_loop(&mut self) -> Result<(), StoreError> {
        let mut inserts = Vec::new();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut others = Vec::new();
        let hang_at =
            crate::notify::hang_requested("store").then(|| Instant::now() + Duration::from_secs(2));
        loop {
            self.beat.tick();
            self.periodic()?;
            if hang_at.is_some_and(|t| Instant::now() >= t) {
                crate::notify::hang_forever("store");
            }
            // Wait for the first command (waking to tick the beat), then
            // gather more (group commit).
            let first = match self.rx.recv_timeout(crate::notify::BEAT_EVERY) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !self.parked.is_empty() {
                        self.commit(Vec::new(), Vec::new())?;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let deadline = Instant::now() + self.cfg.commit_max_wait;
            let mut closed = false;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Insert(m) => inserts.push(m),
                    // Deliveries are cumulative: the highest per destination
                    // is all that counts.
                    Command::Delivered {
                        dest,
                        up_to,
                        resent,
                    } => match deliveries.iter_mut().find(|d| d.dest == dest) {
                        Some(d) => {
                            d.up_to = d.up_to.max(up_to);
                            d.resent += resent;
                        }
                        None => deliveries.push(Delivery {
                            dest,
                            up_to,
                            resent,
                        }),
                    },
                    // What came before a new connection is stored first.
                    Command::Epoch(e, present) => {
                        others.push(Command::Epoch(e, present));
                        break;
                    }
                    other => others.push(other),
                }
                if inserts.len() >= self.cfg.commit_max_batch {
                    break;
                }
                // Only inserts are worth waiting for; anything else is served
                // once the queue is empty.
                let wait = if inserts.is_empty() {
                    Duration::ZERO
                } else {
                    deadline.saturating_duration_since(Instant::now())
                };
                next = match self.rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        closed = true;
                        None
                    }
                };
            }
            // Deletions ride along with the inserts: one transaction, one
            // fsync for both.
            let deliveries = std::mem::take(&mut deliveries);
            if !inserts.is_empty() || (!deliveries.is_empty() && !self.parked.is_empty()) {
                self.commit(std::mem::take(&mut inserts), deliveries)?;
            } else {
                self.deliver_all(deliveries)?;
            }
            if self.serve(&mut others)? && !self.parked.is_empty() {
                self.commit(Vec::new(), Vec::new())?;
            }
            if closed {
                return Ok(());
            }
        }
    }

    /// Deletes what the broker confirmed, then stores what was parked and
    /// `new` in arrival order, in one transaction; releases the acks of what
    /// was committed.
    fn commit(&mut self, new: Vec<Inbound>, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        if self.disk_full
            && self
                .last_full_failure
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            // Nothing new fits now; try again on the next tick.
            for m in new {
                self.hold(m);
            }
            self.backpressure();
            return self.deliver_all(deliveries);
        }
        let mut batch: Vec<Inbound> = self.parked.drain(..).collect();
        for m in new {
            if self.refused(&m) {
                self.forget.push(m.pkid);
                continue;
            }
            batch.push(m);
        }
        if batch.is_empty() {
            return self.deliver_all(deliveries);
        }
        let began = Instant::now();
        let out = match self.try_insert(&batch, &deliveries)? {
            Some(out) => out,
            None => {
                // Nothing fits: everything waits, unacknowledged.
                self.last_full_failure = Some(Instant::now());
                for m in batch {
                    self.hold(m);
                }
                self.backpressure();
                return self.deliver_all(deliveries);
            }
        };
        if !deliveries.is_empty() {
            self.deliveries.push_back((Instant::now(), out.delivered));
        }
        let m = &self.metrics;
        m.store_commit_seconds
            .observe(began.elapsed().as_secs_f64());
        m.store_stored.inc_by(out.stored);
        m.store_dead_lettered.inc_by(out.dead_lettered);
        m.store_redeliveries_dropped.inc_by(out.redelivered);
        m.store_retained_unchanged.inc_by(out.retained_unchanged);
        self.count_shed(&out.shed);
        let mut rejecting = vec![false; self.rejecting.len()];
        let mut parked_idx = out.parked.iter().peekable();
        for (i, mut msg) in batch.into_iter().enumerate() {
            if parked_idx.peek() == Some(&&i) {
                parked_idx.next();
                if let Some(s) = msg.stream {
                    rejecting[s] = true;
                }
                msg.counted = true;
                self.hold(msg);
            }
        }
        self.set_rejecting(rejecting);
        self.backpressure();
        self.committed.send_replace(self.db.last_seqs());
        for a in out.acks {
            let _ = self.acks.send(a);
        }
        if let Some(budget) = self.cfg.max_bytes {
            let used = self.db.used_bytes()?;
            let due = used > budget && self.budget_rearm.map_or(true, |r| used >= r);
            if due {
                self.shed_under_pressure(DropReason::StoreFull, |db| {
                    Ok(db.used_bytes()? <= budget - budget / 10)
                })?;
                // What is left cannot be shed (newest states, dead letters,
                // reject backlogs): not again before it grew by a tenth.
                let after = self.db.used_bytes()?;
                self.budget_rearm = (after > budget).then(|| after + budget / 10);
            } else if used <= budget {
                self.budget_rearm = None;
            }
        }
        Ok(())
    }

    /// Inserts a batch. On a full disk the store works inside the space its
    /// files already have: it sheds (superseded states first, then the
    /// oldest history and events) until its free pages can take the batch,
    /// and restarts the WAL after each commit so that it does not grow.
    /// `None`: nothing fits even then.
    fn try_insert(
        &mut self,
        batch: &[Inbound],
        deliveries: &[Delivery],
    ) -> Result<Option<db::BatchOutcome>, StoreError> {
        if self.disk_full && !self.make_room(batch)? {
            return Ok(None);
        }
        let max_payload = self.cfg.max_payload_bytes;
        let forget = std::mem::take(&mut self.forget);
        let out = match self
            .db
            .commit_batch(deliveries, &forget, batch, max_payload)
        {
            Ok(out) => out,
            Err(StoreError::DiskFull) => {
                self.enter_disk_full();
                if !self.make_room(batch)? {
                    self.forget = forget;
                    return Ok(None);
                }
                match self
                    .db
                    .commit_batch(deliveries, &forget, batch, max_payload)
                {
                    Ok(out) => out,
                    Err(StoreError::DiskFull) => {
                        self.forget = forget;
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if self.disk_full {
            self.db.checkpoint(true);
        }
        Ok(Some(out))
    }

    fn enter_disk_full(&mut self) {
        if self.disk_full {
            return;
        }
        self.disk_full = true;
        self.metrics.store_disk_full.set(1);
        self.reserve.release();
        // Move the WAL into the store file while the reserve's room is there.
        self.db.checkpoint(true);
        tracing::error!(store = %self.cfg.path.display(),
            "DISK FULL: shedding superseded states and the oldest history/events to keep every device's newest state; what does not fit stays with the MQTT broker, unacknowledged");
        let _ = self.db.incident(
            "disk-full",
            "the disk filled; ferry shed the cheapest records and kept every device's newest state",
        );
    }

    /// Sheds round by round until the store's free pages can take `batch`
    /// (with room to spare); false if nothing is left to shed.
    fn make_room(&mut self, batch: &[Inbound]) -> Result<bool, StoreError> {
        let need = self.room_for(batch);
        self.make_room_bytes(need)
    }

    fn room_for(&self, batch: &[Inbound]) -> u64 {
        let layout = self.db.layout();
        // What each message will take: a dead letter only the part of its
        // payload that is kept.
        batch
            .iter()
            .map(|m| db::stored_size(layout, m, self.cfg.max_payload_bytes))
            .sum::<u64>()
            + 64 * 1024
    }

    fn make_room_bytes(&mut self, need: u64) -> Result<bool, StoreError> {
        let mut round = 0;
        while self.db.free_page_bytes()? < need {
            let shed = match self.db.shed_emergency(round, DropReason::DiskFull) {
                Ok(s) => s,
                Err(StoreError::DiskFull) => Shed::default(),
                Err(e) => return Err(e),
            };
            self.count_shed(&shed);
            if shed.is_empty() && round > 0 {
                return Ok(false);
            }
            round += 1;
        }
        Ok(true)
    }

    /// Sheds round by round until `enough` says so or nothing is left to
    /// shed.
    fn shed_under_pressure(
        &mut self,
        reason: DropReason,
        enough: impl Fn(&Db) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut round = 0;
        let mut total = 0;
        while !enough(&self.db)? {
            let shed = match self.db.shed_emergency(round, reason) {
                Ok(s) => s,
                Err(StoreError::DiskFull) => break,
                Err(e) => return Err(e),
            };
            total += shed.total();
            self.count_shed(&shed);
            if shed.is_empty() && round > 0 {
                break;
            }
            round += 1;
        }
        if total > 0 {
            tracing::warn!(
                reason = reason.as_str(),
                shed = total,
                "store over its budget: superseded states and the oldest history/events were shed"
            );
        }
        Ok(())
    }

    /// Holds a message back (unless the broker will redeliver it anyway).
    fn hold(&mut self, m: Inbound) {
        if self.refused(&m) {
            self.forget.push(m.pkid);
        } else {
            self.parked.push_back(m);
        }
    }

    /// Drops held messages the broker will redeliver (`keep` says which
    /// stay); their packet ids are forgotten.
    fn drop_held(&mut self, keep: impl Fn(&Inbound) -> bool) -> usize {
        let before = self.parked.len();
        let mut kept = VecDeque::with_capacity(before);
        for m in self.parked.drain(..) {
            if keep(&m) {
                kept.push_back(m);
            } else {
                self.forget.push(m.pkid);
            }
        }
        self.parked = kept;
        before - self.parked.len()
    }

    /// A message of an MQTT connection that back-pressure is closing: it is
    /// neither stored nor acknowledged, so the broker redelivers it on the
    /// next connection, after whatever of its stream was held back.
    fn refused(&self, m: &Inbound) -> bool {
        m.ack
            .is_some_and(|a| self.closing_epoch.is_some_and(|c| a.epoch <= c))
    }

    /// Asks ingest to disconnect when too much is held back in memory, and
    /// to come back once the streams that held back have room (below 90%
    /// of their limits) and the disk is not full.
    fn backpressure(&mut self) {
        let paused = !self.accepting.borrow().open;
        let bytes: usize = self.parked.iter().map(|m| m.payload.len()).sum();
        if !paused && (self.parked.len() >= MAX_PARKED || bytes >= MAX_PARKED_BYTES) {
            // The broker redelivers what was never acked; keep only what it
            // cannot redeliver (QoS 0).
            let held = self.parked.len();
            self.drop_held(|m| m.ack.is_none());
            // Everything else of this connection goes back to the broker
            // too, so that nothing overtakes what was held back.
            self.closing_epoch = Some(self.epoch);
            self.accepting.send_modify(|i| {
                i.open = false;
                i.pauses += 1;
            });
            tracing::warn!(held, "too many messages held back: disconnecting from the mqtt broker until the store has room");
            return;
        }
        if !paused {
            return;
        }
        // On a full disk, room is what shedding can free inside the store.
        let disk_room = !self.disk_full
            || match self.make_room_bytes(MAX_PARKED_BYTES as u64) {
                Ok(room) => room,
                Err(e) => {
                    tracing::warn!(error = %e, "shedding on a full disk failed");
                    false
                }
            };
        if disk_room {
            let layout = self.db.layout();
            let room = (0..layout.streams.len()).all(|s| {
                let spec = &layout.streams[s];
                spec.overflow != Overflow::Reject || !spec.limits.low_water().over(self.db.usage(s))
            });
            if room {
                self.accepting.send_modify(|i| i.open = true);
            }
        }
    }

    fn count_shed(&self, shed: &Shed) {
        let layout = self.db.layout();
        for (s, n) in &shed.superseded {
            self.metrics.superseded(&layout.streams[*s].name).inc_by(*n);
        }
        for ((s, reason), n) in &shed.dropped {
            self.metrics
                .dropped(&layout.streams[*s].name, reason.as_str())
                .inc_by(*n);
        }
    }

    fn set_rejecting(&mut self, now: Vec<bool>) {
        for (s, (was, is)) in self.rejecting.iter().zip(&now).enumerate() {
            let spec = &self.db.layout().streams[s];
            if *is && !was {
                let u = self.db.usage(s);
                tracing::warn!(stream = %spec.name, records = u.records, bytes = u.bytes,
                    "stream is at its limit and its overflow policy is reject: no longer acknowledging its MQTT messages; the local broker holds the backlog");
            } else if *was && !is {
                tracing::info!(stream = %spec.name, "stream is under its limit again: accepting and acknowledging MQTT messages");
            }
            self.metrics.store_rejecting(&spec.name).set(i64::from(*is));
        }
        self.rejecting = now;
    }

    /// Work done about once a second: gauges, the status snapshot, age
    /// limits, the interval sync, and recovery from a full disk.
    fn periodic(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        let every = |last: &mut Option<Instant>, period: Duration| {
            if last.is_some_and(|t| now.duration_since(t) < period) {
                false
            } else {
                *last = Some(now);
                true
            }
        };
        if every(&mut self.last_age_check, Duration::from_secs(1)) {
            match self.db.shed_aged() {
                Ok(shed) => self.count_shed(&shed),
                Err(StoreError::DiskFull) => {}
                Err(e) => return Err(e),
            }
            if !self.undelivered.is_empty() {
                let pending = std::mem::take(&mut self.undelivered);
                self.deliver_all(pending)?;
            }
            if self.db.state_unsaved() {
                match self.db.save_state_now() {
                    Ok(()) | Err(StoreError::DiskFull) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if let Durability::Interval(period) = self.cfg.durability {
            if now.duration_since(self.last_sync) >= period {
                self.last_sync = now;
                // With synchronous=NORMAL a checkpoint is what syncs the WAL.
                self.db.checkpoint(false);
            }
        }
        let space_check = every(&mut self.last_space_check, Duration::from_secs(2));
        if !self.disk_full && space_check && !self.reserve.present() {
            self.reserve.fill();
        }
        if self.disk_full && space_check {
            // Back to normal once the file system has room for the reserve
            // again (and some to spare).
            if self.reserve.fill() {
                let free = self.reserve.free_bytes().unwrap_or(0);
                self.disk_full = false;
                self.metrics.store_disk_full.set(0);
                tracing::warn!(
                    free_bytes = free,
                    "disk space is back: the configured overflow policies apply again"
                );
                let _ = self
                    .db
                    .incident("disk-space-back", "the disk has room again");
                self.backpressure();
            }
        }
        if every(&mut self.last_gauges, crate::notify::BEAT_EVERY) {
            self.backpressure();
            self.gauges()?;
        }
        if every(&mut self.last_snapshot, crate::status::SNAPSHOT_EVERY) {
            self.snapshot()?;
        }
        Ok(())
    }

    /// Updates the store gauges.
    fn gauges(&mut self) -> Result<(), StoreError> {
        let now = self.db.clock().now_ms();
        for s in 0..self.db.layout().streams.len() {
            let spec = &self.db.layout().streams[s];
            let u = self.db.usage(s);
            let mut oldest: Option<u64> = None;
            for d in &spec.dests {
                if let Some(t) = self.db.oldest_stored_at(*d)? {
                    oldest = Some(oldest.map_or(t, |o: u64| o.min(t)));
                }
            }
            let age = oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            let m = &self.metrics;
            m.store_records(&spec.name).set(u.records as i64);
            m.store_bytes(&spec.name).set(u.bytes as i64);
            m.store_oldest_age(&spec.name).set(age);
        }
        Ok(())
    }

    /// Writes the agent snapshot for `ferry status`.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        while self
            .deliveries
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.deliveries.pop_front();
        }
        let delivered: u64 = self.deliveries.iter().map(|(_, n)| n).sum();
        self.live
            .set_drain_rate(delivered as f64 / RATE_WINDOW.as_secs_f64());
        let parked = self.parked.len() as u64;
        self.live.set_store(self.disk_full, parked);
        let json = serde_json::to_string(&self.live.snapshot()).expect("plain struct");
        match self.db.write_snapshot(&json) {
            Ok(()) | Err(StoreError::DiskFull) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes what the broker confirmed, each in its own transaction (when
    /// there is no batch to go with it).
    fn deliver_all(&mut self, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        for d in deliveries {
            match self.db.delivered(d.dest, d.up_to, d.resent) {
                Ok(n) => self.deliveries.push_back((Instant::now(), n)),
                Err(StoreError::DiskFull) => self.undelivered.push(d),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Serves everything but inserts and deliveries; true if records left
    /// the store or limits changed.
    fn serve(&mut self, cmds: &mut Vec<Command>) -> Result<bool, StoreError> {
        let mut freed = false;
        for cmd in cmds.drain(..) {
            match cmd {
                Command::Insert(_) | Command::Delivered { .. } => {
                    unreachable!("inserts and deliveries are batched apart")
                }
                Command::Fetch {
                    dest,
                    after,
                    limit,
                    max_bytes,
                    reply,
                } => {
                    let r = self.db.fetch(dest, after, limit, max_bytes);
                    if let Err(StoreError::Damaged(reason)) = &r {
                        let e = StoreError::Damaged(reason.clone());
                        let _ = reply.send(r);
                        return Err(e);
                    }
                    let _ = reply.send(r);
                }
                Command::Resume {
                    dest,
                    last_sequence_id,
                    reply,
                } => {
                    let r = self.db.resume(dest, last_sequence_id);
                    if r.is_ok() {
                        self.committed.send_replace(self.db.last_seqs());
                        freed = true;
                    }
                    if let Err(StoreError::Damaged(reason)) = &r {
                        let e = StoreError::Damaged(reason.clone());
                        let _ = reply.send(r);
                        return Err(e);
                    }
                    let _ = reply.send(r);
                }
                Command::AcksConfirmed { epoch, gen } => self.db.acks_confirmed(epoch, gen),
                Command::Epoch(epoch, session_present) => {
                    self.db.new_connection(epoch, session_present);
                    self.epoch = epoch;
                    if session_present {
                        let dropped = self.drop_held(|p| p.ack.map_or(true, |a| a.epoch >= epoch));
                        if dropped > 0 {
                            tracing::debug!(
                                dropped,
                                "held-back messages of an earlier mqtt connection dropped; the broker redelivers them"
                            );
                        }
                    }
                }
                Command::SetLimits(cfg, layout) => {
                    self.cfg.commit_max_wait = cfg.commit_max_wait;
                    self.cfg.commit_max_batch = cfg.commit_max_batch;
                    self.cfg.max_payload_bytes = cfg.max_payload_bytes;
                    self.cfg.max_bytes = cfg.max_bytes;
                    self.db.set_layout(layout);
                    freed = true;
                    tracing::info!(
                        max_payload_bytes = self.cfg.max_payload_bytes,
                        commit_max_batch = self.cfg.commit_max_batch,
                        commit_max_wait_ms = self.cfg.commit_max_wait.as_millis() as u64,
                        "store limits reloaded"
                    );
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests;
