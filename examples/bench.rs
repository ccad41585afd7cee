//! The benchmark: ferry measured against the ceilings that bound it, on this
//! machine's real brokers, in one run. Run it with `bench/run` (README,
//! "Benchmark"), which builds ferry in release mode and starts the stack.
//!
//! Every line uses the same payload (`BENCH_PAYLOAD` bytes of JSON, 100) and
//! the same count (`BENCH_N` updates, 100,000), except the drain, which
//! empties a backlog of `BENCH_BACKLOG` (1,000,000). Throughput lines run
//! `BENCH_PASSES` (3) timed passes and keep the best, ceilings and ferry
//! alike (every pass is in the JSON):
//!
//! - **ceiling A**: unbatched publishing into a topic of a namespace with
//!   deduplication on, with ferry's window of sends awaiting their receipt
//!   (`uplink.max_in_flight`, `BENCH_WINDOW`, 1000) and ferry's key, event
//!   time and four properties on each message, after an untimed warm-up.
//!   Two clients: A1 the `pulsar` crate's producer; A2 a bare client of the
//!   binary protocol in this file (TCP_NODELAY, SENDs written in runs, no
//!   store). Ceiling A is the faster of the two: what the broker was shown
//!   to take;
//! - **ceiling B**: MQTT QoS 1 through the same Mosquitto to one subscriber;
//! - **ceiling C**: SQLite group commits on the same disk (`target/bench/`)
//!   with ferry's durability (WAL, `synchronous=FULL`), the shape of ferry's
//!   insert transaction (outbox row, `mqtt_seen` row, `next_seq`, counters)
//!   and its largest group (`store.commit_max_batch`, `BENCH_BATCH`, 1000);
//!   C' (for information) also deletes each group in a second transaction,
//!   as ferry does after the broker's receipts;
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
//! - **resources** from `/proc/<ferry pid>`: peak RSS (`VmHWM`, largest of
//!   every ferry process of the run), CPU (utime + stime) and `write_bytes`
//!   over the end-to-end passes, per update (the drain's are in the JSON).
//!
//! Results go to `target/bench/results.json` and `results.md`; ferry's
//! `/metrics` is sampled every second during its phases into
//! `target/bench/metrics-samples.jsonl` (`bench/render-dashboard` draws
//! `dashboards/ferry.png` from it). `BENCH_ONLY=a,b,...` runs some phases.

#[allow(dead_code)]
#[path = "../tests/it/harness/mod.rs"]
mod harness;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use harness::*;
use pulsar::consumer::InitialPosition;
use pulsar::producer::{Message, ProducerOptions};
use pulsar::{ConsumerOptions, Pulsar, SubType, TokioExecutor};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{json, Value};

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
        Settings {
            n,
            payload: env_num("BENCH_PAYLOAD", 100) as usize,
            devices: env_num("BENCH_DEVICES", 100) as usize,
            backlog: env_num("BENCH_BACKLOG", 1_000_000),
            rate: env_num("BENCH_RATE", 1000),
            latency_n: env_num("BENCH_LATENCY_N", n),
            window: env_num("BENCH_WINDOW", 1000) as usize,
            batch: env_num("BENCH_BATCH", 1000) as usize,
            passes: env_num("BENCH_PASSES", 3).max(1),
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
// MQTT

/// Small packets go out at once (rumqttc leaves Nagle's algorithm on).
fn nodelay(eventloop: &mut rumqttc::EventLoop) {
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
}

/// Simulated devices on one MQTT connection, as the harness's `Devices` (QoS
/// 1, 200 in flight), but with sized, timestamped payloads and paced
/// publishing.
struct Publisher {
    client: AsyncClient,
    acked: tokio::sync::watch::Receiver<u64>,
    published: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn connect(stack: &Stack, name: &str) -> Publisher {
        let mut opts = MqttOptions::new(unique(name), "127.0.0.1", stack.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(200)
            .set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        nodelay(&mut eventloop);
        let (tx, acked) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        let _ = tx.send(n);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("bench: publisher lost the MQTT broker: {e}");
                        return;
                    }
                }
            }
        });
        Publisher {
            client,
            acked,
            published: 0,
            task,
        }
    }

    async fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| format!("publish: {e}"))?;
        self.published += 1;
        Ok(())
    }

    /// Waits until the broker acknowledged everything published.
    async fn wait_acked(&mut self, limit: Duration) -> Result<(), String> {
        let want = self.published;
        let acked = matches!(
            tokio::time::timeout(limit, self.acked.wait_for(|n| *n >= want)).await,
            Ok(Ok(_))
        );
        if acked {
            return Ok(());
        }
        Err(format!(
            "the MQTT broker acknowledged {} of {want} publishes",
            *self.acked.borrow()
        ))
    }

    async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// How updates are paced.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// As fast as the broker takes them.
    Burst,
    /// This many per second.
    PerSecond(u64),
}

