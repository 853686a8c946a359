//! The upgrader's view of the agent over D-Bus: ask it to drain, and read the properties
//! the health gate judges (`Version`, `State`, `Connected`).
//!
//! The proxy mirrors `dev.delegate.Agent1` as served by the agent (`agent/src/dbus.rs`);
//! it is declared again here so the upgrader does not link the whole agent.

use std::time::Duration;

use zbus::proxy;

use crate::error::UpgradeError;

pub const BUS_NAME: &str = "dev.delegate.Agent1";

fn bus(what: &str, e: impl Into<zbus::Error>) -> UpgradeError {
    UpgradeError::Bus {
        what: what.to_string(),
        source: Some(e.into()),
    }
}

#[proxy(
    interface = "dev.delegate.Agent1",
    default_service = "dev.delegate.Agent1",
    default_path = "/dev/delegate/Agent1"
)]
pub trait Agent1 {
    fn drain(&self) -> zbus::Result<()>;
    fn resume(&self) -> zbus::Result<()>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn in_flight(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn connected(&self) -> zbus::Result<bool>;
}

/// What the health gate reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub version: String,
    pub state: String,
    pub connected: bool,
}

pub struct AgentBus {
    conn: zbus::Connection,
}

impl AgentBus {
    pub async fn connect() -> Result<AgentBus, UpgradeError> {
        let conn = tokio::time::timeout(Duration::from_secs(10), zbus::Connection::system())
            .await
            .map_err(|_| UpgradeError::Bus {
                what: "no answer within 10s".into(),
                source: None,
            })?
            .map_err(|e| bus("cannot connect", e))?;
        Ok(AgentBus { conn })
    }

    async fn proxy(&self) -> Result<Option<Agent1Proxy<'static>>, UpgradeError> {
        let dbus = zbus::fdo::DBusProxy::new(&self.conn)
            .await
            .map_err(|e| bus("cannot ask for the agent's name", e))?;
        let name = zbus::names::BusName::try_from(BUS_NAME)
            .map_err(|e| bus("cannot ask for the agent's name", e))?;
        if !dbus.name_has_owner(name).await.unwrap_or(false) {
            return Ok(None);
        }
        let p = Agent1Proxy::builder(&self.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus("cannot ask for the agent's name", e))?;
        Ok(Some(p))
    }

    /// The agent's properties, or `None` when it is not on the bus (yet).
    pub async fn health(&self) -> Option<Health> {
        let p = self.proxy().await.ok()??;
        Some(Health {
            version: p.version().await.ok()?,
            state: p.state().await.ok()?,
            connected: p.connected().await.ok()?,
        })
    }

    /// `Drain()` and wait until `drained`. `Ok(false)`: the agent is not on the bus or did
    /// not finish within `limit` (the caller decides; the restart's SIGTERM drains too).
    pub async fn drain(&self, limit: Duration) -> Result<DrainResult, UpgradeError> {
        let Some(p) = self.proxy().await? else {
            return Ok(DrainResult::NotOnBus);
        };
        p.drain().await.map_err(|e| bus("Drain() failed", e))?;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let state = p.state().await.unwrap_or_default();
            if state == "drained" {
                return Ok(DrainResult::Drained);
            }
            if tokio::time::Instant::now() >= deadline {
                let n = p.in_flight().await.unwrap_or(0);
                return Ok(DrainResult::TimedOut { in_flight: n });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Undo a drain (a run interrupted before the swap left the agent drained).
    pub async fn resume(&self) -> Result<bool, UpgradeError> {
        let Some(p) = self.proxy().await? else {
            return Ok(false);
        };
        p.resume().await.map_err(|e| bus("Resume() failed", e))?;
        Ok(true)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainResult {
    Drained,
    NotOnBus,
    TimedOut { in_flight: u32 },
}
