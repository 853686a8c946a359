//! Task specs: what a user asks a delegate to run, one variant per task kind.
//!
//! The manager validates a spec at submission so that bad input is refused before it is
//! queued; the agent validates again on receipt because it may be older or newer than the
//! manager, and fails only that task when it cannot run it.

use serde::{Deserialize, Serialize};

use crate::Env;

/// Largest script a shell task may carry.
pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;

/// Smallest `memory_max` a shell task may ask for: below it the interpreter cannot start.
pub const MIN_MEMORY_MAX: u64 = 1024 * 1024;

/// Largest request body an http task may carry.
pub const MAX_HTTP_BODY_BYTES: usize = 256 * 1024;

/// A task spec on the wire: `{"kind": "shell", "spec": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "spec", rename_all = "snake_case")]
pub enum TaskSpec {
    Shell(ShellSpec),
    Http(HttpSpec),
    Docker(DockerSpec),
    Kubernetes(KubernetesSpec),
}

/// Run a script with an interpreter, in its own process group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ShellSpec {
    pub script: String,
    /// Program that runs the script file, `/bin/sh` when absent. Its arguments may follow,
    /// split on whitespace (`"/bin/bash -eu"`); the script file's path comes last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
    #[serde(default, skip_serializing_if = "Env::is_empty")]
    pub env: Env,
    /// Absolute directory to run in; a fresh empty directory when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Memory limit in bytes (cgroup `memory.max`, no swap); going over it gets the task
    /// killed by the OOM killer and reported so. Applied when the delegate runs tasks in
    /// systemd units; a delegate without them notes in the log that it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<u64>,
    /// Relative CPU weight, 1–10000 (cgroup `cpu.weight`; 100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// Most processes and threads the task may have at once (cgroup `pids.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_max: Option<u64>,
}

/// An HTTP request made from the delegate's network (health checks, webhooks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HttpSpec {
    pub url: String,
    /// `GET` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Env::is_empty")]
    pub headers: Env,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Statuses that count as success; any 2xx when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_status: Vec<u16>,
}

/// Run a container on the delegate's local Docker engine. The task's `timeout_secs` bounds
/// it like any other task; on timeout or cancel the container is stopped (grace, then kill).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DockerSpec {
    /// Image reference, e.g. `"alpine:3.20"` or `"registry.example:5000/team/tool@sha256:..."`.
    pub image: String,
    #[serde(default)]
    pub pull: PullPolicy,
    /// Arguments (Docker's `Cmd`); the image's default when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's entrypoint when present (`[]` clears it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Env::is_empty")]
    pub env: Env,
    /// Absolute directory inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid` inside the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<DockerMount>,
    /// `none`, `host`, `bridge` or a network name; the engine's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<String>,
    /// Memory limit in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores, e.g. `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Needs `allow_privileged = true` in the agent's `[docker]` table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Leave the container on the engine after the task (for inspection); removed otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep: bool,
}

/// When the agent pulls the image before creating the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull every time (a moving tag such as `latest` is refreshed).
    Always,
    /// Pull only when the engine does not have the image.
    #[default]
    IfNotPresent,
    /// Never pull; a missing image fails the task.
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "always",
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Never => "never",
        }
    }
}

/// What a mount brings into the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MountKind {
    /// A host path; the agent's `[docker] allowed_mounts` must cover it.
    #[default]
    Bind,
    /// A named volume managed by the engine.
    Volume,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DockerMount {
    #[serde(default, rename = "type")]
    pub kind: MountKind,
    /// Absolute host path (bind) or volume name (volume).
    pub source: String,
    /// Absolute path inside the container.
    pub target: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

/// Largest manifest an `apply` or `delete` task may carry.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// Work on a Kubernetes cluster the delegate reaches, named in its `[[kubernetes]]`
/// config (`kubernetes:NAME` among its targets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesSpec {
    /// Name of a `[[kubernetes]]` cluster of the delegate.
    pub cluster: String,
    #[serde(flatten)]
    pub action: KubeAction,
}

