//! HL7 v2 segments to FHIR R4 resources (UK Core profiles where they apply).
//!
//! PID -> Patient, PV1 (+ PV2) -> Encounter, AL1 -> AllergyIntolerance, DG1 -> Condition,
//! PR1 -> Procedure, OBX -> Observation. Segments after a PID belong to that patient until the
//! next PID; anything else (EVN, NK1, PD1, MRG, Z-segments) is ignored.
//!
//! Resource ids are stable local ids from the message: the hospital number for the Patient;
//! the segment's own identifier where HL7 has one (PV1-19 visit number, DG1-20, PR1-19,
//! OBX-21); otherwise `<patient id>-<segment>-<set id>`. Every id is cut to FHIR's id syntax.

use serde_json::{Map, Value, json};

use super::{datetime, message::Message, message::Segment};
use crate::nhs::{NHS_NUMBER_SYSTEM, NhsNumber};

const UK_CORE: &str = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-";
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// One patient found in a message: the NHS numbers its PID-3 carries (as written, spaces
/// removed, valid or not) and its resources, the Patient first.
#[derive(Debug, Clone, Default)]
pub struct MappedPatient {
    pub nhs_numbers: Vec<String>,
    pub resources: Vec<Value>,
}

/// Maps every PID group of a message.
pub fn map_message(msg: &Message<'_>) -> Vec<MappedPatient> {
    let mut out: Vec<MappedPatient> = Vec::new();
    let mut current: Option<(String, usize)> = None;
    let mut last_encounter: Option<String> = None;
    for seg in msg.segments() {
        match seg.name() {
            "PID" => {
                let ordinal = out.len() + 1;
                let (patient, nhs_numbers, id) = patient(&seg, ordinal);
                current = Some((id, 0));
                last_encounter = None;
                out.push(MappedPatient {
                    nhs_numbers,
                    resources: vec![patient],
                });
            }
            name => {
                let (Some((pid, counter)), Some(group)) = (current.as_mut(), out.last_mut()) else {
                    continue;
                };
                *counter += 1;
                let fallback = |set_id: String| {
                    let set = if set_id.is_empty() {
                        counter.to_string()
                    } else {
                        set_id
                    };
                    format!("{pid}-{}-{set}", name.to_ascii_lowercase())
                };
                let resource = match name {
                    "PV1" => {
                        let r = encounter(&seg, pid, fallback(seg.text(1).into_owned()));
                        last_encounter = r["id"].as_str().map(str::to_owned);
                        Some(r)
                    }
                    "PV2" => {
                        // PV2 enriches the Encounter just made from PV1.
                        if let (Some(enc_id), Some(enc)) = (
                            last_encounter.as_deref(),
                            group
                                .resources
                                .iter_mut()
                                .rev()
                                .find(|r| r["resourceType"] == "Encounter"),
                        ) && enc["id"] == enc_id
                        {
                            add_pv2(enc, &seg);
                        }
                        None
                    }
                    "AL1" => Some(allergy(&seg, pid, fallback(seg.text(1).into_owned()))),
                    "DG1" => Some(condition(&seg, pid, fallback(seg.text(1).into_owned()))),
                    "PR1" => Some(procedure(&seg, pid, fallback(seg.text(1).into_owned()))),
                    "OBX" => Some(observation(&seg, pid, fallback(seg.text(1).into_owned()))),
                    _ => None,
                };
                group.resources.extend(resource);
            }
        }
    }
    out
}

/// Cuts text to FHIR's id syntax (`[A-Za-z0-9-.]{1,64}`).
pub fn fhir_id(raw: &str) -> Option<String> {
    let id: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    (!id.is_empty()).then_some(id)
}

