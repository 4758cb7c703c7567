//! The `ferry` command: its arguments, and dispatch to the verb groups — `serve` (`serve`),
//! the integrator's `check`, `test` and `run` (`develop`), and the operator's `dlq` and
//! `trace` (`operate`).
//!
//! Exit codes are part of the interface: 0 when all is well, 1 when `check` finds problems
//! (or an operator command finds nothing), 2 for usage and I/O errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::diagnostic::{Diagnostic, Severity};
use crate::project::{ProjectPaths, load};

mod develop;
mod operate;
mod serve;

pub use serve::GuardArgs;
use serve::Listen;

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

/// Sends logs to stderr, filtered by `RUST_LOG` (default `info` for what runs as a service,
/// `warn` for the tools, whose output is their report), and traces to the OTLP collector when
/// built with the `otlp` feature and given one.
pub fn init_logging(cli: &Cli) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let default = match cli.command {
        Command::Serve { .. } | Command::Demo { .. } => "info",
        _ => "warn",
    };
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let text = (cli.log_format == LogFormat::Text)
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (cli.log_format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            // Fields sit beside `level` and `message`; `target` is the delivery's target (a
            // partner), not the module that logged.
            .with_target(false)
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
        /// Serve the OpenAPI document of the flows' HTTP endpoints at `GET /openapi.json`
        /// (what `ferry openapi` prints), for partners.
        #[arg(long, env = "FERRY_OPENAPI")]
        openapi: bool,
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
        /// The flow's name, or the path of its file.
        flow: String,
        /// A file holding the body: JSON, or what a `Content-Type` header declares (HL7 v2).
        #[arg(long)]
        input: PathBuf,
        /// A YAML or JSON file of correlation records that exist before the message comes
        /// (a list of `{context, keys, data, state}`, as a flow test's `given`), so a results
        /// flow can run before its request exists.
        #[arg(long)]
        given: Option<PathBuf>,
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
    /// Serve the Language Server Protocol on stdin and stdout, for editors: diagnostics as
    /// you type, completion and hover in flow files.
    Lsp {
        /// Folders of flows to check each edited file with, besides the file's own folder
        /// (the shipped flows a partner's folder joins, say).
        #[arg(long, value_delimiter = ',')]
        flows: Vec<PathBuf>,
        /// Folder of JSON Schemas, searched before the `schemas` folder beside each flows
        /// folder; may be repeated.
        #[arg(long)]
        schemas: Vec<PathBuf>,
    },
    /// Print an OpenAPI 3.1 document of the flows' HTTP endpoints, for the partners who
    /// call them.
    Openapi {
        /// Folders of flow files, described as one project.
        #[arg(default_value = "flows")]
        flows: Vec<PathBuf>,
        /// Folder of JSON Schemas, searched before the `schemas` folder beside each flows
        /// folder; may be repeated.
        #[arg(long)]
        schemas: Vec<PathBuf>,
        /// `yaml` or `json`.
        #[arg(long, value_enum, default_value = "yaml")]
        format: DocumentFormat,
    },
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

/// How `openapi` writes its document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DocumentFormat {
    /// YAML.
    Yaml,
    /// JSON.
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
        /// Only those with a delivery to this target that failed for good.
        #[arg(long)]
        target: Option<String>,
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
        /// With `--all`: only those with a dead delivery to this target.
        #[arg(long, requires = "all")]
        target: Option<String>,
        /// Why: recorded in each replayed message's timeline with the admin token's name.
        #[arg(long)]
        reason: String,
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
        } => Ok(develop::check(
            &ProjectPaths::many(&flows, &schemas),
            format,
        )),
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
            openapi,
            retention,
            guard,
        } => {
            let paths = ProjectPaths::many(&flows, &schemas);
            serve::serve(
                &paths,
                Listen {
                    main: listen,
                    admin: admin_listen,
                    openapi,
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
        } => develop::test(&ProjectPaths::many(&flows, &schemas), format),
        Command::Run {
            flow,
            input,
            given,
            headers,
            live,
            flows,
            schemas,
        } => develop::run_one(&develop::RunArgs {
            flows,
            schemas,
            flow,
            input,
            given,
            headers,
            live,
        }),
        Command::Demo { delay, flows } => {
            let paths = ProjectPaths::many(&flows, &[]);
            runtime()
                .and_then(|rt| rt.block_on(crate::demo::run(&paths, delay)))
                .map(|done| {
                    if done {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                })
        }
        Command::Lsp { flows, schemas } => {
            let flows = flows
                .iter()
                .map(|f| std::path::absolute(f).unwrap_or(f.clone()));
            crate::lsp::serve_stdio(flows.collect(), schemas).map(|()| ExitCode::SUCCESS)
        }
        Command::Openapi {
            flows,
            schemas,
            format,
        } => develop::openapi(&ProjectPaths::many(&flows, &schemas), format),
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&crate::config::json_schema()).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { action, admin } => {
            operate::operate(&admin, |client| operate::dlq(client, action))
        }
        Command::Trace { key, admin } => {
            operate::operate(&admin, |client| operate::trace(client, key))
        }
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::from(2)
    })
}

/// The async runtime a command runs on, sized to the CPUs ferry may use (its affinity and
/// cgroup quota): on one, a single-threaded runtime; on more, a worker per CPU. A pool of one
/// worker does the same work for more: it parks and wakes through the thread pool's
/// machinery and hands tasks between threads (speed bench, sync flow: 0.81–0.91 of the CPU
/// per request, 1.09–1.22 of the requests per second).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let one_cpu = std::thread::available_parallelism().is_ok_and(|cpus| cpus.get() == 1);
    let runtime = if one_cpu {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    runtime.context("starting the async runtime")
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
