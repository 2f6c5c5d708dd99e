//! Merge: many sources' answers become one federated record, in two stages around policy.
//!
//! The NHS number is the only join key. [`prepare`] runs before policy: every source's copy of
//! every resource keeps its source's id, namespaced by the source's ODS code so two sources
//! never collide, and its references are rewritten to match (a reference to the source's own
//! Patient points at the federated Patient, whose id is the NHS number, as in PDS).
//! [`combine`] runs after policy, on released copies only: the Patients become one federated
//! Patient, and the same clinical fact reported by two organisations (same type, code, value
//! and clinical instant) is kept once, naming every organisation whose copy was released.
//!
//! # Why de-duplicate after policy
//! Policy judges each organisation's copy on its own labels and codes. Merging first would
//! release one organisation's copy on another's authority (a GP's copy under dissent, because a
//! trust reported the same fact) and lose the labels of the copies it dropped.
//!
//! Every resource names the organisation it came from in `meta.source`, and lists every
//! organisation that reported it in a `meta` extension. The order is deterministic: Patient
//! first, then by type, newest first, then by id.

use std::{cmp::Ordering, collections::HashMap};

use connectors::{
    NhsNumber, OdsCode, ResourceType, SourceDescriptor, SourceKind, SourceRecord,
    nhs::NHS_NUMBER_SYSTEM,
};
use serde_json::{Map, Value, json};

use crate::policy::{Candidate, PatientFacts, SourceRef};

/// Where Tributary's own FHIR definitions are named (a canonical URL, never fetched).
pub const CANONICAL_BASE: &str = "https://tributary.example.org/fhir";
/// The `meta` extension listing every organisation that reported a resource.
pub const REPORTED_BY_URL: &str =
    "https://tributary.example.org/fhir/StructureDefinition/reported-by";
/// The ODS code system.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";
/// `meta.source` is a URI: the organisation's entry in the ODS directory.
const ODS_SOURCE_PREFIX: &str = "https://directory.spineservices.nhs.uk/STU3/Organization/";
const CONFIDENTIALITY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";

/// The `meta.source` value for an organisation.
pub fn meta_source(ods: &OdsCode) -> String {
    format!("{ODS_SOURCE_PREFIX}{ods}")
}

/// Every source's copies, ready for policy, and what the answers say about the patient.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// One candidate per source copy; each names exactly one source.
    pub candidates: Vec<Candidate>,
    pub facts: PatientFacts,
}

impl Prepared {
    /// True when some source returned a Patient for the NHS number.
    pub fn knows_patient(&self) -> bool {
        self.candidates
            .iter()
            .any(|c| c.resource["resourceType"] == "Patient")
    }
}

fn kind_rank(kind: SourceKind) -> u8 {
    match kind {
        SourceKind::Demographics => 0,
        SourceKind::GpPractice => 1,
        SourceKind::Trust => 2,
        SourceKind::Council => 3,
        SourceKind::PrivateProvider => 4,
    }
}

fn source_rank(s: &SourceRef) -> (u8, &OdsCode) {
    (kind_rank(s.kind), &s.ods)
}

/// Stage one, before policy: every source's copies, localised for the federated record.
pub fn prepare(nhs_number: &NhsNumber, answers: &[(&SourceDescriptor, &SourceRecord)]) -> Prepared {
    let nhs = nhs_number.expose();
    let mut candidates = Vec::new();
    let mut facts = PatientFacts::default();
    for (source, record) in answers {
        if record.knows_patient()
            && source.kind != SourceKind::Demographics
            && !facts.orgs_with_data.contains(&source.ods)
        {
            facts.orgs_with_data.push(source.ods.clone());
        }
        // The source's own ids for this patient: only references to these are the patient.
        let own_patient_ids: Vec<&str> = record
            .resources
            .iter()
            .filter(|r| r["resourceType"] == "Patient")
            .filter_map(|r| r["id"].as_str())
            .collect();
        for resource in &record.resources {
            if resource["resourceType"] == "Patient" {
                facts.restricted |= is_restricted(resource);
                if source.kind == SourceKind::Demographics && facts.registered_gp.is_none() {
                    facts.registered_gp = registered_gp(resource);
                }
            }
            let mut resource = resource.clone();
            localise(&mut resource, &source.ods, &nhs, &own_patient_ids);
            candidates.push(Candidate {
                resource,
                sources: vec![SourceRef {
                    ods: source.ods.clone(),
                    kind: source.kind,
                }],
            });
        }
    }
    facts.orgs_with_data.sort();
    Prepared { candidates, facts }
}

