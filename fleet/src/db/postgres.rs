//! The view in PostgreSQL, for several `view` processes on several
//! machines: the same table and the same one-statement conditional upsert
//! as SQLite ([`super::UPSERT`]); PostgreSQL's row lock on the conflicting
//! row makes concurrent upserts of one device take turns, and each
//! re-evaluates the `WHERE` against the row the other wrote.
//!
//! The connection is the `postgres` crate's blocking client (called off
//! the async threads, like every [`ViewStore`]); `database` is a libpq URL,
//! `postgres://user[:password]@host[:port]/dbname`, without TLS for now
//! (keep it on a private network or a local socket forwarder).

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls, Statement};

use super::{
    Applied, DbError, Row, StateUpdate, ViewStore, SCHEMA, SELECT_ALL, SELECT_ONE, UPSERT,
};

/// The advisory lock key under which the schema is created ("ferryvw").
const SCHEMA_LOCK: i64 = 0x0066_6572_7279_7677;

pub struct PostgresStore {
    /// `None` only while being dropped.
    client: Option<Mutex<Client>>,
    /// [`UPSERT`], prepared once: a statement given as text is parsed by
    /// the server at every call, one more round trip per update.
    upsert: Statement,
}

impl PostgresStore {
    /// Connects and creates the table if needed. Several views starting
    /// at once take turns: two concurrent `CREATE TABLE IF NOT EXISTS` in
    /// PostgreSQL may both find no table and the second then fails on the
    /// catalog's unique index, so the creation holds a transaction-level
    /// advisory lock.
    pub fn open(url: &str) -> Result<PostgresStore, DbError> {
        let mut client = Client::connect(url, NoTls)?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        tx.batch_execute(SCHEMA)?;
        tx.commit()?;
        let upsert = client.prepare(UPSERT)?;
        Ok(PostgresStore {
            client: Some(Mutex::new(client)),
            upsert,
        })
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client
            .as_ref()
            .expect("present until dropped")
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for PostgresStore {
    /// The client runs a runtime of its own, which may not be dropped on an
    /// async thread: it goes on a thread of its own then.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::spawn(move || drop(client)).join();
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn to_row(r: &postgres::Row) -> Result<Row, DbError> {
    let device: String = r.try_get(0)?;
    let state: String = r.try_get(4)?;
    let state = serde_json::from_str(&state).map_err(|source| DbError::BadRow {
        device: device.clone(),
        source,
    })?;
    Ok(Row {
        device,
        gateway: r.try_get(1)?,
        record: r.try_get(2)?,
        received_ms: r.try_get(3)?,
        state,
    })
}

impl ViewStore for PostgresStore {
    fn apply(&mut self, u: &StateUpdate) -> Result<Applied, DbError> {
        let upsert = self.upsert.clone();
        let changed = self.client().execute(
            &upsert,
            &[
                &u.device,
                &u.gateway,
                &u.record,
                &u.received_ms,
                &u.state,
                &u.topic,
                &now_ms(),
            ],
        )?;
        Ok(if changed == 1 {
            Applied::Applied
        } else {
            Applied::Stale
        })
    }

    fn get(&self, device: &str) -> Result<Option<Row>, DbError> {
        let rows = self.client().query(SELECT_ONE, &[&device])?;
        rows.first().map(to_row).transpose()
    }

    fn list(&self) -> Result<Vec<Row>, DbError> {
        let rows = self.client().query(SELECT_ALL, &[])?;
        rows.iter().map(to_row).collect()
    }
}
