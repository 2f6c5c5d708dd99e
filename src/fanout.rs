//! Fan-out: every planned source is asked in parallel, each through its own tower stack, and
//! every call ends by the request's deadline.
//!
//! # Why a deadline and not a timeout per source
//! A clinician waits for the whole record, not for one source. Each request carries one
//! deadline; every source call gets what remains of it less a reserve for merge, policy and
//! audit, so the response can leave on time with whatever has arrived. A call still running
//! at its deadline is dropped (connectors are cancel-safe) and reported as timed out.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use connectors::{Connector, SourceDescriptor, SourceQuery, SourceRecord};
use futures::{FutureExt, future::BoxFuture};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tracing::Instrument;

use crate::{
    outcome::{Outcome, SourceOutcome},
    telemetry,
    upstreams::SourceStats,
};

/// One call to one source: the query and the instant by which it must be over.
#[derive(Debug, Clone)]
pub struct SourceCall {
    pub query: SourceQuery,
    pub deadline: Instant,
}

/// A source's whole stack, outermost layer first.
pub type SourceService = BoxCloneSyncService<SourceCall, SourceRecord, BoxError>;

/// Per-source settings for the stack.
#[derive(Debug, Clone, Copy)]
pub struct StackSettings {
    /// Calls in flight to this source at once; more wait (within their deadline).
    pub max_concurrency: usize,
}

impl Default for StackSettings {
    fn default() -> Self {
        Self {
            max_concurrency: 64,
        }
    }
}

/// A source the gateway can call: who it is and its stack.
#[derive(Clone)]
pub struct Source {
    pub descriptor: Arc<SourceDescriptor>,
    pub service: SourceService,
    /// Live statistics for `/admin/upstreams` and `/metrics`.
    pub stats: Arc<SourceStats>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("id", &self.descriptor.id)
            .finish_non_exhaustive()
    }
}

impl Source {
    /// Builds a source's stack, outermost first: deadline -> concurrency limit -> connector.
    /// The budget issue adds cache, breaker and hedge above the deadline.
    pub fn new(connector: Arc<dyn Connector>, settings: StackSettings) -> Self {
        let descriptor = Arc::new(connector.descriptor().clone());
        let service = ServiceBuilder::new()
            .layer_fn(DeadlineService)
            .concurrency_limit(settings.max_concurrency)
            .service(ConnectorService(connector));
        Self {
            stats: Arc::new(SourceStats::new(descriptor.clone())),
            descriptor,
            service: BoxCloneSyncService::new(service),
        }
    }

    /// Calls the source; never fails and never outlives `deadline`. The call is a
    /// `source_call` span, counted in this source's statistics, and carries the trace context
    /// upstream.
    pub async fn call(&self, query: SourceQuery, deadline: Instant) -> SourceOutcome {
        let span = telemetry::source_call_span(&self.descriptor);
        let query = query.with_trace_context(telemetry::traceparent_for(&span));
        let flight = self.stats.begin();
        let started = Instant::now();
        let result = self
            .service
            .clone()
            .oneshot(SourceCall { query, deadline })
            .instrument(span.clone())
            .await;
        let outcome = SourceOutcome {
            source: self.descriptor.clone(),
            outcome: Outcome::from_result(result),
            elapsed: started.elapsed(),
        };
        telemetry::finish_source_call(&span, &outcome);
        flight.finish(&outcome);
        outcome
    }
}

/// The innermost service: hands the query to the connector.
#[derive(Clone)]
struct ConnectorService(Arc<dyn Connector>);

impl Service<SourceCall> for ConnectorService {
    type Response = SourceRecord;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<SourceRecord, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: SourceCall) -> Self::Future {
        self.0
            .fetch(call.query)
            .map(|r| r.map_err(BoxError::from))
            .boxed()
    }
}

/// Ends the call (waiting for capacity included) at the call's deadline with
/// `tokio::time::error::Elapsed`.
#[derive(Clone)]
struct DeadlineService<S>(S);

impl<S> Service<SourceCall> for DeadlineService<S>
where
    S: Service<SourceCall, Response = SourceRecord, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = SourceRecord;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<SourceRecord, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness of the inner stack is awaited inside the call, under the deadline.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: SourceCall) -> Self::Future {
        let inner = self.0.clone();
        let deadline = call.deadline;
        async move {
            match tokio::time::timeout_at(deadline, inner.oneshot(call)).await {
                Ok(result) => result,
                Err(elapsed) => Err(BoxError::from(elapsed)),
            }
        }
        .boxed()
    }
}

