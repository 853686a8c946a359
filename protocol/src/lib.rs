//! Wire types of the delegate manager API v1, shared by the agent, the manager and the tests.
//!
//! This crate does no I/O: it only says what travels over HTTP and how to check it, so the
//! agent and the manager cannot drift apart. Every message ignores unknown fields (serde's
//! default), which keeps an older agent working against a newer manager and vice versa.
//! `docs/protocol.md` describes each endpoint with an example exchange.

#![forbid(unsafe_code)]

pub mod release;
pub mod spec;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use spec::{
    DockerMount, DockerSpec, HttpSpec, KubeAction, KubernetesSpec, MountKind, PullPolicy,
    ShellSpec, SpecError, TaskSpec, rollout_kind,
};

/// Path prefix of every endpoint of this protocol version.
pub const API_PREFIX: &str = "/api/v1";

/// Largest JSON body the manager accepts on task submission.
pub const MAX_SUBMIT_BYTES: usize = 1024 * 1024;

/// Largest log chunk the manager accepts in one request; agents send smaller ones.
pub const MAX_LOG_CHUNK_BYTES: usize = 1024 * 1024;

/// Longest long poll a delegate may ask for, in seconds.
pub const MAX_ACQUIRE_WAIT_SECS: u64 = 60;

/// Task timeout applied when a submission names none.
pub const DEFAULT_TASK_TIMEOUT_SECS: u64 = 3600;

/// Longest task timeout the manager accepts (7 days).
pub const MAX_TASK_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Most retries a task may ask for.
pub const MAX_RETRIES: u32 = 100;

/// Milliseconds since the Unix epoch; the manager's clock unless said otherwise.
pub type UnixMillis = i64;

/// Where a task is in its life. `queued → assigned → running → succeeded | failed |
/// cancelled | timed_out | lost`; a lost task with retries left goes back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl TaskState {
    /// Every state, in life order; handy for parsing and listings.
    pub const ALL: [TaskState; 8] = [
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::TimedOut,
        TaskState::Lost,
    ];

    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            TaskState::Queued | TaskState::Assigned | TaskState::Running
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::TimedOut => "timed_out",
            TaskState::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an attempt ended, as the agent reports it. `Lost` means the agent knows the work is
/// gone (it restarted while a shell task ran); the manager re-queues such a task while it
/// has retries left, exactly as for a lapsed lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Lost,
}

impl Outcome {
    pub fn state(self) -> TaskState {
        match self {
            Outcome::Succeeded => TaskState::Succeeded,
            Outcome::Failed => TaskState::Failed,
            Outcome::Cancelled => TaskState::Cancelled,
            Outcome::TimedOut => TaskState::TimedOut,
            Outcome::Lost => TaskState::Lost,
        }
    }
}

/// The agent's own life-cycle state, reported in heartbeats and over D-Bus (`State`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DelegateState {
    #[default]
    Starting,
    Running,
    Draining,
    Drained,
    Stopping,
}

impl DelegateState {
    pub fn as_str(self) -> &'static str {
        match self {
            DelegateState::Starting => "starting",
            DelegateState::Running => "running",
            DelegateState::Draining => "draining",
            DelegateState::Drained => "drained",
            DelegateState::Stopping => "stopping",
        }
    }
}

impl fmt::Display for DelegateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Inverse of [`DelegateState::as_str`] (the D-Bus `State` property carries the name).
impl std::str::FromStr for DelegateState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<DelegateState, UnknownState> {
        [
            DelegateState::Starting,
            DelegateState::Running,
            DelegateState::Draining,
            DelegateState::Drained,
            DelegateState::Stopping,
        ]
        .into_iter()
        .find(|d| d.as_str() == s)
        .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// A state name no [`DelegateState`] has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown delegate state {0:?}")]
pub struct UnknownState(pub String);

/// One thing a delegate can run tasks against: `shell`, `http`, later `docker` and
/// `kubernetes` (with `name` = the cluster's name from the agent config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `POST /api/v1/delegates/register` (delegate token). Registering again with the same
/// name and hostname returns the same delegate id and keeps the tasks it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
    pub hostname: String,
    pub version: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub targets: Vec<Target>,
    pub capacity: u32,
    /// The host's upgrade group (`upgrade_group` in its config), for managed rollouts.
    /// Added later in v1: an older agent sends none, and none is not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub delegate_id: String,
    /// How often the manager wants a heartbeat.
    pub heartbeat_interval_secs: u64,
    /// A task whose lease is not renewed for this long is lost.
    pub lease_ttl_secs: u64,
}

