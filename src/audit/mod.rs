//! The audit trail: security events of this gateway, append-only, one JSON
//! line each, chained by hashes so that a gap or an edit shows
//! ([`chain`]), in files under `audit.dir` that rotate by size, and the
//! same lines to journald ([`journal`], `journalctl -t ferry-audit`).
//!
//! What is recorded: start and stop (version, the configuration file's
//! hash), a reload (both hashes, the keys that changed) or a refused one; a
//! token read or rotated (subject, expiry, a fingerprint, never the token);
//! the broker refusing the token, refusing a topic to the role, a TLS
//! failure (throttled per topic and kind); the store's incidents (moved
//! aside as damaged, disk full and back, a broker number refused,
//! deduplication off); records shed by a policy, summed per minute; the
//! downlink applying a desired version or finding one stale.
//!
//! One writer per process ([`install`]); [`Event::record`] anywhere in the
//! agent appends through it and does nothing when none is installed (unit
//! tests, `ferry check`). A line reaches the file in one `write` with
//! `O_APPEND` before `record` returns (no fsync: a power cut may lose the
//! last lines; a torn last line is cut off at the next start, and that is
//! recorded too).

pub mod chain;
pub mod journal;
pub mod verify;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::AuditConfig;
use chain::{Tip, GENESIS};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit folder {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("audit file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
}

/// The file name of the audit file whose first line is `first_seq`.
pub fn file_name(first_seq: u64) -> String {
    format!("audit-{first_seq:012}.jsonl")
}

/// The audit files in `dir`, oldest first, with their first line's number.
pub fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, std::io::Error> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(seq) = name
            .strip_prefix("audit-")
            .and_then(|s| s.strip_suffix(".jsonl"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((seq, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// The appending end of the audit trail.
pub struct AuditLog {
    dir: PathBuf,
    max_file_bytes: u64,
    keep_files: usize,
    /// The file being written and its length; `None` before the first line.
    file: Option<(File, u64)>,
    tip: Tip,
    journal: Option<journal::Journal>,
    /// When a throttled event was last recorded, by its key.
    throttled: HashMap<String, Instant>,
}

impl AuditLog {
    /// Opens the trail in `cfg.dir` (created if needed) where it ended: the
    /// newest file's last line gives the next number and hash. A torn last
    /// line (a power cut mid-write) is cut off and recorded.
    pub fn open(cfg: &AuditConfig) -> Result<AuditLog, AuditError> {
        let folder = |source| AuditError::Folder {
            path: cfg.dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&cfg.dir).map_err(folder)?;
        let mut log = AuditLog {
            dir: cfg.dir.clone(),
            max_file_bytes: cfg.max_file_bytes,
            keep_files: cfg.keep_files.max(1),
            file: None,
            tip: Tip {
                seq: 0,
                hash: GENESIS.to_string(),
            },
            journal: if cfg.journald {
                journal::Journal::open(Path::new(journal::SOCKET))
            } else {
                None
            },
            throttled: HashMap::new(),
        };
        let mut torn = 0;
        for (_, path) in files(&cfg.dir).map_err(folder)?.iter().rev() {
            let file_err = |source| AuditError::File {
                path: path.display().to_string(),
                source,
            };
            let mut text = String::new();
            File::open(path)
                .and_then(|mut f| f.read_to_string(&mut text))
                .map_err(file_err)?;
            if !text.is_empty() && !text.ends_with('\n') {
                let keep = text.rfind('\n').map_or(0, |i| i + 1);
                torn = text.len() - keep;
                text.truncate(keep);
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(keep as u64))
                    .map_err(file_err)?;
            }
            let Some(last) = text.lines().last() else {
                continue;
            };
            // The last line that parses gives the number; lines after it
            // (damaged ones, which `audit verify` will name) count on.
            let lines: Vec<&str> = text.lines().collect();
            let (after, seq) = lines
                .iter()
                .rev()
                .enumerate()
                .find_map(|(i, l)| chain::parse(l).ok().map(|(seq, _)| (i as u64, seq)))
                .unwrap_or((lines.len() as u64, 0));
            log.tip = Tip {
                seq: seq + after,
                hash: chain::sha256_hex(last.as_bytes()),
            };
            let file = OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(file_err)?;
            log.file = Some((file, text.len() as u64));
            break;
        }
        if torn > 0 {
            log.record(
                "audit-tail-cut",
                &fields([("bytes", Value::from(torn as u64))]),
            )
            .map_err(|source| AuditError::File {
                path: cfg.dir.display().to_string(),
                source,
            })?;
        }
        Ok(log)
    }

    /// The number of the last line written (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.tip.seq
    }

    /// Appends one event, in one write; the chain moves on only once the
    /// line reached the file.
    pub fn record(&mut self, kind: &str, fields: &Map<String, Value>) -> std::io::Result<()> {
        let seq = self.tip.seq + 1;
        let line = chain::line(
            seq,
            crate::store::db::now_ms(),
            kind,
            fields,
            &self.tip.hash,
        );
        let len = line.len() as u64 + 1;
        let full = self
            .file
            .as_ref()
            .map_or(true, |(_, n)| *n > 0 && n + len > self.max_file_bytes);
        if full {
            self.rotate(seq)?;
        }
        let (file, n) = self.file.as_mut().expect("opened by rotate");
        let mut bytes = line.clone().into_bytes();
        bytes.push(b'\n');
        file.write_all(&bytes)?;
        *n += len;
        self.tip = Tip {
            seq,
            hash: chain::sha256_hex(line.as_bytes()),
        };
        if let Some(j) = &self.journal {
            j.send(&line);
        }
        Ok(())
    }

    /// Starts the file whose first line is `seq` and removes the oldest
    /// beyond `keep_files`.
    fn rotate(&mut self, seq: u64) -> std::io::Result<()> {
        let path = self.dir.join(file_name(seq));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.file = Some((file, 0));
        let all = files(&self.dir)?;
        let extra = all.len().saturating_sub(self.keep_files);
        for (_, old) in &all[..extra] {
            std::fs::remove_file(old)?;
        }
        Ok(())
    }
}

/// Fields from pairs.
pub fn fields<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The process's writer, once [`install`]ed.
static LOG: Mutex<Option<AuditLog>> = Mutex::new(None);

/// Makes `log` the process's audit trail.
pub fn install(log: AuditLog) {
    *LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(log);
}

/// Closes the process's audit trail (after the `stop` event).
pub fn uninstall() {
    flush_shed();
    LOG.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// Records shed since the last [`flush_shed`], by `stream/reason`.
static SHED: Mutex<Option<(Instant, std::collections::BTreeMap<String, u64>)>> = Mutex::new(None);

/// Counts `n` records of `stream` shed for `reason` (superseded, max_age,
/// ...): they go to the trail summed, at the next [`flush_shed`].
pub fn shed(stream: &str, reason: &str, n: u64) {
    if n == 0 {
        return;
    }
    let mut guard = SHED.lock().unwrap_or_else(|e| e.into_inner());
    let (_, counts) = guard.get_or_insert_with(|| (Instant::now(), Default::default()));
    *counts.entry(format!("{stream}/{reason}")).or_default() += n;
}

/// One `records-shed` event with what was shed since the first record of
/// it that is not in the trail yet, if any.
pub fn flush_shed() {
    let Some((since, counts)) = SHED.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    let total: u64 = counts.values().sum();
    Event::new("records-shed")
        .field("records", total)
        .field(
            "by_stream_and_reason",
            serde_json::to_value(&counts).unwrap_or_default(),
        )
        .field("over_secs", since.elapsed().as_secs())
        .record();
}

/// One audit event, built with [`Event::field`] and appended with
/// [`Event::record`].
#[derive(Debug, Clone)]
pub struct Event {
    kind: &'static str,
    fields: Map<String, Value>,
}

impl Event {
    pub fn new(kind: &'static str) -> Event {
        Event {
            kind,
            fields: Map::new(),
        }
    }

    pub fn field(mut self, key: &str, value: impl Into<Value>) -> Event {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Appends the event to the process's trail, if there is one. A write
    /// that fails is logged; ferry's work goes on.
    pub fn record(self) {
        let mut guard = LOG.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = guard.as_mut() {
            if let Err(e) = log.record(self.kind, &self.fields) {
                tracing::warn!(error = %e, event = self.kind, "audit event not written");
            }
        }
    }

    /// Like [`Event::record`], but at most once per `every` for `key` (a
    /// refusal repeated at every reconnect is recorded once per period).
    pub fn record_at_most_every(self, key: String, every: Duration) {
        {
            let mut guard = LOG.lock().unwrap_or_else(|e| e.into_inner());
            let Some(log) = guard.as_mut() else { return };
            let now = Instant::now();
            if log
                .throttled
                .get(&key)
                .is_some_and(|t| now.duration_since(*t) < every)
            {
                return;
            }
            log.throttled.insert(key, now);
        }
        self.record();
    }
}

/// How often the same refusal (topic and kind) is recorded, at most.
pub const REFUSAL_EVERY: Duration = Duration::from_secs(600);

/// A token's fingerprint: the first 16 hex digits of its SHA-256. Tells
/// tokens apart without revealing them.
pub fn fingerprint(token: &str) -> String {
    format!("sha256:{}", &chain::sha256_hex(token.as_bytes())[..16])
}

/// The fingerprint of the token last read, for telling a rotation.
static LAST_TOKEN: Mutex<Option<String>> = Mutex::new(None);

/// A token was read from `source`: the first read and every change of
/// token are recorded (subject and expiry as the token claims them,
/// unverified; its fingerprint).
pub fn token_read(source: &str, token: &str, subject: Option<String>, expires_at: Option<u64>) {
    let fp = fingerprint(token);
    let previous = {
        let mut last = LAST_TOKEN.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == Some(fp.as_str()) {
            return;
        }
        last.replace(fp.clone())
    };
    let kind = if previous.is_some() {
        "token-rotated"
    } else {
        "token-read"
    };
    let mut e = Event::new(kind)
        .field("source", source)
        .field("fingerprint", fp)
        .field("subject", subject.map_or(Value::Null, Value::from))
        .field(
            "expires_at",
            expires_at.map_or(Value::Null, |s| {
                Value::from(chain::rfc3339_ms(s.saturating_mul(1000)))
            }),
        );
    if let Some(p) = previous {
        e = e.field("previous_fingerprint", p);
    }
    e.record();
}

#[cfg(test)]
mod tests;
