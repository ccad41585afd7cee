//! `ferry-fleet provision`: declares in Pulsar what fleet.toml says, and no
//! more than it needs to change.
//!
//! Three steps, the middle one pure:
//!
//! 1. [`read_current`] asks the admin REST API for the tenant, the
//!    namespace's policies (its topic-level grants included) and its topics:
//!    a [`Current`].
//! 2. [`diff`] compares that with what the file declares ([`Desired`]) and
//!    returns the [`Change`]s, in the order they must be applied; each
//!    change knows its one REST call ([`Change::call`]) and its one line of
//!    output. Nothing here touches the network, so the unit tests below
//!    cover every case.
//! 3. [`provision`] prints the changes (`--dry-run`: and stops), or applies
//!    them one by one, printing each once the broker accepted it, then
//!    `N changes`. A refused call stops the run with an error naming the
//!    call, the change, and how many were applied before it; running again
//!    after a fix applies only what is still missing.
//!
//! What is declared:
//!
//! - the tenant, with the allowed clusters of `namespace.clusters`. Admin
//!   roles are the super-user's business: a new tenant gets none, and those
//!   an operator added are kept;
//! - the namespace, with deduplication on, the retention, the compaction
//!   threshold, the backlog quota (`producer_request_hold`), and inactive
//!   topics kept (a broker's default deletes a topic nobody is connected
//!   to, and with it the compacted state and the grants);
//! - for every gateway, its five topics (created: Pulsar grants only on a
//!   topic that exists) and topic-level grants to its role (the gateway id,
//!   its token's `sub`): `produce` on status, history, events and
//!   desired-acks, `consume` on desired.
//!
//! What is taken away: a gateway's role loses a grant on any topic that is
//! not its own and any namespace-wide grant; a gateway no longer in
//! fleet.toml loses its grants on its topics (a grant to role `X` on topic
//! `X-<role>`), while the topics and their data stay. Grants to other roles
//! (a backend reading the status topics, say) are left alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write;

use serde_json::{json, Value};

use crate::admin::{Admin, AdminError};
use crate::config::{FleetConfig, TopicRole};

/// What the backlog quota does when a subscription's backlog reaches it.
pub const BACKLOG_POLICY: &str = "producer_request_hold";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// -1: forever.
    pub minutes: i64,
    /// -1: unbounded.
    pub size_mb: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacklogQuota {
    pub limit_bytes: u64,
    pub policy: String,
}

/// The tenant as the broker holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantState {
    pub allowed_clusters: BTreeSet<String>,
    /// Kept as they are when the clusters change.
    pub admin_roles: Vec<String>,
}

/// The namespace as the broker holds it. `None`: not set on the namespace
/// (the broker's default applies).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceState {
    pub deduplication: Option<bool>,
    pub retention: Option<Retention>,
    pub compaction_threshold: Option<u64>,
    pub backlog_quota: Option<BacklogQuota>,
    /// Whether topics without producers and subscriptions are deleted.
    pub delete_inactive_topics: Option<bool>,
    /// Full names (`persistent://tenant/ns/topic`).
    pub topics: BTreeSet<String>,
    /// Topic-level grants: topic -> role -> actions.
    pub topic_grants: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
    /// Namespace-wide grants: role -> actions.
    pub namespace_grants: BTreeMap<String, BTreeSet<String>>,
}

/// What the broker holds now; `None` where the thing does not exist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Current {
    pub tenant: Option<TenantState>,
    pub namespace: Option<NamespaceState>,
}

/// What fleet.toml declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub tenant: String,
    /// `tenant/name`.
    pub namespace: String,
    pub clusters: BTreeSet<String>,
    pub retention: Retention,
    pub compaction_threshold: u64,
    pub backlog_quota: BacklogQuota,
    /// Gateway ids, in the file's order.
    pub gateways: Vec<String>,
    /// Every gateway's topics with the one action its role gets there, in
    /// the file's order of gateways and [`TopicRole::ALL`]'s order of
    /// topics: (topic, role, action).
    pub grants: Vec<(String, String, &'static str)>,
}

impl Desired {
    pub fn from_config(config: &FleetConfig) -> Desired {
        let ns = &config.namespace;
        let mut grants = Vec::new();
        for gateway in &config.gateways {
            for role in TopicRole::ALL {
                let action = if role.gateway_produces() {
                    "produce"
                } else {
                    "consume"
                };
                grants.push((config.topic(gateway, role), gateway.clone(), action));
            }
        }
        Desired {
            tenant: ns.tenant.clone(),
            namespace: config.namespace(),
            clusters: ns.clusters.iter().cloned().collect(),
            retention: Retention {
                minutes: ns.retention_minutes,
                size_mb: ns.retention_size_mb,
            },
            compaction_threshold: ns.compaction_threshold_bytes,
            backlog_quota: BacklogQuota {
                limit_bytes: ns.backlog_quota_bytes,
                policy: BACKLOG_POLICY.to_string(),
            },
            gateways: config.gateways.clone(),
            grants,
        }
    }
}

