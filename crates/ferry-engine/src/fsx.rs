//! Filesystem access that cannot be steered by what is in the tree.
//!
//! Everything here works on directory handles, never on path strings
//! resolved by the kernel from the top: a path from the peer is a
//! [`WirePath`] of plain components, and each lookup below a handle refuses
//! to follow a symlink (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//! where the kernel has it, an `O_NOFOLLOW` walk one component at a time
//! where it does not). So a symlink planted in the tree, or received
//! earlier in the same transfer, can never lead a read or a write outside
//! the directory the transfer was confined to.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use ferry_proto::digest::{DigestBuilder, FileDigest, chunk_hash};
use ferry_proto::message::{Mtime, Owner};
use ferry_proto::path::WirePath;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};

use crate::names;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Set once the kernel has told us it has no `openat2` (before 5.6, or
/// filtered by seccomp), so we stop asking.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// The kind of a directory entry, as ferry sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    /// A fifo or a device node: the receiver makes one like it.
    Node,
    /// A socket, or a type ferry does not know: announced, never made.
    Special(&'static str),
}

/// Fill `buf` from `fd` at `offset`; `false` if the file ends first.
///
/// rustix makes the system call itself: glibc's `pread` wraps each call
/// in thread-cancellation bookkeeping that ferry never uses, and on a tree
/// of small files that is a call per file on each side.
pub(crate) fn read_full_at(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::io::pread(fd, &mut buf[filled..], offset + filled as u64) {
            Ok(0) => return Ok(false),
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// The whole-file digest of the `size` bytes of `fd`, as a sender makes
/// it from its chunks: what `--checksum` compares. An error if the file
/// is shorter than `size`.
pub(crate) fn file_digest(fd: BorrowedFd<'_>, size: u64) -> io::Result<FileDigest> {
    let chunk = u64::from(ferry_proto::limits::DEFAULT_CHUNK_LEN);
    let mut builder = DigestBuilder::new(size);
    let mut buf = vec![0u8; chunk.min(size) as usize];
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset) as usize;
        if !read_full_at(fd, &mut buf[..len], offset)? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file shrank",
            ));
        }
        builder.push(chunk_hash(&buf[..len]));
        offset += len as u64;
    }
    Ok(builder.finish())
}

