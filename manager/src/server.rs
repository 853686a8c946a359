//! `delegate-manager serve`: prepare the data directory, open the store, listen, run the
//! lease reaper and stop gracefully.
//!
//! Split from `main` so tests can start a real server on a port the OS picks, talk to it
//! over loopback and stop it again, exactly as the binary does.

use std::fs::{self, DirBuilder, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::api::{self, App, AppInner};
use crate::auth;
use crate::conn::{self, Limits};
use crate::error::ServeError;
use crate::hub::Hub;
use crate::pg::Note;
use crate::queue::{Fresh, selector_key};
use crate::reaper::{Reaper, SystemClock};
use crate::store::{Database, Store, now_ms};

/// Where the manager keeps its database and admin token unless told otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/delegate-manager";
/// File in the data directory holding the admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
const DB_FILE: &str = "manager.db";
/// How long open connections get to finish after a stop signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub lease_ttl: Duration,
    pub heartbeat_interval: Duration,
    /// A release directory served read-only under `/releases/` (for the upgrader's
    /// channel), so a quick start needs no other web server.
    pub releases: Option<PathBuf>,
    /// Header, idle and connection-count limits.
    pub limits: Limits,
    /// Serve HTTPS with this certificate chain and key (PEM files); plain HTTP without.
    pub tls: Option<TlsFiles>,
    /// Most log bytes kept per task attempt.
    pub max_log_bytes: u64,
    /// Finished tasks and their logs are deleted this long after they ended.
    pub retention: Option<Duration>,
    /// The database; `None` is the SQLite file `DATA/manager.db`.
    pub database: Option<Database>,
    /// A file holding the PostgreSQL password, kept out of the URL.
    pub database_password_file: Option<PathBuf>,
    /// Most long polls the delegates of one token may hold open at once; `None` is half
    /// of `limits.max_connections`, so one token never holds every connection slot.
    pub max_polls_per_token: Option<usize>,
}

/// The PEM files of the manager's TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServeConfig {
    /// Defaults for everything but where to listen and keep data.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> ServeConfig {
        let lease_ttl = Duration::from_secs(30);
        ServeConfig {
            listen,
            data_dir,
            lease_ttl,
            heartbeat_interval: Self::default_heartbeat(lease_ttl),
            releases: None,
            limits: Limits::default(),
            tls: None,
            max_log_bytes: crate::store::DEFAULT_MAX_LOG_BYTES,
            retention: None,
            database: None,
            database_password_file: None,
            max_polls_per_token: None,
        }
    }

    /// The heartbeat interval when none is given: a third of the lease TTL, between 1 s
    /// and 10 s, so a delegate gets about three tries before its leases lapse.
    pub fn default_heartbeat(lease_ttl: Duration) -> Duration {
        (lease_ttl / 3).clamp(Duration::from_secs(1), Duration::from_secs(10))
    }

    /// The long polls one token's delegates may hold (see `max_polls_per_token`).
    pub fn polls_per_token(&self) -> usize {
        self.max_polls_per_token
            .unwrap_or(self.limits.max_connections / 2)
            .max(1)
    }

    /// Leases shorter than a second, or heartbeats no more often than leases lapse, would
    /// lose every task; refuse them up front.
    fn check(&self) -> Result<(), ServeError> {
        if self.lease_ttl < Duration::from_secs(2) {
            return Err(ServeError::Config(format!(
                "--lease-ttl {} is too short; give at least 2s (default 30s)",
                humantime::format_duration(self.lease_ttl)
            )));
        }
        if self.heartbeat_interval < Duration::from_secs(1)
            || self.heartbeat_interval >= self.lease_ttl
        {
            return Err(ServeError::Config(format!(
                "--heartbeat-interval {} must be at least 1s and shorter than --lease-ttl {} \
                 (a third of it is a good choice)",
                humantime::format_duration(self.heartbeat_interval),
                humantime::format_duration(self.lease_ttl)
            )));
        }
        if self.limits.max_connections == 0 {
            return Err(ServeError::Config(
                "--max-connections 0 would refuse every client; give at least 1".to_string(),
            ));
        }
        for (flag, d) in [
            ("--header-timeout", self.limits.header_timeout),
            ("--idle-timeout", self.limits.idle_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(ServeError::Config(format!(
                    "{flag} {} is too short; give at least 100ms",
                    humantime::format_duration(d)
                )));
            }
        }
        Ok(())
    }
}

