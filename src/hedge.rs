//! Hedged calls: a second attempt at a slow source once the first has taken longer than the
//! source usually does; the first *success* wins.
//!
//! # Why our own hedge and not `tower::hedge::Hedge`
//! tower's `Hedge` returns whichever leg finishes first, errors included, so a fast failure
//! (a reset, a 503 from an overloaded replica) sinks a healthy leg that was about to answer.
//! Here an error from one leg waits for the other; only when both have failed does the call
//! fail (with the first leg's error). tower's `Hedge` is also not `Clone`, and every source
//! stack here is cloned per call.
//!
//! # Why a percentile and a budget
//! Waiting for the source's own recent p95 (from a rotating histogram: the current and the
//! previous period, so old behaviour ages out) means roughly one call in twenty is hedged
//! when the source is healthy, and those are the calls in its tail. The extra load is
//! capped by a budget (tower's `TpsBudget`, 5 % of calls by default; see below for whose
//! calls): when a source is slow across the board, hedging every call would double the load
//! on a source that is already struggling. No hedge is sent when the time left before the deadline is shorter than the
//! source's median latency: the second leg could not answer in time.
//!
//! # Why sources of one kind pool their latencies, and why the budget remembers a minute
//! In a locate plan each patient's GP practice is asked once, so one practice of hundreds may
//! see a call a minute: it would never gather the samples for a percentile of its own, and a
//! budget that forgets deposits after 10 s (5 % of calls, one hedge per 20 calls) would never
//! hold a whole hedge. Yet the practice's calls are a request's tail as often as a trust's.
//! So every successful leg is also recorded in a histogram shared by all sources of the same
//! kind (all GP practices, all trusts, ...), and a source with too few samples of its own is
//! hedged at its kind's percentile. The budget (5 % of calls) is the kind's, kept for 60 s (the
//! most tower's `TpsBudget` allows): the extra load it bounds is the whole kind's, and a quiet
//! practice's tail call can be hedged from what its busy peers deposited. A per-source budget
//! of the same 5 % was measured (`BENCHMARKS.md`, S3) to decline exactly the tail calls while
//! total extra load stayed under 3 %: body crossings at a p95 trigger spend a 5 % share as
//! fast as it fills. Each source also keeps a cap of its own, five times the share, so one
//! struggling source cannot spend the whole kind's budget.
//!
//! When the hedge wins, the first leg is dropped unfinished; its time so far (the threshold
//! plus the winner's time) is still recorded, as a lower bound. Recording only winners would
//! hide exactly the slow calls the percentile must see: the threshold would sink, more
//! calls would cross it, and the budget would run dry on calls that were never in the tail.
//!
//! Source calls are FHIR reads and HL7 v2 queries: idempotent, so a second attempt is safe.
//! Timing is `tokio::time` throughout and tested on a paused clock.

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use connectors::{SourceKind, SourceRecord};
use futures::FutureExt;
use hdrhistogram::Histogram;
use serde::Deserialize;
use tokio::time::Instant;
use tower::{
    BoxError, Service, ServiceExt,
    retry::budget::{Budget as _, TpsBudget},
};

use crate::fanout::{CallFuture, SourceCall, SourceStack};

/// Hedging settings (`[hedge]` in config).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeSettings {
    pub enabled: bool,
    /// The source's latency percentile after which a second attempt goes (0..1).
    pub percentile: f64,
    /// Hedges allowed as a share of calls to sources of one kind (0.05 is 5 %); one source
    /// may spend up to five times this share of its own calls within that.
    pub max_extra_load: f64,
    /// Successful calls seen before the source's percentile is trusted.
    pub min_samples: u64,
    /// How long one histogram period lasts; the percentile covers two.
    #[serde(with = "humantime_serde")]
    pub period: Duration,
}

impl Default for HedgeSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            percentile: 0.95,
            max_extra_load: 0.05,
            min_samples: 20,
            period: Duration::from_secs(30),
        }
    }
}

