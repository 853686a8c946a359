//! The on-disk journal of in-flight tasks and spool of undelivered logs and results.
//!
//! Every task the agent accepts gets a directory `STATE_DIR/tasks/<task>.<attempt>/`
//! *before* it starts, holding the assignment, its whole log, once it ends its result, and
//! the named records its executor keeps there ([`Records`]: the process group of a shell
//! task, a container, a unit, a Job). The spool stores those records and interprets none
//! of them; each executor owns and types its own. The directory is removed only when the
//! manager has acknowledged the result, so neither a manager that is down for minutes nor
//! a `kill -9` of the agent loses a result or a log byte: the next start finds the
//! directory and finishes the delivery (or reports that the task died with the agent).
//!
//! Each file is a record's name: `assignment.json`, `result.json`, `acked` and `log` are
//! the spool's own; executors' records keep the names agents have always written
//! (`process.json`, `container.json`, `unit.json`, `kube-job.json`), so an agent upgraded in
//! place re-attaches to tasks an older one started.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use delegate_durable::{Durability, WriteOptions};
use delegate_protocol::{Assignment, TaskResult};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::DEFAULT_MAX_LOG_BYTES;
use crate::exec::{Journal, JournalError, TaskLog};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The I/O error is said in the message and not exposed as a source, so a chain
    /// printer says it once.
    #[error("{op} {path}: {cause}")]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("task id {0:?} has characters that cannot name a spool directory")]
    BadTaskId(String),
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{0:?} cannot name a task's record (letters, digits, '.', '_' and '-', not a name of the spool's own)"
    )]
    BadRecordName(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |cause| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        cause,
    }
}

/// Write `data` to `path` so that readers see the old or the new content, never a part.
/// No fsync unless asked: see [`TaskDir::write_result`] for why the spool does not need one.
fn write_atomic(path: &Path, data: &[u8], durability: Durability) -> Result<(), SpoolError> {
    let opts = WriteOptions {
        mode: 0o600,
        durability,
    };
    delegate_durable::write_atomic_with(path, data, opts).map_err(|e| SpoolError::Io {
        op: e.op,
        path: e.path,
        cause: e.source,
    })
}

/// Files of a task directory that are the spool's own, never an executor's record.
const OWN_FILES: &[&str] = &["assignment.json", "result.json", "acked", "log"];

/// The spool root, `STATE_DIR/tasks`.
#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    /// Most log bytes kept per task attempt (`max_log_bytes`).
    log_cap: u64,
}

/// What a restarted agent finds in the spool for one directory.
#[derive(Debug)]
pub enum Found {
    /// A readable task attempt.
    Task(Recovered),
    /// Its assignment or result did not parse: the directory was moved aside.
    Quarantined(Quarantined),
    /// It could not be read at all (permissions, I/O); left where it is.
    Unreadable(SpoolError),
}

/// A task directory whose journal was corrupt, moved to `STATE_DIR/quarantine/` for an
/// operator to inspect, so that it is not found (and skipped) again at every start.
#[derive(Debug)]
pub struct Quarantined {
    /// From the directory name `<task>.<attempt>`; `None` when that does not parse.
    pub task: Option<(String, u32)>,
    pub reason: String,
    pub moved_to: PathBuf,
    /// The executor's records, where they were moved to (for what is left of its work).
    pub records: Records,
}

/// What a restarted agent finds in the spool for one task attempt.
#[derive(Debug)]
pub struct Recovered {
    pub dir: TaskDir,
    pub assignment: Assignment,
    pub result: Option<TaskResult>,
}

