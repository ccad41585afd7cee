//! Life under systemd: sd_notify messages through a test NOTIFY_SOCKET, a
//! watchdog that stops being fed when a loop hangs, a draining SIGTERM, and
//! reload.

use std::time::{Duration, Instant};

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_and_stopping_reach_systemd() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario { mut ferry, .. } = Scenario::new(stack, "notify").await;
    let sock = NotifySocket::new(&ferry.dir);
    let path = sock.env_value();
    let started = Instant::now();
    ferry.start_with_env(&[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1500000")]);
    sock.wait_for("READY=1", SECS(20)).await;
    tokio::time::sleep(SECS(5)).await;
    let watchdogs = sock.count("WATCHDOG=1", started, Instant::now());
    ferry.signal("TERM");
    sock.wait_for("STOPPING=1", SECS(20)).await;
    assert_eq!(ferry.terminate(), Some(0));
    report(
        "notify",
        &format!("READY=1, then {watchdogs} WATCHDOG=1 in 5 s at WatchdogSec=1.5, then STOPPING=1"),
    );
    assert!(watchdogs >= 8, "fed every 0.5 s: {watchdogs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ferry_whose_store_loop_hangs_stops_feeding_the_watchdog() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario { mut ferry, .. } = Scenario::new(stack, "hang").await;
    let sock = NotifySocket::new(&ferry.dir);
    let path = sock.env_value();
    let started = Instant::now();
    // The store thread blocks 2 s after start; a loop is declared hung after
    // 3 s of silence.
    ferry.start_with_env(&[
        ("NOTIFY_SOCKET", &path),
        ("WATCHDOG_USEC", "1500000"),
        ("FERRY_DEBUG_HANG", "store"),
    ]);
    sock.wait_for("READY=1", SECS(20)).await;
    tokio::time::sleep(SECS(10)).await;
    let before = sock.count("WATCHDOG=1", started, started + SECS(2));
    let after = sock.count("WATCHDOG=1", started + SECS(6), started + SECS(10));
    report(
        "hang",
        &format!(
            "WATCHDOG=1 in the first 2 s: {before}; from 6 s to 10 s (store hung at 2 s): {after}"
        ),
    );
    assert!(before >= 2, "fed while alive: {before}");
    assert_eq!(after, 0, "not fed once the store loop hung");
    assert!(
        ferry.log_text().contains("stalled=\"store\"")
            || ferry.log_text().contains("stalled=store")
    );
    ferry.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_drains_and_loses_nothing() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "sigterm").await;
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 50).await;
    let mut stops = 0;
    for chunk in 0..10u64 {
        devices.publish_rounds(chunk * 10, chunk * 10 + 10).await;
        if chunk % 3 == 1 {
            assert_eq!(ferry.terminate(), Some(0), "a SIGTERM ends ferry cleanly");
            stops += 1;
            ferry.start();
            // SIGTERM before ferry installed its handler would be the
            // default action, not a drain: wait until it runs again.
            ferry
                .wait_log_count("mqtt subscribed", stops + 1, SECS(30))
                .await;
        }
    }
    ferry.wait_drained(5000, SECS(120)).await;
    let drained = ferry.log_count("uplink stopped");
    let msgs = read_topic(stack, &topic, false, 5000, SECS(30)).await;
    let t = tally(&msgs, &devices.ids, 100);
    report(
        "sigterm",
        &format!("{stops} SIGTERMs mid-stream ({drained} drains logged): {t:?}"),
    );
    assert_eq!(t, exact(5000));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_limits_at_once_and_names_what_needs_a_restart() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic: _,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "reload").await;
    ferry.add_settings("store", "max_payload_bytes = 1024");
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 1).await;
    let big = devices.topic("dev-0000");
    devices.publish_raw(&big, vec![b'x'; 2000]).await;
    ferry.wait_log("message dead-lettered", SECS(20)).await;

    ferry.edit_config("max_payload_bytes = 1024", "max_payload_bytes = 4096");
    ferry.edit_config("backoff_max_ms = 2000", "backoff_max_ms = 3000");
    ferry.signal("HUP");
    ferry.wait_log("store limits reloaded", SECS(20)).await;
    ferry
        .wait_log("these changes take effect after a restart", SECS(20))
        .await;
    devices.publish_raw(&big, vec![b'y'; 2000]).await;
    ferry.wait_drained(1, SECS(30)).await;
    let c = ferry.counters();
    report("reload", &format!("after SIGHUP: {c:?}"));
    assert_eq!(c.get("dead_lettered").copied(), Some(1));
    assert_eq!(c.get("delivered").copied(), Some(1));
    assert!(
        ferry.log_text().contains("settings=[\"uplink\"]"),
        "{}",
        ferry.log_text()
    );
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

#[test]
fn init_writes_a_config_that_passes_check() {
    let dir = test_dir("init");
    let path = dir.join("gw.toml");
    let out = std::process::Command::new(ferry_bin())
        .args(["init", "--gateway-id", "pi-garage-7", "--output"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = std::process::Command::new(ferry_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && stdout.contains("gateway pi-garage-7"),
        "{stdout}"
    );
    let again = std::process::Command::new(ferry_bin())
        .args(["init", "--gateway-id", "x", "--output"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!again.status.success(), "init never overwrites a config");
}
