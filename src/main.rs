//! The `ferry` binary: parses the command line and hands over to [`ferry::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ferry::cli::Cli::parse();
    ferry::cli::init_logging(&cli);
    let code = ferry::cli::run(cli);
    #[cfg(feature = "otlp")]
    ferry::observe::otlp::shutdown();
    code
}
