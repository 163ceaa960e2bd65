//! What the receiver does to the file system, as the rules decided it.
//!
//! Everything here works below directory handles, never following a
//! symlink (see `fsx`): directories are made or checked, files arrive in a
//! part file and take their name by an atomic rename (or link) only once
//! verified, with their metadata already set. No half file is ever
//! visible. A part file is one this transfer made: unnamed (see
//! [`fsx::open_unnamed_part`]), or under a fresh name of its own created
//! exclusively, or (for a file that may be resumed) the hidden
//! `.NAME.ferry-part`, locked for as long as it is open, and taken up
//! again only if it is the receiver's own (see [`fsx::open_part`]).
//! Symlinks, nodes and links are made under fresh names too: nothing here
//! removes a name another transfer may hold.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ferry_proto::digest::FileDigest;
use ferry_proto::message::{EntryKind, Mtime, Owner};
use ferry_proto::path::WirePath;
use rustix::fs::{AtFlags, FileType, Mode};

use super::Destination;
use super::itemize::{Existing, ExistingKind};
use super::rules::{self, MetadataFix, PartPlan};
use crate::codec::Decoded;
use crate::error::reason;
use crate::fsx::{self, Kind};
use crate::journal::{self, ChunkRecord, Journal, SourceStamp};
use crate::names;

/// The most recently used parent directory, by path: consecutive entries
/// mostly share one, and it is then not resolved again.
#[derive(Default)]
pub(super) struct ParentCache {
    cached: Option<(Vec<Vec<u8>>, Arc<OwnedFd>)>,
}

impl ParentCache {
    /// The directory that holds `components` (all but the last), opened
    /// below `base` without following symlinks.
    pub(super) fn open(
        &mut self,
        base: &OwnedFd,
        components: &[Vec<u8>],
    ) -> io::Result<Arc<OwnedFd>> {
        let parents = &components[..components.len() - 1];
        if let Some((path, fd)) = &self.cached
            && path == parents
        {
            return Ok(fd.clone());
        }
        let refs: Vec<&[u8]> = parents.iter().map(Vec::as_slice).collect();
        let fd = Arc::new(fsx::open_dir_beneath(base.as_fd(), &refs)?);
        self.cached = Some((parents.to_vec(), fd.clone()));
        Ok(fd)
    }
}

/// The first entry has arrived: if it is the root and the rules say so,
/// the root goes inside the destination under the source's name (a file
/// into an existing directory). What is at the destination is looked at
/// beneath `dest.base` without following a symlink. Decided once.
pub(super) fn settle_root(
    dest: &mut Destination,
    parents: &mut ParentCache,
    path: &WirePath,
    kind: &EntryKind,
) {
    let Some(name) = dest.inside.take() else {
        return;
    };
    let Some(last) = dest.prefix.last().filter(|_| path.is_root()) else {
        return;
    };
    let is_dir = parents.open(&dest.base, &dest.prefix).is_ok_and(|parent| {
        rustix::fs::statat(&*parent, last.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|stat| fsx::kind_of(&stat) == fsx::Kind::Dir)
    });
    if rules::root_goes_inside(kind, is_dir) {
        dest.prefix.push(name);
    }
}

/// A directory of the transfer, made or found.
pub(super) struct DirHandle {
    pub(super) fd: Arc<OwnedFd>,
    pub(super) created: bool,
    /// The owner of a file this process creates in it (known when owners
    /// are applied).
    pub(super) new_files_owner: Option<Owner>,
}

/// Make directory `name` in `parent`, or take the one there, and make
/// sure we can write into it until its metadata is applied.
pub(super) fn open_dir(
    parent: &OwnedFd,
    name: &[u8],
    owner: Option<Owner>,
) -> io::Result<DirHandle> {
    let (dir, created) = fsx::ensure_dir_noting(parent.as_fd(), name, 0o700)?;
    // Whatever mode it has: one we made has 0700, unless the umask took
    // some of it.
    let mode_unknown = !created || fsx::process_umask() & 0o700 != 0;
    // One stat serves both that and the owners below.
    let stat = (mode_unknown || owner.is_some())
        .then(|| rustix::fs::fstat(&dir).ok())
        .flatten();
    if mode_unknown
        && let Some(st) = &stat
        && st.st_mode & 0o700 != 0o700
    {
        let _ = rustix::fs::fchmod(&dir, Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700));
    }
    // What a file made in it will be owned by, to spare a chown where that
    // is already the one wanted (the chmod above leaves owner and setgid
    // bit alone).
    let new_files_owner = owner.and(stat.as_ref()).map(fsx::owner_of_new_files);
    Ok(DirHandle {
        fd: Arc::new(dir),
        created,
        new_files_owner,
    })
}

