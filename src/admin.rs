//! The admin API, under `/admin/v1`: stored messages, their timelines, dead letters, replay
//! and traces across flows. It exists only when an admin token is configured
//! (`FERRY_ADMIN_TOKEN`, or named ones in `FERRY_ADMIN_TOKENS`), and every call must carry
//! `Authorization: Bearer <token>`. A replay is recorded with the name of the token that
//! asked for it and the reason it gave.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::engine::ReplayAudit;
use crate::error::ServeError;
use crate::runtime::Runtime;
use crate::session::Sessions;
use crate::store::{MessageDetail, MessageFilter, Store};

/// The admin tokens, each with the name replays are recorded under, and the console's
/// sessions opened with them (shared by every clone, so they outlive a reload).
#[derive(Debug, Clone)]
pub struct AdminTokens {
    tokens: Arc<Vec<(String, String)>>,
    sessions: Arc<Sessions>,
}

impl AdminTokens {
    /// One token, named `admin`.
    pub fn single(token: &str) -> Self {
        Self::new(vec![("admin".to_owned(), token.to_owned())])
    }

    fn new(tokens: Vec<(String, String)>) -> Self {
        Self {
            tokens: Arc::new(tokens),
            sessions: Arc::new(Sessions::new(false)),
        }
    }

    /// These tokens with console cookies marked `Secure`: for a listener that serves TLS.
    #[must_use]
    pub fn over_tls(self, tls: bool) -> Self {
        Self {
            sessions: Arc::new(Sessions::new(tls)),
            ..self
        }
    }

    /// The console's sessions.
    pub(crate) fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The tokens of `FERRY_ADMIN_TOKEN` (named `admin`) and `FERRY_ADMIN_TOKENS`
    /// (`name=token` pairs separated by commas); `None` when neither holds one.
    ///
    /// # Errors
    ///
    /// A pair without a name or a token, or a name given twice.
    pub fn from_env(single: Option<&str>, named: Option<&str>) -> Result<Option<Self>, String> {
        let mut tokens = Vec::new();
        if let Some(token) = single.filter(|t| !t.is_empty()) {
            tokens.push(("admin".to_owned(), token.to_owned()));
        }
        for pair in named
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.trim().is_empty())
        {
            let Some((name, token)) = pair.split_once('=') else {
                return Err(
                    "FERRY_ADMIN_TOKENS holds name=token pairs, separated by commas".into(),
                );
            };
            let name = name.trim();
            if name.is_empty() || token.is_empty() {
                return Err("FERRY_ADMIN_TOKENS: each pair needs a name and a token".into());
            }
            if tokens.iter().any(|(n, _)| n == name) {
                return Err(format!(
                    "FERRY_ADMIN_TOKENS: the name \"{name}\" is given twice"
                ));
            }
            tokens.push((name.to_owned(), token.to_owned()));
        }
        Ok((!tokens.is_empty()).then(|| Self::new(tokens)))
    }

    /// The name of the token `given` is, compared in constant time with each.
    pub(crate) fn name_of(&self, given: &str) -> Option<String> {
        if given.is_empty() {
            return None;
        }
        let mut found = None;
        for (name, token) in self.tokens.iter() {
            if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(name.clone());
            }
        }
        found
    }
}

/// Who made an admin call: the name of its token.
#[derive(Debug, Clone)]
pub(crate) struct Operator(pub(crate) String);

/// The admin routes, guarded by `tokens`.
pub fn router(runtime: Arc<Runtime>, tokens: &AdminTokens) -> Router {
    let tokens = tokens.clone();
    Router::new()
        .route("/messages", get(list_messages))
        .route("/messages/{id}", get(show_message))
        .route("/messages/{id}/replay", post(replay_one))
        .route("/dead-letters", get(list_dead_letters))
        .route("/dead-letters/replay", post(replay_many))
        .route("/trace/{key}", get(trace))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            let tokens = tokens.clone();
            async move { authorize(&tokens, request, next).await }
        }))
        .with_state(runtime)
}

async fn authorize(tokens: &AdminTokens, mut request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if let Some(name) = tokens.name_of(given) {
        request.extensions_mut().insert(Operator(name));
        next.run(request).await
    } else {
        let body = json!({"error": "unauthorized", "message": "a valid admin token is required", "details": []});
        (axum::http::StatusCode::UNAUTHORIZED, Json(body)).into_response()
    }
}

pub(crate) fn store(runtime: &Runtime) -> Result<&Store, ServeError> {
    runtime
        .store()
        .ok_or_else(|| ServeError::Internal("ferry runs without a store".into()))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    flow: Option<String>,
    status: Option<String>,
    /// Dead letters with a dead delivery to this target.
    target: Option<String>,
    limit: Option<u32>,
}

impl ListQuery {
    fn filter(self, status: Option<&str>) -> MessageFilter {
        MessageFilter {
            flow: self.flow,
            status: status.map(str::to_owned).or(self.status),
            dead_target: self.target,
            limit: self.limit.unwrap_or(100).min(1000),
            ..MessageFilter::default()
        }
    }
}