/// What to do on the cluster: `{"action": "apply", ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum KubeAction {
    /// Server-side apply of multi-document YAML with field manager `delegate`.
    Apply {
        manifest: String,
        /// For namespaced objects that name none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// Take over fields another field manager owns instead of failing on the conflict.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Run a Job to its end, its pod's log as the task log, its container's exit code as
    /// the result. Either `job` (a full batch/v1 Job, YAML or JSON) or `image` + `command`.
    Job {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        command: Vec<String>,
        #[serde(default, skip_serializing_if = "Env::is_empty")]
        env: Env,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    /// Wait until a Deployment, StatefulSet or DaemonSet is rolled out, with the rules of
    /// `kubectl rollout status`; the task's timeout bounds the wait.
    Rollout {
        /// `Deployment`, `StatefulSet` or `DaemonSet` (any case; `deploy`, `sts`, `ds`).
        #[serde(rename = "kind")]
        object_kind: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
    },
    /// Delete the objects of a manifest, or one object by kind and name.
    Delete {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest: Option<String>,
        /// With `name`: e.g. `Deployment`, `apps/v1 Deployment` or `v1 ConfigMap`.
        #[serde(default, rename = "kind", skip_serializing_if = "Option::is_none")]
        object_kind: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        /// `background` (default), `foreground` or `orphan` (CAUTION: leaves a Job's pods
        /// and a Deployment's ReplicaSets running).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        propagation: Option<String>,
    },
}

impl KubernetesSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.cluster.trim().is_empty() {
            return Err(invalid(
                "spec.cluster",
                "is empty; name a [[kubernetes]] cluster of the delegate, e.g. \"prod\"",
            ));
        }
        match &self.action {
            KubeAction::Apply {
                manifest,
                namespace,
                ..
            } => {
                if manifest.trim().is_empty() {
                    return Err(invalid(
                        "spec.manifest",
                        "is empty; give one or more YAML documents",
                    ));
                }
                if manifest.len() > MAX_MANIFEST_BYTES {
                    return Err(invalid(
                        "spec.manifest",
                        format!(
                            "is {} bytes; the limit is {MAX_MANIFEST_BYTES}",
                            manifest.len()
                        ),
                    ));
                }
                check_namespace(namespace.as_deref())
            }
            KubeAction::Job {
                job,
                image,
                command,
                env,
                namespace,
            } => {
                match (job, image) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "spec.job",
                            "and spec.image are both given; give a full Job, or an image and command",
                        ));
                    }
                    (None, None) => {
                        return Err(invalid(
                            "spec.image",
                            "is missing; give an image and command, or a full Job in spec.job",
                        ));
                    }
                    (Some(j), None) if j.len() > MAX_MANIFEST_BYTES => {
                        return Err(invalid(
                            "spec.job",
                            format!("is larger than {MAX_MANIFEST_BYTES} bytes"),
                        ));
                    }
                    (None, Some(i)) if i.trim().is_empty() || i.contains(char::is_whitespace) => {
                        return Err(invalid(
                            "spec.image",
                            format!("{i:?} is not an image reference"),
                        ));
                    }
                    _ => {}
                }
                if command.iter().any(|a| a.contains('\0')) {
                    return Err(invalid("spec.command", "an argument contains a NUL byte"));
                }
                check_env("spec.env", env)?;
                check_namespace(namespace.as_deref())
            }
            KubeAction::Rollout {
                object_kind,
                name,
                namespace,
            } => {
                if rollout_kind(object_kind).is_none() {
                    return Err(invalid(
                        "spec.kind",
                        format!(
                            "{object_kind:?} has no rollout; give Deployment, StatefulSet or DaemonSet"
                        ),
                    ));
                }
                if name.trim().is_empty() {
                    return Err(invalid("spec.name", "is empty; name the object"));
                }
                check_namespace(namespace.as_deref())
            }
            KubeAction::Delete {
                manifest,
                object_kind,
                name,
                namespace,
                propagation,
            } => {
                match (manifest, object_kind, name) {
                    (Some(m), None, None) if !m.trim().is_empty() => {}
                    (None, Some(k), Some(n)) if !k.trim().is_empty() && !n.trim().is_empty() => {}
                    _ => {
                        return Err(invalid(
                            "spec.manifest",
                            "give either a manifest, or a kind and a name",
                        ));
                    }
                }
                if let Some(p) = propagation
                    && !matches!(p.as_str(), "background" | "foreground" | "orphan")
                {
                    return Err(invalid(
                        "spec.propagation",
                        format!("{p:?} is not background, foreground or orphan"),
                    ));
                }
                check_namespace(namespace.as_deref())
            }
        }
    }
}

