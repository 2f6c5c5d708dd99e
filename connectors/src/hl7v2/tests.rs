//! Tests of the HL7 v2 connector: the shared conformance suite against the real simulator,
//! the exchange's checks against scripted MLLP peers, the outside sample messages, and
//! property tests of the parser layer.
#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::BytesMut;
use futures::{FutureExt, SinkExt, StreamExt, future::BoxFuture};
use proptest::prelude::*;
use serde_json::Value;
use tokio::{
    io::AsyncWriteExt,
    net::TcpListener,
    sync::{mpsc, oneshot},
};
use tokio_util::codec::{Decoder, Framed};

use super::{
    Hl7v2Config, Hl7v2Connector, datetime,
    mapping::map_message,
    message::{Builder, FieldValue, Text},
    mllp::MllpCodec,
    sim,
};
use crate::{
    Connector, ConnectorError, ConnectorKind, OdsCode, ResourceType, SourceDescriptor, SourceKind,
    SourceQuery,
    conformance::{Harness, Subject, run_all},
    fault::{Fault, FaultSwitch},
    nhs::{NHS_NUMBER_SYSTEM, NhsNumber},
    synth::model::{
        Address, Code, Date, DateTime, Demographics, Detail, EncounterDetail, Gender, Item,
        PatientRecord, Protocol, Records, SourceSpec,
    },
};

const TRUST: &str = "RAJ";
const FAMILY: &str = "O'Brien-Müller";

fn known() -> NhsNumber {
    NhsNumber::parse("9434765919").unwrap()
}

fn other() -> NhsNumber {
    NhsNumber::parse("9000000009").unwrap()
}

/// Known to the region but not to this trust.
fn elsewhere() -> NhsNumber {
    NhsNumber::parse("9000000017").unwrap()
}

fn at(year: u16, month: u8, day: u8, hour: u8, minute: u8) -> DateTime {
    DateTime {
        date: Date { year, month, day },
        hour,
        minute,
    }
}

fn item(local_id: &str, code: Code, recorded: DateTime, detail: Detail) -> Item {
    Item {
        source: OdsCode::new(TRUST),
        local_id: local_id.into(),
        code,
        recorded,
        confidential: false,
        detail,
    }
}

fn record(nhs: NhsNumber, trusts: &[&str]) -> PatientRecord {
    let mut items = vec![
        item(
            "ENC-1",
            Code::snomed("32485007", "Hospital admission"),
            at(2024, 7, 1, 23, 30),
            Detail::Encounter(EncounterDetail {
                class: "IMP",
                end: Some(at(2024, 7, 4, 10, 0)),
                location: "Ward 7^B & C".into(),
                attending: "Dr Ada Lovelace".into(),
                visit_number: "V100".into(),
            }),
        ),
        item(
            "ALG-1",
            Code::snomed("91936005", "Allergy to penicillin"),
            at(2024, 1, 10, 9, 0),
            Detail::Allergy {
                reaction: Code::snomed("271807003", "Eruption of skin"),
            },
        ),
        item(
            "DX-1",
            Code::snomed("195967001", "Asthma"),
            at(2024, 7, 2, 8, 15),
            Detail::Condition { active: true },
        ),
        item(
            "PR-1",
            Code::snomed("80146002", "Appendicectomy"),
            at(2024, 7, 2, 14, 0),
            Detail::Procedure,
        ),
        item(
            "OBS-1",
            Code::snomed("27113001", "Body weight"),
            at(2024, 12, 1, 12, 0),
            Detail::Observation {
                value: 72.5,
                unit: "kg",
            },
        ),
        item(
            "MED-1",
            Code::snomed("322236009", "Paracetamol 500mg tablets"),
            at(2024, 2, 1, 9, 0),
            Detail::Medication {
                dose: "1 tablet".into(),
            },
        ),
    ];
    let mut at_gp = item(
        "GP-1",
        Code::snomed("38341003", "Hypertension"),
        at(2020, 1, 1, 9, 0),
        Detail::Condition { active: true },
    );
    at_gp.source = OdsCode::new("P81001");
    items.push(at_gp);
    PatientRecord {
        demographics: Demographics {
            nhs_number: nhs,
            given: "Siân".into(),
            family: FAMILY.into(),
            gender: Gender::Female,
            birth_date: Date {
                year: 1980,
                month: 3,
                day: 30,
            },
            address: Address {
                lines: vec!["1 High Street".into(), "Flat 2".into()],
                city: "Leeds".into(),
                postcode: "LS1 1AA".into(),
            },
            phone: "0113 496 0000".into(),
            gp_ods: OdsCode::new("P81001"),
            restricted: false,
        },
        local_ids: trusts
            .iter()
            .map(|t| (OdsCode::new(*t), "H123456".to_owned()))
            .collect(),
        items,
    }
}

struct Fixture;

