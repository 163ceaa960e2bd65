//! The receiving side of a transfer, the same for uploads and downloads.
//!
//! The async side reads frames from every connection of the session and
//! hands them to a worker thread that owns all filesystem work: it
//! validates every path, resolves it below the destination without
//! following symlinks, writes verified chunks into a hidden
//! `.NAME.ferry-part` sibling and renames it into place only once the
//! whole-file digest matches. No half file is ever visible. (A small file
//! in a directory this transfer made is written to an unnamed file
//! instead, linked into place once it verifies: see
//! [`fsx::open_unnamed_part`].)
//!
//! Before any data of a file is sent, the receiver plans it: a regular
//! file of the same size and mtime is left alone (`unchanged`); a part
//! file left by an interrupted transfer, with a journal of verified chunks
//! (files of `JOURNAL_MIN_SIZE` or more), is resumed: the sender learns
//! which chunks are held (`have`) and sends only the rest. Everything else
//! is sent whole (`planned`). When a transfer breaks off, journaled part
//! files stay for the next attempt; other part files are removed.
//!
//! With several connections, frames of one file arrive in no fixed order:
//! a chunk may overtake its `entry` (it is parked, within a bound), a
//! `file_end` may overtake the last chunks (the file is committed when they
//! arrive), and a `dir_end` may come while files below are still open (the
//! directory's metadata waits until every child is settled).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferry_proto::digest::{ChunkLedger, FileDigest, MAX_CHUNKS_AHEAD};
use ferry_proto::frame::Frame;
use ferry_proto::limits::{MAX_FILES_AHEAD, MAX_HAVE_RUNS, MAX_WAITING_LINKS};
use ferry_proto::message::{EntryKind, Message, Mtime, Outcome, Owner};
use ferry_proto::path::{WireBytes, WirePath};
use rustix::fs::{AtFlags, Mode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::codec::{ChunkDecoder, Decoded, ReadChunk};
use crate::conn::{DataConn, FrameReader, FrameWriter, for_each_data_conn};
use crate::error::{EngineError, reason};
use crate::events::{Event, EventSink, Tally, display_name, peer_text};
use crate::fsx;
use crate::journal::{self, ChunkRecord, Journal, SourceStamp};

/// Files that may be open at once: those the sender may announce ahead of
/// their data, and as many again whose last chunks are still on their way;
/// the bound is against a peer exhausting file descriptors.
const MAX_OPEN_FILES: usize = 2 * MAX_FILES_AHEAD as usize;
/// When this many chunks wait for their entries (the control connection
/// lags behind the data connections), the data connections stop being read
/// until the control connection has caught up: TCP flow control then holds
/// the sender back.
const PARKED_PAUSE: usize = 32;
/// More than this can only come from a peer that ignores flow control: the
/// bound keeps it from parking memory.
const MAX_PARKED_CHUNKS: usize = 128;

/// Lets the worker hold the data connections' readers back.
#[derive(Default)]
struct DataGate {
    paused: AtomicBool,
    reopened: tokio::sync::Notify,
}

impl DataGate {
    fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    fn reopen(&self) {
        if self.paused.swap(false, Ordering::AcqRel) {
            self.reopened.notify_waiters();
        }
    }

    async fn wait_open(&self) {
        loop {
            // Registered before the check, so a reopening in between is not missed.
            let reopened = self.reopened.notified();
            tokio::pin!(reopened);
            reopened.as_mut().enable();
            if !self.paused.load(Ordering::Acquire) {
                return;
            }
            reopened.await;
        }
    }
}
/// Files at least this large keep a journal of their verified chunks, so
/// that an interrupted transfer resumes where it stopped. Smaller ones are
/// sent again whole: a few chunks are not worth the bookkeeping.
pub(crate) const JOURNAL_MIN_SIZE: u64 = 4 * 1024 * 1024;
/// During a long local job (checking a big journal against its part
/// file) the worker tells the sender it is alive this often, so that the
/// sender's stall timeout does not fire.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// Batches of frames the readers may queue ahead of the worker.
const FRAME_QUEUE: usize = 16;

/// Where a transfer lands: `prefix` (one or more components) below the
/// directory `base`. Entry paths from the sender are appended to `prefix`.
pub(crate) struct Destination {
    pub(crate) base: OwnedFd,
    pub(crate) prefix: Vec<Vec<u8>>,
    /// How the root is named in events and messages.
    pub(crate) label: String,
    /// Receive every file, even one already here with the same size and
    /// mtime.
    pub(crate) ignore_times: bool,
    /// Apply the owners that entries carry (this process is root).
    pub(crate) owners: bool,
    /// Make the device nodes that entries describe (this process is root
    /// and the user allowed it).
    pub(crate) devices: bool,
}

/// Run the receiving side over an established, accepted session. Data
/// connections that arrive on `joins` are read alongside the control one.
pub(crate) async fn run_receiver<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    dest: Destination,
    tally: Arc<Tally>,
    cancel: &CancellationToken,
    mut joins: mpsc::Receiver<DataConn>,
) -> Result<(), EngineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (frame_tx, frame_rx) = mpsc::channel::<Vec<Inbound>>(FRAME_QUEUE);
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<Message>>(64);
    let (done_tx, done_rx) = oneshot::channel();
    let gate = Arc::new(DataGate::default());
    let worker = Worker {
        gate: gate.clone(),
        dest,
        tally,
        replies: reply_tx,
        unsent: Vec::new(),
        decoder: ChunkDecoder::new()?,
        last_id: 0,
        files: HashMap::new(),
        dirs: HashMap::new(),
        dir_ids: HashMap::new(),
        parked: HashMap::new(),
        parked_chunks: 0,
        waiting_links: HashMap::new(),
        links_waiting: 0,
        end_seen: false,
        parent_cache: None,
        plan_through: 0,
        plan_sent: 0,
    };
    std::thread::Builder::new()
        .name("ferry-receive".into())
        .spawn(move || {
            let _ = done_tx.send(worker.run(frame_rx));
        })
        .map_err(EngineError::from)?;

    // Control frames go to the worker in batches: all that one read brought.
    // The control connection also carries data chunks, even after `end`,
    // so it is read until the worker is done (or the sender goes away).
    // `move`: the block must own its sender, so that the worker sees its
    // input close once the block is dropped.
    let control_tx = frame_tx.clone();
    let read_control = async move {
        loop {
            let first = reader.next().await?.ok_or(EngineError::Closed)?;
            let mut batch = vec![Inbound::from(first)];
            while let Some(frame) = reader.buffered()? {
                batch.push(Inbound::from(frame));
            }
            if control_tx.send(batch).await.is_err() {
                return std::future::pending::<Result<(), EngineError>>().await;
            }
        }
    };
    let read_data = for_each_data_conn(&mut joins, |conn| {
        read_data_conn(conn, frame_tx.clone(), gate.clone())
    });
    // Replies end when the worker is done: that ends the transfer.
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
        r = write => r,
        r = read_control => r,
        e = read_data => Err(e),
        _ = cancel.cancelled() => Err(EngineError::Cancelled),
    };
    drop(frame_tx);
    // A worker blocked on a full reply queue must see it close, or it
    // would never finish.
    drop(reply_rx);
    // The worker's verdict explains a failure better than the socket's
    // (it knows which path or chunk was bad); it also finishes its cleanup
    // before answering, so no part file outlives the session.
    let worker_result = done_rx.await.unwrap_or(Err(EngineError::Closed));
    match (worker_result, io_result) {
        // Everything is settled here; whatever the sockets did after, the
        // sender learns the outcome from the replies it received.
        (Ok(()), _) => Ok(()),
        (Err(_), Err(EngineError::Cancelled)) => Err(EngineError::Cancelled),
        (Err(e), _) => Err(e),
    }
}

