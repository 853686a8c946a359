//! The store on PostgreSQL, so that several manager nodes serve one fleet.
//!
//! Same calls and the same rules (`store::rules`) as the SQLite store; what changes is who
//! else may touch a row meanwhile. Every change of a task locks its row first
//! (`FOR UPDATE`), a lease takes the rows the life cycle lets it lease (its states, asked
//! of `rules` ahead, are the statement's parameters) with `FOR UPDATE SKIP LOCKED` and
//! matches selectors in SQL (`selectors <@ tags`), in one statement, and the reaper
//! skips rows another node is working on, so two nodes never lease one task twice nor
//! re-queue one lapsed lease twice. Nothing about the queue lives in a node's memory: a
//! node learns what the others did through `NOTIFY` on one channel ([`notify`]), which
//! one `LISTEN` connection per node feeds into its hub ([`PgStore::listen`]). Migrations
//! are versioned in `schema_version` and applied under an advisory lock, so two nodes
//! starting at once migrate once.
//!
//! The calls are synchronous (the `postgres` crate) because the API runs every store call
//! on the blocking pool anyway; a small pool of connections ([`pool`]) lets those threads
//! work at once. TLS and URL parsing are in [`tls`], the schema in [`schema`], the per-row
//! steps in [`rows`].

mod notify;
mod pool;
mod rows;
mod schema;
mod tls;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use delegate_protocol::{
    AcquireResponse, Assignment, DelegateView, ForgottenDelegate, HeartbeatRequest,
    HeartbeatResponse, Outcome, RegisterRequest, SubmitTask, TaskResult, TaskState, TaskView,
    TokenView, UnixMillis,
};
use tracing::warn;

pub use notify::{CHANNEL, Note};
use pool::{Conn, Pool, Tx};
use rows::*;
use schema::migrate;
pub use tls::redact;
use tls::{parse_config, plain_text_warning};

use super::rules::{
    self, Lease, LogAppend, Report, Write, cancel_change, decide_report, is_draining,
    page_from_chunk, refuse_tags, stale, the_one_delegate, to_json,
};
use super::{
    Backend, Cancel, DEFAULT_MAX_LOG_BYTES, Finish, LogSlice, Pruned, Reaped, new_delegate_id,
};
use crate::error::StoreError;
use crate::lifecycle::{self, Event, Task};
use crate::metrics::{Metrics, Snapshot};
use crate::queue::{Fresh, Selectors, selector_key};

/// Most finished tasks one retention pass deletes.
const PRUNE_BATCH: i64 = 200;

const ADMIN_HASH_KEY: &str = "admin_token_sha256";

/// Whose clock the store's times come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PgClock {
    /// The database's (`clock_timestamp()`): every node stamps leases, heartbeats and
    /// reaps with one clock, so a node whose clock runs ahead cannot reap the others'
    /// leases, nor one that runs behind grant leases that have lapsed already.
    #[default]
    Database,
    /// CAUTION: the time each call is given, as the SQLite store does. For tests that move
    /// time by hand; nodes whose clocks differ then disagree about which leases lapsed.
    Caller,
}

/// How [`PgStore::open_with`] connects, beyond the URL.
#[derive(Clone, Default)]
pub struct PgOptions {
    /// The password, when it is kept out of the URL (`--database-password-file`).
    pub password: Option<String>,
    pub clock: PgClock,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgOptions")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("clock", &self.clock)
            .finish()
    }
}

/// How long the database's time is reckoned from one reading plus this process's
/// monotonic clock before it is read again: drift between the two clocks stays in the
/// milliseconds, and no store call pays a round trip for the time.
const CLOCK_READING_MAX_AGE: Duration = Duration::from_secs(30);

/// The database's clock, as read last: (monotonic instant of the reading, database ms).
#[derive(Default)]
struct DbClock {
    reading: Mutex<Option<(std::time::Instant, i64)>>,
}

impl DbClock {
    /// The database's time now, read again over `conn` when the last reading is old.
    fn now(&self, conn: &mut Conn) -> Result<i64, StoreError> {
        if let Some((at, ms)) = *lock(&self.reading)
            && at.elapsed() < CLOCK_READING_MAX_AGE
        {
            return Ok(ms + at.elapsed().as_millis() as i64);
        }
        let sent = std::time::Instant::now();
        let ms: i64 = conn
            .auto()?
            .query(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
                &[],
            )?
            .first()
            .map(|r| r.try_get(0))
            .transpose()?
            .ok_or_else(|| StoreError::Invalid("the database did not tell its time".into()))?;
        // The reading was taken about halfway through the round trip.
        let at = sent + sent.elapsed() / 2;
        *lock(&self.reading) = Some((at, ms));
        Ok(ms + at.elapsed().as_millis() as i64)
    }
}