/// Write all of `buf` to `fd` at `offset` (see [`read_full_at`]).
pub(crate) fn write_all_at(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut written = 0;
    while written < buf.len() {
        match rustix::io::pwrite(fd, &buf[written..], offset + written as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(crate) fn kind_of(stat: &Stat) -> Kind {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        FileType::Fifo | FileType::CharacterDevice | FileType::BlockDevice => Kind::Node,
        FileType::Socket => Kind::Special("socket"),
        FileType::Unknown => Kind::Special("unknown file type"),
    }
}

pub(crate) fn mtime_of(stat: &Stat) -> Mtime {
    Mtime {
        sec: stat.st_mtime,
        nsec: stat.st_mtime_nsec as u32,
    }
}

pub(crate) fn mode_of(stat: &Stat) -> u32 {
    stat.st_mode & 0o7777
}

pub(crate) fn owner_of(stat: &Stat) -> Owner {
    Owner {
        uid: stat.st_uid,
        gid: stat.st_gid,
    }
}

/// Make `len` bytes of `fd` at `offset` read as zeros, by punching a hole
/// (the file keeps its size); by writing zeros where the filesystem cannot.
pub(crate) fn zero_range(fd: BorrowedFd<'_>, offset: u64, len: u32) -> io::Result<()> {
    use rustix::fs::FallocateFlags;
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    match rustix::fs::fallocate(fd, punch, offset, u64::from(len)) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
            static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
            let mut at = offset;
            let end = offset + u64::from(len);
            while at < end {
                let n = (end - at).min(ZEROS.len() as u64) as usize;
                write_all_at(fd, &ZEROS[..n], at)?;
                at += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether the `len` bytes of `fd` at `offset` lie in a hole: no data
/// from `offset` up to their end (`SEEK_DATA`). False when that cannot
/// be told.
pub(crate) fn is_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> bool {
    match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(offset)) {
        Ok(next_data) => next_data >= offset + len,
        // No data at or after `offset`.
        Err(rustix::io::Errno::NXIO) => true,
        Err(_) => false,
    }
}

/// Whether a file has fewer blocks than its size needs: it may have holes.
pub(crate) fn may_have_holes(stat: &Stat) -> bool {
    (stat.st_blocks as u64).saturating_mul(512) < stat.st_size as u64
}

/// Give the regular file `from_name` in `from_dir` the further name
/// `to_name` in `to_dir`, replacing what is there atomically (as a rename
/// does), unless that is the same file already. Neither name is followed
/// if it is a symlink.
pub(crate) fn hard_link(
    from_dir: BorrowedFd<'_>,
    from_name: &[u8],
    to_dir: BorrowedFd<'_>,
    to_name: &[u8],
) -> io::Result<()> {
    let source = rustix::fs::statat(from_dir, from_name, AtFlags::SYMLINK_NOFOLLOW)?;
    if kind_of(&source) != Kind::File {
        return Err(io::Error::other("its first name is not a regular file"));
    }
    let same = |st: &Stat| st.st_dev == source.st_dev && st.st_ino == source.st_ino;
    if rustix::fs::statat(to_dir, to_name, AtFlags::SYMLINK_NOFOLLOW).is_ok_and(|st| same(&st)) {
        return Ok(());
    }
    // Linked under a fresh name of its own, then renamed: the name never
    // shows anything but the old entry or the link, and nothing another
    // transfer holds is touched.
    let (_, part) =
        make_new(|temp| rustix::fs::linkat(from_dir, from_name, to_dir, temp, AtFlags::empty()))?;
    let linked = rustix::fs::statat(to_dir, part.as_slice(), AtFlags::SYMLINK_NOFOLLOW);
    let placed = match linked {
        Ok(st) if same(&st) => rename_into_place(to_dir, &part, to_name),
        // Something else took the first name between the check and the link.
        Ok(_) => Err(io::Error::other(
            "its first name changed while it was linked",
        )),
        Err(e) => Err(e.into()),
    };
    if placed.is_err() {
        let _ = remove_if_present(to_dir, &part);
    }
    placed
}

/// Give the regular file `from_name` in `from_dir`, as `source` (its
/// stat, taken without following it) describes it, the further name
/// `to_name` in `to_dir`, which must be free: `linkat` never replaces, so
/// a name that is taken gives `AlreadyExists`, unless it is that very file
/// already. Neither name is followed if it is a symlink.
///
/// The new name is checked to lead to `source`: should the first name have
/// been swapped between the stat and the link (for a symlink, a node or
/// another file), what was linked is removed again. Three system calls
/// where [`hard_link`]'s replacing rename takes seven.
pub(crate) fn link_new(
    from_dir: BorrowedFd<'_>,
    from_name: &[u8],
    source: &Stat,
    to_dir: BorrowedFd<'_>,
    to_name: &[u8],
) -> io::Result<()> {
    if kind_of(source) != Kind::File {
        return Err(io::Error::other("its first name is not a regular file"));
    }
    let same = |st: &Stat| st.st_dev == source.st_dev && st.st_ino == source.st_ino;
    let now = || rustix::fs::statat(to_dir, to_name, AtFlags::SYMLINK_NOFOLLOW);
    match rustix::fs::linkat(from_dir, from_name, to_dir, to_name, AtFlags::empty()) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) if now().is_ok_and(|st| same(&st)) => return Ok(()),
        Err(rustix::io::Errno::EXIST) => return Err(io::ErrorKind::AlreadyExists.into()),
        Err(e) => return Err(map_loop(e)),
    }
    match now() {
        Ok(st) if same(&st) => Ok(()),
        Ok(_) => {
            let _ = remove_if_present(to_dir, to_name);
            Err(io::Error::other(
                "its first name changed while it was linked",
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// Make the fifo or device node `name` in `dir`, with the mode, owner and
/// mtime given, in place atomically: it is made under a fresh name of its
/// own (see [`make_new`]), its metadata is set through a handle on it (so
/// a symlink swapped in under that name meanwhile is never followed), and
/// it is renamed into place.
pub(crate) fn make_node(
    dir: BorrowedFd<'_>,
    name: &[u8],
    file_type: FileType,
    device: rustix::fs::Dev,
    mode: u32,
    mtime: Mtime,
    owner: Option<Owner>,
) -> io::Result<()> {
    let mode = Mode::from_raw_mode(mode & 0o777);
    let (_, part) = make_new(|temp| rustix::fs::mknodat(dir, temp, file_type, mode, device))?;
    let placed = (|| -> io::Result<()> {
        let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let node = rustix::fs::openat(dir, part.as_slice(), flags, Mode::empty())?;
        if FileType::from_raw_mode(rustix::fs::fstat(&node)?.st_mode) != file_type {
            return Err(io::Error::other("replaced while it was being made"));
        }
        if let Some(owner) = owner {
            let (uid, gid) = ids(owner);
            rustix::fs::chownat(&node, c"", Some(uid), Some(gid), AtFlags::EMPTY_PATH)?;
        }
        // chmod and utimensat take no O_PATH handle, but they take its
        // name in /proc, which leads to that inode and nowhere else.
        let by_handle = format!("/proc/self/fd/{}", node.as_raw_fd());
        rustix::fs::chmod(by_handle.as_str(), mode)?;
        rustix::fs::utimensat(
            rustix::fs::CWD,
            by_handle.as_str(),
            &mtime_only(mtime),
            AtFlags::empty(),
        )?;
        rename_into_place(dir, &part, name)
    })();
    if placed.is_err() {
        let _ = remove_if_present(dir, &part);
    }
    placed
}

/// Make something under a fresh working name (`names::new_name`) that no
/// other transfer uses, looks for or removes: `make` creates it
/// exclusively under the name it is given (failing with `EEXIST` if that
/// is taken, as `mknodat`, `symlinkat`, `linkat` and `O_EXCL` do), and is
/// asked again with another name if so. Returns what it made, and the
/// name. Nothing is ever removed to make room.
pub(crate) fn make_new<T>(
    mut make: impl FnMut(&[u8]) -> rustix::io::Result<T>,
) -> io::Result<(T, Vec<u8>)> {
    // Each name is one in 2^64: a few tries are only ever needed against
    // names planted on purpose.
    for _ in 0..8 {
        let name = names::new_name(fresh_seed());
        match make(&name) {
            Ok(made) => return Ok((made, name)),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(map_loop(e)),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free working name",
    ))
}

/// A seed no other call here, and no other process, is likely to use,
/// nor anyone to guess: the process id, a count, and the time, hashed.
fn fresh_seed() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut bytes = [0u8; 28];
    bytes[..4].copy_from_slice(&std::process::id().to_le_bytes());
    bytes[4..12].copy_from_slice(&COUNT.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    bytes[12..].copy_from_slice(&nanos.to_le_bytes());
    ferry_proto::digest::chunk_hash(&bytes)
}

/// Whether this process may give files away to any owner: only root can,
/// so only a receiver running as root applies the owners it is sent (as
/// rsync and tar do).
pub(crate) fn may_chown() -> bool {
    rustix::process::geteuid().is_root()
}

/// Give `fd` the owner `owner` (which must be valid: see
/// [`Owner::is_valid`]).
pub(crate) fn set_owner(fd: BorrowedFd<'_>, owner: Owner) -> io::Result<()> {
    let (uid, gid) = ids(owner);
    Ok(rustix::fs::fchown(fd, Some(uid), Some(gid))?)
}

/// `owner` as the ids chown(2) takes (it must be valid: see
/// [`Owner::is_valid`]).
pub(crate) fn ids(owner: Owner) -> (rustix::fs::Uid, rustix::fs::Gid) {
    (
        rustix::fs::Uid::from_raw(owner.uid),
        rustix::fs::Gid::from_raw(owner.gid),
    )
}

/// Rename `part` over `name` in `dir`: how everything the receiver makes
/// takes its name, whole. A directory in the way is left alone, and said.
pub(crate) fn rename_into_place(dir: BorrowedFd<'_>, part: &[u8], name: &[u8]) -> io::Result<()> {
    rustix::fs::renameat(dir, part, dir, name).map_err(|e| match e {
        rustix::io::Errno::ISDIR | rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST => {
            io::Error::other("a directory is in the way")
        }
        e => e.into(),
    })
}

/// The owner a file created in directory `dir` gets, by this process:
/// its effective uid, and its effective gid unless the directory is
/// setgid (then the directory's group).
pub(crate) fn owner_of_new_files(dir: &Stat) -> Owner {
    let setgid = dir.st_mode & 0o2000 != 0;
    let own = effective_owner();
    Owner {
        uid: own.uid,
        gid: if setgid { dir.st_gid } else { own.gid },
    }
}

/// This process's effective uid and gid, asked once: ferry never changes
/// them, and a receiver asks for every directory it makes (two system
/// calls each time).
fn effective_owner() -> Owner {
    static OWN: std::sync::OnceLock<Owner> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| Owner {
        uid: rustix::process::geteuid().as_raw(),
        gid: rustix::process::getegid().as_raw(),
    })
}

/// Timestamps that set the mtime and leave the atime alone.
pub(crate) fn mtime_only(mtime: Mtime) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime.sec,
            tv_nsec: i64::from(mtime.nsec.min(999_999_999)),
        },
    }
}

/// Wording for errors this module makes itself.
pub(crate) fn symlink_refused() -> io::Error {
    io::Error::other("a path component is a symlink, which ferry does not follow")
}

fn map_loop(e: rustix::io::Errno) -> io::Error {
    if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::XDEV {
        symlink_refused()
    } else {
        e.into()
    }
}

/// Open directory `components` below `base` without following symlinks.
pub(crate) fn open_dir_beneath(base: BorrowedFd<'_>, components: &[&[u8]]) -> io::Result<OwnedFd> {
    if components.is_empty() {
        return Ok(rustix::fs::openat(base, c".", DIR_FLAGS, Mode::empty())?);
    }
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        let joined = components.join(&b'/');
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        match rustix::fs::openat2(base, joined.as_slice(), DIR_FLAGS, Mode::empty(), resolve) {
            Ok(fd) => return Ok(fd),
            Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::PERM => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            // openat2 may ask us to retry (EAGAIN on a concurrent rename);
            // the walk below gives the same guarantees without that.
            Err(e) if e == rustix::io::Errno::AGAIN => {}
            // Some component is not a directory; the walk says which, and
            // whether it is a symlink.
            Err(e) if e == rustix::io::Errno::NOTDIR => {}
            Err(e) => return Err(map_loop(e)),
        }
    }
    let mut dir = open_subdir(base, components[0])?;
    for c in &components[1..] {
        dir = open_subdir(dir.as_fd(), c)?;
    }
    Ok(dir)
}

/// Open the subdirectory `name` of `dir`, refusing a symlink.
pub(crate) fn open_subdir(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(|e| match e {
        // O_DIRECTORY reports a symlink as "not a directory": say what it is.
        rustix::io::Errno::NOTDIR if is_symlink(dir, name) => symlink_refused(),
        e => map_loop(e),
    })
}

fn is_symlink(dir: BorrowedFd<'_>, name: &[u8]) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|stat| kind_of(&stat) == Kind::Symlink)
}

/// Like `mkdir -p` below `base`, never following a symlink; returns the
/// innermost directory. New directories get `mode` (then the umask).
pub(crate) fn create_dirs_beneath(
    base: BorrowedFd<'_>,
    components: &[&[u8]],
    mode: u32,
) -> io::Result<OwnedFd> {
    let mut dir = rustix::fs::openat(base, c".", DIR_FLAGS, Mode::empty())?;
    for c in components {
        dir = ensure_dir(dir.as_fd(), c, mode)?;
    }
    Ok(dir)
}

/// Open directory `name` in `parent`, creating it if missing. An existing
/// non-directory (a symlink included) is an error.
pub(crate) fn ensure_dir(parent: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<OwnedFd> {
    ensure_dir_noting(parent, name, mode).map(|(fd, _)| fd)
}

/// [`ensure_dir`], also saying whether the directory was created just now
/// (then nothing in it predates this transfer).
pub(crate) fn ensure_dir_noting(
    parent: BorrowedFd<'_>,
    name: &[u8],
    mode: u32,
) -> io::Result<(OwnedFd, bool)> {
    let created = match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(mode)) {
        Ok(()) => true,
        Err(rustix::io::Errno::EXIST) => false,
        Err(e) => return Err(e.into()),
    };
    match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok((fd, created)),
        Err(rustix::io::Errno::LOOP) => Err(symlink_refused()),
        Err(rustix::io::Errno::NOTDIR) if is_symlink(parent, name) => Err(symlink_refused()),
        Err(rustix::io::Errno::NOTDIR) => Err(io::Error::other("exists and is not a directory")),
        Err(e) => Err(e.into()),
    }
}

