//! `fleet.toml`: the fleet's Pulsar, its namespace and policies, the key
//! that signs gateway tokens, the gateways, and the latest-state view.
//! Read with the agent's rules ([`ferry::config`]): every problem is
//! listed with its key path, and no message quotes the file (a value typed
//! into the wrong key may be a secret).
//!
//! Every gateway's topics live in one namespace and are named after the
//! gateway ([`FleetConfig::topic`]), so that one grant per topic gives each
//! gateway's role exactly its own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::config::{
    take_section, toml_table, unknown_keys, valid_name, ConfigError, ConfigErrors, Validator,
    NAME_RULE,
};
use serde::Deserialize;

/// The whole file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// The cluster the commands talk to: the first of `clusters`, or the
    /// one [`FleetConfig::on_cluster`] chose.
    pub pulsar: PulsarConfig,
    /// Every cluster of the file, in its order: one without a name for the
    /// plain `[pulsar]` form, or each `[[pulsar.clusters]]` (a region each;
    /// `provision` declares the namespace in every one).
    pub clusters: Vec<Cluster>,
    pub namespace: NamespaceConfig,
    pub signing: Option<SigningConfig>,
    /// Gateway ids, in the file's order.
    pub gateways: Vec<String>,
    pub view: ViewConfig,
}

/// One cluster (region) of the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Empty for the plain `[pulsar]` form.
    pub name: String,
    pub pulsar: PulsarConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PulsarConfig {
    /// `pulsar://` or `pulsar+ssl://`.
    pub service_url: String,
    /// `http://` or `https://`: the admin REST API.
    pub admin_url: String,
    /// The CA that signed the brokers' certificates (system roots if none).
    pub ca_file: Option<PathBuf>,
    /// The fleet's own token (a role the broker counts as super-user: it
    /// provisions and reads every gateway's topics).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NamespaceConfig {
    pub tenant: String,
    /// The namespace within the tenant.
    pub name: String,
    /// The clusters the tenant may use.
    pub clusters: Vec<String>,
    /// Compaction runs once a topic's backlog exceeds this.
    pub compaction_threshold_bytes: u64,
    /// Retention of acknowledged messages: time (-1: forever) and size
    /// (-1: unbounded).
    pub retention_minutes: i64,
    pub retention_size_mb: i64,
    /// The backlog a subscription may build before producers are held.
    pub backlog_quota_bytes: u64,
}

/// How gateway tokens are signed: the key the broker's token
/// authentication verifies with (`tokenSecretKey` or `tokenPublicKey`).
#[derive(Debug, Clone, PartialEq)]
pub struct SigningConfig {
    pub algorithm: Algorithm,
    /// HS256: the secret's bytes as the broker reads them (raw, or
    /// `data:;base64,` text is not accepted here: give the raw file).
    /// RS256: the private key, PKCS#8 PEM.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Hs256,
    Rs256,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ViewConfig {
    /// `sqlite:<path>` or `postgres://...`.
    pub database: String,
    /// The Key_Shared subscription every `view` process shares.
    pub subscription: String,
    /// Attempts before an update goes to the dead-letter topic.
    pub max_attempts: u32,
    /// How long an update waits on the retry topic before its next attempt.
    pub retry_delay: Duration,
    /// Where `view` and `serve` listen (`GET /devices/{id}`, `/metrics`);
    /// 9465 by default, beside the agent's 9464.
    pub listen: String,
}

/// What a topic of a gateway carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicRole {
    /// The compacted latest state per device (ferry's `status` stream).
    Status,
    /// Every update in order.
    History,
    /// Events.
    Events,
    /// The desired state the fleet writes (compacted; the gateway reads).
    Desired,
    /// Acknowledgements of desired versions applied.
    DesiredAcks,
}