impl Records for Fixture {
    fn record(&self, nhs_number: &NhsNumber) -> Option<PatientRecord> {
        if *nhs_number == known() {
            Some(record(known(), &[TRUST]))
        } else if *nhs_number == elsewhere() {
            Some(record(elsewhere(), &["RR8"]))
        } else {
            None
        }
    }
}

fn spec() -> SourceSpec {
    SourceSpec {
        id: "trust-raj".into(),
        ods: OdsCode::new(TRUST),
        name: "Test Trust".into(),
        kind: SourceKind::Trust,
        protocol: Protocol::Hl7v2,
    }
}

fn connector_for(addr: SocketAddr, tweak: impl FnOnce(&mut Hl7v2Config)) -> Hl7v2Connector {
    let mut config = Hl7v2Config::new(addr.to_string());
    config.read_timeout = Duration::from_secs(10);
    tweak(&mut config);
    let descriptor = SourceDescriptor {
        id: "trust-raj".into(),
        ods: OdsCode::new(TRUST),
        name: "Test Trust".into(),
        kind: SourceKind::Trust,
        connector: ConnectorKind::Hl7v2,
        endpoint: config.address.clone(),
    };
    Hl7v2Connector::new(descriptor, config).unwrap()
}

async fn start_sim(fault: FaultSwitch) -> (Hl7v2Connector, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = sim::serve(listener, Arc::new(Fixture), spec(), fault);
    (connector_for(addr, |_| {}), handle)
}

/// Aborts the simulator when the test is done with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Hl7Harness;

impl Harness for Hl7Harness {
    fn start(&self) -> BoxFuture<'static, Subject> {
        async {
            let fault = FaultSwitch::default();
            let (connector, handle) = start_sim(fault.clone()).await;
            Subject {
                connector: Arc::new(connector),
                fault,
                known_patient: known(),
                unknown_patient: other(),
                guard: Box::new(AbortOnDrop(handle)),
            }
        }
        .boxed()
    }
}

#[tokio::test]
async fn passes_the_connector_conformance_suite() {
    run_all(&Hl7Harness).await;
}

fn of_type<'a>(resources: &'a [Value], ty: &str) -> Vec<&'a Value> {
    resources
        .iter()
        .filter(|r| r["resourceType"] == ty)
        .collect()
}

#[tokio::test]
async fn simulated_record_maps_to_uk_core_resources() {
    let (connector, handle) = start_sim(FaultSwitch::default()).await;
    let _guard = AbortOnDrop(handle);
    let record = connector
        .fetch(SourceQuery::everything(known()))
        .await
        .unwrap();
    let r = &record.resources;
    assert_eq!(
        r.len(),
        6,
        "patient + 5 PAS items; medication and GP items left out"
    );

    let patient = of_type(r, "Patient")[0];
    assert_eq!(patient["id"], "H123456");
    assert_eq!(patient["identifier"][0]["system"], NHS_NUMBER_SYSTEM);
    assert_eq!(patient["identifier"][0]["value"], known().expose());
    assert_eq!(patient["identifier"][1]["value"], "H123456");
    assert_eq!(patient["identifier"][1]["type"]["coding"][0]["code"], "MR");
    assert_eq!(patient["name"][0]["family"], FAMILY);
    assert_eq!(patient["name"][0]["given"][0], "Siân");
    assert_eq!(patient["birthDate"], "1980-03-30");
    assert_eq!(patient["gender"], "female");
    assert_eq!(patient["address"][0]["postalCode"], "LS1 1AA");
    assert_eq!(
        patient["meta"]["profile"][0],
        "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
    );

    let enc = of_type(r, "Encounter")[0];
    assert_eq!(enc["id"], "ENC-1");
    assert_eq!(enc["class"]["code"], "IMP");
    assert_eq!(enc["status"], "finished");
    // 23:30 UTC on 1 July is 00:30 BST on 2 July.
    assert_eq!(enc["period"]["start"], "2024-07-02T00:30:00+01:00");
    assert_eq!(enc["period"]["end"], "2024-07-04T11:00:00+01:00");
    assert_eq!(enc["location"][0]["location"]["display"], "Ward 7^B & C");
    assert_eq!(
        enc["participant"][0]["individual"]["display"],
        "Dr Ada Lovelace"
    );
    assert_eq!(enc["reasonCode"][0]["coding"][0]["code"], "32485007");
    assert_eq!(enc["subject"]["reference"], "Patient/H123456");

    let allergy = of_type(r, "AllergyIntolerance")[0];
    assert_eq!(
        allergy["code"]["coding"][0]["system"],
        "http://snomed.info/sct"
    );
    assert_eq!(allergy["code"]["coding"][0]["code"], "91936005");
    assert_eq!(
        allergy["reaction"][0]["manifestation"][0]["text"],
        "Eruption of skin"
    );
    assert_eq!(allergy["recordedDate"], "2024-01-10");

    let condition = of_type(r, "Condition")[0];
    assert_eq!(condition["id"], "DX-1");
    assert_eq!(condition["recordedDate"], "2024-07-02T09:15:00+01:00");

    let procedure = of_type(r, "Procedure")[0];
    assert_eq!(procedure["id"], "PR-1");
    assert_eq!(procedure["performedDateTime"], "2024-07-02T15:00:00+01:00");

    let obs = of_type(r, "Observation")[0];
    assert_eq!(obs["id"], "OBS-1");
    assert_eq!(obs["valueQuantity"]["value"], 72.5);
    assert_eq!(obs["valueQuantity"]["code"], "kg");
    // December: GMT.
    assert_eq!(obs["effectiveDateTime"], "2024-12-01T12:00:00+00:00");

    // Only what was asked for, plus the Patient.
    let some = connector
        .fetch(SourceQuery::new(known(), [ResourceType::Condition]))
        .await
        .unwrap();
    let types: Vec<_> = some
        .resources
        .iter()
        .map(|r| r["resourceType"].clone())
        .collect();
    assert_eq!(types, ["Patient", "Condition"]);
}

