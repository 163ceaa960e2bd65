//! Delta transfer at the receiver: finding the version of a file it holds
//! already (its basis) and describing it to the sender in a `signature`.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use ferry_proto::delta::{
    Block, CdcParams, DELTA_MIN_SIZE, MAX_BLOCKS_PER_MESSAGE, MAX_SIGNED_AHEAD, encode_blocks,
};
use ferry_proto::message::Message;
use ferry_proto::path::WirePath;

use super::{Destination, LinkDest};
use crate::budget::Charge;
use crate::fsx;

/// The version of a file the receiver holds already, open for reading
/// while the file arrives: its chunks' copies are read from it.
pub(super) struct Basis {
    pub(super) file: File,
    pub(super) size: u64,
}

/// Whether a file of `size` bytes is worth looking for a basis of: delta
/// is on, the file is large enough, and a version of it may be here: its
/// directory existed before this transfer, or there are `--link-dest`
/// trees (a backup's previous snapshot, an atomic publish's live tree).
pub(super) fn worth_a_basis(dest: &Destination, size: u64, fresh_dir: bool) -> bool {
    let somewhere = !fresh_dir || !dest.link_dests.is_empty();
    dest.delta && !dest.dry_run && size >= DELTA_MIN_SIZE && somewhere
}

/// The basis of the file at `path` landing as `name` in `parent`: the
/// regular file there (unless `parent` is `fresh`, new in this transfer),
/// or else the one at the same path in the first `--link-dest` tree that
/// has one. Never through a symlink; only a regular file of at least
/// [`DELTA_MIN_SIZE`].
pub(super) fn find(
    link_dests: &mut [LinkDest],
    (parent, fresh): (BorrowedFd<'_>, bool),
    name: &[u8],
    path: &WirePath,
) -> Option<Basis> {
    if let Some(basis) = (!fresh).then(|| open_basis(parent, name)).flatten() {
        return Some(basis);
    }
    link_dests.iter_mut().find_map(|link| {
        let (dir, name) = link.open_parent(path)?;
        open_basis(dir.as_fd(), name)
    })
}

fn open_basis(dir: BorrowedFd<'_>, name: &[u8]) -> Option<Basis> {
    let (file, stat) = fsx::open_regular(dir, name).ok()?;
    let size = stat.st_size as u64;
    (size >= DELTA_MIN_SIZE).then_some(Basis { file, size })
}

/// The most memory the signature of a basis of `size` bytes takes while it
/// is made and sent: its blocks, and their text in the messages.
pub(super) fn memory_for(size: u64) -> u64 {
    let blocks = size / u64::from(CdcParams::for_basis(size).min) + 1;
    blocks.min(ferry_proto::delta::MAX_SIGNATURE_BLOCKS as u64) * 40
}

/// The blocks the receiver has described in signatures of files whose
/// data block has not ended: the sender holds them meanwhile, and
/// [`MAX_SIGNED_AHEAD`] bounds them.
#[derive(Default)]
pub(super) struct SignedAhead {
    blocks: usize,
}

impl SignedAhead {
    /// Whether a signature of `blocks` more fits.
    pub(super) fn has_room(&self, blocks: usize) -> bool {
        self.blocks + blocks <= MAX_SIGNED_AHEAD
    }

    /// Whether a signature of a basis of `size` bytes is likely to fit: as
    /// many blocks as it has on average. Checked before the basis is read,
    /// so that a full sender does not cost a read of it for nothing.
    pub(super) fn may_fit(&self, size: u64) -> bool {
        let average = size / u64::from(CdcParams::for_basis(size).avg);
        self.has_room((average as usize).min(ferry_proto::delta::MAX_SIGNATURE_BLOCKS))
    }

    pub(super) fn add(&mut self, blocks: usize) {
        self.blocks += blocks;
    }

    /// A file's data block has ended (or it is settled): the sender has
    /// dropped its signature.
    pub(super) fn release(&mut self, blocks: usize) {
        self.blocks -= blocks;
    }
}

/// The `signature` messages of file `id`: its blocks, at most
/// [`MAX_BLOCKS_PER_MESSAGE`] a message, all but the last with `more`.
pub(super) fn messages(id: u64, params: CdcParams, blocks: &[Block]) -> Vec<Message> {
    let parts: Vec<&[Block]> = blocks.chunks(MAX_BLOCKS_PER_MESSAGE).collect();
    let last = parts.len().saturating_sub(1);
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| Message::Signature {
            id,
            avg: params.avg,
            blocks: encode_blocks(part),
            more: i < last,
        })
        .collect()
}

/// What a file being received as a delta keeps: its basis, the blocks its
/// signature counts towards [`SignedAhead`] until its data block ends,
/// and the memory that signature took.
pub(super) struct Signed {
    pub(super) basis: Basis,
    pub(super) blocks: usize,
    pub(super) _memory: Option<Charge>,
}

impl Signed {
    pub(super) fn basis_fd(&self) -> BorrowedFd<'_> {
        self.basis.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_basis_is_read_only_if_its_signature_may_fit() {
        let mut ahead = SignedAhead::default();
        assert!(ahead.may_fit(1 << 30));
        ahead.add(MAX_SIGNED_AHEAD - 10);
        // 1 GiB is about 32,768 blocks; 64 KiB of 8 KiB blocks, 8.
        assert!(!ahead.may_fit(1 << 30));
        assert!(ahead.may_fit(64 * 1024));
        ahead.release(MAX_SIGNED_AHEAD - 10);
        assert!(ahead.may_fit(1 << 30));
    }
}
