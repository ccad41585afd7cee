//! `GET /devices/{id}` and `/metrics` of a running `view`, and of `serve`
//! alone, against the real broker: exact rows, exact counts, the lag.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{free_port, report, Stack};
use crate::view::{send_all, update, Counts, Fleet};

/// `GET url`: status and body.
async fn get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("the server answers");
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `/metrics` as (name with labels, value).
async fn scrape(base: &str) -> BTreeMap<String, f64> {
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Scrapes until `done` holds (the lag is polled every few seconds).
async fn scrape_until(
    base: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = scrape(base).await;
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: {m:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A running view answers `/devices/{id}` with the row and `/metrics` with
/// its live counts and the lag of the status topic; `serve` alone answers
/// the same rows and the lag, without counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_running_view_serves_rows_counts_and_lag() {
    const TEST: &str = "serve";
    let stack = tokio::task::block_in_place(Stack::get);
    let fleet = Fleet::new(stack, TEST, &["gw-a"]).await;
    let topic = fleet.status_topic("gw-a");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let view = fleet.start("view", &["view", "--listen", &format!("127.0.0.1:{port}")]);
    fleet.wait_consumers(&topic, 1).await;

    // d1: records 1, 2, 3; d2: record 4; d1's record 2 again (stale); a
    // message without its record number (dead-lettered after its third
    // attempt: two retries).
    let mut p = fleet.producer(&topic).await;
    let mut msgs: Vec<_> = (1..=3)
        .map(|r| update("gw-a", "d1", r, 100 + r, &format!(r#"{{"n":{}}}"#, r - 1)))
        .collect();
    msgs.push(update("gw-a", "d2", 4, 104, r#"{"n":0}"#));
    msgs.push(update("gw-a", "d1", 2, 102, r#"{"n":1}"#));
    let mut poison = update("gw-a", "d3", 5, 105, r#"{"n":0}"#);
    poison.properties.remove("ferry.record");
    msgs.push(poison);
    send_all(&mut p, msgs).await;

    let lag = format!("ferry_fleet_view_lag_messages{{topic=\"{topic}\"}}");
    let m = scrape_until(&base, "8 consumed and no lag", |m| {
        m.get("ferry_fleet_view_consumed_total") == Some(&8.0) && m.get(&lag) == Some(&0.0)
    })
    .await;
    let want: BTreeMap<String, f64> = [
        ("ferry_fleet_view_consumed_total", 8.0),
        ("ferry_fleet_view_applied_total", 4.0),
        ("ferry_fleet_view_stale_total", 1.0),
        ("ferry_fleet_view_retried_total", 2.0),
        ("ferry_fleet_view_dead_lettered_total", 1.0),
        (lag.as_str(), 0.0),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(m, want);

    let (status, body) = get(&format!("{base}/devices/d1")).await;
    assert_eq!(status, 200, "{body}");
    let d1 = json!({"device": "d1", "gateway": "gw-a", "record": 3, "received_ms": 103, "state": {"n": 2}});
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), d1);
    let (status, body) = get(&format!("{base}/devices/d2")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"device": "d2", "gateway": "gw-a", "record": 4, "received_ms": 104, "state": {"n": 0}})
    );
    let (status, body) = get(&format!("{base}/devices/d3")).await;
    assert_eq!(
        (status, body.as_str()),
        (404, r#"{"error":"no device d3"}"#)
    );
    let (status, _) = get(&format!("{base}/nothing")).await;
    assert_eq!(status, 404);

    // `serve` alone: the same rows, the lag, no counts.
    let port2 = free_port();
    let base2 = format!("http://127.0.0.1:{port2}");
    let serve = fleet.start(
        "serve",
        &["serve", "--listen", &format!("127.0.0.1:{port2}")],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base2}/metrics")).await.is_err() {
        assert!(Instant::now() < deadline, "serve does not answer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = get(&format!("{base2}/devices/d1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), d1);
    let m2 = scrape_until(&base2, "serve's lag", |m| m.contains_key(&lag)).await;
    assert_eq!(m2, [(lag.clone(), 0.0)].into_iter().collect());
    report(
        TEST,
        &format!("view /metrics: {m:?}; serve /metrics: {m2:?}"),
    );

    let c = view.stop();
    assert_eq!(
        c,
        Counts {
            consumed: 8,
            applied: 4,
            stale: 1,
            retried: 2,
            dead_lettered: 1
        }
    );
    serve.stop_quietly();
}
