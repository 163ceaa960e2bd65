//! What the sender decides, apart from the I/O that carries it out: what
//! the receiver's replies mean, when the walk must wait for them, which
//! announced file goes next and which of its chunks the receiver may
//! skip. Nothing here touches a file, a socket or a clock, so every
//! decision is tested whole in memory.
//!
//! A file's data goes only once the receiver has planned it: the walk
//! announces entries up to `MAX_FILES_AHEAD` files ahead of the data, so
//! the plans (`planned`, `have`, `unchanged`) come back while earlier files
//! are still being sent, and no file waits a round trip of its own. A file
//! the receiver already has is not sent; of a file it holds in part, only
//! the missing chunks are, while the held ones are read and hashed so that
//! the file digest still proves the whole file.
//!
//! Nor is memory bounded by what the receiver leaves unanswered: the walk
//! stops before a new entry while `MAX_OPEN_DIRS` directories (the
//! protocol's limit) or `MAX_UNANSWERED` entries in all wait for their
//! outcomes, and what the receiver says is merged as it comes rather than
//! queued.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use ferry_proto::limits::{
    DEFAULT_CHUNK_LEN, MAX_CHUNK_LEN, MAX_FILES_AHEAD, MAX_HAVE_RUNS, MAX_OPEN_DIRS,
};
use ferry_proto::message::{Change, EntryKind, Message, Mtime, Outcome};
use ferry_proto::path::{WireBytes, WirePath};

use super::signatures::{Signature, Signatures};
use crate::error::{EngineError, Role, Violation};
use crate::events::{Event, Origin, display_name, peer_outcome, peer_text, rebase};

/// Entries sent and not answered yet, at most, in all: each is remembered
/// (its name, for the report) until its outcome comes. A receiver answers
/// as it goes, so a transfer in flight holds far fewer; this is the bound
/// against one that never answers, which would otherwise make us remember
/// the whole tree.
const MAX_UNANSWERED: usize = 64 * 1024;
/// The same for the bytes of their names.
const MAX_UNANSWERED_NAME_BYTES: usize = 64 * 1024 * 1024;
// Every hard link the receiver holds waiting for its file is unanswered.
const _: () = assert!(MAX_UNANSWERED <= ferry_proto::limits::MAX_WAITING_LINKS);

/// Files with several names whose first name the walk remembers, so that
/// their other names go as links. Past it, further ones go as copies (as
/// if they had one name), and memory stays bounded.
pub(super) const MAX_LINKED_FILES: usize = 1 << 20;

/// Chunks the receiver holds of a file: offset, chunk length, count.
pub(super) type Run = (u64, u32, u64);

/// An entry sent and not yet answered.
pub(super) struct Unanswered {
    path: String,
    size: u64,
    is_dir: bool,
    /// A file whose data waits for its plan: the only kind a `have` is for.
    awaiting_plan: bool,
}

impl Unanswered {
    /// An entry about to be announced, under the name its events give it.
    pub(super) fn new(path: String, kind: &EntryKind) -> Self {
        let (size, is_dir, is_file) = match kind {
            EntryKind::File { size, .. } => (*size, false, true),
            EntryKind::Dir { .. } => (0, true, false),
            _ => (0, false, false),
        };
        Unanswered {
            path,
            size,
            is_dir,
            awaiting_plan: is_file,
        }
    }

    pub(super) fn is_dir(&self) -> bool {
        self.is_dir
    }
}

/// What a file looked like when it was announced. If any of it differs
/// once the file has been read, it changed meanwhile, and what was read
/// may be a mix of old and new bytes. The ctime catches a rewrite in place
/// whose mtime was put back: no one can set a ctime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) size: u64,
    pub(super) mtime: Mtime,
    pub(super) ctime: (i64, u32),
    pub(super) nlink: u64,
}

impl Stamp {
    /// Whether a file stamped `self` before it was read held the same
    /// content until it was stamped `after`.
    pub(super) fn unchanged_until(&self, after: &Stamp) -> bool {
        let same = |s: &Stamp| (s.dev, s.ino, s.size, s.mtime);
        // A name added or removed (the file deleted while it was read)
        // moves the ctime too, and leaves the content as it was.
        same(self) == same(after) && (self.ctime == after.ctime || self.nlink != after.nlink)
    }
}

/// The bytes an entry adds to the walk's totals, if it counts as a file
/// there: every entry but a directory, as it settles as one (the bytes of
/// a file once, its other names as links with none), as in the totals
/// counted ahead.
pub(super) fn counted(kind: &EntryKind) -> Option<u64> {
    match kind {
        EntryKind::File { size, .. } => Some(*size),
        EntryKind::Symlink { .. }
        | EntryKind::Hardlink { .. }
        | EntryKind::Fifo { .. }
        | EntryKind::Device { .. }
        | EntryKind::Special { .. } => Some(0),
        _ => None,
    }
}

