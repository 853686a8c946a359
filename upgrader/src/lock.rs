//! One upgrader at a time: an exclusive `flock` on `<root>/upgrader.lock`.
//!
//! A second upgrader (a timer run overlapping a manual `run`) *waits* for the first,
//! bounded by a timeout, and then goes on: by then the first has finished, so the second
//! usually finds nothing to do. Waiting rather than failing keeps an operator's manual
//! `run` from exiting non-zero just because the timer fired. The kernel drops the lock
//! when the holder dies, so a killed upgrader never leaves a stale lock.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{UpgradeError, io};

pub struct Lock {
    _flock: Flock<File>,
}

impl Lock {
    /// Take the lock, waiting at most `limit` (polling; `flock` itself has no timeout).
    pub fn acquire(root: &Path, limit: Duration) -> Result<Lock, UpgradeError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let path: PathBuf = root.join("upgrader.lock");
        let start = Instant::now();
        let mut announced = false;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io(&path))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(Lock { _flock: l }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    if !announced {
                        tracing::info!(
                            "another delegate-upgrader is running ({}); waiting up to {limit:?}",
                            path.display()
                        );
                        announced = true;
                    }
                    if start.elapsed() >= limit {
                        return Err(UpgradeError::Locked { path });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err((_, e)) => return Err(io(&path)(std::io::Error::from(e))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_waits_then_gives_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Lock::acquire(dir.path(), Duration::from_secs(1)).expect("first");
        let second = Lock::acquire(dir.path(), Duration::from_millis(300));
        assert!(matches!(second, Err(UpgradeError::Locked { .. })));
        drop(first);
        Lock::acquire(dir.path(), Duration::from_millis(300)).expect("after release");
    }
}
