//! The upgrade steps in process, against fakes of the outside world: for each phase a run
//! can find in the state file × the step that fails, the state file, the links of the
//! layout (in a temp dir) and the outcome a run leaves.
//!
//! The process-level tests (`tests/tests/upgrade/`) kill the real binary at each step
//! with a real bus, agent and supervisor; this table covers the same recovery paths in
//! milliseconds, and failures those tests cannot cause (a refused drain, a failed swap).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delegate_protocol::DelegateState;
use delegate_protocol::release::{Artifact, BINARY_NAME, MANIFEST_SCHEMA, Manifest};
use sha2::{Digest, Sha256};

use super::*;
use crate::config::UpgradeMode;
use crate::error::NetworkError;
use crate::state::InProgress;

const V0: &str = "0.0.9";
const V1: &str = "0.1.0";
const V2: &str = "0.2.0";
const CHANNEL_URL: &str = "http://releases.test";
const TARGET: &str = "test-target";

/// The simulated host the three fakes share: which version the agent runs and how it
/// answers, what fails, and what was asked of it.
#[derive(Default)]
struct Host {
    root: PathBuf,
    /// The version the agent process runs (what `current` pointed at when it started).
    running: Option<String>,
    drained: bool,
    pid: u32,
    restarts: u32,
    /// Versions whose agent never reports `running`.
    unhealthy: Vec<String>,
    /// A restart onto this version (what `current` points at) fails.
    restart_fails_onto: Option<String>,
    drain_refused: bool,
    download_fails: bool,
    /// The release server: URL → body.
    files: HashMap<String, Vec<u8>>,
    /// What was asked of the agent and its service, in order.
    calls: Vec<String>,
}

type Shared = Arc<Mutex<Host>>;

fn host(h: &Shared) -> MutexGuard<'_, Host> {
    h.lock().expect("host lock")
}

/// A fake [`ServiceManager`]: a restart starts whatever `current` points at.
struct FakeService(Shared);

impl ServiceManager for FakeService {
    async fn restart(&self) -> Result<(), UpgradeError> {
        let mut h = host(&self.0);
        let onto = Layout::new(&h.root).current();
        let name = onto.clone().unwrap_or_else(|| "(none)".into());
        if h.restart_fails_onto.is_some() && h.restart_fails_onto == onto {
            h.calls.push(format!("restart {name} failed"));
            return Err(UpgradeError::Restart {
                unit: "fake".into(),
                reason: "fake restart failure".into(),
                source: None,
            });
        }
        h.calls.push(format!("restart {name}"));
        h.running = onto;
        h.drained = false;
        h.pid += 1;
        Ok(())
    }

    async fn instance(&self) -> Result<Instance, UpgradeError> {
        let h = host(&self.0);
        Ok(Instance {
            pid: h.pid,
            restarts: h.restarts,
        })
    }

    fn describe(&self) -> String {
        "fake service".into()
    }
}

/// A fake [`AgentBus`]: the agent of [`Host::running`], healthy unless listed otherwise.
struct FakeBus(Shared);

impl AgentBus for FakeBus {
    async fn health(&self) -> Option<Health> {
        let h = host(&self.0);
        let version = h.running.clone()?;
        let state = if h.drained {
            DelegateState::Drained
        } else if h.unhealthy.contains(&version) {
            DelegateState::Starting
        } else {
            DelegateState::Running
        };
        Some(Health {
            version,
            state,
            connected: true,
        })
    }

    async fn drain(&self, _: Duration, _: UpgradeMode) -> Result<DrainResult, UpgradeError> {
        let mut h = host(&self.0);
        if h.drain_refused {
            h.calls.push("drain refused".into());
            return Err(UpgradeError::Bus {
                what: "Drain() failed".into(),
                source: None,
            });
        }
        h.calls.push("drain".into());
        if h.running.is_none() {
            return Ok(DrainResult::NotOnBus);
        }
        h.drained = true;
        Ok(DrainResult::Drained)
    }

    async fn resume(&self) -> Result<bool, UpgradeError> {
        let mut h = host(&self.0);
        h.calls.push("resume".into());
        h.drained = false;
        Ok(h.running.is_some())
    }
}

