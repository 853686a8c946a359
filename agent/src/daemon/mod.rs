//! The daemon behind `delegate run`: register, heartbeat, long-poll for tasks, supervise
//! them, deliver their logs and results, and drain on request.
//!
//! Data flows one way: manager → (client) → supervisor → executor → spool → (client) →
//! manager. The supervisor is the only place that knows about both the manager and the
//! executors; every task it accepts is journalled in the spool before it starts.
//!
//! `session` talks to the manager (register, heartbeat, long poll), `supervise` runs one
//! task from assignment to delivered result, `delivery` ships its log and result, and
//! `recover` picks up what an earlier run left in the spool, and `targets` probes which
//! targets answer. This file holds what they share and the life of the process: start,
//! drain, stop. The life-cycle is one value ([`crate::state::AgentState`]) in one `watch`:
//! every loop that must end when the agent drains or stops waits on that value.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use delegate_protocol::{Assignment, ErrorCode, HeartbeatRequest, Target, TaskAttempt};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

mod delivery;
mod recover;
mod session;
mod supervise;
mod targets;

use recover::recover_spool;
use session::session;
use targets::{probe_clusters, probe_docker, watch_clusters};

use crate::client::{ClientError, ManagerClient};
use crate::config::{Config, DockerConfig, KubeCluster, ShellMode};
use crate::exec::{self, ShellRunner};
use crate::notify;
use crate::spool::{Spool, SpoolError};
use crate::state::{AgentState, Event, Rejection, StopCause, TransitionError, transition};

/// Requests from signals and D-Bus to the daemon. Those from D-Bus carry a [`Reply`]: the
/// caller learns whether the agent's state allowed the request.
#[derive(Debug)]
pub enum Control {
    /// Stop taking tasks; in-flight ones go on (D-Bus `Drain()`).
    Drain(Reply),
    /// Take tasks again (D-Bus `Resume()`).
    Resume(Reply),
    /// D-Bus `Handover()`, for an upgrade: stop taking tasks and wait only for work a new
    /// agent cannot adopt; `drained` then means the rest (task units, containers,
    /// Kubernetes actions) is journalled and left running, and the next SIGTERM exits at
    /// once without stopping it. The new agent adopts it from the spool.
    Handover(Reply),
    /// SIGTERM: drain, then exit once in-flight work is done or the drain timeout passed.
    Shutdown,
    /// Second SIGTERM or SIGINT: cancel in-flight work now and exit.
    Abort,
}

/// Where the daemon answers a request: `Ok` once the state changed (or already was what
/// was asked), or the transition table's refusal.
#[derive(Debug, Default)]
pub struct Reply(Option<oneshot::Sender<Result<(), TransitionError>>>);

impl Reply {
    /// A reply the caller waits for on the returned receiver; a receiver that sees the
    /// sender dropped means the daemon stopped before answering.
    pub fn channel() -> (Reply, oneshot::Receiver<Result<(), TransitionError>>) {
        let (tx, rx) = oneshot::channel();
        (Reply(Some(tx)), rx)
    }

    /// Nobody waits for the answer.
    pub fn none() -> Reply {
        Reply(None)
    }

