//! The HTTP API v1: routes, bearer-token extractors, handlers and JSON errors.
//!
//! Handlers are thin: they check the token, read the body with a size limit, call one
//! store function and wake whoever waits for the change (see `hub`). Every failure,
//! including a bad query string, an oversized body and an unknown route, leaves as a
//! `protocol::ErrorBody` so agents and scripts never have to parse plain-text errors.

use std::convert::Infallible;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::BytesMut;
use delegate_protocol::{
    API_PREFIX, AcquireQuery, AttemptQuery, CreateToken, CreatedToken, DEFAULT_TASK_TIMEOUT_SECS,
    DelegateView, ErrorBody, ErrorCode, ErrorDetail, ForgetDelegate, ForgottenDelegate,
    HeartbeatRequest, HeartbeatResponse, ListTasksQuery, LogAck, LogQuery, MAX_ACQUIRE_WAIT_SECS,
    MAX_LOG_CHUNK_BYTES, MAX_RETRIES, MAX_SUBMIT_BYTES, MAX_TASK_TIMEOUT_SECS, RegisterRequest,
    RegisterResponse, SubmitResponse, SubmitTask, TaskResult, TaskSpec, TaskView, TokenView,
};
use futures_util::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::auth;
use crate::error::StoreError;
use crate::hub::{self, Hub};
use crate::store::{self, Cancel, Finish, Store, now_ms};

/// Limit for the small JSON bodies delegates send (register, heartbeat, result).
const SMALL_BODY_LIMIT: usize = 256 * 1024;
/// Most tasks one acquire may lease.
const MAX_ACQUIRE_BATCH: u32 = 100;
/// Task list size when the query names none, and the most it may ask for.
const DEFAULT_LIST_LIMIT: u32 = 100;
const MAX_LIST_LIMIT: u32 = 10_000;
/// Largest piece of a log read from the store and sent at once (reads and follows).
const LOG_PAGE: usize = MAX_LOG_CHUNK_BYTES;
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