impl TopicRole {
    pub const ALL: [TopicRole; 5] = [
        TopicRole::Status,
        TopicRole::History,
        TopicRole::Events,
        TopicRole::Desired,
        TopicRole::DesiredAcks,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            TopicRole::Status => "status",
            TopicRole::History => "history",
            TopicRole::Events => "events",
            TopicRole::Desired => "desired",
            TopicRole::DesiredAcks => "desired-acks",
        }
    }

    /// Whether the gateway produces to it (else it consumes from it).
    pub fn gateway_produces(self) -> bool {
        self != TopicRole::Desired
    }
}

impl FleetConfig {
    /// The same file, talking to cluster `name` (`None`: no such cluster).
    pub fn on_cluster(&self, name: &str) -> Option<FleetConfig> {
        let c = self.clusters.iter().find(|c| c.name == name)?;
        Some(FleetConfig {
            pulsar: c.pulsar.clone(),
            ..self.clone()
        })
    }

    /// The names of the clusters (empty for the plain `[pulsar]` form).
    pub fn cluster_names(&self) -> Vec<String> {
        self.clusters
            .iter()
            .filter(|c| !c.name.is_empty())
            .map(|c| c.name.clone())
            .collect()
    }

    /// `tenant/namespace`.
    pub fn namespace(&self) -> String {
        format!("{}/{}", self.namespace.tenant, self.namespace.name)
    }

    /// The topic of `gateway` for `role`:
    /// `persistent://<tenant>/<namespace>/<gateway>-<role>`.
    pub fn topic(&self, gateway: &str, role: TopicRole) -> String {
        format!(
            "persistent://{}/{gateway}-{}",
            self.namespace(),
            role.suffix()
        )
    }

    /// The view's retry topic (updates waiting for another attempt).
    pub fn retry_topic(&self) -> String {
        format!("persistent://{}/fleet-view-retry", self.namespace())
    }

    /// The view's dead-letter topic (updates that failed every attempt).
    pub fn dead_letter_topic(&self) -> String {
        format!("persistent://{}/fleet-view-dlq", self.namespace())
    }
}

