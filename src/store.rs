//! The durable store: SQLite in WAL mode, owned by one dedicated thread.
//!
//! # Schema
//!
//! - `journal(seq, device, received_ms, payload, props)`: every accepted
//!   message not yet confirmed by Pulsar, keyed by its record number `seq`.
//!   `props` holds the structured fields (MQTT topic, retain flag) encoded
//!   with postcard.
//! - `meta(key, value)`: `next_seq`, the next record number to hand out. It
//!   only ever grows, so a number is never reused, even after the journal is
//!   emptied (SQLite's own rowid would reuse the largest number once deleted).
//! - `mqtt_seen(pkid, topic, digest)`: the last stored message per MQTT
//!   packet id, used to recognise a broker redelivery (DUP flag) of a message
//!   that was committed but whose PUBACK never reached the broker.
//! - `dead_letters(...)`: messages that can never be forwarded (too large, no
//!   device id), kept for inspection.
//! - `counters(name, value)`: lifetime counts (received, stored, delivered,
//!   dead-lettered, redeliveries dropped, skipped on resume, resent).
//! - `agent(snapshot)`: the running agent's view of its links and drain
//!   rate, rewritten every few seconds for `ferry status`.
//!
//! # Lifecycle of a record
//!
//! 1. [`Command::Insert`] arrives from ingest. The store thread gathers
//!    inserts for up to `commit_max_wait` (group commit), gives each a record
//!    number and commits them in one transaction.
//! 2. Only after that commit are the MQTT ack tokens released to ingest, which
//!    sends the PUBACKs. A crash before then makes the broker redeliver.
//! 3. The uplink reads records in `seq` order ([`Command::Fetch`]) and sends
//!    them; after the broker's receipt it asks for their deletion
//!    ([`Command::Delivered`]).
//! 4. On every producer (re)connect the broker names the last record it holds
//!    and [`Command::Resume`] drops everything up to it.
//!
//! # Crash recovery
//!
//! Nothing to do: SQLite's WAL makes each transaction atomic and durable
//! (`synchronous=FULL`), records are only removed after Pulsar confirmed
//! them, and the numbering lives in the same transactions as the records.
//!
//! The store never touches the network.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::config::StoreConfig;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal (
    seq         INTEGER PRIMARY KEY,
    device      TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    props       BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mqtt_seen (
    pkid   INTEGER PRIMARY KEY,
    topic  TEXT    NOT NULL,
    digest INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    mqtt_topic  TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    snapshot TEXT    NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 1);
";

const SQL_NEXT_SEQ: &str = "SELECT value FROM meta WHERE key = 'next_seq'";
const SQL_SET_NEXT_SEQ: &str = "UPDATE meta SET value = ?1 WHERE key = 'next_seq'";
const SQL_INSERT: &str =
    "INSERT INTO journal (seq, device, received_ms, payload, props) VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_SEEN_GET: &str = "SELECT topic, digest FROM mqtt_seen WHERE pkid = ?1";
const SQL_SEEN_PUT: &str =
    "INSERT OR REPLACE INTO mqtt_seen (pkid, topic, digest) VALUES (?1, ?2, ?3)";
const SQL_DEAD_LETTER: &str =
    "INSERT INTO dead_letters (received_ms, mqtt_topic, reason, size, payload)
     VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_FETCH: &str = "SELECT seq, device, received_ms, payload, props FROM journal
     WHERE seq > ?1 ORDER BY seq LIMIT ?2";
const SQL_DELETE_UPTO: &str = "DELETE FROM journal WHERE seq <= ?1";
const SQL_COUNT_UPTO: &str =
    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM journal WHERE seq <= ?1";
const SQL_COUNT_ALL: &str = "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM journal";
const SQL_OLDEST: &str = "SELECT received_ms FROM journal ORDER BY seq LIMIT 1";
const SQL_MAX_SEQ: &str = "SELECT MAX(seq) FROM journal";
const SQL_COUNTER_ADD: &str = "INSERT INTO counters (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value";
const SQL_COUNTERS: &str = "SELECT name, value FROM counters";
const SQL_PENDING: &str =
    "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM journal";
