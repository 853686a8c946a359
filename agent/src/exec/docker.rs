//! The `docker` executor: a container on the local Docker engine, over its Unix socket.
//!
//! Containers outlive the agent, which is the point: a `kill -9` or an upgrade restart of
//! the agent must not lose the task. So the container is journalled (and labelled with the
//! task id, attempt and delegate) before it starts, and its output is read through the
//! engine's *log* endpoint rather than an attach stream. The log endpoint replays the
//! container's output from the beginning at any time, so a restarted agent re-reads it,
//! skips the bytes the spool already holds and appends exactly the rest: the live path and
//! the adoption path see the very same byte sequence.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, HostConfig, HostConfigLogConfig, Mount,
    MountType,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use delegate_protocol::{DockerSpec, MountKind, PullPolicy};
use futures_util::StreamExt;
use tracing::{debug, info, warn};

use delegate_durable::Durability;
use serde::{Deserialize, Serialize};

use super::{ExecContext, ExecOutcome, Facts, Restart};
use crate::config::{Config, DockerConfig, RegistryAuth};

/// The record of the task's container.
pub const CONTAINER_RECORD: &str = "container.json";

/// The container a docker task runs in, so a restarted agent can re-attach to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    /// Log length when the container's output began (the agent's own notes come first);
    /// the container's log stream maps to the spooled log from this offset on.
    pub log_base: u64,
    /// Set once the container has ended, before it is removed, so an agent that dies
    /// between removal and journalling the result still reports the real exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
}

/// Docker tasks run where `[docker]` is enabled (an engine down right now fails the task
/// naming its problem); their containers outlive the agent, so they are adopted.
pub(super) fn facts(config: &Config) -> Facts {
    Facts {
        runs: config.docker.enabled,
        adoptable: true,
    }
}

/// A container outlives the agent: re-attach to it where docker tasks still run.
pub(super) fn on_restart(runs: bool) -> Restart {
    if runs {
        Restart::Adopt("re-attaching to the container of a task that ran when the delegate stopped")
    } else {
        Restart::Lost
    }
}

/// Journal the container; not fatal when it fails: a restarted agent still finds the
/// container by its labels.
fn journal_container(ctx: &ExecContext, rec: &ContainerRecord) {
    if let Err(e) = ctx
        .journal
        .put(CONTAINER_RECORD, rec, Durability::ProcessCrash)
    {
        warn!("cannot journal the container: {e}");
    }
}

/// Label keys every container of ours carries; a restarted agent finds them by these.
pub const LABEL_TASK: &str = "dev.delegate.task-id";
pub const LABEL_ATTEMPT: &str = "dev.delegate.attempt";
pub const LABEL_DELEGATE: &str = "dev.delegate.delegate";
pub const LABEL_DELEGATE_ID: &str = "dev.delegate.delegate-id";

/// Per-request limit for calls that answer at once (create, inspect, stop...).
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// How long the engine gets to answer the first `/version` call.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);

/// Why the engine cannot be used at all; each says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "no Docker engine socket at {path}; install and start Docker (e.g. `apt-get install docker.io`) or set socket in the [docker] table of delegate.toml"
    )]
    Missing { path: PathBuf },
    #[error(
        "permission denied on the Docker socket {path}; add the delegate user to the docker group (`usermod -aG docker delegate`) and restart the agent"
    )]
    PermissionDenied { path: PathBuf },
    #[error("the Docker engine at {path} does not answer ({reason}); is dockerd running?")]
    Unreachable { path: PathBuf, reason: String },
}

