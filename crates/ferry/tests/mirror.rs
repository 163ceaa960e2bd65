//! --delete, --max-delete and --delete-excluded: a destination made equal
//! to its source, both ways and in a local copy; deletion held back after
//! a failure or beyond the maximum; never through a symlink.

use std::fs;
use std::path::Path;

use crate::util::*;

/// A source tree, and a destination that holds it (older) plus what the
/// source no longer has: files, a nested directory, build logs, and
/// symlinks to a directory outside the destination.
struct Stale {
    scratch: Scratch,
}

impl Stale {
    fn new() -> Stale {
        let scratch = Scratch::new();
        let src = scratch.mkdir("src");
        build_small_tree(&src);
        let outside = scratch.mkdir("outside");
        write_file(&outside.join("precious"), b"must survive");
        Stale { scratch }
    }

    fn src(&self) -> std::path::PathBuf {
        self.scratch.join("src")
    }

    fn outside(&self) -> std::path::PathBuf {
        self.scratch.join("outside")
    }

    /// Make `dest` a stale copy: the source's files, and the extras.
    fn plant(&self, dest: &Path) {
        fs::create_dir_all(dest).unwrap();
        copy_into(&self.src(), dest);
        for (path, content) in [
            ("old-page.html", "removed from the build"),
            ("gone/deeper/x.txt", "a whole directory the source lost"),
            ("gone/y.txt", "y"),
            ("kept.log", "excluded: kept unless --delete-excluded"),
        ] {
            let file = dest.join(path);
            fs::create_dir_all(file.parent().unwrap()).unwrap();
            write_file(&file, content.as_bytes());
        }
        std::os::unix::fs::symlink(self.outside(), dest.join("escape")).unwrap();
        let inner = first_subdir(dest);
        std::os::unix::fs::symlink(self.outside(), inner.join("escape2")).unwrap();
    }

    fn assert_outside_untouched(&self) {
        assert_eq!(
            fs::read(self.outside().join("precious")).unwrap(),
            b"must survive"
        );
    }
}

fn first_subdir(dir: &Path) -> std::path::PathBuf {
    let mut dirs: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| lstat(p).is_dir())
        .collect();
    dirs.sort();
    dirs.into_iter()
        .next()
        .expect("the small tree has a directory")
}

/// The `deleted` events of a JSON run, as paths, sorted.
fn deleted_events(out: &Output) -> Vec<String> {
    let mut paths: Vec<String> = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "deleted")
        .map(|v| v["path"].as_str().unwrap().to_string())
        .collect();
    paths.sort();
    paths
}

#[test]
fn an_upload_with_delete_makes_the_destination_equal_and_never_follows_a_symlink() {
    let s = Stale::new();
    let root = s.scratch.mkdir("root");
    let dest = root.join("www");
    s.plant(&dest);
    let server = Server::start(&root);
    let out = server.run(&[&"up", &"--json", &"--delete", &s.src(), &"www"]);
    out.assert_success();
    assert_trees_equal(&s.src(), &dest);
    s.assert_outside_untouched();
    let deleted = deleted_events(&out);
    assert!(deleted.contains(&"www/escape".to_string()), "{deleted:?}");
    assert!(deleted.contains(&"www/gone/deeper/x.txt".to_string()));
    assert!(deleted.contains(&"www/gone".to_string()));
    // old-page, kept.log, gone/y, gone/deeper/x, gone/deeper, gone, and
    // the two links.
    assert_eq!(deleted.len(), 8, "{deleted:?}");
    assert_eq!(out.json_event("summary")["deleted"], 8);
    // A second run has nothing left to delete.
    let again = server.run(&[&"up", &"--json", &"--delete", &s.src(), &"www"]);
    again.assert_success();
    assert!(deleted_events(&again).is_empty());
}

#[test]
fn a_download_with_delete_prunes_the_local_copy_and_verbose_says_so() {
    let s = Stale::new();
    let root = s.scratch.mkdir("root");
    fs::create_dir(root.join("site")).unwrap();
    copy_into(&s.src(), &root.join("site"));
    let local = s.scratch.join("copy");
    s.plant(&local);
    let server = Server::start(&root);
    let out = server.run(&[&"down", &"-v", &"--delete", &"site", &local]);
    out.assert_success();
    assert_trees_equal(&root.join("site"), &local);
    s.assert_outside_untouched();
    out.assert_stdout_contains(&format!("deleting {}/gone/", local.display()));
    out.assert_stdout_contains(&format!("deleting {}/escape", local.display()));
    out.assert_stdout_contains("deleted:  8");
}

