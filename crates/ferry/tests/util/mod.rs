//! Helpers shared by the integration tests: running the real `ferry` binary
//! under a deadline, a server fixture on an ephemeral loopback port, and a
//! tree builder and comparer that check bytes, modes, mtimes and links.
//!
//! What is where (every test module takes all of it with `use crate::util::*`):
//! - `process`: running the binary: [`run`], [`spawn`], [`RunOptions`],
//!   [`Output`], [`unprivileged`], [`poll_until`], and each run's state home.
//! - `server`: the [`Server`] fixture, the wire's [`MAGIC`] and
//!   [`PROTOCOL_VERSION`], and [`unused_port`].
//! - `files`: [`Scratch`] directories, pseudo-random content ([`Rng`],
//!   [`write_random_file`]), modes, mtimes, [`lstat`] and [`mkfifo`].
//! - `tree`: [`build_full_tree`] with every case a transfer must preserve,
//!   and [`build_small_tree`].
//! - `compare`: [`assert_trees_equal`], [`assert_files_equal`] and
//!   [`part_files`].
//! - `wire`: frames and sessions written by hand, for hostile peers
//!   ([`control_frame`], [`data_frame`], [`open_session`], [`connect_from`]).
//! - `gate`: a forwarder that pauses a transfer at a byte count ([`Gate`]),
//!   so that a test can change the source in the middle of it.
//!
//! Each module's self-tests sit beside what they test. Every wait here is a
//! poll with a deadline, so a hung binary fails a test with its output
//! instead of hanging the suite.

mod compare;
mod files;
mod gate;
mod process;
mod server;
mod tree;
mod wire;

pub use compare::{assert_files_equal, assert_trees_equal, part_files};
pub use files::{
    MIB, Rng, Scratch, copy_into, lstat, mkfifo, random_bytes, set_mode, set_mtime, write_file,
    write_random_file,
};
pub use gate::Gate;
pub use process::{
    DEFAULT_TIMEOUT, ERROR_TIMEOUT, NOBODY, Output, RunOptions, Running, contains_ci, ferry_bin,
    is_root, poll_until, run, run_os, run_timeout, run_with, spawn, spawn_os, unprivileged,
};
pub use server::{MAGIC, PROTOCOL_VERSION, Server, unused_port};
pub use tree::{BIG_FILE, DEEP_FILE, FIFO, SPACED_FILE, build_full_tree, build_small_tree};
pub use wire::{
    connect_from, control_frame, data_frame, greet, hostile_download_session,
    hostile_upload_session, open_session, preface, read_frame, read_message, read_messages,
    read_root_entry,
};
