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
pub enum DemoCommand {
    /// Create synthetic patients and records (fake names, never real data).
    Seed {
        #[arg(long, default_value_t = 100)]
        patients: u32,
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
            Command::Demo(DemoCommand::Seed { patients }) => demo_seed(config, patients).await,
            Command::Patients(PatientsCommand::Shred { deleted_before }) => {
                patients_shred(config, &deleted_before).await
            }
            Command::User(UserCommand::Create {
                username,
                role,
                email,
                password_stdin,
            }) => user_create(config, &username, &role, email.as_deref(), password_stdin).await,
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
    if env == Environment::Dev
        && let Err(e) = bootstrap_admin(&app).await
    {
        eprintln!("custodian: could not create the first user: {e:#}");
    }
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
    let db = crate::app::open_database(config, &SystemClock).await?;
    let keys = crate::app::open_keyring(config, &SystemClock)?;
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
    let code = match identity.create_user(username, email, role, &password).await {
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

/// In dev, a database with no users at all gets an `admin` with a random password,
/// printed once.
async fn bootstrap_admin(app: &App) -> anyhow::Result<()> {
    let identity = app.state.identity();
    if identity.count_users().await? > 0 {
        return Ok(());
    }
    let password = crate::identity::service::generate_password()?;
    let user = identity
        .create_user("admin", None, "admin", &password)
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

async fn demo_seed(config: Config, count: u32) -> ExitCode {
    let (db, log) = match offline_context(&config).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("custodian demo seed: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let patients = match patients_service(&config, &db) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("custodian demo seed: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let made = crate::records::demo::seed(&patients, count).await;
    let code = match made {
        Ok((p, r)) => {
            let ctx = vec![
                ("patients", crate::audit::ContextValue::Int(i64::from(p))),
                ("records", crate::audit::ContextValue::Int(i64::from(r))),
            ];
            let _ = record_system_event(
                &log,
                "demo-seed",
                crate::audit::Action::Create,
                "patient",
                ctx,
            )
            .await;
            println!("{}", serde_json::json!({"patients": p, "records": r}));
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
