//! The producer: the thread that walks the tree, announces what it meets
//! and sends each file's data once the receiver has planned it, carrying
//! out what [`rules`](super::rules) decides.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, mpsc};
use std::time::Instant;

use ferry_proto::delta::{BasisIndex, DELTA_MIN_SIZE, Matches};
use ferry_proto::digest::DigestBuilder;
use ferry_proto::limits::DEFAULT_CHUNK_LEN;
use ferry_proto::message::{EntryKind, Message};
use ferry_proto::path::{WireBytes, WirePath, escape};
use rustix::fs::{FileType, Stat};

use super::Inbox;
use super::count::count_in_background;
use super::frames::{Chunks, KEEPALIVE_EVERY, Output, Source, Unsendable};
use super::rules::{Links, Next, PlanQueue, Planned, Stamp, Unanswered, counted};
use super::signatures::Signature;
use super::walk::{self, Lazy, Visitor};
use crate::delta::Precut;
use crate::error::{EngineError, reason};
use crate::events::{Event, EventSink, Origin, Tally, display_name};
use crate::filter::Filter;
use crate::fsx::{self, Root};

pub(super) struct Producer {
    out: Output,
    chunks: Chunks,
    /// What the receiver said, and the entries it has not answered.
    inbox: Arc<Inbox>,
    tally: Arc<Tally>,
    plans: PlanQueue<QueuedFile>,
    walk: WalkState,
    totals: Totals,
    /// How the root is named in events.
    label: String,
    /// Whether entries carry their owner.
    owners: bool,
    /// What is left out of the tree.
    filter: Filter,
    /// Announce each file with its digest (`--checksum`).
    checksum: bool,
}

/// What sending a file announced and waiting for its plan takes.
struct QueuedFile {
    display: String,
    file: File,
    /// What it looked like when it was announced.
    stamp: Stamp,
    /// It has fewer blocks than bytes: its holes are worth looking for.
    sparse: bool,
    /// Its cut into blocks, made while it waits for its plan.
    precut: Option<Precut>,
}

/// Where the walk is, and what it remembers of what it met.
#[derive(Default)]
struct WalkState {
    /// The last entry id given out.
    last_id: u64,
    /// The directories the walk is in, outermost first, and the same as
    /// shared by the files queued meanwhile.
    dirs_open: Vec<u64>,
    ancestors: Option<Arc<[u64]>>,
    links: Links,
}

impl WalkState {
    fn enter(&mut self, dir: u64) {
        self.dirs_open.push(dir);
        self.ancestors = None;
    }

    fn leave(&mut self) {
        self.dirs_open.pop();
        self.ancestors = None;
    }

    fn ancestors(&mut self) -> Arc<[u64]> {
        self.ancestors
            .get_or_insert_with(|| Arc::from(self.dirs_open.as_slice()))
            .clone()
    }
}

/// The progress totals: counted ahead on a thread of their own (until
/// they have been sent), or as the walk goes.
#[derive(Default)]
struct Totals {
    counting: Option<mpsc::Receiver<(u64, u64)>>,
    /// Files (and symlinks and nodes) and bytes met by the walk so far.
    walked: (u64, u64),
}

impl Producer {
    pub(super) fn new(
        out: Output,
        chunks: Chunks,
        inbox: Arc<Inbox>,
        tally: Arc<Tally>,
        label: String,
        owners: bool,
        filter: Filter,
    ) -> Self {
        Producer {
            out,
            chunks,
            inbox,
            tally,
            plans: PlanQueue::default(),
            walk: WalkState::default(),
            totals: Totals::default(),
            label,
            owners,
            filter,
            checksum: false,
        }
    }

    /// The same, announcing each file with its digest (`--checksum`).
    pub(super) fn checksumming(mut self, checksum: bool) -> Self {
        self.checksum = checksum;
        self
    }