/// A manager that is bound to its address but not yet serving.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    app: App,
    limits: Limits,
    tls: Option<TlsAcceptor>,
}

/// Step 1-4 of a start: data directory, database (migrated), admin token, leases
/// extended over the downtime; then bind the listener.
pub async fn bind(cfg: &ServeConfig) -> Result<Server, ServeError> {
    cfg.check()?;
    let tls = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
    // Blocking work (files, the database's first connection and migrations) stays off
    // the async workers.
    let prepared = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || prepare(&cfg))
            .await
            .map_err(|e| ServeError::Config(format!("preparing the store failed: {e}")))??
    };
    let (store, admin_hash) = prepared;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let app = App::new(AppInner {
        store,
        hub: Hub::new(cfg.polls_per_token()),
        admin_hash,
        lease_ttl: cfg.lease_ttl,
        heartbeat_interval: cfg.heartbeat_interval,
        releases: cfg.releases.clone(),
        idle_timeout: cfg.limits.idle_timeout,
        retention: cfg.retention,
        scrapes: Default::default(),
    });
    if let Some(pg) = app.store.postgres() {
        let (listening, handler) = (app.clone(), note_handler(&app));
        tokio::task::spawn_blocking(move || match listening.store.postgres() {
            Some(pg) => pg.listen(handler).map(drop),
            None => Ok(()),
        })
        .await
        .map_err(|e| ServeError::Config(format!("starting the LISTEN connection failed: {e}")))??;
        info!(
            "database {} (PostgreSQL): other manager nodes' tasks and cancels wake polls here",
            pg.url()
        );
    }
    Ok(Server {
        listener,
        addr,
        app,
        limits: cfg.limits,
        tls,
    })
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state, for tests that watch the hub or the store.
    pub fn app(&self) -> App {
        self.app.clone()
    }

    /// Serve until `shutdown` completes, then wake long polls and log followers so they
    /// answer at once, and give open connections a short grace period.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            listener,
            addr,
            app,
            limits,
            tls,
        } = self;
        let reaper = tokio::spawn(reap_leases(app.clone()));
        let stopper = app.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Stop first: nothing after this line may keep the server from stopping.
            stopper.hub.shutdown();
            info!("stopping: answering open long polls and closing connections");
        });
        let stopping = app.hub.subscribe_shutdown();
        let scheme = if tls.is_some() { "https" } else { "http" };
        info!("listening on {addr} ({scheme})");
        let router = api::router(app);
        conn::serve(listener, router, limits, tls, stopping, SHUTDOWN_GRACE).await;
        reaper.abort();
        Ok(())
    }
}

/// Create `path` with mode 0600 if it is missing, else make it 0600: SQLite creates its
/// `-wal` and `-shm` files with the database's mode.
fn private_file(path: &Path) -> std::io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

