//! `delegate-upgrader`: the timer's job and the release tools. Parses arguments, runs the
//! library, maps errors to exit codes (2 refused, 75 retry later, 3 rolled back, 1 local).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use delegate_upgrader::config::{BUILD_TARGET, Config, DEFAULT_CONFIG_PATH, ServiceKind};
use delegate_upgrader::release_tool::{self, PASSPHRASE_ENV, Publish, Signer};
use delegate_upgrader::service::{ServiceManager, Supervisor, Systemd};
use delegate_upgrader::state::State;
use delegate_upgrader::upgrade::{Outcome, Upgrader, status_text};
use delegate_upgrader::{UpgradeError, logging};

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
    /// Release tool: make a minisign key pair `<out>/<name>.pub` + `<out>/<name>.key`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "delegate-release")]
        name: String,
        /// Store the secret key unencrypted (otherwise the passphrase comes from
        /// DELEGATE_KEY_PASSPHRASE or a prompt).
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Release tool: sign a file into FILE.minisig.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "")]
        trusted_comment: String,
    },
    /// Release tool: pack a built binary, add it to a channel and sign the manifest.
    Publish {
        #[arg(long)]
        releases: PathBuf,
        #[arg(long)]
        channel: String,
        #[arg(long)]
        binary: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = BUILD_TARGET)]
        target: String,
        /// How long upgraders accept the manifest.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        expires_in: Duration,
    },
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
#[path = "../../agent/src/docs.rs"]
mod docs;

fn main() -> ExitCode {
    if let Some(code) = docs::from_args(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    let cli = Cli::parse();
    logging::init();
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

fn passphrase(no_passphrase: bool) -> Option<String> {
    if no_passphrase {
        return None;
    }
    std::env::var(PASSPHRASE_ENV).ok()
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen {
            out,
            name,
            no_passphrase,
        } => {
            let pass = passphrase(no_passphrase);
            if !no_passphrase && pass.is_none() {
                anyhow::bail!(
                    "set {PASSPHRASE_ENV} to protect the secret key, or pass --no-passphrase"
                );
            }
            let (pk, sk) = release_tool::keygen(&out, &name, pass)?;
            println!("public key: {}\nsecret key: {}", pk.display(), sk.display());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Sign {
            file,
            key,
            trusted_comment,
        } => {
            let signer = Signer::load(&key, std::env::var(PASSPHRASE_ENV).ok())?;
            let out = signer.sign_file(&file, &trusted_comment)?;
            println!("{}", out.display());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Publish {
            releases,
            channel,
            binary,
            key,
            target,
            expires_in,
        } => {
            let signer = Signer::load(&key, std::env::var(PASSPHRASE_ENV).ok())?;
            let p = release_tool::publish(
                &Publish {
                    releases: &releases,
                    channel: &channel,
                    binary: &binary,
                    target: &target,
                    expires_in,
                },
                &signer,
            )?;
            println!(
                "published {} on channel {channel}: {} ({})",
                p.version,
                p.manifest.display(),
                p.artifact.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Supervise { state, command } => {
            delegate_upgrader::service::supervise(&state, &command).await?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cfg = Config::load(&cli.config)?;
    match cli.command {
        Command::Status => {
            print!("{}", status_text(&cfg)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Skip { version } => {
            let mut s = State::load(&cfg.root)?;
            s.skip(&version);
            s.write(&cfg.root)?;
            println!("{version} is on the skip list");
            Ok(ExitCode::SUCCESS)
        }
        Command::Unskip { version } => {
            let mut s = State::load(&cfg.root)?;
            let removed = s.unskip(&version);
            s.write(&cfg.root)?;
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
                        tracing::debug!("systemd not reachable ({e}); check does not need it");
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

/// For `check` on a host without systemd on the bus.
struct NoService;

impl ServiceManager for NoService {
    async fn restart(&self) -> Result<(), UpgradeError> {
        Err(UpgradeError::Bus("systemd is not reachable".into()))
    }
    async fn instance(&self) -> Result<delegate_upgrader::service::Instance, UpgradeError> {
        Err(UpgradeError::Bus("systemd is not reachable".into()))
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
        Command::Install { archive, signature } => up
            .install(&archive, &signature)
            .await
            .with_context(|| format!("installing {}", archive.display()))?,
        _ => unreachable_command()?,
    };
    println!("{}: {outcome}", outcome.code());
    Ok(ExitCode::SUCCESS)
}

fn unreachable_command() -> anyhow::Result<Outcome> {
    anyhow::bail!("internal: command dispatched to the wrong place")
}
