//! The downlink's lines: desired updates written by the fleet to the
//! gateway's desired topic, carried by ferry to retained QoS 1 publishes on
//! `<prefix>/<device>/desired`, received by one MQTT subscriber. Throughput
//! (against ceiling B) and latency at a fixed rate.
//!
//! Each phase starts its own ferry with a `[downlink]` section on a desired
//! topic the fleet's producer created (empty, so ferry is caught up at once)
//! and sends one untimed warm-up update through the whole path, so the
//! reader and the applier's MQTT session are up. The subscriber is on
//! before the first timed write.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulsar::producer::{Message, SendFuture};
use pulsar::{Pulsar, TokioExecutor};
use serde_json::{json, Value};

use crate::harness::{
    document, downlink_section, unique, DeviceSide, Ferry, Fleet, Publisher, Stack,
};
use crate::mqtt::{subscribe, Publisher as MqttPublisher};
use crate::observe::*;
use crate::pulsar_crate::{arrivals, latency_summary, quantile, raw_producer};
use crate::{device_ids, now_us, payload, Ctx};

pub const RECEIVED: &str = "ferry_downlink_received_total";
pub const PUBLISHED: &str = "ferry_downlink_published_total";
pub const APPLIED: &str = "ferry_downlink_applied_total";
pub const STALE: &str = "ferry_downlink_stale_total";

/// The device of the warm-up update (its document has no write time: the
/// timed subscriber ignores it).
const WARM_UP: &str = "warm-up";

/// One phase's ferry with its downlink, and where things go.
struct Setup {
    ferry: Ferry,
    pid: u32,
    desired: String,
    prefix: String,
}

async fn start(ctx: &mut Ctx, phase: &str) -> Result<Setup, String> {
    let desired = ctx.topic(&format!("{phase}-desired"));
    let acks = ctx.topic(&format!("{phase}-acks"));
    let status = ctx.topic(&format!("{phase}-status"));
    let prefix = unique(phase);
    // A producer creates the topic: ferry then finds it empty, caught up.
    drop(Fleet::connect(ctx.stack, &desired).await);
    let section = downlink_section(&desired, &acks, &prefix);
    let (ferry, pid) = start_ferry(ctx.stack, phase, &prefix, &status, &section).await?;
    // Untimed: one desired state through the whole path, so the reader,
    // the store and the applier's MQTT session are all up.
    let side = DeviceSide::subscribe(ctx.stack, &prefix).await;
    let mut fleet = Fleet::connect(ctx.stack, &desired).await;
    fleet.desire(WARM_UP, 1, &document(WARM_UP, 1)).await;
    let up = [WARM_UP.to_string()];
    side.wait_versions(&up, Duration::from_secs(60), |_| 1)
        .await;
    side.disconnect().await;
    Ok(Setup {
        ferry,
        pid,
        desired,
        prefix,
    })
}

/// Update `i` of a stream round robin over `devices`: device `i % D`, its
/// version `i / D + 1` (versions rise per device from 1).
fn update(devices: &[String], i: u64) -> (&str, u64) {
    let d = devices.len() as u64;
    (&devices[(i % d) as usize], i / d + 1)
}

/// The last version each device gets from updates `0..n`.
fn last_versions(devices: &[String], n: u64) -> HashMap<String, u64> {
    (0..n)
        .map(|i| update(devices, i))
        .fold(HashMap::new(), |mut m, (d, v)| {
            m.insert(d.to_string(), v);
            m
        })
}

/// What the subscriber saw.
#[derive(Default)]
struct Seen {
    /// Publishes received.
    count: u64,
    /// Per device, the newest version received.
    newest: HashMap<String, u64>,
    /// Publishes whose version was below one the device already had (a
    /// promise of ferry's: always 0).
    went_down: u64,
    /// Devices that reached their last version.
    complete: usize,
    /// When the last device reached its last version.
    done_at: Option<Instant>,
    /// The fleet's write (the payload's `t_us`) to receipt, ms, each publish.
    latency_ms: Vec<f64>,
}

