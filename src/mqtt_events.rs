//! rumqttc's `EventLoop::poll` must not be dropped while it connects. A poll
//! dropped after CONNECT went out but before the CONNACK was read makes the
//! next poll connect again, and that second CONNACK says "session present"
//! because the first connection created the session: a broker that had lost
//! its state would go unnoticed (ingest would not subscribe again, the
//! downlink would not publish every desired state again). Any `select!` that
//! polls the event loop beside a timer or a signal drops it now and then.
//!
//! [`Events`] polls the event loop in a task of its own and hands over what
//! it yields through a channel, whose receiver any `select!` may drop.

use std::sync::Arc;

use rumqttc::{ConnectionError, Event, EventLoop};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// An MQTT event loop polled in a task of its own.
pub struct Events {
    rx: mpsc::Receiver<Result<Event, ConnectionError>>,
    go: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Events {
    /// Polls `eventloop` until dropped, at most `buffer` events ahead of
    /// the consumer (each holds what it carries in memory: ingest, whose
    /// intake budget bounds the payloads it holds, takes 1).
    pub fn start(mut eventloop: EventLoop, buffer: usize) -> Events {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let go = Arc::new(Notify::new());
        let wait = go.clone();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if tx.send(event).await.is_err() {
                    return;
                }
                // Connecting again waits for the consumer's backoff.
                if failed {
                    wait.notified().await;
                }
            }
        });
        Events { rx, go, task }
    }

    /// The next event (`None` once the poller stopped); safe to drop. After
    /// an error the event loop connects again only at [`Events::retry`].
    pub async fn next(&mut self) -> Option<Result<Event, ConnectionError>> {
        self.rx.recv().await
    }

    /// Lets the event loop connect again after an error.
    pub fn retry(&self) {
        self.go.notify_one();
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use rumqttc::{AsyncClient, MqttOptions, Packet};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A broker that answers every CONNECT after 300 ms, with "no session";
    /// counts connections.
    async fn slow_broker() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    if sock.read(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    // CONNACK: session present 0, accepted.
                    let _ = sock.write_all(&[0x20, 0x02, 0x00, 0x00]).await;
                    let _ = sock.read(&mut buf).await;
                });
            }
        });
        (port, count)
    }

    fn client(port: u16) -> EventLoop {
        let mut opts = MqttOptions::new("events-test", "127.0.0.1", port);
        opts.set_clean_session(false);
        AsyncClient::new(opts, 10).1
    }

    #[tokio::test]
    async fn a_select_that_drops_the_wait_does_not_connect_twice() {
        let (port, connections) = slow_broker().await;
        let mut events = Events::start(client(port), 1);
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let present = loop {
            tokio::select! {
                e = events.next() => {
                    if let Some(Ok(Event::Incoming(Packet::ConnAck(a)))) = e {
                        break a.session_present;
                    }
                }
                _ = tick.tick() => {}
            }
        };
        assert!(!present);
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    /// What [`Events`] is for: the event loop polled straight from such a
    /// `select!` connects again each time the timer wins during a connect.
    #[tokio::test]
    async fn polled_straight_from_a_select_the_event_loop_connects_again() {
        let (port, connections) = slow_broker().await;
        let mut eventloop = client(port);
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            tokio::select! {
                e = eventloop.poll() => {
                    if let Ok(Event::Incoming(Packet::ConnAck(_))) = e {
                        break;
                    }
                }
                _ = tick.tick() => {}
            }
        }
        assert!(connections.load(Ordering::SeqCst) > 1);
    }

    #[tokio::test]
    async fn after_an_error_it_connects_again_only_when_told() {
        // Nothing listens on this port: every connect fails at once.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut events = Events::start(client(port), 1);
        assert!(matches!(events.next().await, Some(Err(_))));
        let waited = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
        assert!(waited.is_err(), "no second attempt before retry()");
        events.retry();
        assert!(matches!(events.next().await, Some(Err(_))));
    }
}
