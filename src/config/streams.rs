//! The streams: either `[[streams]]`, or the one-stream shorthand
//! (`mqtt.subscriptions` and `pulsar.topic`), which is a `state` stream named
//! `status` with the default policy and no limits of its own. Each becomes a
//! [`StreamConfig`]; every problem is reported under the key it came from
//! (`streams[1].overflow`, or `mqtt.subscriptions[0].filter` for the
//! shorthand).

use std::time::Duration;

use super::raw::{RawStream, RawSubscription};
use super::validate::{valid_name, Validator, NAME_RULE};
use super::{
    Limits, Overflow, StreamConfig, StreamKind, Subscription, MAX_AGE_SECS, MAX_RECORDS,
    MAX_SIZE_BYTES,
};

/// Every stream of the file, in order. `short_subs` and `short_topic` are
/// the shorthand's `mqtt.subscriptions` and `pulsar.topic`.
pub(super) fn streams(
    v: &mut Validator,
    short_subs: Option<Vec<RawSubscription>>,
    short_topic: Option<String>,
    raw: Option<Vec<RawStream>>,
) -> Vec<StreamConfig> {
    let list = match raw {
        Some(list) => listed(v, short_subs.is_some(), short_topic.is_some(), list),
        None => match shorthand(v, short_subs, short_topic) {
            Some(one) => vec![one],
            None => return Vec::new(),
        },
    };
    let mut out: Vec<StreamConfig> = Vec::new();
    let mut at = Vec::new();
    let mut topics = Destinations::default();
    for (keys, s) in list {
        let stream = stream(v, &keys, s, &out, &mut topics);
        out.push(stream);
        at.push(keys);
    }
    apart(v, &at, &out);
    out
}

/// A `reject` stream has an MQTT session of its own (see
/// [`crate::layout::Layout::sessions`]): a message both its filters and
/// another session's match would be received, and stored, twice.
fn apart(v: &mut Validator, keys: &[Keys], streams: &[StreamConfig]) {
    for (j, b) in streams.iter().enumerate() {
        for (i, a) in streams[..j].iter().enumerate() {
            if a.overflow != Overflow::Reject && b.overflow != Overflow::Reject {
                continue;
            }
            for sa in a.subscriptions.iter().enumerate() {
                for (y, sb) in b.subscriptions.iter().enumerate() {
                    if crate::layout::filters_overlap(&sa.1.filter, &sb.filter) {
                        let other = keys[i].key(&format!("subscriptions[{}].filter", sa.0));
                        v.error(
                            &keys[j].key(&format!("subscriptions[{y}].filter")),
                            &format!("`{}` overlaps `{}` of {other}: a `reject` stream has an MQTT session of its own, and a message both match would be received twice", sb.filter, sa.1.filter),
                        );
                    }
                }
            }
        }
    }
}

/// `[[streams]]`: the shorthand's keys are refused beside it.
fn listed(
    v: &mut Validator,
    short_subs: bool,
    short_topic: bool,
    list: Vec<RawStream>,
) -> Vec<(Keys, RawStream)> {
    if short_subs {
        v.error(
            "mqtt.subscriptions",
            "not allowed together with [[streams]]: give each stream its subscriptions",
        );
    }
    if short_topic {
        v.error(
            "pulsar.topic",
            "not allowed together with [[streams]]: give each stream its topic",
        );
    }
    if list.is_empty() {
        v.error("streams", "at least one stream is required");
    }
    list.into_iter()
        .enumerate()
        .map(|(i, s)| {
            let keys = Keys {
                at: format!("streams[{i}]"),
            };
            (keys, s)
        })
        .collect()
}

/// The one-stream shorthand as the stream it stands for; `None` when the
/// file has no stream at all.
fn shorthand(
    v: &mut Validator,
    short_subs: Option<Vec<RawSubscription>>,
    short_topic: Option<String>,
) -> Option<(Keys, RawStream)> {
    if short_subs.is_none() && short_topic.is_none() {
        v.error(
            "streams",
            "at least one stream is required ([[streams]], or mqtt.subscriptions with pulsar.topic)",
        );
        return None;
    }
    if short_topic.is_none() {
        v.error("pulsar.topic", "is required");
    }
    let s = RawStream {
        name: Some("status".into()),
        topic: short_topic,
        subscriptions: short_subs,
        ..RawStream::default()
    };
    // Problems are reported under the shorthand's own keys.
    Some((Keys { at: String::new() }, s))
}

