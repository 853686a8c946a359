//! The store's decisions, the same on both backends: what a delegate's report, a user's
//! cancel, a lost holder or a lease does to a task, whether a token may register a
//! delegate's tags, which delegate a name means, and how a log page is cut.
//!
//! Every change of a task's state is decided by `lifecycle::transition` (the one table);
//! the functions here ask it and turn its answer into the [`Change`] a backend persists
//! and the message or error the caller sees. A backend reads the task's row, calls one of
//! these, and writes what it got: neither backend decides a state change on its own —
//! a lease too is `Event::Lease` → `Change::Assign`, written with the [`Lease`] it
//! carries. SQLite asks [`lease`] for each candidate row; PostgreSQL, whose look is one
//! statement, asks the table ahead for every state ([`leasable_states`], [`leased_state`])
//! and gives the answer to its SQL as parameters.

use delegate_protocol::{
    DelegateState, Outcome, RegisterRequest, TaskResult, TaskState, UnixMillis,
};

use super::{Cancel, Finish, Reaped};
use crate::error::StoreError;
use crate::lifecycle::{self, Change, Event, Task, TransitionError};

/// The delegate a lease hands a task to, and until when ([`Change::Assign`] writes it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease<'a> {
    pub(crate) delegate_id: &'a str,
    pub(crate) expires: UnixMillis,
}

/// What a backend writes beside a [`Change`]: the task's new message, the delegate's
/// report when it ended the task (its outcome, exit code and signal are kept; `None` when
/// the manager ended it), and the lease when the change is an assignment.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Write<'a> {
    pub(crate) message: Option<&'a str>,
    pub(crate) result: Option<&'a TaskResult>,
    pub(crate) lease: Option<Lease<'a>>,
}

impl<'a> Write<'a> {
    pub(crate) fn message(message: &'a str) -> Write<'a> {
        Write {
            message: Some(message),
            ..Write::default()
        }
    }

    /// A lease to `delegate_id` until `expires`.
    pub(crate) fn lease(delegate_id: &'a str, expires: UnixMillis) -> Write<'a> {
        Write {
            lease: Some(Lease {
                delegate_id,
                expires,
            }),
            ..Write::default()
        }
    }

    /// The lease an assignment needs; any other change has none.
    pub(crate) fn lease_for(&self, id: &str) -> Result<Lease<'a>, StoreError> {
        self.lease.ok_or_else(|| {
            StoreError::Invalid(format!("task {id}: a lease was decided without a holder"))
        })
    }
}

/// A delegate's lease of `task`: the life cycle allows it from `queued` alone
/// (`Change::Assign`); anything else is refused, and the backend leaves the task as it is.
pub(crate) fn lease(task: Task) -> Result<Change, TransitionError> {
    lifecycle::transition(task, Event::Lease)
}

/// The task states a lease takes a task from, asked of the life cycle state by state:
/// those for which [`lease`] answers [`Change::Assign`]. The lease depends on the state
/// alone (a unit test walks every fact), so a backend that leases in one SQL statement
/// (PostgreSQL) selects its candidates by these states and writes what [`leased_state`]
/// says, instead of reading each row back and asking [`lease`] in another round trip.
pub(crate) fn leasable_states() -> Vec<TaskState> {
    TaskState::ALL
        .into_iter()
        .filter(|&state| {
            let task = Task {
                state,
                attempt: 1,
                retries: 0,
                cancel_requested: false,
            };
            lease(task) == Ok(Change::Assign)
        })
        .collect()
}

/// The state a lease leaves its task in: what [`Change::Assign`] writes, beside the
/// holder and deadline of the [`Lease`] and the time it was assigned.
pub(crate) fn leased_state() -> TaskState {
    // `Assign` always leaves a state (`Change::state_after`); `assigned` is its name.
    Change::Assign.state_after().unwrap_or(TaskState::Assigned)
}

/// A new token needs a name, and its tags (the set its delegates may register with) must
/// be tags: non-empty, no spaces or commas.
pub(crate) fn check_token(name: &str, tags: Option<&[String]>) -> Result<(), StoreError> {
    if name.trim().is_empty() {
        return Err(StoreError::Invalid(
            "token name is empty; give one, e.g. --name build-hosts".to_string(),
        ));
    }
    if let Some(bad) = tags
        .unwrap_or_default()
        .iter()
        .find(|t| t.is_empty() || t.contains(|c: char| c == ',' || c.is_whitespace()))
    {
        return Err(StoreError::Invalid(format!(
            "token tags: {bad:?} is not a tag; give non-empty tags without spaces or commas"
        )));
    }
    Ok(())
}

/// A registration needs a name and a hostname.
pub(crate) fn check_register(req: &RegisterRequest) -> Result<(), StoreError> {
    if req.name.trim().is_empty() || req.hostname.trim().is_empty() {
        return Err(StoreError::Invalid(
            "register: name and hostname must not be empty".to_string(),
        ));
    }
    if let Some(g) = &req.upgrade_group {
        delegate_protocol::check_upgrade_group(g)
            .map_err(|rule| StoreError::Invalid(format!("register: {rule}")))?;
    }
    Ok(())
}

/// States in which a delegate must not be handed new tasks.
pub fn is_draining(state: &str) -> bool {
    matches!(state, "draining" | "drained" | "stopping")
}

/// The delegate states [`is_draining`] names, for SQL that must not lease to them.
pub(crate) fn draining_states() -> Vec<&'static str> {
    [
        DelegateState::Starting,
        DelegateState::Running,
        DelegateState::Draining,
        DelegateState::Drained,
        DelegateState::Stopping,
    ]
    .into_iter()
    .map(DelegateState::as_str)
    .filter(|s| is_draining(s))
    .collect()
}

