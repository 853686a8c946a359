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
//!
//! A long poll holds one of the `--max-connections` slots for as long as it waits, so the
//! hub also bounds who may hold them ([`Hub::open_poll`], docs/security.md, second review, finding 12): a delegate has
//! one open poll (a new one ends the old one, which its agent has given up on anyway), and
//! the delegates of one token hold at most `max_polls_per_token` at once (more are
//! refused with 429), so one token cannot take every slot and time out the heartbeats of
//! the rest of the fleet.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use delegate_protocol::selectors_match;
use tokio::sync::{Notify, watch};

use crate::queue::{Fresh, Selectors, selector_key};

pub struct Hub {
    waiters: Mutex<Waiters>,
    polls: Mutex<Polls>,
    /// Most long polls the delegates of one token may have open at once.
    max_polls_per_token: usize,
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

/// The open long polls: one per delegate, counted per token.
#[derive(Default)]
struct Polls {
    next: u64,
    by_delegate: HashMap<String, OpenPoll>,
    per_token: HashMap<String, usize>,
}

struct OpenPoll {
    id: u64,
    token: String,
    /// Told when a newer poll of the same delegate replaces this one.
    replaced: Arc<Notify>,
}

impl Polls {
    fn count(&mut self, token: &str, up: bool) {
        let n = self.per_token.entry(token.to_string()).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_token.remove(token);
            }
        }
    }
}

/// A long poll refused because its token holds the most allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "token {token:?} has {max} long polls open, the most allowed per token \
     (--max-polls-per-token); give each host its own token, or raise the limit"
)]
pub struct TooManyPolls {
    pub token: String,
    pub max: usize,
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

/// Polls a token may hold when the hub is made without a limit (tests, `Hub::default`).
const DEFAULT_MAX_POLLS_PER_TOKEN: usize = 500;

impl Default for Hub {
    fn default() -> Self {
        Hub::new(DEFAULT_MAX_POLLS_PER_TOKEN)
    }
}

impl Hub {
    /// A hub that lets the delegates of one token hold `max_polls_per_token` open polls.
    pub fn new(max_polls_per_token: usize) -> Hub {
        Hub {
            polls: Mutex::new(Polls::default()),
            max_polls_per_token: max_polls_per_token.max(1),
            waiters: Mutex::new(Waiters::default()),
            waiting: AtomicUsize::new(0),
            looks: AtomicU64::new(0),
            changes: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
        }
    }
}

impl Hub {
    /// Admit a long poll of `delegate` (with token `token`) for as long as the returned
    /// ticket lives. An open poll of the same delegate is told to end (it answers 204);
    /// a token whose delegates hold `max_polls_per_token` polls is refused.
    pub fn open_poll(&self, token: &str, delegate: &str) -> Result<PollTicket<'_>, TooManyPolls> {
        let mut p = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        let replaces = p.by_delegate.get(delegate).map(|o| o.token.clone());
        let held = p.per_token.get(token).copied().unwrap_or(0);
        if replaces.as_deref() != Some(token) && held >= self.max_polls_per_token {
            return Err(TooManyPolls {
                token: token.to_string(),
                max: self.max_polls_per_token,
            });
        }
        let id = p.next;
        p.next += 1;
        let replaced = Arc::new(Notify::new());
        let old = p.by_delegate.insert(
            delegate.to_string(),
            OpenPoll {
                id,
                token: token.to_string(),
                replaced: replaced.clone(),
            },
        );
        match old {
            Some(old) => {
                if old.token != token {
                    p.count(&old.token, false);
                    p.count(token, true);
                }
                old.replaced.notify_one();
            }
            None => p.count(token, true),
        }
        Ok(PollTicket {
            hub: self,
            id,
            delegate: delegate.to_string(),
            replaced,
        })
    }

    /// How many long polls the delegates of `token` hold open now.
    pub fn open_polls(&self, token: &str) -> usize {
        let p = self.polls.lock().unwrap_or_else(|e| e.into_inner());
        p.per_token.get(token).copied().unwrap_or(0)
    }

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

/// An admitted long poll (see [`Hub::open_poll`]); dropping it frees its place.
pub struct PollTicket<'a> {
    hub: &'a Hub,
    id: u64,
    delegate: String,
    replaced: Arc<Notify>,
}

impl PollTicket<'_> {
    /// Until a newer poll of the same delegate replaced this one (at once if it did).
    pub async fn replaced(&self) {
        self.replaced.notified().await
    }
}

impl Drop for PollTicket<'_> {
    fn drop(&mut self) {
        let mut p = self.hub.polls.lock().unwrap_or_else(|e| e.into_inner());
        // A replaced ticket's place went to its successor.
        if p.by_delegate.get(&self.delegate).map(|o| o.id) == Some(self.id)
            && let Some(mine) = p.by_delegate.remove(&self.delegate)
        {
            p.count(&mine.token, false);
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

    /// Second review, finding 12: one token's polls could hold every connection slot.
    #[tokio::test]
    async fn a_delegate_has_one_open_poll_and_a_token_a_bounded_number() {
        let hub = Hub::new(2);
        let a1 = hub.open_poll("t", "a").expect("first poll of a");
        let a2 = hub.open_poll("t", "a").expect("a replaces its poll");
        tokio::time::timeout(Duration::from_millis(100), a1.replaced())
            .await
            .expect("the replaced poll is told to end");
        assert_eq!(hub.open_polls("t"), 1);
        drop(a1);
        assert_eq!(
            hub.open_polls("t"),
            1,
            "the replaced poll freed its successor's place"
        );
        let b = hub.open_poll("t", "b").expect("second delegate");
        let refused = hub.open_poll("t", "c").err().expect("a third is refused");
        assert_eq!(refused.max, 2);
        // Another token is not affected, and a delegate may still replace its own poll.
        let _other = hub.open_poll("u", "x").expect("other token");
        let _b2 = hub
            .open_poll("t", "b")
            .expect("b replaces its poll at the cap");
        drop(b);
        drop(a2);
        assert_eq!(hub.open_polls("t"), 1);
        let _c = hub.open_poll("t", "c").expect("room again");
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
