//! The real sender's producer against the real receiver's worker, stepped
//! from the test's thread: frames pass from one to the other through a
//! link the test may tamper with, and replies pass back the same way.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferry_proto::frame::{self, Frame};
use ferry_proto::message::{Compression, Message};

use super::harness::{Events, Receiving};
use crate::error::{EngineError, Side};
use crate::events::{Tally, TransferReport};
use crate::fsx;
use crate::receiver::Inbound;
use crate::sender::{self, SendJob, Started};

/// How long a whole exchange may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(60);

/// What the link does with frames and replies on their way.
pub(super) struct Link<'a> {
    /// Sender to receiver: the frames to deliver instead (none: dropped),
    /// or `None` to cut the link there.
    pub(super) frames: Box<dyn FnMut(Inbound) -> Option<Vec<Inbound>> + 'a>,
    /// Receiver to sender: the replies to deliver instead.
    pub(super) replies: Box<dyn FnMut(Message) -> Vec<Message> + 'a>,
}

impl Default for Link<'_> {
    fn default() -> Self {
        Link {
            frames: Box::new(|f| Some(vec![f])),
            replies: Box::new(|m| vec![m]),
        }
    }
}

/// How an exchange ended, on each side.
pub(super) struct Ended {
    pub(super) sender: Result<(), EngineError>,
    pub(super) receiver: Result<(), EngineError>,
    pub(super) sent: TransferReport,
    pub(super) sent_events: Arc<Events>,
    pub(super) rx: Receiving,
}

impl Ended {
    pub(super) fn assert_ok(&self) {
        assert!(
            self.sender.is_ok() && self.receiver.is_ok() && self.rx.done,
            "sender {:?}, receiver {:?}, done {}",
            self.sender,
            self.receiver,
            self.rx.done
        );
    }
}

/// Send `src` (a directory or a file) into the receiver `rx` over `link`.
pub(super) fn exchange(src: &Path, mut rx: Receiving, mut link: Link<'_>) -> Ended {
    let sent_events = Arc::new(Events::default());
    let tally = Arc::new(Tally::new(sent_events.clone()));
    let job = SendJob {
        root: fsx::open_local_root(src).unwrap(),
        compression: Compression::Off,
        local_peer: true,
        lanes: 0,
        label: "src".into(),
        early_totals: false,
        owners: false,
        filter: Default::default(),
        bwlimit: None,
        mirror: rx.mirrors(),
        itemize: false,
        atomic: false,
        checksum: false,
        dest_label: "dst".into(),
    };
    // As in an upload: the client sends to the server.
    let mut started = sender::start(job, tally.clone(), Side::Server).unwrap();
    let mut produced = None;
    let (sender_err, receiver) =
        step_until_over(&mut started, &mut rx, &mut link, &tally, &mut produced);
    // Whatever the producer waits for now will not come.
    started.replies.close();
    let Started {
        control,
        data,
        done,
        ..
    } = started;
    drop((control, data));
    let produced =
        produced.unwrap_or_else(|| done.blocking_recv().unwrap_or(Err(EngineError::Closed)));
    let sender = match sender_err {
        Some(e) => Err(e),
        None => produced,
    };
    let sent = tally.report();
    Ended {
        sender,
        receiver,
        sent,
        sent_events,
        rx,
    }
}