/// The store on a PostgreSQL database shared by several manager nodes.
pub struct PgStore {
    pool: Pool,
    lease_ttl_ms: i64,
    max_log_bytes: u64,
    metrics: Metrics,
    /// Token hash → name and delegate id → tags, as on SQLite; the other nodes' revokes
    /// and re-registers reach these through [`Note`]s.
    tokens: Mutex<HashMap<String, String>>,
    tags: Mutex<HashMap<String, Selectors>>,
    /// Delegate id → draining or not, as read by its last look that leased nothing and
    /// not asked for since: the long poll asks [`Backend::delegate_draining`] right after
    /// such a look, which answers from here instead of another round trip.
    drain_seen: Mutex<HashMap<String, bool>>,
    clock: PgClock,
    db_clock: DbClock,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PgStore {
    /// Connect to `url`, apply the migrations this node knows (once, under an advisory
    /// lock), and refuse a schema newer than it understands.
    pub fn open(url: &str, lease_ttl: Duration) -> Result<PgStore, StoreError> {
        PgStore::open_with(url, lease_ttl, PgOptions::default())
    }

    /// [`PgStore::open`] with a password kept out of the URL, or another clock.
    pub fn open_with(
        url: &str,
        lease_ttl: Duration,
        options: PgOptions,
    ) -> Result<PgStore, StoreError> {
        let (mut config, tls) = parse_config(url)?;
        if let Some(password) = &options.password {
            if config.get_password().is_some() {
                return Err(StoreError::PostgresUrl {
                    url: redact(url),
                    why: "it holds a password and a password file is given too; keep it \
                          in one place (the file)"
                        .to_string(),
                });
            }
            config.password(password.as_bytes());
        }
        if let Some(w) = plain_text_warning(&config, &tls) {
            warn!("{w}");
        }
        let pool = Pool::new(config, tls, redact(url));
        {
            let mut conn = pool.get()?;
            migrate(&mut conn.client, &pool.url)?;
        }
        Ok(PgStore {
            pool,
            lease_ttl_ms: lease_ttl.as_millis() as i64,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            metrics: Metrics::new(),
            tokens: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            drain_seen: Mutex::new(HashMap::new()),
            clock: options.clock,
            db_clock: DbClock::default(),
        })
    }

    /// The time a call stamps and compares with: the database's (see [`PgClock`]).
    fn now(&self, conn: &mut Conn, given: UnixMillis) -> Result<UnixMillis, StoreError> {
        match self.clock {
            PgClock::Database => self.db_clock.now(conn),
            PgClock::Caller => Ok(given),
        }
    }

    pub fn with_max_log_bytes(mut self, bytes: u64) -> PgStore {
        self.max_log_bytes = bytes;
        self
    }

    /// The database URL without its password.
    pub fn url(&self) -> &str {
        &self.pool.url
    }

    /// Listen for every node's [`Note`]s on a connection of its own, on a thread of its
    /// own, and hand each to `on_note`; after a lost connection it reconnects (backing
    /// off) and reports `Note::Revoked`, which makes every poll look again — a note sent
    /// while it was away is not lost work, only a late wake-up. Returns once listening,
    /// or the error of the first connection.
    pub fn listen(
        &self,
        on_note: impl Fn(&Note) + Send + 'static,
    ) -> Result<std::thread::JoinHandle<()>, StoreError> {
        notify::listen(
            self.pool.config.clone(),
            self.pool.tls.clone(),
            self.pool.url.clone(),
            on_note,
        )
    }

    /// Forget what a [`Note`] says is stale.
    pub fn note_seen(&self, note: &Note) {
        match note {
            Note::Delegate { id } => {
                lock(&self.tags).remove(id);
                lock(&self.drain_seen).remove(id);
            }
            Note::Revoked => {
                lock(&self.tokens).clear();
                lock(&self.drain_seen).clear();
            }
            Note::Queued { .. } | Note::Changed => {}
        }
    }
}

impl Backend for PgStore {
    fn as_postgres(&self) -> Option<&PgStore> {
        Some(self)
    }

