//! The audit file's format and its chain, without I/O: how a line is made
//! from an event, and how a sequence of lines is checked.
//!
//! One JSON object per line: `seq` (rises by one per event, never
//! restarts), `at` (UTC, RFC 3339 with milliseconds), `event`, the event's
//! own fields, and `prev`: the SHA-256 (hex) of the previous line's bytes
//! (without its newline), or [`GENESIS`] for the first line ever. A line
//! changed, removed or inserted breaks the chain at the line after it; a
//! gap in `seq` shows too.

use serde_json::{Map, Value};

/// The `prev` of the very first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The line (without newline) of event `kind` with `fields`, number `seq`,
/// at `at_ms` (milliseconds since the epoch), after the line hashed `prev`.
/// Fields named like the chain's own keys are prefixed with `_`.
pub fn line(seq: u64, at_ms: u64, kind: &str, fields: &Map<String, Value>, prev: &str) -> String {
    // serde_json's map keeps keys sorted; the chain's keys come first and
    // `prev` last by writing the object by hand around the fields.
    let mut out = String::with_capacity(160);
    out.push_str(&format!(
        "{{\"seq\":{seq},\"at\":{},\"event\":{}",
        Value::from(rfc3339_ms(at_ms)),
        Value::from(kind)
    ));
    for (k, v) in fields {
        let k = match k.as_str() {
            "seq" | "at" | "event" | "prev" => format!("_{k}"),
            _ => k.clone(),
        };
        out.push(',');
        out.push_str(&Value::from(k).to_string());
        out.push(':');
        out.push_str(&v.to_string());
    }
    out.push_str(&format!(",\"prev\":\"{prev}\"}}"));
    out
}

/// `at_ms` as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_ms(at_ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(at_ms as i64)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The `seq` and `prev` a line holds, if it is an audit line at all.
pub fn parse(line: &str) -> Result<(u64, String), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not a JSON line ({e})"))?;
    let seq = v["seq"].as_u64().ok_or("no seq")?;
    let prev = v["prev"].as_str().ok_or("no prev")?.to_string();
    if v["event"].as_str().is_none() {
        return Err("no event".into());
    }
    Ok((seq, prev))
}

/// Where the chain is, while checking: the last line's number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tip {
    pub seq: u64,
    pub hash: String,
}

/// Why the chain breaks at a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// Index (from 0) into the lines checked of the line where it broke.
    pub index: usize,
    /// Whether the line at fault is the one before (whose hash this line
    /// does not hold), which may be the last line of an earlier file.
    pub before: bool,
    pub reason: String,
}

/// Checks `lines` in order. `tip` is where the chain stood before the first
/// of them: `None` at the very start (the first line must be seq 1 after
/// [`GENESIS`]) or for an anchor (the oldest file kept, whose predecessors
/// were rotated away: its first line is taken as it is).
///
/// When a line's `prev` is not the hash of the line before it, the line
/// before it is named: it was changed (or this line's `prev` was).
pub fn check<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    mut tip: Option<Tip>,
    anchored: bool,
) -> Result<Option<Tip>, Break> {
    for (i, l) in lines.into_iter().enumerate() {
        let (seq, prev) = parse(l).map_err(|reason| Break {
            index: i,
            before: false,
            reason,
        })?;
        match &tip {
            None if !anchored && (seq != 1 || prev != GENESIS) => {
                return Err(Break {
                    index: i,
                    before: false,
                    reason: format!(
                        "the first line must be seq 1 after {GENESIS}, found seq {seq}"
                    ),
                });
            }
            None => {}
            Some(t) => {
                if seq != t.seq + 1 {
                    return Err(Break {
                        index: i,
                        before: false,
                        reason: format!(
                            "seq {seq} follows seq {}: a gap or a line out of place",
                            t.seq
                        ),
                    });
                }
                if prev != t.hash {
                    return Err(Break {
                        index: i,
                        before: true,
                        reason: format!(
                            "its hash is not what the next line (seq {seq}) holds: this line was changed (or the next one's prev)"
                        ),
                    });
                }
            }
        }
        tip = Some(Tip {
            seq,
            hash: sha256_hex(l.as_bytes()),
        });
    }
    Ok(tip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chain(n: u64) -> Vec<String> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut f = Map::new();
                f.insert("detail".into(), json!(format!("event {seq}")));
                let l = line(seq, 1_700_000_000_000 + seq, "test", &f, &prev);
                prev = sha256_hex(l.as_bytes());
                l
            })
            .collect()
    }

    #[test]
    fn a_line_is_one_json_object_with_the_chain_around_its_fields() {
        let mut f = Map::new();
        f.insert("subject".into(), json!("gw-1"));
        f.insert("seq".into(), json!("spoof"));
        let l = line(7, 0, "token-read", &f, GENESIS);
        assert_eq!(
            l,
            format!("{{\"seq\":7,\"at\":\"1970-01-01T00:00:00.000Z\",\"event\":\"token-read\",\"_seq\":\"spoof\",\"subject\":\"gw-1\",\"prev\":\"{GENESIS}\"}}")
        );
        assert_eq!(parse(&l).unwrap(), (7, GENESIS.to_string()));
    }

    #[test]
    fn an_intact_chain_passes_and_its_tip_is_the_last_line() {
        let lines = chain(5);
        let tip = check(lines.iter().map(String::as_str), None, false)
            .unwrap()
            .unwrap();
        assert_eq!(tip.seq, 5);
        assert_eq!(tip.hash, sha256_hex(lines[4].as_bytes()));
    }

    #[test]
    fn one_byte_changed_in_a_line_names_that_line() {
        let mut lines = chain(5);
        // Still valid JSON: only the hash can tell.
        lines[2] = lines[2].replace("event 3", "event 8");
        let err = check(lines.iter().map(String::as_str), None, false).unwrap_err();
        assert_eq!((err.index, err.before), (3, true), "{err:?}");
        // Broken JSON names the line itself.
        let mut lines = chain(5);
        lines[1].insert(3, 'x');
        let err = check(lines.iter().map(String::as_str), None, false).unwrap_err();
        assert_eq!((err.index, err.before), (1, false), "{err:?}");
    }

    #[test]
    fn a_removed_line_shows_as_a_gap() {
        let mut lines = chain(5);
        lines.remove(3);
        let err = check(lines.iter().map(String::as_str), None, false).unwrap_err();
        assert_eq!(err.index, 3);
        assert!(err.reason.contains("seq 5 follows seq 3"), "{err:?}");
    }

    #[test]
    fn a_chain_that_does_not_start_at_one_passes_only_as_an_anchor() {
        let lines = chain(5);
        let rest = || lines[2..].iter().map(String::as_str);
        assert!(check(rest(), None, false).is_err());
        assert_eq!(check(rest(), None, true).unwrap().unwrap().seq, 5);
    }
}
