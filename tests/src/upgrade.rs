//! Test kit for the upgrader: a private `dbus-daemon`, a loopback static file server for
//! release directories, a process supervisor standing in for systemd, the agent built at a
//! second version, and a world that ties them together in one temp directory.
//!
//! Everything talks only to loopback and to the test's own bus; every wait is bounded.

use std::collections::HashSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::prereq::Missing;
use crate::{bin, wait_for};

/// A tool the upgrade tests run (`dbus-daemon`, `dbus-monitor`, `minisign`): answers
/// `version_arg`, or is [`Missing`] with the Debian/Ubuntu package to install. Take it with
/// [`require!`](crate::require) (skipped loudly here, a failure in CI).
pub fn require_tool(tool: &str, version_arg: &str, package: &str) -> Result<(), Missing> {
    let ok = Command::new(tool)
        .arg(version_arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err(Missing::absent(
            format!("`{tool}`"),
            format!("apt-get install {package}"),
        ));
    }
    Ok(())
}

/// `dbus-daemon` and `dbus-monitor` (package `dbus`), needed by every flow test.
pub fn require_dbus() -> Result<(), Missing> {
    require_tool("dbus-daemon", "--version", "dbus")?;
    require_tool("dbus-monitor", "--help", "dbus")
}

/// A private bus with a policy that allows everything, as the "system bus" of one test.
pub struct DBus {
    child: Option<Child>,
    pub address: String,
}

impl DBus {
    pub fn start(dir: &Path) -> Result<DBus> {
        fs::create_dir_all(dir)?;
        let sock = dir.join("bus.sock");
        let conf = dir.join("bus.conf");
        fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                sock.display()
            ),
        )?;
        let log = fs::File::create(dir.join("dbus.log"))?;
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn dbus-daemon")?;
        wait_for(Duration::from_secs(10), "dbus-daemon to listen", || {
            sock.exists().then_some(())
        })?;
        Ok(DBus {
            child: Some(child),
            address: format!("unix:path={}", sock.display()),
        })
    }
}

impl Drop for DBus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `dbus-monitor` on a test bus, its output collected line by line.
pub struct Monitor {
    child: Child,
    lines: Arc<Mutex<String>>,
}

impl Monitor {
    /// Start watching `rule` and return once the monitor is installed: dbus-monitor
    /// prints the `NameLost` of its own name when it becomes a monitor, so every message
    /// sent after this returns is seen.
    pub fn start(address: &str, rule: &str) -> Result<Monitor> {
        let mut child = Command::new("dbus-monitor")
            .args(["--address", address, rule])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn dbus-monitor")?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let lines = Arc::new(Mutex::new(String::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let mut m = Monitor { child, lines };
        m.wait_for(&["member=NameLost"], Duration::from_secs(10))
            .context("dbus-monitor did not become a monitor")?;
        Ok(m)
    }

    /// Wait until everything in `words` has been printed; the output so far.
    pub fn wait_for(&mut self, words: &[&str], limit: Duration) -> Result<String> {
        let lines = self.lines.clone();
        let mut last = String::new();
        wait_for(limit, &format!("dbus-monitor to print {words:?}"), || {
            last = lines.lock().map(|s| s.clone()).unwrap_or_default();
            words.iter().all(|w| last.contains(w)).then(|| last.clone())
        })
        .with_context(|| format!("dbus-monitor printed:\n{last}"))
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback HTTP/1.0 server for a release directory. Paths in `truncate` are answered
/// with their full `Content-Length` but only half the body (a connection that drops).
pub struct StaticServer {
    pub url: String,
    pub truncate: Arc<Mutex<HashSet<String>>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
}

impl StaticServer {
    pub fn start(root: &Path) -> Result<StaticServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let truncate = Arc::new(Mutex::new(HashSet::new()));
        let (root, stop2, trunc2) = (root.to_path_buf(), stop.clone(), truncate.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (root, trunc) = (root.clone(), trunc2.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(conn, &root, &trunc);
                });
            }
        });
        Ok(StaticServer {
            url: format!("http://{addr}"),
            truncate,
            stop,
            addr,
        })
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve_one(mut conn: TcpStream, root: &Path, truncate: &Mutex<HashSet<String>>) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Drain the headers.
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let rel = path.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        conn.write_all(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")?;
        return Ok(());
    }
    match fs::read(root.join(rel)) {
        Ok(body) => {
            let cut = truncate.lock().map(|t| t.contains(&path)).unwrap_or(false);
            write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            let n = if cut { body.len() / 2 } else { body.len() };
            conn.write_all(&body[..n])?;
        }
        Err(_) => {
            conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")?;
        }
    }
    conn.flush()?;
    Ok(())
}

