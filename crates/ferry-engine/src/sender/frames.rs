//! From file bytes to frames on their way to the connections.
//!
//! Control messages, and the chunks of files that fit in one, are batched
//! in order for the control connection; the chunks of larger files go one
//! frame each to whichever connection is free. Both queues are bounded,
//! and the time spent waiting on them tells the compression controller
//! that the downstream, not the CPU, is what limits.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_proto::chunk::{ChunkHeader, Codec};
use ferry_proto::delta::{Matches, Piece};
use ferry_proto::digest::DigestBuilder;
use ferry_proto::frame::DATA_PREFIX_LEN;
use ferry_proto::limits::DEFAULT_CHUNK_LEN;
use ferry_proto::message::{Compression, Message};
use tokio::sync::mpsc;

use super::DATA_QUEUE;
use super::lanes::{Lanes, RawChunk};
use super::rules::Run;
use crate::adapt::{LevelController, WindowMeter};
use crate::codec::ChunkEncoder;
use crate::error::{EngineError, reason};
use crate::events::{Event, EventSink, Tally};
use crate::fsx;
use crate::pace::Pacer;

/// Frames are batched into one queue item up to this size, so that a tree
/// of small files costs one hand-over between threads per batch rather
/// than several per file.
const BATCH_BYTES: usize = 128 * 1024;
/// A batch is handed over at the latest this long after its first frame,
/// so a slow walk does not hold back what is ready.
const BATCH_DELAY: Duration = Duration::from_millis(5);

/// While hashing chunks the receiver already holds (which sends nothing),
/// tell it this often that the sender is alive.
pub(super) const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// Frame buffers spare at most: as many as the data queue holds, and a few
/// in the connections' hands.
const FRAME_POOL_SPARE: usize = DATA_QUEUE + 4;

/// Why a file cannot be sent, and whether that may pass (it changed while
/// being read: sending it again later may catch it at rest).
pub(super) type Unsendable = (String, bool);

/// The two queues to the connections, and the batch being filled for the
/// control connection.
pub(super) struct Output {
    /// Ordered frames, for the control connection.
    control: mpsc::Sender<Bytes>,
    /// Chunks of large files, for whichever connection is free.
    data: async_channel::Sender<Bytes>,
    /// The threads that compress the chunks of large files, if any.
    lanes: Option<Lanes>,
    batch: BytesMut,
    /// When the first frame of the current batch was added.
    batch_started: Option<Instant>,
    /// Time spent waiting for room in a queue (or for the rate limit), not
    /// yet taken by the compression controller.
    blocked: Duration,
    /// `--bwlimit`: the rate all connections together stay under.
    pacer: Option<Pacer>,
}

impl Output {
    pub(super) fn new(
        control: mpsc::Sender<Bytes>,
        data: async_channel::Sender<Bytes>,
        bwlimit: Option<u64>,
    ) -> Self {
        Output {
            control,
            data,
            lanes: None,
            batch: BytesMut::new(),
            batch_started: None,
            blocked: Duration::ZERO,
            pacer: bwlimit.map(|rate| Pacer::new(rate, Instant::now())),
        }
    }

    /// Compress the chunks of large files on `lanes` threads, starting at
    /// `level`: not under `--bwlimit`, whose pacing counts the bytes as they
    /// go out, and where compression is seldom what limits.
    pub(super) fn with_lanes(
        mut self,
        lanes: u32,
        level: Option<i32>,
    ) -> Result<Self, EngineError> {
        if self.pacer.is_none() && lanes > 0 {
            self.lanes = Some(Lanes::start(lanes, level, &self.data)?);
        }
        Ok(self)
    }

    /// Wait as long as the rate limit asks after `n` bytes. To the
    /// compression controller that is a slow link, as it should be.
    fn pace(&mut self, n: usize) {
        let Some(pacer) = &mut self.pacer else {
            return;
        };
        let wait = pacer.sent(n as u64, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
            self.blocked += wait;
        }
    }

