//! The broker stack: where it listens, bringing it up once per run, and
//! stopping and starting its brokers; the secured Pulsar profiles with their
//! test PKI and tokens.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{repo, unique, Admin};

fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `tests/stack/stack <args>` for a profile; whether it succeeded.
fn stack_script(profile: &str, args: &[&str]) -> bool {
    Command::new(repo().join("tests/stack/stack"))
        .args(args)
        .env("FERRY_STACK_PROFILE", profile)
        .status()
        .expect("run tests/stack/stack")
        .success()
}

/// Where the stack listens.
#[derive(Debug, Clone)]
pub struct Stack {
    pub pulsar_port: u16,
    pub web_port: u16,
    pub mqtt_port: u16,
    /// PostgreSQL (superuser `ferry`, trust authentication, loopback only;
    /// ferry-fleet's tests use it).
    #[allow(dead_code)]
    pub postgres_port: u16,
}

static STACK: OnceLock<Stack> = OnceLock::new();
static STACK_LOCK: RwLock<()> = RwLock::const_new(());

impl Stack {
    /// Brings the stack up once (or reuses it). Panics when it cannot: a
    /// test that needs a broker fails without one.
    pub fn get() -> &'static Stack {
        STACK.get_or_init(|| {
            assert!(
                stack_script("plain", &["up"]),
                "tests/stack/stack up failed: the broker stack is required"
            );
            Stack {
                pulsar_port: env_port("FERRY_PULSAR_PORT", 6650),
                web_port: env_port("FERRY_PULSAR_WEB_PORT", 8080),
                mqtt_port: env_port("FERRY_MQTT_PORT", 1883),
                postgres_port: env_port("FERRY_POSTGRES_PORT", 5433),
            }
        })
    }

    /// For tests that leave the brokers running.
    pub async fn shared() -> (&'static Stack, RwLockReadGuard<'static, ()>) {
        let s = tokio::task::block_in_place(Stack::get);
        (s, STACK_LOCK.read().await)
    }

    /// For tests that stop and start brokers.
    pub async fn exclusive() -> (&'static Stack, RwLockWriteGuard<'static, ()>) {
        let s = tokio::task::block_in_place(Stack::get);
        (s, STACK_LOCK.write().await)
    }

    pub fn service_url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.pulsar_port)
    }

    /// The URL of database `db` on the stack's PostgreSQL.
    #[allow(dead_code)]
    pub fn postgres_url(&self, db: &str) -> String {
        format!("postgres://ferry@127.0.0.1:{}/{db}", self.postgres_port)
    }

    /// A new database named after `name` (made unique) on the stack's
    /// PostgreSQL (with `psql`, from postgresql-client); its URL.
    #[allow(dead_code)]
    pub fn new_postgres_database(&self, name: &str) -> Result<String, String> {
        let db = super::unique(name).replace('-', "_");
        let out = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.postgres_port.to_string())
            .args(["-U", "ferry", "-d", "ferry", "-c"])
            .arg(format!("CREATE DATABASE {db}"))
            .output()
            .map_err(|e| format!("run psql (postgresql-client): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "the stack's PostgreSQL is required: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(self.postgres_url(&db))
    }

    /// The admin REST API of this broker.
    pub fn admin_api(&self) -> Admin {
        Admin::new(self.web_port, None)
    }

    /// Runs a `tests/stack/stack` subcommand (pulsar-stop, mqtt-start, ...).
    pub fn ctl(&self, what: &str) {
        assert!(
            stack_script("plain", &[what]),
            "tests/stack/stack {what} failed"
        );
    }
}

/// A secured Pulsar (TLS, token authentication, authorization) started by
/// `FERRY_STACK_PROFILE=secure|mtls tests/stack/stack up`, beside the plain
/// stack whose Mosquitto the tests keep using.
#[derive(Debug, Clone)]
pub struct Secure {
    pub profile: &'static str,
    pub tls_port: u16,
    pub web_port: u16,
    /// Test CA, broker and client certificates, secret key, admin token.
    pub pki: PathBuf,
}

static SECURE: OnceLock<Secure> = OnceLock::new();
static MTLS: OnceLock<Secure> = OnceLock::new();

