//! Policy: consent and role-based rules from `policies/` decide, per resource, release or
//! withhold. Rules are Cedar policies validated against a schema; code sets and roles are
//! data files; all of it is edited by Information Governance officers.
//!
//! # Why Cedar, and why some rules are also in code
//! Cedar policies are schema-validated before they are used, analysable, and readable by
//! non-programmers, and forbid-beats-permit gives deny-by-default with exceptions that can
//! be reviewed. Three rules are legal invariants rather than local choices, so the engine
//! enforces them itself as well (a *floor* that editing files cannot lift): an unknown role
//! gets nothing; GP-sourced data never leaves under GP dissent (break glass included); GP data
//! of a restricted patient never leaves, and their Patient resource always loses address,
//! telecom and registered GP (a rule can release or withhold but cannot edit a resource).
//!
//! # Why per source
//! A merged resource carries every organisation that reported it. It is released when at least
//! one of its sources may release it: a trust's copy of a diagnosis is the trust's to share even
//! if the patient dissented at the GP. Copies from a GP under dissent never count.
//!
//! # Why break glass lasts one request
//! Break glass is honoured only on the request that carries `X-Break-Glass: <reason>`; nothing
//! persists between requests, so the time box is the request itself and every use is a separate
//! alert. The reason and `context.now` are given to the policies, so a stricter window (e.g.
//! hours of the day) can be written as a rule.

mod admin;
mod alerts;
pub mod cases;
pub mod cli;
mod codes;
mod decide;
mod diagnostic;
mod load;
mod watch;

#[cfg(test)]
mod tests;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::SystemTime,
};

use arc_swap::ArcSwap;
use connectors::{OdsCode, SourceKind};

use crate::principal::Principal;

pub use admin::admin_router;
pub use alerts::{Alert, AlertKind, AlertLog};
pub use decide::{Explanation, SourceVerdict};
pub use diagnostic::Diagnostic;
pub use watch::WatchHandle;

use load::Bundle;

/// Loads `dir` for the gateway: every problem joined into one message (one per line), for a
/// start-up error. Does not watch; call [`PolicyEngine::watch`] and keep the handle.
pub fn load_for_serving(dir: &Path) -> Result<Arc<PolicyEngine>, String> {
    PolicyEngine::load(dir).map_err(|diags| {
        let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
        format!(
            "policy directory {} is not valid:\n{}",
            dir.display(),
            lines.join("\n")
        )
    })
}

/// The policy in force, swapped whole on reload.
#[derive(Debug)]
pub struct PolicyEngine {
    current: ArcSwap<Bundle>,
    accepted: AtomicU64,
    rejected: AtomicU64,
    last_errors: std::sync::Mutex<Vec<String>>,
    alerts: AlertLog,
}

/// Everything the engine needs to judge one request.
#[derive(Debug, Clone, Copy)]
pub struct PolicyRequest<'a> {
    pub principal: &'a Principal,
    /// `X-Break-Glass` reason; the facade already rejects an empty reason with 400.
    pub break_glass: Option<&'a str>,
    /// `X-Legitimate-Relationship` reason.
    pub relationship_claim: Option<&'a str>,
    pub patient: &'a PatientFacts,
    pub now: SystemTime,
    /// For alerts; not patient data.
    pub request_id: &'a str,
}

/// What the gateway knows about the patient apart from the candidates themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientFacts {
    /// PDS confidentiality R or V.
    pub restricted: bool,
    /// From demographics.
    pub registered_gp: Option<OdsCode>,
    /// Organisations that answered with data for this patient.
    pub orgs_with_data: Vec<OdsCode>,
    /// Dissent at the GP already known to the caller (extension). The engine also detects it
    /// from the candidates; set this when the candidates may not include the GP's consent
    /// record, e.g. a per-type search (`Condition?patient=`) whose answer holds no
    /// Observations. [`PolicyEngine::gp_dissent`] tells it from any GP records.
    pub gp_dissent: bool,
}

/// A merged resource and every organisation that reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub resource: serde_json::Value,
    pub sources: Vec<SourceRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRef {
    pub ods: OdsCode,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relationship {
    /// The caller's organisation is the registered GP or answered with data for the patient.
    Established,
    /// The caller stated a reason; audited and alerted.
    SelfClaimed,
    None,
}

impl Relationship {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Established => "established",
            Self::SelfClaimed => "self-claimed",
            Self::None => "none",
        }
    }
}

/// The outcome of [`PolicyEngine::evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Released resources, in input order; restricted patients' Patient resources redacted.
    pub released: Vec<Candidate>,
    /// Something was withheld or redacted: the facade says so (never how many or what).
    pub withheld_any: bool,
    pub break_glass_used: bool,
    pub relationship: Relationship,
    pub alerts_raised: usize,
}

