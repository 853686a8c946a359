//! `in_cluster = true` with a real service-account token whose RBAC is limited to one
//! namespace, as the agent has when it runs in a pod of the cluster.
//!
//! kube reads the pod's service account from fixed paths under
//! `/var/run/secrets/kubernetes.io/serviceaccount` and the server from
//! `KUBERNETES_SERVICE_HOST`/`_PORT`. The agent runs in a private mount namespace made by
//! `unshare --mount` (root only) with a tmpfs over `/run` holding those files, so nothing
//! on the host is touched and no other process sees them.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use delegate_protocol::TaskState;
use delegate_tests::kube::kubectl;
use delegate_tests::{Manager, bin, require, wait_for};
use serde_json::json;

use crate::world::{LONG, configmap, control_plane};

/// The agent in its own mount namespace; killed on drop.
struct PodAgent {
    child: Child,
    log: std::path::PathBuf,
}

impl PodAgent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PodAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `delegate run --config CONFIG` seeing `sa_dir`'s files as its pod's service
/// account and `host:port` as the in-cluster API server.
fn start_in_pod(dir: &Path, config: &Path, sa_dir: &Path, port: u16) -> PodAgent {
    let log = dir.join("agent.log");
    let err = std::fs::File::create(&log).expect("log file");
    let script = "mount -t tmpfs delegate-test-pod /run && \
                  mkdir -p /run/secrets/kubernetes.io/serviceaccount && \
                  cp \"$1\"/token \"$1\"/ca.crt \"$1\"/namespace /run/secrets/kubernetes.io/serviceaccount/ && \
                  exec \"$2\" run --config \"$3\"";
    let child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "pod",
        ])
        .arg(sa_dir)
        .arg(bin("delegate").expect("delegate binary"))
        .arg(config)
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", port.to_string())
        .env("RUST_LOG", "info,delegate=debug")
        .env_remove("JOURNAL_STREAM")
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("DELEGATE_TOKEN")
        .env_remove("DELEGATE_MANAGER_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn unshare (the in-cluster test needs root for a mount namespace)");
    PodAgent { child, log }
}