/// Connect to the engine and agree on an API version, so older and newer engines work.
pub async fn connect(cfg: &DockerConfig) -> Result<Docker, EngineError> {
    let path = cfg.socket.clone();
    // bollard folds every socket error into one; tell the operator's cases apart first.
    match tokio::net::UnixStream::connect(&path).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(EngineError::Missing { path });
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(EngineError::PermissionDenied { path });
        }
        Err(e) => {
            return Err(EngineError::Unreachable {
                path,
                reason: e.to_string(),
            });
        }
    }
    let unreachable = |reason: String| EngineError::Unreachable {
        path: cfg.socket.clone(),
        reason,
    };
    let docker = Docker::connect_with_unix(
        &cfg.socket.to_string_lossy(),
        REQUEST_TIMEOUT_SECS,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| unreachable(e.to_string()))?;
    match tokio::time::timeout(CONNECT_LIMIT, docker.negotiate_version()).await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!(
            "no answer within {}s",
            CONNECT_LIMIT.as_secs()
        ))),
    }
}

/// Ask the engine for its version (for the startup line and the target list).
pub async fn probe(cfg: &DockerConfig) -> Result<String, EngineError> {
    let docker = connect(cfg).await?;
    let v = docker
        .version()
        .await
        .map_err(|e| EngineError::Unreachable {
            path: cfg.socket.clone(),
            reason: e.to_string(),
        })?;
    Ok(format!(
        "{} (API {})",
        v.version.unwrap_or_default(),
        v.api_version.unwrap_or_default()
    ))
}

/// The mounts of a spec the policy accepted, as the engine gets them: every bind source
/// is the *resolved* path that was checked, so a symlink swapped after the check cannot
/// point the engine elsewhere.
pub fn checked_mounts(
    spec: &DockerSpec,
    cfg: &DockerConfig,
    delegate: &str,
) -> Result<Vec<Mount>, String> {
    if spec.privileged && !cfg.allow_privileged {
        return Err(format!(
            "spec.privileged: privileged containers are not allowed on delegate {delegate}; an operator may set allow_privileged = true in the [docker] table of delegate.toml (a privileged container is root on the host)"
        ));
    }
    if let Some(mode) = &spec.network_mode
        && !network_mode_allowed(mode, &cfg.allowed_network_modes)
    {
        return Err(format!(
            "spec.network_mode: network mode {mode:?} is not allowed on delegate {delegate} (allowed: {}); an operator may add it to allowed_network_modes in the [docker] table of delegate.toml (\"host\" shares the host's network stack, \"container:<id>\" another container's)",
            cfg.allowed_network_modes.join(", ")
        ));
    }
    let allowed = canonical_allowed(cfg);
    let mut out = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        let source = match m.kind {
            MountKind::Bind => {
                // Resolve `..` and symlinks: `/srv/builds/../../etc` must not pass as
                // `/srv/builds`, and the engine must get what was checked.
                let real = std::fs::canonicalize(&m.source).map_err(|e| {
                    format!(
                        "spec.mounts: bind mount source {} cannot be used on delegate {delegate}: {e}",
                        m.source
                    )
                })?;
                if !path_allowed(&real, &allowed) {
                    return Err(format!(
                        "spec.mounts: bind mount of {} is not allowed on delegate {delegate} ({}); an operator may add it to allowed_mounts in the [docker] table of delegate.toml",
                        m.source,
                        allowed_list(cfg)
                    ));
                }
                real.to_string_lossy().into_owned()
            }
            MountKind::Volume => m.source.clone(),
        };
        out.push(Mount {
            typ: Some(match m.kind {
                MountKind::Bind => MountType::BIND,
                MountKind::Volume => MountType::VOLUME,
            }),
            source: Some(source),
            target: Some(m.target.clone()),
            read_only: Some(m.read_only),
            ..Default::default()
        });
    }
    Ok(out)
}

fn canonical_allowed(cfg: &DockerConfig) -> Vec<PathBuf> {
    cfg.allowed_mounts
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect()
}

fn allowed_list(cfg: &DockerConfig) -> String {
    if cfg.allowed_mounts.is_empty() {
        "no host paths are allowed".to_string()
    } else {
        let l: Vec<String> = cfg
            .allowed_mounts
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        format!("allowed: {}", l.join(", "))
    }
}

