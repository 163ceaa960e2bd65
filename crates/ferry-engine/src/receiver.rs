//! The receiving side of a transfer, the same for uploads and downloads.
//!
//! The async side reads frames and hands them, in order, to a worker
//! thread that owns all filesystem work: it validates every path, resolves
//! it below the destination without following symlinks, writes verified
//! chunks into a hidden `.NAME.ferry-part` sibling and renames it into place
//! only once the whole-file digest matches. Whatever ends the transfer, no
//! part file is left behind and no half file is ever visible.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferry_proto::digest::{ChunkLedger, FileDigest};
use ferry_proto::frame::Frame;
use ferry_proto::message::{EntryKind, Message, Mtime, Outcome};
use ferry_proto::path::{WireBytes, WirePath};
use rustix::fs::{AtFlags, Mode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::codec::ChunkDecoder;
use crate::conn::{FrameReader, FrameWriter};
use crate::error::{EngineError, reason};
use crate::events::{Event, EventSink, Tally};
use crate::fsx;
use crate::sender::{display_name, peer_text};

/// Files a sender may have open at once. One stream sends one file at a
/// time; the margin is for pipelining, the bound is against exhaustion.
const MAX_OPEN_FILES: usize = 64;
/// Frames the reader may queue ahead of the worker.
const FRAME_QUEUE: usize = 16;

/// Where a transfer lands: `prefix` (one or more components) below the
/// directory `base`. Entry paths from the sender are appended to `prefix`.
pub(crate) struct Destination {
    pub(crate) base: OwnedFd,
    pub(crate) prefix: Vec<Vec<u8>>,
    /// How the root is named in events and messages.
    pub(crate) label: String,
}

/// Run the receiving side over an established, accepted session.
pub(crate) async fn run_receiver<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    dest: Destination,
    tally: Arc<Tally>,
    cancel: &CancellationToken,
) -> Result<(), EngineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (frame_tx, frame_rx) = mpsc::channel::<Vec<Frame>>(FRAME_QUEUE);
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<Message>>(64);
    let (done_tx, done_rx) = oneshot::channel();
    let worker = Worker {
        dest,
        tally,
        replies: reply_tx,
        unsent: Vec::new(),
        decoder: ChunkDecoder::new()?,
        last_id: 0,
        files: HashMap::new(),
        dirs: HashMap::new(),
        answered: HashSet::new(),
        parent_cache: None,
    };
    std::thread::Builder::new()
        .name("ferry-receive".into())
        .spawn(move || {
            let _ = done_tx.send(worker.run(frame_rx));
        })
        .map_err(EngineError::from)?;

    // Frames go to the worker in batches: all that one read brought in.
    let read = async {
        let is_last = |f: &Frame| matches!(f, Frame::Control(Message::End | Message::Error { .. }));
        loop {
            let first = reader.next().await?.ok_or(EngineError::Closed)?;
            let mut end = is_last(&first);
            let mut batch = vec![first];
            while !end && let Some(frame) = reader.buffered()? {
                end = is_last(&frame);
                batch.push(frame);
            }
            if frame_tx.send(batch).await.is_err() || end {
                return Ok::<_, EngineError>(());
            }
        }
    };
    let write = async {
        while let Some(replies) = reply_rx.recv().await {
            for msg in &replies {
                writer.send(msg).await?;
            }
            if reply_rx.is_empty() {
                writer.flush().await?;
            }
        }
        writer.flush().await
    };
    let io_result = tokio::select! {
        r = async { tokio::try_join!(read, write) } => r.map(drop),
        _ = cancel.cancelled() => Err(EngineError::Cancelled),
    };
    drop(frame_tx);
    // The worker's verdict explains a failure better than the socket's
    // (it knows which path or chunk was bad); it also finishes its cleanup
    // before answering, so no part file outlives the session.
    let worker_result = done_rx.await.unwrap_or(Err(EngineError::Closed));
    match (worker_result, io_result) {
        (Ok(()), r) => r,
        (Err(_), Err(EngineError::Cancelled)) => Err(EngineError::Cancelled),
        (Err(e), _) => Err(e),
    }
}

/// A file being received.
struct OpenFile {
    display: String,
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    part: Vec<u8>,
    file: File,
    ledger: ChunkLedger,
    size: u64,
    mode: u32,
    mtime: Mtime,
    committed: bool,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fsx::remove_if_present(self.parent.as_fd(), &self.part);
        }
    }
}

/// A directory whose metadata waits for its `dir_end`.
struct OpenDir {
    display: String,
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    mode: u32,
    mtime: Mtime,
    /// Set when the sender could not read it whole.
    failure: Option<String>,
}

