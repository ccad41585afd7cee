//! Room on the disk and in the store's budget: the reserve file given back
//! when the disk fills, the disk-full episode, the `store.max_bytes` budget,
//! and shedding until there is room (see [`super::db::Db::shed_emergency`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::db::{Db, Shed};
use super::StoreError;
use crate::layout::DropReason;

/// Larger than what the WAL holds between checkpoints (1,000 pages) plus one
/// shedding transaction, so that both fit once it is given back.
const RESERVE_BYTES: usize = 8 * 1024 * 1024;
/// Room the file system must have beyond the reserve before the disk counts
/// as not full again.
const SPACE_TO_RECOVER: u64 = 4 * 1024 * 1024;
/// While the disk is full and nothing fits, new messages are tried at most
/// this often.
const RETRY_WHEN_FULL: Duration = Duration::from_secs(1);
/// How often the file system's free space is looked at.
const SPACE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// A file of a few MiB beside the store, given back to the file system when
/// the disk fills so that shedding (which writes to the WAL) can proceed.
pub struct Reserve {
    path: PathBuf,
}

impl Reserve {
    pub fn new(store: &Path) -> Reserve {
        Reserve {
            path: PathBuf::from(format!("{}.reserve", store.display())),
        }
    }

    fn present(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.len() == RESERVE_BYTES as u64)
    }

    /// Writes the reserve file if it is missing and the file system has
    /// room to spare; true if it is in place.
    pub fn fill(&self) -> bool {
        if self.present() {
            return true;
        }
        if self
            .free_bytes()
            .map_or(true, |f| f < RESERVE_BYTES as u64 + SPACE_TO_RECOVER)
        {
            return false;
        }
        let ok = std::fs::write(&self.path, vec![0u8; RESERVE_BYTES]).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&self.path);
        }
        ok
    }

    pub fn release(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// Free bytes on the file system of the store.
    fn free_bytes(&self) -> Option<u64> {
        let dir = self.path.parent()?;
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let st = rustix::fs::statvfs(dir).ok()?;
        Some(st.f_bavail.saturating_mul(st.f_frsize))
    }
}

/// The disk-full episode and the budget's re-arming.
pub struct Space {
    reserve: Reserve,
    disk_full: bool,
    last_full_failure: Option<Instant>,
    last_check: Option<Instant>,
    /// After shedding for `store.max_bytes` could not get under it, not
    /// again before the file uses this much.
    budget_rearm: Option<u64>,
}

/// What a look at the file system found.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    Unchanged,
    /// The disk has room again (this many bytes free).
    Recovered(u64),
}

impl Space {
    pub fn new(reserve: Reserve) -> Space {
        Space {
            reserve,
            disk_full: false,
            last_full_failure: None,
            last_check: None,
            budget_rearm: None,
        }
    }

    pub fn disk_full(&self) -> bool {
        self.disk_full
    }

    /// On a full disk where nothing fitted less than a second ago: new
    /// messages wait for the next tick.
    pub fn backing_off(&self, now: Instant) -> bool {
        self.disk_full
            && self
                .last_full_failure
                .is_some_and(|t| now.duration_since(t) < RETRY_WHEN_FULL)
    }

    /// Nothing fitted, not even after shedding.
    pub fn nothing_fitted(&mut self, now: Instant) {
        self.last_full_failure = Some(now);
    }

    /// A commit failed on a full disk: the reserve is given back. True if
    /// this starts the episode.
    pub fn enter_full(&mut self) -> bool {
        if self.disk_full {
            return false;
        }
        self.disk_full = true;
        self.reserve.release();
        true
    }

    /// About every two seconds: puts the reserve back if it is missing and,
    /// on a full disk, ends the episode once the file system has room for
    /// the reserve and some to spare.
    pub fn check(&mut self, now: Instant) -> Checked {
        if self
            .last_check
            .is_some_and(|t| now.duration_since(t) < SPACE_CHECK_EVERY)
        {
            return Checked::Unchanged;
        }
        self.last_check = Some(now);
        if !self.disk_full {
            self.reserve.fill();
            return Checked::Unchanged;
        }
        if !self.reserve.fill() {
            return Checked::Unchanged;
        }
        self.disk_full = false;
        Checked::Recovered(self.reserve.free_bytes().unwrap_or(0))
    }

