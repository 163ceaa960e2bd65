//! What the receiver decides, apart from carrying it out.
//!
//! Pure decisions over messages and metadata: whether an entry keeps the
//! protocol's rules, what becomes of a file (left alone, received whole,
//! resumed), when a file is ready to commit, which directories are settled,
//! what waits for what, and when the sender may send. No file system, no
//! sockets, no clocks: the worker (`worker.rs`) asks, and carries the
//! answers out through `place.rs`. Each piece holds its own bound, so a
//! peer cannot make the receiver remember without limit.

use std::collections::HashMap;

use ferry_proto::digest::{ChunkLedger, FileDigest, LedgerError};
use ferry_proto::limits::{MAX_FILES_AHEAD, MAX_HAVE_RUNS, MAX_OPEN_DIRS, MAX_WAITING_LINKS};
use ferry_proto::message::{EntryKind, Outcome, Owner};
use ferry_proto::path::WirePath;

use crate::error::Violation;
use crate::journal::{self, ChunkRecord};
use crate::names;

/// Files at least this large keep a journal of their verified chunks, so
/// that an interrupted transfer resumes where it stopped. Smaller ones are
/// sent again whole: a few chunks are not worth the bookkeeping.
pub(crate) const JOURNAL_MIN_SIZE: u64 = 4 * 1024 * 1024;
/// Files that may be open at once: those the sender may announce ahead of
/// their data, and as many again whose last chunks are still on their way;
/// the bound is against a peer exhausting file descriptors.
pub(super) const MAX_OPEN_FILES: usize = 2 * MAX_FILES_AHEAD as usize;
/// When this many chunks wait for their entries (the control connection
/// lags behind the data connections), the data connections stop being read
/// until the control connection has caught up: TCP flow control then holds
/// the sender back.
pub(super) const PARKED_PAUSE: usize = 32;
/// More than this can only come from a peer that ignores flow control: the
/// bound keeps it from parking memory.
pub(super) const MAX_PARKED_CHUNKS: usize = 128;

/// Entry ids only grow: the one order every message about an entry is
/// checked against.
#[derive(Default)]
pub(super) struct EntryOrder {
    last_id: u64,
}

impl EntryOrder {
    /// Take in a new entry: its id must be the largest yet, its owner (if
    /// any) a real one.
    pub(super) fn admit(&mut self, id: u64, owner: Option<Owner>) -> Result<(), Violation> {
        if id <= self.last_id {
            return Err(Violation::EntryIdNotIncreasing { id });
        }
        self.last_id = id;
        match owner.filter(|o| !o.is_valid()) {
            Some(o) => Err(Violation::InvalidOwner {
                id,
                uid: o.uid,
                gid: o.gid,
            }),
            None => Ok(()),
        }
    }

    /// Whether entry `id` has been announced (it may be settled since).
    pub(super) fn announced(&self, id: u64) -> bool {
        id <= self.last_id
    }

    /// A `message` about an entry that is not open here: fine if it was
    /// announced (it settled early, by failing), a violation otherwise.
    pub(super) fn settled_already(&self, message: &'static str, id: u64) -> Result<(), Violation> {
        if self.announced(id) {
            Ok(())
        } else {
            Err(Violation::NeverAnnounced { message, id })
        }
    }
}

/// An entry under one of the receiver's own working names (a part file's,
/// a journal's: see `names`) is never made: the receiver would take what
/// is there for its own, and resume from it, read it, or replace it.
pub(super) fn name_refusal(name: &[u8]) -> Option<Outcome> {
    names::is_working_name(name)
        .then(|| Outcome::Failed("its name is one ferry keeps for its own working files".into()))
}

/// Nor is a hard link to one made: it would give a name to what may be
/// another transfer's part file.
pub(super) fn link_target_refusal(target_name: &[u8]) -> Option<Outcome> {
    names::is_working_name(target_name)
        .then(|| Outcome::Failed("it links to a name ferry keeps for its own working files".into()))
}

/// What an append-only server says of an entry that would replace one.
pub(super) fn append_only_refusal() -> Outcome {
    Outcome::Failed("it exists, and this server is append-only: it never overwrites".into())
}

/// The digest an entry carries (`--checksum`), checked.
pub(super) fn entry_digest(id: u64, hex: Option<&str>) -> Result<Option<FileDigest>, Violation> {
    match hex {
        None => Ok(None),
        Some(hex) => FileDigest::from_hex(hex)
            .map(Some)
            .ok_or(Violation::MalformedDigest { id }),
    }
}

