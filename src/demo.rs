//! `tributary demo`: the gateway over a synthetic region of real upstream servers on
//! loopback, with a ready token, sample patients and commands to paste.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Args;
use connectors::{
    OdsCode, SourceKind,
    fault::Fault,
    synth::{Region, launch::launch, model::Label},
};

use crate::{
    auth::{self, TrustedKey},
    cache::CacheSettings,
    config::{AuthSettings, Budget, Resilience, SourceConfig},
    plan::PlanMode,
    server,
};

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: std::net::SocketAddr,
    /// Make a source misbehave (repeatable): ODS=MODE, MODE one of hang, stall, reset, drip,
    /// garbage, wrong-shape, error, oversize, redirect, tls, refused, other-patient,
    /// slow:MS.
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<(OdsCode, Fault)>,
    /// Policy directory.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
    /// Audit directory (default: a new directory under the system temp dir).
    #[arg(long)]
    audit_dir: Option<PathBuf>,
    /// Seed of the synthetic region: the same seed gives the same region.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Number of GP practices.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=2000))]
    practices: u16,
    /// Number of patients.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(10..=2_000_000))]
    patients: u32,
    /// Write every patient's NHS number and labels to FILE, one a line.
    #[arg(long)]
    patients_out: Option<PathBuf>,
    /// Ask every source instead of locating the GP through demographics.
    #[arg(long)]
    broadcast: bool,
    /// Benchmarks only: `off` or `no-sync` prices the audit trail. Never in service.
    #[arg(long = "unsafe-audit", hide = true, default_value = "durable")]
    audit_mode: crate::audit::Mode,
    /// The request budget when the caller does not ask for less.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    budget: Duration,
    /// How long a source's answer is cached (every kind); 0s turns the cache off.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    cache_ttl: Duration,
    /// Serve an expired cached answer, labelled stale, this long when its source fails.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    stale_if_error: Duration,
    /// Shed (503 + Retry-After) data requests beyond this many at once.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Consecutive failures that open a source's breaker.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    breaker_failures: u32,
    /// A breaker's first ejection (then n times as long, at most 300s).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    breaker_ejection: Duration,
    /// Turn hedging off (load tests compare with it on).
    #[arg(long)]
    no_hedge: bool,
    /// Calls in flight to one source at once (the bulkhead).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    source_concurrency: u32,
}

impl DemoArgs {
    /// The cache, hedge, breaker and shed settings the flags ask for.
    fn resilience(&self) -> Resilience {
        let mut r = Resilience::default();
        if self.cache_ttl.is_zero() {
            r.cache = CacheSettings::off();
        } else {
            r.cache.ttl.default = Some(self.cache_ttl);
        }
        r.cache.stale_if_error = self.stale_if_error;
        r.shed.max_in_flight = self.max_in_flight as usize;
        r.breaker.consecutive_failures = self.breaker_failures;
        r.breaker.base_ejection = self.breaker_ejection;
        r.breaker.max_ejection = r.breaker.max_ejection.max(self.breaker_ejection);
        r.hedge.enabled = !self.no_hedge;
        r
    }
}

