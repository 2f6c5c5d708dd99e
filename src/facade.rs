//! The FHIR R4 REST facade: HTTP in, [`FederatedQuery`] to the gateway, FHIR JSON out.
//!
//! Every error leaves as an OperationOutcome with the right status, from one place
//! ([`ApiError`]). Request logs carry the matched route, never the URI: URIs hold NHS numbers.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{DefaultBodyLimit, MatchedPath, Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use connectors::{NhsNumber, NhsNumberError, ResourceType, nhs::NHS_NUMBER_SYSTEM};
use rand::RngCore;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info};

use crate::{
    auth::{AuthError, Verifier},
    fhir::{FHIR_JSON, Issue, capability_statement, operation_outcome, searchset},
    gateway::{Answer, FederatedQuery, Gateway, QueryError},
    outcome::{Outcome, SourceOutcome},
    policy::Denied,
    principal::Principal,
    ratelimit::{RateLimits, retry_after_secs},
    telemetry::{self, TraceParent},
};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// A caller's own request id, echoed back.
pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
/// W3C Trace Context: the caller's trace, and ours back to the caller.
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACERESPONSE: HeaderName = HeaderName::from_static("traceresponse");
const BREAK_GLASS: &str = "x-break-glass";
const RELATIONSHIP: &str = "x-legitimate-relationship";
/// Longest accepted break-glass or relationship reason, in bytes.
const MAX_REASON: usize = 1024;

/// State shared by the facade's handlers.
#[derive(Debug, Clone)]
pub struct Facade {
    pub gateway: Arc<Gateway>,
    pub verifier: Arc<Verifier>,
    /// The public base URL, e.g. `http://127.0.0.1:8080/fhir` (never taken from `Host`).
    pub base_url: Arc<str>,
    /// Load shedding for data requests.
    pub shed: Shedder,
    /// Per-user and per-organisation rate limits, checked right after authentication.
    pub limits: Arc<RateLimits>,
    /// Largest request body (`POST _search` forms); more is a 413.
    pub max_body_bytes: usize,
    /// A request body must arrive in full within this time; otherwise a 408.
    pub body_timeout: Duration,
}

/// Load shedding: at most `max_in_flight` data requests at once; the next is answered at
/// once with 503, `Retry-After` and an OperationOutcome, never queued. A queued request
/// would spend its budget waiting and time out anyway, after tying up a connection; a fast
/// 503 lets the caller (or its load balancer) go elsewhere. `/fhir/metadata` is never shed.
#[derive(Debug, Clone)]
pub struct Shedder {
    permits: Arc<tokio::sync::Semaphore>,
    retry_after: HeaderValue,
}

impl Shedder {
    pub fn new(settings: crate::config::ShedSettings) -> Self {
        Self {
            permits: Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight)),
            retry_after: HeaderValue::from(settings.retry_after.as_secs().max(1)),
        }
    }
}

async fn shed(State(s): State<Shedder>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/fhir/metadata" {
        return next.run(request).await;
    }
    let Ok(permit) = s.permits.clone().try_acquire_owned() else {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "throttled",
            "the gateway is at capacity: try again after the time in Retry-After",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, s.retry_after.clone());
        return response;
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

/// The facade's router.
pub fn router(facade: Facade) -> Router {
    let shedder = facade.shed.clone();
    let body_limit = facade.max_body_bytes;
    Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/Patient", get(patient_search))
        .route("/fhir/Patient/{id}", get(patient_read))
        .route("/fhir/Patient/{id}/$everything", get(everything))
        .route("/fhir/{type}", get(type_search).post(type_search_post))
        .route(
            "/fhir/{type}/_search",
            axum::routing::post(type_search_post),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(facade)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(shedder, shed))
        .layer(middleware::from_fn(envelope))
}

