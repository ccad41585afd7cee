//! The Pulsar client protocol state, without I/O.
//!
//! Every frame the broker sends goes through [`Protocol::handle`], and only
//! there: it returns what to send back (a PONG) and what happened (an
//! [`Event`]), or the classified error that ends the connection. Requests
//! (CONNECT, LOOKUP, PRODUCER, SEND, PING, AUTH_RESPONSE, and for a consumer
//! SUBSCRIBE, FLOW, ACK) are built here too, so that the state knows what
//! each request id asks and which producer and consumer ids exist. The
//! caller owns the socket ([`super::conn::Conn`]), writes what this returns
//! and reads the token when the broker challenges (a file read is I/O):
//! [`Protocol::answer_challenge`] then builds the answer.
//!
//! A producer's window ([`ProducerState`]) lives here across connections:
//! SEND_RECEIPTs are checked against what is in flight, CLOSE_PRODUCER shuts
//! the window, and [`Protocol::open_window`] opens it once the owner has
//! reconciled the broker's `last_sequence_id` with the store (never before:
//! a number the store refuses must change nothing).
//!
//! The consumer side (SUBSCRIBE's SUCCESS, MESSAGE, ACK_RESPONSE,
//! CLOSE_CONSUMER) is recognised and turned into events; what a consumer
//! does with them is its own loop's business.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use pulsar::proto::{
    self, base_command::Type, command_ack::AckType, command_subscribe::SubType, BaseCommand,
    CommandLookupTopicResponse, MessageIdData, MessageMetadata,
};

use super::auth::{self, Secret};
use super::error::{refusal, server_error, Access, UplinkError};
use super::frame::{command, Frame, FrameError};
use super::producer::{ProducerState, Receipt};

/// Pulsar protocol version ferry speaks.
pub const PROTOCOL_VERSION: i32 = 19;

/// What ferry calls itself in CONNECT.
pub fn client_version() -> String {
    format!("ferry/{}", env!("CARGO_PKG_VERSION"))
}

/// What happened, as far as the caller needs to know.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// CONNECTED: the connection is authenticated.
    Connected {
        server_version: String,
        max_message_size: Option<i32>,
    },
    /// A PONG (any frame proves the broker alive; this one only that).
    Pong,
    /// AUTH_CHALLENGE: read the token again and pass it to
    /// [`Protocol::answer_challenge`].
    AuthChallenge,
    /// The answer to a LOOKUP ferry asked.
    LookupAnswer {
        request_id: u64,
        response: CommandLookupTopicResponse,
    },
    /// PRODUCER_SUCCESS with the producer ready: the broker holds records
    /// up to `last_sequence_id` (-1: none). The window opens with
    /// [`Protocol::open_window`].
    ProducerReady {
        producer_id: u64,
        request_id: u64,
        last_sequence_id: i64,
    },
    /// PRODUCER_SUCCESS without the producer ready (waiting for exclusive
    /// access): another PRODUCER_SUCCESS follows.
    ProducerWaiting { producer_id: u64, request_id: u64 },
    /// SEND_RECEIPT, applied to the producer's window.
    Receipt { producer_id: u64, receipt: Receipt },
    /// CLOSE_PRODUCER: the broker dropped the producer (the topic moved,
    /// unloaded); its window is shut. Reconnect and create it again.
    ProducerClosed { producer_id: u64 },
    /// SUCCESS answering a SUBSCRIBE.
    Subscribed { consumer_id: u64, request_id: u64 },
    /// MESSAGE for a consumer.
    Message {
        consumer_id: u64,
        message_id: MessageIdData,
        redelivery_count: u32,
        /// Boxed: it is large, and this event is rare on a producer.
        metadata: Box<MessageMetadata>,
        payload: Bytes,
    },
    /// The answer to GET_LAST_MESSAGE_ID: where the topic ends now.
    LastMessageId {
        consumer_id: u64,
        request_id: u64,
        last: MessageIdData,
    },
    /// ACK_RESPONSE: the broker's answer to an ACK that asked for one;
    /// `error` is the server error's name and message.
    AckResponse {
        consumer_id: u64,
        request_id: Option<u64>,
        error: Option<(String, String)>,
    },
    /// CLOSE_CONSUMER: the broker dropped the subscription's consumer;
    /// subscribe again.
    ConsumerClosed { consumer_id: u64 },
    /// An ERROR that answers no request of this state (logged, nothing
    /// else).
    BrokerError {
        request_id: u64,
        error: String,
        message: String,
    },
    /// A frame about no request, producer or consumer this state knows, or
    /// of a command ferry has no use for: ignored.
    Unsolicited {
        command: i32,
        request_id: Option<u64>,
    },
}