/// What one publisher sends: updates `first..first + count`, round robin
/// over the devices on `<prefix>/<device>/state` (update `i` is number
/// `i / devices` of device `i % devices`).
#[derive(Debug, Clone)]
struct Updates {
    stack: Stack,
    prefix: String,
    devices: Vec<String>,
    first: u64,
    count: u64,
    size: usize,
    pace: Pace,
}

impl Updates {
    fn new(ctx: &Ctx, prefix: &str, count: u64, pace: Pace) -> Updates {
        Updates {
            stack: ctx.stack.clone(),
            prefix: prefix.to_string(),
            devices: device_ids(ctx.s.devices),
            first: 0,
            count,
            size: ctx.s.payload,
            pace,
        }
    }

    fn starting_at(mut self, first: u64) -> Updates {
        self.first = first;
        self
    }
}

/// Publishes the updates; returns when the broker acknowledged all of them,
/// with the time that took.
async fn publish_updates(u: Updates) -> Result<Duration, String> {
    let mut p = Publisher::connect(&u.stack, "bench-devices").await;
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let d_count = u.devices.len() as u64;
    for k in 0..u.count {
        if let Pace::PerSecond(r) = u.pace {
            tokio::time::sleep_until(start + Duration::from_micros(k * 1_000_000 / r)).await;
        }
        let i = u.first + k;
        let d = &u.devices[(i % d_count) as usize];
        let topic = format!("{}/{d}/state", u.prefix);
        if let Err(e) = p.publish(topic, payload(d, i / d_count, u.size)).await {
            p.disconnect().await;
            return Err(e);
        }
    }
    let limit = Duration::from_secs(120 + u.count / 1000);
    let r = p.wait_acked(limit).await;
    let took = started.elapsed();
    p.disconnect().await;
    r.map(|_| took)
}

