//! Finding the broker that serves a topic: LOOKUP on the service URL,
//! following redirects (at most [`MAX_REDIRECTS`]), connecting directly or
//! through the proxy as told. What one answer means is decided without I/O
//! ([`lookup_step`]); ferry never leaves TLS on the way.

use pulsar::proto::{self, command_lookup_topic_response::LookupType};

use super::conn::{Conn, Endpoint};
use super::error::{is_refusal, refusal, server_error, Access, UplinkError};
use super::link::{open, until, within};
use super::protocol::{Event, Protocol};
use super::settings::UplinkSettings;
use crate::config::parse_service_url;

/// Lookups may redirect this many times before ferry gives up.
pub const MAX_REDIRECTS: usize = 8;

/// Connects to the broker that serves the topic: LOOKUP on the service URL,
/// following redirects, connecting directly or through a proxy as told.
///
/// `proto` is the protocol state of the connection returned (each new
/// connection starts it over with its CONNECT).
pub async fn connect_to_topic(
    s: &UplinkSettings,
    proto: &mut Protocol,
) -> Result<Conn, UplinkError> {
    let mut conn = open(s.service.clone(), None, s, proto).await?;
    let mut authoritative = false;
    for _ in 0..MAX_REDIRECTS {
        let (request_id, lookup) = proto.lookup(&s.topic, authoritative);
        conn.push(&lookup);
        conn.flush().await?;
        let answer = until(&mut conn, proto, s, |e| match e {
            Event::LookupAnswer {
                request_id: id,
                response,
            } if id == request_id => Some(response),
            _ => None,
        });
        let r = within(s.operation_timeout(), "lookup", answer).await?;
        let step = lookup_step(s, r, proto.role()).map_err(|e| e.with_access(proto.access()))?;
        match step.route {
            Route::Proxy(url) => {
                // Keep talking to the service URL; the proxy forwards to `url`.
                let next = open(s.service.clone(), Some(&url), s, proto).await?;
                if step.serves_topic {
                    return Ok(next);
                }
                conn = next;
            }
            Route::Direct(target) => {
                if step.serves_topic && target == conn.endpoint {
                    return Ok(conn);
                }
                conn = open(target, None, s, proto).await?;
                if step.serves_topic {
                    return Ok(conn);
                }
            }
        }
        authoritative = step.authoritative;
    }
    Err(UplinkError::TooManyRedirects(s.topic.clone()))
}

/// Where a lookup answer sends the uplink next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A connection of its own to this broker.
    Direct(Endpoint),
    /// The connection to the service URL, through the proxy there, which
    /// forwards to the broker this URL names.
    Proxy(String),
}

/// What one LOOKUP answer means, decided without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupStep {
    pub route: Route,
    /// The broker on `route` serves the topic (CONNECT); otherwise look up
    /// again there (REDIRECT).
    pub serves_topic: bool,
    /// Passed on with the next lookup after a redirect.
    pub authoritative: bool,
}

