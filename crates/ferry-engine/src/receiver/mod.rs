//! The receiving side of a transfer, the same for uploads and downloads.
//!
//! Three parts, each with one job:
//! - this module, the async side: it reads frames from every connection of
//!   the session, hands them to the worker, and writes the worker's
//!   replies;
//! - `worker`: one thread that owns all file-system work, taking frames
//!   in order and answering them;
//! - `rules`: what the worker decides (pure: no file system, no sockets),
//!   and `place`: how it carries that out on the file system.
//!
//! Every path is validated and resolved below the destination without
//! following symlinks; verified chunks go into a hidden `.NAME.ferry-part`
//! sibling that is renamed into place only once the whole-file digest
//! matches. No half file is ever visible. (A small file in a directory
//! this transfer made is written to an unnamed file instead, linked into
//! place once it verifies: see [`crate::fsx::open_unnamed_part`].)
//!
//! Before any data of a file is sent, the receiver plans it: a regular
//! file of the same size and mtime is left alone (`unchanged`); a part
//! file left by an interrupted transfer, with a journal of verified chunks
//! (files of [`rules::JOURNAL_MIN_SIZE`] or more), is resumed: the sender
//! learns which chunks are held (`have`) and sends only the rest.
//! Everything else is sent whole (`planned`). When a transfer breaks off,
//! journaled part files stay for the next attempt; other part files are
//! removed.
//!
//! With several connections, frames of one file arrive in no fixed order:
//! a chunk may overtake its `entry` (it is parked, within a bound), a
//! `file_end` may overtake the last chunks (the file is committed when they
//! arrive), and a `dir_end` may come while files below are still open (the
//! directory's metadata waits until every child is settled).

mod basis;
mod deletions;
mod itemize;
mod mirror;
mod place;
mod preview;
mod prune;
pub(crate) mod publish;
pub(crate) mod rules;
mod worker;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_proto::frame::Frame;
use ferry_proto::message::Message;
use ferry_proto::path::WirePath;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub(crate) use prune::Pruning;
pub(crate) use worker::Worker;

use crate::budget::SessionBudget;
use crate::codec::ReadChunk;
use crate::conn::{DataConn, FrameReader, FrameWriter, for_each_data_conn};
use crate::error::{EngineError, PeerFailure, Role, Side, Violation};
use crate::events::{Event, EventSink, Tally, display_name};

/// Batches of frames the readers may queue ahead of the worker.
const FRAME_QUEUE: usize = 16;
/// Batches of replies the worker may queue ahead of the writer.
const REPLY_QUEUE: usize = 64;

/// Where a transfer lands: `prefix` (one or more components) below the
/// directory `base`. Entry paths from the sender are appended to `prefix`.
pub(crate) struct Destination {
    pub(crate) base: OwnedFd,
    pub(crate) prefix: Vec<Vec<u8>>,
    /// How the root is named in events and messages.
    pub(crate) label: String,
    /// How the destination itself is named where what changes in it is
    /// shown (`--itemize`, `--delete`): for a download, the local path.
    pub(crate) dest_label: String,
    /// The source's own name, under which a root that is not a directory
    /// goes inside the destination if that is a directory already
    /// (`rules::root_goes_inside`); taken when the first entry arrives.
    /// `None`: the root becomes the destination, whatever is there.
    pub(crate) inside: Option<Vec<u8>>,
    /// Receive every file, even one already here with the same size and
    /// mtime.
    pub(crate) ignore_times: bool,
    /// Apply the owners that entries carry (this process is root).
    pub(crate) owners: bool,
    /// Make the device nodes that entries describe (this process is root
    /// and the user allowed it).
    pub(crate) devices: bool,
    /// What the session may take of its server's descriptors and memory.
    pub(crate) budget: SessionBudget,
    /// `--delete`: once everything is in place, delete what the source
    /// does not have.
    pub(crate) pruning: Option<Pruning>,
    /// Judge what placing each entry changes: an event here and, when
    /// `tell_sender`, a `changes` to the sender.
    pub(crate) itemize: bool,
    /// The user is at the sender (an upload): what changes is told to it.
    pub(crate) tell_sender: bool,
    /// Change nothing; tell what would change.
    pub(crate) dry_run: bool,
    /// `ferry ls` (with `dry_run`): each entry is only listed, and nothing
    /// here is looked at.
    pub(crate) listing: bool,
    /// `--checksum`: a file is unchanged when its content is (the entry's
    /// digest against this side's), whatever its mtime.
    pub(crate) checksum: bool,
    /// `--link-dest` trees (an atomic publish's live tree first): a file
    /// one of them has unchanged is hard-linked from it, not sent.
    pub(crate) link_dests: Vec<LinkDest>,
    /// Describe the version held of a changed file (in the destination,
    /// or a `--link-dest` tree) in a `signature`, so that only what
    /// differs is sent.
    pub(crate) delta: bool,
    /// An append-only server's: nothing that exists is replaced (a file
    /// unchanged, a directory merged into, are fine).
    pub(crate) append_only: bool,
    /// `ferry backup`: after the publish, `latest` and the rotation.
    pub(crate) backup: Option<BackupPlan>,
    /// `--atomic`: the transfer lands in a staging directory (`prefix`)
    /// and is switched in for the live tree once it is whole.
    pub(crate) publish: Option<Publish>,
}

