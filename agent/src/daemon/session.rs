//! The agent's conversation with the manager: register (retrying with backoff), heartbeat
//! (renewing leases, receiving cancels and revocations) and the long poll that leases tasks.
//!
//! A poll that may lease tasks is never abandoned half-way, so a task cannot be stranded
//! on this delegate until its lease lapses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use delegate_protocol::RegisterRequest;
use tracing::{Instrument, debug, info, warn};

use super::supervise::{spawn_refusal, spawn_task};
use super::targets::probe_docker;
use super::{Event, Shared, StopReason, heartbeat_request};
use crate::backoff::Backoff;
use crate::state::AgentState;

/// Register (retrying forever with backoff), then keep heartbeating and polling.
pub(super) async fn session(shared: Arc<Shared>) {
    let Some(interval) = register(&shared).await else {
        return;
    };
    let hb = tokio::spawn(heartbeat_loop(shared.clone(), interval).in_current_span());
    acquire_loop(&shared).await;
    hb.abort();
}

/// Returns the heartbeat interval, or `None` when the agent stopped before registering.
pub(super) async fn register(shared: &Arc<Shared>) -> Option<Duration> {
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    let req = RegisterRequest {
        name: shared.config.name.clone(),
        hostname,
        version: crate::VERSION.to_string(),
        tags: shared.config.tags.clone(),
        targets: shared.targets(),
        capacity: shared.config.concurrency,
        upgrade_group: shared.config.upgrade_group.clone(),
    };
    let mut backoff = Backoff::manager();
    loop {
        let attempt = tokio::select! {
            r = shared.client.register(&req) => r,
            _ = shared.polls_ended() => return None,
        };
        match attempt {
            Ok(resp) => {
                info!(delegate_id = %resp.delegate_id, name = %req.name, "registered with the manager");
                tracing::Span::current().record("delegate_id", resp.delegate_id.as_str());
                shared.delegate_id.send_replace(Some(resp.delegate_id));
                shared.set_connected(true);
                shared.apply_or_log(Event::Registered);
                return Some(Duration::from_secs(
                    resp.heartbeat_interval_secs.clamp(1, 300),
                ));
            }
            Err(e) => {
                shared.set_connected(false);
                if shared.check_registration_refused(&e) {
                    return None;
                }
                let delay = backoff.next_delay();
                let retry =
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
                warn!(
                    attempt = backoff.failures(),
                    "registration failed: {e}; retrying in {retry}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.polls_ended() => return None,
                }
            }
        }
    }
}

pub(super) async fn heartbeat_loop(shared: Arc<Shared>, interval: Duration) {
    let mut backoff = Backoff::new(Duration::from_secs(1), interval);
    // The first heartbeat goes at once: the manager learns `running` without waiting.
    let mut delay = Duration::ZERO;
    loop {
        tokio::time::sleep(delay).await;
        let Some(id) = shared.delegate_id.borrow().clone() else {
            return;
        };
        let req = heartbeat_request(&shared);
        match shared.client.heartbeat(&id, &req).await {
            Ok(resp) => {
                backoff.reset();
                delay = interval;
                shared.set_connected(true);
                for t in resp.cancel {
                    info!(task_id = %t, "cancel requested by the manager");
                    shared.stop_task(&t, StopReason::Cancelled);
                }
                for t in resp.revoked {
                    warn!(task_id = %t, "the manager no longer assigns this task to us; stopping it");
                    shared.stop_task(&t, StopReason::Revoked);
                }
                for k in resp.revoked_attempts {
                    warn!(task_id = %k.id, attempt = k.attempt, "the manager no longer assigns this attempt to us; stopping it");
                    shared.stop_attempt(&k, StopReason::Revoked);
                }
                // An engine that came up after the agent: register again to advertise it.
                let kube_up = shared.targets_changed.swap(false, Ordering::Relaxed);
                if (probe_docker(&shared, true).await || kube_up)
                    && register(&shared).await.is_none()
                {
                    return;
                }
            }
            Err(e) if shared.check_token_rejected(&e) => return,
            Err(e) if e.is_unknown_delegate() => {
                warn!("the manager does not know this delegate any more; registering again");
                if register(&shared).await.is_none() {
                    return;
                }
            }
            Err(e) => {
                shared.set_connected(false);
                delay = backoff.next_delay();
                if backoff.failures() == 1 {
                    warn!("heartbeat failed: {e}");
                } else {
                    debug!("heartbeat failed again: {e}");
                }
            }
        }
    }
}

pub(super) async fn acquire_loop(shared: &Arc<Shared>) {
    let wait = shared.config.acquire_wait;
    let mut backoff = Backoff::manager();
    loop {
        if shared.polls_end() {
            return;
        }
        let takes_tasks = *shared.state.borrow() == AgentState::Running;
        let Some(id) = shared.delegate_id.borrow().clone() else {
            return;
        };
        let free = if takes_tasks {
            u32::try_from(shared.slots.available_permits()).unwrap_or(u32::MAX)
        } else {
            0
        };
        let poll = shared.client.acquire(&id, wait, free);
        let result = if free == 0 {
            // Only cancellations can come: safe to abandon when a slot frees up.
            tokio::select! {
                r = poll => r,
                _ = shared.slot_freed.notified() => continue,
                _ = shared.polls_ended() => return,
            }
        } else {
            // A poll that may lease tasks is never dropped half-way (the task would be
            // stranded until its lease lapsed), except when stopping for good.
            tokio::select! {
                r = poll => r,
                _ = shared.polls_ended() => return,
            }
        };
        match result {
            Ok(Some(resp)) => {
                backoff.reset();
                shared.set_connected(true);
                for t in resp.cancel {
                    info!(task_id = %t, "cancel requested by the manager");
                    shared.stop_task(&t, StopReason::Cancelled);
                }
                let leased = resp.tasks.len();
                let mut over = 0;
                for a in resp.tasks {
                    match shared.slots.clone().try_acquire_owned() {
                        Ok(permit) => spawn_task(shared.clone(), a, permit),
                        Err(_) => {
                            over += 1;
                            spawn_refusal(shared.clone(), a, leased, free);
                        }
                    }
                }
                if over > 0 {
                    warn!(
                        leased,
                        asked = free,
                        "the manager leased {leased} task(s) for {free} free slot(s); reporting the {over} that do not fit as lost"
                    );
                }
            }
            Ok(None) => {
                backoff.reset();
                shared.set_connected(true);
            }
            Err(e) if shared.check_token_rejected(&e) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                if e.is_unknown_delegate() {
                    // The heartbeat loop re-registers; wait for it with the same backoff.
                    debug!("polling for tasks: the manager does not know this delegate yet");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shared.polls_ended() => return,
                    }
                    continue;
                }
                shared.set_connected(false);
                if backoff.failures() == 1 {
                    warn!("polling for tasks failed: {e}");
                } else {
                    debug!("polling for tasks failed again: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.polls_ended() => return,
                }
            }
        }
    }
}
