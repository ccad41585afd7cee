//! The downlink's state: each device's desired state as the fleet last
//! wrote it (`desired`: version, document, the version the local MQTT
//! broker acknowledged), and the read position in the gateway's desired
//! topic (`downlink`).
//!
//! The rules the downlink's promises rest on:
//!
//! - a version at or below what the store holds for the device is stale:
//!   counted, never stored, so never published again;
//! - the versions read and the read position change in one transaction;
//! - a store that has no position for the topic (a new or replaced store)
//!   is *catching up*: nothing is handed out for publishing until the
//!   downlink has read up to where the topic ended when it started, so a
//!   device gets only the newest version, never an older one first;
//! - a version counts as applied only after the local broker's PUBACK, in
//!   the same transaction as its acknowledgement record on the ack topic.

use rusqlite::{params, OptionalExtension, Transaction};

use super::*;

/// A desired-state message as read from the desired topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredUpdate {
    /// The message key: the device id.
    pub device: Option<String>,
    /// The `version` property, as sent.
    pub version: Option<String>,
    /// The desired document (empty: the device's desired state is cleared).
    pub payload: bytes::Bytes,
    /// Why the message could not be read, if it could not (dead-lettered).
    pub problem: Option<String>,
}

/// A device's desired state to publish to the local MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub device: String,
    pub version: u64,
    pub payload: Vec<u8>,
}

/// What one batch of desired-state messages did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DesiredOutcome {
    pub stored: u64,
    pub stale: u64,
    /// The very version the store holds, read again (from another cluster,
    /// or again after a reconnect): neither stored nor stale.
    pub again: u64,
    pub dead_lettered: u64,
    /// Old dead letters pruned to make room (`store.dead_letters_*`).
    pub pruned: super::Pruned,
}

/// Where the downlink resumes reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownlinkStart {
    /// The position of the last message read (opaque to the store); `None`:
    /// read the topic from its start.
    pub position: Option<Vec<u8>>,
    /// Whether the store ever read the topic to its end. `false` for a new
    /// or replaced store, or another topic: publish nothing before that.
    pub caught_up: bool,
}

/// Why a desired-state message can never be applied, if it cannot.
pub fn desired_reject_reason(u: &DesiredUpdate, max_payload: usize) -> Option<String> {
    if let Some(problem) = &u.problem {
        return Some(problem.clone());
    }
    let Some(device) = &u.device else {
        return Some("no key (the device id)".into());
    };
    if !is_topic_level(device) {
        return Some(format!(
            "key {:?} is not a valid MQTT topic level",
            device.escape_debug().to_string()
        ));
    }
    let Some(version) = &u.version else {
        return Some("no version property".into());
    };
    if parse_version(version).is_none() {
        return Some(format!(
            "version {:?} is not a positive 64-bit integer",
            version.escape_debug().to_string()
        ));
    }
    if u.payload.len() > max_payload {
        return Some(format!(
            "payload of {} bytes exceeds store.max_payload_bytes ({max_payload})",
            u.payload.len()
        ));
    }
    None
}

/// A version the store can keep: 1 to 2^63 - 1, digits only.
/// A `version` property as the downlink reads it: 1 to 2^63 - 1, digits
/// only (`ferry-fleet desire` reads the topic by the same rule).
pub fn parse_version(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = v.parse().ok()?;
    (1..=i64::MAX as u64).contains(&n).then_some(n)
}

/// Whether `s` can stand as one level of an MQTT topic: not empty, no `/`,
/// no wildcard, no NUL, and short enough to leave room for the rest.
fn is_topic_level(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && !s.contains(['/', '+', '#', '\0']) && !s.starts_with('$')
}