/// An error answer: HTTP status plus the protocol's error body.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code,
                    message: message.into(),
                    expected_offset: None,
                },
            },
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    fn invalid_spec(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidSpec, message)
    }

    fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let code = e.code();
        let status = match (&e, code) {
            (StoreError::TokenExists(_), _) => StatusCode::CONFLICT,
            (_, ErrorCode::NotFound) => StatusCode::NOT_FOUND,
            (_, ErrorCode::Unauthorized) => StatusCode::UNAUTHORIZED,
            (_, ErrorCode::TagsNotAllowed) => StatusCode::FORBIDDEN,
            (_, ErrorCode::BadRequest) => StatusCode::BAD_REQUEST,
            (_, ErrorCode::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::CONFLICT,
        };
        let text = crate::error::chain(&e);
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            error!("{text}");
        }
        let mut err = ApiError::new(status, code, text);
        if let StoreError::LogGap { expected, .. } = e {
            err.body.error.expected_offset = Some(expected);
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

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
        .route("/delegates/register", post(register))
        .route("/delegates/{id}/heartbeat", post(heartbeat))
        .route("/delegates/{id}/acquire", post(acquire))
        .route("/delegates", get(list_delegates))
        .route("/delegates/forget", post(forget_delegate))
        .route("/tasks", post(submit).get(list_tasks))
        .route("/tasks/{id}", get(show_task))
        .route("/tasks/{id}/started", post(started))
        .route("/tasks/{id}/logs", post(append_log).get(read_log))
        .route("/tasks/{id}/result", post(result))
        .route("/tasks/{id}/cancel", post(cancel))
        .route("/tokens", post(create_token).get(list_tokens))
        .route("/tokens/{name}/revoke", post(revoke_token));
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

// ---- delegate endpoints ---------------------------------------------------------------

async fn register(
    State(app): State<App>,
    auth: DelegateAuth,
    body: Body,
) -> ApiResult<Json<RegisterResponse>> {
    let req: RegisterRequest = read_json(&app, body, SMALL_BODY_LIMIT, "register").await?;
    // What it registers is shown in operators' tables: no escape sequences (issue 17).
    crate::text::check_register(&req)
        .map_err(|e| ApiError::bad_request(format!("register: {e}")))?;
    let token = auth.token_name.clone();
    let (id, req) = app
        .db(move |s| Ok((s.register(&token, &req, now_ms())?, req)))
        .await?;
    info!(
        delegate_id = %id, name = %req.name, hostname = %req.hostname,
        version = %req.version, token = %auth.token_name, "delegate registered"
    );
    Ok(Json(RegisterResponse {
        delegate_id: id,
        heartbeat_interval_secs: app.heartbeat_interval.as_secs().max(1),
        lease_ttl_secs: app.lease_ttl.as_secs().max(1),
    }))
}

async fn heartbeat(
    State(app): State<App>,
    auth: DelegateAuth,
    P(id): P,
    body: Body,
) -> ApiResult<Json<HeartbeatResponse>> {
    let req: HeartbeatRequest = read_json(&app, body, SMALL_BODY_LIMIT, "heartbeat").await?;
    let draining = crate::store::is_draining(req.state.as_str());
    let (token, delegate) = (auth.token_name, id.clone());
    let resp = app
        .db(move |s| s.heartbeat(&token, &delegate, &req, now_ms()))
        .await?;
    if draining {
        // End this delegate's long poll now, so it takes nothing new while draining.
        app.hub.wake_delegate(&id);
    }
    if !resp.revoked.is_empty() {
        debug!(delegate_id = %id, revoked = ?resp.revoked, "heartbeat named tasks it no longer holds");
    }
    Ok(Json(resp))
}

/// Long poll: lease tasks or hand out cancellations, else wait for a wake-up until `wait`
/// runs out (204). While it waits the poll is registered in the hub under its delegate's
/// tags, so only a task it may take (or a cancel or drain of its own) wakes it.
async fn acquire(
    State(app): State<App>,
    auth: DelegateAuth,
    P(id): P,
    Q(q): Q<AcquireQuery>,
) -> ApiResult<Response> {
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(q.wait.min(MAX_ACQUIRE_WAIT_SECS));
    let max = q.max.min(MAX_ACQUIRE_BATCH);
    // A long poll holds a connection slot while it waits: one per delegate (this one ends
    // an older one), a bounded number per token.
    let ticket = match app.hub.open_poll(&auth.token_name, &id) {
        Ok(t) => t,
        Err(e) => {
            warn!(delegate_id = %id, "{e}");
            return Ok(too_many_polls(e));
        }
    };
    let mut shutdown = app.hub.subscribe_shutdown();
    let delegate = id.clone();
    let tags = match app.store.cached_delegate_tags(&id) {
        Some(tags) => Some(tags),
        None => app.db(move |s| s.delegate_tags(&delegate)).await?,
    };
    let Some(tags) = tags else {
        return Err(StoreError::DelegateNotFound(id).into());
    };
    // A task the hub handed to this poll: looked at first on the next pass.
    let mut prefer: Option<String> = None;
    loop {
        // Registered before the look at the database, so a submit in between still wakes us.
        let waiter = app.hub.register(&id, &tags, max > 0);
        app.hub.looked();
        let (token, delegate, handed) = (auth.token_name.clone(), id.clone(), prefer.take());
        let got = app
            .db(move |s| {
                let got = s.acquire(&token, &delegate, max, now_ms(), handed.as_deref())?;
                let draining = max > 0 && got.tasks.is_empty() && s.delegate_draining(&delegate)?;
                Ok((got, draining))
            })
            .await;
        // A task handed to an earlier pass and left queued goes to another poll.
        app.wake_for_queued();
        let (got, draining) = got?;
        if !got.tasks.is_empty() || !got.cancel.is_empty() {
            if !got.tasks.is_empty() {
                app.hub.changed();
                debug!(delegate_id = %id, tasks = got.tasks.len(), "leased tasks");
            }
            return Ok(Json(got).into_response());
        }
        if *shutdown.borrow() || draining {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let _waiting = app.hub.waiting();
        tokio::select! {
            _ = waiter.woken() => {
                prefer = waiter.take_handoff().map(|f| f.task);
            }
            _ = tokio::time::sleep_until(deadline) => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            _ = hub::stopping(&mut shutdown) => {
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
            _ = ticket.replaced() => {
                // The delegate polls again elsewhere: this connection is one it left.
                return Ok(StatusCode::NO_CONTENT.into_response());
            }
        }
    }
}

/// 429 for a poll over its token's limit, closing the connection so that the refused
/// client does not keep the slot either.
fn too_many_polls(e: hub::TooManyPolls) -> Response {
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyPolls,
        e.to_string(),
    )
    .into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

async fn started(
    State(app): State<App>,
    auth: DelegateAuth,
    P(id): P,
    Q(q): Q<AttemptQuery>,
) -> ApiResult<Json<TaskView>> {
    let token = auth.token_name;
    let view = app
        .db(move |s| s.started(&token, &id, q.attempt, now_ms()))
        .await?;
    app.hub.changed();
    Ok(Json(view))
}

async fn append_log(
    State(app): State<App>,
    auth: DelegateAuth,
    P(id): P,
    Q(q): Q<AttemptQuery>,
    body: Body,
) -> ApiResult<Json<LogAck>> {
    let Some(offset) = q.offset else {
        return Err(ApiError::bad_request(
            "log chunk without `offset`; send ?attempt=N&offset=BYTES",
        ));
    };
    let data = read_body(&app, body, MAX_LOG_CHUNK_BYTES, "log chunk").await?;
    let len = data.len() as u64;
    let token = auth.token_name;
    let stored = app
        .db(move |s| s.append_log(&token, &id, q.attempt, offset, &data))
        .await?;
    if offset + len >= stored && len > 0 {
        app.hub.changed();
    }
    Ok(Json(LogAck { stored }))
}

async fn result(
    State(app): State<App>,
    auth: DelegateAuth,
    P(id): P,
    Q(q): Q<AttemptQuery>,
    body: Body,
) -> ApiResult<Json<TaskView>> {
    let res: TaskResult = read_json(&app, body, SMALL_BODY_LIMIT, "result").await?;
    let (token, task) = (auth.token_name, id.clone());
    let (view, effect) = app
        .db(move |s| s.finish(&token, &task, q.attempt, &res, now_ms()))
        .await?;
    if effect == Finish::Requeued {
        info!(task_id = %id, attempt = q.attempt, "attempt reported lost; task re-queued");
        app.wake_for_queued();
    } else {
        debug!(task_id = %id, state = %view.state, "task finished");
    }
    app.hub.changed();
    Ok(Json(view))
}

// ---- user endpoints -------------------------------------------------------------------

/// A submission as it arrives, before the spec is checked: parsing `kind` and `spec`
/// ourselves gives messages that name the known kinds and the bad field.
#[derive(Deserialize)]
struct RawSubmit {
    kind: String,
    spec: serde_json::Value,
    #[serde(default)]
    selectors: Vec<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    retries: u32,
}

fn validate_submit(raw: RawSubmit) -> ApiResult<(SubmitTask, u64)> {
    let spec = TaskSpec::from_wire(&raw.kind, &raw.spec)
        .map_err(|e| ApiError::invalid_spec(e.to_string()))?;
    let timeout = raw.timeout_secs.unwrap_or(DEFAULT_TASK_TIMEOUT_SECS);
    if !(1..=MAX_TASK_TIMEOUT_SECS).contains(&timeout) {
        return Err(ApiError::invalid_spec(format!(
            "timeout_secs: {timeout} is out of range; give 1 to {MAX_TASK_TIMEOUT_SECS} seconds"
        )));
    }
    if raw.retries > MAX_RETRIES {
        return Err(ApiError::invalid_spec(format!(
            "retries: {} is more than the limit of {MAX_RETRIES}",
            raw.retries
        )));
    }
    if let Some(bad) = raw
        .selectors
        .iter()
        .find(|s| s.is_empty() || s.contains(|c: char| c == ',' || c.is_whitespace()))
    {
        return Err(ApiError::invalid_spec(format!(
            "selectors: {bad:?} is not a tag; give non-empty tags without spaces or commas"
        )));
    }
    let task = SubmitTask {
        spec,
        selectors: raw.selectors,
        timeout_secs: Some(timeout),
        retries: raw.retries,
    };
    Ok((task, timeout))
}

async fn submit(
    State(app): State<App>,
    _: AdminAuth,
    body: Body,
) -> ApiResult<(StatusCode, Json<SubmitResponse>)> {
    let bytes = read_body(&app, body, MAX_SUBMIT_BYTES, "task submission").await?;
    let raw: RawSubmit = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid_spec(format!("task submission: {e}")))?;
    let (task, timeout) = validate_submit(raw)?;
    let id = store::new_task_id();
    let kind = task.spec.kind();
    let task_id = id.clone();
    app.db(move |s| s.submit(&task_id, &task, timeout, now_ms()))
        .await?;
    app.wake_for_queued();
    debug!(task_id = %id, kind, "task queued");
    Ok((StatusCode::CREATED, Json(SubmitResponse { task_id: id })))
}

async fn show_task(State(app): State<App>, _: AdminAuth, P(id): P) -> ApiResult<Json<TaskView>> {
    Ok(Json(app.db(move |s| s.task(&id)).await?))
}

async fn list_tasks(
    State(app): State<App>,
    _: AdminAuth,
    Q(q): Q<ListTasksQuery>,
) -> ApiResult<Json<Vec<TaskView>>> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT);
    Ok(Json(app.db(move |s| s.list_tasks(q.state, limit)).await?))
}

