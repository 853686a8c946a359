//! A task's and a delegate's rows inside a PostgreSQL transaction: decoding their columns
//! and the per-row steps (load, own, forget, persist a change) that `PgStore`'s calls are
//! built from.

use delegate_protocol::{DelegateState, TaskState, TaskView, UnixMillis};
use postgres::Row;

use super::super::Reaped;
use super::notify::Note;
use super::pool::Tx;
use super::rules::{Held, Lease, Write, holder_gone_change};
use crate::error::StoreError;
use crate::lifecycle::{Change, Task};

/// Columns of a [`TaskView`], in the order [`task_view`] reads them.
pub(super) const TASK_VIEW_SQL: &str = "SELECT t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
     t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
     t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
     t.log_bytes, t.log_truncated FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id";

pub(super) fn u32_of(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

pub(super) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
#[error("{what} {value:?} in the database is not valid: {why}")]
pub(super) struct BadColumn {
    what: &'static str,
    value: String,
    why: String,
}

pub(super) fn bad(what: &'static str, value: &str, why: impl ToString) -> StoreError {
    StoreError::Invalid(
        BadColumn {
            what,
            value: value.chars().take(200).collect(),
            why: why.to_string(),
        }
        .to_string(),
    )
}

pub(super) fn json_of<T: serde::de::DeserializeOwned>(
    what: &'static str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| bad(what, s, e))
}

pub(super) fn state_of(s: &str) -> Result<TaskState, StoreError> {
    TaskState::parse(s).ok_or_else(|| bad("task state", s, "unknown state"))
}

pub(super) fn delegate_state_of(s: &str) -> Result<DelegateState, StoreError> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|e| bad("delegate state", s, e))
}

pub(super) fn task_view(r: &Row) -> Result<TaskView, StoreError> {
    Ok(TaskView {
        id: r.try_get(0)?,
        kind: r.try_get(1)?,
        spec: json_of("task spec", r.try_get(2)?)?,
        selectors: r.try_get(3)?,
        state: state_of(r.try_get(4)?)?,
        attempt: u32_of(r.try_get(5)?),
        retries: u32_of(r.try_get(6)?),
        timeout_secs: u64_of(r.try_get(7)?),
        cancel_requested: r.try_get(8)?,
        delegate_id: r.try_get(9)?,
        delegate_name: r.try_get(10)?,
        exit_code: r.try_get(11)?,
        signal: r.try_get(12)?,
        message: r.try_get(13)?,
        created_at: r.try_get(14)?,
        assigned_at: r.try_get(15)?,
        started_at: r.try_get(16)?,
        finished_at: r.try_get(17)?,
        log_bytes: u64_of(r.try_get(18)?),
        log_truncated: r.try_get(19)?,
    })
}

/// `(id, lifecycle task)` of a row `id, state, attempt, retries, cancel_requested`.
pub(super) fn held_task(r: &Row) -> Result<(String, Task), StoreError> {
    Ok((
        r.try_get(0)?,
        Task {
            state: state_of(r.try_get(1)?)?,
            attempt: u32_of(r.try_get(2)?),
            retries: u32_of(r.try_get(3)?),
            cancel_requested: r.try_get(4)?,
        },
    ))
}

/// Why a request of delegate `id` with `token_name` was refused (its token was revoked,
/// or the delegate is not its own); called once the fast statement found nothing.
pub(super) fn own_delegate(tx: &mut Tx<'_>, id: &str, token_name: &str) -> Result<(), StoreError> {
    live_token_tags(tx, token_name)?;
    tx.opt(
        "SELECT 1 FROM delegates WHERE id = $1 AND token_name = $2",
        &[&id, &token_name],
    )?
    .ok_or_else(|| StoreError::DelegateNotFound(id.to_string()))?;
    Ok(())
}

/// The attempt a task is on now (only asked when an agent names two attempts of it).
pub(super) fn current_attempt(tx: &mut Tx<'_>, id: &str) -> Result<Option<u32>, StoreError> {
    Ok(tx
        .opt("SELECT attempt FROM tasks WHERE id = $1", &[&id])?
        .map(|r| r.try_get::<_, i64>(0).map(u32_of))
        .transpose()?)
}

pub(super) fn live_token_tags(
    tx: &mut Tx<'_>,
    name: &str,
) -> Result<Option<Vec<String>>, StoreError> {
    let row = tx
        .opt(
            "SELECT tags FROM tokens WHERE name = $1 AND revoked_at IS NULL",
            &[&name],
        )?
        .ok_or_else(|| StoreError::TokenRevoked(name.to_string()))?;
    let tags: Option<String> = row.try_get(0)?;
    tags.map(|t| json_of("token tags", &t)).transpose()
}

pub(super) fn load_view(tx: &mut Tx<'_>, id: &str) -> Result<TaskView, StoreError> {
    const SQL: &str = "SELECT t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
     t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
     t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
     t.log_bytes, t.log_truncated FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id \
     WHERE t.id = $1";
    debug_assert!(SQL.starts_with(TASK_VIEW_SQL));
    let row = tx
        .opt(SQL, &[&id])?
        .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))?;
    task_view(&row)
}

