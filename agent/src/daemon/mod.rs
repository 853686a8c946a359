//! The daemon behind `delegate run`: register, heartbeat, long-poll for tasks, supervise
//! them, deliver their logs and results, and drain on request.
//!
//! Data flows one way: manager → (client) → supervisor → executor → spool → (client) →
//! manager. The supervisor is the only place that knows about both the manager and the
//! executors; every task it accepts is journalled in the spool before it starts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use delegate_protocol::{
    Assignment, HeartbeatRequest, Outcome, Target, TaskAttempt, TaskResult, TaskSpec,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

mod delivery;
mod session;

use delivery::{deliver, ship_live};
use session::session;

use crate::backoff::Backoff;
use crate::client::{ClientError, ManagerClient};
use crate::config::{Config, DockerConfig};
use crate::exec::{self, ExecContext, ExecOutcome};
use crate::notify;
use crate::spool::{Found, Quarantined, Recovered, Spool, SpoolError, TaskDir};
use crate::state::{AgentState, Event, transition};

/// Requests from signals (and later D-Bus) to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop taking tasks; in-flight ones go on (D-Bus `Drain()`).
    Drain,
    /// Take tasks again (D-Bus `Resume()`).
    Resume,
    /// SIGTERM: drain, then exit once in-flight work is done or the drain timeout passed.
    Shutdown,
    /// Second SIGTERM or SIGINT: cancel in-flight work now and exit.
    Abort,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot use the state directory: {0}")]
    Spool(#[from] SpoolError),
    #[error("cannot set up the manager client: {0}")]
    Client(#[from] ClientError),
    /// The manager answered 401: the token was revoked (or is wrong). Retrying cannot help
    /// until an operator puts a new token in the config, which only a restart reads, so
    /// the agent stops its tasks without reporting them and exits with `EX_CONFIG`.
    #[error(
        "the manager at {manager_url} rejected the delegate token ({message}){}",
        stopped_note(*stopped)
    )]
    TokenRejected {
        manager_url: String,
        message: String,
        stopped: usize,
    },
}

fn stopped_note(n: usize) -> String {
    match n {
        0 => String::new(),
        n => format!("; stopped {n} running task(s) without reporting them"),
    }
}

/// Why the supervisor stopped a task; decides the reported outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Timeout(Duration),
    Cancelled,
    Shutdown,
    /// The manager says this delegate no longer holds the task: stop, report nothing.
    Revoked,
}

struct TaskHandle {
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
    /// Still executing (as opposed to delivering its result).
    running: bool,
}

impl TaskHandle {
    /// Ask the task to stop; the first reason given is the one reported.
    fn stop_for(&self, reason: StopReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.stop.cancel();
    }
}

/// The key of a task the agent holds: two attempts of one task are two tasks here.
fn key_of(a: &Assignment) -> TaskAttempt {
    TaskAttempt {
        id: a.task_id.clone(),
        attempt: a.attempt,
    }
}

/// What the daemon's loops share.
struct Shared {
    config: Config,
    docker: Arc<DockerConfig>,
    /// The Docker engine answered at the last probe; decides whether `docker` is offered.
    docker_up: AtomicBool,
    client: ManagerClient,
    spool: Spool,
    state: watch::Sender<AgentState>,
    delegate_id: watch::Sender<Option<String>>,
    connected: watch::Sender<bool>,
    tasks: Mutex<HashMap<TaskAttempt, TaskHandle>>,
    slots: Arc<Semaphore>,
    slot_freed: Notify,
    /// Bumped whenever a task starts, stops running or is delivered.
    tasks_changed: watch::Sender<u64>,
    in_flight: watch::Sender<u32>,
    /// Cancelled when long polls must end now (stopping, manager unreachable).
    stop_polling: CancellationToken,
    /// Cancelled when the process is about to exit: retry loops give up, the spool keeps
    /// what they had not delivered.
    stopped: CancellationToken,
    /// Cancelled at the first 401 from the manager; `rejection` holds its message.
    token_rejected: CancellationToken,
    rejection: Mutex<Option<String>>,
}

impl Shared {
    fn apply(&self, event: Event) {
        self.state
            .send_if_modified(|s| match transition(*s, event) {
                Ok(next) if next != *s => {
                    info!(from = %s, to = %next, "agent state changed");
                    *s = next;
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    debug!("ignored: {e}");
                    false
                }
            });
        self.update_status();
    }