/// Why a grant is taken away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// The role is a gateway no longer in fleet.toml.
    GatewayRemoved,
    /// The role is a gateway, the topic is not one of its own.
    NotItsTopic,
}

/// One change to the broker: one REST call, one line of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    CreateTenant {
        tenant: String,
        clusters: Vec<String>,
    },
    SetTenantClusters {
        tenant: String,
        from: Vec<String>,
        to: Vec<String>,
        admin_roles: Vec<String>,
    },
    CreateNamespace {
        namespace: String,
    },
    EnableDeduplication {
        namespace: String,
        from: Option<bool>,
    },
    SetRetention {
        namespace: String,
        from: Option<Retention>,
        to: Retention,
    },
    SetCompactionThreshold {
        namespace: String,
        from: Option<u64>,
        to: u64,
    },
    SetBacklogQuota {
        namespace: String,
        from: Option<BacklogQuota>,
        to: BacklogQuota,
    },
    KeepInactiveTopics {
        namespace: String,
        from: Option<bool>,
    },
    RevokeNamespaceGrant {
        namespace: String,
        role: String,
        actions: BTreeSet<String>,
    },
    Revoke {
        topic: String,
        role: String,
        actions: BTreeSet<String>,
        reason: RevokeReason,
    },
    CreateTopic {
        topic: String,
    },
    Grant {
        topic: String,
        role: String,
        action: &'static str,
        /// What the role had on the topic before, if anything.
        from: Option<BTreeSet<String>>,
    },
}

/// The REST call that applies a change (path under `/admin/v2/`).
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Put(String, Option<Value>),
    Post(String, Value),
    Delete(String),
}

/// `persistent://t/ns/topic` as a REST path: `persistent/t/ns/topic`.
fn topic_path(topic: &str) -> String {
    format!(
        "persistent/{}",
        topic.strip_prefix("persistent://").unwrap_or(topic)
    )
}

impl Change {
    pub fn call(&self) -> Call {
        match self {
            Change::CreateTenant { tenant, clusters } => Call::Put(
                format!("tenants/{tenant}"),
                Some(json!({ "adminRoles": [], "allowedClusters": clusters })),
            ),
            Change::SetTenantClusters {
                tenant,
                to,
                admin_roles,
                ..
            } => Call::Post(
                format!("tenants/{tenant}"),
                json!({ "adminRoles": admin_roles, "allowedClusters": to }),
            ),
            Change::CreateNamespace { namespace } => {
                Call::Put(format!("namespaces/{namespace}"), None)
            }
            Change::EnableDeduplication { namespace, .. } => {
                Call::Post(format!("namespaces/{namespace}/deduplication"), json!(true))
            }
            Change::SetRetention { namespace, to, .. } => Call::Post(
                format!("namespaces/{namespace}/retention"),
                json!({ "retentionTimeInMinutes": to.minutes, "retentionSizeInMB": to.size_mb }),
            ),
            Change::SetCompactionThreshold { namespace, to, .. } => Call::Put(
                format!("namespaces/{namespace}/compactionThreshold"),
                Some(json!(to)),
            ),
            Change::SetBacklogQuota { namespace, to, .. } => Call::Post(
                format!("namespaces/{namespace}/backlogQuota?backlogQuotaType=destination_storage"),
                json!({ "limitSize": to.limit_bytes, "limitTime": -1, "policy": to.policy }),
            ),
            Change::KeepInactiveTopics { namespace, .. } => Call::Post(
                format!("namespaces/{namespace}/inactiveTopicPolicies"),
                json!({
                    "inactiveTopicDeleteMode": "delete_when_no_subscriptions",
                    "maxInactiveDurationSeconds": 60,
                    "deleteWhileInactive": false,
                }),
            ),
            Change::RevokeNamespaceGrant {
                namespace, role, ..
            } => Call::Delete(format!("namespaces/{namespace}/permissions/{role}")),
            Change::Revoke { topic, role, .. } => {
                Call::Delete(format!("{}/permissions/{role}", topic_path(topic)))
            }
            Change::CreateTopic { topic } => Call::Put(topic_path(topic), None),
            Change::Grant {
                topic,
                role,
                action,
                ..
            } => Call::Post(
                format!("{}/permissions/{role}", topic_path(topic)),
                json!([action]),
            ),
        }
    }
}

/// Text from the broker, printable on one line.
fn clean(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn list<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| clean(s)).collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn unset_or<T>(v: &Option<T>, f: impl Fn(&T) -> String) -> String {
    v.as_ref().map(f).unwrap_or_else(|| "unset".into())
}

