//! Frames over a byte stream: the only place where protocol meets socket.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_proto::PROTOCOL_VERSION;
use ferry_proto::frame::{self, Frame};
use ferry_proto::message::Message;
use ferry_proto::preface::{PREFACE_LEN, Preface};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::budget::{Account, Charge};
use crate::error::{EngineError, PeerFailure, Side, Violation};
use crate::events::Tally;
use crate::progress::{Progress, StallClock};

/// How long a peer may take to send its preface or first message.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Counts the bytes that cross a session's connections, both ways.
pub(crate) type Meter = Arc<AtomicU64>;

/// Cancels `session` once it has made no progress for `timeout` (see
/// [`StallClock`]: keepalives stand in for progress only for as long as the
/// peer's local work can take). The answer says whether it fired; the
/// watch ends when `session` is cancelled, by it or by anyone.
pub(crate) fn watch_for_stall(
    progress: Arc<Progress>,
    timeout: Duration,
    session: CancellationToken,
) -> Arc<AtomicBool> {
    let fired = Arc::new(AtomicBool::new(false));
    let flag = fired.clone();
    let tick = (timeout / 8).clamp(Duration::from_millis(50), Duration::from_secs(1));
    tokio::spawn(async move {
        let mut clock = StallClock::new(timeout, Instant::now());
        loop {
            tokio::select! {
                _ = session.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            if clock.stalled(&progress, Instant::now()) {
                flag.store(true, Ordering::Release);
                session.cancel();
                return;
            }
        }
    });
    fired
}

/// Reads frames from one half of a connection.
pub(crate) struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    meter: Meter,
    /// Who is at the other end: the side an `error` it sends speaks for.
    peer: Side,
    /// With a memory budget: what the bytes in `buf` are charged to it.
    /// Nothing is read that is not charged first, waiting for room.
    held: Option<Charge>,
    /// The charge of the data chunk last returned, for its taker.
    chunk: Option<Charge>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(inner: R, meter: Meter, peer: Side) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(256 * 1024),
            meter,
            peer,
            held: None,
            chunk: None,
        }
    }

    /// From now on, charge what is read to `account`, and wait for its
    /// room before reading: what is in this reader's buffer, and each
    /// data chunk it returns until its taker drops its charge (see
    /// [`take_charge`](Self::take_charge)).
    pub(crate) fn charge_to(&mut self, account: &Arc<Account>) {
        self.held = Some(account.force(self.buf.len() as u64));
    }

    /// The charge of the data chunk last returned (none without a budget).
    pub(crate) fn take_charge(&mut self) -> Option<Charge> {
        self.chunk.take()
    }

    /// The side at the other end of the connection.
    pub(crate) fn peer(&self) -> Side {
        self.peer
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, EngineError> {
        loop {
            if let Some(frame) = self.decode()? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 64 * 1024 {
                self.buf.reserve(256 * 1024);
            }
            let n = self.read().await?;
            if n == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(EngineError::Closed)
                };
            }
            self.meter.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The next frame if it is already buffered, without reading.
    pub(crate) fn buffered(&mut self) -> Result<Option<Frame>, EngineError> {
        self.decode()
    }

    /// Read what the buffer has room for (the rest of a frame whose header
    /// is in, or more): charged first, with a budget.
    async fn read(&mut self) -> Result<usize, EngineError> {
        let Some(held) = &mut self.held else {
            return Ok(self.inner.read_buf(&mut self.buf).await?);
        };
        let room = (self.buf.capacity() - self.buf.len()) as u64;
        let account = held.account().clone();
        held.absorb(account.take(room).await);
        let n = (&mut self.inner).take(room).read_buf(&mut self.buf).await?;
        held.shrink_to(self.buf.len() as u64);
        Ok(n)
    }

    /// A frame from the buffer, its charge moved to the chunk it holds (or
    /// given back, for a control message: it is small, and bounded by the
    /// queues it goes through).
    fn decode(&mut self) -> Result<Option<Frame>, EngineError> {
        let before = self.buf.len();
        let frame = frame::decode(&mut self.buf)?;
        if let (Some(frame), Some(held)) = (&frame, &mut self.held) {
            let len = (before - self.buf.len()) as u64;
            let mut charge = held.split_off(len);
            match frame {
                Frame::Data(_) => self.chunk = Some(charge),
                Frame::Control(_) => charge.shrink_to(0),
            }
        }
        Ok(frame)
    }

    /// The next frame, which must be a control message.
    pub(crate) async fn message(&mut self) -> Result<Message, EngineError> {
        match self.next().await? {
            Some(Frame::Control(Message::Error {
                code,
                message,
                path,
            })) => {
                let failure = PeerFailure::received(self.peer, code, &message, path.as_ref());
                Err(EngineError::Remote(failure))
            }
            Some(Frame::Control(m)) => Ok(m),
            Some(Frame::Data(_)) => Err(Violation::UnexpectedData.into()),
            None => Err(EngineError::Closed),
        }
    }

    /// Read the peer's preface, within the handshake timeout.
    pub(crate) async fn preface(&mut self) -> Result<Preface, EngineError> {
        let mut bytes = [0u8; PREFACE_LEN];
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.inner.read_exact(&mut bytes)).await {
            Err(_) => Err(EngineError::Timeout(HANDSHAKE_TIMEOUT.as_secs())),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(EngineError::Closed),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok(_)) => {
                self.meter.fetch_add(PREFACE_LEN as u64, Ordering::Relaxed);
                Ok(Preface::decode(&bytes)?)
            }
        }
    }
}

