//! ferry's transfer engine.
//!
//! Sessions over TCP, the sender and receiver pipelines, hashing and
//! compression, confined filesystem access, and the server's accept loop.
//! The engine is role-agnostic: one sender and one receiver serve both
//! directions (an upload runs the sender in the client and the receiver in
//! the server; a download the other way round).
//!
//! # Layout
//! - [`client`]: connect, handshake, request; [`client::upload`] and
//!   [`client::download`].
//! - [`server`]: [`server::serve`] takes a bound listener and a shutdown
//!   future; [`policy`]: which token gets which root, and which way files
//!   may move there.
//! - `sender` / `receiver`: the two halves of a transfer, each split into
//!   `rules` (pure decisions over messages and metadata) and the I/O that
//!   carries them out (`walk`, `producer`, `frames`; `worker`, `place`).
//! - `fsx`: filesystem access through directory handles that never
//!   follows a symlink below the root of a transfer.
//! - `codec`: chunk hashing and compression; `conn`: frames over a socket.
//! - [`events`]: what a transfer reports while it runs and at the end;
//!   [`error`]: what ends a session, and [`error::Violation`], what a peer
//!   did against the protocol.
//! - `sessions` (tests only): whole exchanges in memory.
//!
//! ARCHITECTURE.md at the repository's root maps it all.
//!
//! # Invariants
//! - Nothing is written outside the destination, whatever the peer sends
//!   or the tree contains.
//! - A file appears under its name only complete and verified.
//! - Memory is bounded by queue depths times the chunk size; a server's
//!   sessions share one budget of memory and one of descriptors
//!   (`budget`), and a session that makes no progress ends (`progress`).

mod adapt;
pub mod auth;
pub mod budget;
pub mod client;
mod codec;
mod conn;
mod delta;
pub mod error;
pub mod events;
mod filter;
mod fsx;
mod journal;
mod names;
pub mod pace;
pub mod policy;
mod progress;
mod receiver;
mod sender;
pub mod server;
#[cfg(test)]
mod sessions;
pub mod snapshots;
mod sweep;
mod throttle;
pub mod tls;
pub mod widen;

pub use error::EngineError;
pub use ferry_proto::message::{
    Change, Compression, EntryKind, FilterRule, HeldBack, Keep, Mirror, Mtime, RuleKind,
};
pub use ferry_proto::path::escape;
pub use receiver::MAX_LINK_DESTS;
pub use tokio_util::sync::CancellationToken;

/// This build's name and version, sent in the handshake for logs.
pub const SOFTWARE: &str = concat!("ferry ", env!("CARGO_PKG_VERSION"));

/// Test data: `n` bytes of xorshift noise from `seed`, which no compressor
/// shrinks and no two seeds share.
#[cfg(test)]
pub(crate) fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