/// The facts about a task that decide whether a delegate's report is accepted.
pub(crate) struct Held {
    pub(crate) state: TaskState,
    pub(crate) attempt: u32,
    pub(crate) retries: u32,
    pub(crate) cancel_requested: bool,
    pub(crate) delegate_id: Option<String>,
    pub(crate) delegate_name: Option<String>,
    pub(crate) token_name: Option<String>,
    pub(crate) log_bytes: u64,
    pub(crate) log_truncated: bool,
    pub(crate) outcome: Option<String>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
}

impl Held {
    pub(crate) fn task(&self) -> Task {
        Task {
            state: self.state,
            attempt: self.attempt,
            retries: self.retries,
            cancel_requested: self.cancel_requested,
        }
    }

    /// Refuse a report unless it is about the current attempt and comes from a delegate of
    /// the token that holds (or last held) the task.
    pub(crate) fn check(
        &self,
        task: &str,
        attempt: u32,
        token_name: &str,
    ) -> Result<(), StoreError> {
        let why = if self.attempt != attempt {
            format!(
                "the task is on attempt {} now, state {}",
                self.attempt, self.state
            )
        } else if self.delegate_id.is_none() || self.token_name.as_deref() != Some(token_name) {
            format!("the task is {} and not held by this delegate", self.state)
        } else {
            return Ok(());
        };
        Err(StoreError::StaleAttempt {
            task: task.to_string(),
            attempt,
            why,
        })
    }
}

/// What a delegate's result does to a task, decided from its locked row alone (the same
/// rules on both backends).
pub(crate) enum Report {
    /// The task already ended with this very result (a resend): answer as before.
    Repeat,
    /// Apply `change`, with `message` as the task's message.
    Apply {
        change: Change,
        message: Option<String>,
        effect: Finish,
    },
}

