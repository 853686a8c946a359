//! PostgreSQL connections for the store's calls: a few shared by the blocking threads, each
//! with the statements prepared on it, and the transaction (or autocommit session) a call
//! runs in.
//!
//! A store call takes one connection for its duration and gives it back; a broken one is
//! dropped and a new one opened on the next call. Statements are prepared once per
//! connection, so the hot paths pay no parse round trip.

use std::collections::HashMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use postgres::types::ToSql;
use postgres::{Client, Row, Statement};

use super::notify::Note;
use super::tls::{Tls, connect};
use crate::error::StoreError;

/// Connections one node opens at most for store calls (the blocking pool runs 8 at once;
/// the `LISTEN` connection is apart).
const POOL_SIZE: usize = 10;

/// How long a store call waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);

/// One connection and the statements prepared on it.
pub(super) struct Conn {
    pub(super) client: Client,
    prepared: HashMap<&'static str, Statement>,
}

/// A transaction on a pooled connection, or (`Conn::auto`) statements that each commit
/// on their own — for reads and single-statement changes, which saves the `BEGIN` and
/// `COMMIT` round trips. Statements are prepared once per connection (prepared statements
/// outlive a rolled-back transaction in PostgreSQL).
pub(super) struct Tx<'a> {
    tx: Session<'a>,
    prepared: &'a mut HashMap<&'static str, Statement>,
}

enum Session<'a> {
    Tx(postgres::Transaction<'a>),
    Auto(&'a mut Client),
}

type Params<'p> = &'p [&'p (dyn ToSql + Sync)];

impl Conn {
    pub(super) fn tx(&mut self) -> Result<Tx<'_>, StoreError> {
        let Conn { client, prepared } = self;
        Ok(Tx {
            tx: Session::Tx(client.transaction()?),
            prepared,
        })
    }

    /// Each statement its own transaction (see [`Tx`]).
    pub(super) fn auto(&mut self) -> Result<Tx<'_>, StoreError> {
        let Conn { client, prepared } = self;
        Ok(Tx {
            tx: Session::Auto(client),
            prepared,
        })
    }
}

impl Tx<'_> {
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = match &mut self.tx {
            Session::Tx(t) => t.prepare(sql)?,
            Session::Auto(c) => c.prepare(sql)?,
        };
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    pub(super) fn query(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(match &mut self.tx {
            Session::Tx(t) => t.query(&s, p)?,
            Session::Auto(c) => c.query(&s, p)?,
        })
    }

    pub(super) fn opt(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        let s = self.stmt(sql)?;
        Ok(match &mut self.tx {
            Session::Tx(t) => t.query_opt(&s, p)?,
            Session::Auto(c) => c.query_opt(&s, p)?,
        })
    }

    pub(super) fn exec(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64, StoreError> {
        let s = self.stmt(sql)?;
        Ok(match &mut self.tx {
            Session::Tx(t) => t.execute(&s, p)?,
            Session::Auto(c) => c.execute(&s, p)?,
        })
    }

    /// Tell every node (sent at commit; dropped with a rollback).
    pub(super) fn notify(&mut self, note: &Note) -> Result<(), StoreError> {
        let payload = note.payload();
        self.exec("SELECT pg_notify('delegate_manager', $1)", &[&payload])?;
        Ok(())
    }

    pub(super) fn commit(self) -> Result<(), StoreError> {
        match self.tx {
            Session::Tx(t) => Ok(t.commit()?),
            Session::Auto(_) => Ok(()),
        }
    }
}

/// A few connections shared by the blocking threads: taken for one call, given back
/// after it (a broken one is dropped and a new one opened on the next call).
pub(super) struct Pool {
    pub(super) config: postgres::Config,
    pub(super) tls: Tls,
    pub(super) url: String,
    idle: Mutex<(Vec<Conn>, usize)>,
    freed: Condvar,
}

pub(super) struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        // Only `Drop` takes it out.
        self.conn
            .as_ref()
            .expect("a pooled connection until dropped")
    }
}

impl DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a pooled connection until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let mut idle = self.pool.lock();
        if conn.client.is_closed() {
            idle.1 -= 1;
        } else {
            idle.0.push(conn);
        }
        drop(idle);
        self.pool.freed.notify_one();
    }
}

impl Pool {
    /// A pool that connects to `config` (shown as `url`, its password redacted) on demand.
    pub(super) fn new(config: postgres::Config, tls: Tls, url: String) -> Pool {
        Pool {
            config,
            tls,
            url,
            idle: Mutex::new((Vec::new(), 0)),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, (Vec<Conn>, usize)> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connect(&self) -> Result<Conn, StoreError> {
        let client =
            connect(&self.config, &self.tls).map_err(|source| StoreError::PostgresConnect {
                url: self.url.clone(),
                source,
            })?;
        Ok(Conn {
            client,
            prepared: HashMap::new(),
        })
    }

    pub(super) fn get(&self) -> Result<Pooled<'_>, StoreError> {
        let deadline = std::time::Instant::now() + POOL_WAIT;
        let mut idle = self.lock();
        loop {
            if let Some(conn) = idle.0.pop() {
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if idle.1 < POOL_SIZE {
                idle.1 += 1;
                drop(idle);
                return match self.connect() {
                    Ok(conn) => Ok(Pooled {
                        pool: self,
                        conn: Some(conn),
                    }),
                    Err(e) => {
                        self.lock().1 -= 1;
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Invalid(format!(
                    "no free PostgreSQL connection to {} within {}s ({POOL_SIZE} in use)",
                    self.url,
                    POOL_WAIT.as_secs()
                )));
            }
            idle = self
                .freed
                .wait_timeout(idle, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A sync client owns a small runtime, which must not be dropped on an async worker
        // (the store may be dropped there): close them on a plain thread.
        let conns = std::mem::take(&mut self.lock().0);
        if !conns.is_empty() {
            let _ = std::thread::Builder::new()
                .name("pg-close".into())
                .spawn(move || drop(conns));
        }
    }
}
