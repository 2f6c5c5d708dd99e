//! Configuration of a real region: a TOML file naming the organisations, their connectors and
//! endpoints, the request budget, the plan and the token keys.
//!
//! Every problem is collected before anything runs (`tributary check --config FILE` prints
//! them all): each section and each source is read on its own, so one typo does not hide the
//! next, and every message names the file, line and column it refers to.

use std::{
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use connectors::{ConnectorConfig, OdsCode, SourceKind};
use serde::Deserialize;
use toml::{
    Spanned,
    de::{DeTable, DeValue, ValueDeserializer},
};

use crate::{
    auth::TrustedKey, breaker::BreakerSettings, cache::CacheSettings, hedge::HedgeSettings,
    plan::PlanMode,
};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub budget: Budget,
    pub resilience: Resilience,
    pub plan: PlanMode,
    pub auth: AuthSettings,
    pub audit_dir: Option<PathBuf>,
    pub public_base_url: Option<String>,
    pub policies: Option<PathBuf>,
    /// Trace export (`[gateway] otlp_endpoint`, `otlp_protocol`); `OTEL_*` apply otherwise.
    pub otlp: crate::telemetry::OtlpSettings,
    /// Hostile-client limits at the facade (`[limits]`).
    pub limits: Limits,
    /// The facade's certificate and key (`[gateway.tls]`), loaded; plain HTTP without.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    pub sources: Vec<SourceConfig>,
}

/// How long a request may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// The deadline of a request that does not ask for less.
    #[serde(with = "humantime_serde", default = "default_budget")]
    pub default: Duration,
    /// The most a request may ask for with `Prefer: wait=N`.
    #[serde(with = "humantime_serde", default = "default_max_budget")]
    pub max: Duration,
    /// Kept back from upstream calls for merge, policy and audit.
    #[serde(with = "humantime_serde", default = "default_reserve")]
    pub reserve: Duration,
}

fn default_budget() -> Duration {
    Duration::from_secs(2)
}
fn default_max_budget() -> Duration {
    Duration::from_secs(10)
}
fn default_reserve() -> Duration {
    Duration::from_millis(50)
}

impl Budget {
    /// The least time a request is given, whatever `Prefer: wait` asks: `wait=0` would
    /// otherwise be a deadline of now, and always a 504. It is 500 ms, or the reserve plus
    /// [`Budget::MIN_CALL`] if that is more, and never more than `max`.
    pub fn wait_floor(&self) -> Duration {
        self.unclipped_floor().min(self.max)
    }

    /// The least an upstream call is left once the reserve is kept back.
    pub const MIN_CALL: Duration = Duration::from_millis(250);
    const LEAST_WAIT: Duration = Duration::from_millis(500);

    fn unclipped_floor(&self) -> Duration {
        Self::LEAST_WAIT.max(self.reserve.saturating_add(Self::MIN_CALL))
    }
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            default: default_budget(),
            max: default_max_budget(),
            reserve: default_reserve(),
        }
    }
}

/// The cache, hedging, breakers and load shedding: `[cache]`, `[hedge]`, `[breaker]` and
/// `[shed]`, each optional with defaults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resilience {
    pub cache: CacheSettings,
    pub hedge: HedgeSettings,
    pub breaker: BreakerSettings,
    pub shed: ShedSettings,
}

/// Load shedding at the facade (`[shed]`): past `max_in_flight` requests at once, a request
/// is answered at once with 503, `Retry-After` and an OperationOutcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShedSettings {
    /// Data requests (everything but `/fhir/metadata`) served at once.
    pub max_in_flight: usize,
    /// What `Retry-After` tells a shed caller (whole seconds, at least 1).
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for ShedSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            retry_after: Duration::from_secs(1),
        }
    }
}

impl ShedSettings {
    fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_in_flight == 0 {
            p.push("max_in_flight must be at least 1".to_owned());
        }
        if self.retry_after < Duration::from_secs(1) {
            p.push("retry_after must be at least 1s (Retry-After is in whole seconds)".to_owned());
        }
        p
    }
}

