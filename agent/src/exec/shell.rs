//! The `shell` executor: a script run by an interpreter in its own process group.
//!
//! The group matters: a script that starts `sleep 600 &` or a pipeline must be stopped as a
//! whole on timeout or cancel, and nothing it started may outlive the task. stdout and
//! stderr share one pipe so the log keeps the order in which the script wrote them.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use delegate_protocol::ShellSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tracing::warn;

use super::{ExecContext, ExecOutcome, ProcessRecord, ShellRunner};

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
        ShellRunner::Units(units) => return super::unit::run(spec, units, ctx).await,
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
            return super::unit::run(spec, units, ctx).await;
        }
        ShellRunner::Waiting(why) => {
            return ExecOutcome::CouldNotStart(format!(
                "shell tasks run as delegate-task@ units on this host, which cannot be used now: {why}"
            ));
        }
        ShellRunner::Children if ctx.adopt => {
            let unit = ctx.journal.unit().map(|u| u.unit).unwrap_or_default();
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
    if let Some(rec) = ProcessRecord::of(pid) {
        ctx.journal.record_process(rec);
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
