//! Replays the committed fuzz corpora of the gateway's targets through `tributary::fuzzing`,
//! the same functions `fuzz/` runs under libFuzzer (Envoy's rule: every seed and every fixed
//! crash is an ordinary test in CI, on stable).
//!
//! Each target's `fuzz/corpus/<target>/` must exist and hold files, so this cannot pass by
//! replaying nothing; `fuzz/regressions/<target>/` (crash reproducers, once fixed) is replayed
//! too when present.
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

fn replay(target: &str, run: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let mut files = files_in(&corpus);
    assert!(
        !files.is_empty(),
        "fuzz corpus {} is missing or empty",
        corpus.display()
    );
    files.extend(files_in(&fuzz.join("regressions").join(target)));
    let failed: Vec<String> = files
        .iter()
        .filter(|f| {
            let data = std::fs::read(f).unwrap();
            catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target}: seeds failing: {failed:#?}");
}

#[test]
fn merge_corpus_replays() {
    replay("merge", tributary::fuzzing::merge);
}

#[test]
fn query_string_corpus_replays() {
    replay("query_string", tributary::fuzzing::query_string);
}

#[test]
fn jwt_corpus_replays() {
    replay("jwt", tributary::fuzzing::jwt);
}

#[test]
fn policy_load_corpus_replays() {
    replay("policy_load", tributary::fuzzing::policy_load);
}

#[test]
fn a_missing_corpus_fails_the_replay() {
    let missing = catch_unwind(|| replay("no_such_target", |_| {}));
    assert!(
        missing.is_err(),
        "a missing corpus must fail, not pass empty"
    );
}