const SQL_AGENT_PUT: &str = "INSERT OR REPLACE INTO agent (id, snapshot) VALUES (1, ?1)";
const SQL_RENUMBER_NEG: &str = "UPDATE journal SET seq = -(seq + ?1)";
const SQL_RENUMBER_POS: &str = "UPDATE journal SET seq = -seq";

/// How much of a dead letter's payload is kept.
const DEAD_LETTER_KEEP_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store failure: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store thread has stopped")]
    Closed,
}

/// Structured fields of a record, stored with postcard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordProps {
    pub mqtt_topic: String,
    pub retain: bool,
}

/// One stored device update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Record number; also the Pulsar `sequence_id`.
    pub seq: u64,
    pub device: String,
    pub received_ms: u64,
    pub payload: Vec<u8>,
    pub props: RecordProps,
}

/// A message from the MQTT broker, as ingest hands it over.
#[derive(Debug)]
pub struct Inbound {
    pub mqtt_topic: String,
    pub payload: bytes::Bytes,
    pub retain: bool,
    /// `None` when no subscription rule yields a device id.
    pub device: Option<String>,
    /// The broker marked this as a redelivery.
    pub dup: bool,
    /// MQTT packet id (0 for QoS 0).
    pub pkid: u16,
    /// Handed back after the commit; `None` when nothing is to be acked.
    pub ack: Option<AckToken>,
}

/// What ingest needs to acknowledge one message, returned after commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    pub pkid: u16,
    /// MQTT connection epoch the message arrived on.
    pub epoch: u64,
}

/// Requests to the store thread.
pub enum Command {
    Insert(Inbound),
    /// Records with `seq > after`, in order, at most `limit`.
    Fetch {
        after: u64,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Record>, StoreError>>,
    },
    /// The broker confirmed every record up to `seq`; `resent` of them had
    /// been sent more than once.
    Delivered {
        up_to: u64,
        resent: u64,
    },
    /// A producer (re)connected and the broker holds every record up to
    /// `last_sequence_id` (-1: none).
    Resume {
        last_sequence_id: i64,
        reply: oneshot::Sender<Result<ResumeOutcome, StoreError>>,
    },
    /// New batching and payload limits (configuration reload).
    SetLimits(StoreConfig),
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

/// A snapshot of the store's contents and lifetime counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub pending: u64,
    pub oldest_seq: u64,
    pub newest_seq: u64,
    pub next_seq: u64,
    pub counters: Vec<(String, i64)>,
}

impl Stats {
    pub fn counter(&self, name: &str) -> i64 {
        self.counters
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    }
}

/// Cheap handle for talking to the store thread.
#[derive(Clone)]
pub struct StoreHandle {
    tx: mpsc::Sender<Command>,
}

impl StoreHandle {
    pub fn insert(&self, msg: Inbound) -> Result<(), StoreError> {
        self.tx
            .send(Command::Insert(msg))
            .map_err(|_| StoreError::Closed)
    }

