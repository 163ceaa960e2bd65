//! `--atomic` on the file system: switch the staged version in for the
//! live tree with one `renameat2(RENAME_EXCHANGE)`, keep the version it
//! replaces as `.NAME.ferry-prev`, and switch back (`ferry rollback`).
//!
//! A reader who opens the live path sees the old tree or the new one,
//! never a mix: the exchange is one step of the file system. Everything
//! happens in the directory that holds the live tree, opened below the
//! base without following symlinks.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::RenameFlags;

use super::prune::{self, Tree, Victim};
use super::{BackupPlan, Publish};
use crate::fsx;
use crate::names;
use crate::snapshots;

/// How the switch went: whether there was a live tree, now kept as the
/// previous version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Switched {
    /// The live tree was replaced; it is kept as `.NAME.ferry-prev`.
    Replaced,
    /// There was none: the new version took the name.
    New,
}

fn open_parent(base: BorrowedFd<'_>, parent: &[Vec<u8>]) -> io::Result<OwnedFd> {
    let components: Vec<&[u8]> = parent.iter().map(Vec::as_slice).collect();
    fsx::open_dir_beneath(base, &components)
}

/// Switch the staged version of `publish` in. The previous version kept
/// from the last publish goes first; if it cannot, nothing is switched.
pub(crate) fn switch(base: BorrowedFd<'_>, publish: &Publish) -> io::Result<Switched> {
    let parent = open_parent(base, &publish.parent)?;
    let staging = names::staging_name(&publish.name);
    let previous = names::previous_name(&publish.name);
    remove_tree(parent.as_fd(), &previous)?;
    let exchange = RenameFlags::EXCHANGE;
    match rustix::fs::renameat_with(&parent, &staging, &parent, &publish.name, exchange) {
        Ok(()) => {
            // The staging name now holds the version just replaced.
            rustix::fs::renameat(&parent, &staging, &parent, &previous)?;
            Ok(Switched::Replaced)
        }
        Err(rustix::io::Errno::NOENT) => {
            let noreplace = RenameFlags::NOREPLACE;
            rustix::fs::renameat_with(&parent, &staging, &parent, &publish.name, noreplace)?;
            Ok(Switched::New)
        }
        Err(e) => Err(e.into()),
    }
}

/// After a backup's snapshot `name` is published: `latest` names it (a
/// symlink, replaced in one rename), and the snapshots the rotation lets go
/// are deleted, never following a symlink. The names of those deleted.
pub(crate) fn after_backup(
    base: BorrowedFd<'_>,
    plan: &BackupPlan,
    name: &[u8],
) -> io::Result<Vec<String>> {
    let dir = open_parent(base, &plan.dir)?;
    let (_, temp) = fsx::make_new(|temp| rustix::fs::symlinkat(name, &dir, temp))?;
    fsx::rename_into_place(dir.as_fd(), &temp, b"latest")?;
    let (complete, _) = snapshots::sort_listing(&fsx::list_dir(dir.as_fd())?);
    let mut pruned = Vec::new();
    for old in snapshots::to_prune(&complete, &plan.keep) {
        remove_tree(dir.as_fd(), old.as_bytes())?;
        pruned.push(old);
    }
    Ok(pruned)
}

/// Switch the previous version back in for the live tree at `live`
/// (components below `base`); the live one becomes the previous, so a
/// second rollback undoes the first.
pub(crate) fn roll_back(base: BorrowedFd<'_>, live: &[Vec<u8>]) -> io::Result<()> {
    let Some((name, parent)) = live.split_last() else {
        return Err(io::Error::other("nothing to roll back at the root"));
    };
    let parent = open_parent(base, parent)?;
    let previous = names::previous_name(name);
    let exchange = RenameFlags::EXCHANGE;
    match rustix::fs::renameat_with(&parent, &previous, &parent, name.as_slice(), exchange) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOENT) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no previous version is kept: nothing was published with --atomic over it",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Remove the directory tree `name` in `dir`, if there is one, never
/// following a symlink.
fn remove_tree(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    if fsx::look(dir, name)?.is_none() {
        return Ok(());
    }
    let tree = Tree {
        base: dir,
        root: &[],
    };
    let victim = Victim {
        path: name.to_vec(),
        dir: true,
    };
    let mut failed = None;
    prune::remove(&tree, &victim, &mut |_, _| {}, &mut |(_, e)| {
        failed.get_or_insert(e);
    });
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_switches_and_keeps_one_previous_version_and_rolls_back() {
        let tmp = tempfile::tempdir().unwrap();
        let base = rustix::fs::open(
            tmp.path(),
            rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let (staging, publish) = Publish::of(&[b"site".to_vec(), b"www".to_vec()]).unwrap();
        assert_eq!(staging[1], b".www.ferry-next");
        let stage = |version: &str| {
            let dir = tmp.path().join("site/.www.ferry-next");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("v"), version).unwrap();
        };
        let live = || std::fs::read_to_string(tmp.path().join("site/www/v")).unwrap();
        let prev = || std::fs::read_to_string(tmp.path().join("site/.www.ferry-prev/v")).unwrap();
        stage("1");
        assert_eq!(switch(base.as_fd(), &publish).unwrap(), Switched::New);
        stage("2");
        assert_eq!(switch(base.as_fd(), &publish).unwrap(), Switched::Replaced);
        assert_eq!((live(), prev()), ("2".into(), "1".into()));
        stage("3");
        switch(base.as_fd(), &publish).unwrap();
        assert_eq!(
            (live(), prev()),
            ("3".into(), "2".into()),
            "one previous is kept"
        );
        assert!(!tmp.path().join("site/.www.ferry-next").exists());
        roll_back(base.as_fd(), &publish.live()).unwrap();
        assert_eq!((live(), prev()), ("2".into(), "3".into()));
    }
}