/// A directory's own metadata, applied once everything below it is in
/// place (creating a child would change its mtime).
pub(super) fn set_dir_metadata(
    dir: &OwnedFd,
    owner: Option<Owner>,
    mode: u32,
    mtime: Mtime,
) -> io::Result<()> {
    // The owner first: a chown may clear mode bits.
    if let Some(o) = owner {
        fsx::set_owner(dir.as_fd(), o)?;
    }
    rustix::fs::fchmod(dir, Mode::from_raw_mode(mode & 0o1777))?;
    Ok(rustix::fs::futimens(dir, &fsx::mtime_only(mtime))?)
}

/// What the file in place has, when it passes the quick check.
pub(super) struct Found {
    pub(super) mode: u32,
    pub(super) owner: Owner,
    pub(super) mtime: Mtime,
    /// Its stat: which inode it is, for a link to it.
    stat: rustix::fs::Stat,
}

/// The regular file `name` in `parent`, if it has this size and mtime.
pub(super) fn find_unchanged(
    parent: &OwnedFd,
    name: &[u8],
    size: u64,
    mtime: Mtime,
) -> Option<Found> {
    let stat = fsx::unchanged(parent.as_fd(), name, size, mtime)?;
    Some(found(&stat))
}

fn found(stat: &rustix::fs::Stat) -> Found {
    Found {
        mode: fsx::mode_of(stat),
        owner: fsx::owner_of(stat),
        mtime: fsx::mtime_of(stat),
        stat: *stat,
    }
}

/// The regular file `name` in `parent`, if it has this size and its
/// content has this digest (`--checksum`): looked at without following a
/// symlink, and read through that look.
pub(super) fn find_same_content(
    parent: &OwnedFd,
    name: &[u8],
    size: u64,
    digest: FileDigest,
) -> Option<Found> {
    let (same, stat) = compare_content(parent.as_fd(), name, size, digest)?;
    same.then(|| found(&stat))
}

/// Whether the regular file `name` in `dir`, of `size`, has the content
/// `digest` names, and its stat; `None` if it is no such file.
fn compare_content(
    dir: BorrowedFd<'_>,
    name: &[u8],
    size: u64,
    digest: FileDigest,
) -> Option<(bool, rustix::fs::Stat)> {
    let looked = fsx::look(dir, name).ok().flatten()?;
    if fsx::kind_of(&looked.stat) != Kind::File || looked.stat.st_size as u64 != size {
        return None;
    }
    let file = looked.open_regular(rustix::fs::OFlags::RDONLY)?;
    let same = fsx::file_digest(file.as_fd(), size).ok()? == digest;
    Some((same, looked.stat))
}

/// Whether the destination's file at `path` (see [`look`]) has the
/// content `digest` names; `None` if it is not a regular file of `size`.
pub(super) fn content_same(
    dest: &Destination,
    path: &WirePath,
    size: u64,
    digest: FileDigest,
) -> Option<bool> {
    let root = match &dest.publish {
        Some(publish) => publish.live(),
        None => dest.prefix.clone(),
    };
    let mut components: Vec<&[u8]> = root.iter().map(Vec::as_slice).collect();
    components.extend(path.components());
    let (name, parents) = components.split_last()?;
    let parent = fsx::open_dir_beneath(dest.base.as_fd(), parents).ok()?;
    compare_content(parent.as_fd(), name, size, digest).map(|(same, _)| same)
}

/// Give the file `name` in `parent` this mtime (its content is the
/// sender's already), never following a symlink. Best effort.
pub(super) fn set_mtime(parent: &OwnedFd, name: &[u8], mtime: Mtime) {
    let nofollow = AtFlags::SYMLINK_NOFOLLOW;
    let _ = rustix::fs::utimensat(parent, name, &fsx::mtime_only(mtime), nofollow);
}