/// A part file opened for writing (and reading back).
pub(crate) struct PartFile {
    pub(crate) fd: OwnedFd,
    /// Whether it was created with its final mode already.
    pub(crate) mode_set: bool,
    /// Whether it was left by an earlier, interrupted transfer (and may
    /// hold data worth resuming from) rather than created just now.
    pub(crate) existing: bool,
}

/// The error [`open_part`] gives when another live transfer holds the
/// part file: not a fault, a reason to try again later.
pub(crate) fn part_busy() -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        "another transfer is writing this file right now",
    )
}

/// Whether a part file or a journal found under its name may be taken up
/// as the receiver's own: a regular file of this process's user, of one
/// name, that nobody else may open. That is what the receiver makes (see
/// [`open_part`]) and what stays of it; anything else may have been
/// planted, linked to another file, or opened by someone who then keeps
/// the descriptor to rewrite the file once committed.
pub(crate) fn is_own_private(stat: &Stat) -> bool {
    kind_of(stat) == Kind::File
        && stat.st_uid == rustix::process::geteuid().as_raw()
        && stat.st_nlink == 1
        && stat.st_mode & 0o077 == 0
}

/// The mode to create a part file with, and whether that is its final
/// mode (then no chmod is needed before it takes its name): `mode` when
/// the umask leaves it whole and `private` does not forbid it, otherwise
/// 0600.
fn creation_mode(mode: u32, private: bool) -> (u32, bool) {
    let exact = mode & process_umask() == 0 && !(private && mode & 0o077 != 0);
    (if exact { mode } else { 0o600 }, exact)
}

