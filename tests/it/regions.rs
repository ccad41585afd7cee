//! Two regions: ferry writes every record to each Pulsar cluster on its own
//! (one destination, producer, sequence and backlog per cluster), so each
//! cluster's deduplication makes it exactly once there, whichever of them
//! is dark for a while.

use std::time::{Duration, Instant};

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A status stream written to both regions, its topic (the same name in
/// each) and the devices' MQTT prefix.
struct Regions {
    topic: String,
    prefix: String,
    ferry: Ferry,
}

impl Regions {
    async fn new(stack: &Stack, geo: &Geo, test: &str) -> Regions {
        let ns = geo.namespace(test).await;
        let topic = format!("persistent://{ns}/device-status");
        let prefix = unique(test);
        let mut ferry = Ferry::with_status_stream(stack, test, &unique("gw"), &topic, &prefix);
        ferry.use_clusters(&geo.clusters_toml());
        Regions {
            topic,
            prefix,
            ferry,
        }
    }
}

/// Reads `topic` in each region with a real consumer: every one of
/// `rounds` updates of each device, once, in order.
async fn each_region_holds_all(
    geo: &Geo,
    topic: &str,
    devices: &[String],
    rounds: u64,
    test: &str,
    what: &str,
) {
    let all = devices.len() * rounds as usize;
    for region in [&geo.east, &geo.west] {
        let msgs = read_region_topic(region, topic, all, SECS(20)).await;
        let t = tally(&msgs, devices, rounds);
        report(
            test,
            &format!("{}: {all} updates, {what}: {t:?}", region.name),
        );
        assert_eq!(t, exact(all), "{}", region.name);
    }
}

/// The first scenario: 50 devices × 200 updates while east is
/// killed (SIGKILL) at about a third and restarted 60 s later, and west is
/// stopped for 30 s at about two thirds: each cluster's topic holds all
/// 10,000 updates exactly once, in order per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cluster_holds_every_update_once_through_a_crash_of_east_and_an_outage_of_west() {
    const DEVICES: usize = 50;
    const ROUNDS: u64 = 200;
    const ALL: usize = DEVICES * ROUNDS as usize;
    let (stack, _shared) = Stack::shared().await;
    let (geo, _regions) = Geo::exclusive().await;
    let Regions {
        topic,
        prefix,
        mut ferry,
    } = Regions::new(stack, geo, "regions").await;
    ferry.start_subscribed().await;
    ferry.wait_log_count("producer ready", 2, SECS(60)).await;
    let mut devices = Devices::connect(stack, &prefix, DEVICES).await;

    devices.publish_rounds(0, ROUNDS / 3).await;
    geo.east.ctl("pulsar-kill");
    let killed = Instant::now();
    devices.publish_rounds(ROUNDS / 3, 2 * ROUNDS / 3).await;
    tokio::time::sleep(SECS(60).saturating_sub(killed.elapsed())).await;
    geo.east.ctl("pulsar-start");

    geo.west.ctl("pulsar-stop");
    let stopped = Instant::now();
    devices.publish_rounds(2 * ROUNDS / 3, ROUNDS).await;
    // What an operator sees while west is dark: its backlog waits in the
    // store under its own name, its link is down; east's is not held back.
    ferry.wait_stored(ALL as i64, SECS(60)).await;
    tokio::time::sleep(SECS(6)).await;
    let json = ferry.status_json();
    let backlog = |cluster: &str| {
        json["streams"][0]["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["topic"] == format!("{topic}@{cluster}"))
            .unwrap_or_else(|| panic!("no {cluster} backlog in {json}"))["records"]
            .as_u64()
            .unwrap()
    };
    let west_link = &json["agent"]["topics"][format!("{topic}@west")];
    let metrics = ferry.scrape().await;
    report(
        "regions",
        &format!(
            "west dark: backlog east {} west {}, west link connected={} ({}), ferry_uplink_connected west={}",
            backlog("east"),
            backlog("west"),
            west_link["connected"],
            west_link["last_error"],
            metrics[&format!("ferry_uplink_connected{{topic=\"{topic}@west\"}}")],
        ),
    );
    let dark = (ROUNDS - 2 * ROUNDS / 3) * DEVICES as u64;
    assert_eq!(backlog("west"), dark);
    assert_eq!(west_link["connected"], false);
    // The per-cluster summary of `ferry status` says the same.
    let cluster = |name: &str| {
        json["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no cluster {name} in {json}"))["records"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(cluster("west"), dark);
    assert_eq!(cluster("east"), backlog("east"));
    tokio::time::sleep(SECS(30).saturating_sub(stopped.elapsed())).await;
    geo.west.ctl("pulsar-start");

    ferry.wait_drained(ALL as i64, SECS(240)).await;
    each_region_holds_all(
        geo,
        &topic,
        &devices.ids,
        ROUNDS,
        "regions",
        "east killed for 60 s at a third, west stopped for 30 s at two thirds",
    )
    .await;
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// Ferry killed with SIGKILL 20 times while 50 devices publish 200 updates
/// each: each cluster's topic holds all 10,000 exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_nines_of_ferry_leave_every_update_once_in_each_cluster() {
    const ALL: usize = 10_000;
    let (stack, _shared) = Stack::shared().await;
    let (geo, _regions) = Geo::exclusive().await;
    let Regions {
        topic,
        prefix,
        mut ferry,
    } = Regions::new(stack, geo, "regions-kill9").await;
    ferry.start_subscribed().await;
    let ids = KillNine {
        devices: 50,
        rounds: 200,
        pause: Duration::from_millis(100),
        restart_mqtt_after: None,
        kills: 20,
        up_ms: 100..=599,
        down_ms: 0..=199,
    }
    .run(stack, &prefix, &mut ferry)
    .await;
    ferry.wait_drained(ALL as i64, SECS(300)).await;
    let c = ferry.counters();
    let what = format!(
        "20 SIGKILLs of ferry (stored {}, skipped on resume {}, resent {})",
        c.get("stored").unwrap_or(&0),
        c.get("skipped_on_resume").unwrap_or(&0),
        c.get("resent").unwrap_or(&0),
    );
    each_region_holds_all(geo, &topic, &ids, 200, "regions-kill9", &what).await;
    assert_eq!(c.get("stored").copied(), Some(ALL as i64));
    assert_eq!(ferry.log_count("EXACTLY ONCE IS OFF"), 0);
    assert_eq!(ferry.terminate(), Some(0));
}

/// Desired state in two regions: an update written in west while east is
/// down reaches its device, and one written in east before it died (and
/// never read by the gateway) does not overwrite the newer one from west
/// when east comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_from_either_region_reaches_the_device_and_the_newest_wins() {
    const DEVICES: usize = 10;
    let (stack, _shared) = Stack::shared().await;
    let (geo, _regions) = Geo::exclusive().await;
    let Regions {
        topic,
        prefix,
        mut ferry,
    } = Regions::new(stack, geo, "regions-desired").await;
    let desired = topic.replace("device-status", "desired");
    let acks = topic.replace("device-status", "desired-acks");
    ferry.append_config(&downlink_section(&desired, &acks, &prefix));
    let devices: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:03}")).collect();
    let side = DeviceSide::subscribe(stack, &prefix).await;

    // Version 1 of every device, written in east.
    let mut east = Fleet::connect_url(&geo.east.service_url(), &desired).await;
    for d in &devices {
        east.desire(d, 1, &document(d, 1)).await;
    }
    ferry.start();
    side.wait_versions(&devices, SECS(60), |_| 1).await;

    // The gateway goes offline; east gets version 2 of dev-000 and dies
    // before the gateway reads it; west gets version 3 of dev-000 and 2 of
    // the others.
    assert_eq!(ferry.terminate(), Some(0));
    east.desire(&devices[0], 2, &document(&devices[0], 2)).await;
    drop(east);
    geo.east.ctl("pulsar-stop");
    let mut west = Fleet::connect_url(&geo.west.service_url(), &desired).await;
    west.desire(&devices[0], 3, &document(&devices[0], 3)).await;
    for d in &devices[1..] {
        west.desire(d, 2, &document(d, 2)).await;
    }
    ferry.start();
    let want = |d: &str| if d == "dev-000" { 3 } else { 2 };
    side.wait_versions(&devices, SECS(60), want).await;

    // East comes back with its older version 2 of dev-000: it is stale.
    geo.east.ctl("pulsar-start");
    let began = Instant::now();
    while ferry.scrape().await["ferry_downlink_stale_total"] < 1.0 {
        assert!(
            began.elapsed() < SECS(120),
            "east's version 2 was never read: {}",
            tail(&ferry.log_text(), 30)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(SECS(3)).await;
    let seen = side.seen();
    let last: Vec<Option<u64>> = devices
        .iter()
        .map(|d| seen[d].last().and_then(|(p, _)| version_of(p)))
        .collect();
    let metrics = ferry.scrape().await;
    report(
        "regions-desired",
        &format!(
            "dev-000 saw versions {:?}; last versions {last:?}; stale {}",
            seen["dev-000"]
                .iter()
                .map(|(p, _)| version_of(p))
                .collect::<Vec<_>>(),
            metrics["ferry_downlink_stale_total"],
        ),
    );
    assert_eq!(
        last[0],
        Some(3),
        "east's older version never overwrote west's"
    );
    assert!(last[1..].iter().all(|v| *v == Some(2)));
    assert!(
        !seen["dev-000"]
            .iter()
            .any(|(p, _)| version_of(p) == Some(2)),
        "dev-000 never got east's version 2"
    );
    assert!(metrics["ferry_downlink_stale_total"] >= 1.0);
    side.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
