use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a profile of audited reads on 2 cores spent
/// about 15 % of the server's CPU in glibc's malloc and free (docs/performance.md,
/// "Fourth session"). Secrets are still wiped by `zeroize` before they are freed.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    custodian::cli::run(custodian::cli::Cli::parse())
}