fn text_headers() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
}

async fn read_log(
    State(app): State<App>,
    _: AdminAuth,
    P(id): P,
    Q(q): Q<LogQuery>,
) -> ApiResult<Response> {
    // Read the first page now so a missing task is a JSON 404 rather than an empty stream.
    let task = id.clone();
    let first = app
        .db(move |s| s.read_log(&task, q.offset, LOG_PAGE))
        .await?;
    let reader = LogReader {
        changes: app.hub.subscribe_changes(),
        shutdown: app.hub.subscribe_shutdown(),
        app,
        id,
        offset: q.offset + first.data.len() as u64,
        attempt: first.attempt,
        first: (!first.data.is_empty()).then(|| Bytes::from(first.data)),
        follow: q.follow,
    };
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        r.next_page().await.map(|b| (Ok::<Bytes, Infallible>(b), r))
    });
    Ok((text_headers(), Body::from_stream(stream)).into_response())
}

/// Sends a log one page at a time, reading the next page only when the client took the
/// last one: the manager holds one page per reader, whatever the log's size. Without
/// `follow` it ends at the end of what is stored; with it, it waits for more whenever the
/// hub says something changed, and ends once the task is finished and every byte was sent.
struct LogReader {
    app: App,
    id: String,
    offset: u64,
    attempt: u32,
    first: Option<Bytes>,
    follow: bool,
    changes: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

impl LogReader {
    async fn next_page(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            self.changes.borrow_and_update();
            let (id, offset) = (self.id.clone(), self.offset);
            let slice = match self
                .app
                .db(move |s| s.read_log(&id, offset, LOG_PAGE))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(task_id = %self.id, "log reader stops: {}", crate::error::chain(&e));
                    return None;
                }
            };
            if slice.attempt != self.attempt {
                if !self.follow {
                    // Re-queued while being read: this attempt's log is gone.
                    return None;
                }
                // Re-queued: the new attempt's log starts at byte 0.
                self.attempt = slice.attempt;
                self.offset = 0;
                return Some(Bytes::from(format!(
                    "\n[delegate-manager] task re-queued; log of attempt {} follows\n",
                    slice.attempt
                )));
            }
            if !slice.data.is_empty() {
                self.offset += slice.data.len() as u64;
                return Some(Bytes::from(slice.data));
            }
            if !self.follow || (slice.state.is_terminal() && self.offset >= slice.stored) {
                return None;
            }
            tokio::select! {
                r = self.changes.changed() => if r.is_err() { return None },
                _ = hub::stopping(&mut self.shutdown) => return None,
            }
        }
    }
}

