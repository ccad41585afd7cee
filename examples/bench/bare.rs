//! The bare producer: the fastest an unbatched client of the binary
//! protocol can go against this broker (ceiling A2, and the forwarder of P
//! and L). Frames are ferry's own (`ferry::uplink::frame`), so the two
//! write identical bytes; the rest (one connection, no store, no retries)
//! is this program's.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::BytesMut;
use ferry::uplink::frame;
use pulsar::proto::{self, base_command::Type, BaseCommand, KeyValue, MessageMetadata};

use crate::harness::{command, unique, Stack};
use crate::{device_ids, now_us, payload, Settings};

/// A bare Pulsar producer on the binary protocol, written for the
/// benchmark: one connection with TCP_NODELAY, LOOKUP, PRODUCER, then SENDs
/// (unbatched, ferry's metadata) written to the socket in runs and counted
/// back by their receipts. No store, no retries: the fastest an unbatched
/// client can go against this broker, to bound ferry's uplink.
pub struct RawProducer {
    sock: tokio::net::TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    name: String,
    /// Sends awaiting their receipt: (sequence id, when written).
    pub in_flight: VecDeque<(u64, Instant)>,
}

pub const RAW_PRODUCER_ID: u64 = 1;

impl RawProducer {
    pub async fn connect(stack: &Stack, topic: &str) -> Result<RawProducer, String> {
        let sock = tokio::net::TcpStream::connect(("127.0.0.1", stack.pulsar_port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut p = RawProducer {
            sock,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(256 * 1024),
            name: unique("bench-raw"),
            in_flight: VecDeque::new(),
        };
        p.push(&command(Type::Connect, |c| {
            c.connect = Some(proto::CommandConnect {
                client_version: "ferry-bench".into(),
                protocol_version: Some(19),
                ..Default::default()
            })
        }));
        p.request(|c| c.connected.is_some()).await?;
        // A lookup makes the standalone broker own the topic's bundle.
        p.push(&command(Type::Lookup, |c| {
            c.lookup_topic = Some(proto::CommandLookupTopic {
                topic: topic.to_string(),
                request_id: 1,
                ..Default::default()
            })
        }));
        p.request(|c| c.lookup_topic_response.is_some()).await?;
        p.push(&command(Type::Producer, |c| {
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

    fn push(&mut self, c: &BaseCommand) {
        frame::encode_command(c, &mut self.wbuf);
    }

    /// Flushes and reads frames until one satisfies `done`.
    async fn request(&mut self, done: impl Fn(&BaseCommand) -> bool) -> Result<(), String> {
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
    pub fn send(&mut self, seq: u64, device: &str, mqtt_topic: &str, payload: &[u8]) {
        let cmd = proto::CommandSend {
            producer_id: RAW_PRODUCER_ID,
            sequence_id: seq,
            num_messages: Some(1),
            ..Default::default()
        };
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
        frame::encode_send(&cmd, &meta, payload, &mut self.wbuf);
        self.in_flight.push_back((seq, Instant::now()));
    }

    pub async fn flush(&mut self) -> Result<(), String> {
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
    fn take_command(&mut self) -> Result<Option<Box<BaseCommand>>, String> {
        let Some(f) = frame::decode(&mut self.rbuf).map_err(|e| format!("decode: {e}"))? else {
            return Ok(None);
        };
        let c = f.command;
        if c.ping.is_some() {
            self.push(&command(Type::Pong, |r| {
                r.pong = Some(proto::CommandPong {})
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

    async fn read_command(&mut self) -> Result<BaseCommand, String> {
        loop {
            if let Some(c) = self.take_command()? {
                return Ok(*c);
            }
            self.fill().await?;
        }
    }

    /// Waits for at least one receipt and takes every one already arrived;
    /// returns how many. Cancel-safe.
    pub async fn receipts(&mut self) -> Result<usize, String> {
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
pub async fn raw_pump(p: &mut RawProducer, s: &Settings, from: u64, to: u64) -> Result<(), String> {
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