/// Reads a LOOKUP answer: a refusal, a redirect or the broker to produce
/// on, directly or through the proxy. `role` names the token's role in
/// refusals.
///
/// Ferry never leaves TLS once `pulsar.service_url` is `pulsar+ssl://`: a
/// direct connection must go to the answer's `broker_service_url_tls`, and
/// that must be a `pulsar+ssl://` URL; a plaintext URL there, or only a
/// plaintext `broker_service_url`, is a misconfigured cluster
/// ([`UplinkError::TlsDowngrade`]), never a reason to send the token and
/// the records in the clear. Through a proxy, ferry's connection stays the
/// one to the service URL; the URL only tells the proxy which broker to
/// forward to (a Pulsar proxy puts the one URL it reaches the broker by in
/// both fields, TLS or not: how it gets there is the proxy's part).
pub fn lookup_step(
    s: &UplinkSettings,
    r: proto::CommandLookupTopicResponse,
    role: Option<String>,
) -> Result<LookupStep, UplinkError> {
    let kind = LookupType::try_from(r.response.unwrap_or(0)).unwrap_or(LookupType::Failed);
    if kind == LookupType::Failed {
        return Err(match r.error {
            Some(code) if is_refusal(code) => refusal(
                "lookup",
                code,
                r.message.unwrap_or_default(),
                &s.topic,
                role,
                Access::Produce,
            ),
            code => UplinkError::Lookup {
                topic: s.topic.clone(),
                error: code.map(server_error).unwrap_or_default(),
                message: r.message.unwrap_or_default(),
            },
        });
    }
    let given = |u: Option<String>| u.filter(|u| !u.is_empty());
    let (plain_url, tls_url) = (given(r.broker_service_url), given(r.broker_service_url_tls));
    let no_url = || UplinkError::NoBrokerUrl(s.topic.clone());
    let route = if r.proxy_through_service_url.unwrap_or(false) {
        let url = if s.service.tls {
            tls_url.or(plain_url)
        } else {
            plain_url.or(tls_url)
        };
        Route::Proxy(url.ok_or_else(no_url)?)
    } else {
        // The URL of ferry's own scheme; the other one only to say why not.
        let (url, other) = if s.service.tls {
            (tls_url, plain_url)
        } else {
            (plain_url, tls_url)
        };
        let url = url.or(other).ok_or_else(no_url)?;
        let (host, port, tls) =
            parse_service_url(&url).map_err(|_| UplinkError::BadBrokerUrl(url.clone()))?;
        match (s.service.tls, tls) {
            (true, false) => {
                return Err(UplinkError::TlsDowngrade {
                    topic: s.topic.clone(),
                    url,
                })
            }
            (false, true) => {
                return Err(UplinkError::TlsNotConfigured {
                    topic: s.topic.clone(),
                    url,
                })
            }
            _ => Route::Direct(Endpoint { host, port, tls }),
        }
    };
    Ok(LookupStep {
        route,
        serves_topic: kind == LookupType::Connect,
        authoritative: r.authoritative.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::error::ErrorClass;
    use crate::uplink::testing::*;
    use proto::{CommandConnect, CommandLookupTopicResponse};
    use std::time::Duration;

    /// [`connect_to_topic`] with a protocol state of its own.
    async fn connect(s: &UplinkSettings) -> Result<Conn, UplinkError> {
        connect_to_topic(s, &mut Protocol::new(s.auth.is_some(), &s.topic)).await
    }

    #[tokio::test]
    async fn a_lookup_redirect_is_followed_to_the_owning_broker() {
        let (owner, mut owner_seen) = fake_broker(Box::new(|l, me| {
            lookup_reply(
                l,
                LookupType::Connect,
                format!("pulsar://127.0.0.1:{me}"),
                true,
                false,
            )
        }))
        .await;
        let (service, _) = fake_broker(Box::new(move |l, _| {
            lookup_reply(
                l,
                LookupType::Redirect,
                format!("pulsar://127.0.0.1:{owner}"),
                true,
                false,
            )
        }))
        .await;
        let conn = connect(&settings(service)).await.unwrap();
        assert_eq!(conn.endpoint.port, owner);
        let mut lookups = Vec::new();
        while let Ok(c) = owner_seen.try_recv() {
            lookups.extend(c.lookup_topic);
        }
        assert_eq!(lookups.len(), 1);
        assert_eq!(
            lookups[0].authoritative,
            Some(true),
            "the redirect's authority is passed on"
        );
    }

    #[tokio::test]
    async fn a_lookup_that_asks_for_the_proxy_keeps_the_service_url() {
        let (service, mut seen) = fake_broker(Box::new(|l, _| {
            lookup_reply(
                l,
                LookupType::Connect,
                "pulsar://10.1.2.3:6650".into(),
                false,
                true,
            )
        }))
        .await;
        let conn = connect(&settings(service)).await.unwrap();
        assert_eq!(conn.endpoint.port, service);
        let mut connects: Vec<CommandConnect> = Vec::new();
        while let Ok(c) = seen.try_recv() {
            connects.extend(c.connect);
        }
        assert_eq!(connects.len(), 2);
        assert_eq!(connects[0].proxy_to_broker_url, None);
        assert_eq!(
            connects[1].proxy_to_broker_url.as_deref(),
            Some("pulsar://10.1.2.3:6650")
        );
        assert_eq!(
            connects[1]
                .feature_flags
                .as_ref()
                .and_then(|f| f.supports_auth_refresh),
            Some(true)
        );
    }

    fn tls_settings() -> UplinkSettings {
        let mut s = settings(6651);
        s.service = Endpoint {
            host: "pulsar.example".into(),
            port: 6651,
            tls: true,
        };
        s
    }

    /// A lookup answer with both URLs as given.
    fn answer(
        kind: LookupType,
        plain: Option<&str>,
        tls: Option<&str>,
        proxy: bool,
    ) -> CommandLookupTopicResponse {
        CommandLookupTopicResponse {
            broker_service_url: plain.map(str::to_string),
            broker_service_url_tls: tls.map(str::to_string),
            response: Some(kind as i32),
            request_id: 1,
            authoritative: Some(true),
            proxy_through_service_url: Some(proxy),
            ..Default::default()
        }
    }

    fn direct(host: &str, port: u16, tls: bool) -> Route {
        Route::Direct(Endpoint {
            host: host.into(),
            port,
            tls,
        })
    }

    #[test]
    fn a_lookup_answer_redirects_or_names_the_broker_of_the_same_scheme() {
        use LookupType::{Connect, Redirect};
        let plain = settings(6650);
        let step = lookup_step(
            &plain,
            answer(
                Redirect,
                Some("pulsar://b2:6650"),
                Some("pulsar+ssl://b2:6651"),
                false,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            step,
            LookupStep {
                route: direct("b2", 6650, false),
                serves_topic: false,
                authoritative: true
            }
        );
        let step = lookup_step(
            &plain,
            answer(Connect, Some("pulsar://b2:6650"), None, false),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (direct("b2", 6650, false), true)
        );

        let tls = tls_settings();
        let step = lookup_step(
            &tls,
            answer(
                Redirect,
                Some("pulsar://b2:6650"),
                Some("pulsar+ssl://b2:6651"),
                false,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (direct("b2", 6651, true), false)
        );
        let step = lookup_step(
            &tls,
            answer(
                Connect,
                Some("pulsar://b2:6650"),
                Some("pulsar+ssl://b2:6651"),
                false,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (direct("b2", 6651, true), true)
        );
    }

    #[test]
    fn a_lookup_answer_through_the_proxy_keeps_the_service_connection() {
        use LookupType::{Connect, Redirect};
        let step = lookup_step(
            &settings(6650),
            answer(Connect, Some("pulsar://10.1.2.3:6650"), None, true),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (Route::Proxy("pulsar://10.1.2.3:6650".into()), true)
        );
        // A Pulsar proxy puts the one URL it reaches the broker by in both
        // fields; ferry's own connection stays TLS to the proxy.
        let step = lookup_step(
            &tls_settings(),
            answer(
                Connect,
                Some("pulsar://10.1.2.3:6650"),
                Some("pulsar://10.1.2.3:6650"),
                true,
            ),
            None,
        )
        .unwrap();
        assert_eq!(step.route, Route::Proxy("pulsar://10.1.2.3:6650".into()));
        let step = lookup_step(
            &tls_settings(),
            answer(
                Redirect,
                Some("pulsar://10.1.2.3:6650"),
                Some("pulsar+ssl://10.1.2.3:6651"),
                true,
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            (step.route, step.serves_topic),
            (Route::Proxy("pulsar+ssl://10.1.2.3:6651".into()), false)
        );
    }

    #[test]
    fn a_lookup_answer_never_switches_tls_off() {
        use LookupType::{Connect, Redirect};
        let tls = tls_settings();
        for (kind, plain, tls_url) in [
            // The TLS field names a plaintext broker.
            (Connect, Some("pulsar://b2:6650"), Some("pulsar://b2:6650")),
            (Redirect, None, Some("pulsar://b2:6650")),
            // No TLS field, only the plaintext one.
            (Connect, Some("pulsar://b2:6650"), None),
            (Redirect, Some("pulsar://b2:6650"), Some("")),
        ] {
            let err = lookup_step(&tls, answer(kind, plain, tls_url, false), None)
                .expect_err("a plaintext broker is refused");
            assert!(
                matches!(&err, UplinkError::TlsDowngrade { url, .. } if url == "pulsar://b2:6650"),
                "{kind:?} {plain:?} {tls_url:?}: {err:?}"
            );
            assert_eq!(err.class(), ErrorClass::NeedsOperator);
            assert!(err.to_string().contains("never leaves TLS"), "{err}");
        }
        // Without TLS settings ferry cannot verify a TLS broker either.
        let err = lookup_step(
            &settings(6650),
            answer(Connect, None, Some("pulsar+ssl://b2:6651"), false),
            None,
        )
        .expect_err("no TLS settings");
        assert!(
            matches!(err, UplinkError::TlsNotConfigured { .. }),
            "{err:?}"
        );
        assert_eq!(err.class(), ErrorClass::NeedsOperator);
    }

    #[test]
    fn a_lookup_answer_without_a_usable_url_is_an_error() {
        use LookupType::Connect;
        for (s, a) in [
            (settings(6650), answer(Connect, None, None, false)),
            (settings(6650), answer(Connect, Some(""), None, false)),
            (tls_settings(), answer(Connect, None, None, false)),
            (settings(6650), answer(Connect, None, None, true)),
            (tls_settings(), answer(Connect, None, None, true)),
        ] {
            let err = lookup_step(&s, a, None).expect_err("no url");
            assert!(matches!(err, UplinkError::NoBrokerUrl(_)), "{err:?}");
        }
        for url in [
            "http://b2:8080",
            "pulsar://b2:notaport",
            "pulsar://b2:1,b3:2",
        ] {
            let err = lookup_step(
                &settings(6650),
                answer(Connect, Some(url), None, false),
                None,
            )
            .expect_err("bad url");
            assert!(
                matches!(&err, UplinkError::BadBrokerUrl(u) if u == url),
                "{err:?}"
            );
        }
        let err = lookup_step(
            &tls_settings(),
            answer(Connect, None, Some("pulsar+ssl://b2:0"), false),
            None,
        )
        .expect_err("bad url");
        assert!(matches!(err, UplinkError::BadBrokerUrl(_)), "{err:?}");
    }

    #[test]
    fn a_failed_lookup_is_a_refusal_or_a_lookup_error() {
        let mut denied = answer(LookupType::Failed, None, None, false);
        denied.error = Some(proto::ServerError::AuthorizationError as i32);
        denied.message = Some("no produce permission".into());
        let err = lookup_step(&settings(6650), denied, Some("gw-a".into())).unwrap_err();
        assert!(
            matches!(&err, UplinkError::NotAuthorized { role: Some(r), .. } if r == "gw-a"),
            "{err:?}"
        );
        let mut busy = answer(LookupType::Failed, None, None, false);
        busy.error = Some(proto::ServerError::ServiceNotReady as i32);
        let err = lookup_step(&settings(6650), busy, None).unwrap_err();
        assert!(matches!(err, UplinkError::Lookup { .. }), "{err:?}");
        assert_eq!(err.class(), ErrorClass::Transient);
    }

    #[tokio::test]
    async fn a_tls_lookup_that_names_a_plaintext_broker_gets_neither_token_nor_records() {
        // The plaintext broker the lookup points at records what reaches it.
        let (plain, mut plain_seen) = fake_broker(Box::new(|l, me| {
            lookup_reply(
                l,
                LookupType::Connect,
                format!("pulsar://127.0.0.1:{me}"),
                true,
                false,
            )
        }))
        .await;
        let dir = Scratch::new("downgrade");
        let (acceptor, settings_for) = tls_pki(&dir.0);
        let (service, mut seen) = fake_broker_with(
            Some(acceptor),
            Box::new(move |l, _| CommandLookupTopicResponse {
                broker_service_url: Some(format!("pulsar://127.0.0.1:{plain}")),
                broker_service_url_tls: Some(format!("pulsar://127.0.0.1:{plain}")),
                response: Some(LookupType::Connect as i32),
                request_id: l.request_id,
                authoritative: Some(true),
                ..Default::default()
            }),
        )
        .await;
        let s = settings_for(service);
        let outcome = connect(&s).await;
        let mut connects = 0;
        while let Ok(c) = seen.try_recv() {
            connects += c.connect.iter().count();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut leaked = Vec::new();
        while let Ok(c) = plain_seen.try_recv() {
            leaked.push(c);
        }
        assert!(leaked.is_empty(), "the plaintext broker got {leaked:?}");
        match outcome {
            Ok(conn) => panic!("connected to {} in plaintext", conn.endpoint),
            Err(e) => {
                assert!(matches!(e, UplinkError::TlsDowngrade { .. }), "{e:?}");
                assert_eq!(e.class(), ErrorClass::NeedsOperator);
            }
        }
        assert_eq!(connects, 1, "the TLS service broker was reached");
    }
}
