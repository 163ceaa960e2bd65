//! Counting a tree ahead of sending it, so that progress can show totals
//! from the start: the same walk as the sending one, with stats only, no
//! reads, on a thread of its own so that it holds back no byte.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;

use ferry_proto::path::WirePath;
use rustix::fs::Stat;

use super::rules::MAX_LINKED_FILES;
use super::walk::{self, Lazy, Visitor};
use crate::error::EngineError;
use crate::filter::Filter;
use crate::fsx::{self, Root};

/// Count the entries that are not directories (files, symlinks, nodes,
/// special files, the unreadable) and the bytes below a root; the totals
/// come on the channel when they are ready.
pub(super) fn count_in_background(
    root: &Root,
    filter: &Filter,
) -> Result<mpsc::Receiver<(u64, u64)>, EngineError> {
    let (tx, rx) = mpsc::channel();
    let known = match root {
        Root::Dir(..) => None,
        Root::File(_, stat) => Some((1, stat.st_size as u64)),
        Root::Symlink(..) | Root::Node(_) => Some((1, 0)),
        Root::Special(_) => Some((1, 0)),
    };
    if let Some(totals) = known {
        let _ = tx.send(totals);
        return Ok(rx);
    }
    let Root::Dir(fd, _) = root else {
        return Ok(rx);
    };
    let dir = fsx::open_dir_beneath(fd.as_fd(), &[])?;
    let filter = filter.clone();
    std::thread::Builder::new()
        .name("ferry-count".into())
        .stack_size(16 * 1024 * 1024)
        .spawn(move || {
            let _ = tx.send(count(&dir, filter));
        })?;
    Ok(rx)
}

/// Count below a directory. The bytes of a file with several names count
/// once, as they are sent once (up to as many such files as the sending
/// walk remembers).
fn count(root: &OwnedFd, filter: Filter) -> (u64, u64) {
    let mut counter = Counter {
        filter,
        ..Counter::default()
    };
    // What cannot be listed or looked at is not sent either.
    let root_path = WirePath::root();
    counter
        .filter
        .enter(b"", walk::gitignore_of(&counter.filter, root).as_deref());
    let Ok(_) = walk::children(&mut counter, root, &root_path);
    (counter.files, counter.bytes)
}

#[derive(Default)]
struct Counter {
    files: u64,
    bytes: u64,
    /// Files with several names met, by device and inode.
    seen: HashSet<(u64, u64)>,
    /// What the sending walk leaves out, left out of the count too.
    filter: Filter,
}

impl Visitor for Counter {
    const OPENS_FILES: bool = false;
    /// Paths matter only to the filter: without one, no path is made.
    type Path = WirePath;
    type Error = Infallible;

    fn child_path(&mut self, parent: &WirePath, name: &[u8]) -> Option<WirePath> {
        if !self.filter.is_active() {
            return Some(WirePath::root());
        }
        parent.join(name).ok()
    }

    fn dir(
        &mut self,
        path: &WirePath,
        _: &Stat,
        opened: io::Result<OwnedFd>,
    ) -> Result<(), Infallible> {
        if let Ok(fd) = opened {
            let gitignore = walk::gitignore_of(&self.filter, &fd);
            self.filter.enter(path.as_bytes(), gitignore.as_deref());
            let Ok(_) = walk::children(self, &fd, path);
            self.filter.leave();
        }
        Ok(())
    }

    fn file(&mut self, _: &WirePath, stat: &Stat, _: Lazy<'_, File>) -> Result<(), Infallible> {
        self.files += 1;
        let again = stat.st_nlink > 1
            && self.seen.len() < MAX_LINKED_FILES
            && !self.seen.insert((stat.st_dev, stat.st_ino));
        if !again {
            self.bytes += stat.st_size as u64;
        }
        Ok(())
    }

    fn symlink(&mut self, _: &WirePath, _: &Stat, _: Lazy<'_, Vec<u8>>) -> Result<(), Infallible> {
        self.files += 1;
        Ok(())
    }

    fn node(&mut self, _: &WirePath, _: &Stat) -> Result<(), Infallible> {
        self.files += 1;
        Ok(())
    }

    // Sent to be skipped, and failed: each settles as a file does.
    fn special(&mut self, _: &WirePath, _: &'static str) -> Result<(), Infallible> {
        self.files += 1;
        Ok(())
    }

    fn unreadable(&mut self, _: &WirePath, _: io::Error) -> Result<(), Infallible> {
        self.files += 1;
        Ok(())
    }

    fn vanished(&mut self, _: &WirePath) -> Result<(), Infallible> {
        Ok(())
    }

    fn excluded(&self, path: &WirePath, is_dir: bool) -> bool {
        self.filter.is_active() && self.filter.excludes(path.as_bytes(), is_dir)
    }
}

#[cfg(test)]
mod tests {
    use rustix::fs::FileType;

    use super::*;

    #[test]
    fn the_count_takes_a_file_with_several_names_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("sub")).unwrap();
        std::fs::write(tmp.path().join("a"), [1; 1000]).unwrap();
        std::fs::hard_link(tmp.path().join("a"), tmp.path().join("sub/b")).unwrap();
        std::fs::write(tmp.path().join("c"), [2; 10]).unwrap();
        let root = fsx::open_local_root(tmp.path()).unwrap();
        let Root::Dir(fd, _) = root else {
            panic!("not a directory")
        };
        // Three names, and the bytes the transfer sends: 1000 once, 10.
        assert_eq!(count(&fd, Filter::default()), (3, 1010));
    }

    #[test]
    fn the_count_takes_fifos_which_are_made_and_sockets_which_are_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(tmp.path().join("socket")).unwrap();
        let Root::Dir(fd, _) = fsx::open_local_root(tmp.path()).unwrap() else {
            panic!("not a directory")
        };
        // Each settles (made, or skipped) and counts in the summary's
        // total: the progress total counts it too.
        assert_eq!(count(&fd, Filter::default()), (2, 0));
        // A fifo named as the root is one too.
        let root = fsx::open_local_root(&fifo).unwrap();
        assert!(matches!(root, Root::Node(_)));
        assert_eq!(
            count_in_background(&root, &Filter::default())
                .unwrap()
                .recv()
                .unwrap(),
            (1, 0)
        );
    }

    #[test]
    fn the_count_goes_into_directories_and_nowhere_else() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        std::fs::write(tmp.path().join("a/b/f"), [0; 7]).unwrap();
        std::os::unix::fs::symlink("a", tmp.path().join("l")).unwrap();
        let Root::Dir(fd, _) = fsx::open_local_root(tmp.path()).unwrap() else {
            panic!("not a directory")
        };
        // The symlink is one entry; what it points to is not counted again.
        assert_eq!(count(&fd, Filter::default()), (2, 7));
    }
}
