//! The admin listener (loopback by default, like Envoy's admin port): health, readiness,
//! Prometheus metrics, the upstream status table for SREs and the Privacy Officer's
//! break-glass alerts. It never serves patient data.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::{gateway::Gateway, upstreams::UpstreamRow};

/// Seconds between the upstream page's refreshes.
const REFRESH_SECONDS: u32 = 5;

#[derive(Debug, Clone)]
pub struct Admin {
    pub gateway: Arc<Gateway>,
    /// False once shutdown starts: load balancers stop sending new requests.
    pub ready: Arc<AtomicBool>,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/admin/upstreams", get(upstreams))
        .route("/admin/audit/alerts", get(alerts))
        .with_state(admin)
}

async fn readyz(State(a): State<Admin>) -> Response {
    if a.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn metrics(State(a): State<Admin>) -> Response {
    let reloads = a.gateway.policy.reloads();
    crate::metrics::global().policy_reloads(reloads.accepted, reloads.rejected);
    let mut response = crate::metrics::global().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /admin/audit/alerts`: break-glass requests, as committed to the audit trail (durable:
/// rebuilt from the audit files at start). Each names its audit record, not the patient.
async fn alerts(State(a): State<Admin>) -> Response {
    Json(serde_json::json!({ "alerts": a.gateway.audit.alerts() })).into_response()
}

async fn upstreams(State(a): State<Admin>, headers: HeaderMap) -> Response {
    let mut rows = a.gateway.upstreams.rows();
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if !wants_html {
        return Json(serde_json::json!({ "upstreams": rows })).into_response();
    }
    // Slowest first: the source that makes requests slow is the top row.
    rows.sort_by(|x, y| {
        y.p99_ms
            .unwrap_or(-1.0)
            .total_cmp(&x.p99_ms.unwrap_or(-1.0))
            .then_with(|| x.ods.cmp(&y.ods))
    });
    Html(page(&rows)).into_response()
}

fn page(rows: &[UpstreamRow]) -> String {
    let mut html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
         <title>Tributary upstreams</title>\
         <style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}td.n{{text-align:right}}\
         .bad{{background:#fdd}}.open{{background:#f99}}caption{{text-align:left;color:#555}}</style>\
         </head><body><h1>Upstreams</h1><table id=\"upstreams\">\
         <caption>Slowest first (p99 over the last {}s). Refreshes every {REFRESH_SECONDS}s.</caption>\
         <tr><th>ODS</th><th>name</th><th>kind</th><th>connector</th><th>endpoint</th>\
         <th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>calls (window)</th><th>error rate</th>\
         <th>in flight</th><th>breaker</th><th>last error</th><th>last outcome</th><th>calls</th></tr>",
        crate::upstreams::WINDOW.as_secs()
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |ms| format!("{ms:.1}"));
    for r in rows {
        let class = if r.breaker == "open" {
            " class=\"open\""
        } else if r.last_outcome.is_some_and(|o| o != "answered") {
            " class=\"bad\""
        } else {
            ""
        };
        html.push_str(&format!(
            "<tr{class} data-ods=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n p99\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{:.3}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td></tr>",
            escape(&r.ods),
            escape(&r.ods),
            escape(&r.name),
            r.kind,
            r.connector,
            escape(&r.endpoint),
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.window_calls,
            r.error_rate,
            r.in_flight,
            r.breaker,
            r.last_error.unwrap_or("-"),
            r.last_outcome.unwrap_or("-"),
            r.calls,
        ));
    }
    html.push_str("</table></body></html>");
    html
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
