//! The store's read-only report for `ferry status`: the backlog per stream
//! and topic, what each stream shed, the counters, dead letters, incidents
//! and the agent's snapshot. Everything about the store's tables, keys and
//! counter names stays in `store/`; `status` only renders.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

use crate::status::{now_ms, AgentSnapshot, SNAPSHOT_EVERY};

/// One dead letter, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub received_ms: u64,
    pub mqtt_topic: String,
    pub reason: String,
    pub size: u64,
}

/// One destination topic's backlog.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopicBacklog {
    pub topic: String,
    /// `status`, `history` or `events`.
    pub role: String,
    pub records: u64,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
}

/// One stream: its backlog and what it shed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StreamReport {
    pub name: String,
    pub records: u64,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
    pub topics: Vec<TopicBacklog>,
    /// Status records replaced by a newer state and never sent.
    pub superseded: i64,
    /// Records dropped unsent, by policy or condition (`drop-oldest`,
    /// `coalesce`, `max-age`, `disk-full`, `store-max-bytes`).
    pub dropped: Vec<(String, i64)>,
}

/// One cluster's part of the backlog, when the clusters are named
/// (`[[pulsar.clusters]]`): what waits for it, over all its topics.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterReport {
    pub name: String,
    /// Destination topics in this cluster.
    pub topics: u64,
    pub records: u64,
    pub bytes: u64,
    pub oldest_age_seconds: Option<f64>,
}

/// Something the store recorded for operators (a damaged store moved
/// aside, a full disk).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Incident {
    pub at_ms: u64,
    pub kind: String,
    pub detail: String,
}

/// The downlink (desired state down to the devices), once the store has
/// read a desired topic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DownlinkReport {
    pub topic: String,
    /// The store read the topic to its end once; before that (a new or
    /// replaced store) nothing is published, so no device gets an older
    /// version first.
    pub caught_up: bool,
    /// Devices with a desired state.
    pub devices: u64,
    /// Versions read and not yet acknowledged by the local MQTT broker
    /// (states to publish again after it forgot them included).
    pub lag: u64,
    pub received: i64,
    pub applied: i64,
    /// Versions at or below what the device already had: never published.
    pub stale: i64,
    pub dead_lettered: i64,
    /// States published again because the local broker forgot them.
    pub republished: i64,
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
    pub streams: Vec<StreamReport>,
    /// Per named cluster, in the order first met (empty without
    /// `[[pulsar.clusters]]`).
    pub clusters: Vec<ClusterReport>,
    pub counters: Vec<(String, i64)>,
    /// Dead letters kept.
    pub dead_letters: u64,
    /// Dead letters pruned over the store's life to keep the table within
    /// `store.dead_letters_*` (the oldest first).
    pub dead_letters_pruned: u64,
    pub recent_dead_letters: Vec<DeadLetter>,
    /// The most recent first.
    pub incidents: Vec<Incident>,
    pub downlink: Option<DownlinkReport>,
    /// Topics whose broker last said deduplication is off: it forgot
    /// ferry's producer after confirming its records (exactly once is not
    /// kept there).
    pub deduplication_off: Vec<String>,
}

const SQL_DESTINATIONS: &str = "SELECT id, topic, stream, role FROM destinations ORDER BY id";
const SQL_DEST_BACKLOG: &str = "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0),
     (SELECT stored_at FROM outbox WHERE key > ?1 AND key <= ?2 ORDER BY key LIMIT 1)
     FROM outbox WHERE key > ?1 AND key <= ?2";
const SQL_AGENT: &str = "SELECT snapshot FROM agent WHERE id = 1";
const SQL_STORE_CLOCK: &str = "SELECT value FROM store_state WHERE name = 'clock_ms'";
const SQL_COUNTERS: &str = "SELECT name, value FROM counters ORDER BY name";
const SQL_DEAD_COUNT: &str = "SELECT COUNT(*) FROM dead_letters";
const SQL_DEAD_RECENT: &str =
    "SELECT received_ms, mqtt_topic, reason, size FROM dead_letters ORDER BY id DESC LIMIT 5";
