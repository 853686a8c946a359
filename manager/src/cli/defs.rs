//! The command line's declaration: every subcommand and flag as clap derives them. Its
//! doc comments are the `--help` text and the man pages (`generate-docs`), so a change
//! here is a change to the documented interface; nothing here talks to a manager.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use delegate_protocol::PullPolicy;

use crate::server::DEFAULT_DATA_DIR;

#[derive(Debug, Parser)]
#[command(
    name = "delegate-manager",
    version,
    about = "Reference control plane for delegate agents: HTTP API, task queue with leases, CLI"
)]
pub struct Cli {
    /// URL of the manager the client commands talk to.
    #[arg(
        long,
        global = true,
        env = "DELEGATE_MANAGER_SERVER",
        default_value = "http://127.0.0.1:7700"
    )]
    pub server: String,
    /// Admin token for the client commands (default: read DATA/admin.token).
    #[arg(
        long,
        global = true,
        env = "DELEGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// CA certificate(s) (PEM) that signed an https:// manager's certificate; only these
    /// are trusted then.
    #[arg(long, global = true, env = "DELEGATE_MANAGER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Data directory: database and admin.token.
    #[arg(long, global = true, env = "DELEGATE_MANAGER_DATA", default_value = DEFAULT_DATA_DIR)]
    pub data: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the manager: HTTP API, store, lease reaper.
    Serve(Box<ServeArgs>),
    /// Create, list and revoke delegate tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Submit, inspect, follow and cancel tasks.
    #[command(subcommand)]
    Task(TaskCmd),
    /// List registered delegates, or forget one.
    #[command(args_conflicts_with_subcommands = true)]
    Delegates {
        #[command(subcommand)]
        cmd: Option<DelegatesCmd>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DelegatesCmd {
    /// Free a delegate name so that a delegate with another token may register it: the
    /// tasks it holds are re-queued (or lost without retries left) at once.
    Forget {
        name: String,
        /// The delegate's hostname; needed when the name is registered on several hosts.
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (logged as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// A held task whose lease is not renewed for this long is lost (re-queued if it has
    /// retries left).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_ttl: Duration,
    /// How often delegates are asked to heartbeat (default: a third of the lease TTL, at
    /// most 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// Serve this release directory (made by `delegate-release publish`) read-only under
    /// `/releases/`, as the upgrader's channel URL.
    #[arg(long)]
    pub releases: Option<std::path::PathBuf>,
    /// A client must send a whole request head within this long (also how long a
    /// kept-alive connection may sit idle between requests).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// A request body or response that moves no byte for this long ends its connection.
    /// Long polls and log follows are not affected: there the manager is the one waiting.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// Most connections open at once (each delegate holds one or two); keep it below the
    /// open-file limit (`ulimit -n`, `LimitNOFILE=`). More wait until one closes.
    #[arg(long, default_value_t = 1000)]
    pub max_connections: usize,
    /// Most long polls the delegates of one token may hold open at once (default: half of
    /// --max-connections); more are answered 429. A delegate has one poll open at most (a
    /// new one ends the old one).
    #[arg(long)]
    pub max_polls_per_token: Option<usize>,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, requires = "tls_key", env = "DELEGATE_MANAGER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert", env = "DELEGATE_MANAGER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Most log bytes kept per task attempt (default 256 MiB); the log is cut there, ends
    /// with a `log truncated` line and the task shows `log truncated`.
    #[arg(long, default_value_t = crate::store::DEFAULT_MAX_LOG_BYTES)]
    pub max_log_bytes: u64,
    /// Delete finished tasks and their logs this long after they ended (e.g. `30days`);
    /// without it they are kept.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Where tasks, delegates, tokens and logs live: a SQLite file (default
    /// DATA/manager.db; one manager node), or postgres://USER[:PASSWORD]@HOST[:PORT]/DB,
    /// a PostgreSQL database (12 or newer) that several manager nodes share behind a load
    /// balancer. Migrations are applied at start. TLS: ?sslmode=verify-full (the server is
    /// verified against &sslrootcert=CA.pem or the system's CAs); prefer talks plain.
    #[arg(
        long,
        env = "DELEGATE_MANAGER_DATABASE",
        hide_env_values = true,
        value_parser = DatabaseParser
    )]
    pub database: Option<crate::store::Database>,
    /// A file holding the PostgreSQL password (one line), so that it is in neither the
    /// URL, the environment nor `ps`; keep it readable by the manager's user only.
    #[arg(
        long,
        env = "DELEGATE_MANAGER_DATABASE_PASSWORD_FILE",
        requires = "database"
    )]
    pub database_password_file: Option<PathBuf>,
}

/// Parses `--database` like [`crate::store::Database::parse`], but a refusal shows the
/// value with its passwords hidden: clap's own message would repeat the whole URL.
#[derive(Debug, Clone, Copy)]
pub struct DatabaseParser;