    /// Note a 401 from the manager (once) and wake the main loop, which stops everything.
    /// Returns whether `e` was one, so callers end their loop instead of retrying.
    fn check_token_rejected(&self, e: &ClientError) -> bool {
        let ClientError::Unauthorized { message, .. } = e else {
            return false;
        };
        let mut r = self.rejection.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(message.clone());
        }
        self.token_rejected.cancel();
        true
    }

    fn running_count(&self) -> usize {
        self.lock_tasks().values().filter(|t| t.running).count()
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, HashMap<TaskAttempt, TaskHandle>> {
        // A panic while holding the lock would poison it; the map is still consistent
        // (every mutation is a single insert/remove), so keep going.
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop every attempt of a task this agent holds (the manager's `cancel` and plain
    /// `revoked` lists name tasks, not attempts).
    fn stop_task(&self, task_id: &str, reason: StopReason) {
        for (_, t) in self.lock_tasks().iter().filter(|(k, _)| k.id == task_id) {
            t.stop_for(reason);
        }
    }

    /// Stop one attempt, leaving any other attempt of the same task alone.
    fn stop_attempt(&self, key: &TaskAttempt, reason: StopReason) {
        if let Some(t) = self.lock_tasks().get(key) {
            t.stop_for(reason);
        }
    }

    fn bump(&self) {
        self.tasks_changed.send_modify(|n| *n = n.wrapping_add(1));
        let held = u32::try_from(self.lock_tasks().len()).unwrap_or(u32::MAX);
        self.in_flight
            .send_if_modified(|n| std::mem::replace(n, held) != held);
        if *self.state.borrow() == AgentState::Draining && self.running_count() == 0 {
            self.apply(Event::Idle);
        } else {
            self.update_status();
        }
    }

    fn update_status(&self) {
        let state = *self.state.borrow();
        let running = self.running_count();
        let link = if *self.connected.borrow() {
            format!("connected to {}", self.config.manager_url)
        } else {
            format!("not connected to {}", self.config.manager_url)
        };
        notify::status(&format!("{state}, {link}, {running} tasks running"));
    }

    fn set_connected(&self, up: bool) {
        if self
            .connected
            .send_if_modified(|c| std::mem::replace(c, up) != up)
        {
            if up {
                info!(manager = %self.config.manager_url, "connected to the manager");
            }
            self.update_status();
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        if self.config.shell_enabled {
            t.push(Target {
                kind: "shell".into(),
                name: None,
            });
        }
        if self.config.http_enabled {
            t.push(Target {
                kind: "http".into(),
                name: None,
            });
        }
        if self.config.docker.enabled && self.docker_up.load(Ordering::Relaxed) {
            t.push(Target {
                kind: "docker".into(),
                name: None,
            });
        }
        t
    }

    /// Kinds this agent runs. Docker counts when enabled even if the engine is down right
    /// now: the task then fails naming the engine's problem, and works once it is back.
    fn runs_kind(&self, kind: &str) -> bool {
        match kind {
            "shell" => self.config.shell_enabled,
            "http" => self.config.http_enabled,
            "docker" => self.config.docker.enabled,
            _ => false,
        }
    }
}

/// A daemon built from its config, not yet running.
pub struct Daemon {
    shared: Arc<Shared>,
}

/// What the outside (D-Bus, `delegate status`, tests) can watch of a running daemon.
#[derive(Clone)]
pub struct Observer {
    pub state: watch::Receiver<AgentState>,
    pub connected: watch::Receiver<bool>,
    pub delegate_id: watch::Receiver<Option<String>>,
    /// Number of tasks the agent holds (running or delivering their result).
    pub in_flight: watch::Receiver<u32>,
    pub manager_url: String,
}

impl Daemon {
    pub fn new(config: Config) -> Result<Daemon, DaemonError> {
        let spool = Spool::open(&config.state_dir)?;
        let client = ManagerClient::new(
            &config.manager_url,
            config.token.expose(),
            &format!("delegate/{}", crate::VERSION),
            config.ca.as_ref().map(|c| c.pem.as_slice()),
        )?;
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.concurrency as usize)),
            docker: Arc::new(config.docker.clone()),
            docker_up: AtomicBool::new(false),
            config,
            client,
            spool,
            state: watch::Sender::new(AgentState::Starting),
            delegate_id: watch::Sender::new(None),
            connected: watch::Sender::new(false),
            tasks: Mutex::new(HashMap::new()),
            slot_freed: Notify::new(),
            tasks_changed: watch::Sender::new(0),
            in_flight: watch::Sender::new(0),
            stop_polling: CancellationToken::new(),
            stopped: CancellationToken::new(),
            token_rejected: CancellationToken::new(),
            rejection: Mutex::new(None),
        });
        Ok(Daemon { shared })
    }

    pub fn observer(&self) -> Observer {
        Observer {
            state: self.shared.state.subscribe(),
            connected: self.shared.connected.subscribe(),
            delegate_id: self.shared.delegate_id.subscribe(),
            in_flight: self.shared.in_flight.subscribe(),
            manager_url: self.shared.config.manager_url.clone(),
        }
    }

    /// Run until a `Shutdown`/`Abort` control has been handled.
    pub async fn run(self, control: mpsc::Receiver<Control>) -> Result<(), DaemonError> {
        // Every line the daemon logs carries DELEGATE_ID in the journal once registered.
        let root = tracing::info_span!("delegate", delegate_id = tracing::field::Empty);
        run_shared(self.shared, control).instrument(root).await
    }
}

