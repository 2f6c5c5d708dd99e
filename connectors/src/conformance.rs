//! The connector conformance suite: every adapter is checked the same way (vector's
//! `run_and_assert_sink_compliance`). Each connector module provides a [`Harness`] that
//! starts its real simulator on loopback and a connector pointed at it; [`run_all`] then
//! checks mapping, error classification, cancel safety and that no error leaks the patient.

use std::{any::Any, sync::Arc, time::Duration};

use futures::future::BoxFuture;

use crate::{
    Connector, ConnectorError, ConnectorKind, ResourceType, SourceQuery,
    fault::{Fault, FaultSwitch},
    nhs::{NHS_NUMBER_SYSTEM, NhsNumber},
};

/// A connector wired to a running simulator of its protocol.
pub struct Subject {
    pub connector: Arc<dyn Connector>,
    /// Flips the simulator's fault mode.
    pub fault: FaultSwitch,
    /// A patient the simulated source knows, with at least one clinical resource.
    pub known_patient: NhsNumber,
    /// A valid NHS number the simulated source does not know.
    pub unknown_patient: NhsNumber,
    /// Keeps the simulator alive for the test.
    pub guard: Box<dyn Any + Send>,
}

impl std::fmt::Debug for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subject")
            .field("source", &self.connector.descriptor().id)
            .finish_non_exhaustive()
    }
}

/// Starts a simulator and a connector for it.
pub trait Harness: Send + Sync {
    fn start(&self) -> BoxFuture<'static, Subject>;
}

/// How long the suite lets a hung source hang before it cancels the call. Real time: the
/// suite proves the future stays pending, then drops it.
const HANG_WINDOW: Duration = Duration::from_millis(300);

/// Runs every conformance check against a fresh subject each.
pub async fn run_all(harness: &dyn Harness) {
    maps_a_known_record(harness.start().await).await;
    unknown_patient_is_an_empty_answer(harness.start().await).await;
    server_error_is_classified(harness.start().await).await;
    garbage_is_malformed(harness.start().await).await;
    hang_is_cancel_safe(harness.start().await).await;
    slow_source_still_answers(harness.start().await).await;
    every_fault_is_classified(harness).await;
}

fn assert_no_patient_in(err: &ConnectorError, nhs: &NhsNumber) {
    let text = format!("{err} {err:?}");
    assert!(
        !text.contains(&nhs.expose()),
        "error message carries the NHS number: {text}"
    );
}

