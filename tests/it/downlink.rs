//! Desired state down to the devices: the fleet writes to the gateway's
//! desired topic, ferry publishes each device's newest version retained on
//! the local broker and acknowledges it on the ack topic, exactly once.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A scenario with a downlink: the desired topic, the ack topic and the
/// devices' ids.
struct Downlink {
    desired: String,
    acks: String,
    prefix: String,
    ferry: Ferry,
    devices: Vec<String>,
}

impl Downlink {
    async fn new(stack: &Stack, test: &str, devices: usize) -> Downlink {
        let Scenario {
            topic,
            prefix,
            ferry,
        } = Scenario::new(stack, test).await;
        let desired = topic.replace("device-status", "desired");
        let acks = topic.replace("device-status", "desired-acks");
        ferry.append_config(&format!(
            "[downlink]\ntopic = \"{desired}\"\nack_topic = \"{acks}\"\nmqtt_topic = \"{prefix}/{{device}}/desired\"\n"
        ));
        Downlink {
            desired,
            acks,
            prefix,
            ferry,
            devices: (0..devices).map(|i| format!("dev-{i:03}")).collect(),
        }
    }
}

/// The acks read back: (device, version) of each, in order.
fn acks_of(msgs: &[Received]) -> Vec<(String, u64)> {
    msgs.iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v["device"].as_str(), Some(m.key.as_str()));
            assert!(v["applied_at"].as_u64().is_some());
            (m.key.clone(), v["version"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_devices_get_version_one_retained_and_a_hundred_acks_arrive() {
    let (stack, _shared) = Stack::shared().await;
    let Downlink {
        desired,
        acks,
        prefix,
        mut ferry,
        devices,
    } = Downlink::new(stack, "desired-v1", 100).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    for d in &devices {
        fleet.desire(d, 1, &document(d, 1)).await;
    }
    ferry.start();
    let got = read_topic(stack, &acks, false, 100, SECS(30)).await;
    let mut acked = acks_of(&got);
    acked.sort();
    let want: Vec<(String, u64)> = devices.iter().map(|d| (d.clone(), 1)).collect();
    assert_eq!(acked, want, "one ack per device, version 1");
    // A device that subscribes now gets its desired state, retained.
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let seen = side
        .wait_last(&devices, SECS(20), |p, retained| {
            retained && version_of(p) == Some(1)
        })
        .await;
    let retained: usize = seen
        .values()
        .map(|v| v.iter().filter(|(_, r)| *r).count())
        .sum();
    report(
        "desired-v1",
        &format!(
            "{} acks, {retained} retained messages for {} devices",
            got.len(),
            seen.len()
        ),
    );
    assert_eq!(retained, 100);
    assert_eq!(seen.len(), 100);
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