impl Secure {
    /// The broker with TLS and tokens; client certificates optional.
    pub fn get() -> &'static Secure {
        SECURE.get_or_init(|| {
            let tls = env_port("FERRY_SECURE_PULSAR_TLS_PORT", 6651);
            Secure::up(
                "secure",
                tls,
                env_port("FERRY_SECURE_PULSAR_WEB_PORT", 8081),
            )
        })
    }

    /// The broker that also requires a client certificate.
    pub fn mtls() -> &'static Secure {
        MTLS.get_or_init(|| {
            let tls = env_port("FERRY_MTLS_PULSAR_TLS_PORT", 6652);
            Secure::up("mtls", tls, env_port("FERRY_MTLS_PULSAR_WEB_PORT", 8082))
        })
    }

    fn up(profile: &'static str, tls_port: u16, web_port: u16) -> Secure {
        assert!(
            stack_script(profile, &["up"]),
            "the {profile} broker is required: tests/stack/stack up failed"
        );
        let base = std::env::var_os("FERRY_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".stack"));
        Secure {
            profile,
            tls_port,
            web_port,
            pki: base.join(profile).join("pki"),
        }
    }

    pub fn service_url(&self) -> String {
        format!("pulsar+ssl://localhost:{}", self.tls_port)
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.pki.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The admin REST API of this broker, as its super-user.
    pub fn admin_api(&self) -> Admin {
        Admin::new(self.web_port, Some(self.admin_token()))
    }

    /// A JWT for `role` signed with the broker's secret key, expiring `ttl`
    /// seconds from now (negative: already expired).
    pub fn token(&self, role: &str, ttl: Option<i64>) -> String {
        let mut cmd = Command::new(repo().join("tests/stack/stack"));
        cmd.env("FERRY_STACK_PROFILE", self.profile)
            .args(["token", role]);
        if let Some(t) = ttl {
            cmd.arg(t.to_string());
        }
        let out = cmd.output().expect("tests/stack/stack token");
        assert!(
            out.status.success(),
            "token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// A namespace with deduplication on, made with the admin token.
    pub async fn namespace(&self, test: &str) -> String {
        self.admin_api()
            .create_namespace(&format!("public/{}", unique(test)))
            .await
    }

    /// Creates the topic if needed and grants `role` the right to produce on
    /// it, and nothing else.
    pub async fn grant_produce(&self, topic: &str, role: &str) {
        self.admin_api().grant_produce(topic, role).await;
    }

    /// Creates the topic if needed and grants `role` the right to consume it.
    pub async fn grant_consume(&self, topic: &str, role: &str) {
        self.admin_api().grant_consume(topic, role).await;
    }

    /// How many entries the topic's ledgers hold (see
    /// [`Admin::entries_in_topic`]). For the mTLS broker, which the `pulsar`
    /// crate's consumer cannot reach (it has no client certificates).
    pub async fn entries_in_topic(&self, topic: &str) -> u64 {
        self.admin_api().entries_in_topic(topic).await
    }

    /// The `[pulsar.tls]` and `[pulsar.auth]` tables of a ferry config.
    pub fn ferry_tables(&self, ca: &Path, token_file: &Path, client_cert: bool) -> String {
        let mut t = format!("\n[pulsar.tls]\nca_file = \"{}\"\n", ca.display());
        if client_cert {
            t.push_str(&format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                self.pki.join("client.pem").display(),
                self.pki.join("client.key").display()
            ));
        }
        t.push_str(&format!(
            "\n[pulsar.auth]\ntoken_file = \"{}\"\n",
            token_file.display()
        ));
        t
    }
}

/// One region of `tests/stack/stack`'s `east` / `west` profiles: a Pulsar
/// standalone with cluster name `east` or `west`, each registered in the
/// other.
#[derive(Debug, Clone)]
pub struct Region {
    pub name: &'static str,
    pub pulsar_port: u16,
    pub web_port: u16,
}

impl Region {
    pub fn service_url(&self) -> String {
        format!("pulsar://127.0.0.1:{}", self.pulsar_port)
    }

    pub fn admin_api(&self) -> Admin {
        Admin::new(self.web_port, None)
    }

    /// Runs a `tests/stack/stack` subcommand for this region (pulsar-kill,
    /// pulsar-start, pulsar-stop, pulsar-wipe).
    pub fn ctl(&self, what: &str) {
        assert!(
            stack_script(self.name, &[what]),
            "FERRY_STACK_PROFILE={} tests/stack/stack {what} failed",
            self.name
        );
    }
}

/// The two regions, brought up once per run (beside the plain stack, whose
/// Mosquitto the tests keep using).
#[derive(Debug, Clone)]
pub struct Geo {
    pub east: Region,
    pub west: Region,
}

static GEO: OnceLock<Geo> = OnceLock::new();
static GEO_LOCK: RwLock<()> = RwLock::const_new(());

impl Geo {
    fn get() -> &'static Geo {
        GEO.get_or_init(|| {
            for region in ["east", "west"] {
                assert!(
                    stack_script(region, &["up"]),
                    "the {region} region is required: FERRY_STACK_PROFILE={region} tests/stack/stack up failed"
                );
            }
            Geo {
                east: Region {
                    name: "east",
                    pulsar_port: env_port("FERRY_EAST_PULSAR_PORT", 6660),
                    web_port: env_port("FERRY_EAST_PULSAR_WEB_PORT", 8090),
                },
                west: Region {
                    name: "west",
                    pulsar_port: env_port("FERRY_WEST_PULSAR_PORT", 6670),
                    web_port: env_port("FERRY_WEST_PULSAR_WEB_PORT", 8100),
                },
            }
        })
    }

    /// For tests that stop and start the regions' brokers.
    pub async fn exclusive() -> (&'static Geo, RwLockWriteGuard<'static, ()>) {
        let g = tokio::task::block_in_place(Geo::get);
        (g, GEO_LOCK.write().await)
    }

    /// A namespace of that name in both regions, deduplication on.
    pub async fn namespace(&self, test: &str) -> String {
        let name = format!("public/{}", unique(test));
        self.east.admin_api().create_namespace(&name).await;
        self.west.admin_api().create_namespace(&name).await;
        name
    }

    /// The `[[pulsar.clusters]]` of a ferry writing to both regions.
    pub fn clusters_toml(&self) -> String {
        [&self.east, &self.west]
            .iter()
            .map(|r| {
                format!(
                    "[[pulsar.clusters]]\nname = \"{}\"\nservice_url = \"{}\"\n",
                    r.name,
                    r.service_url()
                )
            })
            .collect()
    }
}
