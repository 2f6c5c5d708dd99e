//! A simulated FHIR R4 source: a real HTTP/1.1 server over the synthetic region's records,
//! answering as one source (a GP practice, council, private provider, or the PDS-like
//! demographics service) and showing the fault its [`FaultSwitch`] says, request by request.
//!
//! Routes, under `/fhir`: `GET metadata`, `GET Patient?identifier={system}|{nhs number}`,
//! `GET Patient/{id}`, `GET Patient/{id}/$everything[?_type=A,B]`. The demographics source's
//! Patient id is the NHS number (as PDS's); other sources use their local id.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rustls::ServerConfig;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

use super::mapping;
use crate::{
    contract::{ResourceType, SourceKind},
    fault::{DRIP_INTERVAL, Fault, FaultSwitch, FaultyListener, OVERSIZE_BYTES, someone_else},
    nhs::{NHS_NUMBER_SYSTEM, NhsNumber},
    synth::model::{PatientRecord, Records, SourceSpec},
};

const FHIR_JSON: &str = "application/fhir+json";

/// Serves `source`'s view of `records` on `listener` until the returned task is aborted;
/// aborting it also closes every open connection.
pub fn serve(
    listener: TcpListener,
    records: Arc<dyn Records>,
    source: SourceSpec,
    fault: FaultSwitch,
) -> tokio::task::JoinHandle<()> {
    serve_tls(listener, records, source, fault, None)
}

