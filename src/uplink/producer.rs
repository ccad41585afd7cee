//! The idempotent producer's state, without I/O.
//!
//! It decides which record goes next, keeps the window of sends awaiting
//! their receipt, and says what a receipt or a reconnect means for the store.
//! Records are sent strictly in record-number order on one producer, so the
//! broker confirms them in that order and "confirmed up to N" is the whole
//! truth about what the broker holds. The window bounds both the records and
//! the payload bytes awaiting their receipt; one record always goes, however
//! large.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProducerError {
    #[error("receipt for record {got} while {expected:?} was the oldest in flight")]
    UnexpectedReceipt { expected: Option<u64>, got: u64 },
    #[error("record {oldest} has waited more than {waited:?} for its receipt")]
    ReceiptTimeout { oldest: u64, waited: Duration },
}

/// What a receipt changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    /// Every record up to `seq` is held by the broker; `sent` is when the
    /// confirmed record was sent.
    Confirmed { seq: u64, sent: Instant },
    /// A receipt for a record already confirmed (a resend the broker
    /// deduplicated); nothing changes.
    Stale,
}

/// A send awaiting its receipt.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    at: Instant,
    bytes: usize,
}

#[derive(Debug)]
pub struct ProducerState {
    window: usize,
    /// Payload bytes awaiting their receipt, at most (but one record
    /// always goes).
    max_bytes: usize,
    /// Sends awaiting their receipt, oldest first.
    in_flight: VecDeque<Sent>,
    /// Their payload bytes.
    in_flight_bytes: usize,
    /// Highest record number the broker is known to hold.
    confirmed: u64,
    /// Highest record number ever sent by this process, to count resends.
    highest_sent: u64,
    /// Resends since the last [`ProducerState::take_resent`].
    resent: u64,
    ready: bool,
}

impl ProducerState {
    pub fn new(window: usize, max_bytes: usize) -> ProducerState {
        ProducerState {
            window: window.max(1),
            max_bytes,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            confirmed: 0,
            highest_sent: 0,
            resent: 0,
            ready: false,
        }
    }

    /// The broker accepted the producer and holds every record up to
    /// `last_sequence_id` (-1: it knows none). Returns the cursor: records
    /// above it are to be sent.
    pub fn on_ready(&mut self, last_sequence_id: i64) -> u64 {
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        if last_sequence_id >= 0 {
            self.confirmed = self.confirmed.max(last_sequence_id as u64);
        }
        self.ready = true;
        self.confirmed
    }

