//! `delegate-upgrader run`: the seven steps of the upgrade flow in `docs/design.md`, one
//! function per step, plus `check` (steps 2 and the decision, changing nothing), `install`
//! (an offline archive through steps 3–7), `rollback` and `status`.
//!
//! Each step logs one line with `UPGRADE_FROM`, `UPGRADE_TO` and `UPGRADE_STEP` fields.
//! The state file records what is under way from the drain until the health gate passed,
//! so a run killed at any point is finished or undone by the next one ([`Upgrader::recover`]);
//! every change to it goes through [`advance`]. The outside world is behind three seams
//! ([`ServiceManager`], [`AgentBus`], [`Transport`]), so the steps are unit-tested against
//! fakes (`upgrade/tests.rs`) as well as end to end with real processes.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delegate_protocol::DelegateState;
use delegate_protocol::release::{
    Decision, Local, MAX_MANIFEST_BYTES, Manifest, ManifestError, Version, decide_version,
    parse_artifact_trusted_comment,
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::agent_bus::{AgentBus, DrainResult, Health, SystemBus};
use crate::config::Config;
use crate::error::{UpgradeError, chain, io};
use crate::fault;
use crate::fetch::{Fetcher, Transport};
use crate::layout::{Layout, Reuse, check_version};
use crate::lock::Lock;
use crate::service::{Instance, ServiceManager};
use crate::state::{Change, Check, Event, Phase, Rollback, Seen, State};
use crate::trust::TrustedKeys;

/// Largest signature file read.
const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;
/// Largest archive `install` reads (into memory, once).
const MAX_ARCHIVE_BYTES: u64 = 512 * 1024 * 1024;

/// Read at most `limit` bytes of `path` with one open; more is an error.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, UpgradeError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > limit {
        return Err(UpgradeError::ArchiveTooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(bytes)
}

/// What a run did (or, for `check`, would do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Disabled,
    UpToDate(String),
    /// The channel offers only a version that failed its health gate here. Not an error:
    /// the rollback already failed loudly once, and a timer unit failing every hour after
    /// it would only train operators to ignore it.
    Skipped(String),
    NotPinned {
        pinned: String,
        offered: String,
    },
    WouldInstall {
        from: Option<String>,
        to: String,
    },
    Installed {
        from: Option<String>,
        to: String,
    },
    RolledBack {
        from: String,
        to: String,
    },
}

impl Outcome {
    pub fn code(&self) -> &'static str {
        match self {
            Outcome::Disabled => "disabled",
            Outcome::UpToDate(_) => "up-to-date",
            Outcome::Skipped(_) => "skipped",
            Outcome::NotPinned { .. } => "not-pinned",
            Outcome::WouldInstall { .. } => "would-install",
            Outcome::Installed { .. } => "installed",
            Outcome::RolledBack { .. } => "rolled-back",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
        match self {
            Outcome::Disabled => write!(f, "upgrades are disabled (enabled = false)"),
            Outcome::UpToDate(v) => write!(f, "up to date ({v})"),
            Outcome::Skipped(v) => write!(
                f,
                "the channel offers {v}, which is on the local skip list (it failed its health gate): nothing to do until a newer release; `delegate-upgrader unskip {v}` allows it again"
            ),
            Outcome::NotPinned { pinned, offered } => {
                write!(
                    f,
                    "pinned to {pinned}; the channel offers {offered}: nothing to do"
                )
            }
            Outcome::WouldInstall { from: a, to } => {
                write!(f, "would upgrade {} → {to}", from(a))
            }
            Outcome::Installed { from: a, to } => write!(f, "upgraded {} → {to}", from(a)),
            Outcome::RolledBack { from, to } => write!(f, "rolled back {from} → {to}"),
        }
    }
}

