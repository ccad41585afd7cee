//! MQTT for the benchmark: simulated devices publishing sized, timestamped
//! updates (burst or paced), and a QoS 1 subscriber.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::harness::{unique, Stack};
use crate::{device_ids, payload, Ctx};

/// Small packets go out at once (rumqttc leaves Nagle's algorithm on).
pub fn nodelay(eventloop: &mut rumqttc::EventLoop) {
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
}

/// Simulated devices on one MQTT connection, as the harness's `Devices` (QoS
/// 1, 200 in flight), but with sized, timestamped payloads and paced
/// publishing.
pub struct Publisher {
    client: AsyncClient,
    acked: tokio::sync::watch::Receiver<u64>,
    published: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(stack: &Stack, name: &str) -> Publisher {
        Publisher::with_inflight(stack, name, 200).await
    }

    /// The same, with `inflight` publishes awaiting their PUBACK at most.
    pub async fn with_inflight(stack: &Stack, name: &str, inflight: u16) -> Publisher {
        let mut opts = MqttOptions::new(unique(name), "127.0.0.1", stack.mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(inflight)
            .set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        nodelay(&mut eventloop);
        let (tx, acked) = tokio::sync::watch::channel(0u64);
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
                    Err(e) => {
                        eprintln!("bench: publisher lost the MQTT broker: {e}");
                        return;
                    }
                }
            }
        });
        Publisher {
            client,
            acked,
            published: 0,
            task,
        }
    }

    pub async fn publish(&mut self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        self.publish_as(topic, payload, false).await
    }

    /// A QoS 1 publish, retained if `retain`.
    pub async fn publish_as(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .map_err(|e| format!("publish: {e}"))?;
        self.published += 1;
        Ok(())
    }

    /// Waits until the broker acknowledged everything published.
    pub async fn wait_acked(&mut self, limit: Duration) -> Result<(), String> {
        let want = self.published;
        let acked = matches!(
            tokio::time::timeout(limit, self.acked.wait_for(|n| *n >= want)).await,
            Ok(Ok(_))
        );
        if acked {
            return Ok(());
        }
        Err(format!(
            "the MQTT broker acknowledged {} of {want} publishes",
            *self.acked.borrow()
        ))
    }

    pub async fn disconnect(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// How updates are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as the broker takes them.
    Burst,
    /// This many per second.
    PerSecond(u64),
}

/// What one publisher sends: updates `first..first + count`, round robin
/// over the devices on `<prefix>/<device>/state` (update `i` is number
/// `i / devices` of device `i % devices`).
#[derive(Debug, Clone)]
pub struct Updates {
    stack: Stack,
    prefix: String,
    devices: Vec<String>,
    first: u64,
    count: u64,
    size: usize,
    pace: Pace,
}

impl Updates {
    pub fn new(ctx: &Ctx, prefix: &str, count: u64, pace: Pace) -> Updates {
        Updates {
            stack: ctx.stack.clone(),
            prefix: prefix.to_string(),
            devices: device_ids(ctx.s.devices),
            first: 0,
            count,
            size: ctx.s.payload,
            pace,
        }
    }

    pub fn starting_at(mut self, first: u64) -> Updates {
        self.first = first;
        self
    }

    /// Payloads of `size` bytes instead of `BENCH_PAYLOAD`.
    pub fn sized(mut self, size: usize) -> Updates {
        self.size = size;
        self
    }
}

/// Publishes the updates; returns when the broker acknowledged all of them,
/// with the time that took.
pub async fn publish_updates(u: Updates) -> Result<Duration, String> {
    let mut p = Publisher::connect(&u.stack, "bench-devices").await;
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let d_count = u.devices.len() as u64;
    for k in 0..u.count {
        if let Pace::PerSecond(r) = u.pace {
            tokio::time::sleep_until(start + Duration::from_micros(k * 1_000_000 / r)).await;
        }
        let i = u.first + k;
        let d = &u.devices[(i % d_count) as usize];
        let topic = format!("{}/{d}/state", u.prefix);
        if let Err(e) = p.publish(topic, payload(d, i / d_count, u.size)).await {
            p.disconnect().await;
            return Err(e);
        }
    }
    let limit = Duration::from_secs(120 + u.count / 1000);
    let r = p.wait_acked(limit).await;
    let took = started.elapsed();
    p.disconnect().await;
    r.map(|_| took)
}

/// A QoS 1 subscriber (automatic acks) on `filter`; each message goes to
/// `each`. Returns once the broker confirmed the subscription.
pub async fn subscribe<F>(stack: &Stack, filter: &str, mut each: F) -> AsyncClient
where
    F: FnMut(rumqttc::Publish) + Send + 'static,
{
    let mut opts = MqttOptions::new(unique("bench-sub"), "127.0.0.1", stack.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    nodelay(&mut eventloop);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (subscribed, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => each(p),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("bench: subscriber lost the MQTT broker: {e}");
                    return;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .expect("SUBACK in time")
        .expect("subscriber alive");
    client
}
