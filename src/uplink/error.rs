//! The uplink's errors and what each means for the session loop
//! ([`ErrorClass`]): back off, wait for an operator, or stop ferry. Broker
//! refusals are classified here by their error code ([`refusal`]).

use pulsar::proto::ServerError;

use super::auth;
use super::conn::ConnError;
use super::frame::FrameError;
use super::producer::ProducerError;
use super::tls;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection to {addr} failed: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {failure}")]
    Tls {
        addr: String,
        failure: tls::TlsFailure,
    },
    #[error(transparent)]
    TlsSetup(#[from] tls::TlsSetupError),
    #[error(transparent)]
    Token(#[from] auth::AuthError),
    #[error("broker rejected the token{}: {message}", role_suffix(.role))]
    AuthRejected {
        message: String,
        role: Option<String>,
    },
    #[error("not authorized to {access} {topic}{}: {message}", role_suffix(.role))]
    NotAuthorized {
        topic: String,
        role: Option<String>,
        message: String,
        access: Access,
    },
    #[error("topic {topic} is terminated: it accepts no more messages")]
    TopicTerminated { topic: String },
    #[error("broker closed the connection")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("timed out writing to {addr}: the broker took nothing for {waited_ms} ms ({pending} bytes waiting)")]
    WriteStalled {
        addr: String,
        pending: usize,
        waited_ms: u64,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("broker refused {during}: {error} ({message})")]
    Broker {
        during: &'static str,
        error: String,
        message: String,
    },
    #[error("lookup of {topic} failed: {error} ({message})")]
    Lookup {
        topic: String,
        error: String,
        message: String,
    },
    #[error("lookup of {0} redirected too many times")]
    TooManyRedirects(String),
    #[error("broker answered with an unusable url `{0}`")]
    BadBrokerUrl(String),
    #[error("lookup of {topic} sent ferry to `{url}`, a plaintext broker, while pulsar.service_url uses TLS; ferry never leaves TLS, so this is a misconfigured cluster (the brokers must advertise their TLS listener, brokerServicePortTls)")]
    TlsDowngrade { topic: String, url: String },
    #[error("lookup of {topic} sent ferry to `{url}`, a TLS broker, while pulsar.service_url is plain pulsar://; use pulsar+ssl:// with [pulsar.tls]")]
    TlsNotConfigured { topic: String, url: String },
    #[error("lookup of {0} answered without a broker url")]
    NoBrokerUrl(String),
    #[error("broker closed the producer")]
    ProducerClosed,
    #[error("the broker closed the reader of {0}")]
    ConsumerClosed(String),
    #[error("broker refused record {seq}: {error} ({message})")]
    SendError {
        seq: u64,
        error: String,
        message: String,
    },
    #[error(transparent)]
    Producer(#[from] ProducerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A transport failure with no variant of its own above.
    #[error(transparent)]
    Transport(ConnError),
}

fn role_suffix(role: &Option<String>) -> String {
    role.as_ref()
        .map(|r| format!(" as role {r}"))
        .unwrap_or_default()
}

impl UplinkError {
    /// Records a security event for this error, if it is one (the broker
    /// refused the token or the topic, TLS failed, the token could not be
    /// read), at most once per [`crate::audit::REFUSAL_EVERY`] per topic and
    /// kind: a refusal repeats at every reconnect.
    pub fn audit(&self, topic: &str) {
        use crate::audit::Event;
        let role = |r: &Option<String>| r.clone().map_or(serde_json::Value::Null, Into::into);
        let event = match self {
            UplinkError::AuthRejected { message, role: r } => Event::new("auth-refused")
                .field("role", role(r))
                .field("message", message.as_str()),
            UplinkError::NotAuthorized {
                topic: refused,
                role: r,
                message,
                access,
            } => Event::new("authorization-refused")
                .field("refused_topic", refused.as_str())
                .field("role", role(r))
                .field("access", access.to_string())
                .field("message", message.as_str()),
            UplinkError::Tls { addr, failure } => Event::new("tls-failure")
                .field("addr", addr.as_str())
                .field("reason", failure.to_string()),
            UplinkError::TlsSetup(_)
            | UplinkError::TlsDowngrade { .. }
            | UplinkError::TlsNotConfigured { .. }
            | UplinkError::Transport(ConnError::TlsMismatch { .. }) => {
                Event::new("tls-failure").field("reason", self.to_string())
            }
            UplinkError::Token(e) => Event::new("token-unreadable").field("reason", e.to_string()),
            _ => return,
        };
        let key = format!("{}:{topic}", event.kind());
        event
            .field("topic", topic)
            .record_at_most_every(key, crate::audit::REFUSAL_EVERY);
    }
}

/// What an error means for the uplink loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Network or broker trouble: back off and try again.
    Transient,
    /// Needs an operator (certificate, token, permission, terminated
    /// topic): keep the data, retry slowly, say why.
    NeedsOperator,
    /// The store is unusable: ferry stops.
    Fatal,
}

impl UplinkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            UplinkError::Store(StoreError::DiskFull) => ErrorClass::Transient,
            // Nothing was changed; an operator must find the other producer
            // (or the broker's broken state), or refill a cluster that lost
            // the records it confirmed.
            UplinkError::Store(
                StoreError::SequenceRefused { .. } | StoreError::ClusterLost { .. },
            ) => ErrorClass::NeedsOperator,
            UplinkError::Store(_) => ErrorClass::Fatal,
            UplinkError::Tls { failure, .. } => match failure {
                tls::TlsFailure::Other(_) => ErrorClass::Transient,
                _ => ErrorClass::NeedsOperator,
            },
            UplinkError::TlsSetup(_)
            | UplinkError::Token(_)
            | UplinkError::AuthRejected { .. }
            | UplinkError::NotAuthorized { .. }
            | UplinkError::TopicTerminated { .. }
            | UplinkError::TlsDowngrade { .. }
            | UplinkError::TlsNotConfigured { .. } => ErrorClass::NeedsOperator,
            UplinkError::Transport(ConnError::TlsMismatch { .. }) => ErrorClass::NeedsOperator,
            _ => ErrorClass::Transient,
        }
    }
}

