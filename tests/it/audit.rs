//! The audit trail of a real ferry process: a sequence that keeps rising
//! across restarts, a reload naming the keys that changed, a damaged store,
//! `ferry audit verify` passing on the real files and naming the line one
//! edited byte broke, rotation keeping the chain.

use std::time::Duration;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_rises_across_restarts_names_a_reload_and_a_damaged_store_and_verifies() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "audit").await;
    // Small files: this run rotates through several.
    ferry.append_config("\n[audit]\nmax_file_bytes = 1024\nkeep_files = 100\njournald = false\n");
    let mut devices = Devices::connect(stack, &prefix, 5).await;

    // Start 1: a reload that changes two keys.
    ferry.start_subscribed().await;
    devices.publish_rounds(0, 2).await;
    ferry.wait_drained(10, SECS(60)).await;
    ferry.edit_config("backoff_max_ms = 2000", "backoff_max_ms = 3000");
    ferry.add_settings("store", "commit_max_batch = 500");
    ferry.signal("HUP");
    ferry.wait_log("store limits reloaded", SECS(20)).await;
    assert_eq!(ferry.terminate(), Some(0));

    // Start 2, on a store whose header was overwritten while ferry was
    // stopped: moved aside, one event.
    let path = ferry.store_path();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..64].copy_from_slice(&[0x5a; 64]);
    std::fs::write(&path, bytes).unwrap();
    ferry.start_subscribed().await;
    devices.publish_rounds(2, 4).await;
    // (A fresh store counts from 0.)
    ferry.wait_drained(10, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));

    // Start 3.
    ferry.start_subscribed().await;
    devices.publish_rounds(4, 6).await;
    ferry.wait_drained(20, SECS(60)).await;
    assert_eq!(ferry.terminate(), Some(0));

    let events = ferry.audit_events();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    report("audit", &format!("{} events: {kinds:?}", events.len()));
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert_eq!(ferry.audit_events_of("start").len(), 3);
    let stops = ferry.audit_events_of("stop");
    assert_eq!(stops.len(), 3);
    assert!(stops.iter().all(|s| s["outcome"] == "clean"), "{stops:?}");
    let reloads = ferry.audit_events_of("reload");
    assert_eq!(reloads.len(), 1, "{reloads:?}");
    assert_eq!(
        reloads[0]["changed"],
        serde_json::json!(["store.commit_max_batch", "uplink.backoff_max_ms"])
    );
    assert_ne!(reloads[0]["old_sha256"], reloads[0]["new_sha256"]);
    let damaged: Vec<_> = ferry
        .audit_events_of("store-incident")
        .into_iter()
        .filter(|e| e["kind"] == "store-damaged")
        .collect();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    let files = std::fs::read_dir(ferry.audit_dir()).unwrap().count();
    assert!(files >= 2, "{files} audit files: the trail rotated");

    let (code, out) = ferry.audit(&["verify"]);
    report("audit", &format!("verify: {out}"));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "{} lines in {files} file(s), seq 1 to {}",
            events.len(),
            events.len()
        )),
        "{out}"
    );
    let (code, tail) = ferry.audit(&["tail", "-n", "2"]);
    assert_eq!(code, Some(0));
    assert_eq!(tail.lines().count(), 2);
    assert!(
        tail.lines().last().unwrap().contains("\"event\":\"stop\""),
        "{tail}"
    );

    // One byte edited in the trail's second line (the first file): verify
    // names that file and line.
    let mut names: Vec<_> = std::fs::read_dir(ferry.audit_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let first = &names[0];
    let text = std::fs::read_to_string(first).unwrap();
    let second = text.lines().nth(1).unwrap();
    let at = text.find(second).unwrap() + second.find("\"event\":\"").unwrap() + 9;
    let mut bytes = text.into_bytes();
    bytes[at] ^= 0x20; // a letter's case
    std::fs::write(first, bytes).unwrap();
    let (code, out) = ferry.audit(&["verify"]);
    report("audit", &format!("after an edit: {out}"));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("{}:2: ", first.display())), "{out}");

    let msgs = read_topic(stack, &topic, false, 30, SECS(30)).await;
    assert_eq!(tally(&msgs, &devices.ids, 6), exact(30));
    devices.disconnect().await;
}
