//! A task's and a delegate's rows inside a SQLite transaction: decoding their columns and
//! the per-row steps (load, own, forget, persist a change) that `SqliteStore`'s calls are
//! built from.

use delegate_protocol::{DelegateState, TaskState, TaskView, UnixMillis};
use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::super::Reaped;
use super::super::rules::{Held, Lease, Write, holder_gone_change, is_draining};
use crate::error::StoreError;
use crate::lifecycle::{Change, Task};
use crate::queue::Queue;

/// Columns of a [`TaskView`], in the order [`task_view`] reads them.
pub(super) const TASK_VIEW_SQL: &str = "SELECT t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
     t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
     t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
     t.log_bytes, t.log_truncated FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id";

pub(super) fn conv_err(
    idx: usize,
    e: impl std::error::Error + Send + Sync + 'static,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, Type::Text, Box::new(e))
}

/// SQLite integers are signed; sizes and offsets are stored as such and never negative.
pub(super) fn u64_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Integer, Box::new(e)))
}

pub(super) fn json_col<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<T> {
    let s: String = row.get(idx)?;
    serde_json::from_str(&s).map_err(|e| conv_err(idx, e))
}

pub(super) fn opt_json_col<T: serde::de::DeserializeOwned>(
    row: &Row<'_>,
    idx: usize,
) -> rusqlite::Result<Option<T>> {
    let s: Option<String> = row.get(idx)?;
    s.map(|s| serde_json::from_str(&s).map_err(|e| conv_err(idx, e)))
        .transpose()
}

#[derive(Debug, thiserror::Error)]
#[error("unknown state {0:?} in the database")]
pub(super) struct BadState(pub(super) String);

pub(super) fn state_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<TaskState> {
    let s: String = row.get(idx)?;
    TaskState::parse(&s).ok_or_else(|| conv_err(idx, BadState(s)))
}

pub(super) fn delegate_state_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<DelegateState> {
    let s: String = row.get(idx)?;
    serde_json::from_value(serde_json::Value::String(s)).map_err(|e| conv_err(idx, e))
}

pub(super) fn task_view(row: &Row<'_>) -> rusqlite::Result<TaskView> {
    Ok(TaskView {
        id: row.get(0)?,
        kind: row.get(1)?,
        spec: json_col(row, 2)?,
        selectors: json_col(row, 3)?,
        state: state_col(row, 4)?,
        attempt: row.get(5)?,
        retries: row.get(6)?,
        timeout_secs: u64_col(row, 7)?,
        cancel_requested: row.get(8)?,
        delegate_id: row.get(9)?,
        delegate_name: row.get(10)?,
        exit_code: row.get(11)?,
        signal: row.get(12)?,
        message: row.get(13)?,
        created_at: row.get(14)?,
        assigned_at: row.get(15)?,
        started_at: row.get(16)?,
        finished_at: row.get(17)?,
        log_bytes: u64_col(row, 18)?,
        log_truncated: row.get(19)?,
    })
}

pub(super) fn load_view(conn: &Connection, id: &str) -> Result<TaskView, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("{TASK_VIEW_SQL} WHERE t.id = ?1"))?;
    stmt.query_row([id], task_view)
        .optional()?
        .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))
}

pub(super) fn load_held(conn: &Connection, id: &str) -> Result<Held, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT t.state, t.attempt, t.retries, t.cancel_requested, t.delegate_id, d.name, \
         d.token_name, t.log_bytes, t.outcome, t.exit_code, t.signal, t.log_truncated \
         FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id WHERE t.id = ?1",
    )?;
    stmt.query_row([id], |r| {
        Ok(Held {
            state: state_col(r, 0)?,
            attempt: r.get(1)?,
            retries: r.get(2)?,
            cancel_requested: r.get(3)?,
            delegate_id: r.get(4)?,
            delegate_name: r.get(5)?,
            token_name: r.get(6)?,
            log_bytes: u64_col(r, 7)?,
            outcome: r.get(8)?,
            exit_code: r.get(9)?,
            signal: r.get(10)?,
            log_truncated: r.get(11)?,
        })
    })
    .optional()?
    .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))
}

/// What acquire needs to know about its delegate.
pub(super) struct OwnDelegate {
    pub(super) tags: Vec<String>,
    pub(super) draining: bool,
}

/// The delegate `id` if it was registered with `token_name` and that token is still
/// live: checked in the caller's transaction, so a revoke that raced the request (a long
/// poll opened before it) leases nothing.
pub(super) fn own_delegate(
    conn: &Connection,
    id: &str,
    token_name: &str,
) -> Result<OwnDelegate, StoreError> {
    live_token_tags(conn, token_name)?;
    let mut stmt =
        conn.prepare_cached("SELECT tags, state FROM delegates WHERE id = ?1 AND token_name = ?2")?;
    stmt.query_row([id, token_name], |r| {
        Ok(OwnDelegate {
            tags: json_col(r, 0)?,
            draining: is_draining(&r.get::<_, String>(1)?),
        })
    })
    .optional()?
    .ok_or_else(|| StoreError::DelegateNotFound(id.to_string()))
}

