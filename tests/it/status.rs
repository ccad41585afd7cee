//! `ferry status` reads the running agent's store without disturbing it.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_links_backlog_and_dead_letters_of_the_running_agent() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic: _,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "status").await;
    ferry.cut_off_pulsar();
    ferry.add_settings("store", "max_payload_bytes = 1024");
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 5).await;
    devices.publish_rounds(0, 20).await;
    let big = devices.topic("dev-0001");
    devices.publish_raw(&big, vec![b'x'; 2000]).await;
    ferry.wait_stored(100, SECS(30)).await;
    tokio::time::sleep(SECS(6)).await;

    let table = ferry.status(false);
    report(
        "status",
        &format!("ferry status while Pulsar is unreachable:\n{table}"),
    );
    assert!(table.contains("running, pid"), "{table}");
    assert!(table.contains("mqtt             connected"), "{table}");
    assert!(
        table.contains("pulsar           device-status: disconnected"),
        "{table}"
    );
    assert!(table.contains("cannot connect"), "{table}");
    assert!(table.contains("backlog          100 records"), "{table}");
    assert!(table.contains("dead letters     1"), "{table}");
    assert!(table.contains("exceeds store.max_payload_bytes"), "{table}");

    let json = ferry.status_json();
    assert_eq!(json["pending_records"], 100);
    assert_eq!(json["running"], true);
    assert_eq!(json["agent"]["pulsar"]["connected"], false);
    assert!(json["oldest_age_seconds"].as_f64().unwrap() >= 5.0);

    // Pulsar back: the backlog drains and status says so.
    ferry.terminate();
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(100, SECS(60)).await;
    tokio::time::sleep(SECS(6)).await;
    let json = ferry.status_json();
    report(
        "status",
        &format!("after the drain: {}", ferry.status(false)),
    );
    assert_eq!(json["pending_records"], 0);
    assert_eq!(json["agent"]["pulsar"]["connected"], true);
    assert_eq!(json["time_to_drain_seconds"], 0.0);
    assert!(json["agent"]["drain_rate"].as_f64().unwrap() > 0.0);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
