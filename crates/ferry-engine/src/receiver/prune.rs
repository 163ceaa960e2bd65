//! `--delete` on the file system: scan the destination for what the source
//! does not have (`mirror.rs` judges each entry), then delete it.
//!
//! Every directory is opened by its path below the destination with
//! `RESOLVE_BENEATH` and no symlinks (`fsx::open_dir_beneath`), and every
//! deletion is an `unlinkat` in a directory opened that way: a symlink is
//! deleted as a link, never followed, and nothing outside the destination
//! is ever looked at. No descriptor is held across directories, so the
//! depth of a tree costs memory for its names only.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ferry_proto::message::Mtime;
use rustix::fs::{AtFlags, FileType};

use super::mirror::{self, Judgement, Seen};
use crate::filter::Filter;
use crate::fsx::{self, Kind};
use crate::names;

/// What a mirror asks of this receiver.
pub(crate) struct Pruning {
    pub(crate) max_delete: Option<u64>,
    pub(crate) delete_excluded: bool,
    /// The transfer's filters: what they leave out is kept.
    pub(crate) filter: Filter,
    /// The user is at the sender (an upload): each deletion is told to it.
    pub(crate) tell_sender: bool,
    /// How the destination is named in events.
    pub(crate) label: String,
}

/// An entry of the destination the source does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Victim {
    /// Relative to the root of the transfer.
    pub(crate) path: Vec<u8>,
    pub(crate) dir: bool,
}

/// The destination's root: `root` components below `base`.
pub(crate) struct Tree<'a> {
    pub(crate) base: BorrowedFd<'a>,
    pub(crate) root: &'a [Vec<u8>],
}

impl Tree<'_> {
    /// Open the directory at `path` (relative to the root).
    fn open_dir(&self, path: &[u8]) -> io::Result<OwnedFd> {
        let mut components: Vec<&[u8]> = self.root.iter().map(Vec::as_slice).collect();
        components.extend(path.split(|b| *b == b'/').filter(|c| !c.is_empty()));
        fsx::open_dir_beneath(self.base, &components)
    }
}

/// What went wrong with one path while scanning or deleting.
pub(crate) type Trouble = (Vec<u8>, io::Error);

/// Find the entries of `tree` that `seen` lacks, outermost only (a
/// directory that goes takes what it holds). A directory that cannot be
/// listed is passed to `trouble` and not looked into; `alive` is called
/// once a directory, for the stall watch.
pub(crate) fn scan(
    tree: &Tree<'_>,
    seen: &Seen,
    pruning: &mut Pruning,
    trouble: &mut dyn FnMut(Trouble),
    alive: &mut dyn FnMut(),
) -> Vec<Victim> {
    let mut victims = Vec::new();
    // Each open level: the directories below it still to look into. The
    // filter's `.gitignore` stack follows the same levels.
    let mut levels: Vec<std::vec::IntoIter<Vec<u8>>> = Vec::new();
    let mut next = Some(Vec::new());
    loop {
        if let Some(path) = next.take() {
            alive();
            match judge_dir(tree, &path, seen, pruning, &mut victims) {
                Ok(inside) => levels.push(inside.into_iter()),
                // Gone (or never there: the live tree of a first publish):
                // nothing in it to delete.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => trouble((path, e)),
            }
        }
        let Some(level) = levels.last_mut() else {
            return victims;
        };
        match level.next() {
            Some(path) => next = Some(path),
            None => {
                levels.pop();
                pruning.filter.leave();
            }
        }
    }
}

/// Judge the entries of the directory at `path`; the directories to look
/// into are returned. The filter has entered it when this succeeds.
fn judge_dir(
    tree: &Tree<'_>,
    path: &[u8],
    seen: &Seen,
    pruning: &mut Pruning,
    victims: &mut Vec<Victim>,
) -> io::Result<Vec<Vec<u8>>> {
    let dir = tree.open_dir(path)?;
    let listing = fsx::list_dir(dir.as_fd())?;
    let gitignore = crate::sender::gitignore_of(&pruning.filter, &dir);
    pruning.filter.enter(path, gitignore.as_deref());
    let mut inside = Vec::new();
    for (name, recorded) in listing {
        if names::is_working_name(&name) {
            continue;
        }
        let child = child_path(path, &name);
        let is_dir = is_real_dir(dir.as_fd(), &name, recorded);
        let excluded = pruning.filter.is_active() && pruning.filter.excludes(&child, is_dir);
        match mirror::judge(seen.has(&child), excluded, pruning.delete_excluded, is_dir) {
            Judgement::Keep => {}
            Judgement::LookInto => inside.push(child),
            Judgement::Delete => victims.push(Victim {
                path: child,
                dir: is_dir,
            }),
        }
    }
    Ok(inside)
}