impl HedgeSettings {
    /// Problems with these settings, for config validation.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !(self.percentile > 0.0 && self.percentile < 1.0) {
            p.push("percentile must be between 0 and 1, e.g. 0.95".to_owned());
        }
        if !(0.0..=1.0).contains(&self.max_extra_load) {
            p.push("max_extra_load must be between 0 and 1, e.g. 0.05".to_owned());
        }
        if self.period < Duration::from_secs(1) || self.period > Duration::from_secs(60) {
            p.push("period must be between 1s and 60s".to_owned());
        }
        p
    }
}

/// How long the hedge budget remembers deposits (tower's `TpsBudget` allows 1 s to 60 s).
const BUDGET_MEMORY: Duration = Duration::from_secs(60);

/// A source may spend up to this many times the configured share of its own calls, within
/// its kind's budget of the configured share.
const SOURCE_CAP: f32 = 5.0;

/// Latencies of one source's (or one kind's) successful calls, in microseconds, over two
/// periods.
struct Latencies {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    rotated_at: Instant,
    /// (threshold, median), recomputed every few samples and on rotation.
    cached: Option<(Duration, Duration)>,
    stale_samples: u32,
}

const MAX_MICROS: u64 = 120_000_000;

impl Latencies {
    fn new() -> Self {
        let h = || {
            Histogram::new_with_bounds(1, MAX_MICROS, 2)
                .unwrap_or_else(|_| unreachable!("static bounds are valid"))
        };
        Self {
            current: h(),
            previous: h(),
            rotated_at: Instant::now(),
            cached: None,
            stale_samples: u32::MAX,
        }
    }

    fn rotate_if_due(&mut self, period: Duration) {
        if self.rotated_at.elapsed() >= period {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.reset();
            self.rotated_at = Instant::now();
            self.stale_samples = u32::MAX;
        }
    }

    fn record(&mut self, elapsed: Duration, period: Duration) {
        self.rotate_if_due(period);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(MAX_MICROS);
        self.current.saturating_record(micros.clamp(1, MAX_MICROS));
        self.stale_samples = self.stale_samples.saturating_add(1);
    }

    /// (threshold, median) once enough samples are in.
    fn threshold(&mut self, s: &HedgeSettings) -> Option<(Duration, Duration)> {
        self.rotate_if_due(s.period);
        if self.stale_samples >= 16 {
            self.stale_samples = 0;
            let mut both = self.previous.clone();
            // Same bounds, so adding cannot fail.
            let _ = both.add(&self.current);
            self.cached = (both.len() >= s.min_samples).then(|| {
                (
                    Duration::from_micros(both.value_at_quantile(s.percentile)),
                    Duration::from_micros(both.value_at_quantile(0.5)),
                )
            });
        }
        self.cached
    }
}

/// Counters a source's status shows.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HedgeCounters {
    pub calls: u64,
    /// Second attempts sent.
    pub hedged: u64,
    /// Calls the second attempt answered.
    pub hedge_won: u64,
    /// Calls past the percentile that were not hedged: budget spent or too little time left.
    pub declined: u64,
}

/// What sources of one kind share: their pooled latencies and the hedge budget.
struct Kind {
    latencies: Mutex<Latencies>,
    budget: TpsBudget,
}

/// Per source kind, the pooled latencies and budget, shared by every source's hedger (one per
/// gateway: clones share it).
#[derive(Clone, Default)]
pub struct KindLatencies(Arc<Mutex<HashMap<SourceKind, Arc<Kind>>>>);

impl fmt::Debug for KindLatencies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindLatencies").finish_non_exhaustive()
    }
}

impl KindLatencies {
    /// The kind's pool; made on first use with a budget of `share` of the kind's calls.
    fn of(&self, kind: SourceKind, share: f32) -> Arc<Kind> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_insert_with(|| {
                Arc::new(Kind {
                    latencies: Mutex::new(Latencies::new()),
                    budget: TpsBudget::new(BUDGET_MEMORY, 0, share),
                })
            })
            .clone()
    }
}