/// A frame as the connections' readers pass it to the worker.
enum Inbound {
    Control(Message),
    Data(ReadChunk),
}

impl From<Frame> for Inbound {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Control(msg) => Inbound::Control(msg),
            Frame::Data(chunk) => Inbound::Data(ReadChunk::check(chunk)),
        }
    }
}

/// Read a data connection until the sender ends it, passing its chunks on.
async fn read_data_conn(
    mut conn: DataConn,
    frames: mpsc::Sender<Vec<Inbound>>,
    gate: Arc<DataGate>,
) -> Result<(), EngineError> {
    let data_only = |frame: Frame| match frame {
        Frame::Data(chunk) => Ok(Inbound::Data(ReadChunk::check(chunk))),
        Frame::Control(_) => Err(EngineError::Protocol(
            "a control message arrived on a data connection".into(),
        )),
    };
    loop {
        gate.wait_open().await;
        let Some(first) = conn.reader.next().await? else {
            return Ok(());
        };
        let mut batch = vec![data_only(first)?];
        while let Some(frame) = conn.reader.buffered()? {
            batch.push(data_only(frame)?);
        }
        if frames.send(batch).await.is_err() {
            return Ok(());
        }
    }
}

/// A file being received.
struct OpenFile {
    display: String,
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    part: Vec<u8>,
    /// The part file has no name (yet): see [`fsx::open_unnamed_part`].
    unnamed: bool,
    /// The part file, locked for as long as it is open (unless unnamed:
    /// no one else can find it).
    file: File,
    /// The record of verified chunks, for a resume (large files only).
    journal: Option<Journal>,
    journal_name: Vec<u8>,
    /// Whether an unfinished part file (with its journal) stays for the
    /// next attempt; false once its content is known to be wrong.
    keep: bool,
    ledger: ChunkLedger,
    size: u64,
    mode: u32,
    /// Whether the part file was created with `mode` already.
    mode_set: bool,
    mtime: Mtime,
    /// The owner to give it before it takes its name, if it has not that
    /// one already.
    chown: Option<Owner>,
    /// The part file was made for this attempt: every byte not written
    /// reads as zero.
    blank: bool,
    /// Some chunks were holes, left unwritten: the length is set before
    /// the commit.
    holes: bool,
    /// The sender's digest, once its `file_end` has arrived.
    expected: Option<FileDigest>,
    /// Bytes of chunks that arrived corrupt, and why the first one was:
    /// the rest of the file is still taken in, so that sending it again
    /// costs only the damaged chunks.
    damaged: u64,
    damage: Option<String>,
    /// The directory of this transfer that holds it, if any.
    parent_dir: Option<u64>,
    committed: bool,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        // Worth keeping only with a journal and something verified in it.
        let resumable = self.keep && self.journal.is_some() && self.ledger.received() > 0;
        // An unnamed part file goes with its descriptor.
        if self.committed || resumable || self.unnamed {
            return;
        }
        // Removed while still locked, so no other transfer can take it
        // over in between.
        let _ = fsx::remove_if_present(self.parent.as_fd(), &self.part);
        if self.journal.is_some() {
            let _ = journal::remove(self.parent.as_fd(), &self.journal_name);
        }
    }
}

