//! Writing files so that a crash never leaves half of one, and running a binary that was
//! just written. The agent's spool, the upgrader's state and links, and the release
//! tooling all need both; one copy here keeps them saying the same thing.
//!
//! - [`write_atomic`]: a temp file beside the target, written (and with
//!   [`Durability::PowerLoss`] fsynced), renamed over the target, and the directory
//!   fsynced, so a reader sees the old or the new content, never a part.
//! - [`retry_busy`] / [`retry_busy_blocking`]: `execve` of a file some process still holds
//!   open for writing fails with `ETXTBSY`; retry briefly (the module `busy` says why).

#![forbid(unsafe_code)]

mod busy;
mod write;

pub use busy::{BUSY_LIMIT, BUSY_PAUSE, is_busy, retry_busy, retry_busy_blocking};
pub use write::{Durability, WriteError, WriteOptions, sync_dir, write_atomic, write_atomic_with};