    fn set_max_log_bytes(&mut self, bytes: u64) {
        self.max_log_bytes = bytes;
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn snapshot(&self, now: UnixMillis) -> Result<Snapshot, StoreError> {
        self.metrics.snapshot_computed();
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.auto()?;
        let mut snap = Snapshot::default();
        let cutoff = now - self.lease_ttl_ms;
        for r in tx.query(
            "SELECT CASE WHEN last_seen < $1 THEN 'disconnected' ELSE state END, version, \
             COUNT(*) FROM delegates GROUP BY 1, 2",
            &[&cutoff],
        )? {
            snap.delegates
                .insert((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?);
        }
        for r in tx.query(
            "SELECT state, kind, COUNT(*) FROM tasks GROUP BY state, kind",
            &[],
        )? {
            let (state, kind, n): (String, String, i64) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if state == "queued" {
                snap.queue_depth += n;
            }
            snap.tasks.insert((state, kind), n);
        }
        snap.log_bytes = tx
            .query("SELECT COALESCE(SUM(log_bytes), 0)::BIGINT FROM tasks", &[])?
            .first()
            .map(|r| r.try_get(0))
            .transpose()?
            .unwrap_or(0);
        tx.commit()?;
        Ok(snap)
    }

    /// Nothing: on PostgreSQL every queued task reaches the hubs of all nodes (this one
    /// included) as a [`Note::Queued`].
    fn take_fresh(&self) -> Vec<Fresh> {
        Vec::new()
    }

    fn cached_delegate_tags(&self, id: &str) -> Option<Selectors> {
        lock(&self.tags).get(id).cloned()
    }

    fn delegate_tags(&self, id: &str) -> Result<Option<Selectors>, StoreError> {
        if let Some(t) = lock(&self.tags).get(id) {
            return Ok(Some(t.clone()));
        }
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let tags: Option<Vec<String>> = tx
            .opt("SELECT tags FROM delegates WHERE id = $1", &[&id])?
            .map(|r| r.try_get(0))
            .transpose()?;
        tx.commit()?;
        Ok(tags.map(|t| {
            let key = selector_key(&t);
            lock(&self.tags).insert(id.to_string(), key.clone());
            key
        }))
    }

    fn lease_ttl_ms(&self) -> i64 {
        self.lease_ttl_ms
    }

    fn admin_hash(&self) -> Result<Option<String>, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let v = tx
            .opt("SELECT value FROM meta WHERE key = $1", &[&ADMIN_HASH_KEY])?
            .map(|r| r.try_get(0))
            .transpose()?;
        tx.commit()?;
        Ok(v)
    }

    fn set_admin_hash(&self, hash: &str) -> Result<(), StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.tx()?;
        tx.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&ADMIN_HASH_KEY, &hash],
        )?;
        tx.commit()
    }

    /// Store `hash` as the admin token's unless one is stored already; the hash stored
    /// afterwards. Two nodes starting at once both try, and both learn the one winner.
    fn claim_admin_hash(&self, hash: &str) -> Result<String, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.tx()?;
        tx.exec(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
            &[&ADMIN_HASH_KEY, &hash],
        )?;
        let v: String = tx
            .opt("SELECT value FROM meta WHERE key = $1", &[&ADMIN_HASH_KEY])?
            .map(|r| r.try_get(0))
            .transpose()?
            .ok_or_else(|| StoreError::Invalid("the admin token's hash vanished".into()))?;
        tx.commit()?;
        Ok(v)
    }

    fn create_token(
        &self,
        name: &str,
        hash: &str,
        tags: Option<&[String]>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        rules::check_token(name, tags)?;
        let tags = tags.map(to_json);
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        let inserted = tx.exec(
            "INSERT INTO tokens (name, hash, created_at, tags) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
            &[&name, &hash, &now, &tags],
        )?;
        if inserted == 0 {
            return Err(StoreError::TokenExists(name.to_string()));
        }
        tx.commit()
    }

    fn list_tokens(&self) -> Result<Vec<TokenView>, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let rows = tx.query(
            "SELECT name, created_at, revoked_at IS NOT NULL, tags FROM tokens \
             ORDER BY created_at, name",
            &[],
        )?;
        tx.commit()?;
        rows.iter()
            .map(|r| {
                let tags: Option<String> = r.try_get(3)?;
                Ok(TokenView {
                    name: r.try_get(0)?,
                    created_at: r.try_get(1)?,
                    revoked: r.try_get(2)?,
                    tags: tags.map(|t| json_of("token tags", &t)).transpose()?,
                })
            })
            .collect()
    }

    fn revoke_token(&self, name: &str, now: UnixMillis) -> Result<TokenView, StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        let row = tx
            .opt(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $2) WHERE name = $1 \
                 RETURNING name, created_at, tags",
                &[&name, &now],
            )?
            .ok_or_else(|| StoreError::TokenNotFound(name.to_string()))?;
        let tags: Option<String> = row.try_get(2)?;
        let view = TokenView {
            name: row.try_get(0)?,
            created_at: row.try_get(1)?,
            revoked: true,
            tags: tags.map(|t| json_of("token tags", &t)).transpose()?,
        };
        let held: Vec<(String, String)> = tx
            .query(
                "SELECT id, name FROM delegates WHERE token_name = $1 ORDER BY id",
                &[&name],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, StoreError>>()?;
        for (id, dname) in &held {
            forget(
                &mut tx,
                id,
                &format!("its token {name:?} was revoked"),
                dname,
                now,
            )?;
        }
        tx.notify(&Note::Revoked)?;
        tx.commit()?;
        lock(&self.tokens).retain(|_, n| n != name);
        let mut tags = lock(&self.tags);
        for (id, _) in &held {
            tags.remove(id);
        }
        drop(tags);
        lock(&self.drain_seen).clear();
        Ok(view)
    }

    fn forget_delegate(
        &self,
        name: &str,
        hostname: Option<&str>,
        now: UnixMillis,
    ) -> Result<ForgottenDelegate, StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        let found: Vec<(String, String, String)> = tx
            .query(
                "SELECT id, hostname, token_name FROM delegates WHERE name = $1 \
                 AND ($2::TEXT IS NULL OR hostname = $2) ORDER BY hostname",
                &[&name, &hostname],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, StoreError>>()?;
        let (id, host, token_name) = the_one_delegate(name, hostname, found)?;
        let released = forget(&mut tx, &id, "an admin forgot it", name, now)?;
        tx.notify(&Note::Delegate { id: id.clone() })?;
        tx.commit()?;
        lock(&self.tags).remove(&id);
        lock(&self.drain_seen).remove(&id);
        Ok(ForgottenDelegate {
            id,
            name: name.to_string(),
            hostname: host,
            token_name,
            released_tasks: released,
        })
    }

    fn token_name(&self, hash: &str) -> Result<Option<String>, StoreError> {
        if let Some(name) = lock(&self.tokens).get(hash) {
            return Ok(Some(name.clone()));
        }
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let name: Option<String> = tx
            .opt(
                "SELECT name FROM tokens WHERE hash = $1 AND revoked_at IS NULL",
                &[&hash],
            )?
            .map(|r| r.try_get(0))
            .transpose()?;
        tx.commit()?;
        if let Some(name) = &name {
            lock(&self.tokens).insert(hash.to_string(), name.clone());
        }
        Ok(name)
    }

    fn cached_token_name(&self, hash: &str) -> Option<String> {
        lock(&self.tokens).get(hash).cloned()
    }

    fn register(
        &self,
        token_name: &str,
        req: &RegisterRequest,
        now: UnixMillis,
    ) -> Result<String, StoreError> {
        rules::check_register(req)?;
        let targets = to_json(&req.targets);
        let capacity = i64::from(req.capacity);
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        refuse_tags(token_name, &req.tags, live_token_tags(&mut tx, token_name)?)?;
        // Two nodes registering the same name at once: the unique key serialises them,
        // and the loser sees the winner's row.
        let new_id = new_delegate_id();
        tx.exec(
            "INSERT INTO delegates (id, name, hostname, token_name, version, tags, targets, \
             capacity, state, registered_at, last_seen, upgrade_group) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'starting', $9, $9, $10) \
             ON CONFLICT (name, hostname) DO NOTHING",
            &[
                &new_id,
                &req.name,
                &req.hostname,
                &token_name,
                &req.version,
                &req.tags,
                &targets,
                &capacity,
                &now,
                &req.upgrade_group,
            ],
        )?;
        let row = tx
            .opt(
                "SELECT id, token_name FROM delegates WHERE name = $1 AND hostname = $2 \
                 FOR UPDATE",
                &[&req.name, &req.hostname],
            )?
            .ok_or_else(|| StoreError::Invalid("register: the delegate row vanished".into()))?;
        let (id, owner): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        if owner != token_name {
            return Err(StoreError::NameTaken {
                name: req.name.clone(),
                hostname: req.hostname.clone(),
                owner,
            });
        }
        if id != new_id {
            tx.exec(
                "UPDATE delegates SET version = $2, tags = $3, targets = $4, capacity = $5, \
                 state = 'starting', last_seen = $6, upgrade_group = $7 WHERE id = $1",
                &[
                    &id,
                    &req.version,
                    &req.tags,
                    &targets,
                    &capacity,
                    &now,
                    &req.upgrade_group,
                ],
            )?;
            tx.notify(&Note::Delegate { id: id.clone() })?;
        }
        tx.commit()?;
        lock(&self.tags).insert(id.clone(), selector_key(&req.tags));
        lock(&self.drain_seen).remove(&id);
        Ok(id)
    }

    /// Record a heartbeat: renew the leases of the listed tasks this delegate holds, and
    /// say which to cancel and which it no longer holds. One statement (its own
    /// transaction): a heartbeat a second per delegate is the fleet's steady load.
    fn heartbeat(
        &self,
        token_name: &str,
        delegate_id: &str,
        req: &HeartbeatRequest,
        now: UnixMillis,
    ) -> Result<HeartbeatResponse, StoreError> {
        const SQL: &str = "WITH prev AS ( \
                SELECT d.state FROM delegates d JOIN tokens k ON k.name = d.token_name \
                WHERE d.id = $1 AND d.token_name = $2 AND k.revoked_at IS NULL), \
            me AS ( \
                UPDATE delegates SET state = $3, last_seen = $4 \
                WHERE id = $1 AND EXISTS (SELECT 1 FROM prev) RETURNING id), \
            renewed AS ( \
                UPDATE tasks t SET lease_expires = $5 \
                FROM unnest($6::TEXT[], $7::BIGINT[]) AS h(id, attempt) \
                WHERE EXISTS (SELECT 1 FROM me) AND t.id = h.id AND t.delegate_id = $1 \
                AND (h.attempt < 0 OR t.attempt = h.attempt) \
                AND t.state IN ('assigned', 'running') \
                RETURNING t.id, t.cancel_requested) \
            SELECT (SELECT state FROM prev), ARRAY(SELECT id FROM renewed), \
                ARRAY(SELECT id FROM renewed WHERE cancel_requested)";
        let state = req.state.as_str();
        // A newer agent names attempts: renew only the task's current attempt on this
        // delegate and revoke exactly the others (-1: any attempt, for older agents).
        let by_attempt = !req.in_flight_attempts.is_empty();
        let (ids, attempts): (Vec<String>, Vec<i64>) = if by_attempt {
            req.in_flight_attempts
                .iter()
                .map(|h| (h.id.clone(), i64::from(h.attempt)))
                .unzip()
        } else {
            req.in_flight.iter().map(|id| (id.clone(), -1)).unzip()
        };
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let lease = now + self.lease_ttl_ms;
        let mut tx = conn.auto()?;
        let row = tx
            .opt(
                SQL,
                &[
                    &delegate_id,
                    &token_name,
                    &state,
                    &now,
                    &lease,
                    &ids,
                    &attempts,
                ],
            )?
            .ok_or_else(|| StoreError::Invalid("heartbeat: no answer row".into()))?;
        let Some(before) = row.try_get::<_, Option<String>>(0)? else {
            // Not ours or the token was revoked: the exact refusal.
            own_delegate(&mut tx, delegate_id, token_name)?;
            return Err(StoreError::DelegateNotFound(delegate_id.to_string()));
        };
        if is_draining(state) != is_draining(&before) {
            lock(&self.drain_seen).remove(delegate_id);
        }
        if is_draining(state) && !is_draining(&before) {
            // Its long poll may wait on another node: end it there too.
            tx.notify(&Note::Delegate {
                id: delegate_id.to_string(),
            })?;
        }
        let renewed: Vec<String> = row.try_get(1)?;
        let cancel: Vec<String> = row.try_get(2)?;
        let mut resp = HeartbeatResponse::default();
        if by_attempt {
            for held in &req.in_flight_attempts {
                // Renewed rows are the current attempt; another attempt of the same id is
                // revoked.
                let twice = req
                    .in_flight_attempts
                    .iter()
                    .filter(|h| h.id == held.id)
                    .count()
                    > 1;
                let current = renewed.contains(&held.id)
                    && (!twice || current_attempt(&mut tx, &held.id)? == Some(held.attempt));
                if current {
                    if cancel.contains(&held.id) && !resp.cancel.contains(&held.id) {
                        resp.cancel.push(held.id.clone());
                    }
                } else {
                    resp.revoked_attempts.push(held.clone());
                }
            }
        } else {
            for task in &req.in_flight {
                if renewed.contains(task) {
                    if cancel.contains(task) {
                        resp.cancel.push(task.clone());
                    }
                } else {
                    resp.revoked.push(task.clone());
                }
            }
        }
        Ok(resp)
    }

    /// Lease up to `max` tasks this delegate's tags satisfy, oldest first (`prefer` first
    /// of all), skipping rows another node is leasing right now, and collect cancellations
    /// not yet delivered. One statement, its own transaction (`LEASE`): who asks (token
    /// live, delegate its own, `last_seen`, draining or not), its cancellations and the
    /// lease. The life cycle decides the lease as on SQLite, but ahead of the statement:
    /// the states it leases from and the one it leaves (`lease_states`, from
    /// `rules::leasable_states` and `Change::Assign`) are the statement's parameters, so no
    /// row is read back to ask it. A long poll looks once per wake-up and most looks find
    /// nothing (during a burst both nodes wake a poll for every task, and a delegate looks
    /// again after each task), so a look costs one round trip, not `BEGIN`, two or three
    /// statements and `COMMIT`: on a machine whose cores PostgreSQL shares with the
    /// managers, the round trips are what a burst is made of (see docs/benchmarks.md).
    fn acquire(
        &self,
        token_name: &str,
        delegate_id: &str,
        max: u32,
        now: UnixMillis,
        prefer: Option<&str>,
    ) -> Result<AcquireResponse, StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let lease = Lease {
            delegate_id,
            expires: now + self.lease_ttl_ms,
        };
        let prefer = prefer.unwrap_or("");
        let want = i64::from(max);
        let draining_states = rules::draining_states();
        let (leasable, leased) = lease_states();
        let mut tx = conn.auto()?;
        let rows = tx.query(
            LEASE,
            &[
                &lease.delegate_id,
                &token_name,
                &now,
                &prefer,
                &want,
                &lease.expires,
                &draining_states,
                &leasable,
                &leased,
            ],
        )?;
        let Some(first) = rows.first() else {
            own_delegate(&mut tx, delegate_id, token_name)?;
            return Err(StoreError::DelegateNotFound(delegate_id.to_string()));
        };
        let draining = is_draining(first.try_get(0)?);
        let mut resp = AcquireResponse {
            cancel: first.try_get(1)?,
            ..Default::default()
        };
        // The handed task first, then oldest first (the statement orders them).
        for r in &rows {
            let Some(task_id) = r.try_get::<_, Option<String>>(2)? else {
                continue;
            };
            let created: i64 = r.try_get(7)?;
            let kind: String = r.try_get(3)?;
            self.metrics
                .picked_up(&kind, (now - created).max(0) as f64 / 1000.0);
            resp.tasks.push(Assignment {
                task_id,
                kind,
                spec: json_of("task spec", r.try_get(4)?)?,
                attempt: u32_of(r.try_get(5)?),
                timeout_secs: u64_of(r.try_get(6)?),
            });
        }
        if max > 0 && resp.tasks.is_empty() {
            lock(&self.drain_seen).insert(delegate_id.to_string(), draining);
        }
        Ok(resp)
    }

    /// Whether the delegate is draining. Right after a look that leased nothing (the long
    /// poll's question) the answer is the state that look read, once; else the database's.
    fn delegate_draining(&self, delegate_id: &str) -> Result<bool, StoreError> {
        if let Some(draining) = lock(&self.drain_seen).remove(delegate_id) {
            return Ok(draining);
        }
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let state: Option<String> = tx
            .opt("SELECT state FROM delegates WHERE id = $1", &[&delegate_id])?
            .map(|r| r.try_get(0))
            .transpose()?;
        tx.commit()?;
        Ok(state.as_deref().is_some_and(is_draining))
    }

    fn list_delegates(&self, now: UnixMillis) -> Result<Vec<DelegateView>, StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.auto()?;
        let rows = tx.query(
            "SELECT d.id, d.name, d.hostname, d.version, d.tags, d.targets, d.capacity, \
             d.state, d.last_seen, (SELECT COUNT(*) FROM tasks t WHERE t.delegate_id = d.id \
             AND t.state IN ('assigned', 'running')), d.upgrade_group \
             FROM delegates d ORDER BY d.name, d.hostname",
            &[],
        )?;
        tx.commit()?;
        let ttl = self.lease_ttl_ms;
        rows.iter()
            .map(|r| {
                let last: i64 = r.try_get(8)?;
                let in_flight: i64 = r.try_get(9)?;
                Ok(DelegateView {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    hostname: r.try_get(2)?,
                    version: r.try_get(3)?,
                    tags: r.try_get(4)?,
                    targets: json_of("delegate targets", r.try_get(5)?)?,
                    capacity: u32_of(r.try_get(6)?),
                    state: delegate_state_of(r.try_get(7)?)?,
                    connected: now - last <= ttl,
                    last_heartbeat: Some(last),
                    in_flight: u32_of(in_flight),
                    upgrade_group: r.try_get(10)?,
                })
            })
            .collect()
    }

    fn submit(
        &self,
        id: &str,
        task: &SubmitTask,
        timeout_secs: u64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        // One statement: the row and the note to every node commit together.
        const SQL: &str = "WITH ins AS ( \
                INSERT INTO tasks (id, kind, spec, selectors, state, attempt, retries, \
                timeout_secs, created_at) VALUES ($1, $2, $3, $4, 'queued', 1, $5, $6, $7) \
                RETURNING id) \
            SELECT pg_notify('delegate_manager', $8) FROM ins";
        let spec = task.spec.spec_json().to_string();
        let retries = i64::from(task.retries);
        let timeout = timeout_secs as i64;
        let note = Note::Queued {
            task: id.to_string(),
            selectors: task.selectors.clone(),
        }
        .payload();
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.auto()?;
        tx.query(
            SQL,
            &[
                &id,
                &task.spec.kind(),
                &spec,
                &task.selectors,
                &retries,
                &timeout,
                &now,
                &note,
            ],
        )?;
        Ok(())
    }

    fn task(&self, id: &str) -> Result<TaskView, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let v = load_view(&mut tx, id)?;
        tx.commit()?;
        Ok(v)
    }

    fn list_tasks(
        &self,
        state: Option<TaskState>,
        limit: u32,
    ) -> Result<Vec<TaskView>, StoreError> {
        const BY_STATE: &str = "SELECT t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
             t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
             t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
             t.log_bytes, t.log_truncated FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id \
             WHERE t.state = $1 ORDER BY t.created_at DESC, t.seq DESC LIMIT $2";
        const ALL: &str = "SELECT t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
             t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
             t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
             t.log_bytes, t.log_truncated FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id \
             ORDER BY t.created_at DESC, t.seq DESC LIMIT $1";
        let limit = i64::from(limit);
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let rows = match state {
            Some(st) => tx.query(BY_STATE, &[&st.as_str(), &limit])?,
            None => tx.query(ALL, &[&limit])?,
        };
        tx.commit()?;
        rows.iter().map(task_view).collect()
    }

    fn started(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        now: UnixMillis,
    ) -> Result<TaskView, StoreError> {
        // The common case in one statement: the holder's token starts the current,
        // assigned attempt (`lifecycle`: assigned + Start → running). Anything else takes
        // the full path below, which reads the row under lock and answers exactly.
        const FAST: &str = "UPDATE tasks t SET state = 'running', started_at = $4 \
             FROM delegates d WHERE t.id = $1 AND t.attempt = $2 AND t.state = 'assigned' \
             AND d.id = t.delegate_id AND d.token_name = $3 \
             RETURNING t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
             t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
             t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
             t.log_bytes, t.log_truncated";
        let attempt_i = i64::from(attempt);
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        if let Some(r) = conn
            .auto()?
            .opt(FAST, &[&id, &attempt_i, &token_name, &now])?
        {
            return task_view(&r);
        }
        let mut tx = conn.tx()?;
        let held = load_held(&mut tx, id)?;
        held.check(id, attempt, token_name)?;
        let change =
            lifecycle::transition(held.task(), Event::Start).map_err(|e| stale(id, attempt, e))?;
        persist(&mut tx, id, change, Write::default(), now)?;
        let v = load_view(&mut tx, id)?;
        tx.commit()?;
        Ok(v)
    }

    /// As on SQLite: bytes already stored are skipped (a resend after a node died stores
    /// nothing twice), a chunk past the end is a gap, the cap cuts with a marker. The row
    /// lock makes two nodes receiving the same resend at once store it once.
    fn append_log(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.tx()?;
        let held = load_held(&mut tx, id)?;
        held.check(id, attempt, token_name)?;
        let (start, bytes, marker, log_bytes, end) =
            match rules::append_log(&held, id, attempt, offset, data, self.max_log_bytes)? {
                LogAppend::Answer(answer) => return Ok(answer),
                LogAppend::Write {
                    start,
                    bytes,
                    marker,
                    log_bytes,
                    end,
                } => (start, bytes, marker, log_bytes, end),
            };
        let attempt_i = i64::from(attempt);
        let insert = |tx: &mut Tx<'_>, start: u64, bytes: &[u8]| -> Result<(), StoreError> {
            let start = start as i64;
            tx.exec(
                "INSERT INTO log_chunks (task_id, attempt, start, data) VALUES ($1, $2, $3, $4)",
                &[&id, &attempt_i, &start, &bytes],
            )?;
            Ok(())
        };
        if !bytes.is_empty() {
            insert(&mut tx, start, bytes)?;
        }
        if let Some((at, line)) = &marker {
            insert(&mut tx, *at, line.as_bytes())?;
        }
        let (log_bytes, cut) = (log_bytes as i64, marker.is_some());
        tx.exec(
            "UPDATE tasks SET log_bytes = $2, log_truncated = $3 WHERE id = $1",
            &[&id, &log_bytes, &cut],
        )?;
        tx.notify(&Note::Changed)?;
        tx.commit()?;
        Ok(end)
    }

    fn prune(&self, before: UnixMillis) -> Result<Pruned, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.tx()?;
        let old: Vec<(String, i64)> = tx
            .query(
                "SELECT id, log_bytes FROM tasks WHERE finished_at IS NOT NULL \
                 AND finished_at < $1 ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&before, &PRUNE_BATCH],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, StoreError>>()?;
        let mut pruned = Pruned::default();
        for (id, bytes) in &old {
            tx.exec("DELETE FROM log_chunks WHERE task_id = $1", &[id])?;
            tx.exec("DELETE FROM tasks WHERE id = $1", &[id])?;
            pruned.tasks += 1;
            pruned.log_bytes += u64_of(*bytes);
        }
        tx.commit()?;
        Ok(pruned)
    }

    /// Up to `max` bytes of the current attempt's log from byte `offset`: only the chunks
    /// that overlap the page are read, so memory stays one page whatever the log's size.
    fn read_log(&self, id: &str, offset: u64, max: usize) -> Result<LogSlice, StoreError> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.auto()?;
        let row = tx
            .opt(
                "SELECT state, attempt, log_bytes FROM tasks WHERE id = $1",
                &[&id],
            )?
            .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))?;
        let state = state_of(row.try_get(0)?)?;
        let attempt_i: i64 = row.try_get(1)?;
        let stored = u64_of(row.try_get(2)?);
        let mut data = Vec::new();
        if offset < stored {
            let from = offset as i64;
            let to = from.saturating_add(i64::try_from(max).unwrap_or(i64::MAX));
            let rows = tx.query(
                "SELECT start, data FROM log_chunks WHERE task_id = $1 AND attempt = $2 \
                 AND start >= (SELECT COALESCE(MAX(start), 0) FROM log_chunks \
                 WHERE task_id = $1 AND attempt = $2 AND start <= $3) AND start < $4 \
                 ORDER BY start",
                &[&id, &attempt_i, &from, &to],
            )?;
            for r in &rows {
                let start = u64_of(r.try_get(0)?);
                let chunk: &[u8] = r.try_get(1)?;
                if page_from_chunk(&mut data, offset, max, start, chunk) {
                    break;
                }
            }
        }
        tx.commit()?;
        Ok(LogSlice {
            data,
            stored,
            attempt: u32_of(attempt_i),
            state,
        })
    }

    fn finish(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        result: &TaskResult,
        now: UnixMillis,
    ) -> Result<(TaskView, Finish), StoreError> {
        // The common case in one statement: the holder's token reports an outcome other
        // than `lost` for the current, held attempt, which ends it (`lifecycle`: any such
        // report of a held attempt is final). Anything else takes the full path.
        const FAST: &str = "WITH u AS ( \
             UPDATE tasks t SET state = $4, outcome = $4, exit_code = $5, signal = $6, \
             message = $7, finished_at = $8, lease_expires = NULL FROM delegates d \
             WHERE t.id = $1 AND t.attempt = $2 AND t.state IN ('assigned', 'running') \
             AND d.id = t.delegate_id AND d.token_name = $3 \
             RETURNING t.id, t.kind, t.spec, t.selectors, t.state, t.attempt, \
             t.retries, t.timeout_secs, t.cancel_requested, t.delegate_id, d.name, t.exit_code, \
             t.signal, t.message, t.created_at, t.assigned_at, t.started_at, t.finished_at, \
             t.log_bytes, t.log_truncated) \
             SELECT u.*, pg_notify('delegate_manager', $9) FROM u";
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        if result.outcome != Outcome::Lost {
            let attempt_i = i64::from(attempt);
            let state = result.outcome.state().as_str();
            let changed = Note::Changed.payload();
            if let Some(r) = conn.auto()?.opt(
                FAST,
                &[
                    &id,
                    &attempt_i,
                    &token_name,
                    &state,
                    &result.exit_code,
                    &result.signal,
                    &result.message,
                    &now,
                    &changed,
                ],
            )? {
                let view = task_view(&r)?;
                self.metrics.task_finished(&view);
                return Ok((view, Finish::Done));
            }
        }
        let mut tx = conn.tx()?;
        let held = load_held(&mut tx, id)?;
        held.check(id, attempt, token_name)?;
        let (change, message, effect) = match decide_report(&held, id, attempt, result)? {
            Report::Repeat => return Ok((load_view(&mut tx, id)?, Finish::Done)),
            Report::Apply {
                change,
                message,
                effect,
            } => (change, message, effect),
        };
        let result = (effect == Finish::Done).then_some(result);
        let write = Write {
            message: message.as_deref(),
            result,
            lease: None,
        };
        persist(&mut tx, id, change, write, now)?;
        let view = load_view(&mut tx, id)?;
        tx.notify(&Note::Changed)?;
        tx.commit()?;
        self.metrics.task_finished(&view);
        Ok((view, effect))
    }

    fn cancel(&self, id: &str, now: UnixMillis) -> Result<(TaskView, Cancel), StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        let held = load_held(&mut tx, id)?;
        let (change, effect) = cancel_change(&held, id)?;
        let write = Write::message("cancelled by user before a delegate took it");
        persist(&mut tx, id, change, write, now)?;
        let view = load_view(&mut tx, id)?;
        if let (Cancel::Requested, Some(holder)) = (effect, &view.delegate_id) {
            // The holder's long poll may wait on another node.
            tx.notify(&Note::Delegate { id: holder.clone() })?;
        }
        tx.notify(&Note::Changed)?;
        tx.commit()?;
        Ok((view, effect))
    }

    /// End or re-queue every held task whose lease expired before `now`. Rows another
    /// node's reaper (or a late heartbeat) holds are skipped, and a row re-queued by
    /// another node meanwhile no longer matches: one lapsed lease is handled once.
    fn reap(&self, now: UnixMillis) -> Result<Reaped, StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        let expired: Vec<(String, Task, Option<String>)> = tx
            .query(
                "SELECT t.id, t.state, t.attempt, t.retries, t.cancel_requested, d.name \
                 FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id \
                 WHERE t.state IN ('assigned', 'running') AND t.lease_expires < $1 \
                 FOR UPDATE OF t SKIP LOCKED",
                &[&now],
            )?
            .iter()
            .map(|r| {
                let (id, task) = held_task(r)?;
                Ok((id, task, r.try_get(5)?))
            })
            .collect::<Result<_, StoreError>>()?;
        let mut reaped = Reaped::default();
        for (id, task, name) in expired {
            let name = name.unwrap_or_else(|| "?".to_string());
            let cause = format!("lease lapsed on delegate {name}");
            holder_gone(&mut tx, &id, task, &cause, now, &mut reaped)?;
        }
        if reaped.any() {
            tx.notify(&Note::Changed)?;
        }
        tx.commit()?;
        self.metrics
            .leases_lapsed((reaped.requeued + reaped.lost + reaped.cancelled) as u64);
        Ok(reaped)
    }

    /// A step of this node's wall clock moves nothing when leases run on the database's
    /// clock, which did not step (and the leases are every node's, not this one's).
    fn shift_leases(&self, by_ms: i64, set_before: UnixMillis) -> Result<usize, StoreError> {
        if self.clock == PgClock::Database {
            return Ok(0);
        }
        let mut conn = self.pool.get()?;
        let mut tx = conn.tx()?;
        let n = tx.exec(
            "UPDATE tasks SET lease_expires = lease_expires + $1 \
             WHERE state IN ('assigned', 'running') AND lease_expires <= $2",
            &[&by_ms, &set_before],
        )?;
        tx.commit()?;
        Ok(n as usize)
    }

    /// On SQLite a start gives every held task a fresh lease (nobody could heartbeat
    /// while the one manager was down). With several nodes the others were up: only a
    /// lease that already lapsed is extended, and only when no node has reaped it yet —
    /// the same as a start after a whole-cluster outage.
    fn extend_leases(&self, now: UnixMillis) -> Result<usize, StoreError> {
        let mut conn = self.pool.get()?;
        let now = self.now(&mut conn, now)?;
        let mut tx = conn.tx()?;
        let lease = now + self.lease_ttl_ms;
        let n = tx.exec(
            "UPDATE tasks SET lease_expires = $1 WHERE state IN ('assigned', 'running') \
             AND lease_expires < $2",
            &[&lease, &now],
        )?;
        tx.commit()?;
        Ok(n as usize)
    }
}

