//! Delta transfer, without I/O: a file the receiver already holds in
//! another version (its *basis*) is sent as the parts that differ.
//!
//! Both sides cut files at content-defined boundaries (FastCDC, with the
//! parameters of [`CdcParams`]), so a boundary depends on the bytes around
//! it and not on its offset: an insertion shifts the data after it, and
//! the blocks there are found again. The receiver describes its basis in a
//! [`Signature`]: the length and XXH3-64 of each block, in order. The
//! sender cuts its file the same way, finds its blocks that the basis
//! has, and sends each chunk of the file that the matches reach as a
//! delta script ([`Op`]s: copy from the basis, or literal bytes) in place
//! of its raw bytes. A chunk is still the 1 MiB window of the plain
//! transfer, hashed over its raw bytes: the receiver rebuilds it from its
//! basis and the literals and checks that hash before writing a byte, so a
//! block that matched by accident, or a basis changed meanwhile, is caught
//! like any damaged chunk.

use std::collections::HashMap;

use base64::Engine;
use thiserror::Error;

/// The smallest file (new and basis alike) worth a signature: below it the
/// whole file costs little more than its description.
pub const DELTA_MIN_SIZE: u64 = 64 * 1024;

/// The number of blocks a signature aims at: the average block grows with
/// the basis so that a signature stays near 500 KB on the wire, while a
/// change costs about one or two average blocks (measured on 1 GiB with
/// 101 edits of 4 KiB: 16,384 blocks of 64 KiB cost 11.9 MB on the wire,
/// 32,768 of 32 KiB 6.4 MB; rsync 4.0 MB).
const TARGET_BLOCKS: u64 = 32 * 1024;

/// Bounds of the average block.
pub const MIN_AVG_BLOCK: u32 = 8 * 1024;
pub const MAX_AVG_BLOCK: u32 = 1024 * 1024;

/// Most blocks one file's signature may have: four times the target, as
/// many as a basis cut into blocks of the minimum size (a quarter of the
/// average) has. A signature may describe only the start of its basis, as
/// a receiver does with a basis of more than about 128 GiB (whose blocks
/// are 1 MiB on average at most).
pub const MAX_SIGNATURE_BLOCKS: usize = 4 * TARGET_BLOCKS as usize;

/// Most blocks a receiver may have described in signatures of files whose
/// data block has not ended yet; what a sender holds at once.
pub const MAX_SIGNED_AHEAD: usize = MAX_SIGNATURE_BLOCKS;

/// Most blocks in one `signature` message (12 bytes each, base64: 128 KiB
/// of JSON, well within a control frame).
pub const MAX_BLOCKS_PER_MESSAGE: usize = 8 * 1024;

/// Most operations in one chunk's delta script.
pub const MAX_SCRIPT_OPS: usize = 4096;

/// The bytes a block takes in a signature: length u32 BE, hash u64 BE.
const BLOCK_LEN: usize = 12;

/// FastCDC's sizes: blocks are cut between `min` and `max` bytes, `avg` on
/// average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdcParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl CdcParams {
    /// The parameters for a basis of `size` bytes.
    pub fn for_basis(size: u64) -> CdcParams {
        let wanted = (size / TARGET_BLOCKS).next_power_of_two();
        let avg = wanted.clamp(u64::from(MIN_AVG_BLOCK), u64::from(MAX_AVG_BLOCK)) as u32;
        Self::of_avg(avg).expect("a power of two within the bounds")
    }

    /// The parameters of the average `avg` a peer named: a power of two
    /// within the bounds, or none.
    pub fn of_avg(avg: u32) -> Option<CdcParams> {
        let ok = avg.is_power_of_two() && (MIN_AVG_BLOCK..=MAX_AVG_BLOCK).contains(&avg);
        ok.then_some(CdcParams {
            min: avg / 4,
            avg,
            max: avg * 4,
        })
    }
}

/// One block of a basis: `len` bytes whose XXH3-64 is `hash`. The blocks
/// of a signature tile the basis from offset 0, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub len: u32,
    pub hash: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("signature blocks are not base64")]
    NotBase64,
    #[error("signature blocks are {0} bytes, not a multiple of 12")]
    Ragged(usize),
    #[error("a signature has more than {max} blocks in one message")]
    TooMany { max: usize },
    #[error("a signature block is empty or longer than its maximum ({max} bytes)")]
    BadBlockLen { max: u32 },
    #[error("the average block size {0} is not a power of two between 8 KiB and 1 MiB")]
    BadAverage(u32),
}

