//! The load generator: open loop at a constant rate, each request timed from its *intended*
//! send time into an HdrHistogram, so a stalled server is charged for every request it
//! delayed (no coordinated omission). A closed-loop mode (N workers back to back) measures
//! peak throughput only.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;
use tokio::time::Instant;

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(4096)
        .build(connector)
}

/// One request to send: a URL and headers.
#[derive(Clone, Debug)]
pub struct Target {
    pub urls: Arc<Vec<String>>,
    pub headers: Arc<Vec<(String, String)>>,
}

/// What one phase measured.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseResult {
    pub name: String,
    /// Requests per second asked for (open loop) or 0 (closed loop).
    pub rate: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub completed: u64,
    /// Responses by status; `error` for transport failures.
    pub status: BTreeMap<String, u64>,
    /// Completed requests per second.
    pub achieved_rps: f64,
    /// 2xx per second.
    pub goodput_rps: f64,
    pub latency_ms: Percentiles,
    /// Latency of responses with this status only (e.g. 503 sheds).
    pub latency_by_status_ms: BTreeMap<String, Percentiles>,
    /// Requests not sent because too many were in flight (the generator's own safety cap).
    pub dropped: u64,
    /// The histogram's percentile curve, for the plot: (percentile, ms).
    pub curve: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Percentiles {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p999: ms(0.999),
        max: h.max() as f64 / 1e3,
    }
}

fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    [
        0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999,
    ]
    .iter()
    .map(|p| (*p, h.value_at_percentile(*p) as f64 / 1e3))
    .collect()
}

#[derive(Default)]
struct Recorder {
    all: Option<Histogram<u64>>,
    by_status: BTreeMap<String, Histogram<u64>>,
    status: BTreeMap<String, u64>,
}

impl Recorder {
    fn record(&mut self, status: String, micros: u64) {
        let micros = micros.clamp(1, 600_000_000);
        self.all
            .get_or_insert_with(new_hist)
            .saturating_record(micros);
        self.by_status
            .entry(status.clone())
            .or_insert_with(new_hist)
            .saturating_record(micros);
        *self.status.entry(status).or_default() += 1;
    }
}

async fn send(client: &HttpClient, url: &str, headers: &[(String, String)]) -> String {
    let mut req = hyper::Request::get(url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let Ok(req) = req.body(Empty::new()) else {
        return "error".into();
    };
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16().to_string();
            match resp.into_body().collect().await {
                Ok(_) => status,
                Err(_) => "error".into(),
            }
        }
        Err(_) => "error".into(),
    }
}

fn progress(name: &str, done: u64, total: u64, errors: u64) {
    let width = 30usize;
    let filled = if total == 0 {
        width
    } else {
        (done.min(total) as usize * width) / total as usize
    };
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r{name:<28} [{}{}] {done}/{total} ({errors} not 2xx)   ",
        "#".repeat(filled),
        "-".repeat(width - filled)
    );
    let _ = err.flush();
}

/// Sends `rate` requests a second for `duration`, each to the next URL in turn, never waiting
/// for a response before sending the next; waits up to `grace` for stragglers.
pub async fn open_loop(
    name: &str,
    client: &HttpClient,
    target: &Target,
    rate: f64,
    duration: Duration,
    grace: Duration,
) -> PhaseResult {
    const MAX_IN_FLIGHT: u64 = 20_000;
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let in_flight = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let not_ok = Arc::new(AtomicU64::new(0));
    let mut dropped = 0;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_progress = start;
    for i in 0..total {
        let intended = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(intended).await;
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            dropped += 1;
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let (client, url, headers) = (
            client.clone(),
            target.urls[i as usize % target.urls.len()].clone(),
            target.headers.clone(),
        );
        let (rec, flying, finished, failed) = (
            recorder.clone(),
            in_flight.clone(),
            done.clone(),
            not_ok.clone(),
        );
        tasks.spawn(async move {
            let status = send(&client, &url, &headers).await;
            let micros = intended.elapsed().as_micros() as u64;
            if !status.starts_with('2') {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            rec.lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(status, micros);
            flying.fetch_sub(1, Ordering::Relaxed);
            finished.fetch_add(1, Ordering::Relaxed);
        });
        while tasks.try_join_next().is_some() {}
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            progress(
                name,
                done.load(Ordering::Relaxed),
                total,
                not_ok.load(Ordering::Relaxed),
            );
        }
    }
    let sent_for = start.elapsed();
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    progress(
        name,
        done.load(Ordering::Relaxed),
        total,
        not_ok.load(Ordering::Relaxed),
    );
    eprintln!();
    finish(name, rate, sent_for, total - dropped, dropped, &recorder)
}

/// `workers` loops sending back to back for `duration`: peak throughput, not latency.
pub async fn closed_loop(
    name: &str,
    client: &HttpClient,
    target: &Target,
    workers: usize,
    duration: Duration,
) -> PhaseResult {
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let sent = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (client, target, recorder, sent) = (
            client.clone(),
            target.clone(),
            recorder.clone(),
            sent.clone(),
        );
        tasks.spawn(async move {
            let mut i = w;
            while Instant::now() < end {
                let t = Instant::now();
                let url = &target.urls[i % target.urls.len()];
                let status = send(&client, url, &target.headers).await;
                sent.fetch_add(1, Ordering::Relaxed);
                recorder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(status, t.elapsed().as_micros() as u64);
                i += workers;
            }
        });
    }
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let elapsed = start.elapsed().as_millis() as u64;
                progress(name, elapsed.min(duration.as_millis() as u64), duration.as_millis() as u64, 0);
            }
            next = tasks.join_next() => if next.is_none() { break },
        }
    }
    eprintln!();
    let total = sent.load(Ordering::Relaxed);
    finish(name, 0.0, start.elapsed(), total, 0, &recorder)
}

fn finish(
    name: &str,
    rate: f64,
    elapsed: Duration,
    sent: u64,
    dropped: u64,
    recorder: &Mutex<Recorder>,
) -> PhaseResult {
    let r = recorder.lock().unwrap_or_else(|p| p.into_inner());
    let all = r.all.clone().unwrap_or_else(new_hist);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ok: u64 = r
        .status
        .iter()
        .filter(|(s, _)| s.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    PhaseResult {
        name: name.to_owned(),
        rate,
        duration_s: secs,
        sent,
        completed: all.len(),
        status: r.status.clone(),
        achieved_rps: all.len() as f64 / secs,
        goodput_rps: ok as f64 / secs,
        latency_ms: percentiles(&all),
        latency_by_status_ms: r
            .by_status
            .iter()
            .map(|(s, h)| (s.clone(), percentiles(h)))
            .collect(),
        dropped,
        curve: curve(&all),
    }
}
