//! The store's SQL. Runs on the store thread only. This file: the group
//! commit, record numbering per destination, fetching and deleting, and the
//! backlog accounting; by concern:
//!
//! - [`schema`]: the schema's versions, migrations and damage checks;
//! - `open`: opening, the in-memory mirror, moving a damaged store aside;
//! - `redelivery`: what the MQTT broker sends again (DUP, retained);
//! - `shedding`: overflow policies, age limits, emergency shedding;
//! - `horizon`: resuming on the broker's `last_sequence_id`.
//!
//! # Keys
//!
//! A pending record lives in `outbox` under the key
//! `destination id << 48 | record number`: one table, one B-tree without a
//! second index, and every destination's backlog is one contiguous key
//! range in record order. Record numbers are per destination (each topic has
//! its own producer and `sequence_id`s) and stay below 2^48.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction};

mod dead_letters;
mod desired;
mod horizon;
mod open;
mod redelivery;
pub mod schema;
mod shedding;

pub use desired::{
    desired_reject_reason, parse_version, Desired, DesiredOutcome, DesiredUpdate, DownlinkStart,
};
pub use horizon::{forgotten_detail, INCIDENT_DEDUP};
pub use open::{utc_stamp, Damaged, PAGE_SIZE};
pub use shedding::Shed;

use dead_letters::{dead_letter, dead_letter_raw};
pub use dead_letters::{Pruned, DEAD_LETTER_KEEP_BYTES};
use redelivery::{forget_seen, remember, save_state, screen, Acks, Origin, Screened};
use shedding::{write_shed, Pressure};

use super::{
    AckToken, Forgotten, Guarded, Inbound, Record, RecordProps, ResumeOutcome, StoreError,
};
use crate::config::{DeadLetterLimits, Durability, Overflow};
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

const SQL_INSERT: &str = "INSERT INTO outbox (key, device, received_ms, payload, props, stored_at)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const SQL_FETCH: &str = "SELECT key, device, received_ms, payload, props FROM outbox
     WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT ?3";
const SQL_DELETE_UPTO: &str =
    "DELETE FROM outbox WHERE key > ?1 AND key <= ?2 RETURNING LENGTH(payload)";
const SQL_COUNT_RANGE: &str =
    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox WHERE key > ?1 AND key <= ?2";
const SQL_OLDEST: &str =
    "SELECT stored_at FROM outbox WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT 1";
const SQL_NEWEST: &str =
    "SELECT stored_at FROM outbox WHERE key > ?1 AND key <= ?2 ORDER BY key DESC LIMIT 1";
const SQL_SET_NEXT_SEQ: &str = "UPDATE destinations SET next_seq = ?2, horizon = ?3 WHERE id = ?1";
const SQL_COUNTER_ADD: &str = "INSERT INTO counters (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value";
const SQL_STATE_GET: &str = "SELECT value FROM store_state WHERE name = ?1";
const SQL_STATE_PUT: &str = "INSERT INTO store_state (name, value) VALUES (?1, ?2)
     ON CONFLICT(name) DO UPDATE SET value = excluded.value";
const SQL_AGENT_PUT: &str = "INSERT OR REPLACE INTO agent (id, snapshot) VALUES (1, ?1)";
const SQL_INCIDENT: &str = "INSERT INTO incidents (at_ms, kind, detail) VALUES (?1, ?2, ?3)";

/// `store_state` names.
const STATE_CLOCK: &str = "clock_ms";
const STATE_COMMIT: &str = "commit_seq";
const STATE_CONN: &str = "conn_seq";
/// A random number given to a store when it is made: a copy has the same,
/// a new store (the old one deleted or moved aside) another.
const STATE_STORE_ID: &str = "store_id";

/// `store_state` names per destination: the highest record number the
/// broker confirmed, and when (store clock): a broker that later names no
/// record of the producer has forgotten it ([`Forgotten`]).
fn state_confirmed(dest_id: u64) -> String {
    format!("confirmed_seq:{dest_id}")
}

fn state_confirmed_at(dest_id: u64) -> String {
    format!("confirmed_at:{dest_id}")
}

/// The same moment on the wall clock: the store's clock stands still while
/// ferry is not running, the broker's does not.
fn state_confirmed_wall(dest_id: u64) -> String {
    format!("confirmed_wall:{dest_id}")
}

/// The broker confirmed destination `dest_id`'s records up to `up_to` at
/// `at` (store clock): every path that deletes delivered records says so.
fn record_confirmed(
    tx: &Transaction<'_>,
    dest_id: u64,
    up_to: u64,
    at: u64,
) -> Result<(), StoreError> {
    let mut put = tx.prepare_cached(SQL_STATE_PUT)?;
    put.execute(params![state_confirmed(dest_id), up_to as i64])?;
    put.execute(params![state_confirmed_at(dest_id), at as i64])?;
    put.execute(params![state_confirmed_wall(dest_id), now_ms() as i64])?;
    Ok(())
}

