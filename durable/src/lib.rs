//! Writing files so that a crash never leaves half of one, and running a binary that was
//! just written: the host-side file habits the agent's spool, the upgrader and the release
//! tooling share, in one copy so they keep saying the same thing.
//!
//! - [`write_atomic`]: a temp file beside the target, written, renamed over the target, so
//!   a reader sees the old or the new content, never a part; with
//!   [`Durability::PowerLoss`] (the default) the file is fsynced before the rename and the
//!   directory after it.
//! - [`retry_busy`] / [`retry_busy_blocking`]: `execve` of a file some process still holds
//!   open for writing fails with `ETXTBSY`; retry briefly (the module `busy` says why).

#![forbid(unsafe_code)]

mod busy;
mod write;

pub use busy::{BUSY_LIMIT, BUSY_PAUSE, is_busy, retry_busy, retry_busy_blocking};
pub use write::{Durability, WriteError, WriteOptions, sync_dir, write_atomic, write_atomic_with};
