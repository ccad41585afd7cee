//! The ceilings: what the broker takes from an unbatched producer (A1 the
//! `pulsar` crate's, A2 the bare one), what Mosquitto passes to one
//! subscriber (B), what ferry's store code commits on this disk (C, C'),
//! the pipeline without a store (P) and its latency (L).

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::AsyncClient;
use serde_json::{json, Value};

use crate::bare::{raw_pump, RawProducer};
use crate::harness::unique;
use crate::mqtt::{publish_updates, subscribe, Pace, Updates};
use crate::pulsar_crate::{arrivals, latency_summary, pump, raw_producer};
use crate::{another_pass, best_of, device_ids, payload, Ctx, Settings};
use ferry::config::Config;
use ferry::layout::Layout;
use ferry::store::db::Db;
use ferry::store::{AckToken, Inbound};

/// Ceiling A with the `pulsar` crate's producer, after an untimed warm-up
/// (the broker's JIT) of a tenth of the count, at most 10,000.
pub async fn ceiling_a_crate(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("ceiling-a-crate");
    let mut producer = raw_producer(&ctx.pulsar, &topic).await;
    let (n, warm) = (ctx.s.n, (ctx.s.n / 10).min(10_000));
    pump(&mut producer, &ctx.s, 0, warm).await?;
    let mut passes = Vec::new();
    while another_pass(&ctx.s, &passes) {
        let first = warm + passes.len() as u64 * n;
        let started = Instant::now();
        pump(&mut producer, &ctx.s, first, first + n).await?;
        let secs = started.elapsed().as_secs_f64();
        passes.push(json!({ "rate": n as f64 / secs, "seconds": secs }));
    }
    let _ = producer.close().await;
    let mut v = best_of(passes);
    v["window"] = json!(ctx.s.window);
    v["warm_up"] = json!(warm);
    Ok(v)
}

/// Ceiling A with the bare protocol producer, warmed up the same way.
pub async fn ceiling_a_bare(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("ceiling-a-bare");
    let mut p = RawProducer::connect(ctx.stack, &topic).await?;
    let (n, warm) = (ctx.s.n, (ctx.s.n / 10).min(10_000));
    raw_pump(&mut p, &ctx.s, 0, warm).await?;
    let mut passes = Vec::new();
    while another_pass(&ctx.s, &passes) {
        let first = warm + passes.len() as u64 * n;
        let started = Instant::now();
        raw_pump(&mut p, &ctx.s, first, first + n).await?;
        let secs = started.elapsed().as_secs_f64();
        passes.push(json!({ "rate": n as f64 / secs, "seconds": secs }));
    }
    let mut v = best_of(passes);
    v["window"] = json!(ctx.s.window);
    v["warm_up"] = json!(warm);
    Ok(v)
}

/// Ceiling B: raw MQTT QoS 1 rate through Mosquitto to one subscriber.
pub async fn ceiling_b(ctx: &mut Ctx) -> Result<Value, String> {
    let mut passes = Vec::new();
    while another_pass(&ctx.s, &passes) {
        passes.push(ceiling_b_pass(ctx).await?);
    }
    Ok(best_of(passes))
}

pub async fn ceiling_b_pass(ctx: &mut Ctx) -> Result<Value, String> {
    let prefix = unique("bench-b");
    let n = ctx.s.n;
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let mut done_tx = Some(done_tx);
    let mut count = 0u64;
    let sub = subscribe(ctx.stack, &format!("{prefix}/+/state"), move |_| {
        count += 1;
        if count == n {
            if let Some(tx) = done_tx.take() {
                let _ = tx.send(Instant::now());
            }
        }
    })
    .await;
    let started = Instant::now();
    let publishing = tokio::spawn(publish_updates(Updates::new(ctx, &prefix, n, Pace::Burst)));
    let limit = Duration::from_secs(120 + n / 1000);
    let end = tokio::time::timeout(limit, done)
        .await
        .map_err(|_| "ceiling B: the subscriber did not get every message".to_string())?
        .map_err(|_| "ceiling B: subscriber stopped".to_string())?;
    let published = publishing.await.map_err(|e| e.to_string())??;
    let _ = sub.disconnect().await;
    let secs = end.duration_since(started).as_secs_f64();
    Ok(json!({
        "rate": n as f64 / secs,
        "seconds": secs,
        "publisher_seconds": published.as_secs_f64(),
    }))
}

