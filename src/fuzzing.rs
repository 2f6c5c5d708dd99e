//! The logic of the gateway's fuzz targets, kept here so that `fuzz/` (libFuzzer) and the
//! corpus replay test (`tests/fuzz_corpus.rs`, run by `cargo test`) drive the same code.
//!
//! # Why in the crate under test
//! A target written beside the fuzzer drifts from the product; one written here calls the very
//! functions a request goes through, and every invariant it asserts is checked on every
//! committed seed in CI, on stable, without libFuzzer. Each function takes arbitrary bytes, must
//! not panic on any input except to report a broken invariant, and asserts what must hold
//! whatever a caller or a source sent.

use std::{
    path::Path,
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use connectors::{
    ConnectorKind, NhsNumber, OdsCode, ResourceType, SourceDescriptor, SourceKind, SourceRecord,
    fuzzing::passes_modulus_11,
};
use serde_json::Value;

use crate::{
    auth::{DEMO_AUDIENCE, TrustedKey, Verifier},
    facade::{ApiError, Params, nhs_token, patient_reference},
    fhir::Issue,
    merge::{REPORTED_BY_URL, combine, meta_source, prepare},
    policy::{Candidate, Diagnostic, PolicyEngine},
};

// The facade seam: one line each, so that a change to the facade's query parsing is re-pointed
// here and nowhere else.
fn params(query: &str) -> Params {
    Params::parse(Some(query))
}

/// Runs of ten or more digits in `s`: what an NHS number looks like inside any text.
fn digit_runs(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|run| run.len() >= 10)
        .map(str::to_owned)
        .collect()
}

/// Checks a parsed NHS number and passes it on.
fn checked(n: NhsNumber) -> NhsNumber {
    assert!(
        passes_modulus_11(&n.expose()),
        "a parsed NHS number fails Modulus 11"
    );
    assert_eq!(NhsNumber::parse(&n.expose()), Ok(n), "no round trip");
    n
}

/// The facade's routes, as each reads its query string: `(the patient, the warnings)`.
fn routes(query: &str, strict: bool) -> Vec<Result<(NhsNumber, Vec<Issue>), ApiError>> {
    let exactly_one = || ApiError::new(http::StatusCode::BAD_REQUEST, "invalid", "exactly one");
    // GET /fhir/Patient?identifier=...|_id=...
    let patient_search = || {
        let mut p = params(query);
        let nhs = match (p.take("identifier")?, p.take("_id")?) {
            (Some(token), None) => nhs_token(&token)?,
            (None, Some(id)) => NhsNumber::parse(&id)?,
            _ => return Err(exactly_one()),
        };
        Ok((checked(nhs), p.leftovers(strict)?))
    };
    // GET /fhir/{Type}?patient=...|patient:identifier=...
    let type_search = || {
        let mut p = params(query);
        let nhs = match (p.take("patient")?, p.take("patient:identifier")?) {
            (Some(reference), None) => patient_reference(&reference)?,
            (None, Some(token)) => nhs_token(&token)?,
            _ => return Err(exactly_one()),
        };
        Ok((checked(nhs), p.leftovers(strict)?))
    };
    // GET /fhir/Patient/{id}/$everything?_type=...
    let everything = || {
        let mut p = params(query);
        if let Some(list) = p.take("_type")? {
            for t in list.split(',') {
                if ResourceType::parse(t.trim()).is_none() {
                    return Err(exactly_one());
                }
            }
        }
        Ok((
            checked(NhsNumber::from_nine(900_000_000).ok_or_else(exactly_one)?),
            p.leftovers(strict)?,
        ))
    };
    vec![patient_search(), type_search(), everything()]
}

/// Query strings as the facade reads them, on every route, lenient and strict.
///
/// Invariants: a parsed NHS number passes Modulus 11 and round-trips; strict handling only
/// ever refuses more than lenient; no error or warning text repeats a parameter value that
/// looks like an NHS number (names are echoed when tame, by design).
pub fn query_string(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(data).into_owned().collect();
    let names: String = pairs
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let secret: Vec<String> = pairs
        .iter()
        .flat_map(|(_, v)| digit_runs(v))
        .filter(|run| !names.contains(run.as_str()))
        .collect();
    let lenient = routes(query, false);
    let strict = routes(query, true);
    for (l, s) in lenient.iter().zip(&strict) {
        let texts = match (l, s) {
            (Ok((a, warnings)), Ok((b, none))) => {
                assert_eq!(a, b);
                assert!(
                    none.is_empty(),
                    "strict handling warned instead of refusing"
                );
                format!("{warnings:?}")
            }
            (Ok((_, warnings)), Err(e)) => {
                assert!(
                    !warnings.is_empty(),
                    "strict refused what lenient took cleanly"
                );
                format!("{warnings:?} {e:?}")
            }
            (Err(a), Err(b)) => format!("{a:?} {b:?}"),
            (Err(e), Ok(_)) => panic!("strict took what lenient refused: {e:?}"),
        };
        for run in &secret {
            assert!(
                !texts.contains(run.as_str()),
                "a response text repeats a parameter value"
            );
        }
    }
}

