//! The audit trail: one record per request that reached the data, durable on disk before
//! the response leaves. If the record cannot be written, nothing is released.
//!
//! Each record is shaped like a FHIR R4 AuditEvent (who: sub, role, organisation; the
//! patient; the purpose; break glass and its reason; every source asked and its outcome;
//! released and withheld counts; request and trace ids), wrapped in a hash-chained line
//! ([`chain`]) and committed in groups with `fdatasync` by one writer thread ([`writer`]).
//! Files live in `<audit-dir>/`: `audit.jsonl` is appended to, and rotated files
//! `audit-<first seq>.jsonl` keep the chain. `tributary audit verify FILE|DIR...` checks it.
//!
//! The audit trail is the one place the NHS number is written down. Break-glass records are
//! also kept as Privacy Officer [`Alert`]s, rebuilt from the files at start, so the alert
//! feed is as durable as the trail itself.

pub mod chain;
pub mod writer;

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

pub use writer::WriterSettings;

/// Extension URLs for what AuditEvent has no element for.
const EXT: &str = "https://tributary.example.org/fhir/StructureDefinition/audit-";
/// The longest a request waits for its record to be on disk; then it is a 503 (the record
/// may still land later: audited, not released, which is harmless). A hung disk must not
/// hang every clinician's screen.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Rotate `audit.jsonl` past this size unless configured otherwise.
pub const DEFAULT_ROTATE_BYTES: u64 = 64 * 1024 * 1024;

/// One request's record, as the gateway knows it.
#[derive(Debug)]
pub struct AuditRecord<'a> {
    pub time: String,
    pub request_id: &'a str,
    pub trace_id: Option<&'a str>,
    pub sub: &'a str,
    pub role: &'a str,
    pub org: &'a str,
    pub purpose: &'a str,
    pub patient: String,
    pub action: &'a str,
    pub break_glass: Option<&'a str>,
    pub relationship_claim: Option<&'a str>,
    pub sources: Vec<AuditSource<'a>>,
    /// Resources released to the caller, and withheld by policy (internal only: the caller
    /// is never told how many).
    pub released: usize,
    pub withheld: usize,
    /// Policy refused the caller before any source was asked.
    pub refused: bool,
}

#[derive(Debug)]
pub struct AuditSource<'a> {
    pub ods: &'a str,
    pub outcome: &'static str,
}

impl AuditRecord<'_> {
    /// The record as a FHIR AuditEvent.
    pub fn to_event(&self) -> Value {
        let mut extension = vec![
            json!({"url": format!("{EXT}request-id"), "valueString": self.request_id}),
            json!({"url": format!("{EXT}released"), "valueInteger": self.released}),
            json!({"url": format!("{EXT}withheld"), "valueInteger": self.withheld}),
        ];
        if self.refused {
            extension.push(json!({"url": format!("{EXT}refused"), "valueBoolean": true}));
        }
        if let Some(t) = self.trace_id {
            extension.push(json!({"url": format!("{EXT}trace-id"), "valueString": t}));
        }
        if let Some(r) = self.break_glass {
            extension.push(json!({"url": format!("{EXT}break-glass-reason"), "valueString": r}));
        }
        if let Some(r) = self.relationship_claim {
            extension.push(json!({"url": format!("{EXT}relationship-claim"), "valueString": r}));
        }
        let mut purpose = vec![json!({
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
            "text": self.purpose,
        })];
        if self.break_glass.is_some() {
            purpose.push(json!({
                "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG", "display": "break the glass"}],
            }));
        }
        let mut entity = vec![json!({
            "what": {"identifier": {"system": connectors::nhs::NHS_NUMBER_SYSTEM, "value": self.patient}},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
        })];
        entity.extend(self.sources.iter().map(|s| {
            json!({
                "what": {"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": s.ods}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
                "detail": [{"type": "outcome", "valueString": s.outcome}],
            })
        }));
        let all_answered = self.sources.iter().all(|s| s.outcome == "answered");
        json!({
            "resourceType": "AuditEvent",
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
            "subtype": [{"system": "https://tributary.example.org/fhir/CodeSystem/action", "code": self.action}],
            "action": "E",
            "recorded": self.time,
            // 0 success; 4 minor failure: some sources did not answer in full; 8 serious
            // failure: refused by policy.
            "outcome": if self.refused { "8" } else if all_answered { "0" } else { "4" },
            "purposeOfEvent": purpose,
            "agent": [
                {
                    "who": {"identifier": {"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": self.sub}},
                    "role": [{"coding": [{"system": "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode", "code": self.role}]}],
                    "requestor": true,
                },
                {
                    "who": {"identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": self.org}},
                    "type": {"text": "organisation"},
                    "requestor": false,
                },
            ],
            "source": {"observer": {"display": "tributary"}, "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3", "display": "Web Server"}]},
            "entity": entity,
            "extension": extension,
        })
    }
}

