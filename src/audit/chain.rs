//! The audit trail's hash chain: how a record becomes a line, and how a set of files is
//! checked (`tributary audit verify`).
//!
//! # Why a chain over the exact bytes
//! Each line is `{"seq":N,"prev":"<hex>","event":{...},"hash":"<hex>"}` where `hash` is the
//! SHA-256 of every byte of the line before `,"hash"`, and `prev` is the previous line's
//! `hash` (64 zeros for the first record ever). The hash covers `seq` and `prev`, so:
//! - editing any byte of a record changes its hash (detected at that record);
//! - deleting a record breaks the next record's `prev` and leaves a gap in `seq`;
//! - reordering breaks `prev` at the first moved record.
//!
//! Hashing the bytes as written (not a re-serialisation) keeps the verifier independent of
//! JSON key order or number formatting. Rotation only moves whole lines to a new file, so the
//! chain runs on across files; verifying the files in order checks the joins too. Cutting
//! records off the *end* of the newest file is not visible in the chain itself: compare the
//! verified head with `tributary_audit_head_seq` on `/metrics` (or any copy shipped off the box).

use std::{fmt, path::Path, path::PathBuf};

use sha2::{Digest, Sha256};

/// `prev` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_SUFFIX_LEN: usize = r#","hash":""#.len() + 64 + r#""}"#.len();