/// A QoS 1 subscriber on `<prefix>/+/desired` that records what came and
/// when every device had reached its version in `last`.
async fn watch(
    stack: &Stack,
    prefix: &str,
    last: HashMap<String, u64>,
) -> (rumqttc::AsyncClient, Arc<Mutex<Seen>>) {
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let record = seen.clone();
    let head = format!("{prefix}/");
    let sub = subscribe(stack, &format!("{prefix}/+/desired"), move |p| {
        let at = now_us();
        let device = p
            .topic
            .strip_prefix(&head)
            .and_then(|t| t.strip_suffix("/desired"))
            .unwrap_or_default();
        let doc: Value = serde_json::from_slice(&p.payload).unwrap_or_default();
        let (Some(version), Some(written)) = (doc["n"].as_u64(), doc["t_us"].as_u64()) else {
            return;
        };
        let mut s = record.lock().unwrap();
        s.count += 1;
        s.latency_ms.push((at as f64 - written as f64) / 1000.0);
        let before = s.newest.insert(device.to_string(), version).unwrap_or(0);
        if version < before {
            s.went_down += 1;
            s.newest.insert(device.to_string(), before);
        }
        if before < version && last.get(device) == Some(&version) {
            s.complete += 1;
            if s.complete == last.len() {
                s.done_at = Some(Instant::now());
            }
        }
    })
    .await;
    (sub, seen)
}

