//! What the user typed, turned into exact paths: the rule that decides
//! what the copy is called (which side is where is `spec`'s).
//!
//! The destination names the copy itself (`up ./site production/website`
//! makes `production/website` a copy of `site`, merged into it if it is a
//! directory already), except when it ends with `/` or is `.`: then the
//! copy goes inside it, under the source's name, as scp and cp users
//! expect. The one other case, a source that is not a directory sent to
//! an existing directory, goes inside it too; only the receiver can tell
//! (the server, for an upload), so it decides that itself when the first
//! entry arrives (the engine's `receiver::rules::root_goes_inside`).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// Does this destination mean "inside this directory"?
fn names_a_directory(dest: &[u8]) -> bool {
    dest.is_empty() || dest.ends_with(b"/") || dest == b"." || dest.ends_with(b"/.")
}

/// The last real component of a path (trailing slashes and `.` ignored).
fn base_name(path: &[u8]) -> Option<&[u8]> {
    path.split(|&b| b == b'/')
        .rfind(|c| !c.is_empty() && *c != b".")
        .filter(|c| *c != b"..")
}

/// The name a local source is known by: its own last component, or for
/// `.`-like paths the name of the directory it resolves to.
pub fn local_name(path: &Path) -> Result<Vec<u8>, String> {
    if let Some(name) = base_name(path.as_os_str().as_bytes()) {
        return Ok(name.to_vec());
    }
    let real = path
        .canonicalize()
        .map_err(|e| format!("{}: {}", path.display(), ferry_engine::error::reason(&e)))?;
    real.file_name()
        .map(|n| n.as_bytes().to_vec())
        .ok_or_else(|| {
            format!(
                "{}: cannot tell what to call the copy; name the destination",
                path.display()
            )
        })
}

/// The remote source's name, for a destination that names a directory.
pub fn remote_name(path: &[u8]) -> Result<Vec<u8>, String> {
    base_name(path).map(<[u8]>::to_vec).ok_or_else(|| {
        format!(
            "cannot tell what to call a copy of '{}'; name the destination",
            ferry_engine::escape(path)
        )
    })
}

/// Apply the naming rule: the exact path of the copy.
pub fn copy_path(dest: &[u8], source_name: &[u8]) -> Vec<u8> {
    if !names_a_directory(dest) {
        return dest.to_vec();
    }
    let mut out = dest.to_vec();
    if out == b"." || out.ends_with(b"/.") {
        out.pop();
    }
    if !out.is_empty() && !out.ends_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(source_name);
    out
}

/// Tidy a remote path the way a shell user means it: no `./`, no doubled
/// or trailing slashes. A leading `/` and `..` are kept as typed: the
/// server refuses them and says why.
pub fn tidy_remote(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    if path.starts_with(b"/") {
        out.push(b'/');
    }
    for c in path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
    {
        if !out.is_empty() && !out.ends_with(b"/") {
            out.push(b'/');
        }
        out.extend_from_slice(c);
    }
    out
}

pub fn os(bytes: Vec<u8>) -> OsString {
    OsString::from_vec(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destination_names_the_copy_unless_it_is_a_directory() {
        assert_eq!(
            copy_path(b"production/website", b"site"),
            b"production/website"
        );
        assert_eq!(copy_path(b"dir/", b"f.txt"), b"dir/f.txt");
        assert_eq!(copy_path(b".", b"f.txt"), b"f.txt");
        assert_eq!(copy_path(b"a/.", b"f.txt"), b"a/f.txt");
        assert_eq!(copy_path(b"", b"f.txt"), b"f.txt");
        assert_eq!(copy_path(b"/tmp/", b"f"), b"/tmp/f");
    }

    #[test]
    fn names_of_sources() {
        assert_eq!(base_name(b"a/b/"), Some(&b"b"[..]));
        assert_eq!(base_name(b"./site/."), Some(&b"site"[..]));
        assert_eq!(base_name(b".."), None);
        assert_eq!(remote_name(b"x/y").unwrap(), b"y");
        assert!(remote_name(b"").is_err());
        let here = local_name(Path::new(".")).unwrap();
        assert!(!here.is_empty());
    }

    #[test]
    fn remote_paths_are_tidied_but_not_sanitised() {
        assert_eq!(tidy_remote(b"./a//b/"), b"a/b");
        assert_eq!(tidy_remote(b"."), b"");
        assert_eq!(tidy_remote(b"/etc/passwd"), b"/etc/passwd");
        assert_eq!(tidy_remote(b"a/../../x"), b"a/../../x");
    }
}
