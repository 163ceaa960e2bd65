//! Trees to transfer: [`build_full_tree`] with every case a transfer must
//! preserve, and [`build_small_tree`] for tests about naming.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::files::{MIB, mkfifo, set_mode, set_mtime, write_file, write_random_file};

/// Hands out distinct timestamps, each with a non-zero nanosecond part, so
/// a receiver that drops nanoseconds or mixes up entries is caught.
struct Clock(i64);

impl Clock {
    fn next(&mut self) -> (i64, i64) {
        self.0 += 1;
        let secs = 1_600_000_000 + self.0 * 86_413;
        let nanos = (self.0 * 7_919_773 + 123_456_789) % 1_000_000_000;
        (secs, nanos)
    }
}

// Names in the full tree that tests refer to.
pub const DEEP_FILE: &str = "a/b/c/deep.txt";
pub const BIG_FILE: &str = "five-mib.bin";
pub const SPACED_FILE: &str = "name with spaces.txt";
pub const FIFO: &str = "fifo";

/// Builds every case the transfer must preserve under `root` (created here).
///
/// ```text
/// root/                       0o755
///   a/b/c/deep.txt            three levels deep
///   a/b/mid.txt  a/top.txt
///   empty-dir/                empty
///   zero.bin  one.bin  mib-plus-one.bin  five-mib.bin   (0, 1, 1 MiB+1, 5 MiB+123 bytes; random)
///   compressible.txt          ~3 MiB of text
///   "name with spaces.txt"  "-rf"  "ünïcödé 日本.txt"  b"bad\xffname"
///   private.txt 0o600  run.sh 0o755  readonly.txt 0o444
///   private-dir/ 0o700 (secret.txt)   sealed-dir/ 0o555 (inside.txt)
///   links/to-file -> ../a/b/c/deep.txt   links/to-dir -> ../a/b
///   links/dangling -> missing-target     links/absolute -> /etc/hostname
///   fifo                      0o644, recreated as a fifo
/// ```
pub fn build_full_tree(root: &Path) {
    fs::create_dir_all(root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    let mut clock = Clock(0);
    // (directory, mode); the root first, so it is set last below.
    let mut dirs = vec![(root.to_path_buf(), 0o755)];
    for (relative, mode) in [
        ("a", 0o755),
        ("a/b", 0o755),
        ("a/b/c", 0o755),
        ("empty-dir", 0o755),
        ("private-dir", 0o700),
        ("sealed-dir", 0o555),
        ("links", 0o755),
    ] {
        let path = root.join(relative);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        dirs.push((path, mode));
    }

    // (name, size, seed): random content, so compression cannot hide bugs.
    let random_files: [(&str, u64, u64); 9] = [
        (DEEP_FILE, 4096, 1),
        ("a/b/mid.txt", 100, 2),
        ("a/top.txt", 10_000, 3),
        ("zero.bin", 0, 4),
        ("one.bin", 1, 5),
        ("mib-plus-one.bin", MIB + 1, 6),
        (BIG_FILE, 5 * MIB + 123, 7),
        ("private-dir/secret.txt", 33, 8),
        ("sealed-dir/inside.txt", 777, 9),
    ];
    let mut files = Vec::new();
    for (name, size, seed) in random_files {
        let path = root.join(name);
        write_random_file(&path, size, seed);
        files.push((path, 0o644));
    }

    let mut text = String::new();
    let mut line = 0;
    while text.len() < 3 * MIB as usize {
        line += 1;
        text.push_str(&format!(
            "line {line}: the quick brown fox jumps over the lazy dog\n"
        ));
    }
    files.push((root.join("compressible.txt"), 0o644));
    write_file(&root.join("compressible.txt"), text.as_bytes());

    // Names that break naive quoting, argument parsing and UTF-8 handling.
    let odd_names: [&OsStr; 4] = [
        OsStr::new(SPACED_FILE),
        OsStr::new("-rf"),
        OsStr::new("ünïcödé 日本.txt"),
        OsStr::from_bytes(b"bad\xffname"),
    ];
    for (i, name) in odd_names.into_iter().enumerate() {
        let path = root.join(name);
        write_random_file(&path, 64 + i as u64, 20 + i as u64);
        files.push((path, 0o644));
    }

    for (name, mode) in [
        ("private.txt", 0o600),
        ("run.sh", 0o755),
        ("readonly.txt", 0o444),
    ] {
        let path = root.join(name);
        write_file(&path, format!("{name}: mode {mode:o}\n").as_bytes());
        files.push((path, mode));
    }

    let links = [
        ("links/to-file", "../a/b/c/deep.txt"),
        ("links/to-dir", "../a/b"),
        ("links/dangling", "missing-target"),
        ("links/absolute", "/etc/hostname"),
    ];
    for (name, target) in links {
        let path = root.join(name);
        symlink(target, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
        let (secs, nanos) = clock.next();
        set_mtime(&path, secs, nanos);
    }

    mkfifo(&root.join(FIFO));
    let (secs, nanos) = clock.next();
    set_mtime(&root.join(FIFO), secs, nanos);

    for (path, mode) in &files {
        set_mode(path, *mode);
        let (secs, nanos) = clock.next();
        set_mtime(path, secs, nanos);
    }

    // Directory modes and mtimes last: creating anything inside a directory
    // changes its mtime, and 0o555 would stop a non-root builder filling it.
    // Deepest first, the order a receiver must also follow.
    dirs.sort_by_key(|(dir, _)| std::cmp::Reverse(dir.components().count()));
    for (dir, mode) in &dirs {
        set_mode(dir, *mode);
        let (secs, nanos) = clock.next();
        set_mtime(dir, secs, nanos);
    }
}

/// A few files and a subdirectory, for tests about naming rather than content.
pub fn build_small_tree(root: &Path) {
    fs::create_dir_all(root.join("sub")).unwrap();
    write_random_file(&root.join("one.txt"), 1000, 41);
    write_random_file(&root.join("sub/two.txt"), 2000, 42);
    set_mtime(&root.join("one.txt"), 1_500_000_001, 111_111_111);
    set_mtime(&root.join("sub/two.txt"), 1_500_000_002, 222_222_222);
    set_mode(&root.join("sub"), 0o755);
    set_mtime(&root.join("sub"), 1_500_000_003, 333_333_333);
    set_mode(root, 0o755);
    set_mtime(root, 1_500_000_004, 444_444_444);
}

/// The transfer tests and the comparer's self-test trust the full tree to
/// hold every case: check that it does.
mod self_test {
    use crate::util::{BIG_FILE, DEEP_FILE, FIFO, MIB, Scratch, build_full_tree, lstat};
    use std::ffi::OsStr;
    use std::fs;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    #[test]
    fn full_tree_has_every_case() {
        let scratch = Scratch::new();
        let src = scratch.join("src");
        build_full_tree(&src);
        assert!(lstat(&src.join(FIFO)).file_type().is_fifo());
        assert!(lstat(&src.join("links/absolute")).file_type().is_symlink());
        assert_eq!(lstat(&src.join("sealed-dir")).mode() & 0o777, 0o555);
        assert_eq!(lstat(&src.join(BIG_FILE)).len(), 5 * MIB + 123);
        assert!(lstat(&src.join(OsStr::from_bytes(b"bad\xffname"))).is_file());
        assert_ne!(lstat(&src.join(DEEP_FILE)).mtime_nsec(), 0);
        assert!(
            fs::read_dir(src.join("empty-dir"))
                .unwrap()
                .next()
                .is_none()
        );
    }
}
