//! What the upgrader remembers between runs, in `<root>/state.json`.
//!
//! The replay check needs the last manifest seen, the skip list needs to outlive a
//! rollback, and a run killed half-way needs to know what it was doing. Changes are made
//! in memory and committed with [`State::write`], which is atomic (temp file in the same
//! directory, fsync, rename, fsync of the directory) so a crash leaves the old or the new
//! state, never half of one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{UpgradeError, io};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Per channel: the newest manifest accepted (replay protection).
    #[serde(default)]
    pub last_seen: BTreeMap<String, Seen>,
    #[serde(default)]
    pub last_check: Option<Check>,
    /// Versions that failed their health gate (or were rolled back by hand).
    #[serde(default)]
    pub skip: Vec<String>,
    /// Set from the drain until the health gate passed: a run killed in between finds it.
    #[serde(default)]
    pub in_progress: Option<InProgress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub version: String,
    pub published_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `installed`, `up-to-date`, `disabled`, or an error code (`bad-signature`, ...).
    pub outcome: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    pub from: Option<String>,
    pub to: String,
    /// What `previous` pointed at before the swap, restored on rollback.
    pub previous_before: Option<String>,
}

impl State {
    pub fn path(root: &Path) -> PathBuf {
        root.join("state.json")
    }

    /// Missing file → empty state (first run).
    pub fn load(root: &Path) -> Result<State, UpgradeError> {
        let path = State::path(root);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| UpgradeError::State {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(path)(e)),
        }
    }

    pub fn write(&self, root: &Path) -> Result<(), UpgradeError> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| UpgradeError::State {
            path: State::path(root),
            reason: e.to_string(),
        })?;
        write_atomic(&State::path(root), &bytes)
    }

    pub fn skip(&mut self, version: &str) {
        if !self.skip.iter().any(|v| v == version) {
            self.skip.push(version.to_string());
        }
    }

    pub fn unskip(&mut self, version: &str) -> bool {
        let before = self.skip.len();
        self.skip.retain(|v| v != version);
        before != self.skip.len()
    }
}

/// Temp file beside `path`, fsync, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), UpgradeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<(), UpgradeError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(State::load(dir.path()).expect("empty"), State::default());
        let mut s = State::default();
        s.skip("0.3.0");
        s.skip("0.3.0");
        s.last_seen.insert(
            "stable".into(),
            Seen {
                version: "0.2.0".into(),
                published_at: 7,
            },
        );
        s.write(dir.path()).expect("write");
        assert_eq!(State::load(dir.path()).expect("load"), s);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        assert!(s.unskip("0.3.0"));
        assert!(s.skip.is_empty());
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(State::path(dir.path()), b"{").expect("write");
        assert!(matches!(
            State::load(dir.path()),
            Err(UpgradeError::State { .. })
        ));
    }
}
