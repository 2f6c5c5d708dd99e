//! One federated query, end to end: plan -> fan-out -> merge -> policy -> audit.
//!
//! The facade turns HTTP into a [`FederatedQuery`] and an [`Answer`] back into FHIR; nothing
//! here knows HTTP or any upstream protocol.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use connectors::{NhsNumber, ResourceType, SourceKind, SourceQuery};
use tokio::time::Instant;
use tracing::{Instrument, info_span, warn};

use crate::{
    audit::{AuditLog, AuditRecord, AuditSource},
    config::Budget,
    fanout::{Source, fan_out, upstream_deadline},
    fhir::now_rfc3339,
    merge::{combine, prepare},
    outcome::{Outcome, SourceOutcome},
    plan::{Located, PlanMode, clinical_sources},
    policy::{Candidate, PatientFacts, PolicyEngine, PolicyRequest},
    principal::Principal,
    upstreams::UpstreamStats,
};

/// How much of the upstream budget the demographics lookup may use before the plan gives up
/// on it and broadcasts with what remains.
const LOCATE_SHARE: (u32, u32) = (2, 5);

/// Everything a request needs, shared by all requests.
#[derive(Debug)]
pub struct Gateway {
    pub sources: Vec<Source>,
    pub plan: PlanMode,
    pub budget: Budget,
    pub policy: Arc<PolicyEngine>,
    pub audit: AuditLog,
    pub upstreams: UpstreamStats,
    /// How long the work after fan-out has taken lately; widens the reserve under load.
    pub finish: FinishTail,
}

/// A decaying high-water mark of the work after fan-out (merge, policy, the audit write), so
/// that the upstream deadline leaves room for it under load as well as when idle.
///
/// The configured reserve is the floor. When the box is busy, the audit's `fdatasync` and the
/// merge queue for CPU and disk and can outgrow a fixed reserve; the request would then reach
/// its deadline inside the audit write and answer 503 instead of the partial record. Each
/// sample decays the mark by 1/32, so a spike is forgotten within a few dozen requests.
#[derive(Debug, Default)]
pub struct FinishTail(AtomicU64);

impl FinishTail {
    /// What a gateway assumes before it has measured its own finish: a new audit file's first
    /// syncs and a cold cache are slower than the steady state, and a request with a hung
    /// source must still leave room for them. Fast finishes wear it down within a few dozen
    /// requests.
    pub const COLD_START: Duration = Duration::from_millis(100);

    /// A mark that starts at `initial` (see [`Self::COLD_START`]).
    pub fn starting_at(initial: Duration) -> Self {
        let tail = Self::default();
        tail.observe(initial);
        tail
    }

    pub fn observe(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |mark| {
                Some(sample.max(mark - mark / 32))
            });
    }

    /// The reserve for a request with `left` of its budget: half again over the recent mark,
    /// never under `configured`, and never over a quarter of what is left (upstreams keep
    /// most of the budget however slow the box is).
    pub fn reserve(&self, configured: Duration, left: Duration) -> Duration {
        let recent = Duration::from_micros(self.0.load(Ordering::Relaxed));
        (recent * 3 / 2).clamp(configured, configured.max(left / 4))
    }
}

/// One patient query, as the facade parsed it.
#[derive(Debug)]
pub struct FederatedQuery<'a> {
    pub nhs_number: NhsNumber,
    /// The types the caller wants back (Patient is always fetched, to check identity).
    pub types: Vec<ResourceType>,
    pub deadline: Instant,
    pub principal: &'a Principal,
    pub break_glass: Option<&'a str>,
    pub relationship_claim: Option<&'a str>,
    pub request_id: &'a str,
    /// The route, for the audit record (`Patient.read`, `Patient.$everything`, ...).
    pub action: &'a str,
}

/// What a query produced.
#[derive(Debug)]
pub enum Answer {
    /// The patient is known: released resources and every asked source's outcome.
    Record {
        released: Vec<Candidate>,
        outcomes: Vec<SourceOutcome>,
        withheld_any: bool,
    },
    /// Every source asked answered, and none knows the patient.
    Unknown,
    /// No source that answered knows the patient, and some did not answer: cannot tell.
    Unavailable { outcomes: Vec<SourceOutcome> },
}