/// Build and run a daemon (for callers that need no observer).
pub async fn run(config: Config, control: mpsc::Receiver<Control>) -> Result<(), DaemonError> {
    Daemon::new(config)?.run(control).await
}

async fn run_shared(
    shared: Arc<Shared>,
    mut control: mpsc::Receiver<Control>,
) -> Result<(), DaemonError> {
    probe_docker(&shared, false).await;
    recover_spool(&shared);
    notify::ready();
    shared.update_status();
    info!(
        version = crate::VERSION,
        manager = %shared.config.manager_url,
        name = %shared.config.name,
        state_dir = %shared.config.state_dir.display(),
        concurrency = shared.config.concurrency,
        "delegate started"
    );
    let watchdog = notify::spawn_watchdog();

    let session = tokio::spawn(session(shared.clone()).in_current_span());

    // Wait for the first request to stop; drains and resumes in between.
    let mut aborted = false;
    loop {
        let c = tokio::select! {
            c = control.recv() => c,
            _ = shared.token_rejected.cancelled() => {
                let result = stop_for_rejected_token(&shared).await;
                session.abort();
                if let Some(w) = watchdog {
                    w.abort();
                }
                return result;
            }
        };
        match c {
            Some(Control::Drain) => begin_drain(&shared, false).await,
            Some(Control::Resume) => {
                let registered = shared.delegate_id.borrow().is_some();
                shared.apply(Event::Resume { registered });
                // The manager holds back tasks from a draining delegate until told.
                tell_manager_state(&shared).await;
                shared.slot_freed.notify_one();
            }
            Some(Control::Shutdown) | None => break,
            Some(Control::Abort) => {
                aborted = true;
                break;
            }
        }
    }

    notify::stopping();
    begin_drain(&shared, true).await;
    if !aborted {
        aborted = wait_for_drain(&shared, &mut control).await;
    }
    let leftover = shared.running_count();
    if leftover > 0 {
        warn!(
            tasks = leftover,
            "cancelling tasks still running{}",
            if aborted {
                " (second stop request)"
            } else {
                " (drain timeout reached)"
            }
        );
        let held: Vec<TaskAttempt> = shared.lock_tasks().keys().cloned().collect();
        for key in &held {
            shared.stop_attempt(key, StopReason::Shutdown);
        }
        // Executors need the kill grace to stop their processes; then a little to report.
        let limit = shared.config.kill_grace + Duration::from_secs(5);
        wait_until(&shared, limit, |s| s.running_count() == 0).await;
    }
    shared.apply(Event::Stop);
    shared.stop_polling.cancel();
    // Give result deliveries a bounded moment; what is left stays in the spool and is
    // sent by the next start.
    let delivered = wait_until(&shared, Duration::from_secs(10), |s| {
        s.lock_tasks().is_empty()
    })
    .await;
    shared.stopped.cancel();
    if !delivered {
        let n = shared.lock_tasks().len();
        warn!(
            tasks = n,
            "results not yet delivered stay in the spool for the next start"
        );
    }
    session.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("delegate stopped");
    Ok(())
}

/// The token is no longer accepted: stop every running task as revoked (killed, nothing
/// reported, its spool entry dropped), stop talking to the manager, and say why.
/// Results already waiting for delivery stay in the spool for a start with a valid token.
async fn stop_for_rejected_token(shared: &Arc<Shared>) -> Result<(), DaemonError> {
    shared.apply(Event::Stop);
    shared.stop_polling.cancel();
    let running: Vec<TaskAttempt> = shared
        .lock_tasks()
        .iter()
        .filter(|(_, t)| t.running)
        .map(|(key, _)| key.clone())
        .collect();
    for key in &running {
        shared.stop_attempt(key, StopReason::Revoked);
    }
    let limit = shared.config.kill_grace + Duration::from_secs(5);
    wait_until(shared, limit, |s| s.running_count() == 0).await;
    shared.stopped.cancel();
    let message = shared
        .rejection
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    Err(DaemonError::TokenRejected {
        manager_url: shared.config.manager_url.clone(),
        message,
        stopped: running.len(),
    })
}

