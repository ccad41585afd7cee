//! The offline-first store: bounded, never loses the latest state, drains
//! status first, survives a full disk and a damaged file.
//!
//! "Pulsar down" here is ferry pointed at a port nothing listens on (the
//! shared broker keeps serving the other tests); `outage.rs` stops the real
//! broker.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Each device's update numbers, in topic order.
fn by_device(msgs: &[Received]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in msgs {
        out.entry(m.key.clone()).or_default().push(m.n());
    }
    out
}

fn strictly_increasing(v: &[u64]) -> bool {
    v.windows(2).all(|w| w[0] < w[1])
}

/// A stream's counter from `ferry status --json`.
fn shed_count(json: &serde_json::Value, stream: &str, what: &str) -> i64 {
    let s = json["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == stream)
        .unwrap_or_else(|| panic!("no stream {stream} in {json}"));
    if what == "superseded" {
        return s["superseded"].as_i64().unwrap();
    }
    s["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d[0] == what)
        .map_or(0, |d| d[1].as_i64().unwrap())
}

/// What `coalesce` with a history topic must leave of `updates` updates
/// from `devices` devices (round robin) under `max_records`: pending
/// status and history records, superseded and dropped counts. The stream
/// holds two records per update (status and history); over the limit the
/// status records fall to one per device, then the oldest history records go
/// until the stream is at 90% of its limit.
fn model_coalesce(updates: u64, devices: u64, limit: u64) -> (u64, u64, u64, u64) {
    let (mut s, mut h, mut superseded, mut dropped) = (0, 0, 0, 0);
    for i in 0..updates {
        s += 1;
        h += 1;
        if s + h > limit {
            let seen = (i + 1).min(devices);
            superseded += s - seen;
            s = seen;
            if s + h > limit {
                let need = s + h - (limit - limit / 10);
                h -= need;
                dropped += need;
            }
        }
    }
    (s, h, superseded, dropped)
}

/// What `drop-oldest` must leave: the newest records, falling to 90% of
/// the limit whenever it is passed.
fn model_drop_oldest(updates: u64, limit: u64) -> (u64, u64) {
    let (mut pending, mut dropped) = (0, 0);
    for _ in 0..updates {
        pending += 1;
        if pending > limit {
            dropped += pending - (limit - limit / 10);
            pending = limit - limit / 10;
        }
    }
    (pending, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_overflow_while_pulsar_is_down_and_every_latest_state_arrives() {
    const DEVICES: usize = 1000;
    const ROUNDS: u64 = 200;
    const STATES: u64 = DEVICES as u64 * ROUNDS;
    const LIMIT: u64 = 20_000;
    const ALARM_DEVICES: usize = 50;
    const ALARM_ROUNDS: u64 = 200;
    const ALARMS: u64 = ALARM_DEVICES as u64 * ALARM_ROUNDS;
    const ALARM_LIMIT: u64 = 3_000;

    let (stack, _shared) = Stack::shared().await;
    let Streams {
        ns,
        prefix,
        mut ferry,
    } = Streams::new(stack, "overflow", |ns, prefix| {
        let (status, history, alarms) = (
            ns.topic("device-status"),
            ns.topic("device-history"),
            ns.topic("alarms"),
        );
        format!(
            r#"[[streams]]
name = "status"
kind = "state"
topic = "{status}"
history_topic = "{history}"
overflow = "coalesce"
max_records = {LIMIT}
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]

[[streams]]
name = "alarms"
kind = "events"
topic = "{alarms}"
overflow = "drop-oldest"
max_records = {ALARM_LIMIT}
subscriptions = [{{ filter = "{prefix}/+/alarm", device_id_level = 1 }}]
"#
        )
    })
    .await;
    let (status, history, alarms) = (
        ns.topic("device-status"),
        ns.topic("device-history"),
        ns.topic("alarms"),
    );
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;

    // Pulsar unreachable: 200,000 state updates and 10,000 alarms.
    let mut states = Devices::connect(stack, &prefix, DEVICES).await;
    let mut events = Devices::connect_kind(stack, &prefix, ALARM_DEVICES, "alarm").await;
    let began = std::time::Instant::now();
    tokio::join!(
        states.publish_rounds(0, ROUNDS),
        events.publish_rounds(0, ALARM_ROUNDS)
    );
    ferry.wait_stored((STATES + ALARMS) as i64, SECS(600)).await;
    let took = began.elapsed();
    tokio::time::sleep(SECS(6)).await;

    let (s_left, h_left, superseded, h_dropped) = model_coalesce(STATES, DEVICES as u64, LIMIT);
    let (a_left, a_dropped) = model_drop_oldest(ALARMS, ALARM_LIMIT);
    let json = ferry.status_json();
    let table = ferry.status(false);
    let metrics = ferry.scrape().await;
    report(
        "overflow",
        &format!(
            "stored {} updates in {:.1} s with Pulsar unreachable; ferry status:\n{table}",
            STATES + ALARMS,
            took.as_secs_f64()
        ),
    );
    assert_eq!(shed_count(&json, "status", "superseded"), superseded as i64);
    assert_eq!(shed_count(&json, "status", "coalesce"), h_dropped as i64);
    assert_eq!(shed_count(&json, "alarms", "drop-oldest"), a_dropped as i64);
    assert_eq!(json["pending_records"], s_left + h_left + a_left);
    assert_eq!(
        metrics["ferry_store_records_superseded_total{stream=\"status\"}"],
        superseded as f64
    );
    assert_eq!(
        metrics["ferry_store_records_dropped_total{stream=\"alarms\",policy=\"drop-oldest\"}"],
        a_dropped as f64
    );
    assert_eq!(
        metrics["ferry_store_records{stream=\"status\"}"],
        (s_left + h_left) as f64
    );

    // Pulsar back.
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    ferry
        .wait_drained((STATES + ALARMS) as i64, SECS(300))
        .await;

    let got_status = read_topic(stack, &status, false, s_left as usize, SECS(20)).await;
    let got_history = read_topic(stack, &history, false, h_left as usize, SECS(20)).await;
    let got_alarms = read_topic(stack, &alarms, false, a_left as usize, SECS(20)).await;
    ns.compact("device-status").await;
    let compacted = read_topic(stack, &status, true, DEVICES, SECS(20)).await;
    report(
        "overflow",
        &format!(
            "model: status {s_left} kept / {superseded} superseded, history {h_left} kept / {h_dropped} dropped, alarms {a_left} kept / {a_dropped} dropped; \
             topics: status {}, history {}, alarms {}, compacted status {}",
            got_status.len(),
            got_history.len(),
            got_alarms.len(),
            compacted.len()
        ),
    );

    // The compacted view: exactly the last update of every device.
    assert_eq!(compacted.len(), DEVICES);
    let latest = by_device(&compacted);
    assert_eq!(latest.len(), DEVICES);
    assert!(
        latest.values().all(|v| v == &vec![ROUNDS - 1]),
        "every device's last update"
    );

    // The status topic: what was not superseded, in order per device.
    assert_eq!(got_status.len() as u64, s_left);
    let per = by_device(&got_status);
    assert_eq!(per.len(), DEVICES);
    assert!(per
        .values()
        .all(|v| strictly_increasing(v) && *v.last().unwrap() == ROUNDS - 1));

    // The history topic: every update that was kept (the newest ones), in order.
    assert_eq!(got_history.len() as u64, h_left);
    let first_kept = STATES - h_left;
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for g in first_kept..STATES {
        let d = states.ids[(g % DEVICES as u64) as usize].clone();
        expected.entry(d).or_default().push(g / DEVICES as u64);
    }
    assert!(
        by_device(&got_history) == expected,
        "history holds exactly the kept updates, in order"
    );

    // Alarms: the newest ones, in order.
    assert_eq!(got_alarms.len() as u64, a_left);
    let first_alarm = ALARMS - a_left;
    let mut expected: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for g in first_alarm..ALARMS {
        let d = events.ids[(g % ALARM_DEVICES as u64) as usize].clone();
        expected
            .entry(d)
            .or_default()
            .push(g / ALARM_DEVICES as u64);
    }
    assert!(
        by_device(&got_alarms) == expected,
        "alarms hold the newest events, in order"
    );

    // Status first: every status record was sent before any other.
    let last_status = got_status.iter().map(|m| m.publish_time).max().unwrap();
    let first_other = got_history
        .iter()
        .chain(&got_alarms)
        .map(|m| m.publish_time)
        .min()
        .unwrap();
    report(
        "overflow",
        &format!(
            "drain order: last status record sent at +0 ms, first history/alarm record at {:+} ms",
            first_other as i64 - last_status as i64
        ),
    );
    assert!(last_status <= first_other, "status drains first");

    states.disconnect().await;
    events.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_leaves_the_backlog_with_the_mqtt_broker_and_loses_nothing() {
    const LIMIT: usize = 500;
    let (stack, _shared) = Stack::shared().await;
    let Streams {
        ns,
        prefix,
        mut ferry,
    } = Streams::new(stack, "reject", |ns, prefix| {
        format!(
            r#"[[streams]]
name = "status"
topic = "{}"
overflow = "reject"
max_records = {LIMIT}
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]
"#,
            ns.topic("device-status")
        )
    })
    .await;
    let topic = ns.topic("device-status");
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 30).await;
    devices.publish_rounds(0, 100).await;
    ferry.wait_stored(LIMIT as i64, SECS(60)).await;
    ferry
        .wait_log("its overflow policy is reject", SECS(30))
        .await;
    tokio::time::sleep(SECS(6)).await;
    let held = ferry.pending();
    let metrics = ferry.scrape().await;
    let json = ferry.status_json();
    report(
        "reject",
        &format!(
            "3,000 published, Pulsar unreachable: store holds {held}, counters {:?}, rejecting={}, held back in ferry {}",
            ferry.counters(),
            metrics["ferry_store_rejecting{stream=\"status\"}"],
            json["agent"]["parked"]
        ),
    );
    assert_eq!(held, LIMIT as i64, "the store stops at its limit");
    assert_eq!(ferry.counters().get("stored"), Some(&(LIMIT as i64)));
    assert_eq!(metrics["ferry_store_rejecting{stream=\"status\"}"], 1.0);
    assert_eq!(shed_count(&json, "status", "superseded"), 0);

    // Pulsar back: the broker's backlog comes through, all of it, once.
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(3000, SECS(120)).await;
    ferry.wait_log("under its limit again", SECS(30)).await;
    let msgs = read_topic(stack, &topic, false, 3000, SECS(20)).await;
    let t = tally(&msgs, &devices.ids, 100);
    report("reject", &format!("after Pulsar returned: {t:?}"));
    assert_eq!(t, exact(3000));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// A size-limited tmpfs, unmounted on drop.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("mount (tests run as root, as CI does)");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (the disk-full test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_every_latest_state_and_ferry_recovers_when_space_returns() {
    const DEVICES: usize = 200;
    const ROUNDS: u64 = 250;
    let (stack, _shared) = Stack::shared().await;
    let WithHistory {
        ns,
        status,
        history,
        prefix,
        mut ferry,
    } = WithHistory::new(stack, "diskfull").await;
    let disk = SmallDisk::mount(ferry.dir.join("disk"), "48m");
    // Something else on the same file system, to be deleted later.
    let filler = disk.dir.join("other-data");
    std::fs::write(&filler, vec![1u8; 20 << 20]).unwrap();
    let store = disk.dir.join("ferry.db");
    ferry.move_store(&store);
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;

    let mut devices = Devices::connect(stack, &prefix, DEVICES).await;
    devices.pad = 400;
    devices.publish_rounds(0, ROUNDS).await;
    ferry.wait_log("DISK FULL", SECS(120)).await;
    // Wait until ferry has taken in everything it can.
    ferry.wait_stored_settles().await;
    assert!(ferry.is_running(), "ferry keeps running on a full disk");
    let metrics = ferry.scrape().await;
    let full = ferry.counters();
    let table = ferry.status(false);
    report(
        "diskfull",
        &format!(
            "{} updates of ~450 bytes published onto a 48 MiB tmpfs (20 MiB taken by other data): disk_full={} counters {full:?}\n{table}",
            DEVICES as u64 * ROUNDS,
            metrics["ferry_store_disk_full"]
        ),
    );
    assert_eq!(metrics["ferry_store_disk_full"], 1.0);
    assert!(table.contains("INCIDENT"), "{table}");
    assert!(table.contains("disk-full"), "{table}");

    // Space comes back; so does Pulsar.
    std::fs::remove_file(&filler).unwrap();
    ferry.wait_log("disk space is back", SECS(30)).await;
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    let total = DEVICES as u64 * ROUNDS;
    ferry.wait_drained(total as i64, SECS(300)).await;
    let c = ferry.counters();
    let superseded = c.get("stream:status:superseded").copied().unwrap_or(0) as u64;
    let dropped = c
        .get("stream:status:dropped:disk-full")
        .copied()
        .unwrap_or(0) as u64;
    let got_status = read_topic(
        stack,
        &status,
        false,
        (total - superseded) as usize,
        SECS(20),
    )
    .await;
    let got_history =
        read_topic(stack, &history, false, (total - dropped) as usize, SECS(20)).await;
    ns.compact("device-status").await;
    let compacted = read_topic(stack, &status, true, DEVICES, SECS(20)).await;
    report(
        "diskfull",
        &format!(
            "after recovery: stored {total}, superseded {superseded}, history dropped {dropped}; topics: status {}, history {}, compacted {}",
            got_status.len(),
            got_history.len(),
            compacted.len()
        ),
    );
    assert!(superseded > 0 && dropped > 0, "the disk did fill: {c:?}");
    assert_eq!(got_status.len() as u64, total - superseded);
    assert_eq!(got_history.len() as u64, total - dropped);
    let latest = by_device(&compacted);
    assert_eq!(latest.len(), DEVICES);
    assert!(
        latest.values().all(|v| v == &vec![ROUNDS - 1]),
        "{latest:?}"
    );
    for msgs in [&got_status, &got_history] {
        assert!(by_device(msgs).values().all(|v| strictly_increasing(v)));
    }
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_with_a_history_topic_survives_kill_nine() {
    let (stack, _shared) = Stack::shared().await;
    let WithHistory {
        status,
        history,
        prefix,
        mut ferry,
        ..
    } = WithHistory::new(stack, "interval").await;
    ferry.add_settings("store", "durability = \"interval\"\nsync_interval_ms = 500");
    ferry.start_subscribed().await;

    // 50 devices x 100 updates, a round every 0.1 s; 10 SIGKILLs meanwhile.
    let ids = KillNine {
        devices: 50,
        rounds: 100,
        pause: Duration::from_millis(100),
        restart_mqtt_after: None,
        kills: 10,
        up_ms: 600..=600,
        down_ms: 100..=100,
    }
    .run(stack, &prefix, &mut ferry)
    .await;
    ferry.wait_drained(5000, SECS(120)).await;
    let got_status = read_topic(stack, &status, false, 5000, SECS(20)).await;
    let got_history = read_topic(stack, &history, false, 5000, SECS(20)).await;
    let (ts, th) = (
        tally(&got_status, &ids, 100),
        tally(&got_history, &ids, 100),
    );
    report(
        "interval",
        &format!(
            "durability = interval, 10 SIGKILLs: status {ts:?}, history {th:?}, counters {:?}",
            ferry.counters()
        ),
    );
    assert_eq!(ts, exact(5000));
    assert_eq!(th, exact(5000));
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_oversized_message_on_a_full_disk_sheds_only_what_its_dead_letter_needs() {
    let (stack, _shared) = Stack::shared().await;
    let Streams {
        prefix, mut ferry, ..
    } = Streams::new(stack, "bigfull", |ns, prefix| {
        format!(
            r#"[[streams]]
name = "alarms"
kind = "events"
topic = "{}"
subscriptions = [{{ filter = "{prefix}/+/alarm", device_id_level = 1 }}]
"#,
            ns.topic("alarms")
        )
    })
    .await;
    let disk = SmallDisk::mount(ferry.dir.join("disk"), "48m");
    std::fs::write(disk.dir.join("other-data"), vec![1u8; 20 << 20]).unwrap();
    ferry.move_store(&disk.dir.join("ferry.db"));
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;

    // Events until the disk is full.
    let mut devices = Devices::connect_kind(stack, &prefix, 100, "alarm").await;
    devices.pad = 4000;
    devices.publish_rounds(0, 80).await;
    ferry.wait_log("DISK FULL", SECS(120)).await;
    ferry.wait_stored_settles().await;
    let before = ferry.pending();
    let reconnects_before = ferry.scrape().await["ferry_mqtt_reconnects_total"];

    // One 60 MiB message, then 20 small ones.
    let mut big = Publisher::connect(stack).await;
    big.publish(
        &format!("{prefix}/dev-big/alarm"),
        rumqttc::QoS::AtLeastOnce,
        vec![b'x'; 60 << 20],
    )
    .await;
    big.wait_acked(1).await;
    big.disconnect().await;
    // Counted before the small ones go out: ferry may store some of them
    // before a count taken after publishing (a fresh run saw all 20 stored,
    // 8,020 in all, and still waited for 20 more).
    let stored = ferry.counters().get("stored").copied().unwrap_or(0);
    for i in 0..20 {
        devices
            .publish_raw(
                &devices.topic("dev-0000"),
                format!("{{\"n\":{}}}", 1000 + i).into_bytes(),
            )
            .await;
    }
    let deadline = std::time::Instant::now() + SECS(60);
    while ferry.counters().get("stored").copied().unwrap_or(0) < stored + 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the 20 small messages were not stored: {:?}",
            ferry.counters()
        );
        tokio::time::sleep(SECS(1)).await;
    }
    let after = ferry.pending();
    let counters = ferry.counters();
    let reconnects = ferry.scrape().await["ferry_mqtt_reconnects_total"] - reconnects_before;
    let dead = ferry
        .dead_letters()
        .pop()
        .map(|d| (d.size, d.reason))
        .expect("a dead letter");
    report(
        "bigfull",
        &format!(
            "full disk: {before} events pending; after a 60 MiB message and 20 small ones: {after} pending, dead letter {dead:?}, mqtt reconnects {reconnects}, counters {counters:?}"
        ),
    );
    assert_eq!(dead.0, 60 << 20, "the dead letter records the real size");
    assert!(
        after + 200 >= before,
        "only room for the dead letter is made: {before} pending before, {after} after"
    );
    assert_eq!(reconnects, 0.0, "no mqtt reconnect");
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// Waits until the store holds no record for `topic` and has stored
/// `stored` records in its life; returns how long that took.
async fn wait_topic_sent(ferry: &Ferry, topic: &str, stored: i64, limit: Duration) -> Duration {
    let began = std::time::Instant::now();
    loop {
        let left: Option<i64> = ferry.store_path().exists().then(|| {
            ferry
                .open_store()
                .query_row(
                    "SELECT COUNT(*) FROM outbox WHERE (key >> 48) =
                         (SELECT id FROM destinations WHERE topic = ?1)",
                    [topic],
                    |r| r.get(0),
                )
                .unwrap_or(-1)
        });
        let done = ferry.counters().get("stored").copied().unwrap_or(0);
        if left == Some(0) && done >= stored {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < limit,
            "{topic}: {left:?} records left, {done} stored of {stored}; log tail:\n{}",
            tail(&ferry.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 14: a `reject` stream at its limit holds its messages back in an
/// MQTT session of its own, so the gateway's other streams go on. The
/// alarms stream's topic is in a namespace that does not exist yet: its
/// records cannot leave, so it reaches its limit and stays there while the
/// status stream carries 10,000 updates; then the namespace is made and
/// the alarms held by the MQTT broker come through, all of them, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_stream_at_its_limit_never_stalls_the_other_streams() {
    const LIMIT: usize = 100;
    const ALARM_DEVICES: usize = 10;
    const ALARM_ROUNDS: u64 = 60;
    const ALARMS: usize = ALARM_DEVICES * ALARM_ROUNDS as usize;
    const DEVICES: usize = 100;
    const ROUNDS: u64 = 100;
    const UPDATES: usize = DEVICES * ROUNDS as usize;
    const ALL: usize = 2 * UPDATES;
    let (stack, _shared) = Stack::shared().await;
    let later = format!("public/{}", unique("reject-later"));
    let alarms_topic = format!("persistent://{later}/alarms");
    let Streams {
        ns,
        prefix,
        mut ferry,
    } = Streams::new(stack, "reject-apart", |ns, prefix| {
        format!(
            r#"[[streams]]
name = "status"
topic = "{}"
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]

[[streams]]
name = "alarms"
kind = "events"
topic = "{alarms_topic}"
overflow = "reject"
max_records = {LIMIT}
subscriptions = [{{ filter = "{prefix}/+/alarm", device_id_level = 1 }}]
"#,
            ns.topic("device-status")
        )
    })
    .await;
    let status_topic = ns.topic("device-status");
    ferry.start_ready().await;
    // Both sessions subscribed (the alarms' is `<client id>-alarms`).
    ferry.wait_log_count("mqtt subscribed", 2, SECS(30)).await;
    assert!(ferry.log_text().contains("-alarms session_present=false"));
    let mut states = Devices::connect(stack, &prefix, DEVICES).await;
    let mut alarms = Devices::connect_kind(stack, &prefix, ALARM_DEVICES, "alarm").await;

    // The same 10,000 updates twice: first with the alarms stream under its
    // limit, then with it held at its limit.
    let began = std::time::Instant::now();
    states.publish_rounds(0, ROUNDS).await;
    let free = wait_topic_sent(&ferry, &status_topic, UPDATES as i64, SECS(120)).await;
    let free = began.elapsed().max(free);

    alarms.publish_rounds(0, ALARM_ROUNDS).await;
    ferry
        .wait_log("its overflow policy is reject", SECS(30))
        .await;
    ferry.wait_stored((UPDATES + LIMIT) as i64, SECS(30)).await;
    let began = std::time::Instant::now();
    states.publish_rounds(ROUNDS, 2 * ROUNDS).await;
    let held_run = wait_topic_sent(&ferry, &status_topic, (ALL + LIMIT) as i64, SECS(120)).await;
    let held_run = began.elapsed().max(held_run);
    let metrics = ferry.scrape().await;
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let (free_rate, held_rate) = (rate(UPDATES, free), rate(UPDATES, held_run));
    report(
        "reject-apart",
        &format!(
            "status: {} updates at {free_rate:.0}/s with alarms under its limit, {} at {held_rate:.0}/s with alarms held at its limit ({:.0}%); alarms stored {}, rejecting={}",
            UPDATES,
            UPDATES,
            100.0 * held_rate / free_rate,
            ferry.counters().get("stored").copied().unwrap_or(0) - ALL as i64,
            metrics["ferry_store_rejecting{stream=\"alarms\"}"],
        ),
    );
    assert_eq!(
        metrics["ferry_store_rejecting{stream=\"alarms\"}"], 1.0,
        "the alarms stream was held at its limit throughout"
    );
    assert_eq!(
        ferry.counters().get("stored").copied(),
        Some((ALL + LIMIT) as i64),
        "every status update and exactly the alarms under the limit were stored"
    );
    let msgs = read_topic(stack, &status_topic, false, ALL, SECS(20)).await;
    assert_eq!(tally(&msgs, &states.ids, 2 * ROUNDS), exact(ALL));

    // The alarms' namespace appears: the backlog the MQTT broker kept comes
    // through, in order, once.
    stack.admin_api().create_namespace(&later).await;
    ferry.wait_drained((ALL + ALARMS) as i64, SECS(180)).await;
    let msgs = read_topic(stack, &alarms_topic, false, ALARMS, SECS(20)).await;
    let t = tally(&msgs, &alarms.ids, ALARM_ROUNDS);
    report(
        "reject-apart",
        &format!("alarms after their namespace appeared: {t:?}"),
    );
    assert_eq!(t, exact(ALARMS));
    states.disconnect().await;
    alarms.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// A stream that becomes `reject` moves to an MQTT session of its own: what
/// the broker queued for it in the main session while ferry was stopped
/// still arrives, the main session then gives its filter back, and every
/// alarm is in the topic once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_becomes_reject_moves_to_its_own_session_losing_nothing() {
    const DEVICES: usize = 10;
    const ROUNDS: u64 = 10;
    let (stack, _shared) = Stack::shared().await;
    let Streams {
        ns,
        prefix,
        mut ferry,
    } = Streams::new(stack, "reject-moves", |ns, prefix| {
        format!(
            r#"[[streams]]
name = "status"
topic = "{}"
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]

[[streams]]
name = "alarms"
kind = "events"
topic = "{}"
overflow = "drop-oldest"
max_records = 100000
subscriptions = [{{ filter = "{prefix}/+/alarm", device_id_level = 1 }}]
"#,
            ns.topic("device-status"),
            ns.topic("alarms")
        )
    })
    .await;
    let topic = ns.topic("alarms");
    ferry.start_subscribed().await;
    assert_eq!(ferry.terminate(), Some(0));
    // Ferry is stopped: the broker queues these in the main session.
    let mut alarms = Devices::connect_kind(stack, &prefix, DEVICES, "alarm").await;
    alarms.publish_rounds(0, ROUNDS).await;
    ferry.edit_config(r#"overflow = "drop-oldest""#, r#"overflow = "reject""#);
    ferry.start();
    ferry
        .wait_log("no longer subscribed in this one", SECS(60))
        .await;
    alarms.publish_rounds(ROUNDS, 2 * ROUNDS).await;
    let all = DEVICES * 2 * ROUNDS as usize;
    ferry.wait_drained(all as i64, SECS(60)).await;
    let msgs = read_topic(stack, &topic, false, all, SECS(10)).await;
    let t = tally(&msgs, &alarms.ids, 2 * ROUNDS);
    report(
        "reject-moves",
        &format!("{all} alarms, half queued in the main session before the move: {t:?}"),
    );
    assert_eq!(t, exact(all));
    assert!(ferry.log_text().contains("-alarms session_present=false"));
    alarms.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
