//! TLS to upstreams, the same for every protocol (FHIR over HTTPS, MLLP over TLS): the
//! server is verified against the source's own CA only, and the gateway may present a
//! per-source client certificate (mutual TLS).
//!
//! # Why a per-source CA and no public roots
//! Sources are reached over private networks (HSCN) with certificates from an organisation's
//! own or the NHS's CA; trusting the public web PKI for them would let any publicly trusted
//! certificate stand in for a hospital. Each `[sources.<id>.connector.tls]` names the one CA
//! file its source's certificate must chain to, and nothing else is trusted for that source.
//!
//! # Why one crypto provider, named here
//! rustls can run on `ring` or `aws-lc-rs`. The workspace builds `ring` only (smaller, no
//! cmake) and every config is built with [`provider`] explicitly, so no process-wide default
//! has to be installed and a second provider pulled in by some other crate changes nothing.
//!
//! A handshake failure becomes a [`TlsFailure`]: a closed set of reasons (unknown issuer,
//! expired, name mismatch, client certificate required or rejected, ...) derived from
//! rustls's error and the peer's alert, never from any text the peer sent.

use std::{
    error::Error,
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    server::WebPkiClientVerifier,
    sign::{CertifiedKey, SingleCertAndKey},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};

pub use rustls::ServerConfig as TlsServerConfig;

/// A source's TLS settings (`tls = { ... }` in its connector block). Relative paths are
/// relative to the configuration file (see [`TlsConfig::resolve_paths`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA certificate(s) the source's server certificate must chain to. The
    /// only trust anchors for this source.
    pub ca_file: PathBuf,
    /// PEM file of the gateway's client certificate chain for this source (mutual TLS),
    /// leaf first. Set together with `client_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// The name the server certificate must carry, when it differs from the host the
    /// connector connects to (e.g. connecting by IP address to a certificate with a DNS name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// A [`TlsConfig`] loaded and checked: what a connector connects with.
#[derive(Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    /// The `server_name` override, if any; otherwise the connector uses the host it dials.
    pub server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field(
                "client_auth",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish_non_exhaustive()
    }
}

/// The crypto provider every TLS config of the gateway is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsConfig {
    /// A config trusting `ca_file` only, without a client certificate.
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: ca_file.into(),
            client_cert_file: None,
            client_key_file: None,
            server_name: None,
        }
    }

    /// The same config with a client certificate and key for mutual TLS.
    pub fn with_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.client_cert_file = Some(cert_file.into());
        self.client_key_file = Some(key_file.into());
        self
    }

    /// Makes relative paths relative to `base` (the configuration file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for path in [
            Some(&mut self.ca_file),
            self.client_cert_file.as_mut(),
            self.client_key_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    /// Every problem with this config (files missing or unreadable, PEM that holds nothing
    /// usable, a key that does not match its certificate), as plain-English fragments.
    pub fn validate(&self) -> Vec<String> {
        match self.load() {
            Ok(_) => Vec::new(),
            Err(problems) => problems,
        }
    }

    /// Reads the files and builds the rustls config, once, at connector build time.
    pub fn load(&self) -> Result<ClientTls, Vec<String>> {
        let mut problems = Vec::new();
        let roots = match read_certs("tls.ca_file", &self.ca_file) {
            Ok(certs) => {
                let mut roots = RootCertStore::empty();
                for (i, cert) in certs.into_iter().enumerate() {
                    if roots.add(cert).is_err() {
                        problems.push(format!(
                            "tls.ca_file `{}`: certificate {} is not a usable ca certificate",
                            self.ca_file.display(),
                            i + 1
                        ));
                    }
                }
                Some(roots)
            }
            Err(p) => {
                problems.push(p);
                None
            }
        };
        let client = match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => None,
            (Some(cert_file), Some(key_file)) => {
                let certs = read_certs("tls.client_cert_file", cert_file)
                    .map_err(|p| problems.push(p))
                    .ok();
                let key = read_key("tls.client_key_file", key_file)
                    .map_err(|p| problems.push(p))
                    .ok();
                // Checked on its own, so a key mismatch shows even when the CA file is wrong.
                let provider = provider();
                certs.zip(key).and_then(|(c, k)| {
                    CertifiedKey::from_der(c, k, &provider)
                        .map_err(|e| problems.push(key_problem(&e, cert_file, key_file)))
                        .ok()
                })
            }
            (Some(_), None) => {
                problems.push("tls.client_cert_file is set without tls.client_key_file".into());
                None
            }
            (None, Some(_)) => {
                problems.push("tls.client_key_file is set without tls.client_cert_file".into());
                None
            }
        };
        let server_name = match &self.server_name {
            None => None,
            Some(name) => match ServerName::try_from(name.clone()) {
                Ok(n) => Some(n),
                Err(_) => {
                    problems.push(format!(
                        "tls.server_name `{name}` is not a DNS name or IP address"
                    ));
                    None
                }
            },
        };
        let Some(roots) = roots.filter(|_| problems.is_empty()) else {
            return Err(problems);
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![format!("tls: no protocol version available ({e})")])?
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some(key) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key))),
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

fn key_problem(err: &rustls::Error, cert_file: &Path, key_file: &Path) -> String {
    match err {
        rustls::Error::InconsistentKeys(_) => format!(
            "tls.client_key_file `{}` does not match the certificate in tls.client_cert_file `{}`",
            key_file.display(),
            cert_file.display()
        ),
        _ => format!(
            "tls.client_key_file `{}`: key type or format is not supported",
            key_file.display()
        ),
    }
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "{what} `{}`: cannot read: {}",
            path.display(),
            e.kind().to_string().to_lowercase()
        )
    })
}