impl Spool {
    pub fn open(state_dir: &Path) -> Result<Spool, SpoolError> {
        let root = state_dir.join("tasks");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err("create directory", &root))?;
        Ok(Spool {
            root,
            log_cap: DEFAULT_MAX_LOG_BYTES,
        })
    }

    /// Cut each task attempt's log at `bytes` (default [`DEFAULT_MAX_LOG_BYTES`]): output
    /// past it is dropped, a `[delegate] log truncated` line says so in the log and the
    /// result says how much was dropped.
    pub fn with_log_cap(mut self, bytes: u64) -> Spool {
        self.log_cap = bytes;
        self
    }

    /// The spool's directory, `STATE_DIR/tasks` (metrics sum its size).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Journal a newly accepted assignment.
    pub fn create(&self, a: &Assignment) -> Result<TaskDir, SpoolError> {
        let valid = !a.task_id.is_empty()
            && a.task_id.len() <= 128
            && a.task_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(SpoolError::BadTaskId(a.task_id.clone()));
        }
        let path = self.root.join(format!("{}.{}", a.task_id, a.attempt));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .or_else(|e| {
                // A re-delivered assignment of the same attempt reuses its directory.
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(io_err("create directory", &path))?;
        let json = serde_json::to_vec(a).map_err(|e| SpoolError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(
            &path.join("assignment.json"),
            &json,
            Durability::ProcessCrash,
        )?;
        TaskDir::open(path, a.task_id.clone(), a.attempt, self.log_cap)
    }

    /// Every task directory left by an earlier run. Corrupt ones are moved aside
    /// ([`Found::Quarantined`]) so the caller reports them once; unreadable ones are
    /// returned as errors and left in place.
    pub fn recover(&self) -> Result<Vec<Found>, SpoolError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.root).map_err(io_err("read directory", &self.root))?;
        for entry in entries {
            let entry = entry.map_err(io_err("read directory", &self.root))?;
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            out.push(match Self::recover_one(path.clone(), self.log_cap) {
                Ok(r) => Found::Task(r),
                Err(SpoolError::Corrupt { reason, .. }) => match self.quarantine(&path, reason) {
                    Ok(q) => Found::Quarantined(q),
                    Err(e) => Found::Unreadable(e),
                },
                Err(e) => Found::Unreadable(e),
            });
        }
        Ok(out)
    }

    /// Move a corrupt task directory to `STATE_DIR/quarantine/<name>`.
    fn quarantine(&self, path: &Path, reason: String) -> Result<Quarantined, SpoolError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let task = name.rsplit_once('.').and_then(|(id, attempt)| {
            let attempt = attempt.parse().ok()?;
            (!id.is_empty()).then(|| (id.to_string(), attempt))
        });
        let dir = self.root.parent().unwrap_or(&self.root).join("quarantine");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create directory", &dir))?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let moved_to = dir.join(format!("{name}.{stamp}"));
        fs::rename(path, &moved_to).map_err(io_err("rename", path))?;
        Ok(Quarantined {
            task,
            reason,
            records: Records {
                dir: moved_to.clone(),
            },
            moved_to,
        })
    }

    fn recover_one(path: PathBuf, log_cap: u64) -> Result<Recovered, SpoolError> {
        let read_json = |name: &str| -> Result<Option<Vec<u8>>, SpoolError> {
            let p = path.join(name);
            match fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err("read", &p)(e)),
            }
        };
        let corrupt = |reason: String| SpoolError::Corrupt {
            path: path.clone(),
            reason,
        };
        let assignment: Assignment = match read_json("assignment.json")? {
            Some(b) => serde_json::from_slice(&b)
                .map_err(|e| corrupt(format!("assignment.json does not parse: {e}")))?,
            None => return Err(corrupt("assignment.json is missing".into())),
        };
        let result = match read_json("result.json")? {
            Some(b) => Some(
                serde_json::from_slice(&b)
                    .map_err(|e| corrupt(format!("result.json does not parse: {e}")))?,
            ),
            None => None,
        };
        let dir = TaskDir::open(
            path.clone(),
            assignment.task_id.clone(),
            assignment.attempt,
            log_cap,
        )?;
        Ok(Recovered {
            dir,
            assignment,
            result,
        })
    }
}

/// One task attempt's directory. Cheap to clone; the log length is shared.
#[derive(Debug, Clone)]
pub struct TaskDir {
    path: PathBuf,
    pub task_id: String,
    pub attempt: u32,
    log_len: Arc<AtomicU64>,
    /// Mirror of the `acked` file, read once at open: shipping checks it on every tick.
    acked: Arc<AtomicU64>,
    drops: Arc<LogDrops>,
    ack_failed: Arc<std::sync::atomic::AtomicBool>,
    log_cap: u64,
}

