//! Running a binary that was just written, without the "Text file busy" race.
//!
//! `execve` fails with `ETXTBSY` while any process holds the file open for writing. Every
//! binary we write is closed (and renamed into place) before it is run, but a `fork` in
//! another thread between our `open` and `close` gives the child a copy of the write
//! descriptor until that child calls `exec` (the descriptor is close-on-exec) — a window
//! of microseconds, yet enough to fail one CI run in eight. The writer cannot close a
//! descriptor held by someone else's child, so the spawner retries briefly instead (as Go's
//! `os/exec` and cargo do).

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a spawn keeps retrying while the binary is busy.
pub const BUSY_LIMIT: Duration = Duration::from_secs(2);
/// Between two tries.
pub const BUSY_PAUSE: Duration = Duration::from_millis(20);

/// Did a spawn fail because the binary is open for writing somewhere?
pub fn is_busy(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
}

/// `spawn()` again while it fails with `ETXTBSY`, for at most [`BUSY_LIMIT`], pausing
/// with `sleep` (the caller's runtime's, e.g. `tokio::time::sleep`).
pub async fn retry_busy<T, S: Future<Output = ()>>(
    mut spawn: impl FnMut() -> std::io::Result<T>,
    sleep: impl Fn(Duration) -> S,
) -> std::io::Result<T> {
    let start = Instant::now();
    loop {
        match spawn() {
            Err(e) if is_busy(&e) && start.elapsed() < BUSY_LIMIT => sleep(BUSY_PAUSE).await,
            r => return r,
        }
    }
}

/// Blocking form of [`retry_busy`] for synchronous callers (release tooling).
pub fn retry_busy_blocking<T>(mut spawn: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let start = Instant::now();
    loop {
        match spawn() {
            Err(e) if is_busy(&e) && start.elapsed() < BUSY_LIMIT => std::thread::sleep(BUSY_PAUSE),
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_only_while_busy_and_only_for_a_while() {
        let mut n = 0;
        let r = retry_busy_blocking(|| {
            n += 1;
            if n < 3 {
                Err(std::io::Error::from_raw_os_error(
                    nix::errno::Errno::ETXTBSY as i32,
                ))
            } else {
                Ok(n)
            }
        });
        assert_eq!(r.expect("third try"), 3);
        let mut n = 0;
        let r: std::io::Result<()> = retry_busy_blocking(|| {
            n += 1;
            Err(std::io::Error::from(std::io::ErrorKind::NotFound))
        });
        assert!(r.is_err());
        assert_eq!(n, 1, "a missing binary is not retried");
        let start = Instant::now();
        let r: std::io::Result<()> = retry_busy_blocking(|| {
            Err(std::io::Error::from_raw_os_error(
                nix::errno::Errno::ETXTBSY as i32,
            ))
        });
        assert!(r.is_err());
        assert!(start.elapsed() < BUSY_LIMIT + Duration::from_secs(1));
    }
}