/// The lifecycle's answer to `result` for `held` (already checked to be this attempt's
/// holder): an already ended task takes the same result again and refuses another one.
pub(crate) fn decide_report(
    held: &Held,
    id: &str,
    attempt: u32,
    result: &TaskResult,
) -> Result<Report, StoreError> {
    let outcome = result.outcome.state().as_str();
    let change = match lifecycle::transition(held.task(), Event::Report(result.outcome)) {
        Ok(change) => change,
        Err(TransitionError::Finished(state)) => {
            return match &held.outcome {
                Some(o)
                    if o == outcome
                        && held.exit_code == result.exit_code
                        && held.signal == result.signal =>
                {
                    Ok(Report::Repeat)
                }
                Some(o) => Err(StoreError::ResultConflict {
                    task: id.to_string(),
                    attempt,
                    existing: result_summary(o, held.exit_code, held.signal),
                    new: result_summary(outcome, result.exit_code, result.signal),
                }),
                None => Err(StoreError::Finished {
                    task: id.to_string(),
                    state,
                    detail: "the manager ended it (cancelled or lease lapsed); result dropped",
                }),
            };
        }
        Err(e) => return Err(stale(id, attempt, e)),
    };
    let delegate = held.delegate_name.as_deref().unwrap_or("?");
    let why = result.message.as_deref().unwrap_or("no reason given");
    let (message, effect) = match change {
        Change::Requeue { next } => (
            Some(format!(
                "delegate {delegate} reported attempt {attempt} lost: {why}; \
                 re-queued (attempt {next})"
            )),
            Finish::Requeued,
        ),
        Change::End(TaskState::Cancelled) if result.outcome == Outcome::Lost => (
            Some(format!(
                "cancelled by user; delegate {delegate} reported the attempt lost: {why}"
            )),
            Finish::Done,
        ),
        _ => (result.message.clone(), Finish::Done),
    };
    Ok(Report::Apply {
        change,
        message,
        effect,
    })
}

/// What losing its holder (lapsed lease, forgotten or revoked delegate) does to a task,
/// with the message that says why, counted in `reaped` (the same rule on both backends).
pub(crate) fn holder_gone_change(
    id: &str,
    task: Task,
    cause: &str,
    reaped: &mut Reaped,
) -> Result<(Change, String), StoreError> {
    let change = lifecycle::transition(task, Event::HolderGone)
        .map_err(|e| StoreError::Invalid(format!("task {id}: {e}")))?;
    let message = match change {
        Change::End(TaskState::Cancelled) => {
            reaped.cancelled += 1;
            format!("cancel requested and {cause}")
        }
        Change::Requeue { next } => {
            reaped.requeued += 1;
            format!("{cause}; re-queued (attempt {next})")
        }
        _ => {
            reaped.lost += 1;
            format!(
                "{cause} on attempt {}; no retries left \
                 (submit with more retries to survive lost delegates)",
                task.attempt
            )
        }
    };
    Ok((change, message))
}

/// A registration may carry only the tags its token allows (`allowed`: `None` = any).
pub(crate) fn refuse_tags(
    token_name: &str,
    tags: &[String],
    allowed: Option<Vec<String>>,
) -> Result<(), StoreError> {
    let Some(allowed) = allowed else {
        return Ok(());
    };
    let refused: Vec<String> = tags
        .iter()
        .filter(|t| !allowed.contains(t))
        .cloned()
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(StoreError::TagsNotAllowed {
            token: token_name.to_string(),
            refused,
            allowed,
        })
    }
}

/// The one delegate `name` (on `hostname`) among `found` (id, hostname, token name):
/// none, or several on different hosts without `hostname`, is an error that says so.
pub(crate) fn the_one_delegate(
    name: &str,
    hostname: Option<&str>,
    found: Vec<(String, String, String)>,
) -> Result<(String, String, String), StoreError> {
    match <[_; 1]>::try_from(found) {
        Ok([one]) => Ok(one),
        Err(found) if found.is_empty() => Err(StoreError::NoSuchDelegate {
            name: name.to_string(),
            hostname: hostname.map(str::to_string),
        }),
        Err(found) => Err(StoreError::AmbiguousDelegate {
            name: name.to_string(),
            hosts: found.into_iter().map(|(_, h, _)| h).collect(),
        }),
    }
}

/// What a user's cancel does to `held`: a queued task ends, a held one is flagged; a
/// finished one has nothing to cancel.
pub(crate) fn cancel_change(held: &Held, id: &str) -> Result<(Change, Cancel), StoreError> {
    let change = lifecycle::transition(held.task(), Event::Cancel).map_err(|e| match e {
        TransitionError::Finished(state) => StoreError::Finished {
            task: id.to_string(),
            state,
            detail: "nothing to cancel",
        },
        other => StoreError::Invalid(format!("task {id}: {other}")),
    })?;
    let effect = match change {
        Change::End(_) => Cancel::Cancelled,
        _ => Cancel::Requested,
    };
    Ok((change, effect))
}

