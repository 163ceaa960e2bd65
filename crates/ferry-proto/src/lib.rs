//! ferry's wire protocol, without I/O.
//!
//! This crate turns bytes into protocol values and values into bytes. It
//! opens no sockets, touches no files and reads no clocks: the engine
//! (`ferry-engine`) drives it. `PROTOCOL.md` at the root of the repository
//! is the normative description; the golden-bytes tests in this crate keep
//! the two in step.
//!
//! # Layout
//! - [`preface`]: the 8 bytes each side sends first (magic and version).
//! - [`frame`]: length-prefixed frames; every length is checked against a
//!   per-type maximum before any memory is reserved.
//! - [`message`]: JSON control messages (requests, entries, outcomes).
//! - [`chunk`]: the binary header of a data chunk and its codec.
//! - [`path`]: paths as bytes, validated on receipt so a peer cannot name
//!   anything outside the transfer root.
//! - [`digest`]: chunk hashes and the whole-file digest, and the ledger a
//!   receiver keeps to prove a file arrived whole.
//!
//! # Invariants
//! - Decoding never allocates more than the limits in [`limits`] allow,
//!   whatever the peer sends.
//! - A decoder either returns a complete value, says more bytes are needed,
//!   or returns an error; it never panics on any input.

pub mod chunk;
pub mod delta;
pub mod digest;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod hot;
mod json;
pub mod message;
pub mod path;
pub mod preface;

/// Hard limits that every decoder enforces before allocating.
pub mod limits {
    /// Largest raw (uncompressed) chunk a peer may send.
    pub const MAX_CHUNK_LEN: u32 = 4 * 1024 * 1024;
    /// The chunk size ferry's sender uses.
    pub const DEFAULT_CHUNK_LEN: u32 = 1024 * 1024;

    /// Whether the data of file entry `id` of `size` bytes may follow its
    /// entry before its plan (PROTOCOL.md §8.5): the transfer's root, a
    /// file of one chunk at most, so that a one-file transfer needs no
    /// round trip for its plan.
    pub fn goes_unplanned(id: u64, size: u64) -> bool {
        id == 1 && size <= DEFAULT_CHUNK_LEN as u64
    }
    /// Largest JSON control message.
    pub const MAX_CONTROL_LEN: u32 = 256 * 1024;
    /// Largest path on the wire, in bytes.
    pub const MAX_PATH_LEN: usize = 4096;
    /// Largest single path component, in bytes (Linux NAME_MAX).
    pub const MAX_COMPONENT_LEN: usize = 255;
    /// Largest free-text field (error reasons) a peer may send.
    pub const MAX_REASON_LEN: usize = 4096;
    /// Most connections one session may have, the control one included.
    pub const MAX_STREAMS: u32 = 16;
    /// Most file entries a sender may have announced whose `file_end` or
    /// `abort` it has not sent yet (files answered `unchanged` excepted):
    /// the receiver holds a part file open for each.
    pub const MAX_FILES_AHEAD: u64 = 1024;
    /// Most runs a `have` message may list (it must fit one control frame).
    pub const MAX_HAVE_RUNS: usize = 2048;
    /// Most directory entries a sender may have announced whose `outcome`
    /// has not reached it. The receiver holds each such directory open (its
    /// path, a handle on its parent) until its `dir_end` has come and all
    /// below it is settled: without a bound, a peer could announce
    /// directories and never end them until the receiver's memory ran out.
    ///
    /// An honest walk never needs this many. The directories it is still
    /// inside are at most `MAX_PATH_LEN / 2 + 1` = 2049 (the root, and a
    /// level per two bytes of the longest path: a one-byte name and a
    /// `/`); every other
    /// unanswered directory is ended, and is answered once the files below
    /// it, of which at most `MAX_FILES_AHEAD` wait for their data, have
    /// been sent. So a sender at the bound sends what it can, waits for
    /// outcomes, and is soon back below it.
    pub const MAX_OPEN_DIRS: usize = 4096;
    /// Most `hardlink` entries a receiver holds while the file they name
    /// is still arriving (each until that file is settled). A sender that
    /// keeps at most this many entries unanswered stays within it.
    pub const MAX_WAITING_LINKS: usize = 64 * 1024;

    // The walk's own depth must leave room below the bound, or a deep
    // tree could make an honest sender wait forever.
    const _: () = assert!(MAX_OPEN_DIRS > MAX_PATH_LEN / 2 + 1);
}

/// The protocol version this crate speaks. Bumped on any change to the wire.
///
/// 2: sessions of several connections (`welcome` carries a secret and a
/// stream limit; `join` / `joined` attach data connections).
///
/// 3: resume. The receiver plans each file before its data is sent
/// (`have`, `planned`, `outcome` `unchanged`), entries run ahead of file
/// data, `incomplete` outcomes and transient aborts, `keepalive`.
///
/// 4: authentication. A server that requires a token answers `hello`
/// with `challenge`; the client proves the token with `auth`. A sender
/// keeps at most `MAX_OPEN_DIRS` directories unanswered.
///
/// 5: owners, holes and hard links. Entries may carry their owner's ids
/// (a download may ask for them); a full chunk of zeros travels as a
/// header (codec `zeros`); a `hardlink` entry names a file sent earlier;
/// `fifo` and `device` entries carry what it takes to make them.
///
/// 6: an `error` may name the path it is about (`path`), so that a
/// failure reads "server: photos/2024: permission denied".
pub const PROTOCOL_VERSION: u16 = 8;
