//! Workspace integration tests: the real `delegate-manager` and `delegate` binaries,
//! talking HTTP over loopback, with real processes, signals and SQLite.

mod docker;
mod load;
mod resilience;
mod shell;
mod trust_manager;
mod util;