/// Reads and checks a file; every problem at once.
pub fn load(path: &Path) -> Result<FleetConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: path.to_path_buf(),
        errors: vec![ConfigError {
            path: String::new(),
            message: format!("cannot read: {e}"),
        }],
    })?;
    parse(&text).map_err(|errors| ConfigErrors {
        file: path.to_path_buf(),
        errors,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPulsar {
    service_url: Option<String>,
    admin_url: Option<String>,
    ca_file: Option<String>,
    token_file: Option<String>,
    clusters: Option<Vec<RawCluster>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<String>,
    service_url: Option<String>,
    admin_url: Option<String>,
    ca_file: Option<String>,
    token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    tenant: Option<String>,
    name: Option<String>,
    clusters: Option<Vec<String>>,
    compaction_threshold_mb: Option<i64>,
    retention_minutes: Option<i64>,
    retention_size_mb: Option<i64>,
    backlog_quota_mb: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigning {
    algorithm: Option<String>,
    key_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    database: Option<String>,
    subscription: Option<String>,
    max_attempts: Option<i64>,
    retry_delay_secs: Option<i64>,
    listen: Option<String>,
}

const MB: u64 = 1024 * 1024;

/// Parses and checks TOML text; every problem at once.
pub fn parse(text: &str) -> Result<FleetConfig, Vec<ConfigError>> {
    let mut table = toml_table(text)?;
    let mut errors = Vec::new();
    let pulsar: Option<RawPulsar> = take_section(&mut table, "pulsar", &mut errors);
    let namespace: Option<RawNamespace> = take_section(&mut table, "namespace", &mut errors);
    let signing: Option<RawSigning> = take_section(&mut table, "signing", &mut errors);
    let gateways: Option<Vec<RawGateway>> = take_section(&mut table, "gateways", &mut errors);
    let view: Option<RawView> = take_section(&mut table, "view", &mut errors);
    unknown_keys(&table, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut v = Validator::default();
    let clusters = check_clusters(&mut v, pulsar.unwrap_or_default());
    let mut namespace = namespace.unwrap_or_default();
    let named: Vec<String> = clusters
        .iter()
        .filter(|c| !c.name.is_empty())
        .map(|c| c.name.clone())
        .collect();
    if namespace.clusters.is_none() && !named.is_empty() {
        namespace.clusters = Some(named.clone());
    }
    let namespace = check_namespace(&mut v, namespace);
    for (i, name) in named.iter().enumerate() {
        v.check(
            &format!("pulsar.clusters[{i}].name"),
            namespace.clusters.contains(name),
            "must be one of namespace.clusters (the tenant must allow every cluster it is declared in)",
        );
    }
    let signing = signing.map(|s| check_signing(&mut v, s));
    let gateways = check_gateways(&mut v, gateways.unwrap_or_default());
    let view = check_view(&mut v, view.unwrap_or_default());
    let errors = v.into_errors();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(FleetConfig {
        pulsar: clusters[0].pulsar.clone(),
        clusters,
        namespace,
        signing,
        gateways,
        view,
    })
}

/// The plain `[pulsar]` form (one cluster, no name), or its
/// `[[pulsar.clusters]]` (each named, with its own URLs, CA and token; the
/// plain keys are refused beside them). Never empty.
fn check_clusters(v: &mut Validator, raw: RawPulsar) -> Vec<Cluster> {
    let Some(list) = raw.clusters else {
        let pulsar = check_pulsar(
            v,
            "pulsar",
            RawCluster {
                name: None,
                service_url: raw.service_url,
                admin_url: raw.admin_url,
                ca_file: raw.ca_file,
                token_file: raw.token_file,
            },
        );
        return vec![Cluster {
            name: String::new(),
            pulsar,
        }];
    };
    for (key, set) in [
        ("pulsar.service_url", raw.service_url.is_some()),
        ("pulsar.admin_url", raw.admin_url.is_some()),
        ("pulsar.ca_file", raw.ca_file.is_some()),
        ("pulsar.token_file", raw.token_file.is_some()),
    ] {
        v.check(
            key,
            !set,
            "not beside [[pulsar.clusters]]: give it in each cluster",
        );
    }
    v.check(
        "pulsar.clusters",
        !list.is_empty(),
        "must name at least one cluster",
    );
    let mut seen = BTreeSet::new();
    let mut out: Vec<Cluster> = list
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let at = format!("pulsar.clusters[{i}]");
            let name = v
                .required(&format!("{at}.name"), c.name.take())
                .unwrap_or_default();
            if !name.is_empty() {
                v.check(&format!("{at}.name"), pulsar_name(&name), PULSAR_NAME_RULE);
                v.check(
                    &format!("{at}.name"),
                    seen.insert(name.clone()),
                    "names another cluster too",
                );
            }
            Cluster {
                name,
                pulsar: check_pulsar(v, &at, c),
            }
        })
        .collect();
    if out.is_empty() {
        // Reported above; one placeholder keeps `pulsar` defined.
        out.push(Cluster {
            name: String::new(),
            pulsar: PulsarConfig {
                service_url: String::new(),
                admin_url: String::new(),
                ca_file: None,
                token_file: None,
            },
        });
    }
    out
}

/// One cluster's URLs, CA and token, under key path `at`.
fn check_pulsar(v: &mut Validator, at: &str, raw: RawCluster) -> PulsarConfig {
    let key = |k: &str| format!("{at}.{k}");
    let service_url = v
        .required(&key("service_url"), raw.service_url)
        .unwrap_or_default();
    if !service_url.is_empty() {
        if let Err(e) = ferry::config::parse_service_url(&service_url) {
            v.error(&key("service_url"), &e);
        }
    }
    let admin_url = v
        .required(&key("admin_url"), raw.admin_url)
        .unwrap_or_default();
    if !admin_url.is_empty() {
        v.check(
            &key("admin_url"),
            admin_url.starts_with("http://") || admin_url.starts_with("https://"),
            "must start with http:// or https://",
        );
    }
    let file = |v: &mut Validator, key: &str, f: Option<String>| {
        f.map(|f| {
            v.check(key, !f.is_empty(), "must not be empty");
            PathBuf::from(f)
        })
    };
    PulsarConfig {
        service_url,
        admin_url: admin_url.trim_end_matches('/').to_string(),
        ca_file: file(v, &key("ca_file"), raw.ca_file),
        token_file: file(v, &key("token_file"), raw.token_file),
    }
}

/// What [`pulsar_name`] accepts, for its error.
const PULSAR_NAME_RULE: &str = "must be letters, digits and _ - . = : only";

/// A tenant, namespace or cluster name as Pulsar accepts it.
fn pulsar_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | ':'))
}

