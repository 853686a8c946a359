//! Copying a file a task writes its output to (the `output` of a `delegate-task@` unit)
//! into the task's log, without letting the task steer the agent.
//!
//! The task holds the file open (`O_APPEND`, opened for it by systemd) and may do anything
//! to it: write gigabytes, `ftruncate` it to a petabyte of holes, shrink it under the
//! reader. A copy that reads "until end of file" with blocking calls on an async worker
//! then never returns, and the agent stops heartbeating, honouring timeouts and cancels,
//! and taking tasks, which a task can bring about on purpose. So here:
//!
//! - each pass reads at most [`PASS_BYTES`], on tokio's blocking pool (`spawn_blocking`),
//!   never on an async worker; a call makes at most [`PASSES`] passes, so the caller gets
//!   back to its stop token and its unit's state in bounded time;
//! - a pass never reads more than the log can still keep: once the log is at its cap
//!   (`max_log_bytes`), the rest of the file is skipped unread (and counted as dropped);
//! - a file shrunk below what was copied (`ftruncate`) is read on from its new end, so a
//!   shrink can neither loop nor make the copier re-read;
//! - the file itself stays small on disk: what has been copied is punched out
//!   (`FALLOC_FL_PUNCH_HOLE`: the blocks are freed, the length and so every offset stay),
//!   and once the log is full the file is cut to nothing, since all the task writes from
//!   then on would be dropped anyway (a file the agent may only read is copied the same
//!   way, and left to its owner to bound). Stopping the task at some size instead was
//!   rejected: a build that logs more than `max_log_bytes` is legitimate, and the cap
//!   already says what happens to its output; only the disk needed bounding.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FallocateFlags, fallocate};
use tracing::debug;

use super::TaskLog;

/// Most bytes one pass reads (and holds in memory).
pub const PASS_BYTES: u64 = 1024 * 1024;

/// Most passes one call of [`copy_new`] makes: 8 MiB per call, which at the unit
/// executor's 50 ms poll keeps up with 160 MiB/s of output.
pub const PASSES: u32 = 8;

/// Holes are punched in whole blocks; a partial block at the end stays until later.
const PUNCH_ALIGN: u64 = 4096;

/// Where a copy stands after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// All the file held is in the log, or was skipped past the cap, or the file is not
    /// there (yet).
    UpToDate,
    /// There is more: call again (after looking at the stop token).
    More,
}

/// What one pass did, computed off the async workers.
#[derive(Debug, Default)]
struct Pass {
    data: Vec<u8>,
    /// The file offset copied up to after this pass.
    copied: u64,
    /// Bytes skipped unread because the log is full.
    skipped: u64,
    more: bool,
}

/// Copy what the task wrote to `path` since offset `copied` into `log`: at most
/// [`PASSES`] passes of [`PASS_BYTES`], read on the blocking pool. `copied` is the file
/// offset copied so far and is updated.
pub async fn copy_new(path: &Path, copied: &mut u64, log: &mut dyn TaskLog) -> Copied {
    for _ in 0..PASSES {
        if !one_pass(path, copied, log).await {
            return Copied::UpToDate;
        }
    }
    Copied::More
}

/// Copy everything left (the task has ended). Bounded all the same: reads stop at the
/// log's cap, after which the rest is skipped in one pass.
pub async fn copy_rest(path: &Path, copied: &mut u64, log: &mut dyn TaskLog) {
    while copy_new(path, copied, log).await == Copied::More {}
}

/// One pass; `true` when there is more to copy.
async fn one_pass(path: &Path, copied: &mut u64, log: &mut dyn TaskLog) -> bool {
    // `+ 1`: a log exactly at its cap takes one more byte, which makes it write its
    // truncation marker; past the marker it takes nothing.
    let room = log
        .cap()
        .saturating_add(1)
        .saturating_sub(log.written())
        .min(PASS_BYTES);
    let owned: PathBuf = path.to_path_buf();
    let from = *copied;
    let pass = match tokio::task::spawn_blocking(move || read_pass(&owned, from, room)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            if e.kind() != io::ErrorKind::NotFound {
                debug!("cannot copy the task's output from {}: {e}", path.display());
            }
            return false;
        }
        Err(e) => {
            debug!("the output copy of {} failed: {e}", path.display());
            return false;
        }
    };
    if !pass.data.is_empty() {
        log.append(&pass.data);
    }
    if pass.skipped > 0 {
        log.skipped(pass.skipped);
    }
    *copied = pass.copied;
    pass.more
}

