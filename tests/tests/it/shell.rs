//! Shell and http tasks end to end: output, exit codes, process groups, bad input.

use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::{AgentOptions, process_with_cmdline, wait_for};
use serde_json::json;

use crate::util::{LONG, World, marked};

#[test]
fn shell_task_goes_from_submit_to_succeeded_with_its_log() {
    let w = World::new();
    let _a = w.named_agent("agent-1");
    let id = w
        .manager
        .submit_shell(
            "echo hello; echo to-stderr >&2; echo \"task=$DELEGATE_TASK_ID\"",
            60,
            0,
        )
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(t.exit_code, Some(0));
    assert_eq!(t.delegate_name.as_deref(), Some("agent-1"));
    assert!(
        t.started_at.is_some() && t.finished_at >= t.started_at,
        "{t:?}"
    );
    let log = String::from_utf8(w.manager.logs(&id).expect("logs")).expect("utf8");
    assert_eq!(log, format!("hello\nto-stderr\ntask={id}\n"));
}

#[test]
fn failing_script_is_failed_with_its_exit_code() {
    let w = World::new();
    let _a = w.named_agent("agent-1");
    let id = w
        .manager
        .submit_shell("echo oops; exit 7", 60, 0)
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.exit_code, Some(7));
    assert_eq!(w.manager.logs(&id).expect("logs"), b"oops\n");
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let w = World::new();
    let _a = w.named_agent("agent-1");
    // A background child and a foreground one; both must go. The background writer would
    // print "late" one second after the 2 s timeout, while the agent still reads the
    // task's output (it waits up to 2 s for the pipe to close): it is in the log if, and
    // only if, something of the group outlived the timeout.
    let id = w
        .manager
        .submit_shell(
            &marked("sleep 987601 & (sleep 3; echo late) & sleep 987602"),
            2,
            0,
        )
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");
    assert!(
        t.message
            .as_deref()
            .unwrap_or("")
            .contains("timed out after 2s"),
        "{t:?}"
    );
    wait_for(
        Duration::from_secs(5),
        "the group's sleeps to be gone",
        || {
            (!process_with_cmdline(&marked("sleep 987601"))
                && !process_with_cmdline(&marked("sleep 987602")))
            .then_some(())
        },
    )
    .expect("process group killed");
    let log = String::from_utf8_lossy(&w.manager.logs(&id).expect("logs")).into_owned();
    assert!(
        !log.contains("late"),
        "a background child outlived the timeout: {log:?}"
    );
}

#[test]
fn cancel_kills_the_whole_process_group() {
    let w = World::new();
    let _a = w.named_agent("agent-1");
    let id = w
        .manager
        .submit_shell(&marked("echo started; sleep 987611 & sleep 987612"), 600, 0)
        .expect("submit");
    w.manager
        .wait_state(&id, &[TaskState::Running], LONG)
        .expect("running");
    wait_for(Duration::from_secs(10), "the sleeps to start", || {
        process_with_cmdline(&marked("sleep 987612")).then_some(())
    })
    .expect("started");
    w.manager.cancel(&id).expect("cancel");
    let t = w
        .manager
        .wait_done(&id, Duration::from_secs(20))
        .expect("finishes");
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    wait_for(
        Duration::from_secs(5),
        "the group's sleeps to be gone",
        || {
            (!process_with_cmdline(&marked("sleep 987611"))
                && !process_with_cmdline(&marked("sleep 987612")))
            .then_some(())
        },
    )
    .expect("process group killed");
    assert_eq!(w.manager.logs(&id).expect("logs"), b"started\n");
}

