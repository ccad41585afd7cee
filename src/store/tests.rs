use super::db::{now_ms, Db, Pruned, SEQ_MAX};
use super::*;
use crate::config::{parse, Durability};
use crate::layout::{DropReason, Layout};

mod dead_letters;
mod desired;

/// A config with one state stream (`devices/+/state`) and one events
/// stream (`devices/+/alarm`); `status` and `alarms` get the extra lines.
fn layout(status: &str, alarms: &str) -> Layout {
    let text = format!(
        r#"
gateway_id = "gw"
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
[store]
path = "/tmp/unused.db"
[[streams]]
name = "status"
topic = "persistent://t/n/status"
subscriptions = [{{ filter = "devices/+/state", device_id_level = 1 }}]
{status}
[[streams]]
name = "alarms"
kind = "events"
topic = "persistent://t/n/alarms"
subscriptions = [{{ filter = "devices/+/alarm", device_id_level = 1 }}]
{alarms}
"#
    );
    Layout::new(&parse(&text).unwrap().streams)
}

fn msg(l: &Layout, topic: &str, payload: &[u8], pkid: u16, dup: bool) -> Inbound {
    let (stream, device) = match l.route(topic) {
        Some((s, d)) => (Some(s), d),
        None => (None, None),
    };
    Inbound {
        mqtt_topic: topic.into(),
        payload: bytes::Bytes::copy_from_slice(payload),
        retain: false,
        stream,
        device,
        dup,
        pkid,
        session: 0,
        ack: Some(AckToken {
            pkid,
            session: 0,
            epoch: 1,
            gen: 0,
        }),
        counted: false,
        guarded: None,
    }
}

/// `n` updates, device by device in rounds over `devices` devices; the
/// payload is "<device>:<round>".
fn rounds(l: &Layout, devices: usize, n: usize) -> Vec<Inbound> {
    (0..n)
        .map(|i| {
            let d = i % devices;
            let topic = format!("devices/d{d}/state");
            let payload = format!("d{d}:{}", i / devices);
            msg(
                l,
                &topic,
                payload.as_bytes(),
                (i % 60_000) as u16 + 1,
                false,
            )
        })
        .collect()
}

/// `n` updates of device `a`, payloads 0, 1, ..., packet ids from 1.
fn numbered(l: &Layout, n: u8) -> Vec<Inbound> {
    (0..n)
        .map(|i| msg(l, "devices/a/state", &[i], i as u16 + 1, false))
        .collect()
}

/// A throwaway folder removed on drop.
struct Dir {
    path: std::path::PathBuf,
}

impl Dir {
    fn new() -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "ferry-store-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        // A folder of an earlier process that had the same pid is not ours.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir { path }
    }

    fn db(&self, l: Layout) -> Db {
        Db::open(&self.path.join("s.db"), l, Durability::Full)
            .unwrap()
            .0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn payloads(db: &mut Db, dest: usize) -> Vec<String> {
    db.fetch(dest, 0, 1_000_000, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.payload).unwrap())
        .collect()
}

#[test]
fn numbers_are_never_reused_after_delete_and_reopen() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(
        &[
            msg(&l, "devices/a/state", b"1", 1, false),
            msg(&l, "devices/b/state", b"2", 2, false),
        ],
        100,
    )
    .unwrap();
    assert_eq!(db.last_seqs(), vec![2, 0]);
    db.delivered(0, 2, 0).unwrap();
    drop(db);
    let mut db = dir.db(l.clone());
    db.insert_batch(&[msg(&l, "devices/a/state", b"3", 3, false)], 100)
        .unwrap();
    let recs = db.fetch(0, 0, 10, usize::MAX).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].seq, 3);
    assert_eq!(recs[0].device, "a");
    assert_eq!(recs[0].props.mqtt_topic, "devices/a/state");
}

#[test]
fn each_destination_numbers_its_own_records() {
    let dir = Dir::new();
    let l = layout(r#"history_topic = "persistent://t/n/history""#, "");
    let mut db = dir.db(l.clone());
    let out = db
        .insert_batch(
            &[
                msg(&l, "devices/a/state", b"s1", 1, false),
                msg(&l, "devices/a/alarm", b"e1", 2, false),
                msg(&l, "devices/a/state", b"s2", 3, false),
            ],
            100,
        )
        .unwrap();
    assert_eq!(out.stored, 3);
    assert_eq!(out.acks.len(), 3);
    // status, history, alarms
    assert_eq!(db.last_seqs(), vec![2, 2, 1]);
    assert_eq!(payloads(&mut db, 0), vec!["s1", "s2"]);
    assert_eq!(payloads(&mut db, 1), vec!["s1", "s2"]);
    assert_eq!(payloads(&mut db, 2), vec!["e1"]);
    // Delivering one destination leaves the others.
    db.delivered(0, 2, 0).unwrap();
    assert_eq!(payloads(&mut db, 0), Vec::<String>::new());
    assert_eq!(payloads(&mut db, 1), vec!["s1", "s2"]);
    assert_eq!(db.usage(0).records, 2);
}

#[test]
fn a_redelivered_message_is_acked_but_not_stored_twice() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let out = db
        .insert_batch(&[msg(&l, "devices/a/state", b"x", 7, false)], 100)
        .unwrap();
    assert_eq!(out.acks.len(), 1);
    // The broker redelivers with DUP: same pkid, topic and payload.
    let out = db
        .insert_batch(&[msg(&l, "devices/a/state", b"x", 7, true)], 100)
        .unwrap();
    assert_eq!(out.acks.len(), 1, "a redelivery is still acknowledged");
    // A DUP message that differs is new.
    db.insert_batch(&[msg(&l, "devices/a/state", b"y", 7, true)], 100)
        .unwrap();
    assert_eq!(db.total().records, 2);
    assert_eq!(db.counter("redeliveries_dropped"), 1);
    assert_eq!(db.counter("received"), 3);
}

#[test]
fn oversized_unrouted_and_unkeyed_messages_are_dead_lettered_without_blocking() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let out = db
        .insert_batch(
            &[
                msg(&l, "devices/a/state", &[0u8; 200], 1, false),
                msg(&l, "devices//state", b"a", 2, false),
                msg(&l, "elsewhere", b"a", 3, false),
                msg(&l, "devices/a/state", b"ok", 4, false),
            ],
            100,
        )
        .unwrap();
    assert_eq!(out.acks.len(), 4);
    assert_eq!(db.total().records, 1);
    assert_eq!(db.counter("dead_lettered"), 3);
    let n: i64 = db
        .conn()
        .query_row("SELECT COUNT(*) FROM dead_letters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 3);
}

#[test]
fn resume_skips_what_the_broker_holds() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    // The session resumed before these were committed: they may have been
    // sent.
    assert_eq!(db.resume(0, -1).unwrap(), ResumeOutcome::default());
    let batch = numbered(&l, 5);
    db.insert_batch(&batch, 100).unwrap();
    let out = db.resume(0, 3).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 3,
            renumbered_by: 0,
            forgotten: None
        }
    );
    let seqs: Vec<u64> = db
        .fetch(0, 0, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, vec![4, 5]);
    assert_eq!(db.resume(0, -1).unwrap(), ResumeOutcome::default());
    assert_eq!(
        db.resume(1, 0).unwrap().skipped,
        0,
        "other destinations untouched"
    );
}

