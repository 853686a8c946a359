//! The manager's memory: tokens, delegates, tasks and logs, on SQLite (one node) or on
//! PostgreSQL (several nodes sharing one database).
//!
//! The API layer calls one [`Store`]; the store hands each call to its [`Backend`], one of
//! two implementations of the same contract: [`SqliteStore`] (`sqlite`) and [`PgStore`]
//! (`postgres`). What a call does to a task is decided in one place for both (`rules`,
//! which asks `lifecycle::transition`); a backend reads rows, asks, and writes the answer
//! (PostgreSQL's lease asks ahead: the states the table leases from are its SQL's
//! parameters, so a look stays one round trip).
//! Functions take the time as an argument (`now`) so tests can move the clock; the HTTP
//! layer passes the wall clock. One suite of contract tests (`tests/tests/it/
//! store_backends.rs`) runs every rule on both backends.

pub mod postgres;
pub(crate) mod rules;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use delegate_protocol::{
    AcquireResponse, DelegateView, ForgottenDelegate, HeartbeatRequest, HeartbeatResponse,
    RegisterRequest, SubmitTask, TaskResult, TaskState, TaskView, TokenView, UnixMillis,
};

use crate::auth;
use crate::error::StoreError;
use crate::metrics::{Metrics, Snapshot};
use crate::queue::{Fresh, Selectors};

pub use self::postgres::{PgClock, PgOptions, PgStore};
pub use self::rules::is_draining;
pub use self::sqlite::SqliteStore;

/// Default per-task log cap: 256 MiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 256 * 1024 * 1024;

/// The wall clock in the protocol's unit.
pub fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as UnixMillis)
        .unwrap_or(0)
}

/// A fresh task id: `t_` + 20 hex digits.
pub fn new_task_id() -> String {
    format!("t_{}", auth::random_hex(10))
}

/// A fresh delegate id: `d_` + 16 hex digits.
pub fn new_delegate_id() -> String {
    format!("d_{}", auth::random_hex(8))
}

/// What a result did to its task, so the caller knows whom to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The task reached a terminal state (or already had this very result).
    Done,
    /// The attempt was lost and the task is queued again for another attempt.
    Requeued,
}

/// What a cancel request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    /// The task was still queued and is now `cancelled`.
    Cancelled,
    /// A delegate holds the task; it will be told to stop.
    Requested,
}

/// What one pass of the lease reaper did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub requeued: usize,
    pub lost: usize,
    pub cancelled: usize,
}

impl Reaped {
    pub fn any(&self) -> bool {
        self.requeued + self.lost + self.cancelled > 0
    }
}

/// Part of an attempt's log, as read for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSlice {
    pub data: Vec<u8>,
    /// Bytes stored for the attempt so far.
    pub stored: u64,
    pub attempt: u32,
    pub state: TaskState,
}

/// What one retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub tasks: usize,
    pub log_bytes: u64,
}

/// Where the manager keeps its data (`serve --database`). Its `Debug` hides passwords.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    /// One SQLite file (the default, `DATA/manager.db`): one manager node.
    Sqlite(PathBuf),
    /// A PostgreSQL database several manager nodes share (`postgres://…`).
    Postgres(String),
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Database::Postgres(url) => f
                .debug_tuple("Postgres")
                .field(&self::postgres::redact(url))
                .finish(),
        }
    }
}

impl Database {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; `sqlite:PATH` or a plain path is
    /// a SQLite file.
    pub fn parse(s: &str) -> Result<Database, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err(
                "the database is empty; give postgres://USER@HOST:PORT/DB or a \
                        SQLite file path"
                    .to_string(),
            );
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Database::Postgres(s.to_string()));
        }
        if let Some(path) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            return Ok(Database::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(format!(
                "{scheme}:// databases are not supported; give postgres://USER@HOST:PORT/DB \
                 or a SQLite file path"
            ));
        }
        Ok(Database::Sqlite(PathBuf::from(s)))
    }
}

