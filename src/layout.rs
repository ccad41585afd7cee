//! Streams, their destinations, and the overflow rules, without I/O.
//!
//! With several Pulsar clusters (`[[pulsar.clusters]]`) every topic is a
//! destination once per cluster, each with its own name in the store
//! (`<topic>@<cluster>`), numbers, backlog and uplink session: a record
//! leaves the store for one cluster when that cluster confirmed it, and
//! each cluster's deduplication makes it exactly once there.
//!
//! A stream is what the configuration calls `[[streams]]`: the MQTT
//! messages matching its subscriptions. Each stream has one or two
//! *destinations* (Pulsar topics), numbered in configuration order: a
//! `state` stream has its status topic and optionally a history topic, an
//! `events` stream its events topic. Every destination has its own record
//! numbers (the Pulsar `sequence_id` of its producer), its own backlog in
//! the store and its own uplink session.
//!
//! Ingest keeps one MQTT session per [`Layout::sessions`]: session 0 carries
//! every stream whose overflow is not `reject`, and each `reject` stream has
//! a session of its own, so that the messages it holds back (unacknowledged,
//! filling the broker's in-flight window for that session) never stall the
//! other streams. No filter of one session overlaps a filter of another
//! (the configuration refuses it), so no message is received twice.
//!
//! [`Limits::over`] and [`Limits::shed_target`] decide when a stream is over
//! its limits and how much drop-oldest frees; the store applies them.

use std::time::Duration;

use crate::config::StreamConfig;

/// A destination's index in configuration order.
pub type DestIx = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// Device state: the newest update per device is what matters.
    State,
    /// Events: every one matters, in order; never coalesced.
    Events,
}

/// What a stream does when it is over one of its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Keep only the newest pending record per device for the status topic.
    Coalesce,
    /// Drop the oldest records first (never a device's newest state).
    DropOldest,
    /// Stop acknowledging MQTT: the local broker holds the backlog.
    Reject,
}

impl Overflow {
    pub fn as_str(self) -> &'static str {
        match self {
            Overflow::Coalesce => "coalesce",
            Overflow::DropOldest => "drop-oldest",
            Overflow::Reject => "reject",
        }
    }
}

/// A stream's limits; `None` is no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    pub max_records: Option<u64>,
    /// Payload bytes waiting in the store.
    pub max_bytes: Option<u64>,
    pub max_age: Option<Duration>,
}

/// One MQTT topic filter and the rule that extracts the device id from the
/// topic of a message that matched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    /// Zero-based topic level that holds the device id.
    pub device_id_level: usize,
}

/// What a destination topic receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A state stream's status topic: compacted, keyed by device id. A
    /// device's newest pending record here is never dropped.
    Status,
    /// A state stream's history topic: every update, in order.
    History,
    /// An events stream's topic: every event, in order, never coalesced.
    Events,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Status => "status",
            Role::History => "history",
            Role::Events => "events",
        }
    }

    /// The status topic drains first after an outage.
    pub fn drains_first(self) -> bool {
        self == Role::Status
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestSpec {
    pub topic: String,
    pub stream: usize,
    pub role: Role,
    /// The Pulsar cluster (index in `[[pulsar.clusters]]`; 0 for `[pulsar]`).
    pub cluster: usize,
    /// What names the destination in the store, the metrics, the logs and
    /// `ferry status`: the topic, and `@<cluster>` after it when the
    /// clusters are named.
    pub name: String,
}

/// A destination's name: `topic`, or `topic@cluster` (Pulsar topic names
/// never hold `@`).
pub fn dest_name(topic: &str, cluster: &str) -> String {
    if cluster.is_empty() {
        topic.to_string()
    } else {
        format!("{topic}@{cluster}")
    }
}

/// The cluster a destination's name names, if any (see [`dest_name`]).
pub fn cluster_of(name: &str) -> Option<&str> {
    name.rsplit_once('@').map(|(_, cluster)| cluster)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    pub name: String,
    pub kind: StreamKind,
    pub overflow: Overflow,
    pub limits: Limits,
    pub subscriptions: Vec<Subscription>,
    /// The destinations this stream writes to, main topic first.
    pub dests: Vec<DestIx>,
}

/// Every stream and destination of one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub streams: Vec<StreamSpec>,
    pub dests: Vec<DestSpec>,
    /// The Pulsar clusters' names (one empty name for `[pulsar]`).
    pub clusters: Vec<String>,
}

