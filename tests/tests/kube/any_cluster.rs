//! The main kubernetes scenarios, written against any cluster: apply (create, then
//! unchanged), a CRD with its custom resource, a field-manager conflict without and with
//! force, a Deployment rollout through an update, a Job's whole log and exit code, and a
//! delete that takes the pods along.
//!
//! `real_cluster::` runs them against the cluster of `DELEGATE_TEST_KUBECONFIG` (any real
//! cluster this host reaches; each scenario in its own namespace, created and deleted by
//! the test; images from `DELEGATE_TEST_IMAGE`, default `busybox`), and is skipped with
//! a notice when that is unset (the test kit's `Missing::NotAsked`). `against_the_local_control_plane` runs the very same
//! scenarios on the loopback control plane and the kubelet stand-in, so they are kept
//! working by every run of this binary.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::prereq::Missing;
use delegate_tests::{require, wait_for};
use serde_json::json;

use crate::world::{LONG, World, configmap, deployment, node, output_lines};

/// Where the scenarios run.
pub struct Cluster {
    /// A kubeconfig allowed to create namespaces (and a CRD) and to run pods.
    kubeconfig: PathBuf,
    /// An image with `sh`, `seq` and `sleep`.
    image: String,
}

/// A namespace name of its own for a scenario (also unique between runs on a shared
/// cluster).
fn namespace(scenario: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "delegate-it-{scenario}-{:05x}{:x}",
        n & 0xfffff,
        std::process::id() & 0xff
    )
}

fn world(c: &Cluster, scenario: &str) -> World {
    World::on(&c.kubeconfig, &namespace(scenario), "")
}

pub fn apply_creates_then_reports_unchanged(c: &Cluster) {
    let w = world(c, "apply");
    let manifest = format!("{}---\n{}", configmap("one", "1"), configmap("two", "2"));
    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains(&format!("configmap/one in namespace {} created", w.ns)),
        "{log}"
    );
    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(
        t.message.as_deref(),
        Some("applied 2 objects: 0 created, 0 changed, 2 unchanged"),
        "{log}"
    );
    let managers = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "configmap",
            "one",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
    )
    .expect("kubectl");
    assert_eq!(managers, "delegate");
}

/// Removes a cluster-scoped CRD when the scenario ends, passed or not.
struct CrdGuard<'a>(&'a World, String);

impl Drop for CrdGuard<'_> {
    fn drop(&mut self) {
        let _ = kubectl(&self.0.admin(), &["delete", "crd", &self.1, "--wait=false"]);
    }
}

pub fn a_crd_and_its_custom_resource_apply_in_one_manifest(c: &Cluster) {
    let w = world(c, "crd");
    // CRDs are cluster-wide: a group of this namespace's own.
    let group = format!("{}.delegate.dev", w.ns);
    let _crd = CrdGuard(&w, format!("widgets.{group}"));
    let manifest = format!(
        "apiVersion: {group}/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.{group}\nspec:\n  group: {group}\n  scope: Namespaced\n  names: {{plural: widgets, singular: widget, kind: Widget}}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            properties:\n              size: {{type: integer}}\n"
    );
    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let est = log
        .find(&format!("widgets.{group} established"))
        .expect("established line");
    let cr = log
        .find(&format!("widget.{group}/w1 in namespace {} created", w.ns))
        .expect("custom resource line");
    assert!(est < cr, "{log}");
    let size = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            &format!("widgets.{group}"),
            "w1",
            "-o",
            "jsonpath={.spec.size}",
        ],
    )
    .expect("kubectl get widget");
    assert_eq!(size, "3");
}

pub fn a_conflict_fails_without_force_and_is_taken_over_with_it(c: &Cluster) {
    let w = world(c, "conflict");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cm.yaml");
    std::fs::write(&file, configmap("shared", "theirs")).expect("write");
    kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "apply",
            "--server-side",
            "--field-manager=someone-else",
            "-f",
            &file.display().to_string(),
        ],
    )
    .expect("kubectl apply");
    let (t, log) = w.apply(&configmap("shared", "ours"), false);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("someone-else") && msg.contains("set force = true"),
        "{msg}"
    );
    let (t, log) = w.apply(&configmap("shared", "ours"), true);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let value = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "configmap",
            "shared",
            "-o",
            "jsonpath={.data.key}",
        ],
    )
    .expect("kubectl");
    assert_eq!(value, "ours");
}

pub fn a_deployment_rollout_waits_through_an_update(c: &Cluster) {
    let w = world(c, "rollout");
    let web = |v: &str| {
        deployment("web", v, "      terminationGracePeriodSeconds: 1\n", "")
            .replace("stand-in/sh", &c.image)
    };
    let rollout =
        json!({"cluster": "test", "action": "rollout", "kind": "Deployment", "name": "web"});
    let (t, log) = w.apply(&web("1"), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.run(rollout.clone());
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.apply(&web("2"), false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w.run(rollout);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("[delegate] waiting for deployment \"web\""),
        "it waited: {log}"
    );
    let status = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.status.updatedReplicas} {.status.availableReplicas}",
        ],
    )
    .expect("kubectl");
    assert_eq!(status, "2 2", "{log}");
}