fn check_namespace(v: &mut Validator, raw: RawNamespace) -> NamespaceConfig {
    let name = |v: &mut Validator, key: &str, s: Option<String>| {
        let s = v.required(key, s).unwrap_or_default();
        if !s.is_empty() {
            v.check(key, pulsar_name(&s), PULSAR_NAME_RULE);
        }
        s
    };
    let tenant = name(v, "namespace.tenant", raw.tenant);
    let ns = name(v, "namespace.name", raw.name);
    let clusters = raw.clusters.unwrap_or_else(|| vec!["standalone".into()]);
    v.check(
        "namespace.clusters",
        !clusters.is_empty(),
        "must name at least one cluster",
    );
    for (i, c) in clusters.iter().enumerate() {
        v.check(
            &format!("namespace.clusters[{i}]"),
            pulsar_name(c),
            PULSAR_NAME_RULE,
        );
    }
    let compaction = v.int_in(
        "namespace.compaction_threshold_mb",
        raw.compaction_threshold_mb,
        64,
        1,
        1 << 20,
    );
    let retention_minutes = v.int_in(
        "namespace.retention_minutes",
        raw.retention_minutes,
        7 * 24 * 60,
        -1,
        i64::from(i32::MAX),
    );
    let retention_size_mb = v.int_in(
        "namespace.retention_size_mb",
        raw.retention_size_mb,
        10 * 1024,
        -1,
        1 << 30,
    );
    let backlog = v.int_in(
        "namespace.backlog_quota_mb",
        raw.backlog_quota_mb,
        5 * 1024,
        1,
        1 << 30,
    );
    // Pulsar refuses a backlog quota at or over a bounded retention size.
    v.check(
        "namespace.backlog_quota_mb",
        retention_minutes <= 0 || retention_size_mb <= 0 || backlog < retention_size_mb,
        "must be below namespace.retention_size_mb (Pulsar refuses a backlog quota at or over the retention size)",
    );
    NamespaceConfig {
        tenant,
        name: ns,
        clusters,
        compaction_threshold_bytes: compaction as u64 * MB,
        retention_minutes,
        retention_size_mb,
        backlog_quota_bytes: backlog as u64 * MB,
    }
}

fn check_signing(v: &mut Validator, raw: RawSigning) -> SigningConfig {
    let algorithm = match raw.algorithm.as_deref().unwrap_or("HS256") {
        "HS256" => Algorithm::Hs256,
        "RS256" => Algorithm::Rs256,
        _ => {
            v.error("signing.algorithm", "must be HS256 or RS256");
            Algorithm::Hs256
        }
    };
    let key_file = v
        .required("signing.key_file", raw.key_file)
        .unwrap_or_default();
    SigningConfig {
        algorithm,
        key_file: PathBuf::from(key_file),
    }
}

fn check_gateways(v: &mut Validator, raw: Vec<RawGateway>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut ids = Vec::new();
    for (i, g) in raw.into_iter().enumerate() {
        let key = format!("gateways[{i}].id");
        let Some(id) = v.required(&key, g.id) else {
            continue;
        };
        if !valid_name(&id) {
            v.error(&key, NAME_RULE);
        } else if !seen.insert(id.clone()) {
            v.error(&key, &format!("gateway {id} is listed twice"));
        }
        ids.push(id);
    }
    ids
}

