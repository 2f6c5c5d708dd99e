//! TLS to upstreams, end to end: `tributary serve --config FILE` against a region whose
//! simulators all serve TLS (FHIR over HTTPS, MLLP over TLS), some requiring the gateway's
//! client certificate. Four sources are misconfigured, one way each; the record still
//! arrives from the rest, and the OperationOutcome names each failed source and its reason.

use std::{net::Ipv4Addr, path::Path, process::Stdio, sync::Arc, time::Duration};

use connectors::{
    ConnectorConfig, OdsCode, SourceKind,
    fault::FaultSwitch,
    fhir::{self, FhirConfig},
    hl7v2::{self, Hl7v2Config},
    synth::{
        Region,
        model::{Label, Protocol, Records, SourceSpec},
    },
    tls::{
        TlsConfig, TlsServerConfig, server_config,
        test_pki::{TestCa, Validity},
    },
};
use serde_json::Value;
use tokio::{net::TcpListener, task::JoinHandle};

use super::{BIN, Demo, TempDir, check_config, send, served_base_url};

const KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/src/auth/demo-verifying-key.pem"
);

/// How one simulated source presents itself to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Server certificate from the source CA.
    Good,
    /// As `Good`, and the source requires the gateway's client certificate, which it has.
    Mutual,
    /// Server certificate from a CA the gateway does not trust for this source.
    WrongCa,
    /// Server certificate from the source CA, expired.
    Expired,
    /// Server certificate from the source CA, for another host.
    WrongHost,
    /// The source requires a client certificate; the gateway is configured without one.
    NoClientCert,
}

impl Setup {
    /// What the OperationOutcome must say about this source, if it fails.
    fn reason(self) -> Option<&'static str> {
        match self {
            Self::Good | Self::Mutual => None,
            Self::WrongCa => Some("(unknown issuer)"),
            Self::Expired => Some("(expired)"),
            Self::WrongHost => Some("(name mismatch)"),
            Self::NoClientCert => Some("(client certificate required)"),
        }
    }
}

struct Pki {
    region_ca: TestCa,
    rogue_ca: TestCa,
    client_ca: TestCa,
}

impl Pki {
    fn server(&self, setup: Setup) -> Arc<TlsServerConfig> {
        let here = ["127.0.0.1"];
        let cert = match setup {
            Setup::WrongCa => self.rogue_ca.server(&here, Validity::Current),
            Setup::Expired => self.region_ca.server(&here, Validity::Expired),
            Setup::WrongHost => self
                .region_ca
                .server(&["pas.elsewhere.example"], Validity::Current),
            Setup::Good | Setup::Mutual | Setup::NoClientCert => {
                self.region_ca.server(&here, Validity::Current)
            }
        };
        let client_ca = matches!(setup, Setup::Mutual | Setup::NoClientCert)
            .then_some(self.client_ca.cert_pem.as_bytes());
        server_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes(), client_ca).unwrap()
    }
}

/// Starts `spec`'s simulator over TLS; returns the connector config the gateway uses for it,
/// with file paths relative to the config file's directory.
async fn start(
    records: Arc<dyn Records>,
    spec: &SourceSpec,
    server: Arc<TlsServerConfig>,
    mutual: bool,
) -> (ConnectorConfig, JoinHandle<()>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut tls = TlsConfig::new("pki/region-ca.crt");
    if mutual {
        tls = tls.with_client_cert("pki/gateway.crt", "pki/gateway.key");
    }
    let fault = FaultSwitch::default();
    match spec.protocol {
        Protocol::Fhir => (
            ConnectorConfig::Fhir(FhirConfig {
                tls: Some(tls),
                ..FhirConfig::new(format!("https://127.0.0.1:{port}/fhir"))
            }),
            fhir::sim::serve_tls(listener, records, spec.clone(), fault, Some(server)),
        ),
        Protocol::Hl7v2 => (
            ConnectorConfig::Hl7v2(Hl7v2Config {
                tls: Some(tls),
                ..Hl7v2Config::new(format!("127.0.0.1:{port}"))
            }),
            hl7v2::sim::serve_tls(listener, records, spec.clone(), fault, Some(server)),
        ),
    }
}

fn config_text(sources: toml::Table) -> String {
    format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\naudit_dir = \"audit\"\n\n[budget]\ndefault = \"5s\"\nmax = \"10s\"\n\n[auth]\naudience = \"tributary\"\nkeys = [{{ algorithm = \"ES256\", public_key_file = \"{KEY}\" }}]\n\n{}",
        toml::to_string(&toml::Table::from_iter([(
            "sources".to_owned(),
            toml::Value::Table(sources)
        )]))
        .unwrap()
    )
}