    fn send(self, answer: Result<(), TransitionError>) {
        if let Some(tx) = self.0 {
            // The caller may have given up waiting; the state changed (or not) regardless.
            let _ = tx.send(answer);
        }
    }
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

/// A task the agent holds, by where it is in its life here.
enum TaskHandle {
    /// Its executor runs.
    Running {
        /// Cancelled to ask the executor to stop.
        stop: CancellationToken,
        /// The first reason given for stopping it; decides the reported outcome.
        reason: Arc<Mutex<Option<StopReason>>>,
        /// Its work outlives the agent and a restarted agent re-attaches to it: a task
        /// unit, a container, a Kubernetes action (run again, idempotent).
        adoptable: bool,
    },
    /// Ran (here or in an earlier run of the agent); its log and result are being
    /// delivered. `stopped_for`: why it was stopped, if it was (the result already says
    /// so; tests read it here).
    Delivering {
        #[cfg_attr(not(test), allow(dead_code))]
        stopped_for: Option<StopReason>,
    },
}

impl TaskHandle {
    /// Ask the task to stop; the first reason given is the one reported. A task that
    /// already ran has nothing left to stop.
    fn stop_for(&self, reason: StopReason) {
        if let TaskHandle::Running {
            stop, reason: r, ..
        } = self
        {
            let mut r = r.lock().unwrap_or_else(|p| p.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
            stop.cancel();
        }
    }

    fn is_running(&self) -> bool {
        matches!(self, TaskHandle::Running { .. })
    }

    /// Does a drain wait for this task? `leaves_adoptable`: after `Handover()`, only for
    /// work a new agent cannot adopt.
    fn blocks_drain(&self, leaves_adoptable: bool) -> bool {
        match self {
            TaskHandle::Running { adoptable, .. } => !(leaves_adoptable && *adoptable),
            TaskHandle::Delivering { .. } => false,
        }
    }

    /// The executor is done: what is left is delivering the result.
    fn ran(&mut self) {
        if let TaskHandle::Running { reason, .. } = self {
            let stopped_for = *reason.lock().unwrap_or_else(|p| p.into_inner());
            *self = TaskHandle::Delivering { stopped_for };
        }
    }

    /// Why the task was asked to stop, if it was.
    #[cfg(test)]
    fn stop_reason(&self) -> Option<StopReason> {
        match self {
            TaskHandle::Running { reason, .. } => *reason.lock().unwrap_or_else(|p| p.into_inner()),
            TaskHandle::Delivering { stopped_for } => *stopped_for,
        }
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
    /// The agent's life-cycle: the one value every drain and stop is decided in and read
    /// from (polls end, retries give up, the rejection and its message).
    state: watch::Sender<AgentState>,
    delegate_id: watch::Sender<Option<String>>,
    connected: watch::Sender<bool>,
    tasks: Mutex<HashMap<TaskAttempt, TaskHandle>>,
    slots: Arc<Semaphore>,
    slot_freed: Notify,
    /// Bumped whenever a task starts, stops running or is delivered.
    tasks_changed: watch::Sender<u64>,
    in_flight: watch::Sender<u32>,
    metrics: crate::metrics::Metrics,
    /// How shell tasks run now: units once they are usable, the agent's children only
    /// where the config says so.
    shell: watch::Sender<ShellRunner>,
}

impl Shared {
    /// Move the agent by `event` through the one table; the caller decides what a refusal
    /// means (a D-Bus caller gets it back, internal paths log it).
    fn apply(&self, event: Event) -> Result<(), TransitionError> {
        let mut refused = Ok(());
        self.state.send_if_modified(|s| match transition(s, event) {
            Ok(next) if next != *s => {
                // Operators see the wire names; a change of mode alone is a detail.
                if next.wire() != s.wire() {
                    info!(from = %s, to = %next, "agent state changed");
                } else {
                    debug!(from = ?s, to = ?next, "agent state changed");
                }
                *s = next;
                true
            }
            Ok(_) => false,
            Err(e) => {
                refused = Err(e);
                false
            }
        });
        self.update_status();
        refused
    }

    /// [`Self::apply`] for the daemon's own events, whose refusal only means the agent has
    /// moved on (a registration completing while it stops, a rejection during an exit).
    fn apply_or_log(&self, event: Event) {
        if let Err(e) = self.apply(event) {
            debug!("ignored: {e}");
        }
    }

    /// A request from D-Bus: apply it and answer the caller. Returns whether it applied.
    fn request(&self, event: Event, reply: Reply) -> bool {
        let answer = self.apply(event);
        if let Err(e) = &answer {
            debug!("refused: {e}");
        }
        let applied = answer.is_ok();
        reply.send(answer);
        applied
    }

    /// Resolves once `pred` holds of the state (at once when it holds now).
    async fn until(&self, pred: impl FnMut(&AgentState) -> bool) {
        let mut state = self.state.subscribe();
        // `self` holds the sender, so the wait ends only when `pred` holds.
        let _ = state.wait_for(pred).await;
    }

    /// Long polls and registration attempts end now.
    fn polls_end(&self) -> bool {
        self.state.borrow().polls_end()
    }

    async fn polls_ended(&self) {
        self.until(AgentState::polls_end).await
    }

    /// The process is about to exit: retry loops give up, the spool keeps what they had
    /// not delivered.
    fn gives_up(&self) -> bool {
        self.state.borrow().gives_up()
    }

    async fn stopped(&self) {
        self.until(AgentState::gives_up).await
    }

    /// The manager rejected the token or refused the registration.
    async fn rejected(&self) {
        self.until(|s| s.rejection().is_some()).await
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

    /// The first rejection stops the agent (the main loop stops its tasks); later ones,
    /// and one during an exit drain, change nothing.
    fn reject(&self, why: Rejection) {
        self.apply_or_log(Event::Reject(why));
    }

    fn running_count(&self) -> usize {
        self.lock_tasks()
            .values()
            .filter(|t| t.is_running())
            .count()
    }

    /// Running tasks a drain must wait for: all of them, or after `Handover()` those a
    /// new agent cannot adopt.
    fn blocking_count(&self) -> usize {
        let leaves_adoptable = self.state.borrow().leaves_adoptable();
        self.lock_tasks()
            .values()
            .filter(|t| t.blocks_drain(leaves_adoptable))
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
        let draining = matches!(*self.state.borrow(), AgentState::Draining { .. });
        if draining && self.blocking_count() == 0 {
            self.apply_or_log(Event::Idle);
        } else {
            self.update_status();
        }
    }

    fn update_status(&self) {
        let state = self.state.borrow().wire();
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
            metrics: crate::metrics::Metrics::new(),
            shell: watch::Sender::new(shell_at_start),
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
    let background = Background { session, watchdog };

    // Wait for the first request to stop (or the manager's rejection); drains and
    // resumes in between.
    let leaving = loop {
        let c = tokio::select! {
            // A rejection wins over a request that came at the same moment: it decides the
            // exit code.
            biased;
            _ = shared.rejected() => break Leaving::Rejected,
            c = control.recv() => c,
        };
        match c {
            Some(Control::Drain(reply)) => {
                if shared.request(Event::Drain, reply) {
                    begin_drain(&shared).await;
                }
            }
            Some(Control::Handover(reply)) => {
                if shared.request(Event::Handover, reply) {
                    info!(
                        "handing over: taking no new tasks; task units, containers and Kubernetes actions are left running for the next agent"
                    );
                    begin_drain(&shared).await;
                }
            }
            Some(Control::Resume(reply)) => {
                // An upgrade that stopped before its restart resumes the agent: a later
                // stop drains again (the table drops the handover with the drain).
                let registered = shared.delegate_id.borrow().is_some();
                if shared.request(Event::Resume { registered }, reply) {
                    // The manager holds back tasks from a draining delegate until told.
                    tell_manager_state(&shared).await;
                    shared.slot_freed.notify_one();
                }
            }
            Some(Control::Shutdown) | None => break Leaving::Shutdown,
            Some(Control::Abort) => break Leaving::Abort,
        }
    };

    // `None`: stopped by a rejection.
    let drain_ended = match leaving {
        Leaving::Rejected => None,
        Leaving::Shutdown | Leaving::Abort => {
            notify::stopping();
            // Refused only when a rejection stopped the agent meanwhile.
            match shared.apply(Event::Shutdown) {
                Ok(()) => {
                    // Drained first, also when the drain is cut short at once.
                    begin_exit_drain(&shared).await;
                    Some(match leaving {
                        Leaving::Abort => StopCause::Aborted,
                        _ => wait_for_drain(&shared, &mut control).await,
                    })
                }
                Err(e) => {
                    debug!("ignored: {e}");
                    None
                }
            }
        }
    };
    // Requests that come while the agent stops get the table's answer at once.
    let late = tokio::spawn(answer_late(shared.clone(), control).in_current_span());
    let result = match drain_ended {
        Some(why) => stop(&shared, why).await,
        None => stop_for_rejected_token(&shared).await,
    };
    late.abort();
    background.end();
    result
}

/// What ended the main loop.
#[derive(Clone, Copy)]
enum Leaving {
    /// SIGTERM (or no one left to send requests): drain, then exit.
    Shutdown,
    /// A second stop request came before the drain began: cancel what runs at once.
    Abort,
    /// The manager rejected the token or refused the registration.
    Rejected,
}

/// What runs beside the main loop until the process exits.
struct Background {
    session: tokio::task::JoinHandle<()>,
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn end(self) {
        self.session.abort();
        if let Some(w) = self.watchdog {
            w.abort();
        }
    }
}

/// The exit drain is over (`why`): hand over what runs, or cancel what is left, give
/// results a bounded moment to be delivered, and exit.
async fn stop(shared: &Arc<Shared>, why: StopCause) -> Result<(), DaemonError> {
    if shared.state.borrow().leaves_adoptable() && why != StopCause::Aborted {
        // Everything still running is journalled and outlives this process; the next
        // agent adopts it. Stopping it here would undo the handover.
        let left = shared.running_count();
        shared.apply_or_log(Event::Stop(StopCause::HandedOver));
        shared.apply_or_log(Event::Exit);
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
            if why == StopCause::Aborted {
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
        wait_until(shared, limit, |s| s.running_count() == 0).await;
    }
    // Polls end here.
    shared.apply_or_log(Event::Stop(why));
    // Give result deliveries a bounded moment; what is left stays in the spool and is
    // sent by the next start.
    let delivered = wait_until(shared, Duration::from_secs(10), |s| {
        s.lock_tasks().is_empty()
    })
    .await;
    shared.apply_or_log(Event::Exit);
    if !delivered {
        let n = shared.lock_tasks().len();
        warn!(
            tasks = n,
            "results not yet delivered stay in the spool for the next start"
        );
    }
    info!("delegate stopped");
    Ok(())
}

/// Answer requests that come while the agent stops: `Drain()` is already done, the rest
/// is refused by the table; further stop requests change nothing.
async fn answer_late(shared: Arc<Shared>, mut control: mpsc::Receiver<Control>) {
    while let Some(c) = control.recv().await {
        match c {
            Control::Drain(reply) => shared.request(Event::Drain, reply),
            Control::Handover(reply) => shared.request(Event::Handover, reply),
            Control::Resume(reply) => {
                let registered = shared.delegate_id.borrow().is_some();
                shared.request(Event::Resume { registered }, reply)
            }
            Control::Shutdown | Control::Abort => false,
        };
    }
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
            _ = shared.stopped() => return,
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

/// The token is no longer accepted (the state is `stopping` for the rejection, so polls
/// have ended): stop every running task as revoked (killed, nothing reported, its spool
/// entry dropped) and say why. Results already waiting for delivery stay in the spool for
/// a start with a valid token.
async fn stop_for_rejected_token(shared: &Arc<Shared>) -> Result<(), DaemonError> {
    let running: Vec<TaskAttempt> = shared
        .lock_tasks()
        .iter()
        .filter(|(_, t)| t.is_running())
        .map(|(key, _)| key.clone())
        .collect();
    for key in &running {
        shared.stop_attempt(key, StopReason::Revoked);
    }
    let limit = shared.config.kill_grace + Duration::from_secs(5);
    wait_until(shared, limit, |s| s.running_count() == 0).await;
    shared.apply_or_log(Event::Exit);
    let rejection = shared.state.borrow().rejection().cloned();
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

/// The agent drains (its state says why): say `drained` at once when nothing it waits for
/// runs, and tell the manager at once, so a long poll in flight ends and no new task is
/// handed to this delegate. Returns whether the manager got it.
async fn begin_drain(shared: &Arc<Shared>) -> bool {
    if shared.blocking_count() == 0 {
        shared.apply_or_log(Event::Idle);
    }
    shared.slot_freed.notify_one();
    tell_manager_state(shared).await
}

/// [`begin_drain`] for the drain before the exit: a manager that cannot be told is not
/// waited on, so polls end now.
async fn begin_exit_drain(shared: &Arc<Shared>) {
    if !begin_drain(shared).await {
        shared.apply_or_log(Event::ManagerUnreachable);
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

/// Wait until nothing the drain waits for runs, the drain timeout passes, or a second
/// stop request comes; says which. Requests meanwhile get the table's answer.
async fn wait_for_drain(shared: &Arc<Shared>, control: &mut mpsc::Receiver<Control>) -> StopCause {
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
            return StopCause::Drained;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => return StopCause::DrainTimeout,
            c = control.recv() => match c {
                Some(Control::Abort) | Some(Control::Shutdown) => return StopCause::Aborted,
                Some(Control::Resume(reply)) => {
                    info!("resume ignored: the agent is stopping");
                    let registered = shared.delegate_id.borrow().is_some();
                    shared.request(Event::Resume { registered }, reply);
                }
                Some(Control::Drain(reply)) => {
                    shared.request(Event::Drain, reply);
                }
                Some(Control::Handover(reply)) => {
                    shared.request(Event::Handover, reply);
                }
                None => {}
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
        state: shared.state.borrow().wire(),
        in_flight: ids,
        in_flight_attempts: attempts,
    }
}

/// Take a daemon that is not running straight to `stopped`, so what its tests started
/// gives up.
#[cfg(test)]
fn stop_now(shared: &Shared) {
    for e in [
        Event::Shutdown,
        Event::Stop(StopCause::Aborted),
        Event::Exit,
    ] {
        shared.apply_or_log(e);
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
