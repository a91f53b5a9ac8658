use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    custodian::cli::run(custodian::cli::Cli::parse())
}
