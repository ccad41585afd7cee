//! The store's SQL: schema, record numbering per destination, the backlog
//! accounting, and shedding. Runs on the store thread only.
//!
//! # Keys
//!
//! A pending record lives in `outbox` under the key
//! `destination id << 48 | record number`: one table, one B-tree without a
//! second index, and every destination's backlog is one contiguous key
//! range in record order. Record numbers are per destination (each topic has
//! its own producer and `sequence_id`s) and stay below 2^48.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction};

use super::layout::{self, DestIx, DropReason, Layout, Role, StreamSpec, Usage};
use super::{AckToken, Inbound, Record, RecordProps, ResumeOutcome, StoreError};
use crate::config::{Durability, Overflow};

const SEQ_BITS: u32 = 48;
/// The largest record number a destination can hand out.
pub const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;

/// How much of a dead letter's payload is kept.
const DEAD_LETTER_KEEP_BYTES: usize = 64 * 1024;
/// Under disk pressure, shed in transactions of at most this many records,
/// each followed by a checkpoint, so that the WAL stays small.
const EMERGENCY_CHUNK: usize = 2_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    key         INTEGER PRIMARY KEY,
    device      TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    props       BLOB    NOT NULL
);
CREATE TABLE IF NOT EXISTS destinations (
    id       INTEGER PRIMARY KEY,
    topic    TEXT    NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL,
    stream   TEXT    NOT NULL,
    role     TEXT    NOT NULL,
    resumed  INTEGER NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS incidents (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
";

const SQL_INSERT: &str =
    "INSERT INTO outbox (key, device, received_ms, payload, props) VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_SEEN_GET: &str = "SELECT topic, digest FROM mqtt_seen WHERE pkid = ?1";
const SQL_SEEN_PUT: &str = "INSERT INTO mqtt_seen (pkid, topic, digest) VALUES (?1, '', ?2)
     ON CONFLICT(pkid) DO UPDATE SET topic = '', digest = excluded.digest";
const SQL_DEAD_LETTER: &str =
    "INSERT INTO dead_letters (received_ms, mqtt_topic, reason, size, payload)
     VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_FETCH: &str = "SELECT key, device, received_ms, payload, props FROM outbox
     WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT ?3";
const SQL_DELETE_RANGE: &str = "DELETE FROM outbox WHERE key >= ?1 AND key <= ?2";
const SQL_DELETE_UPTO: &str =
    "DELETE FROM outbox WHERE key > ?1 AND key <= ?2 RETURNING LENGTH(payload)";
const SQL_COUNT_RANGE: &str =
    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE key > ?1 AND key <= ?2";
const SQL_OLDEST: &str =
    "SELECT received_ms FROM outbox WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT 1";
const SQL_DEVICES: &str = "SELECT key, device FROM outbox WHERE key > ?1 AND key <= ?2";
const SQL_SCAN: &str = "SELECT key, LENGTH(payload), received_ms FROM outbox
     WHERE key > ?1 AND key <= ?2 ORDER BY key";
const SQL_SET_NEXT_SEQ: &str = "UPDATE destinations SET next_seq = ?2 WHERE id = ?1";
const SQL_COUNTER_ADD: &str = "INSERT INTO counters (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value";
const SQL_AGENT_PUT: &str = "INSERT OR REPLACE INTO agent (id, snapshot) VALUES (1, ?1)";
const SQL_INCIDENT: &str = "INSERT INTO incidents (at_ms, kind, detail) VALUES (?1, ?2, ?3)";

fn key(id: u64, seq: u64) -> u64 {
    (id << SEQ_BITS) | seq
}

fn seq_of(key: u64) -> u64 {
    key & SEQ_MAX
}

/// One destination's state, mirrored in memory.
#[derive(Debug, Clone, Default)]
pub struct Dest {
    /// `destinations.id`.
    id: u64,
    next_seq: u64,
    pub records: u64,
    pub bytes: u64,
    /// The highest record number the uplink fetched since it (re)connected:
    /// those may be in flight and are never shed.
    fetched: u64,
    /// Its producer never resumed with the broker (`destinations.resumed`).
    fresh: bool,
}

impl Dest {
    /// Keys above `after` (exclusive) up to the end of this destination.
    fn range(&self, after_seq: u64) -> (i64, i64) {
        (key(self.id, after_seq) as i64, key(self.id, SEQ_MAX) as i64)
    }
}

/// What one group commit did.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Acks to release, in arrival order.
    pub acks: Vec<AckToken>,
    pub stored: u64,
    pub dead_lettered: u64,
    pub redelivered: u64,
    /// Indexes (into the batch) of messages held back by a `reject` stream
    /// over its limit: not stored, not acknowledged.
    pub parked: Vec<usize>,
    pub shed: Shed,
    /// Records deleted after the broker's receipt.
    pub delivered: u64,
}

/// The broker confirmed every record of `dest` up to `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub dest: DestIx,
    pub up_to: u64,
    /// How many of them were sent more than once.
    pub resent: u64,
}

