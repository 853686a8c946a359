//! Executors: run one task spec against a target and say how it ended.
//!
//! Executors know nothing of HTTP to the manager or of the spool: they get the spec, a
//! [`TaskLog`] to write output to, a [`Journal`] of named records to keep what a restarted
//! agent needs to find their work again (a process group, a container, a unit, a Job; each
//! executor owns and types its own), a token that asks them to stop, and return an
//! [`ExecOutcome`]. The supervisor in `daemon` implements both over the spool and turns the
//! outcome into a protocol result. What the daemon must know of a kind (does this agent run
//! it, is a running task adoptable, what becomes of it after a restart) each executor says
//! through [`Kind`].
//!
//! The shell and kubernetes executors are folders ([`shell`]: as children or as systemd
//! units, and the unit's runner; [`kubernetes`]: one file per action).

pub mod docker;
pub mod handoff;
pub mod http;
pub mod kubernetes;
pub mod output;
pub mod shell;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use delegate_durable::Durability;
use delegate_protocol::TaskSpec;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DockerConfig, KubeCluster};

pub use docker::ContainerRecord;
pub use shell::{ProcessRecord, unit};

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

/// What an executor records about its running work for a restarted agent: named records
/// that only the executor writes and reads (a process group, a container, a unit, a Job).
/// The store behind it (the spool) keeps them with the task and interprets none of them.
/// Recording is best effort: the executor says what a failure costs (a restarted agent
/// still finds a container by its labels, and reports a shell task it cannot find as lost).
pub trait Journal: Send + Sync {
    /// Store record `name` (JSON), replacing an earlier one so that a reader sees the old
    /// or the new one, never a part.
    fn put_json(&self, name: &str, json: &[u8], durability: Durability)
    -> Result<(), JournalError>;
    /// Record `name` as stored by this or an earlier run of the agent; `None` when none is.
    fn get_json(&self, name: &str) -> Result<Option<Vec<u8>>, JournalError>;
}

impl dyn Journal + '_ {
    /// Store `value` as record `name` (see [`Journal::put_json`]).
    pub fn put<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), JournalError> {
        let json = serde_json::to_vec(value).map_err(|e| JournalError(e.to_string()))?;
        self.put_json(name, &json, durability)
    }

    /// Record `name`; one that cannot be read or does not parse counts as none (the
    /// executor then finds its work another way, or reports it lost).
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        let json = self.get_json(name).ok()??;
        serde_json::from_slice(&json).ok()
    }
}

/// A record could not be stored or read; the message names the file and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct JournalError(pub String);

/// The kinds of task this agent knows, each run by its executor. The daemon asks a kind's
/// executor about it ([`Kind::facts`], [`Kind::on_restart`]) rather than deciding by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Shell,
    Http,
    Docker,
    Kubernetes,
}

/// What the daemon needs to know of a kind on this agent, as its executor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// The config lets the agent run it (a target that is down right now still counts:
    /// its task then fails naming the problem).
    pub runs: bool,
    /// A running task of it outlives the agent and a restarted agent takes it up again, so
    /// a drain for a handover need not wait for it.
    pub adoptable: bool,
}

/// What a restarted agent does with an unfinished task it finds in the spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Run the executor again with `adopt` set: it re-attaches to its work or, for an
    /// idempotent action, runs it again. The text says which, for the agent's log.
    Adopt(&'static str),
    /// Nothing of it can be taken up: report it lost.
    Lost,
}

impl Kind {
    /// Every kind, in the order targets are listed.
    pub const ALL: [Kind; 4] = [Kind::Shell, Kind::Http, Kind::Docker, Kind::Kubernetes];

    /// The kind of a task spec or assignment (`shell`, `http`, `docker`, `kubernetes`).
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Shell => "shell",
            Kind::Http => "http",
            Kind::Docker => "docker",
            Kind::Kubernetes => "kubernetes",
        }
    }

    /// This kind's facts on an agent with `config` whose shell tasks run as `shell` says.
    pub fn facts(self, config: &Config, shell: &ShellRunner) -> Facts {
        match self {
            Kind::Shell => shell::facts(config, shell),
            Kind::Http => http::facts(config),
            Kind::Docker => docker::facts(config),
            Kind::Kubernetes => kubernetes::facts(config),
        }
    }

    /// What becomes of a task of this kind that was running when the agent stopped, given
    /// the records its executor journalled and whether this agent runs the kind.
    pub fn on_restart(self, journal: &dyn Journal, runs: bool) -> Restart {
        match self {
            Kind::Shell => shell::on_restart(journal),
            Kind::Http => Restart::Lost,
            Kind::Docker => docker::on_restart(runs),
            Kind::Kubernetes => kubernetes::on_restart(runs),
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
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
    Units(Arc<shell::unit::TaskUnits>),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The record names are the file names older agents wrote, so an agent upgraded in
    /// place re-attaches to the tasks they started; and the records parse what they wrote.
    #[test]
    fn records_keep_the_names_and_formats_older_agents_wrote() {
        assert_eq!(shell::PROCESS_RECORD, "process.json");
        assert_eq!(shell::unit::UNIT_RECORD, "unit.json");
        assert_eq!(docker::CONTAINER_RECORD, "container.json");
        assert_eq!(kubernetes::JOB_RECORD, "kube-job.json");
        let c: ContainerRecord =
            serde_json::from_str(r#"{"id":"abc","log_base":12}"#).expect("container");
        assert_eq!(c.exit_code, None);
        let u: unit::UnitRecord =
            serde_json::from_str(r#"{"unit":"delegate-task@t-1.service","output_base":3}"#)
                .expect("unit");
        assert_eq!(u.output_base, 3);
        let p: ProcessRecord =
            serde_json::from_str(r#"{"pid":1,"start_time":2}"#).expect("process");
        assert_eq!(p.pid, 1);
    }

    #[test]
    fn process_record_matches_only_the_same_process() {
        let me = ProcessRecord::of(std::process::id()).expect("own stat");
        assert!(me.is_alive());
        let other = ProcessRecord {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_alive());
    }

    #[test]
    fn kinds_parse_from_their_names() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.name()), Some(k));
        }
        assert_eq!(Kind::parse("ftp"), None);
    }
}
