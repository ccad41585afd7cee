//! Pulsar's admin REST API (`/admin/v2`), as the fleet's role: a thin
//! client that sends one call at a time and turns every failure into an
//! [`AdminError`] naming the call (`PUT /admin/v2/tenants/iot`) and what
//! went wrong (unreachable, 401, 403, refused with the broker's reason).
//!
//! The token is read from `pulsar.token_file` once, sent as a bearer
//! token, and never logged or printed; with an `https://` admin URL and a
//! `pulsar.ca_file`, that CA is the only trust anchor (the system's roots
//! otherwise). What the calls mean is [`crate::provision`]'s concern.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::config::PulsarConfig;

/// A failed admin call, or a client that could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot read {what} {}: {source}", path.display())]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    BadCa { path: PathBuf },
    #[error("the token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("cannot set up the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("{call}: cannot reach the admin API: {reason}")]
    Unreachable { call: String, reason: String },
    #[error("{call}: 401 authentication required: the broker did not accept the token of pulsar.token_file (or none was given)")]
    Unauthenticated { call: String },
    #[error("{call}: {status} not authorized: the token's role may not do this (provisioning needs a super-user role){}", reason_suffix(.reason))]
    Forbidden {
        call: String,
        status: u16,
        reason: String,
    },
    #[error("{call}: refused with {status}{}", reason_suffix(.reason))]
    Refused {
        call: String,
        status: u16,
        reason: String,
    },
    #[error("{call}: unexpected answer: {detail}")]
    BadAnswer { call: String, detail: String },
}

fn reason_suffix(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    }
}

/// The admin REST API of one Pulsar cluster.
pub struct Admin {
    /// `<admin_url>/admin/v2`
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

// The token stays out of debug output.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Admin {
    /// A client for `pulsar.admin_url`, with the token of `pulsar.token_file`
    /// and the CA of `pulsar.ca_file` (if given).
    pub fn new(pulsar: &PulsarConfig) -> Result<Admin, AdminError> {
        let token = match &pulsar.token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .use_rustls_tls();
        if let Some(ca) = &pulsar.ca_file {
            let pem = std::fs::read(ca).map_err(|source| AdminError::ReadFile {
                what: "pulsar.ca_file",
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| AdminError::BadCa { path: ca.clone() })?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Admin {
            base: format!("{}/admin/v2", pulsar.admin_url),
            token,
            http: builder.build().map_err(AdminError::Client)?,
        })
    }

    /// `GET path` as JSON; `None` when the broker answers 404 (the thing
    /// does not exist).
    pub async fn get(&self, path: &str) -> Result<Option<Value>, AdminError> {
        let call = self.call_name(&Method::GET, path);
        let response = self.send(Method::GET, path, None, &call).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = check(response, &call).await?;
        let text = response.text().await.map_err(|e| AdminError::Unreachable {
            call: call.clone(),
            reason: error_chain(&e),
        })?;
        if text.trim().is_empty() {
            return Ok(Some(Value::Null));
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| AdminError::BadAnswer {
                call,
                detail: format!("not JSON: {e}"),
            })
    }

    /// `PUT path` with a JSON body (or none).
    pub async fn put(&self, path: &str, body: Option<&Value>) -> Result<(), AdminError> {
        self.change(Method::PUT, path, body).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(), AdminError> {
        self.change(Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), AdminError> {
        self.change(Method::DELETE, path, None).await
    }

    async fn change(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(), AdminError> {
        let call = self.call_name(&method, path);
        let response = self.send(method, path, body, &call).await?;
        check(response, &call).await.map(|_| ())
    }

    fn call_name(&self, method: &Method, path: &str) -> String {
        format!("{method} /admin/v2/{path}")
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        call: &str,
    ) -> Result<reqwest::Response, AdminError> {
        let mut request = self.http.request(method, format!("{}/{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        tracing::debug!(call, "admin call");
        request.send().await.map_err(|e| AdminError::Unreachable {
            call: call.to_string(),
            reason: error_chain(&e),
        })
    }
}

/// The token file's content, trimmed.
fn read_token(path: &Path) -> Result<String, AdminError> {
    let text = std::fs::read_to_string(path).map_err(|source| AdminError::ReadFile {
        what: "pulsar.token_file",
        path: path.to_path_buf(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(AdminError::EmptyToken {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

/// A success passes; anything else becomes the error it means.
async fn check(response: reqwest::Response, call: &str) -> Result<reqwest::Response, AdminError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let reason = broker_reason(&response.text().await.unwrap_or_default());
    let call = call.to_string();
    Err(match status {
        // Pulsar answers 401 both to a token it does not accept (a bare
        // error page) and to a role without the right (with its reason).
        StatusCode::UNAUTHORIZED if reason.is_empty() => AdminError::Unauthenticated { call },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => AdminError::Forbidden {
            call,
            status: status.as_u16(),
            reason,
        },
        _ => AdminError::Refused {
            call,
            status: status.as_u16(),
            reason,
        },
    })
}

/// The broker's `{"reason": "..."}`, or the start of whatever else it
/// sent (nothing of an HTML error page), on one line and without control
/// characters.
fn broker_reason(body: &str) -> String {
    let reason = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| {
            if body.trim_start().starts_with('<') {
                String::new()
            } else {
                body.to_string()
            }
        });
    let clean: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    clean.trim().to_string()
}

/// An error with its causes (reqwest's own message is only the outer one).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_reason_is_one_clean_line() {
        assert_eq!(
            broker_reason(r#"{"reason":"Namespace does not exist"}"#),
            "Namespace does not exist"
        );
        assert_eq!(broker_reason("plain\ntext\x1b[31m"), "plain text [31m");
        assert_eq!(broker_reason(""), "");
        assert_eq!(broker_reason("<html><title>Error 401</title></html>"), "");
        assert_eq!(broker_reason(&"x".repeat(1000)).len(), 300);
    }

    #[test]
    fn errors_name_the_call() {
        let e = AdminError::Forbidden {
            call: "PUT /admin/v2/tenants/iot".into(),
            status: 401,
            reason: "Unauthorized to validateBothTenantOperationAndSuperUser".into(),
        };
        assert_eq!(
            e.to_string(),
            "PUT /admin/v2/tenants/iot: 401 not authorized: the token's role may not do this (provisioning needs a super-user role): Unauthorized to validateBothTenantOperationAndSuperUser"
        );
    }
}