/// The entries not answered yet, and what the receiver said that the
/// walk has not taken in: shared by the reader of the receiver's replies
/// and the producer. Replies are merged in as they arrive, never queued:
/// the reader never waits for the producer (so neither side can block the
/// other on a full TCP buffer), and a receiver that repeats itself cannot
/// grow our memory while the producer is busy. What is held here is
/// bounded by the unanswered entries, and those by [`Self::is_full`].
#[derive(Default)]
pub(super) struct InboxState {
    unanswered: HashMap<u64, Unanswered>,
    /// Unanswered entries we aborted, with the reason we gave: a failure
    /// the receiver reports in those words is ours (it may have failed
    /// the entry on its own before the abort came).
    aborts: HashMap<u64, String>,
    /// How many of the unanswered entries are directories, and the bytes
    /// of their names.
    unanswered_dirs: usize,
    name_bytes: usize,
    /// The last entry id sent.
    announced: u64,
    /// The size of the largest file announced.
    largest_file: u64,
    news: News,
    /// The signatures of files waiting for their plans.
    signatures: Signatures,
    /// The reader has stopped: nothing more will come in.
    pub(super) closed: bool,
}

/// What the receiver said about files whose data is not sent yet, since
/// the producer last looked.
#[derive(Default)]
pub(super) struct News {
    /// Send every file up to this id not otherwise answered, whole (0:
    /// nothing new).
    through: u64,
    /// The chunks it holds of files waiting for their plan.
    have: HashMap<u64, Vec<Run>>,
    /// The versions it holds of files waiting for their plan.
    signatures: HashMap<u64, Signature>,
    /// Files settled already (unchanged, or failed): send nothing more.
    settled: Vec<u64>,
    /// Directories new at the receiver: every file below them may go.
    fresh: HashSet<u64>,
}

impl News {
    fn is_empty(&self) -> bool {
        self.through == 0
            && self.have.is_empty()
            && self.signatures.is_empty()
            && self.settled.is_empty()
            && self.fresh.is_empty()
    }
}

impl InboxState {
    /// Remember entry `id`, about to be sent, until its outcome comes.
    pub(super) fn announce(&mut self, id: u64, entry: Unanswered) {
        self.name_bytes += entry.path.len();
        self.unanswered_dirs += usize::from(entry.is_dir);
        self.largest_file = self.largest_file.max(entry.size);
        self.unanswered.insert(id, entry);
        self.announced = id;
    }

    /// The most local work (in bytes of [`crate::progress::KEEPALIVE_RATE`])
    /// a receiver may do for us while it only keeps alive: checking the
    /// journal of the largest file and, when it mirrors, judging each entry
    /// of the destination.
    pub(super) fn peer_work(&self, mirror: bool) -> u64 {
        let scan = match mirror {
            true => self.announced.saturating_mul(MIRROR_WORK_PER_ENTRY),
            false => 0,
        };
        self.largest_file.max(scan)
    }

    /// File `id` no longer waits for its plan: a `have` or `signature` for
    /// it from now on is ignored.
    pub(super) fn planned(&mut self, id: u64) {
        if let Some(e) = self.unanswered.get_mut(&id) {
            e.awaiting_plan = false;
        }
        self.signatures.let_go(id);
    }

    /// Entry `id` is aborted, for `reason`.
    pub(super) fn aborted(&mut self, id: u64, reason: &str) {
        if self.unanswered.contains_key(&id) {
            // As the receiver takes it in, and so repeats it.
            self.aborts.insert(id, peer_text(reason));
        }
    }

    /// Whether one more entry (a directory with `is_dir`) must wait for
    /// answers first: at most `MAX_OPEN_DIRS` directories (the protocol's
    /// limit: the receiver holds each open) and `MAX_UNANSWERED` entries in
    /// all (ours: we remember each).
    pub(super) fn is_full(&self, is_dir: bool) -> bool {
        self.unanswered.len() >= MAX_UNANSWERED
            || self.name_bytes >= MAX_UNANSWERED_NAME_BYTES
            || (is_dir && self.unanswered_dirs >= MAX_OPEN_DIRS)
    }

