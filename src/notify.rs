//! systemd integration: `sd_notify` messages (READY, STATUS, WATCHDOG,
//! RELOADING, STOPPING) and a watchdog that is fed only while every loop of
//! ferry is alive.
//!
//! Each long-running loop owns a [`Beat`] and ticks it at least every
//! [`BEAT_EVERY`] while it runs, also when idle. The watchdog task sends
//! `WATCHDOG=1` only if every beat is recent, so a hung loop (a blocked
//! thread, a deadlock) stops the feeding and systemd restarts ferry.
//! Without `NOTIFY_SOCKET` everything here is a no-op.
//!
//! The protocol itself is written here, not taken from a crate: it is one
//! datagram of `KEY=value` lines to `$NOTIFY_SOCKET`, a few lines over std
//! without `unsafe`. `sd-notify` (0.5) connects to `$NOTIFY_SOCKET` as a
//! file path, so it cannot reach an abstract socket name (`@...`, which
//! sd_notify(3) defines), and it needs Rust 1.82 where ferry's minimum is
//! 1.80; `libsystemd` (0.7) reaches abstract names but brings nix, nom,
//! serde, sha2, hmac and uuid along for these few lines.

use std::future::Future;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often every loop ticks its beat, at least.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Sends one notification to systemd, if ferry runs under it.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// The watchdog interval systemd asks for (`WATCHDOG_USEC`, for this
/// process), if any.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_of(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the values of `WATCHDOG_USEC` and
/// `WATCHDOG_PID`, for process `me`: none when the variables are meant for
/// another process (a parent that left them set), or the interval is 0.
fn watchdog_interval_of(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
        if pid != me {
            return None;
        }
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Liveness of one loop.
#[derive(Clone, Debug)]
pub struct Beat {
    name: Arc<str>,
    /// Milliseconds since [`epoch`] of the last tick.
    last: Arc<AtomicU64>,
}

impl Beat {
    pub fn tick(&self) {
        self.last
            .store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn age(&self) -> Duration {
        let now = epoch().elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// The beats of all loops.
#[derive(Clone, Debug, Default)]
pub struct Health {
    beats: Arc<std::sync::Mutex<Vec<Beat>>>,
}

impl Health {
    /// A new beat, ticked once already.
    pub fn beat(&self, name: impl Into<Arc<str>>) -> Beat {
        let b = Beat {
            name: name.into(),
            last: Arc::new(AtomicU64::new(0)),
        };
        b.tick();
        self.beats.lock().expect("health lock").push(b.clone());
        b
    }

    /// The first loop that has not ticked within `limit`.
    pub fn stalled(&self, limit: Duration) -> Option<(Arc<str>, Duration)> {
        let beats = self.beats.lock().expect("health lock");
        beats
            .iter()
            .find(|b| b.age() > limit)
            .map(|b| (b.name.clone(), b.age()))
    }
}

/// Feeds the systemd watchdog at a third of its interval while every loop is
/// alive. Runs until `stop`.
pub async fn watchdog(
    health: Health,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let every = interval / 3;
    // A loop may miss a tick or two under load; it is hung when it has been
    // silent for most of the interval.
    let limit = (interval / 2).max(3 * BEAT_EVERY);
    let mut tick = tokio::time::interval(every);
    let mut reported = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match health.stalled(limit) {
            None => {
                notify("WATCHDOG=1");
                reported = false;
            }
            Some((name, silent)) if !reported => {
                tracing::error!(
                    stalled = ?name,
                    silent_ms = silent.as_millis() as u64,
                    "a loop has stopped; no longer feeding the systemd watchdog"
                );
                reported = true;
            }
            Some(_) => {}
        }
    }
}

/// Runs `fut`, ticking `beat` every [`BEAT_EVERY`] while it is polled. If
/// `fut` blocks its thread, the ticks stop with it; but the ticks go on
/// while `fut` waits on anything, however long. A loop that can wait on the
/// network (the uplink) ticks its beat from its own progress instead.
pub async fn with_beat<F: Future>(beat: Beat, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut every = tokio::time::interval(BEAT_EVERY);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = every.tick() => beat.tick(),
        }
    }
}

/// Test hook: `FERRY_DEBUG_HANG=<loop>` makes that loop block its thread
/// forever after start-up, to show that the watchdog stops being fed. Never
/// set it in production.
pub fn hang_requested(name: &str) -> bool {
    std::env::var("FERRY_DEBUG_HANG").is_ok_and(|v| v == name)
}

/// Blocks the calling thread forever (see [`hang_requested`]).
pub fn hang_forever(name: &str) -> ! {
    tracing::warn!(
        hung = name,
        "FERRY_DEBUG_HANG: blocking this loop on purpose"
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_beat_is_reported_stalled() {
        let h = Health::default();
        let a = h.beat("a");
        let _b = h.beat("b");
        assert_eq!(h.stalled(Duration::from_secs(5)), None);
        std::thread::sleep(Duration::from_millis(30));
        a.tick();
        let (name, _) = h.stalled(Duration::from_millis(20)).expect("b is silent");
        assert_eq!(&*name, "b");
    }

    #[test]
    fn notifications_reach_the_socket() {
        use std::os::linux::net::SocketAddrExt;
        let dir = std::env::temp_dir().join(format!("ferry-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        // A socket of an earlier process that had the same pid.
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        // An abstract name: `@` in NOTIFY_SOCKET, no file.
        let name = format!("ferry-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let abstract_sock = UnixDatagram::bind_addr(&addr).unwrap();
        // SAFETY of the test: no other test in this binary reads NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1");
        unsafe { std::env::set_var("NOTIFY_SOCKET", format!("@{name}")) };
        notify("STOPPING=1");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = abstract_sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_watchdog_interval_is_for_this_process_only() {
        let of = watchdog_interval_of;
        assert_eq!(
            of(Some("1500000"), None, 7),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            of(Some("1500000"), Some("7"), 7),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(of(Some("1500000"), Some("8"), 7), None, "a parent's");
        assert_eq!(of(Some("0"), None, 7), None);
        assert_eq!(of(Some("soon"), None, 7), None);
        assert_eq!(of(None, Some("7"), 7), None);
    }
}
