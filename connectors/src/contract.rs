//! The contract between the gateway and every connector.
//!
//! A [`Connector`] turns one [`SourceQuery`] into one [`SourceRecord`] of FHIR R4 resources, or
//! a classified [`ConnectorError`]. It does I/O and mapping only: no timeouts, retries,
//! caching or policy (the gateway wraps every connector in one tower stack), and it must be
//! cancel-safe, because the gateway drops the future when the request's deadline passes.

use std::{fmt, sync::Arc};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::nhs::NhsNumber;

/// An organisation's ODS code (e.g. `RXL`, `P81001`). Not patient data.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OdsCode(pub String);

impl OdsCode {
    pub fn new(code: impl Into<String>) -> Self {
        Self(code.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for OdsCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OdsCode({})", self.0)
    }
}

/// What sort of organisation a source belongs to; the plan and the policies use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// The national demographics service (PDS-like): NHS number -> demographics + registered GP.
    Demographics,
    GpPractice,
    Trust,
    Council,
    PrivateProvider,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Demographics => "demographics",
            Self::GpPractice => "gp-practice",
            Self::Trust => "trust",
            Self::Council => "council",
            Self::PrivateProvider => "private-provider",
        }
    }
}

/// Which protocol adapter serves a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectorKind {
    Fhir,
    Hl7v2,
}

impl ConnectorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fhir => "fhir",
            Self::Hl7v2 => "hl7v2",
        }
    }
}

/// Who a source is: everything the gateway may say about it in logs, metrics and responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceDescriptor {
    /// The source's id: its key in the configuration (two trusts may run the same adapter).
    pub id: String,
    pub ods: OdsCode,
    pub name: String,
    pub kind: SourceKind,
    pub connector: ConnectorKind,
    /// Where the connector connects (base URL or host:port); never carries credentials.
    pub endpoint: String,
}

/// The FHIR R4 resource types the facade serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ResourceType {
    Patient,
    AllergyIntolerance,
    Condition,
    MedicationStatement,
    Encounter,
    Observation,
    Procedure,
    Immunization,
    DocumentReference,
}

impl ResourceType {
    pub const ALL: [ResourceType; 9] = [
        Self::Patient,
        Self::AllergyIntolerance,
        Self::Condition,
        Self::MedicationStatement,
        Self::Encounter,
        Self::Observation,
        Self::Procedure,
        Self::Immunization,
        Self::DocumentReference,
    ];

    /// The clinical types: every type but Patient.
    pub fn clinical() -> impl Iterator<Item = ResourceType> {
        Self::ALL.into_iter().skip(1)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "Patient",
            Self::AllergyIntolerance => "AllergyIntolerance",
            Self::Condition => "Condition",
            Self::MedicationStatement => "MedicationStatement",
            Self::Encounter => "Encounter",
            Self::Observation => "Observation",
            Self::Procedure => "Procedure",
            Self::Immunization => "Immunization",
            Self::DocumentReference => "DocumentReference",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One question to one source: this patient's resources of these types.
///
/// Equality and hashing look at the question only (patient and types), never at
/// `trace_context`, so a cache keyed on `SourceQuery` is shared across requests.
#[derive(Debug, Clone)]
pub struct SourceQuery {
    pub nhs_number: NhsNumber,
    /// The types wanted, sorted and without repeats. The source's Patient resource is always
    /// returned when the source knows the patient, whatever this says, so that the gateway
    /// can check identity.
    pub resource_types: Vec<ResourceType>,
    /// A W3C `traceparent` value for connectors whose protocol can carry it (FHIR over HTTP
    /// sends it as a header); `None` when the gateway is not tracing this call.
    pub trace_context: Option<String>,
}

impl PartialEq for SourceQuery {
    fn eq(&self, other: &Self) -> bool {
        self.nhs_number == other.nhs_number && self.resource_types == other.resource_types
    }
}

impl Eq for SourceQuery {}

impl std::hash::Hash for SourceQuery {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.nhs_number.hash(state);
        self.resource_types.hash(state);
    }
}

impl SourceQuery {
    pub fn new(nhs_number: NhsNumber, types: impl IntoIterator<Item = ResourceType>) -> Self {
        let mut resource_types: Vec<_> = types.into_iter().collect();
        resource_types.sort();
        resource_types.dedup();
        Self {
            nhs_number,
            resource_types,
            trace_context: None,
        }
    }

    /// The same question, carrying a W3C `traceparent` for the upstream.
    pub fn with_trace_context(mut self, traceparent: Option<String>) -> Self {
        self.trace_context = traceparent;
        self
    }

    /// Every type the facade serves.
    pub fn everything(nhs_number: NhsNumber) -> Self {
        Self::new(nhs_number, ResourceType::ALL)
    }

    pub fn wants(&self, t: ResourceType) -> bool {
        t == ResourceType::Patient || self.resource_types.binary_search(&t).is_ok()
    }
}

/// One source's answer: FHIR R4 resources as JSON, each with the `id` the source gave it.
/// A source that does not know the patient answers with no resources (that is not an error).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceRecord {
    pub resources: Vec<serde_json::Value>,
}