/// Ceiling C, best of the passes.
pub fn ceiling_c_best(ctx: &Ctx, batch: usize, delete: bool) -> Result<Value, String> {
    let mut passes = Vec::new();
    while another_pass(&ctx.s, &passes) {
        passes.push(ceiling_c(&ctx.out_dir, &ctx.s, batch, delete)?);
    }
    Ok(best_of(passes))
}

/// The configuration ceiling C's store is opened with: ferry's defaults
/// (durability, payload limit) and one state stream, as the harness writes
/// for ferry's own lines; read with ferry's own loader.
pub fn store_config(dir: &Path) -> Result<Config, String> {
    let path = dir.join("ceiling-c.toml");
    let text = format!(
        r#"gateway_id = "bench"

[mqtt]
host = "127.0.0.1"
client_id = "ferry-bench"

[[mqtt.subscriptions]]
filter = "bench/+/state"
device_id_level = 1

[pulsar]
service_url = "pulsar://127.0.0.1:6650"
topic = "persistent://public/bench/status"

[store]
path = "{}"
"#,
        dir.join("ceiling-c.db").display()
    );
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    ferry::config::load(&path).map_err(|e| e.to_string())
}

/// Removes the store at `path` and every file beside it that belongs to it
/// (WAL, shared memory, ferry's own side files).
pub fn remove_store(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let name = name.to_string_lossy().to_string();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Ceiling C: group commits of `batch` records by ferry's own store code
/// (`Db::insert_batch`, routed by ferry's layout as ingest routes them) with
/// ferry's durability; with `delete`, every group is also deleted in a
/// second transaction (`Db::delivered`), as ferry does after the broker's
/// receipts.
pub fn ceiling_c(dir: &Path, s: &Settings, batch: usize, delete: bool) -> Result<Value, String> {
    let config = store_config(dir)?;
    let path = config.store.path.clone();
    remove_store(&path);
    let run = || -> Result<f64, String> {
        let layout = Layout::new(&config.streams);
        let (mut db, _) =
            Db::open(&path, layout.clone(), config.store.durability).map_err(|e| e.to_string())?;
        // Ingest's first connection to the MQTT broker.
        db.new_connection(0, 1, false);
        let max_payload = config.store.max_payload_bytes;
        let devices = device_ids(s.devices);
        let started = Instant::now();
        let mut i = 0u64;
        while i < s.n {
            let end = (i + batch as u64).min(s.n);
            let group: Vec<Inbound> = (i..end)
                .map(|i| {
                    let d = &devices[(i % devices.len() as u64) as usize];
                    let topic = format!("bench/{d}/state");
                    let (stream, device) = match layout.route(&topic) {
                        Some((s, d)) => (Some(s), d),
                        None => (None, None),
                    };
                    let pkid = (i % 65535 + 1) as u16;
                    Inbound {
                        payload: payload(d, i / devices.len() as u64, s.payload).into(),
                        mqtt_topic: topic,
                        retain: false,
                        stream,
                        device,
                        dup: false,
                        pkid,
                        session: 0,
                        ack: Some(AckToken {
                            pkid,
                            session: 0,
                            epoch: 1,
                            gen: 0,
                        }),
                        counted: false,
                        guarded: None,
                    }
                })
                .collect();
            let out = db
                .insert_batch(&group, max_payload)
                .map_err(|e| e.to_string())?;
            if out.stored != group.len() as u64 {
                return Err(format!("stored {} of {} records", out.stored, group.len()));
            }
            if delete {
                let last = db.last_seqs()[0];
                db.delivered(0, last, 0).map_err(|e| e.to_string())?;
            }
            i = end;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let secs = run().map_err(|e| format!("ceiling C: {e}"));
    remove_store(&path);
    let secs = secs?;
    Ok(json!({
        "rate": s.n as f64 / secs,
        "seconds": secs,
        "batch": batch,
        "with_delete": delete,
    }))
}

/// The path without a store: a QoS 1 subscriber on `filter` (automatic
/// acks) whose messages go out at once on the bare producer to `topic`, at
/// most `window` awaiting their receipt. Returns the subscriber, the count
/// of receipts so far, and the forwarding task.
pub async fn forwarder(
    ctx: &Ctx,
    filter: &str,
    topic: &str,
) -> Result<
    (
        AsyncClient,
        tokio::sync::watch::Receiver<u64>,
        tokio::task::JoinHandle<Result<(), String>>,
    ),
    String,
> {
    let mut producer = RawProducer::connect(ctx.stack, topic).await?;
    let window = ctx.s.window;
    let (msgs_tx, mut msgs) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
    let (confirmed_tx, confirmed) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let (mut seq, mut done) = (0u64, 0u64);
        let mut forward = |producer: &mut RawProducer, p: rumqttc::Publish| {
            seq += 1;
            let device = p.topic.split('/').nth(1).unwrap_or("").to_string();
            producer.send(seq, &device, &p.topic, &p.payload);
        };
        loop {
            let room = producer.in_flight.len() < window;
            tokio::select! {
                m = msgs.recv(), if room => {
                    let Some(p) = m else { return Ok(()) };
                    forward(&mut producer, p);
                    // Take what else is queued, as ferry's uplink fills its window.
                    while producer.in_flight.len() < window {
                        match msgs.try_recv() {
                            Ok(p) => forward(&mut producer, p),
                            Err(_) => break,
                        }
                    }
                    producer.flush().await?;
                }
                r = producer.receipts(), if !producer.in_flight.is_empty() => {
                    done += r? as u64;
                    let _ = confirmed_tx.send(done);
                    producer.flush().await?;
                }
            }
        }
    });
    let sub = subscribe(ctx.stack, filter, move |p| {
        let _ = msgs_tx.send(p);
    })
    .await;
    Ok((sub, confirmed, task))
}

/// Ceiling P (for information): the whole pipeline on this machine without
/// a store, MQTT publish to broker receipt through the forwarder, best of
/// the passes. Both brokers, the devices and the forwarder share the CPU,
/// as they do in ferry's end-to-end line.
pub async fn ceiling_p(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("ceiling-p");
    let prefix = unique("bench-p");
    let n = ctx.s.n;
    let (sub, mut confirmed, task) = forwarder(ctx, &format!("{prefix}/+/state"), &topic).await?;
    let mut passes = Vec::new();
    while another_pass(&ctx.s, &passes) {
        let k = passes.len() as u64;
        let started = Instant::now();
        let updates = Updates::new(ctx, &prefix, n, Pace::Burst).starting_at(k * n);
        let publishing = tokio::spawn(publish_updates(updates));
        let want = (k + 1) * n;
        let limit = Duration::from_secs(120 + n / 1000);
        let reached = matches!(
            tokio::time::timeout(limit, confirmed.wait_for(|c| *c >= want)).await,
            Ok(Ok(_))
        );
        if !reached {
            let got = *confirmed.borrow();
            return Err(format!("ceiling P: {got} of {want} receipts"));
        }
        let secs = started.elapsed().as_secs_f64();
        publishing.await.map_err(|e| e.to_string())??;
        passes.push(json!({ "rate": n as f64 / secs, "seconds": secs }));
    }
    let _ = sub.disconnect().await;
    task.abort();
    Ok(best_of(passes))
}

/// Bound L: publish-to-consumer latency at the fixed rate through the
/// forwarder (no store).
pub async fn bound_l(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("bound-l");
    let prefix = unique("bench-l");
    let n = ctx.s.latency_n;
    let reading = arrivals(&ctx.pulsar, &topic, n, Duration::from_secs(30)).await;
    let (sub, _, task) = forwarder(ctx, &format!("{prefix}/+/state"), &topic).await?;
    publish_updates(Updates::new(ctx, &prefix, n, Pace::PerSecond(ctx.s.rate))).await?;
    let arr = reading.await.map_err(|e| e.to_string())?;
    let _ = sub.disconnect().await;
    if task.is_finished() {
        task.await.map_err(|e| e.to_string())??;
    } else {
        task.abort();
    }
    if (arr.len() as u64) < n {
        return Err(format!("bound L: {} of {n} messages arrived", arr.len()));
    }
    Ok(latency_summary(&arr))
}
