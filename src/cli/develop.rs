//! `ferry check`, `ferry test` and `ferry run`: what integrators run on flows before they
//! serve them.

use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::Value;

use super::{Format, TestFormat, failure_code, load_or_report, print_diagnostics};
use crate::project::{ProjectPaths, load};

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

pub(super) fn run_one(
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
        runtime.block_on(crate::testing::trace(
            &project,
            flow,
            body,
            &header_map,
            live
        ))
    );
    Ok(ExitCode::SUCCESS)
}
