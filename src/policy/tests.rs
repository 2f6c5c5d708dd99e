#![allow(clippy::unwrap_used)]
//! Unit tests for the policy engine: every rule, every diagnostics path, reload, and a
//! property test that GP data under dissent never leaves.

use std::path::{Path, PathBuf};

use super::*;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

#[test]
fn shipped_policies_load() {
    match PolicyEngine::load(&shipped()) {
        Ok(_) => {}
        Err(d) => panic!(
            "{}",
            d.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

#[test]
fn shipped_policy_cases_pass() {
    let engine = PolicyEngine::load(&shipped()).unwrap();
    let cases = cases::load_cases(&shipped()).unwrap();
    assert!(cases.len() > 30, "too few cases: {}", cases.len());
    let mut failures = Vec::new();
    for (file, line, case) in &cases {
        let e = case.explain(&engine);
        let got = cases::Case::outcome(&e);
        if Some(got) != case.expect {
            failures.push(format!(
                "{file}:{line} {}: expected {:?}, got {got:?}: {}",
                case.name, case.expect, e.summary
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------- helpers ----------

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use connectors::{OdsCode, SourceKind};
use serde_json::{Value, json};

use crate::principal::Principal;

const GP: &str = "P81001";
const TRUST: &str = "RXL";
const OTHER: &str = "RYJ";

fn engine() -> Arc<PolicyEngine> {
    PolicyEngine::load(&shipped()).unwrap()
}

fn who(role: &str, org: &str) -> Principal {
    Principal {
        sub: "u1".into(),
        role: role.into(),
        org: OdsCode::new(org),
        purpose: "direct-care".into(),
    }
}

fn facts(restricted: bool) -> PatientFacts {
    PatientFacts {
        restricted,
        registered_gp: Some(OdsCode::new(GP)),
        orgs_with_data: vec![OdsCode::new(TRUST), OdsCode::new(GP)],
        gp_dissent: false,
    }
}

fn src(ods: &str, kind: SourceKind) -> SourceRef {
    SourceRef {
        ods: OdsCode::new(ods),
        kind,
    }
}

fn res(ty: &str, codes: &[&str]) -> Value {
    let coding: Vec<Value> = codes
        .iter()
        .map(|c| json!({"system": "http://snomed.info/sct", "code": c}))
        .collect();
    json!({"resourceType": ty, "id": format!("{ty}-{}", codes.join("-")), "code": {"coding": coding}})
}

fn cand(resource: Value, sources: Vec<SourceRef>) -> Candidate {
    Candidate { resource, sources }
}

fn gp(resource: Value) -> Candidate {
    cand(resource, vec![src(GP, SourceKind::GpPractice)])
}

fn trust(resource: Value) -> Candidate {
    cand(resource, vec![src(TRUST, SourceKind::Trust)])
}

fn patient_resource() -> Value {
    json!({
        "resourceType": "Patient", "id": "9990000018",
        "name": [{"family": "Test"}],
        "address": [{"postalCode": "ZZ99 3ZZ"}],
        "telecom": [{"system": "phone", "value": "0"}],
        "generalPractitioner": [{"identifier": {"value": GP}}],
        "contact": [{"address": {"postalCode": "ZZ99 3ZZ"}}]
    })
}

fn demographics() -> Candidate {
    cand(
        patient_resource(),
        vec![src("X26", SourceKind::Demographics)],
    )
}

struct Ask<'a> {
    principal: &'a Principal,
    facts: &'a PatientFacts,
    break_glass: Option<&'a str>,
    claim: Option<&'a str>,
}

impl<'a> Ask<'a> {
    fn new(principal: &'a Principal, facts: &'a PatientFacts) -> Self {
        Self {
            principal,
            facts,
            break_glass: None,
            claim: None,
        }
    }
    fn req(&self) -> PolicyRequest<'a> {
        PolicyRequest {
            principal: self.principal,
            break_glass: self.break_glass,
            relationship_claim: self.claim,
            patient: self.facts,
            now: SystemTime::now(),
            request_id: "req-1",
        }
    }
}

fn ids(d: &Decision) -> Vec<String> {
    d.released
        .iter()
        .map(|c| c.resource["id"].as_str().unwrap_or("").to_string())
        .collect()
}

// ---------- rules ----------

#[test]
fn clinical_roles_read_clinical_data_with_a_relationship() {
    let e = engine();
    let f = facts(false);
    for role in ["R8000", "R8001", "R8003"] {
        let p = who(role, TRUST);
        let d = e.evaluate(
            &Ask::new(&p, &f).req(),
            vec![demographics(), trust(res("Condition", &["195967001"]))],
        );
        assert_eq!(d.released.len(), 2, "{role}");
        assert!(!d.withheld_any);
        assert_eq!(d.relationship, Relationship::Established);
    }
}

#[test]
fn other_roles_see_demographics_only() {
    let e = engine();
    let f = facts(false);
    for role in [
        "R8004", "R8006", "R8008", "R8009", "R8010", "R0001", "R5105",
    ] {
        let p = who(role, TRUST);
        let d = e.evaluate(
            &Ask::new(&p, &f).req(),
            vec![
                demographics(),
                trust(res("Condition", &[])),
                gp(res("Observation", &[])),
            ],
        );
        assert_eq!(ids(&d), vec!["9990000018"], "{role}");
        assert!(d.withheld_any);
    }
}

#[test]
fn unknown_role_sees_nothing_and_is_refused() {
    let e = engine();
    let f = facts(false);
    for role in ["R9999", "", "r8000", "R8000 "] {
        let p = who(role, TRUST);
        let r = Ask::new(&p, &f);
        assert!(
            matches!(e.admit(&r.req()), Err(Denied::UnknownRole(_))),
            "{role:?}"
        );
        let d = e.evaluate(&r.req(), vec![demographics(), trust(res("Condition", &[]))]);
        assert!(d.released.is_empty(), "{role:?}");
        assert!(d.withheld_any);
    }
}

#[test]
fn missing_purpose_is_refused_and_non_direct_care_is_demographics_only() {
    let e = engine();
    let f = facts(false);
    let mut p = who("R8000", TRUST);
    p.purpose = " ".into();
    assert_eq!(e.admit(&Ask::new(&p, &f).req()), Err(Denied::NoPurpose));
    assert!(
        e.evaluate(&Ask::new(&p, &f).req(), vec![demographics()])
            .released
            .is_empty()
    );
    p.purpose = "secondary-use".into();
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![demographics(), trust(res("Condition", &[]))],
    );
    assert_eq!(ids(&d), vec!["9990000018"]);
}

#[test]
fn admit_allows_known_roles_and_says_whether_to_ask_the_gp() {
    let e = engine();
    let p = who("R8008", TRUST);
    let a = e.admit(&Ask::new(&p, &facts(false)).req()).unwrap();
    assert_eq!(
        a,
        Admission {
            break_glass: false,
            ask_gp: true
        }
    );
    let a = e.admit(&Ask::new(&p, &facts(true)).req()).unwrap();
    assert!(!a.ask_gp);
}

#[test]
fn no_relationship_means_demographics_only_and_a_self_claim_is_alerted() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", OTHER);
    let mut ask = Ask::new(&p, &f);
    let d = e.evaluate(
        &ask.req(),
        vec![demographics(), trust(res("Condition", &[]))],
    );
    assert_eq!(d.relationship, Relationship::None);
    assert_eq!(ids(&d), vec!["9990000018"]);
    assert_eq!(d.alerts_raised, 0);

    ask.claim = Some("seen in our urgent treatment centre");
    let d = e.evaluate(
        &ask.req(),
        vec![demographics(), trust(res("Condition", &[]))],
    );
    assert_eq!(d.relationship, Relationship::SelfClaimed);
    assert_eq!(d.released.len(), 2);
    assert_eq!(d.alerts_raised, 1);
    let alerts = e.alerts().recent();
    assert_eq!(alerts[0].kind, AlertKind::SelfClaimedRelationship);
    assert_eq!(alerts[0].request_id, "req-1");
    assert_eq!(alerts[0].reason, "seen in our urgent treatment centre");
}

#[test]
fn relationship_is_established_by_registered_gp_or_data() {
    let f = PatientFacts {
        registered_gp: Some(OdsCode::new(GP)),
        orgs_with_data: vec![OdsCode::new(TRUST)],
        ..PatientFacts::default()
    };
    let at_gp = who("R8000", GP);
    assert_eq!(
        decide::relationship(&Ask::new(&at_gp, &f).req()),
        Relationship::Established
    );
    let at_trust = who("R8000", TRUST);
    assert_eq!(
        decide::relationship(&Ask::new(&at_trust, &f).req()),
        Relationship::Established
    );
    let elsewhere = who("R8000", OTHER);
    let mut a = Ask::new(&elsewhere, &f);
    assert_eq!(decide::relationship(&a.req()), Relationship::None);
    a.claim = Some("");
    assert_eq!(decide::relationship(&a.req()), Relationship::None);
}

#[test]
fn gp_dissent_withholds_gp_data_only() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", TRUST);
    let consent = gp(res("Observation", &["416409005"]));
    let both = cand(
        res("AllergyIntolerance", &["91936005"]),
        vec![
            src(GP, SourceKind::GpPractice),
            src(TRUST, SourceKind::Trust),
        ],
    );
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![
            demographics(),
            consent,
            gp(res("Condition", &["38341003"])),
            trust(res("Condition", &["22298006"])),
            both,
        ],
    );
    assert_eq!(
        ids(&d),
        vec![
            "9990000018",
            "Condition-22298006",
            "AllergyIntolerance-91936005"
        ]
    );
    assert!(d.withheld_any);
}

#[test]
fn dissent_is_recognised_in_any_system_and_any_coding() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", TRUST);
    for code in [
        "416409005",
        "416308001",
        "320011000000108",
        "93C1.",
        "9Nd1.",
        "9NdH.",
        "9Ndo.",
    ] {
        let consent = json!({"resourceType": "Observation", "id": "c",
            "valueCodeableConcept": {"coding": [{"system": "http://read.info/ctv3", "code": code}]}});
        let d = e.evaluate(
            &Ask::new(&p, &f).req(),
            vec![gp(consent), gp(res("Condition", &["38341003"]))],
        );
        assert!(d.released.is_empty(), "{code}");
    }
}

#[test]
fn a_dissent_code_from_a_trust_is_not_gp_dissent() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", TRUST);
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![
            trust(res("Observation", &["416409005"])),
            gp(res("Condition", &["38341003"])),
        ],
    );
    assert_eq!(d.released.len(), 2);
}

