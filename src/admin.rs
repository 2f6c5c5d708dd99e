//! The admin listener (loopback by default, like Envoy's admin port): health, readiness and
//! the upstream status table for SREs. It never serves patient data.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};

use crate::gateway::Gateway;

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
        .route("/admin/upstreams", get(upstreams))
        .with_state(admin)
}

async fn readyz(State(a): State<Admin>) -> Response {
    if a.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    }
}

async fn upstreams(State(a): State<Admin>, headers: HeaderMap) -> Response {
    let rows = a.gateway.upstreams.rows();
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"));
    if !wants_html {
        return Json(serde_json::json!({ "upstreams": rows })).into_response();
    }
    let mut html = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Tributary upstreams</title>\
         <style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}\
         .bad{background:#fdd}</style></head><body><h1>Upstreams</h1><table><tr><th>ODS</th><th>name</th><th>kind</th>\
         <th>connector</th><th>endpoint</th><th>calls</th><th>error rate</th><th>last outcome</th><th>last latency (ms)</th></tr>",
    );
    for r in rows {
        let class = if r.last_outcome.is_some_and(|o| o != "answered") {
            " class=\"bad\""
        } else {
            ""
        };
        html.push_str(&format!(
            "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td></tr>",
            escape(&r.ods),
            escape(&r.name),
            r.kind,
            r.connector,
            escape(&r.endpoint),
            r.calls,
            r.error_rate,
            r.last_outcome.unwrap_or("-"),
            r.last_latency_ms.map_or("-".to_owned(), |ms| format!("{ms:.1}")),
        ));
    }
    html.push_str("</table></body></html>");
    Html(html).into_response()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
