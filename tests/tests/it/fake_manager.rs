//! A FAKE manager for the misbehaving-manager tests: a few axum routes on 127.0.0.1 that
//! speak protocol v1 just well enough for a real `delegate` to register, heartbeat and
//! poll, and that misbehave the way each test asks. It records what the agent sent.
//! It is not the real manager (`delegate-manager`); tests of normal behaviour use that.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use delegate_protocol::{
    AcquireQuery, AcquireResponse, Assignment, AttemptQuery, HeartbeatResponse, LogAck,
    RegisterResponse, TaskResult,
};
use delegate_tests::tls::{TlsListener, acceptor};
use serde_json::json;

/// How the fake misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Answer every log chunk with `stored: 0`, as if nothing ever arrived.
    pub stuck_log_ack: bool,
    /// Handed out by the first acquire, whatever `max` the agent asked for.
    pub first_lease: Vec<Assignment>,
    /// Pad the register answer to this many bytes (streamed, no Content-Length).
    pub register_reply_bytes: usize,
    /// Serve HTTPS with this certificate chain and key (PEM files) instead of HTTP.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// What the agent sent.
#[derive(Debug, Default)]
pub struct Seen {
    pub registers: AtomicUsize,
    pub heartbeats: AtomicUsize,
    pub log_posts: AtomicUsize,
    pub started: Mutex<Vec<String>>,
    pub results: Mutex<Vec<(String, TaskResult)>>,
    acquires: AtomicUsize,
}

struct Fake {
    behaviour: Behaviour,
    seen: Arc<Seen>,
}

pub struct FakeManager {
    pub url: String,
    pub seen: Arc<Seen>,
    // Dropping the runtime stops the server.
    _runtime: tokio::runtime::Runtime,
}

impl FakeManager {
    pub fn start(behaviour: Behaviour) -> FakeManager {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let seen = Arc::new(Seen::default());
        let tls = behaviour.tls.clone();
        let fake = Arc::new(Fake {
            behaviour,
            seen: seen.clone(),
        });
        let app = Router::new()
            .route("/api/v1/delegates/register", post(register))
            .route("/api/v1/delegates/{id}/heartbeat", post(heartbeat))
            .route("/api/v1/delegates/{id}/acquire", post(acquire))
            .route("/api/v1/tasks/{id}/started", post(started))
            .route("/api/v1/tasks/{id}/logs", post(logs))
            .route("/api/v1/tasks/{id}/result", post(result))
            .with_state(fake);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let scheme = match tls {
            None => {
                runtime.spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
                "http"
            }
            Some((cert, key)) => {
                let tls = TlsListener {
                    tcp: listener,
                    acceptor: acceptor(&cert, &key),
                };
                runtime.spawn(async move {
                    let _ = axum::serve(tls, app).await;
                });
                "https"
            }
        };
        FakeManager {
            url: format!("{scheme}://{addr}"),
            seen,
            _runtime: runtime,
        }
    }
}

async fn register(State(f): State<Arc<Fake>>) -> Response {
    f.seen.registers.fetch_add(1, Ordering::SeqCst);
    let answer = RegisterResponse {
        delegate_id: "d_fake".into(),
        heartbeat_interval_secs: 1,
        lease_ttl_secs: 30,
    };
    let pad = f.behaviour.register_reply_bytes;
    if pad == 0 {
        return axum::Json(answer).into_response();
    }
    // Valid JSON (the pad is an unknown field, which the protocol ignores), just big.
    let mut v = serde_json::to_value(&answer).expect("json");
    v["pad"] = json!("x".repeat(pad));
    let bytes = serde_json::to_vec(&v).expect("json");
    let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
        .chunks(64 * 1024)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("response")
}

async fn heartbeat(State(f): State<Arc<Fake>>) -> axum::Json<HeartbeatResponse> {
    f.seen.heartbeats.fetch_add(1, Ordering::SeqCst);
    axum::Json(HeartbeatResponse::default())
}

async fn acquire(State(f): State<Arc<Fake>>, Query(q): Query<AcquireQuery>) -> Response {
    if f.seen.acquires.fetch_add(1, Ordering::SeqCst) == 0 && !f.behaviour.first_lease.is_empty() {
        return axum::Json(AcquireResponse {
            tasks: f.behaviour.first_lease.clone(),
            cancel: vec![],
        })
        .into_response();
    }
    tokio::time::sleep(Duration::from_secs(q.wait.min(1))).await;
    StatusCode::NO_CONTENT.into_response()
}

async fn started(
    State(f): State<Arc<Fake>>,
    Path(id): Path<String>,
) -> axum::Json<serde_json::Value> {
    f.seen.started.lock().expect("lock").push(id);
    axum::Json(json!({}))
}

async fn logs(
    State(f): State<Arc<Fake>>,
    Query(q): Query<AttemptQuery>,
    body: Bytes,
) -> axum::Json<LogAck> {
    f.seen.log_posts.fetch_add(1, Ordering::SeqCst);
    let stored = if f.behaviour.stuck_log_ack {
        0
    } else {
        q.offset.unwrap_or(0) + body.len() as u64
    };
    axum::Json(LogAck { stored })
}

async fn result(
    State(f): State<Arc<Fake>>,
    Path(id): Path<String>,
    axum::Json(r): axum::Json<TaskResult>,
) -> axum::Json<serde_json::Value> {
    f.seen.results.lock().expect("lock").push((id, r));
    axum::Json(json!({}))
}
