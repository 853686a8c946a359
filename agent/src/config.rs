//! Agent configuration: `/etc/delegate/delegate.toml` plus environment overrides.
//!
//! Operators edit this file by hand on hundreds of hosts, so a mistake must be reported
//! with its file and line and a hint, and *every* mistake at once (`delegate config check`),
//! not one per restart. We therefore walk toml's spanned document ourselves instead of
//! deserializing straight into a struct, which would stop at the first problem.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use delegate_protocol::{check_upgrade_group, parse_tags};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Where the packaged unit expects the config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/delegate/delegate.toml";
/// Used when neither the config nor `$STATE_DIRECTORY` names a state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/delegate";

/// How shell tasks run. Running them as the agent's children gives them the agent's user
/// and everything it can reach (its token, the spool, the Docker socket), so that is never
/// a fallback: only an operator chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShellMode {
    /// `units` when the agent runs as a systemd service, `children` otherwise (a terminal,
    /// the quick start, a container).
    #[default]
    Auto,
    /// Each task a `delegate-task@` unit. While units cannot be used (polkit refuses, the
    /// bus is slow) the agent takes no shell tasks and keeps trying.
    Units,
    /// CAUTION: tasks are the agent's children and share its user, token and spool; for
    /// hosts where units cannot work (polkit older than 121: Debian 11, Ubuntu 22.04).
    Children,
}

/// Default of `max_log_bytes`, the cap of one task attempt's spooled log: 256 MiB, as the
/// manager's default.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 256 * 1024 * 1024;

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Base URLs of the manager's nodes, without the `/api/v1` suffix, in the order tried
    /// (never empty). The agent stays with one until it cannot be reached.
    pub manager_urls: Vec<String>,
    /// The only trusted root(s) for the manager's TLS certificate (`ca_file`): with it, the
    /// system's roots are not used.
    pub ca: Option<CaBundle>,
    /// The delegate token (read from `token_file` when that is set); `Debug` hides it.
    pub token: Secret,
    pub name: String,
    pub tags: Vec<String>,
    /// The host's upgrade group for managed rollouts (`upgrade_group`), if any.
    pub upgrade_group: Option<String>,
    /// Most tasks run at once.
    pub concurrency: u32,
    pub state_dir: PathBuf,
    /// How long SIGTERM waits for in-flight tasks before cancelling them.
    pub drain_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a task is stopped.
    pub kill_grace: Duration,
    /// Long-poll duration asked of the manager.
    pub acquire_wait: Duration,
    /// Log filter (`info`, `debug`, `delegate=debug,...`).
    pub log_level: String,
    pub shell_enabled: bool,
    /// How shell tasks run (`[shell] mode`).
    pub shell_mode: ShellMode,
    pub http_enabled: bool,
    pub docker: DockerConfig,
    /// Serve Prometheus metrics here (`metrics_listen`); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// Most log bytes kept per task attempt (`max_log_bytes`, default 256 MiB).
    pub max_log_bytes: u64,
    /// `[[kubernetes]]`: the clusters this delegate reaches, by name.
    pub kubernetes: Vec<KubeCluster>,
    /// Things that work but should be fixed (a secret readable by every user): printed by
    /// `config check`, logged by `run`.
    pub warnings: Vec<String>,
}

/// The PEM certificates of `ca_file`, read and checked when the config is loaded.
#[derive(Clone, PartialEq, Eq)]
pub struct CaBundle {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaBundle")
            .field("path", &self.path)
            .finish()
    }
}

/// `[[kubernetes]]`: one cluster the delegate reaches, advertised as `kubernetes:NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeCluster {
    pub name: String,
    pub source: KubeSource,
    /// Namespace for namespaced objects that name none (default `default`).
    pub namespace: Option<String>,
    /// What tasks may touch beyond what the credential's RBAC allows.
    pub policy: KubePolicy,
}

/// The agent's own bound on a cluster's tasks (`allowed_namespaces`, `allowed_kinds` in
/// `[[kubernetes]]`), checked before anything is sent to the API server. Off when neither
/// is set (the credential's RBAC is then the only bound). When either is set, a
/// cluster-scoped kind (Namespace, ClusterRoleBinding, CRD...) is refused unless
/// `allowed_kinds` names it: it reaches past every namespace.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KubePolicy {
    /// Namespaces tasks may touch; `None`: any.
    pub allowed_namespaces: Option<Vec<String>>,
    /// Kinds tasks may touch, as `Deployment` (any API group) or `Deployment.apps` (that
    /// group; `ConfigMap.core` for the core group); `None`: any namespaced kind.
    pub allowed_kinds: Option<Vec<String>>,
}

impl KubePolicy {
    pub fn is_set(&self) -> bool {
        self.allowed_namespaces.is_some() || self.allowed_kinds.is_some()
    }
}

/// Where a cluster's address and credentials come from. Never `$HOME/.kube/config`: a
/// service has no home, and an operator must say which file is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeSource {
    /// A kubeconfig file, optionally one of its contexts (its current context otherwise).
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
    /// The pod's service account (the agent runs inside this cluster).
    InCluster,
}

/// Standard socket of a Docker engine.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// Network modes allowed when `[docker] allowed_network_modes` is not set.
pub const DEFAULT_NETWORK_MODES: &[&str] = &["none", "bridge"];

/// `[docker]`: the local engine and what its tasks may ask of it.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    /// Host paths (and everything below them) that tasks may bind-mount; none by default,
    /// because a bind mount of `/` or `/var/run/docker.sock` is root on the host.
    pub allowed_mounts: Vec<PathBuf>,
    /// CAUTION: a privileged container is root on the host. Off unless set.
    pub allow_privileged: bool,
    /// Network modes tasks may ask for. CAUTION: `host` shares the host's network stack
    /// (its loopback services included), `container` any other container's; neither is
    /// allowed unless listed.
    pub allowed_network_modes: Vec<String>,
    /// Credentials per registry host (`registry.example:5000`, `docker.io`).
    pub registries: BTreeMap<String, RegistryAuth>,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: true,
            socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            allowed_mounts: Vec::new(),
            allow_privileged: false,
            allowed_network_modes: DEFAULT_NETWORK_MODES
                .iter()
                .map(|m| m.to_string())
                .collect(),
            registries: BTreeMap::new(),
        }
    }
}

/// Login for one registry. Secrets never reach a log line: `Debug` hides them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RegistryAuth {
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub identity_token: Option<Secret>,
}

/// A credential; prints as `<redacted>` so a `{:?}` of the config leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One problem found in the config, with where it is and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    /// 1-based; `None` for problems not tied to a line (missing key, environment).
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.path.display(), l, self.message),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Every problem the config has; `Display` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Where environment variables come from; tests pass a map instead of the process env.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