#[test]
fn a_broker_that_forgets_a_producer_it_confirmed_is_told_once_as_an_incident() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    // Nothing confirmed yet: a broker that knows nothing is no news.
    assert_eq!(db.resume(0, -1).unwrap().forgotten, None);
    db.insert_batch(&numbered(&l, 5), 100).unwrap();
    let delivered = super::db::Delivery {
        dest: 0,
        up_to: 3,
        resent: 0,
    };
    db.commit_batch(&[delivered], &[], &[], 100).unwrap();
    // A broker that names a number knows the producer.
    assert_eq!(db.resume(0, 3).unwrap().forgotten, None);
    db.advance_clock(5_000);
    // Then one that names none forgot it (deduplication off).
    let f = db.resume(0, -1).unwrap().forgotten.expect("forgotten");
    assert_eq!(f.confirmed, 3);
    assert!(f.idle_ms >= 5_000 && f.idle_ms < 60_000, "{f:?}");
    db.resume(0, -1).unwrap().forgotten.expect("again");
    let incidents: Vec<(String, String)> = db
        .conn()
        .prepare("SELECT kind, detail FROM incidents")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(incidents.len(), 1, "once per topic: {incidents:?}");
    assert_eq!(incidents[0].0, "deduplication-off");
    assert!(
        incidents[0]
            .1
            .starts_with("persistent://t/n/status: the broker knows no record"),
        "{incidents:?}"
    );
    assert!(
        incidents[0]
            .1
            .ends_with("Fix: pulsar-admin namespaces set-deduplication t/n --enable"),
        "{incidents:?}"
    );
    let off = |db: &Db| -> i64 {
        db.conn()
            .query_row(
                "SELECT value FROM store_state WHERE name LIKE 'dedup_off:%'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert_eq!(off(&db), 1, "status and check say it");
    // Deduplication turned on: the broker names the producer's record.
    assert_eq!(db.resume(0, 3).unwrap().forgotten, None);
    assert_eq!(off(&db), 0);
}

#[test]
fn deliveries_without_a_batch_count_as_confirmed_too() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(&numbered(&l, 5), 100).unwrap();
    // Deleted in a transaction of its own (no batch went with it).
    assert_eq!(db.delivered(0, 4, 0).unwrap(), 4);
    let f = db.resume(0, -1).unwrap().forgotten.expect("forgotten");
    assert_eq!(f.confirmed, 4);
}

#[test]
fn resume_renumbers_when_the_broker_is_ahead_of_a_replaced_store() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let batch = numbered(&l, 3);
    db.insert_batch(&batch, 100).unwrap();
    db.insert_batch(&[msg(&l, "devices/a/alarm", b"e", 9, false)], 100)
        .unwrap();
    // The broker already holds 1..=50 from an earlier store.
    let out = db.resume(0, 50).unwrap();
    assert_eq!(out.renumbered_by, 50);
    let recs = db.fetch(0, 0, 10, usize::MAX).unwrap();
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![51, 52, 53]);
    assert_eq!(recs[0].payload, vec![0]);
    assert_eq!(
        payloads(&mut db, 1),
        vec!["e"],
        "the events topic is untouched"
    );
    db.insert_batch(&[msg(&l, "devices/a/state", b"n", 10, false)], 100)
        .unwrap();
    assert_eq!(db.last_seqs()[0], 54);
    assert!(matches!(
        db.resume(0, SEQ_MAX as i64),
        Err(StoreError::SequenceRefused { .. })
    ));
}

/// What `coalesce` should leave, computed independently: pending grows by
/// one per update; past the limit it falls to the number of devices.
fn coalesce_model(updates: u64, limit: u64, devices: u64) -> (u64, u64) {
    let (mut pending, mut superseded) = (0u64, 0u64);
    for _ in 0..updates {
        pending += 1;
        if pending > limit {
            superseded += pending - devices;
            pending = devices;
        }
    }
    (pending, superseded)
}

#[test]
fn coalesce_keeps_the_newest_state_of_every_device_and_counts_the_rest() {
    let dir = Dir::new();
    let l = layout("max_records = 50", "");
    let mut db = dir.db(l.clone());
    let batch = rounds(&l, 7, 1_000);
    for chunk in batch.chunks(33) {
        db.insert_batch(chunk, 100).unwrap();
    }
    let (pending, superseded) = coalesce_model(1_000, 50, 7);
    assert_eq!(db.usage(0).records, pending);
    assert_eq!(db.counter("stream:status:superseded") as u64, superseded);
    let left = payloads(&mut db, 0);
    // Every device's last update (round 142 for d0..d5, 141 for d6) is there.
    for d in 0..7 {
        let last = if d < 1_000 % 7 { 142 } else { 141 };
        assert!(left.contains(&format!("d{d}:{last}")), "d{d} in {left:?}");
    }
    // In record order, per device increasing.
    let mut seen = std::collections::HashMap::new();
    for p in &left {
        let (d, n) = p.split_once(':').unwrap();
        let n: u32 = n.parse().unwrap();
        assert!(seen.insert(d.to_string(), n).map_or(true, |prev| prev < n));
    }
}

#[test]
fn a_shed_never_touches_what_the_uplink_has_in_flight() {
    let dir = Dir::new();
    let l = layout("max_records = 10", "");
    let mut db = dir.db(l.clone());
    let batch = rounds(&l, 2, 10);
    db.insert_batch(&batch, 100).unwrap();
    // The uplink fetched (and may have sent) the first 4.
    assert_eq!(db.fetch(0, 0, 4, usize::MAX).unwrap().len(), 4);
    db.insert_batch(&rounds(&l, 2, 1), 100).unwrap();
    // 11 > 10: the 4 fetched stay; of the 7 others, the newest of each
    // device stay.
    assert_eq!(db.usage(0).records, 6);
    assert_eq!(db.counter("stream:status:superseded"), 5);
}

#[test]
fn coalesce_with_history_drops_the_oldest_history_once_states_are_coalesced() {
    let dir = Dir::new();
    let l = layout(
        "max_records = 100\nhistory_topic = \"persistent://t/n/history\"",
        "",
    );
    let mut db = dir.db(l.clone());
    for chunk in rounds(&l, 5, 500).chunks(50) {
        db.insert_batch(chunk, 100).unwrap();
    }
    let status = payloads(&mut db, 0);
    let history = payloads(&mut db, 1);
    assert!(db.usage(0).records <= 100 + 2, "{:?}", db.usage(0));
    // The history that is kept is the newest, without gaps.
    let last = history.last().unwrap().clone();
    assert_eq!(last, "d4:99");
    let n = history.len();
    let expected: Vec<String> = (500 - n..500)
        .map(|i| format!("d{}:{}", i % 5, i / 5))
        .collect();
    assert_eq!(history, expected);
    for d in 0..5 {
        assert!(status.contains(&format!("d{d}:99")), "{status:?}");
    }
    let dropped = db.counter("stream:status:dropped:coalesce") as usize;
    assert_eq!(dropped + n, 500, "every history record is kept or counted");
    let superseded = db.counter("stream:status:superseded") as usize;
    assert_eq!(superseded + status.len(), 500);
}