/// A number of `store_state`, if written.
fn state_get(conn: &Connection, name: &str) -> Result<Option<i64>, rusqlite::Error> {
    conn.query_row(SQL_STATE_GET, [name], |r| r.get(0))
        .optional()
}

/// `store_state` name per destination: 1 while it is held because its
/// cluster lost records it confirmed (`Db::lost_by_cluster`).
fn state_held(dest_id: u64) -> String {
    format!("held:{dest_id}")
}

/// `store_state` name per destination: 1 while the broker's last answer
/// said deduplication is off ([`Forgotten`]), 0 once it named a record
/// again (`ferry status` and `ferry check --online` read it).
pub(crate) const STATE_DEDUP_OFF: &str = "dedup_off:";

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
    /// `n` records of `bytes` left the destination.
    fn remove(&mut self, n: u64, bytes: u64) {
        self.records = self.records.saturating_sub(n);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

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
    /// Old dead letters pruned to make room (`store.dead_letters_*`).
    pub pruned: Pruned,
}

/// The broker confirmed every record of `dest` up to `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub dest: DestIx,
    pub up_to: u64,
    /// How many of them were sent more than once.
    pub resent: u64,
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
    /// Per stream: when a stream over its limits sheds again.
    pressure: Pressure,
    /// Destinations whose broker number was refused (one incident each).
    refused: HashSet<DestIx>,
    /// `store_state.store_id`.
    store_id: u64,
    /// `<store>.horizons`, see [`Db::recall_horizons`].
    horizons_file: PathBuf,
    /// The bounds of the dead-letter table.
    dead_letter_limits: DeadLetterLimits,
}

/// Whether an SQLite error means the disk (or the file system's quota) is
/// full.
pub fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

