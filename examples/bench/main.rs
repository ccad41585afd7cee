//! The benchmark: ferry measured against the ceilings that bound it, on this
//! machine's real brokers, in one run. Run it with `bench/run` (README,
//! "Benchmark"), which builds ferry in release mode and starts the stack.
//!
//! Every line uses the same payload (`BENCH_PAYLOAD` bytes of JSON, 100) and
//! the same count (`BENCH_N` updates, 100,000), except the drain, which
//! empties a backlog of `BENCH_BACKLOG` (1,000,000), and the large-payload
//! line. Throughput lines run `BENCH_PASSES` (3) timed passes and keep the
//! best, ceilings and ferry alike (every pass is in the JSON); see "The
//! spread of the passes" below:
//!
//! - **ceiling A**: unbatched publishing into a topic of a namespace with
//!   deduplication on, with ferry's window of sends awaiting their receipt
//!   (`uplink.max_in_flight`, `BENCH_WINDOW`, 1000) and ferry's key, event
//!   time and four properties on each message, after an untimed warm-up.
//!   Two clients: A1 the `pulsar` crate's producer; A2 a bare client of the
//!   binary protocol in `bare.rs` (TCP_NODELAY, SENDs written in runs,
//!   framed by ferry's own `ferry::uplink::frame`, no store). Ceiling A is
//!   the faster of the two: what the broker was shown to take;
//! - **ceiling B**: MQTT QoS 1 through the same Mosquitto to one subscriber;
//! - **ceiling C**: SQLite group commits on the same disk (`target/bench/`)
//!   by ferry's own store code (`ferry::store::db::Db`: its schema, its
//!   insert transaction, ferry's default durability, WAL with
//!   `synchronous=FULL`), without the store thread, ingest or uplink around
//!   it, in groups of ferry's largest (`store.commit_max_batch`,
//!   `BENCH_BATCH`, 1000); C' (for information) also deletes each group in a
//!   second transaction (`Db::delivered`), as ferry does after the broker's
//!   receipts;
//! - **ceiling P** (for information): the whole pipeline without a store on
//!   this machine: this program subscribes to Mosquitto (automatic acks)
//!   and forwards every message at once on the bare producer; MQTT publish
//!   to broker receipt, as ferry's end-to-end line, with both brokers
//!   sharing the CPU as they do there;
//! - **bound L**: the latency of the same forwarder at the fixed rate;
//! - **ferry end to end**: from the first MQTT publish until ferry's own
//!   `ferry_uplink_records_acknowledged_total` (broker receipts) reaches the
//!   count, polled every 100 ms; afterwards the topic is read back with a
//!   real consumer and checked (lost, duplicated, out of order);
//! - **latency**: publishes at a fixed `BENCH_RATE` (1,000/s); each payload
//!   carries its publish time (µs); a consumer subscribed before the first
//!   publish takes its receive time. So the figure is MQTT publish to
//!   *consumer* receipt, an upper bound of publish to broker receipt; the
//!   JSON splits it with the message's event time (ferry: its group commit)
//!   and publish time (ferry: its SEND);
//! - **drain**: ferry runs with its Pulsar service URL at a closed local port
//!   while the backlog is published and stored; then it is stopped, pointed
//!   at the real broker and started again; the drain rate counts from its
//!   producer being ready to the last receipt (the restart is reported
//!   apart). The shared broker is never stopped;
//! - **downlink** (`downlink.rs`): ferry with a `[downlink]` section, caught
//!   up on an empty desired topic, one untimed warm-up update through the
//!   whole path; then the fleet writes `BENCH_DOWNLINK_N` (100,000) desired
//!   updates on one producer (window `BENCH_WINDOW`), round robin over
//!   `BENCH_DOWNLINK_DEVICES` (1,000) devices with versions rising per
//!   device, while an MQTT subscriber listens on every device's desired
//!   topic. Timed from the first write until the subscriber holds every
//!   device's last version. A version still in the store when a newer one of
//!   its device arrives is superseded, never published, so the rate beside
//!   ceiling B (both MQTT QoS 1 publishes to one subscriber) counts the
//!   versions ferry read *and applied* (`ferry_downlink_applied_total`); the
//!   versions read (`ferry_downlink_received_total`) per second are shown
//!   beside it, with the count superseded;
//! - **downlink latency**: one desired update every `1/BENCH_DOWNLINK_RATE`
//!   s (100/s, `BENCH_DOWNLINK_LATENCY_N`, 1,000, over `BENCH_DEVICES`
//!   devices), each carrying its write time (µs, as the message is built);
//!   the subscriber takes its receive time. Beside it, a plain Pulsar
//!   consumer of the same desired topic: the Pulsar leg without ferry;
//! - **large payloads** (`BENCH_ONLY=large`): the drain's two steps with
//!   `BENCH_LARGE_N` (10,000) payloads of `BENCH_LARGE_PAYLOAD` bytes
//!   (204,800: 200 KiB, under ferry's default `store.max_payload_bytes` of
//!   256 KiB). Ferry's defaults, except the store's budget
//!   (`store.max_bytes`, default 512 MiB), set to twice the payload bytes
//!   plus 64 MiB (at least 512 MiB) so that nothing is shed (and
//!   `store.max_payload_bytes` raised to the payload if that is over 256
//!   KiB). Printed: ferry's peak RSS (`VmHWM` of its process) while the
//!   payloads are published and
//!   stored (first process, Pulsar out of reach) and while they are drained
//!   (second process, from its start to the last record deleted), apart;
//!   the drain rate (producer ready to last receipt) in updates/s and MB/s
//!   (10^6 payload bytes); bytes written to disk per update (`write_bytes`
//!   of both processes over their steps, over the count). The topic is read
//!   back with a real consumer (payload bytes dropped as they arrive) and
//!   checked: count, lost, duplicated, out of order, payloads of the wrong
//!   size. The phase first checks `df` for four times the payload bytes
//!   free (store, WAL, the bookie's journal and entry log);
//! - **resources** from `/proc/<ferry pid>`: peak RSS (`VmHWM`, largest of
//!   every ferry process of the run except the large-payload line's), CPU
//!   (utime + stime) and `write_bytes` over the end-to-end passes, per update
//!   (the drain's are in the JSON).
//!
//! **The spread of the passes.** A line with timed passes runs
//! `BENCH_PASSES` (3) of them; if the three fastest of those differ by more
//! than 10% it runs more, one at a time, until the three fastest agree
//! within 10% or `BENCH_MAX_PASSES` (5) passes ran. The rate printed is the
//! fastest pass. The column "passes: spread" shows, for that line, the
//! number of passes run and the spread of all of them, (max - min) / max of
//! their rates in percent; when more than three ran, also the spread of the
//! three fastest ("best 3"). Any spread over 10% is followed by "> 10%".
//! Throughput lines measured once (the drain, the large payloads' drain,
//! downlink, ferry-fleet) say "1 pass, no spread"; latency and resource
//! rows leave it empty. In the JSON each line with passes has
//! `rates` (every pass, in order), `passes_run`, `spread_pct` and
//! `best3_spread_pct`.
//!
//! Results go to `target/bench/results.json` and `results.md`; ferry's
//! `/metrics` is sampled every second during its phases into
//! `target/bench/metrics-samples.jsonl` (`bench/render-dashboard` draws
//! `dashboards/ferry.png` from it). `BENCH_ONLY=a,b,...` runs some phases.
//!
//! The code: `mqtt.rs` (simulated devices and a subscriber), `pulsar_crate.rs`
//! (the `pulsar` crate's producer and consumer), `bare.rs` (the bare
//! producer), `observe.rs` (ferry's process, `/proc` and `/metrics`),
//! `ceilings.rs` (A, B, C, P, L), `ferry_phases.rs` (end to end, latency,
//! drain, large payloads), `downlink.rs` (the downlink's rate and latency),
//! `report.rs` (the table). The harness of the integration tests
//! (`tests/it/harness/`) starts the stack and ferry and reads topics back.

