//! Workspace integration tests: the real `delegate-manager` and `delegate` binaries,
//! talking HTTP over loopback, with real processes, signals and SQLite.

mod docker;
mod docker_policy;
mod fake_manager;
mod load;
mod manager_logs;
mod manager_metrics;
mod manager_pg;
mod metrics;
mod resilience;
mod setup;
mod shell;
mod store_backends;
mod task_output;
mod tls_agent;
mod trust_agent;
mod trust_manager;
mod upgrade_group;
mod util;