fn child_path(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut child = Vec::with_capacity(parent.len() + 1 + name.len());
    if !parent.is_empty() {
        child.extend_from_slice(parent);
        child.push(b'/');
    }
    child.extend_from_slice(name);
    child
}

/// Whether `name` in `dir` is a directory itself (a symlink to one is not).
fn is_real_dir(dir: BorrowedFd<'_>, name: &[u8], recorded: FileType) -> bool {
    match recorded {
        FileType::Directory => true,
        FileType::Unknown => rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|stat| fsx::kind_of(&stat) == Kind::Dir),
        _ => false,
    }
}

/// Delete every victim (see [`remove`]). The directories they were in
/// keep their mtimes: the transfer has just made them the source's.
pub(crate) fn remove_all(
    tree: &Tree<'_>,
    victims: &[Victim],
    deleted: &mut dyn FnMut(&[u8], bool),
    trouble: &mut dyn FnMut(Trouble),
) {
    // The scan lists a directory's victims together.
    let mut parent: Option<(&[u8], Option<KeptMtime>)> = None;
    for victim in victims {
        let this_parent = parent_of(&victim.path).0;
        if parent.as_ref().is_none_or(|(p, _)| *p != this_parent) {
            if let Some((_, Some((dir, mtime)))) = parent.take() {
                keep_mtime(&dir, mtime);
            }
            let dir = tree.open_dir(this_parent).ok();
            let mtime = dir.as_ref().and_then(|d| rustix::fs::fstat(d).ok());
            parent = Some((this_parent, dir.zip(mtime.map(|s| fsx::mtime_of(&s)))));
        }
        remove(tree, victim, deleted, trouble);
    }
    if let Some((_, Some((dir, mtime)))) = parent {
        keep_mtime(&dir, mtime);
    }
}

/// Report every entry deleting the victims would remove, innermost
/// first, as [`remove_all`] would: a dry run.
pub(crate) fn list_all(
    tree: &Tree<'_>,
    victims: &[Victim],
    each: &mut dyn FnMut(&[u8], bool),
    trouble: &mut dyn FnMut(Trouble),
) {
    for victim in victims {
        let listed = post_order(tree, victim, &mut |_, _, path, dir| {
            each(path, dir);
            Ok(())
        });
        if let Err(e) = listed {
            trouble(e);
        }
    }
}

/// A directory, open, and the mtime it is to keep.
type KeptMtime = (OwnedFd, Mtime);

fn keep_mtime(dir: &OwnedFd, mtime: Mtime) {
    if let Err(e) = rustix::fs::futimens(dir, &fsx::mtime_only(mtime)) {
        tracing::debug!("a directory's mtime not kept after deletions: {e}");
    }
}

/// A path's parent and its name there.
fn parent_of(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

/// How many entries deleting `victim` removes: it, and all it holds.
pub(crate) fn count(tree: &Tree<'_>, victim: &Victim) -> u64 {
    let mut n = 0;
    let _ = post_order(tree, victim, &mut |_, _, _, _| {
        n += 1;
        Ok(())
    });
    n
}

/// Delete `victim` and all it holds, innermost first. Each entry deleted
/// goes to `deleted` (its path, whether a directory); each that could not
/// be goes to `trouble`, and the rest go on.
pub(crate) fn remove(
    tree: &Tree<'_>,
    victim: &Victim,
    deleted: &mut dyn FnMut(&[u8], bool),
    trouble: &mut dyn FnMut(Trouble),
) {
    let mut unlink = |parent: BorrowedFd<'_>, name: &[u8], path: &[u8], dir: bool| {
        let flags = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        match rustix::fs::unlinkat(parent, name, flags) {
            Ok(()) => deleted(path, dir),
            // Gone meanwhile: what we meant to do is done.
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => trouble((path.to_vec(), e.into())),
        }
        Ok(())
    };
    if let Err(e) = post_order(tree, victim, &mut unlink) {
        trouble(e);
    }
}

/// What [`post_order`] does to each entry: the open directory that holds
/// it, its name there, its path, whether it is a directory.
type Visit<'v> = dyn FnMut(BorrowedFd<'_>, &[u8], &[u8], bool) -> io::Result<()> + 'v;

