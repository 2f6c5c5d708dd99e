//! Fan-out: every planned source is asked in parallel, each through its own tower stack, and
//! every call ends by the request's deadline.
//!
//! # Why a deadline and not a timeout per source
//! A clinician waits for the whole record, not for one source. Each request carries one
//! deadline; every source call gets what remains of it less a reserve for merge, policy and
//! audit, so the response can leave on time with whatever has arrived. A call still running
//! at its deadline is dropped (connectors are cancel-safe) and reported as timed out.
//!
//! Each source's stack, outermost first: cache ([`crate::cache`]) -> breaker
//! ([`crate::breaker`]) -> hedge ([`crate::hedge`]) -> deadline -> concurrency limit (the
//! bulkhead: one slow source cannot take every task) -> connector.

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
    breaker::{Breaker, BreakerService, BreakerSettings, BreakerState},
    cache::{AnswerCache, CacheCounters, CacheProbe, CacheService},
    hedge::{HedgeCounters, HedgeService, HedgeSettings, Hedger, KindLatencies},
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

/// What every layer of a source's stack wraps: a cloneable service that turns a call into a
/// raw answer. Named once so each layer (cache, breaker, hedge, deadline) states only its own
/// logic.
pub trait SourceStack:
    Service<SourceCall, Response = SourceRecord, Error = BoxError, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S> SourceStack for S where
    S: Service<SourceCall, Response = SourceRecord, Error = BoxError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// The future every layer returns.
pub type CallFuture = BoxFuture<'static, Result<SourceRecord, BoxError>>;

/// Per-source settings for the stack.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// Calls in flight to this source at once; more wait (within their deadline).
    pub max_concurrency: usize,
    pub breaker: BreakerSettings,
    pub hedge: HedgeSettings,
    /// Latencies pooled per source kind for the hedge (one per gateway: clones share it).
    pub hedge_pools: KindLatencies,
    /// The gateway's answer cache; `None`: this source's answers are never cached.
    pub cache: Option<AnswerCache>,
}

impl Default for StackSettings {
    fn default() -> Self {
        Self {
            max_concurrency: 64,
            breaker: BreakerSettings::default(),
            hedge: HedgeSettings::default(),
            hedge_pools: KindLatencies::default(),
            cache: None,
        }
    }
}

/// What a source's stack has been doing, for `/admin/upstreams` and metrics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceStatus {
    /// `None` when breakers are turned off.
    pub breaker: Option<BreakerState>,
    /// Times the breaker has opened since start.
    pub breaker_opened: u64,
    pub hedge: HedgeCounters,
    pub cache: CacheCounters,
}

/// Handles on a source's stateful layers, to read their state.
#[derive(Clone, Debug)]
struct Probes {
    breaker: Option<Breaker>,
    hedger: Hedger,
    cache: Option<CacheProbe>,
}

/// A source the gateway can call: who it is and its stack.
#[derive(Clone)]
pub struct Source {
    pub descriptor: Arc<SourceDescriptor>,
    pub service: SourceService,
    probes: Probes,
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
    /// Builds a source's stack, outermost first:
    /// cache -> breaker -> hedge -> deadline -> concurrency limit -> connector.
    ///
    /// The cache answers before anything else (a hit costs no upstream call, even with the
    /// breaker open); the breaker refuses before a hedge could double a doomed call; each
    /// hedge leg has its own deadline and waits for its own permit.
    pub fn new(connector: Arc<dyn Connector>, settings: StackSettings) -> Self {
        let descriptor = Arc::new(connector.descriptor().clone());
        let hedger = Hedger::new(settings.hedge, &settings.hedge_pools, descriptor.kind)
            .for_source(descriptor.ods.as_str());
        let timed = ServiceBuilder::new()
            .layer_fn(DeadlineService)
            .concurrency_limit(settings.max_concurrency)
            .service(ConnectorService(connector));
        let hedged = HedgeService::new(timed, hedger.clone());
        let (guarded, breaker) = if settings.breaker.enabled {
            let breaker = Breaker::new(settings.breaker);
            (
                BoxCloneSyncService::new(BreakerService::new(hedged, breaker.clone())),
                Some(breaker),
            )
        } else {
            (BoxCloneSyncService::new(hedged), None)
        };
        let (service, cache) = match &settings.cache {
            Some(cache) => {
                let (svc, probe) =
                    CacheService::new(guarded, cache, &descriptor.id, descriptor.kind);
                (BoxCloneSyncService::new(svc), Some(probe))
            }
            None => (guarded, None),
        };
        Self {
            stats: Arc::new(SourceStats::new(descriptor.clone())),
            descriptor,
            service,
            probes: Probes {
                breaker,
                hedger,
                cache,
            },
        }
    }

