//! The `shell` executor under systemd: each task runs as its own `delegate-task@` unit.
//!
//! A task that is the agent's child shares its user, its cgroup and its fate: it can read
//! the agent's token (`/proc/$PPID/environ`, the config), rewrite other tasks' spool files,
//! use the Docker socket of a `docker`-group agent, and dies with the agent. As an instance
//! of the packaged template `delegate-task@.service` it runs as a user of its own
//! (`DynamicUser=yes`, named after the instance), in its own cgroup, sandboxed, and keeps
//! running when the agent restarts.
//!
//! The agent only names the instance (`<task>-<attempt>`); a polkit rule lets it start,
//! stop and reset only such units, so it can never start a unit with properties it chose.
//! The template names no file of the agent's: PID 1 opens such paths as root before the
//! sandbox applies, so any path user `delegate` can change would let it write or read as
//! root. The unit's runner fetches the spec and the task's output file (opened by the
//! agent) over the hand-off socket instead ([`crate::exec::handoff`]); the agent copies that file
//! into the task's log by byte offset. The exit status is the unit's `ExecMainStatus`,
//! kept by systemd (`RemainAfterExit=yes`, or the failed state) until the agent collects
//! it — also after an agent restart, which re-attaches to the unit and continues the copy
//! from `log length - output_base`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use delegate_host::systemd1::{ManagerProxy, ServiceProxy, UnitProxy, subscribe};
use delegate_protocol::ShellSpec;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};
use zbus::fdo::{PropertiesChangedStream, PropertiesProxy};
use zbus::proxy::CacheProperties;

use crate::exec::handoff::{self, Handoffs, UnitOfPid};
use crate::exec::output;
use crate::exec::{ExecContext, ExecOutcome};
use delegate_durable::Durability;

/// The template unit the package installs.
pub const TEMPLATE: &str = "delegate-task@.service";

/// The instance [`TaskUnits::detect`] stops to learn whether polkit lets the agent manage
/// its task units. Attempts count from 1, so no task ever has this name; it matches the
/// rule's pattern like every task's unit.
pub const PROBE_UNIT: &str = "delegate-task@t_permission_probe-0.service";

/// Exit status of a runner that could not fetch its task from the agent (EX_UNAVAILABLE);
/// its reason is in the unit's journal, as it had no output file yet.
pub const EXIT_NO_TASK: i32 = 69;

/// How often a running unit's output file is copied into the task's log (a file read,
/// no call to systemd).
const POLL: Duration = Duration::from_millis(50);

/// How often a unit's state is read when systemd has signalled no change: a safety net
/// only. Its state is read when systemd says it changed (`PropertiesChanged` on the unit's
/// object). Reading it every [`POLL`] instead cost PID 1 six calls per task every 50 ms,
/// thousands a second at 32 running tasks, on the CPU that also builds the next tasks'
/// sandboxes.
const RECHECK: Duration = Duration::from_secs(1);

/// Longest wait for systemd to stop a unit (its `TimeoutStopSec` is 10 s).
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// What `delegate task-run` reads from its credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunnerSpec {
    pub task_id: String,
    pub attempt: u32,
    pub argv: Vec<String>,
    pub script: String,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub memory_max: Option<u64>,
    pub cpu_weight: Option<u64>,
    pub tasks_max: Option<u64>,
}

/// The record of the task's unit.
pub const UNIT_RECORD: &str = "unit.json";

/// A task unit, as journalled in the spool, so a restarted agent re-attaches to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub unit: String,
    /// Log length when the unit's output began; output byte N is log byte base + N.
    pub output_base: u64,
}

/// The agent's handle on systemd for task units.
pub struct TaskUnits {
    conn: zbus::Connection,
    /// Built once, without a property cache (that would add match rules on every build).
    manager: ManagerProxy<'static>,
    /// Tasks waiting for their unit's runner.
    handoffs: Handoffs,
    /// Serves the hand-off socket while these units are in use.
    serving: tokio::task::JoinHandle<()>,
}

impl Drop for TaskUnits {
    fn drop(&mut self) {
        self.serving.abort();
    }
}