#[allow(dead_code)]
#[path = "../../tests/it/harness/mod.rs"]
mod harness;

mod bare;
mod ceilings;
mod downlink;
mod ferry_phases;
mod fleet;
mod mqtt;
mod observe;
mod pulsar_crate;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use harness::*;
use pulsar::{Pulsar, TokioExecutor};
use serde_json::{json, Value};

use ceilings::*;
use downlink::*;
use ferry_phases::*;
use observe::{kill_ferries_on_panic, Sampler};
use report::*;

/// The run's sizes, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    /// Updates per line.
    n: u64,
    /// Payload bytes per update.
    payload: usize,
    /// Simulated devices (MQTT topics and Pulsar keys), round robin.
    devices: usize,
    /// Updates in the drain's backlog.
    backlog: u64,
    /// Updates per second in the latency phase.
    rate: u64,
    /// Updates in the latency phase.
    latency_n: u64,
    /// Sends awaiting their receipt (ferry's `uplink.max_in_flight`).
    window: usize,
    /// Records per commit (ferry's `store.commit_max_batch`).
    batch: usize,
    /// Timed passes of each throughput line; the best one counts.
    passes: u64,
    /// Most passes of a line, if the three fastest do not agree within 10%.
    max_passes: u64,
    /// Payloads in the large-payload line.
    large_n: u64,
    /// Bytes of each of them.
    large_payload: usize,
    /// Desired updates the fleet writes in the downlink's throughput line.
    downlink_n: u64,
    /// Devices they go to, round robin (versions rise per device).
    downlink_devices: usize,
    /// Desired updates per second in the downlink's latency line.
    downlink_rate: u64,
    /// Desired updates in the downlink's latency line.
    downlink_latency_n: u64,
    /// Devices in `ferry-fleet replay`'s line.
    replay_devices: u64,
}

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let n = env_num("BENCH_N", 100_000);
        let passes = env_num("BENCH_PASSES", 3).max(1);
        Settings {
            n,
            payload: env_num("BENCH_PAYLOAD", 100) as usize,
            devices: env_num("BENCH_DEVICES", 100) as usize,
            backlog: env_num("BENCH_BACKLOG", 1_000_000),
            rate: env_num("BENCH_RATE", 1000),
            latency_n: env_num("BENCH_LATENCY_N", n),
            window: env_num("BENCH_WINDOW", 1000) as usize,
            batch: env_num("BENCH_BATCH", 1000) as usize,
            passes,
            max_passes: env_num("BENCH_MAX_PASSES", 5).max(passes),
            large_n: env_num("BENCH_LARGE_N", 10_000).max(1),
            large_payload: env_num("BENCH_LARGE_PAYLOAD", 200 * 1024).max(100) as usize,
            downlink_n: env_num("BENCH_DOWNLINK_N", 100_000),
            downlink_devices: env_num("BENCH_DOWNLINK_DEVICES", 1000).max(1) as usize,
            downlink_rate: env_num("BENCH_DOWNLINK_RATE", 100).max(1),
            downlink_latency_n: env_num("BENCH_DOWNLINK_LATENCY_N", 1000),
            replay_devices: env_num("BENCH_REPLAY_DEVICES", 100_000).max(1),
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn device_ids(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("dev-{i:04}")).collect()
}

