//! The receiver's worker: one thread that owns all file-system work of a
//! transfer. It takes the frames the connections' readers pass it, asks
//! the rules (`rules.rs`) what each means, carries that out through
//! `place.rs`, and queues the replies for the writer.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_proto::digest::FileDigest;
use ferry_proto::message::{Change, EntryKind, HeldBack, Message, Mtime, Outcome, Owner};
use ferry_proto::path::{WireBytes, WirePath};
use tokio::sync::mpsc;

use super::basis::{self, Signed, SignedAhead};
use super::deletions::{self, Deletions, How, Teller};
use super::itemize;
use super::place::{self, Node, ParentCache, Part, Target};
use super::publish::{self, Switched};
use super::rules::{
    self, Arrival, Dirs, EntryOrder, Flow, Links, MAX_OPEN_FILES, MetadataFix, Next, OpenDir,
    Parking, PartPlan, PlanWindow,
};
use super::{DataGate, Destination, Inbound, Publish};
use crate::budget::{self, HELD_ENTRY_MEMORY, Held};
use crate::codec::{ChunkDecoder, ReadChunk};
use crate::error::{EngineError, Side, Violation, reason};
use crate::events::{Event, EventSink, Origin, Tally, display_name, peer_text, rebase};
use crate::journal::ChunkRecord;

/// During a long local job (checking a big journal against its part
/// file) the worker tells the sender it is alive this often, so that the
/// sender's stall timeout does not fire.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// Replies go to the writer in batches of at most this many.
const REPLY_BATCH: usize = 256;

/// A file being received.
struct OpenFile {
    display: String,
    /// The directory of this transfer that holds it, if any.
    parent_dir: Option<u64>,
    arrival: Arrival,
    part: Part,
    /// Its basis, when it comes as a delta.
    signed: Option<Signed>,
    /// What it holds of the session's budgets.
    _held: Held,
}

/// What the worker keeps for an open directory: the directory itself,
/// open from its creation (or check) until its metadata is applied, so the
/// parent of everything below it needs no path resolved again for each.
struct DirIo {
    display: String,
    fd: Arc<OwnedFd>,
    mode: u32,
    mtime: Mtime,
    owner: Option<Owner>,
    /// The owner of a file this process creates in it (known when owners
    /// are applied).
    new_files_owner: Option<Owner>,
    /// What it holds of the session's budgets.
    _held: Held,
}

/// A `hardlink` entry whose file is still arriving.
struct WaitingLink {
    id: u64,
    display: String,
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    parent_dir: Option<u64>,
    /// What it holds of the session's memory.
    _held: Held,
}

/// Where an entry lands: its directory, open, and its name there.
struct Landing {
    id: u64,
    display: String,
    parent_dir: Option<u64>,
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    /// The owner to give it, when owners are applied.
    owner: Option<Owner>,
    /// A file's digest, sent for `--checksum`.
    digest: Option<FileDigest>,
}

pub(crate) struct Worker {
    gate: Arc<DataGate>,
    dest: Destination,
    tally: Arc<Tally>,
    replies: mpsc::Sender<Vec<Message>>,
    /// Replies not yet handed to the writer: they go in batches.
    unsent: Vec<Message>,
    decoder: ChunkDecoder,
    order: EntryOrder,
    files: HashMap<u64, OpenFile>,
    dirs: Dirs<DirIo>,
    parked: Parking<ReadChunk>,
    links: Links<WaitingLink>,
    end_seen: bool,
    parents: ParentCache,
    plans: PlanWindow,
    /// The sender's side: who speaks in an `error` it sends.
    peer: Side,
    /// The path of the entry whose handling ended the session, for the
    /// `error` that tells the sender.
    failed_at: Option<WireBytes>,
    /// `--delete`: what the source has, remembered.
    deletions: Option<Deletions>,
    /// `--itemize`: what placing each open entry changes, and whether it
    /// is a directory, until it is answered.
    changes: HashMap<u64, (Vec<Change>, bool)>,
    /// Entries the sender aborted, until answered: their failure is the
    /// sender's.
    aborted: HashSet<u64>,
    /// The blocks of the signatures the sender holds.
    signed_ahead: SignedAhead,
}

impl Worker {
    pub(crate) fn new(
        gate: Arc<DataGate>,
        mut dest: Destination,
        tally: Arc<Tally>,
        replies: mpsc::Sender<Vec<Message>>,
        peer: Side,
    ) -> Result<Self, EngineError> {
        let deletions = dest.pruning.take().map(Deletions::new).transpose()?;
        Ok(Worker {
            gate,
            dest,
            tally,
            replies,
            unsent: Vec::new(),
            decoder: ChunkDecoder::new()?,
            order: EntryOrder::default(),
            files: HashMap::new(),
            dirs: Dirs::default(),
            parked: Parking::default(),
            links: Links::default(),
            end_seen: false,
            parents: ParentCache::default(),
            plans: PlanWindow::default(),
            peer,
            failed_at: None,
            deletions,
            changes: HashMap::new(),
            aborted: HashSet::new(),
            signed_ahead: SignedAhead::default(),
        })
    }