/// Append to a log page `data` (at most `max` bytes, from byte `offset`) what it needs of
/// the stored chunk that begins at `start`; true once the page is full.
pub(crate) fn page_from_chunk(
    data: &mut Vec<u8>,
    offset: u64,
    max: usize,
    start: u64,
    chunk: &[u8],
) -> bool {
    let skip = offset.saturating_sub(start) as usize;
    if skip < chunk.len() {
        let take = (max - data.len()).min(chunk.len() - skip);
        data.extend_from_slice(&chunk[skip..skip + take]);
    }
    data.len() >= max
}

/// A delegate's report the life cycle refuses (e.g. about a task nobody holds).
pub(crate) fn stale(id: &str, attempt: u32, e: TransitionError) -> StoreError {
    StoreError::StaleAttempt {
        task: id.to_string(),
        attempt,
        why: e.to_string(),
    }
}

/// What a backend does with a piece of an attempt's log, `data` sent from byte `offset`.
pub(crate) enum LogAppend<'a> {
    /// Nothing to store: answer the delegate with this offset (a resend of what is stored,
    /// or output past the cut, counted in the delegate's offsets that went on past it).
    Answer(u64),
    /// Store `bytes` at `start` (empty when the cap left no room) and, once the cap is
    /// reached, the cut's marker line after them; the log then holds `log_bytes`; answer
    /// the delegate with `end`.
    Write {
        start: u64,
        bytes: &'a [u8],
        marker: Option<(u64, String)>,
        log_bytes: u64,
        end: u64,
    },
}

/// Where `data` from `offset` goes in `held`'s log of at most `cap` bytes: what is stored
/// already is not stored again, a gap is refused (the delegate resends from where the
/// manager's log ends), and the first byte past the cap cuts the log with a marker line.
pub(crate) fn append_log<'a>(
    held: &Held,
    id: &str,
    attempt: u32,
    offset: u64,
    data: &'a [u8],
    cap: u64,
) -> Result<LogAppend<'a>, StoreError> {
    let end = offset + data.len() as u64;
    if held.log_truncated {
        return Ok(LogAppend::Answer(end));
    }
    let stored = held.log_bytes;
    if offset > stored {
        return Err(StoreError::LogGap {
            task: id.to_string(),
            attempt,
            offset,
            expected: stored,
        });
    }
    if end <= stored {
        return Ok(LogAppend::Answer(stored));
    }
    let fresh = &data[(stored - offset) as usize..];
    let room = cap.saturating_sub(stored);
    if (fresh.len() as u64) <= room {
        return Ok(LogAppend::Write {
            start: stored,
            bytes: fresh,
            marker: None,
            log_bytes: end,
            end,
        });
    }
    let kept = &fresh[..room as usize];
    let cut = stored + kept.len() as u64;
    let marker = truncation_marker(cap);
    Ok(LogAppend::Write {
        start: stored,
        bytes: kept,
        log_bytes: cut + marker.len() as u64,
        marker: Some((cut, marker)),
        end,
    })
}

/// The line that ends a log cut at the cap.
fn truncation_marker(cap: u64) -> String {
    format!(
        "\n[delegate-manager] log truncated: it reached the manager's cap of {cap} bytes per \
         task (--max-log-bytes); later output was dropped\n"
    )
}

pub(crate) fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    // Serializing plain vectors and maps of strings cannot fail.
    serde_json::to_string(v).unwrap_or_else(|_| "null".to_string())
}