    /// Whether a walk that waits for answers may go on, `walking` deep in
    /// directories: once well below every bound, so that the next wait is
    /// far off; or down to what only the walk holds. A receiver answers
    /// everything but the directories the walk is still inside, which are
    /// fewer than either bound (see `MAX_OPEN_DIRS`), so the wait ends.
    pub(super) fn has_room(&self, walking: usize) -> bool {
        let roomy = self.unanswered.len() <= MAX_UNANSWERED / 2
            && self.name_bytes <= MAX_UNANSWERED_NAME_BYTES / 2
            && self.unanswered_dirs <= MAX_OPEN_DIRS / 2;
        roomy || self.unanswered.len() <= walking
    }

    pub(super) fn has_news(&self) -> bool {
        !self.news.is_empty()
    }

    pub(super) fn take_news(&mut self) -> News {
        std::mem::take(&mut self.news)
    }

    /// Take in one reply; an outcome also becomes an event.
    pub(super) fn take_in(&mut self, msg: Message) -> Result<Option<Event>, EngineError> {
        let never_sent = |message: &'static str, id: u64| {
            EngineError::Protocol(Violation::NeverAnnounced { message, id })
        };
        match msg {
            Message::Have { id, chunks } => match self.unanswered.get(&id) {
                Some(e) if e.awaiting_plan => {
                    self.news.have.insert(id, chunks);
                }
                // A file we aborted before its plan came (it could not be
                // opened) may still get one: nothing to do.
                _ if id <= self.announced => {}
                _ => return Err(never_sent("have", id)),
            },
            Message::Signature {
                id,
                avg,
                blocks,
                more,
            } => match self.unanswered.get(&id) {
                Some(e) if e.awaiting_plan => {
                    if let Some(sig) = self.signatures.take_in(id, avg, &blocks, more)? {
                        self.news.signatures.insert(id, sig);
                    }
                }
                _ if id <= self.announced => {}
                _ => return Err(never_sent("signature", id)),
            },
            Message::Planned { through } if through > self.announced => {
                return Err(never_sent("planned", through));
            }
            Message::Planned { through } => self.news.through = self.news.through.max(through),
            Message::Fresh { id } => match self.unanswered.get(&id) {
                Some(e) if e.is_dir => {
                    self.news.fresh.insert(id);
                }
                _ if id <= self.announced => {}
                _ => return Err(never_sent("fresh", id)),
            },
            Message::Outcome { id, outcome } => return self.settle(id, outcome),
            other => {
                return Err(Violation::UnexpectedMessage {
                    from: Role::Receiver,
                    message: other.name(),
                }
                .into());
            }
        }
        Ok(None)
    }

    /// What the receiver says placing entry `id` changes, as an event,
    /// named in the destination: `labels` are how the root is named in the
    /// sender's events and in the destination.
    pub(super) fn changed(
        &self,
        id: u64,
        what: Vec<Change>,
        (from, to): (&str, &str),
    ) -> Result<Event, EngineError> {
        match self.unanswered.get(&id) {
            Some(e) => Ok(Event::Changed {
                path: rebase(&e.path, from, to),
                what,
                dir: e.is_dir,
                size: e.size,
            }),
            None => Err(Violation::NeverAnnounced {
                message: "changes",
                id,
            }
            .into()),
        }
    }

    /// Forget entry `id`, answered; a file's outcome is its event. A
    /// failure is the receiver's, unless it repeats our abort.
    fn settle(&mut self, id: u64, outcome: Outcome) -> Result<Option<Event>, EngineError> {
        let ours = self.aborts.remove(&id);
        let Some(Unanswered {
            path, size, is_dir, ..
        }) = self.unanswered.remove(&id)
        else {
            return Err(Violation::UnknownVerdict { id }.into());
        };
        self.name_bytes -= path.len();
        self.signatures.let_go(id);
        if is_dir {
            self.unanswered_dirs -= 1;
        } else {
            self.news.settled.push(id);
        }
        if is_dir && outcome == Outcome::Ok {
            return Ok(None);
        }
        let origin = match (&outcome, ours) {
            (Outcome::Failed(why) | Outcome::Incomplete(why), Some(ours)) if *why == ours => {
                Origin::Here
            }
            _ => Origin::Peer,
        };
        let event = Event::of_outcome(path, &peer_outcome(outcome), size);
        Ok(Some(event.failed_at(origin, is_dir)))
    }
}

/// The time a mirroring receiver may take to judge one entry of its
/// destination while it only keeps alive, in bytes of
/// [`crate::progress::KEEPALIVE_RATE`]: 4 ms, a cold directory on a disk.
const MIRROR_WORK_PER_ENTRY: u64 = 256 * 1024;

