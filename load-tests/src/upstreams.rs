//! Simulated upstreams for load tests, run as their own process (`load-tests upstreams`), so
//! their CPU never counts against the gateway or the baselines.
//!
//! The connectors crate's simulators (FHIR and HL7 v2, the demo region) answer; in front of
//! each sits a byte-level proxy that adds a latency drawn from a distribution to every
//! request (each client-to-upstream chunk; the FHIR connector makes two HTTP requests per
//! source call) and can misbehave: blackhole (accepts, never reads), stall (reads, never
//! answers), reset (reads, then RST), drip (answers a byte every 20 ms), garbage (answers
//! bytes that are not the protocol), truncated (answers half the reply, then closes).

use std::{
    io::Write,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use connectors::{
    ConnectorConfig,
    fhir::FhirConfig,
    synth::{Region, launch::launch},
};
use rand::Rng;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A latency distribution: lognormal body, plus a share of calls at a fixed tail.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50_ms: f64,
    pub sigma: f64,
    pub tail_share: f64,
    pub tail_ms: f64,
}

impl Latency {
    /// `none`, or `lognormal:P50MS:TAILSHARE:TAILMS` (sigma 0.5).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        if s == "none" {
            return Ok(None);
        }
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["lognormal", p50, share, tail] => Ok(Some(Self {
                p50_ms: p50.parse().map_err(|_| "bad p50")?,
                sigma: 0.5,
                tail_share: share.parse().map_err(|_| "bad tail share")?,
                tail_ms: tail.parse().map_err(|_| "bad tail ms")?,
            })),
            _ => Err(format!(
                "latency `{s}`: none or lognormal:P50MS:TAILSHARE:TAILMS"
            )),
        }
    }

    fn sample(&self) -> Duration {
        let mut rng = rand::rng();
        if rng.random::<f64>() < self.tail_share {
            return Duration::from_secs_f64(self.tail_ms / 1e3);
        }
        // Box-Muller.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        Duration::from_secs_f64((self.p50_ms.ln() + self.sigma * z).exp() / 1e3)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Misbehaviour {
    None,
    Blackhole,
    Stall,
    Reset,
    Drip,
    Garbage,
    Truncated,
}

impl Misbehaviour {
    pub const FAULTS: [Self; 6] = [
        Self::Blackhole,
        Self::Stall,
        Self::Garbage,
        Self::Reset,
        Self::Drip,
        Self::Truncated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Blackhole => "blackhole",
            Self::Stall => "stall",
            Self::Reset => "reset",
            Self::Drip => "drip",
            Self::Garbage => "garbage",
            Self::Truncated => "truncated",
        }
    }
}

pub struct UpstreamArgs {
    pub practices: usize,
    pub patients: usize,
    pub latency: Option<Latency>,
    /// Share of sources (0..1) given a fault, cycling through [`Misbehaviour::FAULTS`].
    pub faulty_share: f64,
    /// Keep only the first N GP practices, no trusts or councils (S1: one source).
    pub only_gps: Option<usize>,
    pub sources_out: PathBuf,
    pub stats_out: PathBuf,
}

async fn proxy(
    listener: TcpListener,
    upstream: String,
    latency: Option<Latency>,
    fault: Misbehaviour,
    requests: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let _ = client.set_nodelay(true);
        let (upstream, requests) = (upstream.clone(), requests.clone());
        tokio::spawn(async move {
            let _ = connection(client, &upstream, latency, fault, &requests).await;
        });
    }
}

