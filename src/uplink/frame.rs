//! Pulsar binary protocol framing, without I/O.
//!
//! A simple command frame is
//! `[total_size u32][command_size u32][BaseCommand]`; a SEND (and a
//! MESSAGE from the broker) carries a payload after the command:
//! `[magic 0x0e01 u16][crc32c u32][metadata_size u32][MessageMetadata][payload]`,
//! where the CRC32C covers everything from `metadata_size` to the end.
//! All integers are big-endian; `total_size` counts everything after itself.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;
use pulsar::proto::{base_command::Type, BaseCommand, CommandSend, MessageMetadata};

/// Magic number that opens the payload part of a frame.
pub const MAGIC_CRC32C: u16 = 0x0e01;

/// The largest frame accepted from the broker (Pulsar's default
/// `maxMessageSize` plus room for the command).
pub const MAX_FRAME_BYTES: usize = 5 * 1024 * 1024 + 64 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("payload checksum mismatch")]
    Checksum,
    #[error("cannot decode protobuf: {0}")]
    Protobuf(String),
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Boxed: a `BaseCommand` holds every command type inline (4.4 KB), and
    /// a frame is moved through several layers on its way in.
    pub command: Box<BaseCommand>,
    pub payload: Option<(MessageMetadata, Bytes)>,
}

/// Builds a `BaseCommand` of one type; `fill` sets its one message.
pub fn command(t: Type, fill: impl FnOnce(&mut BaseCommand)) -> BaseCommand {
    let mut c = BaseCommand {
        r#type: t as i32,
        ..Default::default()
    };
    fill(&mut c);
    c
}

/// Appends a command-only frame to `dst`.
pub fn encode_command(command: &BaseCommand, dst: &mut BytesMut) {
    let cmd_len = command.encoded_len();
    dst.reserve(8 + cmd_len);
    dst.put_u32((4 + cmd_len) as u32);
    dst.put_u32(cmd_len as u32);
    command.encode(dst).expect("reserved enough space");
}

/// `BaseCommand`'s fields a SEND uses: its type and the command itself.
const TAG_TYPE: u32 = 1;
const TAG_SEND: u32 = 6;