/// A QoS 1 subscriber (automatic acks) on `filter`; each message goes to
/// `each`. Returns once the broker confirmed the subscription.
async fn subscribe<F>(stack: &Stack, filter: &str, mut each: F) -> AsyncClient
where
    F: FnMut(rumqttc::Publish) + Send + 'static,
{
    let mut opts = MqttOptions::new(unique("bench-sub"), "127.0.0.1", stack.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    nodelay(&mut eventloop);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => each(p),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench: subscriber lost the MQTT broker: {e}");
                    return;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("SUBACK in time")
        .expect("subscriber alive");
    client
}

// ---------------------------------------------------------------------------
// Pulsar

async fn pulsar_client(stack: &Stack) -> Pulsar<TokioExecutor> {
    Pulsar::builder(stack.service_url(), TokioExecutor)
        .build()
        .await
        .expect("pulsar client")
}

/// A producer like ferry's uplink: unbatched, blocking (not failing) when
/// its outbound queue is full.
async fn raw_producer(
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
fn ferry_like_message(device: &str, seq: u64, mqtt_topic: &str, payload: Vec<u8>) -> Message {
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

/// A bare Pulsar producer on the binary protocol, written for the
/// benchmark: one connection with TCP_NODELAY, LOOKUP, PRODUCER, then SENDs
/// (unbatched, ferry's metadata) written to the socket in runs and counted
/// back by their receipts. No store, no retries: the fastest an unbatched
/// client can go against this broker, to bound ferry's uplink.
struct RawProducer {
    sock: tokio::net::TcpStream,
    rbuf: bytes::BytesMut,
    wbuf: bytes::BytesMut,
    name: String,
    /// Sends awaiting their receipt: (sequence id, when written).
    in_flight: VecDeque<(u64, Instant)>,
}

const RAW_PRODUCER_ID: u64 = 1;

fn raw_command(
    kind: pulsar::proto::base_command::Type,
    fill: impl FnOnce(&mut pulsar::proto::BaseCommand),
) -> pulsar::proto::BaseCommand {
    let mut c = pulsar::proto::BaseCommand {
        r#type: kind as i32,
        ..Default::default()
    };
    fill(&mut c);
    c
}

impl RawProducer {
    async fn connect(stack: &Stack, topic: &str) -> Result<RawProducer, String> {
        use pulsar::proto::{self, base_command::Type};
        let sock = tokio::net::TcpStream::connect(("127.0.0.1", stack.pulsar_port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut p = RawProducer {
            sock,
            rbuf: bytes::BytesMut::with_capacity(64 * 1024),
            wbuf: bytes::BytesMut::with_capacity(256 * 1024),
            name: unique("bench-raw"),
            in_flight: VecDeque::new(),
        };
        p.push(&raw_command(Type::Connect, |c| {
            c.connect = Some(proto::CommandConnect {
                client_version: "ferry-bench".into(),
                protocol_version: Some(19),
                ..Default::default()
            })
        }));
        p.request(|c| c.connected.is_some()).await?;
        // A lookup makes the standalone broker own the topic's bundle.
        p.push(&raw_command(Type::Lookup, |c| {
            c.lookup_topic = Some(proto::CommandLookupTopic {
                topic: topic.to_string(),
                request_id: 1,
                ..Default::default()
            })
        }));
        p.request(|c| c.lookup_topic_response.is_some()).await?;
        p.push(&raw_command(Type::Producer, |c| {
            c.producer = Some(proto::CommandProducer {
                topic: topic.to_string(),
                producer_id: RAW_PRODUCER_ID,
                request_id: 2,
                producer_name: Some(p.name.clone()),
                user_provided_producer_name: Some(true),
                ..Default::default()
            })
        }));
        p.request(|c| c.producer_success.is_some()).await?;
        Ok(p)
    }

    fn push(&mut self, c: &pulsar::proto::BaseCommand) {
        use bytes::BufMut;
        use prost::Message as _;
        let len = c.encoded_len();
        self.wbuf.put_u32((4 + len) as u32);
        self.wbuf.put_u32(len as u32);
        c.encode(&mut self.wbuf).expect("BytesMut grows");
    }

    /// Flushes and reads frames until one satisfies `done`.
    async fn request(
        &mut self,
        done: impl Fn(&pulsar::proto::BaseCommand) -> bool,
    ) -> Result<(), String> {
        self.flush().await?;
        loop {
            let c = self.read_command().await?;
            if c.error.is_some() {
                return Err(format!("broker error: {:?}", c.error));
            }
            if done(&c) {
                return Ok(());
            }
        }
    }

    /// Queues one SEND with ferry's key, event time and properties.
    fn send(&mut self, seq: u64, device: &str, mqtt_topic: &str, payload: &[u8]) {
        use bytes::BufMut;
        use prost::Message as _;
        use pulsar::proto::{self, base_command::Type, KeyValue, MessageMetadata};
        let cmd = raw_command(Type::Send, |c| {
            c.send = Some(proto::CommandSend {
                producer_id: RAW_PRODUCER_ID,
                sequence_id: seq,
                num_messages: Some(1),
                ..Default::default()
            })
        });
        let now_ms = now_us() / 1000;
        let kv = |k: &str, v: String| KeyValue {
            key: k.into(),
            value: v,
        };
        let meta = MessageMetadata {
            producer_name: self.name.clone(),
            sequence_id: seq,
            publish_time: now_ms,
            partition_key: Some(device.to_string()),
            event_time: Some(now_ms),
            properties: vec![
                kv("ferry.gateway", "bench".into()),
                kv("ferry.record", seq.to_string()),
                kv("ferry.received_ms", now_ms.to_string()),
                kv("mqtt.topic", mqtt_topic.to_string()),
            ],
            ..Default::default()
        };
        let (cmd_len, meta_len) = (cmd.encoded_len(), meta.encoded_len());
        let w = &mut self.wbuf;
        w.put_u32((4 + cmd_len + 2 + 4 + 4 + meta_len + payload.len()) as u32);
        w.put_u32(cmd_len as u32);
        cmd.encode(w).expect("BytesMut grows");
        w.put_u16(0x0e01);
        let crc_at = w.len();
        w.put_u32(0);
        w.put_u32(meta_len as u32);
        meta.encode(w).expect("BytesMut grows");
        w.put_slice(payload);
        let crc = crc32c::crc32c(&w[crc_at + 4..]);
        w[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
        self.in_flight.push_back((seq, Instant::now()));
    }

    async fn flush(&mut self) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        if !self.wbuf.is_empty() {
            let out = self.wbuf.split();
            self.sock
                .write_all(&out)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        Ok(())
    }

    /// Takes one whole frame off the read buffer, if there is one; answers
    /// PINGs.
    fn take_command(&mut self) -> Result<Option<pulsar::proto::BaseCommand>, String> {
        use bytes::Buf;
        use prost::Message as _;
        if self.rbuf.len() < 4 {
            return Ok(None);
        }
        let total = u32::from_be_bytes(self.rbuf[..4].try_into().unwrap()) as usize;
        if self.rbuf.len() < 4 + total {
            return Ok(None);
        }
        self.rbuf.advance(4);
        let mut frame = self.rbuf.split_to(total);
        let cmd_len = frame.get_u32() as usize;
        let c = pulsar::proto::BaseCommand::decode(&frame[..cmd_len])
            .map_err(|e| format!("decode: {e}"))?;
        if c.ping.is_some() {
            self.push(&raw_command(pulsar::proto::base_command::Type::Pong, |r| {
                r.pong = Some(pulsar::proto::CommandPong {})
            }));
        }
        Ok(Some(c))
    }

    /// Reads more from the socket (cancel-safe).
    async fn fill(&mut self) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        match self.sock.read_buf(&mut self.rbuf).await {
            Ok(0) => Err("broker closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    async fn read_command(&mut self) -> Result<pulsar::proto::BaseCommand, String> {
        loop {
            if let Some(c) = self.take_command()? {
                return Ok(c);
            }
            self.fill().await?;
        }
    }

    /// Waits for at least one receipt and takes every one already arrived;
    /// returns how many. Cancel-safe.
    async fn receipts(&mut self) -> Result<usize, String> {
        let mut got = 0;
        loop {
            while let Some(c) = self.take_command()? {
                if let Some(e) = c.send_error {
                    return Err(format!("send error: {:?} {}", e.error, e.message));
                }
                if let Some(r) = c.send_receipt {
                    match self.in_flight.pop_front() {
                        Some((seq, _)) if seq == r.sequence_id => got += 1,
                        other => return Err(format!("receipt {} for {other:?}", r.sequence_id)),
                    }
                }
            }
            if got > 0 {
                return Ok(got);
            }
            self.fill().await?;
        }
    }
}

/// Sends updates `from..to` on the bare producer with at most `window`
/// awaiting their receipt; returns when every receipt arrived.
async fn raw_pump(p: &mut RawProducer, s: &Settings, from: u64, to: u64) -> Result<(), String> {
    let devices = device_ids(s.devices);
    let mut next = from;
    while next < to || !p.in_flight.is_empty() {
        while p.in_flight.len() < s.window && next < to {
            let d = &devices[(next % devices.len() as u64) as usize];
            let body = payload(d, next / devices.len() as u64, s.payload);
            p.send(next + 1, d, &format!("bench/{d}/state"), &body);
            next += 1;
        }
        p.flush().await?;
        p.receipts().await?;
    }
    Ok(())
}

/// One message's timing, taken by a consumer as it arrived.
#[derive(Debug, Clone, Copy)]
struct Arrival {
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
async fn arrivals(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    expected: u64,
    idle: Duration,
) -> tokio::task::JoinHandle<Vec<Arrival>> {
    let mut consumer = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(unique("bench-latency"))
        .with_subscription_type(SubType::Exclusive)
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            durable: Some(false),
            ..Default::default()
        })
        .build::<Vec<u8>>()
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
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// p50, p99 and max of the arrivals' totals in ms, and the p50 of each leg
/// when the sender set event and publish times (ferry does).
fn latency_summary(arr: &[Arrival]) -> Value {
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

/// Messages the topic's ledgers hold (admin REST internal stats); ferry
/// sends unbatched, so that is the message count.
async fn entries_in_topic(stack: &Stack, topic: &str) -> Option<u64> {
    let path = topic.strip_prefix("persistent://")?;
    let body: Value = reqwest::get(stack.admin(&format!("persistent/{path}/internalStats")))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body["numberOfEntries"].as_u64()
}

async fn delete_topic(stack: &Stack, topic: &str) {
    if let Some(path) = topic.strip_prefix("persistent://") {
        let _ = reqwest::Client::new()
            .delete(stack.admin(&format!("persistent/{path}?force=true")))
            .send()
            .await;
    }
}

// ---------------------------------------------------------------------------
// ferry's process and metrics

/// Every ferry process this run started, for [`kill_ferries_on_panic`].
static FERRY_PIDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Release builds abort on panic, so the harness's `Drop` never stops the
/// ferries; this hook does, before the abort.
fn kill_ferries_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(pids) = FERRY_PIDS.lock() {
            for pid in pids.iter() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        default(info);
    }));
}

/// The pid of a harness `Ferry`: the only process whose command line names
/// its (unique) config file.
async fn ferry_pid(ferry: &Ferry) -> Result<u32, String> {
    let config = ferry.config.display().to_string();
    for _ in 0..100 {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "--", &config])
            .output()
            .map_err(|e| format!("pgrep: {e}"))?;
        let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| *p != std::process::id())
            .collect();
        if pids.len() == 1 {
            FERRY_PIDS.lock().unwrap().push(pids[0]);
            return Ok(pids[0]);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("no single ferry process runs {config}"))
}

/// What `/proc` says about a process.
#[derive(Debug, Clone, Copy, Default)]
struct ProcSample {
    /// utime + stime, seconds.
    cpu_s: f64,
    /// Bytes it caused to be written to storage.
    write_bytes: u64,
    /// Peak resident set size, kB.
    hwm_kb: u64,
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn proc_sample(pid: u32) -> Result<ProcSample, String> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map_err(|e| format!("/proc/{pid}/{f}: {e}"))
    };
    let stat = read("stat")?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu_s = (ticks(11) + ticks(12)) / clock_ticks();
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_s,
        write_bytes: field(&read("io")?, "write_bytes:"),
        hwm_kb: field(&read("status")?, "VmHWM:"),
    })
}