/// Visit `victim` and everything below it, each directory after what it
/// holds, with the open directory that holds the entry and its name there.
fn post_order(tree: &Tree<'_>, victim: &Victim, visit: &mut Visit<'_>) -> Result<(), Trouble> {
    let mut levels: Vec<(Vec<u8>, std::vec::IntoIter<Vec<u8>>)> = Vec::new();
    if victim.dir {
        let inside = visit_files(tree, &victim.path, visit)?;
        levels.push((victim.path.clone(), inside.into_iter()));
    }
    while let Some((_, inside)) = levels.last_mut() {
        if let Some(sub) = inside.next() {
            match visit_files(tree, &sub, visit) {
                Ok(more) => levels.push((sub, more.into_iter())),
                Err(e) => return Err(e),
            }
            continue;
        }
        let (path, _) = levels.pop().expect("a level is open");
        visit_entry(tree, &path, true, visit)?;
    }
    if !victim.dir {
        visit_entry(tree, &victim.path, false, visit)?;
    }
    Ok(())
}

/// Visit what the directory at `path` holds but directories, which are
/// returned.
fn visit_files(
    tree: &Tree<'_>,
    path: &[u8],
    visit: &mut Visit<'_>,
) -> Result<Vec<Vec<u8>>, Trouble> {
    let trouble = |e: io::Error| (path.to_vec(), e);
    let dir = tree.open_dir(path).map_err(trouble)?;
    let mut dirs = Vec::new();
    for (name, recorded) in fsx::list_dir(dir.as_fd()).map_err(trouble)? {
        let child = child_path(path, &name);
        if is_real_dir(dir.as_fd(), &name, recorded) {
            dirs.push(child);
        } else {
            visit(dir.as_fd(), &name, &child, false).map_err(|e| (child.clone(), e))?;
        }
    }
    Ok(dirs)
}

/// Visit the entry at `path`, with the directory that holds it.
fn visit_entry(
    tree: &Tree<'_>,
    path: &[u8],
    dir: bool,
    visit: &mut Visit<'_>,
) -> Result<(), Trouble> {
    let (parent, name) = parent_of(path);
    let trouble = |e: io::Error| (path.to_vec(), e);
    let parent = tree.open_dir(parent).map_err(trouble)?;
    visit(parent.as_fd(), name, path, dir).map_err(trouble)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    fn tree_of(root: &std::path::Path) -> OwnedFd {
        rustix::fs::open(
            root,
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap()
    }

    fn pruning(rules: &[ferry_proto::message::FilterRule], delete_excluded: bool) -> Pruning {
        Pruning {
            max_delete: None,
            delete_excluded,
            filter: Filter::new(rules, false).unwrap(),
            tell_sender: false,
            label: "dest".into(),
        }
    }

    #[test]
    fn the_scan_finds_what_the_source_lacks_and_never_follows_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"x").unwrap();
        let d = tmp.path().join("dest");
        std::fs::create_dir_all(d.join("keep/old")).unwrap();
        std::fs::write(d.join("keep/a"), b"a").unwrap();
        std::fs::write(d.join("keep/old/b"), b"b").unwrap();
        std::fs::write(d.join("gone.log"), b"g").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.join("link")).unwrap();
        let mut seen = Seen::new(1);
        for p in ["", "keep", "keep/a"] {
            seen.note(p.as_bytes());
        }
        let base = tree_of(tmp.path());
        let root = vec![b"dest".to_vec()];
        let tree = Tree {
            base: base.as_fd(),
            root: &root,
        };
        let rule = ferry_proto::message::FilterRule {
            rule: ferry_proto::message::RuleKind::Exclude,
            pattern: "*.log".into(),
        };
        let mut p = pruning(std::slice::from_ref(&rule), false);
        let victims = scan(&tree, &seen, &mut p, &mut |t| panic!("{t:?}"), &mut || {});
        let names: Vec<_> = victims.iter().map(|v| (v.path.clone(), v.dir)).collect();
        assert_eq!(
            names,
            vec![(b"link".to_vec(), false), (b"keep/old".to_vec(), true)],
            "gone.log is excluded and kept; the symlink is an entry, not a directory"
        );
        assert_eq!(count(&tree, &victims[1]), 2);
        let mut deleted = Vec::new();
        for v in &victims {
            remove(
                &tree,
                v,
                &mut |p, dir| deleted.push((p.to_vec(), dir)),
                &mut |t| panic!("{t:?}"),
            );
        }
        assert_eq!(
            deleted,
            vec![
                (b"link".to_vec(), false),
                (b"keep/old/b".to_vec(), false),
                (b"keep/old".to_vec(), true)
            ]
        );
        assert!(
            outside.path().join("precious").exists(),
            "outside untouched"
        );
        assert!(d.join("keep/a").exists() && d.join("gone.log").exists());
        let mut p = pruning(&[rule], true);
        let victims = scan(&tree, &seen, &mut p, &mut |t| panic!("{t:?}"), &mut || {});
        assert_eq!(victims.len(), 1, "--delete-excluded takes the excluded too");
    }
}