/// A TLS acceptor for the certificate chain and key in `files` (rustls on aws-lc-rs,
/// TLS 1.2 and 1.3, HTTP/1.1).
fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, ServeError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: tokio_rustls::rustls::pki_types::pem::Error| ServeError::TlsFile {
            path,
            reason: e.to_string(),
        }
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(pem_err(&files.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(&files.cert))?;
    if certs.is_empty() {
        return Err(ServeError::TlsFile {
            path: files.cert.clone(),
            reason: "no CERTIFICATE block in it".to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(pem_err(&files.key))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|source| ServeError::Tls {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Steps 1-4 of a start, blocking: the database opened (and migrated), the data
/// directory, the admin token, leases extended over the downtime. A PostgreSQL database is
/// opened first, so a bad `--database` leaves nothing behind.
fn prepare(cfg: &ServeConfig) -> Result<(Store, String), ServeError> {
    let dir_err = |source| ServeError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    };
    let make_dir = || -> Result<(), ServeError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.data_dir)
            .map_err(dir_err)?;
        // Also when it existed: it holds the admin token (and a SQLite database with task
        // specs and their secrets).
        fs::set_permissions(&cfg.data_dir, fs::Permissions::from_mode(0o700)).map_err(dir_err)
    };
    let store = match &cfg.database {
        Some(Database::Postgres(url)) => {
            let options = crate::pg::PgOptions {
                password: cfg
                    .database_password_file
                    .as_deref()
                    .map(read_password_file)
                    .transpose()?,
                ..Default::default()
            };
            let store = Store::open_postgres_with(url, cfg.lease_ttl, options)?;
            make_dir()?;
            store
        }
        other => {
            make_dir()?;
            let path = match other {
                Some(Database::Sqlite(path)) => path.clone(),
                _ => cfg.data_dir.join(DB_FILE),
            };
            private_file(&path).map_err(|source| ServeError::Database {
                path: path.clone(),
                source,
            })?;
            Store::open(&path, cfg.lease_ttl)?
        }
    }
    .with_max_log_bytes(cfg.max_log_bytes);
    let admin_hash = ensure_admin_token(&store, &cfg.data_dir)?;
    let extended = store.extend_leases(now_ms())?;
    if extended > 0 {
        info!(
            "gave {extended} held task(s) a fresh lease: delegates could not heartbeat while \
             the manager was down"
        );
    }
    Ok((store, admin_hash))
}

/// The password in `path`: its first line, without the line end. A file others may read
/// is used with a warning (it should be 0600 or 0640, or a systemd credential).
fn read_password_file(path: &Path) -> Result<String, ServeError> {
    let bad = |why: String| {
        ServeError::Config(format!(
            "--database-password-file {}: {why}",
            path.display()
        ))
    };
    let text = fs::read_to_string(path).map_err(|e| bad(format!("cannot read it ({e})")))?;
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        return Err(bad(
            "its first line is empty; write the password there".into()
        ));
    }
    if let Ok(meta) = fs::metadata(path)
        && meta.permissions().mode() & 0o004 != 0
    {
        warn!(
            "--database-password-file {} is readable by every user; chmod 600 it",
            path.display()
        );
    }
    Ok(password)
}

/// What a PostgreSQL [`Note`] from any node (this one included) does here: the hub wakes
/// the polls it concerns, cached facts it makes stale are dropped. Holds the app weakly so
/// that a stopped server (in tests) is not kept alive by its listener.
fn note_handler(app: &App) -> impl Fn(&Note) + Send + 'static {
    let app = app.downgrade();
    move |note| {
        let Some(app) = App::upgrade(&app) else {
            return;
        };
        if let Some(pg) = app.store.postgres() {
            pg.note_seen(note);
        }
        match note {
            Note::Queued { task, selectors } => app.hub.task_queued(Fresh {
                task: task.clone(),
                selectors: selector_key(selectors),
            }),
            Note::Delegate { id } => app.hub.wake_delegate(id),
            Note::Revoked => app.hub.wake_all(),
            Note::Changed => app.hub.changed(),
        }
    }
}

