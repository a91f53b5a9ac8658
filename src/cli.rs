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
    /// The audit trail: verify, export, purge.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The keyring.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Synthetic data for demos and benchmarks.
    #[command(subcommand)]
    Demo(DemoCommand),
    /// Patients: retention.
    #[command(subcommand)]
    Patients(PatientsCommand),
    /// FHIR data.
    #[command(subcommand)]
    Fhir(FhirCommand),
    /// Pre-deploy checks: configuration rules, key file permissions, the database (reachable,
    /// migrated) and the audit chain; with --code, clippy, cargo-deny and cargo-audit.
    /// Exits 1 when any check fails.
    Check {
        /// Also run the code checks (in a source checkout).
        #[arg(long)]
        code: bool,
        /// The source checkout for --code (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// The HIPAA / HITRUST control map evaluated against this configuration. Exits 1 when
    /// a control is not met.
    Compliance {
        /// text, json or html.
        #[arg(long, default_value = "text")]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// An online, consistent, encrypted backup of the database (never the keyring).
    Backup {
        /// The backup file to create (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Restores a backup into an empty database, then verifies the audit chain.
    Restore {
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
    },
    /// Copies everything from one database to another (e.g. SQLite to PostgreSQL), then
    /// verifies the counts and the audit chain. The target must be empty.
    MigrateDb {
        /// The source database URL (`sqlite://…` or `postgres://…`).
        #[arg(long)]
        from: String,
        /// The target database URL; it is migrated first and must hold no data.
        #[arg(long)]
        to: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PatientsCommand {
    /// Destroy the data keys of patients deleted before a time (crypto-shredding): their
    /// data can never be read again. Audited per patient.
    Shred {
        /// RFC 3339: patients deleted before this (e.g. six years ago).
        #[arg(long)]
        deleted_before: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user; the password is read from standard input (one line).
    Create {
        #[arg(long)]
        username: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        email: Option<String>,
        /// Read the password from standard input (required: never on the command line).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Reset a user's second factor (a lost authenticator, e.g. of the only
    /// administrator): removes the TOTP secret, every passkey and the recovery codes and
    /// ends the user's sessions; the user is told by mail (at a verified address, sent by the server's
    /// outbox). Audited.
    ResetTotp {
        #[arg(long)]
        username: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Check the chain; exit 0 with a summary if intact, non-zero naming the first bad event.
    Verify,
    /// Write events to stdout, oldest first.
    Export {
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// jsonl (default) or csv.
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
    /// Remove events older than audit.retention, leaving a signed checkpoint
    /// (needs audit.purge_enabled: true).
    Purge,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Add a key version used for new work (creates the keyring when absent).
    Rotate,
    /// Re-wrap every patient data key under the newest key version (online, in batches).
    Rewrap,
}

#[derive(Subcommand, Debug)]
pub enum FhirCommand {
    /// Import a FHIR Bundle (transaction or collection) or NDJSON file: every resource
    /// validated, all written or none, idempotent on resource ids.
    Import {
        /// The file (`-` for stdin).
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum DemoCommand {
    /// Create synthetic patients and records (fake names, never real data). Dev only,
    /// unless the environment is named again with --confirm-env.
    Seed {
        #[arg(long, default_value_t = 100)]
        patients: u32,
        /// Outside dev, the environment you mean to seed, named again (e.g.
        /// `--env staging demo seed --confirm-env staging`); without it staging and prod
        /// refuse, before the database is touched.
        #[arg(long, value_name = "ENV")]
        confirm_env: Option<String>,
        /// Patients and their records only: no coded labs, conditions or medications
        /// (faster; for benchmarks of the patient tables).
        #[arg(long)]
        without_clinical_data: bool,
    },
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
    let target = if matches!(cli.command, Command::Serve { .. }) {
        crate::telemetry::LogTarget::Stdout
    } else {
        crate::telemetry::LogTarget::Stderr
    };
    // Error reports (Sentry) for the server only, when a DSN is configured.
    let reporting = match (&cli.command, config.resolve_secrets()) {
        (Command::Serve { .. }, Ok(secrets)) => match &secrets.sentry_dsn {
            Some(dsn) => match crate::reporting::init(&crate::reporting::Settings {
                dsn,
                environment: config
                    .monitoring
                    .sentry_environment
                    .clone()
                    .unwrap_or_else(|| config.env.to_string()),
                sample_rate: config.monitoring.sentry_sample_rate,
                traces_sample_rate: config.monitoring.sentry_traces_sample_rate,
            }) {
                Ok(guard) => Some(guard),
                Err(e) => {
                    eprintln!("custodian: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            None => None,
        },
        _ => None,
    };
    crate::telemetry::init(&config.logging, target, reporting.is_some());
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
            Command::Audit(cmd) => audit_command(config, cmd).await,
            Command::Keys(KeysCommand::Rotate) => keys_rotate(config).await,
            Command::Keys(KeysCommand::Rewrap) => keys_rewrap(config).await,
            Command::Demo(DemoCommand::Seed {
                patients,
                confirm_env,
                without_clinical_data,
            }) => {
                demo_seed(
                    config,
                    patients,
                    confirm_env.as_deref(),
                    !without_clinical_data,
                )
                .await
            }
            Command::Fhir(FhirCommand::Import { file }) => fhir_import(config, &file).await,
            Command::Patients(PatientsCommand::Shred { deleted_before }) => {
                patients_shred(config, &deleted_before).await
            }
            Command::Check { code, dir, format } => ops_check(config, code, &dir, &format).await,
            Command::Compliance { format, output } => {
                ops_compliance(&config, &format, output.as_deref())
            }
            Command::Backup { to } => ops_backup(config, &to).await,
            Command::Restore { from } => ops_restore(config, &from).await,
            Command::MigrateDb { from, to } => ops_migrate_db(config, &from, &to).await,
            Command::User(UserCommand::Create {
                username,
                role,
                email,
                password_stdin,
            }) => user_create(config, &username, &role, email.as_deref(), password_stdin).await,
            Command::User(UserCommand::ResetTotp { username }) => {
                user_reset_totp(config, &username).await
            }
        }
    })
}

fn print_openapi() -> ExitCode {
    match crate::routes::openapi_document().to_pretty_json() {
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
    // Bound first, so that the application knows its own address (port 0 included).
    let listener = match std::net::TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("custodian: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut config = config;
    if let Ok(a) = listener.local_addr() {
        config.server.listen = a;
    }
    let app = match App::build(config, Arc::new(SystemClock)).await {
        Ok(a) => a,
        Err(e) => {
            eprintln!("custodian: {e:#}");
            tracing::error!(error = %format!("{e:#}"), "start-up failed");
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
    if env == Environment::Dev
        && let Err(e) = bootstrap_admin(&app).await
    {
        eprintln!("custodian: could not create the first user: {e:#}");
    }
    // Amendment requests past their deadline are raised as security events.
    crate::portal::amendments::spawn_sweeper(
        app.state.clone(),
        std::time::Duration::from_secs(15 * 60),
    );
    let scheme = if server.tls { "https" } else { "http" };
    tracing::info!(%env, addr = %server.addr, backend = app.state.db().backend().as_str(), "listening on {scheme}://{}", server.addr);
    let trigger = server.shutdown_trigger();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; finishing in-flight requests");
        let _ = trigger.send(true);
    });
    let result = server.wait().await;
    // Every queued audit event is committed before the database closes.
    if let Err(e) = app.state.audit().flush().await {
        tracing::error!(error = %e, "shutdown: queued audit events could not all be committed");
    }
    if let Some(w) = app.state.audit().writer() {
        let [batches, events, failures, micros, largest, moved] = w.stats().snapshot();
        tracing::info!(
            batches,
            events,
            failures,
            largest,
            head_moved = moved,
            mean_batch = events.checked_div(batches).unwrap_or(0),
            mean_store_us = micros.checked_div(batches).unwrap_or(0),
            "audit writer totals"
        );
    }
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

/// What the offline commands need: the database, the keyring and the audit trail.
async fn offline_context(
    config: &Config,
) -> anyhow::Result<(crate::store::Db, crate::audit::AuditLog)> {
    let clock: crate::clock::SharedClock = Arc::new(SystemClock);
    // The keyring first: a command that cannot run leaves the database unmigrated.
    let keys = crate::app::open_keyring(config, &SystemClock)?;
    let db = crate::app::open_database(config, &SystemClock).await?;
    let log = crate::audit::AuditLog::start(db.clone(), keys, clock, &config.audit)?;
    Ok((db, log))
}

/// Records what an offline command did; reading the audit log is itself audited.
async fn record_system_event(
    log: &crate::audit::AuditLog,
    command: &str,
    action: crate::audit::Action,
    resource_type: &'static str,
    context: Vec<(&'static str, crate::audit::ContextValue)>,
) -> Result<(), crate::audit::AuditError> {
    let mut e = log.event(action, crate::audit::Outcome::Success);
    let actor = crate::audit::Actor::system(command);
    e.actor = Some(actor.name);
    e.resource_type = Some(resource_type);
    e.context.extend(context);
    log.record(vec![e]).await
}

async fn audit_command(config: Config, cmd: AuditCommand) -> ExitCode {
    use crate::audit::{Action, ContextValue};
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian audit: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cmd {
        AuditCommand::Verify => match log.verify().await {
            Ok(report) => {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
                let ctx = vec![
                    ("events", ContextValue::Int(report.events)),
                    ("ok", ContextValue::Bool(report.ok)),
                ];
                if let Err(e) =
                    record_system_event(&log, "audit-verify", Action::AuditVerify, "audit_log", ctx)
                        .await
                {
                    eprintln!("custodian audit verify: could not record this verification: {e}");
                }
                if report.ok {
                    eprintln!("audit chain intact: {} events", report.events);
                    ExitCode::SUCCESS
                } else {
                    let at = report.first_bad.as_deref().unwrap_or("?");
                    eprintln!(
                        "audit chain BROKEN at {at}: {}",
                        report.reason.as_deref().unwrap_or("")
                    );
                    let event = crate::security::SecurityEvent::new(
                        crate::security::Rule::AuditChainBroken,
                        "audit_log",
                        &format!("verification failed at event {at}"),
                        log.now(),
                    );
                    tracing::warn!(rule = %event.rule, "security event: {}", event.detail);
                    if let Err(e) = crate::security::insert(&db, &event).await {
                        eprintln!(
                            "custodian audit verify: could not store the security event: {e}"
                        );
                    }
                    ExitCode::from(3)
                }
            }
            Err(e) => {
                eprintln!("custodian audit verify: {e}");
                ExitCode::FAILURE
            }
        },
        AuditCommand::Export { since, format } => {
            let Some(fmt) = crate::audit::export::Format::parse(&format) else {
                eprintln!("custodian audit export: --format is jsonl or csv, not `{format}`");
                return ExitCode::from(2);
            };
            let mut filter = crate::audit::store::Filter::default();
            if let Some(s) = &since {
                match crate::clock::parse_rfc3339(s) {
                    Some(t) => filter.since = Some(t),
                    None => {
                        eprintln!(
                            "custodian audit export: --since must be an RFC 3339 time such as 2026-01-31T00:00:00Z"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let header = crate::audit::export::write_header(&mut out, fmt);
            let result = match header {
                Ok(()) => log
                    .export(&filter, |e| {
                        crate::audit::export::write_event(&mut out, fmt, e)
                    })
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let flushed = std::io::Write::flush(&mut out);
            drop(out);
            match (result, flushed) {
                (Ok(n), Ok(())) => {
                    let ctx = vec![
                        (
                            "count",
                            ContextValue::Int(i64::try_from(n).unwrap_or(i64::MAX)),
                        ),
                        (
                            "format",
                            ContextValue::Code(if fmt == crate::audit::export::Format::Csv {
                                "csv"
                            } else {
                                "jsonl"
                            }),
                        ),
                        ("since", ContextValue::Bool(since.is_some())),
                    ];
                    match record_system_event(
                        &log,
                        "audit-export",
                        Action::Export,
                        "audit_log",
                        ctx,
                    )
                    .await
                    {
                        Ok(()) => {
                            eprintln!("exported {n} events");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!(
                                "custodian audit export: the export was not recorded in the audit trail: {e}"
                            );
                            ExitCode::FAILURE
                        }
                    }
                }
                (Err(e), _) => {
                    eprintln!("custodian audit export: {e}");
                    ExitCode::FAILURE
                }
                (_, Err(e)) => {
                    eprintln!("custodian audit export: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        AuditCommand::Purge => {
            if !config.audit.purge_enabled {
                eprintln!(
                    "custodian audit purge: audit.purge_enabled is false; nothing was removed"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            match log.purge(config.audit.retention.std()).await {
                Ok(r) => {
                    let ctx = vec![
                        (
                            "purged",
                            ContextValue::Int(i64::try_from(r.purged).unwrap_or(i64::MAX)),
                        ),
                        ("up_to_seq", ContextValue::Int(r.up_to_seq.unwrap_or(0))),
                    ];
                    if let Err(e) = record_system_event(
                        &log,
                        "audit-purge",
                        Action::AuditPurge,
                        "audit_log",
                        ctx,
                    )
                    .await
                    {
                        eprintln!("custodian audit purge: the purge was not recorded: {e}");
                        return ExitCode::FAILURE;
                    }
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("custodian audit purge: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    db.close().await;
    code
}

async fn keys_rotate(config: Config) -> ExitCode {
    use crate::crypto::{KeySource, Keyring};
    let path = config.keyring_path();
    let now = crate::clock::rfc3339(crate::clock::Clock::now(&SystemClock));
    let version = if path.exists() {
        match Keyring::load(&path).and_then(|mut k| k.rotate(&now)) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("custodian keys rotate: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        match Keyring::create(&path, &now) {
            Ok(k) => k.current_version(),
            Err(e) => {
                eprintln!("custodian keys rotate: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    println!(
        "keyring {}: version {version} is now used for new work",
        path.display()
    );
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!(
                "custodian keys rotate: the key was added, but the rotation could not be recorded: {e:#}"
            );
            return ExitCode::FAILURE;
        }
    };
    let ctx = vec![(
        "version",
        crate::audit::ContextValue::Int(i64::from(version)),
    )];
    let result = record_system_event(
        &log,
        "keys-rotate",
        crate::audit::Action::KeyRotated,
        "keyring",
        ctx,
    )
    .await;
    db.close().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "custodian keys rotate: the key was added, but the rotation could not be recorded: {e}"
            );
            ExitCode::FAILURE
        }
    }
}

async fn user_create(
    config: Config,
    username: &str,
    role: &str,
    email: Option<&str>,
    password_stdin: bool,
) -> ExitCode {
    if !password_stdin {
        eprintln!(
            "custodian user create: pass --password-stdin and write the password on standard input (never on the command line)"
        );
        return ExitCode::from(2);
    }
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("custodian user create: cannot read the password from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let password = crate::config::Secret::new(line.trim_end_matches(['\n', '\r']).to_owned());
    drop(line);
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian user create: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let identity = match crate::app::open_keyring(&config, &SystemClock).and_then(|keys| {
        crate::app::identity_service(&config, db.clone(), Arc::new(SystemClock), keys)
    }) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("custodian user create: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match identity
        .create_user(
            crate::identity::Grantor::Operator,
            username,
            email,
            role,
            &password,
        )
        .await
    {
        Ok(user) => {
            let mut e = log.event(crate::audit::Action::Create, crate::audit::Outcome::Success);
            e.actor = Some(crate::audit::Actor::system("user-create").name);
            e.resource_type = Some("user");
            e.resource_id = Some(user.id.clone());
            e.context
                .insert("role", crate::audit::ContextValue::id(&user.role));
            match log.record(vec![e]).await {
                Ok(()) => {
                    println!(
                        "{}",
                        serde_json::json!({"id": user.id, "username": user.username, "role": user.role})
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "custodian user create: the user was created but not recorded in the audit trail: {e}"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(crate::identity::IdentityError::Policy(v)) => {
            eprintln!(
                "custodian user create: the password does not meet the policy: {}",
                v.join(", ")
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!(
                "custodian user create: {}",
                crate::identity::service::describe(&e)
            );
            ExitCode::from(if matches!(e, crate::identity::IdentityError::Store(_)) {
                1
            } else {
                2
            })
        }
    };
    db.close().await;
    code
}

/// `custodian user reset-totp --username U`: the operator (who holds the server's
/// configuration and database) resets a second factor, e.g. when the only administrator
/// lost their authenticator. Exit 0 when reset, 1 when it could not be done, 2 for an
/// unknown user or one without a second factor.
async fn user_reset_totp(config: Config, username: &str) -> ExitCode {
    let secrets = match config.resolve_secrets() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("custodian user reset-totp: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian user reset-totp: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let clock: crate::clock::SharedClock = Arc::new(SystemClock);
    let services = crate::app::open_keyring(&config, &SystemClock).and_then(|keys| {
        let identity =
            crate::app::identity_service(&config, db.clone(), clock.clone(), keys.clone())?;
        // The outbox only stores the mail here; a running server's outbox sends it
        // (a sender started by this short-lived process could die mid-send).
        let outbox = crate::accounts::mail::Outbox::new(
            &config,
            secrets.smtp_password.clone(),
            db.clone(),
            keys,
            clock.clone(),
        )?;
        Ok((identity, outbox))
    });
    let (identity, outbox) = match services {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian user reset-totp: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match reset_totp_of(&identity, &outbox, &db, &log, username).await {
        Ok((user, notified)) => {
            println!(
                "{}",
                serde_json::json!({"id": user.id, "username": user.username, "notified": notified})
            );
            eprintln!(
                "the second factor of {} is reset and their sessions ended; {}",
                user.username,
                if notified {
                    "a mail telling them is queued"
                } else {
                    "no mail was queued (no verified address, or no mail configured): tell them yourself"
                }
            );
            ExitCode::SUCCESS
        }
        Err((status, message)) => {
            eprintln!("custodian user reset-totp: {message}");
            ExitCode::from(status)
        }
    };
    db.close().await;
    code
}

async fn reset_totp_of(
    identity: &crate::identity::Identity,
    outbox: &crate::accounts::mail::Outbox,
    db: &crate::store::Db,
    log: &crate::audit::AuditLog,
    username: &str,
) -> Result<(crate::identity::model::User, bool), (u8, String)> {
    use crate::identity::IdentityError;
    let user = match identity.user_by_username(username).await {
        Ok(Some(u)) => u,
        Ok(None) => return Err((2, "no such user".into())),
        Err(e) => return Err((1, crate::identity::service::describe(&e))),
    };
    match identity
        .reset_totp(crate::identity::Grantor::Operator, &user.id)
        .await
    {
        Ok(_) => {}
        Err(e @ IdentityError::Conflict(_)) => {
            return Err((2, crate::identity::service::describe(&e)));
        }
        Err(e) => return Err((1, crate::identity::service::describe(&e))),
    }
    let now = identity.now_timestamp();
    // Reset already: a mail that cannot be queued is said, not a reason to fail.
    let notified = match crate::accounts::totp_reset_notice(db, outbox, &user, &now).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "custodian user reset-totp: the mail telling the user could not be queued: {e}"
            );
            false
        }
    };
    let mut e = log.event(crate::audit::Action::Update, crate::audit::Outcome::Success);
    e.actor = Some(crate::audit::Actor::system("user-reset-totp").name);
    e.resource_type = Some("user");
    e.resource_id = Some(user.id.clone());
    e.context
        .insert("change", crate::audit::ContextValue::Code("totp_reset"));
    e.context
        .insert("notified", crate::audit::ContextValue::Bool(notified));
    log.record(vec![e]).await.map_err(|e| {
        (
            1,
            format!("the second factor was reset but not recorded in the audit trail: {e}"),
        )
    })?;
    Ok((user, notified))
}

/// In dev, a database with no users at all gets an `admin` with a random password,
/// printed once.
async fn bootstrap_admin(app: &App) -> anyhow::Result<()> {
    let identity = app.state.identity();
    if identity.count_users().await? > 0 {
        return Ok(());
    }
    let password = crate::identity::service::generate_password()?;
    let user = identity
        .create_user(
            crate::identity::Grantor::Operator,
            "admin",
            None,
            "admin",
            &password,
        )
        .await
        .map_err(|e| anyhow::anyhow!(crate::identity::service::describe(&e)))?;
    let log = app.state.audit();
    let mut e = log.event(crate::audit::Action::Create, crate::audit::Outcome::Success);
    e.actor = Some(crate::audit::Actor::system("dev-bootstrap").name);
    e.resource_type = Some("user");
    e.resource_id = Some(user.id.clone());
    log.record(vec![e]).await?;
    eprintln!(
        "\ncustodian (dev): created the first user\n    username: admin\n    password: {}\nIt is shown only now. Sign in and change it.\n",
        password.expose()
    );
    Ok(())
}

fn patients_service(
    config: &Config,
    db: &crate::store::Db,
) -> anyhow::Result<crate::records::Patients> {
    let keys = crate::app::open_keyring(config, &SystemClock)?;
    Ok(crate::records::Patients::new(
        db.clone(),
        keys,
        Arc::new(SystemClock),
        config.keys.min_decryption_version,
    ))
}

async fn keys_rewrap(config: Config) -> ExitCode {
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian keys rewrap: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let patients = match patients_service(&config, &db) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("custodian keys rewrap: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match patients.rewrap_all(500).await {
        Ok(n) => {
            let versions = patients.key_versions().await.unwrap_or_default();
            println!(
                "{}",
                serde_json::json!({"rewrapped": n, "data_keys_by_version": versions})
            );
            let ctx = vec![
                (
                    "rewrapped",
                    crate::audit::ContextValue::Int(i64::try_from(n).unwrap_or(i64::MAX)),
                ),
                ("change", crate::audit::ContextValue::Code("rewrap")),
            ];
            match record_system_event(
                &log,
                "keys-rewrap",
                crate::audit::Action::KeyRotated,
                "keyring",
                ctx,
            )
            .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "custodian keys rewrap: done, but not recorded in the audit trail: {e}"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("custodian keys rewrap: {e}");
            ExitCode::FAILURE
        }
    };
    db.close().await;
    code
}

fn fhir_service(config: &Config, db: &crate::store::Db) -> anyhow::Result<crate::fhir::Fhir> {
    let keys = crate::app::open_keyring(config, &SystemClock)?;
    let patients = patients_service(config, db)?;
    Ok(crate::fhir::Fhir::new(
        db.clone(),
        keys,
        Arc::new(SystemClock),
        patients,
        config.fhir.mrn_system.clone(),
    ))
}

/// Largest file `fhir import` reads.
const MAX_IMPORT: u64 = 512 * 1024 * 1024;

async fn fhir_import(config: Config, file: &std::path::Path) -> ExitCode {
    use crate::fhir::import::{self, ImportError};
    let text = if file == std::path::Path::new("-") {
        let mut s = String::new();
        use std::io::Read;
        match std::io::stdin().take(MAX_IMPORT).read_to_string(&mut s) {
            Ok(_) => Ok(s),
            Err(e) => Err(e),
        }
    } else {
        match std::fs::metadata(file) {
            Ok(m) if m.len() > MAX_IMPORT => {
                eprintln!(
                    "custodian fhir import: the file is larger than {MAX_IMPORT} bytes; split it"
                );
                return ExitCode::FAILURE;
            }
            _ => std::fs::read_to_string(file),
        }
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            eprintln!("custodian fhir import: cannot read {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian fhir import: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let fhir = match fhir_service(&config, &db) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("custodian fhir import: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match import::import(&fhir, &text).await {
        Ok(summary) => {
            let ctx = vec![
                (
                    "count",
                    crate::audit::ContextValue::Int(summary.written as i64),
                ),
                (
                    "patient_ids",
                    crate::audit::ContextValue::Ids(summary.patient_ids.clone()),
                ),
            ];
            match record_system_event(
                &log,
                "fhir-import",
                crate::audit::Action::Update,
                "Bundle",
                ctx,
            )
            .await
            {
                Ok(()) => {
                    println!("{}", summary.report);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "custodian fhir import: the data was written but its audit event was not: {e}"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(ImportError::Invalid(lines)) => {
            eprintln!("custodian fhir import: nothing was imported; fix these and run it again:");
            for l in lines {
                eprintln!("  {l}");
            }
            ExitCode::from(65)
        }
        Err(ImportError::Failed(m)) => {
            eprintln!("custodian fhir import: nothing was imported: {m}");
            ExitCode::FAILURE
        }
    };
    db.close().await;
    code
}

async fn demo_seed(
    config: Config,
    count: u32,
    confirm_env: Option<&str>,
    clinical: bool,
) -> ExitCode {
    // Synthetic patients in a real database mix with real ones: outside dev only when
    // the operator names the environment, and checked before anything is opened.
    let env = config.env.as_str();
    if config.env != Environment::Dev && confirm_env != Some(env) {
        eprintln!(
            "custodian demo seed: refusing to write synthetic patients into the {env} database; nothing was changed. If that is what you mean, name the environment again: --confirm-env {env}"
        );
        return ExitCode::from(2);
    }
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian demo seed: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let fhir = match fhir_service(&config, &db) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("custodian demo seed: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let made = crate::fhir::demo::seed(&fhir, count, clinical).await;
    let code = match made {
        Ok((p, r, c)) => {
            let ctx = vec![
                ("patients", crate::audit::ContextValue::Int(i64::from(p))),
                ("records", crate::audit::ContextValue::Int(i64::from(r))),
                ("resources", crate::audit::ContextValue::Int(i64::from(c))),
                ("env", crate::audit::ContextValue::Code(env)),
            ];
            let _ = record_system_event(
                &log,
                "demo-seed",
                crate::audit::Action::Create,
                "patient",
                ctx,
            )
            .await;
            println!(
                "{}",
                serde_json::json!({"patients": p, "records": r, "fhir_resources": c})
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("custodian demo seed: {e}");
            ExitCode::FAILURE
        }
    };
    db.close().await;
    code
}

async fn patients_shred(config: Config, before: &str) -> ExitCode {
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian patients shred: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let patients = match patients_service(&config, &db) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("custodian patients shred: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match patients.shred_deleted_before(before).await {
        Ok(ids) => {
            let events = ids
                .iter()
                .map(|id| {
                    let mut e =
                        log.event(crate::audit::Action::Delete, crate::audit::Outcome::Success);
                    e.actor = Some(crate::audit::Actor::system("patients-shred").name);
                    e.resource_type = Some("patient");
                    e.resource_id = Some(id.clone());
                    e.patient_id = Some(id.clone());
                    e.context
                        .insert("shredded", crate::audit::ContextValue::Bool(true));
                    e
                })
                .collect();
            match log.record(events).await {
                Ok(()) => {
                    println!("{}", serde_json::json!({"shredded": ids.len()}));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "custodian patients shred: done, but not recorded in the audit trail: {e}"
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Err(crate::records::PhiError::Invalid(_)) => {
            eprintln!(
                "custodian patients shred: --deleted-before must be an RFC 3339 time such as 2020-01-01T00:00:00Z"
            );
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("custodian patients shred: {e}");
            ExitCode::FAILURE
        }
    };
    db.close().await;
    code
}

// ---- operations ---------------------------------------------------------------------------

async fn ops_check(config: Config, code: bool, dir: &std::path::Path, format: &str) -> ExitCode {
    use crate::ops::check;
    if !matches!(format, "text" | "json") {
        eprintln!("custodian check: --format is text or json, not `{format}`");
        return ExitCode::from(2);
    }
    let mut rows = check::configuration(&config);
    rows.extend(check::files(&config));
    rows.extend(check::database(&config).await);
    if code {
        let dir = dir.to_owned();
        match tokio::task::spawn_blocking(move || check::code(&dir)).await {
            Ok(r) => rows.extend(r),
            Err(e) => eprintln!("custodian check: the code checks stopped: {e}"),
        }
    }
    if format == "json" {
        println!(
            "{}",
            serde_json::json!({"env": config.env.as_str(), "checks": rows})
        );
    } else {
        print!("{}", check::table(&rows));
    }
    if rows.iter().any(|r| r.status == check::Status::Fail) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn ops_compliance(config: &Config, format: &str, output: Option<&std::path::Path>) -> ExitCode {
    use crate::ops::compliance;
    let items = match compliance::evaluate(config) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("custodian compliance: {e}");
            return ExitCode::FAILURE;
        }
    };
    let now = crate::clock::rfc3339(crate::clock::Clock::now(&SystemClock));
    let text = match format {
        "text" => compliance::text(&items, config.env.as_str()),
        "json" => {
            serde_json::json!({"env": config.env.as_str(), "generated_at": now, "controls": items})
                .to_string()
        }
        "html" => compliance::html(&items, config.env.as_str(), &now),
        other => {
            eprintln!("custodian compliance: --format is text, json or html, not `{other}`");
            return ExitCode::from(2);
        }
    };
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("custodian compliance: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        None => println!("{text}"),
    }
    let not_met: Vec<&str> = items
        .iter()
        .filter(|e| e.verdict == compliance::Verdict::NotMet)
        .map(|e| e.control.id.as_str())
        .collect();
    if not_met.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "custodian compliance: not met by this configuration: {}",
            not_met.join(", ")
        );
        ExitCode::FAILURE
    }
}

fn print_tables(verb: &str, tables: &[(String, u64)]) {
    let rows: u64 = tables.iter().map(|(_, n)| n).sum();
    eprintln!("{verb} {} tables, {rows} rows:", tables.len());
    for (t, n) in tables {
        eprintln!("  {t:<20} {n}");
    }
}

async fn ops_backup(config: Config, to: &std::path::Path) -> ExitCode {
    use crate::audit::{Action, ContextValue};
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian backup: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let keys = match crate::app::open_keyring(&config, &SystemClock) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("custodian backup: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let now = crate::clock::rfc3339(crate::clock::Clock::now(&SystemClock));
    match crate::ops::backup::backup(&db, &keys, to, &now).await {
        Ok(summary) => {
            print_tables("backed up", &summary.tables);
            println!(
                "{}",
                serde_json::json!({"backup": to.display().to_string(), "backup_id": summary.backup_id, "schema_version": summary.schema_version})
            );
            let rows: u64 = summary.tables.iter().map(|(_, n)| n).sum();
            let ctx = vec![(
                "rows",
                ContextValue::Int(i64::try_from(rows).unwrap_or(i64::MAX)),
            )];
            if let Err(e) =
                record_system_event(&log, "backup", Action::Export, "database_backup", ctx).await
            {
                eprintln!("custodian backup: could not record this backup in the audit trail: {e}");
            }
            eprintln!(
                "The keyring is not in the backup: back up {} separately.",
                config.keyring_path().display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("custodian backup: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn verify_after(db: &crate::store::Db, config: &Config, what: &str) -> bool {
    let keys = match crate::app::open_keyring(config, &SystemClock) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("custodian {what}: {e:#}");
            return false;
        }
    };
    match crate::audit::service::verify(db, &keys).await {
        Ok(r) if r.ok => {
            eprintln!("audit chain intact: {} events", r.events);
            true
        }
        Ok(r) => {
            eprintln!(
                "custodian {what}: the audit chain does NOT verify at {}: {}",
                r.first_bad.unwrap_or_default(),
                r.reason.unwrap_or_default()
            );
            false
        }
        Err(e) => {
            eprintln!("custodian {what}: cannot verify the audit chain: {e}");
            false
        }
    }
}

async fn ops_restore(config: Config, from: &std::path::Path) -> ExitCode {
    let keys = match crate::app::open_keyring(&config, &SystemClock) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("custodian restore: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let db = match crate::app::open_database(&config, &SystemClock).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("custodian restore: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let summary = match crate::ops::backup::restore(&db, &keys, from).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("custodian restore: {e:#}; nothing was restored");
            return ExitCode::FAILURE;
        }
    };
    print_tables("restored", &summary.tables);
    let ok = verify_after(&db, &config, "restore").await;
    db.close().await;
    if !ok {
        return ExitCode::from(3);
    }
    record_offline(&config, "restore", "database_restore").await;
    println!(
        "{}",
        serde_json::json!({"restored": from.display().to_string(), "backup_id": summary.backup_id})
    );
    ExitCode::SUCCESS
}

/// Records an offline operation in the audit trail of the configured database.
async fn record_offline(config: &Config, command: &str, resource: &'static str) {
    match offline_context(config).await {
        Ok((db, log)) => {
            if let Err(e) = record_system_event(
                &log,
                command,
                crate::audit::Action::Create,
                resource,
                vec![],
            )
            .await
            {
                eprintln!("custodian {command}: could not record this in the audit trail: {e}");
            }
            let _ = log.flush().await;
            db.close().await;
        }
        Err(e) => eprintln!("custodian {command}: could not record this in the audit trail: {e:#}"),
    }
}

async fn ops_migrate_db(config: Config, from: &str, to: &str) -> ExitCode {
    use crate::config::Secret;
    let open = |url: &str| {
        let mut c = config.clone();
        c.database.url = Some(Secret::new(url.to_owned()));
        c.database.url_file = None;
        c
    };
    let source_config = open(from);
    let target_config = open(to);
    let source = match crate::app::connect_database(&source_config).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("custodian migrate-db: source: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match crate::store::migrate::status(&source).await {
        Ok(st) if st.pending.is_empty() && st.changed.is_empty() && st.unknown.is_empty() => {}
        Ok(_) => {
            eprintln!(
                "custodian migrate-db: the source is not at this binary's schema version: run `custodian migrate` on it first"
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("custodian migrate-db: source: {e}");
            return ExitCode::FAILURE;
        }
    }
    let target = match crate::app::open_database(&target_config, &SystemClock).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("custodian migrate-db: target: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let tables = match crate::ops::backup::copy(&source, &target).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("custodian migrate-db: {e:#}; nothing was copied");
            return ExitCode::FAILURE;
        }
    };
    print_tables("copied", &tables);
    let ok = verify_after(&target, &target_config, "migrate-db").await;
    source.close().await;
    target.close().await;
    if !ok {
        return ExitCode::from(3);
    }
    record_offline(&target_config, "migrate-db", "database_migration").await;
    eprintln!(
        "Point database.url (or database.url_file) at the target, and keep the same keyring."
    );
    ExitCode::SUCCESS
}