/// `mode` is listed, or is `default` (the engine's name for `bridge`) while `bridge` is;
/// a listed `container` allows every `container:<id>`.
fn network_mode_allowed(mode: &str, allowed: &[String]) -> bool {
    let mode = if mode == "default" { "bridge" } else { mode };
    allowed
        .iter()
        .any(|a| a == mode || (a == "container" && mode.starts_with("container:")))
}

/// Named volumes that already exist are checked for what they mount: a `local` volume
/// with driver options (`device=/etc, o=bind`, or an NFS/other filesystem) mounts
/// something the operator did not allow. A bind-type volume of a path under
/// `allowed_mounts` passes; every other driver option is refused. A volume that does not
/// exist yet is created by the engine without options.
async fn check_volumes(
    docker: &Docker,
    spec: &DockerSpec,
    cfg: &DockerConfig,
    delegate: &str,
) -> Result<(), String> {
    let allowed = canonical_allowed(cfg);
    for m in spec.mounts.iter().filter(|m| m.kind == MountKind::Volume) {
        let volume = match docker.inspect_volume(&m.source).await {
            Ok(v) => v,
            Err(e) if is_status(&e, 404) => continue,
            Err(e) => {
                return Err(format!(
                    "spec.mounts: cannot inspect volume {}: {}",
                    m.source,
                    engine_message(&e)
                ));
            }
        };
        if volume.options.is_empty() {
            continue;
        }
        if let Some(device) = bound_device(&volume.options)
            && std::fs::canonicalize(device).is_ok_and(|real| path_allowed(&real, &allowed))
        {
            continue;
        }
        let mut opts: Vec<String> = volume
            .options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        opts.sort();
        return Err(format!(
            "spec.mounts: volume {} is not allowed on delegate {delegate}: its driver options ({}) mount a host path or filesystem outside allowed_mounts ({}); use a volume without driver options, or a bind mount under allowed_mounts",
            m.source,
            opts.join(", "),
            allowed_list(cfg)
        ));
    }
    Ok(())
}

/// The host path a `local` volume binds (`type=none`/`o=bind` with `device=PATH`).
fn bound_device(options: &HashMap<String, String>) -> Option<&str> {
    let device = options.get("device")?;
    let is_bind = options.get("type").is_some_and(|t| t == "none")
        || options
            .get("o")
            .is_some_and(|o| o.split(',').any(|x| x == "bind" || x == "rbind"));
    // Options other than these three could change what is mounted.
    let only_bind_keys = options
        .keys()
        .all(|k| matches!(k.as_str(), "device" | "type" | "o"));
    (is_bind && only_bind_keys).then_some(device.as_str())
}

/// Run (or, when `ctx.adopt`, re-attach to) the task's container until it ends.
pub async fn run(spec: &DockerSpec, mut ctx: ExecContext) -> ExecOutcome {
    let mounts = match checked_mounts(spec, &ctx.docker, &ctx.delegate_name) {
        Ok(m) => m,
        Err(why) => return ExecOutcome::CouldNotStart(why),
    };
    let docker = match connect(&ctx.docker).await {
        Ok(d) => d,
        Err(e) => return ExecOutcome::CouldNotStart(format!("cannot run the container: {e}")),
    };
    let name = container_name(&ctx.task_id, ctx.attempt);
    let record = if ctx.adopt {
        match find(&docker, &ctx, &name).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return ExecOutcome::Lost(format!(
                    "the delegate restarted while this task ran and its container {name} is gone (removed by someone else, or the engine lost it)"
                ));
            }
            Err(e) => return ExecOutcome::CouldNotStart(format!("cannot re-attach: {e}")),
        }
    } else {
        if let Err(why) = check_volumes(&docker, spec, &ctx.docker, &ctx.delegate_name).await {
            return ExecOutcome::CouldNotStart(why);
        }
        match create_and_start(&docker, spec, mounts, &mut ctx, &name).await {
            Ok(r) => r,
            Err(e) => return ExecOutcome::CouldNotStart(e),
        }
    };
    follow(&docker, spec, &mut ctx, record).await
}

/// `delegate-<task>-<attempt>`: unique per attempt, so a re-delivered assignment finds the
/// container instead of starting a second one.
pub fn container_name(task_id: &str, attempt: u32) -> String {
    format!("delegate-{task_id}-{attempt}")
}

