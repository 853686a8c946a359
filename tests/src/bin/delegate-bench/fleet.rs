//! `delegate-bench fleet`: one real manager and N simulated delegates on loopback. It lives
//! beside the bench's `main.rs` because nothing else runs it.
//!
//! The manager has to serve thousands of delegates; a real agent per delegate would cost a
//! process and ~9 MiB each, so this module speaks protocol v1 itself with one light client:
//! every simulated delegate is two tokio tasks (acquire loop, heartbeat loop) sharing one
//! HTTP connection pool. On the wire it does what the agent does — register with a token the
//! manager's CLI made, heartbeat at the interval the manager asks for, long-poll
//! `acquire?wait=30&max=1`, report `started` and a result for what it leases — so the
//! numbers are the manager's, not an agent's or a shell's.
//!
//! Every phase is bounded in count and time, and everything talks to 127.0.0.1 only.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use delegate_protocol::{
    AcquireResponse, DelegateState, HeartbeatRequest, Outcome, RegisterRequest, RegisterResponse,
    TaskResult,
};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc, watch};

use delegate_tests::{Manager, proc_cpu_ticks, proc_status_kib};

/// Delegates registering at the same time (a fleet starting all at once would only
/// measure the accept queue).
const REGISTER_CONCURRENCY: usize = 64;
/// Submissions in flight during the burst.
const BURST_SUBMITTERS: usize = 64;
/// Tasks submitted one at a time before the measured ones.
const WARM_UP_TASKS: usize = 10;
/// Delegates per token the CLI creates (tokens are per account, not per host).
const DELEGATES_PER_TOKEN: usize = 1000;
/// The long poll every simulated delegate asks for, as the agent does by default.
const ACQUIRE_WAIT_SECS: u64 = 30;
/// A pick-up slower than this counts as missed; the phase goes on with the next task.
const PICK_UP_LIMIT: Duration = Duration::from_secs(10);
/// File descriptors kept for everything but the delegates' connections.
const FD_MARGIN: u64 = 256;
/// Selector of the task that writes the big log; only the log writer has the tag.
const LOG_TAG: &str = "fleet-log";
const LOG_CHUNK: usize = delegate_protocol::MAX_LOG_CHUNK_BYTES;

/// What to measure; see `delegate-bench fleet --help`.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub delegates: usize,
    pub tasks: usize,
    pub burst: usize,
    pub idle_secs: u64,
    /// Serve one log of this many bytes after the other phases (0: skip).
    pub log_bytes: u64,
    /// Upper bound on the whole run.
    pub limit: Duration,
    /// Two manager nodes on one PostgreSQL (started for the run) instead of one on
    /// SQLite: the delegates alternate between the nodes, tasks are submitted to the first.
    pub postgres: bool,
}

/// What a simulated delegate tells the bench.
enum Event {
    /// A delegate holds the task (its acquire answered with it).
    Picked(String, Instant),
    /// The task's result was stored.
    Done(String),
}

#[derive(Default)]
struct Counters {
    registered: AtomicUsize,
    polling: AtomicUsize,
    errors: AtomicU64,
    heartbeats: AtomicU64,
    /// Heartbeat round trips: (when it was sent, milliseconds).
    heartbeat_rtt: Mutex<Vec<(Instant, f64)>>,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(what);
        }
    }

    fn heartbeat_ms(&self, from: Instant, to: Instant) -> Vec<f64> {
        let all = self
            .heartbeat_rtt
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let mut v: Vec<f64> = all
            .into_iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, ms)| ms)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
}

/// One simulated delegate's fixed facts.
struct Sim {
    name: String,
    token: String,
    tags: Vec<String>,
    base: String,
    http: reqwest::Client,
    counters: Arc<Counters>,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
    /// Bytes of log to write for every task it leases (the log writer only).
    log_bytes: u64,
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// `p50 …, p99 … (n)` of heartbeat round trips, or `none` when no heartbeat fell in a
/// phase (phases shorter than the heartbeat interval with few delegates).
fn hb_summary(sorted: &[f64]) -> String {
    if sorted.is_empty() {
        return "none sent".into();
    }
    format!(
        "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} of them)",
        percentile(sorted, 0.5),
        percentile(sorted, 0.99),
        percentile(sorted, 1.0),
        sorted.len()
    )
}

/// Raise the soft open-files limit to the hard one (the manager, started after, inherits
/// it). Returns the limit now in force.
pub fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(hard)
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as f64)
        .unwrap_or(100.0)
}

