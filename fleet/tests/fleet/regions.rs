//! `ferry-fleet provision` with two clusters (`[[pulsar.clusters]]`, the
//! stack's east and west regions): the fleet is declared in each, every
//! namespace replicates nowhere (ferry writes to every cluster itself), and
//! `--cluster` picks one.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

use crate::fleet_bin;
use crate::harness::*;

/// `GET /admin/v2/<path>` on a region: status and JSON body.
async fn get(region: &Region, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!(
        "http://127.0.0.1:{}/admin/v2/{path}",
        region.web_port
    ))
    .await
    .expect("admin api");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// A fleet.toml naming both regions, for its own tenant and one gateway.
fn fleet_toml(geo: &Geo, tenant: &str, gateway: &str) -> PathBuf {
    let dir = test_dir("fleet-regions");
    let mut text = String::new();
    for r in [&geo.east, &geo.west] {
        text.push_str(&format!(
            "[[pulsar.clusters]]\nname = \"{}\"\nservice_url = \"{}\"\nadmin_url = \"http://127.0.0.1:{}\"\n\n",
            r.name,
            r.service_url(),
            r.web_port
        ));
    }
    text.push_str(&format!(
        "[namespace]\ntenant = \"{tenant}\"\nname = \"fleet\"\n\n[[gateways]]\nid = \"{gateway}\"\n"
    ));
    let path = dir.join("fleet.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn fleet(config: &PathBuf, args: &[&str]) -> Output {
    Command::new(fleet_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run ferry-fleet")
}

fn lines(out: &Output) -> Vec<String> {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_declares_the_fleet_in_every_cluster_and_each_namespace_stays_local() {
    let (geo, _exclusive) = Geo::exclusive().await;
    let tenant = unique("regions");
    let gateway = "gw-r1";
    let config = fleet_toml(geo, &tenant, gateway);
    let ns = format!("{tenant}/fleet");

    let first = lines(&fleet(&config, &["provision"]));
    let west_at = first
        .iter()
        .position(|l| l == "cluster west:")
        .unwrap_or_else(|| panic!("{first:#?}"));
    assert_eq!(first[0], "cluster east:");
    // Each cluster: tenant, namespace, 5 policies, 5 topics and 5 grants.
    let (east, west) = first.split_at(west_at);
    for part in [east, west] {
        assert_eq!(
            part[1],
            format!("create tenant {tenant} (allowed clusters: east, west)")
        );
        assert_eq!(part[2], format!("create namespace {ns}"));
        assert_eq!(part.last().unwrap(), "17 changes", "{part:#?}");
    }
    report(
        "fleet-regions",
        &format!(
            "first run: {} lines, 17 changes in each cluster",
            first.len()
        ),
    );

    for region in [&geo.east, &geo.west] {
        let (_, t) = get(region, &format!("tenants/{tenant}")).await;
        assert_eq!(
            t["allowedClusters"],
            json!(["east", "west"]),
            "{}",
            region.name
        );
        let (status, repl) = get(region, &format!("namespaces/{ns}/replication")).await;
        assert_eq!(status, 200, "{repl}");
        assert_eq!(
            repl,
            json!([region.name]),
            "{} replicates nowhere",
            region.name
        );
        let (_, p) = get(region, &format!("namespaces/{ns}")).await;
        assert_eq!(p["deduplicationEnabled"], true, "{}: {p}", region.name);
        let (_, topics) = get(region, &format!("persistent/{ns}")).await;
        let mut topics: Vec<String> = serde_json::from_value(topics).unwrap();
        topics.sort();
        let want: Vec<String> = ["desired", "desired-acks", "events", "history", "status"]
            .iter()
            .map(|s| format!("persistent://{ns}/{gateway}-{s}"))
            .collect();
        assert_eq!(topics, want, "{}", region.name);
    }

    // Nothing left to do anywhere; `--cluster` picks one.
    assert_eq!(
        lines(&fleet(&config, &["provision"])),
        ["cluster east:", "0 changes", "cluster west:", "0 changes"]
    );
    assert_eq!(
        lines(&fleet(
            &config,
            &["--cluster", "west", "provision", "--dry-run"]
        )),
        ["cluster west:", "0 changes (dry run: nothing applied)"]
    );
    // `refill` names two clusters of the file, not the same one twice.
    for (args, says) in [
        (
            ["--from", "north", "--to", "east"],
            "--from north: fleet.toml names no such cluster",
        ),
        (
            ["--from", "west", "--to", "west"],
            "--from and --to name the same cluster (west)",
        ),
    ] {
        let out = fleet(&config, &[&["refill"][..], &args[..]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    let none = fleet(&config, &["--cluster", "north", "provision"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("its clusters: east, west"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
}

/// What waits in ferry's store for `cluster` (`ferry status --json`).
fn waiting_for(ferry: &Ferry, cluster: &str) -> u64 {
    let json = ferry.status_json();
    json["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("no cluster {cluster} in {json}"))["records"]
        .as_u64()
        .unwrap()
}

/// A region lost for good: east's data deleted after it confirmed a third
/// of the stream (50 devices × 200 updates). West still holds all 10,000;
/// ferry holds east's records (east names none of those it confirmed)
/// until `ferry-fleet refill` copied west's into the fresh east; then east
/// holds all 10,000 too, each once, in order per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_lost_for_good_is_refilled_from_the_other_and_holds_every_update_once() {
    const DEVICES: usize = 50;
    const ROUNDS: u64 = 200;
    const ALL: usize = DEVICES * ROUNDS as usize;
    let (stack, _shared) = Stack::shared().await;
    let (geo, _regions) = Geo::exclusive().await;
    let tenant = unique("refill");
    let gateway = unique("gw");
    let config = fleet_toml(geo, &tenant, &gateway);
    lines(&fleet(&config, &["provision"]));
    let topic = format!("persistent://{tenant}/fleet/{gateway}-status");
    let prefix = unique("refill");
    let mut ferry = Ferry::with_status_stream(stack, "fleet-refill", &gateway, &topic, &prefix);
    ferry.use_clusters(&geo.clusters_toml());
    ferry.start_subscribed().await;
    ferry
        .wait_log_count("producer ready", 2, Duration::from_secs(60))
        .await;
    let mut devices = Devices::connect(stack, &prefix, DEVICES).await;

    // A third, confirmed by both clusters (and so deleted from the store).
    let third = ROUNDS / 3;
    devices.publish_rounds(0, third).await;
    let confirmed = third as i64 * DEVICES as i64;
    ferry
        .wait_drained(confirmed, Duration::from_secs(120))
        .await;
    // East is lost: stopped, its data deleted, started empty and declared
    // again by the fleet.
    geo.east.ctl("pulsar-stop");
    geo.east.ctl("pulsar-wipe");
    geo.east.ctl("pulsar-start");
    lines(&fleet(&config, &["--cluster", "east", "provision"]));
    devices.publish_rounds(third, ROUNDS).await;
    ferry
        .wait_stored(ALL as i64, Duration::from_secs(120))
        .await;

    // Ferry holds east's records: east names none of the ones it confirmed.
    ferry
        .wait_log(
            "this cluster confirmed records up to",
            Duration::from_secs(120),
        )
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while waiting_for(&ferry, "west") > 0 {
        assert!(std::time::Instant::now() < deadline, "west never caught up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let held = waiting_for(&ferry, "east");
    let link = &ferry.status_json()["agent"]["topics"][format!("{topic}@east")];
    report(
        "fleet-refill",
        &format!(
            "east lost after confirming {confirmed}: {held} held for east, link connected={} ({})",
            link["connected"], link["last_error"]
        ),
    );
    assert_eq!(held, (ALL as i64 - confirmed) as u64);
    assert_eq!(link["connected"], false);
    let west = read_region_topic(&geo.west, &topic, ALL, Duration::from_secs(20)).await;
    assert_eq!(tally(&west, &devices.ids, ROUNDS), exact(ALL), "west");

    // The refill: west's 10,000 copied into east; ferry then finds all it
    // holds for east there and sends nothing twice.
    let out = lines(&fleet(
        &config,
        &[
            "refill", "--from", "west", "--to", "east", "--topic", &topic,
        ],
    ));
    report("fleet-refill", &format!("refill: {out:?}"));
    assert!(
        out[0].starts_with(&format!(
            "{topic}: read {ALL}, copied {ALL}, already there 0"
        )),
        "{out:?}"
    );
    // Run again: everything is there.
    let again = lines(&fleet(
        &config,
        &[
            "refill", "--from", "west", "--to", "east", "--topic", &topic,
        ],
    ));
    assert!(
        again[0].starts_with(&format!(
            "{topic}: read {ALL}, copied 0, already there {ALL}"
        )),
        "{again:?}"
    );
    ferry
        .wait_drained(ALL as i64, Duration::from_secs(120))
        .await;
    for region in [&geo.east, &geo.west] {
        let msgs = read_region_topic(region, &topic, ALL, Duration::from_secs(20)).await;
        let t = tally(&msgs, &devices.ids, ROUNDS);
        report(
            "fleet-refill",
            &format!("{}: {ALL} updates after the refill: {t:?}", region.name),
        );
        assert_eq!(t, exact(ALL), "{}", region.name);
    }
    // The fleet's view of each cluster (its own database) holds the
    // newest update of all 50 devices.
    for region in [&geo.east, &geo.west] {
        let database = format!(
            "sqlite:{}",
            test_dir("fleet-refill")
                .join(format!("view-{}.db", region.name))
                .display()
        );
        let mut view = Command::new(crate::fleet_bin())
            .args(["--cluster", region.name, "view", "--listen", "127.0.0.1:0"])
            .args(["--database", &database, "--config"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start ferry-fleet view");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let newest = loop {
            let out = fleet(&config, &["list", "--json", "--database", &database]);
            let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let newest = rows
                .iter()
                .filter(|r| r["state"]["n"] == ROUNDS - 1)
                .count();
            if newest == DEVICES || std::time::Instant::now() > deadline {
                break (rows.len(), newest);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let _ = view.kill();
        let _ = view.wait();
        report(
            "fleet-refill",
            &format!(
                "view of {}: {} devices, {} at their newest update",
                region.name, newest.0, newest.1
            ),
        );
        assert_eq!(newest, (DEVICES, DEVICES), "{}", region.name);
    }
    let c = ferry.counters();
    report(
        "fleet-refill",
        &format!(
            "skipped on resume {}, resent {}",
            c.get("skipped_on_resume").unwrap_or(&0),
            c.get("resent").unwrap_or(&0)
        ),
    );
    assert_eq!(ferry.log_count("EXACTLY ONCE IS OFF"), 0);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
