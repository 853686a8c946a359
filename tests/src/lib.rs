//! Test kit: start the real `delegate-manager` and `delegate` binaries on loopback, talk
//! to the manager's HTTP API, and tear everything down.
//!
//! Shared by the workspace integration tests (`tests/tests/it`) and the benchmark
//! (`delegate-bench`), so both measure and check the very same processes an operator runs.
//! Every world a test builds lives in its own temp directory with OS-picked ports, so tests
//! run in parallel and leave nothing behind.

#![forbid(unsafe_code)]

pub mod docker;
pub mod kube;
pub mod nspawn;
pub mod postgres;
pub mod prereq;
pub mod tls;
pub mod upgrade;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use delegate_protocol::{DelegateView, TaskState, TaskView};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// Directory holding the workspace's built binaries (next to the running test or bench).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DELEGATE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary; fails with a hint when it was not built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which scripts/test does)",
            p.display()
        );
    }
    Ok(p)
}

/// Is `name` an executable file in a directory of `PATH`?
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
}

/// Poll `f` every 20 ms until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send_signal(child: &Child, sig: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// A running `delegate-manager serve`.
pub struct Manager {
    child: Option<Child>,
    pub data: PathBuf,
    pub addr: String,
    pub admin_token: String,
    log: PathBuf,
    http: reqwest::blocking::Client,
    /// `https` when started with [`Manager::start_tls`].
    scheme: &'static str,
}

impl Manager {
    /// Start a manager with a fresh data directory under `root`.
    pub fn start(root: &Path) -> Result<Manager> {
        Self::start_with(root, "127.0.0.1:0", &[])
    }

    /// Start (or restart) on `listen` with the data directory `root/manager`.
    pub fn start_with(root: &Path, listen: &str, extra: &[&str]) -> Result<Manager> {
        let data = root.join("manager");
        let log = root.join("manager.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .context("manager log")?;
        let start_len = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let child = Command::new(bin("delegate-manager")?)
            .args(["serve", "--listen", listen, "--data"])
            .arg(&data)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("spawn delegate-manager")?;
        let addr = wait_for(Duration::from_secs(20), "the manager to listen", || {
            let text = fs::read_to_string(&log).ok()?;
            let text = text.get(usize::try_from(start_len).ok()?..)?;
            let line = text.lines().find(|l| l.contains("listening on "))?;
            let addr = line
                .split("listening on ")
                .nth(1)?
                .split_whitespace()
                .next()?;
            Some(addr.to_string())
        })?;
        let admin_token = fs::read_to_string(data.join("admin.token"))
            .context("admin.token")?
            .trim()
            .to_string();
        Ok(Manager {
            child: Some(child),
            data,
            addr,
            admin_token,
            log,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            scheme: "http",
        })
    }

    /// Start serving HTTPS with the server certificate of `pki`; this handle's own
    /// requests trust `pki`'s CA, and [`Manager::url`] is `https://`.
    pub fn start_tls(root: &Path, pki: &tls::TestPki) -> Result<Manager> {
        let arg = |p: &Path| p.to_str().map(str::to_string).context("non-UTF-8 path");
        let (cert, key) = (arg(&pki.server_cert)?, arg(&pki.server_key)?);
        let mut m = Self::start_with(
            root,
            "127.0.0.1:0",
            &["--tls-cert", &cert, "--tls-key", &key],
        )?;
        let ca = reqwest::Certificate::from_pem(&fs::read(&pki.ca_cert)?)?;
        m.http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .tls_certs_merge([ca])
            .build()?;
        m.scheme = "https";
        Ok(m)
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Process id while it runs (for RSS and CPU readings).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            send_signal(&c, Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Run the manager CLI against this server; returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> Result<(ExitStatus, String, String)> {
        let out = Command::new(bin("delegate-manager")?)
            .args(["--server", &self.url(), "--admin-token", &self.admin_token])
            .args(args)
            .output()
            .context("run delegate-manager CLI")?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// A new delegate token.
    pub fn token(&self, name: &str) -> Result<String> {
        let v = self.post("/api/v1/tokens", &json!({ "name": name }))?;
        v["token"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no token in {v}"))
    }

    fn send(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Vec<u8>)> {
        let method = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url()))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().with_context(|| path.to_string())?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes()?.to_vec()))
    }

    fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Vec<u8>)> {
        self.send(
            method,
            path,
            body.map(|b| serde_json::to_vec(b).unwrap_or_default()),
        )
    }

