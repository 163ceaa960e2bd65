//! `ferry backup`, `--link-dest` and `--append-only`: snapshots that cost
//! only what changed, restored exactly, never half there, rotated; a
//! server that never overwrites.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::util::*;

/// The snapshots in `dir`, oldest first.
fn snapshots(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with('Z') && !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// `ferry ARGS` with the server's port and its user's state.
fn ferry(server: &Server, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut all: Vec<std::ffi::OsString> = args.iter().map(|a| a.as_ref().to_os_string()).collect();
    all.extend(["-p".into(), server.port().to_string().into()]);
    all.extend(server.own_user_args());
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = all
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    run(&refs)
}

#[test]
fn daily_backups_cost_what_changed_and_restore_exactly() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("www");
    build_small_tree(&src);
    write_random_file(&src.join("big.bin"), 2 << 20, 5);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let target = "127.0.0.1:backups/www";
    ferry(&server, &[&"backup", &src, &target]).assert_success();
    let day1: PathBuf = scratch.join("day1");
    copy_into(&src, &day1);
    std::thread::sleep(Duration::from_millis(1100));
    write_file(&src.join("changed.txt"), b"day two");
    let out = ferry(&server, &[&"backup", &"--json", &src, &target]);
    out.assert_success();
    assert!(
        out.json_event("summary")["bytes"].as_u64().unwrap() < 1024,
        "{out}"
    );
    let dir = root.join("backups/www");
    let names = snapshots(&dir);
    assert_eq!(names.len(), 2, "{names:?}");
    let inode = |n: &str| lstat(&dir.join(n).join("big.bin")).ino();
    assert_eq!(
        inode(&names[0]),
        inode(&names[1]),
        "unchanged: linked, not copied"
    );
    assert_eq!(
        fs::read_link(dir.join("latest")).unwrap(),
        Path::new(&names[1])
    );
    let list = ferry(&server, &[&"backup", &"--list", &target]);
    list.assert_success();
    list.assert_stdout_contains(&format!("{}  ", names[1]));
    list.assert_stdout_contains("(latest)");
    // Restore both: each gives back the source as it was that day.
    for (name, expected) in [(&names[0], &day1), (&names[1], &src)] {
        let restored = scratch.join(format!("restore-{name}"));
        let remote = format!("backups/www/{name}");
        server.run(&[&"down", &remote, &restored]).assert_success();
        assert_trees_equal(expected, &restored);
    }
}

#[test]
fn an_interrupted_backup_is_never_latest_and_the_next_run_resumes_it() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("data");
    write_file(&src.join("a.txt"), b"a");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let target = "127.0.0.1:backups/data";
    ferry(&server, &[&"backup", &src, &target]).assert_success();
    let dir = root.join("backups/data");
    let first = snapshots(&dir);
    write_random_file(&src.join("big.bin"), 8 << 20, 9);
    std::thread::sleep(Duration::from_millis(1100));
    let mut args: Vec<std::ffi::OsString> = vec!["backup".into(), "--bwlimit".into(), "1M".into()];
    args.extend([src.clone().into_os_string(), target.into()]);
    args.extend(["-p".into(), server.port().to_string().into()]);
    args.extend(server.own_user_args());
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    let client = spawn(&refs, &RunOptions::default());
    let staged = poll_until(Duration::from_secs(20), || {
        fs::read_dir(&dir).unwrap().find_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            name.ends_with(".ferry-next").then_some(name)
        })
    });
    let staged = staged.expect("the snapshot is staged");
    std::thread::sleep(Duration::from_millis(500));
    client.kill(rustix::process::Signal::KILL);
    assert_eq!(snapshots(&dir), first, "nothing new is visible");
    assert_eq!(
        fs::read_link(dir.join("latest")).unwrap(),
        Path::new(&first[0])
    );
    // What the source does not have goes, in a staging directory this
    // transfer did not make (only a fresh one is not scanned).
    write_file(&dir.join(&staged).join("gone.txt"), b"not in the source");
    ferry(&server, &[&"backup", &src, &target]).assert_success();
    let now = snapshots(&dir);
    assert_eq!(now.len(), 2);
    assert_eq!(
        format!(".{}.ferry-next", now[1]),
        staged,
        "resumed under its own name"
    );
    assert_trees_equal(&src, &dir.join(&now[1]));
}

