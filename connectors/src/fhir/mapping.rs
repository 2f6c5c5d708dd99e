//! FHIR R4 JSON both ways: rendering the synthetic region's data as UK Core-shaped resources
//! (for the simulator), and reading a source's searchset Bundles (for the client).
//!
//! # Why the ingest is lenient but the identity check is not
//! Real FHIR servers add extensions, contained resources and types nobody asked for; the
//! reader keeps what was asked for and ignores the rest. But a reply about another patient
//! must never be merged: the Patient's NHS number must be the one asked for, and every kept
//! resource must point at that Patient, or the whole reply is discarded.

use serde_json::{Value, json};

use crate::{
    contract::{ConnectorError, ResourceType, SourceKind},
    nhs::{NHS_NUMBER_SYSTEM, NhsNumber},
    synth::model::{Date, DateTime, Demographics, Detail, Gender, Item},
};

pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const UCUM: &str = "http://unitsofmeasure.org";

pub fn date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year, d.month, d.day)
}

pub fn date_time(t: DateTime) -> String {
    format!("{}T{:02}:{:02}:00Z", date(t.date), t.hour, t.minute)
}

/// A Patient as the source holds it. The demographics source shows a restricted patient as
/// PDS does: no address, telecom or registered GP, and confidentiality `R`.
pub fn patient(d: &Demographics, id: &str, kind: SourceKind) -> Value {
    let (code, display) = if d.restricted {
        ("R", "restricted")
    } else {
        ("U", "unrestricted")
    };
    let mut p = json!({
        "resourceType": "Patient",
        "id": id,
        "meta": {"security": [{"system": CONFIDENTIALITY, "code": code, "display": display}]},
        "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": d.nhs_number.expose()}],
        "name": [{"use": "usual", "family": d.family, "given": [d.given]}],
        "gender": match d.gender {
            Gender::Male => "male",
            Gender::Female => "female",
            Gender::Other => "other",
            Gender::Unknown => "unknown",
        },
        "birthDate": date(d.birth_date),
    });
    if !(d.restricted && kind == SourceKind::Demographics) {
        p["address"] = json!([{
            "use": "home",
            "line": d.address.lines,
            "city": d.address.city,
            "postalCode": d.address.postcode,
        }]);
        let usage = if d.phone.starts_with("07") {
            "mobile"
        } else {
            "home"
        };
        p["telecom"] = json!([{"system": "phone", "value": d.phone, "use": usage}]);
        p["generalPractitioner"] = json!([{
            "type": "Organization",
            "identifier": {"system": ODS_SYSTEM, "value": d.gp_ods.as_str()},
        }]);
    }
    p
}

/// The resource type an item is rendered as.
pub fn resource_type(detail: &Detail) -> ResourceType {
    match detail {
        Detail::Condition { .. } => ResourceType::Condition,
        Detail::Medication { .. } => ResourceType::MedicationStatement,
        Detail::Allergy { .. } => ResourceType::AllergyIntolerance,
        Detail::Encounter(_) => ResourceType::Encounter,
        Detail::Observation { .. } | Detail::Consent => ResourceType::Observation,
        Detail::Immunization => ResourceType::Immunization,
        Detail::Procedure => ResourceType::Procedure,
        Detail::Document { .. } => ResourceType::DocumentReference,
    }
}