/// Waits until every device reached its last version, sampling ferry's
/// metrics meanwhile; returns when that happened.
async fn wait_done(
    ctx: &mut Ctx,
    ferry: Option<&Ferry>,
    phase: &str,
    seen: &Mutex<Seen>,
    limit: Duration,
) -> Result<Instant, String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(at) = seen.lock().unwrap().done_at {
            return Ok(at);
        }
        if Instant::now() > deadline {
            let s = seen.lock().unwrap();
            return Err(format!(
                "{phase}: {} devices reached their last version in {limit:?} ({} publishes received)",
                s.complete, s.count
            ));
        }
        if let Some(ferry) = ferry {
            ctx.sampler.poll(ferry, phase).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clears the retained desired states the phase left on the broker.
async fn clear_retained(stack: &Stack, prefix: &str, devices: &[String]) {
    let mut p = Publisher::connect(stack).await;
    for d in devices.iter().map(String::as_str).chain([WARM_UP]) {
        p.publish_retained(&format!("{prefix}/{d}/desired"), Vec::new())
            .await;
    }
    p.wait_acked(devices.len() + 1).await;
    p.disconnect().await;
}

/// The fleet's message for `device` at `version`, as the harness's
/// `Fleet::desire` writes it: key = device, property `version`.
fn desired_message(device: &str, version: u64, payload: Vec<u8>) -> Message {
    Message {
        payload,
        partition_key: Some(device.to_string()),
        properties: [("version".to_string(), version.to_string())].into(),
        ..Default::default()
    }
}

/// The fleet writes updates `0..n` on one producer with at most `window`
/// awaiting their receipt (one producer: each device's versions reach the
/// topic in order); returns when every receipt arrived, with the time that
/// took. (`Fleet::desire` awaits each receipt, a few ms on this broker.)
async fn write_all(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    devices: &[String],
    n: u64,
    window: usize,
    size: usize,
) -> Result<Duration, String> {
    let mut producer = raw_producer(pulsar, topic).await;
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for i in 0..n {
        if pending.len() >= window {
            let oldest: SendFuture = pending.pop_front().expect("window is full");
            oldest.await.map_err(|e| format!("receipt: {e}"))?;
        }
        let (d, v) = update(devices, i);
        let f = producer
            .send_non_blocking(desired_message(d, v, payload(d, v, size)))
            .await
            .map_err(|e| format!("send: {e}"))?;
        pending.push_back(f);
    }
    while let Some(f) = pending.pop_front() {
        f.await.map_err(|e| format!("receipt: {e}"))?;
    }
    let took = started.elapsed();
    let _ = producer.close().await;
    Ok(took)
}

/// Downlink throughput. The fleet writes `BENCH_DOWNLINK_N` updates round
/// robin over `BENCH_DOWNLINK_DEVICES` devices (versions rising per device)
/// while ferry runs. Timed from the first write until the subscriber holds
/// every device's last version. A version still waiting in the store when
/// a newer one of its device arrives is superseded, never published, so
/// the rate that compares with ceiling B (MQTT publishes to one subscriber)
/// is the versions ferry read *and applied* (published, PUBACKed, recorded:
/// `ferry_downlink_applied_total`) per second; the versions read
/// (`ferry_downlink_received_total`, every one written) per second are
/// reported beside it.
pub async fn downlink_throughput(ctx: &mut Ctx) -> Result<Value, String> {
    let (n, window) = (ctx.s.downlink_n, ctx.s.window);
    let devices = device_ids(ctx.s.downlink_devices);
    let Setup {
        mut ferry,
        pid,
        desired,
        prefix,
    } = start(ctx, "bench-downlink").await?;
    let (sub, seen) = watch(ctx.stack, &prefix, last_versions(&devices, n)).await;
    let before = proc_sample(pid)?;
    // Counters from here on (the warm-up is in them).
    let m0 = ctx.sampler.poll(&ferry, "downlink").await;
    let started = Instant::now();
    let writing = tokio::spawn({
        let (pulsar, devices) = (ctx.pulsar.clone(), devices.clone());
        let size = ctx.s.payload;
        async move { write_all(&pulsar, &desired, &devices, n, window, size).await }
    });
    let limit = Duration::from_secs(120 + n / 200);
    let end = wait_done(ctx, Some(&ferry), "downlink", &seen, limit).await;
    let fleet = writing.await.map_err(|e| e.to_string())?;
    let end = end?;
    let fleet = fleet?;
    let after = proc_sample(pid)?;
    // The applied count once the last PUBACKs are recorded.
    let (m1, _) = ctx
        .sampler
        .until(
            &ferry,
            "downlink",
            Duration::from_secs(30),
            "every publish applied",
            |m| total(m, APPLIED) >= total(m, PUBLISHED),
        )
        .await?;
    let delta = |name: &str| total(&m1, name) - total(&m0, name);
    ctx.peaks.insert("downlink".into(), after.hwm_kb);
    ferry.terminate();
    let _ = sub.disconnect().await;
    clear_retained(ctx.stack, &prefix, &devices).await;

    let secs = end.duration_since(started).as_secs_f64();
    let (received, applied, stale) = (delta(RECEIVED), delta(APPLIED), delta(STALE));
    let s = seen.lock().unwrap();
    Ok(json!({
        "rate": applied / secs,
        "read_rate": received / secs,
        "seconds": secs,
        "written": n,
        "devices": devices.len(),
        "fleet_window": window,
        "fleet_seconds": fleet.as_secs_f64(),
        "received": received,
        "published": delta(PUBLISHED),
        "applied": applied,
        "stale": stale,
        "superseded": received - applied - stale,
        "subscriber_received": s.count,
        "subscriber_went_down": s.went_down,
        "cpu_seconds": after.cpu_s - before.cpu_s,
        "write_bytes": after.write_bytes - before.write_bytes,
    }))
}

/// Downlink latency: the fleet writes one update every `1 /
/// BENCH_DOWNLINK_RATE` s (`BENCH_DOWNLINK_LATENCY_N` of them, round robin
/// over `BENCH_DEVICES` devices, versions rising), each stamped with its
/// write time (µs, taken as the message is built); the subscriber takes its
/// receive time. Fleet write to subscriber receipt, over every publish.
/// Beside it, a plain Pulsar consumer of the desired topic times the same
/// messages (write to consumer receipt, and the broker's publish time): the
/// Pulsar leg without ferry, the store and Mosquitto.
pub async fn downlink_latency(ctx: &mut Ctx) -> Result<Value, String> {
    let (n, rate) = (ctx.s.downlink_latency_n, ctx.s.downlink_rate.max(1));
    let devices = device_ids(ctx.s.devices);
    let Setup {
        mut ferry,
        desired,
        prefix,
        ..
    } = start(ctx, "bench-downlink-latency").await?;
    let (sub, seen) = watch(ctx.stack, &prefix, last_versions(&devices, n)).await;
    // The same messages read by a plain consumer: the Pulsar leg alone.
    let reading = arrivals(&ctx.pulsar, &desired, n, Duration::from_secs(30)).await;
    let writing = tokio::spawn({
        let (stack, devices) = (ctx.stack.clone(), devices.clone());
        let size = ctx.s.payload;
        async move {
            let mut fleet = Fleet::connect(&stack, &desired).await;
            let start = tokio::time::Instant::now();
            let mut late = 0u64;
            for i in 0..n {
                let due = start + Duration::from_micros(i * 1_000_000 / rate);
                if tokio::time::Instant::now() > due + Duration::from_millis(1) {
                    late += 1;
                }
                tokio::time::sleep_until(due).await;
                let (d, v) = update(&devices, i);
                fleet.desire(d, v, &payload(d, v, size)).await;
            }
            late
        }
    });
    let limit = Duration::from_secs(60 + n / rate);
    let end = wait_done(ctx, Some(&ferry), "downlink latency", &seen, limit).await;
    let late = writing.await.map_err(|e| e.to_string())?;
    end?;
    let consumer = latency_summary(&reading.await.map_err(|e| e.to_string())?);
    ferry.terminate();
    let _ = sub.disconnect().await;
    clear_retained(ctx.stack, &prefix, &devices).await;

    let s = seen.lock().unwrap();
    let mut ms = s.latency_ms.clone();
    ms.sort_by(f64::total_cmp);
    Ok(json!({
        "rate": rate,
        "count": ms.len(),
        "written": n,
        "p50_ms": quantile(&ms, 0.5),
        "p90_ms": quantile(&ms, 0.9),
        "p99_ms": quantile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(f64::NAN),
        "writes_late_over_1ms": late,
        "subscriber_went_down": s.went_down,
        "pulsar_consumer": consumer,
    }))
}

/// Ceiling B_r, the downlink's MQTT leg alone: one client publishes
/// `BENCH_DOWNLINK_N` retained QoS 1 messages, one to each device's desired
/// topic, 1,000 awaiting their PUBACK at most (ferry's applier's window), and
/// the same subscriber as ferry's lines receives them. Retained publishes to
/// as many topics cost Mosquitto more than ceiling B's plain ones.
pub async fn ceiling_b_retained(ctx: &mut Ctx) -> Result<Value, String> {
    let n = ctx.s.downlink_n;
    let devices = device_ids(n as usize);
    let prefix = unique("bench-b-retained");
    let (sub, seen) = watch(ctx.stack, &prefix, last_versions(&devices, n)).await;
    let started = Instant::now();
    let mut p = MqttPublisher::with_inflight(ctx.stack, "bench-b-retained", 1000).await;
    for d in &devices {
        p.publish_as(
            format!("{prefix}/{d}/desired"),
            payload(d, 1, ctx.s.payload),
            true,
        )
        .await?;
    }
    let limit = Duration::from_secs(120 + n / 200);
    let end = wait_done(ctx, None, "ceiling B_r", &seen, limit).await;
    p.disconnect().await;
    let _ = sub.disconnect().await;
    clear_retained(ctx.stack, &prefix, &devices).await;
    let secs = end?.duration_since(started).as_secs_f64();
    Ok(json!({ "rate": n as f64 / secs, "seconds": secs, "devices": n }))
}

/// How long a plain Pulsar consumer (the `pulsar` crate's, non-durable,
/// from the earliest message, no acknowledgements, as ferry's reader)
/// takes to receive `n` messages of `topic`.
async fn plain_read(pulsar: &Pulsar<TokioExecutor>, topic: &str, n: u64) -> Result<f64, String> {
    use futures::StreamExt;
    use pulsar::consumer::{ConsumerOptions, InitialPosition};
    let started = Instant::now();
    let mut consumer: pulsar::Consumer<Vec<u8>, TokioExecutor> = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(unique("bench-plain-read"))
        .with_subscription_type(pulsar::SubType::Exclusive)
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            durable: Some(false),
            ..Default::default()
        })
        .build()
        .await
        .map_err(|e| format!("plain consumer: {e}"))?;
    let mut got = 0u64;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            other => {
                return Err(format!(
                    "plain consumer: {got} of {n} messages, then {}",
                    match other {
                        Ok(Some(Err(e))) => e.to_string(),
                        Ok(None) => "the end of the stream".into(),
                        _ => "30 s of silence".into(),
                    }
                ))
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let _ = consumer.close().await;
    Ok(secs)
}

