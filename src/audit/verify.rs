//! `ferry audit verify` and `ferry audit tail`: reading the trail back.

use std::path::{Path, PathBuf};

use super::chain::{self, Tip};
use super::files;

/// An intact trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub files: usize,
    pub lines: u64,
    /// The first and last line numbers (0, 0 for an empty trail).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Whether the oldest file kept starts after seq 1 (older files were
    /// rotated away; the chain is checked from there).
    pub anchored: bool,
}

/// Where the trail breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {reason}", file.display())]
pub struct Broken {
    pub file: PathBuf,
    /// From 1.
    pub line: usize,
    pub reason: String,
}

/// Checks every audit file in `dir`, oldest first, carrying the chain
/// across files; the first break found.
pub fn verify(dir: &Path) -> Result<Verified, Broken> {
    let list = files(dir).map_err(|e| Broken {
        file: dir.to_path_buf(),
        line: 0,
        reason: format!("cannot list: {e}"),
    })?;
    let mut tip: Option<Tip> = None;
    // The previous file and its line count, for a break at the line before
    // a file's first.
    let mut previous: Option<(PathBuf, usize)> = None;
    let mut out = Verified {
        files: list.len(),
        lines: 0,
        first_seq: 0,
        last_seq: 0,
        anchored: false,
    };
    for (i, (first, path)) in list.iter().enumerate() {
        let text = std::fs::read_to_string(path).map_err(|e| Broken {
            file: path.clone(),
            line: 0,
            reason: format!("cannot read: {e}"),
        })?;
        let lines: Vec<&str> = text.lines().collect();
        if let Some(l) = lines.first() {
            let named = chain::parse(l).map(|(seq, _)| seq);
            if named.as_ref().is_ok_and(|seq| seq != first) {
                return Err(Broken {
                    file: path.clone(),
                    line: 1,
                    reason: format!(
                        "the file is named for seq {first} but starts at seq {}",
                        named.unwrap()
                    ),
                });
            }
        }
        let anchored = i == 0 && *first != 1;
        out.anchored |= anchored;
        tip = chain::check(lines.iter().copied(), tip, anchored).map_err(|b| {
            let (file, line) = match (b.before, b.index, &previous) {
                (true, 0, Some((file, n))) => (file.clone(), *n),
                (true, i, _) => (path.clone(), i),
                (false, i, _) => (path.clone(), i + 1),
            };
            Broken {
                file,
                line,
                reason: b.reason,
            }
        })?;
        previous = Some((path.clone(), lines.len()));
        if out.first_seq == 0 && !lines.is_empty() {
            out.first_seq = *first;
        }
        out.lines += lines.len() as u64;
    }
    out.last_seq = tip.map_or(0, |t| t.seq);
    Ok(out)
}

/// The last `n` lines of the trail, oldest first.
pub fn tail(dir: &Path, n: usize) -> std::io::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for (_, path) in files(dir)?.iter().rev() {
        let text = std::fs::read_to_string(path)?;
        let mut lines: Vec<String> = text
            .lines()
            .rev()
            .take(n - out.len())
            .map(String::from)
            .collect();
        lines.reverse();
        lines.append(&mut out);
        out = lines;
        if out.len() >= n {
            break;
        }
    }
    Ok(out)
}
