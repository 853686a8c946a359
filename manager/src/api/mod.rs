//! The HTTP API v1, assembled: the shared state (`App`), the bearer-token extractors,
//! body reading with limits, and the router that puts the endpoints of `delegate`,
//! `admin` and `logs` together with `/healthz`, `/metrics` and `/releases/`.
//!
//! Handlers are thin: they check the token, read the body with a size limit, call one
//! store function and wake whoever waits for the change (see `hub`). Every failure,
//! including a bad query string, an oversized body and an unknown route, leaves as a
//! `protocol::ErrorBody` (see `error`) so agents and scripts never have to parse
//! plain-text errors.

mod admin;
mod delegate;
pub mod error;
mod logs;
#[cfg(test)]
mod testkit;

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use delegate_protocol::{API_PREFIX, ErrorCode};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

pub use self::error::ApiError;
use self::error::ApiResult;
use crate::auth;
use crate::error::StoreError;
use crate::hub::Hub;
use crate::store::{Store, now_ms};

/// Limit for the small JSON bodies delegates send (register, heartbeat, result).
const SMALL_BODY_LIMIT: usize = 256 * 1024;
/// How much of an oversized body is read (and dropped) before answering 413, so that the
/// client gets to read the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Everything a handler needs, shared by all of them.
pub struct AppInner {
    pub store: Store,
    pub hub: Hub,
    /// SHA-256 hex of the admin token, as it was at start (SQLite; PostgreSQL reads it
    /// at each request, see `AdminAuth`).
    pub admin_hash: String,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// Served read-only under `/releases/` when set.
    pub releases: Option<PathBuf>,
    /// A request body that makes no progress for this long is refused (408).
    pub idle_timeout: Duration,
    /// Finished tasks and their logs are deleted this long after they ended.
    pub retention: Option<Duration>,
    /// The database's counts for `/metrics`, shared by concurrent scrapes.
    pub scrapes: crate::metrics::ScrapeCache,
}

#[derive(Clone)]
pub struct App(Arc<AppInner>);

impl App {
    pub fn new(inner: AppInner) -> App {
        App(Arc::new(inner))
    }

    /// Run a store call on tokio's blocking pool: SQLite work (and the wait for the store's
    /// lock) must not stall the async workers that answer every other connection.
    pub async fn db<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let app = self.clone();
        tokio::task::spawn_blocking(move || f(&app.store))
            .await
            .map_err(|e| StoreError::Invalid(format!("a store call failed: {e}")))?
    }

    /// A handle that does not keep the app alive (for threads that outlive a server).
    pub fn downgrade(&self) -> std::sync::Weak<AppInner> {
        Arc::downgrade(&self.0)
    }

    pub fn upgrade(weak: &std::sync::Weak<AppInner>) -> Option<App> {
        weak.upgrade().map(App)
    }

    /// Wake one waiting poll for each task queued since the last call (see `hub`).
    pub fn wake_for_queued(&self) {
        for task in self.store.take_fresh() {
            self.hub.task_queued(task);
        }
    }
}

impl Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

fn token_of(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer)
}

const CREATE_TOKEN_HINT: &str = "create one with `delegate-manager token create --name NAME`";
const ADMIN_TOKEN_HINT: &str = "use the token in DATA_DIR/admin.token of the manager \
     (the CLI reads it with --data DIR, or takes --admin-token / DELEGATE_ADMIN_TOKEN)";

/// A request made with a live delegate token; `token_name` names that token.
pub struct DelegateAuth {
    pub token_name: String,
}

impl FromRequestParts<App> for DelegateAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> ApiResult<Self> {
        let Some(token) = token_of(parts) else {
            return Err(ApiError::unauthorized(format!(
                "missing `Authorization: Bearer <delegate token>` header; {CREATE_TOKEN_HINT}"
            )));
        };
        if token.starts_with(auth::ADMIN_PREFIX) {
            return Err(ApiError::unauthorized(format!(
                "this is the admin token; delegate endpoints need a delegate token; \
                 {CREATE_TOKEN_HINT}"
            )));
        }
        let hash = auth::hash_token(token);
        let name = match app.store.cached_token_name(&hash) {
            Some(name) => Some(name),
            None => app.db(move |s| s.token_name(&hash)).await?,
        };
        match name {
            Some(token_name) => Ok(DelegateAuth { token_name }),
            None => Err(ApiError::unauthorized(format!(
                "delegate token not recognised or revoked; {CREATE_TOKEN_HINT}"
            ))),
        }
    }
}

/// A request made with the admin token.
pub struct AdminAuth;

impl FromRequestParts<App> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> ApiResult<Self> {
        let Some(token) = token_of(parts) else {
            return Err(ApiError::unauthorized(format!(
                "missing `Authorization: Bearer <admin token>` header; {ADMIN_TOKEN_HINT}"
            )));
        };
        // Several nodes share one admin token, and any of them may rotate it: on
        // PostgreSQL the hash is read from the database at each request (one indexed
        // row), so a rotated token stops working on every node at once. One SQLite node
        // is the only writer of its hash and keeps it.
        let hash = if app.store.postgres().is_some() {
            app.db(|s| s.admin_hash()).await?.unwrap_or_default()
        } else {
            app.admin_hash.clone()
        };
        if auth::token_matches(token, &hash) {
            return Ok(AdminAuth);
        }
        let what = if token.starts_with(auth::DELEGATE_PREFIX) {
            "this is a delegate token; user endpoints need the admin token"
        } else {
            "admin token not recognised"
        };
        Err(ApiError::unauthorized(format!(
            "{what}; {ADMIN_TOKEN_HINT}"
        )))
    }
}

