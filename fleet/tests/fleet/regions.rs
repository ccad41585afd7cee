//! `ferry-fleet provision` with two clusters (`[[pulsar.clusters]]`, the
//! stack's east and west regions): the fleet is declared in each, every
//! namespace replicates nowhere (ferry writes to every cluster itself), and
//! `--cluster` picks one.

use std::path::PathBuf;
use std::process::{Command, Output};

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
    let none = fleet(&config, &["--cluster", "north", "provision"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("its clusters: east, west"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
}