/// Keys of the top-level table, with what they take (shown for unknown keys).
const KEYS: &[(&str, &str)] = &[
    (
        "manager_url",
        "URL of the manager, e.g. \"https://manager.example:7700\", or a list of its nodes' URLs",
    ),
    ("token", "delegate token (or use token_file)"),
    ("token_file", "path of a file holding the delegate token"),
    (
        "ca_file",
        "PEM file with the CA certificate that signed the manager's certificate",
    ),
    ("name", "delegate name (default: the host name)"),
    ("tags", "list of tags, e.g. [\"linux\", \"eu\"]"),
    (
        "upgrade_group",
        "upgrade group for managed rollouts, e.g. \"canary\"",
    ),
    ("concurrency", "most tasks at once (default 4)"),
    (
        "max_log_bytes",
        "most log bytes kept per task (default 268435456 = 256 MiB)",
    ),
    ("state_dir", "directory for the spool and journal"),
    ("drain_timeout", "duration, e.g. \"10m\""),
    ("kill_grace", "duration, e.g. \"10s\""),
    ("acquire_wait", "duration, e.g. \"30s\""),
    ("log_level", "e.g. \"info\" or \"debug\""),
    (
        "metrics_listen",
        "address for Prometheus metrics, e.g. \"127.0.0.1:9469\" (default: off)",
    ),
    ("shell", "table [shell] with enabled = true|false"),
    ("http", "table [http] with enabled = true|false"),
    (
        "docker",
        "table [docker] with enabled, socket, allowed_mounts, allowed_network_modes, allow_privileged, [docker.registries.\"HOST\"]",
    ),
    (
        "kubernetes",
        "tables [[kubernetes]] with name and kubeconfig (context, namespace) or in_cluster = true (allowed_namespaces, allowed_kinds)",
    ),
];

