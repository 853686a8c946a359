//! End-to-end tests of the packages on a real systemd: each test boots a Debian container
//! (`delegate_tests::nspawn`), installs the `.deb` or `.rpm` from `target/packages`
//! (`scripts/packages` builds them; `DELEGATE_PACKAGES_DIR` points elsewhere) and drives
//! it the way an operator does — `apt-get`, `rpm`, `delegate setup`, `systemctl`,
//! `journalctl` — against a manager on the host's loopback.
//!
//! What only a real systemd can show is asserted here: the unit's exit status and restart
//! count, the journal's fields, the system bus policy, the maintainer scripts, and the
//! upgrader's `RestartUnit`/`JobRemoved`/`NRestarts` path.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use delegate_protocol::TaskState;
use delegate_tests::Manager;
use delegate_tests::nspawn::{BootOptions, Container, can_boot, workspace};
use delegate_tests::prereq::{self, Missing};
use delegate_tests::upgrade::{StaticServer, agent_v2, fake_binary};
use serde_json::json;

mod units;

/// The binary with the release tools (`keygen`, `publish`); hosts never get it.
const RELEASE_TOOL: &str = "delegate-release";

/// Where the packages are mounted inside the container.
const PKG: &str = "/mnt/packages";

/// The test kit's prerequisite policy for these tests (`delegate_tests::prereq`): skip
/// loudly when containers cannot boot here or the packages were not built; with
/// `DELEGATE_E2E_REQUIRED=1` (CI) fail instead.
fn skip(test: &str) -> bool {
    let found = can_boot().and_then(|()| match package("delegate_", ".deb") {
        Ok(_) => Ok(()),
        Err(_) => Err(Missing::absent(
            format!("the packages in {}", packages_dir().display()),
            "run scripts/packages (needs `cargo install --locked cargo-deb cargo-generate-rpm`)",
        )),
    });
    prereq::require_for(test, found).is_none()
}

fn packages_dir() -> PathBuf {
    std::env::var_os("DELEGATE_PACKAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target").join("packages"))
}

/// File name of the package in `packages_dir()` starting with `prefix` and ending `suffix`.
fn package(prefix: &str, suffix: &str) -> Result<String> {
    let dir = packages_dir();
    let found = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "{} is missing: build the packages first with scripts/packages (scripts/test does)",
                dir.display()
            )
        })?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(prefix) && n.ends_with(suffix));
    found.with_context(|| {
        format!(
            "no {prefix}*{suffix} in {}: run scripts/packages",
            dir.display()
        )
    })
}

/// The agent's .deb, as a path inside the container.
fn deb() -> Result<String> {
    Ok(format!("{PKG}/{}", package("delegate_", ".deb")?))
}

/// A manager on the host, a booted container with the packages mounted.
struct World {
    c: Container,
    m: Manager,
    tmp: tempfile::TempDir,
}

fn world() -> Result<World> {
    let tmp = tempfile::tempdir()?;
    let m = Manager::start(tmp.path())?;
    let c = Container::boot(&BootOptions {
        bind_ro: vec![(packages_dir(), PKG.into())],
    })?;
    Ok(World { c, m, tmp })
}

impl World {
    /// `delegate setup` with a fresh token; waits until the agent runs and is connected.
    fn setup(&self, name: &str) -> Result<()> {
        let token = self.m.token(name)?;
        // A failed start is diagnosed from the agent's journal: carry it in the error.
        self.c
            .run(&format!(
                "delegate setup --manager {} --token {token} --name {name} --tags e2e,{name}",
                self.m.url()
            ))
            .map_err(|e| {
                e.context(format!(
                    "journal of delegate:\n{}",
                    self.c.journal("delegate")
                ))
            })?;
        self.wait_connected()
    }

    fn wait_connected(&self) -> Result<()> {
        self.c.wait_until(
            Duration::from_secs(60),
            "the agent to run and connect",
            "systemctl is-active delegate && delegate status | grep -q 'connected:   true'",
        )?;
        Ok(())
    }

