//! Removal of part files that no transfer will come back for.
//!
//! The receiver writes into a hidden `.NAME.ferry-part` (and, for large
//! files, keeps a `.NAME.ferry-journal` beside it) so that an interrupted
//! transfer can resume. A transfer that is never resumed leaves both
//! behind, and over months of dropped connections those abandoned parts
//! would fill the disk. The server sweeps them once they are older than a
//! configured age.
//!
//! A live transfer holds an exclusive `flock` on its part file for as long
//! as it writes it, so the sweep takes the same lock, without waiting, before
//! it unlinks: a part that is being written is skipped, never raced. The
//! walk goes through directory handles and never follows a symlink, so a
//! link planted in the tree cannot steer a removal outside it; what it
//! opens to lock it looks at first, and opens only a regular file.
//!
//! What a crash leaves under a fresh working name (`.ferry-new.…`: a small
//! file's part, a symlink or node being made) goes too, once its ctime is
//! older than the age: nothing comes back for those.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, SystemTime};

use ferry_proto::message::Mtime;
use ferry_proto::path::escape;
use rustix::fs::{AtFlags, FileType, FlockOperation, OFlags, Stat};

use crate::fsx::{self, Kind};
use crate::names::{JOURNAL_SUFFIX, NEW_PREFIX, PART_SUFFIX, sibling, stem};

/// Directories deeper than this below the root are not visited. It bounds
/// the open handles (one per level) and the time a hostile tree can cost.
const MAX_DEPTH: usize = 256;

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SweepReport {
    pub parts_removed: u64,
    pub journals_removed: u64,
    /// The apparent sizes (`st_size`) of the removed files, summed.
    pub bytes_freed: u64,
}

/// Remove, below the directory `root`, every part file last modified more
/// than `max_age` before `now` that no live transfer holds, with its
/// journal, and every journal that old whose part file is gone.
///
/// Only failing to list `root` itself is an error: a subdirectory or an
/// entry that cannot be read or removed (permissions, removed meanwhile) is
/// skipped and the sweep goes on.
pub(crate) fn sweep_stale_parts(
    root: BorrowedFd<'_>,
    max_age: Duration,
    now: SystemTime,
) -> io::Result<SweepReport> {
    let mut report = SweepReport::default();
    // Before the epoch plus max_age nothing can be older than the cutoff.
    let Some(cutoff) = now.checked_sub(max_age) else {
        return Ok(report);
    };
    let mut root_subdirs = sweep_dir(root, cutoff, &mut report)?.into_iter();
    // One frame per open directory below the root, each with the
    // subdirectories still to visit: depth-first, so at most MAX_DEPTH
    // handles are open however wide the tree is.
    let mut stack: Vec<(OwnedFd, std::vec::IntoIter<Vec<u8>>)> = Vec::new();
    loop {
        let next = match stack.last_mut() {
            Some((_, subdirs)) => subdirs.next(),
            None => root_subdirs.next(),
        };
        let Some(name) = next else {
            if stack.pop().is_none() {
                break;
            }
            continue;
        };
        if stack.len() >= MAX_DEPTH {
            tracing::debug!("sweep: not descending into {}: too deep", escape(&name));
            continue;
        }
        let parent = stack.last().map_or(root, |(dir, _)| dir.as_fd());
        let swept = fsx::open_subdir(parent, &name).and_then(|dir| {
            let subdirs = sweep_dir(dir.as_fd(), cutoff, &mut report)?;
            Ok((dir, subdirs.into_iter()))
        });
        match swept {
            Ok(frame) => stack.push(frame),
            Err(e) => tracing::debug!("sweep: skipped directory {}: {e}", escape(&name)),
        }
    }
    Ok(report)
}

/// Sweep the entries of one directory; returns its subdirectories.
fn sweep_dir(
    dir: BorrowedFd<'_>,
    cutoff: SystemTime,
    report: &mut SweepReport,
) -> io::Result<Vec<Vec<u8>>> {
    let mut subdirs = Vec::new();
    for (name, file_type) in fsx::list_dir(dir)? {
        let swept = if let Some(stem) = stem(&name, PART_SUFFIX) {
            sweep_part(dir, &name, stem, cutoff, report)
        } else if let Some(stem) = stem(&name, JOURNAL_SUFFIX) {
            sweep_orphan_journal(dir, &name, stem, cutoff, report)
        } else if name.starts_with(NEW_PREFIX) {
            sweep_new(dir, &name, cutoff, report)
        } else {
            Ok(())
        };
        if let Err(e) = swept {
            tracing::debug!("sweep: skipped {}: {e}", escape(&name));
        }
        let is_dir = match file_type {
            FileType::Directory => true,
            // The filesystem does not record types in its directories.
            FileType::Unknown => rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|stat| fsx::kind_of(&stat) == Kind::Dir),
            _ => false,
        };
        if is_dir {
            subdirs.push(name);
        }
    }
    Ok(subdirs)
}

