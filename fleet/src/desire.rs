//! `ferry-fleet desire`: writes one device's desired state to its
//! gateway's desired topic, for the agent's downlink: key = the device id,
//! payload = the document (empty: clears it), property `version` = the
//! device's next version.
//!
//! ## Why the agent's protocol core and not the `pulsar` crate
//!
//! Exactly once needs a producer whose name is stable and whose sequence
//! ids continue from the broker's `last_sequence_id`. The `pulsar` crate
//! lets a producer be named, but numbers every producer's messages from 0
//! and never says what the broker last holds: with a stable name, its
//! second run's first message would be dropped as a duplicate. Ferry's own
//! client ([`ferry::uplink`]) reports `last_sequence_id` on
//! PRODUCER_SUCCESS, sends the sequence id it is given, and reads with a
//! non-durable compacted reader up to `GET_LAST_MESSAGE_ID`, with the same
//! TLS, token and lookup handling as the agent.
//!
//! ## One run
//!
//! 1. The producer `ferry-fleet-desire-<gateway>` on the desired topic. The
//!    broker allows one producer of a name on a topic, so two `desire` runs
//!    for one gateway cannot interleave steps 2 and 3.
//! 2. The device's newest version and document: a compacted read of the
//!    topic up to its last message id (taken after step 1, so it holds
//!    everything an earlier run wrote).
//! 3. [`decide`]: the same document already there writes nothing; else
//!    version + 1 with sequence id `last_sequence_id + 1` (1 on a new
//!    producer), until the
//!    broker's receipt.
//!
//! A transient failure starts the run again. Once a message was sent, the
//! retry does not decide again: the producer's new `last_sequence_id` says
//! whether the broker holds it (done) or not (the same message, same
//! sequence id, is sent again; a duplicate would be dropped by the broker's
//! deduplication). A run whose answer was lost and that is started again
//! finds its document at step 2 and writes nothing.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry::config::{TlsConfig, TokenSource, UplinkConfig};
use ferry::downlink::message::{read_message, VERSION_PROPERTY};
use ferry::store::db::{desired_reject_reason, parse_version, DesiredUpdate};
use ferry::uplink::conn::Endpoint;
use ferry::uplink::frame;
use ferry::uplink::link::{create_producer, until, within, PRODUCER_ID};
use ferry::uplink::producer::Receipt;
use ferry::uplink::{connect_to_topic, ErrorClass, Event, Protocol, UplinkError, UplinkSettings};
use pulsar::proto::{KeyValue, MessageMetadata};
use thiserror::Error;

use crate::config::{FleetConfig, PulsarConfig, TopicRole};
use crate::reader::Reader;

/// Runs before a transient failure is final.
const ATTEMPTS: u32 = 5;

#[derive(Debug, Error)]
pub enum DesireError {
    #[error("gateway {0} is not in fleet.toml")]
    UnknownGateway(String),
    #[error("device {device:?}: {reason}")]
    BadDevice { device: String, reason: String },
    #[error("pulsar.service_url: {0}")]
    ServiceUrl(String),
    #[error("{topic}: {source}")]
    Pulsar { topic: String, source: UplinkError },
}

impl DesireError {
    /// Whether the command line was wrong (exit 2) rather than the run.
    pub fn is_usage(&self) -> bool {
        !matches!(self, DesireError::Pulsar { .. })
    }
}

/// The newest desired state the topic holds for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub version: u64,
    pub document: Vec<u8>,
}

/// What a run does, given the device's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write the document as this version.
    Write { version: u64 },
    /// The topic already holds this document as the device's newest version.
    Unchanged { version: u64 },
    /// Clearing a device the topic holds nothing for.
    NothingToClear,
}

/// The next version, or why nothing is to be written.
pub fn decide(current: Option<&Current>, document: &[u8]) -> Decision {
    match current {
        Some(c) if c.document == document => Decision::Unchanged { version: c.version },
        Some(c) => Decision::Write {
            version: c.version + 1,
        },
        None if document.is_empty() => Decision::NothingToClear,
        None => Decision::Write { version: 1 },
    }
}

