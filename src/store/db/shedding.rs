//! Shedding: the overflow policies (coalesce, drop_oldest), age limits and
//! emergency shedding under disk pressure. A device's newest pending state
//! is never shed; what was shed is counted per stream and reason.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, Transaction};

use super::*;

/// Under disk pressure, shed in transactions of at most this many records,
/// each followed by a checkpoint, so that the WAL stays small.
pub(super) const EMERGENCY_CHUNK: usize = 2_000;

pub(super) const SQL_DELETE_RANGE: &str = "DELETE FROM outbox WHERE key >= ?1 AND key <= ?2";

pub(super) const SQL_DEVICES: &str = "SELECT key, device FROM outbox WHERE key > ?1 AND key <= ?2";

pub(super) const SQL_SCAN: &str = "SELECT key, LENGTH(payload), stored_at FROM outbox
     WHERE key > ?1 AND key <= ?2 ORDER BY key";

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

    pub(super) fn merge(&mut self, other: Shed) {
        for (k, v) in other.superseded {
            *self.superseded.entry(k).or_default() += v;
        }
        for (k, v) in other.dropped {
            *self.dropped.entry(k).or_default() += v;
        }
    }
}

/// Per stream, when a stream over its limits sheds again.
#[derive(Debug, Clone)]
pub(super) struct Pressure {
    /// After a shed that left the stream over its limits, not before it
    /// reaches this again.
    rearm: Vec<Option<Usage>>,
    /// Shedding left only newest states and records in flight, still over
    /// the limit (warned once per episode).
    stuck: Vec<bool>,
}

impl Pressure {
    pub(super) fn new(streams: usize) -> Pressure {
        Pressure {
            rearm: vec![None; streams],
            stuck: vec![false; streams],
        }
    }

    /// Applies stream `s`'s overflow policy inside `tx` if the stream is
    /// over its limits (and, after a shed that could not get under them,
    /// has grown since). A `reject` stream never sheds.
    pub(super) fn enforce(
        &mut self,
        tx: &Transaction<'_>,
        layout: &Layout,
        dests: &mut [Dest],
        s: usize,
    ) -> Result<Shed, StoreError> {
        let spec = &layout.streams[s];
        let u = stream_usage(spec, dests);
        if !spec.limits.over(u) {
            self.rearm[s] = None;
            self.stuck[s] = false;
            return Ok(Shed::default());
        }
        let due = match self.rearm[s] {
            None => true,
            Some(r) => {
                (spec.limits.max_records.is_some() && u.records >= r.records)
                    || (spec.limits.max_bytes.is_some() && u.bytes >= r.bytes)
            }
        };
        if !due || spec.overflow == Overflow::Reject {
            return Ok(Shed::default());
        }
        let shed = shed_stream(tx, layout, dests, s, None)?;
        let after = stream_usage(spec, dests);
        if spec.limits.over(after) {
            self.rearm[s] = Some(layout::rearm(&spec.limits, after));
            if !self.stuck[s] {
                self.stuck[s] = true;
                tracing::warn!(stream = %spec.name, records = after.records, bytes = after.bytes,
                    "stream is over its limits with only each device's newest state (and records in flight) left; they are kept");
            }
        } else {
            self.rearm[s] = None;
        }
        Ok(shed)
    }
}

/// Which pending records of one destination a shed removes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Rule {
    /// Every record that a newer record of the same device supersedes.
    Superseded,
    /// The oldest, until this much is freed.
    Oldest(Usage),
    /// Those stored before this store-clock time.
    StoredBefore(u64),
}

/// Applies stream `s`'s policy (or, with `age_cutoff`, its age limit) to
/// `dests`, inside `tx`. History goes before status; a device's newest
/// pending state is never touched.
pub(super) fn shed_stream(
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
pub(super) fn protected_keys(
    conn: &Connection,
    dest: &Dest,
    role: Role,
) -> Result<HashSet<u64>, StoreError> {
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
pub(super) fn shed_dest(
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
    dest.remove(freed.records, freed.bytes);
    Ok(freed)
}

pub(super) fn write_shed(
    tx: &Transaction<'_>,
    layout: &Layout,
    shed: &Shed,
) -> Result<(), StoreError> {
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

impl Db {
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
}
