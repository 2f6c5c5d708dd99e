//! The FHIR R4 REST client: a Patient search by NHS number, then `$everything` for the types
//! wanted, every failure classified into a [`ConnectorError`].
//!
//! No timeouts or retries here (the gateway owns them). Dropping a call's future drops its
//! connection and nothing else, so the pooled client stays usable (cancel safety).
//!
//! An `https://` source is reached through hyper-rustls with the source's own
//! [`TlsConfig`](crate::tls::TlsConfig) (its CA only, and a client certificate for mutual TLS),
//! HTTP/1.1 over TLS; a failed handshake is a [`ConnectorError::Tls`] naming the reason.

use std::{error::Error, io, sync::Arc};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, ResponseFuture, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use super::{FhirConfig, mapping};
use crate::{
    contract::{
        Connector, ConnectorError, ResourceType, SourceDescriptor, SourceKind, SourceQuery,
        SourceRecord,
    },
    nhs::NHS_NUMBER_SYSTEM,
    tls::TlsFailure,
};

/// What a query parameter's value must escape (`|` separates an identifier's system and value).
const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A connector for one FHIR R4 source.
#[derive(Debug)]
pub struct FhirConnector {
    descriptor: SourceDescriptor,
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: HttpClient,
    /// The base URL without a trailing `/`.
    base: String,
    max_body_bytes: usize,
    /// The demographics source answers the search in full; no `$everything`.
    search_only: bool,
}

impl FhirConnector {
    /// Builds the connector; fails with every problem in the configuration.
    pub fn new(descriptor: SourceDescriptor, config: FhirConfig) -> Result<Self, String> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let base = config.base_url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|_| format!("base_url `{base}` is not a valid URL"))?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        if uri.scheme_str() != Some(scheme) || uri.authority().is_none() {
            return Err(format!(
                "base_url `{base}`: only {scheme}:// URLs with a host are supported here"
            ));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_timer(TokioTimer::new());
        let client = match &config.tls {
            None => HttpClient::Plain(builder.build(connector)),
            Some(tls) => {
                let tls = tls.load().map_err(|p| p.join("; "))?;
                connector.enforce_http(false);
                let https = HttpsConnectorBuilder::new()
                    .with_tls_config((*tls.config).clone())
                    .https_only();
                let https = match tls.server_name {
                    Some(name) => {
                        https.with_server_name_resolver(FixedServerNameResolver::new(name))
                    }
                    None => https,
                };
                HttpClient::Tls(builder.build(https.enable_http1().wrap_connector(connector)))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                base,
                max_body_bytes: config.max_body_bytes,
                search_only: descriptor.kind == SourceKind::Demographics,
            }),
            descriptor,
        })
    }
}

/// The pooled HTTP client: plain for `http://` sources, rustls for `https://` ones.
#[derive(Debug)]
enum HttpClient {
    Plain(Client<HttpConnector, Empty<Bytes>>),
    Tls(Client<HttpsConnector<HttpConnector>, Empty<Bytes>>),
}

impl HttpClient {
    fn request(&self, request: Request<Empty<Bytes>>) -> ResponseFuture {
        match self {
            Self::Plain(c) => c.request(request),
            Self::Tls(c) => c.request(request),
        }
    }
}

impl Connector for FhirConnector {
    fn descriptor(&self) -> &SourceDescriptor {
        &self.descriptor
    }

    fn fetch(
        &self,
        query: SourceQuery,
    ) -> BoxFuture<'static, Result<SourceRecord, ConnectorError>> {
        let inner = Arc::clone(&self.inner);
        async move { inner.fetch(&query).await }.boxed()
    }
}

/// Bytes read from the source, on the caller's span if it has a `bytes` field (the
/// gateway's `source_call` span does); a no-op otherwise.
fn record_bytes(n: usize) {
    tracing::Span::current().record("bytes", n);
}

impl Inner {
    async fn fetch(&self, query: &SourceQuery) -> Result<SourceRecord, ConnectorError> {
        let identifier = format!("{NHS_NUMBER_SYSTEM}|{}", query.nhs_number.expose());
        let search = format!(
            "{}/Patient?identifier={}",
            self.base,
            utf8_percent_encode(&identifier, QUERY_VALUE)
        );
        let trace = query.trace_context.as_deref();
        let first = self.get(&search, trace).await?;
        record_bytes(first.len());
        let Some(patient) = mapping::read_search(&first, &query.nhs_number)? else {
            return Ok(SourceRecord::default());
        };
        let types: Vec<&str> = query
            .resource_types
            .iter()
            .filter(|t| **t != ResourceType::Patient)
            .map(|t| t.as_str())
            .collect();
        if self.search_only || types.is_empty() {
            return Ok(SourceRecord {
                resources: vec![patient],
            });
        }
        let id = patient["id"].as_str().unwrap_or_default();
        if !mapping::is_fhir_id(id) {
            return Err(ConnectorError::Malformed(
                "patient id is not a valid fhir id".into(),
            ));
        }
        let everything = format!(
            "{}/Patient/{id}/$everything?_type={}",
            self.base,
            types.join(",")
        );
        let body = self.get(&everything, trace).await?;
        record_bytes(first.len() + body.len());
        let mut resources =
            mapping::read_everything(&body, &query.nhs_number, id, |t| query.wants(t))?;
        resources.insert(0, patient);
        Ok(SourceRecord { resources })
    }

    /// One GET; the body of a 2xx reply, read up to the size cap. `traceparent` (W3C) goes
    /// upstream as is, so the source's own traces join the gateway's.
    async fn get(&self, url: &str, traceparent: Option<&str>) -> Result<Bytes, ConnectorError> {
        let mut request = Request::get(url).header(header::ACCEPT, "application/fhir+json");
        if let Some(tp) = traceparent {
            request = request.header("traceparent", tp);
        }
        let request = request
            .body(Empty::new())
            .map_err(|_| ConnectorError::Malformed("request url is invalid".into()))?;
        let response = self.client.request(request).await.map_err(|e| {
            // A handshake failure may surface on connect or, when the server rejects our
            // client certificate after the handshake (TLS 1.3), on the first read.
            if let Some(failure) = TlsFailure::find(&e) {
                ConnectorError::Tls(failure)
            } else if e.is_connect() {
                ConnectorError::Connect(describe(&e))
            } else if chain(&e).any(|c| {
                c.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_parse)
            }) {
                ConnectorError::Malformed("reply is not http".into())
            } else {
                ConnectorError::Transport(describe(&e))
            }
        })?;
        let status = response.status();
        if status.is_redirection() {
            return Err(ConnectorError::Redirected {
                status: status.as_u16(),
            });
        }
        if !status.is_success() {
            return Err(ConnectorError::Status {
                status: status.as_u16(),
            });
        }
        let limit = self.max_body_bytes;
        let declared = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ConnectorError::TooLarge { limit });
        }
        match Limited::new(response.into_body(), limit).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(ConnectorError::TooLarge { limit })
            }
            Err(e) => Err(ConnectorError::Transport(describe(e.as_ref()))),
        }
    }
}

/// An error and its sources, outermost first.
fn chain<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// A fixed fragment for a transport failure: the kind of the underlying I/O error, if any.
/// Never the error's own text, which might one day carry a URL (and so an NHS number).
fn describe(err: &(dyn Error + 'static)) -> String {
    for e in chain(err) {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return io.kind().to_string();
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return "connection closed before the reply was complete".into();
        }
    }
    "request failed".into()
}
