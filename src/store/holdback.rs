//! What the store holds back in memory: messages neither stored nor
//! acknowledged (a `reject` stream at its limit, a full disk), the MQTT
//! connection of each of ingest's sessions, and the packet ids of messages
//! the broker will deliver again. Each MQTT session is held back, and given
//! back to the broker, on its own: a `reject` stream's session never stops
//! the others. Plain state, no I/O: the worker asks it what to do.

use std::collections::VecDeque;

use super::Inbound;

/// Held-back messages of one MQTT session kept in memory at most; past
/// either bound that session disconnects and the MQTT broker keeps its
/// backlog.
pub const MAX_PARKED: usize = 1_000;
pub const MAX_PARKED_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct HoldBack {
    /// Messages held back, in arrival order: neither stored nor acked.
    parked: VecDeque<Inbound>,
    /// Per stream: a `reject` stream is holding messages back.
    rejecting: Vec<bool>,
    /// Per MQTT session: its current connection (see
    /// [`super::Command::Epoch`]; unique across sessions).
    epoch: Vec<u64>,
    /// Per MQTT session: messages of this connection and earlier ones are
    /// refused (the connection is being closed for back-pressure).
    closing_epoch: Vec<Option<u64>>,
    /// Per MQTT session given back to the broker: the streams whose held
    /// messages it gave back (it comes back once they have room).
    waits_for: Vec<Vec<usize>>,
    /// Packet ids (with their session) of messages received but not stored
    /// (see [`super::db::Db::commit_batch`]), cleared by the next commit.
    forget: Vec<(usize, u16)>,
}

/// A stream started or stopped holding messages back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turned {
    pub stream: usize,
    pub rejecting: bool,
}

impl HoldBack {
    pub fn new(streams: usize, sessions: usize) -> HoldBack {
        HoldBack {
            rejecting: vec![false; streams],
            epoch: vec![0; sessions],
            closing_epoch: vec![None; sessions],
            waits_for: vec![Vec::new(); sessions],
            ..HoldBack::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }

    pub fn len(&self) -> usize {
        self.parked.len()
    }

    /// The rejecting flag per stream.
    pub fn rejecting(&self) -> &[bool] {
        &self.rejecting
    }

    /// A message of an MQTT connection that back-pressure is closing: it is
    /// neither stored nor acknowledged, so the broker redelivers it on the
    /// next connection, after whatever of its stream was held back.
    pub fn refused(&self, m: &Inbound) -> bool {
        let closing = self.closing_epoch.get(m.session).copied().flatten();
        m.ack.is_some_and(|a| closing.is_some_and(|c| a.epoch <= c))
    }

    /// What a commit stores: everything held back, in arrival order, then
    /// `new` (less what is refused, whose packet ids are forgotten). Without
    /// `retry` (nothing freed room since the held messages were last tried)
    /// the held messages stay held, and so do the new messages of their
    /// streams, behind them: nothing overtakes what was held back, and a
    /// commit of the other streams' messages does not try them again.
    pub fn batch(&mut self, new: Vec<Inbound>, retry: bool) -> Vec<Inbound> {
        let mut held = vec![false; self.rejecting.len()];
        let mut batch = Vec::with_capacity(new.len());
        if retry {
            batch.extend(self.parked.drain(..));
        } else {
            for s in self.parked.iter().filter_map(|m| m.stream) {
                grow(&mut held, s);
                held[s] = true;
            }
        }
        for m in new {
            if self.refused(&m) {
                self.forget.push((m.session, m.pkid));
            } else if m
                .stream
                .is_some_and(|s| held.get(s).copied().unwrap_or(false))
            {
                self.parked.push_back(m);
            } else {
                batch.push(m);
            }
        }
        batch
    }

    /// Whether messages of `stream` are held back.
    pub fn holds(&self, stream: usize) -> bool {
        self.parked.iter().any(|m| m.stream == Some(stream))
    }

    /// Holds a message back (unless the broker will redeliver it anyway).
    pub fn hold(&mut self, m: Inbound) {
        if self.refused(&m) {
            self.forget.push((m.session, m.pkid));
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
                self.forget.push((m.session, m.pkid));
            }
        }
        self.parked = kept;
        before - self.parked.len()
    }

    /// The packet ids to forget, for the next commit; give them back with
    /// [`HoldBack::unforget`] if it fails.
    pub fn take_forget(&mut self) -> Vec<(usize, u16)> {
        std::mem::take(&mut self.forget)
    }

