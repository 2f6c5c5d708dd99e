//! `load-tests`: open-loop load scenarios for Tributary, each with its baseline measured in the
//! same run and reported as a ratio (JSON, Markdown and an SVG plot per scenario).
//!
//! Traffic goes to 127.0.0.1 only; every phase is bounded in requests and time.

mod loadgen;
mod procs;
mod report;
mod upstreams;

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use loadgen::{HttpClient, Target, client, closed_loop, open_loop};
use procs::{Env, Gateway, Gauges, Nginx, Upstreams, gauges, proc_stat};
use report::{Machine, Report};

#[derive(Parser)]
#[command(name = "load-tests", about = "Open-loop load tests for Tributary")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// The gateway binary (build it with `cargo build --release`).
    #[arg(long, default_value = "target/release/tributary")]
    gateway: PathBuf,
    /// The repository root (policies, demo key).
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// Where reports go.
    #[arg(long, default_value = "load-tests/reports")]
    out: PathBuf,
    /// Length of each measured phase.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    phase: Duration,
    /// The cache bound for the cached scenarios (S7, S8, S9), MiB.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// S9's whole soak.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    soak: Duration,
    /// S4: how long to wait for the gateway's tasks and sockets to return to their baseline
    /// (hyper's pool evicts, every 90 s, connections idle for 90 s: up to 180 s).
    #[arg(long, default_value = "200s", value_parser = humantime::parse_duration)]
    idle_wait: Duration,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios: smoke, s1, s2, s3, s4, s7, s8, s9 (or all).
    Run {
        #[command(flatten)]
        common: Common,
        scenarios: Vec<String>,
    },
    /// (internal) Serve simulated upstreams until killed.
    Upstreams {
        #[arg(long)]
        sources_out: PathBuf,
        #[arg(long)]
        stats_out: PathBuf,
        #[arg(long, default_value_t = 6)]
        practices: usize,
        #[arg(long, default_value_t = 400)]
        patients: usize,
        #[arg(long, default_value = "none")]
        latency: String,
        #[arg(long, default_value_t = 0.0)]
        faulty_share: f64,
        #[arg(long)]
        only_gps: Option<usize>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Upstreams {
                sources_out,
                stats_out,
                practices,
                patients,
                latency,
                faulty_share,
                only_gps,
            } => {
                upstreams::run(upstreams::UpstreamArgs {
                    practices,
                    patients,
                    latency: upstreams::Latency::parse(&latency)?,
                    faulty_share,
                    only_gps,
                    sources_out,
                    stats_out,
                })
                .await
            }
            Cmd::Run { common, scenarios } => run(common, scenarios).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(common: Common, scenarios: Vec<String>) -> Result<(), String> {
    let work = std::env::temp_dir().join(format!("tributary-load-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let repo = std::fs::canonicalize(&common.repo).map_err(|e| e.to_string())?;
    let env = Env {
        gateway_bin: std::fs::canonicalize(&common.gateway)
            .map_err(|e| format!("{}: {e}", common.gateway.display()))?,
        repo,
        nginx_bin: common.nginx.clone(),
        work: work.clone(),
    };
    let all = ["s1", "s2", "s3", "s4", "s7", "s8", "s9"];
    let list: Vec<String> = if scenarios.iter().any(|s| s == "all") {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        scenarios
    };
    let mut failed = Vec::new();
    for s in &list {
        eprintln!("== {s}");
        let r = match s.as_str() {
            "smoke" => smoke(&env, &common).await,
            "s1" => s1(&env, &common).await,
            "s2" => s2(&env, &common).await,
            "s3" => s3(&env, &common).await,
            "s4" => s4(&env, &common).await,
            "s7" => s7(&env, &common).await,
            "s8" => s8(&env, &common).await,
            "s9" => s9(&env, &common).await,
            other => Err(format!("unknown scenario {other}")),
        };
        match r {
            Ok(report) => {
                report.write(&common.out).map_err(|e| e.to_string())?;
                println!("{}", report.markdown());
            }
            Err(e) => {
                eprintln!("{s} failed: {e}");
                failed.push(s.clone());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("scenarios failed: {}", failed.join(", ")))
    }
}

fn new_report(scenario: &str, title: &str, common: &Common) -> Report {
    Report {
        scenario: scenario.into(),
        title: title.into(),
        command: format!(
            "target/release/load-tests run --phase {} {}{scenario}",
            humantime::format_duration(common.phase),
            if scenario == "s9" {
                format!("--soak {} ", humantime::format_duration(common.soak))
            } else {
                String::new()
            }
        ),
        machine: Machine::here(),
        phases: Vec::new(),
        measures: Vec::new(),
        ratios: Vec::new(),
        notes: Vec::new(),
    }
}

fn target(urls: Vec<String>, headers: Vec<(String, String)>) -> Target {
    Target {
        urls: Arc::new(urls),
        headers: Arc::new(headers),
    }
}

async fn get_body(
    c: &HttpClient,
    url: &str,
    headers: &[(String, String)],
) -> Result<(u16, bytes::Bytes), String> {
    let mut req = hyper::Request::get(url);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = c.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Warms the cache: one request per URL, 16 at a time.
async fn warm(c: &HttpClient, t: &Target) {
    use futures_lite::*;
    let _ = for_each_limited(t.urls.iter().cloned().collect(), 16, |u| {
        let (c, h) = (c.clone(), t.headers.clone());
        async move {
            let _ = get_body(&c, &u, &h).await;
        }
    })
    .await;
}

mod futures_lite {
    use std::future::Future;
    /// Runs `f` over `items`, at most `n` at once.
    pub async fn for_each_limited<T: Send + 'static, F, Fut>(items: Vec<T>, n: usize, f: F)
    where
        F: Fn(T) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        for item in items {
            while set.len() >= n {
                set.join_next().await;
            }
            set.spawn(f(item));
        }
        while set.join_next().await.is_some() {}
    }
}

const NO_CACHE: &str = "[cache]\nmax_bytes = 0\n";

/// Hedges sent, summed over every source (`tributary_source_hedges_total` in `/metrics`).
async fn hedges_sent(c: &HttpClient, gw: &Gateway) -> u64 {
    let Ok((_, body)) = get_body(c, &format!("{}/metrics", gw.admin), &[]).await else {
        return 0;
    };
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| l.starts_with("tributary_source_hedges_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn admin_calls(c: &HttpClient, gw: &Gateway) -> u64 {
    let Ok((_, body)) = get_body(c, &format!("{}/admin/upstreams", gw.admin), &[]).await else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v["upstreams"].as_array().map_or(0, |rows| {
        rows.iter().filter_map(|r| r["calls"].as_u64()).sum()
    })
}

// ---------------------------------------------------------------------------------------------

async fn smoke(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report(
        "smoke",
        "seconds-long run proving the harness works (no timing assertion)",
        common,
    );
    let up = Upstreams::start(env, "smoke", &["--practices", "3", "--patients", "50"]).await?;
    let gw = Gateway::start(env, "smoke", &up, "").await?;
    let c = client();
    let t = target(gw.everything_urls(&up.patients), gw.auth());
    let p = open_loop(
        "gateway 20 req/s",
        &c,
        &t,
        20.0,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .await;
    let ok = p.goodput_rps > 0.0;
    report.phases.push(p);
    gw.stop().await;
    if !ok {
        return Err("no 2xx responses in the smoke run".into());
    }
    report
        .notes
        .push("Smoke only: proves the generator, gateway start-up and report writing work.".into());
    Ok(report)
}

/// S1: one source, gateway passthrough versus nginx proxy_pass to the same upstream.
async fn s1(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report(
        "s1",
        "single-source passthrough vs nginx proxy_pass",
        common,
    );
    let up = Upstreams::start(
        env,
        "s1",
        &["--practices", "6", "--patients", "400", "--only-gps", "1"],
    )
    .await?;
    let gw = Gateway::start(
        env,
        "s1",
        &up,
        &format!("{NO_CACHE}[hedge]\nenabled = false\n"),
    )
    .await?;
    let c = client();
    let upstream = up
        .sources
        .values()
        .next()
        .and_then(|s| s.get("upstream")?.as_str().map(str::to_owned))
        .ok_or("no upstream")?;
    // Patients this GP knows, with the GP's local id (what nginx is asked for).
    let mut known = Vec::new();
    for p in up.patients.iter().take(400) {
        let url = format!(
            "http://{upstream}/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{p}"
        );
        if let Ok((200, body)) = get_body(&c, &url, &[]).await {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if let Some(id) = v["entry"][0]["resource"]["id"].as_str() {
                known.push((p.clone(), id.to_owned()));
            }
        }
        if known.len() >= 40 {
            break;
        }
    }
    if known.is_empty() {
        return Err("the GP knows none of the first patients".into());
    }
    let nginx = Nginx::start(
        env,
        "s1",
        &format!("upstream backend {{ server {upstream}; keepalive 64; }}"),
        "location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }",
    )
    .await?;
    let gw_t = target(
        known
            .iter()
            .map(|(p, _)| format!("{}/Patient/{p}/$everything", gw.base))
            .collect(),
        gw.auth(),
    );
    let path = |id: &str| format!("/fhir/Patient/{id}/$everything");
    let ng_t = target(
        known
            .iter()
            .map(|(_, id)| format!("http://127.0.0.1:{}{}", nginx.port, path(id)))
            .collect(),
        vec![],
    );
    let direct_t = target(
        known
            .iter()
            .map(|(_, id)| format!("http://{upstream}{}", path(id)))
            .collect(),
        vec![],
    );
    warm(&c, &gw_t).await;
    let d = common.phase;
    let g_peak = closed_loop("gateway peak (32 workers)", &c, &gw_t, 32, d).await;
    let n_peak = closed_loop("nginx peak (32 workers)", &c, &ng_t, 32, d).await;
    let rate = (n_peak.achieved_rps.min(g_peak.achieved_rps) * 0.5).clamp(20.0, 500.0);
    let g = open_loop(
        &format!("gateway {rate:.0} req/s"),
        &c,
        &gw_t,
        rate,
        d,
        Duration::from_secs(10),
    )
    .await;
    let n = open_loop(
        &format!("nginx {rate:.0} req/s"),
        &c,
        &ng_t,
        rate,
        d,
        Duration::from_secs(10),
    )
    .await;
    let u = open_loop(
        &format!("upstream direct {rate:.0} req/s"),
        &c,
        &direct_t,
        rate,
        d,
        Duration::from_secs(10),
    )
    .await;
    let ratio = g_peak.goodput_rps / n_peak.achieved_rps.max(1e-9);
    report.ratio(
        "gateway req/s / nginx req/s",
        ratio,
        ">= 1.0",
        Some(ratio >= 1.0),
    );
    report.measure(
        "gateway added p99 (vs direct)",
        g.latency_ms.p99 - u.latency_ms.p99,
        "ms",
    );
    report.measure(
        "nginx added p99 (vs direct)",
        n.latency_ms.p99 - u.latency_ms.p99,
        "ms",
    );
    report.notes.push("The gateway does two upstream HTTP requests per call (Patient search, then $everything), parses, maps, merges, applies policy and writes an audit line; nginx forwards one $everything request's bytes. Generator, gateway, nginx and the upstream share the same 2 cores.".into());
    report.phases.extend([g_peak, n_peak, g, n, u]);
    nginx.stop().await;
    gw.stop().await;
    Ok(report)
}

/// S2: gateway CPU per upstream call (locate ~9 sources; broadcast ~300) versus a raw hyper
/// client making the same FHIR calls.
async fn s2(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report("s2", "CPU per upstream call vs a raw hyper client", common);
    let c = client();
    for (name, practices, rate) in [("locate", "20", 40.0), ("broadcast", "290", 4.0)] {
        let mut args = vec!["--practices", practices, "--patients", "2000"];
        if name == "broadcast" {
            args.push("--only-gps");
            args.push("300");
        }
        let up = Upstreams::start(env, &format!("s2-{name}"), &args).await?;
        let gw = Gateway::start(
            env,
            &format!("s2-{name}"),
            &up,
            &format!("{NO_CACHE}[budget]\ndefault = \"5s\"\n"),
        )
        .await?;
        let t = target(gw.everything_urls(&up.patients), gw.auth());
        let calls0 = admin_calls(&c, &gw).await;
        let before = proc_stat(gw.pid);
        let p = open_loop(
            &format!("{name}: gateway {rate} req/s ({} sources)", up.count()),
            &c,
            &t,
            rate,
            common.phase,
            Duration::from_secs(10),
        )
        .await;
        let after = proc_stat(gw.pid);
        let calls = admin_calls(&c, &gw).await.saturating_sub(calls0).max(1);
        let per_call = (after.cpu_s - before.cpu_s) * 1e6 / calls as f64;
        report.measure(
            &format!("{name}: gateway CPU per upstream call"),
            per_call,
            "µs",
        );
        report.measure(&format!("{name}: upstream calls"), calls as f64, "");
        report.measure(
            &format!("{name}: gateway RSS at end (cache off, bound 0)"),
            after.rss_mb,
            "MB",
        );
        report.phases.push(p);
        gw.stop().await;

        // Baseline: the same number of FHIR calls (search, then $everything) with hyper.
        let fhir: Vec<String> = up
            .sources
            .values()
            .filter(|s| {
                s.get("connector")
                    .and_then(|c| c.get("type"))
                    .and_then(|t| t.as_str())
                    == Some("fhir")
            })
            .filter_map(|s| s.get("upstream")?.as_str().map(str::to_owned))
            .collect();
        let n = (calls as usize).min(20_000);
        let patients = up.patients.clone();
        let me = std::process::id();
        let b0 = proc_stat(me);
        let jobs: Vec<(String, String)> = (0..n)
            .map(|i| {
                (
                    fhir[i % fhir.len()].clone(),
                    patients[i % patients.len()].clone(),
                )
            })
            .collect();
        let bc = c.clone();
        futures_lite::for_each_limited(jobs, 32, move |(host, p)| {
            let c = bc.clone();
            async move {
                let url = format!(
                    "http://{host}/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{p}"
                );
                if let Ok((_, body)) = get_body(&c, &url, &[]).await {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    if let Some(id) = v["entry"][0]["resource"]["id"].as_str() {
                        let url = format!("http://{host}/fhir/Patient/{id}/$everything");
                        if let Ok((_, body)) = get_body(&c, &url, &[]).await {
                            let _: serde_json::Value =
                                serde_json::from_slice(&body).unwrap_or_default();
                        }
                    }
                }
            }
        })
        .await;
        let b1 = proc_stat(me);
        let raw = (b1.cpu_s - b0.cpu_s) * 1e6 / n as f64;
        report.measure(
            &format!("{name}: raw hyper CPU per FHIR call (search + $everything, JSON parsed)"),
            raw,
            "µs",
        );
        report.ratio(
            &format!("{name}: gateway µs per call / raw hyper"),
            per_call / raw.max(1e-9),
            "gateway <= 60 µs per call",
            Some(per_call <= 60.0),
        );
    }
    report.notes.push("CPU from /proc/<pid>/stat (10 ms ticks) over the whole phase, divided by the source calls the gateway counted (/admin/upstreams). The raw client's CPU is the harness's own over the same number of FHIR calls (the harness runs nothing else meanwhile; the upstreams are another process). Broadcast uses GP practices only (all FHIR); locate includes 5 HL7 v2 trusts.".into());
    Ok(report)
}

/// S3: heavy-tailed upstreams, hedging on versus off.
async fn s3(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report("s3", "heavy-tailed upstreams: hedging on vs off", common);
    let up = Upstreams::start(
        env,
        "s3",
        &[
            "--practices",
            "20",
            "--patients",
            "2000",
            "--latency",
            "lognormal:20:0.01:1000",
        ],
    )
    .await?;
    let c = client();
    let rate = 20.0;
    let mut results = Vec::new();
    for (name, hedge) in [
        ("hedging off", "enabled = false"),
        ("hedging on (p95)", "enabled = true"),
        ("hedging on (p97)", "enabled = true\npercentile = 0.97"),
    ] {
        let gw = Gateway::start(
            env,
            &format!("s3-{}", hedge.len()),
            &up,
            &format!("{NO_CACHE}[hedge]\n{hedge}\n[budget]\ndefault = \"3s\"\n"),
        )
        .await?;
        let t = target(gw.everything_urls(&up.patients), gw.auth());
        // Warm-up: the hedge needs the sources' percentiles, and each source's budget its
        // deposits (5 % of its calls over the last 60 s): a GP practice asked once a second
        // can afford its first hedge only after 20 calls.
        let _ = open_loop(
            &format!("{name} warm-up"),
            &c,
            &t,
            rate,
            Duration::from_secs(60),
            Duration::from_secs(5),
        )
        .await;
        let r0 = up.requests().await;
        let p = open_loop(
            &format!("{name} {rate} req/s"),
            &c,
            &t,
            rate,
            common.phase,
            Duration::from_secs(10),
        )
        .await;
        let r1 = up.requests().await;
        let (calls, hedged) = (admin_calls(&c, &gw).await, hedges_sent(&c, &gw).await);
        report.measure(
            &format!("{name}: source calls / hedges sent (incl. warm-up)"),
            calls as f64,
            &format!("/ {hedged}"),
        );
        results.push((p.clone(), (r1 - r0) as f64 / p.completed.max(1) as f64));
        report.phases.push(p);
        gw.stop().await;
    }
    let off = &results[0];
    report.measure(
        "upstream requests per gateway request, hedging off",
        off.1,
        "",
    );
    for (label, on) in [("p95", &results[1]), ("p97", &results[2])] {
        report.measure(
            &format!("upstream requests per gateway request, hedging on ({label})"),
            on.1,
            "",
        );
        let extra = on.1 / off.1.max(1e-9) - 1.0;
        report.ratio(
            &format!("{label} trigger: extra upstream load"),
            extra,
            "<= 0.05",
            Some(extra <= 0.05),
        );
        for (q, a, b) in [
            ("p50", off.0.latency_ms.p50, on.0.latency_ms.p50),
            ("p99", off.0.latency_ms.p99, on.0.latency_ms.p99),
            ("p99.9", off.0.latency_ms.p999, on.0.latency_ms.p999),
        ] {
            let r = a / b.max(1e-9);
            report.ratio(
                &format!("{label} trigger: {q} off / on"),
                r,
                if q == "p99.9" { ">= 10" } else { "-" },
                (q == "p99.9").then_some(r >= 10.0),
            );
        }
    }
    report.notes.push("Every upstream HTTP request (the FHIR connector makes two per source call; HL7 v2 one) is delayed by a lognormal (p50 20 ms, sigma 0.5) with 1 % at 1 s. About 10 sources per request (locate), so a request meets a 1 s tail often. Cache off.".into());
    Ok(report)
}

/// S4: 5 % of sources blackholed, stalled or sending garbage.
async fn s4(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report(
        "s4",
        "5 % of sources misbehaving: deadline and leaks",
        common,
    );
    let up = Upstreams::start(
        env,
        "s4",
        &[
            "--practices",
            "60",
            "--patients",
            "2000",
            "--only-gps",
            "60",
            "--faulty-share",
            "0.05",
        ],
    )
    .await?;
    let faults: Vec<String> = up
        .sources
        .iter()
        .filter_map(|(id, s)| {
            let f = s.get("fault")?.as_str()?;
            (f != "none").then(|| format!("{id}={f}"))
        })
        .collect();
    report.notes.push(format!(
        "{} sources, broadcast; faulty: {}",
        up.count(),
        faults.join(", ")
    ));
    let deadline_ms = 1000.0;
    // Sources are FHIR GP practices: hyper's pool keeps idle connections without a per-host cap
    // for 90 to 180 s, so what bounds them is the per-source concurrency limit (each connection
    // was in use by one call at some moment).
    let per_source_cap = 64;
    let idle_cap = up.count() as u64 * per_source_cap;
    let mut leaks_total = 0u64;
    for (name, breaker) in [("breakers on", "true"), ("breakers off", "false")] {
        let gw = Gateway::start(
            env,
            &format!("s4-{breaker}"),
            &up,
            &format!("{NO_CACHE}[budget]\ndefault = \"1s\"\n[breaker]\nenabled = {breaker}\n"),
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = gauges(&gw.admin).await?;
        // A client of its own, dropped after the phase: its keep-alive connections to the
        // gateway close, so what stays open afterwards is the gateway's own.
        let c = client();
        let t = target(gw.everything_urls(&up.patients), gw.auth());
        let p = open_loop(
            &format!("{name} 10 req/s"),
            &c,
            &t,
            10.0,
            common.phase,
            Duration::from_secs(10),
        )
        .await;
        drop(c);
        // Let cancelled calls close; then count what is left.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let soon = gauges(&gw.admin).await?;
        // Wait for the idle pool to drain: a leak is whatever outlives it.
        let waited = tokio::time::Instant::now();
        let mut settled = soon;
        while (settled.tasks > before.tasks || settled.sockets > before.sockets)
            && waited.elapsed() < common.idle_wait
        {
            tokio::time::sleep(Duration::from_secs(2)).await;
            settled = gauges(&gw.admin).await?;
        }
        let settle_s = waited.elapsed().as_secs_f64() + 3.0;
        let leaked_tasks = settled.tasks.saturating_sub(before.tasks);
        let leaked_sockets = settled.sockets.saturating_sub(before.sockets);
        leaks_total += leaked_tasks + leaked_sockets;
        report.ratio(
            &format!("{name}: worst latency / deadline"),
            p.latency_ms.max / deadline_ms,
            "<= 1.02",
            Some(p.latency_ms.max / deadline_ms <= 1.02),
        );
        let show = |g: &Gauges| format!("{} tasks, {} sockets, {} fds", g.tasks, g.sockets, g.fds);
        report.notes.push(format!(
            "{name}: before {}; 3 s after the phase {} (+{} sockets: idle upstream connections, at most {idle_cap} = {} sources x {per_source_cap}); {settle_s:.0} s after {}",
            show(&before),
            show(&soon),
            soon.sockets.saturating_sub(before.sockets),
            up.count(),
            show(&settled),
        ));
        report.measure(
            &format!("{name}: tasks left over after {settle_s:.0} s"),
            leaked_tasks as f64,
            "",
        );
        report.measure(
            &format!("{name}: sockets left over after {settle_s:.0} s"),
            leaked_sockets as f64,
            "",
        );
        report.measure(
            &format!("{name}: idle sockets 3 s after (cap {idle_cap})"),
            soon.sockets.saturating_sub(before.sockets) as f64,
            "",
        );
        report.phases.push(p);
        gw.stop().await;
    }
    report.ratio(
        "leaked tasks + sockets (both configs)",
        leaks_total as f64,
        "0",
        Some(leaks_total == 0),
    );
    report.notes.push(format!("Latency is from the intended send time at the client, so it includes the client's and loopback's share; the deadline is the request budget (1 s). Leaks: the gateway's own gauges (/metrics: tokio tasks alive, open sockets) are read before the phase, 3 s after it (the generator's connections closed), and then every 2 s until both are back at the baseline or {} s pass; hyper's pool checks every 90 s for connections idle 90 s (so up to 180 s), every pooled connection has a task of its own and every source's pool an idle-reaper task while it holds connections, so tasks and sockets must both return to the baseline once the pools are empty.", common.idle_wait.as_secs()));
    Ok(report)
}

/// A gateway with the cache on and every patient's answer cached.
async fn cached_gateway(
    env: &Env,
    name: &str,
    up: &Upstreams,
    extra: &str,
    c: &HttpClient,
    cache_mib: u64,
) -> Result<(Gateway, Target), String> {
    let cache_bytes = cache_mib * 1024 * 1024;
    let gw = Gateway::start(
        env,
        name,
        up,
        &format!("[cache]\nmax_bytes = {cache_bytes}\n[cache.ttl]\ndefault = \"1h\"\n{extra}"),
    )
    .await?;
    let t = target(gw.everything_urls(&up.patients), gw.auth());
    warm(c, &t).await;
    Ok((gw, t))
}

/// S7: cache-hit `$everything` versus nginx serving the same bytes.
async fn s7(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report(
        "s7",
        "cache-hit $everything vs nginx serving the same bytes",
        common,
    );
    let up = Upstreams::start(env, "s7", &["--practices", "6", "--patients", "400"]).await?;
    let c = client();
    let (gw, _) = cached_gateway(env, "s7", &up, "", &c, common.cache_mib).await?;
    let patient = up.patients.first().ok_or("no patients")?;
    let url = format!("{}/Patient/{patient}/$everything", gw.base);
    let (_, body) = get_body(&c, &url, &gw.auth()).await?;
    let root = env.work.join("s7-static");
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    std::fs::write(root.join("everything.json"), &body).map_err(|e| e.to_string())?;
    let nginx = Nginx::start(env, "s7", "", &format!("location / {{ root {}; default_type application/fhir+json; try_files /everything.json =404; }}", root.display())).await?;
    let gw_t = target(vec![url], gw.auth());
    let ng_t = target(
        vec![format!(
            "http://127.0.0.1:{}/fhir/Patient/{patient}/$everything",
            nginx.port
        )],
        vec![],
    );
    let g = closed_loop(
        "gateway cache hit (32 workers)",
        &c,
        &gw_t,
        32,
        common.phase,
    )
    .await;
    let n = closed_loop("nginx static (32 workers)", &c, &ng_t, 32, common.phase).await;
    let ratio = g.goodput_rps / n.achieved_rps.max(1e-9);
    report.ratio(
        "gateway req/s / nginx req/s",
        ratio,
        ">= 0.5",
        Some(ratio >= 0.5),
    );
    report.measure("response size", body.len() as f64, "bytes");
    report.notes.push("A cache hit still authenticates the token, merges, applies policy and writes the audit record before answering; nginx sends a file.".into());
    report.phases.extend([g, n]);
    nginx.stop().await;
    gw.stop().await;
    Ok(report)
}

/// S8: overload at twice capacity, with shedding.
async fn s8(env: &Env, common: &Common) -> Result<Report, String> {
    let mut report = new_report(
        "s8",
        "overload at 2x capacity: goodput and shed latency",
        common,
    );
    let up = Upstreams::start(env, "s8", &["--practices", "6", "--patients", "400"]).await?;
    let c = client();
    let (gw, t) = cached_gateway(
        env,
        "s8",
        &up,
        "[shed]\nmax_in_flight = 64\n",
        &c,
        common.cache_mib,
    )
    .await?;
    let peak = closed_loop("capacity (32 workers)", &c, &t, 32, common.phase).await;
    let rate = (peak.goodput_rps * 2.0).max(10.0);
    let over = open_loop(
        &format!("2x capacity {rate:.0} req/s"),
        &c,
        &t,
        rate,
        common.phase,
        Duration::from_secs(10),
    )
    .await;
    let goodput = over.goodput_rps / peak.goodput_rps.max(1e-9);
    report.ratio(
        "goodput at 2x / peak",
        goodput,
        ">= 0.9",
        Some(goodput >= 0.9),
    );
    if let Some(s) = over.latency_by_status_ms.get("503") {
        report.measure("shed (503) p50", s.p50, "ms");
        report.measure("shed (503) p99", s.p99, "ms");
    }
    if let Some(s) = over.latency_by_status_ms.get("200") {
        report.measure("served (200) p99", s.p99, "ms");
    }
    report.notes.push("Cache warm (every patient), [shed] max_in_flight = 64. The generator shares the 2 cores with the gateway and the upstreams, so at 2x it competes for CPU with what it measures.".into());
    report.phases.extend([peak, over]);
    gw.stop().await;
    Ok(report)
}

/// S9: half capacity with the cache full (30 minutes unless `--soak` says less); RSS, sockets,
/// tasks and p99 over time.
async fn s9(env: &Env, common: &Common) -> Result<Report, String> {
    let title = if common.soak < Duration::from_secs(30 * 60) {
        "soak at half capacity, cache full (SHORTENED)"
    } else {
        "soak at half capacity, cache full"
    };
    let mut report = new_report("s9", title, common);
    let up = Upstreams::start(env, "s9", &["--practices", "6", "--patients", "2000"]).await?;
    let c = client();
    let (gw, t) = cached_gateway(env, "s9", &up, "", &c, common.cache_mib).await?;
    let peak = closed_loop("capacity (32 workers)", &c, &t, 32, common.phase).await;
    let rate = (peak.goodput_rps * 0.5).max(10.0);
    let minutes = (common.soak.as_secs() / 60).max(2);
    let pid = gw.pid;
    let admin = gw.admin.clone();
    let samples_handle = Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let sh = samples_handle.clone();
    let sampler2 = tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        loop {
            // The gateway's own gauges; /proc if /metrics cannot be read.
            let g = gauges(&admin).await.ok();
            let mut s = proc_stat(pid);
            if let Some(g) = g {
                s.sockets = g.sockets;
                s.fds = g.fds;
                s.rss_mb = g.rss_mb;
            }
            let tasks = g.map(|g| g.tasks);
            sh.lock()
                .await
                .push((start.elapsed().as_secs_f64(), s, tasks));
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });
    let mut phases = Vec::new();
    for m in 0..minutes {
        phases.push(
            open_loop(
                &format!("minute {} at {rate:.0} req/s", m + 1),
                &c,
                &t,
                rate,
                Duration::from_secs(60),
                Duration::from_secs(10),
            )
            .await,
        );
    }
    sampler2.abort();
    let samples = samples_handle.lock().await.clone();
    // RSS slope after the first minute (warm-up), MB per minute, least squares.
    let after: Vec<(f64, f64)> = samples
        .iter()
        .filter(|(t, _, _)| *t >= 60.0)
        .map(|(t, s, _)| (*t / 60.0, s.rss_mb))
        .collect();
    let slope = if after.len() >= 2 {
        let n = after.len() as f64;
        let (mx, my) = (
            after.iter().map(|p| p.0).sum::<f64>() / n,
            after.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let num: f64 = after.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let den: f64 = after.iter().map(|p| (p.0 - mx).powi(2)).sum();
        num / den.max(1e-9)
    } else {
        0.0
    };
    let (first, last) = (phases.first().cloned(), phases.last().cloned());
    if let (Some(f), Some(l)) = (first, last) {
        let r = l.latency_ms.p99 / f.latency_ms.p99.max(1e-9);
        report.ratio("p99(end) / p99(start)", r, "<= 1.2", Some(r <= 1.2));
    }
    report.measure("RSS slope after the first minute", slope, "MB/min");
    if let (Some(a), Some(b)) = (samples.first(), samples.last()) {
        report.measure(
            "RSS start / end",
            a.1.rss_mb,
            &format!("MB / {:.1} MB", b.1.rss_mb),
        );
        report.measure(
            "sockets start / end",
            a.1.sockets as f64,
            &format!("/ {}", b.1.sockets),
        );
        report.measure(
            "threads start / end",
            a.1.threads as f64,
            &format!("/ {}", b.1.threads),
        );
        report.measure(
            "tokio tasks start / end",
            a.2.unwrap_or(0) as f64,
            &format!("/ {}", b.2.map_or("?".to_owned(), |t| t.to_string())),
        );
    }
    let shortened = if minutes < 30 {
        format!("SHORTENED: {minutes} minutes instead of 30. ")
    } else {
        format!("{minutes} minutes. ")
    };
    report.notes.push(format!(
        "{shortened}Samples every 10 s: {}",
        samples
            .iter()
            .map(|(t, s, tasks)| format!(
                "{t:.0}s {:.1}MB {}sock {}tasks",
                s.rss_mb,
                s.sockets,
                tasks.map_or("?".to_owned(), |t| t.to_string())
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    report.phases.push(peak);
    report.phases.extend(phases);
    gw.stop().await;
    Ok(report)
}