/// Give an unchanged file the sender's mode and owner: looked at before
/// it is opened, so neither a symlink nor a node swapped in since the
/// check is followed or opened. Best effort: the content is right.
pub(super) fn fix_metadata(parent: &OwnedFd, name: &[u8], fix: &MetadataFix) {
    let found = fsx::look(parent.as_fd(), name).ok().flatten();
    if let Some(file) = found.and_then(|f| f.open_regular(rustix::fs::OFlags::RDONLY)) {
        if let Some(owner) = fix.owner {
            let _ = fsx::set_owner(file.as_fd(), owner);
        }
        if let Some(mode) = fix.mode {
            let _ = rustix::fs::fchmod(&file, Mode::from_raw_mode(mode));
        }
    }
}

/// What a file being received is to become.
pub(super) struct Target {
    pub(super) parent: Arc<OwnedFd>,
    pub(super) name: Vec<u8>,
    pub(super) size: u64,
    pub(super) mode: u32,
    pub(super) mtime: Mtime,
}

/// Under which name a part file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Naming {
    /// None at all (`O_TMPFILE`) until it is linked into place: nobody
    /// else can find it, and it vanishes with its descriptor.
    Unnamed,
    /// A fresh name of its own (`fsx::make_new`), created exclusively,
    /// that no other transfer looks for: a file that is never resumed.
    Fresh,
    /// `.NAME.ferry-part`, locked for as long as it is open: a file with a
    /// journal, found again by that name to resume.
    Resumable,
}

/// The part file of a file being received. Dropped uncommitted, it is
/// removed, unless it stays for a resume.
pub(super) struct Part {
    target: Target,
    /// Its name (empty while unnamed).
    part: Vec<u8>,
    naming: Naming,
    file: File,
    /// The record of verified chunks, for a resume (large files only).
    journal: Option<Journal>,
    journal_name: Vec<u8>,
    /// Whether an unfinished part file (with its journal) stays for the
    /// next attempt; false once its content is known to be wrong.
    pub(super) keep: bool,
    /// Some verified chunk is in it: worth keeping for a resume.
    holds_data: bool,
    /// It was resumed: some of its chunks were verified by an earlier
    /// attempt, against the source as it was then.
    resumed: bool,
    /// The chunks this attempt wrote and journaled (resumable files only):
    /// verified against the source as it is now.
    received: Vec<ChunkRecord>,
    /// Whether the part file was created with the final mode already.
    mode_set: bool,
    /// The owner to give it before it takes its name, if any.
    chown: Option<Owner>,
    /// Made for this attempt: every byte not written reads as zero.
    blank: bool,
    /// Some chunks were holes, left unwritten: the length is set before
    /// the commit.
    holes: bool,
    /// Once committed, remove what an interrupted transfer of a larger
    /// version of the file left (a part and its journal): in a directory
    /// this transfer made there is none.
    clear_stale: bool,
    committed: bool,
}

impl Part {
    /// Open the part file for `target` as `plan` says; whether it is one
    /// an interrupted transfer left.
    pub(super) fn open(target: Target, plan: PartPlan) -> io::Result<(Part, bool)> {
        let (naming, part, opened) = Self::create(&target, plan)?;
        let journal_name = if plan.journaled {
            names::journal_name(&target.name)
        } else {
            Vec::new()
        };
        let existing = opened.existing;
        let part = Part {
            target,
            part,
            naming,
            file: File::from(opened.fd),
            journal: None,
            journal_name,
            keep: true,
            holds_data: false,
            resumed: false,
            received: Vec::new(),
            mode_set: opened.mode_set,
            chown: None,
            blank: !existing,
            holes: false,
            clear_stale: naming == Naming::Fresh && !plan.fresh_dir,
            committed: false,
        };
        Ok((part, existing))
    }

    fn create(target: &Target, plan: PartPlan) -> io::Result<(Naming, Vec<u8>, fsx::PartFile)> {
        let dir = target.parent.as_fd();
        if plan.unnamed
            && let Some(opened) = fsx::open_unnamed_part(dir, target.mode)
        {
            return Ok((Naming::Unnamed, Vec::new(), opened));
        }
        if plan.journaled {
            let part = names::part_name(&target.name);
            let opened = fsx::open_part(dir, &part, target.mode)?;
            return Ok((Naming::Resumable, part, opened));
        }
        let (opened, part) = fsx::open_fresh_part(dir, target.mode)?;
        Ok((Naming::Fresh, part, opened))
    }

    /// The owner to give the file before it takes its name.
    pub(super) fn set_owner_on_commit(&mut self, owner: Option<Owner>) {
        self.chown = owner;
    }

