//! The real ferry against a hostile Pulsar broker: a fake one in this test
//! (a tokio listener speaking just enough of the protocol), Mosquitto real.
//! What is tested is ferry's process: that it stops on SIGTERM in time and
//! what it tells systemd, not what arrives in Pulsar.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry::uplink::frame;
use pulsar::proto::{
    self, base_command::Type, command_lookup_topic_response::LookupType, CommandLookupTopicResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// How the fake broker misbehaves once ferry's producer is ready.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hostile {
    /// Never reads from the connection again (keeps it open).
    StopsReading,
    /// Reads every SEND but never sends a receipt.
    WithholdsReceipts,
    /// Names this `last_sequence_id` for every producer (and then reads
    /// and answers nothing but pings).
    LastSequenceId(i64),
}

/// A fake Pulsar broker on a port of its own: CONNECT, LOOKUP (itself) and
/// PRODUCER are answered, then it misbehaves. Its receive buffer is small, so
/// that ferry's writes stall soon after it stops reading.
struct FakeBroker {
    port: u16,
    producers: Arc<AtomicUsize>,
    /// Per connection, the payload bytes of the SENDs it received.
    payload_bytes: Arc<Mutex<Vec<u64>>>,
}

impl FakeBroker {
    async fn start(mode: Hostile) -> FakeBroker {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(64 * 1024).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(16).unwrap();
        let port = listener.local_addr().unwrap().port();
        let producers = Arc::new(AtomicUsize::new(0));
        let payload_bytes = Arc::new(Mutex::new(Vec::new()));
        let (count, bytes) = (producers.clone(), payload_bytes.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, port, mode, count.clone(), bytes.clone()));
            }
        });
        FakeBroker {
            port,
            producers,
            payload_bytes,
        }
    }

    fn url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.port)
    }

    async fn wait_producer(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.producers.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "ferry never created its producer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    port: u16,
    mode: Hostile,
    producers: Arc<AtomicUsize>,
    payload_bytes: Arc<Mutex<Vec<u64>>>,
) {
    let conn = {
        let mut v = payload_bytes.lock().unwrap();
        v.push(0);
        v.len() - 1
    };
    let mut buf = BytesMut::new();
    loop {
        while let Ok(Some(f)) = frame::decode(&mut buf) {
            let c = f.command;
            let mut out = BytesMut::new();
            let mut stop_reading = false;
            if c.connect.is_some() {
                let reply = command(Type::Connected, |r| {
                    r.connected = Some(proto::CommandConnected {
                        server_version: "fake".into(),
                        ..Default::default()
                    })
                });
                frame::encode_command(&reply, &mut out);
            } else if let Some(l) = &c.lookup_topic {
                let reply = command(Type::LookupResponse, |r| {
                    r.lookup_topic_response = Some(CommandLookupTopicResponse {
                        broker_service_url: Some(format!("pulsar://127.0.0.1:{port}")),
                        response: Some(LookupType::Connect as i32),
                        request_id: l.request_id,
                        authoritative: Some(true),
                        ..Default::default()
                    })
                });
                frame::encode_command(&reply, &mut out);
            } else if let Some(p) = &c.producer {
                let reply = command(Type::ProducerSuccess, |r| {
                    r.producer_success = Some(proto::CommandProducerSuccess {
                        request_id: p.request_id,
                        producer_name: p.producer_name.clone().unwrap_or_default(),
                        last_sequence_id: Some(match mode {
                            Hostile::LastSequenceId(n) => n,
                            _ => -1,
                        }),
                        ..Default::default()
                    })
                });
                frame::encode_command(&reply, &mut out);
                producers.fetch_add(1, Ordering::SeqCst);
                stop_reading = mode == Hostile::StopsReading;
            } else if c.send.is_some() {
                let len = f.payload.map(|(_, p)| p.len() as u64).unwrap_or(0);
                payload_bytes.lock().unwrap()[conn] += len;
            } else if c.ping.is_some() {
                let pong = command(Type::Pong, |r| r.pong = Some(proto::CommandPong {}));
                frame::encode_command(&pong, &mut out);
            }
            if sock.write_all(&out).await.is_err() {
                return;
            }
            if stop_reading {
                std::future::pending::<()>().await;
            }
        }
        if sock.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
    }
}

