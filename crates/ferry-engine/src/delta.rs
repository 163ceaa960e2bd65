//! Delta transfer's file work: cutting a file into content-defined blocks
//! (the receiver's signature of its basis, the sender's matches against
//! it) and rebuilding a chunk from a delta script. What the parts mean is
//! in [`ferry_proto::delta`].

use std::io;
use std::os::fd::BorrowedFd;

use fastcdc::v2020::{FastCDC, Normalization};
use ferry_proto::delta::{BasisIndex, Block, CdcParams, MAX_SIGNATURE_BLOCKS, Match, Matches, Op};
use ferry_proto::digest::chunk_hash;

use crate::fsx::read_full_at;

/// How much of a file is read at a time while it is cut.
const READ_LEN: usize = 4 * 1024 * 1024;

/// Cut the first `size` bytes of `fd` into blocks, calling `block` with
/// the offset and bytes of each, in order, until it returns false. An
/// error if the file is shorter than `size`.
fn cut_file(
    fd: BorrowedFd<'_>,
    size: u64,
    params: CdcParams,
    mut block: impl FnMut(u64, &[u8]) -> bool,
) -> io::Result<()> {
    let max = params.max as usize;
    let mut buf = vec![0u8; READ_LEN + max];
    // `buf[start..filled]` holds the bytes from `offset` on not yet cut.
    let (mut start, mut filled, mut offset, mut read_to) = (0usize, 0usize, 0u64, 0u64);
    loop {
        // Keep a whole largest block ahead, so that every cut is final
        // (one at the end of the buffer would otherwise be a guess).
        if filled - start < max && read_to < size {
            buf.copy_within(start..filled, 0);
            (filled, start) = (filled - start, 0);
            let len = ((buf.len() - filled) as u64).min(size - read_to) as usize;
            if !read_full_at(fd, &mut buf[filled..filled + len], read_to)? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file shrank while it was being read",
                ));
            }
            (filled, read_to) = (filled + len, read_to + len as u64);
        }
        if start == filled {
            return Ok(());
        }
        let rest = &buf[start..filled];
        // The level is named, not left to the crate's default: both sides
        // must cut alike (PROTOCOL.md §8.5).
        let chunker = FastCDC::with_level(
            rest,
            params.min as usize,
            params.avg as usize,
            params.max as usize,
            Normalization::Level1,
        );
        let (_, end) = chunker.cut(0, rest.len());
        if !block(offset, &rest[..end]) {
            return Ok(());
        }
        (start, offset) = (start + end, offset + end as u64);
    }
}

/// The signature of a basis of `size` bytes: its blocks, at most
/// [`MAX_SIGNATURE_BLOCKS`] of them (a longer basis is described from its
/// start). `alive` is called now and then with the bytes read so far.
pub(crate) fn signature_of(
    fd: BorrowedFd<'_>,
    size: u64,
    mut alive: impl FnMut(u64),
) -> io::Result<(CdcParams, Vec<Block>)> {
    let params = CdcParams::for_basis(size);
    let mut blocks = Vec::new();
    cut_file(fd, size, params, |offset, bytes| {
        blocks.push(Block {
            len: bytes.len() as u32,
            hash: chunk_hash(bytes),
        });
        alive(offset);
        blocks.len() < MAX_SIGNATURE_BLOCKS
    })?;
    Ok((params, blocks))
}

/// The runs of the first `size` bytes of `fd` that the basis has.
pub(crate) fn matches_of(
    fd: BorrowedFd<'_>,
    size: u64,
    basis: &BasisIndex,
    mut alive: impl FnMut(),
) -> io::Result<Matches> {
    let mut matches = Matches::default();
    cut_file(fd, size, basis.params, |at, bytes| {
        let len = bytes.len() as u32;
        if let Some(from) = basis.find(chunk_hash(bytes), len) {
            matches.push(Match {
                at,
                from,
                len: u64::from(len),
            });
        }
        alive();
        true
    })?;
    Ok(matches)
}

/// Rebuild a chunk into `out` from its script: copies read from `basis`,
/// literals as they are. Why not, if the basis is shorter than a copy
/// needs (the caller's hash check catches any other difference).
pub(crate) fn rebuild(
    ops: &[Op<'_>],
    basis: BorrowedFd<'_>,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    out.clear();
    for op in ops {
        match *op {
            Op::Literal(bytes) => out.extend_from_slice(bytes),
            Op::Copy { from, len } => {
                let at = out.len();
                out.resize(at + len as usize, 0);
                match read_full_at(basis, &mut out[at..], from) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(format!(
                            "the basis ends before offset {}",
                            from + u64::from(len)
                        ));
                    }
                    Err(e) => return Err(format!("cannot read the basis: {e}")),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn file_of(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn blocks_tile_the_file_and_survive_an_insertion() {
        let old = noise(3 << 20, 7);
        let (params, blocks) =
            signature_of(file_of(&old).as_fd(), old.len() as u64, |_| {}).unwrap();
        assert_eq!(
            blocks.iter().map(|b| u64::from(b.len)).sum::<u64>(),
            old.len() as u64
        );
        assert!(blocks.iter().all(|b| b.len <= params.max));
        let mut new = old.clone();
        new.splice(100_000..100_000, noise(4096, 9));
        let index = BasisIndex::new(params, &blocks);
        let matches = matches_of(file_of(&new).as_fd(), new.len() as u64, &index, || {}).unwrap();
        // Everything but the blocks around the insertion is found again.
        let pieces = matches.window(0, new.len() as u32);
        let literal: u64 = pieces
            .iter()
            .map(|p| match p {
                ferry_proto::delta::Piece::Literal { len, .. } => u64::from(*len),
                _ => 0,
            })
            .sum();
        assert!(
            literal < 4 * u64::from(params.max),
            "{literal} literal bytes"
        );
        // And the pieces rebuild the new file from the old one.
        let old_file = file_of(&old);
        let mut script = Vec::new();
        for p in &pieces {
            match *p {
                ferry_proto::delta::Piece::Copy { from, len } => {
                    ferry_proto::delta::push_op(&mut script, Op::Copy { from, len })
                }
                ferry_proto::delta::Piece::Literal { at, len } => ferry_proto::delta::push_op(
                    &mut script,
                    Op::Literal(&new[at as usize..(at + u64::from(len)) as usize]),
                ),
            }
        }
        let ops = ferry_proto::delta::parse_script(&script, new.len() as u32).unwrap();
        let mut out = Vec::new();
        rebuild(&ops, old_file.as_fd(), &mut out).unwrap();
        assert!(out == new);
    }

    #[test]
    fn a_copy_past_the_basis_is_refused() {
        let basis = file_of(b"short");
        let ops = [Op::Copy { from: 3, len: 10 }];
        assert!(rebuild(&ops, basis.as_fd(), &mut Vec::new()).is_err());
    }
}
