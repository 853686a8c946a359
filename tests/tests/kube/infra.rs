//! Infrastructure failures of a Job told apart from the script's exit code: each fails the
//! task with a message naming the cause and no exit code, so retries can tell "the node
//! ran out of memory" from "the tests failed". The kubelet stand-in plays the kubelet's
//! part (env `STANDIN_SIMULATE`); the Job's deadline is the real Job controller's.

use delegate_protocol::{TaskState, TaskView};
use delegate_tests::kube::kubectl;
use delegate_tests::require;
use serde_json::json;

use crate::world::{World, node, output_lines};

/// The task failed as infrastructure: no exit code, a message starting so and holding
/// every one of `names`.
fn assert_infrastructure(t: &TaskView, log: &str, names: &[&str]) {
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert_eq!(t.exit_code, None, "not a script exit code: {t:?}");
    let msg = t.message.as_deref().unwrap_or_default();
    assert!(msg.starts_with("infrastructure failure: "), "{msg}");
    for n in names {
        assert!(msg.contains(n), "{n:?} in {msg}");
    }
}

#[test]
fn an_oom_killed_container_is_an_infrastructure_failure_not_exit_137() {
    let w = require!(World::new("job-oom", ""));
    let id = w.submit_job("echo allocating", json!({"STANDIN_SIMULATE": "OOMKilled"}));
    let (t, log) = w.finish(&id);
    assert_infrastructure(&t, &log, &["OOMKilled", "exit code 137"]);
    assert_eq!(output_lines(&log), ["allocating"], "the log still arrives");
}

#[test]
fn an_evicted_pod_is_an_infrastructure_failure_not_exit_137() {
    let w = require!(World::new("job-evicted", ""));
    let id = w.submit_job("echo working", json!({"STANDIN_SIMULATE": "Evicted"}));
    let (t, log) = w.finish(&id);
    assert_infrastructure(&t, &log, &["Evicted", "low on resource: memory"]);
}

#[test]
fn an_image_that_cannot_be_pulled_is_an_infrastructure_failure() {
    let w = require!(World::new("job-pull", ""));
    let id = w.submit_job("echo never", json!({"STANDIN_SIMULATE": "ErrImagePull"}));
    let (t, log) = w.finish(&id);
    assert_infrastructure(&t, &log, &["the pod cannot start: ", "pull access denied"]);
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("ErrImagePull") || msg.contains("ImagePullBackOff"),
        "{msg}"
    );
    assert!(output_lines(&log).is_empty(), "{log}");
}

#[test]
fn a_job_past_its_active_deadline_is_deadline_exceeded_not_the_kills_exit_code() {
    let w = require!(World::new("job-deadline", ""));
    node();
    // A full Job: the shorthand has no activeDeadlineSeconds.
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: ignored\nspec:\n  activeDeadlineSeconds: 3\n  template:\n    spec:\n      containers:\n      - name: main\n        image: stand-in/sh\n        command: [sh, -c, \"echo started; sleep 600\"]\n";
    let id = w
        .manager
        .submit(&json!({"kind": "kubernetes", "spec": {
            "cluster": "test", "action": "job", "job": job,
        }, "timeout_secs": 120, "retries": 0}))
        .expect("submit");
    // The 1.20 Job controller arms its deadline check once, on a timer set by the sync
    // that sets the Job's startTime, and otherwise checks only when something makes the
    // Job sync (later controllers re-arm it). Seen: the Job still active after 90 s with
    // no DeadlineExceeded event, 1 run in about 15 (likely the timer fired before the
    // stored startTime was 3 s old). A kubelet's status updates would make the Job sync;
    // the stand-in's pod never changes, so once the deadline has passed the test does.
    w.wait_logged(&id, "started");
    std::thread::sleep(std::time::Duration::from_secs(4));
    let _ = kubectl(
        &w.admin(),
        &[
            "-n",
            "job-deadline",
            "annotate",
            "pods",
            "-l",
            &format!("delegate.dev/task-id={id}"),
            "delegate.dev/test-poke=1",
            "--overwrite",
        ],
    );
    let (t, log) = w.finish(&id);
    assert_infrastructure(&t, &log, &["DeadlineExceeded"]);
    // (sh may add "Terminated" for its killed sleep, as it would in a container.)
    assert_eq!(output_lines(&log).first(), Some(&"started"), "{log}");
    // The real Job controller's verdict, not one the agent made up.
    let reason = kubectl(
        &w.admin(),
        &[
            "-n",
            "job-deadline",
            "get",
            "events",
            "--field-selector",
            "reason=DeadlineExceeded",
            "-o",
            "name",
        ],
    )
    .expect("kubectl");
    assert!(!reason.trim().is_empty(), "the controller's event\n{log}");
}

/// The stand-in, like a kubelet, reports the killed container (exit 143) before the
/// deletion completes: that is not the script's exit code either.
#[test]
fn a_pod_deleted_mid_run_is_not_reported_as_the_kills_exit_code() {
    let w = require!(World::new("job-killed", ""));
    let id = w.submit_job("echo started; sleep 600", json!({}));
    w.wait_logged(&id, "started");
    kubectl(
        &w.admin(),
        &[
            "-n",
            "job-killed",
            "delete",
            "pods",
            "-l",
            &format!("delegate.dev/task-id={id}"),
            "--wait=false",
        ],
    )
    .expect("delete pod");
    let (t, log) = w.finish(&id);
    assert_infrastructure(&t, &log, &["was deleted"]);
}
