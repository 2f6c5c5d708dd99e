//! Merge: many sources' answers become one federated record.
//!
//! The NHS number is the only join key. The federated Patient's id is the NHS number (as in
//! PDS); every other resource keeps its source's id, namespaced by the source's ODS code so
//! two sources never collide, and its references are rewritten to match. Every resource
//! names the organisation it came from in `meta.source`, and lists every organisation that
//! reported it in a `meta` extension. The same clinical fact reported by two organisations
//! (same type, code and clinical date) is kept once, with both as provenance. The order is
//! deterministic: Patient first, then by type, newest first, then by id.

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

/// The merged record and what it says about the patient.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// The federated Patient first (when any source knows the patient), then the rest.
    pub candidates: Vec<Candidate>,
    pub facts: PatientFacts,
}

impl Merged {
    pub fn knows_patient(&self) -> bool {
        self.candidates
            .first()
            .is_some_and(|c| c.resource["resourceType"] == "Patient")
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

/// Merges the answers of the sources that answered.
pub fn merge(nhs_number: &NhsNumber, answers: &[(&SourceDescriptor, &SourceRecord)]) -> Merged {
    let mut answers: Vec<_> = answers.to_vec();
    answers.sort_by(|(a, _), (b, _)| {
        kind_rank(a.kind)
            .cmp(&kind_rank(b.kind))
            .then_with(|| a.ods.cmp(&b.ods))
    });

    let nhs = nhs_number.expose();
    let mut patients: Vec<(&SourceDescriptor, &Value)> = Vec::new();
    let mut others: Vec<Candidate> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut facts = PatientFacts::default();

    for (source, record) in &answers {
        if record.knows_patient()
            && source.kind != SourceKind::Demographics
            && !facts.orgs_with_data.contains(&source.ods)
        {
            facts.orgs_with_data.push(source.ods.clone());
        }
        for resource in &record.resources {
            if resource["resourceType"] == "Patient" {
                patients.push((source, resource));
                continue;
            }
            let reference = SourceRef {
                ods: source.ods.clone(),
                kind: source.kind,
            };
            let key = dedup_key(resource);
            if let Some(&at) = key.as_ref().and_then(|k| seen.get(k)) {
                let existing: &mut Candidate = &mut others[at];
                if !existing.sources.iter().any(|s| s.ods == source.ods) {
                    existing.sources.push(reference);
                    continue;
                }
            }
            let mut resource = resource.clone();
            localise(&mut resource, &source.ods, &nhs);
            if let Some(key) = key {
                seen.entry(key).or_insert(others.len());
            }
            others.push(Candidate {
                resource,
                sources: vec![reference],
            });
        }
    }

    for (source, patient) in &patients {
        facts.restricted |= is_restricted(patient);
        if source.kind == SourceKind::Demographics {
            facts.registered_gp = facts
                .registered_gp
                .take()
                .or_else(|| registered_gp(patient));
        }
    }

    others.sort_by(order);
    for c in &mut others {
        stamp_provenance(&mut c.resource, &c.sources);
    }
    let mut candidates = Vec::with_capacity(others.len() + 1);
    if let Some(patient) = federated_patient(&nhs, &patients) {
        candidates.push(patient);
    }
    candidates.extend(others);
    Merged { candidates, facts }
}

/// One Patient for the NHS number: the highest-ranked source's Patient (the demographics
/// service when it answered), with every source's identifiers and every source as provenance.
fn federated_patient(nhs: &str, patients: &[(&SourceDescriptor, &Value)]) -> Option<Candidate> {
    let (base_source, base) = patients.first()?;
    let mut patient = (*base).clone();
    let mut identifiers: Vec<Value> = vec![json!({"system": NHS_NUMBER_SYSTEM, "value": nhs})];
    for (_, p) in patients {
        for id in p["identifier"].as_array().into_iter().flatten() {
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
    for (s, _) in patients {
        if !sources.iter().any(|have| have.ods == s.ods) {
            sources.push(SourceRef {
                ods: s.ods.clone(),
                kind: s.kind,
            });
        }
    }
    debug_assert_eq!(sources.first().map(|s| &s.ods), Some(&base_source.ods));
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
fn localise(resource: &mut Value, ods: &OdsCode, nhs: &str) {
    if let Some(obj) = resource.as_object_mut() {
        let local = obj
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        obj.insert("id".into(), Value::String(namespaced_id(ods, &local)));
    }
    rewrite_references(resource, ods, nhs);
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

fn rewrite_references(value: &mut Value, ods: &OdsCode, nhs: &str) {
    match value {
        Value::Object(obj) => {
            for (key, v) in obj.iter_mut() {
                if key == "reference" {
                    if let Some(rewritten) = v.as_str().and_then(|s| rewrite_reference(s, ods, nhs))
                    {
                        *v = Value::String(rewritten);
                    }
                } else {
                    rewrite_references(v, ods, nhs);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| rewrite_references(v, ods, nhs)),
        _ => {}
    }
}

/// `Patient/x` -> `Patient/{nhs}`; `Type/x` -> `Type/{ODS}.x`; absolute and contained
/// references are left alone.
fn rewrite_reference(reference: &str, ods: &OdsCode, nhs: &str) -> Option<String> {
    let (ty, id) = reference.split_once('/')?;
    if id.contains('/')
        || !ty.starts_with(|c: char| c.is_ascii_uppercase())
        || !ty.chars().all(|c| c.is_ascii_alphanumeric())
    {
        return None;
    }
    Some(if ty == "Patient" {
        format!("Patient/{nhs}")
    } else {
        format!("{ty}/{}", namespaced_id(ods, id))
    })
}

/// The clinical date a resource is about, by type.
fn clinical_date(resource: &Value) -> Option<&str> {
    [
        &resource["occurrenceDateTime"],
        &resource["effectiveDateTime"],
        &resource["onsetDateTime"],
        &resource["performedDateTime"],
        &resource["effectivePeriod"]["start"],
        &resource["performedPeriod"]["start"],
        &resource["period"]["start"],
        &resource["recordedDate"],
        &resource["date"],
    ]
    .into_iter()
    .find_map(Value::as_str)
}

/// Two resources state the same fact when type, first coding and clinical date agree.
fn dedup_key(resource: &Value) -> Option<String> {
    let ty = resource["resourceType"].as_str()?;
    let concept = match ty {
        "Immunization" => &resource["vaccineCode"],
        "MedicationStatement" => &resource["medicationCodeableConcept"],
        "DocumentReference" => &resource["type"],
        "Encounter" => return None, // an encounter is an event at one organisation
        _ => &resource["code"],
    };
    let coding = concept["coding"].as_array()?.first()?;
    let (system, code) = (coding["system"].as_str()?, coding["code"].as_str()?);
    let date = normalised_instant(clinical_date(resource)?);
    Some(format!("{ty}|{system}|{code}|{date}"))
}

/// The same instant written by two systems compares equal: a dateTime with an offset becomes
/// UTC at minute precision (a PAS writes `10:30+01:00`, a GP system `09:30:00Z`); a date or
/// a dateTime that does not parse is kept as written.
fn normalised_instant(date: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let with_seconds;
    let candidate = match date.len() {
        // YYYY-MM-DDThh:mm followed by Z or an offset: FHIR requires seconds, some senders omit them.
        17 | 22 if date.as_bytes().get(13) == Some(&b':') => {
            with_seconds = format!("{}:00{}", &date[..16], &date[16..]);
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
        .then_with(|| clinical_date(&b.resource).cmp(&clinical_date(&a.resource)))
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

    fn immunisation(local: &str, date: &str) -> Value {
        json!({"resourceType": "Immunization", "id": local, "patient": {"reference": format!("Patient/{local}-p")},
               "vaccineCode": {"coding": [{"system": "http://snomed.info/sct", "code": "1037311000000106"}]},
               "occurrenceDateTime": date})
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
        let merged = merge(&nhs(), &[(&trust, &c), (&gp, &b), (&pds, &a)]);
        assert!(merged.knows_patient());
        let p = &merged.candidates[0];
        assert_eq!(merged.candidates.len(), 1);
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
        assert_eq!(
            p.sources.iter().map(|s| s.ods.as_str()).collect::<Vec<_>>(),
            ["X26", "P81001", "RXL"]
        );
        assert_eq!(merged.facts.registered_gp, Some(OdsCode::new("P81001")));
        assert_eq!(
            merged.facts.orgs_with_data,
            [OdsCode::new("P81001"), OdsCode::new("RXL")]
        );
        assert!(!merged.facts.restricted);
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
                immunisation("imm-1", "2025-10-01T09:30:00Z"),
            ],
        };
        let t = SourceRecord {
            resources: vec![
                patient("rxl-1", None, false),
                immunisation("v7", "2025-10-01T09:30:00Z"),
                immunisation("v8", "2024-10-01T09:30:00Z"),
            ],
        };
        let merged = merge(&nhs(), &[(&gp, &g), (&trust, &t)]);
        let imms: Vec<_> = merged
            .candidates
            .iter()
            .filter(|c| c.resource["resourceType"] == "Immunization")
            .collect();
        assert_eq!(imms.len(), 2);
        assert_eq!(
            imms[0].resource["id"], "P81001.imm-1",
            "newest first; GP's copy kept"
        );
        assert_eq!(imms[0].sources.len(), 2);
        let reported: Vec<_> = imms[0].resource["meta"]["extension"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["valueIdentifier"]["value"].clone())
            .collect();
        assert_eq!(reported, [json!("P81001"), json!("RXL")]);
        assert_eq!(imms[1].resource["id"], "RXL.v8");
        assert_eq!(
            imms[0].resource["patient"]["reference"], "Patient/9434765919",
            "references point at the federated patient"
        );
    }

    #[test]
    fn the_same_instant_in_two_offsets_is_the_same_fact() {
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
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let condition = |id: &str, field: &str, when: &str| json!({"resourceType": "Condition", "id": id, "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001"}]}, field: when});
        let g = SourceRecord {
            resources: vec![condition("c1", "onsetDateTime", "2024-07-01T09:30:00Z")],
        };
        let t = SourceRecord {
            resources: vec![condition("d1", "recordedDate", "2024-07-01T10:30:00+01:00")],
        };
        let merged = merge(&nhs(), &[(&gp, &g), (&trust, &t)]);
        assert_eq!(merged.candidates.len(), 1);
        assert_eq!(merged.candidates[0].sources.len(), 2);
    }

    #[test]
    fn the_same_fact_twice_from_one_source_is_not_merged() {
        let gp = src("P81001", SourceKind::GpPractice);
        let g = SourceRecord {
            resources: vec![
                immunisation("a", "2025-01-01"),
                immunisation("b", "2025-01-01"),
            ],
        };
        let merged = merge(&nhs(), &[(&gp, &g)]);
        assert_eq!(merged.candidates.len(), 2);
        assert!(
            !merged.knows_patient(),
            "no Patient resource, so the patient is not known"
        );
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
            rewrite_reference("Encounter/e1", &OdsCode::new("RXL"), "1"),
            Some("RXL.e1".replace("RXL", "Encounter/RXL"))
        );
        assert_eq!(
            rewrite_reference("http://x/Encounter/e1", &OdsCode::new("RXL"), "1"),
            None
        );
        assert_eq!(
            rewrite_reference("#contained", &OdsCode::new("RXL"), "1"),
            None
        );
    }

    #[test]
    fn a_restricted_label_from_any_source_marks_the_patient_restricted() {
        let gp = src("P81001", SourceKind::GpPractice);
        let merged = merge(
            &nhs(),
            &[(
                &gp,
                &SourceRecord {
                    resources: vec![patient("gp-1", None, true)],
                },
            )],
        );
        assert!(merged.facts.restricted);
        assert_eq!(
            merged.facts.registered_gp, None,
            "only demographics says who the registered GP is"
        );
    }

    #[test]
    fn order_is_deterministic_whatever_the_arrival_order() {
        let (gp, trust) = (
            src("P81001", SourceKind::GpPractice),
            src("RXL", SourceKind::Trust),
        );
        let g = SourceRecord {
            resources: vec![
                immunisation("a", "2020-01-01"),
                json!({"resourceType": "Condition", "id": "c", "code": {}}),
            ],
        };
        let t = SourceRecord {
            resources: vec![immunisation("z", "2023-01-01")],
        };
        let one = merge(&nhs(), &[(&gp, &g), (&trust, &t)]);
        let two = merge(&nhs(), &[(&trust, &t), (&gp, &g)]);
        assert_eq!(one, two);
        let ids: Vec<_> = one
            .candidates
            .iter()
            .map(|c| c.resource["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["P81001.c", "RXL.z", "P81001.a"]);
    }
}
