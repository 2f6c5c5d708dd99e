//! Tests of the FHIR connector, mapping and simulator: real sockets on 127.0.0.1:0.
#![allow(clippy::unwrap_used)]

use std::{any::Any, net::Ipv4Addr, path::PathBuf, sync::Arc};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
};

use super::{FhirConfig, FhirConnector, mapping, sim};
use crate::{
    Connector, ConnectorError, ResourceType, SourceDescriptor, SourceKind, SourceQuery,
    conformance::{self, Harness, Subject},
    contract::{ConnectorKind, OdsCode},
    fault::{Fault, FaultSwitch},
    nhs::NhsNumber,
    synth::{
        Region,
        model::{Label, Records, SourceSpec},
    },
};

/// Aborts a server task when the test lets go of it.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn region() -> Arc<Region> {
    Arc::new(Region::generate(7, 3, 60))
}

fn connector(base_url: String, kind: SourceKind, max_body_bytes: usize) -> FhirConnector {
    let descriptor = SourceDescriptor {
        id: "test".into(),
        ods: OdsCode::new("TEST"),
        name: "Test source".into(),
        kind,
        connector: ConnectorKind::Fhir,
        endpoint: base_url.clone(),
    };
    FhirConnector::new(
        descriptor,
        FhirConfig {
            base_url,
            max_body_bytes,
            tls: None,
        },
    )
    .unwrap()
}

/// Starts the simulator for one of the region's sources.
async fn start_sim(region: &Arc<Region>, spec: &SourceSpec) -> (String, FaultSwitch, AbortOnDrop) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let fault = FaultSwitch::default();
    let records: Arc<dyn Records> = region.clone();
    let server = sim::serve(listener, records, spec.clone(), fault.clone());
    (base, fault, AbortOnDrop(server))
}

fn spec_of<'a>(region: &'a Region, ods: &OdsCode) -> &'a SourceSpec {
    region.sources().iter().find(|s| &s.ods == ods).unwrap()
}

fn sample(region: &Region, label: Label) -> NhsNumber {
    region
        .sample_patients()
        .into_iter()
        .find(|(_, l)| *l == label)
        .unwrap()
        .0
}

/// A valid test-range NHS number the region does not know.
fn stranger(region: &Region) -> NhsNumber {
    (999_999_000..999_999_999)
        .filter_map(NhsNumber::from_nine)
        .find(|n| region.summary(n).is_none())
        .unwrap()
}

/// A server that answers every request with the same raw bytes, then closes.
async fn canned(reply: impl Into<Bytes>) -> (String, AbortOnDrop) {
    let reply: Bytes = reply.into();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
        }
    });
    (base, AbortOnDrop(server))
}

async fn http_get(url: &str) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = client.get(url.parse().unwrap()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// A 200 reply with `body` and its length.
fn ok_reply(body: &str) -> Bytes {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into()
}

fn pds_file(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/pds-fhir-r4-sandbox")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn nhs(s: &str) -> NhsNumber {
    NhsNumber::parse(s).unwrap()
}

// ---- conformance ----

struct FhirHarness;

impl Harness for FhirHarness {
    fn start(&self) -> BoxFuture<'static, Subject> {
        async {
            let region = region();
            let known_patient = sample(&region, Label::Typical);
            let gp = region.summary(&known_patient).unwrap().gp.clone();
            let spec = spec_of(&region, &gp).clone();
            let (base, fault, guard) = start_sim(&region, &spec).await;
            Subject {
                connector: Arc::new(connector(base, SourceKind::GpPractice, 1 << 20)),
                fault,
                known_patient,
                unknown_patient: stranger(&region),
                guard: Box::new(guard) as Box<dyn Any + Send>,
            }
        }
        .boxed()
    }
}

#[tokio::test]
async fn fhir_connector_passes_the_conformance_suite() {
    conformance::run_all(&FhirHarness).await;
}

// ---- client against the simulator ----