/// A ferry whose Pulsar is `broker`, with `uplink` lines added to its
/// `[uplink]` section.
fn ferry_against(stack: &Stack, test: &str, broker: &FakeBroker, uplink: &str) -> (Ferry, String) {
    let prefix = unique(test);
    let mut ferry = Ferry::new(
        stack,
        test,
        &unique("gw"),
        &format!("{prefix}/+/state"),
        "persistent://hostile/ns/device-status",
        "",
    );
    ferry.point_pulsar_at(&broker.url());
    ferry.add_settings("uplink", uplink);
    (ferry, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_reading_neither_feeds_the_watchdog_nor_delays_sigterm() {
    let (stack, _shared) = Stack::shared().await;
    let broker = FakeBroker::start(Hostile::StopsReading).await;
    // The write bound is long here so that the stall lasts while the
    // watchdog is observed; drain_timeout bounds the stop. The byte window
    // is larger than the 12 MB sent, so ferry writes them all and must
    // stall: with the default 4 MiB window the kernel's socket buffers
    // (autotuned up to 4 MiB) may take everything, and the session then
    // waits for receipts, which is bounded and rightly beats.
    let (mut ferry, prefix) = ferry_against(
        stack,
        "stops-reading",
        &broker,
        "operation_timeout_ms = 30000\ndrain_timeout_ms = 1000\nmax_in_flight_bytes = 67108864",
    );
    let notes = NotifySocket::new(&ferry.dir);
    let path = notes.env_value();
    // Fed every 0.5 s; a loop silent for 3 s counts as hung.
    let started = Instant::now();
    ferry.start_with_env(&[("NOTIFY_SOCKET", &path), ("WATCHDOG_USEC", "1500000")]);
    ferry.wait_log("mqtt subscribed", SECS(30)).await;
    broker.wait_producer(SECS(30)).await;
    tokio::time::sleep(SECS(2)).await;
    let publishing = Instant::now();

    // 60 updates of 200 KiB: 12 MB, more than the socket buffers hold.
    let records = 60;
    let mut devices = Devices::connect(stack, &prefix, 1).await;
    let topic = devices.topic("dev-0000");
    for i in 0..records {
        devices
            .publish_raw(&topic, vec![b'a' + (i % 26) as u8; 200 * 1024])
            .await;
    }
    ferry.wait_stored(records, SECS(60)).await;
    let stuck = Instant::now();
    tokio::time::sleep(SECS(8)).await;
    let fed_before = notes.count("WATCHDOG=1", started, publishing);
    let fed_while_stuck = notes.count("WATCHDOG=1", stuck + SECS(4), stuck + SECS(8));

    let term = Instant::now();
    ferry.signal("TERM");
    let mut stopped = None;
    while term.elapsed() < SECS(20) {
        if !ferry.is_running() {
            stopped = Some(term.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report(
        "stops-reading",
        &format!(
            "WATCHDOG=1 before the stall: {fed_before}, 4-8 s into it: {fed_while_stuck}; \
             SIGTERM to exit: {stopped:?} (drain_timeout 1 s)"
        ),
    );
    if stopped.is_none() {
        ferry.kill9();
    }
    devices.disconnect().await;
    assert!(fed_before > 0, "the watchdog was fed before the stall");
    assert_eq!(
        fed_while_stuck, 0,
        "the watchdog is not fed while the uplink is stuck in a write"
    );
    let took = stopped.expect("ferry still running 20 s after SIGTERM");
    assert!(
        took < SECS(5),
        "SIGTERM to exit took {took:?}, drain_timeout 1 s"
    );
    assert!(
        ferry.log_text().contains("stalled="),
        "the watchdog says which loop stalled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_withheld_keep_the_bytes_in_flight_to_the_window() {
    let (stack, _shared) = Stack::shared().await;
    let broker = FakeBroker::start(Hostile::WithholdsReceipts).await;
    // uplink.max_in_flight_bytes as by default.
    let cap: u64 = 4 * 1024 * 1024;
    let (mut ferry, prefix) = ferry_against(
        stack,
        "withholds-receipts",
        &broker,
        "operation_timeout_ms = 120000",
    );
    // First the backlog, with Pulsar unreachable: the audit's case is
    // 1,000 updates of 256 KiB (FERRY_IT_RECORDS for fewer).
    ferry.cut_off_pulsar();
    ferry.start_subscribed().await;
    let records: i64 = std::env::var("FERRY_IT_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let size = 256 * 1024;
    let mut devices = Devices::connect(stack, &prefix, 1).await;
    for i in 0..records {
        let topic = devices.topic(&format!("dev-{i:04}"));
        devices
            .publish_raw(&topic, vec![b'a' + (i % 26) as u8; size])
            .await;
    }
    ferry.wait_stored(records, SECS(300)).await;
    // Every PUBACK sent, or the next start gets redeliveries to drop.
    tokio::time::sleep(SECS(3)).await;
    let stored_hwm = ferry.proc_status_kib("VmHWM").unwrap_or(0);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));

    // Then a ferry that only sends, to a broker that never confirms.
    ferry.restore_pulsar();
    ferry.start();
    broker.wait_producer(SECS(30)).await;
    tokio::time::sleep(SECS(5)).await;
    let got = broker.payload_bytes.lock().unwrap().clone();
    let hwm = ferry.proc_status_kib("VmHWM").unwrap_or(0);
    let mib = |kib: u64| kib as f64 / 1024.0;
    report(
        "withholds-receipts",
        &format!(
            "{records} x {} KiB pending, receipts withheld: payload bytes the broker got per \
             connection {got:?} (cap {cap} + one record); ferry VmHWM {:.1} MiB while sending \
             (storing them: {:.1} MiB)",
            size / 1024,
            mib(hwm),
            mib(stored_hwm)
        ),
    );
    assert_eq!(ferry.terminate(), Some(0));
    assert!(!got.is_empty() && got.iter().all(|b| *b > 0), "{got:?}");
    assert!(
        got.iter().all(|b| *b <= cap + size as u64),
        "bytes in flight over the window: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_number_ferry_cannot_honour_keeps_the_records_and_ferry_running() {
    let (stack, _shared) = Stack::shared().await;
    let mut figures = Vec::new();
    // 2^48 - 1 made the store "exhausted" (exit 1 at every restart); 2^48 - 3
    // renumbered keys past 48 bits, into the next destination's range.
    for last in [(1i64 << 48) - 1, (1i64 << 48) - 3] {
        let broker = FakeBroker::start(Hostile::LastSequenceId(last)).await;
        let (mut ferry, prefix) = ferry_against(stack, "hostile-seq", &broker, "");
        // Records first, with the broker out of reach.
        ferry.cut_off_pulsar();
        ferry.start_subscribed().await;
        let mut devices = Devices::connect(stack, &prefix, 5).await;
        devices.publish_rounds(0, 4).await;
        ferry.wait_stored(20, SECS(30)).await;
        assert_eq!(ferry.terminate(), Some(0));

        ferry.restore_pulsar();
        ferry.start();
        broker.wait_producer(SECS(30)).await;
        ferry.wait_log("more than ferry numbers", SECS(30)).await;
        tokio::time::sleep(SECS(3)).await;
        let running = ferry.is_running();
        let pending = ferry.try_pending();
        let keys: Vec<i64> = {
            let c = ferry.open_store();
            let mut stmt = c.prepare("SELECT key >> 48 FROM outbox").unwrap();
            let rows = stmt.query_map([], |r| r.get(0)).unwrap();
            rows.collect::<Result<_, _>>().unwrap()
        };
        let table = ferry.status(false);
        figures.push(format!(
            "last_sequence_id {last}: running {running}, pending {pending:?}, producers created {}",
            broker.producers.load(Ordering::SeqCst)
        ));
        devices.disconnect().await;
        assert!(
            running,
            "ferry keeps running; log:\n{}",
            tail(&ferry.log_text(), 20)
        );
        assert_eq!(pending, Some(20), "nothing deleted or moved");
        assert!(
            keys.iter().all(|k| *k == 1),
            "every record still in its destination: {keys:?}"
        );
        assert!(table.contains("sequence-refused"), "{table}");
        assert!(table.contains("more than ferry numbers"), "{table}");
        assert_eq!(ferry.terminate(), Some(0));
    }
    report("hostile-seq", &figures.join("\n"));
}