/// The allowed tag set of the live token `name` (`None`: any tags); a token revoked since
/// the request was let in is refused here, inside the caller's transaction.
pub(super) fn live_token_tags(
    conn: &Connection,
    name: &str,
) -> Result<Option<Vec<String>>, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT tags FROM tokens WHERE name = ?1 AND revoked_at IS NULL")?;
    stmt.query_row([name], |r| opt_json_col(r, 0))
        .optional()?
        .ok_or_else(|| StoreError::TokenRevoked(name.to_string()))
}

/// Delete a delegate and release the tasks it holds as if its lease had lapsed; returns
/// how many it held.
pub(super) fn forget(
    conn: &Connection,
    q: &mut Queue,
    id: &str,
    why: &str,
    name: &str,
    now: UnixMillis,
) -> Result<u32, StoreError> {
    let held: Vec<(String, Task)> = conn
        .prepare_cached(
            "SELECT id, state, attempt, retries, cancel_requested FROM tasks \
             WHERE delegate_id = ?1 AND state IN ('assigned', 'running')",
        )?
        .query_map([id], held_task)?
        .collect::<Result<_, _>>()?;
    let mut reaped = Reaped::default();
    let cause = format!("delegate {name} was forgotten ({why})");
    for (task, t) in &held {
        holder_gone(conn, q, task, *t, &cause, now, &mut reaped)?;
    }
    conn.prepare_cached("DELETE FROM delegates WHERE id = ?1")?
        .execute([id])?;
    Ok(held.len() as u32)
}

/// `(id, lifecycle task)` of a row `id, state, attempt, retries, cancel_requested`.
pub(super) fn held_task(r: &Row<'_>) -> rusqlite::Result<(String, Task)> {
    Ok((
        r.get(0)?,
        Task {
            state: state_col(r, 1)?,
            attempt: r.get(2)?,
            retries: r.get(3)?,
            cancel_requested: r.get(4)?,
        },
    ))
}

/// A held task whose holder is gone without a result (`cause` says how): the life
/// cycle's one rule for a lost attempt decides, this persists it and counts it.
pub(super) fn holder_gone(
    conn: &Connection,
    q: &mut Queue,
    id: &str,
    task: Task,
    cause: &str,
    now: UnixMillis,
    reaped: &mut Reaped,
) -> Result<(), StoreError> {
    let (change, message) = holder_gone_change(id, task, cause, reaped)?;
    persist(conn, q, id, change, Write::message(&message), now)
}

/// Write what [`lifecycle::transition`] decided (through `rules`), with what `write`
/// carries beside it (see [`Write`]).
pub(super) fn persist(
    conn: &Connection,
    q: &mut Queue,
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
            let Lease {
                delegate_id,
                expires,
            } = write.lease_for(id)?;
            conn.prepare_cached(
                "UPDATE tasks SET state = 'assigned', delegate_id = ?2, assigned_at = ?3, \
                 lease_expires = ?4, cancel_delivered = 0 WHERE id = ?1",
            )?
            .execute(params![id, delegate_id, now, expires])?;
            // Out of the queue index once committed (`acquire` removes it then).
        }
        Change::Run => {
            conn.prepare_cached(
                "UPDATE tasks SET state = 'running', started_at = ?2 WHERE id = ?1",
            )?
            .execute(params![id, now])?;
        }
        Change::FlagCancel => {
            conn.prepare_cached("UPDATE tasks SET cancel_requested = 1 WHERE id = ?1")?
                .execute([id])?;
        }
        Change::End(state) => {
            conn.prepare_cached(
                "UPDATE tasks SET state = ?2, outcome = ?3, exit_code = ?4, signal = ?5, \
                 message = ?6, finished_at = ?7, lease_expires = NULL WHERE id = ?1",
            )?
            .execute(params![
                id,
                state.as_str(),
                result.map(|r| r.outcome.state().as_str()),
                result.and_then(|r| r.exit_code),
                result.and_then(|r| r.signal),
                message,
                now
            ])?;
        }
        Change::Requeue { next } => {
            conn.prepare_cached(
                "UPDATE tasks SET state = 'queued', attempt = ?2, delegate_id = NULL, \
                 lease_expires = NULL, assigned_at = NULL, started_at = NULL, log_bytes = 0, \
                 log_truncated = 0, cancel_delivered = 0, message = ?3 WHERE id = ?1",
            )?
            .execute(params![id, next, message])?;
            // Back in the queue at its old place (the index is a hint until the commit:
            // a lease checks the row, so a rolled-back re-queue leases nothing).
            let (selectors, created_at, seq): (Vec<String>, UnixMillis, i64) = conn
                .prepare_cached("SELECT selectors, created_at, seq FROM tasks WHERE id = ?1")?
                .query_row([id], |r| Ok((json_col(r, 0)?, r.get(1)?, r.get(2)?)))?;
            q.add(id, &selectors, created_at, seq);
        }
    }
    Ok(())
}
