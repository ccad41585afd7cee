//! Ferry's own lines: end to end (best of the passes, with CPU, disk writes
//! and the topic checked), latency at a fixed rate, the drain of a backlog
//! stored while Pulsar was out of reach, and the same with large payloads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ceilings::remove_store;
use crate::harness::{read_topic, tally, unique, Ferry};
use crate::mqtt::{publish_updates, Pace, Updates};
use crate::observe::*;
use crate::pulsar_crate::{arrivals, latency_summary, read_slim};
use crate::{another_pass, best_of, device_ids, Ctx};

/// Ferry end to end: sustained rate from MQTT publish to broker receipt,
/// best of the passes on one ferry; CPU and disk writes over all of them.
pub async fn ferry_end_to_end(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("end-to-end");
    let prefix = unique("bench-e2e");
    let n = ctx.s.n;
    let (mut ferry, pid) = start_ferry(ctx.stack, "bench-e2e", &prefix, &topic, "").await?;
    let up = |m: &BTreeMap<String, f64>| total(m, UPLINK_UP) >= 1.0;
    ctx.sampler
        .until(
            &ferry,
            "end to end",
            Duration::from_secs(60),
            "producer ready",
            up,
        )
        .await?;
    let before = proc_sample(pid)?;
    let (others_before, machine_before) = (others_cpu(), machine_ticks());
    let mut passes = Vec::new();
    let mut m = BTreeMap::new();
    while another_pass(&ctx.s, &passes) {
        let k = passes.len() as u64;
        let started = Instant::now();
        let updates = Updates::new(ctx, &prefix, n, Pace::Burst).starting_at(k * n);
        let publishing = tokio::spawn(publish_updates(updates));
        let want = ((k + 1) * n) as f64;
        let limit = Duration::from_secs(180 + n / 200);
        let (scraped, end) = ctx
            .sampler
            .until(&ferry, "end to end", limit, "every receipt", |m| {
                total(m, ACKED) >= want
            })
            .await?;
        let published = publishing.await.map_err(|e| e.to_string())??;
        let secs = end.duration_since(started).as_secs_f64();
        passes.push(json!({
            "rate": n as f64 / secs,
            "seconds": secs,
            "mqtt_publisher_seconds": published.as_secs_f64(),
        }));
        m = scraped;
    }
    let after = proc_sample(pid)?;
    let (others_after, machine_after) = (others_cpu(), machine_ticks());
    ctx.peaks.insert("end to end".into(), after.hwm_kb);
    // Where the machine's CPU went during the passes.
    let mut cpu_by_process: BTreeMap<&str, f64> = others_after
        .iter()
        .map(|(k, v)| (*k, v - others_before.get(k).copied().unwrap_or(0.0)))
        .collect();
    cpu_by_process.insert("ferry", after.cpu_s - before.cpu_s);
    let machine_busy =
        (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0);
    // A last sample after the stream, for the dashboard.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ctx.sampler.poll(&ferry, "end to end").await;
    ferry.terminate();

    let all = n * passes.len() as u64;
    let msgs = read_topic(
        ctx.stack,
        &topic,
        false,
        all as usize,
        Duration::from_secs(30),
    )
    .await;
    let per_device = all / ctx.s.devices as u64;
    let t = tally(&msgs, &device_ids(ctx.s.devices), per_device);
    let commits = total(&m, COMMITS);
    let mut v = best_of(passes);
    let more = json!({
        "updates": all,
        "cpu_seconds": after.cpu_s - before.cpu_s,
        "write_bytes": after.write_bytes - before.write_bytes,
        "peak_rss_kb": after.hwm_kb,
        "commits": commits,
        "records_per_commit": total(&m, STORED) / commits.max(1.0),
        "mean_commit_ms": 1000.0 * total(&m, COMMIT_SECONDS) / commits.max(1.0),
        "cpu_seconds_by_process": cpu_by_process,
        "machine_cpu_busy": machine_busy,
        "topic_check": {
            "received": t.received, "lost": t.lost,
            "duplicated": t.duplicated, "out_of_order": t.out_of_order,
        },
    });
    for (k, x) in more.as_object().expect("object") {
        v[k] = x.clone();
    }
    Ok(v)
}

