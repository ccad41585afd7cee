//! The audit events to journald as well, through its native protocol: one
//! datagram of `KEY=value` lines to `/run/systemd/journal/socket`, with
//! `SYSLOG_IDENTIFIER=ferry-audit` so that `journalctl -t ferry-audit`
//! finds them. Written here for the same reason as `sd_notify`
//! (`crate::notify`): a few lines over std. Without the socket (not under
//! systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

/// The identifier audit events carry in the journal.
pub const IDENTIFIER: &str = "ferry-audit";

/// journald's socket for native messages.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// The datagram for one audit line: the line is the message (it holds no
/// newline), at priority notice (5).
pub fn datagram(line: &str) -> String {
    debug_assert!(!line.contains('\n'));
    format!("SYSLOG_IDENTIFIER={IDENTIFIER}\nPRIORITY=5\nMESSAGE={line}\n")
}

/// Sends audit lines to a journald socket.
pub struct Journal {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Journal {
    /// A sender to `path`, if that socket exists.
    pub fn open(path: &Path) -> Option<Journal> {
        if !path.exists() {
            return None;
        }
        Some(Journal {
            sock: UnixDatagram::unbound().ok()?,
            path: path.to_path_buf(),
        })
    }

    /// Sends one line; a failure is logged, never fatal (the file holds it).
    pub fn send(&self, line: &str) {
        if let Err(e) = self.sock.send_to(datagram(line).as_bytes(), &self.path) {
            tracing::debug!(error = %e, "audit event not sent to journald");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_reaches_the_socket_under_the_audit_identifier() {
        let dir = std::env::temp_dir().join(format!("ferry-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("socket");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let j = Journal::open(&path).unwrap();
        j.send(r#"{"seq":1,"event":"start"}"#);
        let mut buf = [0u8; 256];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "SYSLOG_IDENTIFIER=ferry-audit\nPRIORITY=5\nMESSAGE={\"seq\":1,\"event\":\"start\"}\n"
        );
        assert!(Journal::open(&dir.join("absent")).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