#[test]
fn drop_oldest_drops_the_oldest_events_to_ninety_percent() {
    let dir = Dir::new();
    let l = layout("", "max_records = 100");
    let mut db = dir.db(l.clone());
    let batch: Vec<Inbound> = (0..250)
        .map(|i| {
            let p = format!("e{i}");
            msg(&l, "devices/a/alarm", p.as_bytes(), i as u16 + 1, false)
        })
        .collect();
    for chunk in batch.chunks(17) {
        db.insert_batch(chunk, 100).unwrap();
    }
    // 101 -> 90 (11 dropped), 101 -> 90 ... : pending cycles between 90 and 100.
    let mut pending = 0u64;
    let mut dropped = 0u64;
    for _ in 0..250 {
        pending += 1;
        if pending > 100 {
            dropped += pending - 90;
            pending = 90;
        }
    }
    assert_eq!(db.usage(1).records, pending);
    assert_eq!(
        db.counter("stream:alarms:dropped:drop-oldest") as u64,
        dropped
    );
    let left = payloads(&mut db, 1);
    let expected: Vec<String> = ((250 - pending)..250).map(|i| format!("e{i}")).collect();
    assert_eq!(left, expected, "the newest are kept, in order");
}

#[test]
fn drop_oldest_on_state_never_drops_a_devices_newest_state() {
    let dir = Dir::new();
    let l = layout("max_records = 20\noverflow = \"drop-oldest\"", "");
    let mut db = dir.db(l.clone());
    // d0 reports once, then d1 floods.
    let mut batch = vec![msg(&l, "devices/d0/state", b"d0:0", 1, false)];
    batch.extend((0..100).map(|i| {
        let p = format!("d1:{i}");
        msg(&l, "devices/d1/state", p.as_bytes(), i as u16 + 2, false)
    }));
    db.insert_batch(&batch, 100).unwrap();
    let left = payloads(&mut db, 0);
    assert_eq!(left[0], "d0:0", "the quiet device's only state is kept");
    assert_eq!(left.last().unwrap(), "d1:99");
    assert_eq!(
        db.counter("stream:status:dropped:drop-oldest") as usize + left.len(),
        101
    );
}

#[test]
fn reject_parks_what_does_not_fit_and_keeps_order() {
    let dir = Dir::new();
    let l = layout("max_records = 3\noverflow = \"reject\"", "");
    let mut db = dir.db(l.clone());
    let batch = vec![
        msg(&l, "devices/a/state", b"1", 1, false),
        msg(&l, "devices/a/state", b"2", 2, false),
        msg(&l, "devices/a/alarm", b"e", 3, false),
        msg(&l, "devices/a/state", b"3", 4, false),
        msg(&l, "devices/a/state", b"4", 5, false),
        msg(&l, "devices/a/alarm", b"f", 6, false),
        msg(&l, "devices/a/state", b"5", 7, false),
    ];
    let out = db.insert_batch(&batch, 100).unwrap();
    assert_eq!(out.parked, vec![4, 6], "4 and 5 wait; other streams go on");
    let acked: Vec<u16> = out.acks.iter().map(|a| a.pkid).collect();
    assert_eq!(acked, vec![1, 2, 3, 4, 6]);
    assert_eq!(payloads(&mut db, 0), vec!["1", "2", "3"]);
    // Once delivered, the parked ones go in, in order.
    db.delivered(0, 2, 0).unwrap();
    let mut again: Vec<Inbound> = out.parked.iter().map(|i| batch[*i].clone()).collect();
    for m in &mut again {
        m.counted = true;
    }
    let out = db.insert_batch(&again, 100).unwrap();
    assert!(out.parked.is_empty());
    assert_eq!(payloads(&mut db, 0), vec!["3", "4", "5"]);
    assert_eq!(
        db.counter("received"),
        7,
        "parked messages are counted once"
    );
    assert_eq!(db.counter("stream:status:superseded"), 0);
}

#[test]
fn max_age_drops_old_records_but_not_the_newest_state() {
    let dir = Dir::new();
    let l = layout("max_age_secs = 60", "max_age_secs = 60");
    let mut db = dir.db(l.clone());
    db.insert_batch(
        &[
            msg(&l, "devices/a/state", b"1", 1, false),
            msg(&l, "devices/a/state", b"2", 2, false),
            msg(&l, "devices/b/state", b"3", 3, false),
            msg(&l, "devices/a/alarm", b"e", 4, false),
        ],
        100,
    )
    .unwrap();
    let shed = db.shed_aged().unwrap();
    assert!(shed.is_empty(), "nothing is a minute old yet");
    db.advance_clock(61_000);
    let shed = db.shed_aged().unwrap();
    assert_eq!(shed.dropped.get(&(0, DropReason::MaxAge)), Some(&1));
    assert_eq!(shed.dropped.get(&(1, DropReason::MaxAge)), Some(&1));
    assert_eq!(payloads(&mut db, 0), vec!["2", "3"]);
    assert!(payloads(&mut db, 1).is_empty());
}

#[test]
fn under_disk_pressure_states_coalesce_first_then_history_goes_by_quarters() {
    let dir = Dir::new();
    let l = layout(
        r#"history_topic = "persistent://t/n/history""#,
        r#"overflow = "reject"
max_records = 1000"#,
    );
    let mut db = dir.db(l.clone());
    db.insert_batch(&rounds(&l, 4, 400), 100).unwrap();
    db.insert_batch(&[msg(&l, "devices/a/alarm", b"e", 1, false)], 100)
        .unwrap();
    let shed = db.shed_emergency(0, DropReason::DiskFull).unwrap();
    assert_eq!(shed.superseded.get(&0), Some(&396));
    assert_eq!(db.usage(0).records, 4 + 400);
    let shed = db.shed_emergency(1, DropReason::DiskFull).unwrap();
    assert_eq!(shed.dropped.get(&(0, DropReason::DiskFull)), Some(&100));
    assert_eq!(payloads(&mut db, 1).len(), 300);
    assert_eq!(
        payloads(&mut db, 2),
        vec!["e"],
        "reject streams are left alone"
    );
    assert_eq!(db.counter("stream:status:dropped:disk-full"), 100);
}

#[test]
fn a_damaged_store_is_moved_aside_and_a_fresh_one_started() {
    let dir = Dir::new();
    let l = layout("", "");
    let path = dir.path.join("s.db");
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&[msg(&l, "devices/a/state", b"1", 1, false)], 100)
            .unwrap();
    }
    std::fs::write(&path, b"this is not an SQLite database, not at all").unwrap();
    let (mut db, damaged) = Db::open(&path, l.clone(), Durability::Full).unwrap();
    let damaged = damaged.expect("the damage is found");
    assert!(damaged.moved_to.exists());
    assert!(
        damaged
            .moved_to
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("s.db.damaged-"),
        "{}",
        damaged.moved_to.display()
    );
    assert_eq!(db.total().records, 0);
    db.insert_batch(&[msg(&l, "devices/a/state", b"2", 2, false)], 100)
        .unwrap();
    let kind: String = db
        .conn()
        .query_row("SELECT kind FROM incidents", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kind, "store-damaged");
    let report = crate::status::read(&path).unwrap();
    assert_eq!(report.incidents.len(), 1);
    assert!(report.incidents[0].detail.contains("moved to"));
}

/// Loads a fixture store of an older schema version (tests/fixtures).
fn fixture(dir: &Dir, version: u32) -> std::path::PathBuf {
    let sql = match version {
        1 => include_str!("../../tests/fixtures/store-v1.sql"),
        2 => include_str!("../../tests/fixtures/store-v2.sql"),
        3 => include_str!("../../tests/fixtures/store-v3.sql"),
        4 => include_str!("../../tests/fixtures/store-v4.sql"),
        5 => include_str!("../../tests/fixtures/store-v5.sql"),
        v => panic!("no fixture of version {v}"),
    };
    let path = dir.path.join(format!("v{version}.db"));
    let c = rusqlite::Connection::open(&path).unwrap();
    c.execute_batch(&sql.replace("@STATUS@", "persistent://t/n/status"))
        .unwrap();
    path
}