struct Collector<'a> {
    path: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Collector<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    fn at(&mut self, offset: Option<usize>, message: impl Into<String>) {
        let line = offset.map(|o| self.line_of(o));
        self.problems.push(Problem {
            path: self.path.to_path_buf(),
            line,
            message: message.into(),
        });
    }

    fn string(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<String> {
        match v.get_ref().as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let t = v.get_ref().type_str();
                self.at(
                    Some(v.span().start),
                    format!("{key} must be a string, found {t}"),
                );
                None
            }
        }
    }

    fn socket_addr(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<SocketAddr> {
        let s = self.string(key, v)?;
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.at(
                    Some(v.span().start),
                    format!("{key} {s:?} is not an address and port, e.g. \"127.0.0.1:9469\""),
                );
                None
            }
        }
    }

    fn duration(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<Duration> {
        let s = self.string(key, v)?;
        match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.at(Some(v.span().start), format!("{key} must be longer than 0"));
                None
            }
            Err(e) => {
                self.at(
                    Some(v.span().start),
                    format!("{key} {s:?} is not a duration ({e}); write e.g. \"30s\", \"10m\""),
                );
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<bool> {
        let b = v.get_ref().as_bool();
        if b.is_none() {
            let t = v.get_ref().type_str();
            self.at(
                Some(v.span().start),
                format!("{key} must be true or false, found {t}"),
            );
        }
        b
    }

    /// `[shell]` / `[http]`: only `enabled` for now.
    /// `[shell]`: `enabled` and `mode`.
    fn shell_table(&mut self, v: &Spanned<DeValue<'_>>) -> (Option<bool>, Option<ShellMode>) {
        let Some(table) = v.get_ref().as_table() else {
            self.at(
                Some(v.span().start),
                "shell must be a table: [shell] with enabled = true|false, mode = \"auto\"|\"units\"|\"children\"",
            );
            return (None, None);
        };
        let (mut enabled, mut mode) = (None, None);
        for (k, val) in table.iter() {
            match k.get_ref().as_ref() {
                "enabled" => enabled = self.boolean("shell.enabled", val),
                "mode" => {
                    mode = match self.string("shell.mode", val).as_deref() {
                        None => None,
                        Some("auto") => Some(ShellMode::Auto),
                        Some("units") => Some(ShellMode::Units),
                        Some("children") => Some(ShellMode::Children),
                        Some(other) => {
                            self.at(
                                Some(val.span().start),
                                format!(
                                    "shell.mode {other:?} is not a mode: \"units\" (each task a delegate-task@ systemd unit), \"children\" (tasks share the agent's user and access) or \"auto\" (units under systemd, children elsewhere)"
                                ),
                            );
                            None
                        }
                    }
                }
                other => self.at(
                    Some(k.span().start),
                    format!("unknown key shell.{other:?} (known: enabled, mode)"),
                ),
            }
        }
        (enabled, mode)
    }

    fn target_table(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<bool> {
        let Some(table) = v.get_ref().as_table() else {
            self.at(
                Some(v.span().start),
                format!("{key} must be a table: [{key}] with enabled = true|false"),
            );
            return None;
        };
        let mut enabled = None;
        for (k, val) in table.iter() {
            match k.get_ref().as_ref() {
                "enabled" => enabled = self.boolean(&format!("{key}.enabled"), val),
                other => self.at(
                    Some(k.span().start),
                    format!("unknown key {key}.{other:?} (known: enabled)"),
                ),
            }
        }
        enabled
    }

    fn path_list(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<Vec<PathBuf>> {
        let Some(items) = v.get_ref().as_array() else {
            self.at(
                Some(v.span().start),
                format!("{key} must be a list of absolute paths, e.g. [\"/srv/builds\"]"),
            );
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref().as_str() {
                Some(p) if p.starts_with('/') => out.push(PathBuf::from(p)),
                _ => self.at(
                    Some(item.span().start),
                    format!("{key} entries must be absolute paths, e.g. \"/srv/builds\""),
                ),
            }
        }
        Some(out)
    }

    /// `allowed_network_modes = ["none", "bridge", "host", "container", "NETWORK"]`.
    fn network_modes(&mut self, v: &Spanned<DeValue<'_>>) -> Option<Vec<String>> {
        let key = "docker.allowed_network_modes";
        let Some(items) = v.get_ref().as_array() else {
            self.at(
                Some(v.span().start),
                format!("{key} must be a list, e.g. [\"none\", \"bridge\", \"host\"]"),
            );
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref().as_str() {
                Some(m) if !m.is_empty() && !m.contains(char::is_whitespace) => {
                    out.push(m.to_string())
                }
                _ => self.at(
                    Some(item.span().start),
                    format!(
                        "{key} entries must be network modes: none, bridge, host, container (any container:<id>) or a network name"
                    ),
                ),
            }
        }
        Some(out)
    }

    /// `[docker]` with its `[docker.registries."HOST"]` sub-tables.
    fn docker_table(&mut self, v: &Spanned<DeValue<'_>>) -> Option<DockerConfig> {
        let Some(table) = v.get_ref().as_table() else {
            self.at(Some(v.span().start), "docker must be a table: [docker]");
            return None;
        };
        let mut d = DockerConfig::default();
        for (k, val) in table.iter() {
            match k.get_ref().as_ref() {
                "enabled" => d.enabled = self.boolean("docker.enabled", val).unwrap_or(true),
                "allow_privileged" => {
                    d.allow_privileged = self
                        .boolean("docker.allow_privileged", val)
                        .unwrap_or(false)
                }
                "socket" => {
                    if let Some(s) = self.string("docker.socket", val) {
                        let s = s.strip_prefix("unix://").unwrap_or(&s).to_string();
                        if s.starts_with('/') {
                            d.socket = PathBuf::from(s);
                        } else {
                            self.at(
                                Some(val.span().start),
                                format!("docker.socket {s:?} must be an absolute path, e.g. \"{DEFAULT_DOCKER_SOCKET}\""),
                            );
                        }
                    }
                }
                "allowed_mounts" => {
                    d.allowed_mounts = self
                        .path_list("docker.allowed_mounts", val)
                        .unwrap_or_default()
                }
                "allowed_network_modes" => {
                    if let Some(modes) = self.network_modes(val) {
                        d.allowed_network_modes = modes;
                    }
                }
                "registries" => d.registries = self.registries(val),
                other => self.at(
                    Some(k.span().start),
                    format!(
                        "unknown key docker.{other:?} (known: enabled, socket, allowed_mounts, allowed_network_modes, allow_privileged, registries)"
                    ),
                ),
            }
        }
        Some(d)
    }

    /// `allowed_namespaces` / `allowed_kinds` of `[[kubernetes]]`: names without spaces.
    fn kube_names(&mut self, key: &str, v: &Spanned<DeValue<'_>>) -> Option<Vec<String>> {
        let Some(items) = v.get_ref().as_array() else {
            self.at(
                Some(v.span().start),
                format!("{key} must be a list, e.g. [\"apps\"]"),
            );
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref().as_str() {
                Some(n) if !n.is_empty() && !n.contains(char::is_whitespace) => {
                    out.push(n.to_string())
                }
                _ => self.at(
                    Some(item.span().start),
                    format!("{key} entries must be names without spaces"),
                ),
            }
        }
        Some(out)
    }

    /// `[[kubernetes]]` tables, each one cluster.
    fn kubernetes(&mut self, v: &Spanned<DeValue<'_>>) -> Vec<KubeCluster> {
        const HOW: &str = "kubernetes must be tables: [[kubernetes]] with name = \"prod\" and kubeconfig = \"/etc/delegate/kube/prod.yaml\" or in_cluster = true";
        let Some(items) = v.get_ref().as_array() else {
            self.at(Some(v.span().start), HOW);
            return Vec::new();
        };
        let mut out: Vec<KubeCluster> = Vec::new();
        for item in items.iter() {
            let Some(t) = item.get_ref().as_table() else {
                self.at(Some(item.span().start), HOW);
                continue;
            };
            let (mut name, mut kubeconfig, mut context, mut namespace, mut in_cluster) =
                (None, None, None, None, false);
            let mut policy = KubePolicy::default();
            // A bad or misspelt key was reported already; "needs kubeconfig" would repeat it.
            let reported = self.problems.len();
            for (k, val) in t.iter() {
                match k.get_ref().as_ref() {
                    "name" => name = self.string("kubernetes.name", val),
                    "kubeconfig" => {
                        if let Some(p) = self.string("kubernetes.kubeconfig", val) {
                            if p.starts_with('/') {
                                kubeconfig = Some(PathBuf::from(p));
                            } else {
                                self.at(
                                    Some(val.span().start),
                                    format!("kubernetes.kubeconfig {p:?} must be an absolute path, e.g. \"/etc/delegate/kube/prod.yaml\""),
                                );
                            }
                        }
                    }
                    "context" => context = self.string("kubernetes.context", val),
                    "namespace" => namespace = self.string("kubernetes.namespace", val),
                    "in_cluster" => {
                        in_cluster = self
                            .boolean("kubernetes.in_cluster", val)
                            .unwrap_or(false)
                    }
                    "allowed_namespaces" => {
                        policy.allowed_namespaces =
                            self.kube_names("kubernetes.allowed_namespaces", val)
                    }
                    "allowed_kinds" => {
                        policy.allowed_kinds = self.kube_names("kubernetes.allowed_kinds", val)
                    }
                    other => self.at(
                        Some(k.span().start),
                        format!(
                            "unknown key kubernetes.{other:?} (known: name, kubeconfig, context, namespace, in_cluster, allowed_namespaces, allowed_kinds)"
                        ),
                    ),
                }
            }
            let at = Some(item.span().start);
            let Some(name) = name else {
                self.at(at, "[[kubernetes]] needs a name, e.g. name = \"prod\" (tasks name the cluster by it)");
                continue;
            };
            let valid_name = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid_name {
                self.at(
                    at,
                    format!(
                        "kubernetes.name {name:?} may hold only letters, digits, '-', '_' and '.'"
                    ),
                );
                continue;
            }
            if out.iter().any(|c| c.name == name) {
                self.at(
                    at,
                    format!("[[kubernetes]] {name:?} is configured twice; names must be unique"),
                );
                continue;
            }
            let source = match (kubeconfig, in_cluster) {
                (Some(path), false) => KubeSource::Kubeconfig { path, context },
                (None, true) if context.is_none() => KubeSource::InCluster,
                (None, true) => {
                    self.at(at, format!("[[kubernetes]] {name:?}: context applies to a kubeconfig, not to in_cluster = true"));
                    continue;
                }
                (Some(_), true) => {
                    self.at(at, format!("[[kubernetes]] {name:?} has both kubeconfig and in_cluster = true; keep one"));
                    continue;
                }
                (None, false) if self.problems.len() > reported => continue,
                (None, false) => {
                    self.at(at, format!("[[kubernetes]] {name:?} needs kubeconfig = \"/etc/delegate/kube/{name}.yaml\" or in_cluster = true (the service has no $HOME/.kube/config)"));
                    continue;
                }
            };
            out.push(KubeCluster {
                name,
                source,
                namespace,
                policy,
            });
        }
        out
    }

    fn registries(&mut self, v: &Spanned<DeValue<'_>>) -> BTreeMap<String, RegistryAuth> {
        let mut out = BTreeMap::new();
        let Some(table) = v.get_ref().as_table() else {
            self.at(
                Some(v.span().start),
                "docker.registries must hold tables: [docker.registries.\"registry.example:5000\"]",
            );
            return out;
        };
        for (host, val) in table.iter() {
            let host: &str = host.get_ref().as_ref();
            let key = format!("docker.registries.{host:?}");
            let Some(t) = val.get_ref().as_table() else {
                self.at(
                    Some(val.span().start),
                    format!("{key} must be a table with username and password (or password_file, identity_token)"),
                );
                continue;
            };
            let mut auth = RegistryAuth::default();
            for (k, field) in t.iter() {
                match k.get_ref().as_ref() {
                    "username" => auth.username = self.string(&format!("{key}.username"), field),
                    "password" => {
                        auth.password = self
                            .string(&format!("{key}.password"), field)
                            .map(Secret::new)
                    }
                    "identity_token" => {
                        auth.identity_token = self
                            .string(&format!("{key}.identity_token"), field)
                            .map(Secret::new)
                    }
                    "password_file" => {
                        let Some(file) = self.string(&format!("{key}.password_file"), field)
                        else {
                            continue;
                        };
                        match std::fs::read_to_string(&file) {
                            Ok(p) if !p.trim().is_empty() => {
                                auth.password = Some(Secret::new(p.trim()))
                            }
                            Ok(_) => self.at(
                                Some(field.span().start),
                                format!("{key}.password_file {file:?} is empty"),
                            ),
                            Err(e) => self.at(
                                Some(field.span().start),
                                format!("{key}.password_file {file:?} cannot be read: {e}"),
                            ),
                        }
                    }
                    other => self.at(
                        Some(k.span().start),
                        format!(
                            "unknown key {key}.{other:?} (known: username, password, password_file, identity_token)"
                        ),
                    ),
                }
            }
            if auth.identity_token.is_none() && (auth.username.is_none() || auth.password.is_none())
            {
                self.at(
                    Some(val.span().start),
                    format!(
                        "{key} needs username and password (or password_file), or identity_token"
                    ),
                );
            }
            out.insert(host.to_string(), auth);
        }
        out
    }
}

/// Where a value came from, for messages: a line of the file or an environment variable.
#[derive(Default)]
struct Raw {
    /// The URLs and the line they are on (`None`: from the environment).
    manager_url: Option<(Vec<String>, Option<usize>)>,
    /// The token and the line it is on (`None`: from the environment).
    token: Option<(String, Option<usize>)>,
    /// The token is written in the config file itself (not the environment).
    token_in_file: bool,
    token_file: Option<(String, Option<usize>)>,
    ca_file: Option<(String, Option<usize>)>,
    name: Option<String>,
    tags: Option<Vec<String>>,
    upgrade_group: Option<String>,
    concurrency: Option<u32>,
    state_dir: Option<String>,
    drain_timeout: Option<Duration>,
    kill_grace: Option<Duration>,
    acquire_wait: Option<Duration>,
    log_level: Option<String>,
    shell_enabled: Option<bool>,
    shell_mode: Option<ShellMode>,
    http_enabled: Option<bool>,
    docker: Option<DockerConfig>,
    metrics_listen: Option<SocketAddr>,
    max_log_bytes: Option<u64>,
    kubernetes: Vec<KubeCluster>,
}

impl Config {
    /// Read `path` (it may be missing when the environment gives everything), apply the
    /// environment overrides, and validate. All problems are returned together.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let alone = |line: Option<usize>, message: String| ConfigError {
            problems: vec![Problem {
                path: path.to_path_buf(),
                line,
                message,
            }],
        };
        let text = match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(t) => Some(t),
                Err(e) => {
                    let bytes = e.as_bytes();
                    let at = e.utf8_error().valid_up_to();
                    let line = bytes[..at].iter().filter(|b| **b == b'\n').count() + 1;
                    let column = at
                        - bytes[..at]
                            .iter()
                            .rposition(|b| *b == b'\n')
                            .map_or(0, |i| i + 1)
                        + 1;
                    return Err(alone(
                        Some(line),
                        format!(
                            "not UTF-8 text: byte 0x{:02x} at column {column} is not valid UTF-8; save the file as UTF-8",
                            bytes[at]
                        ),
                    ));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(alone(
                    None,
                    format!(
                        "cannot read: {e} (the file is root:delegate 0640; run as the delegate user or root)"
                    ),
                ));
            }
            Err(e) => return Err(alone(None, format!("cannot read: {e}"))),
        };
        let text_ref = text.as_deref().unwrap_or("");
        let mut c = Collector {
            path,
            text: text_ref,
            problems: Vec::new(),
        };
        let mut raw = Raw::default();
        if text.is_some() && !parse_file(&mut c, &mut raw) {
            return Err(ConfigError {
                problems: c.problems,
            });
        }
        apply_env(&mut c, &mut raw, env);
        let config = finish(&mut c, raw, env);
        // Report in file order; problems without a line (missing keys) come last.
        c.problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        if c.problems.is_empty() {
            config.ok_or_else(|| ConfigError { problems: vec![] })
        } else {
            Err(ConfigError {
                problems: c.problems,
            })
        }
    }
}

