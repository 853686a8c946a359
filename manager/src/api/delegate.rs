//! The endpoints a delegate calls with its token: register, heartbeat, the acquire long
//! poll that leases tasks and hands out cancellations, and an attempt's `started`, log
//! chunks and result.
//!
//! Each one checks the delegate token (`DelegateAuth`), makes one store call and wakes
//! whoever waits for the change (see `hub`); the long poll is the only one that waits.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use delegate_protocol::{
    AcquireQuery, AttemptQuery, ErrorCode, HeartbeatRequest, HeartbeatResponse, LogAck,
    MAX_ACQUIRE_WAIT_SECS, MAX_LOG_CHUNK_BYTES, RegisterRequest, RegisterResponse, TaskResult,
    TaskView,
};
use tracing::{debug, info, warn};

use super::error::{ApiError, ApiResult};
use super::{App, DelegateAuth, P, Q, SMALL_BODY_LIMIT, read_body, read_json};
use crate::error::StoreError;
use crate::hub;
use crate::store::{Finish, now_ms};

/// Most tasks one acquire may lease.
const MAX_ACQUIRE_BATCH: u32 = 100;

pub(super) async fn register(
    State(app): State<App>,
    auth: DelegateAuth,
    body: Body,
) -> ApiResult<Json<RegisterResponse>> {
    let req: RegisterRequest = read_json(&app, body, SMALL_BODY_LIMIT, "register").await?;
    // What it registers is shown in operators' tables: no escape sequences, which would
    // drive the terminal of whoever lists the delegates.
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

pub(super) async fn heartbeat(
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
pub(super) async fn acquire(
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

pub(super) async fn started(
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

pub(super) async fn append_log(
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

pub(super) async fn result(
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use delegate_protocol::{
        AcquireResponse, ErrorCode, LogAck, Outcome, SubmitResponse, TaskResult, TaskView,
    };
    use serde_json::json;

    use crate::api::testkit::{error_of, start};

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

    /// Every submit used to wake every waiting poll, which each looked at the queue, so
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

    /// A long poll opened before its token was revoked used to lease the next task all
    /// the same.
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
}