#[test]
fn a_small_store_with_larger_pages_is_rewritten_with_small_ones_and_keeps_everything() {
    let dir = Dir::new();
    let path = fixture(&dir, 5);
    let page = |c: &rusqlite::Connection| -> i64 {
        c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap()
    };
    let outbox = |c: &rusqlite::Connection| -> Vec<(i64, Vec<u8>)> {
        c.prepare("SELECT key, payload FROM outbox ORDER BY key")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let (was, rows) = {
        let c = rusqlite::Connection::open(&path).unwrap();
        (page(&c), outbox(&c))
    };
    assert_eq!(was, 4096);
    assert!(!rows.is_empty());
    let (db, damaged) = Db::open(&path, layout("", ""), Durability::Full).unwrap();
    assert!(damaged.is_none());
    assert_eq!(page(db.conn()), super::db::PAGE_SIZE);
    assert_eq!(outbox(db.conn()), rows);
    // A new store has them from the start.
    assert_eq!(page(dir.db(layout("", "")).conn()), super::db::PAGE_SIZE);
}

#[test]
fn stores_of_every_older_version_open_with_their_backlog_and_numbers() {
    for version in 1..super::schema::VERSION as u32 {
        let dir = Dir::new();
        let path = fixture(&dir, version);
        let l = layout("", "");
        let (mut db, damaged) = Db::open(&path, l.clone(), Durability::Full).unwrap();
        assert!(damaged.is_none(), "version {version}");
        // The one MQTT session of before becomes the main session's, with
        // what its broker lost (version 5 says at connection 2).
        db.register_sessions(&["gw".into(), "gw-alarms".into()])
            .unwrap();
        let sessions: Vec<(i64, String, i64)> = db
            .conn()
            .prepare("SELECT id, client_id, moot_below FROM mqtt_sessions ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let moot = if version == 5 { 2 } else { 0 };
        assert_eq!(
            sessions,
            [(0, "gw".into(), moot), (1, "gw-alarms".into(), 0)],
            "version {version}"
        );
        let v: i32 = db
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, super::schema::VERSION);
        let recs = db.fetch(0, 0, 100, usize::MAX).unwrap();
        let seqs: Vec<u64> = recs.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, (41..=50).collect::<Vec<_>>(), "version {version}");
        assert_eq!(recs[0].props.mqtt_topic, "devices/d0/state");
        assert!(String::from_utf8_lossy(&recs[9].payload).contains(&format!("v{version}")));
        assert_eq!(db.last_seqs()[0], 50);
        // These stores' producers spoke to the broker: the broker holding
        // up to 45 means 41..=45 were delivered.
        assert_eq!(db.resume(0, 45).unwrap().skipped, 5, "version {version}");
        // The redelivery row of packet id 7 (the last record) still
        // recognises the broker's redelivery.
        let last = String::from_utf8(recs[9].payload.clone()).unwrap();
        let out = db
            .insert_batch(
                &[msg(&l, "devices/d4/state", last.as_bytes(), 7, true)],
                1000,
            )
            .unwrap();
        assert_eq!((out.redelivered, out.stored), (1, 0), "version {version}");
        db.insert_batch(&[msg(&l, "devices/a/state", b"new", 1, false)], 100)
            .unwrap();
        assert_eq!(db.last_seqs()[0], 51);
        assert_eq!(db.counter("stored"), 61);
    }
}

#[test]
fn a_store_of_a_newer_version_is_refused_and_left_alone() {
    let dir = Dir::new();
    let path = dir.path.join("s.db");
    {
        let db = dir.db(layout("", ""));
        db.conn()
            .pragma_update(None, "user_version", super::schema::VERSION + 1)
            .unwrap();
    }
    let err = Db::open(&path, layout("", ""), Durability::Full)
        .err()
        .unwrap();
    assert!(
        matches!(err, StoreError::TooNew { found, supported } if found == supported + 1),
        "{err}"
    );
    assert!(err.to_string().contains("newer ferry"), "{err}");
    assert!(path.exists(), "never moved aside");
    let aside = std::fs::read_dir(&dir.path)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("damaged")
        })
        .count();
    assert_eq!(aside, 0);
}

#[test]
fn deliveries_and_new_records_share_one_transaction() {
    let dir = Dir::new();
    let l = layout("max_records = 3\noverflow = \"reject\"", "");
    let mut db = dir.db(l.clone());
    let batch: Vec<Inbound> = (0..3)
        .map(|i| msg(&l, "devices/a/state", &[b'0' + i], i as u16 + 1, false))
        .collect();
    db.insert_batch(&batch, 100).unwrap();
    // Full: a fourth record fits only because the deletion comes first.
    let d = super::db::Delivery {
        dest: 0,
        up_to: 2,
        resent: 1,
    };
    let out = db
        .commit_batch(
            &[d],
            &[],
            &[msg(&l, "devices/a/state", b"3", 4, false)],
            100,
        )
        .unwrap();
    assert_eq!((out.delivered, out.parked.len()), (2, 0));
    assert_eq!(payloads(&mut db, 0), vec!["2", "3"]);
    assert_eq!(db.counter("delivered"), 2);
    assert_eq!(db.counter("resent"), 1);
}

#[test]
fn redeliveries_are_told_apart_by_topic() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(&[msg(&l, "devices/a/state", b"x", 7, false)], 100)
        .unwrap();
    let out = db
        .insert_batch(&[msg(&l, "devices/a/state", b"x", 7, true)], 100)
        .unwrap();
    assert_eq!((out.redelivered, out.stored), (1, 0));
    // Same pkid and payload on another topic: a different message.
    let out = db
        .insert_batch(&[msg(&l, "devices/b/state", b"x", 7, true)], 100)
        .unwrap();
    assert_eq!(out.stored, 1);
    let out = db
        .insert_batch(&[msg(&l, "devices/b/state", b"x", 7, true)], 100)
        .unwrap();
    assert_eq!(out.redelivered, 1);
}

#[test]
fn a_store_that_lost_its_newest_commits_skips_what_the_broker_holds() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let batch = numbered(&l, 5);
    db.insert_batch(&batch, 100).unwrap();
    // The producer spoke to the broker before (it holds nothing yet).
    assert_eq!(db.resume(0, -1).unwrap(), ResumeOutcome::default());
    assert_eq!(db.resume(0, 0).unwrap().skipped, 0);
    // A power cut lost records 6..=8 from the store, but the broker got
    // them: it names 8. Nothing is renumbered or sent twice.
    let out = db.resume(0, 8).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 5,
            renumbered_by: 0,
            forgotten: None
        }
    );
    db.insert_batch(&[msg(&l, "devices/a/state", b"n", 9, false)], 100)
        .unwrap();
    let seqs: Vec<u64> = db
        .fetch(0, 0, 10, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, vec![9]);
    drop(db);
    // That is remembered across restarts.
    let mut db = dir.db(l.clone());
    assert_eq!(db.resume(0, 20).unwrap().renumbered_by, 0);
}

