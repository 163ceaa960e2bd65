//! What a transfer reports while it runs, and what it reports at the end.
//!
//! The engine never prints. It calls an [`EventSink`]: the binary turns the
//! events into progress bars, `-v` lines or NDJSON; the server turns them
//! into log lines.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_proto::limits::MAX_REASON_LEN;
use ferry_proto::message::Outcome;
use ferry_proto::path::{WirePath, escape};
use std::time::Duration;

/// One thing that happened during a transfer. Paths are already escaped
/// for display (see `ferry_proto::path::escape`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The sender knows how much the whole transfer holds.
    Totals { files: u64, bytes: u64 },
    /// A file started moving.
    FileStarted { path: String, size: u64 },
    /// This many more file bytes moved.
    Bytes { n: u64 },
    /// A file or symlink arrived, verified, under its final name.
    FileDone { path: String, size: u64 },
    /// An entry failed; the rest of the transfer goes on.
    FileFailed { path: String, reason: String },
    /// An entry was deliberately not transferred (fifo, socket, device).
    Skipped { path: String, reason: String },
    /// The sender's walk listed this entry, but it was gone when looked at
    /// (deleted meanwhile): not transferred.
    Vanished { path: String },
    /// The receiver already had this file, same size and mtime: not sent.
    Unchanged { path: String, size: u64 },
    /// This many bytes of a file were already at the receiver, verified,
    /// from an interrupted transfer: only the rest is sent.
    Resumed { path: String, bytes: u64 },
    /// A file did not arrive whole for a reason that sending it again may
    /// cure (a corrupt chunk, a digest mismatch, a file being changed).
    FileIncomplete { path: String, reason: String },
    /// The transfer attempt failed and will be tried again after `delay`.
    Retry {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// A server seen for the first time: its certificate's fingerprint
    /// is now remembered in `file` and expected from then on.
    NewServer {
        addr: String,
        fingerprint: String,
        file: PathBuf,
    },
}

impl Event {
    /// What an entry's outcome is as an event: `size` for a file that is
    /// in place. (A directory that succeeded is no event: its caller
    /// decides.)
    pub(crate) fn of_outcome(path: String, outcome: &Outcome, size: u64) -> Event {
        match outcome {
            Outcome::Ok => Event::FileDone { path, size },
            Outcome::Failed(why) => Event::FileFailed {
                path,
                reason: why.clone(),
            },
            Outcome::Skipped(why) => Event::Skipped {
                path,
                reason: why.clone(),
            },
            Outcome::Unchanged => Event::Unchanged { path, size },
            Outcome::Incomplete(why) => Event::FileIncomplete {
                path,
                reason: why.clone(),
            },
        }
    }
}

/// Receives events. Called from several threads.
pub trait EventSink: Send + Sync {
    fn event(&self, event: Event);
}

/// Text chosen by the peer, made safe to print and bounded in length.
pub(crate) fn peer_text(text: &str) -> String {
    // A cut inside a character shows as an escape: harmless.
    escape(&text.as_bytes()[..text.len().min(MAX_REASON_LEN)])
}

/// Name of an entry for events: the root's label, then the wire path.
pub(crate) fn display_name(label: &str, path: &WirePath) -> String {
    if path.is_root() {
        return label.to_string();
    }
    // Built in one allocation: this runs for every entry of a transfer.
    let mut name = String::with_capacity(label.len() + 1 + path.as_bytes().len());
    name.push_str(label);
    name.push('/');
    path.display_into(&mut name);
    name
}

/// The outcome of one transfer, as the side that ran it saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// Files and symlinks announced by the sender.
    pub files_total: u64,
    pub files_ok: u64,
    /// (path, reason) of each entry that failed.
    pub failed: Vec<(String, String)>,
    /// (path, reason) of each entry that was skipped.
    pub skipped: Vec<(String, String)>,
    /// (path, reason) of each file that may arrive if sent again.
    pub incomplete: Vec<(String, String)>,
    /// Each entry that vanished from the source while the tree was walked.
    pub vanished: Vec<String>,
    /// Files the receiver already had (counted in `files_ok` too).
    pub files_unchanged: u64,
    /// Bytes of files that were already at the receiver, not sent again.
    pub bytes_held: u64,
    /// Attempts that failed and were retried.
    pub retries: u32,
    /// File bytes moved (raw, before compression).
    pub file_bytes: u64,
    /// Bytes that crossed the connection, both ways, framing included.
    pub wire_bytes: u64,
}

/// A complete transfer: the report plus how long it took.
#[derive(Debug, Clone)]
pub struct TransferSummary {
    pub report: TransferReport,
    pub elapsed: Duration,
}

/// Builds a [`TransferReport`] from the events it forwards.
pub(crate) struct Tally {
    inner: Arc<dyn EventSink>,
    report: Mutex<TransferReport>,
}

impl Tally {
    pub(crate) fn new(inner: Arc<dyn EventSink>) -> Self {
        Tally {
            inner,
            report: Mutex::new(TransferReport::default()),
        }
    }

    pub(crate) fn report(&self) -> TransferReport {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TransferReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl EventSink for Tally {
    fn event(&self, event: Event) {
        {
            let mut r = self.lock();
            match &event {
                Event::Totals { files, .. } => r.files_total = *files,
                Event::Bytes { n } => r.file_bytes += n,
                Event::FileDone { .. } => r.files_ok += 1,
                Event::FileFailed { path, reason } => r.failed.push((path.clone(), reason.clone())),
                Event::Skipped { path, reason } => r.skipped.push((path.clone(), reason.clone())),
                Event::Unchanged { size, .. } => {
                    r.files_ok += 1;
                    r.files_unchanged += 1;
                    r.bytes_held += size;
                }
                Event::Resumed { bytes, .. } => r.bytes_held += bytes,
                Event::Vanished { path } => r.vanished.push(path.clone()),
                Event::FileIncomplete { path, reason } => {
                    r.incomplete.push((path.clone(), reason.clone()))
                }
                Event::FileStarted { .. } | Event::Retry { .. } | Event::NewServer { .. } => {}
            }
        }
        self.inner.event(event);
    }
}