    pub(super) fn send(&mut self, msg: &Message) -> Result<(), EngineError> {
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

    pub(super) fn flush(&mut self) -> Result<(), EngineError> {
        self.batch_started = None;
        if self.batch.is_empty() {
            return Ok(());
        }
        let frames = self.batch.split().freeze();
        self.pace(frames.len());
        match self.control.try_send(frames) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(frames)) => {
                // The downstream (socket, link, receiver) is the bottleneck
                // for as long as we wait here: the compression controller
                // wants to know.
                let waiting = Instant::now();
                let sent = self.control.blocking_send(frames);
                self.blocked += waiting.elapsed();
                sent.map_err(|_| EngineError::Closed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(EngineError::Closed),
        }
    }

    /// Queue one data frame for any connection; counts waiting as blocked.
    fn send_data(&mut self, frame: Bytes) -> Result<(), EngineError> {
        self.pace(frame.len());
        match self.data.try_send(frame) {
            Ok(()) => Ok(()),
            Err(async_channel::TrySendError::Full(frame)) => {
                let waiting = Instant::now();
                let sent = self.data.send_blocking(frame);
                self.blocked += waiting.elapsed();
                sent.map_err(|_| EngineError::Closed)
            }
            Err(async_channel::TrySendError::Closed(_)) => Err(EngineError::Closed),
        }
    }

    /// Queue the frame of a raw chunk of a large file: for the lanes to
    /// compress while compression is on, else straight for a connection.
    fn send_raw(&mut self, header: ChunkHeader, frame: PooledFrame) -> Result<(), EngineError> {
        match &self.lanes {
            Some(lanes) if lanes.compressing() => {
                self.blocked += lanes.send(RawChunk { header, frame })?;
                Ok(())
            }
            _ => self.send_data(Bytes::from_owner(frame)),
        }
    }

    /// Room for a frame of `len` bytes at the end of the batch: returns
    /// where it starts.
    fn grow_batch(&mut self, len: usize) -> usize {
        let start = self.batch.len();
        self.batch.resize(start + len, 0);
        start
    }
}

/// A file whose chunks are read.
pub(super) struct Source<'a> {
    pub(super) id: u64,
    pub(super) file: &'a File,
    pub(super) size: u64,
    /// It has fewer blocks than bytes: its holes are worth looking for.
    pub(super) sparse: bool,
    /// Its chunks go to any connection, not with the control messages.
    pub(super) spread: bool,
    /// Its runs that the receiver's basis has: the chunks they reach go as
    /// delta scripts.
    pub(super) matches: Option<&'a Matches>,
}

/// Reads, hashes and compresses chunks into frames, at the level the
/// controller picks in `auto` mode.
pub(super) struct Chunks {
    encoder: ChunkEncoder,
    /// The level of `--compress LEVEL` (without a controller).
    fixed_level: Option<i32>,
    /// Present in `auto` mode: picks the level as the transfer goes.
    controller: Option<LevelController>,
    window: WindowMeter,
    read_buf: Vec<u8>,
    frame_pool: FramePool,
    tally: Arc<Tally>,
}

impl Chunks {
    /// `local_peer`: the receiver is on this host, where the link is memory,
    /// faster than any compressor, so `auto` starts off instead of spending
    /// a warm-up and a probe to find that out.
    pub(super) fn new(
        compression: Compression,
        local_peer: bool,
        tally: Arc<Tally>,
    ) -> Result<Self, EngineError> {
        let (controller, fixed_level) = match compression {
            Compression::Auto if local_peer => (Some(LevelController::starting_off()), None),
            Compression::Auto => (Some(LevelController::new()), None),
            Compression::Off => (None, None),
            Compression::Level(level) => (None, Some(level)),
        };
        let level = controller
            .as_ref()
            .map_or(fixed_level, LevelController::level);
        Ok(Chunks {
            encoder: ChunkEncoder::new(level)?,
            fixed_level,
            controller,
            window: WindowMeter::new(Instant::now()),
            read_buf: Vec::new(),
            frame_pool: FramePool::default(),
            tally,
        })
    }

