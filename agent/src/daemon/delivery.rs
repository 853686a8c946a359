//! Delivery of a task's spooled log and result to the manager.
//!
//! Logs are shipped live while a task runs and completely before its result; both retry
//! with backoff until the manager acknowledges them or refuses them for good, and the
//! spool entry is removed only then.

use std::sync::Arc;
use std::time::Duration;

use delegate_protocol::{ErrorCode, MAX_LOG_CHUNK_BYTES, TaskResult};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use crate::backoff::Backoff;
use crate::client::{ClientError, ManagerClient};
use crate::spool::TaskDir;

/// Ship log bytes while the task runs, so `task logs --follow` shows them live.
pub(super) async fn ship_live(shared: Arc<Shared>, dir: TaskDir, done: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::manager();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.cancelled() => return,
        }
        if dir.log_len() <= dir.acked() {
            continue;
        }
        let shipped = tokio::select! {
            r = ship_logs(&shared.client, &dir) => r,
            _ = done.cancelled() => return,
        };
        if let Err(e) = shipped {
            if shared.check_token_rejected(&e) {
                return;
            }
            debug!("live log shipping failed: {e}");
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = done.cancelled() => return,
            }
        } else {
            backoff.reset();
        }
    }
}

/// Send every log byte the manager does not have yet.
pub(super) async fn ship_logs(client: &ManagerClient, dir: &TaskDir) -> Result<(), ClientError> {
    const CHUNK: usize = if MAX_LOG_CHUNK_BYTES < 256 * 1024 {
        MAX_LOG_CHUNK_BYTES
    } else {
        256 * 1024
    };
    let mut acked = dir.acked();
    // A manager may ask once to go back (it lost bytes: `log_gap`); an answer that neither
    // moves forward nor back is refused, and the caller backs off with the data spooled.
    let mut rewound = false;
    loop {
        let len = dir.log_len();
        if acked >= len {
            return Ok(());
        }
        let chunk = dir
            .read_log(acked, CHUNK)
            .map_err(|e| ClientError::Protocol {
                what: "logs",
                reason: format!("spool: {e}"),
            })?;
        if chunk.is_empty() {
            return Ok(());
        }
        let chunk_len = chunk.len() as u64;
        let stored = match client.logs(&dir.task_id, dir.attempt, acked, chunk).await {
            Ok(ack) => ack.stored,
            Err(ClientError::Api {
                code: ErrorCode::LogGap,
                expected_offset: Some(want),
                ..
            }) => want,
            Err(e) => return Err(e),
        };
        let next = stored.min(len);
        if next < acked && !rewound {
            rewound = true;
        } else if next <= acked {
            return Err(ClientError::Protocol {
                what: "logs",
                reason: format!(
                    "the manager acknowledged {stored} bytes after being sent bytes {acked}..{}; keeping them in the spool and retrying later",
                    acked + chunk_len
                ),
            });
        }
        acked = next;
        // Harmless (a restart resends from the older mark, idempotently), and on a full
        // disk it would fail for every chunk: said once per task.
        match dir.set_acked(acked) {
            Err(e) if dir.first_ack_failure() => {
                warn!("cannot record the log acknowledgement: {e}")
            }
            Err(e) => debug!("cannot record the log acknowledgement: {e}"),
            Ok(()) => {}
        }
    }
}

/// Deliver logs, then the result, retrying with backoff until the manager has them or
/// refuses them for good. The spool entry is removed only then.
pub(super) async fn deliver(shared: &Arc<Shared>, dir: &TaskDir, result: &TaskResult) {
    let mut backoff = Backoff::manager();
    loop {
        if shared.gives_up() {
            return; // stays in the spool
        }
        let attempt = async {
            ship_logs(&shared.client, dir).await?;
            shared
                .client
                .result(&dir.task_id, dir.attempt, result)
                .await
        }
        .await;
        match attempt {
            Ok(()) => {
                debug!("result delivered");
                break;
            }
            Err(e)
                if matches!(
                    e.code(),
                    Some(
                        ErrorCode::StaleAttempt
                            | ErrorCode::ResultConflict
                            | ErrorCode::Finished
                            | ErrorCode::NotFound
                            | ErrorCode::InvalidSpec
                            | ErrorCode::BadRequest
                    )
                ) =>
            {
                warn!("the manager refused the result for good, dropping it: {e}");
                break;
            }
            Err(e) if shared.check_token_rejected(&e) => return, // stays in the spool
            Err(e) => {
                let delay = backoff.next_delay();
                if backoff.failures() == 1 {
                    warn!("delivering the result failed, will retry: {e}");
                } else {
                    debug!("delivering the result failed again: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.stopped() => return,
                }
            }
        }
    }
    if let Err(e) = dir.remove() {
        warn!("cannot remove the delivered task from the spool: {e}");
    }
}