fn non_empty(s: impl AsRef<str>) -> Option<String> {
    let t = s.as_ref().trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn reference(patient_id: &str) -> Value {
    json!({ "reference": format!("Patient/{patient_id}") })
}

/// A coding system name from HL7 table 0396 to a FHIR system URI.
fn coding_system(name: &str) -> String {
    match name.trim().to_ascii_uppercase().as_str() {
        "SCT" | "SNM" | "SNM3" | "SNOMED" | "SNOMEDCT" | "SNOMED CT" => {
            "http://snomed.info/sct".to_owned()
        }
        "I10" | "ICD10" | "ICD-10" => "http://hl7.org/fhir/sid/icd-10".to_owned(),
        "LN" | "LOINC" => "http://loinc.org".to_owned(),
        "UCUM" => "http://unitsofmeasure.org".to_owned(),
        other => format!("urn:hl7v2:coding-system:{}", other.replace(' ', "-")),
    }
}

/// A CE/CWE (code^text^system^alt code^alt text^alt system) as a CodeableConcept.
fn codeable(seg: &Segment<'_, '_>, field: usize, rep: usize) -> Option<Value> {
    let mut codings = Vec::new();
    let mut text = None;
    for base in [1, 4] {
        let code = seg.get(field, rep, base);
        let display = seg.get(field, rep, base + 1);
        let system = seg.get(field, rep, base + 2);
        if text.is_none() {
            text = non_empty(display.clone());
        }
        if let Some(code) = non_empty(code) {
            let mut c = Map::new();
            if let Some(system) = non_empty(system) {
                c.insert("system".into(), coding_system(&system).into());
            }
            c.insert("code".into(), code.into());
            if let Some(d) = non_empty(display) {
                c.insert("display".into(), d.into());
            }
            codings.push(Value::Object(c));
        }
    }
    if codings.is_empty() && text.is_none() {
        return None;
    }
    let mut cc = Map::new();
    if !codings.is_empty() {
        cc.insert("coding".into(), codings.into());
    }
    if let Some(t) = text {
        cc.insert("text".into(), t.into());
    }
    Some(Value::Object(cc))
}

fn resource(ty: &str, id: &str, profile: &str) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("resourceType".into(), ty.into());
    r.insert("id".into(), id.into());
    r.insert(
        "meta".into(),
        json!({ "profile": [format!("{UK_CORE}{profile}")] }),
    );
    r
}