/// The agent binary built at version 0.2.0 (`DELEGATE_VERSION_OVERRIDE`), in its own
/// target directory so it never replaces the workspace's `delegate`. Built once per test
/// binary; `DELEGATE_AGENT_V2` points at a prebuilt one instead.
pub fn agent_v2() -> Result<PathBuf> {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().map_err(|_| anyhow!("poisoned"))?;
    if let Some(p) = built.as_ref() {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("DELEGATE_AGENT_V2") {
        let p = PathBuf::from(p);
        *built = Some(p.clone());
        return Ok(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace dir"))?
        .to_path_buf();
    // Beside `debug/` in whatever target directory this test was built in (CI keeps a
    // warm one), so the 0.2.0 build is incremental across runs.
    let target = crate::bin_dir()
        .parent()
        .map(|t| t.join("upgrade-v2"))
        .unwrap_or_else(|| workspace.join("target").join("upgrade-v2"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let start = Instant::now();
    let out = Command::new(cargo)
        .current_dir(&workspace)
        .args([
            "build",
            "-p",
            "delegate",
            "--bin",
            "delegate",
            "--target-dir",
        ])
        .arg(&target)
        .env("DELEGATE_VERSION_OVERRIDE", "0.2.0")
        // Without debug info the binary is a fifth of the size: packing, hashing and
        // signing it in every test world is that much faster.
        .env("CARGO_PROFILE_DEV_DEBUG", "false")
        .env("CARGO_PROFILE_DEV_STRIP", "true")
        .stdin(Stdio::null())
        .output()
        .context("cargo build of the 0.2.0 agent")?;
    if !out.status.success() {
        bail!(
            "building the agent at 0.2.0 failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("built the 0.2.0 agent in {:?}", start.elapsed());
    let p = target.join("debug").join("delegate");
    *built = Some(p.clone());
    Ok(p)
}

/// A fake release binary: prints `version` for `version`, exits 1 for anything else (a
/// release that cannot start).
pub fn fake_binary(dir: &Path, version: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let p = dir.join(format!("fake-{version}"));
    write_executable(
        &p,
        format!(
            "#!/bin/sh\nif [ \"$1\" = version ]; then echo {version}; exit 0; fi\necho \"fake delegate {version}: cannot start\" >&2\nexit 1\n"
        )
        .as_bytes(),
    )?;
    Ok(p)
}

/// Write an executable the way one must be written before it is run while other threads
/// fork (tests run in parallel): to a temporary name, fsync, close, then rename into
/// place. Writing it in place left a window where a child forked by another test still
/// held the write descriptor when the binary was exec'd (`Text file busy`).
pub fn write_executable(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("bin"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    f.set_permissions(fs::Permissions::from_mode(0o755))?;
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("rename onto {}", path.display()))?;
    Ok(())
}

/// One host and its release infrastructure under a temp dir.
pub struct World {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub root: PathBuf,
    pub keys: PathBuf,
    pub secret_key: PathBuf,
    pub releases: PathBuf,
    pub config: PathBuf,
    pub supervisor_state: PathBuf,
    pub server: StaticServer,
    pub bus_address: String,
    /// Extra lines for upgrader.toml.
    pub extra: String,
}

/// What an upgrader run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// The `error[code]` the upgrader printed, if any.
    pub fn error_code(&self) -> Option<String> {
        let i = self.stderr.find("error[")? + "error[".len();
        let rest = &self.stderr[i..];
        Some(rest[..rest.find(']')?].to_string())
    }
}

impl World {
    /// Temp dirs (world-readable, so the `version` check can run as `nobody`), a signing
    /// key trusted by the host, an empty release directory served over loopback.
    pub fn new(bus_address: &str) -> Result<World> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_path_buf();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
        let keys = dir.join("keys.d");
        let releases = dir.join("releases");
        fs::create_dir_all(&releases)?;
        let server = StaticServer::start(&releases)?;
        let mut w = World {
            root: dir.join("root"),
            secret_key: dir.join("signing").join("delegate-release.key"),
            config: dir.join("upgrader.toml"),
            supervisor_state: dir.join("supervisor.json"),
            keys,
            releases,
            server,
            bus_address: bus_address.to_string(),
            extra: String::new(),
            dir,
            _tmp: tmp,
        };
        w.keygen("signing")?;
        fs::create_dir_all(&w.keys)?;
        fs::copy(
            w.dir.join("signing").join("delegate-release.pub"),
            w.keys.join("delegate-release.pub"),
        )?;
        w.write_config()?;
        Ok(w)
    }

    /// The suite's agents run without systemd, so they have no task units to hand over;
    /// it tests the `drain` mode by name (handover is tested on a booted systemd, in
    /// `tests/tests/systemd/units.rs`).
    pub fn write_config(&mut self) -> Result<()> {
        fs::write(
            &self.config,
            format!(
                "channel_url = {url:?}\nchannel = \"stable\"\nupgrade_mode = \"drain\"\ndrain_timeout = \"60s\"\nhealth_timeout = \"30s\"\nkeys_dir = {keys:?}\nroot = {root:?}\nsupervisor_state = {sup:?}\nmin_free_mb = 1\n{extra}\n",
                url = self.server.url,
                keys = self.keys.display().to_string(),
                root = self.root.display().to_string(),
                sup = self.supervisor_state.display().to_string(),
                extra = self.extra,
            ),
        )?;
        Ok(())
    }

    /// Replace `from` by `to` in upgrader.toml (which must contain `from`, so a test cannot
    /// silently change nothing); returns the text before, to put back.
    pub fn edit_config(&self, from: &str, to: &str) -> Result<String> {
        let before = fs::read_to_string(&self.config)?;
        if !before.contains(from) {
            bail!("{} has no {from:?}:\n{before}", self.config.display());
        }
        fs::write(&self.config, before.replace(from, to))?;
        Ok(before)
    }

    /// `delegate-release` (keygen, sign, publish), as on the machine that builds releases.
    fn release_tool(&self) -> Result<Command> {
        let mut c = Command::new(bin("delegate-release")?);
        c.current_dir(&self.dir)
            .env_remove("DELEGATE_KEY_PASSPHRASE")
            .stdin(Stdio::null());
        Ok(c)
    }

    fn tool(&self) -> Result<Command> {
        let mut c = Command::new(bin("delegate-upgrader")?);
        c.current_dir(&self.dir)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .env_remove("DELEGATE_UPGRADER_FAULT")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
        Ok(c)
    }

    /// `delegate-release keygen --no-passphrase --out <dir>/<sub>`.
    pub fn keygen(&self, sub: &str) -> Result<PathBuf> {
        let out = self
            .release_tool()?
            .args(["keygen", "--no-passphrase", "--out"])
            .arg(self.dir.join(sub))
            .output()?;
        if !out.status.success() {
            bail!("keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(self.dir.join(sub))
    }

    /// Publish `binary` on channel `stable` with the trusted key (or `key`).
    pub fn publish(&self, binary: &Path, key: Option<&Path>, expires_in: &str) -> Result<()> {
        let out = self
            .release_tool()?
            .args(["publish", "--channel", "stable", "--releases"])
            .arg(&self.releases)
            .arg("--binary")
            .arg(binary)
            .arg("--key")
            .arg(key.unwrap_or(&self.secret_key))
            .args(["--expires-in", expires_in])
            .output()?;
        if !out.status.success() {
            bail!("publish: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Re-sign a file of the release directory with the trusted key.
    pub fn resign(&self, rel: &str) -> Result<()> {
        let out = self
            .release_tool()?
            .args(["sign", "--key"])
            .arg(&self.secret_key)
            .arg(self.releases.join(rel))
            .output()?;
        if !out.status.success() {
            bail!("sign: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.releases.join("channels").join("stable.json")
    }

    pub fn manifest(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&fs::read(self.manifest_path())?)?)
    }

    /// Path (relative to the release dir) of the channel's only artifact.
    pub fn artifact_rel(&self) -> Result<String> {
        let m = self.manifest()?;
        let arts = m["artifacts"]
            .as_object()
            .ok_or_else(|| anyhow!("no artifacts"))?;
        let a = arts.values().next().ok_or_else(|| anyhow!("empty"))?;
        a["path"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no path"))
    }

    /// Install `binary` as version `v` the way the package does, and point `current` at it.
    pub fn install_initial(&self, binary: &Path, v: &str) -> Result<()> {
        let d = self.root.join("versions").join(v);
        fs::create_dir_all(&d)?;
        write_executable(&d.join("delegate"), &fs::read(binary)?)?;
        fs::write(d.join("complete"), format!("{v}\n"))?;
        let link = self.root.join("current");
        let _ = fs::remove_file(&link);
        symlink(Path::new("versions").join(v), link)?;
        Ok(())
    }

    pub fn current(&self) -> Option<String> {
        let t = fs::read_link(self.root.join("current")).ok()?;
        Some(t.file_name()?.to_string_lossy().into_owned())
    }

    pub fn is_complete(&self, v: &str) -> bool {
        let d = self.root.join("versions").join(v);
        d.join("complete").is_file() && d.join("delegate").is_file()
    }

    pub fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(&fs::read(
            self.root.join("state.json"),
        )?)?)
    }

    /// Run `delegate-upgrader <args>` (bounded by `limit`), with a fault point armed.
    pub fn upgrader(&self, args: &[&str], fault: Option<&str>, limit: Duration) -> Result<Run> {
        let mut c = self.tool()?;
        c.arg("--config").arg(&self.config).args(args);
        if let Some(f) = fault {
            c.env("DELEGATE_UPGRADER_FAULT", f);
        }
        let child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn delegate-upgrader")?;
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(limit) {
            Ok(out) => Ok(Run::from(out?)),
            Err(_) => {
                if let Ok(p) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
                }
                bail!("delegate-upgrader {args:?} did not finish within {limit:?}")
            }
        }
    }

    /// Spawn `delegate-upgrader <args>` without waiting.
    pub fn spawn_upgrader(&self, args: &[&str]) -> Result<Child> {
        let mut c = self.tool()?;
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(c.spawn()?)
    }

    /// Agent config for the supervised agent (`current/delegate run --config ...`).
    pub fn agent_config(&self, manager_url: &str, token: &str) -> Result<PathBuf> {
        let p = self.dir.join("delegate.toml");
        fs::write(
            &p,
            format!(
                "manager_url = {manager_url:?}\ntoken = {token:?}\nname = \"upgrade-agent\"\nconcurrency = 2\nstate_dir = {state:?}\ndrain_timeout = \"60s\"\nkill_grace = \"2s\"\nacquire_wait = \"5s\"\nlog_level = \"debug\"\n",
                state = self.dir.join("agent-state").display().to_string(),
            ),
        )?;
        Ok(p)
    }

    /// Start the supervisor ("systemd") running `<root>/current/delegate run`.
    pub fn start_supervisor(&self, agent_config: &Path) -> Result<Supervised> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let child = Command::new(bin("delegate-upgrader")?)
            .current_dir(&self.dir)
            .args(["supervise", "--state"])
            .arg(&self.supervisor_state)
            .arg("--")
            .arg(self.root.join("current").join("delegate"))
            .args(["run", "--config"])
            .arg(agent_config)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DELEGATE_TOKEN")
            .env_remove("DELEGATE_MANAGER_URL")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn supervisor")?;
        Ok(Supervised {
            child: Some(child),
            log: self.dir.join("agent.log"),
        })
    }

    /// `delegate status` against this world's bus.
    pub fn agent_status(&self) -> Result<String> {
        let out = Command::new(bin("delegate")?)
            .arg("status")
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
            .output()?;
        if !out.status.success() {
            bail!("delegate status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Wait until `delegate status` shows `version`, `running` and connected.
    pub fn wait_healthy(&self, version: &str, limit: Duration) -> Result<String> {
        let mut last = String::new();
        wait_for(
            limit,
            &format!("agent {version} running and connected"),
            || {
                let s = self.agent_status().unwrap_or_else(|e| e.to_string());
                let ok = s.contains(&format!("version:     {version}\n"))
                    && s.contains("state:       running\n")
                    && s.contains("connected:   true\n");
                last = s.clone();
                if !ok {
                    // `delegate status` is a process per poll: poll gently on 2 cores.
                    std::thread::sleep(Duration::from_millis(150));
                }
                ok.then_some(s)
            },
        )
        .with_context(|| format!("last status:\n{last}"))
    }
}

/// The running supervisor; SIGTERM on drop stops it and its agent.
pub struct Supervised {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Supervised {
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(p) = i32::try_from(c.id()) {
                let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
