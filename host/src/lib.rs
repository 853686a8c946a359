//! What the agent and the upgrader share on a host: the `dev.delegate.Agent1` D-Bus proxy
//! and the journald logging set-up.
//!
//! Both binaries run on every host and must agree on these contracts; declaring them once
//! keeps the proxy from drifting from the interface the agent serves, and keeps the two
//! journals' fields alike. It is small on purpose: the upgrader links it instead of the
//! whole agent.

#![forbid(unsafe_code)]

pub mod agent1;
pub mod logging;