/// As [`serve`], over TLS when `tls` is given (HTTPS; a client certificate is required when
/// the config has a client verifier). A connection whose handshake fails is drained and
/// closed; the simulator keeps serving.
pub fn serve_tls(
    listener: TcpListener,
    records: Arc<dyn Records>,
    source: SourceSpec,
    fault: FaultSwitch,
    tls: Option<Arc<ServerConfig>>,
) -> tokio::task::JoinHandle<()> {
    let acceptor = tls.map(TlsAcceptor::from);
    let sim = Arc::new(Sim {
        records,
        source,
        fault,
    });
    tokio::spawn(async move {
        let mut listener = match FaultyListener::new(listener, &sim.fault) {
            Ok(l) => l,
            Err(_) => {
                tracing::warn!(source = %sim.source.id, "Simulator listener has no address.");
                return;
            }
        };
        // Owned by this task, so aborting it drops (and aborts) every connection.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        // Replies are small and latency is the point of the demo.
                        let _ = stream.set_nodelay(true);
                        let sim = Arc::clone(&sim);
                        let acceptor = acceptor.clone();
                        connections.spawn(async move {
                            // TLS, when on, runs over the resettable stream, so `reset` and
                            // `refused` end a TLS connection with an RST too.
                            let stream = ResettableStream::new(stream);
                            let reset = Arc::clone(&stream.reset);
                            let stream = match acceptor {
                                None => Either::Left(stream),
                                Some(acceptor) => match crate::tls::sim_accept(&acceptor, stream).await {
                                    Some(tls) => Either::Right(tls),
                                    None => {
                                        tracing::debug!(source = %sim.source.id, "Simulator TLS handshake failed.");
                                        return;
                                    }
                                },
                            };
                            let service = service_fn(move |req| {
                                let sim = Arc::clone(&sim);
                                let reset = Arc::clone(&reset);
                                async move { sim.answer(req, &reset).await }
                            });
                            // A client going away mid-request is normal; nothing to report.
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Err(_) => {
                        tracing::warn!(source = %sim.source.id, "Simulator accept failed.");
                        // Out of file descriptors, say: back off rather than spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    })
}

/// A connection that ends with a TCP RST instead of a FIN once `reset` is set (`SO_LINGER`
/// 0 at close), for the `reset` and `refused` faults.
struct ResettableStream {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableStream {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            reset: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

struct Sim {
    records: Arc<dyn Records>,
    source: SourceSpec,
    fault: FaultSwitch,
}

type Body = BoxBody<Bytes, io::Error>;
type Reply = Response<Body>;
/// A status and a JSON body, before it is put on the wire (whole, cut short or dripped).
type Answer = (StatusCode, Value);

impl Sim {
    /// One request's reply under the current fault. An error closes the connection without
    /// a reply (hyper drops it), with an RST when `reset` is set.
    async fn answer(&self, req: Request<Incoming>, reset: &AtomicBool) -> io::Result<Reply> {
        let fault = self.fault.get();
        Ok(match fault {
            // A TLS fault shows in the handshake (see `synth::launch`); the request is fine.
            Fault::None | Fault::Tls => reply(self.route(&req, false)),
            // On a connection already open, a stall is a hang: the request is never answered.
            Fault::Hang | Fault::Stall => std::future::pending().await,
            Fault::Slow(delay) => {
                tokio::time::sleep(delay).await;
                reply(self.route(&req, false))
            }
            Fault::Error => reply(outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "simulated failure",
            )),
            Fault::Garbage => Response::builder()
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(full("<html>\u{0}\u{1}not fhir at all"))
                .unwrap_or_default(),
            // Valid JSON, a Bundle in name, but `entry` is an object where FHIR has an array.
            Fault::WrongShape => reply((
                StatusCode::OK,
                json!({"resourceType": "Bundle", "type": "searchset",
                       "entry": {"resource": {"resourceType": "Patient", "id": "1"}}}),
            )),
            Fault::Redirect => redirect_to_self(&req),
            Fault::Oversize => Response::builder()
                .header(header::CONTENT_TYPE, FHIR_JSON)
                .body(oversize_body())
                .unwrap_or_default(),
            // The source is gone: open connections are reset, new ones refused (the listener).
            Fault::Refused => {
                reset.store(true, Ordering::Relaxed);
                return Err(io::Error::other("simulated refusal"));
            }
            Fault::Reset => {
                reset.store(true, Ordering::Relaxed);
                streamed(self.route(&req, false), cut_short)
            }
            Fault::Drip => streamed(self.route(&req, false), drip),
            Fault::OtherPatient => reply(self.route(&req, true)),
        })
    }

    /// The well-behaved answer; `other` answers about someone else (`other-patient`).
    fn route(&self, req: &Request<Incoming>, other: bool) -> Answer {
        if req.method() != Method::GET {
            return outcome(
                StatusCode::METHOD_NOT_ALLOWED,
                "not-supported",
                "only GET is supported",
            );
        }
        let base = match req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
        {
            Some(host) => format!("http://{host}/fhir"),
            None => "/fhir".to_owned(),
        };
        let params = query_params(req.uri().query().unwrap_or_default());
        let Some(path) = req.uri().path().strip_prefix("/fhir/") else {
            return not_found();
        };
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["metadata"] => (StatusCode::OK, self.capability_statement()),
            ["Patient"] => self.search(&params, &base, other),
            ["Patient", id] => match self.resolve(id) {
                Some((record, id)) => (StatusCode::OK, self.patient(&record, &id, other)),
                None => not_found(),
            },
            ["Patient", id, "$everything"] => self.everything(id, &params, &base, other),
            _ => not_found(),
        }
    }

    fn search(&self, params: &[(String, String)], base: &str, other: bool) -> Answer {
        let Some((_, identifier)) = params.iter().find(|(k, _)| k == "identifier") else {
            return bad_request("search needs an identifier");
        };
        let nhs_number = match identifier.split_once('|') {
            Some((NHS_NUMBER_SYSTEM, value)) => NhsNumber::parse(value),
            _ => return bad_request("identifier must be an NHS number with its system"),
        };
        let Ok(nhs_number) = nhs_number else {
            return bad_request("identifier is not a valid NHS number");
        };
        // Answering about someone else does not need the source to know the asked patient.
        let found = self.records.record(&nhs_number).and_then(|r| {
            let id = self
                .patient_id(&r)
                .or_else(|| other.then(|| "other-patient".to_owned()))?;
            Some(self.patient(&r, &id, other))
        });
        (
            StatusCode::OK,
            mapping::searchset(found.into_iter().collect(), base),
        )
    }

    fn everything(&self, id: &str, params: &[(String, String)], base: &str, other: bool) -> Answer {
        let mut types = Vec::new();
        for (k, v) in params {
            if k != "_type" {
                continue;
            }
            for name in v.split(',') {
                match ResourceType::parse(name) {
                    Some(t) => types.push(t),
                    None => return bad_request("_type names an unsupported resource type"),
                }
            }
        }
        let Some((record, id)) = self.resolve(id) else {
            return not_found();
        };
        let mut resources = vec![self.patient(&record, &id, other)];
        if self.source.kind != SourceKind::Demographics {
            resources.extend(
                record
                    .items_at(&self.source.ods)
                    .filter(|i| {
                        types.is_empty() || types.contains(&mapping::resource_type(&i.detail))
                    })
                    .map(|i| mapping::resource(i, &id)),
            );
        }
        (StatusCode::OK, mapping::searchset(resources, base))
    }

    /// The record and this source's Patient id for a Patient id in a URL.
    fn resolve(&self, id: &str) -> Option<(PatientRecord, String)> {
        let nhs_number = if self.source.kind == SourceKind::Demographics {
            NhsNumber::parse(id).ok()?
        } else {
            self.records.nhs_number_by_local_id(&self.source.ods, id)?
        };
        let record = self.records.record(&nhs_number)?;
        let id = self.patient_id(&record)?;
        Some((record, id))
    }

    /// This source's id for the patient, or `None` when the source does not know them.
    fn patient_id(&self, record: &PatientRecord) -> Option<String> {
        if self.source.kind == SourceKind::Demographics {
            Some(record.demographics.nhs_number.expose())
        } else {
            record.local_id(&self.source.ods).map(str::to_owned)
        }
    }

    /// The Patient resource; with `other`, it carries a different NHS number.
    fn patient(&self, record: &PatientRecord, id: &str, other: bool) -> Value {
        if other {
            let mut someone = record.demographics.clone();
            someone.nhs_number = someone_else(&someone.nhs_number);
            mapping::patient(&someone, id, self.source.kind)
        } else {
            mapping::patient(&record.demographics, id, self.source.kind)
        }
    }

    fn capability_statement(&self) -> Value {
        let clinical: Vec<Value> = ResourceType::clinical()
            .map(|t| json!({"type": t.as_str(), "interaction": [{"code": "search-type"}]}))
            .collect();
        let mut resources = vec![json!({
            "type": "Patient",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [{"name": "identifier", "type": "token"}],
            "operation": [{
                "name": "everything",
                "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
            }],
        })];
        if self.source.kind != SourceKind::Demographics {
            resources.extend(clinical);
        }
        json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-01-01",
            "kind": "instance",
            "software": {"name": format!("Tributary FHIR simulator ({})", self.source.name)},
            "fhirVersion": "4.0.1",
            "format": [FHIR_JSON],
            "rest": [{"mode": "server", "resource": resources}],
        })
    }
}

/// The query's parameters, percent-decoded (a `+` stays a `+`: FHIR clients escape spaces).
fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            (decode(k), decode(v))
        })
        .collect()
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn reply((status, body): Answer) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, FHIR_JSON)
        .body(full(body.to_string()))
        .unwrap_or_default()
}