/// Records that left the store unsent, per stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shed {
    pub superseded: HashMap<usize, u64>,
    pub dropped: HashMap<(usize, DropReason), u64>,
}

impl Shed {
    pub fn is_empty(&self) -> bool {
        self.superseded.values().all(|n| *n == 0) && self.dropped.values().all(|n| *n == 0)
    }

    pub fn total(&self) -> u64 {
        self.superseded.values().sum::<u64>() + self.dropped.values().sum::<u64>()
    }

    fn merge(&mut self, other: Shed) {
        for (k, v) in other.superseded {
            *self.superseded.entry(k).or_default() += v;
        }
        for (k, v) in other.dropped {
            *self.dropped.entry(k).or_default() += v;
        }
    }
}

/// Which pending records of one destination a shed removes.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Every record that a newer record of the same device supersedes.
    Superseded,
    /// The oldest, until this much is freed.
    Oldest(Usage),
    /// Those received before this time (ms since the epoch).
    ReceivedBefore(u64),
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

pub struct Db {
    conn: Connection,
    layout: Layout,
    dests: Vec<Dest>,
    /// Per stream: after a shed that left it over its limits, not before it
    /// reaches this again.
    rearm: Vec<Option<Usage>>,
    /// Per stream: shedding left only newest states and records in flight,
    /// still over the limit (warned once per episode).
    stuck: Vec<bool>,
}

/// Whether an SQLite error means the disk (or the file system's quota) is
/// full.
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// A store that failed its integrity check, and where it was moved.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub moved_to: PathBuf,
    pub reason: String,
}

