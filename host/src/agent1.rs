//! Client side of the agent's control interface, `dev.delegate.Agent1` (served by
//! `agent/src/dbus.rs`), for the operator CLI (`delegate status|drain|resume`) and the
//! upgrader's drain and health gate.

use delegate_protocol::DelegateState;
use zbus::proxy;

/// Well-known bus name, interface name and object path (versioned: `…Agent1`).
pub const BUS_NAME: &str = "dev.delegate.Agent1";
pub const INTERFACE: &str = "dev.delegate.Agent1";
pub const OBJECT_PATH: &str = "/dev/delegate/Agent1";

#[proxy(
    interface = "dev.delegate.Agent1",
    default_service = "dev.delegate.Agent1",
    default_path = "/dev/delegate/Agent1"
)]
pub trait Agent1 {
    fn drain(&self) -> zbus::Result<()>;
    fn resume(&self) -> zbus::Result<()>;
    /// Since 0.2 (task units that outlive the agent); an older agent answers `UnknownMethod`.
    fn handover(&self) -> zbus::Result<()>;
    /// The agent's life-cycle state as its wire name; [`state`] parses it.
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn in_flight(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn connected(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn delegate_id(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn manager_url(&self) -> zbus::Result<String>;
}

/// Why the `State` property could not be read as a [`DelegateState`].
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the agent's State property")]
    Bus(#[source] zbus::Error),
    #[error("the agent reports State {0:?}, which this program does not know (a newer agent?)")]
    Unknown(String),
}

/// The agent's `State`, parsed into the protocol's enum (never compared as a string).
pub async fn state(p: &Agent1Proxy<'_>) -> Result<DelegateState, StateError> {
    let s = p.state().await.map_err(StateError::Bus)?;
    s.parse().map_err(|_| StateError::Unknown(s))
}