/// The canonical kind of a rollout target: `Deployment`, `StatefulSet` or `DaemonSet`.
pub fn rollout_kind(kind: &str) -> Option<&'static str> {
    match kind.to_ascii_lowercase().as_str() {
        "deployment" | "deployments" | "deploy" => Some("Deployment"),
        "statefulset" | "statefulsets" | "sts" => Some("StatefulSet"),
        "daemonset" | "daemonsets" | "ds" => Some("DaemonSet"),
        _ => None,
    }
}

fn check_namespace(ns: Option<&str>) -> Result<(), SpecError> {
    match ns {
        Some(n) if !crate::label_chars(n) => Err(invalid(
            "spec.namespace",
            format!("{n:?} is not a namespace name (lower-case letters, digits, '-')"),
        )),
        _ => Ok(()),
    }
}

/// Why a spec cannot be run: which field, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown task kind {kind:?} (known kinds: {known})")]
    UnknownKind { kind: String, known: String },
    #[error("{kind} spec does not parse: {reason}")]
    Malformed { kind: String, reason: String },
    #[error("{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl TaskSpec {
    /// Kinds this build of the protocol knows.
    pub const KINDS: &'static [&'static str] = &["shell", "http", "docker", "kubernetes"];

    pub fn kind(&self) -> &'static str {
        match self {
            TaskSpec::Shell(_) => "shell",
            TaskSpec::Http(_) => "http",
            TaskSpec::Docker(_) => "docker",
            TaskSpec::Kubernetes(_) => "kubernetes",
        }
    }

    /// The spec alone, as JSON (without the kind).
    pub fn spec_json(&self) -> serde_json::Value {
        let v = serde_json::to_value(self).unwrap_or_default();
        v.get("spec").cloned().unwrap_or_default()
    }

    /// Parse and validate a spec that arrived as `kind` + raw JSON.
    pub fn from_wire(kind: &str, spec: &serde_json::Value) -> Result<TaskSpec, SpecError> {
        let parsed = match kind {
            "shell" => serde_json::from_value(spec.clone()).map(TaskSpec::Shell),
            "http" => serde_json::from_value(spec.clone()).map(TaskSpec::Http),
            "docker" => serde_json::from_value(spec.clone()).map(TaskSpec::Docker),
            "kubernetes" => serde_json::from_value(spec.clone()).map(TaskSpec::Kubernetes),
            other => {
                return Err(SpecError::UnknownKind {
                    kind: other.to_string(),
                    known: Self::KINDS.join(", "),
                });
            }
        };
        let spec = parsed.map_err(|e| SpecError::Malformed {
            kind: kind.to_string(),
            reason: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks that need no I/O; the manager runs them at submission.
    pub fn validate(&self) -> Result<(), SpecError> {
        match self {
            TaskSpec::Shell(s) => s.validate(),
            TaskSpec::Http(h) => h.validate(),
            TaskSpec::Docker(d) => d.validate(),
            TaskSpec::Kubernetes(k) => k.validate(),
        }
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        problem: problem.into(),
    }
}

fn check_env(field: &'static str, env: &Env) -> Result<(), SpecError> {
    for (k, v) in env {
        let bad_name = k.is_empty() || k.contains('=') || k.contains('\0');
        if bad_name {
            return Err(invalid(
                field,
                format!("{k:?} is not a valid name (no '=', no NUL, not empty)"),
            ));
        }
        if v.contains('\0') {
            return Err(invalid(field, format!("value of {k} contains a NUL byte")));
        }
    }
    Ok(())
}

impl ShellSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.script.trim().is_empty() {
            return Err(invalid(
                "spec.script",
                "is empty; give the commands to run, e.g. \"echo hello\"",
            ));
        }
        if self.script.len() > MAX_SCRIPT_BYTES {
            return Err(invalid(
                "spec.script",
                format!(
                    "is {} bytes; the limit is {MAX_SCRIPT_BYTES} (ship large scripts as files)",
                    self.script.len()
                ),
            ));
        }
        if self.script.contains('\0') {
            return Err(invalid("spec.script", "contains a NUL byte"));
        }
        if let Some(i) = &self.interpreter
            && i.split_whitespace().next().is_none()
        {
            return Err(invalid(
                "spec.interpreter",
                "is empty; leave it out for /bin/sh",
            ));
        }
        if let Some(d) = &self.working_dir
            && !d.starts_with('/')
        {
            return Err(invalid(
                "spec.working_dir",
                format!("{d:?} is not an absolute path"),
            ));
        }
        if self.memory_max.is_some_and(|m| m < MIN_MEMORY_MAX) {
            return Err(invalid(
                "spec.memory_max",
                format!(
                    "is below {MIN_MEMORY_MAX} bytes (1 MiB); give the limit in bytes, e.g. 536870912 for 512 MiB"
                ),
            ));
        }
        if let Some(w) = self.cpu_weight
            && !(1..=10_000).contains(&w)
        {
            return Err(invalid(
                "spec.cpu_weight",
                format!("is {w}; it must be 1–10000 (100 is the default share)"),
            ));
        }
        if self.tasks_max == Some(0) {
            return Err(invalid(
                "spec.tasks_max",
                "is 0; the script itself is a task, give at least 1",
            ));
        }
        check_env("spec.env", &self.env)
    }

    /// Does the spec ask for any resource limit?
    pub fn has_limits(&self) -> bool {
        self.memory_max.is_some() || self.cpu_weight.is_some() || self.tasks_max.is_some()
    }

    /// The interpreter split into program and arguments.
    pub fn interpreter_argv(&self) -> Vec<String> {
        match &self.interpreter {
            Some(i) => i.split_whitespace().map(str::to_string).collect(),
            None => vec!["/bin/sh".to_string()],
        }
    }
}