fn demo_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| Verifier::new(vec![TrustedKey::demo()], DEMO_AUDIENCE, None))
}

fn issuer_verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        Verifier::new(
            vec![TrustedKey::demo()],
            DEMO_AUDIENCE,
            Some("https://issuer.tributary.example".to_owned()),
        )
    })
}

/// Bearer tokens as the facade verifies them, with the demo keys.
///
/// Invariants: the header path and the bare token agree; an accepted token is ES256, yields a
/// principal whose claims are all present and whose ODS code is trimmed upper case, and stops
/// verifying when one character of its payload changes; a verifier that also requires an issuer
/// accepts nothing the plain one refuses; a claims error names a claim, never a value.
pub fn jwt(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    let v = demo_verifier();
    let bare = v.verify(token.trim());
    let header = v.verify_header(Some(&format!("Bearer {token}")));
    if token.trim().is_empty() {
        // `Bearer` alone: refused as not a bearer credential, the bare empty token as malformed.
        assert!(header.is_err(), "an empty bearer token was accepted");
    } else {
        assert_eq!(
            bare, header,
            "the Authorization header path disagrees with the token"
        );
    }
    if issuer_verifier().verify(token.trim()).is_ok() {
        assert!(
            bare.is_ok(),
            "requiring an issuer accepted a token the plain verifier refused"
        );
    }
    match bare {
        Ok(principal) => {
            for claim in [&principal.sub, &principal.role, &principal.purpose] {
                assert!(!claim.trim().is_empty(), "an empty claim was accepted");
            }
            let org = principal.org.as_str();
            assert!(!org.is_empty() && org == org.trim() && org == org.to_ascii_uppercase());
            let header = jsonwebtoken::decode_header(token.trim());
            assert!(
                header.is_ok_and(|h| h.alg == jsonwebtoken::Algorithm::ES256),
                "a token was accepted with another algorithm"
            );
            if let Some(tampered) = tamper(token.trim()) {
                assert!(v.verify(&tampered).is_err(), "a tampered token verified");
            }
        }
        Err(crate::auth::AuthError::BadClaims(what)) => {
            let known = ["sub", "role", "org", "purpose", "aud", "exp", "iss", "nbf"];
            assert!(
                known.contains(&what.as_str()) || what.starts_with("sub, role, org, purpose"),
                "a claims error carries something other than a claim name"
            );
        }
        Err(_) => {}
    }
}

/// The token with one base64url character of its payload changed (the first that has a
/// different value in all of its six bits).
fn tamper(token: &str) -> Option<String> {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let payload = parts.get_mut(1)?;
    let first = payload.chars().next()?;
    let swapped = if first == 'e' { 'f' } else { 'e' };
    payload.replace_range(..first.len_utf8(), &swapped.to_string());
    Some(parts.join("."))
}

/// The sources a merge input's records come from, one per kind in turn.
fn source(i: usize) -> SourceDescriptor {
    let kinds = [
        SourceKind::Demographics,
        SourceKind::GpPractice,
        SourceKind::Trust,
        SourceKind::Council,
        SourceKind::PrivateProvider,
    ];
    SourceDescriptor {
        id: format!("source-{i}"),
        ods: OdsCode::new(format!("F{i:02}")),
        name: format!("fuzz source {i}"),
        kind: kinds[i % kinds.len()],
        connector: ConnectorKind::Fhir,
        endpoint: "http://127.0.0.1:9".to_owned(),
    }
}

/// Merge: `prepare` and `combine` over the records of several sources. The input is JSON: an
/// array with one array of resources per source (at most 8 sources; a non-array input is one
/// source's record). Resources are kept as connectors give them: objects with a string
/// `resourceType`.
///
/// Invariants: every candidate names exactly one source and carries an id namespaced by that
/// source's ODS code; every merged resource names a source in `meta.source` (its first) and
/// lists every source in `reported-by`; at most one Patient, whose id is the NHS number; only
/// released copies lend provenance; the result does not depend on the order the answers
/// arrived in.
pub fn merge(data: &[u8]) {
    let Ok(input) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let lists: Vec<Value> = match input {
        Value::Array(items) if items.iter().all(Value::is_array) => items,
        other => vec![Value::Array(vec![other])],
    };
    let records: Vec<(SourceDescriptor, SourceRecord)> = lists
        .into_iter()
        .take(8)
        .enumerate()
        .map(|(i, list)| {
            let resources = match list {
                Value::Array(items) => items
                    .into_iter()
                    .filter(|r| r["resourceType"].is_string())
                    .collect(),
                _ => Vec::new(),
            };
            (source(i), SourceRecord { resources })
        })
        .collect();
    let Some(nhs) = NhsNumber::from_nine(900_000_000) else {
        return;
    };
    let answers: Vec<(&SourceDescriptor, &SourceRecord)> =
        records.iter().map(|(s, r)| (s, r)).collect();
    let prepared = prepare(&nhs, &answers);
    for c in &prepared.candidates {
        assert_eq!(
            c.sources.len(),
            1,
            "a candidate names other than one source"
        );
        let id = c.resource["id"].as_str().unwrap_or_default();
        assert!(
            id.starts_with(&format!("{}.", c.sources[0].ods)) && id.len() <= 64,
            "a candidate id is not namespaced by its source"
        );
    }
    let everything = combine(&nhs, prepared.candidates.clone());
    check_merged(&nhs, &everything, &prepared.candidates);

    // Arrival order does not matter.
    let reversed: Vec<_> = answers.iter().rev().copied().collect();
    let again = combine(&nhs, prepare(&nhs, &reversed).candidates);
    assert_eq!(everything, again, "the merge depends on arrival order");

    // Withhold every other copy: the merge uses released copies only.
    let released: Vec<Candidate> = prepared.candidates.into_iter().step_by(2).collect();
    let partial = combine(&nhs, released.clone());
    check_merged(&nhs, &partial, &released);
}

