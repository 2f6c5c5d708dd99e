//! Policy test cases: the data files IG officers write in `policies/tests/*.toml`, also the
//! shape of one case for `policy explain` and `POST /admin/policy/explain`.
//!
//! A case gives a caller, a patient situation and one resource, and says what must happen:
//! `release`, `withhold`, or `refuse` (the caller is turned away before anything is fetched).

use std::{
    fs,
    path::{Path, PathBuf},
    time::SystemTime,
};

use connectors::{OdsCode, SourceKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Candidate, Explanation, PatientFacts, PolicyEngine, PolicyRequest, SourceRef,
    codes::{ACT_CODE_SYSTEM, NOPAT},
    diagnostic::{Diagnostic, display_name},
    load::TESTS_DIR,
};
use crate::principal::Principal;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    Release,
    Withhold,
    Refuse,
}

fn direct_care() -> String {
    "direct-care".to_string()
}

fn tester() -> String {
    "policy-test".to_string()
}

/// One case.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[serde(default)]
    pub name: String,
    /// National RBAC role code of the caller.
    pub role: String,
    /// ODS code of the caller's organisation.
    pub org: String,
    #[serde(default = "direct_care")]
    pub purpose: String,
    #[serde(default = "tester")]
    pub sub: String,
    #[serde(default)]
    pub break_glass: Option<String>,
    #[serde(default)]
    pub relationship_claim: Option<String>,
    #[serde(default)]
    pub patient: CasePatient,
    pub resource: CaseResource,
    /// Required in test files; ignored by explain.
    #[serde(default)]
    pub expect: Option<Expect>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasePatient {
    #[serde(default)]
    pub restricted: bool,
    /// A dissent code is recorded at the patient's GP.
    #[serde(default)]
    pub gp_dissent: bool,
    #[serde(default)]
    pub registered_gp: Option<String>,
    #[serde(default)]
    pub orgs_with_data: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseResource {
    /// FHIR resourceType, e.g. "Condition".
    #[serde(rename = "type")]
    pub ty: String,
    /// Codes the resource carries (any system).
    #[serde(default)]
    pub codes: Vec<String>,
    #[serde(default)]
    pub practice_confidential: bool,
    /// Every organisation that reported it.
    pub sources: Vec<CaseSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseSource {
    pub ods: String,
    pub kind: SourceKind,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    #[serde(rename = "case", default)]
    cases: Vec<toml::Spanned<Case>>,
}

impl Case {
    pub fn principal(&self) -> Principal {
        Principal {
            sub: self.sub.clone(),
            role: self.role.clone(),
            org: OdsCode::new(self.org.clone()),
            purpose: self.purpose.clone(),
        }
    }

    pub fn facts(&self) -> PatientFacts {
        PatientFacts {
            restricted: self.patient.restricted,
            registered_gp: self.patient.registered_gp.clone().map(OdsCode::new),
            gp_dissent: self.patient.gp_dissent,
            orgs_with_data: self
                .patient
                .orgs_with_data
                .iter()
                .cloned()
                .map(OdsCode::new)
                .collect(),
        }
    }

    /// The resource as a FHIR JSON candidate.
    pub fn candidate(&self) -> Candidate {
        let r = &self.resource;
        let mut resource = json!({ "resourceType": r.ty, "id": "case" });
        if !r.codes.is_empty() {
            let coding: Vec<Value> = r.codes.iter().map(|c| json!({ "code": c })).collect();
            resource["code"] = json!({ "coding": coding });
        }
        if r.practice_confidential {
            resource["meta"] =
                json!({ "security": [{ "system": ACT_CODE_SYSTEM, "code": NOPAT }] });
        }
        if r.ty == "Patient" {
            resource["address"] = json!([{ "postalCode": "ZZ99 3ZZ" }]);
            resource["telecom"] = json!([{ "system": "phone", "value": "0" }]);
        }
        Candidate {
            resource,
            sources: r
                .sources
                .iter()
                .map(|s| SourceRef {
                    ods: OdsCode::new(s.ods.clone()),
                    kind: s.kind,
                })
                .collect(),
        }
    }

    /// Run the case: was it refused, was the resource released?
    pub fn explain(&self, engine: &PolicyEngine) -> Explanation {
        let principal = self.principal();
        let facts = self.facts();
        let req = PolicyRequest {
            principal: &principal,
            break_glass: self.break_glass.as_deref(),
            relationship_claim: self.relationship_claim.as_deref(),
            patient: &facts,
            now: SystemTime::now(),
            request_id: "policy-case",
        };
        engine.explain(&req, &self.candidate())
    }

    /// What actually happened, in the same words as `expect`.
    pub fn outcome(e: &Explanation) -> Expect {
        if e.refused.is_some() {
            Expect::Refuse
        } else if e.released {
            Expect::Release
        } else {
            Expect::Withhold
        }
    }
}

/// Read every `tests/*.toml` file under `dir`; each case with its file and line.
pub fn load_cases(dir: &Path) -> Result<Vec<(String, usize, Case)>, Vec<Diagnostic>> {
    let tests = dir.join(TESTS_DIR);
    let mut paths: Vec<PathBuf> = match fs::read_dir(&tests) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect(),
        Err(e) => {
            return Err(vec![Diagnostic::file(
                TESTS_DIR,
                format!("cannot read the test directory: {e}"),
            )]);
        }
    };
    paths.sort();
    let mut out = Vec::new();
    let mut diags = Vec::new();
    for p in paths {
        let name = display_name(dir, &p);
        let text = match fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) => {
                diags.push(Diagnostic::file(
                    &name,
                    format!("cannot read the file: {e}"),
                ));
                continue;
            }
        };
        match toml::from_str::<CaseFile>(&text) {
            Ok(file) => {
                for c in file.cases {
                    let (line, _) = super::diagnostic::line_col(&text, c.span().start);
                    let case = c.into_inner();
                    if case.expect.is_none() {
                        diags.push(Diagnostic::at(&name, &text, 0, format!("case {:?} (line {line}) has no expect = \"release\" | \"withhold\" | \"refuse\"", case.name)));
                        continue;
                    }
                    out.push((name.clone(), line, case));
                }
            }
            Err(e) => {
                let msg = format!("not a valid test-case file: {}", e.message().trim());
                diags.push(match e.span() {
                    Some(s) => Diagnostic::at(&name, &text, s.start, msg),
                    None => Diagnostic::file(&name, msg),
                });
            }
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}

/// Parse one case (for explain) from TOML `[case]`-less text or JSON.
pub fn parse_case(text: &str) -> Result<Vec<Case>, String> {
    if let Ok(c) = serde_json::from_str::<Case>(text) {
        return Ok(vec![c]);
    }
    if let Ok(f) = toml::from_str::<CaseFile>(text)
        && !f.cases.is_empty()
    {
        return Ok(f.cases.into_iter().map(toml::Spanned::into_inner).collect());
    }
    toml::from_str::<Case>(text)
        .map(|c| vec![c])
        .map_err(|e| format!("not a case: {}", e.message().trim()))
}
