//! TLS to upstreams, FHIR and MLLP alike: real simulators serving TLS on 127.0.0.1:0, real
//! connectors, certificates made by rcgen at test time. Every failure case must become the
//! right [`TlsFailure`] for that one source, and the simulator must keep serving.
#![allow(clippy::unwrap_used)]

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{net::TcpListener, task::JoinHandle};

use super::{
    TlsConfig, TlsFailure, server_config,
    test_pki::{TestCa, Validity},
};
use crate::{
    Connector, ConnectorConfig, ConnectorError, OdsCode, SourceQuery,
    fault::FaultSwitch,
    fhir::{self, FhirConfig},
    hl7v2::{self, Hl7v2Config, Hl7v2Connector},
    nhs::NhsNumber,
    synth::{
        Region,
        model::{Protocol, Records, SourceSpec},
    },
};

/// A directory for one test's PEM files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tributary-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The CAs of one test: the source's, an unrelated one, and the one the source trusts for
/// the gateway's client certificates.
struct Pki {
    dir: Scratch,
    source_ca: TestCa,
    other_ca: TestCa,
    client_ca: TestCa,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: Scratch::new(),
            source_ca: TestCa::new("Source CA"),
            other_ca: TestCa::new("Unrelated CA"),
            client_ca: TestCa::new("Gateway client CA"),
        };
        pki.source_ca.write(&pki.dir.0, "source-ca");
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// A client config trusting the source CA, with a client certificate signed by `ca`.
    fn client(&self, cert_from: Option<&TestCa>) -> TlsConfig {
        let config = TlsConfig::new(self.path("source-ca.crt"));
        match cert_from {
            None => config,
            Some(ca) => {
                let (cert, key) = ca.client("tributary.gateway").write(&self.dir.0, "client");
                config.with_client_cert(cert, key)
            }
        }
    }
}

/// How the simulated source presents itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    Good,
    Mutual,
    WrongCa,
    Expired,
    NotYetValid,
    WrongHost,
    NoClientCert,
    UntrustedClientCert,
    ServerNameOverride,
}

impl Case {
    /// The simulator's server config.
    fn server(self, pki: &Pki) -> Arc<rustls::ServerConfig> {
        let here = ["127.0.0.1", "localhost"];
        let (cert, client_ca) = match self {
            Self::Good => (pki.source_ca.server(&here, Validity::Current), None),
            Self::WrongCa => (pki.other_ca.server(&here, Validity::Current), None),
            Self::Expired => (pki.source_ca.server(&here, Validity::Expired), None),
            Self::NotYetValid => (pki.source_ca.server(&here, Validity::Future), None),
            Self::WrongHost => (
                pki.source_ca
                    .server(&["pas.elsewhere.example"], Validity::Current),
                None,
            ),
            Self::ServerNameOverride => (
                pki.source_ca
                    .server(&["pas.nhs.example"], Validity::Current),
                None,
            ),
            Self::Mutual | Self::NoClientCert | Self::UntrustedClientCert => (
                pki.source_ca.server(&here, Validity::Current),
                Some(pki.client_ca.cert_pem.as_bytes()),
            ),
        };
        server_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), client_ca).unwrap()
    }

    /// The gateway's TLS config for the source.
    fn client(self, pki: &Pki) -> TlsConfig {
        match self {
            Self::Mutual => pki.client(Some(&pki.client_ca)),
            Self::UntrustedClientCert => pki.client(Some(&pki.other_ca)),
            Self::ServerNameOverride => TlsConfig {
                server_name: Some("pas.nhs.example".into()),
                ..pki.client(None)
            },
            _ => pki.client(None),
        }
    }

    fn expected(self) -> Option<TlsFailure> {
        match self {
            Self::Good | Self::Mutual | Self::ServerNameOverride => None,
            Self::WrongCa => Some(TlsFailure::UnknownIssuer),
            Self::Expired => Some(TlsFailure::Expired),
            Self::NotYetValid => Some(TlsFailure::NotYetValid),
            Self::WrongHost => Some(TlsFailure::NameMismatch),
            Self::NoClientCert => Some(TlsFailure::ClientCertRequired),
            Self::UntrustedClientCert => Some(TlsFailure::ClientCertRejected),
        }
    }
}

const CASES: [Case; 9] = [
    Case::Good,
    Case::Mutual,
    Case::WrongCa,
    Case::Expired,
    Case::NotYetValid,
    Case::WrongHost,
    Case::NoClientCert,
    Case::UntrustedClientCert,
    Case::ServerNameOverride,
];

/// A region, one source of `protocol` in it, and a patient that source knows.
fn subject(protocol: Protocol) -> (Arc<Region>, SourceSpec, NhsNumber) {
    let region = Arc::new(Region::generate(7, 3, 60));
    let (spec, nhs) = region
        .patients()
        .iter()
        .find_map(|p| {
            let ods: &OdsCode = match protocol {
                Protocol::Fhir => &p.gp,
                Protocol::Hl7v2 => p.trusts.first()?,
            };
            let spec = region
                .sources()
                .iter()
                .find(|s| &s.ods == ods && s.protocol == protocol)?;
            Some((spec.clone(), p.nhs_number))
        })
        .unwrap();
    (region, spec, nhs)
}