struct Worker {
    dest: Destination,
    tally: Arc<Tally>,
    replies: mpsc::Sender<Vec<Message>>,
    /// Replies not yet handed to the writer: they go in batches.
    unsent: Vec<Message>,
    decoder: ChunkDecoder,
    last_id: u64,
    files: HashMap<u64, OpenFile>,
    dirs: HashMap<u64, OpenDir>,
    /// Files that already got a `failed` verdict while the sender was still
    /// sending them: their remaining chunks and end are ignored.
    answered: HashSet<u64>,
    /// The most recently used parent directory, by path: consecutive files
    /// mostly share one.
    parent_cache: Option<(Vec<Vec<u8>>, Arc<OwnedFd>)>,
}

impl Worker {
    fn run(mut self, mut frames: mpsc::Receiver<Vec<Frame>>) -> Result<(), EngineError> {
        let result = self.receive(&mut frames);
        if let Err(e) = &result {
            // Tell the sender why, unless it is the one who ended it.
            if !matches!(
                e,
                EngineError::Remote { .. } | EngineError::Closed | EngineError::Cancelled
            ) {
                self.unsent.push(Message::error(e.code(), e.to_string()));
                let _ = self.flush_replies();
            }
        }
        // Dropping the open files removes their part files.
        self.files.clear();
        result
    }

    fn receive(&mut self, frames: &mut mpsc::Receiver<Vec<Frame>>) -> Result<(), EngineError> {
        loop {
            let batch = match frames.try_recv() {
                Ok(batch) => batch,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: this is the moment to send what we owe.
                    self.flush_replies()?;
                    frames.blocking_recv().ok_or(EngineError::Closed)?
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(EngineError::Closed),
            };
            for frame in batch {
                if self.frame(frame)? {
                    self.flush_replies()?;
                    return Ok(());
                }
            }
        }
    }

    /// Handle one frame; true once the transfer is over.
    fn frame(&mut self, frame: Frame) -> Result<bool, EngineError> {
        match frame {
            Frame::Data(chunk) => self.chunk(chunk)?,
            Frame::Control(Message::Entry { id, path, kind }) => self.entry(id, path, kind)?,
            Frame::Control(Message::FileEnd { id, digest }) => self.file_end(id, &digest)?,
            Frame::Control(Message::Abort { id, reason }) => self.abort(id, &reason)?,
            Frame::Control(Message::DirEnd { id }) => self.dir_end(id)?,
            Frame::Control(Message::Totals { files, bytes }) => {
                self.tally.event(Event::Totals { files, bytes })
            }
            Frame::Control(Message::End) => {
                if !self.files.is_empty() {
                    return Err(EngineError::Protocol(
                        "transfer ended with files still open".into(),
                    ));
                }
                self.reply(Message::Done)?;
                return Ok(true);
            }
            Frame::Control(Message::Error { code, message }) => {
                return Err(EngineError::Remote {
                    code,
                    message: peer_text(&message),
                });
            }
            Frame::Control(other) => {
                return Err(EngineError::Protocol(format!(
                    "unexpected message from the sender: {other:?}"
                )));
            }
        }
        Ok(false)
    }

    fn reply(&mut self, msg: Message) -> Result<(), EngineError> {
        self.unsent.push(msg);
        if self.unsent.len() >= 256 {
            self.flush_replies()?;
        }
        Ok(())
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
        self.tally.event(match &outcome {
            Outcome::Ok => Event::FileDone {
                path: display,
                size,
            },
            Outcome::Failed(why) => Event::FileFailed {
                path: display,
                reason: why.clone(),
            },
            Outcome::Skipped(why) => Event::Skipped {
                path: display,
                reason: why.clone(),
            },
        });
        self.reply(Message::Outcome { id, outcome })
    }

    /// Answer a directory entry: only failures are events.
    fn dir_verdict(
        &mut self,
        id: u64,
        display: String,
        failure: Option<String>,
    ) -> Result<(), EngineError> {
        match failure {
            None => self.reply(Message::Outcome {
                id,
                outcome: Outcome::Ok,
            }),
            Some(why) => self.verdict(id, display, Outcome::Failed(why), 0),
        }
    }

    /// The directory that holds `components` (all but the last), opened
    /// below the base without following symlinks.
    fn parent_of(&mut self, components: &[Vec<u8>]) -> std::io::Result<Arc<OwnedFd>> {
        let parents = &components[..components.len() - 1];
        if let Some((path, fd)) = &self.parent_cache
            && path == parents
        {
            return Ok(fd.clone());
        }
        let refs: Vec<&[u8]> = parents.iter().map(Vec::as_slice).collect();
        let fd = Arc::new(fsx::open_dir_beneath(self.dest.base.as_fd(), &refs)?);
        self.parent_cache = Some((parents.to_vec(), fd.clone()));
        Ok(fd)
    }