#[test]
fn break_glass_never_overrides_gp_dissent() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("unconscious");
    let d = e.evaluate(
        &a.req(),
        vec![
            gp(res("Observation", &["416409005"])),
            gp(res("MedicationStatement", &["1"])),
            trust(res("Condition", &["2"])),
        ],
    );
    assert!(d.break_glass_used);
    assert_eq!(ids(&d), vec!["Condition-2"]);
}

#[test]
fn sensitive_items_are_withheld_in_every_situation() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", TRUST);
    let nested = json!({"resourceType": "MedicationStatement", "id": "m",
        "medicationCodeableConcept": {"coding": [{"system": "x", "code": "52637005"}]}});
    let confidential = json!({"resourceType": "Condition", "id": "nopat",
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "NOPAT"}]}});
    let make = || {
        vec![
            trust(res("Condition", &["8098009"])),
            trust(res("Procedure", &["57797005"])),
            gp(res("Procedure", &["52637005"])),
            trust(res("Condition", &["407377005"])),
            trust(nested.clone()),
            gp(confidential.clone()),
            trust(res("Condition", &["195967001"])),
        ]
    };
    let d = e.evaluate(&Ask::new(&p, &f).req(), make());
    assert_eq!(ids(&d), vec!["Condition-195967001"]);
    assert!(d.withheld_any);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("emergency");
    let d = e.evaluate(&a.req(), make());
    assert_eq!(ids(&d), vec!["Condition-195967001"]);
}