/// One item as an R4 resource about the Patient with id `patient_id` at the same source.
pub fn resource(item: &Item, patient_id: &str) -> Value {
    let subject = json!({"reference": format!("Patient/{patient_id}")});
    let code = json!({
        "coding": [{"system": item.code.system, "code": item.code.code, "display": item.code.display}],
        "text": item.code.display,
    });
    let when = date_time(item.recorded);
    let mut r = match &item.detail {
        Detail::Condition { active } => json!({
            "clinicalStatus": status_concept(
                "http://terminology.hl7.org/CodeSystem/condition-clinical",
                if *active { "active" } else { "resolved" },
            ),
            "verificationStatus": status_concept(
                "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "confirmed",
            ),
            "code": code,
            "subject": subject,
            "onsetDateTime": when,
            "recordedDate": when,
        }),
        Detail::Medication { dose } => json!({
            "status": "active",
            "medicationCodeableConcept": code,
            "subject": subject,
            "effectiveDateTime": when,
            "dateAsserted": when,
            "dosage": [{"text": dose}],
        }),
        Detail::Allergy { reaction } => json!({
            "clinicalStatus": status_concept(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
                "active",
            ),
            "verificationStatus": status_concept(
                "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
                "confirmed",
            ),
            "code": code,
            "patient": subject,
            "recordedDate": when,
            "reaction": [{"manifestation": [{
                "coding": [{"system": reaction.system, "code": reaction.code, "display": reaction.display}],
            }]}],
        }),
        Detail::Encounter(e) => {
            let mut period = json!({"start": when});
            if let Some(end) = e.end {
                period["end"] = json!(date_time(end));
            }
            json!({
                "status": if e.end.is_some() { "finished" } else { "in-progress" },
                "class": {"system": ACT_CODE, "code": e.class},
                "type": [code],
                "identifier": [{"use": "official", "value": e.visit_number}],
                "subject": subject,
                "period": period,
                "participant": [{"individual": {"display": e.attending}}],
                "location": [{"location": {"display": e.location}}],
            })
        }
        Detail::Observation { value, unit } => json!({
            "status": "final",
            "code": code,
            "subject": subject,
            "effectiveDateTime": when,
            "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        }),
        Detail::Consent => json!({
            "status": "final",
            "code": code,
            "subject": subject,
            "effectiveDateTime": when,
        }),
        Detail::Immunization => json!({
            "status": "completed",
            "vaccineCode": code,
            "patient": subject,
            "occurrenceDateTime": when,
            "recorded": when,
        }),
        Detail::Procedure => json!({
            "status": "completed",
            "code": code,
            "subject": subject,
            "performedDateTime": when,
        }),
        Detail::Document { title } => json!({
            "status": "current",
            "type": code,
            "subject": subject,
            "date": when,
            "description": title,
            "content": [{"attachment": {"contentType": "text/plain", "title": title}}],
        }),
    };
    r["resourceType"] = json!(resource_type(&item.detail).as_str());
    r["id"] = json!(item.local_id);
    if item.confidential {
        r["meta"] = json!({"security": [{"system": ACT_CODE, "code": "NOPAT", "display": "no disclosure to patient, family or caregivers without attending provider's authorization"}]});
    }
    r
}

fn status_concept(system: &str, code: &str) -> Value {
    json!({"coding": [{"system": system, "code": code}]})
}

/// A searchset Bundle of `resources`; `base` (the server's FHIR base URL) makes fullUrls.
pub fn searchset(resources: Vec<Value>, base: &str) -> Value {
    let total = resources
        .iter()
        .filter(|r| r["resourceType"] == "Patient")
        .count();
    let entry: Vec<Value> = resources
        .into_iter()
        .map(|r| {
            let mode = if r["resourceType"] == "Patient" {
                "match"
            } else {
                "include"
            };
            let full_url = format!(
                "{base}/{}/{}",
                r["resourceType"].as_str().unwrap_or_default(),
                r["id"].as_str().unwrap_or_default()
            );
            json!({"fullUrl": full_url, "resource": r, "search": {"mode": mode}})
        })
        .collect();
    json!({"resourceType": "Bundle", "type": "searchset", "total": total, "entry": entry})
}

/// An OperationOutcome with one error issue. `diagnostics` must carry no patient data.
pub fn operation_outcome(code: &str, diagnostics: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    })
}

/// Reads a Patient search reply: the one Patient found (checked to carry `nhs_number`), or
/// `None` when the source does not know the patient.
pub fn read_search(body: &[u8], nhs_number: &NhsNumber) -> Result<Option<Value>, ConnectorError> {
    let mut found: Option<Value> = None;
    for r in bundle_resources(body)? {
        if r["resourceType"] != "Patient" {
            continue;
        }
        check_identity(&r, nhs_number)?;
        match &found {
            Some(f) if f["id"] != r["id"] => {
                return Err(malformed("search matched more than one patient"));
            }
            Some(_) => {}
            None => found = Some(r),
        }
    }
    Ok(found)
}