/// Tells the hand-off socket which unit a connecting process is the main process of.
struct Systemd {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

impl UnitOfPid for Systemd {
    async fn main_of(&self, pid: u32, candidates: Vec<String>) -> Option<String> {
        // PID 1 maps the process to its unit by its cgroup (a task cannot leave its
        // unit's subtree); the unit's main process must be this very pid, so a task's
        // other processes never qualify, and each unit's runner takes only its own task.
        let path = self.manager.get_unit_by_pid(pid).await.ok()?;
        let unit = candidates
            .into_iter()
            .find(|u| unit_path(u) == path.as_str())?;
        let main = ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .ok()?
            .main_pid()
            .await
            .ok()?;
        (main == pid).then_some(unit)
    }
}

impl std::fmt::Debug for TaskUnits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskUnits")
    }
}

impl TaskUnits {
    /// Task units, when systemd, the template, polkit's rule and the hand-off socket's
    /// directory are all there; otherwise why not.
    pub async fn detect() -> Result<TaskUnits, String> {
        if std::env::var_os("INVOCATION_ID").is_none() || !Path::new("/run/systemd/system").is_dir()
        {
            return Err("not running as a systemd service".into());
        }
        let conn = tokio::time::timeout(Duration::from_secs(5), zbus::Connection::system())
            .await
            .map_err(|_| "the system bus did not answer in 5 s".to_string())?
            .map_err(|e| format!("no system bus: {e}"))?;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|e| format!("cannot reach systemd: {e}"))?;
        if let Err(e) = manager.get_unit_file_state(TEMPLATE).await {
            return Err(format!("{TEMPLATE} is not installed ({e})"));
        }
        probe_permission(&manager).await?;
        // Job signals go only to subscribers.
        subscribe(&manager)
            .await
            .map_err(|e| format!("cannot subscribe to systemd's signals: {e}"))?;
        let socket = Path::new(handoff::SOCKET);
        if !socket.parent().is_some_and(Path::is_dir) {
            return Err(format!(
                "{} is missing: delegate.service must have RuntimeDirectory=delegate (the packaged unit does)",
                socket.parent().unwrap_or(socket).display()
            ));
        }
        let systemd = Arc::new(Systemd {
            conn: conn.clone(),
            manager: manager.clone(),
        });
        let (handoffs, serving) = Handoffs::listen(socket, systemd).map_err(|e| e.to_string())?;
        Ok(TaskUnits {
            conn,
            manager,
            handoffs,
            serving,
        })
    }

    async fn manager(&self) -> zbus::Result<ManagerProxy<'static>> {
        Ok(self.manager.clone())
    }

    /// The unit's state, or `None` once systemd has unloaded it (stopped and collected).
    async fn state(&self, unit: &str) -> zbus::Result<Option<UnitState>> {
        let m = self.manager().await?;
        let path = match m.get_unit(unit).await {
            Ok(p) => p,
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let s = ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await?;
        let mut state = UnitState {
            active: u.active_state().await?,
            sub: u.sub_state().await?,
            code: 0,
            status: 0,
            result: String::new(),
        };
        // The exit status means something only once the script has ended (or its start
        // failed, which is also "failed"): three calls fewer while it runs.
        if state.ended() {
            state.code = s.exec_main_code().await?;
            state.status = s.exec_main_status().await?;
            state.result = s.result().await?;
        }
        Ok(Some(state))
    }

    /// Changes of the unit's state as systemd signals them, subscribed before the unit is
    /// started so none is missed. A match rule on the bus daemon, no call to PID 1. Without
    /// it (the bus refused the rule) the state is polled every [`POLL`] as before.
    async fn watch(&self, unit: &str) -> Watch {
        let changes = async {
            PropertiesProxy::builder(&self.conn)
                .destination("org.freedesktop.systemd1")
                .path(unit_path(unit))
                .cache_properties(CacheProperties::No)
                .build()
                .await?
                .receive_properties_changed()
                .await
        }
        .await;
        match changes {
            Ok(s) => Watch { changes: Some(s) },
            Err(e) => {
                warn!("cannot watch {unit} for changes, polling it instead: {e}");
                Watch { changes: None }
            }
        }
    }

    /// Start the unit and wait for its start job: `Err` with systemd's reason when the
    /// unit could not get as far as exec'ing the runner.
    async fn start(&self, unit: &str) -> Result<(), String> {
        let bus = |e: zbus::Error| format!("cannot start {unit} through systemd: {e}");
        let m = self.manager().await.map_err(bus)?;
        let mut removed = m.receive_job_removed().await.map_err(bus)?;
        // A unit of the same name left failed by an earlier try would have its old status
        // read as this run's. (Asked only when loaded: each call is a polkit check.)
        if let Ok(Some(_)) = self.state(unit).await {
            let _ = m.reset_failed_unit(unit).await;
        }
        let job = m
            .start_unit(unit, "fail")
            .await
            .map_err(|e| match refusal(&e) {
                Some(why) => format!(
                    "systemd refused to start {unit} for the agent ({why}): is polkitd installed and /usr/share/polkit-1/rules.d/50-delegate-task.rules in place?"
                ),
                None => bus(e),
            })?;
        let result = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(sig) = removed.next().await {
                if let Ok(args) = sig.args()
                    && args.job().as_str() == job.as_str()
                {
                    return Some(args.result().to_string());
                }
            }
            None
        })
        .await;
        match result {
            Ok(Some(r)) if r == "done" => Ok(()),
            Ok(Some(r)) => {
                let why = match self.state(unit).await {
                    Ok(Some(s)) => s.start_failure(),
                    _ => String::new(),
                };
                Err(format!("systemd could not start {unit} (job {r}){why}"))
            }
            Ok(None) => Err(format!("the system bus closed while starting {unit}")),
            Err(_) => Err(format!("systemd did not start {unit} within 120 s")),
        }
    }

    /// Stop the unit (its whole cgroup) and forget its state; waits until systemd is done.
    async fn collect(&self, unit: &str, watch: &mut Watch) {
        let Ok(m) = self.manager().await else { return };
        // Each call is a polkit check, the dearest part of a task's overhead: a failed
        // unit's cgroup is empty already and needs only its state reset; a unit that
        // exited (RemainAfterExit) or still runs needs a stop, which kills leftovers.
        let mut stopped = false;
        let deadline = tokio::time::Instant::now() + STOP_LIMIT;
        while tokio::time::Instant::now() < deadline {
            match self.state(unit).await {
                Ok(None) => return,
                Ok(Some(s)) if s.active == "inactive" => return,
                Ok(Some(s)) if s.active == "failed" => {
                    if let Err(e) = m.reset_failed_unit(unit).await {
                        debug!("ResetFailedUnit({unit}): {e}");
                    }
                }
                Ok(Some(s)) if !stopped && s.active != "deactivating" => {
                    stopped = true;
                    if let Err(e) = m.stop_unit(unit, "replace").await {
                        debug!("StopUnit({unit}): {e}");
                    }
                    continue;
                }
                Ok(Some(_)) => {}
                Err(e) => {
                    debug!("state of {unit}: {e}");
                    return;
                }
            }
            watch.changed(RECHECK).await;
        }
        warn!("{unit} did not stop within {} s", STOP_LIMIT.as_secs());
    }

    async fn stop(&self, unit: &str) {
        match self.manager().await {
            Ok(m) => {
                if let Err(e) = m.stop_unit(unit, "replace").await {
                    warn!("cannot stop {unit}: {e}");
                }
            }
            Err(e) => warn!("cannot stop {unit}: {e}"),
        }
    }
}

