//! The `ferry` command: `serve` and `check`.
//!
//! Exit codes are part of the interface: 0 when all is well, 1 when `check` finds problems,
//! 2 for usage and I/O errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::compile::{ProjectPaths, load_project};
use crate::diagnostic::{Diagnostic, Severity};

/// ferry runs integration flows written in YAML.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 problems found by check, 2 usage or I/O error."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// A `ferry` subcommand.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the flows' HTTP triggers.
    Serve {
        /// Folder of flow files.
        #[arg(long, default_value = "flows", env = "FERRY_FLOWS")]
        flows: PathBuf,
        /// Folder of JSON Schemas (default: `schemas` beside the flows folder).
        #[arg(long, env = "FERRY_SCHEMAS")]
        schemas: Option<PathBuf>,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080", env = "FERRY_LISTEN")]
        listen: SocketAddr,
    },
    /// Check flows for every problem that can be found without traffic.
    Check {
        /// Folder of flow files.
        #[arg(default_value = "flows")]
        flows: PathBuf,
        /// Folder of JSON Schemas (default: `schemas` beside the flows folder).
        #[arg(long)]
        schemas: Option<PathBuf>,
    },
}

/// Runs the command and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { flows, schemas } => check(&ProjectPaths::new(&flows, schemas.as_deref())),
        Command::Serve {
            flows,
            schemas,
            listen,
        } => {
            let paths = ProjectPaths::new(&flows, schemas.as_deref());
            match serve(&paths, listen) {
                Ok(code) => code,
                Err(error) => {
                    eprintln!("error: {error:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn check(paths: &ProjectPaths) -> ExitCode {
    match load_project(paths) {
        Ok(project) => {
            print_diagnostics(&project.warnings);
            println!("{} flow(s) ok", project.flows.len());
            ExitCode::SUCCESS
        }
        Err(diagnostics) => {
            print_diagnostics(&diagnostics);
            ExitCode::from(1)
        }
    }
}

fn print_diagnostics(diagnostics: &[Diagnostic]) {
    for diagnostic in diagnostics {
        eprintln!("{diagnostic}");
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

fn serve(paths: &ProjectPaths, listen: SocketAddr) -> anyhow::Result<ExitCode> {
    let project = match load_project(paths) {
        Ok(project) => project,
        Err(diagnostics) => {
            print_diagnostics(&diagnostics);
            return Ok(ExitCode::from(1));
        }
    };
    print_diagnostics(&project.warnings);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = crate::server::http_client().context("building the HTTP client")?;
        let router = crate::server::router(&project, &client);
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
        let address = listener.local_addr()?;
        for flow in &project.flows {
            tracing::info!(flow = %flow.name, method = %flow.trigger.method, path = %flow.trigger.path, "flow loaded");
        }
        // Tests and scripts read this line to find the port when listening on port 0.
        println!("ferry listening on http://{address}");
        crate::server::run(listener, router, shutdown_signal()).await.context("serving")?;
        tracing::info!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