fn check_merged(nhs: &NhsNumber, merged: &[Candidate], released: &[Candidate]) {
    let mut patients = 0;
    for c in merged {
        let Some(first) = c.sources.first() else {
            panic!("a merged resource names no source");
        };
        assert_eq!(
            c.resource["meta"]["source"].as_str(),
            Some(meta_source(&first.ods).as_str()),
            "meta.source does not name the first source"
        );
        let listed: Vec<&str> = c.resource["meta"]["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["url"] == REPORTED_BY_URL)
            .filter_map(|e| e["valueIdentifier"]["value"].as_str())
            .collect();
        let sources: Vec<&str> = c.sources.iter().map(|s| s.ods.as_str()).collect();
        assert_eq!(listed, sources, "reported-by does not list every source");
        for s in &c.sources {
            assert!(
                released.iter().any(|r| r.sources.contains(s)),
                "a withheld source lent provenance"
            );
        }
        if c.resource["resourceType"] == "Patient" {
            patients += 1;
            assert_eq!(
                c.resource["id"],
                nhs.expose(),
                "the Patient's id is not the NHS number"
            );
        }
    }
    assert!(patients <= 1, "more than one federated Patient");
}

/// The files a policy input is cut into, in order, at lines holding only `%%`: the schema,
/// `roles.toml`, one code set, then policy files. An empty part writes no file.
const POLICY_PARTS: [&str; 3] = ["schema.cedarschema", "roles.toml", "codesets/dissent.toml"];

/// Policy loading, as `serve` and hot reload do it, from an arbitrary policy directory.
///
/// Invariants: a refused directory says why (at least one diagnostic, each located either at a
/// whole file or at a line and column, and printable); loading is deterministic (the same
/// problems in the same order); a directory that loads also reloads.
pub fn policy_load(data: &[u8]) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let text = String::from_utf8_lossy(data);
    let scratch = Scratch(std::env::temp_dir().join(format!(
        "tributary-fuzz-policy-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )));
    let dir = scratch.0.as_path();
    if write_policy_dir(dir, &text).is_err() {
        return;
    }
    let first = PolicyEngine::load(dir);
    let second = PolicyEngine::load(dir);
    match (&first, &second) {
        (Ok(engine), Ok(_)) => {
            assert!(
                engine.reload(dir).is_ok(),
                "a loaded directory does not reload"
            );
            assert_eq!(engine.reloads().accepted, 1);
        }
        (Err(a), Err(b)) => {
            // Same number of problems, from the same files, in the same order. Not the same
            // wording or place: cedar-policy picks "did you mean" hints, lists unresolved
            // schema types and points at one of their uses in hash order.
            let said =
                |d: &[Diagnostic]| -> Vec<String> { d.iter().map(|d| d.file.clone()).collect() };
            assert_eq!(
                said(a),
                said(b),
                "loading the same directory twice said different things"
            );
            assert!(!a.is_empty(), "a refused directory says nothing");
            for d in a {
                assert_eq!(d.line == 0, d.col == 0, "a diagnostic half located");
                assert!(!d.to_string().is_empty() && !d.message.is_empty());
            }
        }
        _ => panic!("loading the same directory twice gave different verdicts"),
    }
}

/// A scratch directory, removed however the target ends (a broken invariant included).
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_policy_dir(dir: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("codesets"))?;
    let mut policies = 0;
    for (i, part) in text
        .split("\n%%\n")
        .enumerate()
        .take(POLICY_PARTS.len() + 8)
    {
        if part.is_empty() {
            continue;
        }
        let name = match POLICY_PARTS.get(i) {
            Some(name) => (*name).to_owned(),
            None => {
                policies += 1;
                format!("policy-{policies}.cedar")
            }
        };
        std::fs::write(dir.join(name), part)?;
    }
    Ok(())
}