/// An error the facade answers with: a status and an OperationOutcome.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    issues: Vec<Issue>,
    /// The `WWW-Authenticate` challenge of a 401.
    challenge: Option<&'static str>,
    /// `Retry-After` in seconds (429, 503).
    retry_after: Option<u64>,
    /// Send `Connection: close`: the request body was left unread (or half read), so the
    /// connection cannot carry another request.
    close: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, text: impl Into<String>) -> Self {
        Self {
            status,
            issues: vec![Issue::new("error", code, text)],
            challenge: None,
            retry_after: None,
            close: false,
        }
    }

    fn bad_request(text: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", text)
    }

    /// The same answer with `Connection: close`, for a request whose body was not read.
    fn closing(self) -> Self {
        Self {
            close: true,
            ..self
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            issues: vec![Issue::new("error", "login", e.to_string())],
            challenge: Some(if e == AuthError::Missing {
                // RFC 6750 3.1: no error code when the request carried no credentials.
                "Bearer realm=\"tributary\""
            } else {
                "Bearer realm=\"tributary\", error=\"invalid_token\""
            }),
            retry_after: None,
            close: false,
        }
    }
}

impl From<NhsNumberError> for ApiError {
    fn from(e: NhsNumberError) -> Self {
        Self::bad_request(format!("invalid NHS number: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = fhir_response(self.status, &operation_outcome(&self.issues));
        if let Some(challenge) = self.challenge {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.close {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

fn fhir_response(status: StatusCode, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = (status, bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Outermost layer: request id, trace context, content negotiation, a span, one log line
/// and the request metrics per request.
async fn envelope(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // The gateway's own id names the request in audit records and Bundles; a caller's id
    // is only echoed back (as a correlation id), never trusted.
    let request_id = new_request_id();
    let correlation = request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| {
            v.len() <= 64
                && v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        })
        .cloned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = request.method().clone();
    let span = telemetry::request_span(method.as_str(), &route, &request_id);
    let incoming = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let trace = telemetry::join_trace(&span, incoming);

    let mut response = match negotiate(request.headers(), request.uri().query()) {
        Err(e) => e.into_response(),
        Ok(()) => {
            let mut request = request;
            let target = request
                .uri()
                .path_and_query()
                .map_or("", |pq| pq.as_str())
                .to_owned();
            request
                .extensions_mut()
                .insert(RequestId(request_id.clone(), target));
            telemetry::with_request_trace(trace, next.run(request))
                .instrument(span.clone())
                .await
        }
    };
    if !is_fhir(&response) {
        response = outcome_for_plain(response);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    if let Some(v) = correlation {
        response.headers_mut().insert(CORRELATION_ID, v);
    }
    if let Ok(v) = HeaderValue::from_str(&trace.header()) {
        response.headers_mut().insert(TRACERESPONSE, v);
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    crate::metrics::global().request(&route, status, elapsed);
    span.record("http.response.status_code", status);
    span.in_scope(|| {
        info!(
            status,
            duration_ms = elapsed.as_secs_f64() * 1e3,
            "Request completed."
        )
    });
    response
}

fn is_fhir(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == FHIR_JSON.as_bytes())
}

/// An answer that did not come from a handler (axum's own rejections: body too large, bad
/// UTF-8 in the path, a malformed form, ...) becomes an OperationOutcome with the same
/// status. Its plain-text reason is dropped, not echoed: it may quote the request.
fn outcome_for_plain(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (code, text) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "too-long",
            "the request body is larger than this server accepts",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "too-long",
            "the request headers are larger than this server accepts",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "not-supported",
            "the request body's media type is not accepted here",
        ),
        StatusCode::NOT_FOUND => ("not-supported", "no such endpoint: see GET /fhir/metadata"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "not-supported",
            "this method is not served on this endpoint (reads are GET, search by POST is _search): see GET /fhir/metadata",
        ),
        s if s.is_client_error() => (
            "invalid",
            "the request could not be read: the path, query, headers and body must be well formed and UTF-8",
        ),
        _ => ("exception", "the request failed inside the gateway"),
    };
    let mut out = ApiError::new(status, code, text).into_response();
    for name in [header::RETRY_AFTER, header::ALLOW] {
        if let Some(v) = response.headers().get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}

fn new_request_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone)]
/// The gateway's id for the request, and the request's path and query (for self links).
struct RequestId(String, String);

/// 406 unless the caller accepts FHIR JSON (by `Accept` or `_format`).
fn negotiate(headers: &HeaderMap, query: Option<&str>) -> Result<(), ApiError> {
    const JSON_TYPES: [&str; 5] = [
        "application/fhir+json",
        "application/json",
        "application/json+fhir",
        "json",
        "*/*",
    ];
    if let Some(format) = query.and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "_format")
            .map(|(_, v)| v.into_owned())
    }) {
        return if JSON_TYPES.contains(&format.as_str()) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::NOT_ACCEPTABLE,
                "not-supported",
                "only JSON is served: use _format=json or application/fhir+json",
            ))
        };
    }
    let accepts = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>();
    if accepts.is_empty() {
        return Ok(());
    }
    let ok = accepts.iter().flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        !refused && (JSON_TYPES.contains(&media.as_str()) || media == "application/*")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "only application/fhir+json is served",
        ))
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-supported",
        "no such endpoint: see GET /fhir/metadata",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "this method is not served on this endpoint (reads are GET, search by POST is _search): see GET /fhir/metadata",
    )
}

