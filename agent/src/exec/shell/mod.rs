//! The `shell` executor: a script run by an interpreter in its own process group.
//!
//! The group matters: a script that starts `sleep 600 &` or a pipeline must be stopped as a
//! whole on timeout or cancel, and nothing it started may outlive the task. stdout and
//! stderr share one pipe so the log keeps the order in which the script wrote them.
//!
//! Under systemd each task runs as a `delegate-task@` unit instead ([`unit`]), whose first
//! program is `delegate task-run` ([`task_run`]). Records journalled: [`PROCESS_RECORD`]
//! (the process group of a task run as the agent's child, killed if found after a
//! restart) and [`unit::UNIT_RECORD`] (the unit, re-attached to after a restart).

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use delegate_durable::Durability;
use delegate_protocol::ShellSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tracing::warn;

use super::{ExecContext, ExecOutcome, Facts, Journal, Restart, ShellRunner};
use crate::config::Config;

pub mod task_run;
pub mod unit;

/// The record of the process group of a task run as the agent's child.
pub const PROCESS_RECORD: &str = "process.json";

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

/// Shell tasks run where `[shell]` is enabled; a running one is adopted by a new agent
/// only as a unit (a child dies with its agent).
pub(super) fn facts(config: &Config, runner: &ShellRunner) -> Facts {
    Facts {
        runs: config.shell_enabled,
        adoptable: matches!(runner, ShellRunner::Units(_)),
    }
}

/// A task unit outlives the agent: re-attach to it, also when units cannot be used right
/// now (the executor waits for them), never report it lost while it may run. A task run
/// as a child died with the agent.
pub(super) fn on_restart(journal: &dyn Journal) -> Restart {
    match journal.get::<unit::UnitRecord>(unit::UNIT_RECORD) {
        Some(_) => {
            Restart::Adopt("re-attaching to the unit of a task that ran when the delegate stopped")
        }
        None => Restart::Lost,
    }
}

/// What is left of a task run as a child of an earlier agent: its process group, if the
/// very process still runs, is killed. Returns its pid when it was.
pub fn kill_leftover(journal: &dyn Journal) -> Option<u32> {
    let p = journal
        .get::<ProcessRecord>(PROCESS_RECORD)
        .filter(|p| p.is_alive())?;
    let pgid = Pid::from_raw(i32::try_from(p.pid).unwrap_or(i32::MAX));
    let _ = killpg(pgid, Signal::SIGKILL);
    Some(p.pid)
}

/// Variables of the agent that must not leak into tasks.
const SCRUBBED_ENV: &[&str] = &[
    "DELEGATE_TOKEN",
    "DELEGATE_TOKEN_FILE",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
];

/// After the main process exits, how long to keep reading output from anything that
/// escaped the group and still holds the pipe.
const OUTPUT_DRAIN_LIMIT: Duration = Duration::from_secs(2);

