//! The decision itself: from a request and its candidates to release or withhold, per
//! source, through the floors and then the Cedar policies.
//!
//! # Why memoised per request
//! Within one request the principal and context are fixed, so a record's verdict depends only
//! on (type, source organisation, source kind, categories, confidential). An `$everything` of
//! a hundred resources has a handful of distinct keys; each is put to Cedar once.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    time::SystemTime,
};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid, Request,
    RestrictedExpression,
};
use connectors::SourceKind;
use serde::Serialize;
use serde_json::Value;

use super::{
    Admission, AlertKind, AlertLog, Candidate, Decision, Denied, PolicyRequest, Relationship,
    codes::{PRACTICE_CONFIDENTIAL, is_practice_confidential},
    load::{Bundle, uid},
};

/// Fields a restricted patient's Patient resource never carries out of the gateway.
/// `contact` is removed too: a next of kin's address usually is the patient's.
pub const REDACTED_FIELDS: [&str; 4] = ["address", "telecom", "generalPractitioner", "contact"];

/// What a record is, as far as the policies can see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RecordKey {
    ty: String,
    ods: String,
    kind: SourceKind,
    categories: BTreeSet<String>,
    confidential: bool,
}

/// One policy that took part in a verdict.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyRef {
    pub id: String,
    pub file: String,
    pub line: usize,
    pub effect: &'static str,
    pub reason: Option<String>,
}

/// The verdict on one source's copy of a resource.
#[derive(Debug, Clone, Serialize)]
pub struct SourceVerdict {
    pub ods: String,
    pub kind: &'static str,
    pub released: bool,
    /// `read` or `emergency-read` when released.
    pub action: Option<&'static str>,
    /// A rule built into the gateway that withheld this copy whatever the policies say.
    pub floor: Option<&'static str>,
    /// The policies that decided (permits when released, forbids when withheld; none when
    /// nothing permitted it, which is deny by default).
    pub policies: Vec<PolicyRef>,
    pub why: String,
}

/// Which policies decided a case, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// `None` when the caller may ask; otherwise why not (the facade answers 403).
    pub refused: Option<String>,
    pub released: bool,
    pub redacted: bool,
    pub resource_type: String,
    pub categories: Vec<String>,
    pub relationship: Relationship,
    pub break_glass: bool,
    pub gp_dissent: bool,
    pub restricted: bool,
    pub sources: Vec<SourceVerdict>,
    pub summary: String,
}

/// The request-wide facts and Cedar inputs.
struct Situation {
    role_known: bool,
    asked_ok: bool,
    relationship: Relationship,
    break_glass: bool,
    gp_dissent: bool,
    restricted: bool,
    user: EntityUid,
    context: Context,
}

fn action(name: &str) -> Result<EntityUid, String> {
    uid("Action", name)
}

