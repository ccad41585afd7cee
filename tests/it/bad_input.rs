//! Bad input gets a clear error, and nothing is lost.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;

#[test]
fn an_invalid_config_lists_every_error_with_its_path_and_exits_2() {
    let dir = test_dir("badconfig");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        r#"
gateway_id = "gw 1"
[mqtt]
port = 70000
[[mqtt.subscriptions]]
filter = "devices/+/state"
device_id_level = 2
[pulsar]
service_url = "http://broker:6650"
topic = "device-status"
[store]
path = ""
"#,
    )
    .unwrap();
    for sub in ["check", "run"] {
        let out = Command::new(ferry_bin())
            .args([sub, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        report(
            "badconfig",
            &format!("ferry {sub} exit {:?}:\n{stderr}", out.status.code()),
        );
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        for line in [
            "gateway_id: must be 1 to 64 characters",
            "mqtt.port: must be between 1 and 65535, found 70000",
            "mqtt.subscriptions[0].device_id_level: level 2 of `devices/+/state` is the fixed word `state`",
            "pulsar.service_url: `http://broker:6650` must start with pulsar://",
            "pulsar.topic: `device-status` must be fully qualified",
            "store.path: must not be empty",
        ] {
            assert!(stderr.contains(line), "missing `{line}` in:\n{stderr}");
        }
        assert!(stderr.contains("6 problems"), "{stderr}");
    }
}

#[test]
fn every_example_config_passes_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(ferry_bin())
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "config/ holds the example configs");
}

#[test]
fn check_warns_about_a_token_readable_by_others_and_never_prints_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = test_dir("tokenperm");
    let token = dir.join("pulsar.token");
    std::fs::write(
        &token,
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJndy0xIn0.c2lnbmF0dXJl",
    )
    .unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.join("ferry.toml");
    let text = std::fs::read_to_string(repo().join("config/ferry.toml"))
        .unwrap()
        .replace(
            "[store]",
            &format!(
                "[pulsar.auth]\ntoken_file = \"{}\"\n\n[store]",
                token.display()
            ),
        );
    std::fs::write(&config, text).unwrap();
    let out = Command::new(ferry_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(all.contains("is readable by others (mode 644)"), "{all}");
    assert!(!all.contains("eyJ"), "the token is never printed: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_is_dead_lettered_and_the_updates_behind_it_flow() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "poison").await;
    ferry.add_settings("store", "max_payload_bytes = 1024");
    ferry.start_subscribed().await;

    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 5).await;
    let poison_topic = devices.topic("dev-0003");
    devices.publish_raw(&poison_topic, vec![b'x'; 5000]).await;
    devices.publish_rounds(5, 10).await;
    ferry.wait_drained(100, Duration::from_secs(60)).await;

    let c = ferry.counters();
    report("poison", &format!("counters: {c:?}"));
    assert_eq!(c.get("dead_lettered").copied(), Some(1));
    assert_eq!(c.get("received").copied(), Some(101));
    let DeadLetter {
        mqtt_topic: topic_dl,
        size,
        reason,
        ..
    } = ferry.dead_letters().remove(0);
    assert_eq!((topic_dl.as_str(), size), (poison_topic.as_str(), 5000));
    assert!(reason.contains("max_payload_bytes"), "{reason}");

    let msgs = read_topic(stack, &topic, false, 100, Duration::from_secs(30)).await;
    let t = tally(&msgs, &devices.ids, 10);
    assert_eq!(t, exact(100));
    assert!(ferry.log_text().contains("message dead-lettered"));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// Dead letters cannot fill the disk: past `store.dead_letters_max` the
/// oldest go, the lifetime counter keeps counting, `ferry status` says how
/// many were pruned, and the updates around them all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_past_their_bound_are_pruned_oldest_first_and_still_counted() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "dl_prune").await;
    ferry.add_settings("store", "max_payload_bytes = 1024\ndead_letters_max = 3");
    ferry.start_subscribed().await;

    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 5).await;
    let poison: Vec<String> = (0..7)
        .map(|i| devices.topic(&format!("dev-{i:04}")))
        .collect();
    for t in &poison {
        devices.publish_raw(t, vec![b'x'; 5000]).await;
    }
    devices.publish_rounds(5, 10).await;
    ferry.wait_drained(100, Duration::from_secs(60)).await;

    let c = ferry.counters();
    report("dl_prune", &format!("counters: {c:?}"));
    assert_eq!(c.get("dead_lettered").copied(), Some(7));
    assert_eq!(c.get("dead_letters_pruned").copied(), Some(4));
    assert_eq!(c.get("dead_letters_pruned_bytes").copied(), Some(4 * 5000));
    let status = ferry.status_json();
    assert_eq!(status["dead_letters"], 3, "{status}");
    assert_eq!(status["dead_letters_pruned"], 4, "{status}");
    // The three kept are the newest, most recent first.
    let recent: Vec<&str> = status["recent_dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["mqtt_topic"].as_str().unwrap())
        .collect();
    assert_eq!(recent, [&poison[6], &poison[5], &poison[4]]);
    assert!(
        ferry.status(false).contains("3 kept, 4 older pruned"),
        "{}",
        ferry.status(false)
    );

    let msgs = read_topic(stack, &topic, false, 100, Duration::from_secs(30)).await;
    assert_eq!(tally(&msgs, &devices.ids, 10), exact(100));
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
