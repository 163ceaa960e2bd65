//! --include, --exclude, --exclude-from and --gitignore: what is left out,
//! both ways, with rsync's order (the first matching rule decides) and
//! gitignore-style globs.

use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

/// A website build with the junk a deploy should leave behind.
fn build_tree(root: &Path) {
    for (path, content) in [
        ("index.html", "home"),
        ("debug.log", "noise"),
        ("keep.log", "wanted"),
        ("build/out.o", "object"),
        ("assets/build/logo.svg", "not the top build"),
        ("web/node_modules/pkg/index.js", "dependency"),
        ("web/app.js", "code"),
        ("deep/down/trace.log", "noise"),
    ] {
        let file = root.join(path);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        write_file(&file, content.as_bytes());
    }
}

/// Every file below `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), base, out);
            } else {
                out.push(e.path().strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

const KEPT: &[&str] = &[
    "assets/build/logo.svg",
    "index.html",
    "keep.log",
    "web/app.js",
];

fn rules<'a>() -> Vec<&'a dyn AsRef<std::ffi::OsStr>> {
    vec![
        &"--include",
        &"keep.log",
        &"--exclude",
        &"*.log",
        &"--exclude",
        &"/build/",
        &"--exclude",
        &"**/node_modules/",
    ]
}

#[test]
fn an_upload_leaves_out_what_the_rules_exclude_and_the_first_match_wins() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("site");
    build_tree(&src);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"up", &"--json", &src, &"www"];
    args.extend(rules());
    let out = server.run(&args);
    out.assert_success();
    assert_eq!(files(&root.join("www")), KEPT);
    // The totals count what is sent, not what was left out.
    let summary = out.json_event("summary");
    assert_eq!(summary["files_total"], summary["files_ok"], "{out}");
    // The other way round, the exclude comes first and wins.
    let out = server.run(&[
        &"up",
        &"--exclude",
        &"*.log",
        &"--include",
        &"keep.log",
        &src,
        &"www2",
    ]);
    out.assert_success();
    assert!(!root.join("www2/keep.log").exists());
}

#[test]
fn a_download_leaves_out_what_the_rules_exclude() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    build_tree(&root.join("site"));
    let server = Server::start(&root);
    let dst = scratch.join("copy");
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"down", &"site", &dst];
    args.extend(rules());
    server.run(&args).assert_success();
    assert_eq!(files(&dst), KEPT);
}

#[test]
fn exclude_from_reads_gitignore_style_lines_in_place() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("site");
    build_tree(&src);
    let list: PathBuf = scratch.join("excludes");
    write_file(
        &list,
        b"# deploy junk\n\n!keep.log\n*.log\n/build/\n**/node_modules/\n",
    );
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server
        .run(&[&"up", &"--exclude-from", &list, &src, &"www"])
        .assert_success();
    assert_eq!(files(&root.join("www")), KEPT);
    let missing = server.run(&[&"up", &"--exclude-from", &"/nonexistent/list", &src, &"x"]);
    missing
        .assert_code(2)
        .assert_stderr_contains("--exclude-from /nonexistent/list");
}

#[test]
fn gitignore_files_of_the_tree_are_honoured_below_their_directory() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("repo");
    build_tree(&src);
    write_file(&src.join(".gitignore"), b"*.log\n/build/\nnode_modules/\n");
    write_file(&src.join("web/.gitignore"), b"app.js\n");
    write_file(&src.join("deep/.gitignore"), b"!*.log\n");
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    server
        .run(&[&"up", &"--gitignore", &"--include", &"keep.log", &src, &"r"])
        .assert_success();
    assert_eq!(
        files(&root.join("r")),
        [
            ".gitignore",
            "assets/build/logo.svg",
            "deep/.gitignore",
            "deep/down/trace.log",
            "index.html",
            "keep.log",
            "web/.gitignore",
        ]
    );
    // Without --gitignore, everything goes.
    server.run(&[&"up", &src, &"all"]).assert_success();
    assert_trees_equal(&src, &root.join("all"));
}

#[test]
fn an_invalid_pattern_is_a_clear_error_before_anything_moves() {
    let scratch = Scratch::new();
    let src = scratch.mkdir("site");
    build_tree(&src);
    let root = scratch.mkdir("root");
    let server = Server::start(&root);
    for direction in ["up", "down"] {
        let args: Vec<&dyn AsRef<std::ffi::OsStr>> = if direction == "up" {
            vec![&"up", &"--exclude", &"a{b", &src, &"x"]
        } else {
            vec![&"down", &"--exclude", &"a{b", &"x", &src]
        };
        let out = server.run(&args);
        out.assert_code(1)
            .assert_no_panic()
            .assert_stderr_contains("invalid filter pattern \"a{b\"");
    }
    assert!(!root.join("x").exists());
}
