//! The setups several tests share: a namespace with a ferry for it, a
//! state stream with a history topic, a ferry granted its topic on the
//! secured broker, and device rounds published while ferry is killed.

use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use rand::Rng;

use super::{test_dir, unique, write_secret, Devices, Ferry, Namespace, Secure, Stack};

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

/// A namespace, an MQTT prefix and a ferry whose `[[streams]]` are what
/// `streams` writes for them (topics of the namespace, filters under the
/// prefix); not started.
pub struct Streams {
    pub ns: Namespace,
    pub prefix: String,
    pub ferry: Ferry,
}

impl Streams {
    pub async fn new(
        stack: &Stack,
        test: &str,
        streams: impl FnOnce(&Namespace, &str) -> String,
    ) -> Streams {
        let ns = Namespace::create(stack, test).await;
        let prefix = unique(test);
        let text = streams(&ns, &prefix);
        let ferry = Ferry::with_streams(stack, test, &unique("gw"), &text);
        Streams { ns, prefix, ferry }
    }
}

/// A namespace, its `device-status` and `device-history` topics, an MQTT
/// prefix, and a ferry with one state stream writing to both (not started).
pub struct WithHistory {
    pub ns: Namespace,
    pub status: String,
    pub history: String,
    pub prefix: String,
    pub ferry: Ferry,
}

impl WithHistory {
    pub async fn new(stack: &Stack, test: &str) -> WithHistory {
        let Streams { ns, prefix, ferry } = Streams::new(stack, test, |ns, prefix| {
            format!(
                r#"[[streams]]
name = "status"
topic = "{}"
history_topic = "{}"
subscriptions = [{{ filter = "{prefix}/+/state", device_id_level = 1 }}]
"#,
                ns.topic("device-status"),
                ns.topic("device-history")
            )
        })
        .await;
        WithHistory {
            status: ns.topic("device-status"),
            history: ns.topic("device-history"),
            ns,
            prefix,
            ferry,
        }
    }
}

/// A ferry for a new role that may produce on one new topic of a secured
/// broker's namespace, and nothing else.
pub struct Granted {
    pub topic: String,
    pub role: String,
    pub prefix: String,
    pub ferry: Ferry,
}

impl Secure {
    /// A ferry (not started) holding a token for `role` and this broker's
    /// CA (copies of its own), writing `<prefix>/+/state` to `topic`; grants
    /// nothing.
    pub fn ferry_as(
        &self,
        stack: &Stack,
        test: &str,
        role: &str,
        prefix: &str,
        topic: &str,
        cert: bool,
    ) -> Ferry {
        let dir = test_dir(&format!("{test}-secrets"));
        let token = dir.join("pulsar.token");
        write_secret(&token, &self.token(role, None));
        let ca = dir.join("ca.pem");
        std::fs::copy(self.pki.join("ca.pem"), &ca).unwrap();
        let tables = self.ferry_tables(&ca, &token, cert);
        let mut ferry = Ferry::new(
            stack,
            test,
            &unique("gw"),
            &format!("{prefix}/+/state"),
            topic,
            &tables,
        );
        ferry.point_pulsar_at(&self.service_url());
        ferry
    }

    /// A new role granted produce on topic `local` of namespace `ns`, and a
    /// ferry for it (not started), with a client certificate if `cert`.
    pub async fn granted_ferry(
        &self,
        stack: &Stack,
        ns: &str,
        local: &str,
        test: &str,
        cert: bool,
    ) -> Granted {
        let topic = format!("persistent://{ns}/{local}");
        let role = unique(&format!("gw-{test}"));
        self.grant_produce(&topic, &role).await;
        let prefix = unique(test);
        let ferry = self.ferry_as(stack, test, &role, &prefix, &topic, cert);
        Granted {
            topic,
            role,
            prefix,
            ferry,
        }
    }
}

/// The value of a `key = "value"` line of a ferry's config.
fn config_value(ferry: &Ferry, key: &str) -> String {
    let text = std::fs::read_to_string(&ferry.config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in the config"));
    line.split('"').nth(1).unwrap().into()
}

impl Ferry {
    /// The token file a secured ferry's config names.
    pub fn token_path(&self) -> PathBuf {
        config_value(self, "token_file").into()
    }

    /// The CA file a secured ferry's config names.
    pub fn ca_path(&self) -> PathBuf {
        config_value(self, "ca_file").into()
    }
}

/// Devices publishing rounds in the background while ferry is killed with
/// SIGKILL again and again.
pub struct KillNine {
    /// Simulated devices, on one MQTT connection.
    pub devices: usize,
    /// Rounds of one update per device, each acknowledged by the broker
    /// before the pause and the next.
    pub rounds: u64,
    pub pause: Duration,
    /// Mosquitto is stopped and started after this many rounds; the devices
    /// connect again.
    pub restart_mqtt_after: Option<u64>,
    /// SIGKILLs, each followed by a start.
    pub kills: usize,
    /// How long ferry runs before each kill, ms, drawn at random.
    pub up_ms: RangeInclusive<u64>,
    /// How long it stays down after each kill, ms, drawn at random.
    pub down_ms: RangeInclusive<u64>,
}

impl KillNine {
    /// Runs the plan against the started `ferry` (devices publish on
    /// `<prefix>/<device>/state`), checks that every kill landed while the
    /// devices were still publishing, and returns the devices' ids once
    /// they have published everything. Ferry runs at the end.
    pub async fn run(self, stack: &Stack, prefix: &str, ferry: &mut Ferry) -> Vec<String> {
        let publisher = {
            let stack = stack.clone();
            let prefix = prefix.to_string();
            let (count, rounds, pause) = (self.devices, self.rounds, self.pause);
            let restart = self.restart_mqtt_after.unwrap_or(rounds);
            tokio::spawn(async move {
                let mut devices = Devices::connect(&stack, &prefix, count).await;
                for round in 0..rounds {
                    if round == restart && round > 0 {
                        devices.disconnect().await;
                        stack.ctl("mqtt-stop");
                        stack.ctl("mqtt-start");
                        devices = Devices::connect(&stack, &prefix, count).await;
                    }
                    devices.publish_rounds(round, round + 1).await;
                    tokio::time::sleep(pause).await;
                }
                let ids = devices.ids.clone();
                devices.disconnect().await;
                ids
            })
        };
        for _ in 0..self.kills {
            let up = rand::thread_rng().gen_range(self.up_ms.clone());
            tokio::time::sleep(Duration::from_millis(up)).await;
            ferry.kill9();
            let down = rand::thread_rng().gen_range(self.down_ms.clone());
            tokio::time::sleep(Duration::from_millis(down)).await;
            ferry.start();
        }
        assert!(
            !publisher.is_finished(),
            "all {} kills landed while devices were still publishing",
            self.kills
        );
        publisher.await.expect("publisher")
    }
}
