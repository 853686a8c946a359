//! `delegate-upgrader` as a library: fetch a signed release, drain the agent over D-Bus,
//! swap its binary atomically, health-gate the new version and roll back when it fails.
//!
//! The binary (`main.rs`) only parses arguments and maps errors to exit codes; every
//! decision lives here so tests call the same code. `upgrade` is the orchestrator; the
//! other modules are its steps' tools.

#![forbid(unsafe_code)]

pub mod agent_bus;
pub mod config;
pub mod error;
pub mod fault;
pub mod fetch;
pub mod layout;
pub mod lock;
pub mod service;
pub mod spawn;
pub mod state;
pub mod trust;
pub mod upgrade;

pub use error::{Class, UpgradeError};
