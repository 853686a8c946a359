//! The agent's control interface on the system bus: `dev.delegate.Agent1`.
//!
//! The upgrader (and an operator through `delegate status`/`drain`/`resume`) must be able
//! to ask a running agent to stop taking tasks and to watch it finish its work, without
//! sending it a signal that would also end the process. D-Bus gives us that with a
//! system-wide policy file deciding who may do what, and property-change signals so
//! nobody polls. The interface only translates: methods become [`Control`] messages to the
//! daemon (a request the agent's state does not allow comes back as an error naming the
//! state), properties read the daemon's [`Observer`] watch channels.

use std::time::Duration;

use delegate_protocol::DelegateState;
use tokio::sync::mpsc;
use zbus::{fdo, interface};

use crate::daemon::{Control, Observer, Reply};

/// Names and the client proxy are shared with the upgrader (`delegate-host`).
pub use delegate_host::agent1::{Agent1Proxy, BUS_NAME, INTERFACE, OBJECT_PATH};

/// How long start-up waits for the bus before going on without it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The object served at [`OBJECT_PATH`].
pub struct AgentObject {
    control: mpsc::Sender<Control>,
    observer: Observer,
}

#[interface(name = "dev.delegate.Agent1")]
impl AgentObject {
    /// Stop acquiring tasks; in-flight ones finish. `State` becomes `drained` when none is
    /// left.
    async fn drain(&self) -> fdo::Result<()> {
        self.send(Control::Drain).await
    }

    /// Take tasks again after a drain.
    async fn resume(&self) -> fdo::Result<()> {
        self.send(Control::Resume).await
    }

    /// For an upgrade: stop acquiring and wait only for tasks a new agent cannot adopt.
    /// `State` becomes `drained` with task units and containers still running; the next
    /// SIGTERM exits without stopping them, and the new agent adopts them.
    async fn handover(&self) -> fdo::Result<()> {
        self.send(Control::Handover).await
    }

    #[zbus(property)]
    fn state(&self) -> String {
        self.observer.state.borrow().wire().to_string()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        crate::VERSION.to_string()
    }

    #[zbus(property)]
    fn in_flight(&self) -> u32 {
        *self.observer.in_flight.borrow()
    }

    #[zbus(property)]
    fn connected(&self) -> bool {
        *self.observer.connected.borrow()
    }

    /// Empty until the manager accepted the registration.
    #[zbus(property)]
    fn delegate_id(&self) -> String {
        self.observer
            .delegate_id
            .borrow()
            .clone()
            .unwrap_or_default()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn manager_url(&self) -> String {
        self.observer.manager_url()
    }
}

impl AgentObject {
    /// Ask the daemon and wait for its answer: `Failed` with the table's reason when the
    /// agent's state does not allow the request, or "the agent is stopping" when the daemon
    /// no longer reads requests.
    async fn send(&self, request: fn(Reply) -> Control) -> fdo::Result<()> {
        let stopping = || fdo::Error::Failed("the agent is stopping".into());
        let (reply, answer) = Reply::channel();
        self.control
            .send(request(reply))
            .await
            .map_err(|_| stopping())?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(refused)) => Err(fdo::Error::Failed(refused.to_string())),
            Err(_) => Err(stopping()),
        }
    }
}

/// Take the bus name and serve the object; the returned connection must be kept alive.
/// On failure the caller logs once and goes on without remote drain.
pub async fn serve(
    control: mpsc::Sender<Control>,
    observer: Observer,
) -> Result<zbus::Connection, zbus::Error> {
    let object = AgentObject {
        control,
        observer: observer.clone(),
    };
    let build = zbus::connection::Builder::system()
        .serve_at(OBJECT_PATH, object)
        .name(BUS_NAME)
        .build();
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, build)
        .await
        .map_err(|_| {
            zbus::Error::Failure(format!("no answer from the bus within {CONNECT_TIMEOUT:?}"))
        })??;
    tokio::spawn(forward_changes(conn.clone(), observer));
    Ok(conn)
}

