//! Helpers for the docker tests: the engine `scripts/test` provides, private engines for
//! tests that must stop one, and the `docker` CLI to look at containers from outside.
//!
//! The tests need a real dockerd; `scripts/test` starts one (no bridge, no iptables) and
//! passes its socket in `DELEGATE_TEST_DOCKER_SOCKET`. Without it they follow the test
//! kit's prerequisite policy ([`crate::prereq`]): skipped loudly, or failed in CI.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::prereq::Missing;
use crate::wait_for;

/// The image `scripts/test` imports: a static busybox with links for sh, echo, sleep...
pub const TEST_IMAGE: &str = "delegate-test/busybox:1";

/// Socket of the test engine (`DELEGATE_TEST_DOCKER_SOCKET`), or what is missing: take it
/// with [`require!`](crate::require). `scripts/test --fast` leaves the docker tests out.
pub fn test_socket() -> Result<PathBuf, Missing> {
    crate::prereq::service("a Docker engine", || {
        match std::env::var_os("DELEGATE_TEST_DOCKER_SOCKET") {
            Some(s) if !s.is_empty() => Ok(PathBuf::from(s)),
            _ => Err(Missing::absent(
                "a Docker engine (DELEGATE_TEST_DOCKER_SOCKET is not set)",
                "install docker.io and busybox-static and run through scripts/test, which starts a dockerd and imports the test image; or set DELEGATE_TEST_DOCKER_SOCKET to an engine holding delegate-test/busybox:1 (docs/testing.md, \"Docker\")",
            )),
        }
    })
}

/// Can a test start a [`PrivateEngine`] here: `dockerd` installed, run as root, a static
/// busybox for the test image? `scripts/test --fast` leaves these tests out too.
pub fn private_engines() -> Result<(), Missing> {
    crate::prereq::service("a Docker engine", || {
        let busybox = std::env::var_os("DELEGATE_TEST_BUSYBOX")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
        if !crate::on_path("dockerd") {
            Err(Missing::absent("`dockerd`", "apt-get install docker.io"))
        } else if !nix::unistd::geteuid().is_root() {
            Err(Missing::absent(
                "root (a private dockerd needs it)",
                "run the docker tests as root, as scripts/test in CI does",
            ))
        } else if !busybox.exists() {
            Err(Missing::absent(
                format!("a static busybox at {}", busybox.display()),
                "apt-get install busybox-static (or set DELEGATE_TEST_BUSYBOX)",
            ))
        } else {
            Ok(())
        }
    })
}

/// Lines for delegate.toml that point the agent at `socket`.
pub fn agent_config(socket: &Path) -> String {
    format!("[docker]\nsocket = {:?}\n", socket.display().to_string())
}

/// Run the docker CLI against `socket`; stdout on success.
pub fn cli(socket: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .context("run the docker CLI")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ids of all containers (running or not) of a task.
pub fn task_containers(socket: &Path, task_id: &str) -> Result<Vec<String>> {
    let filter = format!("label=dev.delegate.task-id={task_id}");
    let out = cli(socket, &["ps", "-a", "-q", "--filter", &filter])?;
    Ok(out.split_whitespace().map(str::to_string).collect())
}

/// Import the test image into the engine at `socket` from a static busybox.
pub fn import_test_image(socket: &Path) -> Result<()> {
    if cli(socket, &["image", "inspect", TEST_IMAGE]).is_ok() {
        return Ok(());
    }
    let busybox = std::env::var_os("DELEGATE_TEST_BUSYBOX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"));
    let root = tempfile::tempdir()?;
    let bin = root.path().join("bin");
    fs::create_dir_all(&bin)?;
    fs::copy(&busybox, bin.join("busybox"))
        .with_context(|| format!("copy {}", busybox.display()))?;
    for l in ["sh", "echo", "sleep", "cat", "seq", "true", "false"] {
        std::os::unix::fs::symlink("busybox", bin.join(l))?;
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(root.path())
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    let st = Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", socket.display()))
        .args(["import", "-", TEST_IMAGE])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()
        .context("docker import")?;
    if !st.success() {
        bail!("docker import of the test image failed");
    }
    Ok(())
}

/// A dockerd of a test's own (for tests that stop the engine), with the safe flags only:
/// no bridge, no iptables, no forwarding or masquerading.
pub struct PrivateEngine {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl PrivateEngine {
    /// Start an engine with its state under `dir` (short: socket paths are limited) and
    /// import the test image into it.
    pub fn start(dir: &Path) -> Result<PrivateEngine> {
        fs::create_dir_all(dir)?;
        let mut e = PrivateEngine {
            dir: dir.to_path_buf(),
            socket: dir.join("d.sock"),
            child: None,
        };
        e.resume()?;
        import_test_image(&e.socket)?;
        Ok(e)
    }

    /// Start the engine again on the same state.
    pub fn resume(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let d = &self.dir;
        let child = Command::new("dockerd")
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip-forward=false",
                "--ip-masq=false",
            ])
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn dockerd (install docker.io)")?;
        self.child = Some(child);
        let socket = self.socket.clone();
        wait_for(Duration::from_secs(30), "the private dockerd", || {
            cli(&socket, &["version"]).ok().map(|_| ())
        })
    }

    /// SIGTERM the engine and wait for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            wait_for(Duration::from_secs(30), "dockerd to exit", || {
                c.try_wait().ok().flatten()
            })?;
        }
        Ok(())
    }
}

impl Drop for PrivateEngine {
    fn drop(&mut self) {
        let _ = self.stop();
        // Unmount what a stopped engine may leave, so the temp dir can go.
        if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
            let prefix = self.dir.display().to_string();
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC time as docker prints it
/// (`2024-05-01T12:00:00.123456789Z`).
pub fn rfc3339_millis(s: &str) -> Option<i64> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}").get(..3)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + h) * 60 + min) * 60_000 + sec * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_times_parse_to_epoch_millis() {
        assert_eq!(rfc3339_millis("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_millis("2024-03-01T12:34:56.789123456Z"),
            Some(1_709_296_496_789)
        );
    }
}