/// Read at most `room` bytes of `path` from `from` (blocking), then free what was copied.
fn read_pass(path: &Path, from: u64, room: u64) -> io::Result<Pass> {
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            // Whatever the task may have done to the spool, never follow a link or wait
            // on a FIFO put in the file's place.
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
    };
    // Writable to free what was copied; a file the agent may only read (owned by root)
    // is still copied, and its size is then bounded by whoever owns it.
    let (file, writable) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => (open(false)?, false),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let len = meta.len();
    // Shrunk below what was copied: the task's next writes land at the new end.
    let from = from.min(len);
    if room == 0 {
        // The log is full: nothing more of the file will be kept, so nothing is read and
        // the file is emptied (the task's O_APPEND writes go on from offset 0).
        if writable {
            file.set_len(0)?;
        }
        return Ok(Pass {
            copied: if writable { 0 } else { len },
            skipped: len - from,
            ..Pass::default()
        });
    }
    let want = room.min(len - from);
    let mut data = vec![0u8; usize::try_from(want).unwrap_or(0)];
    let mut got = 0;
    while got < data.len() {
        match file.read_at(&mut data[got..], from + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    data.truncate(got);
    let copied = from + got as u64;
    if writable {
        punch(&file, copied);
    }
    Ok(Pass {
        data,
        copied,
        skipped: 0,
        more: copied < len,
    })
}

/// Free the blocks of `[0, upto)` (whole blocks only); the length stays, so the task's
/// appends and our offsets keep agreeing. Best effort: a filesystem without hole punching
/// keeps the bytes until the log is full and the file is emptied.
fn punch(file: &File, upto: u64) {
    let end = upto - upto % PUNCH_ALIGN;
    let Ok(end) = i64::try_from(end) else { return };
    if end == 0 {
        return;
    }
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    if let Err(e) = fallocate(file, flags, 0, end) {
        debug!("cannot free the copied part of the task's output: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};

    /// A log in memory with a cap, like the spool's.
    struct MemLog {
        data: Vec<u8>,
        cap: u64,
        skipped: u64,
    }

    impl TaskLog for MemLog {
        fn append(&mut self, data: &[u8]) {
            let room = usize::try_from(self.cap)
                .unwrap_or(usize::MAX)
                .saturating_sub(self.data.len());
            if data.len() > room {
                self.data.extend_from_slice(&data[..room]);
                self.data.extend_from_slice(b"\n[cut]\n");
            } else {
                self.data.extend_from_slice(data);
            }
        }
        fn written(&self) -> u64 {
            self.data.len() as u64
        }
        fn cap(&self) -> u64 {
            self.cap
        }
        fn skipped(&mut self, bytes: u64) {
            self.skipped += bytes;
        }
    }

    fn log(cap: u64) -> MemLog {
        MemLog {
            data: Vec::new(),
            cap,
            skipped: 0,
        }
    }

    fn append_file(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open for append")
    }

    /// Bytes the file takes on disk (not its length).
    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).expect("stat").blocks() * 512
    }

    /// The attack this module guards against: the task `ftruncate`s its O_APPEND stdout to 1 PiB
    /// of holes (8 TiB on ext4). The old copy read zeros "to the end" in one blocking call; here every
    /// call returns at once with at most PASSES × PASS_BYTES read, the copy stops at the
    /// log's cap, and the async runtime keeps ticking meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_petabyte_sparse_output_file_neither_wedges_the_copier_nor_passes_the_cap() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("output");
        let mut f = append_file(&path);
        f.write_all(b"before\n").expect("write");
        // 1 PiB as in the report where the filesystem allows it; ext4 stops at 16 TiB.
        let size: u64 = [1 << 50, 1 << 43]
            .into_iter()
            .find(|n| f.set_len(*n).is_ok())
            .expect("ftruncate to 1 PiB or 8 TiB");
        let mut log = log(4 * PASS_BYTES);
        let mut copied = 0;

        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });

        let started = Instant::now();
        let first = tokio::time::timeout(
            Duration::from_secs(10),
            copy_new(&path, &mut copied, &mut log),
        )
        .await
        .expect("one call returns in bounded time");
        assert_eq!(first, Copied::UpToDate, "the log (cap 4 MiB) is full");
        assert!(log.data.starts_with(b"before\n"));
        assert!(log.data.ends_with(b"\n[cut]\n"));
        assert_eq!(log.written(), 4 * PASS_BYTES + 7);
        // Past the cap the file is emptied, not read.
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
        assert!(log.skipped >= size - 5 * PASS_BYTES, "{}", log.skipped);
        // The task goes on appending; nothing more is kept, nothing loops.
        f.write_all(b"after\n").expect("write");
        tokio::time::timeout(
            Duration::from_secs(10),
            copy_rest(&path, &mut copied, &mut log),
        )
        .await
        .expect("the rest is skipped at once");
        assert_eq!(log.written(), 4 * PASS_BYTES + 7);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10));
        ticker.abort();
        // Only a copy that took a while can show the runtime ran other tasks meanwhile (a
        // fast one may finish before the first 5 ms tick: that flaked one run in five).
        if took >= Duration::from_millis(50) {
            assert!(
                ticks.load(std::sync::atomic::Ordering::Relaxed) > 0,
                "the runtime ran nothing else for {took:?}"
            );
        }
    }

    /// One call reads at most PASSES × PASS_BYTES, however much is there.
    #[tokio::test]
    async fn one_call_copies_a_bounded_amount() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("output");
        let mut f = append_file(&path);
        f.set_len(u64::from(PASSES + 3) * PASS_BYTES)
            .expect("set_len");
        let mut log = log(u64::MAX);
        let mut copied = 0;
        assert_eq!(copy_new(&path, &mut copied, &mut log).await, Copied::More);
        assert_eq!(copied, u64::from(PASSES) * PASS_BYTES);
        assert_eq!(log.written(), copied);
        copy_rest(&path, &mut copied, &mut log).await;
        assert_eq!(copied, u64::from(PASSES + 3) * PASS_BYTES);
        f.write_all(b"x").expect("write");
        assert_eq!(
            copy_new(&path, &mut copied, &mut log).await,
            Copied::UpToDate
        );
        assert_eq!(log.data.last(), Some(&b'x'));
    }

    /// Ordinary output is bounded on disk too: 50 MB written left a 50 MB `output` beside
    /// a 1 MiB log. Copied bytes are punched out, and past the cap the file is emptied.
    #[tokio::test]
    async fn fifty_megabytes_of_output_leave_a_small_output_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("output");
        let mut f = append_file(&path);
        let chunk = vec![b'y'; 1024 * 1024];
        let mut log = log(1024 * 1024);
        let mut copied = 0;
        let mut peak = 0;
        for _ in 0..50 {
            f.write_all(&chunk).expect("write");
            copy_new(&path, &mut copied, &mut log).await;
            peak = peak.max(allocated(&path));
        }
        copy_rest(&path, &mut copied, &mut log).await;
        assert!(
            peak <= 3 * 1024 * 1024,
            "the output file took {peak} bytes on disk"
        );
        assert!(allocated(&path) <= 64 * 1024, "{}", allocated(&path));
        assert_eq!(log.written(), 1024 * 1024 + 7);
        // The byte that made the log write its marker was read; the rest was skipped.
        assert_eq!(log.skipped, 49 * 1024 * 1024 - 1);

        // Below the cap, copied bytes are freed while the length (and offsets) stay.
        let path = dir.path().join("output2");
        let mut f = append_file(&path);
        let mut log = MemLog {
            data: Vec::new(),
            cap: u64::MAX,
            skipped: 0,
        };
        let mut copied = 0;
        for _ in 0..8 {
            f.write_all(&chunk).expect("write");
            copy_new(&path, &mut copied, &mut log).await;
        }
        assert_eq!(copied, 8 * 1024 * 1024);
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), copied);
        assert!(allocated(&path) <= 64 * 1024, "{}", allocated(&path));
        assert!(log.data.iter().all(|b| *b == b'y'));
    }

    /// A file cut below what was copied is read on from its new end: no loop, no re-read.
    #[tokio::test]
    async fn a_shrunk_output_file_is_read_on_from_its_new_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("output");
        let mut f = append_file(&path);
        f.write_all(b"0123456789").expect("write");
        let mut log = log(u64::MAX);
        let mut copied = 0;
        copy_rest(&path, &mut copied, &mut log).await;
        f.set_len(3).expect("shrink");
        f.write_all(b"ab").expect("write");
        // The file is now "012ab": what was written between the cut and the next pass,
        // below the old offset, is lost; the copy goes on from the new end.
        assert_eq!(
            copy_new(&path, &mut copied, &mut log).await,
            Copied::UpToDate
        );
        assert_eq!(copied, 5);
        f.write_all(b"cd").expect("write");
        copy_rest(&path, &mut copied, &mut log).await;
        assert_eq!(log.data, b"0123456789cd");
    }

    /// The copier opens no link put in the file's place.
    #[tokio::test]
    async fn a_symlink_in_place_of_the_output_file_is_not_followed() {
        let dir = tempfile::tempdir().expect("tmp");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"secret").expect("write");
        let path = dir.path().join("output");
        std::os::unix::fs::symlink(&secret, &path).expect("symlink");
        let mut log = log(u64::MAX);
        let mut copied = 0;
        copy_rest(&path, &mut copied, &mut log).await;
        assert!(log.data.is_empty());
        assert_eq!(std::fs::read(&secret).expect("read"), b"secret");
    }
}