#[test]
fn rotation_keeps_what_it_is_told() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("data");
    write_file(&src.join("a.txt"), b"a");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let target = "127.0.0.1:b";
    for _ in 0..3 {
        ferry(&server, &[&"backup", &src, &target]).assert_success();
        std::thread::sleep(Duration::from_millis(1100));
    }
    assert_eq!(snapshots(&root.join("b")).len(), 3, "no --keep-*: all kept");
    let out = ferry(
        &server,
        &[&"backup", &"-v", &"--keep-daily", &"1", &src, &target],
    );
    out.assert_success();
    out.assert_stdout_contains("deleting b/");
    let left = snapshots(&root.join("b"));
    assert_eq!(left.len(), 1, "one day, its newest: {left:?}");
    assert_eq!(
        fs::read_link(root.join("b/latest")).unwrap(),
        Path::new(&left[0])
    );
}

#[test]
fn link_dest_links_what_is_unchanged_and_sends_the_rest() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_random_file(&src.join("same.bin"), 1 << 20, 1);
    write_file(&src.join("edited.txt"), b"version one");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server.run(&[&"up", &src, &"old"]).assert_success();
    write_file(&src.join("edited.txt"), b"version two!");
    let out = server.run(&[&"up", &"--json", &"--link-dest", &"old", &src, &"new"]);
    out.assert_success();
    assert_eq!(
        out.json_event("summary")["bytes"],
        12,
        "only the edited file: {out}"
    );
    assert_trees_equal(&src, &root.join("new"));
    let ino = |p: &str| lstat(&root.join(p)).ino();
    assert_eq!(ino("old/same.bin"), ino("new/same.bin"));
    assert_ne!(ino("old/edited.txt"), ino("new/edited.txt"));
}

/// A `--link-dest` tree is looked into like any remote path: a symlink in
/// it, be it the tree itself, a directory or the file, is never followed
/// (here out of the root, to a file that would pass the quick check), and
/// only a regular file is linked.
#[test]
fn a_link_dest_symlink_is_never_followed() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let outside = scratch.mkdir("outside");
    let root = scratch.mkdir("root");
    for tree in [&src, &outside, &root.join("real")] {
        fs::create_dir_all(tree.join("sub")).unwrap();
        write_file(&tree.join("sub/f.txt"), b"same size");
        set_mtime(&tree.join("sub/f.txt"), 1_700_000_000, 0);
    }
    std::os::unix::fs::symlink(&outside, root.join("whole")).unwrap();
    fs::create_dir(root.join("part")).unwrap();
    std::os::unix::fs::symlink(outside.join("sub"), root.join("part/sub")).unwrap();
    fs::create_dir_all(root.join("file/sub")).unwrap();
    let file = outside.join("sub/f.txt");
    std::os::unix::fs::symlink(&file, root.join("file/sub/f.txt")).unwrap();
    let server = Server::start(&root);
    for (tree, sent) in [("real", 0), ("whole", 9), ("part", 9), ("file", 9)] {
        let dst = format!("dst-{tree}");
        let out = server.run(&[&"up", &"--json", &"--link-dest", &tree, &src, &dst]);
        out.assert_success();
        assert_eq!(out.json_event("summary")["bytes"], sent, "{tree}: {out}");
        assert_trees_equal(&src, &root.join(&dst));
        let linked = lstat(&root.join(&dst).join("sub/f.txt")).ino();
        assert_ne!(linked, lstat(&file).ino(), "{tree}");
    }
}

/// A `--link-dest` file is linked only to a free name on an append-only
/// server: a file that is there already, with other content, stays.
#[test]
fn an_append_only_server_never_links_over_an_existing_file() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_file(&src.join("a.txt"), b"from the source");
    write_file(&src.join("b.txt"), b"new here");
    let root = scratch.mkdir("root");
    let server = Server::start_with(&root, &[&"--append-only"]);
    server.run(&[&"up", &src, &"old"]).assert_success();
    fs::create_dir(root.join("dst")).unwrap();
    write_file(&root.join("dst/a.txt"), b"the server's own");
    let out = server.run(&[&"up", &"--link-dest", &"old", &src, &"dst"]);
    out.assert_code(1);
    out.assert_stderr_contains("append-only");
    assert_eq!(
        fs::read(root.join("dst/a.txt")).unwrap(),
        b"the server's own"
    );
    let ino = |p: &str| lstat(&root.join(p)).ino();
    assert_eq!(ino("old/b.txt"), ino("dst/b.txt"), "a free name is linked");
}

