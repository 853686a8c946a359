//! Test kit for end-to-end tests on a real systemd: boot a Debian container with
//! `systemd-nspawn`, run commands inside it, copy files in, and always stop it.
//!
//! systemd is not PID 1 on the test machines, but a Debian rootfs booted by nspawn has a
//! real systemd, journald and system D-Bus. The rootfs is built once by `scripts/rootfs`
//! (cached under /var/cache/delegate-ci) and never written: each container boots a
//! throw-away overlay of it (`--volatile=overlay`), so every test starts from a clean tree
//! in about a second. Without `--private-network` the container shares the host's network
//! namespace, so a manager on the host's 127.0.0.1 is reachable from inside; the tests
//! only ever use loopback.
//!
//! Each container gets a cgroup of its own in the host's cgroup2 hierarchy. nspawn, with no
//! systemd on the host to ask (`--keep-unit`), moves itself to `supervisor` and the
//! container to `payload` under the cgroup it was started in: containers started from the
//! same cgroup would share one `payload`, where each one's systemd creates, kills and
//! removes `system.slice/<unit>` of the others. That made a unit's restart fail now and then
//! (`Failed to kill control group … Input/output error`, then 219/CGROUP) while another
//! test's container ran the same unit.
//!
//! Commands run through `nsenter -t <container's PID 1> -a` with an empty environment.
//! [`Container`] powers the container off when dropped, also when a test fails, and kills
//! it by PID if it does not stop in time.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::prereq::Missing;
use crate::{on_path, wait_for};

/// PATH inside the container.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The workspace root (for `scripts/` and `target/packages`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Can this machine boot containers: root, `systemd-nspawn` and `debootstrap` (or a
/// rootfs in `DELEGATE_ROOTFS`)? Take it with [`require!`](crate::require): without them
/// the booted-systemd tests skip loudly, or fail under `DELEGATE_E2E_REQUIRED=1` (CI).
pub fn can_boot() -> Result<(), Missing> {
    if !nix::unistd::geteuid().is_root() {
        Err(Missing::absent(
            "root (booting a container needs it)",
            "run the systemd e2e tests as root",
        ))
    } else if !on_path("systemd-nspawn") {
        Err(Missing::absent(
            "`systemd-nspawn`",
            "apt-get install systemd-container",
        ))
    } else if !on_path("debootstrap") && std::env::var_os("DELEGATE_ROOTFS").is_none() {
        Err(Missing::absent(
            "`debootstrap` (to build the rootfs)",
            "apt-get install debootstrap, or set DELEGATE_ROOTFS to a Debian rootfs",
        ))
    } else {
        Ok(())
    }
}

