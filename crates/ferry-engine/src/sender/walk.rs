//! The one walk of a tree, for sending it and for counting it ahead.
//!
//! It goes from directory handle to directory handle (`fsx`): below the
//! root nothing is looked up by a path, and no symlink is followed. Each
//! entry is handed to a [`Visitor`] as what it is, in name order; the
//! visitor decides what it means (announce and send it, or count it) and
//! whether to go into a directory. Memory grows with the listings of the
//! directories the walk is inside, never with the whole tree.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Stat};

use std::io::Read;

use crate::filter::{Filter, MAX_GITIGNORE_BYTES};
use crate::fsx::{self, Kind};
use crate::names;

/// What a walk does with the entries it meets.
pub(super) trait Visitor {
    /// Whether the visitor reads the files it meets. Then a file that its
    /// directory lists as regular is opened and fstat'ed at once, one
    /// lookup instead of a stat and an open; otherwise the walk only stats.
    const OPENS_FILES: bool;
    /// How the visitor names an entry.
    type Path;
    type Error;

    /// The path of the entry `name` of the directory at `parent`; `None`
    /// passes the entry by.
    fn child_path(&mut self, parent: &Self::Path, name: &[u8]) -> Option<Self::Path>;
    /// A directory: `opened` is its handle, to walk with [`children`], or
    /// why it could not be opened.
    fn dir(
        &mut self,
        path: &Self::Path,
        stat: &Stat,
        opened: io::Result<OwnedFd>,
    ) -> Result<(), Self::Error>;
    fn file(
        &mut self,
        path: &Self::Path,
        stat: &Stat,
        file: Lazy<'_, File>,
    ) -> Result<(), Self::Error>;
    fn symlink(
        &mut self,
        path: &Self::Path,
        stat: &Stat,
        target: Lazy<'_, Vec<u8>>,
    ) -> Result<(), Self::Error>;
    /// A fifo or a device node.
    fn node(&mut self, path: &Self::Path, stat: &Stat) -> Result<(), Self::Error>;
    /// A socket or a type ferry does not know.
    fn special(&mut self, path: &Self::Path, what: &'static str) -> Result<(), Self::Error>;
    /// An entry that could not be looked at.
    fn unreadable(&mut self, path: &Self::Path, e: io::Error) -> Result<(), Self::Error>;
    /// An entry listed that was gone when looked at: deleted since.
    fn vanished(&mut self, path: &Self::Path) -> Result<(), Self::Error>;
    /// Whether the entry at `path` is left out (`--exclude`, .gitignore):
    /// it is passed by before it is opened, and a directory not walked.
    fn excluded(&self, path: &Self::Path, is_dir: bool) -> bool;
}

/// An open file or a symlink's target, met by the walk: at hand already,
/// or to be had by a visitor that wants it.
pub(super) enum Lazy<'a, T> {
    Ready(T),
    At(BorrowedFd<'a>, &'a [u8]),
}

impl Lazy<'_, File> {
    /// The file, and its stat if it was opened only now: the name may lead
    /// to another file than the one the walk looked at.
    pub(super) fn open(self) -> io::Result<(File, Option<Stat>)> {
        match self {
            Lazy::Ready(file) => Ok((file, None)),
            Lazy::At(dir, name) => {
                fsx::open_regular(dir, name).map(|(file, stat)| (file, Some(stat)))
            }
        }
    }
}

impl Lazy<'_, Vec<u8>> {
    pub(super) fn get(self) -> io::Result<Vec<u8>> {
        match self {
            Lazy::Ready(target) => Ok(target),
            Lazy::At(dir, name) => Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes()),
        }
    }
}

/// The contents of `dir`'s `.gitignore` for `filter`, when it reads them
/// (up to a bound); none if there is no such regular file.
pub(crate) fn gitignore_of(filter: &Filter, dir: &OwnedFd) -> Option<Vec<u8>> {
    if !filter.reads_gitignore() {
        return None;
    }
    let (file, _) = fsx::open_regular(dir.as_fd(), b".gitignore").ok()?;
    let mut text = Vec::new();
    io::Read::take(&file, MAX_GITIGNORE_BYTES as u64)
        .read_to_end(&mut text)
        .ok()?;
    Some(text)
}

/// Visit the entries of the directory `dir` at `path`, in name order. The
/// inner error: `dir` could not be listed.
pub(super) fn children<V: Visitor>(
    v: &mut V,
    dir: &OwnedFd,
    path: &V::Path,
) -> Result<io::Result<()>, V::Error> {
    let entries = match fsx::list_dir(dir.as_fd()) {
        Ok(entries) => entries,
        Err(e) => return Ok(Err(e)),
    };
    for (name, recorded_type) in entries {
        // ferry's own working files (a part file left by an interrupted
        // transfer, its journal) hold no data of the tree, and a receiver
        // refuses their names.
        if names::is_working_name(&name) {
            continue;
        }
        if let Some(child) = v.child_path(path, &name) {
            visit(v, dir.as_fd(), &name, recorded_type, &child)?;
        }
    }
    Ok(Ok(()))
}

