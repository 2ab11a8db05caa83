//! The cached-read ceiling: the same JSON bytes a cached presence read
//! returns, from a bare axum handler with no auth and no cache, on the same
//! runtime setup as presence-service. Benchmark-only; never shipped.

use axum::Router;
use axum::http::header;
use axum::routing::get;

const BODY: &[u8] = br#"{"userID":"bench-user","status":"online","message":"benchmarking","lastSeen":"2026-01-01T00:00:00.000Z","updatedAt":"2026-01-01T00:00:00.000Z","nodeID":"center-1","revision":1}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(18090);
    let app = Router::new().route(
        "/api/v2/presence/{user_id}",
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], BODY) }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await
}