#[test]
fn a_reject_stream_with_nothing_pending_takes_a_record_over_its_byte_limit() {
    let dir = Dir::new();
    let l = layout("max_bytes = 100\noverflow = \"reject\"", "");
    let mut db = dir.db(l.clone());
    let out = db
        .insert_batch(
            &[
                msg(&l, "devices/a/state", &[b'x'; 150], 1, false),
                msg(&l, "devices/a/state", b"y", 2, false),
            ],
            1000,
        )
        .unwrap();
    assert_eq!((out.stored, out.parked.clone()), (1, vec![1]));
}

#[test]
fn a_forgotten_packet_id_never_makes_a_redelivery_look_like_a_duplicate() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    // A heartbeat stored under packet id 7 ...
    db.insert_batch(&[msg(&l, "devices/a/state", b"on", 7, false)], 100)
        .unwrap();
    // ... then, 65,535 messages later, the same heartbeat under id 7 was
    // received but not stored (held back, then left to the broker). Its
    // redelivery (DUP) must be stored, not taken for the old one.
    let out = db
        .commit_batch(
            &[],
            &[(0, 7)],
            &[msg(&l, "devices/a/state", b"on", 7, true)],
            100,
        )
        .unwrap();
    assert_eq!((out.stored, out.redelivered), (1, 0));
}

// ---- The audit's findings (issue "Nothing lost, nothing leaked, nothing
// unbounded"): resume, broker numbers, damage, retained states, acks, clock.

fn seqs(db: &mut Db, dest: usize) -> Vec<u64> {
    db.fetch(dest, 0, 1_000_000, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect()
}

#[test]
fn a_replaced_store_that_numbered_more_than_the_broker_holds_sends_everything() {
    // The store was deleted; the fresh one stored 500 while Pulsar was
    // unreachable; the broker holds 100 from the old store.
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    for chunk in rounds(&l, 10, 500).chunks(100) {
        db.insert_batch(chunk, 100).unwrap();
    }
    let out = db.resume(0, 100).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 0,
            renumbered_by: 100,
            forgotten: None
        }
    );
    assert_eq!(seqs(&mut db, 0), (101..=600).collect::<Vec<_>>());
    assert_eq!(db.counter("skipped_on_resume"), 0);
    // From now on they may be sent: another reconnect with the broker at
    // 350 skips what it holds.
    assert_eq!(db.resume(0, 350).unwrap().skipped, 250);
    assert_eq!(seqs(&mut db, 0), (351..=600).collect::<Vec<_>>());
}

#[test]
fn records_never_sent_are_renumbered_never_skipped() {
    // The audit's case: pending old0..2 (sent before), NEW0..2 stored after
    // the store rolled back, and the broker at 5.
    let dir = Dir::new();
    let l = layout("", "");
    {
        let mut db = dir.db(l.clone());
        db.resume(0, -1).unwrap();
        let old: Vec<Inbound> = (0..3)
            .map(|i| {
                msg(
                    &l,
                    "devices/a/state",
                    format!("old{i}").as_bytes(),
                    i + 1,
                    false,
                )
            })
            .collect();
        db.insert_batch(&old, 100).unwrap();
    }
    let mut db = dir.db(l.clone());
    let new: Vec<Inbound> = (0..3)
        .map(|i| {
            msg(
                &l,
                "devices/a/state",
                format!("NEW{i}").as_bytes(),
                i + 10,
                false,
            )
        })
        .collect();
    db.insert_batch(&new, 100).unwrap();
    let out = db.resume(0, 5).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 3,
            renumbered_by: 2,
            forgotten: None
        }
    );
    assert_eq!(payloads(&mut db, 0), vec!["NEW0", "NEW1", "NEW2"]);
    assert_eq!(seqs(&mut db, 0), vec![6, 7, 8]);

    // Two gateways sharing a gateway id: the broker answers 1,000,000 to a
    // store whose records were never sent. Nothing is deleted.
    let dir = Dir::new();
    let mut db = dir.db(l.clone());
    db.insert_batch(&numbered(&l, 10), 100).unwrap();
    let out = db.resume(0, 1_000_000).unwrap();
    assert_eq!(out.skipped, 0);
    assert_eq!(
        seqs(&mut db, 0),
        (1_000_001..=1_000_010).collect::<Vec<_>>()
    );
}

#[test]
fn what_a_live_session_commits_counts_as_possibly_sent_across_restarts() {
    let dir = Dir::new();
    let l = layout("", "");
    {
        let mut db = dir.db(l.clone());
        db.resume(0, 0).unwrap();
        db.insert_batch(&numbered(&l, 4), 100).unwrap();
        assert_eq!(db.fetch(0, 0, 10, usize::MAX).unwrap().len(), 4);
    }
    // Killed before the receipts were written; the broker got 1..=3.
    let mut db = dir.db(l.clone());
    assert_eq!(
        db.resume(0, 3).unwrap(),
        ResumeOutcome {
            skipped: 3,
            renumbered_by: 0,
            forgotten: None
        }
    );
    assert_eq!(seqs(&mut db, 0), vec![4]);
}

#[test]
fn a_broker_number_that_cannot_be_honoured_is_refused_and_changes_nothing() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(&numbered(&l, 5), 100).unwrap();
    for last in [
        SEQ_MAX as i64,
        SEQ_MAX as i64 - 2,
        i64::MAX,
        super::db::SEQ_LIMIT as i64,
    ] {
        let err = db.resume(0, last).unwrap_err();
        assert!(
            matches!(err, StoreError::SequenceRefused { last_sequence_id, pending: 5, .. } if last_sequence_id == last),
            "{err}"
        );
    }
    // (Looked at without fetching: a fetch means "may be sent".)
    let keys: Vec<i64> = db
        .conn()
        .prepare("SELECT key FROM outbox WHERE key >> 48 = 1 ORDER BY key")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        keys,
        (1..=5).map(|s| (1 << 48) | s).collect::<Vec<_>>(),
        "nothing moved"
    );
    assert_eq!(db.last_seqs(), vec![5, 0]);
    let incidents: i64 = db
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM incidents WHERE kind = 'sequence-refused'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(incidents, 1, "one incident per topic");
    // The alarms destination's records stay where they are.
    db.insert_batch(&[msg(&l, "devices/a/alarm", b"e", 9, false)], 100)
        .unwrap();
    assert_eq!(payloads(&mut db, 1), vec!["e"]);
    // A high but honourable number still works, below the limit.
    let last = super::db::SEQ_LIMIT as i64 - 1;
    assert_eq!(db.resume(0, last).unwrap().renumbered_by, last as u64);
    assert_eq!(db.last_seqs()[0], super::db::SEQ_LIMIT + 4);
}

/// Opens `path` after `damage` ran on a healthy store with one record,
/// and says whether it was moved aside.
/// A store of 3 records opened again after `damage`; the folder lives as
/// long as the returned `Dir`.
fn open_after(damage: &str) -> (Option<super::db::Damaged>, Db, Dir) {
    let dir = Dir::new();
    let l = layout("", "");
    let path = dir.path.join("s.db");
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&numbered(&l, 3), 100).unwrap();
        db.conn().execute_batch(damage).unwrap();
    }
    let (db, damaged) = Db::open(&path, l, Durability::Full).unwrap();
    (damaged, db, dir)
}

