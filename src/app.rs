//! The application: configuration, storage and clock, assembled once and shared by
//! every request. `serve` and the integration tests build it the same way.

use std::sync::Arc;

use anyhow::Context;
use axum::Router;

use crate::audit::AuditLog;
use crate::clock::SharedClock;
use crate::config::{Config, Environment};
use crate::crypto::{Keyring, SharedKeyring};
use crate::identity::Identity;
use crate::identity::password::{HashParams, Hasher};
use crate::records::Patients;
use crate::store::{self, Db, PoolSettings};

/// Shared state handed to every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    db: Db,
    redis: Option<redis::Client>,
    clock: SharedClock,
    installation_id: String,
    keys: Arc<SharedKeyring>,
    audit: AuditLog,
    identity: Identity,
    patients: Patients,
    limiter: crate::ratelimit::Limiter,
    metrics: crate::metrics::Metrics,
    security: crate::security::Security,
    smart: crate::smart::Smart,
    accounts: crate::accounts::Accounts,
    fhir: crate::fhir::Fhir,
    oauth: crate::oauth::OAuth,
    /// This server's own FHIR base URLs (the `aud` it accepts, the `iss` of its own
    /// launches).
    own_fhir_bases: Vec<String>,
}

impl AppState {
    pub fn config(&self) -> &Config {
        &self.inner.config
    }
    pub fn db(&self) -> &Db {
        &self.inner.db
    }
    pub fn redis(&self) -> Option<&redis::Client> {
        self.inner.redis.as_ref()
    }
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.inner.metrics
    }
    pub fn security(&self) -> &crate::security::Security {
        &self.inner.security
    }
    pub fn limiter(&self) -> &crate::ratelimit::Limiter {
        &self.inner.limiter
    }
    pub fn installation_id(&self) -> &str {
        &self.inner.installation_id
    }
    pub fn keys(&self) -> &Arc<SharedKeyring> {
        &self.inner.keys
    }
    pub fn audit(&self) -> &AuditLog {
        &self.inner.audit
    }
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }
    pub fn patients(&self) -> &Patients {
        &self.inner.patients
    }
    pub fn smart(&self) -> &crate::smart::Smart {
        &self.inner.smart
    }
    pub fn accounts(&self) -> &crate::accounts::Accounts {
        &self.inner.accounts
    }
    pub fn fhir(&self) -> &crate::fhir::Fhir {
        &self.inner.fhir
    }
    pub fn oauth(&self) -> &crate::oauth::OAuth {
        &self.inner.oauth
    }
    pub fn own_fhir_bases(&self) -> &[String] {
        &self.inner.own_fhir_bases
    }
}

/// The identity service for a configuration: argon2id with the configured parameters on
/// a pool of half the machine's cores, at most 256 callers waiting.
pub fn identity_service(
    config: &Config,
    db: Db,
    clock: SharedClock,
    keys: Arc<SharedKeyring>,
) -> anyhow::Result<Identity> {
    let params = HashParams {
        memory_kib: config.password.hash_memory_kib,
        iterations: config.password.hash_iterations,
        parallelism: config.password.hash_parallelism,
    };
    // Half the cores hash passwords (at least one): a login flood then leaves the other
    // half to every other request.
    let workers = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
    let hasher =
        Hasher::new(params, workers, 256).map_err(|e| anyhow::anyhow!("password hashing: {e}"))?;
    Ok(Identity::new(
        db,
        hasher,
        clock,
        keys,
        crate::identity::service::Settings::from_config(config),
        crate::identity::passkeys::relying_party(config)?,
    ))
}

/// Opens the keyring; in dev, creates it when absent (mode 0600) and says so.
pub fn open_keyring(
    config: &Config,
    clock: &dyn crate::clock::Clock,
) -> anyhow::Result<Arc<SharedKeyring>> {
    open_keyring_creating(config, clock, config.env == Environment::Dev)
}