/// Asks every source in parallel; returns one outcome per source, in the order given, by
/// `deadline` at the latest.
pub async fn fan_out(
    sources: &[Source],
    query: &SourceQuery,
    deadline: Instant,
) -> Vec<SourceOutcome> {
    futures::future::join_all(sources.iter().map(|s| s.call(query.clone(), deadline))).await
}

/// The deadline for upstream calls: the request's deadline less the reserve for merge,
/// policy and audit, but never in the past.
pub fn upstream_deadline(request_deadline: Instant, reserve: Duration) -> Instant {
    request_deadline
        .checked_sub(reserve)
        .map_or(request_deadline, |d| d.max(Instant::now()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use connectors::{ConnectorError, ConnectorKind, NhsNumber, OdsCode, SourceKind};

    use super::*;

    /// A connector whose answer is scripted: a delay, then a result.
    struct Scripted {
        descriptor: SourceDescriptor,
        delay: Duration,
        fail: bool,
        calls: Arc<AtomicUsize>,
    }

    impl Connector for Scripted {
        fn descriptor(&self) -> &SourceDescriptor {
            &self.descriptor
        }

        fn fetch(
            &self,
            _q: SourceQuery,
        ) -> BoxFuture<'static, Result<SourceRecord, ConnectorError>> {
            let (delay, fail) = (self.delay, self.fail);
            self.calls.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                if fail {
                    Err(ConnectorError::Status { status: 503 })
                } else {
                    Ok(SourceRecord {
                        resources: vec![serde_json::json!({"resourceType": "Patient", "id": "p"})],
                    })
                }
            }
            .boxed()
        }
    }

    fn source(id: &str, delay_ms: u64, fail: bool, max_concurrency: usize) -> Source {
        let connector = Scripted {
            descriptor: SourceDescriptor {
                id: id.into(),
                ods: OdsCode::new(id.to_uppercase()),
                name: id.into(),
                kind: SourceKind::Trust,
                connector: ConnectorKind::Fhir,
                endpoint: "test".into(),
            },
            delay: Duration::from_millis(delay_ms),
            fail,
            calls: Arc::default(),
        };
        Source::new(Arc::new(connector), StackSettings { max_concurrency })
    }

    fn query() -> SourceQuery {
        SourceQuery::everything(NhsNumber::parse("9434765919").unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn slow_source_times_out_at_the_deadline_while_others_answer() {
        let sources = [
            source("fast", 10, false, 4),
            source("slow", 5_000, false, 4),
            source("bad", 5, true, 4),
        ];
        let start = Instant::now();
        let outcomes = fan_out(&sources, &query(), start + Duration::from_millis(500)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "returns exactly at the deadline"
        );
        let codes: Vec<_> = outcomes.iter().map(|o| o.outcome.code()).collect();
        assert_eq!(codes, ["answered", "timeout", "status"]);
    }

    #[tokio::test(start_paused = true)]
    async fn all_fast_sources_return_before_the_deadline() {
        let sources = [source("a", 10, false, 4), source("b", 30, false, 4)];
        let start = Instant::now();
        let outcomes = fan_out(&sources, &query(), start + Duration::from_secs(2)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(30),
            "the slowest source, not the deadline"
        );
        assert!(outcomes.iter().all(|o| o.outcome.is_answered()));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_capacity_counts_against_the_deadline() {
        let s = source("narrow", 400, false, 1);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(600);
        let (first, second) = tokio::join!(s.call(query(), deadline), s.call(query(), deadline));
        assert!(first.outcome.is_answered());
        assert_eq!(
            second.outcome.code(),
            "timeout",
            "second call waited 400 ms for a permit then ran out"
        );
        assert_eq!(start.elapsed(), Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_deadline_keeps_the_reserve_and_never_goes_back_in_time() {
        let now = Instant::now();
        assert_eq!(
            upstream_deadline(now + Duration::from_secs(2), Duration::from_millis(100)),
            now + Duration::from_millis(1900)
        );
        assert_eq!(
            upstream_deadline(now + Duration::from_millis(50), Duration::from_millis(100)),
            now
        );
    }
}