/// A unit's `PropertiesChanged` signals (see [`TaskUnits::watch`]).
struct Watch {
    changes: Option<PropertiesChangedStream>,
}

impl Watch {
    /// Wait until systemd signals a change of the unit (`true`) or `limit` passes
    /// (`false`). Without signals, a change is assumed after [`POLL`].
    async fn changed(&mut self, limit: Duration) -> bool {
        let Some(changes) = self.changes.as_mut() else {
            tokio::time::sleep(POLL.min(limit)).await;
            return true;
        };
        match tokio::time::timeout(limit, changes.next()).await {
            Ok(Some(_)) => true,
            Ok(None) => {
                // The connection's stream ended: poll from now on.
                self.changes = None;
                true
            }
            Err(_) => false,
        }
    }
}

/// The object path systemd gives a unit: `/org/freedesktop/systemd1/unit/` and its name
/// with every byte other than `[A-Za-z0-9]` written `_xx` (sd-bus's path encoding).
fn unit_path(unit: &str) -> String {
    let mut path = String::from("/org/freedesktop/systemd1/unit/");
    for b in unit.bytes() {
        if b.is_ascii_alphanumeric() {
            path.push(b as char);
        } else {
            path.push_str(&format!("_{b:02x}"));
        }
    }
    path
}

