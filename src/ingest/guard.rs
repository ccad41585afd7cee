//! The MQTT guard: a relay between rumqttc and the broker that keeps a
//! poison packet from reaching rumqttc whole.
//!
//! rumqttc reads a whole packet into memory before parsing it, and drops the
//! connection on a packet it cannot take (longer than its limit, a topic
//! that is not UTF-8). The broker then redelivers the same QoS 1 message on
//! the next connection, forever: one poison message blocks everything behind
//! it. So rumqttc connects to the guard (a Unix socket in the abstract
//! namespace that only this process may use), and the guard connects to the
//! broker and copies bytes both ways. Client to broker: unchanged, with the
//! PUBACKs ferry writes itself put between rumqttc's packets
//! ([`super::ack_line`]). Broker to
//! client: it follows MQTT 3.1.1 framing (fixed header, remaining length)
//! and rewrites a PUBLISH that
//!
//! - is longer than [`CAP`]: the payload is cut to its first [`KEEP`] bytes
//!   and the rest is discarded as it streams in, never buffered;
//! - has a topic that is not UTF-8: the topic becomes
//!   `$ferry/invalid-utf8/<the topic, each invalid byte as %XX>`.
//!
//! A rewritten PUBLISH keeps its flags (QoS, DUP, RETAIN) and packet id, so
//! it is acknowledged like any other once the store has dead-lettered it.
//! Its payload ends with a [`Mark`]: a nonce drawn at start (no publisher
//! can know it), what was rewritten and the original payload size. Ingest
//! reads the mark and hands the store a message it dead-letters with the
//! real size. Nothing but the mark travels from the guard to ingest, so no
//! state has to be kept in step across reconnects.
//!
//! [`Framer`] is the framing state, without I/O; [`Guard`] is the thin I/O
//! loop around it.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ack_line::{ack_line, splice, AckLine, UpFramer};

/// The largest `store.max_payload_bytes` ferry accepts.
const MAX_PAYLOAD: usize = crate::config::MAX_PAYLOAD_BYTES;

/// The longest PUBLISH (remaining length) that reaches rumqttc unchanged:
/// topic length, the longest topic MQTT allows, packet id, and a payload as
/// large as the largest `store.max_payload_bytes` ferry accepts. A longer
/// PUBLISH carries a payload that no store setting admits (reloads
/// included), so cutting it never loses what the store would have kept.
pub const CAP: usize = 2 + u16::MAX as usize + 2 + MAX_PAYLOAD;

/// How much of a cut payload goes on: what the store keeps of a dead letter.
pub const KEEP: usize = 64 * 1024;

/// Where a topic that is not UTF-8 goes, escaped.
pub const INVALID_TOPIC_PREFIX: &str = "$ferry/invalid-utf8/";

/// Bytes of the mark at the end of a rewritten payload.
pub const MARK_LEN: usize = 16 + 1 + 4;

/// What the guard changed in one PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    /// The packet was longer than [`CAP`]: the payload was cut.
    pub oversized: bool,
    /// The topic was not UTF-8: it was escaped.
    pub invalid_topic: bool,
    /// The payload's size as the broker sent it.
    pub payload_len: usize,
}

/// The mark a rewritten payload ends with: a nonce of this process, then
/// what was rewritten and the original payload size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    nonce: [u8; 16],
}

impl Mark {
    pub fn random() -> Mark {
        Mark {
            nonce: rand::random(),
        }
    }

    fn encode(&self, r: Rewrite) -> [u8; MARK_LEN] {
        let mut m = [0u8; MARK_LEN];
        m[..16].copy_from_slice(&self.nonce);
        m[16] = r.oversized as u8 | (r.invalid_topic as u8) << 1;
        // MQTT payloads are shorter than 2^28 bytes.
        m[17..].copy_from_slice(&(r.payload_len as u32).to_be_bytes());
        m
    }

    /// The rewrite a payload's mark tells of, and how many bytes come
    /// before the mark; `None` for a payload the guard did not rewrite.
    pub fn read(&self, payload: &[u8]) -> Option<(Rewrite, usize)> {
        let at = payload.len().checked_sub(MARK_LEN)?;
        let m = &payload[at..];
        if m[..16] != self.nonce || m[16] & !0b11 != 0 || m[16] == 0 {
            return None;
        }
        let r = Rewrite {
            oversized: m[16] & 1 != 0,
            invalid_topic: m[16] & 2 != 0,
            payload_len: u32::from_be_bytes([m[17], m[18], m[19], m[20]]) as usize,
        };
        Some((r, at))
    }
}

