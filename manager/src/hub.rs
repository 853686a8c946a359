//! In-memory wake-ups for long polls and log followers.
//!
//! Pick-up latency must be bounded by the network, not by a poll interval, so a waiting
//! acquire sleeps on a `Notify` that every submit, re-queue and cancel request fires, and a
//! log follower sleeps on a `watch` counter bumped by every log append and state change.
//! The database stays the only truth: a wake-up only says "look again".

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, futures::Notified, watch};

pub struct Hub {
    work: Notify,
    /// Acquires waiting for a wake-up right now (tests check that a poll is waiting
    /// before they wake it).
    waiting: AtomicUsize,
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            work: Notify::new(),
            waiting: AtomicUsize::new(0),
            changes: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
        }
    }
}

impl Hub {
    /// A future that completes at the next [`Hub::work_available`]. Call `enable()` on it
    /// before looking at the database so a wake-up between the look and the wait is kept.
    pub fn work_notified(&self) -> Notified<'_> {
        self.work.notified()
    }

    /// A task was queued or a cancel was requested: every waiting acquire looks again.
    pub fn work_available(&self) {
        self.work.notify_waiters();
    }

    /// Count a long poll as waiting until the guard is dropped.
    pub fn waiting(&self) -> Waiting<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(&self.waiting)
    }

    /// How many long polls wait for a wake-up now.
    pub fn waiting_polls(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Logs grew or a task changed state.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The server is stopping: long polls and log streams return now.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn subscribe_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// A long poll counted in [`Hub::waiting_polls`].
pub struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wait until `rx` says the server is stopping (or the hub is gone).
pub async fn stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
