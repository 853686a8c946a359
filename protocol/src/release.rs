//! The release channel manifest and the pure checks every upgrader applies to it.
//!
//! A channel is a directory any static web server can serve: `channels/<name>.json` (this
//! manifest) with a minisign signature beside it, and `tar.gz` artifacts the manifest points
//! at by relative path, SHA-256 and size. The signature is checked by the upgrader (it owns
//! the trusted keys); everything that can be decided from the manifest's *content* alone —
//! expiry, replay, downgrade, skip list, artifact paths — lives here without I/O, so the
//! rules are one table that unit tests can walk and the release tool and upgrader cannot
//! drift apart.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Format version of the manifest; a newer upgrader still reads version 1.
pub const MANIFEST_SCHEMA: u32 = 1;

/// Largest manifest an upgrader downloads; a bigger one is refused unread.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// How far the host clock may be behind the newest `published_at` already accepted
/// before it counts as time going backwards (seconds).
pub const CLOCK_SKEW_ALLOWED: u64 = 300;

/// Name of the binary inside every release archive.
pub const BINARY_NAME: &str = "delegate";

/// `channels/<name>.json`: the release a channel currently offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default = "default_schema")]
    pub schema: u32,
    /// Channel this manifest was signed for; stops a signed `beta` manifest being served
    /// as `stable`.
    pub channel: String,
    pub version: String,
    /// Seconds since the Unix epoch. Never goes backwards for a channel (replay check).
    pub published_at: u64,
    /// Seconds since the Unix epoch; an upgrader refuses the manifest after this (freeze
    /// attacks: a mirror cannot keep serving an old release forever).
    pub expires_at: u64,
    /// Per Rust target triple (`x86_64-unknown-linux-gnu`, ...).
    pub artifacts: BTreeMap<String, Artifact>,
}

fn default_schema() -> u32 {
    MANIFEST_SCHEMA
}

/// One downloadable archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Relative to the release directory (the channel URL's base), e.g.
    /// `artifacts/0.2.0/delegate-0.2.0-x86_64-unknown-linux-gnu.tar.gz`.
    pub path: String,
    /// Lower-case hex SHA-256 of the archive.
    pub sha256: String,
    /// Exact size of the archive in bytes.
    pub size: u64,
}

/// Why a manifest (or the release it offers) is refused. Each variant names what an
/// operator needs to see in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error(
        "the host clock says {now}, earlier than the newest manifest already accepted from this channel (published at {last_seen}): time went backwards; fix the clock (NTP, `timedatectl`) before upgrading"
    )]
    ClockBehind { now: u64, last_seen: u64 },
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest schema {found} is newer than this upgrader understands ({MANIFEST_SCHEMA})")]
    Schema { found: u32 },
    #[error("manifest is for channel {found:?}, expected {expected:?}")]
    WrongChannel { expected: String, found: String },
    /// `reason` is semver's own words (its error type is neither `Clone` nor `Eq`, which
    /// this enum is so tests can compare it).
    #[error(
        "version {version:?} is not a semantic version ({reason}; expected MAJOR.MINOR.PATCH[-PRE])"
    )]
    BadVersion { version: String, reason: String },
    #[error(
        "manifest for {version} expired at {expires_at} (now {now}); the channel must be re-signed"
    )]
    Expired {
        version: String,
        expires_at: u64,
        now: u64,
    },
    #[error(
        "manifest for {version} was published at {published_at}, before the last one seen ({last_seen}); refusing a replayed manifest"
    )]
    Replayed {
        version: String,
        published_at: u64,
        last_seen: u64,
    },
    #[error(
        "manifest offers {offered}, older than the installed {current}; set `pinned_version = \"{offered}\"` to downgrade on purpose"
    )]
    Downgrade { current: String, offered: String },
    #[error(
        "version {0} is on the local skip list (it failed its health gate); `delegate-upgrader unskip {0}` allows it again"
    )]
    Skipped(String),
    #[error("manifest has no artifact for target {target} (it has: {available})")]
    NoArtifact { target: String, available: String },
    #[error("artifact path {0:?} must be relative and must not contain `..`")]
    BadPath(String),
    #[error("artifact sha256 {0:?} is not 64 hex digits")]
    BadDigest(String),
}

