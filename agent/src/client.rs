//! HTTP client for the manager API v1, the only code of the agent that speaks HTTP to it.
//!
//! It knows nothing of executors: it moves protocol messages and turns every failure into
//! a [`ClientError`] that tells the caller whether retrying can help.
//!
//! A manager may run as several nodes sharing one database; the agent then lists them all
//! and stays with one node until it cannot be reached (or answers that it is unavailable),
//! then moves on to the next. Any node can answer any request, and the caller's retry with
//! backoff goes to the new node, so a node's death costs one failed call.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use delegate_protocol::{
    API_PREFIX, AcquireResponse, ErrorBody, ErrorCode, HeartbeatRequest, HeartbeatResponse, LogAck,
    MAX_SUBMIT_BYTES, RegisterRequest, RegisterResponse, TaskResult,
};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;

/// Why a call to the manager failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connection refused, reset, timed out: retry with backoff. `reason` is the whole
    /// cause chain in one line (reqwest's own message hides the cause).
    #[error("cannot reach the manager at {url}: {reason}")]
    Transport { url: String, reason: String },
    /// The manager's TLS certificate is not signed by a root this agent trusts.
    #[error(
        "the manager at {url} presented a TLS certificate this agent does not trust ({reason}); set ca_file (or DELEGATE_CA_FILE) in the agent config to the CA certificate that signed it"
    )]
    Untrusted { url: String, reason: String },
    /// The HTTP client could not be built (a CA file the TLS stack refuses).
    #[error("cannot set up the connection to the manager at {url}: {reason}")]
    Setup { url: String, reason: String },
    /// The token is wrong or revoked: retrying will not help until an operator acts.
    #[error(
        "the manager at {url} rejected the delegate token: {message} (check token/token_file in the agent config; create a token with `delegate-manager token create --name NAME`)"
    )]
    Unauthorized { url: String, message: String },
    /// The manager answered with an error body.
    #[error("the manager answered {status} to {what}: {message}")]
    Api {
        what: &'static str,
        status: u16,
        code: ErrorCode,
        message: String,
        expected_offset: Option<u64>,
    },
    /// The answer was not what protocol v1 says.
    #[error("unexpected answer from the manager to {what}: {reason}")]
    Protocol { what: &'static str, reason: String },
}

impl ClientError {
    /// Worth trying again later (network, manager restarting, overloaded).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Transport { .. }
            | ClientError::Untrusted { .. }
            | ClientError::Protocol { .. } => true,
            ClientError::Setup { .. } => false,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            ClientError::Unauthorized { .. } => false,
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The manager does not know this delegate id (its database was reset): register again.
    pub fn is_unknown_delegate(&self) -> bool {
        matches!(self, ClientError::Api { status: 404, .. })
    }
}

/// The manager's node URLs plus the delegate token. Clones share the node in use.
#[derive(Clone)]
pub struct ManagerClient {
    http: reqwest::Client,
    /// Each node's base URL, without the API prefix, in the configured order.
    urls: Arc<[String]>,
    /// Index into `urls` of the node in use.
    current: Arc<AtomicUsize>,
    token: String,
}

impl std::fmt::Debug for ManagerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("ManagerClient")
            .field("urls", &self.urls)
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

/// One request's node: where it went, so a failure moves on from that node only.
struct Node<'a> {
    index: usize,
    url: &'a str,
}

impl Node<'_> {
    fn api(&self, path: &str) -> String {
        format!("{}{API_PREFIX}{path}", self.url)
    }
}

/// Requests other than the long poll give up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest reply read from the manager, except acquire's: the small JSON answers of
/// register, heartbeat and logs (a heartbeat lists at most `capacity` task ids).
const MAX_REPLY: usize = 256 * 1024;
/// Most of an error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// An acquire reply holds up to `max` assignments of at most one submitted spec each.
fn acquire_limit(max: u32) -> usize {
    let tasks = usize::try_from(max.max(1)).unwrap_or(usize::MAX);
    MAX_SUBMIT_BYTES
        .saturating_add(4096)
        .saturating_mul(tasks)
        .saturating_add(MAX_REPLY)
        .min(64 * 1024 * 1024)
}

/// An error and its causes in one line, each said once (a cause whose text the previous
/// message already holds is skipped).
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = c.source();
    }
    out
}

/// Read a body chunk by chunk, stopping at `limit` bytes: a confused or hostile manager
/// cannot make the agent buffer without bound. The error carries what was read.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, (Vec<u8>, String)> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Err((
            Vec::new(),
            format!("the reply is larger than {limit} bytes; not read"),
        ));
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    let room = limit - body.len();
                    body.extend_from_slice(&chunk[..room]);
                    return Err((
                        body,
                        format!("the reply is larger than {limit} bytes; not read"),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err((body, format!("reading the reply failed: {e}"))),
        }
    }
}

impl ManagerClient {
    /// `urls`: the base URL of each node of the manager (at least one). `ca_pem`: the only
    /// trusted root certificates (PEM) when set; the system's roots otherwise.
    pub fn new(
        urls: &[String],
        token: &str,
        user_agent: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<ManagerClient, ClientError> {
        let urls: Arc<[String]> = urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        let setup = |e: reqwest::Error| ClientError::Setup {
            url: urls.join(", "),
            reason: causes(&e),
        };
        if urls.is_empty() {
            return Err(ClientError::Setup {
                url: String::new(),
                reason: "no manager URL is configured".into(),
            });
        }
        let mut builder = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true);
        // `ca_file` pins: the manager's certificate must chain to a CA in that file and to
        // no other, as an operator who names a CA expects (docs/security.md, second review, finding 13). Merging it
        // into the system's roots let any public CA vouch for the manager's name too.
        if let Some(pem) = ca_pem {
            builder =
                builder.tls_certs_only(reqwest::Certificate::from_pem_bundle(pem).map_err(setup)?);
        }
        let http = builder.build().map_err(setup)?;
        Ok(ManagerClient {
            http,
            urls,
            current: Arc::new(AtomicUsize::new(0)),
            token: token.to_string(),
        })
    }