/// A release that passed step 2: where to get it and what it must be.
#[derive(Debug, Clone)]
struct Release {
    version: Version,
    url: String,
    size: u64,
    sha256: String,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One journald line per step, with the fields operators filter on.
fn step(n: u8, from: &Option<String>, to: &str, msg: &str) {
    let from = from.as_deref().unwrap_or("");
    info!(
        upgrade_step = n,
        upgrade_from = from,
        upgrade_to = to,
        "step {n}: {msg}"
    );
}

/// Why the health gate failed. The caller matches it (roll back); its text is what the
/// journal, the error and the state file's rollback reason say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateFailure {
    /// The service manager could not say which process runs.
    Service(String),
    /// The unit restarted on its own while the gate watched it (a crash loop).
    RestartedByItself { first: Instance, now: Instance },
    /// Not healthy within `limit`; `last` is what the agent said last, `None` when it
    /// never appeared on the bus.
    TimedOut {
        limit: Duration,
        last: Option<Health>,
    },
}

impl std::fmt::Display for GateFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GateFailure::Service(e) => f.write_str(e),
            GateFailure::RestartedByItself { first, now } => write!(
                f,
                "the service restarted by itself (pid {} → {}, restarts {} → {})",
                first.pid, now.pid, first.restarts, now.restarts
            ),
            GateFailure::TimedOut { limit, last: None } => write!(
                f,
                "not healthy within {limit:?}: the agent never appeared on the bus"
            ),
            GateFailure::TimedOut {
                limit,
                last: Some(h),
            } => write!(
                f,
                "not healthy within {limit:?}: agent reports version {}, state {}, connected {}",
                h.version, h.state, h.connected
            ),
        }
    }
}

/// The upgrade steps over a service manager `S`, the agent's bus `B` and a release
/// transport `T`: in production systemd (or the test supervisor), [`SystemBus`] and
/// [`Fetcher`]; in unit tests, fakes.
pub struct Upgrader<S, B = SystemBus, T = Fetcher> {
    pub cfg: Config,
    pub layout: Layout,
    pub service: S,
    bus: B,
    transport: T,
}

impl<S: ServiceManager> Upgrader<S> {
    /// The real agent bus and release transport.
    pub fn new(cfg: Config, service: S) -> Result<Upgrader<S>, UpgradeError> {
        let transport = Fetcher::new()?;
        Ok(Upgrader::with(cfg, service, SystemBus::new(), transport))
    }
}

impl<S: ServiceManager, B: AgentBus, T: Transport> Upgrader<S, B, T> {
    pub fn with(cfg: Config, service: S, bus: B, transport: T) -> Upgrader<S, B, T> {
        Upgrader {
            layout: Layout::new(&cfg.root),
            cfg,
            service,
            bus,
            transport,
        }
    }

    /// How long a second upgrader waits for the first.
    fn lock_limit(&self) -> Duration {
        self.cfg.drain_timeout + self.cfg.health_timeout + Duration::from_secs(300)
    }

    fn lock(&self) -> Result<Lock, UpgradeError> {
        Lock::acquire(&self.cfg.root, self.lock_limit())
    }

    /// `run`: the timer's job. The outcome (or error code) is recorded as the last check.
    pub async fn run(&self) -> Result<Outcome, UpgradeError> {
        // Step 1: lock (one upgrader at a time); the config was read by the caller.
        let _lock = self.lock()?;
        let mut state = State::load(&self.cfg.root)?;
        let result = self.run_locked(&mut state).await;
        self.advance(&mut state, checked(&result))?;
        result
    }

    async fn run_locked(&self, state: &mut State) -> Result<Outcome, UpgradeError> {
        let from = self.layout.current();
        step(1, &from, "", &format!("locked {}", self.cfg.root.display()));
        if let Some(o) = self.recover(state).await? {
            return Ok(o);
        }
        if !self.cfg.enabled {
            step(
                1,
                &from,
                "",
                "upgrades are disabled in the config: nothing to do",
            );
            return Ok(Outcome::Disabled);
        }
        fault::point("after-step-1");

        let release = match self.step2_manifest(state, &from, true).await? {
            Ok(r) => r,
            Err(done) => {
                self.step7_prune(&from, &from.clone().unwrap_or_default())?;
                return Ok(done);
            }
        };
        fault::point("after-step-2");
        let to = release.version.to_string();
        self.step3_download(&release, &from).await?;
        fault::point("after-step-3");
        self.deploy(state, from, to).await
    }