/// A PUBLISH the guard rewrote, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    /// The topic as forwarded.
    pub topic: String,
    pub pkid: u16,
    pub rewrite: Rewrite,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("malformed packet from the mqtt broker: {0}")]
    Malformed(&'static str),
}

/// MQTT 3.1.1 framing of the broker-to-client byte stream, without I/O:
/// bytes in, the bytes for rumqttc out. It holds at most one fixed header
/// and one PUBLISH's topic and packet id; payloads stream through.
pub struct Framer {
    mark: Mark,
    cap: usize,
    state: State,
    /// The topic length, topic and packet id of the current PUBLISH.
    head: Vec<u8>,
}

/// Where the framer is in the stream.
enum State {
    /// Reading a fixed header: the first byte and up to four bytes of
    /// remaining length.
    Header { buf: [u8; 5], len: usize },
    /// Reading a PUBLISH's topic length, topic and packet id (the head) of
    /// a packet whose fixed header is `header`.
    PublishHead {
        header: [u8; 5],
        header_len: usize,
        remaining: usize,
        /// 2 until the topic length is known, then the whole head.
        need: usize,
    },
    /// Forwarding `left` bytes unchanged.
    Copy { left: usize },
    /// Forwarding `left` bytes of a payload that is kept, then `mark`,
    /// then discarding `skip` bytes.
    Keep {
        left: usize,
        mark: [u8; MARK_LEN],
        skip: usize,
    },
    /// Discarding `left` bytes.
    Skip { left: usize },
}

const HEADER: State = State::Header {
    buf: [0; 5],
    len: 0,
};

impl Framer {
    /// A framer that cuts PUBLISH packets longer than `cap` (remaining
    /// length); [`CAP`] in production.
    pub fn new(mark: Mark, cap: usize) -> Framer {
        Framer {
            mark,
            cap,
            state: HEADER,
            head: Vec::new(),
        }
    }

    /// Takes bytes from the broker, appends what rumqttc is to get to `out`
    /// and each rewritten PUBLISH to `rewritten`. After an error the stream
    /// cannot be framed any more: the connection must end.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        rewritten: &mut Vec<Rewritten>,
    ) -> Result<(), GuardError> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header { buf, len } => {
                    let b = input[0];
                    input = &input[1..];
                    buf[*len] = b;
                    *len += 1;
                    if *len == 1 || b & 0x80 != 0 {
                        if *len == 5 {
                            return Err(GuardError::Malformed(
                                "remaining length longer than four bytes",
                            ));
                        }
                        continue;
                    }
                    let (header, header_len) = (*buf, *len);
                    let remaining = buf[1..header_len]
                        .iter()
                        .rev()
                        .fold(0usize, |n, b| n * 128 + (b & 0x7f) as usize);
                    self.state = if header[0] >> 4 == 3 {
                        if (header[0] >> 1) & 0b11 == 3 {
                            return Err(GuardError::Malformed("publish with QoS 3"));
                        }
                        self.head.clear();
                        State::PublishHead {
                            header,
                            header_len,
                            remaining,
                            need: 2,
                        }
                    } else {
                        out.extend_from_slice(&header[..header_len]);
                        copy(remaining)
                    };
                }
                State::PublishHead {
                    header,
                    header_len,
                    remaining,
                    need,
                } => {
                    let head = &mut self.head;
                    let n = (*need - head.len()).min(input.len());
                    head.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if head.len() < *need {
                        continue;
                    }
                    if *need == 2 {
                        let pkid = if (header[0] >> 1) & 0b11 > 0 { 2 } else { 0 };
                        *need = 2 + u16::from_be_bytes([head[0], head[1]]) as usize + pkid;
                        if *need > *remaining {
                            return Err(GuardError::Malformed("topic longer than its packet"));
                        }
                        if head.len() < *need {
                            continue;
                        }
                    }
                    let (header, header_len, remaining) = (*header, *header_len, *remaining);
                    self.state = self.publish(&header[..header_len], remaining, out, rewritten);
                }
                State::Copy { left } => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = HEADER;
                    }
                }
                State::Keep { left, mark, skip } => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        out.extend_from_slice(mark);
                        self.state = skip_state(*skip);
                    }
                }
                State::Skip { left } => {
                    let n = (*left).min(input.len());
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = HEADER;
                    }
                }
            }
        }
        Ok(())
    }

    /// A PUBLISH whose fixed header and head are in:
    /// forwards them as they are or rewritten; returns what follows.
    fn publish(
        &self,
        header: &[u8],
        remaining: usize,
        out: &mut Vec<u8>,
        rewritten: &mut Vec<Rewritten>,
    ) -> State {
        let head = &self.head[..];
        let topic = &head[2..2 + u16::from_be_bytes([head[0], head[1]]) as usize];
        let pkid = &head[2 + topic.len()..];
        let payload_len = remaining - head.len();
        let valid = std::str::from_utf8(topic).ok();
        let oversized = remaining > self.cap;
        if valid.is_some() && !oversized {
            out.extend_from_slice(header);
            out.extend_from_slice(head);
            return copy(payload_len);
        }
        let topic = match valid {
            Some(t) => t.to_string(),
            None => escape_topic(topic),
        };
        let keep = payload_len.min(KEEP);
        out.push(header[0]);
        remaining_length(2 + topic.len() + pkid.len() + keep + MARK_LEN, out);
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(pkid);
        let rewrite = Rewrite {
            oversized,
            invalid_topic: valid.is_none(),
            payload_len,
        };
        let mark = self.mark.encode(rewrite);
        rewritten.push(Rewritten {
            topic,
            pkid: if pkid.is_empty() {
                0
            } else {
                u16::from_be_bytes([pkid[0], pkid[1]])
            },
            rewrite,
        });
        if keep == 0 {
            out.extend_from_slice(&mark);
            return skip_state(payload_len);
        }
        State::Keep {
            left: keep,
            mark,
            skip: payload_len - keep,
        }
    }
}

