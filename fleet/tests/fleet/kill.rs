//! The kill test: real ferry agents, real Pulsar, real PostgreSQL.
//! 5 agents x 20 devices x 50 updates while two `view` processes share one
//! PostgreSQL view; one view is killed with SIGKILL midway. At the end the
//! view holds every device's last update, a trigger's history shows no row
//! ever went back, and `replay` into an empty SQLite database gives the
//! same rows.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::fleet_bin;
use crate::harness::{free_port, repo, report, unique, Devices, Ferry, Stack};
use crate::view::{consumed_is_the_sum, postgres_database, Fleet};

const GATEWAYS: usize = 5;
const DEVICES: usize = 20;
const UPDATES: u64 = 50;
/// The applied updates after which one view is killed.
const KILL_AT: i64 = 1_000;

/// The agent's binary, built here when only this package is tested.
fn agent_binary() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if std::env::var_os("FERRY_BIN").is_some() || crate::harness::ferry_bin().is_file() {
            return;
        }
        let status = Command::new(env!("CARGO"))
            .current_dir(repo())
            .args(["build", "-p", "ferry", "--bin", "ferry"])
            .status()
            .unwrap();
        assert!(status.success(), "cargo build -p ferry");
        std::env::set_var("FERRY_BIN", fleet_bin().with_file_name("ferry"));
    });
}

/// Runs `f` on a fresh connection to `url`, off the async threads (the
/// `postgres` crate's blocking client runs a runtime of its own).
fn pg<T>(url: &str, f: impl FnOnce(&mut postgres::Client) -> T) -> T {
    tokio::task::block_in_place(|| {
        let mut c = postgres::Client::connect(url, postgres::NoTls).expect("postgresql");
        f(&mut c)
    })
}

fn count(url: &str, sql: &str) -> i64 {
    pg(url, |c| c.query_one(sql, &[]).unwrap().get(0))
}

/// The view's table, and a history of every change of a row: old and new
/// gateway and record, in the order PostgreSQL made them.
const HISTORY: &str = "
CREATE TABLE history (
  id BIGSERIAL PRIMARY KEY,
  device TEXT NOT NULL,
  old_gateway TEXT NOT NULL, old_record BIGINT NOT NULL,
  new_gateway TEXT NOT NULL, new_record BIGINT NOT NULL
);
CREATE FUNCTION devices_history() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO history (device, old_gateway, old_record, new_gateway, new_record)
  VALUES (OLD.device, OLD.gateway, OLD.record, NEW.gateway, NEW.record);
  RETURN NULL;
END $$;
CREATE TRIGGER devices_history AFTER UPDATE ON devices
  FOR EACH ROW EXECUTE FUNCTION devices_history();
";