/// What a store does, whichever database holds it: the contract both backends keep (and
/// the contract tests check on both). Every method is one short transaction; `now` is the
/// caller's clock (the PostgreSQL store may take the database's instead, see [`PgClock`]).
pub trait Backend: Send + Sync {
    /// The figures the store records as things happen (pick-up, run time, lapsed leases).
    fn metrics(&self) -> &Metrics;
    /// The counts `/metrics` reads from the database.
    fn snapshot(&self, now: UnixMillis) -> Result<Snapshot, StoreError>;
    /// Tasks queued (or re-queued) since the last call: the API wakes one poll for each.
    fn take_fresh(&self) -> Vec<Fresh>;
    /// The tags of a delegate if they are in memory already.
    fn cached_delegate_tags(&self, id: &str) -> Option<Selectors>;
    /// The tags of a registered delegate (from memory; read once from the database).
    fn delegate_tags(&self, id: &str) -> Result<Option<Selectors>, StoreError>;
    fn lease_ttl_ms(&self) -> i64;
    /// Cap each attempt's stored log at `bytes`.
    fn set_max_log_bytes(&mut self, bytes: u64);

    fn admin_hash(&self) -> Result<Option<String>, StoreError>;
    fn set_admin_hash(&self, hash: &str) -> Result<(), StoreError>;
    /// Store `hash` as the admin token's unless one is; the hash stored afterwards.
    fn claim_admin_hash(&self, hash: &str) -> Result<String, StoreError>;

    /// Create a delegate token; `tags` is the set its delegates may register with.
    fn create_token(
        &self,
        name: &str,
        hash: &str,
        tags: Option<&[String]>,
        now: UnixMillis,
    ) -> Result<(), StoreError>;
    fn list_tokens(&self) -> Result<Vec<TokenView>, StoreError>;
    /// Revoke a token, freeing its delegates' names and releasing their tasks.
    fn revoke_token(&self, name: &str, now: UnixMillis) -> Result<TokenView, StoreError>;
    /// Forget a delegate, releasing its tasks as if its lease had lapsed.
    fn forget_delegate(
        &self,
        name: &str,
        hostname: Option<&str>,
        now: UnixMillis,
    ) -> Result<ForgottenDelegate, StoreError>;
    /// The name of the live token with this hash.
    fn token_name(&self, hash: &str) -> Result<Option<String>, StoreError>;
    fn cached_token_name(&self, hash: &str) -> Option<String>;

    /// Register a delegate, or update the one with the same name and hostname.
    fn register(
        &self,
        token_name: &str,
        req: &RegisterRequest,
        now: UnixMillis,
    ) -> Result<String, StoreError>;
    /// Renew the leases of held tasks; say which to cancel and which are no longer held.
    fn heartbeat(
        &self,
        token_name: &str,
        delegate_id: &str,
        req: &HeartbeatRequest,
        now: UnixMillis,
    ) -> Result<HeartbeatResponse, StoreError>;
    /// Lease up to `max` queued tasks the delegate may take (`prefer` first), and collect
    /// cancellations not yet delivered.
    fn acquire(
        &self,
        token_name: &str,
        delegate_id: &str,
        max: u32,
        now: UnixMillis,
        prefer: Option<&str>,
    ) -> Result<AcquireResponse, StoreError>;
    /// Has this delegate said it is draining?
    fn delegate_draining(&self, delegate_id: &str) -> Result<bool, StoreError>;
    fn list_delegates(&self, now: UnixMillis) -> Result<Vec<DelegateView>, StoreError>;

    /// Queue a validated submission under `id`.
    fn submit(
        &self,
        id: &str,
        task: &SubmitTask,
        timeout_secs: u64,
        now: UnixMillis,
    ) -> Result<(), StoreError>;
    fn task(&self, id: &str) -> Result<TaskView, StoreError>;
    /// Tasks newest first, optionally only those in `state`.
    fn list_tasks(&self, state: Option<TaskState>, limit: u32)
    -> Result<Vec<TaskView>, StoreError>;
    /// The delegate began running the attempt.
    fn started(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        now: UnixMillis,
    ) -> Result<TaskView, StoreError>;
    /// Store a log chunk at `offset` of the attempt's log; the bytes stored now.
    fn append_log(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, StoreError>;
    /// Delete a batch of finished tasks (and their logs) that ended before `before`.
    fn prune(&self, before: UnixMillis) -> Result<Pruned, StoreError>;
    /// Up to `max` bytes of the current attempt's log, from byte `offset`.
    fn read_log(&self, id: &str, offset: u64, max: usize) -> Result<LogSlice, StoreError>;
    /// Record the result of an attempt.
    fn finish(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        result: &TaskResult,
        now: UnixMillis,
    ) -> Result<(TaskView, Finish), StoreError>;
    /// A user asks to cancel.
    fn cancel(&self, id: &str, now: UnixMillis) -> Result<(TaskView, Cancel), StoreError>;
    /// End or re-queue every held task whose lease expired before `now`.
    fn reap(&self, now: UnixMillis) -> Result<Reaped, StoreError>;
    /// Move the leases set before a wall-clock step (see `reaper`).
    fn shift_leases(&self, by_ms: i64, set_before: UnixMillis) -> Result<usize, StoreError>;
    /// Give held tasks a fresh lease at startup.
    fn extend_leases(&self, now: UnixMillis) -> Result<usize, StoreError>;

    /// The PostgreSQL backend, when this is one (its cross-node wake-ups need starting).
    fn as_postgres(&self) -> Option<&PgStore> {
        None
    }
}

/// The manager's store on either backend; the API layer calls it the same way. SQLite
/// keeps its one-node fast paths (the in-memory queue index and hand-offs); PostgreSQL
/// leases with `FOR UPDATE SKIP LOCKED` and tells the other nodes through `NOTIFY`
/// (see `postgres`). Each method hands the call to the [`Backend`].
pub struct Store {
    backend: Box<dyn Backend>,
}

impl Store {
    /// A store on `backend`.
    pub fn new(backend: impl Backend + 'static) -> Store {
        Store {
            backend: Box::new(backend),
        }
    }

