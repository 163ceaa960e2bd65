//! The tree comparer: [`assert_trees_equal`] and [`assert_files_equal`]
//! check bytes, modes, mtimes, link targets and device numbers;
//! [`part_files`] finds what an interrupted transfer left behind.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::files::lstat;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Device,
    /// Sockets: never transferred.
    Special,
}

fn kind_of(meta: &fs::Metadata) -> Kind {
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        Kind::Symlink
    } else if file_type.is_dir() {
        Kind::Dir
    } else if file_type.is_file() {
        Kind::File
    } else if file_type.is_fifo() {
        Kind::Fifo
    } else if file_type.is_block_device() || file_type.is_char_device() {
        Kind::Device
    } else {
        debug_assert!(file_type.is_socket());
        Kind::Special
    }
}

/// Every entry under `root` (the root itself as ""), by lstat: symlinks are
/// never followed.
fn walk(root: &Path) -> BTreeMap<PathBuf, fs::Metadata> {
    let mut entries = BTreeMap::new();
    entries.insert(PathBuf::new(), lstat(root));
    let mut stack = vec![PathBuf::new()];
    // Bounded by the tree: each directory is pushed once, links are not entered.
    while let Some(relative) = stack.pop() {
        let dir = root.join(&relative);
        let listing =
            fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in listing {
            let entry = entry.unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
            let child = relative.join(entry.file_name());
            let meta = lstat(&root.join(&child));
            if meta.is_dir() {
                stack.push(child.clone());
            }
            entries.insert(child, meta);
        }
    }
    entries
}

fn show(relative: &Path) -> String {
    if relative.as_os_str().is_empty() {
        ".".to_string()
    } else {
        format!("{:?}", relative)
    }
}

fn is_part_name(name: &OsStr) -> bool {
    let name = name.as_bytes();
    name.ends_with(b".ferry-part")
        || name.ends_with(b".ferry-journal")
        || name.starts_with(b".ferry-new.")
}

/// Every `*.ferry-part` (or `*.ferry-journal`, or `.ferry-new.*`: what the
/// receiver makes before it takes its name) leftover under `root`.
pub fn part_files(root: &Path) -> Vec<PathBuf> {
    walk(root)
        .into_keys()
        .filter(|p| p.file_name().is_some_and(is_part_name))
        .collect()
}

/// Asserts `dst` is a faithful copy of `src`: the same names (less the
/// sockets, which are skipped by design), kinds, bytes, permission bits,
/// link targets, device numbers and mtimes to the nanosecond, the root
/// included; and no sockets or `*.ferry-part` leftovers in `dst`.
#[track_caller]
pub fn assert_trees_equal(src: &Path, dst: &Path) {
    let src_entries: BTreeMap<_, _> = walk(src)
        .into_iter()
        .filter(|(_, meta)| kind_of(meta) != Kind::Special)
        .collect();
    let dst_entries = walk(dst);

    let junk: Vec<String> = dst_entries
        .iter()
        .filter(|(path, meta)| {
            kind_of(meta) == Kind::Special || path.file_name().is_some_and(is_part_name)
        })
        .map(|(path, _)| show(path))
        .collect();
    assert!(
        junk.is_empty(),
        "{} has sockets or .ferry-part leftovers: {junk:?}",
        dst.display()
    );

    let missing: Vec<String> = src_entries
        .keys()
        .filter(|p| !dst_entries.contains_key(*p))
        .map(|p| show(p))
        .collect();
    let extra: Vec<String> = dst_entries
        .keys()
        .filter(|p| !src_entries.contains_key(*p))
        .map(|p| show(p))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} differs from {}:\n  missing: {missing:?}\n  unexpected: {extra:?}",
        dst.display(),
        src.display()
    );

    for (relative, src_meta) in &src_entries {
        let dst_meta = &dst_entries[relative];
        compare_entry(
            relative,
            &src.join(relative),
            src_meta,
            &dst.join(relative),
            dst_meta,
        );
    }
}

/// Asserts two single files match in bytes, permission bits and mtime.
#[track_caller]
pub fn assert_files_equal(src: &Path, dst: &Path) {
    let src_meta = lstat(src);
    let dst_meta =
        fs::symlink_metadata(dst).unwrap_or_else(|e| panic!("{} should exist: {e}", dst.display()));
    compare_entry(
        Path::new(dst.file_name().unwrap_or(dst.as_os_str())),
        src,
        &src_meta,
        dst,
        &dst_meta,
    );
}