/// Opens the keyring, creating it (mode 0600) when absent and `create` is set. Every
/// command opens it before it touches the database, so a missing keyring stops a
/// command before anything is migrated.
fn open_keyring_creating(
    config: &Config,
    clock: &dyn crate::clock::Clock,
    create: bool,
) -> anyhow::Result<Arc<SharedKeyring>> {
    let path = config.keyring_path();
    let now = crate::clock::rfc3339(clock.now());
    let (ring, created) = Keyring::open(&path, create, &now).map_err(|e| {
        anyhow::anyhow!(
            "{e}. If this installation has data, restore the keyring from its backup or point keys.keyring at it: data sealed under it cannot be read without it. A new installation gets one from `custodian keys rotate` (made automatically for an empty database in dev, and by `serve` in staging)"
        )
    })?;
    if created {
        tracing::warn!(env = %config.env, path = %path.display(), "created a new keyring; back it up: data encrypted with it cannot be read without it");
    }
    Ok(Arc::new(SharedKeyring::new(ring)))
}

/// Whether the database has never been migrated (nothing in it is bound to a keyring).
/// Only reads.
async fn database_is_empty(config: &Config) -> anyhow::Result<bool> {
    let db = connect_database(config).await?;
    let status = store::migrate::status(&db).await?;
    let empty = status.pending.len() == store::migrate::MIGRATIONS.len();
    db.close().await;
    if !empty {
        tracing::error!(
            path = %config.keyring_path().display(),
            "the keyring is missing but the database already holds data sealed under one"
        );
    }
    Ok(empty)
}

/// Opens the database named by the configuration, without migrating it.
pub async fn connect_database(config: &Config) -> anyhow::Result<Db> {
    let secrets = config.resolve_secrets().map_err(anyhow::Error::msg)?;
    let settings = PoolSettings {
        max_connections: config.database.max_connections,
        acquire_timeout: config.database.acquire_timeout.std(),
        sqlite_synchronous_full: config.database.sqlite_synchronous
            == crate::config::SqliteSync::Full,
    };
    Db::connect(&secrets.database_url, &settings)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot open the database ({}): {e}",
                scheme_of(secrets.database_url.expose())
            )
        })
}

/// Opens the database named by the configuration and migrates it.
pub async fn open_database(config: &Config, clock: &dyn crate::clock::Clock) -> anyhow::Result<Db> {
    let db = connect_database(config).await?;
    let report = store::migrate::migrate(&db, clock)
        .await
        .context("migrating the database")?;
    if !report.applied.is_empty() {
        tracing::info!(applied = ?report.applied, version = report.current, "database migrated");
    }
    Ok(db)
}

/// The scheme of a URL, safe to print (the rest may hold a password).
pub fn scheme_of(url: &str) -> &str {
    url.split(':').next().unwrap_or("?")
}

/// This server's own FHIR base URLs: `fhir.base_url`, else the address it listens on
/// (a loopback or wildcard address as 127.0.0.1 and localhost). Empty when the port is
/// not known yet (port 0 before binding).
pub fn own_fhir_bases(config: &Config) -> Vec<String> {
    if let Some(b) = &config.fhir.base_url {
        return vec![b.trim_end_matches('/').to_owned()];
    }
    let addr = config.server.listen;
    if addr.port() == 0 {
        return Vec::new();
    }
    let scheme = if config.serves_tls() || config.server.behind_tls_proxy {
        "https"
    } else {
        "http"
    };
    let port = addr.port();
    let ip = addr.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        vec![
            format!("{scheme}://127.0.0.1:{port}/fhir"),
            format!("{scheme}://localhost:{port}/fhir"),
        ]
    } else if ip.is_ipv6() {
        vec![format!("{scheme}://[{ip}]:{port}/fhir")]
    } else {
        vec![format!("{scheme}://{ip}:{port}/fhir")]
    }
}

pub struct App {
    pub state: AppState,
}

