//! The pieces the in-memory sessions are built from: a receiver stepped
//! by hand, a sender played frame by frame, and an event collector.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, Bytes, BytesMut};
use ferry_proto::chunk::{ChunkHeader, Codec, DataChunk};
use ferry_proto::digest::{DigestBuilder, chunk_hash};
use ferry_proto::limits::DEFAULT_CHUNK_LEN;
use ferry_proto::message::{EntryKind, Message, Mtime, Outcome};
use ferry_proto::path::WireBytes;
use tokio::sync::mpsc;

use crate::codec::ReadChunk;
use crate::error::{EngineError, Side};
use crate::events::{Event, EventSink, Tally, TransferReport};
use crate::receiver::{DataGate, Destination, Inbound, Worker};

/// Every event, in order.
#[derive(Default)]
pub(super) struct Events(Mutex<Vec<Event>>);

impl EventSink for Events {
    fn event(&self, event: Event) {
        self.0.lock().unwrap().push(event);
    }
}

impl Events {
    pub(super) fn all(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }
}

/// The mtime the script gives every entry.
pub(super) const MTIME: Mtime = Mtime {
    sec: 1_600_000_000,
    nsec: 5,
};

/// A receiver whose worker the test steps: frames go in as batches, the
/// replies come back. The transfer lands in `dst` below a temporary
/// directory.
pub(super) struct Receiving {
    pub(super) tmp: tempfile::TempDir,
    worker: Worker,
    replies: mpsc::Receiver<Vec<Message>>,
    tally: Arc<Tally>,
    pub(super) events: Arc<Events>,
    /// Every reply so far, in order.
    pub(super) answers: Vec<Message>,
    /// The worker said `done`.
    pub(super) done: bool,
    /// It mirrors, telling the sender of its deletions.
    mirrors: bool,
}

impl Receiving {
    pub(super) fn new() -> Self {
        Self::in_dir(tempfile::tempdir().unwrap(), |_| {})
    }

    /// A receiver into `tmp/dst`, with `adjust` applied to its options.
    pub(super) fn in_dir(tmp: tempfile::TempDir, adjust: impl FnOnce(&mut Destination)) -> Self {
        let mut dest =
            Destination::plain(open_dir(tmp.path()), vec![b"dst".to_vec()], "dst".into());
        // As in an upload: the user is at the sender.
        dest.tell_sender = true;
        adjust(&mut dest);
        // Roomy: the test drains it only between batches.
        let (reply_tx, replies) = mpsc::channel(1 << 16);
        let events = Arc::new(Events::default());
        let tally = Arc::new(Tally::new(events.clone()));
        let gate = Arc::new(DataGate::default());
        // As in an upload: the server receives from the client.
        let mirrors = dest.pruning.as_ref().is_some_and(|p| p.tell_sender);
        let worker = Worker::new(gate, dest, tally.clone(), reply_tx, Side::Client).unwrap();
        Receiving {
            mirrors,
            tmp,
            worker,
            replies,
            tally,
            events,
            answers: Vec::new(),
            done: false,
        }
    }

    /// Whether the sender should expect word of deletions.
    pub(super) fn mirrors(&self) -> bool {
        self.mirrors
    }

    pub(super) fn dst(&self) -> PathBuf {
        self.tmp.path().join("dst")
    }

    /// Hand the worker one batch of frames, with nothing queued behind
    /// it (so it sends what it owes); the replies it gave. A failure ends
    /// the session as it would on a thread: the sender is told, part files
    /// not worth keeping are removed.
    pub(super) fn take(&mut self, frames: Vec<Inbound>) -> Result<Vec<Message>, EngineError> {
        self.take_busy(frames, false)
    }

    /// The same, with `busy`: more frames are queued behind these, so the
    /// worker does not stop to send what it owes.
    pub(super) fn take_busy(
        &mut self,
        frames: Vec<Inbound>,
        busy: bool,
    ) -> Result<Vec<Message>, EngineError> {
        let mut result = self.worker.take(frames);
        if let Ok(false) = result
            && !busy
        {
            result = self.worker.idle().map(|()| false);
        }
        let result = match result {
            Ok(done) => {
                self.done |= done;
                Ok(())
            }
            Err(e) => {
                self.worker.fail(&e);
                Err(e)
            }
        };
        let replies = self.drain();
        result.map(|()| replies)
    }

