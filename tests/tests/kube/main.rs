//! The kubernetes target against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler from `scripts/kube-build`) on loopback: the
//! real manager and agent binaries, cross-checked with the real `kubectl`.
//!
//! One control plane serves the whole binary (it takes ~10 s to start); each test works in
//! its own namespace with its own manager and agent.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use delegate_protocol::{TaskState, TaskView};
use delegate_tests::kube::{ControlPlane, LIMITED_TOKEN, kubectl};
use delegate_tests::{Agent, AgentOptions, Manager, wait_for};
use kubelet::Kubelet;
use serde_json::{Value, json};
use tempfile::TempDir;

mod any_cluster;
mod incluster;
mod infra;
mod kubelet;
mod late;
mod logs;
mod policy;
mod workloads;

const LONG: Duration = Duration::from_secs(90);

fn control_plane() -> &'static ControlPlane {
    static CP: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    match CP.get_or_init(|| ControlPlane::start().map_err(|e| format!("{e:#}"))) {
        Ok(cp) => cp,
        Err(e) => panic!("the test control plane did not start: {e}"),
    }
}

/// The one node of the control plane, played by the kubelet stand-in.
fn node() -> &'static Kubelet {
    static NODE: OnceLock<Kubelet> = OnceLock::new();
    NODE.get_or_init(|| Kubelet::start(control_plane(), "standin-1"))
}

struct World {
    manager: Manager,
    agent: Agent,
    /// A kubeconfig with the rights to check and clean up what a test did.
    admin: PathBuf,
    /// This test's namespace, created by the world.
    ns: String,
    _tmp: TempDir,
}

impl World {
    /// A manager and an agent with cluster `test` (admin) plus `extra` config lines, and
    /// a fresh namespace `ns`.
    fn new(ns: &str, extra: &str) -> World {
        World::on(&control_plane().admin_kubeconfig(), ns, extra)
    }

    /// The same on the cluster of `admin` (cluster `test` of the agent uses it too).
    fn on(admin: &Path, ns: &str, extra: &str) -> World {
        World::with_top(admin, ns, "", extra)
    }

    /// The same with `top` config lines before the agent's tables (top-level keys such as
    /// `max_log_bytes`).
    fn with_top(admin: &Path, ns: &str, top: &str, extra: &str) -> World {
        let tmp = tempfile::Builder::new()
            .prefix("delegate-kube-it-")
            .tempdir()
            .expect("temp dir");
        kubectl(admin, &["create", "namespace", ns]).expect("namespace");
        // Pods need the namespace's default service account (the controller makes it).
        wait_for(
            Duration::from_secs(30),
            "the default service account",
            || kubectl(admin, &["-n", ns, "get", "serviceaccount", "default"]).ok(),
        )
        .expect("service account");
        let manager = Manager::start(tmp.path()).expect("manager starts");
        let token = manager.token("test").expect("token");
        let agent = Agent::start(
            tmp.path(),
            &manager.url(),
            &token,
            &AgentOptions {
                name: format!("kube-{ns}"),
                extra: format!(
                    "{top}[docker]\nenabled = false\n[[kubernetes]]\nname = \"test\"\nkubeconfig = {:?}\nnamespace = {ns:?}\n{extra}",
                    admin.display().to_string()
                ),
                ..AgentOptions::default()
            },
        )
        .expect("agent starts");
        agent
            .wait_log("registered with the manager", Duration::from_secs(30))
            .expect("the agent registers");
        World {
            manager,
            agent,
            admin: admin.to_path_buf(),
            ns: ns.to_string(),
            _tmp: tmp,
        }
    }

    fn admin(&self) -> PathBuf {
        self.admin.clone()
    }

    /// Run a kubernetes task on cluster `cluster` to its end: its view and its log.
    fn run(&self, spec: Value) -> (TaskView, String) {
        self.run_for(spec, 120)
    }

