//! Prometheus metrics, served as text (exposition format 0.0.4) at `GET /metrics` on the
//! admin listener.
//!
//! A small registry of its own (counters, gauges, histograms with fixed buckets, label
//! values escaped) rather than a metrics crate: the set is fixed, the format is short, and it
//! adds nothing to the build. Labels are low-cardinality by construction: routes (matched
//! patterns), status codes, ODS codes, connector kinds and outcome codes; never a patient,
//! a URI or a user.
//!
//! Hooks for parts other branches own (they stay 0 until wired): [`Metrics::cache_hit`],
//! [`Metrics::cache_miss`], [`Metrics::cache_entries`], [`Metrics::hedge`],
//! [`Metrics::breaker_state`]. Policy reloads are read from the engine at scrape time;
//! policy rejections are counted where the gateway refuses a caller.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{LazyLock, Mutex},
    time::Duration,
};

/// Latency buckets, in seconds: 1 ms to 10 s.
const LATENCY: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Records per audit commit.
const BATCH: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

type Labels = Vec<String>;

#[derive(Debug, Clone, Default)]
struct Hist {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Debug)]
enum Values {
    Counter(BTreeMap<Labels, f64>),
    Gauge(BTreeMap<Labels, f64>),
    Histogram(&'static [f64], BTreeMap<Labels, Hist>),
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: Mutex<Values>,
}

impl Family {
    fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        values: Values,
    ) -> Self {
        Self {
            name,
            help,
            labels,
            values: Mutex::new(values),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Values) -> R) -> R {
        f(&mut self.values.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn add(&self, labels: &[&str], v: f64) {
        self.with(|vals| {
            if let Values::Counter(m) | Values::Gauge(m) = vals {
                *m.entry(owned(labels)).or_default() += v;
            }
        });
    }

    fn set(&self, labels: &[&str], v: f64) {
        self.with(|vals| {
            if let Values::Counter(m) | Values::Gauge(m) = vals {
                m.insert(owned(labels), v);
            }
        });
    }

    fn observe(&self, labels: &[&str], v: f64) {
        self.with(|vals| {
            if let Values::Histogram(bounds, m) = vals {
                let h = m.entry(owned(labels)).or_insert_with(|| Hist {
                    counts: vec![0; bounds.len()],
                    ..Hist::default()
                });
                if let Some(i) = bounds.iter().position(|b| v <= *b) {
                    h.counts[i] += 1;
                }
                h.sum += v;
                h.count += 1;
            }
        });
    }

    /// Makes a labelled series exist (at 0) before anything happens to it.
    fn touch(&self, labels: &[&str]) {
        self.with(|vals| match vals {
            Values::Counter(m) | Values::Gauge(m) => {
                m.entry(owned(labels)).or_default();
            }
            Values::Histogram(..) => {}
        });
    }

    fn render(&self, out: &mut String) {
        let kind = self.with(|v| match v {
            Values::Counter(_) => "counter",
            Values::Gauge(_) => "gauge",
            Values::Histogram(..) => "histogram",
        });
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        self.with(|vals| match vals {
            Values::Counter(m) | Values::Gauge(m) => {
                for (l, v) in m.iter() {
                    let _ = writeln!(
                        out,
                        "{}{} {}",
                        self.name,
                        label_set(self.labels, l, None),
                        num(*v)
                    );
                }
            }
            Values::Histogram(bounds, m) => {
                for (l, h) in m.iter() {
                    let mut cumulative = 0;
                    for (b, c) in bounds.iter().zip(&h.counts) {
                        cumulative += c;
                        let le = num(*b);
                        let _ = writeln!(
                            out,
                            "{}_bucket{} {cumulative}",
                            self.name,
                            label_set(self.labels, l, Some(&le))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{}_bucket{} {}",
                        self.name,
                        label_set(self.labels, l, Some("+Inf")),
                        h.count
                    );
                    let _ = writeln!(
                        out,
                        "{}_sum{} {}",
                        self.name,
                        label_set(self.labels, l, None),
                        num(h.sum)
                    );
                    let _ = writeln!(
                        out,
                        "{}_count{} {}",
                        self.name,
                        label_set(self.labels, l, None),
                        h.count
                    );
                }
            }
        });
    }
}

fn owned(labels: &[&str]) -> Labels {
    labels.iter().map(|s| (*s).to_owned()).collect()
}

fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn label_set(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
    Family::new(name, help, labels, Values::Counter(BTreeMap::new()))
}

fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
    Family::new(name, help, labels, Values::Gauge(BTreeMap::new()))
}

fn histogram(
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
) -> Family {
    Family::new(
        name,
        help,
        labels,
        Values::Histogram(bounds, BTreeMap::new()),
    )
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    requests: Family,
    source_calls: Family,
    source_in_flight: Family,
    source_hedges: Family,
    source_breaker: Family,
    cache_hits: Family,
    cache_misses: Family,
    cache_entries: Family,
    policy_reloads: Family,
    policy_rejections: Family,
    audit_write: Family,
    audit_commit: Family,
    audit_batch: Family,
    audit_failures: Family,
    audit_head: Family,
    rate_limited: Family,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// Breaker states as the `tributary_source_breaker_state` gauge encodes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half-open",
            Self::Open => "open",
        }
    }
}

