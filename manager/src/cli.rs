//! The operator's command line: arguments of every subcommand, and the client commands
//! (`token`, `task`, `delegates`) that talk HTTP to a running manager.
//!
//! Output is made for both people and scripts: commands that create something print only
//! its id or token on stdout (`T=$(delegate-manager token create --name x)` works), tables
//! and summaries are for people, and `--json` prints the API's own JSON.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};
use delegate_protocol::{
    CreateToken, CreatedToken, DelegateView, DockerSpec, Env, ForgetDelegate, ForgottenDelegate,
    HttpSpec, KubeAction, KubernetesSpec, PullPolicy, ShellSpec, SubmitResponse, SubmitTask,
    TaskSpec, TaskState, TaskView, TokenView, UnixMillis,
};

use crate::client::Client;
use crate::error::CliError;
use crate::server::{ADMIN_TOKEN_FILE, DEFAULT_DATA_DIR};
use crate::text::shown;

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

/// Run a client command (anything but `serve`).
pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let token = admin_token(cli.admin_token.as_deref(), &cli.data)?;
    let client = Client::new(&cli.server, token, cli.ca_file.as_deref())?;
    match cli.command {
        Command::Serve(_) => Err(CliError::Usage("serve is not a client command".to_string())),
        Command::Token(cmd) => token_cmd(&client, cmd).await,
        Command::Task(cmd) => task_cmd(&client, cmd).await,
        Command::Delegates { cmd: None, json } => delegates(&client, json).await,
        Command::Delegates {
            cmd: Some(DelegatesCmd::Forget { name, host }),
            ..
        } => forget(&client, name, host).await,
    }
}

/// The admin token from the flag or environment, else from the data directory.
fn admin_token(given: Option<&str>, data: &Path) -> Result<String, CliError> {
    if let Some(t) = given.map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(t.to_string());
    }
    let path = data.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
        Ok(_) => Err(CliError::MissingAdminToken {
            path,
            reason: "the file is empty".to_string(),
        }),
        Err(e) => Err(CliError::MissingAdminToken {
            path,
            reason: e.to_string(),
        }),
    }
}

fn out(s: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{s}").map_err(CliError::Stdout)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::Usage(format!("cannot format JSON: {e}")))?;
    out(&s)
}