/// Remove the part file `name` if it is a regular file, old enough and not
/// locked by a live transfer; its journal goes with it.
fn sweep_part(
    dir: BorrowedFd<'_>,
    name: &[u8],
    stem: &[u8],
    cutoff: SystemTime,
    report: &mut SweepReport,
) -> io::Result<()> {
    // Looked at before it is opened: a fifo or a device node under the
    // name never is, nor a file that is not the receiver's own.
    let Some(found) = fsx::look(dir, name)? else {
        return Ok(());
    };
    if fsx::kind_of(&found.stat) != Kind::File || !older_than(&found.stat, cutoff) {
        return Ok(());
    }
    if !fsx::is_own_private(&found.stat) {
        // No live transfer holds such a file under a part name (theirs are
        // always their own, private): removed unopened.
        if found.still_named(dir, name) {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            report.parts_removed += 1;
            report.bytes_freed += size_of(&found.stat);
            remove_journal(dir, &sibling(stem, JOURNAL_SUFFIX), report)?;
        }
        return Ok(());
    }
    let Some(held) = found.open_regular(OFlags::RDONLY) else {
        return Ok(());
    };
    match rustix::fs::flock(&held, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        // A live transfer is writing it.
        Err(rustix::io::Errno::WOULDBLOCK) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    // Under the lock, look again: a transfer may have written to the file
    // (or replaced it with a fresh one under the same name) since the stat.
    // Only the file we hold, still unchanged, is ours to remove.
    let locked = rustix::fs::fstat(&held)?;
    if fsx::kind_of(&locked) != Kind::File
        || !older_than(&locked, cutoff)
        || !still_named(dir, name, &locked)
    {
        return Ok(());
    }
    rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    report.parts_removed += 1;
    report.bytes_freed += size_of(&locked);
    remove_journal(dir, &sibling(stem, JOURNAL_SUFFIX), report)?;
    // Only now let go of the lock, so a transfer waiting on it finds the
    // part and its journal both gone.
    drop(held);
    Ok(())
}

/// Remove the journal `name` if it is a regular file, old enough, and its
/// part file is gone (so no transfer can resume from it).
fn sweep_orphan_journal(
    dir: BorrowedFd<'_>,
    name: &[u8],
    stem: &[u8],
    cutoff: SystemTime,
    report: &mut SweepReport,
) -> io::Result<()> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if fsx::kind_of(&stat) != Kind::File || !older_than(&stat, cutoff) {
        return Ok(());
    }
    let part = sibling(stem, PART_SUFFIX);
    match rustix::fs::statat(dir, &part, AtFlags::SYMLINK_NOFOLLOW) {
        // Anything under the part's name, even a symlink, keeps the journal.
        Ok(_) => return Ok(()),
        Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    if !still_named(dir, name, &stat) {
        return Ok(());
    }
    remove_journal(dir, name, report)
}

/// Remove `name`, something made under a fresh working name (a symlink,
/// a node, a link, a file) that never took its real one, once its status
/// last changed before `cutoff`. No transfer ever comes back for one, and
/// none holds one for long; the mtime would not tell (a symlink gets the
/// sender's before it is renamed), the ctime does. A directory is left
/// alone.
fn sweep_new(
    dir: BorrowedFd<'_>,
    name: &[u8],
    cutoff: SystemTime,
    report: &mut SweepReport,
) -> io::Result<()> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    let ctime = Mtime {
        sec: stat.st_ctime,
        nsec: stat.st_ctime_nsec as u32,
    };
    let old = system_time(ctime).is_some_and(|ctime| ctime < cutoff);
    if fsx::kind_of(&stat) == Kind::Dir || !old {
        return Ok(());
    }
    rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
    report.parts_removed += 1;
    report.bytes_freed += size_of(&stat);
    Ok(())
}