    /// Whether the store, using `used` bytes, must shed for its `budget`
    /// now: over it, and grown by a tenth since the last shed that could
    /// not get under it.
    pub fn budget_due(&mut self, used: u64, budget: u64) -> bool {
        if used <= budget {
            self.budget_rearm = None;
            return false;
        }
        self.budget_rearm.map_or(true, |r| used >= r)
    }

    /// After shedding for the budget, the store uses `after` bytes. What is
    /// left cannot be shed (newest states, dead letters, reject backlogs):
    /// not again before it grew by a tenth.
    pub fn budget_shed(&mut self, after: u64, budget: u64) {
        self.budget_rearm = (after > budget).then(|| after + budget / 10);
    }
}

/// Sheds round by round (each shed goes to `count`) until `enough` says so
/// or nothing is left to shed; returns how many records were shed and
/// whether `enough` was reached.
pub fn shed_until(
    db: &mut Db,
    reason: DropReason,
    enough: impl Fn(&Db) -> Result<bool, StoreError>,
    mut count: impl FnMut(&Db, &Shed),
) -> Result<(u64, bool), StoreError> {
    let mut round = 0;
    let mut total = 0;
    loop {
        if enough(db)? {
            return Ok((total, true));
        }
        let shed = match db.shed_emergency(round, reason) {
            Ok(s) => s,
            Err(StoreError::DiskFull) if reason != DropReason::DiskFull => {
                return Ok((total, false))
            }
            Err(StoreError::DiskFull) => Shed::default(),
            Err(e) => return Err(e),
        };
        total += shed.total();
        count(db, &shed);
        if shed.is_empty() && round > 0 {
            return Ok((total, false));
        }
        round += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_sheds_again_only_after_growing_by_a_tenth() {
        let mut s = Space::new(Reserve::new(Path::new("/nonexistent/s.db")));
        assert!(!s.budget_due(1_000, 1_000));
        assert!(s.budget_due(1_001, 1_000));
        // Shedding got it down to 1,050: still over, stuck.
        s.budget_shed(1_050, 1_000);
        assert!(!s.budget_due(1_100, 1_000));
        assert!(s.budget_due(1_150, 1_000));
        // Under the budget once: armed again at once.
        s.budget_shed(1_200, 1_000);
        assert!(!s.budget_due(900, 1_000));
        assert!(s.budget_due(1_001, 1_000));
        // A shed that got under it leaves it armed.
        s.budget_shed(800, 1_000);
        assert!(s.budget_due(1_001, 1_000));
    }

    #[test]
    fn a_full_disk_backs_off_for_a_second_and_recovers_when_the_reserve_fits() {
        let dir = std::env::temp_dir().join(format!("ferry-space-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join("s.db");
        let reserve = Reserve::new(&store);
        assert!(reserve.fill(), "this test needs {RESERVE_BYTES} bytes free");
        let mut s = Space::new(reserve);
        let t0 = Instant::now();
        assert!(!s.backing_off(t0));
        assert!(s.enter_full());
        assert!(!s.enter_full(), "one episode");
        assert!(!dir.join("s.db.reserve").exists(), "given back");
        s.nothing_fitted(t0);
        assert!(s.backing_off(t0 + Duration::from_millis(999)));
        assert!(!s.backing_off(t0 + RETRY_WHEN_FULL));
        // This file system has room: the next check ends the episode and
        // puts the reserve back; checks are at most every two seconds.
        assert!(matches!(s.check(t0), Checked::Recovered(_)));
        assert!(!s.disk_full());
        assert!(dir.join("s.db.reserve").exists());
        assert!(s.enter_full());
        assert_eq!(s.check(t0 + Duration::from_secs(1)), Checked::Unchanged);
        assert!(s.disk_full());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