/// A transport error keeps the message and class it always had.
impl From<ConnError> for UplinkError {
    fn from(e: ConnError) -> UplinkError {
        match e {
            ConnError::Connect { addr, source } => UplinkError::Connect { addr, source },
            ConnError::Io { addr, source } => UplinkError::Io { addr, source },
            ConnError::Tls { addr, failure } => UplinkError::Tls { addr, failure },
            ConnError::TlsSetup(e) => UplinkError::TlsSetup(e),
            ConnError::Closed => UplinkError::Closed,
            ConnError::Timeout(what) => UplinkError::Timeout(what),
            ConnError::WriteStalled {
                addr,
                pending,
                waited_ms,
            } => UplinkError::WriteStalled {
                addr,
                pending,
                waited_ms,
            },
            ConnError::Frame(e) => UplinkError::Frame(e),
            e @ ConnError::TlsMismatch { .. } => UplinkError::Transport(e),
        }
    }
}

/// The name of a server error code, for messages.
pub fn server_error(code: i32) -> String {
    ServerError::try_from(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|_| format!("error {code}"))
}

/// Whether a server error code is one [`refusal`] gives its own meaning.
pub fn is_refusal(code: i32) -> bool {
    matches!(
        ServerError::try_from(code),
        Ok(ServerError::AuthenticationError
            | ServerError::AuthorizationError
            | ServerError::TopicTerminatedError)
    )
}

impl UplinkError {
    /// The same error, a refusal saying `access` was refused.
    pub fn with_access(self, access: Access) -> UplinkError {
        match self {
            UplinkError::NotAuthorized {
                topic,
                role,
                message,
                ..
            } => UplinkError::NotAuthorized {
                topic,
                role,
                message,
                access,
            },
            e => e,
        }
    }
}

