//! `delegate-upgrader`: the timer's job. Parses arguments, runs the library, maps errors to
//! exit codes (2 refused, 75 retry later, 3 rolled back, 78 configuration, 1 local). The
//! release tools (keygen, sign, publish) are `delegate-release`, not installed on hosts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use delegate_protocol::release::Version;
use delegate_upgrader::UpgradeError;
use delegate_upgrader::config::{Config, DEFAULT_CONFIG_PATH, ServiceKind};
use delegate_upgrader::service::{ServiceManager, Supervisor, Systemd};
use delegate_upgrader::upgrade::{Outcome, Upgrader, set_skipped, status_text};

#[derive(Parser)]
#[command(
    name = "delegate-upgrader",
    version,
    about = "Signed, drained, health-gated upgrades of the delegate agent"
)]
struct Cli {
    #[arg(long, global = true, default_value = DEFAULT_CONFIG_PATH, env = "DELEGATE_UPGRADER_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upgrade now if the channel offers a newer release (what the timer runs).
    Run,
    /// Say what `run` would do; change nothing.
    Check,
    /// Current and previous version, pin, last check, skip list.
    Status,
    /// Go back to the previous version now (and skip the current one).
    Rollback,
    /// Install a signed archive from a file (offline); same checks as `run`.
    Install {
        archive: PathBuf,
        #[arg(long)]
        signature: PathBuf,
    },
    /// Allow a version on the skip list again.
    Unskip { version: String },
    /// Put a version on the skip list.
    Skip { version: String },
    /// Test seam: keep a command running like systemd would; SIGHUP restarts it.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        state: PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

// Man pages and completions for the packages (`scripts/packages`); one source, shared with
// the agent. Not a clap subcommand, so it never shows in --help.
use delegate_docgen as docs;

fn main() -> ExitCode {
    if let Some(code) = docs::from_args(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    let cli = Cli::parse();
    // Journal fields UPGRADE_STEP, UPGRADE_FROM, UPGRADE_TO (see upgrade.rs).
    delegate_host::logging::init("delegate-upgrader", "info");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("delegate-upgrader: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => match e.downcast_ref::<UpgradeError>() {
            Some(u) => {
                tracing::error!(upgrade_error = u.code(), "{e:#}");
                eprintln!("delegate-upgrader: error[{}]: {e:#}", u.code());
                ExitCode::from(u.class().exit_code())
            }
            None => {
                eprintln!("delegate-upgrader: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Supervise { state, command } = &cli.command {
        delegate_upgrader::service::supervise(state, command).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let cfg = Config::load(&cli.config)?;
    match cli.command {
        Command::Status => {
            print!("{}", status_text(&cfg)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip { version } => {
            // Checked like every version that enters: the skip list names directories.
            version
                .parse::<Version>()
                .map_err(|source| UpgradeError::Manifest {
                    url: "skip (command line)".into(),
                    source,
                })?;
            set_skipped(&cfg, &version, true)?;
            println!("{version} is on the skip list");
            Ok(ExitCode::SUCCESS)
        }
        Command::Unskip { version } => {
            let removed = set_skipped(&cfg, &version, false)?;
            println!(
                "{version} {}",
                if removed {
                    "removed from the skip list"
                } else {
                    "was not on the skip list"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => match cfg.service.clone() {
            ServiceKind::Systemd { unit } => {
                let s = Systemd::connect(&unit).await;
                // `check` and `status` need no systemd; the others do.
                match s {
                    Ok(s) => upgrade(cfg, s, cli.command).await,
                    Err(e) if matches!(cli.command, Command::Check) => {
                        tracing::debug!(
                            "systemd not reachable ({}); check does not need it",
                            delegate_upgrader::error::chain(&e)
                        );
                        upgrade(cfg, NoService, cli.command).await
                    }
                    Err(e) => Err(e.into()),
                }
            }
            ServiceKind::Supervisor { state_file } => {
                upgrade(cfg, Supervisor { state_file }, cli.command).await
            }
        },
    }
}

fn no_systemd() -> UpgradeError {
    UpgradeError::Bus {
        what: "systemd is not reachable".into(),
        source: None,
    }
}

/// For `check` on a host without systemd on the bus.
struct NoService;

impl ServiceManager for NoService {
    async fn restart(&self) -> Result<(), UpgradeError> {
        Err(no_systemd())
    }
    async fn instance(&self) -> Result<delegate_upgrader::service::Instance, UpgradeError> {
        Err(no_systemd())
    }
    fn describe(&self) -> String {
        "no service manager".into()
    }
}

async fn upgrade<S: ServiceManager>(
    cfg: Config,
    service: S,
    command: Command,
) -> anyhow::Result<ExitCode> {
    let up = Upgrader::new(cfg, service)?;
    let outcome: Outcome = match command {
        Command::Run => up.run().await?,
        Command::Check => up.check().await?,
        Command::Rollback => up.rollback().await?,
        // Every error names the archive itself: no context that would say it twice.
        Command::Install { archive, signature } => up.install(&archive, &signature).await?,
        _ => unreachable_command()?,
    };
    println!("{}: {outcome}", outcome.code());
    Ok(ExitCode::SUCCESS)
}

fn unreachable_command() -> anyhow::Result<Outcome> {
    anyhow::bail!("internal: command dispatched to the wrong place")
}
