//! The `ferry` binary: parses the command line and hands over to [`ferry::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = ferry::cli::Cli::parse();
    ferry::cli::init_logging(cli.log_format);
    ferry::cli::run(cli)
}
