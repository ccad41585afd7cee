//! The main promise on a healthy stack: every update exactly once, in order
//! per device, and the compacted topic holds the latest state of each device.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_devices_ten_thousand_updates_arrive_exactly_once_in_order() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "stream").await;
    let gateway = ferry.gateway().to_string();
    ferry.start_subscribed().await;

    let mut devices = Devices::connect(stack, &prefix, 100).await;
    devices.publish_rounds(0, 100).await;
    ferry.wait_drained(10_000, SECS(180)).await;

    let msgs = read_topic(stack, &topic, false, 10_000, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 100);
    report("stream", &format!("{t:?}"));
    assert_eq!(t, exact(10_000));
    for m in &msgs {
        assert_eq!(m.properties["ferry.gateway"], gateway);
        assert_eq!(m.properties["ferry.record"], m.sequence_id.to_string());
        assert_eq!(m.properties["mqtt.topic"], devices.topic(&m.key));
    }

    stack.admin_api().compact(&topic).await;
    let latest = read_topic(stack, &topic, true, 100, SECS(30)).await;
    report(
        "stream",
        &format!("compacted read: {} messages", latest.len()),
    );
    assert_eq!(latest.len(), 100);
    let mut keys: Vec<&str> = latest.iter().map(|m| m.key.as_str()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 100, "one message per device");
    assert!(
        latest.iter().all(|m| m.n() == 99),
        "each device's last update"
    );

    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// A crash between the broker's receipt and the store's delete leaves
/// records the broker already holds. Simulated exactly by putting back a
/// copy of the store taken while 1,000 records were pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_ferry_skips_what_the_broker_already_holds() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "resume").await;
    // First with Pulsar out of reach, so that records pile up in the store.
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 100).await;
    ferry.wait_stored(1000, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));
    assert_eq!(ferry.pending(), 1000);
    let snapshot = ferry.dir.join("snapshot.db");
    std::fs::copy(ferry.store_path(), &snapshot).unwrap();

    // Now with Pulsar: all 1,000 go out.
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(1000, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));

    // Put the old store back: 1,000 records the broker already holds.
    std::fs::copy(&snapshot, ferry.store_path()).unwrap();
    assert_eq!(ferry.pending(), 1000);
    ferry.start();
    ferry.wait_log("producer ready", SECS(30)).await;
    devices.publish_rounds(100, 150).await;
    ferry.wait_drained(1500, SECS(60)).await;
    let c = ferry.counters();
    let skipped = c.get("skipped_on_resume").copied().unwrap_or(0);
    let resent = c.get("resent").copied().unwrap_or(0);
    let delivered = c.get("delivered").copied().unwrap_or(0);
    report(
        "resume",
        &format!("after restoring 1000 delivered records: skipped {skipped}, resent {resent}, newly delivered {delivered}"),
    );
    assert_eq!((skipped, resent, delivered), (1000, 0, 500));

    let msgs = read_topic(stack, &topic, false, 1500, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 150);
    report("resume", &format!("{t:?}"));
    assert_eq!(t, exact(1500));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