/// Changes that took a row back: to a lower record of the same gateway,
/// or below a record the row held before (in history order).
const WENT_BACK: &str = "
SELECT count(*) FROM (
  SELECT old_gateway, old_record, new_gateway, new_record,
         max(new_record) OVER (PARTITION BY device, new_gateway ORDER BY id
                               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS highest_before
  FROM history
) h
WHERE (old_gateway = new_gateway AND new_record <= old_record)
   OR new_record <= highest_before";

/// `ferry-fleet list --json` with fleet.toml's database replaced.
fn list_json(fleet: &Fleet, database: &str) -> Value {
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    let config = fleet.dir.join("list.toml");
    let start = text.find("database = ").unwrap();
    let end = start + text[start..].find('\n').unwrap();
    std::fs::write(
        &config,
        format!(
            "{}database = \"{database}\"{}",
            &text[..start],
            &text[end..]
        ),
    )
    .unwrap();
    let out = Command::new(fleet_bin())
        .args(["list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `ferry-fleet replay --database <database>`: its report line.
fn replay(fleet: &Fleet, database: &str) -> String {
    let out = Command::new(fleet_bin())
        .args(["replay", "--database", database, "--config"])
        .arg(&fleet.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The numbers of `replayed ... : read R, applied A, stale S, skipped K`.
fn replay_figures(line: &str) -> [u64; 4] {
    let tail = line.split_once(": ").expect("replay's report").1;
    let n: Vec<u64> = tail
        .split(", ")
        .map(|kv| kv.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    [n[0], n[1], n[2], n[3]]
}

async fn scrape_applied(port: u16) -> Option<u64> {
    let m = crate::harness::scrape_port(port).await?;
    m.get("ferry_fleet_view_applied_total").map(|v| *v as u64)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_killed_midway_loses_nothing_and_no_row_ever_goes_back() {
    const TEST: &str = "view_kill";
    let stack = tokio::task::block_in_place(Stack::get);
    tokio::task::block_in_place(agent_binary);
    let url = tokio::task::block_in_place(|| postgres_database(stack, TEST));
    pg(&url, |c| {
        c.batch_execute(ferry_fleet::db::SCHEMA).unwrap();
        c.batch_execute(HISTORY).unwrap();
    });

    // Gateway ids name MQTT sessions on the shared Mosquitto: unique.
    let gateways: Vec<String> = (0..GATEWAYS).map(|i| unique(&format!("k{i}"))).collect();
    let ids: Vec<&str> = gateways.iter().map(String::as_str).collect();
    let fleet = Fleet::with_database(stack, TEST, &ids, Some(url.clone())).await;
    let ports = [free_port(), free_port()];
    let mut v1 = fleet.start(
        "view-1",
        &["view", "--listen", &format!("127.0.0.1:{}", ports[0])],
    );
    let v2 = fleet.start(
        "view-2",
        &["view", "--listen", &format!("127.0.0.1:{}", ports[1])],
    );
    for g in &gateways {
        fleet.wait_consumers(&fleet.status_topic(g), 2).await;
    }

    // Each agent as fleet.toml names its gateway and status topic; its
    // devices publish on a prefix of their own.
    let mut agents = Vec::new();
    let mut all_devices = Vec::new();
    for g in &gateways {
        let prefix = unique("kill");
        let mut ferry = Ferry::new(
            stack,
            TEST,
            g,
            &format!("{prefix}/+/state"),
            &fleet.status_topic(g),
            "",
        );
        ferry.start_ready().await;
        agents.push(ferry);
        let mut devices = Devices::connect(stack, &prefix, DEVICES).await;
        devices.ids = (0..DEVICES).map(|d| format!("{g}-d{d:02}")).collect();
        all_devices.push(devices);
    }
    let publishing = tokio::spawn(async move {
        let rounds = all_devices.iter_mut().map(|d| d.publish_rounds(0, UPDATES));
        futures::future::join_all(rounds).await;
        for d in all_devices {
            d.disconnect().await;
        }
    });

    // Kill view 1 once the database holds about 1,000 applied updates.
    let applied_sql = "SELECT (SELECT count(*) FROM devices) + (SELECT count(*) FROM history)";
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut v1_scraped = None;
    let at_kill = loop {
        let n = count(&url, applied_sql);
        if n >= KILL_AT {
            break n;
        }
        v1_scraped = scrape_applied(ports[0]).await.or(v1_scraped);
        assert!(Instant::now() < deadline, "{n} applied after 180 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    v1.kill9();
    report(
        TEST,
        &format!("view 1 killed (SIGKILL) at {at_kill} applied in the database; its last scrape: applied {v1_scraped:?}"),
    );
    publishing.await.unwrap();

    // View 2 takes over view 1's devices and finishes.
    let last = format!(
        "SELECT count(*) FROM devices WHERE (state::jsonb ->> 'n')::int = {}",
        UPDATES - 1
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    while count(&url, &last) != (GATEWAYS * DEVICES) as i64 {
        assert!(
            Instant::now() < deadline,
            "{} of {} rows on their last update",
            count(&url, &last),
            GATEWAYS * DEVICES
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c2 = v2.stop();
    consumed_is_the_sum(&c2);
    assert_eq!(c2.retried + c2.dead_lettered, 0, "{c2:?}");

    // 100 rows, each on its device's last update from its own gateway.
    let list = list_json(&fleet, &url);
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), GATEWAYS * DEVICES);
    for r in rows {
        let device = r["device"].as_str().unwrap();
        let gateway = r["gateway"].as_str().unwrap();
        assert!(device.starts_with(&format!("{gateway}-d")), "{r}");
        assert_eq!(r["state"]["n"], UPDATES - 1, "{r}");
        assert_eq!(r["state"]["device"], device, "{r}");
    }
    // No row ever went back; every change moved its row forward.
    let history = count(&url, "SELECT count(*) FROM history");
    let went_back = count(&url, WENT_BACK);
    let most_per_device = count(
        &url,
        "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM history GROUP BY device) h",
    );
    let applied = (GATEWAYS * DEVICES) as i64 + history;
    let v1_applied = applied - c2.applied as i64;
    report(
        TEST,
        &format!(
            "{GATEWAYS} agents x {DEVICES} devices x {UPDATES} updates: applied {applied} \
             (view 1 {v1_applied} before SIGKILL, view 2 {}), view 2 stale {}, consumed {}; \
             history rows {history}, went back {went_back}",
            c2.applied, c2.stale, c2.consumed
        ),
    );
    assert_eq!(went_back, 0);
    assert!(most_per_device < UPDATES as i64, "{most_per_device}");
    assert!(v1_applied > 0 && c2.applied > 0);
    assert!(applied <= (GATEWAYS * DEVICES) as i64 * UPDATES as i64);

    // Replay from the compacted topics into an empty SQLite database: the
    // same rows.
    for g in &gateways {
        fleet.ns.compact(&format!("{g}-status")).await;
    }
    let sqlite = format!("sqlite:{}", fleet.dir.join("replayed.db").display());
    let line = tokio::task::block_in_place(|| replay(&fleet, &sqlite));
    report(
        TEST,
        &format!("replay into an empty SQLite database: {line}"),
    );
    let [read, applied_r, stale, skipped] = replay_figures(&line);
    assert_eq!((applied_r, stale, skipped), (100, 0, 0), "{line}");
    assert_eq!(read, 100, "a compacted read: one message per device");
    assert_eq!(list_json(&fleet, &sqlite), list);

    // Replaying into the live view changes nothing: every update is stale.
    let line = tokio::task::block_in_place(|| replay(&fleet, &url));
    report(
        TEST,
        &format!("replay into the live PostgreSQL view: {line}"),
    );
    assert_eq!(replay_figures(&line), [100, 0, 100, 0], "{line}");
    assert_eq!(count(&url, "SELECT count(*) FROM history"), history);
    assert_eq!(list_json(&fleet, &url), list);

    for mut a in agents {
        assert_eq!(a.terminate(), Some(0));
    }
}
