//! `presence-operator dev`'s live presence page: a small static file server
//! on its own loopback port, so the page's origin differs from every API's
//! and the browser really goes through CORS, as it would in production.
//!
//! It serves the files of one folder (`examples/web` by default) and a
//! generated `/config.json` naming every region's API. Only files inside
//! that folder are served: paths with `..`, hidden segments, or symlinks
//! leading out of the folder get `404`.

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the live page could not be served.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The folder to serve is missing or unreadable.
    #[error("cannot serve the live page from {dir}: {error}")]
    Dir { dir: String, error: std::io::Error },
    /// The port is taken (or not ours to bind).
    #[error("cannot listen on {addr} for the live page: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// `/config.json` could not be encoded (never expected).
    #[error("cannot encode the live page's config.json: {0}")]
    Config(#[from] serde_json::Error),
}

/// One region as the page lists it: its name and its API's base URL.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PageRegion {
    /// The region's name, shown in the page's region picker.
    pub name: String,
    /// The region's API, for example `http://127.0.0.1:8081`.
    pub api: String,
}

/// The `/config.json` the page reads at start:
/// `{"regions":[{"name":"center","api":"http://127.0.0.1:8080"},...]}`.
/// Generated, so the page never hard-codes ports.
pub fn config_json(regions: &[PageRegion]) -> Result<String, WebError> {
    #[derive(serde::Serialize)]
    struct Config<'a> {
        regions: &'a [PageRegion],
    }
    Ok(serde_json::to_string_pretty(&Config { regions })?)
}

/// The file a request path names, relative to the served folder, or `None`
/// when the path could leave the folder or names a hidden file. `/` and
/// paths ending in `/` name that folder's `index.html`. Percent-escapes
/// are decoded first, so `%2e%2e` is caught like `..`.
pub fn relative_file(uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(uri_path)?;
    let mut path = PathBuf::new();
    for segment in decoded.split('/') {
        if segment.is_empty() {
            continue;
        }
        // `..` and `.` move around; a leading dot also hides dotfiles
        // (`.git`, editor swap files). Backslashes and NUL never belong in
        // a name served here.
        if segment.starts_with('.') || segment.contains(['\\', '\0']) {
            return None;
        }
        path.push(segment);
    }
    if decoded.ends_with('/') || path.as_os_str().is_empty() {
        path.push("index.html");
    }
    Some(path)
}

/// `%XX` escapes decoded; `None` for a malformed escape or text that is
/// not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The `Content-Type` for a file, by its extension; browsers refuse
/// scripts and style sheets served with the wrong one.
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt" | "md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// What the server needs for every request.
struct Site {
    /// The served folder, canonical, so symlinks out of it are caught.
    root: PathBuf,
    config: String,
}

/// Serves `dir` and `/config.json` (from `regions`) on `addr` until the
/// process exits; returns the address it listens on.
pub async fn serve(
    addr: SocketAddr,
    dir: &Path,
    regions: &[PageRegion],
) -> Result<SocketAddr, WebError> {
    let root = std::fs::canonicalize(dir).map_err(|error| WebError::Dir {
        dir: dir.display().to_string(),
        error,
    })?;
    if !root.join("index.html").is_file() {
        return Err(WebError::Dir {
            dir: dir.display().to_string(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no index.html in it"),
        });
    }
    let site = Arc::new(Site {
        root,
        config: config_json(regions)?,
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| WebError::Listen { addr, error })?;
    let local = listener
        .local_addr()
        .map_err(|error| WebError::Listen { addr, error })?;
    let app = Router::new().fallback(move |method: Method, uri: Uri| {
        let site = site.clone();
        async move { respond(&site, &method, &uri).await }
    });
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "live page server stopped");
        }
    });
    Ok(local)
}

/// The answer to one request: `/config.json`, a file of the folder, or an
/// error status with a one-line text body.
async fn respond(site: &Site, method: &Method, uri: &Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
    }
    if uri.path() == "/config.json" {
        return file_response(site.config.clone().into_bytes(), "application/json");
    }
    let Some(relative) = relative_file(uri.path()) else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    let mut path = site.root.join(&relative);
    if path.is_dir() {
        path.push("index.html");
    }
    // The file must still be inside the folder once symlinks are resolved.
    let inside = tokio::fs::canonicalize(&path)
        .await
        .is_ok_and(|real| real.starts_with(&site.root));
    if !inside {
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => file_response(bytes, content_type(&path)),
        Err(_) => plain(StatusCode::NOT_FOUND, "not found"),
    }
}

