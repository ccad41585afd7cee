//! The fleet's Pulsar client (the `pulsar` crate) as `[pulsar]` in
//! fleet.toml describes it: the service URL, the CA that signed the
//! brokers' certificates, and the fleet's token, read again from its file
//! at every (re)connection so that a rotated token is picked up.
//!
//! Why the crate and not the agent's own protocol core: the view and the
//! `dlq` commands consume with a durable Key_Shared subscription, where the
//! broker keeps the cursor, and produce copies whose duplicates are
//! harmless (the apply rule), so the crate's gaps (no sequence ids, no
//! client certificates, re-subscribing from its start position after a
//! reconnect) cost nothing here.

use std::path::PathBuf;

use pulsar::{Pulsar, TokioExecutor};
use thiserror::Error;

use crate::config::PulsarConfig;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot read the CA file {path}: {source}")]
    Ca {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: pulsar::Error },
}

/// Token authentication from a file, read at every connection.
struct TokenFile(PathBuf);

fn read_token(path: &PathBuf) -> std::io::Result<Vec<u8>> {
    Ok(std::fs::read_to_string(path)?.trim().as_bytes().to_vec())
}

#[async_trait::async_trait]
impl pulsar::authentication::Authentication for TokenFile {
    fn auth_method_name(&self) -> String {
        "token".into()
    }

    async fn initialize(&mut self) -> Result<(), pulsar::error::AuthenticationError> {
        Ok(())
    }

    async fn auth_data(&mut self) -> Result<Vec<u8>, pulsar::error::AuthenticationError> {
        // The error names the file, never its content.
        read_token(&self.0).map_err(|e| {
            pulsar::error::AuthenticationError::Custom(format!(
                "cannot read the token file {}: {e}",
                self.0.display()
            ))
        })
    }
}

/// Connects to the fleet's Pulsar.
pub async fn connect(config: &PulsarConfig) -> Result<Pulsar<TokioExecutor>, ClientError> {
    let mut builder = Pulsar::builder(config.service_url.clone(), TokioExecutor);
    if let Some(ca) = &config.ca_file {
        let pem = std::fs::read(ca).map_err(|source| ClientError::Ca {
            path: ca.clone(),
            source,
        })?;
        builder = builder
            .with_certificate_chain(pem)
            .with_tls_hostname_verification_enabled(true);
    }
    if let Some(token) = &config.token_file {
        // Fail early and clearly if the file cannot be read at all.
        read_token(token).map_err(|source| ClientError::Token {
            path: token.clone(),
            source,
        })?;
        builder = builder.with_auth_provider(Box::new(TokenFile(token.clone())));
    }
    builder
        .build()
        .await
        .map_err(|source| ClientError::Connect {
            url: config.service_url.clone(),
            source,
        })
}
