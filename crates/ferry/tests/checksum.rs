//! --checksum and `ferry check`: unchanged decided by content, and two
//! trees compared by content without moving data.

use std::fs;
use std::path::Path;

use crate::util::*;

/// Rewrite `path` with `content` of the same length and put its mtime back:
/// size and mtime cannot tell it changed.
fn rewrite_keeping_stamp(path: &Path, content: &[u8]) {
    use std::os::unix::fs::MetadataExt;
    let before = lstat(path);
    assert_eq!(before.len(), content.len() as u64);
    write_file(path, content);
    set_mtime(path, before.mtime(), before.mtime_nsec());
}

#[test]
fn checksum_sends_what_size_and_mtime_hide_and_skips_what_only_they_show() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    write_file(&src.join("same-stamp.txt"), b"original content");
    write_file(&src.join("touched.txt"), b"content that stays");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server.run(&[&"up", &src, &"www"]).assert_success();
    let dest = root.join("www");
    rewrite_keeping_stamp(&dest.join("same-stamp.txt"), b"tampered content");
    set_mtime(&src.join("touched.txt"), 1_900_000_000, 0);
    // Without --checksum the tampered file passes the quick check.
    let quick = server.run(&[&"up", &"--json", &src, &"www"]);
    quick.assert_success();
    assert_eq!(
        fs::read(dest.join("same-stamp.txt")).unwrap(),
        b"tampered content"
    );
    let out = server.run(&[&"up", &"--json", &"-c", &"-i", &src, &"www"]);
    out.assert_success();
    assert_trees_equal(&src, &dest);
    let summary = out.json_event("summary");
    assert_eq!(
        summary["bytes"], 16,
        "only the tampered file was sent: {out}"
    );
    out.assert_stdout_contains(r#""what":["content"]"#);
}

#[test]
fn a_download_with_checksum_repairs_content_the_stamp_hides() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let site = scratch.mkdir("root/site");
    build_small_tree(&site);
    write_file(&site.join("data.bin"), &random_bytes(300_000, 3));
    let server = Server::start(&root);
    let local = scratch.join("copy");
    server.run(&[&"down", &"site", &local]).assert_success();
    let mut damaged = fs::read(local.join("data.bin")).unwrap();
    damaged[150_000] ^= 1;
    rewrite_keeping_stamp(&local.join("data.bin"), &damaged);
    server
        .run(&[&"down", &"--checksum", &"site", &local])
        .assert_success();
    assert_trees_equal(&site, &local);
}

#[test]
fn check_says_whether_two_trees_are_the_same_by_content() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("src");
    build_small_tree(&src);
    write_file(&src.join("page.html"), b"the page as built");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server.run(&[&"up", &src, &"www"]).assert_success();
    let dest = root.join("www");
    let remote = "127.0.0.1:www";
    let check = |extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        let port = server.port().to_string();
        let mut args: Vec<std::ffi::OsString> = vec!["check".into(), "-p".into(), port.into()];
        args.extend(extra.iter().map(|a| a.as_ref().to_os_string()));
        args.extend(server.own_user_args());
        let refs: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        run(&refs)
    };
    let same = check(&[&src, &remote]);
    same.assert_success();
    same.assert_stdout_contains("Same:");
    rewrite_keeping_stamp(&dest.join("page.html"), b"the page, tampere");
    write_file(&dest.join("planted.php"), b"extra");
    fs::remove_file(src.join("page.html")).unwrap();
    write_file(&src.join("page.html"), b"the page as built");
    let differ = check(&[&src, &remote]);
    differ.assert_code(1);
    differ.assert_stdout_contains("differs  www/page.html (content");
    differ.assert_stdout_contains("extra    www/planted.php");
    differ.assert_stdout_contains("Different:");
    // Nothing was changed by the check.
    assert_eq!(
        fs::read(dest.join("page.html")).unwrap(),
        b"the page, tampere"
    );
    assert!(dest.join("planted.php").exists());
    // Both sides local, and a side that is missing a file.
    let copy = scratch.join("copy");
    run(&[&"cp", &src, &copy]).assert_success();
    run(&[&"check", &src, &copy]).assert_success();
    fs::remove_file(copy.join("page.html")).unwrap();
    let missing = run(&[&"check", &"--json", &src, &copy]);
    missing.assert_code(1);
    missing.assert_stdout_contains(r#""action":"created""#);
}
