//! The command line: each command is a function of the library.
// A command's output is its standard output.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::app::App;
use crate::clock::SystemClock;
use crate::config::{Config, Environment, Loader, rules};
use crate::http::server::{RunningServer, shutdown_signal};
use crate::http::tls;

/// Exit status for a configuration that is invalid or refused (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "custodian",
    version,
    about = "A security-first healthcare API server"
)]
pub struct Cli {
    /// Environment: dev, staging or prod (overrides CUSTODIAN_ENV).
    #[arg(long, global = true)]
    pub env: Option<String>,
    /// Configuration file (overrides CUSTODIAN_CONFIG; default config/<env>.yaml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Set a configuration key, e.g. --set session.idle_timeout=3s (repeatable; wins
    /// over files and environment variables).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    pub sets: Vec<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (migrating the database first).
    Serve {
        /// Address to listen on (the key server.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Print the OpenAPI document.
    Openapi,
}

impl Cli {
    fn loader(&self) -> Result<Loader, String> {
        let mut loader = Loader::from_process_env();
        if let Some(env) = &self.env {
            loader.env = Some(env.clone());
        }
        if let Some(file) = &self.config {
            loader.file = Some(file.clone());
        }
        for s in &self.sets {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--set {s}: write it as KEY=VALUE"))?;
            loader.sets.push((k.trim().to_owned(), v.to_owned()));
        }
        if let Command::Serve { listen: Some(l) } = &self.command {
            loader.sets.push(("server.listen".into(), l.clone()));
        }
        Ok(loader)
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let config = match cli
        .loader()
        .and_then(|l| l.load().map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("custodian: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Command::Openapi = cli.command {
        return print_openapi();
    }
    crate::telemetry::init(&config.logging);
    crate::telemetry::install_panic_hook();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("custodian: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve { .. } => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::Openapi => print_openapi(),
        }
    })
}

fn print_openapi() -> ExitCode {
    match crate::http::openapi_document().to_pretty_json() {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("custodian: cannot render the OpenAPI document: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Applies the safety rules: prod refuses on any finding, the others warn.
/// Returns false when the process must not start.
pub fn check_startup_rules(config: &Config) -> bool {
    let mut findings = rules::insecure_settings(config);
    findings.extend(rules::unreadable_secrets(config));
    if config.env == Environment::Prod && !findings.is_empty() {
        eprintln!(
            "custodian: refusing to start in prod: the configuration is insecure ({} problem{}):",
            findings.len(),
            if findings.len() == 1 { "" } else { "s" }
        );
        for f in &findings {
            eprintln!("  - {f}");
        }
        eprintln!(
            "Fix each setting above (see docs/configuration.md), or run with CUSTODIAN_ENV=dev for local work."
        );
        return false;
    }
    for f in findings.iter().chain(rules::advisories(config).iter()) {
        tracing::warn!(key = f.key, problem = %f.problem, "insecure setting (refused in prod)");
    }
    true
}

async fn migrate(config: Config) -> ExitCode {
    match crate::app::open_database(&config, &SystemClock).await {
        Ok(db) => {
            db.close().await;
            println!(
                "database is at schema version {}",
                crate::store::migrate::MIGRATIONS.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("custodian migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> ExitCode {
    if !check_startup_rules(&config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    tls::install_crypto_provider();
    let tls = match make_tls(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("custodian: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let listen = config.server.listen;
    let grace = config.server.shutdown_grace.std();
    let env = config.env;
    let app = match App::build(config, Arc::new(SystemClock)).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("custodian: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "start-up failed");
            return ExitCode::FAILURE;
        }
    };
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("custodian: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match RunningServer::spawn(app.router(), listener, tls.map(|t| t.config), grace) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("custodian: cannot serve on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let scheme = if server.tls { "https" } else { "http" };
    tracing::info!(%env, addr = %server.addr, backend = app.state.db().backend().as_str(), "listening on {scheme}://{}", server.addr);
    let trigger = server.shutdown_trigger();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        let _ = trigger.send(true);
    });
    let result = server.wait().await;
    app.state.db().close().await;
    match result {
        Ok(()) => {
            tracing::info!("shutdown complete");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

fn make_tls(config: &Config) -> Result<Option<tls::Tls>, tls::TlsError> {
    if let (Some(cert), Some(key)) = (&config.server.tls.cert, &config.server.tls.key) {
        let t = tls::from_files(cert, key)?;
        tracing::info!(fingerprint = %t.fingerprint, "TLS certificate loaded");
        return Ok(Some(t));
    }
    if config.serves_tls() {
        let host = config.server.listen.ip().to_string();
        let t = tls::self_signed(&[host])?;
        tracing::warn!(
            fingerprint = %t.fingerprint,
            "no server.tls configured: serving a self-signed certificate generated at start (SHA-256 fingerprint above); configure a real one"
        );
        eprintln!(
            "custodian: self-signed TLS certificate, SHA-256 fingerprint {}",
            t.fingerprint
        );
        return Ok(Some(t));
    }
    Ok(None)
}
