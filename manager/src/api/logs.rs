//! Reading a task's log over HTTP: one page at a time, and with `follow` for as long as
//! the task runs (across re-queues), so that the manager holds one page per reader
//! whatever the log's size.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use delegate_protocol::{LogQuery, MAX_LOG_CHUNK_BYTES};
use tokio::sync::watch;
use tracing::warn;

use super::error::ApiResult;
use super::{AdminAuth, App, P, Q};
use crate::hub;

/// Largest piece of a log read from the store and sent at once (reads and follows).
const LOG_PAGE: usize = MAX_LOG_CHUNK_BYTES;

fn text_headers() -> [(header::HeaderName, HeaderValue); 2] {
    [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ]
}

pub(super) async fn read_log(
    State(app): State<App>,
    _: AdminAuth,
    P(id): P,
    Q(q): Q<LogQuery>,
) -> ApiResult<Response> {
    // Read the first page now so a missing task is a JSON 404 rather than an empty stream.
    let task = id.clone();
    let first = app
        .db(move |s| s.read_log(&task, q.offset, LOG_PAGE))
        .await?;
    let reader = LogReader {
        changes: app.hub.subscribe_changes(),
        shutdown: app.hub.subscribe_shutdown(),
        app,
        id,
        offset: q.offset + first.data.len() as u64,
        attempt: first.attempt,
        first: (!first.data.is_empty()).then(|| Bytes::from(first.data)),
        follow: q.follow,
    };
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        r.next_page().await.map(|b| (Ok::<Bytes, Infallible>(b), r))
    });
    Ok((text_headers(), Body::from_stream(stream)).into_response())
}

/// Sends a log one page at a time, reading the next page only when the client took the
/// last one: the manager holds one page per reader, whatever the log's size. Without
/// `follow` it ends at the end of what is stored; with it, it waits for more whenever the
/// hub says something changed, and ends once the task is finished and every byte was sent.
struct LogReader {
    app: App,
    id: String,
    offset: u64,
    attempt: u32,
    first: Option<Bytes>,
    follow: bool,
    changes: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

impl LogReader {
    async fn next_page(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            self.changes.borrow_and_update();
            let (id, offset) = (self.id.clone(), self.offset);
            let slice = match self
                .app
                .db(move |s| s.read_log(&id, offset, LOG_PAGE))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(task_id = %self.id, "log reader stops: {}", crate::error::chain(&e));
                    return None;
                }
            };
            if slice.attempt != self.attempt {
                if !self.follow {
                    // Re-queued while being read: this attempt's log is gone.
                    return None;
                }
                // Re-queued: the new attempt's log starts at byte 0.
                self.attempt = slice.attempt;
                self.offset = 0;
                return Some(Bytes::from(format!(
                    "\n[delegate-manager] task re-queued; log of attempt {} follows\n",
                    slice.attempt
                )));
            }
            if !slice.data.is_empty() {
                self.offset += slice.data.len() as u64;
                return Some(Bytes::from(slice.data));
            }
            if !self.follow || (slice.state.is_terminal() && self.offset >= slice.stored) {
                return None;
            }
            tokio::select! {
                r = self.changes.changed() => if r.is_err() { return None },
                _ = hub::stopping(&mut self.shutdown) => return None,
            }
        }
    }
}