/// Walk the document into `raw`; false when it is not valid TOML at all.
fn parse_file(c: &mut Collector<'_>, raw: &mut Raw) -> bool {
    let (doc, errors) = DeTable::parse_recoverable(c.text);
    if !errors.is_empty() {
        // Values recovered from a broken document carry unreliable spans and may be
        // missing: report the syntax errors alone, each with its line.
        for e in errors {
            let offset = e.span().map(|s| s.start);
            c.at(offset, format!("TOML syntax error: {}", e.message().trim()));
        }
        return false;
    }
    for (k, v) in doc.get_ref().iter() {
        let key: &str = k.get_ref().as_ref();
        let line = Some(c.line_of(v.span().start));
        match key {
            "manager_url" => raw.manager_url = manager_urls(c, v).map(|u| (u, line)),
            "token" => {
                raw.token = c.string(key, v).map(|t| (t, line));
                raw.token_in_file = raw.token.is_some();
            }
            "token_file" => raw.token_file = c.string(key, v).map(|s| (s, line)),
            "ca_file" => raw.ca_file = c.string(key, v).map(|s| (s, line)),
            "name" => raw.name = c.string(key, v),
            "state_dir" => raw.state_dir = c.string(key, v),
            "log_level" => raw.log_level = c.string(key, v),
            "drain_timeout" => raw.drain_timeout = c.duration(key, v),
            "kill_grace" => raw.kill_grace = c.duration(key, v),
            "acquire_wait" => raw.acquire_wait = c.duration(key, v),
            "metrics_listen" => raw.metrics_listen = c.socket_addr(key, v),
            "shell" => (raw.shell_enabled, raw.shell_mode) = c.shell_table(v),
            "http" => raw.http_enabled = c.target_table(key, v),
            "docker" => raw.docker = c.docker_table(v),
            "kubernetes" => raw.kubernetes = c.kubernetes(v),
            "max_log_bytes" => {
                let n = v.get_ref().as_integer().and_then(|i| {
                    i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok()
                });
                match n.and_then(|n| u64::try_from(n).ok()) {
                    Some(n) if n >= 1024 => raw.max_log_bytes = Some(n),
                    _ => c.at(
                        Some(v.span().start),
                        "max_log_bytes must be a whole number of bytes, at least 1024",
                    ),
                }
            }
            "concurrency" => {
                let n = v.get_ref().as_integer().and_then(|i| {
                    i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok()
                });
                match n {
                    Some(n) if (1..=1024).contains(&n) => raw.concurrency = u32::try_from(n).ok(),
                    _ => c.at(
                        Some(v.span().start),
                        "concurrency must be a whole number from 1 to 1024",
                    ),
                }
            }
            "upgrade_group" => match v.get_ref().as_str() {
                Some(s) => match check_upgrade_group(s) {
                    Ok(()) => raw.upgrade_group = Some(s.to_string()),
                    Err(rule) => c.at(Some(v.span().start), rule),
                },
                None => c.at(
                    Some(v.span().start),
                    "upgrade_group must be a string, e.g. upgrade_group = \"canary\"",
                ),
            },
            "tags" => match v.get_ref().as_array() {
                Some(items) => {
                    let mut tags = Vec::new();
                    for item in items.iter() {
                        match item.get_ref().as_str() {
                            Some(s) if !s.trim().is_empty() => tags.push(s.trim().to_string()),
                            _ => c.at(
                                Some(item.span().start),
                                "tags must be non-empty strings, e.g. tags = [\"linux\", \"eu\"]",
                            ),
                        }
                    }
                    raw.tags = Some(tags);
                }
                None => {
                    if let Some(s) = v.get_ref().as_str() {
                        raw.tags = Some(parse_tags(s));
                    } else {
                        c.at(
                            Some(v.span().start),
                            "tags must be a list of strings, e.g. tags = [\"linux\", \"eu\"]",
                        );
                    }
                }
            },
            other => {
                let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                let hint = KEYS
                    .iter()
                    .find(|(k, _)| close(k, other))
                    .map(|(k, what)| format!("; did you mean {k:?} ({what})?"))
                    .unwrap_or_else(|| format!(" (known keys: {})", known.join(", ")));
                c.at(Some(k.span().start), format!("unknown key {other:?}{hint}"));
            }
        }
    }
    true
}

/// Near-miss detection for typos: a different case, or at most two edits away.
fn close(known: &str, typed: &str) -> bool {
    strsim::levenshtein(known, &typed.to_lowercase()) <= 2
}

