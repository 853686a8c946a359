//! One task from assignment to delivered result: journal it, run its executor under its
//! timeout and stop requests, turn the outcome into a result, and hand that to delivery.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use delegate_protocol::{Assignment, Outcome, TaskAttempt, TaskResult, TaskSpec};
use nix::sys::signal::Signal;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::delivery::{deliver, ship_live};
use super::{Shared, StopReason, TaskHandle, key_of};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::exec::{self, ExecContext, ExecOutcome};
use crate::spool::TaskDir;

pub(super) fn task_span(a: &Assignment) -> tracing::Span {
    info_span!("task", task_id = %a.task_id, task_kind = %a.kind, attempt = a.attempt)
}

pub(super) fn spawn_task(shared: Arc<Shared>, a: Assignment, permit: OwnedSemaphorePermit) {
    let span = task_span(&a);
    tokio::spawn(supervise(shared, a, None, Some(permit)).instrument(span));
}

/// A task leased beyond the free slots is not run: it is reported `lost` at once, which
/// the manager re-queues while the task has retries left (a few tries, then its lease
/// lapses the same way).
pub(super) fn spawn_refusal(shared: Arc<Shared>, a: Assignment, leased: usize, free: u32) {
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
pub(super) async fn report_unjournalled(
    shared: &Shared,
    task_id: &str,
    attempt: u32,
    r: &TaskResult,
) {
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
pub(super) fn spawn_adopted(
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
        TaskHandle::Running {
            stop: stop.clone(),
            reason: reason.clone(),
            adoptable: shared.adoptable(&a.kind),
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
    // Reported beside the run, not before it; but before the result, which the manager
    // would otherwise take first for a task that ends at once, leaving it no start time.
    let report_start = (!adopt).then(|| {
        let client = shared.client.clone();
        let (id, attempt) = (a.task_id.clone(), a.attempt);
        tokio::spawn(async move {
            if let Err(e) = client.started(&id, attempt).await {
                debug!(task_id = %id, "could not report the start: {e}");
            }
        })
    });
    let result = execute(&shared, &a, &dir, adopt, stop.clone(), reason.clone()).await;
    if let Some(reported) = report_start {
        // Bounded by the request's own timeout; a failed report was logged above.
        let _ = reported.await;
    }
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
    shared.metrics.task_finished(result.outcome);

    drop(permit);
    if let Some(t) = shared.lock_tasks().get_mut(&key) {
        t.ran();
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

    let ctx = ExecContext {
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        dir: dir.path().to_path_buf(),
        log: Box::new(log),
        stop: stop.clone(),
        kill_grace: shared.config.kill_grace,
        journal: Box::new(dir.records()),
        adopt,
        delegate_name: shared.config.name.clone(),
        delegate_id: shared.delegate_id.borrow().clone(),
        docker: shared.docker.clone(),
        kubernetes: shared.kubernetes.clone(),
        shell: shared.shell.subscribe(),
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
        ExecOutcome::OomKilled => (None, Some(9)),
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
        (None, ExecOutcome::OomKilled) => (
            Outcome::Failed,
            Some("killed by the out-of-memory killer: the task went over its memory_max (or the host ran out of memory)".into()),
        ),
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
    use crate::daemon::{Daemon, heartbeat_request, wait_until};

    fn config(state_dir: &std::path::Path) -> Config {
        Config {
            state_dir: state_dir.to_path_buf(),
            ..crate::config::tests_support::minimal()
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
        shared.lock_tasks().get(key).is_some_and(|t| t.is_running())
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
        let reason = shared.lock_tasks().get(&k2).map(|t| t.stop_reason());
        // Delivered or still delivering: either way it ended as cancelled.
        assert!(
            matches!(reason, None | Some(Some(StopReason::Cancelled))),
            "{reason:?}"
        );
        crate::daemon::stop_now(&shared);
    }
}