    pub(super) fn run(mut self, root: Root, early_totals: bool) -> Result<(), EngineError> {
        if early_totals {
            self.totals.counting = Some(count_in_background(&root, &self.filter)?);
        }
        let path = WirePath::root();
        match root {
            Root::Dir(fd, stat) => self.dir(&path, &stat, Ok(fd))?,
            Root::File(file, stat) => self.file(&path, &stat, Lazy::Ready(file))?,
            Root::Symlink(target, stat) => self.symlink(&path, &stat, Lazy::Ready(target))?,
            Root::Node(stat) => self.node(&path, &stat)?,
            Root::Special(what) => self.special(&path, what)?,
        }
        self.send_planned(true)?;
        match self.totals.counting.take() {
            Some(counting) => {
                if let Ok((files, bytes)) = counting.recv() {
                    self.send_totals(files, bytes)?;
                }
            }
            None => self.send_totals(self.totals.walked.0, self.totals.walked.1)?,
        }
        self.out.send(&Message::End)?;
        self.out.flush()
    }

    /// Pass the totals on once the counting thread has them; any time
    /// before `end` will do for the receiver and the progress display.
    fn poll_totals(&mut self) -> Result<(), EngineError> {
        let counting = self.totals.counting.as_ref();
        if let Some((files, bytes)) = counting.and_then(|rx| rx.try_recv().ok()) {
            self.totals.counting = None;
            self.send_totals(files, bytes)?;
        }
        Ok(())
    }

    fn send_totals(&mut self, files: u64, bytes: u64) -> Result<(), EngineError> {
        self.tally.event(Event::Totals { files, bytes });
        self.out.send(&Message::Totals { files, bytes })
    }

    /// Announce an entry; returns its id. It is remembered until the
    /// receiver's verdict on it arrives.
    fn entry(
        &mut self,
        path: &WirePath,
        kind: EntryKind,
        stat: Option<&Stat>,
    ) -> Result<u64, EngineError> {
        self.entry_with(path, kind, stat, None)
    }

    /// [`Self::entry`], a file with its digest.
    fn entry_with(
        &mut self,
        path: &WirePath,
        kind: EntryKind,
        stat: Option<&Stat>,
        digest: Option<String>,
    ) -> Result<u64, EngineError> {
        self.poll_totals()?;
        self.send_planned(false)?;
        let unanswered = Unanswered::new(display_name(&self.label, path), &kind);
        self.wait_for_room(unanswered.is_dir())?;
        self.walk.last_id += 1;
        let id = self.walk.last_id;
        if let Some(bytes) = counted(&kind) {
            self.totals.walked.0 += 1;
            self.totals.walked.1 += bytes;
        }
        self.inbox.lock().announce(id, unanswered);
        let owner = stat.filter(|_| self.owners).map(fsx::owner_of);
        self.out.send(&Message::Entry {
            id,
            path: path.to_wire(),
            kind,
            owner,
            digest,
        })?;
        Ok(id)
    }

    /// Before one more entry, wait while the receiver leaves too many
    /// unanswered; send every file we may first, or it might wait for them.
    fn wait_for_room(&mut self, is_dir: bool) -> Result<(), EngineError> {
        if !self.inbox.lock().is_full(is_dir) {
            return Ok(());
        }
        self.send_planned(true)?;
        self.out.flush()?;
        let walking = self.walk.dirs_open.len();
        tracing::debug!(walking, "waiting for the receiver to answer entries");
        self.inbox.wait_until(|s| s.has_room(walking))
    }

    /// File `id` no longer waits for its plan.
    fn planned(&self, id: u64) {
        self.inbox.lock().planned(id);
    }

    /// Give up on file or directory `id`; `transient` when sending it
    /// again later may work (it changed while being read).
    fn abort(&mut self, id: u64, why: String, transient: bool) -> Result<(), EngineError> {
        // The receiver's outcome will repeat it: the failure is ours.
        self.inbox.lock().aborted(id, &why);
        self.out.send(&Message::Abort {
            id,
            reason: why,
            transient,
        })
    }

