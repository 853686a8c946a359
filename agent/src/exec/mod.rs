//! Executors: run one task spec against a target and say how it ended.
//!
//! Executors know nothing of HTTP to the manager or of the spool: they get the spec, a
//! [`TaskLog`] to write output to, a [`Journal`] to record what a restarted agent needs to
//! find their work again (a process group, a container), a token that asks them to stop,
//! and return an [`ExecOutcome`]. The supervisor in `daemon` implements both over the spool
//! and turns the outcome into a protocol result.

pub mod docker;
pub mod handoff;
pub mod http;
pub mod kubernetes;
pub mod kubernetes_job;
pub mod kubernetes_rollout;
pub mod output;
pub mod shell;
pub mod unit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use delegate_protocol::TaskSpec;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::{DockerConfig, KubeCluster};

/// Identity of the process group a shell task runs in, so a restarted agent can stop it
/// without hitting an unrelated process that reused the pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat` (start time in clock ticks since boot).
    pub start_time: u64,
}

impl ProcessRecord {
    /// Read the start time of a live process.
    pub fn of(pid: u32) -> Option<ProcessRecord> {
        Some(ProcessRecord {
            pid,
            start_time: proc_start_time(pid)?,
        })
    }

    /// Is this very process (not a successor with the same pid) still there?
    pub fn is_alive(&self) -> bool {
        proc_start_time(self.pid) == Some(self.start_time)
    }
}

fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields resume after the
    // last ')'. Start time is field 22, i.e. the 20th after the name.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The container a docker task runs in, so a restarted agent can re-attach to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    /// Log length when the container's output began (the agent's own notes come first);
    /// the container's log stream maps to the spooled log from this offset on.
    pub log_base: u64,
    /// Set once the container has ended, before it is removed, so an agent that dies
    /// between removal and journalling the result still reports the real exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
}

/// Where a task's output goes. Appending never fails: a write problem (a full disk) is the
/// log's to count and report, and the task goes on.
pub trait TaskLog: Send + Sync {
    fn append(&mut self, data: &[u8]);
    /// Bytes of output held so far.
    fn written(&self) -> u64;
    /// Most bytes of output the log keeps (`max_log_bytes`): past it output is dropped, so
    /// a copier need not read it at all (see [`output`]).
    fn cap(&self) -> u64 {
        u64::MAX
    }
    /// A copier skipped this much output unread because the log is full: counted as
    /// dropped, as if appended.
    fn skipped(&mut self, _bytes: u64) {}
}

/// What an executor records about its running work for a restarted agent. Recording is
/// best effort (a failure is logged by the journal): a restarted agent still finds a
/// container by its labels, and reports a shell task it cannot find as lost.
pub trait Journal: Send + Sync {
    fn record_process(&self, p: ProcessRecord);
    fn record_container(&self, c: &ContainerRecord);
    /// The container recorded by this or an earlier run of the agent.
    fn container(&self) -> Option<ContainerRecord>;
    /// The systemd unit a shell task runs in (see [`unit`]).
    fn record_unit(&self, u: &unit::UnitRecord);
    fn unit(&self) -> Option<unit::UnitRecord>;
}

/// How an execution ended, before the supervisor adds why it was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The process exited with this code.
    Exited(i32),
    /// The kernel's OOM killer ended it: it went over its `memory_max` (or the host ran
    /// out of memory).
    OomKilled,
    /// The process was killed by this signal.
    Signaled(i32),
    /// A non-process task finished (http): success or not, with a reason.
    Done { success: bool, message: String },
    /// The task could not be started at all (missing interpreter, bad directory...).
    CouldNotStart(String),
    /// The work is gone and nobody knows how it ended (a container removed while the
    /// agent was down); the manager retries such a task while it has retries left.
    Lost(String),
}

/// How shell tasks run right now (from `[shell] mode` and what the host offers).
#[derive(Debug, Clone)]
pub enum ShellRunner {
    /// Each task a `delegate-task@` unit.
    Units(Arc<unit::TaskUnits>),
    /// The agent's own children (the operator's choice, or no systemd).
    Children,
    /// Units are required and cannot be used yet: shell tasks are refused with this reason.
    Waiting(String),
}

/// Everything an executor may use.
pub struct ExecContext {
    pub task_id: String,
    pub attempt: u32,
    /// A private directory of the task for scratch files (the shell script, its default
    /// working directory); removed with the task.
    pub dir: PathBuf,
    pub log: Box<dyn TaskLog>,
    /// Cancelled on timeout, user cancel or shutdown.
    pub stop: CancellationToken,
    /// Between the polite and the forced stop.
    pub kill_grace: Duration,
    /// Where the process group (shell) or the container (docker) is recorded.
    pub journal: Box<dyn Journal>,
    /// An earlier run of the agent started this task: re-attach to it, start nothing.
    pub adopt: bool,
    /// For container labels and messages.
    pub delegate_name: String,
    pub delegate_id: Option<String>,
    pub docker: Arc<DockerConfig>,
    /// The `[[kubernetes]]` clusters of the config.
    pub kubernetes: Arc<Vec<KubeCluster>>,
    /// How shell tasks run on this host; it changes when task units become usable.
    pub shell: tokio::sync::watch::Receiver<ShellRunner>,
}

impl ExecContext {
    /// Write a line of the agent's own to the task log (prefixed so users tell it apart).
    pub fn note(&mut self, line: &str) {
        self.log.append(format!("[delegate] {line}\n").as_bytes());
    }
}

/// Run `spec` to its end.
pub async fn run(spec: &TaskSpec, ctx: ExecContext) -> ExecOutcome {
    match spec {
        TaskSpec::Shell(s) => shell::run(s, ctx).await,
        TaskSpec::Http(h) => http::run(h, ctx).await,
        TaskSpec::Docker(d) => docker::run(d, ctx).await,
        TaskSpec::Kubernetes(k) => kubernetes::run(k, ctx).await,
    }
}
