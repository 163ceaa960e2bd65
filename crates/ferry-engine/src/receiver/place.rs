//! What the receiver does to the file system, as the rules decided it.
//!
//! Everything here works below directory handles, never following a
//! symlink (see `fsx`): directories are made or checked, files arrive in a
//! hidden `.NAME.ferry-part` sibling (or an unnamed file, see
//! [`fsx::open_unnamed_part`]) locked for as long as it is open, and take
//! their name by an atomic rename (or link) only once verified, with their
//! metadata already set. No half file is ever visible.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ferry_proto::message::{Mtime, Owner};
use rustix::fs::{AtFlags, FileType, Mode};

use super::rules::{MetadataFix, PartPlan};
use crate::codec::Decoded;
use crate::error::reason;
use crate::fsx;
use crate::journal::{self, ChunkRecord, Journal, SourceStamp};

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
}

/// The regular file `name` in `parent`, if it has this size and mtime.
pub(super) fn find_unchanged(
    parent: &OwnedFd,
    name: &[u8],
    size: u64,
    mtime: Mtime,
) -> Option<Found> {
    let stat = fsx::unchanged(parent.as_fd(), name, size, mtime)?;
    Some(Found {
        mode: fsx::mode_of(&stat),
        owner: fsx::owner_of(&stat),
    })
}

/// Give an unchanged file the sender's mode and owner: opened without
/// following a symlink swapped in since the check. Best effort: the
/// content is right.
pub(super) fn fix_metadata(parent: &OwnedFd, name: &[u8], fix: &MetadataFix) {
    if let Ok((file, _)) = fsx::open_regular(parent.as_fd(), name) {
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

/// The part file of a file being received, locked for as long as it is
/// open (unless unnamed: no one else can find it). Dropped uncommitted, it
/// is removed, unless it stays for a resume.
pub(super) struct Part {
    target: Target,
    /// Its hidden name (empty while unnamed).
    part: Vec<u8>,
    unnamed: bool,
    file: File,
    /// The record of verified chunks, for a resume (large files only).
    journal: Option<Journal>,
    journal_name: Vec<u8>,
    /// Whether an unfinished part file (with its journal) stays for the
    /// next attempt; false once its content is known to be wrong.
    pub(super) keep: bool,
    /// Some verified chunk is in it: worth keeping for a resume.
    holds_data: bool,
    /// Whether the part file was created with the final mode already.
    mode_set: bool,
    /// The owner to give it before it takes its name, if any.
    chown: Option<Owner>,
    /// Made for this attempt: every byte not written reads as zero.
    blank: bool,
    /// Some chunks were holes, left unwritten: the length is set before
    /// the commit.
    holes: bool,
    committed: bool,
}

impl Part {
    /// Open the part file for `target` as `plan` says; `owner` is the
    /// owner wanted, `made_with` the one a file new in its directory gets.
    pub(super) fn open(target: Target, plan: PartPlan) -> io::Result<(Part, bool)> {
        let unnamed = plan
            .unnamed
            .then(|| fsx::open_unnamed_part(target.parent.as_fd(), target.mode))
            .flatten();
        let is_unnamed = unnamed.is_some();
        let part = if is_unnamed {
            Vec::new()
        } else {
            fsx::part_name(&target.name)
        };
        let opened = match unnamed {
            Some(part_file) => part_file,
            None => fsx::open_part(target.parent.as_fd(), &part, target.mode)?,
        };
        let journal_name = if plan.journaled {
            journal::journal_name(&target.name)
        } else {
            Vec::new()
        };
        let existing = opened.existing;
        let part = Part {
            target,
            part,
            unnamed: is_unnamed,
            file: File::from(opened.fd),
            journal: None,
            journal_name,
            keep: true,
            holds_data: false,
            mode_set: opened.mode_set,
            chown: None,
            blank: !existing,
            holes: false,
            committed: false,
        };
        Ok((part, existing))
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
        if let Some(j) = self.journal.as_mut()
            && let Err(e) = j.record(record)
        {
            tracing::debug!("journal write failed, no resume for this file: {e}");
            self.journal = None;
            let _ = journal::remove(self.target.parent.as_fd(), &self.journal_name);
        }
    }

    /// Make the verified part file the real one: metadata first, then the
    /// atomic rename (or, for an unnamed part file, the link), so the name
    /// only ever shows the complete file. The journal goes with it.
    pub(super) fn commit(&mut self) -> Result<(), String> {
        let placed = self.set_metadata().and_then(|()| self.take_name());
        match placed {
            Ok(()) => {
                self.committed = true;
                if self.journal.take().is_some() {
                    let _ = journal::remove(self.target.parent.as_fd(), &self.journal_name);
                }
                Ok(())
            }
            Err(why) => {
                self.keep = false;
                Err(why)
            }
        }
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
        if self.unnamed {
            match fsx::name_unnamed_part(self.file.as_fd(), dir, name) {
                Ok(()) => return Ok(()),
                // Something took the name since the directory was made (a
                // transfer racing ours): replace it, as a named part would.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    self.part = fsx::part_name(name);
                    fsx::name_unnamed_part(self.file.as_fd(), dir, &self.part)
                        .map_err(|e| reason(&e))?;
                    self.unnamed = false;
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
        if self.committed || resumable || self.unnamed {
            return;
        }
        // Removed while still locked, so no other transfer can take it
        // over in between.
        let dir = self.target.parent.as_fd();
        let _ = fsx::remove_if_present(dir, &self.part);
        if self.journal.is_some() {
            let _ = journal::remove(dir, &self.journal_name);
        }
    }
}

/// Create a symlink atomically: under the part name, then renamed.
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
    let part = fsx::part_name(name);
    fsx::remove_if_present(parent.as_fd(), &part)?;
    rustix::fs::symlinkat(target, parent, part.as_slice())?;
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
