//! StatefulSet and DaemonSet rollouts against the real controllers: the kubelet stand-in
//! runs their pods and reports them Ready, the controllers replace them on an update, and
//! the agent waits with kubectl's rules until the update is done.

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::require;
use serde_json::{Value, json};

use crate::world::{World, node};

/// A workload of `kind` whose pods sleep on the stand-in node, with env V=`v`.
fn workload(kind: &str, name: &str, v: &str) -> String {
    let extra = match kind {
        "StatefulSet" => format!("  serviceName: {name}\n  replicas: 2\n"),
        _ => String::new(),
    };
    format!(
        "apiVersion: apps/v1\nkind: {kind}\nmetadata:\n  name: {name}\nspec:\n{extra}  updateStrategy:\n    type: RollingUpdate\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - name: main\n        image: stand-in/sh\n        command: [sleep, \"3600\"]\n        env: [{{name: V, value: \"{v}\"}}]\n"
    )
}

/// The V of every pod of `app` that is not on its way out.
fn live_versions(w: &World, app: &str) -> Vec<String> {
    let out = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "pods",
            "-l",
            &format!("app={app}"),
            "-o",
            "json",
        ],
    )
    .expect("kubectl");
    let pods: Value = serde_json::from_str(&out).expect("pod list");
    let mut v: Vec<String> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            p["spec"]["containers"][0]["env"][0]["value"]
                .as_str()
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    v.sort();
    v
}

/// Apply version 1, roll out, apply version 2, roll out again: the second rollout waits
/// through the controller's update and ends with `done` in the log and message.
fn roll_through_an_update(w: &World, kind: &str, name: &str, done: &str) {
    node();
    let rollout = json!({"cluster": "test", "action": "rollout", "kind": kind, "name": name});
    let (t, log) = w.apply(&workload(kind, name, "1"), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.run(rollout.clone());
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");

    let (t, log) = w.apply(&workload(kind, name, "2"), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(log.contains(" changed"), "{log}");
    let (t, log) = w.run(rollout);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(log.contains("[delegate] waiting for "), "it waited: {log}");
    let msg = t.message.unwrap_or_default();
    assert!(msg.contains(done), "{msg}\n{log}");
}

#[test]
fn a_statefulset_rollout_waits_through_an_update_until_every_pod_is_at_the_new_revision() {
    let w = require!(World::new("rollout-sts", ""));
    roll_through_an_update(
        &w,
        "StatefulSet",
        "db",
        "statefulset \"db\" rolling update complete 2 pods at revision db-",
    );
    let status = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "statefulset",
            "db",
            "-o",
            "jsonpath={.status.readyReplicas} {.status.updatedReplicas} {.status.currentRevision} {.status.updateRevision}",
        ],
    )
    .expect("kubectl");
    let f: Vec<&str> = status.split(' ').collect();
    assert_eq!(&f[..2], ["2", "2"], "{status}");
    assert_eq!(f[2], f[3], "current revision is the update's: {status}");
    assert_eq!(live_versions(&w, "db"), ["2", "2"]);
}

#[test]
fn a_daemonset_rollout_waits_through_an_update_until_its_node_runs_the_new_pod() {
    let w = require!(World::new("rollout-ds", ""));
    roll_through_an_update(
        &w,
        "DaemonSet",
        "agent",
        "daemon set \"agent\" successfully rolled out",
    );
    let status = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "daemonset",
            "agent",
            "-o",
            "jsonpath={.status.desiredNumberScheduled} {.status.updatedNumberScheduled} {.status.numberAvailable}",
        ],
    )
    .expect("kubectl");
    assert_eq!(status, "1 1 1", "one node, the stand-in");
    assert_eq!(live_versions(&w, "agent"), ["2"]);
}
