//! Reading a topic back with a real Pulsar consumer (the `pulsar` crate),
//! and the tally of what arrived against what the devices published.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use pulsar::consumer::InitialPosition;
use pulsar::{Consumer, ConsumerOptions, Pulsar, SubType, TokioExecutor};

use super::{unique, Region, Secure, Stack};

/// One message read back from Pulsar.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub payload: Vec<u8>,
    pub sequence_id: u64,
    /// Where the broker stored it: (ledger, entry, index in its batch). A
    /// second message with another id is a second copy in the topic.
    pub message_id: (u64, u64, i32),
    /// When ferry sent it (ms since the epoch).
    pub publish_time: u64,
    pub properties: BTreeMap<String, String>,
}

impl Received {
    /// The simulated device's own update counter, from the payload.
    pub fn n(&self) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&self.payload).expect("json payload");
        v["n"].as_u64().expect("n in payload")
    }
}

/// Reads a topic from the start until `expected` messages arrived, then keeps
/// listening for `grace` to catch anything extra (a duplicate). Gives up when
/// nothing arrives for `idle`.
pub async fn read_topic(
    stack: &Stack,
    topic: &str,
    compacted: bool,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(stack.service_url(), TokioExecutor)
        .build()
        .await
        .expect("pulsar client");
    read_with(pulsar, topic, compacted, expected, idle).await
}

/// [`read_topic`] on one region's broker.
pub async fn read_region_topic(
    region: &Region,
    topic: &str,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(region.service_url(), TokioExecutor)
        .build()
        .await
        .expect("pulsar client");
    read_with(pulsar, topic, false, expected, idle).await
}

/// [`read_topic`] on a secured broker, as its super-user.
pub async fn read_secure_topic(
    secure: &Secure,
    topic: &str,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(secure.service_url(), TokioExecutor)
        .with_auth(pulsar::Authentication {
            name: "token".into(),
            data: secure.admin_token().into_bytes(),
        })
        .with_certificate_chain_file(secure.pki.join("ca.pem"))
        .expect("read ca.pem")
        .with_tls_hostname_verification_enabled(true)
        .build()
        .await
        .expect("pulsar client");
    read_with(pulsar, topic, false, expected, idle).await
}

/// The `pulsar` crate tells through the `log` crate why its consumer
/// subscribed again (a closed consumer, a dead connection): its errors go
/// to the test's output (its warnings include a line at every subscribe).
struct CrateLog;

impl log::Log for CrateLog {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= log::Level::Error && meta.target().starts_with("pulsar")
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "[pulsar crate] {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

fn show_crate_warnings() {
    static CRATE_LOG: CrateLog = CrateLog;
    if log::set_logger(&CRATE_LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Error);
    }
}

/// A consumer of `topic` from its start, on an exclusive subscription of
/// its own (`name` and a unique suffix) that the broker does not keep.
pub async fn reader_from_start(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    name: &str,
    compacted: bool,
) -> Result<Consumer<Vec<u8>, TokioExecutor>, pulsar::Error> {
    pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(unique(name))
        .with_subscription_type(SubType::Exclusive)
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            read_compacted: Some(compacted),
            durable: Some(false),
            ..Default::default()
        })
        .build::<Vec<u8>>()
        .await
}