/// Downlink throughput on a backlog, the pipeline's own speed: with ferry
/// stopped (caught up on the topic before), the fleet writes
/// `BENCH_DOWNLINK_N` updates, one version each to as many devices, so that
/// none is superseded and the writer's own rate does not count; then ferry
/// starts. Timed from its start until the subscriber holds every device's
/// version: desired updates read from Pulsar, stored, published retained
/// at QoS 1, PUBACKed, recorded and acknowledged to the fleet, per second.
pub async fn downlink_backlog(ctx: &mut Ctx) -> Result<Value, String> {
    let (n, window) = (ctx.s.downlink_n, ctx.s.window);
    let devices = device_ids(n as usize);
    let Setup {
        mut ferry,
        desired,
        prefix,
        ..
    } = start(ctx, "bench-downlink-backlog").await?;
    ferry.terminate();
    let fleet = write_all(&ctx.pulsar, &desired, &devices, n, window, ctx.s.payload).await?;
    // Ceiling D, the Pulsar leg alone: the same backlog on a topic of its
    // own (neither read is served from what the other put in the broker's
    // cache), read by a plain consumer.
    let plain = ctx.topic("bench-downlink-backlog-plain");
    write_all(&ctx.pulsar, &plain, &devices, n, window, ctx.s.payload).await?;
    let plain_secs = plain_read(&ctx.pulsar, &plain, n).await;
    let (sub, seen) = watch(ctx.stack, &prefix, last_versions(&devices, n)).await;
    let started = Instant::now();
    ferry.start();
    let pid = ferry_pid(&ferry)?;
    let before = proc_sample(pid)?;
    let limit = Duration::from_secs(120 + n / 200);
    let end = wait_done(ctx, Some(&ferry), "downlink-backlog", &seen, limit).await?;
    let after = proc_sample(pid)?;
    ctx.peaks.insert("downlink-backlog".into(), after.hwm_kb);
    ferry.terminate();
    let _ = sub.disconnect().await;
    clear_retained(ctx.stack, &prefix, &devices).await;
    let secs = end.duration_since(started).as_secs_f64();
    let s = seen.lock().unwrap();
    Ok(json!({
        "rate": n as f64 / secs,
        "seconds": secs,
        "plain_read_rate": plain_secs.as_ref().ok().map(|s| n as f64 / s),
        "plain_read_error": plain_secs.err(),
        "written": n,
        "devices": devices.len(),
        "fleet_seconds": fleet.as_secs_f64(),
        "subscriber_received": s.count,
        "subscriber_went_down": s.went_down,
        "cpu_seconds": after.cpu_s - before.cpu_s,
        "write_bytes": after.write_bytes - before.write_bytes,
    }))
}
