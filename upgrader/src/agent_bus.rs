//! The upgrader's view of the agent over D-Bus: ask it to drain, and read the properties
//! the health gate judges (`Version`, `State`, `Connected`).
//!
//! The proxy is `delegate_host::agent1`, the one declaration the agent's CLI uses too, so
//! the upgrader does not link the whole agent and the two cannot drift apart.

use std::time::Duration;

use delegate_host::agent1::{self, Agent1Proxy, BUS_NAME};
use delegate_protocol::DelegateState;

use crate::config::UpgradeMode;
use crate::error::UpgradeError;

fn bus(what: &str, e: impl Into<zbus::Error>) -> UpgradeError {
    UpgradeError::Bus {
        what: what.to_string(),
        source: Some(e.into()),
    }
}

/// What the health gate reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub version: String,
    pub state: DelegateState,
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
            state: agent1::state(&p).await.ok()?,
            connected: p.connected().await.ok()?,
        })
    }

    /// `Drain()` (or, for [`UpgradeMode::Handover`], `Handover()`) and wait until
    /// `drained`. An agent too old to know `Handover()` is drained instead.
    /// `NotOnBus`/`TimedOut`: the caller decides (the restart's SIGTERM drains too).
    pub async fn drain(
        &self,
        limit: Duration,
        mode: UpgradeMode,
    ) -> Result<DrainResult, UpgradeError> {
        let Some(p) = self.proxy().await? else {
            return Ok(DrainResult::NotOnBus);
        };
        let mut handed_over = false;
        if mode == UpgradeMode::Handover {
            match p.handover().await {
                Ok(()) => handed_over = true,
                Err(zbus::Error::MethodError(name, _, _))
                    if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
                {
                    tracing::info!(
                        "the running agent does not know Handover(); draining it instead"
                    );
                }
                Err(e) => return Err(bus("Handover() failed", e)),
            }
        }
        if !handed_over {
            p.drain().await.map_err(|e| bus("Drain() failed", e))?;
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(DelegateState::Drained) = agent1::state(&p).await {
                return Ok(if handed_over {
                    DrainResult::HandedOver
                } else {
                    DrainResult::Drained
                });
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
    /// Drained of what cannot be adopted; the rest runs on for the next agent.
    HandedOver,
    NotOnBus,
    TimedOut {
        in_flight: u32,
    },
}