    /// Get the part file ready: resume from its journal if `resume` and an
    /// interrupted transfer of the same source left one, otherwise empty
    /// it. Returns the chunks already held, in offset order. `alive` is
    /// called now and then while a long journal is checked.
    pub(super) fn prepare(
        &mut self,
        plan: PartPlan,
        resume: bool,
        alive: &mut dyn FnMut(u64),
    ) -> io::Result<Vec<ChunkRecord>> {
        let stamp = SourceStamp {
            size: self.target.size,
            mtime_sec: self.target.mtime.sec,
            mtime_nsec: self.target.mtime.nsec,
        };
        let dir = self.target.parent.clone();
        if !self.blank {
            if resume {
                // Keep what a resume can use: at most half the ledger's
                // bound ahead of a gap, and what one `have` can list.
                let keep = ferry_proto::digest::MAX_CHUNKS_AHEAD
                    .min(ferry_proto::limits::MAX_HAVE_RUNS)
                    / 2;
                let resumed = Journal::resume(
                    dir.as_fd(),
                    &self.journal_name,
                    stamp,
                    self.file.as_fd(),
                    ferry_proto::limits::DEFAULT_CHUNK_LEN,
                    keep,
                    alive,
                );
                match resumed {
                    Ok(Some((journal, held))) => {
                        self.journal = Some(journal);
                        self.holds_data = !held.is_empty();
                        self.resumed = self.holds_data;
                        return Ok(held);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!("journal unusable, starting over: {e}"),
                }
            }
            // Nothing in it can be trusted: start from empty.
            self.file.set_len(0)?;
            if plan.journaled {
                journal::remove(dir.as_fd(), &self.journal_name)?;
            }
        }
        // Without a journal the file still arrives; it just cannot resume.
        self.journal = plan
            .journaled
            .then(|| Journal::create(dir.as_fd(), &self.journal_name, stamp).ok())
            .flatten();
        Ok(Vec::new())
    }

    /// Write a verified chunk's bytes at `offset`.
    pub(super) fn write(&mut self, data: Decoded<'_>, offset: u64, len: u32) -> io::Result<()> {
        match data {
            Decoded::Bytes(raw) => fsx::write_all_at(self.file.as_fd(), raw, offset),
            // A hole: nothing to write into a part file that held nothing
            // (the length is set at the end); otherwise whatever an earlier
            // attempt left there must read as zeros.
            Decoded::Zeros => {
                self.holes = true;
                if self.blank {
                    Ok(())
                } else {
                    fsx::zero_range(self.file.as_fd(), offset, len)
                }
            }
        }
    }

    /// Note a chunk in the journal, once its bytes are in the part file,
    /// so the journal never claims more than is there.
    pub(super) fn journal_chunk(&mut self, record: ChunkRecord) {
        self.holds_data = true;
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        match j.record(record) {
            Ok(()) => self.received.push(record),
            Err(e) => {
                tracing::debug!("journal write failed, no resume for this file: {e}");
                self.journal = None;
                let _ = journal::remove(self.target.parent.as_fd(), &self.journal_name);
            }
        }
    }

    /// The whole file is not what was sent though every chunk verified: a
    /// resumed file's held chunks no longer match the source (it changed
    /// in place, its size and mtime put back), while the chunks this
    /// attempt received were checked against it as it is now. Keep those
    /// and forget the others, so that the next attempt sends only them;
    /// false (keep nothing) when there is nothing to tell apart.
    pub(super) fn forget_held(&mut self) -> bool {
        if !self.resumed || self.journal.is_none() || self.received.is_empty() {
            return false;
        }
        let stamp = SourceStamp {
            size: self.target.size,
            mtime_sec: self.target.mtime.sec,
            mtime_nsec: self.target.mtime.nsec,
        };
        let dir = self.target.parent.clone();
        let rewritten =
            Journal::create(dir.as_fd(), &self.journal_name, stamp).and_then(|mut j| {
                self.received.iter().try_for_each(|&r| j.record(r))?;
                Ok(j)
            });
        match rewritten {
            Ok(journal) => {
                self.journal = Some(journal);
                self.keep = true;
                true
            }
            Err(e) => {
                tracing::debug!("cannot rewrite the journal, starting over: {e}");
                false
            }
        }
    }

    /// Make the verified part file the real one: metadata first, then the
    /// atomic rename (or, for an unnamed part file, the link), so the name
    /// only ever shows the complete file. The journal goes with it.
    pub(super) fn commit(&mut self) -> Result<(), String> {
        let placed = self
            .leave_part_name()
            .and_then(|()| self.set_metadata())
            .and_then(|()| self.take_name());
        match placed {
            Ok(()) => {
                self.committed = true;
                if self.clear_stale {
                    let name = &self.target.name;
                    let (part, journal) = (names::part_name(name), names::journal_name(name));
                    let dir = self.target.parent.as_fd();
                    let _ = fsx::remove_stale_part(dir, &part, &journal);
                }
                Ok(())
            }
            Err(why) => {
                self.keep = false;
                Err(why)
            }
        }
    }

    /// A resumable part leaves its name (and its journal) before it gets
    /// its final mode and owner, so that under that name there is only
    /// ever a private file of this process, which another transfer may
    /// take up, never one it would replace while this one holds it. It
    /// goes by its descriptor to a fresh name of its own: whatever became
    /// of the part name meanwhile, it is this file that is committed.
    fn leave_part_name(&mut self) -> Result<(), String> {
        if self.naming != Naming::Resumable {
            return Ok(());
        }
        let (dir, file) = (self.target.parent.as_fd(), self.file.as_fd());
        if self.journal.take().is_some() {
            let _ = journal::remove(dir, &self.journal_name);
        }
        let fresh = match fsx::link_anew(file, dir) {
            Ok(fresh) => {
                fsx::remove_if_named(dir, &self.part, file);
                fresh
            }
            // Without /proc: moved by its name, if that still is this file.
            Err(_) => fsx::rename_anew(dir, &self.part, file).map_err(|e| reason(&e))?,
        };
        self.part = fresh;
        self.naming = Naming::Fresh;
        Ok(())
    }

    fn set_metadata(&mut self) -> Result<(), String> {
        if self.holes {
            self.file
                .set_len(self.target.size)
                .map_err(|e| reason(&e))?;
        }
        // The owner first: a chown may clear mode bits.
        if let Some(owner) = self.chown {
            fsx::set_owner(self.file.as_fd(), owner)
                .map_err(|e| format!("cannot set its owner: {}", reason(&e)))?;
        }
        if !self.mode_set {
            rustix::fs::fchmod(&self.file, Mode::from_raw_mode(self.target.mode))
                .map_err(|e| reason(&e.into()))?;
        }
        rustix::fs::futimens(&self.file, &fsx::mtime_only(self.target.mtime))
            .map_err(|e| reason(&e.into()))
    }

    fn take_name(&mut self) -> Result<(), String> {
        let (dir, name) = (self.target.parent.as_fd(), self.target.name.as_slice());
        if self.naming == Naming::Unnamed {
            match fsx::name_unnamed_part(self.file.as_fd(), dir, name) {
                Ok(()) => return Ok(()),
                // Something took the name since the directory was made (a
                // transfer racing ours): replace it, as a named part would,
                // from a fresh name of its own.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    self.part = fsx::name_unnamed_part_anew(self.file.as_fd(), dir)
                        .map_err(|e| reason(&e))?;
                    self.naming = Naming::Fresh;
                }
                Err(e) => return Err(reason(&e)),
            }
        }
        fsx::rename_into_place(dir, &self.part, name).map_err(|e| reason(&e))
    }