    /// Submit a shell task for this world's delegate.
    fn submit(&self, script: &str) -> Result<String> {
        self.m.submit(&json!({
            "kind": "shell",
            "spec": { "script": script },
            "selectors": ["e2e"],
            "timeout_secs": 300,
            "retries": 0,
        }))
    }

    fn wait_running(&self, id: &str) -> Result<()> {
        self.m
            .wait_state(id, &[TaskState::Running], Duration::from_secs(60))?;
        Ok(())
    }

    fn logs(&self, id: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.m.logs(id)?).into_owned())
    }

    /// The task ended `succeeded` on its first attempt and its log holds `needle`.
    fn assert_succeeded(&self, id: &str, needle: &str) -> Result<()> {
        let t = self.m.wait_done(id, Duration::from_secs(120))?;
        let log = self.logs(id)?;
        if t.state != TaskState::Succeeded || t.attempt != 1 || !log.contains(needle) {
            bail!(
                "task {id}: {t:?}\nlog: {log}\njournal:\n{}",
                self.c.journal("delegate")
            );
        }
        Ok(())
    }

    fn current(&self) -> Result<String> {
        Ok(self
            .c
            .run("readlink /var/lib/delegate-upgrader/current")?
            .trim()
            .to_string())
    }
}

fn elapsed(test: &str, start: Instant) {
    eprintln!("{test}: {:.1}s", start.elapsed().as_secs_f64());
}