/// Pass frames and replies until the receiver is done, either side fails
/// or the link is cut. Returns the sender's failure, if it saw one, and
/// the receiver's result; `produced` gets the producer's, if it finished.
fn step_until_over(
    started: &mut Started,
    rx: &mut Receiving,
    link: &mut Link<'_>,
    tally: &Tally,
    produced: &mut Option<Result<(), EngineError>>,
) -> (Option<EngineError>, Result<(), EngineError>) {
    let deadline = Instant::now() + HANG;
    let mut answered = 0;
    loop {
        assert!(Instant::now() < deadline, "the exchange hangs");
        // A producer that failed ends the session, as in `run_sender`.
        if produced.is_none()
            && let Ok(result) = started.done.try_recv()
        {
            let failed = result.is_err();
            *produced = Some(result);
            if failed {
                return (None, Ok(()));
            }
        }
        let (frames, cut) = next_frames(started, link);
        let stepped = if frames.is_empty() {
            rx.idle();
            Ok(())
        } else {
            rx.take_busy(frames, frames_pending(started) > 0).map(drop)
        };
        // Everything the receiver said, its last words included.
        let replies: Vec<Message> = rx.answers[answered..]
            .iter()
            .cloned()
            .flat_map(&mut link.replies)
            .collect();
        answered = rx.answers.len();
        let heard = started.replies.take_replies(replies, tally);
        if cut {
            return (None, Err(EngineError::Closed));
        }
        match (heard, stepped) {
            (Err(e), stepped) => return (Some(e), stepped),
            (Ok(_), Err(e)) => return (None, Err(e)),
            (Ok(true), Ok(())) => return (None, Ok(())),
            (Ok(false), Ok(())) => {}
        }
        if frames_pending(started) == 0 && rx.answers.len() == answered {
            // The producer is reading, or waits for a word: give it a moment.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Everything the producer handed over so far, control frames first, as
/// the link delivers it; true if the link was cut after them.
fn next_frames(started: &mut Started, link: &mut Link<'_>) -> (Vec<Inbound>, bool) {
    let mut raw = Vec::new();
    while let Ok(bytes) = started.control.try_recv() {
        raw.push(bytes);
    }
    while let Ok(bytes) = started.data.try_recv() {
        raw.push(bytes);
    }
    let mut frames = Vec::new();
    for bytes in raw {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Some(frame) = frame::decode(&mut buf).unwrap() {
            match (link.frames)(Inbound::from(frame)) {
                Some(delivered) => frames.extend(delivered),
                None => return (frames, true),
            }
        }
        assert!(buf.is_empty(), "a batch holds whole frames");
    }
    (frames, false)
}

fn frames_pending(started: &Started) -> usize {
    started.control.len() + started.data.len()
}

/// The message a frame carries, if it is a control frame.
pub(super) fn message_of(frame: &Inbound) -> Option<&Message> {
    match frame {
        Inbound::Control(msg) => Some(msg),
        Inbound::Data(_) => None,
    }
}

/// The data chunk's file id and offset, if it is a data frame.
pub(super) fn chunk_of(frame: &Inbound) -> Option<(u64, u64)> {
    match frame {
        Inbound::Data(read) => Some((read.chunk.header.file_id, read.chunk.header.offset)),
        Inbound::Control(_) => None,
    }
}

/// The same chunk with one byte of its payload flipped, as a damaged link
/// would deliver it.
pub(super) fn flipped(frame: Inbound) -> Inbound {
    let Inbound::Data(read) = frame else {
        return frame;
    };
    let mut chunk = read.chunk;
    let mut payload = chunk.payload.to_vec();
    payload[0] ^= 0x40;
    chunk.payload = payload.into();
    Inbound::from(Frame::Data(chunk))
}

/// Whether two trees hold the same entries: kinds, contents, permission
/// bits, mtimes and symlink targets.
pub(super) fn assert_same_tree(a: &Path, b: &Path) {
    let (ma, mb) = (
        std::fs::symlink_metadata(a).unwrap(),
        std::fs::symlink_metadata(b).unwrap(),
    );
    let what = format!("{} vs {}", a.display(), b.display());
    assert_eq!(ma.file_type(), mb.file_type(), "{what}");
    assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "{what}");
    if !ma.is_symlink() {
        assert_eq!(
            (ma.mtime(), ma.mtime_nsec()),
            (mb.mtime(), mb.mtime_nsec()),
            "{what}"
        );
    }
    if ma.is_file() {
        assert!(
            std::fs::read(a).unwrap() == std::fs::read(b).unwrap(),
            "{what}"
        );
    } else if ma.is_symlink() {
        assert_eq!(
            std::fs::read_link(a).unwrap(),
            std::fs::read_link(b).unwrap()
        );
    } else if ma.is_dir() {
        let names = |p: &Path| {
            let mut n: Vec<_> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            n.sort();
            n
        };
        let (na, nb) = (names(a), names(b));
        assert_eq!(na, nb, "{what}");
        for name in na {
            assert_same_tree(&a.join(&name), &b.join(&name));
        }
    } else {
        assert!(ma.file_type().is_fifo() || ma.file_type().is_char_device());
    }
}