    /// The worker has nothing to read: it sends what it owes.
    pub(super) fn idle(&mut self) -> Vec<Message> {
        self.worker.idle().unwrap();
        self.drain()
    }

    fn drain(&mut self) -> Vec<Message> {
        let mut new = Vec::new();
        while let Ok(batch) = self.replies.try_recv() {
            new.extend(batch);
        }
        self.answers.extend(new.iter().cloned());
        new
    }

    /// The outcome entry `id` got, if any.
    pub(super) fn outcome(&self, id: u64) -> Option<&Outcome> {
        self.answers.iter().find_map(|m| match m {
            Message::Outcome { id: i, outcome } if *i == id => Some(outcome),
            _ => None,
        })
    }

    pub(super) fn report(&self) -> TransferReport {
        self.tally.report()
    }

    /// The session ends without `end` (the connection broke): what was
    /// open is dropped as the thread would drop it.
    pub(super) fn break_off(mut self) -> tempfile::TempDir {
        self.worker.fail(&EngineError::Closed);
        let Receiving { tmp, .. } = self;
        tmp
    }
}

pub(super) fn open_dir(path: &Path) -> OwnedFd {
    rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap()
}

/// Frames a sender would send, built by hand.
pub(super) fn ctl(msg: Message) -> Inbound {
    Inbound::Control(msg)
}

pub(super) fn entry(id: u64, path: &str, kind: EntryKind) -> Inbound {
    ctl(Message::Entry {
        id,
        path: WireBytes(path.as_bytes().to_vec()),
        kind,
        owner: None,
        digest: None,
    })
}

pub(super) fn dir(id: u64, path: &str) -> Inbound {
    entry(
        id,
        path,
        EntryKind::Dir {
            mode: 0o755,
            mtime: MTIME,
        },
    )
}

pub(super) fn file(id: u64, path: &str, size: u64) -> Inbound {
    entry(
        id,
        path,
        EntryKind::File {
            size,
            mode: 0o644,
            mtime: MTIME,
        },
    )
}

pub(super) fn dir_end(id: u64) -> Inbound {
    ctl(Message::DirEnd { id })
}

pub(super) fn end() -> Inbound {
    ctl(Message::End)
}

/// One raw chunk of file `id`: `bytes` at `offset`, with their true hash.
pub(super) fn chunk(id: u64, offset: u64, bytes: &[u8]) -> Inbound {
    chunk_hashed(id, offset, bytes, chunk_hash(bytes))
}

/// One raw chunk that claims `hash`, true or not.
pub(super) fn chunk_hashed(id: u64, offset: u64, bytes: &[u8], hash: u64) -> Inbound {
    let header = ChunkHeader {
        file_id: id,
        offset,
        raw_len: bytes.len() as u32,
        codec: Codec::Raw,
        hash,
    };
    let chunk = DataChunk {
        header,
        payload: Bytes::copy_from_slice(bytes),
    };
    Inbound::Data(ReadChunk::check(chunk))
}

/// The chunks of `content` as the sender cuts them, from `from` on.
pub(super) fn chunks_from(id: u64, content: &[u8], from: u64) -> Vec<Inbound> {
    let len = DEFAULT_CHUNK_LEN as usize;
    (from as usize..content.len())
        .step_by(len)
        .map(|at| chunk(id, at as u64, &content[at..content.len().min(at + len)]))
        .collect()
}

/// The digest of `content` as the sender computes it.
pub(super) fn digest_of(content: &[u8]) -> String {
    let mut digest = DigestBuilder::new(content.len() as u64);
    for piece in content.chunks(DEFAULT_CHUNK_LEN as usize) {
        digest.push(chunk_hash(piece));
    }
    digest.finish().to_hex()
}

pub(super) fn file_end(id: u64, content: &[u8]) -> Inbound {
    ctl(Message::FileEnd {
        id,
        digest: digest_of(content),
    })
}

/// A whole file: entry, chunks, `file_end`.
pub(super) fn whole_file(id: u64, path: &str, content: &[u8]) -> Vec<Inbound> {
    let mut frames = vec![file(id, path, content.len() as u64)];
    frames.extend(chunks_from(id, content, 0));
    frames.push(file_end(id, content));
    frames
}

/// `len` bytes that differ from chunk to chunk.
pub(super) fn content(len: usize, seed: u8) -> Vec<u8> {
    let mut out = BytesMut::with_capacity(len);
    let mut x = u64::from(seed) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.put_u64(x);
    }
    out.truncate(len);
    out.to_vec()
}
