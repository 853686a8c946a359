//! `delegate-release`: make a signing key, sign a file, publish a built agent on a channel.
//! Runs where releases are built; hosts only verify (`delegate-upgrader`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use delegate_release::{BUILD_TARGET, PASSPHRASE_ENV, Publish, Signer};

#[derive(Parser)]
#[command(
    name = "delegate-release",
    version,
    about = "Release tooling for delegate: signing keys, signatures, channel manifests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a minisign key pair `<out>/<name>.pub` + `<out>/<name>.key`.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "delegate-release")]
        name: String,
        /// Store the secret key unencrypted (otherwise the passphrase comes from
        /// DELEGATE_KEY_PASSPHRASE).
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Sign a file into FILE.minisig.
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long, default_value = "")]
        trusted_comment: String,
    },
    /// Pack a built binary, add it to a channel and sign the manifest.
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
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delegate-release: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let passphrase = || std::env::var(PASSPHRASE_ENV).ok();
    match cli.command {
        Command::Keygen {
            out,
            name,
            no_passphrase,
        } => {
            let pass = if no_passphrase { None } else { passphrase() };
            if !no_passphrase && pass.is_none() {
                anyhow::bail!(
                    "set {PASSPHRASE_ENV} to protect the secret key, or pass --no-passphrase"
                );
            }
            let (pk, sk) = delegate_release::keygen(&out, &name, pass)?;
            println!("public key: {}\nsecret key: {}", pk.display(), sk.display());
        }
        Command::Sign {
            file,
            key,
            trusted_comment,
        } => {
            let signer = Signer::load(&key, passphrase())?;
            let out = signer.sign_file(&file, &trusted_comment)?;
            println!("{}", out.display());
        }
        Command::Publish {
            releases,
            channel,
            binary,
            key,
            target,
            expires_in,
        } => {
            let signer = Signer::load(&key, passphrase())?;
            let p = delegate_release::publish(
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
        }
    }
    Ok(())
}
