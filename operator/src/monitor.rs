//! A minimal HTTP/1.0 GET for NATS monitoring endpoints and readiness
//! probes. The operator needs no general HTTP client beyond this.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest response body read (the `/leafz` of a big hub stays far below).
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

/// `GET path` on host:port: `(status, body)`, or `None` if nothing answered
/// within `limit`.
pub async fn get(host: &str, port: u16, path: &str, limit: Duration) -> Option<(u16, Vec<u8>)> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut response)
            .await
            .ok()?;
        let status = std::str::from_utf8(response.get(9..12)?)
            .ok()?
            .parse()
            .ok()?;
        let body_start = response.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        Some((status, response.split_off(body_start)))
    };
    tokio::time::timeout(limit, attempt).await.ok().flatten()
}

/// Status code of `GET path` on 127.0.0.1:port.
pub async fn status(port: u16, path: &str) -> Option<u16> {
    get("127.0.0.1", port, path, Duration::from_secs(2))
        .await
        .map(|(status, _)| status)
}

/// Names of the servers connected to a hub's leafnode listener, from its
/// monitoring endpoint; `None` when the hub can't be asked.
pub async fn connected_leaf_servers(host: &str, port: u16) -> Option<Vec<String>> {
    let (status, body) = get(host, port, "/leafz", Duration::from_secs(3)).await?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(
        json["leafs"]
            .as_array()
            .map(|leafs| {
                leafs
                    .iter()
                    .filter_map(|l| l["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    )
}
