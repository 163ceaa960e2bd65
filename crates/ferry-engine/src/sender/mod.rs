//! The sending side of a transfer, the same for uploads and downloads.
//!
//! A producer thread walks the tree, reads each file in chunks, hashes and
//! compresses them (the chunks of large files on lanes, one thread per
//! core) and hands finished frames to the connections through bounded
//! queues; the async side writes those frames and reads the
//! receiver's replies. Memory is bounded by the queues, whatever the size
//! of the files or the tree, and by the entries the receiver has not
//! answered yet.
//!
//! - [`rules`]: what the sender decides, over messages and metadata alone:
//!   what a reply means, when the walk waits, which file goes next.
//! - [`walk`]: the one walk of a tree, over directory handles.
//! - [`producer`]: the thread that walks, announces and sends, carrying
//!   out the rules; [`count`]: the walk that counts totals ahead.
//! - [`frames`]: chunks read into frames, and frames into the queues;
//!   [`lanes`]: the threads that compress the chunks of large files.
//! - Here: the async driver, and the [`Inbox`] where the receiver's replies
//!   meet the producer.

mod count;
mod frames;
mod lanes;
mod producer;
mod rules;
mod signatures;
mod walk;

pub(crate) use lanes::count as lane_count;
pub(crate) use walk::gitignore_of;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::Bytes;
use ferry_proto::frame::Frame;
use ferry_proto::message::{Compression, Message};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::frames::{Chunks, Output};
use self::producer::Producer;
use self::rules::{InboxState, News};
use crate::conn::{
    DataConn, FrameReader, FrameWriter, for_each_data_conn, pump_control, pump_data,
};
use crate::error::{EngineError, PeerFailure, Side, Violation};
use crate::events::{Event, EventSink, Origin, Tally, peer_text};
use crate::filter::Filter;
use crate::fsx::Root;
use ferry_proto::path::escape;

/// Batches of control frames the producer may run ahead of the socket.
const FRAME_QUEUE: usize = 8;
/// How long a failing session waits to tell the peer why: the connection
/// may be what failed.
const TELL_PEER_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// Data frames (chunks of files larger than one chunk) waiting for any
/// connection of the session to take them: with 1 MiB chunks, the bound on
/// the sender's memory beyond the socket buffers.
const DATA_QUEUE: usize = 16;

/// What to send.
pub(crate) struct SendJob {
    pub(crate) root: Root,
    pub(crate) compression: Compression,
    /// Whether the receiver is on this host (a loopback connection): there
    /// the link is memory, faster than any compressor, so `auto` starts
    /// off instead of spending a warm-up and a probe to find that out.
    pub(crate) local_peer: bool,
    /// Threads that compress the chunks of large files (see [`lanes`]); 0:
    /// the producer compresses them itself.
    pub(crate) lanes: u32,
    /// How the root is named in events and messages.
    pub(crate) label: String,
    /// Count the tree up front (on a thread of its own) so that progress
    /// can show totals from the start. Without it, the totals are counted
    /// during the walk and sent just before `end`.
    pub(crate) early_totals: bool,
    /// Send each entry's owner, for a receiver that applies them.
    pub(crate) owners: bool,
    /// What is left out of the tree.
    pub(crate) filter: Filter,
    /// `--bwlimit`: bytes per second, all connections together.
    pub(crate) bwlimit: Option<u64>,
    /// The receiver was asked to mirror (`--delete`): it tells of its
    /// deletions before `done`. With `itemize`, it tells what each entry
    /// changes. Both name the destination so (its changes are shown
    /// under that name, not the source's).
    pub(crate) mirror: bool,
    pub(crate) itemize: bool,
    /// The receiver publishes atomically: it says whether it did.
    pub(crate) atomic: bool,
    /// Announce each file with its digest (`--checksum`).
    pub(crate) checksum: bool,
    pub(crate) dest_label: String,
}

/// What passes from the reader of the receiver's replies to the producer
/// (see [`InboxState`]), and the signal that something did.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    /// Signalled when something comes in, and when the reader stops.
    changed: Condvar,
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
            self.wait_until(InboxState::has_news)?;
        }
        Ok(self.lock().take_news())
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

/// A producer running on its own thread, and the ends of its queues:
/// what [`run_sender`] drives over sockets, and what the in-memory
/// sessions drive by hand.
pub(crate) struct Started {
    /// Ordered frames, for the control connection.
    pub(crate) control: mpsc::Receiver<Bytes>,
    /// Chunks of large files, for whichever connection is free.
    pub(crate) data: async_channel::Receiver<Bytes>,
    /// Where the receiver's replies go in.
    pub(crate) replies: Replies,
    /// The producer's verdict, once it has finished.
    pub(crate) done: oneshot::Receiver<Result<(), EngineError>>,
}

