//! The versions root on disk and the only ways it changes.
//!
//! ```text
//! <root>/versions/<version>/delegate     the binary (root-owned, 0755)
//! <root>/versions/<version>/complete     written last: the directory is whole
//! <root>/current  -> versions/<version>  what delegate.service runs
//! <root>/previous -> versions/<version>  kept until the next upgrade proves healthy
//! ```
//!
//! A version directory is built under a temporary name and renamed into place once its
//! `complete` marker is written; `current`/`previous` are replaced with `rename(2)` of a
//! freshly made link. So a crash at any point leaves `current` on a complete version, and
//! the leftovers (`.partial-*`, `.download-*`) are removed by the next run.

use std::io::Read;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use delegate_protocol::release::BINARY_NAME;

use crate::error::{UpgradeError, io};
use crate::state::sync_dir;

/// Largest binary accepted from an archive.
const MAX_BINARY_BYTES: u64 = 512 * 1024 * 1024;
const COMPLETE: &str = "complete";

pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_path_buf(),
        }
    }

    pub fn versions(&self) -> PathBuf {
        self.root.join("versions")
    }

    pub fn version_dir(&self, v: &str) -> PathBuf {
        self.versions().join(v)
    }

    pub fn binary(&self, v: &str) -> PathBuf {
        self.version_dir(v).join(BINARY_NAME)
    }

    pub fn is_complete(&self, v: &str) -> bool {
        self.version_dir(v).join(COMPLETE).is_file() && self.binary(v).is_file()
    }

    /// Version a link (`current`, `previous`) points at, if it exists and is complete.
    pub fn link(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.root.join(name)).ok()?;
        let v = target.file_name()?.to_string_lossy().into_owned();
        self.is_complete(&v).then_some(v)
    }

    pub fn current(&self) -> Option<String> {
        self.link("current")
    }

    pub fn previous(&self) -> Option<String> {
        self.link("previous")
    }

    /// Point `name` at `versions/<v>` (or remove it for `None`) with one `rename(2)`.
    pub fn set_link(&self, name: &str, v: Option<&str>) -> Result<(), UpgradeError> {
        let path = self.root.join(name);
        match v {
            Some(v) => {
                let tmp = self
                    .root
                    .join(format!(".{name}.new-{}", std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                symlink(Path::new("versions").join(v), &tmp).map_err(io(&tmp))?;
                std::fs::rename(&tmp, &path).map_err(io(&path))?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            },
        }
        sync_dir(&self.root)
    }

    /// Temp paths for a download and an unpack of `v`, on the same file system.
    pub fn download_path(&self, v: &str) -> PathBuf {
        self.versions()
            .join(format!(".download-{v}-{}.tar.gz", std::process::id()))
    }

    /// Unpack the `delegate` binary from `archive` into a fresh `versions/<v>`; the
    /// directory appears under its final name only with its binary and marker inside.
    /// `check` runs on the unpacked binary before the marker is written.
    pub fn install_archive(
        &self,
        v: &str,
        archive: &Path,
        check: impl FnOnce(&Path) -> Result<(), UpgradeError>,
    ) -> Result<PathBuf, UpgradeError> {
        let versions = self.versions();
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        let partial = versions.join(format!(".partial-{v}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir(&partial).map_err(io(&partial))?;
        let result = (|| {
            let bin = partial.join(BINARY_NAME);
            unpack_binary(archive, &bin)?;
            check(&bin)?;
            let marker = partial.join(COMPLETE);
            std::fs::write(&marker, format!("{v}\n")).map_err(io(&marker))?;
            std::fs::File::open(&marker)
                .and_then(|f| f.sync_all())
                .map_err(io(&marker))?;
            sync_dir(&partial)?;
            let dest = self.version_dir(v);
            if dest.exists() {
                // An incomplete leftover (complete ones are reused by the caller).
                std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
            }
            std::fs::rename(&partial, &dest).map_err(io(&dest))?;
            sync_dir(&versions)?;
            Ok(dest)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        result
    }

    /// Remove leftovers and every version that is neither `current` nor `previous`.
    /// Returns the versions removed.
    pub fn prune(&self) -> Result<Vec<String>, UpgradeError> {
        let keep = [self.current(), self.previous()];
        let versions = self.versions();
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&versions) else {
            return Ok(removed);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.iter().flatten().any(|k| *k == name) {
                continue;
            }
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(io(&p))?;
            if !name.starts_with('.') {
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// Free bytes for unprivileged writers on the versions file system.
    pub fn free_bytes(&self) -> Result<u64, UpgradeError> {
        let versions = self.versions();
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        let st = nix::sys::statvfs::statvfs(&versions)
            .map_err(|e| io(&versions)(std::io::Error::from(e)))?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }
}

/// Extract the single `delegate` entry of a tar.gz into `dest` (mode 0755).
fn unpack_binary(archive: &Path, dest: &Path) -> Result<(), UpgradeError> {
    let name = archive.display().to_string();
    let bad = |e: std::io::Error| UpgradeError::BadArchive {
        archive: name.clone(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in tar.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?.into_owned();
        let is_binary = path
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .map(|c| c.as_os_str().to_owned())
            .collect::<Vec<_>>()
            == [std::ffi::OsString::from(BINARY_NAME)];
        if !is_binary || !entry.header().entry_type().is_file() {
            continue;
        }
        let mut out = std::fs::File::create(dest).map_err(io(dest))?;
        let copied = std::io::copy(&mut entry.take(MAX_BINARY_BYTES + 1), &mut out).map_err(bad)?;
        if copied > MAX_BINARY_BYTES {
            return Err(UpgradeError::BadArchive {
                archive: name,
                reason: format!("the binary is larger than {MAX_BINARY_BYTES} bytes"),
            });
        }
        out.sync_all().map_err(io(dest))?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).map_err(io(dest))?;
        return Ok(());
    }
    Err(UpgradeError::MissingBinary { archive: name })
}

/// Run `<bin> version` (as `user` when we are root and one is named) and check it says
/// `expected`. Bounded: a binary that hangs fails the check.
pub fn check_version(bin: &Path, expected: &str, user: &str) -> Result<(), UpgradeError> {
    use std::os::unix::process::CommandExt;
    let failed = |reason: String| UpgradeError::BinaryFailed {
        path: bin.to_path_buf(),
        reason,
    };
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    if nix::unistd::geteuid().is_root() && !user.is_empty() {
        let u = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| failed(format!("user {user:?} (version_check_user) does not exist")))?;
        // std drops supplementary groups itself when root sets a uid.
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| failed(e.to_string()))? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed("`version` did not finish within 10s".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.by_ref().take(4096).read_to_string(&mut out);
    }
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.by_ref().take(4096).read_to_string(&mut err);
        }
        return Err(failed(format!("exited with {status}: {}", err.trim())));
    }
    let found = out.trim().to_string();
    if found != expected {
        return Err(UpgradeError::VersionMismatch {
            path: bin.to_path_buf(),
            expected: expected.to_string(),
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("a.tar.gz");
        let f = std::fs::File::create(&path).expect("create");
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            f,
            flate2::Compression::default(),
        ));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz");
        path
    }

    #[test]
    fn install_swap_and_prune() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&dir.path().join("root"));
        let script: &[u8] = b"#!/bin/sh\necho 1.0.0\n";
        for v in ["1.0.0", "1.1.0", "1.2.0"] {
            let a = archive(dir.path(), &[("README", b"x"), ("./delegate", script)]);
            l.install_archive(v, &a, |_| Ok(())).expect("install");
            assert!(l.is_complete(v));
        }
        l.set_link("current", Some("1.2.0")).expect("current");
        l.set_link("previous", Some("1.1.0")).expect("previous");
        assert_eq!(l.current().as_deref(), Some("1.2.0"));
        std::fs::create_dir_all(l.versions().join(".partial-9-1")).expect("leftover");
        assert_eq!(l.prune().expect("prune"), vec!["1.0.0".to_string()]);
        let left: Vec<_> = std::fs::read_dir(l.versions())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        let bin = l.binary("1.2.0");
        check_version(&bin, "1.0.0", "").expect("version");
        assert!(matches!(
            check_version(&bin, "2.0.0", ""),
            Err(UpgradeError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn archive_without_binary_and_failed_check_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&dir.path().join("root"));
        let a = archive(dir.path(), &[("bin/delegate", b"x"), ("other", b"y")]);
        assert!(matches!(
            l.install_archive("1.0.0", &a, |_| Ok(())),
            Err(UpgradeError::MissingBinary { .. })
        ));
        let a = archive(dir.path(), &[("delegate", b"x")]);
        let r = l.install_archive("1.0.0", &a, |p| {
            Err(UpgradeError::BinaryFailed {
                path: p.to_path_buf(),
                reason: "no".into(),
            })
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_dir(l.versions()).expect("ls").count(), 0);
    }
}
