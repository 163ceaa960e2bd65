//! Data chunks: the binary payload of a `Data` frame.
//!
//! ```text
//! file_id  u64 BE   which file (the id of its Entry message)
//! offset   u64 BE   where the raw bytes belong in the file
//! raw_len  u32 BE   length of the raw bytes, 1..=MAX_CHUNK_LEN
//! codec    u8       0 = raw, 1 = zstd, 2 = zeros, 3 = delta
//! hash     u64 BE   XXH3-64 of the raw bytes
//! payload  …        raw bytes, one zstd frame that decodes to raw_len bytes,
//!                   nothing (zeros: a hole of a sparse file), or a
//!                   delta script (copies from the receiver's basis and
//!                   literal bytes, see [`crate::delta`])
//! ```

use bytes::{Buf, BufMut, Bytes};
use thiserror::Error;

use crate::limits::{DEFAULT_CHUNK_LEN, MAX_CHUNK_LEN};

/// Length of the fixed chunk header.
pub const CHUNK_HEADER_LEN: usize = 8 + 8 + 4 + 1 + 8;

/// How a chunk's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
    /// `raw_len` zero bytes, with no payload: a whole chunk inside a hole
    /// of a sparse file. Only ever a full chunk of [`DEFAULT_CHUNK_LEN`]
    /// bytes, so that its hash is one the receiver knows already (a peer
    /// cannot make it hash megabytes for a few bytes on the wire).
    Zeros = 2,
    /// A delta script ([`crate::delta`]) that rebuilds the raw bytes from
    /// the receiver's basis of the file and literal bytes; only ever sent
    /// for a file whose basis the receiver described in a `signature`,
    /// and only when shorter than the raw bytes.
    Delta = 3,
}

/// The fixed header of a data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub file_id: u64,
    pub offset: u64,
    pub raw_len: u32,
    pub codec: Codec,
    pub hash: u64,
}

/// A data chunk as decoded from a frame: header plus encoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataChunk {
    pub header: ChunkHeader,
    pub payload: Bytes,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("data chunk shorter than its {CHUNK_HEADER_LEN}-byte header ({0} bytes)")]
    Short(usize),
    #[error("data chunk uses unknown codec {0}")]
    UnknownCodec(u8),
    #[error("data chunk declares {0} raw bytes; allowed is 1..={MAX_CHUNK_LEN}")]
    BadRawLen(u32),
    #[error("data chunk payload is {payload} bytes for {raw_len} raw bytes with codec {codec:?}")]
    PayloadMismatch {
        payload: usize,
        raw_len: u32,
        codec: Codec,
    },
    #[error("data chunk at offset {0} overflows the file offset range")]
    OffsetOverflow(u64),
}

impl ChunkHeader {
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u64(self.file_id);
        dst.put_u64(self.offset);
        dst.put_u32(self.raw_len);
        dst.put_u8(self.codec as u8);
        dst.put_u64(self.hash);
    }

    /// The end offset of the raw bytes (checked at decode time not to overflow).
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.raw_len)
    }
}