/// Open the part file `part` in `dir` for a file that may be resumed: new,
/// or left by an interrupted transfer, and take its lock.
///
/// The lock (an exclusive `flock`, released when the descriptor closes,
/// so also when the process dies) is what keeps two transfers of the same
/// path from mixing their bytes: whoever holds it owns the part file. A
/// part held by a live transfer gives [`part_busy`]. After locking a
/// leftover, its name is checked to still lead to the same inode: the
/// previous owner may have moved it into place in between.
///
/// A new part file is created exclusively (`O_EXCL`) and private (0600,
/// or its final mode if that is private too), and stays so as long as it
/// has this name: the receiver moves it off the name before it gives it
/// its final mode or owner. What is found under the name is looked at
/// before anything opens it (see [`look`]); only what passes
/// [`is_own_private`] is opened, through the handle it was looked at by.
/// Anything else (another user's file, a hard link, a file others could
/// have opened, a symlink, a fifo, a device node) is never opened for
/// reading or writing, never followed or truncated: it is removed and the
/// part made anew.
pub(crate) fn open_part(dir: BorrowedFd<'_>, part: &[u8], mode: u32) -> io::Result<PartFile> {
    let (create_mode, exact) = creation_mode(mode, true);
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    // A few rounds at most: each retry means the name changed under us.
    for _ in 0..4 {
        match rustix::fs::openat(dir, part, flags, Mode::from_raw_mode(create_mode)) {
            // The common case costs one syscall and an uncontended lock.
            Ok(fd) => {
                lock_part(&fd)?;
                return Ok(PartFile {
                    fd,
                    mode_set: exact,
                    existing: false,
                });
            }
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(found) = look(dir, part)? else {
            continue;
        };
        let own = is_own_private(&found.stat);
        let Some(fd) = own.then(|| found.open_regular(OFlags::RDWR)).flatten() else {
            // Not ours, or not one that can be opened safely: never
            // opened, replaced.
            remove_if_present(dir, part)?;
            continue;
        };
        lock_part(&fd)?;
        if found.still_named(dir, part) {
            return Ok(PartFile {
                fd,
                mode_set: false,
                existing: true,
            });
        }
    }
    Err(part_busy())
}

/// A part file for a file that is never resumed (one with no journal):
/// created exclusively under a fresh name of its own (see [`make_new`]),
/// which no other transfer looks for, with its final mode when the umask
/// leaves it whole (it becomes the final file: whoever may open it then
/// may open the file). Returns it and its name.
pub(crate) fn open_fresh_part(dir: BorrowedFd<'_>, mode: u32) -> io::Result<(PartFile, Vec<u8>)> {
    let (create_mode, exact) = creation_mode(mode, false);
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let create =
        |name: &[u8]| rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(create_mode));
    let (fd, name) = make_new(create)?;
    let part = PartFile {
        fd,
        mode_set: exact,
        existing: false,
    };
    Ok((part, name))
}

/// Give the open file `file` a fresh working name in `dir` (see
/// [`make_new`]) by its descriptor, whatever names it has: through its
/// name in `/proc`. Returns the name, or an error where that cannot work
/// (no `/proc`).
pub(crate) fn link_anew(file: BorrowedFd<'_>, dir: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let by_handle = format!("/proc/self/fd/{}", file.as_raw_fd());
    let follow = AtFlags::SYMLINK_FOLLOW;
    make_new(|temp| rustix::fs::linkat(rustix::fs::CWD, by_handle.as_str(), dir, temp, follow))
        .map(|(_, name)| name)
}

/// Move `name` in `dir` to a fresh working name (see [`make_new`]) if it
/// still is `file`; returns the new name.
pub(crate) fn rename_anew(
    dir: BorrowedFd<'_>,
    name: &[u8],
    file: BorrowedFd<'_>,
) -> io::Result<Vec<u8>> {
    if !is_named(dir, name, file) {
        return Err(io::Error::other("its part file was replaced meanwhile"));
    }
    let noreplace = rustix::fs::RenameFlags::NOREPLACE;
    make_new(|temp| {
        match rustix::fs::renameat_with(dir, name, dir, temp, noreplace) {
            // A filesystem without RENAME_NOREPLACE: the name is fresh
            // (one in 2^64), a plain rename will do.
            Err(rustix::io::Errno::INVAL) => rustix::fs::renameat(dir, name, dir, temp),
            other => other,
        }
    })
    .map(|(_, n)| n)
}