    /// The worker thread's body: receive until the transfer is over.
    pub(super) fn run(
        mut self,
        mut frames: mpsc::Receiver<Vec<Inbound>>,
    ) -> Result<(), EngineError> {
        let result = self.receive(&mut frames);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// The session failed: tell the sender why, unless it is the one who
    /// ended it, and remove the part files not worth keeping.
    pub(crate) fn fail(&mut self, e: &EngineError) {
        if e.is_for_the_peer() {
            self.unsent.push(Message::Error {
                code: e.code(),
                message: e.to_string(),
                path: self.failed_at.take(),
            });
            let _ = self.flush_replies();
        }
        self.files.clear();
    }

    fn receive(&mut self, frames: &mut mpsc::Receiver<Vec<Inbound>>) -> Result<(), EngineError> {
        loop {
            let batch = match frames.try_recv() {
                Ok(batch) => batch,
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.idle()?;
                    frames.blocking_recv().ok_or(EngineError::Closed)?
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(EngineError::Closed),
            };
            if self.take(batch)? {
                return Ok(());
            }
        }
    }

    /// Nothing more to read for now: the moment to send what we owe. The
    /// sender may be waiting for a plan, so every one goes.
    pub(crate) fn idle(&mut self) -> Result<(), EngineError> {
        self.send_plan(true)?;
        self.flush_replies()
    }

    /// Handle a batch of frames; true once the transfer is over (and
    /// `done` is on its way).
    pub(crate) fn take(&mut self, batch: Vec<Inbound>) -> Result<bool, EngineError> {
        for frame in batch {
            self.frame(frame)?;
        }
        self.send_plan(false)?;
        let nothing_open = self.files.is_empty() && self.dirs.is_empty() && self.links.is_empty();
        if rules::transfer_over(self.end_seen, nothing_open, self.parked.is_empty())? {
            self.finish()?;
            return Ok(true);
        }
        Ok(false)
    }

    fn frame(&mut self, frame: Inbound) -> Result<(), EngineError> {
        let msg = match frame {
            Inbound::Data(chunk) => return self.chunk(chunk),
            Inbound::Control(msg) => msg,
        };
        match msg {
            Message::Entry {
                id,
                path,
                kind,
                owner,
                digest,
            } => {
                let digest = rules::entry_digest(id, digest.as_deref())?;
                self.entry(id, path, kind, owner, digest)
            }
            Message::FileEnd { id, digest } => self.file_end(id, &digest),
            Message::Abort {
                id,
                reason,
                transient,
            } => self.abort(id, &reason, transient),
            Message::Keepalive => {
                // The sender hashes held chunks: their bytes are allowed
                // for (the `resumed` events).
                self.tally.kept_alive(0);
                Ok(())
            }
            Message::DirEnd { id } => self.dir_end(id),
            Message::End => {
                self.end_seen = true;
                Ok(())
            }
            other => super::side_message(other, &self.tally, &self.dest.label, self.peer),
        }
    }

    fn reply(&mut self, msg: Message) -> Result<(), EngineError> {
        self.unsent.push(msg);
        if self.unsent.len() >= REPLY_BATCH {
            self.flush_replies()?;
        }
        Ok(())
    }

    /// Tell the sender which files it may send, when that is due.
    fn send_plan(&mut self, idle: bool) -> Result<(), EngineError> {
        match self.plans.due(idle) {
            Some(through) => {
                self.reply(Message::Planned { through })?;
                self.flush_replies()
            }
            None => Ok(()),
        }
    }

    fn flush_replies(&mut self) -> Result<(), EngineError> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let replies = std::mem::take(&mut self.unsent);
        self.replies
            .blocking_send(replies)
            .map_err(|_| EngineError::Closed)
    }

    /// Answer entry `id`; files and symlinks also count in the events.
    fn verdict(
        &mut self,
        id: u64,
        display: String,
        outcome: Outcome,
        size: u64,
    ) -> Result<(), EngineError> {
        self.answer(id, display, outcome, size, false)
    }

    /// [`Self::verdict`], of a directory if `dir`. A failure is named
    /// where it happened: the sender's (it aborted the entry) as the
    /// sender has it, ours in the destination.
    fn answer(
        &mut self,
        id: u64,
        display: String,
        outcome: Outcome,
        size: u64,
        dir: bool,
    ) -> Result<(), EngineError> {
        if let Some(deletions) = &mut self.deletions {
            deletions.answered(&outcome);
        }
        self.tell_changes(id, &display, &outcome, size)?;
        let origin = match self.aborted.remove(&id) {
            true => Origin::Peer,
            false => Origin::Here,
        };
        let labels = (self.dest.label.as_str(), self.dest.dest_label.as_str());
        let event = Event::of_outcome(display, &outcome, size).failed_at(origin, dir);
        self.tally.event(event.named_for(Origin::Here, labels));
        self.reply(Message::Outcome { id, outcome })
    }