/// Why a query could not be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// Policy refuses the caller before any source is asked.
    #[error("refused by policy: {0}")]
    Denied(crate::policy::Denied),
}

impl Gateway {
    pub async fn query(&self, q: &FederatedQuery<'_>) -> Result<Answer, QueryError> {
        // May this caller ask at all (role known, purpose stated, break glass allowed)?
        let unknown_yet = PatientFacts::default();
        if let Err(denied) = self.policy.admit(&self.policy_request(q, &unknown_yet)) {
            crate::metrics::global().policy_rejection();
            self.audit(q, &[], 0, 0, true).await?;
            return Err(QueryError::Denied(denied));
        }

        // # Why every source is asked for the whole record
        // Policy must judge a per-type search on the patient's whole record: dissent is a
        // coded entry at the GP that a `Condition?patient=` search would not fetch, and the
        // cache keys raw answers by source and patient, not by query shape. What the caller
        // did not ask for is dropped before policy runs and never leaves the gateway.
        let reserve = self.finish.reserve(
            self.budget.reserve,
            q.deadline.saturating_duration_since(Instant::now()),
        );
        let upstream = upstream_deadline(q.deadline, reserve);
        let source_query = SourceQuery::everything(q.nhs_number);

        let (demographics_outcome, located) = self
            .locate(q.nhs_number, upstream)
            .instrument(info_span!("plan"))
            .await;
        if located == Located::Unknown {
            self.audit(q, demographics_outcome.as_slice(), 0, 0, false)
                .instrument(info_span!("audit"))
                .await?;
            return Ok(Answer::Unknown);
        }

        let asked: Vec<Source> = clinical_sources(&self.sources, &located)
            .into_iter()
            .cloned()
            .collect();
        let mut outcomes = fan_out(&asked, &source_query, upstream)
            .instrument(info_span!("fan_out", sources = asked.len()))
            .await;
        let fanned_out = Instant::now();
        for o in &outcomes {
            if !o.outcome.is_answered() {
                warn!(source = %o.source.ods, kind = o.source.kind.as_str(), outcome = o.outcome.code(), "Source did not answer in full.");
            }
        }
        outcomes.splice(0..0, demographics_outcome);
        if let Some(slowest) = outcomes.iter().max_by_key(|o| o.elapsed) {
            // On the request span, so "Request completed." names the source that set the pace.
            let span = tracing::Span::current();
            span.record("slowest_source", slowest.source.ods.as_str());
            span.record("slowest_ms", slowest.elapsed.as_secs_f64() * 1e3);
        }

        let answers: Vec<_> = outcomes
            .iter()
            .filter_map(|o| match &o.outcome {
                Outcome::Answered(record) => Some((o.source.as_ref(), record)),
                _ => None,
            })
            .collect();
        let mut prepared = info_span!("merge").in_scope(|| prepare(&q.nhs_number, &answers));
        if !prepared.knows_patient() {
            let all_answered = outcomes.iter().all(|o| o.outcome.is_answered());
            self.audit(q, &outcomes, 0, 0, false)
                .instrument(info_span!("audit"))
                .await?;
            return Ok(if all_answered {
                Answer::Unknown
            } else {
                Answer::Unavailable { outcomes }
            });
        }

        let decision = info_span!("policy").in_scope(|| {
            prepared.facts.gp_dissent = self.policy.gp_dissent(&prepared.candidates);
            let wanted: Vec<Candidate> = prepared
                .candidates
                .into_iter()
                .filter(|c| {
                    c.resource["resourceType"]
                        .as_str()
                        .and_then(ResourceType::parse)
                        .is_some_and(|t| q.types.contains(&t))
                })
                .collect();
            let asked = wanted.len();
            let decision = self
                .policy
                .evaluate(&self.policy_request(q, &prepared.facts), wanted);
            let withheld = asked.saturating_sub(decision.released.len());
            (decision, withheld)
        });
        let (decision, withheld) = decision;
        let released = info_span!("merge").in_scope(|| combine(&q.nhs_number, decision.released));
        let audited = self
            .audit(q, &outcomes, released.len(), withheld, false)
            .instrument(info_span!("audit"))
            .await;
        // Timed out or not: a write that missed the deadline is what the mark must learn.
        self.finish.observe(fanned_out.elapsed());
        audited?;
        Ok(Answer::Record {
            released,
            outcomes,
            withheld_any: decision.withheld_any,
        })
    }