async fn cancel(State(app): State<App>, _: AdminAuth, P(id): P) -> ApiResult<Json<TaskView>> {
    let task = id.clone();
    let (view, effect) = app.db(move |s| s.cancel(&task, now_ms())).await?;
    if effect == Cancel::Requested
        && let Some(holder) = &view.delegate_id
    {
        // The holder's long poll hands the cancellation out.
        app.hub.wake_delegate(holder);
    }
    app.hub.changed();
    info!(task_id = %id, state = %view.state, "cancel requested");
    Ok(Json(view))
}

async fn list_delegates(
    State(app): State<App>,
    _: AdminAuth,
) -> ApiResult<Json<Vec<DelegateView>>> {
    Ok(Json(app.db(|s| s.list_delegates(now_ms())).await?))
}

async fn create_token(
    State(app): State<App>,
    _: AdminAuth,
    body: Body,
) -> ApiResult<Json<CreatedToken>> {
    let req: CreateToken = read_json(&app, body, SMALL_BODY_LIMIT, "create token").await?;
    let token = auth::new_delegate_token();
    let hash = auth::hash_token(&token);
    let (name, tags) = (req.name.clone(), req.tags.clone());
    app.db(move |s| s.create_token(&name, &hash, tags.as_deref(), now_ms()))
        .await?;
    info!(name = %req.name, tags = ?req.tags, "delegate token created");
    Ok(Json(CreatedToken {
        name: req.name,
        token,
    }))
}