impl App {
    /// Connects, migrates and assembles the state.
    pub async fn build(mut config: Config, clock: SharedClock) -> anyhow::Result<Self> {
        let own_fhir_bases = own_fhir_bases(&config);
        if config.oauth.builtin_app {
            // The built-in app launches against this server itself.
            for b in &own_fhir_bases {
                if !config.smart.allowed_issuers.contains(b) {
                    config.smart.allowed_issuers.push(b.clone());
                }
            }
        }
        let secrets = config.resolve_secrets().map_err(anyhow::Error::msg)?;
        // The keyring before the database: a server that cannot start leaves the database
        // as it was. A missing keyring is a warning outside prod (the start-up rules), so
        // dev and staging create one; prod has refused to start before this.
        let mut create = config.env != Environment::Prod;
        if create && !config.keyring_path().exists() {
            // A new keyring only for a database that holds nothing yet: data sealed or
            // chained under another keyring would become unreadable, and new data would
            // be sealed under a key its real keyring does not have.
            create = database_is_empty(&config).await?;
        }
        let keys = open_keyring_creating(&config, clock.as_ref(), create)?;
        let db = open_database(&config, clock.as_ref()).await?;
        let now = crate::clock::rfc3339(clock.now());
        let installation_id = store::ensure_installation(&db, &now).await?;
        let audit = AuditLog::start(db.clone(), keys.clone(), clock.clone(), &config.audit)?;
        let identity = identity_service(&config, db.clone(), clock.clone(), keys.clone())?;
        let patients = Patients::new(
            db.clone(),
            keys.clone(),
            clock.clone(),
            config.keys.min_decryption_version,
        );
        // Name search tags for patients stored before they existed (once, after the
        // migration that added them; a no-op afterwards).
        let indexed = patients
            .build_name_terms()
            .await
            .context("building the name search index")?;
        if indexed > 0 {
            tracing::info!(patients = indexed, "name search index built");
        }
        let redis = match &secrets.redis_url {
            Some(url) => Some(
                redis::Client::open(url.expose())
                    .map_err(|_| anyhow::anyhow!("redis.url is not a valid Redis URL"))?,
            ),
            None => None,
        };
        let limiter = crate::ratelimit::Limiter::new(
            &config.rate_limit,
            redis.clone(),
            &installation_id,
            clock.clone(),
        );
        let security =
            crate::security::Security::new(db.clone(), clock.clone(), config.security.clone());
        audit.observe_with(security.clone());
        let fhir = crate::fhir::Fhir::new(
            db.clone(),
            keys.clone(),
            clock.clone(),
            patients.clone(),
            config.fhir.mrn_system.clone(),
        );
        audit.describe_with(Arc::new(crate::audit::middleware::AnyOf(vec![
            Arc::new(crate::records::routes::PhiSubjects(patients.clone())),
            Arc::new(crate::fhir::routes::FhirSubjects(fhir.clone())),
        ])));
        let oauth = crate::oauth::OAuth::new(
            db.clone(),
            clock.clone(),
            config.oauth.clone(),
            identity.clone(),
        );
        if config.oauth.builtin_app {
            let redirects: Vec<String> = match &config.smart.redirect_uri {
                Some(r) => vec![r.clone()],
                None => own_fhir_bases
                    .iter()
                    .map(|b| format!("{}/smart/callback", crate::oauth::routes::origin_of(b)))
                    .collect(),
            };
            if redirects.is_empty() {
                tracing::warn!(
                    "oauth.builtin_app: no address of this server is known (set fhir.base_url); the built-in app is not registered"
                );
            } else {
                oauth
                    .ensure_builtin(
                        &config.smart.client_id,
                        redirects,
                        Some("/smart/launch".into()),
                        &config.smart.scopes,
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("registering the built-in SMART app: {e}"))?;
            }
        }
        let smart = crate::smart::Smart::new(
            &config,
            secrets.smart_client_secret,
            db.clone(),
            keys.clone(),
            clock.clone(),
            identity.clone(),
        )?;
        let accounts = crate::accounts::Accounts::new(
            &config,
            secrets.smtp_password,
            db.clone(),
            keys.clone(),
            clock.clone(),
            identity.clone(),
        )?;
        Ok(Self {
            state: AppState {
                inner: Arc::new(Inner {
                    config: Arc::new(config),
                    db,
                    redis,
                    clock,
                    installation_id,
                    keys,
                    audit,
                    identity,
                    patients,
                    limiter,
                    metrics: crate::metrics::Metrics::new(secrets.metrics_token.as_ref()),
                    security,
                    smart,
                    accounts,
                    fhir,
                    oauth,
                    own_fhir_bases,
                }),
            },
        })
    }

    pub fn router(&self) -> Router {
        crate::routes::router(self.state.clone())
    }
}