/// Where one stream's settings are in the file.
struct Keys {
    /// `streams[i]`; empty for the shorthand.
    at: String,
}

impl Keys {
    fn shorthand(&self) -> bool {
        self.at.is_empty()
    }

    /// The key path of setting `k`: `streams[i].k`, or for the shorthand
    /// `mqtt.subscriptions...` and `pulsar.k`.
    fn key(&self, k: &str) -> String {
        if !self.shorthand() {
            format!("{}.{k}", self.at)
        } else if k == "subscriptions" || k.starts_with("subscriptions[") {
            format!("mqtt.{k}")
        } else {
            format!("pulsar.{k}")
        }
    }
}

/// One stream. `before` holds the streams before it (names are unique);
/// `topics` every destination claimed so far (each topic has one stream).
fn stream(
    v: &mut Validator,
    keys: &Keys,
    s: RawStream,
    before: &[StreamConfig],
    topics: &mut Destinations,
) -> StreamConfig {
    let name = name(v, keys, s.name, before);
    let kind = kind(v, keys, s.kind.as_deref());
    let overflow = overflow(v, keys, kind, s.overflow.as_deref());
    let subscriptions = subscriptions(v, keys, s.subscriptions);
    match &s.topic {
        Some(t) => topics.claim(v, keys, "topic", t),
        None if keys.shorthand() => {} // reported as pulsar.topic
        None => v.error(&keys.key("topic"), "is required"),
    }
    if let Some(h) = &s.history_topic {
        if kind == StreamKind::Events {
            v.error(
                &keys.key("history_topic"),
                "only a state stream has a history topic (an events topic already keeps every event)",
            );
        } else {
            topics.claim(v, keys, "history_topic", h);
        }
    }
    let limits = limits(v, keys, s.max_records, s.max_bytes, s.max_age_secs);
    check_reject(v, keys, overflow, &limits);
    StreamConfig {
        name,
        kind,
        subscriptions,
        topic: s.topic.unwrap_or_default(),
        history_topic: if kind == StreamKind::State {
            s.history_topic
        } else {
            None
        },
        overflow,
        limits,
    }
}

fn name(v: &mut Validator, keys: &Keys, raw: Option<String>, before: &[StreamConfig]) -> String {
    let name = v.required(&keys.key("name"), raw).unwrap_or_default();
    if !name.is_empty() && !valid_name(&name) {
        v.error(&keys.key("name"), NAME_RULE);
    }
    if before.iter().any(|o| o.name == name) {
        v.error(
            &keys.key("name"),
            &format!("`{name}` is used by another stream"),
        );
    }
    name
}

fn kind(v: &mut Validator, keys: &Keys, raw: Option<&str>) -> StreamKind {
    match raw.unwrap_or("state") {
        "state" => StreamKind::State,
        "events" => StreamKind::Events,
        other => {
            v.error(
                &keys.key("kind"),
                &format!("must be \"state\" or \"events\", found \"{other}\""),
            );
            StreamKind::State
        }
    }
}

/// The policy, by default `coalesce` for state and `drop-oldest` for events.
fn overflow(v: &mut Validator, keys: &Keys, kind: StreamKind, raw: Option<&str>) -> Overflow {
    let default = match kind {
        StreamKind::State => "coalesce",
        StreamKind::Events => "drop-oldest",
    };
    match raw.unwrap_or(default) {
        "coalesce" if kind == StreamKind::Events => {
            v.error(
                &keys.key("overflow"),
                "coalesce needs kind = \"state\": events are never coalesced",
            );
            Overflow::DropOldest
        }
        "coalesce" => Overflow::Coalesce,
        "drop-oldest" => Overflow::DropOldest,
        "reject" => Overflow::Reject,
        other => {
            v.error(
                &keys.key("overflow"),
                &format!("must be coalesce, drop-oldest or reject, found \"{other}\""),
            );
            Overflow::Coalesce
        }
    }
}

