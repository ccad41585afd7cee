//! The store's schema, its versions and the steps between them, and the
//! checks that tell a damaged store from a healthy one.
//!
//! # Versions
//!
//! The version lives in the file (`PRAGMA user_version`). Stores written
//! before versions existed say 0 and are recognised by their tables:
//!
//! | version | written by | shape |
//! |---|---|---|
//! | 1 | the first slice | one `journal` numbered by `meta.next_seq` |
//! | 2 | streams (2979ed6) | `outbox` keyed by destination, `destinations` without `resumed` |
//! | 3 | store review (4ecce23) | `destinations.resumed` |
//! | 4 | audit fixes (d69e04c) | `destinations.horizon`, `outbox.stored_at`, `mqtt_seen` with the connection and commit of each row, `topic_last`, `ack_confirmed`, `store_state` |
//! | 5 | desired state (22f6841) | `desired` (each device's desired state and the version applied), `downlink` (the read position in the desired topic) |
//! | 6 | this version | `mqtt_sessions` (one MQTT session per `reject` stream, each with its own `moot_below`), `mqtt_seen` keyed by session and packet id |
//!
//! Every step runs in one transaction with the version change, so a step
//! that fails (a full disk) leaves the store as it was. A store whose
//! version is newer than this binary knows is refused and left alone: it is
//! not damaged, only written by a newer ferry.
//!
//! # Damage
//!
//! Damage is what SQLite reports as corruption, a file that is not a
//! database, and, found by [`check`] at open: tables whose columns are not
//! what their version says, values of the wrong type, a header that makes
//! the file read-only, destination ids or record numbers out of range. A
//! record number behind the records it numbered is repaired, not damage.
//! At run time the same classes of error (see [`is_damage`]) end ferry and
//! leave a marker (`<store>.damaged`) so that the next start moves the store
//! aside instead of failing again.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction};

use super::StoreError;

/// The schema this binary writes.
pub const VERSION: i32 = 6;

/// Destination ids stay below this, so that `id << 48` stays a positive
/// 64-bit key and no destination's keys reach another's.
pub const MAX_DEST_ID: u64 = (1 << 15) - 1;