/// Frames at least this large skip the write buffer: a TLS record's worth.
const DIRECT_WRITE: usize = 16 * 1024;
/// A large write is counted in the meter this much at a time.
const METER_STEP: usize = 256 * 1024;

/// Writes frames to the other half, buffering small ones together.
pub(crate) struct FrameWriter<W: AsyncWrite> {
    inner: BufWriter<W>,
    scratch: BytesMut,
    meter: Meter,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub(crate) fn new(inner: W, meter: Meter) -> Self {
        FrameWriter {
            inner: BufWriter::with_capacity(256 * 1024, inner),
            scratch: BytesMut::new(),
            meter,
        }
    }

    pub(crate) async fn preface(&mut self) -> Result<(), EngineError> {
        self.queue_preface().await?;
        self.flush().await
    }

    /// Queue the preface, to go out with the first message.
    pub(crate) async fn queue_preface(&mut self) -> Result<(), EngineError> {
        self.raw(&Preface::ours().encode()).await
    }

    /// Queue a control message (call [`flush`](Self::flush) to push it out).
    pub(crate) async fn send(&mut self, msg: &Message) -> Result<(), EngineError> {
        self.scratch.clear();
        frame::encode_control(msg, &mut self.scratch)?;
        let bytes = self.scratch.split().freeze();
        self.raw(&bytes).await
    }

    /// Send a message now.
    pub(crate) async fn send_now(&mut self, msg: &Message) -> Result<(), EngineError> {
        self.send(msg).await?;
        self.flush().await
    }

    /// Queue bytes that already hold whole frames.
    pub(crate) async fn raw(&mut self, frames: &[u8]) -> Result<(), EngineError> {
        if frames.len() >= DIRECT_WRITE {
            // Big enough to go out by itself: copying it into the buffer
            // first would only add a pass over every byte (TLS copies it
            // into its records anyway). What is buffered goes first.
            if !self.inner.buffer().is_empty() {
                self.inner.flush().await?;
            }
            // In steps, so that the meter follows a slow link closely
            // enough for widening to measure it (see crate::widen).
            for step in frames.chunks(METER_STEP) {
                self.inner.get_mut().write_all(step).await?;
                self.meter.fetch_add(step.len() as u64, Ordering::Relaxed);
            }
        } else {
            self.inner.write_all(frames).await?;
            self.meter.fetch_add(frames.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    pub(crate) async fn flush(&mut self) -> Result<(), EngineError> {
        self.inner.flush().await?;
        Ok(())
    }

    pub(crate) async fn shutdown(&mut self) -> Result<(), EngineError> {
        self.inner.shutdown().await?;
        Ok(())
    }
}

/// Check the peer's version against ours.
pub(crate) fn check_version(peer: Preface) -> Result<(), EngineError> {
    if peer.version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(EngineError::VersionMismatch {
            peer: peer.version,
            ours: PROTOCOL_VERSION,
        })
    }
}

/// The reading half of any connection (TCP now, TLS later).
pub(crate) type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
/// The writing half of any connection.
pub(crate) type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// An extra connection of a session, attached by `join`. It carries data
/// chunks only, from the sender to the receiver.
pub(crate) struct DataConn {
    pub(crate) reader: FrameReader<BoxRead>,
    pub(crate) writer: FrameWriter<BoxWrite>,
}

/// Run `task` on every data connection that joins the session, each on a
/// task of its own, for as long as the session lasts. Returns only when
/// one of them fails, with why: the session cannot complete without the
/// chunks that connection carried.
pub(crate) async fn for_each_data_conn<F, Fut>(
    joins: &mut mpsc::Receiver<DataConn>,
    mut task: F,
) -> EngineError
where
    F: FnMut(DataConn) -> Fut,
    Fut: std::future::Future<Output = Result<(), EngineError>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            Some(conn) = joins.recv() => {
                running.spawn(task(conn));
            }
            Some(done) = running.join_next() => match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return e,
                Err(e) => return EngineError::Task(e),
            },
            // No more joins and none running: wait for the session to end.
            else => std::future::pending::<()>().await,
        }
    }
}