#[derive(Debug, Clone)]
struct UnitState {
    active: String,
    sub: String,
    code: i32,
    status: i32,
    result: String,
}

/// `si_code` values systemd reports in `ExecMainCode`.
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

impl UnitState {
    /// The script has ended (systemd keeps its status until the unit is collected).
    fn ended(&self) -> bool {
        self.active == "failed"
            || self.active == "inactive"
            || (self.active == "active" && self.sub == "exited")
    }

    fn outcome(&self) -> ExecOutcome {
        if self.result == "oom-kill" {
            return ExecOutcome::OomKilled;
        }
        match self.code {
            CLD_EXITED => ExecOutcome::Exited(self.status),
            CLD_KILLED | CLD_DUMPED => ExecOutcome::Signaled(self.status),
            _ => ExecOutcome::Lost(format!(
                "the task unit ended without an exit status (result {})",
                self.result
            )),
        }
    }

    /// Why a start job failed, from the exit status systemd's own set-up left.
    fn start_failure(&self) -> String {
        let what = match self.status {
            200 => "cannot change to the working directory",
            203 => {
                "cannot execute the runner (is /var/lib/delegate-upgrader/current/delegate there?)"
            }
            216 => {
                "cannot set the unit's group (the Group= of delegate-task@.service does not exist?)"
            }
            217 => {
                "the task user does not exist (User= of delegate-task@.service; the package creates delegate-task)"
            }
            209 => "cannot open the output file",
            243 => "cannot load the spec credential",
            _ => "",
        };
        format!(
            ": result {}, exit status {}{}",
            self.result,
            self.status,
            if what.is_empty() {
                String::new()
            } else {
                format!(" — {what}")
            }
        )
    }
}

/// May this agent start and stop its task units? Only polkit knows, and it may say no: its
/// rule needs a polkitd that reads JavaScript rules (≥ 121; Debian 11 and Ubuntu 22.04 ship
/// policykit-1 0.105, which ignores them), and an operator may have removed the rule or
/// polkitd. Stopping [`PROBE_UNIT`], which never runs, goes through the same check as a
/// task's stop (action `manage-units`, the unit's name, verb `stop`) and changes nothing.
/// Learning it here keeps the agent on direct spawn with one warning at start, instead of
/// failing every shell task later.
async fn probe_permission(manager: &ManagerProxy<'static>) -> Result<(), String> {
    match manager.stop_unit(PROBE_UNIT, "replace").await {
        Ok(_) => Ok(()),
        Err(e) => Err(match refusal(&e) {
            Some(why) => format!(
                "systemd refused this user to manage {TEMPLATE} units ({why}): polkit must allow it, which needs polkitd 121 or later (JavaScript rules; Debian 11 and Ubuntu 22.04 have only policykit-1 0.105) and the packaged rule /usr/share/polkit-1/rules.d/50-delegate-task.rules; install them, then `systemctl restart delegate`"
            ),
            None => format!(
                "cannot learn from systemd whether this user may manage {TEMPLATE} units: {e}"
            ),
        }),
    }
}

/// systemd's message when polkit said no (or was not there to ask); zbus reports these
/// standard errors as [`zbus::fdo::Error`].
fn refusal(e: &zbus::Error) -> Option<String> {
    match e {
        zbus::Error::FDO(f) => match f.as_ref() {
            zbus::fdo::Error::AccessDenied(m)
            | zbus::fdo::Error::InteractiveAuthorizationRequired(m) => Some(m.clone()),
            _ => None,
        },
        zbus::Error::MethodError(name, msg, _)
            if name.as_str() == "org.freedesktop.DBus.Error.AccessDenied"
                || name.as_str()
                    == "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired" =>
        {
            Some(msg.clone().unwrap_or_else(|| name.to_string()))
        }
        _ => None,
    }
}

