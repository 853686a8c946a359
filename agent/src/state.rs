//! The agent's life-cycle as one enum with one transition table.
//!
//! Signals, the D-Bus `Drain()`/`Handover()`/`Resume()` methods, the manager's answers and
//! the task supervisor all move the agent through the same states; keeping every allowed
//! move in one `match` makes the rules reviewable and turns an impossible request into a
//! typed error instead of a stray flag. The state says everything the daemon's loops wait
//! on (why it drains, whether polls end, why it stops, whether retries give up), so the
//! daemon derives those signals from one `watch` of it.

use std::fmt;

use delegate_protocol::DelegateState;

/// Why the agent takes no new tasks, which decides what its drain waits for and what
/// comes after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainMode {
    /// `Drain()` over D-Bus: wait for every task, then stay up until `Resume()` or a stop.
    Requested,
    /// `Handover()` over D-Bus, for an upgrade: wait only for tasks a new agent cannot
    /// adopt; the rest (task units, containers, Kubernetes actions) is journalled and left
    /// running for the next agent. Stays up until `Resume()` or a stop.
    Handover,
    /// SIGTERM: exit once drained or at the drain timeout; `Resume()` cannot undo it.
    Exit {
        /// A `Handover()` came first: adoptable tasks neither hold up the drain nor are
        /// stopped at the exit.
        after_handover: bool,
        /// The manager could not be told of the drain: polls end now rather than wait
        /// on a manager that does not answer.
        manager_unreachable: bool,
    },
}

/// Why the agent stops; decides what happens to the work it still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    /// The drain before the exit finished: nothing was left running.
    Drained,
    /// The drain timeout passed: what still ran was cancelled.
    DrainTimeout,
    /// A second stop request: what still ran was cancelled at once.
    Aborted,
    /// After `Handover()`: what still runs is journalled and left for the next agent.
    HandedOver,
    /// The manager will not work with this agent until an operator acts: running tasks
    /// are stopped without being reported and the process exits with `EX_CONFIG`.
    Rejected(Rejection),
}

/// Why the manager will not work with this agent until an operator acts; holds the
/// manager's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A 401: the token was revoked or is wrong.
    Token(String),
    /// The registration itself was refused (`name_taken`, `tags_not_allowed`).
    Registration(String),
}

/// The agent's life-cycle state. Heartbeats and D-Bus see its [`AgentState::wire`] name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentState {
    /// Not registered with the manager yet; takes no tasks.
    Starting,
    /// Registered; takes tasks.
    Running,
    /// Takes no new tasks and waits for those its `mode` waits for.
    Draining { mode: DrainMode },
    /// Nothing its `mode` waits for runs any more.
    Drained { mode: DrainMode },
    /// On the way out: polls have ended, what still runs is stopped (or left, after a
    /// handover) and results get a last chance to be delivered.
    Stopping { why: StopCause },
    /// The process exits now: retry loops give up and what is undelivered stays in the
    /// spool for the next start.
    Stopped { why: StopCause },
}

/// Something that asks the agent to change state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The manager accepted the registration.
    Registered,
    /// `Drain()`: stop taking tasks, let in-flight ones finish.
    Drain,
    /// `Handover()`: stop taking tasks, wait only for those a new agent cannot adopt.
    Handover,
    /// `Resume()`: take tasks again. `registered` says whether the manager has accepted
    /// this agent yet; if not, resuming goes back to `starting`, not `running`.
    Resume { registered: bool },
    /// SIGTERM (or the end of all control): drain, then exit.
    Shutdown,
    /// The manager could not be told of an exit drain.
    ManagerUnreachable,
    /// Nothing the drain waits for runs any more (reported after every task).
    Idle,
    /// The exit drain is over (finished, timed out, cut short or handed over).
    Stop(StopCause),
    /// The manager rejected the token or refused the registration.
    Reject(Rejection),
    /// Stopping is done: the process exits now.
    Exit,
}

/// A request the current state does not allow; D-Bus callers get its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} while the agent is {}", state.describe())]
pub struct TransitionError {
    pub state: AgentState,
    pub event: Event,
}