    pub(super) fn size(&self) -> u64 {
        self.target.size
    }

    /// Where the committed file is: its directory and name.
    pub(super) fn placed(&self) -> (&OwnedFd, &[u8]) {
        (&self.target.parent, &self.target.name)
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        // Worth keeping only with a journal and something verified in it.
        let resumable = self.keep && self.journal.is_some() && self.holds_data;
        // An unnamed part file goes with its descriptor.
        if self.committed || resumable || self.naming == Naming::Unnamed {
            return;
        }
        // Removed while still locked, so no other transfer can take it
        // over in between, and only if the name still is this file.
        let dir = self.target.parent.as_fd();
        fsx::remove_if_named(dir, &self.part, self.file.as_fd());
        if self.journal.is_some() {
            let _ = journal::remove(dir, &self.journal_name);
        }
    }
}

/// Create a symlink atomically: under a fresh name of its own (see
/// `fsx::make_new`), then renamed.
pub(super) fn make_symlink(
    parent: &OwnedFd,
    name: &[u8],
    target: &[u8],
    mtime: Mtime,
    owner: Option<Owner>,
) -> io::Result<()> {
    if target.is_empty() || target.contains(&0) {
        return Err(io::Error::other("invalid symlink target"));
    }
    let (_, part) = fsx::make_new(|temp| rustix::fs::symlinkat(target, parent, temp))?;
    let placed = (|| -> io::Result<()> {
        if let Some(owner) = owner {
            let (uid, gid) = fsx::ids(owner);
            let nofollow = AtFlags::SYMLINK_NOFOLLOW;
            rustix::fs::chownat(parent, part.as_slice(), Some(uid), Some(gid), nofollow)?;
        }
        let mtime = fsx::mtime_only(mtime);
        rustix::fs::utimensat(parent, part.as_slice(), &mtime, AtFlags::SYMLINK_NOFOLLOW)?;
        fsx::rename_into_place(parent.as_fd(), &part, name)
    })();
    if placed.is_err() {
        let _ = fsx::remove_if_present(parent.as_fd(), &part);
    }
    placed
}

