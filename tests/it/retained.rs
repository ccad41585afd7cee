//! Retained device states (Zigbee2MQTT, Tasmota and Shelly can publish
//! their state retained): the broker sends every one again when ferry
//! subscribes; each must reach Pulsar once, and a state that changed while
//! ferry was away, once.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Publishes one retained state per device (`n` in the payload) and waits
/// for the broker's acks.
async fn publish_retained(stack: &Stack, prefix: &str, devices: &[String], n: u64) {
    let mut opts = MqttOptions::new(unique("retainer"), "127.0.0.1", stack.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    for d in devices {
        let payload = format!("{{\"device\":\"{d}\",\"n\":{n}}}");
        client
            .publish(
                format!("{prefix}/{d}/state"),
                QoS::AtLeastOnce,
                true,
                payload,
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < devices.len() {
        match tokio::time::timeout(SECS(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            other => panic!("retained publisher: {other:?}"),
        }
    }
    client.disconnect().await.unwrap();
    while !matches!(
        tokio::time::timeout(SECS(5), eventloop.poll()).await,
        Ok(Ok(Event::Outgoing(Outgoing::Disconnect))) | Err(_) | Ok(Err(_))
    ) {}
}

/// Clears the retained messages the test left on the shared broker.
async fn clear_retained(stack: &Stack, prefix: &str, devices: &[String]) {
    let mut opts = MqttOptions::new(unique("clearer"), "127.0.0.1", stack.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    for d in devices {
        client
            .publish(
                format!("{prefix}/{d}/state"),
                QoS::AtLeastOnce,
                true,
                Vec::new(),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < devices.len() {
        match tokio::time::timeout(SECS(30), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_states_reach_pulsar_once_across_broker_restarts_and_kills() {
    let (stack, _exclusive) = Stack::exclusive().await;
    let ns = Namespace::create(stack, "retained").await;
    let (status, history) = (ns.topic("device-status"), ns.topic("device-history"));
    let prefix = unique("retained");
    let mut ferry = Ferry::with_streams(
        stack,
        "retained",
        &unique("gw"),
        &format!(
            r#"[[streams]]
name = "status"
topic = "{status}"
history_topic = "{history}"
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]
"#
        ),
    );
    let devices: Vec<String> = (0..20).map(|i| format!("dev-{i:04}")).collect();
    ferry.start();
    ferry.wait_log("mqtt subscribed", SECS(30)).await;
    publish_retained(stack, &prefix, &devices, 0).await;
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
    publish_retained(stack, &prefix, &devices[..5], 1).await;
    ferry.start();
    ferry.wait_drained(25, SECS(60)).await;
    tokio::time::sleep(SECS(2)).await;
    let counters = ferry.counters();
    let hist = read_topic(stack, &history, false, 25, SECS(15)).await;
    let stat = read_topic(stack, &status, false, 25, SECS(15)).await;
    let per_device = |msgs: &[Received]| {
        let mut seen = std::collections::BTreeSet::new();
        let dups = msgs
            .iter()
            .filter(|m| !seen.insert((m.key.clone(), m.n())))
            .count();
        (msgs.len(), dups)
    };
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
    clear_retained(stack, &prefix, &devices).await;
}
