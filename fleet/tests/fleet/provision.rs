//! `ferry-fleet provision`, `token` and `gateway-config` against the
//! secured broker of the test stack (TLS, token authentication,
//! authorization on, super-user `admin`): what provision declares is what
//! the admin API reads back, a second run changes nothing, a dry run applies
//! nothing, and a gateway set up only from `token` and `gateway-config`
//! delivers exactly once to its own topic and is refused on another's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::fleet_bin;
use crate::harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The agent's binary, built here when only this package is tested (cargo
/// builds it when the workspace is); the harness finds it beside the tests.
fn agent_binary() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if std::env::var_os("FERRY_BIN").is_some() || ferry_bin().is_file() {
            return;
        }
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .current_dir(repo())
            .args(["build", "-p", "ferry", "--bin", "ferry"]);
        assert!(cargo.status().unwrap().success(), "cargo build -p ferry");
        std::env::set_var("FERRY_BIN", fleet_bin().with_file_name("ferry"));
    });
}

/// The secured broker (TLS, tokens, authorization), up.
fn secure() -> &'static Secure {
    Secure::get()
}

/// The plain stack, for its Mosquitto.
fn plain() -> &'static Stack {
    Stack::get()
}

/// A JWT for `role` signed with the secured broker's key, as the stack
/// script signs them.
fn stack_token(secure: &Secure, role: &str, ttl: i64) -> String {
    secure.token(role, Some(ttl))
}

/// A fleet.toml for the secured broker: its own tenant, namespace `fleet`,
/// the given gateways; admin over plain HTTP with the admin token.
struct Fleet {
    dir: PathBuf,
    config: PathBuf,
    tenant: String,
    secure: &'static Secure,
}

impl Fleet {
    fn new(secure: &'static Secure, test: &str, gateways: &[&str]) -> Fleet {
        let dir = test_dir(test);
        let fleet = Fleet {
            config: dir.join("fleet.toml"),
            dir,
            tenant: unique(test),
            secure,
        };
        fleet.write(gateways);
        fleet
    }

    /// Rewrites the file with these gateways.
    fn write(&self, gateways: &[&str]) {
        let pki = &self.secure.pki;
        let mut text = format!(
            r#"[pulsar]
service_url = "{service_url}"
admin_url = "http://127.0.0.1:{web}"
ca_file = "{ca}"
token_file = "{token}"

[namespace]
tenant = "{tenant}"
name = "fleet"
retention_minutes = 120
retention_size_mb = 100
compaction_threshold_mb = 2
backlog_quota_mb = 50

[signing]
algorithm = "HS256"
key_file = "{key}"
"#,
            service_url = self.secure.service_url(),
            web = self.secure.web_port,
            ca = pki.join("ca.pem").display(),
            token = pki.join("admin.token").display(),
            tenant = self.tenant,
            key = pki.join("secret.key").display(),
        );
        for g in gateways {
            text.push_str(&format!("\n[[gateways]]\nid = \"{g}\"\n"));
        }
        std::fs::write(&self.config, text).unwrap();
    }

    fn namespace(&self) -> String {
        format!("{}/fleet", self.tenant)
    }

    fn topic(&self, gateway: &str, suffix: &str) -> String {
        format!("persistent://{}/{gateway}-{suffix}", self.namespace())
    }

    /// Runs `ferry-fleet <args> --config fleet.toml`.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(fleet_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run ferry-fleet")
    }

    /// `provision` (with `extra` arguments): its stdout lines; it must
    /// succeed.
    fn provision(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["provision"];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "provision {extra:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// `GET /admin/v2/<path>` as the super-user: status and JSON body.
async fn admin_get(secure: &Secure, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/admin/v2/{path}",
            secure.web_port
        ))
        .bearer_auth(secure.admin_token())
        .send()
        .await
        .expect("admin api");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The topic-level grants of the namespace: topic -> role -> actions.