/// The admin token's hash; on first start a new token is written to `DIR/admin.token`.
/// The hash is claimed in the database only if none is there (two nodes starting at once
/// on one PostgreSQL both try; one wins), and the token file is put in place only by the
/// winner, so a token file always holds a token that works.
fn ensure_admin_token(store: &Store, dir: &Path) -> Result<String, ServeError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    if let Some(hash) = store.admin_hash()? {
        if !path.exists() {
            warn!(
                "{} is missing; the admin token it held still works. Copy it from the node \
                 that created it or, for a new one, stop the manager (with PostgreSQL: any \
                 one node) and delete the admin_token_sha256 row of the meta table; the \
                 next start writes a new token and every node refuses the old one",
                path.display()
            );
        }
        return Ok(hash);
    }
    let token = auth::new_admin_token();
    let token_err = |source| ServeError::AdminToken {
        path: path.clone(),
        source,
    };
    let staged = stage_secret(&path, &token).map_err(token_err)?;
    let hash = auth::hash_token(&token);
    let stored = match store.claim_admin_hash(&hash) {
        Ok(stored) => stored,
        Err(e) => {
            let _ = fs::remove_file(&staged);
            return Err(e.into());
        }
    };
    if stored != hash {
        let _ = fs::remove_file(&staged);
        warn!(
            "another manager node created the admin token as this one started; copy its \
             DATA/{ADMIN_TOKEN_FILE} to {}",
            path.display()
        );
        return Ok(stored);
    }
    commit_secret(&staged, &path).map_err(token_err)?;
    info!("wrote a new admin token to {}", path.display());
    Ok(hash)
}

/// Write a secret beside `path` so that it is never readable by others, not even for a
/// moment: a fresh file created with mode 0600 and synced; [`commit_secret`] renames it
/// over `path`.
fn stage_secret(path: &Path, secret: &str) -> std::io::Result<PathBuf> {
    let tmp = path.with_extension("token.tmp");
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{secret}\n").as_bytes())?;
    f.sync_all()?;
    Ok(tmp)
}

fn commit_secret(staged: &Path, path: &Path) -> std::io::Result<()> {
    fs::rename(staged, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Every tick, end or re-queue the tasks whose lease lapsed and wake whoever cares.
async fn reap_leases(app: App) {
    let tick = (app.lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut clock = SystemClock::default();
    let mut reaper = Reaper::default();
    loop {
        interval.tick().await;
        // On the blocking pool, as every store call: the async workers keep answering.
        let worker = app.clone();
        let done = tokio::task::spawn_blocking(move || {
            let pass = reaper.pass(&worker.store, &clock);
            if let Some(keep) = worker.retention {
                prune(&worker.store, keep);
            }
            (reaper, clock, pass)
        })
        .await;
        let pass = match done {
            Ok((r, c, pass)) => {
                reaper = r;
                clock = c;
                pass
            }
            Err(e) => {
                warn!("lease reaper: its pass failed: {e}");
                return;
            }
        };
        match pass {
            Ok(pass) => {
                if let Some((ms, moved)) = pass.step {
                    warn!(
                        "the wall clock jumped {} forward; moved {moved} lease(s) with it so \
                         that no task is lost for it",
                        humantime::format_duration(Duration::from_millis(ms as u64))
                    );
                }
                let r = pass.reaped;
                if r.any() {
                    info!(
                        requeued = r.requeued,
                        lost = r.lost,
                        cancelled = r.cancelled,
                        "leases lapsed"
                    );
                    if r.requeued > 0 {
                        app.wake_for_queued();
                    }
                    app.hub.changed();
                }
            }
            Err(e) => warn!("lease reaper: {}", crate::error::chain(&e)),
        }
    }
}

/// Delete finished tasks older than `keep`, a batch at a time, at most a few batches per
/// tick so a backlog (retention just switched on) never holds the store for long.
fn prune(store: &Store, keep: Duration) {
    let before = now_ms() - keep.as_millis() as i64;
    let mut total = crate::store::Pruned::default();
    for _ in 0..5 {
        match store.prune(before) {
            Ok(p) => {
                total.tasks += p.tasks;
                total.log_bytes += p.log_bytes;
                if p.tasks == 0 {
                    break;
                }
            }
            Err(e) => {
                warn!("retention: {}", crate::error::chain(&e));
                break;
            }
        }
    }
    if total.tasks > 0 {
        info!(
            tasks = total.tasks,
            log_bytes = total.log_bytes,
            "retention: deleted finished tasks older than {}",
            humantime::format_duration(keep)
        );
    }
}