    /// The level chunks are compressed at now.
    pub(super) fn level(&self) -> Option<i32> {
        self.controller
            .as_ref()
            .map_or(self.fixed_level, LevelController::level)
    }

    /// Send a file but for the `held` chunks, which are read and hashed
    /// only, so that `digest` covers the whole file.
    pub(super) fn send_file_data(
        &mut self,
        out: &mut Output,
        src: &Source<'_>,
        held: &[Run],
        digest: &mut DigestBuilder,
    ) -> Result<Result<(), Unsendable>, EngineError> {
        let mut offset = 0;
        let mut last_sign = Instant::now();
        for &(start, len, count) in held {
            if let Err(e) = self.send_range(out, src, offset, start, digest)? {
                return Ok(Err(e));
            }
            for k in 0..count {
                let at = start + k * u64::from(len);
                match self.read_chunk(src.file, at, len as usize) {
                    Ok(raw) => digest.push(ferry_proto::digest::chunk_hash(raw)),
                    Err(e) => return Ok(Err(e)),
                }
                if last_sign.elapsed() >= KEEPALIVE_EVERY {
                    last_sign = Instant::now();
                    self.tally.working();
                    out.send(&Message::Keepalive)?;
                    out.flush()?;
                }
            }
            offset = start + count * u64::from(len);
        }
        self.send_range(out, src, offset, src.size, digest)
    }

    /// Send the bytes `[from, to)` of a file as chunks.
    fn send_range(
        &mut self,
        out: &mut Output,
        src: &Source<'_>,
        from: u64,
        to: u64,
        digest: &mut DigestBuilder,
    ) -> Result<Result<(), Unsendable>, EngineError> {
        let mut offset = from;
        while offset < to {
            let len = (to - offset).min(u64::from(DEFAULT_CHUNK_LEN)) as usize;
            // A full chunk in a hole goes as a header: nothing to read,
            // hash or write, and the copy stays sparse.
            if src.sparse
                && len == DEFAULT_CHUNK_LEN as usize
                && fsx::is_hole(src.file.as_fd(), offset, len as u64)
            {
                digest.push(self.send_hole(out, src, offset)?);
            } else {
                // The bytes are read straight into their frame, behind room
                // for its headers: a copy of every byte sent costs as much as
                // the read itself.
                let pieces = match src.matches {
                    Some(m) if m.reaches(offset, len as u32) => m.window(offset, len as u32),
                    _ => Vec::new(),
                };
                let hash = if src.spread {
                    self.send_pooled(out, src, offset, len, &pieces)?
                } else {
                    self.send_inline(out, src, offset, len, &pieces)?
                };
                match hash {
                    Ok(hash) => digest.push(hash),
                    Err(e) => return Ok(Err(e)),
                }
                self.adapt(out, len as u64)?;
            }
            self.tally.event(Event::Bytes { n: len as u64 });
            offset += len as u64;
        }
        Ok(Ok(()))
    }

    /// Send a chunk of zeros as its header alone; returns its hash.
    fn send_hole(
        &mut self,
        out: &mut Output,
        src: &Source<'_>,
        offset: u64,
    ) -> Result<u64, EngineError> {
        if src.spread {
            let mut frame = [0; DATA_PREFIX_LEN];
            let (hash, _) = self.encoder.encode_zeros(src.id, offset, &mut frame);
            out.send_data(Bytes::copy_from_slice(&frame))?;
            return Ok(hash);
        }
        let start = out.grow_batch(DATA_PREFIX_LEN);
        let (hash, _) = self
            .encoder
            .encode_zeros(src.id, offset, &mut out.batch[start..]);
        out.maybe_flush()?;
        Ok(hash)
    }

