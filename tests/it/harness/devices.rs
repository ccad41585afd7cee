//! MQTT publishers: simulated devices publishing rounds of JSON updates
//! ([`Devices`]), and a publisher of what devices cannot send (payloads of
//! hundreds of MiB, QoS 0 floods, retained states: [`Publisher`]).

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;

use super::{unique, Stack};

/// One MQTT connection whose event loop runs in a task, counting the
/// PUBLISH packets that went out and the PUBACKs that came back.
struct Link {
    client: AsyncClient,
    sent: watch::Receiver<usize>,
    acked: watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// `who` names the client when it loses the broker (a failure).
    fn connect(
        stack: &Stack,
        name: &str,
        keep_alive: Duration,
        inflight: u16,
        max_packet: usize,
        who: &'static str,
    ) -> Link {
        let mut opts = MqttOptions::new(unique(name), "127.0.0.1", stack.mqtt_port);
        opts.set_keep_alive(keep_alive)
            .set_inflight(inflight)
            .set_max_packet_size(max_packet, max_packet);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (sent_tx, sent) = watch::channel(0usize);
        let (acked_tx, acked) = watch::channel(0usize);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(_))) => sent_tx.send_modify(|n| *n += 1),
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked_tx.send_modify(|n| *n += 1),
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => panic!("{who} lost the MQTT broker: {e}"),
                }
            }
        });
        Link {
            client,
            sent,
            acked,
            task,
        }
    }

    /// Waits until `rx` counts `n`, for at most `limit`; false if it did not.
    async fn reached(rx: &mut watch::Receiver<usize>, n: usize, limit: Duration) -> bool {
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|v| *v >= n)).await,
            Ok(Ok(_))
        )
    }

    async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Simulated devices publishing through one MQTT connection.
pub struct Devices {
    pub ids: Vec<String>,
    pub prefix: String,
    /// The last topic level: `state` unless made with [`Devices::connect_kind`].
    pub kind: String,
    /// Extra bytes in every payload (a `pad` field), 0 by default.
    pub pad: usize,
    link: Link,
    published: usize,
}

impl Devices {
    pub async fn connect(stack: &Stack, prefix: &str, count: usize) -> Devices {
        Devices::connect_kind(stack, prefix, count, "state").await
    }

    /// Devices publishing on `<prefix>/<device>/<kind>`.
    pub async fn connect_kind(stack: &Stack, prefix: &str, count: usize, kind: &str) -> Devices {
        let link = Link::connect(
            stack,
            "devices",
            Duration::from_secs(30),
            200,
            16 << 20,
            "simulated devices",
        );
        Devices {
            ids: (0..count).map(|i| format!("dev-{i:04}")).collect(),
            prefix: prefix.to_string(),
            kind: kind.to_string(),
            pad: 0,
            link,
            published: 0,
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
                self.link
                    .client
                    .publish(self.topic(d), QoS::AtLeastOnce, false, payload)
                    .await
                    .expect("publish");
                self.published += 1;
            }
        }
        self.wait_acked().await;
    }

    pub async fn publish_raw(&mut self, topic: &str, payload: Vec<u8>) {
        self.link
            .client
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
            self.link.acked.wait_for(|n| *n >= want),
        )
        .await
        .expect("broker acknowledged every publish in time")
        .expect("device loop alive");
    }

    pub async fn disconnect(self) {
        self.link.disconnect().await;
    }
}

/// Publishes what the simulated devices cannot: payloads up to 300 MiB,
/// QoS 0, retained messages. Publishing does not wait; [`Publisher::wait_sent`]
/// and [`Publisher::wait_acked`] do.
pub struct Publisher {
    link: Link,
}

impl Publisher {
    pub async fn connect(stack: &Stack) -> Publisher {
        Publisher {
            link: Link::connect(
                stack,
                "publisher",
                Duration::from_secs(60),
                100,
                300 << 20,
                "publisher",
            ),
        }
    }

    pub async fn publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) {
        self.link
            .client
            .publish(topic, qos, false, payload)
            .await
            .expect("publish");
    }

    /// A retained message at QoS 1 (an empty payload clears the topic's).
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) {
        self.link
            .client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await
            .expect("publish");
    }

    /// Waits until `n` PUBLISH packets went out.
    pub async fn wait_sent(&mut self, n: usize) {
        let ok = Link::reached(&mut self.link.sent, n, Duration::from_secs(300)).await;
        assert!(ok, "sent {n} in time");
    }

    /// Waits until the broker acknowledged `n` publishes.
    pub async fn wait_acked(&mut self, n: usize) {
        assert!(
            self.acked_within(n, Duration::from_secs(300)).await,
            "broker acknowledged {n} in time"
        );
    }

    /// Whether the broker acknowledged `n` publishes within `limit`.
    pub async fn acked_within(&mut self, n: usize, limit: Duration) -> bool {
        Link::reached(&mut self.link.acked, n, limit).await
    }

    pub async fn disconnect(self) {
        self.link.disconnect().await;
    }
}