/// A fake [`Transport`]: the release directory in memory; digests checked like
/// [`Fetcher`] checks them.
struct FakeTransport(Shared);

impl Transport for FakeTransport {
    async fn get_small(&self, url: &str, _: u64) -> Result<Vec<u8>, UpgradeError> {
        host(&self.0)
            .files
            .get(url)
            .cloned()
            .ok_or_else(|| UpgradeError::Rejected {
                url: url.into(),
                status: 404,
            })
    }

    async fn download(&self, url: &str, _: u64, sha256: &str) -> Result<Vec<u8>, UpgradeError> {
        let h = host(&self.0);
        if h.download_fails {
            return Err(UpgradeError::Network {
                url: url.into(),
                source: NetworkError::File(std::io::ErrorKind::ConnectionReset.into()),
            });
        }
        let body = h.files.get(url).cloned().ok_or(UpgradeError::Rejected {
            url: url.into(),
            status: 404,
        })?;
        let actual = hex::encode(Sha256::digest(&body));
        if actual != sha256 {
            return Err(UpgradeError::DigestMismatch {
                url: url.into(),
                expected: sha256.into(),
                actual,
            });
        }
        Ok(body)
    }
}

/// A release archive whose `delegate` prints `version`.
fn archive(version: &str) -> Vec<u8> {
    let script = format!("#!/bin/sh\necho {version}\n");
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(script.len() as u64);
    h.set_mode(0o755);
    h.set_cksum();
    b.append_data(&mut h, BINARY_NAME, script.as_bytes())
        .expect("append");
    b.into_inner().expect("tar").finish().expect("gz")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Where a run starts: what the state file records and the links point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// Nothing under way: `current → 0.1.0`, `previous → 0.0.9`; 0.2.0 is offered.
    Fresh,
    /// Nothing under way, 0.2.0 installed: `current → 0.2.0`, `previous → 0.1.0`.
    Installed,
    /// A run was killed after the drain (0.2.0 unpacked, the agent on 0.1.0 drained).
    Drained,
    /// A run was killed between the swap and the restart (the agent still on 0.1.0).
    Swapped,
    /// A run was killed after 0.2.0 failed its gate, before the links went back.
    RollingBack,
    /// `rollback` by hand was killed after it was recorded, before the links went back.
    ManualRollingBack,
}

/// The step that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Nothing,
    /// Step 3: the archive cannot be fetched.
    Download,
    /// Step 2: the manifest's signature does not verify.
    Signature,
    /// Step 4: the agent refuses `Drain()`.
    Drain,
    /// Step 5: a link cannot be set (`previous` is a directory).
    Swap,
    /// Step 5: the restart onto 0.2.0 fails.
    Restart,
    /// Step 6: 0.2.0 never reports `running`.
    Unhealthy,
    /// 0.2.0 is unhealthy and the rollback's restart onto 0.1.0 fails.
    RollbackRestart,
    /// 0.2.0 is unhealthy and 0.1.0, rolled back to, is unhealthy too.
    BothUnhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Run,
    Rollback,
}

/// One row: what a run (`cmd`) that starts at `start` and meets `fail` leaves behind.
struct Row {
    cmd: Cmd,
    start: Start,
    fail: Fail,
    /// [`Outcome::code`] or [`UpgradeError::code`]; the state file's last check says it too.
    outcome: &'static str,
    /// The phase the state file records afterwards (`None`: nothing under way).
    phase: Option<&'static str>,
    skip: &'static [&'static str],
    /// Where `current` and `previous` point (`(dir)`: not a link).
    links: [&'static str; 2],
    /// The complete version directories left.
    versions: &'static [&'static str],
    /// The replay watermark for the channel afterwards.
    seen: Option<&'static str>,
    /// What was asked of the agent and its service.
    calls: &'static [&'static str],
}

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    host: Shared,
    up: Upgrader<FakeService, FakeBus, FakeTransport>,
}