impl SourceRecord {
    pub fn knows_patient(&self) -> bool {
        !self.resources.is_empty()
    }
}

/// Why a source gave no usable answer. Messages never carry patient data: no NHS number,
/// name or clinical content, and no upstream body text (it may contain any of those).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectorError {
    /// Could not reach the source (refused, reset, DNS).
    #[error("cannot connect to source: {0}")]
    Connect(String),
    /// The TLS handshake with the source failed, for a classified reason (wrong CA, expired
    /// or misnamed certificate, client certificate required or rejected).
    #[error("tls: {0}")]
    Tls(crate::tls::TlsFailure),
    /// The connection failed after it was made (reset mid-reply, read timeout, closed early).
    #[error("transport failed: {0}")]
    Transport(String),
    /// The source answered with an error status (HTTP 4xx/5xx).
    #[error("source answered with status {status}")]
    Status { status: u16 },
    /// The source redirected the query (HTTP 3xx); redirects are never followed, so a
    /// redirect loop ends at once and a query never leaves for an address not configured.
    #[error("source redirected the query (status {status}); redirects are not followed")]
    Redirected { status: u16 },
    /// The source refused the query at the application level (HL7 AE/AR, FHIR OperationOutcome).
    #[error("source rejected the query: {0}")]
    Rejected(String),
    /// The reply could not be read: not the protocol, malformed, truncated, wrong shape.
    #[error("reply is malformed: {0}")]
    Malformed(String),
    /// The reply is larger than the configured cap.
    #[error("reply exceeds the size cap of {limit} bytes")]
    TooLarge { limit: usize },
    /// The reply is about a different patient than the one asked for: discarded, never merged.
    #[error("reply is about a different patient than the one asked for")]
    PatientMismatch,
}

impl ConnectorError {
    /// A stable code for logs, metrics and the OperationOutcome.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Transport(_) => "transport",
            Self::Status { .. } => "status",
            Self::Redirected { .. } => "redirect",
            Self::Rejected(_) => "rejected",
            Self::Malformed(_) => "malformed",
            Self::TooLarge { .. } => "too_large",
            Self::PatientMismatch => "patient_mismatch",
        }
    }

    /// Whether trying again (or hedging) may help. A TLS failure is a certificate or
    /// configuration problem on one side: trying again gets the same answer.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Transport(_) => true,
            Self::Tls(_) => false,
            Self::Status { status } => *status >= 500 || *status == 429,
            Self::Rejected(_)
            | Self::Redirected { .. }
            | Self::Malformed(_)
            | Self::TooLarge { .. }
            | Self::PatientMismatch => false,
        }
    }
}

/// The adapter for one source. Implementations are cheap to share (`Arc`) and cancel-safe.
pub trait Connector: Send + Sync + 'static {
    fn descriptor(&self) -> &SourceDescriptor;

    /// Asks the source for one patient's resources.
    fn fetch(&self, query: SourceQuery)
    -> BoxFuture<'static, Result<SourceRecord, ConnectorError>>;
}

/// How to build a connector, chosen by `type = "..."` in configuration, so the compiler
/// lists every connector there is.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ConnectorConfig {
    Fhir(crate::fhir::FhirConfig),
    Hl7v2(crate::hl7v2::Hl7v2Config),
}

impl ConnectorConfig {
    pub fn kind(&self) -> ConnectorKind {
        match self {
            Self::Fhir(_) => ConnectorKind::Fhir,
            Self::Hl7v2(_) => ConnectorKind::Hl7v2,
        }
    }

    /// Where the connector connects, for the descriptor.
    pub fn endpoint(&self) -> String {
        match self {
            Self::Fhir(c) => c.base_url.clone(),
            Self::Hl7v2(c) => c.address.clone(),
        }
    }

    /// Makes the relative file paths in this configuration (TLS certificates and keys)
    /// relative to `base`, the configuration file's directory.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let tls = match self {
            Self::Fhir(c) => c.tls.as_mut(),
            Self::Hl7v2(c) => c.tls.as_mut(),
        };
        if let Some(tls) = tls {
            tls.resolve_paths(base);
        }
    }

    /// Every problem with this configuration, as plain-English fragments.
    pub fn validate(&self) -> Vec<String> {
        match self {
            Self::Fhir(c) => c.validate(),
            Self::Hl7v2(c) => c.validate(),
        }
    }

    /// Builds the connector for a source.
    pub fn build(
        &self,
        id: &str,
        ods: OdsCode,
        name: &str,
        kind: SourceKind,
    ) -> Result<Arc<dyn Connector>, String> {
        let descriptor = SourceDescriptor {
            id: id.to_owned(),
            ods,
            name: name.to_owned(),
            kind,
            connector: self.kind(),
            endpoint: self.endpoint(),
        };
        match self {
            Self::Fhir(c) => crate::fhir::FhirConnector::new(descriptor, c.clone())
                .map(|c| Arc::new(c) as Arc<dyn Connector>),
            Self::Hl7v2(c) => crate::hl7v2::Hl7v2Connector::new(descriptor, c.clone())
                .map(|c| Arc::new(c) as Arc<dyn Connector>),
        }
    }
}
