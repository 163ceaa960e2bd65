//! Turning file bytes into data frames and back: hashing and compression.

use std::io;
use std::os::fd::BorrowedFd;

use ferry_proto::chunk::{ChunkHeader, Codec, DataChunk};
use ferry_proto::delta::{MAX_SCRIPT_OPS, Op, Piece, push_op};
use ferry_proto::digest::{chunk_hash, zero_chunk_hash};
use ferry_proto::frame::{DATA_PREFIX_LEN, write_data_prefix};
use ferry_proto::limits::DEFAULT_CHUNK_LEN;

use crate::budget::Charge;

/// After this many chunks in a row that do not shrink, stop trying to
/// compress, and try again only on every [`RESAMPLE_EVERY`]th chunk until
/// one shrinks. The state spans files: a tree of many small incompressible
/// files (photos, archives) must not pay for a zstd attempt on each one,
/// and a compressible file after them is noticed within a few chunks.
const GIVE_UP_AFTER: u32 = 2;
const RESAMPLE_EVERY: u32 = 32;

/// A chunk is sent compressed only if that saves at least 1/32 of it:
/// below that the receiver's decompression costs more than it saves.
fn worth_it(raw: usize, compressed: usize) -> bool {
    compressed < raw - raw / 32
}

/// Compresses chunk payloads at a level that may change, reusing one zstd
/// context, and gives up on data that does not shrink.
pub(crate) struct Squeezer {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Whether to compress at all (the compressor is kept when not, so
    /// that switching back costs nothing).
    enabled: bool,
    scratch: Vec<u8>,
    misses: u32,
    skipped: u32,
}

impl Squeezer {
    /// At a fixed level (`None`: raw), until [`set_level`](Self::set_level).
    pub(crate) fn new(level: Option<i32>) -> io::Result<Self> {
        let mut squeezer = Squeezer {
            compressor: None,
            enabled: false,
            scratch: Vec::new(),
            misses: 0,
            skipped: 0,
        };
        squeezer.set_level(level)?;
        Ok(squeezer)
    }

    pub(crate) fn set_level(&mut self, level: Option<i32>) -> io::Result<()> {
        self.enabled = level.is_some();
        if let Some(level) = level {
            match &mut self.compressor {
                Some(c) => c.set_compression_level(level)?,
                None => self.compressor = Some(zstd::bulk::Compressor::new(level)?),
            }
        }
        Ok(())
    }

    /// `raw` compressed, if compression is on, is tried for this chunk
    /// and pays.
    pub(crate) fn squeeze(&mut self, raw: &[u8]) -> Option<&[u8]> {
        if !self.enabled {
            return None;
        }
        let compressor = self.compressor.as_mut()?;
        if self.misses >= GIVE_UP_AFTER {
            self.skipped += 1;
            if !self.skipped.is_multiple_of(RESAMPLE_EVERY) {
                return None;
            }
        }
        self.scratch.clear();
        self.scratch.reserve(raw.len());
        // A destination as large as the input: if zstd needs more, the
        // chunk does not compress and the call fails, which is our answer.
        let shrank = match compressor.compress_to_buffer(raw, &mut self.scratch) {
            Ok(n) => worth_it(raw.len(), n),
            Err(_) => false,
        };
        if shrank {
            self.misses = 0;
            Some(&self.scratch)
        } else {
            self.misses += 1;
            None
        }
    }

    /// Compress the data frame `frame` of `header` (a raw chunk, its bytes
    /// after [`DATA_PREFIX_LEN`] bytes of headers) in place if that pays.
    /// Returns the frame's length.
    pub(crate) fn squeeze_frame(&mut self, mut header: ChunkHeader, frame: &mut [u8]) -> usize {
        let Some(packed) = self.squeeze(&frame[DATA_PREFIX_LEN..]) else {
            return frame.len();
        };
        let len = packed.len();
        frame[DATA_PREFIX_LEN..DATA_PREFIX_LEN + len].copy_from_slice(packed);
        header.codec = Codec::Zstd;
        write_data_prefix(&header, len, frame);
        DATA_PREFIX_LEN + len
    }
}

/// Encodes the chunks of a transfer: hashes them, and makes them delta
/// scripts or compresses them where that pays.
pub(crate) struct ChunkEncoder {
    squeezer: Squeezer,
    scratch: Vec<u8>,
}

impl ChunkEncoder {
    /// An encoder at a fixed level (`None`: raw). `auto` mode starts from
    /// the controller's level and follows it with [`set_level`](Self::set_level).
    pub(crate) fn new(level: Option<i32>) -> io::Result<Self> {
        Ok(ChunkEncoder {
            squeezer: Squeezer::new(level)?,
            scratch: Vec::new(),
        })
    }

    pub(crate) fn set_level(&mut self, level: Option<i32>) -> io::Result<()> {
        self.squeezer.set_level(level)
    }