fn ods_of(resource: &Value) -> String {
    let source = resource["meta"]["source"].as_str().unwrap_or_default();
    source.rsplit('/').next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn each_misconfigured_tls_source_fails_alone_with_its_reason() {
    let region = Arc::new(Region::generate(11, 4, 80));
    let (nhs, _) = region
        .sample_patients()
        .into_iter()
        .find(|(_, l)| *l == Label::Typical)
        .unwrap();
    let patient = region.summary(&nhs).unwrap().clone();
    let home_trust = patient.trusts.first().unwrap().clone();

    // Good, and mutual TLS, where the record lives: demographics (FHIR), the registered GP
    // (FHIR) and the patient's first trust (MLLP). The four failures go to sources the plan
    // also asks (other trusts, councils, the private provider), alternating MLLP and FHIR.
    let asked_elsewhere = |protocol: Protocol| -> Vec<OdsCode> {
        region
            .sources()
            .iter()
            .filter(|s| s.protocol == protocol)
            .filter(|s| {
                matches!(
                    s.kind,
                    SourceKind::Trust | SourceKind::Council | SourceKind::PrivateProvider
                )
            })
            .filter(|s| !patient.trusts.contains(&s.ods))
            .filter(|s| Some(&s.ods) != patient.council.as_ref())
            .filter(|s| Some(&s.ods) != patient.private_provider.as_ref())
            .map(|s| s.ods.clone())
            .collect()
    };
    let (mllp, fhir) = (
        asked_elsewhere(Protocol::Hl7v2),
        asked_elsewhere(Protocol::Fhir),
    );
    let mut candidates = Vec::new();
    for i in 0..mllp.len().max(fhir.len()) {
        candidates.extend(mllp.get(i).cloned());
        candidates.extend(fhir.get(i).cloned());
    }
    assert!(candidates.len() >= 4, "{candidates:?}");
    let failing: Vec<(OdsCode, Setup)> = candidates
        .into_iter()
        .zip([
            Setup::WrongCa,
            Setup::Expired,
            Setup::WrongHost,
            Setup::NoClientCert,
        ])
        .collect();
    let setup_of = |spec: &SourceSpec| -> Setup {
        if let Some((_, s)) = failing.iter().find(|(ods, _)| *ods == spec.ods) {
            *s
        } else if spec.kind == SourceKind::Demographics || spec.ods == home_trust {
            Setup::Mutual
        } else {
            Setup::Good
        }
    };

    let pki = Pki {
        region_ca: TestCa::new("Region CA"),
        rogue_ca: TestCa::new("Rogue CA"),
        client_ca: TestCa::new("Gateway client CA"),
    };
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("pki")).unwrap();
    pki.region_ca.write(&dir.0.join("pki"), "region-ca");
    pki.client_ca
        .client("tributary.gateway")
        .write(&dir.0.join("pki"), "gateway");

    let records: Arc<dyn Records> = region.clone();
    let mut servers = Vec::new();
    let mut sources = toml::Table::new();
    for spec in region.sources() {
        let setup = setup_of(spec);
        let (config, server) = start(
            records.clone(),
            spec,
            pki.server(setup),
            setup == Setup::Mutual,
        )
        .await;
        servers.push(AbortOnDrop(server));
        let mut t = toml::Table::new();
        t.insert("ods".into(), spec.ods.as_str().into());
        t.insert("name".into(), spec.name.as_str().into());
        t.insert("kind".into(), spec.kind.as_str().into());
        t.insert("connector".into(), toml::Value::try_from(&config).unwrap());
        sources.insert(spec.id.clone(), t.into());
    }
    let file = dir.0.join("region.toml");
    std::fs::write(&file, config_text(sources)).unwrap();

    let (passed, err) = check_config(&file).await;
    assert!(passed, "{err}");

    let log = dir.0.join("gateway.log");
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&file)
        .args([
            "--policies",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        ])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = served_base_url(&mut child).await;
    let token = tributary::auth::mint_demo_token(
        "u",
        "R8000",
        home_trust.as_str(),
        "direct-care",
        Duration::from_secs(600),
    )
    .unwrap();
    let auth = format!("Bearer {token}");
    let everything = format!("{base}/Patient/{}/$everything", nhs.expose());

    for round in 0..2 {
        let reply = send("GET", &everything, &[("authorization", &auth)], None).await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text);
        let from: Vec<String> = reply.resources().iter().map(ods_of).collect();
        for good in [&patient.gp, &home_trust] {
            assert!(
                from.iter().any(|o| o == good.as_str()),
                "round {round}: nothing from {good} (good TLS) in {from:?}"
            );
        }
        let issues = reply.issue_text();
        for (ods, setup) in &failing {
            let line = issues
                .lines()
                .find(|l| l.contains(ods.as_str()))
                .unwrap_or_else(|| panic!("round {round}: {ods} not named in:\n{issues}"));
            // A FHIR source that wants a client certificate rejects its absence after the
            // TLS 1.3 handshake; the alert can race the request inside hyper's pooled client,
            // which then reports a transport failure (see connectors' TLS tests). The source
            // is still named and still left out; every other reason is exact.
            let raced = *setup == Setup::NoClientCert && line.ends_with("(transport)");
            if !raced {
                assert!(line.contains("tls"), "{line}");
                assert!(line.contains(setup.reason().unwrap()), "{setup:?}: {line}");
            }
            assert!(!from.iter().any(|o| o == ods.as_str()), "{ods} contributed");
        }
        for good in [&patient.gp, &home_trust] {
            assert!(
                !issues.contains(good.as_str()),
                "round {round}: good source {good} named in:\n{issues}"
            );
        }
        assert!(!issues.contains(&nhs.expose()), "{issues}");
    }

    // The gateway keeps serving, and its logs name no patient.
    let meta = send("GET", &format!("{base}/metadata"), &[], None).await;
    assert_eq!(meta.status, 200, "{}", meta.text);
    drop(child);
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(!logs.contains(&nhs.expose()), "NHS number in the logs");
}