/// A delegate's look ([`Backend::acquire`]) in one statement. Parameters: `$1` the
/// delegate, `$2` its token, `$3` now, `$4` the handed task (or `''`), `$5` how many it
/// asks for, `$6` the lease's deadline, `$7` the delegate states that take nothing new
/// (`rules::draining_states`), `$8` the task states a lease takes a task from and `$9`
/// the state it leaves it in ([`lease_states`]: the life cycle's, never spelled here).
///
/// `want` is how many to lease: none for a draining delegate. `p` is the handed task, `o`
/// the oldest others; `o` locks only as many rows as are still wanted, so no row is held
/// that will not be leased. The cancellations (`c`, held rows) and the lease (`l`,
/// leasable rows) never touch the same row. One row per leased task (the handed one
/// first, then oldest first), or one row with NULL task columns when none was leased; no
/// row at all when the delegate is not the token's or the token is revoked.
const LEASE: &str = "WITH me AS ( \
        UPDATE delegates d SET last_seen = $3 FROM tokens k \
        WHERE d.id = $1 AND d.token_name = $2 AND k.name = $2 \
        AND k.revoked_at IS NULL RETURNING d.tags, d.state), \
    c AS ( \
        UPDATE tasks SET cancel_delivered = true \
        WHERE EXISTS (SELECT 1 FROM me) AND delegate_id = $1 \
        AND state IN ('assigned', 'running') AND cancel_requested \
        AND NOT cancel_delivered RETURNING id), \
    want AS ( \
        SELECT tags, CASE WHEN state = ANY($7::TEXT[]) THEN 0 ELSE $5::BIGINT END AS n \
        FROM me), \
    p AS ( \
        SELECT id FROM tasks \
        WHERE id = $4 AND state = ANY($8::TEXT[]) AND selectors <@ (SELECT tags FROM want) \
        AND (SELECT n FROM want) > 0 \
        FOR UPDATE SKIP LOCKED), \
    o AS ( \
        SELECT id FROM tasks \
        WHERE state = ANY($8::TEXT[]) AND selectors <@ (SELECT tags FROM want) AND id <> $4 \
        ORDER BY created_at, seq \
        LIMIT GREATEST((SELECT n FROM want) - (SELECT COUNT(*) FROM p), 0) \
        FOR UPDATE SKIP LOCKED), \
    l AS ( \
        UPDATE tasks t SET state = $9::TEXT, delegate_id = $1, assigned_at = $3, \
        lease_expires = $6, cancel_delivered = false \
        FROM (SELECT id FROM p UNION ALL SELECT id FROM o) AS x WHERE t.id = x.id \
        RETURNING t.id, t.kind, t.spec, t.attempt, t.timeout_secs, t.created_at, t.seq) \
    SELECT me.state, ARRAY(SELECT id FROM c), \
        l.id, l.kind, l.spec, l.attempt, l.timeout_secs, l.created_at, l.seq \
    FROM me LEFT JOIN l ON true \
    ORDER BY l.id <> $4, l.created_at, l.seq";

