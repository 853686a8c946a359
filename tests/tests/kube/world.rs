//! The harness of the kubernetes tests: one control plane for the whole binary (it takes
//! ~10 s to start), the kubelet stand-in as its one node, and a [`World`] per test — its
//! own namespace, manager and agent — with the helpers that run a task to its end and
//! explain a failure.
//!
//! Without the control plane's binaries (`scripts/kube-build`) a test follows the test
//! kit's prerequisite policy (`delegate_tests::prereq`): [`control_plane`] and
//! [`World::new`] hand back what is missing for `require!`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use delegate_protocol::TaskView;
use delegate_tests::kube::{ControlPlane, kubectl};
use delegate_tests::prereq::Missing;
use delegate_tests::{Agent, AgentOptions, Manager, wait_for};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::kubelet::Kubelet;

pub(crate) const LONG: Duration = Duration::from_secs(90);

/// The control plane of this test binary, started by the first test that asks; what is
/// missing when it cannot be (take it with `require!`). One that is installed but does not
/// start fails the test.
pub(crate) fn control_plane() -> Result<&'static ControlPlane, Missing> {
    delegate_tests::kube::installed()?;
    static CP: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    match CP.get_or_init(|| ControlPlane::start().map_err(|e| format!("{e:#}"))) {
        Ok(cp) => Ok(cp),
        Err(e) => panic!("the test control plane did not start: {e}"),
    }
}

/// The one node of the control plane, played by the kubelet stand-in. Ask for it after
/// the control plane (or a [`World::new`]) was required.
pub(crate) fn node() -> &'static Kubelet {
    static NODE: OnceLock<Kubelet> = OnceLock::new();
    NODE.get_or_init(|| {
        let cp = control_plane()
            .unwrap_or_else(|m| panic!("node() before the control plane was required: {m}"));
        Kubelet::start(cp, "standin-1")
    })
}

pub(crate) struct World {
    pub(crate) manager: Manager,
    pub(crate) agent: Agent,
    /// A kubeconfig with the rights to check and clean up what a test did.
    admin: PathBuf,
    /// This test's namespace, created by the world.
    pub(crate) ns: String,
    _tmp: TempDir,
}

impl World {
    /// A manager and an agent with cluster `test` (admin) plus `extra` config lines, and
    /// a fresh namespace `ns`, on the local control plane (or what it lacks here).
    pub(crate) fn new(ns: &str, extra: &str) -> Result<World, Missing> {
        Ok(World::on(&control_plane()?.admin_kubeconfig(), ns, extra))
    }

    /// The same on the cluster of `admin` (cluster `test` of the agent uses it too).
    pub(crate) fn on(admin: &Path, ns: &str, extra: &str) -> World {
        World::with_top(admin, ns, "", extra)
    }

    /// The same with `top` config lines before the agent's tables (top-level keys such as
    /// `max_log_bytes`).
    pub(crate) fn with_top(admin: &Path, ns: &str, top: &str, extra: &str) -> World {
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

    pub(crate) fn admin(&self) -> PathBuf {
        self.admin.clone()
    }

    /// Run a kubernetes task on cluster `cluster` to its end: its view and its log.
    pub(crate) fn run(&self, spec: Value) -> (TaskView, String) {
        self.run_for(spec, 120)
    }

    pub(crate) fn run_for(&self, spec: Value, timeout_secs: u64) -> (TaskView, String) {
        let task = json!({ "kind": "kubernetes", "spec": spec, "timeout_secs": timeout_secs, "retries": 0 });
        let id = self.manager.submit(&task).expect("submit");
        self.finish(&id)
    }

    /// Submit a shorthand job running `script` with `sh -c` on the stand-in node.
    pub(crate) fn submit_job(&self, script: &str, env: Value) -> String {
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
    pub(crate) fn wait_logged(&self, id: &str, text: &str) {
        wait_for(LONG, &format!("{text:?} in the task's log"), || {
            let l = self.manager.logs(id).ok()?;
            String::from_utf8_lossy(&l).contains(text).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.diagnostics()));
    }

    pub(crate) fn finish(&self, id: &str) -> (TaskView, String) {
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
    pub(crate) fn diagnostics(&self) -> String {
        let get = |args: &[&str]| kubectl(&self.admin(), args).unwrap_or_else(|e| format!("{e:#}"));
        format!(
            "--- nodes ---\n{}\n--- jobs and pods ---\n{}\n--- events ---\n{}\n--- agent log ---\n{}",
            get(&["get", "nodes", "-o", "wide"]),
            get(&["-n", &self.ns, "get", "jobs,pods", "-o", "wide"]),
            get(&["-n", &self.ns, "get", "events"]),
            self.agent.log_text()
        )
    }

    pub(crate) fn apply(&self, manifest: &str, force: bool) -> (TaskView, String) {
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

pub(crate) fn configmap(name: &str, value: &str) -> String {
    format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  key: {value:?}\n")
}

pub(crate) fn cm_value(kc: &Path, ns: &str, name: &str) -> String {
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

/// The output lines of a job log (the agent's own `[delegate]` lines left out).
pub(crate) fn output_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| !l.starts_with("[delegate]"))
        .collect()
}

/// A Deployment of `replicas` pods that sleep on the stand-in node, with env V=`v`.
pub(crate) fn deployment(name: &str, v: &str, extra_pod_spec: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\nspec:\n  replicas: 2\n{extra_spec}  strategy:\n    type: RollingUpdate\n    rollingUpdate: {{maxUnavailable: 0, maxSurge: 1}}\n  selector:\n    matchLabels: {{app: {name}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n    spec:\n{extra_pod_spec}      containers:\n      - name: main\n        image: stand-in/sh\n        command: [sleep, \"3600\"]\n        env: [{{name: V, value: \"{v}\"}}]\n"
    )
}