/// Remove `name` in `dir` if it still is `file` (best effort: a name is
/// never removed for another file).
pub(crate) fn remove_if_named(dir: BorrowedFd<'_>, name: &[u8], file: BorrowedFd<'_>) {
    if is_named(dir, name, file) {
        let _ = remove_if_present(dir, name);
    }
}

/// Whether `name` in `dir` leads to `file`.
fn is_named(dir: BorrowedFd<'_>, name: &[u8], file: BorrowedFd<'_>) -> bool {
    let (Ok(named), Ok(open)) = (
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW),
        rustix::fs::fstat(file),
    ) else {
        return false;
    };
    named.st_dev == open.st_dev && named.st_ino == open.st_ino
}

/// Remove the resumable part file `part` in `dir`, and its `journal`, if
/// they are the receiver's own and no live transfer holds the part: what
/// an interrupted transfer left for a file that has arrived whole since
/// without them (it is smaller now, and small files are never resumed).
/// Anything else is left alone: a part held by a live transfer, and one
/// that is not ours (never opened; the next resume replaces it).
pub(crate) fn remove_stale_part(
    dir: BorrowedFd<'_>,
    part: &[u8],
    journal: &[u8],
) -> io::Result<()> {
    let Some(found) = look(dir, part)? else {
        return Ok(());
    };
    if !is_own_private(&found.stat) {
        return Ok(());
    }
    let Some(fd) = found.open_regular(OFlags::RDWR) else {
        return Ok(());
    };
    // Held while both go, so no transfer takes the part up in between.
    if lock_part(&fd).is_ok() && found.still_named(dir, part) {
        remove_if_present(dir, part)?;
        remove_if_present(dir, journal)?;
    }
    Ok(())
}

/// Take a part file's lock, or say that another transfer holds it.
fn lock_part(fd: &OwnedFd) -> io::Result<()> {
    use rustix::fs::{FlockOperation, flock};
    match flock(fd, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(part_busy()),
        Err(e) => Err(e.into()),
    }
}

/// What is under a name, looked at without opening it for I/O.
pub(crate) struct Looked {
    /// An `O_PATH` handle: it reads and writes nothing, and opening it
    /// reaches no driver (a device node's, a fifo's).
    handle: OwnedFd,
    pub(crate) stat: Stat,
}

/// Look at `name` in `dir` without opening it for I/O and without
/// following it (a symlink is looked at itself); `None` if nothing is
/// there.
pub(crate) fn look(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Option<Looked>> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let handle = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(handle) => handle,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let stat = rustix::fs::fstat(&handle)?;
    Ok(Some(Looked { handle, stat }))
}

impl Looked {
    /// Open what was looked at for I/O with `flags` if it is a regular
    /// file: through its handle in `/proc`, so it is that inode whatever
    /// its name leads to by now. `None` if it is not a regular file, or
    /// cannot be reopened so (no `/proc`): the caller then leaves it
    /// unopened.
    pub(crate) fn open_regular(&self, flags: OFlags) -> Option<OwnedFd> {
        if kind_of(&self.stat) != Kind::File {
            return None;
        }
        let by_handle = format!("/proc/self/fd/{}", self.handle.as_raw_fd());
        let fd = rustix::fs::open(by_handle.as_str(), flags | OFlags::CLOEXEC, Mode::empty());
        let fd = fd
            .inspect_err(|e| tracing::debug!("cannot reopen a file by its handle: {e}"))
            .ok()?;
        let now = rustix::fs::fstat(&fd).ok()?;
        (now.st_dev == self.stat.st_dev && now.st_ino == self.stat.st_ino).then_some(fd)
    }

    /// Whether `name` in `dir` still leads to what was looked at.
    pub(crate) fn still_named(&self, dir: BorrowedFd<'_>, name: &[u8]) -> bool {
        rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|now| now.st_dev == self.stat.st_dev && now.st_ino == self.stat.st_ino)
    }
}

/// Whether unnamed part files work here: not tried yet, yes, or no.
static UNNAMED_PARTS: AtomicU8 = AtomicU8::new(UNNAMED_UNTRIED);
const UNNAMED_UNTRIED: u8 = 0;
const UNNAMED_USABLE: u8 = 1;
const UNNAMED_UNUSABLE: u8 = 2;