fn id_or(seg: &Segment<'_, '_>, field: usize, fallback: String) -> String {
    fhir_id(&seg.get(field, 1, 1))
        .or_else(|| fhir_id(&fallback))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The identifier system for a CX's assigning authority (CX.4: namespace&universal id&type).
fn authority_system(seg: &Segment<'_, '_>, rep: usize) -> Option<String> {
    let namespace = seg.sub(3, rep, 4, 1);
    let universal = seg.sub(3, rep, 4, 2);
    let kind = seg.sub(3, rep, 4, 3);
    if !universal.trim().is_empty() && kind.trim().eq_ignore_ascii_case("ISO") {
        return Some(format!("urn:oid:{}", universal.trim()));
    }
    non_empty(namespace)
        .or_else(|| non_empty(universal))
        .map(|a| format!("urn:hl7v2:assigning-authority:{}", a.replace(' ', "-")))
}

fn is_nhs_repetition(seg: &Segment<'_, '_>, rep: usize) -> bool {
    seg.sub(3, rep, 4, 1).trim().eq_ignore_ascii_case("NHS")
        || seg.get(3, rep, 5).trim().eq_ignore_ascii_case("NH")
}

/// PID to Patient; also the NHS numbers PID-3 carries and the Patient's id.
fn patient(seg: &Segment<'_, '_>, ordinal: usize) -> (Value, Vec<String>, String) {
    let mut identifiers = Vec::new();
    let mut nhs_numbers = Vec::new();
    let mut local: Option<(String, bool)> = None;
    for rep in 1..=seg.repeats(3) {
        let value: String = seg.get(3, rep, 1).trim().to_owned();
        if value.is_empty() {
            continue;
        }
        if is_nhs_repetition(seg, rep) {
            let digits: String = value.chars().filter(|c| !c.is_whitespace()).collect();
            if NhsNumber::parse(&digits).is_ok() {
                identifiers.push(json!({ "system": NHS_NUMBER_SYSTEM, "value": digits }));
            }
            nhs_numbers.push(digits);
            continue;
        }
        let type_code = seg.get(3, rep, 5).trim().to_owned();
        let mut id = Map::new();
        if !type_code.is_empty() {
            id.insert(
                "type".into(),
                json!({ "coding": [{ "system": V2_0203, "code": type_code }] }),
            );
        }
        if let Some(system) = authority_system(seg, rep) {
            id.insert("system".into(), system.into());
        }
        id.insert("value".into(), value.clone().into());
        identifiers.push(Value::Object(id));
        let is_mr = type_code == "MR";
        if local.as_ref().is_none_or(|(_, was_mr)| !was_mr && is_mr) {
            local = Some((value, is_mr));
        }
    }
    let id = local
        .and_then(|(v, _)| fhir_id(&v))
        .unwrap_or_else(|| format!("pid-{ordinal}"));

    let mut r = resource("Patient", &id, "Patient");
    if !identifiers.is_empty() {
        r.insert("identifier".into(), identifiers.into());
    }
    let names: Vec<Value> = (1..=seg.repeats(5))
        .filter_map(|rep| human_name(seg, 5, rep))
        .collect();
    if !names.is_empty() {
        r.insert("name".into(), names.into());
    }
    let phones: Vec<Value> = (1..=seg.repeats(13))
        .filter_map(|rep| {
            let number = non_empty(seg.get(13, rep, 1)).or_else(|| non_empty(seg.get(13, rep, 12)));
            number.map(|n| {
                let use_ = match seg.get(13, rep, 2).as_ref() {
                    "WPN" => "work",
                    "PRN" | "ORN" | "VHN" => "home",
                    _ => "home",
                };
                let system = if seg.get(13, rep, 3) == "Internet" {
                    "email"
                } else {
                    "phone"
                };
                json!({ "system": system, "value": n, "use": use_ })
            })
        })
        .collect();
    if !phones.is_empty() {
        r.insert("telecom".into(), phones.into());
    }
    let gender = match seg.text(8).trim() {
        "M" => Some("male"),
        "F" => Some("female"),
        "O" | "A" => Some("other"),
        "U" | "N" => Some("unknown"),
        _ => None,
    };
    if let Some(g) = gender {
        r.insert("gender".into(), g.into());
    }
    if let Some(b) = datetime::to_fhir_date(&seg.text(7)) {
        r.insert("birthDate".into(), b.into());
    }
    let addresses: Vec<Value> = (1..=seg.repeats(11))
        .filter_map(|rep| address(seg, 11, rep))
        .collect();
    if !addresses.is_empty() {
        r.insert("address".into(), addresses.into());
    }
    if let Some(d) = datetime::to_fhir_datetime(&seg.text(29)) {
        r.insert("deceasedDateTime".into(), d.into());
    } else if seg.text(30).trim() == "Y" {
        r.insert("deceasedBoolean".into(), true.into());
    }
    (Value::Object(r), nhs_numbers, id)
}

fn human_name(seg: &Segment<'_, '_>, field: usize, rep: usize) -> Option<Value> {
    let mut n = Map::new();
    let family = seg.sub(field, rep, 1, 1);
    let given: Vec<String> = [seg.get(field, rep, 2), seg.get(field, rep, 3)]
        .into_iter()
        .filter_map(non_empty)
        .collect();
    if let Some(f) = non_empty(family) {
        n.insert("family".into(), f.into());
    }
    if !given.is_empty() {
        n.insert("given".into(), given.into());
    }
    if n.is_empty() {
        return None;
    }
    if let Some(p) = non_empty(seg.get(field, rep, 5)) {
        n.insert("prefix".into(), json!([p]));
    }
    if let Some(s) = non_empty(seg.get(field, rep, 4)) {
        n.insert("suffix".into(), json!([s]));
    }
    let use_ = match seg.get(field, rep, 7).trim() {
        "L" => Some("official"),
        "D" => Some("usual"),
        "M" | "B" => Some("maiden"),
        "N" => Some("nickname"),
        "A" | "S" => Some("anonymous"),
        _ => None,
    };
    if let Some(u) = use_ {
        n.insert("use".into(), u.into());
    }
    Some(Value::Object(n))
}

fn address(seg: &Segment<'_, '_>, field: usize, rep: usize) -> Option<Value> {
    let mut a = Map::new();
    let lines: Vec<String> = [seg.sub(field, rep, 1, 1), seg.get(field, rep, 2)]
        .into_iter()
        .filter_map(non_empty)
        .collect();
    if !lines.is_empty() {
        a.insert("line".into(), lines.into());
    }
    for (comp, key) in [
        (3, "city"),
        (4, "district"),
        (5, "postalCode"),
        (6, "country"),
    ] {
        if let Some(v) = non_empty(seg.get(field, rep, comp)) {
            a.insert(key.into(), v.into());
        }
    }
    if a.is_empty() {
        return None;
    }
    let use_ = match seg.get(field, rep, 7).trim() {
        "H" | "L" => Some("home"),
        "B" | "O" => Some("work"),
        "C" => Some("temp"),
        _ => None,
    };
    if let Some(u) = use_ {
        a.insert("use".into(), u.into());
    }
    Some(Value::Object(a))
}

/// A clinician (XCN: id^family^given^middle^suffix^prefix) as display text.
fn clinician(seg: &Segment<'_, '_>, field: usize, rep: usize) -> Option<Value> {
    let display: Vec<String> = [6, 3, 4, 2]
        .into_iter()
        .filter_map(|c| non_empty(seg.get(field, rep, c)))
        .collect();
    let id = non_empty(seg.get(field, rep, 1));
    if display.is_empty() && id.is_none() {
        return None;
    }
    let mut who = Map::new();
    if !display.is_empty() {
        who.insert("display".into(), display.join(" ").into());
    }
    if let Some(id) = id {
        who.insert("identifier".into(), json!({ "value": id }));
    }
    Some(Value::Object(who))
}

fn encounter(seg: &Segment<'_, '_>, patient_id: &str, fallback: String) -> Value {
    let id = id_or(seg, 19, fallback);
    let mut r = resource("Encounter", &id, "Encounter");
    let mut identifiers = Vec::new();
    for field in [19, 50] {
        if let Some(v) = non_empty(seg.get(field, 1, 1)) {
            identifiers.push(json!({ "value": v }));
        }
    }
    if !identifiers.is_empty() {
        r.insert("identifier".into(), identifiers.into());
    }
    let start = datetime::to_fhir_datetime(&seg.text(44));
    let end = datetime::to_fhir_datetime(&seg.text(45));
    let status = if end.is_some() {
        "finished"
    } else if start.is_some() {
        "in-progress"
    } else {
        "unknown"
    };
    r.insert("status".into(), status.into());
    let class = seg.text(2);
    let (code, display) = match class.trim() {
        "I" => ("IMP", "inpatient encounter"),
        "E" => ("EMER", "emergency"),
        "P" => ("PRENC", "pre-admission"),
        "O" | "R" | "B" | "C" => ("AMB", "ambulatory"),
        _ => ("AMB", "ambulatory"),
    };
    r.insert(
        "class".into(),
        json!({ "system": ACT_CODE, "code": code, "display": display }),
    );
    r.insert("subject".into(), reference(patient_id));
    let mut period = Map::new();
    if let Some(s) = start {
        period.insert("start".into(), s.into());
    }
    if let Some(e) = end {
        period.insert("end".into(), e.into());
    }
    if !period.is_empty() {
        r.insert("period".into(), Value::Object(period));
    }
    // PV1-3 PL: point of care^room^bed^facility...
    let place: Vec<String> = [1, 2, 3]
        .into_iter()
        .filter_map(|c| non_empty(seg.first_sub(3, 1, c)))
        .collect();
    if !place.is_empty() {
        r.insert(
            "location".into(),
            json!([{ "location": { "display": place.join(" ") } }]),
        );
    }
    let participants: Vec<Value> = (1..=seg.repeats(7))
        .filter_map(|rep| clinician(seg, 7, rep))
        .take(1)
        .map(|who| {
            json!({
                "type": [{ "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "code": "ATND",
                    "display": "attender"
                }]}],
                "individual": who
            })
        })
        .collect();
    if !participants.is_empty() {
        r.insert("participant".into(), participants.into());
    }
    Value::Object(r)
}

