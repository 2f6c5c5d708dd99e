//! What one source contributed to one request: the only place where a stack's `BoxError` is
//! taken apart (downcast) into a per-source outcome the rest of the gateway can reason about.

use std::{sync::Arc, time::Duration};

use connectors::{ConnectorError, SourceDescriptor, SourceRecord};
use tower::BoxError;

use crate::{breaker::BreakerOpen, cache::SharedError};

/// One source's result for one request.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The source answered (possibly with no resources: it does not know the patient).
    Answered(SourceRecord),
    /// The source did not answer before the request's deadline; the call was cancelled.
    TimedOut,
    /// The source failed with a classified error.
    Failed(ConnectorError),
    /// The gateway had no capacity left for this source (its concurrency limit was full).
    Shed,
    /// The source was not asked: its breaker is open after repeated failures.
    BreakerOpen,
    /// The gateway failed internally while calling this source.
    Internal(String),
}

impl Outcome {
    /// Turns a stack's result into an outcome: the single downcast boundary.
    pub fn from_result(result: Result<SourceRecord, BoxError>) -> Self {
        match result {
            Ok(record) => Self::Answered(record),
            Err(err) => Self::from_error(err),
        }
    }

    fn from_error(err: BoxError) -> Self {
        Self::classify(err.as_ref())
    }

    /// Classifies by reference, looking through the cache's shared error (the callers of a
    /// coalesced miss share one error).
    fn classify(err: &(dyn std::error::Error + Send + Sync + 'static)) -> Self {
        if let Some(shared) = err.downcast_ref::<SharedError>() {
            return Self::classify(shared.0.as_ref().as_ref());
        }
        if err.is::<tower::timeout::error::Elapsed>() || err.is::<tokio::time::error::Elapsed>() {
            return Self::TimedOut;
        }
        if err.is::<tower::load_shed::error::Overloaded>() {
            return Self::Shed;
        }
        if err.is::<BreakerOpen>() {
            return Self::BreakerOpen;
        }
        match err.downcast_ref::<ConnectorError>() {
            Some(e) => Self::Failed(e.clone()),
            None => Self::Internal(err.to_string()),
        }
    }

    /// A stable code for logs, metrics and the admin page.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Answered(_) => "answered",
            Self::TimedOut => "timeout",
            Self::Failed(e) => e.code(),
            Self::Shed => "shed",
            Self::BreakerOpen => "breaker_open",
            Self::Internal(_) => "internal",
        }
    }

    pub fn is_answered(&self) -> bool {
        matches!(self, Self::Answered(_))
    }

    /// What the OperationOutcome tells the clinician about a source that did not answer in
    /// full; `None` for an answer.
    pub fn shortfall(&self) -> Option<String> {
        match self {
            Self::Answered(_) => None,
            Self::TimedOut => Some("did not answer within the time allowed (timeout)".to_owned()),
            Self::Failed(e) => Some(format!("failed: {e} ({})", e.code())),
            Self::Shed => {
                Some("not asked: the gateway was at capacity for this source (shed)".to_owned())
            }
            Self::BreakerOpen => Some(
                "not asked: the source failed repeatedly and is being given time to recover (breaker open)"
                    .to_owned(),
            ),
            Self::Internal(_) => Some("failed: internal gateway error (internal)".to_owned()),
        }
    }
}

/// Whether a stack's error says the source is unhealthy, for its breaker: it could not be
/// reached, failed the TLS handshake, broke the connection, answered 5xx or 429, sent garbage,
/// redirected (a redirect is never followed, so asking again only loops), or did not answer in
/// time. A 4xx, a rejected query or a patient mismatch is the source working as designed.
pub fn counts_against_source(err: &BoxError) -> bool {
    match Outcome::classify(err.as_ref()) {
        Outcome::TimedOut => true,
        Outcome::Failed(e) => {
            e.is_retryable()
                || matches!(
                    e,
                    ConnectorError::Malformed(_)
                        | ConnectorError::Tls(_)
                        | ConnectorError::Redirected { .. }
                )
        }
        Outcome::Answered(_) | Outcome::Shed | Outcome::BreakerOpen | Outcome::Internal(_) => false,
    }
}

/// A source's outcome with who it was and how long it took.
#[derive(Debug, Clone)]
pub struct SourceOutcome {
    pub source: Arc<SourceDescriptor>,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use connectors::tls::TlsFailure;

    use super::*;

    #[test]
    fn a_tls_failure_names_its_reason_and_counts_against_the_source() {
        for (failure, words) in [
            (TlsFailure::UnknownIssuer, "(unknown issuer)"),
            (TlsFailure::Expired, "(expired)"),
            (TlsFailure::NameMismatch, "(name mismatch)"),
            (
                TlsFailure::ClientCertRequired,
                "(client certificate required)",
            ),
            (
                TlsFailure::ClientCertRejected,
                "(client certificate rejected)",
            ),
        ] {
            let err: BoxError = Box::new(ConnectorError::Tls(failure));
            assert!(counts_against_source(&err));
            let outcome = Outcome::from_result(Err(err));
            assert_eq!(outcome.code(), "tls");
            let text = outcome.shortfall().unwrap();
            assert!(
                text.contains(words) && text.ends_with("(tls)"),
                "{failure:?}: {text}"
            );
        }
    }

    fn counts(e: ConnectorError) -> bool {
        counts_against_source(&(Box::new(e) as BoxError))
    }

    #[test]
    fn a_redirect_counts_against_its_source_and_a_mismatch_does_not() {
        assert!(counts(ConnectorError::Redirected { status: 302 }));
        assert!(counts(ConnectorError::Malformed("x".into())));
        assert!(!counts(ConnectorError::PatientMismatch));
        let failed =
            Outcome::from_result(Err(Box::new(ConnectorError::Redirected { status: 302 })));
        assert_eq!(failed.code(), "redirect");
        let text = failed.shortfall().unwrap_or_default();
        assert!(text.ends_with("(redirect)"), "{text}");
    }
}