/// What a mirroring receiver says of its deletions, as an event; `label`
/// names the root of the transfer.
pub(super) fn deletion_event(label: &str, msg: Message) -> Result<Option<Event>, EngineError> {
    match msg {
        Message::Deleted { path, dir, error } => {
            let path = display_name(label, &WirePath::from_wire(path)?);
            Ok(Some(match error {
                None => Event::Deleted { path, dir },
                Some(why) => Event::DeleteFailed {
                    path,
                    reason: peer_text(&why),
                },
            }))
        }
        Message::Deletions { held_back, .. } => Ok(held_back.map(Event::HeldBack)),
        other => Err(Violation::UnexpectedMessage {
            from: Role::Receiver,
            message: other.name(),
        }
        .into()),
    }
}

/// Files announced whose data waits for the receiver's plan, in the order
/// of their ids, and what the receiver has said about them. `F` is what
/// sending a file takes (its open handle, for the sender).
pub(super) struct PlanQueue<F> {
    queue: VecDeque<Queued<F>>,
    /// Files up to this id may be sent (those not otherwise answered).
    through: u64,
    /// Chunks the receiver holds, by file, for files still queued.
    have: HashMap<u64, Vec<Run>>,
    /// Other versions the receiver holds, by file, for files still queued.
    signatures: HashMap<u64, Signature>,
    /// Queued files the receiver has settled already.
    settled_early: Vec<u64>,
    /// Directories the receiver created in this transfer: the files below
    /// them need no plan of their own.
    fresh: HashSet<u64>,
}

struct Queued<F> {
    id: u64,
    size: u64,
    /// It may go before its plan (see [`goes_unplanned`]).
    unplanned: bool,
    /// The directories of this transfer that hold it, outermost first.
    ancestors: Arc<[u64]>,
    file: F,
}

/// A file whose plan has come: all its chunks go but those in `held`,
/// those that `signature`'s basis reaches as deltas.
pub(super) struct Planned<F> {
    pub(super) id: u64,
    pub(super) size: u64,
    pub(super) held: Vec<Run>,
    pub(super) signature: Option<Signature>,
    pub(super) file: F,
}

/// What the sender does next about the queued files.
pub(super) enum Next<F> {
    Send(Planned<F>),
    /// None may go yet, and the walk may go on meanwhile.
    Later,
    /// None may go yet, and nothing else may happen before the receiver
    /// says more: the walk is as far ahead as the protocol allows, or it
    /// is over.
    Wait,
}

impl<F> Default for PlanQueue<F> {
    fn default() -> Self {
        PlanQueue {
            queue: VecDeque::new(),
            through: 0,
            have: HashMap::new(),
            signatures: HashMap::new(),
            settled_early: Vec::new(),
            fresh: HashSet::new(),
        }
    }
}

impl<F> PlanQueue<F> {
    /// Queue file `id`, just announced (ids increase).
    pub(super) fn push(&mut self, id: u64, size: u64, ancestors: Arc<[u64]>, file: F) {
        self.queue.push_back(Queued {
            id,
            size,
            unplanned: goes_unplanned(id, size),
            ancestors,
            file,
        });
    }

    /// The next file to send, and its size, while it waits for its plan.
    pub(super) fn front_mut(&mut self) -> Option<(u64, &mut F)> {
        self.queue.front_mut().map(|q| (q.size, &mut q.file))
    }

    /// Take in what the receiver has said since the last time.
    pub(super) fn absorb(&mut self, news: News) {
        // Queued ids increase: a binary search, not a scan per answer.
        let queue = &self.queue;
        let queued = |id: u64| queue.binary_search_by_key(&id, |q| q.id).is_ok();
        // Before `through`: a receiver sends a file's `have` before the
        // `planned` that covers it, and both may be in this news.
        for (id, runs) in news.have {
            if queued(id) && id > self.through {
                self.have.insert(id, runs);
            }
        }
        for (id, sig) in news.signatures {
            if queued(id) && id > self.through {
                self.signatures.insert(id, sig);
            }
        }
        self.through = self.through.max(news.through);
        self.settled_early
            .extend(news.settled.into_iter().filter(|&id| queued(id)));
        self.fresh.extend(news.fresh);
    }

