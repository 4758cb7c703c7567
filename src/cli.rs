//! The `ferry` command: `serve`, `check`, and the operator commands `dlq` and `trace`.
//!
//! Exit codes are part of the interface: 0 when all is well, 1 when `check` finds problems
//! (or an operator command finds nothing), 2 for usage and I/O errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use crate::project::{ProjectPaths, load};
use crate::diagnostic::{Diagnostic, Severity};

/// ferry runs integration flows written in YAML.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 problems found (check) or nothing found (dlq, trace), 2 usage or I/O error."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log lines for people (`text`) or for machines (`json`, one object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "FERRY_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Export traces to this OTLP/HTTP collector, such as `http://127.0.0.1:4318`.
    #[cfg(feature = "otlp")]
    #[arg(long, global = true, env = "FERRY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sends logs to stderr, filtered by `RUST_LOG` (default `info`), and traces to the OTLP
/// collector when built with the `otlp` feature and given one.
pub fn init_logging(cli: &Cli) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let text = (cli.log_format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (cli.log_format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
    });
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json);
    #[cfg(feature = "otlp")]
    let registry = registry.with(cli.otlp_endpoint.as_deref().and_then(|endpoint| {
        crate::observe::otlp::layer(endpoint)
            .inspect_err(|error| eprintln!("OTLP export is off: {error}"))
            .ok()
    }));
    registry.init();
}

/// A `ferry` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the whole round trip on this machine: the shipped flows with a simulated lab and
    /// portal, on a temporary store.
    Demo {
        /// How long the simulated lab takes to post results.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        delay: Duration,
        /// Folders of flow files.
        #[arg(long, default_value = "flows", value_delimiter = ',')]
        flows: Vec<PathBuf>,
    },
    /// Serve the flows' HTTP triggers and deliver their messages.
    Serve {
        /// Folder of flow files; repeat it (or separate with commas) to serve several as one.
        #[arg(
            long,
            default_value = "flows",
            env = "FERRY_FLOWS",
            value_delimiter = ','
        )]
        flows: Vec<PathBuf>,
        /// Folder of JSON Schemas, searched before the `schemas` folder beside each flows
        /// folder; may be repeated.
        #[arg(long, env = "FERRY_SCHEMAS", value_delimiter = ',')]
        schemas: Vec<PathBuf>,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080", env = "FERRY_LISTEN")]
        listen: SocketAddr,
        /// The store: `sqlite://PATH` (created if missing), `sqlite::memory:` (nothing
        /// survives a restart), or `postgres://USER@HOST/DATABASE`, which several ferry
        /// processes can share.
        #[arg(long, default_value = "sqlite://data/ferry.db", env = "FERRY_STORE")]
        store: String,
        /// How long a claim on a delivery or an embedded-queue message holds: when a ferry
        /// dies mid-delivery, another takes the work over after this. Keep it above the
        /// slowest target's timeout.
        #[arg(long, default_value = "60s", env = "FERRY_LEASE", value_parser = humantime::parse_duration)]
        lease: Duration,
        /// Most connections to a PostgreSQL store, per ferry process.
        #[arg(long, default_value_t = 10, env = "FERRY_STORE_CONNECTIONS")]
        store_connections: u32,
        /// The longest a request waits for a PostgreSQL connection before it is answered 503
        /// (while the database is away, say).
        #[arg(long, default_value = "2s", env = "FERRY_STORE_WAIT", value_parser = humantime::parse_duration)]
        store_wait: Duration,
        /// Reload the flows when a file in the flows or schemas folders changes (SIGHUP
        /// reloads them too, with or without this).
        #[arg(long)]
        watch: bool,
        /// Serve metrics and the admin API on this address instead of the main one, such as
        /// `127.0.0.1:9090` (port 0 picks a free port).
        #[arg(long, env = "FERRY_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// How long delivered messages are kept, such as `7d` or `12h`.
        #[arg(long, default_value = "7d", env = "FERRY_RETENTION", value_parser = humantime::parse_duration)]
        retention: Duration,
        /// TLS and limits.
        #[command(flatten)]
        guard: GuardArgs,
    },
    /// Check flows for every problem that can be found without traffic.
    Check {
        /// Folders of flow files, checked as one project.
        #[arg(default_value = "flows")]
        flows: Vec<PathBuf>,
        /// Folder of JSON Schemas, searched before the `schemas` folder beside each flows
        /// folder; may be repeated.
        #[arg(long)]
        schemas: Vec<PathBuf>,
        /// `text` for people (on stderr), `json` for tools: one object per line on stdout.
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
    },
    /// Run the flow tests (`*.test.yaml`) found in the flows folders, targets mocked.
    Test {
        /// Folders of flow files and their tests, loaded as one project.
        #[arg(default_value = "flows")]
        flows: Vec<PathBuf>,
        /// Folder of JSON Schemas, searched before the `schemas` folder beside each flows
        /// folder; may be repeated.
        #[arg(long)]
        schemas: Vec<PathBuf>,
        /// `text` (like `cargo test`) or `junit` (XML on stdout, for CI dashboards).
        #[arg(long, value_enum, default_value = "text")]
        format: TestFormat,
    },
    /// Run one message through a flow and print what each step makes of it, the request the
    /// target would get, and the reply. Targets are mocked unless `--live`.
    Run {
        /// The flow's name.
        flow: String,
        /// A file holding the JSON body.
        #[arg(long)]
        input: PathBuf,
        /// A request header, `Name: value`; may be repeated.
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Really call an HTTP target.
        #[arg(long)]
        live: bool,
        /// Folders of flow files.
        #[arg(long, default_value = "flows", value_delimiter = ',')]
        flows: Vec<PathBuf>,
        /// Folder of JSON Schemas; may be repeated.
        #[arg(long)]
        schemas: Vec<PathBuf>,
    },
    /// Print the flow format's JSON Schema (what `schemas/flow.schema.json` holds).
    Schema,
    /// Dead letters: list, show and replay them (through a running ferry's admin API).
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        action: DlqAction,
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The whole journey of a request across flows, by message id, request id, or any
    /// correlation key (a `portal_ref`, a `lab_order_id`).
    Trace {
        /// The id or key.
        key: String,
        /// Where the admin API is.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How `check` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// rustc-style, with the offending line.
    Text,
    /// One JSON object per diagnostic and line.
    Json,
}