impl HttpSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let why = match url::Url::parse(&self.url) {
            Err(e) => Some(e.to_string()),
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                Some(format!("scheme {:?} is not http or https", u.scheme()))
            }
            Ok(u) if u.host().is_none() => Some("it names no host".to_string()),
            Ok(_) => None,
        };
        if let Some(why) = why {
            return Err(invalid(
                "spec.url",
                format!("{:?} is not an http:// or https:// URL: {why}", self.url),
            ));
        }
        if let Some(m) = &self.method
            && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()))
        {
            return Err(invalid(
                "spec.method",
                format!("{m:?} is not an HTTP method (GET, POST, ...)"),
            ));
        }
        if self
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_HTTP_BODY_BYTES)
        {
            return Err(invalid(
                "spec.body",
                format!("is larger than {MAX_HTTP_BODY_BYTES} bytes"),
            ));
        }
        if let Some(s) = self
            .expect_status
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(invalid(
                "spec.expect_status",
                format!("{s} is not an HTTP status"),
            ));
        }
        check_env("spec.headers", &self.headers)
    }

    /// Does `status` count as success for this request?
    pub fn status_ok(&self, status: u16) -> bool {
        if self.expect_status.is_empty() {
            (200..300).contains(&status)
        } else {
            self.expect_status.contains(&status)
        }
    }
}

