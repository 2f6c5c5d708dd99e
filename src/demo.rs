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
    config::{AuthSettings, Budget, Limits, Resilience, SourceConfig},
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
    /// Audit directory (default: a new private directory under the system temp dir).
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
    /// Serve HTTPS (HTTP/2 and HTTP/1.1) with a certificate made at start by a new demo CA;
    /// the CA's PEM file is written and printed (`CA file PATH`) for clients to trust.
    #[arg(long)]
    tls: bool,
    /// Where `--tls` writes the CA certificate (default: `ca.pem` in a new private directory
    /// under the system temp dir).
    #[arg(long, requires = "tls")]
    ca_out: Option<PathBuf>,
    /// Largest request head (request line and headers) in bytes; more is a 431.
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(8192..))]
    max_header_bytes: u32,
    /// A client must send a whole request head within this time (slowloris).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: Duration,
    /// A TLS client must finish its handshake within this time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
    /// A connection with no request in flight this long is closed gracefully.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// A write to a client that makes no progress this long closes the connection.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    write_timeout: Duration,
    /// Connections open at once; past it a plain connection gets a 503, a TLS one is closed.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Largest request body in bytes (POST _search forms); more is a 413.
    #[arg(long, default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    max_body_bytes: u32,
    /// Requests per second per user (token sub); 0 turns the limit off.
    #[arg(long, default_value_t = 50.0)]
    sub_rate: f64,
    /// Requests a user may make at once before the rate applies.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    sub_burst: u32,
    /// Requests per second per organisation (token org); 0 turns the limit off.
    #[arg(long, default_value_t = 500.0)]
    org_rate: f64,
    /// Requests an organisation may make at once before the rate applies.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    org_burst: u32,
}

impl DemoArgs {
    /// The hostile-client limits the flags ask for.
    fn limits(&self) -> Result<Limits, String> {
        let limits = Limits {
            max_header_bytes: self.max_header_bytes as usize,
            header_read_timeout: self.header_read_timeout,
            tls_handshake_timeout: self.tls_handshake_timeout,
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
            max_connections: self.max_connections as usize,
            max_body_bytes: self.max_body_bytes as usize,
            sub_rate: self.sub_rate,
            sub_burst: self.sub_burst,
            org_rate: self.org_rate,
            org_burst: self.org_burst,
        };
        match limits.problems().as_slice() {
            [] => Ok(limits),
            problems => Err(problems.join("; ")),
        }
    }

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

/// A new CA and a server certificate it signed for 127.0.0.1, ::1 and localhost: the CA's
/// PEM (for clients to trust) and the server's TLS config.
pub fn demo_tls() -> Result<(String, Arc<rustls::ServerConfig>), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let e = |e: rcgen::Error| format!("cannot make the demo certificate: {e}");
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(
        DnType::CommonName,
        "Tributary demo CA (made at start, for this run only)",
    );
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    let key = KeyPair::generate().map_err(e)?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(e)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "Tributary demo gateway");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server.signed_by(&key, &issuer).map_err(e)?;
    let private = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| format!("cannot use the demo key: {e}"))?;
    let config =
        crate::config::tls_server_config(vec![cert.der().clone(), ca_cert.der().clone()], private)?;
    Ok((ca_cert.pem(), config))
}

pub async fn run(args: DemoArgs) -> Result<(), String> {
    let limits = args.limits()?;
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
    // The default audit directory is private too: audit records are about patients.
    let audit_dir = match args.audit_dir.clone() {
        Some(dir) => dir,
        None => connectors::synth::launch::private_temp_dir("tributary-demo-audit")
            .map_err(|e| format!("cannot make a directory for the audit trail: {e}"))?,
    };
    let tls = if args.tls {
        let (ca_pem, config) = demo_tls()?;
        let ca_file = match args.ca_out.clone() {
            Some(path) => path,
            // A private directory of its own: a guessable path in a shared /tmp could be a
            // file or symlink someone else planted, and clients trust what it holds.
            None => connectors::synth::launch::private_temp_dir("tributary-demo-ca")
                .map_err(|e| format!("cannot make a directory for the demo CA: {e}"))?
                .join("ca.pem"),
        };
        std::fs::write(&ca_file, ca_pem)
            .map_err(|e| format!("cannot write {}: {e}", ca_file.display()))?;
        Some((ca_file, config))
    } else {
        None
    };
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
        limits,
        tls: tls.as_ref().map(|(_, c)| c.clone()),
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
        Client {
            token: &token,
            org: &org,
            ca_file: tls.as_ref().map(|(f, _)| f.as_path()),
        },
        &samples,
        &args.faults,
    );
    server::stop_signal().await;
    running.shutdown().await;
    drop(launched);
    Ok(())
}

/// What a client needs to talk to the demo: its token, the token's organisation, and the CA
/// to trust under `--tls`.
struct Client<'a> {
    token: &'a str,
    org: &'a OdsCode,
    ca_file: Option<&'a std::path::Path>,
}

fn print_banner(
    region: &Region,
    sources: &usize,
    running: &server::Running,
    client: Client<'_>,
    samples: &[(connectors::NhsNumber, Label)],
    faults: &[(OdsCode, Fault)],
) {
    let Client {
        token,
        org,
        ca_file,
    } = client;
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
    // curl trusts the demo CA only when told to: every command below carries it.
    let curl = match ca_file {
        Some(f) => {
            println!("CA file {}", f.display());
            format!("curl -s --cacert '{}'", f.display())
        }
        None => "curl -s".to_owned(),
    };
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
    println!("  {curl} {base}/metadata | head -c 300; echo");
    println!("  {curl} -H \"Authorization: Bearer $TOKEN\" '{base}/Patient/{example}'");
    println!("  {curl} -H \"Authorization: Bearer $TOKEN\" '{base}/Patient/{example}/$everything'");
    println!("  {curl} -H \"Authorization: Bearer $TOKEN\" '{base}/Condition?patient={example}'");
    println!(
        "  {curl} -H \"Authorization: Bearer $TOKEN\" -H 'Prefer: wait=1' '{base}/Patient/{example}/$everything'"
    );
    println!("  curl -s {}/admin/upstreams", running.admin_url);
    println!("Tributary is ready. Ctrl-C stops it.");
}
