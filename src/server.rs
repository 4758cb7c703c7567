//! The HTTP server: one route per flow trigger, and the request handling around a flow.
//!
//! [`router`] is a pure builder, so tests can drive it without a socket; [`run`] serves it on
//! a listener until a shutdown future resolves, then drains requests in flight.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request};
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::admin::AdminTokens;
use crate::error::ServeError;
use crate::flow::Flow;
use crate::message::{Message, Meta};
use crate::runtime::Runtime;

/// Builds the router serving every flow of `runtime`, health and readiness, metrics, and the
/// admin API under `/admin/v1` when admin tokens are configured.
pub fn router(runtime: &Arc<Runtime>, admin: Option<&AdminTokens>) -> Router {
    with_fallbacks(flow_routes(runtime).merge(operation_routes(runtime, admin)))
}

/// The flows' endpoints, health and readiness, without metrics and the admin API (which
/// [`operations_router`] serves on an address of their own).
pub fn flows_router(runtime: &Arc<Runtime>) -> Router {
    with_fallbacks(flow_routes(runtime))
}

/// Metrics, the admin API (when admin tokens are configured), health and readiness.
pub fn operations_router(runtime: &Arc<Runtime>, admin: Option<&AdminTokens>) -> Router {
    with_fallbacks(operation_routes(runtime, admin).merge(health_routes(runtime)))
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

fn operation_routes(runtime: &Arc<Runtime>, admin: Option<&AdminTokens>) -> Router {
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
    if let Some(tokens) = admin {
        router = router
            .nest(
                "/admin/v1",
                crate::admin::router(Arc::clone(runtime), tokens),
            )
            .nest(
                "/console",
                crate::console::router(Arc::clone(runtime), tokens),
            )
            .route(
                "/console/",
                axum::routing::get(|| async { axum::response::Redirect::to("/console/flows") }),
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
                let name = || flow.name.clone();
                flow.meters
                    .received
                    .get(|| metrics::counter!("ferry_messages_received_total", "flow" => name()))
                    .increment(1);
                match handle(&runtime, &flow, params, request).await {
                    Ok(response) => {
                        flow.meters
                            .accepted
                            .get(|| metrics::counter!("ferry_messages_accepted_total", "flow" => name()))
                            .increment(1);
                        response
                    }
                    Err(error) => {
                        metrics::counter!("ferry_messages_rejected_total", "flow" => name(), "reason" => error.code())
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

/// How the server guards itself: TLS, and limits that hold for every endpoint.
#[derive(Clone)]
pub struct ServeOptions {
    /// Serve HTTPS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Requests handled at once; beyond it, `503` with `Retry-After`.
    pub max_concurrency: usize,
    /// Longest a request may take, body included; beyond it, `408`.
    pub request_timeout: Duration,
    /// Most header lines a request may have (beyond it, `431`).
    pub max_headers: usize,
    /// Most bytes a request's head may take (beyond it, `431`).
    pub max_header_bytes: usize,
    /// Longest a connection may take to send a request's head: from connecting (TLS
    /// handshake included), or from the end of the previous response on a kept-alive
    /// connection. A connection that sends nothing in that time is closed, so idle ones
    /// cannot use up ferry's file descriptors.
    pub header_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            tls: None,
            max_concurrency: 1024,
            request_timeout: Duration::from_secs(30),
            max_headers: 64,
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("tls", &self.tls.is_some())
            .field("max_concurrency", &self.max_concurrency)
            .field("request_timeout", &self.request_timeout)
            .field("header_timeout", &self.header_timeout)
            .finish_non_exhaustive()
    }
}

/// Reads a PEM certificate chain and private key into a TLS server configuration.
///
/// # Errors
///
/// When a file cannot be read or holds no usable certificate or key.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut config = crate::tls::server_identity(cert, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Applies the concurrency limit and the request timeout to every route of `router` but
/// `/healthz`.
fn guarded(router: Router, options: &ServeOptions) -> Router {
    let permits = Arc::new(tokio::sync::Semaphore::new(options.max_concurrency));
    let timeout = options.request_timeout;
    router.layer(axum::middleware::from_fn(
        move |request: Request, next: axum::middleware::Next| {
            let permits = Arc::clone(&permits);
            async move {
                // Liveness must answer however busy ferry is, or an orchestrator restarts it.
                if request.uri().path() == "/healthz" {
                    return next.run(request).await;
                }
                let Ok(_permit) = permits.try_acquire() else {
                    metrics::counter!("ferry_requests_shed_total").increment(1);
                    return ServeError::Overloaded.into_response();
                };
                match tokio::time::timeout(timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => ServeError::Timeout.into_response(),
                }
            }
        },
    ))
}

/// Serves `router` on `listener` (over TLS when configured) until `shutdown` resolves, then
/// waits for requests in flight.
///
/// # Errors
///
/// When the listener fails.
pub async fn run(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // Made into services once, here: a router left with its handlers boxed makes each one
    // into a service again for every request it routes to it.
    let router: Router = guarded(router, &options).with_state(());
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_headers(options.max_headers)
        .max_buf_size(options.max_header_bytes.max(8192))
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    builder
        .http2()
        .max_header_list_size(u32::try_from(options.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let tls = options.tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let router = router.clone();
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), request.map(Body::new))
            },
        );
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let header_timeout = options.header_timeout;
        tokio::spawn(async move {
            // Telling HTTP/1 from HTTP/2 waits for the first bytes with no timeout of its own:
            // a client that connects and sends nothing would hold its connection forever.
            let first = tokio::time::timeout(header_timeout, stream.peek(&mut [0; 1])).await;
            if !matches!(first, Ok(Ok(1..))) {
                return;
            }
            let served = match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(header_timeout, acceptor.accept(stream)).await
                    else {
                        return; // a failed or stalled handshake: nothing to answer
                    };
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
                None => {
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Ready when the store answers and every broker in use is connected; 503 otherwise.
async fn readiness(runtime: Arc<Runtime>) -> Response {
    // Writable within two seconds: a store locked or failing answers not ready.
    let store = match runtime.store() {
        Some(store) => matches!(
            tokio::time::timeout(Duration::from_secs(2), store.writable()).await,
            Ok(Ok(()))
        ),
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
    let trigger = flow
        .http_trigger()
        .ok_or_else(|| ServeError::Internal(format!("flow {} has no http trigger", flow.name)))?;
    if let Some(limit) = &trigger.rate_limit {
        let client = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        limit
            .check(client)
            .map_err(|retry_after| ServeError::TooManyRequests { retry_after })?;
    }
    // Header credentials are checked before the body is read; a signature covers the body.
    let signed = matches!(trigger.auth, crate::auth::Auth::Signature(_));
    if !signed && let Err(denied) = trigger.auth.check(&parts.headers, &[]) {
        linger(&parts.headers, body);
        return Err(denied.into());
    }
    let bytes = read_body(&parts.headers, body, trigger.max_body).await?;
    let webhook = if signed {
        trigger.auth.check(&parts.headers, &bytes)?
    } else {
        None
    };
    let Some(webhook) = webhook else {
        return answer(runtime, flow, trigger, &parts, params, &bytes).await;
    };
    // Webhook ids are taken in the store, so a replay is refused by every process sharing it.
    let store = runtime
        .store()
        .ok_or_else(|| ServeError::Internal("signed webhooks need a store".into()))?;
    if !store
        .first_sight(&flow.name, &webhook.id, webhook.expires_at)
        .await?
    {
        return Err(ServeError::Unauthorized);
    }
    let answered = answer(runtime, flow, trigger, &parts, params, &bytes).await;
    let failed = match &answered {
        Ok(response) => response.status().is_server_error(),
        Err(error) => error.status().is_server_error(),
    };
    // Nothing was handled and the sender will try again with the same webhook id (the
    // Standard Webhooks way): that retry is no replay, so let it in.
    if failed && let Err(error) = store.forget_sight(&flow.name, &webhook.id).await {
        tracing::warn!(flow = %flow.name, %error, "a failed webhook's id stays taken until it expires");
    }
    answered
}

/// Runs an authenticated request's body through its flow and answers.
async fn answer(
    runtime: &Runtime,
    flow: &Flow,
    trigger: &crate::flow::HttpTrigger,
    parts: &axum::http::request::Parts,
    params: BTreeMap<String, String>,
    bytes: &[u8],
) -> Result<Response, ServeError> {
    let body = parse_body(&parts.headers, bytes, trigger.max_depth)?;
    let request = crate::message::Request {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        params,
        query: Query::<BTreeMap<String, String>>::try_from_uri(&parts.uri)
            .map(|q| q.0)
            .unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
    };
    let secret = trigger
        .auth
        .secret_header()
        .map(axum::http::HeaderName::as_str);
    let meta = Meta::for_http(&flow.name, request, secret);
    // For the log lines below: the message takes the rest.
    let (id, correlation_id) = (meta.id.clone(), meta.correlation_id.clone());
    #[cfg(feature = "otlp")]
    let span = crate::observe::otlp::span(
        "ferry.message",
        &flow.name,
        meta.headers.get("traceparent").map(String::as_str),
    );
    let handled = runtime.handle(flow, Message::new(body, meta));
    #[cfg(feature = "otlp")]
    let handled = tracing::Instrument::instrument(handled, span);
    let reply = handled.await.inspect_err(|error| {
        tracing::debug!(flow = %flow.name, message_id = %id, %correlation_id, %error, "message refused");
    })?;
    tracing::debug!(flow = %flow.name, message_id = %id, %correlation_id, status = reply.status, "message handled");
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

/// Reads a body of at most `limit` bytes. A body declared or found larger is refused with
/// 413 while the client may still be sending it: see [`linger`].
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<bytes::Bytes, ServeError> {
    use http_body_util::BodyExt as _;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        linger(headers, body);
        return Err(ServeError::PayloadTooLarge { limit });
    }
    let mut body = body;
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| ServeError::MalformedJson {
            reason: format!("the body could not be read: {error}"),
            line: 0,
            column: 0,
        })?;
        if let Ok(data) = frame.into_data() {
            if (read.len() + data.len()) as u64 > limit {
                linger(headers, body);
                return Err(ServeError::PayloadTooLarge { limit });
            }
            read.extend_from_slice(&data);
        }
    }
    Ok(read.freeze())
}

/// The most of an unwanted body ferry reads after answering early, and for how long.
const LINGER_BYTES: usize = 16 * 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(5);

/// After an early reply (413, 401) to a request whose body is still coming, reads and drops
/// the rest of it for a while, as a lingering close does. A client that writes its whole body
/// before it reads (many HTTP libraries do) then reads the reply; closed at once, the
/// connection would be reset under it, and it would see a network error it may retry
/// forever. Bounded by [`LINGER_BYTES`] and [`LINGER_TIME`]; then the connection closes.
/// A client that sent `Expect: 100-continue` is waiting for leave to send: it gets the reply
/// instead and sends nothing, so there is nothing to read.
fn linger(headers: &HeaderMap, body: Body) {
    use http_body_util::BodyExt as _;
    let expects = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut read = 0;
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, bytes::Buf::remaining);
                if read > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// Reads a body strictly, by its content type ([`crate::json::read_body`]).
fn parse_body(headers: &HeaderMap, bytes: &[u8], max_depth: u32) -> Result<Value, ServeError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    crate::json::read_body(content_type, bytes, max_depth)
}
