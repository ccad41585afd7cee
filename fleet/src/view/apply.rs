//! What a message from a status or retry topic means, and whether it may
//! be written: pure functions, no I/O.
//!
//! ## The apply rule
//!
//! A device's row holds the gateway and record number of the update it
//! shows. An update replaces it only if it is newer:
//!
//! - **same gateway**: its record number is higher. Record numbers rise per
//!   gateway and are never reused (the agent's invariant 2), so this is
//!   exact: a redelivery, a retry, a replay or an older record arriving
//!   late never writes over a newer state.
//! - **another gateway (the device moved)**: record numbers of two gateways
//!   do not compare, so the gateways' clocks decide: the update wins if it
//!   was received (`ferry.received_ms`) later than the row's. This keeps a
//!   late tail of the old gateway's updates, or a replay of them, from
//!   taking the device back. The price: a gateway whose clock is behind
//!   (a Pi without a real-time clock, before NTP) cannot take a device over
//!   until its clock passes the old gateway's last reading; its updates
//!   count as stale meanwhile (they stay in the topic; nothing is lost).
//!
//! Equal is stale: the row already holds that update.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::db::{Row, StateUpdate};

/// The agent's message properties (see the agent's uplink).
pub const GATEWAY: &str = "ferry.gateway";
pub const RECORD: &str = "ferry.record";
pub const RECEIVED_MS: &str = "ferry.received_ms";

/// The view's own properties, on its retry and dead-letter copies.
/// Attempts that failed so far.
pub const ATTEMPTS: &str = "ferry.view.attempts";
/// The status topic the update was first published on.
pub const ORIGIN_TOPIC: &str = "ferry.view.topic";
/// Why the last attempt failed.
pub const REASON: &str = "ferry.view.reason";
/// When it went to the dead-letter topic (ms since the epoch).
pub const FAILED_MS: &str = "ferry.view.failed_ms";

/// A message as consumed: the parts the view reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub properties: BTreeMap<String, String>,
}

/// Why a message can never be applied, however often it is tried.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Poison {
    #[error("no key (the device id)")]
    NoKey,
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("no {0} property")]
    Missing(&'static str),
    #[error("{name} is not a number below 2^63: {value:?}")]
    BadNumber { name: &'static str, value: String },
    #[error("{GATEWAY} says {claimed} on the status topic of gateway {topic_gateway}")]
    WrongGateway {
        claimed: String,
        topic_gateway: String,
    },
    #[error("a retry copy without its {ORIGIN_TOPIC} property")]
    NoOrigin,
}

/// A consumed message, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The status topic it was first published on.
    pub origin_topic: String,
    /// Attempts that failed before this one (0 on a status topic).
    pub failed_before: u32,
    pub update: Result<StateUpdate, Poison>,
}

/// How the view knows the topics it reads.
pub trait Topics {
    /// The gateway whose status topic this is, if it is one.
    fn gateway_of(&self, topic: &str) -> Option<&str>;
    /// Whether this is the view's retry topic.
    fn is_retry(&self, topic: &str) -> bool;
}

/// `persistent://t/n/x` and `t/n/x` name the same topic.
pub fn same_topic(a: &str, b: &str) -> bool {
    a.trim_start_matches("persistent://") == b.trim_start_matches("persistent://")
}

/// Reads a message of a status topic or of the retry topic.
pub fn parse(msg: &Incoming, topics: &impl Topics) -> Parsed {
    let from_retry = topics.is_retry(&msg.topic);
    let origin = if from_retry {
        msg.properties.get(ORIGIN_TOPIC).cloned()
    } else {
        Some(msg.topic.clone())
    };
    let failed_before = if from_retry {
        msg.properties
            .get(ATTEMPTS)
            .and_then(|a| a.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let Some(origin_topic) = origin else {
        return Parsed {
            origin_topic: msg.topic.clone(),
            failed_before,
            update: Err(Poison::NoOrigin),
        };
    };
    let update = read_update(msg, &origin_topic, topics);
    Parsed {
        origin_topic,
        failed_before,
        update,
    }
}

fn number(msg: &Incoming, name: &'static str) -> Result<Option<i64>, Poison> {
    msg.properties
        .get(name)
        .map(|v| {
            v.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Poison::BadNumber {
                    name,
                    value: v.chars().take(40).collect(),
                })
        })
        .transpose()
}

fn read_update(msg: &Incoming, origin: &str, topics: &impl Topics) -> Result<StateUpdate, Poison> {
    let device = msg
        .key
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or(Poison::NoKey)?;
    let gateway = msg
        .properties
        .get(GATEWAY)
        .cloned()
        .ok_or(Poison::Missing(GATEWAY))?;
    if let Some(owner) = topics.gateway_of(origin) {
        if owner != gateway {
            return Err(Poison::WrongGateway {
                claimed: gateway,
                topic_gateway: owner.to_string(),
            });
        }
    }
    let record = number(msg, RECORD)?.ok_or(Poison::Missing(RECORD))?;
    let received_ms = number(msg, RECEIVED_MS)?.unwrap_or(0);
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&msg.payload) {
        return Err(Poison::NotJson(e.to_string()));
    }
    // Valid JSON is valid UTF-8.
    let state =
        String::from_utf8(msg.payload.clone()).map_err(|e| Poison::NotJson(e.to_string()))?;
    Ok(StateUpdate {
        device,
        gateway,
        record,
        received_ms,
        state,
        topic: origin.to_string(),
    })
}

/// Whether an update may be written over a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Apply,
    Stale,
}