#[tokio::test]
async fn patient_unknown_at_this_trust_is_an_empty_answer() {
    let (connector, handle) = start_sim(FaultSwitch::default()).await;
    let _guard = AbortOnDrop(handle);
    let record = connector
        .fetch(SourceQuery::everything(elsewhere()))
        .await
        .unwrap();
    assert!(!record.knows_patient());
}

#[tokio::test]
async fn connections_are_reused_across_queries() {
    let (connector, handle) = start_sim(FaultSwitch::default()).await;
    let _guard = AbortOnDrop(handle);
    for _ in 0..3 {
        connector
            .fetch(SourceQuery::everything(known()))
            .await
            .unwrap();
        assert_eq!(connector.idle_connections(), 1);
    }
}

#[tokio::test]
async fn error_fault_is_rejected_without_patient_data_and_connection_survives() {
    let fault = FaultSwitch::new(Fault::Error);
    let (connector, handle) = start_sim(fault.clone()).await;
    let _guard = AbortOnDrop(handle);
    let err = connector
        .fetch(SourceQuery::everything(known()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ConnectorError::Rejected("application error (207 application internal error)".into())
    );
    // An AE is in step with the query: the connection is kept.
    assert_eq!(connector.idle_connections(), 1);
    fault.set(Fault::None);
    assert!(
        connector
            .fetch(SourceQuery::everything(known()))
            .await
            .unwrap()
            .knows_patient()
    );
}

// ---------------------------------------------------------------------------------------
// Scripted peers: a real MLLP socket that answers with whatever a test needs.

/// The query as the peer saw it.
#[derive(Debug, Clone)]
struct Seen {
    control_id: String,
    tag: String,
}

fn seen(frame: &[u8]) -> Seen {
    let text = Text::decode(frame).unwrap();
    let msg = text.parse().unwrap();
    Seen {
        control_id: msg.control_id(),
        tag: msg.segment("QPD").unwrap().get(2, 1, 1).into_owned(),
    }
}

/// Starts a peer that answers each query with `reply(seen)` raw bytes (framing is the
/// script's business). Every query seen is also sent on the returned channel.
async fn scripted(
    reply: impl Fn(&Seen) -> Vec<u8> + Send + Sync + 'static,
) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let reply = Arc::clone(&reply);
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut framed = Framed::new(stream, MllpCodec::new(1 << 20));
                while let Some(Ok(frame)) = framed.next().await {
                    let s = seen(&frame);
                    let _ = tx.send(s.clone());
                    let bytes = reply(&s);
                    let stream = framed.get_mut();
                    if stream.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

fn frame(payload: &str) -> Vec<u8> {
    frame_bytes(payload.as_bytes())
}

fn frame_bytes(payload: &[u8]) -> Vec<u8> {
    [&[0x0B][..], payload, &[0x1C, 0x0D]].concat()
}

fn rsp(s: &Seen, msa: &str, control_id: &str, qak: &str, body: &str) -> String {
    format!(
        "MSH|^~\\&|PAS|{TRUST}|TRIBUTARY|TRIBUTARY|20240701120000+0100||RSP^K22^RSP_K21|R1|P|2.5\r\
         MSA|{msa}|{control_id}\r{body}QAK|{}|{qak}\rQPD|IHE PDQ Query|{}\r",
        s.tag, s.tag
    )
}

fn pid(nhs: &str) -> String {
    format!("PID|1||{nhs}^^^NHS^NH~H1^^^{TRUST}^MR||{FAMILY}^Sian^^^^^L||19800330|F\r")
}

async fn fetch_from(
    addr: SocketAddr,
    tweak: impl FnOnce(&mut Hl7v2Config),
) -> (Result<crate::SourceRecord, ConnectorError>, Hl7v2Connector) {
    let connector = connector_for(addr, tweak);
    let result = connector.fetch(SourceQuery::everything(known())).await;
    (result, connector)
}

fn assert_no_patient_data(err: &ConnectorError) {
    let text = format!("{err} {err:?}");
    for secret in [
        known().expose(),
        other().expose(),
        FAMILY.into(),
        "Sian".into(),
        "H1".into(),
    ] {
        assert!(!text.contains(&secret), "error leaks patient data: {text}");
    }
}

#[tokio::test]
async fn reply_about_another_patient_is_discarded() {
    let (addr, _) =
        scripted(|s| frame(&rsp(s, "AA", &s.control_id, "OK", &pid(&other().expose())))).await;
    let (result, _) = fetch_from(addr, |_| {}).await;
    let err = result.unwrap_err();
    assert_eq!(err, ConnectorError::PatientMismatch);
    assert_no_patient_data(&err);
}

#[tokio::test]
async fn reply_without_an_nhs_number_or_with_two_patients_is_discarded() {
    let (addr, _) = scripted(|s| {
        frame(&rsp(
            s,
            "AA",
            &s.control_id,
            "OK",
            &format!("PID|1||H1^^^{TRUST}^MR||{FAMILY}\r"),
        ))
    })
    .await;
    assert_eq!(
        fetch_from(addr, |_| {}).await.0.unwrap_err(),
        ConnectorError::PatientMismatch
    );

    let (addr, _) = scripted(|s| {
        let body = format!("{}{}", pid(&known().expose()), pid(&other().expose()));
        frame(&rsp(s, "AA", &s.control_id, "OK", &body))
    })
    .await;
    assert_eq!(
        fetch_from(addr, |_| {}).await.0.unwrap_err(),
        ConnectorError::PatientMismatch
    );

    let (addr, _) = scripted(|s| {
        let body = format!("{}{}", pid(&known().expose()), pid(&known().expose()));
        frame(&rsp(s, "AA", &s.control_id, "OK", &body))
    })
    .await;
    assert!(matches!(
        fetch_from(addr, |_| {}).await.0.unwrap_err(),
        ConnectorError::Malformed(_)
    ));
}

#[tokio::test]
async fn wrong_control_id_is_malformed_and_the_connection_is_dropped() {
    let (addr, _) =
        scripted(|s| frame(&rsp(s, "AA", "SOMEONE-ELSE", "OK", &pid(&known().expose())))).await;
    let (result, connector) = fetch_from(addr, |_| {}).await;
    let err = result.unwrap_err();
    assert_eq!(
        err,
        ConnectorError::Malformed("reply control id does not match the query".into())
    );
    assert_eq!(connector.idle_connections(), 0);
}

#[tokio::test]
async fn wrong_query_tag_is_malformed() {
    let (addr, _) = scripted(|s| {
        let body = pid(&known().expose());
        frame(
            &rsp(s, "AA", &s.control_id, "OK", &body)
                .replace(&format!("QAK|{}", s.tag), "QAK|OTHER"),
        )
    })
    .await;
    assert!(matches!(
        fetch_from(addr, |_| {}).await.0.unwrap_err(),
        ConnectorError::Malformed(_)
    ));
}

#[tokio::test]
async fn ae_and_ar_replies_name_error_codes_but_never_their_text() {
    for (ack, qak, expected) in [
        ("AE", "AE", "application error (204 unknown key identifier)"),
        (
            "AR",
            "AR",
            "application reject (204 unknown key identifier)",
        ),
        ("AA", "AE", "query error (204 unknown key identifier)"),
        ("AA", "AR", "query rejected (204 unknown key identifier)"),
    ] {
        let (addr, _) = scripted(move |s| {
            let err = format!(
                "ERR||QPD^1^3|204^Unknown key identifier^HL70357|E|||Patient {FAMILY} {} not found\r",
                known().expose()
            );
            frame(&rsp(s, ack, &s.control_id, qak, &err))
        })
        .await;
        let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
        assert_eq!(err, ConnectorError::Rejected(expected.into()));
        assert_no_patient_data(&err);
    }
    // v2.3 style ERR-1 (segment^sequence^field^code&text).
    let (addr, _) = scripted(|s| {
        frame(&rsp(
            s,
            "AE",
            &s.control_id,
            "AE",
            "ERR|QPD^1^3^207&Internal\r",
        ))
    })
    .await;
    assert_eq!(
        fetch_from(addr, |_| {}).await.0.unwrap_err(),
        ConnectorError::Rejected("application error (207 application internal error)".into())
    );
}

#[tokio::test]
async fn no_data_found_is_an_empty_answer() {
    let (addr, _) = scripted(|s| frame(&rsp(s, "AA", &s.control_id, "NF", ""))).await;
    assert!(!fetch_from(addr, |_| {}).await.0.unwrap().knows_patient());
}

#[tokio::test]
async fn latin1_replies_are_read_declared_or_not() {
    for charset in ["8859/1", ""] {
        let (addr, _) = scripted(move |s| {
            let text = rsp(s, "AA", &s.control_id, "OK", &pid(&known().expose()))
                .replace("|2.5\r", &format!("|2.5||||||{charset}\r"));
            let latin1: Vec<u8> = text
                .chars()
                .map(|c| u8::try_from(u32::from(c)).unwrap())
                .collect();
            frame_bytes(&latin1)
        })
        .await;
        let record = fetch_from(addr, |_| {}).await.0.unwrap();
        assert_eq!(
            record.resources[0]["name"][0]["family"], FAMILY,
            "{charset}"
        );
    }
}

#[tokio::test]
async fn malformed_truncated_and_non_mllp_replies_are_classified() {
    // A truncated message inside a whole frame.
    let (addr, _) = scripted(|s| {
        // Cut inside a segment name: the QAK is gone, "QA" is left.
        let text = rsp(s, "AA", &s.control_id, "OK", &pid(&known().expose()));
        let cut = text.find("QAK|").unwrap() + 2;
        frame(&text[..cut])
    })
    .await;
    let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
    assert!(matches!(err, ConnectorError::Malformed(_)), "{err:?}");

    // HTTP on an MLLP port.
    let (addr, _) = scripted(|_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
    let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
    assert!(matches!(err, ConnectorError::Malformed(_)), "{err:?}");

    // Not HL7 in a frame.
    let (addr, _) = scripted(|_| frame("{\"resourceType\":\"OperationOutcome\"}")).await;
    let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
    assert!(matches!(err, ConnectorError::Malformed(_)), "{err:?}");

    // An ACK where an RSP belongs.
    let (addr, _) = scripted(|s| {
        frame(&format!(
            "MSH|^~\\&|PAS|X|||20240101||ACK^Q22|1|P|2.5\rMSA|AA|{}\r",
            s.control_id
        ))
    })
    .await;
    let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
    assert!(matches!(err, ConnectorError::Malformed(_)), "{err:?}");
}

#[tokio::test]
async fn oversized_frames_fail_at_the_cap() {
    let (addr, _) = scripted(|s| {
        let big = format!("NTE|1||{}\r", "x".repeat(4096));
        frame(&rsp(
            s,
            "AA",
            &s.control_id,
            "OK",
            &format!("{}{big}", pid(&known().expose())),
        ))
    })
    .await;
    let err = fetch_from(addr, |c| c.max_frame_bytes = 1024)
        .await
        .0
        .unwrap_err();
    assert_eq!(err, ConnectorError::TooLarge { limit: 1024 });

    // A frame that never ends is cut at the cap, without waiting for a timeout.
    let (addr, _) = scripted(|_| [&[0x0B][..], &[b'x'; 8192]].concat()).await;
    let err = fetch_from(addr, |c| c.max_frame_bytes = 1024)
        .await
        .0
        .unwrap_err();
    assert_eq!(err, ConnectorError::TooLarge { limit: 1024 });
}

#[tokio::test(start_paused = true)]
async fn a_frame_that_never_ends_times_out() {
    // Paused clock: the runtime jumps to the read timeout once every task waits.
    let (addr, _) = scripted(|_| b"\x0bMSH|^~\\&|PAS|".to_vec()).await;
    let err = fetch_from(addr, |c| c.read_timeout = Duration::from_secs(30))
        .await
        .0
        .unwrap_err();
    assert_eq!(
        err,
        ConnectorError::Transport("no whole reply within the read timeout".into())
    );
}

#[tokio::test]
async fn closed_and_refused_connections_are_classified() {
    // A peer that reads the query and closes without a word.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = BytesMut::new();
            // Read the whole query, then close without a word.
            let mut codec = MllpCodec::new(1 << 16);
            loop {
                use tokio::io::AsyncReadExt;
                if stream.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
                if codec.decode(&mut buf).ok().flatten().is_some() {
                    break;
                }
            }
            let _ = stream.shutdown().await;
        }
    });
    let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
    assert!(matches!(err, ConnectorError::Transport(_)), "{err:?}");

    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let err = fetch_from(addr, |_| {}).await.0.unwrap_err();
    assert!(matches!(err, ConnectorError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn a_connection_the_source_closed_while_idle_is_replaced() {
    // This peer answers one query per connection, then hangs up.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut framed = Framed::new(stream, MllpCodec::new(1 << 20));
                if let Some(Ok(f)) = framed.next().await {
                    let s = seen(&f);
                    let reply = rsp(&s, "AA", &s.control_id, "OK", &pid(&known().expose()));
                    let _ = framed.send(reply.into_bytes()).await;
                }
            });
        }
    });
    let connector = connector_for(addr, |_| {});
    for _ in 0..3 {
        let record = connector
            .fetch(SourceQuery::everything(known()))
            .await
            .unwrap();
        assert!(record.knows_patient());
    }
}