impl Db {
    /// Opens the store, moving a damaged file aside (with its WAL) and
    /// starting a fresh one.
    pub fn open(
        path: &Path,
        layout: Layout,
        durability: Durability,
    ) -> Result<(Db, Option<Damaged>), StoreError> {
        let damaged = match check_integrity(path)? {
            None => None,
            Some(reason) => Some(move_aside(path, reason)?),
        };
        let open_err = |source: rusqlite::Error| {
            if is_disk_full(&source) {
                StoreError::DiskFull
            } else {
                StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Interval(_) => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(open_err)?;
        // No temporary files: a full disk must not stop a query.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(open_err)?;
        // Give the WAL's space back to the file system after checkpoints.
        conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)
            .map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        let streams = layout.streams.len();
        let mut db = Db {
            conn,
            dests: Vec::new(),
            rearm: vec![None; streams],
            stuck: vec![false; streams],
            layout,
        };
        db.map_destinations().map_err(open_err)?;
        db.migrate_v1().map_err(open_err)?;
        for i in 0..db.dests.len() {
            let (lo, hi) = db.dests[i].range(0);
            let (n, bytes): (i64, i64) = db
                .conn
                .query_row(SQL_COUNT_RANGE, [lo, hi], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(open_err)?;
            db.dests[i].records = n as u64;
            db.dests[i].bytes = bytes as u64;
        }
        if let Some(d) = &damaged {
            db.incident(
                "store-damaged",
                &format!(
                    "the store failed its integrity check ({}) and was moved to {}; a fresh store was started",
                    d.reason,
                    d.moved_to.display()
                ),
            )?;
        }
        Ok((db, damaged))
    }

    /// Finds (or adds) each configured topic's row in `destinations`.
    fn map_destinations(&mut self) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        let mut dests = Vec::new();
        for d in &self.layout.dests {
            let stream = &self.layout.streams[d.stream].name;
            let found: Option<(i64, i64, String, String, bool)> = tx
                .query_row(
                    "SELECT id, next_seq, stream, role, resumed FROM destinations WHERE topic = ?1",
                    [&d.topic],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            let (id, next_seq, resumed) = match found {
                Some((id, next, old_stream, old_role, resumed)) => {
                    // Written only when it changed: a start on a full disk
                    // must not need to write.
                    if old_stream != *stream || old_role != d.role.as_str() {
                        tx.execute(
                            "UPDATE destinations SET stream = ?2, role = ?3 WHERE id = ?1",
                            params![id, stream, d.role.as_str()],
                        )?;
                    }
                    (id, next, resumed)
                }
                None => {
                    let id: i64 = tx.query_row(
                        "SELECT COALESCE(MAX(id), 0) + 1 FROM destinations",
                        [],
                        |r| r.get(0),
                    )?;
                    tx.execute(
                        "INSERT INTO destinations (id, topic, next_seq, stream, role) VALUES (?1, ?2, 1, ?3, ?4)",
                        params![id, d.topic, stream, d.role.as_str()],
                    )?;
                    (id, 1, false)
                }
            };
            dests.push(Dest {
                id: id as u64,
                next_seq: next_seq as u64,
                fresh: !resumed,
                ..Dest::default()
            });
        }
        tx.commit()?;
        self.dests = dests;
        Ok(())
    }

    /// Stores written before streams existed had one `journal` numbered by
    /// `meta.next_seq`; its records belong to the first destination (the
    /// same topic, so the same producer and numbers).
    fn migrate_v1(&mut self) -> Result<(), rusqlite::Error> {
        let old: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'journal'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if old.is_none() || self.dests.is_empty() {
            return Ok(());
        }
        let d = &mut self.dests[0];
        let tx = self.conn.transaction()?;
        let next: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(1);
        tx.execute(
            "INSERT INTO outbox (key, device, received_ms, payload, props)
             SELECT (?1 << 48) | seq, device, received_ms, payload, props FROM journal",
            [d.id as i64],
        )?;
        let next = (next as u64).max(d.next_seq);
        // That store's producer did speak to the broker.
        tx.execute(
            "UPDATE destinations SET next_seq = ?2, resumed = 1 WHERE id = ?1",
            params![d.id as i64, next as i64],
        )?;
        tx.execute_batch("DROP TABLE journal; DROP TABLE IF EXISTS meta;")?;
        tx.commit()?;
        d.next_seq = next;
        d.fresh = false;
        tracing::info!("store migrated to per-topic record numbers");
        Ok(())
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// New limits and policies (configuration reload); the destinations stay.
    pub fn set_layout(&mut self, layout: Layout) {
        debug_assert_eq!(layout.dests, self.layout.dests);
        self.rearm = vec![None; layout.streams.len()];
        self.stuck = vec![false; layout.streams.len()];
        self.layout = layout;
    }

    pub fn dest(&self, d: DestIx) -> &Dest {
        &self.dests[d]
    }

    /// The highest record number handed out per destination.
    pub fn last_seqs(&self) -> Vec<u64> {
        self.dests.iter().map(|d| d.next_seq - 1).collect()
    }

    pub fn usage(&self, stream: usize) -> Usage {
        stream_usage(&self.layout.streams[stream], &self.dests)
    }

    pub fn total(&self) -> Usage {
        sum_usage(&self.dests)
    }

    /// Stores a batch in one transaction. On error nothing is stored and the
    /// batch can be tried again.
    pub fn insert_batch(
        &mut self,
        batch: &[Inbound],
        max_payload: usize,
    ) -> Result<BatchOutcome, StoreError> {
        self.commit_batch(&[], &[], batch, max_payload)
    }

    /// Deletes what the broker confirmed (`deliveries`: destination, up to,
    /// resent) and stores a batch, in one transaction (one fsync for both).
    /// `forget`: packet ids of messages received but not stored (the broker
    /// redelivers them): their `mqtt_seen` rows describe an older message
    /// and must not make the redelivery look like a duplicate. On error
    /// nothing changed and all can be tried again.
    pub fn commit_batch(
        &mut self,
        deliveries: &[Delivery],
        forget: &[u16],
        batch: &[Inbound],
        max_payload: usize,
    ) -> Result<BatchOutcome, StoreError> {
        let now = now_ms();
        let mut out = BatchOutcome::default();
        let mut counts = Counts::default();
        // Work on copies, so that a failed transaction leaves no trace.
        let mut dests = self.dests.clone();
        let mut rearm = self.rearm.clone();
        let mut stuck = self.stuck.clone();
        let mut parking = vec![false; self.layout.streams.len()];
        let tx = self.conn.transaction()?;
        for pkid in forget {
            tx.prepare_cached("DELETE FROM mqtt_seen WHERE pkid = ?1")?
                .execute([pkid])?;
        }
        // Deletions first: their room is there for the batch.
        for d in deliveries {
            let (n, bytes) = delete_upto(&tx, &dests[d.dest], d.up_to)?;
            let dest = &mut dests[d.dest];
            dest.records = dest.records.saturating_sub(n);
            dest.bytes = dest.bytes.saturating_sub(bytes);
            counts.delivered += n as i64;
            counts.resent += d.resent as i64;
            out.delivered += n;
        }
        for (i, msg) in batch.iter().enumerate() {
            if !msg.counted {
                counts.received += 1;
            }
            if msg.dup && msg.pkid != 0 && seen_before(&tx, msg)? {
                counts.redelivered += 1;
                out.acks.extend(msg.ack);
                continue;
            }
            let reason = match (&msg.stream, &msg.device) {
                (None, _) => Some("topic matches no stream's subscription".to_string()),
                (_, None) => Some("no device id in topic".to_string()),
                _ if msg.payload.len() > max_payload => Some(format!(
                    "payload of {} bytes exceeds store.max_payload_bytes ({max_payload})",
                    msg.payload.len()
                )),
                _ => None,
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
                if msg.pkid != 0 {
                    seen_put(&tx, msg)?;
                }
                tracing::warn!(mqtt_topic = %msg.mqtt_topic, size = msg.payload.len(), %reason, "message dead-lettered");
                counts.dead_lettered += 1;
                out.acks.extend(msg.ack);
                continue;
            }
            let s = msg.stream.expect("checked above");
            let spec = &self.layout.streams[s];
            let len = msg.payload.len() as u64;
            let usage = |dests: &[Dest]| stream_usage(spec, dests);
            // A stream with nothing pending takes a record even when that
            // alone is over its limits, or it would wait forever.
            let u = usage(&dests);
            if spec.overflow == Overflow::Reject
                && (parking[s]
                    || (u.records > 0 && spec.limits.full_for(u, len * spec.dests.len() as u64)))
            {
                parking[s] = true;
                out.parked.push(i);
                continue;
            }
            if msg.pkid != 0 {
                seen_put(&tx, msg)?;
            }
            let props = postcard::to_allocvec(&RecordProps {
                mqtt_topic: msg.mqtt_topic.clone(),
                retain: msg.retain,
            })
            .expect("postcard encodes a plain struct");
            let device = msg.device.as_deref().unwrap_or_default();
            for d in &spec.dests {
                let dest = &mut dests[*d];
                if dest.next_seq > SEQ_MAX {
                    return Err(StoreError::Exhausted(self.layout.dests[*d].topic.clone()));
                }
                tx.prepare_cached(SQL_INSERT)?.execute(params![
                    key(dest.id, dest.next_seq) as i64,
                    device,
                    now as i64,
                    &msg.payload[..],
                    &props
                ])?;
                dest.next_seq += 1;
                dest.records += 1;
                dest.bytes += len;
            }
            counts.stored += 1;
            out.acks.extend(msg.ack);

            // Over a limit? Apply the stream's policy now, record by record,
            // so that what is shed depends only on the order of arrival.
            let u = usage(&dests);
            if !spec.limits.over(u) {
                rearm[s] = None;
                stuck[s] = false;
                continue;
            }
            let due = match rearm[s] {
                None => true,
                Some(r) => {
                    (spec.limits.max_records.is_some() && u.records >= r.records)
                        || (spec.limits.max_bytes.is_some() && u.bytes >= r.bytes)
                }
            };
            if !due || spec.overflow == Overflow::Reject {
                continue;
            }
            let shed = shed_stream(&tx, &self.layout, &mut dests, s, None)?;
            out.shed.merge(shed);
            let after = usage(&dests);
            if spec.limits.over(after) {
                rearm[s] = Some(layout::rearm(&spec.limits, after));
                if !stuck[s] {
                    stuck[s] = true;
                    tracing::warn!(stream = %spec.name, records = after.records, bytes = after.bytes,
                        "stream is over its limits with only each device's newest state (and records in flight) left; they are kept");
                }
            } else {
                rearm[s] = None;
            }
        }
        for (d, new) in dests.iter().enumerate() {
            if new.next_seq != self.dests[d].next_seq {
                tx.prepare_cached(SQL_SET_NEXT_SEQ)?
                    .execute(params![new.id as i64, new.next_seq as i64])?;
            }
        }
        counts.write(&tx)?;
        write_shed(&tx, &self.layout, &out.shed)?;
        tx.commit()?;
        self.dests = dests;
        self.rearm = rearm;
        self.stuck = stuck;
        out.stored = counts.stored as u64;
        out.dead_lettered = counts.dead_lettered as u64;
        out.redelivered = counts.redelivered as u64;
        Ok(out)
    }

    /// When the oldest pending record of a destination arrived.
    pub fn oldest_received_ms(&self, d: DestIx) -> Result<Option<u64>, StoreError> {
        let (lo, hi) = self.dests[d].range(0);
        Ok(self
            .conn
            .prepare_cached(SQL_OLDEST)?
            .query_row([lo, hi], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v as u64))
    }

    /// Records of destination `d` numbered above `after`, in order: at most
    /// `limit` of them and `max_bytes` of payload, but at least one.
    pub fn fetch(
        &mut self,
        d: DestIx,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, StoreError> {
        let (lo, hi) = self.dests[d].range(after);
        let mut stmt = self.conn.prepare_cached(SQL_FETCH)?;
        let rows = stmt.query_map(params![lo, hi, limit as i64], |r| {
            let props: Vec<u8> = r.get(4)?;
            Ok(Record {
                seq: seq_of(r.get::<_, i64>(0)? as u64),
                device: r.get(1)?,
                received_ms: r.get::<_, i64>(2)? as u64,
                payload: r.get(3)?,
                props: postcard::from_bytes(&props).unwrap_or(RecordProps {
                    mqtt_topic: String::new(),
                    retain: false,
                }),
            })
        })?;
        // Payload bytes: at most `max_bytes`, but always one record.
        let (mut recs, mut bytes) = (Vec::new(), 0);
        for row in rows {
            let rec: Record = row?;
            if !recs.is_empty() && bytes + rec.payload.len() > max_bytes {
                break;
            }
            bytes += rec.payload.len();
            recs.push(rec);
        }
        if let Some(last) = recs.last() {
            let dest = &mut self.dests[d];
            dest.fetched = dest.fetched.max(last.seq);
        }
        Ok(recs)
    }

    /// Deletes the records of `d` up to `up_to`; returns how many there were.
    pub fn delivered(&mut self, d: DestIx, up_to: u64, resent: u64) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let (n, bytes) = delete_upto(&tx, &self.dests[d], up_to)?;
        Counts {
            delivered: n as i64,
            resent: resent as i64,
            ..Counts::default()
        }
        .write(&tx)?;
        tx.commit()?;
        let dest = &mut self.dests[d];
        dest.records = dest.records.saturating_sub(n);
        dest.bytes = dest.bytes.saturating_sub(bytes);
        Ok(n)
    }

    /// A producer (re)connected to `d` and the broker holds every record up
    /// to `last_sequence_id` (-1: none).
    pub fn resume(
        &mut self,
        d: DestIx,
        last_sequence_id: i64,
    ) -> Result<ResumeOutcome, StoreError> {
        self.dests[d].fetched = 0;
        if last_sequence_id < 0 {
            return Ok(ResumeOutcome::default());
        }
        let last = last_sequence_id as u64;
        if last >= SEQ_MAX {
            return Err(StoreError::Exhausted(self.layout.dests[d].topic.clone()));
        }
        // Work on a copy: memory changes only once the commit succeeded.
        let mut dest = self.dests[d].clone();
        let tx = self.conn.transaction()?;
        let outcome = if last >= dest.next_seq && dest.fresh {
            // The broker holds numbers this destination never gave out, and
            // it never spoke to the broker before: the store was replaced
            // (deleted, or damaged and moved aside). Its pending records are
            // new to the broker; number them above what it holds, or
            // deduplication would drop them.
            let (lo, hi) = dest.range(0);
            let lowest: Option<i64> = tx.query_row(
                "SELECT MIN(key) FROM outbox WHERE key > ?1 AND key <= ?2",
                [lo, hi],
                |r| r.get(0),
            )?;
            let delta = match lowest {
                Some(low) => last + 1 - seq_of(low as u64),
                None => 0,
            };
            if delta > 0 {
                // Two steps, so that no key collides on the way.
                tx.execute(
                    "UPDATE outbox SET key = -(key + ?3) WHERE key > ?1 AND key <= ?2",
                    params![lo, hi, delta as i64],
                )?;
                tx.execute("UPDATE outbox SET key = -key WHERE key < 0", [])?;
            }
            dest.next_seq = (dest.next_seq + delta).max(last + 1);
            ResumeOutcome {
                skipped: 0,
                renumbered_by: delta,
            }
        } else {
            // The broker holds everything up to `last`. When that is beyond
            // what this store numbered, the store lost its newest commits (a
            // power cut with `durability = "interval"`, or an older copy
            // restored) but the broker got them: skip what it holds and
            // number on from there, never twice.
            let (n, bytes) = delete_upto(&tx, &dest, last)?;
            Counts {
                skipped: n as i64,
                ..Counts::default()
            }
            .write(&tx)?;
            dest.records = dest.records.saturating_sub(n);
            dest.bytes = dest.bytes.saturating_sub(bytes);
            dest.next_seq = dest.next_seq.max(last + 1);
            ResumeOutcome {
                skipped: n,
                renumbered_by: 0,
            }
        };
        tx.execute(
            "UPDATE destinations SET next_seq = ?2, resumed = 1 WHERE id = ?1",
            params![dest.id as i64, dest.next_seq as i64],
        )?;
        tx.commit()?;
        dest.fresh = false;
        self.dests[d] = dest;
        Ok(outcome)
    }

    /// Drops what is older than each stream's `max_age_secs` (never a
    /// device's newest state).
    pub fn shed_aged(&mut self, now_ms: u64) -> Result<Shed, StoreError> {
        let mut total = Shed::default();
        for s in 0..self.layout.streams.len() {
            let Some(cutoff) = self.layout.streams[s].limits.age_cutoff_ms(now_ms) else {
                continue;
            };
            let oldest = self.layout.streams[s]
                .dests
                .iter()
                .map(|d| self.oldest_received_ms(*d))
                .collect::<Result<Vec<_>, _>>()?;
            if !oldest.iter().flatten().any(|t| *t < cutoff) {
                continue;
            }
            let mut dests = self.dests.clone();
            let tx = self.conn.transaction()?;
            let shed = shed_stream(&tx, &self.layout, &mut dests, s, Some(cutoff))?;
            write_shed(&tx, &self.layout, &shed)?;
            tx.commit()?;
            self.dests = dests;
            total.merge(shed);
        }
        Ok(total)
    }

    /// Sheds under disk pressure, as cheaply as keeping every device's
    /// newest state allows: `round` 0 coalesces every status topic; each
    /// later round drops the oldest quarter of every history and events
    /// backlog. `reject` streams are left alone (the MQTT broker holds their
    /// backlog). Works in small transactions with a checkpoint after each,
    /// so it can run on a nearly full disk.
    pub fn shed_emergency(&mut self, round: u32, reason: DropReason) -> Result<Shed, StoreError> {
        let mut total = Shed::default();
        for d in 0..self.dests.len() {
            let spec = &self.layout.dests[d];
            let stream = &self.layout.streams[spec.stream];
            if stream.overflow == Overflow::Reject {
                continue;
            }
            let rule = match (round, spec.role) {
                (0, Role::Status) => Rule::Superseded,
                (0, _) | (_, Role::Status) => continue,
                (_, _) => {
                    let n = self.dests[d].records.div_ceil(4);
                    if n == 0 {
                        continue;
                    }
                    Rule::Oldest(Usage {
                        records: n,
                        bytes: 0,
                    })
                }
            };
            let protected = protected_keys(&self.conn, &self.dests[d], spec.role)?;
            let mut left = rule;
            loop {
                let mut dests = self.dests.clone();
                let tx = self.conn.transaction()?;
                let freed = shed_dest(&tx, &mut dests[d], &protected, left, Some(EMERGENCY_CHUNK))?;
                let mut shed = Shed::default();
                if matches!(rule, Rule::Superseded) {
                    shed.superseded.insert(spec.stream, freed.records);
                } else {
                    shed.dropped.insert((spec.stream, reason), freed.records);
                }
                write_shed(&tx, &self.layout, &shed)?;
                tx.commit()?;
                self.dests = dests;
                self.checkpoint(true);
                total.merge(shed);
                if freed.records < EMERGENCY_CHUNK as u64 {
                    break;
                }
                if let Rule::Oldest(need) = left {
                    let rest = need.records.saturating_sub(freed.records);
                    if rest == 0 {
                        break;
                    }
                    left = Rule::Oldest(Usage {
                        records: rest,
                        bytes: 0,
                    });
                }
            }
        }
        Ok(total)
    }

    /// Bytes of the store file in use (pages not on the free list).
    pub fn used_bytes(&self) -> Result<u64, StoreError> {
        let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages: i64 = self.conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok(((pages - free).max(0) * page) as u64)
    }

    /// Bytes of free pages inside the store file (reused before it grows).
    pub fn free_page_bytes(&self) -> Result<u64, StoreError> {
        let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        Ok((free * page).max(0) as u64)
    }

    /// Copies the WAL into the database file. `restart` also makes the next
    /// transaction write the WAL from its start again, over space the file
    /// already has (a full disk has no room for a growing WAL). A reader
    /// (`ferry status`) may keep it from finishing, which is harmless.
    pub fn checkpoint(&self, restart: bool) {
        let mode = if restart { "RESTART" } else { "PASSIVE" };
        let _ = self
            .conn
            .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()));
    }

    pub fn write_snapshot(&self, json: &str) -> Result<(), StoreError> {
        self.conn.execute(SQL_AGENT_PUT, [json])?;
        Ok(())
    }

    /// Records an event that `ferry status` shows.
    pub fn incident(&self, kind: &str, detail: &str) -> Result<(), StoreError> {
        self.conn
            .execute(SQL_INCIDENT, params![now_ms() as i64, kind, detail])?;
        Ok(())
    }

    #[cfg(test)]
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    #[cfg(test)]
    pub fn counter(&self, name: &str) -> i64 {
        self.conn
            .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .unwrap()
            .unwrap_or(0)
    }
}

/// What `dests` hold together.
fn sum_usage<'a>(dests: impl IntoIterator<Item = &'a Dest>) -> Usage {
    dests.into_iter().fold(Usage::default(), |u, d| Usage {
        records: u.records + d.records,
        bytes: u.bytes + d.bytes,
    })
}