fn apply_env(c: &mut Collector<'_>, raw: &mut Raw, env: &dyn Env) {
    if let Some(v) = env.var("DELEGATE_MANAGER_URL") {
        // Several nodes: comma-separated, as a URL of ours never holds a comma.
        let urls = v.split(',').map(|u| u.trim().to_string()).collect();
        raw.manager_url = Some((urls, None));
    }
    if let Some(v) = env.var("DELEGATE_TOKEN") {
        raw.token = Some((v, None));
        raw.token_in_file = false;
        raw.token_file = None;
    }
    if let Some(v) = env.var("DELEGATE_TOKEN_FILE") {
        raw.token_file = Some((v, None));
        raw.token = None;
    }
    if let Some(v) = env.var("DELEGATE_CA_FILE") {
        raw.ca_file = Some((v, None));
    }
    if let Some(v) = env.var("DELEGATE_NAME") {
        raw.name = Some(v);
    }
    if let Some(v) = env.var("DELEGATE_TAGS") {
        raw.tags = Some(parse_tags(&v));
    }
    if let Some(v) = env.var("DELEGATE_UPGRADE_GROUP") {
        match check_upgrade_group(&v) {
            Ok(()) => raw.upgrade_group = Some(v),
            Err(rule) => c.at(None, format!("DELEGATE_UPGRADE_GROUP: {rule}")),
        }
    }
    if let Some(v) = env.var("DELEGATE_STATE_DIR") {
        raw.state_dir = Some(v);
    }
    if let Some(v) = env.var("DELEGATE_CONCURRENCY") {
        match v.parse::<u32>() {
            Ok(n) if (1..=1024).contains(&n) => raw.concurrency = Some(n),
            _ => c.at(
                None,
                format!("DELEGATE_CONCURRENCY={v:?} is not a whole number from 1 to 1024"),
            ),
        }
    }
    if let Some(v) = env.var("DELEGATE_LOG") {
        raw.log_level = Some(v);
    }
}

/// A warning when `path` holds a secret and every user may read it.
fn world_readable_secret(path: &Path, what: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "{} holds {what} and is readable by every user (mode {:o}); run `chmod 0640 {}` (owner root, group delegate)",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

fn finish(c: &mut Collector<'_>, raw: Raw, env: &dyn Env) -> Option<Config> {
    let mut warnings = Vec::new();
    let secrets_in_file = raw.token_in_file
        || raw
            .docker
            .as_ref()
            .is_some_and(|d| !d.registries.is_empty());
    if secrets_in_file {
        warnings.extend(world_readable_secret(
            c.path,
            "the delegate token or registry credentials",
        ));
    }
    if raw.token.is_none()
        && let Some((file, _)) = &raw.token_file
    {
        warnings.extend(world_readable_secret(Path::new(file), "the delegate token"));
    }
    if let Some(addr) = raw.metrics_listen
        && !addr.ip().is_loopback()
    {
        warnings.push(format!(
            "metrics_listen {addr} is not a loopback address: anyone who reaches it can read \
             the agent's metrics (use 127.0.0.1:PORT unless a firewall guards it)"
        ));
    }
    let manager_urls = match raw.manager_url {
        None => {
            c.at(
                None,
                "manager_url is missing; add manager_url = \"https://manager.example:7700\" (or set DELEGATE_MANAGER_URL)",
            );
            None
        }
        Some((urls, line)) => {
            let where_ = if line.is_some() {
                ""
            } else {
                " (from DELEGATE_MANAGER_URL)"
            };
            let mut checked: Vec<String> = Vec::new();
            let mut bad = false;
            for url in &urls {
                let why = match check_url(url) {
                    Ok(u) if checked.contains(&u) => "is listed twice".to_string(),
                    Ok(u) => {
                        checked.push(u);
                        continue;
                    }
                    Err(why) => why,
                };
                bad = true;
                c.problems.push(Problem {
                    path: c.path.to_path_buf(),
                    line,
                    message: format!("manager_url {url:?}{where_} {why}"),
                });
            }
            (!bad).then_some(checked)
        }
    };
    for url in manager_urls.iter().flatten() {
        warnings.extend(cleartext_warning(url));
    }
    let ca = raw.ca_file.and_then(|(file, line)| {
        let from = if line.is_some() {
            ""
        } else {
            " (from DELEGATE_CA_FILE)"
        };
        let problem = match std::fs::read(&file) {
            Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => {
                    return Some(CaBundle {
                        path: PathBuf::from(&file),
                        pem,
                    });
                }
                Ok(_) => format!(
                    "ca_file {file:?}{from} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)"
                ),
                Err(e) => format!("ca_file {file:?}{from} is not a PEM certificate: {e}"),
            },
            Err(e) => format!("ca_file {file:?}{from} cannot be read: {e}"),
        };
        c.problems.push(Problem {
            path: c.path.to_path_buf(),
            line,
            message: problem,
        });
        None
    });
    let token = match (raw.token, raw.token_file) {
        (Some((t, line)), _) => {
            let from = if line.is_some() {
                ""
            } else {
                " (from DELEGATE_TOKEN)"
            };
            let wrong = if t.is_empty() {
                Some(format!(
                    "token is empty{from}; paste the delegate token (dlg_...) between the quotes, or use token_file"
                ))
            } else if t.chars().any(char::is_whitespace) {
                Some(format!(
                    "token contains whitespace{from}; paste it without spaces or line breaks"
                ))
            } else {
                None
            };
            match wrong {
                Some(message) => {
                    c.problems.push(Problem {
                        path: c.path.to_path_buf(),
                        line,
                        message,
                    });
                    None
                }
                None => Some(t),
            }
        }
        (None, Some((file, line))) => match std::fs::read_to_string(&file) {
            Ok(t) if t.trim().chars().any(char::is_whitespace) => {
                c.problems.push(Problem {
                    path: c.path.to_path_buf(),
                    line,
                    message: format!(
                        "token_file {file:?} holds more than one word; put only the delegate token in it"
                    ),
                });
                None
            }
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                c.problems.push(Problem {
                    path: c.path.to_path_buf(),
                    line,
                    message: format!("token_file {file:?} is empty; put the delegate token in it"),
                });
                None
            }
            Err(e) => {
                c.problems.push(Problem {
                    path: c.path.to_path_buf(),
                    line,
                    message: format!("token_file {file:?} cannot be read: {e}"),
                });
                None
            }
        },
        (None, None) => {
            c.at(
                None,
                "no token; add token = \"dlg_...\" or token_file = \"/etc/delegate/token\" (or set DELEGATE_TOKEN); create one with `delegate-manager token create --name NAME`",
            );
            None
        }
    };
    let name = raw
        .name
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "delegate".to_string());
    let state_dir = raw
        .state_dir
        .or_else(|| {
            env.var("STATE_DIRECTORY")
                .and_then(|s| s.split(':').next().map(str::to_string))
        })
        .unwrap_or_else(|| DEFAULT_STATE_DIR.to_string());
    if !state_dir.starts_with('/') {
        c.at(
            None,
            format!("state_dir {state_dir:?} must be an absolute path"),
        );
    }
    Some(Config {
        manager_urls: manager_urls?,
        ca,
        token: Secret::new(token?),
        name,
        tags: raw.tags.unwrap_or_default(),
        upgrade_group: raw.upgrade_group,
        concurrency: raw.concurrency.unwrap_or(4),
        state_dir: PathBuf::from(state_dir),
        drain_timeout: raw.drain_timeout.unwrap_or(Duration::from_secs(600)),
        kill_grace: raw.kill_grace.unwrap_or(Duration::from_secs(10)),
        acquire_wait: raw.acquire_wait.unwrap_or(Duration::from_secs(30)),
        log_level: raw.log_level.unwrap_or_else(|| "info".to_string()),
        shell_enabled: raw.shell_enabled.unwrap_or(true),
        shell_mode: raw.shell_mode.unwrap_or_default(),
        http_enabled: raw.http_enabled.unwrap_or(true),
        docker: raw.docker.unwrap_or_default(),
        metrics_listen: raw.metrics_listen,
        max_log_bytes: raw.max_log_bytes.unwrap_or(DEFAULT_MAX_LOG_BYTES),
        kubernetes: raw.kubernetes,
        warnings,
    })
}