    fn entry(&mut self, id: u64, path: WireBytes, kind: EntryKind) -> Result<(), EngineError> {
        if id <= self.last_id {
            return Err(EngineError::Protocol(format!(
                "entry id {id} is not increasing"
            )));
        }
        self.last_id = id;
        let path = WirePath::parse(path.as_bytes())?;
        let display = display_name(&self.dest.label, &path);
        let mut components = self.dest.prefix.clone();
        components.extend(path.components().map(<[u8]>::to_vec));
        let parent = match self.parent_of(&components) {
            Ok(p) => p,
            Err(e) => {
                let why = format!("cannot open its directory: {}", reason(&e));
                return match kind {
                    EntryKind::Dir { .. } => {
                        self.answered.insert(id);
                        self.dir_verdict(id, display, Some(why))
                    }
                    EntryKind::File { .. } => {
                        self.answered.insert(id);
                        self.verdict(id, display, Outcome::Failed(why), 0)
                    }
                    _ => self.verdict(id, display, Outcome::Failed(why), 0),
                };
            }
        };
        let name = components.pop().unwrap_or_default();
        match kind {
            EntryKind::Dir { mode, mtime } => match fsx::ensure_dir(parent.as_fd(), &name, 0o700) {
                Ok(dir) => {
                    // We must be able to write into it until its dir_end,
                    // whatever mode it has now or will have.
                    if let Ok(st) = rustix::fs::fstat(&dir)
                        && st.st_mode & 0o700 != 0o700
                    {
                        let _ = rustix::fs::fchmod(
                            &dir,
                            Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700),
                        );
                    }
                    self.dirs.insert(
                        id,
                        OpenDir {
                            display,
                            parent,
                            name,
                            mode,
                            mtime,
                            failure: None,
                        },
                    );
                    Ok(())
                }
                Err(e) => {
                    self.answered.insert(id);
                    self.dir_verdict(id, display, Some(reason(&e)))
                }
            },
            EntryKind::File { size, mode, mtime } => {
                if self.files.len() >= MAX_OPEN_FILES {
                    return Err(EngineError::Protocol("too many files open at once".into()));
                }
                let part = fsx::part_name(&name);
                let created = fsx::create_part(parent.as_fd(), &part);
                match created {
                    Ok(fd) => {
                        self.tally.event(Event::FileStarted {
                            path: display.clone(),
                            size,
                        });
                        let file = OpenFile {
                            display,
                            parent,
                            name,
                            part,
                            file: File::from(fd),
                            ledger: ChunkLedger::new(size),
                            size,
                            mode,
                            mtime,
                            committed: false,
                        };
                        self.files.insert(id, file);
                        Ok(())
                    }
                    Err(e) => {
                        self.answered.insert(id);
                        self.verdict(id, display, Outcome::Failed(reason(&e)), 0)
                    }
                }
            }
            EntryKind::Symlink { target, mtime } => {
                let outcome = match make_symlink(&parent, &name, target.as_bytes(), mtime) {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Failed(reason(&e)),
                };
                self.verdict(id, display, outcome, 0)
            }
            EntryKind::Special { what } => {
                let why = format!("special file ({}), not transferred", peer_text(&what));
                self.verdict(id, display, Outcome::Skipped(why), 0)
            }
        }
    }

    /// Fail a file that is still being sent: discard it, answer now, and
    /// ignore what the sender still sends of it.
    fn fail_open_file(&mut self, id: u64, why: String) -> Result<(), EngineError> {
        if let Some(f) = self.files.remove(&id) {
            self.answered.insert(id);
            self.verdict(id, f.display.clone(), Outcome::Failed(why), 0)?;
        }
        Ok(())
    }

    fn chunk(&mut self, chunk: ferry_proto::chunk::DataChunk) -> Result<(), EngineError> {
        let h = chunk.header;
        let Some(f) = self.files.get_mut(&h.file_id) else {
            if self.answered.contains(&h.file_id) {
                return Ok(());
            }
            return Err(EngineError::Protocol(format!(
                "data for entry {} which is not an open file",
                h.file_id
            )));
        };
        if let Err(e) = f.ledger.check(h.offset, h.raw_len) {
            return self.fail_open_file(h.file_id, e.to_string());
        }
        let written = match self.decoder.decode(&chunk) {
            Ok(raw) => f.file.write_all_at(raw, h.offset).map_err(|e| reason(&e)),
            Err(fault) => Err(fault.to_string()),
        };
        if let Err(why) = written {
            return self.fail_open_file(h.file_id, why);
        }
        if let Err(e) = f.ledger.record(h.offset, h.raw_len, h.hash) {
            return self.fail_open_file(h.file_id, e.to_string());
        }
        self.tally.event(Event::Bytes {
            n: u64::from(h.raw_len),
        });
        Ok(())
    }

    fn file_end(&mut self, id: u64, digest: &str) -> Result<(), EngineError> {
        if self.answered.remove(&id) {
            return Ok(());
        }
        let Some(mut f) = self.files.remove(&id) else {
            return Err(EngineError::Protocol(format!(
                "end of entry {id} which is not an open file"
            )));
        };
        let Some(digest) = FileDigest::from_hex(digest) else {
            return Err(EngineError::Protocol(format!(
                "malformed digest for entry {id}"
            )));
        };
        let outcome = match f
            .ledger
            .finish(digest)
            .map_err(|e| e.to_string())
            .and_then(|()| commit(&f))
        {
            Ok(()) => {
                f.committed = true;
                Outcome::Ok
            }
            Err(why) => Outcome::Failed(why),
        };
        self.verdict(id, f.display.clone(), outcome, f.size)
    }

    fn abort(&mut self, id: u64, why: &str) -> Result<(), EngineError> {
        if self.answered.remove(&id) {
            return Ok(());
        }
        let why = peer_text(why);
        if let Some(f) = self.files.remove(&id) {
            return self.verdict(id, f.display.clone(), Outcome::Failed(why), 0);
        }
        if let Some(d) = self.dirs.get_mut(&id) {
            d.failure = Some(why);
            return Ok(());
        }
        Err(EngineError::Protocol(format!(
            "abort of entry {id} which is not open"
        )))
    }

    fn dir_end(&mut self, id: u64) -> Result<(), EngineError> {
        if self.answered.remove(&id) {
            return Ok(());
        }
        let Some(d) = self.dirs.remove(&id) else {
            return Err(EngineError::Protocol(format!(
                "end of entry {id} which is not an open directory"
            )));
        };
        let applied = fsx::open_dir_beneath(d.parent.as_fd(), &[&d.name]).and_then(|dir| {
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(d.mode & 0o1777))?;
            rustix::fs::futimens(&dir, &fsx::mtime_only(d.mtime))?;
            Ok(())
        });
        let failure = match applied {
            Err(e) => Some(format!("cannot set directory metadata: {}", reason(&e))),
            Ok(()) => d.failure,
        };
        self.dir_verdict(id, d.display, failure)
    }
}