fn check_view(v: &mut Validator, raw: RawView) -> ViewConfig {
    let database = raw
        .database
        .unwrap_or_else(|| "sqlite:/var/lib/ferry-fleet/view.db".into());
    v.check(
        "view.database",
        database
            .strip_prefix("sqlite:")
            .is_some_and(|p| !p.is_empty())
            || database.starts_with("postgres://")
            || database.starts_with("postgresql://"),
        "must be sqlite:<path> or postgres://...",
    );
    let subscription = raw
        .subscription
        .unwrap_or_else(|| "ferry-fleet-view".into());
    v.check("view.subscription", valid_name(&subscription), NAME_RULE);
    let max_attempts = v.int_in("view.max_attempts", raw.max_attempts, 5, 1, 1000) as u32;
    let retry_delay = v.int_in("view.retry_delay_secs", raw.retry_delay_secs, 10, 0, 86_400);
    let listen = raw.listen.unwrap_or_else(|| "127.0.0.1:9465".into());
    v.check(
        "view.listen",
        listen.parse::<std::net::SocketAddr>().is_ok(),
        "must be an address and port, such as 127.0.0.1:9465",
    );
    ViewConfig {
        database,
        subscription,
        max_attempts,
        retry_delay: Duration::from_secs(retry_delay as u64),
        listen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[pulsar]
service_url = "pulsar+ssl://pulsar.example.com:6651"
admin_url = "https://pulsar.example.com:8443/"
ca_file = "/etc/ferry-fleet/ca.pem"
token_file = "/etc/ferry-fleet/fleet.token"

[namespace]
tenant = "iot"
name = "fleet"

[signing]
key_file = "/etc/ferry-fleet/secret.key"

[[gateways]]
id = "gw-0001"

[[gateways]]
id = "gw-0002"
"#;

    #[test]
    fn a_good_file_gives_the_topics_of_each_gateway_and_the_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.gateways, ["gw-0001", "gw-0002"]);
        assert_eq!(c.namespace(), "iot/fleet");
        assert_eq!(
            c.topic("gw-0002", TopicRole::DesiredAcks),
            "persistent://iot/fleet/gw-0002-desired-acks"
        );
        assert_eq!(c.pulsar.admin_url, "https://pulsar.example.com:8443");
        assert_eq!(c.namespace.clusters, ["standalone"]);
        assert_eq!(c.namespace.compaction_threshold_bytes, 64 * MB);
        assert_eq!(c.signing.unwrap().algorithm, Algorithm::Hs256);
        assert_eq!(c.view.max_attempts, 5);
        assert_eq!(c.view.retry_delay, Duration::from_secs(10));
        assert_eq!(c.view.database, "sqlite:/var/lib/ferry-fleet/view.db");
    }

    const TWO_REGIONS: &str = r#"
[[pulsar.clusters]]
name = "east"
service_url = "pulsar://127.0.0.1:6660"
admin_url = "http://127.0.0.1:8090"

[[pulsar.clusters]]
name = "west"
service_url = "pulsar://127.0.0.1:6670"
admin_url = "http://127.0.0.1:8100/"
token_file = "/etc/ferry-fleet/west.token"

[namespace]
tenant = "iot"
name = "fleet"

