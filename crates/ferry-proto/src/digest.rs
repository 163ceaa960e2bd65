//! Integrity: chunk hashes and whole-file digests.
//!
//! Every chunk carries the XXH3-64 of its raw bytes, checked by the
//! receiver before the bytes are written. Every file ends with a digest:
//! XXH3-128 over the file size (u64 LE) followed by the XXH3-64 of each
//! chunk (u64 LE) in offset order. Because the digest is computed over the
//! chunk hashes rather than the content, the receiver can compute it no
//! matter in which order chunks arrive, without reading the file again,
//! and it proves that the chunks it wrote tile the file exactly.

use std::collections::BTreeMap;

use thiserror::Error;
use twox_hash::{XxHash3_64, XxHash3_128};

/// XXH3-64 of a chunk's raw bytes.
pub fn chunk_hash(raw: &[u8]) -> u64 {
    XxHash3_64::oneshot(raw)
}

/// The hash of a full chunk of zeros (codec `zeros`), computed once.
pub fn zero_chunk_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| chunk_hash(&vec![0; crate::limits::DEFAULT_CHUNK_LEN as usize]))
}

/// A whole-file digest, rendered on the wire as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest(pub u128);

impl FileDigest {
    pub fn to_hex(self) -> String {
        // By hand, as `from_hex`: once per file sent.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (i, digit) in hex.iter_mut().enumerate() {
            *digit = DIGITS[(self.0 >> (4 * (31 - i))) as usize & 0xf];
        }
        String::from_utf8_lossy(&hex).into_owned()
    }

    /// Exactly 32 hex digits, either case. (Parsed by hand: this runs once
    /// per file received, and `from_str_radix` costs more than the rest of
    /// a small file's bookkeeping.)
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        s.bytes()
            .try_fold(0u128, |acc, b| {
                let digit = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    b'A'..=b'F' => b - b'A' + 10,
                    _ => return None,
                };
                Some(acc << 4 | u128::from(digit))
            })
            .map(FileDigest)
    }
}

/// Builds a [`FileDigest`] from chunk hashes supplied in offset order (the
/// sender's side).
pub struct DigestBuilder {
    hasher: XxHash3_128,
}

impl DigestBuilder {
    pub fn new(file_size: u64) -> Self {
        let mut hasher = XxHash3_128::new();
        hasher.write(&file_size.to_le_bytes());
        DigestBuilder { hasher }
    }

    pub fn push(&mut self, chunk_hash: u64) {
        self.hasher.write(&chunk_hash.to_le_bytes());
    }

    pub fn finish(&self) -> FileDigest {
        FileDigest(self.hasher.finish_128())
    }
}

/// Why a chunk or a file was refused by the ledger.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("chunk at offset {offset} (+{len}) lies beyond the declared size {size}")]
    BeyondEnd { offset: u64, len: u32, size: u64 },
    #[error("chunk at offset {offset} overlaps data already received")]
    Overlap { offset: u64 },
    #[error("file incomplete: {received} of {size} bytes received")]
    Incomplete { received: u64, size: u64 },
    #[error("chunk at offset {offset} arrived too far ahead of the data before it")]
    TooFarAhead { offset: u64 },
    #[error("file digest mismatch: sender says {expected}, received data gives {actual}")]
    DigestMismatch { expected: String, actual: String },
}

/// How many chunks of one file may wait ahead of a gap. Senders keep far
/// fewer in flight; the bound keeps a hostile one from growing the map.
pub const MAX_CHUNKS_AHEAD: usize = 4096;

/// The receiver's record of one file's verified chunks.
///
/// Chunks may be recorded in any order; those that arrive ahead of the
/// contiguous prefix wait in a map (at most [`MAX_CHUNKS_AHEAD`]), so memory
/// is bounded by how far out of order the sender runs, not by the file size.
pub struct ChunkLedger {
    size: u64,
    contiguous_end: u64,
    digest: DigestBuilder,
    ahead: BTreeMap<u64, (u32, u64)>,
}

impl ChunkLedger {
    pub fn new(size: u64) -> Self {
        ChunkLedger {
            size,
            contiguous_end: 0,
            digest: DigestBuilder::new(size),
            ahead: BTreeMap::new(),
        }
    }

    /// Check that a chunk fits the file and overlaps nothing already
    /// recorded. Call before writing it.
    pub fn check(&self, offset: u64, len: u32) -> Result<(), LedgerError> {
        let end = offset.saturating_add(u64::from(len));
        if end > self.size {
            return Err(LedgerError::BeyondEnd {
                offset,
                len,
                size: self.size,
            });
        }
        let overlaps_prefix = offset < self.contiguous_end;
        let overlaps_before = self
            .ahead
            .range(..=offset)
            .next_back()
            .is_some_and(|(&o, &(l, _))| o + u64::from(l) > offset);
        let overlaps_after = self.ahead.range(offset..end).next().is_some();
        if overlaps_prefix || overlaps_before || overlaps_after {
            return Err(LedgerError::Overlap { offset });
        }
        if offset != self.contiguous_end && self.ahead.len() >= MAX_CHUNKS_AHEAD {
            return Err(LedgerError::TooFarAhead { offset });
        }
        Ok(())
    }

    /// Record a chunk that was verified and written.
    pub fn record(&mut self, offset: u64, len: u32, hash: u64) -> Result<(), LedgerError> {
        self.check(offset, len)?;
        self.ahead.insert(offset, (len, hash));
        while let Some((len, hash)) = self.ahead.remove(&self.contiguous_end) {
            self.digest.push(hash);
            self.contiguous_end += u64::from(len);
        }
        Ok(())
    }