/// The apply rule (see the module's notes). The database implementations
/// decide the same in their one conditional write; this is the rule they
/// are tested against.
pub fn decide(update: &StateUpdate, row: Option<&Row>) -> Decision {
    let newer = match row {
        None => true,
        Some(r) if r.gateway == update.gateway => update.record > r.record,
        Some(r) => update.received_ms > r.received_ms,
    };
    if newer {
        Decision::Apply
    } else {
        Decision::Stale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;
    impl Topics for Two {
        fn gateway_of(&self, topic: &str) -> Option<&str> {
            match topic {
                "persistent://t/n/gw-a-status" => Some("gw-a"),
                "persistent://t/n/gw-b-status" => Some("gw-b"),
                _ => None,
            }
        }
        fn is_retry(&self, topic: &str) -> bool {
            same_topic(topic, "persistent://t/n/fleet-view-retry")
        }
    }

    fn msg(topic: &str, key: Option<&str>, payload: &str, props: &[(&str, &str)]) -> Incoming {
        Incoming {
            topic: topic.into(),
            key: key.map(Into::into),
            payload: payload.as_bytes().to_vec(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    const A: &str = "persistent://t/n/gw-a-status";

    #[test]
    fn a_status_message_becomes_an_update() {
        let m = msg(
            A,
            Some("d1"),
            r#"{"n":3}"#,
            &[(GATEWAY, "gw-a"), (RECORD, "17"), (RECEIVED_MS, "1000")],
        );
        let p = parse(&m, &Two);
        assert_eq!(p.failed_before, 0);
        assert_eq!(p.origin_topic, A);
        assert_eq!(
            p.update.unwrap(),
            StateUpdate {
                device: "d1".into(),
                gateway: "gw-a".into(),
                record: 17,
                received_ms: 1000,
                state: r#"{"n":3}"#.into(),
                topic: A.into(),
            }
        );
    }

    #[test]
    fn a_retry_copy_keeps_its_origin_and_counts_its_attempts() {
        let m = msg(
            "persistent://t/n/fleet-view-retry",
            Some("d1"),
            "{}",
            &[
                (GATEWAY, "gw-a"),
                (RECORD, "1"),
                (ATTEMPTS, "2"),
                (ORIGIN_TOPIC, A),
            ],
        );
        let p = parse(&m, &Two);
        assert_eq!((p.origin_topic.as_str(), p.failed_before), (A, 2));
        assert_eq!(p.update.unwrap().topic, A);
        let lost = msg("persistent://t/n/fleet-view-retry", Some("d1"), "{}", &[]);
        assert_eq!(parse(&lost, &Two).update, Err(Poison::NoOrigin));
    }

    #[test]
    fn what_can_never_apply_is_poison_with_its_reason() {
        let ok = [(GATEWAY, "gw-a"), (RECORD, "1")];
        let cases: [(Incoming, Poison); 6] = [
            (msg(A, None, "{}", &ok), Poison::NoKey),
            (
                msg(A, Some("d"), "not json", &ok),
                Poison::NotJson("expected ident at line 1 column 2".into()),
            ),
            (
                msg(A, Some("d"), "{}", &[(RECORD, "1")]),
                Poison::Missing(GATEWAY),
            ),
            (
                msg(A, Some("d"), "{}", &[(GATEWAY, "gw-a")]),
                Poison::Missing(RECORD),
            ),
            (
                msg(A, Some("d"), "{}", &[(GATEWAY, "gw-a"), (RECORD, "-1")]),
                Poison::BadNumber {
                    name: RECORD,
                    value: "-1".into(),
                },
            ),
            (
                msg(A, Some("d"), "{}", &[(GATEWAY, "gw-b"), (RECORD, "1")]),
                Poison::WrongGateway {
                    claimed: "gw-b".into(),
                    topic_gateway: "gw-a".into(),
                },
            ),
        ];
        for (m, want) in cases {
            assert_eq!(parse(&m, &Two).update, Err(want));
        }
        assert_eq!(
            Poison::Missing(RECORD).to_string(),
            "no ferry.record property"
        );
    }

    fn upd(gateway: &str, record: i64, received_ms: i64) -> StateUpdate {
        StateUpdate {
            device: "d".into(),
            gateway: gateway.into(),
            record,
            received_ms,
            state: "{}".into(),
            topic: A.into(),
        }
    }

    fn row(gateway: &str, record: i64, received_ms: i64) -> Row {
        Row {
            device: "d".into(),
            gateway: gateway.into(),
            record,
            received_ms,
            state: serde_json::json!({}),
        }
    }

    #[test]
    fn only_a_newer_record_of_the_same_gateway_applies() {
        let r = row("gw-a", 10, 500);
        assert_eq!(decide(&upd("gw-a", 11, 1), Some(&r)), Decision::Apply);
        assert_eq!(decide(&upd("gw-a", 10, 999), Some(&r)), Decision::Stale);
        assert_eq!(decide(&upd("gw-a", 9, 999), Some(&r)), Decision::Stale);
        assert_eq!(decide(&upd("gw-a", 0, 0), None), Decision::Apply);
    }

    #[test]
    fn a_moved_device_is_taken_over_by_the_later_reception() {
        let r = row("gw-a", 10, 500);
        assert_eq!(decide(&upd("gw-b", 1, 501), Some(&r)), Decision::Apply);
        assert_eq!(decide(&upd("gw-b", 99, 500), Some(&r)), Decision::Stale);
        assert_eq!(decide(&upd("gw-b", 99, 499), Some(&r)), Decision::Stale);
    }
}
