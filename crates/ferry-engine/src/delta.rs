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
    let mut cutter = Cutter::new(params, size);
    while !cutter.step(fd, u64::MAX, &mut block)? {}
    Ok(())
}

/// A file cut into blocks a step at a time: so that a sender can cut its
/// file while it waits for the receiver's signature, and stop when that
/// does not come.
pub(crate) struct Cutter {
    params: CdcParams,
    size: u64,
    buf: Vec<u8>,
    /// `buf[start..filled]` holds the bytes from `offset` on not yet cut.
    start: usize,
    filled: usize,
    offset: u64,
    read_to: u64,
    done: bool,
}

impl Cutter {
    pub(crate) fn new(params: CdcParams, size: u64) -> Cutter {
        Cutter {
            params,
            size,
            buf: Vec::new(),
            start: 0,
            filled: 0,
            offset: 0,
            read_to: 0,
            done: false,
        }
    }

    pub(crate) fn params(&self) -> CdcParams {
        self.params
    }

    /// Cut about `budget` more bytes (whole blocks), calling `block` with
    /// the offset and bytes of each, until it returns false; true once the
    /// file is cut to its end (or `block` said stop).
    pub(crate) fn step(
        &mut self,
        fd: BorrowedFd<'_>,
        budget: u64,
        block: &mut impl FnMut(u64, &[u8]) -> bool,
    ) -> io::Result<bool> {
        let max = self.params.max as usize;
        if self.buf.is_empty() {
            self.buf = vec![0u8; READ_LEN + max];
        }
        let stop_at = self.offset.saturating_add(budget);
        while !self.done && self.offset < stop_at {
            // Keep a whole largest block ahead, so that every cut is final
            // (one at the end of the buffer would otherwise be a guess).
            if self.filled - self.start < max && self.read_to < self.size {
                self.refill(fd)?;
            }
            if self.start == self.filled {
                self.done = true;
                break;
            }
            let rest = &self.buf[self.start..self.filled];
            // The level is named, not left to the crate's default: both
            // sides must cut alike (PROTOCOL.md §8.5).
            let chunker = FastCDC::with_level(
                rest,
                self.params.min as usize,
                self.params.avg as usize,
                max,
                Normalization::Level1,
            );
            let (_, end) = chunker.cut(0, rest.len());
            self.done = !block(self.offset, &rest[..end]);
            (self.start, self.offset) = (self.start + end, self.offset + end as u64);
        }
        if self.done {
            // What a finished cutter holds is of no more use.
            self.buf = Vec::new();
        }
        Ok(self.done)
    }

    fn refill(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.buf.copy_within(self.start..self.filled, 0);
        (self.filled, self.start) = (self.filled - self.start, 0);
        let room = (self.buf.len() - self.filled) as u64;
        let len = room.min(self.size - self.read_to) as usize;
        let into = &mut self.buf[self.filled..self.filled + len];
        if !read_full_at(fd, into, self.read_to)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank while it was being read",
            ));
        }
        (self.filled, self.read_to) = (self.filled + len, self.read_to + len as u64);
        Ok(())
    }
}

/// A file's blocks as the sender cuts them: where each starts, its length
/// and hash. Cut ahead of the signature, they are matched against it by
/// lookups alone.
#[derive(Default)]
struct CutBlocks(Vec<(u64, u32, u64)>);

impl CutBlocks {
    fn push(&mut self, at: u64, bytes: &[u8]) {
        self.0.push((at, bytes.len() as u32, chunk_hash(bytes)));
    }

