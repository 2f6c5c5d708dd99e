//! A circuit breaker per source: stops calling a source that keeps failing, and probes it back.
//!
//! # Why a breaker, when every call already ends at its deadline
//! A dead source costs every request that asks it a whole upstream budget of waiting and a
//! connection or a task while it waits; under load those add up to the gateway's own outage.
//! Once a source has shown it is down, the breaker answers for it at once ("not asked:
//! breaker open") and calls it again only as a single probe after an ejection period.
//!
//! The thresholds follow Envoy's outlier detection: ejected after `consecutive_failures`
//! (5) failures in a row, or when the failure rate over the last `window` calls reaches
//! `failure_rate`; ejected for `base_ejection` (30 s) times the number of times it has been
//! ejected, at most `max_ejection` (300 s). After an ejection one probe call goes through
//! (half-open): a success closes the breaker, a failure ejects again for longer. A source
//! that stays healthy for `max_ejection` has its ejection count forgotten.
//!
//! What counts as a failure is decided by [`crate::outcome::counts_against_source`], the
//! one place errors are taken apart. All timing is `tokio::time`, so it is tested on a
//! paused clock.

use std::{
    collections::VecDeque,
    fmt,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

use crate::fanout::{CallFuture, SourceCall, SourceStack};
use connectors::SourceRecord;

/// Breaker thresholds (`[breaker]` in config).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Whether sources have breakers at all.
    pub enabled: bool,
    /// Failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// Failure rate (0..=1) over the last `window` calls that opens the breaker.
    pub failure_rate: f64,
    /// How many recent calls the failure rate looks at (and the fewest it needs).
    pub window: u32,
    /// The first ejection; the n-th lasts n times as long.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// The longest ejection.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
        }
    }
}

impl BreakerSettings {
    /// Problems with these settings, for config validation.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.consecutive_failures == 0 {
            p.push("consecutive_failures must be at least 1".to_owned());
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            p.push("failure_rate must be more than 0 and at most 1".to_owned());
        }
        if self.window == 0 {
            p.push("window must be at least 1".to_owned());
        }
        if self.base_ejection.is_zero() || self.base_ejection > self.max_ejection {
            p.push("base_ejection must be more than zero and at most max_ejection".to_owned());
        }
        p
    }
}

/// The breaker's state, as `/admin/upstreams` and metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// The error a call gets when the breaker is open: the source was not asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOpen {
    /// Until the next probe may go.
    pub retry_in: Duration,
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "breaker open: next probe in {} s",
            self.retry_in.as_secs()
        )
    }
}

impl std::error::Error for BreakerOpen {}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    consecutive: u32,
    /// Recent results while closed: `true` is a failure.
    recent: VecDeque<bool>,
    ejections: u32,
    /// When the breaker last closed (to forget old ejections).
    closed_at: Option<Instant>,
    opened_total: u64,
}

/// A breaker shared by every clone of one source's stack.
#[derive(Debug, Clone)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Arc<Mutex<Inner>>,
}

/// What a call may do.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Call,
    Probe,
    Refuse(Duration),
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Arc::new(Mutex::new(Inner {
                phase: Phase::Closed,
                consecutive: 0,
                recent: VecDeque::new(),
                ejections: 0,
                closed_at: None,
                opened_total: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state now (an open breaker whose ejection has passed shows as half-open).
    pub fn state(&self) -> BreakerState {
        match self.lock().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How many times the breaker has opened since start.
    pub fn opened_total(&self) -> u64 {
        self.lock().opened_total
    }

    fn admit(&self) -> Admission {
        let mut s = self.lock();
        let now = Instant::now();
        match s.phase {
            Phase::Closed => Admission::Call,
            Phase::Open { until } if now < until => Admission::Refuse(until - now),
            Phase::Open { .. } | Phase::HalfOpen { probing: false } => {
                s.phase = Phase::HalfOpen { probing: true };
                Admission::Probe
            }
            // One probe at a time; the others are refused until it reports.
            Phase::HalfOpen { probing: true } => Admission::Refuse(Duration::ZERO),
        }
    }

    /// Records a finished call. `probe` says whether it was the half-open probe.
    fn record(&self, failed: bool, probe: bool) {
        let settings = self.settings;
        let mut s = self.lock();
        let now = Instant::now();
        if probe {
            if failed {
                Self::open(&mut s, &settings, now);
            } else {
                s.phase = Phase::Closed;
                s.consecutive = 0;
                s.recent.clear();
                s.closed_at = Some(now);
            }
            return;
        }
        if !matches!(s.phase, Phase::Closed) {
            // A call admitted before the breaker opened: its result is old news.
            return;
        }
        s.consecutive = if failed { s.consecutive + 1 } else { 0 };
        s.recent.push_back(failed);
        while s.recent.len() > settings.window as usize {
            s.recent.pop_front();
        }
        let failures = s.recent.iter().filter(|f| **f).count();
        let rate_tripped = s.recent.len() >= settings.window as usize
            && failures as f64 >= settings.failure_rate * settings.window as f64;
        if failed && (s.consecutive >= settings.consecutive_failures || rate_tripped) {
            Self::open(&mut s, &settings, now);
        }
    }

    /// A probe that never reported (its caller went away): let the next call probe.
    fn abandon_probe(&self) {
        let mut s = self.lock();
        if matches!(s.phase, Phase::HalfOpen { probing: true }) {
            s.phase = Phase::HalfOpen { probing: false };
        }
    }

    fn open(s: &mut Inner, settings: &BreakerSettings, now: Instant) {
        if s.closed_at
            .is_some_and(|c| now.saturating_duration_since(c) >= settings.max_ejection)
        {
            s.ejections = 0;
        }
        s.ejections = s.ejections.saturating_add(1);
        let ejection = settings
            .base_ejection
            .saturating_mul(s.ejections)
            .min(settings.max_ejection);
        s.phase = Phase::Open {
            until: now + ejection,
        };
        s.opened_total += 1;
        s.consecutive = 0;
        s.recent.clear();
    }
}

/// The breaker as a tower service around the rest of a source's stack.
#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Breaker,
}

impl<S> fmt::Debug for BreakerService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerService")
            .field("breaker", &self.breaker)
            .finish_non_exhaustive()
    }
}