/// One update as JSON, padded to `size` bytes: the device, its update
/// number `n` (the harness's `tally` reads both) and the publish time in µs.
fn payload(device: &str, n: u64, size: usize) -> Vec<u8> {
    let temp = 20.0 + (n % 50) as f64 / 10.0;
    let head = format!(
        "{{\"device\":\"{device}\",\"n\":{n},\"t_us\":{},\"temp_c\":{temp:.1},\"pad\":\"",
        now_us()
    );
    let pad = size.saturating_sub(head.len() + 2);
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(head.as_bytes());
    p.resize(head.len() + pad, b'x');
    p.extend_from_slice(b"\"}");
    p
}

/// The publish time carried by a payload.
fn payload_time_us(p: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(p).ok()?;
    v["t_us"].as_u64()
}

// ---------------------------------------------------------------------------
// What the phases share

struct Ctx {
    stack: &'static Stack,
    s: Settings,
    ns: Namespace,
    pulsar: Pulsar<TokioExecutor>,
    sampler: Sampler,
    out_dir: PathBuf,
    topics: Vec<String>,
    /// Peak RSS of every ferry process, kB, by phase.
    peaks: BTreeMap<String, u64>,
}

impl Ctx {
    fn topic(&mut self, local: &str) -> String {
        let t = self.ns.topic(local);
        self.topics.push(t.clone());
        t
    }
}

/// Passes whose rates differ by more than this (percent of the fastest) do
/// not agree.
pub const SPREAD_LIMIT_PCT: f64 = 10.0;

/// (max - min) / max of `rates`, in percent; `None` for fewer than two.
pub fn spread_pct(rates: &[f64]) -> Option<f64> {
    if rates.len() < 2 {
        return None;
    }
    let max = rates.iter().copied().fold(f64::MIN, f64::max);
    let min = rates.iter().copied().fold(f64::MAX, f64::min);
    (max > 0.0).then(|| 100.0 * (max - min) / max)
}

/// The spread of the three fastest of `rates` (of all of them if fewer).
pub fn best3_spread_pct(rates: &[f64]) -> Option<f64> {
    let mut sorted = rates.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted.truncate(3);
    spread_pct(&sorted)
}

/// Whether a line runs another timed pass: until `BENCH_PASSES` ran, then
/// while the three fastest differ by more than 10%, up to `BENCH_MAX_PASSES`.
fn another_pass(s: &Settings, passes: &[Value]) -> bool {
    let run = passes.len() as u64;
    if run < s.passes {
        return true;
    }
    if run >= s.max_passes {
        return false;
    }
    let rates: Vec<f64> = passes.iter().filter_map(|v| v["rate"].as_f64()).collect();
    best3_spread_pct(&rates).is_some_and(|p| p > SPREAD_LIMIT_PCT)
}