    pub async fn fetch(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Fetch {
            after,
            limit,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn delivered(&self, up_to: u64, resent: u64) -> Result<(), StoreError> {
        self.send(Command::Delivered { up_to, resent })
    }

    pub async fn resume(&self, last_sequence_id: i64) -> Result<ResumeOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Resume {
            last_sequence_id,
            reply,
        })?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    pub fn set_limits(&self, cfg: StoreConfig) -> Result<(), StoreError> {
        self.send(Command::SetLimits(cfg))
    }

    fn send(&self, cmd: Command) -> Result<(), StoreError> {
        self.tx.send(cmd).map_err(|_| StoreError::Closed)
    }
}

/// The running store thread.
pub struct Store {
    pub handle: StoreHandle,
    /// The highest committed record number; the uplink watches it.
    pub committed: watch::Receiver<u64>,
    thread: thread::JoinHandle<Result<(), StoreError>>,
}

impl Store {
    /// Opens (or creates) the store and starts its thread. Acks of committed
    /// messages are sent to `acks`.
    pub fn open(
        cfg: &StoreConfig,
        acks: tokio::sync::mpsc::UnboundedSender<AckToken>,
        beat: crate::notify::Beat,
        live: crate::status::Live,
        metrics: crate::metrics::Metrics,
    ) -> Result<Store, StoreError> {
        let db = Db::open(&cfg.path)?;
        let (tx, rx) = mpsc::channel();
        let (committed_tx, committed) = watch::channel(db.next_seq - 1);
        let worker = Worker {
            db,
            rx,
            acks,
            committed: committed_tx,
            max_wait: cfg.commit_max_wait,
            max_batch: cfg.commit_max_batch,
            max_payload: cfg.max_payload_bytes,
            beat,
            live,
            metrics,
            last_gauges: None,
            deliveries: VecDeque::new(),
            last_snapshot: None,
        };
        let thread = thread::Builder::new()
            .name("ferry-store".into())
            .spawn(move || worker.run())
            .expect("spawn store thread");
        Ok(Store {
            handle: StoreHandle { tx },
            committed,
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

/// The SQLite connection and the in-memory copy of `next_seq`.
pub struct Db {
    conn: Connection,
    next_seq: u64,
    /// Records and payload bytes in the journal, kept up to date in memory.
    pub pending_records: u64,
    pub pending_bytes: u64,
}

/// What one group commit did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Acks to release, in arrival order.
    pub acks: Vec<AckToken>,
    pub stored: u64,
    pub dead_lettered: u64,
    pub redelivered: u64,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        let next_seq: i64 = conn
            .query_row(SQL_NEXT_SEQ, [], |r| r.get(0))
            .map_err(open_err)?;
        let (records, bytes): (i64, i64) = conn
            .query_row(SQL_COUNT_ALL, [], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(open_err)?;
        Ok(Db {
            conn,
            next_seq: next_seq as u64,
            pending_records: records as u64,
            pending_bytes: bytes as u64,
        })
    }

    /// Stores a batch in one transaction.
    pub fn insert_batch(
        &mut self,
        batch: Vec<Inbound>,
        max_payload: usize,
    ) -> Result<BatchOutcome, StoreError> {
        let mut bytes = 0u64;
        let now = now_ms();
        let mut acks = Vec::with_capacity(batch.len());
        let mut next = self.next_seq;
        let mut counts = Counts::default();
        let tx = self.conn.transaction()?;
        for msg in batch {
            counts.received += 1;
            if let Some(a) = msg.ack {
                acks.push(a);
            }
            let digest = digest(&msg.payload);
            if msg.dup && msg.pkid != 0 && seen_before(&tx, &msg, digest)? {
                counts.redelivered += 1;
                continue;
            }
            if msg.pkid != 0 {
                tx.prepare_cached(SQL_SEEN_PUT)?.execute(params![
                    msg.pkid,
                    msg.mqtt_topic,
                    digest
                ])?;
            }
            let reason = match &msg.device {
                None => Some("no device id in topic".to_string()),
                Some(_) if msg.payload.len() > max_payload => Some(format!(
                    "payload of {} bytes exceeds store.max_payload_bytes ({max_payload})",
                    msg.payload.len()
                )),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                let keep = &msg.payload[..msg.payload.len().min(DEAD_LETTER_KEEP_BYTES)];
                tx.prepare_cached(SQL_DEAD_LETTER)?.execute(params![
                    now as i64,
                    msg.mqtt_topic,
                    reason,
                    msg.payload.len() as i64,
                    keep
                ])?;
                tracing::warn!(mqtt_topic = %msg.mqtt_topic, size = msg.payload.len(), %reason, "message dead-lettered");
                counts.dead_lettered += 1;
                continue;
            }
            let props = postcard::to_allocvec(&RecordProps {
                mqtt_topic: msg.mqtt_topic,
                retain: msg.retain,
            })
            .expect("postcard encodes a plain struct");
            tx.prepare_cached(SQL_INSERT)?.execute(params![
                next as i64,
                msg.device.unwrap_or_default(),
                now as i64,
                &msg.payload[..],
                props
            ])?;
            bytes += msg.payload.len() as u64;
            next += 1;
            counts.stored += 1;
        }
        if next != self.next_seq {
            tx.prepare_cached(SQL_SET_NEXT_SEQ)?
                .execute([next as i64])?;
        }
        counts.write(&tx)?;
        tx.commit()?;
        self.next_seq = next;
        self.pending_records += counts.stored as u64;
        self.pending_bytes += bytes;
        Ok(BatchOutcome {
            acks,
            stored: counts.stored as u64,
            dead_lettered: counts.dead_lettered as u64,
            redelivered: counts.redelivered as u64,
        })
    }

    /// When the oldest pending record arrived, ms since the epoch.
    pub fn oldest_received_ms(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(SQL_OLDEST)?
            .query_row([], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    pub fn fetch(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let mut stmt = self.conn.prepare_cached(SQL_FETCH)?;
        let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
            let props: Vec<u8> = r.get(4)?;
            Ok(Record {
                seq: r.get::<_, i64>(0)? as u64,
                device: r.get(1)?,
                received_ms: r.get::<_, i64>(2)? as u64,
                payload: r.get(3)?,
                props: postcard::from_bytes(&props).unwrap_or(RecordProps {
                    mqtt_topic: String::new(),
                    retain: false,
                }),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes the records up to `up_to`; returns how many there were.
    pub fn delivered(&mut self, up_to: u64, resent: u64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let (_, bytes) = count_upto(&tx, up_to)?;
        let n = tx
            .prepare_cached(SQL_DELETE_UPTO)?
            .execute([up_to as i64])?;
        Counts {
            delivered: n as i64,
            resent: resent as i64,
            ..Counts::default()
        }
        .write(&tx)?;
        tx.commit()?;
        self.pending_records = self.pending_records.saturating_sub(n as u64);
        self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
        Ok(n as u64)
    }

    pub fn resume(&mut self, last_sequence_id: i64) -> Result<ResumeOutcome, StoreError> {
        if last_sequence_id < 0 {
            return Ok(ResumeOutcome::default());
        }
        let last = last_sequence_id as u64;
        let tx = self.conn.transaction()?;
        let outcome = if last >= self.next_seq {
            // The broker holds numbers this store never gave out: the store
            // was lost or replaced. Its pending records are new to the
            // broker; number them above what it holds, or deduplication
            // would drop them.
            let lowest: Option<i64> =
                tx.query_row("SELECT MIN(seq) FROM journal", [], |r| r.get(0))?;
            let delta = match lowest {
                Some(low) => last + 1 - low as u64,
                None => 0,
            };
            if delta > 0 {
                tx.execute(SQL_RENUMBER_NEG, [delta as i64])?;
                tx.execute(SQL_RENUMBER_POS, [])?;
            }
            let max: Option<i64> = tx.query_row(SQL_MAX_SEQ, [], |r| r.get(0))?;
            let next = max.map(|m| m as u64 + 1).unwrap_or(last + 1).max(last + 1);
            tx.execute(SQL_SET_NEXT_SEQ, [next as i64])?;
            self.next_seq = next;
            ResumeOutcome {
                skipped: 0,
                renumbered_by: delta,
            }
        } else {
            let (n, bytes) = count_upto(&tx, last)?;
            tx.execute(SQL_DELETE_UPTO, [last as i64])?;
            Counts {
                skipped: n as i64,
                ..Counts::default()
            }
            .write(&tx)?;
            self.pending_records = self.pending_records.saturating_sub(n);
            self.pending_bytes = self.pending_bytes.saturating_sub(bytes);
            ResumeOutcome {
                skipped: n,
                renumbered_by: 0,
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    pub fn stats(&self) -> Result<Stats, StoreError> {
        let (pending, oldest, newest): (i64, i64, i64) =
            self.conn
                .query_row(SQL_PENDING, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let mut stmt = self.conn.prepare_cached(SQL_COUNTERS)?;
        let counters = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(Stats {
            pending: pending as u64,
            oldest_seq: oldest as u64,
            newest_seq: newest as u64,
            next_seq: self.next_seq,
            counters,
        })
    }

    /// The highest record number handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

/// Records and payload bytes up to `up_to`, counted before deleting them.
fn count_upto(tx: &Transaction<'_>, up_to: u64) -> Result<(u64, u64), StoreError> {
    let (n, bytes): (i64, i64) = tx
        .prepare_cached(SQL_COUNT_UPTO)?
        .query_row([up_to as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok((n as u64, bytes as u64))
}

fn seen_before(tx: &Transaction<'_>, msg: &Inbound, digest: i64) -> Result<bool, StoreError> {
    let seen: Option<(String, i64)> = tx
        .prepare_cached(SQL_SEEN_GET)?
        .query_row([msg.pkid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(seen.is_some_and(|(t, d)| t == msg.mqtt_topic && d == digest))
}

/// Payload fingerprint for redelivery detection: CRC32C and length.
fn digest(payload: &[u8]) -> i64 {
    ((crc32c::crc32c(payload) as i64) << 32) | (payload.len() as i64 & 0xffff_ffff)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counter increments written in the same transaction as the change they
/// count.
#[derive(Default)]
struct Counts {
    received: i64,
    stored: i64,
    dead_lettered: i64,
    redelivered: i64,
    delivered: i64,
    skipped: i64,
    resent: i64,
}

impl Counts {
    fn write(&self, tx: &Transaction<'_>) -> Result<(), StoreError> {
        let mut stmt = tx.prepare_cached(SQL_COUNTER_ADD)?;
        for (name, v) in [
            ("received", self.received),
            ("stored", self.stored),
            ("dead_lettered", self.dead_lettered),
            ("redeliveries_dropped", self.redelivered),
            ("delivered", self.delivered),
            ("skipped_on_resume", self.skipped),
            ("resent", self.resent),
        ] {
            if v != 0 {
                stmt.execute(params![name, v])?;
            }
        }
        Ok(())
    }
}

struct Worker {
    db: Db,
    rx: mpsc::Receiver<Command>,
    acks: tokio::sync::mpsc::UnboundedSender<AckToken>,
    committed: watch::Sender<u64>,
    max_wait: Duration,
    max_batch: usize,
    max_payload: usize,
    beat: crate::notify::Beat,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    last_gauges: Option<Instant>,
    /// Recent deliveries (when, how many) for the drain rate.
    deliveries: VecDeque<(Instant, u64)>,
    last_snapshot: Option<Instant>,
}

/// The window the drain rate is averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(30);

impl Worker {
    /// Updates the store gauges, at most once a second.
    fn gauges(&mut self) -> Result<(), StoreError> {
        if self
            .last_gauges
            .is_some_and(|t| t.elapsed() < crate::notify::BEAT_EVERY)
        {
            return Ok(());
        }
        self.last_gauges = Some(Instant::now());
        let m = &self.metrics;
        m.store_records.set(self.db.pending_records as i64);
        m.store_bytes.set(self.db.pending_bytes as i64);
        let age = match self.db.oldest_received_ms()? {
            Some(t) => crate::status::now_ms().saturating_sub(t) as f64 / 1000.0,
            None => 0.0,
        };
        m.store_oldest_age.set(age);
        Ok(())
    }

    /// Writes the agent snapshot for `ferry status` every few seconds.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        if self
            .last_snapshot
            .is_some_and(|t| now.duration_since(t) < crate::status::SNAPSHOT_EVERY)
        {
            return Ok(());
        }
        self.last_snapshot = Some(now);
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
        let json = serde_json::to_string(&self.live.snapshot()).expect("plain struct");
        self.db.conn.execute(SQL_AGENT_PUT, [json])?;
        Ok(())
    }

    fn run(mut self) -> Result<(), StoreError> {
        let result = self.main_loop();
        if let Err(e) = &result {
            tracing::error!(error = %e, "store thread failed");
        }
        result
    }

    fn main_loop(&mut self) -> Result<(), StoreError> {
        let mut inserts = Vec::new();
        let mut others = Vec::new();
        let hang_at =
            crate::notify::hang_requested("store").then(|| Instant::now() + Duration::from_secs(2));
        loop {
            self.beat.tick();
            self.gauges()?;
            self.snapshot()?;
            if hang_at.is_some_and(|t| Instant::now() >= t) {
                crate::notify::hang_forever("store");
            }
            // Wait for the first command (waking to tick the beat), then
            // gather more (group commit).
            let first = match self.rx.recv_timeout(crate::notify::BEAT_EVERY) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let deadline = Instant::now() + self.max_wait;
            let mut closed = false;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Insert(m) => inserts.push(m),
                    other => others.push(other),
                }
                if inserts.len() >= self.max_batch {
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
            if !inserts.is_empty() {
                let began = Instant::now();
                let out = self
                    .db
                    .insert_batch(std::mem::take(&mut inserts), self.max_payload)?;
                let m = &self.metrics;
                m.store_commit_seconds
                    .observe(began.elapsed().as_secs_f64());
                m.store_stored.inc_by(out.stored);
                m.store_dead_lettered.inc_by(out.dead_lettered);
                m.store_redeliveries_dropped.inc_by(out.redelivered);
                self.committed.send_replace(self.db.last_seq());
                for a in out.acks {
                    let _ = self.acks.send(a);
                }
            }
            self.serve(&mut others)?;
            if closed {
                return Ok(());
            }
        }
    }

    fn serve(&mut self, cmds: &mut Vec<Command>) -> Result<(), StoreError> {
        // Deliveries are cumulative: only the highest one needs a transaction.
        let mut delivered: Option<(u64, u64)> = None;
        for cmd in cmds.drain(..) {
            match cmd {
                Command::Insert(_) => unreachable!("inserts are batched apart"),
                Command::Delivered { up_to, resent } => {
                    let (u, r) = delivered.unwrap_or((0, 0));
                    delivered = Some((u.max(up_to), r + resent));
                }
                Command::Fetch {
                    after,
                    limit,
                    reply,
                } => {
                    let _ = reply.send(self.db.fetch(after, limit));
                }
                Command::Resume {
                    last_sequence_id,
                    reply,
                } => {
                    let r = self.db.resume(last_sequence_id);
                    if r.is_ok() {
                        self.committed.send_replace(self.db.last_seq());
                    }
                    let _ = reply.send(r);
                }
                Command::SetLimits(cfg) => {
                    self.max_wait = cfg.commit_max_wait;
                    self.max_batch = cfg.commit_max_batch;
                    self.max_payload = cfg.max_payload_bytes;
                    tracing::info!(
                        max_payload_bytes = self.max_payload,
                        commit_max_batch = self.max_batch,
                        commit_max_wait_ms = self.max_wait.as_millis() as u64,
                        "store limits reloaded"
                    );
                }
            }
        }
        if let Some((up_to, resent)) = delivered {
            let n = self.db.delivered(up_to, resent)?;
            self.deliveries.push_back((Instant::now(), n));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &[u8], pkid: u16, dup: bool) -> Inbound {
        Inbound {
            mqtt_topic: topic.into(),
            payload: bytes::Bytes::copy_from_slice(payload),
            retain: false,
            device: topic.split('/').nth(1).map(str::to_string),
            dup,
            pkid,
            ack: Some(AckToken { pkid, epoch: 1 }),
        }
    }

    fn temp_db() -> (tempdir::Dir, Db) {
        let dir = tempdir::Dir::new();
        let db = Db::open(&dir.path.join("s.db")).unwrap();
        (dir, db)
    }

    /// A throwaway folder removed on drop.
    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "ferry-store-test-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[test]
    fn numbers_are_never_reused_after_delete_and_reopen() {
        let (dir, mut db) = temp_db();
        db.insert_batch(
            vec![msg("d/a/s", b"1", 1, false), msg("d/b/s", b"2", 2, false)],
            100,
        )
        .unwrap();
        assert_eq!(db.last_seq(), 2);
        db.delivered(2, 0).unwrap();
        drop(db);
        let mut db = Db::open(&dir.path.join("s.db")).unwrap();
        db.insert_batch(vec![msg("d/a/s", b"3", 3, false)], 100)
            .unwrap();
        let recs = db.fetch(0, 10).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].seq, 3);
        assert_eq!(recs[0].device, "a");
        assert_eq!(recs[0].props.mqtt_topic, "d/a/s");
    }

    #[test]
    fn a_redelivered_message_is_acked_but_not_stored_twice() {
        let (_dir, mut db) = temp_db();
        let acks = db
            .insert_batch(vec![msg("d/a/s", b"x", 7, false)], 100)
            .unwrap();
        assert_eq!(acks.acks.len(), 1);
        // The broker redelivers with DUP: same pkid, topic and payload.
        let acks = db
            .insert_batch(vec![msg("d/a/s", b"x", 7, true)], 100)
            .unwrap();
        assert_eq!(acks.acks.len(), 1, "a redelivery is still acknowledged");
        // A DUP message that differs is new.
        db.insert_batch(vec![msg("d/a/s", b"y", 7, true)], 100)
            .unwrap();
        let stats = db.stats().unwrap();
        assert_eq!(stats.pending, 2);
        assert_eq!(stats.counter("redeliveries_dropped"), 1);
        assert_eq!(stats.counter("received"), 3);
    }

    #[test]
    fn oversized_and_unkeyed_messages_are_dead_lettered_without_blocking() {
        let (_dir, mut db) = temp_db();
        let mut no_device = msg("x", b"a", 2, false);
        no_device.device = None;
        let acks = db
            .insert_batch(
                vec![
                    msg("d/a/s", &[0u8; 200], 1, false),
                    no_device,
                    msg("d/a/s", b"ok", 3, false),
                ],
                100,
            )
            .unwrap();
        assert_eq!(acks.acks.len(), 3);
        let stats = db.stats().unwrap();
        assert_eq!(stats.pending, 1);
        assert_eq!(stats.counter("dead_lettered"), 2);
        let n: i64 = db
            .conn
            .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn resume_skips_what_the_broker_holds() {
        let (_dir, mut db) = temp_db();
        let batch = (0..5)
            .map(|i| msg("d/a/s", &[i], i as u16 + 1, false))
            .collect();
        db.insert_batch(batch, 100).unwrap();
        let out = db.resume(3).unwrap();
        assert_eq!(
            out,
            ResumeOutcome {
                skipped: 3,
                renumbered_by: 0
            }
        );
        let seqs: Vec<u64> = db.fetch(0, 10).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(db.resume(-1).unwrap(), ResumeOutcome::default());
    }

    #[test]
    fn resume_renumbers_when_the_broker_is_ahead_of_a_replaced_store() {
        let (_dir, mut db) = temp_db();
        let batch = (0..3)
            .map(|i| msg("d/a/s", &[i], i as u16 + 1, false))
            .collect();
        db.insert_batch(batch, 100).unwrap();
        // The broker already holds 1..=50 from an earlier store.
        let out = db.resume(50).unwrap();
        assert_eq!(out.renumbered_by, 50);
        let recs = db.fetch(0, 10).unwrap();
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![51, 52, 53]);
        assert_eq!(recs[0].payload, vec![0]);
        db.insert_batch(vec![msg("d/a/s", b"n", 9, false)], 100)
            .unwrap();
        assert_eq!(db.last_seq(), 54);
    }
}