async fn token_cmd(client: &Client, cmd: TokenCmd) -> Result<ExitCode, CliError> {
    match cmd {
        TokenCmd::Create { name, tags } => {
            let tags = tags.as_deref().map(delegate_protocol::parse_tags);
            let created: CreatedToken = client
                .post("/tokens", Some(&CreateToken { name, tags }))
                .await?;
            out(&created.token)?;
        }
        TokenCmd::List { json } => {
            let tokens: Vec<TokenView> = client.get("/tokens", &[]).await?;
            if json {
                print_json(&tokens)?;
            } else {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            rfc3339(t.created_at),
                            if t.revoked { "revoked" } else { "active" }.to_string(),
                            t.tags
                                .as_ref()
                                .map(|t| t.join(","))
                                .unwrap_or_else(|| "(any)".to_string()),
                        ]
                    })
                    .collect();
                out(&table(&["NAME", "CREATED", "STATUS", "TAGS"], rows))?;
            }
        }
        TokenCmd::Revoke { name } => {
            let _: TokenView = client
                .post::<(), _>(&format!("/tokens/{name}/revoke"), None)
                .await?;
            eprintln!("token {name} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn task_cmd(client: &Client, cmd: TaskCmd) -> Result<ExitCode, CliError> {
    match cmd {
        TaskCmd::Submit(args) => submit(client, *args).await,
        TaskCmd::Show { id, json } => {
            let t: TaskView = client.get(&format!("/tasks/{id}"), &[]).await?;
            if json {
                print_json(&t)?;
            } else {
                out(&show_text(&t))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Logs {
            id,
            follow,
            offset,
            raw,
        } => {
            print_log(client, &id, offset, follow, raw).await?;
            if follow {
                finished_task(client, &id).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::Cancel { id } => {
            let t: TaskView = client
                .post::<(), _>(&format!("/tasks/{id}/cancel"), None)
                .await?;
            if t.state == TaskState::Cancelled {
                eprintln!("task {id} cancelled");
            } else {
                eprintln!(
                    "cancel requested for task {id} ({}); delegate {} will stop it",
                    t.state,
                    shown(t.delegate_name.as_deref().unwrap_or("?"))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCmd::List { state, limit, json } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(s) = state {
                let st = TaskState::parse(&s).ok_or_else(|| {
                    let known: Vec<_> = TaskState::ALL.iter().map(|s| s.as_str()).collect();
                    CliError::Usage(format!(
                        "--state {s:?} is not a task state (one of: {})",
                        known.join(", ")
                    ))
                })?;
                query.push(("state", st.as_str().to_string()));
            }
            let tasks: Vec<TaskView> = client.get("/tasks", &query).await?;
            if json {
                print_json(&tasks)?;
            } else {
                let rows = tasks
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.state.to_string(),
                            t.kind.clone(),
                            t.attempt.to_string(),
                            t.delegate_name.clone().unwrap_or_else(|| "-".into()),
                            rfc3339(t.created_at),
                        ]
                    })
                    .collect();
                out(&table(
                    &["ID", "STATE", "KIND", "ATTEMPT", "DELEGATE", "CREATED"],
                    rows,
                ))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Copy a task's log to stdout: as it is into a pipe or file, or with `raw`; escaped on
/// a terminal, where the task's bytes must not drive the operator's terminal.
async fn print_log(
    client: &Client,
    id: &str,
    offset: u64,
    follow: bool,
    raw: bool,
) -> Result<(), CliError> {
    use std::io::IsTerminal;
    let stdout = std::io::stdout();
    if raw || !stdout.is_terminal() {
        let mut stdout = stdout.lock();
        client.copy_log(id, offset, follow, &mut stdout).await?;
        return Ok(());
    }
    let mut out = crate::text::EscapeWriter::new(stdout.lock());
    client.copy_log(id, offset, follow, &mut out).await?;
    out.finish().map(drop).map_err(CliError::Stdout)?;
    Ok(())
}

/// Build the submission from `--spec` or from the kind's flags.
fn submission(args: &SubmitArgs) -> Result<SubmitTask, CliError> {
    let mut task = if let Some(path) = &args.spec {
        let text = read_input(path)?;
        serde_json::from_str::<SubmitTask>(&text).map_err(|e| {
            CliError::Usage(format!(
                "{}: not a task submission: {e} (expected {{\"kind\": ..., \"spec\": {{...}}}})",
                path.display()
            ))
        })?
    } else {
        let kind = match (&args.kind, &args.script, &args.url, &args.image) {
            (Some(k), _, _, _) => k.clone(),
            (None, Some(_), _, _) => "shell".to_string(),
            (None, None, Some(_), _) => "http".to_string(),
            (None, None, None, _) if args.kube.cluster.is_some() => "kubernetes".to_string(),
            (None, None, None, Some(_)) => "docker".to_string(),
            (None, None, None, None) => {
                return Err(CliError::Usage(
                    "say what to run: --kind shell --script '...', --kind http --url URL, \
                     --kind docker --image IMAGE -- CMD ARG..., --kind kubernetes --cluster \
                     NAME --action ACTION ..., or --spec FILE"
                        .to_string(),
                ));
            }
        };
        let spec = match kind.as_str() {
            "shell" => TaskSpec::Shell(ShellSpec {
                script: args.script.clone().ok_or_else(|| {
                    CliError::Usage("--kind shell needs --script 'COMMANDS'".to_string())
                })?,
                interpreter: args.interpreter.clone(),
                env: pairs(&args.env, '=', "--env", "K=V")?,
                working_dir: args.workdir.clone(),
                ..Default::default()
            }),
            "http" => TaskSpec::Http(HttpSpec {
                url: args
                    .url
                    .clone()
                    .ok_or_else(|| CliError::Usage("--kind http needs --url URL".to_string()))?,
                method: args.method.clone(),
                headers: pairs(&args.headers, ':', "--header", "'K: V'")?,
                body: args.body.clone(),
                expect_status: args.expect_status.clone(),
            }),
            "docker" => TaskSpec::Docker(DockerSpec {
                image: args.image.clone().ok_or_else(|| {
                    CliError::Usage("--kind docker needs --image IMAGE".to_string())
                })?,
                pull: args.pull.unwrap_or_default(),
                command: args.command.clone(),
                env: pairs(&args.env, '=', "--env", "K=V")?,
                working_dir: args.workdir.clone(),
                user: args.user.clone(),
                network_mode: args.network.clone(),
                keep: args.keep,
                ..DockerSpec::default()
            }),
            "kubernetes" => TaskSpec::Kubernetes(kube_spec(args)?),
            other => {
                return Err(CliError::Usage(format!(
                    "unknown task kind {other:?} (known kinds: {}); other kinds need --spec FILE",
                    TaskSpec::KINDS.join(", ")
                )));
            }
        };
        SubmitTask {
            spec,
            selectors: Vec::new(),
            timeout_secs: None,
            retries: 0,
        }
    };
    if !args.selectors.is_empty() {
        task.selectors = args.selectors.clone();
    }
    if let Some(t) = args.timeout {
        task.timeout_secs = Some(t.as_secs().max(1));
    }
    if let Some(r) = args.retries {
        task.retries = r;
    }
    Ok(task)
}

/// A file's text, or stdin's for `-`.
fn read_input(path: &Path) -> Result<String, CliError> {
    let read = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|source| CliError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

/// A kubernetes spec from `--cluster`, `--action` and the action's flags; a flag the
/// action does not use is refused rather than silently dropped.
fn kube_spec(args: &SubmitArgs) -> Result<KubernetesSpec, CliError> {
    let k = &args.kube;
    let usage = |m: &str| CliError::Usage(m.to_string());
    let cluster = k.cluster.clone().ok_or_else(|| {
        usage("--kind kubernetes needs --cluster NAME (a [[kubernetes]] cluster of the delegate)")
    })?;
    let action = k
        .action
        .as_deref()
        .ok_or_else(|| usage("--kind kubernetes needs --action apply|job|rollout|delete"))?;
    let given: [(&str, bool); 8] = [
        ("--manifest", k.manifest.is_some()),
        ("--job", k.job.is_some()),
        ("--object", k.object.is_some()),
        ("--force", k.force),
        ("--propagation", k.propagation.is_some()),
        ("--image", args.image.is_some()),
        ("--env", !args.env.is_empty()),
        ("a command after --", !args.command.is_empty()),
    ];
    let allowed: &[&str] = match action {
        "apply" => &["--manifest", "--force"],
        "job" => &["--job", "--image", "--env", "a command after --"],
        "rollout" => &["--object"],
        _ => &["--manifest", "--object", "--propagation"],
    };
    if let Some((flag, _)) = given.iter().find(|(f, on)| *on && !allowed.contains(f)) {
        return Err(CliError::Usage(format!(
            "{flag} does not go with --action {action} (it takes {})",
            allowed.join(", ")
        )));
    }
    let namespace = k.namespace.clone();
    let manifest = k.manifest.as_deref().map(read_input).transpose()?;
    let object = match k.object.as_deref() {
        Some(o) => Some(
            o.rsplit_once('/')
                .filter(|(kind, name)| !kind.is_empty() && !name.is_empty())
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "--object {o:?} is not KIND/NAME, e.g. deployment/web"
                    ))
                })?,
        ),
        None => None,
    };
    let action = match action {
        "apply" => KubeAction::Apply {
            manifest: manifest.ok_or_else(|| usage("--action apply needs --manifest FILE"))?,
            namespace,
            force: k.force,
        },
        "job" => {
            if k.job.is_none() && args.image.is_none() {
                return Err(usage(
                    "--action job needs --image IMAGE -- CMD ARG..., or --job FILE",
                ));
            }
            KubeAction::Job {
                job: k.job.as_deref().map(read_input).transpose()?,
                image: args.image.clone(),
                command: args.command.clone(),
                env: pairs(&args.env, '=', "--env", "K=V")?,
                namespace,
            }
        }
        "rollout" => {
            let (kind, name) =
                object.ok_or_else(|| usage("--action rollout needs --object KIND/NAME"))?;
            KubeAction::Rollout {
                object_kind: kind.to_string(),
                name: name.to_string(),
                namespace,
            }
        }
        _ => {
            if manifest.is_some() == object.is_some() {
                return Err(usage(
                    "--action delete needs either --manifest FILE or --object KIND/NAME",
                ));
            }
            KubeAction::Delete {
                manifest,
                object_kind: object.map(|(kind, _)| kind.to_string()),
                name: object.map(|(_, name)| name.to_string()),
                namespace,
                propagation: k.propagation.clone(),
            }
        }
    };
    Ok(KubernetesSpec { cluster, action })
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

/// Parse `K=V` / `K: V` pairs.
fn pairs(items: &[String], sep: char, flag: &str, form: &str) -> Result<Env, CliError> {
    let mut env = Env::new();
    for item in items {
        let (k, v) = item
            .split_once(sep)
            .ok_or_else(|| CliError::Usage(format!("{flag} {item:?} is not of the form {form}")))?;
        let v = if sep == ':' { v.trim() } else { v };
        env.insert(k.trim().to_string(), v.to_string());
    }
    Ok(env)
}

async fn submit(client: &Client, args: SubmitArgs) -> Result<ExitCode, CliError> {
    let task = submission(&args)?;
    let resp: SubmitResponse = client.post("/tasks", Some(&task)).await?;
    let id = resp.task_id;
    out(&id)?;
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    {
        print_log(client, &id, 0, true, false).await?;
    }
    let t = finished_task(client, &id).await?;
    eprintln!("{}", shown(&summary(&t)));
    Ok(task_exit_code(&t))
}

/// The task after its followed log ended: that happens when it finished, but also when
/// the manager shut down, which must not look like success.
async fn finished_task(client: &Client, id: &str) -> Result<TaskView, CliError> {
    let t: TaskView = client.get(&format!("/tasks/{id}"), &[]).await?;
    if !t.state.is_terminal() {
        return Err(CliError::StreamEnded {
            task: id.to_string(),
            state: t.state,
        });
    }
    Ok(t)
}

/// 0 when the task succeeded, its exit code when it has one, else 1.
fn task_exit_code(t: &TaskView) -> ExitCode {
    if t.state == TaskState::Succeeded {
        return ExitCode::SUCCESS;
    }
    match t.exit_code {
        Some(c) if (1..=255).contains(&c) => ExitCode::from(c as u8),
        _ => ExitCode::FAILURE,
    }
}

/// One line: `task t_… succeeded (exit 0) on delegate NAME in 1s 200ms`.
fn summary(t: &TaskView) -> String {
    let mut s = format!("task {} {}", t.id, t.state);
    let mut how = Vec::new();
    if let Some(c) = t.exit_code {
        how.push(format!("exit {c}"));
    }
    if let Some(sig) = t.signal {
        how.push(format!("signal {sig}"));
    }
    if !how.is_empty() {
        s.push_str(&format!(" ({})", how.join(", ")));
    }
    if let Some(d) = &t.delegate_name {
        s.push_str(&format!(" on delegate {d}"));
    }
    if let (Some(a), Some(b)) = (t.started_at, t.finished_at) {
        s.push_str(&format!(" in {}", span(a, b)));
    }
    if let Some(m) = &t.message {
        s.push_str(&format!(": {m}"));
    }
    s
}

fn show_text(t: &TaskView) -> String {
    let mut lines = vec![
        ("id", t.id.clone()),
        ("kind", t.kind.clone()),
        ("state", t.state.to_string()),
        (
            "attempt",
            format!("{} of at most {}", t.attempt, t.retries + 1),
        ),
        (
            "delegate",
            match (&t.delegate_name, &t.delegate_id) {
                (Some(n), Some(i)) => format!("{n} ({i})"),
                _ => "-".to_string(),
            },
        ),
        (
            "selectors",
            if t.selectors.is_empty() {
                "-".to_string()
            } else {
                t.selectors.join(", ")
            },
        ),
        ("timeout", format!("{}s", t.timeout_secs)),
    ];
    if t.cancel_requested {
        lines.push(("cancel", "requested".to_string()));
    }
    if let Some(c) = t.exit_code {
        lines.push(("exit code", c.to_string()));
    }
    if let Some(s) = t.signal {
        lines.push(("signal", s.to_string()));
    }
    if let Some(m) = &t.message {
        lines.push(("message", m.clone()));
    }
    lines.push(("created", rfc3339(t.created_at)));
    if let Some(a) = t.assigned_at {
        lines.push((
            "assigned",
            format!("{} (queued {})", rfc3339(a), span(t.created_at, a)),
        ));
    }
    if let Some(s) = t.started_at {
        lines.push(("started", rfc3339(s)));
    }
    if let Some(f) = t.finished_at {
        let ran = t
            .started_at
            .map(|s| format!(" (ran {})", span(s, f)))
            .unwrap_or_default();
        lines.push(("finished", format!("{}{ran}", rfc3339(f))));
    }
    lines.push((
        "log bytes",
        if t.log_truncated {
            format!(
                "{} (truncated at the manager's --max-log-bytes cap)",
                t.log_bytes
            )
        } else {
            t.log_bytes.to_string()
        },
    ));
    lines
        .into_iter()
        .map(|(k, v)| format!("{:<10} {}", format!("{k}:"), shown(&v)))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn delegates(client: &Client, json: bool) -> Result<ExitCode, CliError> {
    let ds: Vec<DelegateView> = client.get("/delegates", &[]).await?;
    if json {
        print_json(&ds)?;
        return Ok(ExitCode::SUCCESS);
    }
    let now = now_ms();
    let rows = ds
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.id.clone(),
                d.version.clone(),
                d.state.to_string(),
                if d.connected { "yes" } else { "no" }.to_string(),
                d.last_heartbeat
                    .map(|h| format!("{} ago", span(h, now)))
                    .unwrap_or_else(|| "never".to_string()),
                format!("{}/{}", d.in_flight, d.capacity),
                d.targets
                    .iter()
                    .map(|t| match &t.name {
                        Some(n) => format!("{}:{n}", t.kind),
                        None => t.kind.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                d.tags.join(","),
            ]
        })
        .collect();
    out(&table(
        &[
            "NAME",
            "ID",
            "VERSION",
            "STATE",
            "CONNECTED",
            "LAST HEARTBEAT",
            "IN-FLIGHT",
            "TARGETS",
            "TAGS",
        ],
        rows,
    ))?;
    Ok(ExitCode::SUCCESS)
}

async fn forget(client: &Client, name: String, host: Option<String>) -> Result<ExitCode, CliError> {
    let req = ForgetDelegate {
        name,
        hostname: host,
    };
    let gone: ForgottenDelegate = client.post("/delegates/forget", Some(&req)).await?;
    eprintln!(
        "{}",
        shown(&format!(
            "delegate {} on {} ({}, token {}) forgotten; {} held task(s) released; any token \
             may register the name now",
            gone.name, gone.hostname, gone.id, gone.token_name, gone.released_tasks
        ))
    );
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> UnixMillis {
    crate::store::now_ms()
}

fn rfc3339(ms: UnixMillis) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A duration between two instants, rounded to what a person wants to read.
fn span(from: UnixMillis, to: UnixMillis) -> String {
    let ms = (to - from).max(0) as u64;
    let d = if ms >= 60_000 {
        Duration::from_secs(ms / 1000)
    } else {
        Duration::from_millis(ms)
    };
    humantime::format_duration(d).to_string()
}

/// Left-aligned columns, two spaces apart; what others chose is shown escaped.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| shown(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut outl = vec![line(header.iter().map(|h| h.to_string()).collect())];
    outl.extend(rows.into_iter().map(line));
    outl.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> SubmitArgs {
        let mut argv = vec!["delegate-manager", "task", "submit"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parse").command {
            Command::Task(TaskCmd::Submit(a)) => *a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn shell_flags_make_a_shell_task() {
        let a = args(&[
            "--script",
            "echo hi",
            "--env",
            "A=1=2",
            "--selector",
            "linux",
            "--timeout",
            "90s",
            "--retries",
            "2",
        ]);
        let t = submission(&a).expect("submission");
        match &t.spec {
            TaskSpec::Shell(s) => {
                assert_eq!(s.script, "echo hi");
                assert_eq!(s.env.get("A").map(String::as_str), Some("1=2"));
            }
            other => panic!("wrong kind {other:?}"),
        }
        assert_eq!(t.selectors, ["linux"]);
        assert_eq!((t.timeout_secs, t.retries), (Some(90), 2));
    }

    #[test]
    fn http_headers_split_on_colon() {
        let a = args(&[
            "--kind",
            "http",
            "--url",
            "http://x/y",
            "--header",
            "X-A: b: c",
            "--expect-status",
            "204",
        ]);
        match submission(&a).expect("submission").spec {
            TaskSpec::Http(h) => {
                assert_eq!(h.headers.get("X-A").map(String::as_str), Some("b: c"));
                assert_eq!(h.expect_status, [204]);
            }
            other => panic!("wrong kind {other:?}"),
        }
    }

    #[test]
    fn docker_flags_make_a_docker_task_with_the_command_after_the_separator() {
        let a = args(&[
            "--kind",
            "docker",
            "--image",
            "busybox:1",
            "--pull",
            "never",
            "--network",
            "none",
            "--env",
            "A=1",
            "--keep",
            "--",
            "sh",
            "-c",
            "echo --not-a-flag",
        ]);
        match submission(&a).expect("submission").spec {
            TaskSpec::Docker(d) => {
                assert_eq!(d.image, "busybox:1");
                assert_eq!(d.pull, PullPolicy::Never);
                assert_eq!(d.network_mode.as_deref(), Some("none"));
                assert_eq!(d.command, ["sh", "-c", "echo --not-a-flag"]);
                assert_eq!(d.env.get("A").map(String::as_str), Some("1"));
                assert!(d.keep);
            }
            other => panic!("wrong kind {other:?}"),
        }
        let e = submission(&args(&["--kind", "docker"])).expect_err("no image");
        assert!(e.to_string().contains("--image"), "{e}");
    }

    #[test]
    fn kubernetes_flags_make_each_action_and_refuse_flags_the_action_does_not_take() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("m.yaml");
        std::fs::write(&file, "apiVersion: v1\nkind: ConfigMap\n").expect("write");
        let m = file.to_str().expect("utf-8 path");
        let spec = |extra: &[&str]| match submission(&args(extra)) {
            Ok(SubmitTask {
                spec: TaskSpec::Kubernetes(k),
                ..
            }) => Ok(k),
            Ok(other) => panic!("wrong kind {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        // --cluster alone says the kind.
        let k = spec(&[
            "--cluster",
            "prod",
            "--action",
            "apply",
            "--manifest",
            m,
            "--namespace",
            "web",
            "--force",
        ])
        .expect("apply");
        assert_eq!(k.cluster, "prod");
        assert_eq!(
            k.action,
            KubeAction::Apply {
                manifest: "apiVersion: v1\nkind: ConfigMap\n".into(),
                namespace: Some("web".into()),
                force: true
            }
        );
        let k = spec(&[
            "--kind",
            "kubernetes",
            "--cluster",
            "prod",
            "--action",
            "job",
            "--image",
            "busybox:1",
            "--env",
            "A=1",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .expect("job");
        match k.action {
            KubeAction::Job {
                job: None,
                image: Some(i),
                command,
                env,
                namespace: None,
            } => {
                assert_eq!(i, "busybox:1");
                assert_eq!(command, ["sh", "-c", "exit 3"]);
                assert_eq!(env.get("A").map(String::as_str), Some("1"));
            }
            other => panic!("{other:?}"),
        }
        let k = spec(&[
            "--cluster",
            "prod",
            "--action",
            "rollout",
            "--object",
            "apps/v1 Deployment/web",
        ])
        .expect("rollout");
        assert_eq!(
            k.action,
            KubeAction::Rollout {
                object_kind: "apps/v1 Deployment".into(),
                name: "web".into(),
                namespace: None
            }
        );
        let k = spec(&[
            "--cluster",
            "prod",
            "--action",
            "delete",
            "--object",
            "job/x",
            "--propagation",
            "foreground",
        ])
        .expect("delete");
        assert!(matches!(
            k.action,
            KubeAction::Delete { manifest: None, object_kind: Some(ref o), name: Some(ref n), propagation: Some(ref p), .. }
                if o == "job" && n == "x" && p == "foreground"
        ));
        let e = spec(&[
            "--cluster",
            "prod",
            "--action",
            "rollout",
            "--force",
            "--object",
            "deploy/w",
        ])
        .expect_err("force is for apply");
        assert!(
            e.contains("--force does not go with --action rollout"),
            "{e}"
        );
        let e = spec(&["--cluster", "prod", "--action", "delete"]).expect_err("what to delete");
        assert!(e.contains("--manifest FILE or --object KIND/NAME"), "{e}");
        let e = spec(&[
            "--cluster",
            "prod",
            "--action",
            "rollout",
            "--object",
            "web",
        ])
        .expect_err("no kind");
        assert!(e.contains("not KIND/NAME"), "{e}");
        let e = spec(&["--kind", "kubernetes", "--action", "job"]).expect_err("no cluster");
        assert!(e.contains("--cluster NAME"), "{e}");
    }

    #[test]
    fn unknown_kind_and_missing_script_are_usage_errors() {
        let e = submission(&args(&["--kind", "cobol"])).expect_err("unknown kind");
        assert!(e.to_string().contains("unknown task kind \"cobol\""), "{e}");
        let e = submission(&args(&["--kind", "shell"])).expect_err("no script");
        assert!(e.to_string().contains("--script"), "{e}");
    }

    #[test]
    fn exit_code_follows_the_task() {
        let mut t: TaskView = serde_json::from_value(serde_json::json!({
            "id": "t_1", "kind": "shell", "spec": {}, "selectors": [], "state": "failed",
            "attempt": 1, "retries": 0, "timeout_secs": 1, "cancel_requested": false,
            "delegate_id": null, "delegate_name": null, "exit_code": 3, "signal": null,
            "message": null, "created_at": 0, "assigned_at": null, "started_at": null,
            "finished_at": null, "log_bytes": 0
        }))
        .expect("view");
        assert_eq!(task_exit_code(&t), ExitCode::from(3));
        t.exit_code = None;
        assert_eq!(task_exit_code(&t), ExitCode::FAILURE);
        t.state = TaskState::Succeeded;
        assert_eq!(task_exit_code(&t), ExitCode::SUCCESS);
    }

    #[test]
    fn missing_admin_token_names_the_three_ways() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = admin_token(None, dir.path()).expect_err("no token");
        let msg = e.to_string();
        assert!(msg.contains("--admin-token") && msg.contains("DELEGATE_ADMIN_TOKEN"));
        assert!(msg.contains("--data"), "{msg}");
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "adm_x\n").expect("write");
        assert_eq!(admin_token(None, dir.path()).expect("read"), "adm_x");
        assert_eq!(
            admin_token(Some("adm_y"), dir.path()).expect("flag"),
            "adm_y"
        );
    }
}