impl fmt::Display for Retention {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = match self.minutes {
            -1 => "forever".to_string(),
            m => format!("{m} min"),
        };
        let size = match self.size_mb {
            -1 => "unbounded".to_string(),
            s => format!("{s} MB"),
        };
        write!(f, "{time}, {size}")
    }
}

impl fmt::Display for BacklogQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, {}", self.limit_bytes, clean(&self.policy))
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::CreateTenant { tenant, clusters } => {
                write!(
                    f,
                    "create tenant {tenant} (allowed clusters: {})",
                    list(clusters)
                )
            }
            Change::SetTenantClusters {
                tenant, from, to, ..
            } => write!(
                f,
                "set tenant {tenant} allowed clusters: {} -> {}",
                list(from),
                list(to)
            ),
            Change::CreateNamespace { namespace } => write!(f, "create namespace {namespace}"),
            Change::EnableDeduplication { namespace, from } => write!(
                f,
                "set {namespace} deduplication: {} -> on",
                unset_or(from, |b| if *b { "on" } else { "off" }.into())
            ),
            Change::SetRetention {
                namespace,
                from,
                to,
            } => write!(
                f,
                "set {namespace} retention: {} -> {to}",
                unset_or(from, Retention::to_string)
            ),
            Change::SetCompactionThreshold {
                namespace,
                from,
                to,
            } => write!(
                f,
                "set {namespace} compaction threshold: {} -> {to} bytes",
                unset_or(from, |b| format!("{b} bytes"))
            ),
            Change::SetBacklogQuota {
                namespace,
                from,
                to,
            } => write!(
                f,
                "set {namespace} backlog quota: {} -> {to}",
                unset_or(from, BacklogQuota::to_string)
            ),
            Change::KeepInactiveTopics { namespace, from } => write!(
                f,
                "set {namespace} inactive topics: {} -> kept",
                match from {
                    None => "broker default",
                    Some(true) => "deleted",
                    Some(false) => "kept",
                }
            ),
            Change::RevokeNamespaceGrant {
                namespace,
                role,
                actions,
            } => write!(
                f,
                "revoke {} on namespace {namespace} from {}: a gateway may use only its own topics",
                list(actions),
                clean(role)
            ),
            Change::Revoke {
                topic,
                role,
                actions,
                reason,
            } => {
                write!(
                    f,
                    "revoke {} on {} from {}: ",
                    list(actions),
                    clean(topic),
                    clean(role)
                )?;
                match reason {
                    RevokeReason::GatewayRemoved => {
                        write!(f, "gateway not in fleet.toml (its topics are kept)")
                    }
                    RevokeReason::NotItsTopic => {
                        write!(f, "not a topic of gateway {}", clean(role))
                    }
                }
            }
            Change::CreateTopic { topic } => write!(f, "create topic {topic}"),
            Change::Grant {
                topic,
                role,
                action,
                from,
            } => {
                write!(f, "grant {action} on {topic} to {role}")?;
                match from {
                    Some(had) => write!(f, " (had: {})", list(had)),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Whether `topic` is one of `role`'s own topics by name
/// (`persistent://<namespace>/<role>-<suffix>`), whatever the file says.
fn is_gateway_topic_of(namespace: &str, topic: &str, role: &str) -> bool {
    let prefix = format!("persistent://{namespace}/{role}-");
    topic
        .strip_prefix(&prefix)
        .is_some_and(|suffix| TopicRole::ALL.iter().any(|r| r.suffix() == suffix))
}

/// The changes that bring `current` to `desired`, in the order to apply
/// them. Empty when the broker already holds what the file declares.
pub fn diff(desired: &Desired, current: &Current) -> Vec<Change> {
    let mut changes = Vec::new();
    let ns = &desired.namespace;

    // The tenant.
    match &current.tenant {
        None => changes.push(Change::CreateTenant {
            tenant: desired.tenant.clone(),
            clusters: desired.clusters.iter().cloned().collect(),
        }),
        Some(t) if t.allowed_clusters != desired.clusters => {
            changes.push(Change::SetTenantClusters {
                tenant: desired.tenant.clone(),
                from: t.allowed_clusters.iter().cloned().collect(),
                to: desired.clusters.iter().cloned().collect(),
                admin_roles: t.admin_roles.clone(),
            })
        }
        Some(_) => {}
    }

    // The namespace and its policies.
    let empty = NamespaceState::default();
    let state = match &current.namespace {
        Some(state) => state,
        None => {
            changes.push(Change::CreateNamespace {
                namespace: ns.clone(),
            });
            &empty
        }
    };
    if state.deduplication != Some(true) {
        changes.push(Change::EnableDeduplication {
            namespace: ns.clone(),
            from: state.deduplication,
        });
    }
    let retention = (state.retention != Some(desired.retention)).then(|| Change::SetRetention {
        namespace: ns.clone(),
        from: state.retention,
        to: desired.retention,
    });
    let quota = (state.backlog_quota.as_ref() != Some(&desired.backlog_quota)).then(|| {
        Change::SetBacklogQuota {
            namespace: ns.clone(),
            from: state.backlog_quota.clone(),
            to: desired.backlog_quota.clone(),
        }
    });
    // Pulsar checks each call against the other policy: the quota must stay
    // below a bounded retention size. Shrinking retention goes after the
    // quota has shrunk; growing it goes first.
    let retention_shrinks = match (state.retention, desired.retention.size_mb) {
        (Some(old), new) => new >= 0 && (old.size_mb < 0 || new < old.size_mb),
        (None, _) => false,
    };
    if retention_shrinks {
        changes.extend(quota);
        changes.extend(retention);
    } else {
        changes.extend(retention);
        changes.extend(quota);
    }
    if state.compaction_threshold != Some(desired.compaction_threshold) {
        changes.push(Change::SetCompactionThreshold {
            namespace: ns.clone(),
            from: state.compaction_threshold,
            to: desired.compaction_threshold,
        });
    }
    if state.delete_inactive_topics != Some(false) {
        changes.push(Change::KeepInactiveTopics {
            namespace: ns.clone(),
            from: state.delete_inactive_topics,
        });
    }

    // Grants taken away first, so a role never holds more than the file
    // gives it, not even in the middle of a run.
    let gateways: BTreeSet<&str> = desired.gateways.iter().map(String::as_str).collect();
    for (role, actions) in &state.namespace_grants {
        if gateways.contains(role.as_str()) {
            changes.push(Change::RevokeNamespaceGrant {
                namespace: ns.clone(),
                role: role.clone(),
                actions: actions.clone(),
            });
        }
    }
    let wanted: BTreeSet<(&str, &str)> = desired
        .grants
        .iter()
        .map(|(topic, role, _)| (topic.as_str(), role.as_str()))
        .collect();
    for (topic, roles) in &state.topic_grants {
        for (role, actions) in roles {
            if wanted.contains(&(topic.as_str(), role.as_str())) {
                continue;
            }
            let reason = if gateways.contains(role.as_str()) {
                RevokeReason::NotItsTopic
            } else if is_gateway_topic_of(ns, topic, role) {
                RevokeReason::GatewayRemoved
            } else {
                continue; // Not a gateway's grant: not ours to manage.
            };
            changes.push(Change::Revoke {
                topic: topic.clone(),
                role: role.clone(),
                actions: actions.clone(),
                reason,
            });
        }
    }

    // Every gateway's topics and grants.
    for (topic, role, action) in &desired.grants {
        if !state.topics.contains(topic) {
            changes.push(Change::CreateTopic {
                topic: topic.clone(),
            });
        }
        let had = state.topic_grants.get(topic).and_then(|r| r.get(role));
        let exact = had.is_some_and(|a| a.len() == 1 && a.contains(*action));
        if !exact {
            changes.push(Change::Grant {
                topic: topic.clone(),
                role: role.clone(),
                action,
                from: had.cloned(),
            });
        }
    }
    changes
}

// -- talking to the broker ---------------------------------------------------

/// A provisioning run that did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("{change}: {source}\n{applied} of {total} changes were applied before it, in the order listed; the rest were not tried (run provision again once fixed)")]
    Apply {
        change: String,
        applied: usize,
        total: usize,
        source: AdminError,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    /// A named cluster failed (the ones before it in the file were
    /// provisioned; the ones after it were not tried).
    #[error("cluster {cluster}: {source}")]
    OnCluster {
        cluster: String,
        source: Box<ProvisionError>,
    },
}

fn bad_answer(call: &str, detail: impl Into<String>) -> AdminError {
    AdminError::BadAnswer {
        call: call.to_string(),
        detail: detail.into(),
    }
}

fn strings(v: &Value, call: &str, what: &str) -> Result<BTreeSet<String>, AdminError> {
    match v {
        Value::Null => Ok(BTreeSet::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad_answer(call, format!("{what} holds a non-string")))
            })
            .collect(),
        _ => Err(bad_answer(call, format!("{what} is not a list"))),
    }
}