/// Where the root entry lands, as cp and scp decide it: a root that is
/// not a directory, sent to a destination that is a directory already,
/// goes inside it under the source's name. Every other root becomes the
/// destination itself: a directory onto an existing one merges into it
/// (`up ./site production/website` keeps publishing into
/// `production/website`), and anything else replaces what is there unless
/// a directory is in the way. `destination_is_dir` is about the directory
/// itself: a symlink to one is not followed, and is replaced.
pub(super) fn root_goes_inside(root: &EntryKind, destination_is_dir: bool) -> bool {
    destination_is_dir && !matches!(root, EntryKind::Dir { .. })
}

/// Never setuid, setgid or sticky from a peer: the receiver may run as root.
pub(super) fn file_mode(mode: u32) -> u32 {
    mode & 0o777
}

/// Whether to look for the file in place before receiving it: not when
/// every file is to be received, nor in a directory this transfer made
/// (it held nothing).
pub(super) fn worth_looking(ignore_times: bool, fresh_dir: bool) -> bool {
    !ignore_times && !fresh_dir
}

/// A file already in place with the sender's size and mtime is left alone
/// (rsync's quick check); what of its metadata still differs is fixed.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct MetadataFix {
    pub(super) mode: Option<u32>,
    pub(super) owner: Option<Owner>,
}

impl MetadataFix {
    /// `found_*` is what the file in place has, `mode` and `owner` what
    /// the sender sent (`owner` only when owners are applied).
    pub(super) fn between(
        found_mode: u32,
        found_owner: Owner,
        mode: u32,
        owner: Option<Owner>,
    ) -> Self {
        MetadataFix {
            mode: (found_mode & 0o777 != mode).then_some(mode),
            owner: owner.filter(|o| found_owner != *o),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.mode.is_none() && self.owner.is_none()
    }
}

/// How a file to be received is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PartPlan {
    /// Into an unnamed file, linked into place when complete: in a
    /// directory this transfer made, a small file (one with no journal to
    /// resume from) needs no part name. Elsewhere it gets a fresh name of
    /// its own, which nothing ever looks for.
    pub(super) unnamed: bool,
    /// With a journal of verified chunks, so that it can be resumed: under
    /// the part name `.NAME.ferry-part`, by which a resume finds it.
    pub(super) journaled: bool,
    /// Fresh directory: a part file found there belongs to a transfer
    /// racing ours, and is not resumed (the sender sends it all).
    pub(super) fresh_dir: bool,
}

impl PartPlan {
    pub(super) fn for_file(size: u64, fresh_dir: bool) -> Self {
        PartPlan {
            unnamed: fresh_dir && size < JOURNAL_MIN_SIZE,
            journaled: size >= JOURNAL_MIN_SIZE,
            fresh_dir,
        }
    }

    /// Whether a part file left by an earlier attempt may be resumed.
    pub(super) fn resumes(&self, existing: bool) -> bool {
        existing && self.journaled && !self.fresh_dir
    }
}

/// The owner to give a new file before it takes its name: none if the
/// part file was made with it already.
pub(super) fn chown_needed(owner: Option<Owner>, made_with: Option<Owner>) -> Option<Owner> {
    owner.filter(|o| made_with != Some(*o))
}

/// Of the chunks a resumed part file holds, those one `have` can list
/// (the rest comes again), as the runs to send; `held` keeps only those.
pub(super) fn offer_held(held: &mut Vec<ChunkRecord>) -> Vec<(u64, u32, u64)> {
    let mut runs = journal::runs(held);
    if runs.len() > MAX_HAVE_RUNS {
        runs.truncate(MAX_HAVE_RUNS);
        let (start, len, count) = runs[MAX_HAVE_RUNS - 1];
        let covered = start + u64::from(len) * count;
        held.retain(|r| r.offset < covered);
    }
    runs
}

/// What a file still needs, once a chunk or its `file_end` is in.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// More chunks, or the digest.
    Wait,
    /// Everything is here: verify the whole and commit.
    Commit,
    /// Everything that will come is here, but some chunks were damaged on
    /// the way: settle it as incomplete; what verified stays for later.
    Damaged(String),
}

/// The arrival of one file's chunks: which are verified, what was sent as
/// its digest, and which came damaged.
pub(super) struct Arrival {
    ledger: ChunkLedger,
    size: u64,
    expected: Option<FileDigest>,
    damaged: u64,
    damage: Option<String>,
}

