//! Gateway configuration: one TOML file per gateway.
//!
//! Loading happens in two steps. The file is parsed into [`RawConfig`], a
//! serde mirror of the TOML with every field optional and unknown keys
//! refused; then [`RawConfig::validate`] checks every constraint and either
//! builds the runtime [`Config`] or returns *all* problems at once, each with
//! the key path it concerns (`mqtt.subscriptions[1].device_id_level: ...`).
//! Nothing here touches the network or the store.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The largest message Pulsar accepts by default (`maxMessageSize`).
pub const PULSAR_MAX_MESSAGE_BYTES: usize = 5 * 1024 * 1024;

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
    pub subscriptions: Vec<Subscription>,
}

/// One MQTT topic filter and the rule that extracts the device id from the
/// topic of a message that matched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    /// Zero-based topic level that holds the device id.
    pub device_id_level: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulsarConfig {
    pub host: String,
    pub port: u16,
    pub service_url: String,
    /// Fully qualified: `persistent://tenant/namespace/topic`.
    pub topic: String,
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
    /// Larger payloads go to the dead-letter table instead of the journal.
    pub max_payload_bytes: usize,
    /// Group commit: the longest a received message waits for companions.
    pub commit_max_wait: Duration,
    /// Group commit: the most messages in one transaction.
    pub commit_max_batch: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkConfig {
    /// Sends awaiting their receipt, at most.
    pub max_in_flight: usize,
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
    pub store: Option<RawStore>,
    pub uplink: Option<RawUplink>,
    pub metrics: Option<RawMetrics>,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUplink {
    pub max_in_flight: Option<i64>,
    pub connect_timeout_ms: Option<i64>,
    pub operation_timeout_ms: Option<i64>,
    pub backoff_min_ms: Option<i64>,
    pub backoff_max_ms: Option<i64>,
    pub drain_timeout_ms: Option<i64>,
}

impl Config {
    /// The settings that differ from `new` and take effect only after a
    /// restart (everything but `log_level` and the store's batching and
    /// payload limits).
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
        if self.store.path != new.store.path {
            out.push("store.path");
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
        vec![ConfigError {
            path: String::new(),
            message: format!("not valid TOML: {}", one_line(&e.to_string())),
        }]
    })?;
    let raw = RawConfig::from_table(table)?;
    raw.validate()
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
                        message: one_line(e.message()),
                    });
                    None
                }
            }
        }
        raw.gateway_id = section(&mut table, "gateway_id", &mut errors);
        raw.log_level = section(&mut table, "log_level", &mut errors);
        raw.mqtt = section(&mut table, "mqtt", &mut errors);
        raw.pulsar = section(&mut table, "pulsar", &mut errors);
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
        let mut subscriptions = Vec::new();
        match mqtt.subscriptions {
            None => v.error(
                "mqtt.subscriptions",
                "at least one subscription is required",
            ),
            Some(list) if list.is_empty() => v.error(
                "mqtt.subscriptions",
                "at least one subscription is required",
            ),
            Some(list) => {
                for (i, s) in list.into_iter().enumerate() {
                    let at = format!("mqtt.subscriptions[{i}]");
                    let filter = v.required(&format!("{at}.filter"), s.filter);
                    let level = v.required(&format!("{at}.device_id_level"), s.device_id_level);
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
        let topic = v.required("pulsar.topic", pulsar.topic);
        if let Some(t) = &topic {
            if let Err(msg) = check_topic(t) {
                v.error("pulsar.topic", &msg);
            }
        }

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
            (PULSAR_MAX_MESSAGE_BYTES - 64 * 1024) as i64,
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

        let up = self.uplink.unwrap_or_default();
        let max_in_flight = v.int_in("uplink.max_in_flight", up.max_in_flight, 1000, 1, 100_000);
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
                subscriptions,
            },
            pulsar: PulsarConfig {
                host: phost,
                port: pport,
                service_url: service_url.unwrap_or_default(),
                topic: topic.unwrap_or_default(),
                tls,
                auth,
            },
            store: StoreConfig {
                path: PathBuf::from(path.unwrap_or_default()),
                max_payload_bytes,
                commit_max_wait: ms(commit_max_wait),
                commit_max_batch: commit_max_batch as usize,
            },
            uplink: UplinkConfig {
                max_in_flight: max_in_flight as usize,
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
        assert_eq!(c.mqtt.subscriptions[0].device_id_level, 1);
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
                "mqtt.subscriptions[0].filter",
                "mqtt.subscriptions[1].device_id_level",
                "pulsar.service_url",
                "pulsar.topic",
                "store.path",
                "store.max_payload_bytes",
            ]
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
    fn device_level_must_be_a_wildcard() {
        assert!(check_device_level("a/+/c", 1).is_ok());
        assert!(check_device_level("a/#", 3).is_ok());
        assert!(check_device_level("a/b/c", 1).is_err());
        assert!(check_device_level("a/+", 2).is_err());
    }
}
