//! `ferry status`: the running agent at a glance, read from its store.
//!
//! The agent keeps a small [`Live`] record of its connections (updated by
//! ingest and the uplink); the store thread writes a snapshot of it into the
//! `agent` table every few seconds. `ferry status` reads the store's report
//! ([`crate::store::report`]: read-only, WAL lets it read while the agent
//! writes), which combines that snapshot with the backlog, the counters and
//! the dead letters, and renders it here. It never disturbs the running
//! service.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How often the store thread writes the [`Live`] snapshot.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One link (MQTT or Pulsar) as the agent sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub connected: bool,
    /// Where to (broker address).
    pub peer: String,
    /// Since when the link is in its current state, ms since the epoch.
    pub since_ms: u64,
    pub last_error: Option<String>,
}

/// The agent's own view of itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSnapshot {
    pub pid: u32,
    pub started_ms: u64,
    pub updated_ms: u64,
    pub mqtt: Link,
    /// The Pulsar link of the most recent change (any topic).
    pub pulsar: Link,
    /// The Pulsar link of each destination topic.
    #[serde(default)]
    pub topics: std::collections::BTreeMap<String, Link>,
    /// Records confirmed by Pulsar per second, over the last minute or so.
    pub drain_rate: f64,
    /// The disk holding the store is full.
    #[serde(default)]
    pub disk_full: bool,
    /// Messages held back (unacknowledged) by `reject` streams or a full
    /// disk.
    #[serde(default)]
    pub parked: u64,
}

/// Shared, cheap-to-update live state.
#[derive(Clone, Debug)]
pub struct Live(Arc<Mutex<AgentSnapshot>>);

impl Default for Live {
    fn default() -> Live {
        Live(Arc::new(Mutex::new(AgentSnapshot {
            pid: std::process::id(),
            started_ms: now_ms(),
            ..AgentSnapshot::default()
        })))
    }
}

impl Live {
    fn with(&self, f: impl FnOnce(&mut AgentSnapshot)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }

    pub fn mqtt_up(&self, peer: &str) {
        self.with(|s| set_link(&mut s.mqtt, true, peer, None));
    }

    pub fn mqtt_down(&self, peer: &str, error: String) {
        self.with(|s| set_link(&mut s.mqtt, false, peer, Some(error)));
    }

    pub fn pulsar_up(&self, topic: &str, peer: &str) {
        self.with(|s| {
            set_link(&mut s.pulsar, true, peer, None);
            set_link(
                s.topics.entry(topic.to_string()).or_default(),
                true,
                peer,
                None,
            );
        });
    }

    pub fn pulsar_down(&self, topic: &str, peer: &str, error: String) {
        self.with(|s| {
            set_link(&mut s.pulsar, false, peer, Some(error.clone()));
            let link = s.topics.entry(topic.to_string()).or_default();
            set_link(link, false, peer, Some(error));
        });
    }

    pub fn set_store(&self, disk_full: bool, parked: u64) {
        self.with(|s| {
            s.disk_full = disk_full;
            s.parked = parked;
        });
    }

    pub fn set_drain_rate(&self, rate: f64) {
        self.with(|s| s.drain_rate = rate);
    }

    pub fn snapshot(&self) -> AgentSnapshot {
        let mut s = self.0.lock().map(|s| s.clone()).unwrap_or_default();
        s.updated_ms = now_ms();
        s
    }
}

fn set_link(link: &mut Link, connected: bool, peer: &str, error: Option<String>) {
    if link.connected != connected || link.since_ms == 0 {
        link.since_ms = now_ms();
    }
    link.connected = connected;
    link.peer = peer.to_string();
    if error.is_some() {
        link.last_error = error;
    }
}

pub use crate::store::report::{
    read, ClusterReport, DeadLetter, DownlinkReport, Incident, Report, StreamReport, TopicBacklog,
};