    /// The connection or the producer is gone; whatever was in flight will be
    /// sent again after the next [`ProducerState::on_ready`].
    pub fn on_disconnect(&mut self) {
        self.in_flight.clear();
        self.in_flight_bytes = 0;
        self.ready = false;
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// How many more sends the window allows now, by count.
    pub fn room(&self) -> usize {
        if self.ready {
            self.window - self.in_flight.len().min(self.window)
        } else {
            0
        }
    }

    /// Whether a record of `bytes` payload bytes may go now: the window has
    /// room for one more record and for its bytes. Alone, any record goes.
    pub fn may_send(&self, bytes: usize) -> bool {
        self.room() > 0
            && (self.in_flight.is_empty() || self.in_flight_bytes + bytes <= self.max_bytes)
    }

    /// The highest record number sent or confirmed: the next send must be
    /// above it.
    pub fn cursor(&self) -> u64 {
        self.in_flight
            .back()
            .map(|s| s.seq)
            .unwrap_or(self.confirmed)
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Payload bytes awaiting their receipt.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Records that a send of `seq` with `bytes` payload bytes went out.
    pub fn on_send(&mut self, seq: u64, bytes: usize, now: Instant) {
        debug_assert!(self.ready, "send before the producer is ready");
        debug_assert!(seq > self.cursor(), "sends must go in increasing order");
        if seq <= self.highest_sent {
            self.resent += 1;
        }
        self.highest_sent = self.highest_sent.max(seq);
        self.in_flight.push_back(Sent {
            seq,
            at: now,
            bytes,
        });
        self.in_flight_bytes += bytes;
    }

    pub fn on_receipt(&mut self, seq: u64) -> Result<Receipt, ProducerError> {
        match self.in_flight.front() {
            Some(oldest) if oldest.seq == seq => {
                let sent = oldest.at;
                self.in_flight_bytes -= oldest.bytes;
                self.in_flight.pop_front();
                self.confirmed = seq;
                Ok(Receipt::Confirmed { seq, sent })
            }
            _ if seq <= self.confirmed => Ok(Receipt::Stale),
            front => Err(ProducerError::UnexpectedReceipt {
                expected: front.map(|s| s.seq),
                got: seq,
            }),
        }
    }

    /// Fails when the oldest send has waited longer than `limit`.
    pub fn check_timeout(&self, now: Instant, limit: Duration) -> Result<(), ProducerError> {
        match self.in_flight.front() {
            Some(oldest) if now.duration_since(oldest.at) > limit => {
                Err(ProducerError::ReceiptTimeout {
                    oldest: oldest.seq,
                    waited: now.duration_since(oldest.at),
                })
            }
            _ => Ok(()),
        }
    }

    /// When the oldest send times out, if any is in flight.
    pub fn next_deadline(&self, limit: Duration) -> Option<Instant> {
        self.in_flight.front().map(|s| s.at + limit)
    }

    pub fn take_resent(&mut self) -> u64 {
        std::mem::take(&mut self.resent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_confirm_in_order_and_free_the_window() {
        let now = Instant::now();
        let mut p = ProducerState::new(3, usize::MAX);
        assert_eq!(
            p.room(),
            0,
            "no sends before the broker accepted the producer"
        );
        assert_eq!(p.on_ready(-1), 0);
        for s in 1..=3 {
            p.on_send(s, 1, now);
        }
        assert_eq!(p.room(), 0);
        assert_eq!(
            p.on_receipt(1),
            Ok(Receipt::Confirmed { seq: 1, sent: now })
        );
        assert_eq!(p.room(), 1);
        assert_eq!(p.cursor(), 3);
        assert_eq!(
            p.on_receipt(3),
            Err(ProducerError::UnexpectedReceipt {
                expected: Some(2),
                got: 3
            })
        );
        assert_eq!(p.on_receipt(1), Ok(Receipt::Stale));
    }

    #[test]
    fn resume_starts_after_the_brokers_last_sequence_id() {
        let now = Instant::now();
        let mut p = ProducerState::new(10, usize::MAX);
        p.on_ready(-1);
        for s in 1..=5 {
            p.on_send(s, 1, now);
        }
        p.on_receipt(1).unwrap();
        p.on_disconnect();
        assert_eq!(p.room(), 0);
        // The broker persisted up to 3 although only 1 was confirmed to us.
        assert_eq!(p.on_ready(3), 3);
        assert_eq!(p.cursor(), 3);
        p.on_send(4, 1, now);
        p.on_send(5, 1, now);
        p.on_send(6, 1, now);
        assert_eq!(p.take_resent(), 2, "4 and 5 went out twice; 6 is new");
        assert_eq!(p.take_resent(), 0);
    }

    #[test]
    fn a_broker_that_knows_less_never_moves_the_cursor_back() {
        let mut p = ProducerState::new(10, usize::MAX);
        p.on_ready(-1);
        p.on_send(1, 1, Instant::now());
        p.on_receipt(1).unwrap();
        p.on_disconnect();
        assert_eq!(p.on_ready(-1), 1);
    }

    #[test]
    fn the_window_counts_bytes_as_well_as_records() {
        let now = Instant::now();
        let mut p = ProducerState::new(10, 1000);
        assert!(!p.may_send(1), "nothing before the producer is ready");
        p.on_ready(-1);
        assert!(p.may_send(600));
        p.on_send(1, 600, now);
        assert!(p.may_send(400), "exactly up to the cap");
        assert!(!p.may_send(401));
        p.on_send(2, 400, now);
        assert_eq!((p.in_flight(), p.in_flight_bytes()), (2, 1000));
        assert!(!p.may_send(1));
        p.on_receipt(1).unwrap();
        assert_eq!(p.in_flight_bytes(), 400);
        assert!(p.may_send(600));
        p.on_receipt(2).unwrap();
        assert_eq!(p.in_flight_bytes(), 0);
        // A stale receipt frees nothing.
        assert_eq!(p.on_receipt(1), Ok(Receipt::Stale));
        assert_eq!(p.in_flight_bytes(), 0);
    }

    #[test]
    fn one_record_always_goes_even_over_the_byte_cap() {
        let now = Instant::now();
        let mut p = ProducerState::new(10, 1000);
        p.on_ready(-1);
        assert!(p.may_send(5000), "alone in flight, any record goes");
        p.on_send(1, 5000, now);
        assert!(!p.may_send(1), "but nothing beside it");
        p.on_receipt(1).unwrap();
        assert!(p.may_send(5000));
    }

    #[test]
    fn the_record_count_still_bounds_small_records() {
        let now = Instant::now();
        let mut p = ProducerState::new(2, 1 << 20);
        p.on_ready(-1);
        p.on_send(1, 10, now);
        p.on_send(2, 10, now);
        assert_eq!(p.room(), 0);
        assert!(!p.may_send(10));
    }

    #[test]
    fn a_reconnect_forgets_the_bytes_in_flight() {
        let now = Instant::now();
        let mut p = ProducerState::new(10, 1000);
        p.on_ready(-1);
        p.on_send(1, 900, now);
        p.on_disconnect();
        assert_eq!(p.in_flight_bytes(), 0);
        p.on_ready(-1);
        assert!(p.may_send(1000));
        p.on_send(1, 900, now);
        p.on_ready(1);
        assert_eq!(p.in_flight_bytes(), 0, "on_ready starts a new window");
    }

    #[test]
    fn the_oldest_send_times_out() {
        let t0 = Instant::now();
        let mut p = ProducerState::new(10, usize::MAX);
        p.on_ready(-1);
        p.on_send(1, 1, t0);
        p.on_send(2, 1, t0 + Duration::from_secs(5));
        let limit = Duration::from_secs(10);
        assert!(p.check_timeout(t0 + Duration::from_secs(9), limit).is_ok());
        assert!(matches!(
            p.check_timeout(t0 + Duration::from_secs(11), limit),
            Err(ProducerError::ReceiptTimeout { oldest: 1, .. })
        ));
        assert_eq!(p.next_deadline(limit), Some(t0 + limit));
    }
}
