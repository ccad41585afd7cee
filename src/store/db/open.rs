//! Opening a store: integrity check, schema upgrade (see [`schema`]), the
//! in-memory mirror of each destination, and moving a damaged store aside.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, MAIN_DB};

use super::redelivery::Acks;
use super::shedding::Pressure;
use super::*;

/// A store that was found damaged, and where it was moved.
#[derive(Debug, Clone)]
pub struct Damaged {
    pub moved_to: PathBuf,
    pub reason: String,
}

/// Runs SQLite's quick check on an existing store file. `Ok(Some(reason))`
/// only for damage (corruption, or not a database at all); any other
/// failure (locked, no permission, a full disk) is an error: the file may be
/// fine and must not be moved aside.
pub(super) fn check_integrity(path: &Path) -> Result<Option<String>, StoreError> {
    if !path.exists() {
        return Ok(None);
    }
    let check = || -> Result<String, rusqlite::Error> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0))
    };
    match check() {
        Ok(s) if s == "ok" => Ok(None),
        Ok(s) => Ok(Some(s)),
        Err(e) if schema::is_damage(&e) => Ok(Some(e.to_string())),
        Err(e) if is_disk_full(&e) => Err(StoreError::DiskFull),
        Err(source) => Err(StoreError::Open {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The page size of a store ferry makes.
pub const PAGE_SIZE: i64 = 1024;

/// A store with other pages is rewritten at open (in memory, all or
/// nothing) up to this size; a larger one keeps its pages.
const REPAGE_UP_TO: u64 = 8 << 20;

/// Rewrites the store with [`PAGE_SIZE`] pages (`VACUUM` outside WAL mode,
/// where SQLite can change the page size).
fn repage(conn: &Connection) -> Result<(), rusqlite::Error> {
    conn.pragma_update(None, "journal_mode", "DELETE")?;
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.execute_batch("VACUUM")
}

/// Renames a damaged store and its WAL and shared-memory files to
/// `<name>.damaged-<UTC time>[-wal|-shm]`; nothing is deleted.
pub(super) fn move_aside(path: &Path, reason: String) -> Result<Damaged, StoreError> {
    let stamp = utc_stamp(now_ms() / 1000);
    let mut target = PathBuf::from(format!("{}.damaged-{stamp}", path.display()));
    let mut n = 1;
    while target.exists() {
        target = PathBuf::from(format!("{}.damaged-{stamp}.{n}", path.display()));
        n += 1;
    }
    let io = |source| StoreError::MoveAside {
        path: path.to_path_buf(),
        source,
    };
    std::fs::rename(path, &target).map_err(io)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            std::fs::rename(&side, format!("{}{suffix}", target.display())).map_err(io)?;
        }
    }
    tracing::error!(store = %path.display(), moved_to = %target.display(), %reason,
        "STORE DAMAGED: it failed its integrity check and was moved aside (not deleted); starting a fresh store");
    Ok(Damaged {
        moved_to: target,
        reason,
    })
}

/// `YYYYMMDDTHHMMSSZ` for seconds since the epoch (the names of stores
/// moved aside keep this form).
pub fn utc_stamp(secs: u64) -> String {
    chrono::DateTime::from_timestamp(secs.min(i64::MAX as u64) as i64, 0)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%SZ")
        .to_string()
}

impl Db {
    /// Opens the store, creating or upgrading its schema. A damaged file
    /// (see [`schema`]) is moved aside with its WAL and a fresh store is
    /// started; a store written by a newer ferry is refused and left alone.
    pub fn open(
        path: &Path,
        layout: Layout,
        durability: Durability,
    ) -> Result<(Db, Option<Damaged>), StoreError> {
        let marker = schema::marker(path);
        let earlier = std::fs::read_to_string(&marker).ok();
        let mut damaged = match earlier {
            Some(reason) if path.exists() => Some(move_aside(
                path,
                format!("damage found while running: {}", reason.trim()),
            )?),
            _ => match check_integrity(path)? {
                None => None,
                Some(reason) => Some(move_aside(path, reason)?),
            },
        };
        let _ = std::fs::remove_file(&marker);
        let db = match Db::open_checked(path, layout.clone(), durability)? {
            Ok(db) => db,
            Err(reason) if damaged.is_none() => {
                damaged = Some(move_aside(path, reason)?);
                Db::open_checked(path, layout, durability)?
                    .map_err(|reason| StoreError::Damaged(format!("a fresh store: {reason}")))?
            }
            Err(reason) => return Err(StoreError::Damaged(format!("a fresh store: {reason}"))),
        };
        if let Some(d) = &damaged {
            db.incident(
                "store-damaged",
                &format!(
                    "the store was damaged ({}) and was moved to {}; a fresh store was started",
                    d.reason,
                    d.moved_to.display()
                ),
            )?;
        }
        Ok((db, damaged))
    }

    /// Opens, upgrades and checks the store at `path`. `Ok(Err(reason))`:
    /// it is damaged.
    pub(super) fn open_checked(
        path: &Path,
        layout: Layout,
        durability: Durability,
    ) -> Result<Result<Db, String>, StoreError> {
        let open_err = |source: rusqlite::Error| {
            if is_disk_full(&source) {
                StoreError::DiskFull
            } else {
                StoreError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        // Damage found while opening is reported as such; anything else
        // (a lock, a permission, a full disk) stops the start.
        // A file the operating system lets ferry write that SQLite still
        // finds read-only: its header says so (an unknown write version).
        let writable = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .is_ok()
        };
        let header_read_only =
            |e: &rusqlite::Error| e.sqlite_error_code() == Some(ErrorCode::ReadOnly) && writable();
        macro_rules! damage_or {
            ($r:expr) => {
                match $r {
                    Ok(v) => v,
                    Err(e) if schema::is_damage(&e) => return Ok(Err(e.to_string())),
                    Err(e) if header_read_only(&e) => {
                        return Ok(Err("its header makes the file read-only".into()))
                    }
                    Err(e) => return Err(open_err(e)),
                }
            };
        }
        let mut conn = Connection::open(path).map_err(open_err)?;
        if damage_or!(conn.is_readonly(MAIN_DB)) {
            if writable() {
                return Ok(Err("its header makes the file read-only".into()));
            }
            return Err(StoreError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
                    Some("the store file is not writable".into()),
                ),
            });
        }
        // No temporary files: a full disk must not stop a query.
        damage_or!(conn.pragma_update(None, "temp_store", "MEMORY"));
        // Small pages: a commit writes a WAL frame for every page it
        // touches. Takes effect on a new file; a small store of an earlier
        // ferry is rewritten with them.
        damage_or!(conn.pragma_update(None, "page_size", PAGE_SIZE));
        let page: i64 = damage_or!(conn.query_row("PRAGMA page_size", [], |r| r.get(0)));
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        if page != PAGE_SIZE && len <= REPAGE_UP_TO {
            match repage(&conn) {
                Ok(()) => tracing::info!(
                    from = page,
                    to = PAGE_SIZE,
                    "the store was rewritten with smaller pages"
                ),
                Err(e) if schema::is_damage(&e) => return Ok(Err(e.to_string())),
                Err(e) => tracing::warn!(error = %e, "the store keeps its {page}-byte pages"),
            }
        }
        damage_or!(conn.pragma_update(None, "journal_mode", "WAL"));
        damage_or!(conn.pragma_update(None, "wal_autocheckpoint", 4000));
        let sync = match durability {
            Durability::Full => "FULL",
            Durability::Interval(_) => "NORMAL",
        };
        damage_or!(conn.pragma_update(None, "synchronous", sync));
        // Give the WAL's space back to the file system after checkpoints.
        damage_or!(conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024));
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let found = match damage_or!(schema::detect(&conn)) {
            Ok(found) => found,
            Err(reason) => return Ok(Err(reason)),
        };
        let first = layout.dests.first().map(|d| schema::FirstDest {
            topic: &d.name,
            stream: &layout.streams[d.stream].name,
            role: d.role.as_str(),
        });
        match schema::upgrade(&mut conn, found, first) {
            Ok(()) => {}
            Err(StoreError::Sqlite(e)) if schema::is_damage(&e) => return Ok(Err(e.to_string())),
            Err(StoreError::Sqlite(e)) => return Err(open_err(e)),
            Err(StoreError::Damaged(reason)) => return Ok(Err(reason)),
            Err(e) => return Err(e),
        }
        let repairs = match damage_or!(schema::check(&mut conn)) {
            Ok(r) => r,
            Err(reason) => return Ok(Err(reason)),
        };
        for topic in &repairs.next_seq {
            tracing::warn!(%topic, "the store's next record number was behind its records; repaired");
        }
        let streams = layout.streams.len();
        let mut db = Db {
            conn,
            durability,
            dests: Vec::new(),
            clock: Clock::starting_at(0),
            acks: Acks::default(),
            pressure: Pressure::new(streams),
            refused: HashSet::new(),
            store_id: 0,
            horizons_file: PathBuf::from(format!("{}.horizons", path.display())),
            layout,
            dead_letter_limits: Default::default(),
        };
        damage_or!(db.map_destinations());
        for i in 0..db.dests.len() {
            let (lo, hi) = db.dests[i].range(0);
            let (n, bytes): (i64, i64) =
                damage_or!(db
                    .conn
                    .query_row(SQL_COUNT_RANGE, [lo, hi], |r| Ok((r.get(0)?, r.get(1)?))));
            db.dests[i].records = n as u64;
            db.dests[i].bytes = bytes as u64;
        }
        damage_or!(db.load_state());
        damage_or!(db.recall_horizons());
        // From now on the file speaks for this store as it is: a copy of
        // the store restored later must not take over horizons of records
        // numbered after this start.
        db.remember_horizons();
        Ok(Ok(db))
    }

    /// Reads the clock and the acknowledgement state from `store_state`.
    pub(super) fn load_state(&mut self) -> Result<(), rusqlite::Error> {
        let conn = &self.conn;
        let get = |name: &str| {
            Ok::<_, rusqlite::Error>(state_get(conn, name)?.unwrap_or(0).max(0) as u64)
        };
        // The clock goes on from where it was written last, or from the
        // newest record if that is later (the clock is written every few
        // seconds, records at every commit).
        let mut clock = get(STATE_CLOCK)?;
        for d in &self.dests {
            let (lo, hi) = d.range(0);
            let newest: Option<i64> = self
                .conn
                .query_row(SQL_NEWEST, [lo, hi], |r| r.get(0))
                .optional()?;
            clock = clock.max(newest.unwrap_or(0).max(0) as u64);
        }
        self.clock = Clock::starting_at(clock);
        self.store_id = match get(STATE_STORE_ID)? {
            0 => {
                // A store made before it had an id, or a new one.
                let id = rand::random::<u64>() >> 1 | 1;
                self.conn
                    .execute(SQL_STATE_PUT, params![STATE_STORE_ID, id as i64])?;
                id
            }
            id => id,
        };
        self.acks.commit_seq = get(STATE_COMMIT)?;
        self.acks.conn_seq = get(STATE_CONN)?;
        let rows: Vec<(i64, i64)> = self
            .conn
            .prepare("SELECT conn, gen FROM ack_confirmed")?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        self.acks.confirmed = rows
            .into_iter()
            .map(|(c, g)| (c.max(0) as u64, g.max(0) as u64))
            .collect();
        Ok(())
    }

    /// Finds (or adds) each configured destination's row in `destinations`
    /// (its `topic` column holds the destination's name: the topic, with
    /// `@<cluster>` when the clusters are named). The first of named
    /// clusters takes over the row of a topic written before the clusters
    /// had names, with its backlog and numbers: that was the same cluster.
    ///
    /// A topic's record numbers are the same in every cluster (each record
    /// is numbered once per destination, in the same commit): a cluster
    /// added later starts at the number its topic reached in the others, so
    /// that a record copied from one cluster to another keeps its number
    /// (`ferry-fleet refill`, [`Db::lost_by_cluster`]).
    pub(super) fn map_destinations(&mut self) -> Result<(), rusqlite::Error> {
        let tx = self.conn.transaction()?;
        let mut dests = Vec::new();
        let mut topic_next: HashMap<&str, i64> = HashMap::new();
        for d in &self.layout.dests {
            let found: Option<i64> = tx
                .query_row(
                    "SELECT next_seq FROM destinations WHERE topic = ?1 OR (topic = ?2 AND ?3)",
                    params![d.name, d.topic, d.cluster == 0],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(next) = found {
                let n = topic_next.entry(d.topic.as_str()).or_insert(1);
                *n = (*n).max(next);
            }
        }
        for d in &self.layout.dests {
            let stream = &self.layout.streams[d.stream].name;
            let find = |name: &str| {
                tx.query_row(
                    "SELECT id, next_seq, stream, role, horizon FROM destinations WHERE topic = ?1",
                    [name],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()
            };
            let mut found: Option<(i64, i64, String, String, i64)> = find(&d.name)?;
            if found.is_none() && d.cluster == 0 && d.name != d.topic {
                found = find(&d.topic)?;
                if let Some((id, ..)) = &found {
                    tx.execute(
                        "UPDATE destinations SET topic = ?2 WHERE id = ?1",
                        params![id, d.name],
                    )?;
                }
            }
            let (id, next_seq, horizon) = match found {
                Some((id, next, old_stream, old_role, horizon)) => {
                    // Written only when it changed: a start on a full disk
                    // must not need to write.
                    if old_stream != *stream || old_role != d.role.as_str() {
                        tx.execute(
                            "UPDATE destinations SET stream = ?2, role = ?3 WHERE id = ?1",
                            params![id, stream, d.role.as_str()],
                        )?;
                    }
                    (id, next, horizon)
                }
                None => {
                    let id: i64 = tx.query_row(
                        "SELECT COALESCE(MAX(id), 0) + 1 FROM destinations",
                        [],
                        |r| r.get(0),
                    )?;
                    if id as u64 > schema::MAX_DEST_ID {
                        return Err(rusqlite::Error::IntegralValueOutOfRange(0, id));
                    }
                    let next = topic_next.get(d.topic.as_str()).copied().unwrap_or(1);
                    tx.execute(
                        "INSERT INTO destinations (id, topic, next_seq, stream, role, horizon) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
                        params![id, d.name, next, stream, d.role.as_str()],
                    )?;
                    (id, next, 0)
                }
            };
            dests.push(Dest {
                id: id as u64,
                next_seq: next_seq as u64,
                horizon: horizon as u64,
                ..Dest::default()
            });
        }
        tx.commit()?;
        self.dests = dests;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn stamps_are_utc_and_sort_by_time() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(1_796_000_000), "20261130T005320Z");
        assert_eq!(super::utc_stamp(951_825_600), "20000229T120000Z");
    }
}
