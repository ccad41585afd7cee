//! Ingest: device updates from the gateway's MQTT broker into the store.
//!
//! Ferry connects with a fixed client id and a persistent session
//! (`clean_session = false`), subscribes at QoS 1 and acknowledges manually:
//! a PUBACK goes out only after the store has committed the message, so the
//! broker keeps (and after any crash redelivers) everything ferry has not
//! made durable. Two tasks share the work, as rumqttc requires: one polls the
//! event loop and hands messages to the store; the other receives the store's
//! commit confirmations and sends the acks. Acking from the polling task
//! could deadlock it (rumqttc #1025). The acks do not go through rumqttc,
//! which writes each on its own, but on the connection's [`ack_line`]: the
//! acks of a commit in one write.
//!
//! Acks carry the connection epoch they belong to. An ack left over from an
//! earlier connection is dropped: the broker redelivers that message with
//! the DUP flag, the store recognises it, and it is acked then. Sending the
//! stale ack instead could acknowledge a *different* message that the broker
//! sent under the reused packet id and that is not yet committed; and a
//! PUBACK the broker does not expect can break its order: Mosquitto 2.0
//! counts every PUBACK as a free in-flight slot, and a slot it thinks free
//! lets the next new message overtake the ones it still queues. So every
//! network connection has an rumqttc client of its own: rumqttc keeps its
//! request queue across the reconnects it makes itself, and would send an
//! ack (or a barrier) handed to it for one connection on the next.
//!
//! rumqttc does not talk to the broker directly but through the [`guard`],
//! which rewrites the PUBLISH packets rumqttc cannot take (too long for
//! memory, a topic that is not UTF-8) into ones the store dead-letters, so a
//! poison message is acknowledged and never blocks the ones behind it. What
//! is on its way to the store is bounded by bytes ([`intake`]); while that
//! budget is spent, ingest reads nothing more from the broker.
//!
//! The broker is subscribed to on the first CONNACK of the process (the
//! configuration may have changed since the session was made) and after
//! that only when the broker lost the session: every subscription makes the
//! broker resend every retained message. Reconnecting backs off, and the
//! backoff starts over only after a connection proved good: it stayed up
//! for [`STABLE_AFTER`] or delivered a message that was committed.

mod ack_line;
pub mod guard;
pub mod intake;
mod lane;
mod state;

#[cfg(test)]
mod ack_tests;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{Publish, QoS};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::config::MqttConfig;
use crate::layout::Layout;
use crate::store::{AckToken, Guarded, Inbound, Intake, StoreError, StoreHandle};

/// A connection that stayed up this long was a good one: the next
/// reconnect starts its backoff over.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The topic filter of the acknowledgement barrier (see `state::AckBarrier`):
/// ferry never subscribes to it, so unsubscribing changes nothing.
pub const BARRIER_FILTER: &str = "$ferry/ack-barrier";

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the mqtt guard: {0}")]
    Guard(std::io::Error),
}

/// Runs ingest until `shutdown`: one MQTT session per
/// [`Layout::sessions`], each with its own client, guard, acks and
/// back-pressure (`accepting`, in the same order). Messages go to `store`;
/// the store's commit confirmations arrive on `acks` and go to the session
/// each names. While a session's `accepting` is false (the store holds back
/// as much as it may of it: a `reject` stream at its limit, or a full
/// disk), that session stays disconnected and the broker keeps its backlog.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    cfg: MqttConfig,
    layout: Layout,
    store: StoreHandle,
    mut acks: UnboundedReceiver<Vec<AckToken>>,
    accepting: Vec<watch::Receiver<Intake>>,
    live: crate::status::Live,
    metrics: crate::metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let specs = layout.sessions(&cfg.client_id);
    debug_assert_eq!(specs.len(), accepting.len());
    // A failing session stops the others.
    let stop = shutdown.child_token();
    let shared = Shared {
        epochs: Arc::new(AtomicU64::new(0)),
        subscribed: Arc::new(watch::channel(vec![false; specs.len()]).0),
    };
    // Filters that session 0 may still hold from before they had a session
    // of their own (an upgrade, or a stream that became `reject`).
    let moved: Vec<String> = specs[1..]
        .iter()
        .flat_map(|s| s.filters.iter().cloned())
        .collect();
    let mut lanes = tokio::task::JoinSet::new();
    let mut to_lane = Vec::new();
    for (index, (spec, accepting)) in specs.into_iter().zip(accepting).enumerate() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        to_lane.push(tx);
        let moved = if index == 0 {
            moved.clone()
        } else {
            Vec::new()
        };
        lanes.spawn(lane::lane(
            cfg.clone(),
            index,
            spec,
            moved,
            layout.clone(),
            store.clone(),
            rx,
            accepting,
            live.clone(),
            metrics.clone(),
            shared.clone(),
            stop.clone(),
        ));
    }
    // One commit's acks of one session stay together (see `send_acks`).
    let demux = tokio::spawn(async move {
        while let Some(batch) = acks.recv().await {
            let mut per: Vec<Vec<AckToken>> = vec![Vec::new(); to_lane.len()];
            for a in batch {
                if let Some(v) = per.get_mut(a.session) {
                    v.push(a);
                }
            }
            for (tx, b) in to_lane.iter().zip(per) {
                if !b.is_empty() {
                    let _ = tx.send(b);
                }
            }
        }
    });
    let mut result = Ok(());
    while let Some(r) = lanes.join_next().await {
        let r = match r {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(()),
        };
        if let Err(e) = r {
            stop.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }
    demux.abort();
    result
}