/// Run the fleet benchmark and print its numbers.
pub fn run(opts: &FleetOptions) -> Result<()> {
    let started = Instant::now();
    let nofile = raise_nofile()?;
    // Each delegate holds one connection at the client and one at the manager (a
    // heartbeat borrows a second for a moment); both processes have this limit.
    let fit = nofile.saturating_sub(FD_MARGIN) as usize;
    println!(
        "fleet: open-files limit {nofile} (soft raised to hard) → at most about {fit} delegates"
    );
    if opts.delegates > fit {
        bail!(
            "{} delegates need about {} open files in the bench and in the manager, but the hard \
             limit is {nofile}; raise it (`ulimit -Hn`, LimitNOFILE=) or ask for fewer",
            opts.delegates,
            opts.delegates as u64 + FD_MARGIN
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("delegate-bench-fleet-")
        .tempdir()?;
    // The manager's connection cap (default 1,000) must not be what limits the fleet: each
    // delegate may hold two connections at a moment (poll + heartbeat).
    let max_conns = (opts.delegates as u64 * 2 + FD_MARGIN).min(nofile.saturating_sub(64));
    let mut args = vec!["--max-connections".to_string(), max_conns.to_string()];
    if opts.log_bytes > 0 {
        // The big log is read whole: the manager's per-task cap must not cut it.
        args.extend([
            "--max-log-bytes".to_string(),
            (opts.log_bytes + (1 << 20)).to_string(),
        ]);
    }
    // Dropped after the managers (declared first): the database outlives its clients.
    let pg = if opts.postgres {
        let pg = delegate_tests::postgres::Postgres::start()?;
        args.extend(["--database".to_string(), pg.url()]);
        println!("fleet: PostgreSQL at {} (two manager nodes)", pg.url());
        Some(pg)
    } else {
        None
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    std::fs::create_dir_all(tmp.path().join("a"))?;
    let manager = Manager::start_with(&tmp.path().join("a"), "127.0.0.1:0", &args)?;
    let second = if pg.is_some() {
        let data = tmp.path().join("b").join("manager");
        std::fs::create_dir_all(&data)?;
        std::fs::copy(manager.data.join("admin.token"), data.join("admin.token"))?;
        Some(Manager::start_with(
            &tmp.path().join("b"),
            "127.0.0.1:0",
            &args,
        )?)
    } else {
        None
    };
    let pid = manager.pid().context("manager pid")?;
    let mut tokens = Vec::new();
    for i in 0..opts.delegates.div_ceil(DELEGATES_PER_TOKEN).max(1) {
        let (st, out, err) = manager.cli(&["token", "create", "--name", &format!("fleet-{i}")])?;
        if !st.success() {
            bail!("delegate-manager token create failed: {err}");
        }
        tokens.push(out.trim().to_string());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(fleet(
        opts,
        &manager,
        second.as_ref(),
        pid,
        &tokens,
        started,
    ));
    rt.shutdown_timeout(Duration::from_secs(2));
    drop(second);
    drop(manager);
    drop(pg);
    result
}

async fn fleet(
    opts: &FleetOptions,
    manager: &Manager,
    second: Option<&Manager>,
    pid: u32,
    tokens: &[String],
    t_start: Instant,
) -> Result<()> {
    let deadline = t_start + opts.limit;
    let tck = ticks_per_sec();
    let base = manager.url();
    let base2 = second.map(Manager::url);
    let pid2 = second.and_then(Manager::pid);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(usize::MAX)
        .pool_idle_timeout(None)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(ACQUIRE_WAIT_SECS + 30))
        .build()?;
    let admin = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(600))
        .build()?;
    let counters = Arc::new(Counters::default());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (stop_tx, stop) = watch::channel(false);
    let register_gate = Arc::new(Semaphore::new(REGISTER_CONCURRENCY));

    let fresh_kib = proc_status_kib(pid, "VmRSS:")?;
    println!(
        "fleet: manager {base} (pid {pid}), fresh RSS {:.1} MiB; {} delegates, {} cores",
        fresh_kib as f64 / 1024.0,
        opts.delegates,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    // 1. Connect the fleet and let it idle.
    let t_connect = Instant::now();
    for i in 0..opts.delegates {
        let sim = Sim {
            name: format!("fleet-{i:05}"),
            token: tokens[i / DELEGATES_PER_TOKEN % tokens.len()].clone(),
            tags: vec![],
            base: match &base2 {
                Some(b) if i % 2 == 1 => b.clone(),
                _ => base.clone(),
            },
            http: http.clone(),
            counters: counters.clone(),
            events: events_tx.clone(),
            stop: stop.clone(),
            log_bytes: 0,
        };
        tokio::spawn(sim.run(register_gate.clone()));
    }
    wait_until(deadline, "every delegate to register and long-poll", || {
        counters.registered.load(Ordering::Relaxed) == opts.delegates
            && counters.polling.load(Ordering::Relaxed) == opts.delegates
    })
    .await?;
    println!(
        "fleet: {} delegates registered and long-polling after {:.1} s",
        opts.delegates,
        t_connect.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t_idle = Instant::now();
    let cpu0 = proc_cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(opts.idle_secs)).await;
    let idle_cpu = (proc_cpu_ticks(pid)? - cpu0) as f64 / tck;
    let idle_kib = proc_status_kib(pid, "VmRSS:")?;
    let hb = counters.heartbeat_ms(t_idle, Instant::now());
    println!(
        "idle fleet over {} s: manager RSS {:.1} MiB ({:.1} KiB per delegate over the fresh manager), CPU {:.1} % of a core; heartbeats {}",
        opts.idle_secs,
        idle_kib as f64 / 1024.0,
        idle_kib.saturating_sub(fresh_kib) as f64 / opts.delegates.max(1) as f64,
        idle_cpu * 100.0 / opts.idle_secs.max(1) as f64,
        hb_summary(&hb)
    );
    if let Some(pid2) = pid2 {
        println!(
            "second node (pid {pid2}): RSS {:.1} MiB with half the fleet",
            proc_status_kib(pid2, "VmRSS:")? as f64 / 1024.0
        );
    }

    // 2. Pick-up latency: one task at a time, submit → a delegate holds it; the next task
    //    goes in once the last one's result is stored, so the fleet is idle each time.
    let submitter = Submitter {
        http: admin.clone(),
        url: format!("{base}/api/v1/tasks"),
        token: manager.admin_token.clone(),
    };
    let task = json!({"kind": "shell", "spec": {"script": "true"}});
    let t_lat = Instant::now();
    let cpu0 = proc_cpu_ticks(pid)?;
    let (mut lat, mut missed) = (Vec::with_capacity(opts.tasks), 0usize);
    // `--tasks 0` skips the phase (the big-log run needs no pick-up numbers).
    let rounds = if opts.tasks == 0 {
        0
    } else {
        opts.tasks + WARM_UP_TASKS
    };
    for i in 0..rounds {
        if Instant::now() > deadline {
            println!("pick-up: stopped after {i} tasks at the time limit");
            break;
        }
        let t0 = Instant::now();
        let id = submitter.submit(&task).await?;
        let picked = next_event(&mut events, PICK_UP_LIMIT, |e| match e {
            Event::Picked(t, at) if *t == id => Some(*at),
            _ => None,
        })
        .await;
        let Some(at) = picked else {
            missed += 1;
            continue;
        };
        next_event(&mut events, PICK_UP_LIMIT, |e| match e {
            Event::Done(t) if *t == id => Some(()),
            _ => None,
        })
        .await;
        if i >= WARM_UP_TASKS {
            lat.push(at.duration_since(t0).as_secs_f64() * 1000.0);
        }
    }
    let lat_cpu = (proc_cpu_ticks(pid)? - cpu0) as f64 / tck;
    lat.sort_by(f64::total_cmp);
    let hb = counters.heartbeat_ms(t_lat, Instant::now());
    if rounds > 0 {
        println!(
            "pick-up, submit → a delegate holds it, {} tasks one at a time: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{}; manager CPU {:.1} ms per task; heartbeats meanwhile {}",
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0),
            if missed > 0 {
                format!(", {missed} not picked up within {PICK_UP_LIMIT:?}")
            } else {
                String::new()
            },
            lat_cpu * 1000.0 / rounds as f64,
            hb_summary(&hb)
        );
    }

    // 3. Burst: `burst` tasks submitted at once (BURST_SUBMITTERS requests in flight);
    //    rate = tasks / (first submit → the last task held by a delegate).
    if opts.burst > 0 {
        let t_burst = Instant::now();
        let cpu0 = proc_cpu_ticks(pid)?;
        let next = Arc::new(AtomicUsize::new(0));
        let mut submitters = Vec::new();
        for _ in 0..BURST_SUBMITTERS.min(opts.burst) {
            let next = next.clone();
            let submitter = submitter.clone();
            let task = task.clone();
            let n = opts.burst;
            submitters.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    submitter.submit(&task).await?;
                }
                Ok::<_, anyhow::Error>(())
            }));
        }
        let mut picked = 0usize;
        let mut last = t_burst;
        let mut submitted_in = None;
        let limit = deadline.min(Instant::now() + Duration::from_secs(300));
        while picked < opts.burst {
            if submitted_in.is_none() && submitters.iter().all(|s| s.is_finished()) {
                submitted_in = Some(t_burst.elapsed());
            }
            let wait = limit.saturating_duration_since(Instant::now());
            match tokio::time::timeout(wait.min(Duration::from_millis(100)), events.recv()).await {
                Ok(Some(Event::Picked(_, at))) => {
                    picked += 1;
                    last = at;
                }
                Ok(Some(Event::Done(_))) => {}
                Ok(None) => bail!("every simulated delegate stopped"),
                Err(_) if Instant::now() >= limit => break,
                Err(_) => {}
            }
        }
        for s in submitters {
            s.await??;
        }
        let submitted_in = submitted_in.unwrap_or_else(|| t_burst.elapsed());
        let span = last.duration_since(t_burst).as_secs_f64();
        let burst_cpu = (proc_cpu_ticks(pid)? - cpu0) as f64 / tck;
        let hb = counters.heartbeat_ms(t_burst, Instant::now());
        println!(
            "burst of {} tasks: {picked} held by delegates after {span:.2} s → {:.0} tasks leased per second (all submitted after {:.2} s); manager CPU {:.2} s; heartbeats meanwhile {}",
            opts.burst,
            picked as f64 / span.max(1e-9),
            submitted_in.as_secs_f64(),
            burst_cpu,
            hb_summary(&hb)
        );
    }

    // 4. A big log: a separate delegate writes it, then one client reads it whole while
    //    the fleet heartbeats.
    if opts.log_bytes > 0 {
        big_log(
            opts,
            manager,
            pid,
            &http,
            &admin,
            &counters,
            &events_tx,
            &mut events,
            &stop,
            deadline,
        )
        .await?;
    }

    stop_tx.send_replace(true);
    let errors = counters.errors.load(Ordering::Relaxed);
    println!(
        "fleet: {} heartbeats, {errors} failed requests{}; manager peak RSS (VmHWM) {:.1} MiB; total {:.0} s",
        counters.heartbeats.load(Ordering::Relaxed),
        counters
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default(),
        proc_status_kib(pid, "VmHWM:")? as f64 / 1024.0,
        t_start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn big_log(
    opts: &FleetOptions,
    manager: &Manager,
    pid: u32,
    http: &reqwest::Client,
    admin: &reqwest::Client,
    counters: &Arc<Counters>,
    events_tx: &mpsc::UnboundedSender<Event>,
    events: &mut mpsc::UnboundedReceiver<Event>,
    stop: &watch::Receiver<bool>,
    deadline: Instant,
) -> Result<()> {
    let base = manager.url();
    let (st, out, err) = manager.cli(&["token", "create", "--name", "fleet-log"])?;
    if !st.success() {
        bail!("delegate-manager token create failed: {err}");
    }
    let writer = Sim {
        name: "fleet-log-writer".into(),
        token: out.trim().to_string(),
        tags: vec![LOG_TAG.into()],
        base: base.clone(),
        http: http.clone(),
        counters: counters.clone(),
        events: events_tx.clone(),
        stop: stop.clone(),
        log_bytes: opts.log_bytes,
    };
    tokio::spawn(writer.run(Arc::new(Semaphore::new(1))));
    let t_write = Instant::now();
    let resp = admin
        .post(format!("{base}/api/v1/tasks"))
        .bearer_auth(&manager.admin_token)
        .json(&json!({"kind": "shell", "spec": {"script": "true"}, "selectors": [LOG_TAG]}))
        .send()
        .await?
        .error_for_status()?;
    let v: serde_json::Value = resp.json().await?;
    let id = v["task_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no task_id in {v}"))?
        .to_string();
    let write_limit = deadline.saturating_duration_since(Instant::now());
    next_event(events, write_limit, |e| match e {
        Event::Done(t) if *t == id => Some(()),
        _ => None,
    })
    .await
    .with_context(|| format!("the log writer did not finish task {id} in time"))?;
    let hwm_before = proc_status_kib(pid, "VmHWM:")?;
    println!(
        "big log: {} MiB written in {:.1} s; manager RSS {:.1} MiB, peak so far {:.1} MiB",
        opts.log_bytes >> 20,
        t_write.elapsed().as_secs_f64(),
        proc_status_kib(pid, "VmRSS:")? as f64 / 1024.0,
        hwm_before as f64 / 1024.0
    );

    // Read it whole, sampling the manager's RSS every 20 ms meanwhile.
    let peak = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = watch::channel(false);
    let sampler = {
        let peak = peak.clone();
        let mut done_rx = done_rx.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(kib) = proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    _ = done_rx.changed() => return,
                }
            }
        })
    };
    let t_read = Instant::now();
    let mut resp = admin
        .get(format!("{base}/api/v1/tasks/{id}/logs"))
        .bearer_auth(&manager.admin_token)
        .send()
        .await?
        .error_for_status()?;
    let (mut got, mut first_byte) = (0u64, None);
    while let Some(chunk) = resp.chunk().await? {
        first_byte.get_or_insert_with(|| t_read.elapsed());
        got += chunk.len() as u64;
    }
    let t_end = Instant::now();
    done_tx.send_replace(true);
    let _ = sampler.await;
    if got != opts.log_bytes {
        bail!(
            "read {got} log bytes of task {id}, expected {}",
            opts.log_bytes
        );
    }
    let hb = counters.heartbeat_ms(t_read, t_end);
    println!(
        "big log: read {} MiB in {:.1} s (first byte after {:.2} s); manager peak RSS while serving it {:.1} MiB (VmHWM {:.1} MiB); heartbeats meanwhile {}",
        got >> 20,
        t_end.duration_since(t_read).as_secs_f64(),
        first_byte.unwrap_or_default().as_secs_f64(),
        peak.load(Ordering::Relaxed) as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:")? as f64 / 1024.0,
        hb_summary(&hb)
    );
    Ok(())
}

