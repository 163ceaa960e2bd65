//! Files for tests to work in and on: [`Scratch`] directories that can
//! always be removed, deterministic pseudo-random content, and setters and
//! getters for modes, times and fifos that panic with the path on failure.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};

pub const MIB: u64 = 1024 * 1024;

/// A temporary directory that can always be removed: on drop it gives its
/// owner write and search permission on every directory again (trees under
/// test contain 0o555 directories, which stop a non-root removal).
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("ferry-test-")
                .tempdir()
                .expect("create a temporary directory"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Creates `relative` (and parents) with mode 0o755 and returns its path.
    pub fn mkdir(&self, relative: impl AsRef<Path>) -> PathBuf {
        let path = self.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        set_mode(&path, 0o755);
        path
    }

    /// Makes the scratch directory enterable by other users (tempdirs are
    /// 0o700); its parent, the system temp directory, already is.
    pub fn open_to_all(&self) {
        set_mode(self.path(), 0o755);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut stack = vec![self.dir.path().to_path_buf()];
        // Bounded by the size of the tree; each directory is visited once.
        while let Some(dir) = stack.pop() {
            if let Ok(meta) = fs::symlink_metadata(&dir)
                && meta.is_dir()
                && meta.mode() & 0o700 != 0o700
            {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(meta.mode() | 0o700));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
        }
    }
}

/// xorshift64*: tiny, deterministic and good enough that zstd cannot
/// compress its output.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Mix the seed so small seeds do not start with small numbers; never 0.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    Rng::new(seed).fill(&mut buf);
    buf
}

/// Writes `size` pseudo-random bytes (from `seed`) to `path`, mode 0o644.
pub fn write_random_file(path: &Path, size: u64, seed: u64) {
    let mut file =
        fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        file.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        left -= n as u64;
    }
    drop(file);
    set_mode(path, 0o644);
}

/// Writes `bytes` to `path`, mode 0o644.
pub fn write_file(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, 0o644);
}

/// chmod (follows symlinks; never call it on one).
pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

/// Sets atime and mtime of `path` itself, not following a symlink.
pub fn set_mtime(path: &Path, secs: i64, nanos: i64) {
    let time = Timespec {
        tv_sec: secs as _,
        tv_nsec: nanos as _,
    };
    let times = Timestamps {
        last_access: time,
        last_modification: time,
    };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

pub fn lstat(path: &Path) -> fs::Metadata {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()))
}

pub fn mkfifo(path: &Path) {
    rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o644), 0)
        .unwrap_or_else(|e| panic!("mkfifo {}: {e}", path.display()));
}

/// Copy what `src` holds into `dst` (made if missing) with `cp -a`: modes,
/// mtimes, links and all, as a reference to compare a transfer against.
pub fn copy_into(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap_or_else(|e| panic!("mkdir {}: {e}", dst.display()));
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dst)
        .status()
        .expect("cp runs");
    assert!(
        status.success(),
        "cp -a {} {}",
        src.display(),
        dst.display()
    );
}