impl clap::builder::TypedValueParser for DatabaseParser {
    type Value = crate::store::Database;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        let text = value.to_string_lossy();
        crate::store::Database::parse(&text).map_err(|why| {
            let flag = arg
                .map(|a| a.to_string())
                .unwrap_or_else(|| "--database".into());
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "invalid value '{}' for '{flag}': {why}\n",
                    crate::pg::redact(&text)
                ),
            )
            .with_cmd(cmd)
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Create a delegate token and print it (only it) on stdout.
    Create {
        #[arg(long)]
        name: String,
        /// Tags its delegates may register with (comma separated); without it, any.
        /// A stolen token with tags cannot attract tasks meant for other hosts.
        #[arg(long, value_name = "TAG,TAG")]
        tags: Option<String>,
    },
    /// List delegate tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a delegate token; delegates using it are refused from now on.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Queue a task and print its id.
    Submit(Box<SubmitArgs>),
    /// Show a task.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a task's log (current attempt) to stdout.
    Logs {
        id: String,
        /// Keep printing until the task is finished.
        #[arg(long, short)]
        follow: bool,
        /// Start at this byte of the log.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Write the log's bytes as they are also to a terminal (by default control
        /// characters, such as escape sequences, are shown escaped there).
        #[arg(long)]
        raw: bool,
    },
    /// Cancel a task.
    Cancel { id: String },
    /// List tasks, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Task kind: shell, http, docker or kubernetes (inferred from --script / --url /
    /// --cluster / --image when absent).
    #[arg(long)]
    pub kind: Option<String>,
    /// A full SubmitTask JSON document (`-` = stdin) instead of the flags below.
    #[arg(long, conflicts_with_all = ["kind", "script", "url", "image", "cluster", "action"])]
    pub spec: Option<PathBuf>,

    /// shell: the script to run.
    #[arg(long)]
    pub script: Option<String>,
    /// shell: interpreter and its arguments, e.g. '/bin/bash -e' (default /bin/sh).
    #[arg(long)]
    pub interpreter: Option<String>,
    /// shell, docker, kubernetes job: environment variable K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// shell, docker: absolute working directory.
    #[arg(long)]
    pub workdir: Option<String>,

    /// http: URL to request.
    #[arg(long)]
    pub url: Option<String>,
    /// http: method (default GET).
    #[arg(long)]
    pub method: Option<String>,
    /// http: header 'K: V' (repeatable).
    #[arg(long = "header", value_name = "'K: V'")]
    pub headers: Vec<String>,
    /// http: request body.
    #[arg(long)]
    pub body: Option<String>,
    /// http: a status that counts as success (repeatable; default any 2xx).
    #[arg(long)]
    pub expect_status: Vec<u16>,

    /// docker, kubernetes job: image to run; the command and its arguments follow `--`.
    #[arg(long)]
    pub image: Option<String>,
    /// docker: pull policy: always, if-not-present (default) or never.
    #[arg(long, value_parser = parse_pull)]
    pub pull: Option<PullPolicy>,
    /// docker: network mode, e.g. none or host (default: the engine's).
    #[arg(long)]
    pub network: Option<String>,
    /// docker: user inside the container (name, uid, uid:gid).
    #[arg(long)]
    pub user: Option<String>,
    /// docker: keep the container after the task instead of removing it.
    #[arg(long)]
    pub keep: bool,
    /// docker, kubernetes job: the command and its arguments, after `--`.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,

    #[command(flatten)]
    pub kube: KubeArgs,

    /// Tag a delegate must have (repeatable).
    #[arg(long = "selector", value_name = "TAG")]
    pub selectors: Vec<String>,
    /// Task timeout, e.g. 60s or 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    /// How often a lost attempt is re-queued.
    #[arg(long)]
    pub retries: Option<u32>,
    /// After the id, follow the log to stdout, print a summary line to stderr and exit
    /// with the task's status (0 if it succeeded, else its exit code, else 1).
    #[arg(long)]
    pub wait: bool,
}

/// The flags of a `kubernetes` task; `--image`, `--env` and the command after `--` are
/// shared with docker.
#[derive(Debug, Args)]
pub struct KubeArgs {
    /// kubernetes: the cluster, by its name in the delegate's [[kubernetes]] config.
    #[arg(long)]
    pub cluster: Option<String>,
    /// kubernetes: apply, job, rollout or delete.
    #[arg(long, value_parser = ["apply", "job", "rollout", "delete"])]
    pub action: Option<String>,
    /// kubernetes apply, delete: a file of YAML documents (`-` = stdin).
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// kubernetes job: a file holding a full batch/v1 Job (YAML or JSON) instead of
    /// --image and a command.
    #[arg(long, value_name = "FILE")]
    pub job: Option<PathBuf>,
    /// kubernetes rollout, delete: the object as KIND/NAME, as kubectl names it
    /// (deployment/web, sts/db, 'apps/v1 Deployment/web').
    #[arg(long, value_name = "KIND/NAME")]
    pub object: Option<String>,
    /// kubernetes: the namespace (default: the cluster's in the delegate's config).
    #[arg(long)]
    pub namespace: Option<String>,
    /// kubernetes apply: take over fields that another field manager owns.
    #[arg(long)]
    pub force: bool,
    /// kubernetes delete: background (default), foreground or orphan.
    #[arg(long)]
    pub propagation: Option<String>,
}

fn parse_pull(s: &str) -> Result<PullPolicy, String> {
    match s {
        "always" => Ok(PullPolicy::Always),
        "if-not-present" => Ok(PullPolicy::IfNotPresent),
        "never" => Ok(PullPolicy::Never),
        other => Err(format!(
            "{other:?} is not a pull policy (always, if-not-present, never)"
        )),
    }
}
