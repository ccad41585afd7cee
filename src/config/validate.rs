//! [`RawConfig`] into [`Config`]: every constraint, section by section, in
//! the order of the file's sections. Nothing stops at the first problem:
//! each goes to the [`Validator`] with its key path, a default stands in for
//! the bad value, and the checks go on, so the operator sees every problem
//! at once.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::{
    RawAudit, RawAuth, RawConfig, RawMetrics, RawMqtt, RawPulsar, RawStore, RawTls, RawUplink,
};
use super::streams::streams;
use super::ClusterConfig;
use super::{
    AuditConfig, Config, ConfigError, DeadLetterLimits, Durability, MetricsConfig, MqttConfig,
    PulsarConfig, StoreConfig, TlsConfig, TokenSource, UplinkConfig, DEFAULT_DEAD_LETTERS_MAX,
    DEFAULT_DEAD_LETTERS_MAX_AGE_SECS, DEFAULT_DEAD_LETTERS_MAX_BYTES, DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_STORE_MAX_BYTES, MAX_AGE_SECS, MAX_PAYLOAD_BYTES, MAX_SIZE_BYTES,
};

/// What a gateway id, client id or stream name may be.
pub const NAME_RULE: &str = "must be 1 to 64 characters of A-Z a-z 0-9 . _ -";

impl RawConfig {
    /// Checks every constraint; returns the runtime configuration or every
    /// problem found.
    pub fn validate(self) -> Result<Config, Vec<ConfigError>> {
        let mut v = Validator::default();
        let gateway_id = v.required("gateway_id", self.gateway_id);
        if let Some(id) = &gateway_id {
            v.check("gateway_id", valid_name(id), NAME_RULE);
        }
        let log_level = log_level(&mut v, self.log_level);
        // The one-stream shorthand's keys belong to the streams.
        let mut raw_mqtt = self.mqtt.unwrap_or_default();
        let short_subs = raw_mqtt.subscriptions.take();
        let mqtt = mqtt(&mut v, raw_mqtt, gateway_id.as_deref());
        let mut raw_pulsar = self.pulsar.unwrap_or_default();
        let short_topic = raw_pulsar.topic.take();
        let pulsar = pulsar(&mut v, raw_pulsar);
        let streams = streams(&mut v, short_subs, short_topic, self.streams);
        let store = store(&mut v, self.store.unwrap_or_default());
        let audit = audit(&mut v, self.audit.unwrap_or_default(), &store.path);
        let uplink = uplink(&mut v, self.uplink.unwrap_or_default());
        let metrics = metrics(&mut v, self.metrics.unwrap_or_default());
        let mut streams = streams;
        let downlink = self
            .downlink
            .map(|raw| super::downlink::downlink(&mut v, raw, &mut streams));
        if !v.errors.is_empty() {
            return Err(v.errors);
        }
        Ok(Config {
            gateway_id: gateway_id.unwrap_or_default(),
            log_level,
            mqtt,
            pulsar,
            streams,
            store,
            uplink,
            metrics,
            downlink,
            audit,
        })
    }
}

/// Collects the problems of one file (`ferry-fleet` checks its file with
/// it too).
#[derive(Default)]
pub struct Validator {
    errors: Vec<ConfigError>,
}

impl Validator {
    /// Every problem found, in the order found.
    pub fn into_errors(self) -> Vec<ConfigError> {
        self.errors
    }

    pub fn error(&mut self, path: &str, message: &str) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    pub fn check(&mut self, path: &str, ok: bool, message: &str) {
        if !ok {
            self.error(path, message);
        }
    }

    pub fn required<T>(&mut self, path: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.error(path, "is required");
        }
        value
    }

    /// An integer with a default, checked against an inclusive range.
    pub fn int_in(
        &mut self,
        path: &str,
        value: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        let n = value.unwrap_or(default);
        if n < min || n > max {
            self.error(path, &format!("must be between {min} and {max}, found {n}"));
            default
        } else {
            n
        }
    }
}