    /// The next file to send, in order, if its plan has come: the files
    /// before it that the receiver settled early are dropped. With
    /// `drain`, the walk is over, and the rest can only be waited for.
    pub(super) fn next(&mut self, drain: bool) -> Result<Next<F>, EngineError> {
        while let Some(front) = self.queue.front() {
            let id = front.id;
            if let Some(i) = self.settled_early.iter().position(|&s| s == id) {
                self.settled_early.swap_remove(i);
                self.have.remove(&id);
                self.signatures.remove(&id);
                self.queue.pop_front();
            } else if id <= self.through
                || front.unplanned
                || front.ancestors.iter().any(|d| self.fresh.contains(d))
            {
                break;
            } else if drain || self.queue.len() as u64 >= MAX_FILES_AHEAD {
                return Ok(Next::Wait);
            } else {
                return Ok(Next::Later);
            }
        }
        let Some(q) = self.queue.pop_front() else {
            return Ok(Next::Later);
        };
        let held = check_held(self.have.remove(&q.id).unwrap_or_default(), q.size)?;
        Ok(Next::Send(Planned {
            id: q.id,
            size: q.size,
            held,
            signature: self.signatures.remove(&q.id),
            file: q.file,
        }))
    }
}

/// Whether file `id` of `size` bytes may go before its plan (see
/// [`ferry_proto::limits::goes_unplanned`]). What it risks is sending once
/// more a file the receiver has, one chunk at most, where a plan could
/// only have said "unchanged": a file so small has no journal to resume,
/// and its delta would save little.
fn goes_unplanned(id: u64, size: u64) -> bool {
    ferry_proto::limits::goes_unplanned(id, size)
}

/// Check the receiver's list of held chunks against the file: runs in
/// increasing order, disjoint, inside the file, of valid chunk lengths.
/// Anything else is a protocol error: the receiver trusts nothing we send,
/// and we trust nothing it says.
fn check_held(runs: Vec<Run>, size: u64) -> Result<Vec<Run>, EngineError> {
    if runs.len() > MAX_HAVE_RUNS {
        return Err(Violation::TooManyHeldRuns {
            runs: runs.len(),
            limit: MAX_HAVE_RUNS,
        }
        .into());
    }
    let mut end = 0u64;
    for &(start, len, count) in &runs {
        let span = u64::from(len).checked_mul(count);
        let stop = span.and_then(|span| start.checked_add(span));
        // Only whole chunks, where the sender cuts them: held chunks are
        // read and hashed here, and tiny ones would cost a hash call per
        // byte (a CPU amplification a hostile receiver could use).
        let chunk = u64::from(DEFAULT_CHUNK_LEN);
        let whole = len == DEFAULT_CHUNK_LEN || (count == 1 && stop == Some(size));
        if start % chunk != 0 || !whole {
            return Err(Violation::UnalignedHeld { start, len }.into());
        }
        match stop {
            Some(stop)
                if start >= end
                    && stop <= size
                    && (1..=MAX_CHUNK_LEN).contains(&len)
                    && count > 0 =>
            {
                end = stop;
            }
            _ => {
                return Err(Violation::ImpossibleHeld {
                    start,
                    len,
                    count,
                    size,
                }
                .into());
            }
        }
    }
    Ok(runs)
}

/// The files with more than one name met so far, by device and inode: the
/// entry and path of their first name.
#[derive(Default)]
pub(super) struct Links(HashMap<(u64, u64), (u64, WireBytes)>);

impl Links {
    /// How another name of a file sent already goes: as a link to its
    /// first name.
    pub(super) fn link_to(&self, inode: (u64, u64)) -> Option<EntryKind> {
        let (first, target) = self.0.get(&inode)?;
        Some(EntryKind::Hardlink {
            first: *first,
            target: target.clone(),
        })
    }

