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
    /// Something on this host needs an operator (config, permissions, a broken rollback).
    Local,
}

impl Class {
    /// Process exit code: distinct per class so `systemctl status` and scripts can tell.
    pub fn exit_code(self) -> u8 {
        match self {
            Class::Refused => 2,
            Class::RetryLater => 75, // EX_TEMPFAIL
            Class::RolledBack => 3,
            Class::Local => 1,
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
    #[error("{path}: not a minisign public key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{url}: signature does not verify with trusted key {key}: {reason}; refusing")]
    BadSignature {
        url: String,
        key: PathBuf,
        reason: String,
    },
    #[error("{url}: signed by a key that is not in {dir} (untrusted key); refusing")]
    UntrustedKey { url: String, dir: PathBuf },
    #[error("{url}: {source}")]
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
    #[error("{archive}: not a valid tar.gz: {reason}")]
    BadArchive { archive: String, reason: String },
    #[error("{path}: `version` printed {found:?}, expected {expected}")]
    VersionMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the new binary does not run (`version`): {reason}")]
    BinaryFailed { path: PathBuf, reason: String },
    #[error(
        "{path}: {available} bytes free, {needed} needed to unpack {version}; free some disk space"
    )]
    NotEnoughDisk {
        path: PathBuf,
        version: String,
        needed: u64,
        available: u64,
    },
    // --- retry later ----------------------------------------------------------------
    #[error("{url}: {reason} (will retry on the next run)")]
    Network { url: String, reason: String },
    #[error(
        "{url}: download ended after {received} of {expected} bytes (truncated; will retry on the next run)"
    )]
    Truncated {
        url: String,
        expected: u64,
        received: u64,
    },
    #[error("cannot reach the system bus or systemd: {0} (will retry on the next run)")]
    Bus(String),
    #[error("{unit}: restart failed: {reason}")]
    Restart { unit: String, reason: String },
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
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: state file is corrupt: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("{root}: no `current` version is installed; install the delegate package first")]
    NotInstalled { root: PathBuf },
    #[error("{root}: no `previous` version to roll back to")]
    NoPrevious { root: PathBuf },
    #[error(
        "rolling back to {previous} failed too: {reason}; the agent may be down, see `journalctl -u delegate`"
    )]
    RollbackFailed { previous: String, reason: String },
    #[error("another delegate-upgrader holds {path}")]
    Locked { path: PathBuf },
    #[error("signing failed: {0}")]
    Sign(String),
}

impl UpgradeError {
    pub fn class(&self) -> Class {
        use UpgradeError as E;
        match self {
            E::NoTrustedKeys { .. }
            | E::BadKey { .. }
            | E::BadSignature { .. }
            | E::UntrustedKey { .. }
            | E::Manifest { .. }
            | E::DigestMismatch { .. }
            | E::SizeMismatch { .. }
            | E::MissingBinary { .. }
            | E::BadArchive { .. }
            | E::VersionMismatch { .. }
            | E::BinaryFailed { .. }
            | E::NotEnoughDisk { .. } => Class::Refused,
            E::Network { .. } | E::Truncated { .. } | E::Bus(_) | E::Restart { .. } => {
                Class::RetryLater
            }
            E::Unhealthy { .. } => Class::RolledBack,
            E::Config(_)
            | E::Io { .. }
            | E::State { .. }
            | E::NotInstalled { .. }
            | E::NoPrevious { .. }
            | E::RollbackFailed { .. }
            | E::Locked { .. }
            | E::Sign(_) => Class::Local,
        }
    }

    /// A stable, greppable name of the variant (`journalctl … UPGRADE_ERROR=…`, tests).
    pub fn code(&self) -> &'static str {
        use UpgradeError as E;
        match self {
            E::NoTrustedKeys { .. } => "no-trusted-keys",
            E::BadKey { .. } => "bad-key",
            E::BadSignature { .. } => "bad-signature",
            E::UntrustedKey { .. } => "untrusted-key",
            E::Manifest { source, .. } => match source {
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
            E::VersionMismatch { .. } => "version-mismatch",
            E::BinaryFailed { .. } => "binary-failed",
            E::NotEnoughDisk { .. } => "not-enough-disk",
            E::Network { .. } => "network",
            E::Truncated { .. } => "truncated",
            E::Bus(_) => "bus",
            E::Restart { .. } => "restart-failed",
            E::Unhealthy { .. } => "unhealthy",
            E::Config(_) => "config",
            E::Io { .. } => "io",
            E::State { .. } => "state",
            E::NotInstalled { .. } => "not-installed",
            E::NoPrevious { .. } => "no-previous",
            E::RollbackFailed { .. } => "rollback-failed",
            E::Locked { .. } => "locked",
            E::Sign(_) => "sign",
        }
    }
}

/// `map_err` helper for I/O on a path.
pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> UpgradeError {
    let path = path.into();
    move |source| UpgradeError::Io { path, source }
}
