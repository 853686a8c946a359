//! `delegate-manager`: parse the command line, start logging, then either serve the API
//! until SIGTERM/SIGINT or run one client command against a running manager.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use delegate_manager::cli::{self, Cli, Command};
use delegate_manager::server::{self, ServeConfig};
use tracing_subscriber::EnvFilter;

// Man pages and completions for the packages (`scripts/packages`); one source, shared with
// the agent. Not a clap subcommand, so it never shows in --help.
#[path = "../../agent/src/docs.rs"]
mod docs;

fn main() -> ExitCode {
    if let Some(code) = docs::from_args(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_));
    init_logging(if serving { "info" } else { "warn" });
    let runtime = if serving {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => Err(anyhow::Error::new(e).context("cannot start the async runtime")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Command::Serve(args) = &cli.command else {
        return Ok(cli::run(cli).await?);
    };
    let cfg = ServeConfig {
        listen: args.listen,
        data_dir: cli.data.clone(),
        lease_ttl: args.lease_ttl,
        heartbeat_interval: args
            .heartbeat_interval
            .unwrap_or_else(|| ServeConfig::default_heartbeat(args.lease_ttl)),
        releases: args.releases.clone(),
    };
    let server = server::bind(&cfg).await.with_context(|| {
        format!(
            "cannot start the manager (data dir {})",
            cfg.data_dir.display()
        )
    })?;
    server
        .run(stop_signal())
        .await
        .context("manager stopped with an error")?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on the first SIGTERM (systemctl stop) or SIGINT (Ctrl-C).
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message above it
/// already quotes (most of our messages include their source).
fn report(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

/// Human-readable lines on stderr; `RUST_LOG` overrides the level.
fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