/// The answer's head with its full length declared, and a body `shape` sends as it likes.
fn streamed(answer: Answer, shape: fn(Bytes) -> Body) -> Reply {
    let bytes = Bytes::from(answer.1.to_string());
    Response::builder()
        .status(answer.0)
        .header(header::CONTENT_TYPE, FHIR_JSON)
        .header(header::CONTENT_LENGTH, bytes.len())
        .body(shape(bytes))
        .unwrap_or_default()
}

/// Half the body, a pause for it to reach the wire, then an error: hyper drops the
/// connection, which [`ResettableStream`] resets.
fn cut_short(bytes: Bytes) -> Body {
    let half = bytes.slice(..bytes.len() / 2);
    let frames =
        futures::stream::iter([Ok(Frame::data(half))]).chain(futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(io::Error::other("simulated reset"))
        }));
    BodyExt::boxed(StreamBody::new(frames))
}

/// One byte every [`DRIP_INTERVAL`].
fn drip(bytes: Bytes) -> Body {
    let frames = futures::stream::unfold(0, move |at| {
        let bytes = bytes.clone();
        async move {
            if at >= bytes.len() {
                return None;
            }
            tokio::time::sleep(DRIP_INTERVAL).await;
            Some((Ok(Frame::data(bytes.slice(at..at + 1))), at + 1))
        }
    });
    BodyExt::boxed(StreamBody::new(frames))
}

/// A Bundle padded with whitespace to [`OVERSIZE_BYTES`], chunked, made as it is sent.
fn oversize_body() -> Body {
    static PAD: [u8; 64 * 1024] = [b' '; 64 * 1024];
    let chunks = OVERSIZE_BYTES / PAD.len();
    let frames = futures::stream::iter(
        std::iter::once(Bytes::from_static(
            br#"{"resourceType":"Bundle","type":"searchset","entry":["#,
        ))
        .chain(std::iter::repeat_n(Bytes::from_static(&PAD), chunks))
        .chain(std::iter::once(Bytes::from_static(b"]}")))
        .map(|b| Ok(Frame::data(b))),
    );
    BodyExt::boxed(StreamBody::new(frames))
}

/// 302 to the request's own URL: following it never ends.
fn redirect_to_self(req: &Request<Incoming>) -> Reply {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Response::builder()
        .status(StatusCode::FOUND)
        .header(header::LOCATION, format!("http://{host}{target}"))
        .body(full(""))
        .unwrap_or_default()
}

fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Answer {
    (status, mapping::operation_outcome(code, diagnostics))
}

fn not_found() -> Answer {
    outcome(StatusCode::NOT_FOUND, "not-found", "no such resource")
}

fn bad_request(why: &str) -> Answer {
    outcome(StatusCode::BAD_REQUEST, "invalid", why)
}
