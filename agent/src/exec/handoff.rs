//! The hand-off socket: how a `delegate-task@` unit's runner gets its task from the agent.
//!
//! PID 1 opens whatever a unit's `LoadCredential=` and `StandardOutput=` name as root,
//! before `User=` and the sandbox apply, following symlinks. Pointing them into the agent's
//! own state directory let user `delegate` make root write or read any file (a symlink
//! `output -> /etc/cron.d/x`). So the template names no path of the agent's at all: its
//! runner, already the task's own user inside the sandbox, connects to
//! [`SOCKET`] and receives the spec as bytes and the task's output file as an open file
//! descriptor (`SCM_RIGHTS`), which the agent opened itself, in its own directory, without
//! following symlinks. Nothing of the task is on disk in clear any more.
//!
//! The agent hands an attempt's task only to that attempt's unit: the connecting process
//! (`SO_PEERCRED`) must be the main process of the unit systemd says it belongs to
//! (`GetUnitByPID`, then the unit's `MainPID`), and each task is handed out once, before
//! the runner execs the script — so a task can never fetch its own or another's spec, and
//! no other local user can either. The runner in turn accepts a task only from the user
//! that owns the socket's directory (the agent's).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::net::UnixListener;
use tracing::{debug, warn};

/// Where the agent listens and the runner connects: the agent's `RuntimeDirectory=`
/// (`/run/delegate`, 0755, owned by user `delegate`), fixed because the template's runner
/// has no other way to learn it.
pub const SOCKET: &str = "/run/delegate/tasks.sock";

/// Largest task the runner accepts (the script and its environment).
pub const MAX_TASK_BYTES: u32 = 16 * 1024 * 1024;

/// How long either side waits for the other once connected.
const IO_LIMIT: Duration = Duration::from_secs(30);

/// Why a hand-off failed, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("cannot listen on {path}: {cause}")]
    Listen {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "cannot reach the agent at {path}: {cause} (delegate.service must run, with RuntimeDirectory=delegate)"
    )]
    Connect {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{path} is served by uid {peer}, not by the agent's user (uid {owner}, the owner of its directory): refusing its task"
    )]
    NotTheAgent {
        path: PathBuf,
        peer: u32,
        owner: u32,
    },
    #[error("the agent's answer was cut short: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the agent handed no task to this process (it hands each task once, to the main process of the unit it started for it)"
    )]
    NoTask,
    #[error("the agent's task is {0} bytes, more than the {MAX_TASK_BYTES} a runner accepts")]
    TooLarge(u32),
}

/// What one attempt's runner receives.
struct Pending {
    spec: Vec<u8>,
    output: std::fs::File,
}

/// Decides whether a connecting process is the main process of a unit (asks systemd).
pub trait UnitOfPid: Send + Sync + 'static {
    /// The unit whose main process `pid` is, if it is one of `candidates`.
    fn main_of(
        &self,
        pid: u32,
        candidates: Vec<String>,
    ) -> impl std::future::Future<Output = Option<String>> + Send;
}

/// The agent's side: tasks waiting for their unit's runner, and the listener.
#[derive(Clone)]
pub struct Handoffs {
    pending: Arc<Mutex<HashMap<String, Pending>>>,
}

impl std::fmt::Debug for Handoffs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoffs")
    }
}

impl Handoffs {
    /// Bind `path` (replacing a socket left by an earlier run) and serve runners until the
    /// returned handle is dropped. The socket is open to every local user: who gets a task
    /// is decided per connection, by the unit its process belongs to.
    pub fn listen<U: UnitOfPid>(
        path: &Path,
        units: Arc<U>,
    ) -> Result<(Handoffs, tokio::task::JoinHandle<()>), HandoffError> {
        let listen_err = |cause| HandoffError::Listen {
            path: path.to_path_buf(),
            cause,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(listen_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(listen_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
            .map_err(listen_err)?;
        let handoffs = Handoffs {
            pending: Arc::new(Mutex::new(HashMap::new())),
        };
        let serving = handoffs.clone();
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        warn!("task hand-off socket: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let serving = serving.clone();
                let units = units.clone();
                tokio::spawn(async move { serving.serve(stream, &*units).await });
            }
        });
        Ok((handoffs, task))
    }

    /// Hold `spec` and `output` for `unit`'s runner (before the unit is started).
    pub fn offer(&self, unit: &str, spec: Vec<u8>, output: std::fs::File) {
        self.lock()
            .insert(unit.to_string(), Pending { spec, output });
    }

    /// Forget what `unit`'s runner did not take; `true` when it was still there (the
    /// runner never fetched its task).
    pub fn withdraw(&self, unit: &str) -> bool {
        self.lock().remove(unit).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn serve<U: UnitOfPid>(&self, stream: tokio::net::UnixStream, units: &U) {
        let pid = match stream.peer_cred() {
            Ok(c) => c.pid().and_then(|p| u32::try_from(p).ok()),
            Err(e) => {
                debug!("task hand-off: no peer credentials: {e}");
                None
            }
        };
        let Some(pid) = pid else { return };
        let candidates: Vec<String> = self.lock().keys().cloned().collect();
        if candidates.is_empty() {
            debug!(pid, "task hand-off: a connection while no task waits");
            return;
        }
        let Some(unit) = units.main_of(pid, candidates).await else {
            warn!(
                pid,
                "task hand-off: refused a process that is not the main process of a waiting task unit"
            );
            return;
        };
        let Some(pending) = self.lock().remove(&unit) else {
            return;
        };
        let std = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!("task hand-off to {unit}: {e}");
                return;
            }
        };
        let sent = tokio::task::spawn_blocking(move || send(std, &pending)).await;
        match sent {
            Ok(Ok(())) => debug!("handed its task to {unit}"),
            Ok(Err(e)) => warn!("task hand-off to {unit} failed: {e}"),
            Err(e) => warn!("task hand-off to {unit} failed: {e}"),
        }
    }
}

