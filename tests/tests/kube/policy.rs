//! What bounds a kubernetes task beyond the credential's RBAC: the
//! cluster's policy in `[[kubernetes]]` (allowed namespaces and kinds, no cluster-scoped
//! kind unless named), a Job bound to the attempt that created it (a nonce in its name and
//! labels, its uid as the precondition of every delete), and the shipped in-cluster
//! example (Pod Security Admission labels, RBAC without secrets or list beyond pods).

use std::path::Path;
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::{require, wait_for};
use serde_json::{Value, json};

use crate::world::{LONG, World, configmap, control_plane, node, output_lines};

const POLICY: &str = "allowed_namespaces = [\"kube-policy\"]\nallowed_kinds = [\"ConfigMap\", \"Job.batch\", \"Namespace\"]\n";

fn exists(kc: &Path, args: &[&str]) -> bool {
    kubectl(kc, args).is_ok()
}

#[test]
fn the_policy_refuses_other_namespaces_kinds_and_cluster_scoped_objects_before_changing_anything() {
    let w = require!(World::new("kube-policy", POLICY));
    let admin = w.admin();
    let crb = "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: kube-policy-escalate\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: cluster-admin\nsubjects:\n- kind: ServiceAccount\n  name: default\n  namespace: kube-policy\n";
    // A cluster-scoped kind the policy does not name: the whole manifest is refused,
    // including the ConfigMap before it.
    let (t, log) = w.apply(&format!("{}---\n{crb}", configmap("first", "1")), false);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("manifest document 2 (clusterrolebinding.rbac.authorization.k8s.io/kube-policy-escalate): refused by the delegate's policy, nothing was applied"),
        "{msg}"
    );
    assert!(msg.contains("is cluster-scoped"), "{msg}");
    assert!(
        !exists(&admin, &["-n", "kube-policy", "get", "configmap", "first"]),
        "nothing applied"
    );
    assert!(!exists(
        &admin,
        &["get", "clusterrolebinding", "kube-policy-escalate"]
    ));

    // Another namespace, named in the manifest.
    let other =
        configmap("elsewhere", "1").replace("metadata:\n", "metadata:\n  namespace: default\n");
    let (t, _) = w.apply(&other, false);
    let msg = t.message.unwrap_or_default();
    assert_eq!(t.state, TaskState::Failed, "{msg}");
    assert!(
        msg.contains("namespace \"default\" is not allowed on cluster test"),
        "{msg}"
    );
    assert!(!exists(
        &admin,
        &["-n", "default", "get", "configmap", "elsewhere"]
    ));

    // A kind the policy does not name.
    let secret = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\nstringData:\n  k: v\n";
    let (t, _) = w.apply(secret, false);
    let msg = t.message.unwrap_or_default();
    assert_eq!(t.state, TaskState::Failed, "{msg}");
    assert!(
        msg.contains("kind Secret.core is not allowed on cluster test"),
        "{msg}"
    );

    // Deleting a namespace the policy does not allow: refused, still there.
    let (t, _) = w.run(
        json!({"cluster": "test", "action": "delete", "kind": "Namespace", "name": "default"}),
    );
    let msg = t.message.unwrap_or_default();
    assert_eq!(t.state, TaskState::Failed, "{msg}");
    assert!(
        msg.contains("refused by the delegate's policy, nothing was deleted"),
        "{msg}"
    );
    assert!(exists(&admin, &["get", "namespace", "default"]));

    // A Job in another namespace: refused before anything is created.
    node();
    let (t, _) = w.run(
        json!({"cluster": "test", "action": "job", "image": "stand-in/sh",
        "command": ["sh", "-c", "echo hi"], "namespace": "default"}),
    );
    let msg = t.message.unwrap_or_default();
    assert_eq!(t.state, TaskState::Failed, "{msg}");
    assert!(
        msg.starts_with("refused by the delegate's policy: namespace \"default\""),
        "{msg}"
    );

    // What the policy allows works.
    let (t, log) = w.apply(&configmap("allowed", "1"), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.finish(&w.submit_job("echo allowed", json!({})));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(output_lines(&log), ["allowed"]);
}

/// The name the agent gave a task's Job before the nonce: `delegate-<id>-<attempt>`.
fn predictable_job_name(task_id: &str, attempt: u32) -> String {
    let id: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("delegate-{}-{attempt}", id.trim_matches('-')).replace("--", "-")
}

/// A Job of the stand-in node running `script`, with `labels`.
fn job_yaml(name: &str, labels: &Value, script: &str) -> String {
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels},
        "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "stand-in/sh", "command": ["sh", "-c", script]}]}}}
    })
    .to_string()
}

fn create(admin: &Path, ns: &str, yaml: &str) {
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("obj.json");
    std::fs::write(&f, yaml).expect("write");
    kubectl(admin, &["-n", ns, "create", "-f", &f.display().to_string()]).expect("create");
}

fn uid_of(admin: &Path, ns: &str, job: &str) -> Option<String> {
    kubectl(
        admin,
        &[
            "-n",
            ns,
            "get",
            "job",
            job,
            "-o",
            "jsonpath={.metadata.uid}",
        ],
    )
    .ok()
    .filter(|u| !u.is_empty())
}

