//! A store path that is not a regular file (a FIFO, a directory, a device)
//! is refused with a clear error instead of hanging or failing obscurely.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

/// Runs ferry with `args`; its exit code and stderr, or a failure if it
/// does not finish within `limit` (it is killed then).
fn run_for(args: &[&str], config: &std::path::Path, limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(ferry_bin())
        .args(args)
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferry {args:?} did not finish within {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fifo_or_a_directory_as_the_store_is_refused_by_status_and_run() {
    let stack = Stack {
        pulsar_port: 1,
        web_port: 1,
        mqtt_port: 1,
        postgres_port: 1,
    };
    let mut ferry = Ferry::new(
        &stack,
        "fifo",
        "gw-fifo",
        "devices/+/state",
        "persistent://public/default/x",
        "",
    );
    let fifo = ferry.dir.join("store.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    ferry.move_store(&fifo);
    for args in [&["status", "--config"][..], &["run", "--config"][..]] {
        let (code, err) = run_for(args, &ferry.config, Duration::from_secs(10));
        report(
            "fifo",
            &format!("ferry {} on a FIFO: exit {code:?}: {err}", args[0]),
        );
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    }
    // A directory, and a FIFO where SQLite's WAL would go.
    let dir = ferry.dir.join("store.d");
    std::fs::create_dir(&dir).unwrap();
    ferry.move_store(&dir);
    let (code, err) = run_for(
        &["status", "--config"],
        &ferry.config,
        Duration::from_secs(10),
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is a directory, not a regular file"), "{err}");
    let db = ferry.dir.join("ferry2.db");
    ferry.move_store(&db);
    let wal = ferry.dir.join("ferry2.db-wal");
    assert!(Command::new("mkfifo").arg(&wal).status().unwrap().success());
    let (code, err) = run_for(&["run", "--config"], &ferry.config, Duration::from_secs(10));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ferry2.db-wal"), "{err}");
}