/// What kind of node to make.
pub(super) enum Node {
    Fifo,
    Device { block: bool, major: u32, minor: u32 },
}

/// Make a fifo or device node as `name` in `parent`, with its metadata.
pub(super) fn make_node(
    parent: &OwnedFd,
    name: &[u8],
    node: Node,
    mode: u32,
    mtime: Mtime,
    owner: Option<Owner>,
) -> io::Result<()> {
    let (file_type, device) = match node {
        Node::Fifo => (FileType::Fifo, 0),
        Node::Device {
            block,
            major,
            minor,
        } => {
            let file_type = if block {
                FileType::BlockDevice
            } else {
                FileType::CharacterDevice
            };
            (file_type, rustix::fs::makedev(major, minor))
        }
    };
    fsx::make_node(parent.as_fd(), name, file_type, device, mode, mtime, owner)
}

/// Link `name` in `dir` to the file `target_name` in `target_dir`.
pub(super) fn hard_link(
    target_dir: &OwnedFd,
    target_name: &[u8],
    dir: &OwnedFd,
    name: &[u8],
) -> io::Result<()> {
    fsx::hard_link(target_dir.as_fd(), target_name, dir.as_fd(), name)
}

/// Link the file `found` as (`name` in `dir`, of a `--link-dest` tree) to
/// `to_name` in `to_dir`: straight to the name when it is free, as it is in
/// a new snapshot; in place of what is there only if `replace` (an
/// append-only server never replaces).
pub(super) fn link_found(
    (dir, name): (&OwnedFd, &[u8]),
    found: &Found,
    (to_dir, to_name): (&OwnedFd, &[u8]),
    replace: bool,
) -> io::Result<()> {
    match fsx::link_new(dir.as_fd(), name, &found.stat, to_dir.as_fd(), to_name) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && replace => {
            fsx::hard_link(dir.as_fd(), name, to_dir.as_fd(), to_name)
        }
        linked => linked,
    }
}

/// What `name` in `parent` is, without following a symlink; `None` if
/// there is nothing (or it cannot be looked at).
pub(super) fn existing(parent: BorrowedFd<'_>, name: &[u8]) -> Option<Existing> {
    let stat = rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    let kind = match fsx::kind_of(&stat) {
        Kind::File => ExistingKind::File,
        Kind::Dir => ExistingKind::Dir,
        Kind::Symlink => {
            let target = rustix::fs::readlinkat(parent, name, Vec::new()).ok()?;
            ExistingKind::Symlink(target.into_bytes())
        }
        Kind::Node if FileType::from_raw_mode(stat.st_mode) == FileType::Fifo => ExistingKind::Fifo,
        Kind::Node => ExistingKind::Device,
        Kind::Special(_) => ExistingKind::Other,
    };
    Some(Existing {
        kind,
        size: stat.st_size as u64,
        mtime: fsx::mtime_of(&stat),
        mode: stat.st_mode & 0o7777,
        owner: fsx::owner_of(&stat),
        inode: (stat.st_dev, stat.st_ino),
    })
}

/// What the destination has at `path` (relative to the root of the
/// transfer; in the live tree, for an atomic publish), looked at below its
/// base without following symlinks.
pub(super) fn look(dest: &Destination, path: &WirePath) -> Option<Existing> {
    let root = match &dest.publish {
        Some(publish) => publish.live(),
        None => dest.prefix.clone(),
    };
    let mut components: Vec<&[u8]> = root.iter().map(Vec::as_slice).collect();
    components.extend(path.components());
    let (name, parents) = components.split_last()?;
    let parent = fsx::open_dir_beneath(dest.base.as_fd(), parents).ok()?;
    existing(parent.as_fd(), name)
}