/// Length-prefixed spec; the output file rides on its first byte.
fn send(stream: StdUnixStream, p: &Pending) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(IO_LIMIT))?;
    let len = u32::try_from(p.spec.len())
        .map_err(|_| std::io::Error::other("the task's spec is larger than 4 GiB"))?
        .to_be_bytes();
    let fds = [p.output.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("no room for the output file"));
    }
    // The file rides on the first byte(s); a stream socket may take fewer than four.
    let sent = rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(&len)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent == 0 {
        return Err(std::io::ErrorKind::WriteZero.into());
    }
    let mut stream = stream;
    stream.write_all(&len[sent..])?;
    stream.write_all(&p.spec)?;
    stream.flush()
}

/// The runner's side: connect to `path`, check that the agent's user serves it, and take
/// the task (its spec's bytes and the output file).
pub fn fetch(path: &Path) -> Result<(Vec<u8>, OwnedFd), HandoffError> {
    let stream = StdUnixStream::connect(path).map_err(|cause| HandoffError::Connect {
        path: path.to_path_buf(),
        cause,
    })?;
    // Only the agent's user can create the socket in its runtime directory.
    let owner = path
        .parent()
        .and_then(|d| std::fs::metadata(d).ok())
        .map(|m| m.uid());
    let peer = rustix::net::sockopt::socket_peercred(&stream)
        .map_err(std::io::Error::from)?
        .uid
        .as_raw();
    if owner != Some(peer) {
        return Err(HandoffError::NotTheAgent {
            path: path.to_path_buf(),
            peer,
            owner: owner.unwrap_or(u32::MAX),
        });
    }
    stream.set_read_timeout(Some(IO_LIMIT))?;
    let mut len = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut len)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?
    .bytes;
    let mut output = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            for fd in fds {
                output.get_or_insert(fd);
            }
        }
    }
    let output = output.ok_or(HandoffError::NoTask)?;
    let mut stream = stream;
    stream.read_exact(&mut len[got..])?;
    let n = u32::from_be_bytes(len);
    if n > MAX_TASK_BYTES {
        return Err(HandoffError::TooLarge(n));
    }
    let mut spec = vec![0u8; n as usize];
    stream.read_exact(&mut spec)?;
    Ok((spec, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Says every pid is the main process of the first candidate (the real check asks
    /// systemd, in the booted-systemd tests).
    struct AnyPid;
    impl UnitOfPid for AnyPid {
        async fn main_of(&self, _pid: u32, candidates: Vec<String>) -> Option<String> {
            candidates.into_iter().next()
        }
    }

    /// Refuses every process.
    struct NoPid;
    impl UnitOfPid for NoPid {
        async fn main_of(&self, _pid: u32, _candidates: Vec<String>) -> Option<String> {
            None
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_runner_gets_the_spec_and_an_output_file_it_can_append_to_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("tasks.sock");
        let (h, _serve) = Handoffs::listen(&sock, Arc::new(AnyPid)).expect("listen");
        let out_path = dir.path().join("output");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out_path)
            .expect("output");
        let spec = vec![b'x'; 100_000];
        h.offer("delegate-task@t_a-1.service", spec.clone(), out);
        let path = sock.clone();
        let (got, fd) = tokio::task::spawn_blocking(move || fetch(&path))
            .await
            .expect("join")
            .expect("fetch");
        assert_eq!(got, spec);
        let mut f = std::fs::File::from(fd);
        f.write_all(b"hello\n")
            .expect("write through the handed fd");
        assert_eq!(std::fs::read(&out_path).expect("read"), b"hello\n");
        // Handed out once: a second connection gets nothing.
        assert!(!h.withdraw("delegate-task@t_a-1.service"));
        let path = sock.clone();
        let again = tokio::task::spawn_blocking(move || fetch(&path))
            .await
            .expect("join");
        assert!(again.is_err(), "{again:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_process_that_is_not_the_units_main_process_gets_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("tasks.sock");
        let (h, _serve) = Handoffs::listen(&sock, Arc::new(NoPid)).expect("listen");
        let out = tempfile::tempfile().expect("output");
        h.offer("delegate-task@t_a-1.service", b"{}".to_vec(), out);
        let path = sock.clone();
        let got = tokio::task::spawn_blocking(move || fetch(&path))
            .await
            .expect("join");
        assert!(got.is_err(), "{got:?}");
        // Still there for its own unit.
        assert!(h.withdraw("delegate-task@t_a-1.service"));
    }
}