impl Layout {
    /// The layout of one unnamed cluster.
    pub fn new(streams: &[StreamConfig]) -> Layout {
        Layout::with_clusters(streams, &[String::new()])
    }

    /// The layout of a configuration: its streams, on each of its clusters.
    pub fn for_config(cfg: &crate::config::Config) -> Layout {
        Layout::with_clusters(&cfg.streams, &cfg.pulsar.names())
    }

    /// Each stream's topics once per cluster: per stream, per cluster, the
    /// main topic then the history topic.
    pub fn with_clusters(streams: &[StreamConfig], clusters: &[String]) -> Layout {
        let mut dests = Vec::new();
        let specs = streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let first = dests.len();
                let main_role = match s.kind {
                    StreamKind::State => Role::Status,
                    StreamKind::Events => Role::Events,
                };
                for (c, cluster) in clusters.iter().enumerate() {
                    dests.push(DestSpec {
                        topic: s.topic.clone(),
                        stream: i,
                        role: main_role,
                        cluster: c,
                        name: dest_name(&s.topic, cluster),
                    });
                    if let Some(h) = &s.history_topic {
                        dests.push(DestSpec {
                            topic: h.clone(),
                            stream: i,
                            role: Role::History,
                            cluster: c,
                            name: dest_name(h, cluster),
                        });
                    }
                }
                StreamSpec {
                    name: s.name.clone(),
                    kind: s.kind,
                    overflow: s.overflow,
                    limits: s.limits,
                    subscriptions: s.subscriptions.clone(),
                    dests: (first..dests.len()).collect(),
                }
            })
            .collect();
        Layout {
            streams: specs,
            dests,
            clusters: clusters.to_vec(),
        }
    }

    /// The stream of a message (the first whose filter matches its topic)
    /// and the device id that stream's rule finds in the topic.
    pub fn route(&self, topic: &str) -> Option<(usize, Option<String>)> {
        let levels: Vec<&str> = topic.split('/').collect();
        self.streams.iter().enumerate().find_map(|(i, s)| {
            let sub = s
                .subscriptions
                .iter()
                .find(|sub| matches_filter(&sub.filter, &levels))?;
            let device = levels
                .get(sub.device_id_level)
                .filter(|id| !id.is_empty())
                .map(|id| id.to_string());
            Some((i, device))
        })
    }

    /// The MQTT sessions ingest keeps, session 0 first: each with its client
    /// id (`client_id` for session 0, `<client_id>-<stream>` for a `reject`
    /// stream's) and the filters it subscribes to.
    pub fn sessions(&self, client_id: &str) -> Vec<SessionSpec> {
        let mut out = vec![SessionSpec {
            client_id: client_id.to_string(),
            filters: Vec::new(),
        }];
        for s in &self.streams {
            let filters = s.subscriptions.iter().map(|sub| sub.filter.clone());
            if s.overflow == Overflow::Reject {
                out.push(SessionSpec {
                    client_id: format!("{client_id}-{}", s.name),
                    filters: filters.collect(),
                });
            } else {
                out[0].filters.extend(filters);
            }
        }
        out
    }

    /// The destinations of the status topics (they drain first).
    pub fn first_to_drain(&self) -> Vec<DestIx> {
        (0..self.dests.len())
            .filter(|d| self.dests[*d].role.drains_first())
            .collect()
    }
}

/// One MQTT session of ingest (see [`Layout::sessions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpec {
    pub client_id: String,
    pub filters: Vec<String>,
}

/// Whether some topic matches both filters: level by level, `+` matches
/// any one level and `#` the rest (the level above it included); no
/// wildcard at the first level matches a topic that starts with `$`.
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let a: Vec<&str> = a.split('/').collect();
    let b: Vec<&str> = b.split('/').collect();
    let wild = |l: &str| l == "+" || l == "#";
    if (wild(a[0]) && b[0].starts_with('$')) || (wild(b[0]) && a[0].starts_with('$')) {
        return false;
    }
    for i in 0.. {
        match (a.get(i).copied(), b.get(i).copied()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some(x), Some(y)) if x == y || x == "+" || y == "+" => {}
            _ => return false,
        }
    }
    unreachable!()
}