    /// Make `frame` a data frame (of file `file_id`, at `offset`) around
    /// the raw bytes already read into it after [`DATA_PREFIX_LEN`] bytes
    /// of room: the bytes are not copied unless they compress. Returns the
    /// chunk's header and the frame's length, which is `frame.len()` unless
    /// the payload shrank.
    ///
    /// `pieces`, if any, say how the chunk is made of the receiver's basis
    /// and its own bytes: it goes as that delta script when the script is
    /// worth it, else raw or compressed as any chunk. With `squeeze` false
    /// it is not compressed here: a lane does that (see
    /// [`Squeezer::squeeze_frame`]).
    pub(crate) fn encode_in_place(
        &mut self,
        file_id: u64,
        offset: u64,
        frame: &mut [u8],
        pieces: &[Piece],
        squeeze: bool,
    ) -> (ChunkHeader, usize) {
        let raw = &frame[DATA_PREFIX_LEN..];
        let hash = chunk_hash(raw);
        let mut header = ChunkHeader {
            file_id,
            offset,
            raw_len: raw.len() as u32,
            codec: Codec::Raw,
            hash,
        };
        let mut payload_len = raw.len();
        let encoded = match self.try_delta(offset, raw, pieces) {
            Some(script) => Some((Codec::Delta, script)),
            None if squeeze => self.squeezer.squeeze(raw).map(|c| (Codec::Zstd, c)),
            None => None,
        };
        if let Some((codec, bytes)) = encoded {
            header.codec = codec;
            payload_len = bytes.len();
            frame[DATA_PREFIX_LEN..DATA_PREFIX_LEN + payload_len].copy_from_slice(bytes);
        }
        write_data_prefix(&header, payload_len, frame);
        (header, DATA_PREFIX_LEN + payload_len)
    }

    /// The delta script of the chunk `raw` at `offset` made of `pieces`,
    /// in the scratch buffer, if it has a copy and is worth it.
    fn try_delta(&mut self, offset: u64, raw: &[u8], pieces: &[Piece]) -> Option<&[u8]> {
        let copies = pieces.iter().any(|p| matches!(p, Piece::Copy { .. }));
        if !copies || pieces.len() > MAX_SCRIPT_OPS {
            return None;
        }
        self.scratch.clear();
        for piece in pieces {
            let op = match *piece {
                Piece::Copy { from, len } => Op::Copy { from, len },
                Piece::Literal { at, len } => {
                    let start = (at - offset) as usize;
                    Op::Literal(&raw[start..start + len as usize])
                }
            };
            push_op(&mut self.scratch, op);
        }
        worth_it(raw.len(), self.scratch.len()).then_some(&self.scratch[..])
    }

    /// Make `frame` (at least [`DATA_PREFIX_LEN`] bytes) the data frame of
    /// a full chunk of zeros of file `file_id` at `offset`: a hole, sent
    /// as its header alone. Returns the chunk's hash and the frame's length.
    pub(crate) fn encode_zeros(
        &mut self,
        file_id: u64,
        offset: u64,
        frame: &mut [u8],
    ) -> (u64, usize) {
        let header = ChunkHeader {
            file_id,
            offset,
            raw_len: DEFAULT_CHUNK_LEN,
            codec: Codec::Zeros,
            hash: zero_chunk_hash(),
        };
        write_data_prefix(&header, 0, frame);
        (header.hash, DATA_PREFIX_LEN)
    }
}

/// Why a received chunk was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChunkFault {
    #[error("chunk at offset {0} does not decompress: {1}")]
    Corrupt(u64, String),
    #[error("chunk at offset {0} failed its checksum (corrupted in transit)")]
    HashMismatch(u64),
}

/// A received data chunk, with the hash of a raw one checked where it was
/// read: on the connection's task, so that with several connections the
/// hashing spreads over the runtime's threads, and the thread that writes
/// the files only writes. A compressed chunk is checked once decompressed.
pub(crate) struct ReadChunk {
    pub(crate) chunk: DataChunk,
    raw_hash_ok: bool,
    /// Its bytes' share of the session's memory budget, given back when
    /// the chunk is dropped (written, or thrown away).
    _charge: Option<Charge>,
}

impl ReadChunk {
    pub(crate) fn check(chunk: DataChunk) -> Self {
        let raw_hash_ok = match chunk.header.codec {
            Codec::Raw => chunk_hash(&chunk.payload) == chunk.header.hash,
            // Always a full chunk (the frame decoder saw to it): one hash.
            Codec::Zeros => chunk.header.hash == zero_chunk_hash(),
            Codec::Zstd | Codec::Delta => false,
        };
        ReadChunk {
            chunk,
            raw_hash_ok,
            _charge: None,
        }
    }

