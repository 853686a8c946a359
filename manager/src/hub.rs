//! In-memory wake-ups for long polls and log followers.
//!
//! Pick-up latency must be bounded by the network, not by a poll interval, and it must
//! not grow with the number of idle delegates. So a waiting acquire registers a
//! [`Waiter`] under its delegate's tag set, and a queued task wakes exactly one waiter
//! whose tags satisfy the task's selectors, handing it the task's id (the "hand-off"):
//! the cost of a submit is one lookup per distinct tag set, whatever the fleet's size.
//! A hand-off that is not used (the poll ended first) passes on to another waiter when
//! the waiter is dropped. Cancel requests and drains wake the waiters of one delegate;
//! a revoke wakes them all. Log followers sleep on a `watch` counter bumped by every
//! log append and state change. The database stays the only truth: a wake-up only says
//! "look again".

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use delegate_protocol::selectors_match;
use tokio::sync::{Notify, watch};

use crate::queue::{Fresh, Selectors, selector_key};

pub struct Hub {
    waiters: Mutex<Waiters>,
    /// Acquires waiting for a wake-up right now (tests check that a poll is waiting
    /// before they wake it).
    waiting: AtomicUsize,
    /// Passes of long polls over the queue since start: what a wake-up costs.
    looks: AtomicU64,
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
}

/// The registered waiters, by tag set and by delegate.
#[derive(Default)]
struct Waiters {
    next: u64,
    slots: HashMap<u64, Arc<Slot>>,
    by_tags: HashMap<Selectors, BTreeSet<u64>>,
    by_delegate: HashMap<Arc<str>, Vec<u64>>,
}

impl Waiters {
    /// Take a waiter out of the registry (it will not be woken again).
    fn remove(&mut self, id: u64) -> Option<Arc<Slot>> {
        let slot = self.slots.remove(&id)?;
        if let Some(set) = self.by_tags.get_mut(&slot.tags) {
            set.remove(&id);
            if set.is_empty() {
                self.by_tags.remove(&slot.tags);
            }
        }
        if let Some(ids) = self.by_delegate.get_mut(&slot.delegate) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_delegate.remove(&slot.delegate);
            }
        }
        Some(slot)
    }

    /// The longest-waiting waiter whose tags satisfy `selectors`, out of the registry.
    fn pop_matching(&mut self, selectors: &[String]) -> Option<Arc<Slot>> {
        let id = self
            .by_tags
            .iter()
            .filter(|(tags, _)| selectors_match(selectors, tags))
            .filter_map(|(_, ids)| ids.first().copied())
            .min()?;
        self.remove(id)
    }
}

struct Slot {
    delegate: Arc<str>,
    tags: Selectors,
    notify: Notify,
    handoff: Mutex<Option<Fresh>>,
}

impl Slot {
    fn handoff(&self) -> MutexGuard<'_, Option<Fresh>> {
        self.handoff.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            waiters: Mutex::new(Waiters::default()),
            waiting: AtomicUsize::new(0),
            looks: AtomicU64::new(0),
            changes: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
        }
    }
}

impl Hub {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // Every change under this lock is a few map operations that cannot panic halfway
        // in a way that matters: a poisoned lock is still consistent enough to go on.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a long poll of `delegate` (with `tags`) for wake-ups. Register before
    /// looking at the database, so a task queued between the look and the wait still wakes
    /// it. `takes_tasks` is false for a poll of a full agent (`max=0`): it waits for
    /// cancellations only and is never handed a task, which it could not take.
    pub fn register(&self, delegate: &str, tags: &[String], takes_tasks: bool) -> Waiter<'_> {
        let slot = Arc::new(Slot {
            delegate: delegate.into(),
            tags: selector_key(tags),
            notify: Notify::new(),
            handoff: Mutex::new(None),
        });
        let mut w = self.waiters();
        let id = w.next;
        w.next += 1;
        if takes_tasks {
            w.by_tags.entry(slot.tags.clone()).or_default().insert(id);
        }
        w.by_delegate
            .entry(slot.delegate.clone())
            .or_default()
            .push(id);
        w.slots.insert(id, slot.clone());
        Waiter {
            hub: self,
            id,
            slot,
        }
    }

    /// A task was queued: wake one waiter that may take it and hand it the task. With
    /// none waiting, the task waits in the queue for the next poll.
    pub fn task_queued(&self, task: Fresh) {
        let slot = self.waiters().pop_matching(&task.selectors);
        if let Some(slot) = slot {
            *slot.handoff() = Some(task);
            slot.notify.notify_one();
        }
    }

    /// Wake the waiting polls of one delegate (a cancel to hand out, or it drains).
    pub fn wake_delegate(&self, delegate: &str) {
        let slots: Vec<Arc<Slot>> = {
            let mut w = self.waiters();
            let ids = w.by_delegate.get(delegate).cloned().unwrap_or_default();
            ids.into_iter().filter_map(|id| w.remove(id)).collect()
        };
        for slot in slots {
            slot.notify.notify_one();
        }
    }

    /// Wake every waiting poll (a token was revoked: its polls must answer 401).
    pub fn wake_all(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut w = self.waiters();
            let ids: Vec<u64> = w.slots.keys().copied().collect();
            ids.into_iter().filter_map(|id| w.remove(id)).collect()
        };
        for slot in slots {
            slot.notify.notify_one();
        }
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

    /// A long poll looks at the queue (once per pass).
    pub fn looked(&self) {
        self.looks.fetch_add(1, Ordering::Relaxed);
    }

    /// How many passes long polls made over the queue since start.
    pub fn looks(&self) -> u64 {
        self.looks.load(Ordering::Relaxed)
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

/// A registered long poll. Dropping it unregisters it; a task handed to it and not
/// taken back with [`Waiter::take_handoff`] goes to another waiter.
pub struct Waiter<'a> {
    hub: &'a Hub,
    id: u64,
    slot: Arc<Slot>,
}

