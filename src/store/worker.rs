//! The store thread: group commits, the commands of ingest and the uplink
//! sessions, back-pressure towards ingest, and the periodic work (gauges,
//! the status snapshot, age limits, the interval sync, disk space).

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::db::{self, Db, Delivery, Shed};
use super::holdback::{HoldBack, MAX_PARKED_BYTES};
use super::space::{self, Checked, Space};
use super::{schema, AckToken, Command, DownlinkCommand, Inbound, Intake, StoreError};
use crate::config::{Durability, Overflow, StoreConfig};
use crate::layout::DropReason;

pub(super) struct Worker {
    db: Db,
    rx: mpsc::Receiver<Command>,
    acks: tokio::sync::mpsc::UnboundedSender<Vec<AckToken>>,
    committed: watch::Sender<Vec<u64>>,
    cfg: StoreConfig,
    beat: crate::notify::Beat,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    last_gauges: Option<Instant>,
    last_snapshot: Option<Instant>,
    last_sync: Instant,
    last_age_check: Option<Instant>,
    /// When the last group commit began (the next waits for companions
    /// until `commit_max_wait` after it).
    last_commit: Option<Instant>,
    /// When the dead letters were last pruned for their age.
    last_prune: Option<Instant>,
    /// When what was shed last went to the audit trail.
    last_shed_audit: Option<Instant>,
    /// Recent deliveries (when, how many) for the drain rate.
    deliveries: VecDeque<(Instant, u64)>,
    /// Messages neither stored nor acknowledged yet.
    held: HoldBack,
    /// Records left the store outside a commit: try the held messages again.
    retry_held: bool,
    /// When the held messages were last tried.
    last_retry: Instant,
    /// Per MQTT session of ingest: tells it to disconnect when too much of
    /// it is held back, and to come back once there is room.
    accepting: Vec<watch::Sender<Intake>>,
    space: Space,
    /// Deliveries whose deletion failed on a full disk, retried later.
    undelivered: Vec<Delivery>,
}

/// How often dead letters are pruned for their age (and at start, and
/// after a reload); a new dead letter prunes in its own commit.
const DEAD_LETTER_PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Records shed go to the audit trail summed over this long.
const SHED_AUDIT_EVERY: Duration = Duration::from_secs(60);

/// Held-back messages are tried again at least this often.
const RETRY_HELD_EVERY: Duration = Duration::from_secs(1);

