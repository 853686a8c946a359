//! Running a binary that was just written, without the "Text file busy" race: the retry
//! lives in [`delegate_durable`] (release tooling uses it too); this is its tokio form.

pub use delegate_durable::{BUSY_LIMIT, retry_busy_blocking};

/// `spawn()` again while it fails with `ETXTBSY`, for at most [`BUSY_LIMIT`].
pub async fn retry_busy<T>(spawn: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    delegate_durable::retry_busy(spawn, tokio::time::sleep).await
}
