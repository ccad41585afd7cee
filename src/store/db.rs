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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction, MAIN_DB};

use super::schema;
use super::{AckToken, Guarded, Inbound, Record, RecordProps, ResumeOutcome, StoreError};
use crate::config::{Durability, Overflow};
use crate::layout::{self, DestIx, DropReason, Layout, Role, StreamSpec, Usage};

const SEQ_BITS: u32 = 48;
/// The largest record number a destination can hand out.
pub const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;
/// A broker's `last_sequence_id` at or above this is refused: no gateway
/// numbers 2^47 records in one topic (4,000 years at 1,000 a second), so a
/// number that high is another producer's, or a broken deduplication state.
/// Below it, renumbering above the broker's number always stays under
/// [`SEQ_MAX`].
pub const SEQ_LIMIT: u64 = 1 << 47;

/// How much of a dead letter's payload is kept.
pub const DEAD_LETTER_KEEP_BYTES: usize = 64 * 1024;
/// Under disk pressure, shed in transactions of at most this many records,
/// each followed by a checkpoint, so that the WAL stays small.
const EMERGENCY_CHUNK: usize = 2_000;
/// Confirmed MQTT connections remembered in `ack_confirmed`.
const ACK_CONNS_KEPT: u64 = 64;

const SQL_INSERT: &str = "INSERT INTO outbox (key, device, received_ms, payload, props, stored_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const SQL_SEEN_GET: &str = "SELECT digest, conn, gen FROM mqtt_seen WHERE pkid = ?1";
const SQL_SEEN_PUT: &str = "INSERT INTO mqtt_seen (pkid, digest, conn, gen) VALUES (?1, ?2, ?3, ?4)
     ON CONFLICT(pkid) DO UPDATE SET digest = excluded.digest, conn = excluded.conn, gen = excluded.gen";
const SQL_TOPIC_LAST_GET: &str = "SELECT digest FROM topic_last WHERE topic = ?1";
const SQL_TOPIC_LAST_PUT: &str = "INSERT INTO topic_last (topic, digest) VALUES (?1, ?2)
     ON CONFLICT(topic) DO UPDATE SET digest = excluded.digest";
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
    "SELECT stored_at FROM outbox WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT 1";
const SQL_NEWEST: &str =
    "SELECT stored_at FROM outbox WHERE key > ?1 AND key <= ?2 ORDER BY key DESC LIMIT 1";
const SQL_DEVICES: &str = "SELECT key, device FROM outbox WHERE key > ?1 AND key <= ?2";
const SQL_SCAN: &str = "SELECT key, LENGTH(payload), stored_at FROM outbox
     WHERE key > ?1 AND key <= ?2 ORDER BY key";
const SQL_SET_NEXT_SEQ: &str = "UPDATE destinations SET next_seq = ?2, horizon = ?3 WHERE id = ?1";
const SQL_COUNTER_ADD: &str = "INSERT INTO counters (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value";
const SQL_STATE_GET: &str = "SELECT value FROM store_state WHERE name = ?1";
const SQL_STATE_PUT: &str = "INSERT INTO store_state (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = excluded.value";
const SQL_ACK_CONFIRMED_PUT: &str = "INSERT INTO ack_confirmed (conn, gen) VALUES (?1, ?2)
     ON CONFLICT(conn) DO UPDATE SET gen = MAX(gen, excluded.gen)";
const SQL_AGENT_PUT: &str = "INSERT OR REPLACE INTO agent (id, snapshot) VALUES (1, ?1)";
const SQL_INCIDENT: &str = "INSERT INTO incidents (at_ms, kind, detail) VALUES (?1, ?2, ?3)";

/// `store_state` names.
const STATE_CLOCK: &str = "clock_ms";
const STATE_COMMIT: &str = "commit_seq";
const STATE_CONN: &str = "conn_seq";
const STATE_MOOT: &str = "moot_below_conn";
/// A random number given to a store when it is made: a copy has the same,
/// a new store (the old one deleted or moved aside) another.
const STATE_STORE_ID: &str = "store_id";

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
    /// The highest record number an uplink may have sent
    /// (`destinations.horizon`): records above it were never handed to a
    /// session, so the broker cannot hold them, whatever number it names.
    horizon: u64,
    /// Its session resumed with the broker in this process: what it commits
    /// from now on may be sent at once, so each commit moves the horizon.
    live: bool,
    pub records: u64,
    pub bytes: u64,
    /// The highest record number the uplink fetched since it (re)connected:
    /// those may be in flight and are never shed.
    fetched: u64,
}