impl TaskDir {
    fn open(
        path: PathBuf,
        task_id: String,
        attempt: u32,
        log_cap: u64,
    ) -> Result<TaskDir, SpoolError> {
        let log = path.join("log");
        let len = match fs::metadata(&log) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err("stat", &log)(e)),
        };
        let acked = read_acked(&path);
        Ok(TaskDir {
            path,
            task_id,
            attempt,
            log_len: Arc::new(AtomicU64::new(len)),
            acked: Arc::new(AtomicU64::new(acked)),
            drops: Arc::default(),
            ack_failed: Arc::default(),
            log_cap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open the log for appending; output is written here first, shipped from here later.
    pub fn log_writer(&self) -> Result<LogWriter, SpoolError> {
        let p = self.path.join("log");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&p)
            .map_err(io_err("open", &p))?;
        Ok(LogWriter {
            file,
            path: p,
            len: self.log_len.clone(),
            drops: self.drops.clone(),
            cap: self.log_cap,
        })
    }

    /// Bytes of output dropped so far and why the first were, if any were.
    pub fn log_drops(&self) -> Option<(u64, String)> {
        let n = self.drops.bytes.load(Ordering::Acquire);
        let why = self
            .drops
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        Some((n, why))
    }

    /// Bytes written to the log so far.
    pub fn log_len(&self) -> u64 {
        self.log_len.load(Ordering::Acquire)
    }

    /// Read up to `max` log bytes from `offset`.
    pub fn read_log(&self, offset: u64, max: usize) -> Result<Vec<u8>, SpoolError> {
        let p = self.path.join("log");
        let mut f = match File::open(&p) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("open", &p)(e)),
        };
        f.seek(SeekFrom::Start(offset))
            .map_err(io_err("seek", &p))?;
        let mut buf = Vec::with_capacity(max.min(64 * 1024));
        f.take(max as u64)
            .read_to_end(&mut buf)
            .map_err(io_err("read", &p))?;
        Ok(buf)
    }

    /// How many log bytes the manager has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    pub fn set_acked(&self, n: u64) -> Result<(), SpoolError> {
        self.acked.store(n, Ordering::Release);
        write_atomic(
            &self.path.join("acked"),
            n.to_string().as_bytes(),
            Durability::ProcessCrash,
        )
    }

    /// True the first time it is asked after a failed `set_acked`, so the failure is
    /// said once per task.
    pub fn first_ack_failure(&self) -> bool {
        !self.ack_failed.swap(true, Ordering::AcqRel)
    }

    /// The named records its executor keeps in this directory.
    pub fn records(&self) -> Records {
        Records {
            dir: self.path.clone(),
        }
    }

    /// When the task was journalled (accepted), for the time left of its timeout.
    pub fn accepted_at(&self) -> Option<std::time::SystemTime> {
        fs::metadata(self.path.join("assignment.json"))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Journal the result so a restart re-sends it. Not fsynced: it survives any crash of
    /// the agent (the page cache is the kernel's), and if the whole host loses power
    /// before writeback the restarted agent finds no result and reports the task lost,
    /// which the manager retries. An fsync per task would halve throughput for nothing.
    pub fn write_result(&self, r: &TaskResult) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(r).map_err(|e| SpoolError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(
            &self.path.join("result.json"),
            &json,
            Durability::ProcessCrash,
        )
    }

    /// The manager has everything: forget the task.
    pub fn remove(&self) -> Result<(), SpoolError> {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &self.path)(e)),
        }
    }
}