/// An unnamed part file in `dir` (`O_TMPFILE`), for a file the receiver
/// writes whole into a directory it has just made. It has no name until
/// [`name_unnamed_part`] gives it the final one, so no other transfer can
/// find it (it needs no lock), and it vanishes by itself if the transfer
/// breaks off. That spares a small file the lock, the hidden name and the
/// rename: a fifth of what putting it in place costs.
///
/// `None` where that cannot work: a filesystem without `O_TMPFILE`, or a
/// process that may not link a file by its descriptor (`linkat` with
/// `AT_EMPTY_PATH` needs `CAP_DAC_READ_SEARCH` on kernels before 6.10).
/// The latter is found out once, on a probe file, before any data is
/// written to an unnamed file that then could not be named.
pub(crate) fn open_unnamed_part(dir: BorrowedFd<'_>, mode: u32) -> Option<PartFile> {
    if UNNAMED_PARTS.load(Ordering::Relaxed) == UNNAMED_UNUSABLE {
        return None;
    }
    let (create_mode, exact) = creation_mode(mode, false);
    let open = |mode: u32| {
        rustix::fs::openat(
            dir,
            c".",
            OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .ok()
    };
    let fd = open(create_mode)?;
    if UNNAMED_PARTS.load(Ordering::Relaxed) == UNNAMED_UNTRIED {
        let usable = open(0o600).is_some_and(|probe| probe_naming(dir, probe.as_fd()));
        let state = if usable {
            UNNAMED_USABLE
        } else {
            UNNAMED_UNUSABLE
        };
        UNNAMED_PARTS.store(state, Ordering::Relaxed);
        if !usable {
            return None;
        }
    }
    Some(PartFile {
        fd,
        mode_set: exact,
        existing: false,
    })
}

/// Whether an empty unnamed file can be given a name in `dir` (which is
/// then removed at once).
fn probe_naming(dir: BorrowedFd<'_>, probe: BorrowedFd<'_>) -> bool {
    let name = format!(
        ".ferry-probe.{}.{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let linked = rustix::fs::linkat(probe, c"", dir, name.as_str(), AtFlags::EMPTY_PATH).is_ok();
    if linked {
        let _ = rustix::fs::unlinkat(dir, name.as_str(), AtFlags::empty());
    }
    linked
}

/// Give an unnamed part file a fresh working name in `dir` (see
/// [`make_new`]), for a rename over a name that is taken; returns it.
pub(crate) fn name_unnamed_part_anew(
    file: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
) -> io::Result<Vec<u8>> {
    make_new(|temp| rustix::fs::linkat(file, c"", dir, temp, AtFlags::EMPTY_PATH)).map(|(_, n)| n)
}

/// Give an unnamed part file its `name` in `dir`, which must be free: an
/// `AlreadyExists` error if anything took it meanwhile.
pub(crate) fn name_unnamed_part(
    file: BorrowedFd<'_>,
    dir: BorrowedFd<'_>,
    name: &[u8],
) -> io::Result<()> {
    rustix::fs::linkat(file, c"", dir, name, AtFlags::EMPTY_PATH).map_err(Into::into)
}

/// Whether `name` in `dir` is a regular file of this size and mtime
/// (rsync's quick check): then its content is taken to be the same and
/// nothing is sent. Returns its stat so the caller can fix the mode.
pub(crate) fn unchanged(dir: BorrowedFd<'_>, name: &[u8], size: u64, mtime: Mtime) -> Option<Stat> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
    (kind_of(&stat) == Kind::File && stat.st_size as u64 == size && mtime_of(&stat) == mtime)
        .then_some(stat)
}

/// The process umask, read once from /proc (reading it with umask(2)
/// would briefly change it for every thread). If it cannot be read, the
/// most restrictive answer makes every file get an explicit chmod.
pub(crate) fn process_umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("Umask:"))?;
                u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
            })
            .unwrap_or(0o777)
    })
}