/// Reads a `$everything` reply for the Patient with id `patient_id`: the resources of the
/// wanted clinical types, each checked to be about that Patient. Patient resources are checked
/// and dropped (the caller already holds the one from the search).
pub fn read_everything(
    body: &[u8],
    nhs_number: &NhsNumber,
    patient_id: &str,
    wants: impl Fn(ResourceType) -> bool,
) -> Result<Vec<Value>, ConnectorError> {
    let mut kept = Vec::new();
    for r in bundle_resources(body)? {
        let Some(ty) = r["resourceType"].as_str().and_then(ResourceType::parse) else {
            continue;
        };
        if ty == ResourceType::Patient {
            if r["id"] != patient_id {
                return Err(ConnectorError::PatientMismatch);
            }
            check_identity(&r, nhs_number)?;
        } else if wants(ty) {
            let reference = r["subject"]["reference"]
                .as_str()
                .or_else(|| r["patient"]["reference"].as_str());
            if reference.is_some_and(|r| !refers_to(r, patient_id)) {
                return Err(ConnectorError::PatientMismatch);
            }
            kept.push(r);
        }
    }
    Ok(kept)
}

/// Whether `id` is a FHIR id (`[A-Za-z0-9\-\.]{1,64}`), so safe to put in a URL path.
pub fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn refers_to(reference: &str, patient_id: &str) -> bool {
    reference
        .strip_suffix(patient_id)
        .is_some_and(|head| head == "Patient/" || head.ends_with("/Patient/"))
}

/// The Patient must carry the asked-for NHS number and no other.
fn check_identity(patient: &Value, nhs_number: &NhsNumber) -> Result<(), ConnectorError> {
    let expected = nhs_number.expose();
    let mut numbers = patient["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["system"] == NHS_NUMBER_SYSTEM)
        .map(|i| i["value"].as_str());
    let first = numbers.next();
    if first == Some(Some(expected.as_str())) && numbers.all(|n| n == Some(expected.as_str())) {
        Ok(())
    } else {
        Err(ConnectorError::PatientMismatch)
    }
}

/// The resources of a Bundle's entries; OperationOutcomes and entries without a resource are
/// skipped. Every resource kept has a `resourceType` and an `id`.
fn bundle_resources(body: &[u8]) -> Result<Vec<Value>, ConnectorError> {
    let mut bundle: Value = serde_json::from_slice(body).map_err(|_| malformed("not json"))?;
    if bundle["resourceType"] == "OperationOutcome" {
        return Err(ConnectorError::Rejected(issue_code(&bundle)));
    }
    if bundle["resourceType"] != "Bundle" {
        return Err(malformed("not a bundle"));
    }
    let entries = match bundle.get_mut("entry").map(Value::take) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(entries)) => entries,
        Some(_) => return Err(malformed("bundle entry is not an array")),
    };
    let mut out = Vec::with_capacity(entries.len());
    for mut entry in entries {
        let resource = match entry.get_mut("resource").map(Value::take) {
            None | Some(Value::Null) => continue,
            Some(r) => r,
        };
        let Some(ty) = resource["resourceType"].as_str() else {
            return Err(malformed("resource without a resourceType"));
        };
        if ty == "OperationOutcome" {
            continue;
        }
        if resource["id"].as_str().is_none_or(str::is_empty) {
            return Err(malformed("resource without an id"));
        }
        out.push(resource);
    }
    Ok(out)
}

/// The first issue's code (FHIR's issue-type value set: lowercase words and hyphens), or
/// `unknown`. Only a code that looks like one is repeated: never free text.
fn issue_code(outcome: &Value) -> String {
    outcome["issue"][0]["code"]
        .as_str()
        .filter(|c| {
            (1..=32).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        })
        .unwrap_or("unknown")
        .to_owned()
}

fn malformed(what: &str) -> ConnectorError {
    ConnectorError::Malformed(what.to_owned())
}
