//! The HTTP server: one route per flow trigger, and the request handling around a flow.
//!
//! [`router`] is a pure builder, so tests can drive it without a socket; [`run`] serves it on
//! a listener until a shutdown future resolves, then drains requests in flight.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Path, Query, Request};
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::error::ServeError;
use crate::flow::Flow;
use crate::message::{Message, Meta};
use crate::runtime::Runtime;

/// Headers that carry credentials never reach `meta.headers`, so no template or log sees them.
const HIDDEN_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

/// The HTTP client targets share, so connections to partners are reused.
///
/// # Errors
///
/// When the TLS backend cannot be initialised.
pub fn http_client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Builds the router serving every flow of `runtime`, health and readiness, metrics, and the
/// admin API under `/admin/v1` when `admin_token` is set.
pub fn router(runtime: &Arc<Runtime>, admin_token: Option<&str>) -> Router {
    with_fallbacks(flow_routes(runtime).merge(operation_routes(runtime, admin_token)))
}

/// The flows' endpoints, health and readiness, without metrics and the admin API (which
/// [`operations_router`] serves on an address of their own).
pub fn flows_router(runtime: &Arc<Runtime>) -> Router {
    with_fallbacks(flow_routes(runtime))
}

/// Metrics, the admin API (when `admin_token` is set), health and readiness.
pub fn operations_router(runtime: &Arc<Runtime>, admin_token: Option<&str>) -> Router {
    with_fallbacks(operation_routes(runtime, admin_token).merge(health_routes(runtime)))
}

fn with_fallbacks(router: Router) -> Router {
    router
        .fallback(|request: Request| async move {
            ServeError::NotFound(request.uri().path().to_owned())
        })
        .method_not_allowed_fallback(|method: Method| async move {
            ServeError::MethodNotAllowed(method.to_string())
        })
}

fn health_routes(runtime: &Arc<Runtime>) -> Router {
    let ready = Arc::clone(runtime);
    Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || readiness(Arc::clone(&ready))),
        )
}

fn operation_routes(runtime: &Arc<Runtime>, admin_token: Option<&str>) -> Router {
    let mut router = Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            match crate::observe::render() {
                Some(text) => {
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
                }
                None => ServeError::NotFound("/metrics".into()).into_response(),
            }
        }),
    );
    if let Some(token) = admin_token {
        router = router.nest(
            "/admin/v1",
            crate::admin::router(Arc::clone(runtime), token),
        );
    }
    router
}

fn flow_routes(runtime: &Arc<Runtime>) -> Router {
    let mut by_path: HashMap<&str, MethodRouter> = HashMap::new();
    for flow in runtime.flows() {
        let Some(trigger) = flow.http_trigger() else {
            continue;
        };
        let Ok(filter) = MethodFilter::try_from(trigger.method.clone()) else {
            continue;
        };
        let handler = {
            let flow = Arc::clone(flow);
            let runtime = Arc::clone(runtime);
            move |params: Option<Path<BTreeMap<String, String>>>, request: Request| async move {
                let params = params.map(|Path(p)| p).unwrap_or_default();
                let name = flow.name.clone();
                metrics::counter!("ferry_messages_received_total", "flow" => name.clone())
                    .increment(1);
                match handle(&runtime, &flow, params, request).await {
                    Ok(response) => {
                        metrics::counter!("ferry_messages_accepted_total", "flow" => name)
                            .increment(1);
                        response
                    }
                    Err(error) => {
                        metrics::counter!("ferry_messages_rejected_total", "flow" => name, "reason" => error.code())
                            .increment(1);
                        error.into_response()
                    }
                }
            }
        };
        let entry = by_path.remove(trigger.path.as_str()).unwrap_or_default();
        by_path.insert(&trigger.path, entry.on(filter, handler));
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        router = router.route(path, methods);
    }
    router.merge(health_routes(runtime))
}

/// Serves `router` on `listener` until `shutdown` resolves, then waits for requests in flight.
///
/// # Errors
///
/// When the listener fails.
pub async fn run(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Ready when the store answers and every broker in use is connected; 503 otherwise.
async fn readiness(runtime: Arc<Runtime>) -> Response {
    let store = match runtime.store() {
        Some(store) => store.undelivered().await.is_ok(),
        None => true,
    };
    let brokers = runtime.brokers().status();
    let draining = runtime.is_draining();
    let ready = store && !draining && brokers.values().all(|up| *up);
    let status = if ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({"ready": ready, "store": store, "brokers": brokers, "draining": draining});
    (status, axum::Json(body)).into_response()
}

async fn handle(
    runtime: &Runtime,
    flow: &Flow,
    params: BTreeMap<String, String>,
    request: Request,
) -> Result<Response, ServeError> {
    let (parts, body) = request.into_parts();
    let limit = flow
        .http_trigger()
        .map_or(crate::flow::DEFAULT_MAX_BODY, |t| t.max_body);
    let body = read_json(&parts.headers, body, limit).await?;
    let mut meta = Meta::new(&flow.name);
    meta.method = parts.method.to_string();
    meta.path = parts.uri.path().to_owned();
    meta.params = params;
    meta.query = Query::<BTreeMap<String, String>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    for (name, value) in &parts.headers {
        if let (false, Ok(value)) = (HIDDEN_HEADERS.contains(&name.as_str()), value.to_str()) {
            meta.headers
                .insert(name.as_str().to_owned(), value.to_owned());
        }
    }
    meta.adopt_correlation_id();
    let message = Message::new(body, &meta);
    let reply = runtime.handle(flow, message).await.inspect_err(|error| {
        tracing::debug!(flow = %flow.name, message_id = %meta.id, correlation_id = %meta.correlation_id, %error, "message refused");
    })?;
    tracing::debug!(flow = %flow.name, message_id = %meta.id, correlation_id = %meta.correlation_id, status = reply.status, "message handled");
    respond(reply)
}

/// Turns a stored reply into a response.
///
/// # Errors
///
/// [`ServeError::Internal`] when a header cannot be sent.
pub(crate) fn respond(reply: crate::store::StoredReply) -> Result<Response, ServeError> {
    let status = axum::http::StatusCode::from_u16(reply.status)
        .map_err(|_| ServeError::Internal(format!("reply status {}", reply.status)))?;
    let mut response = (status, axum::Json(reply.body)).into_response();
    for (name, value) in reply.headers {
        let (Ok(name), Ok(value)) = (name.parse::<header::HeaderName>(), value.parse()) else {
            return Err(ServeError::Internal(format!(
                "reply header {name} is not valid"
            )));
        };
        response.headers_mut().insert(name, value);
    }
    Ok(response)
}

/// Reads a JSON body within `limit` bytes; an empty body is `null`.
async fn read_json(headers: &HeaderMap, body: Body, limit: u64) -> Result<Value, ServeError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(ServeError::PayloadTooLarge { limit });
    }
    let bytes = to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|error| {
            let too_large = std::error::Error::source(&error)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                ServeError::PayloadTooLarge { limit }
            } else {
                ServeError::Internal(format!("reading the body: {error}"))
            }
        })?;
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !is_json(content_type) {
        return Err(ServeError::UnsupportedMediaType(content_type.to_owned()));
    }
    serde_json::from_slice(&bytes).map_err(|error| ServeError::MalformedJson {
        reason: error.to_string(),
        line: error.line(),
        column: error.column(),
    })
}

fn is_json(content_type: &str) -> bool {
    let essence = crate::template::media_type(content_type);
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/fhir+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json(""));
    }
}
