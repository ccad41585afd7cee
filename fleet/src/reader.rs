//! A non-durable read of a whole topic, from its first message to the last
//! message id the broker reports when the read starts, in chunks, on the
//! agent's protocol core (`refill` reads every message, `desire` a
//! compacted topic).

use std::time::Duration;

use ferry::downlink::message::{is_after, is_empty_topic};
use ferry::uplink::link::{last_message_id, subscribe, until};
use ferry::uplink::protocol::SubscribeOptions;
use ferry::uplink::{connect_to_topic, Event, Protocol, UplinkError, UplinkSettings};
use pulsar::proto::command_subscribe::SubType;
use pulsar::proto::{MessageIdData, MessageMetadata};

/// The reader's consumer on its own connection.
const CONSUMER_ID: u64 = 1;
/// Messages the broker sends ahead: one chunk.
const CHUNK: u32 = 1_000;
/// A read also ends when the broker has been silent this long before the
/// last message id: that message was removed by compaction (a cleared
/// device's tombstone), so it never comes. Long, because ending early
/// could miss messages.
const QUIET: Duration = Duration::from_secs(10);

/// One message as the broker stored it.
pub struct Stored {
    pub id: MessageIdData,
    pub metadata: Box<MessageMetadata>,
    pub payload: bytes::Bytes,
}

/// A non-durable read of a topic from its start to its last message id (as
/// the broker reports it when the read starts), in chunks.
pub struct Reader<'a> {
    s: &'a UplinkSettings,
    conn: ferry::uplink::conn::Conn,
    proto: Protocol,
    end: MessageIdData,
    ended: bool,
}

impl<'a> Reader<'a> {
    /// Subscribes (a compacted read if `compacted`) and asks where the
    /// topic ends.
    pub async fn open(s: &'a UplinkSettings, compacted: bool) -> Result<Reader<'a>, UplinkError> {
        let mut proto = Protocol::new(s.auth.is_some(), &s.topic).for_reading();
        let mut conn = connect_to_topic(s, &mut proto).await?;
        let options = SubscribeOptions {
            name: format!("{}-{}", s.producer_name, std::process::id()),
            sub_type: SubType::Exclusive,
            durable: false,
            start: None,
            read_compacted: compacted,
            earliest: true,
            consumer_name: Some(s.producer_name.clone()),
        };
        subscribe(&mut conn, &mut proto, s, CONSUMER_ID, options).await?;
        let end = last_message_id(&mut conn, &mut proto, s, CONSUMER_ID).await?;
        Ok(Reader {
            s,
            conn,
            proto,
            ended: is_empty_topic(&end),
            end,
        })
    }

    /// The next messages in order, `None` after the last.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<Stored>>, UplinkError> {
        if self.ended {
            return Ok(None);
        }
        let s = self.s;
        let mut chunk = Vec::new();
        self.conn.push(&self.proto.flow(CONSUMER_ID, CHUNK));
        self.conn.flush().await?;
        while chunk.len() < CHUNK as usize {
            let next = until(&mut self.conn, &mut self.proto, s, |e| match e {
                Event::Message {
                    consumer_id: CONSUMER_ID,
                    message_id,
                    metadata,
                    payload,
                    ..
                } => Some(Ok((message_id, metadata, payload))),
                Event::ConsumerClosed { .. } => {
                    Some(Err(UplinkError::ConsumerClosed(s.topic.clone())))
                }
                _ => None,
            });
            let Ok(next) = tokio::time::timeout(QUIET, next).await else {
                tracing::info!(topic = %s.topic, "read ended quiet before the topic's last message id (compacted away?)");
                self.ended = true;
                break;
            };
            let (id, metadata, payload) = next??;
            let at = MessageIdData {
                batch_index: metadata.num_messages_in_batch.map(|n| n - 1),
                ..id.clone()
            };
            chunk.push(Stored {
                id,
                metadata,
                payload,
            });
            if !is_after(&self.end, &at) {
                self.ended = true;
                break;
            }
        }
        Ok(Some(chunk))
    }
}