    /// Send a chunk in a frame of its own, for any connection; returns its
    /// hash.
    fn send_pooled(
        &mut self,
        out: &mut Output,
        src: &Source<'_>,
        offset: u64,
        len: usize,
        pieces: &[Piece],
    ) -> Result<Result<u64, Unsendable>, EngineError> {
        let mut frame = self.frame_pool.take(DATA_PREFIX_LEN + len);
        if let Err(e) = read_exact_at(src.file, &mut frame.buf[DATA_PREFIX_LEN..frame.len], offset)
        {
            return Ok(Err(e));
        }
        // Compressing is left to the lanes, if any: they spread it over
        // the cores.
        let here = out.lanes.is_none();
        let (header, frame_len) =
            self.encoder
                .encode_in_place(src.id, offset, frame.bytes_mut(), pieces, here);
        frame.len = frame_len;
        match header.codec {
            Codec::Raw => out.send_raw(header, frame)?,
            _ => out.send_data(Bytes::from_owner(frame))?,
        }
        Ok(Ok(header.hash))
    }

    /// Send a chunk in the batch, in order with the control messages;
    /// returns its hash.
    fn send_inline(
        &mut self,
        out: &mut Output,
        src: &Source<'_>,
        offset: u64,
        len: usize,
        pieces: &[Piece],
    ) -> Result<Result<u64, Unsendable>, EngineError> {
        let start = out.grow_batch(DATA_PREFIX_LEN + len);
        if let Err(e) = read_exact_at(src.file, &mut out.batch[start + DATA_PREFIX_LEN..], offset) {
            out.batch.truncate(start);
            return Ok(Err(e));
        }
        let (header, frame_len) =
            self.encoder
                .encode_in_place(src.id, offset, &mut out.batch[start..], pieces, true);
        out.batch.truncate(start + frame_len);
        out.maybe_flush()?;
        Ok(Ok(header.hash))
    }

    /// Read `len` bytes at `offset` into the read buffer.
    fn read_chunk(&mut self, file: &File, offset: u64, len: usize) -> Result<&[u8], Unsendable> {
        if self.read_buf.len() < len {
            self.read_buf.resize(len, 0);
        }
        let buf = &mut self.read_buf[..len];
        read_exact_at(file, buf, offset)?;
        Ok(buf)
    }

    /// Count `bytes` sent; at the end of a compression window, let the
    /// controller pick the level for the next one.
    fn adapt(&mut self, out: &mut Output, bytes: u64) -> Result<(), EngineError> {
        let Some(controller) = &mut self.controller else {
            return Ok(());
        };
        self.window.blocked(std::mem::take(&mut out.blocked));
        let warming_up = self.window.warming_up();
        let lanes = out.lanes.as_ref();
        let Some(mut window) = self.window.sent(bytes, Instant::now()) else {
            if warming_up && !self.window.warming_up() {
                // What the lanes did while socket buffers filled is no
                // measure of the link either.
                lanes.map(Lanes::take_window);
            }
            return Ok(());
        };
        window.lanes = lanes.map(Lanes::take_window).unwrap_or_default();
        let level = controller.observe(window);
        tracing::debug!(
            bytes = window.bytes,
            secs = window.secs,
            blocked_secs = window.blocked_secs,
            lanes = ?window.lanes,
            next_level = ?level,
            "compression window"
        );
        self.encoder.set_level(level)?;
        if let Some(lanes) = lanes {
            lanes.set_level(level);
        }
        Ok(())
    }
}

/// Fill `buf` from `file` at `offset`.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), Unsendable> {
    match fsx::read_full_at(file.as_fd(), buf, offset) {
        Ok(true) => Ok(()),
        Ok(false) => Err(("the file shrank while it was being sent".into(), true)),
        Err(e) => Err((reason(&e), false)),
    }
}

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
pub(crate) struct PooledFrame {
    buf: Vec<u8>,
    pub(super) len: usize,
    pool: FramePool,
}

impl PooledFrame {
    pub(super) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
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