fn is_status(e: &BollardError, code: u16) -> bool {
    matches!(e, BollardError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

fn engine_message(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// The journalled container, else the one carrying our labels. Its exit code comes from
/// the journal when the container is already gone.
async fn find(
    docker: &Docker,
    ctx: &ExecContext,
    name: &str,
) -> Result<Option<ContainerRecord>, String> {
    let journalled = ctx.journal.get::<ContainerRecord>(CONTAINER_RECORD);
    if let Some(r) = &journalled {
        match docker.inspect_container(&r.id, None).await {
            Ok(_) => return Ok(journalled),
            Err(e) if is_status(&e, 404) => {
                // Removed after it ended: the journal kept the exit code.
                return Ok(journalled.filter(|r| r.exit_code.is_some()));
            }
            Err(e) => return Err(engine_message(&e)),
        }
    }
    let filters = HashMap::from([(
        "label".to_string(),
        vec![
            format!("{LABEL_TASK}={}", ctx.task_id),
            format!("{LABEL_ATTEMPT}={}", ctx.attempt),
        ],
    )]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let found = docker
        .list_containers(Some(opts))
        .await
        .map_err(|e| engine_message(&e))?;
    let Some(id) = found.into_iter().find_map(|c| c.id) else {
        return Ok(None);
    };
    info!(container = %id, "found the task's container by its labels ({name})");
    // Died before journalling the container: its output has not been written yet.
    let rec = ContainerRecord {
        id,
        log_base: ctx.log.written(),
        exit_code: None,
    };
    journal_container(ctx, &rec);
    Ok(Some(rec))
}

async fn create_and_start(
    docker: &Docker,
    spec: &DockerSpec,
    mounts: Vec<Mount>,
    ctx: &mut ExecContext,
    name: &str,
) -> Result<ContainerRecord, String> {
    ensure_image(docker, spec, ctx).await?;
    let mut labels = HashMap::from([
        (LABEL_TASK.to_string(), ctx.task_id.clone()),
        (LABEL_ATTEMPT.to_string(), ctx.attempt.to_string()),
        (LABEL_DELEGATE.to_string(), ctx.delegate_name.clone()),
    ]);
    if let Some(id) = &ctx.delegate_id {
        labels.insert(LABEL_DELEGATE_ID.to_string(), id.clone());
    }
    let mut env: Vec<String> = vec![
        format!("DELEGATE_TASK_ID={}", ctx.task_id),
        format!("DELEGATE_TASK_ATTEMPT={}", ctx.attempt),
    ];
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));
    let host = HostConfig {
        // The adoption path re-reads output from the engine's log; json-file keeps all of
        // it for the container's life whatever the daemon's default driver is.
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: None,
        }),
        network_mode: spec.network_mode.clone(),
        mounts: (!mounts.is_empty()).then_some(mounts),
        memory: spec
            .memory_bytes
            .map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
        nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
        privileged: Some(spec.privileged),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        entrypoint: spec.entrypoint.clone(),
        env: Some(env),
        working_dir: spec.working_dir.clone(),
        user: spec.user.clone(),
        labels: Some(labels),
        tty: Some(false),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        host_config: Some(host),
        ..Default::default()
    };
    let opts = CreateContainerOptionsBuilder::new().name(name).build();
    let id = match docker.create_container(Some(opts), body).await {
        Ok(r) => r.id,
        Err(e) if is_status(&e, 409) => {
            // Same attempt delivered again while its container exists: re-attach to it.
            info!("container {name} exists already; re-attaching");
            return find(docker, ctx, name)
                .await?
                .ok_or_else(|| format!("container {name} exists but cannot be found"));
        }
        Err(e) if is_status(&e, 404) => {
            return Err(format!(
                "cannot create the container: {}",
                engine_message(&e)
            ));
        }
        Err(e) => {
            return Err(format!(
                "the engine refused to create the container: {}",
                engine_message(&e)
            ));
        }
    };
    let rec = ContainerRecord {
        id: id.clone(),
        log_base: ctx.log.written(),
        exit_code: None,
    };
    journal_container(ctx, &rec);
    if let Err(e) = docker.start_container(&id, None).await {
        let why = engine_message(&e);
        remove(docker, &id).await;
        return Err(format!("the container did not start: {why}"));
    }
    debug!(container = %id, "container started");
    Ok(rec)
}

