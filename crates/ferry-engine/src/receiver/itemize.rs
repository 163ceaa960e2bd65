//! What placing an entry changes in the destination, for `--itemize` and
//! `--dry-run`: the same judgement for both, so that a dry run says what
//! the real run then does.
//!
//! Pure: what the destination has (looked at by `place::existing`) and
//! what the sender announced in, the list of differences out.

use ferry_proto::message::{Change, EntryKind, Mtime, Owner};

/// What the destination has where an entry lands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Existing {
    pub(crate) kind: ExistingKind,
    pub(crate) size: u64,
    pub(crate) mtime: Mtime,
    /// Permission bits and setuid, setgid, sticky.
    pub(crate) mode: u32,
    pub(crate) owner: Owner,
    /// Device and inode: which file a hard link names.
    pub(crate) inode: (u64, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExistingKind {
    File,
    Dir,
    Symlink(Vec<u8>),
    Fifo,
    Device,
    Other,
}

/// How an entry differs from what is there (`existing`); `owner` is the
/// owner the receiver applies, if it applies owners. Empty: nothing
/// changes. A hard link is judged by [`link_change`].
pub(crate) fn change_of(
    existing: Option<&Existing>,
    entry: &EntryKind,
    owner: Option<Owner>,
) -> Vec<Change> {
    let Some(found) = existing else {
        return vec![Change::Created];
    };
    let (kind, mode_bits, mtime) = match entry {
        EntryKind::File { mode, mtime, .. } => (ExistingKind::File, mode & 0o777, *mtime),
        EntryKind::Dir { mode, mtime } => (ExistingKind::Dir, mode & 0o1777, *mtime),
        EntryKind::Symlink { target, mtime } => {
            (ExistingKind::Symlink(target.as_bytes().to_vec()), 0, *mtime)
        }
        EntryKind::Fifo { mode, mtime } => (ExistingKind::Fifo, mode & 0o777, *mtime),
        EntryKind::Device { mode, mtime, .. } => (ExistingKind::Device, mode & 0o777, *mtime),
        EntryKind::Special { .. } | EntryKind::Hardlink { .. } => return Vec::new(),
    };
    let mut what = Vec::new();
    match (&found.kind, &kind) {
        (ExistingKind::Symlink(had), ExistingKind::Symlink(wants)) if had != wants => {
            what.push(Change::Target)
        }
        (had, wants) if std::mem::discriminant(had) != std::mem::discriminant(wants) => {
            return vec![Change::Kind];
        }
        _ => {}
    }
    if let EntryKind::File { size, .. } = entry
        && *size != found.size
    {
        what.push(Change::Size);
    }
    if found.mtime != mtime {
        what.push(Change::Mtime);
    }
    if !matches!(kind, ExistingKind::Symlink(_)) && found.mode & 0o7777 != mode_bits {
        what.push(Change::Mode);
    }
    if owner.is_some_and(|o| o != found.owner) {
        what.push(Change::Owner);
    }
    what
}

/// How a hard link differs from what is there: `existing` at its name,
/// `target` at the name of the file it links to.
pub(crate) fn link_change(existing: Option<&Existing>, target: Option<&Existing>) -> Vec<Change> {
    match (existing, target) {
        (None, _) => vec![Change::Created],
        (Some(found), Some(file)) if found.inode == file.inode => Vec::new(),
        (Some(found), _) if found.kind != ExistingKind::File => vec![Change::Kind],
        (Some(_), _) => vec![Change::Target],
    }
}

/// `what` with the content's verdict (`--checksum`): `Some(false)`, a
/// file of the same size whose content differs.
pub(crate) fn with_content(mut what: Vec<Change>, same: Option<bool>) -> Vec<Change> {
    let judged_already = what
        .iter()
        .any(|c| matches!(c, Change::Created | Change::Kind | Change::Size));
    if same == Some(false) && !judged_already {
        what.insert(0, Change::Content);
    }
    what
}

/// Whether a change is of metadata only: the file's content stays, as a
/// file that passes the quick check keeps it.
pub(crate) fn metadata_only(what: &[Change]) -> bool {
    what.iter()
        .all(|c| matches!(c, Change::Mode | Change::Owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Mtime = Mtime { sec: 100, nsec: 5 };
    const ME: Owner = Owner { uid: 1, gid: 1 };

    fn file(size: u64, mode: u32) -> Existing {
        Existing {
            kind: ExistingKind::File,
            size,
            mtime: T,
            mode,
            owner: ME,
            inode: (1, 2),
        }
    }

    fn entry(size: u64, mode: u32, mtime: Mtime) -> EntryKind {
        EntryKind::File { size, mode, mtime }
    }

    #[test]
    fn a_file_is_judged_on_size_mtime_mode_and_owner() {
        let had = file(10, 0o644);
        assert_eq!(
            change_of(None, &entry(10, 0o644, T), None),
            [Change::Created]
        );
        assert!(change_of(Some(&had), &entry(10, 0o100644, T), None).is_empty());
        let later = Mtime { sec: 101, nsec: 5 };
        assert_eq!(
            change_of(Some(&had), &entry(11, 0o600, later), None),
            [Change::Size, Change::Mtime, Change::Mode]
        );
        let other = Owner { uid: 2, gid: 1 };
        assert_eq!(
            change_of(Some(&had), &entry(10, 0o644, T), Some(other)),
            [Change::Owner]
        );
        assert!(metadata_only(&[Change::Owner, Change::Mode]));
        assert!(!metadata_only(&[Change::Mode, Change::Size]));
    }

    #[test]
    fn kinds_and_targets() {
        let dir = EntryKind::Dir {
            mode: 0o755,
            mtime: T,
        };
        assert_eq!(change_of(Some(&file(1, 0o755)), &dir, None), [Change::Kind]);
        let link = |t: &str| EntryKind::Symlink {
            target: t.into(),
            mtime: T,
        };
        let had = Existing {
            kind: ExistingKind::Symlink(b"a".to_vec()),
            ..file(1, 0o777)
        };
        assert!(change_of(Some(&had), &link("a"), None).is_empty());
        assert_eq!(change_of(Some(&had), &link("b"), None), [Change::Target]);
        let same = file(1, 0o644);
        assert!(link_change(Some(&same), Some(&same)).is_empty());
        let other = Existing {
            inode: (1, 3),
            ..file(1, 0o644)
        };
        assert_eq!(link_change(Some(&same), Some(&other)), [Change::Target]);
        assert_eq!(link_change(None, Some(&other)), [Change::Created]);
    }
}