/// `YYYY-MM-DDThh:mm:ssZ`, the form Cedar's `datetime()` accepts.
fn cedar_datetime(now: SystemTime) -> String {
    let t = time::OffsetDateTime::from(now);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

pub fn relationship(req: &PolicyRequest) -> Relationship {
    let org = &req.principal.org;
    if req.patient.registered_gp.as_ref() == Some(org) || req.patient.orgs_with_data.contains(org) {
        Relationship::Established
    } else if req.relationship_claim.is_some_and(|r| !r.trim().is_empty()) {
        Relationship::SelfClaimed
    } else {
        Relationship::None
    }
}

/// Dissent at the GP: already known to the caller (`PatientFacts::gp_dissent`), or any
/// candidate from a GP practice carries a dissent code.
pub fn gp_dissent(bundle: &Bundle, facts: &super::PatientFacts, candidates: &[Candidate]) -> bool {
    facts.gp_dissent || detect_dissent(bundle, candidates)
}

/// Does any candidate from a GP practice carry a dissent code?
pub fn detect_dissent(bundle: &Bundle, candidates: &[Candidate]) -> bool {
    candidates.iter().any(|c| {
        c.sources.iter().any(|s| s.kind == SourceKind::GpPractice)
            && bundle.codes.carries_dissent(&c.resource)
    })
}

fn user_entity(bundle: &Bundle, req: &PolicyRequest) -> Result<(EntityUid, Entity), String> {
    let p = req.principal;
    let user = uid("User", &p.sub)?;
    let mut parents = HashSet::new();
    if bundle.roles.contains_key(&p.role) {
        parents.insert(uid("Role", &p.role)?);
    }
    let attrs = HashMap::from([
        (
            "role".to_string(),
            RestrictedExpression::new_string(p.role.clone()),
        ),
        (
            "org".to_string(),
            RestrictedExpression::new_string(p.org.as_str().to_string()),
        ),
        (
            "purpose".to_string(),
            RestrictedExpression::new_string(p.purpose.trim().to_string()),
        ),
    ]);
    let entity =
        Entity::new(user.clone(), attrs, parents).map_err(|e| format!("user entity: {e}"))?;
    Ok((user, entity))
}

fn context(
    restricted: bool,
    gp_dissent: bool,
    relationship: Relationship,
    break_glass: Option<&str>,
    now: SystemTime,
) -> Result<Context, String> {
    let patient = RestrictedExpression::new_record([
        (
            "restricted".to_string(),
            RestrictedExpression::new_bool(restricted),
        ),
        (
            "gpDissent".to_string(),
            RestrictedExpression::new_bool(gp_dissent),
        ),
    ])
    .map_err(|e| format!("context: {e}"))?;
    Context::from_pairs([
        ("patient".to_string(), patient),
        (
            "relationship".to_string(),
            RestrictedExpression::new_string(relationship.as_str().to_string()),
        ),
        (
            "breakGlass".to_string(),
            RestrictedExpression::new_bool(break_glass.is_some()),
        ),
        (
            "breakGlassReason".to_string(),
            RestrictedExpression::new_string(break_glass.unwrap_or("").to_string()),
        ),
        (
            "now".to_string(),
            RestrictedExpression::new_datetime(cedar_datetime(now)),
        ),
    ])
    .map_err(|e| format!("context: {e}"))
}

struct Asked {
    allowed: bool,
    reasons: Vec<cedar_policy::PolicyId>,
    errored: bool,
}

fn ask(
    bundle: &Bundle,
    entities: &Entities,
    principal: &EntityUid,
    act: &str,
    resource: EntityUid,
    ctx: &Context,
    validate: bool,
) -> Result<Asked, String> {
    // The context is validated against the schema once per request (see `situation`); the
    // per-record requests differ only in the resource, whose entity is validated on insertion.
    let request = Request::new(
        principal.clone(),
        action(act)?,
        resource,
        ctx.clone(),
        validate.then_some(&bundle.schema),
    )
    .map_err(|e| format!("request does not fit the schema: {e}"))?;
    let response = Authorizer::new().is_authorized(&request, &bundle.policies, entities);
    let errored = response.diagnostics().errors().next().is_some();
    Ok(Asked {
        // Fail closed: a policy that errored might have been a forbid.
        allowed: response.decision() == CedarDecision::Allow && !errored,
        reasons: response.diagnostics().reason().cloned().collect(),
        errored,
    })
}

/// The part of an internal error safe to log: the stage before the first `:`. The rest may
/// quote attribute values (categories, organisations) derived from patient data.
fn stage(e: &str) -> &str {
    e.split(':').next().unwrap_or("")
}

fn service() -> Result<EntityUid, String> {
    uid("Service", "gateway")
}

/// Everything request-wide, including the Cedar answers to "ask" and "break-glass".
fn situation(
    bundle: &Bundle,
    req: &PolicyRequest,
    gp_dissent: bool,
) -> Result<(Situation, Entities, bool), String> {
    let role_known = bundle.roles.contains_key(&req.principal.role);
    let relationship = relationship(req);
    let restricted = req.patient.restricted;
    let (user, user_entity) = user_entity(bundle, req)?;
    let base = bundle
        .role_entities
        .clone()
        .add_entities(
            [
                user_entity,
                Entity::new_no_attrs(service()?, HashSet::new()),
            ],
            Some(&bundle.schema),
        )
        .map_err(|e| format!("entities: {e}"))?;
    let reason = req.break_glass.map(str::trim).filter(|r| !r.is_empty());
    let plain = context(restricted, gp_dissent, relationship, None, req.now)?;
    let asked_ok = role_known
        && !req.principal.purpose.trim().is_empty()
        && ask(bundle, &base, &user, "ask", service()?, &plain, true)?.allowed;
    // Break glass is asked about only when a reason was given, in the context it would run
    // in, so a policy may test the reason or the time.
    let mut bg_allowed = false;
    let mut ctx = plain;
    if let Some(reason) = reason
        && role_known
        && asked_ok
    {
        let emergency = context(restricted, gp_dissent, relationship, Some(reason), req.now)?;
        bg_allowed = ask(
            bundle,
            &base,
            &user,
            "break-glass",
            service()?,
            &emergency,
            true,
        )?
        .allowed;
        if bg_allowed {
            ctx = emergency;
        }
    }
    let break_glass = bg_allowed;
    Ok((
        Situation {
            role_known,
            asked_ok,
            relationship,
            break_glass,
            gp_dissent,
            restricted,
            user,
            context: ctx,
        },
        base,
        bg_allowed,
    ))
}

pub fn admit(bundle: &Bundle, req: &PolicyRequest, alerts: &AlertLog) -> Result<Admission, Denied> {
    let p = req.principal;
    if !bundle.roles.contains_key(&p.role) {
        return Err(Denied::UnknownRole(p.role.clone()));
    }
    if p.purpose.trim().is_empty() {
        return Err(Denied::NoPurpose);
    }
    let (sit, _, bg_allowed) = situation(bundle, req, false).map_err(|e| {
        tracing::error!(stage = stage(&e), "Policy evaluation failed; refusing.");
        Denied::Internal
    })?;
    if !sit.asked_ok {
        return Err(Denied::NotPermitted);
    }
    let break_glass = match req.break_glass {
        None => false,
        Some(r) if r.trim().is_empty() => return Err(Denied::BreakGlassWithoutReason),
        Some(r) if !bg_allowed => {
            alerts.raise(AlertKind::BreakGlassRefused, req, r);
            return Err(Denied::BreakGlassNotAllowed(p.role.clone()));
        }
        Some(_) => true,
    };
    Ok(Admission {
        break_glass,
        ask_gp: !req.patient.restricted,
    })
}

fn record_key(
    c: &Candidate,
    ods: &str,
    kind: SourceKind,
    categories: &BTreeSet<String>,
    confidential: bool,
) -> RecordKey {
    RecordKey {
        ty: c
            .resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        ods: ods.to_string(),
        kind,
        categories: categories.clone(),
        confidential,
    }
}

fn record_entity(key: &RecordKey, id: usize) -> Result<Entity, String> {
    let attrs = HashMap::from([
        (
            "type".to_string(),
            RestrictedExpression::new_string(key.ty.clone()),
        ),
        (
            "sourceOrg".to_string(),
            RestrictedExpression::new_string(key.ods.clone()),
        ),
        (
            "sourceKind".to_string(),
            RestrictedExpression::new_string(key.kind.as_str().to_string()),
        ),
        (
            "categories".to_string(),
            RestrictedExpression::new_set(
                key.categories
                    .iter()
                    .map(|c| RestrictedExpression::new_string(c.clone())),
            ),
        ),
        (
            "practiceConfidential".to_string(),
            RestrictedExpression::new_bool(key.confidential),
        ),
    ]);
    Entity::new(uid("Record", &id.to_string())?, attrs, HashSet::new())
        .map_err(|e| format!("record entity: {e}"))
}

fn policy_refs(bundle: &Bundle, ids: &[cedar_policy::PolicyId]) -> Vec<PolicyRef> {
    let mut v: Vec<PolicyRef> = ids
        .iter()
        .map(|id| match bundle.origins.get(id) {
            Some(o) => PolicyRef {
                id: o.name.clone(),
                file: o.file.clone(),
                line: o.line,
                effect: if o.effect == cedar_policy::Effect::Permit {
                    "permit"
                } else {
                    "forbid"
                },
                reason: o.reason.clone(),
            },
            None => PolicyRef {
                id: id.to_string(),
                file: String::new(),
                line: 0,
                effect: "?",
                reason: None,
            },
        })
        .collect();
    v.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    v
}

/// The verdict for one record key, floors first.
fn judge(
    bundle: &Bundle,
    sit: &Situation,
    entities: &Entities,
    key: &RecordKey,
    id: usize,
    explain: bool,
) -> Result<SourceVerdict, String> {
    let mut v = SourceVerdict {
        ods: key.ods.clone(),
        kind: key.kind.as_str(),
        released: false,
        action: None,
        floor: None,
        policies: Vec::new(),
        why: String::new(),
    };
    let floor = if !sit.role_known {
        Some("unknown role: nothing is released")
    } else if !sit.asked_ok {
        Some("the caller may not use the gateway (ask refused)")
    } else if sit.gp_dissent && key.kind == SourceKind::GpPractice {
        Some("GP dissent: no GP data is released, not even under break glass")
    } else if sit.restricted && key.kind == SourceKind::GpPractice {
        Some("restricted patient: no GP data is released")
    } else {
        None
    };
    if let Some(f) = floor {
        v.floor = Some(f);
        v.why = format!("withheld by a rule built into the gateway: {f}");
        if !explain {
            return Ok(v);
        }
    }
    let resource = uid("Record", &id.to_string())?;
    let read = ask(
        bundle,
        entities,
        &sit.user,
        "read",
        resource.clone(),
        &sit.context,
        false,
    )?;
    let mut chosen = ("read", read);
    if !chosen.1.allowed && sit.break_glass {
        let emergency = ask(
            bundle,
            entities,
            &sit.user,
            "emergency-read",
            resource,
            &sit.context,
            false,
        )?;
        if emergency.allowed || !emergency.reasons.is_empty() {
            chosen = ("emergency-read", emergency);
        }
    }
    let (act, asked) = chosen;
    if explain {
        v.policies = policy_refs(bundle, &asked.reasons);
    }
    if v.floor.is_some() {
        return Ok(v);
    }
    v.released = asked.allowed;
    if asked.allowed {
        v.action = Some(act);
        v.why = format!("released ({act}) by {}", names(&v.policies));
    } else if asked.errored {
        v.why = "withheld: a policy could not be evaluated (fail closed)".to_string();
    } else if asked.reasons.is_empty() {
        v.why = "withheld: no policy permits it (deny by default)".to_string();
    } else {
        v.why = format!("withheld by {}", names(&v.policies));
    }
    Ok(v)
}

fn names(ps: &[PolicyRef]) -> String {
    if ps.is_empty() {
        return "policy".to_string();
    }
    ps.iter()
        .map(|p| format!("{} ({}:{})", p.id, p.file, p.line))
        .collect::<Vec<_>>()
        .join(", ")
}

fn redact(resource: &mut Value) {
    if let Value::Object(map) = resource {
        for f in REDACTED_FIELDS {
            map.remove(f);
        }
    }
}

fn is_patient(c: &Candidate) -> bool {
    c.resource.get("resourceType").and_then(Value::as_str) == Some("Patient")
}

/// The core shared by evaluate and explain: verdicts per candidate and per source.
fn run(
    bundle: &Bundle,
    req: &PolicyRequest,
    candidates: &[Candidate],
    dissent: bool,
    explain: bool,
) -> Result<(Situation, Vec<Vec<SourceVerdict>>), String> {
    let (sit, base, _) = situation(bundle, req, dissent)?;
    // Distinct record keys, each a Record entity.
    let mut keys: HashMap<RecordKey, usize> = HashMap::new();
    let mut per_candidate: Vec<Vec<usize>> = Vec::with_capacity(candidates.len());
    for c in candidates {
        let mut categories = bundle.codes.categories_of(&c.resource);
        let confidential = is_practice_confidential(&c.resource);
        if confidential {
            categories.insert(PRACTICE_CONFIDENTIAL.to_string());
        }
        let mut ids = Vec::with_capacity(c.sources.len());
        for s in &c.sources {
            // Explain always names the organisation; evaluate merges organisations the
            // policies cannot tell apart.
            let ods = if explain || bundle.uses_source_org {
                s.ods.as_str()
            } else {
                ""
            };
            let key = record_key(c, ods, s.kind, &categories, confidential);
            let next = keys.len();
            ids.push(*keys.entry(key).or_insert(next));
        }
        per_candidate.push(ids);
    }
    let records = keys
        .iter()
        .map(|(k, id)| record_entity(k, *id))
        .collect::<Result<Vec<_>, _>>()?;
    let entities = base
        .add_entities(records, Some(&bundle.schema))
        .map_err(|e| format!("entities: {e}"))?;
    let mut verdicts: HashMap<usize, SourceVerdict> = HashMap::with_capacity(keys.len());
    for (key, id) in &keys {
        verdicts.insert(*id, judge(bundle, &sit, &entities, key, *id, explain)?);
    }
    let out = per_candidate
        .into_iter()
        .map(|ids| {
            ids.into_iter()
                .filter_map(|id| verdicts.get(&id).cloned())
                .collect()
        })
        .collect();
    Ok((sit, out))
}

pub fn evaluate(
    bundle: &Bundle,
    req: &PolicyRequest,
    candidates: Vec<Candidate>,
    alerts: &AlertLog,
) -> Decision {
    let dissent = gp_dissent(bundle, req.patient, &candidates);
    let total = candidates.len();
    let (sit, verdicts) = match run(bundle, req, &candidates, dissent, false) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(
                stage = stage(&e),
                "Policy evaluation failed; withholding everything."
            );
            return Decision {
                released: Vec::new(),
                withheld_any: total > 0,
                break_glass_used: false,
                relationship: relationship(req),
                alerts_raised: 0,
            };
        }
    };
    let mut released = Vec::with_capacity(total);
    let mut redacted_any = false;
    for (mut c, vs) in candidates.into_iter().zip(verdicts) {
        if vs.iter().any(|v| v.released) {
            if sit.restricted && is_patient(&c) {
                redact(&mut c.resource);
                redacted_any = true;
            }
            released.push(c);
        }
    }
    let mut alerts_raised = 0;
    if sit.asked_ok {
        if sit.break_glass {
            alerts.raise(AlertKind::BreakGlass, req, req.break_glass.unwrap_or(""));
            alerts_raised += 1;
        }
        if sit.relationship == Relationship::SelfClaimed {
            alerts.raise(
                AlertKind::SelfClaimedRelationship,
                req,
                req.relationship_claim.unwrap_or(""),
            );
            alerts_raised += 1;
        }
    }
    Decision {
        withheld_any: released.len() < total || redacted_any,
        released,
        break_glass_used: sit.break_glass,
        relationship: sit.relationship,
        alerts_raised,
    }
}

