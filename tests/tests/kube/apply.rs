//! Server-side apply against the real API server: the cluster advertised as a target (and
//! one that does not answer, not), created then unchanged, a CRD with its custom resource,
//! a field-manager conflict without and with force, a manifest that does not parse, a
//! cluster that is down.

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::require;
use serde_json::json;

use crate::world::{World, cm_value, configmap, control_plane};

#[test]
fn the_cluster_is_advertised_and_an_unreachable_one_is_not() {
    let w = require!(World::new(
        "advertise",
        "[[kubernetes]]\nname = \"gone\"\nkubeconfig = \"/nonexistent/gone.yaml\"\n",
    ));
    let d = w.manager.delegates().expect("delegates");
    let kube: Vec<Option<&str>> = d[0]
        .targets
        .iter()
        .filter(|t| t.kind == "kubernetes")
        .map(|t| t.name.as_deref())
        .collect();
    assert_eq!(kube, [Some("test")], "targets: {:?}", d[0].targets);
    let log = w.agent.log_text();
    assert_eq!(
        log.matches("kubernetes:gone not offered").count(),
        1,
        "said once: {log}"
    );
    assert!(log.contains("/nonexistent/gone.yaml"), "{log}");
}

#[test]
fn apply_creates_then_reports_unchanged_and_kubectl_sees_field_manager_delegate() {
    let w = require!(World::new("apply-twice", ""));
    let manifest = format!(
        "{}---\n{}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 0\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: web\n        image: example.invalid/web:1\n",
        configmap("one", "1"),
        configmap("two", "2")
    );
    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("configmap/one in namespace apply-twice created"),
        "{log}"
    );
    assert!(
        log.contains("deployment.apps/web in namespace apply-twice created"),
        "{log}"
    );
    assert_eq!(
        t.message.as_deref(),
        Some("applied 3 objects: 3 created, 0 changed, 0 unchanged")
    );

    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("configmap/two in namespace apply-twice unchanged"),
        "{log}"
    );
    assert_eq!(
        t.message.as_deref(),
        Some("applied 3 objects: 0 created, 0 changed, 3 unchanged")
    );

    let changed = manifest.replace("key: \"2\"", "key: \"22\"");
    let (t, log) = w.apply(&changed, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("configmap/two in namespace apply-twice changed"),
        "{log}"
    );
    assert_eq!(cm_value(&w.admin(), &w.ns, "two"), "22");

    let yaml = kubectl(
        &w.admin(),
        &[
            "-n",
            &w.ns,
            "get",
            "deployment",
            "web",
            "-o",
            "yaml",
            "--show-managed-fields",
        ],
    )
    .expect("kubectl get");
    assert!(yaml.contains("manager: delegate"), "{yaml}");
    assert!(yaml.contains("operation: Apply"), "{yaml}");
}

#[test]
fn a_crd_and_its_custom_resource_apply_in_one_manifest() {
    let w = require!(World::new("crd", ""));
    // The custom resource comes first: the agent must still apply the CRD before it.
    let manifest = "apiVersion: example.delegate.dev/v1\nkind: Widget\nmetadata:\n  name: w1\nspec:\n  size: 3\n---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: widgets.example.delegate.dev\nspec:\n  group: example.delegate.dev\n  scope: Namespaced\n  names: {plural: widgets, singular: widget, kind: Widget}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            properties:\n              size: {type: integer}\n";
    let (t, log) = w.apply(manifest, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let crd_at = log
        .find("customresourcedefinition.apiextensions.k8s.io/widgets.example.delegate.dev created")
        .expect("CRD line");
    let est_at = log
        .find("widgets.example.delegate.dev established")
        .expect("established line");
    let cr_at = log
        .find("widget.example.delegate.dev/w1 in namespace crd created")
        .expect("CR line");
    assert!(crd_at < est_at && est_at < cr_at, "{log}");
    if log.contains("waiting for the API server to serve Widget") {
        // Not a failure: the server's discovery lagged Established and the agent waited.
        // Written past libtest's capture so that runs show how often it happens.
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "note: a_crd_and_its_custom_resource_apply_in_one_manifest: discovery lagged Established; the agent waited"
        );
    }
    let size = kubectl(
        &w.admin(),
        &[
            "-n",
            "crd",
            "get",
            "widgets.example.delegate.dev",
            "w1",
            "-o",
            "jsonpath={.spec.size}",
        ],
    )
    .expect("kubectl get widget");
    assert_eq!(size, "3");
}

#[test]
fn a_conflicting_field_manager_fails_without_force_and_is_taken_over_with_it() {
    let w = require!(World::new("conflict", ""));
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("cm.yaml");
    std::fs::write(&file, configmap("shared", "theirs")).expect("write");
    kubectl(
        &w.admin(),
        &[
            "-n",
            "conflict",
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
        msg.contains("manifest document 1 (configmap/shared in namespace conflict)"),
        "{msg}"
    );
    assert!(
        msg.contains("someone-else"),
        "the server's conflict message: {msg}"
    );
    assert!(msg.contains("set force = true"), "{msg}");
    assert_eq!(cm_value(&w.admin(), "conflict", "shared"), "theirs");

    let (t, log) = w.apply(&configmap("shared", "ours"), true);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("configmap/shared in namespace conflict changed"),
        "{log}"
    );
    assert_eq!(cm_value(&w.admin(), "conflict", "shared"), "ours");
}

#[test]
fn a_malformed_manifest_fails_with_the_document_index_and_the_parse_error() {
    let w = require!(World::new("malformed", ""));
    let manifest = format!(
        "{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: [oops\n",
        configmap("fine", "1")
    );
    let (t, log) = w.apply(&manifest, false);
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("manifest document 2 is not valid YAML: "),
        "{msg}"
    );
    // Nothing is applied when any document is broken.
    assert!(
        kubectl(&w.admin(), &["-n", "malformed", "get", "configmap", "fine"]).is_err(),
        "the good document must not be applied"
    );
}

#[test]
fn an_unreachable_cluster_fails_the_task_naming_the_cluster_and_server() {
    let cp = require!(control_plane());
    // A kubeconfig for a port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let dir = tempfile::tempdir().expect("tmp");
    let kc = dir.path().join("down.yaml");
    let text = cp
        .kubeconfig_text("x")
        .replace(&cp.url(), &format!("https://127.0.0.1:{port}"));
    std::fs::write(&kc, text).expect("write");
    let w = require!(World::new(
        "unreachable",
        &format!(
            "[[kubernetes]]\nname = \"down\"\nkubeconfig = {:?}\n",
            kc.display().to_string()
        ),
    ));
    let (t, log) =
        w.run(json!({ "cluster": "down", "action": "apply", "manifest": configmap("x", "1") }));
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.starts_with(&format!("cluster down (https://127.0.0.1:{port}): ")),
        "{msg}"
    );
    assert!(msg.contains("onnection refused"), "the cause: {msg}");
}
