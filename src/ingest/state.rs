//! Ingest's plain state, without I/O: when to reconnect ([`Reconnect`]),
//! when to subscribe ([`Subscriptions`]) and which acknowledgements the
//! broker is known to have processed ([`AckBarrier`]).

use std::time::{Duration, Instant};

use super::STABLE_AFTER;
use crate::backoff::Backoff;

/// When to reconnect to the MQTT broker: exponential backoff from 200 ms to
/// 30 s that starts over only after a good connection, one that stayed up
/// for [`STABLE_AFTER`] or delivered a message the store committed. A
/// CONNACK alone proves nothing: a broker that accepts the connection and
/// then sends what ends it (or drops it) must not be hammered.
pub(super) struct Reconnect {
    backoff: Backoff,
    /// When the current connection got its CONNACK.
    since: Option<Instant>,
}

impl Reconnect {
    pub(super) fn new() -> Reconnect {
        Reconnect {
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            since: None,
        }
    }

    pub(super) fn connected(&mut self, now: Instant) {
        self.since = Some(now);
    }

    /// The connection ended (or could not be made): how long to wait.
    /// `committed`: the last connection delivered a message the store
    /// committed (it counts only if there was a connection since the last
    /// loss).
    pub(super) fn lost(&mut self, now: Instant, committed: bool) -> Duration {
        if let Some(since) = self.since.take() {
            if committed || now.duration_since(since) >= STABLE_AFTER {
                self.backoff.reset();
            }
        }
        self.backoff.next_delay()
    }
}

/// Whether to subscribe after a CONNACK: on the first of the process (the
/// configuration may have changed since the session was made), when the
/// broker lost the session, and until the broker has confirmed every
/// filter once (a SUBSCRIBE lost with its connection is not resent by
/// rumqttc).
#[derive(Debug, Default)]
pub(super) struct Subscriptions {
    /// Every filter was confirmed by a SUBACK since the process started.
    pub(super) confirmed: bool,
    /// SUBACKs still expected for the subscriptions sent.
    awaiting: usize,
}

impl Subscriptions {
    /// A CONNACK: true if the filters (`count`) must be subscribed now.
    pub(super) fn connected(&mut self, session_present: bool, count: usize) -> bool {
        if count == 0 {
            // Nothing to subscribe to (a session 0 whose streams all
            // have sessions of their own).
            self.confirmed = true;
            return false;
        }
        if self.confirmed && session_present {
            return false;
        }
        self.confirmed = false;
        self.awaiting = count;
        true
    }

    /// A SUBACK; `ok`: the broker granted every filter in it.
    pub(super) fn acked(&mut self, ok: bool) {
        if !ok {
            self.awaiting = usize::MAX;
        }
        self.awaiting = self.awaiting.saturating_sub(1);
        if self.awaiting == 0 {
            self.confirmed = true;
        }
    }
}

/// Which acknowledgements the broker has processed. It handles one
/// connection's packets in order, so the UNSUBACK to an UNSUBSCRIBE sent
/// after some PUBACKs proves it processed them, and may give their packet
/// ids to new messages. The store uses that to tell a new message that
/// happens to be byte-identical to the last one under its packet id from a
/// redelivery ([`crate::store::Command::AcksConfirmed`]). One barrier is
/// outstanding at a time: about one per round trip while acks flow.
#[derive(Debug, Default)]
pub(super) struct AckBarrier {
    pub(super) epoch: u64,
    /// The newest commit whose ack went out on this connection and no
    /// barrier follows yet.
    unconfirmed: Option<u64>,
    /// The commit the outstanding barrier confirms.
    outstanding: Option<u64>,
    /// UNSUBSCRIBEs of other filters sent on this connection and not yet
    /// answered (see `give_back_moved` in [`super::lane`]). The broker
    /// answers in order; whichever UNSUBACK comes, it proves at least as
    /// much as the barrier's, so the first ones answer these and the last
    /// the barrier.
    pub(super) extra: usize,
    /// How many of those were answered on this connection.
    pub(super) extra_answered: usize,
}

impl AckBarrier {
    /// A new connection: barriers of the old one will never be answered.
    pub(super) fn connected(&mut self, epoch: u64) {
        *self = AckBarrier {
            epoch,
            ..AckBarrier::default()
        };
    }

    /// The ack of a message of commit `gen` went out on connection `epoch`.
    pub(super) fn acked(&mut self, epoch: u64, gen: u64) {
        if epoch == self.epoch && gen > 0 {
            self.unconfirmed = Some(self.unconfirmed.map_or(gen, |g| g.max(gen)));
        }
    }