/// Apply the pull policy; only a failed pull or `never` with a missing image stop here.
async fn ensure_image(
    docker: &Docker,
    spec: &DockerSpec,
    ctx: &mut ExecContext,
) -> Result<(), String> {
    let present = match docker.inspect_image(&spec.image).await {
        Ok(_) => true,
        Err(e) if is_status(&e, 404) => false,
        Err(e) => {
            return Err(format!(
                "cannot look up image {}: {}",
                spec.image,
                engine_message(&e)
            ));
        }
    };
    match (spec.pull, present) {
        (PullPolicy::Never, false) => {
            return Err(format!(
                "image {} is not on this host's Docker engine and the pull policy is never; load it first (docker pull/load/import) or use pull: if-not-present",
                spec.image
            ));
        }
        (PullPolicy::Never | PullPolicy::IfNotPresent, true) => return Ok(()),
        _ => {}
    }
    let (repo, tag) = split_reference(&spec.image);
    ctx.note(&format!("pulling {}", spec.image));
    let registry = registry_host(&spec.image);
    let creds = credentials(ctx.docker.registries.get(registry), registry);
    let mut opts = CreateImageOptionsBuilder::new().from_image(repo);
    if let Some(tag) = tag {
        opts = opts.tag(tag);
    }
    let mut pull = docker.create_image(Some(opts.build()), None, creds);
    while let Some(step) = pull.next().await {
        if let Err(e) = step {
            return Err(format!(
                "cannot pull image {}: {}",
                spec.image,
                engine_message(&e)
            ));
        }
    }
    Ok(())
}

/// `repo[:tag]` or `repo@digest`: the engine wants the tag apart, digests stay whole.
fn split_reference(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (&image[..last_slash + i], Some(&image[last_slash + i + 1..])),
        None => (image, Some("latest")),
    }
}