/// What ingest's MQTT sessions share.
#[derive(Clone)]
struct Shared {
    /// The last connection epoch handed out: epochs are unique across
    /// sessions, so an epoch names one connection of one session.
    epochs: Arc<AtomicU64>,
    /// Per session: every filter it subscribes to was confirmed by the
    /// broker since the process started.
    subscribed: Arc<watch::Sender<Vec<bool>>>,
}

/// What a message costs of the intake budget: what it holds in memory.
fn cost(p: &Publish) -> usize {
    p.payload.len() + p.topic.len()
}

/// The message for the store. One the guard rewrote (`rewrite`, from its
/// mark) says so ([`Guarded`]), and the store dead-letters it with its real
/// size: a cut payload keeps only its first bytes, a topic that was not
/// UTF-8 is the guard's escaped form.
fn inbound(
    layout: &Layout,
    p: Publish,
    rewrite: Option<(guard::Rewrite, usize)>,
    session: usize,
    epoch: u64,
    share: OwnedSemaphorePermit,
) -> Inbound {
    let ack = (p.qos != QoS::AtMostOnce).then_some(AckToken {
        pkid: p.pkid,
        session,
        epoch,
        gen: 0,
    });
    let (stream, device) = match layout.route(&p.topic) {
        Some((s, d)) => (Some(s), d),
        None => (None, None),
    };
    let (payload, guarded) = match rewrite {
        None => (intake::held(&p.payload, share), None),
        Some((r, kept)) => {
            let guarded = if r.invalid_topic {
                Some(Guarded::TopicNotUtf8)
            } else if r.payload_len > kept {
                Some(Guarded::Cut {
                    len: r.payload_len as u64,
                })
            } else {
                None
            };
            (intake::held(&p.payload[..kept], share), guarded)
        }
    };
    Inbound {
        stream,
        device,
        counted: false,
        dup: p.dup,
        pkid: p.pkid,
        session,
        retain: p.retain,
        mqtt_topic: p.topic,
        payload,
        ack,
        guarded,
    }
}

#[cfg(test)]
mod tests {
    use super::guard::{Framer, Mark, Rewritten, CAP, KEEP};
    use super::intake::Budget;
    use super::*;
    use crate::config::{Limits, Overflow, StreamConfig, StreamKind, Subscription};
    use rumqttc::Packet;

    fn layout() -> Layout {
        Layout::new(&[StreamConfig {
            name: "status".into(),
            kind: StreamKind::State,
            subscriptions: vec![Subscription {
                filter: "devices/+/state".into(),
                device_id_level: 1,
            }],
            topic: "persistent://t/n/status".into(),
            history_topic: None,
            overflow: Overflow::Coalesce,
            limits: Limits::default(),
        }])
    }