    pub fn unforget(&mut self, forget: Vec<(usize, u16)>) {
        let newer = std::mem::replace(&mut self.forget, forget);
        self.forget.extend(newer);
    }

    /// One MQTT session connected again (connection `epoch`). With the
    /// broker's session kept, what an earlier connection of it left held
    /// back is redelivered, so it is dropped here; returns how many.
    pub fn new_epoch(&mut self, session: usize, epoch: u64, present: bool) -> usize {
        grow(&mut self.epoch, session);
        self.epoch[session] = epoch;
        if !present {
            return 0;
        }
        self.drop_held(|p| p.session != session || p.ack.map_or(true, |a| a.epoch >= epoch))
    }

    /// Whether too much of one session is held back in memory.
    pub fn over_memory(&self, session: usize) -> bool {
        let (mut n, mut bytes) = (0, 0);
        for m in self.parked.iter().filter(|m| m.session == session) {
            n += 1;
            bytes += m.payload.len();
        }
        n >= MAX_PARKED || bytes >= MAX_PARKED_BYTES
    }

    /// Gives a session's current connection back to the broker: what it can
    /// redeliver is dropped (only QoS 0 stays), and every later message of
    /// this connection is refused, so that nothing overtakes what was held
    /// back. Returns how many were held.
    pub fn close_connection(&mut self, session: usize) -> usize {
        let mut streams: Vec<usize> = self
            .parked
            .iter()
            .filter(|m| m.session == session)
            .filter_map(|m| m.stream)
            .collect();
        streams.sort_unstable();
        streams.dedup();
        let held = self.parked.iter().filter(|m| m.session == session).count();
        self.drop_held(|m| m.session != session || m.ack.is_none());
        grow(&mut self.epoch, session);
        grow(&mut self.closing_epoch, session);
        grow(&mut self.waits_for, session);
        self.closing_epoch[session] = Some(self.epoch[session]);
        self.waits_for[session] = streams;
        held
    }

    /// The streams whose held messages a session gave back to the broker
    /// when it was last closed.
    pub fn waits_for(&self, session: usize) -> &[usize] {
        self.waits_for.get(session).map_or(&[], Vec::as_slice)
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
    /// streams (not of sessions: that needs a restart).
    pub fn resize(&mut self, streams: usize) {
        self.rejecting.resize(streams, false);
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, i: usize) {
    if v.len() <= i {
        v.resize(i + 1, T::default());
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
                session: 0,
                gen: 0,
            }),
            session: 0,
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
        h.batch(Vec::new(), true).iter().map(|m| m.pkid).collect()
    }

