//! The dead-letter table: what can never be forwarded (or, for the
//! downlink, never applied), kept for inspection with at most
//! [`DEAD_LETTER_KEEP_BYTES`] of its payload, and bounded by
//! `store.dead_letters_*` ([`DeadLetterLimits`]): past a bound the oldest
//! go first. The lifetime counters (`dead_lettered`,
//! `desired_dead_lettered`) keep counting what was pruned, and
//! `dead_letters_pruned` / `dead_letters_pruned_bytes` say how much was.
//!
//! Age is judged by the wall clock a letter was received at: a clock set
//! years forward prunes early (what is kept is diagnostics, never a record
//! ferry promised to deliver; the counters still count it).

use rusqlite::{params, Transaction};

use super::{Db, Inbound, StoreError, SQL_COUNTER_ADD};
use crate::config::DeadLetterLimits;

/// How much of a dead letter's payload is kept.
pub const DEAD_LETTER_KEEP_BYTES: usize = 64 * 1024;

const SQL_DEAD_LETTER: &str =
    "INSERT INTO dead_letters (received_ms, mqtt_topic, reason, size, payload)
     VALUES (?1, ?2, ?3, ?4, ?5)";
const SQL_PRUNE_AGED: &str =
    "DELETE FROM dead_letters WHERE received_ms < ?1 RETURNING LENGTH(payload)";
/// The newest letter past the count or the byte bound, counting from the
/// newest: it and everything older go.
const SQL_PRUNE_FROM: &str = "SELECT id FROM (
         SELECT id, ROW_NUMBER() OVER w AS n, SUM(LENGTH(payload)) OVER w AS b
         FROM dead_letters WINDOW w AS (ORDER BY id DESC))
     WHERE n > ?1 OR b > ?2 ORDER BY id DESC LIMIT 1";
const SQL_PRUNE_UPTO: &str = "DELETE FROM dead_letters WHERE id <= ?1 RETURNING LENGTH(payload)";

/// What one pruning removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub letters: u64,
    /// Payload bytes (as kept) removed.
    pub bytes: u64,
}

/// Keeps a message that can never be forwarded.
pub(super) fn dead_letter(
    tx: &Transaction<'_>,
    msg: &Inbound,
    reason: &str,
    now: u64,
) -> Result<(), StoreError> {
    dead_letter_raw(tx, &msg.mqtt_topic, reason, msg.size(), &msg.payload, now)?;
    tracing::warn!(mqtt_topic = %msg.mqtt_topic.escape_debug(), size = msg.size(), %reason, "message dead-lettered");
    Ok(())
}

/// A dead letter from `source` (an MQTT topic, or a Pulsar topic and key)
/// of `size` bytes, of which at most [`DEAD_LETTER_KEEP_BYTES`] are kept.
pub(super) fn dead_letter_raw(
    tx: &Transaction<'_>,
    source: &str,
    reason: &str,
    size: u64,
    payload: &[u8],
    now: u64,
) -> Result<(), StoreError> {
    let keep = &payload[..payload.len().min(DEAD_LETTER_KEEP_BYTES)];
    tx.prepare_cached(SQL_DEAD_LETTER)?.execute(params![
        now as i64,
        source,
        reason,
        size as i64,
        keep
    ])?;
    Ok(())
}

/// Removes the dead letters past `limits` at wall-clock time `now_ms`,
/// oldest first, and counts them.
pub(super) fn prune(
    tx: &Transaction<'_>,
    limits: &DeadLetterLimits,
    now_ms: u64,
) -> Result<Pruned, StoreError> {
    let mut out = Pruned::default();
    let mut take = |stmt: &mut rusqlite::CachedStatement<'_>, arg: i64| {
        let lengths = stmt.query_map([arg], |r| r.get::<_, Option<i64>>(0))?;
        for len in lengths {
            out.letters += 1;
            out.bytes += len?.unwrap_or(0).max(0) as u64;
        }
        Ok::<_, rusqlite::Error>(())
    };
    let cutoff = now_ms.saturating_sub(limits.max_age.as_millis() as u64);
    take(&mut tx.prepare_cached(SQL_PRUNE_AGED)?, cutoff as i64)?;
    let from: Option<i64> = {
        let mut stmt = tx.prepare_cached(SQL_PRUNE_FROM)?;
        let mut rows = stmt.query(params![
            limits.max_count.min(i64::MAX as u64) as i64,
            limits.max_bytes.min(i64::MAX as u64) as i64
        ])?;
        match rows.next()? {
            Some(r) => Some(r.get(0)?),
            None => None,
        }
    };
    if let Some(id) = from {
        take(&mut tx.prepare_cached(SQL_PRUNE_UPTO)?, id)?;
    }
    if out.letters > 0 {
        let mut add = tx.prepare_cached(SQL_COUNTER_ADD)?;
        add.execute(params!["dead_letters_pruned", out.letters as i64])?;
        add.execute(params!["dead_letters_pruned_bytes", out.bytes as i64])?;
        tracing::debug!(
            letters = out.letters,
            bytes = out.bytes,
            "oldest dead letters pruned (store.dead_letters_*)"
        );
    }
    Ok(out)
}

impl Db {
    /// New bounds for the dead-letter table (at start and on reload); they
    /// apply at the next pruning.
    pub fn set_dead_letter_limits(&mut self, limits: DeadLetterLimits) {
        self.dead_letter_limits = limits;
    }

    /// Prunes the dead letters past their bounds now (in a transaction of
    /// its own): at start, after a reload, and now and then for their age.
    pub fn prune_dead_letters(&mut self) -> Result<Pruned, StoreError> {
        let limits = self.dead_letter_limits;
        let tx = self.conn.transaction()?;
        let out = prune(&tx, &limits, super::now_ms())?;
        tx.commit()?;
        Ok(out)
    }
}
