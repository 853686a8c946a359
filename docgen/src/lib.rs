//! Man pages and shell completions generated from the clap definitions, so the packaged
//! docs never drift from the binary. One copy for the agent, the manager and the upgrader:
//! each calls [`from_args`] first thing in `main`. Only `BINARY generate-docs DIR` (run by
//! `scripts/packages`) does anything here; nothing on a hot path does.

#![forbid(unsafe_code)]

use std::path::Path;

use clap_complete::Shell;

/// Write `<name>.1` (and `<name>-<sub>.1` per visible subcommand) into `dir/man1`, and
/// completions into `dir/completions/{bash,zsh,fish}`.
pub fn generate(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    // `help` subcommands would each get a page saying what --help says.
    let mut cmd = without_help_subcommands(cmd);
    cmd.build();
    let name = cmd.get_name().to_string();
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let out = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&out)?;
        clap_complete::generate_to(shell, &mut cmd, &name, &out)?;
    }
    Ok(())
}

fn without_help_subcommands(cmd: clap::Command) -> clap::Command {
    cmd.disable_help_subcommand(true)
        .mut_subcommands(without_help_subcommands)
}

/// `BINARY generate-docs DIR`, checked before clap parses, for the binaries that do not
/// list it as a (hidden) subcommand. `None`: not asked for, parse as usual.
pub fn from_args(command: impl FnOnce() -> clap::Command) -> Option<std::process::ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != "generate-docs" {
        return None;
    }
    let dir = std::path::PathBuf::from(args.next()?);
    Some(match generate(command(), &dir) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("generate-docs: {}: {e}", dir.display());
            std::process::ExitCode::FAILURE
        }
    })
}
