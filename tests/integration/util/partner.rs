//! A mock partner system (a lab, a portal) on a loopback port.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;
use tokio::sync::oneshot;

use super::serve;

/// One request a mock partner received.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
    /// The status the partner answered with.
    pub(crate) status: u16,
    pub(crate) at: std::time::Instant,
}

impl Received {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the partner received JSON")
    }
}

/// What a partner answers: status, JSON body, extra headers.
type Answer = (u16, Value, Vec<(String, String)>);

struct PartnerState {
    received: Mutex<Vec<Received>>,
    reply: Mutex<Answer>,
    /// Answers given once each, in order, before `reply`.
    next: Mutex<std::collections::VecDeque<Answer>>,
    /// How long the partner takes to answer.
    delay: Mutex<std::time::Duration>,
}

/// A mock partner system (lab or portal): records every request and answers with a
/// configurable status and JSON body.
pub(crate) struct Partner {
    pub(crate) url: String,
    state: Arc<PartnerState>,
    _shutdown: oneshot::Sender<()>,
}

impl Partner {
    pub(crate) async fn start(status: u16, body: Value) -> Self {
        let state = Arc::new(PartnerState {
            received: Mutex::default(),
            reply: Mutex::new((status, body, Vec::new())),
            next: Mutex::default(),
            delay: Mutex::default(),
        });
        let router = Router::new()
            .fallback(record)
            .with_state(Arc::clone(&state));
        let (url, shutdown) = serve(router).await;
        Self {
            url,
            state,
            _shutdown: shutdown,
        }
    }

    pub(crate) fn set_reply(&self, status: u16, body: Value) {
        *self.state.reply.lock().unwrap() = (status, body, Vec::new());
    }

    pub(crate) fn set_reply_with_header(&self, status: u16, body: Value, header: (&str, &str)) {
        let header = (header.0.to_owned(), header.1.to_owned());
        *self.state.reply.lock().unwrap() = (status, body, vec![header]);
    }

    /// Answers the next request with `status` and `body`, then as before.
    pub(crate) fn answer_once(&self, status: u16, body: Value) {
        self.state
            .next
            .lock()
            .unwrap()
            .push_back((status, body, Vec::new()));
    }

    /// Answers the next request with `status`, `body` and `header`, then as before.
    pub(crate) fn answer_once_with_header(&self, status: u16, body: Value, header: (&str, &str)) {
        let header = (header.0.to_owned(), header.1.to_owned());
        self.state
            .next
            .lock()
            .unwrap()
            .push_back((status, body, vec![header]));
    }

    /// Makes the partner take `delay` to answer each request.
    pub(crate) fn set_delay(&self, delay: std::time::Duration) {
        *self.state.delay.lock().unwrap() = delay;
    }

    /// The requests this partner took (answered 2xx).
    pub(crate) fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The distinct `Idempotency-Key`s of what this partner received: one per message,
    /// however often each was delivered.
    pub(crate) fn idempotency_keys(&self) -> std::collections::BTreeSet<String> {
        self.received()
            .iter()
            .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
            .collect()
    }
}

async fn record(
    State(state): State<Arc<PartnerState>>,
    request: Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let queued = state.next.lock().unwrap().pop_front();
    let (status, reply, headers) = queued.unwrap_or_else(|| state.reply.lock().unwrap().clone());
    state.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        headers: parts.headers,
        body,
        status,
        at: std::time::Instant::now(),
    });
    let delay = *state.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    let mut response = (StatusCode::from_u16(status).unwrap(), axum::Json(reply)).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    response
}