/// A Privacy Officer alert: a break-glass access, as committed to the audit trail. It names
/// the audit record (`seq`, `request_id`) rather than the patient; the record says who.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alert {
    /// The audit record's sequence number.
    pub seq: u64,
    pub time: String,
    pub request_id: String,
    pub trace_id: Option<String>,
    pub sub: String,
    pub role: String,
    pub org: String,
    pub reason: String,
    /// Policy refused the request (break glass asked for and not allowed): an attempt.
    pub refused: bool,
}

impl Alert {
    /// The alert in a committed AuditEvent, if it records break glass.
    pub fn from_event(event: &Value) -> Option<Self> {
        let ext = |name: &str| {
            event["extension"]
                .as_array()?
                .iter()
                .find(|e| e["url"] == format!("{EXT}{name}"))
                .and_then(|e| e["valueString"].as_str())
                .map(str::to_owned)
        };
        let reason = ext("break-glass-reason")?;
        let agent = |i: usize| {
            event["agent"][i]["who"]["identifier"]["value"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        Some(Self {
            seq: 0,
            time: event["recorded"].as_str().unwrap_or_default().to_owned(),
            request_id: ext("request-id").unwrap_or_default(),
            trace_id: ext("trace-id"),
            sub: agent(0),
            role: event["agent"][0]["role"][0]["coding"][0]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            org: agent(1),
            reason,
            refused: event["outcome"] == "8",
        })
    }
}

/// Why a record could not be written. The response becomes a 503.
#[derive(Debug, thiserror::Error)]
#[error("audit record could not be written: {0}")]
pub struct AuditError(String);

impl AuditError {
    /// The write was not confirmed by the request's deadline (the record may still land:
    /// the audit trail can over-record, never under-record).
    pub fn timed_out() -> Self {
        Self("the write was not confirmed before the request's deadline".to_owned())
    }
}

/// How records are kept. Only [`Mode::Durable`] is for service; the others exist so a
/// benchmark can price the audit trail (`tributary demo --unsafe-audit off|no-sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Chained, written and `fdatasync`ed before the response leaves.
    #[default]
    Durable,
    /// Chained and written, not synced: a crash can lose released records.
    NoSync,
    /// Nothing is recorded.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "durable" => Ok(Self::Durable),
            "no-sync" => Ok(Self::NoSync),
            "off" => Ok(Self::Off),
            _ => Err("audit mode is durable, no-sync or off".into()),
        }
    }
}

/// The append-only, hash-chained audit log.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    jobs: mpsc::Sender<writer::Job>,
    alerts: Arc<Mutex<VecDeque<Alert>>>,
    discard: bool,
}

impl AuditLog {
    /// Opens `dir/audit.jsonl` (creating the directory), with fsync and default rotation.
    pub async fn open(dir: &Path) -> Result<Self, AuditError> {
        Self::open_with(
            dir,
            WriterSettings {
                rotate_bytes: DEFAULT_ROTATE_BYTES,
                sync: true,
            },
        )
        .await
    }

    /// Opens the log in `mode` with default rotation.
    pub async fn open_mode(dir: &Path, mode: Mode) -> Result<Self, AuditError> {
        let mut log = Self::open_with(
            dir,
            WriterSettings {
                rotate_bytes: DEFAULT_ROTATE_BYTES,
                sync: mode == Mode::Durable,
            },
        )
        .await?;
        log.discard = mode == Mode::Off;
        Ok(log)
    }

    /// Opens the log and starts its writer; fails when the directory or the active file
    /// cannot be written, or the active file's chain does not end in a sound record.
    pub async fn open_with(dir: &Path, settings: WriterSettings) -> Result<Self, AuditError> {
        // The directory is the gateway user's alone (records name patients).
        let mut builder = std::fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(builder.recursive(true), 0o700);
        builder
            .create(dir)
            .map_err(|e| AuditError(format!("cannot create {}: {e}", dir.display())))?;
        let alerts = Arc::new(Mutex::new(VecDeque::new()));
        let dir_owned = dir.to_owned();
        let alerts_for_writer = alerts.clone();
        let jobs = tokio::task::spawn_blocking(move || {
            writer::start(&dir_owned, settings, alerts_for_writer)
        })
        .await
        .map_err(|e| AuditError(e.to_string()))?
        .map_err(AuditError)?;
        Ok(Self {
            path: dir.join(writer::ACTIVE),
            jobs,
            alerts,
            discard: false,
        })
    }