fn file_response(bytes: Vec<u8>, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // A page being worked on shows each edit at the next reload.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        Body::from(bytes),
    )
        .into_response()
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_lists_every_region_in_order() {
        let regions = [
            PageRegion {
                name: "center".into(),
                api: "http://127.0.0.1:8080".into(),
            },
            PageRegion {
                name: "eu".into(),
                api: "http://127.0.0.1:8081".into(),
            },
        ];
        let parsed: serde_json::Value =
            serde_json::from_str(&config_json(&regions).unwrap()).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({"regions": [
                {"name": "center", "api": "http://127.0.0.1:8080"},
                {"name": "eu", "api": "http://127.0.0.1:8081"},
            ]})
        );
    }

    #[test]
    fn plain_paths_map_to_files_in_the_folder() {
        assert_eq!(relative_file("/"), Some(PathBuf::from("index.html")));
        assert_eq!(relative_file(""), Some(PathBuf::from("index.html")));
        assert_eq!(relative_file("/app.js"), Some(PathBuf::from("app.js")));
        assert_eq!(
            relative_file("/img//dot.svg"),
            Some(PathBuf::from("img/dot.svg"))
        );
        assert_eq!(
            relative_file("/img/"),
            Some(PathBuf::from("img/index.html"))
        );
        assert_eq!(relative_file("/a%20b.css"), Some(PathBuf::from("a b.css")));
    }

    #[test]
    fn paths_that_could_leave_the_folder_are_refused() {
        for bad in [
            "/..",
            "/../etc/passwd",
            "/img/../../secret",
            "/%2e%2e/secret",
            "/%2E%2E%2fsecret",
            "/./app.js",
            "/.git/config",
            "/..%5c..%5csecret",
            "/a%00.js",
            "/%zz",
            "/%2",
            "/%ff.js",
        ] {
            assert_eq!(relative_file(bad), None, "{bad}");
        }
    }

    #[test]
    fn content_types_match_what_browsers_require() {
        assert_eq!(
            content_type(Path::new("index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("app.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("STYLE.CSS")),
            "text/css; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.png")), "image/png");
        assert_eq!(
            content_type(Path::new("Makefile")),
            "application/octet-stream"
        );
    }

    #[tokio::test]
    async fn serves_files_and_config_but_nothing_outside_the_folder() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), "secret").unwrap();
        let web = outside.path().join("web");
        std::fs::create_dir(&web).unwrap();
        std::fs::write(web.join("index.html"), "<h1>page</h1>").unwrap();
        std::fs::write(web.join("app.js"), "let x = 1;").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), web.join("link.txt"))
            .unwrap();
        let site = Site {
            root: std::fs::canonicalize(&web).unwrap(),
            config: "{\"regions\":[]}".into(),
        };
        let get = |path: &str| {
            let uri: Uri = path.parse().unwrap();
            let site = &site;
            async move {
                let response = respond(site, &Method::GET, &uri).await;
                let status = response.status();
                let kind = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (status, kind, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let (status, kind, body) = get("/").await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "text/html; charset=utf-8")
        );
        assert_eq!(body, "<h1>page</h1>");
        let (status, kind, _) = get("/app.js").await;
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::OK, "text/javascript; charset=utf-8")
        );
        let (status, kind, body) = get("/config.json").await;
        assert_eq!(
            (status, kind.as_str(), body.as_str()),
            (StatusCode::OK, "application/json", "{\"regions\":[]}")
        );
        for path in [
            "/link.txt",
            "/../secret.txt",
            "/%2e%2e/secret.txt",
            "/missing.js",
        ] {
            assert_eq!(get(path).await.0, StatusCode::NOT_FOUND, "{path}");
        }
        let post = respond(&site, &Method::POST, &"/".parse().unwrap()).await;
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