impl Arrival {
    /// A file of `size` bytes of which `held` (sorted, in bounds and
    /// disjoint, as the journal checked) are here already.
    pub(super) fn new(size: u64, held: &[ChunkRecord]) -> Self {
        let mut ledger = ChunkLedger::new(size);
        for r in held {
            let _ = ledger.record(r.offset, r.len, r.hash);
        }
        Arrival {
            ledger,
            size,
            expected: None,
            damaged: 0,
            damage: None,
        }
    }

    pub(super) fn size(&self) -> u64 {
        self.size
    }

    /// Verified bytes (resumed or received).
    pub(super) fn received(&self) -> u64 {
        self.ledger.received()
    }

    /// Whether a chunk of `len` bytes at `offset` may be written: inside
    /// the file, not overlapping one already verified.
    pub(super) fn fits(&self, offset: u64, len: u32) -> Result<(), LedgerError> {
        self.ledger.check(offset, len)
    }

    /// A chunk whose bytes are in the part file now.
    pub(super) fn record(&mut self, offset: u64, len: u32, hash: u64) -> Result<(), LedgerError> {
        self.ledger.record(offset, len, hash)
    }

    /// A chunk that failed its hash or would not decode: nothing of it is
    /// written; the first fault is the reason given.
    pub(super) fn damaged(&mut self, len: u32, fault: String) {
        self.damaged += u64::from(len);
        self.damage.get_or_insert(fault);
    }

    /// The sender's digest, from `file_end`.
    pub(super) fn expect(&mut self, digest: FileDigest) {
        self.expected = Some(digest);
    }

    pub(super) fn next(&self) -> Next {
        if self.expected.is_none() {
            return Next::Wait;
        }
        if self.ledger.is_complete() {
            return Next::Commit;
        }
        // `received` walks the chunks ahead of a gap: only when damaged.
        if self.damaged > 0 && self.ledger.received() + self.damaged == self.size {
            return Next::Damaged(self.damage.clone().unwrap_or_default());
        }
        Next::Wait
    }

    /// Whether the chunks, each verified, make the file that was sent.
    pub(super) fn verify(&self) -> Result<(), LedgerError> {
        match self.expected {
            Some(expected) => self.ledger.finish(expected),
            None => Err(LedgerError::Incomplete {
                received: self.received(),
                size: self.size,
            }),
        }
    }
}

/// Whether the data connections' readers should pause or go on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Go,
    Pause,
}

/// Chunks that overtook their entries on another connection, by file id,
/// until the entry arrives.
pub(super) struct Parking<C> {
    by_file: HashMap<u64, Vec<C>>,
    count: usize,
}

impl<C> Default for Parking<C> {
    fn default() -> Self {
        Parking {
            by_file: HashMap::new(),
            count: 0,
        }
    }
}

impl<C> Parking<C> {
    pub(super) fn park(&mut self, id: u64, chunk: C) -> Result<Flow, Violation> {
        if self.count >= MAX_PARKED_CHUNKS {
            return Err(Violation::OverLimit {
                what: "chunks ahead of their entries",
                limit: MAX_PARKED_CHUNKS,
            });
        }
        self.count += 1;
        self.by_file.entry(id).or_default().push(chunk);
        Ok(if self.count >= PARKED_PAUSE {
            Flow::Pause
        } else {
            Flow::Go
        })
    }

    /// The chunks parked for `id`, in arrival order; none wait any more.
    pub(super) fn take(&mut self, id: u64) -> Vec<C> {
        let chunks = self.by_file.remove(&id).unwrap_or_default();
        self.count -= chunks.len();
        chunks
    }