/// Someone who can create Jobs in the namespace makes one, under the name the task's Job
/// would get and with its labels, before the agent takes the task. The agent must run
/// its own Job and leave that one alone.
#[test]
fn a_job_made_first_under_a_tasks_job_name_is_not_adopted() {
    let mut w = require!(World::new("job-squat", ""));
    let admin = w.admin();
    node();
    w.agent.kill9();
    let id = w
        .manager
        .submit(&json!({ "kind": "kubernetes", "spec": {
            "cluster": "test", "action": "job", "image": "stand-in/sh",
            "command": ["sh", "-c", "echo the tasks own output"],
        }, "timeout_secs": 120, "retries": 0 }))
        .expect("submit");
    let squat = predictable_job_name(&id, 1);
    create(
        &admin,
        "job-squat",
        &job_yaml(
            &squat,
            &json!({"delegate.dev/task-id": id, "delegate.dev/attempt": "1"}),
            "echo squatted; exit 0",
        ),
    );
    let squat_uid = uid_of(&admin, "job-squat", &squat).expect("squatter's uid");
    w.agent.restart().expect("agent starts");
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(output_lines(&log), ["the tasks own output"], "{log}");
    assert!(!log.contains(&format!("Job job-squat/{squat} ")), "{log}");
    assert_eq!(
        uid_of(&admin, "job-squat", &squat),
        Some(squat_uid),
        "left alone"
    );
}

/// The task's Job is deleted (its pod orphaned) and another Job made under its name; when
/// the orphaned pod goes, the agent ends the task and must not delete the new Job.
#[test]
fn a_job_made_again_under_a_tasks_job_name_is_not_deleted_by_the_agent() {
    let w = require!(World::new("job-replaced", ""));
    let admin = w.admin();
    let id = w.submit_job("echo started; sleep 600", json!({}));
    w.wait_logged(&id, "started");
    let name = kubectl(
        &admin,
        &[
            "-n",
            "job-replaced",
            "get",
            "jobs",
            "-l",
            &format!("delegate.dev/task-id={id}"),
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ],
    )
    .expect("the task's Job");
    let old_uid = uid_of(&admin, "job-replaced", &name).expect("uid");
    kubectl(
        &admin,
        &[
            "-n",
            "job-replaced",
            "delete",
            "job",
            &name,
            "--cascade=orphan",
        ],
    )
    .expect("orphan delete");
    wait_for(LONG, "the old Job gone", || {
        uid_of(&admin, "job-replaced", &name)
            .is_none()
            .then_some(())
    })
    .expect("gone");
    create(
        &admin,
        "job-replaced",
        &job_yaml(&name, &json!({"app": "replacement"}), "sleep 600"),
    );
    let new_uid = uid_of(&admin, "job-replaced", &name).expect("new uid");
    kubectl(
        &admin,
        &[
            "-n",
            "job-replaced",
            "delete",
            "pods",
            "-l",
            &format!("controller-uid={old_uid}"),
            "--wait=false",
        ],
    )
    .expect("delete the orphaned pod");
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.starts_with("infrastructure failure: pod job-replaced/"),
        "{msg}"
    );
    // The agent's delete has come and gone by the time the task has its result.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        uid_of(&admin, "job-replaced", &name),
        Some(new_uid),
        "the new Job is not ours to delete"
    );
}

/// The shipped in-cluster example, applied for real without its Deployment and Secret:
/// its namespaces enforce Pod Security Admission `restricted` (labels only on this 1.20
/// API server, which predates the admission plugin), and its service account reads no
/// secret and lists nothing but pods.
#[test]
fn the_example_namespaces_are_restricted_and_its_rbac_grants_no_secrets() {
    let cp = require!(control_plane());
    let admin = cp.admin_kubeconfig();
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/kubernetes/delegate.yaml");
    let text = std::fs::read_to_string(&manifest).expect("read");
    let kept: Vec<&str> = text
        .split("\n---\n")
        .filter(|d| {
            ["Namespace", "ServiceAccount", "Role", "RoleBinding"]
                .iter()
                .any(|k| {
                    d.lines().any(|l| l.trim() == format!("kind: {k}"))
                        && !d.contains("kind: Deployment")
                })
        })
        .collect();
    for ns in ["apps", "delegate"] {
        // Made first (as the other example test does) so a Role applies either way.
        let _ = kubectl(&admin, &["create", "namespace", ns]);
    }
    let dir = tempfile::tempdir().expect("tmp");
    let f = dir.path().join("rbac.yaml");
    std::fs::write(&f, kept.join("\n---\n")).expect("write");
    kubectl(
        &admin,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &f.display().to_string(),
        ],
    )
    .expect("applies");
    let can = |verb: &str, what: &str| {
        let (resource, sub) = what.split_once('/').unwrap_or((what, ""));
        let mut cmd = std::process::Command::new("kubectl");
        cmd.arg(format!("--kubeconfig={}", admin.display())).args([
            "auth",
            "can-i",
            verb,
            resource,
            "-n",
            "apps",
            "--as=system:serviceaccount:delegate:delegate",
        ]);
        if !sub.is_empty() {
            cmd.arg(format!("--subresource={sub}"));
        }
        let out = cmd.output().expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (verb, what) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("list", "configmaps"),
        ("watch", "deployments"),
        ("create", "pods"),
        ("delete", "pods"),
    ] {
        assert!(!can(verb, what), "the example's role may {verb} {what}");
    }
    for (verb, what) in [
        ("create", "jobs"),
        ("patch", "deployments"),
        ("get", "pods"),
        ("list", "pods"),
        ("get", "pods/log"),
        ("list", "events"),
    ] {
        assert!(can(verb, what), "the agent needs {verb} {what}");
    }
    for ns in ["apps", "delegate"] {
        let enforce = kubectl(
            &admin,
            &[
                "get",
                "namespace",
                ns,
                "-o",
                "jsonpath={.metadata.labels.pod-security\\.kubernetes\\.io/enforce}",
            ],
        )
        .expect("labels");
        assert_eq!(enforce, "restricted", "namespace {ns}");
    }
}