/// Every certificate in a PEM file; at least one. Errors name `what` and the path, never the
/// file's content.
pub fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{what} `{}`: not valid PEM ({})",
                path.display(),
                pem_error(&e)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{what} `{}`: holds no PEM certificate (BEGIN CERTIFICATE)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file. Errors name `what` and the path, never a line of the
/// key.
pub fn read_key(what: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "{what} `{}`: holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ),
        e => format!(
            "{what} `{}`: not valid PEM ({})",
            path.display(),
            pem_error(&e)
        ),
    })
}

/// A PEM error as a short fragment that never echoes the file's content.
pub fn pem_error(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { .. } => "a section has no END line",
        E::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        E::Base64Decode(_) => "a section is not valid base64",
        E::NoItemsFound => "nothing found",
        E::SectionTooLarge => "a section is too large",
        _ => "unreadable",
    }
}

/// Why a TLS handshake with a source failed: stable, and free of anything the peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The server certificate does not chain to the source's CA (wrong CA).
    UnknownIssuer,
    /// The server certificate has expired.
    Expired,
    /// The server certificate is not valid yet.
    NotYetValid,
    /// The server certificate is not for the host we connected to (or `server_name`).
    NameMismatch,
    /// The server certificate is otherwise unusable (bad encoding, revoked, wrong usage).
    BadServerCertificate,
    /// The source requires a client certificate and we sent none.
    ClientCertRequired,
    /// The source rejected our client certificate (untrusted, expired, wrong usage).
    ClientCertRejected,
    /// Any other handshake failure (no common protocol version or cipher suite, say).
    Handshake,
}

impl TlsFailure {
    /// A stable code for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownIssuer => "unknown_issuer",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NameMismatch => "name_mismatch",
            Self::BadServerCertificate => "bad_server_certificate",
            Self::ClientCertRequired => "client_cert_required",
            Self::ClientCertRejected => "client_cert_rejected",
            Self::Handshake => "handshake_failed",
        }
    }

    /// Classifies a rustls error seen by the client side of a handshake.
    pub fn from_rustls(err: &rustls::Error) -> Self {
        use CertificateError as C;
        match err {
            rustls::Error::InvalidCertificate(c) => match c {
                C::UnknownIssuer => Self::UnknownIssuer,
                C::Expired | C::ExpiredContext { .. } => Self::Expired,
                C::NotValidYet | C::NotValidYetContext { .. } => Self::NotYetValid,
                C::NotValidForName | C::NotValidForNameContext { .. } => Self::NameMismatch,
                _ => Self::BadServerCertificate,
            },
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => Self::ClientCertRequired,
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied => Self::ClientCertRejected,
                _ => Self::Handshake,
            },
            _ => Self::Handshake,
        }
    }

    /// The TLS failure anywhere in an error's chain, looking inside `io::Error`s (which is
    /// how tokio-rustls and hyper-rustls carry rustls's error); `None` if there is none.
    pub fn find(err: &(dyn Error + 'static)) -> Option<Self> {
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                return Some(Self::from_rustls(r));
            }
            if let Some(inner) = e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
                return Self::find(inner);
            }
            next = e.source();
        }
        None
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::UnknownIssuer => {
                "server certificate is not signed by the source's ca (unknown issuer)"
            }
            Self::Expired => "server certificate has expired (expired)",
            Self::NotYetValid => "server certificate is not valid yet (not yet valid)",
            Self::NameMismatch => {
                "server certificate is not valid for the source's host name (name mismatch)"
            }
            Self::BadServerCertificate => "server certificate is not usable (bad certificate)",
            Self::ClientCertRequired => {
                "source requires a client certificate and none was sent (client certificate required)"
            }
            Self::ClientCertRejected => {
                "source rejected the gateway's client certificate (client certificate rejected)"
            }
            Self::Handshake => "handshake failed",
        })
    }
}

/// A server-side TLS config, for the simulators: a certificate chain and key in PEM, and,
/// for mutual TLS, the PEM CA(s) a client certificate must chain to (then one is required).
pub fn server_config(
    cert_chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: not valid PEM ({})", pem_error(&e)))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("server key: not valid PEM ({})", pem_error(&e)))?;
    let client_roots = match client_ca_pem {
        None => None,
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert =
                    cert.map_err(|e| format!("client ca: not valid PEM ({})", pem_error(&e)))?;
                roots
                    .add(cert)
                    .map_err(|_| "client ca: not a usable ca certificate".to_owned())?;
            }
            Some(roots)
        }
    };
    server_config_with(certs, key, client_roots).map(Arc::new)
}

/// A server-side TLS config from a parsed certificate chain and key (the simulators and the
/// gateway's facade both build theirs here), requiring a client certificate that chains to
/// `client_roots` when given. Not yet in an `Arc`, so a caller can set ALPN.
pub fn server_config_with(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<RootCertStore>,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("no protocol version available ({e})"))?;
    let builder = match client_roots {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                .build()
                .map_err(|e| format!("client ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate and key: {e}"))
}

/// The server side of a simulator's handshake. On failure the connection is drained (up to
/// a few seconds) before it is closed, so the client reads the alert that says why rather
/// than a reset caused by its own unread bytes; `None` then.
pub async fn sim_accept<S>(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: S,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    match acceptor.accept(stream).into_fallible().await {
        Ok(tls) => Some(tls),
        Err((_, mut tcp)) => {
            let mut sink = [0u8; 1024];
            let drain = async { while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
            None
        }
    }
}

/// Generates certificates at test time: a CA and certificates it signs, as PEM.
#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;
#[cfg(test)]
mod tests;
