//! Starts a simulated server for every source of a region on loopback, each on its own
//! port, and says how to reach each one (the connector configuration the gateway builds from).
//!
//! A source launched with the `tls` fault serves TLS (HTTPS or MLLP over TLS) and its
//! connector trusts the demo region CA only. While the fault is on, the simulator presents a
//! certificate from another CA (unknown issuer); switched off, it presents one the region CA
//! signed, and the source answers again. The demo PKI (`demo-pki/`) is public: demo only.

use std::{
    io,
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    Region,
    model::{Protocol, Records, SourceSpec},
};
use crate::{
    contract::{ConnectorConfig, OdsCode},
    fault::{Fault, FaultSwitch},
    fhir::{self, FhirConfig},
    hl7v2::Hl7v2Config,
    tls::{TlsConfig, provider},
};

/// One running simulated source.
#[derive(Debug)]
pub struct LaunchedSource {
    pub spec: SourceSpec,
    /// How a connector reaches it.
    pub config: ConnectorConfig,
    /// Flips the simulator's fault at run time.
    pub fault: FaultSwitch,
}

/// The running region. Dropping it stops every simulator and closes their connections.
#[derive(Debug)]
pub struct LaunchedRegion {
    /// In the order of [`Region::sources`].
    pub sources: Vec<LaunchedSource>,
    servers: Vec<JoinHandle<()>>,
    /// Where the demo region CA was written for `tls`-fault sources' connectors.
    pki_dir: Option<PathBuf>,
}

impl LaunchedRegion {
    pub fn source(&self, id: &str) -> Option<&LaunchedSource> {
        self.sources.iter().find(|s| s.spec.id == id)
    }

    pub fn by_ods(&self, ods: &OdsCode) -> Option<&LaunchedSource> {
        self.sources.iter().find(|s| &s.spec.ods == ods)
    }
}

impl Drop for LaunchedRegion {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
        if let Some(dir) = &self.pki_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A new directory under the system temp dir that only this user can enter (0700 on Unix),
/// made with create-new semantics: a name someone else made first (a directory or a symlink
/// planted at a guessable path) is never used, another name is tried instead.
pub fn private_temp_dir(prefix: &str) -> io::Result<PathBuf> {
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut last = None;
    for _ in 0..16 {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{nanos:08x}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary directory name")))
}

/// Binds one listener per source on 127.0.0.1 (an ephemeral port each) and starts its
/// simulator; `faults` sets a source's initial fault by ODS code (others behave).
pub async fn launch(
    region: Arc<Region>,
    faults: &[(OdsCode, Fault)],
) -> io::Result<LaunchedRegion> {
    let records: Arc<dyn Records> = region.clone();
    let mut launched = LaunchedRegion {
        sources: Vec::with_capacity(region.sources().len()),
        servers: Vec::with_capacity(region.sources().len()),
        pki_dir: None,
    };
    let demo_pki = if faults.iter().any(|(_, f)| *f == Fault::Tls) {
        let pki = DemoPki::new()?;
        launched.pki_dir = Some(pki.dir.clone());
        Some(pki)
    } else {
        None
    };
    for spec in region.sources() {
        let initial = faults
            .iter()
            .find(|(ods, _)| ods == &spec.ods)
            .map(|(_, f)| *f)
            .unwrap_or_default();
        let fault = FaultSwitch::new(initial);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let port = listener.local_addr()?.port();
        let fhir_config =
            || ConnectorConfig::Fhir(FhirConfig::new(format!("http://127.0.0.1:{port}/fhir")));
        if let (Fault::Tls, Some(pki)) = (initial, &demo_pki) {
            let tls = Some(pki.server_config(&fault)?);
            let trust = Some(TlsConfig::new(pki.dir.join("region-ca.crt")));
            let (server, config) = match spec.protocol {
                Protocol::Fhir => (
                    fhir::sim::serve_tls(
                        listener,
                        records.clone(),
                        spec.clone(),
                        fault.clone(),
                        tls,
                    ),
                    ConnectorConfig::Fhir(FhirConfig {
                        tls: trust,
                        ..FhirConfig::new(format!("https://127.0.0.1:{port}/fhir"))
                    }),
                ),
                Protocol::Hl7v2 => (
                    crate::hl7v2::sim::serve_tls(
                        listener,
                        records.clone(),
                        spec.clone(),
                        fault.clone(),
                        tls,
                    ),
                    ConnectorConfig::Hl7v2(Hl7v2Config {
                        tls: trust,
                        ..Hl7v2Config::new(format!("127.0.0.1:{port}"))
                    }),
                ),
            };
            launched.servers.push(server);
            launched.sources.push(LaunchedSource {
                spec: spec.clone(),
                config,
                fault,
            });
            continue;
        }
        let (server, config) = match spec.protocol {
            Protocol::Fhir => (
                fhir::sim::serve(listener, records.clone(), spec.clone(), fault.clone()),
                fhir_config(),
            ),
            Protocol::Hl7v2 => (
                crate::hl7v2::sim::serve(listener, records.clone(), spec.clone(), fault.clone()),
                ConnectorConfig::Hl7v2(crate::hl7v2::Hl7v2Config::new(format!("127.0.0.1:{port}"))),
            ),
        };
        launched.servers.push(server);
        launched.sources.push(LaunchedSource {
            spec: spec.clone(),
            config,
            fault,
        });
    }
    Ok(launched)
}

/// The demo region's certificates: its CA (written to a file for connectors), a server
/// certificate it signed for 127.0.0.1, and one for 127.0.0.1 from a rogue CA.
struct DemoPki {
    dir: PathBuf,
    good: Arc<CertifiedKey>,
    rogue: Arc<CertifiedKey>,
}

impl DemoPki {
    fn new() -> io::Result<Self> {
        // One directory per launched region: a process may run several (tests do).
        let dir = private_temp_dir("tributary-demo-pki")?;
        std::fs::write(
            dir.join("region-ca.crt"),
            include_str!("demo-pki/region-ca.crt"),
        )?;
        Ok(Self {
            good: certified(
                include_str!("demo-pki/source.crt"),
                include_str!("demo-pki/source.key"),
            )?,
            rogue: certified(
                include_str!("demo-pki/rogue.crt"),
                include_str!("demo-pki/rogue.key"),
            )?,
            dir,
        })
    }

    /// A server config whose certificate follows the source's fault, handshake by handshake.
    fn server_config(&self, fault: &FaultSwitch) -> io::Result<Arc<ServerConfig>> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(FaultCerts {
                good: self.good.clone(),
                rogue: self.rogue.clone(),
                fault: fault.clone(),
            }));
        Ok(Arc::new(config))
    }
}