/// Stop taking tasks and tell the manager at once, so a long poll in flight ends and no
/// new task is handed to this delegate. `for_exit`: the process will stop afterwards.
async fn begin_drain(shared: &Arc<Shared>, for_exit: bool) {
    shared.apply(Event::Drain);
    if shared.running_count() == 0 {
        shared.apply(Event::Idle);
    }
    shared.slot_freed.notify_one();
    if !tell_manager_state(shared).await && for_exit {
        // The manager cannot be told; end the long poll ourselves.
        shared.stop_polling.cancel();
    }
}

/// Send a heartbeat now (bounded to 3 s) so the manager learns a state change at once.
/// Returns whether the manager got it.
async fn tell_manager_state(shared: &Arc<Shared>) -> bool {
    let Some(id) = shared.delegate_id.borrow().clone() else {
        return false;
    };
    let req = heartbeat_request(shared);
    let sent =
        tokio::time::timeout(Duration::from_secs(3), shared.client.heartbeat(&id, &req)).await;
    matches!(sent, Ok(Ok(_)))
}

/// Wait until nothing runs, the drain timeout passes, or a second stop request comes.
/// Returns true when aborted.
async fn wait_for_drain(shared: &Arc<Shared>, control: &mut mpsc::Receiver<Control>) -> bool {
    let timeout = shared.config.drain_timeout;
    let running = shared.running_count();
    if running > 0 {
        info!(
            tasks = running,
            timeout = %humantime::format_duration(timeout),
            "draining: waiting for in-flight tasks"
        );
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changed = shared.tasks_changed.subscribe();
    loop {
        if shared.running_count() == 0 {
            return false;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => return false,
            c = control.recv() => match c {
                Some(Control::Abort) | Some(Control::Shutdown) => return true,
                Some(Control::Resume) => info!("resume ignored: the agent is stopping"),
                Some(Control::Drain) | None => {}
            },
        }
    }
}

/// Wait up to `limit` for `done`; true if it became true.
async fn wait_until(shared: &Arc<Shared>, limit: Duration, done: impl Fn(&Shared) -> bool) -> bool {
    let mut changed = shared.tasks_changed.subscribe();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if done(shared) {
            return true;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => return done(shared),
        }
    }
}

/// The heartbeat names every attempt held, and (for older managers) each task id once.
fn heartbeat_request(shared: &Shared) -> HeartbeatRequest {
    let mut attempts: Vec<TaskAttempt> = shared.lock_tasks().keys().cloned().collect();
    attempts.sort();
    let mut ids: Vec<String> = attempts.iter().map(|k| k.id.clone()).collect();
    ids.dedup();
    HeartbeatRequest {
        state: *shared.state.borrow(),
        in_flight: ids,
        in_flight_attempts: attempts,
    }
}

/// Ask the Docker engine whether it answers: at start, and again with each heartbeat while
/// it does not. The target is offered only when it answers; an engine that cannot be used
/// gets one log line at start that says how to fix it (`quiet` for the retries). Returns
/// true when the engine answers now and did not before.
async fn probe_docker(shared: &Shared, quiet: bool) -> bool {
    if !shared.config.docker.enabled || shared.docker_up.load(Ordering::Relaxed) {
        return false;
    }
    match exec::docker::probe(&shared.docker).await {
        Ok(version) => {
            shared.docker_up.store(true, Ordering::Relaxed);
            info!(socket = %shared.docker.socket.display(), "Docker engine {version} answers; offering the docker target");
            true
        }
        Err(e) if quiet => {
            debug!("Docker engine still not usable: {e}");
            false
        }
        Err(e) => {
            warn!(
                "docker target not offered: {e} (other targets run as usual; set enabled = false in [docker] to silence this)"
            );
            false
        }
    }
}