#[test]
fn damage_that_passes_the_quick_check_is_found_at_open() {
    for (what, sql) in [
        (
            "a renamed column",
            "ALTER TABLE outbox RENAME COLUMN props TO propz;",
        ),
        (
            "text where a blob belongs",
            "UPDATE outbox SET payload = 'text' WHERE key = (SELECT MIN(key) FROM outbox);",
        ),
        (
            "next_seq = 2^48",
            "UPDATE destinations SET next_seq = 281474976710656 WHERE id = 1;",
        ),
        (
            "a destination id of 65,536",
            "UPDATE destinations SET id = 65536 WHERE id = 2;",
        ),
        ("a missing table", "DROP TABLE topic_last;"),
        (
            "a negative key",
            "INSERT INTO outbox VALUES (-5, 'a', 0, x'00', x'00', 0);",
        ),
    ] {
        let (damaged, mut db, _dir) = open_after(sql);
        let d = damaged.unwrap_or_else(|| panic!("{what}: not found"));
        assert!(d.moved_to.exists(), "{what}");
        assert_eq!(db.total().records, 0, "{what}: a fresh store");
        let l = db.layout().clone();
        db.insert_batch(&numbered(&l, 1), 100).unwrap();
    }
}

#[test]
fn a_next_record_number_behind_the_records_is_repaired() {
    let (damaged, mut db, _dir) = open_after("UPDATE destinations SET next_seq = 2 WHERE id = 1;");
    assert!(damaged.is_none());
    assert_eq!(db.last_seqs()[0], 3);
    let l = db.layout().clone();
    db.insert_batch(&numbered(&l, 2), 100).unwrap();
    assert_eq!(seqs(&mut db, 0), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_header_that_makes_the_file_read_only_is_damage() {
    let dir = Dir::new();
    let l = layout("", "");
    let path = dir.path.join("s.db");
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&numbered(&l, 3), 100).unwrap();
        db.checkpoint(true);
        db.conn()
            .pragma_update(None, "journal_mode", "DELETE")
            .unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[18] = 3; // file format write version: unknown, so read-only
    std::fs::write(&path, bytes).unwrap();
    let (mut db, damaged) = Db::open(&path, l.clone(), Durability::Full).unwrap();
    assert!(damaged.expect("found").reason.contains("read-only"));
    db.insert_batch(&numbered(&l, 1), 100).unwrap();
}

#[test]
fn damage_found_while_running_moves_the_store_aside_at_the_next_start() {
    let dir = Dir::new();
    let l = layout("", "");
    let path = dir.path.join("s.db");
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&numbered(&l, 3), 100).unwrap();
    }
    super::schema::mark_damaged(&path, "database disk image is malformed");
    let (db, damaged) = Db::open(&path, l.clone(), Durability::Full).unwrap();
    let d = damaged.expect("moved aside");
    assert!(d.reason.contains("malformed"), "{}", d.reason);
    assert_eq!(db.total().records, 0);
    assert!(!super::schema::marker(&path).exists());
    // A type error at run time is damage.
    let e: StoreError =
        rusqlite::Error::InvalidColumnType(3, "payload".into(), rusqlite::types::Type::Text).into();
    assert!(matches!(e, StoreError::Damaged(_)));
}

#[test]
fn a_retained_state_sent_again_at_a_subscription_is_stored_once() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let retained = |payload: &[u8], pkid| {
        let mut m = msg(&l, "devices/a/state", payload, pkid, false);
        m.retain = true;
        m
    };
    // Published retained while ferry listened: delivered live (retain 0).
    db.insert_batch(&[msg(&l, "devices/a/state", b"on", 1, false)], 100)
        .unwrap();
    // Ferry resubscribed: the broker sends it again, retained.
    let out = db.insert_batch(&[retained(b"on", 2)], 100).unwrap();
    assert_eq!(
        (out.stored, out.retained_unchanged, out.acks.len()),
        (0, 1, 1)
    );
    // It changed while ferry was away: stored, once.
    let out = db.insert_batch(&[retained(b"off", 3)], 100).unwrap();
    assert_eq!(out.stored, 1);
    let out = db.insert_batch(&[retained(b"off", 4)], 100).unwrap();
    assert_eq!(out.stored, 0);
    // A live update with the same payload is always a new update.
    let out = db
        .insert_batch(&[msg(&l, "devices/a/state", b"off", 5, false)], 100)
        .unwrap();
    assert_eq!(out.stored, 1);
    assert_eq!(payloads(&mut db, 0), vec!["on", "off", "off"]);
    assert_eq!(db.counter("retained_unchanged"), 2);
}

#[test]
fn a_byte_identical_message_under_a_reused_packet_id_is_stored_once_its_ack_was_confirmed() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.new_connection(0, 1, true);
    let m = msg(&l, "devices/a/state", b"same", 5, false);
    let out = db.insert_batch(std::slice::from_ref(&m), 100).unwrap();
    let gen = out.acks[0].gen;
    assert!(gen > 0);
    let mut dup = m.clone();
    dup.dup = true;
    // Its ack not confirmed: a DUP with the same id and bytes is the
    // broker's redelivery.
    assert_eq!(db.insert_batch(&[dup.clone()], 100).unwrap().redelivered, 1);
    // Ingest saw the broker process the ack: the broker may use packet id 5
    // again, and a DUP under it (sent before a crash) is a new message.
    db.acks_confirmed(1, gen);
    let out = db.insert_batch(&[dup.clone()], 100).unwrap();
    assert_eq!((out.stored, out.redelivered), (1, 0));
    // That is remembered across restarts.
    let gen2 = out.acks[0].gen;
    db.acks_confirmed(1, gen2);
    db.save_state_now().unwrap();
    drop(db);
    let mut db = dir.db(l.clone());
    db.new_connection(0, 1, true);
    assert_eq!(db.insert_batch(&[dup.clone()], 100).unwrap().stored, 1);
    // A DUP after the broker lost the session is never a redelivery.
    db.new_connection(0, 2, false);
    assert_eq!(db.insert_batch(&[dup], 100).unwrap().stored, 1);
}

#[test]
fn packet_ids_and_lost_sessions_are_each_sessions_own_across_restarts() {
    let dir = Dir::new();
    let l = layout("", "");
    let sessions = ["gw".to_string(), "gw-alarms".to_string()];
    let on = |session: usize, payload: &[u8], dup: bool| {
        let mut m = msg(&l, "devices/a/state", payload, 5, dup);
        m.session = session;
        m.ack.as_mut().unwrap().session = session;
        m.ack.as_mut().unwrap().epoch = session as u64 + 1;
        m
    };
    let mut db = dir.db(l.clone());
    db.register_sessions(&sessions).unwrap();
    db.new_connection(0, 1, true);
    db.new_connection(1, 2, true);
    // Packet id 5 of each session: two messages, both stored.
    let out = db
        .insert_batch(&[on(0, b"zero", false), on(1, b"one", false)], 100)
        .unwrap();
    assert_eq!(out.stored, 2);
    assert_eq!(
        out.acks.iter().map(|a| a.session).collect::<Vec<_>>(),
        [0, 1]
    );
    // Each session's redelivery is known as such, under its own id.
    let out = db
        .insert_batch(&[on(1, b"one", true), on(0, b"zero", true)], 100)
        .unwrap();
    assert_eq!((out.stored, out.redelivered), (0, 2));
    // Session 1's message under session 0's id is new.
    assert_eq!(
        db.insert_batch(&[on(0, b"one", true)], 100).unwrap().stored,
        1
    );
    db.save_state_now().unwrap();
    drop(db);
    // After a restart: the broker lost session 1 only; its DUP is new,
    // session 0's is still a redelivery.
    let mut db = dir.db(l.clone());
    db.register_sessions(&sessions).unwrap();
    db.new_connection(0, 1, true);
    db.new_connection(1, 2, false);
    db.save_state_now().unwrap();
    drop(db);
    let mut db = dir.db(l.clone());
    db.register_sessions(&sessions).unwrap();
    db.new_connection(0, 1, true);
    db.new_connection(1, 2, true);
    let out = db
        .insert_batch(&[on(0, b"one", true), on(1, b"one", true)], 100)
        .unwrap();
    assert_eq!((out.redelivered, out.stored), (1, 1));
}

