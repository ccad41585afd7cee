//! Batched acknowledgements: the PUBACKs of a whole commit in one write.
//!
//! rumqttc writes and flushes every manual acknowledgement on its own: a
//! syscall in ferry and a read in the broker per message. rumqttc keeps no
//! state for the acknowledgement of an incoming QoS 1 message (with manual
//! acks it only encodes the PUBACK), so ferry writes them itself: the
//! guard's relay of a connection (which carries every byte rumqttc sends
//! upstream) owns an [`AckLine`], takes the packet ids of committed messages
//! from it and writes their PUBACKs in one run, between two of rumqttc's
//! packets. Only the acknowledgements of one connection go on its line
//! (`send_acks` in the lane checks the epoch, as before).
//!
//! Order: the acknowledgement barrier (an UNSUBSCRIBE rumqttc sends after
//! the acks of a commit were handed over) must reach the broker after those
//! acks. The relay takes every ack handed over before it writes the next
//! bytes rumqttc wrote, and puts them before the first packet that starts
//! in those bytes ([`UpFramer`] finds where packets start): acks handed over
//! before the barrier was written go before it.

use tokio::sync::mpsc;

/// A PUBACK: fixed header, remaining length 2, packet id.
const PUBACK_LEN: usize = 4;

/// Hands packet ids to one connection's relay.
#[derive(Clone, Debug)]
pub struct AckLine {
    tx: mpsc::UnboundedSender<Vec<u16>>,
}

/// The relay's end of an [`AckLine`].
pub struct AckTaker {
    rx: mpsc::UnboundedReceiver<Vec<u16>>,
}

pub fn ack_line() -> (AckLine, AckTaker) {
    let (tx, rx) = mpsc::unbounded_channel();
    (AckLine { tx }, AckTaker { rx })
}

impl AckLine {
    /// Hands over the acks of `pkids`; false when the connection is gone
    /// (the broker redelivers those messages, and they are acked then).
    pub fn send(&self, pkids: Vec<u16>) -> bool {
        pkids.is_empty() || self.tx.send(pkids).is_ok()
    }
}

impl AckTaker {
    /// Waits for acks and appends their PUBACKs to `out`; false once no
    /// line is left to send any.
    pub async fn take(&mut self, out: &mut Vec<u8>) -> bool {
        match self.rx.recv().await {
            Some(pkids) => {
                encode(&pkids, out);
                self.take_ready(out);
                true
            }
            None => false,
        }
    }

    /// Appends the PUBACKs of every ack already handed over to `out`.
    pub fn take_ready(&mut self, out: &mut Vec<u8>) {
        while let Ok(pkids) = self.rx.try_recv() {
            encode(&pkids, out);
        }
    }
}

fn encode(pkids: &[u16], out: &mut Vec<u8>) {
    out.reserve(pkids.len() * PUBACK_LEN);
    for p in pkids {
        let [hi, lo] = p.to_be_bytes();
        out.extend_from_slice(&[0x40, 0x02, hi, lo]);
    }
}

/// Where MQTT packets start in the bytes a client sends (fixed header,
/// remaining length, body), without I/O.
#[derive(Debug, Default)]
pub struct UpFramer {
    state: Up,
}

#[derive(Debug, Default, Clone, Copy)]
enum Up {
    /// The next byte starts a packet.
    #[default]
    Start,
    /// In the remaining length: its value so far and the next shift.
    Length { value: usize, shift: u32 },
    /// In the body: bytes left.
    Body(usize),
}

impl UpFramer {
    /// True when the next byte starts a packet.
    pub fn at_start(&self) -> bool {
        matches!(self.state, Up::Start)
    }

    /// Follows `chunk` (the next bytes of the stream) and returns the offset
    /// of the first packet start in it (`chunk.len()` when the chunk ends a
    /// packet), if any.
    pub fn first_start(&mut self, chunk: &[u8]) -> Option<usize> {
        let mut first = self.at_start().then_some(0);
        let mut i = 0;
        while i < chunk.len() {
            match self.state {
                Up::Start => {
                    self.state = Up::Length { value: 0, shift: 0 };
                    i += 1;
                }
                Up::Length { value, shift } => {
                    let b = chunk[i];
                    i += 1;
                    let value = value | ((b & 0x7f) as usize) << shift;
                    self.state = if b & 0x80 != 0 && shift < 21 {
                        Up::Length {
                            value,
                            shift: shift + 7,
                        }
                    } else if value == 0 {
                        Up::Start
                    } else {
                        Up::Body(value)
                    };
                }
                Up::Body(left) => {
                    let n = left.min(chunk.len() - i);
                    i += n;
                    self.state = if n == left {
                        Up::Start
                    } else {
                        Up::Body(left - n)
                    };
                }
            }
            if first.is_none() && self.at_start() {
                first = Some(i);
            }
        }
        first
    }
}