/// The schema of [`VERSION`], for a new store.
const SCHEMA: &str = "
CREATE TABLE outbox (
    key         INTEGER PRIMARY KEY,
    device      TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    props       BLOB    NOT NULL,
    stored_at   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE destinations (
    id       INTEGER PRIMARY KEY,
    topic    TEXT    NOT NULL UNIQUE,
    next_seq INTEGER NOT NULL,
    stream   TEXT    NOT NULL,
    role     TEXT    NOT NULL,
    horizon  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE mqtt_sessions (
    id         INTEGER PRIMARY KEY,
    client_id  TEXT    UNIQUE,
    moot_below INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE mqtt_seen (
    session INTEGER NOT NULL,
    pkid    INTEGER NOT NULL,
    digest  INTEGER NOT NULL,
    conn    INTEGER NOT NULL,
    gen     INTEGER NOT NULL,
    PRIMARY KEY (session, pkid)
) WITHOUT ROWID;
CREATE TABLE topic_last (
    topic  INTEGER PRIMARY KEY,
    digest INTEGER NOT NULL
);
CREATE TABLE ack_confirmed (
    conn INTEGER PRIMARY KEY,
    gen  INTEGER NOT NULL
);
CREATE TABLE store_state (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    received_ms INTEGER NOT NULL,
    mqtt_topic  TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE agent (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    snapshot TEXT    NOT NULL
);
CREATE TABLE incidents (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    detail TEXT    NOT NULL
);
CREATE TABLE desired (
    device    TEXT    PRIMARY KEY,
    version   INTEGER NOT NULL,
    payload   BLOB    NOT NULL,
    applied   INTEGER NOT NULL DEFAULT 0,
    republish INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE downlink (
    topic     TEXT    PRIMARY KEY,
    position  BLOB,
    caught_up INTEGER NOT NULL DEFAULT 0
);
";

/// One column as `PRAGMA table_info` describes it: name, declared type, NOT
/// NULL, part of the primary key.
type Col = (&'static str, &'static str, bool, bool);

/// The tables of [`VERSION`] and their columns, in order.
const SHAPE: &[(&str, &[Col])] = &[
    (
        "outbox",
        &[
            ("key", "INTEGER", false, true),
            ("device", "TEXT", true, false),
            ("received_ms", "INTEGER", true, false),
            ("payload", "BLOB", true, false),
            ("props", "BLOB", true, false),
            ("stored_at", "INTEGER", true, false),
        ],
    ),
    (
        "destinations",
        &[
            ("id", "INTEGER", false, true),
            ("topic", "TEXT", true, false),
            ("next_seq", "INTEGER", true, false),
            ("stream", "TEXT", true, false),
            ("role", "TEXT", true, false),
            ("horizon", "INTEGER", true, false),
        ],
    ),
    (
        "mqtt_sessions",
        &[
            ("id", "INTEGER", false, true),
            ("client_id", "TEXT", false, false),
            ("moot_below", "INTEGER", true, false),
        ],
    ),
    (
        "mqtt_seen",
        &[
            ("session", "INTEGER", true, true),
            ("pkid", "INTEGER", true, true),
            ("digest", "INTEGER", true, false),
            ("conn", "INTEGER", true, false),
            ("gen", "INTEGER", true, false),
        ],
    ),
    (
        "topic_last",
        &[
            ("topic", "INTEGER", false, true),
            ("digest", "INTEGER", true, false),
        ],
    ),
    (
        "ack_confirmed",
        &[
            ("conn", "INTEGER", false, true),
            ("gen", "INTEGER", true, false),
        ],
    ),
    (
        "store_state",
        &[
            ("name", "TEXT", false, true),
            ("value", "INTEGER", true, false),
        ],
    ),
    (
        "dead_letters",
        &[
            ("id", "INTEGER", false, true),
            ("received_ms", "INTEGER", true, false),
            ("mqtt_topic", "TEXT", true, false),
            ("reason", "TEXT", true, false),
            ("size", "INTEGER", true, false),
            ("payload", "BLOB", true, false),
        ],
    ),
    (
        "counters",
        &[
            ("name", "TEXT", false, true),
            ("value", "INTEGER", true, false),
        ],
    ),
    (
        "agent",
        &[
            ("id", "INTEGER", false, true),
            ("snapshot", "TEXT", true, false),
        ],
    ),
    (
        "incidents",
        &[
            ("id", "INTEGER", false, true),
            ("at_ms", "INTEGER", true, false),
            ("kind", "TEXT", true, false),
            ("detail", "TEXT", true, false),
        ],
    ),
    (
        "desired",
        &[
            ("device", "TEXT", false, true),
            ("version", "INTEGER", true, false),
            ("payload", "BLOB", true, false),
            ("applied", "INTEGER", true, false),
            ("republish", "INTEGER", true, false),
        ],
    ),
    (
        "downlink",
        &[
            ("topic", "TEXT", false, true),
            ("position", "BLOB", false, false),
            ("caught_up", "INTEGER", true, false),
        ],
    ),
];

/// Type checks of every row: (table, condition that holds for a bad row).
const TYPE_CHECKS: &[(&str, &str)] = &[
    (
        "outbox",
        "typeof(device) != 'text' OR typeof(received_ms) != 'integer' OR typeof(payload) != 'blob'
         OR typeof(props) != 'blob' OR typeof(stored_at) != 'integer'",
    ),
    (
        "destinations",
        "typeof(topic) != 'text' OR typeof(next_seq) != 'integer' OR typeof(stream) != 'text'
         OR typeof(role) != 'text' OR typeof(horizon) != 'integer'",
    ),
    (
        "mqtt_sessions",
        "typeof(client_id) NOT IN ('text', 'null') OR typeof(moot_below) != 'integer'",
    ),
    (
        "mqtt_seen",
        "typeof(session) != 'integer' OR typeof(pkid) != 'integer'
         OR typeof(digest) != 'integer' OR typeof(conn) != 'integer' OR typeof(gen) != 'integer'",
    ),
    ("topic_last", "typeof(digest) != 'integer'"),
    ("ack_confirmed", "typeof(gen) != 'integer'"),
    (
        "store_state",
        "typeof(name) != 'text' OR typeof(value) != 'integer'",
    ),
    (
        "counters",
        "typeof(name) != 'text' OR typeof(value) != 'integer'",
    ),
    (
        "dead_letters",
        "typeof(received_ms) != 'integer' OR typeof(mqtt_topic) != 'text'
         OR typeof(reason) != 'text' OR typeof(size) != 'integer' OR typeof(payload) != 'blob'",
    ),
    (
        "incidents",
        "typeof(at_ms) != 'integer' OR typeof(kind) != 'text' OR typeof(detail) != 'text'",
    ),
    (
        "desired",
        "typeof(device) != 'text' OR typeof(version) != 'integer' OR typeof(payload) != 'blob'
         OR typeof(applied) != 'integer' OR typeof(republish) != 'integer'",
    ),
    (
        "downlink",
        "typeof(topic) != 'text' OR typeof(position) NOT IN ('blob', 'null')
         OR typeof(caught_up) != 'integer'",
    ),
];

/// What a store file holds before [`upgrade`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// No tables: a new store.
    Empty,
    /// A known version (maybe older than [`VERSION`]).
    Version(i32),
}

/// The first configured destination, which takes over a version-1 store's
/// journal (that store had one topic: the same topic, so the same
/// producer and numbers).
pub struct FirstDest<'a> {
    pub topic: &'a str,
    pub stream: &'a str,
    pub role: &'a str,
}

/// Whether an SQLite error means the store is damaged (not a full disk, a
/// lock or a permission problem, which leave a healthy file behind).
pub fn is_damage(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => true,
        // A header whose file format bytes say a format SQLite does not
        // know: ferry never writes one.
        rusqlite::Error::SqliteFailure(_, Some(m)) if m.contains("unsupported file format") => true,
        e => matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        ),
    }
}

/// The version of an open store, or damage if its tables fit no version.
pub fn detect(conn: &Connection) -> Result<Result<Found, String>, rusqlite::Error> {
    let version: i32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > 0 {
        return Ok(Ok(Found::Version(version)));
    }
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let has = |t: &str| tables.iter().any(|n| n == t);
    if tables.is_empty() {
        return Ok(Ok(Found::Empty));
    }
    if has("journal") {
        let ok = columns(conn, "journal")?.iter().map(|c| c.0.as_str()).eq([
            "seq",
            "device",
            "received_ms",
            "payload",
            "props",
        ]) && has("meta");
        return Ok(if ok {
            Ok(Found::Version(1))
        } else {
            Err("its journal table does not have the columns of a version-1 store".into())
        });
    }
    if has("destinations") && has("outbox") && has("mqtt_seen") {
        let dest: Vec<String> = columns(conn, "destinations")?
            .into_iter()
            .map(|c| c.0)
            .collect();
        let outbox_ok = columns(conn, "outbox")?.iter().map(|c| c.0.as_str()).eq([
            "key",
            "device",
            "received_ms",
            "payload",
            "props",
        ]);
        let seen_ok = columns(conn, "mqtt_seen")?
            .iter()
            .map(|c| c.0.as_str())
            .eq(["pkid", "topic", "digest"]);
        let v2 = ["id", "topic", "next_seq", "stream", "role"];
        if outbox_ok && seen_ok && dest.iter().map(String::as_str).eq(v2) {
            return Ok(Ok(Found::Version(2)));
        }
        let v3 = ["id", "topic", "next_seq", "stream", "role", "resumed"];
        if outbox_ok && seen_ok && dest.iter().map(String::as_str).eq(v3) {
            return Ok(Ok(Found::Version(3)));
        }
        return Ok(Err(
            "its tables do not have the columns of any store version".into(),
        ));
    }
    Ok(Err(format!(
        "it is a database, but not a ferry store (tables: {})",
        tables.join(", ")
    )))
}

fn columns(
    conn: &Connection,
    table: &str,
) -> Result<Vec<(String, String, bool, bool)>, rusqlite::Error> {
    conn.prepare(&format!("PRAGMA table_info({table})"))?
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, bool>(3)?,
                r.get::<_, i64>(5)? > 0,
            ))
        })?
        .collect()
}