    /// Whether every byte of the file has been recorded.
    pub fn is_complete(&self) -> bool {
        self.contiguous_end == self.size && self.ahead.is_empty()
    }

    /// Bytes received so far (contiguous or not).
    pub fn received(&self) -> u64 {
        self.contiguous_end + self.ahead.values().map(|&(l, _)| u64::from(l)).sum::<u64>()
    }

    /// Confirm the file is whole and matches the sender's digest.
    pub fn finish(&self, expected: FileDigest) -> Result<(), LedgerError> {
        if self.contiguous_end != self.size || !self.ahead.is_empty() {
            return Err(LedgerError::Incomplete {
                received: self.received(),
                size: self.size,
            });
        }
        let actual = self.digest.finish();
        if actual != expected {
            return Err(LedgerError::DigestMismatch {
                expected: expected.to_hex(),
                actual: actual.to_hex(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender_digest(size: u64, hashes: &[u64]) -> FileDigest {
        let mut d = DigestBuilder::new(size);
        hashes.iter().for_each(|&h| d.push(h));
        d.finish()
    }

    #[test]
    fn known_vectors() {
        // Pinned so that the digest definition in PROTOCOL.md cannot drift.
        assert_eq!(chunk_hash(b""), 0x2d06800538d394c2);
        assert_eq!(chunk_hash(b"ferry"), chunk_hash(b"ferry"));
        let empty = sender_digest(0, &[]);
        assert_eq!(empty, FileDigest(XxHash3_128::oneshot(&0u64.to_le_bytes())));
        assert_eq!(FileDigest::from_hex(&empty.to_hex()), Some(empty));
        assert_eq!(FileDigest::from_hex("xyz"), None);
    }

    #[test]
    fn hex_digests_parse_exactly() {
        let d = FileDigest(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(FileDigest::from_hex(&d.to_hex()), Some(d));
        let upper = d.to_hex().to_uppercase();
        assert_eq!(FileDigest::from_hex(&upper), Some(d));
        assert_eq!(
            FileDigest::from_hex(&"f".repeat(32)),
            Some(FileDigest(u128::MAX))
        );
        for bad in [
            "",
            "0",
            &"0".repeat(31),
            &"0".repeat(33),
            &format!("{}g", "0".repeat(31)),
        ] {
            assert_eq!(FileDigest::from_hex(bad), None, "{bad:?}");
        }
        // Signs and spaces, which a radix parser might let through.
        assert_eq!(FileDigest::from_hex(&format!("+{}", "0".repeat(31))), None);
        assert_eq!(FileDigest::from_hex(&format!(" {}", "0".repeat(31))), None);
    }

    /// The known values table of PROTOCOL.md §7.
    #[test]
    fn protocol_md_known_values() {
        assert_eq!(
            sender_digest(0, &[]).to_hex(),
            "2c0a8a99dc147d5445c3b49d035665b2"
        );
        assert_eq!(chunk_hash(b"hello"), 0x9555e8555c62dcfd);
        assert_eq!(
            sender_digest(5, &[chunk_hash(b"hello")]).to_hex(),
            "553ac1fdd3cd2fbe408dc8693462f526"
        );
        assert_eq!(chunk_hash(b"hel"), 0xfe825c2a2852b8dd);
        assert_eq!(chunk_hash(b"lo"), 0xb04cdb1c3986b215);
        let split = sender_digest(5, &[chunk_hash(b"hel"), chunk_hash(b"lo")]);
        assert_eq!(split.to_hex(), "5ccd4a109ccdf5bdf5ce1c9cce84e144");
    }

    #[test]
    fn out_of_order_chunks_give_the_sender_digest() {
        let expected = sender_digest(10, &[11, 22, 33]);
        let mut ledger = ChunkLedger::new(10);
        ledger.record(8, 2, 33).unwrap();
        ledger.record(0, 4, 11).unwrap();
        assert!(ledger.finish(expected).is_err());
        assert!(!ledger.is_complete());
        ledger.record(4, 4, 22).unwrap();
        assert!(ledger.is_complete());
        ledger.finish(expected).unwrap();
    }

    #[test]
    fn refuses_overlaps_gaps_and_overruns() {
        let mut ledger = ChunkLedger::new(10);
        ledger.record(0, 4, 1).unwrap();
        assert_eq!(
            ledger.record(2, 4, 2),
            Err(LedgerError::Overlap { offset: 2 })
        );
        ledger.record(6, 2, 3).unwrap();
        assert_eq!(
            ledger.record(5, 2, 2),
            Err(LedgerError::Overlap { offset: 5 })
        );
        assert!(matches!(
            ledger.record(9, 2, 2),
            Err(LedgerError::BeyondEnd { .. })
        ));
        assert!(matches!(
            ledger.finish(sender_digest(10, &[1, 3])),
            Err(LedgerError::Incomplete { .. })
        ));
    }

    #[test]
    fn out_of_order_backlog_is_bounded() {
        let n = MAX_CHUNKS_AHEAD as u64 + 2;
        let mut ledger = ChunkLedger::new(n);
        for offset in 1..=MAX_CHUNKS_AHEAD as u64 {
            ledger.record(offset, 1, 0).unwrap();
        }
        assert_eq!(
            ledger.record(n - 1, 1, 0),
            Err(LedgerError::TooFarAhead { offset: n - 1 })
        );
        ledger.record(0, 1, 0).unwrap();
        ledger.record(n - 1, 1, 0).unwrap();
    }

    #[test]
    fn wrong_digest_is_refused() {
        let mut ledger = ChunkLedger::new(4);
        ledger.record(0, 4, 1).unwrap();
        assert!(matches!(
            ledger.finish(sender_digest(4, &[2])),
            Err(LedgerError::DigestMismatch { .. })
        ));
    }
}