/// Stage two, after policy: released copies become the federated record.
pub fn combine(nhs_number: &NhsNumber, mut released: Vec<Candidate>) -> Vec<Candidate> {
    fn rank(c: &Candidate) -> Option<(u8, &OdsCode)> {
        c.sources.first().map(source_rank)
    }
    released.sort_by(|a, b| rank(a).cmp(&rank(b)));
    let (patients, copies): (Vec<Candidate>, Vec<Candidate>) = released
        .into_iter()
        .partition(|c| c.resource["resourceType"] == "Patient");

    let mut others: Vec<Candidate> = Vec::with_capacity(copies.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for copy in copies {
        let keys = dedup_keys(&copy.resource);
        let duplicate_of = keys
            .iter()
            .find_map(|k| seen.get(k).copied())
            .filter(|&at| {
                !others[at]
                    .sources
                    .iter()
                    .any(|s| copy.sources.iter().any(|c| c.ods == s.ods))
            });
        match duplicate_of {
            Some(at) => others[at].sources.extend(copy.sources),
            None => {
                for k in keys {
                    seen.entry(k).or_insert(others.len());
                }
                others.push(copy);
            }
        }
    }
    others.sort_by(order);
    for c in &mut others {
        stamp_provenance(&mut c.resource, &c.sources);
    }
    let mut record = Vec::with_capacity(others.len() + 1);
    record.extend(federated_patient(&nhs_number.expose(), patients));
    record.extend(others);
    record
}

/// One Patient for the NHS number: the highest-ranked released copy (the demographics
/// service's, when released), with every released copy's identifiers and source.
fn federated_patient(nhs: &str, patients: Vec<Candidate>) -> Option<Candidate> {
    let base = patients.first()?;
    let mut patient = base.resource.clone();
    let mut identifiers: Vec<Value> = vec![json!({"system": NHS_NUMBER_SYSTEM, "value": nhs})];
    for p in &patients {
        for id in p.resource["identifier"].as_array().into_iter().flatten() {
            if !identifiers
                .iter()
                .any(|have| have["system"] == id["system"] && have["value"] == id["value"])
            {
                identifiers.push(id.clone());
            }
        }
    }
    if let Some(obj) = patient.as_object_mut() {
        obj.insert("id".into(), Value::String(nhs.to_owned()));
        obj.insert("identifier".into(), Value::Array(identifiers));
    }
    let mut sources: Vec<SourceRef> = Vec::new();
    for s in patients.iter().flat_map(|p| &p.sources) {
        if !sources.iter().any(|have| have.ods == s.ods) {
            sources.push(s.clone());
        }
    }
    stamp_provenance(&mut patient, &sources);
    Some(Candidate {
        resource: patient,
        sources,
    })
}

/// `meta.source` names the first source; a `meta` extension lists all of them.
fn stamp_provenance(resource: &mut Value, sources: &[SourceRef]) {
    let Some(obj) = resource.as_object_mut() else {
        return;
    };
    let meta = obj
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    if let Some(first) = sources.first() {
        meta.insert("source".into(), Value::String(meta_source(&first.ods)));
    }
    let mut extensions: Vec<Value> = meta
        .get("extension")
        .and_then(Value::as_array)
        .map(|exts| {
            exts.iter()
                .filter(|e| e["url"] != REPORTED_BY_URL)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    extensions.extend(
        sources
            .iter()
            .map(|s| json!({"url": REPORTED_BY_URL, "valueIdentifier": {"system": ODS_SYSTEM, "value": s.ods.as_str()}})),
    );
    meta.insert("extension".into(), Value::Array(extensions));
}

/// Namespaces the resource's id and rewrites its references for the federated record.
fn localise(resource: &mut Value, ods: &OdsCode, nhs: &str, own_patient_ids: &[&str]) {
    if let Some(obj) = resource.as_object_mut() {
        let local = obj
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        obj.insert("id".into(), Value::String(namespaced_id(ods, &local)));
    }
    rewrite_references(resource, ods, nhs, own_patient_ids);
}

/// `{ODS}.{local id}`, kept within FHIR's id rules (`[A-Za-z0-9\-\.]{1,64}`): a local id
/// that breaks them is replaced by a stable hash of itself.
pub fn namespaced_id(ods: &OdsCode, local: &str) -> String {
    let valid = !local.is_empty()
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    let id = format!("{ods}.{local}");
    if valid && id.len() <= 64 {
        id
    } else {
        format!("{ods}.h{:016x}", fnv1a(local.as_bytes()))
    }
}

/// FNV-1a: a stable, dependency-free hash for ids (not for security).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn rewrite_references(value: &mut Value, ods: &OdsCode, nhs: &str, own: &[&str]) {
    match value {
        Value::Object(obj) => {
            for (key, v) in obj.iter_mut() {
                if key == "reference" {
                    if let Some(rewritten) =
                        v.as_str().and_then(|s| rewrite_reference(s, ods, nhs, own))
                    {
                        *v = Value::String(rewritten);
                    }
                } else {
                    rewrite_references(v, ods, nhs, own);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_references(v, ods, nhs, own)),
        _ => {}
    }
}

/// A reference to the source's own Patient -> `Patient/{nhs}`; any other `Type/x` (another
/// patient included: a mother, a baby) -> `Type/{ODS}.x`; absolute and contained references
/// are left alone.
fn rewrite_reference(reference: &str, ods: &OdsCode, nhs: &str, own: &[&str]) -> Option<String> {
    let (ty, id) = reference.split_once('/')?;
    if id.contains('/')
        || !ty.starts_with(|c: char| c.is_ascii_uppercase())
        || !ty.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return None;
    }
    Some(if ty == "Patient" && own.contains(&id) {
        format!("Patient/{nhs}")
    } else {
        format!("{ty}/{}", namespaced_id(ods, id))
    })
}

/// The fields that say when a clinical fact happened, by type.
const DATE_FIELDS: [(&str, Option<&str>); 9] = [
    ("occurrenceDateTime", None),
    ("effectiveDateTime", None),
    ("onsetDateTime", None),
    ("performedDateTime", None),
    ("effectivePeriod", Some("start")),
    ("performedPeriod", Some("start")),
    ("period", Some("start")),
    ("recordedDate", None),
    ("date", None),
];

/// The dates a resource carries, field by field.
fn clinical_dates(resource: &Value) -> impl Iterator<Item = (&'static str, &str)> {
    DATE_FIELDS.into_iter().filter_map(move |(field, inner)| {
        let v = &resource[field];
        inner.map_or(v, |i| &v[i]).as_str().map(|d| (field, d))
    })
}

/// The clinical date a resource is about: the first of its date fields.
fn clinical_date(resource: &Value) -> Option<&str> {
    clinical_dates(resource).next().map(|(_, d)| d)
}

/// Keys under which two copies state the same fact: type, first coding, value, and one key
/// per date field at the same instant. No key (never merged): no code, no date, an encounter
/// (an event at one organisation), or an observation dated to the day only (two results on
/// one day are two results).
fn dedup_keys(resource: &Value) -> Vec<String> {
    let Some(ty) = resource["resourceType"].as_str() else {
        return Vec::new();
    };
    let concept = match ty {
        "Immunization" => &resource["vaccineCode"],
        "MedicationStatement" => &resource["medicationCodeableConcept"],
        "DocumentReference" => &resource["type"],
        "Encounter" | "Patient" => return Vec::new(),
        _ => &resource["code"],
    };
    let Some(coding) = concept["coding"].as_array().and_then(|c| c.first()) else {
        return Vec::new();
    };
    let (Some(system), Some(code)) = (coding["system"].as_str(), coding["code"].as_str()) else {
        return Vec::new();
    };
    let value = fact_value(resource);
    clinical_dates(resource)
        .map(|(field, date)| (field, normalised_instant(date)))
        .filter(|(_, instant)| ty != "Observation" || instant.contains('T'))
        .map(|(field, instant)| format!("{ty}|{system}|{code}|{value}|{field}|{instant}"))
        .collect()
}

/// What a fact says beyond its code: a result's value, a medication's dose.
fn fact_value(resource: &Value) -> String {
    let q = &resource["valueQuantity"];
    if let Some(v) = q["value"].as_f64() {
        return format!(
            "{v}{}",
            q["unit"].as_str().or(q["code"].as_str()).unwrap_or("")
        );
    }
    if let Some(c) = resource["valueCodeableConcept"]["coding"]
        .as_array()
        .and_then(|c| c.first())
    {
        return format!(
            "{}|{}",
            c["system"].as_str().unwrap_or(""),
            c["code"].as_str().unwrap_or("")
        );
    }
    for field in ["valueString", "valueBoolean", "valueInteger"] {
        if let Some(v) = resource.get(field) {
            return v.to_string();
        }
    }
    resource["dosage"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// The same instant written by two systems compares equal: a dateTime with an offset becomes
/// UTC at minute precision (a PAS writes `10:30+01:00`, a GP system `09:30:00Z`); a date or
/// a dateTime that does not parse is kept as written.
fn normalised_instant(date: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    if !date.is_ascii() {
        return date.to_owned();
    }
    let with_seconds;
    let candidate = match (date.len(), date.get(..16), date.get(16..)) {
        // YYYY-MM-DDThh:mm followed by Z or an offset: FHIR requires seconds, some senders omit them.
        (17 | 22, Some(minutes), Some(zone)) if date.as_bytes().get(13) == Some(&b':') => {
            with_seconds = format!("{minutes}:00{zone}");
            with_seconds.as_str()
        }
        _ => date,
    };
    match time::OffsetDateTime::parse(candidate, &Rfc3339) {
        Ok(t) => {
            let t = t.to_offset(time::UtcOffset::UTC);
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        }
        Err(_) => date.to_owned(),
    }
}

fn type_rank(resource: &Value) -> usize {
    resource["resourceType"]
        .as_str()
        .and_then(ResourceType::parse)
        .and_then(|t| ResourceType::ALL.iter().position(|x| *x == t))
        .unwrap_or(usize::MAX)
}

fn order(a: &Candidate, b: &Candidate) -> Ordering {
    type_rank(&a.resource)
        .cmp(&type_rank(&b.resource))
        .then_with(|| {
            let instant = |c: &Candidate| clinical_date(&c.resource).map(normalised_instant);
            instant(b).cmp(&instant(a))
        })
        .then_with(|| a.resource["id"].as_str().cmp(&b.resource["id"].as_str()))
}

fn is_restricted(patient: &Value) -> bool {
    patient["meta"]["security"]
        .as_array()
        .is_some_and(|labels| {
            labels.iter().any(|l| {
                l["system"] == CONFIDENTIALITY_SYSTEM && (l["code"] == "R" || l["code"] == "V")
            })
        })
}

fn registered_gp(patient: &Value) -> Option<OdsCode> {
    patient["generalPractitioner"]
        .as_array()?
        .iter()
        .find_map(|gp| {
            let id = &gp["identifier"];
            (id["system"] == ODS_SYSTEM)
                .then(|| id["value"].as_str().map(OdsCode::new))
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use connectors::ConnectorKind;

    use super::*;

    fn src(ods: &str, kind: SourceKind) -> SourceDescriptor {
        SourceDescriptor {
            id: ods.to_lowercase(),
            ods: OdsCode::new(ods),
            name: ods.into(),
            kind,
            connector: ConnectorKind::Fhir,
            endpoint: "test".into(),
        }
    }

    fn nhs() -> NhsNumber {
        NhsNumber::parse("9434765919").unwrap()
    }

    /// Both stages with every copy released (no policy).
    fn merge_all(answers: &[(&SourceDescriptor, &SourceRecord)]) -> Vec<Candidate> {
        combine(&nhs(), prepare(&nhs(), answers).candidates)
    }

    fn patient(local: &str, extra_id: Option<(&str, &str)>, restricted: bool) -> Value {
        let mut ids = vec![json!({"system": NHS_NUMBER_SYSTEM, "value": "9434765919"})];
        if let Some((system, value)) = extra_id {
            ids.push(json!({"system": system, "value": value}));
        }
        json!({
            "resourceType": "Patient", "id": local, "identifier": ids,
            "meta": {"security": [{"system": CONFIDENTIALITY_SYSTEM, "code": if restricted {"R"} else {"U"}}]},
            "generalPractitioner": [{"type": "Organization", "identifier": {"system": ODS_SYSTEM, "value": "P81001"}}]
        })
    }

    fn immunisation(local: &str, patient: &str, date: &str) -> Value {
        json!({"resourceType": "Immunization", "id": local, "patient": {"reference": format!("Patient/{patient}")},
               "vaccineCode": {"coding": [{"system": "http://snomed.info/sct", "code": "822851000000102"}]},
               "occurrenceDateTime": date})
    }

    fn reported_by(c: &Candidate) -> Vec<String> {
        c.resource["meta"]["extension"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["valueIdentifier"]["value"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn one_patient_whose_id_is_the_nhs_number_with_every_identifier() {
        let (pds, gp, trust) = (
            src("X26", SourceKind::Demographics),
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let (a, b, c) = (
            SourceRecord {
                resources: vec![patient("9434765919", None, false)],
            },
            SourceRecord {
                resources: vec![patient("gp-1", None, false)],
            },
            SourceRecord {
                resources: vec![patient(
                    "rxl-1",
                    Some(("https://rxl.example/mrn", "RXL123")),
                    false,
                )],
            },
        );
        let answers = [(&trust, &c), (&gp, &b), (&pds, &a)];
        let prepared = prepare(&nhs(), &answers);
        assert!(prepared.knows_patient());
        assert_eq!(prepared.facts.registered_gp, Some(OdsCode::new("P81001")));
        assert_eq!(
            prepared.facts.orgs_with_data,
            [OdsCode::new("P81001"), OdsCode::new("RXL")]
        );
        assert!(!prepared.facts.restricted);
        let record = combine(&nhs(), prepared.candidates);
        assert_eq!(record.len(), 1);
        let p = &record[0];
        assert_eq!(p.resource["id"], "9434765919");
        assert_eq!(
            p.resource["meta"]["source"],
            meta_source(&OdsCode::new("X26")),
            "demographics is the base"
        );
        assert_eq!(
            p.resource["identifier"].as_array().unwrap().len(),
            2,
            "NHS number once plus the trust's MRN"
        );
        assert_eq!(reported_by(p), ["X26", "P81001", "RXL"]);
    }

    #[test]
    fn the_same_fact_from_two_sources_is_kept_once_with_both_as_provenance() {
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let g = SourceRecord {
            resources: vec![
                patient("gp-1", None, false),
                immunisation("imm-1", "gp-1", "2025-10-01T09:30:00Z"),
            ],
        };
        let t = SourceRecord {
            resources: vec![
                patient("rxl-1", None, false),
                immunisation("v7", "rxl-1", "2025-10-01T10:30:00+01:00"),
                immunisation("v8", "rxl-1", "2024-10-01T09:30:00Z"),
            ],
        };
        let record = merge_all(&[(&trust, &t), (&gp, &g)]);
        let imms: Vec<_> = record
            .iter()
            .filter(|c| c.resource["resourceType"] == "Immunization")
            .collect();
        assert_eq!(imms.len(), 2);
        assert_eq!(
            imms[0].resource["id"], "P81001.imm-1",
            "newest first; the GP's copy kept"
        );
        assert_eq!(reported_by(imms[0]), ["P81001", "RXL"]);
        assert_eq!(imms[1].resource["id"], "RXL.v8");
        assert_eq!(
            imms[0].resource["patient"]["reference"], "Patient/9434765919",
            "references point at the federated patient"
        );
    }

    #[test]
    fn a_withheld_copy_lends_neither_content_nor_provenance_to_the_released_one() {
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let g = SourceRecord {
            resources: vec![immunisation("imm-1", "gp-1", "2025-10-01T09:30:00Z")],
        };
        let t = SourceRecord {
            resources: vec![immunisation("v7", "rxl-1", "2025-10-01T09:30:00Z")],
        };
        let prepared = prepare(&nhs(), &[(&gp, &g), (&trust, &t)]);
        assert_eq!(
            prepared.candidates.len(),
            2,
            "policy sees each organisation's copy"
        );
        // Policy withholds the GP's copy (say, dissent); the trust's stands alone.
        let released: Vec<_> = prepared
            .candidates
            .into_iter()
            .filter(|c| c.sources[0].kind != SourceKind::GpPractice)
            .collect();
        let record = combine(&nhs(), released);
        assert_eq!(record.len(), 1);
        assert_eq!(record[0].resource["id"], "RXL.v7");
        assert_eq!(reported_by(&record[0]), ["RXL"], "the GP is not named");
    }

    #[test]
    fn only_references_to_the_sources_own_patient_become_the_federated_patient() {
        let trust = src("RXL", SourceKind::Trust);
        let obs = json!({"resourceType": "Observation", "id": "o1",
            "subject": {"reference": "Patient/rxl-1"}, "focus": [{"reference": "Patient/rxl-mother"}],
            "encounter": {"reference": "Encounter/e1"}});
        let t = SourceRecord {
            resources: vec![patient("rxl-1", None, false), obs],
        };
        let record = merge_all(&[(&trust, &t)]);
        let o = record
            .iter()
            .find(|c| c.resource["resourceType"] == "Observation")
            .unwrap();
        assert_eq!(o.resource["subject"]["reference"], "Patient/9434765919");
        assert_eq!(
            o.resource["focus"][0]["reference"], "Patient/RXL.rxl-mother",
            "another patient is never this patient"
        );
        assert_eq!(o.resource["encounter"]["reference"], "Encounter/RXL.e1");
    }

    #[test]
    fn different_results_or_day_only_results_are_never_merged() {
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let potassium = |id: &str, value: f64, when: &str| {
            json!({"resourceType": "Observation", "id": id, "code": {"coding": [{"system": "http://snomed.info/sct", "code": "312468003"}]},
                   "valueQuantity": {"value": value, "unit": "mmol/L"}, "effectiveDateTime": when})
        };
        let g = SourceRecord {
            resources: vec![
                potassium("k1", 4.1, "2025-01-01T09:00:00Z"),
                potassium("k2", 5.0, "2025-02-01"),
            ],
        };
        let t = SourceRecord {
            resources: vec![
                potassium("k1", 5.9, "2025-01-01T09:00:00Z"),
                potassium("k2", 5.0, "2025-02-01"),
            ],
        };
        assert_eq!(merge_all(&[(&gp, &g), (&trust, &t)]).len(), 4);
        let same = SourceRecord {
            resources: vec![potassium("k9", 4.1, "2025-01-01T09:00:00Z")],
        };
        assert_eq!(
            merge_all(&[(&gp, &g), (&trust, &same)]).len(),
            2,
            "same value at the same instant is one result"
        );
    }

    #[test]
    fn the_same_instant_in_two_offsets_is_the_same_fact_and_odd_dates_never_panic() {
        assert_eq!(
            normalised_instant("2024-07-01T10:30:00+01:00"),
            normalised_instant("2024-07-01T09:30:00Z")
        );
        assert_eq!(
            normalised_instant("2024-07-01T10:30+01:00"),
            "2024-07-01T09:30Z"
        );
        assert_eq!(normalised_instant("2024-07-01"), "2024-07-01");
        assert_eq!(normalised_instant("not a date"), "not a date");
        assert_eq!(normalised_instant("2024-07-01T10:3é"), "2024-07-01T10:3é");
        assert_eq!(
            normalised_instant("2024-07-01T10:30:00+01:0é"),
            "2024-07-01T10:30:00+01:0é"
        );
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let condition = |id: &str, fields: Value| {
            let mut c = json!({"resourceType": "Condition", "id": id, "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001"}]}});
            c.as_object_mut()
                .unwrap()
                .extend(fields.as_object().unwrap().clone());
            c
        };
        // The GP writes onset and recorded; the PAS only recorded: they meet on recordedDate.
        let g = SourceRecord {
            resources: vec![condition(
                "c1",
                json!({"onsetDateTime": "2024-07-01T09:30:00Z", "recordedDate": "2024-07-01T09:30:00Z"}),
            )],
        };
        let t = SourceRecord {
            resources: vec![condition(
                "d1",
                json!({"recordedDate": "2024-07-01T10:30:00+01:00"}),
            )],
        };
        let record = merge_all(&[(&gp, &g), (&trust, &t)]);
        assert_eq!(record.len(), 1);
        assert_eq!(record[0].sources.len(), 2);
    }

    #[test]
    fn the_same_fact_twice_from_one_source_is_not_merged() {
        let gp = src("P81001", SourceKind::GpPractice);
        let g = SourceRecord {
            resources: vec![
                immunisation("a", "p", "2025-01-01"),
                immunisation("b", "p", "2025-01-01"),
            ],
        };
        let prepared = prepare(&nhs(), &[(&gp, &g)]);
        assert!(
            !prepared.knows_patient(),
            "no Patient resource, so the patient is not known"
        );
        assert_eq!(combine(&nhs(), prepared.candidates).len(), 2);
    }

    #[test]
    fn ids_are_namespaced_and_references_rewritten() {
        assert_eq!(namespaced_id(&OdsCode::new("RXL"), "enc-1"), "RXL.enc-1");
        let odd = namespaced_id(&OdsCode::new("RXL"), "enc/1 with spaces");
        assert!(odd.starts_with("RXL.h") && odd.len() == 4 + 1 + 16);
        assert_eq!(
            odd,
            namespaced_id(&OdsCode::new("RXL"), "enc/1 with spaces"),
            "stable"
        );
        assert_eq!(
            rewrite_reference("Encounter/e1", &OdsCode::new("RXL"), "1", &[]),
            Some("Encounter/RXL.e1".to_owned())
        );
        assert_eq!(
            rewrite_reference("http://x/Encounter/e1", &OdsCode::new("RXL"), "1", &[]),
            None
        );
        assert_eq!(
            rewrite_reference("#contained", &OdsCode::new("RXL"), "1", &[]),
            None
        );
    }

    #[test]
    fn a_restricted_label_from_any_source_marks_the_patient_restricted() {
        let gp = src("P81001", SourceKind::GpPractice);
        let prepared = prepare(
            &nhs(),
            &[(
                &gp,
                &SourceRecord {
                    resources: vec![patient("gp-1", None, true)],
                },
            )],
        );
        assert!(prepared.facts.restricted);
        assert_eq!(
            prepared.facts.registered_gp, None,
            "only demographics says who the registered GP is"
        );
    }

    #[test]
    fn order_is_deterministic_whatever_the_arrival_order_and_newest_first_by_instant() {
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let g = SourceRecord {
            resources: vec![
                immunisation("a", "p", "2020-01-01T09:45:00Z"),
                json!({"resourceType": "Condition", "id": "c", "code": {}}),
            ],
        };
        let t = SourceRecord {
            resources: vec![immunisation("z", "p", "2020-01-01T10:30:00+01:00")],
        };
        let one = merge_all(&[(&gp, &g), (&trust, &t)]);
        let two = merge_all(&[(&trust, &t), (&gp, &g)]);
        assert_eq!(one, two);
        let ids: Vec<_> = one
            .iter()
            .map(|c| c.resource["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            ids,
            ["P81001.c", "P81001.a", "RXL.z"],
            "09:45Z is newer than 10:30+01:00 (09:30Z)"
        );
    }
}