/// The named records an executor keeps for one task attempt, each a file of the task's
/// directory holding what the executor handed over. The spool stores them and interprets
/// none: their types, their names and what a missing one means are the executor's.
#[derive(Debug, Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    fn path(&self, name: &str) -> Result<PathBuf, SpoolError> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !OWN_FILES.contains(&name);
        if !valid {
            return Err(SpoolError::BadRecordName(name.to_string()));
        }
        Ok(self.dir.join(name))
    }

    /// Store `bytes` as record `name`, replacing an earlier one atomically.
    pub fn put_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<(), SpoolError> {
        write_atomic(&self.path(name)?, bytes, durability)
    }

    /// Record `name`; `None` when there is none.
    pub fn get_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        let p = self.path(name)?;
        match fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &p)(e)),
        }
    }

    /// Store `value` as record `name`, as JSON.
    pub fn put<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        durability: Durability,
    ) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(value).map_err(|e| SpoolError::Corrupt {
            path: self.dir.join(name),
            reason: e.to_string(),
        })?;
        self.put_bytes(name, &json, durability)
    }

    /// Record `name` as the type its executor wrote; `None` when there is none.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, SpoolError> {
        let Some(b) = self.get_bytes(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| SpoolError::Corrupt {
                path: self.dir.join(name),
                reason: format!("{name} does not parse: {e}"),
            })
    }
}

/// The executors' journal of a task is its records.
impl Journal for Records {
    fn put_json(
        &self,
        name: &str,
        json: &[u8],
        durability: Durability,
    ) -> Result<(), JournalError> {
        self.put_bytes(name, json, durability)
            .map_err(|e| JournalError(e.to_string()))
    }

    fn get_json(&self, name: &str) -> Result<Option<Vec<u8>>, JournalError> {
        self.get_bytes(name)
            .map_err(|e| JournalError(e.to_string()))
    }
}