#[test]
fn invalid_specs_are_refused_at_submit_with_a_clear_error() {
    let w = World::new();
    let cases = [
        (
            json!({"kind": "shell", "spec": {"script": "   "}}),
            400,
            "spec.script: is empty",
        ),
        (json!({"kind": "cobol", "spec": {}}), 400, "cobol"),
        (
            json!({"kind": "http", "spec": {"url": "ftp://x"}}),
            400,
            "spec.url",
        ),
        (
            json!({"kind": "shell", "spec": {"script": "true"}, "timeout_secs": 0}),
            400,
            "timeout",
        ),
    ];
    for (body, status, needle) in cases {
        let (st, v) = w
            .manager
            .post_raw("/api/v1/tasks", serde_json::to_vec(&body).expect("json"))
            .expect("post");
        assert_eq!(st, status, "{body} → {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{body}: message {msg:?} lacks {needle:?}"
        );
        assert!(v["error"]["code"].is_string(), "{v}");
    }
    let huge = json!({"kind": "shell", "spec": {"script": "x".repeat(2 * 1024 * 1024)}});
    let (st, v) = w
        .manager
        .post_raw("/api/v1/tasks", serde_json::to_vec(&huge).expect("json"))
        .expect("post");
    assert_eq!(st, 413, "{v}");
    assert_eq!(v["error"]["code"], "payload_too_large", "{v}");
    let (st, v) = w
        .manager
        .post_raw("/api/v1/tasks", b"{not json".to_vec())
        .expect("post");
    assert_eq!(st, 400, "{v}");
    // Nothing of this was queued.
    let listed: serde_json::Value =
        serde_json::from_slice(&w.manager.get("/api/v1/tasks").expect("list")).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

#[test]
fn a_task_the_agent_cannot_run_fails_clearly_and_the_agent_goes_on() {
    let w = World::new();
    let a = w.agent(AgentOptions {
        extra: "[http]\nenabled = false\n".into(),
        ..AgentOptions::default()
    });
    let http = w
        .manager
        .submit(&json!({"kind": "http", "spec": {"url": format!("{}/healthz", w.manager.url())}}))
        .expect("submit");
    let t = w.manager.wait_done(&http, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed);
    let msg = t.message.unwrap_or_default();
    assert!(msg.contains("does not offer target \"http\""), "{msg}");

    let bad_interp = w
        .manager
        .submit(
            &json!({"kind": "shell", "spec": {"script": "true", "interpreter": "/nonexistent/sh"}}),
        )
        .expect("submit");
    let t = w.manager.wait_done(&bad_interp, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed);
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("interpreter \"/nonexistent/sh\" not found"),
        "{msg}"
    );

    let bad_dir = w
        .manager
        .submit(&json!({"kind": "shell", "spec": {"script": "true", "working_dir": "/nonexistent/dir"}}))
        .expect("submit");
    let t = w.manager.wait_done(&bad_dir, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.message.unwrap_or_default().contains("/nonexistent/dir"));

    let ok = w
        .manager
        .submit_shell("echo still here", 60, 0)
        .expect("submit");
    let t = w.manager.wait_done(&ok, LONG).expect("finishes");
    assert_eq!(
        t.state,
        TaskState::Succeeded,
        "agent log:\n{}",
        a.log_text()
    );
}

#[test]
fn http_task_reports_the_answer_of_a_loopback_server() {
    let w = World::new();
    let _a = w.named_agent("agent-1");
    let ok = w
        .manager
        .submit(&json!({"kind": "http", "spec": {"url": format!("{}/healthz", w.manager.url())}}))
        .expect("submit");
    let t = w.manager.wait_done(&ok, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let log = String::from_utf8_lossy(&w.manager.logs(&ok).expect("logs")).into_owned();
    assert!(log.contains("200 OK"), "{log}");

    let missing = w
        .manager
        .submit(
            &json!({"kind": "http", "spec": {"url": format!("{}/no-such-page", w.manager.url())}}),
        )
        .expect("submit");
    let t = w.manager.wait_done(&missing, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.message.unwrap_or_default().contains("404"));
}

#[test]
fn manager_cli_submits_shows_and_prints_logs() {
    let w = World::new();
    let _a = w.named_agent("agent-1");
    let (st, out, err) = w
        .manager
        .cli(&[
            "task",
            "submit",
            "--kind",
            "shell",
            "--script",
            "echo from-cli",
            "--timeout",
            "30s",
        ])
        .expect("cli");
    assert!(st.success(), "{err}");
    let id = out.trim().to_string();
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    assert_eq!(t.state, TaskState::Succeeded);
    let (st, out, _) = w.manager.cli(&["task", "logs", &id]).expect("cli");
    assert!(st.success());
    assert_eq!(out, "from-cli\n");
    let (st, out, _) = w.manager.cli(&["task", "show", &id]).expect("cli");
    assert!(st.success());
    assert!(out.contains("succeeded"), "{out}");
    let (st, out, _) = w.manager.cli(&["delegates"]).expect("cli");
    assert!(st.success());
    assert!(out.contains("agent-1"), "{out}");
}

/// `[shell] mode = "units"` where task units cannot be used (here: no systemd at all) is
/// never quietly turned into running tasks as the agent's children (the second review:
/// detection errors fell back to direct spawn): the task is refused with the reason, its
/// script never runs, and the agent says once how to choose children instead.
#[test]
fn shell_tasks_required_as_units_are_refused_with_the_reason_never_run_as_the_agent() {
    let w = World::new();
    let a = w.agent(AgentOptions {
        extra: "[shell]\nmode = \"units\"\n".into(),
        ..AgentOptions::default()
    });
    let marker = w.tmp.path().join("ran");
    let id = w
        .manager
        .submit_shell(&format!("touch {}; echo ran", marker.display()), 60, 0)
        .expect("submit");
    let t = w.manager.wait_done(&id, LONG).expect("finishes");
    let message = t.message.clone().unwrap_or_default();
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    assert!(
        message.contains("run as delegate-task@ units on this host, which cannot be used now")
            && message.contains("not running as a systemd service"),
        "{message}"
    );
    assert!(!marker.exists(), "the script ran as the agent's child");
    assert!(w.manager.logs(&id).expect("logs").is_empty());
    let log = a.log_text();
    assert_eq!(log.matches("shell tasks wait").count(), 1, "{log}");
    assert!(log.contains("set [shell] mode = \"children\""), "{log}");
    assert!(
        !log.contains("shell tasks run as children of the agent"),
        "{log}"
    );
}
