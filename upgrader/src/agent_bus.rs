//! The upgrader's view of the agent over D-Bus: ask it to drain, and read the properties
//! the health gate judges (`Version`, `State`, `Connected`).
//!
//! [`AgentBus`] is the seam: the upgrade steps talk to the agent only through it, so unit
//! tests steer the agent with a fake while integration tests run the real [`SystemBus`].
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

/// What the upgrade steps ask of the running agent.
#[allow(async_fn_in_trait)]
pub trait AgentBus {
    /// The agent's properties, or `None` when it is not on the bus (yet), or the bus is
    /// not reachable.
    async fn health(&self) -> Option<Health>;
    /// `Drain()` (or, for [`UpgradeMode::Handover`], `Handover()`) and wait at most
    /// `limit` until `drained`. `NotOnBus`/`TimedOut`: the caller decides (the restart's
    /// SIGTERM drains too).
    async fn drain(&self, limit: Duration, mode: UpgradeMode) -> Result<DrainResult, UpgradeError>;
    /// Undo a drain (a run interrupted before the swap left the agent drained); `false`
    /// when the agent is not on the bus.
    async fn resume(&self) -> Result<bool, UpgradeError>;
}

/// The system bus, connected on first use. A failed connection is not kept: the next
/// call tries again (the health gate polls until the restarted agent is there).
#[derive(Default)]
pub struct SystemBus {
    conn: tokio::sync::Mutex<Option<zbus::Connection>>,
}

impl SystemBus {
    pub fn new() -> SystemBus {
        SystemBus::default()
    }

    async fn connection(&self) -> Result<zbus::Connection, UpgradeError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let conn = tokio::time::timeout(Duration::from_secs(10), zbus::Connection::system())
            .await
            .map_err(|_| UpgradeError::Bus {
                what: "no answer within 10s".into(),
                source: None,
            })?
            .map_err(|e| bus("cannot connect", e))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn proxy(&self) -> Result<Option<Agent1Proxy<'static>>, UpgradeError> {
        let conn = self.connection().await?;
        let dbus = zbus::fdo::DBusProxy::new(&conn)
            .await
            .map_err(|e| bus("cannot ask for the agent's name", e))?;
        let name = zbus::names::BusName::try_from(BUS_NAME)
            .map_err(|e| bus("cannot ask for the agent's name", e))?;
        if !dbus.name_has_owner(name).await.unwrap_or(false) {
            return Ok(None);
        }
        let p = Agent1Proxy::builder(&conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| bus("cannot ask for the agent's name", e))?;
        Ok(Some(p))
    }
}

impl AgentBus for SystemBus {
    async fn health(&self) -> Option<Health> {
        let p = self.proxy().await.ok()??;
        Some(Health {
            version: p.version().await.ok()?,
            state: agent1::state(&p).await.ok()?,
            connected: p.connected().await.ok()?,
        })
    }

    /// An agent too old to know `Handover()` is drained instead.
    async fn drain(&self, limit: Duration, mode: UpgradeMode) -> Result<DrainResult, UpgradeError> {
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

    async fn resume(&self) -> Result<bool, UpgradeError> {
        let Some(p) = self.proxy().await? else {
            return Ok(false);
        };
        p.resume().await.map_err(|e| bus("Resume() failed", e))?;
        Ok(true)
    }
}

/// How a drain ended; step 4 says which in its journal line.
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