#[tokio::test]
async fn gp_answer_maps_every_item_with_identity_and_subject() {
    let region = region();
    let patient = sample(&region, Label::Dissent);
    let record = region.record(&patient).unwrap();
    let gp = &record.demographics.gp_ods;
    let (base, _fault, _guard) = start_sim(&region, spec_of(&region, gp)).await;
    let got = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(patient))
        .await
        .unwrap();
    let local = record.local_id(gp).unwrap();
    assert_eq!(got.resources[0]["id"], local);
    assert_eq!(got.resources.len(), 1 + record.items_at(gp).count());
    let dissent = got
        .resources
        .iter()
        .find(|r| r["code"]["coding"][0]["code"] == "416409005")
        .unwrap();
    assert_eq!(dissent["resourceType"], "Observation");
    assert_eq!(dissent["subject"]["reference"], format!("Patient/{local}"));
}

#[tokio::test]
async fn asking_for_some_types_returns_only_those() {
    let region = region();
    let patient = sample(&region, Label::Typical);
    let gp = region.summary(&patient).unwrap().gp.clone();
    let (base, _fault, _guard) = start_sim(&region, spec_of(&region, &gp)).await;
    let got = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::new(patient, [ResourceType::Observation]))
        .await
        .unwrap();
    assert!(got.resources.len() > 1);
    assert!(
        got.resources
            .iter()
            .all(|r| r["resourceType"] == "Patient" || r["resourceType"] == "Observation")
    );
}

#[tokio::test]
async fn demographics_source_answers_with_the_patient_only_and_hides_restricted_details() {
    let region = region();
    let pds = region.sources()[0].clone();
    assert_eq!(pds.kind, SourceKind::Demographics);
    let (base, _fault, _guard) = start_sim(&region, &pds).await;
    let c = connector(base, SourceKind::Demographics, 1 << 20);

    let typical = sample(&region, Label::Typical);
    let got = c.fetch(SourceQuery::everything(typical)).await.unwrap();
    assert_eq!(got.resources.len(), 1);
    let p = &got.resources[0];
    assert_eq!(p["id"], typical.expose());
    assert_eq!(p["meta"]["security"][0]["code"], "U");
    assert_eq!(
        p["generalPractitioner"][0]["identifier"]["value"],
        region.summary(&typical).unwrap().gp.as_str()
    );

    let restricted = sample(&region, Label::Restricted);
    let got = c.fetch(SourceQuery::everything(restricted)).await.unwrap();
    let p = &got.resources[0];
    assert_eq!(p["meta"]["security"][0]["code"], "R");
    assert!(p.get("generalPractitioner").is_none() && p.get("address").is_none());
}

#[tokio::test]
async fn oversize_reply_is_too_large() {
    let region = region();
    let patient = sample(&region, Label::Typical);
    let gp = region.summary(&patient).unwrap().gp.clone();
    let (base, _fault, _guard) = start_sim(&region, spec_of(&region, &gp)).await;
    let err = connector(base, SourceKind::GpPractice, 200)
        .fetch(SourceQuery::everything(patient))
        .await
        .unwrap_err();
    assert_eq!(err, ConnectorError::TooLarge { limit: 200 });
}

#[tokio::test]
async fn oversize_chunked_reply_is_too_large_while_streaming() {
    let chunk = format!("{:x}\r\n{}\r\n", 80, " ".repeat(80));
    let reply = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let (base, _guard) = canned(reply).await;
    let err = connector(base, SourceKind::GpPractice, 100)
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap_err();
    assert_eq!(err, ConnectorError::TooLarge { limit: 100 });
}