/// One attempt of a task. An agent may hold two attempts of the same task for a moment
/// (attempt 1's lease lapsed and attempt 2 was leased to it again before a heartbeat
/// revoked attempt 1), so everything that names a task it runs names the attempt too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskAttempt {
    pub id: String,
    pub attempt: u32,
}

/// `POST /api/v1/delegates/{id}/heartbeat` (delegate token). Renews the leases of the
/// tasks listed in `in_flight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HeartbeatRequest {
    pub state: DelegateState,
    /// Ids of the tasks the agent holds (each once), for managers that predate
    /// `in_flight_attempts`.
    #[serde(default)]
    pub in_flight: Vec<String>,
    /// The same tasks with their attempts (added later in v1; an older agent sends none).
    /// A manager that reads it renews a lease only when the attempt is the task's current
    /// one, and answers about attempts in `revoked_attempts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_flight_attempts: Vec<TaskAttempt>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct HeartbeatResponse {
    /// Tasks among `in_flight` that a user asked to cancel (every attempt the agent holds).
    #[serde(default)]
    pub cancel: Vec<String>,
    /// Tasks among `in_flight` that this delegate no longer holds (lease lapsed, re-queued
    /// elsewhere, or finished): the agent stops every attempt of them and drops their spool.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// Attempts among `in_flight_attempts` that this delegate no longer holds: the agent
    /// stops exactly those. A manager answering a request with `in_flight_attempts` puts
    /// its revocations here, not in `revoked`, so a newer attempt of the same task on the
    /// same delegate keeps running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_attempts: Vec<TaskAttempt>,
}

/// Query of `POST /api/v1/delegates/{id}/acquire`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireQuery {
    /// Seconds to hold the request open when there is nothing to hand out (≤ 60).
    #[serde(default)]
    pub wait: u64,
    /// Most tasks to lease in this call; 0 asks only for cancellations.
    #[serde(default = "one")]
    pub max: u32,
}

fn one() -> u32 {
    1
}

/// 200 answer of acquire; a 204 means nothing happened within `wait`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AcquireResponse {
    #[serde(default)]
    pub tasks: Vec<Assignment>,
    /// Tasks this delegate holds that a user asked to cancel.
    #[serde(default)]
    pub cancel: Vec<String>,
}

/// A task leased to a delegate. `spec` stays raw JSON here so that an agent which cannot
/// parse a kind or field fails that one task with a clear message instead of the whole
/// response (see [`TaskSpec::from_wire`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: String,
    /// 1 for the first try, +1 for every re-queue. Logs and results name it, so a late
    /// report from an attempt that lost its lease is refused, not mixed in.
    pub attempt: u32,
    pub kind: String,
    pub spec: serde_json::Value,
    pub timeout_secs: u64,
}

/// Query of `POST /api/v1/tasks/{id}/started` and `/logs` and `/result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptQuery {
    pub attempt: u32,
    /// Byte offset of the chunk in the attempt's log (logs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// Answer to a log chunk: how many bytes of the attempt's log the manager now holds. The
/// agent may forget everything before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogAck {
    pub stored: u64,
}

/// `POST /api/v1/tasks/{id}/result?attempt=N`. Idempotent: the same result twice is
/// stored once; a different second result is a 409.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number that ended the process, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// One human line on why, for anything but a plain exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Total log bytes of the attempt, so the manager can tell a complete log.
    #[serde(default)]
    pub log_bytes: u64,
}

/// `POST /api/v1/tasks` (admin token). The task spec travels as `kind` + `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitTask {
    #[serde(flatten)]
    pub spec: TaskSpec,
    /// Tags a delegate must all have to get this task.
    #[serde(default)]
    pub selectors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// How often a lost attempt is re-queued.
    #[serde(default)]
    pub retries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub task_id: String,
}

/// `GET /api/v1/tasks/{id}`: everything a user may want to know about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: String,
    pub kind: String,
    pub spec: serde_json::Value,
    pub selectors: Vec<String>,
    pub state: TaskState,
    pub attempt: u32,
    pub retries: u32,
    pub timeout_secs: u64,
    pub cancel_requested: bool,
    pub delegate_id: Option<String>,
    pub delegate_name: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: Option<String>,
    pub created_at: UnixMillis,
    pub assigned_at: Option<UnixMillis>,
    pub started_at: Option<UnixMillis>,
    pub finished_at: Option<UnixMillis>,
    /// Bytes of log the manager holds for the current attempt.
    pub log_bytes: u64,
    /// The attempt's log reached the manager's per-task cap: what came after was dropped
    /// and the log ends with a `[delegate-manager] log truncated` line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub log_truncated: bool,
}

