//! Logs and traces. Logs: `tracing` to stderr, filtered by `RUST_LOG` (default `info`).
//! Traces: OpenTelemetry over OTLP, off unless configured by the standard `OTEL_*`
//! environment variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_PROTOCOL` =
//! `http/protobuf` (default) or `grpc`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_BSP_*`...) or by `--otlp-endpoint`.
//!
//! Spans: `request` (one per HTTP request, named by method and matched route) with children
//! `plan`, `fan_out` > `source_call` (one per source: ODS code, kind, connector, outcome,
//! resources; `cache`, `hedged`, `breaker` and `bytes` are recorded by the layers that know
//! them), `merge`, `policy`, `audit`. Spans, logs and metric labels carry routes, ODS codes
//! and outcome codes, never an NHS number, a URI or clinical content.
//!
//! # Why the exporter runs on tokio
//! The OTLP exporter's default HTTP client blocks. This one sends with an async client
//! (reqwest for `http/protobuf`, tonic for `grpc`) from a batch processor running on the
//! gateway's tokio runtime, so exporting never blocks a worker and spans queue (bounded,
//! dropped when full) instead of slowing requests.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::{
    Context,
    trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
    },
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use rand::RngCore;
use tracing::{Span, field::Empty, info_span};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::{LevelFilter, Targets},
    fmt,
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

use crate::outcome::SourceOutcome;

/// True once an OTLP exporter is installed.
static TRACING: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    /// The request's trace, for propagation when no exporter is installed.
    static REQUEST_TRACE: TraceParent;
}

/// Where to send traces, when not (only) from the environment.
#[derive(Debug, Clone, Default)]
pub struct OtlpSettings {
    /// e.g. `http://127.0.0.1:4318` (http/protobuf) or `http://127.0.0.1:4317` (grpc).
    pub endpoint: Option<String>,
    /// `http/protobuf` or `grpc`; the environment's `OTEL_EXPORTER_OTLP_PROTOCOL` otherwise.
    pub protocol: Option<String>,
}

/// Keeps the exporter alive; flushes it on [`Telemetry::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends what is queued and stops the exporter.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber; `json` selects one JSON object per line. Traces are
/// exported when `otlp` or the environment names an endpoint (and `OTEL_SDK_DISABLED` is not
/// `true`, nor `OTEL_TRACES_EXPORTER` `none`). Call inside the tokio runtime.
pub fn init(json: bool, otlp: &OtlpSettings) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,hyper=warn,h2=warn,tonic=warn,tower=warn,reqwest=warn,opentelemetry=warn,opentelemetry_sdk=warn")
    });
    let provider = if otlp_wanted(otlp) {
        Some(provider(otlp)?)
    } else {
        None
    };
    // Each layer filters on its own: RUST_LOG=warn quiets the logs without losing traces.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("tributary"))
            .with_filter(
                Targets::new()
                    .with_default(LevelFilter::WARN)
                    .with_target("tributary", LevelFilter::INFO)
                    .with_target("connectors", LevelFilter::INFO),
            )
    });
    // Colour only for a person at a terminal; files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs: Box<dyn Layer<Registry> + Send + Sync> = if json {
        Box::new(
            fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
    } else {
        Box::new(
            fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(ansi),
        )
    };
    // A second call (tests) keeps the first subscriber.
    let installed = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && provider.is_some() {
        TRACING.store(true, Ordering::Release);
    }
    Ok(Telemetry { provider })
}

fn otlp_wanted(otlp: &OtlpSettings) -> bool {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return false;
    }
    otlp.endpoint.is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
}