#[tokio::test]
async fn reply_about_another_patient_is_a_mismatch() {
    // The PDS sandbox's search answer names 9000000009, whoever is asked for.
    let body = String::from_utf8(pds_file("PatientSearch.json")).unwrap();
    let (base, _guard) = canned(ok_reply(&body)).await;
    let c = connector(base, SourceKind::Demographics, 1 << 20);
    let asked = nhs("9000000017");
    let err = c.fetch(SourceQuery::everything(asked)).await.unwrap_err();
    assert_eq!(err, ConnectorError::PatientMismatch);
    assert!(!format!("{err} {err:?}").contains("9000000"));
    // The same reply for the right patient is accepted.
    let ok = c
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap();
    assert_eq!(ok.resources[0]["id"], "9000000009");
}

#[tokio::test]
async fn client_error_status_is_classified() {
    let (base, _guard) = canned(
        &b"HTTP/1.1 404 Not Found\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}"[..],
    )
    .await;
    let err = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap_err();
    assert_eq!(err, ConnectorError::Status { status: 404 });
}

#[tokio::test]
async fn operation_outcome_instead_of_a_bundle_is_rejected_without_its_text() {
    let body = json!({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "too-costly", "diagnostics": "patient 9000000009 is huge"}]});
    let (base, _guard) = canned(ok_reply(&body.to_string())).await;
    let err = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap_err();
    assert_eq!(err, ConnectorError::Rejected("too-costly".into()));
    let odd = json!({"resourceType": "OperationOutcome", "issue": [{"code": "9000000009"}]});
    assert_eq!(
        mapping::read_search(odd.to_string().as_bytes(), &nhs("9000000009")),
        Err(ConnectorError::Rejected("unknown".into()))
    );
}

#[tokio::test]
async fn wrong_shape_json_is_malformed() {
    for body in [
        "[1,2]",
        r#"{"resourceType":"Patient"}"#,
        r#"{"resourceType":"Bundle","entry":[{"resource":1}]}"#,
        r#"{"resourceType":"Bundle","entry":{"resource":{}}}"#,
    ] {
        let reply = ok_reply(body);
        let (base, _guard) = canned(reply).await;
        let err = connector(base, SourceKind::GpPractice, 1 << 20)
            .fetch(SourceQuery::everything(nhs("9000000009")))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectorError::Malformed(_)), "{err:?}");
    }
}

#[tokio::test]
async fn garbage_from_the_simulator_is_malformed() {
    let region = region();
    let patient = sample(&region, Label::Typical);
    let gp = region.summary(&patient).unwrap().gp.clone();
    let (base, fault, _guard) = start_sim(&region, spec_of(&region, &gp)).await;
    fault.set(Fault::Garbage);
    let err = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(patient))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn refused_is_connect_early_close_is_transport_and_not_http_is_malformed() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    drop(listener);
    let err = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Connect(_)), "{err:?}");

    let (base, _guard) =
        canned(&b"HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{\"resourceType\""[..]).await;
    let err = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Transport(_)), "{err:?}");

    let (base, _guard) = canned(&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..]).await;
    let err = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(SourceQuery::everything(nhs("9000000009")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectorError::Malformed(_)),
        "not http: {err:?}"
    );
}

#[test]
fn configuration_problems_are_refused() {
    let d = |url: &str| SourceDescriptor {
        id: "x".into(),
        ods: OdsCode::new("X"),
        name: "X".into(),
        kind: SourceKind::GpPractice,
        connector: ConnectorKind::Fhir,
        endpoint: url.into(),
    };
    for url in ["ftp://host/fhir", "https://host/fhir", "http://"] {
        let config = FhirConfig {
            base_url: url.into(),
            max_body_bytes: 10,
            tls: None,
        };
        assert!(FhirConnector::new(d(url), config).is_err(), "{url}");
    }
}

// ---- the simulator's own routes ----