/// Steps 1–4 and 7: install, unconfigured exit 78, setup, a task in the journal, the bus
/// policy, a drain on `systemctl stop`, remove and purge.
#[test]
fn deb_install_setup_status_drain_remove_purge() -> Result<()> {
    if skip("deb_install_setup_status_drain_remove_purge") {
        return Ok(());
    }
    let start = Instant::now();
    let w = world()?;
    let c = &w.c;

    // 1. Installed but not configured: the service ends with 78 and does not loop.
    c.run(&format!("apt-get install -y -q {}", deb()?))?;
    c.wait_until(
        Duration::from_secs(30),
        "the unconfigured agent to fail with 78",
        "systemctl show delegate -p ActiveState -p ExecMainStatus | sort | tr '\\n' ' ' | grep -qx 'ActiveState=failed ExecMainStatus=78 '",
    )?;
    // `failed` (not `activating (auto-restart)`) means no restart is scheduled.
    assert_eq!(c.unit_property("delegate", "NRestarts")?, "0");
    assert_eq!(c.unit_property("delegate", "UnitFileState")?, "enabled");
    let journal = c.journal("delegate");
    assert!(
        journal.contains("/etc/delegate/delegate.toml: manager_url is missing")
            && journal.contains("/etc/delegate/delegate.toml: no token"),
        "{journal}"
    );
    assert_eq!(
        c.run("stat -c '%U:%G %a' /etc/delegate/delegate.toml")?
            .trim(),
        "root:delegate 640"
    );
    assert_eq!(
        c.unit_property("delegate-upgrader.timer", "UnitFileState")?,
        "disabled",
        "auto-upgrade is off until the operator enables the timer"
    );

    // The installed units are valid, and the agent's sandbox scores 2.5 or better.
    c.run("systemd-analyze verify --man=no delegate.service delegate-upgrader.service delegate-upgrader.timer")?;
    let security = c.run("systemd-analyze security --no-pager delegate.service")?;
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("delegate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no exposure figure in:\n{security}"))?;
    eprintln!("systemd-analyze security delegate.service: {exposure}");
    assert!(exposure <= 2.5, "{security}");

    // `delegate setup` with a bad URL changes nothing.
    let before = c.run("sha256sum /etc/delegate/delegate.toml")?;
    let bad = c.sh("delegate setup --manager htp://typo --token dlg_x")?;
    assert_eq!(bad.status, Some(78), "{bad:?}");
    assert!(bad.stderr.contains("manager_url"), "{bad:?}");
    assert_eq!(c.run("sha256sum /etc/delegate/delegate.toml")?, before);

    // 2. Setup makes it active; a task runs and the journal carries its id.
    w.setup("e2e-deb")?;
    assert_eq!(
        c.run("stat -c '%U:%G %a' /etc/delegate/delegate.toml")?
            .trim(),
        "root:delegate 640"
    );
    // Shell tasks run as their own unit's user, not as the agent's.
    let id = w.submit("echo hello from uid $(id -u)")?;
    w.assert_succeeded(&id, "hello from uid 6")?;
    let entries = c.journal_json("delegate")?;
    let tagged = entries.iter().find(|e| {
        e["TASK_ID"] == id.as_str() && e["DELEGATE_ID"].as_str().is_some_and(|d| !d.is_empty())
    });
    assert!(
        tagged.is_some(),
        "no journal entry with TASK_ID={id} and DELEGATE_ID:\n{}",
        c.journal("delegate")
    );

    // 3. The system bus: root and anyone may read the status; only root may drain.
    let status = c.run("delegate status")?;
    assert!(status.contains("state:       running"), "{status}");
    let status = c.run("runuser -u nobody -- delegate status")?;
    assert!(status.contains("version:     0.1.0"), "{status}");
    let drain = c.sh("runuser -u nobody -- delegate drain")?;
    assert!(!drain.ok(), "{drain:?}");
    assert!(drain.stderr.contains("AccessDenied"), "{drain:?}");
    assert!(c.run("delegate status")?.contains("state:       running"));

    // 4. `systemctl stop` during a task: the task finishes, the agent exits 0.
    let id = w.submit("echo start; sleep 3; echo finished")?;
    w.wait_running(&id)?;
    c.run("systemctl stop delegate")?;
    w.assert_succeeded(&id, "finished")?;
    assert_eq!(c.unit_property("delegate", "Result")?, "success");
    assert_eq!(c.unit_property("delegate", "ExecMainStatus")?, "0");
    assert_eq!(c.unit_property("delegate", "ActiveState")?, "inactive");

    // Auto-upgrade is one command away; remove turns it off again.
    c.run("systemctl enable --now delegate-upgrader.timer")?;
    assert_eq!(
        c.unit_property("delegate-upgrader.timer", "ActiveState")?,
        "active"
    );

    // 7. Remove stops the service (and the timer); purge leaves nothing behind.
    c.run("systemctl start delegate")?;
    w.wait_connected()?;
    c.run("apt-get remove -y -q delegate")?;
    assert_eq!(c.unit_property("delegate", "ActiveState")?, "inactive");
    assert_eq!(c.unit_property("delegate", "MainPID")?, "0");
    assert!(!c.sh("test -e /usr/bin/delegate")?.ok());
    assert_eq!(
        c.unit_property("delegate-upgrader.timer", "ActiveState")?,
        "inactive"
    );
    c.run("apt-get purge -y -q delegate")?;
    let left = c.run(
        // (/.delegate-rootfs marks the cached rootfs itself.)
        "find / -xdev -name '*delegate*' -not -path '/proc/*' -not -path '/mnt/*' -not -path /.delegate-rootfs -print",
    )?;
    assert_eq!(left.trim(), "", "files left after purge");
    assert!(
        !c.sh("test -e /var/lib/delegate-upgrader || test -e /etc/delegate")?
            .ok()
    );
    elapsed("deb_install_setup_status_drain_remove_purge", start);
    Ok(())
}

/// Host-side release channel for the upgrader: keys, a release directory, a server.
struct Channel {
    dir: PathBuf,
    key: PathBuf,
    public: PathBuf,
    server: StaticServer,
}

fn release_tool() -> Result<std::process::Command> {
    Ok(std::process::Command::new(delegate_tests::bin(
        RELEASE_TOOL,
    )?))
}