    /// The state of the source's breaker and its hedge and cache counters.
    pub fn status(&self) -> SourceStatus {
        SourceStatus {
            breaker: self.probes.breaker.as_ref().map(Breaker::state),
            breaker_opened: self
                .probes
                .breaker
                .as_ref()
                .map_or(0, Breaker::opened_total),
            hedge: self.probes.hedger.counters(),
            cache: self
                .probes
                .cache
                .as_ref()
                .map(CacheProbe::counters)
                .unwrap_or_default(),
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
        let result = match tokio::time::timeout_at(
            deadline,
            self.service
                .clone()
                .oneshot(SourceCall { query, deadline })
                .instrument(span.clone()),
        )
        .await
        {
            Ok(result) => result,
            Err(elapsed) => Err(BoxError::from(elapsed)),
        };
        if let Some(breaker) = &self.probes.breaker {
            self.stats.set_breaker(match breaker.state() {
                BreakerState::Closed => crate::metrics::BreakerState::Closed,
                BreakerState::HalfOpen => crate::metrics::BreakerState::HalfOpen,
                BreakerState::Open => crate::metrics::BreakerState::Open,
            });
        }
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
    type Future = CallFuture;

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

impl<S: SourceStack> Service<SourceCall> for DeadlineService<S> {
    type Response = SourceRecord;
    type Error = BoxError;
    type Future = CallFuture;

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
        Source::new(
            Arc::new(connector),
            StackSettings {
                max_concurrency,
                ..StackSettings::default()
            },
        )
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

    #[tokio::test(start_paused = true)]
    async fn a_failing_source_trips_its_breaker_and_is_then_not_asked() {
        let s = source("bad", 5, true, 4);
        let deadline = || Instant::now() + Duration::from_secs(2);
        for _ in 0..5 {
            assert_eq!(s.call(query(), deadline()).await.outcome.code(), "status");
        }
        assert_eq!(s.status().breaker, Some(BreakerState::Open));
        let start = Instant::now();
        let skipped = s.call(query(), deadline()).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "refused without waiting");
        assert_eq!(skipped.outcome.code(), "breaker_open");
        let why = skipped.outcome.shortfall().unwrap();
        assert!(
            why.starts_with("not asked") && why.ends_with("(breaker open)"),
            "{why}"
        );
        assert_eq!(s.status().breaker_opened, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_answer_is_served_even_while_the_breaker_is_open() {
        use connectors::ConnectorError;
        let flaky = Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flaky(SourceDescriptor, Arc<std::sync::atomic::AtomicBool>);
        impl Connector for Flaky {
            fn descriptor(&self) -> &SourceDescriptor {
                &self.0
            }
            fn fetch(
                &self,
                _q: SourceQuery,
            ) -> BoxFuture<'static, Result<SourceRecord, ConnectorError>> {
                let fail = self.1.load(Ordering::SeqCst);
                async move {
                    if fail {
                        Err(ConnectorError::Transport("reset".into()))
                    } else {
                        Ok(SourceRecord {
                            resources: vec![serde_json::json!({"resourceType": "Patient"})],
                        })
                    }
                }
                .boxed()
            }
        }
        let mut descriptor = source("x", 0, false, 1).descriptor.as_ref().clone();
        descriptor.kind = SourceKind::GpPractice;
        let s = Source::new(
            Arc::new(Flaky(descriptor, flaky.clone())),
            StackSettings {
                cache: Some(AnswerCache::new(crate::cache::CacheSettings::default())),
                ..StackSettings::default()
            },
        );
        let deadline = || Instant::now() + Duration::from_secs(2);
        let other = SourceQuery::everything(NhsNumber::parse("9990000018").unwrap());
        assert!(s.call(query(), deadline()).await.outcome.is_answered());
        flaky.store(true, Ordering::SeqCst);
        for _ in 0..5 {
            assert_eq!(
                s.call(other.clone(), deadline()).await.outcome.code(),
                "transport"
            );
        }
        assert_eq!(s.status().breaker, Some(BreakerState::Open));
        assert!(
            s.call(query(), deadline()).await.outcome.is_answered(),
            "cache hit"
        );
        assert_eq!(
            s.call(other, deadline()).await.outcome.code(),
            "breaker_open"
        );
        assert_eq!(s.status().cache.hits, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_source_is_hedged_within_the_deadline_through_the_whole_stack() {
        let s = source("slowish", 3_000, false, 4);
        let start = Instant::now();
        let outcome = s.call(query(), start + Duration::from_millis(700)).await;
        assert_eq!(outcome.outcome.code(), "timeout");
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(700),
            "never past the deadline"
        );
        assert_eq!(s.status().hedge.hedged, 0, "no samples yet: no hedge");
    }
}
