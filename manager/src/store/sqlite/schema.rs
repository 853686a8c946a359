//! The SQLite schema: its migrations, applied in order, each in its own transaction;
//! `PRAGMA user_version` counts those applied.

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::error::StoreError;

/// Schema migrations, applied in order; `PRAGMA user_version` counts those applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE tokens (
    name       TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE TABLE delegates (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    hostname      TEXT NOT NULL,
    token_name    TEXT NOT NULL,
    version       TEXT NOT NULL,
    tags          TEXT NOT NULL,
    targets       TEXT NOT NULL,
    capacity      INTEGER NOT NULL,
    state         TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    UNIQUE (name, hostname)
);
CREATE TABLE tasks (
    seq              INTEGER PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    spec             TEXT NOT NULL,
    selectors        TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    retries          INTEGER NOT NULL,
    timeout_secs     INTEGER NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    cancel_delivered INTEGER NOT NULL DEFAULT 0,
    delegate_id      TEXT,
    lease_expires    INTEGER,
    outcome          TEXT,
    exit_code        INTEGER,
    signal           INTEGER,
    message          TEXT,
    log_bytes        INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    assigned_at      INTEGER,
    started_at       INTEGER,
    finished_at      INTEGER
);
CREATE INDEX tasks_by_state ON tasks (state, created_at);
CREATE INDEX tasks_by_delegate ON tasks (delegate_id, state);
CREATE TABLE log_chunks (
    task_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    start   INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (task_id, attempt, start)
);
"#,
    // Tokens may carry an allowed tag set (JSON array; NULL allows any tags).
    r#"
ALTER TABLE tokens ADD COLUMN tags TEXT;
"#,
    // Per-task log cap: the attempt's log was cut at the cap. Retention finds
    // finished tasks by their end time.
    r#"
ALTER TABLE tasks ADD COLUMN log_truncated INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_by_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
"#,
    // A delegate's upgrade group, from its config (NULL: none).
    r#"
ALTER TABLE delegates ADD COLUMN upgrade_group TEXT;
"#,
];

pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::SchemaTooNew {
            path: PathBuf::from(path),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