impl Channel {
    fn new(root: &Path) -> Result<Channel> {
        let dir = root.join("releases");
        std::fs::create_dir_all(&dir)?;
        let keys = root.join("keys");
        let out = release_tool()?
            .args(["keygen", "--no-passphrase", "--out"])
            .arg(&keys)
            .output()?;
        if !out.status.success() {
            bail!("keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        let server = StaticServer::start(&dir)?;
        Ok(Channel {
            key: keys.join("delegate-release.key"),
            public: keys.join("delegate-release.pub"),
            dir,
            server,
        })
    }

    fn publish(&self, binary: &Path) -> Result<()> {
        let out = release_tool()?
            .args(["publish", "--channel", "stable", "--releases"])
            .arg(&self.dir)
            .arg("--binary")
            .arg(binary)
            .arg("--key")
            .arg(&self.key)
            .args(["--expires-in", "1h"])
            .output()?;
        if !out.status.success() {
            bail!("publish: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

/// Step 5: `systemctl start delegate-upgrader.service` upgrades a running agent through
/// systemd (drain, swap, `RestartUnit`, health gate) while a task runs, then rolls back a
/// release that cannot start and skips it.
#[test]
fn upgrader_service_upgrades_through_systemd_and_rolls_back_a_broken_release() -> Result<()> {
    let test = "upgrader_service_upgrades_through_systemd_and_rolls_back_a_broken_release";
    if skip(test) {
        return Ok(());
    }
    let start = Instant::now();
    let v2 = agent_v2()?;
    let w = world()?;
    let c = &w.c;
    let ch = Channel::new(w.tmp.path())?;
    ch.publish(&v2)?;

    c.run(&format!("apt-get install -y -q {}", deb()?))?;
    c.copy_in(&ch.public, "/etc/delegate/keys.d/release.pub", 0o644)?;
    c.write(
        "/etc/delegate/upgrader.toml",
        format!(
            "channel_url = \"{}\"\nchannel = \"stable\"\nenabled = true\ndrain_timeout = \"2m\"\nhealth_timeout = \"60s\"\nversion_check_user = \"nobody\"\n",
            ch.server.url
        )
        .as_bytes(),
        0o644,
    )?;
    w.setup("e2e-upgrader")?;
    let restarts = c.unit_property("delegate", "NRestarts")?;

    let id = w.submit("echo before; sleep 4; echo after")?;
    w.wait_running(&id)?;
    let up = c.sh_limit(
        "systemctl start delegate-upgrader.service",
        Duration::from_secs(300),
    )?;
    let upgrader_log = c.journal("delegate-upgrader");
    assert!(up.ok(), "{up:?}\n{upgrader_log}");
    w.assert_succeeded(&id, "after")?;
    assert_eq!(w.current()?, "versions/0.2.0");
    w.wait_connected()?;
    assert!(c.run("delegate status")?.contains("version:     0.2.0"));
    assert_eq!(
        c.unit_property("delegate", "NRestarts")?,
        restarts,
        "the agent restarted by itself:\n{}",
        c.journal("delegate")
    );
    let steps: Vec<String> = c
        .journal_json("delegate-upgrader")?
        .iter()
        .filter_map(|e| e["UPGRADE_STEP"].as_str().map(str::to_string))
        .collect();
    for n in 1..=7 {
        assert!(
            steps.contains(&n.to_string()),
            "no UPGRADE_STEP={n} in the journal (saw {steps:?}):\n{upgrader_log}"
        );
    }

    // A release that cannot start: health gate fails, RestartUnit goes back, 0.3.0 is
    // skipped from then on.
    let broken = fake_binary(&w.tmp.path().join("bin"), "0.3.0")?;
    ch.publish(&broken)?;
    let r = c.sh_limit(
        "systemctl start delegate-upgrader.service",
        Duration::from_secs(300),
    )?;
    assert!(
        !r.ok(),
        "the broken release must fail the upgrader run: {r:?}"
    );
    assert_eq!(
        c.unit_property("delegate-upgrader", "ExecMainStatus")?,
        "3",
        "rolled back:\n{}\nagent:\n{}",
        c.journal("delegate-upgrader"),
        c.journal("delegate")
    );
    assert_eq!(w.current()?, "versions/0.2.0");
    w.wait_connected()?;
    assert!(c.run("delegate status")?.contains("version:     0.2.0"));
    let status = c.run("delegate-upgrader status")?;
    assert!(status.contains("0.3.0"), "skip list: {status}");
    // The next timer run leaves the skipped release out and changes nothing, without
    // failing the unit (it failed hourly before).
    let again = c.sh_limit(
        "systemctl start delegate-upgrader.service",
        Duration::from_secs(300),
    )?;
    let log = c.journal("delegate-upgrader");
    assert!(again.ok(), "{again:?}\n{log}");
    assert_eq!(
        c.unit_property("delegate-upgrader", "ExecMainStatus")?,
        "0",
        "a skipped release is a notice, not a failure:\n{log}"
    );
    assert!(
        log.contains("skipped: the channel offers 0.3.0"),
        "the notice is in the journal:\n{log}"
    );
    assert_eq!(
        w.current()?,
        "versions/0.2.0",
        "a skipped release stays skipped"
    );
    elapsed(test, start);
    Ok(())
}

/// Step 6: a newer .deb moves `current` forward through a drain; an older one never moves
/// it back (and does not restart the agent).
#[test]
fn deb_upgrade_moves_current_forward_through_a_drain_and_never_back() -> Result<()> {
    let test = "deb_upgrade_moves_current_forward_through_a_drain_and_never_back";
    if skip(test) {
        return Ok(());
    }
    let start = Instant::now();
    let v2 = agent_v2()?;
    let w = world()?;
    let c = &w.c;
    let old = deb()?;
    // The 0.2.0 package: the same package with the 0.2.0 agent and version, rebuilt with
    // dpkg-deb inside the container.
    c.copy_in(&v2, "/root/v2/delegate", 0o755)?;
    c.run(&format!(
        "set -e; rm -rf /root/deb2; dpkg-deb -R {old} /root/deb2
         cp /root/v2/delegate /root/deb2/usr/bin/delegate
         sed -i 's/^Version: .*/Version: 0.2.0-1/' /root/deb2/DEBIAN/control
         cd /root/deb2 && find usr -type f -exec md5sum {{}} + > DEBIAN/md5sums
         dpkg-deb -Zgzip -z1 -b /root/deb2 /root/delegate_0.2.0-1_amd64.deb >/dev/null"
    ))?;

    c.run(&format!("apt-get install -y -q {old}"))?;
    w.setup("e2e-deb-upgrade")?;
    assert_eq!(w.current()?, "versions/0.1.0");

    let id = w.submit("echo before; sleep 4; echo after")?;
    w.wait_running(&id)?;
    let out = c.run("apt-get install -y -q /root/delegate_0.2.0-1_amd64.deb 2>&1")?;
    w.assert_succeeded(&id, "after")?;
    assert_eq!(w.current()?, "versions/0.2.0", "{out}");
    assert_eq!(
        c.run("readlink /var/lib/delegate-upgrader/previous")?
            .trim(),
        "versions/0.1.0"
    );
    w.wait_connected()?;
    assert!(c.run("delegate status")?.contains("version:     0.2.0"));
    let pid = c.unit_property("delegate", "MainPID")?;

    let out = c.run(&format!(
        "apt-get install -y -q --allow-downgrades {old} 2>&1"
    ))?;
    assert!(out.contains("never moved backward"), "{out}");
    assert_eq!(w.current()?, "versions/0.2.0");
    assert_eq!(c.unit_property("delegate", "MainPID")?, pid, "no restart");
    assert_eq!(
        c.run("dpkg-query -W -f '${Version}' delegate")?.trim(),
        "0.1.0-1"
    );
    elapsed(test, start);
    Ok(())
}

/// Step 8: the .rpm's scriptlets against a real systemd, installed with Debian's `rpm`
/// (`--nodeps`: this proves the scriptlets and file list, not dnf's dependency
/// resolution).
#[test]
fn rpm_scriptlets_install_configure_and_erase() -> Result<()> {
    let test = "rpm_scriptlets_install_configure_and_erase";
    if skip(test) {
        return Ok(());
    }
    let start = Instant::now();
    let rpm = format!("{PKG}/{}", package("delegate-0", ".rpm")?);
    let w = world()?;
    let c = &w.c;
    c.run(&format!("rpm --initdb && rpm -i --nodeps {rpm}"))?;
    assert!(
        c.run("getent passwd delegate")?
            .contains("/var/lib/delegate")
    );
    assert_eq!(w.current()?, "versions/0.1.0");
    assert_eq!(c.unit_property("delegate", "UnitFileState")?, "enabled");
    c.wait_until(
        Duration::from_secs(30),
        "the unconfigured agent to fail with 78",
        "systemctl show delegate -p ActiveState -p ExecMainStatus | sort | tr '\\n' ' ' | grep -qx 'ActiveState=failed ExecMainStatus=78 '",
    )?;
    w.setup("e2e-rpm")?;
    let id = w.submit("echo rpm task")?;
    w.assert_succeeded(&id, "rpm task")?;
    c.run("rpm -e delegate")?;
    assert_eq!(c.unit_property("delegate", "ActiveState")?, "inactive");
    assert!(
        !c.sh("test -e /usr/bin/delegate || test -e /usr/lib/systemd/system/delegate.service")?
            .ok()
    );
    elapsed(test, start);
    Ok(())
}

/// The manager's package: installed and started by its postinst under its own dynamic
/// user, serving on the address from /etc/default/delegate-manager, and its CLI works as
/// root on that host; purge removes its data.
#[test]
fn manager_deb_starts_serves_and_purges() -> Result<()> {
    let test = "manager_deb_starts_serves_and_purges";
    if skip(test) {
        return Ok(());
    }
    let start = Instant::now();
    let deb = format!("{PKG}/{}", package("delegate-manager_", ".deb")?);
    // A port nobody uses right now (the container shares the host's loopback).
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let c = Container::boot(&BootOptions {
        bind_ro: vec![(packages_dir(), PKG.into())],
    })?;
    c.write(
        "/etc/default/delegate-manager",
        format!("DELEGATE_MANAGER_ARGS=\"--listen 127.0.0.1:{port}\"\n").as_bytes(),
        0o644,
    )?;
    c.run(&format!("apt-get install -y -q {deb}"))?;
    assert_eq!(
        c.unit_property("delegate-manager", "UnitFileState")?,
        "enabled"
    );
    let server = format!("--server http://127.0.0.1:{port}");
    let token = c.wait_until(
        Duration::from_secs(30),
        "the manager to answer",
        &format!("delegate-manager {server} token create --name vm-1"),
    )?;
    assert!(token.trim().starts_with("dlg_"), "{token}");
    // DynamicUser=yes: a uid from systemd's dynamic range (61184–65519), not root.
    let uid: u32 = c
        .run("stat -c %u /proc/$(systemctl show delegate-manager -p MainPID --value)")?
        .trim()
        .parse()?;
    assert!((61184..=65519).contains(&uid), "runs as uid {uid}");
    c.run("apt-get purge -y -q delegate-manager")?;
    assert_eq!(
        c.unit_property("delegate-manager", "ActiveState")?,
        "inactive"
    );
    assert!(
        !c.sh("test -e /var/lib/private/delegate-manager || test -e /var/lib/delegate-manager")?
            .ok()
    );
    elapsed(test, start);
    Ok(())
}