    /// A PUBLISH as rumqttc hands it over after the guard: the broker's
    /// bytes through a framer with `mark`, parsed by rumqttc.
    fn through_guard(mark: Mark, qos: u8, topic: &[u8], payload: &[u8]) -> Publish {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        raw.extend_from_slice(topic);
        if qos > 0 {
            raw.extend_from_slice(&9u16.to_be_bytes());
        }
        raw.extend_from_slice(payload);
        let mut packet = vec![0x30 | qos << 1];
        let mut n = raw.len();
        loop {
            let b = (n % 128) as u8;
            n /= 128;
            packet.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                break;
            }
        }
        packet.extend(raw);
        let mut out = Vec::new();
        let mut rw: Vec<Rewritten> = Vec::new();
        Framer::new(mark, CAP)
            .feed(&packet, &mut out, &mut rw)
            .unwrap();
        match rumqttc::Packet::read(&mut bytes::BytesMut::from(&out[..]), CAP).unwrap() {
            Packet::Publish(p) => p,
            other => panic!("{other:?}"),
        }
    }

    async fn to_store(mark: Mark, p: Publish, budget: &Budget) -> Inbound {
        let rewrite = mark.read(&p.payload);
        let share = budget.reserve(cost(&p)).await;
        inbound(&layout(), p, rewrite, 0, 3, share)
    }

    #[tokio::test]
    async fn an_ordinary_message_goes_to_its_stream_unchanged() {
        let mark = Mark::random();
        let budget = Budget::new(1 << 20);
        let p = through_guard(mark, 1, b"devices/d1/state", b"{\"n\":1}");
        let m = to_store(mark, p, &budget).await;
        assert_eq!((m.stream, m.device.as_deref()), (Some(0), Some("d1")));
        assert_eq!(&m.payload[..], b"{\"n\":1}");
        assert_eq!(
            m.ack,
            Some(AckToken {
                pkid: 9,
                session: 0,
                epoch: 3,
                gen: 0
            })
        );
        assert!(budget.available() < 1 << 20);
        drop(m);
        assert_eq!(
            budget.available(),
            1 << 20,
            "the store dropping it frees its share"
        );
    }

    #[tokio::test]
    async fn a_cut_payload_reaches_the_store_with_its_real_size_over_any_limit() {
        let mark = Mark::random();
        let budget = Budget::new(intake::INTAKE_BYTES);
        let n = CAP + 1000;
        let payload: Vec<u8> = (0..n).map(|i| (i % 253) as u8).collect();
        let p = through_guard(mark, 1, b"devices/d2/state", &payload);
        assert!(p.payload.len() < KEEP + 100, "rumqttc got the cut packet");
        let m = to_store(mark, p, &budget).await;
        assert_eq!(m.guarded, Some(Guarded::Cut { len: n as u64 }));
        assert_eq!(m.size(), n as u64);
        assert!(m.size() > crate::config::MAX_PAYLOAD_BYTES as u64);
        assert_eq!(&m.payload[..], &payload[..KEEP]);
        assert_eq!((m.stream, m.device.as_deref()), (Some(0), Some("d2")));
        assert_eq!(m.mqtt_topic, "devices/d2/state");
        assert!(m.ack.is_some(), "acknowledged once dead-lettered");
        let reason = crate::store::db::dead_letter_reason(&m, crate::config::MAX_PAYLOAD_BYTES);
        assert!(reason.unwrap().contains(&format!("payload of {n} bytes")));
        let taken = intake::INTAKE_BYTES - budget.available();
        assert!(taken < KEEP + 1024, "{taken}");
    }

    #[tokio::test]
    async fn a_topic_that_is_not_utf8_matches_no_stream_and_says_so() {
        let mark = Mark::random();
        let budget = Budget::new(1 << 20);
        let p = through_guard(mark, 1, b"devices/\xff/state", b"{}");
        let m = to_store(mark, p, &budget).await;
        assert_eq!(m.stream, None);
        assert_eq!(m.guarded, Some(Guarded::TopicNotUtf8));
        assert_eq!(
            crate::store::db::dead_letter_reason(&m, 1024).as_deref(),
            Some("topic is not valid UTF-8")
        );
        assert_eq!(m.mqtt_topic, "$ferry/invalid-utf8/devices/%FF/state");
        assert_eq!(&m.payload[..], b"{}");
        assert!(m.ack.is_some());
    }

    #[tokio::test]
    async fn a_payload_with_another_processs_mark_is_an_ordinary_payload() {
        let mark = Mark::random();
        let budget = Budget::new(1 << 20);
        let p = through_guard(Mark::random(), 0, b"devices/\xfe/state", b"x");
        let len = p.payload.len();
        let m = to_store(mark, p, &budget).await;
        assert_eq!(m.payload.len(), len);
    }
}