/// Whether an MQTT topic matches a filter (`+` one level, `#` the rest).
pub fn matches_filter(filter: &str, topic: &[&str]) -> bool {
    let mut i = 0;
    for f in filter.split('/') {
        match f {
            "#" => return true,
            "+" if i < topic.len() => {}
            f if i < topic.len() && topic[i] == f => {}
            _ => return false,
        }
        i += 1;
    }
    i == topic.len()
}

/// What a stream holds in the store (over all its destinations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub records: u64,
    pub bytes: u64,
}

impl Limits {
    /// Over a record or byte limit.
    pub fn over(&self, u: Usage) -> bool {
        self.max_records.is_some_and(|m| u.records > m)
            || self.max_bytes.is_some_and(|m| u.bytes > m)
    }

    /// Whether one more record of `bytes` would go over (for `reject`).
    pub fn full_for(&self, u: Usage, bytes: u64) -> bool {
        self.max_records.is_some_and(|m| u.records >= m)
            || self.max_bytes.is_some_and(|m| u.bytes + bytes > m)
    }

    /// How much drop-oldest frees once over: down to 90% of each limit that
    /// is exceeded, so that it does not run again at the very next record.
    pub fn shed_target(&self, u: Usage) -> Usage {
        let low = self.low_water();
        let excess = |limit: Option<u64>, low: Option<u64>, used: u64| match (limit, low) {
            (Some(m), Some(l)) if used > m => used - l,
            _ => 0,
        };
        Usage {
            records: excess(self.max_records, low.max_records, u.records),
            bytes: excess(self.max_bytes, low.max_bytes, u.bytes),
        }
    }

    /// 90% of each record and byte limit: where drop-oldest sheds down to,
    /// and where a `reject` stream takes messages again.
    pub fn low_water(&self) -> Limits {
        let low = |m: u64| m - m / 10;
        Limits {
            max_records: self.max_records.map(low),
            max_bytes: self.max_bytes.map(low),
            max_age: None,
        }
    }

    /// Records received before this are over `max_age`.
    pub fn age_cutoff_ms(&self, now_ms: u64) -> Option<u64> {
        self.max_age
            .map(|a: Duration| now_ms.saturating_sub(a.as_millis() as u64))
    }
}

/// When a shed could not bring a stream under its limits (only newest
/// states, or records in flight, are left), the stream is not shed again
/// before it grew by a tenth of its limit: shedding is a scan, not something
/// to repeat on every record.
pub fn rearm(limits: &Limits, after: Usage) -> Usage {
    let step = |m: Option<u64>| m.map(|m| (m / 10).max(1)).unwrap_or(0);
    Usage {
        records: after.records + step(limits.max_records),
        bytes: after.bytes + step(limits.max_bytes),
    }
}

