//! The end-to-end demonstration: brokers up, ferry running, simulated
//! devices publishing, the latest state of every device read back from the
//! compacted Pulsar topic, and one desired state sent down to a device.
//! Run it with `./demo` (see README).

#[allow(dead_code)]
#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::*;

const DEVICES: usize = 20;
const UPDATES: u64 = 50;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("1. broker stack (Pulsar standalone + Mosquitto)");
    let stack = Stack::get();
    let ns = Namespace::create(stack, "demo").await;
    let topic = ns.topic("device-status");
    println!("   topic {topic} (deduplication on)");

    println!("2. ferry ({})", ferry_bin().display());
    let prefix = unique("demo");
    let gateway = "demo-gateway";
    let mut ferry = Ferry::new(
        stack,
        "demo",
        gateway,
        &format!("{prefix}/+/state"),
        &topic,
        "",
    );
    let desired = ns.topic("desired");
    let acks = ns.topic("desired-acks");
    ferry.append_config(&downlink_section(&desired, &acks, &prefix));
    ferry.start();
    ferry
        .wait_log("mqtt subscribed", Duration::from_secs(30))
        .await;
    println!("   config {}", ferry.config.display());
    println!("   log    {}", ferry.log.display());

    let total = DEVICES as u64 * UPDATES;
    println!("3. {DEVICES} simulated devices publish {UPDATES} updates each over MQTT ({prefix}/<device>/state)");
    let started = Instant::now();
    let mut devices = Devices::connect(stack, &prefix, DEVICES).await;
    devices.publish_rounds(0, UPDATES).await;
    ferry
        .wait_drained(total as i64, Duration::from_secs(120))
        .await;
    println!(
        "   all {total} updates confirmed by Pulsar in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let all = read_topic(
        stack,
        &topic,
        false,
        total as usize,
        Duration::from_secs(20),
    )
    .await;
    let t = tally(&all, &devices.ids, UPDATES);
    println!(
        "4. the topic holds {} messages: lost {}, duplicated {}, out of order {}",
        t.received, t.lost, t.duplicated, t.out_of_order
    );

    println!("5. compaction (admin REST), then a compacted read: the latest state per device");
    ns.compact("device-status").await;
    let mut latest = read_topic(stack, &topic, true, DEVICES, Duration::from_secs(20)).await;
    latest.sort_by(|a, b| a.key.cmp(&b.key));
    println!();
    println!(
        "   {:<10} {:>8} {:>8}  payload",
        "device", "update", "record"
    );
    for m in &latest {
        println!(
            "   {:<10} {:>8} {:>8}  {}",
            m.key,
            m.n(),
            m.properties
                .get("ferry.record")
                .map(String::as_str)
                .unwrap_or("?"),
            String::from_utf8_lossy(&m.payload)
        );
    }
    println!();
    println!(
        "   {} devices, {} messages in the compacted view",
        latest.len(),
        latest.len()
    );

    let device = devices.ids[0].clone();
    let document = format!(r#"{{"device":"{device}","v":1,"report_every_s":30}}"#);
    println!("6. desired state down: the fleet writes version 1 for {device} to {desired}");
    println!("   (key = device id, property version = 1, payload {document})");
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    let sent = Instant::now();
    fleet.desire(&device, 1, document.as_bytes()).await;
    let seen = side
        .wait_last(
            std::slice::from_ref(&device),
            Duration::from_secs(30),
            |p, _| version_of(p) == Some(1),
        )
        .await;
    let (payload, _) = seen[&device].last().cloned().expect("seen");
    println!(
        "   {prefix}/{device}/desired received by the subscribed device after {} ms: {}",
        sent.elapsed().as_millis(),
        String::from_utf8_lossy(&payload)
    );
    // Published retained: a device that subscribes later gets it too.
    let later = DeviceSide::subscribe(stack, &prefix).await;
    let seen = later
        .wait_last(
            std::slice::from_ref(&device),
            Duration::from_secs(30),
            |p, retained| retained && p == payload.as_slice(),
        )
        .await;
    println!(
        "   a device subscribing afterwards gets it from the broker, retained ({} message)",
        seen[&device].len()
    );
    later.disconnect().await;
    let acked = read_topic(stack, &acks, false, 1, Duration::from_secs(20)).await;
    for a in &acked {
        println!(
            "   acknowledged on {acks}: {}",
            String::from_utf8_lossy(&a.payload)
        );
    }
    side.disconnect().await;

    devices.disconnect().await;
    let code = ferry.terminate();
    println!("7. ferry stopped (exit code {code:?}); the stack stays up: tests/stack/stack down stops it");
    let ok = t.lost == 0
        && t.duplicated == 0
        && t.out_of_order == 0
        && latest.len() == DEVICES
        && payload == document.as_bytes()
        && acked.len() == 1;
    std::process::exit(if ok { 0 } else { 1 });
}
