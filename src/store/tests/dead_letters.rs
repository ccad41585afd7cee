//! The dead-letter table stays within `store.dead_letters_*`: the oldest
//! go first, the lifetime counters keep counting.

use super::*;
use std::time::Duration;

use crate::config::DeadLetterLimits;

/// Dead letters as (topic, kept payload length), oldest first.
fn kept(db: &Db) -> Vec<(String, i64)> {
    db.conn()
        .prepare("SELECT mqtt_topic, LENGTH(payload) FROM dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A message no stream routes (a dead letter) with `n` payload bytes.
fn poison(l: &Layout, i: u16, n: usize) -> Inbound {
    msg(l, &format!("elsewhere/{i}"), &vec![b'x'; n], i, false)
}

fn limits(max_count: u64, max_bytes: u64, max_age_secs: u64) -> DeadLetterLimits {
    DeadLetterLimits {
        max_count,
        max_bytes,
        max_age: Duration::from_secs(max_age_secs),
    }
}

#[test]
fn past_the_count_the_oldest_dead_letters_go_and_are_still_counted() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.set_dead_letter_limits(limits(3, 1 << 20, 3600));
    let mut pruned = 0;
    for i in 1..=8 {
        let out = db
            .insert_batch(
                &[
                    poison(&l, i, 10),
                    msg(&l, "devices/a/state", b"ok", 100 + i, false),
                ],
                100,
            )
            .unwrap();
        pruned += out.pruned.letters;
    }
    let topics: Vec<String> = kept(&db).into_iter().map(|(t, _)| t).collect();
    assert_eq!(topics, ["elsewhere/6", "elsewhere/7", "elsewhere/8"]);
    assert_eq!(pruned, 5);
    assert_eq!(db.counter("dead_lettered"), 8);
    assert_eq!(db.counter("dead_letters_pruned"), 5);
    assert_eq!(db.counter("dead_letters_pruned_bytes"), 50);
    // The records between them were all stored.
    assert_eq!(db.total().records, 8);
}

#[test]
fn past_the_byte_bound_the_oldest_go_until_the_rest_fits() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.set_dead_letter_limits(limits(1000, 250, 3600));
    let batch: Vec<Inbound> = (1..=5).map(|i| poison(&l, i, 100)).collect();
    let out = db.insert_batch(&batch, 1000).unwrap();
    // 100 + 100 fit in 250; a third would not.
    assert_eq!(
        kept(&db),
        [("elsewhere/4".into(), 100), ("elsewhere/5".into(), 100)]
    );
    assert_eq!(
        out.pruned,
        Pruned {
            letters: 3,
            bytes: 300
        }
    );
    assert_eq!(db.counter("dead_lettered"), 5);
}

#[test]
fn no_dead_letter_is_kept_with_a_count_of_zero_but_each_is_counted() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.set_dead_letter_limits(limits(0, 1 << 20, 3600));
    db.insert_batch(&[poison(&l, 1, 10), poison(&l, 2, 10)], 100)
        .unwrap();
    assert!(kept(&db).is_empty());
    assert_eq!(db.counter("dead_lettered"), 2);
    assert_eq!(db.counter("dead_letters_pruned"), 2);
}

#[test]
fn dead_letters_older_than_their_age_are_pruned_and_lower_limits_apply_at_once() {
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.insert_batch(
        &[poison(&l, 1, 10), poison(&l, 2, 10), poison(&l, 3, 10)],
        100,
    )
    .unwrap();
    // Received two days ago (by the wall clock), the first two.
    let two_days_ago = now_ms() as i64 - 2 * 24 * 3600 * 1000;
    db.conn()
        .execute(
            "UPDATE dead_letters SET received_ms = ?1 WHERE mqtt_topic != 'elsewhere/3'",
            [two_days_ago],
        )
        .unwrap();
    // The default keeps a week.
    assert_eq!(db.prune_dead_letters().unwrap(), Pruned::default());
    assert_eq!(kept(&db).len(), 3);
    db.set_dead_letter_limits(limits(1000, 1 << 20, 24 * 3600));
    assert_eq!(
        db.prune_dead_letters().unwrap(),
        Pruned {
            letters: 2,
            bytes: 20
        }
    );
    assert_eq!(kept(&db), [("elsewhere/3".into(), 10)]);
    assert_eq!(db.counter("dead_letters_pruned"), 2);
}

#[test]
fn desired_state_dead_letters_are_bounded_too() {
    use crate::store::db::DesiredUpdate;
    let dir = Dir::new();
    let l = layout("", "");
    let mut db = dir.db(l.clone());
    db.set_dead_letter_limits(limits(2, 1 << 20, 3600));
    let bad = |i: u32| DesiredUpdate {
        device: Some(format!("d{i}")),
        version: None,
        payload: bytes::Bytes::from_static(b"{}"),
        problem: None,
    };
    let topic = "persistent://t/n/desired";
    db.downlink_start(topic).unwrap();
    let out = db
        .desired_received(topic, &[bad(1), bad(2), bad(3)], b"p", true, 1024)
        .unwrap();
    assert_eq!((out.dead_lettered, out.pruned.letters), (3, 1));
    assert_eq!(kept(&db).len(), 2);
}