async fn metadata(State(f): State<Facade>) -> Response {
    fhir_response(StatusCode::OK, &capability_statement(&f.base_url))
}

/// What the caller asked for beyond the resource: its preferences and headers.
struct Asked {
    principal: Principal,
    deadline: Instant,
    strict: bool,
    break_glass: Option<String>,
    relationship_claim: Option<String>,
    /// Said in the answer's OperationOutcome (e.g. that the wait was raised to the floor,
    /// [`crate::config::Budget::wait_floor`]).
    notes: Vec<Issue>,
}

impl Facade {
    /// Authenticates and reads the caller's preferences; the first thing every data route does.
    fn asked(&self, headers: &HeaderMap) -> Result<Asked, ApiError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().map_err(|_| AuthError::Malformed))
            .transpose()?;
        let principal = self.verifier.verify_header(authorization)?;
        // After authentication (the limits are per token) and before any upstream work.
        if let Err((scope, wait)) = self.limits.check(&principal.sub, principal.org.as_str()) {
            crate::metrics::global().rate_limited(scope.as_str());
            // debug: the metric counts refusals, and one line per 429 would flood the log.
            debug!(scope = scope.as_str(), "Rate limited.");
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                format!(
                    "too many requests from this {}: try again after the time in Retry-After",
                    match scope {
                        crate::ratelimit::Scope::Sub => "user",
                        crate::ratelimit::Scope::Org => "organisation",
                    }
                ),
            );
            err.retry_after = Some(retry_after_secs(wait));
            return Err(err);
        }
        let prefer = Prefer::parse(headers)?;
        let budget = &self.gateway.budget;
        let mut notes = Vec::new();
        // With the floor the answer carries what the cache and the fastest sources have, and
        // its OperationOutcome says the wait was raised.
        let floor = budget.wait_floor();
        let wait = match prefer.wait {
            None => budget.default,
            Some(w) if w < floor => {
                notes.push(Issue::new(
                    "information",
                    "informational",
                    format!(
                        "Prefer: wait={} was raised to {} ms, the least time the gateway gives a request",
                        w.as_secs(),
                        floor.as_millis()
                    ),
                ));
                floor
            }
            Some(w) => w.min(budget.max),
        };
        Ok(Asked {
            principal,
            deadline: Instant::now() + wait,
            strict: prefer.strict,
            break_glass: reason(headers, BREAK_GLASS)?,
            relationship_claim: reason(headers, RELATIONSHIP)?,
            notes,
        })
    }
}