    /// Send the data of every queued file whose plan has come, and wait
    /// for plans when the rules say so (with `drain`, for all of them).
    fn send_planned(&mut self, drain: bool) -> Result<(), EngineError> {
        loop {
            let news = self.inbox.take_news(false)?;
            self.plans.absorb(news);
            match self.plans.next(drain)? {
                Next::Send(file) => {
                    self.planned(file.id);
                    self.send_file(file)?;
                }
                Next::Later => return Ok(()),
                Next::Wait => {
                    // The receiver plans what it has seen: show it our entries.
                    self.out.flush()?;
                    // Meanwhile, cut the next file as a signature of it
                    // would be matched: the receiver may be signing its
                    // version of it now.
                    let cut = self.precut_next();
                    let news = self.inbox.take_news(!cut)?;
                    self.plans.absorb(news);
                }
            }
        }
    }

    /// Send a planned file: the chunks the receiver does not hold, then
    /// the digest over all of them.
    fn send_file(&mut self, planned: Planned<QueuedFile>) -> Result<(), EngineError> {
        let Planned {
            id,
            size,
            held,
            signature,
            file: q,
        } = planned;
        self.tally.event(Event::FileStarted {
            path: q.display.clone(),
            size,
        });
        let held_bytes: u64 = held.iter().map(|&(_, len, n)| u64::from(len) * n).sum();
        if held_bytes > 0 {
            self.tally.event(Event::Resumed {
                path: q.display.clone(),
                bytes: held_bytes,
            });
        }
        let mut q = q;
        let matches = match signature {
            Some(sig) => match self.match_basis(&mut q, size, &sig) {
                Ok(matches) => Some(matches),
                Err((why, transient)) => return self.abort(id, why, transient),
            },
            None => None,
        };
        let mut digest = DigestBuilder::new(size);
        // A file of one chunk travels inline with the control messages;
        // the chunks of a larger one go to whichever connection is free,
        // once the entry is on its way (the receiver parks a chunk that
        // overtakes it).
        let src = Source {
            id,
            file: &q.file,
            size,
            sparse: q.sparse,
            spread: size > u64::from(DEFAULT_CHUNK_LEN),
            matches: matches.as_ref(),
        };
        if src.spread {
            self.out.flush()?;
        }
        let sent = self
            .chunks
            .send_file_data(&mut self.out, &src, &held, &mut digest)?;
        if let Err((why, transient)) = sent {
            return self.abort(id, why, transient);
        }
        // A file rewritten while we read it would arrive as a mix of old
        // and new bytes: refuse to let it be committed. Sending it again
        // later may catch it at rest.
        match rustix::fs::fstat(&q.file) {
            Ok(after) if q.stamp.unchanged_until(&stamp_of(&after)) => {}
            Ok(_) => {
                let why = "the file changed while it was being sent".to_string();
                return self.abort(id, why, true);
            }
            Err(e) => return self.abort(id, reason(&e.into()), false),
        }
        self.out.send(&Message::FileEnd {
            id,
            digest: digest.finish().to_hex(),
        })
    }

    /// Cut a step of the file whose plan is awaited, if it may be worth a
    /// delta (see [`Precut`]); whether there was any to cut.
    fn precut_next(&mut self) -> bool {
        match self.plans.front_mut() {
            Some((size, q)) if size >= DELTA_MIN_SIZE => q
                .precut
                .get_or_insert_with(|| Precut::new(size))
                .step(q.file.as_fd()),
            _ => false,
        }
    }