/// The task's row, locked until the transaction ends: whatever this node decides about
/// it, no other node changes it meanwhile.
pub(super) fn load_held(tx: &mut Tx<'_>, id: &str) -> Result<Held, StoreError> {
    let r = tx
        .opt(
            "SELECT t.state, t.attempt, t.retries, t.cancel_requested, t.delegate_id, d.name, \
             d.token_name, t.log_bytes, t.outcome, t.exit_code, t.signal, t.log_truncated \
             FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id WHERE t.id = $1 \
             FOR UPDATE OF t",
            &[&id],
        )?
        .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))?;
    Ok(Held {
        state: state_of(r.try_get(0)?)?,
        attempt: u32_of(r.try_get(1)?),
        retries: u32_of(r.try_get(2)?),
        cancel_requested: r.try_get(3)?,
        delegate_id: r.try_get(4)?,
        delegate_name: r.try_get(5)?,
        token_name: r.try_get(6)?,
        log_bytes: u64_of(r.try_get(7)?),
        outcome: r.try_get(8)?,
        exit_code: r.try_get(9)?,
        signal: r.try_get(10)?,
        log_truncated: r.try_get(11)?,
    })
}

pub(super) fn forget(
    tx: &mut Tx<'_>,
    id: &str,
    why: &str,
    name: &str,
    now: UnixMillis,
) -> Result<u32, StoreError> {
    // The delegate's row first, then its tasks': the order a heartbeat and a lease take
    // them in, so a forget racing one waits instead of deadlocking.
    tx.opt("SELECT id FROM delegates WHERE id = $1 FOR UPDATE", &[&id])?;
    let held: Vec<(String, Task)> = tx
        .query(
            "SELECT id, state, attempt, retries, cancel_requested FROM tasks \
             WHERE delegate_id = $1 AND state IN ('assigned', 'running') ORDER BY id FOR UPDATE",
            &[&id],
        )?
        .iter()
        .map(held_task)
        .collect::<Result<_, _>>()?;
    let mut reaped = Reaped::default();
    let cause = format!("delegate {name} was forgotten ({why})");
    for (task, t) in &held {
        holder_gone(tx, task, *t, &cause, now, &mut reaped)?;
    }
    tx.exec("DELETE FROM delegates WHERE id = $1", &[&id])?;
    Ok(held.len() as u32)
}

pub(super) fn holder_gone(
    tx: &mut Tx<'_>,
    id: &str,
    task: Task,
    cause: &str,
    now: UnixMillis,
    reaped: &mut Reaped,
) -> Result<(), StoreError> {
    let (change, message) = holder_gone_change(id, task, cause, reaped)?;
    persist(tx, id, change, Write::message(&message), now)
}

/// Write what [`lifecycle::transition`] decided (see the SQLite `persist`); a re-queue
/// tells every node.
pub(super) fn persist(
    tx: &mut Tx<'_>,
    id: &str,
    change: Change,
    write: Write<'_>,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let Write {
        message, result, ..
    } = write;
    match change {
        Change::Keep => {}
        Change::Assign => {
            let lease = write.lease_for(id)?;
            persist_leases(tx, &[id.to_string()], lease, now)?;
        }
        Change::Run => {
            tx.exec(
                "UPDATE tasks SET state = 'running', started_at = $2 WHERE id = $1",
                &[&id, &now],
            )?;
        }
        Change::FlagCancel => {
            tx.exec(
                "UPDATE tasks SET cancel_requested = true WHERE id = $1",
                &[&id],
            )?;
        }
        Change::End(state) => {
            let outcome = result.map(|r| r.outcome.state().as_str());
            let exit_code = result.and_then(|r| r.exit_code);
            let signal = result.and_then(|r| r.signal);
            tx.exec(
                "UPDATE tasks SET state = $2, outcome = $3, exit_code = $4, signal = $5, \
                 message = $6, finished_at = $7, lease_expires = NULL WHERE id = $1",
                &[
                    &id,
                    &state.as_str(),
                    &outcome,
                    &exit_code,
                    &signal,
                    &message,
                    &now,
                ],
            )?;
        }
        Change::Requeue { next } => {
            let next = i64::from(next);
            let row = tx
                .opt(
                    "UPDATE tasks SET state = 'queued', attempt = $2, delegate_id = NULL, \
                     lease_expires = NULL, assigned_at = NULL, started_at = NULL, \
                     log_bytes = 0, log_truncated = false, cancel_delivered = false, \
                     message = $3 WHERE id = $1 RETURNING selectors",
                    &[&id, &next, &message],
                )?
                .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))?;
            tx.notify(&Note::Queued {
                task: id.to_string(),
                selectors: row.try_get(0)?,
            })?;
        }
    }
    Ok(())
}

/// [`Change::Assign`] for every task in `ids` at once (each decided by `rules::lease`).
/// A delegate's look writes its leases in [`LEASE`] itself.
pub(super) fn persist_leases(
    tx: &mut Tx<'_>,
    ids: &[String],
    lease: Lease<'_>,
    now: UnixMillis,
) -> Result<(), StoreError> {
    tx.exec(
        "UPDATE tasks SET state = 'assigned', delegate_id = $2, assigned_at = $3, \
         lease_expires = $4, cancel_delivered = false WHERE id = ANY($1)",
        &[&ids, &lease.delegate_id, &now, &lease.expires],
    )?;
    Ok(())
}