/// What a stream holds over all its destinations.
fn stream_usage(spec: &StreamSpec, dests: &[Dest]) -> Usage {
    sum_usage(spec.dests.iter().map(|d| &dests[*d]))
}

/// Applies stream `s`'s policy (or, with `age_cutoff`, its age limit) to
/// `dests`, inside `tx`. History goes before status; a device's newest
/// pending state is never touched.
fn shed_stream(
    tx: &Transaction<'_>,
    layout: &Layout,
    dests: &mut [Dest],
    s: usize,
    age_cutoff: Option<u64>,
) -> Result<Shed, StoreError> {
    let spec = &layout.streams[s];
    let mut shed = Shed::default();
    let usage = |dests: &[Dest]| stream_usage(spec, dests);
    // History (and events) first, then the status topic.
    let mut order: Vec<DestIx> = spec.dests.clone();
    order.sort_by_key(|d| layout.dests[*d].role == Role::Status);
    if let Some(cutoff) = age_cutoff {
        for d in order {
            let role = layout.dests[d].role;
            let protected = protected_keys(tx, &dests[d], role)?;
            let freed = shed_dest(
                tx,
                &mut dests[d],
                &protected,
                Rule::ReceivedBefore(cutoff),
                None,
            )?;
            *shed.dropped.entry((s, DropReason::MaxAge)).or_default() += freed.records;
        }
        return Ok(shed);
    }
    match spec.overflow {
        Overflow::Reject => {}
        Overflow::Coalesce => {
            let status = spec.dests[0];
            let protected = protected_keys(tx, &dests[status], Role::Status)?;
            let freed = shed_dest(tx, &mut dests[status], &protected, Rule::Superseded, None)?;
            *shed.superseded.entry(s).or_default() += freed.records;
            for d in order
                .iter()
                .filter(|d| layout.dests[**d].role != Role::Status)
            {
                let need = spec.limits.shed_target(usage(dests));
                if need == Usage::default() {
                    break;
                }
                let freed = shed_dest(
                    tx,
                    &mut dests[*d],
                    &HashSet::new(),
                    Rule::Oldest(need),
                    None,
                )?;
                *shed.dropped.entry((s, DropReason::Coalesce)).or_default() += freed.records;
            }
        }
        Overflow::DropOldest => {
            for d in order {
                let need = spec.limits.shed_target(usage(dests));
                if need == Usage::default() {
                    break;
                }
                let role = layout.dests[d].role;
                let protected = protected_keys(tx, &dests[d], role)?;
                let freed = shed_dest(tx, &mut dests[d], &protected, Rule::Oldest(need), None)?;
                *shed.dropped.entry((s, DropReason::DropOldest)).or_default() += freed.records;
            }
        }
    }
    Ok(shed)
}