    /// Whether paused readers may go on: well below the pause mark, so
    /// that they do not stop and start at every chunk.
    pub(super) fn flow(&self) -> Flow {
        if self.count < PARKED_PAUSE / 2 {
            Flow::Go
        } else {
            Flow::Pause
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A directory of this transfer whose metadata waits for its `dir_end`
/// and its children. `io` is what the I/O side keeps for it.
pub(super) struct OpenDir<D> {
    pub(super) io: D,
    wire_path: Vec<u8>,
    pub(super) parent: Option<u64>,
    children: u32,
    ended: bool,
    /// Created by this transfer, or below one that was: nothing in it
    /// can be unchanged or held already, and every file is planned whole.
    pub(super) fresh: bool,
    /// Set when the sender could not read it whole.
    pub(super) failure: Option<String>,
}

/// The open directories of a transfer, and how many children each still
/// waits for.
pub(super) struct Dirs<D> {
    open: HashMap<u64, OpenDir<D>>,
    by_path: HashMap<Vec<u8>, u64>,
}

impl<D> Default for Dirs<D> {
    fn default() -> Self {
        Dirs {
            open: HashMap::new(),
            by_path: HashMap::new(),
        }
    }
}

impl<D> Dirs<D> {
    /// The open directory of this transfer that holds `path`, if any.
    pub(super) fn parent_of(&self, path: &WirePath) -> Option<u64> {
        if path.is_root() {
            return None;
        }
        let bytes = path.as_bytes();
        let parent = bytes
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(&b""[..], |i| &bytes[..i]);
        self.by_path.get(parent).copied()
    }

    pub(super) fn get(&self, id: u64) -> Option<&OpenDir<D>> {
        self.open.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: u64) -> Option<&mut OpenDir<D>> {
        self.open.get_mut(&id)
    }

    /// Whether `dir` is a directory this transfer made (or below one).
    pub(super) fn is_fresh(&self, dir: Option<u64>) -> bool {
        dir.and_then(|d| self.open.get(&d)).is_some_and(|d| d.fresh)
    }

    /// Checked before anything is created for a directory entry. An honest
    /// sender stays within the limit (it counts the directories we have
    /// not answered, a superset of those open here).
    pub(super) fn check_room(&self) -> Result<(), Violation> {
        if self.open.len() >= MAX_OPEN_DIRS {
            return Err(Violation::OverLimit {
                what: "directories open",
                limit: MAX_OPEN_DIRS,
            });
        }
        Ok(())
    }

    /// Directory `id` at `path` is open, a new child of `parent`.
    pub(super) fn open(
        &mut self,
        id: u64,
        path: &WirePath,
        parent: Option<u64>,
        fresh: bool,
        io: D,
    ) {
        self.adopt(parent);
        self.by_path.insert(path.as_bytes().to_vec(), id);
        let dir = OpenDir {
            io,
            wire_path: path.as_bytes().to_vec(),
            parent,
            children: 0,
            ended: false,
            fresh,
            failure: None,
        };
        self.open.insert(id, dir);
    }

    /// Count a new open child of `parent`.
    pub(super) fn adopt(&mut self, parent: Option<u64>) {
        if let Some(d) = parent.and_then(|id| self.open.get_mut(&id)) {
            d.children += 1;
        }
    }

    /// The sender's `dir_end` for `id`: `None` if it is not open here,
    /// otherwise the directories now finished, innermost first (none while
    /// children are open).
    pub(super) fn end(&mut self, id: u64) -> Option<Vec<(u64, OpenDir<D>)>> {
        let d = self.open.get_mut(&id)?;
        d.ended = true;
        if d.children > 0 {
            return Some(Vec::new());
        }
        let mut finished = Vec::new();
        let parent = self.finish(id, &mut finished);
        self.settle_into(parent, &mut finished);
        Some(finished)
    }

    /// A child of `parent` is settled: the directories that were waiting
    /// only for it are finished, innermost first.
    pub(super) fn settle(&mut self, parent: Option<u64>) -> Vec<(u64, OpenDir<D>)> {
        let mut finished = Vec::new();
        self.settle_into(parent, &mut finished);
        finished
    }

    fn settle_into(&mut self, mut parent: Option<u64>, finished: &mut Vec<(u64, OpenDir<D>)>) {
        while let Some(id) = parent {
            let Some(d) = self.open.get_mut(&id) else {
                break;
            };
            d.children = d.children.saturating_sub(1);
            if !(d.ended && d.children == 0) {
                break;
            }
            parent = self.finish(id, finished);
        }
    }

    fn finish(&mut self, id: u64, finished: &mut Vec<(u64, OpenDir<D>)>) -> Option<u64> {
        let d = self.open.remove(&id)?;
        self.by_path.remove(&d.wire_path);
        let parent = d.parent;
        finished.push((id, d));
        parent
    }

    pub(super) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

/// Hard links whose file is still arriving, by the id of that file: they
/// get their names once it has its own, or share its fate.
pub(super) struct Links<L> {
    waiting: HashMap<u64, Vec<L>>,
    count: usize,
}

impl<L> Default for Links<L> {
    fn default() -> Self {
        Links {
            waiting: HashMap::new(),
            count: 0,
        }
    }
}

impl<L> Links<L> {
    pub(super) fn wait(&mut self, first: u64, link: L) -> Result<(), Violation> {
        if self.count >= MAX_WAITING_LINKS {
            return Err(Violation::OverLimit {
                what: "hard links waiting for their files",
                limit: MAX_WAITING_LINKS,
            });
        }
        self.count += 1;
        self.waiting.entry(first).or_default().push(link);
        Ok(())
    }

    /// The links waiting for file `first`, which is settled now.
    pub(super) fn release(&mut self, first: u64) -> Vec<L> {
        let links = self.waiting.remove(&first).unwrap_or_default();
        self.count -= links.len();
        links
    }

    pub(super) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// A `hardlink` entry `id` must name an earlier entry as its file.
pub(super) fn check_link(id: u64, first: u64) -> Result<(), Violation> {
    if first >= id {
        return Err(Violation::LinkAhead { id, first });
    }
    Ok(())
}

/// What becomes of a waiting link whose file did not take its name.
pub(super) fn link_outcome_without_file(file_outcome: &Outcome) -> Outcome {
    match file_outcome {
        // Sending the file again may cure it, and then its links.
        Outcome::Incomplete(why) => {
            Outcome::Incomplete(format!("its file did not arrive whole: {why}"))
        }
        _ => Outcome::Failed("its file could not be placed".into()),
    }
}

/// A device node gives access to whatever device it names (a disk, say),
/// to anyone its mode lets in: never made unasked.
pub(super) fn device_refusal(devices_allowed: bool, block: bool) -> Option<Outcome> {
    let what = if block {
        "block device"
    } else {
        "character device"
    };
    (!devices_allowed).then(|| {
        Outcome::Skipped(format!(
            "{what}, not recreated: only a receiver running as root with --devices makes device nodes"
        ))
    })
}

/// When to tell the sender which files it may send: the last file entry
/// planned, and the last `planned` sent.
#[derive(Default)]
pub(super) struct PlanWindow {
    through: u64,
    sent: u64,
}

impl PlanWindow {
    /// File entry `id` is planned (whatever its plan).
    pub(super) fn planned(&mut self, id: u64) {
        self.through = id;
    }

    /// The `planned` to send now, if any: at once with `idle`, otherwise
    /// once a quarter of the sender's window is planned, so that a busy
    /// receiver does not answer every small batch of entries.
    pub(super) fn due(&mut self, idle: bool) -> Option<u64> {
        let new = self.through - self.sent;
        if new == 0 || (!idle && new < MAX_FILES_AHEAD / 4) {
            return None;
        }
        self.sent = self.through;
        Some(self.through)
    }
}

/// Whether the transfer is over: the sender said `end` and nothing is
/// open. Chunks still parked then belong to entries that never came.
pub(super) fn transfer_over(
    end_seen: bool,
    nothing_open: bool,
    parked_empty: bool,
) -> Result<bool, Violation> {
    if !(end_seen && nothing_open) {
        return Ok(false);
    }
    if !parked_empty {
        return Err(Violation::OrphanChunks);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_root_that_is_not_a_directory_goes_inside_an_existing_directory() {
        use ferry_proto::message::Mtime;
        let mtime = Mtime::default();
        let not_dirs = [
            EntryKind::File {
                size: 1,
                mode: 0o644,
                mtime,
            },
            EntryKind::Symlink {
                target: "t".into(),
                mtime,
            },
            EntryKind::Fifo { mode: 0o644, mtime },
            EntryKind::Special {
                what: "socket".into(),
            },
        ];
        for root in &not_dirs {
            assert!(root_goes_inside(root, true), "{root:?}");
            assert!(!root_goes_inside(root, false), "{root:?}");
        }
        let dir = EntryKind::Dir { mode: 0o755, mtime };
        assert!(!root_goes_inside(&dir, true), "a directory merges");
        assert!(!root_goes_inside(&dir, false));
    }

    #[test]
    fn working_names_are_refused_as_entries_and_as_link_targets() {
        for name in [
            &b".a.ferry-part"[..],
            b".a.ferry-journal",
            b".ferry-probe.1.2",
        ] {
            assert!(matches!(name_refusal(name), Some(Outcome::Failed(_))));
            assert!(matches!(
                link_target_refusal(name),
                Some(Outcome::Failed(_))
            ));
        }
        for name in [&b"a"[..], b".a", b"a.ferry-part", b".ferry-part"] {
            assert_eq!(name_refusal(name), None);
            assert_eq!(link_target_refusal(name), None);
        }
    }
}
