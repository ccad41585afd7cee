//! JWT authentication: reading the token from its source, keeping it out of
//! every log and `Debug` print, and the file-permission warning.
//!
//! The token is read when a connection is made and again for every
//! AUTH_CHALLENGE, so a token rotated on disk (or by systemd credentials)
//! takes effect on the live connection.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;

use crate::config::TokenSource;

/// The Pulsar authentication method name of JWT tokens.
pub const METHOD_TOKEN: &str = "token";

/// The largest token file ferry reads (a JWT is a few KiB at most).
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "token file {path} is not a regular file ({kind}): point it at a file that holds the token"
    )]
    NotAFile { path: String, kind: &'static str },
    #[error("token file {path} is larger than {limit} bytes: a token is a few KiB at most")]
    TooLarge { path: String, limit: u64 },
    #[error("token environment variable {0} is not set")]
    Env(String),
    #[error("token from {0} is empty")]
    Empty(String),
    #[error("reading the token from {source_name} did not finish within {waited_ms} ms")]
    TimedOut { source_name: String, waited_ms: u64 },
    #[error("reading the token from {0} failed: {1}")]
    Interrupted(String, String),
}

/// A token. `Debug` never shows it and there is no `Display`.
///
/// Not the `secrecy` crate: what ferry needs of a secret type is exactly
/// this redacting `Debug` and an explicit [`Secret::expose`], plus the
/// token's unverified claims for messages (`role`, `expires_at`), which
/// `secrecy` does not offer. Its zeroize-on-drop would buy little here:
/// the token stays in its file (it is read again at every CONNECT and
/// AUTH_CHALLENGE) and passes through prost's buffers on every send.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a token (as read from its source).
    pub fn new(token: impl Into<String>) -> Secret {
        Secret(token.into())
    }

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

/// Reads the token now. This blocks (a file read): async code calls
/// [`read_async`] instead.
pub fn read(source: &TokenSource) -> Result<Secret, AuthError> {
    let raw = match source {
        TokenSource::File(p) => read_file(p)?,
        TokenSource::Env(n) => std::env::var(n).map_err(|_| AuthError::Env(n.clone()))?,
    };
    let token = raw.trim().to_string();
    if token.is_empty() {
        return Err(AuthError::Empty(describe(source)));
    }
    let secret = Secret(token);
    crate::audit::token_read(
        &describe(source),
        secret.expose(),
        secret.role(),
        secret.expires_at(),
    );
    Ok(secret)
}

/// Reads the token on tokio's blocking threads, never on the async ones,
/// and gives up after `limit` (a file on a hung network mount).
pub async fn read_async(source: &TokenSource, limit: Duration) -> Result<Secret, AuthError> {
    let src = source.clone();
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(move || read(&src))).await {
        Ok(Ok(read)) => read,
        Ok(Err(e)) => Err(AuthError::Interrupted(describe(source), e.to_string())),
        Err(_) => Err(AuthError::TimedOut {
            source_name: describe(source),
            waited_ms: limit.as_millis() as u64,
        }),
    }
}

