//! What the gateway has seen of each source lately, for `/admin/upstreams` and `/metrics`:
//! calls in flight, latency percentiles and error rate over a rolling window, the last error,
//! the breaker state.
//!
//! Each [`Source`](crate::fanout::Source) owns a [`SourceStats`]; `Source::call` opens a
//! [`Flight`] when it starts and closes it with the outcome, so in-flight counts and the
//! window see every call whoever makes it (plan, fan-out, hedges).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, SystemTime},
};

use connectors::SourceDescriptor;
use serde::Serialize;
use tokio::time::Instant;

use crate::{metrics::BreakerState, outcome::SourceOutcome};

/// How far back the percentiles and error rate look.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Most calls kept per source in the window (the newest win).
const MAX_SAMPLES: usize = 4096;

#[derive(Debug, Default)]
struct Window {
    /// (when it ended, latency in ms, answered)
    samples: VecDeque<(Instant, f64, bool)>,
    calls: u64,
    answered: u64,
    in_flight: u64,
    last_outcome: Option<&'static str>,
    last_latency_ms: Option<f64>,
    last_call_unix: Option<u64>,
    last_error: Option<&'static str>,
    last_error_unix: Option<u64>,
}

/// One source's live statistics.
#[derive(Debug)]
pub struct SourceStats {
    pub descriptor: Arc<SourceDescriptor>,
    window: Mutex<Window>,
    breaker: AtomicU8,
}

/// A call in flight; [`Flight::finish`] records its outcome. Dropped unfinished (the call's
/// future was cancelled), it only leaves the in-flight count.
#[derive(Debug)]
pub struct Flight<'a> {
    stats: &'a SourceStats,
    done: bool,
}

impl SourceStats {
    pub fn new(descriptor: Arc<SourceDescriptor>) -> Self {
        crate::metrics::global().register_source(descriptor.ods.as_str());
        Self {
            descriptor,
            window: Mutex::default(),
            breaker: AtomicU8::new(BreakerState::Closed as u8),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn begin(&self) -> Flight<'_> {
        self.lock().in_flight += 1;
        crate::metrics::global().source_in_flight(self.descriptor.ods.as_str(), 1.0);
        Flight {
            stats: self,
            done: false,
        }
    }

    /// Hook for the breaker: its state changes.
    pub fn set_breaker(&self, state: BreakerState) {
        self.breaker.store(state as u8, Ordering::Relaxed);
        crate::metrics::global().breaker_state(self.descriptor.ods.as_str(), state);
    }

    pub fn breaker(&self) -> BreakerState {
        match self.breaker.load(Ordering::Relaxed) {
            1 => BreakerState::HalfOpen,
            2 => BreakerState::Open,
            _ => BreakerState::Closed,
        }
    }

    fn record(&self, outcome: &SourceOutcome) {
        let code = outcome.outcome.code();
        let ms = millis(outcome.elapsed);
        let now = Instant::now();
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        crate::metrics::global().source_call(
            self.descriptor.ods.as_str(),
            self.descriptor.kind.as_str(),
            code,
            outcome.elapsed,
        );
        let answered = outcome.outcome.is_answered();
        let mut w = self.lock();
        w.calls += 1;
        if answered {
            w.answered += 1;
        } else {
            w.last_error = Some(code);
            w.last_error_unix = unix;
        }
        w.last_outcome = Some(code);
        w.last_latency_ms = Some(ms);
        w.last_call_unix = unix;
        if w.samples.len() == MAX_SAMPLES {
            w.samples.pop_front();
        }
        w.samples.push_back((now, ms, answered));
    }

    /// This source's row, over the window ending now.
    pub fn row(&self) -> UpstreamRow {
        let s = &self.descriptor;
        let mut w = self.lock();
        let now = Instant::now();
        while w
            .samples
            .front()
            .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            w.samples.pop_front();
        }
        let mut latencies: Vec<f64> = w.samples.iter().map(|(_, ms, _)| *ms).collect();
        latencies.sort_by(f64::total_cmp);
        let failed = w.samples.iter().filter(|(_, _, ok)| !ok).count();
        let window_calls = w.samples.len();
        UpstreamRow {
            id: s.id.clone(),
            ods: s.ods.to_string(),
            name: s.name.clone(),
            kind: s.kind.as_str(),
            connector: s.connector.as_str(),
            endpoint: s.endpoint.clone(),
            calls: w.calls,
            answered: w.answered,
            not_answered: w.calls - w.answered,
            in_flight: w.in_flight,
            window_seconds: WINDOW.as_secs(),
            window_calls: window_calls as u64,
            p50_ms: percentile(&latencies, 0.50),
            p95_ms: percentile(&latencies, 0.95),
            p99_ms: percentile(&latencies, 0.99),
            error_rate: if window_calls == 0 {
                0.0
            } else {
                failed as f64 / window_calls as f64
            },
            breaker: self.breaker().as_str(),
            last_outcome: w.last_outcome,
            last_latency_ms: w.last_latency_ms,
            last_call_unix: w.last_call_unix,
            last_error: w.last_error,
            last_error_unix: w.last_error_unix,
        }
    }
}

