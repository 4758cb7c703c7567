//! `ferry serve`: the flows' endpoints, the admin API, metrics, signals, and the store's
//! upkeep (gauges, pruning) for as long as ferry runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::response::IntoResponse as _;

use super::{load_or_report, print_diagnostics};
use crate::project::ProjectPaths;

/// How `serve` guards its endpoints.
#[derive(Debug, clap::Args)]
pub struct GuardArgs {
    /// Serve HTTPS with this PEM certificate chain (needs `--tls-key`).
    #[arg(long, env = "FERRY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env = "FERRY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Requests handled at once; beyond it ferry answers 503 with `Retry-After`.
    #[arg(long, default_value_t = 1024, env = "FERRY_MAX_CONCURRENCY")]
    max_concurrency: usize,
    /// Longest a request may take, body included; beyond it ferry answers 408.
    #[arg(long, default_value = "30s", env = "FERRY_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Longest a connection may take to send a request's head (from connecting, or after the
    /// previous response); a connection that sends nothing in time is closed.
    #[arg(long, default_value = "10s", env = "FERRY_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
}

impl GuardArgs {
    fn options(&self) -> anyhow::Result<crate::server::ServeOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::server::tls_config(cert, key)?),
            _ => None,
        };
        Ok(crate::server::ServeOptions {
            tls,
            max_concurrency: self.max_concurrency.max(1),
            request_timeout: self.request_timeout,
            header_timeout: self.header_timeout,
            ..crate::server::ServeOptions::default()
        })
    }
}

/// Where `serve` listens.
#[derive(Debug, Clone, Copy)]
pub(super) struct Listen {
    pub(super) main: SocketAddr,
    pub(super) admin: Option<SocketAddr>,
    /// Whether the main address serves the flows' OpenAPI document at `/openapi.json`.
    pub(super) openapi: bool,
}

