//! Helpers: mock partners, an in-process ferry, and readable assertions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use ferry::compile::{ProjectPaths, load_project_with_env};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Compares two texts and shows both in full when they differ.
macro_rules! assert_eq_text {
    ($expected:expr, $actual:expr) => {{
        let (expected, actual): (&str, &str) = (&$expected, &$actual);
        if expected != actual {
            panic!("text differs\n--- expected\n{expected}\n--- actual\n{actual}\n---");
        }
    }};
}

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A payload from `tests/fixtures/payloads`.
pub(crate) fn payload(name: &str) -> Value {
    let path = repo().join("tests/fixtures/payloads").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// One request a mock partner received.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Received {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("the partner received JSON")
    }
}

#[derive(Default)]
struct PartnerState {
    received: Mutex<Vec<Received>>,
    reply: Mutex<(u16, Value)>,
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
            reply: Mutex::new((status, body)),
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
        *self.state.reply.lock().unwrap() = (status, body);
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }
}

async fn record(State(state): State<Arc<PartnerState>>, request: Request) -> impl IntoResponse {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    state.received.lock().unwrap().push(Received {
        method: parts.method.to_string(),
        path: parts.uri.to_string(),
        headers: parts.headers,
        body,
    });
    let (status, body) = state.reply.lock().unwrap().clone();
    (StatusCode::from_u16(status).unwrap(), axum::Json(body))
}

/// Serves `router` on an ephemeral loopback port until the returned sender is dropped.
async fn serve(router: Router) -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    (url, tx)
}

/// ferry serving the flows of `flows` in this process, with `env` as its environment.
pub(crate) struct Ferry {
    pub(crate) url: String,
    _shutdown: oneshot::Sender<()>,
}

impl Ferry {
    pub(crate) async fn start(flows: &Path, env: &[(&str, &str)]) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let project = load_project_with_env(&ProjectPaths::new(flows, None), &lookup)
            .unwrap_or_else(|d| panic!("flows do not load: {d:#?}"));
        let client = ferry::server::http_client().unwrap();
        let (url, shutdown) = serve(ferry::server::router(&project, &client)).await;
        Self {
            url,
            _shutdown: shutdown,
        }
    }

    /// The shipped flows, delivering to `lab` and `portal`.
    pub(crate) async fn shipped(lab: &Partner, portal: &Partner) -> Self {
        Self::start(
            &repo().join("flows"),
            &[("LAB_URL", &lab.url), ("PORTAL_URL", &portal.url)],
        )
        .await
    }
}

/// POSTs JSON and returns the status and JSON reply.
pub(crate) async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Validates `instance` against a shipped schema and returns every violation.
pub(crate) fn schema_violations(schema: &str, instance: &Value) -> Vec<ferry::error::Violation> {
    let mut schemas = ferry::schema::Schemas::new(&repo().join("schemas"));
    ferry::schema::violations(&schemas.get(schema).unwrap(), instance)
}