/// Start the producer for `job`, sending to the side `peer`.
pub(crate) fn start(job: SendJob, tally: Arc<Tally>, peer: Side) -> Result<Started, EngineError> {
    let (control_tx, control) = mpsc::channel::<Bytes>(FRAME_QUEUE);
    let (data_tx, data) = async_channel::bounded::<Bytes>(DATA_QUEUE);
    let inbox = Arc::new(Inbox::default());
    let (done_tx, done) = oneshot::channel();
    let replies = Replies {
        inbox: inbox.clone(),
        peer,
        mirror: job.mirror,
        itemize: job.itemize,
        atomic: job.atomic,
        labels: (job.label.clone(), job.dest_label.clone()),
    };
    let chunks = Chunks::new(job.compression, job.local_peer, tally.clone())?;
    let lanes = match job.compression {
        Compression::Off => 0,
        _ => job.lanes,
    };
    let output = Output::new(control_tx, data_tx, job.bwlimit).with_lanes(lanes, chunks.level())?;
    let producer = Producer::new(
        output,
        chunks,
        inbox.clone(),
        tally,
        job.label,
        job.owners,
        job.filter,
    )
    .checksumming(job.checksum);
    // A thread of its own (not the blocking pool): it does blocking file
    // I/O for the whole transfer, and recursion needs a roomy stack.
    std::thread::Builder::new()
        .name("ferry-send".into())
        .stack_size(16 * 1024 * 1024)
        .spawn(move || {
            let _ = done_tx.send(producer.run(job.root, job.early_totals));
        })
        .map_err(EngineError::from)?;
    Ok(Started {
        control,
        data,
        replies,
        done,
    })
}

/// The producer's side of the receiver's replies.
pub(crate) struct Replies {
    inbox: Arc<Inbox>,
    /// The receiver's side: who speaks in an `error` among the replies.
    peer: Side,
    /// The receiver mirrors: it tells of its deletions.
    mirror: bool,
    /// The receiver tells what each entry changes.
    itemize: bool,
    /// The receiver publishes atomically.
    atomic: bool,
    /// How the root of the transfer is named in the sender's events, and
    /// in the destination (where changes and deletions happen).
    labels: (String, String),
}

impl Replies {
    /// Take in what the receiver said, under one lock and one wake-up (on
    /// small files that is hundreds of outcomes); true once it said `done`.
    /// The events go to `tally` after the lock is released: the sink may
    /// take its time.
    pub(crate) fn take_replies(
        &self,
        replies: impl IntoIterator<Item = Message>,
        tally: &Tally,
    ) -> Result<bool, EngineError> {
        let mut events = Vec::new();
        let mut done = false;
        {
            let mut state = self.inbox.lock();
            for msg in replies {
                match msg {
                    Message::Done => {
                        done = true;
                        break;
                    }
                    // It may be checking the journal of a file we sent.
                    Message::Keepalive => tally.kept_alive(state.peer_work(self.mirror)),
                    Message::Changes { id, what } if self.itemize => {
                        let (from, to) = &self.labels;
                        events.push(state.changed(id, what, (from, to))?);
                    }
                    Message::Published {
                        published,
                        previous_kept,
                        reason,
                        snapshot,
                    } if self.atomic => events.push(Event::Published {
                        path: match snapshot {
                            Some(name) => format!("{}/{}", self.labels.1, escape(name.as_bytes())),
                            None => self.labels.1.clone(),
                        },
                        previous: previous_kept,
                        refused: match published {
                            true => None,
                            false => Some(peer_text(&reason.unwrap_or_default())),
                        },
                    }),
                    msg @ (Message::Deleted { .. } | Message::Deletions { .. }) if self.mirror => {
                        events.extend(rules::deletion_event(&self.labels.1, msg)?);
                    }
                    Message::Outcome { .. } => {
                        tally.settled();
                        let labels = (self.labels.0.as_str(), self.labels.1.as_str());
                        // The receiver's failure is named where it happened.
                        let named = |e: Event| e.named_for(Origin::Peer, labels);
                        events.extend(state.take_in(msg)?.map(named));
                    }
                    Message::Error {
                        code,
                        message,
                        path,
                    } => {
                        let failure =
                            PeerFailure::received(self.peer, code, &message, path.as_ref());
                        return Err(EngineError::Remote(failure));
                    }
                    msg => events.extend(state.take_in(msg)?),
                }
            }
        }
        self.inbox.changed.notify_all();
        for event in events {
            tally.event(event);
        }
        Ok(done)
    }

