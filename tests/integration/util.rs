//! Helpers: mock partners, an in-process ferry, and readable assertions.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use ferry::project::{ProjectPaths, load_with_env};
use ferry::runtime::Runtime;
use ferry::server::ServeOptions;
use ferry::store::Store;
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

/// Makes each `async fn NAME(backend: Backend)` listed a test on SQLite and one on PostgreSQL:
/// `NAME::sqlite` and `NAME::postgres`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(crate::util::Backend::Sqlite).await;
            }
            #[tokio::test]
            async fn postgres() {
                super::$name(crate::util::Backend::Postgres).await;
            }
        }
    )*};
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
        let store = TestStore {
            url: store.to_owned(),
            _dir: dir,
            schema: None,
        };
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
        let router = ferry::server::router(&runtime, Some(ADMIN_TOKEN));
        let (url, shutdown) = serve_ferry(router, options).await;
        Self {
            url,
            runtime,
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

/// Fails, saying how to start it, unless `service` answers on 127.0.0.1:`port`.
pub(crate) fn require(service: &str, port: u16, start: &str) {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    if std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(2)).is_err() {
        panic!(
            "{service} is not answering on {address}; these tests need it. Start it with: {start}"
        );
    }
}

/// RabbitMQ's URL, after checking it answers.
pub(crate) fn rabbitmq() -> &'static str {
    require("RabbitMQ", 5672, "rabbitmq-server -detached");
    "amqp://guest:guest@127.0.0.1:5672/%2f"
}

/// NATS's URL, after checking it answers.
pub(crate) fn nats() -> &'static str {
    require(
        "NATS (with JetStream)",
        4222,
        "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log",
    );
    "nats://127.0.0.1:4222"
}

/// A name no other test uses, for queues on the shared brokers.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::now_v7().simple())
}

/// Publishes `payload` to RabbitMQ queue `queue` (declared durable) and waits for the confirm;
/// with `message_id` as its AMQP message id, or none (as a plain client may).
pub(crate) async fn amqp_publish(queue: &str, payload: &[u8], message_id: Option<&str>) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    let connection = lapin::Connection::connect(rabbitmq(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), durable, lapin::types::FieldTable::default())
        .await
        .unwrap();
    let mut properties = lapin::BasicProperties::default().with_delivery_mode(2);
    if let Some(id) = message_id {
        properties = properties.with_message_id(id.into());
    }
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            payload,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(0, "done".into()).await;
}

