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
use sha2::{Digest, Sha256};

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

    /// Is `versions/<v>` the unpacked form of the signed archive whose SHA-256 is
    /// `archive_sha256`, unchanged since? Its marker must name that archive digest and
    /// the binary must still hash to the digest recorded when it was unpacked. A
    /// directory without such a marker (an older upgrader, a package install, a tampered
    /// one) is never reused: it is unpacked again from verified bytes.
    pub fn verified_complete(&self, v: &str, archive_sha256: &str) -> Result<Reuse, UpgradeError> {
        if !self.is_complete(v) {
            return Ok(Reuse::Absent);
        }
        let marker_path = self.version_dir(v).join(COMPLETE);
        let text = std::fs::read_to_string(&marker_path).map_err(io(&marker_path))?;
        let Some(marker) = Marker::parse(&text) else {
            return Ok(Reuse::Mismatch(
                "its `complete` marker records no SHA-256 (made by an older upgrader or by hand)"
                    .into(),
            ));
        };
        if marker.version != v || !marker.archive_sha256.eq_ignore_ascii_case(archive_sha256) {
            return Ok(Reuse::Mismatch(format!(
                "it was unpacked from archive {} (version {}), not from the signed {archive_sha256}",
                marker.archive_sha256, marker.version
            )));
        }
        let bin = self.binary(v);
        let actual = sha256_file(&bin)?;
        if !actual.eq_ignore_ascii_case(&marker.binary_sha256) {
            return Ok(Reuse::Mismatch(format!(
                "{} hashes to {actual}, the marker recorded {} (changed after unpacking)",
                bin.display(),
                marker.binary_sha256
            )));
        }
        Ok(Reuse::Verified)
    }

    /// Unpack the `delegate` binary from the verified archive `archive` (bytes in memory,
    /// the very bytes whose signature or digest was checked) into `versions/.partial-…`.
    /// The caller checks [`Partial::binary`] and then [`Partial::commit`]s it; dropped
    /// uncommitted, the partial directory is removed. `name` names the archive in errors.
    pub fn unpack(&self, v: &str, name: &str, archive: &[u8]) -> Result<Partial, UpgradeError> {
        let versions = self.versions();
        std::fs::create_dir_all(&versions).map_err(io(&versions))?;
        let dir = versions.join(format!(".partial-{v}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io(&dir))?;
        let binary_sha256 = match unpack_binary(name, archive, &dir.join(BINARY_NAME)) {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(Partial {
            dir,
            dest: self.version_dir(v),
            marker: Marker {
                version: v.to_string(),
                archive_sha256: hex::encode(Sha256::digest(archive)),
                binary_sha256,
            },
        })
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

/// A version unpacked under a temporary name, not yet `complete`.
pub struct Partial {
    dir: PathBuf,
    dest: PathBuf,
    marker: Marker,
}

impl Partial {
    pub fn binary(&self) -> PathBuf {
        self.dir.join(BINARY_NAME)
    }

    /// Write the `complete` marker and rename the directory to `versions/<v>`: it appears
    /// under its final name only whole.
    pub fn commit(mut self) -> Result<PathBuf, UpgradeError> {
        let marker_path = self.dir.join(COMPLETE);
        crate::state::write_atomic(&marker_path, self.marker.render().as_bytes())?;
        sync_dir(&self.dir)?;
        if self.dest.exists() {
            // An incomplete or unverifiable leftover (verified ones are reused).
            std::fs::remove_dir_all(&self.dest).map_err(io(&self.dest))?;
        }
        std::fs::rename(&self.dir, &self.dest).map_err(io(&self.dest))?;
        if let Some(versions) = self.dest.parent() {
            sync_dir(versions)?;
        }
        // Renamed: nothing left for Drop to remove.
        self.dir = PathBuf::new();
        Ok(self.dest.clone())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether a complete version directory may be reused for a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reuse {
    /// No complete directory: unpack.
    Absent,
    /// Unpacked from this very archive and unchanged since: reuse.
    Verified,
    /// Present but not provably this release (why): unpack again.
    Mismatch(String),
}

/// The `complete` marker: which signed archive the directory came from, and what its
/// binary hashed to when it was unpacked.
///
/// Both digests are kept because each answers a different question on reuse: the archive
/// digest is the one the signature covers (the manifest's `sha256`, or the digest of the
/// signed offline archive), so it ties the directory to *this* release; the binary digest
/// is what can be re-checked without keeping the archive, so it shows the binary was not
/// changed after it was unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Marker {
    version: String,
    archive_sha256: String,
    binary_sha256: String,
}

impl Marker {
    fn render(&self) -> String {
        format!(
            "version {}\narchive-sha256 {}\nbinary-sha256 {}\n",
            self.version, self.archive_sha256, self.binary_sha256
        )
    }

    fn parse(text: &str) -> Option<Marker> {
        let mut version = None;
        let mut archive = None;
        let mut binary = None;
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("version", v)) => version = Some(v.trim().to_string()),
                Some(("archive-sha256", h)) => archive = Some(h.trim().to_string()),
                Some(("binary-sha256", h)) => binary = Some(h.trim().to_string()),
                _ => {}
            }
        }
        Some(Marker {
            version: version?,
            archive_sha256: archive?,
            binary_sha256: binary?,
        })
    }
}

fn sha256_file(path: &Path) -> Result<String, UpgradeError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io(path))?;
    Ok(hex::encode(h.finalize()))
}

