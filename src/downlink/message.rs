//! What one Pulsar MESSAGE of the desired topic holds, without I/O: one
//! desired-state update, or several when the fleet's producer batched them
//! (each then with its own key, properties and batch index).

use pulsar::proto::{MessageIdData, MessageMetadata, SingleMessageMetadata};

use crate::store::db::DesiredUpdate;

/// One update and where it stands in the topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub id: MessageIdData,
    pub update: DesiredUpdate,
}

/// The message property that carries the version.
pub const VERSION_PROPERTY: &str = "version";

/// The updates in one message, in order. A batch entry the broker marked
/// compacted out is skipped; a message ferry cannot read (compressed, a
/// broken batch) becomes one update that says why, to be dead-lettered.
pub fn read_message(id: &MessageIdData, metadata: &MessageMetadata, payload: &[u8]) -> Vec<Read> {
    let problem = |why: String| {
        vec![Read {
            id: id.clone(),
            update: DesiredUpdate {
                device: metadata.partition_key.clone(),
                version: property(&metadata.properties),
                payload: bytes::Bytes::new(),
                problem: Some(why),
            },
        }]
    };
    if metadata.compression.unwrap_or(0) != 0 {
        return problem("compressed messages are not read by ferry (the fleet's producer must not compress the desired topic)".into());
    }
    let Some(n) = metadata
        .num_messages_in_batch
        .filter(|_| is_batch(metadata))
    else {
        let payload = if metadata.null_value == Some(true) {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::copy_from_slice(payload)
        };
        return vec![Read {
            id: id.clone(),
            update: DesiredUpdate {
                device: metadata.partition_key.clone(),
                version: property(&metadata.properties),
                payload,
                problem: None,
            },
        }];
    };
    let mut out = Vec::new();
    let mut rest = payload;
    for i in 0..n.max(0) {
        let Some((single, body, next)) = split_entry(rest) else {
            return problem(format!("batch entry {i} of {n} cannot be read"));
        };
        rest = next;
        if single.compacted_out == Some(true) {
            continue;
        }
        let payload = if single.null_value == Some(true) {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::copy_from_slice(body)
        };
        out.push(Read {
            id: MessageIdData {
                batch_index: Some(i),
                batch_size: Some(n),
                ..id.clone()
            },
            update: DesiredUpdate {
                device: single.partition_key.clone(),
                version: property(&single.properties),
                payload,
                problem: None,
            },
        });
    }
    out
}

/// A message is a batch when its producer said how many it holds (a
/// batch of one included).
fn is_batch(m: &MessageMetadata) -> bool {
    m.num_messages_in_batch.is_some()
}

/// One batch entry: a 4-byte size, its metadata, its payload.
fn split_entry(buf: &[u8]) -> Option<(SingleMessageMetadata, &[u8], &[u8])> {
    use prost::Message as _;
    let size = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let meta = buf.get(4..4 + size)?;
    let single = SingleMessageMetadata::decode(meta).ok()?;
    let len = usize::try_from(single.payload_size).ok()?;
    let body = buf.get(4 + size..4 + size + len)?;
    Some((single, body, &buf[4 + size + len..]))
}

fn property(props: &[pulsar::proto::KeyValue]) -> Option<String> {
    props
        .iter()
        .find(|kv| kv.key == VERSION_PROPERTY)
        .map(|kv| kv.value.clone())
}

/// Message ids in topic order: ledger, entry, then batch index (a message
/// that is not a batch entry counts as index -1).
pub fn order(id: &MessageIdData) -> (u64, u64, i32) {
    (id.ledger_id, id.entry_id, id.batch_index.unwrap_or(-1))
}

/// Whether `id` comes after `position` in the topic.
pub fn is_after(id: &MessageIdData, position: &MessageIdData) -> bool {
    order(id) > order(position)
}

/// The position as the store keeps it.
pub fn encode_position(id: &MessageIdData) -> Vec<u8> {
    use prost::Message as _;
    id.encode_to_vec()
}

pub fn decode_position(bytes: &[u8]) -> Option<MessageIdData> {
    use prost::Message as _;
    MessageIdData::decode(bytes).ok()
}