/// Takes one message of the topic into `current` if it is `device`'s and
/// carries a version the agent would accept and at least as high (later
/// messages win a tie, as in the compacted view).
pub fn fold(current: &mut Option<Current>, device: &str, update: &DesiredUpdate) {
    if update.problem.is_some() || update.device.as_deref() != Some(device) {
        return;
    }
    let Some(version) = update.version.as_deref().and_then(parse_version) else {
        return;
    };
    if current.as_ref().is_some_and(|c| c.version > version) {
        return;
    }
    *current = Some(Current {
        version,
        document: update.payload.to_vec(),
    });
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub topic: String,
    pub device: String,
    pub decision: Decision,
}

impl Outcome {
    /// The line `desire` prints.
    pub fn line(&self) -> String {
        let (d, t) = (&self.device, &self.topic);
        match self.decision {
            Decision::Write { version } => format!("{d}: version {version} written to {t}"),
            Decision::Unchanged { version } => {
                format!("{d}: unchanged, version {version} on {t} already holds this document; nothing written")
            }
            Decision::NothingToClear => {
                format!("{d}: no desired state on {t} to clear; nothing written")
            }
        }
    }
}

/// The stable producer name of `desire` on a gateway's desired topic (the
/// broker keys its deduplication by it).
pub fn producer_name(gateway: &str) -> String {
    format!("ferry-fleet-desire-{gateway}")
}

/// Writes `document` as `device`'s next desired version on `gateway`'s
/// desired topic, exactly once (see the module's note).
pub async fn desire(
    config: &FleetConfig,
    gateway: &str,
    device: &str,
    document: Vec<u8>,
) -> Result<Outcome, DesireError> {
    if !config.gateways.iter().any(|g| g == gateway) {
        return Err(DesireError::UnknownGateway(gateway.to_string()));
    }
    // The agent's own rule for keys (its dead letters otherwise).
    let probe = DesiredUpdate {
        device: Some(device.to_string()),
        version: Some("1".into()),
        payload: bytes::Bytes::new(),
        problem: None,
    };
    if let Some(reason) = desired_reject_reason(&probe, usize::MAX) {
        return Err(DesireError::BadDevice {
            device: device.to_string(),
            reason,
        });
    }
    let topic = config.topic(gateway, TopicRole::Desired);
    let s = settings(&config.pulsar, &topic, &producer_name(gateway))?;
    let mut backoff =
        ferry::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut sent = None;
    let mut attempt = 1;
    loop {
        match run_once(&s, device, &document, &mut sent).await {
            Ok(decision) => {
                return Ok(Outcome {
                    topic,
                    device: device.to_string(),
                    decision,
                })
            }
            Err(e) if e.class() == ErrorClass::Transient && attempt < ATTEMPTS => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64,
                    "desire: trying again");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(source) => return Err(DesireError::Pulsar { topic, source }),
        }
    }
}

/// A message sent in an earlier attempt of this run.
#[derive(Debug, Clone, Copy)]
struct Sent {
    sequence_id: u64,
    version: u64,
}

async fn run_once(
    s: &UplinkSettings,
    device: &str,
    document: &[u8],
    sent: &mut Option<Sent>,
) -> Result<Decision, UplinkError> {
    let mut proto = Protocol::new(s.auth.is_some(), &s.topic);
    let mut conn = connect_to_topic(s, &mut proto).await?;
    let last = create_producer(&mut conn, &mut proto, s, &s.producer_name).await?;
    proto.open_window(PRODUCER_ID, last);
    let (sequence_id, version) = match *sent {
        // The broker holds what the earlier attempt sent.
        Some(m) if last >= m.sequence_id as i64 => {
            return Ok(Decision::Write { version: m.version })
        }
        Some(m) => (m.sequence_id, m.version),
        None => {
            let current = read_current(s, device).await?;
            match decide(current.as_ref(), document) {
                // Sequence ids start at 1, as the agent's record numbers.
                Decision::Write { version } => (last.max(0) as u64 + 1, version),
                other => return Ok(other),
            }
        }
    };
    *sent = Some(Sent {
        sequence_id,
        version,
    });
    let send = proto
        .send(PRODUCER_ID, sequence_id, document.len(), Instant::now())
        .expect("the producer was created above");
    let metadata = MessageMetadata {
        producer_name: s.producer_name.clone(),
        sequence_id,
        publish_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        partition_key: Some(device.to_string()),
        properties: vec![KeyValue {
            key: VERSION_PROPERTY.into(),
            value: version.to_string(),
        }],
        ..Default::default()
    };
    frame::encode_send(&send, &metadata, document, &mut conn.wbuf);
    conn.flush().await?;
    let receipt = until(&mut conn, &mut proto, s, |e| match e {
        Event::Receipt {
            producer_id: PRODUCER_ID,
            receipt: Receipt::Confirmed { seq, .. },
        } if seq >= sequence_id => Some(Ok(())),
        Event::ProducerClosed { .. } => Some(Err(UplinkError::ProducerClosed)),
        _ => None,
    });
    within(s.operation_timeout(), "the send receipt", receipt).await??;
    Ok(Decision::Write { version })
}

