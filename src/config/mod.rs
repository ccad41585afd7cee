//! Gateway configuration: one TOML file per gateway.
//!
//! Loading happens in two steps. The file is parsed into [`RawConfig`], a
//! serde mirror of the TOML with every field optional and unknown keys
//! refused; then [`RawConfig::validate`] checks every constraint and either
//! builds the runtime [`Config`] or returns *all* problems at once, each with
//! the key path it concerns (`mqtt.subscriptions[1].device_id_level: ...`).
//! Nothing here touches the network or the store.
//!
//! - this file: the validated [`Config`] and its sections, [`load`] and
//!   [`parse`], the errors, and the defaults and bounds others need;
//! - `raw`: TOML text into [`RawConfig`] (syntax, types, unknown keys);
//! - `validate`: [`RawConfig`] into [`Config`], one function per section;
//! - `streams`: `[[streams]]`, or the one-stream shorthand, into
//!   [`StreamConfig`]s;
//! - `downlink`: `[downlink]`, the desired state's topics.
//!
//! The stream types the rest of ferry routes by ([`StreamKind`],
//! [`Overflow`], [`Limits`], [`Subscription`]) live in [`crate::layout`] and
//! are re-exported here.

mod downlink;
mod raw;
mod streams;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::layout::{Limits, Overflow, StreamKind, Subscription};
pub use downlink::{DownlinkConfig, ACK_STREAM, DEFAULT_DESIRED_MQTT_TOPIC};
pub use raw::{
    take_section, toml_table, unknown_keys, RawAuth, RawConfig, RawDownlink, RawMetrics, RawMqtt,
    RawPulsar, RawStore, RawStream, RawSubscription, RawTls, RawUplink,
};
pub use validate::{parse_service_url, valid_name, Validator, NAME_RULE};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, such as `mqtt.subscriptions[0].filter`; empty for the
    /// file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// The validated configuration ferry runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub gateway_id: String,
    /// A `tracing` filter such as `info` or `ferry=debug,info`; `RUST_LOG`
    /// overrides it at start. Changes apply on reload.
    pub log_level: String,
    pub mqtt: MqttConfig,
    pub pulsar: PulsarConfig,
    /// What goes where: MQTT filters to Pulsar topics, with limits and an
    /// overflow policy each. At least one.
    pub streams: Vec<StreamConfig>,
    pub store: StoreConfig,
    pub uplink: UplinkConfig,
    pub metrics: MetricsConfig,
    /// Desired state from the fleet down to the devices; `None`: off. When
    /// on, `streams` ends with the acknowledgement stream ([`ACK_STREAM`]).
    pub downlink: Option<DownlinkConfig>,
    /// The audit trail of security events.
    pub audit: AuditConfig,
}

/// The audit trail (`[audit]`): where its files are, how large each grows
/// and how many are kept; whether journald gets the events too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// Default: `audit/` beside the store file.
    pub dir: PathBuf,
    pub max_file_bytes: u64,
    pub keep_files: usize,
    /// Also to journald (`journalctl -t ferry-audit`) when its socket is
    /// there.
    pub journald: bool,
}

/// Where Prometheus scrapes ferry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `None` when disabled.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Fixed and non-empty: the broker keeps ferry's persistent session, and
    /// with it every unacknowledged message, under this id.
    pub client_id: String,
    pub keep_alive: Duration,
}

/// One stream: the MQTT messages matching its subscriptions and where they
/// go in Pulsar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Names the stream in metrics, logs and `ferry status`.
    pub name: String,
    pub kind: StreamKind,
    pub subscriptions: Vec<Subscription>,
    /// `state`: the compacted status topic keyed by device id; `events`: an
    /// ordinary topic.
    pub topic: String,
    /// `state` only: a topic that receives every update in order.
    pub history_topic: Option<String>,
    pub overflow: Overflow,
    pub limits: Limits,
}

impl StreamConfig {
    /// Every destination topic of this stream, the main topic first.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.topic.as_str()).chain(self.history_topic.as_deref())
    }
}

/// The Pulsar clusters ferry writes to: every record goes to each of them,
/// on its own (ARCHITECTURE.md, "Two regions").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulsarConfig {
    /// `[[pulsar.clusters]]` in order; the `[pulsar]` form is one cluster
    /// without a name. Never empty once validated.
    pub clusters: Vec<ClusterConfig>,
}

impl PulsarConfig {
    /// The first cluster (the one of the `[pulsar]` form).
    pub fn first(&self) -> &ClusterConfig {
        &self.clusters[0]
    }