#[test]
fn excluded_entries_are_kept_unless_delete_excluded() {
    let s = Stale::new();
    let root = s.scratch.mkdir("root");
    let dest = root.join("www");
    s.plant(&dest);
    let server = Server::start(&root);
    let src = s.src();
    let up = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
            &"up",
            &"--delete",
            &"--exclude",
            &"*.log",
            &"--exclude",
            &"/gone/",
        ];
        args.extend_from_slice(extra);
        args.extend([&src as &dyn AsRef<std::ffi::OsStr>, &"www"]);
        server.run(&args)
    };
    up(&[]).assert_success();
    assert!(dest.join("kept.log").exists(), "an excluded file is kept");
    assert!(
        dest.join("gone/deeper/x.txt").exists(),
        "an excluded directory is kept"
    );
    assert!(!dest.join("old-page.html").exists());
    up(&[&"--delete-excluded"]).assert_success();
    assert!(!dest.join("kept.log").exists() && !dest.join("gone").exists());
    assert_trees_equal(&s.src(), &dest);
}

#[test]
fn nothing_is_deleted_after_a_failure_and_the_user_is_told() {
    let s = Stale::new();
    let root = s.scratch.mkdir("root");
    let dest = root.join("www");
    s.plant(&dest);
    // A file of the source meets a directory that is in its way.
    write_file(&s.src().join("blocked"), b"file");
    fs::create_dir_all(dest.join("blocked/inside")).unwrap();
    write_file(&dest.join("blocked/inside/f"), b"f");
    let server = Server::start(&root);
    let out = server.run(&[&"up", &"--json", &"--delete", &s.src(), &"www"]);
    out.assert_code(1);
    out.assert_stderr_contains("--delete deleted nothing: 1 entry failed");
    let held = out.json_event("deletions_held_back");
    assert_eq!(held["reason"], "failures", "{out}");
    assert!(deleted_events(&out).is_empty());
    assert!(dest.join("old-page.html").exists() && dest.join("gone/y.txt").exists());
}

#[test]
fn max_delete_refuses_a_run_that_would_delete_more() {
    let s = Stale::new();
    let root = s.scratch.mkdir("root");
    let dest = root.join("www");
    s.plant(&dest);
    let server = Server::start(&root);
    // 8 entries would go (a directory counts with what it holds).
    let out = server.run(&[&"up", &"--delete", &"--max-delete", &"7", &s.src(), &"www"]);
    out.assert_code(25);
    out.assert_stderr_contains("8 entries would go, more than --max-delete 7");
    assert!(dest.join("old-page.html").exists() && dest.join("gone/deeper/x.txt").exists());
    let out = server.run(&[&"up", &"--delete", &"--max-delete", &"8", &s.src(), &"www"]);
    out.assert_success();
    assert_trees_equal(&s.src(), &dest);
}

#[test]
fn a_local_copy_mirrors_too_and_a_file_root_deletes_nothing() {
    let s = Stale::new();
    let dest = s.scratch.join("mirror");
    s.plant(&dest);
    run(&[&"cp", &"--delete", &s.src(), &dest]).assert_success();
    assert_trees_equal(&s.src(), &dest);
    s.assert_outside_untouched();
    // A single file: nothing around it is the transfer's to delete.
    let single = s.scratch.join("single");
    write_file(&single, b"one");
    let target = s.scratch.join("mirror2");
    s.plant(&target);
    let file_dest = target.join("one.txt");
    run(&[&"cp", &"--delete", &single, &file_dest]).assert_success();
    assert!(target.join("old-page.html").exists());
}

#[test]
fn a_write_only_server_refuses_delete_which_would_tell_what_it_holds() {
    let s = Stale::new();
    let root = s.scratch.mkdir("root");
    s.plant(&root.join("www"));
    let server = Server::start_with(&root, &[&"--write-only"]);
    let out = server.run(&[&"up", &"--delete", &s.src(), &"www"]);
    out.assert_code(1);
    out.assert_stderr_contains("--delete, --atomic and --link-dest would tell what it holds");
    assert!(root.join("www/old-page.html").exists());
}

#[test]
fn delete_options_need_delete() {
    let scratch = Scratch::new();
    let out = run(&[&"up", &"--max-delete", &"3", &scratch.path(), &"x"]);
    out.assert_code(2);
    out.assert_stderr_contains("--delete");
}
