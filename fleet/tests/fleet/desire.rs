//! `ferry-fleet desire` against the real brokers: the fleet writes a
//! device's desired state with the command line, the real agent's downlink
//! (a `Ferry` of the harness) reads the gateway's desired topic as fleet.toml
//! names it and publishes to the device; exact figures.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::fleet_bin;
use crate::harness::{
    document, downlink_section, read_topic, report, test_dir, unique, DeviceSide, Ferry, Namespace,
    Stack,
};

const GATEWAY: &str = "gw-desire";

/// Runs `ferry-fleet desire DEVICE --gateway GW --config fleet.toml` with
/// `stdin`: exit code, stdout, stderr.
fn desire(config: &PathBuf, gateway: &str, device: &str, stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(fleet_bin())
        .args(["desire", device, "--gateway", gateway, "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn desire_twice_reaches_the_device_in_order_once_each_and_again_writes_nothing() {
    let test = "fleet-desire";
    let stack = Stack::get();
    let ns = Namespace::create(stack, test).await;
    let (tenant, name) = ns.name.split_once('/').unwrap();
    let dir = test_dir(test);
    let config = dir.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[pulsar]\nservice_url = \"{}\"\nadmin_url = \"http://127.0.0.1:{}\"\n\n\
             [namespace]\ntenant = \"{tenant}\"\nname = \"{name}\"\n\n\
             [view]\ndatabase = \"sqlite:{}\"\n\n[[gateways]]\nid = \"{GATEWAY}\"\n",
            stack.service_url(),
            stack.web_port,
            dir.join("view.db").display()
        ),
    )
    .unwrap();
    // The gateway's topics as fleet.toml names them.
    let desired = ns.topic(&format!("{GATEWAY}-desired"));
    let acks = ns.topic(&format!("{GATEWAY}-desired-acks"));
    let status = ns.topic(&format!("{GATEWAY}-status"));

    let prefix = unique("desire");
    let mut ferry = Ferry::new(
        stack,
        test,
        GATEWAY,
        &format!("{prefix}/+/state"),
        &status,
        "",
    );
    ferry.append_config(&downlink_section(&desired, &acks, &prefix));
    ferry.start();
    ferry
        .wait_log(
            "downlink reading the desired topic",
            Duration::from_secs(30),
        )
        .await;
    let side = DeviceSide::subscribe(stack, &prefix).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let device = "dev-1".to_string();
    let devices = std::slice::from_ref(&device);
    let mut lines = Vec::new();
    for v in 1..=2 {
        let (code, out, err) = desire(&config, GATEWAY, &device, &document(&device, v));
        assert_eq!(code, 0, "desire v{v}: {err}");
        assert_eq!(
            out.trim(),
            format!("{device}: version {v} written to {desired}")
        );
        lines.push(out.trim().to_string());
        side.wait_versions(devices, Duration::from_secs(30), |_| v)
            .await;
    }
    // The same document again: nothing written.
    let (code, out, err) = desire(&config, GATEWAY, &device, &document(&device, 2));
    assert_eq!(code, 0, "desire again: {err}");
    assert_eq!(
        out.trim(),
        format!(
            "{device}: unchanged, version 2 on {desired} already holds this document; nothing written"
        )
    );
    lines.push(out.trim().to_string());
    // A gateway fleet.toml does not list: exit 2, nothing written.
    let (code, _, err) = desire(&config, "gw-unknown", &device, b"{}");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("gateway gw-unknown is not in fleet.toml"),
        "{err}"
    );
    // A device id the agent would dead-letter: exit 2.
    let (code, _, err) = desire(&config, GATEWAY, "a/b", b"{}");
    assert_eq!(code, 2, "{err}");

    // The topic holds exactly the two versions, from the stable producer.
    let written = read_topic(stack, &desired, false, 2, Duration::from_secs(20)).await;
    let versions: Vec<(&str, &str, u64)> = written
        .iter()
        .map(|m| {
            (
                m.key.as_str(),
                m.properties["version"].as_str(),
                m.sequence_id,
            )
        })
        .collect();
    assert_eq!(versions, [("dev-1", "1", 1), ("dev-1", "2", 2)]);
    // The agent acknowledged each once.
    let acked = read_topic(stack, &acks, false, 2, Duration::from_secs(20)).await;
    let acked: Vec<(String, u64)> = acked
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (
                v["device"].as_str().unwrap().to_string(),
                v["version"].as_u64().unwrap(),
            )
        })
        .collect();
    // The device saw version 1, then 2, once each (3 s after the last
    // write: nothing more came).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen: Vec<Vec<u8>> = side.seen()[&device]
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    side.disconnect().await;
    let code = ferry.terminate();
    report(
        test,
        &format!(
            "{}; desired topic holds {} messages, device saw {} publishes, ack topic {} acks {acked:?}; ferry exit {code:?}",
            lines.join(" | "),
            written.len(),
            seen.len(),
            acked.len()
        ),
    );
    assert_eq!(seen, [document(&device, 1), document(&device, 2)]);
    assert_eq!(acked, [(device.clone(), 1), (device.clone(), 2)]);
}