/// The one table of allowed moves.
pub fn transition(state: &AgentState, event: Event) -> Result<AgentState, TransitionError> {
    use AgentState as S;
    use DrainMode as M;
    use Event as E;
    Ok(match (state, event) {
        // Registration completes start-up; a re-registration later changes nothing.
        (S::Starting, E::Registered) => S::Running,
        (S::Running | S::Draining { .. } | S::Drained { .. }, E::Registered) => state.clone(),

        // A drain may come before registration finished.
        (S::Starting | S::Running, E::Drain) => S::Draining { mode: M::Requested },
        // Draining twice is not an error: operators and the upgrader may both ask. The
        // mode stays: a drain undoes neither a handover nor an exit.
        (S::Draining { .. } | S::Drained { .. }, E::Drain) => state.clone(),

        (S::Starting | S::Running, E::Handover) => S::Draining { mode: M::Handover },
        // A handover narrows what a drain waits for.
        (S::Draining { mode: M::Requested }, E::Handover) => S::Draining { mode: M::Handover },
        (S::Drained { mode: M::Requested }, E::Handover) => S::Drained { mode: M::Handover },
        // Handing over twice is not an error either. (An exit drain without a handover
        // is refused: it cancels what runs at its timeout, and turning it into a handover
        // would leave work running that nobody asked to keep.)
        (S::Draining { mode } | S::Drained { mode }, E::Handover) if mode.hands_over() => {
            state.clone()
        }

        // Resume undoes a drain (and a handover) that has not turned into an exit; an
        // agent drained before it ever registered is only starting again. (Before
        // registration there is nothing to undo.)
        (S::Draining { mode } | S::Drained { mode }, E::Resume { registered }) if !mode.exits() => {
            if registered {
                S::Running
            } else {
                S::Starting
            }
        }
        (S::Running, E::Resume { .. }) => S::Running,

        // SIGTERM turns any drain into an exit drain, keeping a handover.
        (S::Starting | S::Running, E::Shutdown) => S::Draining {
            mode: M::exit(false),
        },
        (S::Draining { mode }, E::Shutdown) => S::Draining {
            mode: mode.into_exit(),
        },
        (S::Drained { mode }, E::Shutdown) => S::Drained {
            mode: mode.into_exit(),
        },

        // Only an exit drain stops polling a manager that cannot be told.
        (S::Draining { mode }, E::ManagerUnreachable) if mode.exits() => S::Draining {
            mode: mode.unreachable(),
        },
        (S::Drained { mode }, E::ManagerUnreachable) if mode.exits() => S::Drained {
            mode: mode.unreachable(),
        },

        (S::Draining { mode }, E::Idle) => S::Drained { mode: *mode },
        // Idle is reported after every task; it only matters while draining.
        (S::Starting | S::Running | S::Drained { .. }, E::Idle) => state.clone(),

        // An exit drain ends in a stop; only one that followed a handover hands over.
        (S::Draining { mode } | S::Drained { mode }, E::Stop(why @ StopCause::HandedOver))
            if mode.exits() && mode.hands_over() =>
        {
            S::Stopping { why }
        }
        (
            S::Draining { mode } | S::Drained { mode },
            E::Stop(why @ (StopCause::Drained | StopCause::DrainTimeout | StopCause::Aborted)),
        ) if mode.exits() => S::Stopping { why },

        // A rejection stops the agent from wherever it stays up. During an exit drain the
        // agent leaves anyway: the drain goes on and the exit is a normal one.
        (S::Starting | S::Running, E::Reject(r)) => S::Stopping {
            why: StopCause::Rejected(r),
        },
        (S::Draining { mode } | S::Drained { mode }, E::Reject(r)) if !mode.exits() => {
            S::Stopping {
                why: StopCause::Rejected(r),
            }
        }

        (S::Stopping { why } | S::Stopped { why }, E::Exit) => S::Stopped { why: why.clone() },

        // Everything else is refused, among it: anything but `Exit` once stopping (so
        // the first rejection is the one kept), `Resume` before registration or during
        // an exit drain, `Stop` other than at the end of an exit drain (a rejection is
        // its own event), `Exit` before stopping.
        (_, event) => {
            return Err(TransitionError {
                state: state.clone(),
                event,
            });
        }
    })
}

impl DrainMode {
    fn exit(after_handover: bool) -> DrainMode {
        DrainMode::Exit {
            after_handover,
            manager_unreachable: false,
        }
    }

    /// The exit drain that follows a drain in this mode.
    fn into_exit(self) -> DrainMode {
        match self {
            DrainMode::Requested => DrainMode::exit(false),
            DrainMode::Handover => DrainMode::exit(true),
            m @ DrainMode::Exit { .. } => m,
        }
    }