impl Waiter<'_> {
    /// Until this waiter is woken (at once if it was woken already).
    pub async fn woken(&self) {
        self.slot.notify.notified().await
    }

    /// The task handed to this waiter, if any: the poll now owns the duty to look at it.
    pub fn take_handoff(&self) -> Option<Fresh> {
        self.slot.handoff().take()
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.hub.waiters().remove(self.id);
        if let Some(task) = self.take_handoff() {
            self.hub.task_queued(task);
        }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn fresh(task: &str, selectors: &[&str]) -> Fresh {
        Fresh {
            task: task.into(),
            selectors: selector_key(&s(selectors)),
        }
    }

    async fn is_woken(w: &Waiter<'_>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), w.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_queued_task_wakes_one_matching_waiter_only() {
        let hub = Hub::default();
        let plain: Vec<_> = (0..100)
            .map(|i| hub.register(&format!("d{i}"), &[], true))
            .collect();
        let gpu = hub.register("g", &s(&["gpu", "linux"]), true);
        hub.task_queued(fresh("t1", &["gpu"]));
        assert!(is_woken(&gpu).await);
        assert_eq!(gpu.take_handoff().map(|f| f.task).as_deref(), Some("t1"));
        for w in &plain {
            assert!(!is_woken(w).await, "a delegate without the tag woke");
        }
        // A task without selectors wakes exactly one of the others: the longest waiting.
        hub.task_queued(fresh("t2", &[]));
        let woken: Vec<usize> = {
            let mut v = Vec::new();
            for (i, w) in plain.iter().enumerate() {
                if is_woken(w).await {
                    v.push(i);
                }
            }
            v
        };
        assert_eq!(woken, [0]);
        // Nobody may take it: nobody wakes and nothing is lost in the hub.
        hub.task_queued(fresh("t3", &["arm"]));
        assert!(!is_woken(&plain[1]).await);
    }

    #[tokio::test]
    async fn an_unused_handoff_passes_to_another_waiter() {
        let hub = Hub::default();
        let a = hub.register("a", &[], true);
        let b = hub.register("b", &[], true);
        hub.task_queued(fresh("t1", &[]));
        assert!(is_woken(&a).await);
        drop(a); // the poll ended (deadline, disconnect) without looking
        assert!(is_woken(&b).await);
        assert_eq!(b.take_handoff().map(|f| f.task).as_deref(), Some("t1"));
    }

    #[tokio::test]
    async fn a_poll_that_asks_for_no_task_is_never_handed_one() {
        let hub = Hub::default();
        let full = hub.register("full", &[], false);
        let free = hub.register("free", &[], true);
        hub.task_queued(fresh("t1", &[]));
        assert!(!is_woken(&full).await, "a max=0 poll was handed a task");
        assert!(is_woken(&free).await);
        // It still hears about its own cancellations.
        hub.wake_delegate("full");
        assert!(is_woken(&full).await);
    }

    #[tokio::test]
    async fn delegate_and_all_wakeups() {
        let hub = Hub::default();
        let a = hub.register("a", &[], true);
        let b = hub.register("b", &[], true);
        hub.wake_delegate("b");
        assert!(is_woken(&b).await);
        assert!(!is_woken(&a).await);
        assert!(b.take_handoff().is_none());
        hub.wake_all();
        assert!(is_woken(&a).await);
        assert!(hub.waiters().slots.is_empty());
    }
}
