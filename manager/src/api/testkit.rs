//! The unit tests' harness: a real manager on a free port over a temporary data
//! directory (with a release directory), and helpers that speak API v1 to it, shared by
//! the endpoint tests in `delegate`, `admin` and the router's own (which need nothing of
//! `server` but this file).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use delegate_protocol::{API_PREFIX, CreatedToken, ErrorBody, RegisterResponse};
use serde_json::json;
use tokio::sync::oneshot;

use super::App;
use crate::error::ServeError;
use crate::server::{self, ADMIN_TOKEN_FILE, ServeConfig};

pub(super) struct TestServer {
    pub(super) base: String,
    pub(super) admin: String,
    pub(super) http: reqwest::Client,
    pub(super) stop: Option<oneshot::Sender<()>>,
    pub(super) handle: tokio::task::JoinHandle<Result<(), ServeError>>,
    pub(super) data: PathBuf,
    pub(super) app: App,
    pub(super) _dir: tempfile::TempDir,
}

pub(super) async fn start() -> TestServer {
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
    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{API_PREFIX}{path}", self.base)
    }

    pub(super) async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .expect("send")
    }

    /// A delegate token and a registered delegate id.
    pub(super) async fn delegate(&self, name: &str, tags: &[&str]) -> (String, String) {
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
    pub(super) async fn polls_waiting(&self, n: usize) {
        let t0 = Instant::now();
        while self.app.hub.waiting_polls() < n {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no long poll started waiting within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(super) async fn stop(mut self) {
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

/// The admin token's file in a manager's data directory.
pub(super) fn admin_token_file(data: &Path) -> PathBuf {
    data.join(ADMIN_TOKEN_FILE)
}

/// Bind a manager on `data` again (and drop it), as a restart does.
pub(super) async fn bind_again(data: &Path) {
    server::bind(&ServeConfig::new(
        "127.0.0.1:0".parse().expect("addr"),
        data.to_path_buf(),
    ))
    .await
    .expect("restart");
}

pub(super) async fn error_of(resp: reqwest::Response) -> (u16, ErrorBody) {
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON error body"))
}
