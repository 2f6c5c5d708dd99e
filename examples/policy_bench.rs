//! Benchmark of `PolicyEngine::evaluate` on an `$everything`-sized answer (~100 resources).
//!
//! Run: `cargo run --release --example policy_bench [-- ITERATIONS]`. Prints per-call latency
//! percentiles for a few situations; results go in `BENCHMARKS.md`.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use connectors::{OdsCode, SourceKind};
use serde_json::{Value, json};
use tributary::{
    policy::{Candidate, PatientFacts, PolicyEngine, PolicyRequest, SourceRef},
    principal::Principal,
};

const TYPES: [&str; 8] = [
    "AllergyIntolerance",
    "Condition",
    "MedicationStatement",
    "Encounter",
    "Observation",
    "Procedure",
    "Immunization",
    "DocumentReference",
];

fn src(ods: &str, kind: SourceKind) -> SourceRef {
    SourceRef {
        ods: OdsCode::new(ods),
        kind,
    }
}

fn resource(ty: &str, i: usize, code: &str) -> Value {
    json!({
        "resourceType": ty,
        "id": format!("{ty}-{i}"),
        "meta": {"source": "x"},
        "status": "active",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": code, "display": "something"}], "text": "something"},
        "subject": {"reference": "Patient/9990000018"},
        "note": [{"text": "a note of ordinary length for a clinical entry"}]
    })
}

/// 100 candidates: the Patient (demographics + GP), 55 GP items, 35 from three trusts, 5 from a
/// council, 4 reported by both the GP and a trust; 5 carry sensitive codes, 2 are NOPAT.
fn candidates(dissent: bool) -> Vec<Candidate> {
    let mut out = vec![Candidate {
        resource: json!({"resourceType": "Patient", "id": "9990000018", "address": [{"postalCode": "ZZ99 3ZZ"}],
            "telecom": [{"system": "phone", "value": "0"}], "name": [{"family": "Test"}]}),
        sources: vec![
            src("X26", SourceKind::Demographics),
            src("P81001", SourceKind::GpPractice),
        ],
    }];
    let trusts = ["RXL", "RYJ", "RQM"];
    for i in 0..99 {
        let ty = TYPES[i % TYPES.len()];
        let code = match i {
            7 => "8098009",
            19 => "57797005",
            31 => "52637005",
            43 => "407377005",
            55 => "8098009",
            0 if dissent => "416409005",
            _ => "195967001",
        };
        let mut r = resource(ty, i, code);
        if i == 13 || i == 27 {
            r["meta"]["security"] = json!([{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "NOPAT"}]);
        }
        let sources = match i {
            0..55 => vec![src("P81001", SourceKind::GpPractice)],
            55..90 => vec![src(trusts[i % 3], SourceKind::Trust)],
            90..95 => vec![src("E09000001", SourceKind::Council)],
            _ => vec![
                src("P81001", SourceKind::GpPractice),
                src(trusts[i % 3], SourceKind::Trust),
            ],
        };
        out.push(Candidate {
            resource: r,
            sources,
        });
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    let engine = match PolicyEngine::load(&dir) {
        Ok(e) => e,
        Err(d) => {
            for x in d {
                eprintln!("{x}");
            }
            std::process::exit(1);
        }
    };
    let facts = PatientFacts {
        restricted: false,
        gp_dissent: false,
        registered_gp: Some(OdsCode::new("P81001")),
        orgs_with_data: ["P81001", "RXL", "RYJ", "RQM"].map(OdsCode::new).to_vec(),
    };
    let restricted = PatientFacts {
        restricted: true,
        ..facts.clone()
    };
    let clinician = Principal {
        sub: "u".into(),
        role: "R8000".into(),
        org: OdsCode::new("RXL"),
        purpose: "direct-care".into(),
    };
    let admin = Principal {
        role: "R8008".into(),
        ..clinician.clone()
    };
    let outsider = Principal {
        org: OdsCode::new("RAJ"),
        ..clinician.clone()
    };

    let scenarios: Vec<(&str, &Principal, &PatientFacts, Option<&str>, bool)> = vec![
        (
            "fixed cost: clinician, 1 candidate",
            &clinician,
            &facts,
            None,
            false,
        ),
        (
            "clinician, established relationship",
            &clinician,
            &facts,
            None,
            false,
        ),
        ("clinician, GP dissent", &clinician, &facts, None, true),
        ("admin (demographics only)", &admin, &facts, None, false),
        (
            "clinician, restricted patient",
            &clinician,
            &restricted,
            None,
            false,
        ),
        (
            "outsider under break glass",
            &outsider,
            &facts,
            Some("emergency"),
            false,
        ),
    ];
    println!("{iterations} iterations per scenario, 100 candidates each unless stated");
    println!("| scenario | released | mean | p50 | p99 | per resource (mean) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, principal, patient, break_glass, dissent) in scenarios {
        let mut input = candidates(dissent);
        if name.starts_with("fixed") {
            input.truncate(1);
        }
        let req = PolicyRequest {
            principal,
            break_glass,
            relationship_claim: None,
            patient,
            now: SystemTime::now(),
            request_id: "bench",
        };
        // Warm up.
        let mut released = 0;
        for _ in 0..50 {
            released = engine.evaluate(&req, input.clone()).released.len();
        }
        let mut times = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let c = input.clone();
            // tokio's Instant (the project bans std's); outside a runtime it is the wall clock.
            let t = tokio::time::Instant::now();
            let d = engine.evaluate(&req, c);
            times.push(t.elapsed());
            std::hint::black_box(d);
        }
        times.sort();
        let mean = times.iter().sum::<Duration>() / iterations as u32;
        println!(
            "| {name} | {released}/{} | {:.1} µs | {:.1} µs | {:.1} µs | {:.2} µs |",
            input.len(),
            mean.as_secs_f64() * 1e6,
            percentile(&times, 0.5).as_secs_f64() * 1e6,
            percentile(&times, 0.99).as_secs_f64() * 1e6,
            mean.as_secs_f64() * 1e6 / input.len() as f64
        );
    }
}
