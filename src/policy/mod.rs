//! The policy stage. PLACEHOLDER until the policy engine lands (issue: consent and
//! role-based policy): it releases every resource to any caller with a valid token. It has
//! the engine's interface so the gateway is plumbed once.

use std::time::SystemTime;

use connectors::{OdsCode, SourceKind};

use crate::principal::Principal;

/// One organisation that reported a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRef {
    pub ods: OdsCode,
    pub kind: SourceKind,
}

/// A merged resource and every organisation that reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub resource: serde_json::Value,
    pub sources: Vec<SourceRef>,
}

/// What the gateway knows of the patient when policy runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientFacts {
    pub restricted: bool,
    pub registered_gp: Option<OdsCode>,
    pub orgs_with_data: Vec<OdsCode>,
}

#[derive(Debug)]
pub struct PolicyRequest<'a> {
    pub principal: &'a Principal,
    pub break_glass: Option<&'a str>,
    pub relationship_claim: Option<&'a str>,
    pub patient: &'a PatientFacts,
    pub now: SystemTime,
    pub request_id: &'a str,
}

#[derive(Debug)]
pub struct Decision {
    pub released: Vec<Candidate>,
    pub withheld_any: bool,
    pub break_glass_used: bool,
}

#[derive(Debug, Default)]
pub struct PolicyEngine;

impl PolicyEngine {
    /// PLACEHOLDER: releases everything (see the module docs).
    pub fn evaluate(&self, _req: &PolicyRequest<'_>, candidates: Vec<Candidate>) -> Decision {
        Decision {
            released: candidates,
            withheld_any: false,
            break_glass_used: false,
        }
    }
}

/// PLACEHOLDER: the release-all stage needs no files.
pub fn load_for_serving(_dir: &std::path::Path) -> Result<std::sync::Arc<PolicyEngine>, String> {
    Ok(std::sync::Arc::new(PolicyEngine))
}