impl Db {
    /// Where the downlink of `topic` resumes (`<topic>@<cluster>` when it
    /// is read from named clusters: each has its own position). A topic the
    /// store has not read before starts from the beginning, catching up;
    /// what the store holds of each device stays, so no older version is
    /// published. Starting another topic forgets the positions in every
    /// other (the other clusters' of the same topic stay).
    pub fn downlink_start(&mut self, topic: &str) -> Result<DownlinkStart, StoreError> {
        let row: Option<(Option<Vec<u8>>, i64)> = self
            .conn
            .query_row(
                "SELECT position, caught_up FROM downlink WHERE topic = ?1",
                [topic],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((position, caught_up)) = row {
            return Ok(DownlinkStart {
                position,
                caught_up: caught_up != 0,
            });
        }
        let tx = self.conn.transaction()?;
        match topic.split_once('@') {
            None => tx.execute("DELETE FROM downlink", [])?,
            Some((base, _)) => tx.execute(
                "DELETE FROM downlink WHERE substr(topic, 1, ?2) != ?1",
                params![format!("{base}@"), base.len() as i64 + 1],
            )?,
        };
        tx.execute(
            "INSERT INTO downlink (topic, position, caught_up) VALUES (?1, NULL, 0)",
            [topic],
        )?;
        tx.commit()?;
        Ok(DownlinkStart {
            position: None,
            caught_up: false,
        })
    }

    /// Stores what the downlink read from `topic` up to `position`: each
    /// device's newer versions, stale ones counted, bad input dead-lettered.
    /// `caught_up`: the read reached where the topic ended when the
    /// downlink started. One transaction.
    pub fn desired_received(
        &mut self,
        topic: &str,
        updates: &[DesiredUpdate],
        position: &[u8],
        caught_up: bool,
        max_payload: usize,
    ) -> Result<DesiredOutcome, StoreError> {
        let now = now_ms();
        let mut out = DesiredOutcome::default();
        let mut stale = Vec::new();
        let tx = self.conn.transaction()?;
        for u in updates {
            if let Some(reason) = desired_reject_reason(u, max_payload) {
                let key = u.device.as_deref().unwrap_or_default();
                let source = format!("{topic} key {}", key.escape_debug());
                tracing::warn!(%topic, key = %key.escape_debug(), %reason, "desired state dead-lettered");
                dead_letter_raw(
                    &tx,
                    &source,
                    &reason,
                    u.payload.len() as u64,
                    &u.payload,
                    now,
                )?;
                out.dead_lettered += 1;
                continue;
            }
            let device = u.device.as_deref().expect("checked");
            let version = parse_version(u.version.as_deref().expect("checked")).expect("checked");
            let held: Option<(i64, Vec<u8>)> = tx
                .prepare_cached("SELECT version, payload FROM desired WHERE device = ?1")?
                .query_row([device], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((held, payload)) = held.filter(|(h, _)| (*h).max(0) as u64 >= version) {
                // The same update read from another cluster is no news.
                if held.max(0) as u64 == version && payload == u.payload {
                    out.again += 1;
                    continue;
                }
                out.stale += 1;
                stale.push(serde_json::json!([device, version, held.max(0)]));
                continue;
            }
            tx.prepare_cached(
                "INSERT INTO desired (device, version, payload, applied, republish)
                 VALUES (?1, ?2, ?3, 0, 0)
                 ON CONFLICT(device) DO UPDATE SET version = excluded.version,
                     payload = excluded.payload",
            )?
            .execute(params![device, version as i64, &u.payload[..]])?;
            out.stored += 1;
        }
        // An empty position: none yet (what was there stays).
        let position = (!position.is_empty()).then_some(position);
        tx.execute(
            "UPDATE downlink SET position = COALESCE(?2, position), caught_up = MAX(caught_up, ?3)
             WHERE topic = ?1",
            params![topic, position, caught_up as i64],
        )?;
        if out.dead_lettered > 0 {
            out.pruned = super::dead_letters::prune(&tx, &self.dead_letter_limits, now)?;
        }
        add_counters(
            &tx,
            &[
                ("desired_received", updates.len() as i64),
                ("desired_stale", out.stale as i64),
                ("desired_dead_lettered", out.dead_lettered as i64),
            ],
        )?;
        tx.commit()?;
        if !stale.is_empty() {
            crate::audit::Event::new("desired-stale")
                .field("count", stale.len())
                .field("stale", stale)
                .record();
        }
        Ok(out)
    }

    /// Desired states to publish: versions the local broker has not
    /// acknowledged, and every state it forgot ([`Db::desired_forgotten`]),
    /// at most `limit`, by device, after device `after` (from the first
    /// with `None`): the downlink pages through them, so a page costs what
    /// it returns (the primary key's index), not the whole table. Nothing
    /// while the downlink catches up.
    pub fn desired_pending(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Desired>, StoreError> {
        // One read transaction for both queries, not one each.
        let tx = self.conn.unchecked_transaction()?;
        let caught_up: bool = tx
            .query_row("SELECT MAX(caught_up) FROM downlink", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .is_some_and(|c| c != 0);
        if !caught_up {
            return Ok(Vec::new());
        }
        let row = |r: &rusqlite::Row<'_>| {
            Ok(Desired {
                device: r.get(0)?,
                version: r.get::<_, i64>(1)?.max(0) as u64,
                payload: r.get(2)?,
            })
        };
        let rows = match after {
            Some(after) => tx
                .prepare_cached(
                    "SELECT device, version, payload FROM desired
                     WHERE device > ?1 AND (version > applied OR republish != 0)
                     ORDER BY device LIMIT ?2",
                )?
                .query_map(params![after, limit as i64], row)?
                .collect::<Result<_, _>>()?,
            None => tx
                .prepare_cached(
                    "SELECT device, version, payload FROM desired
                     WHERE version > applied OR republish != 0
                     ORDER BY device LIMIT ?1",
                )?
                .query_map([limit as i64], row)?
                .collect::<Result<_, _>>()?,
        };
        Ok(rows)
    }

    /// The local MQTT broker acknowledged `applied` (PUBACK). Each version
    /// newer than what the device had applied becomes its applied version,
    /// and its acknowledgement record (beside it) is stored for the ack
    /// topic's stream, in one transaction. A state published again because
    /// the broker forgot it gets no second acknowledgement.
    pub fn desired_applied(
        &mut self,
        applied: &[(Desired, Inbound)],
        max_payload: usize,
    ) -> Result<BatchOutcome, StoreError> {
        let mut newly = Vec::new();
        let mut versions = Vec::new();
        // One read transaction for the lookups, not one each.
        let tx = self.conn.transaction()?;
        for (d, ack) in applied {
            let had: Option<i64> = tx
                .prepare_cached("SELECT applied FROM desired WHERE device = ?1")?
                .query_row([&d.device], |r| r.get(0))
                .optional()?;
            if had.is_some_and(|a| (a.max(0) as u64) < d.version) {
                newly.push(ack.clone());
                versions.push(serde_json::json!([d.device, d.version]));
            }
        }
        tx.commit()?;
        let republished = applied.len() - newly.len();
        let out = self.commit_with(&[], &[], &newly, Origin::Ferry, max_payload, |tx| {
            for (d, _) in applied {
                tx.prepare_cached(
                    "UPDATE desired SET applied = MAX(applied, ?2),
                         republish = CASE WHEN version <= ?2 THEN 0 ELSE republish END
                     WHERE device = ?1",
                )?
                .execute(params![d.device, d.version as i64])?;
            }
            add_counters(
                tx,
                &[
                    ("desired_applied", newly.len() as i64),
                    ("desired_republished", republished as i64),
                ],
            )
        })?;
        if !versions.is_empty() {
            crate::audit::Event::new("desired-applied")
                .field("count", versions.len())
                .field("applied", versions)
                .record();
        }
        Ok(out)
    }

    /// Versions read and not yet acknowledged by the local broker (the
    /// downlink's lag), republications included.
    pub fn desired_lag(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM desired WHERE version > applied OR republish != 0",
            [],
            |r| r.get(0),
        )?;
        Ok(n.max(0) as u64)
    }

    /// The local MQTT broker lost its state (a session that was not
    /// present): every device's desired state is published again.
    pub fn desired_forgotten(&mut self) -> Result<u64, StoreError> {
        Ok(self
            .conn
            .execute("UPDATE desired SET republish = 1 WHERE republish = 0", [])? as u64)
    }
}

fn add_counters(tx: &Transaction<'_>, counts: &[(&str, i64)]) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(SQL_COUNTER_ADD)?;
    for (name, n) in counts {
        if *n != 0 {
            stmt.execute(params![name, n])?;
        }
    }
    Ok(())
}