async fn list_messages(
    State(runtime): State<Arc<Runtime>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ServeError> {
    let messages = store(&runtime)?.find_messages(&q.filter(None)).await?;
    Ok(Json(json!({"messages": messages})).into_response())
}

async fn list_dead_letters(
    State(runtime): State<Arc<Runtime>>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ServeError> {
    let dead = store(&runtime)?
        .find_messages(&q.filter(Some("dead")))
        .await?;
    Ok(Json(json!({"dead_letters": dead})).into_response())
}

async fn show_message(
    State(runtime): State<Arc<Runtime>>,
    Path(id): Path<String>,
) -> Result<Response, ServeError> {
    match message(&runtime, &id).await? {
        Some(message) => Ok(Json(message).into_response()),
        None => Err(ServeError::Missing {
            what: "message",
            id,
        }),
    }
}

/// Stored message `id`, its flow's sensitive fields `[redacted]`: in the body as received,
/// and wherever their values appear in the message after its steps, its error and its
/// attempts' errors and answers.
pub(crate) async fn message(
    runtime: &Runtime,
    id: &str,
) -> Result<Option<MessageDetail>, ServeError> {
    let Some(mut message) = store(runtime)?.message(id).await? else {
        return Ok(None);
    };
    let Some(flow) = runtime
        .flows()
        .iter()
        .find(|f| f.name == message.summary.flow)
    else {
        return Ok(Some(message));
    };
    let sensitive = flow.sensitive();
    if sensitive.is_empty() {
        return Ok(Some(message));
    }
    let received = message.inbound.clone();
    let scrub = |text: &mut String| *text = sensitive.scrub(&received, text);
    each_text(&mut message.document, &mut |text| scrub(text));
    if let Some(error) = &mut message.summary.error {
        scrub(error);
    }
    for delivery in &mut message.deliveries {
        if let Some(error) = &mut delivery.last_error {
            scrub(error);
        }
    }
    for event in &mut message.timeline {
        for field in ["error", "answer"] {
            if let Some(Value::String(text)) = event.detail.get_mut(field) {
                scrub(text);
            }
        }
    }
    sensitive.redact(&mut message.inbound);
    Ok(Some(message))
}

/// Why an operator replays: required, so the timeline says who replayed what and why.
#[derive(Debug, Default, Deserialize)]
struct Reason {
    #[serde(default)]
    reason: String,
}

/// Calls `change` on every string in `value`.
fn each_text(value: &mut Value, change: &mut impl FnMut(&mut String)) {
    match value {
        Value::String(text) => change(text),
        Value::Array(items) => items.iter_mut().for_each(|v| each_text(v, change)),
        Value::Object(fields) => fields.values_mut().for_each(|v| each_text(v, change)),
        _ => {}
    }
}

/// The audit record of a replay asked for by `operator` with `reason`.
pub(crate) fn audit(operator: Operator, reason: &str) -> Result<ReplayAudit, ServeError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(ServeError::MissingReason);
    }
    Ok(ReplayAudit {
        by: operator.0,
        reason: reason.chars().take(1000).collect(),
    })
}

async fn replay_one(
    State(runtime): State<Arc<Runtime>>,
    Extension(operator): Extension<Operator>,
    Path(id): Path<String>,
    body: Option<Json<Reason>>,
) -> Result<Response, ServeError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let audit = audit(operator, &body.reason)?;
    match runtime.replay(&id, &audit).await {
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
    /// Message ids; without them, every dead letter (of `flow` and `target`, when given).
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    flow: Option<String>,
    #[serde(default)]
    target: Option<String>,
    /// Why: recorded with each replay.
    #[serde(default)]
    reason: String,
}

async fn replay_many(
    State(runtime): State<Arc<Runtime>>,
    Extension(operator): Extension<Operator>,
    body: Option<Json<ReplayRequest>>,
) -> Result<Response, ServeError> {
    let request = body.map(|Json(r)| r).unwrap_or_default();
    let audit = audit(operator, &request.reason)?;
    let ids = if request.ids.is_empty() {
        dead_letters(&runtime, request.flow, request.target).await?
    } else {
        request.ids
    };
    let results = replay_each(&runtime, ids, &audit).await;
    Ok(Json(json!({"results": results})).into_response())
}

/// The ids of the dead letters (at most 1,000) of `flow` and with a dead delivery to
/// `target`, each when given.
pub(crate) async fn dead_letters(
    runtime: &Runtime,
    flow: Option<String>,
    target: Option<String>,
) -> Result<Vec<String>, ServeError> {
    let filter = MessageFilter::dead_letters(flow, target, 1000);
    Ok(store(runtime)?
        .find_messages(&filter)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect())
}

/// Replays each of `ids` under `audit`: what became of each, in order.
pub(crate) async fn replay_each(
    runtime: &Runtime,
    ids: Vec<String>,
    audit: &ReplayAudit,
) -> Vec<Value> {
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        let result = match runtime.replay(&id, audit).await {
            Ok(Some(_)) => json!({"id": id, "replayed": true}),
            Ok(None) => json!({"id": id, "replayed": false, "error": "no such message"}),
            Err(error) => json!({"id": id, "replayed": false, "error": error.body()}),
        };
        results.push(result);
    }
    results
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

#[cfg(test)]
mod tests {
    use super::AdminTokens;

    #[test]
    fn tokens_are_named_and_a_call_is_known_by_its_tokens_name() {
        let tokens = AdminTokens::from_env(Some("t0"), Some("alice=t1, bob=t2"))
            .unwrap()
            .unwrap();
        assert_eq!(tokens.name_of("t0").as_deref(), Some("admin"));
        assert_eq!(tokens.name_of("t2").as_deref(), Some("bob"));
        assert_eq!(tokens.name_of("t3"), None);
        assert!(AdminTokens::from_env(None, None).unwrap().is_none());
        for wrong in ["alice", "=t1", "alice=", "a=1,a=2"] {
            assert!(AdminTokens::from_env(None, Some(wrong)).is_err(), "{wrong}");
        }
    }
}