/// Explain one candidate: dissent as stated in the facts or detected from the candidate.
pub fn explain(bundle: &Bundle, req: &PolicyRequest, candidate: &Candidate) -> Explanation {
    let refused = admit(bundle, req, &AlertLog::default())
        .err()
        .map(|d| d.to_string());
    let dissent = gp_dissent(bundle, req.patient, std::slice::from_ref(candidate));
    let mut categories = bundle.codes.categories_of(&candidate.resource);
    if is_practice_confidential(&candidate.resource) {
        categories.insert(PRACTICE_CONFIDENTIAL.to_string());
    }
    let resource_type = candidate
        .resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let base = Explanation {
        refused: refused.clone(),
        released: false,
        redacted: false,
        resource_type,
        categories: categories.into_iter().collect(),
        relationship: relationship(req),
        break_glass: false,
        gp_dissent: dissent,
        restricted: req.patient.restricted,
        sources: Vec::new(),
        summary: String::new(),
    };
    match run(bundle, req, std::slice::from_ref(candidate), dissent, true) {
        Ok((sit, mut verdicts)) => {
            let sources = verdicts.pop().unwrap_or_default();
            let released = sources.iter().any(|v| v.released);
            let redacted = released && sit.restricted && is_patient(candidate);
            let summary = match (&refused, released) {
                (Some(r), _) => format!("refused before any data is fetched: {r}"),
                (None, true) => format!(
                    "released{}: {}",
                    if redacted {
                        " with address, telecom and GP removed"
                    } else {
                        ""
                    },
                    sources
                        .iter()
                        .filter(|v| v.released)
                        .map(|v| format!("{} {}: {}", v.kind, v.ods, v.why))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                (None, false) if sources.is_empty() => {
                    "withheld: the resource names no source organisation".to_string()
                }
                (None, false) => format!(
                    "withheld: {}",
                    sources
                        .iter()
                        .map(|v| format!("{} {}: {}", v.kind, v.ods, v.why))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            };
            Explanation {
                released,
                redacted,
                break_glass: sit.break_glass,
                sources,
                summary,
                ..base
            }
        }
        Err(e) => Explanation {
            summary: format!("withheld: the policy could not be evaluated: {e}"),
            ..base
        },
    }
}