/// What a connection does with its topic, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    #[default]
    Produce,
    Consume,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Produce => "produce on",
            Access::Consume => "consume from",
        })
    }
}

/// A broker's refusal of a request about `topic`, classified by its error
/// code; `role` names the token's role in the message, `access` what was
/// refused.
pub fn refusal(
    during: &'static str,
    code: i32,
    message: String,
    topic: &str,
    role: Option<String>,
    access: Access,
) -> UplinkError {
    match ServerError::try_from(code) {
        Ok(ServerError::AuthenticationError) => UplinkError::AuthRejected { message, role },
        Ok(ServerError::AuthorizationError) => UplinkError::NotAuthorized {
            topic: topic.to_string(),
            role,
            message,
            access,
        },
        Ok(ServerError::TopicTerminatedError) => UplinkError::TopicTerminated {
            topic: topic.to_string(),
        },
        _ => UplinkError::Broker {
            during,
            error: server_error(code),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_classified_by_their_code() {
        let role = || Some("gw-a".to_string());
        let t = "persistent://t/n/status";
        let e = refusal(
            "connect",
            ServerError::AuthenticationError as i32,
            "bad".into(),
            t,
            role(),
            Access::Produce,
        );
        assert!(matches!(&e, UplinkError::AuthRejected { role: Some(r), .. } if r == "gw-a"));
        assert_eq!(e.class(), ErrorClass::NeedsOperator);
        assert_eq!(e.to_string(), "broker rejected the token as role gw-a: bad");
        let e = refusal(
            "producer",
            ServerError::AuthorizationError as i32,
            "no".into(),
            t,
            None,
            Access::Produce,
        );
        assert_eq!(
            e.to_string(),
            "not authorized to produce on persistent://t/n/status: no"
        );
        assert_eq!(e.class(), ErrorClass::NeedsOperator);
        let e = refusal(
            "producer",
            ServerError::TopicTerminatedError as i32,
            "".into(),
            t,
            None,
            Access::Produce,
        );
        assert!(matches!(e, UplinkError::TopicTerminated { .. }));
        assert_eq!(e.class(), ErrorClass::NeedsOperator);
        let e = refusal(
            "producer",
            ServerError::ServiceNotReady as i32,
            "later".into(),
            t,
            None,
            Access::Produce,
        );
        assert_eq!(
            e.to_string(),
            "broker refused producer: ServiceNotReady (later)"
        );
        assert_eq!(e.class(), ErrorClass::Transient);
        assert_eq!(server_error(9999), "error 9999");
        assert!(is_refusal(ServerError::AuthorizationError as i32));
        assert!(!is_refusal(ServerError::ServiceNotReady as i32));
    }

    #[test]
    fn store_errors_are_fatal_but_a_full_disk_and_a_refused_number() {
        assert_eq!(
            UplinkError::Store(StoreError::DiskFull).class(),
            ErrorClass::Transient
        );
        assert_eq!(UplinkError::Closed.class(), ErrorClass::Transient);
        assert_eq!(UplinkError::ProducerClosed.class(), ErrorClass::Transient);
    }

    #[test]
    fn a_refused_reader_says_consume_from() {
        let e = refusal(
            "subscribe",
            ServerError::AuthorizationError as i32,
            "no".into(),
            "persistent://t/n/desired",
            Some("gw-a".into()),
            Access::Consume,
        );
        assert_eq!(
            e.to_string(),
            "not authorized to consume from persistent://t/n/desired as role gw-a: no"
        );
        let looked_up = refusal(
            "lookup",
            ServerError::AuthorizationError as i32,
            "no".into(),
            "persistent://t/n/desired",
            None,
            Access::Produce,
        )
        .with_access(Access::Consume);
        assert!(looked_up
            .to_string()
            .starts_with("not authorized to consume from"));
    }
}