#[tokio::test]
async fn every_query_has_a_fresh_control_id() {
    let (addr, mut queries) = scripted(|s| frame(&rsp(s, "AA", &s.control_id, "NF", ""))).await;
    let connector = connector_for(addr, |_| {});
    for _ in 0..5 {
        connector
            .fetch(SourceQuery::everything(known()))
            .await
            .unwrap();
    }
    let mut ids = Vec::new();
    while let Ok(s) = queries.try_recv() {
        assert!(s.control_id.len() <= 20);
        ids.push(s.control_id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5);
}

#[tokio::test]
async fn a_cancelled_call_never_leaves_a_stale_reply_for_the_next() {
    // The peer holds its first reply until the test releases it, after the call was dropped.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_query_tx, got_query_rx) = oneshot::channel::<()>();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let gates = Arc::new(std::sync::Mutex::new(Some((got_query_tx, release_rx))));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let gates = Arc::clone(&gates);
            tokio::spawn(async move {
                let mut framed = Framed::new(stream, MllpCodec::new(1 << 20));
                while let Some(Ok(f)) = framed.next().await {
                    let s = seen(&f);
                    let gate = gates.lock().unwrap().take();
                    if let Some((got, release)) = gate {
                        let _ = got.send(());
                        let _ = release.await;
                        // The stale reply: about someone else, for the old control id.
                        let stale = rsp(&s, "AA", &s.control_id, "OK", &pid(&other().expose()));
                        if framed.send(stale.into_bytes()).await.is_err() {
                            return;
                        }
                    } else {
                        let good = rsp(&s, "AA", &s.control_id, "OK", &pid(&known().expose()));
                        if framed.send(good.into_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let connector = connector_for(addr, |_| {});
    let call = connector.fetch(SourceQuery::everything(known()));
    let mut call = Box::pin(call);
    tokio::select! {
        _ = &mut call => panic!("the first call cannot finish before release"),
        _ = got_query_rx => {}
    }
    drop(call);
    let _ = release_tx.send(());
    let record = connector
        .fetch(SourceQuery::everything(known()))
        .await
        .unwrap();
    assert_eq!(
        record.resources[0]["identifier"][0]["value"],
        known().expose()
    );
}

#[tokio::test]
async fn garbage_fault_is_malformed_and_drops_the_connection() {
    let fault = FaultSwitch::new(Fault::Garbage);
    let (connector, handle) = start_sim(fault.clone()).await;
    let _guard = AbortOnDrop(handle);
    let err = connector
        .fetch(SourceQuery::everything(known()))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ConnectorError::Malformed("not an hl7 v2 message (no msh header)".into())
    );
    assert_eq!(connector.idle_connections(), 0);
}

// ---------------------------------------------------------------------------------------
// Outside samples, read from ../shared at test time (one set is GPL-3.0: never copied).

fn testdata(folder: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata")
        .join(folder);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            (name.ends_with(".hl7") || name.ends_with(".txt")) && !name.starts_with("LICENSE")
        })
        .map(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

fn map_file(bytes: &[u8]) -> Result<Vec<super::mapping::MappedPatient>, String> {
    let text = Text::decode(bytes).map_err(|e| e.to_string())?;
    let msg = text.parse().map_err(|e| e.to_string())?;
    Ok(map_message(&msg))
}

fn named<'a>(files: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &files.iter().find(|(n, _)| n == name).unwrap().1
}

#[test]
fn uclh_adt_samples_parse_and_map() {
    let files = testdata("uclh-emap-hl7v2-adt");
    assert_eq!(files.len(), 60);
    for (name, bytes) in &files {
        let patients = map_file(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        // A17 swaps two patients' beds: two PIDs.
        let expected = if name == "generic__A17.txt" { 2 } else { 1 };
        assert_eq!(patients.len(), expected, "{name}");
        for r in &patients[0].resources {
            assert!(r["id"].as_str().is_some_and(|id| !id.is_empty()), "{name}");
        }
    }

    let a01 = &map_file(named(&files, "generic__A01.txt")).unwrap()[0];
    assert_eq!(a01.nhs_numbers, ["9999999999"]);
    let patient = &a01.resources[0];
    assert_eq!(patient["id"], "40800000");
    assert_eq!(patient["identifier"][0]["value"], "40800000");
    assert_eq!(patient["identifier"][1]["system"], NHS_NUMBER_SYSTEM);
    assert_eq!(patient["identifier"][1]["value"], "9999999999");
    assert_eq!(patient["name"][0]["family"], "ORANGE");
    assert_eq!(patient["name"][0]["use"], "usual");
    assert_eq!(patient["birthDate"], "1980-01-01");
    let enc = of_type(&a01.resources, "Encounter")[0];
    assert_eq!(enc["id"], "123412341234");
    assert_eq!(enc["class"]["code"], "IMP");
    assert_eq!(enc["period"]["start"], "2013-02-11T10:00:52+00:00");
    assert_eq!(
        enc["location"][0]["location"]["display"],
        "T42E T42E BY02 BY02-17"
    );
    assert_eq!(
        enc["participant"][0]["individual"]["display"],
        "HONEY BADGER"
    );
    let obs = of_type(&a01.resources, "Observation")[0];
    assert_eq!(obs["code"]["coding"][0]["code"], "AdminCode");
    assert_eq!(obs["valueString"], "1");

    // BST/GMT birth dates: the local calendar date, never shifted to UTC.
    for (file, date) in [
        ("birth_date_bst.txt", "1925-07-04"),
        ("birth_date_gmt.txt", "1980-01-01"),
        ("birth_datetime_bst.txt", "1925-07-04"),
        ("birth_datetime_gmt.txt", "1980-01-01"),
        ("birth_datetime_midnight_bst.txt", "1925-07-04"),
    ] {
        let p = &map_file(named(&files, file)).unwrap()[0].resources[0];
        assert_eq!(p["birthDate"], date, "{file}");
    }

    // Death on discharge.
    let death = &map_file(named(&files, "generic__A03_death.txt")).unwrap()[0].resources[0];
    assert_eq!(death["deceasedDateTime"], "2013-02-11T08:34:56+00:00");
    // A PID-3 without an NHS number maps, but carries none (the client would refuse it).
    assert!(
        map_file(named(&files, "generic__A03_death.txt")).unwrap()[0]
            .nhs_numbers
            .is_empty()
    );

    // The deliberately odd one: `^~\\&` encoding characters and literal `\r` at line ends.
    let odd = &map_file(named(&files, "TestForJunit.txt")).unwrap()[0];
    assert_eq!(odd.nhs_numbers, Vec::<String>::new());
    let p = &odd.resources[0];
    assert_eq!(p["id"], "50032556");
    assert_eq!(p["birthDate"], "1940-01-01");
    assert!(
        p["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["system"] != NHS_NUMBER_SYSTEM)
    );
    let enc = of_type(&odd.resources, "Encounter")[0];
    assert_eq!(enc["period"]["start"], "2012-09-21T18:40:00+01:00");
    assert_eq!(of_type(&odd.resources, "Observation").len(), 3);
}

#[test]
fn ipf_samples_parse_and_map() {
    let files = testdata("ipf-hl7v2");
    assert_eq!(files.len(), 37);
    for (name, bytes) in &files {
        map_file(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // ISO-8859-1 without a declaration: decoded by the Latin-1 fallback.
    let bytes = named(&files, "iti8__iti8-a40-iso-8859-1.hl7");
    let text = Text::decode(bytes).unwrap();
    let msg = text.parse().unwrap();
    assert_eq!(msg.segment("MSH").unwrap().get(5, 1, 1), "BLÄH");
    let patients = map_message(&msg);
    assert_eq!(patients[0].resources[0]["name"][0]["family"], "STILLER");

    // A truncated A01 (no PID): parses, maps to no patient.
    assert!(
        map_file(named(&files, "iti8__iti8-a01-incomplete.hl7"))
            .unwrap()
            .is_empty()
    );

    // A PDQ response: every PID is a patient; OID authorities become urn:oid systems.
    let pdq = map_file(named(&files, "pdq__PDQ_Response.hl7")).unwrap();
    assert_eq!(pdq.len(), 9);
    assert_eq!(
        pdq[0].resources[0]["identifier"][0]["system"],
        "urn:oid:2.16.840.1.113883.3.37.4.1.1.2.511.1"
    );

    // The PIX error response, read as a reply: its ERR code, none of its text.
    let err = named(&files, "pixquery__err-1_Response.hl7");
    let text = Text::decode(err).unwrap();
    let msg = text.parse().unwrap();
    assert_eq!(msg.segment("MSA").unwrap().get(1, 1, 1), "AE");
    assert_eq!(msg.segment("ERR").unwrap().get(3, 1, 1), "204");
}

// ---------------------------------------------------------------------------------------
// Properties.

fn value_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ]{0,8}",
        proptest::string::string_regex("[|^~\\\\&\r\nA-Za-zé€ 0-9.-]{0,12}").unwrap(),
        any::<String>().prop_map(|s| s.chars().take(10).collect()),
    ]
}

fn field_strategy() -> impl Strategy<Value = FieldValue> {
    proptest::collection::vec(
        proptest::collection::vec(proptest::collection::vec(value_strategy(), 1..3), 1..4),
        1..3,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_gives_every_value_back(
        segments in proptest::collection::vec(proptest::collection::vec(field_strategy(), 1..5), 1..4)
    ) {
        let mut b = Builder::new();
        b.segment("MSH", [vec!["APP"], vec!["FAC"]]);
        for fields in &segments {
            b.segment_structured("ZZZ", fields);
        }
        let text = Text::decode(b.finish().as_bytes()).unwrap();
        let msg = text.parse().unwrap();
        let parsed: Vec<_> = msg.segments().filter(|s| s.name() == "ZZZ").collect();
        prop_assert_eq!(parsed.len(), segments.len());
        for (seg, fields) in parsed.iter().zip(&segments) {
            for (f, field) in fields.iter().enumerate() {
                for (r, rep) in field.iter().enumerate() {
                    for (c, comp) in rep.iter().enumerate() {
                        for (s, value) in comp.iter().enumerate() {
                            prop_assert_eq!(&seg.sub(f + 1, r + 1, c + 1, s + 1), value);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = map_file(&bytes);
        let mut prefixed = b"MSH|^~\\&|".to_vec();
        prefixed.extend_from_slice(&bytes);
        let _ = map_file(&prefixed);
        let query = SourceQuery::everything(known());
        let _ = super::interpret(&bytes, "X", "QX", &query);
        let _ = super::interpret(&prefixed, "X", "QX", &query);
        let mut bare = b"MSH".to_vec();
        bare.extend_from_slice(&bytes);
        let _ = map_file(&bare);
        let mut codec = MllpCodec::new(256);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }

    #[test]
    fn arbitrary_unicode_headers_never_panic(header in "MSH.{0,16}", rest in ".{0,40}") {
        let text = format!("{header}\r{rest}\rPID|{rest}\n");
        let _ = map_file(text.as_bytes());
    }

    #[test]
    fn hl7_shaped_noise_never_panics(
        segs in proptest::collection::vec(
            (
                prop_oneof![Just("PID"), Just("PV1"), Just("PV2"), Just("AL1"), Just("DG1"),
                            Just("PR1"), Just("OBX"), Just("MSA"), Just("QAK"), Just("ERR"), Just("ZX1")],
                proptest::string::string_regex("[|^~\\\\&A-Z0-9+.\\- é]{0,60}").unwrap(),
            ),
            0..8,
        )
    ) {
        let mut text = String::from("MSH|^~\\&|A|B|C|D|2024||RSP^K22|X|P|2.5\r");
        for (name, body) in &segs {
            text.push_str(name);
            text.push('|');
            text.push_str(body);
            text.push('\r');
        }
        let _ = map_file(text.as_bytes());
        let _ = super::interpret(text.as_bytes(), "X", "QX", &SourceQuery::everything(known()));
    }

    #[test]
    fn uk_times_round_trip(minutes in 0i64..(130 * 366 * 1440)) {
        // 1990 onwards, minute by minute.
        let base = 7305 * 1440; // 1990-01-01 in minutes since 1970
        let total = base + minutes;
        let days = total / 1440;
        let utc = {
            let (y, m, d) = civil(days);
            DateTime { date: Date { year: y, month: m, day: d }, hour: ((total % 1440) / 60) as u8, minute: (total % 60) as u8 }
        };
        let hl7 = datetime::to_hl7_uk(&utc);
        let fhir = datetime::to_fhir_datetime(&hl7).unwrap();
        // Parse the FHIR text back to UTC minutes.
        let (local, offset) = fhir.split_at(fhir.len() - 6);
        let sign = if offset.starts_with('-') { -1 } else { 1 };
        let off_min = sign * (offset[1..3].parse::<i64>().unwrap() * 60 + offset[4..6].parse::<i64>().unwrap());
        let (y, m, d) = (local[0..4].parse::<i64>().unwrap(), local[5..7].parse::<u32>().unwrap(), local[8..10].parse::<u32>().unwrap());
        let hh = local[11..13].parse::<i64>().unwrap();
        let mm = local[14..16].parse::<i64>().unwrap();
        let back = days_from(y, m, d) * 1440 + hh * 60 + mm - off_min;
        prop_assert_eq!(back, total);
        prop_assert!(offset == "+00:00" || offset == "+01:00");
    }
}

fn days_from(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

fn civil(z: i64) -> (u16, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as u16, m as u8, d as u8)
}

#[test]
fn query_is_a_pdq_qbp_q22_by_nhs_number() {
    let config = Hl7v2Config::new("127.0.0.1:1");
    let descriptor = SourceDescriptor {
        id: "t".into(),
        ods: OdsCode::new(TRUST),
        name: "T".into(),
        kind: SourceKind::Trust,
        connector: ConnectorKind::Hl7v2,
        endpoint: config.address.clone(),
    };
    let q = super::build_query(&config, &descriptor, "CTRL1", "QCTRL1", &known());
    let text = Text::decode(q.as_bytes()).unwrap();
    let msg = text.parse().unwrap();
    assert_eq!(msg.message_type(), "QBP^Q22");
    assert_eq!(msg.control_id(), "CTRL1");
    let msh = msg.segment("MSH").unwrap();
    assert_eq!(msh.get(6, 1, 1), TRUST);
    assert_eq!(msh.get(12, 1, 1), "2.5");
    let qpd = msg.segment("QPD").unwrap();
    assert_eq!(qpd.get(1, 1, 1), "IHE PDQ Query");
    assert_eq!(qpd.get(2, 1, 1), "QCTRL1");
    assert_eq!(qpd.get(3, 1, 1), "@PID.3.1");
    assert_eq!(qpd.get(3, 1, 2), known().expose());
    assert_eq!(qpd.get(3, 2, 2), "NHS");
}