fn add_pv2(encounter: &mut Value, seg: &Segment<'_, '_>) {
    if let Some(reason) = codeable(seg, 3, 1)
        && let Some(obj) = encounter.as_object_mut()
    {
        obj.insert("reasonCode".into(), json!([reason]));
    }
}

fn allergy(seg: &Segment<'_, '_>, patient_id: &str, fallback: String) -> Value {
    let id = fhir_id(&fallback).unwrap_or_else(|| "unknown".to_owned());
    let mut r = resource("AllergyIntolerance", &id, "AllergyIntolerance");
    r.insert(
        "clinicalStatus".into(),
        json!({ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
            "code": "active"
        }]}),
    );
    r.insert(
        "verificationStatus".into(),
        json!({ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification",
            "code": "confirmed"
        }]}),
    );
    let category = match seg.get(2, 1, 1).trim() {
        "DA" => Some("medication"),
        "FA" => Some("food"),
        "EA" | "AA" | "PA" => Some("environment"),
        _ => None,
    };
    if let Some(c) = category {
        r.insert("category".into(), json!([c]));
    }
    let criticality = match seg.get(4, 1, 1).trim() {
        "SV" => Some("high"),
        "MO" | "MI" => Some("low"),
        _ => None,
    };
    if let Some(c) = criticality {
        r.insert("criticality".into(), c.into());
    }
    if let Some(code) = codeable(seg, 3, 1) {
        r.insert("code".into(), code);
    }
    r.insert("patient".into(), reference(patient_id));
    let reactions: Vec<Value> = (1..=seg.repeats(5))
        .filter_map(|rep| non_empty(seg.get(5, rep, 1)))
        .map(|text| json!({ "text": text }))
        .collect();
    if !reactions.is_empty() {
        r.insert("reaction".into(), json!([{ "manifestation": reactions }]));
    }
    if let Some(d) = datetime::to_fhir_datetime(&seg.text(6)) {
        r.insert("recordedDate".into(), d.into());
    }
    Value::Object(r)
}

