//! A task's life cycle as one pure transition function: `(task, event) → change`.
//!
//! Every state change of a task is decided here and nowhere else, a lease included; the
//! store reads the task, asks [`transition`] (through `store::rules`, the same on both
//! backends), and persists the [`Change`] it gets (or turns the [`TransitionError`] into
//! an answer). A lease depends on the task's state alone, so PostgreSQL asks for every
//! state ahead and leases in one statement with the states the table allows
//! ([`Change::state_after`] names what an assignment writes). That keeps the rules — above all what happens to
//! a held task whose attempt is lost, which a delegate's `lost` result and a lapsed lease
//! share — in one table that the tests walk exhaustively.
//!
//! ```text
//! queued ─lease→ assigned ─start→ running ─report→ succeeded | failed | cancelled | timed_out | lost
//!   │               │                │
//!   └cancel→ cancelled  └──── report lost / holder gone ───→ queued (attempt+1, retries left)
//! ```

use delegate_protocol::{Outcome, TaskState};

/// What the transition needs to know about a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Task {
    pub state: TaskState,
    pub attempt: u32,
    /// How many lost attempts are re-queued: attempts `1..=retries` may be retried.
    pub retries: u32,
    pub cancel_requested: bool,
}

/// Something that happens to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A delegate's acquire leases it.
    Lease,
    /// Its delegate began running the current attempt.
    Start,
    /// Its delegate reports how the current attempt ended.
    Report(Outcome),
    /// A user asks to cancel it.
    Cancel,
    /// Its holder is gone without a result: the lease lapsed, or the delegate was
    /// forgotten (or its token revoked).
    HolderGone,
}

/// What to persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing: a repeat of something already recorded.
    Keep,
    /// `queued → assigned` to the leasing delegate.
    Assign,
    /// `assigned → running`.
    Run,
    /// Mark a held task for cancelling; its delegate is told on its next poll/heartbeat.
    FlagCancel,
    /// End the task in this terminal state.
    End(TaskState),
    /// Back to the queue as attempt `next`, forgetting the holder.
    Requeue { next: u32 },
}

impl Change {
    /// The state the task is in once this change is written; `None` when its state stays
    /// (`Keep`, `FlagCancel`). A backend that writes a change in SQL takes the state from
    /// here rather than spelling it out again.
    pub fn state_after(self) -> Option<TaskState> {
        match self {
            Change::Keep | Change::FlagCancel => None,
            Change::Assign => Some(TaskState::Assigned),
            Change::Run => Some(TaskState::Running),
            Change::End(state) => Some(state),
            Change::Requeue { .. } => Some(TaskState::Queued),
        }
    }
}

/// An event the task's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The task already ended; what to answer depends on the event (a repeated result is
    /// fine, a different one a conflict, a cancel has nothing to do).
    #[error("the task already finished ({0})")]
    Finished(TaskState),
    /// Only a queued task can be leased.
    #[error("the task is {0}, not queued")]
    NotQueued(TaskState),
    /// A holder's event for a task nobody holds.
    #[error("the task is {0} and held by no delegate")]
    NotHeld(TaskState),
}

/// The one transition table.
pub fn transition(task: Task, event: Event) -> Result<Change, TransitionError> {
    use TaskState as S;
    match (task.state, event) {
        // A delegate takes a queued task; nothing else can be leased.
        (S::Queued, Event::Lease) => Ok(Change::Assign),
        (s, Event::Lease) => Err(TransitionError::NotQueued(s)),

        // A user cancels a task nobody holds yet: it ends now.
        (S::Queued, Event::Cancel) => Ok(Change::End(S::Cancelled)),
        // Holders' events for a task nobody holds.
        (S::Queued, Event::Start | Event::Report(_) | Event::HolderGone) => {
            Err(TransitionError::NotHeld(S::Queued))
        }

        // The delegate began running it; saying so again changes nothing.
        (S::Assigned, Event::Start) => Ok(Change::Run),
        (S::Running, Event::Start) => Ok(Change::Keep),

        // The held attempt is lost — reported so by its delegate, or its holder went away
        // without a result (lease lapsed, forgotten): one rule, see `release`.
        (S::Assigned | S::Running, Event::Report(Outcome::Lost) | Event::HolderGone) => {
            Ok(release(task))
        }
        // Any other outcome of the held attempt is final, even after a cancel was asked.
        (S::Assigned | S::Running, Event::Report(outcome)) => Ok(Change::End(outcome.state())),

        // A user cancels a held task: flag it so its delegate stops it and reports;
        // flagging twice changes nothing.
        (S::Assigned | S::Running, Event::Cancel) if task.cancel_requested => Ok(Change::Keep),
        (S::Assigned | S::Running, Event::Cancel) => Ok(Change::FlagCancel),

        // A late `started` after the result changes nothing.
        (S::Succeeded | S::Failed | S::Cancelled | S::TimedOut | S::Lost, Event::Start) => {
            Ok(Change::Keep)
        }
        // Anything else about a finished task: what to answer is the caller's (a repeated
        // result is fine, a different one a conflict, a cancel has nothing to do).
        (
            done @ (S::Succeeded | S::Failed | S::Cancelled | S::TimedOut | S::Lost),
            Event::Report(_) | Event::Cancel | Event::HolderGone,
        ) => Err(TransitionError::Finished(done)),
    }
}