/// A stated reason header: absent is fine, present must say something.
fn reason(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::bad_request(format!("{name} must be plain text")))?
        .trim();
    if text.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{name} needs a stated reason; it was empty"
        )));
    }
    if text.len() > MAX_REASON {
        return Err(ApiError::bad_request(format!(
            "{name} is longer than {MAX_REASON} bytes"
        )));
    }
    Ok(Some(text.to_owned()))
}

/// RFC 7240 preferences the facade honours.
#[derive(Debug, Default, PartialEq)]
struct Prefer {
    wait: Option<Duration>,
    strict: bool,
}

impl Prefer {
    fn parse(headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut prefer = Self::default();
        for value in headers.get_all("prefer") {
            let value = value
                .to_str()
                .map_err(|_| ApiError::bad_request("Prefer must be plain text"))?;
            for token in value.split(',') {
                let pref = token.split(';').next().unwrap_or_default().trim();
                let (name, val) = pref
                    .split_once('=')
                    .map_or((pref, ""), |(n, v)| (n.trim(), v.trim().trim_matches('"')));
                match name.to_ascii_lowercase().as_str() {
                    "wait" => {
                        let secs: u64 = val.parse().map_err(|_| {
                            ApiError::bad_request("Prefer: wait takes a whole number of seconds")
                        })?;
                        prefer.wait = Some(Duration::from_secs(secs));
                    }
                    "handling" => prefer.strict = val.eq_ignore_ascii_case("strict"),
                    _ => {}
                }
            }
        }
        Ok(prefer)
    }
}

/// Query parameters, with the ones a route understands taken out and the rest left over.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(query: Option<&str>) -> Self {
        Self(
            url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// Takes a parameter's single value; repeating it is a 400.
    pub(crate) fn take(&mut self, name: &str) -> Result<Option<String>, ApiError> {
        let values: Vec<String> = self
            .0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect();
        self.0.retain(|(k, _)| k != name);
        match values.len() {
            0 => Ok(None),
            1 => Ok(values.into_iter().next()),
            _ => Err(ApiError::bad_request(format!(
                "parameter {name} is given more than once"
            ))),
        }
    }

    /// Unsupported parameters: a 400 under `Prefer: handling=strict`, otherwise warnings
    /// (FHIR's lenient default).
    pub(crate) fn leftovers(mut self, strict: bool) -> Result<Vec<Issue>, ApiError> {
        self.0.retain(|(k, _)| k != "_format");
        let names: Vec<String> = self
            .0
            .into_iter()
            .map(|(k, _)| printable_name(&k))
            .collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        if strict {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "not-supported",
                format!("unsupported search parameters: {}", names.join(", ")),
            ));
        }
        Ok(names
            .into_iter()
            .map(|n| {
                Issue::new(
                    "warning",
                    "not-supported",
                    format!("search parameter {n} is not supported and was ignored"),
                )
            })
            .collect())
    }
}

/// A parameter name fit to echo back (names are the caller's, so keep them tame).
pub(crate) fn printable_name(name: &str) -> String {
    if !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_:.-".contains(&b))
    {
        format!("`{name}`")
    } else {
        "(unprintable name)".to_owned()
    }
}

/// `Patient/NNN`, or the bare number.
pub(crate) fn patient_reference(value: &str) -> Result<NhsNumber, ApiError> {
    let id = value.strip_prefix("Patient/").unwrap_or(value);
    Ok(NhsNumber::parse(id)?)
}

/// `https://fhir.nhs.uk/Id/nhs-number|NNN`, `|NNN` or `NNN`.
pub(crate) fn nhs_token(value: &str) -> Result<NhsNumber, ApiError> {
    let (system, number) = value.rsplit_once('|').unwrap_or(("", value));
    if !system.is_empty() && system != NHS_NUMBER_SYSTEM {
        return Err(ApiError::bad_request(format!(
            "only NHS number identifiers ({NHS_NUMBER_SYSTEM}) are searchable"
        )));
    }
    Ok(NhsNumber::parse(number)?)
}