/// The control connection's writer: ordered control frames first, and data
/// frames from the shared queue whenever no control frame is waiting, so
/// the control connection carries data too. Flushes whenever both run dry.
pub(crate) async fn pump_control<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    control: &mut mpsc::Receiver<Bytes>,
    data: &async_channel::Receiver<Bytes>,
    tally: &Tally,
) -> Result<(), EngineError> {
    let (mut control_open, mut data_open) = (true, true);
    // Frames, and whether they hold data: data counts as progress once
    // written (see `Tally::data_written`).
    let write = async |writer: &mut FrameWriter<W>, (frames, is_data): (Bytes, bool)| {
        writer.raw(&frames).await?;
        if is_data {
            tally.data_written();
        }
        Ok::<_, EngineError>(())
    };
    while control_open || data_open {
        let ready = match control.try_recv() {
            Ok(frames) => Some((frames, false)),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                control_open = false;
                None
            }
            Err(mpsc::error::TryRecvError::Empty) => None,
        };
        let ready = match ready {
            Some(ready) => Some(ready),
            None if data_open => match data.try_recv() {
                Ok(frame) => Some((frame, true)),
                Err(async_channel::TryRecvError::Closed) => {
                    data_open = false;
                    None
                }
                Err(async_channel::TryRecvError::Empty) => None,
            },
            None => None,
        };
        if let Some(ready) = ready {
            write(writer, ready).await?;
            continue;
        }
        if !(control_open || data_open) {
            break;
        }
        writer.flush().await?;
        tokio::select! {
            biased;
            frames = control.recv(), if control_open => match frames {
                Some(frames) => write(writer, (frames, false)).await?,
                None => control_open = false,
            },
            frame = data.recv(), if data_open => match frame {
                Ok(frame) => write(writer, (frame, true)).await?,
                Err(_) => data_open = false,
            },
        }
    }
    writer.flush().await
}

/// A data connection's writer: frames from the shared queue until it
/// closes, then an orderly end of stream.
pub(crate) async fn pump_data(
    mut conn: DataConn,
    data: async_channel::Receiver<Bytes>,
    tally: Arc<Tally>,
) -> Result<(), EngineError> {
    loop {
        let frames = match data.try_recv() {
            Ok(frames) => frames,
            Err(async_channel::TryRecvError::Empty) => {
                conn.writer.flush().await?;
                match data.recv().await {
                    Ok(frames) => frames,
                    Err(_) => break,
                }
            }
            Err(async_channel::TryRecvError::Closed) => break,
        };
        conn.writer.raw(&frames).await?;
        tally.data_written();
    }
    conn.writer.flush().await?;
    conn.writer.shutdown().await
}

/// Set up a TCP connection of a session: no Nagle delay (frames are
/// written whole); at most [`UNSENT_IN_KERNEL`] bytes not yet sent held in
/// the kernel; and the congestion control `FERRY_TCP_CONGESTION` names, if
/// set and the kernel allows it (a benchmark's way to model a host whose
/// default is loss-based, such as Reno or CUBIC).
pub(crate) fn tune(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_IN_KERNEL);
    if let Ok(name) = std::env::var("FERRY_TCP_CONGESTION")
        && let Err(e) = rustix::net::sockopt::set_tcp_congestion(stream, &name)
    {
        tracing::warn!("cannot use the congestion control {name:?}: {e}");
    }
}

/// The bytes a connection's socket may hold beyond those in flight. The
/// kernel would take megabytes (its send buffer grows to 4 MiB), which on
/// a slow link are tens of seconds that no one sees moving: a sender's
/// progress is what it writes into its connections, and the stall watch
/// must see it while the link drains. Also what compression is judged by:
/// the level it picks applies to the next bytes the link takes, not to
/// bytes the kernel queued long before.
const UNSENT_IN_KERNEL: u32 = 256 * 1024;
