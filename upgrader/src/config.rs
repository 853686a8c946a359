//! `/etc/delegate/upgrader.toml`: where releases come from and how careful to be.
//!
//! An operator edits this by hand, so every problem is reported with its file and line;
//! unknown keys are refused (a typo must not silently turn a safety off).

use std::path::{Path, PathBuf};
use std::time::Duration;

use delegate_protocol::release::Version;
use serde::Deserialize;
use toml::Spanned;

use crate::error::UpgradeError;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/delegate/upgrader.toml";
pub const DEFAULT_KEYS_DIR: &str = "/etc/delegate/keys.d";
pub const DEFAULT_ROOT: &str = "/var/lib/delegate-upgrader";
pub const DEFAULT_UNIT: &str = "delegate.service";
/// Target triple this upgrader was built for; it installs artifacts of that triple.
pub const BUILD_TARGET: &str = env!("DELEGATE_UPGRADER_TARGET");

/// How the agent's service is restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// systemd over D-Bus (`RestartUnit`), the production path.
    Systemd { unit: String },
    /// Test seam: a `delegate-upgrader supervise` process whose state file is here.
    Supervisor { state_file: PathBuf },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    pub enabled: bool,
    /// Base URL of the release directory (`http://`, `https://` or `file://`); the channel
    /// manifest is `<channel_url>/channels/<channel>.json`.
    pub channel_url: String,
    pub channel: String,
    pub drain_timeout: Duration,
    pub health_timeout: Duration,
    /// CAUTION: allows a downgrade to exactly this version, and holds the host there.
    pub pinned_version: Option<Version>,
    pub keys_dir: PathBuf,
    /// Versions root: `versions/<v>/delegate`, `current`, `previous`, `state.json`.
    pub root: PathBuf,
    pub service: ServiceKind,
    pub target: String,
    /// User that runs the new binary's `version` check when the upgrader is root; empty
    /// runs it as the upgrader's own user.
    pub version_check_user: String,
    /// Space that must stay free on the versions file system after unpacking.
    pub min_free_bytes: u64,
    /// How the running agent makes way for the new version.
    pub upgrade_mode: UpgradeMode,
}

