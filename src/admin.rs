//! The admin API, under `/admin/v1`: stored messages, their timelines, dead letters, replay
//! and traces across flows. It exists only when `FERRY_ADMIN_TOKEN` is set, and every call
//! must carry `Authorization: Bearer <token>`.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::error::ServeError;
use crate::runtime::Runtime;
use crate::store::Store;

/// The admin routes, guarded by `token`.
pub fn router(runtime: Arc<Runtime>, token: &str) -> Router {
    let token: Arc<str> = Arc::from(token);
    Router::new()
        .route("/messages", get(list_messages))
        .route("/messages/{id}", get(show_message))
        .route("/messages/{id}/replay", post(replay_one))
        .route("/dead-letters", get(list_dead_letters))
        .route("/dead-letters/replay", post(replay_many))
        .route("/trace/{key}", get(trace))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let token = Arc::clone(&token);
            async move { authorize(&token, request, next).await }
        }))
        .with_state(runtime)
}

async fn authorize(token: &str, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        next.run(request).await
    } else {
        let body = json!({"error": "unauthorized", "message": "a valid admin token is required", "details": []});
        (axum::http::StatusCode::UNAUTHORIZED, Json(body)).into_response()
    }
}

fn store(runtime: &Runtime) -> Result<&Store, ServeError> {
    runtime
        .store()
        .ok_or_else(|| ServeError::Internal("ferry runs without a store".into()))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    flow: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
}

async fn list_messages(
    State(runtime): State<Arc<Runtime>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ServeError> {
    let limit = q.limit.unwrap_or(100).min(1000);
    let messages = store(&runtime)?
        .list_messages(q.flow.as_deref(), q.status.as_deref(), limit)
        .await?;
    Ok(Json(json!({"messages": messages})).into_response())
}

async fn list_dead_letters(
    State(runtime): State<Arc<Runtime>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ServeError> {
    let limit = q.limit.unwrap_or(100).min(1000);
    let dead = store(&runtime)?
        .list_messages(q.flow.as_deref(), Some("dead"), limit)
        .await?;
    Ok(Json(json!({"dead_letters": dead})).into_response())
}

async fn show_message(
    State(runtime): State<Arc<Runtime>>,
    Path(id): Path<String>,
) -> Result<Response, ServeError> {
    match store(&runtime)?.message(&id).await? {
        Some(mut message) => {
            if let Some(flow) = runtime
                .flows()
                .iter()
                .find(|f| f.name == message.summary.flow)
            {
                flow.sensitive().redact(&mut message.inbound);
            }
            Ok(Json(message).into_response())
        }
        None => Err(ServeError::Missing {
            what: "message",
            id,
        }),
    }
}

async fn replay_one(
    State(runtime): State<Arc<Runtime>>,
    Path(id): Path<String>,
) -> Result<Response, ServeError> {
    match runtime.replay(&id).await {
        Ok(Some(reply)) => {
            Ok(Json(json!({"id": id, "replayed": true, "reply": reply})).into_response())
        }
        Ok(None) => Err(ServeError::Missing {
            what: "message",
            id,
        }),
        Err(error) => {
            Ok(Json(json!({"id": id, "replayed": false, "error": error.body()})).into_response())
        }
    }
}

#[derive(Debug, Default, Deserialize)]
struct ReplayRequest {
    /// Message ids; without them, every dead letter (of `flow`, when given).
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    flow: Option<String>,
}

async fn replay_many(
    State(runtime): State<Arc<Runtime>>,
    body: Option<Json<ReplayRequest>>,
) -> Result<Response, ServeError> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    let ids = if request.ids.is_empty() {
        store(&runtime)?
            .list_messages(request.flow.as_deref(), Some("dead"), 1000)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect()
    } else {
        request.ids
    };
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        let result = match runtime.replay(&id).await {
            Ok(Some(_)) => json!({"id": id, "replayed": true}),
            Ok(None) => json!({"id": id, "replayed": false, "error": "no such message"}),
            Err(error) => json!({"id": id, "replayed": false, "error": error.body()}),
        };
        results.push(result);
    }
    Ok(Json(json!({"results": results})).into_response())
}

async fn trace(
    State(runtime): State<Arc<Runtime>>,
    Path(key): Path<String>,
) -> Result<Response, ServeError> {
    match store(&runtime)?.trace(&key).await? {
        Some(trace) => Ok(Json(trace).into_response()),
        None => Err(ServeError::Missing {
            what: "journey known by",
            id: key,
        }),
    }
}
