//! `ferry-fleet view`, `get`, `list` and `dlq` against the real broker:
//! status topics written with the properties the agent sets (a real Pulsar
//! producer), `view` processes sharing one Key_Shared subscription, the
//! view's SQLite database read back, exact figures.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pulsar::producer::Message;
use pulsar::{Producer, Pulsar, TokioExecutor};
use serde_json::{json, Value};

use crate::fleet_bin;
use crate::harness::{report, test_dir, Namespace, Stack};

/// The plain broker stack, brought up once (or reused); a test fails
/// without it, never skips.
fn stack() -> &'static Stack {
    Stack::get()
}

/// A fleet.toml for one test's namespace, and the view's database.
pub struct Fleet {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub db: PathBuf,
    pub ns: Namespace,
    pub stack: &'static Stack,
}

impl Fleet {
    pub async fn new(stack: &'static Stack, test: &str, gateways: &[&str]) -> Fleet {
        Fleet::with_database(stack, test, gateways, None).await
    }

    /// A fleet whose view is in `database` (a URL) instead of a SQLite file
    /// in the test's folder.
    pub async fn with_database(
        stack: &'static Stack,
        test: &str,
        gateways: &[&str],
        database: Option<String>,
    ) -> Fleet {
        let ns = Namespace::create(stack, test).await;
        let dir = test_dir(test);
        let db = dir.join("view.db");
        let database = database.unwrap_or_else(|| format!("sqlite:{}", db.display()));
        let (tenant, name) = ns.name.split_once('/').unwrap();
        let mut text = format!(
            "[pulsar]\nservice_url = \"{}\"\nadmin_url = \"http://127.0.0.1:{}\"\n\n\
             [namespace]\ntenant = \"{tenant}\"\nname = \"{name}\"\n\n\
             [view]\ndatabase = \"{database}\"\nsubscription = \"view\"\n\
             max_attempts = 3\nretry_delay_secs = 1\nlisten = \"127.0.0.1:0\"\n",
            stack.service_url(),
            stack.web_port,
        );
        for g in gateways {
            text.push_str(&format!("\n[[gateways]]\nid = \"{g}\"\n"));
        }
        let config = dir.join("fleet.toml");
        std::fs::write(&config, text).unwrap();
        Fleet {
            dir,
            config,
            db,
            ns,
            stack,
        }
    }

    pub fn status_topic(&self, gateway: &str) -> String {
        self.ns.topic(&format!("{gateway}-status"))
    }