/// Pick up what an earlier run left in the spool: undelivered results are sent again;
/// docker tasks still running are adopted (their containers outlive the agent); other
/// tasks that were running when the agent died are stopped (if anything of them is left)
/// and reported as lost at once, so the manager can retry them without waiting for the
/// lease to lapse.
fn recover_spool(shared: &Arc<Shared>) {
    let found = match shared.spool.recover() {
        Ok(f) => f,
        Err(e) => {
            error!("cannot read the spool: {e}");
            return;
        }
    };
    for entry in found {
        let rec: Recovered = match entry {
            Found::Task(r) => r,
            Found::Unreadable(e) => {
                error!("skipping a spool entry: {e} (left on disk for inspection)");
                continue;
            }
            Found::Quarantined(q) => {
                report_quarantined(shared, q);
                continue;
            }
        };
        if rec.result.is_none() && rec.assignment.kind == "docker" && shared.runs_kind("docker") {
            info!(task_id = %rec.assignment.task_id, attempt = rec.assignment.attempt, "re-attaching to the container of a task that ran when the delegate stopped");
            let permit = shared.slots.clone().try_acquire_owned().ok();
            spawn_adopted(shared.clone(), rec.assignment, rec.dir, permit);
            continue;
        }
        let result = match rec.result {
            Some(r) => {
                info!(task_id = %rec.assignment.task_id, attempt = rec.assignment.attempt, "re-sending a result left from the last run");
                r
            }
            None => {
                let mut message = format!(
                    "the delegate restarted while this task was running (attempt {})",
                    rec.assignment.attempt
                );
                if let Some(p) = rec.process.filter(|p| p.is_alive()) {
                    let pgid = Pid::from_raw(i32::try_from(p.pid).unwrap_or(i32::MAX));
                    let _ = killpg(pgid, Signal::SIGKILL);
                    message.push_str(&format!(
                        "; its leftover process group {} was killed",
                        p.pid
                    ));
                }
                warn!(task_id = %rec.assignment.task_id, "{message}");
                let r = TaskResult {
                    outcome: Outcome::Lost,
                    exit_code: None,
                    signal: None,
                    message: Some(message),
                    log_bytes: rec.dir.log_len(),
                };
                if let Err(e) = rec.dir.write_result(&r) {
                    error!(task_id = %rec.assignment.task_id, "cannot journal the result: {e}");
                }
                r
            }
        };
        let handle = TaskHandle {
            stop: CancellationToken::new(),
            reason: Arc::new(Mutex::new(None)),
            running: false,
        };
        shared.lock_tasks().insert(key_of(&rec.assignment), handle);
        let shared = shared.clone();
        let span = task_span(&rec.assignment);
        let key = key_of(&rec.assignment);
        tokio::spawn(
            async move {
                deliver(&shared, &rec.dir, &result).await;
                shared.lock_tasks().remove(&key);
                shared.bump();
            }
            .instrument(span),
        );
    }
    shared.bump();
}

