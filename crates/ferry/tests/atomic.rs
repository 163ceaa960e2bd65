//! --atomic and `ferry rollback`: a directory published all at once, the
//! version it replaced kept and switched back, nothing switched after a
//! failure or an interruption, and readers that never see a mix.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::util::*;

const FILES: usize = 12;

/// Write version `v` of the site: every file says which version it is of.
fn write_version(src: &Path, v: u64) {
    fs::create_dir_all(src.join("pages")).unwrap();
    write_file(&src.join("VERSION"), v.to_string().as_bytes());
    for i in 0..FILES {
        let file = src.join(format!("pages/p{i}.html"));
        write_file(&file, format!("version {v} page {i}").as_bytes());
    }
    let logo = src.join("logo.svg");
    if !logo.exists() {
        write_file(&logo, b"the same in every version");
    }
}

fn up(server: &Server, src: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"up", &"--atomic"];
    args.extend_from_slice(extra);
    args.extend([&src as &dyn AsRef<std::ffi::OsStr>, &"www"]);
    server.run(&args)
}

#[test]
fn a_publish_switches_whole_keeps_the_previous_version_and_rolls_back() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    write_version(&src, 1);
    up(&server, &src, &[]).assert_success();
    assert_trees_equal(&src, &root.join("www"));
    write_version(&src, 2);
    fs::remove_file(src.join("pages/p0.html")).unwrap();
    let out = up(&server, &src, &[&"-i"]);
    out.assert_success();
    out.assert_stdout_contains("published www; the version it replaced is kept");
    out.assert_stdout_contains("deleted  www/pages/p0.html");
    assert_trees_equal(&src, &root.join("www"));
    let prev = root.join(".www.ferry-prev");
    assert_eq!(fs::read(prev.join("VERSION")).unwrap(), b"1");
    assert!(
        !root.join(".www.ferry-next").exists(),
        "the staging is gone"
    );
    // The unchanged file was linked from the live tree, not sent again.
    let inode = |p: PathBuf| lstat(&p).ino();
    assert_eq!(
        inode(root.join("www/logo.svg")),
        inode(prev.join("logo.svg"))
    );
    let rollback = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"rollback"];
        all.extend_from_slice(args);
        server.run(&all)
    };
    rollback(&[&"www"]).assert_success();
    assert_eq!(fs::read(root.join("www/VERSION")).unwrap(), b"1");
    rollback(&[&"www"]).assert_success();
    assert_eq!(fs::read(root.join("www/VERSION")).unwrap(), b"2");
    let none = rollback(&[&"nothing-here"]);
    none.assert_code(1);
    none.assert_stderr_contains("no previous version is kept");
}

#[test]
fn a_failed_publish_leaves_the_live_tree_and_the_same_command_resumes_it() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    write_version(&src, 1);
    up(&server, &src, &[]).assert_success();
    write_version(&src, 2);
    // A directory in the way of a file, in the staging directory.
    write_file(&src.join("blocked"), b"a file");
    fs::create_dir_all(root.join(".www.ferry-next/blocked/inside")).unwrap();
    let out = up(&server, &src, &[]);
    out.assert_code(1);
    out.assert_stderr_contains("www: not published: 1 entries failed");
    assert_eq!(fs::read(root.join("www/VERSION")).unwrap(), b"1");
    assert_eq!(
        fs::read(root.join(".www.ferry-next/VERSION")).unwrap(),
        b"2"
    );
    fs::remove_dir_all(root.join(".www.ferry-next/blocked")).unwrap();
    let again = up(&server, &src, &[&"--json"]);
    again.assert_success();
    let summary = again.json_event("summary");
    assert_eq!(
        summary["files_unchanged"],
        (FILES + 2) as u64,
        "resumed: {again}"
    );
    assert_trees_equal(&src, &root.join("www"));
}