/// Extract the single `delegate` entry of the tar.gz `archive` into `dest` (mode 0755,
/// written under a temporary name, synced, closed, then renamed: nothing holds the final
/// path open for writing when it is run). Returns the binary's SHA-256.
fn unpack_binary(name: &str, archive: &[u8], dest: &Path) -> Result<String, UpgradeError> {
    let bad = |e: std::io::Error| UpgradeError::BadArchive {
        archive: name.to_string(),
        source: e,
    };
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
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
        let tmp = dest.with_extension("tmp");
        let written =
            write_executable(&tmp, &mut entry.take(MAX_BINARY_BYTES + 1)).map_err(|e| match e {
                WriteError::Read(e) => bad(e),
                WriteError::Write(e) => io(&tmp)(e),
            });
        let (copied, digest) = match written {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if copied > MAX_BINARY_BYTES {
            let _ = std::fs::remove_file(&tmp);
            return Err(UpgradeError::BinaryTooLarge {
                archive: name.to_string(),
                limit: MAX_BINARY_BYTES,
            });
        }
        std::fs::rename(&tmp, dest).map_err(io(dest))?;
        return Ok(digest);
    }
    Err(UpgradeError::MissingBinary {
        archive: name.to_string(),
    })
}

enum WriteError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copy `src` into a new file `path` (0755), hashing it, then fsync and close it.
fn write_executable(path: &Path, src: &mut impl Read) -> Result<(u64, String), WriteError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)
        .map_err(WriteError::Write)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n: u64 = 0;
    loop {
        let k = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WriteError::Read(e)),
        };
        h.update(&buf[..k]);
        out.write_all(&buf[..k]).map_err(WriteError::Write)?;
        n += k as u64;
    }
    out.sync_all().map_err(WriteError::Write)?;
    // umask may have narrowed the mode given at creation.
    out.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(WriteError::Write)?;
    drop(out);
    Ok((n, hex::encode(h.finalize())))
}

/// How long the new binary's `version` may take.
const VERSION_CHECK_LIMIT: Duration = Duration::from_secs(10);
/// Most output read from `version` (it prints one line).
const VERSION_OUTPUT_LIMIT: u64 = 64 * 1024;