pub(super) fn serve(
    paths: &ProjectPaths,
    listen: Listen,
    store_url: &str,
    store_options: crate::store::StoreOptions,
    retention: Duration,
    watch: bool,
    guard: &GuardArgs,
) -> anyhow::Result<ExitCode> {
    let options = guard.options()?;
    let project = match load_or_report(paths) {
        Ok(project) => project,
        Err(code) => return Ok(code),
    };
    print_diagnostics(&project.warnings);
    if project.warnings.iter().any(|d| d.code == "secret-unset") {
        eprintln!("ferry serve needs the secrets above: set the environment variables they name");
        return Ok(ExitCode::from(1));
    }
    if options.tls.is_none() && !listen.main.ip().is_loopback() {
        tracing::warn!(
            address = %listen.main,
            "serving plain HTTP on a non-loopback address: \
             use --tls-cert and --tls-key, or a TLS proxy in front"
        );
    }
    let admin_tokens = crate::admin::AdminTokens::from_env(
        std::env::var("FERRY_ADMIN_TOKEN").ok().as_deref(),
        std::env::var("FERRY_ADMIN_TOKENS").ok().as_deref(),
    )
    .map_err(anyhow::Error::msg)?
    .map(|tokens| tokens.over_tls(options.tls.is_some()));
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let client = crate::targets::http_client().context("building the HTTP client")?;
        let store = crate::store::Store::open_with(store_url, store_options)
            .await
            .with_context(|| format!("opening the store {}", crate::queue::redact(store_url)))?;
        let ferry = crate::runtime::Runtime::start(&project, client.clone(), Some(store.clone()));
        let split = listen.admin.is_some();
        let live = crate::reload::Live::new(
            paths.clone(),
            client,
            store.clone(),
            admin_tokens.clone(),
            ferry,
            split,
        );
        let router = live.router();
        let router = if listen.openapi {
            openapi_route(Arc::clone(&live), paths.schemas.clone()).merge(router)
        } else {
            router
        };
        let current: crate::mllp_server::Current = {
            let live = Arc::clone(&live);
            Arc::new(move || live.runtime())
        };
        let mllp = crate::mllp_server::Listeners::start(current)
            .await
            .context("opening the MLLP listeners")?;
        tokio::spawn(follow_reloads(Arc::clone(&live), Arc::clone(&mllp)));
        let mut watched = paths.flows.clone();
        watched.extend(paths.schemas.iter().filter(|s| s.is_dir()).cloned());
        crate::reload::spawn_triggers(&live, &watched, watch);
        let listener = tokio::net::TcpListener::bind(listen.main)
            .await
            .with_context(|| format!("binding {}", listen.main))?;
        let address = listener.local_addr()?;
        log_flows(&project);
        if admin_tokens.is_none() {
            tracing::info!(
                "admin API and console off: set FERRY_ADMIN_TOKEN (or FERRY_ADMIN_TOKENS) to turn them on"
            );
        }
        if let Err(error) = crate::observe::install() {
            tracing::warn!(%error, "metrics are off");
        }
        let gauges = tokio::spawn(publish_gauges(Arc::clone(&live), store.clone()));
        let pruner = tokio::spawn(prune_forever(store, retention));
        let shutdown = shutdown_signal().context("listening for signals")?;
        // Tests and scripts read this line to find the port when listening on port 0.
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        for (flow, address) in mllp.addresses() {
            println!("ferry mllp listening on mllp://{address} for {flow}");
        }
        println!("ferry listening on {scheme}://{address}");
        let draining = Arc::clone(&live);
        let signal = async move {
            shutdown.await;
            // Load balancers stop sending before the drain ends.
            draining.runtime().mark_draining();
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let mut operations_address = address;
        let operations = match listen.admin {
            Some(admin) => {
                let listener = tokio::net::TcpListener::bind(admin)
                    .await
                    .with_context(|| format!("binding {admin}"))?;
                operations_address = listener.local_addr()?;
                println!("ferry admin listening on {scheme}://{operations_address}");
                let (router, stop) = (live.operations_router(), stop.clone());
                let stopped = async move { stop.cancelled().await };
                Some(tokio::spawn(crate::server::run(
                    listener,
                    router,
                    options.clone(),
                    stopped,
                )))
            }
            None => None,
        };
        if admin_tokens.is_some() {
            tracing::info!("the console is at {scheme}://{operations_address}/console");
        }
        let signal = {
            let stop = stop.clone();
            async move {
                signal.await;
                stop.cancel();
            }
        };
        crate::server::run(listener, router, options, signal)
            .await
            .context("serving")?;
        if let Some(operations) = operations {
            let _ = operations.await;
        }
        mllp.shutdown(Duration::from_secs(10)).await;
        pruner.abort();
        gauges.abort();
        live.runtime().shutdown(Duration::from_secs(10)).await;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Says which flows are served, how, and where.
fn log_flows(project: &crate::project::Project) {
    use crate::flow::Trigger;
    for flow in &project.flows {
        let (flow_name, mode) = (
            &flow.name,
            if flow.is_durable() { "durable" } else { "sync" },
        );
        match &flow.trigger {
            Trigger::Http(t) => {
                tracing::info!(flow = %flow_name, method = %t.method, path = %t.path, mode, "flow loaded");
            }
            Trigger::Queue(t) => {
                tracing::info!(flow = %flow_name, queue = %t.spec, mode, "flow loaded");
            }
            Trigger::Mllp(t) => {
                tracing::info!(flow = %flow_name, listen = %t.listen, mode, "flow loaded (MLLP)");
            }
            Trigger::Called => {
                tracing::info!(flow = %flow_name, mode, "flow loaded (called by other flows)");
            }
        }
    }
}

/// `GET /openapi.json`: the OpenAPI document of the flows being served (after a reload, of
/// the new ones).
fn openapi_route(live: Arc<crate::reload::Live>, schemas: Vec<PathBuf>) -> axum::Router {
    let document = move || {
        let flows = live.runtime().flows().to_vec();
        let schemas = schemas.clone();
        async move {
            match crate::openapi::document(&flows, &schemas) {
                Ok(document) => axum::Json(document).into_response(),
                Err(error) => crate::error::ServeError::Internal(error).into_response(),
            }
        }
    };
    axum::Router::new().route("/openapi.json", axum::routing::get(document))
}

/// Opens and closes MLLP listeners as reloads add and remove flows.
async fn follow_reloads(live: Arc<crate::reload::Live>, mllp: Arc<crate::mllp_server::Listeners>) {
    let mut reloads = live.reloads();
    while reloads.changed().await.is_ok() {
        if let Err(error) = mllp.update().await {
            tracing::error!(%error, "MLLP listener not opened after the reload");
        }
    }
}

/// Keeps the store's gauges current for `/metrics`.
async fn publish_gauges(live: Arc<crate::reload::Live>, store: crate::store::Store) {
    loop {
        let runtime = live.runtime();
        for flow in runtime.flows() {
            let Some(trigger) = flow.queue_trigger() else {
                continue;
            };
            let backlog = runtime
                .brokers()
                .backlog(Some(&store), &trigger.spec, &flow.name);
            match tokio::time::timeout(Duration::from_secs(3), backlog).await {
                Ok(Ok(backlog)) => {
                    let queue = trigger.spec.name.clone();
                    metrics::gauge!("ferry_queue_depth", "queue" => queue.clone())
                        .set(backlog.depth as f64);
                    metrics::gauge!("ferry_queue_consumer_lag", "queue" => queue)
                        .set(backlog.lag as f64);
                }
                Ok(Err(error)) => {
                    tracing::debug!(queue = %trigger.spec, %error, "queue backlog unknown")
                }
                Err(_) => tracing::debug!(queue = %trigger.spec, "queue backlog: no answer in 3 s"),
            }
        }
        if let Ok(pending) = store.undelivered().await {
            metrics::gauge!("ferry_outbox_pending").set(pending as f64);
        }
        if let Ok(oldest) = store.oldest_undelivered().await {
            let age = oldest.map_or(0, |at| crate::store::now_ms().saturating_sub(at));
            metrics::gauge!("ferry_outbox_oldest_age_seconds").set(age as f64 / 1000.0);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Deletes delivered messages older than `retention`, now and then.
async fn prune_forever(store: crate::store::Store, retention: Duration) {
    let every = (retention / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600));
    loop {
        let before =
            crate::store::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        match store.prune(before).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, "pruned delivered messages past retention"),
            Err(error) => tracing::warn!(%error, "pruning failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Listens for Ctrl-C and SIGTERM from now on; the future resolves on the first of them.
///
/// The handlers are installed when this is called, not when the future is first polled, so a
/// SIGTERM sent as soon as ferry says it is listening drains it instead of killing it.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("shutting down: finishing requests in flight");
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing requests in flight");
    })
}