/// The cached Debian rootfs (built by `scripts/rootfs` on first use; it takes a lock, so
/// parallel tests build it once).
pub fn rootfs() -> Result<PathBuf> {
    let out = Command::new(workspace().join("scripts/rootfs"))
        .stdin(Stdio::null())
        .output()
        .context("run scripts/rootfs")?;
    if !out.status.success() {
        bail!(
            "scripts/rootfs failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

/// What to boot.
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// Host directories bound read-only into the container: (host, container path).
    pub bind_ro: Vec<(PathBuf, String)>,
}

/// Output of a command run inside the container.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status == Some(0)
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            status: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// A booted container. Dropping it powers it off (and kills it if that hangs).
pub struct Container {
    nspawn: Option<Child>,
    /// Host PID of the container's systemd (its PID 1).
    pub leader: u32,
    pub name: String,
    /// nspawn's console output (the boot log), for failure messages.
    pub console: PathBuf,
    /// Removed once the container is stopped (fields drop after `Drop::drop`).
    _cgroup: OwnCgroup,
    _dir: tempfile::TempDir,
}

/// The cgroup2 directory one container runs under (see the module doc).
struct OwnCgroup {
    path: PathBuf,
}

impl OwnCgroup {
    /// `<cgroup2 mount>/<this process's cgroup>/<name>`.
    fn create(name: &str) -> Result<OwnCgroup> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        // Fields: id parent major:minor root mount-point options... - fstype source opts
        let mount = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == "cgroup2")
                    .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .context("no cgroup2 hierarchy is mounted (see /proc/self/mountinfo)")?;
        let own = fs::read_to_string("/proc/self/cgroup")?
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .context("this process has no cgroup2 path in /proc/self/cgroup")?;
        let path = mount.join(own.trim_start_matches('/')).join(name);
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(OwnCgroup { path })
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // Deepest first; a cgroup whose last process is still being reaped refuses for a
        // moment.
        let start = Instant::now();
        while self.path.exists() && start.elapsed() < Duration::from_secs(5) {
            remove_cgroup_tree(&self.path);
            if self.path.exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

impl Container {
    /// Boot an overlay of the cached rootfs and wait until systemd has finished booting.
    pub fn boot(opts: &BootOptions) -> Result<Container> {
        let rootfs = rootfs()?;
        let dir = tempfile::Builder::new()
            .prefix("delegate-nspawn-")
            .tempdir()?;
        let console = dir.path().join("console.log");
        let name = format!(
            "delegate-e2e-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().replace("delegate-nspawn-", ""))
                .unwrap_or_default()
        );
        let cgroup = OwnCgroup::create(&name)?;
        // A shell moves itself into the cgroup (`echo 0`: the writer), then becomes nspawn.
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("echo 0 > \"$1\" && shift && exec \"$@\"")
            .arg("sh")
            .arg(cgroup.path.join("cgroup.procs"))
            .arg("systemd-nspawn");
        cmd.arg("-D")
            .arg(&rootfs)
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
            ])
            .arg(format!("--machine={name}"))
            .arg("--console=passive");
        for (host, inside) in &opts.bind_ro {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let log = fs::File::create(&console)?;
        let child = cmd
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn systemd-nspawn in its own cgroup")?;
        let nspawn_pid = child.id();
        let mut c = Container {
            nspawn: Some(child),
            leader: 0,
            name,
            console,
            _cgroup: cgroup,
            _dir: dir,
        };
        c.leader = wait_for(Duration::from_secs(30), "the container's PID 1", || {
            container_init(nspawn_pid)
        })
        .with_context(|| c.console_tail())?;
        // `is-system-running --wait` returns once boot is over (running or degraded); it
        // fails at once while PID 1 is not systemd yet, so ask again.
        let booted = c.wait_until(
            Duration::from_secs(120),
            "the container to boot",
            "state=$(systemctl is-system-running --wait); echo $state; [ \"$state\" = running ] || [ \"$state\" = degraded ]",
        );
        if let Err(e) = booted {
            return Err(e.context(c.console_tail()));
        }
        Ok(c)
    }

    /// The end of the console log.
    pub fn console_tail(&self) -> String {
        let text = fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!("console of {}:\n{}", self.name, lines[from..].join("\n"))
    }

    fn nsenter(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.leader.to_string())
            .args(["-a", "--", "/usr/bin/env", "-i"])
            .arg(format!("PATH={PATH}"))
            .args([
                "LANG=C.UTF-8",
                "DEBIAN_FRONTEND=noninteractive",
                "SYSTEMD_PAGER=",
            ])
            .env_clear();
        cmd
    }

    /// Run a shell script inside, as root, with a time limit; any exit status.
    pub fn sh_limit(&self, script: &str, limit: Duration) -> Result<Run> {
        let mut child = self
            .nsenter()
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nsenter")?;
        // Read both pipes on threads so a chatty command cannot block on a full pipe.
        let mut out = child.stdout.take();
        let mut err = child.stderr.take();
        let t_out = std::thread::spawn(move || read_all(out.as_mut()));
        let t_err = std::thread::spawn(move || read_all(err.as_mut()));
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let run = Run {
            status: status.and_then(|s| s.code()),
            stdout: t_out.join().unwrap_or_default(),
            stderr: t_err.join().unwrap_or_default(),
        };
        if status.is_none() {
            bail!(
                "`{script}` in {} took longer than {limit:?}: {run:?}",
                self.name
            );
        }
        Ok(run)
    }

    /// Run a shell script inside (at most 2 minutes); any exit status.
    pub fn sh(&self, script: &str) -> Result<Run> {
        self.sh_limit(script, Duration::from_secs(120))
    }

    /// Run a shell script inside; it must exit 0. Returns its stdout.
    pub fn run(&self, script: &str) -> Result<String> {
        let r = self.sh(script)?;
        if !r.ok() {
            bail!(
                "`{script}` in {} exited {:?}\nstdout: {}\nstderr: {}",
                self.name,
                r.status,
                r.stdout,
                r.stderr
            );
        }
        Ok(r.stdout)
    }

    /// Poll `script` until it exits 0 (at most `limit`); returns its stdout.
    pub fn wait_until(&self, limit: Duration, what: &str, script: &str) -> Result<String> {
        let mut last = None;
        let found = wait_for(limit, what, || {
            let r = self.sh_limit(script, Duration::from_secs(30)).ok()?;
            let ok = r.ok();
            let out = r.stdout.clone();
            last = Some(r);
            ok.then_some(out)
        });
        found.with_context(|| format!("last try of `{script}`: {last:?}"))
    }

    /// Copy a host file to `dest` inside, with `mode`.
    pub fn copy_in(&self, host: &Path, dest: &str, mode: u32) -> Result<()> {
        let bytes = fs::read(host).with_context(|| host.display().to_string())?;
        self.write(dest, &bytes, mode)
    }

    /// Write `bytes` to `dest` inside (parent directories are made), with `mode`.
    pub fn write(&self, dest: &str, bytes: &[u8], mode: u32) -> Result<()> {
        let script = format!(
            "mkdir -p \"$(dirname '{dest}')\" && cat > '{dest}' && chmod {mode:o} '{dest}'"
        );
        let mut child = self
            .nsenter()
            .args(["/bin/sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nsenter")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(bytes).context("write into the container")?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "copy to {dest} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The unit's journal, as `journalctl -o cat` prints it.
    pub fn journal(&self, unit: &str) -> String {
        self.sh(&format!("journalctl -q --no-pager -o cat -u {unit}"))
            .map(|r| r.stdout)
            .unwrap_or_default()
    }

    /// The unit's journal entries as JSON objects.
    pub fn journal_json(&self, unit: &str) -> Result<Vec<serde_json::Value>> {
        let out = self.run(&format!("journalctl -q --no-pager -o json -u {unit}"))?;
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }

    /// `systemctl show UNIT -p PROP --value`.
    pub fn unit_property(&self, unit: &str, prop: &str) -> Result<String> {
        Ok(self
            .run(&format!("systemctl show {unit} -p {prop} --value"))?
            .trim()
            .to_string())
    }

    /// Power off (`systemctl poweroff` inside), then kill by PID what is left.
    pub fn stop(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if self.leader != 0 {
            let _ = self
                .nsenter()
                .args(["systemctl", "poweroff", "--no-block"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Killing the container's PID 1 ends every process in its PID namespace.
        if let Ok(pid) = i32::try_from(self.leader)
            && pid > 1
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = nspawn.kill();
        let _ = nspawn.wait();
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_all(r: Option<&mut impl std::io::Read>) -> String {
    let mut buf = Vec::new();
    if let Some(r) = r {
        let _ = r.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The container's PID 1: nspawn's child that is PID 1 in its own PID namespace.
fn container_init(nspawn_pid: u32) -> Option<u32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .map(str::to_string)
        };
        let ppid = field("PPid:").and_then(|p| p.parse::<u32>().ok());
        let nspid = field("NSpid:").unwrap_or_default();
        let ids: Vec<&str> = nspid.split_whitespace().collect();
        if ppid == Some(nspawn_pid) && ids.len() >= 2 && ids.last() == Some(&"1") {
            return Some(pid);
        }
    }
    None
}
