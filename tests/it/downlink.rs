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
        ferry.append_config(&downlink_section(&desired, &acks, &prefix));
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
    let m = ferry.scrape().await;
    assert_eq!(m["ferry_downlink_received_total"], 100.0);
    assert_eq!(m["ferry_downlink_published_total"], 100.0);
    assert_eq!(m["ferry_downlink_applied_total"], 100.0);
    assert_eq!(m["ferry_downlink_stale_total"], 0.0);
    // The gauge follows once a second.
    tokio::time::sleep(SECS(2)).await;
    assert_eq!(ferry.scrape().await["ferry_downlink_pending"], 0.0);
    // `ferry status` says the same, from the store.
    let status = ferry.status_json();
    let d = &status["downlink"];
    report("desired-v1", &format!("ferry status --json: downlink {d}"));
    assert_eq!(d["topic"], desired.as_str());
    assert_eq!(d["caught_up"], true);
    assert_eq!(
        (d["devices"].as_u64(), d["lag"].as_u64()),
        (Some(100), Some(0))
    );
    assert_eq!(
        (d["received"].as_i64(), d["applied"].as_i64()),
        (Some(100), Some(100))
    );
    assert_eq!(
        (d["stale"].as_i64(), d["dead_lettered"].as_i64()),
        (Some(0), Some(0))
    );
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
    // The audit trail names each applied version once, a commit's worth
    // per line.
    let mut audited: Vec<(String, u64)> = ferry
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "desired-applied")
        .flat_map(|e| {
            let pairs = e["applied"].as_array().unwrap().clone();
            assert_eq!(e["count"].as_u64(), Some(pairs.len() as u64));
            pairs
        })
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
        .collect();
    audited.sort();
    assert_eq!(audited, want);
}

/// Every device's versions, as a subscriber saw them, never go down.
fn assert_never_down(seen: &Seen) {
    for (device, msgs) in seen {
        let versions: Vec<u64> = msgs.iter().filter_map(|(p, _)| version_of(p)).collect();
        assert!(
            versions.windows(2).all(|w| w[0] <= w[1]),
            "{device} went back a version: {versions:?}"
        );
    }
}