/// `Query` whose rejection is a JSON error.
struct Q<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Q(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "bad query string: {}",
                e.body_text()
            ))),
        }
    }
}

/// The one `{id}`/`{name}` segment of a route, with a JSON rejection.
struct P(String);

impl<S: Send + Sync> FromRequestParts<S> for P {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> ApiResult<Self> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(P(v)),
            Err(e) => Err(ApiError::bad_request(format!(
                "bad path: {}",
                e.body_text()
            ))),
        }
    }
}

/// Read a whole body, refusing (with 413) one larger than `limit`. Axum's own limit
/// answers in plain text, and the protocol promises JSON.
async fn read_body(app: &App, body: Body, limit: usize, what: &str) -> ApiResult<Bytes> {
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut seen = 0usize;
    let idle = app.idle_timeout;
    loop {
        let Ok(next) = tokio::time::timeout(idle, stream.next()).await else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::BadRequest,
                format!(
                    "the {what} body stalled: no byte for {}; send it whole",
                    humantime::format_duration(idle)
                ),
            ));
        };
        let Some(chunk) = next else { break };
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("cannot read the {what} body: {e}")))?;
        seen += chunk.len();
        if seen > limit {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::PayloadTooLarge,
            format!("{what} body is larger than the limit of {limit} bytes"),
        ));
    }
    Ok(buf.freeze())
}

async fn read_json<T: DeserializeOwned>(
    app: &App,
    body: Body,
    limit: usize,
    what: &str,
) -> ApiResult<T> {
    let bytes = read_body(app, body, limit, what).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("{what} body is not valid: {e}")))
}

/// The routes of API v1, `/healthz`, and `/releases/` when a release directory is set.
pub fn router(app: App) -> Router {
    let releases = app.releases.clone();
    let api = Router::new()
        .route("/delegates/register", post(delegate::register))
        .route("/delegates/{id}/heartbeat", post(delegate::heartbeat))
        .route("/delegates/{id}/acquire", post(delegate::acquire))
        .route("/delegates", get(admin::list_delegates))
        .route("/delegates/forget", post(admin::forget_delegate))
        .route("/tasks", post(admin::submit).get(admin::list_tasks))
        .route("/tasks/{id}", get(admin::show_task))
        .route("/tasks/{id}/started", post(delegate::started))
        .route(
            "/tasks/{id}/logs",
            post(delegate::append_log).get(logs::read_log),
        )
        .route("/tasks/{id}/result", post(delegate::result))
        .route("/tasks/{id}/cancel", post(admin::cancel))
        .route("/tokens", post(admin::create_token).get(admin::list_tokens))
        .route("/tokens/{name}/revoke", post(admin::revoke_token));
    let mut root = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .nest(API_PREFIX, api);
    if let Some(dir) = releases {
        // Static, read-only, no listing, nothing outside `dir` (see `releases`).
        let dir = Arc::new(dir);
        root = root.route(
            "/releases/{*path}",
            get(move |P(rel): P| {
                let dir = dir.clone();
                async move { crate::releases::serve(&dir, &rel).await }
            }),
        );
    }
    root.fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(app)
}

/// Prometheus scrape: counts and versions only, no token needed (see `metrics`). The
/// counts come from the shared cache, so scrapes cannot make the store scan its tables
/// more than about once a second.
async fn metrics(State(app): State<App>) -> ApiResult<Response> {
    let snap = app.scrapes.get(|| app.db(|s| s.snapshot(now_ms()))).await?;
    let text = app.store.metrics().render(&snap);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        text,
    )
        .into_response())
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("no endpoint {method} {uri}; see docs/protocol.md for the API v1 routes"),
    )
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        format!("{uri} does not take {method}; see docs/protocol.md for the API v1 routes"),
    )
}

#[cfg(test)]
mod tests {
    use crate::api::testkit::{TestServer, admin_token_file, bind_again, start};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_token_file_is_private_and_kept_across_restarts() {
        use std::os::unix::fs::PermissionsExt;
        let s = start().await;
        let path = admin_token_file(&s.data);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(s.admin.starts_with("adm_") && s.admin.len() == 68);
        let (data, admin) = (s.data.clone(), s.admin.clone());
        let TestServer {
            stop, handle, _dir, ..
        } = s;
        if let Some(tx) = stop {
            let _ = tx.send(());
        }
        handle.await.expect("join").expect("stop");
        // A restart on the same directory keeps the token.
        bind_again(&data).await;
        let again = std::fs::read_to_string(&path).expect("read");
        assert_eq!(again.trim(), admin);
    }

    #[tokio::test]
    async fn release_directory_is_served_read_only_and_nothing_outside_it() {
        let srv = start().await;
        let r = srv
            .http
            .get(format!("{}/releases/channels/stable.json", srv.base))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.expect("body"), "{\"version\":\"1.0.0\"}");
        for path in [
            "/releases/../data/admin.token",
            "/releases/%2e%2e/data/admin.token",
        ] {
            let r = srv
                .http
                .get(format!("{}{path}", srv.base))
                .send()
                .await
                .expect("get");
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            assert!(!body.contains("adm_"), "{path} leaked the admin token");
            assert_ne!(status, 200, "{path}");
        }
        let r = srv
            .http
            .post(format!("{}/releases/channels/stable.json", srv.base))
            .send()
            .await
            .expect("post");
        assert_ne!(r.status(), 200);
    }
}