#[test]
fn restricted_patient_is_redacted_and_gets_no_gp_data() {
    let e = engine();
    let f = facts(true);
    let p = who("R8000", TRUST);
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![
            demographics(),
            gp(res("Condition", &["1"])),
            trust(res("Condition", &["2"])),
        ],
    );
    assert_eq!(ids(&d), vec!["9990000018", "Condition-2"]);
    assert!(d.withheld_any);
    let patient = &d.released[0].resource;
    for field in ["address", "telecom", "generalPractitioner", "contact"] {
        assert!(patient.get(field).is_none(), "{field} leaked");
    }
    assert_eq!(patient["name"][0]["family"], "Test");
}

#[test]
fn restricted_patient_demographics_are_redacted_for_every_role_and_under_break_glass() {
    let e = engine();
    let f = facts(true);
    for role in ["R8000", "R8008"] {
        let p = who(role, OTHER);
        let mut a = Ask::new(&p, &f);
        if role == "R8000" {
            a.break_glass = Some("emergency");
        }
        let d = e.evaluate(
            &a.req(),
            vec![
                demographics(),
                cand(patient_resource(), vec![src(GP, SourceKind::GpPractice)]),
            ],
        );
        assert_eq!(d.released.len(), 1);
        assert!(d.released[0].resource.get("address").is_none());
        assert!(d.released[0].resource.get("telecom").is_none());
    }
}

