//! The store on one SQLite file: one manager node.
//!
//! Every change of a task's state happens here in one short transaction under one mutex,
//! so two delegates can never lease the same task and a crash never leaves half a change.
//! What a change *is* — which event a task's state allows and where it leads, a lease
//! included — is decided by `rules` (through `lifecycle::transition`); this file reads the
//! task, asks, and persists the answer. WAL mode with `synchronous=NORMAL` makes a commit
//! a write to the log without an fsync, which is what lets one manager move hundreds of
//! tasks a second; a power cut may lose the last commits but never corrupts the database.
//! The schema and its migrations are in [`schema`], the per-row steps in [`rows`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use delegate_protocol::{
    AcquireResponse, Assignment, DelegateView, ForgottenDelegate, HeartbeatRequest,
    HeartbeatResponse, RegisterRequest, SubmitTask, TaskResult, TaskState, TaskView, TokenView,
    UnixMillis, selectors_match,
};
use rusqlite::{Connection, OptionalExtension, params};

mod rows;
mod schema;

use super::rules::{
    self, LogAppend, Report, Write, cancel_change, decide_report, is_draining, page_from_chunk,
    refuse_tags, stale, the_one_delegate, to_json,
};
use super::{
    Backend, Cancel, DEFAULT_MAX_LOG_BYTES, Finish, LogSlice, Pruned, Reaped, new_delegate_id,
};
use crate::error::StoreError;
use crate::lifecycle::{self, Event, Task};
use crate::metrics::{Metrics, Snapshot};
use crate::queue::{Fresh, Queue, Selectors, selector_key};
use rows::*;
use schema::migrate;

/// Most finished tasks one retention pass deletes, so that it never holds the store long.
const PRUNE_BATCH: u32 = 200;

const ADMIN_HASH_KEY: &str = "admin_token_sha256";