/// What the facade allows one client (`[limits]`, every field optional): the answer to
/// slow, large and greedy clients, so that one of them cannot take the gateway from the rest.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Request line and headers, in bytes (at least 8192); more is a 431.
    pub max_header_bytes: usize,
    /// A client must send its whole request head within this time (slowloris), per request,
    /// and a request body within the same time again.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A TLS client must finish its handshake within this time.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// A connection with no request in flight for this long is closed gracefully
    /// (HTTP/1.1 keep-alive and HTTP/2 alike).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A write to a client that makes no progress for this long (the client is not reading
    /// its answers) closes the connection.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Connections open at once; the next plain-HTTP one gets a 503 and is closed, the next
    /// TLS one is closed before its handshake.
    pub max_connections: usize,
    /// Request body (`POST _search` forms), in bytes; more is a 413.
    pub max_body_bytes: usize,
    /// Requests per second per user (token `sub`); 0 turns the limit off.
    pub sub_rate: f64,
    /// How many requests a user may make at once before the rate applies.
    pub sub_burst: u32,
    /// Requests per second per organisation (token `org`); 0 turns the limit off.
    pub org_rate: f64,
    pub org_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            max_connections: 4096,
            max_body_bytes: 64 * 1024,
            sub_rate: 50.0,
            sub_burst: 100,
            org_rate: 500.0,
            org_burst: 1000,
        }
    }
}

impl Limits {
    /// hyper's smallest read buffer.
    pub const MIN_HEADER_BYTES: usize = 8192;

    pub fn sub(&self) -> crate::ratelimit::Rate {
        crate::ratelimit::Rate {
            per_second: self.sub_rate,
            burst: self.sub_burst,
        }
    }

    pub fn org(&self) -> crate::ratelimit::Rate {
        crate::ratelimit::Rate {
            per_second: self.org_rate,
            burst: self.org_burst,
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_header_bytes < Self::MIN_HEADER_BYTES {
            p.push(format!(
                "max_header_bytes must be at least {}",
                Self::MIN_HEADER_BYTES
            ));
        }
        for (name, d) in [
            ("header_read_timeout", self.header_read_timeout),
            ("tls_handshake_timeout", self.tls_handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("write_timeout", self.write_timeout),
        ] {
            if d.is_zero() {
                p.push(format!("{name} must be more than zero"));
            }
        }
        if self.max_connections == 0 {
            p.push("max_connections must be at least 1".to_owned());
        }
        if self.max_body_bytes == 0 {
            p.push("max_body_bytes must be at least 1".to_owned());
        }
        for (name, rate, burst) in [
            ("sub", self.sub_rate, self.sub_burst),
            ("org", self.org_rate, self.org_burst),
        ] {
            if !rate.is_finite() || rate < 0.0 {
                p.push(format!(
                    "{name}_rate must be a number of requests per second, 0 for no limit"
                ));
            } else if rate > 0.0 && rate < crate::ratelimit::Rate::MIN_PER_SECOND {
                p.push(format!(
                    "{name}_rate must be 0 (no limit) or at least {} requests per second",
                    crate::ratelimit::Rate::MIN_PER_SECOND
                ));
            } else if rate > 0.0 && burst == 0 {
                p.push(format!(
                    "{name}_burst must be at least 1 when {name}_rate is set"
                ));
            }
        }
        p
    }
}

/// The facade's certificate chain and private key as PEM files (`[gateway.tls]`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Spanned<PathBuf>,
    key_file: Spanned<PathBuf>,
}

/// A rustls server config for the facade: HTTP/2 and HTTP/1.1 offered by ALPN.
pub fn tls_server_config(
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
    let mut config = connectors::tls::server_config_with(certs, key, None)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// Reads a PEM certificate chain and private key (errors name the field and the file, never
/// a line of it).
pub fn load_tls(
    cert_file: &Path,
    key_file: &Path,
) -> Result<std::sync::Arc<rustls::ServerConfig>, String> {
    let certs = connectors::tls::read_certs("cert_file", cert_file)?;
    let key = connectors::tls::read_key("key_file", key_file)?;
    tls_server_config(certs, key)
}

/// Token verification settings, keys loaded.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub audience: String,
    pub issuer: Option<String>,
    pub keys: Vec<TrustedKey>,
}

/// One organisation's system.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// The key in `[sources.<id>]`.
    pub id: String,
    pub ods: OdsCode,
    pub name: String,
    pub kind: SourceKind,
    pub max_concurrency: usize,
    pub connector: ConnectorConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_admin_listen")]
    admin_listen: String,
    audit_dir: Option<PathBuf>,
    policies: Option<PathBuf>,
    /// The base URL clients use (behind a load balancer or TLS terminator), e.g.
    /// `https://scr.example.nhs.uk/fhir`; default: the facade's listening address.
    public_base_url: Option<String>,
    /// Serve the admin listener (alerts carry break-glass reasons) beyond loopback.
    #[serde(default)]
    admin_remote: bool,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<String>,
    /// Serve the facade over TLS.
    tls: Option<RawTls>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    mode: PlanMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    audience: String,
    issuer: Option<String>,
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: Option<String>,
    algorithm: String,
    /// PEM public key file, relative to the config file.
    public_key_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    ods: String,
    name: String,
    kind: SourceKind,
    #[serde(default = "default_max_concurrency")]
    max_concurrency: usize,
    connector: ConnectorConfig,
}