/// How the running agent makes way for the new version (`upgrade_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpgradeMode {
    /// `Handover()`: the agent stops taking tasks, waits only for work a new agent cannot
    /// adopt (shell tasks it runs as its own children, http requests) and exits; shell
    /// tasks in `delegate-task@` units, containers and Kubernetes actions keep running
    /// and the new version adopts them. An upgrade takes seconds whatever runs. An agent
    /// without `Handover()` is drained.
    #[default]
    Handover,
    /// `Drain()`: wait (up to `drain_timeout`) until every running task has finished.
    Drain,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    enabled: Option<bool>,
    channel_url: Option<Spanned<String>>,
    channel: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    health_timeout: Option<Spanned<String>>,
    pinned_version: Option<Spanned<String>>,
    keys_dir: Option<PathBuf>,
    root: Option<PathBuf>,
    unit: Option<String>,
    supervisor_state: Option<PathBuf>,
    target: Option<String>,
    version_check_user: Option<String>,
    min_free_mb: Option<u64>,
    upgrade_mode: Option<Spanned<String>>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, UpgradeError> {
        let text = std::fs::read_to_string(path).map_err(|source| UpgradeError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, UpgradeError> {
        let problem = |offset: Option<usize>, message: String| UpgradeError::Config {
            path: path.to_path_buf(),
            line: offset.map(|o| delegate_host::line_of(text, o)),
            message,
        };
        let at = |span: std::ops::Range<usize>, msg: String| problem(Some(span.start), msg);
        let raw: Raw = toml::from_str(text)
            .map_err(|e| problem(e.span().map(|s| s.start), e.message().trim().to_string()))?;
        let channel_url = match raw.channel_url {
            Some(u) => {
                let s = u.get_ref().trim_end_matches('/').to_string();
                match url::Url::parse(&s) {
                    Ok(parsed)
                        if matches!(parsed.scheme(), "http" | "https" | "file")
                            && (parsed.scheme() == "file" || parsed.host().is_some()) =>
                    {
                        s
                    }
                    _ => {
                        return Err(at(
                            u.span(),
                            format!(
                                "channel_url {:?} is not a URL (expected http://, https:// or file://)",
                                u.get_ref()
                            ),
                        ));
                    }
                }
            }
            None => {
                return Err(problem(
                    None,
                    "channel_url is missing (the base URL of the release directory)".into(),
                ));
            }
        };
        let channel = match raw.channel {
            Some(c) => {
                let ok = !c.get_ref().is_empty()
                    && c.get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(at(
                        c.span(),
                        format!("channel {:?} must be letters, digits, - or _", c.get_ref()),
                    ));
                }
                c.into_inner()
            }
            None => "stable".to_string(),
        };
        let duration = |v: Option<Spanned<String>>, key: &str, default: u64| match v {
            None => Ok(Duration::from_secs(default)),
            Some(s) => humantime::parse_duration(s.get_ref()).map_err(|e| {
                at(
                    s.span(),
                    format!(
                        "{key} {:?} is not a duration ({e}; e.g. \"10m\")",
                        s.get_ref()
                    ),
                )
            }),
        };
        let drain_timeout = duration(raw.drain_timeout, "drain_timeout", 600)?;
        let health_timeout = duration(raw.health_timeout, "health_timeout", 120)?;
        let pinned_version = match raw.pinned_version {
            None => None,
            Some(p) if p.get_ref().is_empty() => None,
            Some(p) => Some(
                p.get_ref()
                    .parse::<Version>()
                    .map_err(|e| at(p.span(), e.to_string()))?,
            ),
        };
        let upgrade_mode = match raw.upgrade_mode {
            None => UpgradeMode::default(),
            Some(m) => match m.get_ref().as_str() {
                "handover" => UpgradeMode::Handover,
                "drain" => UpgradeMode::Drain,
                other => {
                    return Err(at(
                        m.span(),
                        format!("upgrade_mode {other:?} is not \"handover\" or \"drain\""),
                    ));
                }
            },
        };
        let service = match raw.supervisor_state {
            Some(state_file) => ServiceKind::Supervisor { state_file },
            None => ServiceKind::Systemd {
                unit: raw.unit.unwrap_or_else(|| DEFAULT_UNIT.to_string()),
            },
        };
        Ok(Config {
            path: path.to_path_buf(),
            enabled: raw.enabled.unwrap_or(true),
            channel_url,
            channel,
            drain_timeout,
            health_timeout,
            pinned_version,
            keys_dir: raw.keys_dir.unwrap_or_else(|| DEFAULT_KEYS_DIR.into()),
            root: raw.root.unwrap_or_else(|| DEFAULT_ROOT.into()),
            service,
            target: raw.target.unwrap_or_else(|| BUILD_TARGET.to_string()),
            version_check_user: raw.version_check_user.unwrap_or_else(|| "nobody".into()),
            min_free_bytes: raw.min_free_mb.unwrap_or(64).saturating_mul(1024 * 1024),
            upgrade_mode,
        })
    }

    pub fn manifest_url(&self) -> String {
        format!("{}/channels/{}.json", self.channel_url, self.channel)
    }

    pub fn artifact_url(&self, rel: &str) -> String {
        format!("{}/{rel}", self.channel_url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, UpgradeError> {
        Config::parse(Path::new("/etc/delegate/upgrader.toml"), t)
    }

    #[test]
    fn defaults_are_safe() {
        let c = parse("channel_url = \"https://r.example/delegate/\"\n").expect("config");
        assert_eq!(c.channel, "stable");
        assert_eq!(
            c.manifest_url(),
            "https://r.example/delegate/channels/stable.json"
        );
        assert_eq!(c.keys_dir, PathBuf::from(DEFAULT_KEYS_DIR));
        assert!(c.pinned_version.is_none());
        assert_eq!(
            c.service,
            ServiceKind::Systemd {
                unit: "delegate.service".into()
            }
        );
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse("channel = \"stable\"\nchannel_url = \"htp://x\"\n").expect_err("bad url");
        assert!(
            e.to_string()
                .starts_with("/etc/delegate/upgrader.toml:2: channel_url"),
            "{e}"
        );
        let e = parse("channel_url = \"http://x\"\n\nupgrade_mode = \"fast\"\n").expect_err("mode");
        assert!(e.to_string().contains(":3: upgrade_mode \"fast\""), "{e}");
        let e = parse("channel_url = \"http://x\"\n\ndrain_timeout = \"soon\"\n").expect_err("dur");
        assert!(e.to_string().contains(":3: drain_timeout"), "{e}");
        let e = parse("channel_url = \"http://x\"\nchanel = \"beta\"\n").expect_err("unknown");
        assert!(e.to_string().contains(":2:"), "{e}");
        let e = parse("channel_url = \"http://x\"\npinned_version = \"one\"\n").expect_err("pin");
        assert!(e.to_string().contains(":2:"), "{e}");
    }
}