#[test]
fn an_append_only_server_creates_but_never_overwrites_or_deletes() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_file(&src.join("a.txt"), b"first");
    let root = scratch.mkdir("root");
    let server = Server::start_with(&root, &[&"--append-only"]);
    server.run(&[&"up", &src, &"dst"]).assert_success();
    server.run(&[&"up", &src, &"dst"]).assert_success();
    write_file(&src.join("a.txt"), b"overwritten");
    write_file(&src.join("b.txt"), b"new");
    let out = server.run(&[&"up", &src, &"dst"]);
    out.assert_code(1);
    out.assert_stderr_contains("append-only");
    assert_eq!(fs::read(root.join("dst/a.txt")).unwrap(), b"first");
    assert_eq!(
        fs::read(root.join("dst/b.txt")).unwrap(),
        b"new",
        "new files are welcome"
    );
    for refused in [&"--delete" as &dyn AsRef<std::ffi::OsStr>, &"--atomic"] {
        let out = server.run(&[&"up", refused, &src, &"dst"]);
        out.assert_code(1);
        out.assert_stderr_contains("append-only");
    }
    ferry(&server, &[&"backup", &src, &"127.0.0.1:snap"]).assert_success();
    let keep = ferry(
        &server,
        &[&"backup", &"--keep-daily", &"1", &src, &"127.0.0.1:snap"],
    );
    keep.assert_code(1);
    keep.assert_stderr_contains("--keep-*");
}

/// On an append-only server, a backup interrupted after it staged a file
/// is resumed even though that file changed in the source meanwhile: the
/// staging directory is the new snapshot's, not yet anyone's backup, and
/// replacing in it destroys nothing. Earlier snapshots stay untouched.
#[test]
fn an_append_only_server_resumes_a_backup_whose_staged_file_changed() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("data");
    write_file(&src.join("a.txt"), b"day one");
    let root = scratch.mkdir("root");
    let server = Server::start_with(&root, &[&"--append-only"]);
    let target = "127.0.0.1:backups/data";
    ferry(&server, &[&"backup", &src, &target]).assert_success();
    let dir = root.join("backups/data");
    let first = snapshots(&dir);
    let day1 = scratch.join("day1");
    copy_into(&src, &day1);
    std::thread::sleep(Duration::from_millis(1100));
    write_file(&src.join("a.txt"), b"day two, staged");
    write_random_file(&src.join("big.bin"), 8 << 20, 10);
    let mut args: Vec<std::ffi::OsString> = vec!["backup".into(), "--bwlimit".into(), "1M".into()];
    args.extend([src.clone().into_os_string(), target.into()]);
    args.extend(["-p".into(), server.port().to_string().into()]);
    args.extend(server.own_user_args());
    let client = spawn_os(&args, &RunOptions::default());
    // Once a.txt is in the staging directory, the backup is cut off.
    let staged = poll_until(Duration::from_secs(20), || {
        fs::read_dir(&dir).unwrap().find_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let a = dir.join(&name).join("a.txt");
            (name.ends_with(".ferry-next") && a.exists()).then_some(name)
        })
    });
    let staged = staged.expect("a.txt is staged");
    client.kill(rustix::process::Signal::KILL);
    write_file(&src.join("a.txt"), b"day two, changed after the cut");
    let out = ferry(&server, &[&"backup", &src, &target]);
    out.assert_success();
    let now = snapshots(&dir);
    assert_eq!(now.len(), 2, "{now:?}\n{out}");
    assert_eq!(format!(".{}.ferry-next", now[1]), staged);
    assert_trees_equal(&src, &dir.join(&now[1]));
    assert_trees_equal(&day1, &dir.join(&first[0]));
}