struct Shared {
    settings: HedgeSettings,
    /// The source's ODS code, the label of its hedge counter in `/metrics`.
    ods: String,
    latencies: Mutex<Latencies>,
    /// Every source of the same kind records here too, and hedges from the kind's budget.
    peers: Arc<Kind>,
    /// The source's own cap: [`SOURCE_CAP`] times the kind's share.
    budget: TpsBudget,
    calls: AtomicU64,
    hedged: AtomicU64,
    hedge_won: AtomicU64,
    declined: AtomicU64,
}

/// One source's hedging state, shared by every clone of its stack.
#[derive(Clone)]
pub struct Hedger(Arc<Shared>);

impl fmt::Debug for Hedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hedger")
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

impl Hedger {
    /// A hedger for a source of `kind`, pooling its latencies with its peers in `pools`.
    pub fn new(settings: HedgeSettings, pools: &KindLatencies, kind: SourceKind) -> Self {
        // TpsBudget's own bounds: 0..=1000 retries per deposit.
        let share = settings.max_extra_load.clamp(0.0, 1.0) as f32;
        let own = (share * SOURCE_CAP).min(1.0);
        Self(Arc::new(Shared {
            settings,
            ods: String::new(),
            latencies: Mutex::new(Latencies::new()),
            peers: pools.of(kind, share),
            budget: TpsBudget::new(BUDGET_MEMORY, 0, own),
            calls: AtomicU64::new(0),
            hedged: AtomicU64::new(0),
            hedge_won: AtomicU64::new(0),
            declined: AtomicU64::new(0),
        }))
    }

    /// Names the source in `/metrics` (`tributary_source_hedges_total`). Call before cloning.
    pub fn for_source(mut self, ods: &str) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.0) {
            shared.ods = ods.to_owned();
        }
        self
    }

    pub fn counters(&self) -> HedgeCounters {
        HedgeCounters {
            calls: self.0.calls.load(Ordering::Relaxed),
            hedged: self.0.hedged.load(Ordering::Relaxed),
            hedge_won: self.0.hedge_won.load(Ordering::Relaxed),
            declined: self.0.declined.load(Ordering::Relaxed),
        }
    }

    /// A call counts towards the source's and the kind's budget.
    fn deposit(&self) {
        self.0.budget.deposit();
        self.0.peers.budget.deposit();
    }

    /// A hedge needs room in the source's cap and in the kind's budget.
    fn withdraw(&self) -> bool {
        self.0.budget.withdraw() && self.0.peers.budget.withdraw()
    }

    fn latencies(&self) -> std::sync::MutexGuard<'_, Latencies> {
        self.0.latencies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, elapsed: Duration) {
        let period = self.0.settings.period;
        self.latencies().record(elapsed, period);
        self.0
            .peers
            .latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(elapsed, period);
    }

    /// The source's own (threshold, median) once it has enough samples, else its kind's.
    fn threshold(&self) -> Option<(Duration, Duration)> {
        if !self.0.settings.enabled {
            return None;
        }
        let own = self.latencies().threshold(&self.0.settings);
        own.or_else(|| {
            self.0
                .peers
                .latencies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .threshold(&self.0.settings)
        })
    }
}

/// Runs a leg and records its latency when it succeeds.
async fn leg<F>(hedger: Hedger, fut: F) -> Result<SourceRecord, BoxError>
where
    F: Future<Output = Result<SourceRecord, BoxError>>,
{
    let started = Instant::now();
    let result = fut.await;
    if result.is_ok() {
        hedger.record(started.elapsed());
    }
    result
}

/// The hedge as a tower service around the timeout and the rest of the stack.
#[derive(Clone)]
pub struct HedgeService<S> {
    inner: S,
    hedger: Hedger,
}

impl<S> fmt::Debug for HedgeService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HedgeService")
            .field("hedger", &self.hedger)
            .finish_non_exhaustive()
    }
}

impl<S> HedgeService<S> {
    pub fn new(inner: S, hedger: Hedger) -> Self {
        Self { inner, hedger }
    }
}

