//! The test harness: the real broker stack, ferry as a child process,
//! simulated devices, and a real Pulsar consumer that counts what arrived.
//!
//! The stack (Pulsar standalone + Mosquitto) is started once per test run by
//! `tests/stack/stack up`, which reuses a stack already up. Each test gets its
//! own Pulsar namespace, topic, MQTT topic prefix and client ids. Tests that
//! stop a broker take the stack lock exclusively; the others share it.
//!
//! - [`stack`]: where the brokers listen, starting and stopping them, the
//!   secured profiles and their tokens;
//! - [`admin`]: Pulsar's admin REST API (namespaces, grants, compaction);
//! - [`process`]: a ferry process: its config, start, kill, signals, log,
//!   `ferry status` and `ferry check`, metrics;
//! - [`store`]: what its store holds (counters, backlog, dead letters),
//!   waiting for it to fill or drain;
//! - [`devices`]: MQTT publishers (simulated devices, large, QoS 0 or
//!   retained messages);
//! - [`consumer`]: a real Pulsar consumer reading a topic back, and the
//!   tally of what arrived;
//! - [`scenario`]: the setups several tests share (a namespace with a ferry,
//!   a granted ferry on the secured broker, rounds published while ferry is
//!   killed);
//! - [`notify`]: a systemd notify socket;
//! - [`proto`]: Pulsar protocol commands for fake brokers and bare clients.
//!
//! `examples/demo.rs` and the benchmark include this module too.

mod admin;
mod consumer;
mod desired;
mod devices;
mod notify;
mod process;
mod proto;
mod scenario;
mod stack;
mod store;

// Not every program that includes the harness uses all of it.
#[allow(unused_imports)]
pub use admin::*;
#[allow(unused_imports)]
pub use consumer::*;
#[allow(unused_imports)]
pub use desired::*;
#[allow(unused_imports)]
pub use devices::*;
#[allow(unused_imports)]
pub use notify::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use proto::*;
#[allow(unused_imports)]
pub use scenario::*;
#[allow(unused_imports)]
pub use stack::*;
#[allow(unused_imports)]
pub use store::*;

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The repository's root: the package's folder, or for a member of the
/// workspace (`fleet/`, whose tests include this harness) its parent.
pub fn repo() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if here.join("tests/stack").is_dir() {
        return here;
    }
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// A unique, short name for this test's resources.
pub fn unique(name: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 100_000_000;
    format!("{name}-{t}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A fresh directory under `target/it` for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = repo().join("target/it").join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A local port nothing listens on (yet).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Writes a secret file the way an installer should: mode 0600, replaced
/// atomically so a reader never sees half of it.
pub fn write_secret(path: &Path, content: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
    f.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Prints a figure of a test, and keeps it in `target/it/figures.txt`.
pub fn report(test: &str, line: &str) {
    println!("[{test}] {line}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(repo().join("target/it/figures.txt"))
    {
        let _ = writeln!(f, "[{test}] {line}");
    }
}