    /// With `--itemize`: what placing entry `id` changed, told before its
    /// outcome (only if it is in place).
    fn tell_changes(
        &mut self,
        id: u64,
        display: &str,
        outcome: &Outcome,
        size: u64,
    ) -> Result<(), EngineError> {
        match self.changes.remove(&id) {
            Some((what, dir)) if outcome.is_ok() => {
                let path = rebase(display, &self.dest.label, &self.dest.dest_label);
                self.tally.event(Event::Changed {
                    path,
                    what: what.clone(),
                    dir,
                    size,
                });
                match self.dest.tell_sender {
                    true => self.reply(Message::Changes { id, what }),
                    false => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    /// The file in place, if it passes as unchanged: same size and mtime,
    /// or with `--checksum` same content (its mtime is then made the
    /// sender's).
    fn find_unchanged(&self, at: &Landing, size: u64, mtime: Mtime) -> Option<place::Found> {
        if !self.dest.checksum {
            return place::find_unchanged(&at.parent, &at.name, size, mtime);
        }
        let found = place::find_same_content(&at.parent, &at.name, size, at.digest?)?;
        if found.mtime != mtime && self.dest.link_dests.is_empty() {
            place::set_mtime(&at.parent, &at.name, mtime);
        }
        Some(found)
    }

    /// On an append-only server, the verdict on an entry that is not a file
    /// or a directory and would replace what is there: nothing to do if
    /// that is the same already, refused otherwise. (A file is judged once
    /// its quick check is done; a directory is merged into.)
    fn append_only_verdict(&self, at: &Landing, kind: &EntryKind) -> Option<Outcome> {
        if !self.dest.append_only || matches!(kind, EntryKind::Dir { .. } | EntryKind::File { .. })
        {
            return None;
        }
        let existing = place::existing(at.parent.as_fd(), &at.name)?;
        let what = match kind {
            EntryKind::Hardlink { target, .. } => {
                let target = WirePath::parse(target.as_bytes()).ok();
                let file = target.and_then(|t| place::look(&self.dest, &t));
                itemize::link_change(Some(&existing), file.as_ref())
            }
            _ => itemize::change_of(Some(&existing), kind, None),
        };
        match what.is_empty() {
            true => Some(Outcome::Ok),
            false => Some(rules::append_only_refusal()),
        }
    }

    /// With `--link-dest` (and `--atomic`, whose live tree is one): take
    /// the file from the first of those trees that has it unchanged (size,
    /// mtime, mode and owner), hard-linked: it is never sent. Whether one
    /// did. On an append-only server a file already at the destination is
    /// never replaced so.
    fn link_from_elsewhere(
        &mut self,
        at: &Landing,
        path: &WirePath,
        (size, mode, mtime): (u64, u32, Mtime),
    ) -> bool {
        let replace = !self.dest.append_only;
        self.dest.link_dests.iter_mut().any(|link| {
            let Some((dir, name)) = link.open_parent(path) else {
                return false;
            };
            let Some(found) = place::find_unchanged(&dir, name, size, mtime) else {
                return false;
            };
            let to = (at.parent.as_ref(), at.name.as_slice());
            MetadataFix::between(found.mode, found.owner, mode, at.owner).is_empty()
                && place::link_found((&dir, name), &found, to, replace).is_ok()
        })
    }

    /// With `--itemize`: judge what placing this entry will change, before
    /// it is placed (against the live tree, for an atomic publish).
    fn judge_change(&mut self, at: &Landing, path: &WirePath, kind: &EntryKind) {
        if !self.dest.itemize {
            return;
        }
        let existing = match self.dest.publish {
            Some(_) => place::look(&self.dest, path),
            None => place::existing(at.parent.as_fd(), &at.name),
        };
        let same = match (self.dest.checksum, at.digest) {
            (true, Some(digest)) => match kind {
                EntryKind::File { size, .. } => {
                    place::content_same(&self.dest, path, *size, digest)
                }
                _ => None,
            },
            _ => None,
        };
        let what = match kind {
            EntryKind::Hardlink { target, .. } => {
                let target = WirePath::parse(target.as_bytes()).ok();
                let file = target.and_then(|t| place::look(&self.dest, &t));
                itemize::link_change(existing.as_ref(), file.as_ref())
            }
            _ => itemize::with_content(itemize::change_of(existing.as_ref(), kind, at.owner), same),
        };
        if !what.is_empty() {
            let dir = matches!(kind, EntryKind::Dir { .. });
            self.changes.insert(at.id, (what, dir));
        }
    }

    /// Answer a directory entry: only failures are events.
    fn dir_verdict(
        &mut self,
        id: u64,
        display: String,
        failure: Option<String>,
    ) -> Result<(), EngineError> {
        match failure {
            None => {
                self.tell_changes(id, &display, &Outcome::Ok, 0)?;
                self.tally.settled();
                self.reply(Message::Outcome {
                    id,
                    outcome: Outcome::Ok,
                })
            }
            Some(why) => self.answer(id, display, Outcome::Failed(why), 0, true),
        }
    }

    fn entry(
        &mut self,
        id: u64,
        path: WireBytes,
        kind: EntryKind,
        owner: Option<Owner>,
        digest: Option<FileDigest>,
    ) -> Result<(), EngineError> {
        if let Err(e) = self.order.admit(id, owner) {
            self.failed_at = Some(path);
            return Err(e.into());
        }
        // Owners are applied only by a root receiver (the only one that can).
        let owner = owner.filter(|_| self.dest.owners);
        let path = WirePath::from_wire(path)?;
        place::settle_root(&mut self.dest, &mut self.parents, &path, &kind);
        if let Some(deletions) = &mut self.deletions {
            deletions.remember(&path, &kind, &self.dest.budget);
        }
        let display = display_name(&self.dest.label, &path);
        let parent_dir = self.dirs.parent_of(&path);
        let name = self.name_of(&path);
        let landing = match rules::name_refusal(self.chosen_name(&path, &name)) {
            Some(refusal) => Err(refusal),
            None => self.land(&path, parent_dir).map_err(|e| {
                let why = format!("cannot open its directory: {}", reason(&e));
                budget::outcome_of_error(&e, why)
            }),
        };
        let parent = match landing {
            Ok(parent) => parent,
            Err(outcome) => {
                self.discard_parked(id);
                return match (kind, outcome) {
                    (EntryKind::Dir { .. }, Outcome::Failed(why)) => {
                        self.dir_verdict(id, display, Some(why))
                    }
                    (_, outcome) => self.verdict(id, display, outcome, 0),
                };
            }
        };
        let at = Landing {
            id,
            display,
            parent_dir,
            parent,
            name,
            owner,
            digest,
        };
        self.judge_change(&at, &path, &kind);
        self.place_entry(at, &path, kind)
            .inspect_err(|_| self.failed_at = Some(WireBytes(path.as_bytes().to_vec())))
    }

    /// The name of an entry as the peer chose it: an atomic publish's root
    /// lands under a working name of ours, but was asked for as the live
    /// tree's.
    fn chosen_name<'a>(&'a self, path: &WirePath, name: &'a [u8]) -> &'a [u8] {
        match &self.dest.publish {
            Some(publish) if path.is_root() => &publish.name,
            _ => name,
        }
    }

    /// The name an entry takes in its directory: the root's is the last
    /// of the destination's.
    fn name_of(&self, path: &WirePath) -> Vec<u8> {
        match path.components().last() {
            Some(last) => last.to_vec(),
            None => self.dest.prefix.last().cloned().unwrap_or_default(),
        }
    }

    /// The directory an entry lands in. A directory of this transfer is
    /// open already; any other parent is opened beneath the destination
    /// (or found in the cache).
    fn land(&mut self, path: &WirePath, parent_dir: Option<u64>) -> io::Result<Arc<OwnedFd>> {
        if let Some(d) = parent_dir.and_then(|d| self.dirs.get(d)) {
            return Ok(d.io.fd.clone());
        }
        let mut components = self.dest.prefix.clone();
        components.extend(path.components().map(<[u8]>::to_vec));
        self.parents.open(&self.dest.base, &components)
    }

    fn place_entry(
        &mut self,
        at: Landing,
        path: &WirePath,
        kind: EntryKind,
    ) -> Result<(), EngineError> {
        if let Some(outcome) = self.append_only_verdict(&at, &kind) {
            return self.verdict(at.id, at.display, outcome, 0);
        }
        match kind {
            EntryKind::Dir { mode, mtime } => self.dir_entry(at, path, mode, mtime),
            EntryKind::File { size, mode, mtime } => self.file_entry(at, path, size, mode, mtime),
            EntryKind::Symlink { target, mtime } => {
                let made =
                    place::make_symlink(&at.parent, &at.name, target.as_bytes(), mtime, at.owner);
                self.verdict(at.id, at.display, outcome_of(made), 0)
            }
            EntryKind::Special { what } => {
                let why = format!("special file ({}), not transferred", peer_text(&what));
                self.verdict(at.id, at.display, Outcome::Skipped(why), 0)
            }
            EntryKind::Fifo { mode, mtime } => self.node_entry(at, Node::Fifo, mode, mtime),
            EntryKind::Device {
                block,
                major,
                minor,
                mode,
                mtime,
            } => match rules::device_refusal(self.dest.devices, block) {
                Some(refusal) => self.verdict(at.id, at.display, refusal, 0),
                None => {
                    let node = Node::Device {
                        block,
                        major,
                        minor,
                    };
                    self.node_entry(at, node, mode, mtime)
                }
            },
            EntryKind::Hardlink { first, target } => self.link_entry(at, first, target),
        }
    }

    fn dir_entry(
        &mut self,
        at: Landing,
        path: &WirePath,
        mode: u32,
        mtime: Mtime,
    ) -> Result<(), EngineError> {
        self.dirs.check_room()?;
        let parent_fresh = self.dirs.is_fresh(at.parent_dir);
        let names = 2 * path.as_bytes().len() + at.display.len();
        let held = self.dest.budget.hold(1, names as u64 + HELD_ENTRY_MEMORY);
        let handle = match place::open_dir(&at.parent, &at.name, at.owner) {
            Ok(handle) => handle,
            Err(e) => {
                let outcome = budget::outcome_of_error(&e, reason(&e));
                return self.verdict(at.id, at.display, outcome, 0);
            }
        };
        let Some(held) = held else {
            // Made, but not held open: what goes below it is found by its
            // path, and its metadata waits for an attempt with room.
            let why = budget::PUT_OFF.to_string();
            return self.verdict(at.id, at.display, Outcome::Incomplete(why), 0);
        };
        // Unchanged files may come from elsewhere (`--link-dest`, an atomic
        // publish's live tree): the sender must wait for their plans even
        // in a new directory.
        if handle.created && !parent_fresh && self.dest.link_dests.is_empty() {
            // The top of a new subtree: the sender need not wait for the
            // plans of the files below it.
            self.reply(Message::Fresh { id: at.id })?;
            self.flush_replies()?;
        }
        let io = DirIo {
            display: at.display,
            fd: handle.fd,
            mode,
            mtime,
            owner: at.owner,
            new_files_owner: handle.new_files_owner,
            _held: held,
        };
        let fresh = handle.created || parent_fresh;
        if let Some(deletions) = self.deletions.as_mut().filter(|_| path.is_root() && fresh) {
            deletions.root_made();
        }
        self.dirs.open(at.id, path, at.parent_dir, fresh, io);
        Ok(())
    }

    fn file_entry(
        &mut self,
        at: Landing,
        path: &WirePath,
        size: u64,
        mode: u32,
        mtime: Mtime,
    ) -> Result<(), EngineError> {
        self.plans.planned(at.id);
        if self.files.len() >= MAX_OPEN_FILES {
            return Err(Violation::OverLimit {
                what: "files open",
                limit: MAX_OPEN_FILES,
            }
            .into());
        }
        let mode = rules::file_mode(mode);
        let fresh_dir = self.dirs.is_fresh(at.parent_dir);
        if rules::worth_looking(self.dest.ignore_times, fresh_dir)
            && let Some(found) = self.find_unchanged(&at, size, mtime)
        {
            let fix = MetadataFix::between(found.mode, found.owner, mode, at.owner);
            // A file may share its inode with a `--link-dest` tree (an
            // atomic publish's live one): its metadata is never changed in
            // place.
            let in_place = fix.is_empty() || self.dest.link_dests.is_empty();
            if !fix.is_empty() && in_place {
                place::fix_metadata(&at.parent, &at.name, &fix);
            }
            if in_place {
                self.discard_parked(at.id);
                return self.verdict(at.id, at.display, Outcome::Unchanged, size);
            }
        }
        if !self.dest.ignore_times && self.link_from_elsewhere(&at, path, (size, mode, mtime)) {
            self.discard_parked(at.id);
            return self.verdict(at.id, at.display, Outcome::Unchanged, size);
        }
        if self.dest.append_only && place::existing(at.parent.as_fd(), &at.name).is_some() {
            self.discard_parked(at.id);
            return self.verdict(at.id, at.display, rules::append_only_refusal(), 0);
        }
        let target = Target {
            parent: at.parent.clone(),
            name: at.name.clone(),
            size,
            mode,
            mtime,
        };
        let plan = PartPlan::for_file(size, fresh_dir);
        let wants_basis = basis::worth_a_basis(&self.dest, size, fresh_dir);
        // The part file, its journal beside it, and the basis of a delta.
        let needed = 1 + u64::from(plan.journaled) + u64::from(wants_basis);
        let memory = at.display.len() as u64 + HELD_ENTRY_MEMORY;
        let opened = match self.dest.budget.hold(needed, memory) {
            Some(held) => self.open_part(&at, target, plan).map(|o| (o, held)),
            None => Err(Outcome::Incomplete(budget::PUT_OFF.into())),
        };
        match opened {
            Ok(((part, held), budgeted)) => {
                let whole = held.iter().map(|r| u64::from(r.len)).sum::<u64>() == size;
                let signed = (wants_basis && !whole)
                    .then(|| self.sign(&at, path, fresh_dir))
                    .flatten();
                self.receive_file(at, part, held, budgeted, signed)
            }
            Err(outcome) => {
                self.discard_parked(at.id);
                self.verdict(at.id, at.display, outcome, 0)
            }
        }
    }

    /// Open the part file and get it ready; why not, if that fails.
    fn open_part(
        &self,
        at: &Landing,
        target: Target,
        plan: PartPlan,
    ) -> Result<(Part, Vec<ChunkRecord>), Outcome> {
        let (mut part, existing) = Part::open(target, plan).map_err(|e| {
            // Another transfer holds it: trying later may work.
            if e.kind() == io::ErrorKind::WouldBlock {
                Outcome::Incomplete(reason(&e))
            } else {
                budget::outcome_of_error(&e, reason(&e))
            }
        })?;
        // A part file this process just made has a known owner.
        let made_with = at
            .parent_dir
            .and_then(|d| self.dirs.get(d))
            .and_then(|d| d.io.new_files_owner)
            .filter(|_| !existing);
        part.set_owner_on_commit(rules::chown_needed(at.owner, made_with));
        let (replies, tally) = (self.replies.clone(), self.tally.clone());
        let mut last_sign = Instant::now();
        let mut alive = |_verified: u64| {
            if last_sign.elapsed() >= KEEPALIVE_EVERY {
                last_sign = Instant::now();
                tally.working();
                let _ = replies.blocking_send(vec![Message::Keepalive]);
            }
        };
        // Checking a journal holds its records in memory, charged to the
        // session; without the room, the file is received whole.
        let memory = plan.resumes(existing).then(|| {
            let needed = crate::journal::memory_for(part.size());
            self.dest.budget.control.try_take(needed)
        });
        let resume = matches!(memory, Some(Some(_)));
        let held = part
            .prepare(plan, resume, &mut alive)
            .map_err(|e| budget::outcome_of_error(&e, reason(&e)))?;
        Ok((part, held))
    }

    /// Find the version of the file at `path` held here already, and
    /// describe it to the sender, if the signature fits in the session's
    /// memory and in what the sender holds of signatures.
    fn sign(&mut self, at: &Landing, path: &WirePath, fresh_dir: bool) -> Option<Signed> {
        let parent = (at.parent.as_fd(), fresh_dir);
        let basis = basis::find(&mut self.dest.link_dests, parent, &at.name, path)?;
        if !self.signed_ahead.may_fit(basis.size) {
            return None;
        }
        let memory = self
            .dest
            .budget
            .control
            .try_take(basis::memory_for(basis.size))?;
        let (replies, tally) = (self.replies.clone(), self.tally.clone());
        let mut last_sign = Instant::now();
        let alive = |_read: u64| {
            if last_sign.elapsed() >= KEEPALIVE_EVERY {
                last_sign = Instant::now();
                tally.working();
                let _ = replies.blocking_send(vec![Message::Keepalive]);
            }
        };
        let (params, blocks) = crate::delta::signature_of(basis.file.as_fd(), basis.size, alive)
            .inspect_err(|e| tracing::debug!("no delta for {}: {e}", at.display))
            .ok()?;
        if blocks.is_empty() || !self.signed_ahead.has_room(blocks.len()) {
            return None;
        }
        self.signed_ahead.add(blocks.len());
        for message in basis::messages(at.id, params, &blocks) {
            // Queued behind its `have`, before the `planned` that covers it.
            if self.reply(message).is_err() {
                break;
            }
        }
        Some(Signed {
            basis,
            blocks: blocks.len(),
            _memory: Some(memory),
        })
    }

    /// Stop receiving file `id`: the sender is done with its signature too.
    fn take_file(&mut self, id: u64) -> Option<OpenFile> {
        self.unsign(id);
        self.files.remove(&id)
    }

    /// The sender is done with file `id`'s signature (its data block has
    /// ended, or the file is settled).
    fn unsign(&mut self, id: u64) {
        if let Some(s) = self.files.get_mut(&id).and_then(|f| f.signed.as_mut()) {
            self.signed_ahead.release(std::mem::take(&mut s.blocks));
        }
    }

    /// A file is being received: say what is held of it already, then
    /// take the chunks that overtook its entry.
    fn receive_file(
        &mut self,
        at: Landing,
        part: Part,
        mut held: Vec<ChunkRecord>,
        budgeted: Held,
        signed: Option<Signed>,
    ) -> Result<(), EngineError> {
        let runs = rules::offer_held(&mut held);
        let arrival = Arrival::new(part.size(), &held);
        self.tally.event(Event::FileStarted {
            path: at.display.clone(),
            size: arrival.size(),
        });
        if !held.is_empty() {
            let bytes: u64 = held.iter().map(|r| u64::from(r.len)).sum();
            self.tally.event(Event::Resumed {
                path: at.display.clone(),
                bytes,
            });
            self.reply(Message::Have {
                id: at.id,
                chunks: runs,
            })?;
        }
        self.dirs.adopt(at.parent_dir);
        let file = OpenFile {
            display: at.display,
            parent_dir: at.parent_dir,
            arrival,
            part,
            signed,
            _held: budgeted,
        };
        self.files.insert(at.id, file);
        for chunk in self.parked.take(at.id) {
            self.chunk(chunk)?;
        }
        self.reopen_if_drained();
        Ok(())
    }

    fn node_entry(
        &mut self,
        at: Landing,
        node: Node,
        mode: u32,
        mtime: Mtime,
    ) -> Result<(), EngineError> {
        let made = place::make_node(&at.parent, &at.name, node, mode, mtime, at.owner);
        self.verdict(at.id, at.display, outcome_of(made), 0)
    }

    fn link_entry(
        &mut self,
        at: Landing,
        first: u64,
        target: WireBytes,
    ) -> Result<(), EngineError> {
        rules::check_link(at.id, first)?;
        let target = WirePath::from_wire(target)?;
        let target_name = target.components().last().unwrap_or_default();
        if let Some(refusal) = rules::link_target_refusal(target_name) {
            return self.verdict(at.id, at.display, refusal, 0);
        }
        if self.files.contains_key(&first) {
            // Its file is still arriving: the link waits for it.
            let memory = (at.display.len() + at.name.len()) as u64 + HELD_ENTRY_MEMORY;
            let Some(held) = self.dest.budget.hold(0, memory) else {
                let why = budget::PUT_OFF.to_string();
                return self.verdict(at.id, at.display, Outcome::Incomplete(why), 0);
            };
            let parent_dir = at.parent_dir;
            let link = WaitingLink {
                id: at.id,
                display: at.display,
                parent: at.parent,
                name: at.name,
                parent_dir,
                _held: held,
            };
            self.links.wait(first, link)?;
            self.dirs.adopt(parent_dir);
            return Ok(());
        }
        // Settled already, or unchanged: link to its name, found beneath
        // the destination like any path.
        let Some(target_name) = target.components().last().map(<[u8]>::to_vec) else {
            return Err(Violation::LinkToRoot { id: at.id }.into());
        };
        let mut components = self.dest.prefix.clone();
        components.extend(target.components().map(<[u8]>::to_vec));
        let linked = self
            .parents
            .open(&self.dest.base, &components)
            .and_then(|dir| place::hard_link(&dir, &target_name, &at.parent, &at.name));
        self.verdict(at.id, at.display, outcome_of(linked), 0)
    }

    fn chunk(&mut self, chunk: ReadChunk) -> Result<(), EngineError> {
        let h = chunk.chunk.header;
        let Some(f) = self.files.get_mut(&h.file_id) else {
            if !self.order.announced(h.file_id) {
                // Overtook its entry on another connection: wait for it.
                if self.parked.park(h.file_id, chunk)? == Flow::Pause {
                    self.gate.pause();
                }
            }
            // Otherwise the file is settled (failed, or aborted): drop it.
            return Ok(());
        };
        // A chunk that does not fit, or is corrupt, was damaged on the way
        // or by the sender: nothing of it is written, what was verified
        // before stays, and sending the file again can repair it.
        if let Err(e) = f.arrival.fits(h.offset, h.raw_len) {
            return self.fail_open_file(h.file_id, Outcome::Incomplete(e.to_string()), true);
        }
        let basis = f.signed.as_ref().map(Signed::basis_fd);
        let raw = match self.decoder.decode(&chunk, basis) {
            Ok(raw) => raw,
            Err(fault) => {
                f.arrival.damaged(h.raw_len, fault.to_string());
                return self.advance(h.file_id);
            }
        };
        if let Err(e) = f.part.write(raw, h.offset, h.raw_len) {
            // Disk full and the like: not cured by sending again at once,
            // but what is verified stays for the same command later.
            return self.fail_open_file(h.file_id, Outcome::Failed(reason(&e)), true);
        }
        if let Err(e) = f.arrival.record(h.offset, h.raw_len, h.hash) {
            return self.fail_open_file(h.file_id, Outcome::Incomplete(e.to_string()), true);
        }
        f.part.journal_chunk(ChunkRecord {
            offset: h.offset,
            len: h.raw_len,
            hash: h.hash,
        });
        self.tally.event(Event::Bytes {
            n: u64::from(h.raw_len),
        });
        self.advance(h.file_id)
    }

    /// Commit a file, or settle it as damaged, once it has all it will get.
    fn advance(&mut self, id: u64) -> Result<(), EngineError> {
        let Some(f) = self.files.get(&id) else {
            return Ok(());
        };
        match f.arrival.next() {
            Next::Wait => Ok(()),
            Next::Commit => self.finish_file(id),
            Next::Damaged(why) => self.fail_open_file(id, Outcome::Incomplete(why), true),
        }
    }

    fn file_end(&mut self, id: u64, digest: &str) -> Result<(), EngineError> {
        let digest = FileDigest::from_hex(digest).ok_or(Violation::MalformedDigest { id })?;
        self.unsign(id);
        let Some(f) = self.files.get_mut(&id) else {
            return Ok(self.order.settled_already("file_end", id)?);
        };
        f.arrival.expect(digest);
        self.advance(id)
    }

    /// Verify and commit a file whose chunks and digest have all arrived.
    fn finish_file(&mut self, id: u64) -> Result<(), EngineError> {
        let Some(mut f) = self.take_file(id) else {
            return Ok(());
        };
        let outcome = match f.arrival.verify() {
            // The chunks verified one by one, yet the whole is not what was
            // sent: of a resumed file, the chunks held from before are
            // suspect; otherwise nothing of this part file can be trusted.
            Err(e) if f.part.forget_held() => Outcome::Incomplete(format!(
                "{e}; the chunks held from an earlier attempt no longer match and come again"
            )),
            Err(e) => {
                f.part.keep = false;
                Outcome::Incomplete(e.to_string())
            }
            Ok(()) => match f.part.commit() {
                Ok(()) => Outcome::Ok,
                Err(why) => Outcome::Failed(why),
            },
        };
        let placed = match &outcome {
            Outcome::Ok => Ok(f.part.placed()),
            other => Err(other),
        };
        self.release_links(id, placed)?;
        self.verdict(id, f.display.clone(), outcome, f.arrival.size())?;
        self.settled(f.parent_dir)
    }

    /// Fail an open file: answer now, and ignore what the sender still
    /// sends of it. Its part file stays for a resume if `keep` and it has
    /// a journal; otherwise it is removed.
    fn fail_open_file(&mut self, id: u64, outcome: Outcome, keep: bool) -> Result<(), EngineError> {
        if let Some(mut f) = self.take_file(id) {
            f.part.keep = keep;
            self.release_links(id, Err(&outcome))?;
            self.verdict(id, f.display.clone(), outcome, 0)?;
            self.settled(f.parent_dir)?;
        }
        Ok(())
    }

    /// File `first` is settled: in place as `name` in `dir`, or not (why).
    /// Give its waiting hard links their names, or the same fate.
    fn release_links(
        &mut self,
        first: u64,
        placed: Result<(&OwnedFd, &[u8]), &Outcome>,
    ) -> Result<(), EngineError> {
        for link in self.links.release(first) {
            let outcome = match placed {
                Ok((dir, name)) => {
                    outcome_of(place::hard_link(dir, name, &link.parent, &link.name))
                }
                Err(file_outcome) => rules::link_outcome_without_file(file_outcome),
            };
            self.verdict(link.id, link.display, outcome, 0)?;
            self.settled(link.parent_dir)?;
        }
        Ok(())
    }

    fn abort(&mut self, id: u64, why: &str, transient: bool) -> Result<(), EngineError> {
        let why = peer_text(why);
        if self.files.contains_key(&id) {
            self.aborted.insert(id);
            let outcome = if transient {
                Outcome::Incomplete(why)
            } else {
                Outcome::Failed(why)
            };
            return self.fail_open_file(id, outcome, false);
        }
        if let Some(d) = self.dirs.get_mut(id) {
            d.failure = Some(why);
            self.aborted.insert(id);
            return Ok(());
        }
        Ok(self.order.settled_already("abort", id)?)
    }

    fn dir_end(&mut self, id: u64) -> Result<(), EngineError> {
        match self.dirs.end(id) {
            Some(finished) => self.finish_dirs(finished),
            // Its creation failed and was answered then.
            None => Ok(self.order.settled_already("dir_end", id)?),
        }
    }

    /// A child of `parent_dir` is settled; finish every directory that was
    /// only waiting for it, upwards.
    fn settled(&mut self, parent_dir: Option<u64>) -> Result<(), EngineError> {
        let finished = self.dirs.settle(parent_dir);
        self.finish_dirs(finished)
    }

    /// Apply finished directories' metadata and answer them.
    fn finish_dirs(&mut self, finished: Vec<(u64, OpenDir<DirIo>)>) -> Result<(), EngineError> {
        for (id, d) in finished {
            let io = d.io;
            let failure = match place::set_dir_metadata(&io.fd, io.owner, io.mode, io.mtime) {
                Err(e) => {
                    self.aborted.remove(&id); // then the failure is ours
                    Some(format!("cannot set directory metadata: {}", reason(&e)))
                }
                Ok(()) => d.failure,
            };
            self.dir_verdict(id, io.display, failure)?;
        }
        Ok(())
    }

    fn discard_parked(&mut self, id: u64) {
        self.parked.take(id);
        self.reopen_if_drained();
    }

    fn reopen_if_drained(&self) {
        if self.parked.flow() == Flow::Go {
            self.gate.reopen();
        }
    }
}

/// `--delete`: what the worker tells of its deletions goes where its
/// replies go.
impl Teller for Worker {
    fn tally(&self) -> &Tally {
        &self.tally
    }

    fn reply(&mut self, msg: Message) -> Result<(), EngineError> {
        Worker::reply(self, msg)
    }

    fn keepalive(&mut self) -> Result<(), EngineError> {
        self.reply(Message::Keepalive)?;
        self.flush_replies()
    }

    fn done(&mut self) -> Result<(), EngineError> {
        self.reply(Message::Done)?;
        self.flush_replies()
    }
}

impl Worker {
    /// The transfer is over: say `done`, and mirror, or publish.
    fn finish(&mut self) -> Result<(), EngineError> {
        let base = self.dest.base.try_clone().map_err(EngineError::from)?;
        let root = self.dest.prefix.clone();
        let deletions = self.deletions.take();
        let Some(publish) = self.dest.publish.take() else {
            return deletions::finish(self, deletions, &base, &root, false);
        };
        // As with deletions: the sender hears of it before `done`; a
        // downloading client publishes after.
        if self.dest.tell_sender {
            self.publish(&publish, deletions, &base, &root)?;
            self.done()
        } else {
            self.done()?;
            self.publish(&publish, deletions, &base, &root)
        }
    }

    /// `--atomic`: tell what leaves the live tree, make the staged tree
    /// equal to the source, and switch it in, unless an entry failed or
    /// more would go than `--max-delete` allows. Either way, say so.
    fn publish(
        &mut self,
        publish: &Publish,
        deletions: Option<Deletions>,
        base: &OwnedFd,
        staging: &[Vec<u8>],
    ) -> Result<(), EngineError> {
        let refused = match deletions {
            Some(d) if d.failures() > 0 => Some(format!("{} entries failed", d.failures())),
            Some(mut d) => match d.run(base, &publish.live(), How::List, self)? {
                Some(held) => Some(refusal_of(&held)),
                None => d
                    .run(base, staging, How::Quietly, self)?
                    .map(|h| refusal_of(&h)),
            },
            None => None,
        };
        let switched = match refused {
            Some(why) => Err(why),
            None => publish::switch(base.as_fd(), publish)
                .map_err(|e| format!("cannot switch it in: {}", reason(&e))),
        };
        let previous = switched == Ok(Switched::Replaced);
        let refused = switched.err();
        if refused.is_none()
            && let Some(plan) = &self.dest.backup
        {
            let rotated = publish::after_backup(base.as_fd(), plan, &publish.name);
            self.rotated(rotated)?;
        }
        self.tally.event(Event::Published {
            path: self.dest.dest_label.clone(),
            previous,
            refused: refused.clone(),
        });
        match self.dest.tell_sender {
            true => self.reply(Message::Published {
                published: refused.is_none(),
                previous_kept: previous,
                reason: refused,
                snapshot: self
                    .dest
                    .backup
                    .as_ref()
                    .map(|_| WireBytes(publish.name.clone())),
            }),
            false => Ok(()),
        }
    }
}

impl Worker {
    /// A backup's rotation: each snapshot it let go, told as a deletion
    /// (named below the backup directory), or why it could not be done.
    fn rotated(&mut self, rotated: io::Result<Vec<String>>) -> Result<(), EngineError> {
        let label = self.dest.backup_label();
        match rotated {
            Ok(pruned) => {
                for name in pruned {
                    let path = format!("{label}/{name}");
                    self.tally.event(Event::Deleted { path, dir: true });
                    if self.dest.tell_sender {
                        let path = WireBytes(name.into_bytes());
                        let error = None;
                        self.reply(Message::Deleted {
                            path,
                            dir: true,
                            error,
                        })?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                let why = format!("cannot keep `latest` and the rotation: {}", reason(&e));
                self.tally.event(Event::DeleteFailed {
                    path: label,
                    reason: why.clone(),
                });
                match self.dest.tell_sender {
                    true => self.reply(Message::Deleted {
                        path: WireBytes(b"latest".to_vec()),
                        dir: false,
                        error: Some(why),
                    }),
                    false => Ok(()),
                }
            }
        }
    }
}

/// Why a publish waits, in the words of what held its deletions back.
fn refusal_of(held: &HeldBack) -> String {
    match held {
        HeldBack::Failures { count } => format!("{count} entries failed"),
        HeldBack::MaxDelete { would, max } => {
            format!("{would} entries would leave the live tree, more than --max-delete {max}")
        }
        HeldBack::Memory => "the source's entries could not all be remembered".into(),
    }
}

fn outcome_of(done: io::Result<()>) -> Outcome {
    match done {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Failed(reason(&e)),
    }
}