/// Submits tasks as a user does.
#[derive(Clone)]
struct Submitter {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Submitter {
    async fn submit(&self, body: &serde_json::Value) -> Result<String> {
        let resp = self
            .http
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let v: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            bail!("submit → {status}: {v}");
        }
        v["task_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no task_id in {v}"))
    }
}

/// Receive events until `want` picks one or `limit` passes; other events are dropped.
async fn next_event<T>(
    events: &mut mpsc::UnboundedReceiver<Event>,
    limit: Duration,
    mut want: impl FnMut(&Event) -> Option<T>,
) -> Option<T> {
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(e)) => {
                if let Some(v) = want(&e) {
                    return Some(v);
                }
            }
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Poll a condition every 50 ms until it holds or `deadline` passes.
async fn wait_until(deadline: Instant, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

impl Sim {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn post<B: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<reqwest::Response> {
        let mut req = self.http.post(self.url(path)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| format!("POST {path}"))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!("POST {path} → {status}: {text}");
        }
        Ok(resp)
    }

    /// Register (retrying with a pause until stopped), then heartbeat and long-poll
    /// until the bench stops.
    async fn run(self, gate: Arc<Semaphore>) {
        let reg = RegisterRequest {
            name: self.name.clone(),
            hostname: "fleet-bench".into(),
            version: "0.0.0-fleet".into(),
            tags: self.tags.clone(),
            targets: vec![delegate_protocol::Target {
                kind: "shell".into(),
                name: None,
            }],
            capacity: 1,
            upgrade_group: None,
        };
        let registered: RegisterResponse = loop {
            if *self.stop.borrow() {
                return;
            }
            let permit = gate.acquire().await;
            let got = async {
                Ok::<_, anyhow::Error>(
                    self.post("/delegates/register", Some(&reg))
                        .await?
                        .json()
                        .await?,
                )
            }
            .await;
            drop(permit);
            match got {
                Ok(r) => break r,
                Err(e) => {
                    self.counters.error(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        self.counters.registered.fetch_add(1, Ordering::Relaxed);
        let me = Arc::new(self);
        let id = registered.delegate_id;
        let interval = Duration::from_secs(registered.heartbeat_interval_secs.max(1));
        tokio::spawn(me.clone().heartbeats(id.clone(), interval));
        me.acquire_loop(id).await;
    }

    async fn heartbeats(self: Arc<Self>, id: String, interval: Duration) {
        let path = format!("/delegates/{id}/heartbeat");
        // Spread the fleet over the interval, as delegates started at different times are.
        let offset = interval.mul_f64(spread_fraction(&self.name));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let req = HeartbeatRequest {
                state: DelegateState::Running,
                ..HeartbeatRequest::default()
            };
            let t0 = Instant::now();
            match self.post(&path, Some(&req)).await {
                Ok(r) => {
                    let _ = r.bytes().await;
                    let ms = t0.elapsed().as_secs_f64() * 1000.0;
                    self.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut v) = self.counters.heartbeat_rtt.lock() {
                        v.push((t0, ms));
                    }
                }
                Err(e) => self.counters.error(format!("{e:#}")),
            }
        }
    }

    async fn acquire_loop(&self, id: String) {
        let path = format!("/delegates/{id}/acquire?wait={ACQUIRE_WAIT_SECS}&max=1");
        let mut stop = self.stop.clone();
        loop {
            self.counters.polling.fetch_add(1, Ordering::Relaxed);
            let got = tokio::select! {
                r = self.post::<()>(&path, None) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            self.counters.polling.fetch_sub(1, Ordering::Relaxed);
            let resp = match got {
                Ok(r) => r,
                Err(e) => {
                    self.counters.error(format!("{e:#}"));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if resp.status() == reqwest::StatusCode::NO_CONTENT {
                continue;
            }
            let at = Instant::now();
            let leased: AcquireResponse = match resp.json().await {
                Ok(l) => l,
                Err(e) => {
                    self.counters.error(format!("acquire answer: {e}"));
                    continue;
                }
            };
            for a in leased.tasks {
                let _ = self.events.send(Event::Picked(a.task_id.clone(), at));
                if let Err(e) = self.work(&a.task_id, a.attempt).await {
                    self.counters.error(format!("task {}: {e:#}", a.task_id));
                    continue;
                }
                let _ = self.events.send(Event::Done(a.task_id));
            }
        }
    }

    /// What an agent reports for a task that does nothing: started, its log, its result.
    async fn work(&self, task: &str, attempt: u32) -> Result<()> {
        self.post::<()>(&format!("/tasks/{task}/started?attempt={attempt}"), None)
            .await?
            .bytes()
            .await?;
        let mut sent = 0u64;
        let chunk = vec![b'x'; LOG_CHUNK];
        while sent < self.log_bytes {
            let n = (self.log_bytes - sent).min(LOG_CHUNK as u64) as usize;
            let resp = self
                .http
                .post(self.url(&format!(
                    "/tasks/{task}/logs?attempt={attempt}&offset={sent}"
                )))
                .bearer_auth(&self.token)
                .body(chunk[..n].to_vec())
                .send()
                .await?
                .error_for_status()?;
            resp.bytes().await?;
            sent += n as u64;
        }
        let res = TaskResult {
            outcome: Outcome::Succeeded,
            exit_code: Some(0),
            signal: None,
            message: None,
            log_bytes: sent,
        };
        self.post(
            &format!("/tasks/{task}/result?attempt={attempt}"),
            Some(&res),
        )
        .await?
        .bytes()
        .await?;
        Ok(())
    }
}

/// A fraction in [0, 1) from a name and the process's random hash keys, to spread
/// heartbeats over the interval without a RNG dependency.
fn spread_fraction(name: &str) -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(name.as_bytes());
    (h.finish() % 1_000_000) as f64 / 1_000_000.0
}