/// The registry an image comes from, as the operator names it in `[docker.registries]`.
pub fn registry_host(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

fn credentials(auth: Option<&RegistryAuth>, host: &str) -> Option<DockerCredentials> {
    let auth = auth?;
    Some(DockerCredentials {
        username: auth.username.clone(),
        password: auth.password.as_ref().map(|p| p.expose().to_string()),
        identitytoken: auth.identity_token.as_ref().map(|t| t.expose().to_string()),
        serveraddress: Some(host.to_string()),
        ..Default::default()
    })
}

/// Copy the container's output into the task log until it ends, stopping it on request;
/// then read its exit code, journal it, and remove the container unless kept.
async fn follow(
    docker: &Docker,
    spec: &DockerSpec,
    ctx: &mut ExecContext,
    mut record: ContainerRecord,
) -> ExecOutcome {
    let id = record.id.clone();
    if record.exit_code.is_none() {
        // Bytes of the container's output the spool holds already (none on the live path).
        let mut skip = ctx.log.written().saturating_sub(record.log_base);
        let opts = LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .build();
        let mut logs = docker.logs(&id, Some(opts));
        let mut stopping: Option<tokio::task::JoinHandle<()>> = None;
        let mut stream_error = None;
        loop {
            tokio::select! {
                item = logs.next() => match item {
                    None => break,
                    Some(Ok(out)) => {
                        let bytes = out.into_bytes();
                        let n = bytes.len() as u64;
                        if skip >= n {
                            skip -= n;
                            continue;
                        }
                        let from = usize::try_from(skip).unwrap_or(0);
                        skip = 0;
                        ctx.log.append(&bytes[from..]);
                    }
                    Some(Err(e)) => {
                        stream_error = Some(engine_message(&e));
                        break;
                    }
                },
                _ = ctx.stop.cancelled(), if stopping.is_none() => {
                    let docker = docker.clone();
                    let id = id.clone();
                    let grace = i32::try_from(ctx.kill_grace.as_secs().max(1)).unwrap_or(10);
                    stopping = Some(tokio::spawn(async move {
                        let opts = StopContainerOptionsBuilder::new().t(grace).build();
                        if let Err(e) = docker.stop_container(&id, Some(opts)).await {
                            warn!(container = %id, "cannot stop the container: {}", engine_message(&e));
                        }
                    }));
                }
            }
        }
        drop(logs);
        if let Some(s) = stopping {
            let _ = s.await;
        }
        if let Some(e) = &stream_error {
            debug!(container = %id, "log stream ended with an error: {e}");
        }
        let wait = WaitContainerOptionsBuilder::new()
            .condition("not-running")
            .build();
        // The log stream ends when the container stops, but let the engine finish
        // recording the exit; any answer (an exit code is an "error" to bollard) will do.
        let mut w = docker.wait_container(&id, Some(wait));
        let _ = tokio::time::timeout(Duration::from_secs(30), w.next()).await;
        drop(w);
        let state = match docker.inspect_container(&id, None).await {
            Ok(c) => c.state.unwrap_or_default(),
            Err(e) => {
                let why = stream_error.unwrap_or_else(|| engine_message(&e));
                return ExecOutcome::Done {
                    success: false,
                    message: format!(
                        "lost the Docker engine while container {id} ran ({why}); the container may still run"
                    ),
                };
            }
        };
        if matches!(
            state.status,
            Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::PAUSED)
        ) {
            return ExecOutcome::Done {
                success: false,
                message: format!(
                    "lost the container's output while it still ran ({}); it was left running",
                    stream_error.unwrap_or_else(|| "the log stream ended".into())
                ),
            };
        }
        if state.status == Some(ContainerStateStatusEnum::CREATED) {
            // The agent died between create and start: nothing ran.
            remove(docker, &id).await;
            return ExecOutcome::Lost(
                "the delegate restarted before the container started; it was removed".into(),
            );
        }
        if state.oom_killed == Some(true) {
            ctx.note("the container was killed for exceeding its memory limit (OOM)");
        }
        record.exit_code = Some(state.exit_code.unwrap_or(-1));
        journal_container(ctx, &record);
    }
    if !spec.keep {
        remove(docker, &id).await;
    }
    let code = record.exit_code.unwrap_or(-1);
    ExecOutcome::Exited(i32::try_from(code).unwrap_or(-1))
}

async fn remove(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(id, Some(opts)).await {
        Ok(()) => {}
        Err(e) if is_status(&e, 404) => {}
        Err(e) => warn!(container = %id, "cannot remove the container: {}", engine_message(&e)),
    }
}