/// Appends one chained line (with its newline) to `out`; returns the new line's hash.
pub fn append_line(out: &mut Vec<u8>, seq: u64, prev: &str, event_json: &[u8]) -> String {
    let start = out.len();
    out.extend_from_slice(format!(r#"{{"seq":{seq},"prev":"{prev}","event":"#).as_bytes());
    out.extend_from_slice(event_json);
    let hash = hex(&Sha256::digest(&out[start..]));
    out.extend_from_slice(format!(r#","hash":"{hash}"}}"#).as_bytes());
    out.push(b'\n');
    hash
}

/// A line taken apart and checked against its own hash.
#[derive(Debug)]
pub struct Link {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    pub event: serde_json::Value,
}

/// Why one line is not a sound link (on its own).
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    Shape(&'static str),
    HashMismatch,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape(s) => write!(f, "not an audit record: {s}"),
            Self::HashMismatch => {
                f.write_str("record was altered: its hash does not match its content")
            }
        }
    }
}

/// Parses one line (without its newline) and checks its own hash.
pub fn parse_line(line: &[u8]) -> Result<Link, LineError> {
    if line.len() <= HASH_SUFFIX_LEN {
        return Err(LineError::Shape("too short"));
    }
    let (body, suffix) = line.split_at(line.len() - HASH_SUFFIX_LEN);
    let hash = suffix
        .strip_prefix(br#","hash":""#)
        .and_then(|s| s.strip_suffix(br#""}"#))
        .filter(|h| {
            h.iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or(LineError::Shape("no hash at the end"))?;
    let hash = String::from_utf8_lossy(hash).into_owned();
    if hex(&Sha256::digest(body)) != hash {
        return Err(LineError::HashMismatch);
    }
    let mut whole = body.to_vec();
    whole.push(b'}');
    let value: serde_json::Value =
        serde_json::from_slice(&whole).map_err(|_| LineError::Shape("not json"))?;
    let seq = value["seq"].as_u64().ok_or(LineError::Shape("no seq"))?;
    let prev = value["prev"]
        .as_str()
        .filter(|p| p.len() == 64)
        .ok_or(LineError::Shape("no prev"))?
        .to_owned();
    let event = value
        .get("event")
        .cloned()
        .ok_or(LineError::Shape("no event"))?;
    Ok(Link {
        seq,
        prev,
        hash,
        event,
    })
}

/// What a successful verification saw.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    /// The first record's sequence number (0 when the files start the chain).
    pub first_seq: Option<u64>,
    /// The last record's sequence number and hash: the chain's head.
    pub head: Option<(u64, String)>,
}

/// The first bad record, named.
#[derive(Debug, PartialEq, Eq)]
pub struct BadRecord {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: usize,
    pub seq: Option<u64>,
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, " (seq {seq})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Checks files that hold one chain, in order (oldest first). A directory stands for its
/// audit files in chain order. The first file may continue an older, absent file; every
/// later join must be exact.
pub fn verify(paths: &[PathBuf]) -> Result<Verified, BadRecord> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(super::writer::chain_files(p).map_err(|e| BadRecord {
                file: p.clone(),
                line: 0,
                seq: None,
                reason: format!("cannot list: {e}"),
            })?);
        } else {
            files.push(p.clone());
        }
    }
    let mut expected: Option<(u64, String)> = None;
    let mut first_seq = None;
    let mut records = 0;
    for file in &files {
        let bytes = std::fs::read(file).map_err(|e| BadRecord {
            file: file.clone(),
            line: 0,
            seq: None,
            reason: format!("cannot read: {e}"),
        })?;
        let bad = |line: usize, seq: Option<u64>, reason: String| BadRecord {
            file: file.clone(),
            line,
            seq,
            reason,
        };
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            let line = bytes.split(|b| *b == b'\n').count();
            return Err(bad(line, None, "the last record is incomplete".into()));
        }
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let link = parse_line(line).map_err(|e| bad(i + 1, seq_hint(line), e.to_string()))?;
            match &expected {
                None if link.seq == 0 && link.prev != GENESIS => {
                    return Err(bad(
                        i + 1,
                        Some(0),
                        "the first record must follow the genesis hash".into(),
                    ));
                }
                None => first_seq = Some(link.seq),
                Some((seq, prev)) => {
                    if link.seq != *seq {
                        return Err(bad(
                            i + 1,
                            Some(link.seq),
                            format!(
                                "expected seq {seq}: records were deleted, inserted or reordered"
                            ),
                        ));
                    }
                    if link.prev != *prev {
                        return Err(bad(
                            i + 1,
                            Some(link.seq),
                            "does not follow the previous record: the chain is broken".into(),
                        ));
                    }
                }
            }
            records += 1;
            expected = Some((link.seq + 1, link.hash));
        }
    }
    Ok(Verified {
        records,
        first_seq,
        head: expected.map(|(seq, hash)| (seq - 1, hash)),
    })
}

/// The `seq` of a line that failed to verify, if it can still be read.
fn seq_hint(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix(r#"{"seq":"#)?;
    rest.split(',').next()?.parse().ok()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// True if `path` looks like one of this log's files (for listing a directory).
pub fn is_audit_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("audit") && n.ends_with(".jsonl"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn chain(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut prev = GENESIS.to_owned();
        for seq in 0..n {
            prev = append_line(
                &mut out,
                seq,
                &prev,
                format!(r#"{{"resourceType":"AuditEvent","n":{seq}}}"#).as_bytes(),
            );
        }
        out
    }

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn tmp() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "tributary-chain-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn lines(bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect()
    }

    #[test]
    fn an_untouched_chain_verifies_and_reports_its_head() {
        let d = tmp();
        let f = write(&d, "audit.jsonl", &chain(5));
        let v = verify(&[f]).unwrap();
        assert_eq!(v.records, 5);
        assert_eq!(v.first_seq, Some(0));
        assert_eq!(v.head.unwrap().0, 4);
    }

    #[test]
    fn an_edited_record_is_named() {
        let d = tmp();
        let mut ls = lines(&chain(5));
        let edited = String::from_utf8(ls[2].clone())
            .unwrap()
            .replace(r#""n":2"#, r#""n":7"#);
        ls[2] = edited.into_bytes();
        let f = write(&d, "audit.jsonl", &join(&ls));
        let bad = verify(&[f]).unwrap_err();
        assert_eq!((bad.line, bad.seq), (3, Some(2)));
        assert!(bad.reason.contains("altered"), "{bad}");
    }

    #[test]
    fn an_edit_that_recomputes_the_hash_still_breaks_the_next_link() {
        let d = tmp();
        let mut ls = lines(&chain(5));
        // Rewrite record 2 properly (valid hash), as a forger without the later records would.
        let mut forged = Vec::new();
        let prev = parse_line(&ls[1]).unwrap().hash;
        append_line(
            &mut forged,
            2,
            &prev,
            br#"{"resourceType":"AuditEvent","n":99}"#,
        );
        ls[2] = lines(&forged).remove(0);
        let f = write(&d, "audit.jsonl", &join(&ls));
        let bad = verify(&[f]).unwrap_err();
        assert_eq!((bad.line, bad.seq), (4, Some(3)), "{bad}");
    }

    #[test]
    fn a_deleted_record_is_named() {
        let d = tmp();
        let mut ls = lines(&chain(5));
        ls.remove(1);
        let f = write(&d, "audit.jsonl", &join(&ls));
        let bad = verify(&[f]).unwrap_err();
        assert_eq!((bad.line, bad.seq), (2, Some(2)), "{bad}");
        assert!(bad.reason.contains("expected seq 1"), "{bad}");
    }

    #[test]
    fn reordered_records_are_named() {
        let d = tmp();
        let mut ls = lines(&chain(5));
        ls.swap(2, 3);
        let f = write(&d, "audit.jsonl", &join(&ls));
        let bad = verify(&[f]).unwrap_err();
        assert_eq!((bad.line, bad.seq), (3, Some(3)), "{bad}");
    }

    #[test]
    fn a_chain_split_across_rotated_files_verifies_and_a_missing_file_is_caught() {
        let d = tmp();
        let ls = lines(&chain(6));
        let a = write(&d, "audit-000000000000.jsonl", &join(&ls[..2]));
        let b = write(&d, "audit-000000000002.jsonl", &join(&ls[2..4]));
        let c = write(&d, "audit.jsonl", &join(&ls[4..]));
        assert_eq!(verify(&[a.clone(), b, c.clone()]).unwrap().records, 6);
        assert_eq!(verify(std::slice::from_ref(&d)).unwrap().records, 6);
        let bad = verify(&[a, c]).unwrap_err();
        assert_eq!(bad.seq, Some(4), "{bad}");
    }

    #[test]
    fn a_torn_last_line_is_reported() {
        let d = tmp();
        let mut bytes = chain(3);
        bytes.truncate(bytes.len() - 10);
        let f = write(&d, "audit.jsonl", &bytes);
        let bad = verify(&[f]).unwrap_err();
        assert_eq!(bad.line, 3);
    }
}