    fn unreachable(self) -> DrainMode {
        match self {
            DrainMode::Exit { after_handover, .. } => DrainMode::Exit {
                after_handover,
                manager_unreachable: true,
            },
            m => m,
        }
    }

    /// The process exits after this drain.
    pub fn exits(self) -> bool {
        matches!(self, DrainMode::Exit { .. })
    }

    /// Adoptable work is left running for the next agent.
    pub fn hands_over(self) -> bool {
        matches!(
            self,
            DrainMode::Handover
                | DrainMode::Exit {
                    after_handover: true,
                    ..
                }
        )
    }
}

impl AgentState {
    /// The name heartbeats, D-Bus (`State`), logs and `STATUS=` show.
    pub fn wire(&self) -> DelegateState {
        match self {
            AgentState::Starting => DelegateState::Starting,
            AgentState::Running => DelegateState::Running,
            AgentState::Draining { .. } => DelegateState::Draining,
            AgentState::Drained { .. } => DelegateState::Drained,
            AgentState::Stopping { .. } | AgentState::Stopped { .. } => DelegateState::Stopping,
        }
    }

    /// Long polls (and registration attempts) end now.
    pub fn polls_end(&self) -> bool {
        match self {
            AgentState::Stopping { .. } | AgentState::Stopped { .. } => true,
            AgentState::Draining { mode } | AgentState::Drained { mode } => matches!(
                mode,
                DrainMode::Exit {
                    manager_unreachable: true,
                    ..
                }
            ),
            AgentState::Starting | AgentState::Running => false,
        }
    }

    /// Retry loops give up; the spool keeps what they had not delivered.
    pub fn gives_up(&self) -> bool {
        matches!(self, AgentState::Stopped { .. })
    }

    /// The drain waits only for tasks a new agent cannot adopt.
    pub fn leaves_adoptable(&self) -> bool {
        match self {
            AgentState::Draining { mode } | AgentState::Drained { mode } => mode.hands_over(),
            _ => false,
        }
    }

    /// The rejection that stopped the agent, if one did.
    pub fn rejection(&self) -> Option<&Rejection> {
        match self {
            AgentState::Stopping {
                why: StopCause::Rejected(r),
            }
            | AgentState::Stopped {
                why: StopCause::Rejected(r),
            } => Some(r),
            _ => None,
        }
    }

    /// The state in an operator's words, for errors (the wire name alone would say
    /// "draining" for a drain that `Resume()` cannot undo).
    pub fn describe(&self) -> &'static str {
        use DrainMode as M;
        match self {
            AgentState::Starting => "starting",
            AgentState::Running => "running",
            AgentState::Draining { mode: M::Requested } => "draining",
            AgentState::Draining { mode: M::Handover } => "handing over",
            AgentState::Draining {
                mode: M::Exit { .. },
            } => "draining to stop",
            AgentState::Drained { mode: M::Requested } => "drained",
            AgentState::Drained { mode: M::Handover } => "handed over",
            AgentState::Drained {
                mode: M::Exit { .. },
            } => "drained to stop",
            AgentState::Stopping { .. } => "stopping",
            AgentState::Stopped { .. } => "stopped",
        }
    }
}