#[tokio::test]
async fn simulator_serves_reads_metadata_and_errors() {
    let region = region();
    let patient = sample(&region, Label::Typical);
    let gp = region.summary(&patient).unwrap().gp.clone();
    let (base, fault, _guard) = start_sim(&region, spec_of(&region, &gp)).await;
    let local = region
        .record(&patient)
        .unwrap()
        .local_id(&gp)
        .unwrap()
        .to_owned();

    let (status, body) = http_get(&format!("{base}/metadata")).await;
    assert_eq!(
        (status, &body["resourceType"]),
        (200, &json!("CapabilityStatement"))
    );
    let (status, body) = http_get(&format!("{base}/Patient/{local}")).await;
    assert_eq!((status, &body["id"]), (200, &json!(local)));
    let (status, body) = http_get(&format!("{base}/Patient/nobody/$everything")).await;
    assert_eq!(
        (status, &body["resourceType"]),
        (404, &json!("OperationOutcome"))
    );
    let (status, _) = http_get(&format!("{base}/Nothing/here")).await;
    assert_eq!(status, 404);
    let (status, _) = http_get(&format!("{base}/Patient?identifier=1234567890")).await;
    assert_eq!(status, 400);
    let (status, _) = http_get(&format!(
        "{base}/Patient/{local}/$everything?_type=Spaceship"
    ))
    .await;
    assert_eq!(status, 400);
    fault.set(Fault::Error);
    let (status, body) = http_get(&format!("{base}/metadata")).await;
    assert_eq!(
        (status, &body["resourceType"]),
        (500, &json!("OperationOutcome"))
    );
}

#[tokio::test]
async fn a_hung_request_is_released_when_its_client_goes_away() {
    let region = region();
    let pds = region.sources()[0].clone();
    let (base, fault, _guard) = start_sim(&region, &pds).await;
    fault.set(Fault::Hang);
    let addr = base.trim_start_matches("http://").trim_end_matches("/fhir");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /fhir/metadata HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    // The server notices the client left and closes; the guard only stops a failing test.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut rest),
    )
    .await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?}");
}

// ---- mapping ----

#[test]
fn pds_sandbox_search_bundles_are_read() {
    for (file, number) in [
        ("PatientSearch.json", "9000000009"),
        ("PatientSearch-Jayne-Smyth.json", "9000000017"),
        ("Minimal_PatientSearch.json", "9000000033"),
        ("Sensitive_PatientSearch.json", "9000000025"),
    ] {
        let p = mapping::read_search(&pds_file(file), &nhs(number))
            .unwrap()
            .unwrap_or_else(|| panic!("{file}: no patient"));
        assert_eq!(p["id"], number, "{file}");
    }
    let sensitive = mapping::read_search(
        &pds_file("Sensitive_PatientSearch.json"),
        &nhs("9000000025"),
    )
    .unwrap()
    .unwrap();
    assert_eq!(sensitive["meta"]["security"][0]["code"], "R");
    assert!(sensitive.get("generalPractitioner").is_none());
}

#[test]
fn pds_sandbox_edge_cases() {
    // Bundles of other resources know no Patient.
    let related = mapping::read_search(&pds_file("RelatedPersonBundle.json"), &nhs("9000000009"));
    assert_eq!(related, Ok(None));
    // 9000000015 fails the Modulus 11 check, so it can never be the patient asked for.
    let compound = mapping::read_search(&pds_file("PatientCompoundName.json"), &nhs("9000000009"));
    assert_eq!(compound, Err(ConnectorError::PatientMismatch));
    // A bare Patient is not a searchset Bundle.
    let bare = mapping::read_search(&pds_file("Patient.json"), &nhs("9000000009"));
    assert!(matches!(bare, Err(ConnectorError::Malformed(_))));
}