/// Creates the schema of a new store, or brings an older one up to
/// [`VERSION`], one step per version, each in its own transaction.
pub fn upgrade(
    conn: &mut Connection,
    found: Found,
    first: Option<FirstDest<'_>>,
) -> Result<(), StoreError> {
    let mut version = match found {
        Found::Empty => {
            let tx = conn.transaction()?;
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", VERSION)?;
            tx.commit()?;
            return Ok(());
        }
        Found::Version(v) if v > VERSION => {
            return Err(StoreError::TooNew {
                found: v,
                supported: VERSION,
            })
        }
        Found::Version(v) => v,
    };
    while version < VERSION {
        let tx = conn.transaction()?;
        match version {
            1 => v1_to_v2(&tx, first.as_ref())?,
            2 => v2_to_v3(&tx)?,
            3 => v3_to_v4(&tx)?,
            4 => v4_to_v5(&tx)?,
            5 => v5_to_v6(&tx)?,
            v => unreachable!("no step from version {v}"),
        }
        version += 1;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "store upgraded");
    }
    Ok(())
}

/// Version 1 kept one journal; its records go to the first configured
/// destination, with their numbers.
fn v1_to_v2(tx: &Transaction<'_>, first: Option<&FirstDest<'_>>) -> Result<(), rusqlite::Error> {
    tx.execute_batch(
        "CREATE TABLE outbox (key INTEGER PRIMARY KEY, device TEXT NOT NULL,
             received_ms INTEGER NOT NULL, payload BLOB NOT NULL, props BLOB NOT NULL);
         CREATE TABLE destinations (id INTEGER PRIMARY KEY, topic TEXT NOT NULL UNIQUE,
             next_seq INTEGER NOT NULL, stream TEXT NOT NULL, role TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS agent (id INTEGER PRIMARY KEY CHECK (id = 1), snapshot TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS mqtt_seen (pkid INTEGER PRIMARY KEY, topic TEXT NOT NULL,
             digest INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,
             received_ms INTEGER NOT NULL, mqtt_topic TEXT NOT NULL, reason TEXT NOT NULL,
             size INTEGER NOT NULL, payload BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
         CREATE TABLE incidents (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,
             kind TEXT NOT NULL, detail TEXT NOT NULL);",
    )?;
    let next: i64 = tx
        .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(1);
    let max: Option<i64> = tx.query_row("SELECT MAX(seq) FROM journal", [], |r| r.get(0))?;
    let next = next.max(max.unwrap_or(0) + 1);
    if let Some(d) = first {
        tx.execute(
            "INSERT INTO destinations (id, topic, next_seq, stream, role) VALUES (1, ?1, ?2, ?3, ?4)",
            params![d.topic, next, d.stream, d.role],
        )?;
        tx.execute(
            "INSERT INTO outbox (key, device, received_ms, payload, props)
             SELECT (1 << 48) | seq, device, received_ms, payload, props FROM journal",
            [],
        )?;
    }
    tx.execute_batch("DROP TABLE journal; DROP TABLE meta;")?;
    Ok(())
}

/// Version 2 had no record of whether a producer spoke to the broker. It
/// did (version 2 resumed from the broker's number), so it counts as
/// having resumed.
fn v2_to_v3(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute_batch(
        "ALTER TABLE destinations ADD COLUMN resumed INTEGER NOT NULL DEFAULT 0;
         UPDATE destinations SET resumed = 1;",
    )
}

/// Version 4: the horizon (the highest number an uplink may have sent)
/// replaces `resumed`; records get their store-clock time; redelivery rows
/// name their MQTT connection and commit; retained states, confirmed acks
/// and the store's own state get tables.
fn v3_to_v4(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute_batch(
        "ALTER TABLE destinations ADD COLUMN horizon INTEGER NOT NULL DEFAULT 0;
         UPDATE destinations SET horizon = CASE WHEN resumed != 0 THEN next_seq - 1 ELSE 0 END;
         ALTER TABLE destinations DROP COLUMN resumed;
         ALTER TABLE outbox ADD COLUMN stored_at INTEGER NOT NULL DEFAULT 0;
         CREATE TABLE mqtt_seen_v4 (pkid INTEGER PRIMARY KEY, digest INTEGER NOT NULL,
             conn INTEGER NOT NULL, gen INTEGER NOT NULL);
         CREATE TABLE topic_last (topic INTEGER PRIMARY KEY, digest INTEGER NOT NULL);
         CREATE TABLE ack_confirmed (conn INTEGER PRIMARY KEY, gen INTEGER NOT NULL);
         CREATE TABLE store_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    )?;
    // Rows of version 2 kept the topic as text beside a payload-only
    // digest; since 7a1279a the topic is mixed into the digest. Both become
    // the new digest. Connection and commit 0: never confirmed.
    let rows: Vec<(i64, String, i64)> = tx
        .prepare("SELECT pkid, topic, digest FROM mqtt_seen")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    let mut put =
        tx.prepare("INSERT INTO mqtt_seen_v4 (pkid, digest, conn, gen) VALUES (?1, ?2, 0, 0)")?;
    for (pkid, topic, digest) in rows {
        let digest = if topic.is_empty() {
            digest
        } else {
            digest ^ i64::from(crc32c::crc32c(topic.as_bytes()))
        };
        put.execute([pkid, digest])?;
    }
    drop(put);
    tx.execute_batch("DROP TABLE mqtt_seen; ALTER TABLE mqtt_seen_v4 RENAME TO mqtt_seen;")
}

/// Version 5: the downlink's tables (desired state per device, the read
/// position in the desired topic).
fn v4_to_v5(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute_batch(
        "CREATE TABLE desired (device TEXT PRIMARY KEY, version INTEGER NOT NULL,
             payload BLOB NOT NULL, applied INTEGER NOT NULL DEFAULT 0,
             republish INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE downlink (topic TEXT PRIMARY KEY, position BLOB,
             caught_up INTEGER NOT NULL DEFAULT 0);",
    )
}

/// Version 6: one MQTT session per `reject` stream besides the main one.
/// The store's one session so far becomes row 0 with no client id yet (the
/// main session claims it at its first start, see
/// [`super::Db::register_sessions`]), keeping its `moot_below`; its
/// redelivery rows become that session's.
fn v5_to_v6(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    tx.execute_batch(
        "CREATE TABLE mqtt_sessions (id INTEGER PRIMARY KEY, client_id TEXT UNIQUE,
             moot_below INTEGER NOT NULL DEFAULT 0);
         INSERT INTO mqtt_sessions (id, client_id, moot_below)
             VALUES (0, NULL, COALESCE((SELECT value FROM store_state
                                        WHERE name = 'moot_below_conn'), 0));
         DELETE FROM store_state WHERE name = 'moot_below_conn';
         CREATE TABLE mqtt_seen_v6 (session INTEGER NOT NULL, pkid INTEGER NOT NULL,
             digest INTEGER NOT NULL, conn INTEGER NOT NULL, gen INTEGER NOT NULL,
             PRIMARY KEY (session, pkid)) WITHOUT ROWID;
         INSERT INTO mqtt_seen_v6 (session, pkid, digest, conn, gen)
             SELECT 0, pkid, digest, conn, gen FROM mqtt_seen;
         DROP TABLE mqtt_seen;
         ALTER TABLE mqtt_seen_v6 RENAME TO mqtt_seen;",
    )
}

/// What [`check`] repaired.
#[derive(Debug, Default)]
pub struct Repairs {
    /// Destinations whose next record number was at or below a stored one.
    pub next_seq: Vec<String>,
}

/// Checks an upgraded store: the columns of every table, the type of every
/// value, destination ids and numbers in range. `Ok(Err(reason))` is
/// damage. A destination whose `next_seq` is behind its records is
/// repaired in place (the number after its highest record), and its horizon
/// is kept at or below what it numbered.
pub fn check(conn: &mut Connection) -> Result<Result<Repairs, String>, rusqlite::Error> {
    for (table, cols) in SHAPE {
        let have = columns(conn, table)?;
        let want: Vec<(String, String, bool, bool)> = cols
            .iter()
            .map(|(n, t, nn, pk)| (n.to_string(), t.to_string(), *nn, *pk))
            .collect();
        if have != want {
            return Ok(Err(format!(
                "table {table} does not have the columns of store version {VERSION}"
            )));
        }
    }
    for (table, bad) in TYPE_CHECKS {
        let n: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM {table} WHERE {bad}"),
            [],
            |r| r.get(0),
        )?;
        if n > 0 {
            return Ok(Err(format!(
                "{n} row(s) of table {table} hold values of the wrong type"
            )));
        }
    }
    let dests: Vec<(i64, String, i64, i64)> = conn
        .prepare("SELECT id, topic, next_seq, horizon FROM destinations ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let seq_max = super::SEQ_MAX as i64;
    for (id, topic, next, horizon) in &dests {
        if *id < 1 || *id as u64 > MAX_DEST_ID {
            return Ok(Err(format!(
                "destination {topic} has id {id}, outside 1..={MAX_DEST_ID}"
            )));
        }
        if *next < 1 || *next > seq_max {
            return Ok(Err(format!(
                "destination {topic} has next record number {next}, outside 1..={seq_max}"
            )));
        }
        if *horizon < 0 {
            return Ok(Err(format!("destination {topic} has horizon {horizon}")));
        }
    }
    let negative: i64 = conn.query_row("SELECT COUNT(*) FROM outbox WHERE key < 0", [], |r| {
        r.get(0)
    })?;
    if negative > 0 {
        return Ok(Err(format!("{negative} record(s) have negative keys")));
    }
    let mut repairs = Repairs::default();
    let tx = conn.transaction()?;
    for (id, topic, next, horizon) in &dests {
        let lo = id << 48;
        let hi = lo | seq_max;
        let top: Option<i64> = tx.query_row(
            "SELECT MAX(key) FROM outbox WHERE key >= ?1 AND key <= ?2",
            [lo, hi],
            |r| r.get(0),
        )?;
        let highest = top.map_or(0, |k| k & seq_max);
        if highest >= *next {
            if highest >= seq_max {
                return Ok(Err(format!(
                    "destination {topic} holds record number {highest}, the last there is"
                )));
            }
            tx.execute(
                "UPDATE destinations SET next_seq = ?2 WHERE id = ?1",
                [*id, highest + 1],
            )?;
            repairs.next_seq.push(topic.clone());
        }
        let next = (*next).max(highest + 1);
        if *horizon > next - 1 {
            tx.execute(
                "UPDATE destinations SET horizon = ?2 WHERE id = ?1",
                [*id, next - 1],
            )?;
        }
    }
    tx.commit()?;
    Ok(Ok(repairs))
}

/// The marker a run-time damage leaves beside the store.
pub fn marker(store: &Path) -> PathBuf {
    PathBuf::from(format!("{}.damaged", store.display()))
}

/// Leaves the marker (best effort: the disk may be the problem).
pub fn mark_damaged(store: &Path, reason: &str) {
    if let Err(e) = std::fs::write(marker(store), reason) {
        tracing::error!(error = %e, "cannot leave the damage marker beside the store");
    }
}
