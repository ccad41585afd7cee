//! The downlink's state in the store: versions, catching up, applying.

use super::*;
use crate::store::db::{Desired, DesiredUpdate};

const TOPIC: &str = "persistent://t/n/desired";

fn update(device: &str, version: &str, payload: &str) -> DesiredUpdate {
    DesiredUpdate {
        device: Some(device.into()),
        version: Some(version.into()),
        payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
        problem: None,
    }
}

fn pending(db: &Db) -> Vec<(String, u64, String)> {
    db.desired_pending(None, 100)
        .unwrap()
        .into_iter()
        .map(|d| (d.device, d.version, String::from_utf8(d.payload).unwrap()))
        .collect()
}

fn row(device: &str, version: u64, payload: &str) -> (String, u64, String) {
    (device.to_string(), version, payload.to_string())
}

/// Each applied state with the acknowledgement record the downlink stores
/// for it (on the events stream `alarms` in these tests).
fn with_acks(l: &Layout, applied: Vec<Desired>) -> Vec<(Desired, Inbound)> {
    applied
        .into_iter()
        .map(|d| {
            let mut m = msg(
                l,
                &format!("devices/{}/alarm", d.device),
                format!("{}:{}", d.device, d.version).as_bytes(),
                0,
                false,
            );
            m.ack = None;
            (d, m)
        })
        .collect()
}

/// A store that read `TOPIC` to its end once.
fn caught_up(dir: &Dir, l: &Layout) -> Db {
    let mut db = dir.db(l.clone());
    let start = db.downlink_start(TOPIC).unwrap();
    assert_eq!((start.position, start.caught_up), (None, false));
    db.desired_received(TOPIC, &[], b"p0", true, 1024).unwrap();
    db
}

#[test]
fn a_version_at_or_below_what_the_store_holds_is_stale_and_never_handed_out() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    let out = db
        .desired_received(
            TOPIC,
            &[update("a", "2", "a2"), update("b", "1", "b1")],
            b"p1",
            true,
            1024,
        )
        .unwrap();
    assert_eq!((out.stored, out.stale, out.dead_lettered), (2, 0, 0));
    let out = db
        .desired_received(
            TOPIC,
            &[
                update("a", "1", "a1"),
                update("a", "2", "a2 again"),
                update("b", "3", "b3"),
            ],
            b"p2",
            true,
            1024,
        )
        .unwrap();
    assert_eq!((out.stored, out.stale), (1, 2));
    assert_eq!(pending(&db), [row("a", 2, "a2"), row("b", 3, "b3")]);
    assert_eq!(db.counter("desired_received"), 5);
    assert_eq!(db.counter("desired_stale"), 2);
    // The position moved with them, and survives a restart.
    drop(db);
    let mut db = dir.db(l);
    let start = db.downlink_start(TOPIC).unwrap();
    assert_eq!(start.position.as_deref(), Some(&b"p2"[..]));
    assert!(start.caught_up);
    assert_eq!(pending(&db).len(), 2);
}

#[test]
fn the_same_update_read_from_a_second_cluster_is_neither_stored_nor_stale() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    let east = "persistent://t/n/desired@east";
    let west = "persistent://t/n/desired@west";
    db.downlink_start(east).unwrap();
    db.downlink_start(west).unwrap();
    let first = db
        .desired_received(west, &[update("a", "2", "a2")], b"w1", true, 1024)
        .unwrap();
    assert_eq!((first.stored, first.stale, first.again), (1, 0, 0));
    // East, back from an outage, has the same update, and an older one.
    let out = db
        .desired_received(
            east,
            &[update("a", "1", "a1"), update("a", "2", "a2")],
            b"e1",
            false,
            1024,
        )
        .unwrap();
    assert_eq!((out.stored, out.stale, out.again), (0, 1, 1));
    assert_eq!(db.counter("desired_stale"), 1);
    // Each cluster keeps its own position.
    assert_eq!(
        db.downlink_start(east).unwrap().position.as_deref(),
        Some(&b"e1"[..])
    );
    assert_eq!(
        db.downlink_start(west).unwrap().position.as_deref(),
        Some(&b"w1"[..])
    );
}

