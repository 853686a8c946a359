//! Typed errors of the manager's library modules.
//!
//! Each variant carries what an operator or a delegate needs to act on it — the task id,
//! the attempt, the path, the URL — and says how to fix it. The HTTP layer maps store
//! errors to `protocol::ErrorBody` codes (see `api::error::ApiError`); the binary wraps
//! the rest with `anyhow` context at its edge.
//!
//! A message says its cause once: a variant that exposes a source does not repeat it in
//! its text; whoever prints the error prints the chain ([`chain`], or `{:#}` of anyhow).

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;

use delegate_protocol::{ErrorCode, TaskState};

/// Why a store operation failed. Most variants are answers to a delegate or user that did
/// something the task's state does not allow; `Sqlite` and `Corrupt` are the manager's own
/// trouble.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this delegate-manager \
         understands ({known}); run a newer delegate-manager or restore a backup"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// `--database postgres://…` that is not a usable PostgreSQL URL.
    #[error(
        "--database {url}: {why}; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE \
         (e.g. postgres://delegate@127.0.0.1:5432/delegate)"
    )]
    PostgresUrl { url: String, why: String },
    /// The PostgreSQL server could not be reached or refused us.
    #[error(
        "cannot connect to the PostgreSQL database {url}; check that the server runs and \
         listens there, that pg_hba.conf lets this host in, and the URL's user, password \
         and database name"
    )]
    PostgresConnect {
        /// The URL without its password.
        url: String,
        source: postgres::Error,
    },
    #[error(
        "PostgreSQL database {url} has schema version {found}, newer than this \
         delegate-manager understands ({known}); run the same or a newer delegate-manager on \
         every node"
    )]
    PostgresSchemaTooNew { url: String, found: i64, known: i64 },
    #[error("PostgreSQL error")]
    Postgres(#[from] postgres::Error),
    #[error("task {0} not found; list tasks with `delegate-manager task list`")]
    TaskNotFound(String),
    #[error(
        "delegate {0} is not registered with this token; register again \
         (POST /api/v1/delegates/register) to get a delegate id"
    )]
    DelegateNotFound(String),
    #[error("token {0:?} not found; list tokens with `delegate-manager token list`")]
    TokenNotFound(String),
    /// The token was revoked after the request was let in (it raced the revoke).
    #[error(
        "delegate token {0:?} was revoked; ask the manager's admin for a new one \
         (`delegate-manager token create --name NAME`)"
    )]
    TokenRevoked(String),
    /// Another token's delegate holds this name: registering would take over its id, its
    /// leased tasks and their secrets.
    #[error(
        "delegate name {name:?} on host {hostname:?} is registered with token {owner:?}; a \
         delegate using another token cannot take it over. If this host moved to the new \
         token, an admin frees the name with `delegate-manager delegates forget {name} \
         --host {hostname}` (or revokes token {owner:?})"
    )]
    NameTaken {
        name: String,
        hostname: String,
        owner: String,
    },
    #[error(
        "token {token:?} may only register the tags [{}]; refusing [{}]; remove them from \
         the delegate's tags or register with a token created for them \
         (`delegate-manager token create --name NAME --tags ...`)",
        allowed.join(", "),
        refused.join(", ")
    )]
    TagsNotAllowed {
        token: String,
        refused: Vec<String>,
        allowed: Vec<String>,
    },
    #[error(
        "no delegate named {name:?}{} is registered; list them with `delegate-manager delegates`",
        hostname.as_deref().map(|h| format!(" on host {h:?}")).unwrap_or_default()
    )]
    NoSuchDelegate {
        name: String,
        hostname: Option<String>,
    },
    #[error(
        "delegate name {name:?} is registered on several hosts ({}); say which with --host",
        hosts.join(", ")
    )]
    AmbiguousDelegate { name: String, hosts: Vec<String> },
    #[error("a token named {0:?} already exists; pick another name")]
    TokenExists(String),
    #[error("task {task}: attempt {attempt} is stale ({why}); stop it and drop its reports")]
    StaleAttempt {
        task: String,
        attempt: u32,
        why: String,
    },
    #[error(
        "task {task} attempt {attempt}: log chunk starts at byte {offset} but only {expected} \
         bytes are stored; resend from byte {expected}"
    )]
    LogGap {
        task: String,
        attempt: u32,
        offset: u64,
        expected: u64,
    },
    #[error(
        "task {task} attempt {attempt} already has the result {existing}; refusing the \
         different result {new}"
    )]
    ResultConflict {
        task: String,
        attempt: u32,
        existing: String,
        new: String,
    },
    #[error("task {task} already finished ({state}); {detail}")]
    Finished {
        task: String,
        state: TaskState,
        detail: &'static str,
    },
    /// A request that parsed but makes no sense (empty name, bad selector, ...).
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// The wire code this error travels under.
    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::Open { .. }
            | StoreError::SchemaTooNew { .. }
            | StoreError::Sqlite(_)
            | StoreError::PostgresUrl { .. }
            | StoreError::PostgresConnect { .. }
            | StoreError::PostgresSchemaTooNew { .. }
            | StoreError::Postgres(_) => ErrorCode::Internal,
            StoreError::TaskNotFound(_)
            | StoreError::DelegateNotFound(_)
            | StoreError::TokenNotFound(_)
            | StoreError::NoSuchDelegate { .. } => ErrorCode::NotFound,
            StoreError::TokenExists(_)
            | StoreError::Invalid(_)
            | StoreError::AmbiguousDelegate { .. } => ErrorCode::BadRequest,
            StoreError::TokenRevoked(_) => ErrorCode::Unauthorized,
            StoreError::NameTaken { .. } => ErrorCode::NameTaken,
            StoreError::TagsNotAllowed { .. } => ErrorCode::TagsNotAllowed,
            StoreError::StaleAttempt { .. } => ErrorCode::StaleAttempt,
            StoreError::LogGap { .. } => ErrorCode::LogGap,
            StoreError::ResultConflict { .. } => ErrorCode::ResultConflict,
            StoreError::Finished { .. } => ErrorCode::Finished,
        }
    }
}