fn parse_fault(s: &str) -> Result<(OdsCode, Fault), String> {
    let (ods, mode) = s
        .split_once('=')
        .ok_or("a fault is ODS=MODE, e.g. RXL=hang")?;
    Ok((OdsCode::new(ods.trim()), mode.trim().parse()?))
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    let region = Arc::new(Region::generate(
        args.seed,
        usize::from(args.practices),
        args.patients as usize,
    ));
    for (ods, _) in &args.faults {
        if !region.sources().iter().any(|s| &s.ods == ods) {
            return Err(format!(
                "--fault names {ods}, which is not a source in the demo region"
            ));
        }
    }
    if let Some(path) = &args.patients_out {
        let lines: String = region
            .patients()
            .iter()
            .map(|p| {
                format!(
                    "{} {}\n",
                    p.nhs_number.expose(),
                    p.labels
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
            .collect();
        std::fs::write(path, lines).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let launched = launch(region.clone(), &args.faults)
        .await
        .map_err(|e| format!("cannot start the synthetic region: {e}"))?;
    let sources: Vec<SourceConfig> = launched
        .sources
        .iter()
        .map(|s| SourceConfig {
            id: s.spec.id.clone(),
            ods: s.spec.ods.clone(),
            name: s.spec.name.clone(),
            kind: s.spec.kind,
            max_concurrency: args.source_concurrency as usize,
            connector: s.config.clone(),
        })
        .collect();
    let audit_dir = args.audit_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("tributary-demo-audit-{}", std::process::id()))
    });
    let running = server::start(server::Settings {
        listen: args.listen,
        admin_listen: args.admin_listen,
        budget: Budget {
            default: args.budget,
            max: Duration::from_secs(10).max(args.budget),
            ..Budget::default()
        },
        resilience: args.resilience(),
        plan: if args.broadcast {
            PlanMode::Broadcast
        } else {
            PlanMode::Locate
        },
        auth: AuthSettings {
            audience: auth::DEMO_AUDIENCE.to_owned(),
            issuer: None,
            keys: vec![TrustedKey::demo()],
        },
        audit_dir,
        audit_mode: args.audit_mode,
        policy: crate::policy::load_for_serving(&args.policies)?,
        public_base_url: None,
        policy_dir: Some(args.policies.clone()),
        sources,
    })
    .await?;

    let samples = region.sample_patients();
    let typical = samples
        .iter()
        .find(|(_, l)| *l == Label::Typical)
        .map(|(n, _)| *n);
    // The clinician works at the typical patient's first trust, so that patient's record is
    // shared on an established legitimate relationship.
    let org = typical
        .and_then(|n| region.summary(&n))
        .and_then(|p| p.trusts.first().cloned())
        .unwrap_or_else(|| OdsCode::new("RXL"));
    let token = auth::mint_demo_token(
        "demo-clinician",
        "R8000",
        org.as_str(),
        "direct-care",
        Duration::from_secs(8 * 3600),
    )?;
    print_banner(
        &region,
        &launched.sources.len(),
        &running,
        &token,
        &org,
        &samples,
        &args.faults,
    );
    server::stop_signal().await;
    running.shutdown().await;
    drop(launched);
    Ok(())
}

fn print_banner(
    region: &Region,
    sources: &usize,
    running: &server::Running,
    token: &str,
    org: &OdsCode,
    samples: &[(connectors::NhsNumber, Label)],
    faults: &[(OdsCode, Fault)],
) {
    let count = |k: SourceKind| region.sources().iter().filter(|s| s.kind == k).count();
    println!(
        "Tributary demo region (seed {}): trusts {}, GP practices {}, councils {}, private providers {}, demographics services {}; {} patients; {sources} sources, each on its own loopback port.",
        region.seed(),
        count(SourceKind::Trust),
        count(SourceKind::GpPractice),
        count(SourceKind::Council),
        count(SourceKind::PrivateProvider),
        count(SourceKind::Demographics),
        region.patients().len(),
    );
    for (ods, fault) in faults {
        println!("fault {ods} {fault}");
    }
    println!("base URL {}", running.base_url);
    println!("admin URL {}", running.admin_url);
    println!("audit log {}", running.audit_path.display());
    println!(
        "A ready bearer token for a Clinical Practitioner (R8000) at {org}, valid for 8 hours:"
    );
    println!("token {token}");
    for (nhs, label) in samples {
        println!("sample patient {} {}", nhs.expose(), label.as_str());
    }
    let example = samples
        .iter()
        .find(|(_, l)| *l == Label::Typical)
        .or(samples.first())
        .map(|(n, _)| n.expose())
        .unwrap_or_default();
    let base = &running.base_url;
    println!();
    println!("Try (paste into a shell):");
    println!("  TOKEN={token}");
    println!("  curl -s {base}/metadata | head -c 300; echo");
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" '{base}/Patient/{example}'");
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" '{base}/Patient/{example}/$everything'"
    );
    println!("  curl -s -H \"Authorization: Bearer $TOKEN\" '{base}/Condition?patient={example}'");
    println!(
        "  curl -s -H \"Authorization: Bearer $TOKEN\" -H 'Prefer: wait=1' '{base}/Patient/{example}/$everything'"
    );
    println!("  curl -s {}/admin/upstreams", running.admin_url);
    println!("Tributary is ready. Ctrl-C stops it.");
}