    /// The clusters' names, in order (`""` for the `[pulsar]` form).
    pub fn names(&self) -> Vec<String> {
        self.clusters.iter().map(|c| c.name.clone()).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Empty for the `[pulsar]` form; otherwise names the cluster in the
    /// store, the metrics and `ferry status`.
    pub name: String,
    pub host: String,
    pub port: u16,
    pub service_url: String,
    /// Present exactly when the service URL is `pulsar+ssl://`.
    pub tls: Option<TlsConfig>,
    pub auth: Option<TokenSource>,
}

/// Trust anchors and the optional client certificate of a TLS uplink.
/// Hostname verification is always on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub use_system_roots: bool,
    /// Client certificate chain and key (PEM, PKCS#8 or PKCS#1/SEC1) for mTLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Where the JWT comes from. Never the token itself: it is read when
/// connecting and again on every AUTH_CHALLENGE, so a rotated token takes
/// effect without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A file; `token_credential` resolves to one in `$CREDENTIALS_DIRECTORY`.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// Larger payloads go to the dead-letter table instead of the store.
    pub max_payload_bytes: usize,
    /// Group commit: commits begin at least this far apart, each taking
    /// what arrived meanwhile; a message after a quiet spell (the previous
    /// commit began longer ago) commits at once. 0: as soon as the queue is
    /// empty (more commits and page writes under load).
    pub commit_max_wait: Duration,
    /// Group commit: the most messages in one transaction.
    pub commit_max_batch: usize,
    /// The store file's budget: over it (or when the disk is full) every
    /// stream sheds as cheaply as it can while keeping each device's newest
    /// state. `None`: only the disk's size.
    pub max_bytes: Option<u64>,
    pub durability: Durability,
    /// How many dead letters are kept, for how long: the oldest go first.
    pub dead_letters: DeadLetterLimits,
}

/// The bounds of the dead-letter table (`store.dead_letters_*`): past any
/// of them the oldest dead letters are pruned; the lifetime counters keep
/// counting them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterLimits {
    /// Dead letters kept, at most (0: none kept, only counted).
    pub max_count: u64,
    /// Payload bytes kept in dead letters, at most.
    pub max_bytes: u64,
    /// The longest a dead letter is kept (by the wall clock it was
    /// received at).
    pub max_age: Duration,
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        DeadLetterLimits {
            max_count: DEFAULT_DEAD_LETTERS_MAX as u64,
            max_bytes: DEFAULT_DEAD_LETTERS_MAX_BYTES as u64,
            max_age: Duration::from_secs(DEFAULT_DEAD_LETTERS_MAX_AGE_SECS as u64),
        }
    }
}

/// When a commit reaches the disk, which decides what a power cut can lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every group commit is fsynced before its MQTT acks go out: a power
    /// cut loses nothing that was acknowledged.
    Full,
    /// Commits reach the operating system before the acks (a crash of ferry
    /// loses nothing) and the disk every `sync_interval`: a power cut can
    /// lose what was acknowledged in the last interval.
    Interval(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Sends awaiting their receipt, at most.
    pub max_in_flight: usize,
    /// Payload bytes sent and awaiting their receipt, at most (one record
    /// always goes, however large); also what the uplink fetches ahead.
    pub max_in_flight_bytes: usize,
    pub connect_timeout: Duration,
    pub operation_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long to wait for receipts of what is in flight.
    pub drain_timeout: Duration,
}

impl Config {
    /// The settings that differ from `new` and take effect only after a
    /// restart (everything but `log_level`, the store's batching, payload
    /// and size limits, and the streams' limits and overflow policies).
    pub fn needs_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.gateway_id != new.gateway_id {
            out.push("gateway_id");
        }
        if self.mqtt != new.mqtt {
            out.push("mqtt");
        }
        if self.pulsar != new.pulsar {
            out.push("pulsar");
        }
        let routes = |c: &Config| -> Vec<(String, Vec<Subscription>, Vec<String>)> {
            c.streams
                .iter()
                .map(|s| {
                    let topics = s.topics().map(str::to_string).collect();
                    (s.name.clone(), s.subscriptions.clone(), topics)
                })
                .collect()
        };
        if routes(self) != routes(new) {
            out.push("streams (names, subscriptions, topics)");
        }
        let rejecting = |c: &Config| -> Vec<bool> {
            c.streams
                .iter()
                .map(|s| s.overflow == Overflow::Reject)
                .collect()
        };
        if rejecting(self) != rejecting(new) {
            // Each reject stream has an MQTT session of its own.
            out.push("streams (which have overflow = \"reject\")");
        }
        if self.store.path != new.store.path {
            out.push("store.path");
        }
        if self.store.durability != new.store.durability {
            out.push("store.durability");
        }
        if self.uplink != new.uplink {
            out.push("uplink");
        }
        if self.metrics != new.metrics {
            out.push("metrics");
        }
        if self.downlink != new.downlink {
            out.push("downlink");
        }
        if self.audit != new.audit {
            out.push("audit");
        }
        out
    }
}

