//! Every way an upgrade can fail, as one enum whose *class* tells the operator (and the
//! exit code, and the tests) what happens next: a refused release stays refused, a network
//! flake is retried by the next timer run, an unhealthy version was rolled back.
//!
//! Variants carry the path, URL or version involved, so a journald line is enough to act.

use std::path::PathBuf;

use delegate_protocol::release::ManifestError;

/// What the next run should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// The release is not trusted or not acceptable: nothing was installed; do not retry
    /// until the channel changes.
    Refused,
    /// Transient (network, server, bus): nothing changed; the next timer run retries.
    RetryLater,
    /// The new version failed its health gate and the previous one runs again.
    RolledBack,
    /// Something on this host needs an operator (permissions, a broken rollback, the clock).
    Local,
    /// The configuration is wrong (the file, or a channel the server does not have):
    /// retrying cannot help until an operator fixes it.
    Config,
}

impl Class {
    /// Process exit code: distinct per class so `systemctl status` and scripts can tell.
    pub fn exit_code(self) -> u8 {
        match self {
            Class::Refused => 2,
            Class::RetryLater => 75, // EX_TEMPFAIL
            Class::RolledBack => 3,
            Class::Local => 1,
            Class::Config => 78, // EX_CONFIG
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    // --- refused: trust -------------------------------------------------------------
    #[error(
        "no trusted release key in {dir}: installing nothing (fail closed); put the release public key there as *.pub"
    )]
    NoTrustedKeys { dir: PathBuf },
    #[error("{path}: not a minisign public key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: minisign_verify::Error,
    },
    #[error("{url}: signature does not verify with trusted key {key}; refusing")]
    BadSignature {
        url: String,
        key: PathBuf,
        #[source]
        source: minisign_verify::Error,
    },
    #[error("{url}: not a minisign signature; refusing")]
    MalformedSignature {
        url: String,
        #[source]
        source: minisign_verify::Error,
    },
    #[error(
        "{url}: the signature's trusted comment {comment:?} does not say `delegate <version> <target>` (not made by `delegate-release publish`); refusing"
    )]
    BadTrustedComment { url: String, comment: String },
    #[error("{url}: signed by a key that is not in {dir} (untrusted key); refusing")]
    UntrustedKey { url: String, dir: PathBuf },
    #[error("{url}")]
    Manifest {
        url: String,
        #[source]
        source: ManifestError,
    },
    // --- refused: artifact ----------------------------------------------------------
    #[error("{url}: SHA-256 is {actual}, the signed manifest says {expected}; refusing")]
    DigestMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: size is {actual} bytes, the signed manifest says {expected}; refusing")]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{archive}: archive holds no `delegate` binary")]
    MissingBinary { archive: String },
    #[error("{archive}: not a valid tar.gz")]
    BadArchive {
        archive: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{archive}: the `delegate` binary inside is larger than {limit} bytes; refusing")]
    BinaryTooLarge { archive: String, limit: u64 },
    #[error(
        "{path}: larger than {limit} bytes, too large for a release archive or signature; refusing"
    )]
    ArchiveTooLarge { path: PathBuf, limit: u64 },
    #[error("{path}: `version` printed {found:?}, expected {expected}")]
    VersionMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the new binary does not run (`version`): {reason}")]
    BinaryFailed { path: PathBuf, reason: String },
    #[error("{path}: cannot run the new binary")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: {available} bytes free, {needed} needed to unpack {version}; free some disk space"
    )]
    NotEnoughDisk {
        path: PathBuf,
        version: String,
        needed: u64,
        available: u64,
    },
    // --- configuration ----------------------------------------------------------------
    #[error(
        "{url}: the release server answered {status}: check channel_url and channel in the config (a {status} is not retried: the next run would get the same answer)"
    )]
    Rejected { url: String, status: u16 },
    // --- retry later ----------------------------------------------------------------
    #[error("{url}: cannot fetch (will retry on the next run)")]
    Network {
        url: String,
        #[source]
        source: NetworkError,
    },
    #[error(
        "{url}: download ended after {received} of {expected} bytes (truncated; will retry on the next run)"
    )]
    Truncated {
        url: String,
        expected: u64,
        received: u64,
    },
    #[error("system bus: {what} (will retry on the next run)")]
    Bus {
        what: String,
        #[source]
        source: Option<zbus::Error>,
    },
    #[error("{unit}: restart failed: {reason}")]
    Restart {
        unit: String,
        reason: String,
        #[source]
        source: Option<zbus::Error>,
    },
    // --- rolled back ----------------------------------------------------------------
    #[error(
        "{version} is unhealthy ({reason}); rolled back to {previous}, added {version} to the skip list"
    )]
    Unhealthy {
        version: String,
        previous: String,
        reason: String,
    },
    // --- local ----------------------------------------------------------------------
    #[error("{path}: cannot read the config (write one from the packaged example)")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Config {
        path: PathBuf,
        /// 1-based; `None` when the problem is not on one line (a missing key).
        line: Option<usize>,
        message: String,
    },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: state file is corrupt")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{root}: no `current` version is installed; install the delegate package first")]
    NotInstalled { root: PathBuf },
    #[error("{root}: no `previous` version to roll back to")]
    NoPrevious { root: PathBuf },
    #[error(
        "rolling back to {previous} failed too: {reason}; the agent may be down, see `journalctl -u delegate`"
    )]
    RollbackFailed { previous: String, reason: String },
    #[error(
        "rolling back to {back_to}: the restart failed; the next run retries the rollback (state.json records it); see `journalctl -u delegate`"
    )]
    RollbackRestart {
        back_to: String,
        #[source]
        source: Box<UpgradeError>,
    },
    #[error(transparent)]
    Transition(#[from] crate::state::TransitionError),
    #[error("another delegate-upgrader holds {path}")]
    Locked { path: PathBuf },
}

