//! What the gateway has seen of each source lately, for `/admin/upstreams`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use connectors::SourceDescriptor;
use serde::Serialize;

use crate::{
    fanout::{Source, SourceStatus},
    outcome::SourceOutcome,
};

#[derive(Debug, Default, Clone, Serialize)]
struct Counters {
    calls: u64,
    answered: u64,
    not_answered: u64,
    last_outcome: Option<&'static str>,
    last_latency_ms: Option<f64>,
    last_call_unix: Option<u64>,
}

/// Per-source counters since start.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    by_source: HashMap<String, Mutex<Counters>>,
    sources: Vec<Arc<SourceDescriptor>>,
    /// Each source's stack, to read its breaker and counters.
    stacks: HashMap<String, Source>,
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
    pub calls: u64,
    pub answered: u64,
    pub not_answered: u64,
    pub error_rate: f64,
    pub last_outcome: Option<&'static str>,
    pub last_latency_ms: Option<f64>,
    pub last_call_unix: Option<u64>,
    /// `closed`, `open` or `half-open`; `None` when breakers are off.
    pub breaker: Option<&'static str>,
    /// Breaker, hedge and cache counters.
    pub status: Option<SourceStatus>,
}

impl UpstreamStats {
    pub fn new(sources: Vec<Arc<SourceDescriptor>>) -> Self {
        let by_source = sources
            .iter()
            .map(|s| (s.id.clone(), Mutex::default()))
            .collect();
        Self {
            by_source,
            sources,
            stacks: HashMap::new(),
        }
    }

    /// Shows these sources' breaker state and counters in the rows.
    pub fn watch(&mut self, sources: &[Source]) {
        self.stacks
            .extend(sources.iter().map(|s| (s.descriptor.id.clone(), s.clone())));
    }

    pub fn record(&self, outcome: &SourceOutcome) {
        let Some(slot) = self.by_source.get(&outcome.source.id) else {
            return;
        };
        let mut c = slot.lock().unwrap_or_else(|p| p.into_inner());
        c.calls += 1;
        if outcome.outcome.is_answered() {
            c.answered += 1;
        } else {
            c.not_answered += 1;
        }
        c.last_outcome = Some(outcome.outcome.code());
        c.last_latency_ms = Some(millis(outcome.elapsed));
        c.last_call_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
    }

    pub fn rows(&self) -> Vec<UpstreamRow> {
        self.sources
            .iter()
            .map(|s| {
                let c = self
                    .by_source
                    .get(&s.id)
                    .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()).clone())
                    .unwrap_or_default();
                let status = self.stacks.get(&s.id).map(Source::status);
                UpstreamRow {
                    id: s.id.clone(),
                    ods: s.ods.to_string(),
                    name: s.name.clone(),
                    kind: s.kind.as_str(),
                    connector: s.connector.as_str(),
                    endpoint: s.endpoint.clone(),
                    calls: c.calls,
                    answered: c.answered,
                    not_answered: c.not_answered,
                    error_rate: if c.calls == 0 {
                        0.0
                    } else {
                        c.not_answered as f64 / c.calls as f64
                    },
                    last_outcome: c.last_outcome,
                    last_latency_ms: c.last_latency_ms,
                    last_call_unix: c.last_call_unix,
                    breaker: status.as_ref().and_then(|s| s.breaker.map(|b| b.as_str())),
                    status,
                }
            })
            .collect()
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
