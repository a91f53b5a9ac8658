//! Accepting connections (plain or TLS) and shutting down gracefully: on the signal the
//! listener closes, in-flight requests finish (up to `server.shutdown_grace`), then the
//! process exits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A server running in the background.
pub struct RunningServer {
    pub addr: SocketAddr,
    pub tls: bool,
    shutdown: watch::Sender<bool>,
    join: JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Starts serving `router` on `listener`.
    pub fn spawn(
        router: Router,
        listener: std::net::TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        grace: Duration,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(false);
        let make = router.into_make_service_with_connect_info::<SocketAddr>();
        let is_tls = tls.is_some();
        let join = match tls {
            None => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let mut stop = rx.clone();
                let serve = axum::serve(listener, make).with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|v| *v).await;
                });
                tokio::spawn(with_grace(serve.into_future(), rx, grace))
            }
            Some(cfg) => {
                let handle = axum_server::Handle::<SocketAddr>::new();
                let config = axum_server::tls_rustls::RustlsConfig::from_config(cfg);
                let server = axum_server::from_tcp_rustls(listener, config)?.handle(handle.clone());
                let mut stop = rx;
                tokio::spawn(async move {
                    tokio::spawn(async move {
                        let _ = stop.wait_for(|v| *v).await;
                        handle.graceful_shutdown(Some(grace));
                    });
                    server.serve(make).await
                })
            }
        };
        Ok(Self {
            addr,
            tls: is_tls,
            shutdown: tx,
            join,
        })
    }

    /// Asks the server to stop accepting and finish what it has.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Stops and waits until every connection is done (or the grace period is over).
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.begin_shutdown();
        self.wait().await
    }

    /// Waits for the server to end.
    pub async fn wait(self) -> std::io::Result<()> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    /// A handle that can trigger shutdown from elsewhere (a signal task).
    pub fn shutdown_trigger(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Runs `serve`; once shutdown is asked for, gives it `grace` to finish.
async fn with_grace<F>(
    serve: F,
    mut rx: watch::Receiver<bool>,
    grace: Duration,
) -> std::io::Result<()>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r,
        _ = async {
            let _ = rx.wait_for(|v| *v).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(grace = ?grace, "shutdown grace period over; closing the remaining connections");
            Ok(())
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