fn certified(cert_pem: &str, key_pem: &str) -> io::Result<Arc<CertifiedKey>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io::Error::other)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(io::Error::other)?;
    CertifiedKey::from_der(certs, key, &provider())
        .map(Arc::new)
        .map_err(io::Error::other)
}

/// Presents the rogue certificate while the source's fault is `tls`, the good one otherwise.
#[derive(Debug)]
struct FaultCerts {
    good: Arc<CertifiedKey>,
    rogue: Arc<CertifiedKey>,
    fault: FaultSwitch,
}

impl ResolvesServerCert for FaultCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(if self.fault.get() == Fault::Tls {
            self.rogue.clone()
        } else {
            self.good.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{SourceQuery, synth::model::Label};

    #[tokio::test]
    async fn a_tls_fault_is_an_unknown_issuer_until_it_is_switched_off() {
        let region = Arc::new(super::super::Region::generate(7, 3, 60));
        let (nhs, _) = region
            .sample_patients()
            .into_iter()
            .find(|(_, l)| *l == Label::Typical)
            .unwrap();
        let trust = region.summary(&nhs).unwrap().trusts[0].clone();
        let gp = region.summary(&nhs).unwrap().gp.clone();
        let launched = launch(
            region.clone(),
            &[(trust.clone(), Fault::Tls), (gp.clone(), Fault::Tls)],
        )
        .await
        .unwrap();
        let dir = launched.pki_dir.clone().unwrap();
        assert!(dir.join("region-ca.crt").exists());
        for ods in [&trust, &gp] {
            let source = launched.by_ods(ods).unwrap();
            let connector = source
                .config
                .build(
                    &source.spec.id,
                    ods.clone(),
                    &source.spec.name,
                    source.spec.kind,
                )
                .unwrap();
            let err = connector
                .fetch(SourceQuery::everything(nhs))
                .await
                .unwrap_err();
            assert_eq!(
                err,
                crate::ConnectorError::Tls(crate::tls::TlsFailure::UnknownIssuer),
                "{ods}"
            );
            source.fault.set(Fault::None);
            let record = connector.fetch(SourceQuery::everything(nhs)).await.unwrap();
            assert!(record.knows_patient(), "{ods}");
        }
        drop(launched);
        assert!(
            !dir.exists(),
            "the demo PKI directory is removed with the region"
        );
    }

    #[test]
    fn each_private_temp_dir_is_new_and_only_its_owner_may_enter() {
        let a = private_temp_dir("tributary-test-private").unwrap();
        let b = private_temp_dir("tributary-test-private").unwrap();
        assert_ne!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        }
        std::fs::remove_dir(a).unwrap();
        std::fs::remove_dir(b).unwrap();
    }
}
