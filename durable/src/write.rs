//! Atomic replacement of a file: temp file beside it, write, fsync, rename, fsync the
//! directory. The temp file's name is hidden and carries the pid, so two writers (an old
//! and a new process during an upgrade) never share one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What a completed write survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A crash of the writing process (the page cache is the kernel's), not the host
    /// losing power before writeback. No fsync: for records written once per task, where
    /// an fsync each would cost throughput and a lost record is recovered otherwise.
    ProcessCrash,
    /// Also power loss: the file is fsynced before the rename, the directory after it.
    PowerLoss,
}

/// How [`write_atomic_with`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOptions {
    /// Mode of the new file (before the umask).
    pub mode: u32,
    pub durability: Durability,
}

impl Default for WriteOptions {
    /// Mode 0666 less the umask (as `File::create`), surviving power loss.
    fn default() -> WriteOptions {
        WriteOptions {
            mode: 0o666,
            durability: Durability::PowerLoss,
        }
    }
}

/// A step of a write that failed, with the file it failed on.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}", path.display())]
pub struct WriteError {
    /// `create`, `write`, `fsync`, `rename` or `fsync directory`.
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Replace `path` with `bytes` so that it survives power loss (see [`WriteOptions::default`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    write_atomic_with(path, bytes, WriteOptions::default())
}

/// Replace `path` with `bytes`: readers see the old or the new content, never a part.
pub fn write_atomic_with(path: &Path, bytes: &[u8], opts: WriteOptions) -> Result<(), WriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(opts.mode)
            .open(&tmp)
            .map_err(err("create", &tmp))?;
        f.write_all(bytes).map_err(err("write", &tmp))?;
        if opts.durability == Durability::PowerLoss {
            f.sync_all().map_err(err("fsync", &tmp))?;
        }
        drop(f);
        std::fs::rename(&tmp, path).map_err(err("rename", path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    if opts.durability == Durability::PowerLoss {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsync a directory, so the names created, renamed or removed in it are on disk.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").expect("first");
        write_atomic(&p, b"two").expect("second");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        assert_eq!(names(dir.path()), ["state.json"]);
    }

    #[test]
    fn the_mode_is_the_one_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("record");
        let opts = WriteOptions {
            mode: 0o600,
            durability: Durability::ProcessCrash,
        };
        write_atomic_with(&p, b"x", opts).expect("write");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_failed_write_names_its_step_and_file_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Renaming a file over a non-empty directory fails after the temp file is written.
        let p = dir.path().join("taken");
        std::fs::create_dir(&p).expect("mkdir");
        std::fs::write(p.join("inside"), b"").expect("fill");
        let e = write_atomic(&p, b"x").expect_err("rename over a directory");
        assert_eq!(e.op, "rename");
        assert_eq!(e.path, p);
        assert_eq!(names(dir.path()), ["taken"]);
    }
}