#[test]
fn while_catching_up_nothing_is_handed_out_and_then_only_the_newest() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l);
    db.downlink_start(TOPIC).unwrap();
    for (v, p) in [("1", b"p1"), ("2", b"p2"), ("3", b"p3")] {
        db.desired_received(TOPIC, &[update("a", v, &format!("a{v}"))], p, false, 1024)
            .unwrap();
        assert!(pending(&db).is_empty(), "catching up at version {v}");
    }
    db.desired_received(TOPIC, &[], b"p4", true, 1024).unwrap();
    assert_eq!(pending(&db), [row("a", 3, "a3")]);
    // Caught up stays caught up.
    db.desired_received(TOPIC, &[update("b", "1", "b1")], b"p5", false, 1024)
        .unwrap();
    assert_eq!(pending(&db).len(), 2);
}

#[test]
fn applied_versions_get_one_acknowledgement_each_in_the_same_transaction() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    db.desired_received(
        TOPIC,
        &[update("a", "1", "a1"), update("b", "7", "b7")],
        b"p1",
        true,
        1024,
    )
    .unwrap();
    let todo = db.desired_pending(None, 100).unwrap();
    let out = db.desired_applied(&with_acks(&l, todo), 1024).unwrap();
    assert_eq!(out.stored, 2);
    assert!(pending(&db).is_empty());
    let acks: Vec<String> = db
        .fetch(1, 0, 10, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.payload).unwrap())
        .collect();
    assert_eq!(acks, ["a:1", "b:7"]);
    assert_eq!(db.counter("desired_applied"), 2);
    // The broker forgot: every state is handed out again, and applying it
    // again adds no acknowledgement.
    assert_eq!(db.desired_forgotten().unwrap(), 2);
    assert_eq!(pending(&db), [row("a", 1, "a1"), row("b", 7, "b7")]);
    let again = db.desired_pending(None, 100).unwrap();
    let out = db.desired_applied(&with_acks(&l, again), 1024).unwrap();
    assert_eq!(out.stored, 0);
    assert!(pending(&db).is_empty());
    assert_eq!(db.last_seqs()[1], 2, "no second acknowledgement");
    assert_eq!(db.counter("desired_republished"), 2);
    // A version that arrived while an older one was being published stays
    // pending after the older one's PUBACK.
    db.desired_received(TOPIC, &[update("a", "2", "a2")], b"p2", true, 1024)
        .unwrap();
    let old = Desired {
        device: "a".into(),
        version: 1,
        payload: b"a1".to_vec(),
    };
    db.desired_applied(&with_acks(&l, vec![old]), 1024).unwrap();
    assert_eq!(pending(&db), [row("a", 2, "a2")]);
}