fn visit<V: Visitor>(
    v: &mut V,
    dir: BorrowedFd<'_>,
    name: &[u8],
    recorded_type: FileType,
    path: &V::Path,
) -> Result<(), V::Error> {
    // Most entries are regular files: open and fstat them directly. Any
    // surprise (gone, changed type, unreadable) takes the careful path.
    if recorded_type == FileType::RegularFile && v.excluded(path, false) {
        return Ok(());
    }
    if V::OPENS_FILES
        && recorded_type == FileType::RegularFile
        && let Ok((file, stat)) = fsx::open_regular(dir, name)
    {
        return v.file(path, &stat, Lazy::Ready(file));
    }
    let stat = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => {
            // Left out anyway: nothing to report.
            return match v.excluded(path, false) || v.excluded(path, true) {
                true => Ok(()),
                false => v.vanished(path),
            };
        }
        Err(e) => return v.unreadable(path, e.into()),
    };
    if v.excluded(path, fsx::kind_of(&stat) == Kind::Dir) {
        return Ok(());
    }
    match fsx::kind_of(&stat) {
        Kind::Dir => v.dir(path, &stat, fsx::open_subdir(dir, name)),
        Kind::File => v.file(path, &stat, Lazy::At(dir, name)),
        Kind::Symlink => v.symlink(path, &stat, Lazy::At(dir, name)),
        Kind::Node => v.node(path, &stat),
        Kind::Special(what) => v.special(path, what),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    use super::*;
    use crate::fsx::Root;

    /// Writes down what it meets, as the sender would see it.
    struct Log {
        seen: Vec<String>,
        /// Removed once the walk is at the entry that comes before it.
        doomed: Option<(String, PathBuf)>,
    }

    impl Visitor for Log {
        const OPENS_FILES: bool = true;
        type Path = String;
        type Error = io::Error;

        fn child_path(&mut self, parent: &String, name: &[u8]) -> Option<String> {
            let name = String::from_utf8(name.to_vec()).unwrap();
            (name != "passed-by").then(|| format!("{parent}/{name}"))
        }

        fn dir(&mut self, path: &String, _: &Stat, opened: io::Result<OwnedFd>) -> io::Result<()> {
            self.seen.push(format!("dir {path}"));
            children(self, &opened?, path)?
        }

        fn file(&mut self, path: &String, stat: &Stat, file: Lazy<'_, File>) -> io::Result<()> {
            let fast = matches!(file, Lazy::Ready(_));
            let ino = file.open()?.0.metadata()?.ino();
            assert_eq!(ino, stat.st_ino);
            self.seen.push(format!("file {path} {}", stat.st_size));
            assert!(fast, "a listed file is opened at once");
            if let Some((before, doomed)) = &self.doomed
                && before == path
            {
                std::fs::remove_file(doomed)?;
            }
            Ok(())
        }

        fn symlink(&mut self, path: &String, _: &Stat, t: Lazy<'_, Vec<u8>>) -> io::Result<()> {
            let target = String::from_utf8(t.get()?).unwrap();
            self.seen.push(format!("symlink {path} -> {target}"));
            Ok(())
        }

        fn node(&mut self, path: &String, _: &Stat) -> io::Result<()> {
            self.seen.push(format!("node {path}"));
            Ok(())
        }

        fn special(&mut self, path: &String, what: &'static str) -> io::Result<()> {
            self.seen.push(format!("{what} {path}"));
            Ok(())
        }

        fn unreadable(&mut self, path: &String, e: io::Error) -> io::Result<()> {
            self.seen.push(format!("unreadable {path}: {e}"));
            Ok(())
        }

        fn vanished(&mut self, path: &String) -> io::Result<()> {
            self.seen.push(format!("vanished {path}"));
            Ok(())
        }

        fn excluded(&self, path: &String, _: bool) -> bool {
            path.ends_with("/excluded")
        }
    }

    #[test]
    fn the_walk_meets_each_entry_as_what_it_is_in_name_order() {
        let tmp = tempfile::tempdir().unwrap();
        let at = |name: &str| tmp.path().join(name);
        std::fs::create_dir_all(at("d/e")).unwrap();
        std::fs::write(at("d/f"), b"abc").unwrap();
        std::fs::write(at("a"), b"").unwrap();
        std::fs::write(at("b"), b"gone before its turn").unwrap();
        std::fs::write(at("passed-by"), b"").unwrap();
        std::fs::write(at("d/excluded"), b"left out").unwrap();
        std::fs::create_dir(at("excluded")).unwrap();
        std::os::unix::fs::symlink("d/f", at("l")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            at("p"),
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(at("s")).unwrap();
        let Root::Dir(fd, _) = fsx::open_local_root(tmp.path()).unwrap() else {
            panic!("not a directory")
        };
        let mut log = Log {
            seen: Vec::new(),
            doomed: Some(("/a".into(), at("b"))),
        };
        children(&mut log, &fd, &String::new()).unwrap().unwrap();
        assert_eq!(
            log.seen,
            [
                "file /a 0",
                "vanished /b",
                "dir /d",
                "dir /d/e",
                "file /d/f 3",
                "symlink /l -> d/f",
                "node /p",
                "socket /s",
            ]
        );
    }
}