/// The device's newest version on the topic: a non-durable compacted read
/// from the start up to the topic's last message id.
async fn read_current(s: &UplinkSettings, device: &str) -> Result<Option<Current>, UplinkError> {
    let mut current = None;
    let mut reader = Reader::open(s, true).await?;
    while let Some(chunk) = reader.next_chunk().await? {
        for m in chunk {
            for r in read_message(&m.id, &m.metadata, &m.payload) {
                fold(&mut current, device, &r.update);
            }
        }
    }
    Ok(current)
}

/// The agent's client settings for `topic`, from `[pulsar]` of fleet.toml.
pub(crate) fn settings(
    p: &PulsarConfig,
    topic: &str,
    producer_name: &str,
) -> Result<UplinkSettings, DesireError> {
    let (host, port, tls) =
        ferry::config::parse_service_url(&p.service_url).map_err(DesireError::ServiceUrl)?;
    Ok(UplinkSettings {
        dest: 0,
        cluster: 0,
        drains_first: false,
        gateway_id: "ferry-fleet".into(),
        service: Endpoint { host, port, tls },
        tls: tls.then(|| TlsConfig {
            ca_file: p.ca_file.clone(),
            use_system_roots: p.ca_file.is_none(),
            client_cert: None,
        }),
        auth: p.token_file.clone().map(TokenSource::File),
        topic: topic.to_string(),
        name: topic.to_string(),
        producer_name: producer_name.to_string(),
        uplink: UplinkConfig {
            max_in_flight: 1,
            max_in_flight_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(10),
            operation_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(device: &str, version: &str, payload: &str) -> DesiredUpdate {
        DesiredUpdate {
            device: Some(device.into()),
            version: Some(version.into()),
            payload: bytes::Bytes::copy_from_slice(payload.as_bytes()),
            problem: None,
        }
    }

    fn current(version: u64, document: &str) -> Current {
        Current {
            version,
            document: document.as_bytes().to_vec(),
        }
    }

    #[test]
    fn the_first_document_is_version_1_and_each_change_the_next() {
        assert_eq!(decide(None, b"{}"), Decision::Write { version: 1 });
        let c = current(7, "{\"a\":1}");
        assert_eq!(
            decide(Some(&c), b"{\"a\":2}"),
            Decision::Write { version: 8 }
        );
        assert_eq!(decide(Some(&c), b""), Decision::Write { version: 8 });
    }

    #[test]
    fn the_same_document_again_writes_nothing() {
        let c = current(2, "{\"a\":1}");
        assert_eq!(
            decide(Some(&c), b"{\"a\":1}"),
            Decision::Unchanged { version: 2 }
        );
        let cleared = current(3, "");
        assert_eq!(
            decide(Some(&cleared), b""),
            Decision::Unchanged { version: 3 }
        );
        assert_eq!(decide(None, b""), Decision::NothingToClear);
    }

    #[test]
    fn only_the_devices_readable_versions_count_and_the_highest_wins() {
        let mut c = None;
        fold(&mut c, "d1", &update("d2", "9", "other device"));
        fold(&mut c, "d1", &update("d1", "2", "two"));
        fold(&mut c, "d1", &update("d1", "x", "not a version"));
        fold(&mut c, "d1", &update("d1", "0", "zero is not a version"));
        fold(
            &mut c,
            "d1",
            &update("d1", "1", "older, later in the topic"),
        );
        assert_eq!(c, Some(current(2, "two")));
        let mut broken = update("d1", "5", "");
        broken.problem = Some("compressed".into());
        fold(&mut c, "d1", &broken);
        fold(&mut c, "d1", &update("d1", "3", ""));
        assert_eq!(c, Some(current(3, "")));
    }

    #[test]
    fn producer_names_are_stable_per_gateway() {
        assert_eq!(producer_name("gw-1"), "ferry-fleet-desire-gw-1");
    }
}
