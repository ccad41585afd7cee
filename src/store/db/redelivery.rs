//! Recognising what the MQTT broker sends again: a DUP redelivery of a
//! message already committed (`mqtt_seen`, with the acks known to have
//! reached the broker in `ack_confirmed`) and a retained state sent again
//! unchanged at a subscription (`topic_last`).

use std::collections::{BTreeMap, HashMap};

use rusqlite::{params, OptionalExtension, Transaction};

use super::*;

/// Confirmed MQTT connections remembered in `ack_confirmed`.
pub(super) const ACK_CONNS_KEPT: u64 = 64;

pub(super) const SQL_SEEN_GET: &str =
    "SELECT digest, conn, gen FROM mqtt_seen WHERE session = ?1 AND pkid = ?2";

pub(super) const SQL_SEEN_PUT: &str = "INSERT INTO mqtt_seen (session, pkid, digest, conn, gen)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT(session, pkid) DO UPDATE SET
         digest = excluded.digest, conn = excluded.conn, gen = excluded.gen";

pub(super) const SQL_TOPIC_LAST_GET: &str = "SELECT digest FROM topic_last WHERE topic = ?1";

pub(super) const SQL_TOPIC_LAST_PUT: &str = "INSERT INTO topic_last (topic, digest) VALUES (?1, ?2)
     ON CONFLICT(topic) DO UPDATE SET digest = excluded.digest";

pub(super) const SQL_ACK_CONFIRMED_PUT: &str =
    "INSERT INTO ack_confirmed (conn, gen) VALUES (?1, ?2)
     ON CONFLICT(conn) DO UPDATE SET gen = MAX(gen, excluded.gen)";

/// Which MQTT acknowledgements the broker is known to have processed, so
/// that a DUP message under a packet id whose earlier message was acked and
/// confirmed is stored, not taken for a redelivery (see
/// [`super::Command::AcksConfirmed`]).
#[derive(Debug, Default)]
pub(super) struct Acks {
    /// Per MQTT session of ingest (in its order): its row in
    /// `mqtt_sessions` (see [`Db::register_sessions`]); a session not
    /// registered is its own index.
    pub(super) sessions: Vec<i64>,
    /// This process's ingest connection epochs (unique across sessions), by
    /// their lasting number.
    pub(super) conn_of_epoch: HashMap<u64, u64>,
    /// The last lasting connection number handed out.
    pub(super) conn_seq: u64,
    /// The last commit number (every row written by a commit carries it).
    pub(super) commit_seq: u64,
    /// Per connection: every ack of a commit up to this one was processed.
    pub(super) confirmed: BTreeMap<u64, u64>,
    /// Confirmations not yet written.
    pub(super) unsaved: Vec<(u64, u64)>,
    /// Per session: its rows of connections below this are moot, the
    /// broker lost the session (nothing of it is redelivered).
    pub(super) moot_below: Vec<u64>,
    /// `moot_below` changed since it was written.
    pub(super) moot_unsaved: bool,
}

impl Acks {
    pub(super) fn conn(&self, epoch: u64) -> u64 {
        self.conn_of_epoch.get(&epoch).copied().unwrap_or(0)
    }

    /// What waited to be written was written.
    pub(super) fn saved(&mut self) {
        self.unsaved.clear();
        self.moot_unsaved = false;
    }

    /// A session's row id in `mqtt_sessions`.
    pub(super) fn session_id(&self, session: usize) -> i64 {
        self.sessions
            .get(session)
            .copied()
            .unwrap_or(session as i64)
    }

    /// Whether the ack of a row of `session` written by `gen` on `conn` is
    /// known to have reached the broker.
    pub(super) fn is_confirmed(&self, session: usize, conn: u64, gen: u64) -> bool {
        conn < self.moot_below.get(session).copied().unwrap_or(0)
            || self.confirmed.get(&conn).is_some_and(|g| *g >= gen)
    }
}

/// What the broker sends again, told apart from what is new.
pub(super) enum Screened {
    /// A DUP redelivery of the message last committed under its packet id.
    Redelivered,
    /// A retained state sent again (at a subscription), unchanged since it
    /// was last stored for its topic (live or retained).
    RetainedUnchanged,
    /// New: to be stored (or dead-lettered); the topic's key and the
    /// payload's digest for [`remember`].
    New { topic: i64, digest: i64 },
    /// Made by ferry itself (the downlink's acknowledgements), never sent
    /// by a broker: nothing to tell apart, nothing to remember.
    Made,
}

/// Where the records of a commit come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// The MQTT broker: screened for what it sends again, and remembered.
    Mqtt,
    /// Ferry itself: neither (a row per device in `topic_last` would be
    /// one random page written per record, and rows no broker ever asks
    /// about).
    Ferry,
}

/// Tells a message the broker sends again from a new one.
pub(super) fn screen(
    tx: &Transaction<'_>,
    acks: &Acks,
    msg: &Inbound,
) -> Result<Screened, StoreError> {
    if msg.dup && msg.pkid != 0 && seen_before(tx, acks, msg)? {
        return Ok(Screened::Redelivered);
    }
    let topic = topic_key(&msg.mqtt_topic);
    let digest = payload_digest(&msg.payload, msg.size());
    if msg.retain && last_on_topic(tx, topic)? == Some(digest) {
        return Ok(Screened::RetainedUnchanged);
    }
    Ok(Screened::New { topic, digest })
}