/// Make a verified part file the real one: metadata first, then the
/// atomic rename, so the name only ever shows the complete file.
fn commit(f: &OpenFile) -> Result<(), String> {
    // Never setuid/setgid from a peer: the receiver may run as root.
    rustix::fs::fchmod(&f.file, Mode::from_raw_mode(f.mode & 0o777))
        .map_err(|e| reason(&e.into()))?;
    rustix::fs::futimens(&f.file, &fsx::mtime_only(f.mtime)).map_err(|e| reason(&e.into()))?;
    match rustix::fs::renameat(
        f.parent.as_fd(),
        f.part.as_slice(),
        f.parent.as_fd(),
        f.name.as_slice(),
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::ISDIR)
        | Err(rustix::io::Errno::NOTEMPTY)
        | Err(rustix::io::Errno::EXIST) => Err("a directory is in the way".into()),
        Err(e) => Err(reason(&e.into())),
    }
}

/// Create a symlink atomically: under the part name, then renamed.
fn make_symlink(parent: &OwnedFd, name: &[u8], target: &[u8], mtime: Mtime) -> std::io::Result<()> {
    if target.is_empty() || target.contains(&0) {
        return Err(std::io::Error::other("invalid symlink target"));
    }
    let part = fsx::part_name(name);
    fsx::remove_if_present(parent.as_fd(), &part)?;
    rustix::fs::symlinkat(target, parent, part.as_slice())?;
    let placed = rustix::fs::utimensat(
        parent,
        part.as_slice(),
        &fsx::mtime_only(mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .and_then(|()| rustix::fs::renameat(parent, part.as_slice(), parent, name));
    match placed {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fsx::remove_if_present(parent.as_fd(), &part);
            match e {
                rustix::io::Errno::ISDIR
                | rustix::io::Errno::NOTEMPTY
                | rustix::io::Errno::EXIST => {
                    Err(std::io::Error::other("a directory is in the way"))
                }
                e => Err(e.into()),
            }
        }
    }
}