    /// Remember entry `id` as the first name of a file with several, while
    /// there is room.
    pub(super) fn remember(&mut self, inode: (u64, u64), id: u64, path: WireBytes) {
        if self.0.len() < MAX_LINKED_FILES {
            self.0.insert(inode, (id, path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_changed_while_read_is_told_by_its_stamp() {
        let before = Stamp {
            dev: 1,
            ino: 2,
            size: 100,
            mtime: Mtime { sec: 10, nsec: 0 },
            ctime: (10, 0),
            nlink: 1,
        };
        assert!(before.unchanged_until(&before));
        // Rewritten in place with its mtime put back: only the ctime tells.
        let rewritten = Stamp {
            ctime: (11, 0),
            ..before
        };
        assert!(!before.unchanged_until(&rewritten));
        // Grown, touched, or another file under the name.
        for after in [
            Stamp {
                size: 101,
                ..before
            },
            Stamp {
                mtime: Mtime { sec: 11, nsec: 0 },
                ..before
            },
            Stamp { ino: 3, ..before },
        ] {
            assert!(!before.unchanged_until(&after), "{after:?}");
        }
        // Deleted while read: the content is what it was.
        let deleted = Stamp {
            ctime: (11, 0),
            nlink: 0,
            ..before
        };
        assert!(before.unchanged_until(&deleted));
    }

    fn inbox_with(entries: &[(u64, bool)]) -> InboxState {
        let mut state = InboxState::default();
        for &(id, is_dir) in entries {
            let kind = if is_dir {
                EntryKind::Dir {
                    mode: 0o755,
                    mtime: Default::default(),
                }
            } else {
                EntryKind::File {
                    size: 0,
                    mode: 0o644,
                    mtime: Default::default(),
                }
            };
            state.announce(id, Unanswered::new(format!("entry {id}"), &kind));
        }
        state
    }

    #[test]
    fn a_receiver_repeating_itself_does_not_grow_the_inbox() {
        let mut state = inbox_with(&[(1, true), (2, false)]);
        for _ in 0..10_000 {
            for msg in [
                Message::Planned { through: 2 },
                Message::Fresh { id: 1 },
                Message::Have {
                    id: 2,
                    chunks: vec![(0, 1024, 1)],
                },
            ] {
                state.take_in(msg).unwrap();
            }
        }
        assert_eq!(state.news.through, 2);
        assert_eq!(state.news.fresh.len(), 1);
        assert_eq!(state.news.have.len(), 1);
        assert!(state.news.settled.is_empty());
    }

    #[test]
    fn outcomes_settle_entries_and_keep_the_counts() {
        let mut state = inbox_with(&[(1, true), (2, false), (3, true)]);
        assert_eq!(state.unanswered_dirs, 2);
        let ok = |id| Message::Outcome {
            id,
            outcome: Outcome::Ok,
        };
        assert!(
            state.take_in(ok(3)).unwrap().is_none(),
            "a directory is no event"
        );
        assert!(matches!(
            state.take_in(ok(2)).unwrap(),
            Some(Event::FileDone { .. })
        ));
        assert_eq!(state.unanswered_dirs, 1);
        assert_eq!(state.unanswered.len(), 1);
        assert_eq!(state.name_bytes, "entry 1".len());
        assert_eq!(state.news.settled, [2], "only files wait in the queue");
        let again = state.take_in(ok(2)).unwrap_err();
        assert!(again.to_string().contains("unknown entry 2"), "{again}");
    }

    #[test]
    fn plans_for_entries_never_announced_are_protocol_errors() {
        let mut state = inbox_with(&[(1, true), (2, false)]);
        for msg in [
            Message::Planned { through: 3 },
            Message::Fresh { id: 3 },
            Message::Have {
                id: 3,
                chunks: vec![],
            },
        ] {
            let e = state.take_in(msg).unwrap_err();
            assert!(e.to_string().contains("never announced"), "{e}");
        }
        // For an entry announced but not waiting for that (a file that is
        // planned already, a file called fresh): ignored, as before.
        state.planned(2);
        state
            .take_in(Message::Have {
                id: 2,
                chunks: vec![(0, 1024, 1)],
            })
            .unwrap();
        state.take_in(Message::Fresh { id: 2 }).unwrap();
        assert!(!state.has_news());
    }

    #[test]
    fn the_walk_waits_at_a_bound_and_goes_on_well_below_it() {
        let files: Vec<(u64, bool)> = (1..=MAX_UNANSWERED as u64).map(|id| (id, false)).collect();
        let mut state = inbox_with(&files[..MAX_UNANSWERED - 1]);
        assert!(!state.is_full(false));
        let (id, _) = files[MAX_UNANSWERED - 1];
        state.announce(
            id,
            Unanswered::new("x".into(), &EntryKind::Special { what: "x".into() }),
        );
        assert!(state.is_full(false), "the bound on entries in all");
        assert!(!state.has_room(0));
        let done = |id| Message::Outcome {
            id,
            outcome: Outcome::Ok,
        };
        for id in 1..=(MAX_UNANSWERED / 2) as u64 {
            assert!(!state.has_room(3), "{id} answered");
            state.take_in(done(id)).unwrap();
        }
        assert!(state.has_room(3), "half the bound");
    }

    #[test]
    fn directories_have_a_bound_of_their_own_and_the_walk_is_let_through() {
        let dirs: Vec<(u64, bool)> = (1..=MAX_OPEN_DIRS as u64).map(|id| (id, true)).collect();
        let state = inbox_with(&dirs);
        assert!(state.is_full(true), "no more directories");
        assert!(!state.is_full(false), "but files may go");
        assert!(!state.has_room(MAX_OPEN_DIRS - 1));
        // Only the directories the walk is inside wait: it may go on.
        assert!(state.has_room(MAX_OPEN_DIRS));
    }

    fn news(through: u64) -> News {
        News {
            through,
            ..News::default()
        }
    }

    fn ancestors(ids: &[u64]) -> Arc<[u64]> {
        Arc::from(ids)
    }

    /// The ids `next` hands out until it says something else.
    fn sendable(q: &mut PlanQueue<()>, drain: bool) -> (Vec<u64>, &'static str) {
        let mut sent = Vec::new();
        loop {
            match q.next(drain).unwrap() {
                Next::Send(p) => sent.push(p.id),
                Next::Later => return (sent, "later"),
                Next::Wait => return (sent, "wait"),
            }
        }
    }

    #[test]
    fn files_go_in_order_once_planned() {
        let mut q = PlanQueue::default();
        for id in 2..=5 {
            q.push(id, 10, ancestors(&[1]), ());
        }
        assert_eq!(sendable(&mut q, false), (vec![], "later"));
        q.absorb(news(3));
        assert_eq!(sendable(&mut q, false), (vec![2, 3], "later"));
        assert_eq!(sendable(&mut q, true), (vec![], "wait"), "drain waits");
        q.absorb(news(5));
        assert_eq!(sendable(&mut q, true), (vec![4, 5], "later"));
    }

    #[test]
    fn a_root_file_of_one_chunk_goes_without_a_plan() {
        let mut q = PlanQueue::default();
        q.push(1, u64::from(DEFAULT_CHUNK_LEN), ancestors(&[]), ());
        assert_eq!(sendable(&mut q, true), (vec![1], "later"));
        // Larger, it may be resumed or sent as a delta: it waits.
        q.push(1, u64::from(DEFAULT_CHUNK_LEN) + 1, ancestors(&[]), ());
        assert_eq!(sendable(&mut q, true), (vec![], "wait"));
    }

    #[test]
    fn a_file_under_a_fresh_directory_goes_without_a_plan() {
        let mut q = PlanQueue::default();
        q.push(3, 10, ancestors(&[1, 2]), ());
        q.push(5, 10, ancestors(&[1, 4]), ());
        q.absorb(News {
            fresh: HashSet::from([2]),
            ..News::default()
        });
        assert_eq!(sendable(&mut q, true), (vec![3], "wait"));
    }

    #[test]
    fn a_file_settled_early_is_dropped_with_what_was_said_of_it() {
        let mut q = PlanQueue::default();
        q.push(2, 4096, ancestors(&[1]), ());
        q.push(3, 4096, ancestors(&[1]), ());
        q.absorb(News {
            have: HashMap::from([(2, vec![(0, 1024, 1)])]),
            settled: vec![2, 7],
            ..News::default()
        });
        assert_eq!(q.settled_early, [2], "only queued files are remembered");
        assert_eq!(sendable(&mut q, false), (vec![], "later"));
        assert!(q.have.is_empty() && q.settled_early.is_empty());
        q.absorb(news(3));
        assert_eq!(sendable(&mut q, false), (vec![3], "later"));
    }

    #[test]
    fn the_walk_waits_only_as_far_ahead_as_the_protocol_allows() {
        let mut q = PlanQueue::default();
        for id in 2..MAX_FILES_AHEAD + 1 {
            q.push(id, 10, ancestors(&[1]), ());
        }
        assert!(matches!(q.next(false).unwrap(), Next::Later));
        q.push(MAX_FILES_AHEAD + 1, 10, ancestors(&[1]), ());
        assert!(matches!(q.next(false).unwrap(), Next::Wait));
    }

    #[test]
    fn held_chunks_come_with_their_file_and_only_before_its_plan() {
        let mut q = PlanQueue::default();
        q.push(2, 4 * C, ancestors(&[1]), ());
        q.push(3, 4 * C, ancestors(&[1]), ());
        // Its `have` and the `planned` covering it in one news.
        q.absorb(News {
            through: 2,
            have: HashMap::from([(2, vec![(0, CHUNK, 2)])]),
            ..News::default()
        });
        // Once planned, a `have` comes too late to count.
        q.absorb(News {
            have: HashMap::from([(2, vec![(0, CHUNK, 4)]), (9, vec![])]),
            ..News::default()
        });
        let Next::Send(p) = q.next(false).unwrap() else {
            panic!("file 2 is planned")
        };
        assert_eq!((p.id, p.size, p.held), (2, 4 * C, vec![(0, CHUNK, 2)]));
        q.absorb(news(3));
        let Next::Send(p) = q.next(false).unwrap() else {
            panic!("file 3 is planned")
        };
        assert!(p.held.is_empty());
    }

    #[test]
    fn a_bad_claim_of_held_chunks_is_a_protocol_error() {
        let mut q = PlanQueue::default();
        q.push(2, 4 * C, ancestors(&[1]), ());
        q.absorb(News {
            through: 2,
            have: HashMap::from([(2, vec![(0, CHUNK, 5)])]),
            ..News::default()
        });
        assert!(matches!(q.next(false), Err(EngineError::Protocol(_))));
    }

    /// The chunk length, as the runs of a `have` carry it and as a size.
    const CHUNK: u32 = DEFAULT_CHUNK_LEN;
    const C: u64 = DEFAULT_CHUNK_LEN as u64;

    #[test]
    fn held_chunks_are_checked_against_the_file() {
        let ok = |runs: Vec<Run>, size| check_held(runs, size).is_ok();
        assert!(ok(vec![], 0));
        assert!(ok(
            vec![(0, CHUNK, 2), (2 * C, CHUNK / 2, 1)],
            2 * C + C / 2
        ));
        assert!(ok(vec![(0, 100, 1)], 100), "a file shorter than a chunk");
        assert!(ok(vec![(C, CHUNK, 1)], 4 * C), "gaps are fine");
        assert!(!ok(vec![(0, CHUNK, 2), (C, CHUNK, 1)], 4 * C), "overlap");
        assert!(!ok(vec![(2 * C, CHUNK, 1), (0, CHUNK, 1)], 4 * C), "order");
        assert!(!ok(vec![(0, CHUNK, 5)], 4 * C), "past the end");
        assert!(
            !ok(vec![(u64::MAX / C * C, CHUNK, 1)], u64::MAX),
            "overflow"
        );
        assert!(!ok(vec![(0, CHUNK, u64::MAX)], 4 * C), "overflow");
        assert!(!ok(vec![(0, 0, 1)], 4 * C), "empty chunks");
        assert!(
            !ok(vec![(0, MAX_CHUNK_LEN + 1, 1)], u64::MAX),
            "huge chunks"
        );
        assert!(!ok(vec![(0, CHUNK, 0)], 4 * C), "no chunks");
        let many: Vec<Run> = (0..=MAX_HAVE_RUNS as u64)
            .map(|i| (i * 2 * C, CHUNK, 1))
            .collect();
        assert!(!ok(many, u64::MAX), "too many runs");
    }

    #[test]
    fn held_chunks_must_be_whole_chunks_where_the_sender_cuts_them() {
        let ok = |runs: Vec<Run>, size| check_held(runs, size).is_ok();
        // A byte at a time over 64 MiB would be 67 million hash calls.
        assert!(!ok(vec![(0, 1, 64 * C)], 64 * C), "tiny chunks");
        assert!(!ok(vec![(1, CHUNK, 1)], 4 * C), "off the boundary");
        assert!(
            !ok(vec![(0, CHUNK / 2, 1)], 4 * C),
            "a short chunk not at the end"
        );
        assert!(
            ok(vec![(3 * C, CHUNK / 2, 1)], 3 * C + C / 2),
            "the short last one"
        );
    }

    #[test]
    fn other_names_go_as_links_while_there_is_room() {
        let mut links = Links::default();
        assert!(links.link_to((1, 2)).is_none());
        links.remember((1, 2), 7, WireBytes(b"a/b".to_vec()));
        assert!(matches!(
            links.link_to((1, 2)),
            Some(EntryKind::Hardlink { first: 7, target }) if target.0 == b"a/b"
        ));
        for ino in 0..MAX_LINKED_FILES as u64 {
            links.remember((2, ino), ino, WireBytes(Vec::new()));
        }
        assert_eq!(links.0.len(), MAX_LINKED_FILES, "bounded");
        assert!(links.link_to((2, MAX_LINKED_FILES as u64 - 1)).is_none());
    }

    #[test]
    fn the_walk_counts_every_entry_that_settles_but_directories() {
        let file = EntryKind::File {
            size: 5,
            mode: 0o644,
            mtime: Default::default(),
        };
        assert_eq!(counted(&file), Some(5));
        let link = EntryKind::Hardlink {
            first: 1,
            target: WireBytes(Vec::new()),
        };
        assert_eq!(counted(&link), Some(0), "its bytes count once");
        let dir = EntryKind::Dir {
            mode: 0o755,
            mtime: Default::default(),
        };
        assert_eq!(counted(&dir), None);
        // Skipped, and counted in the summary's total as skipped.
        assert_eq!(
            counted(&EntryKind::Special {
                what: "socket".into()
            }),
            Some(0)
        );
    }
}
