//! `ferry check`, `ferry test` and `ferry run`: what integrators run on flows before they
//! serve them.

use std::process::ExitCode;

use anyhow::Context as _;

use super::{DocumentFormat, Format, TestFormat, failure_code, load_or_report, print_diagnostics};
use crate::project::{ProjectPaths, load};

/// Prints the OpenAPI document of the flows under `paths`.
pub(super) fn openapi(paths: &ProjectPaths, format: DocumentFormat) -> anyhow::Result<ExitCode> {
    let project = match load_or_report(paths) {
        Ok(project) => project,
        Err(code) => return Ok(code),
    };
    let document =
        crate::openapi::document(&project.flows, &paths.schemas).map_err(anyhow::Error::msg)?;
    match format {
        DocumentFormat::Json => println!("{}", serde_json::to_string_pretty(&document)?),
        DocumentFormat::Yaml => print!("{}", serde_saphyr::to_string(&document)?),
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn check(paths: &ProjectPaths, format: Format) -> ExitCode {
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

pub(super) fn test(paths: &ProjectPaths, format: TestFormat) -> anyhow::Result<ExitCode> {
    let project = match load_or_report(paths) {
        Ok(project) => project,
        Err(code) => return Ok(code),
    };
    let files = crate::testing::find_test_files(&paths.flows);
    let runtime = super::runtime()?;
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

/// What `ferry run` was asked.
pub(super) struct RunArgs {
    pub(super) flows: Vec<std::path::PathBuf>,
    pub(super) schemas: Vec<std::path::PathBuf>,
    /// A flow's name, or the path of its file.
    pub(super) flow: String,
    pub(super) input: std::path::PathBuf,
    pub(super) given: Option<std::path::PathBuf>,
    pub(super) headers: Vec<String>,
    pub(super) live: bool,
}

/// `ferry run`: exits 1 when the flow refuses the message.
pub(super) fn run_one(args: &RunArgs) -> anyhow::Result<ExitCode> {
    // A flow file is loaded with the folders, unless one of them holds it already.
    let file = std::path::Path::new(&args.flow);
    let mut flows = args.flows.clone();
    let as_file = file.is_file().then(|| file.canonicalize().ok()).flatten();
    if let Some(path) = &as_file {
        let inside = args
            .flows
            .iter()
            .filter_map(|f| f.canonicalize().ok())
            .any(|folder| path.starts_with(folder));
        if !inside {
            flows.push(file.to_path_buf());
        }
    }
    let project = match load_or_report(&ProjectPaths::many(&flows, &args.schemas)) {
        Ok(project) => project,
        Err(code) => return Ok(code),
    };
    let found = match &as_file {
        Some(path) => project
            .flows
            .iter()
            .find(|f| f.file.canonicalize().ok().as_ref() == Some(path)),
        None => project.flow(&args.flow),
    };
    let Some(flow) = found else {
        let names: Vec<&str> = project.flows.iter().map(|f| f.name.as_str()).collect();
        anyhow::bail!("no flow \"{}\"; flows: {}", args.flow, names.join(", "));
    };
    let mut header_map = std::collections::BTreeMap::new();
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .with_context(|| format!("header \"{header}\" is not `Name: value`"))?;
        header_map.insert(name.trim().to_owned(), value.trim().to_owned());
    }
    // The body is read as `serve` reads a request's: by its content type (what its trigger
    // always carries, else the header), JSON by default.
    let content_type = flow
        .trigger_content_type()
        .or_else(|| crate::message::content_type_of(&header_map))
        .unwrap_or("application/json");
    let input = &args.input;
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let body = crate::json::read_body(content_type, &bytes, crate::json::DEFAULT_MAX_DEPTH)
        .with_context(|| format!("{} is not a body ferry reads", input.display()))?;
    let given: Vec<crate::testing::GivenCorrelation> = match &args.given {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            crate::config::load::parse_yaml(path, &text).map_err(|diagnostics| {
                print_diagnostics(&diagnostics);
                anyhow::anyhow!("{} is not a list of correlation records", path.display())
            })?
        }
        None => Vec::new(),
    };
    let runtime = super::runtime()?;
    let report = runtime.block_on(crate::testing::trace(
        &project,
        flow,
        body,
        &header_map,
        &given,
        args.live,
    ));
    print!("{}", report.listing);
    Ok(if report.refused {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
