//! `delegate task-run`: the first program of a `delegate-task@` unit. It fetches the task's
//! spec and output file from the agent over the hand-off socket (never through a path PID 1
//! would open as root), puts itself into a child cgroup with the spec's limits, writes the
//! script to the unit's private /tmp and execs the interpreter on it, its output going to
//! the file the agent handed over.
//!
//! It runs as the task user, with nothing the task itself could not do: the limits it sets
//! are the task author's own (systemd delegated the unit's cgroup subtree to that user),
//! and the unit's own limits, set by the operator, bound them. Because it execs, the unit's
//! main process is the script, and systemd records the script's own exit status.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use super::unit::{EXIT_NO_TASK, RunnerSpec};
use crate::exec::handoff;

/// Exit status when the runner cannot start the script: EX_SOFTWARE, with the reason as
/// the last line of the task's output.
const EXIT_RUNNER: u8 = 70;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("the task spec from the agent does not parse: {0}")]
    SpecParse(serde_json::Error),
    #[error("cannot use the task's output file: {0}")]
    Output(std::io::Error),
    #[error(
        "cannot apply {what}: {path}: {cause} (this host's cgroup v2 hierarchy must offer the memory, cpu and pids controllers to delegate-task@.service)"
    )]
    Limit {
        what: String,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot prepare {path}: {cause}")]
    Prepare {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot run {program:?}: {cause}")]
    Exec {
        program: String,
        cause: std::io::Error,
    },
}

/// Run the task: only returns when it could not be started.
pub fn main() -> ExitCode {
    let (spec, output) = match handoff::fetch(Path::new(handoff::SOCKET)) {
        Ok(t) => t,
        Err(e) => {
            // No output file yet: the unit's journal has it, and the agent points there.
            eprintln!("[delegate] cannot fetch the task: {e}");
            return ExitCode::from(EXIT_NO_TASK as u8);
        }
    };
    let mut output = std::fs::File::from(output);
    let e = run(&spec, &output);
    // The output file is the task's log: the reason is the last thing in it.
    let _ = writeln!(output, "[delegate] {e}");
    ExitCode::from(EXIT_RUNNER)
}

fn run(bytes: &[u8], output: &std::fs::File) -> RunnerError {
    let spec: RunnerSpec = match serde_json::from_slice(bytes) {
        Ok(s) => s,
        Err(cause) => return RunnerError::SpecParse(cause),
    };
    let (stdout, stderr) = match (output.try_clone(), output.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return RunnerError::Output(e),
    };
    if let Err(e) = apply_limits(&spec) {
        return e;
    }
    let script = PathBuf::from("/tmp/delegate-task.script");
    if let Err(cause) = std::fs::write(&script, &spec.script) {
        return RunnerError::Prepare {
            path: script,
            cause,
        };
    }
    let workdir = match &spec.working_dir {
        Some(d) => PathBuf::from(d),
        None => {
            let d = PathBuf::from("/tmp/work");
            if let Err(cause) = std::fs::create_dir_all(&d) {
                return RunnerError::Prepare { path: d, cause };
            }
            d
        }
    };
    let Some(program) = spec.argv.first() else {
        return RunnerError::Exec {
            program: String::new(),
            cause: std::io::Error::other("no interpreter"),
        };
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(&spec.argv[1..])
        .arg(&script)
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .env("DELEGATE_TASK_ID", &spec.task_id)
        .env("DELEGATE_TASK_ATTEMPT", spec.attempt.to_string())
        .envs(spec.env.iter().map(|(k, v)| (k, v)));
    let cause = cmd.exec();
    let hint = match cause.kind() {
        std::io::ErrorKind::NotFound if !workdir.is_dir() => {
            format!("working directory {} does not exist", workdir.display())
        }
        std::io::ErrorKind::NotFound => {
            "interpreter not found; install it or set spec.interpreter".into()
        }
        _ => String::new(),
    };
    RunnerError::Exec {
        program: format!(
            "{program}{}",
            if hint.is_empty() {
                hint
            } else {
                format!(" ({hint})")
            }
        ),
        cause,
    }
}

/// Move this process into `<unit cgroup>/task` and set the spec's limits there. The unit's
/// cgroup must hold no process itself once its controllers are enabled for children, so
/// the runner moves first. Nothing to do without limits.
fn apply_limits(spec: &RunnerSpec) -> Result<(), RunnerError> {
    let files: Vec<(&str, &str, String)> = [
        spec.memory_max
            .map(|m| ("memory", "memory.max", m.to_string())),
        spec.cpu_weight
            .map(|w| ("cpu", "cpu.weight", w.to_string())),
        spec.tasks_max.map(|t| ("pids", "pids.max", t.to_string())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if files.is_empty() {
        return Ok(());
    }
    let own = own_cgroup().map_err(|cause| RunnerError::Limit {
        what: "the task's limits".into(),
        path: PathBuf::from("/proc/self/cgroup"),
        cause,
    })?;
    let leaf = own.join("task");
    let limit_err = |what: &str, path: &Path| {
        let what = what.to_string();
        let path = path.to_path_buf();
        move |cause| RunnerError::Limit { what, path, cause }
    };
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(limit_err("the task's limits", &leaf)(e)),
    }
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, b"0").map_err(limit_err("the task's limits", &procs))?;
    let control = own.join("cgroup.subtree_control");
    let enable: Vec<String> = files.iter().map(|(c, _, _)| format!("+{c}")).collect();
    std::fs::write(&control, enable.join(" ")).map_err(limit_err(
        &format!("controllers {}", enable.join(" ")),
        &control,
    ))?;
    for (_, file, value) in &files {
        let p = leaf.join(file);
        std::fs::write(&p, value).map_err(limit_err(&format!("{file} = {value}"), &p))?;
    }
    if spec.memory_max.is_some() {
        // Over the limit means the OOM killer, not swapping slowly past it. Absent when
        // the host has no swap accounting; the limit holds all the same.
        let _ = std::fs::write(leaf.join("memory.swap.max"), b"0");
    }
    Ok(())
}

/// This process's cgroup v2 directory.
fn own_cgroup() -> std::io::Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| std::io::Error::other("no cgroup v2 entry (a cgroup v1 host?)"))?;
    Ok(Path::new(CGROUP_ROOT).join(rel.trim_start_matches('/')))
}