#[test]
fn break_glass_releases_clinical_data_for_emergency_roles_and_alerts() {
    let e = engine();
    let f = facts(false);
    let p = who("R8001", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("collapsed in the waiting room");
    assert_eq!(
        e.admit(&a.req()).unwrap(),
        Admission {
            break_glass: true,
            ask_gp: true
        }
    );
    let before = e.alerts().total();
    let d = e.evaluate(
        &a.req(),
        vec![demographics(), gp(res("AllergyIntolerance", &["1"]))],
    );
    assert!(d.break_glass_used);
    assert_eq!(d.released.len(), 2);
    assert_eq!(d.alerts_raised, 1);
    assert_eq!(e.alerts().total(), before + 1);
    let alert = &e.alerts().recent()[0];
    assert_eq!(alert.kind, AlertKind::BreakGlass);
    assert_eq!(alert.reason, "collapsed in the waiting room");
    assert_eq!(alert.role, "R8001");
}

#[test]
fn break_glass_is_refused_for_other_roles_and_without_a_reason() {
    let e = engine();
    let f = facts(false);
    let p = who("R8008", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("need it");
    assert_eq!(
        e.admit(&a.req()),
        Err(Denied::BreakGlassNotAllowed("R8008".into()))
    );
    assert_eq!(e.alerts().recent()[0].kind, AlertKind::BreakGlassRefused);
    // If the facade calls evaluate anyway, break glass is simply not in force.
    let d = e.evaluate(&a.req(), vec![demographics(), trust(res("Condition", &[]))]);
    assert!(!d.break_glass_used);
    assert_eq!(ids(&d), vec!["9990000018"]);

    let p = who("R8000", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some(" \t");
    assert_eq!(e.admit(&a.req()), Err(Denied::BreakGlassWithoutReason));
    let d = e.evaluate(&a.req(), vec![trust(res("Condition", &[]))]);
    assert!(!d.break_glass_used && d.released.is_empty());
}

#[test]
fn break_glass_lasts_one_request() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("emergency");
    assert_eq!(
        e.evaluate(&a.req(), vec![trust(res("Condition", &[]))])
            .released
            .len(),
        1
    );
    a.break_glass = None;
    assert!(
        e.evaluate(&a.req(), vec![trust(res("Condition", &[]))])
            .released
            .is_empty()
    );
}

#[test]
fn candidates_without_sources_or_type_are_not_released_on_nobody_s_authority() {
    let e = engine();
    let f = facts(false);
    let p = who("R8008", TRUST);
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![cand(patient_resource(), vec![]), trust(json!({"id": "x"}))],
    );
    assert!(d.released.is_empty());
    assert!(d.withheld_any);
}

#[test]
fn per_type_search_and_everything_agree() {
    // Policy is per resource: a type asked on its own gets the same verdict as inside $everything.
    let e = engine();
    let f = facts(false);
    let p = who("R8000", TRUST);
    let all = vec![
        demographics(),
        gp(res("Observation", &["416409005"])),
        gp(res("Condition", &["1"])),
        trust(res("Condition", &["8098009"])),
        trust(res("Condition", &["2"])),
        trust(res("Procedure", &["3"])),
    ];
    let everything = ids(&e.evaluate(&Ask::new(&p, &f).req(), all.clone()));
    let mut per_type = Vec::new();
    for ty in ["Patient", "Observation", "Condition", "Procedure"] {
        // The gateway always fetches the GP's record for dissent detection; dissent stays visible.
        let subset: Vec<Candidate> = all
            .iter()
            .filter(|c| {
                c.resource["resourceType"] == ty || c.resource["id"] == "Observation-416409005"
            })
            .cloned()
            .collect();
        let d = e.evaluate(&Ask::new(&p, &f).req(), subset);
        per_type.extend(ids(&d).into_iter().filter(|i| {
            all.iter()
                .any(|c| c.resource["id"] == i.as_str() && c.resource["resourceType"] == ty)
        }));
    }
    per_type.sort();
    let mut everything_sorted = everything.clone();
    everything_sorted.sort();
    assert_eq!(per_type, everything_sorted);
    assert_eq!(everything, vec!["9990000018", "Condition-2", "Procedure-3"]);
}

// ---------- explain ----------

#[test]
fn explain_names_the_deciding_policy_and_its_file() {
    let e = engine();
    let f = facts(false);
    let p = who("R8000", TRUST);
    let x = e.explain(
        &Ask::new(&p, &f).req(),
        &trust(res("Condition", &["8098009"])),
    );
    assert!(!x.released);
    assert_eq!(x.categories, vec!["sexually-transmitted-infection"]);
    let pol = &x.sources[0].policies[0];
    assert_eq!(
        (pol.id.as_str(), pol.file.as_str(), pol.effect),
        ("sensitive-withheld", "sensitive.cedar", "forbid")
    );
    assert!(pol.line > 1);
    assert!(x.summary.contains("sensitive-withheld"), "{}", x.summary);

    let x = e.explain(&Ask::new(&p, &f).req(), &trust(res("Condition", &["1"])));
    assert!(x.released);
    assert_eq!(x.sources[0].policies[0].id, "clinical-direct-care");

    let admin = who("R8008", TRUST);
    let x = e.explain(
        &Ask::new(&admin, &f).req(),
        &trust(res("Condition", &["1"])),
    );
    assert!(x.summary.contains("deny by default"), "{}", x.summary);

    let fd = PatientFacts {
        gp_dissent: true,
        ..f.clone()
    };
    let x = e.explain(&Ask::new(&p, &fd).req(), &gp(res("Condition", &["1"])));
    assert!(x.sources[0].floor.is_some());
    assert!(x.sources[0].policies.iter().any(|p| p.id == "gp-dissent"));
}

// ---------- floors: editing files cannot lift the legal invariants ----------

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("policies");
    copy_dir(&shipped(), &dir);
    (tmp, dir)
}

#[test]
fn floors_hold_even_when_the_policies_permit_everything() {
    let (_tmp, dir) = scratch();
    for f in [
        "dissent.cedar",
        "restricted.cedar",
        "sensitive.cedar",
        "relationship.cedar",
    ] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("baseline.cedar"),
        "@id(\"everything\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let e = PolicyEngine::load(&dir).unwrap();
    let p = who("R8000", TRUST);
    let f = facts(false);
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![
            gp(res("Observation", &["416409005"])),
            gp(res("Condition", &["1"])),
            trust(res("Condition", &["2"])),
        ],
    );
    assert_eq!(ids(&d), vec!["Condition-2"]);
    let f = facts(true);
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![demographics(), gp(res("Condition", &["1"]))],
    );
    assert_eq!(d.released.len(), 1);
    assert!(d.released[0].resource.get("address").is_none());
    let unknown = who("R9999", TRUST);
    assert!(
        e.evaluate(&Ask::new(&unknown, &f).req(), vec![demographics()])
            .released
            .is_empty()
    );
}

#[test]
fn an_exception_in_sensitive_cedar_lets_a_named_group_see_a_category() {
    let (_tmp, dir) = scratch();
    let text = std::fs::read_to_string(dir.join("sensitive.cedar")).unwrap();
    let text = text.replace(
        "unless { false };",
        "unless { principal in RoleGroup::\"sexual-health\" && [\"sexually-transmitted-infection\"].containsAll(resource.categories) };",
    );
    std::fs::write(dir.join("sensitive.cedar"), text).unwrap();
    let roles = std::fs::read_to_string(dir.join("roles.toml")).unwrap();
    let roles = roles.replacen(
        "groups = [\"clinical\", \"emergency\"]",
        "groups = [\"clinical\", \"emergency\", \"sexual-health\"]",
        1,
    );
    std::fs::write(dir.join("roles.toml"), roles).unwrap();
    let e = PolicyEngine::load(&dir).unwrap();
    let f = facts(false);
    let doctor = who("R8000", TRUST);
    let nurse = who("R8001", TRUST);
    let items = || {
        vec![
            trust(res("Condition", &["8098009"])),
            trust(res("Procedure", &["57797005"])),
        ]
    };
    assert_eq!(
        ids(&e.evaluate(&Ask::new(&doctor, &f).req(), items())),
        vec!["Condition-8098009"]
    );
    assert!(
        e.evaluate(&Ask::new(&nurse, &f).req(), items())
            .released
            .is_empty()
    );
}