async fn read_with(
    pulsar: Pulsar<TokioExecutor>,
    topic: &str,
    compacted: bool,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    show_crate_warnings();
    read_each(&pulsar, topic, compacted, expected, idle, |msg| {
        Ok(msg.payload.data.clone())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Reads `topic` from its start until `expected` arrived, then 3 s more
/// for anything extra (gives up after `idle` without a message); `payload`
/// makes what is kept of each message's payload (an error ends the read).
pub async fn read_each(
    pulsar: &Pulsar<TokioExecutor>,
    topic: &str,
    compacted: bool,
    expected: usize,
    idle: Duration,
    mut payload: impl FnMut(&pulsar::consumer::Message<Vec<u8>>) -> Result<Vec<u8>, String>,
) -> Result<Vec<Received>, String> {
    let mut consumer = reader_from_start(pulsar, topic, "reader", compacted)
        .await
        .map_err(|e| format!("{topic}: pulsar consumer: {e}"))?;
    let grace = Duration::from_secs(3);
    let mut out = Vec::new();
    // The `pulsar` crate's consumer subscribes again from its start
    // position when its connection is replaced, so the reader may be handed
    // an entry it already has: the topic holds it once, and it counts once.
    let mut ids = BTreeSet::new();
    let mut again = 0usize;
    loop {
        let wait = if out.len() >= expected { grace } else { idle };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(msg))) => {
                let _ = consumer.ack(&msg).await;
                let id = msg.message_id();
                let message_id = (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1));
                if !ids.insert(message_id) {
                    again += 1;
                    continue;
                }
                let meta = msg.metadata();
                out.push(Received {
                    key: meta.partition_key.clone().unwrap_or_default(),
                    sequence_id: meta.sequence_id,
                    message_id,
                    publish_time: meta.publish_time,
                    properties: meta
                        .properties
                        .iter()
                        .map(|kv| (kv.key.clone(), kv.value.clone()))
                        .collect(),
                    payload: payload(&msg)?,
                });
            }
            Ok(Some(Err(e))) => return Err(format!("consumer error: {e}")),
            Ok(None) | Err(_) => break,
        }
    }
    if again > 0 {
        eprintln!(
            "[reader] {topic}: the consumer was handed {again} entries it already had (same message id; counted once)"
        );
    }
    Ok(out)
}

/// What arrived, compared with what the devices published.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub received: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
}

/// The tally of a topic that holds `n` updates, each exactly once, in order.
pub fn exact(n: usize) -> Tally {
    Tally {
        received: n,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
    }
}

/// Checks that each of `devices` sent updates 0..per_device and that the
/// topic holds each exactly once, in order per device.
pub fn tally(msgs: &[Received], devices: &[String], per_device: u64) -> Tally {
    let mut by_device: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for m in msgs {
        by_device.entry(m.key.as_str()).or_default().push(m.n());
    }
    let mut t = Tally {
        received: msgs.len(),
        ..Tally::default()
    };
    for d in devices {
        let got = by_device.get(d.as_str()).cloned().unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut last: Option<u64> = None;
        for n in &got {
            if !seen.insert(*n) {
                t.duplicated += 1;
                continue;
            }
            if last.is_some_and(|l| *n < l) {
                t.out_of_order += 1;
            }
            last = Some(*n);
        }
        t.lost += (0..per_device).filter(|n| !seen.contains(n)).count();
    }
    if t.duplicated > 0 {
        explain_duplicates(msgs);
    }
    t
}

/// Says where the second copies in a topic came from: a copy with the
/// sequence id of an earlier one is a resend the broker's deduplication let
/// through; one with a new sequence id is an update ferry stored twice.
fn explain_duplicates(msgs: &[Received]) {
    let mut first: BTreeMap<(&str, u64), &Received> = BTreeMap::new();
    let (mut resent, mut stored_twice) = (Vec::new(), Vec::new());
    for m in msgs {
        match first.get(&(m.key.as_str(), m.n())) {
            None => {
                first.insert((m.key.as_str(), m.n()), m);
            }
            Some(&f) if f.sequence_id == m.sequence_id => resent.push((f, m)),
            Some(&f) => stored_twice.push((f, m)),
        }
    }
    let show = |pairs: &[(&Received, &Received)]| -> String {
        pairs
            .iter()
            .take(5)
            .map(|(f, m)| {
                format!(
                    "{} #{} seq {} at {:?} and seq {} at {:?}",
                    m.key,
                    m.n(),
                    f.sequence_id,
                    f.message_id,
                    m.sequence_id,
                    m.message_id
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    eprintln!(
        "[tally] second copies: {} with the sequence id of the first (a resend deduplication let through: {}), {} with a new one (stored twice by ferry: {})",
        resent.len(),
        show(&resent),
        stored_twice.len(),
        show(&stored_twice)
    );
}

/// How many messages repeat an update (device and update number) that an
/// earlier message of the topic already carried.
pub fn duplicates(msgs: &[Received]) -> usize {
    let mut seen = BTreeSet::new();
    msgs.iter()
        .filter(|m| !seen.insert((m.key.clone(), m.n())))
        .count()
}
