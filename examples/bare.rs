//! The "bare handler" baseline for `bench/baseline.sh`.
//!
//! A minimal axum server with no middleware at all: `GET /` answers
//! `{"status":"ok"}` as JSON. Comparing it with `custodian`'s own `/health`
//! (same answer, full middleware stack) in the same session shows what the
//! middleware costs, independent of how fast the machine happens to be.
//!
//! Usage: `cargo run --release --example bare -- [ADDR]` (default `127.0.0.1:5099`).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const DEFAULT_ADDR: &str = "127.0.0.1:5099";

async fn root() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    eprintln!("bare: listening on http://{}", listener.local_addr()?);
    let app = Router::new().route("/", get(root));
    axum::serve(listener, app).await?;
    Ok(())
}