impl<S> BreakerService<S> {
    pub fn new(inner: S, breaker: Breaker) -> Self {
        Self { inner, breaker }
    }
}

/// Releases the half-open probe if the call is dropped before it reports.
struct ProbeGuard {
    breaker: Breaker,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon_probe();
        }
    }
}

impl<S: SourceStack> Service<SourceCall> for BreakerService<S> {
    type Response = SourceRecord;
    type Error = BoxError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: SourceCall) -> Self::Future {
        let breaker = self.breaker.clone();
        let inner = self.inner.clone();
        async move {
            let probe = match breaker.admit() {
                Admission::Refuse(retry_in) => {
                    return Err(BoxError::from(BreakerOpen { retry_in }));
                }
                Admission::Probe => true,
                Admission::Call => false,
            };
            let mut guard = ProbeGuard {
                breaker: breaker.clone(),
                armed: probe,
            };
            let result = inner.oneshot(call).await;
            guard.armed = false;
            let failed = match &result {
                Ok(_) => false,
                Err(e) => crate::outcome::counts_against_source(e),
            };
            breaker.record(failed, probe);
            result
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings::default())
    }

    fn fail_n(b: &Breaker, n: u32) {
        for _ in 0..n {
            assert_eq!(b.admit(), Admission::Call);
            b.record(true, false);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_five_consecutive_failures_and_refuses_without_calling() {
        let b = breaker();
        fail_n(&b, 4);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(false, false);
        fail_n(&b, 4);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success resets the streak"
        );
        fail_n(&b, 1);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(),
            Admission::Refuse(Duration::from_secs(30)),
            "refused for the whole first ejection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_failure_rate_over_the_window() {
        let b = breaker();
        // Alternate: never 5 in a row, but half of the last 20 fail.
        for i in 0..20 {
            assert_eq!(b.admit(), Admission::Call, "call {i}");
            b.record(i % 2 == 1, false);
        }
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_probe_closes_on_success_and_reejects_longer_on_failure() {
        let b = breaker();
        fail_n(&b, 5);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(), Admission::Probe);
        assert_eq!(
            b.admit(),
            Admission::Refuse(Duration::ZERO),
            "one probe at a time"
        );
        b.record(true, true);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(),
            Admission::Refuse(Duration::from_secs(60)),
            "second ejection lasts twice as long"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(b.admit(), Admission::Probe);
        b.record(false, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Admission::Call);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_is_capped_and_forgotten_after_a_healthy_spell() {
        let b = breaker();
        for n in 1..=12u32 {
            fail_n(&b, 5);
            let expected = Duration::from_secs(30 * u64::from(n)).min(Duration::from_secs(300));
            assert_eq!(b.admit(), Admission::Refuse(expected), "ejection {n}");
            tokio::time::advance(expected).await;
            assert_eq!(b.admit(), Admission::Probe);
            b.record(false, true);
        }
        tokio::time::advance(Duration::from_secs(300)).await;
        fail_n(&b, 5);
        assert_eq!(
            b.admit(),
            Admission::Refuse(Duration::from_secs(30)),
            "healthy for max_ejection: back to the first ejection"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_the_next_call_probe() {
        let b = breaker();
        fail_n(&b, 5);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(b.admit(), Admission::Probe);
        drop(ProbeGuard {
            breaker: b.clone(),
            armed: true,
        });
        assert_eq!(b.admit(), Admission::Probe);
    }
}