fn default_max_concurrency() -> usize {
    64
}

/// Collects problems with their places in the file.
struct Problems<'a> {
    file: &'a Path,
    text: &'a str,
    list: Vec<String>,
}

impl Problems<'_> {
    /// Records a problem at a place in the file, or (no span) with the file as a whole.
    fn at(&mut self, span: Option<Range<usize>>, what: &str, message: impl std::fmt::Display) {
        let file = self.file.display();
        self.list.push(match span {
            Some(s) => {
                let (line, col) = line_col(self.text, s.start);
                format!("{file}:{line}:{col}: {what}: {message}")
            }
            None => format!("{file}: {what}: {message}"),
        });
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Reads a section on its own, so its errors do not hide another section's; errors point
/// at the offending field.
fn section<T: for<'de> Deserialize<'de>>(
    p: &mut Problems<'_>,
    value: Spanned<DeValue<'_>>,
    what: &str,
) -> Option<T> {
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(v) => Some(v),
        Err(e) => {
            p.at(e.span(), what, e.message().trim());
            None
        }
    }
}

impl Config {
    /// Reads and validates a config file; `Err` lists every problem found.
    pub fn load(path: &Path) -> Result<Config, Vec<String>> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
        Self::parse(path, &text)
    }

    /// Validates config text; `path` names it in messages and anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Vec<String>> {
        let mut p = Problems {
            file: path,
            text,
            list: Vec::new(),
        };
        let (document, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            for e in syntax {
                p.at(e.span(), "TOML", e.message().trim());
            }
            return Err(p.list);
        }
        let base = path.parent().unwrap_or(Path::new("."));

        let (mut gateway, mut budget, mut plan, mut auth_section, mut source_tables) =
            (None, None, None, None, Vec::new());
        let mut resilience = Resilience::default();
        let mut resilience_ok = true;
        let mut limits = Limits::default();
        for (key, value) in document.into_inner() {
            match key.get_ref().as_ref() {
                "gateway" => gateway = Some(section::<RawGateway>(&mut p, value, "[gateway]")),
                "budget" => budget = Some(section::<Budget>(&mut p, value, "[budget]")),
                "plan" => plan = Some(section::<RawPlan>(&mut p, value, "[plan]").map(|r| r.mode)),
                "auth" => auth_section = Some(value),
                "cache" => match section::<CacheSettings>(&mut p, value, "[cache]") {
                    Some(c) => {
                        for problem in c.problems() {
                            p.at(None, "[cache]", problem);
                        }
                        resilience.cache = c;
                    }
                    None => resilience_ok = false,
                },
                "hedge" => match section::<HedgeSettings>(&mut p, value, "[hedge]") {
                    Some(h) => {
                        for problem in h.problems() {
                            p.at(None, "[hedge]", problem);
                        }
                        resilience.hedge = h;
                    }
                    None => resilience_ok = false,
                },
                "breaker" => match section::<BreakerSettings>(&mut p, value, "[breaker]") {
                    Some(b) => {
                        for problem in b.problems() {
                            p.at(None, "[breaker]", problem);
                        }
                        resilience.breaker = b;
                    }
                    None => resilience_ok = false,
                },
                "limits" => match section::<Limits>(&mut p, value, "[limits]") {
                    Some(l) => {
                        for problem in l.problems() {
                            p.at(None, "[limits]", problem);
                        }
                        limits = l;
                    }
                    None => resilience_ok = false,
                },
                "shed" => match section::<ShedSettings>(&mut p, value, "[shed]") {
                    Some(sh) => {
                        for problem in sh.problems() {
                            p.at(None, "[shed]", problem);
                        }
                        resilience.shed = sh;
                    }
                    None => resilience_ok = false,
                },
                "sources" => {
                    let span = value.span();
                    match value.into_inner() {
                        DeValue::Table(table) => source_tables.extend(
                            table
                                .into_iter()
                                .map(|(k, v)| (k.into_inner().into_owned(), v)),
                        ),
                        _ => p.at(Some(span), "sources", "must be tables: [sources.<id>]"),
                    }
                }
                other => p.at(
                    Some(key.span()),
                    "TOML",
                    format_args!(
                        "unknown section `{other}`: expected gateway, budget, cache, hedge, breaker, shed, limits, plan, auth or sources"
                    ),
                ),
            }
        }
        let gateway = gateway.unwrap_or_else(|| {
            Some(RawGateway {
                listen: default_listen(),
                admin_listen: default_admin_listen(),
                audit_dir: None,
                policies: None,
                public_base_url: None,
                admin_remote: false,
                otlp_endpoint: None,
                otlp_protocol: None,
                tls: None,
            })
        });
        let budget = budget.unwrap_or(Some(Budget::default()));
        let plan = plan.unwrap_or(Some(PlanMode::Locate));

        let mut addresses = (None, None);
        let mut tls = None;
        if let Some(g) = &gateway {
            if let Some(t) = &g.tls {
                match load_tls(
                    &base.join(t.cert_file.get_ref()),
                    &base.join(t.key_file.get_ref()),
                ) {
                    Ok(config) => tls = Some(config),
                    Err(e) => {
                        let field = if e.starts_with("key_file") {
                            &t.key_file
                        } else {
                            &t.cert_file
                        };
                        p.at(Some(field.span()), "[gateway.tls]", e)
                    }
                }
            }
            for (field, value, slot) in [
                ("listen", &g.listen, &mut addresses.0),
                ("admin_listen", &g.admin_listen, &mut addresses.1),
            ] {
                match value.parse::<SocketAddr>() {
                    Ok(a) => *slot = Some(a),
                    Err(_) => p.at(
                        None,
                        "[gateway]",
                        format_args!("{field} `{value}` is not an address like 127.0.0.1:8080"),
                    ),
                }
            }
            if addresses
                .1
                .is_some_and(|a: SocketAddr| !a.ip().is_loopback())
                && !g.admin_remote
            {
                p.at(
                    None,
                    "[gateway]",
                    "admin_listen is not a loopback address: the admin listener serves Privacy Officer alerts without authentication; set admin_remote = true only behind an authenticating proxy",
                );
            }
            if let Some(url) = g.public_base_url.as_ref().filter(|u| {
                !(u.starts_with("http://") || u.starts_with("https://")) || u.ends_with('/')
            }) {
                p.at(None, "[gateway]", format_args!("public_base_url `{url}` must be an http(s) URL without a trailing slash, e.g. https://scr.example.nhs.uk/fhir"));
            }
        }
        if let Some(b) = &budget {
            if b.default.is_zero() {
                p.at(None, "[budget]", "default must be more than zero");
            }
            if b.default > b.max {
                p.at(
                    None,
                    "[budget]",
                    format_args!(
                        "default ({}) is more than max ({})",
                        humantime::format_duration(b.default),
                        humantime::format_duration(b.max)
                    ),
                );
            }
            if b.reserve >= b.default {
                p.at(
                    None,
                    "[budget]",
                    "reserve must be less than default, or no upstream call has any time",
                );
            }
            if b.max < b.unclipped_floor() {
                p.at(
                    None,
                    "[budget]",
                    format_args!(
                        "max ({}) is less than the least wait a request is given ({}: 500ms, or reserve + {})",
                        humantime::format_duration(b.max),
                        humantime::format_duration(b.unclipped_floor()),
                        humantime::format_duration(Budget::MIN_CALL)
                    ),
                );
            }
        }

        let auth = match auth_section {
            None => {
                p.at(
                    None,
                    "[auth]",
                    "missing: tokens cannot be verified without keys",
                );
                None
            }
            Some(v) => {
                let span = v.span();
                section::<RawAuth>(&mut p, v, "[auth]").map(|a| {
                    if a.keys.is_empty() {
                        p.at(
                            Some(span.clone()),
                            "[auth]",
                            "keys is empty: name at least one public key",
                        );
                    }
                    let mut keys = Vec::new();
                    for k in a.keys {
                        let file = base.join(&k.public_key_file);
                        match TrustedKey::from_pem_file(k.kid, &k.algorithm, &file) {
                            Ok(key) => keys.push(key),
                            Err(e) => p.at(Some(span.clone()), "[[auth.keys]]", e),
                        }
                    }
                    AuthSettings {
                        audience: a.audience,
                        issuer: a.issuer,
                        keys,
                    }
                })
            }
        };

        let mut sources = Vec::new();
        let declared = source_tables.len();
        for (id, value) in source_tables {
            let span = value.span();
            let what = format!("[sources.{id}]");
            let Some(mut s) = section::<RawSource>(&mut p, value, &what) else {
                continue;
            };
            // TLS certificate and key files are relative to the config file, like key files.
            s.connector.resolve_paths(base);
            // ODS codes are upper case; the same organisation under two ids would make their
            // namespaced resource ids collide.
            let ods = s.ods.trim().to_ascii_uppercase();
            if let Some(other) = sources
                .iter()
                .find(|o: &&SourceConfig| o.ods.as_str() == ods)
            {
                p.at(
                    Some(span.clone()),
                    &what,
                    format_args!(
                        "ods {ods} is also source `{}`'s: one source per organisation",
                        other.id
                    ),
                );
            }
            if s.ods.is_empty() || !s.ods.chars().all(|c| c.is_ascii_alphanumeric()) {
                p.at(
                    Some(span.clone()),
                    &what,
                    format_args!("ods `{}` is not an ODS code (letters and digits)", s.ods),
                );
            }
            if s.name.trim().is_empty() {
                p.at(Some(span.clone()), &what, "name is empty");
            }
            if s.max_concurrency == 0 {
                p.at(
                    Some(span.clone()),
                    &what,
                    "max_concurrency must be at least 1",
                );
            }
            for problem in s.connector.validate() {
                p.at(Some(span.clone()), &what, problem);
            }
            sources.push(SourceConfig {
                id,
                ods: OdsCode::new(ods),
                name: s.name,
                kind: s.kind,
                max_concurrency: s.max_concurrency,
                connector: s.connector,
            });
        }
        // Checks across sources only make sense when every source was read.
        let demographics = sources
            .iter()
            .filter(|s| s.kind == SourceKind::Demographics)
            .count();
        if sources.len() == declared && plan == Some(PlanMode::Locate) && demographics != 1 {
            p.at(None, "[plan]", format_args!("mode locate needs exactly one source of kind demographics; found {demographics} (use mode = \"broadcast\" without one)"));
        }
        if sources.len() == declared && sources.iter().all(|s| s.kind == SourceKind::Demographics) {
            p.at(None, "[sources]", "no clinical sources: add at least one gp-practice, trust, council or private-provider");
        }

        match (
            p.list.is_empty() && resilience_ok,
            addresses,
            budget,
            plan,
            auth,
        ) {
            (true, (Some(listen), Some(admin_listen)), Some(budget), Some(plan), Some(auth)) => {
                let gateway = gateway.unwrap_or_else(|| {
                    unreachable!("addresses parsed, so the gateway section was read")
                });
                Ok(Config {
                    listen,
                    admin_listen,
                    budget,
                    resilience,
                    plan,
                    auth,
                    audit_dir: gateway.audit_dir.map(|d| base.join(d)),
                    public_base_url: gateway.public_base_url,
                    policies: gateway.policies.map(|d| base.join(d)),
                    otlp: crate::telemetry::OtlpSettings {
                        endpoint: gateway.otlp_endpoint,
                        protocol: gateway.otlp_protocol,
                    },
                    limits,
                    tls,
                    sources,
                })
            }
            _ => Err(p.list),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:0"

[budget]
default = "1500ms"

[auth]
audience = "tributary"
keys = [{ algorithm = "ES256", public_key_file = "../src/auth/demo-verifying-key.pem" }]

[sources.pds]
ods = "X26"
name = "Personal Demographics Service"
kind = "demographics"
connector = { type = "fhir", base_url = "http://127.0.0.1:7000/fhir" }

[sources.trust-rxl]
ods = "RXL"
name = "Blackpool Teaching Hospitals"
kind = "trust"
connector = { type = "hl7v2", address = "127.0.0.1:2575" }
"#;

    fn parse(text: &str) -> Result<Config, Vec<String>> {
        Config::parse(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("examples")
                .join("t.toml"),
            text,
        )
    }

    #[test]
    fn a_good_file_loads_with_defaults_filled_in() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.budget.default, Duration::from_millis(1500));
        assert_eq!(c.budget.max, Duration::from_secs(10));
        assert_eq!(c.plan, PlanMode::Locate);
        assert_eq!(c.sources.len(), 2);
        assert_eq!(c.auth.keys.len(), 1);
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let bad = GOOD
            .replace("default = \"1500ms\"", "default = \"soon\"")
            .replace("kind = \"trust\"", "kind = \"hospital\"")
            .replace(
                "name = \"Personal Demographics Service\"",
                "name = \"\"\ncolour = \"blue\"",
            )
            .replace("127.0.0.1:0", "localhost");
        let errors = parse(&bad).unwrap_err();
        let joined = errors.join("\n");
        assert!(errors.len() >= 4, "{joined}");
        assert!(
            joined.contains("[budget]") && joined.contains("soon"),
            "{joined}"
        );
        assert!(
            joined.contains("[sources.trust-rxl]") && joined.contains("hospital"),
            "{joined}"
        );
        assert!(
            joined.contains("[sources.pds]") && joined.contains("colour"),
            "{joined}"
        );
        assert!(joined.contains("listen `localhost`"), "{joined}");
        assert!(errors.iter().all(|e| e.contains("t.toml:")), "{joined}");
        let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert!(
            joined.contains(&format!(
                "t.toml:{}:8: [sources.trust-rxl]",
                line_of("\"hospital\"")
            )),
            "points at the bad kind: {joined}"
        );
        assert!(
            joined.contains(&format!("t.toml:{}:11: [budget]", line_of("\"soon\""))),
            "points at the bad duration: {joined}"
        );
        assert!(
            !joined.contains("demographics;"),
            "no follow-on errors from sources that could not be read: {joined}"
        );
    }

    #[test]
    fn locate_needs_one_demographics_source_and_budgets_must_make_sense() {
        let bad = GOOD
            .replace("kind = \"demographics\"", "kind = \"council\"")
            .replace("default = \"1500ms\"", "default = \"20s\"");
        let joined = parse(&bad).unwrap_err().join("\n");
        assert!(
            joined.contains("exactly one source of kind demographics"),
            "{joined}"
        );
        assert!(joined.contains("more than max"), "{joined}");
    }

    #[test]
    fn resilience_sections_fill_in_defaults_and_report_every_problem() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.resilience, Resilience::default());
        assert_eq!(c.resilience.breaker.consecutive_failures, 5);
        assert_eq!(c.resilience.breaker.base_ejection, Duration::from_secs(30));
        assert_eq!(c.resilience.hedge.percentile, 0.95);

        let tuned = format!(
            "{GOOD}\n[cache]\nmax_bytes = 8388608\nstale_if_error = \"5m\"\n[cache.ttl]\ndefault = \"20s\"\ntrust = \"0s\"\ngp-practice = \"1m\"\n[hedge]\nmax_extra_load = 0.02\n[breaker]\nconsecutive_failures = 3\n[shed]\nmax_in_flight = 64\n"
        );
        let c = parse(&tuned).unwrap();
        let r = &c.resilience;
        assert_eq!(r.cache.ttl_for(SourceKind::Trust), Duration::ZERO);
        assert_eq!(
            r.cache.ttl_for(SourceKind::GpPractice),
            Duration::from_secs(60)
        );
        assert_eq!(
            r.cache.ttl_for(SourceKind::Council),
            Duration::from_secs(20)
        );
        assert_eq!(r.cache.stale_if_error, Duration::from_secs(300));
        assert_eq!(r.hedge.max_extra_load, 0.02);
        assert_eq!(r.breaker.consecutive_failures, 3);
        assert_eq!(r.shed.max_in_flight, 64);

        let bad = format!(
            "{GOOD}\n[cache]\nttl = {{ hospital = \"1s\" }}\n[hedge]\npercentile = 95\n[breaker]\nwindow = 0\nflavour = 1\n[shed]\nmax_in_flight = 0\n"
        );
        let joined = parse(&bad).unwrap_err().join("\n");
        assert!(
            joined.contains("[cache]") && joined.contains("hospital"),
            "{joined}"
        );
        assert!(joined.contains("[hedge]: percentile"), "{joined}");
        assert!(
            joined.contains("[breaker]") && joined.contains("flavour"),
            "{joined}"
        );
        assert!(joined.contains("[shed]: max_in_flight"), "{joined}");
    }

    #[test]
    fn the_wait_floor_leaves_the_reserve_a_call_and_never_passes_max() {
        let ms = Duration::from_millis;
        let budget = |default, max, reserve| Budget {
            default: ms(default),
            max: ms(max),
            reserve: ms(reserve),
        };
        assert_eq!(Budget::default().wait_floor(), ms(500));
        assert_eq!(
            budget(2000, 10_000, 900).wait_floor(),
            ms(1150),
            "reserve + a call"
        );
        assert_eq!(budget(200, 300, 50).wait_floor(), ms(300), "never past max");
        let joined = parse(&GOOD.replace(
            "[budget]\ndefault = \"1500ms\"",
            "[budget]\ndefault = \"1500ms\"\nmax = \"1500ms\"\nreserve = \"1400ms\"",
        ))
        .unwrap_err()
        .join("\n");
        assert!(
            joined.contains(
                "max (1s 500ms) is less than the least wait a request is given (1s 650ms"
            ),
            "{joined}"
        );
    }

    #[test]
    fn limits_fill_in_defaults_and_report_every_problem() {
        assert_eq!(parse(GOOD).unwrap().limits, Limits::default());
        let tuned = format!(
            "{GOOD}\n[limits]\nheader_read_timeout = \"3s\"\nmax_connections = 10\nsub_rate = 0\n"
        );
        let l = parse(&tuned).unwrap().limits;
        assert_eq!(l.header_read_timeout, Duration::from_secs(3));
        assert_eq!(l.max_connections, 10);
        assert!(l.sub().is_off());
        assert!(!l.org().is_off());
        let bad = format!(
            "{GOOD}\n[limits]\nmax_header_bytes = 100\nmax_connections = 0\norg_rate = -1\nheader_read_timeout = \"0s\"\n"
        );
        let joined = parse(&bad).unwrap_err().join("\n");
        for expect in [
            "max_header_bytes must be at least 8192",
            "max_connections",
            "org_rate",
            "header_read_timeout",
        ] {
            assert!(joined.contains(expect), "{expect}: {joined}");
        }
        let tiny = format!(
            "{GOOD}\n[limits]\nsub_rate = 1e-20\norg_rate = 0.001\nwrite_timeout = \"0s\"\nidle_timeout = \"0s\"\n"
        );
        let joined = parse(&tiny).unwrap_err().join("\n");
        for expect in [
            "sub_rate must be 0 (no limit) or at least 0.001 requests per second",
            "write_timeout must be more than zero",
            "idle_timeout must be more than zero",
        ] {
            assert!(joined.contains(expect), "{expect}: {joined}");
        }
        assert!(
            !joined.contains("org_rate"),
            "the floor itself is allowed: {joined}"
        );
        let unknown = format!("{GOOD}\n[limits]\nmax_sockets = 3\n");
        assert!(
            parse(&unknown)
                .unwrap_err()
                .join("\n")
                .contains("max_sockets")
        );
    }

    #[test]
    fn tls_loads_a_pem_certificate_and_key_and_names_the_bad_file_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let with_tls = |cert: &Path, key: &Path| {
            GOOD.replace(
                "listen = \"127.0.0.1:0\"\n",
                &format!(
                    "listen = \"127.0.0.1:0\"\n[gateway.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
                    cert.display().to_string(),
                    key.display().to_string()
                ),
            )
        };
        let c = parse(&with_tls(&cert_file, &key_file)).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(
            tls.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );

        let text = with_tls(&cert_file, &dir.path().join("missing.pem"));
        let joined = parse(&text).unwrap_err().join("\n");
        let line = text
            .lines()
            .position(|l| l.starts_with("key_file"))
            .unwrap()
            + 1;
        assert!(
            joined.contains(&format!("t.toml:{line}:12: [gateway.tls]: key_file")),
            "{joined}"
        );
        // A certificate file that is not PEM.
        std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
        let joined = parse(&with_tls(&dir.path().join("junk.pem"), &key_file))
            .unwrap_err()
            .join("\n");
        assert!(joined.contains("cert_file"), "{joined}");
        // A malformed key names the file, never quotes a line of it.
        std::fs::write(
            dir.path().join("bad-key.pem"),
            "-----BEGIN PRIVATE KEY s3cr3t-m4t3r14l\n",
        )
        .unwrap();
        let joined = parse(&with_tls(&cert_file, &dir.path().join("bad-key.pem")))
            .unwrap_err()
            .join("\n");
        assert!(joined.contains("key_file"), "{joined}");
        assert!(!joined.contains("s3cr3t"), "{joined}");
    }

    #[test]
    fn syntax_errors_and_missing_keys_name_the_place() {
        let joined = parse("[gateway\nlisten=1").unwrap_err().join("\n");
        assert!(joined.contains("t.toml:1:"), "{joined}");
        let missing = GOOD.replace("../src/auth/demo-verifying-key.pem", "nope.pem");
        assert!(
            parse(&missing)
                .unwrap_err()
                .join("\n")
                .contains("cannot read")
        );
    }
}
