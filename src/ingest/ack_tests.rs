//! Ingest against a scripted MQTT broker (the I/O seam), with a real store:
//! what goes out on which connection.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::layout::Layout;

/// One MQTT packet: its first byte and the rest after the length.
async fn read_packet(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = s.read_u8().await?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await?;
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((first, body))
}

fn connack(session_present: bool) -> [u8; 4] {
    [0x20, 2, session_present as u8, 0]
}

/// A QoS 1 PUBLISH of one byte on `topic`.
fn publish(topic: &str, pkid: u16, dup: bool) -> Vec<u8> {
    let mut p = vec![0x32 | if dup { 0x08 } else { 0 }];
    p.push((2 + topic.len() + 2 + 1) as u8);
    p.extend((topic.len() as u16).to_be_bytes());
    p.extend(topic.as_bytes());
    p.extend(pkid.to_be_bytes());
    p.push(b'x');
    p
}

/// The packet ids of the PUBACKs read from `s` within `wait` (`until`:
/// this many, then `wait` stops early).
async fn pubacks_within(s: &mut TcpStream, wait: Duration, until: usize) -> Vec<u16> {
    let mut acks = Vec::new();
    let _ = tokio::time::timeout(wait, async {
        while let Ok((first, body)) = read_packet(s).await {
            if first >> 4 == 4 {
                acks.push(u16::from_be_bytes([body[0], body[1]]));
                if acks.len() == until {
                    return;
                }
            }
        }
    })
    .await;
    acks
}

/// The store commits a message after its connection is gone: its ack was
/// made for that connection and must not go out on the next one. (A PUBACK
/// the broker does not expect there frees an in-flight slot in Mosquitto
/// 2.0's count, and a new message then overtakes the ones it queues.) The
/// broker sends the message again, and it is acked once, after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_of_a_lost_connection_never_goes_out_on_the_next() {
    let broker = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = broker.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("ferry-ingest-acks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = crate::config::parse(&format!(
        r#"
gateway_id = "gw"
[mqtt]
host = "127.0.0.1"
port = {port}
[[mqtt.subscriptions]]
filter = "devices/+/state"
device_id_level = 1
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
topic = "persistent://t/n/status"
[store]
path = "{}"
"#,
        dir.join("ferry.db").display()
    ))
    .unwrap();
    let layout = Layout::new(&cfg.streams);
    let (acks_tx, acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let store = crate::store::Store::open(
        &cfg.store,
        layout.clone(),
        std::slice::from_ref(&cfg.mqtt.client_id),
        acks_tx,
        crate::notify::Health::default().beat("store"),
        crate::status::Live::default(),
        crate::metrics::Metrics::new(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let ingest = tokio::spawn(super::run(
        cfg.mqtt.clone(),
        layout,
        store.handle.clone(),
        acks_rx,
        store.accepting.clone(),
        crate::status::Live::default(),
        crate::metrics::Metrics::new(),
        shutdown.clone(),
    ));

    // Connection 1: a message, and the connection is gone before the
    // store has committed it.
    let (mut first, _) = broker.accept().await.unwrap();
    read_packet(&mut first).await.unwrap();
    first.write_all(&connack(false)).await.unwrap();
    first
        .write_all(&publish("devices/d1/state", 7, false))
        .await
        .unwrap();
    first.flush().await.unwrap();
    drop(first);

    // Connection 2: nothing may acknowledge packet id 7 before the broker
    // sends it again; then exactly one PUBACK does.
    let (mut second, _) = tokio::time::timeout(Duration::from_secs(10), broker.accept())
        .await
        .expect("ferry connects again")
        .unwrap();
    read_packet(&mut second).await.unwrap();
    second.write_all(&connack(true)).await.unwrap();
    let early = pubacks_within(&mut second, Duration::from_millis(1500), usize::MAX).await;
    assert_eq!(
        early,
        Vec::<u16>::new(),
        "acks of connection 1 sent on connection 2"
    );
    second
        .write_all(&publish("devices/d1/state", 7, true))
        .await
        .unwrap();
    // Stored and acknowledged (however slow the machine), then never again.
    let mut acked = pubacks_within(&mut second, Duration::from_secs(20), 1).await;
    acked.extend(pubacks_within(&mut second, Duration::from_millis(500), usize::MAX).await);
    assert_eq!(acked, vec![7], "the redelivery is acknowledged once");

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), ingest).await;
    let _ = std::fs::remove_dir_all(&dir);
}
