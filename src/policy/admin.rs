//! Admin endpoints for the Privacy Officer and IG officers, mounted on the admin listener:
//! `GET /admin/alerts` and `POST /admin/policy/explain`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use super::{PolicyEngine, cases::Case};

pub fn admin_router(engine: Arc<PolicyEngine>) -> Router {
    Router::new()
        .route("/admin/alerts", get(alerts))
        .route("/admin/policy/explain", post(explain))
        .with_state(engine)
}

async fn alerts(State(engine): State<Arc<PolicyEngine>>) -> Response {
    let log = engine.alerts();
    Json(json!({ "total": log.total(), "alerts": log.recent() })).into_response()
}

/// Body: one case in the test-case shape (JSON). Answer: which policies decided, and why.
async fn explain(State(engine): State<Arc<PolicyEngine>>, body: axum::body::Bytes) -> Response {
    match serde_json::from_slice::<Case>(&body) {
        Ok(case) => Json(case.explain(&engine)).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": format!("not a case: {e}") })),
        )
            .into_response(),
    }
}