/// At least one; each a valid filter whose device id level is a wildcard.
fn subscriptions(
    v: &mut Validator,
    keys: &Keys,
    raw: Option<Vec<RawSubscription>>,
) -> Vec<Subscription> {
    let list = match raw {
        Some(l) if !l.is_empty() => l,
        _ => {
            v.error(
                &keys.key("subscriptions"),
                "at least one subscription is required",
            );
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (j, sub) in list.into_iter().enumerate() {
        let at = keys.key(&format!("subscriptions[{j}]"));
        let filter = v.required(&format!("{at}.filter"), sub.filter);
        let level = v.required(&format!("{at}.device_id_level"), sub.device_id_level);
        if let (Some(filter), Some(level)) = (filter, level) {
            if let Err(msg) = check_filter(&filter) {
                v.error(&format!("{at}.filter"), &msg);
            } else if let Err(msg) = check_device_level(&filter, level) {
                v.error(&format!("{at}.device_id_level"), &msg);
            } else {
                out.push(Subscription {
                    filter,
                    device_id_level: level as usize,
                });
            }
        }
    }
    out
}

/// The destination topics claimed so far, each with the key that claimed it.
#[derive(Default)]
struct Destinations(Vec<(String, String)>);

impl Destinations {
    /// Checks topic `t` of setting `k` and claims it: each topic has one
    /// producer and one sequence, so one stream.
    fn claim(&mut self, v: &mut Validator, keys: &Keys, k: &str, t: &str) {
        let key = keys.key(k);
        if let Err(msg) = check_topic(t) {
            v.error(&key, &msg);
        } else if let Some((other, _)) = self.0.iter().find(|(_, seen)| seen == t) {
            v.error(
                &key,
                &format!("`{t}` is already the destination of {other}: each topic has one producer and one sequence"),
            );
        } else {
            self.0.push((key, t.to_string()));
        }
    }
}

fn limits(
    v: &mut Validator,
    keys: &Keys,
    max_records: Option<i64>,
    max_bytes: Option<i64>,
    max_age_secs: Option<i64>,
) -> Limits {
    let mut positive = |k: &str, n: Option<i64>, max: i64| -> Option<u64> {
        match n {
            Some(n) if n < 1 || n > max => {
                v.error(
                    &keys.key(k),
                    &format!("must be between 1 and {max}, found {n}"),
                );
                None
            }
            n => n.map(|n| n as u64),
        }
    };
    Limits {
        max_records: positive("max_records", max_records, MAX_RECORDS),
        max_bytes: positive("max_bytes", max_bytes, MAX_SIZE_BYTES),
        max_age: positive("max_age_secs", max_age_secs, MAX_AGE_SECS).map(Duration::from_secs),
    }
}

/// `reject` never drops a record, and stops acking at a size limit.
fn check_reject(v: &mut Validator, keys: &Keys, overflow: Overflow, limits: &Limits) {
    if overflow != Overflow::Reject {
        return;
    }
    if limits.max_age.is_some() {
        v.error(
            &keys.key("max_age_secs"),
            "not with overflow = \"reject\", which never drops a record",
        );
    }
    if limits.max_records.is_none() && limits.max_bytes.is_none() {
        v.error(
            &keys.key("overflow"),
            "reject needs max_records or max_bytes: the limit at which MQTT acks stop",
        );
    }
}

/// An MQTT topic filter: `+` fills a whole level, `#` only the last one.
fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("must not be empty".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "`{filter}` is not a valid MQTT filter: `#` must be a whole last level"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "`{filter}` is not a valid MQTT filter: `+` must fill a whole level"
            ));
        }
    }
    Ok(())
}

/// The device id must come from a wildcard level, so that it varies per
/// device.
fn check_device_level(filter: &str, level: i64) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    if level < 0 {
        return Err(format!("must be 0 or more, found {level}"));
    }
    let l = level as usize;
    let multi = levels.iter().position(|s| *s == "#");
    match levels.get(l) {
        Some(&"+") => Ok(()),
        _ if multi.is_some_and(|m| l >= m) => Ok(()),
        Some(other) => Err(format!(
            "level {l} of `{filter}` is the fixed word `{other}`; it must be a `+` or `#` wildcard level"
        )),
        None => Err(format!("`{filter}` has only {} levels (counted from 0)", levels.len())),
    }
}

