//! The test harness: the real broker stack, ferry as a child process,
//! simulated devices, and a real Pulsar consumer that counts what arrived.
//!
//! The stack (Pulsar standalone + Mosquitto) is started once per test run by
//! `tests/stack/stack up`, which reuses a stack already up. Each test gets its
//! own Pulsar namespace, topic, MQTT topic prefix and client ids. Tests that
//! stop a broker take the stack lock exclusively; the others share it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use futures::StreamExt;
use pulsar::consumer::InitialPosition;
use pulsar::{ConsumerOptions, Pulsar, SubType, TokioExecutor};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn env_port(name: &str, default: u16) -> u16 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the stack listens.
#[derive(Debug, Clone)]
pub struct Stack {
    pub pulsar_port: u16,
    pub web_port: u16,
    pub mqtt_port: u16,
}

static STACK: OnceLock<Stack> = OnceLock::new();
static STACK_LOCK: RwLock<()> = RwLock::const_new(());

impl Stack {
    /// Brings the stack up once (or reuses it). Panics when it cannot: a
    /// test that needs a broker fails without one.
    pub fn get() -> &'static Stack {
        STACK.get_or_init(|| {
            let status = Command::new(repo().join("tests/stack/stack"))
                .arg("up")
                .env("FERRY_STACK_PROFILE", "plain")
                .status()
                .expect("run tests/stack/stack up");
            assert!(
                status.success(),
                "tests/stack/stack up failed: the broker stack is required"
            );
            Stack {
                pulsar_port: env_port("FERRY_PULSAR_PORT", 6650),
                web_port: env_port("FERRY_PULSAR_WEB_PORT", 8080),
                mqtt_port: env_port("FERRY_MQTT_PORT", 1883),
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

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/admin/v2/{path}", self.web_port)
    }

    /// Runs a `tests/stack/stack` subcommand (pulsar-stop, mqtt-start, ...).
    pub fn ctl(&self, what: &str) {
        let status = Command::new(repo().join("tests/stack/stack"))
            .arg(what)
            .env("FERRY_STACK_PROFILE", "plain")
            .status()
            .expect("run tests/stack/stack");
        assert!(status.success(), "tests/stack/stack {what} failed");
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
        let status = Command::new(repo().join("tests/stack/stack"))
            .arg("up")
            .env("FERRY_STACK_PROFILE", profile)
            .status()
            .expect("run tests/stack/stack up");
        assert!(
            status.success(),
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
        let name = format!("public/{}", unique(test));
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{}/admin/v2", self.web_port);
        let r = http
            .put(format!("{base}/namespaces/{name}"))
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "create namespace {name}: {}",
            r.status()
        );
        let r = http
            .post(format!("{base}/namespaces/{name}/deduplication"))
            .bearer_auth(self.admin_token())
            .header("Content-Type", "application/json")
            .body("true")
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "deduplication on {name}: {}",
            r.status()
        );
        name
    }

    /// Creates the topic if needed and grants `role` the right to produce on
    /// it, and nothing else.
    pub async fn grant_produce(&self, topic: &str, role: &str) {
        let path = topic
            .strip_prefix("persistent://")
            .expect("persistent topic");
        let base = format!(
            "http://127.0.0.1:{}/admin/v2/persistent/{path}",
            self.web_port
        );
        let http = reqwest::Client::new();
        let r = http
            .put(&base)
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT,
            "create {topic}: {}",
            r.status()
        );
        let r = http
            .post(format!("{base}/permissions/{role}"))
            .bearer_auth(self.admin_token())
            .header("Content-Type", "application/json")
            .body(r#"["produce"]"#)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "grant produce on {topic} to {role}: {}",
            r.status()
        );
    }

