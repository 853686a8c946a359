//! `delegate`: the host agent and its operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use delegate::config::{Config, DEFAULT_CONFIG_PATH, ProcessEnv};
use delegate::daemon::{self, Control};
use delegate::{EXIT_CONFIG, VERSION, logging};
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
                println!(
                    "{}: ok (manager {}, name {}, concurrency {}, state {})",
                    config.display(),
                    c.manager_url,
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
    }
}

/// Life of the daemon: config (78 on error) → logging → signals → run → exit code.
fn run(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("delegate: configuration is invalid; not starting (exit 78)");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    logging::init(&config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("delegate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
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
        daemon::run(config, rx).await.map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("delegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