impl DataChunk {
    /// Decode and validate a data frame's payload. The payload is not
    /// decompressed here; its hash is checked by the engine after it is.
    pub fn decode(mut body: Bytes) -> Result<Self, ChunkError> {
        if body.len() < CHUNK_HEADER_LEN {
            return Err(ChunkError::Short(body.len()));
        }
        let file_id = body.get_u64();
        let offset = body.get_u64();
        let raw_len = body.get_u32();
        let codec = match body.get_u8() {
            0 => Codec::Raw,
            1 => Codec::Zstd,
            2 => Codec::Zeros,
            3 => Codec::Delta,
            other => return Err(ChunkError::UnknownCodec(other)),
        };
        let hash = body.get_u64();
        if raw_len == 0 || raw_len > MAX_CHUNK_LEN {
            return Err(ChunkError::BadRawLen(raw_len));
        }
        if offset.checked_add(u64::from(raw_len)).is_none() {
            return Err(ChunkError::OffsetOverflow(offset));
        }
        // A compressed payload is only ever sent when it is smaller than the
        // raw bytes, so a longer one is malformed.
        let payload_ok = match codec {
            Codec::Raw => body.len() == raw_len as usize,
            Codec::Zstd | Codec::Delta => !body.is_empty() && body.len() < raw_len as usize,
            Codec::Zeros => body.is_empty() && raw_len == DEFAULT_CHUNK_LEN,
        };
        if !payload_ok {
            return Err(ChunkError::PayloadMismatch {
                payload: body.len(),
                raw_len,
                codec,
            });
        }
        Ok(DataChunk {
            header: ChunkHeader {
                file_id,
                offset,
                raw_len,
                codec,
                hash,
            },
            payload: body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(h: &ChunkHeader, payload: &[u8]) -> Bytes {
        let mut v = Vec::new();
        h.encode(&mut v);
        v.extend_from_slice(payload);
        Bytes::from(v)
    }

    #[test]
    fn golden_bytes() {
        let h = ChunkHeader {
            file_id: 7,
            offset: 0x10_0000,
            raw_len: 3,
            codec: Codec::Raw,
            hash: 0x0102030405060708,
        };
        let bytes = encode(&h, b"abc");
        assert_eq!(
            &bytes[..],
            &[
                0, 0, 0, 0, 0, 0, 0, 7, // file id
                0, 0, 0, 0, 0, 0x10, 0, 0, // offset
                0, 0, 0, 3, // raw length
                0, // codec raw
                1, 2, 3, 4, 5, 6, 7, 8, // hash
                b'a', b'b', b'c',
            ]
        );
    }

    #[test]
    fn rejects_malformed_headers() {
        let base = ChunkHeader {
            file_id: 1,
            offset: 0,
            raw_len: 4,
            codec: Codec::Raw,
            hash: 0,
        };
        assert_eq!(
            DataChunk::decode(Bytes::from_static(&[0; 10])),
            Err(ChunkError::Short(10))
        );
        assert!(matches!(
            DataChunk::decode(encode(&base, b"abc")),
            Err(ChunkError::PayloadMismatch { .. })
        ));
        let zero = ChunkHeader { raw_len: 0, ..base };
        assert_eq!(
            DataChunk::decode(encode(&zero, b"")),
            Err(ChunkError::BadRawLen(0))
        );
        let huge = ChunkHeader {
            raw_len: MAX_CHUNK_LEN + 1,
            ..base
        };
        assert!(matches!(
            DataChunk::decode(encode(&huge, b"")),
            Err(ChunkError::BadRawLen(_))
        ));
        let overflow = ChunkHeader {
            offset: u64::MAX - 1,
            ..base
        };
        assert!(matches!(
            DataChunk::decode(encode(&overflow, b"abcd")),
            Err(ChunkError::OffsetOverflow(_))
        ));
        let zstd_bigger = ChunkHeader {
            codec: Codec::Zstd,
            ..base
        };
        assert!(matches!(
            DataChunk::decode(encode(&zstd_bigger, b"abcd")),
            Err(ChunkError::PayloadMismatch { .. })
        ));
        // Zeros: no payload, and only a full chunk.
        let zeros = ChunkHeader {
            codec: Codec::Zeros,
            raw_len: DEFAULT_CHUNK_LEN,
            ..base
        };
        assert_eq!(
            DataChunk::decode(encode(&zeros, b"")).map(|c| c.header),
            Ok(zeros)
        );
        assert!(matches!(
            DataChunk::decode(encode(&zeros, b"\0")),
            Err(ChunkError::PayloadMismatch { .. })
        ));
        let short_zeros = ChunkHeader {
            raw_len: DEFAULT_CHUNK_LEN - 1,
            ..zeros
        };
        assert!(matches!(
            DataChunk::decode(encode(&short_zeros, b"")),
            Err(ChunkError::PayloadMismatch { .. })
        ));
        let mut bad_codec = encode(&base, b"abcd").to_vec();
        bad_codec[20] = 9;
        assert_eq!(
            DataChunk::decode(Bytes::from(bad_codec)),
            Err(ChunkError::UnknownCodec(9))
        );
    }

    proptest! {
        #[test]
        fn round_trip(file_id: u64, offset in 0u64..u64::MAX / 2, hash: u64, payload in proptest::collection::vec(any::<u8>(), 1..2048)) {
            let h = ChunkHeader { file_id, offset, raw_len: payload.len() as u32, codec: Codec::Raw, hash };
            let chunk = DataChunk::decode(encode(&h, &payload)).unwrap();
            prop_assert_eq!(chunk.header, h);
            prop_assert_eq!(&chunk.payload[..], &payload[..]);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = DataChunk::decode(Bytes::from(bytes));
        }
    }
}