impl Destination {
    /// A destination `prefix` below `base`, named `label` (where what
    /// changes in it is shown too), received as plainly as can be: every
    /// option off, nothing told to the sender beyond outcomes, no budget.
    pub(crate) fn plain(base: OwnedFd, prefix: Vec<Vec<u8>>, label: String) -> Destination {
        Destination {
            base,
            prefix,
            dest_label: label.clone(),
            label,
            inside: None,
            ignore_times: false,
            owners: false,
            devices: false,
            budget: SessionBudget::unlimited(),
            pruning: None,
            itemize: false,
            tell_sender: false,
            dry_run: false,
            publish: None,
            checksum: false,
            listing: false,
            link_dests: Vec::new(),
            delta: false,
            backup: None,
            append_only: false,
        }
    }

    /// How a backup's directory is named in events: the snapshot's name
    /// without its last component.
    pub(crate) fn backup_label(&self) -> String {
        match self.dest_label.rsplit_once('/') {
            Some((dir, _)) => dir.to_string(),
            None => self.dest_label.clone(),
        }
    }
}

/// A backup's snapshot directory and what to keep of it.
pub(crate) struct BackupPlan {
    /// The backup directory's components below the base.
    pub(crate) dir: Vec<Vec<u8>>,
    pub(crate) keep: ferry_proto::message::Keep,
    /// The newest complete snapshot before this one (a `--link-dest`).
    pub(crate) newest: Option<ferry_proto::path::WireBytes>,
}

/// At most this many `--link-dest` trees, as rsync allows.
pub const MAX_LINK_DESTS: usize = 20;

/// A tree whose unchanged files are hard-linked rather than sent: `prefix`
/// below the directory `base`.
///
/// Entries arrive directory by directory, so the tree's root and the
/// directory last looked in are kept open: a linked file then costs no
/// lookup of its directory, only the stat of the quick check and the link.
pub(crate) struct LinkDest {
    base: OwnedFd,
    prefix: Vec<Vec<u8>>,
    /// The tree's root, opened at the first look; `None` inside if it is
    /// not there, and then it is not looked for again by this transfer (an
    /// atomic publish's first version, a backup's new snapshot, has no
    /// live tree: files missed so are sent, nothing worse).
    root: Option<MaybeDir>,
    /// The directory last looked in, by its path below the root, if it
    /// is there.
    last: Option<(Vec<Vec<u8>>, MaybeDir)>,
}

/// A directory of a `--link-dest` tree, open, or not there.
type MaybeDir = Option<Arc<OwnedFd>>;

impl LinkDest {
    /// The tree `prefix` below `base` (which it is confined to).
    pub(crate) fn new(base: OwnedFd, prefix: Vec<Vec<u8>>) -> LinkDest {
        LinkDest {
            base,
            prefix,
            root: None,
            last: None,
        }
    }

