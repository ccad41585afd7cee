//! The view's database: the latest state of every device, one row per
//! device, behind [`ViewStore`] so that SQLite (one `view` process, or
//! several on one machine) and PostgreSQL (several machines) share the
//! code above them.
//!
//! ## The one rule every implementation keeps
//!
//! [`ViewStore::apply`] writes an update only if it is newer than the row
//! (see [`crate::view::apply::decide`], which states the rule as a pure
//! function and is what the implementations are tested against), and
//! decides that *in the same statement that writes*, so that two `view`
//! processes racing on one device cannot both win:
//!
//! ```sql
//! INSERT INTO devices (device, gateway, record, received_ms, state, topic, applied_ms)
//! VALUES (?, ?, ?, ?, ?, ?, ?)
//! ON CONFLICT (device) DO UPDATE SET ... = excluded....
//! WHERE (devices.gateway = excluded.gateway AND devices.record < excluded.record)
//!    OR (devices.gateway <> excluded.gateway AND devices.received_ms < excluded.received_ms)
//! ```
//!
//! One row changed: applied; none: stale. SQLite (3.24 and later) and
//! PostgreSQL (9.5 and later) both take this statement as written
//! ([`UPSERT`]): never a `SELECT` then an `UPDATE`, which two processes can
//! interleave. `record` and `received_ms` are `BIGINT`, `state` `TEXT`; a
//! refused or unreachable database is a [`DbError`], so that the view
//! retries the update.

pub mod postgres;
pub mod sqlite;

use serde::Serialize;
use thiserror::Error;

/// One device's state as a gateway reported it: what the view writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateUpdate {
    pub device: String,
    pub gateway: String,
    /// The gateway's record number (`ferry.record`): rises per gateway,
    /// never reused. Within `i64` (checked when the message is read).
    pub record: i64,
    /// When the gateway received it (`ferry.received_ms`, the gateway's
    /// clock); 0 if the message did not say.
    pub received_ms: i64,
    /// The device's JSON state, as the gateway sent it.
    pub state: String,
    /// The status topic it was first published on.
    pub topic: String,
}

/// A row of the view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub device: String,
    pub gateway: String,
    pub record: i64,
    pub received_ms: i64,
    /// The device's state (JSON).
    pub state: serde_json::Value,
}

impl Row {
    /// `get`'s text form: one field a line.
    pub fn to_text(&self) -> String {
        format!(
            "device       {}\ngateway      {}\nrecord       {}\nreceived_ms  {}\nstate        {}\n",
            self.device, self.gateway, self.record, self.received_ms, self.state
        )
    }
}

/// `list`'s text form: a tab-separated table and the count.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from("DEVICE\tGATEWAY\tRECORD\tSTATE\n");
    for r in rows {
        t.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            r.device, r.gateway, r.record, r.state
        ));
    }
    t.push_str(&format!("{} devices\n", rows.len()));
    t
}

/// What [`ViewStore::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The row now holds the update.
    Applied,
    /// The row already held this update or a newer one; unchanged.
    Stale,
}

#[derive(Debug, Error)]
pub enum DbError {
    #[error("database {0}: not supported (sqlite:<path> or postgres://...)")]
    Unsupported(String),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgresql: {}", postgres_message(.0))]
    Postgres(#[from] ::postgres::Error),
    #[error("cannot create the database's folder {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("row of {device} holds a state that is not JSON: {source}")]
    BadRow {
        device: String,
        source: serde_json::Error,
    },
}

/// A PostgreSQL error with the server's own words: the crate's `Display`
/// says only "db error" for what the server refused.
fn postgres_message(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{e}: {db}"),
        None => e.to_string(),
    }
}

/// The latest state per device. Blocking: call it off the async threads.
pub trait ViewStore: Send {
    /// Writes `update` if it is newer than the device's row (one statement).
    fn apply(&mut self, update: &StateUpdate) -> Result<Applied, DbError>;
    /// The row of one device.
    fn get(&self, device: &str) -> Result<Option<Row>, DbError>;
    /// Every row, by device.
    fn list(&self) -> Result<Vec<Row>, DbError>;
}

/// Opens the database `view.database` names (`sqlite:<path>` or
/// `postgres://...`), creating its table if needed.
pub fn open(database: &str) -> Result<Box<dyn ViewStore>, DbError> {
    if let Some(path) = database.strip_prefix("sqlite:") {
        return Ok(Box::new(sqlite::SqliteStore::open(path)?));
    }
    if database.starts_with("postgres://") || database.starts_with("postgresql://") {
        return Ok(Box::new(postgres::PostgresStore::open(database)?));
    }
    Err(DbError::Unsupported(
        database.split("://").next().unwrap_or(database).to_string(),
    ))
}

/// A row's or an update's gateway, record number and reception time.
pub type RuleSide = (&'static str, i64, i64);

/// Cases of the apply rule, (row, update), that every implementation is
/// tested on against [`crate::view::apply::decide`].
#[doc(hidden)]
pub const RULE_CASES: [(RuleSide, RuleSide); 6] = [
    (("a", 5, 100), ("a", 6, 50)),
    (("a", 5, 100), ("a", 5, 100)),
    (("a", 5, 100), ("a", 4, 200)),
    (("a", 5, 100), ("b", 1, 101)),
    (("a", 5, 100), ("b", 9, 100)),
    (("a", 5, 100), ("b", 9, 99)),
];

/// The conditional upsert, in SQL both SQLite and PostgreSQL accept (with
/// `$n` placeholders, as both do).
pub const UPSERT: &str =
    "INSERT INTO devices (device, gateway, record, received_ms, state, topic, applied_ms)
 VALUES ($1, $2, $3, $4, $5, $6, $7)
 ON CONFLICT (device) DO UPDATE SET
   gateway = excluded.gateway, record = excluded.record, received_ms = excluded.received_ms,
   state = excluded.state, topic = excluded.topic, applied_ms = excluded.applied_ms
 WHERE (devices.gateway = excluded.gateway AND devices.record < excluded.record)
    OR (devices.gateway <> excluded.gateway AND devices.received_ms < excluded.received_ms)";

/// The table, in SQL both accept (`BIGINT` is SQLite's `INTEGER`).
pub const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS devices (
   device      TEXT PRIMARY KEY,
   gateway     TEXT NOT NULL,
   record      BIGINT NOT NULL,
   received_ms BIGINT NOT NULL,
   state       TEXT NOT NULL,
   topic       TEXT NOT NULL,
   applied_ms  BIGINT NOT NULL
 )";

pub const SELECT_ONE: &str =
    "SELECT device, gateway, record, received_ms, state FROM devices WHERE device = $1";

pub const SELECT_ALL: &str =
    "SELECT device, gateway, record, received_ms, state FROM devices ORDER BY device";