impl Metrics {
    fn new() -> Self {
        let m = Self {
            requests: histogram(
                "tributary_request_duration_seconds",
                "FHIR requests by matched route and status code, and how long they took.",
                &["route", "status"],
                LATENCY,
            ),
            source_calls: histogram(
                "tributary_source_call_duration_seconds",
                "Calls to each source by outcome, and how long they took.",
                &["source", "kind", "outcome"],
                LATENCY,
            ),
            source_in_flight: gauge(
                "tributary_source_calls_in_flight",
                "Calls to each source in flight now.",
                &["source"],
            ),
            source_hedges: counter(
                "tributary_source_hedges_total",
                "Hedged (second) attempts sent to each source.",
                &["source"],
            ),
            source_breaker: gauge(
                "tributary_source_breaker_state",
                "Each source's circuit breaker: 0 closed, 1 half-open, 2 open.",
                &["source"],
            ),
            cache_hits: counter(
                "tributary_cache_hits_total",
                "Source answers served from the cache.",
                &[],
            ),
            cache_misses: counter(
                "tributary_cache_misses_total",
                "Source answers not in the cache.",
                &[],
            ),
            cache_entries: gauge(
                "tributary_cache_entries",
                "Entries in the source answer cache.",
                &[],
            ),
            policy_reloads: counter(
                "tributary_policy_reloads_total",
                "Policy reloads by result (applied, or rejected and the previous policy kept).",
                &["result"],
            ),
            policy_rejections: counter(
                "tributary_policy_rejections_total",
                "Requests refused outright by policy.",
                &[],
            ),
            audit_write: histogram(
                "tributary_audit_write_duration_seconds",
                "From handing a record to the audit writer to its being on disk (or failing).",
                &[],
                LATENCY,
            ),
            audit_commit: histogram(
                "tributary_audit_commit_duration_seconds",
                "One group commit: write and fdatasync of a batch.",
                &[],
                LATENCY,
            ),
            audit_batch: histogram(
                "tributary_audit_commit_records",
                "Records per group commit.",
                &[],
                BATCH,
            ),
            audit_failures: counter(
                "tributary_audit_failures_total",
                "Audit records that could not be written (their responses were 503s).",
                &[],
            ),
            audit_head: gauge(
                "tributary_audit_head_seq",
                "Sequence number the next audit record will get (the chain's length).",
                &[],
            ),
            rate_limited: counter(
                "tributary_rate_limited_total",
                "Requests refused with 429 by the per-user (sub) or per-organisation (org) limit.",
                &["scope"],
            ),
        };
        for scope in ["sub", "org"] {
            m.rate_limited.touch(&[scope]);
        }
        for f in [
            &m.cache_hits,
            &m.cache_misses,
            &m.cache_entries,
            &m.policy_rejections,
            &m.audit_failures,
            &m.audit_head,
        ] {
            f.touch(&[]);
        }
        for r in ["applied", "rejected"] {
            m.policy_reloads.touch(&[r]);
        }
        m
    }

    /// Makes a source's series exist from the start, so dashboards see every source.
    pub fn register_source(&self, ods: &str) {
        self.source_in_flight.touch(&[ods]);
        self.source_hedges.touch(&[ods]);
        self.source_breaker.touch(&[ods]);
    }