pub fn a_job_delivers_its_whole_log_and_its_exit_code(c: &Cluster) {
    let w = world(c, "job");
    let id = w
        .manager
        .submit(&json!({"kind": "kubernetes", "spec": {
            "cluster": "test", "action": "job", "image": c.image,
            "command": ["sh", "-c", "for i in $(seq 1 200); do echo line $i; done; exit 3"],
        }, "timeout_secs": 300, "retries": 0}))
        .expect("submit");
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    assert_eq!(t.exit_code, Some(3), "{t:?}");
    let want: Vec<String> = (1..=200).map(|i| format!("line {i}")).collect();
    assert_eq!(output_lines(&log), want, "{log}");
}

pub fn a_delete_takes_the_pods_along(c: &Cluster) {
    let w = world(c, "delete");
    let manifest = deployment("gone", "1", "      terminationGracePeriodSeconds: 1\n", "")
        .replace("stand-in/sh", &c.image);
    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) = w
        .run(json!({"cluster": "test", "action": "rollout", "kind": "Deployment", "name": "gone"}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let (t, log) =
        w.run(json!({"cluster": "test", "action": "delete", "kind": "Deployment", "name": "gone"}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains(&format!("deployment/gone in namespace {} deleted", w.ns)),
        "{log}"
    );
    wait_for(LONG, "the Deployment's pods to go", || {
        let out = kubectl(
            &w.admin(),
            &["-n", &w.ns, "get", "pods", "-l", "app=gone", "-o", "name"],
        )
        .ok()?;
        out.trim().is_empty().then_some(())
    })
    .expect("pods deleted with their Deployment");
}

type Scenario = fn(&Cluster);

const SCENARIOS: &[(&str, Scenario)] = &[
    ("apply", apply_creates_then_reports_unchanged),
    ("crd", a_crd_and_its_custom_resource_apply_in_one_manifest),
    (
        "conflict",
        a_conflict_fails_without_force_and_is_taken_over_with_it,
    ),
    ("rollout", a_deployment_rollout_waits_through_an_update),
    ("job", a_job_delivers_its_whole_log_and_its_exit_code),
    ("delete", a_delete_takes_the_pods_along),
];

/// Every scenario at once (each in its own namespace), panicking with the names of those
/// that failed.
fn run_all(c: &Cluster) {
    let failed: Vec<&str> = std::thread::scope(|s| {
        let runs: Vec<_> = SCENARIOS
            .iter()
            .map(|(name, f)| (*name, s.spawn(move || f(c))))
            .collect();
        runs.into_iter()
            .filter_map(|(name, h)| h.join().is_err().then_some(name))
            .collect()
    });
    assert!(
        failed.is_empty(),
        "scenarios failed: {failed:?} (their panics are above)"
    );
}

#[test]
fn against_the_local_control_plane() {
    let cp = require!(crate::world::control_plane());
    node();
    run_all(&Cluster {
        kubeconfig: cp.admin_kubeconfig(),
        image: "stand-in/sh".into(),
    });
}

/// Against the cluster of `DELEGATE_TEST_KUBECONFIG`:
/// `DELEGATE_TEST_KUBECONFIG=/path/kubeconfig cargo test -p delegate-tests --test kube real_cluster::`
mod real_cluster {
    use super::*;

    /// The cluster to use, or a notice (also in CI: no real cluster there) saying how to
    /// run these against one.
    fn cluster() -> Result<Cluster, Missing> {
        let Some(kc) = std::env::var_os("DELEGATE_TEST_KUBECONFIG").filter(|v| !v.is_empty())
        else {
            return Err(Missing::NotAsked {
                what: "a real cluster (DELEGATE_TEST_KUBECONFIG)".into(),
                how: "set DELEGATE_TEST_KUBECONFIG to a kubeconfig of a cluster to run real_cluster:: there".into(),
            });
        };
        let kubeconfig = std::fs::canonicalize(&kc).unwrap_or_else(|e| {
            panic!(
                "DELEGATE_TEST_KUBECONFIG={}: {e}",
                PathBuf::from(&kc).display()
            )
        });
        let image = std::env::var("DELEGATE_TEST_IMAGE")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "busybox".to_string());
        Ok(Cluster { kubeconfig, image })
    }

    macro_rules! scenario {
        ($($name:ident),* $(,)?) => {$(
            #[test]
            fn $name() {
                let c = require!(cluster());
                super::$name(&c);
            }
        )*};
    }

    scenario!(
        apply_creates_then_reports_unchanged,
        a_crd_and_its_custom_resource_apply_in_one_manifest,
        a_conflict_fails_without_force_and_is_taken_over_with_it,
        a_deployment_rollout_waits_through_an_update,
        a_job_delivers_its_whole_log_and_its_exit_code,
        a_delete_takes_the_pods_along,
    );
}
