//! Jobs on the kubelet stand-in: the pod's whole log and the container's exit code, a
//! follow stream cut or left open, a deleted pod, and `kill -9` of the agent mid-job.

use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::{require, wait_for};
use serde_json::json;

use crate::world::{LONG, World, node, output_lines};

fn numbered(from: u32, to: u32) -> Vec<String> {
    (from..=to).map(|i| format!("line {i}")).collect()
}

#[test]
fn a_job_streams_its_whole_log_and_reports_its_exit_code() {
    let w = require!(World::new("job-exit", ""));
    let id = w.submit_job(
        "for i in $(seq 1 300); do echo line $i; done; echo \"greeting $GREETING\"; exit 3",
        json!({"GREETING": "hi"}),
    );
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert_eq!(t.exit_code, Some(3), "{t:?}");
    let mut want = numbered(1, 300);
    want.push("greeting hi".into());
    assert_eq!(output_lines(&log), want, "{log}");
    let msg = t.message.unwrap_or_default();
    assert!(!msg.contains("infrastructure"), "a script failure: {msg}");
    // The Job carries the settings that make it safe to supervise.
    let job = kubectl(
        &w.admin(),
        &[
            "-n",
            "job-exit",
            "get",
            "jobs",
            "-l",
            &format!("delegate.dev/task-id={id}"),
            "-o",
            "jsonpath={.items[0].spec.backoffLimit} {.items[0].spec.template.spec.restartPolicy}",
        ],
    )
    .expect("kubectl");
    assert_eq!(job, "0 Never");
}

#[test]
fn a_job_that_succeeds_succeeds() {
    let w = require!(World::new("job-ok", ""));
    let id = w.submit_job("echo done", json!({}));
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(t.exit_code, Some(0));
    assert_eq!(output_lines(&log), ["done"]);
}

#[test]
fn a_follow_stream_cut_mid_job_is_resumed_without_gaps_or_repeats() {
    let w = require!(World::new("job-cut", ""));
    let id = w.submit_job(
        "for i in $(seq 1 60); do echo line $i; sleep 0.02; done",
        json!({"STANDIN_CUT_FOLLOW_AFTER": "7"}),
    );
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(output_lines(&log), numbered(1, 60), "{log}");
    assert!(node().cuts() >= 3, "streams were cut: {}", node().cuts());
}

/// A follow stream that stays open after the container ended (a stuck kubelet or proxy)
/// does not keep the task waiting: the end is decided from the container.
#[test]
fn a_follow_stream_left_open_after_the_container_ended_does_not_hang_the_task() {
    let w = require!(World::new("job-held", ""));
    let id = w.submit_job(
        "for i in $(seq 1 20); do echo line $i; done; exit 4",
        json!({"STANDIN_HOLD_FOLLOW": "1"}),
    );
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert_eq!(t.exit_code, Some(4), "{t:?}\n{log}");
    assert_eq!(output_lines(&log), numbered(1, 20), "{log}");
    assert!(
        node().held() >= 1,
        "a stream was held open: {}",
        node().held()
    );
}

#[test]
fn a_deleted_pod_is_an_infrastructure_failure_not_an_exit_code() {
    let w = require!(World::new("job-deleted", ""));
    let id = w.submit_job("echo started; sleep 600", json!({}));
    w.wait_logged(&id, "started");
    kubectl(
        &w.admin(),
        &[
            "-n",
            "job-deleted",
            "delete",
            "pods",
            "-l",
            &format!("delegate.dev/task-id={id}"),
            "--wait=false",
        ],
    )
    .expect("delete pod");
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert_eq!(t.exit_code, None, "{t:?}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("infrastructure failure: pod job-deleted/"),
        "{msg}"
    );
    assert!(msg.contains("was deleted"), "{msg}");
    // The Job goes too, so its controller's replacement pod does not run on unwatched.
    wait_for(LONG, "the Job to be deleted", || {
        let out = kubectl(
            &w.admin(),
            &[
                "-n",
                "job-deleted",
                "get",
                "jobs",
                "-l",
                &format!("delegate.dev/task-id={id}"),
                "-o",
                "name",
            ],
        )
        .ok()?;
        out.trim().is_empty().then_some(())
    })
    .expect("job deleted");
}

#[test]
fn kill_9_of_the_agent_during_a_job_loses_and_repeats_no_line() {
    let mut w = require!(World::new("job-kill9", ""));
    let id = w.submit_job(
        "for i in $(seq 1 80); do echo line $i; sleep 0.05; done; exit 5",
        json!({}),
    );
    wait_for(LONG, "ten lines shipped", || {
        let l = w.manager.logs(&id).ok()?;
        (String::from_utf8_lossy(&l).matches("line ").count() >= 10).then_some(())
    })
    .expect("lines");
    w.agent.kill9();
    // Lines go on being printed while the agent is down.
    std::thread::sleep(Duration::from_millis(800));
    w.agent.restart().expect("restart");
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert_eq!(t.exit_code, Some(5), "the real exit code: {t:?}");
    assert_eq!(output_lines(&log), numbered(1, 80), "{log}");
    assert!(log.contains("re-attached to Job job-kill9/"), "{log}");
}