/// A tenant's JSON (`GET /admin/v2/tenants/{t}`).
pub fn parse_tenant(v: &Value, call: &str) -> Result<TenantState, AdminError> {
    Ok(TenantState {
        allowed_clusters: strings(&v["allowedClusters"], call, "allowedClusters")?,
        admin_roles: strings(&v["adminRoles"], call, "adminRoles")?
            .into_iter()
            .collect(),
    })
}

/// A namespace's policies (`GET /admin/v2/namespaces/{t}/{ns}`); the topics
/// come from another call.
pub fn parse_policies(v: &Value, call: &str) -> Result<NamespaceState, AdminError> {
    let int = |v: &Value, what: &str| -> Result<i64, AdminError> {
        v.as_i64()
            .ok_or_else(|| bad_answer(call, format!("{what} is not a number")))
    };
    let retention = match &v["retention_policies"] {
        Value::Null => None,
        r => Some(Retention {
            minutes: int(&r["retentionTimeInMinutes"], "retentionTimeInMinutes")?,
            size_mb: int(&r["retentionSizeInMB"], "retentionSizeInMB")?,
        }),
    };
    let backlog_quota = match &v["backlog_quota_map"]["destination_storage"] {
        Value::Null => None,
        q => {
            // Older brokers only fill `limit`.
            let limit = match &q["limitSize"] {
                Value::Null => &q["limit"],
                l => l,
            };
            Some(BacklogQuota {
                limit_bytes: limit
                    .as_u64()
                    .ok_or_else(|| bad_answer(call, "backlog quota limitSize is not a size"))?,
                policy: q["policy"].as_str().unwrap_or_default().to_string(),
            })
        }
    };
    let auth = &v["auth_policies"];
    let grants =
        |v: &Value, what: &str| -> Result<BTreeMap<String, BTreeSet<String>>, AdminError> {
            match v {
                Value::Null => Ok(BTreeMap::new()),
                Value::Object(m) => m
                    .iter()
                    .map(|(role, actions)| Ok((role.clone(), strings(actions, call, what)?)))
                    .collect(),
                _ => Err(bad_answer(call, format!("{what} is not an object"))),
            }
        };
    let mut topic_grants = BTreeMap::new();
    match &auth["destination_auth"] {
        Value::Null => {}
        Value::Object(m) => {
            for (topic, roles) in m {
                let roles = grants(roles, "destination_auth")?;
                if !roles.is_empty() {
                    topic_grants.insert(topic.clone(), roles);
                }
            }
        }
        _ => return Err(bad_answer(call, "destination_auth is not an object")),
    }
    Ok(NamespaceState {
        deduplication: v["deduplicationEnabled"].as_bool(),
        retention,
        compaction_threshold: v["compaction_threshold"].as_u64(),
        backlog_quota,
        delete_inactive_topics: v["inactive_topic_policies"]["deleteWhileInactive"].as_bool(),
        topics: BTreeSet::new(),
        topic_grants,
        namespace_grants: grants(&auth["namespace_auth"], "namespace_auth")?,
    })
}