/// The persisted acknowledgement of a task directory; 0 when none was recorded.
fn read_acked(dir: &Path) -> u64 {
    fs::read_to_string(dir.join("acked"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Output that could not be written to the spooled log (a full disk), for the task's
/// result and its log.
#[derive(Debug, Default)]
pub struct LogDrops {
    bytes: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

/// Appends task output to the spooled log.
#[derive(Debug)]
pub struct LogWriter {
    file: File,
    path: PathBuf,
    len: Arc<AtomicU64>,
    drops: Arc<LogDrops>,
    cap: u64,
}

impl TaskLog for LogWriter {
    fn append(&mut self, data: &[u8]) {
        LogWriter::append(self, data);
    }

    fn written(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn cap(&self) -> u64 {
        self.cap
    }

    fn skipped(&mut self, bytes: u64) {
        let cap = self.cap;
        self.drop_output(bytes, || {
            format!("the log reached its cap of {cap} bytes (max_log_bytes)")
        });
    }
}

impl LogWriter {
    /// Append task output. The task goes on when the disk is full: what cannot be written
    /// is dropped and counted, the first drop is said once in the journal, and the
    /// supervisor says the total in the task's log and result when the task ends.
    pub fn append(&mut self, data: &[u8]) {
        let before = self.len.load(Ordering::Acquire);
        let room = self.cap.saturating_sub(before);
        if data.len() as u64 > room {
            // At the cap: keep what fits, end the log with a marker once (the marker is
            // what takes the log past the cap, so later output finds no room), drop the rest.
            let (fits, over) = data.split_at(room as usize);
            if before <= self.cap {
                self.write(fits);
                let marker = format!(
                    "\n[delegate] log truncated: it reached the agent's cap of {} bytes per \
                     task (max_log_bytes); later output is dropped\n",
                    self.cap
                );
                self.write(marker.as_bytes());
            }
            self.drop_output(over.len() as u64, || {
                format!(
                    "the log reached its cap of {} bytes (max_log_bytes)",
                    self.cap
                )
            });
            return;
        }
        self.write(data);
    }

    fn drop_output(&self, lost: u64, why: impl FnOnce() -> String) {
        self.drops.bytes.fetch_add(lost, Ordering::AcqRel);
        let mut first = self
            .drops
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            let why = why();
            tracing::warn!(
                "task output is being dropped: {why}; the task goes on and its result will say how much was lost"
            );
            *first = Some(why);
        }
    }

    fn write(&mut self, data: &[u8]) {
        let before = self.len.load(Ordering::Acquire);
        match self.file.write_all(data) {
            Ok(()) => {
                self.len.fetch_add(data.len() as u64, Ordering::AcqRel);
            }
            Err(e) => {
                // A partial write may have landed: the file's length is the truth, and
                // log offsets must keep matching it.
                let now = self
                    .file
                    .metadata()
                    .map(|m| m.len())
                    .unwrap_or(before)
                    .max(before);
                self.len.store(now, Ordering::Release);
                let lost = (data.len() as u64).saturating_sub(now - before);
                self.drop_output(lost, || {
                    format!("cannot write {}: {e}", self.path.display())
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use delegate_protocol::Outcome;

    fn assignment(id: &str) -> Assignment {
        Assignment {
            task_id: id.into(),
            attempt: 2,
            kind: "shell".into(),
            spec: serde_json::json!({"script": "true"}),
            timeout_secs: 5,
        }
    }

    #[test]
    fn journal_survives_a_restart_with_log_ack_and_result() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.create(&assignment("t_1")).expect("create");
        let mut w = dir.log_writer().expect("writer");
        w.append(b"hello ");
        w.append(b"world");
        dir.set_acked(6).expect("ack");
        let r = TaskResult {
            outcome: Outcome::Failed,
            exit_code: Some(3),
            signal: None,
            message: None,
            log_bytes: 11,
        };
        dir.write_result(&r).expect("result");

        let again = Spool::open(tmp.path()).expect("reopen");
        let found = again.recover().expect("recover");
        assert_eq!(found.len(), 1);
        let Some(Found::Task(rec)) = found.into_iter().next() else {
            panic!("one readable task");
        };
        assert_eq!(rec.assignment.attempt, 2);
        assert_eq!(rec.result, Some(r));
        assert_eq!(rec.dir.log_len(), 11);
        assert_eq!(rec.dir.acked(), 6);
        assert_eq!(rec.dir.read_log(6, 100).expect("read"), b"world");
        rec.dir.remove().expect("remove");
        assert!(again.recover().expect("recover").is_empty());
    }

    /// A full disk (here `/dev/full`, which fails every write with ENOSPC) drops output
    /// without failing the task, counts it, and keeps the log length true to the file.
    #[test]
    fn a_log_at_its_cap_ends_with_a_marker_and_counts_the_rest_as_dropped() {
        let tmp = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(tmp.path()).expect("open").with_log_cap(10);
        let dir = spool.create(&assignment("t_cap")).expect("create");
        let mut w = dir.log_writer().expect("writer");
        w.append(b"0123456");
        w.append(b"789abc");
        w.append(b"more");
        let log = dir.read_log(0, 1000).expect("read");
        let text = String::from_utf8_lossy(&log);
        assert!(
            text.starts_with("0123456789\n[delegate] log truncated:")
                && text.ends_with("dropped\n"),
            "{text}"
        );
        assert_eq!(dir.log_len(), log.len() as u64);
        let (n, why) = dir.log_drops().expect("drops counted");
        assert_eq!(n, 3 + 4);
        assert!(why.contains("cap of 10 bytes"), "{why}");
        // After a restart the cut log stays cut, without a second marker.
        let again = Spool::open(tmp.path()).expect("reopen").with_log_cap(10);
        let found = again.recover().expect("recover");
        let Some(Found::Task(rec)) = found.into_iter().next() else {
            panic!("task not recovered");
        };
        rec.dir.log_writer().expect("writer").append(b"late");
        assert_eq!(rec.dir.read_log(0, 1000).expect("read"), log);
    }

    #[test]
    fn a_full_disk_drops_output_and_counts_what_was_lost() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.create(&assignment("t_full")).expect("create");
        std::os::unix::fs::symlink("/dev/full", dir.path().join("log")).expect("symlink");
        let mut w = dir.log_writer().expect("writer");
        assert_eq!(dir.log_drops(), None);
        w.append(b"hello ");
        w.append(b"world");
        assert_eq!(dir.log_len(), 0);
        let (n, why) = dir.log_drops().expect("drops recorded");
        assert_eq!(n, 11);
        assert!(why.contains("No space left on device"), "{why}");
    }

    #[test]
    fn a_corrupt_journal_is_moved_aside_once_with_its_task_and_reason() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let a = spool.create(&assignment("t_badjob")).expect("create");
        std::fs::write(a.path().join("assignment.json"), b"\x00garbage").expect("garble");
        let r = spool.create(&assignment("t_badres")).expect("create");
        std::fs::write(r.path().join("result.json"), b"{\"outcome\":").expect("garble");
        let mut found = spool.recover().expect("recover");
        found.sort_by_key(|f| format!("{f:?}"));
        let mut seen = Vec::new();
        for f in found {
            let Found::Quarantined(q) = f else {
                panic!("not quarantined: {f:?}");
            };
            assert!(
                q.moved_to.starts_with(tmp.path().join("quarantine")),
                "{q:?}"
            );
            assert!(q.moved_to.join("assignment.json").exists(), "{q:?}");
            seen.push((q.task.expect("named"), q.reason));
        }
        seen.sort();
        assert_eq!(seen[0].0, ("t_badjob".to_string(), 2));
        assert!(
            seen[0].1.starts_with("assignment.json does not parse"),
            "{seen:?}"
        );
        assert_eq!(seen[1].0, ("t_badres".to_string(), 2));
        assert!(
            seen[1].1.starts_with("result.json does not parse"),
            "{seen:?}"
        );
        // Gone from the spool: the next start finds nothing to skip.
        assert!(spool.recover().expect("recover").is_empty());
    }

    /// Records are opaque to the spool: what an executor puts it gets back, under the
    /// file name it chose, and the spool's own files are not records.
    #[test]
    fn records_round_trip_under_their_own_names() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Made {
            id: String,
            n: u64,
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.create(&assignment("t_2")).expect("create");
        let records = dir.records();
        assert_eq!(records.get::<Made>("made.json").expect("get"), None);
        let made = Made {
            id: "abc".into(),
            n: 12,
        };
        records
            .put("made.json", &made, Durability::ProcessCrash)
            .expect("put");
        records
            .put("synced.json", &made, Durability::PowerLoss)
            .expect("put synced");
        assert_eq!(records.get::<Made>("made.json").expect("get"), Some(made));
        assert!(dir.path().join("made.json").is_file());
        let journal: &dyn Journal = &records;
        assert_eq!(
            journal.get::<Made>("synced.json").map(|m| m.n),
            Some(12),
            "the executors' typed view reads the same record"
        );
        for bad in [
            "",
            "../x",
            ".hidden",
            "a/b",
            "assignment.json",
            "result.json",
            "acked",
            "log",
        ] {
            let e = records.put_bytes(bad, b"{}", Durability::ProcessCrash);
            assert!(
                matches!(e, Err(SpoolError::BadRecordName(_))),
                "{bad}: {e:?}"
            );
        }
        assert!(dir.accepted_at().is_some());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.contains("tmp")), "{names:?}");
    }

    /// An agent upgraded in place finds the records an older one wrote: the same files.
    #[test]
    fn records_written_by_an_older_agent_are_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.create(&assignment("t_old")).expect("create");
        std::fs::write(
            dir.path().join("container.json"),
            br#"{"id":"abc","log_base":12,"exit_code":3}"#,
        )
        .expect("old record");
        let found = spool.recover().expect("recover");
        let Some(Found::Task(rec)) = found.into_iter().next() else {
            panic!("task not recovered");
        };
        let c: serde_json::Value = rec
            .dir
            .records()
            .get("container.json")
            .expect("read")
            .expect("present");
        assert_eq!(c["id"], "abc");
    }

    /// A quarantined directory keeps its records for what is left of the task's work.
    #[test]
    fn a_quarantined_task_keeps_its_records() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let dir = spool.create(&assignment("t_q")).expect("create");
        dir.records()
            .put("process.json", &7u32, Durability::ProcessCrash)
            .expect("put");
        std::fs::write(dir.path().join("assignment.json"), b"garbage").expect("garble");
        let found = spool.recover().expect("recover");
        let Some(Found::Quarantined(q)) = found.into_iter().next() else {
            panic!("not quarantined");
        };
        assert_eq!(q.records.get::<u32>("process.json").expect("read"), Some(7));
    }

    #[test]
    fn task_ids_cannot_escape_the_spool() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(tmp.path()).expect("open");
        let e = spool
            .create(&assignment("../../etc"))
            .expect_err("must be refused");
        assert!(matches!(e, SpoolError::BadTaskId(_)), "{e}");
    }
}