/// Remove the journal `name` if it is a regular file; a missing one is
/// fine, anything else under that name is left alone.
fn remove_journal(dir: BorrowedFd<'_>, name: &[u8], report: &mut SweepReport) -> io::Result<()> {
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if fsx::kind_of(&stat) != Kind::File {
        return Ok(());
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => {
            report.journals_removed += 1;
            report.bytes_freed += size_of(&stat);
            Ok(())
        }
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether `name` in `dir` is still the file `stat` describes.
fn still_named(dir: BorrowedFd<'_>, name: &[u8], stat: &Stat) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|now| now.st_dev == stat.st_dev && now.st_ino == stat.st_ino)
}

/// Whether the file was last modified before `cutoff`. An mtime that does
/// not fit a `SystemTime` counts as recent: when in doubt, keep.
fn older_than(stat: &Stat, cutoff: SystemTime) -> bool {
    system_time(fsx::mtime_of(stat)).is_some_and(|mtime| mtime < cutoff)
}

fn system_time(mtime: Mtime) -> Option<SystemTime> {
    let secs = Duration::from_secs(mtime.sec.unsigned_abs());
    let whole = if mtime.sec >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(secs)?
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(secs)?
    };
    whole.checked_add(Duration::from_nanos(u64::from(mtime.nsec)))
}

fn size_of(stat: &Stat) -> u64 {
    u64::try_from(stat.st_size).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::path::Path;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// Set the mtime of `path` itself (not of a symlink's target) to
    /// `days` days ago.
    fn age(path: &Path, days: u32) {
        let then = SystemTime::now() - DAY * days;
        let since = then.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let mtime = Mtime {
            sec: i64::try_from(since.as_secs()).unwrap(),
            nsec: since.subsec_nanos(),
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            path,
            &fsx::mtime_only(mtime),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    fn write_aged(path: &Path, contents: &[u8], days: u32) {
        std::fs::write(path, contents).unwrap();
        age(path, days);
    }

    /// Sweep with a max age of one day.
    fn sweep(root: &Path) -> SweepReport {
        let dir = File::open(root).unwrap();
        sweep_stale_parts(dir.as_fd(), DAY, SystemTime::now()).unwrap()
    }

    fn exists(path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    #[test]
    fn old_parts_go_with_their_journals() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join(".f.ferry-part");
        let journal = tmp.path().join(".f.ferry-journal");
        write_aged(&part, b"12345", 2);
        write_aged(&journal, b"abc", 2);
        write_aged(&tmp.path().join("f"), b"done", 2);
        let report = sweep(tmp.path());
        assert_eq!(
            report,
            SweepReport {
                parts_removed: 1,
                journals_removed: 1,
                bytes_freed: 8,
            }
        );
        assert!(!exists(&part) && !exists(&journal));
        assert!(exists(&tmp.path().join("f")), "only part files are swept");
    }

    #[test]
    fn leftovers_under_fresh_names_go_by_their_ctime() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join(".ferry-new.00000000000000aa");
        let file = tmp.path().join(".ferry-new.00000000000000bb");
        let dir = tmp.path().join(".ferry-new.00000000000000cc");
        symlink("target", &link).unwrap();
        // An old mtime, as a symlink gets the sender's before its rename.
        age(&link, 3650);
        std::fs::write(&file, b"1234").unwrap();
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(sweep(tmp.path()), SweepReport::default());
        assert!(exists(&link) && exists(&file));
        // Two days on, both are abandoned; a directory never is.
        let root = File::open(tmp.path()).unwrap();
        let later = SystemTime::now() + 2 * DAY;
        let report = sweep_stale_parts(root.as_fd(), DAY, later).unwrap();
        assert_eq!(report.parts_removed, 2, "{report:?}");
        assert!(!exists(&link) && !exists(&file) && exists(&dir));
    }

    #[test]
    fn young_parts_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join(".f.ferry-part");
        let journal = tmp.path().join(".f.ferry-journal");
        std::fs::write(&part, b"12345").unwrap();
        // The journal alone being old does not orphan it.
        write_aged(&journal, b"abc", 2);
        assert_eq!(sweep(tmp.path()), SweepReport::default());
        assert!(exists(&part) && exists(&journal));
    }

    #[test]
    fn a_part_that_is_not_the_receivers_own_goes_unopened() {
        use rustix::fs::inotify;
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join(".f.ferry-part");
        // Readable by others: no transfer of the receiver's made it so.
        write_aged(&part, b"12345", 2);
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o644)).unwrap();
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK).unwrap();
        inotify::add_watch(&watch, &part, inotify::WatchFlags::OPEN).unwrap();
        assert_eq!(sweep(tmp.path()).parts_removed, 1);
        assert!(!exists(&part));
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut events = inotify::Reader::new(&watch, &mut buf);
        while let Ok(event) = events.next() {
            assert!(!event.events().contains(inotify::ReadFlags::OPEN), "opened");
        }
    }

    #[test]
    fn a_locked_part_is_left_to_its_transfer() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join(".f.ferry-part");
        let journal = tmp.path().join(".f.ferry-journal");
        write_aged(&part, b"12345", 2);
        write_aged(&journal, b"abc", 2);
        // Private, as the receiver makes them.
        std::fs::set_permissions(&part, std::fs::Permissions::from_mode(0o600)).unwrap();
        let live = File::options().write(true).open(&part).unwrap();
        rustix::fs::flock(&live, FlockOperation::NonBlockingLockExclusive).unwrap();
        assert_eq!(sweep(tmp.path()), SweepReport::default());
        assert!(exists(&part) && exists(&journal));

        drop(live);
        assert_eq!(sweep(tmp.path()).parts_removed, 1);
        assert!(!exists(&part) && !exists(&journal));
    }

    #[test]
    fn old_orphan_journals_go_young_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join(".old.ferry-journal");
        let young = tmp.path().join(".young.ferry-journal");
        write_aged(&old, b"abc", 2);
        std::fs::write(&young, b"abc").unwrap();
        let report = sweep(tmp.path());
        assert_eq!(
            report,
            SweepReport {
                parts_removed: 0,
                journals_removed: 1,
                bytes_freed: 3,
            }
        );
        assert!(!exists(&old) && exists(&young));
    }

    #[test]
    fn symlinks_are_neither_followed_nor_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        let hidden_part = outside.path().join(".y.ferry-part");
        write_aged(&target, b"keep me", 2);
        write_aged(&hidden_part, b"not ours", 2);
        let link = tmp.path().join(".x.ferry-part");
        let journal_link = tmp.path().join(".z.ferry-journal");
        let dir_link = tmp.path().join("escape");
        symlink(&target, &link).unwrap();
        symlink(&target, &journal_link).unwrap();
        symlink(outside.path(), &dir_link).unwrap();
        for l in [&link, &journal_link, &dir_link] {
            age(l, 2);
        }
        assert_eq!(sweep(tmp.path()), SweepReport::default());
        assert!(exists(&link) && exists(&journal_link) && exists(&dir_link));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        assert!(exists(&hidden_part), "the sweep stayed inside the root");
    }

    #[test]
    fn a_symlinked_journal_is_not_removed_with_its_part() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        write_aged(&target, b"keep me", 2);
        write_aged(&tmp.path().join(".f.ferry-part"), b"12345", 2);
        let journal = tmp.path().join(".f.ferry-journal");
        symlink(&target, &journal).unwrap();
        let report = sweep(tmp.path());
        assert_eq!((report.parts_removed, report.journals_removed), (1, 0));
        assert!(exists(&journal) && exists(&target));
    }

    #[test]
    fn nested_parts_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::create_dir(tmp.path().join("empty")).unwrap();
        let part = deep.join(".n.ferry-part");
        write_aged(&part, b"x", 2);
        assert_eq!(sweep(tmp.path()).parts_removed, 1);
        assert!(!exists(&part));
    }

    #[test]
    fn directories_named_like_parts_are_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(".d.ferry-part");
        let journal_dir = tmp.path().join(".e.ferry-journal");
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(&journal_dir).unwrap();
        std::fs::write(dir.join("inside"), b"x").unwrap();
        for d in [&dir, &journal_dir] {
            age(d, 2);
        }
        assert_eq!(sweep(tmp.path()), SweepReport::default());
        assert!(dir.join("inside").exists() && journal_dir.is_dir());
    }

    #[test]
    fn the_walk_stops_at_the_depth_bound() {
        let tmp = tempfile::tempdir().unwrap();
        let mut at_bound = tmp.path().to_path_buf();
        for _ in 0..MAX_DEPTH {
            at_bound.push("d");
        }
        let beyond = at_bound.join("d");
        std::fs::create_dir_all(&beyond).unwrap();
        write_aged(&at_bound.join(".in.ferry-part"), b"x", 2);
        write_aged(&beyond.join(".out.ferry-part"), b"x", 2);
        assert_eq!(sweep(tmp.path()).parts_removed, 1);
        assert!(!exists(&at_bound.join(".in.ferry-part")));
        assert!(exists(&beyond.join(".out.ferry-part")));
    }

    #[test]
    fn only_an_unlistable_root_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        let fd = File::open(&file).unwrap();
        assert!(sweep_stale_parts(fd.as_fd(), DAY, SystemTime::now()).is_err());
    }
}