/// How `test` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TestFormat {
    /// Like `cargo test`.
    Text,
    /// JUnit XML.
    Junit,
}

/// `ferry dlq` actions.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List dead letters, newest first.
    List {
        /// Only this flow's.
        #[arg(long)]
        flow: Option<String>,
    },
    /// Show one message with its deliveries and timeline.
    Show {
        /// Message id.
        id: String,
    },
    /// Run messages through their flows again.
    Replay {
        /// Message ids.
        ids: Vec<String>,
        /// Every dead letter (of `--flow`, when given).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With `--all`: only this flow's.
        #[arg(long, requires = "all")]
        flow: Option<String>,
    },
}

/// Where the admin API is.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Base URL of the running ferry.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "FERRY_ADMIN_URL")]
    pub admin_url: String,
    /// The admin token ferry was started with.
    #[arg(long, env = "FERRY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// How long to wait for the admin API to answer.
    #[arg(long, default_value = "30s", env = "FERRY_ADMIN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub admin_timeout: Duration,
}

/// Runs the command and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Check {
            flows,
            schemas,
            format,
        } => Ok(check(&ProjectPaths::many(&flows, &schemas), format)),
        Command::Serve {
            flows,
            schemas,
            listen,
            store,
            lease,
            store_connections,
            store_wait,
            watch,
            admin_listen,
            retention,
            guard,
        } => {
            let paths = ProjectPaths::many(&flows, &schemas);
            serve(
                &paths,
                Listen {
                    main: listen,
                    admin: admin_listen,
                },
                &store,
                crate::store::StoreOptions {
                    lease,
                    connections: store_connections,
                    wait: store_wait,
                },
                retention,
                watch,
                &guard,
            )
        }
        Command::Test {
            flows,
            schemas,
            format,
        } => test(&ProjectPaths::many(&flows, &schemas), format),
        Command::Run {
            flow,
            input,
            headers,
            live,
            flows,
            schemas,
        } => run_one(
            &ProjectPaths::many(&flows, &schemas),
            &flow,
            &input,
            &headers,
            live,
        ),
        Command::Demo { delay, flows } => {
            let paths = ProjectPaths::many(&flows, &[]);
            tokio::runtime::Runtime::new()
                .context("starting the async runtime")
                .and_then(|rt| rt.block_on(crate::demo::run(&paths, delay)))
                .map(|done| {
                    if done {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                })
        }
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::config::json_schema()).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action, admin } => operate(&admin, |client| dlq(client, action)),
        Command::Trace { key, admin } => operate(&admin, |client| trace(client, key)),
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::from(2)
    })
}

