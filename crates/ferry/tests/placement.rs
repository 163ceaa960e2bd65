//! What the copy is called, one rule for upload, download and cp: a file
//! sent to an existing directory goes inside it; a destination ending in
//! `/` or `/.` is a directory to put the copy in; a directory becomes the
//! destination itself, merged into an existing one; a symlink at the
//! destination is never followed.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::util::*;

/// A scratch dir with `file.txt`, and a server root.
fn one_file() -> (Scratch, PathBuf, PathBuf) {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let file = scratch.join("file.txt");
    write_random_file(&file, 5000, 71);
    set_mtime(&file, 1_400_000_000, 7);
    (scratch, file, root)
}

/// `dir` with `other.txt` in it, which must stay.
fn existing_dir(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    write_file(&dir.join("other.txt"), b"stays");
}

fn assert_kept(dir: &Path) {
    assert_eq!(fs::read(dir.join("other.txt")).unwrap(), b"stays");
}

/// `dir` as a path ending in `suffix` (`/`, `/.`).
fn with_suffix(dir: &Path, suffix: &str) -> PathBuf {
    let mut path = dir.as_os_str().to_os_string();
    path.push(suffix);
    path.into()
}

#[test]
fn a_file_sent_to_an_existing_directory_goes_inside_it_all_three_ways() {
    let (scratch, file, root) = one_file();
    existing_dir(&root.join("up"));
    let server = Server::start(&root);

    server.run(&[&"up", &file, &"up"]).assert_success();
    assert_files_equal(&file, &root.join("up/file.txt"));
    assert_kept(&root.join("up"));
    // The quick check looks where the file went: a second run sends nothing.
    let again = server.run(&[&"up", &file, &"up", &"--json"]);
    again.assert_success();
    assert!(again.stdout.contains("file_unchanged"), "{again}");

    let down = scratch.join("down");
    existing_dir(&down);
    server
        .run(&[&"down", &"up/file.txt", &down])
        .assert_success();
    assert_files_equal(&file, &down.join("file.txt"));
    assert_kept(&down);

    let local = scratch.join("local");
    existing_dir(&local);
    run(&[&"cp", &file, &local]).assert_success();
    assert_files_equal(&file, &local.join("file.txt"));
    assert_kept(&local);

    existing_dir(&root.join("by_cp"));
    let to = "127.0.0.1:by_cp";
    let port = server.port().to_string();
    let state = server.state_dir();
    run(&[&"cp", &file, &to, &"--port", &port, &"--state-dir", &state]).assert_success();
    assert_files_equal(&file, &root.join("by_cp/file.txt"));
}

#[test]
fn a_destination_ending_in_a_slash_or_slash_dot_is_a_directory_to_put_the_copy_in() {
    let (scratch, file, root) = one_file();
    let server = Server::start(&root);
    for (dest, lands) in [("new/", "new/file.txt"), ("new2/.", "new2/file.txt")] {
        server.run(&[&"up", &file, &dest]).assert_success();
        assert_files_equal(&file, &root.join(lands));
    }
    for suffix in ["/", "/."] {
        let local = scratch.join(format!("local{}", suffix.len()));
        server
            .run(&[&"down", &"new/file.txt", &with_suffix(&local, suffix)])
            .assert_success();
        assert_files_equal(&file, &local.join("file.txt"));
    }
    let src = scratch.join("site");
    build_small_tree(&src);
    let local = scratch.join("copies");
    run(&[&"cp", &src, &with_suffix(&local, "/")]).assert_success();
    assert_trees_equal(&src, &local.join("site"));
}

/// `dst` has `src` (a small tree) merged in: its entries as in `src`,
/// beside the `other.txt` it had, and nothing nested under a source name.
#[track_caller]
fn assert_merged(src: &Path, dst: &Path) {
    assert_files_equal(&src.join("one.txt"), &dst.join("one.txt"));
    assert_trees_equal(&src.join("sub"), &dst.join("sub"));
    assert_kept(dst);
    let mut names: Vec<_> = fs::read_dir(dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["one.txt", "other.txt", "sub"], "{}", dst.display());
}

/// The seed's deploy: `up ./website_build production/website` makes the
/// contents of `website_build` the contents of `production/website`, on
/// the first run and every later one, never `website/website_build`.
#[test]
fn a_directory_sent_to_an_existing_directory_becomes_it_merged() {
    let scratch = Scratch::new();
    let build = scratch.join("website_build");
    build_small_tree(&build);
    let root = scratch.mkdir("root");
    let website = root.join("production/website");
    existing_dir(&website);
    let server = Server::start(&root);

    for _run in 0..2 {
        server
            .run(&[&"up", &build, &"production/website"])
            .assert_success();
        assert_merged(&build, &website);
    }

    let restore = scratch.join("restore");
    existing_dir(&restore);
    server
        .run(&[&"down", &"production/website", &restore])
        .assert_success();
    assert_files_equal(&website.join("other.txt"), &restore.join("other.txt"));
    assert_merged(&build, &restore);

    let copy = scratch.join("copy");
    existing_dir(&copy);
    run(&[&"cp", &build, &copy]).assert_success();
    assert_merged(&build, &copy);
}

/// A symlink to a directory where the copy would land is not a directory
/// to go into: the file replaces the link (on the server, and locally for
/// a download), and the directory it pointed to, outside the root, gets
/// nothing. Through the link as a parent (`link/`) nothing is made.
#[test]
fn a_file_sent_to_a_symlink_to_a_directory_replaces_the_link_and_stays_confined() {
    let (scratch, file, root) = one_file();
    let outside = scratch.mkdir("outside");
    symlink(&outside, root.join("link")).unwrap();
    symlink(&outside, root.join("link2")).unwrap();
    let server = Server::start(&root);

    server.run(&[&"up", &file, &"link"]).assert_success();
    assert!(lstat(&root.join("link")).is_file());
    assert_files_equal(&file, &root.join("link"));

    let out = server.run(&[&"up", &file, &"link2/"]);
    out.assert_code(1).assert_stderr_contains("symlink");
    assert!(lstat(&root.join("link2")).file_type().is_symlink());

    let local_link = scratch.join("local_link");
    symlink(&outside, &local_link).unwrap();
    server
        .run(&[&"down", &"link", &local_link])
        .assert_success();
    assert!(lstat(&local_link).is_file());
    assert_files_equal(&file, &local_link);

    let names: Vec<_> = fs::read_dir(&outside).unwrap().collect();
    assert!(names.is_empty(), "nothing outside the root: {names:?}");
}
