//! What the upgrader remembers between runs, in `<root>/state.json`.
//!
//! The replay check needs the last manifest seen, the skip list needs to outlive a
//! rollback, and a run killed half-way needs to know what it was doing. Every change is
//! a [`Change`] made in memory by [`State::change`] (the phase through the one table,
//! [`transition`]) and committed with [`State::write`], which is atomic (temp file in the
//! same directory, fsync, rename, fsync of the directory) so a crash leaves the old or the
//! new state, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{UpgradeError, io};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Per channel: the newest manifest accepted (replay protection).
    #[serde(default)]
    pub last_seen: BTreeMap<String, Seen>,
    #[serde(default)]
    pub last_check: Option<Check>,
    /// Versions that failed their health gate (or were rolled back by hand).
    #[serde(default)]
    pub skip: Vec<String>,
    /// Set from the drain until the health gate passed: a run killed in between finds it.
    #[serde(default)]
    pub in_progress: Option<InProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub version: String,
    pub published_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `installed`, `up-to-date`, `disabled`, or an error code (`bad-signature`, ...).
    pub outcome: String,
    pub message: String,
}

/// An upgrade (or rollback) under way: what it is between and which phase it reached.
/// Saved *before* each step that changes the host, so a run killed anywhere finds the
/// phase it was in and finishes that phase; nothing is guessed from the links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    pub from: Option<String>,
    pub to: String,
    /// What `previous` pointed at before the swap, restored on rollback.
    pub previous_before: Option<String>,
    pub phase: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The agent was asked to drain (and may be drained); the links are untouched, so
    /// `from` still runs. Recovery: `Resume()` it, and the run starts over.
    Drained,
    /// `current → to`, `previous → from` is decided; the links may be half set and the
    /// restart may not have happened. Recovery: set the links, restart onto `to` unless
    /// it already runs, then the health gate.
    Swapped,
    /// Going back: `current → back_to`, `previous → previous`, restart, and `back_to`
    /// must be healthy; `abandoned` is on the skip list. Recovery: the same, again.
    RollingBack(Rollback),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollback {
    pub abandoned: String,
    pub back_to: String,
    pub previous: Option<String>,
    /// Why: the failed health gate, or "rolled back by hand".
    pub reason: String,
    /// `delegate-upgrader rollback` (ends in [`crate::upgrade::Outcome::RolledBack`]), not a
    /// failed health gate (ends in `UpgradeError::Unhealthy`).
    pub manual: bool,
}

/// What moves an upgrade from one phase to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Step 4 is about to ask the agent to drain.
    Drain {
        from: Option<String>,
        to: String,
        previous_before: Option<String>,
    },
    /// Step 5 is about to change the links.
    Swap,
    /// Step 6 passed.
    Healthy,
    /// Step 6 failed: go back (the links change back next).
    Unhealthy(Rollback),
    /// `rollback` by hand (the links change next).
    ManualRollback { from: String, rollback: Rollback },
    /// The rollback's restart happened and `back_to` is healthy.
    RolledBack,
    /// Recovery found a drain that never reached the swap and resumed the agent.
    Abandon,
}

impl Event {
    fn name(&self) -> &'static str {
        match self {
            Event::Drain { .. } => "drain",
            Event::Swap => "swap",
            Event::Healthy => "healthy",
            Event::Unhealthy(_) => "unhealthy",
            Event::ManualRollback { .. } => "manual rollback",
            Event::RolledBack => "rolled back",
            Event::Abandon => "abandon",
        }
    }
}

/// Every change the state file can undergo. The upgrader makes each one through its
/// `advance`, which applies it and writes the file before the step it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The upgrade's phase moves (through [`transition`]).
    Phase(Event),
    /// A newer manifest was accepted on `channel` (the replay watermark).
    Seen { channel: String, seen: Seen },
    /// Never install `version` again (until unskipped).
    Skip(String),
    /// Allow `version` again.
    Unskip(String),
    /// What the last `run`, `install` or `rollback` ended with.
    Checked(Check),
}

impl From<Event> for Change {
    fn from(e: Event) -> Change {
        Change::Phase(e)
    }
}

/// An event that is not allowed in the phase the state file records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "state.json records {phase} and cannot take `{event}`; finish or undo it first (`delegate-upgrader run` recovers an interrupted upgrade)"
)]
pub struct TransitionError {
    pub phase: String,
    pub event: &'static str,
}

fn phase_name(p: Option<&Phase>) -> String {
    match p {
        None => "no upgrade in progress".into(),
        Some(Phase::Drained) => "an upgrade in phase drained".into(),
        Some(Phase::Swapped) => "an upgrade in phase swapped".into(),
        Some(Phase::RollingBack(r)) => format!("a rollback to {} in progress", r.back_to),
    }
}

