//! Ferry's own lines: end to end (best of the passes, with CPU, disk writes
//! and the topic checked), latency at a fixed rate, and the drain of a
//! backlog stored while Pulsar was out of reach.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{read_topic, tally, unique, Ferry};
use crate::mqtt::{publish_updates, Pace, Updates};
use crate::observe::*;
use crate::pulsar_crate::{arrivals, latency_summary};
use crate::{best_of, device_ids, Ctx};

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
    for k in 0..ctx.s.passes {
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

    let all = n * ctx.s.passes;
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
    let prefix = unique("bench-drain");
    let backlog = ctx.s.backlog;
    let mut ferry = Ferry::new(
        ctx.stack,
        "bench-drain",
        &unique("gw"),
        &format!("{prefix}/+/state"),
        &topic,
        "",
    );
    ferry.cut_off_pulsar();
    ferry.start();
    let pid = ferry_pid(&ferry)?;
    ferry
        .wait_log("mqtt subscribed", Duration::from_secs(60))
        .await;
    let before = proc_sample(pid)?;

    // The outage: publish and store the backlog.
    let started = Instant::now();
    let publishing = tokio::spawn(publish_updates(Updates::new(
        ctx,
        &prefix,
        backlog,
        Pace::Burst,
    )));
    let limit = Duration::from_secs(300 + backlog / 500);
    let (_, stored_at) = ctx
        .sampler
        .until(&ferry, "outage", limit, "the whole backlog stored", |m| {
            total(m, STORED) >= backlog as f64
        })
        .await?;
    let fill_secs = stored_at.duration_since(started).as_secs_f64();
    let filled = proc_sample(pid)?;
    publishing.await.map_err(|e| e.to_string())??;
    ctx.sampler.poll(&ferry, "outage").await;
    ferry.terminate();
    ctx.peaks.insert("outage".into(), filled.hwm_kb);

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
            "drain",
            Duration::from_secs(120),
            "producer ready",
            up,
        )
        .await?;
    let limit = Duration::from_secs(300 + backlog / 500);
    let (m, end) = ctx
        .sampler
        .until(&ferry, "drain", limit, "every receipt", |m| {
            total(m, ACKED) + total(m, SKIPPED) + total(m, SUPERSEDED) + total(m, DROPPED)
                >= backlog as f64
        })
        .await?;
    let drained = proc_sample(pid)?;
    ctx.peaks.insert("drain".into(), drained.hwm_kb);
    ferry
        .wait_drained(backlog as i64, Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ctx.sampler.poll(&ferry, "drain").await;
    ferry.terminate();
    let entries = ctx
        .stack
        .admin_api()
        .try_entries_in_topic(&topic)
        .await
        .ok();
    // The backlog's store is large; keep the config and the log.
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", ferry.store_path().display()));
    }

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
        "outage": {
            "store_rate": backlog as f64 / fill_secs,
            "seconds": fill_secs,
            "cpu_seconds": filled.cpu_s - before.cpu_s,
            "write_bytes": filled.write_bytes - before.write_bytes,
        },
    }))
}