#[test]
fn each_cluster_holds_every_record_and_the_first_named_takes_over_the_unnamed_backlog() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(&rounds(&l, 2, 4), 100).unwrap();
    assert_eq!(payloads(&mut db, 0).len(), 4);
    drop(db);
    // The same gateway now names two clusters: the first is the cluster it
    // wrote to so far, with that backlog and its numbers; the second starts
    // empty and gets every record from now on.
    let two = two_clusters(&l);
    let names: Vec<&str> = two.dests.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "persistent://t/n/status@east",
            "persistent://t/n/status@west",
            "persistent://t/n/alarms@east",
            "persistent://t/n/alarms@west",
        ]
    );
    let mut db = dir.db(two.clone());
    assert_eq!(payloads(&mut db, 0).len(), 4, "east keeps the backlog");
    assert!(payloads(&mut db, 1).is_empty());
    let out = db
        .insert_batch(&[msg(&two, "devices/a/state", b"new", 9, false)], 100)
        .unwrap();
    assert_eq!(out.stored, 1);
    assert_eq!(
        db.last_seqs()[..2],
        [5, 5],
        "a topic's numbers are the same in every cluster"
    );
    assert_eq!(payloads(&mut db, 1), ["new"]);
    // A cluster confirming its copy leaves the other's.
    db.delivered(0, 5, 0).unwrap();
    assert!(payloads(&mut db, 0).is_empty());
    assert_eq!(payloads(&mut db, 1), ["new"]);
}

/// `l`'s streams written to two clusters, `east` and `west`.
fn two_clusters(l: &Layout) -> Layout {
    let streams: Vec<_> = (0..2)
        .map(|s| crate::config::StreamConfig {
            name: l.streams[s].name.clone(),
            kind: l.streams[s].kind,
            subscriptions: l.streams[s].subscriptions.clone(),
            topic: l.dests[l.streams[s].dests[0]].topic.clone(),
            history_topic: None,
            overflow: l.streams[s].overflow,
            limits: l.streams[s].limits,
        })
        .collect();
    Layout::with_clusters(&streams, &["east".into(), "west".into()])
}

#[test]
fn a_cluster_that_lost_confirmed_records_is_held_until_they_are_copied_back() {
    const EAST: usize = 0;
    const WEST: usize = 1;
    let dir = Dir::new();
    let two = two_clusters(&layout("", ""));
    let mut db = dir.db(two.clone());
    db.insert_batch(&rounds(&two, 2, 6), 100).unwrap();
    for d in [EAST, WEST] {
        db.resume(d, -1).unwrap();
        db.delivered(d, 4, 0).unwrap();
    }
    // East's data is deleted: its broker names no record of the producer,
    // minutes after it confirmed 1-4. Held: nothing changes.
    db.advance_clock(60_000);
    let lost = |r: Result<ResumeOutcome, StoreError>| match r {
        Err(StoreError::ClusterLost {
            confirmed,
            broker_last,
            ..
        }) => (confirmed, broker_last),
        other => panic!("not held: {other:?}"),
    };
    assert_eq!(lost(db.resume(EAST, -1)), (4, -1));
    assert_eq!(payloads(&mut db, EAST).len(), 2);
    drop(db);

    // A restart while held; west goes on with new records 7 and 8.
    let mut db = dir.db(two.clone());
    db.resume(WEST, 4).unwrap();
    db.insert_batch(&[msg(&two, "devices/a/state", b"7", 61, false)], 100)
        .unwrap();
    db.insert_batch(&[msg(&two, "devices/a/state", b"8", 62, false)], 100)
        .unwrap();
    db.delivered(WEST, 8, 0).unwrap();
    // A refill that stopped half way, and hours later still nothing: held.
    assert_eq!(lost(db.resume(EAST, 2)), (4, 2));
    db.advance_clock(7 * 3_600_000);
    assert_eq!(lost(db.resume(EAST, -1)), (4, -1));
    let incidents: i64 = db
        .conn()
        .query_row(
            "SELECT COUNT(*) FROM incidents WHERE kind = 'cluster-lost'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(incidents, 1);
    assert_eq!(payloads(&mut db, EAST), ["d0:2", "d1:2", "7", "8"]);

    // The refill copied west's 1-8 under the same numbers: east's records
    // the copy holds are skipped, none renumbered (7 and 8 were never
    // sent to east by ferry, but west's session had sent them).
    let out = db.resume(EAST, 8).unwrap();
    assert_eq!((out.skipped, out.renumbered_by), (4, 0));
    assert!(payloads(&mut db, EAST).is_empty());
    // Released: a later -1 is the broker's, not a loss of these records.
    db.insert_batch(&[msg(&two, "devices/a/state", b"9", 63, false)], 100)
        .unwrap();
    assert_eq!(db.resume(EAST, 8).unwrap().skipped, 0);
    assert_eq!(payloads(&mut db, EAST), ["9"]);
}

#[test]
fn a_cluster_that_forgot_an_idle_producer_is_not_held() {
    let dir = Dir::new();
    let two = two_clusters(&layout("", ""));
    let mut db = dir.db(two.clone());
    db.insert_batch(&rounds(&two, 2, 6), 100).unwrap();
    db.resume(0, -1).unwrap();
    db.delivered(0, 4, 0).unwrap();
    // Ferry was off for 7 h (its store's clock stood still): the broker
    // forgot the idle producer, its records are there.
    let wall = now_ms() as i64 - 7 * 3_600_000;
    db.conn()
        .execute(
            "UPDATE store_state SET value = ?1 WHERE name LIKE 'confirmed_wall:%'",
            [wall],
        )
        .unwrap();
    let out = db.resume(0, -1).unwrap();
    assert!(out.forgotten.is_some());
    assert_eq!(payloads(&mut db, 0).len(), 2);
}

#[test]
fn one_cluster_that_forgot_its_producer_is_not_held() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(&rounds(&l, 2, 6), 100).unwrap();
    db.resume(0, -1).unwrap();
    db.delivered(0, 4, 0).unwrap();
    // No other cluster holds the records: nothing to wait for.
    let out = db.resume(0, -1).unwrap();
    assert!(out.forgotten.is_some());
    assert_eq!(payloads(&mut db, 0).len(), 2);
}

#[test]
fn ages_follow_the_store_clock_not_the_wall_clock() {
    let dir = Dir::new();
    let l = layout("max_age_secs = 60", "");
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(
            &[
                msg(&l, "devices/a/state", b"1", 1, false),
                msg(&l, "devices/a/state", b"2", 2, false),
            ],
            100,
        )
        .unwrap();
        db.advance_clock(30_000);
        db.save_state_now().unwrap();
    }
    // A restart (wall clock years off or not): the clock goes on from 30 s.
    let mut db = dir.db(l.clone());
    assert!(db.clock().now_ms() >= 30_000);
    assert!(db.shed_aged().unwrap().is_empty());
    db.advance_clock(31_000);
    let shed = db.shed_aged().unwrap();
    assert_eq!(shed.dropped.get(&(0, DropReason::MaxAge)), Some(&1));
    assert_eq!(payloads(&mut db, 0), vec!["2"]);
}