    /// Nothing more will come from the receiver: a producer waiting for
    /// its word learns so.
    pub(crate) fn close(&self) {
        self.inbox.close();
    }
}

/// Run the sending side over an established session.
///
/// The control connection carries the ordered messages (and data when it
/// is free); the data connections that arrive on `joins` share the chunks
/// of large files. `accepted` reads what comes before the receiver's
/// replies: a client that sent its request with its hello starts sending
/// at once, and reads the server's `welcome` and `ready` meanwhile
/// (PROTOCOL.md §8.1); a refusal there ends the transfer.
pub(crate) async fn run_sender<R, W>(
    (reader, writer): (&mut FrameReader<R>, &mut FrameWriter<W>),
    job: SendJob,
    tally: Arc<Tally>,
    cancel: &CancellationToken,
    (accepted, mut joins): (Option<BeforeReplies<R>>, mpsc::Receiver<DataConn>),
) -> Result<(), EngineError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Started {
        mut control,
        data: data_rx,
        replies,
        mut done,
    } = start(job, tally.clone(), reader.peer())?;
    let _close_inbox = CloseOnDrop(replies.inbox.clone());
    let mut produced = None;
    {
        // The transfer is over when the receiver says so; the writers only
        // matter if they fail (then the session cannot complete).
        let write = async {
            if let Err(e) = pump_control(writer, &mut control, &data_rx, &tally).await {
                // A receiver that closes with a word (a request refused
                // while its transfer was already on the way) breaks our
                // writes first: give the reader the time to find the word.
                tokio::time::sleep(WORD_BEFORE_BREAK).await;
                return Err(e);
            }
            std::future::pending::<Result<(), EngineError>>().await
        };
        let data_writers = for_each_data_conn(&mut joins, |conn| {
            pump_data(conn, data_rx.clone(), tally.clone())
        });
        // A producer that finished has sent everything; one that failed
        // (a file system error, a receiver breaking the rules) ends the
        // session at once, not after the stall timeout.
        let producer = async {
            match (&mut done).await.unwrap_or(Err(EngineError::Closed)) {
                Err(e) => e,
                Ok(()) => {
                    produced = Some(Ok(()));
                    std::future::pending().await
                }
            }
        };
        let read = async {
            if let Some(accepted) = accepted {
                accepted(reader).await?;
            }
            read_outcomes(reader, &replies, &tally).await
        };
        let ended = tokio::select! {
            r = read => r,
            r = write => r,
            e = data_writers => Err(e),
            e = producer => Err(e),
            _ = cancel.cancelled() => Err(EngineError::Cancelled),
        };
        if let Err(e) = ended {
            return Err(tell_peer(writer, e).await);
        }
    }
    // The receiver is done: a producer still waiting for its word (only
    // after a `done` that came too early) must not wait forever.
    replies.close();
    drop(control);
    match produced {
        Some(result) => result,
        None => done.await.unwrap_or(Err(EngineError::Closed)),
    }
}

/// How long a failed write waits for the reader to report why the
/// receiver closed.
const WORD_BEFORE_BREAK: std::time::Duration = std::time::Duration::from_secs(1);

/// What a sender reads before the receiver's replies (see [`run_sender`]).
pub(crate) type BeforeReplies<R> = Box<
    dyn for<'a> FnOnce(
            &'a mut FrameReader<R>,
        ) -> std::pin::Pin<
            Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>,
        > + Send,
>;

/// A session this side ends (a receiver breaking the rules, a local
/// failure): the receiver is told why, as the receiver tells the sender.
async fn tell_peer<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    e: EngineError,
) -> EngineError {
    if e.is_for_the_peer() {
        let why = Message::error(e.code(), e.to_string());
        let told = tokio::time::timeout(TELL_PEER_WITHIN, writer.send_now(&why));
        let _ = told.await;
    }
    e
}

/// Read the receiver's verdicts until it says the transfer is done.
async fn read_outcomes<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    inbox: &Replies,
    tally: &Tally,
) -> Result<(), EngineError> {
    loop {
        // Everything one read brought.
        let mut replies = vec![reader.message().await?];
        while let Some(frame) = reader.buffered()? {
            match frame {
                Frame::Control(msg) => replies.push(msg),
                Frame::Data(_) => return Err(Violation::UnexpectedData.into()),
            }
        }
        if inbox.take_replies(replies, tally)? {
            return Ok(());
        }
    }
}
