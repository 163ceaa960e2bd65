//! The sending side of a transfer, the same for uploads and downloads.
//!
//! A producer thread walks the tree, reads each file in chunks, hashes and
//! compresses them and hands finished frames to the connection through a
//! bounded queue; the async side writes those frames and reads the
//! receiver's verdicts. Memory is bounded by the queue, whatever the size
//! of the files or the tree.
//!
//! A file's data goes only once the receiver has planned it: the walk
//! announces entries up to `MAX_FILES_AHEAD` files ahead of the data, so
//! the plans (`planned`, `have`, `unchanged`) come back while earlier files
//! are still being sent, and no file waits a round trip of its own. A file
//! the receiver already has is not sent; of a file it holds in part, only
//! the missing chunks are, while the held ones are read and hashed here so
//! that the file digest still proves the whole file.
//!
//! Nor is memory bounded by what the receiver leaves unanswered: the walk
//! stops before a new entry while `MAX_OPEN_DIRS` directories (the
//! protocol's limit) or `MAX_UNANSWERED` entries in all wait for their
//! outcomes, and what the receiver says is merged as it comes rather than
//! queued.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_proto::digest::DigestBuilder;
use ferry_proto::frame::{DATA_PREFIX_LEN, Frame};
use ferry_proto::limits::{
    DEFAULT_CHUNK_LEN, MAX_CHUNK_LEN, MAX_FILES_AHEAD, MAX_HAVE_RUNS, MAX_OPEN_DIRS,
};
use ferry_proto::message::{Compression, EntryKind, Message, Mtime, Outcome, Owner};
use ferry_proto::path::{WirePath, escape};
use rustix::fs::{AtFlags, FileType, Stat};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::adapt::{LevelController, WindowMeter};
use crate::codec::ChunkEncoder;
use crate::conn::{
    DataConn, FrameReader, FrameWriter, for_each_data_conn, pump_control, pump_data,
};
use crate::error::{EngineError, reason};
use crate::events::{Event, EventSink, Tally, display_name, peer_text};
use crate::fsx::{self, Kind, Root};

/// Batches of control frames the producer may run ahead of the socket.
const FRAME_QUEUE: usize = 8;
/// Data frames (chunks of files larger than one chunk) waiting for any
/// connection of the session to take them: with 1 MiB chunks, the bound on
/// the sender's memory beyond the socket buffers.
const DATA_QUEUE: usize = 16;
/// Frames are batched into one queue item up to this size, so that a tree
/// of small files costs one hand-over between threads per batch rather
/// than several per file.
const BATCH_BYTES: usize = 128 * 1024;
/// A batch is handed over at the latest this long after its first frame,
/// so a slow walk does not hold back what is ready.
const BATCH_DELAY: Duration = Duration::from_millis(5);

/// While hashing chunks the receiver already holds (which sends nothing),
/// tell it this often that the sender is alive.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

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
const MAX_LINKED_FILES: usize = 1 << 20;

/// A file announced and waiting for its plan.
struct QueuedFile {
    id: u64,
    /// The directories of this transfer that hold it, outermost first.
    ancestors: Arc<[u64]>,
    display: String,
    file: File,
    size: u64,
    mtime: Mtime,
    /// It has fewer blocks than bytes: its holes are worth looking for.
    sparse: bool,
}

/// What to send.
pub(crate) struct SendJob {
    pub(crate) root: Root,
    pub(crate) compression: Compression,
    /// Whether the receiver is on this host (a loopback connection): there
    /// the link is memory, faster than any compressor, so `auto` starts
    /// off instead of spending a warm-up and a probe to find that out.
    pub(crate) local_peer: bool,
    /// How the root is named in events and messages.
    pub(crate) label: String,
    /// Count the tree up front (on a thread of its own) so that progress
    /// can show totals from the start. Without it, the totals are counted
    /// during the walk and sent just before `end`.
    pub(crate) early_totals: bool,
    /// Send each entry's owner, for a receiver that applies them.
    pub(crate) owners: bool,
}

/// An entry sent and not yet answered.
struct Unanswered {
    path: String,
    size: u64,
    is_dir: bool,
    /// A file whose data waits for its plan: the only kind a `have` is for.
    awaiting_plan: bool,
}

/// What passes from the reader of the receiver's replies to the producer:
/// the entries not answered yet, and what the receiver said that the
/// producer has not taken in. Replies are merged in as they arrive, never
/// queued: the reader never waits for the producer (so neither side can
/// block the other on a full TCP buffer), and a receiver that repeats
/// itself cannot grow our memory while the producer is busy. What is held
/// here is bounded by the unanswered entries, and those are bounded by
/// `Producer::wait_for_room`.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled when something comes in, and when the reader stops.
    changed: Condvar,
}

#[derive(Default)]
struct InboxState {
    unanswered: HashMap<u64, Unanswered>,
    /// How many of the unanswered entries are directories, and the bytes
    /// of their names.
    unanswered_dirs: usize,
    name_bytes: usize,
    /// The last entry id sent.
    announced: u64,
    news: News,
    /// The reader has stopped: nothing more will come in.
    closed: bool,
}

