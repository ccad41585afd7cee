//! Where an update goes when it cannot be applied, and the copies that
//! carry it there: pure functions, no I/O.
//!
//! ## Every failure is retried, then dead-lettered
//!
//! Whether the database refused the update ([`Failure::Transient`]) or the
//! message cannot be read ([`Poison`]: no key, payload not JSON, a missing
//! or broken `ferry.record` / `ferry.gateway`), the update goes to the
//! retry topic, delivered again [`crate::config::ViewConfig`] `retry_delay`
//! later (`deliver_at_time`; the broker holds it back, which it does on
//! Shared and Key_Shared subscriptions), its failed attempts counted in
//! `ferry.view.attempts`. After `max_attempts` attempts in all it goes to
//! the dead-letter topic. This is Pulsar's own dead-letter policy (a
//! redelivery count, whatever the failure): a message only this view
//! version cannot read gets the same chances as a refusal, at the cost of a
//! copy in the retry topic for `max_attempts × retry_delay`. The broker
//! releases a delayed message up to its `delayedDeliveryTickTimeMillis`
//! (1 s by default) early unless `isDelayedDeliveryDeliverAtTimeStrict=true`:
//! with a 1 s delay on the test stack the three attempts came about 0.1 s
//! apart; the default delay (10 s) is barely affected.
//!
//! Each copy keeps the original key, payload and properties, and adds the
//! topic the update was first published on and the reason of the last
//! failure, so that `dlq list` can say what it was and `dlq replay` can put
//! it back where it came from.

use std::collections::HashMap;
use std::time::Duration;

use pulsar::producer::Message;

use super::apply::{Incoming, Poison, ATTEMPTS, FAILED_MS, ORIGIN_TOPIC, REASON};

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Can never apply.
    Poison(Poison),
    /// The database said no, this time (its message).
    Transient(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Poison(p) => write!(f, "{p}"),
            Failure::Transient(e) => write!(f, "{e}"),
        }
    }
}

/// Where a failed update goes next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the retry topic, attempts failed so far, delivered at (ms).
    Retry { attempts: u32, deliver_at_ms: i64 },
    /// To the dead-letter topic, after this many attempts.
    DeadLetter { attempts: u32 },
}

/// Decides where an update goes whose attempt number `failed_before + 1`
/// just failed (whatever the failure: see the module's doc).
pub fn route_failure(
    failed_before: u32,
    max_attempts: u32,
    retry_delay: Duration,
    now_ms: i64,
) -> Route {
    let attempts = failed_before.saturating_add(1);
    if attempts < max_attempts {
        Route::Retry {
            attempts,
            deliver_at_ms: now_ms.saturating_add(retry_delay.as_millis() as i64),
        }
    } else {
        Route::DeadLetter { attempts }
    }
}

/// The original's properties with the view's own replaced.
fn properties(
    msg: &Incoming,
    origin_topic: &str,
    extra: &[(&str, String)],
) -> HashMap<String, String> {
    let mut p: HashMap<String, String> = msg
        .properties
        .iter()
        .filter(|(k, _)| ![ATTEMPTS, ORIGIN_TOPIC, REASON, FAILED_MS].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    p.insert(ORIGIN_TOPIC.into(), origin_topic.into());
    for (k, v) in extra {
        p.insert((*k).into(), v.clone());
    }
    p
}

fn copy(
    msg: &Incoming,
    properties: HashMap<String, String>,
    deliver_at_ms: Option<i64>,
) -> Message {
    Message {
        payload: msg.payload.clone(),
        properties,
        // The device id stays the key, so Key_Shared keeps a device's
        // copies on one consumer.
        partition_key: msg.key.clone(),
        deliver_at_time: deliver_at_ms,
        ..Default::default()
    }
}

/// The copy of a failed update for the retry topic.
pub fn retry_copy(
    msg: &Incoming,
    origin_topic: &str,
    attempts: u32,
    reason: &Failure,
    deliver_at_ms: i64,
) -> Message {
    let p = properties(
        msg,
        origin_topic,
        &[
            (ATTEMPTS, attempts.to_string()),
            (REASON, reason.to_string()),
        ],
    );
    copy(msg, p, Some(deliver_at_ms))
}

/// The copy of a failed update for the dead-letter topic.
pub fn dead_letter_copy(
    msg: &Incoming,
    origin_topic: &str,
    attempts: u32,
    reason: &Failure,
    now_ms: i64,
) -> Message {
    let p = properties(
        msg,
        origin_topic,
        &[
            (ATTEMPTS, attempts.to_string()),
            (REASON, reason.to_string()),
            (FAILED_MS, now_ms.to_string()),
        ],
    );
    copy(msg, p, None)
}

/// A dead letter put back on the retry topic by `dlq replay`: delivered at
/// once, its attempts reset (the view counts from 1 again), its original
/// topic kept.
pub fn replay_copy(dead: &Incoming) -> Message {
    let origin = dead
        .properties
        .get(ORIGIN_TOPIC)
        .cloned()
        .unwrap_or_else(|| dead.topic.clone());
    copy(dead, properties(dead, &origin, &[]), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_failure_is_retried_until_the_last_attempt() {
        assert_eq!(
            route_failure(0, 3, MIN, 1_000),
            Route::Retry {
                attempts: 1,
                deliver_at_ms: 61_000
            }
        );
        assert_eq!(
            route_failure(1, 3, MIN, 5),
            Route::Retry {
                attempts: 2,
                deliver_at_ms: 60_005
            }
        );
        assert_eq!(
            route_failure(2, 3, MIN, 5),
            Route::DeadLetter { attempts: 3 }
        );
        assert_eq!(
            route_failure(0, 1, MIN, 5),
            Route::DeadLetter { attempts: 1 }
        );
    }

    fn original() -> Incoming {
        Incoming {
            topic: "persistent://t/n/fleet-view-retry".into(),
            key: Some("d1".into()),
            payload: b"{}".to_vec(),
            properties: [
                ("ferry.gateway", "gw-a"),
                ("ferry.record", "7"),
                (ATTEMPTS, "1"),
                (ORIGIN_TOPIC, "persistent://t/n/gw-a-status"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        }
    }

    #[test]
    fn copies_keep_key_payload_and_properties_and_say_why() {
        let why = Failure::Transient("refused".into());
        let r = retry_copy(&original(), "persistent://t/n/gw-a-status", 2, &why, 99);
        assert_eq!(r.partition_key.as_deref(), Some("d1"));
        assert_eq!(r.deliver_at_time, Some(99));
        assert_eq!(r.properties[ATTEMPTS], "2");
        assert_eq!(r.properties[REASON], "refused");
        assert_eq!(r.properties["ferry.record"], "7");
        let d = dead_letter_copy(&original(), "persistent://t/n/gw-a-status", 3, &why, 5);
        assert_eq!(d.deliver_at_time, None);
        assert_eq!(d.properties[FAILED_MS], "5");
        assert_eq!(d.properties[ORIGIN_TOPIC], "persistent://t/n/gw-a-status");
        let dead = Incoming {
            topic: "persistent://t/n/fleet-view-dlq".into(),
            properties: d.properties.clone().into_iter().collect(),
            key: d.partition_key.clone(),
            payload: d.payload.clone(),
        };
        let again = replay_copy(&dead);
        assert!(!again.properties.contains_key(ATTEMPTS));
        assert!(!again.properties.contains_key(REASON));
        assert!(!again.properties.contains_key(FAILED_MS));
        assert_eq!(
            again.properties[ORIGIN_TOPIC],
            "persistent://t/n/gw-a-status"
        );
        assert_eq!(again.payload, b"{}");
    }
}