    fn run_for(&self, spec: Value, timeout_secs: u64) -> (TaskView, String) {
        let task = json!({ "kind": "kubernetes", "spec": spec, "timeout_secs": timeout_secs, "retries": 0 });
        let id = self.manager.submit(&task).expect("submit");
        self.finish(&id)
    }

    /// Submit a shorthand job running `script` with `sh -c` on the stand-in node.
    fn submit_job(&self, script: &str, env: Value) -> String {
        node();
        self.manager
            .submit(&json!({ "kind": "kubernetes", "spec": {
                "cluster": "test", "action": "job", "image": "stand-in/sh",
                "command": ["sh", "-c", script], "env": env,
            }, "timeout_secs": 120, "retries": 0 }))
            .expect("submit")
    }

    /// Wait for a task's end and its whole log.
    /// Wait until the task's log on the manager holds `text`.
    fn wait_logged(&self, id: &str, text: &str) {
        wait_for(LONG, &format!("{text:?} in the task's log"), || {
            let l = self.manager.logs(id).ok()?;
            String::from_utf8_lossy(&l).contains(text).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.diagnostics()));
    }

    fn finish(&self, id: &str) -> (TaskView, String) {
        let t = match self.manager.wait_done(id, LONG) {
            Ok(t) => t,
            Err(e) => panic!("{e:#}\n{}", self.diagnostics()),
        };
        let log = wait_for(Duration::from_secs(10), "the whole log", || {
            let l = self.manager.logs(id).ok()?;
            (l.len() as u64 >= t.log_bytes).then_some(l)
        })
        .expect("log");
        (t, String::from_utf8_lossy(&log).into_owned())
    }

    /// What the cluster and the agent say, for a failing test's message.
    fn diagnostics(&self) -> String {
        let get = |args: &[&str]| kubectl(&self.admin(), args).unwrap_or_else(|e| format!("{e:#}"));
        format!(
            "--- nodes ---\n{}\n--- jobs and pods ---\n{}\n--- events ---\n{}\n--- agent log ---\n{}",
            get(&["get", "nodes", "-o", "wide"]),
            get(&["-n", &self.ns, "get", "jobs,pods", "-o", "wide"]),
            get(&["-n", &self.ns, "get", "events"]),
            self.agent.log_text()
        )
    }

    fn apply(&self, manifest: &str, force: bool) -> (TaskView, String) {
        self.run(
            json!({ "cluster": "test", "action": "apply", "manifest": manifest, "force": force }),
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = kubectl(
            &self.admin(),
            &["delete", "namespace", &self.ns, "--wait=false"],
        );
    }
}

fn configmap(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  key: {value:?}\n")
}

fn cm_value(kc: &Path, ns: &str, name: &str) -> String {
    kubectl(
        kc,
        &[
            "-n",
            ns,
            "get",
            "configmap",
            name,
            "-o",
            "jsonpath={.data.key}",
        ],
    )
    .expect("kubectl get")
}

#[test]
fn the_cluster_is_advertised_and_an_unreachable_one_is_not() {
    let w = World::new(
        "advertise",
        "[[kubernetes]]\nname = \"gone\"\nkubeconfig = \"/nonexistent/gone.yaml\"\n",
    );
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
    let w = World::new("apply-twice", "");
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
    let w = World::new("crd", "");
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
    let w = World::new("conflict", "");
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
    let w = World::new("malformed", "");
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
    let cp = control_plane();
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
    let w = World::new(
        "unreachable",
        &format!(
            "[[kubernetes]]\nname = \"down\"\nkubeconfig = {:?}\n",
            kc.display().to_string()
        ),
    );
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

/// The output lines of a job log (the agent's own `[delegate]` lines left out).
pub(crate) fn output_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.starts_with("[delegate]"))
        .collect()
}

fn numbered(from: u32, to: u32) -> Vec<String> {
    (from..=to).map(|i| format!("line {i}")).collect()
}

