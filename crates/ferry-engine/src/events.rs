//! What a transfer reports while it runs, and what it reports at the end.
//!
//! The engine never prints. It calls an [`EventSink`]: the binary turns the
//! events into progress bars, `-v` lines or NDJSON; the server turns them
//! into log lines.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_proto::limits::MAX_REASON_LEN;
use ferry_proto::message::{Change, EntryKind, HeldBack, Outcome};
use ferry_proto::path::{WirePath, escape};

use crate::progress::Progress;
use std::time::Duration;

/// The side of a transfer an entry failed on, as this process sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Origin {
    /// This process: the event names the entry as it is here.
    #[default]
    Here,
    /// The peer, which said so: the event names the entry as the peer has
    /// it (the destination's path in an upload, the source's in a
    /// download).
    Peer,
}

/// An entry that did not arrive: its name, why, on which side, and
/// whether it is a directory (which counts apart from the files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub path: String,
    pub reason: String,
    pub origin: Origin,
    pub dir: bool,
}

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
    /// An entry failed; the rest of the transfer goes on. `origin`: the
    /// side it failed on (`path` is that side's name of it); `dir`: a
    /// directory.
    FileFailed {
        path: String,
        reason: String,
        origin: Origin,
        dir: bool,
    },
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
    /// cure (a corrupt chunk, a digest mismatch, a file being changed);
    /// `origin` and `dir` as for [`Event::FileFailed`].
    FileIncomplete {
        path: String,
        reason: String,
        origin: Origin,
        dir: bool,
    },
    /// The transfer attempt failed and will be tried again after `delay`.
    Retry {
        attempt: u32,
        delay: Duration,
        reason: String,
    },
    /// Placing this entry changed (or, in a dry run, would change) what
    /// the destination had: `what` differs. `size`: a file's.
    Changed {
        path: String,
        what: Vec<Change>,
        dir: bool,
        size: u64,
    },
    /// `ferry ls`: an entry of the tree listed, as the sender announced it.
    Listed { path: String, kind: EntryKind },
    /// An entry of the destination that the source does not have was
    /// deleted (`--delete`); `dir`: a directory, emptied first.
    Deleted { path: String, dir: bool },
    /// An entry that `--delete` should have deleted is still there.
    DeleteFailed { path: String, reason: String },
    /// `--delete` deleted nothing, and this is why.
    HeldBack(HeldBack),
    /// `--atomic`: the new version of `path` was switched in (`previous`:
    /// the one it replaced is kept), or, with `refused`, why it was not
    /// (the live tree is untouched; the next run resumes the staging).
    Published {
        path: String,
        previous: bool,
        refused: Option<String>,
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
    /// decides.) A failure is this side's, of a file: see
    /// [`Event::failed_at`].
    pub(crate) fn of_outcome(path: String, outcome: &Outcome, size: u64) -> Event {
        let (origin, dir) = (Origin::Here, false);
        match outcome {
            Outcome::Ok => Event::FileDone { path, size },
            Outcome::Failed(why) => Event::FileFailed {
                path,
                reason: why.clone(),
                origin,
                dir,
            },
            Outcome::Skipped(why) => Event::Skipped {
                path,
                reason: why.clone(),
            },
            Outcome::Unchanged => Event::Unchanged { path, size },
            Outcome::Incomplete(why) => Event::FileIncomplete {
                path,
                reason: why.clone(),
                origin,
                dir,
            },
        }
    }

    /// The same event, a failure on the side `at`, of a directory if
    /// `is_dir`; other events are left as they are.
    pub(crate) fn failed_at(mut self, at: Origin, is_dir: bool) -> Event {
        if let Some((_, origin, dir)) = self.failure_mut() {
            (*origin, *dir) = (at, is_dir);
        }
        self
    }

    /// The same event, a failure on the side `at` named as that side has
    /// it: under `to` instead of `from` (see [`rebase`]).
    pub(crate) fn named_for(mut self, at: Origin, (from, to): (&str, &str)) -> Event {
        if let Some((path, origin, _)) = self.failure_mut()
            && *origin == at
        {
            *path = rebase(path, from, to);
        }
        self
    }

    fn failure_mut(&mut self) -> Option<(&mut String, &mut Origin, &mut bool)> {
        match self {
            Event::FileFailed {
                path, origin, dir, ..
            }
            | Event::FileIncomplete {
                path, origin, dir, ..
            } => Some((path, origin, dir)),
            _ => None,
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

/// An outcome the peer sent, its reason made safe to print.
pub(crate) fn peer_outcome(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Failed(why) => Outcome::Failed(peer_text(&why)),
        Outcome::Skipped(why) => Outcome::Skipped(peer_text(&why)),
        Outcome::Incomplete(why) => Outcome::Incomplete(peer_text(&why)),
        Outcome::Ok | Outcome::Unchanged => outcome,
    }
}

/// An event's name of an entry (`path`, under the root's name `from`), as
/// named under `to` instead: what changes in a destination is shown under
/// the destination's name.
pub(crate) fn rebase(path: &str, from: &str, to: &str) -> String {
    format!("{to}{}", path.strip_prefix(from).unwrap_or(path))
}

/// Name of a path below the root for events, from bytes not checked as a
/// wire path (what a receiver found in its own tree).
pub(crate) fn display_bytes(label: &str, path: &[u8]) -> String {
    format!("{label}/{}", ferry_proto::path::escape(path))
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
///
/// What counts: entries that are not directories (files, symlinks, hard
/// links, nodes, special files), each once, whichever way it settled:
/// `files_total` is always `files_ok + files_failed + files_skipped +
/// files_incomplete` (and a client's final report has no incomplete ones
/// left: what never arrived counts as failed). A directory that fails is
/// counted in `dirs_failed` (what is inside it counts on its own), one
/// that vanished in `vanished` only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// Entries settled, as above.
    pub files_total: u64,
    pub files_ok: u64,
    pub files_failed: u64,
    pub dirs_failed: u64,
    pub files_skipped: u64,
    pub files_incomplete: u64,
    /// Each entry that failed, files and directories.
    pub failed: Vec<Failure>,
    /// (path, reason) of each entry that was skipped.
    pub skipped: Vec<(String, String)>,
    /// Each file that may arrive if sent again.
    pub incomplete: Vec<Failure>,
    /// Each entry that vanished from the source while the tree was walked.
    pub vanished: Vec<String>,
    /// Entries counted but left out of the lists above, which a server
    /// keeps short: it logs each entry as it comes, and must not remember
    /// whatever a client makes fail.
    pub unlisted: Unlisted,
    /// Files the receiver already had (counted in `files_ok` too).
    pub files_unchanged: u64,
    /// Bytes of files that were already at the receiver, not sent again.
    pub bytes_held: u64,
    /// Attempts that failed and were retried.
    pub retries: u32,
    /// Entries `--delete` deleted.
    pub deleted: u64,
    /// With `--itemize` or `--dry-run`: entries created and updated, and
    /// the bytes of the files among them whose content is (or would be)
    /// sent.
    pub created: u64,
    pub updated: u64,
    pub bytes_changed: u64,
    /// (path, reason) of each entry `--delete` could not delete.
    pub delete_failed: Vec<(String, String)>,
    /// Why `--delete` deleted nothing, if it was held back.
    pub held_back: Option<HeldBack>,
    /// `--atomic`: whether the new version was published.
    pub published: Option<bool>,
    /// File bytes moved (raw, before compression).
    pub file_bytes: u64,
    /// Bytes that crossed the connection, both ways, framing included.
    pub wire_bytes: u64,
}

impl TransferReport {
    /// No more attempts: what is still incomplete counts as failed.
    pub(crate) fn give_up_incomplete(&mut self) {
        self.files_failed += std::mem::take(&mut self.files_incomplete);
        self.dirs_failed += self.incomplete.iter().filter(|f| f.dir).count() as u64;
        self.failed.append(&mut self.incomplete);
        self.unlisted.failed += std::mem::take(&mut self.unlisted.incomplete);
    }
}

/// How many entries of each list a report left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unlisted {
    pub failed: u64,
    pub skipped: u64,
    pub incomplete: u64,
    pub vanished: u64,
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
    /// Entries listed at most in each of the report's lists.
    listed: usize,
    /// Where what the transfer achieves is reported, for its stall watch.
    progress: Option<Arc<Progress>>,
}

/// Entries a server lists of each kind in a session's report (the rest
/// are counted): its log has a line for each.
pub(crate) const SERVER_LISTED: usize = 16;

impl Tally {
    pub(crate) fn new(inner: Arc<dyn EventSink>) -> Self {
        Tally {
            inner,
            report: Mutex::new(TransferReport::default()),
            listed: usize::MAX,
            progress: None,
        }
    }

    /// The same tally, reporting what the transfer achieves to `progress`:
    /// file bytes, settled entries, and work this side does for it.
    pub(crate) fn watched(mut self, progress: Arc<Progress>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// An entry was settled without an event (a directory, in place).
    pub(crate) fn settled(&self) {
        if let Some(p) = &self.progress {
            p.made();
        }
    }

    /// This side works for the transfer on its own for a while (a journal
    /// checked, held chunks hashed), and has told the peer so.
    pub(crate) fn working(&self) {
        self.settled();
    }

    /// A data frame went into a connection. The sender's chunks count as
    /// sent when they are queued; on a slow link the queues and socket
    /// buffers behind the last one take long to drain, and that is
    /// progress too.
    pub(crate) fn data_written(&self) {
        self.settled();
    }

    /// The peer said it is alive, and no more; it may have `work` bytes of
    /// local work to do for us meanwhile.
    pub(crate) fn kept_alive(&self, work: u64) {
        if let Some(p) = &self.progress {
            p.allow(work);
            p.kept_alive();
        }
    }

    /// A tally whose report lists at most `listed` entries of each kind.
    pub(crate) fn listing(inner: Arc<dyn EventSink>, listed: usize) -> Self {
        Tally {
            listed,
            ..Tally::new(inner)
        }
    }

    pub(crate) fn report(&self) -> TransferReport {
        let mut r = self.lock().clone();
        r.files_total = r.files_ok + r.files_failed + r.files_skipped + r.files_incomplete;
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TransferReport> {
        self.report.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Tally {
    /// What `event` says of the transfer's progress.
    fn note_progress(&self, event: &Event) {
        let Some(p) = &self.progress else {
            return;
        };
        match event {
            Event::Bytes { .. }
            | Event::FileDone { .. }
            | Event::FileFailed { .. }
            | Event::Skipped { .. }
            | Event::Unchanged { .. }
            | Event::FileIncomplete { .. }
            | Event::Vanished { .. }
            | Event::Deleted { .. }
            | Event::DeleteFailed { .. } => p.made(),
            // The held chunks the sender hashes before it sends the rest.
            Event::Resumed { bytes, .. } => {
                p.allow(*bytes);
                p.made();
            }
            Event::Totals { .. }
            | Event::FileStarted { .. }
            | Event::Retry { .. }
            | Event::HeldBack(_)
            | Event::Changed { .. }
            | Event::Published { .. }
            | Event::NewServer { .. } => {}
            Event::Listed { .. } => p.made(),
        }
    }
}

/// A (path, reason) entry of a list, made only if it is listed.
fn pair<'a>(path: &'a str, why: &'a str) -> impl FnOnce() -> (String, String) + 'a {
    move || (path.to_string(), why.to_string())
}

/// A failure of a list, made only if it is listed.
fn failure<'a>(
    path: &'a str,
    reason: &'a str,
    origin: Origin,
    dir: bool,
) -> impl FnOnce() -> Failure + 'a {
    move || Failure {
        path: path.to_string(),
        reason: reason.to_string(),
        origin,
        dir,
    }
}

/// Push `item` to `list` if it has fewer than `listed`; count it otherwise.
fn list<T>(list: &mut Vec<T>, unlisted: &mut u64, listed: usize, item: impl FnOnce() -> T) {
    if list.len() < listed {
        list.push(item());
    } else {
        *unlisted += 1;
    }
}

impl EventSink for Tally {
    fn event(&self, event: Event) {
        {
            let mut guard = self.lock();
            let r = &mut *guard;
            let n = self.listed;
            match &event {
                Event::Bytes { n } => r.file_bytes += n,
                Event::FileDone { .. } => r.files_ok += 1,
                Event::FileFailed {
                    path,
                    reason,
                    origin,
                    dir,
                } => {
                    match dir {
                        true => r.dirs_failed += 1,
                        false => r.files_failed += 1,
                    }
                    let item = failure(path, reason, *origin, *dir);
                    list(&mut r.failed, &mut r.unlisted.failed, n, item)
                }
                Event::Skipped { path, reason } => {
                    r.files_skipped += 1;
                    let item = pair(path, reason);
                    list(&mut r.skipped, &mut r.unlisted.skipped, n, item)
                }
                Event::Unchanged { size, .. } => {
                    r.files_ok += 1;
                    r.files_unchanged += 1;
                    r.bytes_held += size;
                }
                Event::Resumed { bytes, .. } => r.bytes_held += bytes,
                Event::Vanished { path } => {
                    list(&mut r.vanished, &mut r.unlisted.vanished, n, || {
                        path.clone()
                    })
                }
                Event::FileIncomplete {
                    path,
                    reason,
                    origin,
                    dir,
                } => {
                    // A directory put off is no file.
                    r.files_incomplete += u64::from(!dir);
                    let item = failure(path, reason, *origin, *dir);
                    list(&mut r.incomplete, &mut r.unlisted.incomplete, n, item)
                }
                Event::Deleted { .. } => r.deleted += 1,
                Event::Changed {
                    what, size, dir, ..
                } => {
                    match what.first() {
                        Some(Change::Created) => r.created += 1,
                        _ => r.updated += 1,
                    }
                    if !dir && !what.iter().all(|c| c.is_metadata()) {
                        r.bytes_changed += size;
                    }
                }
                Event::DeleteFailed { path, reason } => {
                    let mut unlisted = 0;
                    list(&mut r.delete_failed, &mut unlisted, n, pair(path, reason))
                }
                Event::HeldBack(why) => r.held_back = Some(why.clone()),
                Event::Published { refused, .. } => r.published = Some(refused.is_none()),
                // Progress only: the report counts what settled.
                Event::Totals { .. }
                | Event::Listed { .. }
                | Event::FileStarted { .. }
                | Event::Retry { .. }
                | Event::NewServer { .. } => {}
            }
        }
        self.note_progress(&event);
        self.inner.event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;

    impl EventSink for Nowhere {
        fn event(&self, _: Event) {}
    }

    #[test]
    fn a_listing_tally_counts_what_it_does_not_list() {
        let tally = Tally::listing(Arc::new(Nowhere), 2);
        for i in 0..5 {
            tally.event(Event::Skipped {
                path: format!("p{i}"),
                reason: "special".into(),
            });
            tally.event(failed(&format!("f{i}"), false));
        }
        let r = tally.report();
        assert_eq!(r.skipped.len(), 2);
        assert_eq!(r.failed.len(), 2);
        assert_eq!((r.unlisted.skipped, r.unlisted.failed), (3, 3));
        assert_eq!((r.files_total, r.files_skipped, r.files_failed), (10, 5, 5));
        let all = Tally::new(Arc::new(Nowhere));
        for i in 0..5 {
            all.event(Event::Vanished {
                path: format!("v{i}"),
            });
        }
        assert_eq!(all.report().vanished.len(), 5, "a client lists everything");
    }

    fn failed(path: &str, dir: bool) -> Event {
        Event::FileFailed {
            path: path.into(),
            reason: "denied".into(),
            origin: Origin::Here,
            dir,
        }
    }

    #[test]
    fn the_total_is_what_settled_and_directories_count_apart() {
        let tally = Tally::new(Arc::new(Nowhere));
        // What the sender counted ahead is for progress only.
        tally.event(Event::Totals {
            files: 99,
            bytes: 1,
        });
        let done = |path: &str| Event::FileDone {
            path: path.into(),
            size: 1,
        };
        for event in [
            done("t/a"),
            Event::Unchanged {
                path: "t/b".into(),
                size: 1,
            },
            failed("t/d", true),
            failed("t/d/c", false),
            Event::Skipped {
                path: "t/sock".into(),
                reason: "special".into(),
            },
            Event::FileIncomplete {
                path: "t/big".into(),
                reason: "damaged".into(),
                origin: Origin::Peer,
                dir: false,
            },
            Event::Vanished {
                path: "t/gone".into(),
            },
        ] {
            tally.event(event);
        }
        let mut r = tally.report();
        let counts = |r: &TransferReport| {
            let sum = r.files_ok + r.files_failed + r.files_skipped + r.files_incomplete;
            assert_eq!(r.files_total, sum, "{r:?}");
            (r.files_total, r.files_ok, r.files_failed, r.dirs_failed)
        };
        assert_eq!(counts(&r), (5, 2, 1, 1));
        assert_eq!(r.files_incomplete, 1);
        r.give_up_incomplete();
        assert_eq!(counts(&r), (5, 2, 2, 1));
        assert_eq!((r.failed.len(), r.incomplete.len()), (3, 0));
        assert_eq!(r.failed[2].origin, Origin::Peer);
    }

    #[test]
    fn a_failure_is_named_on_its_side() {
        let labels = ("./src", "backup");
        let peer = Event::of_outcome("./src/x".into(), &Outcome::Failed("no".into()), 0)
            .failed_at(Origin::Peer, true)
            .named_for(Origin::Peer, labels);
        assert_eq!(
            peer,
            Event::FileFailed {
                path: "backup/x".into(),
                reason: "no".into(),
                origin: Origin::Peer,
                dir: true,
            }
        );
        let here = Event::of_outcome("./src/x".into(), &Outcome::Failed("no".into()), 0);
        assert_eq!(here.clone().named_for(Origin::Peer, labels), here);
        let done = Event::of_outcome("./src/x".into(), &Outcome::Ok, 3);
        assert_eq!(done.clone().failed_at(Origin::Peer, true), done);
    }
}