/// A directory whose metadata waits for its `dir_end` and its children.
struct OpenDir {
    display: String,
    wire_path: Vec<u8>,
    /// The directory itself, open from its creation (or check) until its
    /// metadata is applied: the parent of everything below it, with no
    /// path to resolve again for each.
    fd: Arc<OwnedFd>,
    mode: u32,
    mtime: Mtime,
    /// The owner to give it, if owners are applied.
    owner: Option<Owner>,
    /// The owner of a file this process creates in it (known when owners
    /// are applied).
    new_files_owner: Option<Owner>,
    /// Set when the sender could not read it whole.
    failure: Option<String>,
    parent_dir: Option<u64>,
    /// Files and directories below it not yet settled.
    children: u32,
    ended: bool,
    /// Created by this transfer, or below one that was: nothing in it
    /// can be unchanged or held already, and every file is planned whole.
    fresh: bool,
}

/// A `hardlink` entry whose file is still arriving: it gets its name once
/// the file has its own.
struct WaitingLink {
    id: u64,
    display: String,
    parent: Arc<OwnedFd>,
    name: Vec<u8>,
    parent_dir: Option<u64>,
}

struct Worker {
    gate: Arc<DataGate>,
    dest: Destination,
    tally: Arc<Tally>,
    replies: mpsc::Sender<Vec<Message>>,
    /// Replies not yet handed to the writer: they go in batches.
    unsent: Vec<Message>,
    decoder: ChunkDecoder,
    last_id: u64,
    files: HashMap<u64, OpenFile>,
    dirs: HashMap<u64, OpenDir>,
    /// Open directories by wire path, to find an entry's parent.
    dir_ids: HashMap<Vec<u8>, u64>,
    /// Chunks that arrived before their entry, by entry id.
    parked: HashMap<u64, Vec<ReadChunk>>,
    parked_chunks: usize,
    /// Hard links to files still arriving, by the id of that file.
    waiting_links: HashMap<u64, Vec<WaitingLink>>,
    links_waiting: usize,
    end_seen: bool,
    /// The most recently used parent directory, by path: consecutive files
    /// mostly share one.
    parent_cache: Option<(Vec<Vec<u8>>, Arc<OwnedFd>)>,
    /// The last file entry planned, and the last `planned` sent: the
    /// sender sends a file's data only once it is covered.
    plan_through: u64,
    plan_sent: u64,
}

impl Worker {
    fn run(mut self, mut frames: mpsc::Receiver<Vec<Inbound>>) -> Result<(), EngineError> {
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

    fn receive(&mut self, frames: &mut mpsc::Receiver<Vec<Inbound>>) -> Result<(), EngineError> {
        loop {
            let batch = match frames.try_recv() {
                Ok(batch) => batch,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Idle: this is the moment to send what we owe. The
                    // sender may be waiting for a plan, so every one goes.
                    self.send_plan(true)?;
                    self.flush_replies()?;
                    frames.blocking_recv().ok_or(EngineError::Closed)?
                }
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(EngineError::Closed),
            };
            for frame in batch {
                self.frame(frame)?;
            }
            self.send_plan(false)?;
            if self.end_seen
                && self.files.is_empty()
                && self.dirs.is_empty()
                && self.waiting_links.is_empty()
            {
                if self.parked_chunks > 0 {
                    return Err(EngineError::Protocol(
                        "chunks arrived for entries that were never announced".into(),
                    ));
                }
                self.reply(Message::Done)?;
                return self.flush_replies();
            }
        }
    }

    /// Handle one frame.
    fn frame(&mut self, frame: Inbound) -> Result<(), EngineError> {
        match frame {
            Inbound::Data(chunk) => self.chunk(chunk),
            Inbound::Control(Message::Entry {
                id,
                path,
                kind,
                owner,
            }) => self.entry(id, path, kind, owner),
            Inbound::Control(Message::FileEnd { id, digest }) => self.file_end(id, &digest),
            Inbound::Control(Message::Abort {
                id,
                reason,
                transient,
            }) => self.abort(id, &reason, transient),
            Inbound::Control(Message::Keepalive) => Ok(()),
            Inbound::Control(Message::DirEnd { id }) => self.dir_end(id),
            Inbound::Control(Message::Totals { files, bytes }) => {
                self.tally.event(Event::Totals { files, bytes });
                Ok(())
            }
            Inbound::Control(Message::End) => {
                self.end_seen = true;
                Ok(())
            }
            Inbound::Control(Message::Error { code, message }) => Err(EngineError::Remote {
                code,
                message: peer_text(&message),
            }),
            Inbound::Control(other) => Err(EngineError::Protocol(format!(
                "unexpected message from the sender: {other:?}"
            ))),
        }
    }

    fn reply(&mut self, msg: Message) -> Result<(), EngineError> {
        self.unsent.push(msg);
        if self.unsent.len() >= 256 {
            self.flush_replies()?;
        }
        Ok(())
    }