/// The best of several timed passes: the highest `rate`, with every
/// pass's rate in `rates` and their spreads (all of them, the three
/// fastest).
fn best_of(passes: Vec<Value>) -> Value {
    let rate = |v: &Value| v["rate"].as_f64().unwrap_or(0.0);
    let rates: Vec<f64> = passes.iter().map(rate).collect();
    let mut best = passes
        .into_iter()
        .max_by(|a, b| rate(a).total_cmp(&rate(b)))
        .unwrap_or_else(|| json!({}));
    best["passes_run"] = json!(rates.len());
    best["spread_pct"] = json!(spread_pct(&rates));
    best["best3_spread_pct"] = json!(best3_spread_pct(&rates));
    best["rates"] = json!(rates);
    best
}

// ---------------------------------------------------------------------------
// The run

/// Runs one phase, saying what it does and how it went.
/// `BENCH_ONLY` (a comma-separated list of keys: a, b, c, cycle, p, l, e2e,
/// latency, drain, large, downlink, fleet) runs only those phases.
async fn phase(
    key: &str,
    name: &str,
    f: impl std::future::Future<Output = Result<Value, String>>,
) -> Value {
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        if !only.split(',').any(|k| k.trim() == key) {
            return json!({ "skipped": true });
        }
    }
    println!("bench: {name} ...");
    let started = Instant::now();
    let v = match f.await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bench: {name} failed: {e}");
            json!({ "error": e })
        }
    };
    let took = started.elapsed().as_secs_f64();
    let f = |k: &str| v.get(k).and_then(Value::as_f64);
    match (f("rate"), f("p50_ms"), f("p99_ms")) {
        (_, Some(p50), Some(p99)) => {
            println!("bench: {name}: p50 {p50:.1} ms, p99 {p99:.1} ms ({took:.0} s)")
        }
        (Some(r), _, _) => println!(
            "bench: {name}: {} updates/s, {} ({took:.0} s)",
            fmt_rate(r),
            spread_cell(&v)
        ),
        _ => println!("bench: {name}: {v} ({took:.0} s)"),
    }
    v
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    kill_ferries_on_panic();
    let s = Settings::from_env();
    let out_dir = repo().join("target/bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    println!(
        "bench: {} updates of {} bytes per line, {} devices, {}-{} passes; drain of {}; latency at {}/s; {} large payloads of {} bytes; ferry {}",
        fmt_rate(s.n as f64),
        s.payload,
        s.devices,
        s.passes,
        s.max_passes,
        fmt_rate(s.backlog as f64),
        s.rate,
        fmt_rate(s.large_n as f64),
        fmt_rate(s.large_payload as f64),
        ferry_bin().display()
    );
    let stack = Stack::get();
    let ns = Namespace::create(stack, "bench").await;
    let pulsar = pulsar_crate::pulsar_client(stack).await;
    let mut ctx = Ctx {
        stack,
        s: s.clone(),
        ns,
        pulsar,
        sampler: Sampler::create(&out_dir.join("metrics-samples.jsonl")),
        out_dir: out_dir.clone(),
        topics: Vec::new(),
        peaks: BTreeMap::new(),
    };
    let run_started = Instant::now();

    let a_crate = phase(
        "a",
        "ceiling A, pulsar crate producer",
        ceiling_a_crate(&mut ctx),
    )
    .await;
    let a_bare = phase(
        "a",
        "ceiling A, bare protocol producer",
        ceiling_a_bare(&mut ctx),
    )
    .await;
    let b = phase(
        "b",
        "ceiling B, MQTT through Mosquitto",
        ceiling_b(&mut ctx),
    )
    .await;
    let c = phase("c", "ceiling C, SQLite group commit", async {
        ceiling_c_best(&ctx, ctx.s.batch, false)
    })
    .await;
    // Ferry's store also deletes every record after the broker's receipt:
    // the whole cycle, for comparison (not one of the ceilings).
    let cycle = phase("cycle", "ceiling C', SQLite insert and delete", async {
        ceiling_c_best(&ctx, ctx.s.batch, true)
    })
    .await;
    let p = phase(
        "p",
        "ceiling P, the pipeline without a store",
        ceiling_p(&mut ctx),
    )
    .await;
    let l = phase("l", "bound L, latency without a store", bound_l(&mut ctx)).await;
    let e2e = phase("e2e", "ferry end to end", ferry_end_to_end(&mut ctx)).await;
    let lat = phase("latency", "ferry latency", ferry_latency(&mut ctx)).await;
    let drain = phase(
        "drain",
        "ferry drain after an outage",
        ferry_drain(&mut ctx),
    )
    .await;
    let large = phase(
        "large",
        "ferry drain of large payloads after an outage",
        ferry_large(&mut ctx),
    )
    .await;
    let b_retained = phase(
        "downlink",
        "ceiling B_r, retained MQTT publishes to one topic per device",
        ceiling_b_retained(&mut ctx),
    )
    .await;
    let dl = phase(
        "downlink",
        "ferry downlink, desired updates to retained MQTT publishes",
        downlink_throughput(&mut ctx),
    )
    .await;
    let dl_backlog = phase(
        "downlink",
        "ferry downlink, a backlog of desired updates",
        downlink_backlog(&mut ctx),
    )
    .await;
    let dl_lat = phase(
        "downlink",
        "ferry downlink latency",
        downlink_latency(&mut ctx),
    )
    .await;

    let fleet_view = phase(
        "fleet",
        "ferry-fleet view on SQLite and PostgreSQL",
        fleet::fleet_view(&mut ctx),
    )
    .await;
    let replay_devices = s.replay_devices;
    let fleet_replay = phase(
        "fleet",
        "ferry-fleet replay",
        fleet::fleet_replay(&mut ctx, replay_devices),
    )
    .await;

    let per_update = |key: &str| {
        let n = e2e.get("updates").and_then(Value::as_f64)?;
        e2e.get(key).and_then(Value::as_f64).map(|v| v / n)
    };
    let resources = json!({
        "peak_rss_kb": ctx.peaks.values().max(),
        "peak_rss_kb_by_phase": ctx.peaks,
        "cpu_us_per_update": per_update("cpu_seconds").map(|v| v * 1e6),
        "write_bytes_per_update": per_update("write_bytes"),
        "measured_in": "end to end phase",
        "drain_cpu_us_per_update": drain.get("cpu_seconds").and_then(Value::as_f64)
            .map(|v| v * 1e6 / s.backlog as f64),
        "drain_write_bytes_per_update": drain.get("write_bytes").and_then(Value::as_f64)
            .map(|v| v / s.backlog as f64),
    });
    let results = json!({
        "date": today(),
        "machine": machine(),
        "ferry_bin": ferry_bin().display().to_string(),
        "seconds": run_started.elapsed().as_secs_f64(),
        "settings": {
            "n": s.n, "payload_bytes": s.payload, "devices": s.devices,
            "backlog": s.backlog, "latency_rate": s.rate, "latency_n": s.latency_n,
            "window": s.window, "batch": s.batch, "passes": s.passes,
            "max_passes": s.max_passes, "spread_limit_pct": SPREAD_LIMIT_PCT,
            "large_n": s.large_n, "large_payload_bytes": s.large_payload,
            "downlink_n": s.downlink_n, "downlink_devices": s.downlink_devices,
            "downlink_rate": s.downlink_rate,
            "downlink_latency_n": s.downlink_latency_n,
            "replay_devices": s.replay_devices,
        },
        "ceilings": {
            "a_pulsar_crate": a_crate, "a_pulsar_bare": a_bare,
            "b_mqtt": b, "c_sqlite": c, "l_no_store": l, "b_retained": b_retained,
        },
        "ferry": {
            "end_to_end": e2e, "latency": lat, "drain": drain, "resources": resources,
            "large": large,
            "downlink": dl, "downlink_backlog": dl_backlog, "downlink_latency": dl_lat,
        },
        "fleet": { "view": fleet_view, "replay": fleet_replay },
        "extra": { "c_sqlite_insert_and_delete": cycle, "p_pipeline_without_store": p },
    });
    let rows = rows(&results, &s);
    let table = plain_table(&rows);
    println!();
    print!("{table}");
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    let md = format!(
        "Figures from one run on {}, {}: {} updates of {} bytes per line, {} devices, drain of {}.\n\n{}",
        results["date"].as_str().unwrap_or(""),
        results["machine"].as_str().unwrap_or(""),
        fmt_rate(s.n as f64),
        s.payload,
        s.devices,
        fmt_rate(s.backlog as f64),
        markdown(&rows)
    );
    std::fs::write(out_dir.join("results.md"), md).unwrap();
    println!(
        "\nbench: {:.0} s; results in {}/results.{{json,md}}, metrics samples in metrics-samples.jsonl",
        run_started.elapsed().as_secs_f64(),
        out_dir.display()
    );
    let admin = stack.admin_api();
    for t in &ctx.topics {
        admin.delete_topic(t).await;
    }
}
