//! What a ferry's store holds, read (or, for a stopped ferry, changed)
//! through a separate SQLite connection: counters, the backlog, dead
//! letters, stores moved aside; and waiting for the store to fill or drain.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{tail, Ferry};

/// One row of the store's dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub mqtt_topic: String,
    pub reason: String,
    /// The payload's size as the device sent it.
    pub size: i64,
    /// What the store kept of the payload.
    pub payload: Vec<u8>,
}

impl Ferry {
    /// The store's lifetime counters, read through a separate connection.
    pub fn counters(&self) -> BTreeMap<String, i64> {
        read_counters(&self.store_path())
    }

    /// A connection to the store (for a test's own query or change; ferry
    /// should be stopped for a change).
    pub fn open_store(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(self.store_path()).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// Runs SQL statements on the (stopped) ferry's store.
    pub fn execute_on_store(&self, sql: &str) {
        self.open_store().execute_batch(sql).unwrap();
    }

    /// The store's dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let db = self.open_store();
        let mut stmt = db
            .prepare("SELECT mqtt_topic, reason, size, payload FROM dead_letters ORDER BY id")
            .unwrap();
        let rows = stmt
            .query_map([], |r| {
                Ok(DeadLetter {
                    mqtt_topic: r.get(0)?,
                    reason: r.get(1)?,
                    size: r.get(2)?,
                    payload: r.get(3)?,
                })
            })
            .unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    /// Records still waiting in the store.
    pub fn pending(&self) -> i64 {
        self.try_pending().expect("the store has an outbox")
    }

    /// Records still waiting, if the file is a store ferry has opened.
    pub fn try_pending(&self) -> Option<i64> {
        let c = rusqlite::Connection::open(self.store_path()).ok()?;
        c.busy_timeout(Duration::from_secs(5)).ok()?;
        c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .ok()
    }

    /// Waits until the store has stored `n` records in its life.
    pub async fn wait_stored(&self, n: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !(self.store_path().exists()
            && self.counters().get("stored").copied().unwrap_or(0) >= n)
        {
            assert!(
                Instant::now() < deadline,
                "store never held {n} records: {:?}",
                self.counters()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (2 s at a time, two minutes at most) until the store's
    /// `stored` counter stops moving: ferry has taken in all it can.
    pub async fn wait_stored_settles(&self) {
        let mut last = 0;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = self.counters().get("stored").copied().unwrap_or(0);
            if now == last {
                break;
            }
            last = now;
        }
    }

    /// Waits until the store has stored `stored` records in its life and
    /// holds none pending.
    pub async fn wait_drained(&self, stored: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.store_path().exists()
                && self.counters().get("stored").copied().unwrap_or(0) >= stored
                && self.try_pending() == Some(0)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "store stored {:?} and still holds {:?} records; log tail:\n{}",
                self.counters().get("stored"),
                self.try_pending(),
                tail(&self.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The names of the files in ferry's directory.
    pub fn files(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    }

    /// Stores ferry moved aside as damaged (without their `-wal`, `-shm`).
    pub fn moved_aside(&self) -> Vec<String> {
        self.files()
            .into_iter()
            .filter(|n| n.contains("damaged-") && !n.ends_with("-wal") && !n.ends_with("-shm"))
            .collect()
    }
}

/// The store's lifetime counters; none while the file is not (yet) a
/// store ferry has opened (a damaged file before ferry moved it aside, an
/// old version before ferry upgraded it).
pub fn read_counters(store: &Path) -> BTreeMap<String, i64> {
    let read = || -> rusqlite::Result<BTreeMap<String, i64>> {
        let c = rusqlite::Connection::open(store)?;
        c.busy_timeout(Duration::from_secs(5))?;
        let mut stmt = c.prepare("SELECT name, value FROM counters")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    };
    read().unwrap_or_default()
}
