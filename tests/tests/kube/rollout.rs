//! Deployment rollouts with `kubectl rollout status`'s rules against the real Deployment
//! controller: through a rolling update, a progress deadline exceeded, a timeout.

use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::require;
use serde_json::{Value, json};

use crate::world::{World, deployment, node};

fn rollout(name: &str) -> Value {
    json!({ "cluster": "test", "action": "rollout", "kind": "Deployment", "name": name })
}

#[test]
fn rollout_waits_through_a_real_rolling_update_until_available() {
    let w = require!(World::new("rollout", ""));
    node();
    let (t, log) = w.apply(&deployment("web", "1", "", ""), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.run(rollout("web"));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("deployment \"web\" successfully rolled out"),
        "{log}"
    );

    let (t, log) = w.apply(&deployment("web", "2", "", ""), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.run(rollout("web"));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("[delegate] waiting for deployment \"web\""),
        "it waited: {log}"
    );
    // Done means what kubectl means: every replica updated and available, old ones gone.
    let status = kubectl(
        &w.admin(),
        &[
            "-n",
            "rollout",
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.status.updatedReplicas} {.status.availableReplicas} {.status.replicas}",
        ],
    )
    .expect("kubectl");
    assert_eq!(status, "2 2 2", "{log}");
    let pods = kubectl(
        &w.admin(),
        &[
            "-n", "rollout", "get", "pods", "-l", "app=web", "-o", "json",
        ],
    )
    .expect("kubectl");
    // Old pods may still be terminating (their kubelet reports them first), as kubectl's
    // rules allow: none may be left that is not on its way out.
    let pods: Value = serde_json::from_str(&pods).expect("pod list");
    let live: Vec<&Value> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| &p["spec"]["containers"][0]["env"][0]["value"])
        .collect();
    assert_eq!(live, [&json!("2"), &json!("2")], "no old pod left");
}

#[test]
fn rollout_fails_at_once_on_progress_deadline_exceeded_with_the_events() {
    let w = require!(World::new("rollout-stuck", ""));
    // Pods that no node can take: the rollout cannot progress.
    let stuck = deployment(
        "stuck",
        "1",
        "      nodeSelector: {nowhere: \"true\"}\n",
        "  progressDeadlineSeconds: 2\n",
    );
    let (t, log) = w.apply(&stuck, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let started = std::time::Instant::now();
    let (t, log) = w.run(rollout("stuck"));
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "failed fast, not at the task's timeout"
    );
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("deployment \"stuck\" exceeded its progress deadline"),
        "{msg}"
    );
    assert!(
        log.contains("recent events of Deployment rollout-stuck/stuck"),
        "{log}"
    );
    assert!(log.contains("ScalingReplicaSet"), "{log}");
}

#[test]
fn rollout_that_never_finishes_times_out() {
    let w = require!(World::new("rollout-timeout", ""));
    let stuck = deployment("slow", "1", "      nodeSelector: {nowhere: \"true\"}\n", "");
    let (t, log) = w.apply(&stuck, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.run_for(rollout("slow"), 4);
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}\n{log}");
    assert!(
        log.contains("waiting for deployment \"slow\" rollout to finish"),
        "{log}"
    );
}
