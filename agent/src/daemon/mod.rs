//! The daemon behind `delegate run`: register, heartbeat, long-poll for tasks, supervise
//! them, deliver their logs and results, and drain on request.
//!
//! Data flows one way: manager → (client) → supervisor → executor → spool → (client) →
//! manager. The supervisor is the only place that knows about both the manager and the
//! executors; every task it accepts is journalled in the spool before it starts.
//!
//! `session` talks to the manager (register, heartbeat, long poll), `supervise` runs one
//! task from assignment to delivered result, `delivery` ships its log and result, and
//! `recover` picks up what an earlier run left in the spool. This file holds what they
//! share and the life of the process: start, drain, stop.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use delegate_protocol::{Assignment, ErrorCode, HeartbeatRequest, Target, TaskAttempt};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

mod delivery;
mod recover;
mod session;
mod supervise;

use recover::recover_spool;
use session::session;

use crate::client::{ClientError, ManagerClient};
use crate::config::{Config, DockerConfig, KubeCluster, ShellMode};
use crate::exec::{self, ShellRunner};
use crate::notify;
use crate::spool::{Spool, SpoolError};
use crate::state::{AgentState, Event, transition};

/// Requests from signals and D-Bus to the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop taking tasks; in-flight ones go on (D-Bus `Drain()`).
    Drain,
    /// Take tasks again (D-Bus `Resume()`).
    Resume,
    /// D-Bus `Handover()`, for an upgrade: stop taking tasks and wait only for work a new
    /// agent cannot adopt; `drained` then means the rest (task units, containers,
    /// Kubernetes actions) is journalled and left running, and the next SIGTERM exits at
    /// once without stopping it. The new agent adopts it from the spool.
    Handover,
    /// SIGTERM: drain, then exit once in-flight work is done or the drain timeout passed.
    Shutdown,
    /// Second SIGTERM or SIGINT: cancel in-flight work now and exit.
    Abort,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The cause is the source (printed by the binary's `{:#}`), not in the message.
    #[error("cannot use the state directory")]
    Spool(#[from] SpoolError),
    #[error("cannot set up the manager client")]
    Client(#[from] ClientError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
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
    /// The manager refused the registration itself: the name is another token's
    /// (`name_taken`) or the tags are outside the token's set (`tags_not_allowed`). Like a
    /// rejected token, only an operator can fix it (the manager's message says how).
    #[error("the manager at {manager_url} refused to register this delegate: {message}")]
    RegistrationRefused {
        manager_url: String,
        message: String,
    },
}

/// Why the manager will not work with this agent until an operator acts.
#[derive(Debug, Clone)]
enum Rejection {
    Token(String),
    Registration(String),
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
    /// Its work outlives the agent and a restarted agent re-attaches to it: a task unit,
    /// a container, a Kubernetes action (run again, idempotent).
    adoptable: bool,
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
    kubernetes: Arc<Vec<KubeCluster>>,
    /// Names of the clusters that answered; only they are advertised.
    kube_up: Mutex<BTreeSet<String>>,
    /// A cluster came up since the last registration: register again to advertise it.
    targets_changed: AtomicBool,
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
    /// Cancelled at the first 401 from the manager (or a refused registration);
    /// `rejection` says which and holds the manager's message.
    token_rejected: CancellationToken,
    rejection: Mutex<Option<Rejection>>,
    metrics: crate::metrics::Metrics,
    /// How shell tasks run now: units once they are usable, the agent's children only
    /// where the config says so.
    shell: watch::Sender<ShellRunner>,
    /// `Handover()` was asked: adoptable tasks do not hold up `drained` or the exit.
    handover: AtomicBool,
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
        self.reject(Rejection::Token(message.clone()));
        true
    }

    /// Like [`Self::check_token_rejected`], for the answers to `register` that only an
    /// operator can change: 401, `name_taken`, `tags_not_allowed`.
    fn check_registration_refused(&self, e: &ClientError) -> bool {
        match e {
            ClientError::Api {
                code: ErrorCode::NameTaken | ErrorCode::TagsNotAllowed,
                message,
                ..
            } => {
                self.reject(Rejection::Registration(message.clone()));
                true
            }
            e => self.check_token_rejected(e),
        }
    }

    fn reject(&self, why: Rejection) {
        let mut r = self.rejection.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(why);
        }
        self.token_rejected.cancel();
    }

    fn running_count(&self) -> usize {
        self.lock_tasks().values().filter(|t| t.running).count()
    }

    /// Running tasks a drain must wait for: all of them, or after `Handover()` those a
    /// new agent cannot adopt.
    fn blocking_count(&self) -> usize {
        let handover = self.handover.load(Ordering::Acquire);
        self.lock_tasks()
            .values()
            .filter(|t| t.running && !(handover && t.adoptable))
            .count()
    }

    /// Would a restarted agent re-attach to a task of this kind?
    fn adoptable(&self, kind: &str) -> bool {
        exec::Kind::parse(kind)
            .is_some_and(|k| k.facts(&self.config, &self.shell.borrow()).adoptable)
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
        if *self.state.borrow() == AgentState::Draining && self.blocking_count() == 0 {
            self.apply(Event::Idle);
        } else {
            self.update_status();
        }
    }

    fn update_status(&self) {
        let state = *self.state.borrow();
        let running = self.running_count();
        let link = if *self.connected.borrow() {
            format!("connected to {}", self.client.url())
        } else {
            format!("not connected to {}", self.client.url())
        };
        notify::status(&format!("{state}, {link}, {running} tasks running"));
    }

    fn set_connected(&self, up: bool) {
        if self
            .connected
            .send_if_modified(|c| std::mem::replace(c, up) != up)
        {
            self.metrics.set_connected(up);
            if up {
                info!(manager = %self.client.url(), "connected to the manager");
            }
            self.update_status();
        }
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        if self.config.shell_enabled && !matches!(*self.shell.borrow(), ShellRunner::Waiting(_)) {
            t.push(Target {
                kind: exec::Kind::Shell.name().into(),
                name: None,
            });
        }
        if self.config.http_enabled {
            t.push(Target {
                kind: exec::Kind::Http.name().into(),
                name: None,
            });
        }
        if self.config.docker.enabled && self.docker_up.load(Ordering::Relaxed) {
            t.push(Target {
                kind: exec::Kind::Docker.name().into(),
                name: None,
            });
        }
        let up = self.kube_up.lock().unwrap_or_else(|p| p.into_inner());
        for name in up.iter() {
            t.push(Target {
                kind: exec::Kind::Kubernetes.name().into(),
                name: Some(name.clone()),
            });
        }
        t
    }

    /// Kinds this agent runs. Docker counts when enabled even if the engine is down right
    /// now: the task then fails naming the engine's problem, and works once it is back.
    fn runs_kind(&self, kind: &str) -> bool {
        exec::Kind::parse(kind).is_some_and(|k| k.facts(&self.config, &self.shell.borrow()).runs)
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
    client: ManagerClient,
}

impl Observer {
    /// The manager node the agent uses now (it moves on when one cannot be reached).
    pub fn manager_url(&self) -> String {
        self.client.url().to_string()
    }
}

impl Daemon {
    pub fn new(config: Config) -> Result<Daemon, DaemonError> {
        // Units are detected when the daemon runs; until then shell tasks wait for them.
        let shell_at_start = if uses_units(config.shell_mode) {
            ShellRunner::Waiting("task units are not detected yet".into())
        } else {
            ShellRunner::Children
        };
        let spool = Spool::open(&config.state_dir)?.with_log_cap(config.max_log_bytes);
        let client = ManagerClient::new(
            &config.manager_urls,
            config.token.expose(),
            &format!("delegate/{}", crate::VERSION),
            config.ca.as_ref().map(|c| c.pem.as_slice()),
        )?;
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.concurrency as usize)),
            docker: Arc::new(config.docker.clone()),
            docker_up: AtomicBool::new(false),
            kubernetes: Arc::new(config.kubernetes.clone()),
            kube_up: Mutex::new(BTreeSet::new()),
            targets_changed: AtomicBool::new(false),
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
            metrics: crate::metrics::Metrics::new(),
            shell: watch::Sender::new(shell_at_start),
            handover: AtomicBool::new(false),
        });
        Ok(Daemon { shared })
    }

    pub fn observer(&self) -> Observer {
        Observer {
            state: self.shared.state.subscribe(),
            connected: self.shared.connected.subscribe(),
            delegate_id: self.shared.delegate_id.subscribe(),
            in_flight: self.shared.in_flight.subscribe(),
            client: self.shared.client.clone(),
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
    // Bound first so a taken port stops the start with a clear error; served until
    // this function returns (the guard aborts it).
    let _metrics = match shared.config.metrics_listen {
        Some(addr) => Some(serve_metrics(&shared, addr).await?),
        None => None,
    };
    probe_docker(&shared, false).await;
    probe_clusters(&shared, true).await;
    tokio::spawn(watch_clusters(shared.clone()).in_current_span());
    if shared.config.shell_enabled {
        choose_shell_runner(&shared).await;
    }
    recover_spool(&shared);
    notify::ready();
    shared.update_status();
    info!(
        version = crate::VERSION,
        manager = %shared.config.manager_urls.join(", "),
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
            Some(Control::Handover) => {
                shared.handover.store(true, Ordering::Release);
                info!(
                    "handing over: taking no new tasks; task units, containers and Kubernetes actions are left running for the next agent"
                );
                begin_drain(&shared, false).await;
            }
            Some(Control::Resume) => {
                // An upgrade that stopped before its restart resumes the agent: a later
                // stop drains again.
                shared.handover.store(false, Ordering::Release);
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
    if shared.handover.load(Ordering::Acquire) && !aborted {
        // Everything still running is journalled and outlives this process; the next
        // agent adopts it. Stopping it here would undo the handover.
        let left = shared.running_count();
        shared.apply(Event::Stop);
        shared.stopped.cancel();
        session.abort();
        if let Some(w) = watchdog {
            w.abort();
        }
        info!(
            tasks = left,
            "delegate stopped; its running tasks are handed over to the next start"
        );
        return Ok(());
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

/// How shell tasks run: as `delegate-task@` units under systemd, never falling back to
/// the agent's own children on an error (tasks would then share its user, token and
/// spool); until units can be used, shell tasks are not taken and detection is retried.
/// Children only where the config says so, or with no systemd at all.
async fn choose_shell_runner(shared: &Arc<Shared>) {
    if !uses_units(shared.config.shell_mode) {
        let why = if shared.config.shell_mode == ShellMode::Children {
            "[shell] mode = \"children\""
        } else {
            "not running as a systemd service"
        };
        warn!(
            "shell tasks run as children of the agent: they share its user and its access (config, token, spool, Docker socket) and do not survive an agent restart ({why})"
        );
        shared.shell.send_replace(ShellRunner::Children);
        return;
    }
    match crate::exec::unit::TaskUnits::detect().await {
        Ok(u) => use_task_units(shared, u),
        Err(why) => {
            warn!(
                "shell tasks wait: they run only as {} units, which cannot be used now: {why}; retrying every {} s (to run them as the agent's children instead, sharing its user, token and spool, set [shell] mode = \"children\")",
                crate::exec::unit::TEMPLATE,
                UNITS_RETRY.as_secs()
            );
            shared.shell.send_replace(ShellRunner::Waiting(why));
            tokio::spawn(retry_task_units(shared.clone()).in_current_span());
        }
    }
}

/// Does `mode` run shell tasks as units here (`auto`: when this agent is a systemd service)?
fn uses_units(mode: ShellMode) -> bool {
    match mode {
        ShellMode::Units => true,
        ShellMode::Children => false,
        ShellMode::Auto => {
            std::env::var_os("INVOCATION_ID").is_some()
                && std::path::Path::new("/run/systemd/system").is_dir()
        }
    }
}

/// How often a failed detection of task units is tried again.
const UNITS_RETRY: Duration = Duration::from_secs(10);

fn use_task_units(shared: &Shared, u: crate::exec::unit::TaskUnits) {
    info!("shell tasks run as {} units", crate::exec::unit::TEMPLATE);
    shared.shell.send_replace(ShellRunner::Units(Arc::new(u)));
    // Registered again at the next heartbeat, now offering shell tasks.
    shared.targets_changed.store(true, Ordering::Relaxed);
}

async fn retry_task_units(shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.stopped.cancelled() => return,
            _ = tokio::time::sleep(UNITS_RETRY) => {}
        }
        match crate::exec::unit::TaskUnits::detect().await {
            Ok(u) => return use_task_units(&shared, u),
            Err(why) => {
                debug!("task units still cannot be used: {why}");
                shared.shell.send_replace(ShellRunner::Waiting(why));
            }
        }
    }
}

/// Start the opt-in metrics listener; tasks running and spool bytes are read per scrape.
async fn serve_metrics(
    shared: &Arc<Shared>,
    addr: std::net::SocketAddr,
) -> Result<crate::metrics::Server, DaemonError> {
    let listener = crate::metrics::bind(addr).await?;
    // The bound address, so `127.0.0.1:0` (tests) says which port it got.
    let bound = listener.local_addr().unwrap_or(addr);
    info!(addr = %bound, "serving metrics on http://{bound}/metrics");
    let weak = Arc::downgrade(shared);
    let render = move || match weak.upgrade() {
        Some(s) => s.metrics.render(s.running_count(), s.spool.root()),
        None => String::new(),
    };
    Ok(crate::metrics::Server::spawn(listener, Arc::new(render)))
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
    let rejection = shared
        .rejection
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let manager_url = shared.client.url().to_string();
    Err(match rejection {
        Some(Rejection::Registration(message)) => DaemonError::RegistrationRefused {
            manager_url,
            message,
        },
        Some(Rejection::Token(message)) => DaemonError::TokenRejected {
            manager_url,
            message,
            stopped: running.len(),
        },
        None => DaemonError::TokenRejected {
            manager_url,
            message: String::new(),
            stopped: running.len(),
        },
    })
}

/// Stop taking tasks and tell the manager at once, so a long poll in flight ends and no
/// new task is handed to this delegate. `for_exit`: the process will stop afterwards.
async fn begin_drain(shared: &Arc<Shared>, for_exit: bool) {
    shared.apply(Event::Drain);
    if shared.blocking_count() == 0 {
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
        if shared.blocking_count() == 0 {
            return false;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => return false,
            c = control.recv() => match c {
                Some(Control::Abort) | Some(Control::Shutdown) => return true,
                Some(Control::Resume) => info!("resume ignored: the agent is stopping"),
                Some(Control::Drain) | Some(Control::Handover) | None => {}
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

/// How often clusters that did not answer are asked again.
const CLUSTER_RECHECK: Duration = Duration::from_secs(10);

/// Ask every cluster not yet seen up for its version. Each one that does not answer is
/// logged once as a warning naming the cluster and the cause (`first`), then quietly
/// re-checked; one that answers is advertised from the next registration on. Returns true
/// when a cluster came up.
async fn probe_clusters(shared: &Shared, first: bool) -> bool {
    let mut came_up = false;
    for cluster in shared.kubernetes.iter() {
        let known = shared
            .kube_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&cluster.name);
        if known {
            continue;
        }
        match exec::kubernetes::probe(cluster).await {
            Ok(version) => {
                info!(cluster = %cluster.name, "Kubernetes cluster {} answers (server {version}); offering target kubernetes:{}", cluster.name, cluster.name);
                shared
                    .kube_up
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(cluster.name.clone());
                came_up = true;
            }
            Err(e) if first => warn!(
                cluster = %cluster.name,
                "kubernetes:{} not offered: {} (re-checked every {}s; other targets run as usual)",
                cluster.name,
                exec::kubernetes::error_text(&e),
                CLUSTER_RECHECK.as_secs()
            ),
            Err(e) => {
                debug!(cluster = %cluster.name, "cluster still not answering: {}", exec::kubernetes::error_text(&e))
            }
        }
    }
    came_up
}

/// Re-check clusters that did not answer until every one has.
async fn watch_clusters(shared: Arc<Shared>) {
    loop {
        let all_up = shared
            .kube_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            == shared.kubernetes.len();
        if all_up {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(CLUSTER_RECHECK) => {}
            _ = shared.stopped.cancelled() => return,
        }
        if probe_clusters(&shared, false).await {
            shared.targets_changed.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The binary prints `{:#}` (the whole chain); every cause must appear once. It read
    /// "cannot use the state directory: create directory X: …: create directory X: …".
    #[test]
    fn a_state_directory_error_says_its_cause_once() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("write");
        let mut config = crate::config::tests_support::minimal();
        config.state_dir = file.join("state");
        let Err(e) = Daemon::new(config) else {
            panic!("a state dir under a file must fail");
        };
        let text = format!("{:#}", anyhow::Error::from(e));
        assert!(
            text.starts_with("cannot use the state directory: create directory "),
            "{text}"
        );
        assert_eq!(text.matches("create directory").count(), 1, "{text}");
        assert_eq!(text.matches("Not a directory").count(), 1, "{text}");
    }
}
