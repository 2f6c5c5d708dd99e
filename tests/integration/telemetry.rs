//! Traces end to end: an in-test OTLP/HTTP receiver gets the gateway's spans with the right
//! parent/child structure, joined to the caller's `traceparent`, and no patient data anywhere
//! in spans, logs or metrics over a whole demo run.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http_body_util::{BodyExt, Full};
use hyper::{Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, any_value},
    trace::v1::Span,
};
use prost::Message;

use super::{Demo, PATIENCE, TempDir, send};

/// A span as received, flattened for assertions.
#[derive(Debug, Clone)]
struct Got {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

impl From<&Span> for Got {
    fn from(s: &Span) -> Self {
        Self {
            name: s.name.clone(),
            trace_id: hex(&s.trace_id),
            span_id: hex(&s.span_id),
            parent: hex(&s.parent_span_id),
            attrs: s
                .attributes
                .iter()
                .map(|kv| (kv.key.clone(), text(&kv.value)))
                .collect(),
        }
    }
}

/// An OTLP/HTTP (protobuf) receiver on 127.0.0.1:0: collects every span it is sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let store = store.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = req.into_body().collect().await?.to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut got = store.lock().unwrap();
                        for rs in &export.resource_spans {
                            for ss in &rs.scope_spans {
                                got.extend(ss.spans.iter().map(Got::from));
                            }
                        }
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}"), spans)
}

/// Waits (bounded) until `ready` holds for the spans received so far.
async fn wait_for(spans: &Arc<Mutex<Vec<Got>>>, ready: impl Fn(&[Got]) -> bool) -> Vec<Got> {
    let started = tokio::time::Instant::now();
    loop {
        let got = spans.lock().unwrap().clone();
        if ready(&got) {
            return got;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "spans did not arrive: {:#?}",
            got.iter().map(|g| &g.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn spans_arrive_as_one_tree_under_the_callers_trace_with_no_patient_data() {
    let (endpoint, spans) = receiver().await;
    let demo = Demo::start_env(
        TempDir::new(),
        TempDir::new().0.join("audit"),
        &["--fault", "RTX=garbage"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_SERVICE_NAME", "tributary-test"),
            // Quiet logs must not cost the traces.
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let nhs = demo.patient("typical");
    let reply = demo
        .get_with(
            &format!("/Patient/{nhs}/$everything"),
            &[
                ("authorization", &format!("Bearer {}", demo.token)),
                ("traceparent", &format!("00-{trace}-{caller_span}-01")),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let traceresponse = reply.headers["traceresponse"].to_str().unwrap().to_owned();
    assert!(
        traceresponse.starts_with(&format!("00-{trace}-")),
        "the caller learns its trace id: {traceresponse}"
    );

    // Every other sample patient, every route: a whole demo run's worth of data in the spans.
    let samples = demo.samples.clone();
    for (n, _) in &samples {
        demo.get(&format!("/Patient/{n}/$everything")).await;
        demo.get(&format!("/Condition?patient={n}")).await;
        demo.get(&format!(
            "/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{n}"
        ))
        .await;
    }
    demo.get("/Patient/9434765918").await; // fails Modulus 11

    let got = wait_for(&spans, |g| {
        let ours: Vec<&Got> = g.iter().filter(|s| s.trace_id == trace).collect();
        ours.iter().any(|s| s.parent == caller_span)
            && ["plan", "fan_out", "merge", "policy", "audit"]
                .iter()
                .all(|n| ours.iter().any(|s| s.name == *n))
            && ours
                .iter()
                .filter(|s| s.name.starts_with("source_call"))
                .count()
                >= 3
    })
    .await;
    let ours: Vec<&Got> = got.iter().filter(|s| s.trace_id == trace).collect();
    let request = ours
        .iter()
        .find(|s| s.parent == caller_span)
        .expect("the request span is the caller's span's child");
    assert_eq!(request.name, "GET /fhir/Patient/{id}/$everything");
    assert_eq!(
        request.attrs["http.route"],
        "/fhir/Patient/{id}/$everything"
    );
    assert!(
        traceresponse.contains(&request.span_id),
        "traceresponse names the request span"
    );
    let child = |name: &str| {
        ours.iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span"))
    };
    for name in ["plan", "fan_out", "merge", "policy", "audit"] {
        assert_eq!(
            child(name).parent,
            request.span_id,
            "{name} is the request's child"
        );
    }
    let fan_out = child("fan_out");
    let calls: Vec<&&Got> = ours
        .iter()
        .filter(|s| s.name.starts_with("source_call"))
        .collect();
    assert!(calls.len() >= 3, "one span per source call");
    let plan = child("plan");
    for call in &calls {
        assert!(
            call.parent == fan_out.span_id || call.parent == plan.span_id,
            "source calls hang off fan_out (or plan, for demographics)"
        );
        assert!(call.attrs.contains_key("source"), "{call:?}");
        assert!(call.attrs.contains_key("outcome"), "{call:?}");
        assert!(call.attrs.contains_key("connector"), "{call:?}");
    }
    assert!(calls.iter().any(|c| c.attrs.contains_key("resources")));
    assert!(
        calls.iter().any(|c| c.attrs.contains_key("bytes")),
        "FHIR source calls record the bytes read"
    );

    // The last request (a 400) ends the run: wait for its span so the whole run is in.
    let got = wait_for(&spans, |g| {
        g.iter()
            .any(|s| s.attrs.get("http.response.status_code").map(String::as_str) == Some("400"))
    })
    .await;
    let metrics = send("GET", &format!("{}/metrics", demo.admin), &[], None)
        .await
        .text;
    let logs = demo.stop().await;
    assert!(
        logs.contains("Source did not answer in full."),
        "warnings were logged"
    );
    let everything: Vec<String> = got
        .iter()
        .flat_map(|s| {
            std::iter::once(s.name.clone())
                .chain(s.attrs.iter().flat_map(|(k, v)| [k.clone(), v.clone()]))
        })
        .collect();
    assert!(got.len() > samples.len() * 10, "a whole run was exported");
    for (n, _) in samples
        .iter()
        .chain([&("9434765918".to_owned(), String::new())])
    {
        assert!(
            !everything.iter().any(|v| v.contains(n.as_str())),
            "an NHS number reached a span"
        );
        assert!(!logs.contains(n.as_str()), "an NHS number reached the logs");
        assert!(
            !metrics.contains(n.as_str()),
            "an NHS number reached the metrics"
        );
    }
    assert!(
        !everything.iter().any(|v| v.contains("/fhir/Patient/9")),
        "no URI with a patient in it"
    );
}