    /// The file records are appended to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record; returns once it is on disk (synced), or fails.
    pub async fn write(&self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        if self.discard {
            return Ok(());
        }
        let event = record.to_event();
        let alert = Alert::from_event(&event);
        let event = serde_json::to_vec(&event).map_err(|e| AuditError(e.to_string()))?;
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(MAX_WAIT, async {
            let (done, committed) = oneshot::channel();
            self.jobs
                .send(writer::Job { event, alert, done })
                .await
                .map_err(|_| AuditError("the audit writer has stopped".into()))?;
            committed
                .await
                .map_err(|_| AuditError("the audit writer has stopped".into()))?
                .map_err(AuditError)
        })
        .await
        .unwrap_or_else(|_| Err(AuditError("the disk did not confirm it in time".into())));
        crate::metrics::global().audit_write(started.elapsed(), result.is_ok());
        result
    }

    /// Break-glass alerts committed to the trail, oldest first (the last 10,000; every one
    /// stays in the audit files). Survives restarts: rebuilt from the files at open.
    pub fn alerts(&self) -> Vec<Alert> {
        self.alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tmp() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        std::env::temp_dir().join(format!(
            "tributary-audit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ))
    }

    fn record<'a>(request_id: &'a str, break_glass: Option<&'a str>) -> AuditRecord<'a> {
        AuditRecord {
            time: "2026-01-01T00:00:00Z".into(),
            request_id,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            sub: "u1",
            role: "R8000",
            org: "RXL",
            purpose: "direct-care",
            patient: "9990000018".into(),
            action: "Patient.$everything",
            break_glass,
            relationship_claim: None,
            sources: vec![AuditSource {
                ods: "RXL",
                outcome: "answered",
            }],
            released: 3,
            withheld: 1,
            refused: false,
        }
    }

    #[tokio::test]
    async fn concurrent_writes_form_one_chain_that_survives_reopen_and_rotation() {
        let dir = tmp();
        let settings = WriterSettings {
            rotate_bytes: 8 * 1024,
            sync: true,
        };
        let log = Arc::new(AuditLog::open_with(&dir, settings).await.unwrap());
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    let id = format!("r{i}");
                    let bg = (i % 10 == 0).then_some("patient unconscious");
                    log.write(&record(&id, bg)).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        drop(log);
        // A new process picks the chain up where it stopped.
        let log = AuditLog::open_with(&dir, settings).await.unwrap();
        assert_eq!(
            log.alerts().len(),
            4,
            "break-glass alerts rebuilt from disk"
        );
        log.write(&record("after", Some("again"))).await.unwrap();
        assert_eq!(log.alerts().last().unwrap().request_id, "after");
        let files = writer::chain_files(&dir).unwrap();
        assert!(files.len() > 2, "rotated by size: {files:?}");
        let v = chain::verify(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(v.records, 41);
        assert_eq!(v.first_seq, Some(0));
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_the_chain_continues() {
        let dir = tmp();
        let settings = WriterSettings {
            rotate_bytes: u64::MAX,
            sync: true,
        };
        let log = AuditLog::open_with(&dir, settings).await.unwrap();
        log.write(&record("a", None)).await.unwrap();
        drop(log);
        let path = dir.join(writer::ACTIVE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(br#"{"seq":1,"prev":"00"#);
        std::fs::write(&path, bytes).unwrap();
        let log = AuditLog::open_with(&dir, settings).await.unwrap();
        log.write(&record("b", None)).await.unwrap();
        assert_eq!(chain::verify(&[path]).unwrap().records, 2);
    }

    #[test]
    fn the_event_is_an_audit_event_with_who_what_and_why() {
        let e = record("r1", Some("unconscious")).to_event();
        assert_eq!(e["resourceType"], "AuditEvent");
        assert_eq!(e["agent"][0]["who"]["identifier"]["value"], "u1");
        assert_eq!(e["entity"][0]["what"]["identifier"]["value"], "9990000018");
        assert_eq!(e["entity"][1]["detail"][0]["valueString"], "answered");
        assert_eq!(e["purposeOfEvent"][1]["coding"][0]["code"], "BTG");
        let alert = Alert::from_event(&e).unwrap();
        assert_eq!(alert.reason, "unconscious");
        assert_eq!((alert.role.as_str(), alert.org.as_str()), ("R8000", "RXL"));
        assert!(Alert::from_event(&record("r2", None).to_event()).is_none());
    }
}