    /// The chunk, holding `charge` for as long as it lives.
    pub(crate) fn charged(mut self, charge: Option<Charge>) -> Self {
        self._charge = charge;
        self
    }
}

/// What a verified chunk holds.
#[derive(Debug)]
pub(crate) enum Decoded<'a> {
    Bytes(&'a [u8]),
    /// As many zeros as the chunk's raw length: a hole of the file.
    Zeros,
}

/// Decodes received chunks, reusing one zstd context and one buffer.
pub(crate) struct ChunkDecoder {
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl ChunkDecoder {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(ChunkDecoder {
            decompressor: zstd::bulk::Decompressor::new()?,
            scratch: Vec::new(),
        })
    }

    /// The verified raw bytes of `read`. Decompression is bounded by the
    /// declared raw length, which the frame decoder already capped, and so
    /// is a delta script's rebuilding from `basis`, the receiver's version
    /// of the file (without one, a delta is damage).
    pub(crate) fn decode<'a>(
        &'a mut self,
        read: &'a ReadChunk,
        basis: Option<BorrowedFd<'_>>,
    ) -> Result<Decoded<'a>, ChunkFault> {
        let chunk = &read.chunk;
        let h = &chunk.header;
        let raw: &[u8] = match h.codec {
            Codec::Raw if read.raw_hash_ok => return Ok(Decoded::Bytes(&chunk.payload)),
            Codec::Zeros if read.raw_hash_ok => return Ok(Decoded::Zeros),
            Codec::Raw | Codec::Zeros => return Err(ChunkFault::HashMismatch(h.offset)),
            Codec::Zstd => {
                self.scratch.clear();
                self.scratch.reserve(h.raw_len as usize);
                let n = self
                    .decompressor
                    .decompress_to_buffer(&chunk.payload[..], &mut self.scratch)
                    .map_err(|e| ChunkFault::Corrupt(h.offset, e.to_string()))?;
                if n != h.raw_len as usize {
                    return Err(ChunkFault::Corrupt(
                        h.offset,
                        format!("{n} bytes instead of {}", h.raw_len),
                    ));
                }
                &self.scratch
            }
            Codec::Delta => {
                let corrupt = |why: String| ChunkFault::Corrupt(h.offset, why);
                let ops = ferry_proto::delta::parse_script(&chunk.payload, h.raw_len)
                    .map_err(|e| corrupt(e.to_string()))?;
                let basis =
                    basis.ok_or_else(|| corrupt("a delta for a file with no basis".into()))?;
                crate::delta::rebuild(&ops, basis, &mut self.scratch).map_err(corrupt)?;
                &self.scratch
            }
        };
        if chunk_hash(raw) != h.hash {
            return Err(ChunkFault::HashMismatch(h.offset));
        }
        Ok(Decoded::Bytes(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use ferry_proto::frame::{Frame, decode};

    /// Append the data frame for `raw` to `out`, as the sender builds it:
    /// read into room behind the headers, then encoded in place.
    impl ChunkEncoder {
        fn encode(&mut self, file_id: u64, offset: u64, raw: &[u8], out: &mut BytesMut) -> u64 {
            let start = out.len();
            out.extend_from_slice(&[0; DATA_PREFIX_LEN]);
            out.extend_from_slice(raw);
            let (header, len) = self.encode_in_place(file_id, offset, &mut out[start..], &[], true);
            out.truncate(start + len);
            header.hash
        }
    }

    fn round_trip(level: Option<i32>, raw: &[u8]) -> (Codec, Vec<u8>) {
        let mut enc = ChunkEncoder::new(level).unwrap();
        let mut buf = BytesMut::new();
        enc.encode(5, 0, raw, &mut buf);
        let Some(Frame::Data(chunk)) = decode(&mut buf).unwrap() else {
            panic!("not a data frame")
        };
        let mut dec = ChunkDecoder::new().unwrap();
        let codec = chunk.header.codec;
        let read = ReadChunk::check(chunk);
        let Ok(Decoded::Bytes(out)) = dec.decode(&read, None) else {
            panic!("no bytes decoded");
        };
        (codec, out.to_vec())
    }

    fn noise(n: usize) -> Vec<u8> {
        crate::noise(n, 0x9e3779b97f4a7c15)
    }

    #[test]
    fn text_is_compressed_noise_is_not() {
        let text = b"the quick brown fox jumps over the lazy dog\n".repeat(1000);
        assert_eq!(round_trip(Some(1), &text), (Codec::Zstd, text.clone()));
        assert_eq!(round_trip(None, &text), (Codec::Raw, text));
        let rnd = noise(100_000);
        assert_eq!(round_trip(Some(3), &rnd), (Codec::Raw, rnd));
    }

    #[test]
    fn gives_up_on_incompressible_data_then_samples_again() {
        let mut enc = ChunkEncoder::new(Some(1)).unwrap();
        let rnd = noise(4096);
        let text = b"abc".repeat(2000);
        let mut buf = BytesMut::new();
        for _ in 0..GIVE_UP_AFTER {
            enc.encode(1, 0, &rnd, &mut buf);
        }
        let tried = (0..RESAMPLE_EVERY)
            .filter(|_| enc.squeezer.squeeze(&text).is_some())
            .count();
        assert_eq!(
            tried, 1,
            "after giving up, one chunk in {RESAMPLE_EVERY} is tried"
        );
        assert!(
            enc.squeezer.squeeze(&text).is_some(),
            "a chunk that shrank resumes compression"
        );
    }

    #[test]
    fn a_hole_travels_as_its_header_and_a_wrong_hash_is_caught() {
        let mut enc = ChunkEncoder::new(Some(1)).unwrap();
        let mut frame = vec![0xaa; DATA_PREFIX_LEN];
        let (hash, len) = enc.encode_zeros(3, 1 << 20, &mut frame);
        assert_eq!(len, DATA_PREFIX_LEN);
        assert_eq!(hash, chunk_hash(&vec![0; DEFAULT_CHUNK_LEN as usize]));
        let mut buf = BytesMut::from(&frame[..]);
        let Some(Frame::Data(chunk)) = decode(&mut buf).unwrap() else {
            panic!("not a data frame")
        };
        assert_eq!(chunk.header.codec, Codec::Zeros);
        let mut dec = ChunkDecoder::new().unwrap();
        let mut wrong = chunk.clone();
        assert!(matches!(
            dec.decode(&ReadChunk::check(chunk), None),
            Ok(Decoded::Zeros)
        ));
        wrong.header.hash ^= 1;
        assert!(matches!(
            dec.decode(&ReadChunk::check(wrong), None),
            Err(ChunkFault::HashMismatch(_))
        ));
    }

    #[test]
    fn corruption_is_caught() {
        // Raw chunks are checked when read, compressed ones when decoded.
        let text = b"the quick brown fox jumps over the lazy dog\n".repeat(100);
        for level in [None, Some(1)] {
            let mut enc = ChunkEncoder::new(level).unwrap();
            let mut buf = BytesMut::new();
            enc.encode(1, 0, &text, &mut buf);
            let last = buf.len() - 1;
            buf[last] ^= 1;
            let Some(Frame::Data(chunk)) = decode(&mut buf).unwrap() else {
                panic!()
            };
            let mut dec = ChunkDecoder::new().unwrap();
            let read = ReadChunk::check(chunk);
            let fault = dec.decode(&read, None);
            assert!(
                matches!(
                    fault,
                    Err(ChunkFault::HashMismatch(0) | ChunkFault::Corrupt(0, _))
                ),
                "{level:?}: {fault:?}"
            );
        }
    }

    #[test]
    fn a_delta_is_rebuilt_from_the_basis_and_a_changed_basis_is_caught() {
        use std::io::Write;
        use std::os::fd::AsFd;
        use std::os::unix::fs::FileExt;
        let basis_bytes = noise(64 * 1024);
        let mut basis = tempfile::tempfile().unwrap();
        basis.write_all(&basis_bytes).unwrap();
        // The chunk at offset 4096: 40,000 bytes of the basis, then new ones.
        let mut raw = basis_bytes[1000..41_000].to_vec();
        raw.extend_from_slice(b"new bytes");
        let pieces = [
            Piece::Copy {
                from: 1000,
                len: 40_000,
            },
            Piece::Literal {
                at: 4096 + 40_000,
                len: 9,
            },
        ];
        let mut enc = ChunkEncoder::new(None).unwrap();
        let mut buf = BytesMut::from(&[0; DATA_PREFIX_LEN][..]);
        buf.extend_from_slice(&raw);
        let (_, len) = enc.encode_in_place(2, 4096, &mut buf, &pieces, true);
        buf.truncate(len);
        let Some(Frame::Data(chunk)) = decode(&mut buf).unwrap() else {
            panic!("not a data frame")
        };
        assert_eq!(chunk.header.codec, Codec::Delta);
        assert!(chunk.payload.len() < 100, "{} bytes", chunk.payload.len());
        let mut dec = ChunkDecoder::new().unwrap();
        let read = ReadChunk::check(chunk);
        match dec.decode(&read, Some(basis.as_fd())) {
            Ok(Decoded::Bytes(out)) => assert!(out == &raw[..]),
            other => panic!("{other:?}"),
        }
        // Without its basis, or with the basis changed since its signature.
        assert!(dec.decode(&read, None).is_err());
        basis.write_all_at(b"changed", 2000).unwrap();
        assert!(matches!(
            dec.decode(&read, Some(basis.as_fd())),
            Err(ChunkFault::HashMismatch(4096))
        ));
    }
}