pub async fn run(spec: &ShellSpec, mut ctx: ExecContext) -> ExecOutcome {
    let runner = ctx.shell.borrow().clone();
    match runner {
        ShellRunner::Units(units) => return unit::run(spec, units, ctx).await,
        // A unit an earlier run started may still be running: never report it lost (the
        // manager would run it again beside it); wait until units can be used again.
        ShellRunner::Waiting(why) if ctx.adopt => {
            warn!(
                "the task's unit may still run; waiting until task units can be used again to re-attach to it ({why})"
            );
            let units = loop {
                if ctx.shell.changed().await.is_err() {
                    // The agent is going away: report nothing (a "lost" would have the
                    // manager run it again); the spool keeps the unit for the next start.
                    std::future::pending::<()>().await;
                }
                if let ShellRunner::Units(u) = ctx.shell.borrow().clone() {
                    break u;
                }
            };
            return unit::run(spec, units, ctx).await;
        }
        ShellRunner::Waiting(why) => {
            return ExecOutcome::CouldNotStart(format!(
                "shell tasks run as delegate-task@ units on this host, which cannot be used now: {why}"
            ));
        }
        ShellRunner::Children if ctx.adopt => {
            let unit = ctx
                .journal
                .get::<unit::UnitRecord>(unit::UNIT_RECORD)
                .map(|u| u.unit)
                .unwrap_or_default();
            return ExecOutcome::CouldNotStart(format!(
                "an earlier run of the delegate started this task as {unit}, which may still run, and this one runs shell tasks as its children ([shell] mode): not run again; see `systemctl status {unit}`"
            ));
        }
        ShellRunner::Children => {}
    }
    if spec.has_limits() {
        ctx.note("memory_max, cpu_weight and tasks_max are not applied: this delegate runs tasks as its own children (not as delegate-task@ systemd units)");
    }
    let script = ctx.dir.join("script");
    if let Err(e) = std::fs::write(&script, &spec.script) {
        return ExecOutcome::CouldNotStart(format!(
            "cannot write the script to {}: {e}",
            script.display()
        ));
    }
    let workdir = match &spec.working_dir {
        Some(d) => PathBuf::from(d),
        None => {
            let d = ctx.dir.join("work");
            if let Err(e) = std::fs::create_dir_all(&d) {
                return ExecOutcome::CouldNotStart(format!(
                    "cannot create the working directory {}: {e}",
                    d.display()
                ));
            }
            d
        }
    };
    let argv = spec.interpreter_argv();
    let (reader, writer) = match io::pipe() {
        Ok(p) => p,
        Err(e) => return ExecOutcome::CouldNotStart(format!("cannot create a pipe: {e}")),
    };
    let writer2 = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return ExecOutcome::CouldNotStart(format!("cannot create a pipe: {e}")),
    };

    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .arg(&script)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(writer2))
        .process_group(0)
        .env("DELEGATE_TASK_ID", &ctx.task_id)
        .env("DELEGATE_TASK_ATTEMPT", ctx.attempt.to_string())
        .kill_on_drop(false);
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(&spec.env);
    let spawned = cmd.spawn();
    // The parent's copies of the write end must go now, or EOF never comes.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let hint = match e.kind() {
                io::ErrorKind::NotFound if !workdir.is_dir() => {
                    format!("working directory {} does not exist", workdir.display())
                }
                io::ErrorKind::NotFound => format!(
                    "interpreter {:?} not found; install it or set spec.interpreter",
                    argv[0]
                ),
                io::ErrorKind::PermissionDenied => {
                    format!(
                        "permission denied running {:?} in {}",
                        argv[0],
                        workdir.display()
                    )
                }
                _ => format!("cannot start {:?}", argv[0]),
            };
            return ExecOutcome::CouldNotStart(format!("{hint} ({e})"));
        }
    };
    let Some(pid) = child.id() else {
        return ExecOutcome::CouldNotStart("the process vanished at start".into());
    };
    if let Some(rec) = ProcessRecord::of(pid)
        && let Err(e) = ctx
            .journal
            .put(PROCESS_RECORD, &rec, Durability::ProcessCrash)
    {
        warn!("cannot journal the task's process: {e}");
    }
    let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));

    let mut rx = match pipe::Receiver::from_owned_fd(reader.into()) {
        Ok(rx) => rx,
        Err(e) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
            return ExecOutcome::CouldNotStart(format!("cannot read the task's output: {e}"));
        }
    };

    let mut buf = vec![0u8; 64 * 1024];
    let mut eof = false;
    let mut stopping = false;
    let mut grace = Box::pin(tokio::time::sleep(Duration::MAX / 4));
    let status = loop {
        tokio::select! {
            n = rx.read(&mut buf), if !eof => match n {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => { ctx.log.append(&buf[..n]); }
            },
            st = child.wait() => break st,
            _ = ctx.stop.cancelled(), if !stopping => {
                stopping = true;
                let _ = killpg(pgid, Signal::SIGTERM);
                grace.as_mut().reset(tokio::time::Instant::now() + ctx.kill_grace);
            }
            _ = &mut grace, if stopping => {
                let _ = killpg(pgid, Signal::SIGKILL);
                grace.as_mut().reset(tokio::time::Instant::now() + Duration::MAX / 4);
            }
        }
    };
    // Whatever the script left behind in its group goes with it.
    let _ = killpg(pgid, Signal::SIGKILL);
    if !eof {
        let deadline = tokio::time::Instant::now() + OUTPUT_DRAIN_LIMIT;
        loop {
            match tokio::time::timeout_at(deadline, rx.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    ctx.log.append(&buf[..n]);
                }
                Ok(_) => break,
                Err(_) => {
                    ctx.note("output still open 2 s after the script exited (a process left its group?); stopped reading");
                    break;
                }
            }
        }
    }
    match status {
        Ok(st) => match (st.code(), st.signal()) {
            (Some(code), _) => ExecOutcome::Exited(code),
            (None, Some(sig)) => ExecOutcome::Signaled(sig),
            (None, None) => ExecOutcome::CouldNotStart(format!("unexpected wait status {st}")),
        },
        Err(e) => ExecOutcome::CouldNotStart(format!("cannot wait for the process: {e}")),
    }
}