impl Dest {
    /// Keys above `after` (exclusive) up to the end of this destination.
    fn range(&self, after_seq: u64) -> (i64, i64) {
        (key(self.id, after_seq) as i64, key(self.id, SEQ_MAX) as i64)
    }
}

/// The store's own clock: milliseconds ferry has run with this store,
/// counted on the monotonic clock and kept in `store_state`. Ages (the
/// `max_age_secs` limits, the oldest record) use it, never the wall clock,
/// which on a gateway without a real-time clock may start at 1970 and jump
/// years when NTP syncs. Time ferry was not running does not count.
#[derive(Debug, Clone)]
pub struct Clock {
    base_ms: u64,
    started: Instant,
    #[cfg(test)]
    skew_ms: u64,
}

impl Clock {
    fn starting_at(base_ms: u64) -> Clock {
        Clock {
            base_ms,
            started: Instant::now(),
            #[cfg(test)]
            skew_ms: 0,
        }
    }

    pub fn now_ms(&self) -> u64 {
        let t = self.base_ms + self.started.elapsed().as_millis() as u64;
        #[cfg(test)]
        let t = t + self.skew_ms;
        t
    }
}

/// Which MQTT acknowledgements the broker is known to have processed, so
/// that a DUP message under a packet id whose earlier message was acked and
/// confirmed is stored, not taken for a redelivery (see
/// [`super::Command::AcksConfirmed`]).
#[derive(Debug, Default)]
struct Acks {
    /// This process's ingest connection epochs, by their lasting number.
    conn_of_epoch: HashMap<u64, u64>,
    /// The last lasting connection number handed out.
    conn_seq: u64,
    /// The last commit number (every row written by a commit carries it).
    commit_seq: u64,
    /// Per connection: every ack of a commit up to this one was processed.
    confirmed: BTreeMap<u64, u64>,
    /// Confirmations not yet written.
    unsaved: Vec<(u64, u64)>,
    /// Rows of connections below this are moot: the broker lost the session
    /// (nothing of it is redelivered).
    moot_below: u64,
}

impl Acks {
    fn conn(&self, epoch: u64) -> u64 {
        self.conn_of_epoch.get(&epoch).copied().unwrap_or(0)
    }

    /// Whether the ack of a row written by `gen` on `conn` is known to have
    /// reached the broker.
    fn is_confirmed(&self, conn: u64, gen: u64) -> bool {
        conn < self.moot_below || self.confirmed.get(&conn).is_some_and(|g| *g >= gen)
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
    /// Retained messages the broker sent again (at a subscription) that
    /// match what was last stored for their topic: acknowledged, not stored.
    pub retained_unchanged: u64,
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
    /// Those stored before this store-clock time.
    StoredBefore(u64),
}

/// Counter increments written in the same transaction as the change they
/// count.
#[derive(Default)]
struct Counts {
    received: i64,
    stored: i64,
    dead_lettered: i64,
    redelivered: i64,
    retained_unchanged: i64,
    delivered: i64,
    skipped: i64,
    resent: i64,
}

pub struct Db {
    conn: Connection,
    durability: Durability,
    layout: Layout,
    dests: Vec<Dest>,
    clock: Clock,
    acks: Acks,
    /// Per stream: after a shed that left it over its limits, not before it
    /// reaches this again.
    rearm: Vec<Option<Usage>>,
    /// Per stream: shedding left only newest states and records in flight,
    /// still over the limit (warned once per episode).
    stuck: Vec<bool>,
    /// Destinations whose broker number was refused (one incident each).
    refused: HashSet<DestIx>,
    /// `store_state.store_id`.
    store_id: u64,
    /// `<store>.horizons`, see [`Db::recall_horizons`].
    horizons_file: PathBuf,
}

/// Whether an SQLite error means the disk (or the file system's quota) is
/// full.
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// A store that was found damaged, and where it was moved.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub moved_to: PathBuf,
    pub reason: String,
}

impl Db {
    /// Opens the store, creating or upgrading its schema. A damaged file
    /// (see [`schema`]) is moved aside with its WAL and a fresh store is
    /// started; a store written by a newer ferry is refused and left alone.
    pub fn open(
        path: &Path,
        layout: Layout,
        durability: Durability,
    ) -> Result<(Db, Option<Damaged>), StoreError> {
        let marker = schema::marker(path);
        let earlier = std::fs::read_to_string(&marker).ok();
        let mut damaged = match earlier {
            Some(reason) if path.exists() => Some(move_aside(
                path,
                format!("damage found while running: {}", reason.trim()),
            )?),
            _ => match check_integrity(path)? {
                None => None,
                Some(reason) => Some(move_aside(path, reason)?),
            },
        };
        let _ = std::fs::remove_file(&marker);
        let db = match Db::open_checked(path, layout.clone(), durability)? {
            Ok(db) => db,
            Err(reason) if damaged.is_none() => {
                damaged = Some(move_aside(path, reason)?);
                Db::open_checked(path, layout, durability)?
                    .map_err(|reason| StoreError::Damaged(format!("a fresh store: {reason}")))?
            }
            Err(reason) => return Err(StoreError::Damaged(format!("a fresh store: {reason}"))),
        };
        if let Some(d) = &damaged {
            db.incident(
                "store-damaged",
                &format!(
                    "the store was damaged ({}) and was moved to {}; a fresh store was started",
                    d.reason,
                    d.moved_to.display()
                ),
            )?;
        }
        Ok((db, damaged))
    }