fn provider(otlp: &OtlpSettings) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::SpanExporter;
    let protocol = otlp
        .protocol
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").ok())
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok())
        .unwrap_or_else(|| "http/protobuf".to_owned());
    let exporter = match (protocol.as_str(), &otlp.endpoint) {
        ("grpc", Some(ep)) => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(ep.clone())
            .build(),
        ("grpc", None) => SpanExporter::builder().with_tonic().build(),
        ("http/protobuf", Some(ep)) => SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", ep.trim_end_matches('/')))
            .build(),
        ("http/protobuf", None) => SpanExporter::builder().with_http().build(),
        (other, _) => {
            return Err(format!(
                "OTLP protocol {other} is not supported: use http/protobuf or grpc"
            ));
        }
    }
    .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?;
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name("tributary");
    }
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// A W3C trace context (`traceparent`), parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` header (version 00 layout; later versions are read the same
    /// way, as the spec asks). Invalid values are ignored, as the spec asks.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let version = parts.next().filter(|v| v.len() == 2 && *v != "ff")?;
        let trace = parts.next().filter(|t| t.len() == 32)?;
        let span = parts.next().filter(|s| s.len() == 16)?;
        let flags = parts.next().filter(|f| f.len() == 2)?;
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        unhex(trace, &mut trace_id)?;
        unhex(span, &mut span_id)?;
        let mut f = [0u8; 1];
        unhex(flags, &mut f)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: f[0] & 1 == 1,
        })
    }

    fn random(sampled: bool) -> Self {
        let mut t = Self {
            trace_id: [0; 16],
            span_id: [0; 8],
            sampled,
        };
        rand::rng().fill_bytes(&mut t.trace_id);
        rand::rng().fill_bytes(&mut t.span_id);
        t
    }

    pub fn trace_id_hex(&self) -> String {
        crate::audit::chain::hex(&self.trace_id)
    }

    /// The header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id_hex(),
            crate::audit::chain::hex(&self.span_id),
            if self.sampled { "01" } else { "00" }
        )
    }

    /// The same trace, a new span id: a child of this one.
    fn child(&self) -> Self {
        let mut c = *self;
        rand::rng().fill_bytes(&mut c.span_id);
        c
    }
}

fn unhex(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(())
}

/// The request span: named by method and matched route, never by URI.
pub fn request_span(method: &str, route: &str, request_id: &str) -> Span {
    info_span!(
        "request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        request_id = %request_id,
        trace_id = Empty,
        http.response.status_code = Empty,
        slowest_source = Empty,
        slowest_ms = Empty,
    )
}

/// Joins the request span to the caller's trace (if it sent a valid `traceparent`) and
/// returns the request's own trace context: what `traceresponse` tells the caller.
pub fn join_trace(span: &Span, incoming: Option<TraceParent>) -> TraceParent {
    let own = if TRACING.load(Ordering::Acquire) {
        if let Some(tp) = incoming {
            let remote = SpanContext::new(
                TraceId::from_bytes(tp.trace_id),
                SpanId::from_bytes(tp.span_id),
                if tp.sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(Context::new().with_remote_span_context(remote));
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: sc.is_sampled(),
        })
    } else {
        None
    };
    let own = own.unwrap_or_else(|| match incoming {
        Some(tp) => tp.child(),
        None => TraceParent::random(false),
    });
    span.record("trace_id", own.trace_id_hex());
    own
}

/// Runs `fut` with the request's trace context available to [`traceparent_for`].
pub async fn with_request_trace<F: Future>(trace: TraceParent, fut: F) -> F::Output {
    REQUEST_TRACE.scope(trace, fut).await
}

/// The request's trace id, if the current task serves a request.
pub fn current_trace_id() -> Option<String> {
    REQUEST_TRACE.try_with(TraceParent::trace_id_hex).ok()
}

/// The span of one source call, a child of the current span.
pub fn source_call_span(source: &connectors::SourceDescriptor) -> Span {
    info_span!(
        "source_call",
        otel.name = %format!("source_call {}", source.ods),
        otel.kind = "client",
        source = %source.ods,
        source.kind = source.kind.as_str(),
        connector = source.connector.as_str(),
        outcome = Empty,
        resources = Empty,
        elapsed_ms = Empty,
        // Recorded by the layers that know them (cache, hedge, breaker, connector).
        cache = Empty,
        hedged = Empty,
        breaker = Empty,
        bytes = Empty,
    )
}

/// The `traceparent` to send upstream for a call made under `span`.
pub fn traceparent_for(span: &Span) -> Option<String> {
    if TRACING.load(Ordering::Acquire) {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(
                TraceParent {
                    trace_id: sc.trace_id().to_bytes(),
                    span_id: sc.span_id().to_bytes(),
                    sampled: sc.is_sampled(),
                }
                .header(),
            );
        }
    }
    REQUEST_TRACE.try_with(|t| t.child().header()).ok()
}

/// Records a finished call's outcome on its span.
pub fn finish_source_call(span: &Span, outcome: &SourceOutcome) {
    span.record("outcome", outcome.outcome.code());
    span.record("elapsed_ms", outcome.elapsed.as_secs_f64() * 1e3);
    if let crate::outcome::Outcome::Answered(r) = &outcome.outcome {
        span.record("resources", r.resources.len());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn traceparent_parses_valid_values_and_ignores_invalid_ones() {
        let tp =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(tp.sampled);
        assert_eq!(
            tp.header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
        let child = tp.child();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_ne!(child.span_id, tp.span_id);
    }
}
