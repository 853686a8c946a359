//! Logging set-up: journald's native protocol under systemd, readable stderr otherwise
//! (shared with the upgrader: `delegate_host::logging`).
//!
//! Under journald every event of a task carries `TASK_ID`, `TASK_KIND` and `ATTEMPT`
//! fields (from the task span) so `journalctl -u delegate TASK_ID=t_...` finds its lines.

/// `level` is the config's `log_level`; `RUST_LOG` wins when set.
pub fn init(level: &str) {
    delegate_host::logging::init("delegate", level);
}