/// The unit of a task attempt, `delegate-task@<task>-<attempt>.service`. Its instance is
/// also the name of the user the task runs as (`DynamicUser=yes`, `User=%i`), so it must be
/// a valid user name (at most 31 characters) and name no user that exists: systemd would
/// run the task as that user. The `t_` prefix of the manager's task ids keeps it apart
/// from system users; polkit's rule allows only this shape.
pub fn unit_name(task_id: &str, attempt: u32) -> Result<String, String> {
    let instance = format!("{task_id}-{attempt}");
    let shaped = task_id.strip_prefix("t_").is_some_and(|rest| {
        (1..=24).contains(&rest.len())
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }) && (1..=9999).contains(&attempt);
    if !shaped {
        return Err(format!(
            "task id {task_id:?} (attempt {attempt}) cannot name a task unit: it must be t_ and 1 to 24 letters, digits or _ (as the manager makes them), the attempt 1 to 9999"
        ));
    }
    if let Ok(Some(_)) = nix::unistd::User::from_name(&instance) {
        return Err(format!(
            "a user named {instance} exists on this host: the task's unit would run as it; refusing"
        ));
    }
    Ok(format!("delegate-task@{instance}.service"))
}

/// The task's output file, created by the agent in its own directory, never through a
/// symlink; its runner gets it as an open file.
fn create_output(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
}