/// Writes `chunk` with the pending acks put before its first packet start;
/// what cannot go yet (no packet starts in the chunk) stays in `pending`.
pub fn splice(framer: &mut UpFramer, chunk: &[u8], pending: &mut Vec<u8>, out: &mut Vec<u8>) {
    out.clear();
    match framer.first_start(chunk) {
        Some(at) if !pending.is_empty() => {
            out.extend_from_slice(&chunk[..at]);
            out.append(pending);
            out.extend_from_slice(&chunk[at..]);
        }
        _ => out.extend_from_slice(chunk),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{Packet, Subscribe, Unsubscribe};

    fn bytes_of(packets: Vec<Packet>) -> Vec<u8> {
        let mut out = bytes::BytesMut::new();
        for p in packets {
            p.write(&mut out, 1 << 20).unwrap();
        }
        out.to_vec()
    }

    fn parse_all(mut bytes: &[u8]) -> Vec<Packet> {
        let mut buf = bytes::BytesMut::from(std::mem::take(&mut bytes));
        let mut packets = Vec::new();
        while !buf.is_empty() {
            packets.push(Packet::read(&mut buf, 1 << 20).unwrap());
        }
        packets
    }

    /// rumqttc's packets, one of them longer than a read.
    fn client_stream() -> Vec<u8> {
        bytes_of(vec![
            Packet::PingReq,
            Packet::Subscribe(Subscribe::new(
                "a/".repeat(300) + "x",
                rumqttc::QoS::AtLeastOnce,
            )),
            Packet::Unsubscribe(Unsubscribe::new("$ferry/ack-barrier")),
            Packet::PingReq,
        ])
    }

    #[test]
    fn acks_go_between_packets_however_the_reads_split_them() {
        let stream = client_stream();
        for chunk in [1, 2, 3, 7, 100, 611, 4096] {
            let mut framer = UpFramer::default();
            let (mut wire, mut out, mut pending) = (Vec::new(), Vec::new(), Vec::new());
            let parts = stream.chunks(chunk).count();
            for (i, part) in stream.chunks(chunk).enumerate() {
                encode(&[i as u16], &mut pending);
                splice(&mut framer, part, &mut pending, &mut out);
                wire.extend_from_slice(&out);
            }
            assert!(
                pending.is_empty(),
                "the stream ends a packet: every ack went out"
            );
            let packets = parse_all(&wire);
            let (acks, others): (Vec<_>, Vec<_>) = packets
                .into_iter()
                .partition(|p| matches!(p, Packet::PubAck(_)));
            assert_eq!(others, parse_all(&stream), "chunk {chunk}");
            let ids: Vec<u16> = acks
                .iter()
                .map(|p| match p {
                    Packet::PubAck(a) => a.pkid,
                    _ => unreachable!(),
                })
                .collect();
            assert_eq!(ids, (0..parts as u16).collect::<Vec<_>>(), "chunk {chunk}");
        }
    }

    #[test]
    fn acks_handed_over_before_the_barrier_reach_the_broker_before_it() {
        // The relay read half of a SUBSCRIBE; then acks were handed over and
        // the barrier written: the acks go after the SUBSCRIBE, before the
        // UNSUBSCRIBE.
        let sub = bytes_of(vec![Packet::Subscribe(Subscribe::new(
            "t/#",
            rumqttc::QoS::AtLeastOnce,
        ))]);
        let unsub = bytes_of(vec![Packet::Unsubscribe(Unsubscribe::new("b"))]);
        let mut framer = UpFramer::default();
        let (mut wire, mut out, mut pending) = (Vec::new(), Vec::new(), Vec::new());
        splice(&mut framer, &sub[..3], &mut pending, &mut out);
        wire.extend_from_slice(&out);
        encode(&[7, 8], &mut pending);
        let mut rest = sub[3..].to_vec();
        rest.extend_from_slice(&unsub);
        splice(&mut framer, &rest, &mut pending, &mut out);
        wire.extend_from_slice(&out);
        assert!(pending.is_empty());
        let kinds: Vec<_> = parse_all(&wire)
            .into_iter()
            .map(|p| match p {
                Packet::Subscribe(_) => "sub".to_string(),
                Packet::PubAck(a) => format!("ack{}", a.pkid),
                Packet::Unsubscribe(_) => "unsub".to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["sub", "ack7", "ack8", "unsub"]);
    }

    #[test]
    fn a_packet_of_remaining_length_zero_and_long_lengths_frame_right() {
        let mut framer = UpFramer::default();
        // PINGREQ: two bytes, then a start.
        assert_eq!(framer.first_start(&[0xC0]), Some(0));
        assert!(!framer.at_start());
        assert_eq!(framer.first_start(&[0x00]), Some(1));
        // A body of 200 bytes (length 0xC8 0x01).
        let mut p = vec![0x82, 0xC8, 0x01];
        p.extend(std::iter::repeat_n(0u8, 200));
        assert_eq!(framer.first_start(&p[..100]), Some(0));
        assert!(!framer.at_start());
        assert_eq!(framer.first_start(&p[100..]), Some(103));
        assert!(framer.at_start());
    }

    #[tokio::test]
    async fn a_line_whose_relay_is_gone_refuses_acks() {
        let (line, mut taker) = ack_line();
        assert!(line.send(vec![1, 2]));
        let mut out = Vec::new();
        assert!(taker.take(&mut out).await);
        assert_eq!(out, [0x40, 2, 0, 1, 0x40, 2, 0, 2]);
        drop(taker);
        assert!(!line.send(vec![3]));
    }
}