    pub fn request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .observe(&[route, &status.to_string()], elapsed.as_secs_f64());
    }

    pub fn source_call(&self, ods: &str, kind: &str, outcome: &str, elapsed: Duration) {
        self.source_calls
            .observe(&[ods, kind, outcome], elapsed.as_secs_f64());
    }

    pub fn source_in_flight(&self, ods: &str, delta: f64) {
        self.source_in_flight.add(&[ods], delta);
    }

    pub fn hedge(&self, ods: &str) {
        self.source_hedges.add(&[ods], 1.0);
    }

    pub fn breaker_state(&self, ods: &str, state: BreakerState) {
        self.source_breaker.set(&[ods], f64::from(state as u8));
    }

    pub fn cache_hit(&self) {
        self.cache_hits.add(&[], 1.0);
    }

    pub fn cache_miss(&self) {
        self.cache_misses.add(&[], 1.0);
    }

    pub fn cache_entries(&self, n: u64) {
        self.cache_entries.set(&[], n as f64);
    }

    pub fn policy_reload(&self, applied: bool) {
        self.policy_reloads
            .add(&[if applied { "applied" } else { "rejected" }], 1.0);
    }

    /// Sets the reload counters from the policy engine's own totals (read at scrape time).
    pub fn policy_reloads(&self, applied: u64, rejected: u64) {
        self.policy_reloads.set(&["applied"], applied as f64);
        self.policy_reloads.set(&["rejected"], rejected as f64);
    }

    pub fn policy_rejection(&self) {
        self.policy_rejections.add(&[], 1.0);
    }

    pub fn audit_write(&self, elapsed: Duration, ok: bool) {
        self.audit_write.observe(&[], elapsed.as_secs_f64());
        if !ok {
            self.audit_failures.add(&[], 1.0);
        }
    }

    pub fn audit_commit(&self, elapsed: Duration, records: usize, _ok: bool) {
        self.audit_commit.observe(&[], elapsed.as_secs_f64());
        self.audit_batch.observe(&[], records as f64);
    }

    /// A request refused by a rate limit; `scope` is `sub` or `org`, never the key itself.
    pub fn rate_limited(&self, scope: &'static str) {
        self.rate_limited.add(&[scope], 1.0);
    }

    pub fn audit_head(&self, next_seq: u64) {
        self.audit_head.set(&[], next_seq as f64);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        render_process(&mut out);
        for f in [
            &self.requests,
            &self.source_calls,
            &self.source_in_flight,
            &self.source_hedges,
            &self.source_breaker,
            &self.cache_hits,
            &self.cache_misses,
            &self.cache_entries,
            &self.policy_reloads,
            &self.policy_rejections,
            &self.audit_write,
            &self.audit_commit,
            &self.audit_batch,
            &self.audit_failures,
            &self.audit_head,
            &self.rate_limited,
        ] {
            f.render(&mut out);
        }
        out
    }
}

/// Process and runtime gauges, read when scraped: what a leak check counts before and after a
/// fault (tasks alive on the tokio runtime, open file descriptors and how many are sockets) and
/// resident memory. Standard `process_*` names so existing dashboards pick them up.
fn render_process(out: &mut String) {
    use std::fmt::Write as _;
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let tasks = handle.metrics().num_alive_tasks();
        let _ = writeln!(
            out,
            "# HELP tributary_runtime_alive_tasks Tasks alive on the gateway's tokio runtime.\n\
             # TYPE tributary_runtime_alive_tasks gauge\ntributary_runtime_alive_tasks {tasks}"
        );
    }
    if let Some((fds, sockets)) = open_fds() {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\n\
             process_open_fds {fds}\n\
             # HELP tributary_process_open_sockets Open file descriptors that are sockets.\n\
             # TYPE tributary_process_open_sockets gauge\ntributary_process_open_sockets {sockets}"
        );
    }
    if let Some(rss) = resident_bytes() {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {rss}"
        );
    }
}

/// Open descriptors and how many of them are sockets, from `/proc/self/fd` (Linux only).
fn open_fds() -> Option<(usize, usize)> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    let (mut fds, mut sockets) = (0, 0);
    for entry in dir.flatten() {
        fds += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
        {
            sockets += 1;
        }
    }
    Some((fds, sockets))
}

/// Resident set size from `/proc/self/statm` (second field, in pages; pages are 4 KiB on the
/// platforms this runs on).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_labels_escaped() {
        let f = histogram("t_seconds", "help.", &["route"], &[0.1, 1.0]);
        f.observe(&["/a\"b"], 0.05);
        f.observe(&["/a\"b"], 0.5);
        f.observe(&["/a\"b"], 5.0);
        let mut out = String::new();
        f.render(&mut out);
        assert!(out.contains("# TYPE t_seconds histogram"));
        assert!(
            out.contains(r#"t_seconds_bucket{route="/a\"b",le="0.1"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"t_seconds_bucket{route="/a\"b",le="1"} 2"#),
            "{out}"
        );
        assert!(
            out.contains(r#"t_seconds_bucket{route="/a\"b",le="+Inf"} 3"#),
            "{out}"
        );
        assert!(out.contains(r#"t_seconds_count{route="/a\"b"} 3"#), "{out}");
    }
}
