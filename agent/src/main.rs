//! `delegate`: the host agent and its operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use delegate::config::{Config, DEFAULT_CONFIG_PATH, ProcessEnv};
use delegate::daemon::{Control, Daemon, DaemonError};
use delegate::{EXIT_CONFIG, VERSION, dbus, docs, logging, setup};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "delegate", version = VERSION, about = "Host agent: runs tasks from a delegate manager")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (what delegate.service starts).
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH, env = "DELEGATE_CONFIG")]
        config: PathBuf,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the version.
    Version,
    /// Show the running agent's state (over D-Bus).
    Status,
    /// Ask the running agent to stop taking tasks; running ones finish.
    Drain {
        /// Wait until the agent is drained (no task left).
        #[arg(long)]
        wait: bool,
        /// Longest wait with --wait.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Let a drained agent take tasks again.
    Resume,
    /// Run one task inside its delegate-task@ unit (what the unit starts; not for people).
    #[command(hide = true)]
    TaskRun,
    /// Write the manager URL and token into the config (root:delegate 0640) and restart
    /// delegate.service: the one command to run after installing the package.
    Setup {
        /// Base URL of the manager, e.g. https://manager.example:7700; for a manager of
        /// several nodes, each node's URL (comma separated, or --manager again).
        #[arg(
            long = "manager",
            value_name = "URL",
            value_delimiter = ',',
            required = true
        )]
        manager_urls: Vec<String>,
        /// Delegate token from `delegate-manager token create --name NAME`. `-` reads it
        /// from standard input (`sudo delegate setup --token - ...`, then paste it, or pipe
        /// it in). A token written here is visible to every local user in `ps` while setup
        /// runs (minutes, while the restart drains the agent): prefer `-`, --token-file or
        /// DELEGATE_TOKEN in the environment. Without --token and --token-file,
        /// DELEGATE_TOKEN is used.
        #[arg(long, value_name = "TOKEN|-", conflicts_with = "token_file")]
        token: Option<String>,
        /// File whose first line is the delegate token (instead of --token).
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
        /// Name shown by the manager (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Tags matched against task selectors, comma separated.
        #[arg(long, value_delimiter = ',', value_name = "TAG,...")]
        tags: Vec<String>,
        /// Upgrade group for managed rollouts (written as upgrade_group; 1-63 of a-z, 0-9
        /// and '-'). Without it, the config's own group is kept.
        #[arg(long, value_name = "NAME")]
        upgrade_group: Option<String>,
        #[arg(long, default_value = DEFAULT_CONFIG_PATH, env = "DELEGATE_CONFIG")]
        config: PathBuf,
        /// Only write the config; do not restart delegate.service.
        #[arg(long)]
        no_restart: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the config and print every problem with its line.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH, env = "DELEGATE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    // `delegate generate-docs DIR` (packaging only; not in --help).
    if let Some(code) = docs::from_args(Cli::command) {
        return code;
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("{VERSION}");
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => match Config::load(&config, &ProcessEnv) {
            Ok(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                if let Some(w) = delegate::hostcheck::docker_group_warning(&c) {
                    eprintln!("warning: {w}");
                }
                println!(
                    "{}: ok (manager {}, name {}, concurrency {}, state {})",
                    config.display(),
                    c.manager_urls.join(", "),
                    c.name,
                    c.concurrency,
                    c.state_dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config } => run(config),
        Command::TaskRun => delegate::task_runner::main(),
        Command::Status => operator(|p| async move {
            let s = dbus::status(&p).await?;
            println!("state:       {}", s.state);
            println!("version:     {}", s.version);
            println!("connected:   {}", s.connected);
            println!("in flight:   {}", s.in_flight);
            let id = if s.delegate_id.is_empty() {
                "(not registered yet)"
            } else {
                &s.delegate_id
            };
            println!("delegate id: {id}");
            println!("manager:     {}", s.manager_url);
            Ok(())
        }),
        Command::Drain { wait, timeout } => operator(move |p| async move {
            dbus::drain(&p, wait.then_some(timeout)).await?;
            println!("{}", if wait { "drained" } else { "draining" });
            Ok(())
        }),
        Command::Resume => operator(|p| async move {
            dbus::resume(&p).await?;
            println!("running");
            Ok(())
        }),
        Command::Setup {
            manager_urls,
            token,
            token_file,
            name,
            tags,
            upgrade_group,
            config,
            no_restart,
        } => {
            let source = setup::TokenSource::from_flags(token, token_file);
            if matches!(source, setup::TokenSource::Argument(_)) {
                eprintln!("{}", setup::ARGV_TOKEN_WARNING);
            }
            let token = match source.read(&ProcessEnv, &mut std::io::stdin().lock()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("delegate setup: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let settings = setup::Settings {
                manager_urls,
                token,
                name,
                tags,
                upgrade_group,
            };
            match run_setup(&config, &settings, no_restart) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("delegate setup: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

/// `delegate setup`: write the config, then restart the unit when systemd runs it.
fn run_setup(
    config: &std::path::Path,
    settings: &setup::Settings,
    no_restart: bool,
) -> Result<(), setup::SetupError> {
    let gid = setup::agent_gid()?;
    setup::write_config(config, settings, Some(gid))?;
    println!(
        "{}: written (root:{} 0640)",
        config.display(),
        setup::AGENT_GROUP
    );
    if no_restart || !setup::systemd_booted() {
        println!("start the agent with: systemctl restart {}", setup::UNIT);
        return Ok(());
    }
    setup::restart_service()?;
    println!(
        "{} restarted; `delegate status` shows its state",
        setup::UNIT
    );
    Ok(())
}

/// Run one operator command against the agent on the system bus.
fn operator<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(dbus::Agent1Proxy<'static>) -> Fut,
    Fut: std::future::Future<Output = Result<(), dbus::CliError>>,
{
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(async { f(dbus::connect().await?).await }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delegate: {}", delegate::client::causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// Build a runtime, or say why not (the caller exits non-zero).
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    match builder.enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("delegate: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Life of the daemon: config (78 on error) → logging → signals → run → exit code.
fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "delegate: configuration is invalid; not starting (exit 78). Fix {} (`delegate config check` lists every problem), or run `delegate setup --manager URL --token -` (the token on standard input)",
                path.display()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(&config.log_level);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if let Some(w) = delegate::hostcheck::docker_group_warning(&config) {
        tracing::warn!("{w}");
    }
    // Two workers: the agent mostly waits on sockets and children; more threads would only
    // cost memory on hosts with many cores.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2);
    let Some(runtime) = runtime(builder) else {
        return ExitCode::FAILURE;
    };
    let result = runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let tx_bus = tx.clone();
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            // First SIGTERM/SIGINT drains; any further one cancels what is left.
            let mut first = true;
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                let c = if first {
                    Control::Shutdown
                } else {
                    Control::Abort
                };
                if first {
                    tracing::info!(
                        "stop requested: draining (send SIGTERM again to cancel running tasks)"
                    );
                }
                first = false;
                if tx.send(c).await.is_err() {
                    return;
                }
            }
        });
        let daemon = Daemon::new(config)?;
        // Take the bus name before the daemon says READY=1, so a unit that is "started"
        // can already be drained. Without a bus the agent still runs tasks.
        let _bus = match dbus::serve(tx_bus, daemon.observer()).await {
            Ok(conn) => Some(conn),
            Err(e) => {
                tracing::warn!(
                    "remote drain is unavailable (no D-Bus name {}): {e}",
                    dbus::BUS_NAME
                );
                None
            }
        };
        daemon.run(rx).await.map_err(anyhow::Error::from)
    });
    // Said once: `logging::init` sends tracing to stderr or to the journal, not both.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<DaemonError>() {
            Some(rejected @ DaemonError::TokenRejected { .. }) => {
                tracing::error!(
                    "{rejected}; exiting with code {EXIT_CONFIG} so the service is not restarted in a loop. To fix: create a token with `delegate-manager token create --name NAME`, put it in token or token_file of {} (or run `delegate setup`), then `systemctl restart delegate`",
                    path.display()
                );
                ExitCode::from(EXIT_CONFIG)
            }
            Some(refused @ DaemonError::RegistrationRefused { .. }) => {
                tracing::error!(
                    "{refused}; exiting with code {EXIT_CONFIG} so the service is not restarted in a loop. To fix: change name or tags in {} (or as the manager's message says), then `systemctl restart delegate`",
                    path.display()
                );
                ExitCode::from(EXIT_CONFIG)
            }
            _ => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