const RBAC: &str = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: delegate\n  namespace: incluster\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: delegate\n  namespace: incluster\nrules:\n- apiGroups: [\"\"]\n  resources: [configmaps]\n  verbs: [get, list, watch, create, update, patch, delete]\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: delegate\n  namespace: incluster\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: delegate\nsubjects:\n- kind: ServiceAccount\n  name: delegate\n  namespace: incluster\n";

#[test]
fn in_cluster_config_works_in_the_service_accounts_namespace_and_rbac_refuses_another() {
    let cp = require!(control_plane());
    let admin = cp.admin_kubeconfig();
    for ns in ["incluster", "incluster-other"] {
        kubectl(&admin, &["create", "namespace", ns]).expect("namespace");
    }
    let tmp = tempfile::Builder::new()
        .prefix("delegate-kube-incluster-")
        .tempdir()
        .expect("tmp");
    let rbac = tmp.path().join("rbac.yaml");
    std::fs::write(&rbac, RBAC).expect("write");
    kubectl(&admin, &["apply", "-f", &rbac.display().to_string()]).expect("rbac");
    // The token the controller manager's tokens controller puts in the account's secret
    // (what a 1.20 kubelet mounts into a pod).
    let token = wait_for(LONG, "the service account's token secret", || {
        let secret = kubectl(
            &admin,
            &[
                "-n",
                "incluster",
                "get",
                "serviceaccount",
                "delegate",
                "-o",
                "jsonpath={.secrets[0].name}",
            ],
        )
        .ok()
        .filter(|s| !s.is_empty())?;
        kubectl(
            &admin,
            &[
                "-n",
                "incluster",
                "get",
                "secret",
                &secret,
                "-o",
                "go-template={{.data.token | base64decode}}",
            ],
        )
        .ok()
        .filter(|t| !t.is_empty())
    })
    .expect("token");
    let sa = tmp.path().join("serviceaccount");
    std::fs::create_dir(&sa).expect("mkdir");
    std::fs::write(sa.join("token"), &token).expect("token");
    std::fs::copy(cp.pki.ca(), sa.join("ca.crt")).expect("ca");
    std::fs::write(sa.join("namespace"), "incluster").expect("namespace");

    let manager = Manager::start(tmp.path()).expect("manager");
    let dtoken = manager.token("pod").expect("delegate token");
    let config = tmp.path().join("delegate.toml");
    std::fs::write(
        &config,
        format!(
            "manager_url = {:?}\ntoken = {dtoken:?}\nname = \"in-pod\"\nstate_dir = {:?}\n[docker]\nenabled = false\n[[kubernetes]]\nname = \"home\"\nin_cluster = true\n",
            manager.url(),
            tmp.path().join("state").display().to_string()
        ),
    )
    .expect("config");
    let agent = start_in_pod(tmp.path(), &config, &sa, cp.port);
    wait_for(
        Duration::from_secs(30),
        "kubernetes:home advertised",
        || {
            let d = manager.delegates().ok()?;
            d.iter()
                .flat_map(|d| d.targets.iter())
                .any(|t| t.kind == "kubernetes" && t.name.as_deref() == Some("home"))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
    // The host never saw the pod's files.
    assert!(!Path::new("/var/run/secrets/kubernetes.io").exists());

    let run = |spec: serde_json::Value| {
        let id = manager
            .submit(&json!({"kind": "kubernetes", "spec": spec, "timeout_secs": 60}))
            .expect("submit");
        let t = manager
            .wait_done(&id, LONG)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_text()));
        let log = String::from_utf8_lossy(&manager.logs(&id).unwrap_or_default()).into_owned();
        (t, log)
    };
    // No namespace given: the service account's own, from the mounted namespace file.
    let (t, log) =
        run(json!({"cluster": "home", "action": "apply", "manifest": configmap("mine", "1")}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("configmap/mine in namespace incluster created"),
        "{log}"
    );
    let managers = kubectl(
        &admin,
        &[
            "-n",
            "incluster",
            "get",
            "configmap",
            "mine",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
        ],
    )
    .expect("kubectl");
    assert_eq!(managers, "delegate");

    let (t, log) = run(
        json!({"cluster": "home", "action": "apply", "namespace": "incluster-other", "manifest": configmap("theirs", "1")}),
    );
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("configmaps \"theirs\" is forbidden: User \"system:serviceaccount:incluster:delegate\" cannot")
            && msg.contains("in the namespace \"incluster-other\""),
        "the server's RBAC message: {msg}"
    );
    for ns in ["incluster", "incluster-other"] {
        let _ = kubectl(&admin, &["delete", "namespace", ns, "--wait=false"]);
    }
}

/// The shipped in-cluster example is valid for a real API server (server-side dry run).
#[test]
fn the_example_in_cluster_manifest_is_accepted_by_the_api_server() {
    let cp = require!(control_plane());
    let admin = cp.admin_kubeconfig();
    for ns in ["apps", "delegate"] {
        // Created here because a dry run persists nothing, not even the manifest's own.
        let _ = kubectl(&admin, &["create", "namespace", ns]);
    }
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/kubernetes/delegate.yaml");
    let out = kubectl(
        &admin,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            &manifest.display().to_string(),
        ],
    )
    .expect("the example applies");
    assert!(
        out.contains("deployment.apps/delegate serverside-applied"),
        "{out}"
    );
    let text = std::fs::read_to_string(&manifest).expect("read");
    let grace: u32 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    assert!(text.contains("drain_timeout = \"10m\""), "{text}");
    // Longer than the agent's drain_timeout of 10 minutes.
    assert!(grace > 600, "{grace}");
}
