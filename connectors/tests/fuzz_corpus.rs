//! Replays the committed fuzz corpora of the connectors' targets through
//! `connectors::fuzzing`, the same functions `fuzz/` runs under libFuzzer (Envoy's rule: every
//! seed and every fixed crash is an ordinary test in CI, on stable).
//!
//! Each target's `fuzz/corpus/<target>/` must exist and hold files, so this cannot pass by
//! replaying nothing; `fuzz/regressions/<target>/` (crash reproducers, once fixed) is replayed
//! too when present. The UCLH HL7 v2 messages are GPL-3.0, so they are not copied into the
//! corpus: they are read in place from `../shared/testdata`.
#![allow(clippy::unwrap_used)]

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_all(target: &str, inputs: &[(String, Vec<u8>)], run: fn(&[u8])) {
    let failed: Vec<&str> = inputs
        .iter()
        .filter(|(_, data)| catch_unwind(AssertUnwindSafe(|| run(data))).is_err())
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(failed.is_empty(), "{target}: inputs failing: {failed:#?}");
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let fuzz = repo().join("fuzz");
    let dir = fuzz.join("corpus").join(target);
    let mut files = files_in(&dir);
    assert!(
        !files.is_empty(),
        "fuzz corpus {} is missing or empty",
        dir.display()
    );
    files.extend(files_in(&fuzz.join("regressions").join(target)));
    files
        .into_iter()
        .map(|f| (f.display().to_string(), std::fs::read(&f).unwrap()))
        .collect()
}

/// The UCLH messages (LF-separated, GPL-3.0: read in place, never copied).
fn uclh() -> Vec<(String, Vec<u8>)> {
    let dir = repo().join("../shared/testdata/uclh-emap-hl7v2-adt");
    let files: Vec<PathBuf> = files_in(&dir)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "txt"))
        .collect();
    assert!(!files.is_empty(), "{} is missing or empty", dir.display());
    files
        .into_iter()
        .map(|f| (f.display().to_string(), std::fs::read(&f).unwrap()))
        .collect()
}

#[test]
fn hl7v2_message_corpus_replays() {
    let mut inputs = corpus("hl7v2_message");
    inputs.extend(uclh());
    run_all("hl7v2_message", &inputs, connectors::fuzzing::hl7v2_message);
}

#[test]
fn mllp_framing_corpus_replays() {
    let mut inputs = corpus("mllp_framing");
    // Every UCLH message framed as a PAS sends it, delivered 7 and 3 bytes at a time.
    for (name, text) in uclh() {
        let mut framed = vec![2, 7, 3, 0x0b];
        framed.extend(text.iter().map(|&b| if b == b'\n' { b'\r' } else { b }));
        framed.extend([0x1c, 0x0d]);
        inputs.push((name, framed));
    }
    run_all("mllp_framing", &inputs, connectors::fuzzing::mllp_framing);
}

#[test]
fn fhir_ingest_corpus_replays() {
    run_all(
        "fhir_ingest",
        &corpus("fhir_ingest"),
        connectors::fuzzing::fhir_ingest,
    );
}

#[test]
fn a_missing_corpus_fails_the_replay() {
    assert!(catch_unwind(|| corpus("no_such_target")).is_err());
}
