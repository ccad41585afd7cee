//! The fleet's side of the downlink in tests: writing desired state to a
//! gateway's desired topic (key = device, property `version`), and a device
//! side that subscribes to the desired MQTT topics and records what came.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pulsar::producer::{Message, ProducerOptions};
use pulsar::{Pulsar, TokioExecutor};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use super::{unique, Secure, Stack};

/// Writes desired states to one desired topic.
pub struct Fleet {
    producer: pulsar::Producer<TokioExecutor>,
}

impl Fleet {
    pub async fn connect(stack: &Stack, topic: &str) -> Fleet {
        Fleet::connect_url(&stack.service_url(), topic).await
    }

    /// On the broker at `service_url` (one region's).
    pub async fn connect_url(service_url: &str, topic: &str) -> Fleet {
        let pulsar: Pulsar<TokioExecutor> = Pulsar::builder(service_url, TokioExecutor)
            .build()
            .await
            .expect("pulsar client");
        Fleet::on(pulsar, topic).await
    }

    /// On a secured broker, as its super-user.
    pub async fn connect_secure(secure: &Secure, topic: &str) -> Fleet {
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
        Fleet::on(pulsar, topic).await
    }

    async fn on(pulsar: Pulsar<TokioExecutor>, topic: &str) -> Fleet {
        let producer = pulsar
            .producer()
            .with_topic(topic)
            .with_name(unique("fleet"))
            .with_options(ProducerOptions {
                batch_size: None,
                block_queue_if_full: true,
                ..Default::default()
            })
            .build()
            .await
            .expect("fleet producer");
        Fleet { producer }
    }

    /// Writes `payload` as `device`'s desired state at `version`.
    pub async fn desire(&mut self, device: &str, version: u64, payload: &[u8]) {
        self.send(Some(device), Some(&version.to_string()), payload)
            .await;
    }

    /// Writes a message as given (for bad input).
    pub async fn send(&mut self, key: Option<&str>, version: Option<&str>, payload: &[u8]) {
        let mut properties = HashMap::new();
        if let Some(v) = version {
            properties.insert("version".to_string(), v.to_string());
        }
        let receipt = self
            .producer
            .send_non_blocking(Message {
                payload: payload.to_vec(),
                partition_key: key.map(str::to_string),
                properties,
                ..Default::default()
            })
            .await
            .expect("send desired state");
        receipt.await.expect("desired state receipt");
    }
}

/// What one device saw on its desired topic, in order: (payload, retained).
pub type Seen = BTreeMap<String, Vec<(Vec<u8>, bool)>>;

/// An MQTT client subscribed to the desired topics of the devices under
/// `prefix` (`<prefix>/<device>/desired`).
pub struct DeviceSide {
    client: AsyncClient,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeviceSide {
    pub async fn subscribe(stack: &Stack, prefix: &str) -> DeviceSide {
        let mut opts = MqttOptions::new(unique("device-side"), "127.0.0.1", stack.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let record = seen.clone();
        let prefix = prefix.to_string();
        let again = client.clone();
        let filter = format!("{prefix}/+/desired");
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    // Subscribed at every connection (a restarted broker
                    // forgot this clean session).
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = again.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let device = p
                            .topic
                            .strip_prefix(&format!("{prefix}/"))
                            .and_then(|t| t.strip_suffix("/desired"))
                            .unwrap_or_default()
                            .to_string();
                        record
                            .lock()
                            .unwrap()
                            .entry(device)
                            .or_default()
                            .push((p.payload.to_vec(), p.retain));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        DeviceSide { client, seen, task }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until every one of `devices` has seen a message satisfying
    /// `done` last; panics after `limit` with what was seen.
    pub async fn wait_last(
        &self,
        devices: &[String],
        limit: Duration,
        done: impl Fn(&[u8], bool) -> bool,
    ) -> Seen {
        self.wait_each(devices, limit, |_, p, r| done(p, r)).await
    }

    /// Waits until the last message each of `devices` saw holds version
    /// `want(device)` of its [`document`].
    pub async fn wait_versions(
        &self,
        devices: &[String],
        limit: Duration,
        want: impl Fn(&str) -> u64,
    ) -> Seen {
        self.wait_each(devices, limit, |d, p, _| version_of(p) == Some(want(d)))
            .await
    }

    async fn wait_each(
        &self,
        devices: &[String],
        limit: Duration,
        done: impl Fn(&str, &[u8], bool) -> bool,
    ) -> Seen {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.seen();
            let ok = |d: &String| {
                seen.get(d)
                    .and_then(|v| v.last())
                    .is_some_and(|(p, r)| done(d, p, *r))
            };
            if devices.iter().all(ok) {
                return seen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "devices did not get their desired state within {limit:?}: {} of {} did",
                devices.iter().filter(|d| ok(d)).count(),
                devices.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

/// The `[downlink]` section of a ferry config: `desired` and `acks` topics,
/// the devices' desired topics under `prefix`.
pub fn downlink_section(desired: &str, acks: &str, prefix: &str) -> String {
    format!(
        "[downlink]\ntopic = \"{desired}\"\nack_topic = \"{acks}\"\nmqtt_topic = \"{prefix}/{{device}}/desired\"\n"
    )
}

/// The desired document tests write: `{"device": .., "v": version}`.
pub fn document(device: &str, version: u64) -> Vec<u8> {
    format!("{{\"device\":\"{device}\",\"v\":{version}}}").into_bytes()
}

/// The version in a [`document`] (`None`: empty, a cleared state).
pub fn version_of(payload: &[u8]) -> Option<u64> {
    if payload.is_empty() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(payload).expect("a desired document");
    v["v"].as_u64()
}