// ---------- diagnostics ----------

fn load_err(dir: &Path) -> Vec<Diagnostic> {
    match PolicyEngine::load(dir) {
        Ok(_) => panic!("expected the load to fail"),
        Err(d) => d,
    }
}

#[test]
fn a_broken_cedar_file_is_reported_at_file_line_col() {
    let (_tmp, dir) = scratch();
    std::fs::write(dir.join("broken.cedar"), "// first line\n@id(\"x\")\npermit (principal, action, resource)\nwhen { principal.purpose == };\n").unwrap();
    let d = load_err(&dir);
    let hit = d
        .iter()
        .find(|d| d.file == "broken.cedar")
        .unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(hit.line, 4, "{hit}");
    assert!(hit.col > 1, "{hit}");
    assert!(hit.to_string().starts_with("broken.cedar:4:"), "{hit}");
}

#[test]
fn a_policy_that_does_not_fit_the_schema_is_reported_in_its_file() {
    let (_tmp, dir) = scratch();
    std::fs::write(
        dir.join("typo.cedar"),
        "@id(\"typo\")\npermit (principal, action == Action::\"read\", resource)\nwhen { resource.colour == \"red\" };\n",
    )
    .unwrap();
    let d = load_err(&dir);
    let hit = d
        .iter()
        .find(|d| d.file == "typo.cedar")
        .unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(hit.line, 3, "{hit}");
    assert!(hit.message.contains("schema"), "{hit}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let (_tmp, dir) = scratch();
    std::fs::write(
        dir.join("a.cedar"),
        "permit (principal, action, resource;\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.cedar"),
        "@id(\"b\")\nforbid (principal, action, resource is Record) when { resource.nope };\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("codesets/bad.toml"),
        "kind = \"dissent\"\ntitle = \"t\"\nsource = \"s\"\ncolour = \"red\"\n",
    )
    .unwrap();
    let d = load_err(&dir);
    for file in ["a.cedar", "b.cedar", "codesets/bad.toml"] {
        assert!(d.iter().any(|x| x.file == file), "{file} missing in {d:?}");
    }
}

#[test]
fn an_unknown_code_set_shape_is_reported_with_its_line() {
    let (_tmp, dir) = scratch();
    std::fs::write(
        dir.join("codesets/odd.toml"),
        "kind = \"sensitive\"\ncategory = \"x\"\ntitle = \"t\"\nsource = \"s\"\n\n[[code]]\ncode = \"1\"\nsystem = \"s\"\ndisplay = \"d\"\nmeaning = \"?\"\n",
    )
    .unwrap();
    let d = load_err(&dir);
    let hit = d
        .iter()
        .find(|d| d.file == "codesets/odd.toml")
        .unwrap_or_else(|| panic!("{d:?}"));
    assert!(hit.line >= 6, "{hit}");
    assert!(hit.message.contains("meaning"), "{hit}");

    std::fs::write(
        dir.join("codesets/odd.toml"),
        "kind = \"opinion\"\ntitle = \"t\"\nsource = \"s\"\n",
    )
    .unwrap();
    let d = load_err(&dir);
    let hit = d
        .iter()
        .find(|d| d.file == "codesets/odd.toml")
        .unwrap_or_else(|| panic!("{d:?}"));
    assert_eq!(hit.line, 1, "{hit}");

    std::fs::write(dir.join("codesets/odd.toml"), "kind = \"sensitive\"\ntitle = \"t\"\nsource = \"\"\n[[code]]\ncode = \"1\"\nsystem = \"s\"\ndisplay = \"d\"\n").unwrap();
    let d = load_err(&dir);
    assert!(
        d.iter()
            .any(|x| x.file == "codesets/odd.toml" && x.message.contains("source")),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.file == "codesets/odd.toml" && x.message.contains("category")),
        "{d:?}"
    );
}

#[test]
fn names_are_required_and_unique() {
    let (_tmp, dir) = scratch();
    std::fs::write(dir.join("x.cedar"), "\n\nforbid (principal, action, resource);\n@id(\"gp-dissent\")\nforbid (principal, action, resource);\n").unwrap();
    let d = load_err(&dir);
    assert!(
        d.iter()
            .any(|x| x.file == "x.cedar" && x.line == 3 && x.message.contains("@id")),
        "{d:?}"
    );
    assert!(
        d.iter().any(|x| x.file == "x.cedar"
            && x.line == 4
            && x.message.contains("already used in dissent.cedar")),
        "{d:?}"
    );
}