    /// Find the blocks of a file that the receiver's basis has (see
    /// [`ferry_proto::delta`]): from its cut made while waiting for the
    /// plan if that guessed right, else by reading it once more for them,
    /// with keepalives, as the receiver waits meanwhile.
    fn match_basis(
        &mut self,
        q: &mut QueuedFile,
        size: u64,
        sig: &Signature,
    ) -> Result<Matches, Unsendable> {
        let index = BasisIndex::new(sig.params, &sig.blocks);
        let (out, tally) = (&mut self.out, &self.tally);
        let mut last_sign = Instant::now();
        let mut alive = || {
            if last_sign.elapsed() >= KEEPALIVE_EVERY {
                last_sign = Instant::now();
                tally.working();
                // A failed send shows again at the next one, and ends the run.
                let _ = out.send(&Message::Keepalive).and_then(|()| out.flush());
            }
        };
        let fd = q.file.as_fd();
        let precut = q.precut.take();
        let matched = match precut.and_then(|p| p.finish(fd, &index, &mut alive)) {
            Some(matched) => matched,
            None => crate::delta::matches_of(fd, size, &index, &mut alive),
        };
        matched.map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                ("the file shrank while it was being sent".into(), true)
            }
            _ => (reason(&e), false),
        })
    }
}

/// What the walk meets is announced; a file's data follows once the
/// receiver has planned it.
impl Visitor for Producer {
    const OPENS_FILES: bool = true;
    type Path = WirePath;
    type Error = EngineError;

    fn child_path(&mut self, parent: &WirePath, name: &[u8]) -> Option<WirePath> {
        match parent.join(name) {
            Ok(path) => Some(path),
            Err(e) => {
                // Only a name too long for the wire gets here; say so and go on.
                self.tally.event(Event::FileFailed {
                    path: format!("{}/{}", display_name(&self.label, parent), escape(name)),
                    reason: e.to_string(),
                    origin: Origin::Here,
                    dir: false,
                });
                None
            }
        }
    }

    fn dir(
        &mut self,
        path: &WirePath,
        stat: &Stat,
        opened: io::Result<OwnedFd>,
    ) -> Result<(), EngineError> {
        if let Err(e) = &opened
            && e.kind() == io::ErrorKind::NotFound
        {
            return self.vanished(path);
        }
        let kind = EntryKind::Dir {
            mode: fsx::mode_of(stat),
            mtime: fsx::mtime_of(stat),
        };
        let id = self.entry(path, kind, Some(stat))?;
        if id == 1 {
            // The transfer's root goes out at once: if the receiver answers
            // `fresh`, the files below it go without waiting for plans, and
            // the walk need not fill a whole window of entries first.
            self.out.flush()?;
        }
        let listed = match opened {
            Ok(fd) => {
                self.walk.enter(id);
                let gitignore = walk::gitignore_of(&self.filter, &fd);
                self.filter.enter(path.as_bytes(), gitignore.as_deref());
                let listed = walk::children(self, &fd, path);
                self.filter.leave();
                self.walk.leave();
                listed?.map_err(|e| format!("cannot list directory: {}", reason(&e)))
            }
            Err(e) => Err(format!("cannot open directory: {}", reason(&e))),
        };
        if let Err(why) = listed {
            self.abort(id, why, false)?;
        }
        self.out.send(&Message::DirEnd { id })
    }

