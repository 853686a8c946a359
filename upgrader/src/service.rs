//! Restarting the agent's service, behind a small trait.
//!
//! Production goes through systemd's D-Bus API (`RestartUnit`, then wait for the job's
//! `JobRemoved` signal; `NRestarts` tells whether the unit restarted by itself during the
//! health gate). Tests have no systemd, so [`Supervisor`] drives a tiny process supervisor
//! (`delegate-upgrader supervise`) that plays the same role with a pid and a restart count.
//! The real systemd path is exercised by the packaging end-to-end test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use delegate_host::systemd1::{ManagerProxy, ServiceProxy, subscribe};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::error::UpgradeError;

/// Which incarnation of the service is running: a different value after the health gate
/// started means the unit restarted (crashed) on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instance {
    pub pid: u32,
    pub restarts: u32,
}

#[allow(async_fn_in_trait)]
pub trait ServiceManager {
    /// Restart the service and return once the restart job is finished.
    async fn restart(&self) -> Result<(), UpgradeError>;
    /// The current incarnation.
    async fn instance(&self) -> Result<Instance, UpgradeError>;
    /// For logs.
    fn describe(&self) -> String;
}

// --- systemd ---------------------------------------------------------------------------

pub struct Systemd {
    conn: zbus::Connection,
    unit: String,
}

fn bus(e: zbus::Error) -> UpgradeError {
    UpgradeError::Bus {
        what: "talking to systemd failed".into(),
        source: Some(e),
    }
}

/// systemd jobs of a unit with a long drain can take long; bounded all the same.
const RESTART_JOB_LIMIT: Duration = Duration::from_secs(30 * 60);

impl Systemd {
    pub async fn connect(unit: &str) -> Result<Systemd, UpgradeError> {
        let conn = zbus::Connection::system().await.map_err(bus)?;
        Ok(Systemd {
            conn,
            unit: unit.to_string(),
        })
    }
}

impl ServiceManager for Systemd {
    async fn restart(&self) -> Result<(), UpgradeError> {
        let failed = |reason: String, source: Option<zbus::Error>| UpgradeError::Restart {
            unit: self.unit.clone(),
            reason,
            source,
        };
        let m = ManagerProxy::new(&self.conn).await.map_err(bus)?;
        // Signals are only broadcast to subscribers; subscribe before starting the job. A
        // second restart on this connection (the rollback's) is subscribed already.
        subscribe(&m).await.map_err(bus)?;
        let mut removed = m.receive_job_removed().await.map_err(bus)?;
        // Clear the unit's start rate limit first: a release that crash-loops plus the
        // upgrader's own restarts (the swap, then the rollback) can exceed the default
        // 5 starts in 10 s, and systemd would then refuse to start the version we roll
        // back to ("start-limit-hit"), leaving the host without an agent.
        if let Err(e) = m.reset_failed_unit(&self.unit).await {
            tracing::debug!("ResetFailedUnit({}) before the restart: {e}", self.unit);
        }
        let job = m
            .restart_unit(&self.unit, "replace")
            .await
            .map_err(|e| failed("RestartUnit was refused".into(), Some(e)))?;
        let wait = async {
            while let Some(sig) = removed.next().await {
                let Ok(args) = sig.args() else { continue };
                if args.job().as_str() == job.as_str() {
                    return Some(args.result().to_string());
                }
            }
            None
        };
        match tokio::time::timeout(RESTART_JOB_LIMIT, wait).await {
            Ok(Some(r)) if r == "done" => Ok(()),
            // The old process was stopped and the new one started, but the unit did not
            // come up (it exited before READY=1, or its start timed out): that is the new
            // version's health, which the health gate judges and rolls back — not a
            // restart to retry later while `current` points at a version that cannot run.
            Ok(Some(r)) if matches!(r.as_str(), "failed" | "timeout" | "dependency") => {
                tracing::warn!(
                    "restart job of {} finished with {r:?}: the unit did not come up",
                    self.unit
                );
                Ok(())
            }
            Ok(Some(r)) => Err(failed(format!("restart job finished with {r:?}"), None)),
            Ok(None) => Err(failed(
                "lost the bus while waiting for the job".into(),
                None,
            )),
            Err(_) => Err(failed(
                format!("job not finished within {RESTART_JOB_LIMIT:?}"),
                None,
            )),
        }
    }

    async fn instance(&self) -> Result<Instance, UpgradeError> {
        let m = ManagerProxy::new(&self.conn).await.map_err(bus)?;
        let path = m.load_unit(&self.unit).await.map_err(bus)?;
        let s = ServiceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(bus)?;
        Ok(Instance {
            pid: s.main_pid().await.map_err(bus)?,
            restarts: s.n_restarts().await.map_err(bus)?,
        })
    }