/// The acknowledgements are ferry's own records: no broker sends them
/// again, so nothing is remembered of them for screening (a row per device
/// in `topic_last` was a page written per acknowledgement), and an MQTT
/// message on the same topic is screened as before.
#[test]
fn acknowledgements_leave_nothing_behind_for_redelivery_screening() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    let updates: Vec<_> = (0..50)
        .map(|i| update(&format!("d{i}"), "1", "x"))
        .collect();
    db.desired_received(TOPIC, &updates, b"p1", true, 1024)
        .unwrap();
    let todo = db.desired_pending(None, 100).unwrap();
    let out = db.desired_applied(&with_acks(&l, todo), 1024).unwrap();
    assert_eq!(out.stored, 50);
    let rows = |db: &Db| -> i64 {
        db.conn()
            .query_row("SELECT COUNT(*) FROM topic_last", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(rows(&db), 0);
    // A retained MQTT message on an acknowledgement's topic: stored, and
    // the same state again is known as unchanged.
    let mut retained = msg(&l, "devices/d0/alarm", b"d0:1", 0, false);
    retained.retain = true;
    let out = db.insert_batch(&[retained.clone()], 1024).unwrap();
    assert_eq!(out.stored, 1);
    assert_eq!(rows(&db), 1);
    let out = db.insert_batch(&[retained], 1024).unwrap();
    assert_eq!((out.stored, out.retained_unchanged), (0, 1));
}

#[test]
fn bad_desired_state_is_dead_lettered_with_its_reason_and_the_rest_goes_on() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    let mut no_key = update("x", "1", "p");
    no_key.device = None;
    let mut no_version = update("x", "1", "p");
    no_version.version = None;
    let batch = [
        no_key,
        no_version,
        update("x", "v2", "p"),
        update("x", "0", "p"),
        update("x", "-3", "p"),
        update("x", "9223372036854775808", "p"),
        update("a/b", "1", "p"),
        update("+", "1", "p"),
        update("", "1", "p"),
        update("x", "1", &"z".repeat(11)),
        update("ok", "9223372036854775807", "fine"),
    ];
    let out = db.desired_received(TOPIC, &batch, b"p1", true, 10).unwrap();
    assert_eq!((out.stored, out.dead_lettered), (1, 10));
    assert_eq!(db.counter("desired_dead_lettered"), 10);
    let reasons: Vec<String> = db
        .conn()
        .prepare("SELECT reason FROM dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(reasons[0], "no key (the device id)");
    assert_eq!(reasons[1], "no version property");
    assert_eq!(
        reasons[2],
        "version \"v2\" is not a positive 64-bit integer"
    );
    assert!(reasons[3..6]
        .iter()
        .all(|r| r.contains("not a positive 64-bit integer")));
    assert_eq!(reasons[6], "key \"a/b\" is not a valid MQTT topic level");
    assert!(reasons[7..9]
        .iter()
        .all(|r| r.contains("not a valid MQTT topic level")));
    assert_eq!(
        reasons[9],
        "payload of 11 bytes exceeds store.max_payload_bytes (10)"
    );
    assert_eq!(pending(&db), [row("ok", i64::MAX as u64, "fine")]);
}

#[test]
fn another_desired_topic_is_read_from_its_start_without_going_back_a_version() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    db.desired_received(TOPIC, &[update("a", "5", "a5")], b"p1", true, 1024)
        .unwrap();
    let todo = db.desired_pending(None, 100).unwrap();
    db.desired_applied(&with_acks(&l, todo), 1024).unwrap();
    let other = "persistent://t/n/desired-2";
    let start = db.downlink_start(other).unwrap();
    assert_eq!((start.position, start.caught_up), (None, false));
    db.desired_received(other, &[update("a", "4", "a4")], b"q1", true, 1024)
        .unwrap();
    assert!(
        pending(&db).is_empty(),
        "version 4 is older than what a has"
    );
    db.desired_received(other, &[update("a", "6", "a6")], b"q2", true, 1024)
        .unwrap();
    assert_eq!(pending(&db), [row("a", 6, "a6")]);
}

#[test]
fn pending_states_page_by_device_after_the_last_one_handed_out() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = caught_up(&dir, &l);
    let updates: Vec<_> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|d| update(d, "1", d))
        .collect();
    db.desired_received(TOPIC, &updates, b"p1", true, 1024)
        .unwrap();
    // "b" applied: no longer pending, skipped by the page.
    let b = db.desired_pending(Some("a"), 1).unwrap();
    assert_eq!(b[0].device, "b");
    db.desired_applied(&with_acks(&l, b), 1024).unwrap();
    let devices = |after: Option<&str>, limit| -> Vec<String> {
        db.desired_pending(after, limit)
            .unwrap()
            .into_iter()
            .map(|d| d.device)
            .collect()
    };
    assert_eq!(devices(None, 2), ["a", "c"]);
    assert_eq!(devices(Some("a"), 2), ["c", "d"]);
    assert_eq!(devices(Some("d"), 2), ["e"], "a short page: the end");
    assert!(devices(Some("e"), 2).is_empty());
}