fn nhs_numbers_of(resource: &serde_json::Value) -> Vec<String> {
    resource["identifier"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter(|id| id["system"] == NHS_NUMBER_SYSTEM)
                .filter_map(|id| id["value"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn maps_a_known_record(s: Subject) {
    let record = s
        .connector
        .fetch(SourceQuery::everything(s.known_patient))
        .await
        .unwrap_or_else(|e| panic!("known patient: {e}"));
    let patients: Vec<_> = record
        .resources
        .iter()
        .filter(|r| r["resourceType"] == "Patient")
        .collect();
    assert_eq!(
        patients.len(),
        1,
        "exactly one Patient for the known patient"
    );
    assert_eq!(
        nhs_numbers_of(patients[0]),
        vec![s.known_patient.expose()],
        "Patient carries the NHS number"
    );
    assert!(
        record.resources.len() > 1,
        "known patient has clinical resources"
    );
    for r in &record.resources {
        let ty = r["resourceType"].as_str().unwrap_or_default();
        assert!(
            ResourceType::parse(ty).is_some(),
            "unexpected resourceType {ty}"
        );
        assert!(
            r["id"].as_str().is_some_and(|id| !id.is_empty()),
            "every resource has an id"
        );
    }

    // Asking for one type returns that type (and the Patient) only.
    let only = s
        .connector
        .fetch(SourceQuery::new(s.known_patient, [ResourceType::Patient]))
        .await
        .unwrap_or_else(|e| panic!("patient only: {e}"));
    assert!(
        only.resources
            .iter()
            .all(|r| r["resourceType"] == "Patient")
    );
}

async fn unknown_patient_is_an_empty_answer(s: Subject) {
    let record = s
        .connector
        .fetch(SourceQuery::everything(s.unknown_patient))
        .await
        .unwrap_or_else(|e| panic!("unknown patient must be an empty answer, got {e}"));
    assert!(!record.knows_patient());
}

async fn server_error_is_classified(s: Subject) {
    s.fault.set(Fault::Error);
    let err = s
        .connector
        .fetch(SourceQuery::everything(s.known_patient))
        .await
        .expect_err("error fault");
    assert!(
        matches!(
            err,
            ConnectorError::Status { status: 500..=599 } | ConnectorError::Rejected(_)
        ),
        "server error classified as status or rejected, got {err:?}"
    );
    assert_no_patient_in(&err, &s.known_patient);
}

async fn garbage_is_malformed(s: Subject) {
    s.fault.set(Fault::Garbage);
    let err = s
        .connector
        .fetch(SourceQuery::everything(s.known_patient))
        .await
        .expect_err("garbage fault");
    assert!(
        matches!(err, ConnectorError::Malformed(_)),
        "garbage classified as malformed, got {err:?}"
    );
    assert_no_patient_in(&err, &s.known_patient);
}

async fn hang_is_cancel_safe(s: Subject) {
    s.fault.set(Fault::Hang);
    let call = s.connector.fetch(SourceQuery::everything(s.known_patient));
    assert!(
        tokio::time::timeout(HANG_WINDOW, call).await.is_err(),
        "a hung source never answers"
    );
    // The timed-out call was dropped mid-flight; the connector must still work.
    s.fault.set(Fault::None);
    let record = s
        .connector
        .fetch(SourceQuery::everything(s.known_patient))
        .await
        .unwrap_or_else(|e| panic!("after a cancelled call: {e}"));
    assert!(record.knows_patient());
}

async fn slow_source_still_answers(s: Subject) {
    s.fault.set(Fault::Slow(Duration::from_millis(50)));
    let record = s
        .connector
        .fetch(SourceQuery::everything(s.known_patient))
        .await
        .unwrap_or_else(|e| panic!("slow source: {e}"));
    assert!(record.knows_patient());
}

/// What a fault comes to at the connector: a classified error with this code, or a call that
/// never finishes on its own (the gateway's deadline ends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Code(&'static str),
    Pending,
}

/// Every fault mode and what it comes to over FHIR and over HL7 v2 (the mapping of each mode
/// to each protocol is in [`crate::fault`]).
const FAULT_MATRIX: [(Fault, Expect, Expect); 12] = {
    use Expect::{Code, Pending};
    [
        (Fault::Hang, Pending, Pending),
        (Fault::Stall, Pending, Pending),
        (Fault::Reset, Code("transport"), Code("transport")),
        (Fault::Drip, Pending, Pending),
        (Fault::Garbage, Code("malformed"), Code("malformed")),
        (Fault::WrongShape, Code("malformed"), Code("malformed")),
        (Fault::Error, Code("status"), Code("rejected")),
        (Fault::Oversize, Code("too_large"), Code("too_large")),
        (Fault::Redirect, Code("redirect"), Code("malformed")),
        (Fault::Refused, Code("connect"), Code("connect")),
        (
            Fault::OtherPatient,
            Code("patient_mismatch"),
            Code("patient_mismatch"),
        ),
        (Fault::Slow(Duration::from_secs(60)), Pending, Pending),
    ]
};

/// Each fault on a fresh subject: classified (or pending), no patient in the error, and the
/// connector answers again once the fault is cleared.
async fn every_fault_is_classified(harness: &dyn Harness) {
    for (fault, over_fhir, over_hl7) in FAULT_MATRIX {
        let s = harness.start().await;
        let kind = s.connector.descriptor().connector;
        s.fault.set(fault);
        let expected = match kind {
            ConnectorKind::Fhir => over_fhir,
            ConnectorKind::Hl7v2 => over_hl7,
        };
        match expected {
            Expect::Pending => {
                let call = s.connector.fetch(SourceQuery::everything(s.known_patient));
                assert!(
                    tokio::time::timeout(HANG_WINDOW, call).await.is_err(),
                    "{fault} over {kind:?}: the call must not finish on its own"
                );
            }
            Expect::Code(code) => {
                // Only `refused` may take a moment to show: the simulator's listener closes
                // its port on its own task, so ask until it has, within a generous guard.
                // Every other mode is in force once set, so its first call must already be
                // classified (retrying would hide a flaky misclassification).
                let attempts = if fault == Fault::Refused { 100 } else { 1 };
                let mut last = None;
                for _ in 0..attempts {
                    let got = s
                        .connector
                        .fetch(SourceQuery::everything(s.known_patient))
                        .await;
                    let done = matches!(&got, Err(e) if e.code() == code);
                    last = Some(got);
                    if done {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                match last {
                    Some(Err(err)) if err.code() == code => {
                        assert_no_patient_in(&err, &s.known_patient)
                    }
                    other => panic!("{fault} over {kind:?}: expected `{code}`, got {other:?}"),
                }
            }
        }
        s.fault.set(Fault::None);
        let mut recovered = false;
        for _ in 0..100 {
            if s.connector
                .fetch(SourceQuery::everything(s.known_patient))
                .await
                .is_ok_and(|r| r.knows_patient())
            {
                recovered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            recovered,
            "{fault} over {kind:?}: the connector answers once the fault is cleared"
        );
    }
}