    /// Steps 4–7 for a version whose directory is complete.
    async fn deploy(
        &self,
        state: &mut State,
        from: Option<String>,
        to: String,
    ) -> Result<Outcome, UpgradeError> {
        self.advance(
            state,
            Event::Drain {
                from: from.clone(),
                to: to.clone(),
                previous_before: self.layout.previous(),
            },
        )?;
        self.step4_drain(&from, &to).await?;
        fault::point("after-step-4");
        self.step5_swap_restart(state, &from, &to).await?;
        fault::point("after-step-5");
        self.step6_health_gate(state, &from, &to).await?;
        fault::point("after-step-6");
        self.step7_prune(&from, &to)?;
        fault::point("after-step-7");
        Ok(Outcome::Installed { from, to })
    }

    /// See [`advance`].
    fn advance(&self, state: &mut State, change: impl Into<Change>) -> Result<(), UpgradeError> {
        advance(&self.cfg.root, state, change)
    }

    /// A run killed (or failed) with an upgrade under way left its phase in the state
    /// file: finish that phase. Drained: resume the agent and let this run start over.
    /// Swapped: make sure the new version runs and passes the gate. Rolling back: set the
    /// links back again, restart, check the old version.
    async fn recover(&self, state: &mut State) -> Result<Option<Outcome>, UpgradeError> {
        let Some(p) = state.in_progress.clone() else {
            return Ok(None);
        };
        warn!(
            upgrade_from = p.from.as_deref().unwrap_or(""),
            upgrade_to = %p.to,
            "a previous run was interrupted in phase {:?}; recovering",
            p.phase
        );
        match p.phase {
            Phase::Drained => {
                // Not swapped: the old version still runs, maybe drained.
                if let Ok(true) = self.bus.resume().await {
                    info!("resumed the agent left drained by the interrupted run");
                }
                self.advance(state, Event::Abandon)?;
                Ok(None)
            }
            Phase::Swapped => {
                self.set_links(&p.from, &p.to)?;
                if self.running_version().await.as_deref() != Some(p.to.as_str()) {
                    step(5, &p.from, &p.to, "restarting onto the swapped version");
                    self.service.restart().await?;
                }
                self.step6_health_gate(state, &p.from, &p.to).await?;
                self.step7_prune(&p.from, &p.to)?;
                Ok(Some(Outcome::Installed {
                    from: p.from,
                    to: p.to,
                }))
            }
            Phase::RollingBack(r) => {
                self.roll_back(state, &r, true).await?;
                self.step7_prune(&Some(r.abandoned.clone()), &r.back_to)?;
                if r.manual {
                    return Ok(Some(Outcome::RolledBack {
                        from: r.abandoned,
                        to: r.back_to,
                    }));
                }
                Err(UpgradeError::Unhealthy {
                    version: r.abandoned,
                    previous: r.back_to,
                    reason: r.reason,
                })
            }
        }
    }

    /// The version the agent reports on the bus, if it is there.
    async fn running_version(&self) -> Option<String> {
        self.bus.health().await.map(|h| h.version)
    }

    /// `previous → from` (when there is one), then `current → to`; each link is one
    /// `rename(2)`, and setting them again is harmless.
    fn set_links(&self, from: &Option<String>, to: &str) -> Result<(), UpgradeError> {
        if let Some(f) = from {
            self.layout.set_link("previous", Some(f))?;
        }
        self.layout.set_link("current", Some(to))
    }