/// `GET /api/v1/delegates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DelegateView {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub version: String,
    pub tags: Vec<String>,
    pub targets: Vec<Target>,
    pub capacity: u32,
    pub state: DelegateState,
    /// A heartbeat arrived within the lease TTL.
    pub connected: bool,
    pub last_heartbeat: Option<UnixMillis>,
    pub in_flight: u32,
    /// The upgrade group the delegate registered with, if any (older managers send none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_group: Option<String>,
}

/// `POST /api/v1/tokens` (admin token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateToken {
    pub name: String,
    /// The tags delegates of this token may register with; `None` allows any. A stolen
    /// token with a tag set cannot attract tasks meant for other hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// The only time a delegate token is shown; the manager keeps its SHA-256 alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub name: String,
    pub token: String,
}

/// `GET /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenView {
    pub name: String,
    pub created_at: UnixMillis,
    pub revoked: bool,
    /// The allowed tag set (`None`: any tags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
}

/// `POST /api/v1/delegates/forget` (admin token): free a delegate name so that another
/// token may register it. Without `hostname` the name must be unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetDelegate {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// The answer to [`ForgetDelegate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgottenDelegate {
    pub id: String,
    pub name: String,
    pub hostname: String,
    /// The token that held the name.
    pub token_name: String,
    /// Tasks it held, now re-queued or ended as if its lease had lapsed.
    pub released_tasks: u32,
}

/// Machine-readable error codes; every error body carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    InvalidSpec,
    PayloadTooLarge,
    Unauthorized,
    NotFound,
    /// The attempt named is not the one holding the lease (it was lost or re-queued).
    StaleAttempt,
    /// A log chunk starts past the end of what is stored; `expected_offset` says where.
    LogGap,
    /// A second, different result for the same attempt.
    ResultConflict,
    /// The task is already finished.
    Finished,
    /// `register`: the name and hostname belong to a delegate of another token.
    NameTaken,
    /// `register`: a tag outside the token's allowed tag set.
    TagsNotAllowed,
    /// `acquire`: the token's delegates hold the most long polls the manager allows at
    /// once (HTTP 429); poll again later.
    TooManyPolls,
    Internal,
    /// A code from a newer manager.
    #[serde(other)]
    Unknown,
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: ErrorCode,
    pub message: String,
    /// With `log_gap`: the offset the manager wants next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_offset: Option<u64>,
}

/// Does a delegate with `tags` qualify for a task with `selectors`? All selectors must be
/// among the tags.
pub fn selectors_match(selectors: &[String], tags: &[String]) -> bool {
    selectors.iter().all(|s| tags.iter().any(|t| t == s))
}

/// 1 to 63 characters of `a-z`, `0-9` and `-`: the characters and length of a DNS label,
/// which Kubernetes namespaces and upgrade groups share.
pub(crate) fn label_chars(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An upgrade group is 1 to 63 characters of `a-z`, `0-9` and `-`, starting with a letter
/// or digit (a DNS label's shape, so it is safe in URLs, metric labels and file names).
/// The error names the key, the value and the rule. The agent checks its config by it,
/// and the manager refuses a register that breaks it.
pub fn check_upgrade_group(group: &str) -> Result<(), String> {
    let ok = label_chars(group) && !group.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "upgrade_group {group:?} is not a valid group name: use 1 to 63 characters of \
             a-z, 0-9 and '-', starting with a letter or digit, e.g. upgrade_group = \"canary\""
        ))
    }
}