/// Messages waiting in RabbitMQ queue `queue` (ready, not counting unacknowledged ones).
pub(crate) async fn amqp_depth(queue: &str) -> u32 {
    use lapin::options::QueueDeclareOptions;
    let connection = lapin::Connection::connect(rabbitmq(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declared = channel
        .queue_declare(queue.into(), passive, lapin::types::FieldTable::default())
        .await
        .unwrap();
    let _ = connection.close(0, "done".into()).await;
    declared.message_count()
}

/// Publishes `payload` to NATS JetStream subject `subject`, creating its stream as ferry does.
pub(crate) async fn nats_publish(subject: &str, payload: &[u8]) {
    let client = async_nats::connect(nats()).await.unwrap();
    let context = async_nats::jetstream::new(client);
    context
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: ferry::queue::nats_stream_name(subject),
            subjects: vec![subject.to_owned()],
            ..Default::default()
        })
        .await
        .unwrap();
    context
        .publish(subject.to_owned(), payload.to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Polls `check` every 10 ms until it holds, failing after 10 s with `what`.
pub(crate) async fn wait_until<F: FnMut() -> bool>(what: &str, check: F) {
    wait_until_within(what, 10, check).await;
}

/// Polls `check` every 10 ms until it holds, failing after `seconds` with `what`.
pub(crate) async fn wait_until_within<F: FnMut() -> bool>(what: &str, seconds: u64, mut check: F) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Like [`wait_until`], for checks that must await.
pub(crate) async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
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

/// The portal's API key in tests.
pub(crate) const PORTAL_KEY: &str = "test-portal-key";
/// The lab's webhook secret in tests.
pub(crate) const LAB_SECRET: &str = "test-lab-webhook-secret";
/// The secrets the shipped flows read, as tests set them.
pub(crate) const SECRETS: [(&str, &str); 2] = [
    ("PORTAL_API_KEY", PORTAL_KEY),
    ("LAB_WEBHOOK_SECRET", LAB_SECRET),
];

/// A client that sends the portal's API key with every request.
pub(crate) fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("x-api-key", PORTAL_KEY.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// The Standard Webhooks headers signing `body` with `secret`, now, under a fresh id.
pub(crate) fn webhook_headers(secret: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let id = format!("msg_{}", unique("wh"));
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    ferry::auth::webhook_headers(
        &ferry::auth::webhook_key(secret).unwrap(),
        &id,
        timestamp,
        body,
    )
    .to_vec()
}

/// POSTs `body` with the portal's key and signed as the lab signs its webhooks, so it passes
/// whichever shipped flow serves `url`.
pub(crate) fn signed_post(url: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
    let mut request = client()
        .post(url)
        .header("content-type", "application/json");
    for (name, value) in webhook_headers(LAB_SECRET, &body) {
        request = request.header(name, value);
    }
    request.body(body)
}

/// POSTs JSON (with credentials, see [`signed_post`]) and returns the status and JSON reply.
pub(crate) async fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let response = signed_post(url, serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Validates `instance` against a shipped schema and returns every violation.
pub(crate) fn schema_violations(schema: &str, instance: &Value) -> Vec<ferry::error::Violation> {
    let mut schemas = ferry::schema::Schemas::new(&[repo().join("schemas")]);
    ferry::schema::violations(&schemas.get(schema).unwrap(), instance)
}

/// A TCP proxy on a loopback port to `upstream`, which a test can cut and restore to make a
/// real server unreachable and reachable again.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    upstream: String,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    pub(crate) async fn start(upstream: &str) -> Self {
        let mut proxy = Self {
            port: 0,
            upstream: upstream.to_owned(),
            task: None,
        };
        proxy.restore().await;
        proxy
    }

    /// Closes the port and every connection through it.
    pub(crate) fn cut(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub(crate) async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.port = listener.local_addr().unwrap().port();
        let upstream = self.upstream.clone();
        self.task = Some(tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// The store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    /// A SQLite file in a temporary folder.
    Sqlite,
    /// A schema of its own in the PostgreSQL at 127.0.0.1:5432 (database `test`).
    Postgres,
}

/// The PostgreSQL the tests use, after checking it answers.
pub(crate) fn postgres() -> String {
    require(
        "PostgreSQL",
        5432,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    );
    std::env::var("FERRY_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh, empty store of one backend: a SQLite file in a folder of its own, or a
/// PostgreSQL schema of its own, dropped with this value.
pub(crate) struct TestStore {
    pub(crate) url: String,
    /// Holds the SQLite file.
    _dir: tempfile::TempDir,
    /// The PostgreSQL server and the schema this value drops.
    schema: Option<(String, String)>,
}

impl TestStore {
    pub(crate) async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}/ferry.db", dir.path().display()),
                _dir: dir,
                schema: None,
            },
            Backend::Postgres => {
                let schema = unique("ferry_test").replace(['-', '.'], "_");
                let server = postgres();
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server)
                    .await
                    .unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                // Connections name themselves after the schema, so the end of the test can
                // find and end every one of them, whichever process opened it.
                Self {
                    url: format!(
                        "{server}?application_name={schema}&options=-c%20search_path%3D{schema}"
                    ),
                    _dir: dir,
                    schema: Some((server, schema)),
                }
            }
        }
    }

    /// A store at `url` that this value does not own (a second way to reach another one's).
    pub(crate) fn at(url: String) -> Self {
        Self {
            url,
            _dir: tempfile::tempdir().unwrap(),
            schema: None,
        }
    }

    /// Opens the store, as one more process would.
    pub(crate) async fn open(&self) -> Store {
        Store::open(&self.url).await.unwrap()
    }
}

impl Drop for TestStore {
    fn drop(&mut self) {
        let Some((server, schema)) = self.schema.take() else {
            return;
        };
        // Drop runs outside async code: a thread of its own with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async {
                    let mut conn =
                        <sqlx::PgConnection as sqlx::Connection>::connect(&server).await?;
                    // The test's own tasks are stopped while this runs: a transaction of
                    // theirs left open would hold the schema forever.
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = '{schema}';
                         DROP SCHEMA {schema} CASCADE"
                    )))
                    .execute(&mut conn)
                    .await
                    .map(|_| ())
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("the test schema could not be dropped: {dropped:?}");
        }
    }
}