/// Why `delegate-manager serve` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot use the data directory {path} (choose another with --data DIR)")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the admin token file {path}")]
    AdminToken {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make the database {path} private (mode 0600)")]
    Database {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `reason` is the PEM reader's complaint, which is all there is to say.
    #[error(
        "cannot read the TLS file {path}: {reason} (give PEM files to --tls-cert and --tls-key)"
    )]
    TlsFile { path: PathBuf, reason: String },
    #[error("the TLS certificate {cert} and key {key} do not make a server identity")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        source: tokio_rustls::rustls::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} (choose another address with --listen)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a CLI command failed; the message is what the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `reason` is the innermost cause (e.g. "Connection refused"), which is all an
    /// operator needs here.
    #[error("cannot reach the manager at {url}: is `delegate-manager serve` running? ({reason})")]
    Unreachable { url: String, reason: String },
    /// `reason` is the TLS library's verdict (e.g. "invalid peer certificate:
    /// UnknownIssuer").
    #[error(
        "cannot trust the manager at {url}: its TLS certificate did not verify ({reason}); \
         pass the CA certificate that signed it with --ca-file FILE (or \
         DELEGATE_MANAGER_CA_FILE)"
    )]
    Certificate { url: String, reason: String },
    #[error("{path} holds no PEM CERTIFICATE; give --ca-file the CA certificate(s) in PEM")]
    CaFile { path: PathBuf },
    #[error("request to {url} failed")]
    Http { url: String, source: reqwest::Error },
    /// The manager answered with an error body; `message` is its human text.
    #[error("{message}")]
    Manager {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    #[error("{url} answered with an unexpected body")]
    BadAnswer {
        url: String,
        source: serde_json::Error,
    },
    #[error(
        "no admin token: pass --admin-token TOKEN, set DELEGATE_ADMIN_TOKEN, or point --data DIR \
         at the manager's data directory (tried {path}: {reason})"
    )]
    MissingAdminToken { path: PathBuf, reason: String },
    #[error("{0}")]
    Usage(String),
    /// A followed log ended before the task did: the manager stopped or restarted.
    #[error(
        "the log stream of task {task} ended while the task is still {state} (manager \
         restarting?); follow again with `delegate-manager task logs --follow {task}`"
    )]
    StreamEnded { task: String, state: TaskState },
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

/// An error and its causes on one line, `outer: cause: root cause`, for log lines and
/// API answers (the binary's edge uses anyhow's `{:#}`, which does the same).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        cur = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain once read "cannot use the state directory: create directory X: Permission
    /// denied: create directory X: Permission denied", the cause twice; each is said once.
    #[test]
    fn every_cause_is_said_once() {
        let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "Permission denied");
        let errors: Vec<Box<dyn Error + 'static>> = vec![
            Box::new(ServeError::DataDir {
                path: "/d".into(),
                source: io(),
            }),
            Box::new(ServeError::AdminToken {
                path: "/d/admin.token".into(),
                source: io(),
            }),
            Box::new(ServeError::Bind {
                addr: "127.0.0.1:1".parse().expect("addr"),
                source: io(),
            }),
            Box::new(ServeError::Database {
                path: "/d/manager.db".into(),
                source: io(),
            }),
            Box::new(CliError::ReadFile {
                path: "/f".into(),
                source: io(),
            }),
            Box::new(StoreError::Sqlite(rusqlite::Error::InvalidQuery)),
        ];
        for e in errors {
            let text = chain(e.as_ref());
            let root = {
                let mut cur: &dyn Error = e.as_ref();
                while let Some(next) = cur.source() {
                    cur = next;
                }
                cur.to_string()
            };
            assert_eq!(text.matches(&root).count(), 1, "{text}");
        }
    }
}