/// Parse a list of tags as operators write it: comma or space separated, trimmed, no
/// empties, no duplicates, order kept.
pub fn parse_tags(s: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in s.split([',', ' ']).map(str::trim).filter(|t| !t.is_empty()) {
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    out
}

/// A map kept sorted so that specs serialize the same way every time.
pub type Env = BTreeMap<String, String>;

/// Query of `GET /api/v1/tasks` (admin token): newest first, optionally one state only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ListTasksQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    /// Most tasks to return; the manager's default (100) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// Query of `GET /api/v1/tasks/{id}/logs` (admin token): the current attempt's log from
/// byte `offset`; with `follow`, a streamed body that ends when the task is finished and
/// every byte was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LogQuery {
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub follow: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_group_is_optional_on_the_wire() {
        // An older agent's register request has no `upgrade_group`.
        let old = r#"{"name":"a","hostname":"h","version":"1.0.0","capacity":4}"#;
        let req: RegisterRequest = serde_json::from_str(old).expect("json");
        assert_eq!(req.upgrade_group, None);
        // None is not sent, so an older manager sees the request it knows.
        let json = serde_json::to_string(&req).expect("json");
        assert!(!json.contains("upgrade_group"), "{json}");
        let with = RegisterRequest {
            upgrade_group: Some("canary".into()),
            ..req
        };
        let json = serde_json::to_string(&with).expect("json");
        assert!(json.contains(r#""upgrade_group":"canary""#), "{json}");
        assert_eq!(
            serde_json::from_str::<RegisterRequest>(&json).expect("json"),
            with
        );

        // An older manager's delegate view has no `upgrade_group` either.
        let view = r#"{"id":"d","name":"a","hostname":"h","version":"1.0.0","tags":[],
            "targets":[],"capacity":4,"state":"running","connected":true,
            "last_heartbeat":null,"in_flight":0}"#;
        let v: DelegateView = serde_json::from_str(view).expect("json");
        assert_eq!(v.upgrade_group, None);
        assert!(
            !serde_json::to_string(&v)
                .expect("json")
                .contains("upgrade_group")
        );
    }

    #[test]
    fn delegate_state_names_round_trip() {
        for d in [
            DelegateState::Starting,
            DelegateState::Running,
            DelegateState::Draining,
            DelegateState::Drained,
            DelegateState::Stopping,
        ] {
            assert_eq!(d.as_str().parse::<DelegateState>(), Ok(d));
            assert_eq!(
                serde_json::to_string(&d).ok(),
                Some(format!("\"{}\"", d.as_str()))
            );
        }
        assert!("Running".parse::<DelegateState>().is_err());
    }

    #[test]
    fn states_round_trip_through_their_names() {
        for st in TaskState::ALL {
            assert_eq!(TaskState::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).expect("serialize");
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert!(TaskState::TimedOut.is_terminal());
        assert!(!TaskState::Running.is_terminal());
    }

    #[test]
    fn unknown_fields_and_error_codes_are_tolerated() {
        let hb: HeartbeatResponse =
            serde_json::from_str(r#"{"cancel":["t1"],"revoked":[],"future":42}"#)
                .expect("newer heartbeat answer parses");
        assert_eq!(hb.cancel, vec!["t1".to_string()]);
        let e: ErrorBody = serde_json::from_str(r#"{"error":{"code":"brand_new","message":"m"}}"#)
            .expect("newer error code parses");
        assert_eq!(e.error.code, ErrorCode::Unknown);
    }

    #[test]
    fn selectors_need_every_tag() {
        let tags = parse_tags("linux, eu ,linux gpu");
        assert_eq!(tags, ["linux", "eu", "gpu"]);
        assert!(selectors_match(&[], &tags));
        assert!(selectors_match(&["eu".into(), "gpu".into()], &tags));
        assert!(!selectors_match(&["us".into()], &tags));
    }

    #[test]
    fn submit_carries_kind_and_spec_side_by_side() {
        let s: SubmitTask = serde_json::from_str(
            r#"{"kind":"shell","spec":{"script":"echo hi"},"selectors":["a"],"retries":2}"#,
        )
        .expect("parse");
        assert_eq!(s.retries, 2);
        match &s.spec {
            TaskSpec::Shell(sh) => assert_eq!(sh.script, "echo hi"),
            other => panic!("wrong kind {other:?}"),
        }
        let back = serde_json::to_value(&s).expect("serialize");
        assert_eq!(back["kind"], "shell");
        assert_eq!(back["spec"]["script"], "echo hi");
    }

    #[test]
    fn heartbeats_with_and_without_attempts_read_both_ways() {
        // An older agent's heartbeat: ids only.
        let old: HeartbeatRequest =
            serde_json::from_str(r#"{"state":"running","in_flight":["t_1"]}"#).expect("parse");
        assert!(old.in_flight_attempts.is_empty());
        // A newer agent's heartbeat, as an older manager reads it: ids only, extra ignored.
        let new = HeartbeatRequest {
            state: DelegateState::Running,
            in_flight: vec!["t_1".into()],
            in_flight_attempts: vec![
                TaskAttempt {
                    id: "t_1".into(),
                    attempt: 1,
                },
                TaskAttempt {
                    id: "t_1".into(),
                    attempt: 2,
                },
            ],
        };
        let wire = serde_json::to_value(&new).expect("serialize");
        assert_eq!(wire["in_flight"], serde_json::json!(["t_1"]));
        assert_eq!(wire["in_flight_attempts"][1]["attempt"], 2);
        let back: HeartbeatRequest = serde_json::from_value(wire).expect("parse");
        assert_eq!(back, new);
        // An older manager's answer has no revoked_attempts.
        let r: HeartbeatResponse =
            serde_json::from_str(r#"{"cancel":[],"revoked":["t_2"]}"#).expect("parse");
        assert!(r.revoked_attempts.is_empty());
        let empty = serde_json::to_value(HeartbeatResponse::default()).expect("serialize");
        assert!(empty.get("revoked_attempts").is_none(), "{empty}");
    }
}