#[test]
fn an_oversized_message_needs_only_the_room_its_dead_letter_takes() {
    let l = layout("", "");
    let big = msg(&l, "devices/a/state", &vec![0u8; 60 << 20], 1, false);
    let room = super::db::stored_size(&l, &big, 256 * 1024);
    assert!(room < 200 * 1024, "{room}");
    let small = msg(&l, "devices/a/state", &[0u8; 100], 1, false);
    assert!(super::db::stored_size(&l, &small, 256 * 1024) < 1024);
}

#[test]
fn randomly_damaged_stores_are_used_or_moved_aside_never_a_failed_start() {
    // A healthy store with records, redelivery rows and dead letters.
    let dir = Dir::new();
    let l = layout("", "max_records = 50");
    let healthy = dir.path.join("healthy.db");
    {
        let mut db = Db::open(&healthy, l.clone(), Durability::Full).unwrap().0;
        db.resume(0, -1).unwrap();
        for chunk in rounds(&l, 7, 300).chunks(50) {
            db.insert_batch(chunk, 100).unwrap();
        }
        db.insert_batch(&[msg(&l, "devices/a/alarm", &[7u8; 300], 9, false)], 100)
            .unwrap();
        db.delivered(0, 100, 0).unwrap();
        db.checkpoint(true);
        db.conn()
            .pragma_update(None, "journal_mode", "DELETE")
            .unwrap();
    }
    let original = std::fs::read(&healthy).unwrap();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut used, mut moved) = (0, 0);
    for round in 0..400 {
        let mut bytes = original.clone();
        for _ in 0..1 + next() % 8 {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = next() as u8;
        }
        let path = dir.path.join(format!("r{round}.db"));
        std::fs::write(&path, &bytes).unwrap();
        let (mut db, damaged) = match Db::open(&path, l.clone(), Durability::Full) {
            Ok(r) => r,
            Err(e) => panic!("round {round}: a damaged store stopped the start: {e}"),
        };
        let moved_at_open = damaged.is_some();
        // Everything ferry does with a store either works or reports damage,
        // which the next start turns into a fresh store.
        let run = |db: &mut Db| -> Result<(), StoreError> {
            db.resume(0, 120)?;
            db.resume(1, -1)?;
            db.insert_batch(&rounds(&l, 3, 20), 100)?;
            db.fetch(0, 0, 1000, usize::MAX)?;
            db.fetch(1, 0, 1000, usize::MAX)?;
            db.delivered(0, 150, 0)?;
            db.shed_aged()?;
            db.shed_emergency(0, DropReason::DiskFull)?;
            db.shed_emergency(1, DropReason::DiskFull)?;
            db.save_state_now()?;
            Ok(())
        };
        match run(&mut db) {
            Ok(()) if moved_at_open => moved += 1,
            Ok(()) => used += 1,
            Err(StoreError::Damaged(reason)) => {
                drop(db);
                super::schema::mark_damaged(&path, &reason);
                let (mut db, damaged) = Db::open(&path, l.clone(), Durability::Full)
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                assert!(damaged.is_some(), "round {round}");
                run(&mut db).unwrap_or_else(|e| panic!("round {round}: fresh store: {e}"));
                moved += 1;
            }
            Err(e) => panic!("round {round}: not classified as damage: {e}"),
        }
        // `ferry status` never fails on what ferry could open.
        let _ = crate::status::read(&path);
    }
    eprintln!("400 damaged copies: {used} used as they were, {moved} moved aside");
    assert_eq!(used + moved, 400);
}

#[test]
fn a_restored_copy_skips_what_the_store_it_was_copied_from_sent_and_a_new_store_does_not() {
    let dir = Dir::new();
    let l = layout("", "");
    let path = dir.path.join("s.db");
    let backup = dir.path.join("backup.db");
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&numbered(&l, 5), 100).unwrap();
    }
    std::fs::copy(&path, &backup).unwrap();
    {
        // The original sends them (and two more) after the copy was made.
        let mut db = dir.db(l.clone());
        db.resume(0, -1).unwrap();
        db.insert_batch(&numbered(&l, 2), 100).unwrap();
    }
    std::fs::copy(&backup, &path).unwrap();
    let mut db = dir.db(l.clone());
    let out = db.resume(0, 7).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 5,
            renumbered_by: 0,
            forgotten: None
        },
        "the copy's records were sent by the original"
    );
    db.insert_batch(&numbered(&l, 1), 100).unwrap();
    assert_eq!(seqs(&mut db, 0), vec![8]);
    drop(db);

    // A new store (the old one deleted) has another id: the file beside it
    // says nothing about its records.
    std::fs::remove_file(&path).unwrap();
    let mut db = dir.db(l.clone());
    db.insert_batch(&numbered(&l, 5), 100).unwrap();
    let out = db.resume(0, 7).unwrap();
    assert_eq!(out.skipped, 0);
    assert_eq!(seqs(&mut db, 0), vec![8, 9, 10, 11, 12]);
}

#[test]
fn a_fetch_stops_at_its_byte_limit_but_returns_one_record_at_least() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let updates: Vec<Inbound> = (0..5u16)
        .map(|i| {
            msg(
                &l,
                &format!("devices/d{i}/state"),
                &[b'x'; 100],
                i + 1,
                false,
            )
        })
        .collect();
    db.insert_batch(&updates, 100).unwrap();
    let seqs = |recs: Vec<Record>| recs.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(seqs(db.fetch(0, 0, 10, 250).unwrap()), vec![1, 2]);
    assert_eq!(seqs(db.fetch(0, 0, 10, 300).unwrap()), vec![1, 2, 3]);
    assert_eq!(
        seqs(db.fetch(0, 2, 10, 10).unwrap()),
        vec![3],
        "one at least"
    );
    assert_eq!(seqs(db.fetch(0, 0, 2, usize::MAX).unwrap()), vec![1, 2]);
}

#[test]
fn a_restored_copy_never_takes_the_originals_horizon_for_what_it_numbered_itself() {
    // The original resumes after numbering 6..=10 (its horizon file says
    // 10); the copy, put back with 1..=5 sent and nothing pending, numbers
    // its own 6..=10 before it can resume: those were never sent.
    let dir = Dir::new();
    let l = layout("", "");
    let path = dir.path.join("s.db");
    let backup = dir.path.join("backup.db");
    {
        let mut db = dir.db(l.clone());
        db.resume(0, -1).unwrap();
        db.insert_batch(&numbered(&l, 5), 100).unwrap();
        db.delivered(0, 5, 0).unwrap();
    }
    std::fs::copy(&path, &backup).unwrap();
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&numbered(&l, 5), 100).unwrap();
        db.resume(0, 5).unwrap();
    }
    std::fs::copy(&backup, &path).unwrap();
    {
        let mut db = dir.db(l.clone());
        db.insert_batch(&numbered(&l, 5), 100).unwrap();
    }
    let mut db = dir.db(l.clone());
    let out = db.resume(0, 10).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 0,
            renumbered_by: 5,
            forgotten: None
        }
    );
    assert_eq!(seqs(&mut db, 0), vec![11, 12, 13, 14, 15]);
}