/// The one table of allowed moves (pure; [`State::apply`] records the result).
pub fn transition(phase: Option<&Phase>, event: &Event) -> Result<Option<Phase>, TransitionError> {
    use Event as E;
    use Phase as P;
    match (phase, event) {
        // Step 4 starts an upgrade; nothing else may be under way (recovery runs first).
        (None, E::Drain { .. }) => Ok(Some(P::Drained)),
        // Step 5, recorded before the first link changes: from here on the run is
        // finished forwards, never undone by a resume.
        (Some(P::Drained), E::Swap) => Ok(Some(P::Swapped)),
        // Recovery: the drain never reached the swap; the agent was resumed on `from`.
        (Some(P::Drained), E::Abandon) => Ok(None),
        // The health gate passed (in the run that swapped, or in a recovering one).
        (Some(P::Swapped), E::Healthy) => Ok(None),
        // The health gate failed: recorded before the links change back.
        (Some(P::Swapped), E::Unhealthy(r)) => Ok(Some(P::RollingBack(r.clone()))),
        // A rollback by hand, recorded before the links change.
        (None, E::ManualRollback { rollback, .. }) => Ok(Some(P::RollingBack(rollback.clone()))),
        // The rollback's restart ran and `back_to` is healthy: nothing is under way.
        (Some(P::RollingBack(_)), E::RolledBack) => Ok(None),
        // Everything else is a bug or a state file from elsewhere: refuse, typed.
        (
            None | Some(P::Drained | P::Swapped | P::RollingBack(_)),
            E::Drain { .. }
            | E::Swap
            | E::Healthy
            | E::Unhealthy(_)
            | E::ManualRollback { .. }
            | E::RolledBack
            | E::Abandon,
        ) => Err(TransitionError {
            phase: phase_name(phase),
            event: event.name(),
        }),
    }
}

impl State {
    pub fn path(root: &Path) -> PathBuf {
        root.join("state.json")
    }

    /// Missing file → empty state (first run).
    pub fn load(root: &Path) -> Result<State, UpgradeError> {
        let path = State::path(root);
        match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice(&b).map_err(|source| UpgradeError::State { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(path)(e)),
        }
    }

    pub fn write(&self, root: &Path) -> Result<(), UpgradeError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| UpgradeError::State {
            path: State::path(root),
            source,
        })?;
        write_atomic(&State::path(root), &bytes)
    }

    /// Make `change` in memory; the caller [`State::write`]s.
    pub fn change(&mut self, change: Change) -> Result<(), TransitionError> {
        match change {
            Change::Phase(e) => self.apply(e)?,
            Change::Seen { channel, seen } => {
                self.last_seen.insert(channel, seen);
            }
            Change::Skip(v) => self.skip(&v),
            Change::Unskip(v) => {
                self.unskip(&v);
            }
            Change::Checked(c) => self.last_check = Some(c),
        }
        Ok(())
    }

    /// Move the upgrade in progress through [`transition`]; the caller [`State::write`]s.
    /// Going back (a failed health gate, a rollback by hand) puts the abandoned version
    /// on the skip list in the same change, so no state file records the rollback without
    /// the skip (nor the skip without the rollback).
    pub fn apply(&mut self, event: Event) -> Result<(), TransitionError> {
        let next = transition(self.in_progress.as_ref().map(|p| &p.phase), &event)?;
        self.in_progress = match (next, self.in_progress.take(), event) {
            (None, _, _) => None,
            (Some(phase), Some(p), _) => Some(InProgress { phase, ..p }),
            (
                Some(phase),
                None,
                Event::Drain {
                    from,
                    to,
                    previous_before,
                },
            ) => Some(InProgress {
                from,
                to,
                previous_before,
                phase,
            }),
            (Some(phase), None, Event::ManualRollback { from, rollback }) => Some(InProgress {
                from: Some(from),
                to: rollback.back_to.clone(),
                previous_before: rollback.previous.clone(),
                phase,
            }),
            // The table starts a record only with the two events above.
            (Some(_), None, e) => {
                return Err(TransitionError {
                    phase: phase_name(None),
                    event: e.name(),
                });
            }
        };
        if let Some(InProgress {
            phase: Phase::RollingBack(r),
            ..
        }) = &self.in_progress
        {
            let abandoned = r.abandoned.clone();
            self.skip(&abandoned);
        }
        Ok(())
    }

    pub fn skip(&mut self, version: &str) {
        if !self.skip.iter().any(|v| v == version) {
            self.skip.push(version.to_string());
        }
    }

    pub fn unskip(&mut self, version: &str) -> bool {
        let before = self.skip.len();
        self.skip.retain(|v| v != version);
        before != self.skip.len()
    }
}

/// Temp file beside `path`, fsync, rename over `path`, fsync the directory
/// ([`delegate_durable::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), UpgradeError> {
    delegate_durable::write_atomic(path, bytes).map_err(from_durable)
}

pub fn sync_dir(dir: &Path) -> Result<(), UpgradeError> {
    delegate_durable::sync_dir(dir).map_err(from_durable)
}

