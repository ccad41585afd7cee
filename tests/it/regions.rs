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
        let mut ferry = Ferry::with_streams(
            stack,
            test,
            &unique("gw"),
            &format!(
                r#"[[streams]]
name = "status"
topic = "{topic}"
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]
"#
            ),
        );
        ferry.use_clusters(&geo.clusters_toml());
        Regions {
            topic,
            prefix,
            ferry,
        }
    }
}

/// The issue's first scenario: 50 devices × 200 updates while east is
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
    tokio::time::sleep(SECS(30).saturating_sub(stopped.elapsed())).await;
    geo.west.ctl("pulsar-start");

    ferry.wait_drained(ALL as i64, SECS(240)).await;
    for region in [&geo.east, &geo.west] {
        let msgs = read_region_topic(region, &topic, ALL, SECS(20)).await;
        let t = tally(&msgs, &devices.ids, ROUNDS);
        report(
            "regions",
            &format!(
                "{}: {ALL} updates, east killed for 60 s at a third, west stopped for 30 s at two thirds: {t:?}",
                region.name
            ),
        );
        assert_eq!(t, exact(ALL), "{}", region.name);
    }
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
    for region in [&geo.east, &geo.west] {
        let msgs = read_region_topic(region, &topic, ALL, SECS(20)).await;
        let t = tally(&msgs, &ids, 200);
        report(
            "regions-kill9",
            &format!(
                "{}: 20 SIGKILLs of ferry: {t:?} (stored {}, skipped on resume {}, resent {})",
                region.name,
                c.get("stored").unwrap_or(&0),
                c.get("skipped_on_resume").unwrap_or(&0),
                c.get("resent").unwrap_or(&0),
            ),
        );
        assert_eq!(t, exact(ALL), "{}", region.name);
    }
    assert_eq!(c.get("stored").copied(), Some(ALL as i64));
    assert_eq!(ferry.log_count("EXACTLY ONCE IS OFF"), 0);
    assert_eq!(ferry.terminate(), Some(0));
}
