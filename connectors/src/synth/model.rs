//! The synthetic region's data, independent of any wire format. Each simulator renders it
//! in its own protocol (the FHIR simulator as FHIR R4 JSON, the HL7 v2 simulator as
//! segments), so every wire format has one home and the data one source of truth.

use crate::{
    contract::{OdsCode, SourceKind},
    nhs::NhsNumber,
};

/// SNOMED CT's system URI.
pub const SNOMED: &str = "http://snomed.info/sct";

/// Which protocol a simulated source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Fhir,
    Hl7v2,
}

/// One organisation's system in the region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// Config key (e.g. `trust-rxl`, `gp-p81001`); unique.
    pub id: String,
    pub ods: OdsCode,
    pub name: String,
    pub kind: SourceKind,
    pub protocol: Protocol,
}

/// A label that the demo prints beside sample patients, and tests pick patients by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Label {
    /// An ordinary record: GP plus one or more trusts, nothing withheld by default policy.
    Typical,
    /// Dissent from sharing recorded at the GP.
    Dissent,
    /// Has at least one item in an RCGP sensitive set or marked practice-confidential.
    Sensitive,
    /// Demographics confidentiality R (restricted): address, telecom and GP never released.
    Restricted,
    /// Has an item that two sources report (de-duplication is exercised).
    Duplicated,
    /// Known to a council's social care system.
    SocialCare,
}

impl Label {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Typical => "typical",
            Self::Dissent => "dissent",
            Self::Sensitive => "sensitive",
            Self::Restricted => "restricted",
            Self::Duplicated => "duplicated",
            Self::SocialCare => "social-care",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gender {
    Male,
    Female,
    Other,
    Unknown,
}

/// A calendar date, for FHIR `date` (YYYY-MM-DD) and HL7 `DT` (YYYYMMDD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

/// A UTC instant at minute precision. Renderers choose the wire's offset: FHIR writes
/// `...Z`; HL7 v2 writes UK local time with its offset (+0000 in GMT, +0100 in BST).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DateTime {
    pub date: Date,
    pub hour: u8,
    pub minute: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub lines: Vec<String>,
    pub city: String,
    pub postcode: String,
}

/// What the demographics source knows of a patient (PDS-like).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demographics {
    pub nhs_number: NhsNumber,
    pub given: String,
    pub family: String,
    pub gender: Gender,
    pub birth_date: Date,
    pub address: Address,
    pub phone: String,
    /// The registered GP practice.
    pub gp_ods: OdsCode,
    /// PDS confidentiality R (restricted) or V (very restricted); false means U.
    pub restricted: bool,
}

/// A coded concept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub system: &'static str,
    pub code: &'static str,
    pub display: &'static str,
}

impl Code {
    pub const fn snomed(code: &'static str, display: &'static str) -> Self {
        Self {
            system: SNOMED,
            code,
            display,
        }
    }
}

/// One clinical statement held by one source.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The source that holds it.
    pub source: OdsCode,
    /// The id the source gives it, unique within that source.
    pub local_id: String,
    pub code: Code,
    /// When it happened or was recorded.
    pub recorded: DateTime,
    /// Practice-confidential (GP Connect marks these with `NOPAT` in `meta.security`).
    pub confidential: bool,
    pub detail: Detail,
}

/// What kind of statement an item is, with what only that kind carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Condition {
        active: bool,
    },
    Medication {
        dose: String,
    },
    Allergy {
        reaction: Code,
    },
    Encounter(EncounterDetail),
    Observation {
        value: f64,
        unit: &'static str,
    },
    Immunization,
    Procedure,
    Document {
        title: String,
    },
    /// A consent or dissent statement (e.g. SNOMED 416409005 refused consent for upload to
    /// local shared electronic record). Rendered as an Observation of that code.
    Consent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EncounterDetail {
    /// v3 ActCode: `IMP` inpatient, `AMB` ambulatory, `EMER` emergency.
    pub class: &'static str,
    pub end: Option<DateTime>,
    /// Ward or clinic name.
    pub location: String,
    pub attending: String,
    /// Hospital number at this trust.
    pub visit_number: String,
}

/// A patient's whole record across the region, generated on demand from the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientRecord {
    pub demographics: Demographics,
    /// Local patient id at each source that knows the patient (e.g. a trust's hospital number).
    pub local_ids: Vec<(OdsCode, String)>,
    pub items: Vec<Item>,
}

impl PatientRecord {
    /// The patient's local id at a source, or `None` when the source does not know them.
    pub fn local_id(&self, ods: &OdsCode) -> Option<&str> {
        self.local_ids
            .iter()
            .find(|(o, _)| o == ods)
            .map(|(_, id)| id.as_str())
    }

    /// The items one source holds.
    pub fn items_at<'a>(&'a self, ods: &'a OdsCode) -> impl Iterator<Item = &'a Item> + 'a {
        self.items.iter().filter(move |i| &i.source == ods)
    }
}

/// Where a simulator finds patients' records: the synthetic region, or a small fixture in a
/// test. Lookups are by NHS number; `None` means the region does not know the patient.
pub trait Records: Send + Sync + 'static {
    fn record(&self, nhs_number: &NhsNumber) -> Option<PatientRecord>;

    /// The NHS number of the patient a source knows by a local id (what a simulator needs to
    /// answer `Patient/{id}` reads). The default knows no local ids.
    fn nhs_number_by_local_id(&self, _ods: &OdsCode, _local_id: &str) -> Option<NhsNumber> {
        None
    }
}