async fn connection(
    mut client: TcpStream,
    upstream: &str,
    latency: Option<Latency>,
    fault: Misbehaviour,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    match fault {
        Misbehaviour::Blackhole => {
            // Hold the connection, read nothing, until the peer goes away.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(());
        }
        Misbehaviour::Stall => {
            while client.read(&mut buf).await? > 0 {
                requests.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        Misbehaviour::Reset => {
            let _ = client.read(&mut buf).await?;
            requests.fetch_add(1, Ordering::Relaxed);
            // SO_LINGER 0 turns the close into a reset (blocking on drop is not a concern
            // with a zero linger).
            #[allow(deprecated)]
            client.set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        Misbehaviour::Garbage => {
            while client.read(&mut buf).await? > 0 {
                requests.fetch_add(1, Ordering::Relaxed);
                client
                    .write_all(b"\x00\xffnot a protocol at all\r\n\r\n\x07garbage")
                    .await?;
            }
            return Ok(());
        }
        _ => {}
    }
    let server = TcpStream::connect(upstream).await?;
    server.set_nodelay(true)?;
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return sw.shutdown().await;
            }
            requests.fetch_add(1, Ordering::Relaxed);
            if let Some(l) = latency {
                tokio::time::sleep(l.sample()).await;
            }
            sw.write_all(&buf[..n]).await?;
        }
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                return cw.shutdown().await;
            }
            match fault {
                Misbehaviour::Drip => {
                    for b in &buf[..n] {
                        cw.write_all(std::slice::from_ref(b)).await?;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                Misbehaviour::Truncated => {
                    cw.write_all(&buf[..n / 2]).await?;
                    return cw.shutdown().await;
                }
                _ => cw.write_all(&buf[..n]).await?,
            }
        }
    };
    let _ = tokio::try_join!(up, down);
    Ok(())
}

/// Runs the region behind proxies until killed; writes the `[sources.*]` TOML and then the
/// proxied request count every 200 ms.
pub async fn run(args: UpstreamArgs) -> Result<(), String> {
    let region = Arc::new(Region::generate(42, args.practices, args.patients));
    let launched = launch(region.clone(), &[])
        .await
        .map_err(|e| format!("cannot launch the region: {e}"))?;
    let requests = Arc::new(AtomicU64::new(0));
    let mut toml = String::new();
    let mut kept = 0usize;
    let selected: Vec<_> = launched
        .sources
        .iter()
        .filter(|s| match args.only_gps {
            None => true,
            Some(_) => s.spec.kind == connectors::SourceKind::GpPractice,
        })
        .take(args.only_gps.unwrap_or(usize::MAX))
        .collect();
    let faulty_every = if args.faulty_share > 0.0 {
        (1.0 / args.faulty_share).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    for (i, s) in selected.iter().enumerate() {
        // Demographics never faulty: S4 is about clinical sources.
        let fault = if s.spec.kind != connectors::SourceKind::Demographics
            && faulty_every != usize::MAX
            && i % faulty_every == faulty_every - 1
        {
            let f = Misbehaviour::FAULTS[kept % Misbehaviour::FAULTS.len()];
            kept += 1;
            f
        } else {
            Misbehaviour::None
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| e.to_string())?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let (upstream, config) = match &s.config {
            ConnectorConfig::Fhir(f) => {
                let authority = f
                    .base_url
                    .trim_start_matches("http://")
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                (
                    authority,
                    ConnectorConfig::Fhir(FhirConfig {
                        base_url: format!("http://127.0.0.1:{port}/fhir"),
                        max_body_bytes: f.max_body_bytes,
                        tls: None,
                    }),
                )
            }
            ConnectorConfig::Hl7v2(h) => {
                let mut proxied = h.clone();
                proxied.address = format!("127.0.0.1:{port}");
                (h.address.clone(), ConnectorConfig::Hl7v2(proxied))
            }
        };
        tokio::spawn(proxy(
            listener,
            upstream.clone(),
            args.latency,
            fault,
            requests.clone(),
        ));
        let connector = toml::Value::try_from(&config).map_err(|e| e.to_string())?;
        let kind = serde_json::to_value(s.spec.kind).map_err(|e| e.to_string())?;
        toml.push_str(&format!(
            "[sources.{}]\nods = \"{}\"\nname = \"{}\"\nkind = {}\nfault = \"{}\"\nupstream = \"{}\"\nconnector = {}\n\n",
            s.spec.id,
            s.spec.ods,
            s.spec.name.replace('"', "'"),
            kind,
            fault.as_str(),
            upstream,
            inline(&connector)
        ));
    }
    // Patients, one a line, for the generator.
    let patients: String = region
        .patients()
        .iter()
        .map(|p| format!("# patient {}\n", p.nhs_number.expose()))
        .collect();
    toml.push_str(&patients);
    std::fs::write(&args.sources_out, toml).map_err(|e| e.to_string())?;
    println!("ready");
    let _ = std::io::stdout().flush();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = std::fs::write(
            &args.stats_out,
            requests.load(Ordering::Relaxed).to_string(),
        );
    }
}

/// A TOML value as an inline table or scalar.
fn inline(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) => format!(
            "{{ {} }}",
            t.iter()
                .map(|(k, v)| format!("{k} = {}", inline(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}