    /// Go back as `r` says: skip the abandoned version, `current → back_to`,
    /// `previous → r.previous`, restart unless `back_to` already runs (`recovering`), and
    /// check `back_to` is healthy. The phase stays `RollingBack` until all of it is done,
    /// so a run that fails or is killed half-way is finished by the next one.
    async fn roll_back(
        &self,
        state: &mut State,
        r: &Rollback,
        recovering: bool,
    ) -> Result<(), UpgradeError> {
        let from = Some(r.abandoned.clone());
        // Already on the list since the rollback was recorded, unless an operator
        // unskipped it meanwhile: a version rolled back from stays skipped.
        self.advance(state, Change::Skip(r.abandoned.clone()))?;
        self.layout.set_link("current", Some(&r.back_to))?;
        self.layout.set_link("previous", r.previous.as_deref())?;
        fault::point("rollback-after-links");
        let already = recovering
            && self.running_version().await.as_deref() == Some(r.back_to.as_str())
            && self.healthy(&r.back_to).await.is_ok();
        if !already {
            let restarted = if fault::armed("rollback-restart-fails") {
                Err(UpgradeError::Restart {
                    unit: self.service.describe(),
                    reason: format!("fault injected ({})", fault::ENV),
                    source: None,
                })
            } else {
                self.service.restart().await
            };
            restarted.map_err(|source| UpgradeError::RollbackRestart {
                back_to: r.back_to.clone(),
                source: Box::new(source),
            })?;
            step(
                5,
                &from,
                &r.back_to,
                &format!("current → {}; restarted", r.back_to),
            );
            self.healthy(&r.back_to)
                .await
                .map_err(|failure| UpgradeError::RollbackFailed {
                    previous: r.back_to.clone(),
                    reason: failure.to_string(),
                })?;
        }
        step(
            6,
            &from,
            &r.back_to,
            &format!(
                "{} runs again and is healthy; {} is on the skip list",
                r.back_to, r.abandoned
            ),
        );
        self.advance(state, Event::RolledBack)
    }

    /// Step 2: fetch the manifest and its signature, verify, apply every policy check.
    /// `Ok(Err(outcome))`: valid, but nothing to install.
    async fn step2_manifest(
        &self,
        state: &mut State,
        from: &Option<String>,
        persist: bool,
    ) -> Result<Result<Release, Outcome>, UpgradeError> {
        let keys = TrustedKeys::load(&self.cfg.keys_dir)?;
        let url = self.cfg.manifest_url();
        let bytes = self.transport.get_small(&url, MAX_MANIFEST_BYTES).await?;
        let sig_url = format!("{url}.minisig");
        let sig = self
            .transport
            .get_small(&sig_url, MAX_SIGNATURE_BYTES)
            .await?;
        let sig = String::from_utf8_lossy(&sig);
        keys.verify(&url, &bytes, &sig)?;
        let bad = |source| UpgradeError::Manifest {
            url: url.clone(),
            source,
        };
        let manifest = Manifest::parse(&bytes).map_err(bad)?;
        let current = from.as_deref().and_then(|v| v.parse::<Version>().ok());
        let last = state
            .last_seen
            .get(&self.cfg.channel)
            .map(|s| s.published_at);
        // A copy: the watermark below changes `state` while the decision still reads it.
        let skip = state.skip.clone();
        let local = Local {
            channel: &self.cfg.channel,
            now: now(),
            last_seen_published_at: last,
            current: current.as_ref(),
            pinned: self.cfg.pinned_version.as_ref(),
            skip: &skip,
        };
        manifest.check_fresh(&local).map_err(bad)?;
        if persist && last.is_none_or(|l| manifest.published_at > l) {
            self.advance(
                state,
                Change::Seen {
                    channel: self.cfg.channel.clone(),
                    seen: Seen {
                        version: manifest.version.clone(),
                        published_at: manifest.published_at,
                    },
                },
            )?;
        }
        let decision = match manifest.decide(&local) {
            Err(ManifestError::Skipped(v)) => return Ok(Err(Outcome::Skipped(v))),
            d => d.map_err(bad)?,
        };
        let to = manifest.version.clone();
        step(
            2,
            from,
            &to,
            &format!("manifest {url} verified with {} trusted key(s)", keys.len()),
        );
        let version = match decision {
            Decision::Install(v) => v,
            Decision::UpToDate(v) => return Ok(Err(Outcome::UpToDate(v.to_string()))),
            Decision::NotPinned { pinned, offered } => {
                return Ok(Err(Outcome::NotPinned {
                    pinned: pinned.to_string(),
                    offered: offered.to_string(),
                }));
            }
        };
        let artifact = manifest.artifact(&self.cfg.target).map_err(bad)?;
        Ok(Ok(Release {
            version,
            url: self.cfg.artifact_url(&artifact.path),
            size: artifact.size,
            sha256: artifact.sha256.clone(),
        }))
    }

