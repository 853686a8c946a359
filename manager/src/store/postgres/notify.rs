//! What manager nodes on one PostgreSQL tell each other: the [`Note`]s sent with `NOTIFY`
//! on one channel ([`CHANNEL`]) and their payloads.
//!
//! A node keeps nothing about the queue in memory; a submit, a re-queue, a cancel for a
//! delegate, a revoke or a log change reaches every node's hub (this node's included) as
//! a note, sent at commit and dropped with a rollback; each node listens on a connection
//! of its own ([`listen`]).

use std::time::Duration;

use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;
use tracing::{info, warn};

use super::tls::{Tls, connect};
use crate::error::StoreError;
use crate::store::rules::to_json;

/// The one channel every node listens on.
pub const CHANNEL: &str = "delegate_manager";

/// What another node (or this one) told every node, as read from a `NOTIFY` payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "e", rename_all = "snake_case")]
pub enum Note {
    /// A task was queued (or re-queued): wake one poll that may take it.
    Queued {
        task: String,
        selectors: Vec<String>,
    },
    /// Something about this delegate changed (a cancel for it, a drain, a re-register, a
    /// forget): wake its polls and forget cached facts about it.
    Delegate { id: String },
    /// A token was revoked: forget cached token names and wake every poll.
    Revoked,
    /// A log or a task's state changed: wake log followers.
    Changed,
}

impl Note {
    pub(crate) fn payload(&self) -> String {
        let s = to_json(self);
        // NOTIFY payloads are limited to 8000 bytes; selectors that long are absurd but
        // must not fail the submit: every poll looks instead.
        if s.len() > 7000 {
            return to_json(&Note::Revoked);
        }
        s
    }
}

/// Listen for every node's [`Note`]s on a connection of its own (to `config`, shown as
/// `url`), on a thread of its own, and hand each to `on_note`; see `PgStore::listen`.
pub(super) fn listen(
    config: postgres::Config,
    tls: Tls,
    url: String,
    on_note: impl Fn(&Note) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let connect = move || -> Result<Client, StoreError> {
        let mut c = connect(&config, &tls).map_err(|source| StoreError::PostgresConnect {
            url: url.clone(),
            source,
        })?;
        c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        Ok(c)
    };
    let first = connect()?;
    let handle = std::thread::Builder::new()
        .name("pg-listen".into())
        .spawn(move || {
            let mut client = Some(first);
            let mut backoff = Duration::from_millis(100);
            loop {
                let Some(c) = client.as_mut() else {
                    std::thread::sleep(backoff);
                    match connect() {
                        Ok(c) => {
                            info!("listening for other manager nodes again");
                            client = Some(c);
                            backoff = Duration::from_millis(100);
                            on_note(&Note::Revoked);
                        }
                        Err(e) => {
                            warn!("{}", crate::error::chain(&e));
                            backoff = (backoff * 2).min(Duration::from_secs(5));
                        }
                    }
                    continue;
                };
                let mut notes = c.notifications();
                let mut it = notes.blocking_iter();
                match it.next() {
                    Ok(Some(n)) => match serde_json::from_str::<Note>(n.payload()) {
                        Ok(note) => on_note(&note),
                        Err(e) => warn!(payload = n.payload(), "unknown note ({e})"),
                    },
                    Ok(None) | Err(_) => {
                        warn!(
                            "lost the LISTEN connection to PostgreSQL; wake-ups from \
                             other nodes wait until it is back"
                        );
                        drop(it);
                        drop(notes);
                        client = None;
                    }
                }
            }
        })
        .map_err(|e| StoreError::Invalid(format!("cannot start the LISTEN thread: {e}")))?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_oversized_ones_wake_everyone() {
        let q = Note::Queued {
            task: "t_1".into(),
            selectors: vec!["gpu".into()],
        };
        assert_eq!(serde_json::from_str::<Note>(&q.payload()).ok(), Some(q));
        let big = Note::Queued {
            task: "t_1".into(),
            selectors: vec!["x".repeat(8000)],
        };
        assert_eq!(
            serde_json::from_str::<Note>(&big.payload()).ok(),
            Some(Note::Revoked)
        );
    }
}
