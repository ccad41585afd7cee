//! The end-to-end demonstration: brokers up, ferry running as gateway
//! `demo-gateway` on the topics fleet.toml names, simulated devices
//! publishing, the latest state of every device read back from the
//! compacted Pulsar topic, one desired state sent down to a device with
//! `ferry-fleet desire`, and the fleet's view (`ferry-fleet view`, then
//! `ferry-fleet get`). Run it with `./demo` (see README).

#[allow(dead_code)]
#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use harness::*;

const DEVICES: usize = 20;
const UPDATES: u64 = 50;
const GATEWAY: &str = "demo-gateway";

/// `ferry-fleet`: `FERRY_FLEET_BIN`, else beside the `ferry` binary.
fn fleet_bin() -> PathBuf {
    std::env::var_os("FERRY_FLEET_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| ferry_bin().with_file_name("ferry-fleet"))
}

/// Runs `ferry-fleet <args> --config <config>` with `stdin`.
fn fleet(config: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(fleet_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", fleet_bin().display()));
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end().to_string()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("1. broker stack (Pulsar standalone + Mosquitto)");
    let stack = Stack::get();
    let ns = Namespace::create(stack, "demo").await;
    // The fleet's file for this namespace: one gateway, the view in SQLite.
    let dir = test_dir("demo-fleet");
    let fleet_toml = dir.join("fleet.toml");
    let (tenant, name) = ns.name.split_once('/').expect("tenant/namespace");
    std::fs::write(
        &fleet_toml,
        format!(
            "[pulsar]\nservice_url = \"{}\"\nadmin_url = \"http://127.0.0.1:{}\"\n\n\
             [namespace]\ntenant = \"{tenant}\"\nname = \"{name}\"\n\n\
             [[gateways]]\nid = \"{GATEWAY}\"\n\n\
             [view]\ndatabase = \"sqlite:{}\"\n",
            stack.service_url(),
            stack.web_port,
            dir.join("view.db").display()
        ),
    )
    .expect("write fleet.toml");
    // The gateway's topics, named as fleet.toml names them.
    let topic = ns.topic(&format!("{GATEWAY}-status"));
    let desired = ns.topic(&format!("{GATEWAY}-desired"));
    let acks = ns.topic(&format!("{GATEWAY}-desired-acks"));
    println!(
        "   namespace {} (deduplication on), fleet.toml {}",
        ns.name,
        fleet_toml.display()
    );
    println!("   gateway {GATEWAY}: {topic}, {desired}, {acks}");

    println!("2. ferry ({})", ferry_bin().display());
    let prefix = unique("demo");
    let mut ferry = Ferry::new(
        stack,
        "demo",
        GATEWAY,
        &format!("{prefix}/+/state"),
        &topic,
        "",
    );
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
    ns.compact(&format!("{GATEWAY}-status")).await;
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
    println!("6. desired state down: echo '{document}' | ferry-fleet desire {device} --gateway {GATEWAY}");
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let sent = Instant::now();
    let out = fleet(
        &fleet_toml,
        &["desire", &device, "--gateway", GATEWAY],
        document.as_bytes(),
    );
    let desire_ok = out.status.success();
    println!("   {}", text(&out.stdout));
    if !desire_ok {
        println!(
            "   ferry-fleet desire failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
    }
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
    println!("7. ferry stopped (exit code {code:?})");

    println!("8. the fleet's view: ferry-fleet view (a Key_Shared subscription on every gateway's status topic) into SQLite");
    let view_out = dir.join("view.out");
    let mut view = Command::new(fleet_bin())
        .args(["view", "--config"])
        .arg(&fleet_toml)
        .stdout(Stdio::from(
            std::fs::File::create(&view_out).expect("view.out"),
        ))
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("view.log")).expect("view.log"),
        ))
        .spawn()
        .expect("ferry-fleet view");
    // Until every device's row holds its last update (the record numbers of
    // the compacted read above), or a minute.
    let want: std::collections::BTreeMap<String, String> = latest
        .iter()
        .map(|m| {
            let record = m
                .properties
                .get("ferry.record")
                .cloned()
                .unwrap_or_default();
            (m.key.clone(), record)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (caught_up, rows) = loop {
        let out = fleet(&fleet_toml, &["list", "--json"], b"");
        let current: std::collections::BTreeMap<String, String> =
            serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    (
                        r["device"].as_str().unwrap_or("").to_string(),
                        r["record"].to_string(),
                    )
                })
                .collect();
        if current == want || Instant::now() > deadline {
            break (current == want, current.len());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let _ = Command::new("kill")
        .args(["-TERM", &view.id().to_string()])
        .status();
    let stopped = view.wait().expect("view exit");
    let counts = std::fs::read_to_string(&view_out).unwrap_or_default();
    println!(
        "   {rows} devices in the view, each on its last update: {caught_up}; {}",
        counts.trim_end()
    );
    let record = want.get(&device).cloned().unwrap_or_default();
    println!(
        "   $ ferry-fleet get {device} --config {}",
        fleet_toml.display()
    );
    let got = fleet(&fleet_toml, &["get", &device], b"");
    let got_text = text(&got.stdout);
    for line in got_text.lines() {
        println!("   {line}");
    }
    if !got.status.success() {
        println!("   ferry-fleet get failed: {}", text(&got.stderr));
    }
    println!("   the stack stays up: tests/stack/stack down stops it");
    let ok = t.lost == 0
        && t.duplicated == 0
        && t.out_of_order == 0
        && latest.len() == DEVICES
        && desire_ok
        && payload == document.as_bytes()
        && acked.len() == 1
        && caught_up
        && rows == DEVICES
        && stopped.success()
        && got.status.success()
        && got_text.contains(&format!("record       {record}\n"));
    std::process::exit(if ok { 0 } else { 1 });
}