#[test]
fn roles_schema_and_stray_files_are_checked() {
    let (_tmp, dir) = scratch();
    std::fs::write(
        dir.join("roles.toml"),
        "[[role]]\ncode = \"R 1\"\nname = \"x\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("role.toml"), "").unwrap();
    std::fs::remove_file(dir.join("schema.cedarschema")).unwrap();
    let d = load_err(&dir);
    assert!(
        d.iter().any(|x| x.file == "roles.toml" && x.line == 1),
        "{d:?}"
    );
    assert!(
        d.iter()
            .any(|x| x.file == "role.toml" && x.message.contains("unknown file")),
        "{d:?}"
    );
    assert!(d.iter().any(|x| x.message.contains("no schema")), "{d:?}");
}

#[test]
fn a_broken_schema_is_reported_at_its_line() {
    let (_tmp, dir) = scratch();
    let text = std::fs::read_to_string(dir.join("schema.cedarschema")).unwrap();
    std::fs::write(
        dir.join("schema.cedarschema"),
        text.replace("entity Service;", "entity Service {"),
    )
    .unwrap();
    let d = load_err(&dir);
    let hit = d
        .iter()
        .find(|d| d.file == "schema.cedarschema")
        .unwrap_or_else(|| panic!("{d:?}"));
    assert!(hit.line > 1, "{hit}");
}

// ---------- reload ----------

#[test]
fn reload_keeps_the_old_set_on_error_and_counts() {
    let (_tmp, dir) = scratch();
    let e = PolicyEngine::load(&dir).unwrap();
    let f = facts(false);
    let admin = who("R8008", TRUST);
    let probe = |e: &PolicyEngine| {
        e.evaluate(
            &Ask::new(&admin, &f).req(),
            vec![trust(res("Condition", &["1"]))],
        )
        .released
        .len()
    };
    assert_eq!(probe(&e), 0);
    std::fs::write(dir.join("baseline.cedar"), "this is not cedar").unwrap();
    assert!(e.reload(&dir).is_err());
    assert_eq!(probe(&e), 0);
    let stats = e.reloads();
    assert_eq!((stats.accepted, stats.rejected), (0, 1));
    assert!(
        stats.last_errors[0].starts_with("baseline.cedar:1:"),
        "{:?}",
        stats.last_errors
    );
    // Still serving: the shipped rules answer as before.
    let doc = who("R8000", TRUST);
    assert_eq!(
        e.evaluate(
            &Ask::new(&doc, &f).req(),
            vec![trust(res("Condition", &["1"]))]
        )
        .released
        .len(),
        1
    );

    let good = std::fs::read_to_string(shipped().join("baseline.cedar")).unwrap();
    std::fs::write(
        dir.join("baseline.cedar"),
        good.replace(
            "RoleGroup::\"clinical\", action",
            "RoleGroup::\"listed\", action",
        ),
    )
    .unwrap();
    assert!(e.reload(&dir).is_ok());
    assert_eq!(probe(&e), 1);
    let stats = e.reloads();
    assert_eq!((stats.accepted, stats.rejected), (1, 1));
    assert!(stats.last_errors.is_empty());
}

/// Polls `f` until it holds or `limit` passes. Real time on purpose: the watcher reacts to real
/// file-system events on its own thread, which a paused tokio clock cannot drive. (tokio's
/// Instant outside a runtime is the wall clock.)
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn watcher_applies_valid_changes_within_two_seconds_and_rejects_invalid_ones() {
    let (_tmp, dir) = scratch();
    let e = PolicyEngine::load(&dir).unwrap();
    let _watch = e.watch(&dir).unwrap();
    let f = facts(false);
    let admin = who("R8008", TRUST);
    let probe = |e: &PolicyEngine| {
        e.evaluate(
            &Ask::new(&admin, &f).req(),
            vec![trust(res("Condition", &["1"]))],
        )
        .released
        .len()
    };

    std::fs::write(
        dir.join("sensitive.cedar"),
        "@id(\"half\")\nforbid (principal, action, resource is Record) when {",
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || e.reloads().rejected >= 1),
        "invalid change not noticed"
    );
    assert_eq!(probe(&e), 0);
    assert_eq!(e.reloads().accepted, 0);

    std::fs::copy(
        shipped().join("sensitive.cedar"),
        dir.join("sensitive.cedar"),
    )
    .unwrap();
    let good = std::fs::read_to_string(shipped().join("baseline.cedar")).unwrap();
    let changed_at = tokio::time::Instant::now();
    std::fs::write(
        dir.join("baseline.cedar"),
        good.replace(
            "RoleGroup::\"clinical\", action",
            "RoleGroup::\"listed\", action",
        ),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || probe(&e) == 1),
        "valid change not applied"
    );
    assert!(
        changed_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        changed_at.elapsed()
    );
    assert!(e.reloads().accepted >= 1);
}

#[test]
fn dropping_the_watch_handle_stops_reloading() {
    let (_tmp, dir) = scratch();
    let e = PolicyEngine::load(&dir).unwrap();
    drop(e.watch(&dir).unwrap());
    std::fs::write(dir.join("baseline.cedar"), "nonsense").unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(e.reloads(), ReloadStats::default());
}

// ---------- CLI and admin ----------