/// What the broker holds of the tenant and namespace of `desired`.
pub async fn read_current(admin: &Admin, desired: &Desired) -> Result<Current, AdminError> {
    let path = format!("tenants/{}", desired.tenant);
    let call = format!("GET /admin/v2/{path}");
    let Some(tenant) = admin.get(&path).await? else {
        return Ok(Current::default());
    };
    let tenant = parse_tenant(&tenant, &call)?;
    let path = format!("namespaces/{}", desired.namespace);
    let call = format!("GET /admin/v2/{path}");
    let Some(policies) = admin.get(&path).await? else {
        return Ok(Current {
            tenant: Some(tenant),
            namespace: None,
        });
    };
    let mut namespace = parse_policies(&policies, &call)?;
    let path = format!("persistent/{}", desired.namespace);
    let call = format!("GET /admin/v2/{path}");
    let topics = admin.get(&path).await?.unwrap_or(Value::Null);
    namespace.topics = strings(&topics, &call, "the topic list")?;
    Ok(Current {
        tenant: Some(tenant),
        namespace: Some(namespace),
    })
}

async fn apply(admin: &Admin, change: &Change) -> Result<(), AdminError> {
    match change.call() {
        Call::Put(path, body) => admin.put(&path, body.as_ref()).await,
        Call::Post(path, body) => admin.post(&path, &body).await,
        Call::Delete(path) => admin.delete(&path).await,
    }
}

