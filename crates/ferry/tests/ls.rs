//! `ferry ls`: a remote tree listed entry by entry, nothing written here
//! and no file data sent.

use std::fs;

use crate::util::*;

#[test]
fn ls_lists_every_entry_with_its_metadata_and_moves_no_data() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let site = scratch.mkdir("root/site");
    build_small_tree(&site);
    write_file(&site.join("page.html"), b"twelve bytes");
    set_mtime(&site.join("page.html"), 1_796_534_355, 0);
    std::os::unix::fs::symlink("page.html", site.join("link")).unwrap();
    let server = Server::start(&root);
    let before: Vec<_> = fs::read_dir(".").unwrap().collect();
    let out = server.run(&[&"ls", &"site"]);
    out.assert_success();
    out.assert_stdout_contains("-rw-r--r--           12 2026-12-06 05:19:15 site/page.html");
    out.assert_stdout_contains("site/link -> page.html");
    let entries = walkdir_count(&site);
    assert_eq!(out.stdout.lines().count(), entries, "{out}");
    assert_eq!(
        fs::read_dir(".").unwrap().count(),
        before.len(),
        "nothing made here"
    );
    let json = server.run(&[&"ls", &"--json", &"site/page.html"]);
    json.assert_success();
    let entry = json.json_event("entry");
    assert_eq!(
        (entry["size"].as_u64(), entry["kind"].as_str()),
        (Some(12), Some("file"))
    );
    let missing = server.run(&[&"ls", &"no-such"]);
    missing.assert_code(1);
    missing.assert_stderr_contains("server: no-such: no such file or directory");
}

/// Entries below `dir`, `dir` itself included, not following symlinks.
fn walkdir_count(dir: &std::path::Path) -> usize {
    let mut n = 1;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        n += match e.file_type().unwrap().is_dir() {
            true => walkdir_count(&e.path()),
            false => 1,
        };
    }
    n
}