/// The outcome of [`PolicyEngine::admit`] when the caller may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Break glass was asked for and is allowed for this role.
    pub break_glass: bool,
    /// False for a restricted patient: the plan must not ask their GP. (Extension.)
    pub ask_gp: bool,
}

/// Why a caller may not ask at all; the facade answers 403.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("role {0} is not known to the policy")]
    UnknownRole(String),
    #[error("the token states no purpose of use")]
    NoPurpose,
    #[error("the policy does not let this caller use the gateway")]
    NotPermitted,
    #[error("role {0} may not break glass")]
    BreakGlassNotAllowed(String),
    #[error("break glass needs a reason")]
    BreakGlassWithoutReason,
    #[error("the policy could not be evaluated")]
    Internal,
}

impl Denied {
    /// A stable code for logs and OperationOutcome details.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnknownRole(_) => "UNKNOWN_ROLE",
            Self::NoPurpose => "NO_PURPOSE",
            Self::NotPermitted => "NOT_PERMITTED",
            Self::BreakGlassNotAllowed(_) => "BREAK_GLASS_NOT_ALLOWED",
            Self::BreakGlassWithoutReason => "BREAK_GLASS_WITHOUT_REASON",
            Self::Internal => "POLICY_ERROR",
        }
    }
}

/// Reload counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadStats {
    pub accepted: u64,
    pub rejected: u64,
    /// The errors of the last rejected reload (file:line:col: message), empty after a good one.
    pub last_errors: Vec<String>,
}

impl PolicyEngine {
    /// Loads and validates every file in `dir`; Err lists every problem (file:line:col + plain English).
    pub fn load(dir: &Path) -> Result<Arc<Self>, Vec<Diagnostic>> {
        let bundle = load::load_dir(dir)?;
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(bundle),
            accepted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_errors: std::sync::Mutex::new(Vec::new()),
            alerts: AlertLog::default(),
        }))
    }

    /// Re-reads `dir`: a valid set replaces the current one atomically; an invalid one is
    /// logged, counted and dropped, and the current set stays; Err carries its problems.
    pub fn reload(&self, dir: &Path) -> Result<(), Vec<Diagnostic>> {
        match load::load_dir(dir) {
            Ok(bundle) => {
                self.current.store(Arc::new(bundle));
                self.accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut last) = self.last_errors.lock() {
                    last.clear();
                }
                tracing::info!(dir = %dir.display(), "Policy reloaded.");
                Ok(())
            }
            Err(diags) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                let errors: Vec<String> = diags.iter().map(ToString::to_string).collect();
                tracing::warn!(dir = %dir.display(), errors = ?errors, "Policy reload rejected; the previous policy stays in force.");
                if let Ok(mut last) = self.last_errors.lock() {
                    *last = errors;
                }
                Err(diags)
            }
        }
    }

    /// Watches `dir`; a valid change is in force within 2 s, an invalid one is logged, counted,
    /// and the old set stays. Stops watching when the handle is dropped.
    pub fn watch(self: &Arc<Self>, dir: &Path) -> Result<WatchHandle, String> {
        watch::watch(Arc::downgrade(self), dir)
    }

    /// Before fan-out: may this caller ask at all, and is their break glass allowed?
    pub fn admit(&self, req: &PolicyRequest) -> Result<Admission, Denied> {
        let bundle = self.current.load();
        decide::admit(&bundle, req, &self.alerts)
    }

    /// Decides release or withhold for every candidate. Synchronous and without I/O; raises
    /// Privacy Officer alerts for break glass and self-claimed relationships.
    pub fn evaluate(&self, req: &PolicyRequest, candidates: Vec<Candidate>) -> Decision {
        let bundle = self.current.load();
        decide::evaluate(&bundle, req, candidates, &self.alerts)
    }

    /// Which policies decided each source of one candidate, and why. Raises no alerts.
    pub fn explain(&self, req: &PolicyRequest, candidate: &Candidate) -> Explanation {
        let bundle = self.current.load();
        decide::explain(&bundle, req, candidate)
    }

    /// Whether these candidates show dissent recorded at the GP (a GP-sourced record carrying a
    /// dissent code). For callers that hold GP records outside the candidates they judge.
    pub fn gp_dissent(&self, candidates: &[Candidate]) -> bool {
        decide::detect_dissent(&self.current.load(), candidates)
    }

    pub fn reloads(&self) -> ReloadStats {
        ReloadStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            last_errors: self
                .last_errors
                .lock()
                .map(|l| l.clone())
                .unwrap_or_default(),
        }
    }

    pub fn alerts(&self) -> &AlertLog {
        &self.alerts
    }
}