#[tokio::test]
async fn check_reports_tls_file_problems_with_their_place() {
    let dir = TempDir::new();
    let ca = TestCa::new("Region CA");
    let pki = dir.0.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    ca.write(&pki, "ca");
    let (one_cert, _) = ca.client("one").write(&pki, "one");
    let (_, two_key) = ca.client("two").write(&pki, "two");
    std::fs::write(
        pki.join("garbage.crt"),
        "-----BEGIN CERTIFICATE-----\n%%%\n",
    )
    .unwrap();
    let rel = |p: &Path| p.strip_prefix(&dir.0).unwrap().display().to_string();
    let text = format!(
        "[auth]\naudience = \"x\"\nkeys = [{{ algorithm = \"ES256\", public_key_file = \"{KEY}\" }}]\n\n\
         [sources.gp]\nods = \"P81001\"\nname = \"GP\"\nkind = \"gp-practice\"\n\
         connector = {{ type = \"fhir\", base_url = \"https://gp.example/fhir\", tls = {{ ca_file = \"pki/missing.crt\" }} }}\n\n\
         [sources.rxl]\nods = \"RXL\"\nname = \"Blackpool\"\nkind = \"trust\"\n\
         connector = {{ type = \"hl7v2\", address = \"pas.example:2575\", tls = {{ ca_file = \"pki/garbage.crt\", client_cert_file = \"{}\", client_key_file = \"{}\" }} }}\n\n\
         [sources.pds]\nods = \"X26\"\nname = \"PDS\"\nkind = \"demographics\"\n\
         connector = {{ type = \"fhir\", base_url = \"https://pds.example/fhir\" }}\n",
        rel(&one_cert),
        rel(&two_key),
    );
    let file = dir.0.join("region.toml");
    std::fs::write(&file, text).unwrap();
    let (passed, err) = check_config(&file).await;
    assert!(!passed, "{err}");
    for expect in [
        "region.toml:5:1: [sources.gp]",
        "tls.ca_file",
        "missing.crt",
        "cannot read",
        "region.toml:11:1: [sources.rxl]",
        "garbage.crt",
        "not valid PEM",
        "two.key",
        "does not match",
        "[sources.pds]",
        "no tls block",
    ] {
        assert!(err.contains(expect), "missing `{expect}` in:\n{err}");
    }
}

#[tokio::test]
async fn demo_tls_fault_leaves_those_sources_out_with_unknown_issuer() {
    let demo = Demo::start(&["--fault", "RXN=tls", "--fault", "X26=tls"]).await;
    let nhs = demo.patient("typical");
    let reply = demo.get(&format!("/Patient/{nhs}/$everything")).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let issues = reply.issue_text();
    for ods in ["RXN", "X26"] {
        let line = issues
            .lines()
            .find(|l| l.contains(&format!(" {ods} ")))
            .unwrap_or_else(|| panic!("{ods} not named in:\n{issues}"));
        assert!(
            line.contains("(unknown issuer)") && line.ends_with("(tls)"),
            "{line}"
        );
    }
    // Demographics failed, so the plan broadcasts; the rest of the record still arrives.
    assert!(
        reply
            .resources()
            .iter()
            .any(|r| ods_of(r) != "RXN" && r["resourceType"] != "Patient"),
        "{}",
        reply.text
    );
    assert!(!issues.contains(&nhs), "{issues}");
    let logs = demo.stop().await;
    assert!(!logs.contains(&nhs), "NHS number in the logs");
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