impl DockerSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        let image = self.image.trim();
        if image.is_empty() {
            return Err(invalid(
                "spec.image",
                "is empty; name an image, e.g. \"alpine:3.20\"",
            ));
        }
        if image != self.image || self.image.chars().any(|c| c.is_whitespace() || c == '\0') {
            return Err(invalid(
                "spec.image",
                format!("{:?} contains whitespace or NUL", self.image),
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(invalid("spec.command", "an argument contains a NUL byte"));
        }
        if let Some(ep) = &self.entrypoint
            && ep.iter().any(|a| a.contains('\0'))
        {
            return Err(invalid(
                "spec.entrypoint",
                "an argument contains a NUL byte",
            ));
        }
        if let Some(d) = &self.working_dir
            && !d.starts_with('/')
        {
            return Err(invalid(
                "spec.working_dir",
                format!("{d:?} is not an absolute path"),
            ));
        }
        if let Some(u) = &self.user
            && (u.is_empty() || u.chars().any(|c| c.is_whitespace() || c == '\0'))
        {
            return Err(invalid(
                "spec.user",
                format!("{u:?} is not a user (write name, uid, name:group or uid:gid)"),
            ));
        }
        if let Some(n) = &self.network_mode
            && (n.is_empty() || n.chars().any(|c| c.is_whitespace() || c == '\0'))
        {
            return Err(invalid(
                "spec.network_mode",
                format!("{n:?} is not a network mode (none, host, bridge or a network name)"),
            ));
        }
        if self.memory_bytes.is_some_and(|m| m < 6 * 1024 * 1024) {
            return Err(invalid(
                "spec.memory_bytes",
                "is below 6 MiB, the engine's minimum",
            ));
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && (0.01..=1024.0).contains(&c))
        {
            return Err(invalid(
                "spec.cpus",
                format!("{c} is not a CPU count from 0.01 to 1024"),
            ));
        }
        for m in &self.mounts {
            m.validate()?;
        }
        check_env("spec.env", &self.env)
    }
}