    fn describe(&self) -> String {
        format!("systemd unit {}", self.unit)
    }
}

// --- test supervisor -------------------------------------------------------------------

/// What `delegate-upgrader supervise` publishes in its state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorState {
    pub supervisor_pid: u32,
    pub child_pid: u32,
    /// Bumped at every (re)start of the child.
    pub generation: u64,
    /// Restarts after the child exited by itself (systemd's `NRestarts`).
    pub restarts: u32,
    /// SIGHUP restarts done so far: a requester waits for this to grow. (`generation`
    /// also grows when a crashed child is restarted, which must not be mistaken for the
    /// restart asked for: the health gate would then watch the old child being replaced.)
    #[serde(default)]
    pub requested: u64,
}

impl SupervisorState {
    pub fn read(path: &Path) -> Result<SupervisorState, UpgradeError> {
        let bytes = std::fs::read(path).map_err(crate::error::io(path))?;
        serde_json::from_slice(&bytes).map_err(|source| UpgradeError::State {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Client of a `supervise` process: SIGHUP asks it to restart the child.
pub struct Supervisor {
    pub state_file: PathBuf,
}

impl ServiceManager for Supervisor {
    async fn restart(&self) -> Result<(), UpgradeError> {
        let failed = |reason: String| UpgradeError::Restart {
            unit: self.describe(),
            reason,
            source: None,
        };
        let before = SupervisorState::read(&self.state_file)?;
        let pid = i32::try_from(before.supervisor_pid).map_err(|e| failed(e.to_string()))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|e| failed(format!("supervisor {pid}: {e}")))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(now) = SupervisorState::read(&self.state_file)
                && now.requested > before.requested
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(failed(
                    "the supervisor did not restart the agent within 120s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn instance(&self) -> Result<Instance, UpgradeError> {
        let s = SupervisorState::read(&self.state_file)?;
        Ok(Instance {
            pid: s.child_pid,
            restarts: s.restarts,
        })
    }

    fn describe(&self) -> String {
        format!("supervisor {}", self.state_file.display())
    }
}

/// The supervisor itself (`delegate-upgrader supervise --state F -- CMD...`): keep `CMD`
/// running like `Restart=always` would, restart it on SIGHUP, stop it on SIGTERM/SIGINT.
/// Test seam only; production uses systemd.
pub async fn supervise(state_file: &Path, cmd: &[String]) -> Result<(), UpgradeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let (program, args) = cmd.split_first().ok_or_else(|| UpgradeError::Config {
        path: state_file.to_path_buf(),
        line: None,
        message: "supervise: no command given".into(),
    })?;
    let sig = |k| signal(k).map_err(crate::error::io(state_file));
    let mut hup = sig(SignalKind::hangup())?;
    let mut term = sig(SignalKind::terminate())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut st = SupervisorState {
        supervisor_pid: std::process::id(),
        ..SupervisorState::default()
    };
    // A SIGHUP was received and the next spawn is the restart it asked for.
    let mut requested = false;
    loop {
        // The binary may have just been written (by a test, or an unpack): retry while
        // it is busy (see crate::spawn).
        let mut child = crate::spawn::retry_busy(|| {
            tokio::process::Command::new(program)
                .args(args)
                .kill_on_drop(true)
                .spawn()
        })
        .await
        .map_err(crate::error::io(program))?;
        st.child_pid = child.id().unwrap_or(0);
        st.generation += 1;
        if std::mem::take(&mut requested) {
            st.requested += 1;
        }
        let bytes = serde_json::to_vec(&st).unwrap_or_default();
        crate::state::write_atomic(state_file, &bytes)?;
        tokio::select! {
            _ = hup.recv() => {
                stop(&mut child).await;
                requested = true;
            }
            _ = term.recv() => {
                stop(&mut child).await;
                return Ok(());
            }
            _ = int.recv() => {
                stop(&mut child).await;
                return Ok(());
            }
            _ = child.wait() => {
                st.restarts += 1;
                // Like `RestartSec=`; a restart asked for meanwhile is this same restart,
                // not a second one (which would look like a crash to the health gate).
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = hup.recv() => requested = true,
                    _ = term.recv() => return Ok(()),
                    _ = int.recv() => return Ok(()),
                }
            }
        }
    }
}

/// SIGTERM (the agent drains), then SIGKILL after 60 s.
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