/// Run `<bin> version` (as `user` when we are root and one is named) and check it says
/// `expected`. Bounded: a binary that hangs, or fills its pipe, fails the check.
pub async fn check_version(bin: &Path, expected: &str, user: &str) -> Result<(), UpgradeError> {
    use tokio::io::AsyncReadExt;
    let failed = |reason: String| UpgradeError::BinaryFailed {
        path: bin.to_path_buf(),
        reason,
    };
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .kill_on_drop(true);
    if nix::unistd::geteuid().is_root() && !user.is_empty() {
        let u = nix::unistd::User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| failed(format!("user {user:?} (version_check_user) does not exist")))?;
        // std drops supplementary groups itself when root sets a uid.
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let mut child = crate::spawn::retry_busy(|| cmd.spawn())
        .await
        .map_err(|source| UpgradeError::Spawn {
            path: bin.to_path_buf(),
            source,
        })?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(failed("no pipes to the child".into()));
    };
    // Keep the first bytes of each stream and drain the rest: a child blocked on a full
    // pipe would never exit.
    async fn keep_head(mut r: impl tokio::io::AsyncRead + Unpin) -> std::io::Result<Vec<u8>> {
        let mut head = Vec::new();
        (&mut r)
            .take(VERSION_OUTPUT_LIMIT)
            .read_to_end(&mut head)
            .await?;
        tokio::io::copy(&mut r, &mut tokio::io::sink()).await?;
        Ok(head)
    }
    let run = async {
        let (out, err) = tokio::try_join!(keep_head(stdout), keep_head(stderr))?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let (status, out, err) = match tokio::time::timeout(VERSION_CHECK_LIMIT, run).await {
        Ok(r) => r.map_err(|source| UpgradeError::Spawn {
            path: bin.to_path_buf(),
            source,
        })?,
        // Dropping `run` drops the child: kill_on_drop stops it.
        Err(_) => {
            return Err(failed(format!(
                "`version` did not finish within {VERSION_CHECK_LIMIT:?}"
            )));
        }
    };
    if !status.success() {
        let err = String::from_utf8_lossy(&err);
        return Err(failed(format!("exited with {status}: {}", err.trim())));
    }
    let found = String::from_utf8_lossy(&out).trim().to_string();
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

    fn archive(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_cksum();
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    fn digest(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn install(l: &Layout, v: &str, a: &[u8]) -> Result<PathBuf, UpgradeError> {
        l.unpack(v, "a.tar.gz", a)?.commit()
    }

    #[tokio::test]
    async fn install_swap_and_prune() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&dir.path().join("root"));
        let script: &[u8] = b"#!/bin/sh\necho 1.0.0\n";
        for v in ["1.0.0", "1.1.0", "1.2.0"] {
            let a = archive(&[("README", b"x"), ("./delegate", script)]);
            install(&l, v, &a).expect("install");
            assert!(l.is_complete(v));
            assert_eq!(
                l.verified_complete(v, &digest(&a)).expect("reuse"),
                Reuse::Verified
            );
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
        check_version(&bin, "1.0.0", "").await.expect("version");
        assert!(matches!(
            check_version(&bin, "2.0.0", "").await,
            Err(UpgradeError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn a_complete_directory_is_reused_only_when_its_digests_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&dir.path().join("root"));
        let a = archive(&[("delegate", b"#!/bin/sh\necho 1.0.0\n")]);
        assert_eq!(
            l.verified_complete("1.0.0", &digest(&a)).expect("absent"),
            Reuse::Absent
        );
        install(&l, "1.0.0", &a).expect("install");
        // Another archive claiming the same version.
        let other = archive(&[("delegate", b"#!/bin/sh\necho other\n")]);
        assert!(matches!(
            l.verified_complete("1.0.0", &digest(&other))
                .expect("other"),
            Reuse::Mismatch(_)
        ));
        // The binary changed after unpacking.
        std::fs::write(l.binary("1.0.0"), b"#!/bin/sh\necho evil\n").expect("tamper");
        match l.verified_complete("1.0.0", &digest(&a)).expect("tampered") {
            Reuse::Mismatch(why) => assert!(why.contains("changed after unpacking"), "{why}"),
            r => panic!("tampered binary reused: {r:?}"),
        }
        // A marker without digests (older upgrader, package) is not trusted either.
        std::fs::write(l.version_dir("1.0.0").join(COMPLETE), "1.0.0\n").expect("old marker");
        assert!(matches!(
            l.verified_complete("1.0.0", &digest(&a)).expect("old"),
            Reuse::Mismatch(_)
        ));
    }

    #[test]
    fn archive_without_binary_and_an_uncommitted_unpack_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Layout::new(&dir.path().join("root"));
        let a = archive(&[("bin/delegate", b"x"), ("other", b"y")]);
        assert!(matches!(
            install(&l, "1.0.0", &a),
            Err(UpgradeError::MissingBinary { .. })
        ));
        assert!(matches!(
            install(&l, "1.0.0", b"not gzip"),
            Err(UpgradeError::BadArchive { .. })
        ));
        let a = archive(&[("delegate", b"x")]);
        let partial = l.unpack("1.0.0", "a", &a).expect("unpack");
        assert!(partial.binary().is_file());
        drop(partial); // the check failed: never committed
        assert_eq!(std::fs::read_dir(l.versions()).expect("ls").count(), 0);
    }

    /// A version check that polled for the exit without reading the pipes hung until the
    /// time limit when the binary wrote more than a pipe holds before exiting.
    #[tokio::test]
    async fn a_version_check_that_writes_more_than_a_pipe_holds_still_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chatty = dir.path().join("chatty");
        std::fs::write(
            &chatty,
            "#!/bin/sh\nhead -c 300000 /dev/zero >&2\necho 0.1.0\n",
        )
        .expect("write");
        std::fs::set_permissions(&chatty, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let start = std::time::Instant::now();
        check_version(&chatty, "0.1.0", "").await.expect("version");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_version_check_that_floods_its_pipe_forever_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let flood = dir.path().join("flood");
        std::fs::write(&flood, "#!/bin/sh\nyes 0.1.0\n").expect("write");
        std::fs::set_permissions(&flood, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let start = std::time::Instant::now();
        let r = check_version(&flood, "0.1.0", "").await;
        assert!(matches!(r, Err(UpgradeError::BinaryFailed { .. })), "{r:?}");
        assert!(start.elapsed() < VERSION_CHECK_LIMIT + Duration::from_secs(5));
    }
}
