//! Hostile MQTT input: payloads too large for memory, floods, topics that
//! are not UTF-8, brokers that drop every connection. Against the real
//! brokers where they can produce the input; Mosquitto refuses topics that
//! are not UTF-8 from publishers and always keeps connections, so those
//! scenarios use a fake broker at the socket seam ([`FakeBroker`], just
//! enough MQTT 3.1.1) with the real ferry binary.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::{Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// A payload that is not all one byte, so a cut in the wrong place shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

async fn wait_dead_lettered(ferry: &Ferry, n: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while ferry.counters().get("dead_lettered").copied().unwrap_or(0) < n {
        assert!(
            Instant::now() < deadline,
            "never {n} dead letters: {:?}; log tail:\n{}",
            ferry.counters(),
            tail(&ferry.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_mib_payload_is_dead_lettered_with_its_real_size_and_the_rest_flows_on_one_connection(
) {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "sixtymib").await;
    ferry.start_subscribed().await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    let mut big = Publisher::connect(stack).await;

    devices.publish_rounds(0, 5).await;
    let size = 60 << 20;
    let payload = pattern(size);
    let big_topic = devices.topic("dev-0004");
    big.publish(&big_topic, QoS::AtLeastOnce, payload.clone())
        .await;
    big.wait_acked(1).await;
    devices.publish_rounds(5, 10).await;
    ferry.wait_drained(100, SECS(120)).await;
    wait_dead_lettered(&ferry, 1, SECS(60)).await;

    let c = ferry.counters();
    report("sixtymib", &format!("counters: {c:?}"));
    assert_eq!(c.get("received").copied(), Some(101));
    assert_eq!(c.get("stored").copied(), Some(100));
    let dl = ferry.dead_letters();
    assert_eq!(dl.len(), 1);
    let DeadLetter {
        mqtt_topic: t,
        reason,
        size: recorded,
        payload: kept,
    } = &dl[0];
    assert_eq!(t, &big_topic);
    assert!(
        reason.starts_with(&format!(
            "payload of {size} bytes exceeds store.max_payload_bytes (262144)"
        )),
        "{reason}"
    );
    assert_eq!(*recorded, size as i64, "the real size is recorded");
    assert_eq!(
        &kept[..],
        &payload[..64 * 1024],
        "its first 64 KiB are kept"
    );

    let msgs = read_topic(stack, &topic, false, 100, SECS(30)).await;
    assert_eq!(tally(&msgs, &devices.ids, 10), exact(100));
    let m = ferry.scrape().await;
    assert_eq!(m.get("ferry_mqtt_reconnects_total"), Some(&0.0), "{m:?}");
    assert_eq!(ferry.log_count("mqtt connected"), 1, "one MQTT connection");
    if let Some(kib) = ferry.proc_status_kib("VmHWM") {
        report(
            "sixtymib",
            &format!("ferry peak RSS (VmHWM) {} MiB", kib / 1024),
        );
    }
    devices.disconnect().await;
    big.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// `ferry_mqtt_messages_received_total`, once it has not moved for 2 s.
async fn received_when_settled(ferry: &Ferry) -> f64 {
    let deadline = Instant::now() + SECS(90);
    let mut last = -1.0;
    let mut since = Instant::now();
    loop {
        let now = ferry.scrape().await["ferry_mqtt_messages_received_total"];
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= SECS(2) {
            return now;
        }
        assert!(Instant::now() < deadline, "intake never settled: {now}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_store_is_stalled_ferry_takes_no_more_from_the_broker_than_its_byte_budget() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic: _,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "budget").await;
    // The store thread blocks 2 s after start: nothing is committed or
    // released any more.
    ferry.start_with_env(&[("FERRY_DEBUG_HANG", "store")]);
    ferry.wait_log("mqtt subscribed", SECS(30)).await;
    ferry.wait_log("FERRY_DEBUG_HANG: blocking", SECS(30)).await;
    let mut flood = Publisher::connect(stack).await;
    let n = 20_000;
    for i in 0..n {
        let topic = format!("{prefix}/dev-{:04}/state", i % 100);
        flood.publish(&topic, QoS::AtMostOnce, pattern(4096)).await;
    }
    flood.wait_sent(n).await;
    let received = received_when_settled(&ferry).await;
    // 16 MiB of budget at 4,096 + topic + 256 bytes a message: about 3,800,
    // plus what rumqttc parsed in its last read.
    report(
        "budget",
        &format!("{n} QoS 0 messages of 4 KiB published at a stalled store; ferry took {received}"),
    );
    assert!(
        (1_000.0..=4_500.0).contains(&received),
        "ferry took {received} of {n} messages from the broker while its store was stalled"
    );
    flood.disconnect().await;
    ferry.kill9();
}

// ---------------------------------------------------------------------------
// A fake MQTT broker at the socket seam.

/// One message the fake broker delivers (and redelivers until acked).
struct Queued {
    pkid: u16,
    topic: Vec<u8>,
    payload: Vec<u8>,
    sent: bool,
    acked: bool,
}

#[derive(Default)]
struct FakeState {
    connections: usize,
    /// SUBSCRIBE packets received, per connection.
    subscribes: Vec<usize>,
    queue: Vec<Queued>,
    /// The next CONNACKs' session-present flag.
    session_present: bool,
    /// Close every connection right after its CONNACK.
    close_after_connack: bool,
    /// Incremented by [`FakeBroker::kick`]: the current connection closes.
    kicks: u64,
    /// Clean DISCONNECT packets received.
    disconnects: usize,
    /// How long a SUBACK waits (a slow broker).
    suback_delay: Duration,
}

impl FakeState {
    fn acked(&self) -> usize {
        self.queue.iter().filter(|q| q.acked).count()
    }
}

/// Just enough of an MQTT 3.1.1 broker for ferry: CONNACK (with a chosen
/// session-present flag), SUBACK, PINGRESP, QoS 1 PUBLISH of raw topic
/// bytes, redelivered with DUP on every connection until acknowledged.
struct FakeBroker {
    port: u16,
    state: Arc<Mutex<FakeState>>,
    wake: Arc<Notify>,
}

impl FakeBroker {
    async fn start() -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(FakeState::default()));
        let wake = Arc::new(Notify::new());
        let (s, w) = (state.clone(), wake.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                // One connection at a time, as a broker has for one client.
                fake_connection(sock, &s, &w).await;
            }
        });
        FakeBroker { port, state, wake }
    }

    /// Queues a QoS 1 message; returns its packet id.
    fn publish(&self, topic: &[u8], payload: &[u8]) -> u16 {
        let mut s = self.state.lock().unwrap();
        let pkid = s.queue.len() as u16 + 1;
        s.queue.push(Queued {
            pkid,
            topic: topic.to_vec(),
            payload: payload.to_vec(),
            sent: false,
            acked: false,
        });
        drop(s);
        self.wake.notify_one();
        pkid
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    /// Closes the current connection.
    fn kick(&self) {
        self.with(|s| s.kicks += 1);
        self.wake.notify_one();
    }

    async fn wait(&self, what: &str, limit: Duration, done: impl Fn(&FakeState) -> bool) {
        let deadline = Instant::now() + limit;
        while !self.with(|s| done(s)) {
            assert!(
                Instant::now() < deadline,
                "fake broker: never {what}: {} connections, {} of {} messages acked, subscribes {:?}",
                self.with(|s| s.connections),
                self.with(|s| s.acked()),
                self.with(|s| s.queue.len()),
                self.with(|s| s.subscribes.clone()),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn publish_packet(q: &Queued) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(q.topic.len() as u16).to_be_bytes());
    body.extend_from_slice(&q.topic);
    body.extend_from_slice(&q.pkid.to_be_bytes());
    body.extend_from_slice(&q.payload);
    let mut p = vec![0x32 | if q.sent { 0x08 } else { 0 }];
    let mut n = body.len();
    loop {
        let b = (n % 128) as u8;
        n /= 128;
        p.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            break;
        }
    }
    p.extend(body);
    p
}

/// What the fake broker sends now: the messages not yet sent on this
/// connection (all unacked ones at its start).
fn due(state: &Mutex<FakeState>, all: bool) -> Vec<u8> {
    let mut s = state.lock().unwrap();
    let mut out = Vec::new();
    for q in s.queue.iter_mut().filter(|q| !q.acked && (all || !q.sent)) {
        out.extend(publish_packet(q));
        q.sent = true;
    }
    out
}

async fn fake_connection(mut sock: TcpStream, state: &Mutex<FakeState>, wake: &Notify) {
    let mut buf = BytesMut::new();
    // CONNECT.
    loop {
        match Packet::read(&mut buf, 1 << 20) {
            Ok(Packet::Connect(_)) => break,
            Ok(_) => return,
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(_) => return,
        }
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    let (present, close, kicks) = {
        let mut s = state.lock().unwrap();
        s.connections += 1;
        s.subscribes.push(0);
        (s.session_present, s.close_after_connack, s.kicks)
    };
    if sock
        .write_all(&[0x20, 0x02, present as u8, 0x00])
        .await
        .is_err()
        || close
    {
        return;
    }
    let mut first = true;
    loop {
        let out = due(state, first);
        first = false;
        if !out.is_empty() && sock.write_all(&out).await.is_err() {
            return;
        }
        loop {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::Subscribe(sub)) => {
                    if let Some(n) = state.lock().unwrap().subscribes.last_mut() {
                        *n += 1;
                    }
                    let delay = state.lock().unwrap().suback_delay;
                    tokio::time::sleep(delay).await;
                    let mut ack = vec![0x90, 2 + sub.filters.len() as u8];
                    ack.extend_from_slice(&sub.pkid.to_be_bytes());
                    ack.extend(sub.filters.iter().map(|_| 0x01));
                    if sock.write_all(&ack).await.is_err() {
                        return;
                    }
                }
                Ok(Packet::PubAck(a)) => {
                    let mut s = state.lock().unwrap();
                    if let Some(q) = s.queue.iter_mut().find(|q| q.pkid == a.pkid) {
                        q.acked = true;
                    }
                }
                Ok(Packet::PingReq) => {
                    if sock.write_all(&[0xd0, 0x00]).await.is_err() {
                        return;
                    }
                }
                Ok(Packet::Disconnect) => {
                    state.lock().unwrap().disconnects += 1;
                    return;
                }
                Ok(_) => {}
                Err(rumqttc::Error::InsufficientBytes(_)) => break,
                Err(_) => return,
            }
        }
        if state.lock().unwrap().kicks != kicks {
            return;
        }
        tokio::select! {
            r = sock.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = wake.notified() => {}
        }
    }
}

/// A ferry whose MQTT broker is `fake` (Pulsar is the real one).
async fn ferry_on(stack: &Stack, fake: &FakeBroker, test: &str) -> (String, String, Ferry) {
    let Scenario {
        topic,
        prefix,
        mut ferry,
    } = Scenario::new(stack, test).await;
    ferry.point_mqtt_at(fake.port);
    (topic, prefix, ferry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_is_not_utf8_is_dead_lettered_and_acknowledged_and_the_rest_flows_on_one_connection(
) {
    let (stack, _shared) = Stack::shared().await;
    let fake = FakeBroker::start().await;
    let (topic, prefix, mut ferry) = ferry_on(stack, &fake, "badtopic").await;
    let mut bad = format!("{prefix}/dev-").into_bytes();
    bad.extend_from_slice(b"\xff\xfe/state");
    fake.publish(&bad, b"{\"n\":0}");
    let devices: Vec<String> = (0..8).map(|i| format!("dev-{i:04}")).collect();
    for n in 0..6 {
        for d in &devices {
            let payload = format!("{{\"device\":\"{d}\",\"n\":{n}}}");
            fake.publish(format!("{prefix}/{d}/state").as_bytes(), payload.as_bytes());
        }
    }
    ferry.start();
    fake.wait("49 PUBACKs", SECS(30), |s| s.acked() == 49).await;
    ferry.wait_drained(48, SECS(60)).await;

    assert_eq!(fake.with(|s| s.connections), 1, "one MQTT connection");
    let c = ferry.counters();
    report("badtopic", &format!("counters: {c:?}"));
    assert_eq!(c.get("dead_lettered").copied(), Some(1));
    assert_eq!(c.get("stored").copied(), Some(48));
    let dl = ferry.dead_letters();
    assert_eq!(dl.len(), 1);
    let DeadLetter {
        mqtt_topic: t,
        reason,
        size,
        payload: kept,
    } = &dl[0];
    report(
        "badtopic",
        &format!("dead letter: {t} ({size} bytes): {reason}"),
    );
    assert_eq!(t, &format!("$ferry/invalid-utf8/{prefix}/dev-%FF%FE/state"));
    assert_eq!(reason, "topic is not valid UTF-8");
    assert_eq!((*size, &kept[..]), (7, &b"{\"n\":0}"[..]));
    let msgs = read_topic(stack, &topic, false, 48, SECS(30)).await;
    assert_eq!(tally(&msgs, &devices, 6), exact(48));
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_drops_every_connection_after_connack_is_retried_less_and_less_often() {
    let (stack, _shared) = Stack::shared().await;
    let fake = FakeBroker::start().await;
    fake.with(|s| s.close_after_connack = true);
    let (_topic, _prefix, mut ferry) = ferry_on(stack, &fake, "dropper").await;
    ferry.start();
    fake.wait("a connection", SECS(30), |s| s.connections >= 1)
        .await;
    tokio::time::sleep(SECS(12)).await;
    let n = fake.with(|s| s.connections);
    report(
        "dropper",
        &format!("{n} connections in 12 s to a broker that drops each after its CONNACK"),
    );
    // 0.2, 0.4, 0.8, 1.6, 3.2, 6.4 s (+ up to 25%): 7 at most.
    assert!(
        n <= 8,
        "{n} connections in 12 s: the backoff starts over at every CONNACK"
    );
    assert_eq!(ferry.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_with_the_session_present_ferry_does_not_subscribe_again() {
    let (stack, _shared) = Stack::shared().await;
    let fake = FakeBroker::start().await;
    let (_topic, prefix, mut ferry) = ferry_on(stack, &fake, "resub").await;
    let update = |n: u32| format!("{{\"device\":\"dev-0000\",\"n\":{n}}}");
    let device_topic = format!("{prefix}/dev-0000/state");

    // The first connection of the process, whatever the session flag; a
    // slow SUBACK, so that the broker has the SUBSCRIBE well before ferry
    // has its answer.
    fake.with(|s| {
        s.session_present = true;
        s.suback_delay = Duration::from_millis(500);
    });
    ferry.start();
    fake.wait("a subscription", SECS(30), |s| s.subscribes == [1])
        .await;
    // Ferry counts the subscription as made only once it got the SUBACK
    // (until then it subscribes again, as it should): wait for that, not
    // only for the broker to have the SUBSCRIBE.
    ferry.wait_log("mqtt subscribed", SECS(30)).await;
    // The broker kept the session: no SUBSCRIBE, and messages still flow.
    fake.kick();
    fake.wait("a second connection", SECS(30), |s| s.connections == 2)
        .await;
    fake.publish(device_topic.as_bytes(), update(0).as_bytes());
    fake.wait("an ack", SECS(30), |s| s.acked() == 1).await;
    tokio::time::sleep(SECS(2)).await;
    // The broker lost the session: subscribe again.
    fake.with(|s| s.session_present = false);
    fake.kick();
    fake.wait("a third connection", SECS(30), |s| s.connections == 3)
        .await;
    fake.wait("a subscription", SECS(30), |s| {
        s.subscribes.len() == 3 && s.subscribes[2] == 1
    })
    .await;
    // A new process subscribes on its first CONNACK, session or not.
    fake.with(|s| s.session_present = true);
    assert_eq!(ferry.terminate(), Some(0));
    ferry.start();
    fake.wait("a fourth connection", SECS(30), |s| s.connections == 4)
        .await;
    fake.publish(device_topic.as_bytes(), update(1).as_bytes());
    fake.wait("an ack", SECS(30), |s| s.acked() == 2).await;
    tokio::time::sleep(SECS(2)).await;
    let subs = fake.with(|s| s.subscribes.clone());
    report(
        "resub",
        &format!("SUBSCRIBE packets per connection: {subs:?}"),
    );
    assert_eq!(subs, vec![1, 0, 1, 1]);
    assert_eq!(ferry.terminate(), Some(0));
}

/// Reports the largest anonymous and file-backed resident sets of `pid`,
/// sampled every 100 ms, until aborted.
fn sample_rss(pid: u32) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut most = (0u64, 0u64);
        let field = |status: &str, name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(0)
        };
        let mut n = 0;
        while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            let now = (field(&status, "RssAnon:"), field(&status, "RssFile:"));
            if now.0 > most.0 || now.1 > most.1 {
                most = (most.0.max(now.0), most.1.max(now.1));
            }
            n += 1;
            if n % 20 == 0 {
                println!(
                    "[rss] RssAnon {} MiB, RssFile {} MiB (most {} / {})",
                    now.0 / 1024,
                    now.1 / 1024,
                    most.0 / 1024,
                    most.1 / 1024
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

// ---------------------------------------------------------------------------
// Measurements (not tests): `cargo test --test it peak_rss -- --ignored`,
// with `FERRY_BIN` set to compare builds.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement for the README, not a test"]
async fn peak_rss_under_hostile_mqtt_input() {
    let (stack, _shared) = Stack::shared().await;
    let bin = ferry_bin();

    // Three 200 MiB QoS 1 payloads.
    let Scenario {
        topic: _,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "rss-big").await;
    ferry.start_subscribed().await;
    let mut big = Publisher::connect(stack).await;
    for i in 0..3 {
        let topic = format!("{prefix}/dev-{i:04}/state");
        big.publish(&topic, QoS::AtLeastOnce, pattern(200 << 20))
            .await;
    }
    big.wait_acked(3).await;
    wait_dead_lettered(&ferry, 3, SECS(300)).await;
    let kib = ferry.proc_status_kib("VmHWM").unwrap();
    report(
        "rss",
        &format!(
            "{}: three 200 MiB QoS 1 payloads: peak RSS {} MiB",
            bin.display(),
            kib / 1024
        ),
    );
    big.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));

    // A QoS 0 flood of 300,000 x 4 KiB (Pulsar unreachable: the store
    // coalesces).
    let Scenario {
        topic: _,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "rss-flood").await;
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;
    let sampler = sample_rss(ferry.pid().unwrap());
    let mut flood = Publisher::connect(stack).await;
    let n = 300_000;
    for i in 0..n {
        let topic = format!("{prefix}/dev-{:04}/state", i % 100);
        flood.publish(&topic, QoS::AtMostOnce, pattern(4096)).await;
    }
    flood.wait_sent(n).await;
    let received = received_when_settled(&ferry).await;
    let kib = ferry.proc_status_kib("VmHWM").unwrap();
    sampler.abort();
    report(
        "rss",
        &format!(
            "{}: QoS 0 flood of {n} x 4 KiB ({received} received): peak RSS {} MiB",
            bin.display(),
            kib / 1024
        ),
    );
    flood.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}

/// A process's CPU time (user + system) so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 11 and 12 after the name.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (what the guard costs), not a test"]
async fn cpu_per_update_of_an_ordinary_stream() {
    let (stack, _shared) = Stack::shared().await;
    let Scenario {
        topic: _,
        prefix,
        mut ferry,
    } = Scenario::new(stack, "cpu").await;
    ferry.start_subscribed().await;
    let pid = ferry.pid().unwrap();
    let mut devices = Devices::connect(stack, &prefix, 100).await;
    let before = cpu_time(pid);
    let started = Instant::now();
    devices.publish_rounds(0, 500).await;
    ferry.wait_drained(50_000, SECS(300)).await;
    let cpu = cpu_time(pid) - before;
    report(
        "cpu",
        &format!(
            "{}: 50,000 QoS 1 updates in {:.1} s, ferry CPU {:.2} s ({:.1} µs per update)",
            ferry_bin().display(),
            started.elapsed().as_secs_f64(),
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / 50_000.0
        ),
    );
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
}
