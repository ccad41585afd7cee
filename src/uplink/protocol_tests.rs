//! One test per command the broker can send, against [`Protocol`] alone:
//! what it sends back, what it reports, and its error paths.

use super::*;
use crate::uplink::error::ErrorClass;
use crate::uplink::producer::ProducerError;
use base64::Engine as _;
use proto::ServerError;
use std::time::Duration;

const TOPIC: &str = "persistent://t/n/status";
const P: u64 = 1;

fn frame(command: BaseCommand) -> Frame {
    Frame {
        command: Box::new(command),
        payload: None,
    }
}

/// An unsigned JWT with these claims (the broker verifies; ferry only reads).
fn jwt(claims: &str) -> Secret {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    Secret::new(format!("{}.{}.sig", b64(r#"{"alg":"none"}"#), b64(claims)))
}

fn connected_frame() -> Frame {
    frame(command(Type::Connected, |c| {
        c.connected = Some(proto::CommandConnected {
            server_version: "4.0.7".into(),
            max_message_size: Some(5 * 1024 * 1024),
            ..Default::default()
        })
    }))
}

/// A state with a token source, connected, with producer `P` on [`TOPIC`].
fn connected() -> Protocol {
    let mut p = Protocol::new(true, TOPIC);
    p.add_producer(P, TOPIC, ProducerState::new(10, usize::MAX));
    p.connect(Some(&jwt(r#"{"sub":"gw-a"}"#)), None);
    p.handle(connected_frame()).unwrap();
    p
}

fn error_frame(request_id: u64, code: ServerError, message: &str) -> Frame {
    frame(command(Type::Error, |c| {
        c.error = Some(proto::CommandError {
            request_id,
            error: code as i32,
            message: message.into(),
        })
    }))
}

fn producer_success(request_id: u64, ready: Option<bool>, last: Option<i64>) -> Frame {
    frame(command(Type::ProducerSuccess, |c| {
        c.producer_success = Some(proto::CommandProducerSuccess {
            request_id,
            producer_name: "ferry-gw-status".into(),
            last_sequence_id: last,
            producer_ready: ready,
            ..Default::default()
        })
    }))
}

/// `connected()` with the producer created and its window open after a
/// broker that holds nothing.
fn producing() -> Protocol {
    let mut p = connected();
    let (id, _) = p.producer(P, "ferry-gw-status").unwrap();
    p.handle(producer_success(id, None, Some(-1))).unwrap();
    assert_eq!(p.open_window(P, -1), Some(0));
    p
}

fn receipt(producer_id: u64, sequence_id: u64) -> Frame {
    frame(command(Type::SendReceipt, |c| {
        c.send_receipt = Some(proto::CommandSendReceipt {
            producer_id,
            sequence_id,
            ..Default::default()
        })
    }))
}

fn event(h: Handled) -> Event {
    assert_eq!(h.reply, None, "no reply expected");
    h.event.expect("an event")
}

fn unsolicited(h: Handled) -> Option<u64> {
    match event(h) {
        Event::Unsolicited { request_id, .. } => request_id,
        e => panic!("expected Unsolicited, got {e:?}"),
    }
}

#[test]
fn connect_carries_the_token_and_asks_for_auth_refresh() {
    let mut p = Protocol::new(true, TOPIC);
    let token = jwt(r#"{"sub":"gw-a"}"#);
    let c = p.connect(Some(&token), Some("pulsar://b2:6650"));
    let c = c.connect.expect("CONNECT");
    assert_eq!(c.auth_method_name.as_deref(), Some("token"));
    assert_eq!(c.auth_data.as_deref(), Some(token.expose().as_bytes()));
    assert_eq!(c.proxy_to_broker_url.as_deref(), Some("pulsar://b2:6650"));
    assert_eq!(c.protocol_version, Some(PROTOCOL_VERSION));
    assert_eq!(
        c.feature_flags.and_then(|f| f.supports_auth_refresh),
        Some(true)
    );
    assert_eq!(p.role().as_deref(), Some("gw-a"));
    // Without a token source: no credentials at all.
    let c = Protocol::new(false, TOPIC).connect(None, None);
    let c = c.connect.unwrap();
    assert_eq!((c.auth_method_name, c.auth_data), (None, None));
}

#[test]
fn connected_completes_the_connection() {
    let mut p = Protocol::new(false, TOPIC);
    p.connect(None, None);
    assert!(!p.is_connected());
    let e = event(p.handle(connected_frame()).unwrap());
    assert_eq!(
        e,
        Event::Connected {
            server_version: "4.0.7".into(),
            max_message_size: Some(5 * 1024 * 1024)
        }
    );
    assert!(p.is_connected());
}

#[test]
fn an_error_before_connected_refuses_the_connection_and_says_the_token_expired() {
    let mut p = Protocol::new(true, TOPIC);
    p.now_secs = || 1_000_100;
    p.connect(Some(&jwt(r#"{"sub":"gw-a","exp":1000000}"#)), None);
    // Any request id: the CONNECT has none.
    let err = p
        .handle(error_frame(0, ServerError::AuthenticationError, "expired"))
        .unwrap_err();
    assert!(
        matches!(&err, UplinkError::AuthRejected { role: Some(r), .. } if r == "gw-a"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "broker rejected the token as role gw-a: expired (the token expired 100 s ago)"
    );
    assert_eq!(err.class(), ErrorClass::NeedsOperator);
    // A token still valid is not called expired.
    p.now_secs = || 999_000;
    p.connect(Some(&jwt(r#"{"sub":"gw-a","exp":1000000}"#)), None);
    let err = p
        .handle(error_frame(0, ServerError::AuthenticationError, "bad"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker rejected the token as role gw-a: bad"
    );
}

#[test]
fn ping_is_answered_with_pong() {
    let mut p = connected();
    let h = p
        .handle(frame(command(Type::Ping, |c| {
            c.ping = Some(proto::CommandPing {})
        })))
        .unwrap();
    let reply = h.reply.expect("a PONG");
    assert_eq!(reply.r#type, Type::Pong as i32);
    assert!(reply.pong.is_some());
    assert_eq!(h.event, None);
}

#[test]
fn pong_is_only_news() {
    let mut p = connected();
    let e = event(
        p.handle(frame(command(Type::Pong, |c| {
            c.pong = Some(proto::CommandPong {})
        })))
        .unwrap(),
    );
    assert_eq!(e, Event::Pong);
    assert_eq!(p.ping().r#type, Type::Ping as i32);
}

fn challenge() -> Frame {
    frame(command(Type::AuthChallenge, |c| {
        c.auth_challenge = Some(proto::CommandAuthChallenge::default())
    }))
}

#[test]
fn an_auth_challenge_is_answered_with_the_current_token() {
    let mut p = connected();
    assert_eq!(event(p.handle(challenge()).unwrap()), Event::AuthChallenge);
    // The caller read the token again: it was rotated meanwhile.
    let rotated = jwt(r#"{"sub":"gw-b"}"#);
    let answer = p.answer_challenge(&rotated);
    assert_eq!(answer.r#type, Type::AuthResponse as i32);
    let data = answer.auth_response.unwrap().response.unwrap();
    assert_eq!(data.auth_method_name.as_deref(), Some("token"));
    assert_eq!(data.auth_data.as_deref(), Some(rotated.expose().as_bytes()));
    assert_eq!(p.challenges(), 1);
    assert_eq!(p.role().as_deref(), Some("gw-b"));
    // A token without a role keeps the one known.
    p.answer_challenge(&Secret::new("opaque"));
    assert_eq!((p.challenges(), p.role().as_deref()), (2, Some("gw-b")));
    // A new connection counts from zero.
    p.connect(None, None);
    assert_eq!(p.challenges(), 0);
}

#[test]
fn an_auth_challenge_without_a_token_source_is_a_refusal() {
    let mut p = Protocol::new(false, TOPIC);
    p.connect(None, None);
    let err = p.handle(challenge()).unwrap_err();
    assert!(
        err.to_string().contains("pulsar.auth is not configured"),
        "{err}"
    );
    assert_eq!(err.class(), ErrorClass::NeedsOperator);
}

fn lookup_response(request_id: u64) -> Frame {
    frame(command(Type::LookupResponse, |c| {
        c.lookup_topic_response = Some(CommandLookupTopicResponse {
            request_id,
            broker_service_url: Some("pulsar://b2:6650".into()),
            ..Default::default()
        })
    }))
}

#[test]
fn a_lookup_response_answers_its_request_once() {
    let mut p = connected();
    let (id, cmd) = p.lookup(TOPIC, true);
    let l = cmd.lookup_topic.unwrap();
    assert_eq!(
        (l.request_id, l.topic.as_str(), l.authoritative),
        (id, TOPIC, Some(true))
    );
    match event(p.handle(lookup_response(id)).unwrap()) {
        Event::LookupAnswer {
            request_id,
            response,
        } => {
            assert_eq!(request_id, id);
            assert_eq!(
                response.broker_service_url.as_deref(),
                Some("pulsar://b2:6650")
            );
        }
        e => panic!("{e:?}"),
    }
    // Answered already, or never asked: ignored.
    assert_eq!(
        unsolicited(p.handle(lookup_response(id)).unwrap()),
        Some(id)
    );
    assert_eq!(
        unsolicited(p.handle(lookup_response(99)).unwrap()),
        Some(99)
    );
}

#[test]
fn producer_success_reports_the_last_sequence_id_and_the_window_waits_for_the_owner() {
    let mut p = connected();
    assert!(p.producer(7, "nobody").is_none(), "an unknown producer");
    let (id, cmd) = p.producer(P, "ferry-gw-status").unwrap();
    let c = cmd.producer.unwrap();
    assert_eq!(
        (c.topic.as_str(), c.producer_id, c.request_id),
        (TOPIC, P, id)
    );
    assert_eq!(c.producer_name.as_deref(), Some("ferry-gw-status"));
    assert_eq!(c.user_provided_producer_name, Some(true));
    // Waiting for exclusive access: the request stays open.
    assert_eq!(
        event(p.handle(producer_success(id, Some(false), None)).unwrap()),
        Event::ProducerWaiting {
            producer_id: P,
            request_id: id
        }
    );
    assert_eq!(
        event(
            p.handle(producer_success(id, Some(true), Some(41)))
                .unwrap()
        ),
        Event::ProducerReady {
            producer_id: P,
            request_id: id,
            last_sequence_id: 41
        }
    );
    // Nothing goes until the owner reconciled the number with its store.
    assert_eq!(p.window(P).unwrap().room(), 0);
    assert_eq!(p.open_window(P, 41), Some(41));
    assert_eq!(p.window(P).unwrap().room(), 10);
    assert_eq!(p.window(P).unwrap().cursor(), 41);
    // A second answer to the same request, or one never asked: ignored.
    assert_eq!(
        unsolicited(p.handle(producer_success(id, None, Some(50))).unwrap()),
        Some(id)
    );
    assert_eq!(p.window(P).unwrap().cursor(), 41);
}

#[test]
fn producer_success_without_a_number_means_the_broker_holds_none() {
    let mut p = connected();
    let (id, _) = p.producer(P, "ferry-gw-status").unwrap();
    match event(p.handle(producer_success(id, None, None)).unwrap()) {
        Event::ProducerReady {
            last_sequence_id, ..
        } => assert_eq!(last_sequence_id, -1),
        e => panic!("{e:?}"),
    }
}

#[test]
fn send_receipts_confirm_in_order_and_a_receipt_not_in_flight_is_an_error() {
    let mut p = producing();
    let t0 = Instant::now();
    let send = p.send(P, 1, 100, t0).unwrap();
    assert_eq!((send.producer_id, send.sequence_id), (P, 1));
    assert_eq!(send.num_messages, Some(1));
    p.send(P, 2, 100, t0).unwrap();
    assert!(p.send(9, 3, 1, t0).is_none(), "an unknown producer");
    assert_eq!(
        event(p.handle(receipt(P, 1)).unwrap()),
        Event::Receipt {
            producer_id: P,
            receipt: Receipt::Confirmed { seq: 1, sent: t0 }
        }
    );
    // A resend the broker deduplicated: nothing changes.
    assert_eq!(
        event(p.handle(receipt(P, 1)).unwrap()),
        Event::Receipt {
            producer_id: P,
            receipt: Receipt::Stale
        }
    );
    // A record that is not the oldest in flight.
    let err = p.handle(receipt(P, 5)).unwrap_err();
    assert!(
        matches!(
            err,
            UplinkError::Producer(ProducerError::UnexpectedReceipt {
                expected: Some(2),
                got: 5
            })
        ),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::Transient);
    // Another producer's receipt is not ours.
    assert_eq!(unsolicited(p.handle(receipt(9, 2)).unwrap()), None);
    assert_eq!(p.window(P).unwrap().confirmed(), 1);
    assert_eq!(p.window(P).unwrap().in_flight(), 1);
}

#[test]
fn a_receipt_that_never_comes_times_out() {
    let mut p = producing();
    let t0 = Instant::now();
    p.send(P, 1, 10, t0).unwrap();
    let limit = Duration::from_secs(5);
    p.check_timeout(P, t0 + limit, limit).unwrap();
    let err = p.check_timeout(P, t0 + limit * 2, limit).unwrap_err();
    assert!(err.to_string().contains("waited more than"), "{err}");
}

#[test]
fn send_error_ends_the_session_with_the_record_named() {
    let mut p = producing();
    p.send(P, 7, 10, Instant::now()).unwrap();
    let send_error = |producer_id| {
        frame(command(Type::SendError, |c| {
            c.send_error = Some(proto::CommandSendError {
                producer_id,
                sequence_id: 7,
                error: ServerError::PersistenceError as i32,
                message: "bookies down".into(),
            })
        }))
    };
    let err = p.handle(send_error(P)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker refused record 7: PersistenceError (bookies down)"
    );
    assert_eq!(err.class(), ErrorClass::Transient);
    assert_eq!(unsolicited(p.handle(send_error(9)).unwrap()), None);
}

#[test]
fn close_producer_shuts_the_window_until_the_producer_is_made_again() {
    let mut p = producing();
    let t0 = Instant::now();
    p.send(P, 1, 10, t0).unwrap();
    p.send(P, 2, 10, t0).unwrap();
    p.handle(receipt(P, 1)).unwrap();
    let close = |producer_id| {
        frame(command(Type::CloseProducer, |c| {
            c.close_producer = Some(proto::CommandCloseProducer {
                producer_id,
                request_id: 3,
            })
        }))
    };
    assert_eq!(
        event(p.handle(close(P)).unwrap()),
        Event::ProducerClosed { producer_id: P }
    );
    let w = p.window(P).unwrap();
    assert_eq!((w.room(), w.in_flight(), w.cursor()), (0, 0, 1));
    // The session turns this into a reconnect at once (backoff_min).
    assert!(matches!(
        crate::uplink::session::ends_session(&Event::ProducerClosed { producer_id: P }),
        Some(UplinkError::ProducerClosed)
    ));
    // After the next PRODUCER_SUCCESS record 2 goes again.
    let (id, _) = p.producer(P, "ferry-gw-status").unwrap();
    p.handle(producer_success(id, None, Some(1))).unwrap();
    assert_eq!(p.open_window(P, 1), Some(1));
    p.send(P, 2, 10, t0).unwrap();
    assert_eq!(p.take_resent(P), 1);
    assert_eq!(unsolicited(p.handle(close(9)).unwrap()), Some(3));
}

#[test]
fn an_error_refuses_the_request_it_answers() {
    let mut p = connected();
    let (lookup, _) = p.lookup(TOPIC, false);
    let err = p
        .handle(error_frame(
            lookup,
            ServerError::AuthorizationError,
            "no lookup",
        ))
        .unwrap_err();
    assert!(
        matches!(&err, UplinkError::NotAuthorized { topic, role: Some(r), .. } if topic == TOPIC && r == "gw-a"),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::NeedsOperator);

    let (producer, _) = p.producer(P, "ferry-gw-status").unwrap();
    let err = p
        .handle(error_frame(
            producer,
            ServerError::TopicTerminatedError,
            "done",
        ))
        .unwrap_err();
    assert!(
        matches!(err, UplinkError::TopicTerminated { .. }),
        "{err:?}"
    );
    assert_eq!(err.class(), ErrorClass::NeedsOperator);

    let (producer, _) = p.producer(P, "ferry-gw-status").unwrap();
    let err = p
        .handle(error_frame(producer, ServerError::ServiceNotReady, "later"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "broker refused producer: ServiceNotReady (later)"
    );
    assert_eq!(err.class(), ErrorClass::Transient);

    // An error about no request of ours is only news.
    assert_eq!(
        event(
            p.handle(error_frame(77, ServerError::UnknownError, "what"))
                .unwrap()
        ),
        Event::BrokerError {
            request_id: 77,
            error: "UnknownError".into(),
            message: "what".into()
        }
    );
}

fn success(request_id: u64) -> Frame {
    frame(command(Type::Success, |c| {
        c.success = Some(proto::CommandSuccess {
            request_id,
            ..Default::default()
        })
    }))
}

#[test]
fn success_answers_a_subscribe() {
    let mut p = connected();
    let (id, cmd) = p.subscribe(
        3,
        "persistent://t/n/desired-gw",
        "ferry-gw",
        SubType::Exclusive,
    );
    let s = cmd.subscribe.unwrap();
    assert_eq!(
        (
            s.consumer_id,
            s.request_id,
            s.sub_type,
            s.subscription.as_str()
        ),
        (3, id, SubType::Exclusive as i32, "ferry-gw")
    );
    assert!(!p.is_subscribed(3));
    assert_eq!(
        event(p.handle(success(id)).unwrap()),
        Event::Subscribed {
            consumer_id: 3,
            request_id: id
        }
    );
    assert!(p.is_subscribed(3));
    assert_eq!(unsolicited(p.handle(success(id)).unwrap()), Some(id));
    let flow = p.flow(3, 100).flow.unwrap();
    assert_eq!((flow.consumer_id, flow.message_permits), (3, 100));
    // A refused SUBSCRIBE names the consumer's topic.
    let (id, _) = p.subscribe(4, "persistent://t/n/other", "ferry-gw", SubType::Failover);
    let err = p
        .handle(error_frame(id, ServerError::AuthorizationError, "no"))
        .unwrap_err();
    assert!(
        matches!(&err, UplinkError::NotAuthorized { topic, .. } if topic == "persistent://t/n/other"),
        "{err:?}"
    );
    // A new connection: subscribe again.
    p.connect(None, None);
    assert!(!p.is_subscribed(3));
}

fn message_id(entry_id: u64) -> MessageIdData {
    MessageIdData {
        ledger_id: 12,
        entry_id,
        ..Default::default()
    }
}

#[test]
fn a_message_is_handed_over_with_its_id_and_metadata() {
    let mut p = connected();
    let (id, _) = p.subscribe(
        3,
        "persistent://t/n/desired-gw",
        "ferry-gw",
        SubType::Exclusive,
    );
    p.handle(success(id)).unwrap();
    let message = |consumer_id, payload: Option<(MessageMetadata, Bytes)>| Frame {
        command: Box::new(command(Type::Message, |c| {
            c.message = Some(proto::CommandMessage {
                consumer_id,
                message_id: message_id(5),
                redelivery_count: Some(2),
                ..Default::default()
            })
        })),
        payload,
    };
    let metadata = MessageMetadata {
        producer_name: "fleet".into(),
        sequence_id: 9,
        partition_key: Some("d1".into()),
        ..Default::default()
    };
    let payload = Bytes::from_static(b"{\"on\":true}");
    assert_eq!(
        event(
            p.handle(message(3, Some((metadata.clone(), payload.clone()))))
                .unwrap()
        ),
        Event::Message {
            consumer_id: 3,
            message_id: message_id(5),
            redelivery_count: 2,
            metadata: Box::new(metadata),
            payload
        }
    );
    let err = p.handle(message(3, None)).unwrap_err();
    assert!(matches!(err, UplinkError::Frame(_)), "{err:?}");
    assert_eq!(unsolicited(p.handle(message(8, None)).unwrap()), None);
}

#[test]
fn an_ack_response_reports_the_ack_it_answers() {
    let mut p = connected();
    p.subscribe(
        3,
        "persistent://t/n/desired-gw",
        "ferry-gw",
        SubType::Exclusive,
    );
    let (id, cmd) = p.ack(3, message_id(5));
    let a = cmd.ack.unwrap();
    assert_eq!((a.consumer_id, a.request_id), (3, Some(id)));
    assert_eq!(a.message_id, vec![message_id(5)]);
    assert_eq!(a.ack_type, AckType::Individual as i32);
    let response = |consumer_id, error: Option<ServerError>| {
        frame(command(Type::AckResponse, |c| {
            c.ack_response = Some(proto::CommandAckResponse {
                consumer_id,
                request_id: Some(id),
                error: error.map(|e| e as i32),
                message: error.map(|_| "not now".to_string()),
                ..Default::default()
            })
        }))
    };
    assert_eq!(
        event(p.handle(response(3, None)).unwrap()),
        Event::AckResponse {
            consumer_id: 3,
            request_id: Some(id),
            error: None
        }
    );
    assert_eq!(
        event(
            p.handle(response(3, Some(ServerError::UnknownError)))
                .unwrap()
        ),
        Event::AckResponse {
            consumer_id: 3,
            request_id: Some(id),
            error: Some(("UnknownError".into(), "not now".into()))
        }
    );
    assert_eq!(unsolicited(p.handle(response(8, None)).unwrap()), Some(id));
}

#[test]
fn close_consumer_means_subscribe_again() {
    let mut p = connected();
    let (id, _) = p.subscribe(
        3,
        "persistent://t/n/desired-gw",
        "ferry-gw",
        SubType::Exclusive,
    );
    p.handle(success(id)).unwrap();
    let close = |consumer_id| {
        frame(command(Type::CloseConsumer, |c| {
            c.close_consumer = Some(proto::CommandCloseConsumer {
                consumer_id,
                request_id: 4,
            })
        }))
    };
    assert_eq!(
        event(p.handle(close(3)).unwrap()),
        Event::ConsumerClosed { consumer_id: 3 }
    );
    assert!(!p.is_subscribed(3));
    assert_eq!(unsolicited(p.handle(close(8)).unwrap()), Some(4));
}

#[test]
fn a_command_ferry_has_no_use_for_is_ignored() {
    let mut p = connected();
    let h = p
        .handle(frame(command(Type::ActiveConsumerChange, |c| {
            c.active_consumer_change = Some(proto::CommandActiveConsumerChange {
                consumer_id: 3,
                is_active: Some(true),
            })
        })))
        .unwrap();
    assert_eq!(
        h.event,
        Some(Event::Unsolicited {
            command: Type::ActiveConsumerChange as i32,
            request_id: None
        })
    );
}

#[test]
fn a_new_connection_forgets_the_requests_of_the_last() {
    let mut p = producing();
    p.send(P, 1, 10, Instant::now()).unwrap();
    let (lookup, _) = p.lookup(TOPIC, false);
    p.connect(None, None);
    assert!(!p.is_connected());
    assert_eq!(p.window(P).unwrap().in_flight(), 0);
    assert_eq!(p.window(P).unwrap().room(), 0);
    p.handle(connected_frame()).unwrap();
    // The old request's answer is no answer now; an error for it is news.
    assert_eq!(
        unsolicited(p.handle(lookup_response(lookup)).unwrap()),
        Some(lookup)
    );
    assert!(matches!(
        event(
            p.handle(error_frame(lookup, ServerError::ServiceNotReady, ""))
                .unwrap()
        ),
        Event::BrokerError { .. }
    ));
}

#[test]
fn a_reader_subscribes_non_durable_from_a_position_on_the_compacted_view() {
    let mut p = connected();
    let (id, cmd) = p.subscribe_with(
        5,
        "persistent://t/n/desired-gw",
        SubscribeOptions {
            name: "ferry-gw-desired".into(),
            durable: false,
            start: Some(message_id(7)),
            read_compacted: true,
            earliest: true,
            consumer_name: Some("ferry-gw".into()),
            ..SubscribeOptions::default()
        },
    );
    let s = cmd.subscribe.unwrap();
    assert_eq!(s.request_id, id);
    assert_eq!(s.durable, Some(false));
    assert_eq!(s.read_compacted, Some(true));
    assert_eq!(s.start_message_id, Some(message_id(7)));
    assert_eq!(
        s.initial_position,
        Some(proto::command_subscribe::InitialPosition::Earliest as i32)
    );
    assert_eq!(s.consumer_name.as_deref(), Some("ferry-gw"));
    // The plain form stays durable, from the end.
    let (_, cmd) = p.subscribe(6, TOPIC, "s", SubType::Shared);
    let s = cmd.subscribe.unwrap();
    assert_eq!((s.durable, s.read_compacted), (Some(true), Some(false)));
}

#[test]
fn get_last_message_id_response_answers_its_request() {
    let mut p = connected();
    p.subscribe(3, "persistent://t/n/desired-gw", "r", SubType::Exclusive);
    let (id, cmd) = p.last_message_id(3);
    let q = cmd.get_last_message_id.unwrap();
    assert_eq!((q.consumer_id, q.request_id), (3, id));
    let answer = |request_id| {
        frame(command(Type::GetLastMessageIdResponse, |c| {
            c.get_last_message_id_response = Some(proto::CommandGetLastMessageIdResponse {
                last_message_id: message_id(41),
                request_id,
                consumer_mark_delete_position: None,
            })
        }))
    };
    assert_eq!(
        event(p.handle(answer(id)).unwrap()),
        Event::LastMessageId {
            consumer_id: 3,
            request_id: id,
            last: message_id(41)
        }
    );
    // Answered once; an answer to nothing asked is ignored.
    assert_eq!(unsolicited(p.handle(answer(id)).unwrap()), Some(id));
    // Refused: the consumer's topic is named.
    let (id, _) = p.last_message_id(3);
    let err = p
        .handle(error_frame(id, ServerError::AuthorizationError, "no"))
        .unwrap_err();
    assert!(
        matches!(&err, UplinkError::NotAuthorized { topic, .. } if topic == "persistent://t/n/desired-gw"),
        "{err:?}"
    );
}