/// A gateway id or stream name: what may stand in client ids, producer
/// names and file names.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn log_level(v: &mut Validator, raw: Option<String>) -> String {
    let log_level = raw.unwrap_or_else(|| "info".into());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        v.error("log_level", &format!("is not a valid log filter: {e}"));
    }
    log_level
}

/// `[mqtt]` but its subscriptions; the client id defaults to
/// `ferry-<gateway_id>`.
fn mqtt(v: &mut Validator, raw: RawMqtt, gateway_id: Option<&str>) -> MqttConfig {
    let host = raw.host.unwrap_or_else(|| "127.0.0.1".into());
    v.check("mqtt.host", !host.trim().is_empty(), "must not be empty");
    let port = v.int_in("mqtt.port", raw.port, 1883, 1, 65535) as u16;
    let client_id = match raw.client_id {
        Some(id) => {
            v.check("mqtt.client_id", valid_name(&id), NAME_RULE);
            id
        }
        None => format!("ferry-{}", gateway_id.unwrap_or_default()),
    };
    let keep_alive = v.int_in("mqtt.keep_alive_secs", raw.keep_alive_secs, 30, 5, 3600);
    MqttConfig {
        host,
        port,
        client_id,
        keep_alive: Duration::from_secs(keep_alive as u64),
    }
}

/// `[pulsar]` but its topic: where, over what, as whom.
/// `[pulsar]` (one cluster) or `[[pulsar.clusters]]` (each named, each with
/// its own service URL, TLS and token), never both.
fn pulsar(v: &mut Validator, raw: RawPulsar) -> PulsarConfig {
    let Some(list) = raw.clusters else {
        let one = cluster(
            v,
            "pulsar",
            String::new(),
            raw.service_url,
            raw.tls,
            raw.auth,
        );
        return PulsarConfig {
            clusters: vec![one],
        };
    };
    for (key, given) in [
        ("pulsar.service_url", raw.service_url.is_some()),
        ("pulsar.tls", raw.tls.is_some()),
        ("pulsar.auth", raw.auth.is_some()),
    ] {
        if given {
            v.error(
                key,
                "not allowed together with [[pulsar.clusters]]: give each cluster its own",
            );
        }
    }
    if list.is_empty() {
        v.error("pulsar.clusters", "at least one cluster is required");
    }
    let mut clusters: Vec<ClusterConfig> = Vec::new();
    for (i, c) in list.into_iter().enumerate() {
        let at = format!("pulsar.clusters[{i}]");
        let name = v
            .required(&format!("{at}.name"), c.name)
            .unwrap_or_default();
        if !name.is_empty() && !valid_name(&name) {
            v.error(&format!("{at}.name"), NAME_RULE);
        }
        if let Some(j) = clusters.iter().position(|o| o.name == name) {
            v.error(
                &format!("{at}.name"),
                &format!("`{name}` is already the name of pulsar.clusters[{j}]"),
            );
        }
        clusters.push(cluster(v, &at, name, c.service_url, c.tls, c.auth));
    }
    PulsarConfig { clusters }
}