    /// The URL of the node in use, for status lines and messages.
    pub fn url(&self) -> &str {
        self.node().url
    }

    fn node(&self) -> Node<'_> {
        let index = self.current.load(Ordering::Relaxed) % self.urls.len();
        Node {
            index,
            url: &self.urls[index],
        }
    }

    /// `node` failed as a node (unreachable, or unavailable behind a proxy): later calls
    /// go to the next one. Calls that failed on the same node at once move on only once.
    fn fail_over(&self, node: &Node<'_>) {
        if self.urls.len() < 2 {
            return;
        }
        let next = (node.index + 1) % self.urls.len();
        if self
            .current
            .compare_exchange(node.index, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                failed = %node.url,
                next = %self.urls[next],
                "the manager node cannot be used; trying the next one"
            );
        }
    }

    /// A failed request, told apart: an untrusted certificate needs the operator.
    fn transport(&self, node: &Node<'_>, e: &reqwest::Error) -> ClientError {
        let reason = causes(e);
        let url = format!("{}{API_PREFIX}", node.url);
        if reason.contains("invalid peer certificate") || reason.contains("UnknownIssuer") {
            ClientError::Untrusted { url, reason }
        } else {
            self.fail_over(node);
            ClientError::Transport { url, reason }
        }
    }

    async fn send(
        &self,
        what: &'static str,
        node: &Node<'_>,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.transport(node, &e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        // What a load balancer or proxy says of a node that is down or restarting.
        if matches!(
            status,
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
        ) {
            self.fail_over(node);
        }
        // An error body is only read for its message: a bounded prefix is enough.
        let body = read_limited(resp, MAX_ERROR_BODY)
            .await
            .unwrap_or_else(|(partial, _)| partial);
        let parsed: Option<ErrorBody> = serde_json::from_slice(&body).ok();
        let (code, message, expected_offset) = match parsed {
            Some(b) => (b.error.code, b.error.message, b.error.expected_offset),
            None => (
                ErrorCode::Unknown,
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
                None,
            ),
        };
        if status == StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized {
                url: format!("{}{API_PREFIX}", node.url),
                message,
            });
        }
        Err(ClientError::Api {
            what,
            status: status.as_u16(),
            code,
            message,
            expected_offset,
        })
    }

    /// Parse a reply of at most `limit` bytes; a larger one is refused unread.
    async fn json<T: DeserializeOwned>(
        what: &'static str,
        resp: reqwest::Response,
        limit: usize,
    ) -> Result<T, ClientError> {
        let body = read_limited(resp, limit)
            .await
            .map_err(|(_, why)| ClientError::Protocol { what, reason: why })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            what,
            reason: e.to_string(),
        })
    }

    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ClientError> {
        let what = "register";
        let node = self.node();
        let r = self
            .http
            .post(node.api("/delegates/register"))
            .timeout(REQUEST_TIMEOUT)
            .json(req);
        Self::json(what, self.send(what, &node, r).await?, MAX_REPLY).await
    }

    pub async fn heartbeat(
        &self,
        delegate_id: &str,
        req: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        let what = "heartbeat";
        let node = self.node();
        let r = self
            .http
            .post(node.api(&format!("/delegates/{delegate_id}/heartbeat")))
            .timeout(REQUEST_TIMEOUT)
            .json(req);
        Self::json(what, self.send(what, &node, r).await?, MAX_REPLY).await
    }

    /// Long poll: `None` when nothing came within `wait`.
    pub async fn acquire(
        &self,
        delegate_id: &str,
        wait: Duration,
        max: u32,
    ) -> Result<Option<AcquireResponse>, ClientError> {
        let what = "acquire";
        let node = self.node();
        let r = self
            .http
            .post(node.api(&format!("/delegates/{delegate_id}/acquire")))
            .query(&[("wait", wait.as_secs()), ("max", u64::from(max))])
            .timeout(wait + REQUEST_TIMEOUT);
        let resp = self.send(what, &node, r).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        Self::json(what, resp, acquire_limit(max)).await.map(Some)
    }

    pub async fn started(&self, task_id: &str, attempt: u32) -> Result<(), ClientError> {
        let node = self.node();
        let r = self
            .http
            .post(node.api(&format!("/tasks/{task_id}/started")))
            .query(&[("attempt", attempt)])
            .timeout(REQUEST_TIMEOUT);
        self.send("started", &node, r).await.map(drop)
    }

    pub async fn logs(
        &self,
        task_id: &str,
        attempt: u32,
        offset: u64,
        chunk: Vec<u8>,
    ) -> Result<LogAck, ClientError> {
        let what = "logs";
        let node = self.node();
        let r = self
            .http
            .post(node.api(&format!("/tasks/{task_id}/logs")))
            .query(&[("attempt", u64::from(attempt)), ("offset", offset)])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(REQUEST_TIMEOUT)
            .body(chunk);
        Self::json(what, self.send(what, &node, r).await?, MAX_REPLY).await
    }

    pub async fn result(
        &self,
        task_id: &str,
        attempt: u32,
        result: &TaskResult,
    ) -> Result<(), ClientError> {
        let node = self.node();
        let r = self
            .http
            .post(node.api(&format!("/tasks/{task_id}/result")))
            .query(&[("attempt", attempt)])
            .timeout(REQUEST_TIMEOUT)
            .json(result);
        self.send("result", &node, r).await.map(drop)
    }
}