/// Run (or, when adopting, re-attach to) a shell task as a unit.
pub async fn run(spec: &ShellSpec, units: Arc<TaskUnits>, mut ctx: ExecContext) -> ExecOutcome {
    let output = ctx.dir.join("output");
    let record = if ctx.adopt {
        match ctx.journal.get::<UnitRecord>(UNIT_RECORD) {
            Some(r) => r,
            None => {
                return ExecOutcome::Lost(
                    "the delegate restarted before the task's unit was journalled".into(),
                );
            }
        }
    } else {
        let unit = match unit_name(&ctx.task_id, ctx.attempt) {
            Ok(u) => u,
            Err(why) => return ExecOutcome::CouldNotStart(why),
        };
        let runner = RunnerSpec {
            task_id: ctx.task_id.clone(),
            attempt: ctx.attempt,
            argv: spec.interpreter_argv(),
            script: spec.script.clone(),
            env: spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            working_dir: spec.working_dir.clone(),
            memory_max: spec.memory_max,
            cpu_weight: spec.cpu_weight,
            tasks_max: spec.tasks_max,
        };
        let json = match serde_json::to_vec(&runner) {
            Ok(j) => j,
            Err(e) => return ExecOutcome::CouldNotStart(format!("cannot encode the task: {e}")),
        };
        let file = match create_output(&output) {
            Ok(f) => f,
            Err(e) => {
                return ExecOutcome::CouldNotStart(format!(
                    "cannot create {}: {e}",
                    output.display()
                ));
            }
        };
        let record = UnitRecord {
            unit: unit.clone(),
            output_base: ctx.log.written(),
        };
        // Journalled before the start: a restart in between finds the unit or knows it
        // never ran.
        if let Err(e) = ctx
            .journal
            .put(UNIT_RECORD, &record, Durability::ProcessCrash)
        {
            // A restarted agent then reports the task lost instead of re-attaching.
            warn!("cannot journal the task's unit: {e}");
        }
        units.handoffs.offer(&unit, json, file);
        record
    };
    let unit = record.unit.clone();
    let mut watch = units.watch(&unit).await;
    if !ctx.adopt
        && let Err(why) = units.start(&unit).await
    {
        units.collect(&unit, &mut watch).await;
        units.handoffs.withdraw(&unit);
        let mut copied = 0;
        output::copy_rest(&output, &mut copied, ctx.log.as_mut()).await;
        return ExecOutcome::CouldNotStart(why);
    }
    let mut copied = ctx.log.written().saturating_sub(record.output_base);
    let mut stopping = false;
    // The state is read at first, when systemd signals a change, and every RECHECK; the
    // output is copied every POLL.
    let mut look = true;
    let mut looked = tokio::time::Instant::now();
    let last = loop {
        output::copy_new(&output, &mut copied, ctx.log.as_mut()).await;
        if look || looked.elapsed() >= RECHECK {
            look = false;
            looked = tokio::time::Instant::now();
            match units.state(&unit).await {
                Ok(None) => break None,
                Ok(Some(s)) if s.ended() => break Some(s),
                Ok(Some(_)) => {}
                Err(e) => {
                    warn!("cannot read the state of {unit}: {e}");
                    look = true;
                }
            }
        }
        tokio::select! {
            _ = ctx.stop.cancelled(), if !stopping => {
                stopping = true;
                units.stop(&unit).await;
            }
            changed = watch.changed(POLL) => look |= changed,
        }
    };
    // Whatever the script left behind goes with its unit; then the rest of its output.
    units.collect(&unit, &mut watch).await;
    output::copy_rest(&output, &mut copied, ctx.log.as_mut()).await;
    let never_fetched = units.handoffs.withdraw(&unit);
    match last {
        Some(s) if never_fetched && !stopping => ExecOutcome::CouldNotStart(format!(
            "the task's runner never fetched the task from the agent (exit status {}); `journalctl -u {unit}` says why",
            s.status
        )),
        Some(s) => s.outcome(),
        None if stopping => ExecOutcome::Signaled(15),
        None => ExecOutcome::Lost(format!(
            "the task's unit {unit} is gone and systemd no longer knows how it ended"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polkits_no_is_told_apart_from_other_bus_errors() {
        let no = zbus::Error::FDO(Box::new(
            zbus::fdo::Error::InteractiveAuthorizationRequired("auth needed".into()),
        ));
        assert_eq!(refusal(&no).as_deref(), Some("auth needed"));
        let denied = zbus::Error::FDO(Box::new(zbus::fdo::Error::AccessDenied("no".into())));
        assert_eq!(refusal(&denied).as_deref(), Some("no"));
        assert_eq!(refusal(&zbus::Error::Failure("bus gone".into())), None);
    }

    fn state(active: &str, sub: &str, code: i32, status: i32, result: &str) -> UnitState {
        UnitState {
            active: active.into(),
            sub: sub.into(),
            code,
            status,
            result: result.into(),
        }
    }

    #[test]
    fn systemd_status_becomes_the_tasks_outcome() {
        let exited = state("failed", "failed", CLD_EXITED, 3, "exit-code");
        assert!(exited.ended());
        assert_eq!(exited.outcome(), ExecOutcome::Exited(3));
        let ok = state("active", "exited", CLD_EXITED, 0, "success");
        assert!(ok.ended());
        assert_eq!(ok.outcome(), ExecOutcome::Exited(0));
        assert!(!state("active", "running", 0, 0, "success").ended());
        assert_eq!(
            state("failed", "failed", CLD_KILLED, 9, "signal").outcome(),
            ExecOutcome::Signaled(9)
        );
        assert_eq!(
            state("failed", "failed", CLD_KILLED, 9, "oom-kill").outcome(),
            ExecOutcome::OomKilled
        );
    }

    #[test]
    fn a_unit_that_could_not_start_says_why() {
        let s = state("failed", "failed", CLD_EXITED, 217, "exit-code");
        let why = s.start_failure();
        assert!(why.contains("exit status 217"), "{why}");
        assert!(why.contains("the task user does not exist"), "{why}");
    }

    #[test]
    fn a_units_object_path_is_its_name_encoded_as_sd_bus_does() {
        // As `busctl` lists it for the unit in a booted systemd 252.
        assert_eq!(
            unit_path("delegate-task@t_ab-1.2.service"),
            "/org/freedesktop/systemd1/unit/delegate_2dtask_40t_5fab_2d1_2e2_2eservice"
        );
    }

    #[test]
    fn a_units_instance_is_a_user_name_that_names_no_existing_user() {
        assert_eq!(
            unit_name("t_0123456789abcdef0123", 2).as_deref(),
            Ok("delegate-task@t_0123456789abcdef0123-2.service")
        );
        // Longest allowed: 31 characters, what systemd takes as a user name.
        let long = format!("t_{}", "a".repeat(24));
        let unit = unit_name(&long, 9999).expect("fits");
        assert_eq!(unit.len() - "delegate-task@.service".len(), 31);
        for (id, attempt) in [
            ("t_", 1),
            ("x_ab", 1),
            ("t_a.b", 1),
            ("t_a-b", 1),
            ("t_a/../b", 1),
            (&format!("t_{}", "a".repeat(25)), 1),
            ("t_ab", 0),
            ("t_ab", 10_000),
        ] {
            let e = unit_name(id, attempt).expect_err(id);
            assert!(e.contains("cannot name a task unit"), "{e}");
        }
    }
}