/// [`provision`] on every cluster of the file in turn, in its order, or
/// only on `only`: each cluster has its own metadata (tenant, namespace,
/// policies, topics, grants), and its namespace is created there, so it
/// replicates nowhere (ferry writes to every cluster itself). With named
/// clusters, each one's changes come under a `cluster <name>:` line. The
/// first cluster that fails stops the run. Returns the changes counted.
pub async fn provision_clusters(
    config: &FleetConfig,
    only: Option<&str>,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<usize, ProvisionError> {
    let mut total = 0;
    for cluster in &config.clusters {
        if only.is_some_and(|o| o != cluster.name) {
            continue;
        }
        let on = config
            .on_cluster(&cluster.name)
            .expect("a cluster of the file");
        if !cluster.name.is_empty() {
            writeln!(out, "cluster {}:", cluster.name)?;
        }
        total += provision(&on, dry_run, out).await.map_err(|e| {
            if cluster.name.is_empty() {
                e
            } else {
                ProvisionError::OnCluster {
                    cluster: cluster.name.clone(),
                    source: Box::new(e),
                }
            }
        })?;
    }
    Ok(total)
}

/// Reads the broker's state (of `config.pulsar`), prints the changes
/// fleet.toml needs and (unless `dry_run`) applies them; returns how many
/// there were.
pub async fn provision(
    config: &FleetConfig,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<usize, ProvisionError> {
    let admin = Admin::new(&config.pulsar)?;
    let desired = Desired::from_config(config);
    let current = read_current(&admin, &desired).await?;
    let changes = diff(&desired, &current);
    let total = changes.len();
    if dry_run {
        for change in &changes {
            writeln!(out, "{change}")?;
        }
        writeln!(out, "{total} changes (dry run: nothing applied)")?;
        return Ok(total);
    }
    for (applied, change) in changes.iter().enumerate() {
        if let Err(source) = apply(&admin, change).await {
            return Err(ProvisionError::Apply {
                change: change.to_string(),
                applied,
                total,
                source,
            });
        }
        tracing::info!(change = %change, "applied");
        writeln!(out, "{change}")?;
        out.flush()?;
    }
    writeln!(out, "{total} changes")?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &str = r#"
[pulsar]
service_url = "pulsar+ssl://pulsar.example.com:6651"
admin_url = "https://pulsar.example.com:8443"

[namespace]
tenant = "iot"
name = "fleet"
retention_minutes = 60
retention_size_mb = 100
backlog_quota_mb = 50
compaction_threshold_mb = 2

[[gateways]]
id = "gw-a"

[[gateways]]
id = "gw-b"
"#;

    fn desired() -> Desired {
        Desired::from_config(&crate::config::parse(FLEET).unwrap())
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// The state a complete run leaves behind.
    fn provisioned(d: &Desired) -> Current {
        let mut ns = NamespaceState {
            deduplication: Some(true),
            retention: Some(d.retention),
            compaction_threshold: Some(d.compaction_threshold),
            backlog_quota: Some(d.backlog_quota.clone()),
            delete_inactive_topics: Some(false),
            ..Default::default()
        };
        for (topic, role, action) in &d.grants {
            ns.topics.insert(topic.clone());
            ns.topic_grants
                .entry(topic.clone())
                .or_default()
                .insert(role.clone(), set(&[action]));
        }
        Current {
            tenant: Some(TenantState {
                allowed_clusters: set(&["standalone"]),
                admin_roles: vec![],
            }),
            namespace: Some(ns),
        }
    }

    fn lines(changes: &[Change]) -> Vec<String> {
        changes.iter().map(Change::to_string).collect()
    }

    #[test]
    fn an_empty_broker_gets_everything_in_order() {
        let changes = diff(&desired(), &Current::default());
        let lines = lines(&changes);
        assert_eq!(changes.len(), 27, "{lines:#?}");
        assert_eq!(
            lines[..7],
            [
                "create tenant iot (allowed clusters: standalone)",
                "create namespace iot/fleet",
                "set iot/fleet deduplication: unset -> on",
                "set iot/fleet retention: unset -> 60 min, 100 MB",
                "set iot/fleet backlog quota: unset -> 52428800 bytes, producer_request_hold",
                "set iot/fleet compaction threshold: unset -> 2097152 bytes",
                "set iot/fleet inactive topics: broker default -> kept",
            ]
        );
        assert_eq!(
            lines[7..17],
            [
                "create topic persistent://iot/fleet/gw-a-status",
                "grant produce on persistent://iot/fleet/gw-a-status to gw-a",
                "create topic persistent://iot/fleet/gw-a-history",
                "grant produce on persistent://iot/fleet/gw-a-history to gw-a",
                "create topic persistent://iot/fleet/gw-a-events",
                "grant produce on persistent://iot/fleet/gw-a-events to gw-a",
                "create topic persistent://iot/fleet/gw-a-desired",
                "grant consume on persistent://iot/fleet/gw-a-desired to gw-a",
                "create topic persistent://iot/fleet/gw-a-desired-acks",
                "grant produce on persistent://iot/fleet/gw-a-desired-acks to gw-a",
            ]
        );
        assert_eq!(
            lines[26],
            "grant produce on persistent://iot/fleet/gw-b-desired-acks to gw-b"
        );
    }

    #[test]
    fn a_provisioned_broker_needs_no_change() {
        let d = desired();
        assert_eq!(diff(&d, &provisioned(&d)), []);
    }

    #[test]
    fn a_new_gateway_gets_only_its_topics_and_grants() {
        let d = desired();
        let before = provisioned(&d);
        let config = crate::config::parse(&format!("{FLEET}\n[[gateways]]\nid = \"gw-c\"\n"));
        let changes = diff(&Desired::from_config(&config.unwrap()), &before);
        assert_eq!(changes.len(), 10);
        assert!(changes.iter().all(|c| match c {
            Change::CreateTopic { topic } => topic.starts_with("persistent://iot/fleet/gw-c-"),
            Change::Grant { role, .. } => role == "gw-c",
            _ => false,
        }));
    }

    #[test]
    fn a_removed_gateway_loses_its_grants_and_keeps_its_topics() {
        let d = desired();
        let before = provisioned(&d);
        let only_a = crate::config::parse(&FLEET.replace("[[gateways]]\nid = \"gw-b\"\n", ""));
        let changes = diff(&Desired::from_config(&only_a.unwrap()), &before);
        assert_eq!(
            lines(&changes),
            [
                "revoke consume on persistent://iot/fleet/gw-b-desired from gw-b: gateway not in fleet.toml (its topics are kept)",
                "revoke produce on persistent://iot/fleet/gw-b-desired-acks from gw-b: gateway not in fleet.toml (its topics are kept)",
                "revoke produce on persistent://iot/fleet/gw-b-events from gw-b: gateway not in fleet.toml (its topics are kept)",
                "revoke produce on persistent://iot/fleet/gw-b-history from gw-b: gateway not in fleet.toml (its topics are kept)",
                "revoke produce on persistent://iot/fleet/gw-b-status from gw-b: gateway not in fleet.toml (its topics are kept)",
            ]
        );
        assert_eq!(
            changes[0].call(),
            Call::Delete("persistent/iot/fleet/gw-b-desired/permissions/gw-b".into())
        );
    }

    #[test]
    fn a_gateway_keeps_only_its_own_and_other_roles_are_left_alone() {
        let d = desired();
        let mut current = provisioned(&d);
        let ns = current.namespace.as_mut().unwrap();
        let b_status = "persistent://iot/fleet/gw-b-status".to_string();
        let grants = ns.topic_grants.get_mut(&b_status).unwrap();
        grants.insert("gw-a".into(), set(&["consume"]));
        grants.insert("backend".into(), set(&["consume"]));
        ns.namespace_grants
            .insert("gw-a".into(), set(&["produce", "consume"]));
        ns.namespace_grants
            .insert("backend".into(), set(&["consume"]));
        // More than its action on its own topic: set back to exactly it.
        ns.topic_grants
            .get_mut("persistent://iot/fleet/gw-a-desired")
            .unwrap()
            .insert("gw-a".into(), set(&["consume", "produce"]));
        assert_eq!(
            lines(&diff(&d, &current)),
            [
                "revoke consume, produce on namespace iot/fleet from gw-a: a gateway may use only its own topics",
                "revoke consume on persistent://iot/fleet/gw-b-status from gw-a: not a topic of gateway gw-a",
                "grant consume on persistent://iot/fleet/gw-a-desired to gw-a (had: consume, produce)",
            ]
        );
    }

    #[test]
    fn policies_that_differ_are_set_and_the_tenant_keeps_its_admins() {
        let d = desired();
        let mut current = provisioned(&d);
        current.tenant = Some(TenantState {
            allowed_clusters: set(&["east"]),
            admin_roles: vec!["ops".into()],
        });
        let ns = current.namespace.as_mut().unwrap();
        ns.deduplication = Some(false);
        ns.compaction_threshold = Some(1);
        ns.delete_inactive_topics = Some(true);
        ns.backlog_quota = Some(BacklogQuota {
            limit_bytes: 52428800,
            policy: "consumer_backlog_eviction".into(),
        });
        let changes = diff(&d, &current);
        assert_eq!(
            lines(&changes),
            [
                "set tenant iot allowed clusters: east -> standalone",
                "set iot/fleet deduplication: off -> on",
                "set iot/fleet backlog quota: 52428800 bytes, consumer_backlog_eviction -> 52428800 bytes, producer_request_hold",
                "set iot/fleet compaction threshold: 1 bytes -> 2097152 bytes",
                "set iot/fleet inactive topics: deleted -> kept",
            ]
        );
        assert_eq!(
            changes[0].call(),
            Call::Post(
                "tenants/iot".into(),
                json!({"adminRoles": ["ops"], "allowedClusters": ["standalone"]})
            )
        );
    }

    #[test]
    fn retention_shrinks_after_the_quota_and_grows_before_it() {
        let d = desired();
        let mut current = provisioned(&d);
        let ns = current.namespace.as_mut().unwrap();
        ns.retention = Some(Retention {
            minutes: 60,
            size_mb: 1000,
        });
        ns.backlog_quota = Some(BacklogQuota {
            limit_bytes: 500 << 20,
            policy: BACKLOG_POLICY.into(),
        });
        let kinds = |changes: Vec<Change>| -> Vec<&'static str> {
            changes
                .iter()
                .map(|c| match c {
                    Change::SetRetention { .. } => "retention",
                    Change::SetBacklogQuota { .. } => "quota",
                    _ => "other",
                })
                .collect()
        };
        assert_eq!(kinds(diff(&d, &current)), ["quota", "retention"]);
        let ns = current.namespace.as_mut().unwrap();
        ns.retention = Some(Retention {
            minutes: 60,
            size_mb: 10,
        });
        ns.backlog_quota = Some(BacklogQuota {
            limit_bytes: 5 << 20,
            policy: BACKLOG_POLICY.into(),
        });
        assert_eq!(kinds(diff(&d, &current)), ["retention", "quota"]);
    }

    #[test]
    fn each_change_is_one_rest_call() {
        let changes = diff(&desired(), &Current::default());
        let calls: Vec<Call> = changes.iter().map(Change::call).collect();
        assert_eq!(
            calls[..8],
            [
                Call::Put(
                    "tenants/iot".into(),
                    Some(json!({"adminRoles": [], "allowedClusters": ["standalone"]}))
                ),
                Call::Put("namespaces/iot/fleet".into(), None),
                Call::Post("namespaces/iot/fleet/deduplication".into(), json!(true)),
                Call::Post(
                    "namespaces/iot/fleet/retention".into(),
                    json!({"retentionTimeInMinutes": 60, "retentionSizeInMB": 100})
                ),
                Call::Post(
                    "namespaces/iot/fleet/backlogQuota?backlogQuotaType=destination_storage".into(),
                    json!({"limitSize": 52428800u64, "limitTime": -1, "policy": "producer_request_hold"})
                ),
                Call::Put(
                    "namespaces/iot/fleet/compactionThreshold".into(),
                    Some(json!(2097152u64))
                ),
                Call::Post(
                    "namespaces/iot/fleet/inactiveTopicPolicies".into(),
                    json!({"inactiveTopicDeleteMode": "delete_when_no_subscriptions", "maxInactiveDurationSeconds": 60, "deleteWhileInactive": false})
                ),
                Call::Put("persistent/iot/fleet/gw-a-status".into(), None),
            ]
        );
        assert_eq!(
            calls[8],
            Call::Post(
                "persistent/iot/fleet/gw-a-status/permissions/gw-a".into(),
                json!(["produce"])
            )
        );
    }

    #[test]
    fn the_brokers_answers_are_read() {
        // As Pulsar 4.0 answers, shortened.
        let policies = json!({
            "auth_policies": {
                "namespace_auth": {"gw-b": ["consume"]},
                "destination_auth": {"persistent://iot/fleet/gw-a-status": {"gw-a": ["produce"]}},
                "subscription_auth_roles": {}
            },
            "backlog_quota_map": {"destination_storage": {"limit": 1073741824u64, "limitSize": 1073741824u64, "limitTime": -1, "policy": "producer_request_hold"}},
            "deduplicationEnabled": true,
            "retention_policies": {"retentionTimeInMinutes": 10080, "retentionSizeInMB": 10240},
            "inactive_topic_policies": {"inactiveTopicDeleteMode": "delete_when_no_subscriptions", "maxInactiveDurationSeconds": 60, "deleteWhileInactive": false},
            "compaction_threshold": 67108864u64
        });
        let ns = parse_policies(&policies, "GET x").unwrap();
        assert_eq!(ns.deduplication, Some(true));
        assert_eq!(
            ns.retention,
            Some(Retention {
                minutes: 10080,
                size_mb: 10240
            })
        );
        assert_eq!(ns.compaction_threshold, Some(67108864));
        assert_eq!(ns.backlog_quota.unwrap().limit_bytes, 1 << 30);
        assert_eq!(ns.delete_inactive_topics, Some(false));
        assert_eq!(ns.namespace_grants["gw-b"], set(&["consume"]));
        assert_eq!(
            ns.topic_grants["persistent://iot/fleet/gw-a-status"]["gw-a"],
            set(&["produce"])
        );
        // A fresh namespace sets none of them.
        let fresh = parse_policies(
            &json!({"auth_policies": {"namespace_auth": {}, "destination_auth": {}}, "backlog_quota_map": {}}),
            "GET x",
        )
        .unwrap();
        assert_eq!(fresh, NamespaceState::default());
        let bad = parse_policies(
            &json!({"retention_policies": {"retentionTimeInMinutes": "x"}}),
            "GET x",
        );
        assert!(bad
            .unwrap_err()
            .to_string()
            .starts_with("GET x: unexpected answer"));
        let tenant = parse_tenant(
            &json!({"adminRoles": [], "allowedClusters": ["standalone"]}),
            "GET t",
        )
        .unwrap();
        assert_eq!(tenant.allowed_clusters, set(&["standalone"]));
    }

    #[test]
    fn text_from_the_broker_is_printed_escaped() {
        let c = Change::Revoke {
            topic: "persistent://iot/fleet/gw-x-status".into(),
            role: "gw-x\x1b[2J".into(),
            actions: set(&["produce"]),
            reason: RevokeReason::GatewayRemoved,
        };
        assert!(!c.to_string().contains('\x1b'));
    }
}