/// The rule for a held attempt that is lost (reported so, lease lapsed, holder gone): a
/// cancel asked for ends it cancelled; an attempt with retries left is queued again;
/// otherwise the task is lost.
fn release(task: Task) -> Change {
    if task.cancel_requested {
        Change::End(TaskState::Cancelled)
    } else if task.attempt <= task.retries {
        Change::Requeue {
            next: task.attempt + 1,
        }
    } else {
        Change::End(TaskState::Lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskState as S;

    const OUTCOMES: [Outcome; 5] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::Cancelled,
        Outcome::TimedOut,
        Outcome::Lost,
    ];

    fn events() -> Vec<Event> {
        let mut e = vec![Event::Lease, Event::Start, Event::Cancel, Event::HolderGone];
        e.extend(OUTCOMES.map(Event::Report));
        e
    }

    /// The table again, written out case by case as the specification: every state ×
    /// every event × cancel flag × retries left or not.
    fn expected(t: Task, e: Event) -> Result<Change, TransitionError> {
        let held = matches!(t.state, S::Assigned | S::Running);
        let lost_rule = if t.cancel_requested {
            Change::End(S::Cancelled)
        } else if t.attempt <= t.retries {
            Change::Requeue {
                next: t.attempt + 1,
            }
        } else {
            Change::End(S::Lost)
        };
        match e {
            Event::Lease if t.state == S::Queued => Ok(Change::Assign),
            Event::Lease => Err(TransitionError::NotQueued(t.state)),
            Event::Start if t.state == S::Assigned => Ok(Change::Run),
            Event::Start if t.state == S::Queued => Err(TransitionError::NotHeld(S::Queued)),
            Event::Start => Ok(Change::Keep),
            Event::Report(_) | Event::HolderGone if t.state == S::Queued => {
                Err(TransitionError::NotHeld(S::Queued))
            }
            Event::Report(_) | Event::HolderGone | Event::Cancel if t.state.is_terminal() => {
                Err(TransitionError::Finished(t.state))
            }
            Event::Report(Outcome::Lost) | Event::HolderGone => Ok(lost_rule),
            Event::Report(o) => Ok(Change::End(o.state())),
            Event::Cancel if t.state == S::Queued => Ok(Change::End(S::Cancelled)),
            Event::Cancel if held && t.cancel_requested => Ok(Change::Keep),
            Event::Cancel => Ok(Change::FlagCancel),
        }
    }

    #[test]
    fn every_state_and_event() {
        let mut cases = 0;
        for state in TaskState::ALL {
            for event in events() {
                for cancel_requested in [false, true] {
                    for (attempt, retries) in [(1, 0), (1, 1), (2, 1), (3, 5)] {
                        let t = Task {
                            state,
                            attempt,
                            retries,
                            cancel_requested,
                        };
                        assert_eq!(transition(t, event), expected(t, event), "{t:?} {event:?}");
                        cases += 1;
                    }
                }
            }
        }
        assert_eq!(cases, 8 * 9 * 2 * 4);
    }

    #[test]
    fn each_change_leaves_the_state_the_picture_draws() {
        assert_eq!(Change::Keep.state_after(), None);
        assert_eq!(Change::FlagCancel.state_after(), None);
        assert_eq!(Change::Assign.state_after(), Some(S::Assigned));
        assert_eq!(Change::Run.state_after(), Some(S::Running));
        assert_eq!(Change::Requeue { next: 2 }.state_after(), Some(S::Queued));
        for s in TaskState::ALL.into_iter().filter(|s| s.is_terminal()) {
            assert_eq!(Change::End(s).state_after(), Some(s));
        }
    }

    #[test]
    fn a_lost_report_and_a_vanished_holder_follow_the_same_rule() {
        for cancel_requested in [false, true] {
            for (attempt, retries) in [(1, 0), (1, 1), (2, 1)] {
                let t = Task {
                    state: S::Running,
                    attempt,
                    retries,
                    cancel_requested,
                };
                assert_eq!(
                    transition(t, Event::Report(Outcome::Lost)),
                    transition(t, Event::HolderGone)
                );
            }
        }
    }

    #[test]
    fn named_cases() {
        let t = |state, attempt, retries, cancel_requested| Task {
            state,
            attempt,
            retries,
            cancel_requested,
        };
        assert_eq!(
            transition(t(S::Running, 1, 1, false), Event::HolderGone),
            Ok(Change::Requeue { next: 2 })
        );
        assert_eq!(
            transition(t(S::Running, 2, 1, false), Event::HolderGone),
            Ok(Change::End(S::Lost))
        );
        assert_eq!(
            transition(t(S::Assigned, 1, 3, true), Event::Report(Outcome::Lost)),
            Ok(Change::End(S::Cancelled))
        );
        assert_eq!(
            transition(
                t(S::Assigned, 1, 0, true),
                Event::Report(Outcome::Succeeded)
            ),
            Ok(Change::End(S::Succeeded)),
            "a result that arrives despite a cancel stands"
        );
        assert_eq!(
            transition(t(S::Succeeded, 1, 0, false), Event::Cancel),
            Err(TransitionError::Finished(S::Succeeded))
        );
    }
}