    /// Runs `ferry-fleet <args> --config fleet.toml`: exit code, stdout, stderr.
    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(fleet_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("FERRY_FLEET_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The JSON a `--json` command prints (it must succeed).
    pub fn json(&self, args: &[&str]) -> Value {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    pub fn start_view(&self, name: &str) -> View {
        self.start(name, &["view"])
    }

    /// Starts `ferry-fleet <args> --config fleet.toml` (a `view` or a
    /// `serve`), its output in `<name>.out` and `<name>.log`.
    pub fn start(&self, name: &str, args: &[&str]) -> View {
        let out = self.dir.join(format!("{name}.out"));
        let log = self.dir.join(format!("{name}.log"));
        let child = Command::new(fleet_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap();
        View {
            child: Some(child),
            out,
            log,
        }
    }

    /// A read connection to the view's database.
    pub fn db(&self) -> rusqlite::Connection {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// Waits until the view has created its table.
    pub async fn wait_for_table(&self) {
        wait("the view's table", Duration::from_secs(60), || {
            self.db.exists()
                && self
                    .db()
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE name = 'devices'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                    .unwrap_or(0)
                    == 1
        })
        .await;
    }

    /// Waits until `sql` (one integer) gives `want`.
    pub async fn wait_db(&self, what: &str, sql: &str, want: i64) {
        wait(what, Duration::from_secs(120), || {
            self.db().query_row(sql, [], |r| r.get::<_, i64>(0)).ok() == Some(want)
        })
        .await;
    }

    /// Waits until `topic`'s subscription `view` has `n` consumers.
    pub async fn wait_consumers(&self, topic: &str, n: usize) {
        let url = format!(
            "http://127.0.0.1:{}/admin/v2/persistent/{}/stats",
            self.stack.web_port,
            topic.trim_start_matches("persistent://")
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = match reqwest::get(&url).await {
                Ok(r) => r.json::<Value>().await.ok().and_then(|s| {
                    s["subscriptions"]["view"]["consumers"]
                        .as_array()
                        .map(|c| c.len())
                }),
                Err(_) => None,
            };
            if got == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{topic}: {got:?} consumers on the view subscription, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn producer(&self, topic: &str) -> Producer<TokioExecutor> {
        let pulsar: Pulsar<TokioExecutor> =
            Pulsar::builder(self.stack.service_url(), TokioExecutor)
                .build()
                .await
                .expect("pulsar client");
        pulsar
            .producer()
            .with_topic(topic)
            .build()
            .await
            .expect("producer")
    }
}

pub async fn wait(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An update as the agent sends it: key = device, the JSON state, and the
/// properties `ferry.gateway`, `ferry.record`, `ferry.received_ms`.
pub fn update(
    gateway: &str,
    device: &str,
    record: u64,
    received_ms: u64,
    payload: &str,
) -> Message {
    Message {
        payload: payload.as_bytes().to_vec(),
        partition_key: Some(device.to_string()),
        properties: [
            ("ferry.gateway", gateway.to_string()),
            ("ferry.record", record.to_string()),
            ("ferry.received_ms", received_ms.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        ..Default::default()
    }
}

/// Sends every message, in order, and waits for the broker's receipts (100
/// at a time: the crate refuses more pending sends with `SlowDown`).
pub async fn send_all(p: &mut Producer<TokioExecutor>, msgs: Vec<Message>) {
    let mut msgs = msgs.into_iter().peekable();
    while msgs.peek().is_some() {
        let mut receipts = Vec::new();
        for m in msgs.by_ref().take(100) {
            receipts.push(p.send_non_blocking(m).await.expect("send"));
        }
        for r in receipts {
            r.await.expect("receipt");
        }
    }
}

/// A `ferry-fleet view` process; killed if the test ends without stopping
/// it.
pub struct View {
    child: Option<Child>,
    out: PathBuf,
    log: PathBuf,
}

/// What a view counted, from the line it prints when it stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub consumed: u64,
    pub applied: u64,
    pub stale: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

fn read_counts(out: &Path, log: &Path) -> Counts {
    let text = std::fs::read_to_string(out).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("view stopped: "))
        .unwrap_or_else(|| {
            panic!(
                "no counts in {text:?}; log: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
    let n: BTreeMap<&str, u64> = line
        .split(", ")
        .map(|kv| {
            let (k, v) = kv.split_once(' ').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    Counts {
        consumed: n["consumed"],
        applied: n["applied"],
        stale: n["stale"],
        retried: n["retried"],
        dead_lettered: n["dead-lettered"],
    }
}

impl View {
    /// SIGKILL, and waits for it to be gone.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, then its counts.
    pub fn stop(mut self) -> Counts {
        self.terminate();
        read_counts(&self.out, &self.log)
    }

    /// SIGTERM (a `serve`: no counts).
    pub fn stop_quietly(mut self) {
        self.terminate();
    }

    /// SIGTERM; it must exit 0 within 20 s.
    fn terminate(&mut self) {
        let mut child = self.child.take().unwrap();
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("view did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "view exited {status}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for View {
    /// Kills a view still running; when the test failed, prints what the
    /// view said first (whether it was still running, its log's end).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let exited = c.try_wait().ok().flatten();
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!(
                    "[view {}] {}; the end of its log:\n{}",
                    self.log.display(),
                    match exited {
                        Some(s) => format!("had exited ({s})"),
                        None => "was running".to_string(),
                    },
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }
}

pub fn consumed_is_the_sum(c: &Counts) {
    assert_eq!(
        c.consumed,
        c.applied + c.stale + c.retried + c.dead_lettered,
        "{c:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_views_share_the_devices_and_each_row_ends_on_its_last_update() {
    two_views_share(None).await;
}

/// Several machines share one view in PostgreSQL: the same figures.
#[tokio::test(flavor = "multi_thread")]
async fn two_views_share_one_postgresql_view() {
    let stack = tokio::task::block_in_place(stack);
    two_views_share(Some(postgres_database(stack, "view_two_pg"))).await;
}

/// A new database on the stack's PostgreSQL; its URL.
pub fn postgres_database(stack: &Stack, test: &str) -> String {
    stack
        .new_postgres_database(test)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// 2 gateways x 50 devices x 20 updates through two views sharing the
/// Key_Shared subscription and the database (`None`: SQLite).
async fn two_views_share(database: Option<String>) {
    let test = if database.is_some() {
        "view_two_pg"
    } else {
        "view_two"
    };
    let stack = tokio::task::block_in_place(stack);
    let gateways = ["gw-a", "gw-b"];
    let fleet = Fleet::with_database(stack, test, &gateways, database).await;
    let views = [fleet.start_view("view-1"), fleet.start_view("view-2")];
    for g in gateways {
        fleet.wait_consumers(&fleet.status_topic(g), 2).await;
    }
    // 50 devices per gateway, 20 updates each, interleaved as a gateway
    // sends them: record numbers rise per gateway.
    let mut expected = Vec::new();
    for g in gateways {
        let mut p = fleet.producer(&fleet.status_topic(g)).await;
        let mut msgs = Vec::new();
        let mut record = 0u64;
        for n in 0..20u64 {
            for d in 0..50 {
                record += 1;
                let device = format!("{g}-d{d:02}");
                msgs.push(update(
                    g,
                    &device,
                    record,
                    1_000 + record,
                    &format!(r#"{{"n":{n}}}"#),
                ));
                if n == 19 {
                    expected.push(json!({
                        "device": device,
                        "gateway": g,
                        "record": record,
                        "received_ms": 1_000 + record,
                        "state": {"n": 19},
                    }));
                }
            }
        }
        send_all(&mut p, msgs).await;
    }
    wait("100 devices at n = 19", Duration::from_secs(120), || {
        let (code, out, _) = fleet.run(&["list", "--json"]);
        code == 0
            && serde_json::from_str::<Value>(&out).is_ok_and(|l| {
                l.as_array().is_some_and(|rows| {
                    rows.len() == 100 && rows.iter().all(|r| r["state"]["n"] == 19)
                })
            })
    })
    .await;
    let [v1, v2] = views;
    let (c1, c2) = (v1.stop(), v2.stop());
    report(test, &format!("view 1: {c1:?}"));
    report(test, &format!("view 2: {c2:?}"));
    consumed_is_the_sum(&c1);
    consumed_is_the_sum(&c2);
    assert!(c1.applied > 0 && c2.applied > 0, "both views applied some");
    assert_eq!(c1.applied + c2.applied, 2_000);
    assert_eq!(c1.consumed + c2.consumed, 2_000);
    assert_eq!((c1.stale, c2.stale), (0, 0));
    assert_eq!(
        c1.retried + c2.retried + c1.dead_lettered + c2.dead_lettered,
        0
    );
    expected.sort_by(|a, b| a["device"].as_str().cmp(&b["device"].as_str()));
    let list = fleet.json(&["list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 100);
    assert_eq!(list, Value::Array(expected));
}

#[tokio::test(flavor = "multi_thread")]
async fn redeliveries_and_older_records_never_take_a_row_back() {
    const TEST: &str = "view_stale";
    let stack = tokio::task::block_in_place(stack);
    let fleet = Fleet::new(stack, TEST, &["gw-a"]).await;
    let topic = fleet.status_topic("gw-a");
    let view = fleet.start_view("view");
    fleet.wait_consumers(&topic, 1).await;
    let mut p = fleet.producer(&topic).await;
    // 10 devices x 5 updates: records 1..=50.
    let mut all = Vec::new();
    let mut record = 0;
    for n in 0..5 {
        for d in 0..10 {
            record += 1;
            all.push((format!("d{d}"), record, n));
        }
    }
    let msg = |(device, record, n): &(String, u64, u64)| {
        update(
            "gw-a",
            device,
            *record,
            5_000 + record,
            &format!(r#"{{"n":{n}}}"#),
        )
    };
    send_all(&mut p, all.iter().map(msg).collect()).await;
    fleet
        .wait_db(
            "50 records applied",
            "SELECT sum(record) FROM devices",
            (41..=50).sum(),
        )
        .await;
    // The same 50 again (a redelivery, a replay), newest first, then one
    // newer update of d0 behind them: once it is applied, the view has
    // handled every message before it.
    let mut again: Vec<Message> = all.iter().rev().map(msg).collect();
    again.push(update("gw-a", "d0", 51, 5_051, r#"{"n":5}"#));
    send_all(&mut p, again).await;
    fleet
        .wait_db(
            "d0 at record 51",
            "SELECT record FROM devices WHERE device = 'd0'",
            51,
        )
        .await;
    let c = view.stop();
    report(TEST, &format!("{c:?}"));
    assert_eq!(
        c,
        Counts {
            consumed: 101,
            applied: 51,
            stale: 50,
            retried: 0,
            dead_lettered: 0
        }
    );
    let list = fleet.json(&["list", "--json"]);
    let want: Vec<Value> = (0..10)
        .map(|d| {
            let (record, n) = if d == 0 { (51, 5) } else { (41 + d, 4) };
            json!({
                "device": format!("d{d}"),
                "gateway": "gw-a",
                "record": record,
                "received_ms": 5_000 + record,
                "state": {"n": n},
            })
        })
        .collect();
    assert_eq!(list, Value::Array(want));
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_and_a_refusal_are_dead_lettered_after_three_attempts_and_replay_applies_the_refusal(
) {
    const TEST: &str = "view_dlq";
    let stack = tokio::task::block_in_place(stack);
    let fleet = Fleet::new(stack, TEST, &["gw-a"]).await;
    let topic = fleet.status_topic("gw-a");
    let view = fleet.start_view("view");
    fleet.wait_for_table().await;
    // A real database refusal, for one device.
    fleet
        .db()
        .execute_batch(
            "CREATE TRIGGER refuse_i BEFORE INSERT ON devices WHEN NEW.device = 'refused'
               BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;
             CREATE TRIGGER refuse_u BEFORE UPDATE ON devices WHEN NEW.device = 'refused'
               BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
    fleet.wait_consumers(&topic, 1).await;
    let mut p = fleet.producer(&topic).await;
    send_all(
        &mut p,
        vec![
            update("gw-a", "d1", 1, 101, r#"{"n":0}"#),
            update("gw-a", "d1", 2, 102, "not json"),
            update("gw-a", "d1", 3, 103, r#"{"n":2}"#),
            update("gw-a", "d2", 4, 104, r#"{"n":0}"#),
            update("gw-a", "refused", 5, 105, r#"{"n":0}"#),
            update("gw-a", "d2", 6, 106, r#"{"n":1}"#),
        ],
    )
    .await;
    let started = Instant::now();
    // Both on the dead-letter topic after their third attempt (two
    // retries, 1 s apart).
    let deadline = Instant::now() + Duration::from_secs(60);
    let dead = loop {
        let dead = fleet.json(&["dlq", "list", "--json"]);
        if dead.as_array().unwrap().len() >= 2 {
            break dead;
        }
        assert!(Instant::now() < deadline, "dead letters: {dead}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    report(
        TEST,
        &format!("2 dead letters within {:?}", started.elapsed()),
    );
    let mut dead = dead.as_array().unwrap().clone();
    dead.sort_by_key(|d| d["device"].as_str().unwrap_or_default().to_string());
    for d in &mut dead {
        let when = d.as_object_mut().unwrap().remove("failed_ms").unwrap();
        assert!(when.as_i64().unwrap() > 1_600_000_000_000, "{when}");
    }
    assert_eq!(
        Value::Array(dead),
        json!([
            {
                "device": "d1",
                "gateway": "gw-a",
                "record": "2",
                "reason": "payload is not JSON: expected ident at line 1 column 2",
                "attempts": 3,
                "topic": topic,
            },
            {
                "device": "refused",
                "gateway": "gw-a",
                "record": "5",
                "reason": "sqlite: refused by the test",
                "attempts": 3,
                "topic": topic,
            },
        ])
    );
    // The updates behind the poison message, of its device and others,
    // were applied; the refused device has no row.
    assert_eq!(
        fleet.json(&["list", "--json"]),
        json!([
            {"device": "d1", "gateway": "gw-a", "record": 3, "received_ms": 103, "state": {"n": 2}},
            {"device": "d2", "gateway": "gw-a", "record": 6, "received_ms": 106, "state": {"n": 1}},
        ])
    );
    let (code, _, err) = fleet.run(&["get", "refused", "--json"]);
    assert_eq!(
        (code, err.trim()),
        (1, "ferry-fleet: no device refused in the view")
    );

    // The database accepts it again; replay puts both back.
    fleet
        .db()
        .execute_batch("DROP TRIGGER refuse_i; DROP TRIGGER refuse_u;")
        .unwrap();
    let (code, out, err) = fleet.run(&["dlq", "replay"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("2 replayed onto {}", fleet.ns.topic("fleet-view-retry"))
    );
    fleet
        .wait_db(
            "the refused device applied",
            "SELECT count(*) FROM devices WHERE device = 'refused'",
            1,
        )
        .await;
    assert_eq!(
        fleet.json(&["get", "refused", "--json"]),
        json!({"device": "refused", "gateway": "gw-a", "record": 5, "received_ms": 105, "state": {"n": 0}})
    );
    // The poison message fails again, three times, and is back, alone.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dead = fleet.json(&["dlq", "list", "--json"]);
        let dead = dead.as_array().unwrap();
        if dead.len() == 1 {
            assert_eq!(dead[0]["device"], "d1");
            assert_eq!(dead[0]["attempts"], 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters after replay: {dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let c = view.stop();
    report(TEST, &format!("{c:?}"));
    consumed_is_the_sum(&c);
    // 6 status messages, 2 x 2 retries, 2 replayed, the poison's 2 retries
    // after its replay.
    assert_eq!(
        c,
        Counts {
            consumed: 14,
            applied: 5,
            stale: 0,
            retried: 6,
            dead_lettered: 3
        }
    );
    // And the text forms.
    let (code, out, _) = fleet.run(&["get", "d1"]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "device       d1\ngateway      gw-a\nrecord       3\nreceived_ms  103\nstate        {\"n\":2}\n"
    );
}

/// The one conditional statement agrees with the apply rule in PostgreSQL
/// too (the SQLite version is a unit test).
#[test]
fn the_upsert_agrees_with_decide_in_postgresql() {
    use ferry_fleet::db::{postgres::PostgresStore, Applied, StateUpdate, ViewStore, RULE_CASES};
    use ferry_fleet::view::apply::{decide, Decision};
    let stack = stack();
    let mut s = PostgresStore::open(&postgres_database(stack, "rule_pg")).unwrap();
    let update = |device: &str, gateway: &str, record: i64, received_ms: i64| StateUpdate {
        device: device.into(),
        gateway: gateway.into(),
        record,
        received_ms,
        state: format!(r#"{{"r":{record}}}"#),
        topic: format!("persistent://t/n/{gateway}-status"),
    };
    for (i, ((rg, rr, rm), (ug, ur, um))) in RULE_CASES.into_iter().enumerate() {
        let device = format!("d{i}");
        assert_eq!(
            s.apply(&update(&device, rg, rr, rm)).unwrap(),
            Applied::Applied
        );
        let before = s.get(&device).unwrap().unwrap();
        let u = update(&device, ug, ur, um);
        let got = s.apply(&u).unwrap();
        let after = s.get(&device).unwrap().unwrap();
        match decide(&u, Some(&before)) {
            Decision::Apply => {
                assert_eq!(got, Applied::Applied, "{u:?} over {before:?}");
                assert_eq!((after.gateway.as_str(), after.record), (ug, ur));
            }
            Decision::Stale => {
                assert_eq!(got, Applied::Stale, "{u:?} over {before:?}");
                assert_eq!(after, before);
            }
        }
    }
    assert_eq!(s.list().unwrap().len(), RULE_CASES.len());
}

/// The issue's figure: 10 malformed messages among 1,000, each tried 3
/// times (`max_attempts`), then exactly 10 on the dead-letter topic; the
/// other 990 applied.
#[tokio::test(flavor = "multi_thread")]
async fn ten_malformed_among_a_thousand_are_dead_lettered_and_the_rest_applied() {
    const TEST: &str = "view_malformed";
    let stack = tokio::task::block_in_place(stack);
    let fleet = Fleet::new(stack, TEST, &["gw-a"]).await;
    let topic = fleet.status_topic("gw-a");
    let view = fleet.start_view("view");
    fleet.wait_consumers(&topic, 1).await;
    // 100 devices x 10 updates; every 97th message (10, on 10 devices) is
    // not JSON.
    let mut msgs = Vec::new();
    let mut last = BTreeMap::new();
    for record in 1..=1_000u64 {
        let device = format!("d{:03}", record % 100);
        let n = (record - 1) / 100;
        if record % 97 == 0 {
            msgs.push(update("gw-a", &device, record, record, "{not json"));
        } else {
            msgs.push(update(
                "gw-a",
                &device,
                record,
                record,
                &format!(r#"{{"n":{n}}}"#),
            ));
            last.insert(device, (record, n));
        }
    }
    let mut p = fleet.producer(&topic).await;
    send_all(&mut p, msgs).await;
    wait("10 dead letters", Duration::from_secs(60), || {
        let (code, out, _) = fleet.run(&["dlq", "list", "--json"]);
        code == 0
            && serde_json::from_str::<Value>(&out)
                .is_ok_and(|d| d.as_array().is_some_and(|a| a.len() == 10))
    })
    .await;
    wait("990 applied", Duration::from_secs(60), || {
        let (code, out, _) = fleet.run(&["list", "--json"]);
        code == 0
            && serde_json::from_str::<Value>(&out).is_ok_and(|l| {
                l.as_array().is_some_and(|rows| {
                    rows.len() == last.len()
                        && rows.iter().all(|r| {
                            let d = r["device"].as_str().unwrap_or_default();
                            last.get(d).is_some_and(|(rec, n)| {
                                r["record"] == *rec && r["state"]["n"] == *n
                            })
                        })
                })
            })
    })
    .await;
    let c = view.stop();
    report(TEST, &format!("{c:?}"));
    consumed_is_the_sum(&c);
    // Each malformed one tried 3 times (max_attempts): 2 retries each.
    assert_eq!(c.consumed, 1_000 + 10 * 2);
    assert_eq!((c.applied, c.dead_lettered), (990, 10));
    assert_eq!((c.stale, c.retried), (0, 20));
    let dead = fleet.json(&["dlq", "list", "--json"]);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 10);
    assert!(dead.iter().all(|d| d["attempts"] == 3
        && d["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("payload is not JSON"))));
}

/// Views on several machines start at once on a new database: every one
/// opens it (the table is created once, the others wait for it).
#[test]
fn views_starting_at_once_all_open_a_new_postgresql_view() {
    use ferry_fleet::db::postgres::PostgresStore;
    let stack = stack();
    for round in 0..5 {
        let url = postgres_database(stack, &format!("open_pg_{round}"));
        let barrier = std::sync::Barrier::new(8);
        let failures: Vec<String> = std::thread::scope(|s| {
            let opens: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        PostgresStore::open(&url).err().map(|e| e.to_string())
                    })
                })
                .collect();
            opens
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect()
        });
        assert!(failures.is_empty(), "round {round}: {failures:?}");
    }
}