    fn file(
        &mut self,
        path: &WirePath,
        stat: &Stat,
        file: Lazy<'_, File>,
    ) -> Result<(), EngineError> {
        // Opened first, so that it is announced as the file that is read
        // (the name may lead to another file since the listing).
        let (opened, stat) = match file.open() {
            Ok((file, fresh)) => (Ok(file), fresh.unwrap_or(*stat)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.vanished(path),
            Err(e) => (Err(e), *stat),
        };
        // Another name of a file sent already goes as a link to it.
        let inode = (stat.st_nlink > 1).then_some((stat.st_dev, stat.st_ino));
        if let Some(link) = inode.and_then(|inode| self.walk.links.link_to(inode)) {
            return self.entry(path, link, None).map(drop);
        }
        let size = stat.st_size as u64;
        let kind = EntryKind::File {
            size,
            mode: fsx::mode_of(&stat),
            mtime: fsx::mtime_of(&stat),
        };
        // `--checksum`: read once to be judged by content (both sides hash
        // at once, each on its own thread), and again if it is sent.
        let digest = match (&opened, self.checksum) {
            (Ok(file), true) => fsx::file_digest(std::os::fd::AsFd::as_fd(file), size)
                .ok()
                .map(|d| d.to_hex()),
            _ => None,
        };
        let id = self.entry_with(path, kind, Some(&stat), digest)?;
        match opened {
            Ok(file) => {
                if let Some(inode) = inode {
                    self.walk.links.remember(inode, id, path.to_wire());
                }
                let queued = QueuedFile {
                    display: display_name(&self.label, path),
                    file,
                    stamp: stamp_of(&stat),
                    sparse: fsx::may_have_holes(&stat),
                    precut: None,
                };
                self.plans.push(id, size, self.walk.ancestors(), queued);
                Ok(())
            }
            Err(e) => {
                self.planned(id);
                self.abort(id, reason(&e), false)
            }
        }
    }

    fn symlink(
        &mut self,
        path: &WirePath,
        stat: &Stat,
        target: Lazy<'_, Vec<u8>>,
    ) -> Result<(), EngineError> {
        let target = match target.get() {
            Ok(target) => target,
            Err(e) => return self.unreadable(path, e),
        };
        let kind = EntryKind::Symlink {
            target: WireBytes(target),
            mtime: fsx::mtime_of(stat),
        };
        self.entry(path, kind, Some(stat)).map(drop)
    }

    /// Announced with what the receiver needs to make one like it.
    fn node(&mut self, path: &WirePath, stat: &Stat) -> Result<(), EngineError> {
        let mode = fsx::mode_of(stat);
        let mtime = fsx::mtime_of(stat);
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::Fifo => EntryKind::Fifo { mode, mtime },
            // `kind_of` calls nothing else a node: a device, then.
            t => EntryKind::Device {
                block: t == FileType::BlockDevice,
                major: rustix::fs::major(stat.st_rdev),
                minor: rustix::fs::minor(stat.st_rdev),
                mode,
                mtime,
            },
        };
        self.entry(path, kind, Some(stat)).map(drop)
    }

    /// Only announced, so that the receiver reports it skipped.
    fn special(&mut self, path: &WirePath, what: &'static str) -> Result<(), EngineError> {
        let kind = EntryKind::Special {
            what: what.to_string(),
        };
        self.entry(path, kind, None).map(drop)
    }

    fn excluded(&self, path: &WirePath, is_dir: bool) -> bool {
        self.filter.is_active() && self.filter.excludes(path.as_bytes(), is_dir)
    }

    fn unreadable(&mut self, path: &WirePath, e: io::Error) -> Result<(), EngineError> {
        if e.kind() == io::ErrorKind::NotFound {
            return self.vanished(path);
        }
        // Counted as the count ahead counts it: it settles, failed.
        self.totals.walked.0 += 1;
        self.tally.event(Event::FileFailed {
            path: display_name(&self.label, path),
            reason: reason(&e),
            origin: Origin::Here,
            dir: false,
        });
        Ok(())
    }

    /// Reported here and to the receiver: nothing is lost silently.
    fn vanished(&mut self, path: &WirePath) -> Result<(), EngineError> {
        self.tally.event(Event::Vanished {
            path: display_name(&self.label, path),
        });
        self.out.send(&Message::Vanished {
            path: path.to_wire(),
        })
    }
}

fn stamp_of(stat: &Stat) -> Stamp {
    Stamp {
        dev: stat.st_dev,
        ino: stat.st_ino,
        size: stat.st_size as u64,
        mtime: fsx::mtime_of(stat),
        ctime: (stat.st_ctime, stat.st_ctime_nsec as u32),
        nlink: stat.st_nlink,
    }
}