fn from_durable(e: delegate_durable::WriteError) -> UpgradeError {
    UpgradeError::Io {
        path: e.path,
        source: e.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(State::load(dir.path()).expect("empty"), State::default());
        let mut s = State::default();
        s.skip("0.3.0");
        s.skip("0.3.0");
        s.last_seen.insert(
            "stable".into(),
            Seen {
                version: "0.2.0".into(),
                published_at: 7,
            },
        );
        s.write(dir.path()).expect("write");
        assert_eq!(State::load(dir.path()).expect("load"), s);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        assert!(s.unskip("0.3.0"));
        assert!(s.skip.is_empty());
    }

    fn rollback(manual: bool) -> Rollback {
        Rollback {
            abandoned: "0.2.0".into(),
            back_to: "0.1.0".into(),
            previous: None,
            reason: "r".into(),
            manual,
        }
    }

    fn drain() -> Event {
        Event::Drain {
            from: Some("0.1.0".into()),
            to: "0.2.0".into(),
            previous_before: None,
        }
    }

    #[test]
    fn the_transition_table_allows_exactly_the_upgrade_paths() {
        let phases = [
            None,
            Some(Phase::Drained),
            Some(Phase::Swapped),
            Some(Phase::RollingBack(rollback(false))),
        ];
        let events = [
            drain(),
            Event::Swap,
            Event::Healthy,
            Event::Unhealthy(rollback(false)),
            Event::ManualRollback {
                from: "0.2.0".into(),
                rollback: rollback(true),
            },
            Event::RolledBack,
            Event::Abandon,
        ];
        let mut allowed = Vec::new();
        for p in &phases {
            for e in &events {
                if let Ok(next) = transition(p.as_ref(), e) {
                    allowed.push((phase_name(p.as_ref()), e.name(), phase_name(next.as_ref())));
                }
            }
        }
        let want = [
            (
                "no upgrade in progress",
                "drain",
                "an upgrade in phase drained",
            ),
            (
                "no upgrade in progress",
                "manual rollback",
                "a rollback to 0.1.0 in progress",
            ),
            (
                "an upgrade in phase drained",
                "swap",
                "an upgrade in phase swapped",
            ),
            (
                "an upgrade in phase drained",
                "abandon",
                "no upgrade in progress",
            ),
            (
                "an upgrade in phase swapped",
                "healthy",
                "no upgrade in progress",
            ),
            (
                "an upgrade in phase swapped",
                "unhealthy",
                "a rollback to 0.1.0 in progress",
            ),
            (
                "a rollback to 0.1.0 in progress",
                "rolled back",
                "no upgrade in progress",
            ),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(a, b, c)| (a.to_string(), *b, c.to_string()))
            .collect();
        assert_eq!(allowed, want);
    }

    #[test]
    fn apply_records_the_phase_and_survives_a_reload() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = State::default();
        s.apply(drain()).expect("drain");
        s.apply(Event::Swap).expect("swap");
        s.apply(Event::Unhealthy(rollback(false)))
            .expect("unhealthy");
        s.write(dir.path()).expect("write");
        let mut back = State::load(dir.path()).expect("load");
        assert_eq!(back, s);
        assert!(matches!(
            back.in_progress.as_ref().map(|p| &p.phase),
            Some(Phase::RollingBack(r)) if r.back_to == "0.1.0"
        ));
        assert!(back.apply(Event::Swap).is_err());
        back.apply(Event::RolledBack).expect("rolled back");
        assert!(back.in_progress.is_none());
    }

    #[test]
    fn going_back_skips_the_abandoned_version_in_the_same_change() {
        let mut s = State::default();
        s.change(drain().into()).expect("drain");
        s.change(Event::Swap.into()).expect("swap");
        assert!(s.skip.is_empty());
        s.change(Change::Phase(Event::Unhealthy(rollback(false))))
            .expect("unhealthy");
        assert_eq!(s.skip, vec!["0.2.0".to_string()]);
        let mut by_hand = State::default();
        by_hand
            .change(Change::Phase(Event::ManualRollback {
                from: "0.2.0".into(),
                rollback: rollback(true),
            }))
            .expect("manual");
        assert_eq!(by_hand.skip, vec!["0.2.0".to_string()]);
        // A refused move changes nothing, the skip list included.
        let before = by_hand.clone();
        assert!(by_hand.change(Change::Phase(Event::Swap)).is_err());
        assert_eq!(by_hand, before);
    }

    #[test]
    fn the_other_changes_touch_only_their_field() {
        let mut s = State::default();
        let seen = Seen {
            version: "0.2.0".into(),
            published_at: 7,
        };
        s.change(Change::Seen {
            channel: "stable".into(),
            seen: seen.clone(),
        })
        .expect("seen");
        s.change(Change::Skip("0.3.0".into())).expect("skip");
        s.change(Change::Skip("0.3.0".into())).expect("skip twice");
        let check = Check {
            at: 1,
            outcome: "installed".into(),
            message: "m".into(),
        };
        s.change(Change::Checked(check.clone())).expect("checked");
        assert_eq!(s.last_seen.get("stable"), Some(&seen));
        assert_eq!(s.skip, vec!["0.3.0".to_string()]);
        assert_eq!(s.last_check, Some(check));
        assert!(s.in_progress.is_none());
        s.change(Change::Unskip("0.3.0".into())).expect("unskip");
        assert!(s.skip.is_empty());
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(State::path(dir.path()), b"{").expect("write");
        assert!(matches!(
            State::load(dir.path()),
            Err(UpgradeError::State { .. })
        ));
    }
}