    /// Open (creating if needed) and migrate the SQLite database at `path`.
    pub fn open(path: &Path, lease_ttl: Duration) -> Result<Store, StoreError> {
        SqliteStore::open(path, lease_ttl).map(Store::new)
    }

    /// Connect to the PostgreSQL database at `url` and migrate it (safe when several
    /// nodes start at once).
    pub fn open_postgres(url: &str, lease_ttl: Duration) -> Result<Store, StoreError> {
        PgStore::open(url, lease_ttl).map(Store::new)
    }

    /// [`Store::open_postgres`] with a password kept out of the URL, or another clock.
    pub fn open_postgres_with(
        url: &str,
        lease_ttl: Duration,
        options: PgOptions,
    ) -> Result<Store, StoreError> {
        PgStore::open_with(url, lease_ttl, options).map(Store::new)
    }

    /// Open `db`.
    pub fn open_database(db: &Database, lease_ttl: Duration) -> Result<Store, StoreError> {
        match db {
            Database::Sqlite(path) => Store::open(path, lease_ttl),
            Database::Postgres(url) => Store::open_postgres(url, lease_ttl),
        }
    }

    /// The PostgreSQL backend, when this is one (its cross-node wake-ups need starting).
    pub fn postgres(&self) -> Option<&PgStore> {
        self.backend.as_postgres()
    }

    /// Cap each attempt's stored log at `bytes` (default [`DEFAULT_MAX_LOG_BYTES`]).
    pub fn with_max_log_bytes(mut self, bytes: u64) -> Store {
        self.backend.set_max_log_bytes(bytes);
        self
    }