/// The `blocks` member of a `signature` message: each block as its length
/// and hash, big-endian, the whole in standard base64.
pub fn encode_blocks(blocks: &[Block]) -> String {
    let mut raw = Vec::with_capacity(blocks.len() * BLOCK_LEN);
    for b in blocks {
        raw.extend_from_slice(&b.len.to_be_bytes());
        raw.extend_from_slice(&b.hash.to_be_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The blocks of one `signature` message, checked against `params`: at
/// most [`MAX_BLOCKS_PER_MESSAGE`], each 1 to `max` bytes long.
pub fn decode_blocks(text: &str, params: CdcParams) -> Result<Vec<Block>, SignatureError> {
    // Checked before decoding, so a peer cannot make us decode megabytes.
    if text.len() > (MAX_BLOCKS_PER_MESSAGE * BLOCK_LEN).div_ceil(3) * 4 {
        return Err(SignatureError::TooMany {
            max: MAX_BLOCKS_PER_MESSAGE,
        });
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SignatureError::NotBase64)?;
    if raw.len() % BLOCK_LEN != 0 {
        return Err(SignatureError::Ragged(raw.len()));
    }
    raw.chunks_exact(BLOCK_LEN)
        .map(|b| {
            let len = u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
            let hash = u64::from_be_bytes(b[4..].try_into().expect("8 bytes"));
            match len >= 1 && len <= params.max {
                true => Ok(Block { len, hash }),
                false => Err(SignatureError::BadBlockLen { max: params.max }),
            }
        })
        .collect()
}

/// A basis as its signature describes it, for the sender to look blocks up
/// in: where each distinct block (hash and length) first starts.
#[derive(Debug)]
pub struct BasisIndex {
    pub params: CdcParams,
    starts: HashMap<(u64, u32), u64>,
}

impl BasisIndex {
    pub fn new(params: CdcParams, blocks: &[Block]) -> BasisIndex {
        let mut starts = HashMap::with_capacity(blocks.len());
        let mut offset = 0u64;
        for b in blocks {
            starts.entry((b.hash, b.len)).or_insert(offset);
            offset += u64::from(b.len);
        }
        BasisIndex { params, starts }
    }

    /// Where the basis has a block of `len` bytes with this hash.
    pub fn find(&self, hash: u64, len: u32) -> Option<u64> {
        self.starts.get(&(hash, len)).copied()
    }
}

/// A run of the new file found in the basis: `len` bytes at `at` in the
/// new file are the bytes at `from` in the basis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub at: u64,
    pub from: u64,
    pub len: u64,
}

/// The matches of a new file, in increasing order of `at`, neighbours that
/// continue each other merged into one run.
#[derive(Debug, Default)]
pub struct Matches {
    runs: Vec<Match>,
}

impl Matches {
    /// Add a match after every one added so far.
    pub fn push(&mut self, m: Match) {
        if let Some(last) = self.runs.last_mut()
            && last.at + last.len == m.at
            && last.from + last.len == m.from
        {
            last.len += m.len;
            return;
        }
        self.runs.push(m);
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// How the window `[start, start + len)` of the new file is made: the
    /// parts found in the basis as copies, the rest as literals.
    pub fn window(&self, start: u64, len: u32) -> Vec<Piece> {
        let end = start + u64::from(len);
        // The first run that ends after the window starts.
        let first = self.runs.partition_point(|m| m.at + m.len <= start);
        let mut pieces = Vec::new();
        let mut at = start;
        for m in self.runs[first..].iter().take_while(|m| m.at < end) {
            let from_here = m.at.max(start);
            if from_here > at {
                pieces.push(Piece::Literal {
                    at,
                    len: (from_here - at) as u32,
                });
            }
            let to = (m.at + m.len).min(end);
            pieces.push(Piece::Copy {
                from: m.from + (from_here - m.at),
                len: (to - from_here) as u32,
            });
            at = to;
        }
        if at < end {
            pieces.push(Piece::Literal {
                at,
                len: (end - at) as u32,
            });
        }
        pieces
    }

    /// Whether any of the window `[start, start + len)` is in the basis.
    pub fn reaches(&self, start: u64, len: u32) -> bool {
        let first = self.runs.partition_point(|m| m.at + m.len <= start);
        self.runs
            .get(first)
            .is_some_and(|m| m.at < start + u64::from(len))
    }
}

/// A part of a chunk being sent as a delta: copied from the basis, or the
/// new file's own bytes at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Copy { from: u64, len: u32 },
    Literal { at: u64, len: u32 },
}

/// One operation of a delta script, as a receiver reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// `len` bytes of the basis, from `from`.
    Copy { from: u64, len: u32 },
    /// These bytes.
    Literal(&'a [u8]),
}

const TAG_COPY: u8 = 0;
const TAG_LITERAL: u8 = 1;

/// Append one operation to a script.
pub fn push_op(script: &mut Vec<u8>, op: Op<'_>) {
    match op {
        Op::Copy { from, len } => {
            script.push(TAG_COPY);
            script.extend_from_slice(&from.to_be_bytes());
            script.extend_from_slice(&len.to_be_bytes());
        }
        Op::Literal(bytes) => {
            script.push(TAG_LITERAL);
            script.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
            script.extend_from_slice(bytes);
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScriptError {
    #[error("delta script is cut short")]
    Truncated,
    #[error("delta script has an unknown operation {0}")]
    UnknownOp(u8),
    #[error("delta script has an empty operation")]
    Empty,
    #[error("delta script has more than {MAX_SCRIPT_OPS} operations")]
    TooManyOps,
    #[error("delta script makes {made} bytes, not the chunk's {raw_len}")]
    WrongLength { made: u64, raw_len: u32 },
    #[error("delta script copies past the end of the offsets")]
    Overflow,
}

/// The operations of `script`, checked to make exactly `raw_len` bytes:
/// nothing is read from the basis until the whole script has passed.
pub fn parse_script(script: &[u8], raw_len: u32) -> Result<Vec<Op<'_>>, ScriptError> {
    let mut ops = Vec::new();
    let mut made = 0u64;
    let mut rest = script;
    while let Some((&tag, tail)) = rest.split_first() {
        if ops.len() == MAX_SCRIPT_OPS {
            return Err(ScriptError::TooManyOps);
        }
        let (op, len, tail) = match tag {
            TAG_COPY => {
                let (from, tail) = take_u64(tail)?;
                let (len, tail) = take_u32(tail)?;
                from.checked_add(u64::from(len))
                    .ok_or(ScriptError::Overflow)?;
                (Op::Copy { from, len }, len, tail)
            }
            TAG_LITERAL => {
                let (len, tail) = take_u32(tail)?;
                let bytes = tail.get(..len as usize).ok_or(ScriptError::Truncated)?;
                (Op::Literal(bytes), len, &tail[len as usize..])
            }
            other => return Err(ScriptError::UnknownOp(other)),
        };
        if len == 0 {
            return Err(ScriptError::Empty);
        }
        made += u64::from(len);
        if made > u64::from(raw_len) {
            return Err(ScriptError::WrongLength { made, raw_len });
        }
        ops.push(op);
        rest = tail;
    }
    match made == u64::from(raw_len) {
        true => Ok(ops),
        false => Err(ScriptError::WrongLength { made, raw_len }),
    }
}

fn take_u64(b: &[u8]) -> Result<(u64, &[u8]), ScriptError> {
    let (head, tail) = b.split_first_chunk::<8>().ok_or(ScriptError::Truncated)?;
    Ok((u64::from_be_bytes(*head), tail))
}

fn take_u32(b: &[u8]) -> Result<(u32, &[u8]), ScriptError> {
    let (head, tail) = b.split_first_chunk::<4>().ok_or(ScriptError::Truncated)?;
    Ok((u32::from_be_bytes(*head), tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_block_grows_with_the_basis() {
        assert_eq!(CdcParams::for_basis(64 * 1024).avg, MIN_AVG_BLOCK);
        assert_eq!(CdcParams::for_basis(1 << 30).avg, 32 * 1024);
        assert_eq!(CdcParams::for_basis(u64::MAX / 2).avg, MAX_AVG_BLOCK);
        let p = CdcParams::for_basis(1 << 30);
        assert_eq!((p.min, p.max), (8 * 1024, 128 * 1024));
        assert_eq!(CdcParams::of_avg(3 * 1024), None);
        assert_eq!(CdcParams::of_avg(4 * 1024), None);
        assert_eq!(CdcParams::of_avg(2 * 1024 * 1024), None);
    }

    #[test]
    fn blocks_round_trip_and_bad_ones_are_refused() {
        let p = CdcParams::of_avg(8192).unwrap();
        let blocks = vec![
            Block { len: 1, hash: 7 },
            Block {
                len: p.max,
                hash: u64::MAX,
            },
        ];
        assert_eq!(decode_blocks(&encode_blocks(&blocks), p), Ok(blocks));
        let too_long = [Block {
            len: p.max + 1,
            hash: 0,
        }];
        assert!(decode_blocks(&encode_blocks(&too_long), p).is_err());
        assert!(decode_blocks(&encode_blocks(&[Block { len: 0, hash: 0 }]), p).is_err());
        assert_eq!(decode_blocks("!!", p), Err(SignatureError::NotBase64));
        assert_eq!(decode_blocks("AAAA", p), Err(SignatureError::Ragged(3)));
        let many = vec![Block { len: 1, hash: 1 }; MAX_BLOCKS_PER_MESSAGE + 1];
        assert!(matches!(
            decode_blocks(&encode_blocks(&many), p),
            Err(SignatureError::TooMany { .. })
        ));
    }

    #[test]
    fn matches_merge_and_cut_windows_into_copies_and_literals() {
        let mut m = Matches::default();
        m.push(Match {
            at: 0,
            from: 100,
            len: 10,
        });
        m.push(Match {
            at: 10,
            from: 110,
            len: 10,
        });
        m.push(Match {
            at: 30,
            from: 0,
            len: 5,
        });
        assert_eq!(m.runs.len(), 2);
        assert_eq!(
            m.window(5, 30),
            vec![
                Piece::Copy { from: 105, len: 15 },
                Piece::Literal { at: 20, len: 10 },
                Piece::Copy { from: 0, len: 5 },
            ]
        );
        assert_eq!(m.window(40, 8), vec![Piece::Literal { at: 40, len: 8 }]);
        assert!(m.reaches(19, 1));
        assert!(!m.reaches(20, 10));
        assert!(!m.reaches(35, 100));
    }

    #[test]
    fn a_script_makes_exactly_its_chunk() {
        let mut s = Vec::new();
        push_op(&mut s, Op::Copy { from: 9, len: 3 });
        push_op(&mut s, Op::Literal(b"ab"));
        assert_eq!(
            parse_script(&s, 5),
            Ok(vec![Op::Copy { from: 9, len: 3 }, Op::Literal(b"ab")])
        );
        assert!(matches!(
            parse_script(&s, 6),
            Err(ScriptError::WrongLength { .. })
        ));
        assert!(matches!(
            parse_script(&s, 4),
            Err(ScriptError::WrongLength { .. })
        ));
        assert_eq!(
            parse_script(&s[..s.len() - 1], 5),
            Err(ScriptError::Truncated)
        );
        assert_eq!(parse_script(&[9], 5), Err(ScriptError::UnknownOp(9)));
        let mut empty = Vec::new();
        push_op(&mut empty, Op::Literal(b""));
        assert_eq!(parse_script(&empty, 0), Err(ScriptError::Empty));
        let mut past = Vec::new();
        push_op(
            &mut past,
            Op::Copy {
                from: u64::MAX,
                len: 1,
            },
        );
        assert_eq!(parse_script(&past, 1), Err(ScriptError::Overflow));
        let mut many = Vec::new();
        for _ in 0..=MAX_SCRIPT_OPS {
            push_op(&mut many, Op::Literal(b"x"));
        }
        assert_eq!(
            parse_script(&many, MAX_SCRIPT_OPS as u32 + 1),
            Err(ScriptError::TooManyOps)
        );
    }
}