impl<S: SourceStack> Service<SourceCall> for HedgeService<S> {
    type Response = SourceRecord;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: SourceCall) -> Self::Future {
        let hedger = self.hedger.clone();
        let inner = self.inner.clone();
        async move {
            hedger.0.calls.fetch_add(1, Ordering::Relaxed);
            hedger.deposit();
            let threshold = hedger.threshold();
            let started = Instant::now();
            let first = leg(hedger.clone(), inner.clone().oneshot(call.clone()));
            let Some((threshold, median)) = threshold else {
                return first.await;
            };
            let mut first = std::pin::pin!(first);
            tokio::select! {
                result = &mut first => return result,
                () = tokio::time::sleep(threshold) => {}
            }
            let remaining = call.deadline.saturating_duration_since(Instant::now());
            if remaining < median || !hedger.withdraw() {
                hedger.0.declined.fetch_add(1, Ordering::Relaxed);
                return first.await;
            }
            hedger.0.hedged.fetch_add(1, Ordering::Relaxed);
            crate::metrics::global().hedge(&hedger.0.ods);
            let second = std::pin::pin!(leg(hedger.clone(), inner.oneshot(call)));
            first_success(first, second, &hedger, started).await
        }
        .boxed()
    }
}

/// The first leg to succeed wins; an error waits for the other leg. Both failed: the first
/// leg's error. When the second wins, the first leg's time so far (from `first_started`) is
/// recorded: a lower bound of a latency that would otherwise never be seen.
async fn first_success<A, B>(
    mut first: A,
    mut second: B,
    hedger: &Hedger,
    first_started: Instant,
) -> Result<SourceRecord, BoxError>
where
    A: Future<Output = Result<SourceRecord, BoxError>> + Unpin,
    B: Future<Output = Result<SourceRecord, BoxError>> + Unpin,
{
    let (mut first_err, mut second_err) = (None, None);
    loop {
        tokio::select! {
            result = &mut first, if first_err.is_none() => match result {
                Ok(record) => return Ok(record),
                Err(e) if second_err.is_some() => return Err(e),
                Err(e) => first_err = Some(e),
            },
            result = &mut second, if second_err.is_none() => match result {
                Ok(record) => {
                    hedger.0.hedge_won.fetch_add(1, Ordering::Relaxed);
                    if first_err.is_none() {
                        hedger.record(first_started.elapsed());
                    }
                    return Ok(record);
                }
                Err(e) => match first_err.take() {
                    Some(first) => return Err(first),
                    None => second_err = Some(e),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::AtomicUsize;

    use connectors::{ConnectorError, NhsNumber, SourceQuery};

    use super::*;

    /// A scripted upstream: call `n` (from 0) waits `script[n].0` then fails if `script[n].1`.
    /// Calls past the script behave like its last entry.
    fn upstream(
        script: Vec<(u64, bool)>,
    ) -> (
        impl Service<
            SourceCall,
            Response = SourceRecord,
            Error = BoxError,
            Future = crate::fanout::CallFuture,
        > + Clone
        + Send
        + 'static,
        Arc<AtomicUsize>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let script = Arc::new(script);
        let svc = tower::service_fn(move |call: SourceCall| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let (ms, fail) = script[n.min(script.len() - 1)];
            async move {
                tokio::time::timeout_at(
                    call.deadline,
                    tokio::time::sleep(Duration::from_millis(ms)),
                )
                .await?;
                if fail {
                    Err(BoxError::from(ConnectorError::Status { status: 503 }))
                } else {
                    Ok(SourceRecord {
                        resources: vec![serde_json::json!({"leg": n})],
                    })
                }
            }
            .boxed()
        });
        (svc, calls)
    }

    fn call(deadline_ms: u64) -> SourceCall {
        SourceCall {
            query: SourceQuery::everything(NhsNumber::parse("9434765919").unwrap()),
            deadline: Instant::now() + Duration::from_millis(deadline_ms),
        }
    }

    fn hedger(settings: HedgeSettings) -> Hedger {
        Hedger::new(settings, &KindLatencies::default(), SourceKind::GpPractice)
    }

    /// A hedger that has seen 100 calls of `ms` each (p95 = p50 = ms), with budget to spare.
    async fn warmed(ms: u64, max_extra_load: f64) -> Hedger {
        let hedger = hedger(HedgeSettings {
            max_extra_load,
            ..HedgeSettings::default()
        });
        for _ in 0..100 {
            hedger.deposit();
            hedger.record(Duration::from_millis(ms));
        }
        hedger
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_first_leg_is_hedged_after_the_percentile_and_the_fast_second_wins() {
        let hedger = warmed(20, 0.05).await;
        let (svc, calls) = upstream(vec![(1_000, false), (20, false)]);
        let mut svc = HedgeService::new(svc, hedger.clone());
        let start = Instant::now();
        let record = svc.call(call(2_000)).await.unwrap();
        assert_eq!(record.resources[0]["leg"], 1, "the hedge answered");
        // p95 of 20 ms samples is 20 ms (within the histogram's 1 % precision), then 20 ms.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(40) && took <= Duration::from_millis(41),
            "{took:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(hedger.counters().hedge_won, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hedge_sent_is_counted_in_metrics_under_its_source() {
        let hedger = warmed(20, 0.05).await.for_source("HEDGE1");
        let (svc, _) = upstream(vec![(1_000, false), (20, false)]);
        let mut svc = HedgeService::new(svc, hedger);
        svc.call(call(2_000)).await.unwrap();
        let text = crate::metrics::global().render();
        assert!(
            text.lines()
                .any(|l| l == r#"tributary_source_hedges_total{source="HEDGE1"} 1"#),
            "{}",
            text.lines()
                .filter(|l| l.contains("hedges"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_error_does_not_beat_a_slow_healthy_leg() {
        let hedger = warmed(20, 0.05).await;
        // The first leg is slow but healthy; the hedge fails fast.
        let (svc, _) = upstream(vec![(300, false), (5, true)]);
        let mut svc = HedgeService::new(svc, hedger.clone());
        let start = Instant::now();
        let record = svc.call(call(2_000)).await.unwrap();
        assert_eq!(record.resources[0]["leg"], 0);
        assert_eq!(start.elapsed(), Duration::from_millis(300));
        assert_eq!(hedger.counters().hedge_won, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn both_legs_failing_returns_the_first_legs_error() {
        let hedger = warmed(20, 0.05).await;
        let (svc, _) = upstream(vec![(100, true), (5, true)]);
        let mut svc = HedgeService::new(svc, hedger);
        let err = svc.call(call(2_000)).await.unwrap_err();
        assert!(err.is::<ConnectorError>());
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_hedges_at_the_configured_share_of_calls() {
        let hedger = hedger(HedgeSettings::default());
        // So many 20 ms samples that 200 slow calls do not move the p95.
        for _ in 0..10_000 {
            hedger.record(Duration::from_millis(20));
        }
        // Every call is slow: without a budget every one would be hedged.
        let (svc, calls) = upstream(vec![(100, false)]);
        let svc = HedgeService::new(svc, hedger.clone());
        for _ in 0..200 {
            svc.clone().oneshot(call(2_000)).await.unwrap();
        }
        let c = hedger.counters();
        assert_eq!(c.calls, 200);
        // 5 % of 200 is 10; TpsBudget's f32 arithmetic may round one hedge up.
        assert!(c.hedged <= 11, "at most about 5 % of 200 calls: {c:?}");
        assert!(c.hedged >= 5, "the budget is used: {c:?}");
        assert_eq!(c.hedged + c.declined, 200, "every call passed the p95");
        assert_eq!(calls.load(Ordering::SeqCst) as u64, 200 + c.hedged);
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_when_too_little_time_is_left_to_use_it() {
        let hedger = warmed(100, 1.0).await;
        let (svc, calls) = upstream(vec![(500, false), (100, false)]);
        let mut svc = HedgeService::new(svc, hedger.clone());
        // At the 100 ms threshold only 50 ms remain: less than the 100 ms median.
        let err = svc.call(call(150)).await.unwrap_err();
        assert!(err.is::<tokio::time::error::Elapsed>());
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no second leg");
        assert_eq!(hedger.counters().declined, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn no_hedge_before_enough_samples() {
        let hedger = hedger(HedgeSettings::default());
        let (svc, calls) = upstream(vec![(500, false)]);
        let mut svc = HedgeService::new(svc, hedger);
        svc.call(call(2_000)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_percentile_follows_the_source_as_periods_rotate() {
        let hedger = warmed(20, 0.05).await;
        assert_eq!(hedger.threshold().map(|t| t.0.as_millis()), Some(20));
        tokio::time::advance(Duration::from_secs(31)).await;
        for _ in 0..100 {
            hedger.record(Duration::from_millis(200));
        }
        tokio::time::advance(Duration::from_secs(31)).await;
        for _ in 0..100 {
            hedger.record(Duration::from_millis(200));
        }
        let t = hedger.threshold().unwrap().0;
        assert!(
            t >= Duration::from_millis(198),
            "old 20 ms samples aged out: {t:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_without_samples_of_its_own_is_hedged_at_its_kinds_percentile() {
        let pools = KindLatencies::default();
        let busy = Hedger::new(HedgeSettings::default(), &pools, SourceKind::GpPractice);
        for _ in 0..100 {
            busy.record(Duration::from_millis(20));
        }
        let quiet = Hedger::new(HedgeSettings::default(), &pools, SourceKind::GpPractice);
        let other_kind = Hedger::new(HedgeSettings::default(), &pools, SourceKind::Trust);
        assert_eq!(other_kind.threshold(), None, "kinds do not share");
        for _ in 0..100 {
            quiet.deposit();
        }
        let (svc, calls) = upstream(vec![(1_000, false), (20, false)]);
        let mut svc = HedgeService::new(svc, quiet.clone());
        let start = Instant::now();
        let record = svc.call(call(2_000)).await.unwrap();
        assert_eq!(record.resources[0]["leg"], 1, "the hedge answered");
        assert!(start.elapsed() <= Duration::from_millis(41));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_called_once_a_second_can_still_afford_its_share_of_hedges() {
        let hedger = hedger(HedgeSettings::default());
        // One call a second for a minute: 60 deposits, 5 % of them is 3 hedges.
        for _ in 0..60 {
            hedger.deposit();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let mut hedges = 0;
        while hedges < 10 && hedger.withdraw() {
            hedges += 1;
        }
        // A budget that forgot deposits after 10 s would hold 10, not enough for one hedge.
        assert!((2..=3).contains(&hedges), "{hedges}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_source_hedges_from_its_kinds_budget_up_to_its_own_cap() {
        let pools = KindLatencies::default();
        let busy = Hedger::new(HedgeSettings::default(), &pools, SourceKind::GpPractice);
        let quiet = Hedger::new(HedgeSettings::default(), &pools, SourceKind::GpPractice);
        let trust = Hedger::new(HedgeSettings::default(), &pools, SourceKind::Trust);
        for _ in 0..1_000 {
            busy.deposit();
        }
        for _ in 0..20 {
            quiet.deposit();
            trust.deposit();
        }
        let spend = |h: &Hedger| (0..100).take_while(|_| h.withdraw()).count();
        // 20 calls at 5 % would be one hedge; the kind's deposits allow up to the source's
        // own cap of 25 %: 5 hedges.
        assert!((4..=5).contains(&spend(&quiet)), "quiet source");
        // Another kind's deposits are not shared: 5 % of its own 20 calls.
        assert_eq!(spend(&trust), 1, "trust");
        // The busy source still has the kind's budget left: 5 % of 1 020, less the quiet one's.
        let left = spend(&busy);
        assert!((44..=48).contains(&left), "busy source: {left}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_leg_a_hedge_beat_still_counts_in_the_percentile() {
        let hedger = warmed(20, 0.05).await;
        let (svc, _) = upstream(vec![(1_000, false), (20, false)]);
        let mut svc = HedgeService::new(svc, hedger.clone());
        svc.call(call(2_000)).await.unwrap();
        let l = hedger.latencies();
        // 100 warm-up samples, the winner's 20 ms, and the loser's 40 ms so far.
        assert_eq!(l.current.len(), 102);
        assert!(l.current.max() >= 39_000, "{}", l.current.max());
    }
}