/// How a consumer subscribes.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeOptions {
    pub name: String,
    pub sub_type: SubType,
    /// `false`: a reader's subscription, which the broker forgets when the
    /// consumer goes; `start` says where it begins.
    pub durable: bool,
    /// Where a non-durable subscription starts.
    pub start: Option<MessageIdData>,
    /// Read the compacted view of the topic (the newest message per key
    /// below the compaction horizon, everything above it).
    pub read_compacted: bool,
    /// Without `start`: from the topic's first message, not its end.
    pub earliest: bool,
    pub consumer_name: Option<String>,
}

impl Default for SubscribeOptions {
    fn default() -> SubscribeOptions {
        SubscribeOptions {
            name: String::new(),
            sub_type: SubType::Exclusive,
            durable: true,
            start: None,
            read_compacted: false,
            earliest: false,
            consumer_name: None,
        }
    }
}

/// The outcome of one incoming frame.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Handled {
    /// To send back now.
    pub reply: Option<BaseCommand>,
    pub event: Option<Event>,
}

impl Handled {
    fn event(e: Event) -> Result<Handled, UplinkError> {
        Ok(Handled {
            reply: None,
            event: Some(e),
        })
    }
}

/// A request awaiting its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Lookup { topic: String },
    Producer { producer_id: u64 },
    Subscribe { consumer_id: u64 },
    Ack { consumer_id: u64 },
    LastMessageId { consumer_id: u64 },
}

impl Pending {
    /// What the request was, in refusal messages.
    fn during(&self) -> &'static str {
        match self {
            Pending::Lookup { .. } => "lookup",
            Pending::Producer { .. } => "producer",
            Pending::Subscribe { .. } => "subscribe",
            Pending::Ack { .. } => "ack",
            Pending::LastMessageId { .. } => "last message id",
        }
    }
}

#[derive(Debug)]
struct Producer {
    topic: String,
    window: ProducerState,
}

#[derive(Debug)]
struct Consumer {
    topic: String,
    subscribed: bool,
}

/// The protocol state of one client: one connection at a time, its
/// requests, and the producers and consumers on it.
#[derive(Debug)]
pub struct Protocol {
    /// A token source is configured (a challenge can be answered).
    auth: bool,
    /// The topic this client is about, for messages about the connection.
    topic: String,
    /// CONNECTED arrived on the current connection.
    connected: bool,
    request_id: u64,
    pending: HashMap<u64, Pending>,
    /// The role of the token the connection authenticated with (its
    /// unverified `sub` claim), for messages.
    role: Option<String>,
    /// The token's unverified `exp` claim, to say so when CONNECT is refused.
    token_expires_at: Option<u64>,
    /// AUTH_CHALLENGEs answered on the current connection.
    challenges: u64,
    producers: HashMap<u64, Producer>,
    consumers: HashMap<u64, Consumer>,
    /// The wall clock in seconds since the epoch (tests set it).
    now_secs: fn() -> u64,
    /// What refusals say was refused.
    access: Access,
}