fn link(root: &Path, name: &str) -> String {
    let p = root.join(name);
    match std::fs::read_link(&p) {
        Ok(t) => t
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        Err(_) if p.is_dir() => "(dir)".into(),
        Err(_) => "(none)".into(),
    }
}

fn world(start: Start, fail: Fail) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("keys dir");
    let kp = minisign::KeyPair::generate_unencrypted_keypair().expect("keypair");
    let pk = kp.pk.to_box().expect("pk box").into_string();
    std::fs::write(keys.join("release.pub"), pk).expect("write pk");

    let mut cfg = Config::parse(
        Path::new("/test/upgrader.toml"),
        &format!("channel_url = \"{CHANNEL_URL}\"\n"),
    )
    .expect("config");
    cfg.root = root.clone();
    cfg.keys_dir = keys;
    cfg.target = TARGET.into();
    cfg.version_check_user = String::new();
    cfg.min_free_bytes = 0;
    cfg.health_timeout = Duration::from_millis(300);
    cfg.drain_timeout = Duration::from_secs(1);

    // The release server offers 0.2.0, signed (or not, for `Fail::Signature`).
    let v2 = archive(V2);
    let artifact_path = format!("artifacts/{V2}/delegate-{V2}-{TARGET}.tar.gz");
    let manifest = Manifest {
        schema: MANIFEST_SCHEMA,
        channel: cfg.channel.clone(),
        version: V2.into(),
        published_at: unix_now() - 60,
        expires_at: unix_now() + 3600,
        artifacts: [(
            TARGET.to_string(),
            Artifact {
                path: artifact_path.clone(),
                sha256: hex::encode(Sha256::digest(&v2)),
                size: v2.len() as u64,
            },
        )]
        .into(),
    };
    let manifest = serde_json::to_vec(&manifest).expect("manifest");
    let signed: &[u8] = if fail == Fail::Signature {
        b"some other manifest"
    } else {
        &manifest
    };
    let sig = minisign::sign(None, &kp.sk, signed, Some("t"), None)
        .expect("sign")
        .into_string();
    let mut files = HashMap::new();
    files.insert(cfg.manifest_url(), manifest);
    files.insert(format!("{}.minisig", cfg.manifest_url()), sig.into_bytes());
    files.insert(cfg.artifact_url(&artifact_path), v2.clone());

    // The layout and state file the start says.
    let layout = Layout::new(&root);
    let unpack = |v: &str, bytes: &[u8]| {
        layout
            .unpack(v, "test.tar.gz", bytes)
            .expect("unpack")
            .commit()
            .expect("commit");
    };
    let (installed, current, previous, running): (&[&str], _, _, _) = match start {
        Start::Fresh => (&[V0, V1], V1, V0, V1),
        Start::Installed | Start::ManualRollingBack => (&[V1, V2], V2, V1, V2),
        Start::Drained => (&[V0, V1, V2], V1, V0, V1),
        Start::Swapped => (&[V0, V1, V2], V2, V1, V1),
        Start::RollingBack => (&[V0, V1, V2], V2, V1, V2),
    };
    for v in installed {
        if *v == V2 {
            unpack(v, &v2);
        } else {
            unpack(v, &archive(v));
        }
    }
    layout.set_link("current", Some(current)).expect("current");
    layout.set_link("previous", Some(previous)).expect("prev");
    let mut state = State::default();
    let drain = Event::Drain {
        from: Some(V1.into()),
        to: V2.into(),
        previous_before: Some(V0.into()),
    };
    let events = match start {
        Start::Fresh | Start::Installed => vec![],
        Start::Drained => vec![drain],
        Start::Swapped => vec![drain, Event::Swap],
        Start::RollingBack => vec![
            drain,
            Event::Swap,
            Event::Unhealthy(Rollback {
                abandoned: V2.into(),
                back_to: V1.into(),
                previous: Some(V0.into()),
                reason: "not healthy".into(),
                manual: false,
            }),
        ],
        Start::ManualRollingBack => vec![Event::ManualRollback {
            from: V2.into(),
            rollback: Rollback {
                abandoned: V2.into(),
                back_to: V1.into(),
                previous: Some(V2.into()),
                reason: "rolled back by hand".into(),
                manual: true,
            },
        }],
    };
    for e in events {
        state.apply(e).expect("setup transition");
    }
    state.write(&root).expect("state");

    if fail == Fail::Swap {
        // rename(2) of a link over a directory fails: the swap cannot set `previous`.
        std::fs::remove_file(root.join("previous")).expect("rm previous");
        std::fs::create_dir(root.join("previous")).expect("previous dir");
    }

    let h = Host {
        root: root.clone(),
        running: Some(running.into()),
        drained: start == Start::Drained,
        pid: 100,
        restarts: 0,
        unhealthy: match fail {
            Fail::Unhealthy | Fail::RollbackRestart => vec![V2.into()],
            Fail::BothUnhealthy => vec![V1.into(), V2.into()],
            _ => vec![],
        },
        restart_fails_onto: match fail {
            Fail::Restart => Some(V2.into()),
            Fail::RollbackRestart => Some(V1.into()),
            _ => None,
        },
        drain_refused: fail == Fail::Drain,
        download_fails: fail == Fail::Download,
        files,
        calls: vec![],
    };
    let shared = Arc::new(Mutex::new(h));
    let up = Upgrader::with(
        cfg,
        FakeService(shared.clone()),
        FakeBus(shared.clone()),
        FakeTransport(shared.clone()),
    );
    World {
        _dir: dir,
        root,
        host: shared,
        up,
    }
}

