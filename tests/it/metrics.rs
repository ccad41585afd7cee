//! The Prometheus endpoint, scraped during a real stream.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_during_a_stream_count_exactly_what_happened() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "metrics").await;
    ferry.add_settings("store", "max_payload_bytes = 1024");
    ferry.start_ready().await;
    let label = format!("{{topic=\"{topic}\"}}");

    let mut devices = Devices::connect(stack, &prefix, 20).await;
    let mut during = Vec::new();
    for chunk in 0..10u64 {
        devices.publish_rounds(chunk * 10, chunk * 10 + 10).await;
        let m = ferry.scrape().await;
        during.push(m["ferry_mqtt_messages_received_total"]);
    }
    let big = devices.topic("dev-0003");
    devices.publish_raw(&big, vec![b'x'; 3000]).await;
    ferry.wait_drained(2000, SECS(60)).await;
    tokio::time::sleep(SECS(2)).await;
    let m = ferry.scrape().await;
    report(
        "metrics",
        &format!("received_total while streaming: {during:?}"),
    );
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    report(
        "metrics",
        &format!(
            "after the stream: received {} stored {} dead letters {} sent {} acknowledged {} store records {} connected {}",
            get("ferry_mqtt_messages_received_total"),
            get("ferry_store_records_stored_total"),
            get("ferry_store_dead_letters_total"),
            get(&format!("ferry_uplink_records_sent_total{label}")),
            get(&format!("ferry_uplink_records_acknowledged_total{label}")),
            get("ferry_store_records{stream=\"status\"}"),
            get(&format!("ferry_uplink_connected{label}")),
        ),
    );
    assert!(
        during.windows(2).all(|w| w[0] <= w[1]),
        "counters only grow: {during:?}"
    );
    assert!(during[0] >= 1.0 && during[9] <= 2000.0);
    assert_eq!(get("ferry_mqtt_messages_received_total"), 2001.0);
    assert_eq!(get("ferry_store_records_stored_total"), 2000.0);
    assert_eq!(get("ferry_store_dead_letters_total"), 1.0);
    assert_eq!(
        get(&format!("ferry_uplink_records_sent_total{label}")),
        2000.0
    );
    assert_eq!(
        get(&format!("ferry_uplink_records_acknowledged_total{label}")),
        2000.0
    );
    assert_eq!(
        get(&format!("ferry_uplink_send_latency_seconds_count{label}")),
        2000.0
    );
    assert_eq!(get("ferry_store_records{stream=\"status\"}"), 0.0);
    assert_eq!(get("ferry_store_bytes{stream=\"status\"}"), 0.0);
    assert_eq!(
        get("ferry_store_records_superseded_total{stream=\"status\"}"),
        0.0
    );
    assert_eq!(
        get("ferry_store_records_dropped_total{stream=\"status\",policy=\"coalesce\"}"),
        0.0
    );
    assert_eq!(get("ferry_mqtt_connected"), 1.0);
    assert_eq!(get(&format!("ferry_uplink_connected{label}")), 1.0);
    assert!(get("ferry_store_commit_duration_seconds_count") >= 1.0);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