    pub fn metrics(&self) -> &Metrics {
        self.backend.metrics()
    }
    pub fn snapshot(&self, now: UnixMillis) -> Result<Snapshot, StoreError> {
        self.backend.snapshot(now)
    }
    pub fn take_fresh(&self) -> Vec<Fresh> {
        self.backend.take_fresh()
    }
    pub fn cached_delegate_tags(&self, id: &str) -> Option<Selectors> {
        self.backend.cached_delegate_tags(id)
    }
    pub fn delegate_tags(&self, id: &str) -> Result<Option<Selectors>, StoreError> {
        self.backend.delegate_tags(id)
    }
    pub fn lease_ttl_ms(&self) -> i64 {
        self.backend.lease_ttl_ms()
    }
    pub fn admin_hash(&self) -> Result<Option<String>, StoreError> {
        self.backend.admin_hash()
    }
    pub fn set_admin_hash(&self, hash: &str) -> Result<(), StoreError> {
        self.backend.set_admin_hash(hash)
    }
    /// Store `hash` as the admin token's unless one is; the hash stored afterwards.
    pub fn claim_admin_hash(&self, hash: &str) -> Result<String, StoreError> {
        self.backend.claim_admin_hash(hash)
    }
    pub fn create_token(
        &self,
        name: &str,
        hash: &str,
        tags: Option<&[String]>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.backend.create_token(name, hash, tags, now)
    }
    pub fn list_tokens(&self) -> Result<Vec<TokenView>, StoreError> {
        self.backend.list_tokens()
    }
    pub fn revoke_token(&self, name: &str, now: UnixMillis) -> Result<TokenView, StoreError> {
        self.backend.revoke_token(name, now)
    }
    pub fn forget_delegate(
        &self,
        name: &str,
        hostname: Option<&str>,
        now: UnixMillis,
    ) -> Result<ForgottenDelegate, StoreError> {
        self.backend.forget_delegate(name, hostname, now)
    }
    pub fn token_name(&self, hash: &str) -> Result<Option<String>, StoreError> {
        self.backend.token_name(hash)
    }
    pub fn cached_token_name(&self, hash: &str) -> Option<String> {
        self.backend.cached_token_name(hash)
    }
    pub fn register(
        &self,
        token_name: &str,
        req: &RegisterRequest,
        now: UnixMillis,
    ) -> Result<String, StoreError> {
        self.backend.register(token_name, req, now)
    }
    pub fn heartbeat(
        &self,
        token_name: &str,
        delegate_id: &str,
        req: &HeartbeatRequest,
        now: UnixMillis,
    ) -> Result<HeartbeatResponse, StoreError> {
        self.backend.heartbeat(token_name, delegate_id, req, now)
    }
    pub fn acquire(
        &self,
        token_name: &str,
        delegate_id: &str,
        max: u32,
        now: UnixMillis,
        prefer: Option<&str>,
    ) -> Result<AcquireResponse, StoreError> {
        self.backend
            .acquire(token_name, delegate_id, max, now, prefer)
    }
    pub fn delegate_draining(&self, delegate_id: &str) -> Result<bool, StoreError> {
        self.backend.delegate_draining(delegate_id)
    }
    pub fn list_delegates(&self, now: UnixMillis) -> Result<Vec<DelegateView>, StoreError> {
        self.backend.list_delegates(now)
    }
    pub fn submit(
        &self,
        id: &str,
        task: &SubmitTask,
        timeout_secs: u64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        self.backend.submit(id, task, timeout_secs, now)
    }
    pub fn task(&self, id: &str) -> Result<TaskView, StoreError> {
        self.backend.task(id)
    }
    pub fn list_tasks(
        &self,
        state: Option<TaskState>,
        limit: u32,
    ) -> Result<Vec<TaskView>, StoreError> {
        self.backend.list_tasks(state, limit)
    }
    pub fn started(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        now: UnixMillis,
    ) -> Result<TaskView, StoreError> {
        self.backend.started(token_name, id, attempt, now)
    }
    pub fn append_log(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, StoreError> {
        self.backend
            .append_log(token_name, id, attempt, offset, data)
    }
    pub fn prune(&self, before: UnixMillis) -> Result<Pruned, StoreError> {
        self.backend.prune(before)
    }
    pub fn read_log(&self, id: &str, offset: u64, max: usize) -> Result<LogSlice, StoreError> {
        self.backend.read_log(id, offset, max)
    }
    pub fn finish(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        result: &TaskResult,
        now: UnixMillis,
    ) -> Result<(TaskView, Finish), StoreError> {
        self.backend.finish(token_name, id, attempt, result, now)
    }
    pub fn cancel(&self, id: &str, now: UnixMillis) -> Result<(TaskView, Cancel), StoreError> {
        self.backend.cancel(id, now)
    }
    pub fn reap(&self, now: UnixMillis) -> Result<Reaped, StoreError> {
        self.backend.reap(now)
    }
    pub fn shift_leases(&self, by_ms: i64, set_before: UnixMillis) -> Result<usize, StoreError> {
        self.backend.shift_leases(by_ms, set_before)
    }
    pub fn extend_leases(&self, now: UnixMillis) -> Result<usize, StoreError> {
        self.backend.extend_leases(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls_pick_the_backend_and_unknown_schemes_are_refused() {
        assert_eq!(
            Database::parse("postgres://u@h:5432/db"),
            Ok(Database::Postgres("postgres://u@h:5432/db".into()))
        );
        assert!(matches!(
            Database::parse("postgresql://u@h/db"),
            Ok(Database::Postgres(_))
        ));
        assert_eq!(
            Database::parse("sqlite:/var/lib/m.db"),
            Ok(Database::Sqlite("/var/lib/m.db".into()))
        );
        assert_eq!(
            Database::parse("./m.db"),
            Ok(Database::Sqlite("./m.db".into()))
        );
        let e = Database::parse("mysql://u@h/db").expect_err("mysql");
        assert!(
            e.contains("not supported") && e.contains("postgres://"),
            "{e}"
        );
        assert!(Database::parse(" ").is_err());
    }
}