/// Plain `http://` to anything but this host sends the token and the tasks' secrets in
/// clear text over the network: allowed (a lab, a tunnel) but said at every start.
/// `manager_url`: one URL, or a non-empty list of the nodes of one manager.
fn manager_urls(c: &mut Collector<'_>, v: &Spanned<DeValue<'_>>) -> Option<Vec<String>> {
    const HOW: &str = "manager_url must be a URL or a list of URLs, e.g. manager_url = \"https://manager.example:7700\" or [\"https://m1.example:7700\", \"https://m2.example:7700\"]";
    if let Some(s) = v.get_ref().as_str() {
        return Some(vec![s.to_string()]);
    }
    let Some(items) = v.get_ref().as_array() else {
        c.at(Some(v.span().start), HOW);
        return None;
    };
    let mut urls = Vec::new();
    for item in items.iter() {
        match item.get_ref().as_str() {
            Some(s) => urls.push(s.to_string()),
            None => c.at(Some(item.span().start), HOW),
        }
    }
    if urls.is_empty() {
        c.at(Some(v.span().start), format!("{HOW}; the list is empty"));
        return None;
    }
    Some(urls)
}

fn cleartext_warning(manager_url: &str) -> Option<String> {
    let u = url::Url::parse(manager_url).ok()?;
    if u.scheme() != "http" {
        return None;
    }
    let loopback = match u.host()? {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(a) => a.is_loopback(),
        url::Host::Ipv6(a) => a.is_loopback(),
    };
    (!loopback).then(|| {
        format!(
            "manager_url {manager_url} is plain http to another host: the delegate token and task secrets cross the network in clear text; use https:// (with ca_file for a private CA)"
        )
    })
}