/// Remove `name` in `dir` if it is there; used to clear stale part files.
pub(crate) fn remove_if_present(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What the root of a transfer is, opened and ready to walk.
pub(crate) enum Root {
    Dir(OwnedFd, Stat),
    File(File, Stat),
    Symlink(Vec<u8>, Stat),
    Node(Stat),
    Special(&'static str),
}

/// Open the entry `name` in `dir` for sending, without following it if it
/// is a symlink.
pub(crate) fn open_entry(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Root> {
    let stat = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(match kind_of(&stat) {
        Kind::Dir => Root::Dir(open_subdir(dir, name)?, stat),
        Kind::File => {
            let (file, stat) = open_regular(dir, name)?;
            Root::File(file, stat)
        }
        Kind::Symlink => Root::Symlink(
            rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes(),
            stat,
        ),
        Kind::Node => Root::Node(stat),
        Kind::Special(what) => Root::Special(what),
    })
}

/// Open a regular file for reading. `O_NONBLOCK` keeps a fifo swapped in
/// after the stat from blocking the open; the fstat that follows is what
/// counts.
pub(crate) fn open_regular(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<(File, Stat)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(map_loop)?;
    let stat = rustix::fs::fstat(&fd)?;
    if kind_of(&stat) != Kind::File {
        return Err(io::Error::other(
            "changed into a non-regular file while being opened",
        ));
    }
    Ok((File::from(fd), stat))
}

/// Open the root of a transfer the user named on their own machine. The
/// user's own argument is followed if it is a symlink (as cp and scp do);
/// nothing below it ever is.
pub(crate) fn open_local_root(path: &std::path::Path) -> io::Result<Root> {
    let stat = rustix::fs::stat(path)?;
    Ok(match kind_of(&stat) {
        Kind::Dir => Root::Dir(
            rustix::fs::open(path, DIR_FLAGS.difference(OFlags::NOFOLLOW), Mode::empty())?,
            stat,
        ),
        Kind::File => {
            let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
            let fd = rustix::fs::open(path, flags, Mode::empty())?;
            let stat = rustix::fs::fstat(&fd)?;
            Root::File(File::from(fd), stat)
        }
        Kind::Symlink => unreachable!("stat follows symlinks"),
        Kind::Node => Root::Node(stat),
        Kind::Special(what) => Root::Special(what),
    })
}

/// Open the root of a transfer at `path` below the confinement root `base`.
pub(crate) fn open_confined_root(base: BorrowedFd<'_>, path: &WirePath) -> io::Result<Root> {
    let components: Vec<&[u8]> = path.components().collect();
    match components.split_last() {
        None => {
            let fd = open_dir_beneath(base, &[])?;
            let stat = rustix::fs::fstat(&fd)?;
            Ok(Root::Dir(fd, stat))
        }
        Some((last, parents)) => {
            let parent = open_dir_beneath(base, parents)?;
            open_entry(parent.as_fd(), last)
        }
    }
}

/// The entries of a directory, sorted by name, without `.` and `..`, each
/// with the type the directory itself records (which saves a stat where
/// the filesystem fills it in; `Unknown` where it does not).
///
/// Memory grows with the size of one directory, never with the tree.
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, FileType)>> {
    let mut entries = Vec::new();
    // A duplicate of the descriptor rather than `Dir::read_from`, which
    // opens the directory again. The duplicate shares its position, so
    // the listing starts with a rewind: a directory may be listed twice.
    let mut listing = rustix::fs::Dir::new(dir.try_clone_to_owned()?)?;
    listing.rewind();
    for entry in listing {
        let entry = entry?;
        let name: &CStr = entry.file_name();
        let name = name.to_bytes();
        if name != b"." && name != b".." {
            entries.push((name.to_vec(), entry.file_type()));
        }
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, symlink};

    fn base(dir: &std::path::Path) -> OwnedFd {
        rustix::fs::open(dir, DIR_FLAGS, Mode::empty()).unwrap()
    }

    #[test]
    fn zeroed_ranges_read_as_zeros_and_holes_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, vec![0xab; 3 << 20]).unwrap();
        let file = File::options().read(true).write(true).open(&path).unwrap();
        zero_range(file.as_fd(), 1 << 20, 1 << 20).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 << 20, "the size is kept");
        assert!(bytes[..1 << 20].iter().all(|&b| b == 0xab));
        assert!(bytes[1 << 20..2 << 20].iter().all(|&b| b == 0));
        assert!(bytes[2 << 20..].iter().all(|&b| b == 0xab));
        // Where the filesystem punched a hole, SEEK_DATA finds it; a
        // filesystem that wrote zeros instead has no hole to find.
        let stat = rustix::fs::fstat(&file).unwrap();
        if may_have_holes(&stat) {
            assert!(is_hole(file.as_fd(), 1 << 20, 1 << 20));
        }
        assert!(!is_hole(file.as_fd(), 0, 1 << 20));
        assert!(!is_hole(file.as_fd(), (1 << 20) + 4096, 1 << 20));
        // Past the end there is no data at all.
        assert!(is_hole(file.as_fd(), 3 << 20, 1 << 20));
    }

    #[test]
    fn opens_plain_directories_beneath() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("a/b")).unwrap();
        let b = base(tmp.path());
        open_dir_beneath(b.as_fd(), &[b"a", b"b"]).unwrap();
        open_dir_beneath(b.as_fd(), &[]).unwrap();
    }

    #[test]
    fn refuses_symlinked_components_both_ways() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("real")).unwrap();
        symlink(outside.path(), tmp.path().join("escape")).unwrap();
        symlink("real", tmp.path().join("inside-link")).unwrap();
        let b = base(tmp.path());
        for link in [&b"escape"[..], b"inside-link"] {
            assert!(open_dir_beneath(b.as_fd(), &[link]).is_err());
            assert!(create_dirs_beneath(b.as_fd(), &[link, b"x"], 0o755).is_err());
        }
        // The fallback walk refuses them too.
        NO_OPENAT2.store(true, Ordering::Relaxed);
        assert!(open_dir_beneath(b.as_fd(), &[b"escape"]).is_err());
        NO_OPENAT2.store(false, Ordering::Relaxed);
        assert!(!outside.path().join("x").exists());
    }

    #[test]
    fn creates_missing_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        create_dirs_beneath(b.as_fd(), &[b"p", b"q"], 0o755).unwrap();
        assert!(tmp.path().join("p/q").is_dir());
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        let err = create_dirs_beneath(b.as_fd(), &[b"file", b"q"], 0o755).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn part_files_replace_leftovers_and_planted_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        let outside = tmp.path().join("outside");
        let path = |name: &[u8]| tmp.path().join(std::str::from_utf8(name).unwrap());
        let write = |name: &[u8], mode: u32| {
            std::fs::write(path(name), b"stale").unwrap();
            std::fs::set_permissions(path(name), std::fs::Permissions::from_mode(mode)).unwrap();
        };
        // What this process left: its own, private, of one name.
        write(b".a.ferry-part", 0o600);
        symlink(&outside, tmp.path().join(".b.ferry-part")).unwrap();
        // Others could open it (and keep it open).
        write(b".d.ferry-part", 0o644);
        write(b".e.ferry-part", 0o620);
        // A second name of another file.
        std::fs::write(tmp.path().join("other"), b"other").unwrap();
        std::fs::hard_link(tmp.path().join("other"), path(b".f.ferry-part")).unwrap();
        for (part, leftover) in [
            (&b".a.ferry-part"[..], true),
            (b".b.ferry-part", false),
            (b".c.ferry-part", false),
            (b".d.ferry-part", false),
            (b".e.ferry-part", false),
            (b".f.ferry-part", false),
        ] {
            let opened = open_part(b.as_fd(), part, 0o644).unwrap();
            assert_eq!(opened.existing, leftover, "{}", path(part).display());
            let meta = std::fs::symlink_metadata(path(part)).unwrap();
            assert!(meta.is_file() && meta.nlink() == 1);
            assert_eq!(meta.permissions().mode() & 0o077, 0, "private");
        }
        assert!(!outside.exists(), "the planted symlink was not followed");
        assert_eq!(std::fs::read(tmp.path().join("other")).unwrap(), b"other");
    }

    #[test]
    fn a_node_under_a_part_name_is_replaced_never_opened() {
        use rustix::fs::inotify;
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        let fifo = tmp.path().join(".f.ferry-part");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, FileType::Fifo, 0o600.into(), 0).unwrap();
        let watch = inotify::init(inotify::CreateFlags::NONBLOCK).unwrap();
        inotify::add_watch(&watch, &fifo, inotify::WatchFlags::OPEN).unwrap();
        let looked = look(b.as_fd(), b".f.ferry-part").unwrap().unwrap();
        assert!(looked.open_regular(OFlags::RDONLY).is_none());
        let opened = open_part(b.as_fd(), b".f.ferry-part", 0o600).unwrap();
        assert!(!opened.existing);
        assert!(std::fs::symlink_metadata(&fifo).unwrap().is_file());
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
        let mut events = inotify::Reader::new(&watch, &mut buf);
        while let Ok(event) = events.next() {
            assert!(!event.events().contains(inotify::ReadFlags::OPEN), "opened");
        }
    }

    #[test]
    fn part_files_get_their_final_mode_when_the_umask_allows() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        let umask = process_umask();
        let mode_of = |name: &str| {
            let meta = std::fs::metadata(tmp.path().join(name)).unwrap();
            meta.permissions().mode() & 0o777
        };
        for mode in [0o644, 0o755, 0o444, 0o600, 0o400, 0o777] {
            // A fresh part becomes the file: its final mode at once.
            let (fresh, name) = open_fresh_part(b.as_fd(), mode).unwrap();
            let name = String::from_utf8(name).unwrap();
            assert!(name.starts_with(".ferry-new."), "{name}");
            assert_eq!(fresh.mode_set, mode & umask == 0, "{mode:o}");
            let private = 0o600 & !umask;
            let want = if fresh.mode_set { mode } else { private };
            assert_eq!(mode_of(&name), want, "{mode:o}");
            // A resumable one stays private under its part name.
            let name = format!(".m{mode:o}.ferry-part");
            let resumable = open_part(b.as_fd(), name.as_bytes(), mode).unwrap();
            let exact = mode & umask == 0 && mode & 0o077 == 0;
            assert_eq!(resumable.mode_set, exact, "{mode:o}");
            assert_eq!(mode_of(&name), if exact { mode } else { private });
        }
    }

    #[test]
    fn a_file_is_linked_and_moved_anew_by_its_descriptor() {
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        let part = open_part(b.as_fd(), b".p.ferry-part", 0o600).unwrap();
        let linked = link_anew(part.fd.as_fd(), b.as_fd()).unwrap();
        assert!(is_named(b.as_fd(), &linked, part.fd.as_fd()));
        remove_if_named(b.as_fd(), b".p.ferry-part", part.fd.as_fd());
        assert!(!tmp.path().join(".p.ferry-part").exists());
        // A name that is not the file's is never removed nor moved.
        std::fs::write(tmp.path().join(".p.ferry-part"), b"another").unwrap();
        remove_if_named(b.as_fd(), b".p.ferry-part", part.fd.as_fd());
        assert!(tmp.path().join(".p.ferry-part").exists());
        assert!(rename_anew(b.as_fd(), b".p.ferry-part", part.fd.as_fd()).is_err());
        let moved = rename_anew(b.as_fd(), &linked, part.fd.as_fd()).unwrap();
        assert_ne!(moved, linked);
        assert!(is_named(b.as_fd(), &moved, part.fd.as_fd()));
    }

    #[test]
    fn open_part_locks_and_reports_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        let outside = tmp.path().join("outside");
        symlink(&outside, tmp.path().join(".s.ferry-part")).unwrap();
        let planted = open_part(b.as_fd(), b".s.ferry-part", 0o644).unwrap();
        assert!(
            !planted.existing && !outside.exists(),
            "symlink replaced, not followed"
        );

        let fresh = open_part(b.as_fd(), b".a.ferry-part", 0o644).unwrap();
        assert!(!fresh.existing);
        // A live transfer holds it: a second one is told to come back later.
        let busy = open_part(b.as_fd(), b".a.ferry-part", 0o644).err().unwrap();
        assert_eq!(busy.kind(), io::ErrorKind::WouldBlock);
        drop(fresh);
        // Once the holder is gone it is a leftover, ready for a resume.
        let left = open_part(b.as_fd(), b".a.ferry-part", 0o644).unwrap();
        assert!(left.existing && !left.mode_set);
    }

    #[test]
    fn unnamed_parts_appear_whole_under_their_name_or_not_at_all() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let b = base(tmp.path());
        // Where the process or the filesystem cannot, the caller falls
        // back to a named part file: nothing to check then.
        let Some(part) = open_unnamed_part(b.as_fd(), 0o640) else {
            eprintln!("note: unnamed part files are not usable here");
            return;
        };
        let file = File::from(part.fd);
        file.write_all_at(b"whole", 0).unwrap();
        let listed = |b: &OwnedFd| list_dir(b.as_fd()).unwrap();
        assert!(
            listed(&b).is_empty(),
            "no name before it is named: {:?}",
            listed(&b)
        );
        name_unnamed_part(file.as_fd(), b.as_fd(), b"f").unwrap();
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"whole");
        // A name taken meanwhile is not replaced: the caller decides.
        let second = open_unnamed_part(b.as_fd(), 0o640).unwrap();
        let taken = name_unnamed_part(second.fd.as_fd(), b.as_fd(), b"f").unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(tmp.path().join("f")).unwrap(), b"whole");
        // A part that is never named leaves nothing behind.
        drop(second);
        assert_eq!(listed(&b).len(), 1);
    }

    #[test]
    fn a_directory_lists_the_same_twice_through_one_descriptor() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["b", "a", "c"] {
            std::fs::write(tmp.path().join(name), name).unwrap();
        }
        let b = base(tmp.path());
        let names = || -> Vec<Vec<u8>> {
            list_dir(b.as_fd())
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        assert_eq!(names(), [b"a", b"b", b"c"]);
        assert_eq!(names(), [b"a", b"b", b"c"]);
    }

    #[test]
    fn a_symlink_root_is_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        symlink("/etc", tmp.path().join("l")).unwrap();
        let b = base(tmp.path());
        let path = WirePath::parse(b"l").unwrap();
        assert!(
            matches!(open_confined_root(b.as_fd(), &path).unwrap(), Root::Symlink(t, _) if t == b"/etc")
        );
    }
}