/// The answer GET_LAST_MESSAGE_ID gives for a topic that never held a
/// message (entry -1).
pub fn is_empty_topic(last: &MessageIdData) -> bool {
    last.entry_id == u64::MAX || last.ledger_id == u64::MAX
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use pulsar::proto::KeyValue;

    fn id(entry: u64) -> MessageIdData {
        MessageIdData {
            ledger_id: 9,
            entry_id: entry,
            ..Default::default()
        }
    }

    fn meta(key: &str, version: &str) -> MessageMetadata {
        MessageMetadata {
            partition_key: Some(key.into()),
            properties: vec![KeyValue {
                key: VERSION_PROPERTY.into(),
                value: version.into(),
            }],
            ..Default::default()
        }
    }

    fn entry(key: &str, version: &str, payload: &[u8], compacted_out: bool) -> Vec<u8> {
        let single = SingleMessageMetadata {
            partition_key: Some(key.into()),
            properties: vec![KeyValue {
                key: VERSION_PROPERTY.into(),
                value: version.into(),
            }],
            payload_size: payload.len() as i32,
            compacted_out: compacted_out.then_some(true),
            ..Default::default()
        }
        .encode_to_vec();
        let mut out = (single.len() as u32).to_be_bytes().to_vec();
        out.extend(single);
        out.extend(payload);
        out
    }

    #[test]
    fn a_plain_message_is_one_update_with_its_key_and_version() {
        let r = read_message(&id(4), &meta("pump-1", "7"), b"{\"on\":true}");
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, id(4));
        assert_eq!(r[0].update.device.as_deref(), Some("pump-1"));
        assert_eq!(r[0].update.version.as_deref(), Some("7"));
        assert_eq!(&r[0].update.payload[..], b"{\"on\":true}");
        assert_eq!(r[0].update.problem, None);
        // No key, no version: passed on as such (the store dead-letters).
        let r = read_message(&id(5), &MessageMetadata::default(), b"x");
        assert_eq!(
            (r[0].update.device.clone(), r[0].update.version.clone()),
            (None, None)
        );
    }

    #[test]
    fn a_batch_gives_each_entry_with_its_index_and_skips_what_compaction_removed() {
        let mut payload = entry("a", "1", b"a1", false);
        payload.extend(entry("b", "2", b"b2", true));
        payload.extend(entry("c", "3", b"", false));
        let m = MessageMetadata {
            num_messages_in_batch: Some(3),
            ..Default::default()
        };
        let r = read_message(&id(6), &m, &payload);
        let got: Vec<(i32, String, String, Vec<u8>)> = r
            .iter()
            .map(|r| {
                (
                    r.id.batch_index.unwrap(),
                    r.update.device.clone().unwrap(),
                    r.update.version.clone().unwrap(),
                    r.update.payload.to_vec(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (0, "a".into(), "1".into(), b"a1".to_vec()),
                (2, "c".into(), "3".into(), Vec::new())
            ]
        );
        // A batch cut short is one update that says why.
        let r = read_message(&id(7), &m, &payload[..payload.len() - 5]);
        assert_eq!(r.len(), 1);
        assert!(r[0]
            .update
            .problem
            .as_deref()
            .unwrap()
            .contains("batch entry"));
    }

    #[test]
    fn compressed_messages_are_refused_with_a_reason() {
        let mut m = meta("a", "1");
        m.compression = Some(1);
        let r = read_message(&id(1), &m, b"\x00\x01");
        assert!(r[0]
            .update
            .problem
            .as_deref()
            .unwrap()
            .contains("compressed"));
    }

    #[test]
    fn positions_order_by_ledger_entry_and_batch_index_and_survive_the_store() {
        let batch = |e, i| MessageIdData {
            batch_index: Some(i),
            ..id(e)
        };
        assert!(is_after(&id(5), &id(4)));
        assert!(is_after(&batch(5, 0), &id(5)));
        assert!(is_after(&batch(5, 1), &batch(5, 0)));
        assert!(!is_after(&batch(5, 1), &batch(5, 1)));
        assert!(is_after(
            &id(0),
            &MessageIdData {
                ledger_id: 8,
                entry_id: 99,
                ..Default::default()
            }
        ));
        let p = batch(5, 2);
        assert_eq!(decode_position(&encode_position(&p)), Some(p));
        assert!(is_empty_topic(&MessageIdData {
            ledger_id: u64::MAX,
            entry_id: u64::MAX,
            ..Default::default()
        }));
    }
}