impl Flight<'_> {
    pub fn finish(mut self, outcome: &SourceOutcome) {
        self.done = true;
        self.stats.record(outcome);
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let _ = self.done;
        let mut w = self.stats.lock();
        w.in_flight = w.in_flight.saturating_sub(1);
        drop(w);
        crate::metrics::global().source_in_flight(self.stats.descriptor.ods.as_str(), -1.0);
    }
}

/// Nearest-rank percentile of sorted values; `None` when there are none.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Every source's statistics, in configuration order.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    sources: Vec<Arc<SourceStats>>,
}

/// One row of `/admin/upstreams`.
#[derive(Debug, Serialize)]
pub struct UpstreamRow {
    pub id: String,
    pub ods: String,
    pub name: String,
    pub kind: &'static str,
    pub connector: &'static str,
    pub endpoint: String,
    /// Since start.
    pub calls: u64,
    pub answered: u64,
    pub not_answered: u64,
    pub in_flight: u64,
    /// Over the rolling window.
    pub window_seconds: u64,
    pub window_calls: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub error_rate: f64,
    pub breaker: &'static str,
    pub last_outcome: Option<&'static str>,
    pub last_latency_ms: Option<f64>,
    pub last_call_unix: Option<u64>,
    /// The last outcome other than `answered`, and when.
    pub last_error: Option<&'static str>,
    pub last_error_unix: Option<u64>,
}

impl UpstreamStats {
    pub fn new(sources: Vec<Arc<SourceStats>>) -> Self {
        Self { sources }
    }

    pub fn rows(&self) -> Vec<UpstreamRow> {
        self.sources.iter().map(|s| s.row()).collect()
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use connectors::{ConnectorKind, OdsCode, SourceKind};

    use super::*;
    use crate::outcome::Outcome;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_old_calls_and_counts_in_flight() {
        let d = Arc::new(SourceDescriptor {
            id: "t".into(),
            ods: OdsCode::new("TST"),
            name: "Test".into(),
            kind: SourceKind::Trust,
            connector: ConnectorKind::Fhir,
            endpoint: "http://127.0.0.1:1".into(),
        });
        let stats = SourceStats::new(d.clone());
        let outcome = |ms, ok: bool| SourceOutcome {
            source: d.clone(),
            outcome: if ok {
                Outcome::Answered(Default::default())
            } else {
                Outcome::TimedOut
            },
            elapsed: Duration::from_millis(ms),
        };
        stats.begin().finish(&outcome(900, false));
        tokio::time::advance(WINDOW + Duration::from_secs(1)).await;
        let flight = stats.begin();
        stats.begin().finish(&outcome(10, true));
        let row = stats.row();
        assert_eq!((row.calls, row.window_calls, row.in_flight), (2, 1, 1));
        assert_eq!(row.p99_ms, Some(10.0));
        assert_eq!(row.error_rate, 0.0);
        assert_eq!(row.last_error, Some("timeout"));
        drop(flight);
        assert_eq!(stats.row().in_flight, 0);
    }
}