/// A token file's text: a regular file of at most [`MAX_TOKEN_BYTES`].
/// Anything else (a device such as `/dev/zero`, a FIFO, a directory) is
/// refused before it is read, so a wrong path can neither fill the memory
/// nor wait for a writer forever.
fn read_file(p: &Path) -> Result<String, AuthError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = || p.display().to_string();
    let io = |source| AuthError::File {
        path: path(),
        source,
    };
    let not_a_file = |meta: &std::fs::Metadata| {
        (!meta.is_file()).then(|| AuthError::NotAFile {
            path: path(),
            kind: file_kind(&meta.file_type()),
        })
    };
    // Look before opening: opening a device can have effects of its own.
    if let Some(e) = not_a_file(&std::fs::metadata(p).map_err(io)?) {
        return Err(e);
    }
    // O_NONBLOCK: if the path became a FIFO meanwhile, opening it does not
    // wait for a writer (regular files ignore the flag); then look again at
    // what was opened.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(io)?;
    if let Some(e) = not_a_file(&file.metadata().map_err(io)?) {
        return Err(e);
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_TOKEN_BYTES {
        return Err(AuthError::TooLarge {
            path: path(),
            limit: MAX_TOKEN_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|_| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not UTF-8 text",
        ))
    })
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// Why a token file cannot be used, found without reading it (for `ferry
/// check` offline): not a regular file, or larger than [`MAX_TOKEN_BYTES`].
pub fn token_file_problem(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let problem = if !meta.is_file() {
        AuthError::NotAFile {
            path: path.display().to_string(),
            kind: file_kind(&meta.file_type()),
        }
    } else if meta.len() > MAX_TOKEN_BYTES {
        AuthError::TooLarge {
            path: path.display().to_string(),
            limit: MAX_TOKEN_BYTES,
        }
    } else {
        return None;
    };
    Some(problem.to_string())
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

    /// Reads `path` as a token on another thread; fails the test if the
    /// read has not returned within a second (it would read forever).
    fn read_within_a_second(path: &Path) -> Result<Secret, AuthError> {
        let src = TokenSource::File(path.to_path_buf());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(read(&src));
        });
        rx.recv_timeout(std::time::Duration::from_secs(1))
            .unwrap_or_else(|_| {
                panic!(
                    "reading {} as a token did not end within 1 s",
                    path.display()
                )
            })
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_token_file_that_is_a_device_is_refused_at_once() {
        let err = read_within_a_second(Path::new("/dev/zero")).expect_err("not a token");
        let text = err.to_string();
        assert!(
            text.contains("/dev/zero") && text.contains("not a regular file"),
            "{text}"
        );
    }

    #[test]
    fn a_token_file_that_is_a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = scratch("fifo");
        let fifo = dir.join("token");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let err = read_within_a_second(&fifo).expect_err("not a token");
        let text = err.to_string();
        assert!(
            text.contains("token") && text.contains("not a regular file"),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_token_file_over_the_limit_is_refused_naming_file_and_limit() {
        let dir = scratch("large");
        let f = dir.join("token");
        std::fs::write(&f, vec![b'a'; MAX_TOKEN_BYTES as usize + 1]).unwrap();
        let err = read_within_a_second(&f).expect_err("too large");
        let text = err.to_string();
        assert!(
            text.contains(&f.display().to_string()) && text.contains("65536"),
            "{text}"
        );
        // Exactly at the limit is still a token.
        std::fs::write(&f, vec![b'a'; MAX_TOKEN_BYTES as usize]).unwrap();
        assert_eq!(read_within_a_second(&f).unwrap().expose().len(), 65536);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_names_an_unusable_token_file_without_reading_it() {
        let zero = token_file_problem(Path::new("/dev/zero")).unwrap();
        assert!(zero.contains("not a regular file"), "{zero}");
        let dir = scratch("problem");
        let f = dir.join("token");
        std::fs::write(&f, vec![b'a'; MAX_TOKEN_BYTES as usize + 1]).unwrap();
        assert!(token_file_problem(&f).unwrap().contains("65536"));
        std::fs::write(&f, JWT).unwrap();
        assert_eq!(token_file_problem(&f), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_async_read_runs_off_the_runtime_with_the_same_answers() {
        let dir = scratch("async");
        let f = dir.join("token");
        std::fs::write(&f, format!("{JWT}\n")).unwrap();
        let limit = std::time::Duration::from_secs(5);
        let src = TokenSource::File(f.clone());
        assert_eq!(read_async(&src, limit).await.unwrap().expose(), JWT);
        let zero = TokenSource::File("/dev/zero".into());
        assert!(matches!(
            read_async(&zero, limit).await,
            Err(AuthError::NotAFile { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
