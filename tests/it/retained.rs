//! Retained device states (Zigbee2MQTT, Tasmota and Shelly can publish
//! their state retained): the broker sends every one again when ferry
//! subscribes; each must reach Pulsar once, and a state that changed while
//! ferry was away, once.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Publishes one retained state per device (`n` in the payload; `None`
/// clears it) and waits for the broker's acks (when clearing, 30 s at most
/// and no failure: the test is over).
async fn retain(stack: &Stack, prefix: &str, devices: &[String], n: Option<u64>) {
    let mut p = Publisher::connect(stack).await;
    for d in devices {
        let payload = match n {
            Some(n) => format!("{{\"device\":\"{d}\",\"n\":{n}}}").into_bytes(),
            None => Vec::new(),
        };
        p.publish_retained(&format!("{prefix}/{d}/state"), payload)
            .await;
    }
    if n.is_some() {
        p.wait_acked(devices.len()).await;
    } else {
        p.acked_within(devices.len(), SECS(30)).await;
    }
    p.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_states_reach_pulsar_once_across_broker_restarts_and_kills() {
    let (stack, _exclusive) = Stack::exclusive().await;
    let WithHistory {
        status,
        history,
        prefix,
        mut ferry,
        ..
    } = WithHistory::new(stack, "retained").await;
    let devices: Vec<String> = (0..20).map(|i| format!("dev-{i:04}")).collect();
    ferry.start_subscribed().await;
    retain(stack, &prefix, &devices, Some(0)).await;
    ferry.wait_drained(20, SECS(60)).await;

    // Two restarts of the broker and two SIGKILLs of ferry: every one makes
    // the broker send the retained states again (at least each time ferry
    // subscribes).
    for round in 0..2 {
        stack.ctl("mqtt-stop");
        stack.ctl("mqtt-start");
        ferry
            .wait_log_count("mqtt connected", 2 + 2 * round, SECS(60))
            .await;
        tokio::time::sleep(SECS(2)).await;
        ferry.kill9();
        ferry.start();
        ferry
            .wait_log_count("mqtt connected", 3 + 2 * round, SECS(60))
            .await;
        tokio::time::sleep(SECS(2)).await;
    }
    ferry.wait_drained(20, SECS(60)).await;
    let before_change = read_topic(stack, &history, false, 20, SECS(15)).await;

    // Five states change while ferry is away: each arrives once.
    assert_eq!(ferry.terminate(), Some(0));
    retain(stack, &prefix, &devices[..5], Some(1)).await;
    ferry.start();
    ferry.wait_drained(25, SECS(60)).await;
    tokio::time::sleep(SECS(2)).await;
    let counters = ferry.counters();
    let hist = read_topic(stack, &history, false, 25, SECS(15)).await;
    let stat = read_topic(stack, &status, false, 25, SECS(15)).await;
    let per_device = |msgs: &[Received]| (msgs.len(), duplicates(msgs));
    report(
        "retained",
        &format!(
            "20 retained states, 2 broker restarts, 2 SIGKILLs: history held {}; after 5 changed while ferry was away: history {:?}, status {:?} (messages, duplicates); counters {counters:?}",
            before_change.len(),
            per_device(&hist),
            per_device(&stat)
        ),
    );
    assert_eq!(before_change.len(), 20);
    assert_eq!(per_device(&hist), (25, 0));
    assert_eq!(per_device(&stat), (25, 0));
    assert_eq!(counters.get("stored"), Some(&25));
    assert_eq!(ferry.terminate(), Some(0));
    retain(stack, &prefix, &devices, None).await;
}