/// The window the drain rate is averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(30);

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        db: Db,
        rx: mpsc::Receiver<Command>,
        acks: tokio::sync::mpsc::UnboundedSender<Vec<AckToken>>,
        committed: watch::Sender<Vec<u64>>,
        accepting: Vec<watch::Sender<Intake>>,
        cfg: StoreConfig,
        space: Space,
        beat: crate::notify::Beat,
        live: crate::status::Live,
        metrics: crate::metrics::Metrics,
    ) -> Worker {
        let mut db = db;
        db.set_dead_letter_limits(cfg.dead_letters);
        let streams = db.layout().streams.len();
        Worker {
            db,
            rx,
            acks,
            committed,
            cfg,
            beat,
            live,
            metrics,
            last_gauges: None,
            last_snapshot: None,
            last_sync: Instant::now(),
            last_age_check: None,
            last_commit: None,
            last_prune: None,
            last_shed_audit: None,
            deliveries: VecDeque::new(),
            held: HoldBack::new(streams, accepting.len()),
            retry_held: false,
            last_retry: Instant::now(),
            accepting,
            space,
            undelivered: Vec::new(),
        }
    }

    pub(super) fn run(mut self) -> Result<(), StoreError> {
        let result = self.main_loop();
        match &result {
            Ok(()) => {
                let _ = self.db.save_state_now();
            }
            Err(StoreError::Damaged(reason)) => {
                schema::mark_damaged(&self.cfg.path, reason);
                tracing::error!(store = %self.cfg.path.display(), %reason,
                    "STORE DAMAGED while running: ferry stops; the next start moves the store aside (not deleted) and starts a fresh one");
            }
            Err(e) => tracing::error!(error = %e, "store thread failed"),
        }
        result
    }

    fn main_loop(&mut self) -> Result<(), StoreError> {
        let mut inserts = Vec::new();
        let mut deliveries: Vec<Delivery> = Vec::new();
        let mut others = Vec::new();
        let hang_at =
            crate::notify::hang_requested("store").then(|| Instant::now() + Duration::from_secs(2));
        loop {
            self.beat.tick();
            self.periodic()?;
            if hang_at.is_some_and(|t| Instant::now() >= t) {
                crate::notify::hang_forever("store");
            }
            // Wait for the first command (waking to tick the beat), then
            // gather more (group commit) until `commit_max_wait` after the
            // previous commit began: after a quiet spell that moment has
            // passed and the message commits at once; under load commits
            // stay that far apart, each taking what arrived meanwhile.
            let first = match self.rx.recv_timeout(crate::notify::BEAT_EVERY) {
                Ok(c) => c,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if !self.held.is_empty() {
                        self.commit(Vec::new(), Vec::new())?;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let now = Instant::now();
            let deadline = self
                .last_commit
                .map_or(now, |t| (t + self.cfg.commit_max_wait).max(now));
            let mut closed = false;
            let mut next = Some(first);
            while let Some(cmd) = next.take() {
                match cmd {
                    Command::Insert(m) => inserts.push(m),
                    // Deliveries are cumulative: the highest per destination
                    // is all that counts.
                    Command::Delivered {
                        dest,
                        up_to,
                        resent,
                    } => match deliveries.iter_mut().find(|d| d.dest == dest) {
                        Some(d) => {
                            d.up_to = d.up_to.max(up_to);
                            d.resent += resent;
                        }
                        None => deliveries.push(Delivery {
                            dest,
                            up_to,
                            resent,
                        }),
                    },
                    // What came before a new connection is stored first.
                    epoch @ Command::Epoch { .. } => {
                        others.push(epoch);
                        break;
                    }
                    other => others.push(other),
                }
                if inserts.len() >= self.cfg.commit_max_batch {
                    break;
                }
                // Only inserts are worth waiting for; anything else is served
                // once the queue is empty.
                let wait = if inserts.is_empty() {
                    Duration::ZERO
                } else {
                    deadline.saturating_duration_since(Instant::now())
                };
                next = match self.rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        closed = true;
                        None
                    }
                };
            }
            // Deletions ride along with the inserts: one transaction, one
            // fsync for both.
            let deliveries = std::mem::take(&mut deliveries);
            if !inserts.is_empty() || (!deliveries.is_empty() && !self.held.is_empty()) {
                self.commit(std::mem::take(&mut inserts), deliveries)?;
            } else {
                self.deliver_all(deliveries)?;
            }
            if self.serve(&mut others)? && !self.held.is_empty() {
                self.commit(Vec::new(), Vec::new())?;
            }
            if closed {
                return Ok(());
            }
        }
    }

    /// Deletes what the broker confirmed, then stores what was parked and
    /// `new` in arrival order, in one transaction; releases the acks of what
    /// was committed.
    fn commit(&mut self, new: Vec<Inbound>, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        self.last_commit = Some(Instant::now());
        if self.space.backing_off(Instant::now()) {
            // Nothing new fits now; try again on the next tick.
            for m in new {
                self.held.hold(m);
            }
            self.backpressure();
            return self.deliver_all(deliveries);
        }
        // Held messages are tried again when room may have freed: a commit
        // without new messages (a timer, records confirmed, new limits),
        // one deleting records of a stream that holds back, or after a
        // second at most.
        let layout = self.db.layout();
        let retry = new.is_empty()
            || std::mem::take(&mut self.retry_held)
            || self.last_retry.elapsed() >= RETRY_HELD_EVERY
            || deliveries
                .iter()
                .any(|d| self.held.holds(layout.dests[d.dest].stream));
        if retry {
            self.last_retry = Instant::now();
        }
        let batch = self.held.batch(new, retry);
        if batch.is_empty() {
            return self.deliver_all(deliveries);
        }
        let began = Instant::now();
        let out = match self.try_insert(&batch, &deliveries)? {
            Some(out) => out,
            None => {
                // Nothing fits: everything waits, unacknowledged.
                self.space.nothing_fitted(Instant::now());
                for m in batch {
                    self.held.hold(m);
                }
                self.backpressure();
                return self.deliver_all(deliveries);
            }
        };
        if !deliveries.is_empty() {
            self.deliveries.push_back((Instant::now(), out.delivered));
        }
        let m = &self.metrics;
        m.store_commit_seconds
            .observe(began.elapsed().as_secs_f64());
        m.store_stored.inc_by(out.stored);
        m.store_dead_lettered.inc_by(out.dead_lettered);
        m.store_dead_letters_pruned.inc_by(out.pruned.letters);
        m.store_redeliveries_dropped.inc_by(out.redelivered);
        m.store_retained_unchanged.inc_by(out.retained_unchanged);
        self.count_shed(&out.shed);
        let mut rejecting = vec![false; self.held.rejecting().len()];
        let mut parked_idx = out.parked.iter().peekable();
        for (i, mut msg) in batch.into_iter().enumerate() {
            if parked_idx.peek() == Some(&&i) {
                parked_idx.next();
                if let Some(s) = msg.stream {
                    rejecting[s] = true;
                }
                msg.counted = true;
                self.held.hold(msg);
            }
        }
        if !retry {
            // Streams whose held messages were not tried stay as they were.
            for (s, r) in rejecting.iter_mut().enumerate() {
                *r |= self.held.rejecting()[s] && self.held.holds(s);
            }
        }
        self.set_rejecting(rejecting);
        self.backpressure();
        self.committed.send_replace(self.db.last_seqs());
        // One commit's acks travel together: a barrier sent after some of
        // them must never confirm the commit while others are not out.
        if !out.acks.is_empty() {
            let _ = self.acks.send(out.acks);
        }
        if let Some(budget) = self.cfg.max_bytes {
            if self.space.budget_due(self.db.used_bytes()?, budget) {
                self.shed_for_budget(budget)?;
                let after = self.db.used_bytes()?;
                self.space.budget_shed(after, budget);
            }
        }
        Ok(())
    }

    /// Inserts a batch. On a full disk the store works inside the space its
    /// files already have: it sheds (superseded states first, then the
    /// oldest history and events) until its free pages can take the batch,
    /// and restarts the WAL after each commit so that it does not grow.
    /// `None`: nothing fits even then.
    fn try_insert(
        &mut self,
        batch: &[Inbound],
        deliveries: &[Delivery],
    ) -> Result<Option<db::BatchOutcome>, StoreError> {
        if self.space.disk_full() && !self.make_room(batch)? {
            return Ok(None);
        }
        let max_payload = self.cfg.max_payload_bytes;
        let forget = self.held.take_forget();
        let out = match self
            .db
            .commit_batch(deliveries, &forget, batch, max_payload)
        {
            Ok(out) => out,
            Err(StoreError::DiskFull) => {
                self.enter_disk_full();
                if !self.make_room(batch)? {
                    self.held.unforget(forget);
                    return Ok(None);
                }
                match self
                    .db
                    .commit_batch(deliveries, &forget, batch, max_payload)
                {
                    Ok(out) => out,
                    Err(StoreError::DiskFull) => {
                        self.held.unforget(forget);
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if self.space.disk_full() {
            self.db.checkpoint(true);
        }
        Ok(Some(out))
    }

    fn enter_disk_full(&mut self) {
        if !self.space.enter_full() {
            return;
        }
        self.metrics.store_disk_full.set(1);
        // Move the WAL into the store file while the reserve's room is there.
        self.db.checkpoint(true);
        tracing::error!(store = %self.cfg.path.display(),
            "DISK FULL: shedding superseded states and the oldest history/events to keep every device's newest state; what does not fit stays with the MQTT broker, unacknowledged");
        let _ = self.db.incident(
            "disk-full",
            "the disk filled; ferry shed the cheapest records and kept every device's newest state",
        );
    }

    /// Sheds round by round until the store's free pages can take `batch`
    /// (with room to spare); false if nothing is left to shed.
    fn make_room(&mut self, batch: &[Inbound]) -> Result<bool, StoreError> {
        let need = self.room_for(batch);
        self.make_room_bytes(need)
    }

    fn room_for(&self, batch: &[Inbound]) -> u64 {
        let layout = self.db.layout();
        // What each message will take: a dead letter only the part of its
        // payload that is kept.
        batch
            .iter()
            .map(|m| db::stored_size(layout, m, self.cfg.max_payload_bytes))
            .sum::<u64>()
            + 64 * 1024
    }

    fn make_room_bytes(&mut self, need: u64) -> Result<bool, StoreError> {
        let metrics = &self.metrics;
        let (_, room) = space::shed_until(
            &mut self.db,
            DropReason::DiskFull,
            |db| Ok(db.free_page_bytes()? >= need),
            |db, shed| count_shed(metrics, db, shed),
        )?;
        Ok(room)
    }

    /// Sheds until the store is a tenth under `store.max_bytes`, or nothing
    /// is left to shed.
    fn shed_for_budget(&mut self, budget: u64) -> Result<(), StoreError> {
        let metrics = &self.metrics;
        let (total, _) = space::shed_until(
            &mut self.db,
            DropReason::StoreFull,
            |db| Ok(db.used_bytes()? <= budget - budget / 10),
            |db, shed| count_shed(metrics, db, shed),
        )?;
        if total > 0 {
            tracing::warn!(
                reason = DropReason::StoreFull.as_str(),
                shed = total,
                "store over its budget: superseded states and the oldest history/events were shed"
            );
        }
        Ok(())
    }

    /// Asks each MQTT session of ingest to disconnect when too much of it
    /// is held back in memory, and to come back once the streams it held
    /// back have room (`reject` streams below 90% of their limits) and the
    /// disk is not full. Each session on its own: a `reject` stream's
    /// session never stops the others.
    fn backpressure(&mut self) {
        let mut disk_room = None;
        for session in 0..self.accepting.len() {
            let paused = !self.accepting[session].borrow().open;
            if !paused && self.held.over_memory(session) {
                // The broker redelivers what was never acked, and everything
                // else of this connection goes back to it too, so that
                // nothing overtakes what was held back.
                let held = self.held.close_connection(session);
                self.accepting[session].send_modify(|i| {
                    i.open = false;
                    i.pauses += 1;
                });
                tracing::warn!(held, session, "too many messages held back: this mqtt session disconnects from the broker until the store has room");
                continue;
            }
            if !paused {
                continue;
            }
            // On a full disk, room is what shedding can free inside the
            // store.
            let disk_room = *disk_room.get_or_insert_with(|| {
                !self.space.disk_full()
                    || match self.make_room_bytes(MAX_PARKED_BYTES as u64) {
                        Ok(room) => room,
                        Err(e) => {
                            tracing::warn!(error = %e, "shedding on a full disk failed");
                            false
                        }
                    }
            });
            if disk_room {
                let layout = self.db.layout();
                let room = self.held.waits_for(session).iter().all(|&s| {
                    let spec = &layout.streams[s];
                    spec.overflow != Overflow::Reject
                        || !spec.limits.low_water().over(self.db.usage(s))
                });
                if room {
                    self.accepting[session].send_modify(|i| i.open = true);
                }
            }
        }
    }

    fn count_shed(&self, shed: &Shed) {
        count_shed(&self.metrics, &self.db, shed);
    }

    fn set_rejecting(&mut self, now: Vec<bool>) {
        for t in self.held.set_rejecting(now) {
            let spec = &self.db.layout().streams[t.stream];
            if t.rejecting {
                let u = self.db.usage(t.stream);
                tracing::warn!(stream = %spec.name, records = u.records, bytes = u.bytes,
                    "stream is at its limit and its overflow policy is reject: no longer acknowledging its MQTT messages; the local broker holds the backlog");
            } else {
                tracing::info!(stream = %spec.name, "stream is under its limit again: accepting and acknowledging MQTT messages");
            }
        }
        for (s, is) in self.held.rejecting().iter().enumerate() {
            let spec = &self.db.layout().streams[s];
            self.metrics.store_rejecting(&spec.name).set(i64::from(*is));
        }
    }

    /// Work done about once a second: gauges, the status snapshot, age
    /// limits, the interval sync, and recovery from a full disk.
    fn periodic(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        let every = |last: &mut Option<Instant>, period: Duration| {
            if last.is_some_and(|t| now.duration_since(t) < period) {
                false
            } else {
                *last = Some(now);
                true
            }
        };
        if every(&mut self.last_age_check, Duration::from_secs(1)) {
            match self.db.shed_aged() {
                Ok(shed) => self.count_shed(&shed),
                Err(StoreError::DiskFull) => {}
                Err(e) => return Err(e),
            }
            if !self.undelivered.is_empty() {
                let pending = std::mem::take(&mut self.undelivered);
                self.deliver_all(pending)?;
            }
            if self.db.state_unsaved() {
                match self.db.save_state_now() {
                    Ok(()) | Err(StoreError::DiskFull) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if every(&mut self.last_shed_audit, SHED_AUDIT_EVERY) {
            // What was shed this minute: one audit event, not one per record.
            crate::audit::flush_shed();
        }
        if every(&mut self.last_prune, DEAD_LETTER_PRUNE_EVERY) {
            match self.db.prune_dead_letters() {
                Ok(p) => {
                    self.metrics.store_dead_letters_pruned.inc_by(p.letters);
                }
                Err(StoreError::DiskFull) => {}
                Err(e) => return Err(e),
            }
        }
        if let Durability::Interval(period) = self.cfg.durability {
            if now.duration_since(self.last_sync) >= period {
                self.last_sync = now;
                // With synchronous=NORMAL a checkpoint is what syncs the WAL.
                self.db.checkpoint(false);
            }
        }
        // Back to normal once the file system has room for the reserve
        // again (and some to spare).
        if let Checked::Recovered(free) = self.space.check(now) {
            self.metrics.store_disk_full.set(0);
            tracing::warn!(
                free_bytes = free,
                "disk space is back: the configured overflow policies apply again"
            );
            let _ = self
                .db
                .incident("disk-space-back", "the disk has room again");
            self.backpressure();
        }
        if every(&mut self.last_gauges, crate::notify::BEAT_EVERY) {
            self.backpressure();
            self.gauges()?;
        }
        if every(&mut self.last_snapshot, crate::status::SNAPSHOT_EVERY) {
            self.snapshot()?;
        }
        Ok(())
    }

    /// Updates the store gauges.
    fn gauges(&mut self) -> Result<(), StoreError> {
        self.metrics
            .downlink_pending
            .set(self.db.desired_lag()? as i64);
        let now = self.db.clock().now_ms();
        for s in 0..self.db.layout().streams.len() {
            let spec = &self.db.layout().streams[s];
            let u = self.db.usage(s);
            let mut oldest: Option<u64> = None;
            for d in &spec.dests {
                if let Some(t) = self.db.oldest_stored_at(*d)? {
                    oldest = Some(oldest.map_or(t, |o: u64| o.min(t)));
                }
            }
            let age = oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            let m = &self.metrics;
            m.store_records(&spec.name).set(u.records as i64);
            m.store_bytes(&spec.name).set(u.bytes as i64);
            m.store_oldest_age(&spec.name).set(age);
        }
        Ok(())
    }

    /// Writes the agent snapshot for `ferry status`.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let now = Instant::now();
        while self
            .deliveries
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.deliveries.pop_front();
        }
        let delivered: u64 = self.deliveries.iter().map(|(_, n)| n).sum();
        self.live
            .set_drain_rate(delivered as f64 / RATE_WINDOW.as_secs_f64());
        let parked = self.held.len() as u64;
        self.live.set_store(self.space.disk_full(), parked);
        let json = serde_json::to_string(&self.live.snapshot()).expect("plain struct");
        match self.db.write_snapshot(&json) {
            Ok(()) | Err(StoreError::DiskFull) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Deletes what the broker confirmed, each in its own transaction (when
    /// there is no batch to go with it).
    fn deliver_all(&mut self, deliveries: Vec<Delivery>) -> Result<(), StoreError> {
        self.retry_held |= !deliveries.is_empty();
        for d in deliveries {
            match self.db.delivered(d.dest, d.up_to, d.resent) {
                Ok(n) => self.deliveries.push_back((Instant::now(), n)),
                Err(StoreError::DiskFull) => self.undelivered.push(d),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Serves everything but inserts and deliveries; true if records left
    /// the store or limits changed.
    fn serve(&mut self, cmds: &mut Vec<Command>) -> Result<bool, StoreError> {
        let mut freed = false;
        for cmd in cmds.drain(..) {
            match cmd {
                Command::Insert(_) | Command::Delivered { .. } => {
                    unreachable!("inserts and deliveries are batched apart")
                }
                Command::Fetch {
                    dest,
                    after,
                    limit,
                    max_bytes,
                    reply,
                } => {
                    let r = self.db.fetch(dest, after, limit, max_bytes);
                    if let Err(StoreError::Damaged(reason)) = &r {
                        let e = StoreError::Damaged(reason.clone());
                        let _ = reply.send(r);
                        return Err(e);
                    }
                    let _ = reply.send(r);
                }
                Command::Resume {
                    dest,
                    last_sequence_id,
                    reply,
                } => {
                    let r = self.db.resume(dest, last_sequence_id);
                    if r.is_ok() {
                        self.committed.send_replace(self.db.last_seqs());
                        freed = true;
                    }
                    if let Err(StoreError::Damaged(reason)) = &r {
                        let e = StoreError::Damaged(reason.clone());
                        let _ = reply.send(r);
                        return Err(e);
                    }
                    let _ = reply.send(r);
                }
                Command::AcksConfirmed { epoch, gen } => self.db.acks_confirmed(epoch, gen),
                Command::Downlink(cmd) => self.downlink(cmd)?,
                Command::Epoch {
                    session,
                    epoch,
                    present,
                } => {
                    self.db.new_connection(session, epoch, present);
                    let dropped = self.held.new_epoch(session, epoch, present);
                    if dropped > 0 {
                        tracing::debug!(
                            dropped,
                            "held-back messages of an earlier mqtt connection dropped; the broker redelivers them"
                        );
                    }
                }
                Command::SetLimits(cfg, layout) => {
                    self.cfg.commit_max_wait = cfg.commit_max_wait;
                    self.cfg.commit_max_batch = cfg.commit_max_batch;
                    self.cfg.max_payload_bytes = cfg.max_payload_bytes;
                    self.cfg.max_bytes = cfg.max_bytes;
                    self.cfg.dead_letters = cfg.dead_letters;
                    self.db.set_dead_letter_limits(cfg.dead_letters);
                    self.last_prune = None;
                    self.held.resize(layout.streams.len());
                    self.db.set_layout(layout);
                    freed = true;
                    tracing::info!(
                        max_payload_bytes = self.cfg.max_payload_bytes,
                        commit_max_batch = self.cfg.commit_max_batch,
                        commit_max_wait_ms = self.cfg.commit_max_wait.as_millis() as u64,
                        "store limits reloaded"
                    );
                }
            }
        }
        Ok(freed)
    }

    /// Serves a request of the downlink. Damage ends the thread (after the
    /// answer); any other error goes back to the downlink.
    fn downlink(&mut self, cmd: DownlinkCommand) -> Result<(), StoreError> {
        fn answer<T>(
            reply: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
            r: Result<T, StoreError>,
        ) -> Result<(), StoreError> {
            let damaged = match &r {
                Err(StoreError::Damaged(reason)) => Some(reason.clone()),
                _ => None,
            };
            let _ = reply.send(r);
            damaged.map_or(Ok(()), |reason| Err(StoreError::Damaged(reason)))
        }
        let max_payload = self.cfg.max_payload_bytes;
        match cmd {
            DownlinkCommand::Start { topic, reply } => {
                answer(reply, self.db.downlink_start(&topic))
            }
            DownlinkCommand::Received {
                topic,
                updates,
                position,
                caught_up,
                reply,
            } => {
                let r =
                    self.db
                        .desired_received(&topic, &updates, &position, caught_up, max_payload);
                if let Ok(out) = &r {
                    let m = &self.metrics;
                    m.downlink_received.inc_by(updates.len() as u64);
                    m.downlink_stale.inc_by(out.stale);
                    m.downlink_dead_lettered.inc_by(out.dead_lettered);
                    m.store_dead_letters_pruned.inc_by(out.pruned.letters);
                }
                answer(reply, r)
            }
            DownlinkCommand::Pending {
                after,
                limit,
                reply,
            } => answer(reply, self.db.desired_pending(after.as_deref(), limit)),
            DownlinkCommand::Applied { applied, reply } => {
                let r = self.db.desired_applied(&applied, max_payload).map(|out| {
                    self.count_shed(&out.shed);
                    self.metrics.store_stored.inc_by(out.stored);
                    self.committed.send_replace(self.db.last_seqs());
                    out.stored
                });
                answer(reply, r)
            }
            DownlinkCommand::Forgotten { reply } => answer(reply, self.db.desired_forgotten()),
        }
    }
}

/// Counts what was shed in the metrics, per stream and reason.
fn count_shed(metrics: &crate::metrics::Metrics, db: &Db, shed: &Shed) {
    let layout = db.layout();
    for (s, n) in &shed.superseded {
        metrics.superseded(&layout.streams[*s].name).inc_by(*n);
        crate::audit::shed(&layout.streams[*s].name, "superseded", *n);
    }
    for ((s, reason), n) in &shed.dropped {
        metrics
            .dropped(&layout.streams[*s].name, reason.as_str())
            .inc_by(*n);
        crate::audit::shed(&layout.streams[*s].name, reason.as_str(), *n);
    }
}
