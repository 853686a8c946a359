//! Logging set-up for a program on a host: journald's native protocol under systemd (so
//! structured fields such as `TASK_ID` or `UPGRADE_STEP` are real journal fields),
//! readable stderr otherwise.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Started by systemd? (`JOURNAL_STREAM` is set when stdout/stderr go to the journal.)
fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Install the global subscriber. `identifier` is the journal's `SYSLOG_IDENTIFIER`;
/// `level` an `EnvFilter` directive (`RUST_LOG` wins when set; a bad one means `info`).
pub fn init(identifier: &str, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    if under_systemd()
        && let Ok(journald) = tracing_journald::layer()
    {
        let layer = journald
            .with_field_prefix(None)
            .with_syslog_identifier(identifier.to_string());
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