impl DockerMount {
    fn validate(&self) -> Result<(), SpecError> {
        if !self.target.starts_with('/') || self.target.contains('\0') {
            return Err(invalid(
                "spec.mounts.target",
                format!("{:?} is not an absolute path", self.target),
            ));
        }
        match self.kind {
            MountKind::Bind if !self.source.starts_with('/') || self.source.contains('\0') => {
                Err(invalid(
                    "spec.mounts.source",
                    format!("{:?} is not an absolute host path", self.source),
                ))
            }
            MountKind::Volume
                if self.source.is_empty()
                    || !self
                        .source
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) =>
            {
                Err(invalid(
                    "spec.mounts.source",
                    format!("{:?} is not a volume name", self.source),
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_script_is_refused_with_the_field_name() {
        let e =
            TaskSpec::from_wire("shell", &json!({"script": "  "})).expect_err("must be refused");
        assert!(e.to_string().starts_with("spec.script: is empty"), "{e}");
    }

    #[test]
    fn unknown_kind_names_the_known_ones() {
        let e = TaskSpec::from_wire("cobol", &json!({})).expect_err("must be refused");
        assert_eq!(
            e.to_string(),
            "unknown task kind \"cobol\" (known kinds: shell, http, docker, kubernetes)"
        );
    }

    #[test]
    fn malformed_spec_says_what_is_missing() {
        let e =
            TaskSpec::from_wire("http", &json!({"method": "GET"})).expect_err("must be refused");
        assert!(matches!(e, SpecError::Malformed { .. }));
        assert!(e.to_string().contains("missing field `url`"), "{e}");
    }

    #[test]
    fn http_checks_url_and_status() {
        for bad in ["ftp://x/y", "http://", "not a url", "http://exa mple.com/"] {
            let e = TaskSpec::from_wire("http", &json!({ "url": bad }))
                .expect_err("refused")
                .to_string();
            assert!(
                e.contains("spec.url") && e.contains("is not an http"),
                "{bad}: {e}"
            );
        }
        let ok = TaskSpec::from_wire("http", &json!({"url": "http://127.0.0.1:1/x"}))
            .expect("valid http spec");
        assert_eq!(ok.kind(), "http");
        let e =
            TaskSpec::from_wire("http", &json!({"url": "ftp://x"})).expect_err("must be refused");
        assert!(e.to_string().starts_with("spec.url"), "{e}");
        let h = HttpSpec {
            url: "http://x".into(),
            expect_status: vec![404],
            ..Default::default()
        };
        assert!(h.status_ok(404) && !h.status_ok(200));
    }

    #[test]
    fn interpreter_splits_on_whitespace() {
        let s = ShellSpec {
            script: "x".into(),
            interpreter: Some("/bin/bash  -eu".into()),
            ..Default::default()
        };
        assert_eq!(s.interpreter_argv(), ["/bin/bash", "-eu"]);
    }

    #[test]
    fn shell_limits_out_of_range_name_their_field() {
        for (spec, field) in [
            (
                json!({"script": "x", "memory_max": 1000}),
                "spec.memory_max",
            ),
            (json!({"script": "x", "cpu_weight": 0}), "spec.cpu_weight"),
            (
                json!({"script": "x", "cpu_weight": 10_001}),
                "spec.cpu_weight",
            ),
            (json!({"script": "x", "tasks_max": 0}), "spec.tasks_max"),
        ] {
            let e = TaskSpec::from_wire("shell", &spec).expect_err("refused");
            assert!(e.to_string().starts_with(field), "{spec}: {e}");
        }
        let ok =
            json!({"script": "x", "memory_max": 67_108_864, "cpu_weight": 50, "tasks_max": 16});
        assert!(TaskSpec::from_wire("shell", &ok).is_ok());
    }

    #[test]
    fn docker_spec_parses_with_defaults_and_round_trips() {
        let spec = TaskSpec::from_wire(
            "docker",
            &json!({"image": "busybox:1", "command": ["echo", "hi"], "pull": "never",
                    "network_mode": "none", "mounts": [{"source": "/srv/data", "target": "/data", "read_only": true}]}),
        )
        .expect("valid docker spec");
        let TaskSpec::Docker(d) = &spec else {
            panic!("wrong kind {spec:?}");
        };
        assert_eq!(d.pull, PullPolicy::Never);
        assert_eq!(d.mounts[0].kind, MountKind::Bind);
        assert!(!d.keep && !d.privileged);
        let again = TaskSpec::from_wire("docker", &spec.spec_json()).expect("round trip");
        assert_eq!(again, spec);
        let d = TaskSpec::from_wire("docker", &json!({"image": "x"})).expect("minimal");
        assert!(matches!(
            d,
            TaskSpec::Docker(DockerSpec {
                pull: PullPolicy::IfNotPresent,
                ..
            })
        ));
    }

    #[test]
    fn docker_spec_errors_name_the_field() {
        let cases = [
            (json!({"image": " "}), "spec.image"),
            (
                json!({"image": "x", "working_dir": "tmp"}),
                "spec.working_dir",
            ),
            (json!({"image": "x", "cpus": 0.0}), "spec.cpus"),
            (
                json!({"image": "x", "memory_bytes": 1024}),
                "spec.memory_bytes",
            ),
            (
                json!({"image": "x", "mounts": [{"source": "rel", "target": "/d"}]}),
                "spec.mounts.source",
            ),
            (
                json!({"image": "x", "mounts": [{"source": "/a", "target": "d"}]}),
                "spec.mounts.target",
            ),
            (json!({"image": "x", "env": {"A=B": "1"}}), "spec.env"),
            (
                json!({"image": "x", "network_mode": ""}),
                "spec.network_mode",
            ),
        ];
        for (spec, field) in cases {
            let e = TaskSpec::from_wire("docker", &spec).expect_err("invalid");
            assert!(e.to_string().starts_with(field), "{spec}: {e}");
        }
        let e = TaskSpec::from_wire("docker", &json!({"image": "x", "pull": "sometimes"}))
            .expect_err("bad pull policy");
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }

    #[test]
    fn kubernetes_specs_parse_and_refuse_what_cannot_run() {
        let s = TaskSpec::from_wire(
            "kubernetes",
            &json!({"cluster": "prod", "action": "apply", "manifest": "kind: X", "force": true}),
        )
        .expect("valid");
        assert_eq!(s.kind(), "kubernetes");
        let e = TaskSpec::from_wire(
            "kubernetes",
            &json!({"cluster": "prod", "action": "job", "command": ["true"]}),
        )
        .expect_err("no image and no job");
        assert!(e.to_string().starts_with("spec.image: is missing"), "{e}");
        let e = TaskSpec::from_wire(
            "kubernetes",
            &json!({"cluster": "prod", "action": "apply", "manifest": "x", "namespace": "Bad_NS"}),
        )
        .expect_err("bad namespace");
        assert!(e.to_string().starts_with("spec.namespace: "), "{e}");
        let e = TaskSpec::from_wire(
            "kubernetes",
            &json!({"cluster": "prod", "action": "explode"}),
        )
        .expect_err("unknown action");
        assert!(e.to_string().contains("unknown variant `explode`"), "{e}");
    }
}