/// The wire name (`starting`, `running`, `draining`, `drained`, `stopping`).
impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.wire().fmt(f)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Event::Registered => "complete the registration",
            Event::Drain => "drain",
            Event::Handover => "hand over",
            Event::Resume { .. } => "resume",
            Event::Shutdown => "drain to stop",
            Event::ManagerUnreachable => "end polls for an unreachable manager",
            Event::Idle => "note that nothing runs",
            Event::Stop(_) => "stop",
            Event::Reject(_) => "stop for the manager's rejection",
            Event::Exit => "exit",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AgentState as S;
    use DrainMode as M;

    fn draining(mode: DrainMode) -> AgentState {
        S::Draining { mode }
    }
    fn drained(mode: DrainMode) -> AgentState {
        S::Drained { mode }
    }
    fn exit_mode(after_handover: bool, manager_unreachable: bool) -> DrainMode {
        M::Exit {
            after_handover,
            manager_unreachable,
        }
    }
    fn stopping(why: StopCause) -> AgentState {
        S::Stopping { why }
    }
    fn stopped(why: StopCause) -> AgentState {
        S::Stopped { why }
    }
    fn rejected() -> StopCause {
        StopCause::Rejected(Rejection::Token("revoked".into()))
    }

    /// Every state (each mode, each cause) × every event, written out: the next state, or
    /// `None` for the typed error naming that state and event.
    #[test]
    fn the_whole_table() {
        let x = exit_mode(false, false);
        let xu = exit_mode(false, true);
        let xh = exit_mode(true, false);
        let xhu = exit_mode(true, true);
        let events = [
            Event::Registered,
            Event::Drain,
            Event::Handover,
            Event::Resume { registered: true },
            Event::Resume { registered: false },
            Event::Shutdown,
            Event::ManagerUnreachable,
            Event::Idle,
            Event::Stop(StopCause::Drained),
            Event::Stop(StopCause::DrainTimeout),
            Event::Stop(StopCause::Aborted),
            Event::Stop(StopCause::HandedOver),
            Event::Stop(rejected()),
            Event::Reject(Rejection::Token("revoked".into())),
            Event::Exit,
        ];
        let no = None;
        let s = |a: AgentState| Some(a);
        let rej = || s(stopping(rejected()));
        // Columns in the order of `events`:
        //   Registered, Drain, Handover, Resume(registered), Resume(not registered),
        //   Shutdown, ManagerUnreachable, Idle, Stop(Drained), Stop(DrainTimeout),
        //   Stop(Aborted), Stop(HandedOver), Stop(Rejected), Reject, Exit
        let mut rows: Vec<(AgentState, [Option<AgentState>; 15])> = vec![
            (
                S::Starting,
                [
                    s(S::Running),
                    s(draining(M::Requested)),
                    s(draining(M::Handover)),
                    no.clone(),
                    no.clone(),
                    s(draining(x)),
                    no.clone(),
                    s(S::Starting),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    rej(),
                    no.clone(),
                ],
            ),
            (
                S::Running,
                [
                    s(S::Running),
                    s(draining(M::Requested)),
                    s(draining(M::Handover)),
                    s(S::Running),
                    s(S::Running),
                    s(draining(x)),
                    no.clone(),
                    s(S::Running),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    rej(),
                    no.clone(),
                ],
            ),
        ];
        // Draining and drained behave alike but for `Idle`.
        for wrap in [
            draining as fn(DrainMode) -> AgentState,
            drained as fn(DrainMode) -> AgentState,
        ] {
            let idle = |m: DrainMode| s(drained(m));
            rows.push((
                wrap(M::Requested),
                [
                    s(wrap(M::Requested)),
                    s(wrap(M::Requested)),
                    s(wrap(M::Handover)),
                    s(S::Running),
                    s(S::Starting),
                    s(wrap(x)),
                    no.clone(),
                    idle(M::Requested),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    rej(),
                    no.clone(),
                ],
            ));
            rows.push((
                wrap(M::Handover),
                [
                    s(wrap(M::Handover)),
                    s(wrap(M::Handover)),
                    s(wrap(M::Handover)),
                    s(S::Running),
                    s(S::Starting),
                    s(wrap(xh)),
                    no.clone(),
                    idle(M::Handover),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    no.clone(),
                    rej(),
                    no.clone(),
                ],
            ));
            for (m, unreachable) in [(x, xu), (xu, xu)] {
                rows.push((
                    wrap(m),
                    [
                        s(wrap(m)),
                        s(wrap(m)),
                        no.clone(),
                        no.clone(),
                        no.clone(),
                        s(wrap(m)),
                        s(wrap(unreachable)),
                        idle(m),
                        s(stopping(StopCause::Drained)),
                        s(stopping(StopCause::DrainTimeout)),
                        s(stopping(StopCause::Aborted)),
                        no.clone(),
                        no.clone(),
                        no.clone(),
                        no.clone(),
                    ],
                ));
            }
            for (m, unreachable) in [(xh, xhu), (xhu, xhu)] {
                rows.push((
                    wrap(m),
                    [
                        s(wrap(m)),
                        s(wrap(m)),
                        s(wrap(m)),
                        no.clone(),
                        no.clone(),
                        s(wrap(m)),
                        s(wrap(unreachable)),
                        idle(m),
                        s(stopping(StopCause::Drained)),
                        s(stopping(StopCause::DrainTimeout)),
                        s(stopping(StopCause::Aborted)),
                        s(stopping(StopCause::HandedOver)),
                        no.clone(),
                        no.clone(),
                        no.clone(),
                    ],
                ));
            }
        }
        for why in [
            StopCause::Drained,
            StopCause::DrainTimeout,
            StopCause::Aborted,
            StopCause::HandedOver,
            rejected(),
        ] {
            for state in [stopping(why.clone()), stopped(why.clone())] {
                let mut row: [Option<AgentState>; 15] = Default::default();
                // Only `Exit` moves on, to (or staying in) `Stopped` with the same cause.
                row[14] = s(stopped(why.clone()));
                rows.push((state, row));
            }
        }
        // 2 + 2 × 6 + 5 × 2 states: every variant, every mode, every cause.
        assert_eq!(rows.len(), 24);

        for (state, expected) in &rows {
            for (event, want) in events.iter().zip(expected.iter()) {
                let got = transition(state, event.clone());
                match want {
                    Some(next) => assert_eq!(got.as_ref(), Ok(next), "{state:?} × {event:?}"),
                    None => assert_eq!(
                        got,
                        Err(TransitionError {
                            state: state.clone(),
                            event: event.clone()
                        }),
                        "{state:?} × {event:?}"
                    ),
                }
            }
        }
    }

    #[test]
    fn drain_then_idle_then_resume() {
        let s = transition(&S::Starting, Event::Registered).expect("register");
        let s = transition(&s, Event::Drain).expect("drain");
        assert_eq!(s.wire(), DelegateState::Draining);
        let s = transition(&s, Event::Idle).expect("idle");
        assert_eq!(s.wire(), DelegateState::Drained);
        assert_eq!(
            transition(&s, Event::Resume { registered: true }),
            Ok(S::Running)
        );
    }

    #[test]
    fn resume_before_registration_is_starting_again() {
        let s = transition(&S::Starting, Event::Drain).expect("drain");
        let s = transition(&s, Event::Idle).expect("idle");
        assert_eq!(
            transition(&s, Event::Resume { registered: false }),
            Ok(S::Starting)
        );
    }

    #[test]
    fn nothing_leaves_stopping() {
        let stopping = stopping(StopCause::Drained);
        for e in [
            Event::Registered,
            Event::Drain,
            Event::Resume { registered: true },
            Event::Idle,
        ] {
            assert!(transition(&stopping, e.clone()).is_err(), "{e:?}");
        }
        assert_eq!(
            transition(&stopping, Event::Exit),
            Ok(stopped(StopCause::Drained))
        );
        assert!(transition(&S::Starting, Event::Resume { registered: false }).is_err());
    }

    /// A drain survives a handover and a SIGTERM; the handover survives the SIGTERM, and
    /// `Resume()` undoes both drain and handover but not the exit.
    #[test]
    fn a_handover_then_sigterm_hands_over() {
        let s = transition(&S::Running, Event::Drain).expect("drain");
        let s = transition(&s, Event::Handover).expect("handover");
        assert!(s.leaves_adoptable());
        let s = transition(&s, Event::Shutdown).expect("sigterm");
        assert!(s.leaves_adoptable());
        assert!(!s.polls_end());
        assert_eq!(
            transition(&s, Event::Resume { registered: true })
                .expect_err("an exit cannot be resumed")
                .to_string(),
            "cannot resume while the agent is draining to stop"
        );
        let s = transition(&s, Event::Stop(StopCause::HandedOver)).expect("hand over");
        assert!(s.polls_end() && !s.gives_up());
        let s = transition(&s, Event::Exit).expect("exit");
        assert!(s.gives_up());
        assert_eq!(s.wire(), DelegateState::Stopping);
    }

    /// The first rejection stops the agent and is the one kept.
    #[test]
    fn the_first_rejection_is_kept() {
        let first = Rejection::Registration("name taken".into());
        let s = transition(&S::Starting, Event::Reject(first.clone())).expect("reject");
        assert!(s.polls_end());
        assert!(transition(&s, Event::Reject(Rejection::Token("x".into()))).is_err());
        let s = transition(&s, Event::Exit).expect("exit");
        assert_eq!(s.rejection(), Some(&first));
    }

    #[test]
    fn the_wire_names_are_the_protocols() {
        assert_eq!(S::Starting.to_string(), "starting");
        assert_eq!(draining(exit_mode(true, true)).to_string(), "draining");
        assert_eq!(drained(M::Handover).to_string(), "drained");
        assert_eq!(stopped(StopCause::Aborted).to_string(), "stopping");
    }
}