pub(super) fn check_topic(topic: &str) -> Result<(), String> {
    let Some(rest) = topic.strip_prefix("persistent://") else {
        return Err(format!(
            "`{topic}` must be fully qualified: persistent://tenant/namespace/topic"
        ));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "`{topic}` must be fully qualified: persistent://tenant/namespace/topic"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Durability, DEFAULT_STORE_MAX_BYTES};
    use super::*;

    #[test]
    fn streams_are_checked_each_with_its_path() {
        let text = r#"
gateway_id = "gw"
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
[store]
path = "/tmp/x.db"
durability = "interval"
sync_interval_ms = 500
[[streams]]
name = "status"
topic = "persistent://t/n/status"
history_topic = "persistent://t/n/history"
max_records = 1000
max_age_secs = 3600
subscriptions = [{ filter = "devices/+/state", device_id_level = 1 }]
[[streams]]
name = "alarms"
kind = "events"
overflow = "reject"
max_bytes = 1048576
topic = "persistent://t/n/alarms"
subscriptions = [{ filter = "devices/+/alarm", device_id_level = 1 }]
"#;
        let c = parse(text).unwrap();
        assert_eq!(c.streams.len(), 2);
        assert_eq!(c.streams[0].overflow, Overflow::Coalesce);
        assert_eq!(c.streams[0].limits.max_age, Some(Duration::from_secs(3600)));
        assert_eq!(c.streams[1].kind, StreamKind::Events);
        assert_eq!(c.streams[1].overflow, Overflow::Reject);
        assert_eq!(
            c.store.durability,
            Durability::Interval(Duration::from_millis(500))
        );
        assert_eq!(c.store.max_bytes, Some(DEFAULT_STORE_MAX_BYTES as u64));

        let bad = text
            .replace("name = \"alarms\"", "name = \"status\"")
            .replace(
                "kind = \"events\"",
                "kind = \"events\"\nhistory_topic = \"persistent://t/n/status\"",
            )
            .replace("max_bytes = 1048576", "max_age_secs = 5")
            .replace("max_records = 1000", "max_records = 0")
            .replace("durability = \"interval\"", "durability = \"sometimes\"");
        let errs = parse(&format!("{bad}\n[mqtt]\nsubscriptions = []\n")).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "mqtt.subscriptions",
                "streams[0].max_records",
                "streams[1].name",
                "streams[1].history_topic",
                "streams[1].max_age_secs",
                "streams[1].overflow",
                "store.durability",
                "store.sync_interval_ms",
            ],
            "{errs:?}"
        );
        let coalesce_events = text.replace("overflow = \"reject\"", "overflow = \"coalesce\"");
        assert_eq!(
            parse(&coalesce_events).unwrap_err()[0].path,
            "streams[1].overflow"
        );
        let shared = text.replace("persistent://t/n/alarms", "persistent://t/n/history");
        let errs = parse(&shared).unwrap_err();
        assert_eq!(errs[0].path, "streams[1].topic");
        assert!(
            errs[0].message.contains("streams[0].history_topic"),
            "{}",
            errs[0].message
        );
        // The reject stream's filter overlaps the status stream's: its own
        // MQTT session would receive what session 0 does too.
        let overlap = text.replace("devices/+/alarm", "devices/#");
        let errs = parse(&overlap).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "streams[1].subscriptions[0].filter");
        assert!(
            errs[0]
                .message
                .contains("`devices/+/state` of streams[0].subscriptions[0].filter"),
            "{}",
            errs[0].message
        );
        // Without reject both are one session: the first stream matching a
        // message takes it.
        assert!(
            parse(&overlap.replace("overflow = \"reject\"", "overflow = \"drop-oldest\"")).is_ok()
        );
    }

    #[test]
    fn device_level_must_be_a_wildcard() {
        assert!(check_device_level("a/+/c", 1).is_ok());
        assert!(check_device_level("a/#", 3).is_ok());
        assert!(check_device_level("a/b/c", 1).is_err());
        assert!(check_device_level("a/+", 2).is_err());
    }
}