/// A task whose journal was corrupt: it was moved aside; say so once and report the task
/// lost at once (its outcome is unknown), so the manager retries it without waiting for
/// the lease to lapse.
fn report_quarantined(shared: &Arc<Shared>, q: Quarantined) {
    // Its work is unsupervised now: whatever is left of a shell task goes.
    if let Some(p) = q.process.filter(|p| p.is_alive()) {
        let pgid = Pid::from_raw(i32::try_from(p.pid).unwrap_or(i32::MAX));
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    let Some((task_id, attempt)) = q.task else {
        error!(
            "a spool entry was corrupt ({}); moved it to {} (no task id in its name, nothing reported)",
            q.reason,
            q.moved_to.display()
        );
        return;
    };
    error!(
        task_id = %task_id,
        attempt,
        "the journal of this task was corrupt ({}); moved it to {} and reporting the task lost",
        q.reason,
        q.moved_to.display()
    );
    let r = TaskResult {
        outcome: Outcome::Lost,
        exit_code: None,
        signal: None,
        message: Some(format!(
            "the delegate's journal of this task was corrupt ({}); it was set aside in {} and the task's outcome is unknown",
            q.reason,
            q.moved_to.display()
        )),
        log_bytes: 0,
    };
    let shared = shared.clone();
    tokio::spawn(
        async move { report_unjournalled(&shared, &task_id, attempt, &r).await }.in_current_span(),
    );
}

fn task_span(a: &Assignment) -> tracing::Span {
    info_span!("task", task_id = %a.task_id, task_kind = %a.kind, attempt = a.attempt)
}

fn spawn_task(shared: Arc<Shared>, a: Assignment, permit: OwnedSemaphorePermit) {
    let span = task_span(&a);
    tokio::spawn(supervise(shared, a, None, Some(permit)).instrument(span));
}

/// A task leased beyond the free slots is not run: it is reported `lost` at once, which
/// the manager re-queues while the task has retries left (a few tries, then its lease
/// lapses the same way).
fn spawn_refusal(shared: Arc<Shared>, a: Assignment, leased: usize, free: u32) {
    let span = task_span(&a);
    let r = TaskResult {
        outcome: Outcome::Lost,
        exit_code: None,
        signal: None,
        message: Some(format!(
            "delegate {} had {free} free slot(s) but was leased {leased} task(s); this one was not run",
            shared.config.name
        )),
        log_bytes: 0,
    };
    tokio::spawn(
        async move {
            report_unjournalled(&shared, &a.task_id, a.attempt, &r).await;
        }
        .instrument(span),
    );
}

/// Send a result for a task that has no spool entry: a few tries with backoff.
async fn report_unjournalled(shared: &Shared, task_id: &str, attempt: u32, r: &TaskResult) {
    let mut backoff = Backoff::manager();
    for _ in 0..5 {
        match shared.client.result(task_id, attempt, r).await {
            Err(e) if e.is_transient() => tokio::time::sleep(backoff.next_delay()).await,
            Err(e) => {
                shared.check_token_rejected(&e);
                debug!("could not report the task: {e}");
                return;
            }
            Ok(()) => return,
        }
    }
}

/// Supervise a task an earlier run of the agent journalled and started.
fn spawn_adopted(
    shared: Arc<Shared>,
    a: Assignment,
    dir: TaskDir,
    permit: Option<OwnedSemaphorePermit>,
) {
    let span = task_span(&a);
    tokio::spawn(supervise(shared, a, Some(dir), permit).instrument(span));
}

/// Drop a task that will not be delivered: free its slot and let the acquire loop know.
fn forget_task(shared: &Shared, key: &TaskAttempt, permit: Option<OwnedSemaphorePermit>) {
    drop(permit);
    shared.lock_tasks().remove(key);
    shared.slot_freed.notify_one();
    shared.bump();
}

/// One task from assignment to delivered result. `adopted`: its journal entry from an
/// earlier run of the agent, whose work is to be re-attached to rather than started.
async fn supervise(
    shared: Arc<Shared>,
    a: Assignment,
    adopted: Option<TaskDir>,
    permit: Option<OwnedSemaphorePermit>,
) {
    let adopt = adopted.is_some();
    let stop = CancellationToken::new();
    let reason = Arc::new(Mutex::new(None));
    let key = key_of(&a);
    shared.lock_tasks().insert(
        key.clone(),
        TaskHandle {
            stop: stop.clone(),
            reason: reason.clone(),
            running: true,
        },
    );
    shared.bump();
    let created = match adopted {
        Some(d) => Ok(d),
        None => shared.spool.create(&a),
    };
    let dir = match created {
        Ok(d) => d,
        Err(e) => {
            // Without a journal entry the task cannot be run safely; report it directly.
            error!("cannot journal the task: {e}");
            let r = TaskResult {
                outcome: Outcome::Failed,
                exit_code: None,
                signal: None,
                message: Some(format!("the delegate could not journal the task: {e}")),
                log_bytes: 0,
            };
            report_unjournalled(&shared, &a.task_id, a.attempt, &r).await;
            forget_task(&shared, &key, permit);
            return;
        }
    };

    // Journalled first, then reported: a crash after "running" still finds the entry.
    if !adopt {
        let client = shared.client.clone();
        let (id, attempt) = (a.task_id.clone(), a.attempt);
        tokio::spawn(async move {
            if let Err(e) = client.started(&id, attempt).await {
                debug!(task_id = %id, "could not report the start: {e}");
            }
        });
    }
    let result = execute(&shared, &a, &dir, adopt, stop.clone(), reason.clone()).await;
    if *reason.lock().unwrap_or_else(|p| p.into_inner()) == Some(StopReason::Revoked) {
        // Another delegate (or nobody) owns the task now; a report would be refused.
        if let Err(e) = dir.remove() {
            warn!("cannot remove the revoked task from the spool: {e}");
        }
        forget_task(&shared, &key, permit);
        return;
    }
    if let Err(e) = dir.write_result(&result) {
        error!("cannot journal the result (delivering it from memory): {e}");
    }
    let summary = match (result.exit_code, result.signal) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => result.message.clone().unwrap_or_default(),
    };
    info!(outcome = ?result.outcome, "task finished: {summary}");

    drop(permit);
    if let Some(t) = shared.lock_tasks().get_mut(&key) {
        t.running = false;
    }
    shared.slot_freed.notify_one();
    shared.bump();

    deliver(&shared, &dir, &result).await;
    shared.lock_tasks().remove(&key);
    shared.bump();
}

