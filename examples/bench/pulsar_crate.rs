//! The `pulsar` crate's side of the benchmark: its producer (ceiling A1),
//! sending messages shaped as ferry's, a consumer that times each
//! message's arrival (latency lines), and a reader that keeps no payloads
//! (large payloads).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use pulsar::producer::{Message, ProducerOptions};
use pulsar::{Pulsar, TokioExecutor};
use serde_json::{json, Value};

use crate::harness::{read_each, reader_from_start, unique, Received, Stack};
use crate::{device_ids, now_us, payload, payload_time_us, Settings};

pub async fn pulsar_client(stack: &Stack) -> Pulsar<TokioExecutor> {
    Pulsar::builder(stack.service_url(), TokioExecutor)
        .build()
        .await
        .expect("pulsar client")
}

/// A producer like ferry's uplink: unbatched, blocking (not failing) when
/// its outbound queue is full.
pub async fn raw_producer(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
) -> pulsar::Producer<TokioExecutor> {
    pulsar
        .producer()
        .with_topic(topic)
        .with_name(unique("bench-producer"))
        .with_options(ProducerOptions {
            batch_size: None,
            block_queue_if_full: true,
            ..Default::default()
        })
        .build()
        .await
        .expect("pulsar producer")
}

/// A message as ferry sends it: the device as key, the receive time as event
/// time, and ferry's four properties.
pub fn ferry_like_message(device: &str, seq: u64, mqtt_topic: &str, payload: Vec<u8>) -> Message {
    let now_ms = now_us() / 1000;
    let properties = [
        ("ferry.gateway", "bench".to_string()),
        ("ferry.record", seq.to_string()),
        ("ferry.received_ms", now_ms.to_string()),
        ("mqtt.topic", mqtt_topic.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Message {
        payload,
        partition_key: Some(device.to_string()),
        event_time: Some(now_ms),
        properties,
        ..Default::default()
    }
}

/// Sends updates `from..to` with at most `window` awaiting their receipt;
/// returns when every receipt arrived.
pub async fn pump(
    producer: &mut pulsar::Producer<TokioExecutor>,
    s: &Settings,
    from: u64,
    to: u64,
) -> Result<(), String> {
    let devices = device_ids(s.devices);
    let mut pending: VecDeque<pulsar::producer::SendFuture> = VecDeque::with_capacity(s.window);
    for i in from..to {
        if pending.len() >= s.window {
            let oldest = pending.pop_front().expect("window is full");
            oldest.await.map_err(|e| format!("receipt: {e}"))?;
        }
        let d = &devices[(i % devices.len() as u64) as usize];
        let mqtt_topic = format!("bench/{d}/state");
        let body = payload(d, i / devices.len() as u64, s.payload);
        let f = producer
            .send_non_blocking(ferry_like_message(d, i + 1, &mqtt_topic, body))
            .await
            .map_err(|e| format!("send: {e}"))?;
        pending.push_back(f);
    }
    while let Some(f) = pending.pop_front() {
        f.await.map_err(|e| format!("receipt: {e}"))?;
    }
    Ok(())
}

/// One message's timing, taken by a consumer as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// MQTT publish (from the payload) to consumer receipt, µs.
    total_us: i64,
    /// Milliseconds timestamps set by the sender: event time (ferry: when
    /// it received the message) and publish time (ferry: when it sent it).
    event_ms: Option<u64>,
    publish_ms: u64,
    received_us: u64,
    published_us: u64,
}

/// Subscribes to `topic` from its start and records when each message
/// arrives until `expected` arrived or nothing came for `idle`. The
/// subscription is made before this returns; the reading goes on in a task.
pub async fn arrivals(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    expected: u64,
    idle: Duration,
) -> tokio::task::JoinHandle<Vec<Arrival>> {
    let mut consumer = reader_from_start(pulsar, topic, "bench-latency", false)
        .await
        .expect("pulsar consumer");
    tokio::spawn(async move {
        let mut out = Vec::with_capacity(expected as usize);
        while (out.len() as u64) < expected {
            match tokio::time::timeout(idle, consumer.next()).await {
                Ok(Some(Ok(msg))) => {
                    let received_us = now_us();
                    let _ = consumer.ack(&msg).await;
                    let meta = msg.metadata();
                    if let Some(published_us) = payload_time_us(&msg.payload.data) {
                        out.push(Arrival {
                            total_us: received_us as i64 - published_us as i64,
                            event_ms: meta.event_time,
                            publish_ms: meta.publish_time,
                            received_us,
                            published_us,
                        });
                    }
                }
                Ok(Some(Err(e))) => {
                    eprintln!("bench: consumer error: {e}");
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        out
    })
}

/// The `q` quantile (0..=1) of sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// p50, p99 and max of the arrivals' totals in ms, and the p50 of each leg
/// when the sender set event and publish times (ferry does).
pub fn latency_summary(arr: &[Arrival]) -> Value {
    let mut total: Vec<f64> = arr.iter().map(|a| a.total_us as f64 / 1000.0).collect();
    total.sort_by(f64::total_cmp);
    let mut legs = BTreeMap::new();
    let leg = |f: &dyn Fn(&Arrival) -> Option<f64>| {
        let mut v: Vec<f64> = arr.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        json!({ "p50_ms": quantile(&v, 0.5), "p99_ms": quantile(&v, 0.99) })
    };
    legs.insert(
        "publish_to_event_time",
        leg(&|a| {
            a.event_ms
                .map(|e| e as f64 - a.published_us as f64 / 1000.0)
        }),
    );
    legs.insert(
        "event_time_to_publish_time",
        leg(&|a| a.event_ms.map(|e| a.publish_ms as f64 - e as f64)),
    );
    legs.insert(
        "publish_time_to_consumer",
        leg(&|a| Some(a.received_us as f64 / 1000.0 - a.publish_ms as f64)),
    );
    json!({
        "count": arr.len(),
        "p50_ms": quantile(&total, 0.5),
        "p99_ms": quantile(&total, 0.99),
        "max_ms": total.last().copied().unwrap_or(f64::NAN),
        "legs_ms": legs,
    })
}

/// Reads `topic` from its start with the harness's `read_each`, as
/// `read_topic` does, but keeps of each payload only its device update number (as
/// `{"n":..}`, for the harness's `tally`), so that gigabytes of payload are
/// not held. Also returns how many payloads were not `size` bytes long.
pub async fn read_slim(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    expected: u64,
    size: usize,
    idle: Duration,
) -> Result<(Vec<Received>, usize), String> {
    let mut wrong_size = 0usize;
    let out = read_each(pulsar, topic, false, expected as usize, idle, |msg| {
        let data = &msg.payload.data;
        if data.len() != size {
            wrong_size += 1;
        }
        let n = serde_json::from_slice::<Value>(data)
            .ok()
            .and_then(|v| v["n"].as_u64())
            .ok_or_else(|| format!("{topic}: a payload without its update number"))?;
        Ok(format!("{{\"n\":{n}}}").into_bytes())
    })
    .await?;
    Ok((out, wrong_size))
}
