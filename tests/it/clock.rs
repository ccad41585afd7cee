//! A Raspberry Pi has no real-time clock: it may boot at 1970 or at the
//! last shutdown time and jump when NTP syncs. Ages (`max_age_secs`, the
//! oldest record in `ferry status`) must not drop or misreport records
//! because the wall clock jumped. libfaketime moves ferry's wall clock;
//! the monotonic clock is left alone, as on a real gateway.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.exists());
    found.expect("libfaketime (Debian package faketime; tests/setup installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_of_years_neither_drop_nor_misreport_records() {
    let (stack, _shared) = Stack::shared().await;
    let Streams {
        ns,
        prefix,
        mut ferry,
    } = Streams::new(stack, "clock", |ns, prefix| {
        format!(
            r#"[[streams]]
name = "status"
topic = "{}"
max_age_secs = 600
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]
"#,
            ns.topic("device-status")
        )
    })
    .await;
    let topic = ns.topic("device-status");
    ferry.cut_off_pulsar();
    // Booted five years in the past, as a Pi without its clock might.
    let offset = ferry.dir.join("faketime");
    std::fs::write(&offset, "-5y\n").unwrap();
    let lib = libfaketime();
    let env = [
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
        ("FAKETIME_CACHE_DURATION", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ];
    ferry.start_with_env(&env);
    ferry.wait_log("mqtt subscribed", SECS(30)).await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 10).await;
    ferry.wait_stored(100, SECS(60)).await;

    // NTP syncs: the wall clock jumps five years forward while ferry runs.
    std::fs::write(&offset, "+0\n").unwrap();
    tokio::time::sleep(SECS(4)).await;
    let after_jump = ferry.counters();
    let report_json = ferry.status_json();
    let oldest = report_json["oldest_age_seconds"].as_f64().unwrap_or(-1.0);
    assert_eq!(ferry.terminate(), Some(0));

    // Restarted with the clock set years back again (the last shutdown
    // time, or 1970), then forward once more at the next start.
    std::fs::write(&offset, "-10y\n").unwrap();
    ferry.start_with_env(&env);
    tokio::time::sleep(SECS(4)).await;
    assert_eq!(ferry.terminate(), Some(0));
    ferry.restore_pulsar();
    ferry.start();
    ferry.wait_drained(100, SECS(60)).await;
    let counters = ferry.counters();
    let msgs = read_topic(stack, &topic, false, 100, SECS(20)).await;
    let t = tally(&msgs, &devices.ids, 10);
    report(
        "clock",
        &format!(
            "100 stored with the clock 5 years back; after a jump of +5 years while running: {after_jump:?}, ferry status oldest {oldest:.1} s; after restarts at -10 years and the real time: {counters:?}; topic {t:?}"
        ),
    );
    let dropped = |c: &std::collections::BTreeMap<String, i64>| {
        c.iter()
            .filter(|(k, _)| k.contains("dropped"))
            .map(|(_, v)| *v)
            .sum::<i64>()
    };
    assert_eq!(dropped(&after_jump), 0, "{after_jump:?}");
    assert!(
        (0.0..120.0).contains(&oldest),
        "oldest record shown {oldest} s old"
    );
    assert_eq!(dropped(&counters), 0, "{counters:?}");
    assert_eq!(t, exact(100));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