/// Latency through ferry at the fixed rate.
pub async fn ferry_latency(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("latency");
    let prefix = unique("bench-lat");
    let n = ctx.s.latency_n;
    let (mut ferry, pid) = start_ferry(ctx.stack, "bench-latency", &prefix, &topic, "").await?;
    let up = |m: &BTreeMap<String, f64>| total(m, UPLINK_UP) >= 1.0;
    ctx.sampler
        .until(
            &ferry,
            "latency",
            Duration::from_secs(60),
            "producer ready",
            up,
        )
        .await?;
    let reading = arrivals(&ctx.pulsar, &topic, n, Duration::from_secs(30)).await;
    let before = proc_sample(pid)?;
    let pace = Pace::PerSecond(ctx.s.rate);
    let publishing = tokio::spawn(publish_updates(Updates::new(ctx, &prefix, n, pace)));
    while !publishing.is_finished() {
        ctx.sampler.poll(&ferry, "latency").await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    publishing.await.map_err(|e| e.to_string())??;
    let arr = reading.await.map_err(|e| e.to_string())?;
    let after = proc_sample(pid)?;
    ctx.peaks.insert("latency".into(), after.hwm_kb);
    ferry.terminate();
    if (arr.len() as u64) < n {
        return Err(format!("latency: {} of {n} messages arrived", arr.len()));
    }
    let mut v = latency_summary(&arr);
    v["rate"] = json!(ctx.s.rate);
    // What the fixed rate costs: a gateway's usual load, where the group
    // commit's wait decides how many commits (and page writes) there are.
    v["cpu_us_per_update"] = json!((after.cpu_s - before.cpu_s) * 1e6 / n as f64);
    v["write_bytes_per_update"] = json!((after.write_bytes - before.write_bytes) as f64 / n as f64);
    Ok(v)
}

/// The drain: a backlog stored while Pulsar is unreachable, then emptied.
pub async fn ferry_drain(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("drain");
    let outage = Outage {
        name: "drain",
        count: ctx.s.backlog,
        size: ctx.s.payload,
        store_settings: String::new(),
    };
    let v = outage_then_drain(ctx, &topic, &outage).await?;
    for (phase, hwm) in [
        ("outage", &v["outage"]["peak_rss_kb"]),
        ("drain", &v["peak_rss_kb"]),
    ] {
        if let Some(kb) = hwm.as_u64() {
            ctx.peaks.insert(phase.into(), kb);
        }
    }
    Ok(v)
}

/// The large-payload line: the drain's two steps with `BENCH_LARGE_N`
/// payloads of `BENCH_LARGE_PAYLOAD` bytes, ferry's peak RSS in each, and
/// the topic read back and checked.
pub async fn ferry_large(ctx: &mut Ctx) -> Result<Value, String> {
    let (count, size) = (ctx.s.large_n, ctx.s.large_payload);
    let payload_bytes = count * size as u64;
    // The store, its WAL, the bookie's journal and its entry log.
    let needed = 4 * payload_bytes;
    let free = free_bytes(&ctx.out_dir)?;
    if free < needed {
        return Err(format!(
            "large payloads: {} MB free on {}, {} MB needed (4 × {count} × {size} bytes); set BENCH_LARGE_N lower",
            free / 1_000_000,
            ctx.out_dir.display(),
            needed / 1_000_000
        ));
    }
    // The store's budget (default 512 MiB) over the whole backlog, so that
    // nothing is shed; the payload limit (default 256 KiB) raised if needed.
    let max_bytes = (2 * payload_bytes + (64 << 20)).max(512 << 20);
    let mut store_settings = format!("max_bytes = {max_bytes}");
    if size > 256 * 1024 {
        store_settings.push_str(&format!("\nmax_payload_bytes = {size}"));
    }
    let topic = ctx.topic("large");
    let outage = Outage {
        name: "large",
        count,
        size,
        store_settings: store_settings.clone(),
    };
    let mut v = outage_then_drain(ctx, &topic, &outage).await?;
    let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
    v["mb_per_s"] = json!(payload_bytes as f64 / secs / 1e6);
    let written = |v: &Value| v["write_bytes"].as_f64().unwrap_or(f64::NAN);
    let (stored_w, drained_w) = (written(&v["outage"]), written(&v));
    v["write_bytes_per_update"] = json!({
        "stored": stored_w / count as f64,
        "drained": drained_w / count as f64,
        "total": (stored_w + drained_w) / count as f64,
    });
    v["payload_bytes"] = json!(size);
    v["store_settings"] = json!(store_settings);

    let (msgs, wrong_size) =
        read_slim(&ctx.pulsar, &topic, count, size, Duration::from_secs(30)).await?;
    // Duplicates and order per device by the harness's tally; lost from the
    // count of distinct updates (a count that is not a multiple of the
    // devices gives the first devices one more, which the tally does not
    // expect).
    let t = tally(
        &msgs,
        &device_ids(ctx.s.devices),
        count / ctx.s.devices as u64,
    );
    v["topic_check"] = json!({
        "expected": count,
        "received": t.received,
        "lost": (count as usize).saturating_sub(t.received - t.duplicated),
        "duplicated": t.duplicated,
        "out_of_order": t.out_of_order,
        "wrong_size": wrong_size,
    });
    Ok(v)
}

/// Bytes free on the file system of `dir` (`df`).
fn free_bytes(dir: &std::path::Path) -> Result<u64, String> {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .map_err(|e| format!("df: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("df {}: no figure", dir.display()))
}

/// What [`outage_then_drain`] stores and drains.
struct Outage {
    /// Its name: the ferry's folder (`bench-<name>`), the MQTT prefix and the
    /// sampler's phases (`<name> outage`, `<name> drain`; the drain's own
    /// are `outage` and `drain`).
    name: &'static str,
    /// Updates published and stored.
    count: u64,
    /// Payload bytes of each.
    size: usize,
    /// TOML lines added to the config's `[store]`.
    store_settings: String,
}

/// A backlog stored while Pulsar is unreachable, then emptied: ferry runs
/// with its service URL at a closed local port while `count` updates are
/// published and stored; then it is stopped, pointed at the real broker and
/// started again. The rate counts from its producer being ready to the last
/// receipt. `peak_rss_kb` of each process (`VmHWM`) is read just before it
/// is stopped.
async fn outage_then_drain(ctx: &mut Ctx, topic: &str, o: &Outage) -> Result<Value, String> {
    let prefix = unique(&format!("bench-{}", o.name));
    let backlog = o.count;
    let (outage_phase, drain_phase) = if o.name == "drain" {
        ("outage".to_string(), "drain".to_string())
    } else {
        (format!("{} outage", o.name), format!("{} drain", o.name))
    };
    let mut ferry = Ferry::new(
        ctx.stack,
        &format!("bench-{}", o.name),
        &unique("gw"),
        &format!("{prefix}/+/state"),
        topic,
        "",
    );
    ferry.add_settings("store", &o.store_settings);
    ferry.cut_off_pulsar();
    ferry.start();
    let pid = ferry_pid(&ferry)?;
    ferry
        .wait_log("mqtt subscribed", Duration::from_secs(60))
        .await;
    let before = proc_sample(pid)?;

    // The outage: publish and store the backlog.
    let started = Instant::now();
    let updates = Updates::new(ctx, &prefix, backlog, Pace::Burst).sized(o.size);
    let publishing = tokio::spawn(publish_updates(updates));
    // A second per 500 updates of 100 bytes, or per 50 kB.
    let slack = backlog.max(backlog * o.size as u64 / 100) / 500;
    let limit = Duration::from_secs(300 + slack);
    let (_, stored_at) = ctx
        .sampler
        .until(
            &ferry,
            &outage_phase,
            limit,
            "the whole backlog stored",
            |m| total(m, STORED) >= backlog as f64,
        )
        .await?;
    let fill_secs = stored_at.duration_since(started).as_secs_f64();
    let filled = proc_sample(pid)?;
    publishing.await.map_err(|e| e.to_string())??;
    ctx.sampler.poll(&ferry, &outage_phase).await;
    let outage_end = proc_sample(pid)?;
    ferry.terminate();

    // The uplink returns: restart ferry pointed at the real broker.
    ferry.restore_pulsar();
    let restarted = Instant::now();
    ferry.start();
    let pid = ferry_pid(&ferry)?;
    let before_drain = proc_sample(pid)?;
    let up = |m: &BTreeMap<String, f64>| total(m, UPLINK_UP) >= 1.0;
    let (_, ready) = ctx
        .sampler
        .until(
            &ferry,
            &drain_phase,
            Duration::from_secs(120),
            "producer ready",
            up,
        )
        .await?;
    let (m, end) = ctx
        .sampler
        .until(&ferry, &drain_phase, limit, "every receipt", |m| {
            total(m, ACKED) + total(m, SKIPPED) + total(m, SUPERSEDED) + total(m, DROPPED)
                >= backlog as f64
        })
        .await?;
    let drained = proc_sample(pid)?;
    ferry
        .wait_drained(backlog as i64, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ctx.sampler.poll(&ferry, &drain_phase).await;
    let drain_end = proc_sample(pid)?;
    ferry.terminate();
    let entries = ctx.stack.admin_api().try_entries_in_topic(topic).await.ok();
    // The backlog's store is large; keep the config and the log.
    remove_store(&ferry.store_path());

    let drain_secs = end.duration_since(ready).as_secs_f64();
    Ok(json!({
        "rate": backlog as f64 / drain_secs,
        "seconds": drain_secs,
        "restart_to_ready_seconds": ready.duration_since(restarted).as_secs_f64(),
        "rate_from_restart": backlog as f64 / end.duration_since(restarted).as_secs_f64(),
        "acknowledged": total(&m, ACKED),
        "skipped_on_resume": total(&m, SKIPPED),
        "shed": total(&m, SUPERSEDED) + total(&m, DROPPED),
        "entries_in_topic": entries,
        "cpu_seconds": drained.cpu_s - before_drain.cpu_s,
        "write_bytes": drained.write_bytes - before_drain.write_bytes,
        "peak_rss_kb": drain_end.hwm_kb,
        "outage": {
            "store_rate": backlog as f64 / fill_secs,
            "seconds": fill_secs,
            "cpu_seconds": filled.cpu_s - before.cpu_s,
            "write_bytes": filled.write_bytes - before.write_bytes,
            "peak_rss_kb": outage_end.hwm_kb,
        },
    }))
}
