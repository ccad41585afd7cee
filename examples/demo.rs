//! The end-to-end demonstration: brokers up, ferry running, simulated
//! devices publishing, and the latest state of every device read back from
//! the compacted Pulsar topic. Run it with `./demo` (see README).

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

    devices.disconnect().await;
    let code = ferry.terminate();
    println!("6. ferry stopped (exit code {code:?}); the stack stays up: tests/stack/stack down stops it");
    let ok = t.lost == 0 && t.duplicated == 0 && t.out_of_order == 0 && latest.len() == DEVICES;
    std::process::exit(if ok { 0 } else { 1 });
}