/// The SQLite store. One connection behind a mutex: every call is a short synchronous
/// transaction, which is simpler and faster than a pool for a single-file database.
/// Beside it, in memory: the queued tasks by selector set (`queue`), so a lease does not
/// scan the queue, and two caches the hot paths read on every request — token hash →
/// name and delegate id → tags — each kept in step by the calls that change them.
/// Lock order: `conn`, then `queue`; the caches are taken alone. `/metrics`' full-table
/// counts read through a connection of their own (`reader`): in WAL mode a reader sees a
/// consistent snapshot without blocking the writer, so a scan of a million tasks never
/// holds `conn`, and a heartbeat never waits for one.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    reader: Mutex<Connection>,
    queue: Mutex<Queue>,
    tokens: Mutex<HashMap<String, String>>,
    tags: Mutex<HashMap<String, Selectors>>,
    lease_ttl_ms: i64,
    max_log_bytes: u64,
    metrics: Metrics,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps under these locks are changed by single inserts and removes; a panic
    // elsewhere while one was held leaves them usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SqliteStore {
    /// Open (creating if needed) and migrate the database at `path`.
    pub fn open(path: &Path, lease_ttl: Duration) -> Result<SqliteStore, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn, path)?;
        // Opened after the migrations, so it sees the schema; it only ever reads.
        let reader = Connection::open(path).map_err(open_err)?;
        reader
            .busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        reader
            .pragma_update(None, "query_only", true)
            .map_err(open_err)?;
        let mut queue = Queue::default();
        {
            let mut stmt = conn.prepare(
                "SELECT id, selectors, created_at, seq FROM tasks WHERE state = 'queued'",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                let selectors: Vec<String> = json_col(r, 1)?;
                queue.add(&id, &selectors, r.get(2)?, r.get(3)?);
            }
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
            queue: Mutex::new(queue),
            tokens: Mutex::new(HashMap::new()),
            tags: Mutex::new(HashMap::new()),
            lease_ttl_ms: lease_ttl.as_millis() as i64,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            metrics: Metrics::new(),
        })
    }

    /// Cap each attempt's stored log at `bytes` (default [`DEFAULT_MAX_LOG_BYTES`]).
    pub fn with_max_log_bytes(mut self, bytes: u64) -> SqliteStore {
        self.max_log_bytes = bytes;
        self
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        lock(&self.queue)
    }

    /// How many tasks are queued now.
    pub fn queue_depth(&self) -> usize {
        self.queue().len()
    }

    /// Forget cached facts about delegates that are gone or changed.
    fn uncache_delegates(&self, ids: &[String]) {
        let mut tags = lock(&self.tags);
        for id in ids {
            tags.remove(id);
        }
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held rolled back its transaction (rusqlite's
        // Transaction rolls back on drop), so the connection is consistent.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for SqliteStore {
    fn set_max_log_bytes(&mut self, bytes: u64) {
        self.max_log_bytes = bytes;
    }

    /// The figures the store records as things happen (pick-up, run time, lapsed leases).
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The counts `/metrics` reads from the database (through `ScrapeCache`), on the
    /// reader connection: the store's lock is not taken.
    fn snapshot(&self, now: UnixMillis) -> Result<Snapshot, StoreError> {
        self.metrics.snapshot_computed();
        let mut conn = lock(&self.reader);
        // One read transaction: the three counts agree with each other.
        let conn = conn.transaction()?;
        let mut snap = Snapshot::default();
        let mut stmt = conn.prepare_cached(
            "SELECT CASE WHEN last_seen < ?1 THEN 'disconnected' ELSE state END, version, \
             COUNT(*) FROM delegates GROUP BY 1, 2",
        )?;
        let mut rows = stmt.query([now - self.lease_ttl_ms])?;
        while let Some(r) = rows.next()? {
            snap.delegates.insert((r.get(0)?, r.get(1)?), r.get(2)?);
        }
        let mut stmt =
            conn.prepare_cached("SELECT state, kind, COUNT(*) FROM tasks GROUP BY state, kind")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            snap.tasks.insert((r.get(0)?, r.get(1)?), r.get(2)?);
        }
        snap.log_bytes = conn
            .prepare_cached("SELECT COALESCE(SUM(log_bytes), 0) FROM tasks")?
            .query_row([], |r| r.get(0))?;
        snap.queue_depth = self.queue().len() as i64;
        Ok(snap)
    }

    /// Tasks queued (or re-queued) since the last call: the API wakes one poll for each.
    fn take_fresh(&self) -> Vec<Fresh> {
        self.queue().take_fresh()
    }

    /// The tags of a delegate if they are in memory already.
    fn cached_delegate_tags(&self, id: &str) -> Option<Selectors> {
        lock(&self.tags).get(id).cloned()
    }

    /// The tags of a registered delegate (from memory; read once from the database).
    fn delegate_tags(&self, id: &str) -> Result<Option<Selectors>, StoreError> {
        if let Some(t) = lock(&self.tags).get(id) {
            return Ok(Some(t.clone()));
        }
        let tags: Option<Vec<String>> = self
            .conn()
            .prepare_cached("SELECT tags FROM delegates WHERE id = ?1")?
            .query_row([id], |r| json_col(r, 0))
            .optional()?;
        Ok(tags.map(|t| {
            let key = selector_key(&t);
            lock(&self.tags).insert(id.to_string(), key.clone());
            key
        }))
    }

    fn lease_ttl_ms(&self) -> i64 {
        self.lease_ttl_ms
    }

    // ---- admin token ------------------------------------------------------------------

    fn admin_hash(&self) -> Result<Option<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
        Ok(stmt.query_row([ADMIN_HASH_KEY], |r| r.get(0)).optional()?)
    }

    fn set_admin_hash(&self, hash: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [ADMIN_HASH_KEY, hash],
        )?;
        Ok(())
    }

    /// Store `hash` as the admin token's unless one is stored already; the hash stored
    /// afterwards.
    fn claim_admin_hash(&self, hash: &str) -> Result<String, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            [ADMIN_HASH_KEY, hash],
        )?;
        Ok(conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row([ADMIN_HASH_KEY], |r| r.get(0))?)
    }

    // ---- delegate tokens --------------------------------------------------------------

    /// Create a delegate token. `tags` is the set its delegates may register with
    /// (`None`: any).
    fn create_token(
        &self,
        name: &str,
        hash: &str,
        tags: Option<&[String]>,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        rules::check_token(name, tags)?;
        let conn = self.conn();
        let inserted = conn.execute(
            "INSERT INTO tokens (name, hash, created_at, tags) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT DO NOTHING",
            params![name, hash, now, tags.map(to_json)],
        )?;
        if inserted == 0 {
            return Err(StoreError::TokenExists(name.to_string()));
        }
        Ok(())
    }

    fn list_tokens(&self) -> Result<Vec<TokenView>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT name, created_at, revoked_at IS NOT NULL, tags FROM tokens \
             ORDER BY created_at, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenView {
                name: r.get(0)?,
                created_at: r.get(1)?,
                revoked: r.get(2)?,
                tags: opt_json_col(r, 3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revoke a token; delegates using it get 401 from then on, and the delegate names it
    /// held are freed (their tasks released as if their leases had lapsed), so that
    /// another token may register them. Revoking twice is fine.
    fn revoke_token(&self, name: &str, now: UnixMillis) -> Result<TokenView, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let view = tx
            .prepare_cached(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?2) WHERE name = ?1 \
                 RETURNING name, created_at, tags",
            )?
            .query_row(params![name, now], |r| {
                Ok(TokenView {
                    name: r.get(0)?,
                    created_at: r.get(1)?,
                    revoked: true,
                    tags: opt_json_col(r, 2)?,
                })
            })
            .optional()?
            .ok_or_else(|| StoreError::TokenNotFound(name.to_string()))?;
        let held: Vec<(String, String)> = tx
            .prepare_cached("SELECT id, name FROM delegates WHERE token_name = ?1")?
            .query_map([name], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut q = self.queue();
        for (id, dname) in &held {
            forget(
                &tx,
                &mut q,
                id,
                &format!("its token {name:?} was revoked"),
                dname,
                now,
            )?;
        }
        tx.commit()?;
        drop(q);
        lock(&self.tokens).retain(|_, n| n != name);
        let ids: Vec<String> = held.into_iter().map(|(id, _)| id).collect();
        self.uncache_delegates(&ids);
        Ok(view)
    }

    /// Forget the delegate `name` (on `hostname`, needed when the name is registered on
    /// several hosts): its tasks are released as if its lease had lapsed and the name is
    /// free for any token to register.
    fn forget_delegate(
        &self,
        name: &str,
        hostname: Option<&str>,
        now: UnixMillis,
    ) -> Result<ForgottenDelegate, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let found: Vec<(String, String, String)> = tx
            .prepare_cached(
                "SELECT id, hostname, token_name FROM delegates WHERE name = ?1 \
                 AND (?2 IS NULL OR hostname = ?2) ORDER BY hostname",
            )?
            .query_map(params![name, hostname], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let (id, host, token_name) = the_one_delegate(name, hostname, found)?;
        let released = forget(&tx, &mut self.queue(), &id, "an admin forgot it", name, now)?;
        tx.commit()?;
        self.uncache_delegates(std::slice::from_ref(&id));
        Ok(ForgottenDelegate {
            id,
            name: name.to_string(),
            hostname: host,
            token_name,
            released_tasks: released,
        })
    }

    /// The name of the live (not revoked) token with this hash.
    /// Served from memory after the first request; a revoke empties the entry (and
    /// acquire and heartbeat check the token again inside their transactions).
    fn token_name(&self, hash: &str) -> Result<Option<String>, StoreError> {
        if let Some(name) = lock(&self.tokens).get(hash) {
            return Ok(Some(name.clone()));
        }
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT name FROM tokens WHERE hash = ?1 AND revoked_at IS NULL")?;
        let name: Option<String> = stmt.query_row([hash], |r| r.get(0)).optional()?;
        if let Some(name) = &name {
            // Inserted under the connection lock: a revoke (which holds it to commit)
            // cannot slip between the read and the insert.
            lock(&self.tokens).insert(hash.to_string(), name.clone());
        }
        Ok(name)
    }

    /// The token name of a presented token, if it is already known in memory.
    fn cached_token_name(&self, hash: &str) -> Option<String> {
        lock(&self.tokens).get(hash).cloned()
    }

    // ---- delegates --------------------------------------------------------------------

    /// Register a delegate, or update the one with the same name and hostname. The tasks a
    /// re-registering delegate holds stay with it: it adopts them after a restart.
    fn register(
        &self,
        token_name: &str,
        req: &RegisterRequest,
        now: UnixMillis,
    ) -> Result<String, StoreError> {
        rules::check_register(req)?;
        let tags = to_json(&req.tags);
        let targets = to_json(&req.targets);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        refuse_tags(token_name, &req.tags, live_token_tags(&tx, token_name)?)?;
        let existing: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT id, token_name FROM delegates WHERE name = ?1 AND hostname = ?2",
            )?
            .query_row([&req.name, &req.hostname], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        // A name belongs to the token that first registered it: another token must not
        // take over its id, its leased tasks and their secrets. Revoking the owner or
        // `delegates forget` frees it.
        let existing = match existing {
            Some((_, owner)) if owner != token_name => {
                return Err(StoreError::NameTaken {
                    name: req.name.clone(),
                    hostname: req.hostname.clone(),
                    owner,
                });
            }
            other => other.map(|(id, _)| id),
        };
        let id = match existing {
            Some(id) => {
                tx.prepare_cached(
                    "UPDATE delegates SET version = ?2, tags = ?3, \
                     targets = ?4, capacity = ?5, state = 'starting', last_seen = ?6, \
                     upgrade_group = ?7 WHERE id = ?1",
                )?
                .execute(params![
                    id,
                    req.version,
                    tags,
                    targets,
                    req.capacity,
                    now,
                    req.upgrade_group
                ])?;
                id
            }
            None => {
                let id = new_delegate_id();
                tx.prepare_cached(
                    "INSERT INTO delegates (id, name, hostname, token_name, version, tags, \
                     targets, capacity, state, registered_at, last_seen, upgrade_group) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'starting', ?9, ?9, ?10)",
                )?
                .execute(params![
                    id,
                    req.name,
                    req.hostname,
                    token_name,
                    req.version,
                    tags,
                    targets,
                    req.capacity,
                    now,
                    req.upgrade_group
                ])?;
                id
            }
        };
        tx.commit()?;
        lock(&self.tags).insert(id.clone(), selector_key(&req.tags));
        Ok(id)
    }

    /// Record a heartbeat: renew the leases of the listed tasks this delegate holds, and
    /// tell it which of them to cancel and which it no longer holds.
    fn heartbeat(
        &self,
        token_name: &str,
        delegate_id: &str,
        req: &HeartbeatRequest,
        now: UnixMillis,
    ) -> Result<HeartbeatResponse, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        own_delegate(&tx, delegate_id, token_name)?;
        tx.prepare_cached("UPDATE delegates SET state = ?2, last_seen = ?3 WHERE id = ?1")?
            .execute(params![delegate_id, req.state.as_str(), now])?;
        let mut resp = HeartbeatResponse::default();
        let lease = now + self.lease_ttl_ms;
        if !req.in_flight_attempts.is_empty() {
            // A newer agent names attempts: renew only the task's current attempt on this
            // delegate and revoke exactly the others, so that a second attempt of a task
            // leased to the same agent keeps running while the first is stopped.
            for held_attempt in &req.in_flight_attempts {
                let held: Option<(Option<String>, String, u32, bool)> = tx
                    .prepare_cached(
                        "SELECT delegate_id, state, attempt, cancel_requested FROM tasks \
                         WHERE id = ?1",
                    )?
                    .query_row([&held_attempt.id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .optional()?;
                match held {
                    Some((Some(d), state, attempt, cancel))
                        if d == delegate_id
                            && attempt == held_attempt.attempt
                            && (state == "assigned" || state == "running") =>
                    {
                        tx.prepare_cached("UPDATE tasks SET lease_expires = ?2 WHERE id = ?1")?
                            .execute(params![held_attempt.id, lease])?;
                        if cancel && !resp.cancel.contains(&held_attempt.id) {
                            resp.cancel.push(held_attempt.id.clone());
                        }
                    }
                    _ => resp.revoked_attempts.push(held_attempt.clone()),
                }
            }
            tx.commit()?;
            return Ok(resp);
        }
        for task in &req.in_flight {
            let held: Option<(Option<String>, String, bool)> = tx
                .prepare_cached(
                    "SELECT delegate_id, state, cancel_requested FROM tasks WHERE id = ?1",
                )?
                .query_row([task], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            match held {
                Some((Some(d), state, cancel))
                    if d == delegate_id && (state == "assigned" || state == "running") =>
                {
                    tx.prepare_cached("UPDATE tasks SET lease_expires = ?2 WHERE id = ?1")?
                        .execute(params![task, lease])?;
                    if cancel {
                        resp.cancel.push(task.clone());
                    }
                }
                _ => resp.revoked.push(task.clone()),
            }
        }
        tx.commit()?;
        Ok(resp)
    }

    /// Lease up to `max` queued tasks whose selectors this delegate's tags satisfy, oldest
    /// first (`prefer`, a task handed to this poll by the hub, first of all), and collect
    /// cancellations not yet delivered. One transaction: a task is leased to one delegate
    /// only. The queue index names the candidates; each is checked against its row, so a
    /// stale entry leases nothing. A preferred task left queued is offered again.
    fn acquire(
        &self,
        token_name: &str,
        delegate_id: &str,
        max: u32,
        now: UnixMillis,
        prefer: Option<&str>,
    ) -> Result<AcquireResponse, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let me = own_delegate(&tx, delegate_id, token_name)?;
        let tags = me.tags;
        tx.prepare_cached("UPDATE delegates SET last_seen = ?2 WHERE id = ?1")?
            .execute(params![delegate_id, now])?;
        // A draining delegate takes nothing new, even from a poll it started before it
        // said so.
        let max = if me.draining { 0 } else { max as usize };

        let mut resp = AcquireResponse::default();
        {
            let mut stmt = tx.prepare_cached(
                "SELECT id FROM tasks WHERE delegate_id = ?1 AND state IN ('assigned', 'running') \
                 AND cancel_requested = 1 AND cancel_delivered = 0",
            )?;
            resp.cancel = stmt
                .query_map([delegate_id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
        }
        for id in &resp.cancel {
            tx.prepare_cached("UPDATE tasks SET cancel_delivered = 1 WHERE id = ?1")?
                .execute([id])?;
        }

        // Each candidate's row is read and the life cycle asked (`rules::lease`: only a
        // queued task is leased); its answer is what `persist` writes.
        let mut q = self.queue();
        let lease = now + self.lease_ttl_ms;
        let mut seen: Vec<String> = Vec::new();
        while resp.tasks.len() < max {
            let want = max - resp.tasks.len();
            let mut ids = Vec::with_capacity(want);
            if let Some(p) = prefer
                && !seen.iter().any(|s| s == p)
                && q.selectors(p)
                    .is_some_and(|sel| selectors_match(&sel, &tags))
            {
                ids.push(p.to_string());
            }
            ids.extend(q.oldest_for(&tags, want - ids.len(), &seen));
            if ids.is_empty() {
                break;
            }
            for id in ids {
                let row = tx
                    .prepare_cached(
                        "SELECT kind, spec, attempt, timeout_secs, state, retries, \
                         cancel_requested FROM tasks WHERE id = ?1",
                    )?
                    .query_row([&id], |r| {
                        let a = Assignment {
                            task_id: id.clone(),
                            kind: r.get(0)?,
                            spec: json_col(r, 1)?,
                            attempt: r.get(2)?,
                            timeout_secs: u64_col(r, 3)?,
                        };
                        let task = Task {
                            state: state_col(r, 4)?,
                            attempt: a.attempt,
                            retries: r.get(5)?,
                            cancel_requested: r.get(6)?,
                        };
                        Ok((a, task))
                    })
                    .optional()?;
                match row.map(|(a, task)| (a, rules::lease(task))) {
                    Some((a, Ok(change))) => {
                        persist(
                            &tx,
                            &mut q,
                            &id,
                            change,
                            Write::lease(delegate_id, lease),
                            now,
                        )?;
                        resp.tasks.push(a);
                        seen.push(id);
                    }
                    // Not queued in the database (a re-queue that rolled back, a task
                    // pruned meanwhile): a stale index entry, dropped.
                    Some((_, Err(_))) | None => q.remove(&id),
                }
            }
        }
        tx.commit()?;
        for a in &resp.tasks {
            if let Some(waited) = q.waited(&a.task_id) {
                self.metrics.picked_up(&a.kind, waited.as_secs_f64());
            }
            q.remove(&a.task_id);
        }
        if let Some(p) = prefer {
            q.refresh(p);
        }
        Ok(resp)
    }

    /// Has this delegate said it is draining (so a poll asking for tasks should end)?
    fn delegate_draining(&self, delegate_id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let state: Option<String> = conn
            .prepare_cached("SELECT state FROM delegates WHERE id = ?1")?
            .query_row([delegate_id], |r| r.get(0))
            .optional()?;
        Ok(state.as_deref().is_some_and(is_draining))
    }

    fn list_delegates(&self, now: UnixMillis) -> Result<Vec<DelegateView>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT d.id, d.name, d.hostname, d.version, d.tags, d.targets, d.capacity, \
             d.state, d.last_seen, (SELECT COUNT(*) FROM tasks t WHERE t.delegate_id = d.id \
             AND t.state IN ('assigned', 'running')), d.upgrade_group \
             FROM delegates d ORDER BY d.name, d.hostname",
        )?;
        let ttl = self.lease_ttl_ms;
        let rows = stmt.query_map([], |r| {
            let last: UnixMillis = r.get(8)?;
            Ok(DelegateView {
                id: r.get(0)?,
                name: r.get(1)?,
                hostname: r.get(2)?,
                version: r.get(3)?,
                tags: json_col(r, 4)?,
                targets: json_col(r, 5)?,
                capacity: r.get(6)?,
                state: delegate_state_col(r, 7)?,
                connected: now - last <= ttl,
                last_heartbeat: Some(last),
                in_flight: r.get(9)?,
                upgrade_group: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // ---- tasks ------------------------------------------------------------------------

    /// Queue a validated submission under `id`.
    fn submit(
        &self,
        id: &str,
        task: &SubmitTask,
        timeout_secs: u64,
        now: UnixMillis,
    ) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.prepare_cached(
            "INSERT INTO tasks (id, kind, spec, selectors, state, attempt, retries, \
             timeout_secs, created_at) VALUES (?1, ?2, ?3, ?4, 'queued', 1, ?5, ?6, ?7)",
        )?
        .execute(params![
            id,
            task.spec.kind(),
            task.spec.spec_json().to_string(),
            to_json(&task.selectors),
            task.retries,
            timeout_secs as i64,
            now
        ])?;
        let seq = conn.last_insert_rowid();
        self.queue().add(id, &task.selectors, now, seq);
        Ok(())
    }

    fn task(&self, id: &str) -> Result<TaskView, StoreError> {
        load_view(&self.conn(), id)
    }

    /// Tasks newest first, optionally only those in `state`.
    fn list_tasks(
        &self,
        state: Option<TaskState>,
        limit: u32,
    ) -> Result<Vec<TaskView>, StoreError> {
        let conn = self.conn();
        let rows = match state {
            Some(st) => {
                let mut stmt = conn.prepare_cached(&format!(
                    "{TASK_VIEW_SQL} WHERE t.state = ?1 ORDER BY t.created_at DESC, t.seq DESC \
                     LIMIT ?2"
                ))?;
                stmt.query_map(params![st.as_str(), limit], task_view)?
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!(
                    "{TASK_VIEW_SQL} ORDER BY t.created_at DESC, t.seq DESC LIMIT ?1"
                ))?;
                stmt.query_map(params![limit], task_view)?
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(rows)
    }

    /// The delegate began running the attempt: `assigned → running`. Saying so again, or
    /// after the result, changes nothing.
    fn started(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        now: UnixMillis,
    ) -> Result<TaskView, StoreError> {
        let conn = self.conn();
        let held = load_held(&conn, id)?;
        held.check(id, attempt, token_name)?;
        let change =
            lifecycle::transition(held.task(), Event::Start).map_err(|e| stale(id, attempt, e))?;
        persist(&conn, &mut self.queue(), id, change, Write::default(), now)?;
        load_view(&conn, id)
    }

    /// Store a log chunk that starts at byte `offset` of the attempt's log; returns how
    /// many bytes are stored now. Bytes already stored are skipped, so resending a range
    /// stores it once; a chunk that starts past the end is a gap. At the per-task cap the
    /// log is cut, a `[delegate-manager] log truncated` line ends it, the task is marked
    /// `log_truncated`, and later chunks are acknowledged whole (so the delegate moves on)
    /// but dropped.
    fn append_log(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let held = load_held(&tx, id)?;
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
        let insert = |start: u64, bytes: &[u8]| -> Result<(), StoreError> {
            tx.prepare_cached(
                "INSERT INTO log_chunks (task_id, attempt, start, data) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![id, attempt, start as i64, bytes])?;
            Ok(())
        };
        if !bytes.is_empty() {
            insert(start, bytes)?;
        }
        if let Some((at, line)) = &marker {
            insert(*at, line.as_bytes())?;
        }
        tx.prepare_cached("UPDATE tasks SET log_bytes = ?2, log_truncated = ?3 WHERE id = ?1")?
            .execute(params![id, log_bytes as i64, marker.is_some()])?;
        tx.commit()?;
        Ok(end)
    }

    /// Delete finished tasks (and their logs) that ended before `before`, at most
    /// [`PRUNE_BATCH`] per call so the store is never held long; call again while it
    /// returns a full batch.
    fn prune(&self, before: UnixMillis) -> Result<Pruned, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old: Vec<(String, u64)> = tx
            .prepare_cached(
                "SELECT id, log_bytes FROM tasks WHERE finished_at IS NOT NULL \
                 AND finished_at < ?1 ORDER BY finished_at LIMIT ?2",
            )?
            .query_map(params![before, PRUNE_BATCH], |r| {
                Ok((r.get(0)?, u64_col(r, 1)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut pruned = Pruned::default();
        for (id, bytes) in &old {
            tx.prepare_cached("DELETE FROM log_chunks WHERE task_id = ?1")?
                .execute([id])?;
            tx.prepare_cached("DELETE FROM tasks WHERE id = ?1")?
                .execute([id])?;
            pruned.tasks += 1;
            pruned.log_bytes += bytes;
        }
        tx.commit()?;
        Ok(pruned)
    }

    /// Up to `max` bytes of the current attempt's log, from byte `offset`.
    fn read_log(&self, id: &str, offset: u64, max: usize) -> Result<LogSlice, StoreError> {
        let conn = self.conn();
        let (state, attempt, stored): (String, u32, u64) = conn
            .prepare_cached("SELECT state, attempt, log_bytes FROM tasks WHERE id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, u64_col(r, 2)?)))
            .optional()?
            .ok_or_else(|| StoreError::TaskNotFound(id.to_string()))?;
        let state = TaskState::parse(&state)
            .ok_or_else(|| conv_err(0, BadState(state.clone())))
            .map_err(StoreError::Sqlite)?;
        let mut data = Vec::new();
        if offset < stored {
            let mut stmt = conn.prepare_cached(
                "SELECT start, data FROM log_chunks WHERE task_id = ?1 AND attempt = ?2 \
                 AND start >= (SELECT COALESCE(MAX(start), 0) FROM log_chunks \
                 WHERE task_id = ?1 AND attempt = ?2 AND start <= ?3) ORDER BY start",
            )?;
            let mut rows = stmt.query(params![id, attempt, offset as i64])?;
            while let Some(r) = rows.next()? {
                let start = u64_col(r, 0)?;
                let chunk = r.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
                if page_from_chunk(&mut data, offset, max, start, chunk) {
                    break;
                }
            }
        }
        Ok(LogSlice {
            data,
            stored,
            attempt,
            state,
        })
    }

    /// Record the result of an attempt. The same result again is accepted; a different
    /// one is a conflict. A `lost` attempt with retries left puts the task back in the
    /// queue.
    fn finish(
        &self,
        token_name: &str,
        id: &str,
        attempt: u32,
        result: &TaskResult,
        now: UnixMillis,
    ) -> Result<(TaskView, Finish), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let held = load_held(&tx, id)?;
        held.check(id, attempt, token_name)?;
        let (change, message, effect) = match decide_report(&held, id, attempt, result)? {
            Report::Repeat => return Ok((load_view(&tx, id)?, Finish::Done)),
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
        persist(&tx, &mut self.queue(), id, change, write, now)?;
        let view = load_view(&tx, id)?;
        tx.commit()?;
        self.metrics.task_finished(&view);
        Ok((view, effect))
    }

    /// A user asks to cancel: a queued task ends at once, a held one is flagged so its
    /// delegate is told; a finished one cannot be cancelled.
    fn cancel(&self, id: &str, now: UnixMillis) -> Result<(TaskView, Cancel), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let held = load_held(&tx, id)?;
        let (change, effect) = cancel_change(&held, id)?;
        let write = Write::message("cancelled by user before a delegate took it");
        persist(&tx, &mut self.queue(), id, change, write, now)?;
        let view = load_view(&tx, id)?;
        tx.commit()?;
        if effect == Cancel::Cancelled {
            self.queue().remove(id);
        }
        Ok((view, effect))
    }

    /// End or re-queue every held task whose lease expired before `now`.
    fn reap(&self, now: UnixMillis) -> Result<Reaped, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let expired: Vec<(String, Task, Option<String>)> = tx
            .prepare_cached(
                "SELECT t.id, t.state, t.attempt, t.retries, t.cancel_requested, d.name \
                 FROM tasks t LEFT JOIN delegates d ON d.id = t.delegate_id \
                 WHERE t.state IN ('assigned', 'running') AND t.lease_expires < ?1",
            )?
            .query_map([now], |r| {
                let (id, task) = held_task(r)?;
                Ok((id, task, r.get(5)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut reaped = Reaped::default();
        let mut q = self.queue();
        for (id, task, name) in expired {
            let name = name.unwrap_or_else(|| "?".to_string());
            let cause = format!("lease lapsed on delegate {name}");
            holder_gone(&tx, &mut q, &id, task, &cause, now, &mut reaped)?;
        }
        tx.commit()?;
        self.metrics
            .leases_lapsed((reaped.requeued + reaped.lost + reaped.cancelled) as u64);
        Ok(reaped)
    }

    /// Move by `by_ms` the deadline of every held lease that ends by `set_before`: the
    /// leases set before a wall-clock step (see `reaper`).
    fn shift_leases(&self, by_ms: i64, set_before: UnixMillis) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE tasks SET lease_expires = lease_expires + ?1 \
             WHERE state IN ('assigned', 'running') AND lease_expires <= ?2",
            params![by_ms, set_before],
        )?)
    }

    /// Give every held task a full lease from `now`: called at startup, because delegates
    /// could not heartbeat while the manager was down and must not lose tasks for it.
    fn extend_leases(&self, now: UnixMillis) -> Result<usize, StoreError> {
        Ok(self.conn().execute(
            "UPDATE tasks SET lease_expires = ?1 WHERE state IN ('assigned', 'running')",
            [now + self.lease_ttl_ms],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth;
    use delegate_protocol::{Outcome, ShellSpec, TaskSpec};

    const TTL: Duration = Duration::from_secs(30);

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("m.db"), TTL).expect("open");
        s.create_token("tok", &auth::hash_token("dlg_a"), None, 0)
            .expect("token");
        s.create_token("other", &auth::hash_token("dlg_b"), None, 0)
            .expect("token");
        (dir, s)
    }

    fn reg(name: &str, tags: &[&str]) -> RegisterRequest {
        RegisterRequest {
            name: name.into(),
            hostname: "host".into(),
            version: "1.0.0".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            targets: vec![],
            capacity: 4,
            upgrade_group: None,
        }
    }

    fn shell(selectors: &[&str], retries: u32) -> SubmitTask {
        SubmitTask {
            spec: TaskSpec::Shell(ShellSpec {
                script: "echo hi".into(),
                ..Default::default()
            }),
            selectors: selectors.iter().map(|t| t.to_string()).collect(),
            timeout_secs: None,
            retries,
        }
    }

    fn submit(s: &SqliteStore, id: &str, task: SubmitTask, now: UnixMillis) {
        s.submit(id, &task, 60, now).expect("submit");
    }

    fn result(outcome: Outcome, exit_code: Option<i32>) -> TaskResult {
        TaskResult {
            outcome,
            exit_code,
            signal: None,
            message: None,
            log_bytes: 0,
        }
    }

    /// `/metrics`' full-table counts must not run under the store's lock, or every
    /// heartbeat, lease and report waits for each scrape's scan. The counts read through
    /// their own connection: with the store's lock held by someone else (here the
    /// test, standing in for a heartbeat), a snapshot still completes, and it counts.
    #[test]
    fn a_metrics_snapshot_never_waits_for_the_store_lock() {
        let (_dir, s) = store();
        let d = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(&s, "t_1", shell(&[], 0), 1);
        submit(&s, "t_2", shell(&[], 0), 2);
        s.acquire("tok", &d, 1, 3, None).expect("lease");
        let s = std::sync::Arc::new(s);
        let held = s.conn();
        let (tx, rx) = std::sync::mpsc::channel();
        let scraper = {
            let s = s.clone();
            std::thread::spawn(move || {
                let _ = tx.send(s.snapshot(10).map(|snap| snap.tasks));
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(10));
        drop(held);
        scraper.join().expect("scraper");
        let tasks = got
            .expect("the snapshot waited for the store's lock")
            .expect("snapshot");
        assert_eq!(tasks.get(&("queued".into(), "shell".into())), Some(&1));
        assert_eq!(tasks.get(&("assigned".into(), "shell".into())), Some(&1));
        assert_eq!(s.metrics().snapshots_computed(), 1);
    }

    #[test]
    fn reopening_keeps_data_and_schema_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        {
            let s = SqliteStore::open(&path, TTL).expect("open");
            s.set_admin_hash("h").expect("set");
        }
        let s = SqliteStore::open(&path, TTL).expect("reopen");
        assert_eq!(s.admin_hash().expect("get").as_deref(), Some("h"));
        let conn = Connection::open(&path).expect("raw open");
        conn.pragma_update(None, "user_version", 99).expect("bump");
        drop(conn);
        drop(s);
        assert!(matches!(
            SqliteStore::open(&path, TTL),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }

    #[test]
    fn the_queue_index_is_rebuilt_at_open_and_a_handed_task_goes_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.db");
        {
            let s = SqliteStore::open(&path, TTL).expect("open");
            s.create_token("tok", &auth::hash_token("dlg_a"), None, 0)
                .expect("token");
            submit(&s, "t_old", shell(&[], 0), 1);
            submit(&s, "t_gpu", shell(&["gpu"], 0), 2);
            submit(&s, "t_new", shell(&[], 0), 3);
        }
        let s = SqliteStore::open(&path, TTL).expect("reopen");
        assert_eq!(s.queue_depth(), 3);
        let a = s.register("tok", &reg("a", &[]), 4).expect("reg");
        // Handed t_new by the hub: it goes first, then the oldest it may take.
        let got = s.acquire("tok", &a, 2, 5, Some("t_new")).expect("acquire");
        let ids: Vec<_> = got.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, ["t_new", "t_old"]);
        assert_eq!(s.queue_depth(), 1, "t_gpu stays, nobody may take it");
        // A hand-off this delegate may not take is offered again.
        s.take_fresh();
        let got = s.acquire("tok", &a, 1, 6, Some("t_gpu")).expect("acquire");
        assert!(got.tasks.is_empty());
        let again: Vec<_> = s.take_fresh().into_iter().map(|f| f.task).collect();
        assert_eq!(again, ["t_gpu"]);
        // A lapsed lease puts a task back in the index.
        let r = s.reap(5 + 31_000).expect("reap");
        assert_eq!(r.requeued + r.lost, 2);
        assert_eq!(
            s.queue_depth(),
            1,
            "retries 0: both lost, nothing re-queued"
        );
    }

    /// Retention deletes a pruned task's log chunks with it (the rest of this scenario,
    /// the cap and which tasks are pruned, is a contract test run on both backends).
    #[test]
    fn prune_deletes_the_log_chunks_of_the_tasks_it_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("m.db"), TTL)
            .expect("open")
            .with_max_log_bytes(10);
        s.create_token("tok", &auth::hash_token("dlg_a"), None, 0)
            .expect("token");
        let a = s.register("tok", &reg("a", &[]), 0).expect("reg");
        submit(&s, "t_1", shell(&[], 0), 0);
        s.acquire("tok", &a, 1, 0, None).expect("acquire");
        s.append_log("tok", "t_1", 1, 0, b"0123456789abc")
            .expect("log");
        s.finish("tok", "t_1", 1, &result(Outcome::Succeeded, Some(0)), 100)
            .expect("finish");
        assert_eq!(s.prune(150).expect("prune").tasks, 1);
        let left: i64 = s
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM log_chunks WHERE task_id = 't_1'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(left, 0, "its log chunks are gone");
    }
}