/// A release version: strict [semver](https://semver.org) (`MAJOR.MINOR.PATCH[-PRE][+BUILD]`),
/// parsed and ordered by the `semver` crate.
///
/// It is checked wherever a version enters (manifest, signed trusted comment, config pin,
/// CLI): besides ordering downgrades correctly, only semver characters (ASCII letters,
/// digits, `.`, `-`, `+`) can appear, so a version is always safe as the name of its
/// directory (`versions/<v>`): no `/`, no `..`, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(semver::Version);

impl FromStr for Version {
    type Err = ManifestError;

    fn from_str(s: &str) -> Result<Version, ManifestError> {
        semver::Version::parse(s)
            .map(Version)
            .map_err(|e| ManifestError::BadVersion {
                version: s.to_string(),
                reason: e.to_string(),
            })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the host knows when it judges a manifest.
#[derive(Debug, Clone, Default)]
pub struct Local<'a> {
    pub channel: &'a str,
    /// Seconds since the Unix epoch.
    pub now: u64,
    /// `published_at` of the last manifest accepted from this channel.
    pub last_seen_published_at: Option<u64>,
    /// Version `current` points at, if any.
    pub current: Option<&'a Version>,
    /// CAUTION: a pin allows a downgrade to exactly this version.
    pub pinned: Option<&'a Version>,
    pub skip: &'a [String],
}

/// What to do with a manifest that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Install this version.
    Install(Version),
    /// `current` already is the offered version.
    UpToDate(Version),
    /// A version is pinned and the channel offers another one: leave the host alone.
    NotPinned { pinned: Version, offered: Version },
}