    /// Step 3: download, check disk, size and SHA-256, unpack, run `version`, mark complete.
    async fn step3_download(&self, r: &Release, from: &Option<String>) -> Result<(), UpgradeError> {
        let to = r.version.to_string();
        if self.reusable(&to, &r.sha256, from)? {
            return Ok(());
        }
        self.check_disk(&to, r.size)?;
        let bytes = self.transport.download(&r.url, r.size, &r.sha256).await?;
        self.unpack(&to, &r.url, &bytes).await?;
        step(
            3,
            from,
            &to,
            &format!(
                "downloaded {} ({} bytes, sha256 ok), unpacked and checked",
                r.url, r.size
            ),
        );
        Ok(())
    }

    /// A complete `versions/<to>` is reused only when it provably holds the release whose
    /// archive digest is `archive_sha256` (see [`Layout::verified_complete`]); otherwise it
    /// is unpacked again from verified bytes.
    fn reusable(
        &self,
        to: &str,
        archive_sha256: &str,
        from: &Option<String>,
    ) -> Result<bool, UpgradeError> {
        match self.layout.verified_complete(to, archive_sha256)? {
            Reuse::Verified => {
                step(
                    3,
                    from,
                    to,
                    "version directory already complete and its SHA-256 matches: reusing it",
                );
                Ok(true)
            }
            Reuse::Absent => Ok(false),
            Reuse::Mismatch(why) => {
                warn!(
                    upgrade_step = 3,
                    upgrade_to = to,
                    "step 3: {} is not reused: {why}; unpacking the signed release again",
                    self.layout.version_dir(to).display()
                );
                Ok(false)
            }
        }
    }

    fn check_disk(&self, to: &str, size: u64) -> Result<(), UpgradeError> {
        // The archive, the unpacked binary (gzip rarely shrinks a binary more than 4×)
        // and the reserve that must stay free.
        let needed = size
            .saturating_mul(5)
            .saturating_add(self.cfg.min_free_bytes);
        let available = self.layout.free_bytes()?;
        if available < needed {
            return Err(UpgradeError::NotEnoughDisk {
                path: self.layout.versions(),
                version: to.to_string(),
                needed,
                available,
            });
        }
        Ok(())
    }

    /// Unpack the verified archive `bytes` (named `name` in errors), run the new binary's
    /// `version`, and only then make it `versions/<to>`.
    async fn unpack(&self, to: &str, name: &str, bytes: &[u8]) -> Result<(), UpgradeError> {
        let partial = self.layout.unpack(to, name, bytes)?;
        check_version(&partial.binary(), to, &self.cfg.version_check_user).await?;
        partial.commit()?;
        Ok(())
    }

    /// Step 4: ask the agent to drain and wait (bounded) until it is drained. Every
    /// result goes on to the swap (the restart's SIGTERM drains what is left); which one
    /// it was is logged and returned.
    async fn step4_drain(
        &self,
        from: &Option<String>,
        to: &str,
    ) -> Result<DrainResult, UpgradeError> {
        let drained = self
            .bus
            .drain(self.cfg.drain_timeout, self.cfg.upgrade_mode)
            .await?;
        let msg = match drained {
            DrainResult::Drained => "agent drained".to_string(),
            DrainResult::HandedOver => {
                "agent handed over (running tasks stay for the new version to adopt)".to_string()
            }
            DrainResult::NotOnBus => {
                "agent is not on the bus (not running?): nothing to drain".to_string()
            }
            DrainResult::TimedOut { in_flight } => format!(
                "agent still has {in_flight} task(s) after {:?}; restarting anyway (its own \
                 drain on SIGTERM and its journal keep them)",
                self.cfg.drain_timeout
            ),
        };
        step(4, from, to, &msg);
        Ok(drained)
    }