/// The dotted key paths whose values differ between two configuration
/// texts (added, removed or changed; `streams[1].topic` for arrays), sorted;
/// never the values. A text that does not parse counts as empty.
pub fn changed_keys(old: &str, new: &str) -> Vec<String> {
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&p, v, out);
                }
            }
            toml::Value::Array(a) if a.iter().any(|v| v.is_table()) => {
                for (i, v) in a.iter().enumerate() {
                    flatten(&format!("{prefix}[{i}]"), v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let keys = |text: &str| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(v) = text.parse::<toml::Table>() {
            flatten("", &toml::Value::Table(v), &mut out);
        }
        out
    };
    let (a, b) = (keys(old), keys(new));
    let mut changed: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    changed.sort();
    changed.dedup();
    changed
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let fail = |errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        fail(vec![ConfigError {
            path: String::new(),
            message: format!("cannot read file: {e}"),
        }])
    })?;
    parse(&text).map_err(fail)
}

/// Parses and validates configuration text.
pub fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
    RawConfig::from_text(text)?.validate()
}

/// The largest message Pulsar accepts by default (`maxMessageSize`).
pub const PULSAR_MAX_MESSAGE_BYTES: usize = 5 * 1024 * 1024;

/// The largest `store.max_payload_bytes`: a record and its metadata fit in
/// one Pulsar message.
pub const MAX_PAYLOAD_BYTES: usize = PULSAR_MAX_MESSAGE_BYTES - 64 * 1024;

/// The uplink's default bound on payload bytes in flight per topic.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: i64 = 4 * 1024 * 1024;

/// The store file's default budget.
pub const DEFAULT_STORE_MAX_BYTES: i64 = 512 * 1024 * 1024;

/// The dead-letter table's default bounds: 1,000 letters, 16 MiB of
/// payloads, 7 days.
pub const DEFAULT_DEAD_LETTERS_MAX: i64 = 1000;
pub const DEFAULT_DEAD_LETTERS_MAX_BYTES: i64 = 16 * 1024 * 1024;
pub const DEFAULT_DEAD_LETTERS_MAX_AGE_SECS: i64 = 7 * 24 * 3600;

/// Upper bounds of the open-ended limits, far above any gateway's need and
/// far below where arithmetic on them (milliseconds, sums, tenths) could
/// overflow: ten years, 1 PiB, 2^40 records.
pub const MAX_AGE_SECS: i64 = 10 * 365 * 24 * 3600;
pub const MAX_SIZE_BYTES: i64 = 1 << 50;
pub const MAX_RECORDS: i64 = 1 << 40;

/// Files the tests of every part of the configuration start from.
#[cfg(test)]
mod fixtures {
    /// The one-stream shorthand, everything else by default.
    pub(super) const GOOD: &str = r#"
gateway_id = "gw-1"
[mqtt]
port = 1883
[[mqtt.subscriptions]]
filter = "devices/+/state"
device_id_level = 1
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
topic = "persistent://public/default/device-status"
[store]
path = "/tmp/ferry.db"
"#;

    /// One `[[streams]]` entry, ending inside it: keys appended are the
    /// stream's.
    pub(super) const BASE: &str = r#"
gateway_id = "gw-1"
[pulsar]
service_url = "pulsar://127.0.0.1:6650"
[store]
path = "/tmp/ferry.db"
[[streams]]
name = "status"
topic = "persistent://t/n/status"
subscriptions = [{ filter = "devices/+/state", device_id_level = 1 }]
"#;
}

#[cfg(test)]
mod tests {
    use super::fixtures::GOOD;
    use super::*;

    #[test]
    fn a_good_file_gives_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.mqtt.client_id, "ferry-gw-1");
        assert_eq!(c.pulsar.first().port, 6650);
        assert_eq!(c.store.max_payload_bytes, 256 * 1024);
        assert_eq!(c.streams[0].subscriptions[0].device_id_level, 1);
        assert_eq!(c.streams[0].name, "status");
        assert_eq!(c.streams[0].overflow, Overflow::Coalesce);
        assert_eq!(c.store.dead_letters, DeadLetterLimits::default());
        assert_eq!(c.store.dead_letters.max_count, 1000);
        let dir = c.store.path.parent().unwrap().join("audit");
        assert_eq!(
            c.audit,
            AuditConfig {
                dir,
                max_file_bytes: 1024 * 1024,
                keep_files: 10,
                journald: true
            }
        );
    }

    #[test]
    fn dead_letter_and_audit_bounds_are_checked_with_their_key_paths() {
        let bad = format!("{GOOD}\n[audit]\nmax_file_bytes = 10\nkeep_files = 0\n").replace(
            "[store]\n",
            "[store]\ndead_letters_max = -1\ndead_letters_max_age_secs = 0\n",
        );
        let errors = parse(&bad).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "store.dead_letters_max",
                "store.dead_letters_max_age_secs",
                "audit.max_file_bytes",
                "audit.keep_files"
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn changed_keys_names_every_key_that_differs_never_a_value() {
        let old = "a = 1\n[store]\npath = \"x\"\n[[streams]]\nname = \"s\"\ntopic = \"t1\"\n";
        let new = "a = 1\nb = \"secret\"\n[store]\npath = \"y\"\n[[streams]]\nname = \"s\"\ntopic = \"t2\"\n";
        assert_eq!(
            changed_keys(old, new),
            ["b", "store.path", "streams[0].topic"]
        );
        assert!(changed_keys(old, old).is_empty());
    }
}