/// What the receiver said about files whose data is not sent yet, since
/// the producer last looked.
#[derive(Default)]
struct News {
    /// Send every file up to this id not otherwise answered, whole (0:
    /// nothing new).
    through: u64,
    /// The chunks it holds of files waiting for their plan (runs of
    /// offset, length, count).
    have: HashMap<u64, Vec<(u64, u32, u64)>>,
    /// Files settled already (unchanged, or failed): send nothing more.
    settled: Vec<u64>,
    /// Directories new at the receiver: every file below them may go.
    fresh: HashSet<u64>,
}

impl News {
    fn is_empty(&self) -> bool {
        self.through == 0
            && self.have.is_empty()
            && self.settled.is_empty()
            && self.fresh.is_empty()
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until `ready` holds; `Closed` if the reader stops first.
    fn wait_until(&self, ready: impl Fn(&InboxState) -> bool) -> Result<(), EngineError> {
        let mut state = self.lock();
        while !ready(&state) {
            if state.closed {
                return Err(EngineError::Closed);
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Take what the receiver said; with `wait`, wait for some word first.
    fn take_news(&self, wait: bool) -> Result<News, EngineError> {
        if wait {
            self.wait_until(|s| !s.news.is_empty())?;
        }
        Ok(std::mem::take(&mut self.lock().news))
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Closes the inbox however the sender ends, so that a producer waiting
/// on it learns that nothing more will come.
struct CloseOnDrop(Arc<Inbox>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl InboxState {
    /// Take in one reply; an outcome also becomes an event.
    fn take_in(&mut self, msg: Message) -> Result<Option<Event>, EngineError> {
        let never_sent = |what: &str, id: u64| {
            EngineError::Protocol(format!("{what} for entry {id}, which was never announced"))
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
            Message::Outcome { id, outcome } => {
                let Some(Unanswered {
                    path, size, is_dir, ..
                }) = self.unanswered.remove(&id)
                else {
                    return Err(EngineError::Protocol(format!(
                        "verdict for unknown entry {id}"
                    )));
                };
                self.name_bytes -= path.len();
                if is_dir {
                    self.unanswered_dirs -= 1;
                } else {
                    self.news.settled.push(id);
                }
                return Ok(Some(match outcome {
                    Outcome::Ok if is_dir => return Ok(None),
                    Outcome::Ok => Event::FileDone { path, size },
                    Outcome::Failed(why) => Event::FileFailed {
                        path,
                        reason: peer_text(&why),
                    },
                    Outcome::Skipped(why) => Event::Skipped {
                        path,
                        reason: peer_text(&why),
                    },
                    Outcome::Unchanged => Event::Unchanged { path, size },
                    Outcome::Incomplete(why) => Event::FileIncomplete {
                        path,
                        reason: peer_text(&why),
                    },
                }));
            }
            other => {
                return Err(EngineError::Protocol(format!(
                    "unexpected message from the receiver: {other:?}"
                )));
            }
        }
        Ok(None)
    }
}

/// Run the sending side over an established, accepted session.
///
/// The control connection carries the ordered messages (and data when it
/// is free); the data connections that arrive on `joins` share the chunks
/// of large files.
pub(crate) async fn run_sender<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    job: SendJob,
    tally: Arc<Tally>,
    cancel: &CancellationToken,
    mut joins: mpsc::Receiver<DataConn>,
) -> Result<(), EngineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (control_tx, mut control_rx) = mpsc::channel::<Bytes>(FRAME_QUEUE);
    let (data_tx, data_rx) = async_channel::bounded::<Bytes>(DATA_QUEUE);
    let inbox = Arc::new(Inbox::default());
    let _close_inbox = CloseOnDrop(inbox.clone());
    let (done_tx, done_rx) = oneshot::channel();
    let (controller, fixed_level) = match job.compression {
        Compression::Auto if job.local_peer => (Some(LevelController::starting_off()), None),
        Compression::Auto => (Some(LevelController::new()), None),
        Compression::Off => (None, None),
        Compression::Level(level) => (None, Some(level)),
    };
    let producer = Producer {
        control: control_tx,
        data: data_tx,
        inbox: inbox.clone(),
        tally: tally.clone(),
        encoder: ChunkEncoder::new(
            controller
                .as_ref()
                .map_or(fixed_level, LevelController::level),
        )?,
        controller,
        window: WindowMeter::new(Instant::now()),
        label: job.label,
        owners: job.owners,
        next_id: 0,
        batch: BytesMut::new(),
        batch_started: None,
        read_buf: Vec::new(),
        frame_pool: FramePool::default(),
        totals: None,
        walked: (0, 0),
        queue: VecDeque::new(),
        plan_through: 0,
        have: HashMap::new(),
        settled_early: Vec::new(),
        dirs_open: Vec::new(),
        ancestors: None,
        fresh: HashSet::new(),
        linked: HashMap::new(),
    };
    // A thread of its own (not the blocking pool): it does blocking file
    // I/O for the whole transfer, and recursion needs a roomy stack.
    std::thread::Builder::new()
        .name("ferry-send".into())
        .stack_size(16 * 1024 * 1024)
        .spawn(move || {
            let _ = done_tx.send(producer.run(job.root, job.early_totals));
        })
        .map_err(EngineError::from)?;

    // The transfer is over when the receiver says so; the writers only
    // matter if they fail (then the session cannot complete).
    let write = async {
        pump_control(writer, &mut control_rx, &data_rx).await?;
        std::future::pending::<Result<(), EngineError>>().await
    };
    let data_writers = for_each_data_conn(&mut joins, |conn| pump_data(conn, data_rx.clone()));
    tokio::select! {
        r = read_outcomes(reader, &inbox, &tally) => r?,
        r = write => r?,
        e = data_writers => return Err(e),
        _ = cancel.cancelled() => return Err(EngineError::Cancelled),
    }
    // The receiver is done: a producer still waiting for its word (only
    // after a `done` that came too early) must not wait forever.
    inbox.close();
    drop(control_rx);
    done_rx.await.unwrap_or(Err(EngineError::Closed))
}

/// Read the receiver's verdicts until it says the transfer is done.
async fn read_outcomes<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    inbox: &Inbox,
    tally: &Tally,
) -> Result<(), EngineError> {
    let mut events = Vec::new();
    loop {
        // Everything one read brought, under one lock and one wake-up: on
        // small files that is hundreds of outcomes.
        let mut msg = reader.message().await?;
        let mut done = false;
        {
            let mut state = inbox.lock();
            loop {
                match msg {
                    Message::Done => done = true,
                    Message::Keepalive => {}
                    msg => events.extend(state.take_in(msg)?),
                }
                msg = match reader.buffered()? {
                    _ if done => break,
                    Some(Frame::Control(Message::Error { code, message })) => {
                        return Err(EngineError::Remote { code, message });
                    }
                    Some(Frame::Control(next)) => next,
                    Some(Frame::Data(_)) => {
                        return Err(EngineError::Protocol("unexpected data chunk".into()));
                    }
                    None => break,
                };
            }
        }
        inbox.changed.notify_all();
        // Outside the lock: the sink may take its time.
        for event in events.drain(..) {
            tally.event(event);
        }
        if done {
            return Ok(());
        }
    }
}

/// Fill `buf` from `file` at `offset`. The error says why the file cannot
/// be sent, and whether that may pass.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), (String, bool)> {
    match fsx::read_full_at(file.as_fd(), buf, offset) {
        Ok(true) => Ok(()),
        Ok(false) => Err(("the file shrank while it was being sent".into(), true)),
        Err(e) => Err((reason(&e), false)),
    }
}

/// Frame buffers spare at most: as many as the data queue holds, and a few
/// in the connections' hands.
const FRAME_POOL_SPARE: usize = DATA_QUEUE + 4;

/// The buffers of the data frames of large files, used again once a
/// connection has written them: a fresh megabyte for every chunk would
/// cost page faults on every one of its pages.
#[derive(Clone, Default)]
struct FramePool(Arc<Mutex<Vec<Vec<u8>>>>);

impl FramePool {
    /// A frame of `len` bytes (their content is whatever the buffer held).
    fn take(&self, len: usize) -> PooledFrame {
        let spare = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = spare.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        PooledFrame {
            buf,
            len,
            pool: self.clone(),
        }
    }
}

/// A data frame in a pooled buffer: its first `len` bytes.
struct PooledFrame {
    buf: Vec<u8>,
    len: usize,
    pool: FramePool,
}

impl AsRef<[u8]> for PooledFrame {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for PooledFrame {
    fn drop(&mut self) {
        let mut spare = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < FRAME_POOL_SPARE {
            spare.push(std::mem::take(&mut self.buf));
        }
    }
}

struct Producer {
    /// Ordered frames, for the control connection.
    control: mpsc::Sender<Bytes>,
    /// Chunks of large files, for whichever connection is free.
    data: async_channel::Sender<Bytes>,
    inbox: Arc<Inbox>,
    tally: Arc<Tally>,
    encoder: ChunkEncoder,
    /// Present in `auto` mode: picks the level as the transfer goes.
    controller: Option<LevelController>,
    window: WindowMeter,
    label: String,
    /// Whether entries carry their owner.
    owners: bool,
    next_id: u64,
    batch: BytesMut,
    /// When the first frame of the current batch was added.
    batch_started: Option<Instant>,
    read_buf: Vec<u8>,
    frame_pool: FramePool,
    /// The totals, from the counting thread, until they have been sent.
    totals: Option<std::sync::mpsc::Receiver<(u64, u64)>>,
    /// Files (and symlinks) and bytes met by the walk so far.
    walked: (u64, u64),
    /// Files announced whose data waits for the receiver's plan.
    queue: VecDeque<QueuedFile>,
    /// Files up to this id may be sent (those not otherwise answered).
    plan_through: u64,
    /// Chunks the receiver holds, by file, for files still queued.
    have: HashMap<u64, Vec<(u64, u32, u64)>>,
    /// Queued files the receiver has settled already.
    settled_early: Vec<u64>,
    /// The directories the walk is in, outermost first, and the same as
    /// shared by the files queued meanwhile.
    dirs_open: Vec<u64>,
    ancestors: Option<Arc<[u64]>>,
    /// Directories the receiver created in this transfer: the files below
    /// them need no plan of their own.
    fresh: HashSet<u64>,
    /// The files with more than one name met so far, by device and inode:
    /// the entry and path of their first name.
    linked: HashMap<(u64, u64), (u64, ferry_proto::path::WireBytes)>,
}

impl Producer {
    fn run(mut self, root: Root, early_totals: bool) -> Result<(), EngineError> {
        if early_totals {
            self.totals = Some(count_in_background(&root)?);
        }
        let path = WirePath::root();
        match root {
            Root::Dir(fd, stat) => self.dir(fd, &path, &stat)?,
            Root::File(file, stat) => self.file(&path, Ok(file), &stat)?,
            Root::Symlink(target, stat) => self.symlink(&path, target, &stat)?,
            Root::Node(stat) => self.node(&path, &stat)?,
            Root::Special(what) => self.special(&path, what)?,
        }
        self.send_planned(true)?;
        match self.totals.take() {
            Some(counting) => {
                if let Ok((files, bytes)) = counting.recv() {
                    self.send_totals(files, bytes)?;
                }
            }
            None => self.send_totals(self.walked.0, self.walked.1)?,
        }
        self.send(&Message::End)?;
        self.flush()
    }

    /// Pass the totals on once the counting thread has them; any time
    /// before `end` will do for the receiver and the progress display.
    fn poll_totals(&mut self) -> Result<(), EngineError> {
        let ready = self.totals.as_ref().and_then(|rx| rx.try_recv().ok());
        if let Some((files, bytes)) = ready {
            self.totals = None;
            self.send_totals(files, bytes)?;
        }
        Ok(())
    }

    fn send_totals(&mut self, files: u64, bytes: u64) -> Result<(), EngineError> {
        self.tally.event(Event::Totals { files, bytes });
        self.send(&Message::Totals { files, bytes })
    }

    fn send(&mut self, msg: &Message) -> Result<(), EngineError> {
        ferry_proto::frame::encode_control(msg, &mut self.batch)?;
        self.maybe_flush()
    }

    /// Hand the batch over if it is big or old enough.
    fn maybe_flush(&mut self) -> Result<(), EngineError> {
        let started = *self.batch_started.get_or_insert_with(Instant::now);
        if self.batch.len() >= BATCH_BYTES || started.elapsed() >= BATCH_DELAY {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        self.batch_started = None;
        if self.batch.is_empty() {
            return Ok(());
        }
        let frames = self.batch.split().freeze();
        match self.control.try_send(frames) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(frames)) => {
                // The downstream (socket, link, receiver) is the bottleneck
                // for as long as we wait here: the compression controller
                // wants to know.
                let waiting = Instant::now();
                let sent = self.control.blocking_send(frames);
                self.window.blocked(waiting.elapsed());
                sent.map_err(|_| EngineError::Closed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EngineError::Closed),
        }
    }

    /// Queue one data frame for any connection; counts waiting as blocked.
    fn send_data(&mut self, frame: Bytes) -> Result<(), EngineError> {
        match self.data.try_send(frame) {
            Ok(()) => Ok(()),
            Err(async_channel::TrySendError::Full(frame)) => {
                let waiting = Instant::now();
                let sent = self.data.send_blocking(frame);
                self.window.blocked(waiting.elapsed());
                sent.map_err(|_| EngineError::Closed)
            }
            Err(async_channel::TrySendError::Closed(_)) => Err(EngineError::Closed),
        }
    }

    /// Count `bytes` sent; at the end of a compression window, let the
    /// controller pick the level for the next one.
    fn adapt(&mut self, bytes: u64) -> Result<(), EngineError> {
        let Some(controller) = &mut self.controller else {
            return Ok(());
        };
        let Some(window) = self.window.sent(bytes, Instant::now()) else {
            return Ok(());
        };
        let level = controller.observe(window);
        tracing::debug!(
            bytes = window.bytes,
            secs = window.secs,
            blocked_secs = window.blocked_secs,
            next_level = ?level,
            "compression window"
        );
        self.encoder.set_level(level)?;
        Ok(())
    }

    /// Announce an entry; returns its id. It is remembered until the
    /// receiver's verdict on it arrives.
    fn entry(
        &mut self,
        path: &WirePath,
        kind: EntryKind,
        stat: Option<&Stat>,
    ) -> Result<u64, EngineError> {
        self.poll_totals()?;
        self.send_planned(false)?;
        let (size, is_dir, is_file) = match &kind {
            EntryKind::File { size, .. } => (*size, false, true),
            EntryKind::Dir { .. } => (0, true, false),
            _ => (0, false, false),
        };
        self.wait_for_room(is_dir)?;
        self.next_id += 1;
        let id = self.next_id;
        if matches!(
            kind,
            EntryKind::File { .. }
                | EntryKind::Symlink { .. }
                | EntryKind::Hardlink { .. }
                | EntryKind::Fifo { .. }
                | EntryKind::Device { .. }
        ) {
            self.walked.0 += 1;
            self.walked.1 += size;
        }
        let entry = Unanswered {
            path: display_name(&self.label, path),
            size,
            is_dir,
            awaiting_plan: is_file,
        };
        {
            let mut inbox = self.inbox.lock();
            inbox.name_bytes += entry.path.len();
            inbox.unanswered_dirs += usize::from(is_dir);
            inbox.unanswered.insert(id, entry);
            inbox.announced = id;
        }
        let owner: Option<Owner> = stat.filter(|_| self.owners).map(fsx::owner_of);
        self.send(&Message::Entry {
            id,
            path: path.to_wire(),
            kind,
            owner,
        })?;
        Ok(id)
    }

    /// Keep what the receiver has not answered within bounds before one
    /// more entry: at most `MAX_OPEN_DIRS` directories (the protocol's
    /// limit: the receiver holds each open) and `MAX_UNANSWERED` entries in
    /// all (ours: we remember each). At a bound, send every file we may,
    /// then wait for outcomes. A receiver answers everything then but the
    /// directories our walk is still inside, which are fewer than either
    /// bound (see `MAX_OPEN_DIRS`), so the wait ends.
    fn wait_for_room(&mut self, is_dir: bool) -> Result<(), EngineError> {
        let full = |s: &InboxState| {
            s.unanswered.len() >= MAX_UNANSWERED
                || s.name_bytes >= MAX_UNANSWERED_NAME_BYTES
                || (is_dir && s.unanswered_dirs >= MAX_OPEN_DIRS)
        };
        if !full(&self.inbox.lock()) {
            return Ok(());
        }
        self.send_planned(true)?;
        self.flush()?;
        let walking = self.dirs_open.len();
        tracing::debug!(walking, "waiting for the receiver to answer entries");
        // Until well below every bound, so that the next wait is far off;
        // or down to what only our walk holds.
        self.inbox.wait_until(|s| {
            let roomy = s.unanswered.len() <= MAX_UNANSWERED / 2
                && s.name_bytes <= MAX_UNANSWERED_NAME_BYTES / 2
                && s.unanswered_dirs <= MAX_OPEN_DIRS / 2;
            roomy || s.unanswered.len() <= walking
        })
    }

    /// File `id` no longer waits for its plan: a `have` for it from now on
    /// is ignored.
    fn planned(&self, id: u64) {
        if let Some(e) = self.inbox.lock().unanswered.get_mut(&id) {
            e.awaiting_plan = false;
        }
    }

    /// Give up on file or directory `id`; `transient` when sending it
    /// again later may work (it changed while being read).
    fn abort(&mut self, id: u64, why: String, transient: bool) -> Result<(), EngineError> {
        self.send(&Message::Abort {
            id,
            reason: why,
            transient,
        })
    }

    /// Take in what the receiver has said so far; with `wait`, wait for
    /// at least one word of it first.
    fn absorb_plans(&mut self, wait: bool) -> Result<(), EngineError> {
        let news = self.inbox.take_news(wait)?;
        // Queued ids increase: a binary search, not a scan per answer.
        let queue = &self.queue;
        let queued = |id: u64| queue.binary_search_by_key(&id, |q| q.id).is_ok();
        // Before `through`: a receiver sends a file's `have` before the
        // `planned` that covers it, and both may be in this news.
        for (id, runs) in news.have {
            if queued(id) && id > self.plan_through {
                self.have.insert(id, runs);
            }
        }
        self.plan_through = self.plan_through.max(news.through);
        self.settled_early
            .extend(news.settled.into_iter().filter(|&id| queued(id)));
        self.fresh.extend(news.fresh);
        Ok(())
    }

    /// Send the data of every queued file whose plan has come. With
    /// `drain`, wait for the plans of all of them; otherwise wait only when
    /// the walk is as far ahead of the data as the protocol allows.
    fn send_planned(&mut self, drain: bool) -> Result<(), EngineError> {
        loop {
            self.absorb_plans(false)?;
            let Some(front) = self.queue.front() else {
                return Ok(());
            };
            let id = front.id;
            if let Some(i) = self.settled_early.iter().position(|&s| s == id) {
                self.settled_early.swap_remove(i);
                self.queue.pop_front();
                continue;
            }
            let under_fresh = front.ancestors.iter().any(|d| self.fresh.contains(d));
            if id <= self.plan_through || under_fresh {
                if let Some(file) = self.queue.pop_front() {
                    self.planned(id);
                    self.send_file(file)?;
                }
                continue;
            }
            if !drain && (self.queue.len() as u64) < MAX_FILES_AHEAD {
                return Ok(());
            }
            // The receiver plans what it has seen: show it our entries.
            self.flush()?;
            self.absorb_plans(true)?;
        }
    }

    fn dir(&mut self, dir: OwnedFd, path: &WirePath, stat: &Stat) -> Result<(), EngineError> {
        let kind = EntryKind::Dir {
            mode: fsx::mode_of(stat),
            mtime: fsx::mtime_of(stat),
        };
        let id = self.entry(path, kind, Some(stat))?;
        if id == 1 {
            // The transfer's root goes out at once: if the receiver answers
            // `fresh`, the files below it go without waiting for plans, and
            // the walk need not fill a whole window of entries first.
            self.flush()?;
        }
        self.dirs_open.push(id);
        self.ancestors = None;
        let listed = match fsx::list_dir(dir.as_fd()) {
            Ok(entries) => entries
                .into_iter()
                .try_for_each(|(name, recorded_type)| self.child(&dir, path, &name, recorded_type)),
            Err(e) => self.abort(id, format!("cannot list directory: {}", reason(&e)), false),
        };
        self.dirs_open.pop();
        self.ancestors = None;
        listed?;
        self.send(&Message::DirEnd { id })
    }

    fn child(
        &mut self,
        dir: &OwnedFd,
        parent: &WirePath,
        name: &[u8],
        recorded_type: FileType,
    ) -> Result<(), EngineError> {
        let path = match parent.join(name) {
            Ok(p) => p,
            Err(e) => {
                // Only a name too long for the wire gets here; say so and go on.
                self.tally.event(Event::FileFailed {
                    path: format!("{}/{}", display_name(&self.label, parent), escape(name)),
                    reason: e.to_string(),
                });
                return Ok(());
            }
        };
        // Most entries are regular files: open and fstat them directly. Any
        // surprise (gone, changed type, unreadable) takes the careful path.
        if recorded_type == FileType::RegularFile
            && let Ok((file, stat)) = fsx::open_regular(dir.as_fd(), name)
        {
            return self.file(&path, Ok(file), &stat);
        }
        let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => s,
            // Deleted since the listing: like rsync, treat it as never there.
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => {
                self.tally.event(Event::FileFailed {
                    path: display_name(&self.label, &path),
                    reason: reason(&e.into()),
                });
                return Ok(());
            }
        };
        match fsx::kind_of(&stat) {
            Kind::Dir => match fsx::open_subdir(dir.as_fd(), name) {
                Ok(fd) => self.dir(fd, &path, &stat),
                Err(e) => {
                    let kind = EntryKind::Dir {
                        mode: fsx::mode_of(&stat),
                        mtime: fsx::mtime_of(&stat),
                    };
                    let id = self.entry(&path, kind, Some(&stat))?;
                    self.abort(id, format!("cannot open directory: {}", reason(&e)), false)?;
                    self.send(&Message::DirEnd { id })
                }
            },
            Kind::File => {
                let opened = fsx::open_regular(dir.as_fd(), name).map(|(f, _)| f);
                self.file(&path, opened, &stat)
            }
            Kind::Symlink => match rustix::fs::readlinkat(dir, name, Vec::new()) {
                Ok(target) => self.symlink(&path, target.into_bytes(), &stat),
                Err(e) => {
                    self.tally.event(Event::FileFailed {
                        path: display_name(&self.label, &path),
                        reason: reason(&e.into()),
                    });
                    Ok(())
                }
            },
            Kind::Node => self.node(&path, &stat),
            Kind::Special(what) => self.special(&path, what),
        }
    }

    /// Announce a file; its data follows once the receiver has planned it.
    fn file(
        &mut self,
        path: &WirePath,
        opened: std::io::Result<File>,
        stat: &Stat,
    ) -> Result<(), EngineError> {
        let size = stat.st_size as u64;
        let mtime = fsx::mtime_of(stat);
        // Another name of a file sent already goes as a link to it.
        let inode = (stat.st_nlink > 1).then_some((stat.st_dev, stat.st_ino));
        if let Some((first, target)) = inode.and_then(|key| self.linked.get(&key)) {
            let kind = EntryKind::Hardlink {
                first: *first,
                target: target.clone(),
            };
            return self.entry(path, kind, None).map(drop);
        }
        let kind = EntryKind::File {
            size,
            mode: fsx::mode_of(stat),
            mtime,
        };
        let id = self.entry(path, kind, Some(stat))?;
        if let Some(key) = inode
            && opened.is_ok()
            && self.linked.len() < MAX_LINKED_FILES
        {
            self.linked.insert(key, (id, path.to_wire()));
        }
        match opened {
            Ok(file) => {
                let ancestors = self
                    .ancestors
                    .get_or_insert_with(|| Arc::from(self.dirs_open.as_slice()))
                    .clone();
                self.queue.push_back(QueuedFile {
                    id,
                    ancestors,
                    display: display_name(&self.label, path),
                    file,
                    size,
                    mtime,
                    sparse: fsx::may_have_holes(stat),
                });
                Ok(())
            }
            Err(e) => {
                self.planned(id);
                self.abort(id, reason(&e), false)
            }
        }
    }

    /// Send a planned file: the chunks the receiver does not hold, then
    /// the digest over all of them.
    fn send_file(&mut self, q: QueuedFile) -> Result<(), EngineError> {
        let held = self.have.remove(&q.id).unwrap_or_default();
        let held = check_held(&held, q.size)?;
        self.tally.event(Event::FileStarted {
            path: q.display.clone(),
            size: q.size,
        });
        let held_bytes: u64 = held.iter().map(|&(_, len, n)| u64::from(len) * n).sum();
        if held_bytes > 0 {
            self.tally.event(Event::Resumed {
                path: q.display.clone(),
                bytes: held_bytes,
            });
        }
        let mut digest = DigestBuilder::new(q.size);
        // A file of one chunk travels inline with the control messages;
        // the chunks of a larger one go to whichever connection is free,
        // once the entry is on its way (the receiver parks a chunk that
        // overtakes it).
        let spread = q.size > u64::from(DEFAULT_CHUNK_LEN);
        if spread {
            self.flush()?;
        }
        let mut offset = 0;
        let mut last_sign = Instant::now();
        for &(start, len, count) in &held {
            if let Err((why, transient)) =
                self.send_range(&q, offset, start, spread, &mut digest)?
            {
                return self.abort(q.id, why, transient);
            }
            for k in 0..count {
                let at = start + k * u64::from(len);
                match self.read_chunk(&q.file, at, len as usize) {
                    Ok(raw) => digest.push(ferry_proto::digest::chunk_hash(raw)),
                    Err((why, transient)) => return self.abort(q.id, why, transient),
                }
                if last_sign.elapsed() >= KEEPALIVE_EVERY {
                    last_sign = Instant::now();
                    self.send(&Message::Keepalive)?;
                    self.flush()?;
                }
            }
            offset = start + count * u64::from(len);
        }
        if let Err((why, transient)) = self.send_range(&q, offset, q.size, spread, &mut digest)? {
            return self.abort(q.id, why, transient);
        }
        // A file rewritten while we read it would arrive as a mix of old
        // and new bytes: refuse to let it be committed. Sending it again
        // later may catch it at rest.
        match rustix::fs::fstat(&q.file) {
            Ok(after) if after.st_size as u64 == q.size && fsx::mtime_of(&after) == q.mtime => {}
            Ok(_) => {
                let why = "the file changed while it was being sent".to_string();
                return self.abort(q.id, why, true);
            }
            Err(e) => return self.abort(q.id, reason(&e.into()), false),
        }
        self.send(&Message::FileEnd {
            id: q.id,
            digest: digest.finish().to_hex(),
        })
    }

    /// Send the bytes `[from, to)` of a file as chunks. The inner error is
    /// why the file cannot be sent, and whether that may pass.
    fn send_range(
        &mut self,
        q: &QueuedFile,
        from: u64,
        to: u64,
        spread: bool,
        digest: &mut DigestBuilder,
    ) -> Result<Result<(), (String, bool)>, EngineError> {
        let mut offset = from;
        while offset < to {
            let len = (to - offset).min(u64::from(DEFAULT_CHUNK_LEN)) as usize;
            // A full chunk in a hole goes as a header: nothing to read,
            // hash or write, and the copy stays sparse.
            if q.sparse
                && len == DEFAULT_CHUNK_LEN as usize
                && fsx::is_hole(q.file.as_fd(), offset, len as u64)
            {
                let hash = if spread {
                    let mut frame = [0; DATA_PREFIX_LEN];
                    let (hash, _) = self.encoder.encode_zeros(q.id, offset, &mut frame);
                    self.send_data(Bytes::copy_from_slice(&frame))?;
                    hash
                } else {
                    let start = self.batch.len();
                    self.batch.resize(start + DATA_PREFIX_LEN, 0);
                    let (hash, _) =
                        self.encoder
                            .encode_zeros(q.id, offset, &mut self.batch[start..]);
                    self.maybe_flush()?;
                    hash
                };
                digest.push(hash);
                self.tally.event(Event::Bytes { n: len as u64 });
                offset += len as u64;
                continue;
            }
            // The bytes are read straight into their frame, behind room for
            // its headers: a copy of every byte sent costs as much as the
            // read itself.
            if spread {
                let mut frame = self.frame_pool.take(DATA_PREFIX_LEN + len);
                if let Err(e) =
                    read_exact_at(&q.file, &mut frame.buf[DATA_PREFIX_LEN..frame.len], offset)
                {
                    return Ok(Err(e));
                }
                let (hash, frame_len) =
                    self.encoder
                        .encode_in_place(q.id, offset, &mut frame.buf[..frame.len]);
                frame.len = frame_len;
                digest.push(hash);
                self.send_data(Bytes::from_owner(frame))?;
            } else {
                let start = self.batch.len();
                self.batch.resize(start + DATA_PREFIX_LEN + len, 0);
                if let Err(e) =
                    read_exact_at(&q.file, &mut self.batch[start + DATA_PREFIX_LEN..], offset)
                {
                    self.batch.truncate(start);
                    return Ok(Err(e));
                }
                let (hash, frame_len) =
                    self.encoder
                        .encode_in_place(q.id, offset, &mut self.batch[start..]);
                self.batch.truncate(start + frame_len);
                digest.push(hash);
                self.maybe_flush()?;
            }
            self.adapt(len as u64)?;
            self.tally.event(Event::Bytes { n: len as u64 });
            offset += len as u64;
        }
        Ok(Ok(()))
    }

    /// Read `len` bytes at `offset` into the read buffer.
    fn read_chunk(
        &mut self,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Result<&[u8], (String, bool)> {
        if self.read_buf.len() < len {
            self.read_buf.resize(len, 0);
        }
        let buf = &mut self.read_buf[..len];
        read_exact_at(file, buf, offset)?;
        Ok(buf)
    }

    fn symlink(
        &mut self,
        path: &WirePath,
        target: Vec<u8>,
        stat: &Stat,
    ) -> Result<(), EngineError> {
        let kind = EntryKind::Symlink {
            target: ferry_proto::path::WireBytes(target),
            mtime: fsx::mtime_of(stat),
        };
        self.entry(path, kind, Some(stat)).map(drop)
    }

    /// A fifo or a device node, announced with what the receiver needs to
    /// make one like it.
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

    /// A socket or a type ferry does not know: only announced, so that the
    /// receiver reports it skipped.
    fn special(&mut self, path: &WirePath, what: &'static str) -> Result<(), EngineError> {
        let kind = EntryKind::Special {
            what: what.to_string(),
        };
        self.entry(path, kind, None).map(drop)
    }
}

/// Check the receiver's list of held chunks against the file: runs in
/// increasing order, disjoint, inside the file, of valid chunk lengths.
/// Anything else is a protocol error: the receiver trusts nothing we send,
/// and we trust nothing it says.
fn check_held(runs: &[(u64, u32, u64)], size: u64) -> Result<Vec<(u64, u32, u64)>, EngineError> {
    if runs.len() > MAX_HAVE_RUNS {
        return Err(EngineError::Protocol(format!(
            "the receiver listed {} runs of held chunks, more than {MAX_HAVE_RUNS}",
            runs.len()
        )));
    }
    let mut end = 0u64;
    for &(start, len, count) in runs {
        let span = u64::from(len).checked_mul(count);
        let stop = span.and_then(|span| start.checked_add(span));
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
                return Err(EngineError::Protocol(format!(
                    "the receiver claims chunks it cannot hold: [{start}, {len}, {count}] of a {size}-byte file"
                )));
            }
        }
    }
    Ok(runs.to_vec())
}

/// Count the files (and symlinks) and bytes below a root on a thread of its
/// own, so progress can show totals without holding back the first byte.
fn count_in_background(root: &Root) -> Result<std::sync::mpsc::Receiver<(u64, u64)>, EngineError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let known = match root {
        Root::Dir(..) => None,
        Root::File(_, stat) => Some((1, stat.st_size as u64)),
        Root::Symlink(..) | Root::Node(_) => Some((1, 0)),
        Root::Special(_) => Some((0, 0)),
    };
    if let Some(totals) = known {
        let _ = tx.send(totals);
        return Ok(rx);
    }
    let Root::Dir(fd, _) = root else {
        return Ok(rx);
    };
    let dir = fsx::open_dir_beneath(fd.as_fd(), &[])?;
    std::thread::Builder::new()
        .name("ferry-count".into())
        .stack_size(16 * 1024 * 1024)
        .spawn(move || {
            let _ = tx.send(count(&dir));
        })?;
    Ok(rx)
}

/// Count the files (and symlinks) and bytes below a directory. Only stats,
/// no reads: cheap next to the transfer itself. The bytes of a file with
/// several names count once, as they are sent once (up to as many such
/// files as the walk remembers).
fn count(root: &OwnedFd) -> (u64, u64) {
    type Seen = HashSet<(u64, u64)>;
    fn walk(dir: &OwnedFd, totals: &mut (u64, u64), seen: &mut Seen) {
        let Ok(entries) = fsx::list_dir(dir.as_fd()) else {
            return;
        };
        for (name, _) in entries {
            let Ok(stat) = rustix::fs::statat(dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            match fsx::kind_of(&stat) {
                Kind::File => {
                    totals.0 += 1;
                    let again = stat.st_nlink > 1
                        && seen.len() < MAX_LINKED_FILES
                        && !seen.insert((stat.st_dev, stat.st_ino));
                    if !again {
                        totals.1 += stat.st_size as u64;
                    }
                }
                Kind::Symlink | Kind::Node => totals.0 += 1,
                Kind::Dir => {
                    if let Ok(fd) = fsx::open_subdir(dir.as_fd(), &name) {
                        walk(&fd, totals, seen);
                    }
                }
                Kind::Special(_) => {}
            }
        }
    }
    let mut totals = (0, 0);
    walk(root, &mut totals, &mut Seen::new());
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_takes_a_file_with_several_names_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        std::fs::write(tmp.path().join("a"), [1; 1000]).unwrap();
        std::fs::hard_link(tmp.path().join("a"), tmp.path().join("sub/b")).unwrap();
        std::fs::write(tmp.path().join("c"), [2; 10]).unwrap();
        let root = fsx::open_local_root(tmp.path()).unwrap();
        let Root::Dir(fd, _) = root else {
            panic!("not a directory")
        };
        // Three names, and the bytes the transfer sends: 1000 once, 10.
        assert_eq!(count(&fd), (3, 1010));
    }

    #[test]
    fn the_count_takes_fifos_which_are_made_and_not_sockets_which_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(tmp.path().join("socket")).unwrap();
        let Root::Dir(fd, _) = fsx::open_local_root(tmp.path()).unwrap() else {
            panic!("not a directory")
        };
        assert_eq!(count(&fd), (1, 0));
        // The same holds for a fifo named as the root.
        let root = fsx::open_local_root(&fifo).unwrap();
        assert!(matches!(root, Root::Node(_)));
        assert_eq!(count_in_background(&root).unwrap().recv().unwrap(), (1, 0));
    }

    fn inbox_with(entries: &[(u64, bool)]) -> InboxState {
        let mut state = InboxState::default();
        for &(id, is_dir) in entries {
            let entry = Unanswered {
                path: format!("entry {id}"),
                size: 0,
                is_dir,
                awaiting_plan: !is_dir,
            };
            state.name_bytes += entry.path.len();
            state.unanswered_dirs += usize::from(is_dir);
            state.unanswered.insert(id, entry);
            state.announced = id;
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
        state.unanswered.get_mut(&2).unwrap().awaiting_plan = false;
        state
            .take_in(Message::Have {
                id: 2,
                chunks: vec![(0, 1024, 1)],
            })
            .unwrap();
        state.take_in(Message::Fresh { id: 2 }).unwrap();
        assert!(state.news.is_empty());
    }
}
