//! Lanes: the threads that compress the chunks of large files, one per
//! core, between the producer and the connections.
//!
//! The producer reads and hashes every chunk on one thread; compressing
//! there too would cap the transfer at what one core compresses. Over
//! 1 Gbit/s, text at zstd level 1 (5x) already asks for about 600 MB/s of
//! input, more than one core of the bench machine compresses (500 MB/s);
//! two lanes moved 1 Gbit/s text in 1.03 s against 1.20. So while
//! compression is on, the raw chunks of large files go to the lanes, which
//! compress each at the level the controller asks for now and queue it for
//! whichever connection is free. A chunk is a frame of its own, so the order in which lanes finish
//! does not matter. While compression is off, chunks skip the lanes.
//!
//! Lanes measure what they do (bytes in and out, time compressing, time
//! waiting for room in the connections' queue) for the controller, which
//! is how it tells a link that limits from a CPU that does.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use ferry_proto::chunk::ChunkHeader;

use super::frames::PooledFrame;
use crate::adapt::LaneWindow;
use crate::codec::Squeezer;
use crate::error::EngineError;

/// Raw chunks waiting for a lane, beyond one in each lane's hands.
const RAW_QUEUE: usize = 2;
/// Lanes at most, whatever the core count: beyond, each adds a compressor's
/// memory for little.
const MAX_LANES: u32 = 8;

/// How many lanes a transfer runs: one per core.
pub(crate) fn count() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get() as u32)
        .min(MAX_LANES)
}
/// The shared level's value for "send raw".
const OFF: i32 = i32::MIN;

/// A raw chunk's frame, for a lane to compress if that pays.
pub(crate) struct RawChunk {
    pub(crate) header: ChunkHeader,
    pub(crate) frame: PooledFrame,
}

/// The lanes of one transfer: where raw chunks go in, the level the
/// controller wants, and the counters of the window it is measuring.
pub(crate) struct Lanes {
    raw: async_channel::Sender<RawChunk>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    level: AtomicI32,
    lanes: u32,
    frames: AtomicU64,
    raw: AtomicU64,
    packed: AtomicU64,
    squeeze_nanos: AtomicU64,
    blocked_nanos: AtomicU64,
}

impl Lanes {
    /// Start `lanes` threads compressing at `level` into `data`, the queue
    /// the connections take frames from. They end once this is dropped and
    /// what was queued is done, or when the connections' queue closes.
    pub(crate) fn start(
        lanes: u32,
        level: Option<i32>,
        data: &async_channel::Sender<Bytes>,
    ) -> Result<Lanes, EngineError> {
        let (raw, queue) = async_channel::bounded(RAW_QUEUE);
        let shared = Arc::new(Shared {
            level: AtomicI32::new(level.unwrap_or(OFF)),
            lanes,
            frames: AtomicU64::new(0),
            raw: AtomicU64::new(0),
            packed: AtomicU64::new(0),
            squeeze_nanos: AtomicU64::new(0),
            blocked_nanos: AtomicU64::new(0),
        });
        for _ in 0..lanes {
            let (shared, queue, data) = (shared.clone(), queue.clone(), data.clone());
            std::thread::Builder::new()
                .name("ferry-lane".into())
                .spawn(move || shared.run(&queue, &data))
                .map_err(EngineError::from)?;
        }
        Ok(Lanes { raw, shared })
    }

    pub(crate) fn set_level(&self, level: Option<i32>) {
        self.shared
            .level
            .store(level.unwrap_or(OFF), Ordering::Relaxed);
    }

    /// Whether chunks are to be compressed now (else they skip the lanes).
    pub(crate) fn compressing(&self) -> bool {
        self.shared.level().is_some()
    }

    /// Hand a raw chunk to the lanes; returns how long that waited for
    /// room (the lanes, or the connections beyond them, are behind).
    pub(crate) fn send(&self, chunk: RawChunk) -> Result<std::time::Duration, EngineError> {
        let chunk = match self.raw.try_send(chunk) {
            Ok(()) => return Ok(std::time::Duration::ZERO),
            Err(async_channel::TrySendError::Full(chunk)) => chunk,
            Err(async_channel::TrySendError::Closed(_)) => return Err(EngineError::Closed),
        };
        let waiting = Instant::now();
        self.raw
            .send_blocking(chunk)
            .map_err(|_| EngineError::Closed)?;
        Ok(waiting.elapsed())
    }

    /// The counters since the last call, zeroed.
    pub(crate) fn take_window(&self) -> LaneWindow {
        let s = &self.shared;
        let secs = |n: &AtomicU64| n.swap(0, Ordering::Relaxed) as f64 / 1e9;
        LaneWindow {
            lanes: s.lanes,
            frames: s.frames.swap(0, Ordering::Relaxed),
            raw: s.raw.swap(0, Ordering::Relaxed),
            packed: s.packed.swap(0, Ordering::Relaxed),
            squeeze_secs: secs(&s.squeeze_nanos),
            blocked_secs: secs(&s.blocked_nanos),
        }
    }
}

impl Shared {
    fn level(&self) -> Option<i32> {
        Some(self.level.load(Ordering::Relaxed)).filter(|&l| l != OFF)
    }

    fn run(&self, queue: &async_channel::Receiver<RawChunk>, data: &async_channel::Sender<Bytes>) {
        let mut squeezer = Squeezer::new(None).expect("no compressor is made for raw");
        let mut level = None;
        while let Ok(RawChunk { header, frame }) = queue.recv_blocking() {
            let wanted = self.level();
            // A level zstd refuses leaves the lane sending raw.
            if wanted != level && squeezer.set_level(wanted).is_ok() {
                level = wanted;
            }
            let frame = self.squeeze(&mut squeezer, level, header, frame);
            self.frames.fetch_add(1, Ordering::Relaxed);
            let frame = match data.try_send(frame) {
                Ok(()) => continue,
                Err(async_channel::TrySendError::Full(frame)) => frame,
                Err(async_channel::TrySendError::Closed(_)) => break,
            };
            // The connections (the sockets, the link, the receiver) are
            // what limits for as long as this lane waits.
            let waiting = Instant::now();
            if data.send_blocking(frame).is_err() {
                break;
            }
            self.blocked_nanos
                .fetch_add(waiting.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// The frame of a raw chunk, compressed at `level` if that pays.
    fn squeeze(
        &self,
        squeezer: &mut Squeezer,
        level: Option<i32>,
        header: ChunkHeader,
        mut frame: PooledFrame,
    ) -> Bytes {
        if level.is_some() {
            let started = Instant::now();
            let raw = frame.len;
            frame.len = squeezer.squeeze_frame(header, frame.bytes_mut());
            let nanos = started.elapsed().as_nanos() as u64;
            self.squeeze_nanos.fetch_add(nanos, Ordering::Relaxed);
            self.raw.fetch_add(raw as u64, Ordering::Relaxed);
            self.packed.fetch_add(frame.len as u64, Ordering::Relaxed);
        }
        Bytes::from_owner(frame)
    }
}