    /// POST JSON to a user endpoint; non-2xx is an error carrying the body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let (status, bytes) = self.req("POST", path, Some(body))?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            bail!("POST {path} → {status}: {v}");
        }
        Ok(v)
    }

    /// POST raw bytes and return status and JSON body, without judging the status.
    pub fn post_raw(&self, path: &str, body: Vec<u8>) -> Result<(u16, Value)> {
        let (status, bytes) = self.send("POST", path, Some(body))?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    pub fn get(&self, path: &str) -> Result<Vec<u8>> {
        let (status, bytes) = self.req("GET", path, None)?;
        if !(200..300).contains(&status) {
            bail!("GET {path} → {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(bytes)
    }

    /// Submit a task (kind + spec + options as JSON); returns its id.
    pub fn submit(&self, task: &Value) -> Result<String> {
        let v = self.post("/api/v1/tasks", task)?;
        v["task_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no task_id in {v}"))
    }

    /// Submit a shell script with no selectors.
    pub fn submit_shell(&self, script: &str, timeout_secs: u64, retries: u32) -> Result<String> {
        self.submit(&json!({
            "kind": "shell",
            "spec": { "script": script },
            "timeout_secs": timeout_secs,
            "retries": retries,
        }))
    }

    pub fn task(&self, id: &str) -> Result<TaskView> {
        Ok(serde_json::from_slice(
            &self.get(&format!("/api/v1/tasks/{id}"))?,
        )?)
    }

    pub fn logs(&self, id: &str) -> Result<Vec<u8>> {
        self.get(&format!("/api/v1/tasks/{id}/logs"))
    }

    pub fn cancel(&self, id: &str) -> Result<Value> {
        self.post(&format!("/api/v1/tasks/{id}/cancel"), &json!({}))
    }

    pub fn delegates(&self) -> Result<Vec<DelegateView>> {
        Ok(serde_json::from_slice(&self.get("/api/v1/delegates")?)?)
    }

    /// Wait until the task is in one of `states`.
    pub fn wait_state(&self, id: &str, states: &[TaskState], limit: Duration) -> Result<TaskView> {
        let mut last = None;
        let found = wait_for(limit, &format!("task {id} to reach {states:?}"), || {
            let t = self.task(id).ok()?;
            let hit = states.contains(&t.state);
            last = Some(t.clone());
            hit.then_some(t)
        });
        found.with_context(|| format!("last seen: {last:?}"))
    }

    /// Wait until the task is finished.
    pub fn wait_done(&self, id: &str, limit: Duration) -> Result<TaskView> {
        let terminal: Vec<TaskState> = TaskState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        self.wait_state(id, &terminal, limit)
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Options for an agent under test.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub name: String,
    pub concurrency: u32,
    pub tags: Vec<String>,
    pub drain_timeout: &'static str,
    pub kill_grace: &'static str,
    pub acquire_wait: &'static str,
    /// Extra lines appended to delegate.toml.
    pub extra: String,
    /// `RUST_LOG` of the agent: the agent's own debug lines, not hyper's.
    pub log_filter: &'static str,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            name: "agent-1".into(),
            concurrency: 4,
            tags: vec![],
            drain_timeout: "30s",
            kill_grace: "2s",
            acquire_wait: "30s",
            extra: String::new(),
            log_filter: "info,delegate=debug",
        }
    }
}

/// A running `delegate run`.
pub struct Agent {
    child: Option<Child>,
    log_filter: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Write a config under `root/<name>/` and start the agent with it.
    pub fn start(
        root: &Path,
        manager_url: &str,
        token: &str,
        opts: &AgentOptions,
    ) -> Result<Agent> {
        let dir = root.join(&opts.name);
        fs::create_dir_all(&dir)?;
        let config = dir.join("delegate.toml");
        let tags: Vec<String> = opts.tags.iter().map(|t| format!("{t:?}")).collect();
        let mut f = fs::File::create(&config)?;
        write!(
            f,
            "manager_url = {manager_url:?}\ntoken = {token:?}\nname = {name:?}\ntags = [{tags}]\nconcurrency = {c}\nstate_dir = {state:?}\ndrain_timeout = {dt:?}\nkill_grace = {kg:?}\nacquire_wait = {aw:?}\n{extra}\n",
            name = opts.name,
            tags = tags.join(", "),
            c = opts.concurrency,
            state = dir.join("state").display().to_string(),
            dt = opts.drain_timeout,
            kg = opts.kill_grace,
            aw = opts.acquire_wait,
            extra = opts.extra,
        )?;
        Self::start_config(&dir, &config, opts.log_filter)
    }

    /// Start an agent on an existing config (restarts reuse it and its state).
    pub fn start_config(dir: &Path, config: &Path, log_filter: &str) -> Result<Agent> {
        let log = dir.join("agent.log");
        let log_file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(bin("delegate")?)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("JOURNAL_STREAM")
            .env_remove("INVOCATION_ID")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DELEGATE_TOKEN")
            .env_remove("DELEGATE_MANAGER_URL")
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("spawn delegate")?;
        Ok(Agent {
            child: Some(child),
            log_filter: log_filter.to_string(),
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log,
        })
    }

    /// Start again with the same config and state directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let mut again = Self::start_config(&self.dir, &self.config, &self.log_filter)?;
        self.child = again.child.take();
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the agent's log to contain `needle`.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> Result<()> {
        wait_for(limit, &format!("agent log line {needle:?}"), || {
            self.log_text().contains(needle).then_some(())
        })
        .with_context(|| format!("agent log:\n{}", self.log_text()))
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(c) = &self.child {
            send_signal(c, sig);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            send_signal(&c, Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Wait for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("agent not running"))?;
        let st = wait_for(limit, "the agent to exit", || {
            child.try_wait().ok().flatten()
        })?;
        self.child = None;
        Ok(st)
    }

    /// User+system CPU time of the agent so far, in clock ticks.
    pub fn cpu_ticks(&self) -> Result<u64> {
        let pid = self.pid().ok_or_else(|| anyhow!("agent not running"))?;
        proc_cpu_ticks(pid)
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.pid().ok_or_else(|| anyhow!("agent not running"))?;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| anyhow!("no VmRSS for {pid}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))
}

/// utime + stime of a process, in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = f.get(11).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    let stime: u64 = f.get(12).ok_or_else(|| anyhow!("short stat"))?.parse()?;
    Ok(utime + stime)
}

/// Is any process with this exact command line still alive?
pub fn process_with_cmdline(needle: &str) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        fs::read(e.path().join("cmdline"))
            .map(|c| {
                let s: String = c
                    .iter()
                    .map(|b| if *b == 0 { ' ' } else { *b as char })
                    .collect();
                s.contains(needle)
            })
            .unwrap_or(false)
    })
}
