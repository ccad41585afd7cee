//! The view in SQLite: one file, WAL (readers such as `get` and `list` never
//! wait for the view's writes), `synchronous = NORMAL` (a power cut may
//! lose the last applied updates, never corrupt the file; they were
//! acknowledged to Pulsar already, so `replay` from the compacted topics
//! restores them). Several `view` processes on one machine may share the
//! file: each write is one statement, and SQLite serializes writers (a
//! busy writer waits up to [`BUSY_TIMEOUT`]).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use super::{
    Applied, DbError, Row, StateUpdate, ViewStore, SCHEMA, SELECT_ALL, SELECT_ONE, UPSERT,
};

/// How long a write waits for another process's write to finish.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (or creates) the database file and its table.
    pub fn open(path: &str) -> Result<SqliteStore, DbError> {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|source| DbError::Folder {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let conn = Connection::open(path)?;
        Self::on(conn)
    }

    /// An in-memory database (tests).
    pub fn memory() -> Result<SqliteStore, DbError> {
        Self::on(Connection::open_in_memory()?)
    }

    fn on(conn: Connection) -> Result<SqliteStore, DbError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute(SCHEMA, [])?;
        Ok(SqliteStore { conn })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64, i64, String)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn to_row(
    (device, gateway, record, received_ms, state): (String, String, i64, i64, String),
) -> Result<Row, DbError> {
    let state = serde_json::from_str(&state).map_err(|source| DbError::BadRow {
        device: device.clone(),
        source,
    })?;
    Ok(Row {
        device,
        gateway,
        record,
        received_ms,
        state,
    })
}

impl ViewStore for SqliteStore {
    fn apply(&mut self, u: &StateUpdate) -> Result<Applied, DbError> {
        let changed = self.conn.prepare_cached(UPSERT)?.execute(params![
            u.device,
            u.gateway,
            u.record,
            u.received_ms,
            u.state,
            u.topic,
            now_ms()
        ])?;
        Ok(if changed == 1 {
            Applied::Applied
        } else {
            Applied::Stale
        })
    }

    fn get(&self, device: &str) -> Result<Option<Row>, DbError> {
        let r = self
            .conn
            .prepare_cached(SELECT_ONE)?
            .query_row([device], row)
            .optional()?;
        r.map(to_row).transpose()
    }

    fn list(&self) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.conn.prepare_cached(SELECT_ALL)?;
        let rows = stmt.query_map([], row)?;
        rows.map(|r| to_row(r?)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::apply::{decide, Decision};

    fn update(device: &str, gateway: &str, record: i64, received_ms: i64) -> StateUpdate {
        StateUpdate {
            device: device.into(),
            gateway: gateway.into(),
            record,
            received_ms,
            state: format!(r#"{{"r":{record}}}"#),
            topic: format!("persistent://t/n/{gateway}-status"),
        }
    }

    /// The one statement agrees with the pure rule on every case.
    #[test]
    fn the_upsert_agrees_with_decide() {
        for ((rg, rr, rm), (ug, ur, um)) in super::super::RULE_CASES {
            let mut s = SqliteStore::memory().unwrap();
            assert_eq!(s.apply(&update("d", rg, rr, rm)).unwrap(), Applied::Applied);
            let before = s.get("d").unwrap().unwrap();
            let u = update("d", ug, ur, um);
            let want = decide(&u, Some(&before));
            let got = s.apply(&u).unwrap();
            let after = s.get("d").unwrap().unwrap();
            match want {
                Decision::Apply => {
                    assert_eq!(got, Applied::Applied, "{u:?} over {before:?}");
                    assert_eq!((after.gateway.as_str(), after.record), (ug, ur));
                }
                Decision::Stale => {
                    assert_eq!(got, Applied::Stale, "{u:?} over {before:?}");
                    assert_eq!(after, before);
                }
            }
        }
    }

    #[test]
    fn get_and_list_read_the_rows_back_by_device() {
        let mut s = SqliteStore::memory().unwrap();
        s.apply(&update("d2", "a", 1, 10)).unwrap();
        s.apply(&update("d1", "a", 2, 11)).unwrap();
        assert_eq!(s.get("nope").unwrap(), None);
        let d1 = s.get("d1").unwrap().unwrap();
        assert_eq!(d1.state, serde_json::json!({"r": 2}));
        let all: Vec<String> = s.list().unwrap().into_iter().map(|r| r.device).collect();
        assert_eq!(all, ["d1", "d2"]);
    }

    #[test]
    fn a_refusing_database_is_an_error_not_stale() {
        let mut s = SqliteStore::memory().unwrap();
        s.conn
            .execute_batch(
                "CREATE TRIGGER no BEFORE INSERT ON devices WHEN NEW.device = 'x'
                 BEGIN SELECT RAISE(ABORT, 'refused'); END;",
            )
            .unwrap();
        assert!(s.apply(&update("x", "a", 1, 1)).is_err());
        assert_eq!(s.apply(&update("y", "a", 1, 1)).unwrap(), Applied::Applied);
    }
}
