use super::db::{Db, SEQ_MAX};
use super::layout::{DropReason, Layout};
use super::*;
use crate::config::{parse, Durability};

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
        ack: Some(AckToken { pkid, epoch: 1 }),
        counted: false,
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
    let batch = numbered(&l, 5);
    db.insert_batch(&batch, 100).unwrap();
    let out = db.resume(0, 3).unwrap();
    assert_eq!(
        out,
        ResumeOutcome {
            skipped: 3,
            renumbered_by: 0
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
    assert!(db.resume(0, SEQ_MAX as i64).is_err());
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
    let shed = db.shed_aged(db::now_ms()).unwrap();
    assert!(shed.is_empty(), "nothing is a minute old yet");
    let shed = db.shed_aged(db::now_ms() + 61_000).unwrap();
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

#[test]
fn a_store_from_before_streams_is_migrated_with_its_numbers() {
    let dir = Dir::new();
    let path = dir.path.join("s.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE journal (seq INTEGER PRIMARY KEY, device TEXT NOT NULL,
               received_ms INTEGER NOT NULL, payload BLOB NOT NULL, props BLOB NOT NULL);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('next_seq', 42);",
        )
        .unwrap();
        let props = postcard::to_allocvec(&RecordProps {
            mqtt_topic: "devices/a/state".into(),
            retain: false,
        })
        .unwrap();
        c.execute(
            "INSERT INTO journal VALUES (41, 'a', 1, x'6f6c64', ?1)",
            [props],
        )
        .unwrap();
    }
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    let recs = db.fetch(0, 0, 10, usize::MAX).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].seq, recs[0].payload.as_slice()), (41, &b"old"[..]));
    assert_eq!(db.last_seqs()[0], 41);
    db.insert_batch(&[msg(&l, "devices/a/state", b"new", 1, false)], 100)
        .unwrap();
    assert_eq!(db.last_seqs()[0], 42);
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
fn redeliveries_are_recognised_in_rows_written_by_older_stores() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    // An older store kept the topic as text and a payload-only digest.
    let old_digest = ((crc32c::crc32c(b"x") as i64) << 32) | 1;
    db.conn()
        .execute(
            "INSERT INTO mqtt_seen (pkid, topic, digest) VALUES (7, 'devices/a/state', ?1)",
            [old_digest],
        )
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
    assert_eq!(out.redelivered, 1, "new rows carry the topic in the digest");
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
            renumbered_by: 0
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
            &[7],
            &[msg(&l, "devices/a/state", b"on", 7, true)],
            100,
        )
        .unwrap();
    assert_eq!((out.stored, out.redelivered), (1, 0));
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
