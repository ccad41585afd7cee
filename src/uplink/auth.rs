//! JWT authentication: reading the token from its source, keeping it out of
//! every log and `Debug` print, and the file-permission warning.
//!
//! The token is read when a connection is made and again for every
//! AUTH_CHALLENGE, so a token rotated on disk (or by systemd credentials)
//! takes effect on the live connection.

use std::fmt;
use std::path::Path;

use base64::Engine as _;

use crate::config::TokenSource;

/// The Pulsar authentication method name of JWT tokens.
pub const METHOD_TOKEN: &str = "token";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("token environment variable {0} is not set")]
    Env(String),
    #[error("token from {0} is empty")]
    Empty(String),
}

/// A token. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The unverified `sub` claim: the role the broker will see. Only for
    /// messages; the broker does the verifying.
    pub fn role(&self) -> Option<String> {
        claims(&self.0).and_then(|c| c.get("sub").and_then(|s| s.as_str()).map(str::to_string))
    }

    /// The unverified `exp` claim, seconds since the epoch.
    pub fn expires_at(&self) -> Option<u64> {
        claims(&self.0).and_then(|c| c.get("exp").and_then(|e| e.as_u64()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

fn claims(jwt: &str) -> Option<serde_json::Value> {
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Where a token came from, for messages.
pub fn describe(source: &TokenSource) -> String {
    match source {
        TokenSource::File(p) => format!("file {}", p.display()),
        TokenSource::Env(n) => format!("environment variable {n}"),
    }
}

/// Reads the token now.
pub fn read(source: &TokenSource) -> Result<Secret, AuthError> {
    let raw = match source {
        TokenSource::File(p) => std::fs::read_to_string(p).map_err(|e| AuthError::File {
            path: p.display().to_string(),
            source: e,
        })?,
        TokenSource::Env(n) => std::env::var(n).map_err(|_| AuthError::Env(n.clone()))?,
    };
    let token = raw.trim().to_string();
    if token.is_empty() {
        return Err(AuthError::Empty(describe(source)));
    }
    Ok(Secret(token))
}

/// A warning when a secret file can be read by anyone but its owner.
pub fn permission_warning(what: &str, path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "{what} {} is readable by others (mode {:o}); run chmod 600 on it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // {"alg":"HS256"}.{"sub":"gw-a","exp":1800000000}.signature
    const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJndy1hIiwiZXhwIjoxODAwMDAwMDAwfQ.c2ln";

    #[test]
    fn a_secret_is_never_printed() {
        let s = Secret(JWT.into());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.role().as_deref(), Some("gw-a"));
        assert_eq!(s.expires_at(), Some(1_800_000_000));
    }

    #[test]
    fn tokens_are_read_fresh_and_trimmed() {
        let dir = std::env::temp_dir().join(format!("ferry-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, format!("{JWT}\n")).unwrap();
        let src = TokenSource::File(f.clone());
        assert_eq!(read(&src).unwrap().expose(), JWT);
        std::fs::write(&f, "other\n").unwrap();
        assert_eq!(read(&src).unwrap().expose(), "other");
        std::fs::write(&f, "  \n").unwrap();
        assert!(matches!(read(&src), Err(AuthError::Empty(_))));

        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(permission_warning("token file", &f)
            .unwrap()
            .contains("mode 644"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(permission_warning("token file", &f), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