/// Starts `spec`'s simulator serving TLS as `server` says; returns its port.
async fn start(
    region: &Arc<Region>,
    spec: &SourceSpec,
    server: Arc<rustls::ServerConfig>,
) -> (u16, AbortOnDrop) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let records: Arc<dyn Records> = region.clone();
    let fault = FaultSwitch::default();
    let task = match spec.protocol {
        Protocol::Fhir => {
            fhir::sim::serve_tls(listener, records, spec.clone(), fault, Some(server))
        }
        Protocol::Hl7v2 => {
            hl7v2::sim::serve_tls(listener, records, spec.clone(), fault, Some(server))
        }
    };
    (port, AbortOnDrop(task))
}

fn connector_config(protocol: Protocol, port: u16, tls: TlsConfig) -> ConnectorConfig {
    match protocol {
        Protocol::Fhir => ConnectorConfig::Fhir(FhirConfig {
            tls: Some(tls),
            ..FhirConfig::new(format!("https://127.0.0.1:{port}/fhir"))
        }),
        Protocol::Hl7v2 => ConnectorConfig::Hl7v2(Hl7v2Config {
            tls: Some(tls),
            ..Hl7v2Config::new(format!("127.0.0.1:{port}"))
        }),
    }
}

fn build(spec: &SourceSpec, config: &ConnectorConfig) -> Arc<dyn Connector> {
    assert_eq!(config.validate(), Vec::<String>::new());
    config
        .build(&spec.id, spec.ods.clone(), &spec.name, spec.kind)
        .unwrap()
}