impl UpgradeError {
    pub fn class(&self) -> Class {
        use UpgradeError as E;
        match self {
            // The host's clock, not the release, is wrong.
            E::Manifest {
                source: ManifestError::ClockBehind { .. },
                ..
            } => Class::Local,
            E::Manifest { .. } => Class::Refused,
            E::NoTrustedKeys { .. }
            | E::BadKey { .. }
            | E::BadSignature { .. }
            | E::MalformedSignature { .. }
            | E::BadTrustedComment { .. }
            | E::UntrustedKey { .. }
            | E::DigestMismatch { .. }
            | E::SizeMismatch { .. }
            | E::MissingBinary { .. }
            | E::BadArchive { .. }
            | E::BinaryTooLarge { .. }
            | E::ArchiveTooLarge { .. }
            | E::VersionMismatch { .. }
            | E::BinaryFailed { .. }
            | E::Spawn { .. }
            | E::NotEnoughDisk { .. } => Class::Refused,
            E::Network { .. } | E::Truncated { .. } | E::Bus { .. } | E::Restart { .. } => {
                Class::RetryLater
            }
            E::Unhealthy { .. } => Class::RolledBack,
            E::ConfigRead { .. } | E::Config { .. } | E::Rejected { .. } => Class::Config,
            E::Io { .. }
            | E::State { .. }
            | E::NotInstalled { .. }
            | E::NoPrevious { .. }
            | E::RollbackFailed { .. }
            | E::RollbackRestart { .. }
            | E::Transition(_)
            | E::Locked { .. } => Class::Local,
        }
    }

    /// A stable, greppable name of the variant (`journalctl … UPGRADE_ERROR=…`, tests).
    pub fn code(&self) -> &'static str {
        use UpgradeError as E;
        match self {
            E::NoTrustedKeys { .. } => "no-trusted-keys",
            E::BadKey { .. } => "bad-key",
            E::BadSignature { .. } | E::MalformedSignature { .. } | E::BadTrustedComment { .. } => {
                "bad-signature"
            }
            E::UntrustedKey { .. } => "untrusted-key",
            E::Manifest { source, .. } => match source {
                ManifestError::ClockBehind { .. } => "clock-behind",
                ManifestError::Expired { .. } => "expired",
                ManifestError::Replayed { .. } => "replayed",
                ManifestError::Downgrade { .. } => "downgrade",
                ManifestError::Skipped(_) => "skipped",
                ManifestError::WrongChannel { .. } => "wrong-channel",
                ManifestError::NoArtifact { .. } => "no-artifact",
                _ => "bad-manifest",
            },
            E::DigestMismatch { .. } => "sha256-mismatch",
            E::SizeMismatch { .. } => "size-mismatch",
            E::MissingBinary { .. } => "missing-binary",
            E::BadArchive { .. } => "bad-archive",
            E::BinaryTooLarge { .. } => "binary-too-large",
            E::ArchiveTooLarge { .. } => "archive-too-large",
            E::VersionMismatch { .. } => "version-mismatch",
            E::BinaryFailed { .. } => "binary-failed",
            E::Spawn { .. } => "binary-failed",
            E::NotEnoughDisk { .. } => "not-enough-disk",
            E::Network { .. } => "network",
            E::Truncated { .. } => "truncated",
            E::Bus { .. } => "bus",
            E::Restart { .. } => "restart-failed",
            E::Unhealthy { .. } => "unhealthy",
            E::ConfigRead { .. } | E::Config { .. } => "config",
            E::Rejected { .. } => "channel-rejected",
            E::Io { .. } => "io",
            E::State { .. } => "state",
            E::NotInstalled { .. } => "not-installed",
            E::NoPrevious { .. } => "no-previous",
            E::RollbackFailed { .. } => "rollback-failed",
            E::RollbackRestart { .. } => "rollback-restart-failed",
            E::Transition(_) => "bad-transition",
            E::Locked { .. } => "locked",
        }
    }
}

/// Why a fetch failed (the cause of [`UpgradeError::Network`]).
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("request failed")]
    Request(#[source] reqwest::Error),
    #[error("the server answered {0}")]
    Status(reqwest::StatusCode),
    #[error("reading the body failed")]
    Body(#[source] reqwest::Error),
    #[error("cannot read the file")]
    File(#[source] std::io::Error),
    #[error("larger than {0} bytes")]
    TooLarge(u64),
}

/// The message of `e` and of every cause under it, each said once, joined with `: `
/// (what `{:#}` of an `anyhow::Error` prints), for the state file and `status`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `map_err` helper for I/O on a path.
pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let path = path.into();
    move |source| UpgradeError::Io { path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors once read "create directory X: Permission denied: create directory X:
    /// Permission denied": a variant's message must not repeat its source.
    #[test]
    fn a_cause_is_said_once() {
        let e = io("/var/lib/x")(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(chain(&e), "/var/lib/x: permission denied");
        let e = UpgradeError::Manifest {
            url: "http://r/channels/stable.json".into(),
            source: ManifestError::Skipped("0.2.0".into()),
        };
        let text = chain(&e);
        assert_eq!(
            text.matches("http://r/channels/stable.json").count(),
            1,
            "{text}"
        );
        assert_eq!(text.matches("skip list").count(), 1, "{text}");
    }
}