async fn list_tokens(State(app): State<App>, _: AdminAuth) -> ApiResult<Json<Vec<TokenView>>> {
    Ok(Json(app.db(|s| s.list_tokens()).await?))
}

async fn revoke_token(
    State(app): State<App>,
    _: AdminAuth,
    P(name): P,
) -> ApiResult<Json<TokenView>> {
    let revoked = name.clone();
    let view = app.db(move |s| s.revoke_token(&revoked, now_ms())).await?;
    info!(name = %name, "delegate token revoked; the delegate names it held are free");
    // Its open long polls look again and get 401; tasks it held may be queued again.
    app.hub.wake_all();
    app.wake_for_queued();
    app.hub.changed();
    Ok(Json(view))
}

async fn forget_delegate(
    State(app): State<App>,
    _: AdminAuth,
    body: Body,
) -> ApiResult<Json<ForgottenDelegate>> {
    let req: ForgetDelegate = read_json(&app, body, SMALL_BODY_LIMIT, "forget delegate").await?;
    let gone = app
        .db(move |s| s.forget_delegate(&req.name, req.hostname.as_deref(), now_ms()))
        .await?;
    info!(
        delegate_id = %gone.id, name = %gone.name, hostname = %gone.hostname,
        token = %gone.token_name, released_tasks = gone.released_tasks,
        "delegate forgotten; its name is free"
    );
    app.hub.wake_delegate(&gone.id);
    app.wake_for_queued();
    app.hub.changed();
    Ok(Json(gone))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use delegate_protocol::{AcquireResponse, ErrorCode, Outcome};
    use serde_json::json;
    use tokio::sync::oneshot;

    use super::*;
    use crate::error::ServeError;
    use crate::server::{self, ADMIN_TOKEN_FILE, ServeConfig};

    struct TestServer {
        base: String,
        admin: String,
        http: reqwest::Client,
        stop: Option<oneshot::Sender<()>>,
        handle: tokio::task::JoinHandle<Result<(), ServeError>>,
        data: std::path::PathBuf,
        app: App,
        _dir: tempfile::TempDir,
    }

    async fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let releases = dir.path().join("releases");
        std::fs::create_dir_all(releases.join("channels")).expect("releases dir");
        std::fs::write(
            releases.join("channels/stable.json"),
            b"{\"version\":\"1.0.0\"}",
        )
        .expect("manifest");
        let cfg = ServeConfig {
            releases: Some(releases),
            ..ServeConfig::new("127.0.0.1:0".parse().expect("addr"), data.clone())
        };
        let server = server::bind(&cfg).await.expect("bind");
        let base = format!("http://{}", server.local_addr());
        let app = server.app();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        let admin = std::fs::read_to_string(data.join(ADMIN_TOKEN_FILE))
            .expect("admin token")
            .trim()
            .to_string();
        TestServer {
            base,
            admin,
            http: reqwest::Client::new(),
            stop: Some(tx),
            handle,
            data,
            app,
            _dir: dir,
        }
    }

    impl TestServer {
        fn url(&self, path: &str) -> String {
            format!("{}{API_PREFIX}{path}", self.base)
        }

        async fn admin_post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
            self.http
                .post(self.url(path))
                .bearer_auth(&self.admin)
                .json(&body)
                .send()
                .await
                .expect("send")
        }

        /// A delegate token and a registered delegate id.
        async fn delegate(&self, name: &str, tags: &[&str]) -> (String, String) {
            let created: CreatedToken = self
                .admin_post("/tokens", json!({ "name": name }))
                .await
                .json()
                .await
                .expect("token");
            let reg: RegisterResponse = self
                .http
                .post(self.url("/delegates/register"))
                .bearer_auth(&created.token)
                .json(&json!({
                    "name": name, "hostname": "h", "version": "0.1.0",
                    "tags": tags, "capacity": 2
                }))
                .send()
                .await
                .expect("register")
                .json()
                .await
                .expect("register answer");
            (created.token, reg.delegate_id)
        }

        /// Wait until `n` long polls are waiting for a wake-up (the premise of a wake-up
        /// test: a poll that has not started waiting proves nothing).
        async fn polls_waiting(&self, n: usize) {
            let t0 = Instant::now();
            while self.app.hub.waiting_polls() < n {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "no long poll started waiting within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }

        async fn stop(mut self) {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            let res = tokio::time::timeout(Duration::from_secs(5), self.handle)
                .await
                .expect("server stops within 5 s")
                .expect("join");
            res.expect("clean stop");
        }
    }

    async fn error_of(resp: reqwest::Response) -> (u16, ErrorBody) {
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("JSON error body"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_poll_wakes_on_submit_and_task_runs_through() {
        let s = start().await;
        let (token, id) = s.delegate("d1", &["linux"]).await;
        let http = s.http.clone();
        let url = s.url(&format!("/delegates/{id}/acquire?wait=20&max=1"));
        let tok = token.clone();
        let poll = tokio::spawn(async move {
            let t0 = Instant::now();
            let resp = http
                .post(url)
                .bearer_auth(tok)
                .send()
                .await
                .expect("acquire");
            (
                resp.status().as_u16(),
                resp.bytes().await.expect("body"),
                t0.elapsed(),
            )
        });
        s.polls_waiting(1).await;
        let resp = s
            .admin_post(
                "/tasks",
                json!({"kind": "shell", "spec": {"script": "echo hi"}, "selectors": ["linux"]}),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201);
        let task: SubmitResponse = resp.json().await.expect("submit answer");
        let (status, body, took) = poll.await.expect("join");
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(3), "long poll took {took:?}");
        let got: AcquireResponse = serde_json::from_slice(&body).expect("acquire answer");
        assert_eq!(got.tasks[0].task_id, task.task_id);
        let attempt = got.tasks[0].attempt;
        let tid = &task.task_id;

        // A follower started now gets every byte and ends with the task.
        let follow = s
            .http
            .get(s.url(&format!("/tasks/{tid}/logs?follow=true")))
            .bearer_auth(&s.admin)
            .send()
            .await
            .expect("follow");
        assert_eq!(follow.status().as_u16(), 200);
        let follower = tokio::spawn(async move { follow.bytes().await.expect("stream") });

        let post = |path: String, body: reqwest::Body| {
            s.http
                .post(s.url(&path))
                .bearer_auth(&token)
                .body(body)
                .send()
        };
        let r = post(format!("/tasks/{tid}/started?attempt={attempt}"), "".into())
            .await
            .expect("started");
        assert_eq!(r.status().as_u16(), 200);
        let ack: LogAck = post(
            format!("/tasks/{tid}/logs?attempt={attempt}&offset=0"),
            "hi\n".into(),
        )
        .await
        .expect("log")
        .json()
        .await
        .expect("ack");
        assert_eq!(ack.stored, 3);
        let (status, gap) = error_of(
            post(
                format!("/tasks/{tid}/logs?attempt={attempt}&offset=9"),
                "x".into(),
            )
            .await
            .expect("log"),
        )
        .await;
        assert_eq!(status, 409);
        assert_eq!(gap.error.code, ErrorCode::LogGap);
        assert_eq!(gap.error.expected_offset, Some(3));
        let ack: LogAck = post(
            format!("/tasks/{tid}/logs?attempt={attempt}&offset=3"),
            "bye\n".into(),
        )
        .await
        .expect("log")
        .json()
        .await
        .expect("ack");
        assert_eq!(ack.stored, 7);
        let result = serde_json::to_vec(&TaskResult {
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            message: None,
            log_bytes: 7,
        })
        .expect("json");
        let view: TaskView = post(
            format!("/tasks/{tid}/result?attempt={attempt}"),
            result.clone().into(),
        )
        .await
        .expect("result")
        .json()
        .await
        .expect("view");
        assert_eq!(view.state, delegate_protocol::TaskState::Succeeded);
        let streamed = tokio::time::timeout(Duration::from_secs(5), follower)
            .await
            .expect("follower ends with the task")
            .expect("join");
        assert_eq!(&streamed[..], b"hi\nbye\n");
        s.stop().await;
    }

    /// Issue 12: every submit woke every waiting poll, which each looked at the queue, so
    /// the cost of a pick-up grew with the number of idle delegates.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_submit_wakes_one_poll_that_may_take_it_not_every_poll() {
        let s = start().await;
        let mut polls = tokio::task::JoinSet::new();
        let mut ask = |token: String, id: String| {
            let req = s
                .http
                .post(s.url(&format!("/delegates/{id}/acquire?wait=20")))
                .bearer_auth(token)
                .send();
            polls.spawn(async move {
                let r = req.await.expect("acquire");
                (id, r.status().as_u16(), r.bytes().await.expect("body"))
            });
        };
        const PLAIN: usize = 20;
        for i in 0..PLAIN {
            let (token, id) = s.delegate(&format!("plain{i}"), &[]).await;
            ask(token, id);
        }
        s.polls_waiting(PLAIN).await;
        // The GPU delegate waits the shortest time, yet only it may take a GPU task.
        let (token, gpu) = s.delegate("gpu", &["gpu"]).await;
        ask(token, gpu.clone());
        s.polls_waiting(PLAIN + 1).await;
        let before = s.app.hub.looks();
        let r = s
            .admin_post(
                "/tasks",
                json!({"kind": "shell", "spec": {"script": "x"}, "selectors": ["gpu"]}),
            )
            .await;
        assert_eq!(r.status().as_u16(), 201);
        let (who, status, body) = polls.join_next().await.expect("a poll").expect("join");
        assert_eq!((who.as_str(), status), (gpu.as_str(), 200));
        let got: AcquireResponse = serde_json::from_slice(&body).expect("acquire answer");
        assert_eq!(got.tasks.len(), 1);
        s.polls_waiting(PLAIN).await;
        assert_eq!(
            s.app.hub.looks() - before,
            1,
            "one poll looked at the queue for one task"
        );
        // A task any delegate may take wakes one of the plain polls, and only one.
        let before = s.app.hub.looks();
        s.admin_post("/tasks", json!({"kind": "shell", "spec": {"script": "x"}}))
            .await;
        let (_, status, _) = polls.join_next().await.expect("a poll").expect("join");
        assert_eq!(status, 200);
        s.polls_waiting(PLAIN - 1).await;
        assert_eq!(s.app.hub.looks() - before, 1);
        assert_eq!(s.app.hub.waiting_polls(), PLAIN - 1);
        polls.abort_all();
        s.stop().await;
    }

    /// A full agent polls with `max=0` for cancellations only: handing it a task made it
    /// look at the queue for nothing (and, when it was the only delegate with the task's
    /// tags, hand the task back to itself until its poll ran out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poll_that_asks_for_no_task_is_not_woken_by_one() {
        let s = start().await;
        let (full_token, full) = s.delegate("full", &[]).await;
        let full_poll = s
            .http
            .post(s.url(&format!("/delegates/{full}/acquire?wait=20&max=0")))
            .bearer_auth(full_token)
            .send();
        let full_poll = tokio::spawn(full_poll);
        s.polls_waiting(1).await;
        let (free_token, free) = s.delegate("free", &[]).await;
        let free_poll = s
            .http
            .post(s.url(&format!("/delegates/{free}/acquire?wait=20&max=1")))
            .bearer_auth(free_token)
            .send();
        let free_poll = tokio::spawn(free_poll);
        s.polls_waiting(2).await;
        let before = s.app.hub.looks();
        s.admin_post("/tasks", json!({"kind": "shell", "spec": {"script": "x"}}))
            .await;
        let r = free_poll.await.expect("join").expect("free poll");
        assert_eq!(r.status().as_u16(), 200);
        let got: AcquireResponse = r.json().await.expect("acquire answer");
        assert_eq!(got.tasks.len(), 1);
        s.polls_waiting(1).await;
        assert_eq!(
            s.app.hub.looks() - before,
            1,
            "only the poll that may take the task looked"
        );
        assert!(
            !full_poll.is_finished(),
            "the full agent's poll was answered"
        );
        full_poll.abort();
        s.stop().await;
    }

    /// Issue 7 item 5, reproduced: a long poll opened before its token was revoked still
    /// leased the next task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revoked_tokens_open_long_poll_leases_nothing() {
        let s = start().await;
        let (token, id) = s.delegate("d1", &[]).await;
        let req = s
            .http
            .post(s.url(&format!("/delegates/{id}/acquire?wait=20")))
            .bearer_auth(token)
            .send();
        let poll = tokio::spawn(async move {
            let t0 = Instant::now();
            let r = req.await.expect("acquire");
            let status = r.status().as_u16();
            (status, r.bytes().await.expect("body"), t0.elapsed())
        });
        s.polls_waiting(1).await;
        let r = s.admin_post("/tokens/d1/revoke", json!({})).await;
        assert_eq!(r.status().as_u16(), 200);
        let r = s
            .admin_post("/tasks", json!({"kind": "shell", "spec": {"script": "x"}}))
            .await;
        let task: SubmitResponse = r.json().await.expect("submit");
        let (status, body, took) = poll.await.expect("join");
        assert_eq!(
            status,
            401,
            "the poll answered {}",
            String::from_utf8_lossy(&body)
        );
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let view = s.app.store.task(&task.task_id).expect("task");
        assert_eq!(view.state, delegate_protocol::TaskState::Queued);
        s.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_submit_is_a_json_413() {
        let s = start().await;
        let big = "x".repeat(MAX_SUBMIT_BYTES + 10);
        let resp = s
            .admin_post("/tasks", json!({"kind": "shell", "spec": {"script": big}}))
            .await;
        let (status, body) = error_of(resp).await;
        assert_eq!(status, 413);
        assert_eq!(body.error.code, ErrorCode::PayloadTooLarge);
        s.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_input_gets_json_errors() {
        let s = start().await;
        let (status, body) = error_of(
            s.admin_post("/tasks", json!({"kind": "cobol", "spec": {}}))
                .await,
        )
        .await;
        assert_eq!((status, body.error.code), (400, ErrorCode::InvalidSpec));
        assert_eq!(
            body.error.message,
            "unknown task kind \"cobol\" (known kinds: shell, http, docker, kubernetes)"
        );
        let (status, body) = error_of(
            s.admin_post("/tasks", json!({"kind": "shell", "spec": {"script": ""}}))
                .await,
        )
        .await;
        assert_eq!(status, 400);
        assert!(body.error.message.starts_with("spec.script: is empty"));
        let (status, body) = error_of(
            s.admin_post(
                "/tasks",
                json!({"kind": "shell", "spec": {"script": "x"}, "timeout_secs": 0}),
            )
            .await,
        )
        .await;
        assert_eq!((status, body.error.code), (400, ErrorCode::InvalidSpec));

        let (status, body) = error_of(s.http.get(s.url("/nope")).send().await.expect("send")).await;
        assert_eq!((status, body.error.code), (404, ErrorCode::NotFound));

        let (status, body) = error_of(
            s.http
                .post(s.url("/delegates/register"))
                .bearer_auth("dlg_0000")
                .json(&json!({}))
                .send()
                .await
                .expect("send"),
        )
        .await;
        assert_eq!((status, body.error.code), (401, ErrorCode::Unauthorized));
        assert!(body.error.message.contains("token create --name"));

        let (status, body) = error_of(
            s.http
                .get(s.url("/tasks"))
                .bearer_auth("adm_wrong")
                .send()
                .await
                .expect("send"),
        )
        .await;
        assert_eq!((status, body.error.code), (401, ErrorCode::Unauthorized));
        // A wrong admin token of the right length and prefix, one digit off.
        let mut near = s.admin.clone();
        let last = if near.ends_with('0') { "1" } else { "0" };
        near.replace_range(near.len() - 1.., last);
        let r = s.http.get(s.url("/tasks")).bearer_auth(&near).send().await;
        assert_eq!(r.expect("send").status().as_u16(), 401);
        let r = s
            .http
            .get(s.url("/tasks"))
            .bearer_auth(&s.admin)
            .send()
            .await;
        assert_eq!(r.expect("send").status().as_u16(), 200);

        let status = s.admin_post("/tokens", json!({"name": "a"})).await.status();
        assert_eq!(status.as_u16(), 200);
        let (status, body) = error_of(s.admin_post("/tokens", json!({"name": "a"})).await).await;
        assert_eq!(status, 409);
        assert!(body.error.message.contains("already exists"));
        s.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_answers_long_polls_at_once() {
        let s = start().await;
        let (token, id) = s.delegate("d1", &[]).await;
        let req = s
            .http
            .post(s.url(&format!("/delegates/{id}/acquire?wait=60")))
            .bearer_auth(token)
            .send();
        let poll = tokio::spawn(async move {
            let t0 = Instant::now();
            let r = req.await.expect("acquire");
            (r.status().as_u16(), t0.elapsed())
        });
        s.polls_waiting(1).await;
        s.stop().await;
        let (status, took) = poll.await.expect("join");
        assert_eq!(status, 204);
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn admin_token_file_is_private_and_kept_across_restarts() {
        use std::os::unix::fs::PermissionsExt;
        let s = start().await;
        let path = s.data.join(ADMIN_TOKEN_FILE);
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
        server::bind(&ServeConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            data.clone(),
        ))
        .await
        .expect("restart");
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
