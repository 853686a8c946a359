//! `/releases/`: a release directory (made by `delegate-release publish`) served
//! read-only and unauthenticated, so a quick start needs no other web server for the
//! upgrader's channel.
//!
//! Anyone who can reach the manager can read here, so nothing outside the directory may
//! ever be served: `..` and empty segments are refused, and the resolved path (symlinks
//! followed) must still lie inside the resolved release directory — a link such as
//! `rel/pw -> /etc/passwd` answers 404. Links that stay inside (`latest.json ->
//! channels/stable.json`) work. Only regular files are served; there are no listings.

use std::path::{Component, Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use delegate_protocol::ErrorCode;
use tokio::io::AsyncReadExt;
use tracing::warn;

use crate::api::error::ApiError;

/// Bytes read from disk per body chunk.
const CHUNK: usize = 64 * 1024;

fn not_found(rel: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("no release file {rel:?}"),
    )
}

/// The file `rel` (a decoded URL path below `/releases/`) of the release directory
/// `root`, if it is a regular file inside it.
pub async fn resolve(root: &Path, rel: &str) -> Result<PathBuf, ApiError> {
    let rel_path = Path::new(rel);
    let plain = !rel.is_empty()
        && !rel.contains('\0')
        && rel_path
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(not_found(rel));
    }
    let root = tokio::fs::canonicalize(root).await.map_err(|e| {
        warn!("release directory {}: {e}", root.display());
        not_found(rel)
    })?;
    let path = tokio::fs::canonicalize(root.join(rel_path))
        .await
        .map_err(|_| not_found(rel))?;
    if !path.starts_with(&root) {
        warn!(
            "refusing release file {rel:?}: it resolves to {} outside the release directory \
             {} (a symlink leads out)",
            path.display(),
            root.display()
        );
        return Err(not_found(rel));
    }
    Ok(path)
}

/// Serve one file of the release directory.
pub async fn serve(root: &Path, rel: &str) -> Result<Response, ApiError> {
    let path = resolve(root, rel).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| not_found(rel))?;
    let meta = file.metadata().await.map_err(|_| not_found(rel))?;
    if !meta.is_file() {
        return Err(not_found(rel));
    }
    let kind = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("minisig" | "sig" | "txt" | "pub") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    };
    let stream = futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (header::CONTENT_LENGTH, HeaderValue::from(meta.len())),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