    /// The directory that holds `path` (relative to the root of the
    /// transfer) in this tree, opened below its base without following
    /// symlinks, and the entry's name there.
    pub(crate) fn open_parent<'p>(
        &mut self,
        path: &'p WirePath,
    ) -> Option<(Arc<OwnedFd>, &'p [u8])> {
        let components: Vec<&[u8]> = path.components().collect();
        let (name, parents) = components.split_last()?;
        if let Some((cached, dir)) = &self.last
            && cached.iter().map(Vec::as_slice).eq(parents.iter().copied())
        {
            return dir.clone().map(|dir| (dir, *name));
        }
        let root = self.root()?;
        let dir = match parents.is_empty() {
            true => Some(root),
            false => crate::fsx::open_dir_beneath(root.as_fd(), parents)
                .ok()
                .map(Arc::new),
        };
        let owned = parents.iter().map(|c| c.to_vec()).collect();
        self.last = Some((owned, dir.clone()));
        dir.map(|dir| (dir, *name))
    }

    /// The tree's root, open, if it is there.
    fn root(&mut self) -> Option<Arc<OwnedFd>> {
        let (base, prefix) = (&self.base, &self.prefix);
        self.root
            .get_or_insert_with(|| {
                let prefix: Vec<&[u8]> = prefix.iter().map(Vec::as_slice).collect();
                let root = crate::fsx::open_dir_beneath(base.as_fd(), &prefix);
                root.ok().map(Arc::new)
            })
            .clone()
    }
}

/// An atomic publish: the live tree is `name` in the directory `parent`
/// (components below the destination's base); the transfer lands in its
/// sibling `names::staging_name(name)`, unchanged files hard-linked from
/// the live tree, and the two are exchanged by one rename at the end.
pub(crate) struct Publish {
    pub(crate) parent: Vec<Vec<u8>>,
    pub(crate) name: Vec<u8>,
}

impl Publish {
    /// The publish of `components` (at least one): where its transfer
    /// lands instead, and the publish.
    pub(crate) fn of(components: &[Vec<u8>]) -> Option<(Vec<Vec<u8>>, Publish)> {
        let (name, parent) = components.split_last()?;
        let mut staging = parent.to_vec();
        staging.push(crate::names::staging_name(name));
        let publish = Publish {
            parent: parent.to_vec(),
            name: name.clone(),
        };
        Some((staging, publish))
    }

    /// The live tree's components.
    pub(crate) fn live(&self) -> Vec<Vec<u8>> {
        let mut live = self.parent.clone();
        live.push(self.name.clone());
        live
    }
}

/// Lets the worker hold the data connections' readers back.
#[derive(Default)]
pub(crate) struct DataGate {
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

/// A frame as the connections' readers pass it to the worker.
pub(crate) enum Inbound {
    Control(Message),
    Data(ReadChunk),
}

/// A frame as it is, with no charge (in-memory sessions).
#[cfg(test)]
impl From<Frame> for Inbound {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Control(msg) => Inbound::Control(msg),
            Frame::Data(chunk) => Inbound::Data(ReadChunk::check(chunk)),
        }
    }
}

impl Inbound {
    /// A frame `reader` returned, a chunk with its charge.
    fn read<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>, frame: Frame) -> Self {
        match frame {
            Frame::Control(msg) => Inbound::Control(msg),
            Frame::Data(chunk) => {
                Inbound::Data(ReadChunk::check(chunk).charged(reader.take_charge()))
            }
        }
    }
}

