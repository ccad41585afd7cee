//! Watching ferry's process during the benchmark: its pid, CPU, disk writes
//! and peak memory from `/proc`, the machine's and the brokers' CPU, and
//! ferry's `/metrics` sampled into `metrics-samples.jsonl`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{repo, tail, unique, Ferry, Stack};
use crate::now_us;

/// Every ferry process this run started, for [`kill_ferries_on_panic`].
static FERRY_PIDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Release builds abort on panic, so the harness's `Drop` never stops the
/// ferries; this hook does, before the abort.
pub fn kill_ferries_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(pids) = FERRY_PIDS.lock() {
            for pid in pids.iter() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        default(info);
    }));
}

/// The pid of a started harness `Ferry`, kept for
/// [`kill_ferries_on_panic`].
pub fn ferry_pid(ferry: &Ferry) -> Result<u32, String> {
    let pid = ferry.pid().ok_or("ferry is not running")?;
    FERRY_PIDS.lock().unwrap().push(pid);
    Ok(pid)
}

/// What `/proc` says about a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// Bytes it caused to be written to storage.
    pub write_bytes: u64,
    /// Peak resident set size, kB.
    pub hwm_kb: u64,
}

pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn proc_sample(pid: u32) -> Result<ProcSample, String> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map_err(|e| format!("/proc/{pid}/{f}: {e}"))
    };
    let stat = read("stat")?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        rest.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu_s = (ticks(11) + ticks(12)) / clock_ticks();
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        cpu_s,
        write_bytes: field(&read("io")?, "write_bytes:"),
        hwm_kb: field(&read("status")?, "VmHWM:"),
    })
}

/// The machine's CPU time, busy and all, in clock ticks (`/proc/stat`).
pub fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let all: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (all - idle, all)
}

/// CPU seconds of the stack's brokers (pid files in its state folder) and
/// of this process, to show where a run's CPU went.
pub fn others_cpu() -> BTreeMap<&'static str, f64> {
    let state = std::env::var_os("FERRY_STACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".stack"));
    let mut out = BTreeMap::new();
    for (name, file) in [("pulsar", "pulsar.pid"), ("mosquitto", "mosquitto.pid")] {
        let pid = std::fs::read_to_string(state.join("run").join(file))
            .ok()
            .and_then(|p| p.trim().parse().ok());
        if let Some(Ok(p)) = pid.map(proc_sample) {
            out.insert(name, p.cpu_s);
        }
    }
    if let Ok(p) = proc_sample(std::process::id()) {
        out.insert("bench", p.cpu_s);
    }
    out
}

/// The sum of every series of metric `name`, whatever its labels.
pub fn total(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

/// Scrapes ferry's metrics as often as asked and keeps one sample a second
/// in `metrics-samples.jsonl`.
pub struct Sampler {
    out: std::fs::File,
    last: Option<Instant>,
}

impl Sampler {
    pub fn create(path: &Path) -> Sampler {
        Sampler {
            out: std::fs::File::create(path).expect("create metrics samples"),
            last: None,
        }
    }

    pub async fn poll(&mut self, ferry: &Ferry, phase: &str) -> BTreeMap<String, f64> {
        let Some(m) = ferry.try_scrape().await else {
            return BTreeMap::new();
        };
        if self
            .last
            .map_or(true, |t| t.elapsed() >= Duration::from_secs(1))
        {
            self.last = Some(Instant::now());
            let line = json!({
                "t": now_us() as f64 / 1e6,
                "phase": phase,
                "metrics": m,
            });
            let _ = writeln!(self.out, "{line}");
        }
        m
    }

    /// Polls every 100 ms until `done` holds for a scrape; returns that
    /// scrape and when it was taken.
    pub async fn until(
        &mut self,
        ferry: &Ferry,
        phase: &str,
        limit: Duration,
        what: &str,
        done: impl Fn(&BTreeMap<String, f64>) -> bool,
    ) -> Result<(BTreeMap<String, f64>, Instant), String> {
        let deadline = Instant::now() + limit;
        loop {
            let m = self.poll(ferry, phase).await;
            if !m.is_empty() && done(&m) {
                return Ok((m, Instant::now()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{phase}: {what} not reached in {limit:?}; log tail:\n{}",
                    tail(&ferry.log_text(), 10)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub const ACKED: &str = "ferry_uplink_records_acknowledged_total";
pub const SKIPPED: &str = "ferry_uplink_records_skipped_total";
pub const STORED: &str = "ferry_store_records_stored_total";
pub const UPLINK_UP: &str = "ferry_uplink_connected";
pub const SUPERSEDED: &str = "ferry_store_records_superseded_total";
pub const DROPPED: &str = "ferry_store_records_dropped_total";
pub const COMMITS: &str = "ferry_store_commit_duration_seconds_count";
pub const COMMIT_SECONDS: &str = "ferry_store_commit_duration_seconds_sum";

/// A ferry for one phase, its config written by the harness (with `extra`
/// appended, for example a `[downlink]` section), started and subscribed;
/// with its pid.
pub async fn start_ferry(
    stack: &Stack,
    phase: &str,
    prefix: &str,
    topic: &str,
    extra: &str,
) -> Result<(Ferry, u32), String> {
    let mut ferry = Ferry::new(
        stack,
        phase,
        &unique("gw"),
        &format!("{prefix}/+/state"),
        topic,
        extra,
    );
    // `BENCH_COMMIT_WAIT_MS` sets ferry's group-commit wait (its default
    // otherwise).
    if let Ok(ms) = std::env::var("BENCH_COMMIT_WAIT_MS") {
        ferry.add_settings("store", &format!("commit_max_wait_ms = {ms}"));
    }
    // `BENCH_DURABILITY` sets `store.durability` ("full", the default, or
    // "interval").
    if let Ok(d) = std::env::var("BENCH_DURABILITY") {
        ferry.add_settings("store", &format!("durability = {d:?}"));
    }
    ferry.start();
    let pid = ferry_pid(&ferry)?;
    ferry
        .wait_log("mqtt subscribed", Duration::from_secs(60))
        .await;
    Ok((ferry, pid))
}
