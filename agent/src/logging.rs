//! Logging set-up: journald's native protocol under systemd, readable stderr otherwise.
//!
//! Under journald every event of a task carries `TASK_ID`, `TASK_KIND` and `ATTEMPT`
//! fields (from the task span) so `journalctl -u delegate TASK_ID=t_...` finds its lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Started by systemd? (`JOURNAL_STREAM` is set when stdout/stderr go to the journal.)
fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// `level` is the config's `log_level`; `RUST_LOG` wins when set.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if under_systemd()
        && let Ok(journald) = tracing_journald::layer()
    {
        let layer = journald
            .with_field_prefix(None)
            .with_syslog_identifier("delegate".into());
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init();
        return;
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .try_init();
}