/// One cluster whose keys are under `at` (`pulsar` or `pulsar.clusters[i]`).
fn cluster(
    v: &mut Validator,
    at: &str,
    name: String,
    service_url: Option<String>,
    tls: Option<RawTls>,
    auth: Option<RawAuth>,
) -> ClusterConfig {
    let url_key = format!("{at}.service_url");
    let service_url = v.required(&url_key, service_url);
    let (host, port, tls_url) = match service_url.as_deref().map(parse_service_url) {
        Some(Ok(hp)) => hp,
        Some(Err(msg)) => {
            v.error(&url_key, &msg);
            (String::new(), 0, false)
        }
        None => (String::new(), 0, false),
    };
    let tls = match (tls_url, tls) {
        (true, tls) => Some(tls_config(v, at, tls.unwrap_or_default())),
        (false, Some(_)) if service_url.is_some() => {
            v.error(
                &format!("{at}.tls"),
                &format!("is set, but {url_key} is not pulsar+ssl://"),
            );
            None
        }
        (false, _) => None,
    };
    let auth = auth.and_then(|a| token_source(v, at, a));
    ClusterConfig {
        name,
        host,
        port,
        service_url: service_url.unwrap_or_default(),
        tls,
        auth,
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

/// `[pulsar.tls]` (under `at`) of a `pulsar+ssl://` URL: trust anchors,
/// and a client certificate given as a pair or not at all.
fn tls_config(v: &mut Validator, at: &str, raw: RawTls) -> TlsConfig {
    let use_system_roots = raw.use_system_roots.unwrap_or(false);
    if raw.ca_file.is_none() && !use_system_roots {
        v.error(
            &format!("{at}.tls.ca_file"),
            &format!("is required for pulsar+ssl:// unless {at}.tls.use_system_roots = true"),
        );
    }
    let client_cert = match (raw.cert_file, raw.key_file) {
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        (None, None) => None,
        (Some(_), None) => {
            v.error(
                &format!("{at}.tls.key_file"),
                &format!("is required with {at}.tls.cert_file"),
            );
            None
        }
        (None, Some(_)) => {
            v.error(
                &format!("{at}.tls.cert_file"),
                &format!("is required with {at}.tls.key_file"),
            );
            None
        }
    };
    TlsConfig {
        ca_file: raw.ca_file.map(PathBuf::from),
        use_system_roots,
        client_cert,
    }
}

/// Exactly one token source (under `at`); never an inline token.
fn token_source(v: &mut Validator, at: &str, a: RawAuth) -> Option<TokenSource> {
    if a.token.is_some() {
        v.error(
            &format!("{at}.auth.token"),
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
            &format!("{at}.auth"),
            "needs exactly one of token_file, token_credential, token_env",
        );
        return None;
    }
    if let Some(f) = a.token_file {
        return Some(TokenSource::File(PathBuf::from(f)));
    }
    if let Some(name) = a.token_credential {
        return token_credential(v, at, name);
    }
    let name = a.token_env.unwrap_or_default();
    if name.is_empty() {
        v.error(
            &format!("{at}.auth.token_env"),
            "must name an environment variable",
        );
        return None;
    }
    Some(TokenSource::Env(name))
}

/// A systemd credential: the file `name` in `$CREDENTIALS_DIRECTORY`.
fn token_credential(v: &mut Validator, at: &str, name: String) -> Option<TokenSource> {
    if name.is_empty() || name.contains('/') {
        v.error(
            &format!("{at}.auth.token_credential"),
            "must be a credential name, without `/`",
        );
        return None;
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => Some(TokenSource::File(PathBuf::from(dir).join(name))),
        None => {
            v.error(
                &format!("{at}.auth.token_credential"),
                "needs $CREDENTIALS_DIRECTORY, which systemd sets for a unit with LoadCredential=",
            );
            None
        }
    }
}

fn store(v: &mut Validator, raw: RawStore) -> StoreConfig {
    let path = v.required("store.path", raw.path);
    if let Some(p) = &path {
        v.check("store.path", !p.trim().is_empty(), "must not be empty");
    }
    let max_payload_bytes = v.int_in(
        "store.max_payload_bytes",
        raw.max_payload_bytes,
        256 * 1024,
        1,
        MAX_PAYLOAD_BYTES as i64,
    );
    let commit_max_wait = v.int_in(
        "store.commit_max_wait_ms",
        raw.commit_max_wait_ms,
        10,
        0,
        1000,
    );
    let commit_max_batch = v.int_in(
        "store.commit_max_batch",
        raw.commit_max_batch,
        1000,
        1,
        100_000,
    );
    let max_bytes = v.int_in(
        "store.max_bytes",
        raw.max_bytes,
        DEFAULT_STORE_MAX_BYTES,
        0,
        MAX_SIZE_BYTES,
    );
    let durability = durability(v, raw.durability.as_deref(), raw.sync_interval_ms);
    let dead_letters = DeadLetterLimits {
        max_count: v.int_in(
            "store.dead_letters_max",
            raw.dead_letters_max,
            DEFAULT_DEAD_LETTERS_MAX,
            0,
            1_000_000,
        ) as u64,
        max_bytes: v.int_in(
            "store.dead_letters_max_bytes",
            raw.dead_letters_max_bytes,
            DEFAULT_DEAD_LETTERS_MAX_BYTES,
            0,
            MAX_SIZE_BYTES,
        ) as u64,
        max_age: Duration::from_secs(v.int_in(
            "store.dead_letters_max_age_secs",
            raw.dead_letters_max_age_secs,
            DEFAULT_DEAD_LETTERS_MAX_AGE_SECS,
            1,
            MAX_AGE_SECS,
        ) as u64),
    };
    StoreConfig {
        path: PathBuf::from(path.unwrap_or_default()),
        max_payload_bytes: max_payload_bytes as usize,
        commit_max_wait: Duration::from_millis(commit_max_wait as u64),
        commit_max_batch: commit_max_batch as usize,
        max_bytes: (max_bytes > 0).then_some(max_bytes as u64),
        durability,
        dead_letters,
    }
}

/// `[audit]`: its folder defaults to `audit/` beside the store file.
fn audit(v: &mut Validator, raw: RawAudit, store_path: &std::path::Path) -> AuditConfig {
    let dir = match raw.dir {
        Some(d) => {
            v.check("audit.dir", !d.trim().is_empty(), "must not be empty");
            PathBuf::from(d)
        }
        None => store_path
            .parent()
            .unwrap_or(std::path::Path::new(""))
            .join("audit"),
    };
    let max_file_bytes = v.int_in(
        "audit.max_file_bytes",
        raw.max_file_bytes,
        1024 * 1024,
        1024,
        1 << 30,
    );
    let keep_files = v.int_in("audit.keep_files", raw.keep_files, 10, 1, 10_000);
    AuditConfig {
        dir,
        max_file_bytes: max_file_bytes as u64,
        keep_files: keep_files as usize,
        journald: raw.journald.unwrap_or(true),
    }
}

/// `full` (the default), or `interval` with its `sync_interval_ms`.
fn durability(v: &mut Validator, raw: Option<&str>, sync_interval_ms: Option<i64>) -> Durability {
    let sync_interval = v.int_in("store.sync_interval_ms", sync_interval_ms, 1000, 10, 60_000);
    let durability = match raw.unwrap_or("full") {
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
    if sync_interval_ms.is_some() && durability == Durability::Full {
        v.error(
            "store.sync_interval_ms",
            "only applies with store.durability = \"interval\"",
        );
    }
    durability
}

fn uplink(v: &mut Validator, raw: RawUplink) -> UplinkConfig {
    let max_in_flight = v.int_in("uplink.max_in_flight", raw.max_in_flight, 1000, 1, 100_000);
    let max_in_flight_bytes = v.int_in(
        "uplink.max_in_flight_bytes",
        raw.max_in_flight_bytes,
        DEFAULT_MAX_IN_FLIGHT_BYTES,
        1024,
        1024 * 1024 * 1024,
    );
    let mut ms = |path: &str, value: Option<i64>, default: i64, min: i64, max: i64| {
        Duration::from_millis(v.int_in(path, value, default, min, max) as u64)
    };
    let connect_timeout = ms(
        "uplink.connect_timeout_ms",
        raw.connect_timeout_ms,
        10_000,
        100,
        600_000,
    );
    let operation_timeout = ms(
        "uplink.operation_timeout_ms",
        raw.operation_timeout_ms,
        30_000,
        100,
        600_000,
    );
    let backoff_min = ms("uplink.backoff_min_ms", raw.backoff_min_ms, 100, 1, 600_000);
    let backoff_max = ms(
        "uplink.backoff_max_ms",
        raw.backoff_max_ms,
        30_000,
        1,
        3_600_000,
    );
    let drain_timeout = ms(
        "uplink.drain_timeout_ms",
        raw.drain_timeout_ms,
        5_000,
        0,
        600_000,
    );
    v.check(
        "uplink.backoff_max_ms",
        backoff_max >= backoff_min,
        "must not be smaller than uplink.backoff_min_ms",
    );
    UplinkConfig {
        max_in_flight: max_in_flight as usize,
        max_in_flight_bytes: max_in_flight_bytes as usize,
        connect_timeout,
        operation_timeout,
        backoff_min,
        backoff_max,
        drain_timeout,
    }
}

/// Where Prometheus scrapes ferry: on by default, on 127.0.0.1:9464.
fn metrics(v: &mut Validator, raw: RawMetrics) -> MetricsConfig {
    let listen = match (
        raw.enabled.unwrap_or(true),
        raw.listen.as_deref().unwrap_or("127.0.0.1:9464"),
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
    MetricsConfig { listen }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{BASE, GOOD};
    use super::super::parse;
    use super::*;

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
    fn clusters_are_named_each_with_its_own_url_tls_and_token() {
        let two = GOOD
            .replace("service_url = \"pulsar://127.0.0.1:6650\"\n", "")
            .replace(
                "topic = \"persistent://public/default/device-status\"\n",
                r#"topic = "persistent://public/default/device-status"
[[pulsar.clusters]]
name = "east"
service_url = "pulsar://east.example:6650"
[[pulsar.clusters]]
name = "west"
service_url = "pulsar+ssl://west.example"
tls = { ca_file = "/etc/ferry/west-ca.pem" }
auth = { token_env = "WEST_TOKEN" }
"#,
            );
        let c = parse(&two).unwrap();
        assert_eq!(c.pulsar.names(), ["east", "west"]);
        assert_eq!(c.pulsar.first().host, "east.example");
        let west = &c.pulsar.clusters[1];
        assert_eq!((west.host.as_str(), west.port), ("west.example", 6651));
        assert!(west.tls.is_some());
        assert_eq!(west.auth, Some(TokenSource::Env("WEST_TOKEN".into())));
        assert_eq!(
            c.streams[0].topic, "persistent://public/default/device-status",
            "pulsar.topic still names the one stream's topic"
        );

        let bad = two
            .replace("name = \"west\"", "name = \"east\"")
            .replace("tls = { ca_file = \"/etc/ferry/west-ca.pem\" }\n", "")
            .replace("[[pulsar.clusters]]\nname = \"east\"\nservice_url = \"pulsar://east.example:6650\"", "[[pulsar.clusters]]\nservice_url = \"east.example\"");
        let errs = parse(&format!("{bad}\n")).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "pulsar.clusters[0].name",
                "pulsar.clusters[0].service_url",
                "pulsar.clusters[1].tls.ca_file",
            ],
            "{errs:?}"
        );
        let both = two.replace(
            "[[pulsar.clusters]]\nname = \"east\"",
            "service_url = \"pulsar://x\"\n[[pulsar.clusters]]\nname = \"east\"",
        );
        let errs = parse(&both).unwrap_err();
        assert_eq!(errs[0].path, "pulsar.service_url", "{errs:?}");
        let dup = two.replace("name = \"west\"", "name = \"east\"");
        let errs = parse(&dup).unwrap_err();
        assert_eq!(errs[0].path, "pulsar.clusters[1].name");
        assert!(errs[0].message.contains("pulsar.clusters[0]"), "{errs:?}");
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
        let c = c.pulsar.first().clone();
        assert_eq!(c.port, 6651);
        assert_eq!(
            c.tls.unwrap().ca_file,
            Some(PathBuf::from("/etc/ferry/ca.pem"))
        );
        assert_eq!(
            c.auth,
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