/// Emit `PropertiesChanged` whenever one of the daemon's watch channels moves.
async fn forward_changes(conn: zbus::Connection, mut o: Observer) {
    let Ok(iface) = conn
        .object_server()
        .interface::<_, AgentObject>(OBJECT_PATH)
        .await
    else {
        return;
    };
    // `State` shows the wire name: a change of drain mode alone is not a change of it.
    let mut shown = o.state.borrow().wire();
    loop {
        let emitter = iface.signal_emitter();
        let object = iface.get().await;
        let sent = tokio::select! {
            r = o.state.changed() => match r {
                Ok(()) => {
                    let now = o.state.borrow_and_update().wire();
                    if std::mem::replace(&mut shown, now) == now {
                        continue;
                    }
                    object.state_changed(emitter).await
                }
                Err(_) => return,
            },
            r = o.connected.changed() => match r {
                Ok(()) => object.connected_changed(emitter).await,
                Err(_) => return,
            },
            r = o.in_flight.changed() => match r {
                Ok(()) => object.in_flight_changed(emitter).await,
                Err(_) => return,
            },
            r = o.delegate_id.changed() => match r {
                Ok(()) => object.delegate_id_changed(emitter).await,
                Err(_) => return,
            },
        };
        drop(object);
        if let Err(e) = sent {
            tracing::debug!("cannot emit PropertiesChanged: {e}");
        }
    }
}

/// Why the operator CLI could not reach the agent.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the system bus ({address}); is dbus running? (the bus address comes from DBUS_SYSTEM_BUS_ADDRESS)"
    )]
    NoBus {
        address: String,
        source: zbus::Error,
    },
    #[error(
        "the agent is not on the system bus (name {BUS_NAME} has no owner): is delegate.service running? (`systemctl status delegate`)"
    )]
    NotRunning,
    #[error("{what} failed")]
    Call {
        what: &'static str,
        source: zbus::Error,
    },
    #[error(
        "the agent did not reach `drained` within {0:?}; tasks are still running (see `delegate status`)"
    )]
    DrainTimeout(Duration),
    #[error(transparent)]
    State(#[from] delegate_host::agent1::StateError),
}

fn system_bus_address() -> String {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .unwrap_or_else(|_| "unix:path=/var/run/dbus/system_bus_socket".into())
}

/// What `delegate status` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: String,
    pub version: String,
    pub connected: bool,
    pub in_flight: u32,
    pub delegate_id: String,
    pub manager_url: String,
}

/// Connect to the bus and a proxy for the running agent (properties uncached, so every read
/// is fresh).
pub async fn connect() -> Result<Agent1Proxy<'static>, CliError> {
    let conn = zbus::Connection::system()
        .await
        .map_err(|source| CliError::NoBus {
            address: system_bus_address(),
            source,
        })?;
    let dbus = fdo::DBusProxy::new(&conn)
        .await
        .map_err(|source| CliError::Call {
            what: "org.freedesktop.DBus",
            source,
        })?;
    let name = zbus::names::BusName::try_from(BUS_NAME).map_err(|e| CliError::Call {
        what: "bus name",
        source: e,
    })?;
    if !dbus.name_has_owner(name).await.unwrap_or(false) {
        return Err(CliError::NotRunning);
    }
    Agent1Proxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .map_err(|source| CliError::Call {
            what: "proxy",
            source,
        })
}

pub async fn status(p: &Agent1Proxy<'_>) -> Result<Status, CliError> {
    let call = |what| move |source| CliError::Call { what, source };
    Ok(Status {
        state: p.state().await.map_err(call("State"))?,
        version: p.version().await.map_err(call("Version"))?,
        connected: p.connected().await.map_err(call("Connected"))?,
        in_flight: p.in_flight().await.map_err(call("InFlight"))?,
        delegate_id: p.delegate_id().await.map_err(call("DelegateId"))?,
        manager_url: p.manager_url().await.map_err(call("ManagerUrl"))?,
    })
}

/// `Drain()`, then (when `wait` is set) poll `State` until `drained`, bounded by `wait`.
pub async fn drain(p: &Agent1Proxy<'_>, wait: Option<Duration>) -> Result<(), CliError> {
    p.drain().await.map_err(|source| CliError::Call {
        what: "Drain()",
        source,
    })?;
    let Some(limit) = wait else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if delegate_host::agent1::state(p).await? == DelegateState::Drained {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::DrainTimeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn resume(p: &Agent1Proxy<'_>) -> Result<(), CliError> {
    p.resume().await.map_err(|source| CliError::Call {
        what: "Resume()",
        source,
    })
}
