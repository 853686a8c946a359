//! `delegate-manager`: parse the command line, start logging, then either serve the API
//! until SIGTERM/SIGINT or run one client command against a running manager.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use delegate_manager::cli::{self, Cli, Command};
use delegate_manager::conn::Limits;
use delegate_manager::server::{self, ServeConfig, TlsFiles};
use tracing_subscriber::EnvFilter;

// Man pages and completions for the packages (`scripts/packages`); one source, shared with
// the agent. Not a clap subcommand, so it never shows in --help.
use delegate_docgen as docs;

fn main() -> ExitCode {
    if let Some(code) = docs::from_args(<Cli as clap::CommandFactory>::command) {
        return code;
    }
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_));
    init_logging(if serving { "info" } else { "warn" });
    let runtime = if serving {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        // Store calls run on the blocking pool but take turns on one SQLite connection: a
        // few threads keep it busy; hundreds (tokio's default cap) would only cost memory
        // when a burst of requests arrives at once.
        b.max_blocking_threads(8);
        b
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
            // An error may quote what a delegate or task chose (a name, a message).
            let text = format!("{e:#}");
            eprintln!("error: {}", delegate_manager::text::shown_lines(&text));
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
        limits: Limits {
            header_timeout: args.header_timeout,
            idle_timeout: args.idle_timeout,
            max_connections: args.max_connections,
        },
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        },
        max_log_bytes: args.max_log_bytes,
        retention: args.retention,
        database: args.database.clone(),
        database_password_file: args.database_password_file.clone(),
        max_polls_per_token: args.max_polls_per_token,
    };
    let stop = stop_signal();
    let server = server::bind(&cfg)
        .await
        .context("cannot start the manager")?;
    server
        .run(stop)
        .await
        .context("manager stopped with an error")?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on the first SIGTERM (systemctl stop) or SIGINT (Ctrl-C). The handlers are
/// installed here, before the manager says it listens: a signal that arrives right after
/// `listening on` must stop it, not kill it.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("cannot listen for SIGTERM/SIGINT ({e}); stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Human-readable lines on stderr; `RUST_LOG` overrides the level.
fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr (a log pipe whose reader died) must not panic the logger, and
        // with it whatever task logged.
        .log_internal_errors(false)
        .init();
}
