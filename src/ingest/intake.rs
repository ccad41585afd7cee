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
//!
//! A payload the guard cut ([`cut_payload`]) is as long as the original as
//! far as the store can tell, so that the store dead-letters it with its
//! real size; only the kept prefix is in memory. The rest is a read-only
//! anonymous mapping that no one writes, so the kernel backs it with its
//! shared zero page: it counts neither in the resident set nor, being
//! read-only, against the commit limit.

use std::ptr::NonNull;
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

/// A payload of `size` bytes of which only `prefix` is known (and
/// resident): the rest reads as zeros. The share is handed back when the
/// address space has no room for the mapping.
pub fn cut_payload(
    prefix: &[u8],
    size: usize,
    share: OwnedSemaphorePermit,
) -> Result<Bytes, OwnedSemaphorePermit> {
    match Sparse::new(prefix, size) {
        Some(data) => Ok(Bytes::from_owner(Held {
            data,
            _share: share,
        })),
        None => Err(share),
    }
}

/// A read-only anonymous mapping whose first bytes were written once.
struct Sparse {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone and never written after
// `new`; reading it from any thread is fine.
unsafe impl Send for Sparse {}
unsafe impl Sync for Sparse {}

impl Sparse {
    fn new(prefix: &[u8], len: usize) -> Option<Sparse> {
        if len == 0 || prefix.len() > len {
            return None;
        }
        // SAFETY: a fresh private anonymous mapping, not aliased; the
        // prefix is written only after that part was made writable, and
        // within the mapping's length.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            );
            if ptr == libc::MAP_FAILED {
                return None;
            }
            let sparse = Sparse {
                ptr: NonNull::new(ptr as *mut u8)?,
                len,
            };
            if !prefix.is_empty() {
                let rw = libc::PROT_READ | libc::PROT_WRITE;
                if libc::mprotect(ptr, prefix.len(), rw) != 0 {
                    return None;
                }
                std::ptr::copy_nonoverlapping(prefix.as_ptr(), ptr as *mut u8, prefix.len());
                libc::mprotect(ptr, prefix.len(), libc::PROT_READ);
            }
            Some(sparse)
        }
    }
}

impl AsRef<[u8]> for Sparse {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` readable bytes from `ptr` while the mapping lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Sparse {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's resident anonymous memory, in bytes.
    fn rss_anon() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("RssAnon:"))
            .expect("RssAnon in /proc/self/status");
        let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    #[tokio::test]
    async fn a_cut_payload_reads_as_its_full_size_but_only_its_prefix_is_resident() {
        let budget = Budget::new(INTAKE_BYTES);
        let prefix: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let size = 200 * 1024 * 1024;
        let before = rss_anon();
        let share = budget.reserve(prefix.len()).await;
        let p = cut_payload(&prefix, size, share).unwrap_or_else(|_| panic!("no mapping"));
        assert_eq!(p.len(), size);
        assert_eq!(&p[..prefix.len()], &prefix[..]);
        assert_eq!(p[prefix.len()], 0);
        assert_eq!(p[size - 1], 0);
        // The store fingerprints the whole payload of a dead letter.
        let _ = crc32c::crc32c(&p);
        let grew = rss_anon().saturating_sub(before);
        assert!(
            grew < 32 * 1024 * 1024,
            "reading a cut 200 MiB payload made {grew} bytes resident"
        );
        assert!(budget.available() < INTAKE_BYTES);
        drop(p);
        assert_eq!(budget.available(), INTAKE_BYTES);
    }

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