/// The keys a shed of this destination must keep: for a status topic, each
/// device's newest record that is not yet fetched by the uplink.
fn protected_keys(conn: &Connection, dest: &Dest, role: Role) -> Result<HashSet<u64>, StoreError> {
    if role != Role::Status {
        return Ok(HashSet::new());
    }
    let (lo, hi) = dest.range(dest.fetched);
    let mut newest: HashMap<String, u64> = HashMap::new();
    let mut stmt = conn.prepare_cached(SQL_DEVICES)?;
    let mut rows = stmt.query([lo, hi])?;
    while let Some(r) = rows.next()? {
        let k = r.get::<_, i64>(0)? as u64;
        let device: String = r.get(1)?;
        let e = newest.entry(device).or_insert(k);
        *e = (*e).max(k);
    }
    Ok(newest.into_values().collect())
}

/// Deletes the records of one destination that `rule` selects (at most
/// `max_rows`), never one that is `protected` or already fetched by the
/// uplink. Returns what was freed and updates `dest`.
fn shed_dest(
    conn: &Connection,
    dest: &mut Dest,
    protected: &HashSet<u64>,
    rule: Rule,
    max_rows: Option<usize>,
) -> Result<Usage, StoreError> {
    let (lo, hi) = dest.range(dest.fetched);
    let mut freed = Usage::default();
    // Contiguous runs of keys to delete.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut open_run = false;
    {
        let mut stmt = conn.prepare_cached(SQL_SCAN)?;
        let mut rows = stmt.query([lo, hi])?;
        while let Some(r) = rows.next()? {
            let k = r.get::<_, i64>(0)? as u64;
            let len = r.get::<_, i64>(1)? as u64;
            let received = r.get::<_, i64>(2)? as u64;
            if protected.contains(&k) {
                open_run = false;
                continue;
            }
            let take = match rule {
                Rule::Superseded => true,
                Rule::Oldest(need) => freed.records < need.records || freed.bytes < need.bytes,
                Rule::ReceivedBefore(cutoff) => received < cutoff,
            };
            if !take {
                break;
            }
            match runs.last_mut() {
                Some(run) if open_run => run.1 = k,
                _ => runs.push((k, k)),
            }
            open_run = true;
            freed.records += 1;
            freed.bytes += len;
            if max_rows.is_some_and(|m| freed.records as usize >= m) {
                break;
            }
        }
    }
    let mut stmt = conn.prepare_cached(SQL_DELETE_RANGE)?;
    for (a, b) in runs {
        stmt.execute([a as i64, b as i64])?;
    }
    dest.records = dest.records.saturating_sub(freed.records);
    dest.bytes = dest.bytes.saturating_sub(freed.bytes);
    Ok(freed)
}

