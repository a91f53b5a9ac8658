//! The test kit: a real server on port 0 against a fresh database.
//!
//! SQLite always; PostgreSQL (and Redis) when `TEST_DATABASE_URL` (and
//! `TEST_REDIS_URL`) are set. With `TEST_REQUIRE_POSTGRES=1` (set by `.ci/run`) a
//! missing `TEST_DATABASE_URL` fails the PostgreSQL variants instead of skipping them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use custodian::app::{App, AppState};
use custodian::clock::ManualClock;
use custodian::config::Loader;
use custodian::http::server::RunningServer;
use sqlx::Connection;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs a test body against both backends, as `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::support::Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::support::postgres_url().is_none() {
                    return;
                }
                super::$name($crate::support::Backend::Postgres).await;
            }
        }
    };
}

/// The PostgreSQL server to create test databases on, if any.
pub fn postgres_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("TEST_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "TEST_REQUIRE_POSTGRES=1 but TEST_DATABASE_URL is not set"
            );
            eprintln!("skipped: TEST_DATABASE_URL is not set");
            None
        }
    }
}

pub fn redis_url() -> Option<String> {
    std::env::var("TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A fresh, empty database, removed when dropped.
pub struct TestDb {
    pub url: String,
    pub backend: Backend,
    pg: Option<(String, String)>,
    pub dir: tempfile::TempDir,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Self {
                url: format!("sqlite://{}", dir.path().join("test.sqlite").display()),
                backend,
                pg: None,
                dir,
            },
            Backend::Postgres => {
                let admin = postgres_url().expect("TEST_DATABASE_URL");
                sqlx::any::install_default_drivers();
                let name = format!("cst_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::AnyConnection::connect(&admin).await.unwrap();
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.unwrap();
                Self {
                    url: with_database(&admin, &name),
                    backend,
                    pg: Some((admin, name)),
                    dir,
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin, name)) = self.pg.take() {
            // Drop needs async; use a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    if let Ok(mut conn) = sqlx::AnyConnection::connect(&admin).await {
                        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                            .execute(&mut conn)
                            .await;
                        let _ = conn.close().await;
                    }
                });
            })
            .join();
        }
    }
}

/// Replaces the database name in a PostgreSQL URL.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = &base[scheme_end..];
    let host = host_part.split('/').next().unwrap_or(host_part);
    let mut out = format!("{}{}/{}", &base[..scheme_end], host, name);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Options for a test server.
#[derive(Default)]
pub struct Options {
    /// `--set key=value` pairs on top of the test defaults.
    pub sets: Vec<(&'static str, String)>,
    /// Extra routes mounted behind the full middleware stack.
    pub extra: Option<Router<AppState>>,
    /// Do not attach Redis even when `TEST_REDIS_URL` is set.
    pub no_redis: bool,
    /// The environment (default `dev`). Outside dev the keyring must exist already.
    pub env: Option<&'static str>,
}

impl Options {
    /// Rate limits off: for tests that send as fast as the server answers and test
    /// something else.
    pub fn unlimited() -> Self {
        Self {
            sets: vec![("rate_limit.enabled", "false".into())],
            ..Self::default()
        }
    }
}

/// A running server and what a test needs to talk to it.
#[allow(dead_code)] // `clock` and `db` are for the tests of later capabilities
pub struct TestServer {
    pub base: String,
    pub client: reqwest::Client,
    pub state: AppState,
    pub clock: ManualClock,
    server: Option<RunningServer>,
    pub db: Arc<TestDb>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, Options::default()).await
    }

    pub async fn start_with(backend: Backend, opts: Options) -> Self {
        let db = Arc::new(TestDb::new(backend).await);
        Self::start_on(db, opts).await
    }

    /// Starts on an existing database (several servers may share one).
    pub async fn start_on(db: Arc<TestDb>, opts: Options) -> Self {
        custodian::http::tls::install_crypto_provider();
        let mut sets: Vec<(String, String)> = vec![
            ("data_dir".into(), db.path().display().to_string()),
            ("database.url".into(), db.url.clone()),
            ("server.listen".into(), "127.0.0.1:0".into()),
            ("server.shutdown_grace".into(), "5s".into()),
            // Light argon2 in tests (debug builds are slow); prod refuses these.
            ("password.hash_memory_kib".into(), "1024".into()),
            ("password.hash_iterations".into(), "1".into()),
        ];
        if db.backend == Backend::Postgres
            && !opts.no_redis
            && let Some(r) = redis_url()
        {
            sets.push(("redis.url".into(), r));
        }
        sets.extend(opts.sets.into_iter().map(|(k, v)| (k.to_owned(), v)));
        let config = Loader {
            env: Some(opts.env.unwrap_or("dev").into()),
            sets,
            ..Loader::default()
        }
        .load()
        .unwrap_or_else(|e| panic!("test configuration: {e}"));
        let mut config = config;
        // Bound first, as `serve` does, so that the server knows its own address.
        let listener = std::net::TcpListener::bind(config.server.listen).unwrap();
        config.server.listen = listener.local_addr().unwrap();
        let clock = ManualClock::new(custodian::clock::Clock::now(&custodian::clock::SystemClock));
        let app = App::build(config, Arc::new(clock.clone())).await.unwrap();
        let router =
            custodian::routes::router_with(app.state.clone(), opts.extra.unwrap_or_default());
        let server = RunningServer::spawn(router, listener, None, Duration::from_secs(5)).unwrap();
        let base = format!("http://{}", server.addr);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            base,
            client,
            state: app.state,
            clock,
            server: Some(server),
            db,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// Creates a user directly through the service; returns its id.
    pub async fn user(&self, username: &str, role: &str, password: &str) -> String {
        self.state
            .identity()
            .create_user(
                custodian::identity::Grantor::Operator,
                username,
                Some(&format!("{username}@example.org")),
                role,
                &custodian::config::Secret::new(password.into()),
            )
            .await
            .unwrap_or_else(|e| panic!("create {username}: {e:?}"))
            .id
    }

    /// Signs in and returns the session token.
    pub async fn login(&self, username: &str, password: &str) -> String {
        let res = self
            .post(
                "/api/v1/auth/login",
                None,
                serde_json::json!({"username": username, "password": password}),
            )
            .await;
        assert_eq!(res.status(), 200, "login {username}");
        json(res).await["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: serde_json::Value,
    ) -> reqwest::Response {
        let mut r = self.client.post(self.url(path)).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.unwrap()
    }

    pub async fn get_as(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn send_as(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let mut r = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }

    /// Stops the server gracefully (in-flight requests finish).
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await.unwrap();
        }
    }

    pub fn begin_stop(&self) {
        if let Some(s) = &self.server {
            s.begin_shutdown();
        }
    }
}

/// The path of the built binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_custodian"))
}

/// A `custodian` command with no `CUSTODIAN_*` variables from the outside, run in `dir`.
pub fn command(dir: &Path) -> std::process::Command {
    // Tests talk to what they start with reqwest, which needs the process's provider.
    custodian::http::tls::install_crypto_provider();
    let mut cmd = std::process::Command::new(binary());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CUSTODIAN_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir);
    cmd
}

/// Reads the JSON body of a response.
pub async fn json(res: reqwest::Response) -> serde_json::Value {
    let text = res.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