    /// Tell the sender which files it may send: at once with `now` (when
    /// idle), otherwise once a quarter of its window is planned, so that a
    /// busy receiver does not answer every small batch of entries.
    fn send_plan(&mut self, now: bool) -> Result<(), EngineError> {
        let new = self.plan_through - self.plan_sent;
        if new == 0 || (!now && new < MAX_FILES_AHEAD / 4) {
            return Ok(());
        }
        self.plan_sent = self.plan_through;
        self.reply(Message::Planned {
            through: self.plan_through,
        })?;
        self.flush_replies()
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
            Outcome::Unchanged => Event::Unchanged {
                path: display,
                size,
            },
            Outcome::Incomplete(why) => Event::FileIncomplete {
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

    /// The open directory of this transfer that holds `path`, if any.
    fn parent_dir_of(&self, path: &WirePath) -> Option<u64> {
        if path.is_root() {
            return None;
        }
        let bytes = path.as_bytes();
        let parent = bytes
            .iter()
            .rposition(|&b| b == b'/')
            .map_or(&b""[..], |i| &bytes[..i]);
        self.dir_ids.get(parent).copied()
    }

    fn entry(
        &mut self,
        id: u64,
        path: WireBytes,
        kind: EntryKind,
        owner: Option<Owner>,
    ) -> Result<(), EngineError> {
        if id <= self.last_id {
            return Err(EngineError::Protocol(format!(
                "entry id {id} is not increasing"
            )));
        }
        self.last_id = id;
        if let Some(o) = owner.filter(|o| !o.is_valid()) {
            return Err(EngineError::Protocol(format!(
                "entry {id} has an invalid owner {}:{}",
                o.uid, o.gid
            )));
        }
        // Owners are applied only by a root receiver (the only one that can).
        let owner = owner.filter(|_| self.dest.owners);
        let path = WirePath::from_wire(path)?;
        let display = display_name(&self.dest.label, &path);
        let parent_dir = self.parent_dir_of(&path);
        // A directory of this transfer is open already; any other parent
        // is opened beneath the destination (or found in the cache).
        let open_parent = parent_dir
            .and_then(|d| self.dirs.get(&d))
            .map(|d| d.fd.clone());
        let parent = match open_parent {
            Some(fd) => Ok(fd),
            None => {
                let mut components = self.dest.prefix.clone();
                components.extend(path.components().map(<[u8]>::to_vec));
                self.parent_of(&components)
            }
        };
        let name = match path.components().last() {
            Some(last) => last.to_vec(),
            None => self.dest.prefix.last().cloned().unwrap_or_default(),
        };
        let parent = match parent {
            Ok(p) => p,
            Err(e) => {
                let why = format!("cannot open its directory: {}", reason(&e));
                self.discard_parked(id);
                return match kind {
                    EntryKind::Dir { .. } => self.dir_verdict(id, display, Some(why)),
                    _ => self.verdict(id, display, Outcome::Failed(why), 0),
                };
            }
        };
        match kind {
            EntryKind::Dir { mode, mtime } => {
                // Checked before anything is created for it. An honest
                // sender stays within the limit (it counts the directories
                // we have not answered, a superset of those open here).
                let limit = ferry_proto::limits::MAX_OPEN_DIRS;
                if self.dirs.len() >= limit {
                    return Err(EngineError::Protocol(format!(
                        "too many directories open at once (limit {limit})"
                    )));
                }
                let parent_fresh = parent_dir
                    .and_then(|d| self.dirs.get(&d))
                    .is_some_and(|d| d.fresh);
                match fsx::ensure_dir_noting(parent.as_fd(), &name, 0o700) {
                    Ok((dir, created)) => {
                        if created && !parent_fresh {
                            // The top of a new subtree: the sender need not
                            // wait for the plans of the files below it.
                            self.reply(Message::Fresh { id })?;
                            self.flush_replies()?;
                        }
                        // We must be able to write into it until its
                        // metadata is applied, whatever mode it has (one we
                        // made has 0700, unless the umask took some of it).
                        let mode_unknown = !created || fsx::process_umask() & 0o700 != 0;
                        // One stat serves both that and the owners below.
                        let stat = (mode_unknown || owner.is_some())
                            .then(|| rustix::fs::fstat(&dir).ok())
                            .flatten();
                        if mode_unknown
                            && let Some(st) = &stat
                            && st.st_mode & 0o700 != 0o700
                        {
                            let _ = rustix::fs::fchmod(
                                &dir,
                                Mode::from_raw_mode((st.st_mode & 0o7777) | 0o700),
                            );
                        }
                        // What a file made in it will be owned by, to spare
                        // a chown where that is already the one wanted (the
                        // chmod above leaves owner and setgid bit alone).
                        let new_files_owner = owner.and(stat.as_ref()).map(fsx::owner_of_new_files);
                        self.adopt(parent_dir);
                        self.dir_ids.insert(path.as_bytes().to_vec(), id);
                        let dir = OpenDir {
                            display,
                            wire_path: path.as_bytes().to_vec(),
                            fd: Arc::new(dir),
                            mode,
                            mtime,
                            owner,
                            new_files_owner,
                            failure: None,
                            parent_dir,
                            children: 0,
                            ended: false,
                            fresh: created || parent_fresh,
                        };
                        self.dirs.insert(id, dir);
                        Ok(())
                    }
                    Err(e) => self.dir_verdict(id, display, Some(reason(&e))),
                }
            }
            EntryKind::File { size, mode, mtime } => {
                self.plan_through = id;
                if self.files.len() >= MAX_OPEN_FILES {
                    return Err(EngineError::Protocol("too many files open at once".into()));
                }
                // Never setuid/setgid from a peer: the receiver may run as root.
                let mode = mode & 0o777;
                // A new directory holds nothing yet: spare the stat.
                let fresh_dir = parent_dir
                    .and_then(|d| self.dirs.get(&d))
                    .is_some_and(|d| d.fresh);
                if !self.dest.ignore_times
                    && !fresh_dir
                    && let Some(stat) = fsx::unchanged(parent.as_fd(), &name, size, mtime)
                {
                    let mode_to_fix = (fsx::mode_of(&stat) & 0o777 != mode).then_some(mode);
                    let owner_to_fix = owner.filter(|o| fsx::owner_of(&stat) != *o);
                    if mode_to_fix.is_some() || owner_to_fix.is_some() {
                        fix_metadata(&parent, &name, mode_to_fix, owner_to_fix);
                    }
                    self.discard_parked(id);
                    return self.verdict(id, display, Outcome::Unchanged, size);
                }
                // In a directory this transfer made, a small file (one with
                // no journal to resume from) needs no named part file, nor
                // its name unless a racing transfer takes the file's name.
                let unnamed = (fresh_dir && size < JOURNAL_MIN_SIZE)
                    .then(|| fsx::open_unnamed_part(parent.as_fd(), mode))
                    .flatten();
                let is_unnamed = unnamed.is_some();
                let part = if is_unnamed {
                    Vec::new()
                } else {
                    fsx::part_name(&name)
                };
                let opened = match unnamed {
                    Some(part_file) => Ok(part_file),
                    None => fsx::open_part(parent.as_fd(), &part, mode),
                };
                let part_file = match opened {
                    Ok(p) => p,
                    Err(e) => {
                        self.discard_parked(id);
                        let outcome = if e.kind() == std::io::ErrorKind::WouldBlock {
                            Outcome::Incomplete(reason(&e))
                        } else {
                            Outcome::Failed(reason(&e))
                        };
                        return self.verdict(id, display, outcome, 0);
                    }
                };
                let stamp = SourceStamp {
                    size,
                    mtime_sec: mtime.sec,
                    mtime_nsec: mtime.nsec,
                };
                let journal_name = if size >= JOURNAL_MIN_SIZE {
                    journal::journal_name(&name)
                } else {
                    Vec::new()
                };
                let file = File::from(part_file.fd);
                // Below a fresh directory the sender sends whole files: a
                // leftover (of a transfer racing ours) is not resumed.
                let resumable = part_file.existing && !fresh_dir;
                // A part file this process just made has a known owner.
                let made_with = parent_dir
                    .and_then(|d| self.dirs.get(&d))
                    .and_then(|d| d.new_files_owner)
                    .filter(|_| !part_file.existing);
                let chown = owner.filter(|o| made_with != Some(*o));
                let (journal, held) = match self.prepare_part(
                    &parent,
                    &file,
                    &journal_name,
                    stamp,
                    resumable,
                    part_file.existing,
                ) {
                    Ok(prepared) => prepared,
                    Err(e) => {
                        if !is_unnamed {
                            let _ = fsx::remove_if_present(parent.as_fd(), &part);
                        }
                        self.discard_parked(id);
                        return self.verdict(id, display, Outcome::Failed(reason(&e)), 0);
                    }
                };
                let mut held = held;
                let mut runs = journal::runs(&held);
                if runs.len() > MAX_HAVE_RUNS {
                    // More than one `have` can carry: the rest comes again.
                    runs.truncate(MAX_HAVE_RUNS);
                    let (start, len, count) = runs[MAX_HAVE_RUNS - 1];
                    let covered = start + u64::from(len) * count;
                    held.retain(|r| r.offset < covered);
                }
                let mut ledger = ChunkLedger::new(size);
                for r in &held {
                    // Sorted, in bounds and disjoint (the journal checked),
                    // so the ledger takes them all.
                    let _ = ledger.record(r.offset, r.len, r.hash);
                }
                self.tally.event(Event::FileStarted {
                    path: display.clone(),
                    size,
                });
                if !held.is_empty() {
                    let bytes: u64 = held.iter().map(|r| u64::from(r.len)).sum();
                    self.tally.event(Event::Resumed {
                        path: display.clone(),
                        bytes,
                    });
                    self.reply(Message::Have { id, chunks: runs })?;
                }
                self.adopt(parent_dir);
                let file = OpenFile {
                    display,
                    parent,
                    name,
                    part,
                    unnamed: is_unnamed,
                    file,
                    journal,
                    journal_name,
                    keep: true,
                    ledger,
                    size,
                    mode,
                    mode_set: part_file.mode_set,
                    mtime,
                    chown,
                    blank: !part_file.existing,
                    holes: false,
                    expected: None,
                    damaged: 0,
                    damage: None,
                    parent_dir,
                    committed: false,
                };
                self.files.insert(id, file);
                for chunk in self.parked.remove(&id).unwrap_or_default() {
                    self.parked_chunks -= 1;
                    self.chunk(chunk)?;
                }
                if self.parked_chunks < PARKED_PAUSE / 2 {
                    self.gate.reopen();
                }
                Ok(())
            }
            EntryKind::Symlink { target, mtime } => {
                let outcome = match make_symlink(&parent, &name, target.as_bytes(), mtime, owner) {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Failed(reason(&e)),
                };
                self.verdict(id, display, outcome, 0)
            }
            EntryKind::Special { what } => {
                let why = format!("special file ({}), not transferred", peer_text(&what));
                self.verdict(id, display, Outcome::Skipped(why), 0)
            }
            EntryKind::Fifo { mode, mtime } => {
                let made = fsx::make_node(
                    parent.as_fd(),
                    &name,
                    rustix::fs::FileType::Fifo,
                    0,
                    mode,
                    mtime,
                    owner,
                );
                let outcome = match made {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Failed(reason(&e)),
                };
                self.verdict(id, display, outcome, 0)
            }
            EntryKind::Device {
                block,
                major,
                minor,
                mode,
                mtime,
            } => {
                let (file_type, what) = if block {
                    (rustix::fs::FileType::BlockDevice, "block device")
                } else {
                    (rustix::fs::FileType::CharacterDevice, "character device")
                };
                // A node gives access to whatever device it names (a disk,
                // say), to anyone its mode lets in: never unasked.
                let outcome = if !self.dest.devices {
                    Outcome::Skipped(format!(
                        "{what}, not recreated: only a receiver running as root with --devices makes device nodes"
                    ))
                } else {
                    let device = rustix::fs::makedev(major, minor);
                    match fsx::make_node(
                        parent.as_fd(),
                        &name,
                        file_type,
                        device,
                        mode,
                        mtime,
                        owner,
                    ) {
                        Ok(()) => Outcome::Ok,
                        Err(e) => Outcome::Failed(reason(&e)),
                    }
                };
                self.verdict(id, display, outcome, 0)
            }
            EntryKind::Hardlink { first, target } => {
                if first >= id {
                    return Err(EngineError::Protocol(format!(
                        "hard link {id} names entry {first}, which does not come before it"
                    )));
                }
                let target = WirePath::from_wire(target)?;
                if self.files.contains_key(&first) {
                    // Its file is still arriving: the link waits for it.
                    if self.links_waiting >= MAX_WAITING_LINKS {
                        return Err(EngineError::Protocol(format!(
                            "too many hard links waiting for their files (limit {MAX_WAITING_LINKS})"
                        )));
                    }
                    self.links_waiting += 1;
                    self.adopt(parent_dir);
                    let link = WaitingLink {
                        id,
                        display,
                        parent,
                        name,
                        parent_dir,
                    };
                    self.waiting_links.entry(first).or_default().push(link);
                    return Ok(());
                }
                // Settled already, or unchanged: link to its name, found
                // beneath the destination like any path.
                let Some(target_name) = target.components().last().map(<[u8]>::to_vec) else {
                    return Err(EngineError::Protocol(format!(
                        "hard link {id} names the root of the transfer"
                    )));
                };
                let mut components = self.dest.prefix.clone();
                components.extend(target.components().map(<[u8]>::to_vec));
                let linked = self.parent_of(&components).and_then(|dir| {
                    fsx::hard_link(dir.as_fd(), &target_name, parent.as_fd(), &name)
                });
                let outcome = match linked {
                    Ok(()) => Outcome::Ok,
                    Err(e) => Outcome::Failed(reason(&e)),
                };
                self.verdict(id, display, outcome, 0)
            }
        }
    }

    /// Get a freshly opened part file ready: resume from its journal if an
    /// interrupted transfer of the same source left one, otherwise empty
    /// it. Returns the journal to keep (large files only) and the chunks
    /// already held, in offset order.
    fn prepare_part(
        &mut self,
        parent: &OwnedFd,
        file: &File,
        journal_name: &[u8],
        stamp: SourceStamp,
        resumable: bool,
        existing: bool,
    ) -> std::io::Result<(Option<Journal>, Vec<ChunkRecord>)> {
        let journaled = stamp.size >= JOURNAL_MIN_SIZE;
        if existing {
            if journaled && resumable {
                let replies = self.replies.clone();
                let mut last_sign = Instant::now();
                let mut alive = |_verified: u64| {
                    if last_sign.elapsed() >= KEEPALIVE_EVERY {
                        last_sign = Instant::now();
                        let _ = replies.blocking_send(vec![Message::Keepalive]);
                    }
                };
                // Keep what a resume can use: at most half the ledger's
                // bound ahead of a gap, and what one `have` can list.
                let resumed = Journal::resume(
                    parent.as_fd(),
                    journal_name,
                    stamp,
                    file.as_fd(),
                    MAX_CHUNKS_AHEAD.min(MAX_HAVE_RUNS) / 2,
                    &mut alive,
                );
                match resumed {
                    Ok(Some((journal, held))) => return Ok((Some(journal), held)),
                    Ok(None) => {}
                    Err(e) => tracing::debug!("journal unusable, starting over: {e}"),
                }
            }
            // Nothing in it can be trusted: start from empty.
            file.set_len(0)?;
            if journaled {
                journal::remove(parent.as_fd(), journal_name)?;
            }
        }
        // Without a journal the file still arrives; it just cannot resume.
        let journal = journaled
            .then(|| Journal::create(parent.as_fd(), journal_name, stamp).ok())
            .flatten();
        Ok((journal, Vec::new()))
    }

    /// Count a new open child of directory `parent_dir`.
    fn adopt(&mut self, parent_dir: Option<u64>) {
        if let Some(d) = parent_dir.and_then(|id| self.dirs.get_mut(&id)) {
            d.children += 1;
        }
    }

    /// A child of `parent_dir` is settled; finish every directory that was
    /// only waiting for it, upwards.
    fn settled(&mut self, mut parent_dir: Option<u64>) -> Result<(), EngineError> {
        while let Some(id) = parent_dir {
            let Some(d) = self.dirs.get_mut(&id) else {
                break;
            };
            d.children = d.children.saturating_sub(1);
            if !(d.ended && d.children == 0) {
                break;
            }
            parent_dir = self.finish_dir(id)?;
        }
        Ok(())
    }

    fn discard_parked(&mut self, id: u64) {
        if let Some(chunks) = self.parked.remove(&id) {
            self.parked_chunks -= chunks.len();
        }
        if self.parked_chunks < PARKED_PAUSE / 2 {
            self.gate.reopen();
        }
    }

    /// Fail an open file: answer now, and ignore what the sender still
    /// sends of it. Its part file stays for a resume if `keep` and it has
    /// a journal; otherwise it is removed.
    fn fail_open_file(&mut self, id: u64, outcome: Outcome, keep: bool) -> Result<(), EngineError> {
        if let Some(mut f) = self.files.remove(&id) {
            f.keep = keep;
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
        let Some(links) = self.waiting_links.remove(&first) else {
            return Ok(());
        };
        self.links_waiting -= links.len();
        for link in links {
            let outcome = match placed {
                Ok((dir, name)) => {
                    match fsx::hard_link(dir.as_fd(), name, link.parent.as_fd(), &link.name) {
                        Ok(()) => Outcome::Ok,
                        Err(e) => Outcome::Failed(reason(&e)),
                    }
                }
                // Sending the file again may cure it, and then its links.
                Err(Outcome::Incomplete(why)) => {
                    Outcome::Incomplete(format!("its file did not arrive whole: {why}"))
                }
                Err(_) => Outcome::Failed("its file could not be placed".into()),
            };
            self.verdict(link.id, link.display, outcome, 0)?;
            self.settled(link.parent_dir)?;
        }
        Ok(())
    }

    fn chunk(&mut self, chunk: ReadChunk) -> Result<(), EngineError> {
        let h = chunk.chunk.header;
        let Some(f) = self.files.get_mut(&h.file_id) else {
            if h.file_id > self.last_id {
                // Overtook its entry on another connection: wait for it.
                if self.parked_chunks >= MAX_PARKED_CHUNKS {
                    return Err(EngineError::Protocol(
                        "too many chunks ahead of their entries".into(),
                    ));
                }
                self.parked_chunks += 1;
                self.parked.entry(h.file_id).or_default().push(chunk);
                if self.parked_chunks >= PARKED_PAUSE {
                    self.gate.pause();
                }
            }
            // Otherwise the file is settled (failed, or aborted): drop it.
            return Ok(());
        };
        // A chunk that does not fit, or is corrupt, was damaged on the way
        // or by the sender: nothing of it is written, what was verified
        // before stays, and sending the file again can repair it.
        if let Err(e) = f.ledger.check(h.offset, h.raw_len) {
            return self.fail_open_file(h.file_id, Outcome::Incomplete(e.to_string()), true);
        }
        let raw = match self.decoder.decode(&chunk) {
            Ok(raw) => raw,
            Err(fault) => {
                f.damaged += u64::from(h.raw_len);
                f.damage.get_or_insert_with(|| fault.to_string());
                return self.settle_if_damaged(h.file_id);
            }
        };
        let written = match raw {
            Decoded::Bytes(raw) => fsx::write_all_at(f.file.as_fd(), raw, h.offset),
            // A hole: nothing to write into a part file that held nothing
            // (the length is set at the end); otherwise whatever an earlier
            // attempt left there must read as zeros.
            Decoded::Zeros => {
                f.holes = true;
                if f.blank {
                    Ok(())
                } else {
                    fsx::zero_range(f.file.as_fd(), h.offset, h.raw_len)
                }
            }
        };
        if let Err(e) = written {
            // Disk full and the like: not cured by sending again at once,
            // but what is verified stays for the same command later.
            return self.fail_open_file(h.file_id, Outcome::Failed(reason(&e)), true);
        }
        if let Err(e) = f.ledger.record(h.offset, h.raw_len, h.hash) {
            return self.fail_open_file(h.file_id, Outcome::Incomplete(e.to_string()), true);
        }
        // Recorded only once the bytes are in the part file, so the journal
        // never claims more than is there.
        if let Some(j) = f.journal.as_mut() {
            let record = ChunkRecord {
                offset: h.offset,
                len: h.raw_len,
                hash: h.hash,
            };
            if let Err(e) = j.record(record) {
                tracing::debug!("journal write failed, no resume for this file: {e}");
                f.journal = None;
                let _ = journal::remove(f.parent.as_fd(), &f.journal_name);
            }
        }
        let ready = f.expected.is_some() && f.ledger.is_complete();
        self.tally.event(Event::Bytes {
            n: u64::from(h.raw_len),
        });
        if ready {
            self.finish_file(h.file_id)?;
        }
        self.settle_if_damaged(h.file_id)
    }

    /// A file with corrupt chunks is settled, as incomplete, once every
    /// other chunk and its `file_end` have arrived: what was verified stays
    /// in the part file and the journal, and only the damaged chunks need
    /// to come again.
    fn settle_if_damaged(&mut self, id: u64) -> Result<(), EngineError> {
        let Some(f) = self.files.get(&id) else {
            return Ok(());
        };
        // `received` walks the chunks ahead of the gap: only when damaged.
        if f.damaged > 0 && f.expected.is_some() && f.ledger.received() + f.damaged == f.size {
            let why = f.damage.clone().unwrap_or_default();
            return self.fail_open_file(id, Outcome::Incomplete(why), true);
        }
        Ok(())
    }

    fn file_end(&mut self, id: u64, digest: &str) -> Result<(), EngineError> {
        let Some(digest) = FileDigest::from_hex(digest) else {
            return Err(EngineError::Protocol(format!(
                "malformed digest for entry {id}"
            )));
        };
        let Some(f) = self.files.get_mut(&id) else {
            if id > self.last_id {
                return Err(EngineError::Protocol(format!(
                    "end of entry {id} which was never announced"
                )));
            }
            return Ok(()); // Already settled (it failed).
        };
        f.expected = Some(digest);
        if f.ledger.is_complete() {
            self.finish_file(id)?;
        }
        self.settle_if_damaged(id)
    }

    /// Verify and commit a file whose chunks and digest have all arrived.
    fn finish_file(&mut self, id: u64) -> Result<(), EngineError> {
        let Some(expected) = self.files.get(&id).and_then(|f| f.expected) else {
            return Ok(());
        };
        let Some(mut f) = self.files.remove(&id) else {
            return Ok(());
        };
        let outcome = match f.ledger.finish(expected) {
            // The chunks verified one by one, yet the whole is not what was
            // sent: nothing of this part file can be trusted.
            Err(e) => {
                f.keep = false;
                Outcome::Incomplete(e.to_string())
            }
            Ok(()) => match commit(&mut f) {
                Ok(()) => {
                    f.committed = true;
                    if f.journal.take().is_some() {
                        let _ = journal::remove(f.parent.as_fd(), &f.journal_name);
                    }
                    Outcome::Ok
                }
                Err(why) => {
                    f.keep = false;
                    Outcome::Failed(why)
                }
            },
        };
        let placed = match &outcome {
            Outcome::Ok => Ok((&*f.parent, f.name.as_slice())),
            other => Err(other),
        };
        self.release_links(id, placed)?;
        self.verdict(id, f.display.clone(), outcome, f.size)?;
        self.settled(f.parent_dir)
    }

    fn abort(&mut self, id: u64, why: &str, transient: bool) -> Result<(), EngineError> {
        let why = peer_text(why);
        if self.files.contains_key(&id) {
            let outcome = if transient {
                Outcome::Incomplete(why)
            } else {
                Outcome::Failed(why)
            };
            return self.fail_open_file(id, outcome, false);
        }
        if let Some(d) = self.dirs.get_mut(&id) {
            d.failure = Some(why);
            return Ok(());
        }
        if id > self.last_id {
            return Err(EngineError::Protocol(format!(
                "abort of entry {id} which was never announced"
            )));
        }
        Ok(()) // Already settled here.
    }

    fn dir_end(&mut self, id: u64) -> Result<(), EngineError> {
        let Some(d) = self.dirs.get_mut(&id) else {
            if id > self.last_id {
                return Err(EngineError::Protocol(format!(
                    "end of entry {id} which was never announced"
                )));
            }
            return Ok(()); // Its creation failed and was answered then.
        };
        d.ended = true;
        if d.children == 0 {
            let parent = self.finish_dir(id)?;
            self.settled(parent)?;
        }
        Ok(())
    }

    /// Apply a finished directory's metadata and answer it; returns its
    /// parent, which now has one child fewer.
    fn finish_dir(&mut self, id: u64) -> Result<Option<u64>, EngineError> {
        let Some(d) = self.dirs.remove(&id) else {
            return Ok(None);
        };
        self.dir_ids.remove(&d.wire_path);
        let applied = d
            .owner
            .map_or(Ok(()), |o| fsx::set_owner(d.fd.as_fd(), o))
            .and_then(|()| {
                rustix::fs::fchmod(&*d.fd, Mode::from_raw_mode(d.mode & 0o1777))?;
                Ok(rustix::fs::futimens(&*d.fd, &fsx::mtime_only(d.mtime))?)
            });
        let failure = match applied {
            Err(e) => Some(format!("cannot set directory metadata: {}", reason(&e))),
            Ok(()) => d.failure,
        };
        self.dir_verdict(id, d.display, failure)?;
        Ok(d.parent_dir)
    }
}

/// Make a verified part file the real one: metadata first, then the
/// atomic rename (or, for an unnamed part file, the link), so the name
/// only ever shows the complete file.
fn commit(f: &mut OpenFile) -> Result<(), String> {
    if f.holes {
        f.file.set_len(f.size).map_err(|e| reason(&e))?;
    }
    // The owner first: a chown may clear mode bits.
    if let Some(owner) = f.chown {
        fsx::set_owner(f.file.as_fd(), owner)
            .map_err(|e| format!("cannot set its owner: {}", reason(&e)))?;
    }
    if !f.mode_set {
        rustix::fs::fchmod(&f.file, Mode::from_raw_mode(f.mode)).map_err(|e| reason(&e.into()))?;
    }
    rustix::fs::futimens(&f.file, &fsx::mtime_only(f.mtime)).map_err(|e| reason(&e.into()))?;
    if f.unnamed {
        match fsx::name_unnamed_part(f.file.as_fd(), f.parent.as_fd(), &f.name) {
            Ok(()) => return Ok(()),
            // Something took the name since the directory was made (a
            // transfer racing ours): replace it, as a named part would.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                f.part = fsx::part_name(&f.name);
                fsx::name_unnamed_part(f.file.as_fd(), f.parent.as_fd(), &f.part)
                    .map_err(|e| reason(&e))?;
                f.unnamed = false;
            }
            Err(e) => return Err(reason(&e)),
        }
    }
    fsx::rename_into_place(f.parent.as_fd(), &f.part, &f.name).map_err(|e| reason(&e))
}

/// Give an unchanged file the sender's mode and owner (where they differ):
/// opened without following a symlink swapped in since the check. Best
/// effort: the content is right.
fn fix_metadata(parent: &OwnedFd, name: &[u8], mode: Option<u32>, owner: Option<Owner>) {
    if let Ok((file, _)) = fsx::open_regular(parent.as_fd(), name) {
        if let Some(owner) = owner {
            let _ = fsx::set_owner(file.as_fd(), owner);
        }
        if let Some(mode) = mode {
            let _ = rustix::fs::fchmod(&file, Mode::from_raw_mode(mode));
        }
    }
}

/// Create a symlink atomically: under the part name, then renamed.
fn make_symlink(
    parent: &OwnedFd,
    name: &[u8],
    target: &[u8],
    mtime: Mtime,
    owner: Option<Owner>,
) -> std::io::Result<()> {
    if target.is_empty() || target.contains(&0) {
        return Err(std::io::Error::other("invalid symlink target"));
    }
    let part = fsx::part_name(name);
    fsx::remove_if_present(parent.as_fd(), &part)?;
    rustix::fs::symlinkat(target, parent, part.as_slice())?;
    let placed = (|| -> std::io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_data_gate_holds_readers_until_reopened() {
        let gate = Arc::new(DataGate::default());
        gate.wait_open().await; // open by default
        gate.pause();
        let waiter = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_open().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a paused gate holds the reader");
        gate.reopen();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("reopening releases the reader")
            .unwrap();
    }
}
