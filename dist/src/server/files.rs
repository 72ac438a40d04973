//! The repository as static files: what any web server or CDN would serve, plus ETags,
//! correct content types, and nothing outside the tree or hidden.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;
use tower_http::services::ServeDir;

use super::AppState;
use super::error::ApiError;

/// The file a request path names inside the repository, or `None` for anything that
/// could leave it or names a hidden file (lock and temporary files start with a dot).
fn repo_file(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path).decode_utf8().ok()?;
    let mut out = root.to_path_buf();
    for c in Path::new(decoded.as_ref()).components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) if !n.to_string_lossy().starts_with('.') => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("toml" | "sig") => "application/toml",
        Some("zst") => "application/zstd",
        _ => "application/octet-stream",
    }
}

pub async fn serve(State(state): State<Arc<AppState>>, req: Request) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method",
            "the repository is read-only (GET, HEAD)",
        )
        .into_response();
    }
    let root = state.repo.root().to_path_buf();
    let Some(path) = repo_file(&root, req.uri().path()) else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such file").into_response();
    };
    let meta = match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => m,
        _ => return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such file").into_response(),
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let etag = format!("\"{:x}-{:x}\"", meta.len(), mtime);
    if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let mut resp = match ServeDir::new(&root).oneshot(req).await {
        Ok(r) => r.map(Body::new),
        Err(never) => match never {},
    };
    if resp.status().is_success() {
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&path)));
        if let Ok(v) = HeaderValue::from_str(&etag) {
            h.insert(header::ETAG, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_and_visible() {
        let root = Path::new("/repo");
        assert_eq!(
            repo_file(root, "/channels/stable/manifest.toml"),
            Some(PathBuf::from("/repo/channels/stable/manifest.toml"))
        );
        for bad in [
            "/../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/channels/../../x",
            "/.atom-publish.lock",
            "/objects/.x.tmp1",
            "/%ff",
        ] {
            assert_eq!(repo_file(root, bad), None, "{bad}");
        }
    }
}