/// Appends a SEND frame with its metadata and payload to `dst`. The
/// command is written as the `BaseCommand { type: SEND, send }` it is,
/// field by field: building that struct (every command type inline,
/// 4.4 KB) for each record would cost more than the rest of the frame.
pub fn encode_send(
    send: &CommandSend,
    metadata: &MessageMetadata,
    payload: &[u8],
    dst: &mut BytesMut,
) {
    use prost::encoding::{int32, message};
    let t = Type::Send as i32;
    let cmd_len = int32::encoded_len(TAG_TYPE, &t) + message::encoded_len(TAG_SEND, send);
    let meta_len = metadata.encoded_len();
    let total = 4 + cmd_len + 2 + 4 + 4 + meta_len + payload.len();
    dst.reserve(4 + total);
    dst.put_u32(total as u32);
    dst.put_u32(cmd_len as u32);
    int32::encode(TAG_TYPE, &t, dst);
    message::encode(TAG_SEND, send, dst);
    dst.put_u16(MAGIC_CRC32C);
    let crc_at = dst.len();
    dst.put_u32(0);
    let checked_from = dst.len();
    dst.put_u32(meta_len as u32);
    metadata.encode(dst).expect("reserved enough space");
    dst.put_slice(payload);
    let crc = crc32c::crc32c(&dst[checked_from..]);
    dst[crc_at..crc_at + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Takes one whole frame off the front of `src`, if it holds one.
pub fn decode(src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    if src.len() < 4 {
        return Ok(None);
    }
    let total = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if total > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(total));
    }
    if src.len() < 4 + total {
        src.reserve(4 + total - src.len());
        return Ok(None);
    }
    src.advance(4);
    let mut frame = src.split_to(total).freeze();
    if frame.len() < 4 {
        return Err(FrameError::Malformed("no command size"));
    }
    let cmd_len = frame.get_u32() as usize;
    if cmd_len > frame.len() {
        return Err(FrameError::Malformed("command size beyond frame"));
    }
    // Decoded where it stays (see `Frame::command`).
    let mut command = Box::<BaseCommand>::default();
    command
        .merge(frame.split_to(cmd_len))
        .map_err(|e| FrameError::Protobuf(e.to_string()))?;
    if frame.is_empty() {
        return Ok(Some(Frame {
            command,
            payload: None,
        }));
    }
    if frame.len() < 10 {
        return Err(FrameError::Malformed("payload header truncated"));
    }
    if frame.get_u16() != MAGIC_CRC32C {
        return Err(FrameError::Malformed("unknown payload magic"));
    }
    let crc = frame.get_u32();
    if crc32c::crc32c(&frame) != crc {
        return Err(FrameError::Checksum);
    }
    let meta_len = frame.get_u32() as usize;
    if meta_len > frame.len() {
        return Err(FrameError::Malformed("metadata size beyond frame"));
    }
    let metadata = MessageMetadata::decode(frame.split_to(meta_len))
        .map_err(|e| FrameError::Protobuf(e.to_string()))?;
    Ok(Some(Frame {
        command,
        payload: Some((metadata, frame)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulsar::proto::{CommandPing, KeyValue};
    use tokio_util::codec::Decoder;

    fn send_frame() -> (BaseCommand, MessageMetadata, Vec<u8>) {
        let command = BaseCommand {
            r#type: Type::Send as i32,
            send: Some(CommandSend {
                producer_id: 3,
                sequence_id: 42,
                num_messages: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        let metadata = MessageMetadata {
            producer_name: "ferry-gw-1".into(),
            sequence_id: 42,
            publish_time: 1_700_000_000_000,
            partition_key: Some("sensor-7".into()),
            properties: vec![KeyValue {
                key: "gateway".into(),
                value: "gw-1".into(),
            }],
            ..Default::default()
        };
        (command, metadata, b"{\"t\":21.5}".to_vec())
    }

    /// [`send_frame`] framed by [`encode_send`].
    fn encoded(command: &BaseCommand, metadata: &MessageMetadata, payload: &[u8]) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_send(command.send.as_ref().unwrap(), metadata, payload, &mut buf);
        buf
    }

    #[test]
    fn sizes_and_checksum_follow_the_spec() {
        let (command, metadata, payload) = send_frame();
        let buf = encoded(&command, &metadata, &payload);
        let cmd_len = command.encoded_len();
        let meta_len = metadata.encoded_len();
        assert_eq!(
            buf.len(),
            4 + 4 + cmd_len + 2 + 4 + 4 + meta_len + payload.len()
        );
        assert_eq!(
            u32::from_be_bytes(buf[0..4].try_into().unwrap()) as usize,
            buf.len() - 4
        );
        assert_eq!(
            u32::from_be_bytes(buf[4..8].try_into().unwrap()) as usize,
            cmd_len
        );
        let at = 8 + cmd_len;
        assert_eq!(&buf[at..at + 2], &[0x0e, 0x01]);
        let crc = u32::from_be_bytes(buf[at + 2..at + 6].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&buf[at + 6..]));
        // CRC32C (Castagnoli) check value from the RFC 3720 test vectors.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_send_is_written_as_the_base_command_it_is() {
        let (command, metadata, payload) = send_frame();
        let buf = encoded(&command, &metadata, &payload);
        let cmd_len = command.encoded_len();
        assert_eq!(&buf[8..8 + cmd_len], &command.encode_to_vec()[..]);
    }

    #[test]
    fn the_pulsar_crate_decodes_our_send_frame() {
        let (command, metadata, payload) = send_frame();
        let mut buf = encoded(&command, &metadata, &payload);
        let msg = pulsar::message::Codec
            .decode(&mut buf)
            .unwrap()
            .expect("one whole frame");
        assert_eq!(msg.command, command);
        let p = msg.payload.expect("payload");
        assert_eq!(p.metadata, metadata);
        assert_eq!(p.data, payload);
        assert!(buf.is_empty());
    }

    #[test]
    fn decode_round_trips_and_waits_for_whole_frames() {
        let (command, metadata, payload) = send_frame();
        let ping = BaseCommand {
            r#type: Type::Ping as i32,
            ping: Some(CommandPing {}),
            ..Default::default()
        };
        let mut all = BytesMut::new();
        encode_command(&ping, &mut all);
        all.extend_from_slice(&encoded(&command, &metadata, &payload));
        // Feed one byte at a time: nothing decodes until a frame is whole.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in all.iter() {
            buf.put_u8(*b);
            while let Some(f) = decode(&mut buf).unwrap() {
                frames.push(f);
            }
        }
        assert_eq!(frames.len(), 2);
        assert_eq!(*frames[0].command, ping);
        assert_eq!(frames[0].payload, None);
        let (m, p) = frames[1].payload.clone().unwrap();
        assert_eq!((m, p.to_vec()), (metadata, payload));
    }

    #[test]
    fn a_corrupted_payload_is_refused() {
        let (command, metadata, payload) = send_frame();
        let mut buf = encoded(&command, &metadata, &payload);
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert_eq!(decode(&mut buf), Err(FrameError::Checksum));
    }

    #[test]
    fn an_oversized_frame_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(matches!(decode(&mut buf), Err(FrameError::TooLarge(_))));
    }
}