/// Check the spec, run it with its timeout, and turn the outcome into a result.
async fn execute(
    shared: &Arc<Shared>,
    a: &Assignment,
    dir: &TaskDir,
    adopt: bool,
    stop: CancellationToken,
    reason: Arc<Mutex<Option<StopReason>>>,
) -> TaskResult {
    let failed = |message: String| TaskResult {
        outcome: Outcome::Failed,
        exit_code: None,
        signal: None,
        message: Some(message),
        log_bytes: dir.log_len(),
    };
    let spec = match TaskSpec::from_wire(&a.kind, &a.spec) {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot run this task: {e}");
            return failed(format!(
                "delegate {} cannot run this task: {e}",
                shared.config.name
            ));
        }
    };
    if !shared.runs_kind(spec.kind()) {
        let offered = shared.targets();
        let kinds: Vec<&str> = offered.iter().map(|t| t.kind.as_str()).collect();
        let msg = format!(
            "delegate {} does not offer target {:?} (it offers: {}); enable it in delegate.toml or route the task to another delegate with a selector",
            shared.config.name,
            spec.kind(),
            kinds.join(", ")
        );
        warn!("{msg}");
        return failed(msg);
    }
    let log = match dir.log_writer() {
        Ok(l) => l,
        Err(e) => return failed(format!("the delegate cannot write the task log: {e}")),
    };

    let shipping = CancellationToken::new();
    let shipper = tokio::spawn(ship_live(shared.clone(), dir.clone(), shipping.clone()));

    let dir_for_pid = dir.clone();
    let ctx = ExecContext {
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        dir: dir.path().to_path_buf(),
        log,
        stop: stop.clone(),
        kill_grace: shared.config.kill_grace,
        on_process: Box::new(move |p| {
            if let Err(e) = dir_for_pid.record_process(p) {
                warn!("cannot journal the task's process: {e}");
            }
        }),
        journal: dir.clone(),
        adopt,
        delegate_name: shared.config.name.clone(),
        delegate_id: shared.delegate_id.borrow().clone(),
        docker: shared.docker.clone(),
    };
    let mut timeout = Duration::from_secs(a.timeout_secs.max(1));
    if adopt {
        // The clock started when the earlier run accepted the task.
        let spent = dir
            .accepted_at()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        timeout = timeout
            .saturating_sub(spent)
            .max(Duration::from_millis(100));
    }
    let run = exec::run(&spec, ctx);
    tokio::pin!(run);
    let outcome = tokio::select! {
        o = &mut run => o,
        _ = tokio::time::sleep(timeout) => {
            {
                let mut r = reason.lock().unwrap_or_else(|p| p.into_inner());
                if r.is_none() {
                    *r = Some(StopReason::Timeout(timeout));
                }
            }
            stop.cancel();
            run.await
        }
    };
    shipping.cancel();
    let _ = shipper.await;

    let why = *reason.lock().unwrap_or_else(|p| p.into_inner());
    let mut result = to_result(outcome, why, dir.log_len(), &shared.config);
    if let Some((n, why)) = dir.log_drops() {
        let note = format!("{n} bytes of the task's output were dropped ({why})");
        // Said in the task's log too, when there is room for it again.
        if let Ok(mut w) = dir.log_writer() {
            w.append(format!("[delegate] {note}\n").as_bytes());
        }
        result.log_bytes = dir.log_len();
        result.message = Some(match result.message {
            Some(m) => format!("{m}; {note}"),
            None => note,
        });
    }
    result
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Outcome + why the supervisor stopped it → the result the manager gets.
fn to_result(
    outcome: ExecOutcome,
    why: Option<StopReason>,
    log_bytes: u64,
    config: &Config,
) -> TaskResult {
    let (exit_code, signal) = match &outcome {
        ExecOutcome::Exited(c) => (Some(*c), None),
        ExecOutcome::Signaled(s) => (None, Some(*s)),
        _ => (None, None),
    };
    let (outcome, message) = match (why, outcome) {
        (Some(StopReason::Timeout(t)), _) => (
            Outcome::TimedOut,
            Some(format!(
                "timed out after {}; the task was stopped",
                humantime::format_duration(t)
            )),
        ),
        (Some(StopReason::Cancelled), _) => {
            (Outcome::Cancelled, Some("cancelled on request".into()))
        }
        (Some(StopReason::Shutdown), _) => (
            Outcome::Cancelled,
            Some(format!(
                "the delegate was stopped before the task finished (drain timeout {})",
                humantime::format_duration(config.drain_timeout)
            )),
        ),
        (Some(StopReason::Revoked), _) => {
            (Outcome::Lost, Some("the manager revoked the task".into()))
        }
        (None, ExecOutcome::Exited(0)) => (Outcome::Succeeded, None),
        (None, ExecOutcome::Exited(c)) => (Outcome::Failed, Some(format!("exited with code {c}"))),
        (None, ExecOutcome::Signaled(s)) => (
            Outcome::Failed,
            Some(format!("killed by {}", signal_name(s))),
        ),
        (
            None,
            ExecOutcome::Done {
                success: true,
                message,
            },
        ) => (Outcome::Succeeded, Some(message)),
        (
            None,
            ExecOutcome::Done {
                success: false,
                message,
            },
        ) => (Outcome::Failed, Some(message)),
        (None, ExecOutcome::CouldNotStart(m)) => (Outcome::Failed, Some(m)),
        (None, ExecOutcome::Lost(m)) => (Outcome::Lost, Some(m)),
    };
    TaskResult {
        outcome,
        exit_code,
        signal,
        message,
        log_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn config(state_dir: &std::path::Path) -> Config {
        Config {
            // Nothing listens on the discard port: reports to the manager fail quietly.
            manager_url: "http://127.0.0.1:9".into(),
            ca: None,
            token: Secret::new("dlg_test"),
            name: "unit".into(),
            tags: vec![],
            concurrency: 4,
            state_dir: state_dir.to_path_buf(),
            drain_timeout: Duration::from_secs(10),
            kill_grace: Duration::from_secs(1),
            acquire_wait: Duration::from_secs(1),
            log_level: "info".into(),
            shell_enabled: true,
            http_enabled: false,
            docker: DockerConfig {
                enabled: false,
                ..DockerConfig::default()
            },
            warnings: vec![],
        }
    }

    fn sleeper(id: &str, attempt: u32) -> Assignment {
        Assignment {
            task_id: id.into(),
            attempt,
            kind: "shell".into(),
            spec: serde_json::json!({"script": "sleep 30"}),
            timeout_secs: 60,
        }
    }

    /// Wait (bounded) until `done` holds of the supervisor's task table.
    async fn until(shared: &Arc<Shared>, what: &str, done: impl Fn(&Shared) -> bool) {
        assert!(
            wait_until(shared, Duration::from_secs(10), done).await,
            "timed out waiting for {what}"
        );
    }

    fn running(shared: &Shared, key: &TaskAttempt) -> bool {
        shared.lock_tasks().get(key).is_some_and(|t| t.running)
    }

    /// After a lease lapses the manager may lease attempt 2 to the same agent before a
    /// heartbeat revokes attempt 1. Keyed by task id, attempt 2's handle replaced attempt
    /// 1's and attempt 1 ending removed attempt 2's: it could no longer be cancelled and
    /// dropped out of heartbeats.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_attempt_leased_while_the_first_runs_does_not_clobber_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let shared = Daemon::new(config(tmp.path())).expect("daemon").shared;
        let (one, two) = (sleeper("t_twice", 1), sleeper("t_twice", 2));
        let (k1, k2) = (key_of(&one), key_of(&two));
        for a in [one, two] {
            let permit = shared.slots.clone().try_acquire_owned().expect("slot");
            spawn_task(shared.clone(), a, permit);
        }
        until(&shared, "both attempts running", |s| s.running_count() == 2).await;
        let hb = heartbeat_request(&shared);
        assert_eq!(hb.in_flight, ["t_twice"]);
        assert_eq!(hb.in_flight_attempts, [k1.clone(), k2.clone()]);

        // The manager revokes attempt 1 only: attempt 2 keeps running and heartbeating.
        shared.stop_attempt(&k1, StopReason::Revoked);
        until(&shared, "attempt 1 gone", |s| {
            !s.lock_tasks().contains_key(&k1)
        })
        .await;
        assert!(
            running(&shared, &k2),
            "attempt 2 was stopped with attempt 1"
        );
        assert_eq!(
            heartbeat_request(&shared).in_flight_attempts,
            std::slice::from_ref(&k2)
        );

        // And a user's cancel still reaches attempt 2.
        shared.stop_task("t_twice", StopReason::Cancelled);
        until(&shared, "attempt 2 stopped", |s| !running(s, &k2)).await;
        let reason = shared
            .lock_tasks()
            .get(&k2)
            .map(|t| *t.reason.lock().unwrap_or_else(|p| p.into_inner()));
        // Delivered or still delivering: either way it ended as cancelled.
        assert!(
            matches!(reason, None | Some(Some(StopReason::Cancelled))),
            "{reason:?}"
        );
        shared.stopped.cancel();
    }
}
