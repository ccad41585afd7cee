//! What the store holds back in memory: messages neither stored nor
//! acknowledged (a `reject` stream at its limit, a full disk), the MQTT
//! connection they came with, and the packet ids of messages the broker
//! will deliver again. Plain state, no I/O: the worker asks it what to do.

use std::collections::VecDeque;

use super::Inbound;

/// Held-back messages kept in memory at most; past either bound ingest
/// disconnects and the MQTT broker keeps the backlog.
pub const MAX_PARKED: usize = 1_000;
pub const MAX_PARKED_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct HoldBack {
    /// Messages held back, in arrival order: neither stored nor acked.
    parked: VecDeque<Inbound>,
    /// Per stream: a `reject` stream is holding messages back.
    rejecting: Vec<bool>,
    /// The current MQTT connection (see [`super::Command::Epoch`]).
    epoch: u64,
    /// Messages of this connection and earlier ones are refused (the
    /// connection is being closed for back-pressure).
    closing_epoch: Option<u64>,
    /// Packet ids of messages received but not stored (see
    /// [`super::db::Db::commit_batch`]), cleared by the next commit.
    forget: Vec<u16>,
}

/// A stream started or stopped holding messages back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turned {
    pub stream: usize,
    pub rejecting: bool,
}

impl HoldBack {
    pub fn new(streams: usize) -> HoldBack {
        HoldBack {
            rejecting: vec![false; streams],
            ..HoldBack::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    pub fn len(&self) -> usize {
        self.parked.len()
    }

    /// Payload bytes held back.
    pub fn bytes(&self) -> usize {
        self.parked.iter().map(|m| m.payload.len()).sum()
    }

    /// The rejecting flag per stream.
    pub fn rejecting(&self) -> &[bool] {
        &self.rejecting
    }

    /// A message of an MQTT connection that back-pressure is closing: it is
    /// neither stored nor acknowledged, so the broker redelivers it on the
    /// next connection, after whatever of its stream was held back.
    pub fn refused(&self, m: &Inbound) -> bool {
        m.ack
            .is_some_and(|a| self.closing_epoch.is_some_and(|c| a.epoch <= c))
    }

    /// What a commit stores: everything held back, in arrival order, then
    /// `new` (less what is refused, whose packet ids are forgotten).
    pub fn batch(&mut self, new: Vec<Inbound>) -> Vec<Inbound> {
        let mut batch: Vec<Inbound> = self.parked.drain(..).collect();
        for m in new {
            if self.refused(&m) {
                self.forget.push(m.pkid);
            } else {
                batch.push(m);
            }
        }
        batch
    }

    /// Holds a message back (unless the broker will redeliver it anyway).
    pub fn hold(&mut self, m: Inbound) {
        if self.refused(&m) {
            self.forget.push(m.pkid);
        } else {
            self.parked.push_back(m);
        }
    }

    /// Drops held messages the broker will redeliver (`keep` says which
    /// stay); their packet ids are forgotten.
    pub fn drop_held(&mut self, keep: impl Fn(&Inbound) -> bool) -> usize {
        let before = self.parked.len();
        let mut kept = VecDeque::with_capacity(before);
        for m in self.parked.drain(..) {
            if keep(&m) {
                kept.push_back(m);
            } else {
                self.forget.push(m.pkid);
            }
        }
        self.parked = kept;
        before - self.parked.len()
    }

    /// The packet ids to forget, for the next commit; give them back with
    /// [`HoldBack::unforget`] if it fails.
    pub fn take_forget(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.forget)
    }

    pub fn unforget(&mut self, forget: Vec<u16>) {
        let newer = std::mem::replace(&mut self.forget, forget);
        self.forget.extend(newer);
    }

    /// Ingest connected again (connection `epoch`). With the broker's
    /// session kept, what an earlier connection left held back is
    /// redelivered, so it is dropped here; returns how many.
    pub fn new_epoch(&mut self, epoch: u64, session_present: bool) -> usize {
        self.epoch = epoch;
        if !session_present {
            return 0;
        }
        self.drop_held(|p| p.ack.map_or(true, |a| a.epoch >= epoch))
    }

    /// Whether too much is held back in memory.
    pub fn over_memory(&self) -> bool {
        self.parked.len() >= MAX_PARKED || self.bytes() >= MAX_PARKED_BYTES
    }

    /// Gives the current connection back to the broker: what it can
    /// redeliver is dropped (only QoS 0 stays), and every later message of
    /// this connection is refused, so that nothing overtakes what was held
    /// back. Returns how many were held.
    pub fn close_connection(&mut self) -> usize {
        let held = self.parked.len();
        self.drop_held(|m| m.ack.is_none());
        self.closing_epoch = Some(self.epoch);
        held
    }

    /// Sets which streams hold messages back; returns the streams that
    /// turned.
    pub fn set_rejecting(&mut self, now: Vec<bool>) -> Vec<Turned> {
        let turned = self
            .rejecting
            .iter()
            .zip(&now)
            .enumerate()
            .filter(|(_, (was, is))| was != is)
            .map(|(stream, (_, is))| Turned {
                stream,
                rejecting: *is,
            })
            .collect();
        self.rejecting = now;
        turned
    }

    /// A new layout (configuration reload) may have another number of
    /// streams.
    pub fn resize(&mut self, streams: usize) {
        self.rejecting.resize(streams, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AckToken;

    fn msg(pkid: u16, epoch: Option<u64>, len: usize) -> Inbound {
        Inbound {
            pkid,
            ack: epoch.map(|epoch| AckToken {
                epoch,
                pkid,
                gen: 0,
            }),
            payload: vec![0u8; len].into(),
            mqtt_topic: "devices/a/state".into(),
            retain: false,
            stream: Some(0),
            device: Some("a".into()),
            dup: false,
            counted: false,
            guarded: None,
        }
    }

    fn pkids(h: &mut HoldBack) -> Vec<u16> {
        h.batch(Vec::new()).iter().map(|m| m.pkid).collect()
    }

    #[test]
    fn a_batch_is_what_was_held_then_what_is_new_in_arrival_order() {
        let mut h = HoldBack::new(1);
        h.hold(msg(1, Some(1), 1));
        h.hold(msg(2, Some(1), 1));
        let batch = h.batch(vec![msg(3, Some(1), 1), msg(4, None, 1)]);
        assert_eq!(
            batch.iter().map(|m| m.pkid).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(h.is_empty());
        assert!(h.take_forget().is_empty());
    }

    #[test]
    fn closing_a_connection_keeps_only_qos0_and_refuses_the_rest_of_it() {
        let mut h = HoldBack::new(1);
        h.new_epoch(3, true);
        h.hold(msg(1, Some(3), 10));
        h.hold(msg(0, None, 10));
        h.hold(msg(2, Some(3), 10));
        assert_eq!(h.close_connection(), 3);
        assert_eq!(h.len(), 1);
        assert_eq!(h.take_forget(), [1, 2]);
        // Later messages of connection 3 (and earlier) are refused and
        // forgotten; connection 4's are taken.
        let batch = h.batch(vec![msg(5, Some(3), 1), msg(6, Some(4), 1)]);
        assert_eq!(batch.iter().map(|m| m.pkid).collect::<Vec<_>>(), [0, 6]);
        h.hold(msg(7, Some(2), 1));
        assert_eq!(h.take_forget(), [5, 7]);
    }

    #[test]
    fn a_kept_session_redelivers_what_earlier_connections_left_held() {
        let mut h = HoldBack::new(1);
        h.new_epoch(1, false);
        h.hold(msg(1, Some(1), 1));
        h.hold(msg(0, None, 1));
        // Session lost: nothing is redelivered, everything stays.
        assert_eq!(h.new_epoch(2, false), 0);
        assert_eq!(h.len(), 2);
        h.hold(msg(2, Some(2), 1));
        // Session kept: connection 1's message comes again; QoS 0 and the
        // new connection's stay.
        assert_eq!(h.new_epoch(2, true), 1);
        assert_eq!(pkids(&mut h), [0, 2]);
        assert_eq!(h.take_forget(), [1]);
    }

    #[test]
    fn memory_bounds_count_messages_and_payload_bytes() {
        let mut h = HoldBack::new(1);
        for i in 0..MAX_PARKED - 1 {
            h.hold(msg(i as u16 + 1, Some(1), 1));
        }
        assert!(!h.over_memory());
        h.hold(msg(0, None, 1));
        assert!(h.over_memory());
        let mut h = HoldBack::new(1);
        h.hold(msg(1, Some(1), MAX_PARKED_BYTES - 1));
        assert!(!h.over_memory());
        h.hold(msg(2, Some(1), 1));
        assert!(h.over_memory());
        assert_eq!(h.bytes(), MAX_PARKED_BYTES);
    }

    #[test]
    fn forgotten_ids_survive_a_failed_commit_in_order() {
        let mut h = HoldBack::new(1);
        h.new_epoch(1, false);
        h.hold(msg(1, Some(1), 1));
        h.close_connection();
        let taken = h.take_forget();
        assert_eq!(taken, [1]);
        h.hold(msg(2, Some(1), 1));
        h.unforget(taken);
        assert_eq!(h.take_forget(), [1, 2]);
    }

    #[test]
    fn rejecting_reports_only_the_streams_that_turned() {
        let mut h = HoldBack::new(3);
        assert_eq!(
            h.set_rejecting(vec![true, false, true]),
            [
                Turned {
                    stream: 0,
                    rejecting: true
                },
                Turned {
                    stream: 2,
                    rejecting: true
                }
            ]
        );
        assert_eq!(
            h.set_rejecting(vec![true, false, false]),
            [Turned {
                stream: 2,
                rejecting: false
            }]
        );
        assert_eq!(h.rejecting(), [true, false, false]);
        h.resize(4);
        assert_eq!(h.rejecting(), [true, false, false, false]);
    }
}