const SQL_INCIDENTS: &str = "SELECT at_ms, kind, detail FROM incidents ORDER BY id DESC LIMIT 10";
const SQL_HAS_DOWNLINK: &str =
    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'downlink'";
/// The desired topic (the first name in order when it is read from
/// several) and whether any of its readers caught up.
const SQL_DOWNLINK: &str = "SELECT topic, (SELECT MAX(caught_up) FROM downlink) FROM downlink
     ORDER BY topic LIMIT 1";
const SQL_DESIRED: &str = "SELECT COUNT(*),
     COALESCE(SUM(version > applied OR republish != 0), 0) FROM desired";

/// Reads the report from a store file, read-only.
pub fn read(path: &Path) -> Result<Report, rusqlite::Error> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let now = now_ms();
    // Record ages are on the store's own clock (the time ferry has run),
    // which a wall clock jumping years does not move; it is written every
    // few seconds while ferry runs.
    let clock: i64 = conn
        .query_row(SQL_STORE_CLOCK, [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let agent: Option<AgentSnapshot> = conn
        .query_row(SQL_AGENT, [], |r| r.get::<_, String>(0))
        .optional()?
        .and_then(|json| serde_json::from_str(&json).ok());
    let running = agent
        .as_ref()
        .is_some_and(|a| now.saturating_sub(a.updated_ms) < 3 * SNAPSHOT_EVERY.as_millis() as u64);
    // While the agent runs, its clock went on since it was written (at
    // most a few seconds: bounded, so a wall clock jump cannot matter).
    let since_written = match &agent {
        Some(a) if running => now.saturating_sub(a.updated_ms) as i64,
        _ => 0,
    };
    let clock = clock.saturating_add(since_written);
    let age = |t: Option<i64>| t.map(|o| clock.saturating_sub(o).max(0) as f64 / 1000.0);
    let mut stmt = conn.prepare(SQL_COUNTERS)?;
    let all_counters = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<(String, i64)>, _>>()?;
    let (stream_counters, counters): (Vec<_>, Vec<_>) = all_counters
        .into_iter()
        .partition(|(k, _)| k.starts_with("stream:"));

    let mut streams: Vec<StreamReport> = Vec::new();
    let mut stmt = conn.prepare(SQL_DESTINATIONS)?;
    let dests = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    for (id, topic, stream, role) in dests {
        let lo = id << 48;
        let hi = lo | ((1i64 << 48) - 1);
        let (records, bytes, oldest): (i64, i64, Option<i64>) =
            conn.query_row(SQL_DEST_BACKLOG, [lo, hi], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        let at = match streams.iter().position(|s| s.name == stream) {
            Some(i) => i,
            None => {
                let prefix = format!("stream:{stream}:");
                let mine = |k: &str| k.strip_prefix(&prefix).map(str::to_string);
                let superseded = stream_counters
                    .iter()
                    .find(|(k, _)| mine(k).as_deref() == Some("superseded"))
                    .map_or(0, |(_, v)| *v);
                let dropped = stream_counters
                    .iter()
                    .filter_map(|(k, v)| {
                        mine(k)?
                            .strip_prefix("dropped:")
                            .map(|r| (r.to_string(), *v))
                    })
                    .collect();
                streams.push(StreamReport {
                    name: stream.clone(),
                    records: 0,
                    bytes: 0,
                    oldest_age_seconds: None,
                    topics: Vec::new(),
                    superseded,
                    dropped,
                });
                streams.len() - 1
            }
        };
        let s = &mut streams[at];
        let oldest_age = age(oldest);
        s.records += records as u64;
        s.bytes += bytes as u64;
        s.oldest_age_seconds = match (s.oldest_age_seconds, oldest_age) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        s.topics.push(TopicBacklog {
            topic,
            role,
            records: records as u64,
            bytes: bytes as u64,
            oldest_age_seconds: oldest_age,
        });
    }
    let clusters = clusters_of(&streams);
    let pending: u64 = streams.iter().map(|s| s.records).sum();
    let bytes: u64 = streams.iter().map(|s| s.bytes).sum();
    let oldest = streams
        .iter()
        .filter_map(|s| s.oldest_age_seconds)
        .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));

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
    let mut stmt = conn.prepare(SQL_INCIDENTS)?;
    let incidents = stmt
        .query_map([], |r| {
            Ok(Incident {
                at_ms: r.get::<_, i64>(0)? as u64,
                kind: r.get(1)?,
                detail: r.get(2)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let downlink = downlink(&conn, &counters)?;
    let deduplication_off = conn
        .prepare(&format!(
            "SELECT d.topic FROM store_state s JOIN destinations d
             ON s.name = '{}' || d.id WHERE s.value = 1 ORDER BY d.topic",
            super::db::STATE_DEDUP_OFF
        ))?
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    let rate = agent.as_ref().map(|a| a.drain_rate).unwrap_or(0.0);
    let dead_letters_pruned = counters
        .iter()
        .find(|(k, _)| k == "dead_letters_pruned")
        .map_or(0, |(_, v)| (*v).max(0) as u64);
    Ok(Report {
        store: path.display().to_string(),
        running,
        pending_records: pending,
        pending_bytes: bytes,
        oldest_age_seconds: oldest,
        time_to_drain_seconds: (pending == 0).then_some(0.0).or_else(|| {
            // A tiny rate (or a damaged row) gives no finite estimate.
            Some(pending as f64 / rate).filter(|t| running && rate > 0.0 && t.is_finite())
        }),
        agent,
        streams,
        clusters,
        counters,
        dead_letters: dead as u64,
        dead_letters_pruned,
        recent_dead_letters: recent,
        incidents,
        downlink,
        deduplication_off,
    })
}

/// The backlog per named cluster, summed over its topics.
fn clusters_of(streams: &[StreamReport]) -> Vec<ClusterReport> {
    let mut out: Vec<ClusterReport> = Vec::new();
    for t in streams.iter().flat_map(|s| &s.topics) {
        let Some(name) = crate::layout::cluster_of(&t.topic) else {
            continue;
        };
        let at = match out.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                out.push(ClusterReport {
                    name: name.to_string(),
                    topics: 0,
                    records: 0,
                    bytes: 0,
                    oldest_age_seconds: None,
                });
                out.len() - 1
            }
        };
        let c = &mut out[at];
        c.topics += 1;
        c.records += t.records;
        c.bytes += t.bytes;
        c.oldest_age_seconds = match (c.oldest_age_seconds, t.oldest_age_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    out
}

/// The downlink's state, if the store ever read a desired topic (a store
/// older than the downlink has no such table until ferry opens it).
fn downlink(
    conn: &Connection,
    counters: &[(String, i64)],
) -> Result<Option<DownlinkReport>, rusqlite::Error> {
    let has: i64 = conn.query_row(SQL_HAS_DOWNLINK, [], |r| r.get(0))?;
    if has == 0 {
        return Ok(None);
    }
    let Some((topic, caught_up)) = conn
        .query_row(SQL_DOWNLINK, [], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let (devices, lag): (i64, i64) =
        conn.query_row(SQL_DESIRED, [], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let count = |name: &str| {
        counters
            .iter()
            .find(|(k, _)| k == name)
            .map_or(0, |(_, v)| *v)
    };
    Ok(Some(DownlinkReport {
        topic,
        caught_up: caught_up != 0,
        devices: devices.max(0) as u64,
        lag: lag.max(0) as u64,
        received: count("desired_received"),
        applied: count("desired_applied"),
        stale: count("desired_stale"),
        dead_lettered: count("desired_dead_lettered"),
        republished: count("desired_republished"),
    }))
}
