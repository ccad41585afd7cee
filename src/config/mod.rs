//! Gateway configuration: one TOML file per gateway.
//!
//! Loading happens in two steps. The file is parsed into [`RawConfig`], a
//! serde mirror of the TOML with every field optional and unknown keys
//! refused; then [`RawConfig::validate`] checks every constraint and either
//! builds the runtime [`Config`] or returns *all* problems at once, each with
//! the key path it concerns (`mqtt.subscriptions[1].device_id_level: ...`).
//! Nothing here touches the network or the store.

pub use crate::layout::{Limits, Overflow, StreamKind, Subscription};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The largest message Pulsar accepts by default (`maxMessageSize`).
pub const PULSAR_MAX_MESSAGE_BYTES: usize = 5 * 1024 * 1024;

/// The largest `store.max_payload_bytes`: a record and its metadata fit in
/// one Pulsar message.
pub const MAX_PAYLOAD_BYTES: usize = PULSAR_MAX_MESSAGE_BYTES - 64 * 1024;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulsarConfig {
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
    /// Group commit: the longest a received message waits for companions.
    pub commit_max_wait: Duration,
    /// Group commit: the most messages in one transaction.
    pub commit_max_batch: usize,
    /// The store file's budget: over it (or when the disk is full) every
    /// stream sheds as cheaply as it can while keeping each device's newest
    /// state. `None`: only the disk's size.
    pub max_bytes: Option<u64>,
    pub durability: Durability,
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

// ---------------------------------------------------------------------------
// Raw mirror of the file.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub gateway_id: Option<String>,
    pub log_level: Option<String>,
    pub mqtt: Option<RawMqtt>,
    pub pulsar: Option<RawPulsar>,
    pub streams: Option<Vec<RawStream>>,
    pub store: Option<RawStore>,
    pub uplink: Option<RawUplink>,
    pub metrics: Option<RawMetrics>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStream {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub topic: Option<String>,
    pub history_topic: Option<String>,
    pub overflow: Option<String>,
    pub max_records: Option<i64>,
    pub max_bytes: Option<i64>,
    pub max_age_secs: Option<i64>,
    pub subscriptions: Option<Vec<RawSubscription>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub enabled: Option<bool>,
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMqtt {
    pub host: Option<String>,
    pub port: Option<i64>,
    pub client_id: Option<String>,
    pub keep_alive_secs: Option<i64>,
    pub subscriptions: Option<Vec<RawSubscription>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    pub filter: Option<String>,
    pub device_id_level: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPulsar {
    pub service_url: Option<String>,
    pub topic: Option<String>,
    pub tls: Option<RawTls>,
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca_file: Option<String>,
    pub use_system_roots: Option<bool>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub token_file: Option<String>,
    pub token_credential: Option<String>,
    pub token_env: Option<String>,
    /// Refused with a clear message: a token must not sit in the config.
    pub token: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub path: Option<String>,
    pub max_payload_bytes: Option<i64>,
    pub commit_max_wait_ms: Option<i64>,
    pub commit_max_batch: Option<i64>,
    pub max_bytes: Option<i64>,
    pub durability: Option<String>,
    pub sync_interval_ms: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub max_in_flight: Option<i64>,
    pub max_in_flight_bytes: Option<i64>,
    pub connect_timeout_ms: Option<i64>,
    pub operation_timeout_ms: Option<i64>,
    pub backoff_min_ms: Option<i64>,
    pub backoff_max_ms: Option<i64>,
    pub drain_timeout_ms: Option<i64>,
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
        out
    }
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
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        // The parser's own rendering quotes the offending line, which may
        // hold a secret: only where, and what the parser says.
        let at = e
            .span()
            .map(|s| {
                let (line, column) = line_column(text, s.start);
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        vec![ConfigError {
            path: String::new(),
            message: format!("not valid TOML{at}: {}", scrub(e.message())),
        }]
    })?;
    let raw = RawConfig::from_table(table)?;
    raw.validate()
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// A parser or serde message on one line, without the quoted values some of
/// them carry (`invalid type: string "...", expected ...`): a value may be
/// a secret typed into the wrong key.
fn scrub(s: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                if out.ends_with(' ') {
                    out.pop();
                }
            }
            ('"', true) => quoted = false,
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    one_line(&out)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl RawConfig {
    /// Deserializes section by section so that a type error in one section
    /// does not hide the problems of the others.
    fn from_table(mut table: toml::Table) -> Result<RawConfig, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut raw = RawConfig::default();
        fn section<T: serde::de::DeserializeOwned>(
            table: &mut toml::Table,
            key: &str,
            errors: &mut Vec<ConfigError>,
        ) -> Option<T> {
            let value = table.remove(key)?;
            match value.try_into::<T>() {
                Ok(v) => Some(v),
                Err(e) => {
                    errors.push(ConfigError {
                        path: key.to_string(),
                        message: scrub(e.message()),
                    });
                    None
                }
            }
        }
        raw.gateway_id = section(&mut table, "gateway_id", &mut errors);
        raw.log_level = section(&mut table, "log_level", &mut errors);
        raw.mqtt = section(&mut table, "mqtt", &mut errors);
        raw.pulsar = section(&mut table, "pulsar", &mut errors);
        raw.streams = section(&mut table, "streams", &mut errors);
        raw.store = section(&mut table, "store", &mut errors);
        raw.uplink = section(&mut table, "uplink", &mut errors);
        raw.metrics = section(&mut table, "metrics", &mut errors);
        for key in table.keys() {
            errors.push(ConfigError {
                path: key.clone(),
                message: "unknown key".into(),
            });
        }
        if errors.is_empty() {
            Ok(raw)
        } else {
            Err(errors)
        }
    }

    /// Checks every constraint; returns the runtime configuration or every
    /// problem found.
    pub fn validate(self) -> Result<Config, Vec<ConfigError>> {
        let mut v = Validator::default();

        let gateway_id = v.required("gateway_id", self.gateway_id);
        if let Some(id) = &gateway_id {
            v.check(
                "gateway_id",
                valid_name(id),
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            );
        }

        let log_level = self.log_level.unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
            v.error("log_level", &format!("is not a valid log filter: {e}"));
        }

        let mqtt = self.mqtt.unwrap_or_default();
        let host = mqtt.host.unwrap_or_else(|| "127.0.0.1".into());
        v.check("mqtt.host", !host.trim().is_empty(), "must not be empty");
        let port = v.int_in("mqtt.port", mqtt.port, 1883, 1, 65535) as u16;
        let client_id = match mqtt.client_id {
            Some(id) => {
                v.check(
                    "mqtt.client_id",
                    valid_name(&id),
                    "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
                );
                id
            }
            None => format!("ferry-{}", gateway_id.clone().unwrap_or_default()),
        };
        let keep_alive = v.int_in("mqtt.keep_alive_secs", mqtt.keep_alive_secs, 30, 5, 3600);
        let pulsar = self.pulsar.unwrap_or_default();
        let service_url = v.required("pulsar.service_url", pulsar.service_url);
        let (phost, pport, tls_url) = match service_url.as_deref().map(parse_service_url) {
            Some(Ok(hp)) => hp,
            Some(Err(msg)) => {
                v.error("pulsar.service_url", &msg);
                (String::new(), 0, false)
            }
            None => (String::new(), 0, false),
        };
        let tls = match (tls_url, pulsar.tls) {
            (true, raw) => {
                let raw = raw.unwrap_or_default();
                let use_system_roots = raw.use_system_roots.unwrap_or(false);
                if raw.ca_file.is_none() && !use_system_roots {
                    v.error(
                        "pulsar.tls.ca_file",
                        "is required for pulsar+ssl:// unless pulsar.tls.use_system_roots = true",
                    );
                }
                let client_cert = match (raw.cert_file, raw.key_file) {
                    (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                    (None, None) => None,
                    (Some(_), None) => {
                        v.error(
                            "pulsar.tls.key_file",
                            "is required with pulsar.tls.cert_file",
                        );
                        None
                    }
                    (None, Some(_)) => {
                        v.error(
                            "pulsar.tls.cert_file",
                            "is required with pulsar.tls.key_file",
                        );
                        None
                    }
                };
                Some(TlsConfig {
                    ca_file: raw.ca_file.map(PathBuf::from),
                    use_system_roots,
                    client_cert,
                })
            }
            (false, Some(_)) if service_url.is_some() => {
                v.error(
                    "pulsar.tls",
                    "is set, but pulsar.service_url is not pulsar+ssl://",
                );
                None
            }
            (false, _) => None,
        };
        let auth = pulsar.auth.and_then(|a| token_source(&mut v, a));
        let streams = streams(&mut v, mqtt.subscriptions, pulsar.topic, self.streams);

        let store = self.store.unwrap_or_default();
        let path = v.required("store.path", store.path);
        if let Some(p) = &path {
            v.check("store.path", !p.trim().is_empty(), "must not be empty");
        }
        let max_payload_bytes = v.int_in(
            "store.max_payload_bytes",
            store.max_payload_bytes,
            256 * 1024,
            1,
            MAX_PAYLOAD_BYTES as i64,
        ) as usize;
        let commit_max_wait = v.int_in(
            "store.commit_max_wait_ms",
            store.commit_max_wait_ms,
            10,
            0,
            1000,
        );
        let commit_max_batch = v.int_in(
            "store.commit_max_batch",
            store.commit_max_batch,
            1000,
            1,
            100_000,
        );
        let store_max_bytes = v.int_in(
            "store.max_bytes",
            store.max_bytes,
            DEFAULT_STORE_MAX_BYTES,
            0,
            MAX_SIZE_BYTES,
        );
        let sync_interval = v.int_in(
            "store.sync_interval_ms",
            store.sync_interval_ms,
            1000,
            10,
            60_000,
        );
        let durability = match store.durability.as_deref().unwrap_or("full") {
            "full" => Durability::Full,
            "interval" => Durability::Interval(Duration::from_millis(sync_interval as u64)),
            other => {
                v.error(
                    "store.durability",
                    &format!("must be \"full\" or \"interval\", found \"{other}\""),
                );
                Durability::Full
            }
        };
        if store.sync_interval_ms.is_some() && durability == Durability::Full {
            v.error(
                "store.sync_interval_ms",
                "only applies with store.durability = \"interval\"",
            );
        }

        let up = self.uplink.unwrap_or_default();
        let max_in_flight = v.int_in("uplink.max_in_flight", up.max_in_flight, 1000, 1, 100_000);
        let max_in_flight_bytes = v.int_in(
            "uplink.max_in_flight_bytes",
            up.max_in_flight_bytes,
            DEFAULT_MAX_IN_FLIGHT_BYTES,
            1024,
            1024 * 1024 * 1024,
        );
        let connect_timeout = v.int_in(
            "uplink.connect_timeout_ms",
            up.connect_timeout_ms,
            10_000,
            100,
            600_000,
        );
        let operation_timeout = v.int_in(
            "uplink.operation_timeout_ms",
            up.operation_timeout_ms,
            30_000,
            100,
            600_000,
        );
        let backoff_min = v.int_in("uplink.backoff_min_ms", up.backoff_min_ms, 100, 1, 600_000);
        let backoff_max = v.int_in(
            "uplink.backoff_max_ms",
            up.backoff_max_ms,
            30_000,
            1,
            3_600_000,
        );
        let drain_timeout = v.int_in(
            "uplink.drain_timeout_ms",
            up.drain_timeout_ms,
            5_000,
            0,
            600_000,
        );
        v.check(
            "uplink.backoff_max_ms",
            backoff_max >= backoff_min,
            "must not be smaller than uplink.backoff_min_ms",
        );

        let m = self.metrics.unwrap_or_default();
        let listen = match (
            m.enabled.unwrap_or(true),
            m.listen.as_deref().unwrap_or("127.0.0.1:9464"),
        ) {
            (false, _) => None,
            (true, addr) => match addr.parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    v.error(
                        "metrics.listen",
                        &format!("`{addr}` is not an address such as 127.0.0.1:9464"),
                    );
                    None
                }
            },
        };

        if !v.errors.is_empty() {
            return Err(v.errors);
        }
        let ms = |n: i64| Duration::from_millis(n as u64);
        Ok(Config {
            gateway_id: gateway_id.unwrap_or_default(),
            log_level,
            mqtt: MqttConfig {
                host,
                port,
                client_id,
                keep_alive: Duration::from_secs(keep_alive as u64),
            },
            pulsar: PulsarConfig {
                host: phost,
                port: pport,
                service_url: service_url.unwrap_or_default(),
                tls,
                auth,
            },
            store: StoreConfig {
                path: PathBuf::from(path.unwrap_or_default()),
                max_payload_bytes,
                commit_max_wait: ms(commit_max_wait),
                commit_max_batch: commit_max_batch as usize,
                max_bytes: (store_max_bytes > 0).then_some(store_max_bytes as u64),
                durability,
            },
            streams,
            uplink: UplinkConfig {
                max_in_flight: max_in_flight as usize,
                max_in_flight_bytes: max_in_flight_bytes as usize,
                connect_timeout: ms(connect_timeout),
                operation_timeout: ms(operation_timeout),
                backoff_min: ms(backoff_min),
                backoff_max: ms(backoff_max),
                drain_timeout: ms(drain_timeout),
            },
            metrics: MetricsConfig { listen },
        })
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    fn error(&mut self, path: &str, message: &str) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    fn check(&mut self, path: &str, ok: bool, message: &str) {
        if !ok {
            self.error(path, message);
        }
    }

    fn required<T>(&mut self, path: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.error(path, "is required");
        }
        value
    }

    /// An integer with a default, checked against an inclusive range.
    fn int_in(&mut self, path: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        let n = value.unwrap_or(default);
        if n < min || n > max {
            self.error(path, &format!("must be between {min} and {max}, found {n}"));
            default
        } else {
            n
        }
    }
}

