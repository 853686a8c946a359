//! The reference control plane for delegate agents, as a library.
//!
//! `delegate-manager` hands tasks to delegates over HTTP long polls, keeps every task,
//! lease and log line in SQLite (or in PostgreSQL, shared by several nodes: `store::postgres`), and
//! gives operators a CLI. The binary is a thin shell
//! over these modules so that tests can start a real server in-process.
//!
//! Data flows one way: a user submits a task (`api`), the store queues it (`store`), the
//! hub wakes a waiting delegate (`hub`), which leases it, reports logs and a result, and
//! the lease reaper (`reaper`) re-queues the work of delegates that went silent.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod conn;
pub mod error;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod queue;
pub mod reaper;
pub mod releases;
pub mod server;
pub mod store;
pub mod text;

/// The PostgreSQL store under its older path (`crate::pg::Note`, `pg::PgOptions`, …).
pub use store::postgres as pg;
