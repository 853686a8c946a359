//! The operator's endpoints, behind the admin token: submit, show, list and cancel
//! tasks; create, list and revoke delegate tokens; list delegates and forget one.
//!
//! A submission is checked here, field by field, before the store sees it, so that a
//! refusal names the known kinds and the bad field (`validate_submit`).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use delegate_protocol::{
    CreateToken, CreatedToken, DEFAULT_TASK_TIMEOUT_SECS, DelegateView, ForgetDelegate,
    ForgottenDelegate, ListTasksQuery, MAX_RETRIES, MAX_SUBMIT_BYTES, MAX_TASK_TIMEOUT_SECS,
    SubmitResponse, SubmitTask, TaskSpec, TaskView, TokenView,
};
use serde::Deserialize;
use tracing::{debug, info};

use super::error::{ApiError, ApiResult};
use super::{AdminAuth, App, P, Q, SMALL_BODY_LIMIT, read_body, read_json};
use crate::auth;
use crate::store::{self, Cancel, now_ms};

/// Task list size when the query names none, and the most it may ask for.
const DEFAULT_LIST_LIMIT: u32 = 100;
const MAX_LIST_LIMIT: u32 = 10_000;

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

pub(super) async fn submit(
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

pub(super) async fn show_task(
    State(app): State<App>,
    _: AdminAuth,
    P(id): P,
) -> ApiResult<Json<TaskView>> {
    Ok(Json(app.db(move |s| s.task(&id)).await?))
}

pub(super) async fn list_tasks(
    State(app): State<App>,
    _: AdminAuth,
    Q(q): Q<ListTasksQuery>,
) -> ApiResult<Json<Vec<TaskView>>> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT);
    Ok(Json(app.db(move |s| s.list_tasks(q.state, limit)).await?))
}

pub(super) async fn cancel(
    State(app): State<App>,
    _: AdminAuth,
    P(id): P,
) -> ApiResult<Json<TaskView>> {
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

pub(super) async fn list_delegates(
    State(app): State<App>,
    _: AdminAuth,
) -> ApiResult<Json<Vec<DelegateView>>> {
    Ok(Json(app.db(|s| s.list_delegates(now_ms())).await?))
}

pub(super) async fn create_token(
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

pub(super) async fn list_tokens(
    State(app): State<App>,
    _: AdminAuth,
) -> ApiResult<Json<Vec<TokenView>>> {
    Ok(Json(app.db(|s| s.list_tokens()).await?))
}

pub(super) async fn revoke_token(
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

pub(super) async fn forget_delegate(
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
    use delegate_protocol::{ErrorCode, MAX_SUBMIT_BYTES};
    use serde_json::json;

    use crate::api::testkit::{error_of, start};

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
}
