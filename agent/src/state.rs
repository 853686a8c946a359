//! The agent's life-cycle as one enum with one transition table.
//!
//! Signals, the D-Bus `Drain()`/`Resume()` methods and the task supervisor all move the
//! agent through the same states; keeping every allowed move in one `match` makes the rules
//! reviewable and turns an impossible request into a typed error instead of a stray flag.

pub use delegate_protocol::DelegateState as AgentState;

/// Something that asks the agent to change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Config loaded and the manager accepted the registration.
    Registered,
    /// SIGTERM or `Drain()`: stop taking tasks, let in-flight ones finish.
    Drain,
    /// `Resume()`: take tasks again. `registered` says whether the manager has accepted
    /// this agent yet; if not, resuming goes back to `starting`, not `running`.
    Resume { registered: bool },
    /// The last in-flight task finished while draining.
    Idle,
    /// The process is about to exit.
    Stop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event:?} while the agent is {state}")]
pub struct TransitionError {
    pub state: AgentState,
    pub event: Event,
}

/// The one table of allowed moves.
pub fn transition(state: AgentState, event: Event) -> Result<AgentState, TransitionError> {
    use AgentState as S;
    use Event as E;
    match (state, event) {
        // Registration completes start-up; a re-registration later changes nothing.
        (S::Starting, E::Registered) => Ok(S::Running),
        (S::Running | S::Draining | S::Drained, E::Registered) => Ok(state),
        // A drain may come before registration finished (SIGTERM during start-up).
        (S::Starting | S::Running, E::Drain) => Ok(S::Draining),
        // Draining twice is not an error: operators and the upgrader may both ask.
        (S::Draining | S::Drained, E::Drain) => Ok(state),
        (S::Draining, E::Idle) => Ok(S::Drained),
        (S::Drained, E::Idle) => Ok(S::Drained),
        // Idle is reported after every task; it only matters while draining.
        (S::Starting | S::Running, E::Idle) => Ok(state),
        // Resume undoes a drain that has not turned into a stop; an agent drained before
        // it ever registered is only starting again.
        (S::Draining | S::Drained, E::Resume { registered: true }) => Ok(S::Running),
        (S::Draining | S::Drained, E::Resume { registered: false }) => Ok(S::Starting),
        (S::Running, E::Resume { .. }) => Ok(S::Running),
        // Stopping is final and reachable from everywhere.
        (_, E::Stop) => Ok(S::Stopping),
        (S::Starting, E::Resume { .. }) | (S::Stopping, _) => Err(TransitionError { state, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AgentState as S;

    #[test]
    fn drain_then_idle_then_resume() {
        let s = transition(S::Starting, Event::Registered).expect("register");
        let s = transition(s, Event::Drain).expect("drain");
        assert_eq!(s, S::Draining);
        let s = transition(s, Event::Idle).expect("idle");
        assert_eq!(s, S::Drained);
        assert_eq!(
            transition(s, Event::Resume { registered: true }),
            Ok(S::Running)
        );
    }

    #[test]
    fn resume_before_registration_is_starting_again() {
        let s = transition(S::Starting, Event::Drain).expect("drain");
        let s = transition(s, Event::Idle).expect("idle");
        assert_eq!(
            transition(s, Event::Resume { registered: false }),
            Ok(S::Starting)
        );
    }

    #[test]
    fn nothing_leaves_stopping() {
        for e in [
            Event::Registered,
            Event::Drain,
            Event::Resume { registered: true },
            Event::Idle,
        ] {
            assert!(transition(S::Stopping, e).is_err(), "{e:?}");
        }
        assert_eq!(transition(S::Stopping, Event::Stop), Ok(S::Stopping));
        assert!(transition(S::Starting, Event::Resume { registered: false }).is_err());
    }
}