fn system_now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Protocol {
    /// `auth`: a token source is configured; `topic`: what connection
    /// refusals name.
    pub fn new(auth: bool, topic: &str) -> Protocol {
        Protocol {
            auth,
            topic: topic.to_string(),
            connected: false,
            request_id: 0,
            pending: HashMap::new(),
            role: None,
            token_expires_at: None,
            challenges: 0,
            producers: HashMap::new(),
            consumers: HashMap::new(),
            now_secs: system_now_secs,
            access: Access::Produce,
        }
    }

    /// A client that reads its topic: refusals say "consume from".
    pub fn for_reading(mut self) -> Protocol {
        self.access = Access::Consume;
        self
    }

    /// What this client does with its topic.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The role the broker sees (from the token's `sub` claim), if known.
    pub fn role(&self) -> Option<String> {
        self.role.clone()
    }

    /// AUTH_CHALLENGEs answered on the current connection.
    pub fn challenges(&self) -> u64 {
        self.challenges
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn next_request_id(&mut self) -> u64 {
        self.request_id += 1;
        self.request_id
    }

    /// A new connection: forgets the last one (its requests, producers'
    /// windows shut, consumers unsubscribed) and returns its CONNECT, with
    /// `token` and asking a proxy to forward to `proxy_to` if given.
    pub fn connect(&mut self, token: Option<&Secret>, proxy_to: Option<&str>) -> BaseCommand {
        self.on_disconnect();
        self.request_id = 0;
        self.challenges = 0;
        self.role = token.and_then(Secret::role);
        self.token_expires_at = token.and_then(Secret::expires_at);
        command(Type::Connect, |c| {
            c.connect = Some(proto::CommandConnect {
                client_version: client_version(),
                protocol_version: Some(PROTOCOL_VERSION),
                proxy_to_broker_url: proxy_to.map(str::to_string),
                auth_method_name: token.map(|_| auth::METHOD_TOKEN.to_string()),
                auth_data: token.map(|t| t.expose().as_bytes().to_vec()),
                feature_flags: Some(proto::FeatureFlags {
                    supports_auth_refresh: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
    }

    /// The connection is gone: requests are forgotten, every producer's
    /// window shuts (what was in flight is sent again once it reopens),
    /// consumers must subscribe again.
    pub fn on_disconnect(&mut self) {
        self.connected = false;
        self.pending.clear();
        for p in self.producers.values_mut() {
            p.window.on_disconnect();
        }
        for c in self.consumers.values_mut() {
            c.subscribed = false;
        }
    }

    /// The answer to an AUTH_CHALLENGE, with `token` as read again from
    /// its source.
    pub fn answer_challenge(&mut self, token: &Secret) -> BaseCommand {
        self.role = token.role().or(self.role.take());
        self.challenges += 1;
        command(Type::AuthResponse, |c| {
            c.auth_response = Some(proto::CommandAuthResponse {
                client_version: Some(client_version()),
                response: Some(proto::AuthData {
                    auth_method_name: Some(auth::METHOD_TOKEN.into()),
                    auth_data: Some(token.expose().as_bytes().to_vec()),
                }),
                protocol_version: Some(PROTOCOL_VERSION),
            })
        })
    }

    pub fn ping(&self) -> BaseCommand {
        command(Type::Ping, |c| c.ping = Some(proto::CommandPing {}))
    }

    /// A LOOKUP of `topic`; its request id and the command.
    pub fn lookup(&mut self, topic: &str, authoritative: bool) -> (u64, BaseCommand) {
        let request_id = self.next_request_id();
        self.pending.insert(
            request_id,
            Pending::Lookup {
                topic: topic.to_string(),
            },
        );
        let cmd = command(Type::Lookup, |c| {
            c.lookup_topic = Some(proto::CommandLookupTopic {
                topic: topic.to_string(),
                request_id,
                authoritative: Some(authoritative),
                ..Default::default()
            })
        });
        (request_id, cmd)
    }

    /// Makes `producer_id` a producer on `topic` with `window`; it keeps
    /// its window across connections.
    pub fn add_producer(&mut self, producer_id: u64, topic: &str, window: ProducerState) {
        self.producers.insert(
            producer_id,
            Producer {
                topic: topic.to_string(),
                window,
            },
        );
    }

    pub fn has_producer(&self, producer_id: u64) -> bool {
        self.producers.contains_key(&producer_id)
    }

    /// The PRODUCER request that creates `producer_id` (added before) on
    /// this connection, named `name`.
    pub fn producer(&mut self, producer_id: u64, name: &str) -> Option<(u64, BaseCommand)> {
        let topic = self.producers.get(&producer_id)?.topic.clone();
        let request_id = self.next_request_id();
        self.pending
            .insert(request_id, Pending::Producer { producer_id });
        let cmd = command(Type::Producer, |c| {
            c.producer = Some(proto::CommandProducer {
                topic,
                producer_id,
                request_id,
                producer_name: Some(name.to_string()),
                user_provided_producer_name: Some(true),
                ..Default::default()
            })
        });
        Some((request_id, cmd))
    }

    /// The window of `producer_id`.
    pub fn window(&self, producer_id: u64) -> Option<&ProducerState> {
        self.producers.get(&producer_id).map(|p| &p.window)
    }

    /// Opens the window of `producer_id` after its PRODUCER_SUCCESS, once
    /// the owner has reconciled `last_sequence_id` with its records.
    /// Returns the cursor: records above it are to be sent.
    pub fn open_window(&mut self, producer_id: u64, last_sequence_id: i64) -> Option<u64> {
        let p = self.producers.get_mut(&producer_id)?;
        Some(p.window.on_ready(last_sequence_id))
    }

    /// The SEND of record `sequence_id` (`bytes` payload bytes) on
    /// `producer_id`, entered in its window; the caller frames it with the
    /// metadata and payload. `None` for a producer this state does not
    /// know.
    pub fn send(
        &mut self,
        producer_id: u64,
        sequence_id: u64,
        bytes: usize,
        now: Instant,
    ) -> Option<proto::CommandSend> {
        let p = self.producers.get_mut(&producer_id)?;
        p.window.on_send(sequence_id, bytes, now);
        Some(proto::CommandSend {
            producer_id,
            sequence_id,
            num_messages: Some(1),
            ..Default::default()
        })
    }

    /// Counts and returns the resends of `producer_id` since the last call.
    pub fn take_resent(&mut self, producer_id: u64) -> u64 {
        self.producers
            .get_mut(&producer_id)
            .map(|p| p.window.take_resent())
            .unwrap_or(0)
    }

    /// Fails when the oldest send of `producer_id` waited more than `limit`
    /// for its receipt.
    pub fn check_timeout(
        &self,
        producer_id: u64,
        now: Instant,
        limit: std::time::Duration,
    ) -> Result<(), UplinkError> {
        match self.producers.get(&producer_id) {
            Some(p) => Ok(p.window.check_timeout(now, limit)?),
            None => Ok(()),
        }
    }

    /// A SUBSCRIBE of `consumer_id` to `topic` as `subscription`; its
    /// request id and the command. The consumer's messages come as
    /// [`Event::Message`] once the broker has FLOW permits.
    pub fn subscribe(
        &mut self,
        consumer_id: u64,
        topic: &str,
        subscription: &str,
        sub_type: SubType,
    ) -> (u64, BaseCommand) {
        let options = SubscribeOptions {
            name: subscription.to_string(),
            sub_type,
            ..SubscribeOptions::default()
        };
        self.subscribe_with(consumer_id, topic, options)
    }

    /// A SUBSCRIBE with every option ([`SubscribeOptions`]).
    pub fn subscribe_with(
        &mut self,
        consumer_id: u64,
        topic: &str,
        options: SubscribeOptions,
    ) -> (u64, BaseCommand) {
        self.consumers.insert(
            consumer_id,
            Consumer {
                topic: topic.to_string(),
                subscribed: false,
            },
        );
        let request_id = self.next_request_id();
        self.pending
            .insert(request_id, Pending::Subscribe { consumer_id });
        let cmd = command(Type::Subscribe, |c| {
            c.subscribe = Some(proto::CommandSubscribe {
                topic: topic.to_string(),
                subscription: options.name,
                sub_type: options.sub_type as i32,
                consumer_id,
                request_id,
                consumer_name: options.consumer_name,
                durable: Some(options.durable),
                start_message_id: options.start,
                read_compacted: Some(options.read_compacted),
                initial_position: Some(if options.earliest {
                    proto::command_subscribe::InitialPosition::Earliest
                } else {
                    proto::command_subscribe::InitialPosition::Latest
                } as i32),
                ..Default::default()
            })
        });
        (request_id, cmd)
    }

    /// GET_LAST_MESSAGE_ID of `consumer_id`'s topic; its request id and the
    /// command.
    pub fn last_message_id(&mut self, consumer_id: u64) -> (u64, BaseCommand) {
        let request_id = self.next_request_id();
        self.pending
            .insert(request_id, Pending::LastMessageId { consumer_id });
        let cmd = command(Type::GetLastMessageId, |c| {
            c.get_last_message_id = Some(proto::CommandGetLastMessageId {
                consumer_id,
                request_id,
            })
        });
        (request_id, cmd)
    }

    /// Whether `consumer_id`'s SUBSCRIBE succeeded on this connection.
    pub fn is_subscribed(&self, consumer_id: u64) -> bool {
        self.consumers
            .get(&consumer_id)
            .is_some_and(|c| c.subscribed)
    }

    /// FLOW: `consumer_id` takes `permits` more messages.
    pub fn flow(&self, consumer_id: u64, permits: u32) -> BaseCommand {
        command(Type::Flow, |c| {
            c.flow = Some(proto::CommandFlow {
                consumer_id,
                message_permits: permits,
            })
        })
    }

    /// An individual ACK of `message_id` that asks for an ACK_RESPONSE; its
    /// request id and the command.
    pub fn ack(&mut self, consumer_id: u64, message_id: MessageIdData) -> (u64, BaseCommand) {
        let request_id = self.next_request_id();
        self.pending
            .insert(request_id, Pending::Ack { consumer_id });
        let cmd = command(Type::Ack, |c| {
            c.ack = Some(proto::CommandAck {
                consumer_id,
                ack_type: AckType::Individual as i32,
                message_id: vec![message_id],
                request_id: Some(request_id),
                ..Default::default()
            })
        });
        (request_id, cmd)
    }

    /// Handles one frame from the broker: what to send back, what happened,
    /// or the error that ends the connection.
    pub fn handle(&mut self, frame: Frame) -> Result<Handled, UplinkError> {
        let Frame {
            command: c,
            payload,
        } = frame;
        let unsolicited = |request_id: Option<u64>| {
            Handled::event(Event::Unsolicited {
                command: c.r#type,
                request_id,
            })
        };
        if let Some(ok) = c.connected {
            self.connected = true;
            return Handled::event(Event::Connected {
                server_version: ok.server_version,
                max_message_size: ok.max_message_size,
            });
        }
        if c.ping.is_some() {
            return Ok(Handled {
                reply: Some(command(Type::Pong, |c| {
                    c.pong = Some(proto::CommandPong {})
                })),
                event: None,
            });
        }
        if c.pong.is_some() {
            return Handled::event(Event::Pong);
        }
        if c.auth_challenge.is_some() {
            if !self.auth {
                return Err(UplinkError::AuthRejected {
                    message: "broker asks for credentials but pulsar.auth is not configured".into(),
                    role: None,
                });
            }
            return Handled::event(Event::AuthChallenge);
        }
        if let Some(e) = c.error {
            return self.on_error(e);
        }
        if let Some(r) = c.lookup_topic_response {
            let request_id = r.request_id;
            if !matches!(self.pending.get(&request_id), Some(Pending::Lookup { .. })) {
                return unsolicited(Some(request_id));
            }
            self.pending.remove(&request_id);
            return Handled::event(Event::LookupAnswer {
                request_id,
                response: r,
            });
        }
        if let Some(ok) = c.producer_success {
            let request_id = ok.request_id;
            let Some(Pending::Producer { producer_id }) = self.pending.get(&request_id).cloned()
            else {
                return unsolicited(Some(request_id));
            };
            if ok.producer_ready == Some(false) {
                // The request stays pending: its next answer follows.
                return Handled::event(Event::ProducerWaiting {
                    producer_id,
                    request_id,
                });
            }
            self.pending.remove(&request_id);
            return Handled::event(Event::ProducerReady {
                producer_id,
                request_id,
                last_sequence_id: ok.last_sequence_id.unwrap_or(-1),
            });
        }
        if let Some(r) = c.send_receipt {
            let Some(p) = self.producers.get_mut(&r.producer_id) else {
                return unsolicited(None);
            };
            let receipt = p.window.on_receipt(r.sequence_id)?;
            return Handled::event(Event::Receipt {
                producer_id: r.producer_id,
                receipt,
            });
        }
        if let Some(e) = c.send_error {
            if !self.producers.contains_key(&e.producer_id) {
                return unsolicited(None);
            }
            return Err(UplinkError::SendError {
                seq: e.sequence_id,
                error: server_error(e.error),
                message: e.message,
            });
        }
        if let Some(close) = c.close_producer {
            let Some(p) = self.producers.get_mut(&close.producer_id) else {
                return unsolicited(Some(close.request_id));
            };
            p.window.on_disconnect();
            return Handled::event(Event::ProducerClosed {
                producer_id: close.producer_id,
            });
        }
        if let Some(close) = c.close_consumer {
            let Some(consumer) = self.consumers.get_mut(&close.consumer_id) else {
                return unsolicited(Some(close.request_id));
            };
            consumer.subscribed = false;
            return Handled::event(Event::ConsumerClosed {
                consumer_id: close.consumer_id,
            });
        }
        if let Some(ok) = c.success {
            let request_id = ok.request_id;
            let Some(Pending::Subscribe { consumer_id }) = self.pending.get(&request_id).cloned()
            else {
                return unsolicited(Some(request_id));
            };
            self.pending.remove(&request_id);
            if let Some(consumer) = self.consumers.get_mut(&consumer_id) {
                consumer.subscribed = true;
            }
            return Handled::event(Event::Subscribed {
                consumer_id,
                request_id,
            });
        }
        if let Some(m) = c.message {
            if !self.consumers.contains_key(&m.consumer_id) {
                return unsolicited(None);
            }
            let Some((metadata, payload)) = payload else {
                return Err(UplinkError::Frame(FrameError::Malformed(
                    "MESSAGE without a payload",
                )));
            };
            return Handled::event(Event::Message {
                consumer_id: m.consumer_id,
                message_id: m.message_id,
                redelivery_count: m.redelivery_count.unwrap_or(0),
                metadata: Box::new(metadata),
                payload,
            });
        }
        if let Some(r) = c.get_last_message_id_response {
            let request_id = r.request_id;
            let Some(Pending::LastMessageId { consumer_id }) =
                self.pending.get(&request_id).cloned()
            else {
                return unsolicited(Some(request_id));
            };
            self.pending.remove(&request_id);
            return Handled::event(Event::LastMessageId {
                consumer_id,
                request_id,
                last: r.last_message_id,
            });
        }
        if let Some(a) = c.ack_response {
            if !self.consumers.contains_key(&a.consumer_id) {
                return unsolicited(a.request_id);
            }
            if let Some(id) = a.request_id {
                self.pending.remove(&id);
            }
            return Handled::event(Event::AckResponse {
                consumer_id: a.consumer_id,
                request_id: a.request_id,
                error: a
                    .error
                    .map(|code| (server_error(code), a.message.unwrap_or_default())),
            });
        }
        unsolicited(None)
    }

    /// ERROR: before CONNECTED it refuses the connection; for a request
    /// awaiting its answer it refuses that request; otherwise it is news.
    fn on_error(&mut self, e: proto::CommandError) -> Result<Handled, UplinkError> {
        if !self.connected {
            let mut message = e.message;
            if let Some(exp) = self.token_expires_at {
                let now = (self.now_secs)();
                if exp <= now {
                    message.push_str(&format!(" (the token expired {} s ago)", now - exp));
                }
            }
            return Err(refusal(
                "connect",
                e.error,
                message,
                &self.topic,
                self.role(),
                self.access,
            ));
        }
        let Some(pending) = self.pending.remove(&e.request_id) else {
            return Handled::event(Event::BrokerError {
                request_id: e.request_id,
                error: server_error(e.error),
                message: e.message,
            });
        };
        let topic = match &pending {
            Pending::Lookup { topic } => topic.clone(),
            Pending::Producer { producer_id } => self
                .producers
                .get(producer_id)
                .map(|p| p.topic.clone())
                .unwrap_or_default(),
            Pending::Subscribe { consumer_id }
            | Pending::Ack { consumer_id }
            | Pending::LastMessageId { consumer_id } => self
                .consumers
                .get(consumer_id)
                .map(|c| c.topic.clone())
                .unwrap_or_default(),
        };
        Err(refusal(
            pending.during(),
            e.error,
            e.message,
            &topic,
            self.role(),
            self.access,
        ))
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
