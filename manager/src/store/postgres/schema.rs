//! The PostgreSQL schema: its versioned migrations, applied in one transaction under an
//! advisory lock so that two nodes starting at once migrate once.

use postgres::Client;
use tracing::info;

use crate::error::StoreError;

/// Schema migrations, applied in order; `schema_version` holds how many were applied.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE tokens (
    name       TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    tags       TEXT
);
CREATE TABLE delegates (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    hostname      TEXT NOT NULL,
    token_name    TEXT NOT NULL,
    version       TEXT NOT NULL,
    tags          TEXT[] NOT NULL,
    targets       TEXT NOT NULL,
    capacity      BIGINT NOT NULL,
    state         TEXT NOT NULL,
    registered_at BIGINT NOT NULL,
    last_seen     BIGINT NOT NULL,
    UNIQUE (name, hostname)
);
CREATE TABLE tasks (
    seq              BIGSERIAL PRIMARY KEY,
    id               TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    spec             TEXT NOT NULL,
    selectors        TEXT[] NOT NULL,
    state            TEXT NOT NULL,
    attempt          BIGINT NOT NULL,
    retries          BIGINT NOT NULL,
    timeout_secs     BIGINT NOT NULL,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    cancel_delivered BOOLEAN NOT NULL DEFAULT false,
    delegate_id      TEXT,
    lease_expires    BIGINT,
    outcome          TEXT,
    exit_code        INTEGER,
    signal           INTEGER,
    message          TEXT,
    log_bytes        BIGINT NOT NULL DEFAULT 0,
    log_truncated    BOOLEAN NOT NULL DEFAULT false,
    created_at       BIGINT NOT NULL,
    assigned_at      BIGINT,
    started_at       BIGINT,
    finished_at      BIGINT
);
CREATE INDEX tasks_queued ON tasks (created_at, seq) WHERE state = 'queued';
CREATE INDEX tasks_by_state ON tasks (state, kind);
CREATE INDEX tasks_by_delegate ON tasks (delegate_id, state);
CREATE INDEX tasks_by_lease ON tasks (lease_expires) WHERE state IN ('assigned', 'running');
CREATE INDEX tasks_by_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE log_chunks (
    task_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    start   BIGINT NOT NULL,
    data    BYTEA NOT NULL,
    PRIMARY KEY (task_id, attempt, start)
);
"#,
    // A delegate's upgrade group, from its config (NULL: none).
    r#"
ALTER TABLE delegates ADD COLUMN upgrade_group TEXT;
"#,
];

/// Key of the advisory lock that serialises migrations of nodes starting at once.
pub(super) const MIGRATION_LOCK: i64 = 0x64656c_6567617465; // "delegate"

/// Create `schema_version` if needed and apply the migrations not applied yet, all in one
/// transaction under an advisory lock: a second node starting at the same moment waits,
/// then finds the schema current.
pub(super) fn migrate(client: &mut Client, url: &str) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
    let found: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?
        .try_get(0)?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::PostgresSchemaTooNew {
            url: url.to_string(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.batch_execute(sql)?;
        let v = i as i64 + 1;
        tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&v])?;
        info!("applied PostgreSQL schema migration {v}");
    }
    tx.commit()?;
    Ok(())
}