/// Remembers a message that commit `gen` stores or dead-letters, so that
/// [`screen`] knows it again; `seen` is what [`Screened::New`] held (`None`
/// for what ferry made).
pub(super) fn remember(
    tx: &Transaction<'_>,
    acks: &Acks,
    msg: &Inbound,
    gen: u64,
    seen: Option<(i64, i64)>,
) -> Result<(), StoreError> {
    let Some((topic, digest)) = seen else {
        return Ok(());
    };
    if msg.pkid != 0 {
        seen_put(tx, acks, msg, gen)?;
    }
    set_last_on_topic(tx, topic, digest)
}

/// Forgets the packet ids (each with its session) of messages received but
/// not stored: the broker redelivers them, and their rows describe an older
/// message.
pub(super) fn forget_seen(
    tx: &Transaction<'_>,
    acks: &Acks,
    pkids: &[(usize, u16)],
) -> Result<(), StoreError> {
    for (session, pkid) in pkids {
        tx.prepare_cached("DELETE FROM mqtt_seen WHERE session = ?1 AND pkid = ?2")?
            .execute(params![acks.session_id(*session), pkid])?;
    }
    Ok(())
}

/// Whether a DUP message is the broker's redelivery of the last message
/// stored under its packet id: the same topic and payload, and the ack of
/// that message not known to have reached the broker (once it did, the
/// broker may use the packet id again, for a message that happens to be
/// byte-identical).
fn seen_before(tx: &Transaction<'_>, acks: &Acks, msg: &Inbound) -> Result<bool, StoreError> {
    let seen: Option<(i64, i64, i64)> = tx
        .prepare_cached(SQL_SEEN_GET)?
        .query_row(params![acks.session_id(msg.session), msg.pkid], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    Ok(match seen {
        None => false,
        Some((d, conn, gen)) => {
            d == digest(msg)
                && !acks.is_confirmed(msg.session, conn.max(0) as u64, gen.max(0) as u64)
        }
    })
}

fn seen_put(tx: &Transaction<'_>, acks: &Acks, msg: &Inbound, gen: u64) -> Result<(), StoreError> {
    let conn = msg.ack.map_or(0, |a| acks.conn(a.epoch));
    tx.prepare_cached(SQL_SEEN_PUT)?.execute(params![
        acks.session_id(msg.session),
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

impl Db {
    /// Finds (or adds) the row of each of ingest's MQTT sessions in
    /// `mqtt_sessions`, by client id (`client_ids` in ingest's order, the
    /// main session first). The one session of a store older than version 6
    /// has no client id yet: the main session takes it over, with its
    /// redelivery rows.
    pub fn register_sessions(&mut self, client_ids: &[String]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let mut ids = Vec::new();
        let mut moot = Vec::new();
        for (i, client_id) in client_ids.iter().enumerate() {
            let find = |tx: &Transaction<'_>| {
                tx.query_row(
                    "SELECT id, moot_below FROM mqtt_sessions WHERE client_id = ?1",
                    [client_id],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()
            };
            let mut found = find(&tx)?;
            if found.is_none() && i == 0 {
                tx.execute(
                    "UPDATE mqtt_sessions SET client_id = ?1 WHERE client_id IS NULL",
                    [client_id],
                )?;
                found = find(&tx)?;
            }
            let (id, below) = match found {
                Some(row) => row,
                None => {
                    tx.execute(
                        "INSERT INTO mqtt_sessions (id, client_id)
                         SELECT COALESCE(MAX(id) + 1, 0), ?1 FROM mqtt_sessions",
                        [client_id],
                    )?;
                    find(&tx)?.expect("the row just added")
                }
            };
            ids.push(id);
            moot.push(below.max(0) as u64);
        }
        tx.commit()?;
        self.acks.sessions = ids;
        self.acks.moot_below = moot;
        Ok(())
    }

    /// One MQTT session of ingest connected to the broker (connection
    /// `epoch` of this process, unique across sessions): the connection gets
    /// a lasting number; when the broker lost the session, none of its
    /// earlier messages is redelivered, so its earlier redelivery rows are
    /// moot.
    pub fn new_connection(&mut self, session: usize, epoch: u64, present: bool) {
        self.acks.conn_seq += 1;
        let conn = self.acks.conn_seq;
        self.acks.conn_of_epoch.insert(epoch, conn);
        if !present {
            if self.acks.moot_below.len() <= session {
                self.acks.moot_below.resize(session + 1, 0);
            }
            self.acks.moot_below[session] = conn;
            self.acks.moot_unsaved = true;
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
        !self.acks.unsaved.is_empty() || self.acks.moot_unsaved
    }

    /// The commit number the next commit's rows carry (acks name it).
    pub fn next_gen(&self) -> u64 {
        self.acks.commit_seq + 1
    }
}

/// Writes the clock and the acknowledgement state inside `tx`, with
/// `commit_seq` as the last commit.
pub(super) fn save_state(
    tx: &Transaction<'_>,
    acks: &Acks,
    commit_seq: u64,
    clock: u64,
) -> Result<(), StoreError> {
    let mut put = tx.prepare_cached(SQL_STATE_PUT)?;
    put.execute(params![STATE_CLOCK, clock as i64])?;
    put.execute(params![STATE_COMMIT, commit_seq as i64])?;
    put.execute(params![STATE_CONN, acks.conn_seq as i64])?;
    if acks.moot_unsaved {
        let mut stmt =
            tx.prepare_cached("UPDATE mqtt_sessions SET moot_below = ?2 WHERE id = ?1")?;
        for (session, below) in acks.moot_below.iter().enumerate() {
            stmt.execute(params![acks.session_id(session), *below as i64])?;
        }
    }
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
