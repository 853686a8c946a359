//! Start-up recovery: what an earlier run of the agent left in the spool is delivered,
//! re-attached to, or reported lost, so no task waits for its lease to lapse.

use std::sync::Arc;

use delegate_protocol::{Outcome, TaskResult};
use tracing::{Instrument, error, info, warn};

use super::delivery::deliver;
use super::supervise::{report_unjournalled, spawn_adopted, task_span};
use super::{Shared, TaskHandle, key_of};
use crate::exec::{Kind, Restart, shell};
use crate::spool::{Found, Quarantined, Recovered};

/// Pick up what an earlier run left in the spool: undelivered results are sent again;
/// docker tasks still running are adopted (their containers outlive the agent) and
/// kubernetes tasks run again (they are idempotent); other
/// tasks that were running when the agent died are stopped (if anything of them is left)
/// and reported as lost at once, so the manager can retry them without waiting for the
/// lease to lapse.
pub(super) fn recover_spool(shared: &Arc<Shared>) {
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
        // Each kind's executor says whether its unfinished work is taken up again (a
        // container or unit outlives the agent, kubernetes actions are idempotent).
        if rec.result.is_none()
            && let Some(kind) = Kind::parse(&rec.assignment.kind)
            && let Restart::Adopt(what) =
                kind.on_restart(&rec.dir.records(), shared.runs_kind(kind.name()))
        {
            info!(task_id = %rec.assignment.task_id, attempt = rec.assignment.attempt, "{what}");
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
                if let Some(pid) = shell::kill_leftover(&rec.dir.records()) {
                    message.push_str(&format!("; its leftover process group {pid} was killed"));
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
                shared.metrics.task_finished(r.outcome);
                r
            }
        };
        let handle = TaskHandle::Delivering { stopped_for: None };
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
    shell::kill_leftover(&q.records);
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