    /// Whether to send a barrier now through the client of connection
    /// `epoch` (acks went out on this connection that none follows, and
    /// none is outstanding); the barrier then confirms them.
    pub(super) fn send_now(&mut self, epoch: u64) -> bool {
        if epoch != self.epoch || self.outstanding.is_some() || self.unconfirmed.is_none() {
            return false;
        }
        self.outstanding = self.unconfirmed.take();
        true
    }

    /// An UNSUBACK: the connection and commit the barrier confirms, if it
    /// was the barrier's answer.
    pub(super) fn answered(&mut self) -> Option<(u64, u64)> {
        if self.extra > 0 {
            self.extra -= 1;
            self.extra_answered += 1;
            return None;
        }
        self.outstanding.take().map(|gen| (self.epoch, gen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_confirms_exactly_the_acks_sent_before_it_on_its_connection() {
        let mut b = AckBarrier::default();
        b.connected(1);
        assert!(!b.send_now(1), "nothing to confirm");
        b.acked(1, 4);
        b.acked(1, 5);
        assert!(b.send_now(1));
        // Acks of commit 6 go out while the barrier is on its way.
        b.acked(1, 6);
        assert!(!b.send_now(1), "one barrier at a time");
        assert_eq!(b.answered(), Some((1, 5)));
        assert!(b.send_now(1));
        assert_eq!(b.answered(), Some((1, 6)));
        assert_eq!(b.answered(), None);
        // An ack of an earlier connection (it never went out on this one)
        // and a new connection while a barrier is outstanding.
        b.acked(1, 7);
        assert!(b.send_now(1));
        b.connected(2);
        b.acked(1, 8);
        assert_eq!(b.answered(), None, "the old barrier is never answered");
        assert!(!b.send_now(2));
        b.acked(2, 9);
        assert!(
            !b.send_now(1),
            "never through the client of an earlier connection"
        );
        assert!(b.send_now(2));
        assert_eq!(b.answered(), Some((2, 9)));
    }

    #[test]
    fn unsubscribes_of_moved_filters_never_pass_for_the_barriers_answer() {
        // The barrier goes out, then two UNSUBSCRIBEs of moved filters: the
        // first two answers are theirs as far as the barrier knows, the
        // third confirms it (it proves at least as much).
        let mut b = AckBarrier::default();
        b.connected(1);
        b.acked(1, 4);
        assert!(b.send_now(1));
        b.extra += 2;
        assert_eq!(b.answered(), None);
        assert_eq!(b.answered(), None);
        assert_eq!(b.extra_answered, 2);
        assert_eq!(b.answered(), Some((1, 4)));
        // A new connection forgets what the old one had outstanding.
        b.extra += 1;
        b.connected(2);
        assert_eq!((b.extra, b.extra_answered), (0, 0));
    }

    #[test]
    fn the_backoff_starts_over_only_after_a_good_connection() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut r = Reconnect::new();
        let step = |d: Duration| d.as_millis() as u64;
        // Connections that end right after CONNACK: the waits grow.
        let mut waits = Vec::new();
        let mut at = 0;
        for _ in 0..6 {
            r.connected(ms(at));
            let d = r.lost(ms(at + 10), false);
            waits.push(step(d));
            at += 10 + step(d);
        }
        for (w, base) in waits.iter().zip([200, 400, 800, 1600, 3200, 6400]) {
            assert!(*w >= base && *w < base + base / 4, "{waits:?}");
        }
        // A connection that stayed up 30 s starts over.
        r.connected(ms(at));
        let d = r.lost(ms(at) + STABLE_AFTER, false);
        assert!(step(d) < 250, "{d:?}");
        // So does one that delivered a committed message, however short.
        r.lost(ms(at), false);
        r.lost(ms(at), false);
        r.connected(ms(at));
        let d = r.lost(ms(at + 50), true);
        assert!(step(d) < 250, "{d:?}");
        // Failed connection attempts (no CONNACK) keep growing, whatever
        // the connection before them delivered.
        let a = r.lost(ms(at), true);
        let b = r.lost(ms(at), true);
        let c = r.lost(ms(at), true);
        assert!(step(b) >= 800 && step(c) >= 1600, "{a:?} {b:?} {c:?}");
    }

    #[test]
    fn subscriptions_are_sent_on_the_first_connack_and_when_the_session_is_lost() {
        let mut s = Subscriptions::default();
        // The first CONNACK of the process, even with a session present.
        assert!(s.connected(true, 2));
        s.acked(true);
        // A reconnect before both SUBACKs came: again.
        assert!(s.connected(true, 2));
        s.acked(true);
        s.acked(true);
        // Confirmed: a present session keeps them.
        assert!(!s.connected(true, 2));
        assert!(!s.connected(true, 2));
        // The broker lost the session.
        assert!(s.connected(false, 2));
        s.acked(true);
        s.acked(false);
        // A refused filter is asked for again at the next connection.
        assert!(s.connected(true, 2));
    }
}
