//! Test-only fault points: `DELEGATE_UPGRADER_FAULT=after-step-N` (or `after-swap`,
//! `rollback-after-drain`, `rollback-after-links`) makes the process abort right there, as
//! a `kill -9` or a power cut would; `rollback-restart-fails` makes the restart of a
//! rollback fail instead of happening.
//!
//! The promise "killing the upgrader at any step leaves a working host" can only be
//! tested if a test can stop the real binary at each step; an environment variable costs
//! nothing in production, where it is never set.

pub const ENV: &str = "DELEGATE_UPGRADER_FAULT";

/// Abort the process if the fault point `name` is armed.
pub fn point(name: &str) {
    if std::env::var(ENV).is_ok_and(|v| v == name) {
        eprintln!("delegate-upgrader: fault point {name} reached: aborting ({ENV})");
        std::process::abort();
    }
}

/// Is the fault `name` armed? For faults that are not an abort (a restart that fails).
pub fn armed(name: &str) -> bool {
    std::env::var(ENV).is_ok_and(|v| v == name)
}