async fn patient_search(
    State(f): State<Facade>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    req: axum::Extension<RequestId>,
) -> Result<Response, ApiError> {
    let asked = f.asked(&headers)?;
    let mut params = Params::parse(q.as_deref());
    let nhs = match (params.take("identifier")?, params.take("_id")?) {
        (Some(token), None) => nhs_token(&token)?,
        (None, Some(id)) => NhsNumber::parse(&id)?,
        _ => {
            return Err(ApiError::bad_request(format!(
                "search Patient by exactly one of identifier={NHS_NUMBER_SYSTEM}|{{nhs-number}} or _id={{nhs-number}}"
            )));
        }
    };
    let mut warnings = params.leftovers(asked.strict)?;
    warnings.extend(asked.notes.iter().cloned());
    let answer = f
        .run(
            &asked,
            nhs,
            vec![ResourceType::Patient],
            &req.0.0,
            "Patient.search",
        )
        .await?;
    let self_url = f.self_link(&req.0);
    match answer {
        Answer::Unknown => Ok(fhir_response(
            StatusCode::OK,
            &searchset(
                &req.0.0,
                &f.base_url,
                &self_url,
                Vec::new(),
                &[Issue::new(
                    "information",
                    "not-found",
                    "no source knows a patient with this NHS number",
                )],
            ),
        )),
        other => f.bundle(other, &req.0.0, &self_url, warnings),
    }
}

async fn patient_read(
    State(f): State<Facade>,
    headers: HeaderMap,
    Path(id): Path<String>,
    req: axum::Extension<RequestId>,
) -> Result<Response, ApiError> {
    let asked = f.asked(&headers)?;
    let nhs = NhsNumber::parse(&id)?;
    match f
        .run(
            &asked,
            nhs,
            vec![ResourceType::Patient],
            &req.0.0,
            "Patient.read",
        )
        .await?
    {
        Answer::Record { released, .. } => match released.into_iter().next() {
            Some(patient) => Ok(fhir_response(StatusCode::OK, &patient.resource)),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this patient's record is not available to you under sharing policy",
            )),
        },
        Answer::Unknown => Err(unknown_patient()),
        Answer::Unavailable { outcomes } => Err(unavailable(&outcomes)),
    }
}

async fn everything(
    State(f): State<Facade>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    req: axum::Extension<RequestId>,
) -> Result<Response, ApiError> {
    let asked = f.asked(&headers)?;
    let nhs = NhsNumber::parse(&id)?;
    let mut params = Params::parse(q.as_deref());
    let types = match params.take("_type")? {
        None => ResourceType::ALL.to_vec(),
        Some(list) => list
            .split(',')
            .map(|t| {
                ResourceType::parse(t.trim()).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "_type: {} is not a type this server holds",
                        printable_name(t.trim())
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
    };
    let mut warnings = params.leftovers(asked.strict)?;
    warnings.extend(asked.notes.iter().cloned());
    let self_url = f.self_link(&req.0);
    let answer = f
        .run(&asked, nhs, types, &req.0.0, "Patient.$everything")
        .await?;
    f.bundle(answer, &req.0.0, &self_url, warnings)
}

async fn type_search(
    State(f): State<Facade>,
    headers: HeaderMap,
    Path(ty): Path<String>,
    RawQuery(q): RawQuery,
    req: axum::Extension<RequestId>,
) -> Result<Response, ApiError> {
    search_type(f, &headers, None, ty, Params::parse(q.as_deref()), req.0).await
}

/// FHIR search by POST: `application/x-www-form-urlencoded` parameters in the body.
async fn type_search_post(
    State(f): State<Facade>,
    headers: HeaderMap,
    Path(ty): Path<String>,
    req: axum::Extension<RequestId>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    // Who is asking, and within their rate, before any of the body is read: an anonymous or
    // throttled caller must not hold a load-shed permit while it trickles a body.
    let asked = f.asked(&headers).map_err(ApiError::closing)?;
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    if !form {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "search by POST takes application/x-www-form-urlencoded parameters",
        )
        .closing());
    }
    let body = f
        .read_body(&headers, body)
        .await
        .map_err(ApiError::closing)?;
    let body = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the form body is not UTF-8"))?;
    search_type(
        f,
        &headers,
        Some(asked),
        ty,
        Params::parse(Some(body)),
        req.0,
    )
    .await
}