/// Is `path` (already canonical) under one of `allowed`? Whole components only:
/// `/srv/builds2` is not under `/srv/builds`.
fn path_allowed(path: &Path, allowed: &[PathBuf]) -> bool {
    allowed.iter().any(|a| path.starts_with(a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::DockerMount;

    #[test]
    fn references_split_into_repo_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox", Some("latest")));
        assert_eq!(
            split_reference("reg:5000/a/b:1.2"),
            ("reg:5000/a/b", Some("1.2"))
        );
        assert_eq!(
            split_reference("reg:5000/a/b"),
            ("reg:5000/a/b", Some("latest"))
        );
        assert_eq!(split_reference("a@sha256:00"), ("a@sha256:00", None));
        assert_eq!(registry_host("reg.example:5000/a/b:1"), "reg.example:5000");
        assert_eq!(registry_host("library/alpine"), "docker.io");
        assert_eq!(registry_host("alpine"), "docker.io");
    }

    #[test]
    fn policy_refuses_privileged_and_mounts_outside_the_allow_list() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let inside = tmp.path().join("ok");
        std::fs::create_dir_all(&inside).expect("mkdir");
        let cfg = DockerConfig {
            allowed_mounts: vec![tmp.path().to_path_buf()],
            ..Default::default()
        };
        let spec = |source: &str, privileged: bool| DockerSpec {
            image: "x".into(),
            privileged,
            mounts: vec![DockerMount {
                source: source.into(),
                target: "/d".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let ok = inside.display().to_string();
        assert!(checked_mounts(&spec(&ok, false), &cfg, "d1").is_ok());
        let sneaky = format!("{ok}/../../..");
        let e = checked_mounts(&spec(&sneaky, false), &cfg, "d1").expect_err("refused");
        assert!(e.starts_with("spec.mounts: bind mount of"), "{e}");
        let e = checked_mounts(&spec(&ok, true), &cfg, "d1").expect_err("refused");
        assert!(e.starts_with("spec.privileged"), "{e}");
        assert!(path_allowed(&inside, &cfg.allowed_mounts));
    }

    /// The reproduced escape: a symlink under an allowed directory is checked, then swapped
    /// to point at `/etc` before the engine sees the mount. The engine must get the path
    /// that was checked, not the link.
    #[test]
    fn the_engine_gets_the_resolved_bind_source_so_a_swapped_symlink_cannot_escape() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&data, &link).expect("symlink");
        let cfg = DockerConfig {
            allowed_mounts: vec![tmp.path().to_path_buf()],
            ..Default::default()
        };
        let spec = DockerSpec {
            image: "x".into(),
            mounts: vec![DockerMount {
                source: link.display().to_string(),
                target: "/d".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let mounts = checked_mounts(&spec, &cfg, "d1").expect("allowed");
        // The swap, after the check.
        std::fs::remove_file(&link).expect("rm link");
        std::os::unix::fs::symlink("/etc", &link).expect("symlink to /etc");
        let real = std::fs::canonicalize(&data).expect("canonical");
        assert_eq!(
            mounts[0].source.as_deref(),
            Some(real.to_str().expect("utf8"))
        );
    }

    #[test]
    fn network_modes_outside_the_allow_list_are_refused_with_how_to_allow_them() {
        let cfg = DockerConfig::default();
        let spec = |mode: Option<&str>| DockerSpec {
            image: "x".into(),
            network_mode: mode.map(str::to_string),
            ..Default::default()
        };
        for ok in [None, Some("none"), Some("bridge"), Some("default")] {
            assert!(checked_mounts(&spec(ok), &cfg, "d1").is_ok(), "{ok:?}");
        }
        for bad in ["host", "container:abc123", "mynet"] {
            let e = checked_mounts(&spec(Some(bad)), &cfg, "d1").expect_err(bad);
            assert!(
                e.starts_with(&format!(
                    "spec.network_mode: network mode {bad:?} is not allowed on delegate d1 (allowed: none, bridge)"
                )),
                "{e}"
            );
            assert!(e.contains("allowed_network_modes"), "{e}");
        }
        let cfg = DockerConfig {
            allowed_network_modes: vec!["host".into(), "container".into()],
            ..Default::default()
        };
        assert!(checked_mounts(&spec(Some("host")), &cfg, "d1").is_ok());
        assert!(checked_mounts(&spec(Some("container:abc")), &cfg, "d1").is_ok());
        assert!(checked_mounts(&spec(Some("bridge")), &cfg, "d1").is_err());
    }

    #[test]
    fn only_plain_bind_volume_options_name_a_device() {
        let opts = |kv: &[(&str, &str)]| -> HashMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let bind = opts(&[("type", "none"), ("o", "bind"), ("device", "/etc")]);
        assert_eq!(bound_device(&bind), Some("/etc"));
        let nfs = opts(&[("type", "nfs"), ("o", "addr=1.2.3.4"), ("device", ":/x")]);
        assert_eq!(bound_device(&nfs), None);
        let extra = opts(&[
            ("type", "none"),
            ("o", "bind"),
            ("device", "/srv"),
            ("x", "y"),
        ]);
        assert_eq!(bound_device(&extra), None);
    }
}
