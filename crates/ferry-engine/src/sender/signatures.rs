//! The receiver's signatures of files it holds in another version, as the
//! sender collects them while the files wait for their plans. Without I/O.
//!
//! A signature may come in several messages; it counts once complete. The
//! sender holds every block the receiver has described of files not yet
//! planned, and refuses a receiver that describes more than the protocol
//! allows ([`MAX_SIGNATURE_BLOCKS`] a file, [`MAX_SIGNED_AHEAD`] in all):
//! its memory is bounded whatever the receiver sends. The receiver counts
//! a signature until the file's data block has ended; the sender lets go
//! of it earlier (once the file is planned, or settled), so it never holds
//! more than the receiver has counted.

use std::collections::HashMap;

use ferry_proto::delta::{
    Block, CdcParams, MAX_SIGNATURE_BLOCKS, MAX_SIGNED_AHEAD, SignatureError, decode_blocks,
};

use crate::error::{EngineError, Violation};

/// A file's signature, complete: the basis the receiver holds, cut with
/// `params` into `blocks`.
#[derive(Debug)]
pub(super) struct Signature {
    pub(super) params: CdcParams,
    pub(super) blocks: Vec<Block>,
}

/// The signatures held, complete or coming, by file id.
#[derive(Default)]
pub(super) struct Signatures {
    coming: HashMap<u64, Signature>,
    /// Blocks held by file, complete or not, until let go.
    held: HashMap<u64, usize>,
    total: usize,
}

impl Signatures {
    /// Take in one `signature` message of file `id` (which waits for its
    /// plan); returns the signature once `more` is false.
    pub(super) fn take_in(
        &mut self,
        id: u64,
        avg: u32,
        text: &str,
        more: bool,
    ) -> Result<Option<Signature>, EngineError> {
        let bad = |why: SignatureError| Violation::BadSignature {
            id,
            why: why.to_string(),
        };
        let params = CdcParams::of_avg(avg).ok_or(bad(SignatureError::BadAverage(avg)))?;
        let blocks = decode_blocks(text, params).map_err(bad)?;
        let held = self.held.entry(id).or_default();
        if *held + blocks.len() > MAX_SIGNATURE_BLOCKS
            || self.total + blocks.len() > MAX_SIGNED_AHEAD
        {
            return Err(Violation::OverLimit {
                what: "signature blocks",
                limit: MAX_SIGNED_AHEAD,
            }
            .into());
        }
        *held += blocks.len();
        self.total += blocks.len();
        let sig = self.coming.entry(id).or_insert(Signature {
            params,
            blocks: Vec::new(),
        });
        if sig.params != params {
            return Err(bad(SignatureError::BadAverage(avg)).into());
        }
        sig.blocks.extend(blocks);
        Ok((!more).then(|| self.coming.remove(&id)).flatten())
    }

    /// File `id` is planned or settled: what is held of its signature is
    /// the sender's to drop (a part still coming is dropped here; the file
    /// goes whole).
    pub(super) fn let_go(&mut self, id: u64) {
        self.coming.remove(&id);
        if let Some(n) = self.held.remove(&id) {
            self.total -= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::delta::encode_blocks;

    fn blocks(n: usize) -> String {
        encode_blocks(&vec![Block { len: 100, hash: 1 }; n])
    }

    #[test]
    fn a_signature_in_parts_counts_once_complete() {
        let mut s = Signatures::default();
        assert!(s.take_in(3, 8192, &blocks(2), true).unwrap().is_none());
        let sig = s.take_in(3, 8192, &blocks(3), false).unwrap().unwrap();
        assert_eq!(sig.blocks.len(), 5);
        assert_eq!(s.total, 5);
        s.let_go(3);
        assert_eq!(s.total, 0);
    }

    #[test]
    fn a_receiver_describing_too_much_or_nonsense_is_refused() {
        let mut s = Signatures::default();
        assert!(s.take_in(1, 1000, &blocks(1), false).is_err());
        assert!(s.take_in(1, 8192, "%%", false).is_err());
        // Parts with different averages.
        assert!(s.take_in(2, 8192, &blocks(1), true).is_ok());
        assert!(s.take_in(2, 16384, &blocks(1), false).is_err());
        // More than a file may have, in messages each within their limit.
        let mut s = Signatures::default();
        let part = blocks(ferry_proto::delta::MAX_BLOCKS_PER_MESSAGE);
        let parts = MAX_SIGNATURE_BLOCKS / ferry_proto::delta::MAX_BLOCKS_PER_MESSAGE;
        for _ in 0..parts {
            s.take_in(4, 8192, &part, true).unwrap();
        }
        assert!(s.take_in(4, 8192, &blocks(1), false).is_err());
        // More than all files together may have.
        let mut s = Signatures::default();
        for id in 0..(MAX_SIGNED_AHEAD / MAX_SIGNATURE_BLOCKS) as u64 {
            for _ in 0..parts {
                s.take_in(id, 8192, &part, true).unwrap();
            }
        }
        assert!(s.take_in(99, 8192, &blocks(1), false).is_err());
        s.let_go(0);
        assert!(s.take_in(99, 8192, &blocks(1), false).is_ok());
    }
}