/// A type search by GET or POST; `asked` is the caller when the handler has already
/// authenticated it (POST does so before reading its body).
async fn search_type(
    f: Facade,
    headers: &HeaderMap,
    asked: Option<Asked>,
    ty: String,
    mut params: Params,
    req: RequestId,
) -> Result<Response, ApiError> {
    let Some(resource_type) = ResourceType::parse(&ty) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            format!(
                "resource type {} is not served: see GET /fhir/metadata",
                printable_name(&ty)
            ),
        ));
    };
    if resource_type == ResourceType::Patient {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "search Patient with GET /fhir/Patient?identifier=...",
        ));
    }
    let asked = match asked {
        Some(asked) => asked,
        None => f.asked(headers)?,
    };
    let nhs = match (params.take("patient")?, params.take("patient:identifier")?) {
        (Some(reference), None) => patient_reference(&reference)?,
        (None, Some(token)) => nhs_token(&token)?,
        _ => {
            return Err(ApiError::bad_request(format!(
                "search {ty} with exactly one of patient={{nhs-number}} or patient:identifier={NHS_NUMBER_SYSTEM}|{{nhs-number}}"
            )));
        }
    };
    let mut warnings = params.leftovers(asked.strict)?;
    warnings.extend(asked.notes.iter().cloned());
    let self_url = f.self_link(&req);
    let answer = f
        .run(&asked, nhs, vec![resource_type], &req.0, "search-type")
        .await?;
    f.bundle(answer, &req.0, &self_url, warnings)
}

fn unknown_patient() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no source knows a patient with this NHS number",
    )
}

/// Nobody who answered knows the patient, and some did not answer: a gateway failure, named.
fn unavailable(outcomes: &[SourceOutcome]) -> ApiError {
    let timed_out = outcomes
        .iter()
        .any(|o| matches!(o.outcome, Outcome::TimedOut));
    let mut issues = vec![Issue::new(
        "error",
        if timed_out { "timeout" } else { "transient" },
        "the patient was not found at the sources that answered, and some sources did not answer: try again",
    )];
    issues.extend(source_issues(outcomes));
    ApiError {
        status: if timed_out {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        },
        issues,
        challenge: None,
        retry_after: None,
        close: false,
    }
}

/// One issue per source that did not answer in full, naming it by ODS code.
fn source_issues(outcomes: &[SourceOutcome]) -> Vec<Issue> {
    outcomes
        .iter()
        .filter_map(|o| {
            o.outcome.shortfall().map(|why| {
                let code = if matches!(o.outcome, Outcome::TimedOut) {
                    "timeout"
                } else {
                    "incomplete"
                };
                Issue::new(
                    "warning",
                    code,
                    format!(
                        "{} {} ({}): {why}",
                        o.source.ods,
                        o.source.name,
                        o.source.kind.as_str()
                    ),
                )
            })
        })
        .collect()
}