/// The states [`LEASE`] takes a task from and leaves it in, as the database spells them:
/// what the life cycle answers `Event::Lease` with, through `rules`.
fn lease_states() -> (Vec<&'static str>, &'static str) {
    let leasable = rules::leasable_states()
        .into_iter()
        .map(TaskState::as_str)
        .collect();
    (leasable, rules::leased_state().as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Change;

    /// The lease statement leaves the lease to the life cycle: the states it leases from and
    /// the state it writes are its parameters, derived from `rules` (the table), and it
    /// spells no task state of its own outside the cancellations it collects.
    #[test]
    fn the_lease_statement_takes_its_states_from_the_life_cycle() {
        let (leasable, leased) = lease_states();
        let from_table: Vec<&str> = rules::leasable_states()
            .into_iter()
            .map(TaskState::as_str)
            .collect();
        assert_eq!(leasable, from_table);
        assert_eq!(leasable, ["queued"]);
        assert_eq!(
            Some(leased),
            Change::Assign.state_after().map(TaskState::as_str)
        );
        let (_, lease_part) = LEASE
            .split_once("want AS (")
            .expect("the statement has its want part");
        assert!(
            !lease_part.contains('\''),
            "no state literal in the lease: {lease_part}"
        );
        assert_eq!(lease_part.matches("state = ANY($8::TEXT[])").count(), 2);
        assert!(lease_part.contains("SET state = $9::TEXT"));
    }
}