/// The machine's CPU time, busy and all, in clock ticks (`/proc/stat`).
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (all - idle, all)
}

/// CPU seconds of the stack's brokers (pid files in its state folder) and
/// of this process, to show where a run's CPU went.
fn others_cpu() -> BTreeMap<&'static str, f64> {
    let state = std::env::var_os("FERRY_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".stack"));
    let mut out = BTreeMap::new();
    for (name, file) in [("pulsar", "pulsar.pid"), ("mosquitto", "mosquitto.pid")] {
        let pid = std::fs::read_to_string(state.join("run").join(file))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if let Some(Ok(p)) = pid.map(proc_sample) {
            out.insert(name, p.cpu_s);
        }
    }
    if let Ok(p) = proc_sample(std::process::id()) {
        out.insert("bench", p.cpu_s);
    }
    out
}

/// One scrape of ferry's `/metrics`, or `None` while it does not answer.
async fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

/// The sum of every series of metric `name`, whatever its labels.
fn total(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

/// Scrapes ferry's metrics as often as asked and keeps one sample a second
/// in `metrics-samples.jsonl`.
struct Sampler {
    out: std::fs::File,
    last: Option<Instant>,
}

impl Sampler {
    fn create(path: &Path) -> Sampler {
        Sampler {
            out: std::fs::File::create(path).expect("create metrics samples"),
            last: None,
        }
    }

    async fn poll(&mut self, ferry: &Ferry, phase: &str) -> BTreeMap<String, f64> {
        let Some(m) = scrape(ferry.metrics_port).await else {
            return BTreeMap::new();
        };
        if self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last = Some(Instant::now());
            let line = json!({
                "t": now_us() as f64 / 1e6,
                "phase": phase,
                "metrics": m,
            });
            let _ = writeln!(self.out, "{line}");
        }
        m
    }

    /// Polls every 100 ms until `done` holds for a scrape; returns that
    /// scrape and when it was taken.
    async fn until(
        &mut self,
        ferry: &Ferry,
        phase: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> Result<(BTreeMap<String, f64>, Instant), String> {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.poll(ferry, phase).await;
            if !m.is_empty() && done(&m) {
                return Ok((m, Instant::now()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{phase}: {what} not reached in {limit:?}; log tail:\n{}",
                    tail(&ferry.log_text(), 10)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const ACKED: &str = "ferry_uplink_records_acknowledged_total";
const SKIPPED: &str = "ferry_uplink_records_skipped_total";
const STORED: &str = "ferry_store_records_stored_total";
const UPLINK_UP: &str = "ferry_uplink_connected";
const SUPERSEDED: &str = "ferry_store_records_superseded_total";
const DROPPED: &str = "ferry_store_records_dropped_total";
const COMMITS: &str = "ferry_store_commit_duration_seconds_count";
const COMMIT_SECONDS: &str = "ferry_store_commit_duration_seconds_sum";

/// A ferry for one phase, its config written by the harness, started and
/// subscribed; with its pid.
async fn start_ferry(
    stack: &Stack,
    phase: &str,
    prefix: &str,
    topic: &str,
) -> Result<(Ferry, u32), String> {
    let mut ferry = Ferry::new(
        stack,
        phase,
        &unique("gw"),
        &format!("{prefix}/+/state"),
        topic,
        "",
    );
    ferry.start();
    let pid = ferry_pid(&ferry).await?;
    ferry
        .wait_log("mqtt subscribed", Duration::from_secs(60))
        .await;
    Ok((ferry, pid))
}

// ---------------------------------------------------------------------------
// The phases

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

/// Sends updates `from..to` with at most `window` awaiting their receipt;
/// returns when every receipt arrived.
async fn pump(
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

/// The best of several timed passes: the highest `rate`, with every
/// pass's rate in `rates`.
fn best_of(passes: Vec<Value>) -> Value {
    let rate = |v: &Value| v["rate"].as_f64().unwrap_or(0.0);
    let rates: Vec<f64> = passes.iter().map(rate).collect();
    let mut best = passes
        .into_iter()
        .max_by(|a, b| rate(a).total_cmp(&rate(b)))
        .unwrap_or_else(|| json!({}));
    best["rates"] = json!(rates);
    best
}

/// Ceiling A with the `pulsar` crate's producer, after an untimed warm-up
/// (the broker's JIT) of a tenth of the count, at most 10,000.
async fn ceiling_a_crate(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("ceiling-a-crate");
    let mut producer = raw_producer(&ctx.pulsar, &topic).await;
    let (n, warm) = (ctx.s.n, (ctx.s.n / 10).min(10_000));
    pump(&mut producer, &ctx.s, 0, warm).await?;
    let mut passes = Vec::new();
    for k in 0..ctx.s.passes {
        let first = warm + k * n;
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
async fn ceiling_a_bare(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("ceiling-a-bare");
    let mut p = RawProducer::connect(ctx.stack, &topic).await?;
    let (n, warm) = (ctx.s.n, (ctx.s.n / 10).min(10_000));
    raw_pump(&mut p, &ctx.s, 0, warm).await?;
    let mut passes = Vec::new();
    for k in 0..ctx.s.passes {
        let first = warm + k * n;
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
async fn ceiling_b(ctx: &mut Ctx) -> Result<Value, String> {
    let mut passes = Vec::new();
    for _ in 0..ctx.s.passes {
        passes.push(ceiling_b_pass(ctx).await?);
    }
    Ok(best_of(passes))
}

async fn ceiling_b_pass(ctx: &mut Ctx) -> Result<Value, String> {
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
fn ceiling_c_best(ctx: &Ctx, batch: usize, delete: bool) -> Result<Value, String> {
    let mut passes = Vec::new();
    for _ in 0..ctx.s.passes {
        passes.push(ceiling_c(&ctx.out_dir, &ctx.s, batch, delete)?);
    }
    Ok(best_of(passes))
}

/// The shape of ferry's store (src/store/db.rs): the tables an insert
/// touches. Pending records live in `outbox` under `destination << 48 |
/// record number`.
const STORE_SCHEMA: &str = "
CREATE TABLE outbox (
    key INTEGER PRIMARY KEY, device TEXT NOT NULL, received_ms INTEGER NOT NULL,
    payload BLOB NOT NULL, props BLOB NOT NULL);
CREATE TABLE destinations (
    id INTEGER PRIMARY KEY, topic TEXT NOT NULL UNIQUE, next_seq INTEGER NOT NULL,
    stream TEXT NOT NULL, role TEXT NOT NULL);
CREATE TABLE mqtt_seen (pkid INTEGER PRIMARY KEY, topic TEXT NOT NULL, digest INTEGER NOT NULL);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO destinations VALUES (1, 'persistent://public/bench/status', 1, 'status', 'status');
";

/// Ceiling C: SQLite group commits of `batch` records with ferry's
/// durability; with `delete`, every group is also deleted in a second
/// transaction, as ferry does after the broker's receipts.
fn ceiling_c(dir: &Path, s: &Settings, batch: usize, delete: bool) -> Result<Value, String> {
    let path = dir.join("ceiling-c.db");
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
    let run = || -> rusqlite::Result<f64> {
        let mut conn = rusqlite::Connection::open(&path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
        conn.execute_batch(STORE_SCHEMA)?;
        let devices = device_ids(s.devices);
        let key = |seq: u64| ((1u64 << 48) | seq) as i64;
        let started = Instant::now();
        let mut seq = 1u64;
        while seq <= s.n {
            let first = seq;
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO outbox (key, device, received_ms, payload, props) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                let mut seen = tx.prepare_cached(
                    "INSERT OR REPLACE INTO mqtt_seen (pkid, topic, digest) VALUES (?1, ?2, ?3)",
                )?;
                while seq <= s.n && seq < first + batch as u64 {
                    let i = seq - 1;
                    let d = &devices[(i % devices.len() as u64) as usize];
                    let topic = format!("bench/{d}/state");
                    let p = payload(d, i / devices.len() as u64, s.payload);
                    let digest = ((crc32c::crc32c(&p) as i64) << 32) | p.len() as i64;
                    // postcard of (topic, retain): length, bytes, flag.
                    let mut props = vec![topic.len() as u8];
                    props.extend_from_slice(topic.as_bytes());
                    props.push(0);
                    seen.execute(rusqlite::params![(i % 65535 + 1) as i64, topic, digest])?;
                    insert.execute(rusqlite::params![
                        key(seq),
                        d,
                        (now_us() / 1000) as i64,
                        p,
                        props
                    ])?;
                    seq += 1;
                }
            }
            tx.execute(
                "UPDATE destinations SET next_seq = ?1 WHERE id = 1",
                [seq as i64],
            )?;
            let mut add = tx.prepare_cached(
                "INSERT INTO counters (name, value) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            )?;
            add.execute(rusqlite::params!["received", (seq - first) as i64])?;
            add.execute(rusqlite::params!["stored", (seq - first) as i64])?;
            drop(add);
            tx.commit()?;
            if delete {
                let tx = conn.transaction()?;
                tx.execute(
                    "DELETE FROM outbox WHERE key >= ?1 AND key <= ?2",
                    [key(first), key(seq - 1)],
                )?;
                tx.execute(
                    "INSERT INTO counters (name, value) VALUES ('delivered', ?1)
                     ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    [(seq - first) as i64],
                )?;
                tx.commit()?;
            }
        }
        Ok(started.elapsed().as_secs_f64())
    };
    let secs = run().map_err(|e| format!("ceiling C: {e}"))?;
    for ext in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
    }
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
async fn forwarder(
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
async fn ceiling_p(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("ceiling-p");
    let prefix = unique("bench-p");
    let n = ctx.s.n;
    let (sub, mut confirmed, task) = forwarder(ctx, &format!("{prefix}/+/state"), &topic).await?;
    let mut passes = Vec::new();
    for k in 0..ctx.s.passes {
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
async fn bound_l(ctx: &mut Ctx) -> Result<Value, String> {
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

/// Ferry end to end: sustained rate from MQTT publish to broker receipt,
/// best of the passes on one ferry; CPU and disk writes over all of them.
async fn ferry_end_to_end(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("end-to-end");
    let prefix = unique("bench-e2e");
    let n = ctx.s.n;
    let (mut ferry, pid) = start_ferry(ctx.stack, "bench-e2e", &prefix, &topic).await?;
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
async fn ferry_latency(ctx: &mut Ctx) -> Result<Value, String> {
    let topic = ctx.topic("latency");
    let prefix = unique("bench-lat");
    let n = ctx.s.latency_n;
    let (mut ferry, pid) = start_ferry(ctx.stack, "bench-latency", &prefix, &topic).await?;
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
    Ok(v)
}

/// The drain: a backlog stored while Pulsar is unreachable, then emptied.
async fn ferry_drain(ctx: &mut Ctx) -> Result<Value, String> {
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
    let real = ctx.stack.service_url();
    let closed = format!("pulsar://127.0.0.1:{}", free_port());
    ferry.edit_config(&real, &closed);
    ferry.start();
    let pid = ferry_pid(&ferry).await?;
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
    ferry.edit_config(&closed, &real);
    let restarted = Instant::now();
    ferry.start();
    let pid = ferry_pid(&ferry).await?;
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
    let entries = entries_in_topic(ctx.stack, &topic).await;
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

// ---------------------------------------------------------------------------
// The report

/// One line of the table: a ferry figure beside what bounds it.
struct Row {
    figure: String,
    ferry: String,
    bound: String,
    ratio: String,
    target: String,
    met: String,
}

fn fmt_rate(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn met(ok: bool) -> String {
    if ok { "met" } else { "not met" }.to_string()
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_f64()
}

fn rows(r: &Value, s: &Settings) -> Vec<Row> {
    // A phase that failed or was skipped: its JSON says which.
    let failed = || "n/a".to_string();
    let a_crate = num(r, &["ceilings", "a_pulsar_crate", "rate"]);
    let a_bare = num(r, &["ceilings", "a_pulsar_bare", "rate"]);
    // Ceiling A is what the broker was shown to take: the faster client.
    let a = match (a_crate, a_bare) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    let b = num(r, &["ceilings", "b_mqtt", "rate"]);
    let c = num(r, &["ceilings", "c_sqlite", "rate"]);
    let named = [("A", a), ("B", b), ("C", c)];
    let lowest = named
        .iter()
        .filter_map(|(n, v)| v.map(|v| (*n, v)))
        .min_by(|x, y| x.1.total_cmp(&y.1));
    let mut out = Vec::new();
    let sqlite = format!("SQLite, {} per commit (WAL, synchronous=FULL)", s.batch);
    let crate_name = format!(
        "Pulsar publish, pulsar crate's producer (unbatched, window {})",
        s.window
    );
    let bare_name = format!(
        "Pulsar publish, bare protocol producer (unbatched, window {})",
        s.window
    );
    let cycle = num(r, &["extra", "c_sqlite_insert_and_delete", "rate"]);
    let sqlite_cycle = format!(
        "SQLite insert, then delete, {} per commit (info: ferry's store does both)",
        s.batch
    );
    for (label, name, v) in [
        ("A1", crate_name.as_str(), a_crate),
        ("A2", bare_name.as_str(), a_bare),
        ("B", "MQTT QoS 1 through Mosquitto to one subscriber", b),
        ("C", sqlite.as_str(), c),
        ("C'", sqlite_cycle.as_str(), cycle),
    ] {
        out.push(Row {
            figure: format!("ceiling {label}: {name}, updates/s"),
            ferry: "".into(),
            bound: v.map(fmt_rate).unwrap_or_else(failed),
            ratio: "".into(),
            target: "".into(),
            met: "".into(),
        });
    }
    let e2e = num(r, &["ferry", "end_to_end", "rate"]);
    out.push(Row {
        figure: "ferry end to end (durable), updates/s".into(),
        ferry: e2e.map(fmt_rate).unwrap_or_else(failed),
        bound: lowest
            .map(|(n, v)| format!("{} (lowest: {n})", fmt_rate(v)))
            .unwrap_or_else(failed),
        ratio: match (e2e, lowest) {
            (Some(f), Some((_, l))) => format!("{:.0}%", 100.0 * f / l),
            _ => "".into(),
        },
        target: "≥ 80% of lowest ceiling".into(),
        met: match (e2e, lowest) {
            (Some(f), Some((_, l))) => met(f >= 0.8 * l),
            _ => "".into(),
        },
    });
    let pipeline = num(r, &["extra", "p_pipeline_without_store", "rate"]);
    out.push(Row {
        figure: "ferry end to end vs P: the same pipeline without a store, this machine (info)"
            .into(),
        ferry: e2e.map(fmt_rate).unwrap_or_else(failed),
        bound: pipeline
            .map(|v| format!("{} (P)", fmt_rate(v)))
            .unwrap_or_else(failed),
        ratio: match (e2e, pipeline) {
            (Some(f), Some(p)) => format!("{:.0}%", 100.0 * f / p),
            _ => "".into(),
        },
        target: "".into(),
        met: "".into(),
    });
    let drain = num(r, &["ferry", "drain", "rate"]);
    let shed = num(r, &["ferry", "drain", "shed"]).unwrap_or(0.0);
    let shed_note = if shed > 0.0 {
        format!(" ({} shed by the store's limits)", fmt_rate(shed))
    } else {
        String::new()
    };
    out.push(Row {
        figure: format!(
            "drain of {} after an outage, updates/s{shed_note}",
            fmt_rate(s.backlog as f64)
        ),
        ferry: drain.map(fmt_rate).unwrap_or_else(failed),
        bound: a
            .map(|v| format!("{} (A, the faster)", fmt_rate(v)))
            .unwrap_or_else(failed),
        ratio: match (drain, a) {
            (Some(f), Some(a)) => format!("{:.0}%", 100.0 * f / a),
            _ => "".into(),
        },
        target: "≥ 90% of A".into(),
        met: match (drain, a) {
            (Some(f), Some(a)) => met(f >= 0.9 * a),
            _ => "".into(),
        },
    });
    for (q, key) in [("p50", "p50_ms"), ("p99", "p99_ms")] {
        let f = num(r, &["ferry", "latency", key]);
        let l = num(r, &["ceilings", "l_no_store", key]);
        out.push(Row {
            figure: format!("latency {q} at {}/s, MQTT publish to consumer, ms", s.rate),
            ferry: f.map(|v| format!("{v:.1}")).unwrap_or_else(failed),
            bound: l
                .map(|v| format!("{v:.1} (L: no store)"))
                .unwrap_or_else(failed),
            ratio: match (f, l) {
                (Some(f), Some(l)) if l > 0.0 => format!("{:.1}×", f / l),
                _ => "".into(),
            },
            target: "".into(),
            met: "".into(),
        });
    }
    let rss = num(r, &["ferry", "resources", "peak_rss_kb"]);
    out.push(Row {
        figure: "ferry peak RSS (VmHWM), MiB".into(),
        ferry: rss
            .map(|v| format!("{:.1}", v / 1024.0))
            .unwrap_or_else(failed),
        bound: "".into(),
        ratio: "".into(),
        target: "≤ 16 MiB".into(),
        met: rss.map(|v| met(v / 1024.0 <= 16.0)).unwrap_or_default(),
    });
    let cpu = num(r, &["ferry", "resources", "cpu_us_per_update"]);
    out.push(Row {
        figure: "ferry CPU, s per 100,000 updates (µs per update)".into(),
        ferry: cpu
            .map(|v| format!("{:.2} ({v:.1} µs)", v / 10.0))
            .unwrap_or_else(failed),
        bound: "".into(),
        ratio: "".into(),
        target: "≤ 10 µs per update".into(),
        met: cpu.map(|v| met(v <= 10.0)).unwrap_or_default(),
    });
    let w = num(r, &["ferry", "resources", "write_bytes_per_update"]);
    out.push(Row {
        figure: "ferry bytes written to disk per update".into(),
        ferry: w.map(|v| format!("{v:.0}")).unwrap_or_else(failed),
        bound: format!("{} (payload)", s.payload),
        ratio: w
            .map(|v| format!("{:.1}×", v / s.payload as f64))
            .unwrap_or_default(),
        target: "≤ 3× payload".into(),
        met: w
            .map(|v| met(v <= 3.0 * s.payload as f64))
            .unwrap_or_default(),
    });
    out
}

fn markdown(rows: &[Row]) -> String {
    let mut t = String::from("| figure | ferry | ceiling / bound | ratio | reach for | |\n");
    t.push_str("|---|--:|--:|--:|---|---|\n");
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.figure, r.ferry, r.bound, r.ratio, r.target, r.met
        ));
    }
    t
}

fn plain_table(rows: &[Row]) -> String {
    let head = [
        "figure",
        "ferry",
        "ceiling / bound",
        "ratio",
        "reach for",
        "",
    ];
    let cells: Vec<[&str; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.as_str(),
                r.ferry.as_str(),
                r.bound.as_str(),
                r.ratio.as_str(),
                r.target.as_str(),
                r.met.as_str(),
            ]
        })
        .collect();
    let mut width = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            width[i] = width[i].max(v.chars().count());
        }
    }
    let line = |c: [&str; 6]| {
        let mut s = String::new();
        for (i, v) in c.iter().enumerate() {
            let pad = width[i] - v.chars().count();
            if i == 0 || i >= 4 {
                s.push_str(v);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(v);
            }
            s.push_str("  ");
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head);
    for c in cells {
        out.push_str(&line(c));
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs one phase, saying what it does and how it went.
/// `BENCH_ONLY` (a comma-separated list of keys: a, b, c, cycle, p, l, e2e,
/// latency, drain) runs only those phases.
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
        (Some(r), _, _) => println!("bench: {name}: {} updates/s ({took:.0} s)", fmt_rate(r)),
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
        "bench: {} updates of {} bytes per line, {} devices; drain of {}; latency at {}/s; ferry {}",
        fmt_rate(s.n as f64),
        s.payload,
        s.devices,
        fmt_rate(s.backlog as f64),
        s.rate,
        ferry_bin().display()
    );
    let stack = Stack::get();
    let ns = Namespace::create(stack, "bench").await;
    let pulsar = pulsar_client(stack).await;
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
        },
        "ceilings": {
            "a_pulsar_crate": a_crate, "a_pulsar_bare": a_bare,
            "b_mqtt": b, "c_sqlite": c, "l_no_store": l,
        },
        "ferry": { "end_to_end": e2e, "latency": lat, "drain": drain, "resources": resources },
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
    for t in &ctx.topics {
        delete_topic(stack, t).await;
    }
}
