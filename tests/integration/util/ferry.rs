//! ferry in this process, serving flows on a loopback port as `ferry serve` does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use ferry::project::{ProjectPaths, load_with_env};
use ferry::runtime::Runtime;
use ferry::server::ServeOptions;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{Backend, Partner, SECRETS, TestStore, repo};

/// Serves ferry's `router` the way `ferry serve` does (limits, TLS when `options` says so).
async fn serve_ferry(router: Router, options: ServeOptions) -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(ferry::server::run(listener, router, options, async {
        let _ = rx.await;
    }));
    (url, tx)
}

/// The admin token of in-process ferries.
pub(crate) const ADMIN_TOKEN: &str = "test-admin-token";

/// Settings that make the shipped flows retry fast in tests.
pub(crate) const FAST_RETRY: [(&str, &str); 4] = [
    ("LAB_RETRY_INITIAL", "20ms"),
    ("LAB_RETRY_MAX", "100ms"),
    ("PORTAL_RETRY_INITIAL", "20ms"),
    ("PORTAL_RETRY_MAX", "100ms"),
];

/// ferry serving the flows of `flows` in this process, with `env` as its environment and a
/// SQLite store in a temporary folder.
pub(crate) struct Ferry {
    pub(crate) url: String,
    pub(crate) runtime: Arc<Runtime>,
    /// The MLLP listeners of the flows with an `mllp` trigger.
    pub(crate) mllp: Arc<ferry::mllp_server::Listeners>,
    _shutdown: oneshot::Sender<()>,
    _store: TestStore,
}

impl Ferry {
    pub(crate) async fn start(flows: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_many(&[flows.to_path_buf()], env).await
    }

    /// Several flows folders served as one, with a fresh SQLite store.
    pub(crate) async fn start_many(flows: &[PathBuf], env: &[(&str, &str)]) -> Self {
        let store = TestStore::new(Backend::Sqlite).await;
        Self::start_on(flows, env, store, ServeOptions::default()).await
    }

    /// Several flows folders served as one, on the store at `store`, which lives in `dir`.
    pub(crate) async fn start_with_store(
        flows: &[PathBuf],
        env: &[(&str, &str)],
        store: &str,
        dir: tempfile::TempDir,
    ) -> Self {
        Self::start_guarded(flows, env, store, dir, ServeOptions::default()).await
    }

    /// [`Ferry::start_with_store`], served with `options`.
    pub(crate) async fn start_guarded(
        flows: &[PathBuf],
        env: &[(&str, &str)],
        store: &str,
        dir: tempfile::TempDir,
        options: ServeOptions,
    ) -> Self {
        let store = TestStore::kept_in(store.to_owned(), dir);
        Self::start_on(flows, env, store, options).await
    }

    /// Several flows folders served as one on `store`, with `options`.
    pub(crate) async fn start_on(
        flows: &[PathBuf],
        env: &[(&str, &str)],
        store: TestStore,
        options: ServeOptions,
    ) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .chain(&SECRETS)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let project = load_with_env(&ProjectPaths::many(flows, &[]), &lookup)
            .unwrap_or_else(|d| panic!("flows do not load: {d:#?}"));
        let opened = store.open().await;
        let client = ferry::targets::http_client().unwrap();
        let runtime = Runtime::start(&project, client, Some(opened));
        let admin = ferry::admin::AdminTokens::single(ADMIN_TOKEN);
        let router = ferry::server::router(&runtime, Some(&admin));
        let (url, shutdown) = serve_ferry(router, options).await;
        let served = Arc::clone(&runtime);
        let mllp = ferry::mllp_server::Listeners::start(Arc::new(move || Arc::clone(&served)))
            .await
            .unwrap();
        Self {
            url,
            runtime,
            mllp,
            _shutdown: shutdown,
            _store: store,
        }
    }

    /// The shipped flows, delivering to `lab` and `portal`, retrying fast.
    pub(crate) async fn shipped(lab: &Partner, portal: &Partner) -> Self {
        Self::shipped_on(lab, portal, Backend::Sqlite).await
    }

    /// [`Ferry::shipped`] on a fresh store of `backend`.
    pub(crate) async fn shipped_on(lab: &Partner, portal: &Partner, backend: Backend) -> Self {
        let mut env = vec![
            ("LAB_URL", lab.url.as_str()),
            ("PORTAL_URL", portal.url.as_str()),
        ];
        env.extend(FAST_RETRY);
        let store = TestStore::new(backend).await;
        Self::start_on(
            &[repo().join("flows")],
            &env,
            store,
            ServeOptions::default(),
        )
        .await
    }

    /// The address `flow`'s MLLP listener took.
    pub(crate) fn mllp_address(&self, flow: &str) -> std::net::SocketAddr {
        self.mllp
            .address(flow)
            .unwrap_or_else(|| panic!("flow {flow} has no MLLP listener"))
    }

    /// GETs an admin API path.
    pub(crate) async fn admin(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new()
            .get(format!("{}/admin/v1{path}", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }

    /// POSTs to an admin API path.
    pub(crate) async fn admin_post(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/admin/v1{path}", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .json(body)
            .send()
            .await
            .unwrap();
        (
            response.status().as_u16(),
            response.json().await.unwrap_or(Value::Null),
        )
    }
}

/// The feature flows of `tests/fixtures/features`, with the given target URLs and every other
/// target URL pointing nowhere.
pub(crate) async fn features(urls: &[(&str, &str)]) -> Ferry {
    let mut env = urls.to_vec();
    for name in ["NORTH_URL", "METALS_URL", "SOUTH_URL", "SINK_URL"] {
        if !env.iter().any(|(n, _)| *n == name) {
            env.push((name, "http://127.0.0.1:9"));
        }
    }
    Ferry::start(&repo().join("tests/fixtures/features/flows"), &env).await
}
