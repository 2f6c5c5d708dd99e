//! The FHIR R4 documents the facade writes: searchset Bundles, OperationOutcomes and the
//! CapabilityStatement.

use serde_json::{Map, Value, json};

use connectors::{ResourceType, nhs::NHS_NUMBER_SYSTEM};

/// The media type of every response body.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// One issue of an OperationOutcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// `fatal | error | warning | information`.
    pub severity: &'static str,
    /// FHIR issue-type code, e.g. `invalid`, `login`, `not-found`, `incomplete`, `suppressed`.
    pub code: &'static str,
    /// Shown to the user; never carries patient data.
    pub text: String,
}

impl Issue {
    pub fn new(severity: &'static str, code: &'static str, text: impl Into<String>) -> Self {
        Self {
            severity,
            code,
            text: text.into(),
        }
    }
}

pub fn operation_outcome(issues: &[Issue]) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": issues.iter().map(|i| json!({
            "severity": i.severity,
            "code": i.code,
            "details": {"text": i.text},
        })).collect::<Vec<_>>(),
    })
}

/// A searchset Bundle: the matches, then the OperationOutcome entry.
///
/// Built by moving each resource into its entry: `json!` would serialise (deep-copy) every
/// resource once for its entry and again for the Bundle, which was a fifth of a cached
/// `$everything`'s instructions.
pub fn searchset(
    id: &str,
    base: &str,
    self_url: &str,
    matches: Vec<Value>,
    outcome: &[Issue],
) -> Value {
    let total = matches.len();
    let entry = |full_url: String, resource: Value, mode: &str| {
        let mut e = Map::with_capacity(3);
        e.insert("fullUrl".into(), Value::String(full_url));
        e.insert("resource".into(), resource);
        e.insert("search".into(), json!({ "mode": mode }));
        Value::Object(e)
    };
    let mut entries: Vec<Value> = Vec::with_capacity(total + 1);
    for resource in matches {
        let full_url = format!(
            "{base}/{}/{}",
            resource["resourceType"].as_str().unwrap_or("Resource"),
            resource["id"].as_str().unwrap_or_default()
        );
        entries.push(entry(full_url, resource, "match"));
    }
    entries.push(entry(
        format!("urn:uuid:{}", outcome_uuid(id)),
        operation_outcome(outcome),
        "outcome",
    ));
    let mut bundle = Map::with_capacity(8);
    bundle.insert("resourceType".into(), "Bundle".into());
    bundle.insert("id".into(), id.into());
    bundle.insert("meta".into(), json!({"lastUpdated": now_rfc3339()}));
    bundle.insert("type".into(), "searchset".into());
    bundle.insert("timestamp".into(), now_rfc3339().into());
    bundle.insert("total".into(), total.into());
    bundle.insert(
        "link".into(),
        json!([{"relation": "self", "url": self_url}]),
    );
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}

/// A UUID-shaped urn for the outcome entry, derived from the request id (unique per request).
fn outcome_uuid(request_id: &str) -> String {
    let hex: String = request_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// What this server can do, for `GET /fhir/metadata`.
pub fn capability_statement(base: &str) -> Value {
    // The facade accepts exactly these (and `_format`); any other parameter, or a modifier
    // not named here, is ignored and reported (400 under `Prefer: handling=strict`).
    let patient_param = json!({"name": "patient", "type": "reference", "documentation": format!("The patient's NHS number (Patient/{{nhs-number}} or the bare number); or patient:identifier={NHS_NUMBER_SYSTEM}|{{nhs-number}}. No other modifiers.")});
    let resources: Vec<Value> = ResourceType::ALL
        .iter()
        .map(|t| {
            if *t == ResourceType::Patient {
                json!({
                    "type": "Patient",
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": [
                        {"name": "identifier", "type": "token", "documentation": format!("{NHS_NUMBER_SYSTEM}|{{nhs-number}}")},
                        {"name": "_id", "type": "token", "documentation": "The NHS number (the federated Patient's id)."},
                    ],
                    "operation": [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything", "documentation": "Takes _type (a comma-separated list of the types served) and no other parameter."}],
                })
            } else {
                json!({"type": t.as_str(), "interaction": [{"code": "search-type"}], "searchParam": [patient_param]})
            }
        })
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now_rfc3339(),
        "publisher": "Tributary",
        "kind": "instance",
        "software": {"name": "Tributary", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Tributary federated shared care record gateway", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "A federated record: every answer is assembled at request time from the organisations that hold the data, under sharing policy, within a time budget (Prefer: wait=N, raised to at least 500 ms). Unknown search parameters are ignored and reported in the Bundle's OperationOutcome, or refused with 400 under Prefer: handling=strict. Each user (token sub) and organisation (token org) has a rate limit: past it, 429 with Retry-After.",
            "security": {
                "cors": false,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "OAuth"}]}],
                "description": "Bearer JWT (ES256 or RS256) with claims sub, role (national RBAC role code), org (ODS code) and purpose.",
            },
            "resource": resources,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searchset_counts_matches_only_and_ends_with_the_outcome() {
        let b = searchset(
            "abc123",
            "http://h/fhir",
            "http://h/fhir/X",
            vec![json!({"resourceType": "Condition", "id": "RXL.1"})],
            &[Issue::new("information", "informational", "ok")],
        );
        assert_eq!(b["total"], 1);
        assert_eq!(b["entry"][0]["fullUrl"], "http://h/fhir/Condition/RXL.1");
        assert_eq!(b["entry"][1]["search"]["mode"], "outcome");
        assert_eq!(
            b["entry"][1]["resource"]["resourceType"],
            "OperationOutcome"
        );
        assert_eq!(
            b["entry"][1]["fullUrl"].as_str().map(str::len),
            Some("urn:uuid:".len() + 36)
        );
    }
}