#[test]
fn everything_keeps_wanted_types_and_refuses_other_patients_data() {
    let n = nhs("9000000009");
    let bundle = |entries: Value| {
        serde_json::to_vec(
            &json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}),
        )
        .unwrap()
    };
    let condition = |id: &str, subject: &str| json!({"resource": {"resourceType": "Condition", "id": id, "subject": {"reference": subject}}});
    let good = bundle(json!([
        {"resource": {"resourceType": "Patient", "id": "p1",
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"}]}},
        condition("c1", "Patient/p1"),
        condition("c2", "http://gp.example/fhir/Patient/p1"),
        {"resource": {"resourceType": "Organization", "id": "o1"}},
        {"resource": {"resourceType": "Procedure", "id": "x1", "subject": {"reference": "Patient/p1"}}},
        {"resource": {"resourceType": "OperationOutcome"}},
    ]));
    let kept = mapping::read_everything(&good, &n, "p1", |t| t == ResourceType::Condition).unwrap();
    assert_eq!(kept.len(), 2);

    let other = bundle(json!([condition("c1", "Patient/p2")]));
    assert_eq!(
        mapping::read_everything(&other, &n, "p1", |_| true),
        Err(ConnectorError::PatientMismatch)
    );
    let suffix_trick = bundle(json!([condition("c1", "Patient/xp1")]));
    assert_eq!(
        mapping::read_everything(&suffix_trick, &n, "p1", |_| true),
        Err(ConnectorError::PatientMismatch)
    );
    let no_id = bundle(json!([{"resource": {"resourceType": "Condition"}}]));
    assert!(matches!(
        mapping::read_everything(&no_id, &n, "p1", |_| true),
        Err(ConnectorError::Malformed(_))
    ));
}

#[test]
fn every_item_kind_renders_as_its_r4_resource() {
    let region = Region::generate(11, 5, 300);
    let mut seen = std::collections::BTreeSet::new();
    for p in region.patients() {
        let record = region.record(&p.nhs_number).unwrap();
        for item in &record.items {
            let r = mapping::resource(item, "p1");
            let ty = r["resourceType"].as_str().unwrap().to_owned();
            assert_eq!(r["id"], item.local_id.as_str());
            assert!(mapping::is_fhir_id(&item.local_id), "{}", item.local_id);
            let subject = r.get("subject").or_else(|| r.get("patient")).unwrap();
            assert_eq!(subject["reference"], "Patient/p1");
            let coding = ["code", "medicationCodeableConcept", "vaccineCode", "type"]
                .iter()
                .find_map(|k| {
                    let c = &r[*k]["coding"][0];
                    let c = if c.is_null() {
                        &r[*k][0]["coding"][0]
                    } else {
                        c
                    };
                    (!c.is_null()).then_some(c)
                })
                .unwrap();
            assert_eq!(coding["system"], "http://snomed.info/sct");
            assert_eq!(coding["code"], item.code.code);
            if ty == "Observation" && r.get("valueQuantity").is_some() {
                assert_eq!(r["valueQuantity"]["system"], "http://unitsofmeasure.org");
            }
            assert_eq!(
                item.confidential,
                r["meta"]["security"][0]["code"] == "NOPAT",
                "confidential items carry NOPAT"
            );
            seen.insert(ty);
        }
    }
    let all: std::collections::BTreeSet<_> = ResourceType::clinical()
        .map(|t| t.as_str().to_owned())
        .collect();
    assert_eq!(seen, all);
}

#[tokio::test]
async fn trace_context_goes_upstream_as_traceparent_and_is_not_part_of_the_question() {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let base = format!("http://{}/fhir", listener.local_addr().unwrap());
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream
            .write_all(&ok_reply(
                r#"{"resourceType":"Bundle","type":"searchset","total":0}"#,
            ))
            .await;
        let _ = seen_tx.send(String::from_utf8_lossy(&seen).to_ascii_lowercase());
    });
    let _guard = AbortOnDrop(server);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let query = SourceQuery::everything(nhs("9000000009")).with_trace_context(Some(tp.into()));
    assert_eq!(
        query,
        SourceQuery::everything(nhs("9000000009")),
        "a cache keyed on the question ignores the trace"
    );
    let record = connector(base, SourceKind::GpPractice, 1 << 20)
        .fetch(query)
        .await
        .unwrap();
    assert!(record.resources.is_empty());
    let head = seen_rx.await.unwrap();
    assert!(head.contains(&format!("traceparent: {tp}")), "{head}");
}