/// The (device, version) pairs ferry published while `seen` listened (live
/// deliveries: a broker's retained replay at a subscription is not one).
fn published(seen: &Seen) -> std::collections::BTreeSet<(String, u64)> {
    seen.iter()
        .flat_map(|(d, msgs)| {
            msgs.iter()
                .filter(|(_, retained)| !retained)
                .filter_map(move |(p, _)| version_of(p).map(|v| (d.clone(), v)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_compaction_and_a_broker_restart_every_device_ends_on_its_newest_version_never_an_older_one(
) {
    let (stack, _exclusive) = Stack::exclusive().await;
    let Downlink {
        desired,
        acks,
        prefix,
        mut ferry,
        devices,
    } = Downlink::new(stack, "desired-catchup", 100).await;
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    for d in &devices {
        fleet.desire(d, 1, &document(d, 1)).await;
    }
    ferry.start();
    side.wait_last(&devices, SECS(30), |p, _| version_of(p) == Some(1))
        .await;
    assert_eq!(ferry.terminate(), Some(0));
    for v in [2, 3] {
        for d in &devices {
            fleet.desire(d, v, &document(d, v)).await;
        }
    }
    stack.admin_api().compact(&desired).await;
    for d in &devices[..50] {
        fleet.desire(d, 4, &document(d, 4)).await;
    }
    stack.ctl("mqtt-stop");
    stack.ctl("mqtt-start");
    ferry.start();
    let newest = |d: &str| {
        if devices[..50].iter().any(|x| x == d) {
            4
        } else {
            3
        }
    };
    let seen = side
        .wait_versions(&devices, SECS(60), |d: &str| newest(d))
        .await;
    assert_never_down(&seen);
    // A new subscriber finds the newest versions retained.
    let late = DeviceSide::subscribe(stack, &prefix).await;
    let retained = late
        .wait_last(&devices, SECS(20), |p, r| r && version_of(p).is_some())
        .await;
    for d in &devices {
        let (p, _) = retained[d].last().unwrap();
        assert_eq!(version_of(p), Some(newest(d)), "{d} retained");
    }
    late.disconnect().await;
    // Exactly one ack per (device, version) ferry published.
    let pubs = published(&seen);
    let got = read_topic(stack, &acks, false, pubs.len(), SECS(10)).await;
    let acked = acks_of(&got);
    let distinct: std::collections::BTreeSet<(String, u64)> = acked.iter().cloned().collect();
    report(
        "desired-catchup",
        &format!(
            "{} publications seen live, {} acks ({} distinct); version 2 published {} times",
            pubs.len(),
            acked.len(),
            distinct.len(),
            pubs.iter().filter(|(_, v)| *v == 2).count()
        ),
    );
    assert_eq!(acked.len(), distinct.len(), "an ack came twice");
    assert_eq!(distinct, pubs);
    assert!(
        pubs.iter().all(|(_, v)| *v != 2),
        "version 2 was compacted away"
    );
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_crashed_and_lost_its_retained_messages_gets_every_desired_state_again() {
    let (stack, _exclusive) = Stack::exclusive().await;
    let Downlink {
        desired,
        acks,
        prefix,
        mut ferry,
        devices,
    } = Downlink::new(stack, "desired-crash", 100).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    for d in &devices {
        fleet.desire(d, 1, &document(d, 1)).await;
    }
    ferry.start();
    read_topic(stack, &acks, false, 100, SECS(30)).await;
    stack.ctl("mqtt-crash");
    stack.ctl("mqtt-start");
    let back = std::time::Instant::now();
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let seen = side
        .wait_last(&devices, SECS(10), |p, _| version_of(p) == Some(1))
        .await;
    report(
        "desired-crash",
        &format!(
            "all {} devices' desired state back {} ms after the broker restarted",
            seen.len(),
            back.elapsed().as_millis()
        ),
    );
    side.disconnect().await;
    // Published again, acknowledged once.
    let got = read_topic(stack, &acks, false, 100, SECS(5)).await;
    assert_eq!(got.len(), 100);
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_store_catches_up_without_publishing_anything_older() {
    let (stack, _shared) = Stack::shared().await;
    let Downlink {
        desired,
        prefix,
        mut ferry,
        devices,
        ..
    } = Downlink::new(stack, "desired-fresh", 20).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    for v in 1..=3 {
        for d in &devices {
            fleet.desire(d, v, &document(d, v)).await;
        }
    }
    ferry.start();
    let side = DeviceSide::subscribe(stack, &prefix).await;
    side.wait_last(&devices, SECS(30), |p, _| version_of(p) == Some(3))
        .await;
    assert_eq!(ferry.terminate(), Some(0));
    let store = ferry.store_path();
    for ext in ["", "-wal", "-shm", ".horizons"] {
        let _ = std::fs::remove_file(format!("{}{ext}", store.display()));
    }
    for d in &devices[..10] {
        fleet.desire(d, 4, &document(d, 4)).await;
    }
    // What each device had seen before the restart.
    let before: std::collections::BTreeMap<String, usize> = side
        .seen()
        .iter()
        .map(|(d, v)| (d.clone(), v.len()))
        .collect();
    ferry.start();
    let newest = |d: &str| {
        if devices[..10].iter().any(|x| x == d) {
            4
        } else {
            3
        }
    };
    side.wait_versions(&devices, SECS(60), |d: &str| newest(d))
        .await;
    tokio::time::sleep(SECS(2)).await;
    let seen = side.seen();
    assert_never_down(&seen);
    let mut after = 0;
    for (d, msgs) in &seen {
        for (p, _) in &msgs[before[d]..] {
            after += 1;
            let v = version_of(p).unwrap();
            assert!(v >= 3, "{d} was sent version {v} after it had 3");
        }
    }
    report(
        "desired-fresh",
        &format!(
            "{after} publications after the store was deleted, none below what each device had"
        ),
    );
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_desired_state_is_dead_lettered_and_the_updates_behind_it_arrive() {
    let (stack, _shared) = Stack::shared().await;
    let Downlink {
        desired,
        acks,
        prefix,
        mut ferry,
        devices,
    } = Downlink::new(stack, "desired-bad", 3).await;
    ferry.add_settings("store", "max_payload_bytes = 1024");
    let mut fleet = Fleet::connect(stack, &desired).await;
    fleet.send(None, Some("1"), b"no key").await;
    fleet.send(Some("dev-000"), None, b"no version").await;
    fleet
        .send(Some("dev-000"), Some("one"), b"not a number")
        .await;
    fleet
        .send(Some("dev-000"), Some("2"), &vec![b'x'; 2048])
        .await;
    fleet
        .send(Some("a/b"), Some("1"), b"not a topic level")
        .await;
    for d in &devices {
        fleet.desire(d, 5, &document(d, 5)).await;
    }
    ferry.start();
    let got = read_topic(stack, &acks, false, 3, SECS(30)).await;
    assert_eq!(got.len(), 3);
    let side = DeviceSide::subscribe(stack, &prefix).await;
    side.wait_last(&devices, SECS(20), |p, r| r && version_of(p) == Some(5))
        .await;
    side.disconnect().await;
    let letters = ferry.dead_letters();
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    report("desired-bad", &format!("dead letters: {reasons:?}"));
    assert_eq!(letters.len(), 5, "{reasons:?}");
    assert_eq!(reasons[0], "no key (the device id)");
    assert_eq!(reasons[1], "no version property");
    assert!(reasons[2].contains("not a positive 64-bit integer"));
    assert!(reasons[3].contains("exceeds store.max_payload_bytes (1024)"));
    assert!(reasons[4].contains("not a valid MQTT topic level"));
    assert_eq!(ferry.counters().get("desired_dead_lettered"), Some(&5));
    let m = ferry.scrape().await;
    assert_eq!(m["ferry_downlink_dead_lettered_total"], 5.0);
    assert_eq!(m["ferry_downlink_applied_total"], 3.0);
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_nines_during_a_thousand_desired_updates_never_go_back_a_version() {
    use rand::Rng;
    let (stack, _shared) = Stack::shared().await;
    let Downlink {
        desired,
        acks,
        prefix,
        mut ferry,
        devices,
    } = Downlink::new(stack, "desired-kill9", 20).await;
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    // 1,000 updates, the device picked at random, its version rising.
    let plan: Vec<(String, u64)> = {
        let mut rng = rand::thread_rng();
        let mut next = vec![0u64; devices.len()];
        (0..1000)
            .map(|_| {
                let i = rng.gen_range(0..devices.len());
                next[i] += 1;
                (devices[i].clone(), next[i])
            })
            .collect()
    };
    let last: std::collections::BTreeMap<String, u64> = plan.iter().cloned().collect();
    let writes = plan.clone();
    let writer = tokio::spawn(async move {
        for (d, v) in writes {
            fleet.desire(&d, v, &document(&d, v)).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let kills = 20;
    for _ in 0..kills {
        ferry.start();
        let ms = rand::thread_rng().gen_range(150..450);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ferry.kill9();
    }
    writer.await.unwrap();
    ferry.start();
    side.wait_versions(&devices, SECS(60), |d: &str| last[d])
        .await;
    // Anything late (a republication) shows up in this while.
    tokio::time::sleep(SECS(2)).await;
    let seen = side.seen();
    assert_never_down(&seen);
    // The same version again, right after itself: a republish.
    let mut repeats = std::collections::BTreeMap::new();
    for (d, msgs) in &seen {
        let versions: Vec<u64> = msgs.iter().filter_map(|(p, _)| version_of(p)).collect();
        let n = versions.windows(2).filter(|w| w[0] == w[1]).count();
        repeats.insert(d.clone(), n);
    }
    let total: usize = repeats.values().sum();
    let worst = repeats.values().max().copied().unwrap_or(0);
    let got = read_topic(stack, &acks, false, 1, SECS(10)).await;
    let acked = acks_of(&got);
    let distinct: std::collections::BTreeSet<(String, u64)> = acked.iter().cloned().collect();
    report(
        "desired-kill9",
        &format!(
            "{kills} SIGKILLs, 1000 updates: {} publications seen, {total} republications (at most {worst} for one device), {} acks ({} distinct)",
            seen.values().map(Vec::len).sum::<usize>(),
            acked.len(),
            distinct.len()
        ),
    );
    assert!(
        worst <= kills,
        "a device got more republications than there were kills"
    );
    assert_eq!(acked.len(), distinct.len(), "an ack came twice");
    for d in &devices {
        assert!(
            distinct.contains(&(d.clone(), last[d])),
            "{d}'s last version not acked"
        );
    }
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_online_probes_the_desired_topic_with_a_reader() {
    let (stack, _shared) = Stack::shared().await;
    let Downlink { desired, ferry, .. } = Downlink::new(stack, "desired-check", 1).await;
    let (code, out) = ferry.check_online();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("reader accepted on {desired} (the downlink)")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_store_never_sends_a_cleared_device_its_older_version() {
    let (stack, _shared) = Stack::shared().await;
    let Downlink {
        desired,
        prefix,
        mut ferry,
        devices,
        ..
    } = Downlink::new(stack, "desired-tombstone", 5).await;
    let mut fleet = Fleet::connect(stack, &desired).await;
    for d in &devices {
        fleet.desire(d, 1, &document(d, 1)).await;
    }
    // The topic's last message clears dev-004 (an empty payload, which
    // compaction treats as the key's removal).
    fleet.desire(&devices[4], 2, b"").await;
    stack.admin_api().compact(&desired).await;
    let started = std::time::Instant::now();
    ferry.start();
    let side = DeviceSide::subscribe(stack, &prefix).await;
    side.wait_last(&devices[..4], SECS(40), |p, _| version_of(p) == Some(1))
        .await;
    report(
        "desired-tombstone",
        &format!(
            "caught up and published {} ms after the start",
            started.elapsed().as_millis()
        ),
    );
    // dev-004 is never sent its older version 1: nothing, or the clear
    // (Pulsar 4.0.7 delivers the removal's message to a compacted reader
    // at the topic's end, and ferry publishes it as an empty retained
    // message).
    tokio::time::sleep(SECS(2)).await;
    let seen = side.seen();
    let cleared = seen.get(&devices[4]).cloned().unwrap_or_default();
    assert!(
        cleared.iter().all(|(p, _)| p.is_empty()),
        "dev-004 got an older version: {cleared:?}"
    );
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_tokens_expiring_and_rotating_no_desired_update_is_lost_and_nothing_reconnects(
) {
    use std::time::Instant;
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("desired-rotate").await;
    let Granted {
        role,
        prefix,
        mut ferry,
        ..
    } = secure
        .granted_ferry(stack, &ns, "device-status", "desired-rotate", false)
        .await;
    let desired = format!("persistent://{ns}/desired");
    let acks = format!("persistent://{ns}/desired-acks");
    secure.grant_consume(&desired, &role).await;
    secure.grant_produce(&acks, &role).await;
    ferry.append_config(&downlink_section(&desired, &acks, &prefix));
    // Tokens live 12 s; a new one lands on disk every 4 s.
    let token = ferry.token_path();
    write_secret(&token, &secure.token(&role, Some(12)));
    let devices: Vec<String> = (0..5).map(|i| format!("dev-{i:03}")).collect();
    let side = DeviceSide::subscribe(stack, &prefix).await;
    let mut fleet = Fleet::connect_secure(secure, &desired).await;
    ferry.start_ready().await;
    let started = Instant::now();
    let mut rotations = 0;
    let mut next_rotation = Instant::now() + SECS(4);
    let rounds = 30u64;
    for v in 1..=rounds {
        for d in &devices {
            fleet.desire(d, v, &document(d, v)).await;
        }
        tokio::time::sleep(Duration::from_millis(900)).await;
        if Instant::now() >= next_rotation {
            write_secret(&token, &secure.token(&role, Some(12)));
            rotations += 1;
            next_rotation = Instant::now() + SECS(4);
        }
    }
    side.wait_last(&devices, SECS(30), |p, _| version_of(p) == Some(rounds))
        .await;
    let seen = side.seen();
    assert_never_down(&seen);
    let challenges = ferry.log_count("auth challenge answered");
    let reconnects = ferry.log_count("downlink disconnected")
        + ferry.log_count("downlink blocked")
        + ferry.log_count("uplink disconnected")
        + ferry.log_count("uplink blocked");
    let got = read_secure_topic(secure, &acks, 1, SECS(10)).await;
    let acked = acks_of(&got);
    let distinct: std::collections::BTreeSet<(String, u64)> = acked.iter().cloned().collect();
    report(
        "desired-rotate",
        &format!(
            "{:.0} s of desired updates, {rotations} token rotations, {challenges} auth challenges answered, {reconnects} reconnects; {} publications, {} acks ({} distinct)",
            started.elapsed().as_secs_f64(),
            seen.values().map(Vec::len).sum::<usize>(),
            acked.len(),
            distinct.len()
        ),
    );
    assert!(
        challenges >= 2,
        "the broker challenged expiring tokens: {challenges}"
    );
    assert_eq!(reconnects, 0, "expiry never dropped a connection");
    assert_eq!(acked.len(), distinct.len(), "an ack came twice");
    for d in &devices {
        assert!(
            distinct.contains(&(d.clone(), rounds)),
            "{d}'s last version acked"
        );
    }
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reading_another_gateways_desired_topic_is_refused_and_its_own_downlink_works() {
    let (stack, _shared) = Stack::shared().await;
    let secure = tokio::task::block_in_place(Secure::get);
    let ns = secure.namespace("desired-authz").await;
    let Granted {
        role: role_a,
        prefix: prefix_a,
        ferry: mut good,
        ..
    } = secure
        .granted_ferry(stack, &ns, "status-a", "desired-authz-a", false)
        .await;
    let (desired_a, acks_a) = (
        format!("persistent://{ns}/desired-a"),
        format!("persistent://{ns}/acks-a"),
    );
    let desired_b = format!("persistent://{ns}/desired-b");
    secure.grant_consume(&desired_a, &role_a).await;
    secure.grant_produce(&acks_a, &role_a).await;
    secure.grant_consume(&desired_b, &unique("gw-b")).await;
    good.append_config(&downlink_section(&desired_a, &acks_a, &prefix_a));
    // A second ferry with A's token, pointed at B's desired topic.
    let status_bad = format!("persistent://{ns}/status-bad");
    let acks_bad = format!("persistent://{ns}/acks-bad");
    secure.grant_produce(&status_bad, &role_a).await;
    secure.grant_produce(&acks_bad, &role_a).await;
    let prefix_bad = unique("desired-authz-bad");
    let bad = secure.ferry_as(
        stack,
        "desired-authz-bad",
        &role_a,
        &prefix_bad,
        &status_bad,
        false,
    );
    bad.append_config(&downlink_section(&desired_b, &acks_bad, &prefix_bad));
    let mut bad = bad;
    let refusal = format!("not authorized to consume from {desired_b} as role {role_a}");
    let (code, out) = bad.check_online();
    assert_eq!(code, Some(3), "{out}");
    assert!(out.contains(&refusal), "{out}");
    bad.start();
    bad.wait_log(&refusal, SECS(30)).await;
    // A's own downlink works meanwhile.
    let devices: Vec<String> = (0..3).map(|i| format!("dev-{i:03}")).collect();
    let side = DeviceSide::subscribe(stack, &prefix_a).await;
    let mut fleet = Fleet::connect_secure(secure, &desired_a).await;
    for d in &devices {
        fleet.desire(d, 1, &document(d, 1)).await;
    }
    good.start();
    side.wait_last(&devices, SECS(30), |p, _| version_of(p) == Some(1))
        .await;
    assert!(bad.is_running(), "a refusal does not end ferry");
    report("desired-authz", &format!("refused: {refusal}"));
    side.disconnect().await;
    assert_eq!(good.terminate(), Some(0));
    assert_eq!(bad.terminate(), Some(0));
}