fn check(paths: &ProjectPaths, format: Format) -> ExitCode {
    let (diagnostics, flows) = match load(paths) {
        Ok(project) => (project.warnings, Some(project.flows.len())),
        Err(diagnostics) => (diagnostics, None),
    };
    match format {
        Format::Json => {
            for diagnostic in &diagnostics {
                println!("{}", diagnostic.to_json());
            }
        }
        Format::Text => {
            print_diagnostics(&diagnostics);
            if let Some(flows) = flows {
                println!("{flows} flow(s) ok");
            }
        }
    }
    if flows.is_some() {
        ExitCode::SUCCESS
    } else {
        failure_code(&diagnostics)
    }
}

/// 2 when a folder or file could not be read (an I/O error, not a problem in a flow), else 1.
fn failure_code(diagnostics: &[Diagnostic]) -> ExitCode {
    if diagnostics
        .iter()
        .any(|d| d.severity == Severity::Error && d.code == "io")
    {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

fn test(paths: &ProjectPaths, format: TestFormat) -> anyhow::Result<ExitCode> {
    let project = match load_or_report(paths) {
        Ok(project) => project,
        Err(code) => return Ok(code),
    };
    let files = crate::testing::find_test_files(&paths.flows);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let mut results = Vec::new();
    let mut broken = Vec::new();
    runtime.block_on(async {
        for file in &files {
            match crate::testing::run_file(&project, file).await {
                Ok(mut found) => results.append(&mut found),
                Err(diagnostic) => broken.push(diagnostic),
            }
        }
    });
    print_diagnostics(&broken);
    let failed: Vec<_> = results.iter().filter(|r| !r.failures.is_empty()).collect();
    match format {
        TestFormat::Junit => print!("{}", crate::testing::junit(&results)),
        TestFormat::Text => {
            println!(
                "\nrunning {} tests from {} file(s)",
                results.len(),
                files.len()
            );
            for result in &results {
                let verdict = if result.failures.is_empty() {
                    "ok"
                } else {
                    "FAILED"
                };
                println!("test {} ... {verdict}", result.name);
            }
            if !failed.is_empty() {
                println!("\nfailures:");
                for result in &failed {
                    println!(
                        "\n{} [{}:{}]:",
                        result.name,
                        result.file.display(),
                        result.line
                    );
                    for failure in &result.failures {
                        println!("  {}", failure.replace('\n', "\n  "));
                    }
                }
            }
            let verdict = if failed.is_empty() && broken.is_empty() {
                "ok"
            } else {
                "FAILED"
            };
            println!(
                "\ntest result: {verdict}. {} passed; {} failed",
                results.len() - failed.len(),
                failed.len()
            );
        }
    }
    Ok(if failed.is_empty() && broken.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn run_one(
    paths: &ProjectPaths,
    name: &str,
    input: &std::path::Path,
    headers: &[String],
    live: bool,
) -> anyhow::Result<ExitCode> {
    let project = match load_or_report(paths) {
        Ok(project) => project,
        Err(code) => return Ok(code),
    };
    let Some(flow) = project.flow(name) else {
        let names: Vec<&str> = project.flows.iter().map(|f| f.name.as_str()).collect();
        anyhow::bail!("no flow \"{name}\"; flows: {}", names.join(", "));
    };
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let body: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", input.display()))?;
    let mut header_map = std::collections::BTreeMap::new();
    for header in headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("header \"{header}\" is not `Name: value`"))?;
        header_map.insert(name.trim().to_owned(), value.trim().to_owned());
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    print!(
        "{}",
        runtime.block_on(crate::testing::trace(flow, body, &header_map, live))
    );
    Ok(ExitCode::SUCCESS)
}

/// Loads the project, or prints why it cannot be and returns the exit code that says so.
fn load_or_report(paths: &ProjectPaths) -> Result<crate::project::Project, ExitCode> {
    load(paths).map_err(|diagnostics| {
        print_diagnostics(&diagnostics);
        failure_code(&diagnostics)
    })
}

/// Prints diagnostics rustc-style on stderr, each with its source line, and a count.
fn print_diagnostics(diagnostics: &[Diagnostic]) {
    let mut sources: std::collections::HashMap<&std::path::Path, Option<String>> =
        std::collections::HashMap::new();
    for diagnostic in diagnostics {
        let source = sources
            .entry(&diagnostic.file)
            .or_insert_with(|| std::fs::read_to_string(&diagnostic.file).ok());
        eprintln!("{}", diagnostic.render(source.as_deref()));
    }
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diagnostics.len() - errors;
    if !diagnostics.is_empty() {
        eprintln!("{errors} error(s), {warnings} warning(s)");
    }
}

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
struct Listen {
    main: SocketAddr,
    admin: Option<SocketAddr>,
}

fn serve(
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
        tracing::warn!(address = %listen.main, "serving plain HTTP on a non-loopback address: use --tls-cert and --tls-key, or a TLS proxy in front");
    }
    let admin_token = std::env::var("FERRY_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = crate::targets::http_client().context("building the HTTP client")?;
        let store = crate::store::Store::open_with(store_url, store_options)
            .await
            .with_context(|| format!("opening the store {}", crate::queue::redact(store_url)))?;
        let ferry = crate::runtime::Runtime::start(&project, client.clone(), Some(store.clone()));
        let split = listen.admin.is_some();
        let live = crate::reload::Live::new(paths.clone(), client, store.clone(), admin_token.clone(), ferry, split);
        let router = live.router();
        let mut watched = paths.flows.clone();
        watched.extend(paths.schemas.iter().filter(|s| s.is_dir()).cloned());
        crate::reload::spawn_triggers(&live, &watched, watch);
        let listener = tokio::net::TcpListener::bind(listen.main).await.with_context(|| format!("binding {}", listen.main))?;
        let address = listener.local_addr()?;
        for flow in &project.flows {
            let mode = if flow.is_durable() { "durable" } else { "sync" };
            match &flow.trigger {
                crate::flow::Trigger::Http(t) => tracing::info!(flow = %flow.name, method = %t.method, path = %t.path, mode, "flow loaded"),
                crate::flow::Trigger::Queue(t) => tracing::info!(flow = %flow.name, queue = %t.spec, mode, "flow loaded"),
                crate::flow::Trigger::Called => tracing::info!(flow = %flow.name, mode, "flow loaded (called by other flows)"),
            }
        }
        if admin_token.is_none() {
            tracing::info!("admin API off: set FERRY_ADMIN_TOKEN to turn it on");
        }
        if let Err(error) = crate::observe::install() {
            tracing::warn!(%error, "metrics are off");
        }
        let gauges = tokio::spawn(publish_gauges(Arc::clone(&live), store.clone()));
        let pruner = tokio::spawn(prune_forever(store, retention));
        let shutdown = shutdown_signal().context("listening for signals")?;
        // Tests and scripts read this line to find the port when listening on port 0.
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        println!("ferry listening on {scheme}://{address}");
        let draining = Arc::clone(&live);
        let signal = async move {
            shutdown.await;
            // Load balancers stop sending before the drain ends.
            draining.runtime().mark_draining();
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let operations = match listen.admin {
            Some(admin) => {
                let listener = tokio::net::TcpListener::bind(admin).await.with_context(|| format!("binding {admin}"))?;
                println!("ferry admin listening on http://{}", listener.local_addr()?);
                let (router, stop) = (live.operations_router(), stop.clone());
                Some(tokio::spawn(crate::server::run(listener, router, options.clone(), async move { stop.cancelled().await })))
            }
            None => None,
        };
        let signal = {
            let stop = stop.clone();
            async move {
                signal.await;
                stop.cancel();
            }
        };
        crate::server::run(listener, router, options, signal).await.context("serving")?;
        if let Some(operations) = operations {
            let _ = operations.await;
        }
        pruner.abort();
        gauges.abort();
        live.runtime().shutdown(Duration::from_secs(10)).await;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
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

/// Talks to a running ferry's admin API.
struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Option<Value>> {
        let url = format!("{}/admin/v1{path}", self.base.trim_end_matches('/'));
        let mut request = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = response.status();
        let body = response.json::<Value>().await;
        match (status.as_u16(), body) {
            (200..=299, Ok(body)) if body.is_object() => Ok(Some(body)),
            // The admin API says it knows no such message; any other 404 means there is no
            // admin API here, which must not read as "nothing found".
            (404, Ok(body)) if body["details"][0]["missing"].is_string() => Ok(None),
            (401, _) => anyhow::bail!("the admin token was refused"),
            (200..=299 | 404, _) => anyhow::bail!(
                "no ferry admin API at {}: check the URL (with --admin-listen, the admin API has its own address) and that ferry runs with FERRY_ADMIN_TOKEN set",
                self.base
            ),
            (_, body) => anyhow::bail!("{url} answered {status}: {}", body.unwrap_or(Value::Null)),
        }
    }
}

fn operate<F, Fut>(admin: &AdminArgs, action: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    let token = admin
        .admin_token
        .clone()
        .context("set FERRY_ADMIN_TOKEN (or --admin-token) to the token ferry runs with")?;
    let http = reqwest::Client::builder()
        .timeout(admin.admin_timeout)
        .connect_timeout(admin.admin_timeout.min(Duration::from_secs(5)))
        .build()
        .context("building the HTTP client")?;
    let client = AdminClient {
        base: admin.admin_url.clone(),
        token,
        http,
    };
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(action(client))
}

async fn dlq(client: AdminClient, action: DlqAction) -> anyhow::Result<ExitCode> {
    match action {
        DlqAction::List { flow } => {
            let path = match flow {
                Some(flow) => format!("/dead-letters?flow={}", encoded(&flow)),
                None => "/dead-letters".to_owned(),
            };
            let body = client
                .call(reqwest::Method::GET, &path, None)
                .await?
                .unwrap_or_default();
            let dead = body["dead_letters"].as_array().cloned().unwrap_or_default();
            println!("{:<36}  {:<16}  {:<20}  ERROR", "ID", "FLOW", "RECEIVED");
            for message in &dead {
                println!(
                    "{:<36}  {:<16}  {:<20}  {}",
                    text(&message["id"]),
                    text(&message["flow"]),
                    text(&message["received_at"]),
                    text(&message["error"])
                );
            }
            println!("{} dead letter(s)", dead.len());
            Ok(ExitCode::SUCCESS)
        }
        DlqAction::Show { id } => match client
            .call(
                reqwest::Method::GET,
                &format!("/messages/{}", encoded(&id)),
                None,
            )
            .await?
        {
            Some(message) => {
                println!("{}", serde_json::to_string_pretty(&message)?);
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!("no message {id}");
                Ok(ExitCode::from(1))
            }
        },
        DlqAction::Replay { ids, all, flow } => {
            if ids.is_empty() && !all {
                anyhow::bail!("name message ids, or --all");
            }
            let body = json!({"ids": ids, "flow": flow});
            let answer = client
                .call(reqwest::Method::POST, "/dead-letters/replay", Some(body))
                .await?
                .unwrap_or_default();
            let results = answer["results"].as_array().cloned().unwrap_or_default();
            let mut failed = 0;
            for result in &results {
                if result["replayed"] == json!(true) {
                    println!("{}  replayed", text(&result["id"]));
                } else {
                    failed += 1;
                    println!("{}  not replayed: {}", text(&result["id"]), result["error"]);
                }
            }
            println!("{} replayed, {failed} not", results.len() - failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

async fn trace(client: AdminClient, key: String) -> anyhow::Result<ExitCode> {
    let path = format!("/trace/{}", encoded(&key));
    let Some(trace) = client.call(reqwest::Method::GET, &path, None).await? else {
        eprintln!("nothing is known by \"{key}\"");
        return Ok(ExitCode::from(1));
    };
    if let Some(record) = trace["correlation"].as_object() {
        println!(
            "{} {}  state: {}  keys: {}",
            text(&record["context"].clone()),
            text(&record["key"].clone()),
            text(&record["state"].clone()),
            record["keys"]
                .as_array()
                .map(|k| k.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
    }
    for message in trace["messages"].as_array().into_iter().flatten() {
        println!(
            "  message {}  flow {}  {}",
            text(&message["id"]),
            text(&message["flow"]),
            text(&message["status"])
        );
    }
    println!();
    for event in trace["timeline"].as_array().into_iter().flatten() {
        let id = text(&event["message_id"]);
        let short = id.get(id.len().saturating_sub(8)..).unwrap_or(&id);
        println!(
            "{}  {:<14} {:<8}  {:<9} {}",
            text(&event["at"]),
            text(&event["flow"]),
            short,
            text(&event["kind"]),
            describe(&event["detail"])
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` as one path segment or query value: every byte but letters and digits escaped.
fn encoded(text: &str) -> percent_encoding::PercentEncode<'_> {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A timeline detail as `key=value` pairs, nulls left out.
fn describe(detail: &Value) -> String {
    match detail.as_object() {
        Some(fields) => fields
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| format!("{k}={}", text(v)))
            .collect::<Vec<_>>()
            .join(" "),
        None => text(detail),
    }
}
