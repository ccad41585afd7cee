//! A systemd notify socket: what ferry tells systemd, with arrival times.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A NOTIFY_SOCKET that records every message with its arrival time.
pub struct NotifySocket {
    pub path: PathBuf,
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir`.
    pub fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                out.lock().unwrap().push((Instant::now(), text));
            }
        });
        NotifySocket { path, seen }
    }

    /// The socket's path, for `NOTIFY_SOCKET`.
    pub fn env_value(&self) -> String {
        self.path.to_string_lossy().to_string()
    }

    /// Messages that contain `needle`, arrived in `[from, to)`.
    pub fn count(&self, needle: &str, from: Instant, to: Instant) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, m)| *t >= from && *t < to && m.contains(needle))
            .count()
    }

    /// Waits until a message containing `needle` arrived.
    pub async fn wait_for(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.count(
            needle,
            Instant::now() - Duration::from_secs(3600),
            Instant::now() + Duration::from_secs(1),
        ) == 0
        {
            assert!(
                Instant::now() < deadline,
                "no {needle} on the notify socket: {:?}",
                self.seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