/// The report as a table for people. Every string in it may have come from
/// outside (MQTT topics, broker errors, the store file), so every line goes
/// out with its control and invisible characters escaped ([`printable`]).
pub fn render(r: &Report) -> String {
    let now = now_ms();
    let ago = |ms: u64| human(Duration::from_millis(now.saturating_sub(ms)));
    let mut out = String::new();
    let mut line =
        |k: &str, v: String| out.push_str(&format!("{:<16} {}\n", printable(k), printable(&v)));
    line("store", r.store.clone());
    match &r.agent {
        Some(a) if r.running => line(
            "agent",
            format!("running, pid {}, up {}", a.pid, ago(a.started_ms)),
        ),
        Some(a) => line(
            "agent",
            format!("not running (last seen {} ago)", ago(a.updated_ms)),
        ),
        None => line("agent", "never ran on this store".into()),
    }
    for i in &r.incidents {
        line(
            "INCIDENT",
            format!("{} ago {}: {}", ago(i.at_ms), i.kind, i.detail),
        );
    }
    for t in &r.deduplication_off {
        line(
            "DEDUPLICATION",
            format!(
                "OFF on {t}: the broker forgot ferry's producer, so a record resent after a crash may arrive twice; fix: pulsar-admin namespaces set-deduplication {} --enable",
                namespace_of(t)
            ),
        );
    }
    if let Some(a) = &r.agent {
        let mut links = vec![("mqtt", String::new(), &a.mqtt)];
        if a.topics.is_empty() {
            links.push(("pulsar", String::new(), &a.pulsar));
        }
        for (t, l) in &a.topics {
            let local = t.rsplit('/').next().unwrap_or(t);
            links.push(("pulsar", format!("{local}: "), l));
        }
        for (name, topic, l) in links {
            let state = if l.connected {
                "connected"
            } else {
                "disconnected"
            };
            let since = if l.since_ms > 0 {
                format!(" for {}", ago(l.since_ms))
            } else {
                String::new()
            };
            line(name, format!("{topic}{state} {}{since}", l.peer));
            if let Some(e) = &l.last_error {
                line("", format!("last error: {e}"));
            }
        }
    }
    if let Some(a) = r.agent.as_ref().filter(|_| r.running) {
        if a.disk_full {
            line(
                "DISK FULL",
                "shedding to keep every device's newest state".into(),
            );
        }
        if a.parked > 0 {
            line(
                "held back",
                format!(
                    "{} messages not acknowledged (reject policy or full disk)",
                    a.parked
                ),
            );
        }
    }
    if let Some(d) = &r.downlink {
        let state = if d.caught_up {
            "caught up"
        } else {
            "catching up (nothing published before the topic's end is read)"
        };
        line(
            "downlink",
            format!(
                "{}: {state}, {} devices, lag {}",
                d.topic.rsplit('/').next().unwrap_or(&d.topic),
                d.devices,
                d.lag
            ),
        );
        line(
            "",
            format!(
                "received {}, applied {}, stale {}, dead-lettered {}, republished {}",
                d.received, d.applied, d.stale, d.dead_lettered, d.republished
            ),
        );
    }
    line(
        "backlog",
        format!("{} records, {} bytes", r.pending_records, r.pending_bytes),
    );
    for c in &r.clusters {
        let age = c
            .oldest_age_seconds
            .map(|a| format!(", oldest {}", human_secs(a)))
            .unwrap_or_default();
        // Its links, while the agent runs: how many of its topics are up.
        let links = match r.agent.as_ref().filter(|_| r.running) {
            Some(a) => {
                let mine = a
                    .topics
                    .iter()
                    .filter(|(t, _)| crate::layout::cluster_of(t) == Some(c.name.as_str()));
                let (up, all) = mine.fold((0, 0), |(u, n), (_, l)| (u + l.connected as u64, n + 1));
                format!("; {up} of {all} topics connected")
            }
            None => String::new(),
        };
        line(
            &format!("cluster {}", c.name),
            format!("{} records, {} bytes{age}{links}", c.records, c.bytes),
        );
    }
    for s in &r.streams {
        let age = s
            .oldest_age_seconds
            .map(|a| format!(", oldest {}", human_secs(a)))
            .unwrap_or_default();
        let mut shed = vec![format!("superseded {}", s.superseded)];
        shed.extend(s.dropped.iter().map(|(k, v)| format!("dropped by {k} {v}")));
        line(
            &format!("stream {}", s.name),
            format!(
                "{} records, {} bytes{age}; {}",
                s.records,
                s.bytes,
                shed.join(", ")
            ),
        );
        for t in &s.topics {
            line("", format!("{} {}: {} records", t.role, t.topic, t.records));
        }
    }
    if let Some(age) = r.oldest_age_seconds {
        line("oldest", format!("{} old", human_secs(age)));
    }
    if let Some(a) = &r.agent {
        line("drain rate", format!("{:.1} records/s", a.drain_rate));
    }
    match r.time_to_drain_seconds {
        Some(t) => line("time to drain", human_secs(t)),
        None if r.pending_records > 0 => line("time to drain", "unknown (not draining)".into()),
        None => {}
    }
    // The downlink's counters stand on its own lines.
    let counters = r
        .counters
        .iter()
        .filter(|(k, _)| r.downlink.is_none() || !k.starts_with("desired_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    line("counters", counters);
    line(
        "dead letters",
        match r.dead_letters_pruned {
            0 => format!("{} kept", r.dead_letters),
            pruned => format!(
                "{} kept, {pruned} older pruned (store.dead_letters_max, _max_bytes, _max_age_secs)",
                r.dead_letters
            ),
        },
    );
    for d in &r.recent_dead_letters {
        line(
            "",
            format!(
                "{} ago {} ({} bytes): {}",
                ago(d.received_ms),
                d.mqtt_topic,
                d.size,
                d.reason
            ),
        );
    }
    out
}

/// `tenant/namespace` of a topic name.
pub fn namespace_of(topic: &str) -> &str {
    topic
        .strip_prefix("persistent://")
        .or_else(|| topic.strip_prefix("non-persistent://"))
        .and_then(|t| t.rsplit_once('/'))
        .map_or("<tenant>/<namespace>", |(ns, _)| ns)
}

/// The report as JSON for scripts. serde_json escapes C0 controls in
/// strings; DEL, C1 controls and invisible characters get `\uXXXX` too, so
/// the output is safe on a terminal and means the same.
pub fn render_json(r: &Report) -> String {
    let json = serde_json::to_string_pretty(r).expect("plain struct");
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if hidden(c) && c != '\n' {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` with every [`hidden`] character written as `\xNN` (ASCII) or
/// `\u{N}`, so that nothing reaches the terminal that it would act on.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(hidden) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c as u32 {
            n if hidden(c) && n < 0x80 => out.push_str(&format!("\\x{n:02x}")),
            n if hidden(c) => out.push_str(&format!("\\u{{{n:x}}}")),
            _ => out.push(c),
        }
    }
    out.into()
}

/// Characters a terminal acts on or that hide or reorder text: C0 and C1
/// controls and DEL, bidirectional marks, overrides and isolates,
/// zero-width and other invisible format characters.
fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{ad}' | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffb}')
}

/// Seconds (from a report: they may be anything) as a person would say
/// them.
fn human_secs(s: f64) -> String {
    if s.is_nan() || s < 0.0 {
        return "unknown".into();
    }
    human(Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::db::Db;

    #[test]
    fn links_remember_when_they_changed_and_why() {
        let live = Live::default();
        live.pulsar_down("persistent://t/n/s", "b:6650", "refused".into());
        let s = live.snapshot();
        assert!(!s.pulsar.connected);
        assert_eq!(s.pulsar.last_error.as_deref(), Some("refused"));
        live.pulsar_up("persistent://t/n/s", "b:6650");
        let s2 = live.snapshot();
        assert!(s2.pulsar.connected);
        assert_eq!(
            s2.pulsar.last_error.as_deref(),
            Some("refused"),
            "the last error stays visible"
        );
        assert_eq!(s2.pid, std::process::id());
    }

    #[test]
    fn durations_read_like_a_person_would_say_them() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(600)), "10 min");
        assert_eq!(human(Duration::from_secs(5400)), "90 min");
        assert_eq!(human(Duration::from_secs(36_000)), "10.0 h");
    }

    /// A store with one pending record and `agent` as its agent row (which
    /// a running ferry would never write), in a fresh directory, written
    /// through the store's own API; the store stays open for more rows.
    fn store_with(agent: &str) -> (std::path::PathBuf, Db) {
        store_on(agent, &[])
    }

    /// A store with one status record, written to each of `clusters` (none
    /// named: one destination), and `agent` as its agent's snapshot.
    fn store_on(agent: &str, clusters: &[&str]) -> (std::path::PathBuf, Db) {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferry-status-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ferry.db");
        let cfg = crate::config::parse(&format!(
            r#"
gateway_id = "gw"
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
[store]
path = "{}"
[[streams]]
name = "status"
topic = "persistent://t/n/status"
subscriptions = [{{ filter = "devices/+/state", device_id_level = 1 }}]
"#,
            path.display()
        ))
        .unwrap();
        let mut names: Vec<String> = clusters.iter().map(|c| c.to_string()).collect();
        if names.is_empty() {
            // The `[pulsar]` form: one cluster, not named.
            names.push(String::new());
        }
        let layout = crate::layout::Layout::with_clusters(&cfg.streams, &names);
        let (mut db, _) =
            crate::store::db::Db::open(&path, layout.clone(), cfg.store.durability).unwrap();
        let topic = "devices/d1/state";
        let (stream, device) = layout.route(topic).unwrap();
        let msg = crate::store::Inbound {
            mqtt_topic: topic.into(),
            payload: bytes::Bytes::from_static(b"{}"),
            retain: false,
            stream: Some(stream),
            device,
            dup: false,
            pkid: 0,
            session: 0,
            ack: None,
            counted: false,
            guarded: None,
        };
        db.insert_batch(&[msg], 1024).unwrap();
        db.write_snapshot(agent).unwrap();
        (path, db)
    }

    fn snapshot_json(numbers: &[(&str, &str)]) -> String {
        let mut fields = vec![
            ("pid", "1".to_string()),
            ("started_ms", "0".to_string()),
            ("updated_ms", now_ms().to_string()),
            ("drain_rate", "1.0".to_string()),
            ("parked", "0".to_string()),
        ];
        for (k, v) in numbers {
            match fields.iter_mut().find(|(f, _)| f == k) {
                Some(f) => f.1 = v.to_string(),
                None => fields.push((k, v.to_string())),
            }
        }
        let since = numbers
            .iter()
            .find(|(k, _)| *k == "since_ms")
            .map_or("0", |(_, v)| v);
        let link =
            format!(r#"{{"connected":true,"peer":"p","since_ms":{since},"last_error":null}}"#);
        let mut json = String::from("{");
        for (k, v) in fields.iter().filter(|(k, _)| *k != "since_ms") {
            json.push_str(&format!("\"{k}\":{v},"));
        }
        json.push_str(&format!(
            r#""mqtt":{link},"pulsar":{link},"topics":{{"persistent://t/n/status":{link}}}}}"#
        ));
        json
    }

    #[test]
    fn no_value_in_the_agent_row_makes_status_panic() {
        let future = (now_ms() + 3_600_000).to_string();
        let extremes = [
            "0",
            "1",
            "-1",
            "5e-324",
            "-5e-324",
            "1e-300",
            "1e308",
            "-1e308",
            "18446744073709551615",
            "9223372036854775807",
            "-9223372036854775808",
            "1e30",
            future.as_str(),
        ];
        let keys = [
            "pid",
            "started_ms",
            "updated_ms",
            "drain_rate",
            "parked",
            "since_ms",
        ];
        let (path, mut db) = store_with(&snapshot_json(&[]));
        for key in keys {
            for v in extremes {
                // With the audit's case around it: updated in the future
                // and a tiny drain rate.
                let json = match key {
                    "updated_ms" | "drain_rate" => snapshot_json(&[(key, v)]),
                    _ => snapshot_json(&[
                        (key, v),
                        ("updated_ms", &future),
                        ("drain_rate", "5e-324"),
                    ]),
                };
                db.write_snapshot(&json).unwrap();
                let r = read(&path).unwrap();
                assert_eq!(r.pending_records, 1);
                let _ = render(&r);
                let _ = render_json(&r);
            }
        }
        drop(db);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn the_downlink_shows_its_progress_and_counts_on_lines_of_its_own() {
        use crate::store::db::DesiredUpdate;
        let (path, mut db) = store_with(&snapshot_json(&[]));
        assert_eq!(
            read(&path).unwrap().downlink,
            None,
            "no desired topic read yet"
        );
        let topic = "persistent://t/n/desired";
        db.downlink_start(topic).unwrap();
        let r = read(&path).unwrap();
        assert!(render(&r).contains("downlink         desired: catching up"));
        let update = |device: &str, version: Option<&str>| DesiredUpdate {
            device: Some(device.into()),
            version: version.map(str::to_string),
            payload: bytes::Bytes::from_static(b"{}"),
            problem: None,
        };
        let updates = [
            update("a", Some("2")),
            update("b", Some("1")),
            update("a", Some("1")),
            update("c", None),
        ];
        db.desired_received(topic, &updates, b"position", true, 1024)
            .unwrap();
        let r = read(&path).unwrap();
        let d = r.downlink.clone().unwrap();
        assert_eq!(d.topic, topic);
        assert!(d.caught_up);
        assert_eq!((d.devices, d.lag), (2, 2));
        assert_eq!(
            (d.received, d.applied, d.stale, d.dead_lettered),
            (4, 0, 1, 1)
        );
        let table = render(&r);
        assert!(
            table.contains("downlink         desired: caught up, 2 devices, lag 2\n"),
            "{table}"
        );
        assert!(
            table.contains("received 4, applied 0, stale 1, dead-lettered 1, republished 0"),
            "{table}"
        );
        assert!(!table.contains("desired_"), "said once: {table}");
        let json: serde_json::Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(json["downlink"]["lag"], 2);
        drop(db);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn each_named_cluster_shows_its_backlog_and_how_many_of_its_links_are_up() {
        let up = Link {
            connected: true,
            peer: "east:6650".into(),
            since_ms: 1,
            last_error: None,
        };
        let down = Link {
            connected: false,
            peer: "west:6650".into(),
            since_ms: 1,
            last_error: Some("connection refused".into()),
        };
        let agent = AgentSnapshot {
            pid: 1,
            updated_ms: now_ms(),
            topics: [
                ("persistent://t/n/status@east".to_string(), up),
                ("persistent://t/n/status@west".to_string(), down),
            ]
            .into(),
            ..AgentSnapshot::default()
        };
        let json = serde_json::to_string(&agent).unwrap();
        let (path, mut db) = store_on(&json, &["east", "west"]);
        // East confirmed the record; west is dark.
        let east = db
            .layout()
            .dests
            .iter()
            .position(|d| d.name.ends_with("@east"))
            .unwrap();
        let delivered = crate::store::db::Delivery {
            dest: east,
            up_to: 1,
            resent: 0,
        };
        db.commit_batch(&[delivered], &[], &[], 1024).unwrap();
        let r = read(&path).unwrap();
        let got: Vec<(&str, u64, u64)> = r
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.topics, c.records))
            .collect();
        assert_eq!(got, [("east", 1, 0), ("west", 1, 1)]);
        let table = render(&r);
        assert!(
            table.contains("cluster east     0 records, 0 bytes; 1 of 1 topics connected"),
            "{table}"
        );
        assert!(
            table.contains("cluster west     1 records, 2 bytes, oldest "),
            "{table}"
        );
        assert!(table.contains("; 0 of 1 topics connected"), "{table}");
        // One cluster, not named: no cluster lines.
        let (one, _db) = store_on(&json, &[]);
        let r = read(&one).unwrap();
        assert!(r.clusters.is_empty());
        assert!(!render(&r).contains("cluster "));
        drop(db);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
        let _ = std::fs::remove_dir_all(one.parent().unwrap());
    }

    #[test]
    fn no_value_a_report_can_hold_makes_rendering_panic() {
        let odd = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            0.0,
            5e-324,
            1e308,
            f64::MAX,
        ];
        for x in odd {
            let agent = AgentSnapshot {
                pid: u32::MAX,
                started_ms: u64::MAX,
                updated_ms: u64::MAX,
                drain_rate: x,
                parked: u64::MAX,
                disk_full: true,
                mqtt: Link {
                    since_ms: u64::MAX,
                    ..Link::default()
                },
                ..AgentSnapshot::default()
            };
            let r = Report {
                store: "s".into(),
                agent: Some(agent),
                running: true,
                pending_records: u64::MAX,
                pending_bytes: u64::MAX,
                oldest_age_seconds: Some(x),
                time_to_drain_seconds: Some(x),
                streams: vec![StreamReport {
                    name: "s".into(),
                    records: 1,
                    bytes: 1,
                    oldest_age_seconds: Some(x),
                    topics: Vec::new(),
                    superseded: i64::MIN,
                    dropped: vec![("x".into(), i64::MAX)],
                }],
                clusters: vec![ClusterReport {
                    name: "c".into(),
                    topics: u64::MAX,
                    records: u64::MAX,
                    bytes: u64::MAX,
                    oldest_age_seconds: Some(x),
                }],
                counters: Vec::new(),
                dead_letters: 0,
                dead_letters_pruned: 0,
                recent_dead_letters: vec![DeadLetter {
                    received_ms: u64::MAX,
                    mqtt_topic: "t".into(),
                    reason: "r".into(),
                    size: u64::MAX,
                }],
                incidents: vec![Incident {
                    at_ms: u64::MAX,
                    kind: "k".into(),
                    detail: "d".into(),
                }],
                downlink: Some(DownlinkReport {
                    topic: String::new(),
                    caught_up: false,
                    devices: u64::MAX,
                    lag: u64::MAX,
                    received: i64::MIN,
                    applied: i64::MAX,
                    stale: -1,
                    dead_lettered: 0,
                    republished: i64::MIN,
                }),
                deduplication_off: vec![String::new(), "x".into()],
            };
            let _ = render(&r);
            let _ = render_json(&r);
        }
    }

    #[test]
    fn what_came_from_outside_is_printed_with_control_characters_escaped() {
        let evil = "a\x1b]0;owned\x07b\x1b[2J\u{9b}31m\u{202e}c\rd\u{7f}";
        let link = Link {
            connected: false,
            peer: evil.into(),
            since_ms: 1,
            last_error: Some(evil.into()),
        };
        let mut topics = std::collections::BTreeMap::new();
        topics.insert(format!("persistent://t/n/{evil}"), link.clone());
        let r = Report {
            store: evil.into(),
            agent: Some(AgentSnapshot {
                mqtt: link.clone(),
                pulsar: link,
                topics,
                ..AgentSnapshot::default()
            }),
            running: false,
            pending_records: 1,
            pending_bytes: 1,
            oldest_age_seconds: None,
            time_to_drain_seconds: None,
            streams: vec![StreamReport {
                name: evil.into(),
                records: 1,
                bytes: 1,
                oldest_age_seconds: None,
                topics: vec![TopicBacklog {
                    topic: evil.into(),
                    role: evil.into(),
                    records: 1,
                    bytes: 1,
                    oldest_age_seconds: None,
                }],
                superseded: 0,
                dropped: vec![(evil.into(), 1)],
            }],
            clusters: vec![ClusterReport {
                name: evil.into(),
                topics: 1,
                records: 1,
                bytes: 1,
                oldest_age_seconds: None,
            }],
            counters: vec![(evil.into(), 1)],
            dead_letters: 1,
            dead_letters_pruned: 4,
            recent_dead_letters: vec![DeadLetter {
                received_ms: 1,
                mqtt_topic: evil.into(),
                reason: evil.into(),
                size: 1,
            }],
            incidents: vec![Incident {
                at_ms: 1,
                kind: evil.into(),
                detail: evil.into(),
            }],
            downlink: Some(DownlinkReport {
                topic: format!("persistent://t/n/{evil}"),
                caught_up: true,
                devices: 1,
                lag: 0,
                received: 1,
                applied: 1,
                stale: 0,
                dead_lettered: 0,
                republished: 0,
            }),
            deduplication_off: vec![format!("persistent://t/n/{evil}")],
        };
        let bad = |c: char| (c.is_control() && c != '\n') || ('\u{202a}'..='\u{202e}').contains(&c);
        let table = render(&r);
        assert!(!table.chars().any(bad), "{table:?}");
        assert!(
            table.contains(r"a\x1b]0;owned\x07b\x1b[2J\u{9b}31m\u{202e}c\x0dd\x7f"),
            "{table}"
        );
        assert!(table.contains("1 kept, 4 older pruned"), "{table}");
        let json = render_json(&r);
        assert!(!json.chars().any(bad), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            back["recent_dead_letters"][0]["mqtt_topic"], evil,
            "the JSON still says the same"
        );
    }
}