/// Why records left the store unsent; labels of
/// `ferry_store_records_dropped_total` and keys of the `counters` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A `coalesce` stream still over its limits after coalescing: its
    /// history backlog, oldest first.
    Coalesce,
    /// The stream's `drop-oldest` policy.
    DropOldest,
    /// The stream's `max_age_secs`.
    MaxAge,
    /// The disk was full.
    DiskFull,
    /// The store file was over `store.max_bytes`.
    StoreFull,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Coalesce => "coalesce",
            DropReason::DropOldest => "drop-oldest",
            DropReason::MaxAge => "max-age",
            DropReason::DiskFull => "disk-full",
            DropReason::StoreFull => "store-max-bytes",
        }
    }

    pub const ALL: [DropReason; 5] = [
        DropReason::Coalesce,
        DropReason::DropOldest,
        DropReason::MaxAge,
        DropReason::DiskFull,
        DropReason::StoreFull,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn layout() -> Layout {
        let c = parse(
            r#"
gateway_id = "gw"
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
[store]
path = "/tmp/x.db"
[[streams]]
name = "status"
topic = "persistent://t/n/status"
history_topic = "persistent://t/n/history"
subscriptions = [{ filter = "devices/+/state", device_id_level = 1 }]
[[streams]]
name = "alarms"
kind = "events"
topic = "persistent://t/n/alarms"
subscriptions = [{ filter = "devices/+/alarm/#", device_id_level = 1 },
                 { filter = "zigbee2mqtt/#", device_id_level = 1 }]
"#,
        )
        .unwrap();
        Layout::new(&c.streams)
    }

    #[test]
    fn each_reject_stream_has_a_session_of_its_own() {
        let mut l = layout();
        assert_eq!(l.sessions("gw").len(), 1);
        l.streams[1].overflow = Overflow::Reject;
        l.streams.push(StreamSpec {
            name: "other".into(),
            ..l.streams[0].clone()
        });
        let sessions = l.sessions("ferry-gw");
        assert_eq!(
            sessions,
            [
                SessionSpec {
                    client_id: "ferry-gw".into(),
                    filters: vec!["devices/+/state".into(), "devices/+/state".into()],
                },
                SessionSpec {
                    client_id: "ferry-gw-alarms".into(),
                    filters: vec!["devices/+/alarm/#".into(), "zigbee2mqtt/#".into()],
                },
            ]
        );
    }

    #[test]
    fn filters_overlap_when_some_topic_matches_both() {
        for (a, b) in [
            ("a/b", "a/b"),
            ("a/+", "a/b"),
            ("+/b", "a/+"),
            ("a/#", "a"),
            ("#", "x/y/z"),
            ("a/+/c/#", "+/b/+"),
            ("$SYS/#", "$SYS/broker"),
            ("+/+", "a/"),
        ] {
            assert!(filters_overlap(a, b), "{a} {b}");
            assert!(filters_overlap(b, a), "{b} {a}");
        }
        for (a, b) in [
            ("a/b", "a/c"),
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("a/b/#", "a/c/#"),
            ("#", "$SYS/broker"),
            ("+/broker", "$SYS/broker"),
        ] {
            assert!(!filters_overlap(a, b), "{a} {b}");
            assert!(!filters_overlap(b, a), "{b} {a}");
        }
    }

    #[test]
    fn destinations_are_numbered_in_configuration_order() {
        let l = layout();
        let roles: Vec<(&str, Role, usize)> = l
            .dests
            .iter()
            .map(|d| (d.topic.rsplit('/').next().unwrap(), d.role, d.stream))
            .collect();
        assert_eq!(
            roles,
            vec![
                ("status", Role::Status, 0),
                ("history", Role::History, 0),
                ("alarms", Role::Events, 1)
            ]
        );
        assert_eq!(l.streams[0].dests, vec![0, 1]);
        assert_eq!(l.first_to_drain(), vec![0]);
    }

    #[test]
    fn a_message_goes_to_the_first_stream_that_matches() {
        let l = layout();
        assert_eq!(l.route("devices/s-1/state"), Some((0, Some("s-1".into()))));
        assert_eq!(
            l.route("devices/s-1/alarm/high"),
            Some((1, Some("s-1".into())))
        );
        assert_eq!(l.route("zigbee2mqtt/lamp"), Some((1, Some("lamp".into()))));
        assert_eq!(l.route("zigbee2mqtt"), Some((1, None)), "no level 1");
        assert_eq!(l.route("devices//state"), Some((0, None)));
        assert_eq!(l.route("other/x"), None);
        assert_eq!(l.route("devices/s-1/state/x"), None);
    }

    #[test]
    fn limits_decide_overflow_and_what_drop_oldest_frees() {
        let lim = Limits {
            max_records: Some(100),
            max_bytes: Some(10_000),
            max_age: None,
        };
        let u = |records, bytes| Usage { records, bytes };
        assert!(!lim.over(u(100, 10_000)));
        assert!(lim.over(u(101, 0)));
        assert!(lim.over(u(0, 10_001)));
        assert!(lim.full_for(u(100, 0), 1));
        assert!(!lim.full_for(u(99, 9_000), 1_000));
        assert!(lim.full_for(u(99, 9_001), 1_000));
        assert_eq!(lim.shed_target(u(101, 5_000)), u(11, 0));
        assert_eq!(lim.shed_target(u(50, 12_000)), u(0, 3_000));
        assert_eq!(rearm(&lim, u(95, 100)), u(105, 1_100));
        let none = Limits::default();
        assert!(!none.over(u(u64::MAX, u64::MAX)));
        assert_eq!(none.age_cutoff_ms(1_000), None);
        let aged = Limits {
            max_age: Some(Duration::from_secs(1)),
            ..none
        };
        assert_eq!(aged.age_cutoff_ms(5_000), Some(4_000));
    }
}
