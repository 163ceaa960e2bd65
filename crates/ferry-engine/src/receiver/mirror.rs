//! What `--delete` decides: which entries of the destination the source
//! does not have, and whether they may go.
//!
//! The receiver remembers every path the sender announced, as a keyed
//! 128-bit hash (16 bytes an entry, whatever the name's length; the key
//! is random per session, so no peer can make two paths collide). Once
//! the transfer is over, the destination is scanned and each entry is
//! judged: kept (announced, or left out by the filters), looked into (an
//! announced directory), or deleted. Nothing is deleted if any entry
//! failed, or if more would go than `--max-delete` allows.
//!
//! Pure: paths and counts in, decisions out. `prune.rs` scans and deletes.

use std::collections::HashSet;

use ferry_proto::message::HeldBack;
use twox_hash::XxHash3_128;

/// Memory charged for each remembered path: the hash and the set's
/// overhead, rounded up.
pub(crate) const SEEN_ENTRY_MEMORY: u64 = 32;
/// Paths remembered between two charges to the session's memory.
pub(crate) const SEEN_CHARGE_EVERY: usize = 4096;

/// The paths the sender announced, by keyed hash.
pub(crate) struct Seen {
    key: u64,
    paths: HashSet<u128>,
}

impl Seen {
    pub(crate) fn new(key: u64) -> Self {
        Seen {
            key,
            paths: HashSet::new(),
        }
    }

    /// Remember `path` (relative to the root of the transfer); true when
    /// it is time to charge memory for the next `SEEN_CHARGE_EVERY`.
    pub(crate) fn note(&mut self, path: &[u8]) -> bool {
        let len = self.paths.len();
        self.paths.insert(self.hash(path)) && len.is_multiple_of(SEEN_CHARGE_EVERY)
    }

    pub(crate) fn has(&self, path: &[u8]) -> bool {
        self.paths.contains(&self.hash(path))
    }

    fn hash(&self, path: &[u8]) -> u128 {
        XxHash3_128::oneshot_with_seed(self.key, path)
    }
}

/// What becomes of an entry found in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Judgement {
    /// The source has it, or the filters leave it out and it is kept.
    Keep,
    /// A directory the source has: what is inside is judged in turn.
    LookInto,
    /// The source does not have it: it goes, with all it holds.
    Delete,
}

/// Judge an entry of the destination: whether the source announced it,
/// whether the filters leave it out, whether it is a real directory (never
/// a symlink to one).
pub(crate) fn judge(
    announced: bool,
    excluded: bool,
    delete_excluded: bool,
    dir: bool,
) -> Judgement {
    match (announced, excluded && !delete_excluded) {
        (_, true) => Judgement::Keep,
        (true, _) if dir => Judgement::LookInto,
        (true, _) => Judgement::Keep,
        (false, _) => Judgement::Delete,
    }
}

/// Why nothing may be deleted, if so: entries that failed (the source was
/// not seen whole), or more deletions than allowed.
pub(crate) fn hold_back(failures: u64, would: u64, max_delete: Option<u64>) -> Option<HeldBack> {
    if failures > 0 {
        return Some(HeldBack::Failures { count: failures });
    }
    match max_delete {
        Some(max) if would > max => Some(HeldBack::MaxDelete { would, max }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_paths_are_told_apart_and_charged_in_steps() {
        let mut seen = Seen::new(7);
        assert!(seen.note(b""), "the first path starts the first charge");
        assert!(!seen.note(b"a"));
        assert!(!seen.note(b"a"), "a repeated path adds nothing");
        assert!(seen.has(b"a") && seen.has(b""));
        assert!(!seen.has(b"b") && !seen.has(b"a/"));
        let charges = (0..3 * SEEN_CHARGE_EVERY)
            .filter(|i| seen.note(format!("f{i}").as_bytes()))
            .count();
        assert_eq!(charges, 3);
        let other = Seen::new(8);
        assert_ne!(
            other.hash(b"a"),
            seen.hash(b"a"),
            "the key is part of the hash"
        );
    }

    #[test]
    fn entries_are_judged_by_the_source_and_the_filters() {
        use Judgement::*;
        assert_eq!(judge(true, false, false, false), Keep);
        assert_eq!(judge(true, false, false, true), LookInto);
        assert_eq!(judge(false, false, false, true), Delete);
        assert_eq!(judge(false, false, false, false), Delete);
        assert_eq!(judge(false, true, false, true), Keep, "excluded is kept");
        assert_eq!(judge(false, true, true, false), Delete, "unless asked");
    }

    #[test]
    fn failures_and_the_maximum_hold_deletions_back() {
        assert_eq!(hold_back(0, 5, None), None);
        assert_eq!(hold_back(0, 5, Some(5)), None);
        assert_eq!(
            hold_back(0, 6, Some(5)),
            Some(HeldBack::MaxDelete { would: 6, max: 5 })
        );
        assert_eq!(
            hold_back(2, 0, Some(5)),
            Some(HeldBack::Failures { count: 2 })
        );
    }
}