fn copy(left: usize) -> State {
    if left == 0 {
        HEADER
    } else {
        State::Copy { left }
    }
}

fn skip_state(left: usize) -> State {
    if left == 0 {
        HEADER
    } else {
        State::Skip { left }
    }
}

/// MQTT's variable byte integer.
fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// A topic that is not UTF-8, as a topic that is: under
/// [`INVALID_TOPIC_PREFIX`], its valid parts as they are and every other
/// byte (and `%`) as `%XX`; shortened to fit MQTT's 65,535 bytes.
fn escape_topic(raw: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::from(INVALID_TOPIC_PREFIX);
    let fits = |s: &String, more: usize| s.len() + more <= u16::MAX as usize;
    'all: for chunk in raw.utf8_chunks() {
        for c in chunk.valid().chars() {
            let more = if c == '%' { 3 } else { c.len_utf8() };
            if !fits(&s, more) {
                break 'all;
            }
            if c == '%' {
                s.push_str("%25");
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            if !fits(&s, 3) {
                break 'all;
            }
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

/// The running guard: where rumqttc connects, and what ingest needs to
/// read the marks.
pub struct Guard {
    path: String,
    mark: Mark,
    upstream_error: Arc<Mutex<Option<String>>>,
    relays: TaskTracker,
    /// The ack line of the newest relay (see [`super::ack_line`]).
    line: Arc<Mutex<Option<AckLine>>>,
}

impl Guard {
    /// Listens on a fresh abstract Unix socket and relays each connection
    /// of this process to `broker` (host and port) until `shutdown`.
    pub fn start(broker: (String, u16), shutdown: CancellationToken) -> io::Result<Guard> {
        let path = format!(
            "\0ferry-mqtt-guard-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let listener = UnixListener::bind(&path)?;
        let mark = Mark::random();
        let upstream_error = Arc::new(Mutex::new(None));
        let relays = TaskTracker::new();
        let line = Arc::new(Mutex::new(None));
        tokio::spawn(accept(
            listener,
            broker,
            Relay {
                mark,
                errors: upstream_error.clone(),
                line: line.clone(),
            },
            relays.clone(),
            shutdown,
        ));
        Ok(Guard {
            path,
            mark,
            upstream_error,
            relays,
            line,
        })
    }

    /// Waits (at most `limit`) until every relay has passed on what rumqttc
    /// wrote before it closed its socket: the last PUBACKs and the
    /// DISCONNECT reach the broker before the process exits.
    pub async fn finish(self, limit: Duration) {
        self.relays.close();
        let _ = tokio::time::timeout(limit, self.relays.wait()).await;
    }

    /// The socket address for rumqttc (`Transport::Unix`).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn mark(&self) -> Mark {
        self.mark
    }

    /// The ack line of the newest connection. Called at a CONNACK, it is
    /// the line of the connection that CONNACK came on: rumqttc makes one
    /// connection per client, and the lane makes the next client only after
    /// the previous connection ended.
    pub fn ack_line(&self) -> Option<AckLine> {
        self.line.lock().ok()?.clone()
    }

    /// Why the guard last failed to reach the broker, once.
    pub fn take_upstream_error(&self) -> Option<String> {
        self.upstream_error.lock().ok()?.take()
    }
}

/// How long the guard waits for the broker to accept a connection; rumqttc
/// gives up on the whole CONNECT after 5 s anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every relay of a guard shares.
#[derive(Clone)]
struct Relay {
    mark: Mark,
    errors: Arc<Mutex<Option<String>>>,
    line: Arc<Mutex<Option<AckLine>>>,
}

async fn accept(
    listener: UnixListener,
    broker: (String, u16),
    shared: Relay,
    relays: TaskTracker,
    shutdown: CancellationToken,
) {
    let me = std::process::id() as i32;
    loop {
        let client = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "mqtt guard: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Abstract sockets have no file permissions: only this process may
        // use the guard.
        match client.peer_cred().map(|c| c.pid()) {
            Ok(Some(pid)) if pid == me => {}
            other => {
                tracing::warn!(peer = ?other, "mqtt guard: refused a connection from another process");
                continue;
            }
        }
        relays.spawn(relay(client, broker.clone(), shared.clone()));
    }
}

/// One connection: rumqttc on `client`, the broker upstream. Ends when
/// either side closes.
async fn relay(
    client: UnixStream,
    (host, port): (String, u16),
    Relay { mark, errors, line }: Relay,
) {
    let broker = format!("{host}:{port}");
    let connect = TcpStream::connect((host.as_str(), port));
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            set(&errors, Some(format!("cannot connect to {broker}: {e}")));
            return;
        }
        Err(_) => {
            set(
                &errors,
                Some(format!("cannot connect to {broker}: timed out")),
            );
            return;
        }
    };
    set(&errors, None);
    let _ = upstream.set_nodelay(true);
    // Before any byte passes: the CONNACK of this connection finds its line.
    let (acks, mut taker) = ack_line();
    if let Ok(mut l) = line.lock() {
        *l = Some(acks);
    }
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = upstream.into_split();
    let up = async {
        let mut framer = UpFramer::default();
        let mut buf = vec![0u8; 16 * 1024];
        let (mut pending, mut out) = (Vec::new(), Vec::new());
        let mut lines = true;
        loop {
            tokio::select! {
                biased;
                more = taker.take(&mut pending), if lines => {
                    lines = more;
                    if !framer.at_start() || pending.is_empty() {
                        continue;
                    }
                    if broker_tx.write_all(&pending).await.is_err() {
                        break;
                    }
                    pending.clear();
                }
                r = client_rx.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    // Acks handed over before these bytes were written
                    // go before the first packet that starts in them.
                    taker.take_ready(&mut pending);
                    splice(&mut framer, &buf[..n], &mut pending, &mut out);
                    if broker_tx.write_all(&out).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = broker_tx.shutdown().await;
    };
    let down = async {
        let mut framer = Framer::new(mark, CAP);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(2 * buf.len());
        let mut rewritten = Vec::new();
        loop {
            let n = match broker_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            out.clear();
            if let Err(e) = framer.feed(&buf[..n], &mut out, &mut rewritten) {
                tracing::error!(broker = %broker, error = %e, "mqtt guard: dropping the connection");
                return;
            }
            for r in rewritten.drain(..) {
                tracing::warn!(mqtt_topic = %r.topic, pkid = r.pkid, size = r.rewrite.payload_len,
                    oversized = r.rewrite.oversized, invalid_topic = r.rewrite.invalid_topic,
                    "mqtt guard: poison publish rewritten for the dead-letter table");
            }
            if client_tx.write_all(&out).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

fn set(slot: &Mutex<Option<String>>, v: Option<String>) {
    if let Ok(mut s) = slot.lock() {
        *s = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttc::{Packet, QoS};

    /// A PUBLISH as a broker would send it; `qos` 0, 1 or 2.
    fn publish(
        qos: u8,
        dup: bool,
        retain: bool,
        topic: &[u8],
        pkid: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic);
        if qos > 0 {
            body.extend_from_slice(&pkid.to_be_bytes());
        }
        body.extend_from_slice(payload);
        let mut p = vec![0x30 | (dup as u8) << 3 | qos << 1 | retain as u8];
        remaining_length(body.len(), &mut p);
        p.extend_from_slice(&body);
        p
    }

    /// The header and topic of a PUBLISH whose payload is `payload_len`
    /// bytes, without the payload (to stream large ones).
    fn publish_head(qos: u8, topic: &[u8], pkid: u16, payload_len: usize) -> Vec<u8> {
        let mut p = publish(qos, false, false, topic, pkid, &[]);
        let head_len = 2 + topic.len() + if qos > 0 { 2 } else { 0 };
        let mut out = vec![p[0]];
        remaining_length(head_len + payload_len, &mut out);
        out.extend(p.split_off(p.len() - head_len));
        out
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Feeds `input` in chunks of `chunk` bytes.
    fn feed(f: &mut Framer, input: &[u8], chunk: usize) -> (Vec<u8>, Vec<Rewritten>) {
        let mut out = Vec::new();
        let mut rewritten = Vec::new();
        for c in input.chunks(chunk.max(1)) {
            f.feed(c, &mut out, &mut rewritten).unwrap();
        }
        (out, rewritten)
    }

    /// Every packet of `bytes`, parsed as rumqttc parses them.
    fn parse_all(bytes: &[u8], max: usize) -> Vec<Packet> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while !buf.is_empty() {
            out.push(Packet::read(&mut buf, max).expect("rumqttc parses what the guard forwards"));
        }
        out
    }

    fn control_packets() -> Vec<u8> {
        let mut v = vec![0x20, 0x02, 0x00, 0x00]; // CONNACK
        v.extend([0x90, 0x03, 0x00, 0x01, 0x01]); // SUBACK
        v.extend([0x40, 0x02, 0x00, 0x07]); // PUBACK
        v.extend([0xd0, 0x00]); // PINGRESP
        v
    }

    #[test]
    fn packets_under_the_cap_pass_unchanged_however_the_reads_split_them() {
        let mut stream = control_packets();
        stream.extend(publish(0, false, false, b"devices/a/state", 0, b"{}"));
        stream.extend(publish(
            1,
            true,
            true,
            b"devices/b/state",
            7,
            &pattern(3000),
        ));
        stream.extend(publish(2, false, false, b"", 9, b""));
        stream.extend(publish(
            1,
            false,
            false,
            "d/\u{e9}t\u{e9}".as_bytes(),
            65535,
            b"x",
        ));
        for chunk in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut f = Framer::new(Mark::random(), 10_000);
            let (out, rewritten) = feed(&mut f, &stream, chunk);
            assert_eq!(out, stream, "chunks of {chunk}");
            assert!(rewritten.is_empty());
        }
    }

    /// The first rewritten PUBLISH of `out`, and what its mark says.
    fn cut_of(out: &[u8], mark: &Mark) -> (rumqttc::Publish, Rewrite, usize) {
        let p = parse_all(out, CAP)
            .into_iter()
            .find_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .expect("a publish");
        let (r, kept) = mark
            .read(&p.payload)
            .expect("a rewritten payload carries the mark");
        (p, r, kept)
    }

    #[test]
    fn an_oversized_qos1_publish_split_over_many_reads_is_cut_and_the_stream_goes_on() {
        let mark = Mark::random();
        let payload = pattern(1_000_000);
        let mut stream = publish(1, true, true, b"devices/big/state", 42, &payload);
        stream.extend(publish(
            1,
            false,
            false,
            b"devices/next/state",
            43,
            b"after",
        ));
        for chunk in [1000, 4093, 65536] {
            let mut f = Framer::new(mark, 100_000);
            let (out, rewritten) = feed(&mut f, &stream, chunk);
            let (p, r, kept) = cut_of(&out, &mark);
            assert_eq!(
                (p.qos, p.dup, p.retain, p.pkid),
                (QoS::AtLeastOnce, true, true, 42)
            );
            assert_eq!(p.topic, "devices/big/state");
            assert_eq!(kept, KEEP);
            assert_eq!(&p.payload[..kept], &payload[..KEEP]);
            assert_eq!(
                r,
                Rewrite {
                    oversized: true,
                    invalid_topic: false,
                    payload_len: 1_000_000
                }
            );
            assert_eq!(rewritten.len(), 1);
            assert_eq!(rewritten[0].pkid, 42);
            // Framing resumes after the discarded rest.
            let next = publish(1, false, false, b"devices/next/state", 43, b"after");
            assert!(out.ends_with(&next), "chunks of {chunk}");
            assert!(out.len() < KEEP + 200 + next.len());
        }
    }

    #[test]
    fn an_oversized_qos0_publish_is_cut_too() {
        let mark = Mark::random();
        let payload = pattern(300_000);
        let stream = publish(0, false, true, b"t/x/y", 0, &payload);
        let mut f = Framer::new(mark, 200_000);
        let (out, _) = feed(&mut f, &stream, 777);
        let (p, r, kept) = cut_of(&out, &mark);
        assert_eq!((p.qos, p.retain, p.pkid), (QoS::AtMostOnce, true, 0));
        assert_eq!(&p.payload[..kept], &payload[..KEEP]);
        assert_eq!(r.payload_len, 300_000);
        assert!(r.oversized && !r.invalid_topic);
    }

    #[test]
    fn a_packet_exactly_at_the_cap_passes_and_one_byte_more_is_cut() {
        let mark = Mark::random();
        let topic = b"devices/edge/state";
        let cap = 100_000;
        let at = cap - 2 - topic.len() - 2;
        let exact = publish(1, false, false, topic, 1, &pattern(at));
        let over = publish(1, false, false, topic, 2, &pattern(at + 1));
        let mut f = Framer::new(mark, cap);
        let (out, rewritten) = feed(&mut f, &exact, 999);
        assert_eq!(out, exact);
        assert!(rewritten.is_empty());
        // rumqttc, with its limit at the cap, takes it.
        assert_eq!(parse_all(&out, cap).len(), 1);
        let (out, rewritten) = feed(&mut f, &over, 999);
        assert_eq!(rewritten.len(), 1);
        assert_eq!(cut_of(&out, &mark).1.payload_len, at + 1);
    }

    #[test]
    fn remaining_lengths_at_every_varint_boundary_frame_correctly() {
        let mark = Mark::random();
        // Remaining lengths 127/128, 16383/16384, 2097151/2097152: one to
        // four bytes of length.
        for rl in [0usize, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            // A PUBACK-like unknown body is fine for framing: use PUBLISH
            // QoS 0 with a 1-byte topic when it fits, else a PINGRESP.
            let packet = if rl >= 3 {
                publish(0, false, false, b"t", 0, &pattern(rl - 3))
            } else {
                let mut p = vec![0xd0];
                remaining_length(rl, &mut p);
                p.extend(vec![0u8; rl]);
                p
            };
            let mut stream = packet.clone();
            stream.extend([0xd0, 0x00]);
            let mut f = Framer::new(mark, 4_000_000);
            let (out, rewritten) = feed(&mut f, &stream, 4099);
            assert_eq!(out, stream, "remaining length {rl}");
            assert!(rewritten.is_empty());
            // With the cap one below, the same PUBLISH is cut.
            if rl >= 3 {
                let mut f = Framer::new(mark, rl - 1);
                let (out, rewritten) = feed(&mut f, &stream, 4099);
                assert_eq!(rewritten.len(), 1, "remaining length {rl}");
                assert_eq!(cut_of(&out, &mark).1.payload_len, rl - 3);
                assert!(out.ends_with(&[0xd0, 0x00]));
            }
        }
    }

    #[test]
    fn the_largest_packet_mqtt_allows_streams_through_without_being_held() {
        let mark = Mark::random();
        let rl = 268_435_455;
        let topic = b"devices/huge/state";
        let head = publish_head(1, topic, 5, rl - 2 - topic.len() - 2);
        assert_eq!(head.len(), 1 + 4 + 2 + topic.len() + 2);
        let mut f = Framer::new(mark, CAP);
        let mut out = Vec::new();
        let mut rewritten = Vec::new();
        f.feed(&head, &mut out, &mut rewritten).unwrap();
        let chunk = vec![0xabu8; 1 << 20];
        let mut left = rl - 2 - topic.len() - 2;
        let mut most = 0;
        while left > 0 {
            let n = left.min(chunk.len());
            let before = out.len();
            f.feed(&chunk[..n], &mut out, &mut rewritten).unwrap();
            most = most.max(out.len() - before);
            left -= n;
        }
        f.feed(&[0xd0, 0x00], &mut out, &mut rewritten).unwrap();
        assert!(
            most <= KEEP + MARK_LEN,
            "{most} bytes forwarded for one read"
        );
        let (p, r, kept) = cut_of(&out, &mark);
        assert_eq!(p.pkid, 5);
        assert_eq!(kept, KEEP);
        assert_eq!(r.payload_len, rl - 2 - topic.len() - 2);
        assert!(out.ends_with(&[0xd0, 0x00]));
    }

    #[test]
    fn a_topic_that_is_not_utf8_is_escaped_and_rumqttc_takes_it() {
        let mark = Mark::random();
        let topic = b"devices/dev-\xff\xfe/state%";
        let original = publish(1, false, false, topic, 3, b"{\"n\":1}");
        // rumqttc refuses the original (and would drop the connection).
        assert!(Packet::read(&mut BytesMut::from(&original[..]), CAP).is_err());
        let mut stream = original.clone();
        stream.extend(publish(1, false, false, b"devices/ok/state", 4, b"good"));
        let mut f = Framer::new(mark, CAP);
        let (out, rewritten) = feed(&mut f, &stream, 5);
        let (p, r, kept) = cut_of(&out, &mark);
        assert_eq!(p.topic, "$ferry/invalid-utf8/devices/dev-%FF%FE/state%25");
        assert_eq!(p.pkid, 3);
        assert_eq!(&p.payload[..kept], b"{\"n\":1}");
        assert_eq!(
            r,
            Rewrite {
                oversized: false,
                invalid_topic: true,
                payload_len: 7
            }
        );
        assert_eq!(rewritten[0].topic, p.topic);
        assert!(out.ends_with(&publish(1, false, false, b"devices/ok/state", 4, b"good")));
    }

    #[test]
    fn the_escaped_form_of_a_very_long_topic_still_fits_a_topic() {
        let mark = Mark::random();
        let topic = vec![0xffu8; 65_535];
        let stream = publish(0, false, false, &topic, 0, b"x");
        let mut f = Framer::new(mark, CAP);
        let (out, _) = feed(&mut f, &stream, 10_000);
        let (p, r, _) = cut_of(&out, &mark);
        assert!(p.topic.len() <= 65_535);
        assert!(p.topic.starts_with(INVALID_TOPIC_PREFIX));
        assert!(r.invalid_topic);
    }

    #[test]
    fn only_this_processs_mark_is_recognised() {
        let mark = Mark::random();
        let other = Mark::random();
        let stream = publish(0, false, false, b"a/\xc0/b", 0, b"p");
        let mut f = Framer::new(mark, CAP);
        let (out, _) = feed(&mut f, &stream, 64);
        let p = match &parse_all(&out, CAP)[0] {
            Packet::Publish(p) => p.clone(),
            other => panic!("{other:?}"),
        };
        assert!(mark.read(&p.payload).is_some());
        assert_eq!(other.read(&p.payload), None);
        assert_eq!(mark.read(b""), None);
        assert_eq!(mark.read(&pattern(MARK_LEN + 10)), None);
    }

    #[test]
    fn a_stream_that_cannot_be_framed_is_an_error() {
        let mut out = Vec::new();
        let mut rw = Vec::new();
        let mut f = Framer::new(Mark::random(), CAP);
        assert!(f
            .feed(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], &mut out, &mut rw)
            .is_err());
        let mut f = Framer::new(Mark::random(), CAP);
        // Topic length 10 in a remaining length of 5.
        assert!(f
            .feed(
                &[0x30, 0x05, 0x00, 0x0a, b'a', b'b', b'c'],
                &mut out,
                &mut rw
            )
            .is_err());
        let mut f = Framer::new(Mark::random(), CAP);
        // QoS 3.
        assert!(f
            .feed(&[0x36, 0x05, 0x00, 0x01, b'a', 0, 1], &mut out, &mut rw)
            .is_err());
    }
}