    fn policy_request<'a>(
        &self,
        q: &'a FederatedQuery<'_>,
        patient: &'a PatientFacts,
    ) -> PolicyRequest<'a> {
        PolicyRequest {
            principal: q.principal,
            break_glass: q.break_glass,
            relationship_claim: q.relationship_claim,
            patient,
            now: SystemTime::now(),
            request_id: q.request_id,
        }
    }

    /// Asks demographics (in locate mode) where the patient is registered.
    async fn locate(&self, nhs: NhsNumber, upstream: Instant) -> (Option<SourceOutcome>, Located) {
        let demographics = self
            .sources
            .iter()
            .find(|s| s.descriptor.kind == SourceKind::Demographics);
        let (PlanMode::Locate, Some(demographics)) = (self.plan, demographics) else {
            return (None, Located::Unavailable);
        };
        let now = Instant::now();
        let share = upstream.saturating_duration_since(now) * LOCATE_SHARE.0 / LOCATE_SHARE.1;
        let outcome = demographics
            .call(SourceQuery::new(nhs, [ResourceType::Patient]), now + share)
            .await;
        let located = match &outcome.outcome {
            Outcome::Answered(record) if !record.knows_patient() => Located::Unknown,
            Outcome::Answered(record) => {
                let facts = prepare(&nhs, &[(outcome.source.as_ref(), record)]).facts;
                Located::Found {
                    registered_gp: facts.registered_gp,
                    restricted: facts.restricted,
                }
            }
            other => {
                warn!(source = %outcome.source.ods, outcome = other.code(), "Demographics did not answer; broadcasting.");
                Located::Unavailable
            }
        };
        (Some(outcome), located)
    }

    async fn audit(
        &self,
        q: &FederatedQuery<'_>,
        outcomes: &[SourceOutcome],
        released: usize,
        withheld: usize,
        refused: bool,
    ) -> Result<(), QueryError> {
        let trace_id = crate::telemetry::current_trace_id();
        let record = AuditRecord {
            time: now_rfc3339(),
            request_id: q.request_id,
            trace_id: trace_id.as_deref(),
            sub: &q.principal.sub,
            role: &q.principal.role,
            org: q.principal.org.as_str(),
            purpose: &q.principal.purpose,
            patient: q.nhs_number.expose(),
            action: q.action,
            break_glass: q.break_glass,
            relationship_claim: q.relationship_claim,
            sources: outcomes
                .iter()
                .map(|o| AuditSource {
                    ods: o.source.ods.as_str(),
                    outcome: o.outcome.code(),
                })
                .collect(),
            released,
            withheld,
            refused,
        };
        // Nothing is released unaudited, and nothing leaves after the deadline: a disk that
        // stalls past it is a failed write (503), never a hung request.
        match tokio::time::timeout_at(q.deadline, self.audit.write(&record)).await {
            Ok(written) => Ok(written?),
            Err(_) => Err(QueryError::Audit(crate::audit::AuditError::timed_out())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_reserve_widens_after_slow_finishes_within_bounds_and_decays() {
        let tail = FinishTail::default();
        // Idle: the configured reserve.
        assert_eq!(tail.reserve(50 * MS, 2000 * MS), 50 * MS);
        tail.observe(10 * MS);
        assert_eq!(tail.reserve(50 * MS, 2000 * MS), 50 * MS);
        // A 120 ms finish: half again over it.
        tail.observe(120 * MS);
        assert_eq!(tail.reserve(50 * MS, 2000 * MS), 180 * MS);
        // Never more than a quarter of what is left, nor less than the configured reserve.
        assert_eq!(tail.reserve(50 * MS, 400 * MS), 100 * MS);
        assert_eq!(tail.reserve(50 * MS, 100 * MS), 50 * MS);
        // Fast finishes wear the mark down.
        for _ in 0..200 {
            tail.observe(MS);
        }
        assert_eq!(tail.reserve(50 * MS, 2000 * MS), 50 * MS);
    }
}