#[track_caller]
fn compare_entry(
    relative: &Path,
    src: &Path,
    src_meta: &fs::Metadata,
    dst: &Path,
    dst_meta: &fs::Metadata,
) {
    let name = show(relative);
    let kind = kind_of(src_meta);
    assert_eq!(kind, kind_of(dst_meta), "{name}: kind differs");
    match kind {
        Kind::File => {
            assert_eq!(
                src_meta.mode() & 0o777,
                dst_meta.mode() & 0o777,
                "{name}: mode differs (left {:o}, right {:o})",
                src_meta.mode() & 0o777,
                dst_meta.mode() & 0o777
            );
            assert_eq!(src_meta.len(), dst_meta.len(), "{name}: size differs");
            if let Some(offset) = first_difference(src, dst) {
                panic!("{name}: content differs, first at byte offset {offset}");
            }
        }
        Kind::Dir => assert_eq!(
            src_meta.mode() & 0o1777,
            dst_meta.mode() & 0o1777,
            "{name}: directory mode differs (left {:o}, right {:o})",
            src_meta.mode() & 0o1777,
            dst_meta.mode() & 0o1777
        ),
        Kind::Symlink => {
            let src_target = fs::read_link(src).unwrap();
            let dst_target = fs::read_link(dst).unwrap();
            assert_eq!(
                src_target.as_os_str().as_bytes(),
                dst_target.as_os_str().as_bytes(),
                "{name}: symlink target differs ({src_target:?} vs {dst_target:?})"
            );
        }
        Kind::Fifo => assert_eq!(
            src_meta.mode() & 0o777,
            dst_meta.mode() & 0o777,
            "{name}: fifo mode differs"
        ),
        Kind::Device => {
            assert_eq!(src_meta.rdev(), dst_meta.rdev(), "{name}: device differs");
            assert_eq!(
                (
                    src_meta.file_type().is_block_device(),
                    src_meta.mode() & 0o777
                ),
                (
                    dst_meta.file_type().is_block_device(),
                    dst_meta.mode() & 0o777
                ),
                "{name}: device kind or mode differs"
            );
        }
        Kind::Special => unreachable!("sockets are filtered out before comparing"),
    }
    assert_eq!(
        (src_meta.mtime(), src_meta.mtime_nsec()),
        (dst_meta.mtime(), dst_meta.mtime_nsec()),
        "{name}: mtime (seconds, nanoseconds) differs"
    );
}

/// The first byte offset at which the two files differ (a length
/// difference counts), without holding either file in memory.
fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let open = |p: &Path| fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let mut buf_a = vec![0u8; 256 * 1024];
    let mut buf_b = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    // Ends at the end of the shorter file.
    loop {
        let na = read_full(&mut fa, &mut buf_a);
        let nb = read_full(&mut fb, &mut buf_b);
        let common = na.min(nb);
        // Slices first (a memcmp): a byte loop is slow in a test build.
        let differ = buf_a[..common] != buf_b[..common];
        if let Some(i) = (0..common).find(|&i| differ && buf_a[i] != buf_b[i]) {
            return Some(offset + i as u64);
        }
        if na != nb {
            return Some(offset + common as u64);
        }
        if na == 0 {
            return None;
        }
        offset += na as u64;
    }
}

fn read_full(file: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    filled
}

/// The comparer is what every transfer test rests on: prove that it
/// accepts a faithful copy and rejects each kind of difference.
mod self_test {
    use super::*;
    use crate::util::{BIG_FILE, MIB, Scratch, build_full_tree, set_mode, set_mtime, write_file};
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::process::Command;

    /// A faithful copy made by `cp -a`.
    fn tree_and_copy() -> (Scratch, PathBuf, PathBuf) {
        let scratch = Scratch::new();
        let src = scratch.join("src");
        build_full_tree(&src);
        let dst = scratch.join("dst");
        let status = Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(&dst)
            .status()
            .expect("run cp -a");
        assert!(status.success(), "cp -a failed");
        (scratch, src, dst)
    }

    #[track_caller]
    fn assert_rejected(src: &Path, dst: &Path, expect: &str) {
        let result = catch_unwind(AssertUnwindSafe(|| assert_trees_equal(src, dst)));
        let message = match result {
            Ok(()) => panic!("the comparer accepted a tree with a difference ({expect})"),
            Err(payload) => payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        };
        assert!(
            message.contains(expect),
            "expected {expect:?} in: {message}"
        );
    }

    #[test]
    fn comparer_accepts_a_faithful_copy() {
        let (_scratch, src, dst) = tree_and_copy();
        assert_trees_equal(&src, &dst);
    }

    #[test]
    fn comparer_rejects_each_kind_of_difference() {
        let (_scratch, src, dst) = tree_and_copy();

        // One flipped byte deep inside a big file, same size and mtime.
        let big = dst.join(BIG_FILE);
        let (secs, nanos) = (lstat(&big).mtime(), lstat(&big).mtime_nsec());
        let mut bytes = fs::read(&big).unwrap();
        bytes[3 * MIB as usize + 7] ^= 1;
        fs::write(&big, &bytes).unwrap();
        set_mtime(&big, secs, nanos);
        assert_rejected(&src, &dst, &format!("byte offset {}", 3 * MIB + 7));
        fs::copy(src.join(BIG_FILE), &big).unwrap();
        set_mtime(&big, secs, nanos);
        assert_trees_equal(&src, &dst);

        set_mode(&dst.join("run.sh"), 0o644);
        assert_rejected(&src, &dst, "mode differs");
        set_mode(&dst.join("run.sh"), 0o755);

        let link = dst.join("links/to-file");
        set_mtime(&link, secs, nanos + 1);
        assert_rejected(&src, &dst, "mtime");
        let meta = lstat(&src.join("links/to-file"));
        set_mtime(&link, meta.mtime(), meta.mtime_nsec());

        let dst_meta = lstat(&dst);
        let stray = dst.join(".x.ferry-part");
        write_file(&stray, b"half");
        assert_rejected(&src, &dst, ".ferry-part");
        fs::remove_file(&stray).unwrap();
        set_mtime(&dst, dst_meta.mtime(), dst_meta.mtime_nsec());

        let empty = dst.join("empty-dir");
        let empty_meta = lstat(&empty);
        fs::remove_dir(&empty).unwrap();
        assert_rejected(&src, &dst, "empty-dir");
        fs::create_dir(&empty).unwrap();
        set_mtime(&empty, empty_meta.mtime(), empty_meta.mtime_nsec());
        set_mtime(&dst, dst_meta.mtime(), dst_meta.mtime_nsec());

        // Everything restored: the copy is faithful again.
        assert_trees_equal(&src, &dst);
    }
}
