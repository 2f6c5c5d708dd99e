//! A federated record: many organisations, one answer, partial when a source fails.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{Demo, TempDir};

const REPORTED_BY: &str = "https://tributary.example.org/fhir/StructureDefinition/reported-by";

/// Every organisation that reported a resource (its `reported-by` extensions).
fn reported_by(resource: &Value) -> Vec<String> {
    resource["meta"]["extension"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter(|x| x["url"] == REPORTED_BY)
                .map(|x| x["valueIdentifier"]["value"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn ods_of(resource: &Value) -> String {
    let source = resource["meta"]["source"]
        .as_str()
        .unwrap_or_else(|| panic!("no meta.source on {resource}"));
    source.rsplit('/').next().unwrap().to_owned()
}

#[tokio::test]
async fn everything_is_a_federated_record_from_several_organisations() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.headers["content-type"],
        "application/fhir+json; charset=utf-8"
    );
    assert_eq!(reply.headers["cache-control"], "no-store");
    assert!(reply.headers.contains_key("x-request-id"));
    assert_eq!(reply.body["resourceType"], "Bundle");
    assert_eq!(reply.body["type"], "searchset");

    let resources = reply.resources();
    assert_eq!(resources[0]["resourceType"], "Patient", "Patient first");
    assert_eq!(
        resources[0]["id"],
        nhs.as_str(),
        "the federated Patient's id is the NHS number"
    );
    let orgs: BTreeSet<String> = resources.iter().map(ods_of).collect();
    assert!(
        orgs.len() >= 3,
        "demographics, the GP and at least one trust: {orgs:?}"
    );
    let types: BTreeSet<&str> = resources
        .iter()
        .filter_map(|r| r["resourceType"].as_str())
        .collect();
    assert!(types.len() >= 4, "a rich record: {types:?}");
    let ids: BTreeSet<&str> = resources.iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids.len(), resources.len(), "ids never collide");
    for r in &resources[1..] {
        let id = r["id"].as_str().unwrap();
        assert!(
            id.starts_with(&format!("{}.", ods_of(r))),
            "id {id} is namespaced by its source"
        );
    }
    assert_eq!(reply.body["total"], resources.len());
    assert_eq!(
        reply.body["link"][0]["url"],
        format!("{}/Patient/{nhs}/$everything", demo.base),
        "self is the request"
    );

    let entries = reply.body["entry"].as_array().unwrap();
    assert_eq!(
        entries.last().unwrap()["search"]["mode"],
        "outcome",
        "the outcome entry closes the bundle"
    );
    assert!(
        reply.issue_text().contains("answered in full"),
        "{}",
        reply.issue_text()
    );

    // Same request, same record (order and ids deterministic).
    let again = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    let ids_again: Vec<_> = again.resources().iter().map(|r| r["id"].clone()).collect();
    assert_eq!(
        ids_again,
        resources
            .iter()
            .map(|r| r["id"].clone())
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_fact_two_organisations_record_appears_once_with_both_as_provenance() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("duplicated");
    let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let shared: Vec<_> = reply
        .resources()
        .into_iter()
        .filter(|r| r["resourceType"] != "Patient" && reported_by(r).len() >= 2)
        .collect();
    assert!(
        !shared.is_empty(),
        "some clinical resource is reported by two organisations"
    );
    for r in &shared {
        let by: BTreeSet<_> = reported_by(r).into_iter().collect();
        assert!(by.len() >= 2, "two distinct organisations: {by:?}");
    }
}

#[tokio::test]
async fn a_hung_trust_yields_a_partial_record_that_names_it() {
    let demo = Demo::start(&["--fault", "RXL=hang"]).await;
    let nhs = demo.patient("typical");
    let reply = demo
        .get_with(
            &format!("/Patient/{nhs}/$everything"),
            &[
                ("authorization", &format!("Bearer {}", demo.token)),
                ("prefer", "wait=1"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let issues = reply.issue_text();
    assert!(
        issues.contains("[warning/timeout] RXL "),
        "names the hung trust by ODS code: {issues}"
    );
    assert!(
        reply
            .resources()
            .iter()
            .any(|r| r["resourceType"] == "Patient"),
        "the rest of the record still arrives"
    );
    assert!(
        !reply
            .resources()
            .iter()
            .any(|r| ods_of(r) == "RXL" && r["resourceType"] != "Patient")
    );
}

#[tokio::test]
async fn an_erroring_and_a_garbage_source_are_named_with_their_reasons() {
    let demo = Demo::start(&["--fault", "RXN=error", "--fault", "RXR=garbage"]).await;
    let nhs = demo.patient("typical");
    let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let issues = reply.issue_text();
    assert!(
        issues
            .lines()
            .any(|l| l.contains("] RXN ") && l.contains("failed")),
        "{issues}"
    );
    assert!(
        issues
            .lines()
            .any(|l| l.contains("] RXR ") && l.contains("malformed")),
        "{issues}"
    );
}

#[tokio::test]
async fn demographics_down_falls_back_to_broadcast_and_still_finds_the_gp_record() {
    let demo = Demo::start(&["--fault", "X26=error"]).await;
    let nhs = demo.patient("typical");
    let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(
        reply.issue_text().contains("X26 "),
        "demographics named: {}",
        reply.issue_text()
    );
    let orgs: BTreeSet<String> = reply.resources().iter().map(ods_of).collect();
    assert!(
        orgs.iter().any(|o| o.starts_with('P')),
        "the GP practice's data arrived by broadcast: {orgs:?}"
    );
}

#[tokio::test]
async fn per_type_search_returns_only_that_type() {
    let demo = Demo::start(&[]).await;
    let nhs = demo.patient("typical");
    for (path, ty) in [
        (format!("/Condition?patient={nhs}"), "Condition"),
        (format!("/Encounter?patient=Patient/{nhs}"), "Encounter"),
    ] {
        let reply = demo.get(&path).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let resources = reply.resources();
        assert!(!resources.is_empty(), "typical patient has some {ty}");
        assert!(
            resources.iter().all(|r| r["resourceType"] == ty),
            "{ty} only"
        );
    }
    let patient = demo
        .get(&format!(
            "/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"
        ))
        .await;
    assert_eq!(
        patient.body["link"][0]["url"],
        format!(
            "{}/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number%7C{nhs}",
            demo.base
        ),
        "self link percent-encodes what URIs cannot hold"
    );
    assert_eq!(patient.status, 200);
    assert_eq!(patient.resources().len(), 1);
    let read = demo.get(&format!("/Patient/{nhs}")).await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body["resourceType"], "Patient");
    assert_eq!(read.body["id"], nhs.as_str());
}

#[tokio::test]
async fn every_request_is_audited_and_no_patient_data_reaches_the_logs() {
    let demo = Demo::start(&["--fault", "RTX=garbage"]).await;
    let samples = demo.samples.clone();
    for (nhs, _) in &samples {
        demo.get(&format!("/Patient/{nhs}/$everything")).await;
        demo.get(&format!("/Condition?patient={nhs}")).await;
    }
    demo.get("/Patient/9434765918/$everything").await; // fails Modulus 11
    let audit = std::fs::read_to_string(demo.audit_dir.join("audit.jsonl")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode(&demo.audit_dir.join("audit.jsonl")),
        0o600,
        "the audit file is the gateway user's alone"
    );
    assert_eq!(mode(&demo.audit_dir), 0o700);
    let records: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        records.len(),
        samples.len() * 2,
        "one record per data request"
    );
    // Each line is a hash-chained FHIR AuditEvent (see tests/integration/audit.rs).
    assert!(records.iter().all(|r| {
        let e = &r["event"];
        e["resourceType"] == "AuditEvent"
            && e["agent"][0]["who"]["identifier"]["value"] == "demo-clinician"
            && e["agent"][0]["role"][0]["coding"][0]["code"] == "R8000"
            && e["extension"][0]["valueString"].is_string()
    }));
    assert!(records.iter().any(|r| {
        r["event"]["entity"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["detail"][0]["valueString"] == "malformed")
    }));

    let logs = demo.stop().await;
    assert!(
        logs.contains("Request completed."),
        "the logs were captured"
    );
    for (nhs, _) in &samples {
        assert!(
            !logs.contains(nhs.as_str()),
            "an NHS number reached the logs"
        );
    }
    assert!(!logs.contains("9434765918"));
}

#[tokio::test]
async fn patients_out_lists_every_synthetic_patient_with_labels() {
    let dir = TempDir::new();
    let file = dir.0.join("patients.txt");
    let demo = Demo::start(&["--patients-out", file.to_str().unwrap()]).await;
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 400);
    for (nhs, label) in &demo.samples {
        assert!(
            text.lines()
                .any(|l| l.starts_with(nhs.as_str()) && l.contains(label.as_str())),
            "{nhs} {label}"
        );
    }
    assert!(text.lines().all(|l| {
        connectors::NhsNumber::parse(l.split(' ').next().unwrap()).is_ok_and(|n| n.is_test_range())
    }));
}

#[tokio::test]
async fn trust_encounters_conditions_and_allergies_arrive_over_hl7v2() {
    let dir = TempDir::new();
    let file = dir.0.join("patients.txt");
    let demo = Demo::start(&["--patients-out", file.to_str().unwrap()]).await;
    let trusts = ["RXL", "RXN", "RXR", "RTX", "RW5"];
    let mut seen = BTreeSet::new();
    // Walk the region's patients until trusts have shown each kind (bounded).
    for line in std::fs::read_to_string(&file).unwrap().lines().take(60) {
        let nhs = line.split(' ').next().unwrap();
        let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        for r in reply.resources() {
            if reported_by(&r).iter().any(|o| trusts.contains(&o.as_str())) {
                seen.insert(r["resourceType"].as_str().unwrap().to_owned());
            }
        }
        if ["Encounter", "Condition", "AllergyIntolerance"]
            .iter()
            .all(|t| seen.contains(*t))
        {
            break;
        }
    }
    for ty in ["Patient", "Encounter", "Condition", "AllergyIntolerance"] {
        assert!(seen.contains(ty), "no {ty} from a trust's PAS: {seen:?}");
    }
}