impl Db {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// New limits and policies (configuration reload); the destinations stay.
    pub fn set_layout(&mut self, layout: Layout) {
        debug_assert_eq!(layout.dests, self.layout.dests);
        self.pressure = Pressure::new(layout.streams.len());
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
    /// `forget`: packet ids (with their MQTT session) of messages received
    /// but not stored (the broker
    /// redelivers them): their `mqtt_seen` rows describe an older message
    /// and must not make the redelivery look like a duplicate. On error
    /// nothing changed and all can be tried again.
    pub fn commit_batch(
        &mut self,
        deliveries: &[Delivery],
        forget: &[(usize, u16)],
        batch: &[Inbound],
        max_payload: usize,
    ) -> Result<BatchOutcome, StoreError> {
        self.commit_with(deliveries, forget, batch, Origin::Mqtt, max_payload, |_| {
            Ok(())
        })
    }

    /// [`Db::commit_batch`], with `more` written in the same transaction.
    fn commit_with(
        &mut self,
        deliveries: &[Delivery],
        forget: &[(usize, u16)],
        batch: &[Inbound],
        origin: Origin,
        max_payload: usize,
        more: impl FnOnce(&Transaction<'_>) -> Result<(), StoreError>,
    ) -> Result<BatchOutcome, StoreError> {
        let now = now_ms();
        let stored_at = self.clock.now_ms();
        let gen = self.acks.commit_seq + 1;
        let mut out = BatchOutcome::default();
        let mut counts = Counts::default();
        // Work on copies, so that a failed transaction leaves no trace.
        let mut dests = self.dests.clone();
        let mut pressure = self.pressure.clone();
        let mut parking = vec![false; self.layout.streams.len()];
        let tx = self.conn.transaction()?;
        forget_seen(&tx, &self.acks, forget)?;
        // Deletions first: their room is there for the batch.
        for d in deliveries {
            let (n, bytes) = delete_upto(&tx, &dests[d.dest], d.up_to)?;
            record_confirmed(&tx, dests[d.dest].id, d.up_to, stored_at)?;
            dests[d.dest].remove(n, bytes);
            counts.delivered += n as i64;
            counts.resent += d.resent as i64;
            out.delivered += n;
        }
        for (i, msg) in batch.iter().enumerate() {
            if !msg.counted {
                counts.received += 1;
            }
            let screened = match origin {
                Origin::Mqtt => screen(&tx, &self.acks, msg)?,
                Origin::Ferry => Screened::Made,
            };
            // What `screen` will need to know it again (nothing for what
            // ferry made: no broker sends it again).
            let seen = match screened {
                Screened::Redelivered => {
                    counts.redelivered += 1;
                    out.acks.extend(msg.ack);
                    continue;
                }
                Screened::RetainedUnchanged => {
                    counts.retained_unchanged += 1;
                    out.acks.extend(msg.ack);
                    continue;
                }
                Screened::New { topic, digest } => Some((topic, digest)),
                Screened::Made => None,
            };
            if let Some(reason) = dead_letter_reason(msg, max_payload) {
                dead_letter(&tx, msg, &reason, now)?;
                remember(&tx, &self.acks, msg, gen, seen)?;
                counts.dead_lettered += 1;
                out.acks.extend(msg.ack);
                continue;
            }
            let s = msg
                .stream
                .expect("a message without a stream is a dead letter");
            let spec = &self.layout.streams[s];
            if spec.overflow == Overflow::Reject && (parking[s] || reject_full(spec, &dests, msg)) {
                // Held back: neither stored nor acknowledged, and nothing
                // of its stream overtakes it in this batch.
                parking[s] = true;
                out.parked.push(i);
                continue;
            }
            remember(&tx, &self.acks, msg, gen, seen)?;
            insert_record(&tx, &self.layout, &mut dests, s, msg, now, stored_at)?;
            counts.stored += 1;
            out.acks.extend(msg.ack);
            // Over a limit? The stream's policy applies now, record by
            // record, so that what is shed depends only on the order of
            // arrival.
            out.shed
                .merge(pressure.enforce(&tx, &self.layout, &mut dests, s)?);
        }
        write_numbers(&tx, &self.dests, &mut dests)?;
        more(&tx)?;
        if counts.dead_lettered > 0 {
            out.pruned = dead_letters::prune(&tx, &self.dead_letter_limits, now)?;
        }
        counts.write(&tx)?;
        write_shed(&tx, &self.layout, &out.shed)?;
        save_state(&tx, &self.acks, gen, stored_at)?;
        tx.commit()?;
        self.acks.commit_seq = gen;
        self.acks.saved();
        self.dests = dests;
        self.pressure = pressure;
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
        self.acks.saved();
        Ok(())
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
        let at = self.clock.now_ms();
        let tx = self.conn.transaction()?;
        let (n, bytes) = delete_upto(&tx, &self.dests[d], up_to)?;
        record_confirmed(&tx, self.dests[d].id, up_to, at)?;
        Counts {
            delivered: n as i64,
            resent: resent as i64,
            ..Counts::default()
        }
        .write(&tx)?;
        tx.commit()?;
        let dest = &mut self.dests[d];
        dest.remove(n, bytes);
        Ok(n)
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
        self.acks.saved();
        Ok(())
    }

    /// Records an event that `ferry status` shows.
    /// It goes to the audit trail as well (event = its kind).
    pub fn incident(&self, kind: &str, detail: &str) -> Result<(), StoreError> {
        crate::audit::Event::new("store-incident")
            .field("kind", kind)
            .field("detail", detail)
            .record();
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

/// Stores `msg` once per destination of stream `s`, each under its
/// destination's next record number.
fn insert_record(
    tx: &Transaction<'_>,
    layout: &Layout,
    dests: &mut [Dest],
    s: usize,
    msg: &Inbound,
    now: u64,
    stored_at: u64,
) -> Result<(), StoreError> {
    let props = postcard::to_allocvec(&RecordProps {
        mqtt_topic: msg.mqtt_topic.clone(),
        retain: msg.retain,
    })
    .expect("postcard encodes a plain struct");
    let device = msg.device.as_deref().unwrap_or_default();
    let len = msg.payload.len() as u64;
    for d in &layout.streams[s].dests {
        let dest = &mut dests[*d];
        if dest.next_seq > SEQ_MAX {
            return Err(StoreError::Exhausted(layout.dests[*d].name.clone()));
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
    Ok(())
}

/// Writes the record numbers a commit handed out. A live session may
/// send them at once: the horizon moves with the commit that numbered
/// them.
fn write_numbers(
    tx: &Transaction<'_>,
    before: &[Dest],
    dests: &mut [Dest],
) -> Result<(), StoreError> {
    for (d, new) in dests.iter_mut().enumerate() {
        if new.next_seq == before[d].next_seq {
            continue;
        }
        if new.live {
            new.horizon = new.next_seq - 1;
        }
        tx.prepare_cached(SQL_SET_NEXT_SEQ)?.execute(params![
            new.id as i64,
            new.next_seq as i64,
            new.horizon as i64
        ])?;
    }
    Ok(())
}

/// Whether a `reject` stream is too full for `msg`. A stream with nothing
/// pending takes a record even when that alone is over its limits, or it
/// would wait forever.
fn reject_full(spec: &StreamSpec, dests: &[Dest], msg: &Inbound) -> bool {
    let u = stream_usage(spec, dests);
    let len = msg.payload.len() as u64;
    u.records > 0 && spec.limits.full_for(u, len * spec.dests.len() as u64)
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

pub fn now_ms() -> u64 {
    crate::status::now_ms()
}