#[test]
fn a_job_streams_its_whole_log_and_reports_its_exit_code() {
    let w = World::new("job-exit", "");
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
    let w = World::new("job-ok", "");
    let id = w.submit_job("echo done", json!({}));
    let (t, log) = w.finish(&id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert_eq!(t.exit_code, Some(0));
    assert_eq!(output_lines(&log), ["done"]);
}

#[test]
fn a_follow_stream_cut_mid_job_is_resumed_without_gaps_or_repeats() {
    let w = World::new("job-cut", "");
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
    let w = World::new("job-held", "");
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
    let w = World::new("job-deleted", "");
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
    let mut w = World::new("job-kill9", "");
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

/// A Deployment of `replicas` pods that sleep on the stand-in node, with env V=`v`.
fn deployment(name: &str, v: &str, extra_pod_spec: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 2\n{extra_spec}  strategy:\n    type: RollingUpdate\n    rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n{extra_pod_spec}      containers:\n      - name: main\n        image: stand-in/sh\n        command: [sleep, \"3600\"]\n        env: [{{name: V, value: \"{v}\"}}]\n"
    )
}

fn rollout(name: &str) -> Value {
    json!({ "cluster": "test", "action": "rollout", "kind": "Deployment", "name": name })
}

#[test]
fn rollout_waits_through_a_real_rolling_update_until_available() {
    let w = World::new("rollout", "");
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
    let w = World::new("rollout-stuck", "");
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
    let w = World::new("rollout-timeout", "");
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

#[test]
fn deleting_a_job_takes_its_pods_along() {
    let w = World::new("delete-job", "");
    node();
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: sleeper\nspec:\n  template:\n    metadata:\n      labels: {app: sleeper}\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: main\n        image: stand-in/sh\n        command: [sleep, \"3600\"]\n";
    let (t, log) = w.apply(job, false);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    wait_for(LONG, "the Job's pod to run", || {
        let out = kubectl(
            &w.admin(),
            &[
                "-n",
                "delete-job",
                "get",
                "pods",
                "-l",
                "app=sleeper",
                "-o",
                "jsonpath={.items[*].status.phase}",
            ],
        )
        .ok()?;
        (out == "Running").then_some(())
    })
    .expect("pod running");
    let (t, log) =
        w.run(json!({"cluster": "test", "action": "delete", "kind": "Job", "name": "sleeper"}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("job/sleeper in namespace delete-job deleted"),
        "{log}"
    );
    // A bare DELETE of a Job would orphan the pod; with propagation it goes too.
    wait_for(LONG, "the Job's pod to go", || {
        let out = kubectl(
            &w.admin(),
            &[
                "-n",
                "delete-job",
                "get",
                "pods",
                "-l",
                "app=sleeper",
                "-o",
                "name",
            ],
        )
        .ok()?;
        out.trim().is_empty().then_some(())
    })
    .expect("pod deleted with its Job");
    let (t, log) = w.run(json!({"cluster": "test", "action": "delete", "manifest": job}));
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    assert!(
        log.contains("job/sleeper in namespace delete-job was already gone"),
        "{log}"
    );
}

#[test]
fn an_action_rbac_forbids_fails_with_the_servers_message() {
    let cp = control_plane();
    let kc = cp
        .write_kubeconfig("limited", LIMITED_TOKEN)
        .expect("kubeconfig");
    let w = World::new(
        "rbac",
        &format!(
            "[[kubernetes]]\nname = \"limited\"\nkubeconfig = {:?}\n",
            kc.display().to_string()
        ),
    );
    let (t, log) = w.run(json!({ "cluster": "limited", "action": "apply", "namespace": "rbac", "manifest": configmap("x", "1") }));
    assert_eq!(t.state, TaskState::Failed, "{t:?}\n{log}");
    let msg = t.message.unwrap_or_default();
    assert!(
        msg.contains("configmaps \"x\" is forbidden: User \"limited\" cannot"),
        "the server's own words: {msg}"
    );
    assert!(msg.contains("403"), "{msg}");
}

/// Numbers for the issue (printed, not asserted beyond success): apply of a 50-object
/// manifest, and the agent's RSS with three clusters configured.
#[test]
fn measure_apply_of_50_objects_and_rss_with_three_clusters() {
    let cp = control_plane();
    let extra: String = ["two", "three"]
        .iter()
        .map(|n| {
            format!(
                "[[kubernetes]]\nname = \"{n}\"\nkubeconfig = {:?}\n",
                cp.admin_kubeconfig().display().to_string()
            )
        })
        .collect();
    let w = World::new("measure", &extra);
    let manifest: Vec<String> = (1..=50)
        .map(|i| configmap(&format!("cm-{i}"), "v"))
        .collect();
    let manifest = manifest.join("---\n");
    let started = std::time::Instant::now();
    let (t, log) = w.apply(&manifest, false);
    let wall = started.elapsed();
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{log}");
    let ran = match (t.started_at, t.finished_at) {
        (Some(s), Some(f)) => Duration::from_millis(u64::try_from(f - s).unwrap_or(0)),
        _ => wall,
    };
    let rss = w.agent.rss_kib().expect("rss");
    println!(
        "MEASURE apply of 50 objects: {:.2} s in the agent ({:.0} objects/s), {:.2} s submit-to-result; agent RSS with 3 clusters after it: {rss} KiB",
        ran.as_secs_f64(),
        50.0 / ran.as_secs_f64().max(0.001),
        wall.as_secs_f64()
    );
}

/// The shipped in-cluster example is valid for a real API server (server-side dry run).
#[test]
fn the_example_in_cluster_manifest_is_accepted_by_the_api_server() {
    let cp = control_plane();
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

/// `delegate-manager task submit --cluster ...` through the real binary: each action,
/// followed with `--wait`, whose exit status is the task's.
#[test]
fn the_manager_cli_submits_each_kubernetes_action_and_waits_for_it() {
    let w = World::new("cli", "");
    node();
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("web.yaml");
    std::fs::write(&file, deployment("web", "1", "", "")).expect("write");
    let file = file.display().to_string();
    let submit = |args: &[&str]| {
        let mut all = vec!["task", "submit", "--cluster", "test", "--wait"];
        all.extend_from_slice(args);
        let (status, stdout, stderr) = w.manager.cli(&all).expect("run the CLI");
        (status.code(), stdout, stderr)
    };

    let (code, out, err) = submit(&["--action", "apply", "--manifest", &file]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("deployment.apps/web in namespace cli created"),
        "{out}"
    );
    assert!(err.contains("succeeded"), "{err}");

    let (code, out, err) = submit(&["--action", "rollout", "--object", "deployment/web"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("deployment \"web\" successfully rolled out"),
        "{out}"
    );

    let (code, out, err) = submit(&[
        "--action",
        "job",
        "--image",
        "stand-in/sh",
        "--env",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        "echo greeting $GREETING; exit 3",
    ]);
    assert_eq!(code, Some(3), "the Job's exit code: {out}\n{err}");
    assert!(out.contains("greeting hi"), "{out}");
    assert!(err.contains("failed (exit 3)"), "{err}");

    let (code, out, err) = submit(&["--action", "delete", "--object", "deployment/web"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("deployment/web in namespace cli deleted"),
        "{out}"
    );
    assert!(
        kubectl(&w.admin(), &["-n", "cli", "get", "deployment", "web"]).is_err(),
        "deleted"
    );

    // A flag the action does not take is refused before anything is submitted.
    let (code, out, err) = submit(&[
        "--action",
        "rollout",
        "--object",
        "deployment/web",
        "--force",
    ]);
    assert_eq!((code, out.as_str()), (Some(1), ""), "no task id: {err}");
    assert!(
        err.contains("--force does not go with --action rollout"),
        "{err}"
    );
}
