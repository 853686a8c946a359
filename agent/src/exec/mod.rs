//! Executors: run one task spec against a target and say how it ended.
//!
//! Executors know nothing of HTTP to the manager or of the spool format: they get the
//! spec, a place to write output, a token that asks them to stop, and return an
//! [`ExecOutcome`]. The supervisor in `daemon` turns that into a protocol result.

pub mod docker;
pub mod http;
pub mod shell;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use delegate_protocol::TaskSpec;
use tokio_util::sync::CancellationToken;

use crate::config::DockerConfig;
use crate::spool::{LogWriter, ProcessRecord, TaskDir};

/// How an execution ended, before the supervisor adds why it was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutcome {
    /// The process exited with this code.
    Exited(i32),
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

/// Everything an executor may use.
pub struct ExecContext {
    pub task_id: String,
    pub attempt: u32,
    /// The task's spool directory; executors may put scratch files in it.
    pub dir: PathBuf,
    pub log: LogWriter,
    /// Cancelled on timeout, user cancel or shutdown.
    pub stop: CancellationToken,
    /// Between the polite and the forced stop.
    pub kill_grace: Duration,
    /// Called with the process group once it exists (journalled for restarts).
    pub on_process: Box<dyn FnOnce(ProcessRecord) + Send>,
    /// The task's journal entry; the docker executor records its container there.
    pub journal: TaskDir,
    /// An earlier run of the agent started this task: re-attach to it, start nothing.
    pub adopt: bool,
    /// For container labels and messages.
    pub delegate_name: String,
    pub delegate_id: Option<String>,
    pub docker: Arc<DockerConfig>,
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
    }
}
