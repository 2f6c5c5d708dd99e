//! A simulated FHIR R4 source: a real HTTP/1.1 server over the synthetic region's records,
//! answering as one source (a GP practice, council, private provider, or the PDS-like
//! demographics service) and showing the fault its [`FaultSwitch`] says, request by request.
//!
//! Routes, under `/fhir`: `GET metadata`, `GET Patient?identifier={system}|{nhs number}`,
//! `GET Patient/{id}`, `GET Patient/{id}/$everything[?_type=A,B]`. The demographics source's
//! Patient id is the NHS number (as PDS's); other sources use their local id.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rustls::ServerConfig;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

use super::mapping;
use crate::{
    contract::{ResourceType, SourceKind},
    fault::{Fault, FaultSwitch},
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
        // Owned by this task, so aborting it drops (and aborts) every connection.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        // Replies are small and latency is the point of the demo.
                        let _ = stream.set_nodelay(true);
                        let sim = Arc::clone(&sim);
                        let acceptor = acceptor.clone();
                        connections.spawn(async move {
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
                                async move { Ok::<_, Infallible>(sim.answer(req).await) }
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

struct Sim {
    records: Arc<dyn Records>,
    source: SourceSpec,
    fault: FaultSwitch,
}

type Reply = Response<Full<Bytes>>;

impl Sim {
    async fn answer(&self, req: Request<Incoming>) -> Reply {
        match self.fault.get() {
            // A TLS fault shows in the handshake (see `synth::launch`); the request is fine.
            Fault::None | Fault::Tls => {}
            Fault::Hang => std::future::pending::<()>().await,
            Fault::Slow(delay) => tokio::time::sleep(delay).await,
            Fault::Error => {
                return outcome(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    "simulated failure",
                );
            }
            Fault::Garbage => {
                return Response::builder()
                    .header(header::CONTENT_TYPE, FHIR_JSON)
                    .body(Full::from("<html>\u{0}\u{1}not fhir at all"))
                    .unwrap_or_default();
            }
        }
        self.route(&req)
    }

    fn route(&self, req: &Request<Incoming>) -> Reply {
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
            ["metadata"] => json_reply(StatusCode::OK, &self.capability_statement()),
            ["Patient"] => self.search(&params, &base),
            ["Patient", id] => match self.resolve(id) {
                Some((record, id)) => json_reply(StatusCode::OK, &self.patient(&record, &id)),
                None => not_found(),
            },
            ["Patient", id, "$everything"] => self.everything(id, &params, &base),
            _ => not_found(),
        }
    }

    fn search(&self, params: &[(String, String)], base: &str) -> Reply {
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
        let found = self
            .records
            .record(&nhs_number)
            .and_then(|r| self.patient_id(&r).map(|id| self.patient(&r, &id)));
        json_reply(
            StatusCode::OK,
            &mapping::searchset(found.into_iter().collect(), base),
        )
    }

    fn everything(&self, id: &str, params: &[(String, String)], base: &str) -> Reply {
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
        let mut resources = vec![self.patient(&record, &id)];
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
        json_reply(StatusCode::OK, &mapping::searchset(resources, base))
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

    fn patient(&self, record: &PatientRecord, id: &str) -> Value {
        mapping::patient(&record.demographics, id, self.source.kind)
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

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, FHIR_JSON)
        .body(Full::from(body.to_string()))
        .unwrap_or_default()
}

fn outcome(status: StatusCode, code: &str, diagnostics: &str) -> Reply {
    json_reply(status, &mapping::operation_outcome(code, diagnostics))
}

fn not_found() -> Reply {
    outcome(StatusCode::NOT_FOUND, "not-found", "no such resource")
}

fn bad_request(why: &str) -> Reply {
    outcome(StatusCode::BAD_REQUEST, "invalid", why)
}
