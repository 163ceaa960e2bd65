//! --dry-run and --itemize: a dry run changes nothing on either side and
//! says exactly what the same command then does.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::util::*;

/// A source, and a destination that differs from it in every way a
/// change is itemized: content, mode, a new file, a new directory, a file
/// and a directory the source no longer has, a symlink's target.
fn source_and_stale_copy(scratch: &Scratch, dest: &Path) -> PathBuf {
    let src = scratch.mkdir("src");
    build_small_tree(&src);
    fs::create_dir_all(dest).unwrap();
    copy_into(&src, dest);
    write_file(&src.join("new.txt"), b"new file");
    fs::create_dir_all(src.join("newdir/inner")).unwrap();
    write_file(&src.join("newdir/inner/f"), b"f");
    let some_file = first_file(&src);
    write_file(&some_file, b"rewritten, and longer than before");
    set_mode(&src.join("new.txt"), 0o600);
    std::os::unix::fs::symlink("new.txt", src.join("link")).unwrap();
    std::os::unix::fs::symlink("elsewhere", dest.join("link")).unwrap();
    write_file(&dest.join("stale.html"), b"gone from the build");
    fs::create_dir_all(dest.join("stale-dir")).unwrap();
    write_file(&dest.join("stale-dir/x"), b"x");
    src
}

fn first_file(dir: &Path) -> PathBuf {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| lstat(p).is_file())
        .collect();
    files.sort();
    files.into_iter().next().expect("the small tree has a file")
}

/// A copy of `dir` as it is now, mtimes and all, to compare against later.
fn snapshot(scratch: &Scratch, dir: &Path, name: &str) -> PathBuf {
    let copy = scratch.mkdir(name);
    copy_into(dir, &copy);
    copy
}

/// The `changed` and `deleted` events of a JSON run, as comparable lines.
fn changes(out: &Output) -> BTreeSet<String> {
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| match v["event"].as_str()? {
            "changed" => Some(format!("{} {} {}", v["action"], v["path"], v["what"])),
            "deleted" => Some(format!("deleted {}", v["path"])),
            _ => None,
        })
        .collect()
}

#[test]
fn an_upload_dry_run_changes_nothing_and_says_what_the_real_run_does() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let dest = root.join("www");
    let src = source_and_stale_copy(&scratch, &dest);
    let before_src = snapshot(&scratch, &src, "before-src");
    let before_root = snapshot(&scratch, &root, "before-root");
    let server = Server::start(&root);
    let args = |extra: &'static &'static str| -> Vec<&dyn AsRef<std::ffi::OsStr>> {
        vec![&"up", &"--json", &"--delete", extra, &src, &"www"]
    };
    let dry = server.run(&args(&"-n"));
    dry.assert_success();
    assert_trees_equal(&before_root, &root);
    assert_trees_equal(&before_src, &src);
    let said = changes(&dry);
    let summary = dry.json_event("summary");
    assert_eq!(summary["dry_run"], true);
    assert_eq!(summary["bytes"], 0, "no file data crossed: {dry}");
    let real = server.run(&args(&"-i"));
    real.assert_success();
    assert_eq!(
        said,
        changes(&real),
        "the dry run said what the real run did"
    );
    assert_eq!(
        summary["bytes_changed"],
        real.json_event("summary")["bytes"]
    );
    for expected in [
        r#""created" "www/new.txt" []"#,
        r#""created" "www/newdir" []"#,
        // (and its mtime, when the clock ticked between the two links)
        r#""updated" "www/link" ["target""#,
        r#"deleted "www/stale-dir/x""#,
        r#"deleted "www/stale.html""#,
    ] {
        assert!(
            said.iter().any(|l| l.starts_with(expected)),
            "{expected} in {said:#?}"
        );
    }
    assert_trees_equal(&src, &dest);
    // Equal now: a dry run has nothing to say.
    let again = server.run(&args(&"-n"));
    assert!(changes(&again).is_empty(), "{again}");
}

#[test]
fn a_download_dry_run_changes_nothing_locally_and_matches_the_real_run() {
    let scratch = Scratch::new();
    let local = scratch.join("copy");
    let src = source_and_stale_copy(&scratch, &local);
    let root = src.parent().unwrap().to_path_buf();
    let before = snapshot(&scratch, &local, "before");
    let server = Server::start(&root);
    let dry = server.run(&[&"down", &"--json", &"--delete", &"-n", &"src", &local]);
    dry.assert_success();
    assert_trees_equal(&before, &local);
    let real = server.run(&[&"down", &"--json", &"--delete", &"-i", &"src", &local]);
    real.assert_success();
    assert_eq!(changes(&dry), changes(&real));
    let local_name = local.display().to_string();
    assert!(
        changes(&real)
            .iter()
            .any(|l| l.contains(&format!("{local_name}/new.txt"))),
        "changes are named where they happen: {real}"
    );
    assert_trees_equal(&src, &local);
}

#[test]
fn a_dry_run_into_a_missing_destination_creates_nothing() {
    let scratch = Scratch::new();
    let root = scratch.mkdir("root");
    let src = scratch.mkdir("root/site");
    build_small_tree(&src);
    let server = Server::start(&root);
    let up = server.run(&[&"up", &"-n", &src, &"a/b/c"]);
    up.assert_success();
    up.assert_stdout_contains("Dry run, nothing changed");
    up.assert_stdout_contains("created  a/b/c/");
    assert!(!root.join("a").exists(), "nothing made on the server");
    let local = scratch.join("x/y/z");
    let down = server.run(&[&"down", &"--dry-run", &"site", &local]);
    down.assert_success();
    down.assert_stdout_contains(&format!("created  {}/", local.display()));
    assert!(!scratch.join("x").exists(), "nothing made locally");
}
