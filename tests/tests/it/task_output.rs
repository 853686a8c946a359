//! One task's output must neither wedge the agent nor fill its disk (docs/security.md,
//! second review, finding 2).
//!
//! The attack was a task that `ftruncate`s its `O_APPEND` stdout to 1 PiB: the unit
//! executor read the sparse zeros with blocking calls on an async worker, forever, so the
//! agent stopped heartbeating and ignored the task's timeout and cancels. That copy now
//! lives in `delegate::exec::output` and its attack is reproduced by its unit tests
//! (`a_petabyte_sparse_output_file_neither_wedges_the_copier_nor_passes_the_cap`,
//! `fifty_megabytes_of_output_leave_a_small_output_file`); the booted-systemd suite runs
//! it through a real unit. Here the same task runs on the direct-spawn path (stdout is a
//! pipe, which cannot be truncated), and the agent must stay what it was: heartbeating,
//! taking tasks, honouring timeout and cancel, and keeping no more than `max_log_bytes`.

use std::path::Path;
use std::time::{Duration, Instant};

use delegate_protocol::TaskState;
use delegate_tests::{Agent, AgentOptions, Manager, wait_for};

use crate::util::{LONG, marked};

/// Blocks the files under `dir` take on disk (not their lengths: a sparse file is small).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[test]
fn a_task_that_truncates_its_stdout_to_a_petabyte_and_floods_it_leaves_the_agent_responsive() {
    let tmp = tempfile::Builder::new()
        .prefix("delegate-it-")
        .tempdir()
        .expect("tmp");
    let m = Manager::start_with(tmp.path(), "127.0.0.1:0", &["--heartbeat-interval", "1s"])
        .expect("manager");
    let token = m.token("flood").expect("token");
    let a = Agent::start(
        tmp.path(),
        &m.url(),
        &token,
        &AgentOptions {
            extra: "max_log_bytes = 1048576\n".into(),
            ..AgentOptions::default()
        },
    )
    .expect("agent");
    let state = tmp.path().join("agent-1").join("state");

    // 1 PiB of holes, then 50 MB of real output, then silence.
    let attack = |marker: &str| {
        marked(&format!(
            "truncate -s 1P /proc/self/fd/1 2>/dev/null; head -c 50000000 /dev/zero | tr '\\0' y; {marker}"
        ))
    };
    let timed = m
        .submit_shell(&attack("sleep 987661"), 15, 0)
        .expect("submit");
    let cancelled = m
        .submit_shell(&attack("sleep 987662"), 600, 0)
        .expect("submit");
    for id in [&timed, &cancelled] {
        m.wait_state(id, &[TaskState::Running], LONG)
            .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
        // The flood has reached the agent: its spooled log is at the cap.
        let log = state.join("tasks").join(format!("{id}.1")).join("log");
        wait_for(LONG, "the task's log to reach max_log_bytes", || {
            let n = std::fs::metadata(&log).ok()?.len();
            (n > 1024 * 1024).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    }

    // While they flood: heartbeats go on, new tasks run, the disk stays bounded.
    let started = Instant::now();
    let beat = || {
        m.delegates()
            .ok()?
            .into_iter()
            .find(|d| d.name == "agent-1")?
            .last_heartbeat
    };
    let first_beat = beat().expect("a heartbeat");
    let mut peak = 0;
    let ok = m.submit_shell("echo alive", 60, 0).expect("submit");
    let t = wait_for(LONG, "a new task to finish", || {
        peak = peak.max(disk_bytes(&state));
        m.task(&ok).ok().filter(|t| t.state.is_terminal())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(m.logs(&ok).expect("logs"), b"alive\n");
    wait_for(Duration::from_secs(10), "a later heartbeat", || {
        peak = peak.max(disk_bytes(&state));
        beat().filter(|b| *b > first_beat)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));

    // The cancel and the timeout are honoured.
    m.cancel(&cancelled).expect("cancel");
    let c = m
        .wait_done(&cancelled, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    assert_eq!(c.state, TaskState::Cancelled, "{c:?}");
    let t = wait_for(Duration::from_secs(30), "the timed task to end", || {
        peak = peak.max(disk_bytes(&state));
        m.task(&timed).ok().filter(|t| t.state.is_terminal())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_text()));
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "{:?}",
        started.elapsed()
    );

    // Each kept at most max_log_bytes and said so; the spool never held the 50 MB.
    for id in [&timed, &cancelled] {
        let log = m.logs(id).expect("logs");
        assert!(log.len() < 1024 * 1024 + 1024, "{} bytes", log.len());
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.contains("[delegate] log truncated"),
            "{id}: {} bytes: {:?}\n{:?}\n{}",
            log.len(),
            text.get(..200),
            m.task(id),
            a.log_text()
        );
    }
    assert!(
        peak < 8 * 1024 * 1024,
        "the agent's state directory took {peak} bytes"
    );
}
