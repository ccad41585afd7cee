use super::verify::{tail, verify};
use super::*;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "ferry-audit-{name}-{}-{}",
            std::process::id(),
            crate::store::db::now_ms()
        ));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }

    fn cfg(&self, max_file_bytes: u64, keep_files: usize) -> AuditConfig {
        AuditConfig {
            dir: self.0.clone(),
            max_file_bytes,
            keep_files,
            journald: false,
        }
    }

    fn names(&self) -> Vec<String> {
        files(&self.0)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn detail(n: u64) -> Map<String, Value> {
    fields([("detail", Value::from(format!("event number {n}")))])
}

#[test]
fn the_sequence_goes_on_across_reopening_and_verify_passes() {
    let dir = Dir::new("reopen");
    for _start in 0..3 {
        let mut log = AuditLog::open(&dir.cfg(1 << 20, 10)).unwrap();
        for n in 0..4 {
            log.record("test", &detail(n)).unwrap();
        }
    }
    let v = verify(&dir.0).unwrap();
    assert_eq!(
        (v.files, v.lines, v.first_seq, v.last_seq, v.anchored),
        (1, 12, 1, 12, false)
    );
    assert_eq!(tail(&dir.0, 2).unwrap().len(), 2);
    assert!(tail(&dir.0, 2).unwrap()[1].starts_with("{\"seq\":12,"));
}

#[test]
fn rotation_keeps_the_chain_across_files_and_removes_the_oldest() {
    let dir = Dir::new("rotate");
    let mut log = AuditLog::open(&dir.cfg(600, 3)).unwrap();
    for n in 0..20 {
        log.record("test", &detail(n)).unwrap();
    }
    drop(log);
    let names = dir.names();
    assert_eq!(names.len(), 3, "{names:?}");
    let v = verify(&dir.0).unwrap();
    assert_eq!(v.last_seq, 20);
    assert!(v.anchored, "older files were removed: {v:?}");
    assert!(v.first_seq > 1);
    // Every file is within its size but for its first line.
    for (_, p) in files(&dir.0).unwrap() {
        assert!(std::fs::metadata(&p).unwrap().len() <= 600, "{p:?}");
    }
    // A file removed in the middle shows as a gap.
    let middle = files(&dir.0).unwrap()[1].1.clone();
    std::fs::remove_file(&middle).unwrap();
    let err = verify(&dir.0).unwrap_err();
    assert!(err.reason.contains("a gap"), "{err}");
}

#[test]
fn one_byte_edited_in_an_old_line_is_named_by_file_and_line() {
    let dir = Dir::new("edit");
    let mut log = AuditLog::open(&dir.cfg(1 << 20, 10)).unwrap();
    for n in 0..6 {
        log.record("test", &detail(n)).unwrap();
    }
    drop(log);
    let (_, path) = files(&dir.0).unwrap().remove(0);
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen("event number 2", "event number 7", 1);
    assert_ne!(text, edited);
    std::fs::write(&path, edited).unwrap();
    let err = verify(&dir.0).unwrap_err();
    assert_eq!((err.file.clone(), err.line), (path.clone(), 3), "{err}");
    assert!(err.to_string().contains(":3: "), "{err}");
}

#[test]
fn an_edited_last_line_of_a_file_is_named_in_that_file() {
    let dir = Dir::new("edit-across");
    let mut log = AuditLog::open(&dir.cfg(600, 10)).unwrap();
    for n in 0..10 {
        log.record("test", &detail(n)).unwrap();
    }
    drop(log);
    let (_, first) = files(&dir.0).unwrap().remove(0);
    let text = std::fs::read_to_string(&first).unwrap();
    let n = text.lines().count();
    let last = text.lines().last().unwrap().to_string();
    std::fs::write(
        &first,
        text.replace(&last, &last.replace("number", "Number")),
    )
    .unwrap();
    let err = verify(&dir.0).unwrap_err();
    assert_eq!((err.file.clone(), err.line), (first, n), "{err}");
}

#[test]
fn a_torn_last_line_is_cut_off_and_said_and_the_chain_goes_on() {
    let dir = Dir::new("torn");
    let mut log = AuditLog::open(&dir.cfg(1 << 20, 10)).unwrap();
    for n in 0..3 {
        log.record("test", &detail(n)).unwrap();
    }
    drop(log);
    let (_, path) = files(&dir.0).unwrap().remove(0);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"seq\":4,\"at\":\"20").unwrap();
    drop(f);
    let mut log = AuditLog::open(&dir.cfg(1 << 20, 10)).unwrap();
    assert_eq!(log.last_seq(), 4, "the cut is recorded as seq 4");
    log.record("test", &detail(9)).unwrap();
    let v = verify(&dir.0).unwrap();
    assert_eq!(v.last_seq, 5);
    let lines = tail(&dir.0, 2).unwrap();
    assert!(
        lines[0].contains("\"event\":\"audit-tail-cut\",\"bytes\":17"),
        "{lines:?}"
    );
}

#[test]
fn a_token_is_known_by_its_fingerprint_only() {
    let a = fingerprint("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJndy0xIn0.sig-a");
    let b = fingerprint("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJndy0xIn0.sig-b");
    assert_ne!(a, b);
    assert_eq!(a.len(), "sha256:".len() + 16);
    assert!(!a.contains("eyJ"));
}