    #[test]
    fn a_batch_is_what_was_held_then_what_is_new_in_arrival_order() {
        let mut h = HoldBack::new(1, 1);
        h.hold(msg(1, Some(1), 1));
        h.hold(msg(2, Some(1), 1));
        let batch = h.batch(vec![msg(3, Some(1), 1), msg(4, None, 1)], true);
        assert_eq!(
            batch.iter().map(|m| m.pkid).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(h.is_empty());
        assert!(h.take_forget().is_empty());
    }

    #[test]
    fn without_a_retry_held_streams_stay_held_and_nothing_overtakes_them() {
        let of = |pkid: u16, stream: usize| {
            let mut m = msg(pkid, Some(1), 1);
            m.stream = Some(stream);
            m
        };
        let mut h = HoldBack::new(2, 1);
        h.hold(of(1, 1));
        let batch = h.batch(vec![of(2, 0), of(3, 1), of(4, 0)], false);
        assert_eq!(batch.iter().map(|m| m.pkid).collect::<Vec<_>>(), [2, 4]);
        assert!(h.holds(1) && !h.holds(0));
        assert_eq!(pkids(&mut h), [1, 3]);
    }

    #[test]
    fn closing_a_connection_keeps_only_qos0_and_refuses_the_rest_of_it() {
        let mut h = HoldBack::new(1, 1);
        h.new_epoch(0, 3, true);
        h.hold(msg(1, Some(3), 10));
        h.hold(msg(0, None, 10));
        h.hold(msg(2, Some(3), 10));
        assert_eq!(h.close_connection(0), 3);
        assert_eq!(h.len(), 1);
        assert_eq!(h.take_forget(), [(0, 1), (0, 2)]);
        // Later messages of connection 3 (and earlier) are refused and
        // forgotten; connection 4's are taken.
        let batch = h.batch(vec![msg(5, Some(3), 1), msg(6, Some(4), 1)], true);
        assert_eq!(batch.iter().map(|m| m.pkid).collect::<Vec<_>>(), [0, 6]);
        h.hold(msg(7, Some(2), 1));
        assert_eq!(h.take_forget(), [(0, 5), (0, 7)]);
    }

    #[test]
    fn a_kept_session_redelivers_what_earlier_connections_left_held() {
        let mut h = HoldBack::new(1, 1);
        h.new_epoch(0, 1, false);
        h.hold(msg(1, Some(1), 1));
        h.hold(msg(0, None, 1));
        // Session lost: nothing is redelivered, everything stays.
        assert_eq!(h.new_epoch(0, 2, false), 0);
        assert_eq!(h.len(), 2);
        h.hold(msg(2, Some(2), 1));
        // Session kept: connection 1's message comes again; QoS 0 and the
        // new connection's stay.
        assert_eq!(h.new_epoch(0, 2, true), 1);
        assert_eq!(pkids(&mut h), [0, 2]);
        assert_eq!(h.take_forget(), [(0, 1)]);
    }

    #[test]
    fn each_session_is_held_back_and_given_back_on_its_own() {
        let on = |session: usize, pkid: u16, epoch: u64, stream: usize| {
            let mut m = msg(pkid, Some(epoch), 1);
            m.session = session;
            m.ack.as_mut().unwrap().session = session;
            m.stream = Some(stream);
            m
        };
        let mut h = HoldBack::new(2, 2);
        h.new_epoch(0, 1, true);
        h.new_epoch(1, 2, true);
        for i in 0..MAX_PARKED as u16 {
            h.hold(on(1, i + 1, 2, 1));
        }
        h.hold(on(0, 1, 1, 0));
        assert!(h.over_memory(1));
        assert!(!h.over_memory(0), "session 0 holds one message");
        assert_eq!(h.close_connection(1), MAX_PARKED);
        assert_eq!(h.waits_for(1), [1]);
        assert!(h.waits_for(0).is_empty());
        // Session 1's later messages of that connection are refused;
        // session 0's are taken, whatever their connection's number.
        let batch = h.batch(vec![on(1, 7, 2, 1), on(0, 2, 1, 0), on(1, 8, 3, 1)], true);
        assert_eq!(
            batch
                .iter()
                .map(|m| (m.session, m.pkid))
                .collect::<Vec<_>>(),
            [(0, 1), (0, 2), (1, 8)]
        );
        let forget = h.take_forget();
        assert_eq!(forget.len(), MAX_PARKED + 1);
        assert_eq!(forget.last(), Some(&(1, 7)));
        // A new connection of session 1 drops only its own held messages.
        h.hold(on(0, 3, 1, 0));
        h.hold(on(1, 9, 3, 1));
        assert_eq!(h.new_epoch(1, 4, true), 1);
        assert_eq!(pkids(&mut h), [3]);
    }

    #[test]
    fn memory_bounds_count_messages_and_payload_bytes() {
        let mut h = HoldBack::new(1, 1);
        for i in 0..MAX_PARKED - 1 {
            h.hold(msg(i as u16 + 1, Some(1), 1));
        }
        assert!(!h.over_memory(0));
        h.hold(msg(0, None, 1));
        assert!(h.over_memory(0));
        let mut h = HoldBack::new(1, 1);
        h.hold(msg(1, Some(1), MAX_PARKED_BYTES - 1));
        assert!(!h.over_memory(0));
        h.hold(msg(2, Some(1), 1));
        assert!(h.over_memory(0));
    }

    #[test]
    fn forgotten_ids_survive_a_failed_commit_in_order() {
        let mut h = HoldBack::new(1, 1);
        h.new_epoch(0, 1, false);
        h.hold(msg(1, Some(1), 1));
        h.close_connection(0);
        let taken = h.take_forget();
        assert_eq!(taken, [(0, 1)]);
        h.hold(msg(2, Some(1), 1));
        h.unforget(taken);
        assert_eq!(h.take_forget(), [(0, 1), (0, 2)]);
    }

    #[test]
    fn rejecting_reports_only_the_streams_that_turned() {
        let mut h = HoldBack::new(3, 1);
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