/// What either receiver (the worker, a dry run's) does with a message of
/// the sender's that is about no entry in particular: totals and vanished
/// entries are told, an `error` ends the session, and anything else is not
/// allowed there.
pub(crate) fn side_message(
    msg: Message,
    tally: &Tally,
    label: &str,
    peer: Side,
) -> Result<(), EngineError> {
    match msg {
        Message::Totals { files, bytes } => {
            tally.event(Event::Totals { files, bytes });
            Ok(())
        }
        Message::Vanished { path } => {
            let path = display_name(label, &WirePath::from_wire(path)?);
            tally.event(Event::Vanished { path });
            Ok(())
        }
        Message::Error {
            code,
            message,
            path,
        } => Err(EngineError::Remote(PeerFailure::received(
            peer,
            code,
            &message,
            path.as_ref(),
        ))),
        other => Err(Violation::UnexpectedMessage {
            from: Role::Sender,
            message: other.name(),
        }
        .into()),
    }
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
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<Message>>(REPLY_QUEUE);
    let gate = Arc::new(DataGate::default());
    // What the connections read is charged to the session's memory: the
    // control connection's to its reserve, the data connections' to what
    // it may borrow (they wait for room; the control one never waits for
    // what the data connections hold).
    let budget = dest.budget.clone();
    reader.charge_to(&budget.control);
    let done_rx = match dest.dry_run {
        true => {
            let preview = preview::Preview::new(dest, tally, reply_tx, reader.peer())?;
            spawn_worker(move |frames| preview.run(frames), frame_rx)?
        }
        false => {
            let worker = Worker::new(gate.clone(), dest, tally, reply_tx, reader.peer())?;
            spawn_worker(move |frames| worker.run(frames), frame_rx)?
        }
    };
    let read_data = for_each_data_conn(&mut joins, |mut conn| {
        conn.reader.charge_to(&budget.data);
        read_data_conn(conn, frame_tx.clone(), gate.clone())
    });
    let io_result = tokio::select! {
        r = write_replies(writer, &mut reply_rx) => r,
        r = read_control(reader, frame_tx.clone()) => r,
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

/// Start the worker (or a dry run's preview) on a thread of its own: it
/// does blocking file I/O for the whole transfer. Its verdict comes on the
/// returned channel.
fn spawn_worker(
    run: impl FnOnce(mpsc::Receiver<Vec<Inbound>>) -> Result<(), EngineError> + Send + 'static,
    frames: mpsc::Receiver<Vec<Inbound>>,
) -> Result<oneshot::Receiver<Result<(), EngineError>>, EngineError> {
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ferry-receive".into())
        .spawn(move || {
            let _ = done_tx.send(run(frames));
        })
        .map_err(EngineError::from)?;
    Ok(done_rx)
}

/// Pass control frames to the worker in batches: all that one read
/// brought. The control connection also carries data chunks, even after
/// `end`, so it is read until the worker is done (or the sender goes away).
/// `frames` is owned, so that the worker sees its input close once this
/// future is dropped.
async fn read_control<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    frames: mpsc::Sender<Vec<Inbound>>,
) -> Result<(), EngineError> {
    loop {
        let first = reader.next().await?.ok_or(EngineError::Closed)?;
        let mut batch = vec![Inbound::read(reader, first)];
        while let Some(frame) = reader.buffered()? {
            batch.push(Inbound::read(reader, frame));
        }
        if frames.send(batch).await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Write the worker's replies until it is done: that ends the transfer.
async fn write_replies<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    replies: &mut mpsc::Receiver<Vec<Message>>,
) -> Result<(), EngineError> {
    while let Some(batch) = replies.recv().await {
        for msg in &batch {
            writer.send(msg).await?;
        }
        if replies.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await
}

/// Read a data connection until the sender ends it, passing its chunks on.
async fn read_data_conn(
    mut conn: DataConn,
    frames: mpsc::Sender<Vec<Inbound>>,
    gate: Arc<DataGate>,
) -> Result<(), EngineError> {
    let data_only = |reader: &mut FrameReader<_>, frame: Frame| match frame {
        Frame::Data(_) => Ok(Inbound::read(reader, frame)),
        Frame::Control(_) => Err(EngineError::Protocol(Violation::ControlOnDataConnection)),
    };
    loop {
        gate.wait_open().await;
        let Some(first) = conn.reader.next().await? else {
            return Ok(());
        };
        let mut batch = vec![data_only(&mut conn.reader, first)?];
        while let Some(frame) = conn.reader.buffered()? {
            batch.push(data_only(&mut conn.reader, frame)?);
        }
        if frames.send(batch).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn open_dir(path: &std::path::Path) -> OwnedFd {
        let flags = rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY;
        rustix::fs::open(path, flags, rustix::fs::Mode::empty()).unwrap()
    }

    #[test]
    fn a_link_dest_opens_each_directory_once_and_a_missing_tree_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("old/d")).unwrap();
        let path = |p: &[u8]| WirePath::parse(p).unwrap();
        let mut old = LinkDest::new(open_dir(tmp.path()), vec![b"old".to_vec()]);
        let d_a = path(b"d/a");
        let (a, name) = old.open_parent(&d_a).unwrap();
        assert_eq!(name, b"a");
        let (b, _) = old.open_parent(&path(b"d/b")).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same directory, not opened again");
        let (top, _) = old.open_parent(&path(b"t")).unwrap();
        assert!(Arc::ptr_eq(
            &top,
            old.root.clone().flatten().as_ref().unwrap()
        ));
        assert!(old.open_parent(&path(b"nowhere/x")).is_none());
        let mut new = LinkDest::new(open_dir(tmp.path()), vec![b"new".to_vec()]);
        assert!(new.open_parent(&path(b"d/a")).is_none());
        std::fs::create_dir_all(tmp.path().join("new/d")).unwrap();
        assert!(
            new.open_parent(&path(b"d/a")).is_none(),
            "a tree missing at the first look is not looked for again"
        );
    }

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