pub(crate) fn result_summary(outcome: &str, exit_code: Option<i32>, signal: Option<i32>) -> String {
    let mut s = outcome.to_string();
    if let Some(c) = exit_code {
        s.push_str(&format!(" exit {c}"));
    }
    if let Some(sig) = signal {
        s.push_str(&format!(" signal {sig}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_log(log_bytes: u64, log_truncated: bool) -> Held {
        Held {
            state: TaskState::Running,
            attempt: 1,
            retries: 0,
            cancel_requested: false,
            delegate_id: Some("d".into()),
            delegate_name: Some("d".into()),
            token_name: Some("tok".into()),
            log_bytes,
            log_truncated,
            outcome: None,
            exit_code: None,
            signal: None,
        }
    }

    /// The log rules both backends write by: a resend stores nothing, a gap is refused, the
    /// first byte past the cap cuts the log with its marker, and once cut nothing more is
    /// stored while the delegate's offsets go on.
    #[test]
    fn a_log_piece_is_stored_once_refused_past_a_gap_and_cut_at_the_cap() {
        let write = |a: LogAppend<'_>| match a {
            LogAppend::Write {
                start,
                bytes,
                marker,
                log_bytes,
                end,
            } => (
                start,
                bytes.to_vec(),
                marker.map(|(at, _)| at),
                log_bytes,
                end,
            ),
            LogAppend::Answer(n) => panic!("answered {n}, expected a write"),
        };
        let answer = |a: LogAppend<'_>| match a {
            LogAppend::Answer(n) => n,
            LogAppend::Write { .. } => panic!("a write, expected an answer"),
        };
        let r = |held: &Held, offset, data: &'static [u8], cap| {
            append_log(held, "t", 1, offset, data, cap)
        };
        let ok = |x: Result<LogAppend<'static>, StoreError>| x.expect("allowed");
        assert_eq!(
            write(ok(r(&held_log(0, false), 0, b"abc", 100))),
            (0, b"abc".to_vec(), None, 3, 3)
        );
        // Overlapping a resend: only the new bytes.
        assert_eq!(
            write(ok(r(&held_log(2, false), 0, b"abcd", 100))),
            (2, b"cd".to_vec(), None, 4, 4)
        );
        assert_eq!(answer(ok(r(&held_log(4, false), 0, b"abcd", 100))), 4);
        assert!(matches!(
            r(&held_log(2, false), 3, b"x", 100),
            Err(StoreError::LogGap {
                offset: 3,
                expected: 2,
                ..
            })
        ));
        let marker_len = truncation_marker(4).len() as u64;
        assert_eq!(
            write(ok(r(&held_log(2, false), 2, b"cdef", 4))),
            (2, b"cd".to_vec(), Some(4), 4 + marker_len, 6)
        );
        assert_eq!(
            write(ok(r(&held_log(4, false), 4, b"ef", 4))),
            (4, Vec::new(), Some(4), 4 + marker_len, 6)
        );
        assert_eq!(
            answer(ok(r(&held_log(4 + marker_len, true), 6, b"gh", 4))),
            8
        );
    }

    /// The lease is decided by the task's state alone: for every state, every attempt,
    /// retry budget and cancel flag get the same answer, and that answer is an assignment
    /// or a refusal. So the states [`leasable_states`] derives are the whole decision a
    /// backend may put into SQL (PostgreSQL does; its unit tests check it uses these).
    #[test]
    fn a_lease_depends_on_the_state_alone_and_assigns_or_refuses() {
        for state in TaskState::ALL {
            let answers: Vec<_> = [false, true]
                .into_iter()
                .flat_map(|cancel_requested| {
                    [(1, 0), (1, 1), (2, 1), (3, 5)].map(|(attempt, retries)| {
                        lease(Task {
                            state,
                            attempt,
                            retries,
                            cancel_requested,
                        })
                    })
                })
                .collect();
            assert!(
                answers.iter().all(|a| *a == answers[0]),
                "{state}: {answers:?}"
            );
            assert!(
                matches!(answers[0], Ok(Change::Assign) | Err(_)),
                "{state}: a lease is an assignment or nothing, not {:?}",
                answers[0]
            );
            assert_eq!(
                leasable_states().contains(&state),
                answers[0].is_ok(),
                "{state}"
            );
        }
        assert_eq!(leasable_states(), [TaskState::Queued]);
        assert_eq!(leased_state(), TaskState::Assigned);
        assert_eq!(Change::Assign.state_after(), Some(leased_state()));
    }

    #[test]
    fn the_draining_states_are_those_is_draining_names() {
        assert_eq!(draining_states(), ["draining", "drained", "stopping"]);
        for s in ["starting", "running"] {
            assert!(!is_draining(s) && !draining_states().contains(&s));
        }
    }
}