#[test]
fn cli_check_and_test_pass_on_the_shipped_policies_and_fail_on_broken_ones() {
    use std::process::ExitCode;
    let ok = |c: cli::PolicyCommand| c.run() == ExitCode::SUCCESS;
    assert!(ok(cli::PolicyCommand::Check { dir: shipped() }));
    assert!(ok(cli::PolicyCommand::Test { dir: shipped() }));
    let (_tmp, dir) = scratch();
    std::fs::write(dir.join("tests/wrong.toml"), "[[case]]\nname = \"wrong on purpose\"\nrole = \"R8008\"\norg = \"RXL\"\nresource = { type = \"Condition\", sources = [{ ods = \"RXL\", kind = \"trust\" }] }\nexpect = \"release\"\n").unwrap();
    assert!(!ok(cli::PolicyCommand::Test { dir: dir.clone() }));
    std::fs::write(dir.join("baseline.cedar"), "permit (").unwrap();
    assert!(!ok(cli::PolicyCommand::Check { dir }));
}

#[test]
fn cli_explain_reads_a_case_file() {
    let tmp = tempfile::tempdir().unwrap();
    let case = tmp.path().join("case.toml");
    std::fs::write(&case, "role = \"R8000\"\norg = \"RXL\"\npatient = { orgs_with_data = [\"RXL\"] }\nresource = { type = \"Condition\", codes = [\"8098009\"], sources = [{ ods = \"RXL\", kind = \"trust\" }] }\n").unwrap();
    let cmd = cli::PolicyCommand::Explain {
        case,
        dir: shipped(),
        json: false,
    };
    assert_eq!(cmd.run(), std::process::ExitCode::SUCCESS);
}

#[tokio::test]
async fn admin_router_serves_alerts_and_explain() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let e = engine();
    let f = facts(false);
    let p = who("R8000", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("resus");
    e.evaluate(&a.req(), vec![]);

    let app = admin_router(e.clone());
    let resp = app
        .clone()
        .oneshot(
            http::Request::get("/admin/alerts")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["alerts"][0]["kind"], "break-glass");
    assert_eq!(body["alerts"][0]["reason"], "resus");

    let case = json!({"role": "R8008", "org": "RXL", "patient": {"orgs_with_data": ["RXL"]}, "resource": {"type": "Condition", "sources": [{"ods": "RXL", "kind": "trust"}]}});
    let resp = app
        .clone()
        .oneshot(
            http::Request::post("/admin/policy/explain")
                .body(Body::from(case.to_string()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["released"], false);
    assert!(
        body["summary"]
            .as_str()
            .unwrap()
            .contains("deny by default"),
        "{body}"
    );

    let resp = app
        .oneshot(
            http::Request::post("/admin/policy/explain")
                .body(Body::from("{"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

// ---------- property: GP data under dissent never leaves ----------

mod prop {
    use proptest::prelude::*;

    use super::*;

    fn role() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("R8000".to_string()),
            Just("R8001".to_string()),
            Just("R8003".to_string()),
            Just("R8004".to_string()),
            Just("R8008".to_string()),
            Just("R0001".to_string()),
            "[A-Z0-9]{0,6}",
        ]
    }

    fn org() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(GP.to_string()),
            Just(TRUST.to_string()),
            Just(OTHER.to_string()),
            "[A-Z0-9]{3,6}"
        ]
    }

    fn kind() -> impl Strategy<Value = SourceKind> {
        prop_oneof![
            Just(SourceKind::Demographics),
            Just(SourceKind::GpPractice),
            Just(SourceKind::Trust),
            Just(SourceKind::Council),
            Just(SourceKind::PrivateProvider),
        ]
    }

    fn resource_type() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("Patient".to_string()),
            Just("Condition".to_string()),
            Just("Observation".to_string()),
            Just("MedicationStatement".to_string()),
            "[A-Za-z]{0,12}",
        ]
    }

    fn code() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("8098009".to_string()),
            Just("195967001".to_string()),
            Just("416409005".to_string()),
            "[0-9]{1,9}"
        ]
    }

    fn candidate() -> impl Strategy<Value = Candidate> {
        (
            resource_type(),
            proptest::collection::vec(code(), 0..3),
            any::<bool>(),
            proptest::collection::vec((org(), kind()), 0..3),
        )
            .prop_map(|(ty, codes, nopat, sources)| {
                let mut r = res(&ty, &codes.iter().map(String::as_str).collect::<Vec<_>>());
                if nopat {
                    r["meta"] = json!({"security": [{"code": "NOPAT"}]});
                }
                cand(r, sources.into_iter().map(|(o, k)| src(&o, k)).collect())
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn no_candidate_only_from_gps_is_released_under_dissent(
            role in role(),
            org in org(),
            purpose in prop_oneof![Just("direct-care".to_string()), Just(String::new()), "[a-z-]{0,12}"],
            break_glass in proptest::option::of("[ -~]{0,20}"),
            claim in proptest::option::of("[ -~]{0,20}"),
            restricted in any::<bool>(),
            with_data in proptest::collection::vec(org(), 0..3),
            dissent_code in prop_oneof![Just("416409005"), Just("416308001"), Just("320011000000108"), Just("93C1."), Just("9Nd1."), Just("9NdH."), Just("9Ndo.")],
            mut others in proptest::collection::vec(candidate(), 0..12),
            at in 0usize..12,
        ) {
            let e = ENGINE.with(Clone::clone);
            let p = Principal { sub: "p".into(), role, org: OdsCode::new(org), purpose };
            let f = PatientFacts {
                restricted,
                gp_dissent: false,
                registered_gp: Some(OdsCode::new(GP)),
                orgs_with_data: with_data.into_iter().map(OdsCode::new).collect(),
            };
            let req = PolicyRequest {
                principal: &p,
                break_glass: break_glass.as_deref(),
                relationship_claim: claim.as_deref(),
                patient: &f,
                now: SystemTime::now(),
                request_id: "prop",
            };
            let consent = gp(res("Observation", &[dissent_code]));
            others.insert(at.min(others.len()), consent);
            let d = e.evaluate(&req, others);
            for c in &d.released {
                prop_assert!(
                    c.sources.iter().any(|s| s.kind != SourceKind::GpPractice),
                    "released a GP-only resource under dissent: {c:?}"
                );
                // Never a sensitive or practice-confidential item, as shipped.
                let codes: Vec<&str> = c.resource["code"]["coding"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x["code"].as_str()).collect())
                    .unwrap_or_default();
                prop_assert!(!codes.contains(&"8098009"), "released a sensitive item: {c:?}");
                prop_assert!(c.resource.get("meta").is_none(), "released a NOPAT item: {c:?}");
                if restricted && c.resource["resourceType"] == "Patient" {
                    for field in ["address", "telecom", "generalPractitioner", "contact"] {
                        prop_assert!(c.resource.get(field).is_none(), "restricted {field} leaked");
                    }
                }
            }
            if ![
                "R8000", "R8001", "R8003", "R8004", "R8006", "R8008", "R8009", "R8010", "R0001", "R5105",
            ]
            .contains(&p.role.as_str()) {
                prop_assert!(d.released.is_empty(), "unknown role {} got data", p.role);
            }
        }
    }

    thread_local! {
        static ENGINE: Arc<PolicyEngine> = engine();
    }
}