async fn every_case_is_classified(protocol: Protocol) {
    let (region, spec, nhs) = subject(protocol);
    for case in CASES {
        let pki = Pki::new();
        let (port, _sim) = start(&region, &spec, case.server(&pki)).await;
        let connector = build(&spec, &connector_config(protocol, port, case.client(&pki)));
        let result = connector.fetch(SourceQuery::everything(nhs)).await;
        match (case.expected(), result) {
            (None, Ok(record)) => {
                assert!(
                    record.knows_patient(),
                    "{protocol:?} {case:?}: empty answer"
                )
            }
            // TLS 1.3 checks a client certificate after the client's side of the handshake
            // is done: the server's alert can reach hyper's connection task while the request
            // is still being written, and the pooled client then fails the request as a
            // transport error without the alert in it. MLLP reads the alert itself, so only
            // FHIR can see this race; the source still fails alone, as a transport error.
            (Some(_), Err(ConnectorError::Transport(_)))
                if protocol == Protocol::Fhir
                    && matches!(case, Case::NoClientCert | Case::UntrustedClientCert) => {}
            (Some(want), Err(err)) => {
                assert_eq!(err, ConnectorError::Tls(want), "{protocol:?} {case:?}");
                assert_eq!(err.code(), "tls");
                assert!(!err.is_retryable());
                let text = err.to_string();
                assert_eq!(text, format!("tls: {want}"));
                assert!(!text.contains(&nhs.expose()), "{text}");
                // The simulator keeps serving: a gateway configured to match it gets through.
                let fixed = match case {
                    Case::WrongCa => TlsConfig::new(pki.other_ca.write(&pki.dir.0, "other")),
                    Case::NoClientCert | Case::UntrustedClientCert => {
                        pki.client(Some(&pki.client_ca))
                    }
                    _ => continue,
                };
                let again = build(&spec, &connector_config(protocol, port, fixed));
                let record = again
                    .fetch(SourceQuery::everything(nhs))
                    .await
                    .unwrap_or_else(|e| panic!("{protocol:?} {case:?} after fix: {e}"));
                assert!(record.knows_patient());
            }
            (want, got) => panic!("{protocol:?} {case:?}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[tokio::test]
async fn fhir_over_tls_verifies_the_source_ca_and_classifies_every_failure() {
    every_case_is_classified(Protocol::Fhir).await;
}

#[tokio::test]
async fn mllp_over_tls_verifies_the_source_ca_and_classifies_every_failure() {
    every_case_is_classified(Protocol::Hl7v2).await;
}

#[tokio::test]
async fn mllp_over_mutual_tls_reuses_pooled_connections() {
    let (region, spec, nhs) = subject(Protocol::Hl7v2);
    let pki = Pki::new();
    let (port, _sim) = start(&region, &spec, Case::Mutual.server(&pki)).await;
    let ConnectorConfig::Hl7v2(config) =
        connector_config(Protocol::Hl7v2, port, Case::Mutual.client(&pki))
    else {
        unreachable!()
    };
    let descriptor = crate::SourceDescriptor {
        id: spec.id.clone(),
        ods: spec.ods.clone(),
        name: spec.name.clone(),
        kind: spec.kind,
        connector: crate::ConnectorKind::Hl7v2,
        endpoint: config.address.clone(),
    };
    let connector = Hl7v2Connector::new(descriptor, config).unwrap();
    for _ in 0..3 {
        let record = connector.fetch(SourceQuery::everything(nhs)).await.unwrap();
        assert!(record.knows_patient());
        assert_eq!(connector.idle_connections(), 1);
    }
}

fn problems_of(config: &TlsConfig) -> String {
    let problems = config.validate();
    assert!(!problems.is_empty(), "{config:?} should not validate");
    problems.join("\n")
}

#[test]
fn config_problems_name_the_file_and_what_is_wrong() {
    let pki = Pki::new();
    let dir = &pki.dir.0;
    let ca = pki.path("source-ca.crt");
    assert!(TlsConfig::new(&ca).validate().is_empty());

    let missing = problems_of(&TlsConfig::new(dir.join("nope.crt")));
    assert!(
        missing.contains("tls.ca_file") && missing.contains("nope.crt"),
        "{missing}"
    );
    assert!(missing.contains("cannot read"), "{missing}");

    let garbage = dir.join("garbage.crt");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    )
    .unwrap();
    let text = problems_of(&TlsConfig::new(&garbage));
    assert!(
        text.contains("garbage.crt") && text.contains("not valid PEM"),
        "{text}"
    );

    let empty = dir.join("empty.crt");
    std::fs::write(&empty, "just some text\n").unwrap();
    let text = problems_of(&TlsConfig::new(&empty));
    assert!(text.contains("holds no PEM certificate"), "{text}");

    // A client certificate with another certificate's key.
    let (cert, _) = pki.client_ca.client("one").write(dir, "one");
    let (_, other_key) = pki.client_ca.client("two").write(dir, "two");
    let text = problems_of(&TlsConfig::new(&ca).with_client_cert(&cert, &other_key));
    assert!(
        text.contains("two.key") && text.contains("does not match") && text.contains("one.crt"),
        "{text}"
    );

    // A key file holding a certificate, and a certificate without its key.
    let text = problems_of(&TlsConfig::new(&ca).with_client_cert(&cert, &cert));
    assert!(text.contains("holds no PEM private key"), "{text}");
    let text = problems_of(&TlsConfig {
        client_cert_file: Some(cert.clone()),
        ..TlsConfig::new(&ca)
    });
    assert!(text.contains("without tls.client_key_file"), "{text}");

    let text = problems_of(&TlsConfig {
        server_name: Some("not a name!".into()),
        ..TlsConfig::new(&ca)
    });
    assert!(text.contains("server_name"), "{text}");

    // Every problem at once.
    let all = TlsConfig {
        server_name: Some("bad name".into()),
        ..TlsConfig::new(dir.join("nope.crt")).with_client_cert(dir.join("gone.crt"), &cert)
    };
    assert_eq!(all.validate().len(), 4, "{:?}", all.validate());
}

#[test]
fn connector_configs_check_scheme_and_tls_together() {
    let pki = Pki::new();
    let tls = || Some(TlsConfig::new(pki.path("source-ca.crt")));
    let https_without_tls = FhirConfig::new("https://gp.example/fhir").validate();
    assert!(
        https_without_tls.iter().any(|p| p.contains("no tls block")),
        "{https_without_tls:?}"
    );
    let http_with_tls = FhirConfig {
        tls: tls(),
        ..FhirConfig::new("http://gp.example/fhir")
    }
    .validate();
    assert!(
        http_with_tls.iter().any(|p| p.contains("use https://")),
        "{http_with_tls:?}"
    );
    let good = FhirConfig {
        tls: tls(),
        ..FhirConfig::new("https://gp.example/fhir")
    };
    assert!(good.validate().is_empty());
    let mllp = Hl7v2Config {
        tls: Some(TlsConfig::new(pki.path("missing.crt"))),
        ..Hl7v2Config::new("pas.example:2575")
    };
    assert!(mllp.validate().iter().any(|p| p.contains("missing.crt")));

    // Relative paths are taken from the configuration file's directory.
    let mut relative = TlsConfig::new("certs/ca.pem").with_client_cert("/abs/c.pem", "k.pem");
    relative.resolve_paths(Path::new("/etc/tributary"));
    assert_eq!(relative.ca_file, Path::new("/etc/tributary/certs/ca.pem"));
    assert_eq!(
        relative.client_cert_file.as_deref(),
        Some(Path::new("/abs/c.pem"))
    );
    assert_eq!(
        relative.client_key_file.as_deref(),
        Some(Path::new("/etc/tributary/k.pem"))
    );
}

#[test]
fn tls_blocks_refuse_unknown_fields() {
    let ok: FhirConfig = serde_json::from_str(
        r#"{"base_url":"https://h/fhir","tls":{"ca_file":"ca.pem","server_name":"h"}}"#,
    )
    .unwrap();
    assert_eq!(ok.tls.unwrap().server_name.as_deref(), Some("h"));
    assert!(
        serde_json::from_str::<FhirConfig>(
            r#"{"base_url":"https://h/fhir","tls":{"ca_file":"ca.pem","verify":false}}"#
        )
        .is_err()
    );
}