    /// Step 5: swap `current`/`previous` atomically, restart the service. The phase is
    /// `Swapped` before the first link changes.
    async fn step5_swap_restart(
        &self,
        state: &mut State,
        from: &Option<String>,
        to: &str,
    ) -> Result<(), UpgradeError> {
        self.advance(state, Event::Swap)?;
        self.set_links(from, to)?;
        fault::point("after-swap");
        self.service.restart().await?;
        step(
            5,
            from,
            to,
            &format!("current → {to}; restarted {}", self.service.describe()),
        );
        Ok(())
    }

    /// Step 6: within the health timeout the agent reports `to`, `running`, connected, and
    /// its service did not restart by itself. Otherwise roll back and skip `to`.
    async fn step6_health_gate(
        &self,
        state: &mut State,
        from: &Option<String>,
        to: &str,
    ) -> Result<(), UpgradeError> {
        let failure = match self.healthy(to).await {
            Ok(()) => {
                self.advance(state, Event::Healthy)?;
                step(
                    6,
                    from,
                    to,
                    "health gate passed: version, running, connected",
                );
                return Ok(());
            }
            Err(failure) => failure,
        };
        let reason = failure.to_string();
        warn!(
            upgrade_step = 6,
            upgrade_from = from.as_deref().unwrap_or(""),
            upgrade_to = to,
            "step 6: health gate failed: {reason}; rolling back"
        );
        let Some(back_to) = from.clone() else {
            return Err(UpgradeError::RollbackFailed {
                previous: "(none)".into(),
                reason: format!("{to} is unhealthy ({reason}) and there is no previous version"),
            });
        };
        let previous = state
            .in_progress
            .as_ref()
            .and_then(|p| p.previous_before.clone());
        let r = Rollback {
            abandoned: to.to_string(),
            back_to: back_to.clone(),
            previous,
            reason: reason.clone(),
            manual: false,
        };
        // Also puts `to` on the skip list, in the same write.
        self.advance(state, Event::Unhealthy(r.clone()))?;
        self.roll_back(state, &r, false).await?;
        self.step7_prune(from, to)?;
        Err(UpgradeError::Unhealthy {
            version: to.to_string(),
            previous: back_to,
            reason,
        })
    }