/// Deletes a destination's records up to `up_to`; returns count and bytes.
fn delete_upto(tx: &Transaction<'_>, dest: &Dest, up_to: u64) -> Result<(u64, u64), StoreError> {
    let (lo, _) = dest.range(0);
    let hi = key(dest.id, up_to.min(SEQ_MAX)) as i64;
    let mut stmt = tx.prepare_cached(SQL_DELETE_UPTO)?;
    let mut rows = stmt.query([lo, hi])?;
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(r) = rows.next()? {
        n += 1;
        bytes += r.get::<_, i64>(0)? as u64;
    }
    Ok((n, bytes))
}

fn write_shed(tx: &Transaction<'_>, layout: &Layout, shed: &Shed) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(SQL_COUNTER_ADD)?;
    for (s, n) in &shed.superseded {
        if *n > 0 {
            let name = format!("stream:{}:superseded", layout.streams[*s].name);
            stmt.execute(params![name, *n as i64])?;
        }
    }
    for ((s, reason), n) in &shed.dropped {
        if *n > 0 {
            let name = format!(
                "stream:{}:dropped:{}",
                layout.streams[*s].name,
                reason.as_str()
            );
            stmt.execute(params![name, *n as i64])?;
        }
    }
    Ok(())
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

fn seen_before(tx: &Transaction<'_>, msg: &Inbound) -> Result<bool, StoreError> {
    let seen: Option<(String, i64)> = tx
        .prepare_cached(SQL_SEEN_GET)?
        .query_row([msg.pkid], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match seen {
        None => false,
        // Rows written since the topic went into the digest.
        Some((t, d)) if t.is_empty() => d == digest(&msg.mqtt_topic, &msg.payload),
        // Rows of stores written before: the topic kept as text.
        Some((t, d)) => t == msg.mqtt_topic && d == payload_digest(&msg.payload),
    })
}

fn seen_put(tx: &Transaction<'_>, msg: &Inbound) -> Result<(), StoreError> {
    tx.prepare_cached(SQL_SEEN_PUT)?
        .execute(params![msg.pkid, digest(&msg.mqtt_topic, &msg.payload)])?;
    Ok(())
}

/// Fingerprint of a message for redelivery detection: CRC32C of the
/// payload, and CRC32C of the topic mixed with the payload's length.
fn digest(topic: &str, payload: &[u8]) -> i64 {
    let low = crc32c::crc32c(topic.as_bytes()) ^ payload.len() as u32;
    ((crc32c::crc32c(payload) as i64) << 32) | low as i64
}

/// The fingerprint of older stores (the topic was compared as text).
fn payload_digest(payload: &[u8]) -> i64 {
    ((crc32c::crc32c(payload) as i64) << 32) | (payload.len() as i64 & 0xffff_ffff)
}

pub fn now_ms() -> u64 {
    crate::status::now_ms()
}

/// Runs SQLite's quick check on an existing store file. `Ok(Some(reason))`
/// only for damage (corruption, or not a database at all); any other
/// failure (locked, no permission, a full disk) is an error: the file may be
/// fine and must not be moved aside.
fn check_integrity(path: &Path) -> Result<Option<String>, StoreError> {
    if !path.exists() {
        return Ok(None);
    }
    let check = || -> Result<String, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
    };
    match check() {
        Ok(s) if s == "ok" => Ok(None),
        Ok(s) => Ok(Some(s)),
        Err(e)
            if matches!(
                e.sqlite_error_code(),
                Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
            ) =>
        {
            Ok(Some(e.to_string()))
        }
        Err(e) if is_disk_full(&e) => Err(StoreError::DiskFull),
        Err(source) => Err(StoreError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Renames a damaged store and its WAL and shared-memory files to
/// `<name>.damaged-<UTC time>[-wal|-shm]`; nothing is deleted.
fn move_aside(path: &Path, reason: String) -> Result<Damaged, StoreError> {
    let stamp = utc_stamp(now_ms() / 1000);
    let mut target = PathBuf::from(format!("{}.damaged-{stamp}", path.display()));
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{}.damaged-{stamp}.{n}", path.display()));
        n += 1;
    }
    let io = |source| StoreError::MoveAside {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &target).map_err(io)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", target.display())).map_err(io)?;
        }
    }
    tracing::error!(store = %path.display(), moved_to = %target.display(), %reason,
        "STORE DAMAGED: it failed its integrity check and was moved aside (not deleted); starting a fresh store");
    Ok(Damaged {
        moved_to: target,
        reason,
    })
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the epoch (civil-from-days).
pub fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