impl Facade {
    /// Reads a request body of at most `max_body_bytes` (413 past it), which must arrive in
    /// full within `body_timeout` (408 otherwise): a client trickling its body holds nothing
    /// for long.
    async fn read_body(
        &self,
        headers: &HeaderMap,
        body: axum::body::Body,
    ) -> Result<axum::body::Bytes, ApiError> {
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-long",
                format!(
                    "the request body is larger than {} bytes",
                    self.max_body_bytes
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        match tokio::time::timeout(
            self.body_timeout,
            axum::body::to_bytes(body, self.max_body_bytes),
        )
        .await
        {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => {
                if e.into_inner().is::<http_body_util::LengthLimitError>() {
                    Err(too_large())
                } else {
                    Err(ApiError::bad_request("the request body could not be read"))
                }
            }
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request body did not arrive in time",
            )),
        }
    }

    async fn run(
        &self,
        asked: &Asked,
        nhs: NhsNumber,
        types: Vec<ResourceType>,
        request_id: &str,
        action: &str,
    ) -> Result<Answer, ApiError> {
        let query = FederatedQuery {
            nhs_number: nhs,
            types,
            deadline: asked.deadline,
            principal: &asked.principal,
            break_glass: asked.break_glass.as_deref(),
            relationship_claim: asked.relationship_claim.as_deref(),
            request_id,
            action,
        };
        self.gateway.query(&query).await.map_err(|e| match e {
            QueryError::Audit(e) => {
                error!(error = %e, "Audit write failed; releasing nothing.");
                let mut err = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transient", "the audit trail cannot be written, so nothing can be released: try again later");
                err.issues[0].severity = "fatal";
                err
            }
            QueryError::Denied(denied) => {
                tracing::info!(code = denied.code(), "Refused by policy.");
                match denied {
                    Denied::BreakGlassWithoutReason => ApiError::bad_request(denied.to_string()),
                    Denied::Internal => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", denied.to_string()),
                    _ => ApiError::new(StatusCode::FORBIDDEN, "forbidden", denied.to_string()),
                }
            }
        })
    }

    /// The URL the caller asked, on the public base URL (`Bundle.link` self). The path and
    /// query come from the request line, so they are already percent-encoded as sent.
    fn self_link(&self, req: &RequestId) -> String {
        let origin = self
            .base_url
            .strip_suffix("/fhir")
            .unwrap_or(&self.base_url);
        let path = req.1.strip_prefix("/fhir").unwrap_or(&req.1);
        // Characters RFC 3986 allows nowhere in a URI (clients send `|` raw in tokens).
        const NOT_IN_URIS: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
            .add(b' ')
            .add(b'"')
            .add(b'<')
            .add(b'>')
            .add(b'\\')
            .add(b'^')
            .add(b'`')
            .add(b'{')
            .add(b'|')
            .add(b'}');
        format!(
            "{origin}/fhir{}",
            percent_encoding::utf8_percent_encode(path, NOT_IN_URIS)
        )
    }

    /// The searchset for an answer; an unknown patient is a 404, an unavailable one a 502/504.
    fn bundle(
        &self,
        answer: Answer,
        request_id: &str,
        self_url: &str,
        warnings: Vec<Issue>,
    ) -> Result<Response, ApiError> {
        let (released, outcomes, withheld_any) = match answer {
            Answer::Record {
                released,
                outcomes,
                withheld_any,
            } => (released, outcomes, withheld_any),
            Answer::Unavailable { outcomes } => return Err(unavailable(&outcomes)),
            Answer::Unknown => return Err(unknown_patient()),
        };
        let mut issues = source_issues(&outcomes);
        if withheld_any {
            issues.push(Issue::new(
                "information",
                "suppressed",
                "some information was withheld under the sharing policy",
            ));
        }
        issues.extend(warnings);
        if issues.is_empty() {
            issues.push(Issue::new(
                "information",
                "informational",
                format!("all {} sources asked answered in full", outcomes.len()),
            ));
        }
        let matches = released.into_iter().map(|c| c.resource).collect();
        Ok(fhir_response(
            StatusCode::OK,
            &searchset(request_id, &self.base_url, self_url, matches, &issues),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn prefer_wait_and_handling_are_read_from_any_prefer_header() {
        let p = Prefer::parse(&headers(&[
            ("prefer", "return=minimal, wait=3"),
            ("prefer", "handling=strict"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            Prefer {
                wait: Some(Duration::from_secs(3)),
                strict: true
            }
        );
        assert!(Prefer::parse(&headers(&[("prefer", "wait=soon")])).is_err());
        assert_eq!(Prefer::parse(&HeaderMap::new()).unwrap(), Prefer::default());
    }

    #[test]
    fn negotiation_accepts_json_and_refuses_xml() {
        assert!(negotiate(&HeaderMap::new(), None).is_ok());
        assert!(negotiate(&headers(&[("accept", "application/fhir+json")]), None).is_ok());
        assert!(negotiate(&headers(&[("accept", "text/html, */*;q=0.8")]), None).is_ok());
        assert!(negotiate(&headers(&[("accept", "application/fhir+xml")]), None).is_err());
        assert!(negotiate(&headers(&[("accept", "application/json;q=0")]), None).is_err());
        assert!(negotiate(&headers(&[("accept", "application/json;q=0.0")]), None).is_err());
        assert!(negotiate(&HeaderMap::new(), Some("_format=xml")).is_err());
        assert!(
            negotiate(
                &headers(&[("accept", "application/xml")]),
                Some("_format=json")
            )
            .is_ok()
        );
    }

    #[tokio::test]
    async fn plain_rejections_become_outcomes_without_quoting_the_request() {
        let plain = (
            StatusCode::BAD_REQUEST,
            "Invalid URL: Cannot parse `9434765919\u{fffd}`",
        )
            .into_response();
        let out = outcome_for_plain(plain);
        assert_eq!(out.status(), StatusCode::BAD_REQUEST);
        assert!(is_fhir(&out));
        let body = axum::body::to_bytes(out.into_body(), 1 << 16)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("\"OperationOutcome\"") && text.contains("\"invalid\""));
        assert!(!text.contains("9434765919"), "{text}");

        let too_large = outcome_for_plain(StatusCode::PAYLOAD_TOO_LARGE.into_response());
        assert_eq!(too_large.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(is_fhir(&too_large));
        let ok = outcome_for_plain((StatusCode::OK, "fine").into_response());
        assert!(!is_fhir(&ok), "only errors are rewritten");
    }

    #[test]
    fn reasons_must_be_stated() {
        assert_eq!(
            reason(
                &headers(&[("x-break-glass", "cardiac arrest in ED")]),
                BREAK_GLASS
            )
            .unwrap()
            .as_deref(),
            Some("cardiac arrest in ED")
        );
        assert!(reason(&headers(&[("x-break-glass", "   ")]), BREAK_GLASS).is_err());
        assert!(reason(&HeaderMap::new(), BREAK_GLASS).unwrap().is_none());
    }

    #[test]
    fn nhs_tokens_and_references_parse_and_refuse_other_systems() {
        assert!(nhs_token("https://fhir.nhs.uk/Id/nhs-number|9434765919").is_ok());
        assert!(nhs_token("9434765919").is_ok());
        assert!(nhs_token("http://example.org/mrn|9434765919").is_err());
        assert!(nhs_token("https://fhir.nhs.uk/Id/nhs-number|9434765918").is_err());
        assert!(patient_reference("Patient/9434765919").is_ok());
    }

    #[test]
    fn leftover_parameters_warn_when_lenient_and_refuse_when_strict() {
        let lenient = Params::parse(Some("_count=5&_format=json"))
            .leftovers(false)
            .unwrap();
        assert_eq!(
            lenient.len(),
            1,
            "_format is understood; _count is reported"
        );
        let mut p = Params::parse(Some("patient=1&_count=5"));
        p.take("patient").unwrap();
        assert_eq!(p.leftovers(false).unwrap().len(), 1);
        let mut p = Params::parse(Some("patient=1&_count=5"));
        p.take("patient").unwrap();
        assert!(p.leftovers(true).is_err());
        assert!(
            Params::parse(Some("patient=1&patient=2"))
                .take("patient")
                .is_err()
        );
    }
}