    /// The gate itself: within the health timeout the agent reports `version`, running
    /// and connected, and the service did not restart by itself meanwhile.
    async fn healthy(&self, version: &str) -> Result<(), GateFailure> {
        let limit = self.cfg.health_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        let service = |e: UpgradeError| GateFailure::Service(e.to_string());
        let first: Instance = self.service.instance().await.map_err(service)?;
        let mut last = None;
        loop {
            let now = self.service.instance().await.map_err(service)?;
            if now.restarts != first.restarts || now.pid != first.pid {
                return Err(GateFailure::RestartedByItself { first, now });
            }
            if let Some(h) = self.bus.health().await {
                if h.version == version && h.state == DelegateState::Running && h.connected {
                    return Ok(());
                }
                last = Some(h);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GateFailure::TimedOut { limit, last });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Step 7: keep `current` and `previous`, delete every other version and leftovers.
    fn step7_prune(&self, from: &Option<String>, to: &str) -> Result<(), UpgradeError> {
        let removed = self.layout.prune()?;
        let msg = if removed.is_empty() {
            "kept current and previous; nothing to delete".to_string()
        } else {
            format!("kept current and previous; deleted {}", removed.join(", "))
        };
        step(7, from, to, &msg);
        Ok(())
    }

    /// `check`: what `run` would do; changes nothing (not even the replay watermark).
    pub async fn check(&self) -> Result<Outcome, UpgradeError> {
        if !self.cfg.enabled {
            return Ok(Outcome::Disabled);
        }
        let mut state = State::load(&self.cfg.root)?;
        let from = self.layout.current();
        let release = match self.step2_manifest(&mut state, &from, false).await? {
            Ok(r) => r,
            Err(o) => return Ok(o),
        };
        self.check_disk(&release.version.to_string(), release.size)?;
        Ok(Outcome::WouldInstall {
            from,
            to: release.version.to_string(),
        })
    }

    /// `install FILE.tar.gz --signature FILE.minisig`: an archive signed by a trusted key
    /// (the signature's trusted comment says `delegate <version> <target>`), then the same
    /// version rules and steps 3–7 as `run`. Expiry and replay do not apply offline.
    pub async fn install(&self, archive: &Path, signature: &Path) -> Result<Outcome, UpgradeError> {
        let _lock = self.lock()?;
        let mut state = State::load(&self.cfg.root)?;
        let result = self.install_locked(&mut state, archive, signature).await;
        self.advance(&mut state, checked(&result))?;
        result
    }

    async fn install_locked(
        &self,
        state: &mut State,
        archive: &Path,
        signature: &Path,
    ) -> Result<Outcome, UpgradeError> {
        if let Some(o) = self.recover(state).await? {
            return Ok(o);
        }
        let keys = TrustedKeys::load(&self.cfg.keys_dir)?;
        let name = archive.display().to_string();
        // Read once: the bytes verified here are the bytes unpacked below (a path opened
        // twice may give different bytes each time: a FIFO, a file replaced in between).
        let bytes = read_bounded(archive, MAX_ARCHIVE_BYTES)?;
        let sig =
            String::from_utf8_lossy(&read_bounded(signature, MAX_SIGNATURE_BYTES)?).into_owned();
        let comment = keys.verify(&name, &bytes, &sig)?;
        let bad = |source| UpgradeError::Manifest {
            url: name.clone(),
            source,
        };
        let (version, target) = parse_artifact_trusted_comment(&comment).ok_or_else(|| {
            UpgradeError::BadTrustedComment {
                url: name.clone(),
                comment: comment.clone(),
            }
        })?;
        if target != self.cfg.target {
            return Err(bad(ManifestError::NoArtifact {
                target: self.cfg.target.clone(),
                available: target,
            }));
        }
        let offered: Version = version.parse().map_err(bad)?;
        let from = self.layout.current();
        let current = from.as_deref().and_then(|v| v.parse::<Version>().ok());
        let local = Local {
            channel: &self.cfg.channel,
            now: now(),
            last_seen_published_at: None,
            current: current.as_ref(),
            pinned: self.cfg.pinned_version.as_ref(),
            skip: &state.skip,
        };
        match decide_version(&offered, &local).map_err(bad)? {
            Decision::Install(_) => {}
            Decision::UpToDate(v) => return Ok(Outcome::UpToDate(v.to_string())),
            Decision::NotPinned { pinned, offered } => {
                return Ok(Outcome::NotPinned {
                    pinned: pinned.to_string(),
                    offered: offered.to_string(),
                });
            }
        }
        let to = offered.to_string();
        step(
            2,
            &from,
            &to,
            &format!("{name}: signature verified (offline install)"),
        );
        let digest = hex::encode(Sha256::digest(&bytes));
        if !self.reusable(&to, &digest, &from)? {
            self.check_disk(&to, bytes.len() as u64)?;
            self.unpack(&to, &name, &bytes).await?;
        }
        step(3, &from, &to, &format!("{name}: unpacked and checked"));
        self.deploy(state, from, to).await
    }

    /// `rollback`: go back to `previous` now, and skip the abandoned version. Recorded as
    /// phase `RollingBack` before anything changes, so a rollback killed half-way is
    /// finished by the next run.
    pub async fn rollback(&self) -> Result<Outcome, UpgradeError> {
        let _lock = self.lock()?;
        let mut state = State::load(&self.cfg.root)?;
        let result = self.rollback_locked(&mut state).await;
        self.advance(&mut state, checked(&result))?;
        result
    }

    async fn rollback_locked(&self, state: &mut State) -> Result<Outcome, UpgradeError> {
        // Finish whatever an interrupted run left first; a rollback it finished is done.
        if let Some(o @ Outcome::RolledBack { .. }) = self.recover(state).await? {
            return Ok(o);
        }
        let root = self.cfg.root.clone();
        let current = self
            .layout
            .current()
            .ok_or(UpgradeError::NotInstalled { root: root.clone() })?;
        let previous = self
            .layout
            .previous()
            .ok_or(UpgradeError::NoPrevious { root })?;
        let from = Some(current.clone());
        let r = Rollback {
            abandoned: current.clone(),
            back_to: previous.clone(),
            previous: Some(current.clone()),
            reason: "rolled back by hand".into(),
            manual: true,
        };
        // Also puts `current` on the skip list, in the same write.
        self.advance(
            state,
            Event::ManualRollback {
                from: current.clone(),
                rollback: r.clone(),
            },
        )?;
        self.step4_drain(&from, &previous).await?;
        fault::point("rollback-after-drain");
        self.roll_back(state, &r, false).await?;
        Ok(Outcome::RolledBack {
            from: current,
            to: previous,
        })
    }
}

/// Make `change` (the phase through the one table, [`crate::state::transition`]; the skip
/// list; the replay watermark; the last check) and persist the result, before the step it
/// announces changes anything. The only way the state file changes.
pub fn advance(
    root: &Path,
    state: &mut State,
    change: impl Into<Change>,
) -> Result<(), UpgradeError> {
    state.change(change.into())?;
    state.write(root)
}

/// `skip VERSION` (`skipped`) or `unskip VERSION`: change the skip list by hand. Returns
/// whether the list changed.
pub fn set_skipped(cfg: &Config, version: &str, skipped: bool) -> Result<bool, UpgradeError> {
    let mut state = State::load(&cfg.root)?;
    let was = state.skip.iter().any(|v| v == version);
    let change = if skipped {
        Change::Skip(version.to_string())
    } else {
        Change::Unskip(version.to_string())
    };
    advance(&cfg.root, &mut state, change)?;
    Ok(was != skipped)
}

/// The last check a run, install or rollback records: its outcome's code, or its error's.
fn checked(result: &Result<Outcome, UpgradeError>) -> Change {
    Change::Checked(match result {
        Ok(o) => Check {
            at: now(),
            outcome: o.code().to_string(),
            message: o.to_string(),
        },
        Err(e) => Check {
            at: now(),
            outcome: e.code().to_string(),
            message: chain(e),
        },
    })
}

/// `status`: one screen for an operator.
pub fn status_text(cfg: &Config) -> Result<String, UpgradeError> {
    let layout = Layout::new(&cfg.root);
    let state = State::load(&cfg.root)?;
    let none = || "(none)".to_string();
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<12} {v}\n"));
    line("current:", layout.current().unwrap_or_else(none));
    line("previous:", layout.previous().unwrap_or_else(none));
    line(
        "pinned:",
        cfg.pinned_version
            .as_ref()
            .map(|v| v.to_string())
            .unwrap_or_else(none),
    );
    line(
        "channel:",
        format!("{} ({})", cfg.channel, cfg.manifest_url()),
    );
    line("enabled:", cfg.enabled.to_string());
    line(
        "last check:",
        match &state.last_check {
            Some(c) => format!(
                "{} {}: {}",
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(c.at)),
                c.outcome,
                c.message
            ),
            None => "never".into(),
        },
    );
    line(
        "last seen:",
        match state.last_seen.get(&cfg.channel) {
            Some(s) => format!(
                "{} published {}",
                s.version,
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s.published_at))
            ),
            None => "never".into(),
        },
    );
    line(
        "skip list:",
        if state.skip.is_empty() {
            "(empty)".into()
        } else {
            state.skip.join(", ")
        },
    );
    if let Some(p) = &state.in_progress {
        let from = p.from.clone().unwrap_or_else(none);
        let what = match &p.phase {
            Phase::Drained => format!("{from} → {}: drained, not swapped", p.to),
            Phase::Swapped => format!("{from} → {}: swapped, health gate not passed", p.to),
            Phase::RollingBack(r) => format!("rolling back {} → {}", r.abandoned, r.back_to),
        };
        line("interrupted:", format!("{what} (the next run finishes it)"));
    }
    Ok(s)
}

#[cfg(test)]
mod tests;
