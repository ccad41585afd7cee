//! `ferry status`: the running agent at a glance, read from its store.
//!
//! The agent keeps a small [`Live`] record of its connections (updated by
//! ingest and the uplink); the store thread writes a snapshot of it into the
//! `agent` table every few seconds. `ferry status` opens the store read-only
//! (WAL lets it read while the agent writes) and combines that snapshot with
//! the backlog, the counters and the dead letters. It never disturbs the
//! running service.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
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
    pub pulsar: Link,
    /// Records confirmed by Pulsar per second, over the last minute or so.
    pub drain_rate: f64,
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

    pub fn pulsar_up(&self, peer: &str) {
        self.with(|s| set_link(&mut s.pulsar, true, peer, None));
    }

    pub fn pulsar_down(&self, peer: &str, error: String) {
        self.with(|s| set_link(&mut s.pulsar, false, peer, Some(error)));
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

/// One dead letter, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub received_ms: u64,
    pub mqtt_topic: String,
    pub reason: String,
    pub size: u64,
}

/// Everything `ferry status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub store: String,
    /// The agent's snapshot, if it ever wrote one.
    pub agent: Option<AgentSnapshot>,
    /// Whether the snapshot is fresh enough to call the agent running.
    pub running: bool,
    pub pending_records: u64,
    pub pending_bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    /// Estimated, from the agent's drain rate.
    pub time_to_drain_seconds: Option<f64>,
    pub counters: Vec<(String, i64)>,
    pub dead_letters: u64,
    pub recent_dead_letters: Vec<DeadLetter>,
}

const SQL_BACKLOG: &str =
    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), MIN(received_ms) FROM journal";
const SQL_AGENT: &str = "SELECT snapshot FROM agent WHERE id = 1";
const SQL_COUNTERS: &str = "SELECT name, value FROM counters ORDER BY name";
const SQL_DEAD_COUNT: &str = "SELECT COUNT(*) FROM dead_letters";
const SQL_DEAD_RECENT: &str =
    "SELECT received_ms, mqtt_topic, reason, size FROM dead_letters ORDER BY id DESC LIMIT 5";

/// Reads the report from a store file, read-only.
pub fn read(path: &Path) -> Result<Report, rusqlite::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let now = now_ms();
    let (pending, bytes, oldest): (i64, i64, Option<i64>) =
        conn.query_row(SQL_BACKLOG, [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let agent: Option<AgentSnapshot> = conn
        .query_row(SQL_AGENT, [], |r| r.get::<_, String>(0))
        .optional()?
        .and_then(|json| serde_json::from_str(&json).ok());
    let running = agent
        .as_ref()
        .is_some_and(|a| now.saturating_sub(a.updated_ms) < 3 * SNAPSHOT_EVERY.as_millis() as u64);
    let mut stmt = conn.prepare(SQL_COUNTERS)?;
    let counters = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<(String, i64)>, _>>()?;
    let dead: i64 = conn.query_row(SQL_DEAD_COUNT, [], |r| r.get(0))?;
    let mut stmt = conn.prepare(SQL_DEAD_RECENT)?;
    let recent = stmt
        .query_map([], |r| {
            Ok(DeadLetter {
                received_ms: r.get::<_, i64>(0)? as u64,
                mqtt_topic: r.get(1)?,
                reason: r.get(2)?,
                size: r.get::<_, i64>(3)? as u64,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let rate = agent.as_ref().map(|a| a.drain_rate).unwrap_or(0.0);
    Ok(Report {
        store: path.display().to_string(),
        running,
        pending_records: pending as u64,
        pending_bytes: bytes as u64,
        oldest_age_seconds: oldest.map(|o| now.saturating_sub(o as u64) as f64 / 1000.0),
        time_to_drain_seconds: (pending == 0)
            .then_some(0.0)
            .or_else(|| (running && rate > 0.0).then(|| pending as f64 / rate)),
        agent,
        counters,
        dead_letters: dead as u64,
        recent_dead_letters: recent,
    })
}

/// The report as a table for people.
pub fn render(r: &Report) -> String {
    let now = now_ms();
    let ago = |ms: u64| human(Duration::from_millis(now.saturating_sub(ms)));
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<16} {v}\n"));
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
    if let Some(a) = &r.agent {
        for (name, l) in [("mqtt", &a.mqtt), ("pulsar", &a.pulsar)] {
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
            line(name, format!("{state} {}{since}", l.peer));
            if let Some(e) = &l.last_error {
                line("", format!("last error: {e}"));
            }
        }
    }
    line(
        "backlog",
        format!("{} records, {} bytes", r.pending_records, r.pending_bytes),
    );
    if let Some(age) = r.oldest_age_seconds {
        line(
            "oldest",
            format!("{} old", human(Duration::from_secs_f64(age))),
        );
    }
    if let Some(a) = &r.agent {
        line("drain rate", format!("{:.1} records/s", a.drain_rate));
    }
    match r.time_to_drain_seconds {
        Some(t) => line("time to drain", human(Duration::from_secs_f64(t))),
        None if r.pending_records > 0 => line("time to drain", "unknown (not draining)".into()),
        None => {}
    }
    let counters = r
        .counters
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    line("counters", counters);
    line("dead letters", r.dead_letters.to_string());
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

    #[test]
    fn links_remember_when_they_changed_and_why() {
        let live = Live::default();
        live.pulsar_down("b:6650", "refused".into());
        let s = live.snapshot();
        assert!(!s.pulsar.connected);
        assert_eq!(s.pulsar.last_error.as_deref(), Some("refused"));
        live.pulsar_up("b:6650");
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
}