    /// The runs of the file that the basis has.
    fn matches(&self, basis: &BasisIndex) -> Matches {
        let mut matches = Matches::default();
        for &(at, len, hash) in &self.0 {
            if let Some(from) = basis.find(hash, len) {
                matches.push(Match {
                    at,
                    from,
                    len: u64::from(len),
                });
            }
        }
        matches
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

/// A sender's cut of its file made while it waits for the file's plan, on
/// the guess that a receiver holding a version of the same size would cut
/// with the same parameters ([`CdcParams::for_basis`]): the receiver signs
/// its version meanwhile, and the two passes over the data run at once
/// rather than one after the other. A guess that is wrong (another size,
/// no signature) costs what was cut while waiting, and nothing more.
pub(crate) struct Precut {
    cutter: Cutter,
    blocks: CutBlocks,
    /// Cut to the end, or given up (`failed`).
    done: bool,
    failed: bool,
}

/// How much a precut step cuts before the sender looks for news again.
const PRECUT_STEP: u64 = 8 * 1024 * 1024;
/// Most blocks a precut holds (16 bytes each): a file of more than 256 GiB
/// is cut ahead only that far, and the rest once its signature has come.
const MAX_PRECUT_BLOCKS: usize = 256 * 1024;

impl Precut {
    pub(crate) fn new(size: u64) -> Precut {
        Precut {
            cutter: Cutter::new(CdcParams::for_basis(size), size),
            blocks: CutBlocks::default(),
            done: false,
            failed: false,
        }
    }

    /// Cut one more step; false if there was nothing left to do (or
    /// nothing more to hold: the blocks kept are bounded).
    pub(crate) fn step(&mut self, fd: BorrowedFd<'_>) -> bool {
        if self.done || self.blocks.0.len() >= MAX_PRECUT_BLOCKS {
            return false;
        }
        let blocks = &mut self.blocks;
        let mut keep = |at, bytes: &[u8]| {
            blocks.push(at, bytes);
            true
        };
        match self.cutter.step(fd, PRECUT_STEP, &mut keep) {
            Ok(done) => self.done = done,
            // The real pass will meet the error again, and report it.
            Err(_) => (self.done, self.failed) = (true, true),
        }
        true
    }

    /// The runs of the file that `basis` has, if the guess was right: the
    /// blocks cut so far looked up, the rest cut now (calling `alive` now
    /// and then).
    pub(crate) fn finish(
        mut self,
        fd: BorrowedFd<'_>,
        basis: &BasisIndex,
        alive: impl FnMut(),
    ) -> Option<io::Result<Matches>> {
        if self.failed || self.cutter.params() != basis.params {
            return None;
        }
        let mut matches = self.blocks.matches(basis);
        if !self.done {
            let mut rest = match_into(&mut matches, basis, alive);
            if let Err(e) = self.cutter.step(fd, u64::MAX, &mut rest) {
                return Some(Err(e));
            }
        }
        Some(Ok(matches))
    }
}

/// The runs of the first `size` bytes of `fd` that the basis has.
pub(crate) fn matches_of(
    fd: BorrowedFd<'_>,
    size: u64,
    basis: &BasisIndex,
    alive: impl FnMut(),
) -> io::Result<Matches> {
    let mut matches = Matches::default();
    let mut cutter = Cutter::new(basis.params, size);
    // One step cuts to the end.
    cutter.step(fd, u64::MAX, &mut match_into(&mut matches, basis, alive))?;
    Ok(matches)
}

/// A cutter's callback that adds the blocks the basis has to `matches`.
fn match_into<'a>(
    matches: &'a mut Matches,
    basis: &'a BasisIndex,
    mut alive: impl FnMut() + 'a,
) -> impl FnMut(u64, &[u8]) -> bool + 'a {
    move |at, bytes| {
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
    }
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
    use crate::noise;
    use std::io::Write;
    use std::os::fd::AsFd;

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
    fn a_cut_made_ahead_matches_as_a_cut_made_after() {
        let old = noise(20 << 20, 11);
        let mut new = old.clone();
        new.splice(5_000_000..5_000_000, noise(4096, 12));
        new.truncate(old.len());
        let (params, blocks) =
            signature_of(file_of(&old).as_fd(), old.len() as u64, |_| {}).unwrap();
        let index = BasisIndex::new(params, &blocks);
        let file = file_of(&new);
        let size = new.len() as u64;
        let after = matches_of(file.as_fd(), size, &index, || {}).unwrap();
        let runs = |m: &Matches| m.window(0, size as u32);
        // Cut whole ahead, or one step of it, then finished.
        let mut whole = Precut::new(size);
        while whole.step(file.as_fd()) {}
        let mut part = Precut::new(size);
        assert!(part.step(file.as_fd()));
        for precut in [whole, part] {
            let ahead = precut.finish(file.as_fd(), &index, || {}).unwrap().unwrap();
            assert_eq!(runs(&ahead), runs(&after));
        }
        // A guess of other parameters is not used.
        let other = BasisIndex::new(CdcParams::of_avg(params.avg * 2).unwrap(), &blocks);
        assert!(
            Precut::new(size)
                .finish(file.as_fd(), &other, || {})
                .is_none()
        );
    }

    #[test]
    fn a_copy_past_the_basis_is_refused() {
        let basis = file_of(b"short");
        let ops = [Op::Copy { from: 3, len: 10 }];
        assert!(rebuild(&ops, basis.as_fd(), &mut Vec::new()).is_err());
    }
}