    /// Opens, upgrades and checks the store at `path`. `Ok(Err(reason))`:
    /// it is damaged.
    fn open_checked(
        path: &Path,
        layout: Layout,
        durability: Durability,
    ) -> Result<Result<Db, String>, StoreError> {
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
        // Damage found while opening is reported as such; anything else
        // (a lock, a permission, a full disk) stops the start.
        // A file the operating system lets ferry write that SQLite still
        // finds read-only: its header says so (an unknown write version).
        let writable = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .is_ok()
        };
        let header_read_only =
            |e: &rusqlite::Error| e.sqlite_error_code() == Some(ErrorCode::ReadOnly) && writable();
        macro_rules! damage_or {
            ($r:expr) => {
                match $r {
                    Ok(v) => v,
                    Err(e) if schema::is_damage(&e) => return Ok(Err(e.to_string())),
                    Err(e) if header_read_only(&e) => {
                        return Ok(Err("its header makes the file read-only".into()))
                    }
                    Err(e) => return Err(open_err(e)),
                }
            };
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        if damage_or!(conn.is_readonly(MAIN_DB)) {
            if writable() {
                return Ok(Err("its header makes the file read-only".into()));
            }
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                    Some("the store file is not writable".into()),
                ),
            });
        }
        damage_or!(conn.pragma_update(None, "journal_mode", "WAL"));
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Interval(_) => "NORMAL",
        };
        damage_or!(conn.pragma_update(None, "synchronous", sync));
        // No temporary files: a full disk must not stop a query.
        damage_or!(conn.pragma_update(None, "temp_store", "MEMORY"));
        // Give the WAL's space back to the file system after checkpoints.
        damage_or!(conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024));
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let found = match damage_or!(schema::detect(&conn)) {
            Ok(found) => found,
            Err(reason) => return Ok(Err(reason)),
        };
        let first = layout.dests.first().map(|d| schema::FirstDest {
            topic: &d.topic,
            stream: &layout.streams[d.stream].name,
            role: d.role.as_str(),
        });
        match schema::upgrade(&mut conn, found, first) {
            Ok(()) => {}
            Err(StoreError::Sqlite(e)) if schema::is_damage(&e) => return Ok(Err(e.to_string())),
            Err(StoreError::Sqlite(e)) => return Err(open_err(e)),
            Err(StoreError::Damaged(reason)) => return Ok(Err(reason)),
            Err(e) => return Err(e),
        }
        let repairs = match damage_or!(schema::check(&mut conn)) {
            Ok(r) => r,
            Err(reason) => return Ok(Err(reason)),
        };
        for topic in &repairs.next_seq {
            tracing::warn!(%topic, "the store's next record number was behind its records; repaired");
        }
        let streams = layout.streams.len();
        let mut db = Db {
            conn,
            durability,
            dests: Vec::new(),
            clock: Clock::starting_at(0),
            acks: Acks::default(),
            rearm: vec![None; streams],
            stuck: vec![false; streams],
            refused: HashSet::new(),
            store_id: 0,
            horizons_file: PathBuf::from(format!("{}.horizons", path.display())),
            layout,
        };
        damage_or!(db.map_destinations());
        for i in 0..db.dests.len() {
            let (lo, hi) = db.dests[i].range(0);
            let (n, bytes): (i64, i64) =
                damage_or!(db
                    .conn
                    .query_row(SQL_COUNT_RANGE, [lo, hi], |r| Ok((r.get(0)?, r.get(1)?))));
            db.dests[i].records = n as u64;
            db.dests[i].bytes = bytes as u64;
        }
        damage_or!(db.load_state());
        damage_or!(db.recall_horizons());
        // From now on the file speaks for this store as it is: a copy of
        // the store restored later must not take over horizons of records
        // numbered after this start.
        db.remember_horizons();
        Ok(Ok(db))
    }

    /// Reads the clock and the acknowledgement state from `store_state`.
    fn load_state(&mut self) -> Result<(), rusqlite::Error> {
        let get = |name: &str| -> Result<u64, rusqlite::Error> {
            Ok(self
                .conn
                .query_row(SQL_STATE_GET, [name], |r| r.get::<_, i64>(0))
                .optional()?
                .unwrap_or(0)
                .max(0) as u64)
        };
        // The clock goes on from where it was written last, or from the
        // newest record if that is later (the clock is written every few
        // seconds, records at every commit).
        let mut clock = get(STATE_CLOCK)?;
        for d in &self.dests {
            let (lo, hi) = d.range(0);
            let newest: Option<i64> = self
                .conn
                .query_row(SQL_NEWEST, [lo, hi], |r| r.get(0))
                .optional()?;
            clock = clock.max(newest.unwrap_or(0).max(0) as u64);
        }
        self.clock = Clock::starting_at(clock);
        self.store_id = match get(STATE_STORE_ID)? {
            0 => {
                // A store made before it had an id, or a new one.
                let id = rand::random::<u64>() >> 1 | 1;
                self.conn
                    .execute(SQL_STATE_PUT, params![STATE_STORE_ID, id as i64])?;
                id
            }
            id => id,
        };
        self.acks.commit_seq = get(STATE_COMMIT)?;
        self.acks.conn_seq = get(STATE_CONN)?;
        self.acks.moot_below = get(STATE_MOOT)?;
        let rows: Vec<(i64, i64)> = self
            .conn
            .prepare("SELECT conn, gen FROM ack_confirmed")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        self.acks.confirmed = rows
            .into_iter()
            .map(|(c, g)| (c.max(0) as u64, g.max(0) as u64))
            .collect();
        Ok(())
    }

    /// Finds (or adds) each configured topic's row in `destinations`.
    fn map_destinations(&mut self) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        let mut dests = Vec::new();
        for d in &self.layout.dests {
            let stream = &self.layout.streams[d.stream].name;
            let found: Option<(i64, i64, String, String, i64)> = tx
                .query_row(
                    "SELECT id, next_seq, stream, role, horizon FROM destinations WHERE topic = ?1",
                    [&d.topic],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()?;
            let (id, next_seq, horizon) = match found {
                Some((id, next, old_stream, old_role, horizon)) => {
                    // Written only when it changed: a start on a full disk
                    // must not need to write.
                    if old_stream != *stream || old_role != d.role.as_str() {
                        tx.execute(
                            "UPDATE destinations SET stream = ?2, role = ?3 WHERE id = ?1",
                            params![id, stream, d.role.as_str()],
                        )?;
                    }
                    (id, next, horizon)
                }
                None => {
                    let id: i64 = tx.query_row(
                        "SELECT COALESCE(MAX(id), 0) + 1 FROM destinations",
                        [],
                        |r| r.get(0),
                    )?;
                    if id as u64 > schema::MAX_DEST_ID {
                        return Err(rusqlite::Error::IntegralValueOutOfRange(0, id));
                    }
                    tx.execute(
                        "INSERT INTO destinations (id, topic, next_seq, stream, role, horizon) VALUES (?1, ?2, 1, ?3, ?4, 0)",
                        params![id, d.topic, stream, d.role.as_str()],
                    )?;
                    (id, 1, 0)
                }
            };
            dests.push(Dest {
                id: id as u64,
                next_seq: next_seq as u64,
                horizon: horizon as u64,
                ..Dest::default()
            });
        }
        tx.commit()?;
        self.dests = dests;
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
        let stored_at = self.clock.now_ms();
        let gen = self.acks.commit_seq + 1;
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
            if msg.dup && msg.pkid != 0 && seen_before(&tx, &self.acks, msg)? {
                counts.redelivered += 1;
                out.acks.extend(msg.ack);
                continue;
            }
            let topic = topic_key(&msg.mqtt_topic);
            let digest = payload_digest(&msg.payload, msg.size());
            if msg.retain && last_on_topic(&tx, topic)? == Some(digest) {
                // A retained state the broker sent again at a subscription,
                // unchanged since it was stored (live or retained).
                counts.retained_unchanged += 1;
                out.acks.extend(msg.ack);
                continue;
            }
            if let Some(reason) = dead_letter_reason(msg, max_payload) {
                let keep = &msg.payload[..msg.payload.len().min(DEAD_LETTER_KEEP_BYTES)];
                tx.prepare_cached(SQL_DEAD_LETTER)?.execute(params![
                    now as i64,
                    msg.mqtt_topic,
                    reason,
                    msg.size() as i64,
                    keep
                ])?;
                if msg.pkid != 0 {
                    seen_put(&tx, &self.acks, msg, gen)?;
                }
                set_last_on_topic(&tx, topic, digest)?;
                tracing::warn!(mqtt_topic = %msg.mqtt_topic.escape_debug(), size = msg.size(), %reason, "message dead-lettered");
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
                seen_put(&tx, &self.acks, msg, gen)?;
            }
            set_last_on_topic(&tx, topic, digest)?;
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
                    &props,
                    stored_at as i64,
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
        for (d, new) in dests.iter_mut().enumerate() {
            if new.next_seq != self.dests[d].next_seq {
                // A live session may send these at once: the horizon moves
                // with the commit that numbered them.
                if new.live {
                    new.horizon = new.next_seq - 1;
                }
                tx.prepare_cached(SQL_SET_NEXT_SEQ)?.execute(params![
                    new.id as i64,
                    new.next_seq as i64,
                    new.horizon as i64
                ])?;
            }
        }
        counts.write(&tx)?;
        write_shed(&tx, &self.layout, &out.shed)?;
        save_state(&tx, &self.acks, gen, stored_at)?;
        tx.commit()?;
        self.acks.commit_seq = gen;
        self.acks.unsaved.clear();
        self.dests = dests;
        self.rearm = rearm;
        self.stuck = stuck;
        out.stored = counts.stored as u64;
        out.dead_lettered = counts.dead_lettered as u64;
        out.redelivered = counts.redelivered as u64;
        out.retained_unchanged = counts.retained_unchanged as u64;
        for a in &mut out.acks {
            a.gen = gen;
        }
        Ok(out)
    }

    /// Writes the clock and the acknowledgement state in a transaction of
    /// their own (when no commit carried them for a while).
    pub fn save_state_now(&mut self) -> Result<(), StoreError> {
        let clock = self.clock.now_ms();
        let tx = self.conn.transaction()?;
        save_state(&tx, &self.acks, self.acks.commit_seq, clock)?;
        tx.commit()?;
        self.acks.unsaved.clear();
        Ok(())
    }

    /// Ingest connected to the MQTT broker (connection `epoch` of this
    /// process): it gets a lasting connection number; when the broker lost
    /// the session, no earlier message is redelivered, so every earlier
    /// redelivery row is moot.
    pub fn new_connection(&mut self, epoch: u64, session_present: bool) {
        self.acks.conn_seq += 1;
        let conn = self.acks.conn_seq;
        self.acks.conn_of_epoch.insert(epoch, conn);
        if !session_present {
            self.acks.moot_below = conn;
        }
    }

    /// The broker processed the acks of every commit up to `gen` sent on
    /// connection `epoch` (ingest saw the answer to a request it sent after
    /// them).
    pub fn acks_confirmed(&mut self, epoch: u64, gen: u64) {
        let conn = self.acks.conn(epoch);
        if conn == 0 {
            return;
        }
        let e = self.acks.confirmed.entry(conn).or_default();
        if gen > *e {
            *e = gen;
            self.acks.unsaved.push((conn, gen));
        }
    }

    /// Whether confirmations or the clock wait to be written.
    pub fn state_unsaved(&self) -> bool {
        !self.acks.unsaved.is_empty()
    }

    /// The commit number the next commit's rows carry (acks name it).
    pub fn next_gen(&self) -> u64 {
        self.acks.commit_seq + 1
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    #[cfg(test)]
    pub fn advance_clock(&mut self, ms: u64) {
        self.clock.skew_ms += ms;
    }

    /// When (store clock) the oldest pending record of a destination was
    /// stored.
    pub fn oldest_stored_at(&self, d: DestIx) -> Result<Option<u64>, StoreError> {
        let (lo, hi) = self.dests[d].range(0);
        Ok(self
            .conn
            .prepare_cached(SQL_OLDEST)?
            .query_row([lo, hi], |r| r.get::<_, i64>(0))
            .optional()?
            .map(|v| v.max(0) as u64))
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
        drop(stmt);
        if let Some(last) = recs.last() {
            if last.seq > self.dests[d].horizon {
                // Only a session that resumed fetches, and resuming moved
                // the horizon over everything committed; kept as a guard:
                // nothing may be sent above the horizon on disk.
                let mut dest = self.dests[d].clone();
                dest.horizon = dest.next_seq - 1;
                self.durable(|tx| {
                    tx.execute(
                        "UPDATE destinations SET horizon = ?2 WHERE id = ?1",
                        [dest.id as i64, dest.horizon as i64],
                    )?;
                    Ok(())
                })?;
                self.dests[d].horizon = dest.horizon;
            }
            let dest = &mut self.dests[d];
            dest.fetched = dest.fetched.max(last.seq);
        }
        Ok(recs)
    }

    /// Runs `f` in a transaction that reaches the disk before this returns,
    /// also with `durability = "interval"`.
    fn durable(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let interval = matches!(self.durability, Durability::Interval(_));
        if interval {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        let result = (|| {
            let tx = self.conn.transaction()?;
            f(&tx)?;
            tx.commit()?;
            Ok(())
        })();
        if interval {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        }
        result
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
    ///
    /// Only records at or below the horizon can be among them: those the
    /// broker holds are dropped unsent (skipped). Records above the horizon
    /// were never handed to a session; if the broker names numbers at or
    /// above them (the store was replaced, rolled back by a power cut in
    /// `interval` mode or a restored copy, or another producer uses the
    /// name), they are numbered above the broker's, in order, rather than be
    /// deduplicated away. A number that cannot be honoured below
    /// [`SEQ_LIMIT`] is refused and changes nothing. Once resumed, every
    /// pending record may be sent: the horizon moves over all of them, in a
    /// transaction that reaches the disk first.
    pub fn resume(
        &mut self,
        d: DestIx,
        last_sequence_id: i64,
    ) -> Result<ResumeOutcome, StoreError> {
        self.dests[d].fetched = 0;
        // Work on a copy: memory changes only once the commit succeeded.
        let mut dest = self.dests[d].clone();
        let (_, hi) = dest.range(0);
        let mut outcome = ResumeOutcome::default();
        let mut skip_to = 0;
        if last_sequence_id >= 0 {
            let last = last_sequence_id as u64;
            let (above_lo, _) = dest.range(dest.horizon);
            let lowest_unsent: Option<i64> = self.conn.query_row(
                "SELECT MIN(key) FROM outbox WHERE key > ?1 AND key <= ?2",
                [above_lo, hi],
                |r| r.get(0),
            )?;
            let delta = match lowest_unsent.map(|k| seq_of(k as u64)) {
                Some(low) if low <= last => last + 1 - low,
                _ => 0,
            };
            let next = (dest.next_seq + delta).max(last.saturating_add(1));
            if last >= SEQ_LIMIT || next > SEQ_MAX {
                return Err(self.refuse(d, last_sequence_id));
            }
            skip_to = last.min(dest.horizon);
            outcome.renumbered_by = delta;
            dest.next_seq = next;
        }
        let old_horizon = dest.horizon;
        dest.horizon = dest.next_seq - 1;
        let mut skipped = (0, 0);
        let delta = outcome.renumbered_by;
        self.durable(|tx| {
            if skip_to > 0 {
                skipped = delete_upto(tx, &dest, skip_to)?;
                Counts {
                    skipped: skipped.0 as i64,
                    ..Counts::default()
                }
                .write(tx)?;
            }
            if delta > 0 {
                // Everything above the old horizon moves up, in order; two
                // steps, so that no key collides on the way (no key is
                // negative: checked at open).
                let (above, hi) = dest.range(old_horizon);
                tx.execute(
                    "UPDATE outbox SET key = -(key + ?3) WHERE key > ?1 AND key <= ?2",
                    params![above, hi, delta as i64],
                )?;
                tx.execute("UPDATE outbox SET key = -key WHERE key < 0", [])?;
            }
            tx.execute(
                "UPDATE destinations SET next_seq = ?2, horizon = ?3 WHERE id = ?1",
                params![dest.id as i64, dest.next_seq as i64, dest.horizon as i64],
            )?;
            Ok(())
        })?;
        dest.records = dest.records.saturating_sub(skipped.0);
        dest.bytes = dest.bytes.saturating_sub(skipped.1);
        dest.live = true;
        outcome.skipped = skipped.0;
        self.dests[d] = dest;
        self.remember_horizons();
        Ok(outcome)
    }

    /// A copy of every destination's horizon beside the store (written at
    /// open and after each resume, before anything is sent), for
    /// [`Db::recall_horizons`].
    fn remember_horizons(&self) {
        let mut text = format!("{:x}\n", self.store_id);
        for (d, spec) in self.dests.iter().zip(&self.layout.dests) {
            text.push_str(&format!("{} {}\n", d.horizon, spec.topic));
        }
        let tmp = self.horizons_file.with_extension("horizons.tmp");
        let written = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.horizons_file)
        })();
        if let Err(e) = written {
            tracing::warn!(error = %e, file = %self.horizons_file.display(),
                "cannot write the copy of the store's horizons (it only matters if an older copy of the store is ever restored)");
        }
    }

    /// A store restored from an older copy (the database file put back) has
    /// the horizons of when the copy was taken, while the store it was
    /// copied from may have sent more since. The horizons file beside it
    /// says what that store had handed to a session; for the same store
    /// (same id) a higher horizon is taken over, up to the records the
    /// copy holds, so that those are skipped if the broker holds them
    /// rather than sent twice; what the copy numbers after it was put back
    /// is never covered (the file is rewritten at every open). A new store
    /// (another id) ignores the file; a power cut never makes it apply (it
    /// is written only after the store's own horizon reached the disk).
    fn recall_horizons(&mut self) -> Result<(), rusqlite::Error> {
        let Ok(text) = std::fs::read_to_string(&self.horizons_file) else {
            return Ok(());
        };
        let mut lines = text.lines();
        if lines.next().and_then(|l| u64::from_str_radix(l, 16).ok()) != Some(self.store_id) {
            return Ok(());
        }
        let remembered: HashMap<&str, u64> = lines
            .filter_map(|l| {
                let (h, topic) = l.split_once(' ')?;
                Some((topic, h.parse().ok()?))
            })
            .collect();
        let tx = self.conn.transaction()?;
        let mut raised = Vec::new();
        for (d, spec) in self.dests.iter_mut().zip(&self.layout.dests) {
            let Some(h) = remembered.get(spec.topic.as_str()) else {
                continue;
            };
            let h = (*h).min(d.next_seq - 1);
            if h > d.horizon {
                tx.execute(
                    "UPDATE destinations SET horizon = ?2 WHERE id = ?1",
                    [d.id as i64, h as i64],
                )?;
                raised.push((spec.topic.clone(), d.horizon, h));
                d.horizon = h;
            }
        }
        tx.commit()?;
        for (topic, from, to) in raised {
            tracing::warn!(%topic, from, to,
                "the store is an older copy of itself (restored?): records up to {to} may have been sent since the copy was made; the ones the broker holds are skipped");
        }
        Ok(())
    }

    /// The error for a broker number that cannot be honoured; an incident
    /// the first time for this destination.
    fn refuse(&mut self, d: DestIx, last_sequence_id: i64) -> StoreError {
        let topic = self.layout.dests[d].topic.clone();
        let err = StoreError::SequenceRefused {
            topic,
            last_sequence_id,
            pending: self.dests[d].records,
        };
        if self.refused.insert(d) {
            let _ = self.incident("sequence-refused", &err.to_string());
        }
        err
    }

    /// Drops what is older than each stream's `max_age_secs` (never a
    /// device's newest state), by the store's clock.
    pub fn shed_aged(&mut self) -> Result<Shed, StoreError> {
        let now_ms = self.clock.now_ms();
        let mut total = Shed::default();
        for s in 0..self.layout.streams.len() {
            let Some(cutoff) = self.layout.streams[s].limits.age_cutoff_ms(now_ms) else {
                continue;
            };
            let oldest = self.layout.streams[s]
                .dests
                .iter()
                .map(|d| self.oldest_stored_at(*d))
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

    /// Writes the agent's snapshot for `ferry status`, with the store's
    /// clock and acknowledgement state, in one transaction.
    pub fn write_snapshot(&mut self, json: &str) -> Result<(), StoreError> {
        let clock = self.clock.now_ms();
        let tx = self.conn.transaction()?;
        tx.execute(SQL_AGENT_PUT, [json])?;
        save_state(&tx, &self.acks, self.acks.commit_seq, clock)?;
        tx.commit()?;
        self.acks.unsaved.clear();
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
                Rule::StoredBefore(cutoff),
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
            let stored_at = r.get::<_, i64>(2)?.max(0) as u64;
            if protected.contains(&k) {
                open_run = false;
                continue;
            }
            let take = match rule {
                Rule::Superseded => true,
                Rule::Oldest(need) => freed.records < need.records || freed.bytes < need.bytes,
                Rule::StoredBefore(cutoff) => stored_at < cutoff,
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
            ("retained_unchanged", self.retained_unchanged),
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

/// Whether a DUP message is the broker's redelivery of the last message
/// stored under its packet id: the same topic and payload, and the ack of
/// that message not known to have reached the broker (once it did, the
/// broker may use the packet id again, for a message that happens to be
/// byte-identical).
fn seen_before(tx: &Transaction<'_>, acks: &Acks, msg: &Inbound) -> Result<bool, StoreError> {
    let seen: Option<(i64, i64, i64)> = tx
        .prepare_cached(SQL_SEEN_GET)?
        .query_row([msg.pkid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(match seen {
        None => false,
        Some((d, conn, gen)) => {
            d == digest(msg) && !acks.is_confirmed(conn.max(0) as u64, gen.max(0) as u64)
        }
    })
}

fn seen_put(tx: &Transaction<'_>, acks: &Acks, msg: &Inbound, gen: u64) -> Result<(), StoreError> {
    let conn = msg.ack.map_or(0, |a| acks.conn(a.epoch));
    tx.prepare_cached(SQL_SEEN_PUT)?.execute(params![
        msg.pkid,
        digest(msg),
        conn as i64,
        gen as i64
    ])?;
    Ok(())
}

/// The digest of the last message stored (or dead-lettered) on a topic.
fn last_on_topic(tx: &Transaction<'_>, topic: i64) -> Result<Option<i64>, StoreError> {
    Ok(tx
        .prepare_cached(SQL_TOPIC_LAST_GET)?
        .query_row([topic], |r| r.get(0))
        .optional()?)
}

fn set_last_on_topic(tx: &Transaction<'_>, topic: i64, digest: i64) -> Result<(), StoreError> {
    tx.prepare_cached(SQL_TOPIC_LAST_PUT)?
        .execute([topic, digest])?;
    Ok(())
}

/// Writes the clock and the acknowledgement state inside `tx`, with
/// `commit_seq` as the last commit.
fn save_state(
    tx: &Transaction<'_>,
    acks: &Acks,
    commit_seq: u64,
    clock: u64,
) -> Result<(), StoreError> {
    let mut put = tx.prepare_cached(SQL_STATE_PUT)?;
    put.execute(params![STATE_CLOCK, clock as i64])?;
    put.execute(params![STATE_COMMIT, commit_seq as i64])?;
    put.execute(params![STATE_CONN, acks.conn_seq as i64])?;
    put.execute(params![STATE_MOOT, acks.moot_below as i64])?;
    if !acks.unsaved.is_empty() {
        let mut stmt = tx.prepare_cached(SQL_ACK_CONFIRMED_PUT)?;
        for (conn, gen) in &acks.unsaved {
            stmt.execute(params![*conn as i64, *gen as i64])?;
        }
        let keep_from = acks.conn_seq.saturating_sub(ACK_CONNS_KEPT);
        tx.prepare_cached("DELETE FROM ack_confirmed WHERE conn < ?1")?
            .execute([keep_from as i64])?;
    }
    Ok(())
}

/// Why a message can never be forwarded, if it cannot.
pub fn dead_letter_reason(msg: &Inbound, max_payload: usize) -> Option<String> {
    let size = msg.size();
    match (&msg.stream, &msg.device, msg.guarded) {
        (_, _, Some(Guarded::TopicNotUtf8)) => Some("topic is not valid UTF-8".to_string()),
        (None, _, _) => Some("topic matches no stream's subscription".to_string()),
        (_, None, _) => Some("no device id in topic".to_string()),
        (_, _, Some(Guarded::Cut { .. })) => Some(format!(
            "payload of {size} bytes exceeds store.max_payload_bytes ({max_payload}); only its first {} bytes were read",
            msg.payload.len()
        )),
        _ if size > max_payload as u64 => Some(format!(
            "payload of {size} bytes exceeds store.max_payload_bytes ({max_payload})"
        )),
        _ => None,
    }
}

/// About how many bytes of the store a message will take: a dead letter
/// keeps at most [`DEAD_LETTER_KEEP_BYTES`] of its payload; a record is
/// stored once per destination of its stream, on pages that are not filled
/// to the last byte.
pub fn stored_size(layout: &Layout, msg: &Inbound, max_payload: usize) -> u64 {
    let overhead = msg.mqtt_topic.len() as u64 + 64;
    if dead_letter_reason(msg, max_payload).is_some() {
        return (msg.payload.len().min(DEAD_LETTER_KEEP_BYTES) as u64 + overhead) * 3 / 2;
    }
    let dests = msg.stream.map_or(0, |s| layout.streams[s].dests.len()) as u64;
    (msg.payload.len() as u64 + overhead) * 3 / 2 * dests
}

/// Fingerprint of a message for redelivery detection: CRC32C of the
/// payload, and CRC32C of the topic mixed with the payload's length.
fn digest(msg: &Inbound) -> i64 {
    payload_digest(&msg.payload, msg.size()) ^ i64::from(crc32c::crc32c(msg.mqtt_topic.as_bytes()))
}

/// Fingerprint of a payload (as much of it as was read) and its size.
fn payload_digest(payload: &[u8], size: u64) -> i64 {
    ((crc32c::crc32c(payload) as i64) << 32) | (size as i64 & 0xffff_ffff)
}

/// A 64-bit key for a topic (two CRC32Cs with different seeds).
fn topic_key(topic: &str) -> i64 {
    let a = crc32c::crc32c(topic.as_bytes());
    let b = crc32c::crc32c_append(0x9e37_79b9, topic.as_bytes());
    ((a as i64) << 32) | b as i64
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