fn condition(seg: &Segment<'_, '_>, patient_id: &str, fallback: String) -> Value {
    let id = id_or(seg, 20, fallback);
    let mut r = resource("Condition", &id, "Condition");
    r.insert(
        "category".into(),
        json!([{ "coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
            "code": "encounter-diagnosis",
            "display": "Encounter Diagnosis"
        }]}]),
    );
    let code = codeable(seg, 3, 1).or_else(|| non_empty(seg.text(4)).map(|t| json!({ "text": t })));
    if let Some(code) = code {
        r.insert("code".into(), code);
    }
    r.insert("subject".into(), reference(patient_id));
    if let Some(d) = datetime::to_fhir_datetime(&seg.text(5)) {
        r.insert("recordedDate".into(), d.into());
    }
    Value::Object(r)
}

fn procedure(seg: &Segment<'_, '_>, patient_id: &str, fallback: String) -> Value {
    let id = id_or(seg, 19, fallback);
    let mut r = resource("Procedure", &id, "Procedure");
    r.insert("status".into(), "completed".into());
    let code = codeable(seg, 3, 1).or_else(|| non_empty(seg.text(4)).map(|t| json!({ "text": t })));
    if let Some(code) = code {
        r.insert("code".into(), code);
    }
    r.insert("subject".into(), reference(patient_id));
    if let Some(d) = datetime::to_fhir_datetime(&seg.text(5)) {
        r.insert("performedDateTime".into(), d.into());
    }
    Value::Object(r)
}

fn observation(seg: &Segment<'_, '_>, patient_id: &str, fallback: String) -> Value {
    let id = id_or(seg, 21, fallback);
    let mut r = resource("Observation", &id, "Observation");
    let status = match seg.text(11).trim() {
        "F" => "final",
        "C" => "corrected",
        "P" | "R" | "S" => "preliminary",
        "X" => "cancelled",
        "D" | "W" => "entered-in-error",
        "" => "final",
        _ => "unknown",
    };
    r.insert("status".into(), status.into());
    r.insert(
        "code".into(),
        codeable(seg, 3, 1).unwrap_or_else(|| json!({ "text": "unknown" })),
    );
    r.insert("subject".into(), reference(patient_id));
    if let Some(d) = datetime::to_fhir_datetime(&seg.text(14)) {
        r.insert("effectiveDateTime".into(), d.into());
    }
    let value_type = seg.text(2);
    let value_type = value_type.trim();
    let values: Vec<String> = (1..=seg.repeats(5))
        .filter_map(|rep| non_empty(seg.get(5, rep, 1)))
        .collect();
    match value_type {
        "NM" | "SN" => {
            if let Some(n) = values.first().and_then(|v| v.trim().parse::<f64>().ok())
                && n.is_finite()
            {
                let mut q = Map::new();
                q.insert("value".into(), n.into());
                if let Some(unit) = non_empty(seg.get(6, 1, 1)) {
                    q.insert("unit".into(), unit.clone().into());
                    if let Some(system) = non_empty(seg.get(6, 1, 3)) {
                        q.insert("system".into(), coding_system(&system).into());
                        q.insert("code".into(), unit.into());
                    }
                }
                r.insert("valueQuantity".into(), Value::Object(q));
            }
        }
        "CE" | "CWE" | "CNE" => {
            if let Some(cc) = codeable(seg, 5, 1) {
                r.insert("valueCodeableConcept".into(), cc);
            }
        }
        "DT" | "DTM" | "TS" => {
            if let Some(d) = values.first().and_then(|v| datetime::to_fhir_datetime(v)) {
                r.insert("valueDateTime".into(), d.into());
            }
        }
        _ => {
            if !values.is_empty() {
                r.insert("valueString".into(), values.join("\n").into());
            }
        }
    }
    Value::Object(r)
}