impl Manifest {
    /// Parse a manifest's bytes (already signature-checked by the caller).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        if m.schema > MANIFEST_SCHEMA {
            return Err(ManifestError::Schema { found: m.schema });
        }
        m.parsed_version()?;
        for a in m.artifacts.values() {
            check_artifact(a)?;
        }
        Ok(m)
    }

    pub fn parsed_version(&self) -> Result<Version, ManifestError> {
        self.version.parse()
    }

    /// The freshness checks (channel, expiry, replay): independent of what is installed.
    pub fn check_fresh(&self, local: &Local<'_>) -> Result<(), ManifestError> {
        if self.channel != local.channel {
            return Err(ManifestError::WrongChannel {
                expected: local.channel.to_string(),
                found: self.channel.clone(),
            });
        }
        // Time going backwards (as TUF refuses it): with the clock set back, an expired
        // manifest would look fresh again. A few minutes of skew between the machine
        // that published and this host are not an attack (expiry is measured in days).
        if let Some(last) = local.last_seen_published_at
            && local.now.saturating_add(CLOCK_SKEW_ALLOWED) < last
        {
            return Err(ManifestError::ClockBehind {
                now: local.now,
                last_seen: last,
            });
        }
        if self.expires_at <= local.now {
            return Err(ManifestError::Expired {
                version: self.version.clone(),
                expires_at: self.expires_at,
                now: local.now,
            });
        }
        if let Some(last) = local.last_seen_published_at
            && self.published_at < last
        {
            return Err(ManifestError::Replayed {
                version: self.version.clone(),
                published_at: self.published_at,
                last_seen: last,
            });
        }
        Ok(())
    }

    /// Every check, then what to do. The order matters for the message an operator sees:
    /// a stale or replayed manifest is refused before anything about its version is said.
    pub fn decide(&self, local: &Local<'_>) -> Result<Decision, ManifestError> {
        self.check_fresh(local)?;
        let offered = self.parsed_version()?;
        decide_version(&offered, local)
    }

    /// The artifact for `target`.
    pub fn artifact(&self, target: &str) -> Result<&Artifact, ManifestError> {
        self.artifacts
            .get(target)
            .ok_or_else(|| ManifestError::NoArtifact {
                target: target.to_string(),
                available: self
                    .artifacts
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// The version rules shared by channel and offline installs: pin, up to date, skip list,
/// downgrade.
pub fn decide_version(offered: &Version, local: &Local<'_>) -> Result<Decision, ManifestError> {
    if let Some(pin) = local.pinned
        && pin != offered
    {
        return Ok(Decision::NotPinned {
            pinned: pin.clone(),
            offered: offered.clone(),
        });
    }
    if local.current == Some(offered) {
        return Ok(Decision::UpToDate(offered.clone()));
    }
    let offered_s = offered.to_string();
    if local.skip.contains(&offered_s) {
        return Err(ManifestError::Skipped(offered_s));
    }
    if let Some(cur) = local.current
        && offered < cur
        && local.pinned != Some(offered)
    {
        return Err(ManifestError::Downgrade {
            current: cur.to_string(),
            offered: offered_s,
        });
    }
    Ok(Decision::Install(offered.clone()))
}

/// Artifact paths stay inside the release directory; digests are well-formed.
pub fn check_artifact(a: &Artifact) -> Result<(), ManifestError> {
    let p = &a.path;
    if p.is_empty()
        || p.starts_with('/')
        || p.contains('\\')
        || p.contains("://")
        || p.split('/').any(|c| c == ".." || c.is_empty())
    {
        return Err(ManifestError::BadPath(p.clone()));
    }
    if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ManifestError::BadDigest(a.sha256.clone()));
    }
    Ok(())
}

/// Trusted comment a release signature carries, so the offline `install` knows which
/// version and target a signed archive holds: `delegate <version> <target>`.
pub fn artifact_trusted_comment(version: &str, target: &str) -> String {
    format!("{BINARY_NAME} {version} {target}")
}

/// Inverse of [`artifact_trusted_comment`].
pub fn parse_artifact_trusted_comment(c: &str) -> Option<(String, String)> {
    let mut it = c.split_whitespace();
    if it.next()? != BINARY_NAME {
        return None;
    }
    let v = it.next()?.to_string();
    let t = it.next()?.to_string();
    it.next().is_none().then_some((v, t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().expect("version")
    }

    fn manifest(version: &str) -> Manifest {
        let mut artifacts = BTreeMap::new();
        artifacts.insert(
            "x86_64-unknown-linux-gnu".to_string(),
            Artifact {
                path: format!("artifacts/{version}/delegate.tar.gz"),
                sha256: "a".repeat(64),
                size: 10,
            },
        );
        Manifest {
            schema: 1,
            channel: "stable".into(),
            version: version.into(),
            published_at: 1000,
            expires_at: 2000,
            artifacts,
        }
    }

    fn local<'a>(current: Option<&'a Version>, skip: &'a [String]) -> Local<'a> {
        Local {
            channel: "stable",
            now: 1500,
            last_seen_published_at: Some(900),
            current,
            pinned: None,
            skip,
        }
    }

    #[test]
    fn versions_order_like_semver() {
        assert!(v("0.2.0") > v("0.1.9"));
        assert!(v("1.0.0-rc.1") < v("1.0.0"));
        assert!(v("1.0.0-rc.2") < v("1.0.0-rc.10"));
        assert!(v("1.0.0-alpha") < v("1.0.0-alpha.1"));
        assert_eq!(v("1.2.3-rc.1+b7").to_string(), "1.2.3-rc.1+b7");
        for bad in [
            "1.2",
            "1.2.3.4",
            "1.2.x",
            "v1.2.3",
            "1.2.3/../x",
            "1.2.3-a/b",
            "../1.2.3",
            " 1.2.3",
            "1.2.3 ",
            "",
        ] {
            assert!(
                matches!(
                    bad.parse::<Version>(),
                    Err(ManifestError::BadVersion { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn a_clock_earlier_than_the_newest_manifest_seen_is_refused() {
        let cur = v("0.2.0");
        let mut l = local(Some(&cur), &[]);
        let mut m = manifest("0.3.0");
        m.published_at = 1000;
        m.expires_at = 100_000;
        l.last_seen_published_at = Some(1000);
        l.now = 1000 - CLOCK_SKEW_ALLOWED - 1;
        assert_eq!(
            m.check_fresh(&l),
            Err(ManifestError::ClockBehind {
                now: 1000 - CLOCK_SKEW_ALLOWED - 1,
                last_seen: 1000
            })
        );
        // Within the skew allowed, and later, it is accepted.
        l.now = 1000 - CLOCK_SKEW_ALLOWED;
        assert_eq!(m.check_fresh(&l), Ok(()));
        l.now = 1001;
        assert_eq!(m.check_fresh(&l), Ok(()));
    }

    #[test]
    fn every_refusal_has_its_variant() {
        let cur = v("0.2.0");
        let skip = vec!["0.3.0".to_string()];
        let mut l = local(Some(&cur), &skip);
        assert_eq!(
            manifest("0.3.1").decide(&l),
            Ok(Decision::Install(v("0.3.1")))
        );
        assert!(matches!(
            manifest("0.3.0").decide(&l),
            Err(ManifestError::Skipped(_))
        ));
        assert!(matches!(
            manifest("0.1.0").decide(&l),
            Err(ManifestError::Downgrade { .. })
        ));
        assert_eq!(
            manifest("0.2.0").decide(&l),
            Ok(Decision::UpToDate(v("0.2.0")))
        );
        l.now = 2000;
        assert!(matches!(
            manifest("0.3.1").decide(&l),
            Err(ManifestError::Expired { .. })
        ));
        l.now = 1500;
        l.last_seen_published_at = Some(1001);
        assert!(matches!(
            manifest("0.3.1").decide(&l),
            Err(ManifestError::Replayed { .. })
        ));
        l.last_seen_published_at = None;
        l.channel = "beta";
        assert!(matches!(
            manifest("0.3.1").decide(&l),
            Err(ManifestError::WrongChannel { .. })
        ));
    }

    #[test]
    fn a_pin_allows_exactly_one_downgrade() {
        let cur = v("0.2.0");
        let pin = v("0.1.0");
        let mut l = local(Some(&cur), &[]);
        l.pinned = Some(&pin);
        assert_eq!(
            manifest("0.1.0").decide(&l),
            Ok(Decision::Install(v("0.1.0")))
        );
        assert!(matches!(
            manifest("0.3.0").decide(&l),
            Ok(Decision::NotPinned { .. })
        ));
    }

    #[test]
    fn artifact_paths_stay_inside_the_release_directory() {
        let mut a = manifest("0.1.0").artifacts["x86_64-unknown-linux-gnu"].clone();
        for bad in ["/etc/passwd", "../x", "a/../../b", "http://x/y", "a//b", ""] {
            a.path = bad.into();
            assert!(
                matches!(check_artifact(&a), Err(ManifestError::BadPath(_))),
                "{bad}"
            );
        }
        a.path = "ok/x.tar.gz".into();
        a.sha256 = "zz".into();
        assert!(matches!(
            check_artifact(&a),
            Err(ManifestError::BadDigest(_))
        ));
    }

    #[test]
    fn manifest_round_trips_and_ignores_unknown_fields() {
        let m = manifest("0.1.0");
        let mut j = serde_json::to_value(&m).expect("json");
        j["future_field"] = serde_json::json!(1);
        let back = Manifest::parse(&serde_json::to_vec(&j).expect("bytes")).expect("parse");
        assert_eq!(back, m);
        j["schema"] = serde_json::json!(2);
        assert!(matches!(
            Manifest::parse(&serde_json::to_vec(&j).expect("bytes")),
            Err(ManifestError::Schema { found: 2 })
        ));
    }

    #[test]
    fn trusted_comment_round_trips() {
        let c = artifact_trusted_comment("0.2.0", "x86_64-unknown-linux-gnu");
        assert_eq!(
            parse_artifact_trusted_comment(&c),
            Some(("0.2.0".into(), "x86_64-unknown-linux-gnu".into()))
        );
        assert_eq!(parse_artifact_trusted_comment("other 1 2"), None);
    }
}