fn phase_of(p: &InProgress) -> &'static str {
    match p.phase {
        Phase::Drained => "drained",
        Phase::Swapped => "swapped",
        Phase::RollingBack(_) => "rolling_back",
    }
}

#[rustfmt::skip]
const ROWS: &[Row] = &[
    // --- `run`, nothing under way: current 0.1.0, previous 0.0.9, 0.2.0 offered -------
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Nothing,
          outcome: "installed", phase: None, skip: &[], links: [V2, V1],
          versions: &[V1, V2], seen: Some(V2), calls: &["drain", "restart 0.2.0"] },
    // Nothing changed but the watermark: the next run downloads again.
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Download,
          outcome: "network", phase: None, skip: &[], links: [V1, V0],
          versions: &[V0, V1], seen: Some(V2), calls: &[] },
    // Refused before anything is recorded, even the watermark.
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Signature,
          outcome: "bad-signature", phase: None, skip: &[], links: [V1, V0],
          versions: &[V0, V1], seen: None, calls: &[] },
    // The drain was recorded before it was asked for: the next run resumes the agent.
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Drain,
          outcome: "bus", phase: Some("drained"), skip: &[], links: [V1, V0],
          versions: &[V0, V1, V2], seen: Some(V2), calls: &["drain refused"] },
    // The swap was recorded before the first link: the next run finishes it forwards.
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Swap,
          outcome: "io", phase: Some("swapped"), skip: &[], links: [V1, "(dir)"],
          versions: &[V0, V1, V2], seen: Some(V2), calls: &["drain"] },
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Restart,
          outcome: "restart-failed", phase: Some("swapped"), skip: &[], links: [V2, V1],
          versions: &[V0, V1, V2], seen: Some(V2), calls: &["drain", "restart 0.2.0 failed"] },
    // Rolled back: `previous` is what it was before the upgrade, 0.2.0 skipped and pruned.
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::Unhealthy,
          outcome: "unhealthy", phase: None, skip: &[V2], links: [V1, V0],
          versions: &[V0, V1], seen: Some(V2),
          calls: &["drain", "restart 0.2.0", "restart 0.1.0"] },
    // The rollback stays recorded: the next run retries it.
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::RollbackRestart,
          outcome: "rollback-restart-failed", phase: Some("rolling_back"), skip: &[V2],
          links: [V1, V0], versions: &[V0, V1, V2], seen: Some(V2),
          calls: &["drain", "restart 0.2.0", "restart 0.1.0 failed"] },
    Row { cmd: Cmd::Run, start: Start::Fresh, fail: Fail::BothUnhealthy,
          outcome: "rollback-failed", phase: Some("rolling_back"), skip: &[V2],
          links: [V1, V0], versions: &[V0, V1, V2], seen: Some(V2),
          calls: &["drain", "restart 0.2.0", "restart 0.1.0"] },
    // --- `run` after a run killed after the drain: resume, then start over ------------
    Row { cmd: Cmd::Run, start: Start::Drained, fail: Fail::Nothing,
          outcome: "installed", phase: None, skip: &[], links: [V2, V1],
          versions: &[V1, V2], seen: Some(V2), calls: &["resume", "drain", "restart 0.2.0"] },
    // The complete 0.2.0 is reused: nothing is downloaded.
    Row { cmd: Cmd::Run, start: Start::Drained, fail: Fail::Download,
          outcome: "installed", phase: None, skip: &[], links: [V2, V1],
          versions: &[V1, V2], seen: Some(V2), calls: &["resume", "drain", "restart 0.2.0"] },
    Row { cmd: Cmd::Run, start: Start::Drained, fail: Fail::Signature,
          outcome: "bad-signature", phase: None, skip: &[], links: [V1, V0],
          versions: &[V0, V1, V2], seen: None, calls: &["resume"] },
    Row { cmd: Cmd::Run, start: Start::Drained, fail: Fail::Drain,
          outcome: "bus", phase: Some("drained"), skip: &[], links: [V1, V0],
          versions: &[V0, V1, V2], seen: Some(V2), calls: &["resume", "drain refused"] },
    // --- `run` after a run killed between the swap and the restart: finish forwards ---
    // The manifest is not even fetched.
    Row { cmd: Cmd::Run, start: Start::Swapped, fail: Fail::Nothing,
          outcome: "installed", phase: None, skip: &[], links: [V2, V1],
          versions: &[V1, V2], seen: None, calls: &["restart 0.2.0"] },
    Row { cmd: Cmd::Run, start: Start::Swapped, fail: Fail::Signature,
          outcome: "installed", phase: None, skip: &[], links: [V2, V1],
          versions: &[V1, V2], seen: None, calls: &["restart 0.2.0"] },
    Row { cmd: Cmd::Run, start: Start::Swapped, fail: Fail::Swap,
          outcome: "io", phase: Some("swapped"), skip: &[], links: [V2, "(dir)"],
          versions: &[V0, V1, V2], seen: None, calls: &[] },
    Row { cmd: Cmd::Run, start: Start::Swapped, fail: Fail::Restart,
          outcome: "restart-failed", phase: Some("swapped"), skip: &[], links: [V2, V1],
          versions: &[V0, V1, V2], seen: None, calls: &["restart 0.2.0 failed"] },
    // `previous` goes back to what the state file recorded before the swap.
    Row { cmd: Cmd::Run, start: Start::Swapped, fail: Fail::Unhealthy,
          outcome: "unhealthy", phase: None, skip: &[V2], links: [V1, V0],
          versions: &[V0, V1], seen: None, calls: &["restart 0.2.0", "restart 0.1.0"] },
    // --- `run` after a rollback killed before the links went back: finish it -----------
    Row { cmd: Cmd::Run, start: Start::RollingBack, fail: Fail::Nothing,
          outcome: "unhealthy", phase: None, skip: &[V2], links: [V1, V0],
          versions: &[V0, V1], seen: None, calls: &["restart 0.1.0"] },
    Row { cmd: Cmd::Run, start: Start::RollingBack, fail: Fail::RollbackRestart,
          outcome: "rollback-restart-failed", phase: Some("rolling_back"), skip: &[V2],
          links: [V1, V0], versions: &[V0, V1, V2], seen: None,
          calls: &["restart 0.1.0 failed"] },
    Row { cmd: Cmd::Run, start: Start::RollingBack, fail: Fail::BothUnhealthy,
          outcome: "rollback-failed", phase: Some("rolling_back"), skip: &[V2],
          links: [V1, V0], versions: &[V0, V1, V2], seen: None, calls: &["restart 0.1.0"] },
    Row { cmd: Cmd::Run, start: Start::ManualRollingBack, fail: Fail::Nothing,
          outcome: "rolled-back", phase: None, skip: &[V2], links: [V1, V2],
          versions: &[V1, V2], seen: None, calls: &["restart 0.1.0"] },
    // --- `rollback` by hand: current 0.2.0, previous 0.1.0 ------------------------------
    Row { cmd: Cmd::Rollback, start: Start::Installed, fail: Fail::Nothing,
          outcome: "rolled-back", phase: None, skip: &[V2], links: [V1, V2],
          versions: &[V1, V2], seen: None, calls: &["drain", "restart 0.1.0"] },
    // Recorded (and 0.2.0 skipped) before the drain: the next run finishes the rollback.
    Row { cmd: Cmd::Rollback, start: Start::Installed, fail: Fail::Drain,
          outcome: "bus", phase: Some("rolling_back"), skip: &[V2], links: [V2, V1],
          versions: &[V1, V2], seen: None, calls: &["drain refused"] },
    Row { cmd: Cmd::Rollback, start: Start::Installed, fail: Fail::RollbackRestart,
          outcome: "rollback-restart-failed", phase: Some("rolling_back"), skip: &[V2],
          links: [V1, V2], versions: &[V1, V2], seen: None,
          calls: &["drain", "restart 0.1.0 failed"] },
    // `rollback` first finishes what an interrupted one left.
    Row { cmd: Cmd::Rollback, start: Start::ManualRollingBack, fail: Fail::Nothing,
          outcome: "rolled-back", phase: None, skip: &[V2], links: [V1, V2],
          versions: &[V1, V2], seen: None, calls: &["restart 0.1.0"] },
];