[[gateways]]
id = "gw-0001"
"#;

    #[test]
    fn clusters_each_have_their_urls_and_token_and_the_tenant_allows_them_all() {
        let c = parse(TWO_REGIONS).unwrap();
        assert_eq!(c.cluster_names(), ["east", "west"]);
        assert_eq!(c.pulsar.admin_url, "http://127.0.0.1:8090", "the first one");
        assert_eq!(c.namespace.clusters, ["east", "west"]);
        let west = c.on_cluster("west").unwrap();
        assert_eq!(west.pulsar.service_url, "pulsar://127.0.0.1:6670");
        assert_eq!(west.pulsar.admin_url, "http://127.0.0.1:8100");
        assert_eq!(
            west.pulsar.token_file.as_deref(),
            Some(Path::new("/etc/ferry-fleet/west.token"))
        );
        assert_eq!(west.clusters, c.clusters);
        assert!(c.on_cluster("north").is_none());
        // The plain form: one cluster without a name.
        let one = parse(GOOD).unwrap();
        assert_eq!(one.clusters.len(), 1);
        assert!(one.cluster_names().is_empty());
        assert_eq!(one.on_cluster("").unwrap(), one);
    }

    #[test]
    fn cluster_problems_are_listed_with_their_key_paths() {
        let text = r#"
[pulsar]
service_url = "pulsar://127.0.0.1:6650"

[[pulsar.clusters]]
name = "east"
service_url = "pulsar://127.0.0.1:6660"

[[pulsar.clusters]]
name = "east"
service_url = "http://x"
admin_url = "http://127.0.0.1:8100"

[namespace]
tenant = "iot"
name = "fleet"
clusters = ["west"]
"#;
        let errs = parse(text).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "pulsar.service_url",
                "pulsar.clusters[0].admin_url",
                "pulsar.clusters[1].name",
                "pulsar.clusters[1].service_url",
                "pulsar.clusters[0].name",
                "pulsar.clusters[1].name",
            ],
            "{errs:#?}"
        );
        assert!(errs[0].message.contains("not beside [[pulsar.clusters]]"));
        assert!(errs[2].message.contains("another cluster"));
        assert!(errs[4].message.contains("namespace.clusters"));
    }

    #[test]
    fn every_problem_is_listed_with_its_key_path() {
        let text = r#"
[pulsar]
service_url = "http://x"
admin_url = "ftp://x"

[namespace]
tenant = "a/b"
clusters = []
retention_minutes = -5

[signing]
algorithm = "ES256"

[[gateways]]
id = "gw 1"

[[gateways]]
id = "gw-2"

[[gateways]]
id = "gw-2"

[view]
database = "mysql://x"
max_attempts = 0
listen = "nowhere"
"#;
        let errs = parse(text).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "pulsar.service_url",
                "pulsar.admin_url",
                "namespace.tenant",
                "namespace.name",
                "namespace.clusters",
                "namespace.retention_minutes",
                "signing.algorithm",
                "signing.key_file",
                "gateways[0].id",
                "gateways[2].id",
                "view.database",
                "view.max_attempts",
                "view.listen",
            ],
            "{errs:#?}"
        );
        assert!(errs[9].message.contains("listed twice"));
    }

    #[test]
    fn the_backlog_quota_stays_below_a_bounded_retention() {
        let parse_ns = |ns: &str| {
            parse(&GOOD.replace("name = \"fleet\"\n", &format!("name = \"fleet\"\n{ns}")))
        };
        let errs = parse_ns("retention_size_mb = 100\nbacklog_quota_mb = 100\n").unwrap_err();
        assert_eq!(errs[0].path, "namespace.backlog_quota_mb");
        assert!(parse_ns("retention_size_mb = 100\nbacklog_quota_mb = 99\n").is_ok());
        assert!(parse_ns("retention_size_mb = -1\nbacklog_quota_mb = 100\n").is_ok());
        // The defaults: 10 GiB of retention, 5 GiB of backlog.
        assert_eq!(
            parse_ns("").unwrap().namespace.backlog_quota_bytes,
            5 * 1024 * MB
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_problems_without_the_value() {
        let text = "bogus = 1\n[namespace]\ntenant = 5\n[pulsar]\ntoken = \"s3cret\"\n";
        let errs = parse(text).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["pulsar", "namespace", "bogus"], "{errs:#?}");
        assert!(errs.iter().all(|e| !e.message.contains("s3cret")));
    }
}