#[test]
fn a_policy_on_source_organisation_is_honoured() {
    // evaluate merges organisations only when no policy mentions sourceOrg; prove it splits them
    // again when one does.
    let (_tmp, dir) = scratch();
    std::fs::write(
        dir.join("no-ryj.cedar"),
        "@id(\"no-ryj\")\nforbid (principal, action, resource is Record) when { resource.sourceOrg == \"RYJ\" };\n",
    )
    .unwrap();
    let e = PolicyEngine::load(&dir).unwrap();
    let f = PatientFacts {
        orgs_with_data: vec![OdsCode::new(TRUST)],
        ..facts(false)
    };
    let p = who("R8000", TRUST);
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![
            trust(res("Condition", &["1"])),
            cand(
                res("Condition", &["2"]),
                vec![src(OTHER, SourceKind::Trust)],
            ),
        ],
    );
    assert_eq!(ids(&d), vec!["Condition-1"]);
}

#[test]
fn dissent_known_from_elsewhere_applies_to_a_per_type_search() {
    // A Condition search carries no consent Observation; the facade tells the engine instead.
    let e = engine();
    let p = who("R8000", TRUST);
    let consent = gp(res("Observation", &["416409005"]));
    assert!(e.gp_dissent(&[consent, trust(res("Condition", &["2"]))]));
    assert!(!e.gp_dissent(&[trust(res("Observation", &["416409005"]))]));
    let f = PatientFacts {
        gp_dissent: true,
        ..facts(false)
    };
    let d = e.evaluate(
        &Ask::new(&p, &f).req(),
        vec![
            gp(res("Condition", &["1"])),
            trust(res("Condition", &["2"])),
        ],
    );
    assert_eq!(ids(&d), vec!["Condition-2"]);
}

#[test]
fn break_glass_policies_can_use_the_time_and_the_reason() {
    let (_tmp, dir) = scratch();
    let text = std::fs::read_to_string(dir.join("break-glass.cedar")).unwrap();
    let text = text.replace(
        "permit (principal in RoleGroup::\"emergency\", action == Action::\"break-glass\", resource);",
        "permit (principal in RoleGroup::\"emergency\", action == Action::\"break-glass\", resource)\n\
         when { context.now < datetime(\"2030-01-01T00:00:00Z\") && context.breakGlassReason like \"*resus*\" };",
    );
    std::fs::write(dir.join("break-glass.cedar"), text).unwrap();
    let e = PolicyEngine::load(&dir).unwrap();
    let f = facts(false);
    let p = who("R8000", OTHER);
    let mut a = Ask::new(&p, &f);
    a.break_glass = Some("in resus now");
    assert!(e.admit(&a.req()).unwrap().break_glass);
    let mut late = a.req();
    late.now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000); // 2030-03
    assert_eq!(
        e.admit(&late),
        Err(Denied::BreakGlassNotAllowed("R8000".into()))
    );
    assert!(
        e.evaluate(&late, vec![trust(res("Condition", &["1"]))])
            .released
            .is_empty()
    );
    a.break_glass = Some("curious");
    assert!(e.admit(&a.req()).is_err());
}

#[test]
fn load_for_serving_joins_every_problem() {
    assert!(load_for_serving(&shipped()).is_ok());
    let (_tmp, dir) = scratch();
    std::fs::write(dir.join("a.cedar"), "permit (").unwrap();
    std::fs::write(dir.join("b.cedar"), "forbid (").unwrap();
    let err = load_for_serving(&dir).unwrap_err();
    assert!(
        err.contains("a.cedar:1:") && err.contains("b.cedar:1:"),
        "{err}"
    );
}
