//! Outages: Pulsar down mid-stream, both brokers gone, and SIGKILL at random
//! moments (with deduplication on, and off: ferry then says so). The tests
//! that stop brokers hold the stack exclusively.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulsar_down_during_five_thousand_updates_loses_nothing() {
    let (stack, _exclusive) = Stack::exclusive().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "outage").await;
    ferry.start_ready().await;

    let mut devices = Devices::connect(stack, &prefix, 50).await;
    devices.publish_rounds(0, 20).await;
    stack.ctl("pulsar-stop");
    devices.publish_rounds(20, 100).await;
    ferry.wait_stored(5000, SECS(60)).await;
    let pending = ferry.pending();
    report(
        "outage",
        &format!("records held in the store while Pulsar was down: {pending}"),
    );
    assert!(
        pending >= 4000,
        "the 4,000 updates published while Pulsar was down wait in the store"
    );
    assert!(ferry.is_running(), "ferry keeps running without Pulsar");
    stack.ctl("pulsar-start");

    ferry.wait_drained(5000, SECS(240)).await;
    let msgs = read_topic(stack, &topic, false, 5000, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 100);
    report("outage", &format!("{t:?}"));
    assert_eq!(t, exact(5000));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_brokers_unreachable_ferry_keeps_running_and_catches_up() {
    let (stack, _exclusive) = Stack::exclusive().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "unreachable").await;
    ferry.start_ready().await;

    stack.ctl("mqtt-stop");
    stack.ctl("pulsar-stop");
    ferry.wait_log("mqtt connection lost", SECS(30)).await;
    ferry.wait_log("uplink disconnected", SECS(60)).await;
    tokio::time::sleep(SECS(5)).await;
    assert!(
        ferry.is_running(),
        "ferry keeps running with both brokers gone"
    );
    let log = ferry.log_text();
    let why: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("mqtt connection lost") || l.contains("uplink disconnected"))
        .take(2)
        .collect();
    report("unreachable", &format!("ferry's log says: {why:?}"));

    // MQTT returns first: updates pile up in ferry's store.
    stack.ctl("mqtt-start");
    let mut devices = Devices::connect(stack, &prefix, 20).await;
    devices.publish_rounds(0, 50).await;
    ferry.wait_stored(1000, SECS(60)).await;
    stack.ctl("pulsar-start");
    ferry.wait_drained(1000, SECS(240)).await;

    let msgs = read_topic(stack, &topic, false, 1000, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 50);
    report("unreachable", &format!("{t:?}"));
    assert_eq!(t, exact(1000));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_twenty_times_during_stream_loses_nothing_and_duplicates_nothing() {
    let (stack, _exclusive) = Stack::exclusive().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "kill9").await;
    ferry.start_subscribed().await;

    // 100 devices x 200 updates as a steady stream of rounds of 100, at
    // least 0.1 s apart (20 s or more), with the MQTT broker restarted
    // halfway; the 20 kills come at most 0.8 s apart (16 s at most), so
    // every one lands inside the stream while ferry is busy with it.
    let ids = KillNine {
        devices: 100,
        rounds: 200,
        pause: Duration::from_millis(100),
        restart_mqtt_after: Some(100),
        kills: 20,
        up_ms: 100..=599,
        down_ms: 0..=199,
    }
    .run(stack, &prefix, &mut ferry)
    .await;
    ferry.wait_drained(20_000, SECS(300)).await;

    let c = ferry.counters();
    report(
        "kill9",
        &format!(
            "20 SIGKILLs: received {} stored {} redeliveries dropped {} skipped on resume {} resent {}",
            c.get("received").unwrap_or(&0),
            c.get("stored").unwrap_or(&0),
            c.get("redeliveries_dropped").unwrap_or(&0),
            c.get("skipped_on_resume").unwrap_or(&0),
            c.get("resent").unwrap_or(&0),
        ),
    );
    let msgs = read_topic(stack, &topic, false, 20_000, SECS(30)).await;
    let t = tally(&msgs, &ids, 200);
    report("kill9", &format!("{t:?}"));
    assert_eq!(t, exact(20_000));
    assert_eq!(
        c.get("stored").copied(),
        Some(20_000),
        "no redelivery was stored twice"
    );
    // Deduplication on: nothing says it is off.
    assert_eq!(ferry.log_count("EXACTLY ONCE IS OFF"), 0);
    assert_eq!(
        ferry.scrape().await[&format!("ferry_uplink_deduplication{{topic=\"{topic}\"}}")],
        1.0
    );
    assert_eq!(
        ferry.status_json()["deduplication_off"],
        serde_json::json!([])
    );
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_off_is_said_in_the_log_status_metrics_and_check() {
    let (stack, _shared) = Stack::shared().await;
    let ns = Namespace::without_deduplication(stack, "dedup-off").await;
    let topic = ns.topic("device-status");
    let prefix = unique("dedup-off");
    let mut ferry = Ferry::new(
        stack,
        "dedup-off",
        &unique("gw"),
        &format!("{prefix}/+/state"),
        &topic,
        "",
    );
    ferry.start_subscribed().await;
    // Each kill comes after ferry had time to get records confirmed.
    let ids = KillNine {
        devices: 20,
        rounds: 100,
        pause: Duration::from_millis(50),
        restart_mqtt_after: None,
        kills: 3,
        up_ms: 800..=1200,
        down_ms: 0..=200,
    }
    .run(stack, &prefix, &mut ferry)
    .await;
    ferry.wait_drained(2_000, SECS(120)).await;
    let msgs = read_topic(stack, &topic, false, 2_000, SECS(20)).await;
    let t = tally(&msgs, &ids, 100);
    let warned = ferry.log_count("EXACTLY ONCE IS OFF");
    let metric = ferry.scrape().await[&format!("ferry_uplink_deduplication{{topic=\"{topic}\"}}")];
    let status = ferry.status_json();
    report(
        "dedup-off",
        &format!(
            "3 SIGKILLs, deduplication off: {t:?}; 'EXACTLY ONCE IS OFF' logged {warned} times, metric {metric}, status deduplication_off {}",
            status["deduplication_off"]
        ),
    );
    assert_eq!(t.lost, 0);
    // Said once by each process after the first whose producer got ready
    // (the first had nothing confirmed yet).
    let log = ferry.log_text();
    let runs: Vec<&str> = log.split("ferry starting").skip(1).collect();
    assert_eq!(runs.len(), 4);
    let ready_later = runs[1..]
        .iter()
        .filter(|r| r.contains("producer ready"))
        .count();
    assert!(ready_later >= 1);
    assert_eq!(warned, ready_later);
    assert_eq!(metric, 0.0);
    assert_eq!(status["deduplication_off"], serde_json::json!([topic]));
    let incidents = status["incidents"].as_array().unwrap();
    let dedup: Vec<_> = incidents
        .iter()
        .filter(|i| i["kind"] == "deduplication-off")
        .collect();
    assert_eq!(dedup.len(), 1, "one incident per topic: {incidents:?}");
    assert!(dedup[0]["detail"]
        .as_str()
        .unwrap()
        .ends_with(&format!("set-deduplication {} --enable", ns.name)));
    let (code, out) = ferry.check_online();
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.contains(&format!("pulsar: FAILED, deduplication is off on {topic}")),
        "{out}"
    );
    assert_eq!(ferry.terminate(), Some(0));
}
