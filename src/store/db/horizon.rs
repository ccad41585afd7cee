//! Resuming a destination on the broker's `last_sequence_id`: the horizon
//! rule (skip only what a session may have sent, renumber what it never
//! saw) and the horizons file that protects restored copies of a store.

use std::collections::HashMap;

use rusqlite::params;

use super::*;

impl Db {
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
    ///
    /// A destination of one of several clusters whose broker lost records
    /// it confirmed is held instead ([`StoreError::ClusterLost`], see
    /// [`Db::lost_by_cluster`]).
    pub fn resume(
        &mut self,
        d: DestIx,
        last_sequence_id: i64,
    ) -> Result<ResumeOutcome, StoreError> {
        self.dests[d].fetched = 0;
        let released = self.lost_by_cluster(d, last_sequence_id)?;
        // Work on a copy: memory changes only once the commit succeeded.
        let mut dest = self.dests[d].clone();
        if let Some(copied_up_to) = released {
            // The refill copied records from the other clusters, under the
            // same numbers: the broker may hold any a session of theirs
            // had sent.
            dest.horizon = dest.horizon.max(copied_up_to).min(dest.next_seq - 1);
        }
        let (_, hi) = dest.range(0);
        let mut outcome = ResumeOutcome::default();
        let mut skip_to = 0;
        if last_sequence_id < 0 {
            outcome.forgotten = self.forgotten(d)?;
        }
        if outcome.forgotten.is_some() || last_sequence_id >= 0 {
            self.conn.execute(
                SQL_STATE_PUT,
                params![
                    format!("{STATE_DEDUP_OFF}{}", dest.id),
                    i64::from(outcome.forgotten.is_some())
                ],
            )?;
        }
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
            if released.is_some() {
                tx.execute(SQL_STATE_PUT, params![state_held(dest.id), 0])?;
            }
            Ok(())
        })?;
        dest.remove(skipped.0, skipped.1);
        dest.live = true;
        outcome.skipped = skipped.0;
        self.dests[d] = dest;
        self.remember_horizons();
        Ok(outcome)
    }

    /// A copy of every destination's horizon beside the store (written at
    /// open and after each resume, before anything is sent), for
    /// [`Db::recall_horizons`].
    pub(super) fn remember_horizons(&self) {
        let mut text = format!("{:x}\n", self.store_id);
        for (d, spec) in self.dests.iter().zip(&self.layout.dests) {
            text.push_str(&format!("{} {}\n", d.horizon, spec.name));
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
    pub(super) fn recall_horizons(&mut self) -> Result<(), rusqlite::Error> {
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
            let Some(h) = remembered.get(spec.name.as_str()) else {
                continue;
            };
            let h = (*h).min(d.next_seq - 1);
            if h > d.horizon {
                tx.execute(
                    "UPDATE destinations SET horizon = ?2 WHERE id = ?1",
                    [d.id as i64, h as i64],
                )?;
                raised.push((spec.name.clone(), d.horizon, h));
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

    /// The broker named no record for `d`'s producer: what it had confirmed
    /// to this store before, if anything (then it forgot). The first time
    /// for a topic is an incident, with the fix.
    fn forgotten(&mut self, d: DestIx) -> Result<Option<Forgotten>, StoreError> {
        let id = self.dests[d].id;
        let Some(confirmed) = state_get(&self.conn, &state_confirmed(id))?.filter(|c| *c > 0)
        else {
            return Ok(None);
        };
        let at = state_get(&self.conn, &state_confirmed_at(id))?
            .unwrap_or(0)
            .max(0) as u64;
        let forgotten = Forgotten {
            confirmed: confirmed as u64,
            idle_ms: self.clock.now_ms().saturating_sub(at),
        };
        let topic = self.layout.dests[d].name.clone();
        let known: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM incidents WHERE kind = ?1 AND detail LIKE ?2",
            params![INCIDENT_DEDUP, format!("{topic}:%")],
            |r| r.get(0),
        )?;
        if known == 0 {
            self.incident(INCIDENT_DEDUP, &forgotten_detail(&topic, &forgotten))?;
        }
        Ok(Some(forgotten))
    }

    /// Whether `d`'s cluster lost records it confirmed, when ferry writes
    /// the topic to several clusters: its broker names none of them (-1,
    /// although it confirmed some less than
    /// [`PRODUCER_FORGOTTEN_AFTER_MS`] ago on the store's clock and on the
    /// wall clock, so it cannot have forgotten an idle producer) or fewer
    /// than it confirmed. The records it lost are
    /// deleted from this store (every cluster confirmed them), so they can
    /// only come back from another cluster: the destination is held (an
    /// error that changes nothing; an incident the first time) until its
    /// broker names them all. Then `Some(the other clusters' highest
    /// horizon)`: a refill copied their records, under the same numbers.
    ///
    /// Only while the topic's numbers are the same in every cluster (its
    /// destinations were numbered together from the start; see
    /// [`Db::map_destinations`]): otherwise a copy would not match and the
    /// destination resumes as with one cluster.
    fn lost_by_cluster(&mut self, d: DestIx, last: i64) -> Result<Option<u64>, StoreError> {
        let spec = &self.layout.dests[d];
        let siblings: Vec<DestIx> = (0..self.layout.dests.len())
            .filter(|&i| i != d && self.layout.dests[i].topic == spec.topic)
            .collect();
        let next = self.dests[d].next_seq;
        if siblings.is_empty() || siblings.iter().any(|&i| self.dests[i].next_seq != next) {
            return Ok(None);
        }
        let id = self.dests[d].id;
        let get = |name: String| Ok::<_, StoreError>(state_get(&self.conn, &name)?.unwrap_or(0));
        let held = get(state_held(id))? != 0;
        let confirmed = get(state_confirmed(id))?.max(0) as u64;
        let at = get(state_confirmed_at(id))?.max(0) as u64;
        let wall = get(state_confirmed_wall(id))?;
        // Recent on both clocks: the store's stood still while ferry was
        // not running; the wall clock may jump (then it says nothing).
        let recent = self.clock.now_ms().saturating_sub(at) < PRODUCER_FORGOTTEN_AFTER_MS
            && (0..PRODUCER_FORGOTTEN_AFTER_MS as i64).contains(&(now_ms() as i64 - wall));
        let lost = confirmed > 0
            && match u64::try_from(last) {
                Ok(last) => last < confirmed,
                Err(_) => held || recent,
            };
        if !lost {
            let others = siblings.iter().map(|&i| self.dests[i].horizon).max();
            return Ok(held.then(|| others.unwrap_or(0)));
        }
        let err = StoreError::ClusterLost {
            topic: spec.name.clone(),
            confirmed,
            broker_last: last,
        };
        if !held {
            self.conn
                .execute(SQL_STATE_PUT, params![state_held(id), 1])?;
            self.incident(INCIDENT_CLUSTER_LOST, &err.to_string())?;
        }
        Err(err)
    }

    /// The error for a broker number that cannot be honoured; an incident
    /// the first time for this destination.
    pub(super) fn refuse(&mut self, d: DestIx, last_sequence_id: i64) -> StoreError {
        let topic = self.layout.dests[d].name.clone();
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
}

/// The incident kind for a cluster that lost records it confirmed.
pub const INCIDENT_CLUSTER_LOST: &str = "cluster-lost";

/// A broker forgets a producer idle this long
/// (`brokerDeduplicationProducerInactivityTimeoutMinutes`, 6 h by default);
/// within it, a broker that names no record of a producer it confirmed
/// records of has lost them (or has deduplication off).
pub const PRODUCER_FORGOTTEN_AFTER_MS: u64 = 6 * 3_600_000;

/// The incident kind for a broker that forgot a producer.
pub const INCIDENT_DEDUP: &str = "deduplication-off";

/// What to tell an operator about [`Forgotten`]: the likely cause, and the
/// fix. Starts with the topic and a colon.
pub fn forgotten_detail(topic: &str, f: &Forgotten) -> String {
    let idle_h = f.idle_ms as f64 / 3_600_000.0;
    let cause = if f.idle_ms < 6 * 3_600_000 {
        "deduplication is off on its namespace (or the topic was deleted)"
    } else {
        "deduplication is off on its namespace, the topic was deleted, or the broker forgot the producer after it was idle longer than brokerDeduplicationProducerInactivityTimeoutMinutes (6 h by default)"
    };
    let ns = crate::status::namespace_of(topic);
    format!(
        "{topic}: the broker knows no record of ferry's producer although it confirmed records up to {} to this store {idle_h:.1} h ago: {cause}. Records resent after a crash or a lost receipt may then arrive twice. Fix: pulsar-admin namespaces set-deduplication {ns} --enable",
        f.confirmed
    )
}
