//! The delegate agent as a library: the daemon, its executors, its spool and its config,
//! so that tests and the thin `main.rs` call the same code.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod client;
pub mod config;
pub mod daemon;
pub mod dbus;
/// Man pages and completions (`delegate generate-docs DIR`), shared with the other binaries.
pub use delegate_docgen as docs;
pub mod exec;
pub mod hostcheck;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod setup;
pub mod spool;
pub mod state;
/// `delegate task-run`, the first program of a task unit (the shell executor's other half).
pub use exec::shell::task_run as task_runner;

/// The version this build reports. `DELEGATE_VERSION_OVERRIDE` at build time lets tests
/// build the same source as two versions (for upgrade tests).
pub const VERSION: &str = match option_env!("DELEGATE_VERSION_OVERRIDE") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// `EX_CONFIG` from sysexits.h: the unit's `RestartPreventExitStatus=78` keeps a broken
/// config from restarting in a loop.
pub const EXIT_CONFIG: u8 = 78;
