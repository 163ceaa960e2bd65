//! Owners: a receiver running as root gives every entry the user and group
//! ids it has on the sending side (files, directories, symlinks, the root
//! of the transfer), in both directions; `--no-owner` keeps the receiver's
//! own; a receiver that is not root keeps its own and still succeeds.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use crate::util::*;

/// Owner ids no account on a test machine is likely to have, so that a
/// result cannot match by accident.
const OWNERS: [(u32, u32); 5] = [
    (4101, 5101),
    (4102, 5102),
    (4103, 5103),
    (4104, 5104),
    (4105, 5105),
];

/// The `(uid, gid)` of every entry below `root` (the root itself as ""),
/// never following a symlink.
fn owners_of(root: &Path) -> BTreeMap<PathBuf, (u32, u32)> {
    let mut found = BTreeMap::new();
    let mut pending = vec![PathBuf::new()];
    // Bounded: the trees here hold a few dozen entries.
    for _ in 0..10_000 {
        let Some(relative) = pending.pop() else {
            return found;
        };
        let path = root.join(&relative);
        let meta =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        found.insert(relative.clone(), (meta.uid(), meta.gid()));
        if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                pending.push(relative.join(entry.unwrap().file_name()));
            }
        }
    }
    panic!("{} holds more entries than expected", root.display());
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    lchown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
}

/// A tree whose entries are owned by several users: a small and a large
/// file (the large one goes through a named part file and its journal),
/// a directory, a symlink, the root; one file stays root's.
fn owned_tree(scratch: &Scratch) -> PathBuf {
    let src = scratch.join("src");
    build_small_tree(&src);
    write_random_file(&src.join("sub/large.bin"), 5 * MIB, 77);
    std::os::unix::fs::symlink("one.txt", src.join("link")).unwrap();
    write_random_file(&src.join("roots.txt"), 10, 78);
    chown(&src, OWNERS[0]);
    chown(&src.join("one.txt"), OWNERS[1]);
    chown(&src.join("sub"), OWNERS[2]);
    chown(&src.join("sub/two.txt"), OWNERS[3]);
    chown(&src.join("sub/large.bin"), OWNERS[3]);
    chown(&src.join("link"), OWNERS[4]);
    src
}

/// Skips (with a note) a test that needs root to give files away.
fn root_or_skip(test: &str) -> bool {
    if !is_root() {
        eprintln!("note: {test} skipped: only root can give files to other owners");
    }
    is_root()
}

#[test]
fn a_root_receiver_keeps_owners_up_and_down() {
    if !root_or_skip("a_root_receiver_keeps_owners_up_and_down") {
        return;
    }
    let scratch = Scratch::new();
    let src = owned_tree(&scratch);
    let root = scratch.mkdir("root");
    // The server's root is setgid to a group of its own: what the receiver
    // creates below it starts with that group, which must not stick.
    chown(&root, (0, 5999));
    fs::set_permissions(&root, fs::Permissions::from_mode(0o2775)).unwrap();
    let server = Server::start(&root);

    server.run(&[&"up", &src, &"copy"]).assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    assert_eq!(owners_of(&root.join("copy")), owners_of(&src));

    let back = scratch.join("back");
    server.run(&[&"down", &"copy", &back]).assert_success();
    assert_trees_equal(&src, &back);
    assert_eq!(owners_of(&back), owners_of(&src));
}

#[test]
fn an_unchanged_file_gets_its_owner_back() {
    if !root_or_skip("an_unchanged_file_gets_its_owner_back") {
        return;
    }
    let scratch = Scratch::new();
    let src = owned_tree(&scratch);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server.run(&[&"up", &src, &"copy"]).assert_success();

    // Same size and mtime: nothing is sent again, yet the owners return.
    chown(&root.join("copy/one.txt"), (0, 0));
    chown(&root.join("copy/sub/large.bin"), (0, 0));
    let again = server.run(&[&"up", &src, &"copy", &"--json"]);
    again.assert_success();
    assert_eq!(again.json_event("summary")["files_unchanged"], 4, "{again}");
    assert_eq!(owners_of(&root.join("copy")), owners_of(&src));
}

#[test]
fn no_owner_keeps_the_receivers_own() {
    if !root_or_skip("no_owner_keeps_the_receivers_own") {
        return;
    }
    let scratch = Scratch::new();
    let src = owned_tree(&scratch);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);

    server
        .run(&[&"up", &src, &"copy", &"--no-owner"])
        .assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    let back = scratch.join("back");
    server
        .run(&[&"down", &"copy", &back, &"--no-owner"])
        .assert_success();
    assert_trees_equal(&src, &back);
    for tree in [root.join("copy"), back] {
        for (path, owner) in owners_of(&tree) {
            assert_eq!(owner, (0, 0), "{} in {}", path.display(), tree.display());
        }
    }
}

#[test]
fn a_receiver_that_is_not_root_keeps_its_own_owners() {
    if !root_or_skip("a_receiver_that_is_not_root_keeps_its_own_owners") {
        return;
    }
    let scratch = Scratch::new();
    let src = owned_tree(&scratch);
    // The unprivileged server writes into a root of its own.
    let root = scratch.mkdir("root");
    chown(&root, NOBODY);
    let server = Server::start_as(&root, &[], &unprivileged(&scratch));

    // Root's client, another user than the server's: handed its token.
    let opts = server.handed_token(RunOptions::default());
    server
        .run_with(&[&"up", &src, &"copy"], &opts)
        .assert_success();
    assert_trees_equal(&src, &root.join("copy"));
    for (path, owner) in owners_of(&root.join("copy")) {
        assert_eq!(owner, NOBODY, "{}", path.display());
    }
}