/// The manager URL must be http(s) with a host; a trailing slash is dropped.
fn check_url(raw: &str) -> Result<String, String> {
    const WANT: &str = "is not a valid URL (expected http:// or https://)";
    const NO_HOST: &str = "has no host (expected e.g. https://manager.example:7700)";
    if raw.chars().any(char::is_whitespace) {
        return Err("contains whitespace".into());
    }
    let u = url::Url::parse(raw).map_err(|e| match e {
        url::ParseError::EmptyHost => NO_HOST.to_string(),
        url::ParseError::RelativeUrlWithoutBase => WANT.to_string(),
        e => format!("is not a valid URL ({e})"),
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(WANT.into());
    }
    if u.host().is_none() {
        return Err(NO_HOST.into());
    }
    Ok(raw.trim_end_matches('/').to_string())
}

/// A valid config without reading a file, for other modules' unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub(crate) fn minimal() -> Config {
        Config {
            // Nothing listens on the discard port: calls to the manager fail quietly.
            manager_urls: vec!["http://127.0.0.1:9".into()],
            ca: None,
            token: Secret::new("dlg_test"),
            name: "unit".into(),
            tags: vec![],
            upgrade_group: None,
            concurrency: 4,
            state_dir: PathBuf::from("/nonexistent"),
            drain_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(1),
            acquire_wait: Duration::from_secs(1),
            log_level: "info".into(),
            shell_enabled: true,
            shell_mode: ShellMode::Auto,
            http_enabled: false,
            docker: DockerConfig {
                enabled: false,
                ..DockerConfig::default()
            },
            metrics_listen: None,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            kubernetes: vec![],
            warnings: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn full_config_loads_with_defaults_filled_in() {
        let f = write(
            "manager_url = \"http://127.0.0.1:7700/\"\ntoken = \"dlg_x\"\ntags = [\"a\", \"b\"]\nconcurrency = 8\ndrain_timeout = \"2m\"\n[http]\nenabled = false\n",
        );
        let env: [(&str, &str); 0] = [];
        let c = Config::load(f.path(), &env).expect("valid config");
        assert_eq!(c.manager_urls, ["http://127.0.0.1:7700"]);
        assert_eq!(c.tags, ["a", "b"]);
        assert_eq!(c.concurrency, 8);
        assert_eq!(c.drain_timeout, Duration::from_secs(120));
        assert!(c.shell_enabled && !c.http_enabled);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
    }

    #[test]
    fn upgrade_group_is_read_checked_and_overridable() {
        let base = "manager_url = \"http://127.0.0.1:7700/\"\ntoken = \"dlg_x\"\n";
        let none: [(&str, &str); 0] = [];
        let f = write(base);
        assert_eq!(
            Config::load(f.path(), &none)
                .expect("valid config")
                .upgrade_group,
            None
        );
        let f = write(&format!("{base}upgrade_group = \"canary\"\n"));
        let c = Config::load(f.path(), &none).expect("valid config");
        assert_eq!(c.upgrade_group.as_deref(), Some("canary"));
        let env = [("DELEGATE_UPGRADE_GROUP", "wave-2")];
        let c = Config::load(f.path(), &env).expect("valid config");
        assert_eq!(c.upgrade_group.as_deref(), Some("wave-2"));

        for bad in ["", "Canary", "-x", "a_b", "eu west", &"a".repeat(64)] {
            let f = write(&format!("{base}upgrade_group = {bad:?}\n"));
            let text = Config::load(f.path(), &none)
                .expect_err("refused")
                .to_string();
            let p = f.path().display();
            assert!(
                text.contains(&format!(
                    "{p}:3: upgrade_group {bad:?} is not a valid group name: use 1 to 63 \
                     characters of a-z, 0-9 and '-', starting with a letter or digit"
                )),
                "{text}"
            );
        }
        for good in ["0", "a", "eu-west-1", &"a".repeat(63)] {
            assert_eq!(check_upgrade_group(good), Ok(()), "{good}");
        }
        let f = write(&format!("{base}upgrade_group = 3\n"));
        let text = Config::load(f.path(), &none)
            .expect_err("refused")
            .to_string();
        assert!(text.contains("upgrade_group must be a string"), "{text}");
        let env = [("DELEGATE_UPGRADE_GROUP", "Bad!")];
        let text = Config::load(f.path(), &env)
            .expect_err("refused")
            .to_string();
        assert!(
            text.contains("DELEGATE_UPGRADE_GROUP: upgrade_group \"Bad!\" is not a valid"),
            "{text}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let f = write(
            "token = \"dlg_x\"\nmanager_url = \"htp://x\"\nconcurency = 3\ndrain_timeout = \"soon\"\n",
        );
        let env: [(&str, &str); 0] = [];
        let e = Config::load(f.path(), &env).expect_err("must be refused");
        let text = e.to_string();
        let p = f.path().display();
        assert!(
            text.contains(&format!(
                "{p}:2: manager_url \"htp://x\" is not a valid URL (expected http:// or https://)"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "{p}:3: unknown key \"concurency\"; did you mean \"concurrency\""
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("{p}:4: drain_timeout \"soon\" is not a duration")),
            "{text}"
        );
        assert_eq!(e.problems.len(), 3, "{text}");
    }

    /// Running shell tasks as the agent's children is never a fallback: only the config
    /// chooses it, and a mistyped mode is refused with its line rather than guessed.
    #[test]
    fn shell_mode_defaults_to_auto_and_children_is_an_explicit_choice() {
        let env: [(&str, &str); 0] = [];
        let base = "manager_url = \"http://x\"\ntoken = \"t\"\n";
        let c = Config::load(write(base).path(), &env).expect("valid");
        assert_eq!(c.shell_mode, ShellMode::Auto);
        for (mode, want) in [
            ("units", ShellMode::Units),
            ("children", ShellMode::Children),
            ("auto", ShellMode::Auto),
        ] {
            let f = write(&format!("{base}[shell]\nmode = \"{mode}\"\n"));
            assert_eq!(
                Config::load(f.path(), &env).expect("valid").shell_mode,
                want
            );
        }
        let f = write(&format!("{base}[shell]\nmode = \"direct\"\n"));
        let e = Config::load(f.path(), &env).expect_err("must be refused");
        assert_eq!(e.problems[0].line, Some(4), "{e}");
        assert!(
            e.to_string()
                .contains("\"children\" (tasks share the agent's user"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let f = write("manager_url = \"http://x\"\ntoken = \"t\"\n\nconcurrency = = 3\n");
        let env: [(&str, &str); 0] = [];
        let e = Config::load(f.path(), &env).expect_err("must be refused");
        assert_eq!(e.problems[0].line, Some(4), "{e}");
        assert!(e.to_string().contains("TOML syntax error"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file_and_state_directory_comes_from_systemd() {
        let f = write("manager_url = \"http://a:1\"\ntoken = \"file\"\nname = \"n\"\n");
        let env = [
            ("DELEGATE_MANAGER_URL", "http://b:2"),
            ("DELEGATE_TOKEN", "envtok"),
            ("DELEGATE_TAGS", "x, y"),
            ("STATE_DIRECTORY", "/var/lib/delegate-x"),
        ];
        let c = Config::load(f.path(), &env).expect("valid");
        assert_eq!(c.manager_urls, ["http://b:2"]);
        assert_eq!(c.token.expose(), "envtok");
        assert_eq!(c.tags, ["x", "y"]);
        assert_eq!(c.name, "n");
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/delegate-x"));
    }

    #[test]
    fn a_world_readable_token_is_a_warning_not_an_error() {
        use std::os::unix::fs::PermissionsExt;
        let f = write("manager_url = \"http://127.0.0.1:1\"\ntoken = \"dlg_secret\"\n");
        let env: [(&str, &str); 0] = [];
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let c = Config::load(f.path(), &env).expect("still valid");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("readable by every user (mode 644)"),
            "{:?}",
            c.warnings
        );
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(
            Config::load(f.path(), &env)
                .expect("valid")
                .warnings
                .is_empty()
        );
        // The token from the environment is not the file's secret.
        std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let env = [("DELEGATE_TOKEN", "dlg_env")];
        assert!(
            Config::load(f.path(), &env)
                .expect("valid")
                .warnings
                .is_empty()
        );
    }

    #[test]
    fn debug_of_a_config_leaks_no_token() {
        let f = write("manager_url = \"http://x\"\ntoken = \"dlg_topsecret\"\n");
        let env: [(&str, &str); 0] = [];
        let c = Config::load(f.path(), &env).expect("valid");
        assert_eq!(c.token.expose(), "dlg_topsecret");
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(shown.contains("token: <redacted>"), "{shown}");
    }

    #[test]
    fn plain_http_to_another_host_is_a_warning_and_loopback_or_https_is_not() {
        let env: [(&str, &str); 0] = [];
        let warned = |url: &str| {
            let f = write(&format!("manager_url = {url:?}\ntoken = \"t\"\n"));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            Config::load(f.path(), &env).expect("valid").warnings
        };
        let w = warned("http://manager.example:7700");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("clear text") && w[0].contains("https://"),
            "{w:?}"
        );
        assert_eq!(warned("http://10.1.2.3:7700").len(), 1);
        for quiet in [
            "http://127.0.0.1:7700",
            "http://localhost:7700",
            "http://[::1]:7700",
            "https://manager.example:7700",
        ] {
            assert!(warned(quiet).is_empty(), "{quiet}");
        }
    }

    #[test]
    fn max_log_bytes_defaults_to_256_mib_and_refuses_nonsense() {
        let env: [(&str, &str); 0] = [];
        let load = |extra: &str| {
            let f = write(&format!(
                "manager_url = \"http://127.0.0.1:7700\"\ntoken = \"t\"\n{extra}"
            ));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            Config::load(f.path(), &env)
        };
        assert_eq!(load("").expect("valid").max_log_bytes, 256 * 1024 * 1024);
        assert_eq!(
            load("max_log_bytes = 1_048_576\n")
                .expect("valid")
                .max_log_bytes,
            1 << 20
        );
        for bad in ["max_log_bytes = 10\n", "max_log_bytes = \"1G\"\n"] {
            let e = load(bad).expect_err(bad);
            assert!(e.to_string().contains("max_log_bytes must be"), "{e}");
        }
    }

    #[test]
    fn metrics_are_off_by_default_and_a_non_loopback_listener_is_a_warning() {
        let env: [(&str, &str); 0] = [];
        let load = |extra: &str| {
            let f = write(&format!(
                "manager_url = \"http://127.0.0.1:7700\"\ntoken = \"t\"\n{extra}"
            ));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o600))
                .expect("chmod");
            Config::load(f.path(), &env)
        };
        let c = load("").expect("valid");
        assert_eq!(c.metrics_listen, None);
        let c = load("metrics_listen = \"127.0.0.1:9469\"\n").expect("valid");
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9469".parse().expect("addr"))
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = load("metrics_listen = \"0.0.0.0:9469\"\n").expect("valid");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(
            c.warnings[0].contains("not a loopback address"),
            "{:?}",
            c.warnings
        );
        let e = load("metrics_listen = \"localhost\"\n").expect_err("no port");
        assert_eq!(e.problems[0].line, Some(3), "{e}");
        assert!(e.problems[0].message.contains("127.0.0.1:9469"), "{e}");
    }

    #[test]
    fn ca_file_problems_name_the_line_and_what_is_wrong() {
        let env: [(&str, &str); 0] = [];
        let not_pem = write("just text\n");
        let f = write(&format!(
            "manager_url = \"https://m:1\"\ntoken = \"t\"\nca_file = {:?}\n",
            not_pem.path().display().to_string()
        ));
        let e = Config::load(f.path(), &env).expect_err("refused");
        assert_eq!(e.problems[0].line, Some(3), "{e}");
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let env = [("DELEGATE_CA_FILE", "/nonexistent/ca.pem")];
        let e = Config::load(f.path(), &env).expect_err("refused");
        assert!(
            e.to_string()
                .contains("ca_file \"/nonexistent/ca.pem\" (from DELEGATE_CA_FILE) cannot be read"),
            "{e}"
        );
    }

    #[test]
    fn manager_urls_are_checked_by_a_url_parser() {
        assert_eq!(
            check_url("https://m.example:7700/"),
            Ok("https://m.example:7700".into())
        );
        assert!(
            check_url("htp://x")
                .expect_err("scheme")
                .contains("expected http://")
        );
        assert!(check_url("m.example:7700").is_err());
        assert!(
            check_url("http://")
                .expect_err("host")
                .contains("has no host")
        );
        assert!(
            check_url("http://a b")
                .expect_err("space")
                .contains("whitespace")
        );
        assert!(check_url("http://[::1").is_err());
    }

    #[test]
    fn manager_url_takes_a_list_of_nodes_and_refuses_an_empty_a_repeated_or_a_bad_one() {
        let env: [(&str, &str); 0] = [];
        let f = write("manager_url = [\"https://m1:7700/\", \"https://m2:7700\"]\ntoken = \"t\"\n");
        let c = Config::load(f.path(), &env).expect("valid");
        assert_eq!(c.manager_urls, ["https://m1:7700", "https://m2:7700"]);

        let env = [(
            "DELEGATE_MANAGER_URL",
            "http://127.0.0.1:1, http://127.0.0.1:2",
        )];
        let c = Config::load(f.path(), &env).expect("valid");
        assert_eq!(c.manager_urls, ["http://127.0.0.1:1", "http://127.0.0.1:2"]);

        let env: [(&str, &str); 0] = [];
        for (value, says) in [
            ("[]", "the list is empty"),
            (
                "[\"https://m1:7700\", \"https://m1:7700/\"]",
                "is listed twice",
            ),
            (
                "[\"https://m1:7700\", \"m2:7700\"]",
                "\"m2:7700\" is not a valid URL",
            ),
            (
                "[\"https://m1:7700\", 7]",
                "must be a URL or a list of URLs",
            ),
            ("7", "must be a URL or a list of URLs"),
        ] {
            let f = write(&format!("token = \"t\"\nmanager_url = {value}\n"));
            let e = Config::load(f.path(), &env).expect_err(value).to_string();
            let p = f.path().display();
            assert!(e.contains(&format!("{p}:2: ")), "{value}: {e}");
            assert!(e.contains(says), "{value}: {e}");
        }
    }

    #[test]
    fn an_empty_token_names_its_line_and_says_it_is_empty() {
        let env: [(&str, &str); 0] = [];
        let f = write("manager_url = \"https://m:1\"\n\ntoken = \"\"\n");
        let e = Config::load(f.path(), &env).expect_err("refused");
        assert_eq!(
            e.to_string(),
            format!(
                "{}:3: token is empty; paste the delegate token (dlg_...) between the quotes, or use token_file",
                f.path().display()
            )
        );
        let f = write("manager_url = \"https://m:1\"\ntoken = \"dlg_a dlg_b\"\n");
        let e = Config::load(f.path(), &env).expect_err("refused");
        assert!(
            e.to_string().contains(":2: token contains whitespace"),
            "{e}"
        );
    }

    #[test]
    fn a_config_that_is_not_utf8_names_the_line_and_byte() {
        let env: [(&str, &str); 0] = [];
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(b"manager_url = \"https://m:1\"\nname = \"caf\xe9\"\ntoken = \"t\"\n")
            .expect("write");
        let e = Config::load(f.path(), &env).expect_err("refused");
        assert_eq!(
            e.to_string(),
            format!(
                "{}:2: not UTF-8 text: byte 0xe9 at column 12 is not valid UTF-8; save the file as UTF-8",
                f.path().display()
            )
        );
    }

    #[test]
    fn missing_file_and_missing_keys_say_how_to_fix() {
        let env: [(&str, &str); 0] = [];
        let e = Config::load(Path::new("/nonexistent/delegate.toml"), &env)
            .expect_err("must be refused");
        let text = e.to_string();
        assert!(text.contains("manager_url is missing"), "{text}");
        assert!(text.contains("token create"), "{text}");
    }

    #[test]
    fn docker_table_loads_and_never_shows_its_secrets() {
        let f = write(
            "manager_url = \"http://x\"\ntoken = \"t\"\n[docker]\nsocket = \"unix:///run/d.sock\"\nallowed_mounts = [\"/srv/builds\"]\n[docker.registries.\"reg.example:5000\"]\nusername = \"ci\"\npassword = \"hunter2\"\n",
        );
        let env: [(&str, &str); 0] = [];
        let c = Config::load(f.path(), &env).expect("valid");
        assert!(c.docker.enabled && !c.docker.allow_privileged);
        assert_eq!(c.docker.socket, PathBuf::from("/run/d.sock"));
        assert_eq!(c.docker.allowed_mounts, [PathBuf::from("/srv/builds")]);
        let auth = &c.docker.registries["reg.example:5000"];
        assert_eq!(auth.password.as_ref().map(Secret::expose), Some("hunter2"));
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn docker_table_problems_name_their_lines() {
        let f = write(
            "manager_url = \"http://x\"\ntoken = \"t\"\n[docker]\nallowed_mounts = [\"rel\"]\nallow_privileged = \"yes\"\n[docker.registries.\"r\"]\nusername = \"u\"\n",
        );
        let env: [(&str, &str); 0] = [];
        let e = Config::load(f.path(), &env).expect_err("must be refused");
        let mut lines: Vec<Option<usize>> = e.problems.iter().map(|p| p.line).collect();
        lines.sort();
        // The registry's problem points at its table header.
        assert_eq!(lines, [Some(4), Some(5), Some(6)], "{e}");
        assert!(e.to_string().contains("needs username and password"), "{e}");
    }

    #[test]
    fn a_kubernetes_policy_loads_and_is_off_unless_set() {
        const NO_ENV: [(&str, &str); 0] = [];
        let f = write(
            "manager_url = \"http://x\"\ntoken = \"t\"\n[[kubernetes]]\nname = \"a\"\nin_cluster = true\nallowed_namespaces = [\"apps\"]\nallowed_kinds = [\"Deployment.apps\", \"ConfigMap\"]\n[[kubernetes]]\nname = \"b\"\nin_cluster = true\n",
        );
        let c = Config::load(f.path(), &NO_ENV).expect("loads");
        let p = &c.kubernetes[0].policy;
        assert!(p.is_set());
        assert_eq!(
            p.allowed_namespaces.as_deref(),
            Some(&["apps".to_string()][..])
        );
        assert_eq!(
            p.allowed_kinds.as_deref(),
            Some(&["Deployment.apps".to_string(), "ConfigMap".to_string()][..])
        );
        assert!(!c.kubernetes[1].policy.is_set());
        let f = write(
            "manager_url = \"http://x\"\ntoken = \"t\"\n[[kubernetes]]\nname = \"a\"\nin_cluster = true\nallowed_namespaces = \"apps\"\nallowed_kinds = [\"a b\"]\n",
        );
        let e = Config::load(f.path(), &NO_ENV).expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains(":6: kubernetes.allowed_namespaces must be a list"),
            "{text}"
        );
        assert!(
            text.contains(":7: kubernetes.allowed_kinds entries must be names"),
            "{text}"
        );
    }

    #[test]
    fn kubernetes_tables_load_and_their_problems_name_their_lines() {
        const NO_ENV: [(&str, &str); 0] = [];
        let f = write(
            "manager_url = \"http://x\"\ntoken = \"t\"\n[[kubernetes]]\nname = \"prod\"\nkubeconfig = \"/etc/delegate/kube/prod.yaml\"\ncontext = \"admin@prod\"\n[[kubernetes]]\nname = \"here\"\nin_cluster = true\n",
        );
        let c = Config::load(f.path(), &NO_ENV).expect("loads");
        assert_eq!(c.kubernetes.len(), 2);
        assert_eq!(
            c.kubernetes[0].source,
            KubeSource::Kubeconfig {
                path: PathBuf::from("/etc/delegate/kube/prod.yaml"),
                context: Some("admin@prod".into())
            }
        );
        assert_eq!(c.kubernetes[1].source, KubeSource::InCluster);

        let f = write(
            "manager_url = \"http://x\"\ntoken = \"t\"\n[[kubernetes]]\nname = \"a\"\n[[kubernetes]]\nname = \"b\"\nkubeconfig = \"rel.yaml\"\n[[kubernetes]]\nname = \"c\"\nkubeconfg = \"/x\"\n",
        );
        let e = Config::load(f.path(), &NO_ENV).expect_err("problems");
        let text = e.to_string();
        assert!(
            text.contains(":3: [[kubernetes]] \"a\" needs kubeconfig"),
            "{text}"
        );
        assert!(
            text.contains(":7: kubernetes.kubeconfig \"rel.yaml\" must be an absolute path"),
            "{text}"
        );
        assert!(
            text.contains(":10: unknown key kubernetes.\"kubeconfg\""),
            "{text}"
        );
        assert_eq!(text.lines().count(), 3, "one problem each: {text}");
    }
}