    /// How many entries the topic's ledgers hold (admin REST internal
    /// stats). Ferry sends unbatched, so that is the message count. For the
    /// mTLS broker, which the `pulsar` crate's consumer cannot reach (it has
    /// no client certificates).
    pub async fn entries_in_topic(&self, topic: &str) -> u64 {
        let path = topic
            .strip_prefix("persistent://")
            .expect("persistent topic");
        let url = format!(
            "http://127.0.0.1:{}/admin/v2/persistent/{path}/internalStats",
            self.web_port
        );
        let body: serde_json::Value = reqwest::Client::new()
            .get(url)
            .bearer_auth(self.admin_token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["numberOfEntries"]
            .as_u64()
            .unwrap_or_else(|| panic!("internal stats: {body}"))
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

/// Writes a secret file the way an installer should: mode 0600, replaced
/// atomically so a reader never sees half of it.
pub fn write_secret(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A unique, short name for this test's resources.
pub fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!("{name}-{t}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A Pulsar namespace of one test, with deduplication on.
pub struct Namespace {
    pub name: String,
    stack: Stack,
}

impl Namespace {
    pub async fn create(stack: &Stack, test: &str) -> Namespace {
        let name = format!("public/{}", unique(test));
        let http = reqwest::Client::new();
        let r = http
            .put(stack.admin(&format!("namespaces/{name}")))
            .send()
            .await
            .expect("admin api");
        assert!(
            r.status().is_success(),
            "create namespace {name}: {}",
            r.status()
        );
        let r = http
            .post(stack.admin(&format!("namespaces/{name}/deduplication")))
            .header("Content-Type", "application/json")
            .body("true")
            .send()
            .await
            .expect("admin api");
        assert!(
            r.status().is_success(),
            "enable deduplication on {name}: {}",
            r.status()
        );
        Namespace {
            name,
            stack: stack.clone(),
        }
    }

    pub fn topic(&self, local: &str) -> String {
        format!("persistent://{}/{local}", self.name)
    }

    /// Triggers compaction of a topic through the admin REST API and waits
    /// until it has finished.
    pub async fn compact(&self, local: &str) {
        let http = reqwest::Client::new();
        let url = self
            .stack
            .admin(&format!("persistent/{}/{local}/compaction", self.name));
        let r = http.put(&url).send().await.expect("admin api");
        assert!(
            r.status().is_success(),
            "trigger compaction: {}",
            r.status()
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let body: serde_json::Value =
                http.get(&url).send().await.unwrap().json().await.unwrap();
            match body["status"].as_str() {
                Some("SUCCESS") => return,
                Some("ERROR") => panic!("compaction failed: {body}"),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "compaction did not finish: {body}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// One message read back from Pulsar.
#[derive(Debug, Clone)]
pub struct Received {
    pub key: String,
    pub payload: Vec<u8>,
    pub sequence_id: u64,
    /// When ferry sent it (ms since the epoch).
    pub publish_time: u64,
    pub properties: BTreeMap<String, String>,
}

impl Received {
    /// The simulated device's own update counter, from the payload.
    pub fn n(&self) -> u64 {
        let v: serde_json::Value = serde_json::from_slice(&self.payload).expect("json payload");
        v["n"].as_u64().expect("n in payload")
    }
}

/// Reads a topic from the start until `expected` messages arrived, then keeps
/// listening for `grace` to catch anything extra (a duplicate). Gives up when
/// nothing arrives for `idle`.
pub async fn read_topic(
    stack: &Stack,
    topic: &str,
    compacted: bool,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(stack.service_url(), TokioExecutor)
        .build()
        .await
        .expect("pulsar client");
    read_with(pulsar, topic, compacted, expected, idle).await
}

/// [`read_topic`] on a secured broker, as its super-user.
pub async fn read_secure_topic(
    secure: &Secure,
    topic: &str,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(secure.service_url(), TokioExecutor)
        .with_auth(pulsar::Authentication {
            name: "token".into(),
            data: secure.admin_token().into_bytes(),
        })
        .with_certificate_chain_file(secure.pki.join("ca.pem"))
        .expect("read ca.pem")
        .with_tls_hostname_verification_enabled(true)
        .build()
        .await
        .expect("pulsar client");
    read_with(pulsar, topic, false, expected, idle).await
}

async fn read_with(
    pulsar: Pulsar<TokioExecutor>,
    topic: &str,
    compacted: bool,
    expected: usize,
    idle: Duration,
) -> Vec<Received> {
    let mut consumer = pulsar
        .consumer()
        .with_topic(topic)
        .with_subscription(unique("reader"))
        .with_subscription_type(SubType::Exclusive)
        .with_options(ConsumerOptions {
            initial_position: InitialPosition::Earliest,
            read_compacted: Some(compacted),
            durable: Some(false),
            ..Default::default()
        })
        .build::<Vec<u8>>()
        .await
        .expect("pulsar consumer");
    let grace = Duration::from_secs(3);
    let mut out = Vec::new();
    loop {
        let wait = if out.len() >= expected { grace } else { idle };
        match tokio::time::timeout(wait, consumer.next()).await {
            Ok(Some(Ok(msg))) => {
                let _ = consumer.ack(&msg).await;
                let meta = msg.metadata();
                out.push(Received {
                    key: meta.partition_key.clone().unwrap_or_default(),
                    sequence_id: meta.sequence_id,
                    publish_time: meta.publish_time,
                    properties: meta
                        .properties
                        .iter()
                        .map(|kv| (kv.key.clone(), kv.value.clone()))
                        .collect(),
                    payload: msg.payload.data.clone(),
                });
            }
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    out
}

/// What arrived, compared with what the devices published.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub received: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
}

/// The tally of a topic that holds `n` updates, each exactly once, in order.
pub fn exact(n: usize) -> Tally {
    Tally {
        received: n,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
    }
}

/// One test's namespace (deduplication on), `device-status` topic, MQTT
/// topic prefix, and a ferry for them, not started yet.
pub struct Scenario {
    pub topic: String,
    pub prefix: String,
    pub ferry: Ferry,
}

impl Scenario {
    pub async fn new(stack: &Stack, test: &str) -> Scenario {
        let ns = Namespace::create(stack, test).await;
        let topic = ns.topic("device-status");
        let prefix = unique(test);
        let ferry = Ferry::new(
            stack,
            test,
            &unique("gw"),
            &format!("{prefix}/+/state"),
            &topic,
            "",
        );
        Scenario {
            topic,
            prefix,
            ferry,
        }
    }
}

/// Checks that each of `devices` sent updates 0..per_device and that the
/// topic holds each exactly once, in order per device.
pub fn tally(msgs: &[Received], devices: &[String], per_device: u64) -> Tally {
    let mut by_device: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for m in msgs {
        by_device.entry(m.key.as_str()).or_default().push(m.n());
    }
    let mut t = Tally {
        received: msgs.len(),
        ..Tally::default()
    };
    for d in devices {
        let got = by_device.get(d.as_str()).cloned().unwrap_or_default();
        let mut seen = std::collections::HashSet::new();
        let mut last: Option<u64> = None;
        for n in &got {
            if !seen.insert(*n) {
                t.duplicated += 1;
                continue;
            }
            if last.is_some_and(|l| *n < l) {
                t.out_of_order += 1;
            }
            last = Some(*n);
        }
        t.lost += (0..per_device).filter(|n| !seen.contains(n)).count();
    }
    t
}

/// Simulated devices publishing through one MQTT connection.
pub struct Devices {
    pub ids: Vec<String>,
    pub prefix: String,
    /// The last topic level: `state` unless made with [`Devices::connect_kind`].
    pub kind: String,
    /// Extra bytes in every payload (a `pad` field), 0 by default.
    pub pad: usize,
    client: AsyncClient,
    acked: tokio::sync::watch::Receiver<usize>,
    published: usize,
    task: tokio::task::JoinHandle<()>,
}

impl Devices {
    pub async fn connect(stack: &Stack, prefix: &str, count: usize) -> Devices {
        Devices::connect_kind(stack, prefix, count, "state").await
    }

    /// Devices publishing on `<prefix>/<device>/<kind>`.
    pub async fn connect_kind(stack: &Stack, prefix: &str, count: usize, kind: &str) -> Devices {
        let mut opts = MqttOptions::new(unique("devices"), "127.0.0.1", stack.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(200)
            .set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, acked) = tokio::sync::watch::channel(0usize);
        let task = tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        let _ = tx.send(n);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => panic!("simulated devices lost the MQTT broker: {e}"),
                }
            }
        });
        Devices {
            ids: (0..count).map(|i| format!("dev-{i:04}")).collect(),
            prefix: prefix.to_string(),
            kind: kind.to_string(),
            pad: 0,
            client,
            acked,
            published: 0,
            task,
        }
    }

    pub fn topic(&self, device: &str) -> String {
        format!("{}/{device}/{}", self.prefix, self.kind)
    }

    /// Publishes updates `from..to` of every device, round robin, at QoS 1,
    /// and waits until the broker acknowledged all of them.
    pub async fn publish_rounds(&mut self, from: u64, to: u64) {
        for n in from..to {
            for d in &self.ids {
                let temp = 20.0 + (n % 50) as f64 / 10.0;
                let pad = if self.pad > 0 {
                    format!(",\"pad\":\"{}\"", "x".repeat(self.pad))
                } else {
                    String::new()
                };
                let payload = format!("{{\"device\":\"{d}\",\"n\":{n},\"temp_c\":{temp:.1}{pad}}}");
                self.client
                    .publish(self.topic(d), QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("publish");
                self.published += 1;
            }
        }
        self.wait_acked().await;
    }

    pub async fn publish_raw(&mut self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("publish");
        self.published += 1;
        self.wait_acked().await;
    }

    async fn wait_acked(&mut self) {
        let want = self.published;
        tokio::time::timeout(
            Duration::from_secs(300),
            self.acked.wait_for(|n| *n >= want),
        )
        .await
        .expect("broker acknowledged every publish in time")
        .expect("device loop alive");
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// A ferry process with its own config, store and log.
pub struct Ferry {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Where its Prometheus endpoint listens.
    pub metrics_port: u16,
    store: PathBuf,
    child: Option<Child>,
}

/// The ferry binary under test: `FERRY_BIN` (for example an ARM build run
/// through qemu), or the one cargo built.
pub fn ferry_bin() -> PathBuf {
    std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_ferry").map(PathBuf::from))
        .unwrap_or_else(|| repo().join("target/release/ferry"))
}

pub fn test_dir(name: &str) -> PathBuf {
    let dir = repo().join("target/it").join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Ferry {
    /// Writes a config for this test; `extra` is appended to it as is.
    pub fn new(
        stack: &Stack,
        test: &str,
        gateway: &str,
        mqtt_filter: &str,
        topic: &str,
        extra: &str,
    ) -> Ferry {
        let dir = test_dir(test);
        let metrics_port = free_port();
        let config = dir.join("ferry.toml");
        let text = format!(
            r#"gateway_id = "{gateway}"

[mqtt]
host = "127.0.0.1"
port = {mqtt}
client_id = "ferry-{gateway}"

[[mqtt.subscriptions]]
filter = "{mqtt_filter}"
device_id_level = 1

[pulsar]
service_url = "{url}"
topic = "{topic}"

[store]
path = "{store}"

[uplink]
backoff_max_ms = 2000

[metrics]
listen = "127.0.0.1:{metrics_port}"
{extra}
"#,
            mqtt = stack.mqtt_port,
            url = stack.service_url(),
            store = dir.join("ferry.db").display(),
        );
        std::fs::write(&config, text).unwrap();
        Ferry {
            log: dir.join("ferry.log"),
            store: dir.join("ferry.db"),
            dir,
            config,
            metrics_port,
            child: None,
        }
    }

    /// A ferry whose config has the given `[[streams]]` (TOML text) instead
    /// of the one-stream shorthand.
    pub fn with_streams(stack: &Stack, test: &str, gateway: &str, streams: &str) -> Ferry {
        let ferry = Ferry::new(stack, test, gateway, "unused/+/x", "persistent://a/b/c", "");
        let text = std::fs::read_to_string(&ferry.config).unwrap();
        let text = text
            .replace(
                "[[mqtt.subscriptions]]\nfilter = \"unused/+/x\"\ndevice_id_level = 1\n",
                "",
            )
            .replace("topic = \"persistent://a/b/c\"\n", "");
        std::fs::write(&ferry.config, format!("{text}\n{streams}\n")).unwrap();
        ferry
    }

    pub fn store_path(&self) -> PathBuf {
        self.store.clone()
    }

    /// Puts the store at `path` (edits the config).
    pub fn move_store(&mut self, path: &Path) {
        self.edit_config(
            &format!("path = \"{}\"", self.store.display()),
            &format!("path = \"{}\"", path.display()),
        );
        self.store = path.to_path_buf();
    }

    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts ferry with extra environment variables.
    pub fn start_with_env(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "ferry already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(ferry_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn ferry");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`HUP`, `TERM`, ...) without waiting.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("ferry running").id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM, then wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe_sigterm(c.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("ferry did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for ferry to exit on its own; its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let c = self.child.as_mut().expect("ferry started");
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                return s.code();
            }
            assert!(Instant::now() < deadline, "ferry kept running");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Waits until the store has stored `n` records in its life.
    pub async fn wait_stored(&self, n: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !(self.store_path().exists()
            && self.counters().get("stored").copied().unwrap_or(0) >= n)
        {
            assert!(
                Instant::now() < deadline,
                "store never held {n} records: {:?}",
                self.counters()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs `ferry status` (`--json` if asked) on this ferry's config.
    pub fn status(&self, json: bool) -> String {
        let mut cmd = Command::new(ferry_bin());
        cmd.args(["status", "--config"]).arg(&self.config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `ferry check --online` on this ferry's config: exit code and
    /// everything it printed.
    pub fn check_online(&self) -> (Option<i32>, String) {
        let out = Command::new(ferry_bin())
            .args(["check", "--online", "--config"])
            .arg(&self.config)
            .output()
            .expect("run ferry check");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// Scrapes `/metrics`: each sample line as (name with labels, value).
    pub async fn scrape(&self) -> BTreeMap<String, f64> {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.metrics_port))
            .await
            .expect("metrics endpoint answers")
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    /// Waits until `n` log lines contain `needle` (for a restarted ferry,
    /// whose log still holds the lines of its earlier runs).
    pub async fn wait_log_count(&self, needle: &str, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.log_count(needle) < n {
            assert!(
                Instant::now() < deadline,
                "ferry logged `{needle}` fewer than {n} times; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Rewrites one line of the config file.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(text.contains(from), "config has no `{from}`");
        std::fs::write(&self.config, text.replace(from, to)).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "ferry never logged `{needle}`; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The store's lifetime counters, read through a separate connection.
    pub fn counters(&self) -> BTreeMap<String, i64> {
        read_counters(&self.store_path())
    }

    /// Records still waiting in the store.
    pub fn pending(&self) -> i64 {
        self.try_pending().expect("the store has an outbox")
    }

    /// Records still waiting, if the file is a store ferry has opened.
    pub fn try_pending(&self) -> Option<i64> {
        let c = rusqlite::Connection::open(self.store_path()).ok()?;
        c.busy_timeout(Duration::from_secs(5)).ok()?;
        c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .ok()
    }

    /// Waits until the store has stored `stored` records in its life and
    /// holds none pending.
    pub async fn wait_drained(&self, stored: i64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.store_path().exists()
                && self.counters().get("stored").copied().unwrap_or(0) >= stored
                && self.try_pending() == Some(0)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "store stored {:?} and still holds {:?} records; log tail:\n{}",
                self.counters().get("stored"),
                self.try_pending(),
                tail(&self.log_text(), 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A local port nothing listens on (yet).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The store's lifetime counters; none while the file is not (yet) a
/// store ferry has opened (a damaged file before ferry moved it aside, an
/// old version before ferry upgraded it).
pub fn read_counters(store: &Path) -> BTreeMap<String, i64> {
    let read = || -> rusqlite::Result<BTreeMap<String, i64>> {
        let c = rusqlite::Connection::open(store)?;
        c.busy_timeout(Duration::from_secs(5))?;
        let mut stmt = c.prepare("SELECT name, value FROM counters")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    };
    read().unwrap_or_default()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

/// Prints a figure of a test, and keeps it in `target/it/figures.txt`.
pub fn report(test: &str, line: &str) {
    println!("[{test}] {line}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(repo().join("target/it/figures.txt"))
    {
        let _ = writeln!(f, "[{test}] {line}");
    }
}

impl Ferry {
    /// The running ferry's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A `/proc/<pid>/status` figure of the running ferry, in KiB (`VmHWM`:
    /// peak resident memory).
    pub fn proc_status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
    }
}