#[test]
fn an_interrupted_publish_switches_nothing_and_resumes() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    write_version(&src, 1);
    up(&server, &src, &[]).assert_success();
    write_version(&src, 2);
    write_random_file(&src.join("big.bin"), 8 << 20, 7);
    let mut args: Vec<std::ffi::OsString> = ["up", "--atomic", "--bwlimit", "1M"]
        .iter()
        .map(Into::into)
        .collect();
    args.push(src.clone().into());
    args.push("www".into());
    args.extend(server.client_args());
    let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    let client = spawn(&refs, &RunOptions::default());
    let started = poll_until(Duration::from_secs(20), || {
        part_files(&root)
            .iter()
            .any(|p| p.to_string_lossy().contains("big.bin"))
            .then_some(())
    });
    assert!(started.is_some(), "the big file started");
    client.kill(rustix::process::Signal::KILL);
    assert_eq!(
        fs::read(root.join("www/VERSION")).unwrap(),
        b"1",
        "live untouched"
    );
    up(&server, &src, &[]).assert_success();
    assert_trees_equal(&src, &root.join("www"));
}

#[test]
fn readers_of_the_destination_never_see_two_versions_at_once() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    write_version(&src, 0);
    up(&server, &src, &[]).assert_success();
    let stop = Arc::new(AtomicBool::new(false));
    let consistent = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let (stop, consistent, live) = (stop.clone(), consistent.clone(), root.join("www"));
            std::thread::spawn(move || read_until(&live, &stop, &consistent))
        })
        .collect();
    for v in 1..=20 {
        write_version(&src, v);
        up(&server, &src, &[&"-q"]).assert_success();
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.join().expect("no reader saw two versions at once");
    }
    assert!(
        consistent.load(Ordering::Relaxed) > 50,
        "the readers read whole trees"
    );
    assert_eq!(fs::read(root.join("www/VERSION")).unwrap(), b"20");
}

/// Read the tree at `live` over and over, each time through one handle on
/// the directory (as a web server resolves a request), until `stop`:
/// every page must be of the version the tree's VERSION names. A tree
/// retired under the reader (its files deleted by a later publish) ends
/// that walk; it is never a mix.
fn read_until(live: &Path, stop: &AtomicBool, consistent: &AtomicU64) {
    use rustix::fs::{Mode, OFlags, openat};
    while !stop.load(Ordering::Relaxed) {
        let Ok(dir) = rustix::fs::open(live, OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty())
        else {
            panic!("the live path always names a tree");
        };
        let read = |name: &str| -> Option<String> {
            let fd = openat(&dir, name, OFlags::RDONLY, Mode::empty()).ok()?;
            std::io::read_to_string(fs::File::from(fd)).ok()
        };
        let Some(version) = read("VERSION") else {
            continue;
        };
        let mut whole = true;
        for i in 0..FILES {
            match read(&format!("pages/p{i}.html")) {
                Some(page) => assert_eq!(page, format!("version {version} page {i}")),
                None => whole = false,
            }
        }
        if whole {
            consistent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn a_download_publishes_atomically_and_rolls_back_locally() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let site = root.join("site");
    let server = Server::start(&root);
    let local = scratch.join("copy");
    for v in 1..=2 {
        write_version(&site, v);
        server
            .run(&[&"down", &"--atomic", &"site", &local])
            .assert_success();
        assert_trees_equal(&site, &local);
    }
    assert_eq!(
        fs::read(scratch.join(".copy.ferry-prev/VERSION")).unwrap(),
        b"1"
    );
    run(&[&"rollback", &"--local", &local]).assert_success();
    assert_eq!(fs::read(local.join("VERSION")).unwrap(), b"1");
}

#[test]
fn atomic_with_filters_must_say_what_happens_to_what_they_leave_out() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_version(&src, 1);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let out = up(&server, &src, &[&"--exclude", &"*.svg"]);
    out.assert_code(2);
    out.assert_stderr_contains("--delete --delete-excluded");
    up(
        &server,
        &src,
        &[&"--exclude", &"*.svg", &"--delete", &"--delete-excluded"],
    )
    .assert_success();
    assert!(!root.join("www/logo.svg").exists());
}