async fn grants(secure: &Secure, namespace: &str) -> Value {
    let (status, policies) = admin_get(secure, &format!("namespaces/{namespace}")).await;
    assert_eq!(status, 200, "{policies}");
    policies["auth_policies"]["destination_auth"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provision_declares_the_fleet_once_and_a_dry_run_applies_nothing() {
    let secure = tokio::task::block_in_place(secure);
    let fleet = Fleet::new(secure, "prov", &["gw-a", "gw-b"]);
    let ns = fleet.namespace();

    // An empty broker: tenant, namespace, 5 policies, 2 x 5 topics and grants.
    let first = fleet.provision(&[]);
    assert_eq!(first.last().unwrap(), "27 changes", "{first:#?}");
    assert_eq!(first.len(), 28);
    assert_eq!(
        first[0],
        format!(
            "create tenant {} (allowed clusters: standalone)",
            fleet.tenant
        )
    );
    assert_eq!(first[1], format!("create namespace {ns}"));
    let second = fleet.provision(&[]);
    assert_eq!(second, ["0 changes"]);
    // The same over HTTPS, trusting the stack's CA only.
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    let https = format!(
        "https://localhost:{}",
        env_port("FERRY_SECURE_PULSAR_WEB_TLS_PORT", 8443)
    );
    std::fs::write(
        &fleet.config,
        text.replace(&format!("http://127.0.0.1:{}", secure.web_port), &https),
    )
    .unwrap();
    assert_eq!(fleet.provision(&[]), ["0 changes"]);
    report(
        "prov",
        &format!("first run {} changes, second run 0", first.len() - 1),
    );

    // What the admin API reads back is what fleet.toml says.
    let (_, tenant) = admin_get(secure, &format!("tenants/{}", fleet.tenant)).await;
    assert_eq!(tenant["allowedClusters"], serde_json::json!(["standalone"]));
    let (_, p) = admin_get(secure, &format!("namespaces/{ns}")).await;
    assert_eq!(p["deduplicationEnabled"], true, "{p}");
    assert_eq!(
        p["retention_policies"],
        serde_json::json!({"retentionTimeInMinutes": 120, "retentionSizeInMB": 100})
    );
    assert_eq!(p["compaction_threshold"], 2 * 1024 * 1024);
    let quota = &p["backlog_quota_map"]["destination_storage"];
    assert_eq!(quota["limitSize"], 50 * 1024 * 1024, "{p}");
    assert_eq!(quota["policy"], "producer_request_hold");
    assert_eq!(p["inactive_topic_policies"]["deleteWhileInactive"], false);
    let granted = grants(secure, &ns).await;
    assert_eq!(granted.as_object().unwrap().len(), 10, "{granted}");
    for gw in ["gw-a", "gw-b"] {
        for (suffix, action) in [
            ("status", "produce"),
            ("history", "produce"),
            ("events", "produce"),
            ("desired", "consume"),
            ("desired-acks", "produce"),
        ] {
            assert_eq!(
                granted[fleet.topic(gw, suffix)],
                serde_json::json!({ gw: [action] }),
                "{gw} {suffix}"
            );
        }
    }

    // A third gateway: the dry run lists exactly its changes and applies none.
    fleet.write(&["gw-a", "gw-b", "gw-c"]);
    let dry = fleet.provision(&["--dry-run"]);
    assert_eq!(
        dry.last().unwrap(),
        "10 changes (dry run: nothing applied)",
        "{dry:#?}"
    );
    assert_eq!(dry.len(), 11);
    for (i, suffix) in ["status", "history", "events", "desired", "desired-acks"]
        .iter()
        .enumerate()
    {
        let topic = fleet.topic("gw-c", suffix);
        let action = if *suffix == "desired" {
            "consume"
        } else {
            "produce"
        };
        assert_eq!(dry[2 * i], format!("create topic {topic}"));
        assert_eq!(dry[2 * i + 1], format!("grant {action} on {topic} to gw-c"));
    }
    let granted = grants(secure, &ns).await;
    assert_eq!(granted.as_object().unwrap().len(), 10, "{granted}");
    assert!(!granted.to_string().contains("gw-c"), "{granted}");
    let (status, _) = admin_get(secure, &format!("persistent/{ns}/gw-c-status/permissions")).await;
    assert_eq!(status, 404, "the dry run created no topic");

    // The real run applies them, and then there is nothing left to do.
    let third = fleet.provision(&[]);
    assert_eq!(third[..10], dry[..10]);
    assert_eq!(third[10], "10 changes");
    let (status, perms) =
        admin_get(secure, &format!("persistent/{ns}/gw-c-desired/permissions")).await;
    assert_eq!(status, 200);
    assert_eq!(perms["gw-c"], serde_json::json!(["consume"]));
    assert_eq!(fleet.provision(&[]), ["0 changes"]);

    // A gateway taken out of the file loses its grants, not its topics.
    fleet.write(&["gw-a", "gw-c"]);
    let removed = fleet.provision(&[]);
    assert_eq!(removed.len(), 6, "{removed:#?}");
    assert_eq!(removed[5], "5 changes");
    assert!(removed[..5].iter().all(|l| l.starts_with("revoke ")
        && l.ends_with(" from gw-b: gateway not in fleet.toml (its topics are kept)")));
    let granted = grants(secure, &ns).await;
    assert_eq!(granted.as_object().unwrap().len(), 10, "{granted}");
    assert!(!granted.to_string().contains("gw-b"), "{granted}");
    let (_, topics) = admin_get(secure, &format!("persistent/{ns}")).await;
    assert_eq!(topics.as_array().unwrap().len(), 15, "{topics}");
    assert_eq!(fleet.provision(&[]), ["0 changes"]);
    report(
        "prov",
        "dry run for a third gateway: 10 changes listed, 0 applied; then 10 applied; removing one: 5 revokes",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_call_stops_provision_and_names_it() {
    let secure = tokio::task::block_in_place(secure);
    let fleet = Fleet::new(secure, "prov-refused", &["gw-a"]);
    // A cluster the broker does not know: the tenant is refused (412).
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    std::fs::write(
        &fleet.config,
        text.replace(
            "name = \"fleet\"\n",
            "name = \"fleet\"\nclusters = [\"standalone\", \"nowhere\"]\n",
        ),
    )
    .unwrap();
    let out = fleet.run(&["provision"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "create tenant {} (allowed clusters: nowhere, standalone): PUT /admin/v2/tenants/{}: refused with 412",
            fleet.tenant, fleet.tenant
        )),
        "{err}"
    );
    assert!(err.contains("0 of 17 changes were applied"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());

    // A token the broker does not know, then a role that is no super-user.
    let bogus = fleet.dir.join("bogus.token");
    write_secret(&bogus, "not-a-jwt");
    let gw_token = fleet.dir.join("gw.token");
    write_secret(&gw_token, &stack_token(secure, "gw-a", 600));
    fleet.write(&["gw-a"]);
    let admin_token = secure.pki.join("admin.token").display().to_string();
    let text = std::fs::read_to_string(&fleet.config).unwrap();
    for (token, expected) in [
        (&bogus, "401 authentication required: the broker did not accept the token of pulsar.token_file"),
        (&gw_token, "401 not authorized: the token's role may not do this (provisioning needs a super-user role): Unauthorized"),
    ] {
        std::fs::write(
            &fleet.config,
            text.replace(&admin_token, &token.display().to_string()),
        )
        .unwrap();
        let out = fleet.run(&["provision"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "provision failed: GET /admin/v2/tenants/{}: {expected}",
                fleet.tenant
            )),
            "{err}"
        );
    }

    // No admin API at all.
    let port = free_port();
    std::fs::write(
        &fleet.config,
        text.replace(
            &format!("127.0.0.1:{}", secure.web_port),
            &format!("127.0.0.1:{port}"),
        ),
    )
    .unwrap();
    let out = fleet.run(&["provision", "--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot reach the admin API") && err.contains("Connection refused"),
        "{err}"
    );
}

/// The gateway's config as `gateway-config` printed it, moved to this
/// test's files, ports and MQTT prefix.
fn adjust(text: &str, ferry: &Ferry, stack: &Stack, prefix: &str, secrets: &Path) -> String {
    let mut t = text.to_string();
    for (from, to) in [
        (
            "port = 1883\n".to_string(),
            format!("port = {}\n", stack.mqtt_port),
        ),
        (
            "filter = \"devices/+/state\"".to_string(),
            format!("filter = \"{prefix}/+/state\""),
        ),
        (
            "mqtt_topic = \"devices/{device}/desired\"".to_string(),
            format!("mqtt_topic = \"{prefix}/{{device}}/desired\""),
        ),
        (
            "\"/etc/ferry/pulsar.token\"".to_string(),
            format!("\"{}\"", secrets.join("pulsar.token").display()),
        ),
        (
            "\"/etc/ferry/pulsar-ca.pem\"".to_string(),
            format!("\"{}\"", secrets.join("ca.pem").display()),
        ),
        (
            "\"/var/lib/ferry/ferry.db\"".to_string(),
            format!("\"{}\"", ferry.store_path().display()),
        ),
        (
            "listen = \"127.0.0.1:9464\"".to_string(),
            format!("listen = \"127.0.0.1:{}\"", ferry.metrics_port),
        ),
    ] {
        assert!(
            t.contains(&from),
            "gateway-config printed no `{from}`:\n{text}"
        );
        t = t.replace(&from, &to);
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_set_up_by_the_fleet_delivers_exactly_once_and_is_refused_elsewhere() {
    let stack = tokio::task::block_in_place(plain);
    let secure = tokio::task::block_in_place(secure);
    agent_binary();
    // Gateway ids name MQTT sessions on the shared Mosquitto: unique.
    let (a, b) = (unique("gwa"), unique("gwb"));
    let fleet = Fleet::new(secure, "onboard", &[&a, &b]);
    assert_eq!(fleet.provision(&[]).last().unwrap(), "27 changes");

    // The gateway's token and config, from ferry-fleet only.
    let out = fleet.run(&["token", &a, "--ttl", "1h"]);
    assert_eq!(out.status.code(), Some(0));
    let token = String::from_utf8(out.stdout).unwrap();
    let claims: Value = {
        use base64::Engine as _;
        let part = token.trim().split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap();
        serde_json::from_slice(&json).unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(claims["sub"], a.as_str());
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        (now + 3590..=now + 3600).contains(&exp),
        "exp {exp}, now {now}"
    );
    let out = fleet.run(&["gateway-config", &a]);
    assert_eq!(out.status.code(), Some(0));
    let config = String::from_utf8(out.stdout).unwrap();

    let secrets = test_dir("onboard-secrets");
    write_secret(&secrets.join("pulsar.token"), token.trim());
    std::fs::copy(secure.pki.join("ca.pem"), secrets.join("ca.pem")).unwrap();
    let prefix = unique("onboard");
    let status = fleet.topic(&a, "status");
    let mut ferry = Ferry::new(stack, "onboard", &a, "unused/+/x", &status, "");
    std::fs::write(
        &ferry.config,
        adjust(&config, &ferry, stack, &prefix, &secrets),
    )
    .unwrap();

    let (code, text) = ferry.check_online();
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains(token.trim()), "the token is never printed");

    ferry.start_ready().await;
    let mut devices = Devices::connect(stack, &prefix, 10).await;
    devices.publish_rounds(0, 20).await;
    ferry.wait_drained(200, SECS(60)).await;
    let msgs = read_secure_topic(secure, &status, 200, SECS(15)).await;
    let t = tally(&msgs, &devices.ids, 20);
    let history = read_secure_topic(secure, &fleet.topic(&a, "history"), 200, SECS(15)).await;
    report(
        "onboard",
        &format!(
            "gateway {a} with its fleet token (exp in {} s) and config: status {t:?}, history {}",
            exp - now,
            history.len()
        ),
    );
    assert_eq!(t, exact(200));
    assert_eq!(history.len(), 200);
    devices.disconnect().await;
    assert_eq!(ferry.terminate(), Some(0));
    assert!(!ferry.log_text().contains(token.trim()));

    // The same token on the other gateway's status topic: refused.
    let other = fleet.topic(&b, "status");
    ferry.edit_config(
        &format!("topic = \"{status}\""),
        &format!("topic = \"{other}\""),
    );
    let (code, text) = ferry.check_online();
    assert_eq!(code, Some(3), "{text}");
    assert!(
        text.contains(&format!("not authorized to produce on {other} as role {a}")),
        "{text}"
    );
}

#[test]
fn token_and_gateway_config_refuse_what_the_fleet_does_not_know() {
    let dir = test_dir("fleet-refuse");
    let secret = dir.join("secret.key");
    std::fs::write(&secret, [9u8; 32]).unwrap();
    let config = dir.join("fleet.toml");
    std::fs::write(
        &config,
        format!(
            "[pulsar]\nservice_url = \"pulsar://127.0.0.1:6650\"\nadmin_url = \"http://127.0.0.1:8080\"\n\
             [namespace]\ntenant = \"iot\"\nname = \"fleet\"\n[signing]\nkey_file = \"{}\"\n\
             [[gateways]]\nid = \"gw-a\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(fleet_bin())
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = run(&["token", "gw-z", "--ttl", "1h"]);
    assert_eq!((code, out.as_str()), (Some(2), ""), "{err}");
    assert_eq!(
        err.trim(),
        "token: gateway gw-z is not in fleet.toml (add it to [[gateways]] and run provision first)"
    );
    for ttl in ["1x", "0s", "3600", "1.5h"] {
        let (code, out, err) = run(&["token", "gw-a", "--ttl", ttl]);
        assert_eq!((code, out.as_str()), (Some(2), ""), "{ttl}: {err}");
        assert!(
            err.starts_with(&format!("--ttl {ttl}: must be a whole number with a unit")),
            "{err}"
        );
    }
    let (code, out, _) = run(&["token", "gw-a", "--ttl", "30d"]);
    assert_eq!(code, Some(0));
    assert_eq!(out.trim().split('.').count(), 3);
    let (code, out, err) = run(&["gateway-config", "gw-z"]);
    assert_eq!((code, out.as_str()), (Some(2), ""));
    assert_eq!(
        err.trim(),
        "gateway-config: gateway gw-z is not in fleet.toml"
    );
}