/// The uplink's default bound on payload bytes in flight per topic.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: i64 = 4 * 1024 * 1024;

/// The store file's default budget.
pub const DEFAULT_STORE_MAX_BYTES: i64 = 512 * 1024 * 1024;

/// Upper bounds of the open-ended limits, far above any gateway's need and
/// far below where arithmetic on them (milliseconds, sums, tenths) could
/// overflow: ten years, 1 PiB, 2^40 records.
pub const MAX_AGE_SECS: i64 = 10 * 365 * 24 * 3600;
pub const MAX_SIZE_BYTES: i64 = 1 << 50;
pub const MAX_RECORDS: i64 = 1 << 40;

/// The streams: either `[[streams]]`, or the one-stream shorthand
/// (`mqtt.subscriptions` and `pulsar.topic`), which is a `state` stream named
/// `status` with the default policy and no limits of its own.
fn streams(
    v: &mut Validator,
    short_subs: Option<Vec<RawSubscription>>,
    short_topic: Option<String>,
    raw: Option<Vec<RawStream>>,
) -> Vec<StreamConfig> {
    let list = match raw {
        Some(list) => {
            if short_subs.is_some() {
                v.error(
                    "mqtt.subscriptions",
                    "not allowed together with [[streams]]: give each stream its subscriptions",
                );
            }
            if short_topic.is_some() {
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
                .map(|(i, s)| (format!("streams[{i}]"), s))
                .collect::<Vec<_>>()
        }
        None => {
            if short_subs.is_none() && short_topic.is_none() {
                v.error(
                    "streams",
                    "at least one stream is required ([[streams]], or mqtt.subscriptions with pulsar.topic)",
                );
                return Vec::new();
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
            vec![(String::new(), s)]
        }
    };
    let mut out: Vec<StreamConfig> = Vec::new();
    let mut topics: Vec<(String, String)> = Vec::new();
    for (at, s) in list {
        let key = |k: &str| -> String {
            if !at.is_empty() {
                format!("{at}.{k}")
            } else if k == "subscriptions" || k.starts_with("subscriptions[") {
                format!("mqtt.{k}")
            } else {
                format!("pulsar.{k}")
            }
        };
        let name = v.required(&key("name"), s.name).unwrap_or_default();
        if !name.is_empty() && !valid_name(&name) {
            v.error(
                &key("name"),
                "must be 1 to 64 characters of A-Z a-z 0-9 . _ -",
            );
        }
        if out.iter().any(|o| o.name == name) {
            v.error(&key("name"), &format!("`{name}` is used by another stream"));
        }
        let kind = match s.kind.as_deref().unwrap_or("state") {
            "state" => StreamKind::State,
            "events" => StreamKind::Events,
            other => {
                v.error(
                    &key("kind"),
                    &format!("must be \"state\" or \"events\", found \"{other}\""),
                );
                StreamKind::State
            }
        };
        let default_overflow = match kind {
            StreamKind::State => "coalesce",
            StreamKind::Events => "drop-oldest",
        };
        let overflow = match s.overflow.as_deref().unwrap_or(default_overflow) {
            "coalesce" if kind == StreamKind::Events => {
                v.error(
                    &key("overflow"),
                    "coalesce needs kind = \"state\": events are never coalesced",
                );
                Overflow::DropOldest
            }
            "coalesce" => Overflow::Coalesce,
            "drop-oldest" => Overflow::DropOldest,
            "reject" => Overflow::Reject,
            other => {
                v.error(
                    &key("overflow"),
                    &format!("must be coalesce, drop-oldest or reject, found \"{other}\""),
                );
                Overflow::Coalesce
            }
        };
        let mut subscriptions = Vec::new();
        match s.subscriptions {
            None => v.error(
                &key("subscriptions"),
                "at least one subscription is required",
            ),
            Some(l) if l.is_empty() => v.error(
                &key("subscriptions"),
                "at least one subscription is required",
            ),
            Some(l) => {
                for (j, sub) in l.into_iter().enumerate() {
                    let at = key(&format!("subscriptions[{j}]"));
                    let filter = v.required(&format!("{at}.filter"), sub.filter);
                    let level = v.required(&format!("{at}.device_id_level"), sub.device_id_level);
                    if let (Some(filter), Some(level)) = (filter, level) {
                        if let Err(msg) = check_filter(&filter) {
                            v.error(&format!("{at}.filter"), &msg);
                        } else if let Err(msg) = check_device_level(&filter, level) {
                            v.error(&format!("{at}.device_id_level"), &msg);
                        } else {
                            subscriptions.push(Subscription {
                                filter,
                                device_id_level: level as usize,
                            });
                        }
                    }
                }
            }
        }
        let mut check_dest = |v: &mut Validator, k: &str, t: &str| {
            if let Err(msg) = check_topic(t) {
                v.error(&key(k), &msg);
            } else if let Some((other, _)) = topics.iter().find(|(_, seen)| seen == t) {
                v.error(
                    &key(k),
                    &format!("`{t}` is already the destination of {other}: each topic has one producer and one sequence"),
                );
            } else {
                topics.push((key(k), t.to_string()));
            }
        };
        let topic = s.topic.clone();
        match &topic {
            Some(t) => check_dest(v, "topic", t),
            None if at.is_empty() => {} // reported above as pulsar.topic
            None => v.error(&key("topic"), "is required"),
        }
        if let Some(h) = &s.history_topic {
            if kind == StreamKind::Events {
                v.error(
                    &key("history_topic"),
                    "only a state stream has a history topic (an events topic already keeps every event)",
                );
            } else {
                check_dest(v, "history_topic", h);
            }
        }
        let positive = |v: &mut Validator, k: &str, n: Option<i64>, max: i64| -> Option<u64> {
            match n {
                Some(n) if n < 1 || n > max => {
                    v.error(&key(k), &format!("must be between 1 and {max}, found {n}"));
                    None
                }
                n => n.map(|n| n as u64),
            }
        };
        let limits = Limits {
            max_records: positive(v, "max_records", s.max_records, MAX_RECORDS),
            max_bytes: positive(v, "max_bytes", s.max_bytes, MAX_SIZE_BYTES),
            max_age: positive(v, "max_age_secs", s.max_age_secs, MAX_AGE_SECS)
                .map(Duration::from_secs),
        };
        if overflow == Overflow::Reject && limits.max_age.is_some() {
            v.error(
                &key("max_age_secs"),
                "not with overflow = \"reject\", which never drops a record",
            );
        }
        if overflow == Overflow::Reject
            && limits.max_records.is_none()
            && limits.max_bytes.is_none()
        {
            v.error(
                &key("overflow"),
                "reject needs max_records or max_bytes: the limit at which MQTT acks stop",
            );
        }
        out.push(StreamConfig {
            name,
            kind,
            subscriptions,
            topic: topic.unwrap_or_default(),
            history_topic: if kind == StreamKind::State {
                s.history_topic
            } else {
                None
            },
            overflow,
            limits,
        });
    }
    out
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
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

/// `pulsar://host[:port]` (port 6650) or `pulsar+ssl://host[:port]` (port
/// 6651). Returns host, port and whether TLS is asked for.
pub fn parse_service_url(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, tls) = if let Some(rest) = url.strip_prefix("pulsar://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("pulsar+ssl://") {
        (rest, true)
    } else {
        return Err(format!(
            "`{url}` must start with pulsar:// or pulsar+ssl://"
        ));
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains(',') {
        return Err(format!(
            "`{url}` must be pulsar[+ssl]://host[:port] (one host)"
        ));
    }
    let default_port = if tls { 6651 } else { 6650 };
    match rest.rsplit_once(':') {
        Some((host, port)) => match port.parse::<u16>() {
            Ok(p) if p > 0 && !host.is_empty() => Ok((host.to_string(), p, tls)),
            _ => Err(format!("`{url}` has an invalid port")),
        },
        None => Ok((rest.to_string(), default_port, tls)),
    }
}

/// Exactly one token source; never an inline token.
fn token_source(v: &mut Validator, a: RawAuth) -> Option<TokenSource> {
    if a.token.is_some() {
        v.error(
            "pulsar.auth.token",
            "inline tokens are not allowed (config files are often world-readable): use token_file, token_credential or token_env",
        );
        return None;
    }
    let given = [
        a.token_file.is_some(),
        a.token_credential.is_some(),
        a.token_env.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if given != 1 {
        v.error(
            "pulsar.auth",
            "needs exactly one of token_file, token_credential, token_env",
        );
        return None;
    }
    if let Some(f) = a.token_file {
        return Some(TokenSource::File(PathBuf::from(f)));
    }
    if let Some(name) = a.token_credential {
        if name.is_empty() || name.contains('/') {
            v.error(
                "pulsar.auth.token_credential",
                "must be a credential name, without `/`",
            );
            return None;
        }
        return match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) => Some(TokenSource::File(PathBuf::from(dir).join(name))),
            None => {
                v.error(
                    "pulsar.auth.token_credential",
                    "needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with LoadCredential=",
                );
                None
            }
        };
    }
    let name = a.token_env.unwrap_or_default();
    if name.is_empty() {
        v.error("pulsar.auth.token_env", "must name an environment variable");
        return None;
    }
    Some(TokenSource::Env(name))
}

fn check_topic(topic: &str) -> Result<(), String> {
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
    use super::*;

    const GOOD: &str = r#"
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

    #[test]
    fn a_good_file_gives_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.mqtt.client_id, "ferry-gw-1");
        assert_eq!(c.pulsar.port, 6650);
        assert_eq!(c.store.max_payload_bytes, 256 * 1024);
        assert_eq!(c.streams[0].subscriptions[0].device_id_level, 1);
        assert_eq!(c.streams[0].name, "status");
        assert_eq!(c.streams[0].overflow, Overflow::Coalesce);
    }

    #[test]
    fn every_problem_is_listed_with_its_path() {
        let text = r#"
gateway_id = ""
colour = "blue"
[mqtt]
port = 0
[[mqtt.subscriptions]]
filter = "devices/#/x"
device_id_level = 1
[[mqtt.subscriptions]]
filter = "devices/all/state"
device_id_level = 1
[pulsar]
service_url = "http://x"
topic = "device-status"
[store]
max_payload_bytes = 0
"#;
        let errs = parse(text).unwrap_err();
        // Unknown keys are found before validation; fix them and look again.
        assert_eq!(
            errs,
            vec![ConfigError {
                path: "colour".into(),
                message: "unknown key".into()
            }]
        );
        let errs = parse(&text.replace("colour = \"blue\"\n", "")).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "gateway_id",
                "mqtt.port",
                "pulsar.service_url",
                "mqtt.subscriptions[0].filter",
                "mqtt.subscriptions[1].device_id_level",
                "pulsar.topic",
                "store.path",
                "store.max_payload_bytes",
            ]
        );
    }

    #[test]
    fn the_uplink_bounds_bytes_in_flight() {
        assert_eq!(
            parse(GOOD).unwrap().uplink.max_in_flight_bytes,
            4 * 1024 * 1024
        );
        let set = format!("{GOOD}[uplink]\nmax_in_flight_bytes = 65536\n");
        assert_eq!(parse(&set).unwrap().uplink.max_in_flight_bytes, 65536);
        let errs = parse(&format!(
            "{GOOD}[uplink]\nmax_in_flight_bytes = 0\nmax_in_flight = 0\n"
        ))
        .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec!["uplink.max_in_flight", "uplink.max_in_flight_bytes"]
        );
        assert!(
            errs[1]
                .message
                .contains("between 1024 and 1073741824, found 0"),
            "{}",
            errs[1].message
        );
    }

    #[test]
    fn type_errors_in_several_sections_are_all_reported() {
        let text = r#"
gateway_id = 5
[mqtt]
port = "x"
[store]
path = "/tmp/f.db"
bogus = 1
"#;
        let errs = parse(text).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["gateway_id", "mqtt", "store"]);
        assert!(errs[2].message.contains("bogus"), "{}", errs[2].message);
    }

    #[test]
    fn tls_and_auth_settings_are_checked_together() {
        let tls = GOOD.replace("pulsar://127.0.0.1:6650", "pulsar+ssl://broker.example");
        let errs = parse(&tls).unwrap_err();
        assert_eq!(errs[0].path, "pulsar.tls.ca_file");

        let ok = format!(
            "{tls}\n[pulsar.tls]\nca_file = \"/etc/ferry/ca.pem\"\n[pulsar.auth]\ntoken_file = \"/etc/ferry/t\"\n"
        );
        let ok = ok.replace("[store]\npath = \"/tmp/ferry.db\"\n", "");
        let ok = format!("{ok}[store]\npath = \"/tmp/ferry.db\"\n");
        let c = parse(&ok).unwrap();
        assert_eq!(c.pulsar.port, 6651);
        assert_eq!(
            c.pulsar.tls.unwrap().ca_file,
            Some(PathBuf::from("/etc/ferry/ca.pem"))
        );
        assert_eq!(
            c.pulsar.auth,
            Some(TokenSource::File(PathBuf::from("/etc/ferry/t")))
        );

        let inline = format!("{GOOD}[pulsar.auth]\ntoken = \"eyJ...\"\n");
        // [pulsar.auth] after [store] is still the pulsar table in TOML.
        let errs = parse(&inline).unwrap_err();
        assert_eq!(errs[0].path, "pulsar.auth.token");
        assert!(
            !errs[0].message.contains("eyJ"),
            "the token is never echoed"
        );

        let both = format!("{GOOD}[pulsar.auth]\ntoken_file = \"a\"\ntoken_env = \"B\"\n");
        assert_eq!(parse(&both).unwrap_err()[0].path, "pulsar.auth");

        let plain_with_tls = format!("{GOOD}[pulsar.tls]\nca_file = \"x\"\n");
        assert_eq!(parse(&plain_with_tls).unwrap_err()[0].path, "pulsar.tls");
    }

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
    }

    #[test]
    fn device_level_must_be_a_wildcard() {
        assert!(check_device_level("a/+/c", 1).is_ok());
        assert!(check_device_level("a/#", 3).is_ok());
        assert!(check_device_level("a/b/c", 1).is_err());
        assert!(check_device_level("a/+", 2).is_err());
    }

    const BASE: &str = r#"
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

    #[test]
    fn a_toml_syntax_error_gives_line_and_column_but_never_the_text_of_the_line() {
        let text =
            format!("{BASE}[pulsar.auth]\ntoken_file = \"/etc/ferry/eyJhbGciOiJIUzI1NiJ9.secret\n");
        let errs = parse(&text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let msg = errs[0].to_string();
        assert!(!msg.contains("eyJ"), "the line is echoed: {msg}");
        assert!(!msg.contains("secret"), "the line is echoed: {msg}");
        assert!(msg.contains("line 12, column 53"), "{msg}");
        assert!(msg.starts_with("not valid TOML"), "{msg}");
        // A value in the wrong type's place is not echoed either.
        let typed = BASE.replace(
            "gateway_id = \"gw-1\"",
            "gateway_id = \"gw-1\"\n[mqtt]\nport = \"eyJsecret\"",
        );
        let errs = parse(&typed).unwrap_err();
        assert_eq!(errs[0].path, "mqtt");
        assert!(!errs[0].message.contains("eyJ"), "{}", errs[0].message);
    }

    #[test]
    fn durations_and_sizes_are_bounded_with_their_key_path() {
        let with = |extra: &str| parse(&format!("{BASE}{extra}\n"));
        let path_of = |extra: &str| -> Vec<String> {
            with(extra)
                .unwrap_err()
                .into_iter()
                .map(|e| e.path)
                .collect()
        };
        // 2^64 ms over 1000: truncated to about an hour before.
        assert_eq!(
            path_of("max_age_secs = 18446744073713152"),
            ["streams[0].max_age_secs"]
        );
        let ten_years = 10 * 365 * 24 * 3600;
        let c = with(&format!("max_age_secs = {ten_years}")).unwrap();
        assert_eq!(
            c.streams[0].limits.max_age,
            Some(Duration::from_secs(ten_years))
        );
        assert_eq!(
            path_of(&format!("max_age_secs = {}", ten_years + 1)),
            ["streams[0].max_age_secs"]
        );
        assert_eq!(
            path_of("max_bytes = 9223372036854775807"),
            ["streams[0].max_bytes"]
        );
        assert_eq!(
            path_of("max_records = 9223372036854775807"),
            ["streams[0].max_records"]
        );
        let store = |k: &str| BASE.replace("[store]\n", &format!("[store]\n{k}\n"));
        assert_eq!(
            parse(&store("max_bytes = 9223372036854775807")).unwrap_err()[0].path,
            "store.max_bytes"
        );
        let big = parse(&store("max_bytes = 1099511627776")).unwrap();
        assert_eq!(big.store.max_bytes, Some(1 << 40));
    }
}
