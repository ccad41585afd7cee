//! Every way a store can come back different from what the broker knows
//! (deleted, moved aside as damaged, restored from an older copy, written
//! by an older ferry): records it stored while Pulsar was out of reach
//! arrive, each exactly once, in order.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Delivers rounds `0..10` of 10 devices, stops ferry, lets `replace` do
/// its worst to the store, stores rounds `10..60` while Pulsar is out of
/// reach, then lets ferry reach Pulsar: the topic must hold all 600, each
/// exactly once, in order. Returns what `ferry status` says then, and the
/// stores ferry moved aside.
async fn replaced_store_loses_nothing(
    test: &str,
    replace: impl FnOnce(&Ferry),
) -> (String, Vec<String>) {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, test).await;
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 10).await;
    ferry.wait_drained(100, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));

    replace(&ferry);

    ferry.cut_off_pulsar();
    ferry.start();
    devices.publish_rounds(10, 60).await;
    ferry.wait_stored(500, SECS(60)).await;
    let stored = ferry.counters();
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(500, SECS(60)).await;
    let msgs = read_topic(stack, &topic, false, 600, SECS(20)).await;
    let t = tally(&msgs, &devices.ids, 60);
    let after = ferry.counters();
    report(
        test,
        &format!(
            "after the store was replaced, 500 stored offline ({stored:?}); then {after:?}; topic: {t:?}"
        ),
    );
    assert_eq!(t, exact(600));
    assert_eq!(after.get("skipped_on_resume").copied().unwrap_or(0), 0);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
    (ferry.status(false), ferry.moved_aside())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_deleted_while_ferry_was_stopped_loses_nothing_it_stores_before_pulsar_is_back() {
    replaced_store_loses_nothing("deleted", |ferry| {
        let path = ferry.store_path();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_moved_aside_and_nothing_stored_after_it_is_lost() {
    let (table, aside) = replaced_store_loses_nothing("damaged", |ferry| {
        // Garbage over the file's header.
        let path = ferry.store_path();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..64].copy_from_slice(&[0x5a; 64]);
        std::fs::write(&path, bytes).unwrap();
    })
    .await;
    report("damaged", &format!("moved aside: {aside:?}\n{table}"));
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(table.contains("INCIDENT"), "{table}");
    assert!(table.contains("store-damaged"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_from_an_older_copy_sends_what_it_stored_since() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "restored").await;
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 5).await;
    ferry.wait_drained(50, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));
    // A backup of the store, taken while ferry was stopped.
    let store = ferry.store_path();
    let backup = ferry.dir.join("backup.db");
    std::fs::copy(&store, &backup).unwrap();
    let _ = std::fs::remove_file(format!("{}-wal", store.display()));

    // The original goes on: it stores 51..=100 while Pulsar is out of
    // reach, then sends them (its horizon file then says 100).
    ferry.cut_off_pulsar();
    ferry.start();
    devices.publish_rounds(5, 10).await;
    ferry.wait_stored(100, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(100, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));

    // The backup is restored: the store numbers from 51 again, while the
    // broker holds 1..=100. What it stores now was never sent.
    std::fs::copy(&backup, &store).unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", store.display()));
    }
    ferry.cut_off_pulsar();
    ferry.start();
    devices.publish_rounds(10, 15).await;
    ferry.wait_stored(100, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(100, SECS(60)).await;
    let msgs = read_topic(stack, &topic, false, 150, SECS(20)).await;
    let t = tally(&msgs, &devices.ids, 15);
    report(
        "restored",
        &format!(
            "restored copy, 50 stored offline: {:?}; topic {t:?}",
            ferry.counters()
        ),
    );
    assert_eq!(t, exact(150));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_written_by_every_older_ferry_deliver_their_backlog_exactly_once() {
    let (stack, _shared) = Stack::shared().await;
    let mut figures = Vec::new();
    for version in 1..=4 {
        let test = format!("fixture-v{version}");
        let Scenario {
            topic,
            prefix,
            mut ferry,
        } = Scenario::new(stack, &test).await;
        let sql =
            std::fs::read_to_string(repo().join(format!("tests/fixtures/store-v{version}.sql")))
                .unwrap()
                .replace("@STATUS@", &topic)
                .replace("devices/", &format!("{prefix}/"));
        ferry.execute_on_store(&sql);
        ferry.start();
        ferry.wait_drained(0, SECS(60)).await;
        let msgs = read_topic(stack, &topic, false, 10, SECS(20)).await;
        let seqs: Vec<u64> = msgs.iter().map(|m| m.sequence_id).collect();
        let fixture = msgs
            .iter()
            .filter(|m| String::from_utf8_lossy(&m.payload).contains(&format!("\"v{version}\"")))
            .count();
        figures.push(format!(
            "v{version}: {} messages, sequence ids {seqs:?}",
            msgs.len()
        ));
        assert_eq!(seqs, (41..=50).collect::<Vec<_>>(), "version {version}");
        assert_eq!(fixture, 10);
        // And it goes on numbering from there.
        let mut devices = Devices::connect(stack, &prefix, 5).await;
        devices.publish_rounds(2, 3).await;
        ferry.wait_drained(65, SECS(60)).await;
        let msgs = read_topic(stack, &topic, false, 15, SECS(20)).await;
        let seqs: Vec<u64> = msgs.iter().map(|m| m.sequence_id).collect();
        assert_eq!(seqs, (41..=55).collect::<Vec<_>>(), "version {version}");
        devices.disconnect().await;
        assert_eq!(ferry.terminate(), Some(0));
    }
    report("fixtures", &figures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_a_newer_ferry_is_refused_with_exit_4_and_left_alone() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario { mut ferry, .. } = Scenario::new(stack, "too-new").await;
    ferry.start_subscribed().await;
    assert_eq!(ferry.terminate(), Some(0));
    let store = ferry.store_path();
    ferry.execute_on_store("PRAGMA user_version = 99");
    let before = std::fs::read(&store).unwrap();
    ferry.start();
    let code = ferry.wait_exit(SECS(20)).await;
    let log = ferry.log_text();
    report("too-new", &format!("exit {code:?}: {}", tail(&log, 1)));
    assert_eq!(code, Some(4));
    assert!(log.contains("schema version 99"), "{log}");
    assert_eq!(
        std::fs::read(&store).unwrap(),
        before,
        "the store is left as it is"
    );
    let aside = ferry
        .files()
        .iter()
        .filter(|n| n.contains("damaged"))
        .count();
    assert_eq!(aside, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_values_the_quick_check_accepts_are_repaired_or_moved_aside_never_a_crash_loop() {
    let (stack, _shared) = Stack::shared().await;
    let mut figures = Vec::new();
    // (what, SQL on the stopped store, moved aside?)
    for (what, sql, moved) in [
        (
            "next_seq behind the records",
            "UPDATE destinations SET next_seq = 1",
            false,
        ),
        (
            "next_seq = 2^48",
            "UPDATE destinations SET next_seq = 281474976710656",
            true,
        ),
    ] {
        let Scenario {
            topic,
            prefix,
            mut ferry,
        } = Scenario::new(stack, "bad-values").await;
        ferry.cut_off_pulsar();
        ferry.start_subscribed().await;
        let mut devices = Devices::connect(stack, &prefix, 5).await;
        devices.publish_rounds(0, 2).await;
        ferry.wait_stored(10, SECS(30)).await;
        assert_eq!(ferry.terminate(), Some(0));
        ferry.execute_on_store(sql);

        ferry.restore_pulsar();
        ferry.start();
        devices.publish_rounds(2, 4).await;
        let expect = if moved { 10 } else { 20 };
        ferry.wait_drained(expect, SECS(60)).await;
        let running = ferry.is_running();
        let aside = ferry.moved_aside().len();
        let msgs = read_topic(stack, &topic, false, expect as usize, SECS(15)).await;
        let t = if moved {
            // The fresh store forwards what came after; the moved-aside file
            // keeps the first 10 for the operator.
            let dups = duplicates(&msgs);
            let fresh = msgs.iter().filter(|m| m.n() >= 2).count();
            (msgs.len(), dups, fresh)
        } else {
            let t = tally(&msgs, &devices.ids, 4);
            (
                t.received,
                t.duplicated + t.out_of_order,
                t.received - t.lost,
            )
        };
        figures.push(format!("{what}: running {running}, moved aside {aside}, topic (messages, duplicates or out of order, updates) {t:?}"));
        devices.disconnect().await;
        assert!(running, "{what}: ferry runs");
        assert_eq!(aside, usize::from(moved), "{what}");
        assert_eq!(t, (expect as usize, 0, expect as usize), "{what}");
        assert_eq!(ferry.terminate(), Some(0));
    }
    report("bad-values", &figures.join("\n"));
}
