//! What one source contributed to one request: the only place where a stack's `BoxError` is
//! taken apart (downcast) into a per-source outcome the rest of the gateway can reason about.

use std::{sync::Arc, time::Duration};

use connectors::{ConnectorError, SourceDescriptor, SourceRecord};
use tower::BoxError;

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
        if err.is::<tower::timeout::error::Elapsed>() || err.is::<tokio::time::error::Elapsed>() {
            return Self::TimedOut;
        }
        if err.is::<tower::load_shed::error::Overloaded>() {
            return Self::Shed;
        }
        match err.downcast::<ConnectorError>() {
            Ok(e) => Self::Failed(*e),
            Err(other) => Self::Internal(other.to_string()),
        }
    }

    /// A stable code for logs, metrics and the admin page.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Answered(_) => "answered",
            Self::TimedOut => "timeout",
            Self::Failed(e) => e.code(),
            Self::Shed => "shed",
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
            Self::Internal(_) => Some("failed: internal gateway error (internal)".to_owned()),
        }
    }
}

/// A source's outcome with who it was and how long it took.
#[derive(Debug, Clone)]
pub struct SourceOutcome {
    pub source: Arc<SourceDescriptor>,
    pub outcome: Outcome,
    pub elapsed: Duration,
}
