//! What ingest hands the store, bounded by bytes.
//!
//! Every message on its way to the store holds a share of [`Budget`] (its
//! payload, topic and a fixed overhead) until the store drops it, after
//! its commit, dead letter or refusal. The share travels inside the
//! payload's `Bytes` (as its owner), so it is released exactly when the
//! payload's memory is, wherever the store keeps it. While the budget is
//! spent, ingest waits and reads nothing more from the broker: TCP
//! back-pressure reaches the broker, which keeps QoS 1 messages for later
//! (and drops QoS 0 for a slow client, which is what QoS 0 means).

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of messages between the MQTT socket and the store's commit, at
/// most. Above what the store holds back before it pauses intake (8 MiB of
/// payloads), so that held-back messages never use up the budget alone,
/// and about three of the largest messages rumqttc lets through.
pub const INTAKE_BYTES: usize = 16 * 1024 * 1024;

/// What one message costs besides its payload and topic: the `Inbound`,
/// the channel slot, the ack token.
const PER_MESSAGE: usize = 256;

/// The intake's byte budget.
#[derive(Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    pub fn new(total: usize) -> Budget {
        Budget {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The share of a message holding `resident` bytes of payload and
    /// topic; a message larger than the whole budget takes all of it.
    fn cost(&self, resident: usize) -> u32 {
        (resident + PER_MESSAGE).min(self.total) as u32
    }

    /// Waits until the budget has room for a message of `resident` bytes.
    pub async fn reserve(&self, resident: usize) -> OwnedSemaphorePermit {
        let n = self.cost(resident);
        self.sem
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the budget's semaphore is never closed")
    }

    /// Bytes not taken.
    pub fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// A payload holding its share of the budget until it is dropped, copied
/// into an allocation of its own: a slice of rumqttc's read buffer would
/// keep that whole buffer alive (measured: about twice the bytes counted).
pub fn held(payload: &[u8], share: OwnedSemaphorePermit) -> Bytes {
    Bytes::from_owner(Held {
        data: payload.to_vec(),
        _share: share,
    })
}

struct Held<T> {
    data: T,
    _share: OwnedSemaphorePermit,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Held<T> {
    fn as_ref(&self) -> &[u8] {
        self.data.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_budget_holds_intake_back_until_the_store_drops_what_it_took() {
        let budget = Budget::new(10_000);
        let a = held(&[1u8; 6000], budget.reserve(6000).await);
        assert_eq!(&a[..3], &[1, 1, 1]);
        // 6,256 taken: another 6,000 waits.
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), budget.reserve(6000)).await;
        assert!(
            waiting.is_err(),
            "a second message fits only after the first is dropped"
        );
        let clone = a.clone();
        drop(a);
        assert!(budget.available() < 10_000, "a clone keeps the share");
        drop(clone);
        assert_eq!(budget.available(), 10_000);
        // A message larger than the whole budget takes all of it, alone.
        let huge = budget.reserve(50_000).await;
        assert_eq!(budget.available(), 0);
        drop(huge);
        let _b = budget.reserve(6000).await;
    }
}
