//! TLS for the uplink: rustls with the ring provider, trust anchors from a CA
//! file (system roots optional), hostname verification always on, optional
//! client certificate. Also turns rustls failures into messages an installer
//! can act on.
//!
//! Files are read for every new connection, so replaced certificates take
//! effect at the next reconnect.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("no trust anchors: set pulsar.tls.ca_file or use_system_roots")]
    NoRoots,
    #[error("invalid client certificate or key: {0}")]
    ClientCert(String),
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
}

/// Why a TLS handshake failed, in the installer's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    UnknownCa,
    HostnameMismatch,
    CertificateExpired,
    ClientCertificateRequired,
    ClientCertificateRefused,
    Other(String),
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsFailure::UnknownCa => f.write_str(
                "the broker's certificate is not signed by a trusted CA (check pulsar.tls.ca_file)",
            ),
            TlsFailure::HostnameMismatch => f.write_str(
                "the broker's certificate does not name the host connected to (hostname mismatch; check pulsar.service_url)",
            ),
            TlsFailure::CertificateExpired => f.write_str("the broker's certificate has expired or is not yet valid"),
            TlsFailure::ClientCertificateRequired => f.write_str(
                "the broker requires a client certificate (set pulsar.tls.cert_file and key_file)",
            ),
            TlsFailure::ClientCertificateRefused => {
                f.write_str("the broker refused ferry's client certificate (not signed by a CA it trusts?)")
            }
            TlsFailure::Other(s) => write!(f, "TLS failure: {s}"),
        }
    }
}

/// Finds the rustls error inside an I/O error, if there is one.
pub fn classify(err: &std::io::Error) -> Option<TlsFailure> {
    let tls = err.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsFailure::UnknownCa
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::HostnameMismatch
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::CertificateExpired,
            other => TlsFailure::Other(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            TlsFailure::ClientCertificateRequired
        }
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown,
        ) => TlsFailure::ClientCertificateRefused,
        other => TlsFailure::Other(other.to_string()),
    })
}

/// Builds a connector from the files named in the configuration.
pub fn connector(cfg: &TlsConfig) -> Result<TlsConnector, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &cfg.ca_file {
        let certs = read_certs("CA file", ca)?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsSetupError::NoCertificate {
                what: "CA file",
                path: ca.clone(),
            });
        }
    }
    if cfg.use_system_roots {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots);
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots);
    let config = match &cfg.client_cert {
        Some((cert, key)) => {
            let chain = read_certs("client certificate", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::Read {
                what: "client key",
                path: key.clone(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsSetupError::ClientCert(e.to_string()))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsSetupError> {
    ServerName::try_from(host.to_string()).map_err(|_| TlsSetupError::ServerName(host.to_string()))
}

fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| TlsSetupError::Read {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let certs: Vec<_> = iter
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Read {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_errors_become_installer_messages() {
        let wrap = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        assert_eq!(
            classify(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))),
            Some(TlsFailure::UnknownCa)
        );
        assert_eq!(
            classify(&wrap(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName
            ))),
            Some(TlsFailure::HostnameMismatch)
        );
        assert_eq!(
            classify(&wrap(rustls::Error::AlertReceived(
                AlertDescription::CertificateRequired
            ))),
            Some(TlsFailure::ClientCertificateRequired)
        );
        assert_eq!(classify(&std::io::Error::other("plain")), None);
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let cfg = TlsConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            use_system_roots: false,
            client_cert: None,
        };
        let err = connector(&cfg).err().expect("fails").to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
