//! What a pod prints cannot crash or wedge the agent (reproduced against this
//! loopback API server): a long line without a newline, a byte that is not
//! UTF-8, more lines than `max_log_bytes` holds, and a log stream that keeps failing. The
//! kubelet stand-in serves the bytes exactly as the pod wrote them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use delegate_protocol::TaskState;
use delegate_tests::{require, wait_for};
use serde_json::json;

use crate::world::{LONG, World, control_plane, node, output_lines};

/// Peak resident memory of a process (VmHWM), in KiB.
fn peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes of the long line the pod prints: far more than the agent's line cap (1 MiB)
/// and more than the agent may grow by.
const LONG_LINE: u64 = 40_000_000;
/// How much the agent's peak memory may grow over a warmed-up agent's while it reads the
/// long line (a few line caps' worth).
const GROWTH_LIMIT_KIB: u64 = 24 * 1024;

#[test]
fn a_long_line_without_a_newline_is_cut_and_grows_no_agent_even_after_a_restart() {
    let mut w = require!(World::new("log-long-line", ""));
    let (t, log) = w.finish(&w.submit_job("echo warm", json!({})));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let pid = w.agent.pid().expect("agent pid");
    let limit = peak_kib(pid) + GROWTH_LIMIT_KIB;
    // 40 MB without a newline, which comes only seconds later.
    let id = w.submit_job(
        &format!(
            "head -c {LONG_LINE} /dev/zero | tr '\\000' x; sleep 4; echo; echo after the long line"
        ),
        json!({}),
    );
    let cut_note = "the line above was longer than 1024 KiB";
    wait_for(LONG, "the long line cut in the task's log", || {
        let peak = peak_kib(pid);
        assert!(
            peak <= limit,
            "the agent grew to {peak} KiB (limit {limit} KiB) reading one long line"
        );
        let l = w.manager.logs(&id).ok()?;
        String::from_utf8_lossy(&l).contains(cut_note).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.diagnostics()));
    // A restarted agent resumes the log at the long line: it must not buffer it either.
    w.agent.restart().expect("restart");
    let pid = w.agent.pid().expect("agent pid");
    let (t, log) = w.finish(&id);
    let peak = peak_kib(pid);
    println!("MEASURE long line: restarted agent's peak {peak} KiB (limit {limit} KiB)");
    assert!(
        peak <= limit,
        "the restarted agent grew to {peak} KiB (limit {limit} KiB)"
    );
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let lines = output_lines(&log);
    assert_eq!(lines.len(), 2, "the cut line and the next line");
    let cut = lines[0];
    assert!(
        cut.len() > 1024 * 1024 - 64 && cut.len() <= 1024 * 1024 && cut.bytes().all(|b| b == b'x'),
        "the line's first MiB: {} bytes",
        cut.len()
    );
    assert_eq!(lines[1], "after the long line");
    assert_eq!(log.matches(cut_note).count(), 1, "said once");
}

#[test]
fn a_byte_that_is_not_utf8_hides_no_later_line_and_loops_no_requests() {
    let w = require!(World::new("log-bad-byte", ""));
    let id = w.submit_job(
        "printf 'before\\n\\377bad\\nafter\\n'; sleep 4; echo last",
        json!({}),
    );
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(
        output_lines(&log),
        ["before", "\u{fffd}bad", "after", "last"],
        "{log}"
    );
    let (follow, plain) = node().log_requests("log-bad-byte");
    println!("MEASURE bad byte: {follow} follow and {plain} plain log requests");
    assert!(
        follow + plain <= 6,
        "the log was asked for {follow} times following, {plain} times not"
    );
}

/// The `kube-log.cursor` file of the one task of `agent_dir`, if any.
fn cursor_file(agent_dir: &Path) -> Option<PathBuf> {
    let tasks = agent_dir.join("state").join("tasks");
    std::fs::read_dir(tasks)
        .ok()?
        .flatten()
        .map(|e| e.path().join("kube-log.cursor"))
        .find(|p| p.exists())
}

#[test]
fn the_log_cursor_stops_growing_once_the_log_is_at_its_cap() {
    let mut w = World::with_top(
        &require!(control_plane()).admin_kubeconfig(),
        "log-cursor",
        "max_log_bytes = 2048\n",
        "",
    );
    let lines = 20_000;
    let id = w.submit_job(
        &format!("seq 1 {lines} | sed 's/^/line /'; sleep 600"),
        json!({}),
    );
    let cursor = wait_for(LONG, "the task's log cursor", || cursor_file(&w.agent.dir))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", w.diagnostics()));
    wait_for(LONG, "every line served to the agent", || {
        (node().served("log-cursor") >= lines).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.diagnostics()));
    // The agent has been given every line; wait until the cursor stays the same for 2 s.
    let size = || std::fs::metadata(&cursor).map(|m| m.len()).unwrap_or(0);
    let mut last = (size(), Instant::now());
    wait_for(LONG, "the cursor to settle", || {
        let now = size();
        if now != last.0 {
            last = (now, Instant::now());
        }
        (last.1.elapsed() >= Duration::from_secs(2)).then_some(())
    })
    .expect("settles");
    let bytes = size();
    w.agent.kill9();
    println!("MEASURE cursor: {bytes} bytes after {lines} lines, max_log_bytes 2048");
    assert!(
        bytes <= 16 * 1024,
        "kube-log.cursor holds {bytes} bytes for a log capped at 2048 bytes"
    );
    w.agent.restart().expect("restart");
    w.manager.cancel(&id).expect("cancel");
    let t = w.manager.wait_done(&id, LONG).expect("cancelled");
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
}

#[test]
fn a_log_stream_that_keeps_failing_is_asked_for_again_with_back_off() {
    let w = require!(World::new("log-backoff", ""));
    let id = w.submit_job(
        "echo one; sleep 6; echo two",
        json!({"STANDIN_FAIL_FOLLOW": "1"}),
    );
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    // The plain read after the container ended brings the whole log.
    assert_eq!(output_lines(&log), ["one", "two"], "{log}");
    let (follow, _) = node().log_requests("log-backoff");
    println!("MEASURE back-off: {follow} follow requests while the container ran 6 s");
    // Every 100 ms for 6 s would be ~50; doubling from 100 ms up to 5 s is 7 or 8.
    assert!(follow <= 12, "{follow} follow requests in 6 s");
}
