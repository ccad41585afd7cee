//! A ferry process under test: its config (written here), its start, kill
//! and signals, its log, `ferry status` and `ferry check`, its metrics, and
//! what its store holds (read through a separate SQLite connection).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{free_port, repo, test_dir, Stack};

/// The ferry binary under test: `FERRY_BIN` (for example an ARM build run
/// through qemu), or the one cargo built.
pub fn ferry_bin() -> PathBuf {
    std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_BIN_EXE_ferry").map(PathBuf::from))
        .or_else(beside_this_program)
        .unwrap_or_else(|| repo().join("target/release/ferry"))
}

/// `ferry` in the profile folder this program was built into (a test of
/// another workspace member: `target/debug/deps/..`; an example:
/// `target/release/examples/..`), if it is there.
fn beside_this_program() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let ferry = exe.parent()?.parent()?.join("ferry");
    ferry.is_file().then_some(ferry)
}

/// A ferry process with its own config, store and log.
pub struct Ferry {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Where its Prometheus endpoint listens.
    pub metrics_port: u16,
    gateway: String,
    store: PathBuf,
    /// The Pulsar service URL its config names now.
    pulsar_url: String,
    /// The service URL to go back to while [`Ferry::cut_off_pulsar`] holds.
    cut_off_from: Option<String>,
    /// The MQTT port its config names now.
    mqtt_port: u16,
    child: Option<Child>,
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
            gateway: gateway.to_string(),
            pulsar_url: stack.service_url(),
            cut_off_from: None,
            mqtt_port: stack.mqtt_port,
            child: None,
        }
    }

    /// A ferry whose config has the given `[[streams]]` (TOML text) instead
    /// of the one-stream shorthand.
    /// A ferry with one status stream: `topic`, from `<prefix>/+/state`.
    pub fn with_status_stream(
        stack: &Stack,
        test: &str,
        gateway: &str,
        topic: &str,
        prefix: &str,
    ) -> Ferry {
        Ferry::with_streams(
            stack,
            test,
            gateway,
            &format!(
                r#"[[streams]]
name = "status"
topic = "{topic}"
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]
"#
            ),
        )
    }

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

    // -- the config ----------------------------------------------------------

    /// The `gateway_id` of its config.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// Rewrites one line of the config file.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(text.contains(from), "config has no `{from}`");
        std::fs::write(&self.config, text.replace(from, to)).unwrap();
    }

    /// Appends `text` (TOML: whole sections) to the config file.
    pub fn append_config(&self, text: &str) {
        let mut config = std::fs::read_to_string(&self.config).unwrap();
        config.push('\n');
        config.push_str(text);
        std::fs::write(&self.config, config).unwrap();
    }

    /// Adds `lines` (TOML) to the config's `[section]`.
    pub fn add_settings(&self, section: &str, lines: &str) {
        if lines.is_empty() {
            return;
        }
        let head = format!("[{section}]\n");
        self.edit_config(&head, &format!("{head}{}\n", lines.trim_end()));
    }

    /// Points the config at another Pulsar service URL (from the next start).
    pub fn point_pulsar_at(&mut self, url: &str) {
        self.edit_config(
            &format!("service_url = \"{}\"", self.pulsar_url),
            &format!("service_url = \"{url}\""),
        );
        self.pulsar_url = url.to_string();
    }

    /// Points the config at a local port nothing listens on: Pulsar is out
    /// of reach from the next start until [`Ferry::restore_pulsar`].
    pub fn cut_off_pulsar(&mut self) {
        assert!(self.cut_off_from.is_none(), "Pulsar is already cut off");
        let home = self.pulsar_url.clone();
        self.point_pulsar_at(&format!("pulsar://127.0.0.1:{}", free_port()));
        self.cut_off_from = Some(home);
    }

    /// Points the config back at the Pulsar it named before
    /// [`Ferry::cut_off_pulsar`].
    pub fn restore_pulsar(&mut self) {
        let home = self.cut_off_from.take().expect("Pulsar was cut off");
        self.point_pulsar_at(&home);
    }

    /// Replaces the config's one Pulsar cluster with `[[pulsar.clusters]]`
    /// (TOML text).
    pub fn use_clusters(&mut self, clusters: &str) {
        self.edit_config(
            &format!("[pulsar]\nservice_url = \"{}\"\n", self.pulsar_url),
            clusters,
        );
    }

    /// Points the config at another MQTT broker port.
    pub fn point_mqtt_at(&mut self, port: u16) {
        self.edit_config(
            &format!("port = {}\n", self.mqtt_port),
            &format!("port = {port}\n"),
        );
        self.mqtt_port = port;
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

    // -- the process ---------------------------------------------------------

    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// Starts ferry and waits until it subscribed to the MQTT broker.
    pub async fn start_subscribed(&mut self) {
        self.start();
        self.wait_log("mqtt subscribed", Duration::from_secs(30))
            .await;
    }

    /// Starts ferry and waits until its producer is ready and it subscribed
    /// to the MQTT broker.
    pub async fn start_ready(&mut self) {
        self.start();
        self.wait_log("producer ready", Duration::from_secs(30))
            .await;
        self.wait_log("mqtt subscribed", Duration::from_secs(30))
            .await;
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
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
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

    // -- what it says --------------------------------------------------------

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
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

    /// `ferry status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.status(true)).unwrap()
    }

    /// Runs `ferry audit <args>` on this ferry's config: exit code and
    /// everything it printed.
    pub fn audit(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = Command::new(ferry_bin())
            .arg("audit")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run ferry audit");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// The audit trail's folder (the default: `audit/` beside the store).
    pub fn audit_dir(&self) -> PathBuf {
        self.store.parent().unwrap().join("audit")
    }

    /// Every audit event in the trail's files, oldest first.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(self.audit_dir()) {
            Ok(d) => d.map(|e| e.unwrap().path()).collect(),
            Err(_) => return Vec::new(),
        };
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect()
    }

    /// The audit events named `kind`, oldest first.
    pub fn audit_events_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.audit_events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
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
        self.try_scrape().await.expect("metrics endpoint answers")
    }

    /// [`Ferry::scrape`], or `None` while the endpoint does not answer.
    pub async fn try_scrape(&self) -> Option<BTreeMap<String, f64>> {
        scrape_port(self.metrics_port).await
    }
}

/// Scrapes `http://127.0.0.1:<port>/metrics` (ferry's, or a `ferry-fleet
/// view`'s): each sample line as (name with labels, value); `None` while
/// the endpoint does not answer.
pub async fn scrape_port(port: u16) -> Option<BTreeMap<String, f64>> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

impl Drop for Ferry {
    fn drop(&mut self) {
        self.kill9();
    }
}