/// What a row's run left, in the row's terms (so a mismatch prints both side by side).
#[derive(Debug, PartialEq, Eq)]
struct Left {
    outcome: String,
    checked: Option<String>,
    phase: Option<&'static str>,
    skip: Vec<String>,
    links: [String; 2],
    versions: Vec<String>,
    seen: Option<String>,
    calls: Vec<String>,
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn each_phase_and_failing_step_leaves_the_state_file_links_and_outcome_it_should() {
    let mut failed = Vec::new();
    for row in ROWS {
        let w = world(row.start, row.fail);
        let result = match row.cmd {
            Cmd::Run => w.up.run().await,
            Cmd::Rollback => w.up.rollback().await,
        };
        let state = State::load(&w.root).expect("state after the run");
        let mut versions: Vec<String> = std::fs::read_dir(w.up.layout.versions())
            .expect("versions")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|v| w.up.layout.is_complete(v))
            .collect();
        versions.sort();
        let left = Left {
            outcome: match &result {
                Ok(o) => o.code().to_string(),
                Err(e) => e.code().to_string(),
            },
            checked: state.last_check.as_ref().map(|c| c.outcome.clone()),
            phase: state.in_progress.as_ref().map(phase_of),
            skip: state.skip.clone(),
            links: [link(&w.root, "current"), link(&w.root, "previous")],
            versions,
            seen: state
                .last_seen
                .get(&w.up.cfg.channel)
                .map(|s| s.version.clone()),
            calls: host(&w.host).calls.clone(),
        };
        let want = Left {
            outcome: row.outcome.to_string(),
            checked: Some(row.outcome.to_string()),
            phase: row.phase,
            skip: strings(row.skip),
            links: [row.links[0].to_string(), row.links[1].to_string()],
            versions: strings(row.versions),
            seen: row.seen.map(str::to_string),
            calls: strings(row.calls),
        };
        if left != want {
            failed.push(format!(
                "{:?} {:?} × {:?}:\n  left {left:?}\n  want {want:?}\n  result {result:?}",
                row.cmd, row.start, row.fail
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// The gate's failure is typed; its text is what the journal and state file said before.
#[test]
fn a_gate_failure_says_why_as_before() {
    let h = Health {
        version: V2.into(),
        state: DelegateState::Starting,
        connected: false,
    };
    let limit = Duration::from_secs(2);
    assert_eq!(
        GateFailure::TimedOut { limit, last: None }.to_string(),
        "not healthy within 2s: the agent never appeared on the bus"
    );
    assert_eq!(
        GateFailure::TimedOut {
            limit,
            last: Some(h)
        }
        .to_string(),
        "not healthy within 2s: agent reports version 0.2.0, state starting, connected false"
    );
    let first = Instance {
        pid: 1,
        restarts: 0,
    };
    let now = Instance {
        pid: 2,
        restarts: 1,
    };
    assert_eq!(
        GateFailure::RestartedByItself { first, now }.to_string(),
        "the service restarted by itself (pid 1 → 2, restarts 0 → 1)"
    );
}

/// An upgrader upgraded in place reads the state file the one before it wrote.
#[test]
fn a_state_file_written_before_the_seams_still_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = r#"{
  "last_seen": {"stable": {"version": "0.2.0", "published_at": 7}},
  "last_check": {"at": 8, "outcome": "unhealthy", "message": "m"},
  "skip": ["0.2.0"],
  "in_progress": {"from": "0.1.0", "to": "0.2.0", "previous_before": null,
    "phase": {"rolling_back": {"abandoned": "0.2.0", "back_to": "0.1.0",
      "previous": null, "reason": "r", "manual": false}}}
}"#;
    std::fs::write(State::path(dir.path()), old).expect("write");
    let s = State::load(dir.path()).expect("load");
    assert_eq!(s.skip, vec![V2.to_string()]);
    assert!(matches!(
        s.in_progress.as_ref().map(|p| &p.phase),
        Some(Phase::RollingBack(r)) if r.back_to == V1
    ));
    let again: serde_json::Value = serde_json::to_value(&s).expect("serialize");
    let before: serde_json::Value = serde_json::from_str(old).expect("json");
    assert_eq!(again, before);
}

/// `skip`/`unskip` by hand go through `advance` too and say whether the list changed.
#[test]
fn skip_and_unskip_by_hand() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::parse(
        Path::new("/test/upgrader.toml"),
        &format!("channel_url = \"{CHANNEL_URL}\"\n"),
    )
    .expect("config");
    cfg.root = dir.path().to_path_buf();
    assert!(set_skipped(&cfg, V2, true).expect("skip"));
    assert!(!set_skipped(&cfg, V2, true).expect("skip again"));
    assert_eq!(State::load(dir.path()).expect("load").skip, vec![V2]);
    assert!(set_skipped(&cfg, V2, false).expect("unskip"));
    assert!(!set_skipped(&cfg, V2, false).expect("unskip again"));
    assert!(State::load(dir.path()).expect("load").skip.is_empty());
}

/// Whatever a row left, the next `run` with the fault gone finishes or undoes it: nothing
/// under way, and the agent runs the version `current` points at, healthy.
#[tokio::test]
async fn after_every_row_the_next_run_without_the_fault_converges() {
    let mut failed = Vec::new();
    for row in ROWS {
        let w = world(row.start, row.fail);
        let _ = match row.cmd {
            Cmd::Run => w.up.run().await,
            Cmd::Rollback => w.up.rollback().await,
        };
        {
            let mut h = host(&w.host);
            h.unhealthy.clear();
            h.restart_fails_onto = None;
            h.drain_refused = false;
            h.download_fails = false;
        }
        let previous = std::fs::symlink_metadata(w.root.join("previous"));
        if previous.is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir(w.root.join("previous")).expect("rm previous dir");
        }
        let result = w.up.run().await;
        let state = State::load(&w.root).expect("state after the second run");
        let current = w.up.layout.current();
        let running = host(&w.host).running.clone();
        let healthy = w.up.bus.health().await;
        let converged = state.in_progress.is_none()
            && current.is_some()
            && current == running
            && healthy.is_some_and(|h| h.state == DelegateState::Running);
        if !converged {
            failed.push(format!(
                "{:?} {:?} × {:?}: phase {:?}, current {current:?}, running {running:?}, \
                 result {result:?}",
                row.cmd,
                row.start,
                row.fail,
                state.in_progress.as_ref().map(phase_of)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
